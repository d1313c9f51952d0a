use super::*;
use crate::nftables::listing::{self, ObservedRule};
use crate::nftables::model::{BaseChain, Forbidden, NfFamily};

fn key() -> TableKey {
    TableKey {
        family: NfFamily::Ip,
        name: "kube-proxy".into(),
    }
}

fn rule(s: &str) -> RuleText {
    crate::nftables::text::rule(s).unwrap()
}

fn el(s: &str) -> Element {
    crate::nftables::text::element(s, s.contains(" : ")).unwrap()
}

fn desired() -> DesiredTable {
    DesiredTable {
        name: "kube-proxy-v4".into(),
        mode: Mode::Enforce,
        key: key(),
        comment: Some("rules for kube-proxy".into()),
        dormant: None,
        chains: vec![
            DesiredChain {
                name: "nat-prerouting".into(),
                base: Some(BaseChain {
                    kind: "nat".into(),
                    hook: "prerouting".into(),
                    priority: -100,
                    policy: Some("accept".into()),
                    device: None,
                }),
                comment: None,
                content: Content::Exact,
                rules: vec![rule("jump services")],
            },
            DesiredChain {
                name: "cluster-ips-check".into(),
                base: None,
                comment: None,
                content: Content::Contains,
                rules: vec![
                    rule("ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\""),
                    rule("ip daddr 10.96.0.0/16 drop"),
                ],
            },
        ],
        sets: vec![
            DesiredSet {
                name: "cluster-ips".into(),
                map: false,
                declaration: "type ipv4_addr".into(),
                flags: Vec::new(),
                timeout: None,
                comment: Some("Active ClusterIPs".into()),
                elements: vec![el("10.96.0.1"), el("10.96.0.10")],
                membership: Content::Contains,
                forbidden: vec![Forbidden::Net("10.200.0.0/24".parse().unwrap())],
            },
            DesiredSet {
                name: "service-ips".into(),
                map: true,
                declaration: "type ipv4_addr . inet_proto . inet_service : verdict".into(),
                flags: Vec::new(),
                timeout: None,
                comment: None,
                elements: vec![el("10.96.0.1 . tcp . 443 : goto svc-a")],
                membership: Content::Exact,
                forbidden: Vec::new(),
            },
        ],
    }
}

const IN_SYNC: &str = r#"table ip kube-proxy { # handle 1
	comment "rules for kube-proxy"
	set cluster-ips { # handle 2
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 10.96.0.10, 10.96.0.1, 10.96.0.77 }
	}
	map service-ips { # handle 3
		type ipv4_addr . inet_proto . inet_service : verdict
		elements = { 10.96.0.1 . tcp . 443 : goto svc-a }
	}
	chain nat-prerouting { # handle 4
		type nat hook prerouting priority dstnat; policy accept;
		jump services # handle 10
	}
	chain cluster-ips-check { # handle 5
		ip saddr 1.1.1.1 accept # handle 11
		ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs" # handle 12
		ip daddr 10.96.0.0/16 drop # handle 13
	}
	chain owners-own { # handle 6
		accept # handle 14
	}
}
"#;

fn observed() -> ObservedTable {
    listing::parse(IN_SYNC, &key()).unwrap()
}

fn plan(o: Option<&ObservedTable>) -> (Option<TableDrift>, Option<Repair>) {
    plan_table(&desired(), o, &Aliases::new())
}

fn render(r: &Option<Repair>) -> String {
    crate::nftables::render::transaction(r.as_slice())
}

#[test]
fn in_sync_with_the_owners_other_objects() {
    // Another chain, another rule in a `contains` chain and another element in a `contains`
    // set are the owner's business.
    assert_eq!(plan(Some(&observed())), (None, None));
}

#[test]
fn a_missing_table_is_created_whole_in_dependency_order() {
    let (drift, repair) = plan(None);
    assert_eq!(drift.unwrap().findings, vec![Finding::TableMissing]);
    assert_eq!(
        render(&repair),
        "add table ip kube-proxy { comment \"rules for kube-proxy\"; }\n\
         add set ip kube-proxy cluster-ips { type ipv4_addr; comment \"Active ClusterIPs\"; }\n\
         add map ip kube-proxy service-ips { type ipv4_addr . inet_proto . inet_service : verdict; }\n\
         add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100; policy accept; }\n\
         add chain ip kube-proxy cluster-ips-check\n\
         add element ip kube-proxy cluster-ips { 10.96.0.1, 10.96.0.10 }\n\
         add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 443 : goto svc-a }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add rule ip kube-proxy cluster-ips-check ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n\
         add rule ip kube-proxy cluster-ips-check ip daddr 10.96.0.0/16 drop\n"
    );
}

#[test]
fn only_what_drifted_is_touched() {
    let mut o = observed();
    // A chain deleted, a rule deleted, an element deleted, a forbidden element added.
    o.chains.retain(|c| c.name != "nat-prerouting");
    o.chains[0].rules.retain(|r| r.handle != 13);
    let set = o.sets.iter_mut().find(|s| s.name == "cluster-ips").unwrap();
    set.elements.retain(|e| e.key != "10.96.0.1");
    set.elements.push(el("10.200.0.5"));
    let (drift, repair) = plan(Some(&o));
    let drift = drift.unwrap();
    assert_eq!(
        drift.summary(),
        "chain nat-prerouting missing; chain cluster-ips-check: 1 rule(s) missing: ip daddr 10.96.0.0/16 drop; set cluster-ips: 1 element(s) missing: 10.96.0.1; set cluster-ips: forbidden element(s): 10.200.0.5"
    );
    assert_eq!(drift.forbidden(), vec!["cluster-ips: 10.200.0.5"]);
    assert_eq!(
        render(&repair),
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100; policy accept; }\n\
         delete element ip kube-proxy cluster-ips { 10.200.0.5 }\n\
         add element ip kube-proxy cluster-ips { 10.96.0.1 }\n\
         add rule ip kube-proxy nat-prerouting jump services\n\
         add rule ip kube-proxy cluster-ips-check ip daddr 10.96.0.0/16 drop\n"
    );
}

#[test]
fn exact_chains_are_rewritten_and_exact_maps_trimmed() {
    let mut o = observed();
    let pre = o
        .chains
        .iter_mut()
        .find(|c| c.name == "nat-prerouting")
        .unwrap();
    pre.rules.push(ObservedRule {
        handle: 99,
        text: rule("counter"),
    });
    let map = o.sets.iter_mut().find(|s| s.name == "service-ips").unwrap();
    map.elements[0].value = Some("goto svc-evil".into());
    map.elements.push(el("10.96.0.9 . udp . 53 : accept"));
    let (drift, repair) = plan(Some(&o));
    assert_eq!(
        drift.unwrap().summary(),
        "chain nat-prerouting: 1 rule(s) not in the config; set service-ips: 1 element(s) missing: 10.96.0.1 . tcp . 443 : goto svc-a; set service-ips: 1 element(s) not in the config: 10.96.0.9 . udp . 53 : accept"
    );
    assert_eq!(
        render(&repair),
        "delete element ip kube-proxy service-ips { 10.96.0.1 . tcp . 443, 10.96.0.9 . udp . 53 }\n\
         add element ip kube-proxy service-ips { 10.96.0.1 . tcp . 443 : goto svc-a }\n\
         flush chain ip kube-proxy nat-prerouting\n\
         add rule ip kube-proxy nat-prerouting jump services\n"
    );
}

#[test]
fn a_rule_with_a_comment_is_identified_by_it_and_replaced_in_place() {
    let mut o = observed();
    let chain = o
        .chains
        .iter_mut()
        .find(|c| c.name == "cluster-ips-check")
        .unwrap();
    chain.rules[1].text.body = "ip daddr @cluster-ips accept".into();
    let (drift, repair) = plan(Some(&o));
    assert_eq!(
        drift.unwrap().findings,
        vec![Finding::RuleDifferent {
            chain: "cluster-ips-check".into(),
            comment: "Reject traffic to invalid ports of ClusterIPs".into(),
            observed: "ip daddr @cluster-ips accept".into(),
        }]
    );
    assert_eq!(
        render(&repair),
        "replace rule ip kube-proxy cluster-ips-check handle 12 ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"\n"
    );
}

#[test]
fn what_nft_cannot_change_in_place_is_reported_not_recreated() {
    let mut o = observed();
    let pre = o
        .chains
        .iter_mut()
        .find(|c| c.name == "nat-prerouting")
        .unwrap();
    pre.base.as_mut().unwrap().priority = -90;
    let set = o.sets.iter_mut().find(|s| s.name == "cluster-ips").unwrap();
    set.declaration = "type ipv6_addr".into();
    set.elements.clear();
    let (drift, repair) = plan(Some(&o));
    assert_eq!(
        drift.unwrap().summary(),
        "chain nat-prerouting: priority -90, expected -100 (not recreated); set cluster-ips: `type ipv6_addr`, expected `type ipv4_addr` (not recreated; elements not compared)"
    );
    assert_eq!(repair, None);
}

#[test]
fn a_policy_is_set_in_place() {
    let mut o = observed();
    let pre = o
        .chains
        .iter_mut()
        .find(|c| c.name == "nat-prerouting")
        .unwrap();
    pre.base.as_mut().unwrap().policy = Some("drop".into());
    let (_, repair) = plan(Some(&o));
    assert_eq!(
        render(&repair),
        "add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100; policy accept; }\n"
    );
}

#[test]
fn observe_mode_reports_only_and_dormancy_is_repaired_when_asked() {
    let mut d = desired();
    d.mode = Mode::Observe;
    let (drift, repair) = plan_table(&d, None, &Aliases::new());
    assert!(drift.is_some());
    assert_eq!(repair, None);
    let mut d = desired();
    d.dormant = Some(false);
    let mut o = observed();
    o.flags = vec!["dormant".into()];
    let (drift, repair) = plan_table(&d, Some(&o), &Aliases::new());
    assert_eq!(
        drift.unwrap().findings,
        vec![Finding::Dormant { expected: false }]
    );
    assert_eq!(render(&repair), "add table ip kube-proxy\n");
}

#[test]
fn learned_printed_forms_stand_for_the_configs_text() {
    let mut d = desired();
    d.chains[0].rules = vec![rule("meta mark & 0x4000 == 0 return")];
    let mut o = observed();
    o.chains[0].rules[0].text = rule("meta mark & 0x00004000 == 0x00000000 return");
    let (drift, _) = plan_table(&d, Some(&o), &Aliases::new());
    assert!(
        drift.is_some(),
        "as written, the rule is not what nft prints"
    );
    let aliases = Aliases::from([(
        "meta mark & 0x4000 == 0 return".to_owned(),
        rule("meta mark & 0x00004000 == 0x00000000 return"),
    )]);
    assert_eq!(plan_table(&d, Some(&o), &aliases), (None, None));
}
