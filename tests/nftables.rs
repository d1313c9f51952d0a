//! Native nftables tables against the real kernel and the real `nft`, in namespaces the tests
//! create: a kube-proxy-shaped table (base chains, service chains, a verdict map, the set of
//! cluster IPs) and flannel's masquerade table, protected by examples/nftables-kube-proxy.yaml,
//! the example docs/config.md shows. The agent runs as the DaemonSet runs it (only NET_ADMIN and
//! NET_RAW).

mod common;
use common::*;
use std::process::{Command, Stdio};

/// What kube-proxy and flannel write, as they write it (kube-proxy writes `0x4000`, nft prints
/// `0x00004000`), with more than the config protects: another service, more elements.
const OWNERS: &str = r#"
table ip kube-proxy {
	comment "rules for kube-proxy"
	set cluster-ips {
		type ipv4_addr
		comment "Active ClusterIPs"
		elements = { 10.96.0.1, 10.96.0.10, 10.96.0.77 }
	}
	set nodeport-ips {
		type ipv4_addr
		comment "IPs that accept NodePort traffic"
	}
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https,
			     10.96.0.10 . udp . 53 : goto service-FOO-kube-system/kube-dns/udp/dns }
	}
	chain nat-prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		jump services
	}
	chain nat-output {
		type nat hook output priority -100; policy accept;
		jump services
	}
	chain nat-postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		jump masquerading
	}
	chain filter-forward {
		type filter hook forward priority -110; policy accept;
		ct state new jump cluster-ips-check
	}
	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips
	}
	chain cluster-ips-check {
		ip daddr @cluster-ips reject comment "Reject traffic to invalid ports of ClusterIPs"
		ip daddr 10.96.0.0/16 drop comment "Drop traffic to unallocated ClusterIPs"
	}
	chain masquerading {
		meta mark & 0x4000 == 0 return
		meta mark set meta mark ^ 0x4000
		masquerade fully-random
	}
	chain mark-for-masquerade {
		meta mark set meta mark | 0x4000
	}
	chain service-2QRHZV4L-default/kubernetes/tcp/https {
		ip daddr 10.96.0.1 tcp dport 443 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
		numgen random mod 1 vmap { 0 : goto endpoint-AAAA-default/kubernetes/tcp/https__10.200.0.1/6443 }
	}
	chain endpoint-AAAA-default/kubernetes/tcp/https__10.200.0.1/6443 {
		ip saddr 10.200.0.1 jump mark-for-masquerade
		meta l4proto tcp dnat to 10.200.0.1:6443
	}
	chain service-FOO-kube-system/kube-dns/udp/dns {
		ip daddr 10.96.0.10 udp dport 53 ip saddr != 10.244.0.0/16 jump mark-for-masquerade
	}
}
table ip flannel-ipv4 {
	comment "rules for flannel-ipv4"
	chain postrtg {
		comment "chain to manage traffic masquerading by flannel"
		type nat hook postrouting priority srcnat; policy accept;
		meta mark 0x4000 return
		ip saddr 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr 10.244.1.0/24 return
		ip saddr != 10.244.1.0/24 ip daddr 10.244.0.0/16 return
		ip saddr 10.244.0.0/16 ip daddr != 224.0.0.0/4 masquerade fully-random
		ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random
	}
}
"#;

/// Somebody else's tables: must never be touched.
const OTHERS: &str = r#"
table inet other {
	set blocked { type ipv4_addr; flags interval; elements = { 192.0.2.0/24 }; }
	chain input {
		type filter hook input priority filter; policy accept;
		ip saddr @blocked counter drop
	}
}
"#;

fn nft_f(ns: &Sandbox, script: &str) {
    must_feed(ns, &["nft", "-f", "-"], script);
}

fn nft(ns: &Sandbox, args: &[&str]) -> String {
    let mut all = vec!["nft"];
    all.extend_from_slice(args);
    must(ns, &all)
}

/// `nft -j list ruleset` without the protected tables' objects: the others' state, handles
/// included, to show that nothing of theirs was touched.
fn others(ns: &Sandbox) -> Vec<serde_json::Value> {
    let v: serde_json::Value = serde_json::from_str(&nft(ns, &["-j", "list", "ruleset"])).unwrap();
    v["nftables"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| {
            let Some((kind, body)) = o.as_object().and_then(|m| m.iter().next()) else {
                return false;
            };
            let table = if kind == "table" {
                &body["name"]
            } else {
                &body["table"]
            };
            let ours = body["family"] == "ip"
                && matches!(table.as_str(), Some("kube-proxy" | "flannel-ipv4"));
            kind != "metainfo" && !ours
        })
        .cloned()
        .collect()
}

fn table(ns: &Sandbox, name: &str) -> String {
    let (ok, text) = exec(ns, &["nft", "-s", "list", "table", "ip", name]);
    if ok {
        text
    } else {
        String::new()
    }
}

/// `spec.adopt`: kube-proxy's table, owned by kube-proxy.
const ADOPT_KUBE_PROXY: &str = "  adopt:\n    - name: kube-proxy\n      nftables:\n        family: ip\n        names: [kube-proxy]\n      owners: [kube-proxy]\n";

/// `nft`, copied into `dir` under kube-proxy's name: transactions nf_tables names as kube-proxy's.
fn kube_proxys_nft(dir: &std::path::Path) -> String {
    let owner = dir.join("kube-proxy");
    std::fs::copy("/usr/sbin/nft", &owner).unwrap();
    owner.to_str().unwrap().to_owned()
}

fn example() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nftables-kube-proxy.yaml")
}

/// What the example protects is in place: checks a few lines of each protected object.
fn protected_in_place(ns: &Sandbox) -> bool {
    let kp = table(ns, "kube-proxy");
    let fl = table(ns, "flannel-ipv4");
    [
        "chain nat-prerouting {",
        "type filter hook forward priority -110; policy accept;",
        "ip daddr . meta l4proto . th dport vmap @service-ips",
        "ip daddr @cluster-ips reject comment \"Reject traffic to invalid ports of ClusterIPs\"",
        "meta mark & 0x00004000 == 0x00000000 return",
        "chain mark-for-masquerade {",
        "chain service-2QRHZV4L-default/kubernetes/tcp/https {",
        "10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https",
    ]
    .iter()
    .all(|l| kp.contains(l))
        && kp.contains("10.96.0.10")
        && kp.contains("10.96.0.1,") | kp.contains("10.96.0.1 }")
        && fl.contains("ip saddr != 10.244.0.0/16 ip daddr 10.244.0.0/16 masquerade fully-random")
}

#[test]
fn kube_proxy_and_flannel_tables_come_back_and_nothing_else_is_touched() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    nft_f(&ns, OTHERS);
    // iptables-nft writes nf_tables tables too (`ip nat`): not netwarden's unless configured.
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
    let before = others(&ns);
    assert!(before.len() > 4, "{before:?}");
    let config = example();
    let out = check(&ns, &config, &[]);
    assert!(
        out.status.success(),
        "in sync before anything: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let mut agent = Agent::start_with(&ns, &config, &[]);
    agent.wait_log("nftables in sync");
    assert!(protected_in_place(&ns));
    assert_eq!(
        others(&ns),
        before,
        "the initial sync touched nobody else's tables"
    );

    // A whole table deleted.
    nft(&ns, &["delete", "table", "ip", "kube-proxy"]);
    let line = agent.wait_log_all(&["restored", "name=kube-proxy-ipv4"]);
    assert!(
        line.contains("what=table missing") && line.contains("actor=nft"),
        "{line}"
    );
    wait_until("the kube-proxy table is whole again", || {
        protected_in_place(&ns)
    });
    assert_eq!(others(&ns), before);

    // A chain deleted (flannel's base chain).
    nft(&ns, &["delete", "chain", "ip", "flannel-ipv4", "postrtg"]);
    let line = agent.wait_log_all(&["restored", "name=flannel-ipv4"]);
    assert!(line.contains("chain postrtg missing"), "{line}");
    wait_until("flannel's chain back", || protected_in_place(&ns));

    // A set element deleted, and a forbidden one added.
    nft(
        &ns,
        &[
            "delete",
            "element",
            "ip",
            "kube-proxy",
            "cluster-ips",
            "{ 10.96.0.10 }",
        ],
    );
    let line = agent.wait_log_all(&["restored", "name=kube-proxy-ipv4"]);
    assert!(line.contains("1 element(s) missing: 10.96.0.10"), "{line}");
    nft(
        &ns,
        &[
            "add",
            "element",
            "ip",
            "kube-proxy",
            "cluster-ips",
            "{ 10.200.0.1 }",
        ],
    );
    agent.wait_log_all(&[
        "forbidden element in protected set",
        "element=cluster-ips: 10.200.0.1",
        "action=\"removed\"",
    ]);
    wait_until("the forbidden element is gone", || {
        !table(&ns, "kube-proxy").contains("10.200.0.1")
    });
    assert!(protected_in_place(&ns));
    assert_eq!(
        others(&ns),
        before,
        "nobody else's tables touched by any repair"
    );

    // `nft flush ruleset` (what an nftables.service reload does): one burst, both back in one
    // transaction; the unprotected tables it removed stay removed.
    nft(&ns, &["flush", "ruleset"]);
    agent.wait_log_all(&["restored", "name=kube-proxy-ipv4"]);
    wait_until("both tables back after a flush", || protected_in_place(&ns));
    let tables = nft(&ns, &["list", "tables"]);
    let mut tables: Vec<&str> = tables.lines().collect();
    tables.sort();
    assert_eq!(
        tables,
        ["table ip flannel-ipv4", "table ip kube-proxy"],
        "only the protected tables were recreated"
    );
    let out = check(&ns, &config, &[]);
    assert!(
        out.status.success(),
        "check agrees: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The owners' objects the config does not name went with the flush and are not invented.
    assert!(!table(&ns, "kube-proxy").contains("nodeport-ips"));
}

#[test]
fn a_table_deleted_whole_comes_back_from_its_image_and_only_as_the_config_names_it() {
    let ns = sandbox();
    nft_f(&ns, OTHERS);
    let before = others(&ns);
    let debug = [("NETWARDEN_LOG_LEVEL", "debug")];
    let mut agent = Agent::start_with_env(&ns, &example(), &debug);
    agent.wait_log_all(&["image taken", "table=ip kube-proxy"]);
    agent.wait_log("nftables in sync");
    let whole = table(&ns, "kube-proxy");
    assert!(protected_in_place(&ns), "{whole}");

    // Deleted whole: put back in one netlink batch from the image the agent took when it found
    // the table in sync, exactly as it was (base chains, the verdict map, anonymous sets),
    // committed by the responder at the deletion's NEWGEN once the engine has armed it.
    agent.wait_log_all(&["images armed", "armed=2"]);
    nft(&ns, &["delete", "table", "ip", "kube-proxy"]);
    agent.wait_log_all(&["responder committed images", "Committed"]);
    let line = agent.wait_log_all(&["restored", "name=kube-proxy-ipv4", "via=\"image\""]);
    assert!(
        line.contains("actor=nft") && line.contains("what=table missing"),
        "{line}"
    );
    assert_eq!(table(&ns, "kube-proxy"), whole);
    assert_eq!(others(&ns), before, "nobody else's tables touched");

    // An owner adds a chain the config does not name: the image is no longer the table, and
    // the table now holds more than the config names, so no new one is taken. Deleted whole
    // again, the table comes back as the config names it, with nft -f; the owner's chain is
    // not invented.
    nft(&ns, &["add", "chain", "ip", "kube-proxy", "owners-chain"]);
    nft(&ns, &["delete", "table", "ip", "kube-proxy"]);
    agent.wait_log_all(&["restored", "name=kube-proxy-ipv4", "via=\"nft\""]);
    wait_until("the table is back", || protected_in_place(&ns));
    assert!(!table(&ns, "kube-proxy").contains("owners-chain"));
    assert_eq!(table(&ns, "kube-proxy"), whole);

    // Verified as the config names it again: a new image for the next deletion (deleting it
    // a third time this soon would be a fight, and held back).
    agent.wait_log_all(&["image taken", "table=ip kube-proxy"]);
    assert_eq!(others(&ns), before);
}

#[test]
fn check_reports_drift_of_nft_tables() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    let config = example();
    nft(&ns, &["delete", "chain", "ip", "flannel-ipv4", "postrtg"]);
    let out = check(&ns, &config, &[]);
    assert_eq!(out.status.code(), Some(1));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("nft_table  flannel-ipv4  enforce  ip flannel-ipv4  chain postrtg missing"),
        "{text}"
    );
    let out = check(&ns, &config, &["--output", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["in_sync"], false);
    assert_eq!(
        v["nftables"]["drift"][0]["findings"][0]["finding"],
        "chain_missing"
    );
    assert!(
        table(&ns, "flannel-ipv4").contains("table ip flannel-ipv4"),
        "check changed nothing"
    );
    assert!(!table(&ns, "flannel-ipv4").contains("postrtg"));
}

/// A process that deletes a protected element whenever it appears (an owner gone wrong): the
/// table is contested, its repairs back off, and the element is back once the fight stops.
#[test]
fn a_reactive_fighter_is_contested_not_given_up_on() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    let mut agent = Agent::start_with(&ns, &example(), &[]);
    agent.wait_log("nftables in sync");
    let script = "nft monitor elements | while read -r line; do case \"$line\" in *'add element ip kube-proxy cluster-ips'*'10.96.0.1'*) nft delete element ip kube-proxy cluster-ips '{ 10.96.0.1 }' ;; esac; done";
    use std::os::unix::process::CommandExt;
    let mut fighter = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c", script])
        .process_group(0)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    struct Stop(i32);
    impl Drop for Stop {
        fn drop(&mut self) {
            // The fighter's process group: the shell, `nft monitor` and its children.
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(self.0),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let stop = Stop(fighter.id() as i32);
    // The monitor does not say when it listens: delete the element until the fight is on (each
    // deletion the fighter does not answer is simply repaired).
    let deadline = std::time::Instant::now() + WAIT;
    while !agent
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("contested"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no fight within {WAIT:?}"
        );
        let _ = exec(
            &ns,
            &[
                "nft",
                "delete",
                "element",
                "ip",
                "kube-proxy",
                "cluster-ips",
                "{ 10.96.0.1 }",
            ],
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let line = agent.wait_log_all(&["contested", "name=kube-proxy-ipv4"]);
    assert!(line.contains("actor=nft"), "the fighter is named: {line}");
    // Repairs go on during the fight, backed off.
    agent.wait_log_all(&["restored", "name=kube-proxy-ipv4"]);
    drop(stop);
    let _ = fighter.wait();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let t = table(&ns, "kube-proxy");
        if t.contains("10.96.0.1,") || t.contains("10.96.0.1 }") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the element is not back once the fight stopped:\n{t}\n{}",
            agent.log.lock().unwrap().join("\n")
        );
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let log = agent.log.lock().unwrap().join("\n");
    assert!(
        !log.contains("did not take"),
        "a fight never turns protection off:\n{log}"
    );
}

/// `netwarden snapshot --nft-tables` writes a config that protects the live tables as nft
/// prints them: `check` finds it in sync, and a deleted chain drifted.
#[test]
fn a_snapshot_protects_the_live_tables() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    nft_f(&ns, OTHERS);
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-j",
            "MASQUERADE",
        ],
    );
    let out = netwarden_in(&ns, &["snapshot", "--nft-tables", "kube-proxy|flannel|nat"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(
        text.contains("- 'meta mark & 0x00004000 == 0x00000000 return'"),
        "{text}"
    );
    assert!(
        text.contains(
            "- '10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https'"
        ),
        "{text}"
    );
    assert!(
        !text.contains("table: 'nat'"),
        "iptables-nft's table is left out: {text}"
    );
    assert!(!text.contains("other"), "{text}");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.yaml");
    std::fs::write(&path, &text).unwrap();
    let out = check(&ns, &path, &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    nft(&ns, &["delete", "chain", "ip", "flannel-ipv4", "postrtg"]);
    let out = check(&ns, &path, &[]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `spec.adopt[].nftables`: kube-proxy's table protected as last seen. What its owner does is
/// followed (nf_tables names the committing process; here `nft` run under kube-proxy's name), a
/// stranger's deletions are put back, and a table its owner deletes is forgotten.
#[test]
fn an_adopted_table_follows_its_owner_and_is_restored_for_others() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    let dir = tempfile::tempdir().unwrap();
    let owner = kube_proxys_nft(dir.path());
    let owner = owner.as_str();
    let cfg = config(dir.path(), ADOPT_KUBE_PROXY);
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    agent.wait_log_all(&["adopted", "table=ip kube-proxy"]);
    assert!(!agent
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("adopted") && l.contains("flannel")));
    // A stranger deletes an element: put back.
    nft(
        &ns,
        &[
            "delete",
            "element",
            "ip",
            "kube-proxy",
            "cluster-ips",
            "{ 10.96.0.77 }",
        ],
    );
    let line = agent.wait_log_all(&["restored", "name=adopted:kube-proxy/ip/kube-proxy"]);
    assert!(
        line.contains("10.96.0.77") && line.contains("actor=nft"),
        "{line}"
    );
    wait_until("the element is back", || {
        table(&ns, "kube-proxy").contains("10.96.0.77")
    });
    // The owner deletes it: followed. A stranger's deletion right after is repaired alone,
    // which shows the owner's was taken as the new state.
    must(
        &ns,
        &[
            owner,
            "delete",
            "element",
            "ip",
            "kube-proxy",
            "cluster-ips",
            "{ 10.96.0.77 }",
        ],
    );
    nft(
        &ns,
        &[
            "delete",
            "element",
            "ip",
            "kube-proxy",
            "cluster-ips",
            "{ 10.96.0.10 }",
        ],
    );
    let line = agent.wait_log_all(&["restored", "name=adopted:kube-proxy/ip/kube-proxy"]);
    assert!(
        line.contains("10.96.0.10") && !line.contains("10.96.0.77"),
        "{line}"
    );
    assert!(!table(&ns, "kube-proxy").contains("10.96.0.77"));
    // A stranger deletes the whole table: recreated as last seen.
    nft(&ns, &["delete", "table", "ip", "kube-proxy"]);
    agent.wait_log_all(&["restored", "what=table missing"]);
    wait_until("the adopted table is back", || {
        table(&ns, "kube-proxy").contains("chain services {")
    });
    // The owner deletes it: forgotten, left deleted.
    must(&ns, &[owner, "delete", "table", "ip", "kube-proxy"]);
    agent.wait_log_all(&["forgotten", "table=ip kube-proxy"]);
    assert!(!nft(&ns, &["list", "tables"]).contains("kube-proxy"));
}

/// `run --adopted-state`: an adopted table deleted while the agent was down is put back at the
/// next start, as last seen; once its selector is gone from the config, it is not.
#[test]
fn an_adopted_table_deleted_while_the_agent_is_down_is_restored_at_start() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), ADOPT_KUBE_PROXY);
    let state = dir.path().join("adopted.json");
    let state_arg = state.to_str().unwrap();
    let saved_tables = || -> Vec<String> {
        netwarden::adopted_state::read(&state)
            .map(|s| s.nftables.into_iter().map(|t| t.table).collect())
            .unwrap_or_default()
    };
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    agent.wait_log_all(&["adopted", "table=ip kube-proxy"]);
    wait_until("the adopted table saved", || {
        saved_tables() == ["kube-proxy"]
    });
    assert!(agent.terminate(), "agent exits cleanly");
    drop(agent);

    // While the agent is down, a stranger deletes it.
    nft(&ns, &["delete", "table", "ip", "kube-proxy"]);
    // `check` with the file sees it missing; without it, nothing to check.
    let cfg_arg = cfg.to_str().unwrap();
    let base = ["check", "--config", cfg_arg];
    let out = netwarden_in(&ns, &[&base[..], &["--adopted-state", state_arg]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("adopted:kube-proxy/ip/kube-proxy"), "{text}");
    assert_eq!(netwarden_in(&ns, &base).status.code(), Some(0));

    // Restarted with the file: put back as last seen, at once (nobody known deleted it, and
    // unknownActor is restore).
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    agent.wait_log_all(&["restored", "what=table missing"]);
    wait_until("the adopted table is back", || {
        let t = table(&ns, "kube-proxy");
        t.contains("chain services {") && t.contains("10.96.0.77")
    });
    assert!(agent.terminate(), "agent exits cleanly");
    drop(agent);

    // Control: the selector is gone from the config (another one adopts flannel's table). The
    // saved copy is not restored, and leaves the file.
    nft(&ns, &["delete", "table", "ip", "kube-proxy"]);
    config(
        dir.path(),
        "  adopt:\n    - name: flannel\n      nftables:\n        family: ip\n        names: [flannel-ipv4]\n      owners: [flanneld]\n",
    );
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    agent.wait_log_all(&["nftables in sync", "adopted=1"]);
    wait_until("only flannel's table in the file", || {
        saved_tables() == ["flannel-ipv4"]
    });
    assert!(
        !nft(&ns, &["list", "tables"]).contains("kube-proxy"),
        "restored although its selector is gone"
    );
    assert!(!agent
        .log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("restored")));
}

/// `run --adopted-state` writes the file at most once a second while an owner keeps changing
/// its table (kube-proxy at every Service change); a stop writes what is held. The owner's last
/// change, followed just before SIGTERM (within the second of the previous write), is in the
/// file once the agent has exited.
#[test]
fn an_owner_change_followed_just_before_a_stop_is_in_the_file() {
    let ns = sandbox();
    nft_f(&ns, OWNERS);
    let dir = tempfile::tempdir().unwrap();
    let owner = kube_proxys_nft(dir.path());
    let owner = owner.as_str();
    let cfg = config(dir.path(), ADOPT_KUBE_PROXY);
    let state = dir.path().join("adopted.json");
    let cluster_ips = || -> Vec<String> {
        netwarden::adopted_state::read(&state)
            .unwrap()
            .nftables
            .iter()
            .flat_map(|t| &t.sets)
            .filter(|s| s.name == "cluster-ips")
            .flat_map(|s| s.elements.clone())
            .collect()
    };
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state.to_str().unwrap()]);
    agent.wait_log_all(&["adopted", "table=ip kube-proxy"]);
    // Changes back to back, each followed before the next: the writer holds all but the first.
    for i in 1..=5 {
        let element = format!("{{ 10.96.1.{i} }}");
        must(
            &ns,
            &[
                owner,
                "add",
                "element",
                "ip",
                "kube-proxy",
                "cluster-ips",
                &element,
            ],
        );
        agent.wait_log_all(&["adopted table changed: copy updated"]);
    }
    assert!(agent.terminate(), "agent exits cleanly");
    let saved = cluster_ips();
    assert!(saved.contains(&"10.96.1.5".to_owned()), "{saved:?}");
}
