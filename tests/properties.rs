//! Property tests on the pure layers (issue 8): for any desired state and any observed state
//! (made of a random subset of the protected objects, some with drifted attributes, plus foreign
//! objects the config does not name),
//! - applying the plan to the observed state, the way the kernel would (through the very
//!   messages the applier sends, `netwarden::apply::record`), leaves it in sync: the next plan
//!   is empty;
//! - the plan for an in-sync state is empty;
//! - nothing outside the config appears in a plan, and every foreign object survives the repair.

use netwarden::apply::{encode, record};
use netwarden::desired::DesiredState;
use netwarden::model::{
    AddressKey, DesiredAddress, DesiredRoute, DesiredRule, Family, Mode, RouteKey, RouteType,
    RuleAction, RuleKey,
};
use netwarden::observe::mirror::Mirror;
use netwarden::plan::{plan_all, Op, Plan};
use proptest::prelude::*;
use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags, LinkMessage};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use std::collections::hash_map::Entry;
use std::net::{IpAddr, Ipv4Addr};

const IFINDEX: u32 = 4;

fn rule_key(priority: u32, from: u8, table: u32) -> RuleKey {
    RuleKey::new(
        Family::Ipv4,
        priority,
        Some(format!("10.{from}.0.0/24").parse().unwrap()),
        None,
        None,
        None,
        None,
        None,
        table,
        RuleAction::Lookup,
    )
}

fn desired_rule(priority: u32, from: u8, table: u32, protocol: Option<u8>) -> DesiredRule {
    DesiredRule {
        name: format!("rule-{priority}-{from}-{table}"),
        mode: Mode::Enforce,
        key: rule_key(priority, from, table),
        protocol,
    }
}

fn desired_route(table: u32, dst: u8, gw: u8, with_device: bool) -> DesiredRoute {
    DesiredRoute {
        name: format!("route-{table}-{dst}"),
        mode: Mode::Enforce,
        key: RouteKey::new(
            Family::Ipv4,
            table,
            format!("10.{dst}.0.0/16").parse().unwrap(),
            None,
        ),
        kind: RouteType::Unicast,
        gateway: Some(IpAddr::V4(Ipv4Addr::new(10, 0, 0, gw))),
        device: with_device.then(|| "veth0".to_string()),
        prefsrc: None,
        scope: None,
        protocol: None,
        onlink: false,
        mtu: None,
    }
}

fn desired_address(host: u8, prefix_len: u8) -> DesiredAddress {
    DesiredAddress {
        name: format!("addr-{host}"),
        mode: Mode::Enforce,
        device: "veth0".into(),
        address: IpAddr::V4(Ipv4Addr::new(10, 0, 0, host)),
        prefix_len,
        managed_by: None,
    }
}

/// What one protected object looks like in the kernel before the repair.
#[derive(Clone, Copy, Debug)]
enum Seen {
    Absent,
    AsDesired,
    Drifted,
    /// As desired, twice (a rule added again without NLM_F_EXCL, as a dump shows it); for
    /// routes and addresses, which the kernel does not hold twice, as desired.
    Twice,
}

fn seen() -> impl Strategy<Value = Seen> {
    prop_oneof![
        Just(Seen::Absent),
        Just(Seen::AsDesired),
        Just(Seen::Drifted),
        Just(Seen::Twice)
    ]
}

#[derive(Debug)]
struct Case {
    desired: DesiredState,
    /// How each desired object is observed (the first of duplicate identities wins).
    rules: Vec<(DesiredRule, Seen)>,
    routes: Vec<(DesiredRoute, Seen)>,
    addresses: Vec<(DesiredAddress, Seen)>,
    /// Foreign objects: rule priorities 1000+, route tables 200+, addresses 10.9.0.x.
    foreign_rules: Vec<(u32, u8, u32)>,
    foreign_routes: Vec<(u32, u8, u8)>,
    foreign_addresses: Vec<u8>,
}

fn case() -> impl Strategy<Value = Case> {
    let rules = proptest::collection::vec(
        (
            100u32..110,
            0u8..4,
            70u32..73,
            prop_oneof![Just(None), Just(Some(4u8)), Just(Some(186u8))],
            seen(),
        ),
        0..8,
    );
    let routes =
        proptest::collection::vec((100u32..103, 1u8..6, 2u8..5, any::<bool>(), seen()), 0..8);
    let addresses = proptest::collection::vec((10u8..20, 16u8..30, seen()), 0..5);
    let foreign_rules = proptest::collection::vec((1000u32..1010, 0u8..4, 70u32..73), 0..6);
    let foreign_routes = proptest::collection::vec((200u32..203, 1u8..6, 2u8..5), 0..6);
    let foreign_addresses = proptest::collection::vec(1u8..50, 0..4);
    (
        rules,
        routes,
        addresses,
        foreign_rules,
        foreign_routes,
        foreign_addresses,
    )
        .prop_map(|(rules, routes, addresses, fr, fo, fa)| {
            let mut desired = DesiredState::default();
            let mut case_rules = Vec::new();
            for (prio, from, table, protocol, seen) in rules {
                let r = desired_rule(prio, from, table, protocol);
                if let Entry::Vacant(e) = desired.rules.entry(r.key.clone()) {
                    e.insert(r.clone());
                    case_rules.push((r, seen));
                }
            }
            let mut case_routes = Vec::new();
            for (table, dst, gw, dev, seen) in routes {
                let r = desired_route(table, dst, gw, dev);
                if let Entry::Vacant(e) = desired.routes.entry(r.key.clone()) {
                    e.insert(r.clone());
                    case_routes.push((r, seen));
                }
            }
            let mut case_addresses = Vec::new();
            for (host, len, seen) in addresses {
                let a = desired_address(host, len);
                let key = (a.device.clone(), a.address);
                if let Entry::Vacant(e) = desired.addresses.entry(key) {
                    e.insert(a.clone());
                    case_addresses.push((a, seen));
                }
            }
            Case {
                desired,
                rules: case_rules,
                routes: case_routes,
                addresses: case_addresses,
                foreign_rules: fr,
                foreign_routes: fo,
                foreign_addresses: fa,
            }
        })
}

fn with_link(m: &mut Mirror) {
    let mut l = LinkMessage::default();
    l.header.index = IFINDEX;
    l.header.flags |= LinkFlags::Up;
    l.attributes.push(LinkAttribute::IfName("veth0".into()));
    m.ingest(&M::NewLink(l));
}

/// The kernel as the case describes it, seen through the mirror.
fn observed(case: &Case) -> Mirror {
    let mut m = Mirror::default();
    with_link(&mut m);
    for (r, seen) in &case.rules {
        match seen {
            Seen::Absent => {}
            Seen::AsDesired => {
                m.ingest(&M::NewRule(encode::rule(&r.key, r.protocol)));
            }
            Seen::Twice => {
                let copy = M::NewRule(encode::rule(&r.key, r.protocol));
                m.ingest_dumped(&copy);
                m.ingest_dumped(&copy);
            }
            // Same identity, another protocol (a rule added by someone else).
            Seen::Drifted => {
                let other = if r.protocol == Some(4) { 186 } else { 4 };
                m.ingest(&M::NewRule(encode::rule(&r.key, Some(other))));
            }
        }
    }
    for (r, seen) in &case.routes {
        match seen {
            Seen::Absent => {}
            Seen::AsDesired | Seen::Twice => {
                m.ingest(&M::NewRoute(encode::route(r, Some(IFINDEX))));
            }
            Seen::Drifted => {
                let wrong = DesiredRoute {
                    gateway: Some("10.0.0.99".parse().unwrap()),
                    ..r.clone()
                };
                m.ingest(&M::NewRoute(encode::route(&wrong, Some(IFINDEX))));
            }
        }
    }
    for (a, seen) in &case.addresses {
        match seen {
            Seen::Absent => {}
            Seen::AsDesired | Seen::Twice => {
                m.ingest(&M::NewAddress(encode::address(
                    IFINDEX,
                    a.address,
                    a.prefix_len,
                )));
            }
            Seen::Drifted => {
                m.ingest(&M::NewAddress(encode::address(
                    IFINDEX,
                    a.address,
                    a.prefix_len + 1,
                )));
            }
        }
    }
    for &(prio, from, table) in &case.foreign_rules {
        m.ingest(&M::NewRule(encode::rule(
            &rule_key(prio, from, table),
            None,
        )));
    }
    for &(table, dst, gw) in &case.foreign_routes {
        let r = desired_route(table, dst, gw, true);
        m.ingest(&M::NewRoute(encode::route(&r, Some(IFINDEX))));
    }
    for &host in &case.foreign_addresses {
        m.ingest(&M::NewAddress(encode::address(
            IFINDEX,
            IpAddr::V4(Ipv4Addr::new(10, 9, 0, host)),
            24,
        )));
    }
    m
}

/// Applies a plan's requests to the mirror the way the kernel would.
fn apply_to(mirror: &mut Mirror, plan: &Plan) {
    for step in &plan.steps {
        for op in &step.ops {
            record(mirror, op);
        }
    }
}

/// Is the object an op touches one the config names?
fn op_is_protected(desired: &DesiredState, op: &Op) -> bool {
    match op {
        Op::AddRule { key, .. } | Op::DelRule { key, .. } => desired.rules.contains_key(key),
        Op::PutRoute { route, .. } => desired.routes.get(&route.key) == Some(route),
        Op::AddAddress {
            ifindex, address, ..
        }
        | Op::DelAddress {
            ifindex, address, ..
        } => {
            *ifindex == IFINDEX
                && desired
                    .addresses
                    .contains_key(&("veth0".to_string(), *address))
        }
        // The cases generate rules, routes and addresses only.
        _ => false,
    }
}

/// Foreign objects, as the mirror holds them.
type Foreign = (
    Vec<(RuleKey, Vec<Option<u8>>)>,
    Vec<RouteKey>,
    Vec<AddressKey>,
);

fn foreign(desired: &DesiredState, m: &Mirror) -> Foreign {
    let mut rules: Vec<_> = m
        .rules
        .iter()
        .filter(|(k, _)| !desired.rules.contains_key(k))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    rules.sort();
    let mut routes: Vec<_> = m
        .routes
        .keys()
        .filter(|k| !desired.routes.contains_key(k))
        .cloned()
        .collect();
    routes.sort();
    let mut addresses: Vec<_> = m
        .addresses
        .keys()
        .filter(|k| {
            !desired
                .addresses
                .contains_key(&("veth0".to_string(), k.address))
        })
        .cloned()
        .collect();
    addresses.sort();
    (rules, routes, addresses)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn applying_the_plan_brings_the_state_in_sync(case in case()) {
        let mut m = observed(&case);
        let plan = plan_all(&case.desired, &m);
        // A rule without a protocol in the config accepts any protocol: not drifted then.
        let drifted = case
            .rules
            .iter()
            .filter(|(r, s)| r.protocol.is_some() || !matches!(s, Seen::Drifted))
            .map(|(_, s)| s)
            .filter(|s| !matches!(s, Seen::AsDesired))
            .count()
            + case
                .routes
                .iter()
                .map(|(_, s)| s)
                .chain(case.addresses.iter().map(|(_, s)| s))
                .filter(|s| !matches!(s, Seen::AsDesired | Seen::Twice))
                .count();
        prop_assert_eq!(plan.drift.len(), drifted, "every drifted object is found: {:?}", plan.drift);
        apply_to(&mut m, &plan);
        let after = plan_all(&case.desired, &m);
        prop_assert!(after.is_empty(), "still drifting after the repair: {:?}", after.drift);
        // Applying the repair again changes nothing: the plan is idempotent.
        prop_assert!(plan_all(&case.desired, &m).steps.is_empty());
    }

    #[test]
    fn the_plan_for_an_in_sync_state_is_empty(case in case()) {
        let mut m = Mirror::default();
        with_link(&mut m);
        for r in case.desired.rules.values() {
            m.ingest(&M::NewRule(encode::rule(&r.key, r.protocol)));
        }
        for r in case.desired.routes.values() {
            m.ingest(&M::NewRoute(encode::route(r, Some(IFINDEX))));
        }
        for a in case.desired.addresses.values() {
            m.ingest(&M::NewAddress(encode::address(IFINDEX, a.address, a.prefix_len)));
        }
        let plan = plan_all(&case.desired, &m);
        prop_assert!(plan.is_empty(), "{:?}", plan);
    }

    #[test]
    fn objects_outside_the_config_never_appear_in_a_plan(case in case()) {
        let mut m = observed(&case);
        let before = foreign(&case.desired, &m);
        let plan = plan_all(&case.desired, &m);
        for step in &plan.steps {
            for op in &step.ops {
                prop_assert!(op_is_protected(&case.desired, op), "foreign object in the plan: {:?}", op);
            }
        }
        apply_to(&mut m, &plan);
        prop_assert_eq!(foreign(&case.desired, &m), before, "a foreign object was changed");
    }
}

// ---------------------------------------------------------------------------------------------
// The ipset plan: applying its adds and deletions to the observed members gives every desired
// member and no forbidden one; with `membership: contains` forbidden members are the only
// deletions, and every other foreign member is left alone.

mod sets {
    use netwarden::model::fast::HashSet;
    use netwarden::model::{Family, Mode};
    use netwarden::netfilter::model::{Content, DesiredSet, Member, SetType};
    use netwarden::netfilter::parse::SavedSet;
    use netwarden::netfilter::plan::plan_set;
    use proptest::prelude::*;

    fn member(host: u8) -> Member {
        Member::parse(&format!("10.{}.0.{host}", host % 4)).unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn forbidden_members_are_the_only_deletions(
            desired in proptest::collection::btree_set(0u8..64, 0..12),
            present in proptest::collection::btree_set(0u8..128, 0..40),
            forbidden_nets in proptest::collection::btree_set(0u8..4, 0..2),
            exact in any::<bool>(),
        ) {
            // Forbidden: 10.K.0.0/24 for some K; desired members never overlap one (config
            // validation refuses that).
            let forbidden: Vec<_> = forbidden_nets
                .iter()
                .map(|k| format!("10.{k}.0.0/24").parse().unwrap())
                .collect();
            let d = DesiredSet {
                name: "s".into(),
                mode: Mode::Enforce,
                set: "s".into(),
                kind: SetType::HashIp,
                family: Family::Ipv4,
                options: Default::default(),
                members: desired
                    .iter()
                    .filter(|h| !forbidden_nets.contains(&(*h % 4)))
                    .map(|h| member(*h))
                    .collect(),
                membership: if exact { Content::Exact } else { Content::Contains },
                forbidden,
            };
            let observed = SavedSet {
                kind: "hash:ip".into(),
                family: Some("inet".into()),
                options: Vec::new(),
                members: present.iter().map(|h| member(*h)).collect(),
                other: Vec::new(),
            };
            let (_, repairs) = plan_set(&d, Some(&observed), None);
            let mut now: HashSet<Member> = observed.members.clone();
            for r in &repairs {
                prop_assert!(r.create.is_none());
                for (_, m) in &r.del {
                    prop_assert!(observed.members.contains(m), "deletes what is not there: {m:?}");
                    prop_assert!(!d.members.contains(m), "deletes a desired member: {m:?}");
                    if !exact {
                        prop_assert!(d.forbids(m).is_some(), "deletes a non-forbidden member: {m:?}");
                    }
                    now.remove(m);
                }
                for (_, m) in &r.add {
                    prop_assert!(d.members.contains(m), "adds a member not desired: {m:?}");
                    now.insert(*m);
                }
            }
            for m in &d.members {
                prop_assert!(now.contains(m));
            }
            prop_assert!(now.iter().all(|m| d.forbids(m).is_none()));
            if exact {
                let want: HashSet<Member> = d.members.iter().copied().collect();
                prop_assert_eq!(&now, &want);
            } else {
                // Every foreign member that is not forbidden is still there.
                for m in &observed.members {
                    if d.forbids(m).is_none() {
                        prop_assert!(now.contains(m));
                    }
                }
            }
            // In sync afterwards.
            let after = SavedSet { members: now, ..observed.clone() };
            let (drift, repairs) = plan_set(&d, Some(&after), None);
            prop_assert!(drift.is_none(), "{drift:?}");
            prop_assert!(repairs.is_empty());
        }
    }
}
