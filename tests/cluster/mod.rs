//! A fake cluster for the Kubernetes-mode tests: the fake API server (tests/fake_apiserver)
//! holding this node's Node, the agent's ConfigMap and the API server's EndpointSlice, a
//! kubeconfig and a state file in a temporary directory, and helpers to read what the agent
//! posted. Used by tests/kubernetes*.rs.
//!
//! The fake server enforces the RBAC of deploy/ as an operator deploys it in `kube-system` (the
//! base and the pod-liveness component, rendered by tests/kustomize), and the agent is started
//! with the DaemonSet's own way of naming its ConfigMap (a bare name and POD_NAMESPACE).
#![allow(dead_code)] // each test binary uses its own subset

use crate::common::*;
use crate::fake_apiserver::{FakeApiServer, Rbac};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const NODE: &str = "node-1";
/// Where the tests deploy the agent and its ConfigMap.
pub const NAMESPACE: &str = "kube-system";
pub const RULE: &str = "100: from 10.244.1.0/24 lookup 77";
pub const POD_RULE: &str = "  rules:\n    - name: pods-to-overlay\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n";

/// deploy/base with the pod-liveness component, moved to [`NAMESPACE`] by an overlay.
pub fn manifests() -> &'static [Value] {
    static RENDERED: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    RENDERED.get_or_init(|| {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        crate::kustomize::Overlay::new(
            NAMESPACE,
            &[&deploy.join("base")],
            &[&deploy.join("components/pod-liveness")],
            &[],
        )
        .render()
    })
}

/// What RBAC grants the agent's ServiceAccount in [`manifests`].
pub fn rbac() -> Rbac {
    Rbac::for_service_account(manifests(), NAMESPACE, "netwarden")
}

/// The `--configmap` argument and the POD_NAMESPACE the DaemonSet of [`manifests`] gives.
pub fn daemonset_configmap() -> (String, String) {
    let ds = manifests()
        .iter()
        .find(|o| o["kind"] == "DaemonSet")
        .unwrap();
    let args: Vec<&str> = ds["spec"]["template"]["spec"]["containers"][0]["args"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a.as_str().unwrap())
        .collect();
    let configmap = args[args.iter().position(|a| *a == "--configmap").unwrap() + 1];
    (
        configmap.to_owned(),
        ds["metadata"]["namespace"].as_str().unwrap().to_owned(),
    )
}

pub fn node(pod_cidrs: &[&str]) -> Value {
    let mut spec = json!({});
    if !pod_cidrs.is_empty() {
        spec = json!({"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs});
    }
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
           "spec": spec,
           "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.1"}],
                      "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}]}})
}

pub fn configmap(spec: &str) -> Value {
    let text = format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}");
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "netwarden", "namespace": NAMESPACE},
           "data": {"config.yaml": text}})
}

pub fn apiserver_slice(ips: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "kubernetes", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "kubernetes"}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": ips, "conditions": {"ready": true}}],
           "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]})
}

pub fn lb_service(ns: &str, name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                    "ports": [{"port": 80, "protocol": "TCP"}]},
           "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})
}

/// A fake cluster with its kubeconfig and the agent's state file in a temporary directory.
pub struct Cluster {
    pub api: FakeApiServer,
    pub dir: tempfile::TempDir,
    pub kubeconfig: PathBuf,
    /// Namespaces the API server is reachable from ([`Cluster::reach_from`]).
    reached: std::sync::Mutex<BTreeSet<String>>,
}

impl Cluster {
    pub fn new(spec: &str, pod_cidrs: &[&str]) -> Cluster {
        let api = FakeApiServer::start();
        api.enforce(rbac());
        let dir = tempfile::tempdir().unwrap();
        let kubeconfig = api.kubeconfig(dir.path());
        api.apply("", "configmaps", configmap(spec));
        api.apply("", "nodes", node(pod_cidrs));
        api.apply(
            "discovery.k8s.io",
            "endpointslices",
            apiserver_slice(&["10.0.0.1"]),
        );
        Cluster {
            api,
            dir,
            kubeconfig,
            reached: Default::default(),
        }
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }

    pub fn agent(&self, ns: &Sandbox) -> Agent {
        self.agent_with(ns, &[])
    }

    pub fn agent_with(&self, ns: &Sandbox, extra: &[&str]) -> Agent {
        self.agent_full(ns, extra, &[])
    }

    /// The agent as the DaemonSet starts it, with `extra` arguments and `env` besides.
    pub fn agent_full(&self, ns: &Sandbox, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let kubeconfig = self.kubeconfig.to_str().unwrap().to_owned();
        let state = self.state_file().to_str().unwrap().to_owned();
        let (configmap, pod_namespace) = daemonset_configmap();
        let mut args = vec![
            "--configmap",
            &configmap,
            "--kubeconfig",
            &kubeconfig,
            "--node-name",
            NODE,
            "--state-file",
            &state,
            "--event-window-ms",
            "200",
        ];
        args.extend_from_slice(extra);
        let mut env = env.to_vec();
        env.push(("POD_NAMESPACE", &pod_namespace));
        self.reach_from(ns);
        Agent::start_run(ns, &args, &env)
    }

    /// The agent runs inside `ns` (the node's network), the API server on the host's loopback:
    /// its address is made reachable inside `ns` too, once per namespace.
    fn reach_from(&self, ns: &Sandbox) {
        if self.reached.lock().unwrap().insert(ns.name.clone()) {
            deployed::reach_host(&ns.name, self.api.addr);
        }
    }

    /// Nothing the agent asked for was refused.
    pub fn assert_nothing_denied(&self) {
        let denied = self.api.denied();
        assert!(denied.is_empty(), "refused by RBAC: {denied:?}");
    }

    /// The Events the agent posted, as stored.
    pub fn event_objects(&self) -> Vec<Value> {
        let events = self.api.objects("", "events");
        for e in &events {
            assert_eq!(e["involvedObject"]["kind"], "Node");
            assert_eq!(e["involvedObject"]["name"], NODE);
        }
        events
    }

    /// Events the agent posted: (reason, message).
    pub fn events(&self) -> Vec<(String, String)> {
        self.event_objects()
            .iter()
            .map(|e| {
                (
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                    e["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    /// Waits for an Event of `reason` whose message holds `needle`; returns the message.
    pub fn wait_event(&self, reason: &str, needle: &str) -> String {
        self.wait_event_object(reason, needle)["message"]
            .as_str()
            .unwrap()
            .to_owned()
    }

    pub fn wait_event_object(&self, reason: &str, needle: &str) -> Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let events = self.event_objects();
            if let Some(e) = events.iter().find(|e| {
                e["reason"] == reason && e["message"].as_str().is_some_and(|m| m.contains(needle))
            }) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for a {reason} Event with `{needle}`; posted: {:?}",
                self.events()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The node's condition of `type_`, as the API server holds it.
    pub fn node_condition(&self, type_: &str) -> Option<Value> {
        let nodes = self.api.objects("", "nodes");
        let node = nodes.iter().find(|n| n["metadata"]["name"] == NODE)?;
        node["status"]["conditions"]
            .as_array()?
            .iter()
            .find(|c| c["type"] == type_)
            .cloned()
    }
}

pub fn has_rule(ns: &Sandbox, rule: &str) -> bool {
    count(&rules(ns), rule) == 1
}

/// The (verb, group, resource) triples the RBAC of [`manifests`] grants the agent.
pub fn rbac_grants() -> BTreeSet<(String, String, String)> {
    rbac().grants()
}

/// The agent's /status document.
pub fn get_status(addr: &str) -> Value {
    let (code, body) = netwarden::telemetry::http::get(addr, "/status", None, WAIT).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

pub fn metrics(agent: &Agent) -> String {
    netwarden::telemetry::http::get(&agent.http(), "/metrics", None, WAIT)
        .unwrap()
        .1
}

/// The value of one series in /metrics text (`name{labels}` as printed).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    let prefix = format!("{series} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .map(|v| v.parse().unwrap())
}

/// `netwarden_pending_templated_objects{reason=…}` from /metrics.
pub fn pending_gauge(addr: &str, reason: &str) -> Option<u64> {
    let (_, text) = netwarden::telemetry::http::get(addr, "/metrics", None, WAIT).unwrap();
    let series = format!("netwarden_pending_templated_objects{{reason=\"{reason}\"}}");
    metric_value(&text, &series).map(|v| v as u64)
}

pub fn ipset_members(ns: &Sandbox, set: &str) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ipset", "list", set])
        .output()
        .expect("ipset");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("Members:")
        .nth(1)
        .unwrap_or("")
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(str::to_owned)
        .collect()
}

/// One `ip -batch -` process in the namespace, fed a command at a time: every change it makes
/// is attributed to the same process (`ip`), and it stays while the agent looks it up.
pub struct IpShell(Child);

impl IpShell {
    pub fn new(ns: &Sandbox) -> IpShell {
        IpShell(
            Command::new("ip")
                .args(["-n", &ns.name, "-force", "-batch", "-"])
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .spawn()
                .expect("run ip"),
        )
    }

    pub fn send(&mut self, line: &str) {
        let stdin = self.0.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
    }
}

impl Drop for IpShell {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.wait();
    }
}
