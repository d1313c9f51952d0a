//! Kubernetes mode: `podLiveness` adopt selectors against the fake API server's Pods
//! (tests/fake_apiserver), with rules a copy of `ip` named like the VPC CNI's agent adds.

mod cluster;
mod common;
mod fake_apiserver;
mod kustomize;

use cluster::*;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Per-pod rules adopted from the kernel, tied to the node's pods.
fn pod_spec(grace: &str) -> String {
    format!(
        "  adopt:\n    - name: vpc-cni\n      rules:\n        family: ipv4\n        priority: 512-1536\n      owners: [aws-k8s-agent, aws-cni]\n      podLiveness: true\n      podLivenessGrace: {grace}\n"
    )
}

/// `ip`, copied under the name of the VPC CNI's agent: rules it adds come from a process named
/// like the owner (its command name is the file's name).
fn owner_tool(dir: &Path) -> PathBuf {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .expect("the ip tool");
    let owner = dir.join("aws-k8s-agent");
    std::fs::copy(ip, &owner).unwrap();
    owner
}

/// The owner adds a rule (`ARGS` as for `ip rule add`).
fn owner_adds(ns: &Sandbox, owner: &Path, args: &[&str]) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .arg(owner)
        .args(["rule", "add"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
}

/// The pair of rules the VPC CNI adds for a pod on a secondary ENI.
fn add_pod_rules(ns: &Sandbox, owner: &Path, ip: &str, table: &str) {
    owner_adds(ns, owner, &["priority", "512", "to", ip, "table", "main"]);
    owner_adds(ns, owner, &["priority", "1536", "from", ip, "table", table]);
}

fn pod_rules(ip: &str, table: &str) -> [String; 2] {
    [
        format!("512: from all to {ip} lookup main"),
        format!("1536: from {ip} lookup {table}"),
    ]
}

/// A non-owner (`ip`) deletes a pod's two rules.
fn del_pod_rules(ns: &Sandbox, ip: &str) {
    ns.ip(&["rule", "del", "priority", "512", "to", ip])
        .unwrap();
    ns.ip(&["rule", "del", "priority", "1536", "from", ip])
        .unwrap();
}

#[test]
fn rules_of_a_deleted_pod_are_forgotten() {
    let ns = sandbox();
    // A resync every second: one must pass between the forgetting and the proof.
    let c = Cluster::new(
        &format!("  resync: 1s\n{}", pod_spec("1h")),
        &["10.1.0.0/16"],
    );
    c.api.apply_pod("default", "a", NODE, &["10.1.1.20"]);
    c.api.apply_pod("default", "b", NODE, &["10.1.1.21"]);
    c.api.apply_pod("default", "c", NODE, &["10.1.1.22"]);
    let owner = owner_tool(c.dir.path());
    let adopted = c.dir.path().join("adopted.json");
    let mut agent = c.agent_with(&ns, &["--adopted-state", adopted.to_str().unwrap()]);
    agent.wait_log("watching this node's Pods");

    add_pod_rules(&ns, &owner, "10.1.1.20", "2");
    add_pod_rules(&ns, &owner, "10.1.1.21", "3");
    add_pod_rules(&ns, &owner, "10.1.1.22", "2");
    // The pods' IPs are seen held: from now on a pod's deletion forgets its rules at once.
    agent.wait_log_all(&["pod liveness", "followed=6", "held=6"]);

    // Pod a is deleted; pod c's IP changes.
    c.api.delete_pod("default", "a");
    c.api.apply_pod("default", "c", NODE, &["10.1.1.23"]);
    let forgotten = |ip: &str| {
        agent
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| {
                l.contains("forgotten: no pod on this node holds its IP")
                    && l.contains(&format!("{ip}/32"))
                    && l.contains("reason=pod_gone")
            })
            .count()
    };
    wait_until("pod a's and pod c's rules are forgotten", || {
        forgotten("10.1.1.20") == 2 && forgotten("10.1.1.22") == 2
    });
    assert_eq!(forgotten("10.1.1.21"), 0);
    // A full refresh re-reads the kernel, where the forgotten rules still are: they are not
    // adopted again.
    agent.wait_log_all(&["full refresh", "timer"]);
    // Proof: someone else deletes all six rules; only pod b's are put back.
    del_pod_rules(&ns, "10.1.1.20");
    del_pod_rules(&ns, "10.1.1.22");
    del_pod_rules(&ns, "10.1.1.21");
    wait_until("pod b's rules are restored", || {
        pod_rules("10.1.1.21", "3").iter().all(|r| has_rule(&ns, r))
    });
    // Deleted before pod b's were, and their removal was handled first: for good.
    let r = rules(&ns);
    for ip in ["10.1.1.20", "10.1.1.22"] {
        for rule in pod_rules(ip, "2") {
            assert_eq!(count(&r, &rule), 0, "{rule} stays deleted: {r:?}");
        }
    }
    let gone = |t: &str| !t.contains("10.1.1.20") && !t.contains("10.1.1.22");
    let (_, status) =
        netwarden::telemetry::http::get(&agent.http(), "/status", None, WAIT).unwrap();
    assert!(gone(&status) && status.contains("10.1.1.21"), "{status}");
    wait_until("the adopted-state file forgets them too", || {
        std::fs::read_to_string(&adopted).is_ok_and(|t| gone(&t) && t.contains("10.1.1.21"))
    });
    // The owner's own removal is counted apart (its process stays while the agent looks it up).
    let del = IpBatch::run_with(&ns, &owner, "rule del priority 1536 from 10.1.1.21");
    agent.wait_log("forgotten: removed by its owner");
    drop(del);
    let m = metrics(&agent);
    for (reason, n) in [("pod_gone", 4), ("owner", 1), ("pod_grace_expired", 0)] {
        let line =
            format!("netwarden_adopted_forgotten_total{{kind=\"rule\",reason=\"{reason}\"}} {n}");
        assert!(m.contains(&line), "{line} in:\n{m}");
    }

    // Pods were listed and watched by node, as the ClusterRole allows.
    let used = c.api.accesses();
    for verb in ["list", "watch"] {
        assert!(used.contains(&(verb.into(), String::new(), "pods".into())));
    }
    let grants = rbac_grants();
    assert!(used.is_subset(&grants), "used {used:?}, granted {grants:?}");
    c.assert_nothing_denied();
}

#[test]
fn an_ip_no_pod_holds_is_kept_through_the_grace_period_then_forgotten() {
    let ns = sandbox();
    let c = Cluster::new(&pod_spec("4s"), &["10.1.0.0/16"]);
    // The CNI sets up pod `late` before the API server shows its IP.
    c.api.apply_pod("default", "late", NODE, &[]);
    // The orphan's IP is held, but on another node: it is none of this node's business.
    c.api
        .apply_pod("default", "elsewhere", "node-2", &["10.1.1.30"]);
    let owner = owner_tool(c.dir.path());
    let mut agent = c.agent(&ns);
    agent.wait_log("watching this node's Pods");

    let late = "1536: from 10.1.1.31 lookup 2";
    let orphan = "1536: from 10.1.1.30 lookup 2";
    owner_adds(
        &ns,
        &owner,
        &["priority", "1536", "from", "10.1.1.31", "table", "2"],
    );
    agent.wait_log_all(&["pod liveness", "followed=1", "held=0"]);
    c.api.apply_pod("default", "late", NODE, &["10.1.1.31"]);
    agent.wait_log_all(&["pod liveness", "followed=1", "held=1"]);
    owner_adds(
        &ns,
        &owner,
        &["priority", "1536", "from", "10.1.1.30", "table", "2"],
    );
    agent.wait_log_all(&["pod liveness", "followed=2", "held=1"]);

    // Within the grace period the orphan is protected like any adopted rule.
    ns.ip(&["rule", "del", "priority", "1536", "from", "10.1.1.30"])
        .unwrap();
    wait_until("the orphan is restored", || has_rule(&ns, orphan));

    agent.wait_log_all(&[
        "forgotten: no pod on this node holds its IP",
        "10.1.1.30",
        "reason=pod_grace_expired",
    ]);
    ns.ip(&["rule", "del", "priority", "1536", "from", "10.1.1.30"])
        .unwrap();
    // The late pod's rule, whose grace period (had its IP not shown up) ended first, is still
    // protected.
    ns.ip(&["rule", "del", "priority", "1536", "from", "10.1.1.31"])
        .unwrap();
    wait_until("the late pod's rule is restored", || has_rule(&ns, late));
    assert!(!has_rule(&ns, orphan), "forgotten: {:?}", rules(&ns));
    let forgotten = agent
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("forgotten"))
        .cloned()
        .collect::<Vec<_>>();
    assert_eq!(forgotten.len(), 1, "{forgotten:?}");
    let m = metrics(&agent);
    assert!(
        m.contains(
            "netwarden_adopted_forgotten_total{kind=\"rule\",reason=\"pod_grace_expired\"} 1"
        ),
        "{m}"
    );
}

#[test]
fn a_pod_deleted_during_an_outage_is_forgotten_once_the_api_server_is_back() {
    let ns = sandbox();
    let mut c = Cluster::new(&pod_spec("1h"), &["10.1.0.0/16"]);
    c.api.apply_pod("default", "a", NODE, &["10.1.1.20"]);
    let owner = owner_tool(c.dir.path());
    let mut agent = c.agent(&ns);
    agent.wait_log("watching this node's Pods");
    add_pod_rules(&ns, &owner, "10.1.1.20", "2");
    agent.wait_log_all(&["pod liveness", "followed=2", "held=2"]);

    // The API server goes away; meanwhile the pod is deleted.
    c.api.stop();
    agent.wait_log("API server unreachable");
    c.api.delete_pod("default", "a");
    // The agent cannot know: the rules stay protected.
    del_pod_rules(&ns, "10.1.1.20");
    wait_until("the rules are restored during the outage", || {
        pod_rules("10.1.1.20", "2").iter().all(|r| has_rule(&ns, r))
    });

    // Back (history compacted: the Pods are listed again), the deletion is seen.
    c.api.start_again();
    agent.wait_log_all(&["forgotten", "10.1.1.20", "reason=pod_gone"]);
}
