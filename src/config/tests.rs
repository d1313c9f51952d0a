use super::*;
use crate::model::{Family, RouteKey, RouteType, RuleAction, RuleKey, PROTO_STATIC};
use std::path::PathBuf;

const HEADER: &str = "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\n";

fn configs_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/configs")
}

/// Parses a document made of the standard header and `body`.
fn parse_body(body: &str) -> Result<Config, ConfigError> {
    parse("test.yaml", &format!("{HEADER}{body}"))
}

fn ok(body: &str) -> Config {
    match parse_body(body) {
        Ok(c) => c,
        Err(e) => panic!("expected a valid config, got:\n{e}"),
    }
}

/// The validation errors of an invalid body.
fn invalid(body: &str) -> Vec<FieldError> {
    match parse_body(body) {
        Err(ConfigError::Invalid(errors)) => errors,
        other => panic!("expected validation errors, got {other:?}"),
    }
}

/// Asserts that exactly one error names `field` and mentions `message`.
fn assert_one(errors: &[FieldError], field: &str, message: &str) {
    let hits: Vec<_> = errors
        .iter()
        .filter(|e| e.field == field && e.message.contains(message))
        .collect();
    assert_eq!(
        hits.len(),
        1,
        "want one `{field}: …{message}…` in:\n{}",
        format_invalid(errors)
    );
}

fn net(s: &str) -> ipnet::IpNet {
    s.parse().expect("test prefix")
}

#[test]
fn full_config_uses_every_field() {
    let config = load(&configs_dir().join("valid/full.yaml")).expect("full.yaml is valid");
    assert_eq!(config.mode, Mode::Enforce);
    assert_eq!(config.resync, Duration::from_secs(30));

    let [overlay, bogons, main_lookup] = &config.rules[..] else {
        panic!("three rules expected: {:?}", config.rules);
    };
    assert_eq!(overlay.name, "overlay-from-pods");
    assert_eq!(
        overlay.mode,
        Mode::Observe,
        "object mode overrides the global one"
    );
    assert_eq!(overlay.protocol, Some(PROTO_STATIC));
    assert_eq!(
        overlay.key,
        RuleKey::new(
            Family::Ipv4,
            100,
            Some(net("10.244.0.0/24")),
            Some(net("10.96.0.0/12")),
            Some("cni0".into()),
            Some("eth0".into()),
            Some(0x10),
            Some(0xff),
            77,
            RuleAction::Lookup,
        )
    );
    assert_eq!(overlay.key.fwmark, Some((0x10, 0xff)));

    assert_eq!(bogons.mode, Mode::Enforce, "global mode applies");
    assert_eq!(bogons.key.family, Family::Ipv6, "inferred from `to`");
    assert_eq!(bogons.key.priority, 200, "quoted numbers are accepted");
    assert_eq!(bogons.key.from, None, "`all` is no selector");
    assert_eq!(bogons.key.action, RuleAction::Blackhole);
    assert_eq!(bogons.key.table, 0);
    assert_eq!(bogons.protocol, None);

    assert_eq!(main_lookup.key.action, RuleAction::Lookup, "default action");
    assert_eq!(main_lookup.key.table, 254);
    assert_eq!(main_lookup.key.family, Family::Ipv4, "default family");

    let [pods, v6_default, sinkhole, local_vip] = &config.routes[..] else {
        panic!("four routes expected: {:?}", config.routes);
    };
    assert_eq!(
        pods.key,
        RouteKey::new(Family::Ipv4, 77, net("10.244.1.0/24"), Some(100))
    );
    assert_eq!(pods.mode, Mode::Observe);
    assert_eq!(pods.kind, RouteType::Unicast);
    assert_eq!(pods.gateway, Some("192.168.1.1".parse().unwrap()));
    assert_eq!(pods.device.as_deref(), Some("eth0"));
    assert_eq!(pods.prefsrc, Some("192.168.1.10".parse().unwrap()));
    assert_eq!(pods.scope, Some(0));
    assert_eq!(pods.protocol, Some(PROTO_STATIC));
    assert!(pods.onlink);
    assert_eq!(pods.mtu, Some(1400));

    assert_eq!(v6_default.key.family, Family::Ipv6);
    assert_eq!(v6_default.key.destination, net("::/0"));
    assert_eq!(v6_default.key.table, 254, "routes default to table main");
    assert_eq!(
        v6_default.key.metric, 1024,
        "IPv6 metric defaults like the kernel's"
    );
    assert_eq!(
        (v6_default.scope, v6_default.protocol, v6_default.mtu),
        (None, None, None)
    );
    assert!(!v6_default.onlink);

    assert_eq!(sinkhole.kind, RouteType::Blackhole);
    assert_eq!(sinkhole.key.metric, 0);
    assert_eq!(sinkhole.device, None);

    assert_eq!(local_vip.kind, RouteType::Local);
    assert_eq!(local_vip.key.table, 255);
    assert_eq!(
        local_vip.key.destination,
        net("10.96.0.10/32"),
        "bare address is a host route"
    );
    assert_eq!(local_vip.scope, Some(254));

    let [gw, v6] = &config.addresses[..] else {
        panic!("two addresses expected: {:?}", config.addresses);
    };
    assert_eq!(
        (
            gw.name.as_str(),
            gw.mode,
            gw.device.as_str(),
            gw.address,
            gw.prefix_len
        ),
        (
            "gateway-address",
            Mode::Observe,
            "veth0",
            "10.200.0.1".parse().unwrap(),
            24
        )
    );
    assert_eq!((v6.mode, v6.prefix_len), (Mode::Enforce, 64));
    assert_eq!(v6.family(), Family::Ipv6);
}

#[test]
fn defaults() {
    let c = ok("");
    assert_eq!(c.mode, Mode::Enforce);
    assert_eq!(c.resync, Duration::from_secs(60));
    assert!(c.rules.is_empty() && c.routes.is_empty() && c.addresses.is_empty());

    let c = ok("spec:\n  rules:\n  routes: []\n");
    assert!(c.rules.is_empty() && c.routes.is_empty());

    let c = ok("metadata:\n  name: n\nspec:\n  mode: observe\n  resync: 5m\n  addresses:\n    - name: a\n      device: eth0\n      address: 10.0.0.1/8\n");
    assert_eq!(c.mode, Mode::Observe);
    assert_eq!(c.resync, Duration::from_secs(300));
    assert_eq!(
        c.addresses[0].mode,
        Mode::Observe,
        "global mode is inherited"
    );
}

#[test]
fn families_are_inferred() {
    let c = ok(concat!(
        "spec:\n  rules:\n",
        "    - {name: r6, priority: 1, to: 'fd00::1', table: 7}\n",
        "    - {name: r4, priority: 1, from: all, table: 7}\n",
        "    - {name: r6b, priority: 1, from: all, family: ipv6, table: 7}\n",
        "  routes:\n",
        "    - {name: d6, destination: default, gateway: 'fe80::1'}\n",
        "    - {name: d6s, destination: default, source: 'fd00::5', device: eth0, table: 5}\n",
        "    - {name: d4, destination: default, device: eth0}\n",
        "    - {name: h6, destination: 'fd00::7', device: eth0, metric: 0}\n",
    ));
    let families: Vec<_> = c.rules.iter().map(|r| r.key.family).collect();
    assert_eq!(families, [Family::Ipv6, Family::Ipv4, Family::Ipv6]);
    assert_eq!(c.rules[0].key.to, Some(net("fd00::1/128")));
    let routes: Vec<_> = c
        .routes
        .iter()
        .map(|r| (r.key.family, r.key.destination, r.key.metric))
        .collect();
    assert_eq!(
        routes,
        [
            (Family::Ipv6, net("::/0"), 1024),
            (Family::Ipv6, net("::/0"), 1024),
            (Family::Ipv4, net("0.0.0.0/0"), 0),
            (Family::Ipv6, net("fd00::7/128"), 1024),
        ]
    );
}

#[test]
fn fwmarks_take_hex_and_decimal() {
    let c = ok(concat!(
        "spec:\n  rules:\n",
        "    - {name: a, priority: 1, fwmark: 0x10, table: 7}\n",
        "    - {name: b, priority: 2, fwmark: 16, fwmask: '0xFF00', table: 7}\n",
        "    - {name: c, priority: 3, fwmark: 0xffffffff, table: 7}\n",
    ));
    assert_eq!(c.rules[0].key.fwmark, Some((0x10, u32::MAX)));
    assert_eq!(c.rules[1].key.fwmark, Some((16, 0xff00)));
    assert_eq!(c.rules[2].key.fwmark, Some((u32::MAX, u32::MAX)));

    let errors = invalid("spec:\n  rules:\n    - {name: a, priority: 1, fwmark: 0x100000000, fwmask: x1, table: 7}\n");
    assert_one(&errors, "spec.rules[0].fwmark", "out of range");
    assert_one(&errors, "spec.rules[0].fwmask", "not a number");
}

#[test]
fn out_of_range_numbers_name_their_field() {
    let errors = invalid(concat!(
        "spec:\n  rules:\n",
        "    - {name: a, priority: 4294967296, table: 0}\n",
        "    - {name: b, priority: -1, table: -1, protocol: 256}\n",
        "  routes:\n",
        "    - {name: c, destination: default, device: eth0, metric: 4294967296, mtu: 67, scope: 256, table: 4294967296}\n",
    ));
    assert_one(&errors, "spec.rules[0].priority", "out of range");
    assert_one(&errors, "spec.rules[0].table", "between 1 and 4294967295");
    assert_one(&errors, "spec.rules[1].priority", "out of range");
    assert_one(&errors, "spec.rules[1].table", "out of range");
    assert_one(&errors, "spec.rules[1].protocol", "between 0 and 255");
    assert_one(&errors, "spec.routes[0].metric", "out of range");
    assert_one(&errors, "spec.routes[0].mtu", "between 68 and 65535");
    assert_one(&errors, "spec.routes[0].scope", "between 0 and 255");
    assert_one(&errors, "spec.routes[0].table", "out of range");
    assert_eq!(errors.len(), 9, "{}", format_invalid(&errors));
}

#[test]
fn bad_prefixes_and_addresses() {
    let errors = invalid(concat!(
        "spec:\n  rules:\n",
        "    - {name: a, priority: 1, from: 10.0.0.300/8, to: 10.0.0.0/33, table: 7}\n",
        "  routes:\n",
        "    - {name: b, destination: foo, gateway: 10.0.0.1/32, source: bar, device: eth0}\n",
        "  addresses:\n",
        "    - {name: c, device: eth0, address: 10.0.0.1}\n",
        "    - {name: d, device: eth0, address: 10.0.0.1/40}\n",
    ));
    assert_one(
        &errors,
        "spec.rules[0].from",
        "`10.0.0.300` is not an IP address",
    );
    assert_one(&errors, "spec.rules[0].to", "between 0 and 32");
    assert_one(
        &errors,
        "spec.routes[0].destination",
        "`foo` is not an IPv4 or IPv6 address",
    );
    assert_one(&errors, "spec.routes[0].gateway", "without a prefix length");
    assert_one(&errors, "spec.routes[0].source", "`bar` is not");
    assert_one(&errors, "spec.addresses[0].address", "no prefix length");
    assert_one(&errors, "spec.addresses[1].address", "between 0 and 32");
    assert_eq!(errors.len(), 7, "{}", format_invalid(&errors));
}

#[test]
fn family_mismatches() {
    let errors = invalid(concat!(
        "spec:\n  rules:\n",
        "    - {name: a, priority: 1, family: ipv6, from: 10.0.0.0/8, table: 7}\n",
        "    - {name: b, priority: 1, from: 10.0.0.0/8, to: 'fd00::/8', table: 7}\n",
        "  routes:\n",
        "    - {name: c, destination: 10.0.0.0/8, gateway: 'fe80::1', source: 10.0.0.1}\n",
        "    - {name: d, family: ipv4, destination: default, gateway: 'fe80::1', source: 'fd00::1'}\n",
    ));
    assert_one(
        &errors,
        "spec.rules[0].from",
        "is an ipv4 prefix, but the rule is ipv6 (set by `family`)",
    );
    assert_one(
        &errors,
        "spec.rules[1].to",
        "is an ipv6 prefix, but the rule is ipv4 (taken from `from`)",
    );
    assert_one(
        &errors,
        "spec.routes[0].gateway",
        "(taken from `destination`)",
    );
    assert_one(
        &errors,
        "spec.routes[1].gateway",
        "is an ipv6 address, but the route is ipv4",
    );
    assert_one(
        &errors,
        "spec.routes[1].source",
        "is an ipv6 address, but the route is ipv4",
    );
    assert_eq!(errors.len(), 5, "{}", format_invalid(&errors));
}

#[test]
fn missing_required_fields_point_at_the_object() {
    let errors = invalid(concat!(
        "spec:\n",
        "  rules:\n",
        "    - from: 10.0.0.0/8\n", // line 5: no name, priority, table
        "  routes:\n",
        "    - name: r\n", // line 7: no destination
        "      device: eth0\n",
        "  addresses:\n",
        "    - name: a\n", // line 10: no device, address
    ));
    let summary: Vec<_> = errors
        .iter()
        .map(|e| (e.line, e.column, e.field.as_str()))
        .collect();
    assert_eq!(
        summary,
        [
            (5, 7, "spec.rules[0].name"),
            (5, 7, "spec.rules[0].priority"),
            (5, 7, "spec.rules[0].table"),
            (7, 7, "spec.routes[0].destination"),
            (10, 7, "spec.addresses[0].device"),
            (10, 7, "spec.addresses[0].address"),
        ]
    );
    assert!(errors.iter().all(|e| e.message == "is required"));
}

#[test]
fn api_version_and_kind_are_checked() {
    let errors = match parse("t.yaml", "apiVersion: v1\nspec: {}\n") {
        Err(ConfigError::Invalid(e)) => e,
        other => panic!("{other:?}"),
    };
    assert_one(
        &errors,
        "apiVersion",
        "must be `netwarden.io/v1alpha1`, not `v1`",
    );
    assert_one(&errors, "kind", "is required");
}

#[test]
fn duplicate_names_across_kinds() {
    let errors = invalid(concat!(
        "spec:\n  rules:\n",
        "    - {name: x, priority: 1, table: 7}\n",
        "  routes:\n",
        "    - {name: x, destination: default, device: eth0}\n",
        "  addresses:\n",
        "    - {name: x, device: eth0, address: 10.0.0.1/8}\n",
    ));
    assert_one(
        &errors,
        "spec.routes[0].name",
        "name `x` is already used at line 5",
    );
    assert_one(
        &errors,
        "spec.addresses[0].name",
        "name `x` is already used at line 5",
    );
    assert_eq!(errors.len(), 2);

    // The later use in the file is the duplicate, whatever the order of the lists.
    let errors = invalid(concat!(
        "spec:\n  routes:\n",
        "    - {name: y, destination: default, device: eth0}\n",
        "  rules:\n",
        "    - {name: y, priority: 1, table: 7}\n",
    ));
    assert_one(
        &errors,
        "spec.rules[0].name",
        "name `y` is already used at line 5",
    );
    assert_eq!(errors.len(), 1);
}

#[test]
fn duplicate_identities() {
    let errors = invalid(concat!(
        "spec:\n  rules:\n",
        // Protocol is not part of a rule's identity; `lookup` is the default action.
        "    - {name: r1, priority: 1, from: 10.1.0.0/16, table: 7}\n",
        "    - {name: r2, priority: 1, from: 10.1.0.0/16, table: 7, protocol: static, action: lookup}\n",
        // Different tables are different rules.
        "    - {name: r3, priority: 1, from: 10.1.0.0/16, table: 8}\n",
        "  routes:\n",
        // IPv6 metric 0 is stored as 1024.
        "    - {name: a, destination: 'fd00::/64', device: eth0}\n",
        "    - {name: b, destination: 'fd00::/64', device: eth1, metric: 1024}\n",
        "    - {name: c, destination: 'fd00::/64', device: eth1, metric: 1024, table: 9}\n",
        "  addresses:\n",
        // Same address on the same device with another prefix length is the same address.
        "    - {name: d, device: eth0, address: 10.0.0.1/8}\n",
        "    - {name: e, device: eth0, address: 10.0.0.1/24}\n",
        "    - {name: f, device: eth1, address: 10.0.0.1/24}\n",
    ));
    assert_one(
        &errors,
        "spec.rules[1]",
        "protects the same rule as `r1` (line 5): both are `ipv4 1: from 10.1.0.0/16 lookup 7`",
    );
    assert_one(
        &errors,
        "spec.routes[1]",
        "protects the same route as `a` (line 9)",
    );
    assert_one(
        &errors,
        "spec.addresses[1]",
        "protects the same address as `d` (line 13)",
    );
    assert_eq!(errors.len(), 3, "{}", format_invalid(&errors));
}

#[test]
fn type_specific_rules() {
    let errors = invalid(concat!(
        "spec:\n  rules:\n",
        "    - {name: a, priority: 1, action: prohibit, table: 7}\n",
        "    - {name: b, priority: 1, fwmask: 0xff, table: 7}\n",
        "    - {name: c, priority: 1, action: goto, table: 7}\n",
        "  routes:\n",
        "    - {name: d, destination: default, type: blackhole, gateway: 10.0.0.1, device: eth0}\n",
        "    - {name: e, destination: default, type: local, gateway: 10.0.0.1}\n",
        "    - {name: f, destination: default, device: eth0, onlink: true}\n",
        "    - {name: g, destination: default}\n",
        "    - {name: h, destination: default, type: anycast, gateway: 10.0.0.1, onlink: yes}\n",
    ));
    assert_one(
        &errors,
        "spec.rules[0].table",
        "a `prohibit` rule looks up no table",
    );
    assert_one(&errors, "spec.rules[1].fwmask", "needs `fwmark`");
    assert_one(&errors, "spec.rules[2].action", "unknown action `goto`");
    assert_one(
        &errors,
        "spec.routes[0].gateway",
        "blackhole routes cannot have a gateway",
    );
    assert_one(
        &errors,
        "spec.routes[0].device",
        "blackhole routes cannot have a device",
    );
    assert_one(
        &errors,
        "spec.routes[1].gateway",
        "local routes cannot have a gateway",
    );
    assert_one(
        &errors,
        "spec.routes[1].device",
        "local routes need a device",
    );
    assert_one(&errors, "spec.routes[2].onlink", "needs a `gateway`");
    assert_one(&errors, "spec.routes[3]", "needs a `gateway` or a `device`");
    assert_one(&errors, "spec.routes[4].type", "unknown type `anycast`");
    assert_one(&errors, "spec.routes[4].onlink", "not a boolean");
    assert_eq!(errors.len(), 11, "{}", format_invalid(&errors));
}

#[test]
fn names_interfaces_modes_and_resync() {
    let errors = invalid(concat!(
        "spec:\n  mode: repair\n  resync: 2d\n  rules:\n",
        "    - {name: 'a b', priority: 1, iif: 'eth0/1', oif: abcdefghijklmnop, table: 7, mode: watch}\n",
        "  addresses:\n",
        "    - {name: x, device: '..', address: 10.0.0.1/8}\n",
    ));
    assert_one(&errors, "spec.mode", "unknown mode `repair`");
    assert_one(&errors, "spec.resync", "not a duration");
    assert_one(&errors, "spec.rules[0].name", "not a valid name");
    assert_one(&errors, "spec.rules[0].iif", "not a valid interface name");
    assert_one(&errors, "spec.rules[0].oif", "longer than 15 bytes");
    assert_one(&errors, "spec.rules[0].mode", "unknown mode `watch`");
    assert_one(&errors, "spec.addresses[0].device", "reserved");
    assert_eq!(errors.len(), 7, "{}", format_invalid(&errors));

    let errors = invalid("spec:\n  resync: 25h\n");
    assert_one(&errors, "spec.resync", "at most 24h");
}

#[test]
fn errors_are_sorted_one_per_line() {
    let err = parse_body(concat!(
        "spec:\n  routes:\n",
        "    - {name: r, destination: nowhere, device: eth0}\n",
        "  mode: sometimes\n",
    ))
    .unwrap_err();
    assert_eq!(
        err.to_string(),
        "test.yaml:5:30: spec.routes[0].destination: `nowhere` is not an IPv4 or IPv6 address (use a prefix, an address or `default`)\n\
         test.yaml:6:9: spec.mode: unknown mode `sometimes`: use enforce or observe"
    );
}

#[test]
fn structural_errors_name_position_and_path() {
    let err = parse_body("spec:\n  rules:\n    - name: a\n      tabel: 7\n").unwrap_err();
    let ConfigError::Syntax {
        line, column, path, ..
    } = &err
    else {
        panic!("{err:?}");
    };
    assert_eq!(
        (*line, *column, path.as_deref()),
        (6, 7, Some("spec.rules[0].tabel"))
    );
    assert!(
        err.to_string().starts_with(
            "test.yaml:6:7: spec.rules[0].tabel: unknown field `tabel`, expected one of"
        ),
        "{err}"
    );

    let err = parse_body("spec:\n  rules:\n    - name: [a]\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("test.yaml:5:13: spec.rules[0].name: "),
        "{err}"
    );

    let err = parse_body("spec:\n  rules: 5\n").unwrap_err();
    assert!(
        err.to_string().starts_with("test.yaml:4:10: spec.rules: "),
        "{err}"
    );

    let err = parse_body("spec:\n  rules:\n    - {name: a, table: 7, table: 8}\n").unwrap_err();
    assert!(
        err.to_string()
            .starts_with("test.yaml:5:27: spec.rules[0].table: duplicate key `table`"),
        "{err}"
    );

    let err = parse_body(&format!("---\n{HEADER}")).unwrap_err();
    assert!(
        err.to_string().contains("more than one YAML document"),
        "{err}"
    );

    let err = parse_body("spec:\n  rules:\n    - name: |\n        a\n").unwrap_err();
    assert!(
        err.to_string().contains("`a\\n` contains a line break"),
        "{err}"
    );

    let err = parse("t.yaml", "a: [b\n").unwrap_err();
    assert!(
        matches!(err, ConfigError::Syntax { path: None, .. }),
        "{err:?}"
    );
    assert!(err.to_string().starts_with("t.yaml:1:"), "{err}");
}

#[test]
fn empty_and_unreadable_files() {
    for text in [
        "",
        "\n\n",
        "  # nothing here\n# still nothing\n",
        "\u{feff}",
    ] {
        let err = parse("e.yaml", text).unwrap_err();
        assert!(
            matches!(err, ConfigError::Empty { .. }),
            "{text:?}: {err:?}"
        );
        assert!(
            err.to_string().starts_with("e.yaml: the file is empty"),
            "{err}"
        );
    }
    let missing = configs_dir().join("does-not-exist.yaml");
    let err = load(&missing).unwrap_err();
    assert!(matches!(err, ConfigError::Read { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains("does-not-exist.yaml: cannot read the file: "),
        "{err}"
    );
}

/// Every file in `tests/configs/invalid` must be refused with the error its first line announces:
///
/// ```yaml
/// # expect: <line>:<field-substring>:<message-substring>
/// ```
///
/// The error's text must contain the file's path, `:<line>:`, the field substring and the message
/// substring. Line `0` means the error has no position (only an empty file): then only the path
/// and the substrings are checked. The field substring may be empty (`# expect: 0::empty`); the
/// message substring may itself contain `:`.
#[test]
fn invalid_fixtures_fail_as_announced() {
    let dir = configs_dir().join("invalid");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("tests/configs/invalid exists")
        .map(|entry| entry.expect("readable directory entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 12, "fixtures missing: {files:?}");
    for path in files {
        let text = std::fs::read_to_string(&path).expect("readable fixture");
        let expect = text
            .lines()
            .next()
            .and_then(|l| l.strip_prefix("# expect: "))
            .unwrap_or_else(|| panic!("{}: first line must be `# expect: …`", path.display()));
        let mut parts = expect.splitn(3, ':');
        let (Some(line), Some(field), Some(message)) = (parts.next(), parts.next(), parts.next())
        else {
            panic!("{}: malformed expectation `{expect}`", path.display());
        };
        let line: u64 = line.parse().expect("expectation line is a number");

        let err = match load(&path) {
            Ok(_) => panic!(
                "{}: accepted, but it is meant to be invalid",
                path.display()
            ),
            Err(e) => e.to_string(),
        };
        let file = path.display().to_string();
        assert!(
            err.contains(&file),
            "{file}: error does not name the file:\n{err}"
        );
        if line != 0 {
            assert!(
                err.contains(&format!(":{line}:")),
                "{file}: want line {line}:\n{err}"
            );
        }
        assert!(err.contains(field), "{file}: want field `{field}`:\n{err}");
        assert!(err.contains(message), "{file}: want `{message}`:\n{err}");
    }
}

mod netfilter {
    use super::*;
    use crate::netfilter::model::{Content, Member, Position, SetType, Table};

    const FLANNEL: &str = r#"spec:
  pollInterval: 500ms
  chains:
    - name: flannel-postrtg
      table: nat
      chain: FLANNEL-POSTRTG
      rules:
        - -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
        - -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
      jumps:
        - chain: POSTROUTING
          rule: -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
          position: first
    - name: v6-forward
      family: ipv6
      table: filter
      chain: FORWARD
      content: contains
      mode: observe
      rules: ["-s fd00::/64 -j ACCEPT"]
  ipsets:
    - name: inet6:kube-router-svip
      type: hash:ip
      family: ipv6
      members: ["fd00::1"]
      forbidden: ["fd00::53", "fd00:96::/112"]
    - name: svc-ports
      type: hash:net,port
      membership: exact
      members: ["10.0.0.0/24,80", "10.1.0.1,udp:53"]
"#;

    #[test]
    fn chains_and_sets_parse() {
        let c = ok(FLANNEL);
        assert_eq!(c.poll_interval, Duration::from_millis(500));
        let [fl, fwd] = &c.chains[..] else {
            panic!("{:?}", c.chains)
        };
        assert_eq!(fl.key.table, Table::Nat);
        assert_eq!(fl.key.family, Family::Ipv4);
        assert_eq!(fl.content, Content::Exact, "chains default to exact");
        assert_eq!(fl.rules.len(), 2);
        assert_eq!(fl.rules[0].tokens()[7], "flanneld masq");
        assert_eq!(fl.jumps[0].position, Position::First);
        assert_eq!(fl.jumps[0].rule.target(), Some("FLANNEL-POSTRTG"));
        assert_eq!(
            (fwd.content, fwd.mode, fwd.key.family),
            (Content::Contains, Mode::Observe, Family::Ipv6)
        );
        let [svip, ports] = &c.ipsets[..] else {
            panic!("{:?}", c.ipsets)
        };
        assert_eq!(svip.set, "inet6:kube-router-svip");
        assert_eq!(
            svip.membership,
            Content::Contains,
            "sets default to contains"
        );
        assert_eq!(svip.forbidden.len(), 2);
        assert_eq!(ports.kind, SetType::HashNetPort);
        assert_eq!(
            ports.members[0],
            Member::parse("10.0.0.0/24,tcp:80").unwrap()
        );
        assert_eq!(
            ok("spec: {}").poll_interval,
            Duration::from_secs(1),
            "default 1s"
        );
    }

    #[test]
    fn each_injection_gets_its_own_message() {
        let chain = |rule: &str| {
            format!("spec:\n  chains:\n    - name: c\n      table: filter\n      chain: MINE\n      rules:\n        - {rule}\n")
        };
        for (rule, message) in [
            (r#""-j ACCEPT\n-F""#, "line break"),
            ("COMMIT", "`COMMIT` ends a restore transaction"),
            (r#""*filter""#, "`*filter` is a table header"),
            ("-F MINE", "`-F` flushes a chain"),
            ("-X INPUT", "`-X` deletes a chain"),
            ("-Z", "`-Z` zeroes counters"),
            ("-P INPUT DROP", "`-P` sets a builtin chain's policy"),
            (r#"":MINE - [0:0]""#, "chain declaration"),
            ("-j ACCEPT -t nat", "switches the table"),
        ] {
            let errors = invalid(&chain(rule));
            assert_one(&errors, "spec.chains[0].rules[0]", message);
        }
    }

    #[test]
    fn leading_negation_must_be_quoted() {
        let body = "spec:\n  chains:\n    - name: c\n      table: filter\n      chain: MINE\n      rules:\n        - ! -s 10.0.0.0/8 -j DROP\n        - \"! -s 10.0.0.0/8 -j ACCEPT\"\n      jumps:\n        - {chain: INPUT, rule: ! -i lo -j MINE}\n";
        let errors = invalid(body);
        assert_one(&errors, "spec.chains[0].rules[0]", "YAML reads as a tag");
        assert_one(
            &errors,
            "spec.chains[0].jumps[0].rule",
            "YAML reads as a tag",
        );
        assert_eq!(errors.len(), 2, "{}", format_invalid(&errors));
    }

    #[test]
    fn chain_level_checks() {
        let errors = invalid(
            "spec:\n  pollInterval: 10ms\n  chains:\n    - name: a\n      table: security\n      chain: X\n    - name: b\n      table: filter\n      chain: INPUT\n      rules: [-j ACCEPT]\n    - name: c\n      table: filter\n      chain: DROP\n    - name: d\n      table: filter\n      chain: MINE\n      rules: [-j ACCEPT]\n      jumps:\n        - chain: MINE\n          rule: -j MINE\n        - chain: NOPE\n          rule: -j MINE\n          position: last\n",
        );
        assert_one(&errors, "spec.pollInterval", "between 100ms and 1h");
        assert_one(&errors, "spec.chains[0].table", "unknown table `security`");
        assert_one(
            &errors,
            "spec.chains[1].chain",
            "never flushes builtin chains",
        );
        assert_one(&errors, "spec.chains[2].chain", "built-in target");
        let spare = invalid(
            "spec:\n  chains:\n    - name: s\n      table: nat\n      chain: NETWARDEN-SPARE-0A1B2C3D\n",
        );
        assert_one(&spare, "spec.chains[0].chain", "netwarden's own spares");
        assert_one(
            &errors,
            "spec.chains[3].jumps[0].chain",
            "not in the protected chain itself",
        );
        assert_one(
            &errors,
            "spec.chains[3].jumps[1].chain",
            "neither a builtin chain",
        );
        assert_one(
            &errors,
            "spec.chains[3].jumps[1].position",
            "unknown position `last`",
        );
    }

    #[test]
    fn jump_into_an_exact_chain_would_fight_it() {
        let errors = invalid(
            "spec:\n  chains:\n    - name: a\n      table: nat\n      chain: A\n      rules: [-j RETURN]\n    - name: b\n      table: nat\n      chain: B\n      jumps:\n        - chain: A\n          rule: -j B\n",
        );
        assert_one(
            &errors,
            "spec.chains[1].jumps[0].chain",
            "protected with content: exact by `a`",
        );
        // Into a `contains` chain it is fine.
        ok("spec:\n  chains:\n    - name: a\n      table: nat\n      chain: A\n      content: contains\n    - name: b\n      table: nat\n      chain: B\n      jumps:\n        - chain: A\n          rule: -j B\n");
    }

    #[test]
    fn duplicate_chains_and_set_checks() {
        let errors = invalid(
            "spec:\n  chains:\n    - name: a\n      table: nat\n      chain: A\n    - name: b\n      table: nat\n      chain: A\n  ipsets:\n    - name: a\n      type: hash:ip\n    - name: s\n      type: list:set\n    - name: t\n      type: hash:ip\n      members: [10.0.0.0/24, \"fd00::1\", \"10.0.0.1,80\"]\n      forbidden: [\"10.96.0.0/12\", \"fd00::1\"]\n",
        );
        assert_one(&errors, "spec.chains[1]", "protects the same chain as `a`");
        assert_one(&errors, "spec.ipsets[0].name", "already used");
        assert_one(
            &errors,
            "spec.ipsets[1].type",
            "unsupported set type `list:set`",
        );
        assert_one(&errors, "spec.ipsets[2].members[0]", "is a prefix");
        assert_one(
            &errors,
            "spec.ipsets[2].members[1]",
            "is ipv6, but the set is ipv4",
        );
        assert_one(&errors, "spec.ipsets[2].members[2]", "has a port");
        assert_one(
            &errors,
            "spec.ipsets[2].forbidden[1]",
            "is ipv6, but the set is ipv4",
        );
    }
}

#[test]
fn adopt_selectors_are_parsed() {
    let c = ok("spec:
  adopt:
    - name: vpc-cni
      rules:
        family: ipv4
        priority: 512-1536
        table: 2-main
        protocols: [boot, 4]
      owners: [aws-k8s-agent, aws-cni]
      unknownActor: forget
    - name: kube-router
      mode: observe
      rules:
        priority: 32000
      owners: [kube-router]
");
    let [vpc, kr] = &c.adopt[..] else {
        panic!("two selectors expected: {:?}", c.adopt);
    };
    assert_eq!(vpc.name, "vpc-cni");
    assert_eq!(vpc.rules.as_ref().unwrap().family, Some(Family::Ipv4));
    assert_eq!(vpc.rules.as_ref().unwrap().priority, Some((512, 1536)));
    assert_eq!(vpc.rules.as_ref().unwrap().table, Some((2, 254)));
    assert_eq!(vpc.rules.as_ref().unwrap().protocols, vec![3, 4]);
    assert_eq!(vpc.owners, vec!["aws-k8s-agent", "aws-cni"]);
    assert_eq!(vpc.unknown_actor, crate::adopt::UnknownActor::Forget);
    assert_eq!(vpc.mode, Mode::Enforce);
    assert_eq!(kr.rules.as_ref().unwrap().priority, Some((32000, 32000)));
    assert_eq!(kr.unknown_actor, crate::adopt::UnknownActor::Restore);
    assert_eq!(kr.mode, Mode::Observe);
}

#[test]
fn adopt_selectors_are_validated() {
    let errors = invalid(
        "spec:
  rules:
    - name: dup
      priority: 100
      from: 10.0.0.0/8
      table: 100
  adopt:
    - name: dup
      rules:
        priority: 900-100
        table: 0
        protocols: [nonsense]
      owners: [a-very-long-process-name]
      unknownActor: keep
    - rules: {}
    - name: no-rules
      owners: [x]
",
    );
    assert_one(&errors, "spec.adopt[0].name", "already used");
    assert_one(&errors, "spec.adopt[0].rules.priority", "empty range");
    assert_one(&errors, "spec.adopt[0].rules.table", "out of range");
    assert_one(
        &errors,
        "spec.adopt[0].rules.protocols[0]",
        "unknown protocol",
    );
    assert_one(&errors, "spec.adopt[0].owners[0]", "not a command name");
    assert_one(&errors, "spec.adopt[0].unknownActor", "restore or forget");
    assert_one(&errors, "spec.adopt[1].name", "is required");
    assert_one(&errors, "spec.adopt[1].owners", "is required");
    assert_one(&errors, "spec.adopt[1].rules", "selects every rule");
    assert_one(&errors, "spec.adopt[2]", "adopts nothing");
    let line = errors
        .iter()
        .find(|e| e.field == "spec.adopt[0].unknownActor")
        .unwrap()
        .line;
    assert_eq!(line, 16, "positions are those of the values");
}

#[test]
fn adopt_route_selectors() {
    let c = ok("spec:
  adopt:
    - name: eni-routes
      routes:
        table: 2-100
        protocols: [boot]
        device: eni*
      owners: [aws-k8s-agent]
");
    let r = c.adopt[0].routes.as_ref().unwrap();
    assert_eq!(r.table, Some((2, 100)));
    assert_eq!(r.protocols, vec![3]);
    assert_eq!(r.device.as_deref(), Some("eni*"));
    assert!(c.adopt[0].rules.is_none());
    let errors = invalid(
        "spec:
  adopt:
    - name: all-routes
      routes:
        device: '*'
      owners: [x]
",
    );
    assert_one(&errors, "spec.adopt[0].routes.table", "is required");
    assert_one(&errors, "spec.adopt[0].routes.device", "every device");
}

#[test]
fn adopt_rejects_unknown_keys() {
    match parse_body("spec:\n  adopt:\n    - name: a\n      rules:\n        prio: 5\n") {
        Err(ConfigError::Syntax { .. }) => {}
        other => panic!("expected a syntax error, got {other:?}"),
    }
}

#[test]
fn adopt_chain_and_set_selectors() {
    use crate::netfilter::model::Table;
    let c = ok("spec:
  adopt:
    - name: kube-router
      chains:
        table: nat
        names: [KUBE-ROUTER-*, KUBE-NWPLCY-DEFAULT]
      ipsets:
        names: [kube-router-*]
      owners: [kube-router]
    - name: v6-everywhere
      chains:
        family: ipv6
        names: [CALI-*]
      owners: [calico-node]
");
    let kr = c.adopt[0].chains.as_ref().unwrap();
    assert_eq!(
        kr.family,
        Family::Ipv4,
        "ipv4 unless told, as in spec.chains"
    );
    assert_eq!(kr.tables, vec![Table::Nat]);
    assert_eq!(kr.names, vec!["KUBE-ROUTER-*", "KUBE-NWPLCY-DEFAULT"]);
    assert_eq!(
        c.adopt[0].ipsets.as_ref().unwrap().names,
        vec!["kube-router-*"]
    );
    let v6 = c.adopt[1].chains.as_ref().unwrap();
    assert_eq!(
        (v6.family, v6.tables.len()),
        (Family::Ipv6, 4),
        "all four tables"
    );

    // Names reach iptables-restore / ipset restore input: checked like configured ones.
    let errors = invalid(
        "spec:
  adopt:
    - name: bad
      chains:
        table: security
        names: ['KUBE ROUTER*', '*', 'A*B', ACCEPT]
      ipsets:
        names: [\"kube-router-\\nflush*\"]
      owners: [kube-router]
    - name: empty
      chains: {}
      ipsets:
        names: []
      owners: [x]
",
    );
    assert_one(&errors, "spec.adopt[0].chains.table", "unknown table");
    assert_one(
        &errors,
        "spec.adopt[0].chains.names[0]",
        "not a valid chain name",
    );
    assert_one(
        &errors,
        "spec.adopt[0].chains.names[1]",
        "would adopt every one",
    );
    assert_one(
        &errors,
        "spec.adopt[0].chains.names[2]",
        "not a valid chain name",
    );
    assert_one(&errors, "spec.adopt[0].chains.names[3]", "built-in target");
    assert_one(&errors, "spec.adopt[0].ipsets.names[0]", "line break");
    assert_one(&errors, "spec.adopt[1].chains.names", "is required");
    assert_one(&errors, "spec.adopt[1].ipsets.names", "is required");
}
