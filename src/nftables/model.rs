//! Plain data for protected nftables objects. No I/O.
//!
//! Identity: a table is (family, name), as nft names it (`ip kube-proxy`); chains and sets are
//! named within their table. Rules are nft text exactly as `nft list` prints it (a rule written
//! otherwise is learned from nft's echo when netwarden first writes it, see the engine); a rule
//! that carries a comment is identified by that comment, any other by its text.

use crate::model::Mode;
pub use crate::netfilter::model::Content;
use serde::{Deserialize, Serialize};
use std::fmt;

/// An nf_tables family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NfFamily {
    Ip,
    Ip6,
    Inet,
    Arp,
    Bridge,
    Netdev,
}

impl NfFamily {
    pub const ALL: [NfFamily; 6] = [
        NfFamily::Ip,
        NfFamily::Ip6,
        NfFamily::Inet,
        NfFamily::Arp,
        NfFamily::Bridge,
        NfFamily::Netdev,
    ];

    pub fn parse(s: &str) -> Option<NfFamily> {
        NfFamily::ALL.into_iter().find(|f| f.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NfFamily::Ip => "ip",
            NfFamily::Ip6 => "ip6",
            NfFamily::Inet => "inet",
            NfFamily::Arp => "arp",
            NfFamily::Bridge => "bridge",
            NfFamily::Netdev => "netdev",
        }
    }

    /// The NFPROTO_* value nf_tables notifications carry.
    pub fn from_nfproto(v: u8) -> Option<NfFamily> {
        NfFamily::ALL.into_iter().find(|f| f.nfproto() == v)
    }

    /// Its NFPROTO_* value.
    pub fn nfproto(self) -> u8 {
        match self {
            NfFamily::Inet => 1,
            NfFamily::Ip => 2,
            NfFamily::Arp => 3,
            NfFamily::Netdev => 5,
            NfFamily::Bridge => 7,
            NfFamily::Ip6 => 10,
        }
    }

    /// Tables that iptables-nft, ip6tables-nft, arptables-nft and ebtables-nft create: never
    /// adopted, whatever a selector says (they belong to the iptables guard and their owners).
    pub fn is_xtables_table(self, name: &str) -> bool {
        match self {
            NfFamily::Ip | NfFamily::Ip6 => {
                matches!(name, "filter" | "nat" | "mangle" | "raw" | "security")
            }
            NfFamily::Arp => name == "filter",
            NfFamily::Bridge => matches!(name, "filter" | "nat" | "broute"),
            NfFamily::Inet | NfFamily::Netdev => false,
        }
    }
}

impl fmt::Display for NfFamily {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A table: `ip kube-proxy`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct TableKey {
    pub family: NfFamily,
    pub name: String,
}

impl fmt::Display for TableKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.family, self.name)
    }
}

/// What makes a chain a base chain: where it hooks into the packet path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BaseChain {
    /// `filter`, `nat`, `route`.
    pub kind: String,
    pub hook: String,
    /// The numeric priority (symbolic names are resolved for the family).
    pub priority: i32,
    /// `accept` or `drop`; `None`: not compared, nft's default (accept) when created.
    pub policy: Option<String>,
    /// netdev (and inet ingress) chains: the device.
    pub device: Option<String>,
}

/// A rule as nft prints it, its comment split off.
#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct RuleText {
    /// The statements, whitespace collapsed, without the comment.
    pub body: String,
    pub comment: Option<String>,
}

impl RuleText {
    /// The rule as nft input and output write it.
    pub fn full(&self) -> String {
        match &self.comment {
            Some(c) => format!("{} comment \"{c}\"", self.body),
            None => self.body.clone(),
        }
    }
}

impl fmt::Display for RuleText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredChain {
    pub name: String,
    pub base: Option<BaseChain>,
    pub comment: Option<String>,
    pub content: Content,
    pub rules: Vec<RuleText>,
}

/// A set element (or map entry) as nft prints it: the key, and for maps the value.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct Element {
    pub key: String,
    pub value: Option<String>,
}

impl fmt::Display for Element {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{} : {v}", self.key),
            None => f.write_str(&self.key),
        }
    }
}

/// A forbidden element: exact text, or for address-keyed sets a prefix that no element may
/// equal, contain or fall inside.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Forbidden {
    Exact(String),
    Net(ipnet::IpNet),
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forbidden::Exact(s) => f.write_str(s),
            Forbidden::Net(n) => write!(f, "{n}"),
        }
    }
}

/// A set or a map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredSet {
    pub name: String,
    pub map: bool,
    /// The `type …` or `typeof …` line as nft prints it (`type ipv4_addr . inet_service`,
    /// `type ipv4_addr . inet_proto . inet_service : verdict`).
    pub declaration: String,
    /// `interval`, `timeout`, `constant`, `dynamic`: compared when given.
    pub flags: Vec<String>,
    /// As nft prints it (`1h`, `30s`).
    pub timeout: Option<String>,
    pub comment: Option<String>,
    pub elements: Vec<Element>,
    /// `exact`: no other elements; `contains` (the default): these are present.
    pub membership: Content,
    pub forbidden: Vec<Forbidden>,
}

impl DesiredSet {
    pub fn kind(&self) -> &'static str {
        if self.map {
            "map"
        } else {
            "set"
        }
    }
}

/// A protected table (`spec.nftables[]`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DesiredTable {
    /// The object name (logs, status, metrics).
    pub name: String,
    pub mode: Mode,
    pub key: TableKey,
    /// Set when netwarden creates the table (nft cannot change it later).
    pub comment: Option<String>,
    /// `Some(true)`: the table must be dormant; `Some(false)`: it must not be; `None`: either.
    pub dormant: Option<bool>,
    pub chains: Vec<DesiredChain>,
    pub sets: Vec<DesiredSet>,
}

impl DesiredTable {
    pub fn chain(&self, name: &str) -> Option<&DesiredChain> {
        self.chains.iter().find(|c| c.name == name)
    }
}

/// `spec.nftables` and the nftables parts of `spec.adopt`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftConfig {
    pub tables: Vec<DesiredTable>,
    /// Selectors of tables protected as they are seen.
    pub adopt: Vec<Selector>,
}

/// One `spec.adopt` entry's `nftables` part, with the entry's name, owners and policy.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Selector {
    pub adopt: crate::adopt::AdoptSelector,
    /// `None`: every family.
    pub family: Option<NfFamily>,
    /// Table names, exact or a prefix ending in `*`.
    pub tables: Vec<String>,
}

impl Selector {
    /// Tables iptables-nft and its siblings manage are never adopted.
    pub fn matches(&self, key: &TableKey) -> bool {
        !key.family.is_xtables_table(&key.name)
            && self.family.is_none_or(|f| f == key.family)
            && self
                .tables
                .iter()
                .any(|p| crate::adopt::device_matches(p, &key.name))
    }

    pub fn object_name(&self, key: &TableKey) -> String {
        format!(
            "{}{}/{}/{}",
            crate::adopt::ADOPTED_PREFIX,
            self.adopt.name,
            key.family,
            key.name
        )
    }
}
