//! `netwarden networkd` against the distribution's systemd-networkd in the rig
//! (tests/rig/networkd.rs): its prediction of what a restart removes is what the restart then
//! removes, as an independent listener sees it (no agent runs: nothing is put back); with the
//! drop-ins it prints, written with `--write-root`, a restart removes nothing protected; run in
//! the agent's pod (`--root /host`) it says the same. In Kubernetes mode the same finding is a
//! metric and a warning Event at start.

mod common;
mod fake_apiserver;
mod rig;

use common::*;
use fake_apiserver::FakeApiServer;
use netwarden::desired::DesiredState;
use rig::networkd::Networkd;
use rig::outage::{listener_in, Key, Outage};
use rig::{sample, scrape, wait_scrape};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

/// networkd manages veth0 (its address 10.200.0.1/24); veth2 is someone else's (a CNI bridge).
const NETWORK: &str =
    "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.1/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";

/// What a kube-router node protects: its rule and table 77 through networkd's link, a route on
/// the CNI's own link, and networkd's address.
const SPEC: &str = r#"  rules:
    - name: pod-cidr
      priority: 100
      from: 10.244.1.0/24
      table: 77
  routes:
    - name: overlay-default
      table: 77
      destination: default
      gateway: 10.200.0.254
      device: veth0
    - name: overlay-pods
      table: 77
      destination: 10.244.0.0/16
      device: veth0
    - name: cni-services
      table: 78
      destination: 10.96.0.0/12
      device: veth2
  addresses:
    - name: node-address
      device: veth0
      address: 10.200.0.1/24
      managedBy: systemd-networkd
"#;

/// A catch-all for wired NICs that the CNI's bridge must not match: networkd takes `Type=` from
/// udev's DEVTYPE, which is `bridge` for cni0.
const WIRED: &str = "[Match]\nName=cni*\nType=ether\n\n[Network]\nLinkLocalAddressing=no\n";

fn node() -> (Sandbox, Networkd) {
    node_with(&[("10-veth0.network", NETWORK)])
}

/// The node with these .network files; besides the veth pairs a CNI's bridge `cni0`, up.
fn node_with(files: &[(&str, &str)]) -> (Sandbox, Networkd) {
    let ns = Sandbox::create("nw-nda").expect("create namespace");
    ns.ip(&["link", "add", "cni0", "type", "bridge"]).unwrap();
    ns.ip(&["link", "set", "cni0", "up"]).unwrap();
    for (a, b) in [("veth0", "veth1"), ("veth2", "veth3")] {
        ns.ip(&["link", "add", a, "type", "veth", "peer", "name", b])
            .unwrap();
        ns.ip(&["link", "set", a, "up"]).unwrap();
        ns.ip(&["link", "set", b, "up"]).unwrap();
    }
    must(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns.ip(&["address", "add", "10.210.0.1/24", "dev", "veth2"])
        .unwrap();
    let mut nd = Networkd::new(&ns.name, files).unwrap();
    nd.start().unwrap();
    nd.wait_configured("veth0").unwrap();
    (ns, nd)
}

/// Puts the protected rules and routes in place, as kube-router and the CNI would.
fn install(ns: &Sandbox) {
    ns.batch(
        &[],
        "rule add priority 100 from 10.244.1.0/24 table 77\n\
         route replace default via 10.200.0.254 dev veth0 table 77\n\
         route replace 10.244.0.0/16 dev veth0 table 77\n\
         route replace 10.96.0.0/12 dev veth2 table 78\n",
    )
    .unwrap();
}

fn command(ns: &Sandbox, nd: &Networkd, cfg: &Path, extra: &[&str]) -> (i32, Value) {
    let root = format!("/proc/{}/root", nd.holder_pid());
    let mut args = vec![
        "networkd",
        "--config",
        cfg.to_str().unwrap(),
        "--root",
        &root,
        "--output",
        "json",
    ];
    args.extend_from_slice(extra);
    let out = netwarden_in(ns, &args);
    let text = String::from_utf8_lossy(&out.stdout);
    let json: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), json)
}

/// (name, effect) of a prediction.
fn predicted(json: &Value, event: &str) -> BTreeSet<(String, String)> {
    json[event]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["name"].as_str().unwrap().to_string(),
                a["effect"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

/// What a restart really took away: the names of the rules and routes seen lost, and whether
/// the address was removed.
fn restart_and_watch(ns: &Sandbox, nd: &mut Networkd, cfg: &Path) -> (BTreeSet<String>, bool) {
    let desired = DesiredState::from_config(&netwarden::config::load(cfg).unwrap());
    let listener = listener_in(&ns.name).unwrap();
    let mut outage = Outage::for_config(cfg, |d| nd.ifindex(d).ok()).unwrap();
    outage.seed_addresses([(nd.ifindex("veth0").unwrap(), "10.200.0.1".parse().unwrap())]);
    nd.restart().unwrap();
    nd.wait_configured("veth0").unwrap();
    outage.read_until_quiet(&listener, Duration::from_millis(300), WAIT);
    assert!(!outage.overrun);
    let names = outage
        .lost_ever()
        .into_iter()
        .map(|k| match k {
            Key::Rule(r) => desired.rules[r].name.clone(),
            Key::Route(r) => desired.routes[r].name.clone(),
        })
        .collect();
    (names, outage.address_removals > 0)
}

#[test]
fn the_prediction_is_what_a_restart_removes_and_the_drop_ins_prevent_it() {
    let (ns, mut nd) = node();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    install(&ns);

    let (code, json) = command(&ns, &nd, &cfg, &[]);
    assert_eq!(code, 1, "objects at risk: {json:#}");
    assert_eq!(json["apiVersion"], "netwarden.io/v1alpha1");
    assert_eq!(json["kind"], "NetworkdReport");
    assert_eq!(json["running"], true);
    assert_eq!(json["managed"][0]["link"], "veth0");
    let restart = predicted(&json, "restart");
    let expected: BTreeSet<(String, String)> = [
        ("pod-cidr", "removed"),
        ("overlay-default", "removed"),
        ("overlay-pods", "removed"),
        ("node-address", "readded"),
    ]
    .iter()
    .map(|(n, e)| (n.to_string(), e.to_string()))
    .collect();
    assert_eq!(restart, expected, "{json:#}");

    // The real restart removes exactly that (the route on veth2 stays: networkd does not
    // manage veth2).
    let (lost, address_removed) = restart_and_watch(&ns, &mut nd, &cfg);
    let predicted_lost: BTreeSet<String> = restart
        .iter()
        .filter(|(_, e)| e != "readded")
        .map(|(n, _)| n.clone())
        .collect();
    assert_eq!(lost, predicted_lost);
    assert!(address_removed, "networkd 252 re-adds its own address");
    assert_eq!(
        count(
            &lines(&ns, &["-4", "address", "show", "dev", "veth0"]),
            "inet 10.200.0.1/24 brd 10.200.0.255 scope global veth0"
        ),
        1
    );

    // The drop-ins, written where networkd reads them (the rig's /etc/systemd); networkd is not
    // restarted by the command.
    install(&ns);
    let pid = nd.pid();
    let (code, json) = command(
        &ns,
        &nd,
        &cfg,
        &["--write-root", &format!("/proc/{}/root", nd.holder_pid())],
    );
    assert_eq!(code, 1);
    assert_eq!(nd.pid(), pid, "networkd was not restarted");
    let paths: Vec<&str> = json["dropins"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        paths,
        [
            "/etc/systemd/networkd.conf.d/60-netwarden.conf",
            "/etc/systemd/network/10-veth0.network.d/60-netwarden.conf"
        ]
    );
    assert!(json["restartWithDropins"].as_array().unwrap().is_empty());
    let (code, json) = command(&ns, &nd, &cfg, &[]);
    assert_eq!(code, 0, "with the drop-ins nothing is at risk: {json:#}");

    let (lost, address_removed) = restart_and_watch(&ns, &mut nd, &cfg);
    assert!(lost.is_empty(), "lost with the drop-ins: {lost:?}");
    assert!(
        !address_removed,
        "KeepConfiguration=static keeps the address"
    );
    assert!(nd.log_lines("Removing foreign routing policy rule").len() == 1);
}

/// `kubectl exec` in the agent's pod (docs/troubleshooting.md): the node's root is at /host with
/// only what the DaemonSet mounts there (networkd's configuration and state, no /sys), and the
/// command's own /sys is the container's, which shows the node's links (hostNetwork). Its report
/// is the one made on the node.
#[test]
fn in_the_agents_pod_the_report_is_the_one_made_on_the_node() {
    let (ns, nd) = node_with(&[("10-veth0.network", NETWORK), ("20-wired.network", WIRED)]);
    install(&ns);
    ns.ip(&["route", "add", "10.97.0.0/16", "dev", "cni0", "table", "78"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let spec = SPEC.replace(
        "  addresses:",
        "    - name: cni-bridge\n      table: 78\n      destination: 10.97.0.0/16\n      device: cni0\n  addresses:",
    );
    let cfg = config(dir.path(), &spec);
    let (code, on_node) = command(&ns, &nd, &cfg, &[]);
    assert_eq!(code, 1, "{on_node:#}");
    let managed: Vec<&str> = on_node["managed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["link"].as_str().unwrap())
        .collect();
    assert_eq!(managed, ["veth0"], "cni0 is a bridge: {on_node:#}");
    assert!(
        !predicted(&on_node, "restart")
            .iter()
            .any(|(name, _)| name == "cni-bridge"),
        "{on_node:#}"
    );

    // The pod's /host: the DaemonSet's three read-only mounts of the node's directories.
    let host = dir.path().join("host");
    for d in ["etc/systemd", "run/systemd", "usr/lib/systemd"] {
        let at = host.join(d);
        std::fs::create_dir_all(at.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(nd.path(d), &at).unwrap();
    }
    let out = deployed::in_container(&Privileges::of_daemonset(), &ns.name, Path::new(BIN))
        .args(["networkd", "--config", cfg.to_str().unwrap()])
        .args(["--root", host.to_str().unwrap(), "--output", "json"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let in_pod: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {text}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert_eq!(in_pod, on_node);
    assert_eq!(out.status.code(), Some(code));

    // Without `--root /host` the pod's own root holds none of networkd's files: an error, not
    // "nothing at risk".
    let bare = tempfile::tempdir().unwrap();
    let out = deployed::in_container(&Privileges::of_daemonset(), &ns.name, Path::new(BIN))
        .args(["networkd", "--config", cfg.to_str().unwrap()])
        .args(["--root", bare.path().to_str().unwrap()])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("systemd-networkd runs (pid ")
            && stderr.contains("(`/host` in the agent's pod)"),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------------
// Kubernetes mode: the same finding as a metric and a warning Event, once per start

const NODE: &str = "node-1";

#[test]
fn in_kubernetes_mode_the_finding_is_a_metric_and_a_warning_event() {
    let (ns, nd) = node();
    install(&ns);
    let api = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    let text = format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{SPEC}");
    api.apply(
        "",
        "configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "netwarden", "namespace": "kube-system"},
               "data": {"config.yaml": text}}),
    );
    api.apply(
        "",
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": NODE}, "spec": {},
               "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.1"}]}}),
    );
    let state = dir.path().join("state.json");
    let root = format!("/proc/{}/root", nd.holder_pid());
    // The agent runs inside the namespace (the node), the API server on the host's loopback.
    deployed::reach_host(&ns.name, api.addr);
    let agent = Agent::start_run(
        &ns,
        &[
            "--configmap",
            "kube-system/netwarden",
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
            "--node-name",
            NODE,
            "--state-file",
            state.to_str().unwrap(),
            "--event-window-ms",
            "200",
            "--networkd-root",
            &root,
        ],
        &[],
    );
    let http = agent.http();
    let at_risk = |t: &str, kind: &str| {
        sample(
            t,
            "netwarden_networkd_objects_at_risk",
            &[("event", "restart"), ("kind", kind)],
        )
    };
    wait_scrape(&http, "the networkd finding", WAIT, |t| {
        at_risk(t, "route").is_some()
    });
    let text = scrape(&http);
    assert_eq!(at_risk(&text, "rule"), Some(1.0));
    assert_eq!(at_risk(&text, "route"), Some(2.0));
    assert_eq!(at_risk(&text, "address"), Some(1.0));
    let deadline = std::time::Instant::now() + WAIT;
    let events = loop {
        let events: Vec<(String, String)> = api
            .objects("", "events")
            .iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                    e["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect();
        if events.iter().any(|(r, _)| r == "NetworkdWillRemove") {
            break events;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no NetworkdWillRemove Event: {events:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    let warned: Vec<&(String, String)> = events
        .iter()
        .filter(|(r, _)| r == "NetworkdWillRemove")
        .collect();
    assert_eq!(warned.len(), 1, "{events:?}");
    assert!(
        warned[0].1.contains("4 protected objects"),
        "{}",
        warned[0].1
    );
    assert!(warned[0].1.contains("pod-cidr"), "{}", warned[0].1);
    assert_eq!(
        api.objects("", "events")
            .iter()
            .find(|e| e["reason"] == "NetworkdWillRemove")
            .unwrap()["type"],
        "Warning"
    );
}
