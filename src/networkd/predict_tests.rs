//! Tests of `predict`: what a restart and a reconfigure take away, and the drop-ins.

use super::super::config::tests::MapTree;
use super::super::config::{networks, settings};
use super::*;
use crate::model::{RouteType, RuleAction};

const NETWORK: &str = "[Match]\nName=eth0\n[Network]\nAddress=10.0.0.5/24\n";

fn facts() -> Kernel {
    let link = |index, name: &str| LinkFacts {
        index,
        name: name.into(),
        iftype: Some("ether".into()),
        ..LinkFacts::default()
    };
    let mut a = ObservedAddress::with_prefix(24);
    a.broadcast = Some("10.0.0.255".parse().unwrap());
    a.label = Some("eth0".into());
    Kernel {
        links: vec![link(2, "eth0"), link(3, "cni0")],
        addresses: vec![
            (2, "10.0.0.5".parse().unwrap(), a),
            (
                3,
                "10.244.1.1".parse().unwrap(),
                ObservedAddress::with_prefix(24),
            ),
        ],
    }
}

fn rule(priority: u32, protocol: Option<u8>) -> Present {
    let key = RuleKey::new(
        Family::Ipv4,
        priority,
        Some("10.244.1.0/24".parse().unwrap()),
        None,
        None,
        None,
        None,
        None,
        77,
        RuleAction::Lookup,
    );
    Present::Rule {
        id: ObjectId::Rule(key.clone()),
        name: format!("rule-{priority}"),
        key,
        protocol,
    }
}

fn route(dst: &str, oif: u32, gateway: Option<&str>, protocol: u8) -> Present {
    let key = RouteKey::new(Family::Ipv4, 77, dst.parse().unwrap(), None);
    Present::Route {
        id: ObjectId::Route(key.clone()),
        name: format!("route-{dst}"),
        key,
        route: ObservedRoute {
            kind: RouteType::Unicast,
            gateway: gateway.map(|g| g.parse().unwrap()),
            oif: Some(oif),
            prefsrc: None,
            scope: 0,
            protocol,
            onlink: false,
            mtu: None,
            multipath: false,
        },
    }
}

fn address() -> Present {
    Present::Address {
        id: ObjectId::Address(("eth0".into(), "10.0.0.5".parse().unwrap())),
        name: "node".into(),
        ifindex: 2,
        address: "10.0.0.5".parse().unwrap(),
    }
}

fn names(v: &[AtRisk]) -> Vec<(String, Effect)> {
    v.iter().map(|a| (a.name.clone(), a.effect)).collect()
}

fn present() -> Vec<Present> {
    vec![
        rule(100, Some(3)),
        rule(0, Some(PROTO_KERNEL)),
        route("10.244.0.0/16", 2, Some("10.0.0.254"), 3),
        route("10.96.0.0/12", 3, None, 3),
        address(),
    ]
}

#[test]
fn a_default_networkd_removes_foreign_rules_routes_and_re_adds_its_address() {
    let tree = MapTree::default().with("/etc/systemd/network/10-eth0.network", NETWORK);
    let (s, nets) = (settings(&tree), networks(&tree));
    let p = present();
    let at_risk = predict(Event::Restart, &s, &nets, &facts(), &p);
    assert_eq!(
        names(&at_risk),
        [
            ("rule-100".to_string(), Effect::Removed),
            ("route-10.244.0.0/16".to_string(), Effect::Removed),
            ("node".to_string(), Effect::Readded),
        ],
        "the kernel's rule and the route on the unmanaged cni0 stay: {at_risk:#?}"
    );
    let d = dropins(&at_risk, &nets, &facts(), &p);
    assert_eq!(d.len(), 2, "{d:#?}");
    assert_eq!(d[0].path, "/etc/systemd/networkd.conf.d/60-netwarden.conf");
    assert!(d[0]
        .text
        .contains("ManageForeignRoutingPolicyRules=no\nManageForeignRoutes=no\n"));
    assert_eq!(
        d[1].path,
        "/etc/systemd/network/10-eth0.network.d/60-netwarden.conf"
    );
    assert!(d[1].text.contains("KeepConfiguration=static"));
    let (s2, n2) = with_dropins(&s, &nets, &d);
    assert!(predict(Event::Restart, &s2, &n2, &facts(), &p).is_empty());
    // A reconfigure still removes and re-adds networkd's own address, and the route through
    // it goes with it: no setting prevents that.
    let again = predict(Event::Reconfigure, &s2, &n2, &facts(), &p);
    assert_eq!(
        names(&again),
        [
            (
                "route-10.244.0.0/16".to_string(),
                Effect::DroppedWithAddress
            ),
            ("node".to_string(), Effect::Readded),
        ]
    );
}

#[test]
fn an_address_without_the_broadcast_networkd_would_set_is_kept_and_routes_stay() {
    let tree = MapTree::default().with("/etc/systemd/network/10-eth0.network", NETWORK);
    let mut k = facts();
    k.addresses[0].2.broadcast = None;
    let s = Settings {
        manage_foreign_routes: false,
        ..settings(&tree)
    };
    let at_risk = predict(Event::Restart, &s, &networks(&tree), &k, &present());
    assert_eq!(names(&at_risk), [("rule-100".to_string(), Effect::Removed)]);
}

#[test]
fn a_foreign_address_goes_and_its_routes_with_it() {
    let tree = MapTree::default().with(
        "/etc/systemd/network/10-eth0.network",
        "[Match]\nName=eth0\n[Network]\nDHCP=yes\n",
    );
    let s = Settings {
        manage_foreign_routes: false,
        manage_foreign_rules: false,
        ..settings(&tree)
    };
    let at_risk = predict(Event::Restart, &s, &networks(&tree), &facts(), &present());
    assert_eq!(
        names(&at_risk),
        [
            (
                "route-10.244.0.0/16".to_string(),
                Effect::DroppedWithAddress
            ),
            ("node".to_string(), Effect::Removed),
        ]
    );
}

#[test]
fn keep_configuration_and_configured_objects_are_left_alone() {
    let tree = MapTree::default().with(
        "/etc/systemd/network/10-eth0.network",
        "[Match]\nName=eth0\n[Network]\nAddress=10.0.0.5/24\nKeepConfiguration=yes\n",
    );
    assert!(predict(
        Event::Restart,
        &settings(&tree),
        &networks(&tree),
        &facts(),
        &present()
    )
    .is_empty());
    let tree = MapTree::default().with(
        "/etc/systemd/network/10-eth0.network",
        "[Match]\nName=eth0\n[Network]\nAddress=10.0.0.5/24\nKeepConfiguration=static\n[RoutingPolicyRule]\nPriority=100\nFrom=10.244.1.0/24\nTable=77\n",
    );
    let p = vec![
        rule(100, Some(3)),
        route(
            "10.244.0.0/16",
            2,
            Some("10.0.0.254"),
            crate::model::PROTO_STATIC,
        ),
        route("10.245.0.0/16", 2, Some("10.0.0.254"), 3),
    ];
    let at_risk = predict(
        Event::Restart,
        &settings(&tree),
        &networks(&tree),
        &facts(),
        &p,
    );
    assert_eq!(
        names(&at_risk),
        [("route-10.245.0.0/16".to_string(), Effect::Removed)],
        "the configured rule and the static route stay"
    );
}

#[test]
fn nothing_happens_without_a_managed_link() {
    let tree = MapTree::default().with(
        "/etc/systemd/network/10-eth0.network",
        "[Match]\nName=eth0\n[Link]\nUnmanaged=yes\n",
    );
    assert!(predict(
        Event::Restart,
        &settings(&tree),
        &networks(&tree),
        &facts(),
        &present()
    )
    .is_empty());
    assert!(managed_links(&networks(&tree), &facts().links).is_empty());
}
