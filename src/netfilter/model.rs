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
    pub members: Vec<Member>,
    pub membership: Content,
    pub forbidden: Vec<IpNet>,
}

impl DesiredSet {
    pub fn forbids(&self, m: &Member) -> Option<IpNet> {
        self.forbidden.iter().find(|f| m.overlaps(f)).copied()
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
    fn builtins() {
        assert!(Table::Nat.is_builtin("POSTROUTING"));
        assert!(!Table::Filter.is_builtin("POSTROUTING"));
        assert!(!Table::Nat.is_builtin("FLANNEL-POSTRTG"));
    }
}
