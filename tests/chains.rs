//! Protected iptables chains and ipsets against the real kernel: real iptables (nft and legacy),
//! ip6tables and ipset run with `ip netns exec` inside a namespace of the test's own.

mod common;
use common::*;
use std::collections::BTreeMap;

/// The `-A` lines of one table, as `iptables-save` prints them, without netwarden's spares (see `spares`).
fn saved(ns: &Sandbox, save: &str, table: &str) -> Vec<String> {
    must(ns, &[save, "-t", table])
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.starts_with("-A NETWARDEN-SPARE-"))
        .map(str::to_owned)
        .collect()
}

/// netwarden's spares in a table: chain name, then its rules as `iptables-save` prints them
/// with the spare's name replaced by `SPARE`.
fn spares(ns: &Sandbox, table: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in must(ns, &["iptables-nft-save", "-t", table]).lines() {
        if let Some(chain) = l.strip_prefix(":NETWARDEN-SPARE-") {
            let name = chain.split(' ').next().unwrap_or_default();
            out.entry(format!("NETWARDEN-SPARE-{name}")).or_default();
        }
        if let Some(rest) = l.strip_prefix("-A NETWARDEN-SPARE-") {
            let (name, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(format!("NETWARDEN-SPARE-{name}"))
                .or_default()
                .push(format!("-A SPARE {rule}"));
        }
    }
    out
}

/// The handle nf_tables gave a chain (`nft -a`), if it exists.
fn chain_handle(ns: &Sandbox, chain: &str) -> Option<String> {
    let (ok, out) = exec(ns, &["nft", "-a", "list", "chain", "ip", "nat", chain]);
    if !ok {
        return None;
    }
    let head = out
        .lines()
        .find(|l| l.contains(&format!("chain {chain} ")))?;
    head.split("# handle ").nth(1).map(|h| h.trim().to_owned())
}

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

const FLANNEL_SPEC: &str = r#"  chains:
    - name: flannel-postrtg
      table: nat
      chain: FLANNEL-POSTRTG
      rules:
        - -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
        - -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
        - '! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN'
      jumps:
        - chain: POSTROUTING
          rule: -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
          position: first
    - name: v6-forward
      family: ipv6
      table: filter
      chain: NW-FORWARD6
      rules: ["-s fd00:10:244::/56 -j ACCEPT"]
      jumps:
        - chain: FORWARD
          rule: -j NW-FORWARD6
"#;

const JUMP: &str = r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#;

fn flannel_lines() -> Vec<String> {
    vec![
        r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
        r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#.to_owned(),
        r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
    ]
}

fn chain_lines(lines: &[String], chain: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with(&format!("-A {chain} ")))
        .cloned()
        .collect()
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

#[test]
fn a_chain_and_its_jump_deleted_in_one_transaction_come_back_from_the_image() {
    let ns = sandbox();
    // Someone else's rule in POSTROUTING: the jump must go back first, before it.
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.9.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), FLANNEL_SPEC);
    let debug = [("NETWARDEN_LOG_LEVEL", "debug")];
    let mut agent = Agent::start_full(&ns, &cfg, &["--iptables-backend", "nft"], &debug);
    agent.wait_log_all(&["image taken", "name=flannel-postrtg"]);
    agent.wait_log("chains and sets in sync");
    // The chain's rules hold xtables extensions (the comment, MASQUERADE): a spare is made, a
    // copy of the chain that nothing jumps to.
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let before = saved(&ns, "iptables-nft-save", "nat");
    assert_eq!(chain_lines(&before, "POSTROUTING")[0], JUMP);
    let spare_rules: Vec<String> = flannel_lines()
        .iter()
        .map(|l| l.replace("-A FLANNEL-POSTRTG ", "-A SPARE "))
        .collect();
    let made = spares(&ns, "nat");
    let (spare, rules) = made.first_key_value().expect("a spare");
    assert_eq!((made.len(), rules), (1, &spare_rules), "{made:?}");
    let spare_handle = chain_handle(&ns, spare).unwrap();

    // flannel's cleanup in one transaction: jump, rules and chain. Put back, as it was (the
    // jump first, the rules in order), by the responder at the deletion's NEWGEN, once the
    // guard has armed it: the spare renamed into the chain, the jump written again.
    agent.wait_log_all(&["images armed", "armed=2"]);
    must_feed(
        &ns,
        &["iptables-nft-restore", "--noflush"],
        "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n",
    );
    agent.wait_log_all(&["responder committed images", "Committed"]);
    let line = agent.wait_log_all(&["restored", "names=flannel-postrtg", "via=\"spare\""]);
    assert!(line.contains("what=chain missing"), "{line}");
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
    assert_eq!(
        chain_handle(&ns, "FLANNEL-POSTRTG").as_ref(),
        Some(&spare_handle),
        "the spare itself, renamed"
    );
    // flannel's own check of its jump still finds it.
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-C",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    // A new spare is made, under the same name.
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let again = spares(&ns, "nat");
    assert_eq!(again.get(spare), Some(&spare_rules), "{again:?}");
    assert_ne!(chain_handle(&ns, spare), Some(spare_handle));

    // Someone flushes the spare: it is made again, whole.
    must(&ns, &["iptables-nft", "-t", "nat", "-F", spare]);
    wait_until("the spare made again", || {
        spares(&ns, "nat").get(spare) == Some(&spare_rules)
    });

    // A stranger's rule in the exact chain: removed with iptables-restore, which drops the
    // image (the chain is what the guard wrote); verified in sync, a new one is taken.
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "-j",
            "RETURN",
        ],
    );
    agent.wait_log_all(&["restored", "names=flannel-postrtg", "via=\"restore\""]);
    agent.wait_log_all(&["image taken", "name=flannel-postrtg"]);
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);

    // Stopped, netwarden leaves no spare behind.
    assert!(agent.terminate(), "the agent stops on SIGTERM");
    assert_eq!(spares(&ns, "nat"), BTreeMap::new());
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
}

/// A chain whose match checks the protocol `-p` gave (multiport): the kernel's dump of the rule
/// does not say it, so the agent gives it back to the rule (or the kernel refuses the copy).
#[test]
fn a_chain_whose_match_checks_the_protocol_comes_back_from_its_spare() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"  chains:
    - name: hostports
      table: nat
      chain: HOSTPORTS
      rules:
        - -p tcp -m comment --comment "hostports" -m multiport --dports 80,443 -j DNAT --to-destination 10.88.0.5
        - '! -p udp -m comment --comment "hostports" -j RETURN'
      jumps:
        - chain: PREROUTING
          rule: -m comment --comment "hostports" -j HOSTPORTS
"#;
    let cfg = config(dir.path(), spec);
    let debug = [("NETWARDEN_LOG_LEVEL", "debug")];
    let mut agent = Agent::start_full(&ns, &cfg, &["--iptables-backend", "nft"], &debug);
    agent.wait_log_all(&["spare made", "name=hostports"]);
    let before = saved(&ns, "iptables-nft-save", "nat");
    assert_eq!(chain_lines(&before, "HOSTPORTS").len(), 2, "{before:?}");
    agent.wait_log_all(&["images armed", "armed=1"]);
    must_feed(
        &ns,
        &["iptables-nft-restore", "--noflush"],
        "*nat\n-D PREROUTING -m comment --comment \"hostports\" -j HOSTPORTS\n-F HOSTPORTS\n-X HOSTPORTS\nCOMMIT\n",
    );
    agent.wait_log_all(&["restored", "names=hostports", "via=\"spare\""]);
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
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

/// The shell block of docs/operator-guide.md that deletes spares by hand.
fn documented_spare_cleanup() -> String {
    let guide = include_str!("../docs/operator-guide.md");
    guide
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("NETWARDEN-SPARE-"))
        .expect("a cleanup block in the operator guide")
        .to_owned()
}

#[test]
fn a_killed_agents_spare_is_replaced_at_the_next_start_or_deleted_with_the_documented_commands() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), FLANNEL_SPEC);
    let debug = [("NETWARDEN_LOG_LEVEL", "debug")];
    let mut agent = Agent::start_full(&ns, &cfg, &["--iptables-backend", "nft"], &debug);
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let before = saved(&ns, "iptables-nft-save", "nat");
    let made = spares(&ns, "nat");
    assert_eq!(made.len(), 1, "{made:?}");
    let spare = made.keys().next().unwrap().clone();
    // Someone adds a rule to the spare the agent will leave behind.
    must(
        &ns,
        &["iptables-nft", "-t", "nat", "-A", &spare, "-j", "RETURN"],
    );
    let first = chain_handle(&ns, &spare).unwrap();
    // Killed (SIGKILL): nothing deletes its spare.
    drop(agent);
    assert_eq!(chain_handle(&ns, &spare), Some(first.clone()));
    // The next start replaces it with a copy of the chain again.
    let mut agent = Agent::start_full(&ns, &cfg, &["--iptables-backend", "nft"], &debug);
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    assert_eq!(
        spares(&ns, "nat"),
        made,
        "one, under the same name, a copy again"
    );
    assert_ne!(chain_handle(&ns, &spare), Some(first));
    drop(agent);
    // By hand, as the operator guide says: only the spare goes.
    must(&ns, &["sh", "-c", &documented_spare_cleanup()]);
    assert_eq!(spares(&ns, "nat"), BTreeMap::new());
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
    assert_eq!(
        chain_lines(&saved(&ns, "iptables-nft-save", "nat"), "FLANNEL-POSTRTG"),
        flannel_lines()
    );
}

/// Two agents on one node with different chains (the DaemonSet and a per-node agent): each
/// deletes only its own spares.
#[test]
fn an_agent_leaves_another_agents_spares_alone() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let debug = [("NETWARDEN_LOG_LEVEL", "debug")];
    let mut flannel = Agent::start_full(
        &ns,
        &config(dir.path(), FLANNEL_SPEC),
        &["--iptables-backend", "nft"],
        &debug,
    );
    flannel.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let (spare, _) = spares(&ns, "nat").pop_first().unwrap();
    let handle = chain_handle(&ns, &spare).unwrap();
    let per_node = r#"  chains:
    - name: per-node
      table: nat
      chain: PER-NODE
      rules:
        - -s 10.50.0.0/16 -m comment --comment "per node" -j MASQUERADE
"#;
    let mut node = Agent::start_full(
        &ns,
        &config(other.path(), per_node),
        &["--iptables-backend", "nft"],
        &debug,
    );
    node.wait_log_all(&["spare made", "name=per-node"]);
    assert_eq!(spares(&ns, "nat").len(), 2);
    assert!(node.terminate(), "stops on SIGTERM");
    let left = spares(&ns, "nat");
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        [&spare],
        "only its own gone"
    );
    assert_eq!(
        chain_handle(&ns, &spare),
        Some(handle),
        "the other's untouched"
    );
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
