//! A protected iptables-nft chain's *spare*: a copy of the chain, with its rules, kept under a
//! name of netwarden's in the same table and jumped to by nothing, and the image that puts the
//! chain back from it by renaming it. Pure: the transactions are [`super::netlink`]'s.
//!
//! Why: iptables-nft writes `-m comment`, `MASQUERADE` and most other extensions as xtables
//! compat expressions, and the kernel makes the creation of each new one wait until the
//! objects of earlier transactions are freed, one RCU grace period after them. Right after a
//! chain was deleted, any transaction that writes its rules again waits for that deletion's
//! grace period, whoever commits and however early. A rename creates no expression: the
//! spare's rules were created long before, so the chain is back without that wait. Its jumps
//! are written again; the one compat expression they usually hold, the comment, is written as
//! the rule's comment (its user data), which `iptables-nft-save` prints and `iptables -C`
//! matches exactly as the compat match.

use super::replay::{
    attr, c_str, expr_name, expressions, has_compat, put_attr, raw_attributes, u32_be, Image, Msg,
    F_APPEND, F_CREATE, F_EXCL,
};

pub use crate::netfilter::model::{is_spare, SPARE_PREFIX as PREFIX};

const NEWCHAIN: u16 = 3;
const DELCHAIN: u16 = 5;
const DELRULE: u16 = 8;
const CHAIN_TABLE: u16 = 1;
const CHAIN_HANDLE: u16 = 2;
const CHAIN_NAME: u16 = 3;
const CHAIN_HOOK: u16 = 4;
const RULE_TABLE: u16 = 1;
const RULE_CHAIN: u16 = 2;
const RULE_EXPRESSIONS: u16 = 4;
const RULE_USERDATA: u16 = 7;
const LIST_ELEM: u16 = 1;
const EXPR_DATA: u16 = 2;
const MATCH_NAME: u16 = 1;
const MATCH_REV: u16 = 2;
const MATCH_INFO: u16 = 3;
const IMMEDIATE_DATA: u16 = 2;
const DATA_VERDICT: u16 = 2;
const VERDICT_CHAIN: u16 = 2;
/// libnftnl's rule comment in the user data (`NFTNL_UDATA_RULE_COMMENT`).
const UDATA_COMMENT: u8 = 0;

/// The spare's name for chain `chain` of table `table` (family `family`): the prefix and a
/// hash of the three, 24 characters, within iptables' 28 (an owner's `iptables-save` and
/// `iptables-restore` round trip must still read it).
pub fn name(family: u8, table: &str, chain: &str) -> String {
    // FNV-1a: the same name in every run and every version.
    let mut h: u32 = 0x811c_9dc5;
    for b in [family]
        .iter()
        .chain(table.as_bytes())
        .chain(&[0])
        .chain(chain.as_bytes())
    {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{PREFIX}{h:08X}")
}

/// Requests of an image, each with its flags.
type Requests = [(Msg, u16)];

/// The chain's message, its rules and its jumps, of the image of one chain.
fn parts(image: &Image) -> Option<(&Msg, &Requests, &Requests)> {
    let n = image.chain_rules?;
    let (chain, rest) = image.requests.split_first()?;
    let rules = rest.get(..n)?;
    Some((&chain.0, rules, &rest[n..]))
}

/// Native expressions a copy may hold: none refers to another chain, a set or a stateful
/// object, so the copy holds nothing an owner could not delete or destroy while it is there.
const NATIVE_OK: &[&str] = &[
    "payload",
    "cmp",
    "meta",
    "bitwise",
    "byteorder",
    "counter",
    "immediate",
    "ct",
    "limit",
    "range",
    "log",
    "masq",
    "nat",
    "redir",
    "reject",
    "exthdr",
    "fib",
    "rt",
    "socket",
    "tproxy",
    "queue",
];
/// xtables matches a copy may hold: stateless, holding no set, list, file or module of an
/// owner's (not `set`, `recent`, `hashlimit`, `connlimit`, `quota`, `statistic`, `cgroup`,
/// `bpf`, …).
const MATCHES_OK: &[&str] = &[
    "comment",
    "addrtype",
    "conntrack",
    "state",
    "multiport",
    "tcp",
    "udp",
    "icmp",
    "icmp6",
    "iprange",
    "physdev",
    "mac",
    "pkttype",
    "length",
    "ttl",
    "hl",
    "tos",
    "dscp",
    "ecn",
    "policy",
    "mark",
    "connmark",
    "helper",
    "devgroup",
    "owner",
    "sctp",
    "esp",
    "ah",
    "u32",
    "string",
];
/// xtables targets a copy may hold, by the same measure (not `SET`, `CT`, `IDLETIMER`, `LED`,
/// `RATEEST`, …).
const TARGETS_OK: &[&str] = &[
    "MASQUERADE",
    "SNAT",
    "DNAT",
    "REDIRECT",
    "NETMAP",
    "MARK",
    "CONNMARK",
    "REJECT",
    "LOG",
    "NFLOG",
    "DSCP",
    "TOS",
    "TCPMSS",
    "NOTRACK",
    "CLASSIFY",
    "CHECKSUM",
    "NFQUEUE",
    "TTL",
    "HL",
    "TPROXY",
];

/// Whether a dormant copy of the rule is harmless: every expression is one of the above, and no
/// verdict jumps or goes to a chain (a copy would keep that chain from being deleted).
fn copyable(rule: &Msg) -> bool {
    expressions(rule).iter().all(|e| {
        let Some(name) = expr_name(e) else {
            return false;
        };
        let data = attr(e, EXPR_DATA).unwrap_or_default();
        let named = |kind| attr(data, kind).map(super::events::string);
        match name.as_str() {
            "match" => named(MATCH_NAME).is_some_and(|n| MATCHES_OK.contains(&n.as_str())),
            "target" => named(MATCH_NAME).is_some_and(|n| TARGETS_OK.contains(&n.as_str())),
            "immediate" => attr(data, IMMEDIATE_DATA)
                .and_then(|d| attr(d, DATA_VERDICT))
                .is_none_or(|v| attr(v, VERDICT_CHAIN).is_none()),
            n => NATIVE_OK.contains(&n),
        }
    })
}

/// The creation of the spare of a chain image: its chain, renamed, and its rules in it, in one
/// transaction (refused if the spare is there already). `None` when a spare would not help or
/// must not be made: a base chain (a copy would be hooked in), rules without compat
/// expressions (they are put back without waiting as they are), or a rule whose copy would
/// hold on to something of an owner's ([`copyable`]).
pub fn build(image: &Image, spare: &str) -> Option<Image> {
    let (chain, rules, _) = parts(image)?;
    if attr(&chain.attrs, CHAIN_HOOK).is_some()
        || !rules.iter().any(|(r, _)| has_compat(r))
        || !rules.iter().all(|(r, _)| copyable(r))
    {
        return None;
    }
    let mut requests = vec![(renamed(chain, CHAIN_NAME, spare), F_CREATE | F_EXCL)];
    requests.extend(
        rules
            .iter()
            .map(|(r, _)| (renamed(r, RULE_CHAIN, spare), F_CREATE | F_APPEND)),
    );
    Some(Image {
        requests,
        chain_rules: None,
    })
}

/// The image that puts the chain back from its spare (handle `handle`): the spare renamed to
/// the chain's name, and the jumps to it written again, jumping to the spare by the name it has
/// until the transaction commits, their comment match written as a rule comment where
/// `iptables-nft-save` prints it the same.
pub fn swap(image: &Image, spare: &str, handle: u64) -> Option<Image> {
    let (chain, _, jumps) = parts(image)?;
    let name = attr(&chain.attrs, CHAIN_NAME)?;
    let mut attrs = Vec::new();
    put_attr(&mut attrs, CHAIN_TABLE, attr(&chain.attrs, CHAIN_TABLE)?);
    put_attr(&mut attrs, CHAIN_HANDLE, &handle.to_be_bytes());
    put_attr(&mut attrs, CHAIN_NAME, name);
    let rename = Msg {
        kind: NEWCHAIN,
        family: chain.family,
        attrs,
    };
    let name = std::str::from_utf8(name.strip_suffix(&[0]).unwrap_or(name)).ok()?;
    let mut requests = vec![(rename, 0)];
    for (jump, flags) in jumps {
        let to_spare = with_expressions(jump, |e| retarget(e, name, spare));
        requests.push((comment_as_userdata(&to_spare).unwrap_or(to_spare), *flags));
    }
    Some(Image {
        requests,
        chain_rules: None,
    })
}

/// The transaction that deletes a spare: its rules, then the chain.
pub fn removal(family: u8, table: &str, spare: &str) -> Image {
    let mut attrs = Vec::new();
    put_attr(&mut attrs, RULE_TABLE, &c_str(table));
    put_attr(&mut attrs, RULE_CHAIN, &c_str(spare));
    let flush = Msg {
        kind: DELRULE,
        family,
        attrs,
    };
    let mut attrs = Vec::new();
    put_attr(&mut attrs, CHAIN_TABLE, &c_str(table));
    put_attr(&mut attrs, CHAIN_NAME, &c_str(spare));
    let chain = Msg {
        kind: DELCHAIN,
        family,
        attrs,
    };
    Image {
        requests: vec![(flush, 0), (chain, 0)],
        chain_rules: None,
    }
}

/// The message with attribute `kind` set to the string `name`.
fn renamed(m: &Msg, kind: u16, name: &str) -> Msg {
    rewritten(m, |k, _| (k & 0x3fff == kind).then(|| c_str(name)))
}

/// The attributes with the payload of some replaced: `f` gives the new payload, or `None` to
/// keep the attribute. Type bits (nesting) are kept.
fn rewrite_attrs(attrs: &[u8], mut f: impl FnMut(u16, &[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::with_capacity(attrs.len());
    for (kind, whole) in raw_attributes(attrs) {
        match f(kind, &whole[4..]) {
            Some(payload) => {
                out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
                out.extend_from_slice(&kind.to_ne_bytes());
                out.extend_from_slice(&payload);
            }
            None => out.extend_from_slice(whole),
        }
        out.resize(out.len().next_multiple_of(4), 0);
    }
    out
}

fn rewritten(m: &Msg, f: impl FnMut(u16, &[u8]) -> Option<Vec<u8>>) -> Msg {
    Msg {
        attrs: rewrite_attrs(&m.attrs, f),
        ..m.clone()
    }
}

/// The rule with each expression replaced by what `f` makes of it.
fn with_expressions(rule: &Msg, mut f: impl FnMut(&[u8]) -> Vec<u8>) -> Msg {
    rewritten(rule, |k, list| {
        (k & 0x3fff == RULE_EXPRESSIONS)
            .then(|| rewrite_attrs(list, |k, e| (k & 0x3fff == LIST_ELEM).then(|| f(e))))
    })
}

/// An `immediate` expression jumping or going to `from` made to name `to`; any other as it is.
fn retarget(e: &[u8], from: &str, to: &str) -> Vec<u8> {
    if expr_name(e).as_deref() != Some("immediate") {
        return e.to_vec();
    }
    let verdict_chain = |k: u16, p: &[u8]| {
        (k & 0x3fff == VERDICT_CHAIN && super::events::string(p) == from).then(|| c_str(to))
    };
    rewrite_attrs(e, |k, data| {
        (k & 0x3fff == EXPR_DATA).then(|| {
            rewrite_attrs(data, |k, imm| {
                (k & 0x3fff == IMMEDIATE_DATA).then(|| {
                    rewrite_attrs(imm, |k, d| {
                        (k & 0x3fff == DATA_VERDICT).then(|| rewrite_attrs(d, verdict_chain))
                    })
                })
            })
        })
    })
}

/// The comment of an xtables `comment` match expression (revision 0), if it is one.
fn comment_of(e: &[u8]) -> Option<Vec<u8>> {
    if expr_name(e).as_deref() != Some("match") {
        return None;
    }
    let data = attr(e, EXPR_DATA)?;
    let name = attr(data, MATCH_NAME).map(super::events::string)?;
    if name != "comment" || u32_be(attr(data, MATCH_REV)) != Some(0) {
        return None;
    }
    let info = attr(data, MATCH_INFO)?;
    let text: Vec<u8> = info.iter().copied().take_while(|b| *b != 0).collect();
    Some(text)
}

/// The rule with its comment match written as its comment (user data), if it holds exactly
/// one, no user data yet, and only a counter, an immediate verdict or a target after it:
/// `iptables-nft-save` prints a rule comment after the rule's matches, so only then is the
/// printed rule the same.
fn comment_as_userdata(rule: &Msg) -> Option<Msg> {
    if attr(&rule.attrs, RULE_USERDATA).is_some() {
        return None;
    }
    let exprs = expressions(rule);
    let comments: Vec<(usize, Vec<u8>)> = exprs
        .iter()
        .enumerate()
        .filter_map(|(i, e)| comment_of(e).map(|c| (i, c)))
        .collect();
    let [(at, text)] = &comments[..] else {
        return None;
    };
    let tail_ok = exprs[at + 1..].iter().all(|e| {
        matches!(
            expr_name(e).as_deref(),
            Some("counter" | "immediate" | "target")
        )
    });
    if !tail_ok || text.is_empty() || text.len() + 1 > usize::from(u8::MAX) {
        return None;
    }
    let mut index = 0;
    let mut out = rewritten(rule, |k, list| {
        (k & 0x3fff == RULE_EXPRESSIONS).then(|| {
            let mut kept = Vec::with_capacity(list.len());
            for (k, whole) in raw_attributes(list) {
                let skip = k & 0x3fff == LIST_ELEM && index == *at;
                index += usize::from(k & 0x3fff == LIST_ELEM);
                if !skip {
                    kept.extend_from_slice(whole);
                    kept.resize(kept.len().next_multiple_of(4), 0);
                }
            }
            kept
        })
    });
    let mut udata = vec![UDATA_COMMENT, (text.len() + 1) as u8];
    udata.extend_from_slice(text);
    udata.push(0);
    put_attr(&mut out.attrs, RULE_USERDATA, &udata);
    Some(out)
}

#[cfg(test)]
#[path = "spare_tests.rs"]
mod tests;

/// Message builders for tests (here and in the guard's fakes).
#[cfg(test)]
pub(crate) mod build_for_tests {
    use super::*;

    const NEWRULE: u16 = 6;
    const EXPR_NAME: u16 = 1;
    pub const NESTED: u16 = 0x8000;

    fn nested(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_attr(&mut out, kind | NESTED, payload);
        out
    }

    /// An expression: its name and data.
    pub fn expr(name: &str, data: &[u8]) -> Vec<u8> {
        let mut e = Vec::new();
        put_attr(&mut e, EXPR_NAME, &c_str(name));
        e.extend(nested(EXPR_DATA, data));
        e
    }

    /// An xtables comment match.
    pub fn comment(text: &str) -> Vec<u8> {
        let mut d = Vec::new();
        put_attr(&mut d, MATCH_NAME, &c_str("comment"));
        put_attr(&mut d, MATCH_REV, &0u32.to_be_bytes());
        let mut info = text.as_bytes().to_vec();
        info.resize(256, 0);
        put_attr(&mut d, MATCH_INFO, &info);
        expr("match", &d)
    }

    /// An xtables target.
    pub fn target(name: &str) -> Vec<u8> {
        let mut d = Vec::new();
        put_attr(&mut d, 1, &c_str(name));
        put_attr(&mut d, 2, &0u32.to_be_bytes());
        put_attr(&mut d, 3, &[0u8; 8]);
        expr("target", &d)
    }

    pub fn counter() -> Vec<u8> {
        expr("counter", &[])
    }

    /// An immediate jump to `chain`.
    pub fn jump(chain: &str) -> Vec<u8> {
        let mut v = Vec::new();
        put_attr(&mut v, 1, &(-3i32 as u32).to_be_bytes());
        put_attr(&mut v, VERDICT_CHAIN, &c_str(chain));
        let verdict = nested(DATA_VERDICT, &v);
        let mut d = Vec::new();
        put_attr(&mut d, 1, &0u32.to_be_bytes());
        d.extend(nested(IMMEDIATE_DATA, &verdict));
        expr("immediate", &d)
    }

    /// A rule of chain `chain` of table `nat` with these expressions.
    pub fn rule(chain: &str, exprs: &[Vec<u8>]) -> Msg {
        let mut list = Vec::new();
        for e in exprs {
            list.extend(nested(LIST_ELEM, e));
        }
        let mut attrs = Vec::new();
        put_attr(&mut attrs, RULE_TABLE, &c_str("nat"));
        put_attr(&mut attrs, RULE_CHAIN, &c_str(chain));
        attrs.extend(nested(RULE_EXPRESSIONS, &list));
        Msg {
            kind: NEWRULE,
            family: 2,
            attrs,
        }
    }

    /// A regular chain of table `nat`.
    pub fn chain(name: &str) -> Msg {
        let mut attrs = Vec::new();
        put_attr(&mut attrs, CHAIN_TABLE, &c_str("nat"));
        put_attr(&mut attrs, CHAIN_NAME, &c_str(name));
        Msg {
            kind: NEWCHAIN,
            family: 2,
            attrs,
        }
    }

    /// flannel's chain: one rule with a comment and MASQUERADE, jumped to first from
    /// POSTROUTING by a rule with the same comment.
    pub fn flannel() -> Image {
        let masq = rule(
            "FLANNEL-POSTRTG",
            &[comment("flanneld masq"), counter(), target("MASQUERADE")],
        );
        let jump = rule(
            "POSTROUTING",
            &[comment("flanneld masq"), counter(), jump("FLANNEL-POSTRTG")],
        );
        Image::of_chain(chain("FLANNEL-POSTRTG"), vec![masq], vec![(jump, true)])
    }
}
