//! Adopted chains and sets (`spec.adopt[].chains`, `spec.adopt[].ipsets`) against the real
//! kernel: a process named like kube-router (a symlink to iptables-nft's multi-call binary named
//! `kube-router`, so that nf_tables names it in the NEWGEN message of its transactions) creates
//! a chain and a set; the agent adopts them as seen; `iptables -F/-X` and `ipset destroy` by
//! anyone else are undone with the last-seen content; the owner's own removal stays. The agent
//! runs with the DaemonSet's privileges (tests/common/deployed.rs).

mod common;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `DIR/kube-router`: iptables-nft's multi-call binary under the owner's name (`kube-router
/// iptables …`, `kube-router iptables-restore …`).
fn owner_binary(dir: &Path) -> PathBuf {
    let path = dir.join("kube-router");
    std::os::unix::fs::symlink("/usr/sbin/xtables-nft-multi", &path).expect("symlink");
    path
}

/// The owner runs `iptables ARGS`.
fn owner(ns: &Sandbox, bin: &Path, args: &[&str]) {
    let bin = bin.to_str().unwrap();
    must(ns, &[&[bin, "iptables"][..], args].concat());
}

/// The rules of one nat chain, as `iptables-save` prints them; `None` when it does not exist.
fn chain(ns: &Sandbox, name: &str) -> Option<Vec<String>> {
    let text = must(ns, &["iptables-nft-save", "-t", "nat"]);
    if !text.lines().any(|l| l.starts_with(&format!(":{name} "))) {
        return None;
    }
    Some(
        text.lines()
            .filter(|l| l.starts_with(&format!("-A {name} ")))
            .map(str::to_owned)
            .collect(),
    )
}

/// A set's members, sorted; `None` when it does not exist.
fn members(ns: &Sandbox, set: &str) -> Option<Vec<String>> {
    let (ok, text) = exec(ns, &["ipset", "save", set]);
    if !ok {
        return None;
    }
    let mut m: Vec<String> = text
        .lines()
        .filter_map(|l| l.strip_prefix(&format!("add {set} ")))
        .map(str::to_owned)
        .collect();
    m.sort();
    Some(m)
}

const SPEC: &str = "  pollInterval: 200ms
  adopt:
    - name: kube-router
      chains:
        table: nat
        names: [KUBE-ROUTER-*]
      ipsets:
        names: [kube-router-*]
      owners: [kube-router]
      unknownActor: restore
";

const X: &str = "KUBE-ROUTER-X";
const Y: &str = "kube-router-y";

fn x_rules(extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        format!("-A {X} -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN"),
        format!("-A {X} -s 10.244.0.0/16 -j MASQUERADE"),
    ];
    v.extend(extra.iter().map(|r| format!("-A {X} {r}")));
    v
}

/// The owner creates the chain with its rules (one transaction) and the set with members.
fn owner_creates(ns: &Sandbox, bin: &Path) {
    owner(ns, bin, &["-t", "nat", "-N", X]);
    owner(
        ns,
        bin,
        &[
            "-t",
            "nat",
            "-A",
            X,
            "-s",
            "10.244.0.0/16",
            "-d",
            "10.244.0.0/16",
            "-j",
            "RETURN",
        ],
    );
    owner(
        ns,
        bin,
        &[
            "-t",
            "nat",
            "-A",
            X,
            "-s",
            "10.244.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    );
    must(ns, &["ipset", "create", Y, "hash:net", "hashsize", "64"]);
    must(ns, &["ipset", "add", Y, "10.244.1.0/24"]);
    must(ns, &["ipset", "add", Y, "10.244.2.7"]);
}

/// Someone else wipes the nat table (flush every chain, then delete every user chain) and
/// destroys the set, as `iptables -t nat -F; iptables -t nat -X; ipset destroy` do.
fn stranger_wipes(ns: &Sandbox) {
    // -X may find the chain already refilled by the agent (EBUSY): what counts is the end state.
    let _ = exec(
        ns,
        &["sh", "-c", "iptables-nft -t nat -F; iptables-nft -t nat -X"],
    );
    must(ns, &["ipset", "destroy", Y]);
}

/// Someone else deletes the chain outright: flush and delete in one nf_tables transaction, so
/// that the agent sees it gone, not emptied.
fn stranger_deletes(ns: &Sandbox) {
    let input = format!("*nat\n-F {X}\n-X {X}\nCOMMIT\n");
    must_feed(ns, &["iptables-nft-restore", "--noflush"], &input);
    must(ns, &["ipset", "destroy", Y]);
}

/// Not restored for a while: checked repeatedly for `for_ms` (there is no event for "nothing
/// happened").
fn stays_gone(ns: &Sandbox, for_ms: u64) {
    let deadline = Instant::now() + Duration::from_millis(for_ms);
    while Instant::now() < deadline {
        assert_eq!(
            chain(ns, X),
            None,
            "chain restored after its owner deleted it"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn adopted_chain_and_set_are_restored_as_last_seen_and_forgotten_when_the_owner_removes_them() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let state = dir.path().join("adopted.json");
    let bin = owner_binary(dir.path());
    let mut agent = Agent::start_with(
        &ns,
        &cfg,
        &[
            "--iptables-backend",
            "nft",
            "--adopted-state",
            state.to_str().unwrap(),
        ],
    );

    // Created while the agent runs: adopted as seen (the chain from its nf_tables events, the
    // set at the next poll). A chain no pattern matches is left alone.
    owner_creates(&ns, &bin);
    must(&ns, &["iptables-nft", "-t", "nat", "-N", "OTHER-CHAIN"]);
    agent.wait_log_all(&["adopted", "selector=kube-router", X]);
    agent.wait_log_all(&["adopted", "selector=kube-router", &format!("set={Y}")]);
    // Sets are polled: the set may have been adopted between `ipset create` and its `ipset add`s,
    // and it is restored as last seen. Wait until the copy holds both members.
    wait_until("adopted state saved", || {
        netwarden::adopted_state::read(&state)
            .map(|s| {
                s.chains.len() == 1
                    && s.chains[0].rules.len() == 2
                    && s.ipsets.len() == 1
                    && s.ipsets[0].members.len() == 2
            })
            .unwrap_or(false)
    });

    // `status` and the metrics show them with their origin.
    let http = agent.http();
    let st = rig_status(&http);
    let adopted: Vec<&serde_json::Value> = st["objects"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["origin"] == "adopted")
        .collect();
    let names: Vec<&str> = adopted.iter().filter_map(|o| o["name"].as_str()).collect();
    assert_eq!(
        names,
        [
            "adopted:kube-router/ipv4/nat/KUBE-ROUTER-X",
            "adopted:kube-router/kube-router-y"
        ],
        "{st:#}"
    );
    let metrics = scrape(&http);
    for kind in ["chain", "ipset"] {
        let line = format!(
            "netwarden_protected_objects_by_origin{{kind=\"{kind}\",origin=\"adopted\"}} 1"
        );
        assert!(metrics.contains(&line), "{line} missing:\n{metrics}");
    }

    // Someone else wipes them: back with the same rules and members.
    stranger_wipes(&ns);
    wait_until("adopted chain restored", || {
        chain(&ns, X) == Some(x_rules(&[]))
    });
    wait_until("adopted set restored", || {
        members(&ns, Y) == Some(vec!["10.244.1.0/24".into(), "10.244.2.7".into()])
    });
    agent.wait_log_all(&[
        "restored",
        "adopted:kube-router/ipv4/nat/KUBE-ROUTER-X",
        "actor=\"iptables-nft\"",
    ]);
    assert!(
        must(&ns, &["ipset", "list", "-t", Y]).contains("hashsize 64"),
        "recreated with its options"
    );

    // The owner changes both (as a CNI resync does): the copies follow.
    owner(
        &ns,
        &bin,
        &["-t", "nat", "-A", X, "-d", "10.96.0.0/12", "-j", "RETURN"],
    );
    must(&ns, &["ipset", "add", Y, "10.244.3.0/24"]);
    wait_until("owner's changes adopted", || {
        netwarden::adopted_state::read(&state)
            .map(|s| {
                s.chains.first().is_some_and(|c| c.rules.len() == 3)
                    && s.ipsets.first().is_some_and(|i| i.members.len() == 3)
            })
            .unwrap_or(false)
    });
    stranger_deletes(&ns);
    agent.wait_log_all(&[
        "restored",
        "what=chain missing",
        "actor=\"iptables-nft-re\"",
    ]);
    wait_until("restored with the owner's new rule", || {
        chain(&ns, X) == Some(x_rules(&["-d 10.96.0.0/12 -j RETURN"]))
    });
    wait_until("restored with the owner's new member", || {
        members(&ns, Y).is_some_and(|m| m.len() == 3 && m.contains(&"10.244.3.0/24".to_string()))
    });

    // The owner removes the chain (flush, then delete): forgotten, stays removed.
    owner(&ns, &bin, &["-t", "nat", "-F", X]);
    owner(&ns, &bin, &["-t", "nat", "-X", X]);
    agent.wait_log_all(&["forgotten", X, "actor=kube-router"]);
    let forgotten = |reason: &str| {
        let want =
            format!("netwarden_adopted_forgotten_total{{kind=\"chain\",reason=\"{reason}\"}} ");
        scrape(&agent.http())
            .lines()
            .find_map(|l| l.strip_prefix(want.as_str())?.trim().parse::<f64>().ok())
    };
    // The guard counts before it logs; the wait costs nothing and keeps the test honest if
    // that order ever changes.
    wait_until("counted as forgotten by its owner", || {
        forgotten("owner") == Some(1.0)
    });
    assert_eq!(forgotten("unknown_actor"), Some(0.0));
    stays_gone(&ns, 500);
    wait_until("forgotten chain dropped from the state file", || {
        netwarden::adopted_state::read(&state)
            .map(|s| s.chains.is_empty())
            .unwrap_or(false)
    });
    // Created again by the owner: adopted again.
    owner_creates_chain_only(&ns, &bin);
    agent.wait_log_all(&["adopted", "selector=kube-router", X]);
}

fn owner_creates_chain_only(ns: &Sandbox, bin: &Path) {
    owner(ns, bin, &["-t", "nat", "-N", X]);
    owner(ns, bin, &["-t", "nat", "-A", X, "-j", "RETURN"]);
}

fn rig_status(http: &str) -> serde_json::Value {
    let body = http_get(http, "/status");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

fn scrape(http: &str) -> String {
    http_get(http, "/metrics")
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).expect("connect to the agent");
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).unwrap();
    text.split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default()
}

#[test]
fn adopted_chain_and_set_survive_an_agent_restart() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    // A second selector forgets sets destroyed by nobody known (ipset names no actor).
    let spec = format!(
        "{SPEC}    - name: forgetful
      ipsets:
        names: [forget-*]
      owners: [kube-router]
      unknownActor: forget
"
    );
    let cfg = config(dir.path(), &spec);
    let state = dir.path().join("adopted.json");
    let state_arg = state.to_str().unwrap();
    let bin = owner_binary(dir.path());
    owner_creates(&ns, &bin);
    must(&ns, &["ipset", "create", "forget-z", "hash:ip"]);
    must(&ns, &["ipset", "add", "forget-z", "10.0.0.1"]);
    let args = ["--iptables-backend", "nft", "--adopted-state", state_arg];
    // Present at start: adopted at the initial sync.
    let mut agent = Agent::start_with(&ns, &cfg, &args);
    agent.wait_log_all(&["adopted", "selector=kube-router", X]);
    wait_until("adopted state saved", || {
        netwarden::adopted_state::read(&state)
            .map(|s| s.chains.len() == 1 && s.ipsets.len() == 2)
            .unwrap_or(false)
    });
    // ipset has no actor: under `forget`, a destroyed set is forgotten.
    must(&ns, &["ipset", "destroy", "forget-z"]);
    agent.wait_log_all(&["forgotten", "set=forget-z"]);
    wait_until("forgotten set dropped from the state file", || {
        netwarden::adopted_state::read(&state)
            .map(|s| s.chains.len() == 1 && s.ipsets.len() == 1)
            .unwrap_or(false)
    });
    assert!(agent.terminate(), "agent exits cleanly");
    drop(agent);

    // While the agent is down, someone wipes them.
    stranger_wipes(&ns);
    assert_eq!(chain(&ns, X), None);

    // `check` with the file reports them; without it there is nothing to report.
    let cfg_arg = cfg.to_str().unwrap();
    let base = ["check", "--config", cfg_arg, "--iptables-backend", "nft"];
    let out = netwarden_in(&ns, &[&base[..], &["--adopted-state", state_arg]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("adopted:kube-router/ipv4/nat/KUBE-ROUTER-X"),
        "{text}"
    );
    assert!(
        text.contains("adopted:kube-router/kube-router-y"),
        "{text}\n{}",
        std::fs::read_to_string(&state).unwrap()
    );
    assert!(text.contains("(2 adopted)"), "{text}");
    let out = netwarden_in(&ns, &base);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Restarted with the file: restored at the initial sync, the forgotten set stays gone.
    let mut agent = Agent::start_with(&ns, &cfg, &args);
    assert_eq!(
        chain(&ns, X),
        Some(x_rules(&[])),
        "restored by the initial sync"
    );
    wait_until("adopted set restored", || {
        members(&ns, Y) == Some(vec!["10.244.1.0/24".into(), "10.244.2.7".into()])
    });
    assert_eq!(members(&ns, "forget-z"), None);
    // Still protected after the restart.
    stranger_wipes(&ns);
    wait_until("adopted chain restored after the restart", || {
        chain(&ns, X) == Some(x_rules(&[]))
    });
    agent.wait_log_all(&["restored", "actor=\"iptables-nft\""]);
}

/// iptables-legacy sends no notifications: the protected tables are polled and nobody is known.
/// Under `unknownActor: restore`, a chain emptied or deleted is restored as last seen; a change
/// that leaves rules in it is followed.
#[test]
fn legacy_backend_adopts_by_polling_and_restores_under_the_unknown_actor_policy() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let ipt = |args: &[&str]| must(&ns, &[&["iptables-legacy", "-t", "nat"][..], args].concat());
    ipt(&["-N", X]);
    ipt(&[
        "-A",
        X,
        "-s",
        "10.244.0.0/16",
        "-d",
        "10.244.0.0/16",
        "-j",
        "RETURN",
    ]);
    let mut agent = Agent::start_with(&ns, &cfg, &["--iptables-backend", "legacy"]);
    agent.wait_log_all(&["adopted", "selector=kube-router", X]);
    let legacy_chain = || -> Option<Vec<String>> {
        let text = must(&ns, &["iptables-legacy-save", "-t", "nat"]);
        text.lines()
            .any(|l| l.starts_with(&format!(":{X} ")))
            .then(|| {
                text.lines()
                    .filter(|l| l.starts_with(&format!("-A {X} ")))
                    .map(str::to_owned)
                    .collect()
            })
    };

    // A rule added (by anyone: no actor on legacy) is followed.
    ipt(&["-A", X, "-s", "10.244.0.0/16", "-j", "MASQUERADE"]);
    let both = x_rules(&[]);
    wait_until("the new rule is part of the adopted copy", || {
        agent
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("copy updated") && l.contains("rules=2"))
    });
    // Flushed then deleted: restored with both rules at a poll.
    let _ = exec(
        &ns,
        &[
            "sh",
            "-c",
            &format!("iptables-legacy -t nat -F {X}; iptables-legacy -t nat -X {X}"),
        ],
    );
    let deadline = Instant::now() + WAIT;
    while legacy_chain().as_ref() != Some(&both) {
        assert!(
            Instant::now() < deadline,
            "not restored: {:?}\n{}",
            legacy_chain(),
            agent.log.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    agent.wait_log_all(&["restored", "actor=\"unknown\""]);
}

/// A parent named like the owner runs `iptables-nft-restore` as a child (as CNIs run their
/// iptables tools), and reaps it only when told: until then the child's /proc entry names its
/// parent, whatever the agent's scheduling.
const PARENT: &str = r#"
import ctypes, os, subprocess, sys
ctypes.CDLL(None).prctl(15, b"kube-router", 0, 0, 0)
p = subprocess.Popen(["iptables-nft-restore", "--noflush"], stdin=subprocess.PIPE)
p.stdin.write(sys.argv[1].encode())
p.stdin.close()
os.waitid(os.P_PID, p.pid, os.WEXITED | os.WNOWAIT)
print("exited", flush=True)
sys.stdin.readline()
print("status", p.wait(), flush=True)
"#;

#[test]
fn a_chain_deleted_by_a_child_process_of_the_owner_is_forgotten() {
    use std::io::{BufRead, BufReader, Write};
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let bin = owner_binary(dir.path());
    owner_creates_chain_only(&ns, &bin);
    let mut agent = Agent::start_with(&ns, &cfg, &["--iptables-backend", "nft"]);
    agent.wait_log_all(&["adopted", "selector=kube-router", X]);

    let input = format!("*nat\n-F {X}\n-X {X}\nCOMMIT\n");
    let mut parent = Command::new("ip")
        .args(["netns", "exec", &ns.name, "python3", "-c", PARENT, &input])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    let mut out = BufReader::new(parent.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "exited");
    // nf_tables names the child; its parent is the owner.
    agent.wait_log_all(&[
        "forgotten",
        X,
        "actor=iptables-nft-re",
        "ancestors=kube-router",
    ]);
    let mut stdin = parent.stdin.take().unwrap();
    writeln!(stdin).unwrap();
    line.clear();
    out.read_line(&mut line).unwrap();
    assert_eq!(line.trim(), "status 0", "iptables-nft-restore failed");
    parent.wait().unwrap();
    stays_gone(&ns, 500);
}

/// Chain and set selectors follow a SIGHUP: a selector added adopts what it covers at once (a
/// stranger's removal is then undone), and one taken away forgets its chains and sets, which are
/// left as they are.
#[test]
fn sighup_adopts_with_new_selectors_and_forgets_with_removed_ones() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let bin = owner_binary(dir.path());
    owner_creates(&ns, &bin);
    let without = "  pollInterval: 200ms\n  rules: []\n";
    let cfg = config(dir.path(), without);
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    let hup = |agent: &Agent| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };

    config(dir.path(), SPEC);
    hup(&agent);
    agent.wait_log_all(&["adopt selectors reloaded", "kube-router"]);
    agent.wait_log_all(&["adopted", X]);
    // The reload reads the sets after the tables: the chain's adoption does not prove the set's.
    agent.wait_log_all(&["adopted", "selector=kube-router", &format!("set={Y}")]);
    let set_members = members(&ns, Y).expect("the owner's set");
    stranger_deletes(&ns);
    wait_until("the chain restored after the reload adopted it", || {
        chain(&ns, X) == Some(x_rules(&[]))
    });
    wait_until("the set restored after the reload adopted it", || {
        members(&ns, Y).as_ref() == Some(&set_members)
    });

    config(dir.path(), without);
    hup(&agent);
    agent.wait_log_all(&["no adopt selector covers the chain", X]);
    agent.wait_log_all(&["no adopt selector covers the set", Y]);
    stranger_deletes(&ns);
    stays_gone(&ns, 600);
    assert_eq!(
        members(&ns, Y),
        None,
        "set restored after its selector went"
    );
}
