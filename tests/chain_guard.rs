//! The chain and set guard where another process gets in its way, against the real kernel and
//! the real iptables (nft and legacy) and ipset, in namespaces the tests create: a flush loop is
//! a fight (contested, backed off, repaired once it stops), never a reason to give up; rule specs
//! are compared in the form iptables prints them and never appended twice; a rule that cannot be
//! written as configured is given up until a reload; a set keeps its owner's options when it is
//! recreated.

mod common;
use common::*;
use std::time::{Duration, Instant};

/// The rules of one chain as `SAVE -t TABLE` prints them; `None` when it does not exist.
fn chain(ns: &Sandbox, save: &str, table: &str, name: &str) -> Option<Vec<String>> {
    let text = must(ns, &[save, "-t", table]);
    if !text.lines().any(|l| l.starts_with(&format!(":{name} "))) {
        return None;
    }
    Some(
        text.lines()
            .filter_map(|l| l.strip_prefix(&format!("-A {name} ")))
            .map(str::to_owned)
            .collect(),
    )
}

fn metric(http: &str, line_start: &str) -> Option<f64> {
    let (_, text) =
        netwarden::telemetry::http::get(http, "/metrics", None, Duration::from_secs(5)).unwrap();
    text.lines()
        .find_map(|l| l.strip_prefix(line_start)?.trim().parse().ok())
}

const FIGHT_SPEC: &str = r#"  pollInterval: 200ms
  chains:
    - name: masq
      table: nat
      chain: NW-MASQ
      rules:
        - -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN
        - -s 10.244.0.0/16 -j MASQUERADE
      jumps:
        - chain: POSTROUTING
          rule: -j NW-MASQ
          position: first
"#;

fn masq() -> Vec<String> {
    vec![
        "-s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN".to_owned(),
        "-s 10.244.0.0/16 -j MASQUERADE".to_owned(),
    ]
}

/// Twenty flushes of a protected chain, each right after the agent's repair: contested, repairs
/// held back, the chain whole again once the loop ends, protection still on.
fn flush_fight(backend: &str, pause: &str) {
    let (iptables, save) = match backend {
        "nft" => ("iptables-nft", "iptables-nft-save"),
        _ => ("iptables-legacy", "iptables-legacy-save"),
    };
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), FIGHT_SPEC);
    let mut agent = Agent::start_with(&ns, &cfg, &["--iptables-backend", backend]);
    assert_eq!(chain(&ns, save, "nat", "NW-MASQ"), Some(masq()));
    let fighter = format!(
        "for i in $(seq 20); do {iptables} -t nat -F NW-MASQ; sleep {pause}; done; echo done"
    );
    let started = Instant::now();
    let out = must(&ns, &["sh", "-c", &fighter]);
    assert!(out.contains("done"));
    let fought = started.elapsed();
    let line = agent.wait_log_all(&["contested", "kind=\"chain\"", "name=masq"]);
    if backend == "nft" {
        // nf_tables names the fighter.
        assert!(line.contains("actor=\"iptables-nft\""), "{line}");
    }
    // Whole again once the fight is over: within the quiet period and a repair.
    wait_until("the chain whole again after the fight", || {
        chain(&ns, save, "nat", "NW-MASQ") == Some(masq())
    });
    agent.wait_log_all(&["no longer contested", "name=masq"]);
    let http = agent.http();
    let deferred = metric(&http, "netwarden_repairs_deferred_total{kind=\"chain\"}");
    assert!(deferred.is_some_and(|n| n >= 1.0), "{deferred:?}");
    let log = agent.log.lock().unwrap().join("\n");
    assert!(
        !log.contains("repair does not take") && !log.contains("Only reporting"),
        "a fight must never turn protection off:\n{log}"
    );
    drop(log);
    // Still protected: a later flush is repaired at once.
    let t = Instant::now();
    must(&ns, &[iptables, "-t", "nat", "-F", "NW-MASQ"]);
    wait_until("repaired after the fight", || {
        chain(&ns, save, "nat", "NW-MASQ") == Some(masq())
    });
    eprintln!(
        "{backend}: 20 flushes in {fought:?}; a later flush repaired within {:?}",
        t.elapsed()
    );
}

#[test]
fn a_flush_loop_is_contested_and_repaired_after_it_stops_nft() {
    flush_fight("nft", "0");
}

#[test]
fn a_flush_loop_is_contested_and_repaired_after_it_stops_legacy() {
    // Legacy is polled (200 ms here): the loop flushes once per poll, right after each repair.
    flush_fight("legacy", "0.25");
}

const SPELLED_SPEC: &str = r#"  pollInterval: 200ms
  chains:
    - name: kr-input
      table: filter
      chain: KUBE-ROUTER-INPUT
      content: contains
      rules:
        - -p tcp --dport 80 -j ACCEPT
        - --source 10.0.0.1 -j RETURN
      jumps:
        - {chain: INPUT, rule: -j KUBE-ROUTER-INPUT, position: first}
"#;

/// The owner's rule, as iptables prints it, is already there: the config's spelling of it is
/// found, not appended again; the other rule is appended once, in the printed form.
fn spelled_otherwise(backend: &str) {
    let (iptables, save) = match backend {
        "nft" => ("iptables-nft", "iptables-nft-save"),
        _ => ("iptables-legacy", "iptables-legacy-save"),
    };
    let ns = sandbox();
    must(&ns, &[iptables, "-N", "KUBE-ROUTER-INPUT"]);
    must(
        &ns,
        &[
            iptables,
            "-A",
            "KUBE-ROUTER-INPUT",
            "-p",
            "tcp",
            "--dport",
            "80",
            "-j",
            "ACCEPT",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPELLED_SPEC);
    let mut agent = Agent::start_with(&ns, &cfg, &["--iptables-backend", backend]);
    agent.wait_log_all(&[
        "rule spec compared in the form iptables prints it",
        "written=-p tcp --dport 80 -j ACCEPT",
        "printed=-p tcp -m tcp --dport 80 -j ACCEPT",
    ]);
    let want = vec![
        "-p tcp -m tcp --dport 80 -j ACCEPT".to_owned(),
        "-s 10.0.0.1/32 -j RETURN".to_owned(),
    ];
    assert_eq!(
        chain(&ns, save, "filter", "KUBE-ROUTER-INPUT"),
        Some(want.clone())
    );
    // Removed and put back three times: always one copy of each.
    for _ in 0..3 {
        must(&ns, &[iptables, "-D", "KUBE-ROUTER-INPUT", "2"]);
        wait_until("the rule back, once", || {
            chain(&ns, save, "filter", "KUBE-ROUTER-INPUT").as_ref() == Some(&want)
        });
    }
    let out = check(&ns, &cfg, &["--iptables-backend", backend]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stdout}{stderr}");
    // Chains only: the first line counts them; the backend is not announced on stderr.
    assert!(
        stdout.starts_with("in sync: 1 protected objects"),
        "{stdout}"
    );
    assert!(!stderr.contains("backend detected"), "{stderr}");
}

#[test]
fn a_rule_spelled_otherwise_is_never_duplicated_nft() {
    spelled_otherwise("nft");
}

#[test]
fn a_rule_spelled_otherwise_is_never_duplicated_legacy() {
    spelled_otherwise("legacy");
}

/// A rule iptables makes two rules of cannot be compared with anything: refused by `validate`,
/// `check` and `run`, with the printed rules, and nothing is changed.
#[test]
fn a_rule_that_cannot_be_made_canonical_is_refused_everywhere() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let bad = SPELLED_SPEC.replace("--source 10.0.0.1 -j", "-s 10.0.0.1,10.0.0.2 -j");
    let cfg = config(dir.path(), &bad);
    let before = must(&ns, &["iptables-nft-save"]);
    let path = cfg.to_str().unwrap();
    for out in [
        netwarden(&["validate", path]),
        check(&ns, &cfg, &["--iptables-backend", "nft"]),
        netwarden_in(&ns, &["run", "--config", path, "--metrics-addr", "off"]),
    ] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(
            stderr.contains(&format!("{path}: spec.chains[0].rules[1]: iptables makes 2 rules of it (`-s 10.0.0.1/32 -j RETURN`, `-s 10.0.0.2/32 -j RETURN`)")),
            "{stderr}"
        );
    }
    assert_eq!(must(&ns, &["iptables-nft-save"]), before, "nothing changed");
    // Spelled otherwise but canonical once printed: valid, and validate says how it is compared.
    let ok = config(dir.path(), SPELLED_SPEC);
    let out = netwarden(&["validate", ok.to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("spec.chains[0].rules[0]: iptables prints `-p tcp --dport 80 -j ACCEPT` as `-p tcp -m tcp --dport 80 -j ACCEPT`"),
        "{stderr}"
    );
}

/// Without a scratch namespace (turned off here), a rule spelled otherwise is written once, read
/// back printed otherwise and given up, not appended at every poll; a reload with the rule as
/// printed protects the chain again.
#[test]
fn a_rule_that_does_not_take_is_given_up_until_a_reload() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = |rule: &str| {
        format!(
            "  pollInterval: 200ms\n  chains:\n    - name: kr\n      table: filter\n      chain: NW-KR\n      content: contains\n      rules: [\"{rule}\"]\n"
        )
    };
    // conntrack prints its states in an order of its own: past what the agent normalises itself.
    let cfg = config(
        dir.path(),
        &spec("-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
    );
    let mut agent = Agent::start_full(
        &ns,
        &cfg,
        &["--iptables-backend", "nft"],
        &[("NETWARDEN_SCRATCH_NETNS", "off")],
    );
    agent.wait_log("rule specs are compared as written");
    let line = agent.wait_log("repair does not take");
    let printed = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT";
    assert!(line.contains(&format!("printed=`{printed}`")), "{line}");
    let one = Some(vec![printed.to_owned()]);
    // Several reads later (each change of the chain re-reads the table): still one copy. The
    // guard handles transactions in order, so once it announces the last one, the ones before
    // are done.
    settle(&ns, &mut agent, 3);
    assert_eq!(chain(&ns, "iptables-nft-save", "filter", "NW-KR"), one);
    // Given up: a removal is reported, not repaired.
    must(&ns, &["iptables-nft", "-F", "NW-KR"]);
    settle(&ns, &mut agent, 1);
    assert_eq!(
        chain(&ns, "iptables-nft-save", "filter", "NW-KR"),
        Some(vec![])
    );
    // Written as printed and reloaded: protected again.
    config(dir.path(), &spec(printed));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(agent.pid() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    agent.wait_log("chains and sets reloaded");
    wait_until("the chain repaired after the reload", || {
        chain(&ns, "iptables-nft-save", "filter", "NW-KR") == one
    });
    must(&ns, &["iptables-nft", "-F", "NW-KR"]);
    wait_until("repaired again", || {
        chain(&ns, "iptables-nft-save", "filter", "NW-KR") == one
    });
}

/// Adds and deletes a foreign rule in NW-KR `times` times and waits until the guard has taken up
/// the last of those transactions (all before it are handled by then).
fn settle(ns: &Sandbox, agent: &mut Agent, times: usize) {
    for _ in 0..times {
        must(ns, &["iptables-nft", "-A", "NW-KR", "-j", "ACCEPT"]);
        must(ns, &["iptables-nft", "-D", "NW-KR", "-j", "ACCEPT"]);
    }
    for _ in 0..2 * times {
        agent.wait_log("transaction touched protected chains");
    }
}

fn set_header(ns: &Sandbox, set: &str) -> String {
    must(ns, &["ipset", "list", "-t", set])
}

/// kube-router makes its sets with `timeout 0` and adds members with `timeout 0`: a set destroyed
/// and recreated by the agent must still take them.
#[test]
fn a_kube_router_set_with_timeout_0_is_recreated_with_timeout_support() {
    let ns = sandbox();
    must(
        &ns,
        &[
            "ipset",
            "create",
            "kube-router-svip",
            "hash:ip",
            "timeout",
            "0",
        ],
    );
    must(
        &ns,
        &[
            "ipset",
            "add",
            "kube-router-svip",
            "10.0.0.1",
            "timeout",
            "0",
        ],
    );
    must(
        &ns,
        &[
            "ipset",
            "create",
            "kube-router-pods",
            "hash:net",
            "timeout",
            "0",
            "comment",
        ],
    );
    must(
        &ns,
        &[
            "ipset",
            "add",
            "kube-router-pods",
            "10.244.1.0/24",
            "timeout",
            "0",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"  pollInterval: 200ms
  ipsets:
    - name: kube-router-svip
      type: hash:ip
      members: [10.0.0.1]
    - name: fresh
      type: hash:ip
      timeout: 0
      members: [10.0.0.7]
  adopt:
    - name: kube-router
      ipsets:
        names: [kube-router-pods]
      owners: [kube-router]
      unknownActor: restore
"#;
    let cfg = config(dir.path(), spec);
    let mut agent = Agent::start(&ns, &cfg);
    agent.wait_log_all(&["adopted", "set=kube-router-pods"]);
    // Never seen: created with the configured options.
    assert!(set_header(&ns, "fresh").contains("timeout 0"));
    must(&ns, &["ipset", "add", "fresh", "10.0.0.8", "timeout", "0"]);
    for set in ["kube-router-svip", "kube-router-pods"] {
        must(&ns, &["ipset", "destroy", set]);
        wait_until("the set recreated", || {
            exec(&ns, &["ipset", "list", "-t", set]).0
        });
        let header = set_header(&ns, set);
        assert!(header.contains("timeout 0"), "{set}: {header}");
    }
    assert!(set_header(&ns, "kube-router-pods").contains("comment"));
    // What the owner does next works.
    must(
        &ns,
        &[
            "ipset",
            "add",
            "kube-router-svip",
            "10.0.0.2",
            "timeout",
            "0",
        ],
    );
    must(
        &ns,
        &[
            "ipset",
            "add",
            "kube-router-pods",
            "10.244.2.0/24",
            "timeout",
            "0",
        ],
    );
    let members = must(&ns, &["ipset", "save", "kube-router-svip"]);
    assert!(
        members.contains("add kube-router-svip 10.0.0.1"),
        "{members}"
    );
}
