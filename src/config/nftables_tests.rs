use crate::config::{parse, ConfigError};
use crate::nftables::model::{Content, Forbidden, NfFamily};

fn errors(body: &str) -> String {
    let text = format!(
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  nftables:\n{body}"
    );
    match parse("f.yaml", &text) {
        Err(ConfigError::Invalid(e)) => e
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
        other => panic!("expected validation errors, got {other:?}"),
    }
}

fn example() -> crate::config::Config {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nftables-kube-proxy.yaml");
    crate::config::load(&path).expect("the example is valid")
}

#[test]
fn the_kube_proxy_example_is_valid_and_read_as_meant() {
    let c = example();
    let t = &c.nftables.tables;
    assert_eq!(t.len(), 2);
    let kp = &t[0];
    assert_eq!(kp.key.to_string(), "ip kube-proxy");
    let fwd = kp.chain("filter-forward").unwrap();
    assert_eq!(fwd.base.as_ref().unwrap().priority, -110);
    assert_eq!(fwd.content, Content::Exact);
    let check = kp.chain("cluster-ips-check").unwrap();
    assert_eq!(check.rules[0].body, "ip daddr @cluster-ips reject");
    assert_eq!(
        check.rules[0].comment.as_deref(),
        Some("Reject traffic to invalid ports of ClusterIPs")
    );
    let ips = kp.sets.iter().find(|s| s.name == "cluster-ips").unwrap();
    assert_eq!(ips.declaration, "type ipv4_addr");
    assert_eq!(ips.membership, Content::Contains);
    assert_eq!(
        ips.forbidden,
        vec![Forbidden::Net("10.200.0.0/24".parse().unwrap())]
    );
    let map = kp.sets.iter().find(|s| s.name == "service-ips").unwrap();
    assert!(map.map);
    assert_eq!(
        map.elements[0].value.as_deref(),
        Some("goto service-2QRHZV4L-default/kubernetes/tcp/https")
    );
    assert_eq!(t[1].key.family, NfFamily::Ip);
}

/// The example in docs/config.md is the example file, so what the docs show is what this test
/// validated.
#[test]
fn the_docs_show_the_example_file() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let docs = std::fs::read_to_string(root.join("docs/config.md")).unwrap();
    let example = std::fs::read_to_string(root.join("examples/nftables-kube-proxy.yaml")).unwrap();
    let body: String = example
        .lines()
        .skip_while(|l| l.starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert!(
        docs.contains(&format!("```yaml\n{body}```")),
        "docs/config.md must show examples/nftables-kube-proxy.yaml (without its comment header) verbatim"
    );
}

#[test]
fn nothing_can_leave_its_command() {
    let e = errors(
        "    - name: t\n      family: ip\n      table: t\n      chains:\n        - name: c\n          rules:\n            - accept; flush ruleset\n            - 'accept comment \"a\"b\"'\n",
    );
    assert!(e.contains("f.yaml:11:15: spec.nftables[0].chains[0].rules[0]: `accept; flush ruleset` holds `;` outside quotes"), "{e}");
    assert!(e.contains("spec.nftables[0].chains[0].rules[1]:"), "{e}");
    let e = errors(
        "    - name: t\n      family: ip\n      table: t;x\n      sets:\n        - name: s\n          type: ipv4_addr\n          elements: ['10.0.0.1, 10.0.0.2']\n",
    );
    assert!(
        e.contains("spec.nftables[0].table: `t;x` is not an nft name"),
        "{e}"
    );
    assert!(
        e.contains("spec.nftables[0].sets[0].elements[0]: `10.0.0.1, 10.0.0.2` holds `,`"),
        "{e}"
    );
}

#[test]
fn families_hooks_priorities_and_devices() {
    let e = errors(
        "    - name: t\n      family: ipx\n      table: t\n    - name: u\n      family: ip\n      table: u\n      chains:\n        - name: a\n          type: nat\n          hook: ingress\n          priority: dstnat\n        - name: b\n          type: filter\n          hook: input\n          priority: sideways\n        - name: c\n          type: nat\n          hook: forward\n          priority: 0\n        - name: d\n          policy: drop\n",
    );
    assert!(
        e.contains("spec.nftables[0].family: unknown family `ipx`"),
        "{e}"
    );
    assert!(
        e.contains("chains[0].hook: `ingress` is not a hook of ip tables"),
        "{e}"
    );
    assert!(
        e.contains("chains[1].priority: `sideways` is not a priority"),
        "{e}"
    );
    assert!(e.contains("chains[2].type: a nat chain hooks into prerouting, input, output or postrouting, not forward"), "{e}");
    assert!(e.contains("chains[3].policy: only base chains"), "{e}");
    let e = errors(
        "    - name: t\n      family: netdev\n      table: t\n      chains:\n        - name: a\n          type: filter\n          hook: ingress\n          priority: filter - 10\n",
    );
    assert!(
        e.contains("chains[0].device: is required: a netdev ingress chain hooks into one device"),
        "{e}"
    );
}

#[test]
fn elements_are_checked_against_their_type_and_forbidden_list() {
    let e = errors(
        "    - name: t\n      family: ip\n      table: t\n      sets:\n        - name: s\n          type: ipv4_addr\n          elements: [10.0.0.1, fd00::1, 10.0.0.0/8, 10.200.0.7]\n          forbidden: [10.200.0.0/24]\n      maps:\n        - name: m\n          type: 'inet_proto . inet_service : verdict'\n          elements: ['tcp . 80 : goto nowhere', 'tcp . 99999 : accept']\n",
    );
    assert!(
        e.contains("elements[1]: `fd00::1`: `fd00::1` is not an IPv4 address"),
        "{e}"
    );
    assert!(
        e.contains(
            "elements[2]: `10.0.0.0/8`: `10.0.0.0/8`: prefixes and ranges need `flags interval`"
        ),
        "{e}"
    );
    assert!(
        e.contains("elements[3]: `10.200.0.7` is forbidden by `10.200.0.0/24`"),
        "{e}"
    );
    assert!(e.contains("maps[0].elements[0]: jumps to chain `nowhere`, which this table entry does not protect"), "{e}");
    assert!(
        e.contains("maps[0].elements[1]: `tcp . 99999`: `99999` is not a port"),
        "{e}"
    );
}

#[test]
fn references_and_duplicates() {
    let e = errors(
        "    - name: t\n      family: inet\n      table: t\n      chains:\n        - name: a\n          rules: [jump b, ip daddr @s drop, accept, accept]\n",
    );
    assert!(
        e.contains("rules[0]: jumps to chain `b`, which this table entry does not protect"),
        "{e}"
    );
    assert!(
        e.contains("rules[1]: uses set `s`, which this table entry does not protect"),
        "{e}"
    );
    assert!(
        e.contains("rules[3]: the chain already lists this rule"),
        "{e}"
    );
    let e = errors(
        "    - name: t\n      family: inet\n      table: t\n      chains:\n        - name: a\n        - name: a\n      sets:\n        - name: a\n          type: mark\n      maps:\n        - name: a\n          type: 'mark : verdict'\n    - name: t2\n      family: inet\n      table: t\n",
    );
    assert!(
        e.contains("chains[1].name: the table already has a chain `a`"),
        "{e}"
    );
    assert!(
        e.contains("maps[0].name: the table already has a set or map `a`"),
        "{e}"
    );
    let e = errors(
        "    - name: t\n      family: inet\n      table: t\n    - name: t2\n      family: inet\n      table: t\n",
    );
    assert!(
        e.contains("spec.nftables[1]: protects the same table as `t` (line 5): both are `inet t`"),
        "{e}"
    );
}

#[test]
fn adopt_selectors_for_tables() {
    let text = "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  adopt:\n    - name: kube-proxy\n      nftables:\n        family: ip\n        names: [kube-proxy, calico-*]\n      owners: [kube-proxy]\n";
    let c = parse("f.yaml", text).unwrap();
    let s = &c.nftables.adopt[0];
    assert_eq!(s.adopt.owners, vec!["kube-proxy"]);
    assert_eq!(s.family, Some(NfFamily::Ip));
    assert_eq!(s.tables, vec!["kube-proxy", "calico-*"]);
    let bad = text
        .replace("calico-*", "'*'")
        .replace("family: ip", "family: ipx");
    let e = match parse("f.yaml", &bad) {
        Err(ConfigError::Invalid(e)) => e
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("\n"),
        other => panic!("{other:?}"),
    };
    assert!(
        e.contains("spec.adopt[0].nftables.family: unknown family `ipx`"),
        "{e}"
    );
    assert!(
        e.contains("spec.adopt[0].nftables.names[1]: `*` would adopt every one"),
        "{e}"
    );
}
