//! Which protected object a finding, a repair or a status line is about, whatever its kind.

use super::{DesiredAddressKey, FdbId, Kind, NeighbourId, RouteKey, RuleKey, SysctlKey};

/// A protected object of the rtnetlink loop, by the identity the kernel gives it (devices by
/// name: they may not exist yet).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ObjectId {
    Rule(RuleKey),
    Route(RouteKey),
    Address(DesiredAddressKey),
    Neighbour(NeighbourId),
    Fdb(FdbId),
    /// A link, by device name.
    Link(String),
    Sysctl(SysctlKey),
}

impl ObjectId {
    pub fn kind(&self) -> Kind {
        match self {
            ObjectId::Rule(_) => Kind::Rule,
            ObjectId::Route(_) => Kind::Route,
            ObjectId::Address(_) => Kind::Address,
            ObjectId::Neighbour(_) => Kind::Neighbour,
            ObjectId::Fdb(_) => Kind::Fdb,
            ObjectId::Link(_) => Kind::Link,
            ObjectId::Sysctl(_) => Kind::Sysctl,
        }
    }

    /// Order of repairs, dependencies first: a link up (and its settings) before what lives on
    /// it, addresses before the routes whose gateway or source they make valid, routes before
    /// the rules that look them up. (Gateway routes come after the other routes: see `plan`.)
    pub fn rank(&self) -> u8 {
        match self {
            ObjectId::Link(_) => 0,
            ObjectId::Sysctl(k) => k.scope.rank(),
            ObjectId::Address(_) => 3,
            ObjectId::Neighbour(_) | ObjectId::Fdb(_) => 4,
            ObjectId::Route(_) => 5,
            ObjectId::Rule(_) => 7,
        }
    }

    /// The device the object lives on, when it names one.
    pub fn device(&self) -> Option<&str> {
        match self {
            ObjectId::Address((d, _)) => Some(d),
            ObjectId::Neighbour(n) => Some(&n.device),
            ObjectId::Fdb(f) => Some(&f.device),
            ObjectId::Link(d) => Some(d),
            ObjectId::Sysctl(k) => match &k.scope {
                super::sysctl::Scope::Device(d) => Some(d),
                _ => None,
            },
            ObjectId::Rule(_) | ObjectId::Route(_) => None,
        }
    }
}

impl Kind {
    /// Whether the netlink port id of the kernel's notification of a change names the process
    /// that made it. Rules, routes, addresses and neighbour entries: yes (port 0 is the kernel
    /// itself). Links (Linux 6.18 sends RTM_NEWLINK with port 0 for `ip link set`), FDB entries
    /// of VXLAN devices and sysctls (RTM_NEWNETCONF, and a write through /proc has no socket at
    /// all): never, so a change of theirs is by someone unknown, not by the kernel.
    pub fn port_names_actor(self) -> bool {
        !matches!(self, Kind::Fdb | Kind::Link | Kind::Sysctl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::sysctl::{Scope, Setting};
    use crate::model::Family;

    #[test]
    fn repairs_are_ranked_dependencies_first() {
        let sysctl = |scope| {
            ObjectId::Sysctl(SysctlKey {
                scope,
                setting: Setting::find(Family::Ipv4, "forwarding").unwrap(),
            })
        };
        let all = sysctl(Scope::All);
        let dev = sysctl(Scope::Device("eth0".into()));
        let link = ObjectId::Link("eth0".into());
        let addr = ObjectId::Address(("eth0".into(), "10.0.0.1".parse().unwrap()));
        assert!(link.rank() <= all.rank() && all.rank() < dev.rank());
        assert!(dev.rank() < addr.rank());
        assert_eq!(dev.device(), Some("eth0"));
        assert_eq!(all.device(), None);
        assert!(!Kind::Sysctl.port_names_actor() && Kind::Neighbour.port_names_actor());
    }
}
