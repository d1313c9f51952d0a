//! Adopted state (`spec.adopt`): kernel objects that no config can name ahead of time (per-pod
//! rules of a CNI) are protected from the moment they are seen, exactly as they were seen, and
//! forgotten when one of their owners removes them. Pure: selector matching and the
//! restore-or-forget decision; the loop does the I/O.

mod neighbours;

pub use neighbours::{select_neighbours, NeighbourSelector};

use crate::model::route::ObservedRoute;
use crate::model::{DesiredRoute, DesiredRule, Family, Mode, RouteKey, RuleKey};

/// What to do with an adopted object removed by a process that could not be identified.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum UnknownActor {
    /// Treat the removal as drift (the safe default: networkd restarts are the common case).
    #[default]
    Restore,
    /// Treat it as the owner's.
    Forget,
}

/// An inclusive range of numbers.
pub type Range = (u32, u32);

/// Which rules a selector adopts; every criterion given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RuleSelector {
    pub family: Option<Family>,
    pub priority: Option<Range>,
    pub table: Option<Range>,
    /// Protocols the rule may carry (empty: any).
    pub protocols: Vec<u8>,
}

/// Which routes a selector adopts; every criterion given must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RouteSelector {
    pub family: Option<Family>,
    pub table: Option<Range>,
    /// Protocols the route may carry (empty: any).
    pub protocols: Vec<u8>,
    /// Device name, exact or a prefix ending in `*` (`eni*`).
    pub device: Option<String>,
}

impl RouteSelector {
    /// Does a kernel route (on device `device`, if it has one) fall under the selector?
    /// Multipath routes are never adopted: they cannot be restored as seen.
    pub fn matches(&self, key: &RouteKey, route: &ObservedRoute, device: Option<&str>) -> bool {
        !route.multipath && self.covers(key, Some(route.protocol), device)
    }

    /// Does an adopted route, as it was seen (the adopted-state file, the config before a
    /// reload), still fall under the selector? Every criterion is checked again: a selector
    /// narrowed since lets go of what it no longer covers.
    pub fn covers_adopted(&self, route: &DesiredRoute) -> bool {
        self.covers(&route.key, route.protocol, route.device.as_deref())
    }

    fn covers(&self, key: &RouteKey, protocol: Option<u8>, device: Option<&str>) -> bool {
        self.family.is_none_or(|f| f == key.family)
            && within(self.table, key.table)
            && (self.protocols.is_empty() || protocol.is_some_and(|p| self.protocols.contains(&p)))
            && self
                .device
                .as_deref()
                .is_none_or(|pattern| device.is_some_and(|d| device_matches(pattern, d)))
    }
}

/// `eni*` matches every name starting with `eni`; anything else matches itself. (Also the
/// syntax of chain and set name patterns.)
pub use crate::model::link::device_matches;

/// Which iptables chains a selector adopts: user chains (never builtin ones) of these tables
/// whose name matches one of the patterns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChainSelector {
    pub family: Family,
    pub tables: Vec<crate::netfilter::model::Table>,
    /// Chain names, exact or a prefix ending in `*` (`KUBE-ROUTER-*`).
    pub names: Vec<String>,
}

impl ChainSelector {
    pub fn matches(&self, key: &crate::netfilter::model::ChainKey) -> bool {
        key.family == self.family
            && self.tables.contains(&key.table)
            && !key.table.is_builtin(&key.chain)
            && !crate::netfilter::model::is_spare(&key.chain)
            && self.names.iter().any(|p| device_matches(p, &key.chain))
    }
}

/// Which ipsets a selector adopts, by name (exact or a prefix ending in `*`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetSelector {
    pub names: Vec<String>,
}

impl SetSelector {
    pub fn matches(&self, name: &str) -> bool {
        self.names.iter().any(|p| device_matches(p, name))
    }
}

/// One `spec.adopt` entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptSelector {
    pub name: String,
    pub mode: Mode,
    pub rules: Option<RuleSelector>,
    pub routes: Option<RouteSelector>,
    pub chains: Option<ChainSelector>,
    pub ipsets: Option<SetSelector>,
    /// Permanent neighbour and VXLAN FDB entries of some devices.
    pub neighbours: Option<NeighbourSelector>,
    /// Command names (as in /proc/PID/comm, at most 15 bytes) whose removals are legitimate.
    pub owners: Vec<String>,
    pub unknown_actor: UnknownActor,
    /// `podLiveness`: objects tied to a pod IP are forgotten when no pod on this node holds it
    /// any more; the grace period for an IP never seen held (see [`crate::pod_liveness`]).
    pub pod_liveness: Option<std::time::Duration>,
}

/// Who removed an object.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Actor<'a> {
    /// The kernel itself (port 0): an address or link went away.
    Kernel,
    /// A process, by command name.
    Process(&'a str),
    /// Nobody could be identified (the socket and process were gone).
    Unknown,
}

/// What a removal of an adopted object calls for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Drift: put it back.
    Restore,
    /// The owner removed it: stop protecting it.
    Forget,
}

fn within(range: Option<Range>, v: u32) -> bool {
    range.is_none_or(|(lo, hi)| lo <= v && v <= hi)
}

impl RuleSelector {
    /// Does a kernel rule with this identity and protocol fall under the selector?
    pub fn matches(&self, key: &RuleKey, protocol: Option<u8>) -> bool {
        self.family.is_none_or(|f| f == key.family)
            && within(self.priority, key.priority)
            && within(self.table, key.table)
            && (self.protocols.is_empty() || protocol.is_some_and(|p| self.protocols.contains(&p)))
    }
}

impl AdoptSelector {
    /// Is `name` (a command name as /proc shows it) one of the owners?
    pub fn is_owner(&self, name: &str) -> bool {
        self.owners
            .iter()
            .any(|o| crate::model::text::clean_name(o) == name)
    }

    /// The actor as this selector sees it: a process whose parent (or grandparent…, see
    /// `ancestors`) is an owner acts for that owner. CNIs run `ip`, `iptables` and
    /// `iptables-restore` as child processes, and those are what the kernel names.
    pub fn on_behalf<'a>(&self, actor: Actor<'a>, ancestors: &'a [String]) -> Actor<'a> {
        match actor {
            Actor::Process(name) if !self.is_owner(name) => ancestors
                .iter()
                .find(|a| self.is_owner(a))
                .map_or(actor, |a| Actor::Process(a)),
            _ => actor,
        }
    }

    /// The restore-or-forget decision for a removal made by `actor`.
    pub fn decide(&self, actor: Actor<'_>) -> Verdict {
        match actor {
            Actor::Process(name) if self.is_owner(name) => Verdict::Forget,
            Actor::Process(_) | Actor::Kernel => Verdict::Restore,
            Actor::Unknown => match self.unknown_actor {
                UnknownActor::Restore => Verdict::Restore,
                UnknownActor::Forget => Verdict::Forget,
            },
        }
    }

    /// The desired rule an adopted kernel rule becomes: exactly what was seen.
    pub fn adopt_rule(&self, key: &RuleKey, protocol: Option<u8>) -> DesiredRule {
        DesiredRule {
            name: self.object_name(key),
            mode: self.mode,
            key: key.clone(),
            protocol,
        }
    }

    /// The desired route an adopted kernel route becomes: exactly what was seen.
    pub fn adopt_route(
        &self,
        key: &RouteKey,
        route: &ObservedRoute,
        device: Option<&str>,
    ) -> DesiredRoute {
        DesiredRoute {
            name: self.route_name(key),
            mode: self.mode,
            key: key.clone(),
            kind: route.kind,
            gateway: route.gateway,
            device: device.map(str::to_owned),
            prefsrc: route.prefsrc,
            scope: Some(route.scope),
            protocol: Some(route.protocol),
            onlink: route.onlink,
            mtu: route.mtu,
        }
    }

    /// An adopted route as it was seen (the adopted-state file, the config before a reload),
    /// protected again if the selector still covers it; named and moded by this selector, not
    /// by what the file says.
    pub fn readopt_route(&self, route: &DesiredRoute) -> Option<DesiredRoute> {
        self.routes
            .as_ref()
            .is_some_and(|r| r.covers_adopted(route))
            .then(|| DesiredRoute {
                name: self.route_name(&route.key),
                mode: self.mode,
                ..route.clone()
            })
    }

    fn route_name(&self, key: &RouteKey) -> String {
        format!("{ADOPTED_PREFIX}{}/{}", self.name, key.destination)
    }

    /// Names of adopted objects say where they come from: `adopted:<selector>/<priority>`.
    fn object_name(&self, key: &RuleKey) -> String {
        format!("{ADOPTED_PREFIX}{}/{}", self.name, key.priority)
    }
}

/// Prefix of the names of adopted objects (`status` and `check` show it as their origin).
pub const ADOPTED_PREFIX: &str = "adopted:";

/// The origin of a protected object, from its name.
pub fn origin(name: &str) -> &'static str {
    if name.starts_with(ADOPTED_PREFIX) {
        "adopted"
    } else {
        "config"
    }
}

/// The first selector that adopts a kernel rule.
pub fn select_rule<'a>(
    selectors: &'a [AdoptSelector],
    key: &RuleKey,
    protocol: Option<u8>,
) -> Option<&'a AdoptSelector> {
    selectors
        .iter()
        .find(|s| s.rules.as_ref().is_some_and(|r| r.matches(key, protocol)))
}

/// The first selector that adopts an iptables chain.
pub fn select_chain<'a>(
    selectors: &'a [AdoptSelector],
    key: &crate::netfilter::model::ChainKey,
) -> Option<&'a AdoptSelector> {
    selectors
        .iter()
        .find(|s| s.chains.as_ref().is_some_and(|c| c.matches(key)))
}

/// The first selector that adopts an ipset.
pub fn select_set<'a>(selectors: &'a [AdoptSelector], name: &str) -> Option<&'a AdoptSelector> {
    selectors
        .iter()
        .find(|s| s.ipsets.as_ref().is_some_and(|c| c.matches(name)))
}

/// The first selector that adopts a kernel route.
pub fn select_route<'a>(
    selectors: &'a [AdoptSelector],
    key: &RouteKey,
    route: &ObservedRoute,
    device: Option<&str>,
) -> Option<&'a AdoptSelector> {
    selectors.iter().find(|s| {
        s.routes
            .as_ref()
            .is_some_and(|r| r.matches(key, route, device))
    })
}

/// Tables whose routes the mirror must keep so that route selectors see them (a selector
/// without a table range: all of them).
pub fn route_tables(selectors: &[AdoptSelector]) -> Vec<Range> {
    selectors
        .iter()
        .filter_map(|s| s.routes.as_ref())
        .map(|r| r.table.unwrap_or((0, u32::MAX)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RuleAction;

    fn rule(priority: u32, table: u32) -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            priority,
            Some("10.0.0.5/32".parse().unwrap()),
            None,
            None,
            None,
            None,
            None,
            table,
            RuleAction::Lookup,
        )
    }

    fn vpc(policy: UnknownActor) -> AdoptSelector {
        AdoptSelector {
            name: "vpc-cni".into(),
            mode: Mode::Enforce,
            rules: Some(RuleSelector {
                family: Some(Family::Ipv4),
                priority: Some((512, 1536)),
                table: None,
                protocols: vec![],
            }),
            routes: None,
            chains: None,
            ipsets: None,
            neighbours: None,
            owners: vec!["aws-k8s-agent".into(), "aws-cni".into()],
            unknown_actor: policy,
            pod_liveness: None,
        }
    }

    #[test]
    fn rules_match_by_priority_table_protocol_family() {
        let s = vpc(UnknownActor::Restore).rules.unwrap();
        assert!(s.matches(&rule(512, 254), None));
        assert!(s.matches(&rule(1536, 2), Some(3)));
        assert!(!s.matches(&rule(511, 254), None));
        assert!(!s.matches(&rule(1537, 254), None));
        let mut v6 = rule(512, 254);
        v6.family = Family::Ipv6;
        assert!(!s.matches(&v6, None), "family");

        let t = RuleSelector {
            table: Some((2, 10)),
            protocols: vec![4],
            ..RuleSelector::default()
        };
        assert!(t.matches(&rule(100, 5), Some(4)));
        assert!(!t.matches(&rule(100, 5), Some(3)), "other protocol");
        assert!(!t.matches(&rule(100, 5), None), "no protocol");
        assert!(!t.matches(&rule(100, 254), Some(4)), "table out of range");
        assert!(
            RuleSelector::default().matches(&rule(1, 1), None),
            "empty selector adopts all"
        );
    }

    #[test]
    fn first_matching_selector_wins() {
        let a = vpc(UnknownActor::Restore);
        let mut b = vpc(UnknownActor::Forget);
        b.name = "all".into();
        b.rules = Some(RuleSelector::default());
        let sels = [a, b];
        assert_eq!(
            select_rule(&sels, &rule(512, 254), None).unwrap().name,
            "vpc-cni"
        );
        assert_eq!(
            select_rule(&sels, &rule(32000, 254), None).unwrap().name,
            "all"
        );
        assert!(select_rule(&sels[..1], &rule(32000, 254), None).is_none());
    }

    fn observed(protocol: u8, multipath: bool) -> ObservedRoute {
        ObservedRoute {
            kind: crate::model::RouteType::Unicast,
            gateway: Some("10.1.1.1".parse().unwrap()),
            oif: Some(3),
            prefsrc: None,
            scope: 0,
            protocol,
            onlink: false,
            mtu: None,
            multipath,
        }
    }

    #[test]
    fn routes_match_by_table_protocol_device() {
        let key = |table| RouteKey::new(Family::Ipv4, table, "10.9.0.0/16".parse().unwrap(), None);
        let s = RouteSelector {
            family: None,
            table: Some((2, 10)),
            protocols: vec![4],
            device: Some("eni*".into()),
        };
        assert!(s.matches(&key(2), &observed(4, false), Some("eni1")));
        assert!(
            !s.matches(&key(11), &observed(4, false), Some("eni1")),
            "table"
        );
        assert!(
            !s.matches(&key(2), &observed(3, false), Some("eni1")),
            "protocol"
        );
        assert!(
            !s.matches(&key(2), &observed(4, false), Some("eth0")),
            "device"
        );
        assert!(!s.matches(&key(2), &observed(4, false), None), "no device");
        assert!(
            !s.matches(&key(2), &observed(4, true), Some("eni1")),
            "multipath"
        );
        assert!(device_matches("eth0", "eth0") && !device_matches("eth0", "eth01"));

        let mut sel = vpc(UnknownActor::Restore);
        sel.routes = Some(s);
        let d = sel.adopt_route(&key(2), &observed(4, false), Some("eni1"));
        assert_eq!(d.device.as_deref(), Some("eni1"));
        assert_eq!(d.protocol, Some(4));
        assert_eq!(d.gateway, Some("10.1.1.1".parse().unwrap()));
        assert!(
            d.matches(&observed(4, false), Some(3)),
            "restored exactly as seen"
        );
        assert_eq!(origin(&d.name), "adopted");
        assert_eq!(route_tables(std::slice::from_ref(&sel)), vec![(2, 10)]);
        assert!(select_route(
            std::slice::from_ref(&sel),
            &key(3),
            &observed(4, false),
            Some("eni2")
        )
        .is_some());
        assert!(select_rule(std::slice::from_ref(&sel), &rule(9, 9), None).is_none());
    }

    #[test]
    fn chains_and_sets_match_by_name_pattern() {
        use crate::netfilter::model::{ChainKey, Table};
        let mut s = vpc(UnknownActor::Restore);
        s.rules = None;
        s.chains = Some(ChainSelector {
            family: Family::Ipv4,
            tables: vec![Table::Nat, Table::Filter],
            names: vec!["KUBE-ROUTER-*".into(), "EXACT".into()],
        });
        s.ipsets = Some(SetSelector {
            names: vec!["kube-router-*".into()],
        });
        let key = |table, chain: &str| ChainKey {
            family: Family::Ipv4,
            table,
            chain: chain.into(),
        };
        let sels = std::slice::from_ref(&s);
        assert!(select_chain(sels, &key(Table::Nat, "KUBE-ROUTER-X")).is_some());
        assert!(select_chain(sels, &key(Table::Filter, "EXACT")).is_some());
        assert!(select_chain(sels, &key(Table::Filter, "EXACT2")).is_none());
        assert!(
            select_chain(sels, &key(Table::Mangle, "KUBE-ROUTER-X")).is_none(),
            "table"
        );
        let mut v6 = key(Table::Nat, "KUBE-ROUTER-X");
        v6.family = Family::Ipv6;
        assert!(select_chain(sels, &v6).is_none(), "family");
        let mut builtin = s.clone();
        builtin.chains.as_mut().unwrap().names = vec!["POST*".into()];
        assert!(
            select_chain(&[builtin], &key(Table::Nat, "POSTROUTING")).is_none(),
            "builtin chains are never adopted"
        );
        let mut all = s.clone();
        all.chains.as_mut().unwrap().names = vec!["*".into()];
        assert!(select_chain(std::slice::from_ref(&all), &key(Table::Nat, "FLANNEL")).is_some());
        assert!(
            select_chain(&[all], &key(Table::Nat, "NETWARDEN-SPARE-0A1B2C3D")).is_none(),
            "netwarden's own spares are never adopted"
        );
        assert!(select_set(sels, "kube-router-y").is_some());
        assert!(select_set(sels, "KUBE-ROUTER-Y").is_none());
        assert!(select_rule(sels, &rule(512, 254), None).is_none());
    }

    #[test]
    fn decision_table() {
        use Actor::*;
        use Verdict::*;
        let cases = [
            (UnknownActor::Restore, Process("aws-k8s-agent"), Forget),
            (UnknownActor::Restore, Process("aws-cni"), Forget),
            (UnknownActor::Restore, Process("systemd-network"), Restore),
            (UnknownActor::Restore, Process("ip"), Restore),
            (UnknownActor::Restore, Kernel, Restore),
            (UnknownActor::Restore, Unknown, Restore),
            (UnknownActor::Forget, Process("aws-k8s-agent"), Forget),
            (UnknownActor::Forget, Process("ip"), Restore),
            (UnknownActor::Forget, Kernel, Restore),
            (UnknownActor::Forget, Unknown, Forget),
        ];
        for (policy, actor, want) in cases {
            assert_eq!(vpc(policy).decide(actor), want, "{policy:?} {actor:?}");
        }
    }

    #[test]
    fn a_child_of_an_owner_acts_for_it() {
        use Actor::*;
        let s = vpc(UnknownActor::Restore);
        let owner_above = ["sh".to_string(), "aws-k8s-agent".to_string()];
        let shell = ["bash".to_string(), "sshd".to_string()];
        assert_eq!(
            s.on_behalf(Process("ip"), &owner_above),
            Process("aws-k8s-agent")
        );
        assert_eq!(
            s.decide(s.on_behalf(Process("ip"), &owner_above)),
            Verdict::Forget
        );
        assert_eq!(s.on_behalf(Process("ip"), &shell), Process("ip"));
        assert_eq!(
            s.decide(s.on_behalf(Process("ip"), &shell)),
            Verdict::Restore
        );
        assert_eq!(s.on_behalf(Process("aws-cni"), &shell), Process("aws-cni"));
        assert_eq!(
            s.on_behalf(Unknown, &owner_above),
            Unknown,
            "no process, no parent"
        );
        assert_eq!(s.on_behalf(Kernel, &owner_above), Kernel);
    }

    #[test]
    fn owners_compare_as_proc_shows_them() {
        let mut s = vpc(UnknownActor::Restore);
        s.owners = vec!["a-very-long-process-name".into()];
        // /proc/PID/comm keeps 15 bytes.
        assert!(s.is_owner("a-very-long-pro"));
        assert!(!s.is_owner("a-very-long"));
    }

    #[test]
    fn adopted_rules_keep_what_was_seen_and_say_their_origin() {
        let s = vpc(UnknownActor::Restore);
        let d = s.adopt_rule(&rule(1536, 2), Some(4));
        assert_eq!(d.key, rule(1536, 2));
        assert_eq!(d.protocol, Some(4));
        assert_eq!(d.name, "adopted:vpc-cni/1536");
        assert_eq!(origin(&d.name), "adopted");
        assert_eq!(origin("pods"), "config");
    }
}
