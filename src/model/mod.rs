//! Plain data types for the kernel objects netwarden protects. No I/O.
//!
//! Every kind has a *key*: the fields the kernel itself treats as identity (adding a second object
//! with the same key fails with EEXIST, or replaces the first with NLM_F_REPLACE). Everything else is
//! an attribute that can drift while the key stays put. Values are normalised on the way in (from
//! config and from netlink alike) so that two descriptions of the same kernel object compare equal.

pub mod address;
pub mod facts;
pub mod link;
pub mod neighbour;
pub mod object;
pub mod route;
pub mod rule;
pub mod sysctl;
pub mod text;

/// Hash maps and sets keyed by kernel objects. A mass repair hashes every rule and route key a
/// dozen times (mirror, desired state, plan, contest, status); with std's SipHash that was the
/// largest single cost in its profile. foldhash is much cheaper on such short keys and still
/// seeded per process. Build with `::default()` (`new()` is only std's hasher).
pub mod fast {
    pub type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
    pub type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;
}

pub use address::{AddressKey, DesiredAddress, DesiredAddressKey, ObservedAddress};
pub use link::DesiredLink;
pub use neighbour::{DesiredFdb, DesiredNeighbour, FdbId, Mac, NeighbourId};
pub use object::ObjectId;
pub use route::{DesiredRoute, ObservedRoute, RouteKey, RouteType};
pub use rule::{DesiredRule, RuleAction, RuleKey};
pub use sysctl::{DesiredSysctl, SysctlKey};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// Address family of an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Family {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub fn of_net(net: &IpNet) -> Family {
        Family::of(&net.addr())
    }

    /// The prefix covering every address of the family (`default`).
    pub fn any(self) -> IpNet {
        match self {
            Family::Ipv4 => "0.0.0.0/0".parse().expect("valid prefix"),
            Family::Ipv6 => "::/0".parse().expect("valid prefix"),
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Family::Ipv4 => "ipv4",
            Family::Ipv6 => "ipv6",
        })
    }
}

/// Whether netwarden repairs drift of an object or only reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Observe,
}

/// The kinds of object netwarden protects.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Rule,
    Route,
    Address,
    Neighbour,
    Fdb,
    Link,
    Sysctl,
}

impl Kind {
    /// Every kind the rtnetlink loop protects, in report order.
    pub const ALL: [Kind; 7] = [
        Kind::Rule,
        Kind::Route,
        Kind::Address,
        Kind::Neighbour,
        Kind::Fdb,
        Kind::Link,
        Kind::Sysctl,
    ];

    /// The name in logs, metric labels and reports.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Rule => "rule",
            Kind::Route => "route",
            Kind::Address => "address",
            Kind::Neighbour => "neighbour",
            Kind::Fdb => "fdb",
            Kind::Link => "link",
            Kind::Sysctl => "sysctl",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Well-known routing table ids, as in /etc/iproute2/rt_tables.
pub const TABLE_DEFAULT: u32 = 253;
pub const TABLE_MAIN: u32 = 254;
pub const TABLE_LOCAL: u32 = 255;

/// Route protocol ids (rtnetlink's RTPROT_*), used for rules and routes alike.
pub const PROTO_UNSPEC: u8 = 0;
pub const PROTO_KERNEL: u8 = 2;
pub const PROTO_BOOT: u8 = 3;
pub const PROTO_STATIC: u8 = 4;

/// Name of a table id the way `ip` prints it.
pub fn table_name(id: u32) -> String {
    match id {
        TABLE_DEFAULT => "default".into(),
        TABLE_MAIN => "main".into(),
        TABLE_LOCAL => "local".into(),
        n => n.to_string(),
    }
}

/// Parses a table given as a number or as main/local/default.
pub fn parse_table(s: &str) -> Option<u32> {
    match s {
        "main" => Some(TABLE_MAIN),
        "local" => Some(TABLE_LOCAL),
        "default" => Some(TABLE_DEFAULT),
        n => n.parse().ok(),
    }
}

/// Parses a protocol given as a number or as one of iproute2's rt_protos names.
pub fn parse_protocol(s: &str) -> Option<u8> {
    Some(match s {
        "unspec" => PROTO_UNSPEC,
        "redirect" => 1,
        "kernel" => PROTO_KERNEL,
        "boot" => PROTO_BOOT,
        "static" => PROTO_STATIC,
        "gated" => 8,
        "ra" => 9,
        "mrt" => 10,
        "zebra" => 11,
        "bird" => 12,
        "dnrouted" => 13,
        "xorp" => 14,
        "ntk" => 15,
        "dhcp" => 16,
        "keepalived" => 18,
        "babel" => 42,
        "bgp" => 186,
        "isis" => 187,
        "ospf" => 188,
        "rip" => 189,
        "eigrp" => 192,
        n => return n.parse().ok(),
    })
}

/// Name of a protocol id the way `ip` prints it.
pub fn protocol_name(p: u8) -> String {
    match p {
        PROTO_UNSPEC => "unspec".into(),
        1 => "redirect".into(),
        PROTO_KERNEL => "kernel".into(),
        PROTO_BOOT => "boot".into(),
        PROTO_STATIC => "static".into(),
        12 => "bird".into(),
        16 => "dhcp".into(),
        186 => "bgp".into(),
        n => n.to_string(),
    }
}

/// A prefix with its host bits cleared, the form the kernel stores. `/0` means "any" and is
/// represented as `None` in rule selectors because the kernel omits the attribute for it.
pub fn canonical_net(net: IpNet) -> IpNet {
    net.trunc()
}

/// Normalises an optional rule selector prefix: host bits cleared, `/0` dropped.
pub fn selector(net: Option<IpNet>) -> Option<IpNet> {
    net.map(canonical_net).filter(|n| n.prefix_len() != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_parse_by_name_and_number() {
        assert_eq!(parse_table("main"), Some(254));
        assert_eq!(parse_table("local"), Some(255));
        assert_eq!(parse_table("default"), Some(253));
        assert_eq!(parse_table("77"), Some(77));
        assert_eq!(parse_table("100000"), Some(100000));
        assert_eq!(parse_table("mian"), None);
        assert_eq!(table_name(254), "main");
        assert_eq!(table_name(77), "77");
    }

    #[test]
    fn protocols_parse_by_name_and_number() {
        assert_eq!(parse_protocol("bird"), Some(12));
        assert_eq!(parse_protocol("static"), Some(4));
        assert_eq!(parse_protocol("200"), Some(200));
        assert_eq!(parse_protocol("300"), None);
        assert_eq!(parse_protocol("birdd"), None);
    }

    #[test]
    fn selectors_drop_host_bits_and_any() {
        let n: IpNet = "10.1.2.3/16".parse().unwrap();
        assert_eq!(selector(Some(n)), Some("10.1.0.0/16".parse().unwrap()));
        assert_eq!(selector(Some("0.0.0.0/0".parse().unwrap())), None);
        assert_eq!(selector(Some("::/0".parse().unwrap())), None);
        assert_eq!(selector(None), None);
    }
}
