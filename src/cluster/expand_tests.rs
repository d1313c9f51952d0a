//! Load-time checks of templates and the pure expansion `(config, facts) -> desired state`.

use super::facts::{ClusterFacts, NodeFacts, ServiceFacts};
use crate::config::{self, Config, ConfigError};
use crate::desired::expand;
use crate::model::Family;

const HEADER: &str = "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n";

fn k8s(spec: &str) -> Config {
    match config::parse_kubernetes("cm.yaml", &format!("{HEADER}{spec}")) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

fn k8s_errors(spec: &str) -> Vec<String> {
    match config::parse_kubernetes("cm.yaml", &format!("{HEADER}{spec}")) {
        Err(ConfigError::Invalid(e)) => e.iter().map(ToString::to_string).collect(),
        other => panic!("expected errors, got {other:?}"),
    }
}

fn node(cidrs: &[&str]) -> ClusterFacts {
    ClusterFacts {
        node: Some(NodeFacts {
            name: "n1".into(),
            pod_cidrs: cidrs.iter().map(|c| c.parse().unwrap()).collect(),
            internal_ips: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            ..Default::default()
        }),
        apiserver: vec!["10.0.0.1".parse().unwrap()],
        ..Default::default()
    }
}

fn lb(facts: &mut ClusterFacts, ns: &str, name: &str, ip: &str) {
    std::sync::Arc::make_mut(&mut facts.services).insert(
        format!("{ns}/{name}"),
        std::sync::Arc::new(ServiceFacts {
            namespace: ns.into(),
            name: name.into(),
            kind: "LoadBalancer".into(),
            load_balancer_ips: vec![ip.parse().unwrap()],
            ..Default::default()
        }),
    );
}

const POD_RULE: &str = "  rules:\n    - name: pods\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n";

#[test]
fn file_mode_refuses_templates_naming_the_field() {
    let e = config::parse("f.yaml", &format!("{HEADER}{POD_RULE}")).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("f.yaml:7:13: spec.rules[0].from: `{{ node.podCIDRs.ipv4 }}` is a template"),
        "{text}"
    );
}

#[test]
fn unknown_and_misplaced_templates_are_load_errors() {
    let e = k8s_errors("  rules:\n    - name: pods\n      priority: 100\n      from: \"{{ node.podCIDR }}\"\n      table: \"{{ node.labels[t] }}\"\n");
    assert_eq!(e.len(), 2, "{e:?}");
    assert!(
        e[0].starts_with("cm.yaml:7:13: spec.rules[0].from: unknown template"),
        "{e:?}"
    );
    assert!(
        e[1].contains(
            "spec.rules[0].table: `{{ node.labels[t] }}`: a template is not allowed here"
        ),
        "{e:?}"
    );
    // The rest of a templated object is still checked, and a stand-in never shows in a message.
    let e = k8s_errors("  rules:\n    - name: pods\n      family: ipv6\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n");
    assert!(
        e.iter()
            .any(|m| m.contains("spec.rules[0].table: is required")),
        "{e:?}"
    );
    assert!(
        e.iter().any(|m| m.contains("spec.rules[0].from: `{{ node.podCIDRs.ipv4 }}` is an ipv4 prefix, but the rule is ipv6")),
        "{e:?}"
    );
    let e = k8s_errors("  addresses:\n    - name: a\n      device: eth0\n      address: \"{{ node.internalIPs.ipv4 }}\"\n");
    assert!(
        e[0].contains("`{{ node.internalIPs.ipv4 }}` has no prefix length"),
        "{e:?}"
    );
}

#[test]
fn pod_cidr_rule_pending_until_the_node_has_one() {
    let cfg = k8s(POD_RULE);
    assert!(cfg.rules.is_empty());
    assert_eq!(cfg.templates.len(), 1);
    let none = expand(&cfg, &ClusterFacts::default());
    assert!(none.desired.is_empty());
    assert_eq!(none.pending.len(), 1);
    assert!(
        none.pending[0]
            .reason
            .contains("waiting for {{ node.podCIDRs.ipv4 }}"),
        "{:?}",
        none.pending
    );
    // A node with only an IPv6 podCIDR: still nothing of the rule's family.
    let v6 = expand(&cfg, &node(&["fd00:10::/64"]));
    assert!(v6.desired.is_empty() && v6.pending.len() == 1);
    let ex = expand(&cfg, &node(&["10.244.1.0/24", "fd00:10::/64"]));
    assert!(ex.pending.is_empty(), "{:?}", ex.pending);
    let rules: Vec<String> = ex.desired.rules.values().map(|r| r.describe()).collect();
    assert_eq!(rules.len(), 1);
    assert!(
        rules[0].contains("from 10.244.1.0/24") && rules[0].contains("lookup 77"),
        "{rules:?}"
    );
}

#[test]
fn a_list_makes_one_object_per_value_of_the_family() {
    let cfg = k8s("  rules:\n    - name: pods\n      priority: 100\n      from: \"{{ node.podCIDRs }}\"\n      table: 77\n    - name: pods6\n      family: ipv6\n      priority: 200\n      from: \"{{ node.podCIDRs }}\"\n      table: 77\n");
    let ex = expand(
        &cfg,
        &node(&["10.244.1.0/24", "10.244.2.0/24", "fd00:10::/64"]),
    );
    assert!(ex.pending.is_empty(), "{:?}", ex.pending);
    let by_prio = |p: u32| ex.desired.rules.keys().filter(|k| k.priority == p).count();
    assert_eq!(
        by_prio(100),
        3,
        "no family: one rule per value, each of its own family"
    );
    assert_eq!(by_prio(200), 1, "family ipv6: only the ipv6 value");
    assert!(ex
        .desired
        .rules
        .keys()
        .filter(|k| k.priority == 200)
        .all(|k| k.family == Family::Ipv6));
}

#[test]
fn service_ips_join_a_set_but_forbidden_ones_never() {
    let cfg = k8s("  ipsets:\n    - name: lb-ips\n      type: hash:ip\n      members:\n        - 192.0.2.200\n        - \"{{ services.loadBalancerIPs(namespace=kube-system) }}\"\n      forbidden:\n        - \"{{ apiserver.endpoints }}\"\n");
    assert!(cfg.ipsets.is_empty());
    let mut facts = node(&[]);
    lb(&mut facts, "kube-system", "a", "198.51.100.1");
    lb(&mut facts, "kube-system", "evil", "10.0.0.1"); // the API server's address
    lb(&mut facts, "other", "b", "198.51.100.2");
    lb(&mut facts, "kube-system", "v6", "fd00::7");
    let ex = expand(&cfg, &facts);
    assert_eq!(ex.ipsets.len(), 1);
    let members: Vec<String> = ex.ipsets[0]
        .members
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(members, ["192.0.2.200", "198.51.100.1"]);
    assert_eq!(ex.ipsets[0].forbidden, vec!["10.0.0.1/32".parse().unwrap()]);
    assert!(
        ex.pending
            .iter()
            .any(|p| p.reason.contains("`10.0.0.1` is forbidden")),
        "{:?}",
        ex.pending
    );
    // The Service goes away: the member leaves the set.
    std::sync::Arc::make_mut(&mut facts.services).remove("kube-system/a");
    let ex = expand(&cfg, &facts);
    assert_eq!(ex.ipsets[0].members.len(), 1);
}

#[test]
fn literal_objects_are_kept_and_clashes_reported() {
    let cfg = k8s("  rules:\n    - name: literal\n      priority: 100\n      from: 10.244.1.0/24\n      table: 77\n    - name: templated\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n");
    let ex = expand(&cfg, &node(&["10.244.1.0/24"]));
    assert_eq!(ex.desired.rules.len(), 1);
    assert_eq!(ex.desired.rules.values().next().unwrap().name, "literal");
    assert!(
        ex.pending[0].reason.contains("same rule as `literal`"),
        "{:?}",
        ex.pending
    );
}

#[test]
fn invalid_fact_values_leave_the_object_pending() {
    // An annotation that is not an address: the route is pending with the field's own reason.
    let cfg = k8s("  routes:\n    - name: public\n      destination: 198.51.100.0/24\n      gateway: \"{{ node.annotations[example.com/gw] }}\"\n");
    let mut facts = node(&[]);
    facts
        .node
        .as_mut()
        .unwrap()
        .annotations
        .insert("example.com/gw".into(), "not-an-ip".into());
    let ex = expand(&cfg, &facts);
    assert!(ex.desired.routes.is_empty());
    assert!(
        ex.pending[0].reason.contains("gateway: `not-an-ip`"),
        "{:?}",
        ex.pending
    );
    facts
        .node
        .as_mut()
        .unwrap()
        .annotations
        .insert("example.com/gw".into(), "10.0.0.254".into());
    assert_eq!(expand(&cfg, &facts).desired.routes.len(), 1);
}
