//! Protected iptables chains and ipsets against the real kernel: real iptables (nft and legacy),
//! ip6tables and ipset run with `ip netns exec` inside a namespace of the test's own.

mod common;
use common::chains::*;
use common::*;

fn members(ns: &Sandbox, set: &str) -> Vec<String> {
    let (ok, text) = exec(ns, &["ipset", "save", set]);
    if !ok {
        return Vec::new();
    }
    let mut m: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("add {set} ")))
        .map(str::to_owned)
        .collect();
    m.sort();
    m
}

/// The flannel incident: jump deleted, chain flushed and deleted, with the given iptables.
fn flannel_comes_back(backend: &str) {
    let (iptables, save, ip6save) = match backend {
        "nft" => ("iptables-nft", "iptables-nft-save", "ip6tables-nft-save"),
        _ => (
            "iptables-legacy",
            "iptables-legacy-save",
            "ip6tables-legacy-save",
        ),
    };
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!("  pollInterval: 200ms\n{FLANNEL_SPEC}"),
    );
    let mut agent = Agent::start_with(&ns, &cfg, &["--iptables-backend", backend]);
    agent.wait_log_all(&["chains and sets in sync", &format!("backend=\"{backend}\"")]);
    let nat = saved(&ns, save, "nat");
    assert_eq!(
        chain_lines(&nat, "FLANNEL-POSTRTG"),
        flannel_lines(),
        "initial sync"
    );
    assert_eq!(chain_lines(&nat, "POSTROUTING"), vec![JUMP.to_owned()]);

    must(
        &ns,
        &[
            iptables,
            "-t",
            "nat",
            "-D",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    // The agent may put the jump back before these run: then the delete fails (chain in use),
    // which is the point.
    let _ = exec(&ns, &[iptables, "-t", "nat", "-F", "FLANNEL-POSTRTG"]);
    let _ = exec(&ns, &[iptables, "-t", "nat", "-X", "FLANNEL-POSTRTG"]);
    wait_until("chain, rules and jump back", || {
        let nat = saved(&ns, save, "nat");
        chain_lines(&nat, "FLANNEL-POSTRTG") == flannel_lines()
            && chain_lines(&nat, "POSTROUTING") == vec![JUMP.to_owned()]
    });
    if backend == "nft" {
        // nf_tables names the committing process: the repair says who removed the chain.
        let line = agent.wait_log_all(&["kind=\"chain\"", "restored"]);
        assert!(line.contains("actor=\"iptables-nft\""), "{line}");
        let (_, text) = netwarden::telemetry::http::get(
            &agent.http(),
            "/metrics",
            None,
            std::time::Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            text.lines().any(|l| l.starts_with(
                "netwarden_drift_detected_total{kind=\"chain\",actor=\"iptables-nft\"}"
            )),
            "{text}"
        );
    }

    // IPv6 too, through ip6tables.
    let ip6tables = iptables.replace("iptables", "ip6tables");
    must(&ns, &[&ip6tables, "-D", "FORWARD", "-j", "NW-FORWARD6"]);
    must(&ns, &[&ip6tables, "-F", "NW-FORWARD6"]);
    let _ = exec(&ns, &[&ip6tables, "-X", "NW-FORWARD6"]);
    wait_until("ipv6 chain and jump back", || {
        let f = saved(&ns, ip6save, "filter");
        f.contains(&"-A NW-FORWARD6 -s fd00:10:244::/56 -j ACCEPT".to_owned())
            && f.contains(&"-A FORWARD -j NW-FORWARD6".to_owned())
    });
    let out = check(&ns, &cfg, &["--iptables-backend", backend]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn flannel_chain_rules_and_jump_come_back_nft() {
    flannel_comes_back("nft");
}

#[test]
fn flannel_chain_rules_and_jump_come_back_legacy() {
    flannel_comes_back("legacy");
}

/// portmap's shape: the protected chain's rule jumps to a chain the owner deletes with it. The
/// repair fails until the owner creates that chain again, which is no change of a watched chain:
/// the agent retries by itself.
#[test]
fn a_repair_that_failed_for_a_missing_chain_is_retried_by_itself() {
    let ns = sandbox();
    must(&ns, &["iptables-nft", "-t", "nat", "-N", "NWT-DN"]);
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"  chains:
    - name: hostport
      table: nat
      chain: NWT-DNAT
      rules:
        - -p tcp -m comment --comment "dnat" -m multiport --dports 8080 -j NWT-DN
"#;
    let mut agent = Agent::start_full(
        &ns,
        &config(dir.path(), spec),
        &["--iptables-backend", "nft"],
        &[],
    );
    agent.wait_log("chains and sets in sync");
    let rule = || chain_lines(&saved(&ns, "iptables-nft-save", "nat"), "NWT-DNAT");
    assert_eq!(rule().len(), 1);
    must_feed(
        &ns,
        &["iptables-nft-restore", "--noflush"],
        "*nat\n-F NWT-DNAT\n-X NWT-DN\nCOMMIT\n",
    );
    agent.wait_log_all(&["repair failed", "name=hostport"]);
    must(&ns, &["iptables-nft", "-t", "nat", "-N", "NWT-DN"]);
    wait_until("the rule back once its target chain is", || {
        rule().len() == 1
    });
}

#[test]
fn exact_chain_keeps_rule_order_and_loses_strangers() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&ns, &config(dir.path(), FLANNEL_SPEC));
    let in_place = || {
        chain_lines(&saved(&ns, "iptables-nft-save", "nat"), "FLANNEL-POSTRTG") == flannel_lines()
    };

    must(
        &ns,
        &["iptables", "-t", "nat", "-D", "FLANNEL-POSTRTG", "2"],
    );
    wait_until("middle rule back in position 2", in_place);

    must(
        &ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-I",
            "FLANNEL-POSTRTG",
            "1",
            "-s",
            "10.9.9.9",
            "-j",
            "ACCEPT",
        ],
    );
    wait_until("inserted rule removed", in_place);
    must(
        &ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "-j",
            "ACCEPT",
        ],
    );
    wait_until("appended rule removed", in_place);

    // A foreign rule in POSTROUTING is left alone, but the jump goes back in front of it.
    must(&ns, &["iptables", "-t", "nat", "-D", "POSTROUTING", "1"]);
    must(
        &ns,
        &[
            "iptables",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-j",
            "MASQUERADE",
        ],
    );
    wait_until("jump first again, foreign rule kept", || {
        chain_lines(&saved(&ns, "iptables-nft-save", "nat"), "POSTROUTING")
            == vec![JUMP.to_owned(), "-A POSTROUTING -j MASQUERADE".to_owned()]
    });
}

#[test]
fn contains_chain_gets_missing_rules_and_keeps_others() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    must(&ns, &["iptables", "-N", "KUBE-ROUTER-INPUT"]);
    must(
        &ns,
        &[
            "iptables",
            "-A",
            "KUBE-ROUTER-INPUT",
            "-s",
            "10.1.1.1/32",
            "-j",
            "DROP",
        ],
    );
    let _agent = Agent::start(
        &ns,
        &config(
            dir.path(),
            "  chains:\n    - name: kr-input\n      table: filter\n      chain: KUBE-ROUTER-INPUT\n      content: contains\n      rules: [\"-d 10.96.0.1/32 -j ACCEPT\"]\n      jumps:\n        - {chain: INPUT, rule: -j KUBE-ROUTER-INPUT, position: first}\n",
        ),
    );
    let want = vec![
        "-A INPUT -j KUBE-ROUTER-INPUT".to_owned(),
        "-A KUBE-ROUTER-INPUT -s 10.1.1.1/32 -j DROP".to_owned(),
        "-A KUBE-ROUTER-INPUT -d 10.96.0.1/32 -j ACCEPT".to_owned(),
    ];
    assert_eq!(
        saved(&ns, "iptables-nft-save", "filter"),
        want,
        "appended, foreign rule kept"
    );
    must(
        &ns,
        &[
            "iptables",
            "-D",
            "KUBE-ROUTER-INPUT",
            "-d",
            "10.96.0.1/32",
            "-j",
            "ACCEPT",
        ],
    );
    wait_until("rule back", || {
        saved(&ns, "iptables-nft-save", "filter") == want
    });
}

const SET_SPEC: &str = r#"  pollInterval: 200ms
  ipsets:
    - name: kube-router-svip
      type: hash:ip
      members: [10.0.0.1, 10.0.0.2, 10.0.0.3]
      forbidden: [10.96.0.1, 192.168.0.0/24]
    - name: svc-ports
      type: hash:net,port
      family: ipv6
      membership: exact
      members: ["fd00::/64,tcp:443", "fd00:1::1,udp:53"]
"#;

#[test]
fn ipset_member_and_destroyed_set_come_back_within_the_poll_interval() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let _agent = Agent::start(&ns, &config(dir.path(), SET_SPEC));
    let svip = vec![
        "10.0.0.1".to_owned(),
        "10.0.0.2".to_owned(),
        "10.0.0.3".to_owned(),
    ];
    assert_eq!(members(&ns, "kube-router-svip"), svip);
    assert_eq!(
        members(&ns, "svc-ports"),
        vec![
            "fd00:1::1,udp:53".to_owned(),
            "fd00::/64,tcp:443".to_owned()
        ]
    );

    must(&ns, &["ipset", "del", "kube-router-svip", "10.0.0.2"]);
    let t = std::time::Instant::now();
    wait_until("member back", || members(&ns, "kube-router-svip") == svip);
    assert!(
        t.elapsed() < std::time::Duration::from_secs(2),
        "took {:?}",
        t.elapsed()
    );

    // Swapped for a stranger: same size, so only a full read notices; exact removes it.
    must(&ns, &["ipset", "del", "svc-ports", "fd00:1::1,udp:53"]);
    must(&ns, &["ipset", "add", "svc-ports", "fd00:2::/64,tcp:80"]);
    wait_until("exact set restored", || {
        members(&ns, "svc-ports")
            == vec![
                "fd00:1::1,udp:53".to_owned(),
                "fd00::/64,tcp:443".to_owned(),
            ]
    });

    must(&ns, &["ipset", "destroy", "kube-router-svip"]);
    wait_until("set recreated with its members", || {
        members(&ns, "kube-router-svip") == svip
    });
}

#[test]
fn forbidden_member_is_removed_logged_and_counted() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(&ns, &config(dir.path(), SET_SPEC));
    // The kube-router incident: the API server's address lands in the set.
    must(&ns, &["ipset", "add", "kube-router-svip", "10.96.0.1"]);
    let line = agent.wait_log_all(&[
        "forbidden member in protected set",
        "member=10.96.0.1",
        "action=\"removed\"",
    ]);
    assert!(line.contains("forbidden_total=1"), "{line}");
    wait_until("forbidden member gone", || {
        !members(&ns, "kube-router-svip").contains(&"10.96.0.1".to_owned())
    });
    // Inside a forbidden prefix counts too; and the set's own members stay.
    must(&ns, &["ipset", "add", "kube-router-svip", "192.168.0.7"]);
    let line = agent.wait_log_all(&["forbidden member in protected set", "member=192.168.0.7"]);
    assert!(line.contains("forbidden_total=2"), "{line}");
    wait_until("second forbidden member gone", || {
        members(&ns, "kube-router-svip").len() == 3
    });
    // Counted where Prometheus sees it, with the set's repairs.
    let (code, text) = netwarden::telemetry::http::get(
        &agent.http(),
        "/metrics",
        None,
        std::time::Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(code, 200);
    assert!(
        text.lines()
            .any(|l| l == "netwarden_forbidden_members_total{result=\"removed\"} 2"),
        "{text}"
    );
    let repairs = text
        .lines()
        .find(|l| l.starts_with("netwarden_repairs_total{kind=\"ipset\",result=\"applied\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok());
    assert!(repairs.is_some_and(|n| n >= 2), "{text}");
}

#[test]
fn forbidden_member_in_observe_mode_is_only_reported() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = "  pollInterval: 200ms\n  ipsets:\n    - name: kube-router-svip\n      mode: observe\n      type: hash:ip\n      members: [10.0.0.1]\n      forbidden: [10.96.0.1]\n";
    must(&ns, &["ipset", "create", "kube-router-svip", "hash:ip"]);
    must(&ns, &["ipset", "add", "kube-router-svip", "10.0.0.1"]);
    let cfg = config(dir.path(), spec);
    let mut agent = Agent::start(&ns, &cfg);
    must(&ns, &["ipset", "add", "kube-router-svip", "10.96.0.1"]);
    let line = agent.wait_log_all(&["forbidden member in protected set", "member=10.96.0.1"]);
    assert!(
        line.contains("action=\"reported\"") && line.contains("forbidden_total=1"),
        "{line}"
    );
    // Several polls later: still there, not reported again.
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert!(members(&ns, "kube-router-svip").contains(&"10.96.0.1".to_owned()));
    let reports = agent
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("forbidden member in protected set"))
        .count();
    assert_eq!(reports, 1);
    let out = check(&ns, &cfg, &["--output", "json"]);
    assert_eq!(out.status.code(), Some(1));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["inSync"], false);
    let set = &json["drift"][0];
    assert_eq!(
        (&set["kind"], &set["state"]),
        (&"ipset".into(), &"different".into())
    );
    assert_eq!(set["findings"][0]["finding"], "forbidden");
    assert_eq!(set["findings"][0]["members"][0], "10.96.0.1");
}

#[test]
fn injection_attempts_are_refused_and_change_nothing() {
    let ns = sandbox();
    let dir = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/configs/invalid");
    let before = (
        saved(&ns, "iptables-nft-save", "filter"),
        saved(&ns, "iptables-nft-save", "nat"),
        exec(&ns, &["ipset", "save"]).1,
    );
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        if !(name.starts_with("chain-") || name.starts_with("ipset-")) {
            continue;
        }
        seen += 1;
        let out = netwarden_in(&ns, &["run", "--config", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains(&name) && stderr.contains("spec."),
            "{name}: {stderr}"
        );
    }
    assert!(seen >= 8, "fixtures missing");
    let after = (
        saved(&ns, "iptables-nft-save", "filter"),
        saved(&ns, "iptables-nft-save", "nat"),
        exec(&ns, &["ipset", "save"]).1,
    );
    assert_eq!(before, after);
}

#[test]
fn sighup_reloads_chains_and_sets_too() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), "  pollInterval: 200ms\n  rules: []\n");
    let mut agent = Agent::start(&ns, &cfg);
    // Added to the file while the agent runs: protected from the reload on, not before.
    config(dir.path(), SET_SPEC);
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    agent.wait_log("config reloaded");
    let svip = vec![
        "10.0.0.1".to_owned(),
        "10.0.0.2".to_owned(),
        "10.0.0.3".to_owned(),
    ];
    wait_until("the reloaded set created", || {
        members(&ns, "kube-router-svip") == svip
    });
    must(&ns, &["ipset", "destroy", "kube-router-svip"]);
    wait_until("the reloaded set recreated", || {
        members(&ns, "kube-router-svip") == svip
    });
}
