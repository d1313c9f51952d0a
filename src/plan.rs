//! The plan: a pure diff from desired and observed state to the operations that repair drift.
//!
//! Ownership-aware: it only ever adds or replaces objects the config protects (and removes the
//! old copy of a protected object whose identity cannot be replaced in place). Nothing outside the
//! config appears in a plan.

mod node;

use crate::desired::{DesiredAddressKey, DesiredState};
use crate::model::fast::HashSet;
use crate::model::{
    protocol_name, DesiredAddress, DesiredFdb, DesiredNeighbour, DesiredRoute, DesiredRule, FdbId,
    Kind, Mode, NeighbourId, ObservedAddress, RouteKey, RuleKey, SysctlKey,
};
use crate::observe::mirror::Mirror;
use serde::Serialize;
use std::net::IpAddr;

/// Which protected object a finding or step is about (it lives in the model now).
use crate::model::ObjectId;

/// One kernel request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    AddRule {
        key: RuleKey,
        protocol: Option<u8>,
    },
    DelRule {
        key: RuleKey,
        protocol: Option<u8>,
    },
    /// Create or replace in place (NLM_F_REPLACE): a route's identity is its key.
    PutRoute {
        route: DesiredRoute,
        oif: Option<u32>,
    },
    /// The address with the attributes to give it (`attrs.prefix_len` is the configured one):
    /// as it was before it went, when the mirror saw it go.
    AddAddress {
        ifindex: u32,
        address: IpAddr,
        attrs: ObservedAddress,
    },
    DelAddress {
        ifindex: u32,
        address: IpAddr,
        prefix_len: u8,
    },
    /// Create or replace the entry in place (`ip neigh replace`).
    PutNeighbour {
        neighbour: DesiredNeighbour,
        ifindex: u32,
    },
    /// Create, or replace the remote of a unicast MAC in place (`bridge fdb replace`); for a MAC
    /// with several remotes, add this one to the list (`bridge fdb append`).
    PutFdb {
        fdb: DesiredFdb,
        ifindex: u32,
    },
    /// Set the link up and/or its MTU (RTM_SETLINK); `None`: leave as it is.
    SetLink {
        ifindex: u32,
        up: bool,
        mtu: Option<u32>,
    },
    /// Write a setting below /proc/sys/net (not a netlink request).
    SetSysctl {
        key: SysctlKey,
        value: u32,
    },
}

/// How an object differs from what is desired.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Finding {
    /// Not in the kernel at all.
    Missing,
    /// In the kernel with other attributes.
    Different { observed: String },
    /// Cannot be applied yet: what it depends on does not exist.
    Pending { reason: String },
}

/// A protected object that is not the way it is meant to be.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Drift {
    #[serde(skip)]
    pub id: ObjectId,
    pub kind: Kind,
    pub name: String,
    pub object: String,
    pub mode: Mode,
    #[serde(flatten)]
    pub finding: Finding,
}

/// The requests that repair one object, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub id: ObjectId,
    pub name: String,
    pub ops: Vec<Op>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Every drifted object, enforced or observed, including pending ones.
    pub drift: Vec<Drift>,
    /// Repairs for the enforced ones that can be applied now.
    pub steps: Vec<Step>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.drift.is_empty()
    }
}

impl Step {
    /// Whether the step puts a route through a gateway in place: the kernel refuses it
    /// (ENETUNREACH) while the gateway is not reachable.
    pub fn needs_gateway(&self) -> bool {
        matches!(self.ops.last(), Some(Op::PutRoute { route, .. }) if route.gateway.is_some())
    }
}

/// What a plan's repairs put in place that can make pending objects possible: how many went
/// through, the prefixes now reachable (the destinations of routes put back, the subnets and
/// addresses of addresses put back), and whether an object of another kind was put back (a link
/// brought up, a neighbour entry: what that makes possible is not worked out here).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    pub repaired: usize,
    pub reachable: Vec<ipnet::IpNet>,
    pub other: bool,
}

impl Progress {
    /// Of the steps of `plan` that went through (`repaired`).
    pub fn of(plan: &Plan, repaired: &HashSet<ObjectId>) -> Progress {
        let mut reachable = Vec::new();
        let mut other = false;
        for s in plan.steps.iter().filter(|s| repaired.contains(&s.id)) {
            other |= !matches!(
                s.id,
                ObjectId::Rule(_) | ObjectId::Route(_) | ObjectId::Address(_)
            );
            match s.ops.last() {
                Some(Op::PutRoute { route, .. }) if route.kind.forwards() => {
                    reachable.push(route.key.destination)
                }
                Some(Op::AddAddress { address, attrs, .. }) => {
                    if let Ok(net) = ipnet::IpNet::new(*address, attrs.prefix_len) {
                        reachable.push(net.trunc());
                    }
                    reachable.push(ipnet::IpNet::from(*address));
                }
                _ => {}
            }
        }
        Progress {
            repaired: repaired.len(),
            reachable,
            other,
        }
    }
}

/// The pending objects that `progress` can make possible: routes whose gateway or preferred
/// source lies in what became reachable (a thousand routes through a gateway whose link lost its
/// address are not tried again because other routes came back), every pending route when an
/// object of another kind was put back (a link brought up), and pending objects of the other
/// kinds always (few, and what they wait for is not worked out here).
pub fn unblocked<'a>(
    desired: &DesiredState,
    pending: impl IntoIterator<Item = &'a ObjectId>,
    progress: &Progress,
) -> Dirty {
    let reachable = &progress.reachable;
    let covered =
        |ip: &Option<IpAddr>| ip.is_some_and(|ip| reachable.iter().any(|n| n.contains(&ip)));
    let mut dirty = Dirty::default();
    for id in pending {
        match id {
            ObjectId::Route(k) => {
                if progress.other
                    || desired
                        .routes
                        .get(k)
                        .is_some_and(|r| covered(&r.gateway) || covered(&r.prefsrc))
                {
                    dirty.routes.insert(k.clone());
                }
            }
            ObjectId::Rule(_) | ObjectId::Address(_) => {}
            other => {
                dirty.insert(other.clone());
            }
        }
    }
    dirty
}

/// Objects to look at: everything (a full refresh), or those named by events.
#[derive(Clone, Debug, Default)]
pub struct Dirty {
    pub rules: HashSet<RuleKey>,
    pub routes: HashSet<RouteKey>,
    pub addresses: HashSet<DesiredAddressKey>,
    pub neighbours: HashSet<NeighbourId>,
    pub fdb: HashSet<FdbId>,
    pub links: HashSet<String>,
    pub sysctls: HashSet<SysctlKey>,
}

impl Dirty {
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
            && self.routes.is_empty()
            && self.addresses.is_empty()
            && self.neighbours.is_empty()
            && self.fdb.is_empty()
            && self.links.is_empty()
            && self.sysctls.is_empty()
    }

    /// Adds an object, whatever its kind.
    pub fn insert(&mut self, id: ObjectId) -> bool {
        match id {
            ObjectId::Rule(k) => self.rules.insert(k),
            ObjectId::Route(k) => self.routes.insert(k),
            ObjectId::Address(k) => self.addresses.insert(k),
            ObjectId::Neighbour(k) => self.neighbours.insert(k),
            ObjectId::Fdb(k) => self.fdb.insert(k),
            ObjectId::Link(k) => self.links.insert(k),
            ObjectId::Sysctl(k) => self.sysctls.insert(k),
        }
    }

    pub fn remove(&mut self, id: &ObjectId) -> bool {
        match id {
            ObjectId::Rule(k) => self.rules.remove(k),
            ObjectId::Route(k) => self.routes.remove(k),
            ObjectId::Address(k) => self.addresses.remove(k),
            ObjectId::Neighbour(k) => self.neighbours.remove(k),
            ObjectId::Fdb(k) => self.fdb.remove(k),
            ObjectId::Link(k) => self.links.remove(k),
            ObjectId::Sysctl(k) => self.sysctls.remove(k),
        }
    }

    pub fn contains(&self, id: &ObjectId) -> bool {
        match id {
            ObjectId::Rule(k) => self.rules.contains(k),
            ObjectId::Route(k) => self.routes.contains(k),
            ObjectId::Address(k) => self.addresses.contains(k),
            ObjectId::Neighbour(k) => self.neighbours.contains(k),
            ObjectId::Fdb(k) => self.fdb.contains(k),
            ObjectId::Link(k) => self.links.contains(k),
            ObjectId::Sysctl(k) => self.sysctls.contains(k),
        }
    }

    /// Keeps only what `keep` says yes to.
    pub fn retain(&mut self, keep: impl Fn(&ObjectId) -> bool) {
        self.rules.retain(|k| keep(&ObjectId::Rule(k.clone())));
        self.routes.retain(|k| keep(&ObjectId::Route(k.clone())));
        self.addresses
            .retain(|k| keep(&ObjectId::Address(k.clone())));
        self.neighbours
            .retain(|k| keep(&ObjectId::Neighbour(k.clone())));
        self.fdb.retain(|k| keep(&ObjectId::Fdb(k.clone())));
        self.links.retain(|k| keep(&ObjectId::Link(k.clone())));
        self.sysctls.retain(|k| keep(&ObjectId::Sysctl(k.clone())));
    }
}

/// Plans every protected object.
pub fn plan_all(desired: &DesiredState, observed: &Mirror) -> Plan {
    let mut plan = Plan::default();
    for rule in desired.rules.values() {
        plan_rule(rule, observed, &mut plan);
    }
    for route in desired.routes.values() {
        plan_route(route, observed, &mut plan);
    }
    for addr in desired.addresses.values() {
        plan_address(addr, observed, &mut plan);
    }
    node::plan_all(desired, observed, &mut plan);
    sort(&mut plan);
    plan
}

/// Plans only the protected objects named in `dirty` (the fast path after an event).
pub fn plan_dirty(desired: &DesiredState, observed: &Mirror, dirty: &Dirty) -> Plan {
    let mut plan = Plan::default();
    for key in &dirty.rules {
        if let Some(rule) = desired.rules.get(key) {
            plan_rule(rule, observed, &mut plan);
        }
    }
    for key in &dirty.routes {
        if let Some(route) = desired.routes.get(key) {
            plan_route(route, observed, &mut plan);
        }
    }
    for key in &dirty.addresses {
        if let Some(addr) = desired.addresses.get(key) {
            plan_address(addr, observed, &mut plan);
        }
    }
    node::plan_dirty(desired, observed, dirty, &mut plan);
    sort(&mut plan);
    plan
}

/// Dependencies first ([`ObjectId::rank`]): links and their settings, addresses (a route may
/// need one for its gateway or source), neighbour entries, routes without a gateway (the link
/// route that makes a gateway reachable, often in the same table), then gateway routes, rules
/// last. Within a rank, by name for stable output.
fn sort(plan: &mut Plan) {
    let rank = ObjectId::rank;
    let step_rank = |s: &Step| match s.ops.last() {
        Some(Op::PutRoute { route, .. }) if route.gateway.is_some() => 6,
        _ => rank(&s.id),
    };
    plan.steps.sort_by(|a, b| {
        step_rank(a)
            .cmp(&step_rank(b))
            .then_with(|| a.name.cmp(&b.name))
    });
    plan.drift.sort_by(|a, b| {
        rank(&a.id)
            .cmp(&rank(&b.id))
            .then_with(|| a.name.cmp(&b.name))
    });
}

fn record(
    plan: &mut Plan,
    id: ObjectId,
    name: &str,
    object: String,
    mode: Mode,
    finding: Finding,
    ops: Vec<Op>,
) {
    let pending = matches!(finding, Finding::Pending { .. });
    plan.drift.push(Drift {
        id: id.clone(),
        kind: id.kind(),
        name: name.to_string(),
        object,
        mode,
        finding,
    });
    if mode == Mode::Enforce && !pending && !ops.is_empty() {
        plan.steps.push(Step {
            id,
            name: name.to_string(),
            ops,
        });
    }
}

fn plan_rule(rule: &DesiredRule, observed: &Mirror, plan: &mut Plan) {
    let present = observed.rules.get(&rule.key);
    let (finding, ops) = match present {
        Some(protos) if protos.iter().any(|p| rule.matches_protocol(*p)) => {
            // A rule the kernel holds twice is matched by its first copy only: the others are
            // dead weight on every lookup. Only identical copies (same protocol too) are extras.
            let mut ops = Vec::new();
            for (i, p) in protos.iter().enumerate() {
                if rule.matches_protocol(*p) && protos[..i].contains(p) {
                    ops.push(Op::DelRule {
                        key: rule.key.clone(),
                        protocol: *p,
                    });
                }
            }
            if ops.is_empty() {
                return;
            }
            let observed = format!("{} extra identical copies", ops.len());
            (Finding::Different { observed }, ops)
        }
        Some(protos) => {
            // Same identity, another protocol: remove that copy, then add ours.
            let other = protos[0];
            let mut ops: Vec<Op> = protos
                .iter()
                .map(|p| Op::DelRule {
                    key: rule.key.clone(),
                    protocol: *p,
                })
                .collect();
            ops.push(Op::AddRule {
                key: rule.key.clone(),
                protocol: rule.protocol,
            });
            let observed = format!("proto {}", protocol_name(other.unwrap_or(0)));
            (Finding::Different { observed }, ops)
        }
        None => (
            Finding::Missing,
            vec![Op::AddRule {
                key: rule.key.clone(),
                protocol: rule.protocol,
            }],
        ),
    };
    record(
        plan,
        ObjectId::Rule(rule.key.clone()),
        &rule.name,
        rule.describe(),
        rule.mode,
        finding,
        ops,
    );
}

fn plan_route(route: &DesiredRoute, observed: &Mirror, plan: &mut Plan) {
    let id = ObjectId::Route(route.key.clone());
    let oif = match &route.device {
        Some(dev) => match observed.link_index(dev) {
            Some(i) => Some(i),
            None => {
                let reason = format!("device {dev} does not exist");
                record(
                    plan,
                    id,
                    &route.name,
                    route.describe(),
                    route.mode,
                    Finding::Pending { reason },
                    vec![],
                );
                return;
            }
        },
        None => None,
    };
    let finding = match observed.routes.get(&route.key) {
        Some(list) if list.iter().any(|r| route.matches(r, oif)) => return,
        Some(list) => Finding::Different {
            observed: describe_observed_route(&list[0], observed),
        },
        None => Finding::Missing,
    };
    let ops = vec![Op::PutRoute {
        route: route.clone(),
        oif,
    }];
    record(
        plan,
        id,
        &route.name,
        route.describe(),
        route.mode,
        finding,
        ops,
    );
}

fn describe_observed_route(r: &crate::model::ObservedRoute, observed: &Mirror) -> String {
    let mut s = r.kind.to_string();
    if r.multipath {
        s.push_str(" multipath");
    }
    if let Some(g) = r.gateway {
        s.push_str(&format!(" via {g}"));
    }
    if let Some(i) = r.oif {
        match observed.link(i) {
            Some(l) => s.push_str(&format!(" dev {}", l.name)),
            None => s.push_str(&format!(" dev #{i}")),
        }
    }
    if let Some(p) = r.prefsrc {
        s.push_str(&format!(" src {p}"));
    }
    s.push_str(&format!(
        " proto {} scope {}",
        protocol_name(r.protocol),
        r.scope
    ));
    if let Some(m) = r.mtu {
        s.push_str(&format!(" mtu {m}"));
    }
    s
}

fn plan_address(addr: &DesiredAddress, observed: &Mirror, plan: &mut Plan) {
    let id = ObjectId::Address((addr.device.clone(), addr.address));
    let Some(ifindex) = observed.link_index(&addr.device) else {
        let reason = format!("device {} does not exist", addr.device);
        record(
            plan,
            id,
            &addr.name,
            addr.describe(),
            addr.mode,
            Finding::Pending { reason },
            vec![],
        );
        return;
    };
    let key = crate::model::AddressKey {
        ifindex,
        address: addr.address,
    };
    // As it was, if it went with the prefix length it must have (its broadcast, label, flags
    // and protocol are its owner's: see `ObservedAddress`); only the prefix otherwise.
    let attrs = observed
        .departed_address(&key)
        .filter(|was| was.prefix_len == addr.prefix_len)
        .cloned()
        .unwrap_or_else(|| ObservedAddress::with_prefix(addr.prefix_len));
    let add = Op::AddAddress {
        ifindex,
        address: addr.address,
        attrs,
    };
    let (finding, ops) = match observed.addresses.get(&key) {
        Some(o) if o.prefix_len == addr.prefix_len => return,
        Some(o) => (
            Finding::Different {
                observed: format!("{}/{}", addr.address, o.prefix_len),
            },
            vec![
                Op::DelAddress {
                    ifindex,
                    address: addr.address,
                    prefix_len: o.prefix_len,
                },
                add,
            ],
        ),
        None => (Finding::Missing, vec![add]),
    };
    record(
        plan,
        id,
        &addr.name,
        addr.describe(),
        addr.mode,
        finding,
        ops,
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apply::encode;
    use crate::model::{Family, RouteType, RuleAction};
    use rtnetlink::packet_route::address::AddressMessage;
    use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
    use rtnetlink::packet_route::RouteNetlinkMessage as M;

    fn rule(name: &str, prio: u32, mode: Mode) -> DesiredRule {
        DesiredRule {
            name: name.into(),
            mode,
            key: RuleKey::new(
                Family::Ipv4,
                prio,
                Some("10.244.0.0/24".parse().unwrap()),
                None,
                None,
                None,
                None,
                None,
                77,
                RuleAction::Lookup,
            ),
            protocol: None,
        }
    }

    fn route(name: &str, dst: &str, gw: &str) -> DesiredRoute {
        DesiredRoute {
            name: name.into(),
            mode: Mode::Enforce,
            key: RouteKey::new(Family::Ipv4, 100, dst.parse().unwrap(), None),
            kind: RouteType::Unicast,
            gateway: Some(gw.parse().unwrap()),
            device: Some("veth0".into()),
            prefsrc: None,
            scope: None,
            protocol: None,
            onlink: false,
            mtu: None,
        }
    }

    fn address(name: &str) -> DesiredAddress {
        DesiredAddress {
            name: name.into(),
            mode: Mode::Enforce,
            device: "veth0".into(),
            address: "10.0.0.1".parse().unwrap(),
            prefix_len: 24,
            managed_by: None,
        }
    }

    fn with_link(m: &mut Mirror) {
        let mut l = LinkMessage::default();
        l.header.index = 4;
        l.header.flags |= LinkFlags::Up;
        l.attributes.push(LinkAttribute::IfName("veth0".into()));
        m.ingest(&M::NewLink(l));
    }

    fn desired(
        rules: Vec<DesiredRule>,
        routes: Vec<DesiredRoute>,
        addrs: Vec<DesiredAddress>,
    ) -> DesiredState {
        DesiredState {
            rules: rules.into_iter().map(|r| (r.key.clone(), r)).collect(),
            routes: routes.into_iter().map(|r| (r.key.clone(), r)).collect(),
            addresses: addrs
                .into_iter()
                .map(|a| ((a.device.clone(), a.address), a))
                .collect(),
            ..Default::default()
        }
    }

    /// Applies a plan's requests to the mirror the way the kernel would, through the same
    /// messages the applier sends.
    fn apply_to(mirror: &mut Mirror, plan: &Plan) {
        for step in &plan.steps {
            for op in &step.ops {
                crate::apply::record(mirror, op);
            }
        }
    }

    #[test]
    fn missing_objects_are_added_and_then_in_sync() {
        let d = desired(
            vec![rule("r", 100, Mode::Enforce)],
            vec![route("rt", "10.1.0.0/16", "10.0.0.2")],
            vec![address("a")],
        );
        let mut m = Mirror::default();
        with_link(&mut m);
        let p = plan_all(&d, &m);
        assert_eq!(p.drift.len(), 3);
        assert_eq!(p.steps.len(), 3);
        assert!(
            matches!(p.steps[0].id, ObjectId::Address(_)),
            "addresses first"
        );
        assert!(matches!(p.steps[2].id, ObjectId::Rule(_)), "rules last");
        let d = desired(
            vec![],
            vec![
                route("a-via-gateway", "10.1.0.0/16", "10.0.0.2"),
                DesiredRoute {
                    gateway: None,
                    ..route("z-link", "10.0.0.0/24", "10.0.0.2")
                },
            ],
            vec![],
        );
        let p = plan_all(&d, &m);
        assert_eq!(
            p.steps[0].name, "z-link",
            "link routes before gateway routes"
        );
        apply_to(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty());
    }

    #[test]
    fn extra_identical_copies_of_a_rule_are_deleted_down_to_one() {
        let d = desired(vec![rule("r", 100, Mode::Enforce)], vec![], vec![]);
        let key = d.rules.values().next().unwrap().key.clone();
        let mut m = Mirror::default();
        // As a dump shows them: three copies with no protocol, one with protocol 4.
        for proto in [None, Some(4), None, None] {
            m.ingest_dumped(&M::NewRule(encode::rule(&key, proto)));
        }
        let p = plan_all(&d, &m);
        assert!(
            matches!(&p.drift[0].finding, Finding::Different { observed } if observed == "2 extra identical copies")
        );
        let del = Op::DelRule {
            key: key.clone(),
            protocol: None,
        };
        assert_eq!(p.steps[0].ops, vec![del.clone(), del]);
        apply_to(&mut m, &p);
        assert_eq!(m.rules[&key], vec![Some(4), None]);
        assert!(plan_all(&d, &m).is_empty());
        // One copy per protocol is not a duplicate.
        let mut one = Mirror::default();
        one.ingest_dumped(&M::NewRule(encode::rule(&key, None)));
        one.ingest_dumped(&M::NewRule(encode::rule(&key, Some(4))));
        assert!(plan_all(&d, &one).is_empty());
    }

    #[test]
    fn route_with_another_gateway_is_replaced() {
        let d = desired(vec![], vec![route("rt", "10.1.0.0/16", "10.0.0.2")], vec![]);
        let mut m = Mirror::default();
        with_link(&mut m);
        let wrong = route("rt", "10.1.0.0/16", "10.0.0.9");
        m.ingest(&M::NewRoute(encode::route(&wrong, Some(4))));
        let p = plan_all(&d, &m);
        assert!(
            matches!(&p.drift[0].finding, Finding::Different { observed } if observed.contains("10.0.0.9"))
        );
        assert_eq!(
            p.steps[0].ops,
            vec![Op::PutRoute {
                route: route("rt", "10.1.0.0/16", "10.0.0.2"),
                oif: Some(4)
            }]
        );
        apply_to(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty());
    }

    #[test]
    fn route_on_a_missing_device_is_pending_without_ops() {
        let d = desired(
            vec![],
            vec![route("rt", "10.1.0.0/16", "10.0.0.2")],
            vec![address("a")],
        );
        let m = Mirror::default();
        let p = plan_all(&d, &m);
        assert_eq!(p.drift.len(), 2);
        assert!(p
            .drift
            .iter()
            .all(|x| matches!(x.finding, Finding::Pending { .. })));
        assert!(p.steps.is_empty());
    }

    #[test]
    fn observe_mode_reports_without_ops() {
        let d = desired(vec![rule("r", 100, Mode::Observe)], vec![], vec![]);
        let p = plan_all(&d, &Mirror::default());
        assert_eq!(p.drift.len(), 1);
        assert_eq!(p.drift[0].finding, Finding::Missing);
        assert!(p.steps.is_empty());
    }

    #[test]
    fn rule_with_another_protocol_is_swapped() {
        let mut r = rule("r", 100, Mode::Enforce);
        r.protocol = Some(4);
        let d = desired(vec![r.clone()], vec![], vec![]);
        let mut m = Mirror::default();
        m.ingest(&M::NewRule(encode::rule(&r.key, Some(3))));
        let p = plan_all(&d, &m);
        assert_eq!(
            p.steps[0].ops,
            vec![
                Op::DelRule {
                    key: r.key.clone(),
                    protocol: Some(3)
                },
                Op::AddRule {
                    key: r.key.clone(),
                    protocol: Some(4)
                }
            ]
        );
        apply_to(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty());
    }

    #[test]
    fn address_with_another_prefix_is_swapped() {
        let d = desired(vec![], vec![], vec![address("a")]);
        let mut m = Mirror::default();
        with_link(&mut m);
        let msg: AddressMessage = encode::address(4, "10.0.0.1".parse().unwrap(), 16);
        m.ingest(&M::NewAddress(msg));
        let p = plan_all(&d, &m);
        assert_eq!(p.steps[0].ops.len(), 2);
        apply_to(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty());
    }

    /// The address as its owner made it (systemd-networkd: with a broadcast address), removed:
    /// the repair gives it back every attribute a request can set.
    #[test]
    fn a_removed_address_is_put_back_exactly_as_it_was() {
        use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags};
        let d = desired(vec![], vec![], vec![address("a")]);
        let mut m = Mirror::default();
        with_link(&mut m);
        let mut was = ObservedAddress::with_prefix(24);
        was.broadcast = Some("10.0.0.255".parse().unwrap());
        was.label = Some("veth0:nd".into());
        was.protocol = Some(3);
        was.route_priority = Some(50);
        // noprefixroute and permanent: only the first is a request's to set.
        was.flags = 0x200 | 0x80;
        let msg = encode::address_as(4, "10.0.0.1".parse().unwrap(), &was);
        m.ingest(&M::NewAddress(msg.clone()));
        assert!(plan_all(&d, &m).is_empty());
        m.ingest(&M::DelAddress(msg));
        let p = plan_all(&d, &m);
        let Op::AddAddress { attrs, .. } = &p.steps[0].ops[0] else {
            panic!("{p:?}")
        };
        assert_eq!(attrs.broadcast, was.broadcast);
        assert_eq!(attrs.label, was.label);
        assert_eq!(attrs.protocol, Some(3));
        assert_eq!(attrs.route_priority, Some(50));
        let Some(M::NewAddress(sent)) = crate::apply::message(&p.steps[0].ops[0]) else {
            panic!()
        };
        assert!(sent
            .attributes
            .contains(&AddressAttribute::Broadcast("10.0.0.255".parse().unwrap())));
        let flags = sent.attributes.iter().find_map(|a| match a {
            AddressAttribute::Flags(f) => Some(*f),
            _ => None,
        });
        assert_eq!(flags, Some(AddressFlags::Noprefixroute));
        apply_to(&mut m, &p);
        assert!(plan_all(&d, &m).is_empty());
        // Nothing known of it (it was already gone when the agent started): as configured.
        let mut fresh = Mirror::default();
        with_link(&mut fresh);
        let p = plan_all(&d, &fresh);
        let Op::AddAddress { attrs, .. } = &p.steps[0].ops[0] else {
            panic!("{p:?}")
        };
        assert_eq!(*attrs, ObservedAddress::with_prefix(24));
    }

    /// After a repair, only the pending routes it can have made possible are tried again: one
    /// through a gateway in the subnet of an address put back, not one through another gateway.
    #[test]
    fn repairs_unblock_only_routes_through_what_they_put_back() {
        let d = desired(
            vec![],
            vec![
                route("near", "10.65.0.1/32", "10.0.0.254"),
                route("far", "10.65.0.2/32", "10.9.0.254"),
            ],
            vec![address("a")],
        );
        let mut m = Mirror::default();
        with_link(&mut m);
        let p = plan_all(&d, &m);
        let addr = p
            .steps
            .iter()
            .find(|s| matches!(s.id, ObjectId::Address(_)))
            .unwrap()
            .id
            .clone();
        assert!(p.steps.iter().filter(|s| s.needs_gateway()).count() == 2);
        let progress = Progress::of(&p, &[addr].into_iter().collect());
        assert_eq!(progress.repaired, 1);
        let pending: HashSet<ObjectId> = d
            .routes
            .keys()
            .map(|k| ObjectId::Route(k.clone()))
            .collect();
        let again = unblocked(&d, &pending, &progress);
        let names: Vec<&str> = again
            .routes
            .iter()
            .map(|k| d.routes[k].name.as_str())
            .collect();
        assert_eq!(names, ["near"]);
        assert!(unblocked(&d, &pending, &Progress::default()).is_empty());
        let link_up = Progress {
            other: true,
            ..Progress::default()
        };
        assert_eq!(unblocked(&d, &pending, &link_up).routes.len(), 2);
    }

    #[test]
    fn dirty_plan_only_looks_at_named_objects() {
        let d = desired(
            vec![rule("a", 100, Mode::Enforce), rule("b", 200, Mode::Enforce)],
            vec![],
            vec![],
        );
        let m = Mirror::default();
        let mut dirty = Dirty::default();
        dirty.rules.insert(
            d.rules
                .values()
                .find(|r| r.name == "b")
                .unwrap()
                .key
                .clone(),
        );
        let p = plan_dirty(&d, &m, &dirty);
        assert_eq!(p.steps.len(), 1);
        assert_eq!(p.steps[0].name, "b");
    }

    #[test]
    fn foreign_objects_never_appear() {
        let d = desired(vec![rule("a", 100, Mode::Enforce)], vec![], vec![]);
        let mut m = Mirror::default();
        let foreign = rule("x", 300, Mode::Enforce);
        m.ingest(&M::NewRule(encode::rule(
            &d.rules.values().next().unwrap().key,
            None,
        )));
        m.ingest(&M::NewRule(encode::rule(&foreign.key, None)));
        assert!(plan_all(&d, &m).is_empty());
    }
}
