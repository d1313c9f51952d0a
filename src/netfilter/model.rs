//! Plain data for protected iptables chains and ipsets. No I/O.
//!
//! Identity: a chain is (family, table, chain name), as `iptables-save` groups them; a set is its
//! name (ipset names are global to a network namespace, whatever the family).

use super::rulespec::RuleSpec;
use crate::model::{Family, Mode};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// The iptables tables netwarden may touch. `security` is deliberately absent: SELinux owns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Table {
    Filter,
    Nat,
    Mangle,
    Raw,
}

impl Table {
    pub const ALL: [Table; 4] = [Table::Filter, Table::Nat, Table::Mangle, Table::Raw];

    pub fn parse(s: &str) -> Option<Table> {
        Table::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Table::Filter => "filter",
            Table::Nat => "nat",
            Table::Mangle => "mangle",
            Table::Raw => "raw",
        }
    }

    /// The chains the kernel (legacy) or iptables-nft creates with the table: they have a policy,
    /// hold other owners' rules, and must never be flushed or deleted.
    pub fn builtin_chains(self) -> &'static [&'static str] {
        match self {
            Table::Filter => &["INPUT", "FORWARD", "OUTPUT"],
            Table::Nat => &["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
            Table::Mangle => &["PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"],
            Table::Raw => &["PREROUTING", "OUTPUT"],
        }
    }

    pub fn is_builtin(self, chain: &str) -> bool {
        self.builtin_chains().contains(&chain)
    }
}

impl fmt::Display for Table {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Is a whole list owned (`exact`: these and nothing else, in this order) or only required to be
/// present (`contains`)?
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Content {
    #[default]
    Exact,
    Contains,
}

impl fmt::Display for Content {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Content::Exact => "exact",
            Content::Contains => "contains",
        })
    }
}

/// Where a jump must sit in its chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Position {
    First,
    #[default]
    Any,
}

/// An (iptables) family + table pair: the unit that `iptables-save -t` reads and that one
/// `iptables-restore` transaction writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TableId {
    pub family: Family,
    pub table: Table,
}

impl fmt::Display for TableId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.table)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChainKey {
    pub family: Family,
    pub table: Table,
    pub chain: String,
}

impl ChainKey {
    pub fn table_id(&self) -> TableId {
        TableId {
            family: self.family,
            table: self.table,
        }
    }
}

impl fmt::Display for ChainKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.family, self.table, self.chain)
    }
}

/// A rule in another chain (usually a builtin one) that must exist: typically the jump into the
/// protected chain.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jump {
    pub chain: String,
    pub rule: RuleSpec,
    pub position: Position,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredChain {
    pub name: String,
    pub mode: Mode,
    pub key: ChainKey,
    pub rules: Vec<RuleSpec>,
    pub content: Content,
    pub jumps: Vec<Jump>,
}

/// The ipset types netwarden understands members of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub enum SetType {
    #[serde(rename = "hash:ip")]
    HashIp,
    #[serde(rename = "hash:net")]
    HashNet,
    #[serde(rename = "hash:ip,port")]
    HashIpPort,
    #[serde(rename = "hash:net,port")]
    HashNetPort,
}

impl SetType {
    pub const ALL: [SetType; 4] = [
        SetType::HashIp,
        SetType::HashNet,
        SetType::HashIpPort,
        SetType::HashNetPort,
    ];

    pub fn parse(s: &str) -> Option<SetType> {
        SetType::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SetType::HashIp => "hash:ip",
            SetType::HashNet => "hash:net",
            SetType::HashIpPort => "hash:ip,port",
            SetType::HashNetPort => "hash:net,port",
        }
    }

    pub fn has_port(self) -> bool {
        matches!(self, SetType::HashIpPort | SetType::HashNetPort)
    }

    /// hash:ip stores addresses only; a prefix member there is a range, which `ipset` expands.
    pub fn takes_prefixes(self) -> bool {
        matches!(self, SetType::HashNet | SetType::HashNetPort)
    }
}

impl fmt::Display for SetType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `ipset`'s name for a family.
pub fn ipset_family(family: Family) -> &'static str {
    match family {
        Family::Ipv4 => "inet",
        Family::Ipv6 => "inet6",
    }
}

/// Protocol of a `,port` member part, as `ipset save` prints it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortProto {
    Tcp,
    Udp,
    Sctp,
    Udplite,
}

impl PortProto {
    pub fn parse(s: &str) -> Option<PortProto> {
        Some(match s {
            "tcp" => PortProto::Tcp,
            "udp" => PortProto::Udp,
            "sctp" => PortProto::Sctp,
            "udplite" => PortProto::Udplite,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PortProto::Tcp => "tcp",
            PortProto::Udp => "udp",
            PortProto::Sctp => "sctp",
            PortProto::Udplite => "udplite",
        }
    }
}

/// One set member in normal form: host bits cleared, a host prefix for single addresses, the
/// port part with its protocol (ipset's default is tcp). Compared structurally, so `10.0.0.1`,
/// `10.0.0.1/32` and `10.0.0.1,80` vs `10.0.0.1,tcp:80` are the same member.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub net: IpNet,
    pub port: Option<(PortProto, u16)>,
}

impl Member {
    /// Parses a member as written in config or printed by `ipset save`.
    pub fn parse(s: &str) -> Result<Member, String> {
        let (addr, port) = match s.split_once(',') {
            Some((a, p)) => (a, Some(p)),
            None => (s, None),
        };
        let net = if addr.contains('/') {
            let n: IpNet = addr
                .parse()
                .map_err(|_| format!("`{addr}` is not an IP prefix"))?;
            if n.trunc() != n {
                return Err(format!(
                    "`{addr}` has host bits set: did you mean `{}`?",
                    n.trunc()
                ));
            }
            n
        } else {
            let a: IpAddr = addr
                .parse()
                .map_err(|_| format!("`{addr}` is not an IP address"))?;
            IpNet::from(a)
        };
        let port = match port {
            None => None,
            Some(p) => {
                let (proto, number) = match p.split_once(':') {
                    Some((proto, n)) => (
                        PortProto::parse(proto).ok_or_else(|| {
                            format!("unknown protocol `{proto}` in `{s}`: use tcp, udp, sctp or udplite")
                        })?,
                        n,
                    ),
                    None => (PortProto::Tcp, p),
                };
                let number: u16 = number
                    .parse()
                    .map_err(|_| format!("`{number}` in `{s}` is not a port number (0..65535)"))?;
                Some((proto, number))
            }
        };
        Ok(Member { net, port })
    }

    pub fn family(&self) -> Family {
        Family::of_net(&self.net)
    }

    fn is_host(&self) -> bool {
        self.net.prefix_len() == self.net.max_prefix_len()
    }

    /// Does the member overlap a forbidden prefix (either contains the other)? A member network
    /// that contains a forbidden address matches that address's packets just as well.
    pub fn overlaps(&self, forbidden: &IpNet) -> bool {
        self.net.contains(forbidden) || forbidden.contains(&self.net)
    }
}

impl fmt::Display for Member {
    /// As `ipset save` prints it: a host prefix as a bare address.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_host() {
            write!(f, "{}", self.net.addr())?;
        } else {
            write!(f, "{}", self.net)?;
        }
        if let Some((proto, port)) = self.port {
            write!(f, ",{}:{port}", proto.as_str())?;
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DesiredSet {
    /// The object name (for logs and reports).
    pub name: String,
    pub mode: Mode,
    /// The ipset's own name.
    pub set: String,
    pub kind: SetType,
    pub family: Family,
    /// Creation options the config names (`hashsize`, `timeout`, …).
    pub options: SetOptions,
    pub members: Vec<Member>,
    pub membership: Content,
    pub forbidden: Vec<IpNet>,
}

/// `ipset create` options that take a value; the others are flags. `initval` (a random hash
/// seed) is never kept.
const VALUED_OPTIONS: &[&str] = &[
    "hashsize",
    "maxelem",
    "timeout",
    "bucketsize",
    "netmask",
    "markmask",
    "size",
    "initval",
];

/// Creation options of a set as the config names them (`spec.ipsets[].hashsize` …). A set is
/// created with them; those a set cannot change afterwards (`maxelem`, `timeout`, `counters`,
/// `comment`, `skbinfo`) are also compared with the set that exists. `hashsize` is not: the
/// kernel grows it as the set fills.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct SetOptions {
    pub hashsize: Option<u32>,
    pub maxelem: Option<u32>,
    /// Default timeout of members, in seconds; `0`: members stay unless given their own.
    pub timeout: Option<u32>,
    pub counters: Option<bool>,
    pub comment: Option<bool>,
    pub skbinfo: Option<bool>,
}

/// `create` words (`hashsize 1024 maxelem 65536 timeout 0 comment`) as (option, value) pairs.
fn option_pairs(words: &[String]) -> Vec<(String, Option<String>)> {
    let mut out = Vec::new();
    let mut it = words.iter();
    while let Some(w) = it.next() {
        if VALUED_OPTIONS.contains(&w.as_str()) {
            out.push((w.clone(), it.next().cloned()));
        } else {
            out.push((w.clone(), None));
        }
    }
    out
}

impl SetOptions {
    fn values(&self) -> [(&'static str, Option<u32>); 3] {
        [
            ("hashsize", self.hashsize),
            ("maxelem", self.maxelem),
            ("timeout", self.timeout),
        ]
    }

    fn flags(&self) -> [(&'static str, Option<bool>); 3] {
        [
            ("counters", self.counters),
            ("comment", self.comment),
            ("skbinfo", self.skbinfo),
        ]
    }

    /// The `create` words for a set, starting from `seen` (the set's own options as last seen,
    /// so that a set its owner made is recreated as it was): what the config names wins.
    pub fn create_words(&self, seen: &[String]) -> Vec<String> {
        let mut pairs = option_pairs(seen);
        for (key, value) in self.values() {
            let Some(v) = value else { continue };
            match pairs.iter_mut().find(|(k, _)| k == key) {
                Some(p) => p.1 = Some(v.to_string()),
                None => pairs.push((key.to_owned(), Some(v.to_string()))),
            }
        }
        for (key, on) in self.flags() {
            let Some(on) = on else { continue };
            let has = pairs.iter().any(|(k, _)| k == key);
            if on && !has {
                pairs.push((key.to_owned(), None));
            } else if !on {
                pairs.retain(|(k, _)| k != key);
            }
        }
        pairs
            .into_iter()
            .filter(|(k, _)| k != "initval")
            .flat_map(|(k, v)| std::iter::once(k).chain(v))
            .collect()
    }

    /// How a set created with `seen` differs from what the config names (only what cannot
    /// change after creation); `None` when it agrees.
    pub fn conflict(&self, seen: &[String]) -> Option<String> {
        let pairs = option_pairs(seen);
        let get = |key: &str| pairs.iter().find(|(k, _)| k == key);
        let mut out = Vec::new();
        for (key, want) in [("maxelem", self.maxelem), ("timeout", self.timeout)] {
            let Some(want) = want else { continue };
            match get(key).and_then(|(_, v)| v.as_deref()) {
                Some(v) if v == want.to_string() => {}
                Some(v) => out.push(format!("{key} {v} (config: {want})")),
                None => out.push(format!("no {key} (config: {key} {want})")),
            }
        }
        for (key, want) in self.flags() {
            match (want, get(key).is_some()) {
                (Some(true), false) => out.push(format!("no {key} (config: {key}: true)")),
                (Some(false), true) => out.push(format!("{key} (config: {key}: false)")),
                _ => {}
            }
        }
        (!out.is_empty()).then(|| out.join(", "))
    }
}

impl DesiredSet {
    pub fn forbids(&self, m: &Member) -> Option<IpNet> {
        self.forbidden.iter().find(|f| m.overlaps(f)).copied()
    }
}

/// iptables' limit: XT_EXTENSION_MAXNAMELEN (29) minus the terminating NUL.
const CHAIN_MAX: usize = 28;
/// ipset's limit: IPSET_MAXNAMELEN (32) minus the terminating NUL.
const SET_MAX: usize = 31;
/// Targets iptables reserves: a chain cannot be called that.
const RESERVED: &[&str] = &["ACCEPT", "DROP", "RETURN", "QUEUE", "CONTINUE"];

/// What the names of netwarden's own chains start with: the spares of protected chains
/// ([`crate::nftables::spare`]), which no config protects and no selector adopts.
pub const SPARE_PREFIX: &str = "NETWARDEN-SPARE-";

pub fn is_spare(chain: &str) -> bool {
    chain.starts_with(SPARE_PREFIX)
}

/// The check `spec.chains[].chain` gets; names of adopted chains go through it too, as they end
/// up in `iptables-restore` input.
pub fn valid_chain_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= CHAIN_MAX
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
    if !ok {
        return Err(format!(
            "`{s}` is not a valid chain name: use 1 to {CHAIN_MAX} characters from A-Z, a-z, 0-9, '_', '-', '.', starting with a letter, digit or '_'"
        ));
    }
    if RESERVED.contains(&s) {
        return Err(format!("`{s}` is a built-in target, not a chain name"));
    }
    if is_spare(s) {
        return Err(format!(
            "`{s}`: chains named {SPARE_PREFIX}… are netwarden's own spares"
        ));
    }
    Ok(s.to_owned())
}

/// The check `spec.ipsets[].name` gets (adopted sets too: `ipset restore` input).
pub fn valid_set_name(s: &str) -> Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= SET_MAX
        && s.starts_with(|c: char| c.is_ascii_alphanumeric() || c == '_')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.' | b':'));
    if ok {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a valid set name: use 1 to {SET_MAX} characters from A-Z, a-z, 0-9, '_', '-', '.', ':', starting with a letter, digit or '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_normalise() {
        let a = Member::parse("10.0.0.1").unwrap();
        assert_eq!(a, Member::parse("10.0.0.1/32").unwrap());
        assert_eq!(a.to_string(), "10.0.0.1");
        let p = Member::parse("10.0.0.1,80").unwrap();
        assert_eq!(p, Member::parse("10.0.0.1,tcp:80").unwrap());
        assert_eq!(p.to_string(), "10.0.0.1,tcp:80");
        assert_eq!(
            Member::parse("fd00::/64,udp:53").unwrap().to_string(),
            "fd00::/64,udp:53"
        );
        assert!(Member::parse("10.0.0.1/24")
            .unwrap_err()
            .contains("host bits"));
        assert!(Member::parse("10.0.0.1,icmp:8")
            .unwrap_err()
            .contains("unknown protocol"));
        assert!(Member::parse("10.0.0.1,99999").is_err());
        assert!(Member::parse("nope").is_err());
    }

    #[test]
    fn forbidden_prefixes_match_both_ways() {
        let host = Member::parse("10.96.0.1").unwrap();
        let wide = Member::parse("10.96.0.0/12").unwrap();
        let other = Member::parse("10.244.0.0/16").unwrap();
        let api: IpNet = "10.96.0.1/32".parse().unwrap();
        assert!(host.overlaps(&api));
        assert!(wide.overlaps(&api), "a member network holding the address");
        assert!(!other.overlaps(&api));
        assert!(host.overlaps(&"10.96.0.0/12".parse().unwrap()));
    }

    #[test]
    fn set_options_merge_over_what_was_seen_and_compare_what_cannot_change() {
        let w = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        let seen = w("hashsize 1024 maxelem 65536 timeout 0 bucketsize 12 initval 0x1234");
        let none = SetOptions::default();
        assert_eq!(
            none.create_words(&seen),
            w("hashsize 1024 maxelem 65536 timeout 0 bucketsize 12"),
            "recreated as it was, without the random seed"
        );
        let cfg = SetOptions {
            hashsize: Some(4096),
            timeout: Some(30),
            comment: Some(true),
            counters: Some(false),
            ..SetOptions::default()
        };
        assert_eq!(
            cfg.create_words(&w("hashsize 1024 maxelem 65536 counters")),
            w("hashsize 4096 maxelem 65536 timeout 30 comment")
        );
        assert_eq!(cfg.create_words(&[]), w("hashsize 4096 timeout 30 comment"));
        // hashsize grows in the kernel: never a conflict.
        assert_eq!(cfg.conflict(&w("hashsize 8192 timeout 30 comment")), None);
        assert_eq!(
            cfg.conflict(&w("hashsize 1024 maxelem 65536 counters")),
            Some("no timeout (config: timeout 30), counters (config: counters: false), no comment (config: comment: true)".into())
        );
        let kube_router = SetOptions {
            timeout: Some(0),
            ..SetOptions::default()
        };
        assert_eq!(
            kube_router.conflict(&w("hashsize 1024 maxelem 65536 timeout 5")),
            Some("timeout 5 (config: 0)".into())
        );
        assert_eq!(none.conflict(&seen), None);
    }

    #[test]
    fn builtins() {
        assert!(Table::Nat.is_builtin("POSTROUTING"));
        assert!(!Table::Filter.is_builtin("POSTROUTING"));
        assert!(!Table::Nat.is_builtin("FLANNEL-POSTRTG"));
    }
}
