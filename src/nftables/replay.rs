//! A protected table as the kernel held it when last verified in sync (its "image"), kept as
//! the kernel's own netlink messages, and the batch that puts it back whole. Pure: the dump
//! and the commit are [`super::netlink`]'s.
//!
//! Why: a table deleted by `nft` or `iptables-nft` cannot be written again until the deleter
//! has closed its netlink socket, and that close waits for an RCU grace period (the kernel
//! frees the deleted objects first), which on a tick-driven kernel is longer than the repair.
//! A repair committed before that close does not wait, and the only repair quick enough is one
//! already compiled: the kernel's dump of the table is what its next `NEW*` requests must say,
//! so no nft language has to be compiled at the moment of the event. What only the dump has
//! (handles, positions, use counts) is left out; rules are appended in the order they were
//! listed, which is their order in the chain.
//!
//! An image is only taken of what it can restore exactly, and only of a table that holds
//! what the config names and nothing more (an owner's other objects are not netwarden's to
//! recreate): a table without the owner or persist flags, without named objects or
//! flowtables (its use count says so), without interval or timeout sets (whose elements the
//! dump gives in a form that is not the request's), with as many chains, rules, sets and
//! elements as the config. Anything else is repaired with `nft -f`, as before.

use super::listing::ObservedTable;
use super::model::DesiredTable;
use std::collections::BTreeMap;

pub(crate) const SUBSYS_NFTABLES: u16 = 10;
const BATCH_BEGIN: u16 = 16;
const BATCH_END: u16 = 17;
const BATCH_GENID: u16 = 1;

pub(crate) const F_REQUEST: u16 = 0x1;
const F_ACK: u16 = 0x4;
pub(crate) const F_EXCL: u16 = 0x200;
pub(crate) const F_CREATE: u16 = 0x400;
pub(crate) const F_APPEND: u16 = 0x800;

// Attributes (uapi/linux/netfilter/nf_tables.h).
const TABLE_FLAGS: u16 = 2;
const TABLE_USE: u16 = 3;
const TABLE_HANDLE: u16 = 4;
const TABLE_PAD: u16 = 5;
const TABLE_OWNER: u16 = 7;
const TABLE_F_OWNER: u32 = 0x2;
const TABLE_F_PERSIST: u32 = 0x4;
const CHAIN_HANDLE: u16 = 2;
const CHAIN_USE: u16 = 6;
const CHAIN_PAD: u16 = 9;
const CHAIN_ID: u16 = 11;
const RULE_HANDLE: u16 = 3;
const RULE_POSITION: u16 = 6;
const RULE_PAD: u16 = 8;
const RULE_ID: u16 = 9;
const RULE_POSITION_ID: u16 = 10;
const RULE_CHAIN_ID: u16 = 11;
pub(crate) const SET_NAME: u16 = 2;
const SET_FLAGS: u16 = 3;
const SET_ID: u16 = 10;
const SET_PAD: u16 = 14;
const SET_HANDLE: u16 = 16;
const SET_TYPE: u16 = 19;
const SET_COUNT: u16 = 20;
const SET_F_INTERVAL: u32 = 0x1;
const SET_F_ANONYMOUS: u32 = 0x2;
const SET_F_TIMEOUT: u32 = 0x10;
/// What only a dump says of a chain or a rule (handles, positions, use counts, ids).
const CHAIN_ONLY: [u16; 4] = [CHAIN_HANDLE, CHAIN_USE, CHAIN_PAD, CHAIN_ID];
const RULE_ONLY: [u16; 6] = [
    RULE_HANDLE,
    RULE_POSITION,
    RULE_PAD,
    RULE_ID,
    RULE_POSITION_ID,
    RULE_CHAIN_ID,
];
const RULE_EXPRESSIONS: u16 = 4;
const EXPR_NAME: u16 = 1;
const EXPR_DATA: u16 = 2;
const IMMEDIATE_DATA: u16 = 2;
const DATA_VERDICT: u16 = 2;
const VERDICT_CODE: u16 = 1;
const VERDICT_CHAIN: u16 = 2;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const ELEM_LIST_SET: u16 = 2;
const ELEM_LIST_ELEMENTS: u16 = 3;
const ELEM_LIST_SET_ID: u16 = 4;

/// One nf_tables message: its type (`NFT_MSG_*`), the family of its `nfgenmsg`, and its
/// attributes as the kernel wrote them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Msg {
    pub kind: u16,
    pub family: u8,
    pub attrs: Vec<u8>,
}

/// Why a table has no image.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Unfit {
    #[error("the table has the owner or persist flag")]
    Owned,
    #[error("the table holds named objects or flowtables")]
    OtherObjects,
    #[error("set {0} has intervals or timeouts")]
    SetKind(String),
    #[error("the dump has no table message")]
    NoTable,
    #[error("the table or chain holds more than the config names")]
    MoreThanConfigured,
    #[error("a chain that should jump to it holds no such jump, or more than one")]
    Jumps,
}

/// How many chains, rules, named sets and elements of each a table holds.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Census {
    chains: usize,
    rules: usize,
    sets: BTreeMap<String, usize>,
}

impl Census {
    pub fn of_desired(d: &DesiredTable) -> Census {
        Census {
            chains: d.chains.len(),
            rules: d.chains.iter().map(|c| c.rules.len()).sum(),
            sets: d
                .sets
                .iter()
                .map(|s| (s.name.clone(), s.elements.len()))
                .collect(),
        }
    }

    pub fn of_observed(o: &ObservedTable) -> Census {
        Census {
            chains: o.chains.len(),
            rules: o.chains.iter().map(|c| c.rules.len()).sum(),
            sets: o
                .sets
                .iter()
                .map(|s| (s.name.clone(), s.elements.len()))
                .collect(),
        }
    }

    /// Anonymous sets belong to the rule that uses them, as in a listing.
    fn of_dump(d: &Dump) -> Census {
        let name = |attrs: &[u8], kind| {
            attr(attrs, kind)
                .map(super::events::string)
                .unwrap_or_default()
        };
        let mut sets: BTreeMap<String, usize> = d
            .sets
            .iter()
            .filter(|s| u32_be(attr(&s.attrs, SET_FLAGS)).unwrap_or(0) & SET_F_ANONYMOUS == 0)
            .map(|s| (name(&s.attrs, SET_NAME), 0))
            .collect();
        for m in &d.elements {
            if let Some(n) = sets.get_mut(&name(&m.attrs, ELEM_LIST_SET)) {
                *n += attr(&m.attrs, ELEM_LIST_ELEMENTS).map_or(0, |l| raw_attributes(l).len());
            }
        }
        Census {
            chains: d.chains.len(),
            rules: d.rules.len(),
            sets,
        }
    }
}

/// What a dump of one table gave: the table, then its chains, sets, elements and rules as the
/// kernel listed them.
#[derive(Clone, Debug, Default)]
pub struct Dump {
    pub table: Option<Msg>,
    pub chains: Vec<Msg>,
    pub sets: Vec<Msg>,
    pub elements: Vec<Msg>,
    pub rules: Vec<Msg>,
}

/// An image: the requests that create a table (or one chain and its jumps) again, in order,
/// with their flags.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub(super) requests: Vec<(Msg, u16)>,
    /// For the image of one chain: how many of the requests after the chain's are its rules
    /// (the jumps follow them).
    pub(super) chain_rules: Option<usize>,
}

impl Image {
    /// The image of a dumped table that holds `expected` (the config's census), or why it
    /// cannot have one.
    pub fn of_table(dump: Dump, expected: &Census) -> Result<Image, Unfit> {
        if &Census::of_dump(&dump) != expected {
            return Err(Unfit::MoreThanConfigured);
        }
        let table = dump.table.ok_or(Unfit::NoTable)?;
        let flags = u32_be(attr(&table.attrs, TABLE_FLAGS)).unwrap_or(0);
        if flags & (TABLE_F_OWNER | TABLE_F_PERSIST) != 0 {
            return Err(Unfit::Owned);
        }
        // The use count covers chains, sets (anonymous ones too), objects and flowtables.
        let used = u32_be(attr(&table.attrs, TABLE_USE)).unwrap_or(u32::MAX);
        if used as usize != dump.chains.len() + dump.sets.len() {
            return Err(Unfit::OtherObjects);
        }
        for set in &dump.sets {
            let flags = u32_be(attr(&set.attrs, SET_FLAGS)).unwrap_or(0);
            if flags & (SET_F_INTERVAL | SET_F_TIMEOUT) != 0 {
                let name = attr(&set.attrs, SET_NAME)
                    .map(super::events::string)
                    .unwrap_or_default();
                return Err(Unfit::SetKind(name));
            }
        }
        let mut requests = vec![(
            strip(table, &[TABLE_USE, TABLE_HANDLE, TABLE_PAD, TABLE_OWNER]),
            F_CREATE,
        )];
        requests.extend(
            dump.chains
                .into_iter()
                .map(|m| (strip(m, &CHAIN_ONLY), F_CREATE)),
        );
        let set_only = [SET_ID, SET_PAD, SET_HANDLE, SET_TYPE, SET_COUNT];
        requests.extend(dump.sets.into_iter().zip(1u32..).map(|(m, id)| {
            // The kernel requires an id for a set created in a batch (rules of the same
            // batch may name it by id); the name is what these rules use.
            let mut m = strip(m, &set_only);
            put_attr(&mut m.attrs, SET_ID, &id.to_be_bytes());
            (m, F_CREATE)
        }));
        requests.extend(
            dump.elements
                .into_iter()
                .map(|m| (strip(m, &[ELEM_LIST_SET_ID]), F_CREATE)),
        );
        requests.extend(
            dump.rules
                .into_iter()
                .map(|m| (strip(m, &RULE_ONLY), F_CREATE | F_APPEND)),
        );
        Ok(Image {
            requests,
            chain_rules: None,
        })
    }

    /// The image of one chain (an iptables-nft chain): the chain, its rules appended in order,
    /// and the rules elsewhere that jump to it, each put back first in its chain (`true`) or
    /// appended. The chain's table is not in it: a chain is only replayed into a table that
    /// is still there.
    pub fn of_chain(chain: Msg, rules: Vec<Msg>, jumps: Vec<(Msg, bool)>) -> Image {
        let chain_rules = Some(rules.len());
        let mut requests = vec![(strip(chain, &CHAIN_ONLY), F_CREATE)];
        requests.extend(
            rules
                .into_iter()
                .map(|m| (with_compat(strip(m, &RULE_ONLY)), F_CREATE | F_APPEND)),
        );
        // Without a position and without APPEND, the kernel puts a rule at the head.
        requests.extend(jumps.into_iter().map(|(m, first)| {
            let flags = if first { F_CREATE } else { F_CREATE | F_APPEND };
            (with_compat(strip(m, &RULE_ONLY)), flags)
        }));
        Image {
            requests,
            chain_rules,
        }
    }

    /// Messages the image sends.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }
}

/// One transaction that creates every image again, valid only at generation `genid` (the
/// kernel refuses it with ERESTART if anything was committed since). Every request asks for
/// an acknowledgement; returns the bytes and how many acknowledgements a commit brings.
pub fn batch(images: &[&Image], genid: u32, first_seq: u32) -> (Vec<u8>, usize) {
    let mut out = Vec::new();
    let mut seq = first_seq;
    let mut genid_attr = Vec::new();
    put_attr(&mut genid_attr, BATCH_GENID, &genid.to_be_bytes());
    put_msg(&mut out, BATCH_BEGIN, F_REQUEST, seq, 0, &genid_attr, true);
    let mut acks = 0;
    for image in images {
        for (m, flags) in &image.requests {
            seq = seq.wrapping_add(1);
            let kind = (SUBSYS_NFTABLES << 8) | m.kind;
            put_msg(
                &mut out,
                kind,
                F_REQUEST | F_ACK | flags,
                seq,
                m.family,
                &m.attrs,
                false,
            );
            acks += 1;
        }
    }
    seq = seq.wrapping_add(1);
    put_msg(&mut out, BATCH_END, F_REQUEST, seq, 0, &[], true);
    (out, acks)
}

/// A netlink message: header, `nfgenmsg` (version 0; the batch messages carry the subsystem
/// in `res_id`), attributes.
pub(crate) fn put_msg(
    out: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    attrs: &[u8],
    batch_marker: bool,
) {
    let len = 16 + 4 + attrs.len();
    out.extend_from_slice(&(len as u32).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.push(family);
    out.push(0);
    let res_id = if batch_marker { SUBSYS_NFTABLES } else { 0 };
    out.extend_from_slice(&res_id.to_be_bytes());
    out.extend_from_slice(attrs);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// Appends one attribute, padded.
pub(crate) fn put_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// An iptables-nft rule with its xtables compat attribute again, which a dump leaves out: the
/// protocol `-p` matched (`meta l4proto` compared equal or not), which xtables matches such as
/// `multiport` check when they are created (without it the kernel refuses the rule: EINVAL).
/// Rules without xtables expressions, or that have the attribute, are left as they are.
pub(crate) fn with_compat(mut rule: Msg) -> Msg {
    const RULE_COMPAT: u16 = 5;
    const COMPAT_PROTO: u16 = 1;
    const COMPAT_FLAGS: u16 = 2;
    // NFT_RULE_COMPAT_F_INV; bit 0 is unused, and refused.
    const COMPAT_F_INV: u32 = 2;
    const META_DREG: u16 = 1;
    const META_KEY: u16 = 2;
    const META_L4PROTO: u32 = 16;
    const CMP_SREG: u16 = 1;
    const CMP_OP: u16 = 2;
    const CMP_DATA: u16 = 3;
    const DATA_VALUE: u16 = 1;
    if attr(&rule.attrs, RULE_COMPAT).is_some() || !has_compat(&rule) {
        return rule;
    }
    let exprs: Vec<(String, &[u8])> = expressions(&rule)
        .into_iter()
        .map(|e| {
            let name = expr_name(e).unwrap_or_default();
            (name, attr(e, EXPR_DATA).unwrap_or_default())
        })
        .collect();
    let proto = exprs.windows(2).find_map(|w| {
        let [(meta, m), (cmp, c)] = w else {
            return None;
        };
        let l4 = meta == "meta" && u32_be(attr(m, META_KEY)) == Some(META_L4PROTO);
        if !l4 || cmp != "cmp" || attr(m, META_DREG) != attr(c, CMP_SREG) {
            return None;
        }
        let value = attr(c, CMP_DATA).and_then(|d| attr(d, DATA_VALUE))?;
        let inverted = match u32_be(attr(c, CMP_OP))? {
            0 => false,
            1 => true,
            _ => return None,
        };
        Some((u32::from(*value.first()?), inverted))
    });
    if let Some((proto, inverted)) = proto {
        let mut compat = Vec::new();
        put_attr(&mut compat, COMPAT_PROTO, &proto.to_be_bytes());
        let flags = if inverted { COMPAT_F_INV } else { 0 };
        put_attr(&mut compat, COMPAT_FLAGS, &flags.to_be_bytes());
        put_attr(&mut rule.attrs, RULE_COMPAT | 0x8000, &compat);
    }
    rule
}

/// The message without the top-level attributes of the given types.
fn strip(m: Msg, types: &[u16]) -> Msg {
    let mut attrs = Vec::with_capacity(m.attrs.len());
    for (kind, whole) in raw_attributes(&m.attrs) {
        if !types.contains(&(kind & 0x3fff)) {
            attrs.extend_from_slice(whole);
            attrs.resize(attrs.len().next_multiple_of(4), 0);
        }
    }
    Msg { attrs, ..m }
}

/// Attributes with their headers: (type with its flag bits, the attribute unpadded).
pub(crate) fn raw_attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([b[0], b[1]]));
        let kind = u16::from_ne_bytes([b[2], b[3]]);
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind, &b[..len]));
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    out
}

/// The payload of the first top-level attribute of type `kind`.
pub(crate) fn attr(attrs: &[u8], kind: u16) -> Option<&[u8]> {
    raw_attributes(attrs)
        .into_iter()
        .find(|(k, _)| k & 0x3fff == kind)
        .map(|(_, whole)| &whole[4..])
}

/// A rule's expressions, each the payload of one list element.
pub(crate) fn expressions(rule: &Msg) -> Vec<&[u8]> {
    const LIST_ELEM: u16 = 1;
    attr(&rule.attrs, RULE_EXPRESSIONS)
        .map(|list| {
            raw_attributes(list)
                .into_iter()
                .filter(|(k, _)| k & 0x3fff == LIST_ELEM)
                .map(|(_, whole)| &whole[4..])
                .collect()
        })
        .unwrap_or_default()
}

/// An expression's name (`immediate`, `match`, …).
pub(crate) fn expr_name(e: &[u8]) -> Option<String> {
    attr(e, EXPR_NAME).map(super::events::string)
}

/// Whether a rule holds an xtables match or target.
pub(crate) fn has_compat(rule: &Msg) -> bool {
    expressions(rule)
        .iter()
        .any(|e| matches!(expr_name(e).as_deref(), Some("match" | "target")))
}

/// A NUL-terminated string attribute's payload.
pub(crate) fn c_str(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// Whether a rule jumps or goes to `chain` (an `immediate` expression with that verdict).
pub fn jumps_to(rule: &Msg, chain: &str) -> bool {
    expressions(rule).into_iter().any(|expr| {
        if expr_name(expr).as_deref() != Some("immediate") {
            return false;
        }
        let verdict = attr(expr, EXPR_DATA)
            .and_then(|d| attr(d, IMMEDIATE_DATA))
            .and_then(|d| attr(d, DATA_VERDICT));
        verdict.is_some_and(|v| {
            let code = u32_be(attr(v, VERDICT_CODE)).map(|c| c as i32);
            let target = attr(v, VERDICT_CHAIN).map(super::events::string);
            matches!(code, Some(NFT_JUMP | NFT_GOTO)) && target.as_deref() == Some(chain)
        })
    })
}

pub(crate) fn u32_be(b: Option<&[u8]>) -> Option<u32> {
    Some(u32::from_be_bytes(b?.get(..4)?.try_into().ok()?))
}

#[cfg(test)]
#[path = "replay_tests.rs"]
mod tests;
