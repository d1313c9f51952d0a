//! Routes (`ip route`).

use super::{protocol_name, table_name, Family, Mode, PROTO_BOOT};
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::IpAddr;

/// rtm_scope values.
pub const SCOPE_UNIVERSE: u8 = 0;
pub const SCOPE_SITE: u8 = 200;
pub const SCOPE_LINK: u8 = 253;
pub const SCOPE_HOST: u8 = 254;

/// Default IPv6 route metric: the kernel stores 1024 when a request carries none (or 0).
pub const IPV6_DEFAULT_METRIC: u32 = 1024;

pub fn parse_scope(s: &str) -> Option<u8> {
    Some(match s {
        "global" | "universe" => SCOPE_UNIVERSE,
        "site" => SCOPE_SITE,
        "link" => SCOPE_LINK,
        "host" => SCOPE_HOST,
        n => return n.parse().ok(),
    })
}

/// A scope as the config (and `ip route`) names it: global, site, link, host, or the number.
pub fn scope_name(scope: u8) -> String {
    match scope {
        SCOPE_UNIVERSE => "global".into(),
        SCOPE_SITE => "site".into(),
        SCOPE_LINK => "link".into(),
        SCOPE_HOST => "host".into(),
        n => n.to_string(),
    }
}

/// The route types the config can ask for; anything else is `Other` and only ever observed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RouteType {
    Unicast,
    Local,
    Blackhole,
    Unreachable,
    Prohibit,
    Other(u8),
}

impl RouteType {
    pub fn parse(s: &str) -> Option<RouteType> {
        Some(match s {
            "unicast" => RouteType::Unicast,
            "local" => RouteType::Local,
            "blackhole" => RouteType::Blackhole,
            "unreachable" => RouteType::Unreachable,
            "prohibit" => RouteType::Prohibit,
            _ => return None,
        })
    }

    /// Types that deliver somewhere and so may name a device (only unicast may have a gateway).
    pub fn forwards(self) -> bool {
        matches!(self, RouteType::Unicast | RouteType::Local)
    }
}

impl fmt::Display for RouteType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RouteType::Unicast => f.write_str("unicast"),
            RouteType::Local => f.write_str("local"),
            RouteType::Blackhole => f.write_str("blackhole"),
            RouteType::Unreachable => f.write_str("unreachable"),
            RouteType::Prohibit => f.write_str("prohibit"),
            RouteType::Other(t) => write!(f, "type {t}"),
        }
    }
}

/// Identity of a route: IPv4 fib aliases are unique by (table, prefix, tos, priority), IPv6 fib
/// nodes by (table, prefix, source prefix, metric). A second route with the same key is refused
/// with EEXIST; NLM_F_REPLACE swaps the attributes in place.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RouteKey {
    pub family: Family,
    pub table: u32,
    pub destination: IpNet,
    pub metric: u32,
    pub tos: u8,
    /// IPv6 source-specific routing prefix (`ip -6 route add … from PREFIX`); never from config.
    pub source_prefix: Option<IpNet>,
}

impl RouteKey {
    pub fn new(family: Family, table: u32, destination: IpNet, metric: Option<u32>) -> RouteKey {
        let metric = match (family, metric.unwrap_or(0)) {
            (Family::Ipv6, 0) => IPV6_DEFAULT_METRIC,
            (_, m) => m,
        };
        RouteKey {
            family,
            table,
            destination: destination.trunc(),
            metric,
            tos: 0,
            source_prefix: None,
        }
    }
}

impl fmt::Display for RouteKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.destination.prefix_len() == 0 {
            f.write_str("default")?;
        } else {
            write!(f, "{}", self.destination)?;
        }
        if let Some(s) = &self.source_prefix {
            write!(f, " from {s}")?;
        }
        if self.tos != 0 {
            write!(f, " tos {:#x}", self.tos)?;
        }
        write!(
            f,
            " table {} metric {}",
            table_name(self.table),
            self.metric
        )
    }
}

/// Attributes of a route as the kernel reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ObservedRoute {
    pub kind: RouteType,
    pub gateway: Option<IpAddr>,
    pub oif: Option<u32>,
    pub prefsrc: Option<IpAddr>,
    pub scope: u8,
    pub protocol: u8,
    pub onlink: bool,
    pub mtu: Option<u32>,
    /// Several next hops (or a nexthop object, or a gateway of another family): never what a
    /// configured single-path route looks like.
    pub multipath: bool,
}

/// A route that the config protects.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DesiredRoute {
    pub name: String,
    pub mode: Mode,
    pub key: RouteKey,
    pub kind: RouteType,
    pub gateway: Option<IpAddr>,
    pub device: Option<String>,
    pub prefsrc: Option<IpAddr>,
    /// Compared only when given; when absent, set the way `ip route add` would choose it.
    pub scope: Option<u8>,
    /// Compared only when given; `boot` is set when absent, like `ip route add`.
    pub protocol: Option<u8>,
    pub onlink: bool,
    pub mtu: Option<u32>,
}

impl DesiredRoute {
    /// Scope to put in a request: the configured one, else iproute2's choice.
    pub fn scope_to_set(&self) -> u8 {
        if let Some(s) = self.scope {
            return s;
        }
        if self.key.family == Family::Ipv6 {
            return SCOPE_UNIVERSE;
        }
        match self.kind {
            RouteType::Local => SCOPE_HOST,
            RouteType::Unicast if self.gateway.is_none() => SCOPE_LINK,
            _ => SCOPE_UNIVERSE,
        }
    }

    pub fn protocol_to_set(&self) -> u8 {
        self.protocol.unwrap_or(PROTO_BOOT)
    }

    /// Does the kernel route satisfy this one? `oif` is the index of the configured device, if it
    /// exists. Attributes the config leaves out are not compared.
    pub fn matches(&self, observed: &ObservedRoute, oif: Option<u32>) -> bool {
        if observed.multipath || observed.kind != self.kind || observed.gateway != self.gateway {
            return false;
        }
        if self.device.is_some() && (oif.is_none() || observed.oif != oif) {
            return false;
        }
        if self.prefsrc.is_some() && observed.prefsrc != self.prefsrc {
            return false;
        }
        if self.scope.is_some_and(|s| s != observed.scope) {
            return false;
        }
        if self.protocol.is_some_and(|p| p != observed.protocol) {
            return false;
        }
        if self.onlink && !observed.onlink {
            return false;
        }
        if self.mtu.is_some() && observed.mtu != self.mtu {
            return false;
        }
        true
    }

    pub fn describe(&self) -> String {
        let mut s = String::new();
        if self.kind != RouteType::Unicast {
            s.push_str(&format!("{} ", self.kind));
        }
        s.push_str(&self.key.to_string());
        if let Some(g) = self.gateway {
            s.push_str(&format!(" via {g}"));
        }
        if let Some(d) = &self.device {
            s.push_str(&format!(" dev {d}"));
        }
        if let Some(p) = self.prefsrc {
            s.push_str(&format!(" src {p}"));
        }
        if let Some(p) = self.protocol {
            s.push_str(&format!(" proto {}", protocol_name(p)));
        }
        if self.onlink {
            s.push_str(" onlink");
        }
        if let Some(m) = self.mtu {
            s.push_str(&format!(" mtu {m}"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PROTO_STATIC;

    fn desired() -> DesiredRoute {
        DesiredRoute {
            name: "r".into(),
            mode: Mode::Enforce,
            key: RouteKey::new(Family::Ipv4, 100, "10.1.0.0/16".parse().unwrap(), None),
            kind: RouteType::Unicast,
            gateway: Some("192.168.1.1".parse().unwrap()),
            device: Some("eth0".into()),
            prefsrc: None,
            scope: None,
            protocol: None,
            onlink: false,
            mtu: None,
        }
    }

    fn observed() -> ObservedRoute {
        ObservedRoute {
            kind: RouteType::Unicast,
            gateway: Some("192.168.1.1".parse().unwrap()),
            oif: Some(2),
            prefsrc: None,
            scope: SCOPE_UNIVERSE,
            protocol: PROTO_STATIC,
            onlink: false,
            mtu: None,
            multipath: false,
        }
    }

    #[test]
    fn ipv6_metric_zero_is_1024() {
        let k = RouteKey::new(Family::Ipv6, 254, "fd00::/64".parse().unwrap(), None);
        assert_eq!(k.metric, 1024);
        let k = RouteKey::new(Family::Ipv4, 254, "10.0.0.0/8".parse().unwrap(), None);
        assert_eq!(k.metric, 0);
    }

    #[test]
    fn unnamed_attributes_are_not_compared() {
        assert!(desired().matches(&observed(), Some(2)));
    }

    #[test]
    fn another_gateway_or_device_is_drift() {
        let mut o = observed();
        o.gateway = Some("192.168.1.2".parse().unwrap());
        assert!(!desired().matches(&o, Some(2)));
        assert!(!desired().matches(&observed(), Some(3)));
        assert!(!desired().matches(&observed(), None), "device missing");
        let mut o = observed();
        o.multipath = true;
        assert!(!desired().matches(&o, Some(2)));
    }

    #[test]
    fn named_protocol_and_mtu_are_compared() {
        let mut d = desired();
        d.protocol = Some(PROTO_BOOT);
        assert!(!d.matches(&observed(), Some(2)));
        let mut d = desired();
        d.mtu = Some(1400);
        let mut o = observed();
        o.mtu = Some(1400);
        assert!(d.matches(&o, Some(2)));
        assert!(!d.matches(&observed(), Some(2)));
    }

    #[test]
    fn default_scope_follows_iproute2() {
        let d = desired();
        assert_eq!(d.scope_to_set(), SCOPE_UNIVERSE);
        let d = DesiredRoute {
            gateway: None,
            ..desired()
        };
        assert_eq!(d.scope_to_set(), SCOPE_LINK);
        let d = DesiredRoute {
            kind: RouteType::Local,
            gateway: None,
            ..desired()
        };
        assert_eq!(d.scope_to_set(), SCOPE_HOST);
    }
}
