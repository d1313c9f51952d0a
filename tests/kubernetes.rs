//! Kubernetes mode against a fake API server (tests/fake_apiserver) on the host's loopback and a
//! real network namespace: the agent runs with `--netns`, its Kubernetes client stays on the
//! host's network (the watchers' thread is started before the main thread enters the namespace).
//! The fake server enforces the RBAC of deploy/ as an operator deploys it in `kube-system` (the
//! base and the pod-liveness component, rendered by tests/kustomize), and the agent is started
//! with the DaemonSet's own way of naming its ConfigMap (a bare name and POD_NAMESPACE).

mod common;
mod fake_apiserver;
mod kustomize;

use common::*;
use fake_apiserver::{FakeApiServer, Rbac};
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const NODE: &str = "node-1";
/// Where the tests deploy the agent and its ConfigMap.
const NAMESPACE: &str = "kube-system";

/// deploy/base with the pod-liveness component, moved to [`NAMESPACE`] by an overlay.
fn manifests() -> &'static [Value] {
    static RENDERED: std::sync::OnceLock<Vec<Value>> = std::sync::OnceLock::new();
    RENDERED.get_or_init(|| {
        let deploy = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
        kustomize::Overlay::new(
            NAMESPACE,
            &[&deploy.join("base")],
            &[&deploy.join("components/pod-liveness")],
            &[],
        )
        .render()
    })
}

/// What RBAC grants the agent's ServiceAccount in [`manifests`].
fn rbac() -> Rbac {
    Rbac::for_service_account(manifests(), NAMESPACE, "netwarden")
}

/// The `--configmap` argument and the POD_NAMESPACE the DaemonSet of [`manifests`] gives.
fn daemonset_configmap() -> (String, String) {
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
const RULE: &str = "100: from 10.244.1.0/24 lookup 77";

fn node(pod_cidrs: &[&str]) -> Value {
    let mut spec = json!({});
    if !pod_cidrs.is_empty() {
        spec = json!({"podCIDR": pod_cidrs[0], "podCIDRs": pod_cidrs});
    }
    json!({"apiVersion": "v1", "kind": "Node",
           "metadata": {"name": NODE, "labels": {"kubernetes.io/hostname": NODE}},
           "spec": spec,
           "status": {"addresses": [{"type": "InternalIP", "address": "10.200.0.1"}]}})
}

fn configmap(spec: &str) -> Value {
    let text = format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}");
    json!({"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "netwarden", "namespace": NAMESPACE},
           "data": {"config.yaml": text}})
}

fn apiserver_slice(ips: &[&str]) -> Value {
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
           "metadata": {"name": "kubernetes", "namespace": "default",
                        "labels": {"kubernetes.io/service-name": "kubernetes"}},
           "addressType": "IPv4",
           "endpoints": [{"addresses": ips, "conditions": {"ready": true}}],
           "ports": [{"name": "https", "port": 6443, "protocol": "TCP"}]})
}

fn lb_service(ns: &str, name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name, "namespace": ns, "labels": {"app": name}},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.50", "clusterIPs": ["10.96.0.50"],
                    "ports": [{"port": 80, "protocol": "TCP"}]},
           "status": {"loadBalancer": {"ingress": [{"ip": ip}]}}})
}

/// A fake cluster with its kubeconfig and the agent's state file in a temporary directory.
struct Cluster {
    api: FakeApiServer,
    dir: tempfile::TempDir,
    kubeconfig: PathBuf,
}

impl Cluster {
    fn new(spec: &str, pod_cidrs: &[&str]) -> Cluster {
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
        }
    }

    fn state_file(&self) -> PathBuf {
        self.dir.path().join("state/state.json")
    }

    fn agent(&self, ns: &Sandbox) -> Agent {
        self.agent_with(ns, &[])
    }

    fn agent_with(&self, ns: &Sandbox, extra: &[&str]) -> Agent {
        self.agent_full(ns, extra, &[])
    }

    fn agent_full(&self, ns: &Sandbox, extra: &[&str], env: &[(&str, &str)]) -> Agent {
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
        Agent::start_run(ns, &args, &env)
    }

    /// Nothing the agent asked for was refused.
    fn assert_nothing_denied(&self) {
        let denied = self.api.denied();
        assert!(denied.is_empty(), "refused by RBAC: {denied:?}");
    }

    /// Events the agent posted: (reason, message).
    fn events(&self) -> Vec<(String, String)> {
        self.api
            .objects("", "events")
            .iter()
            .map(|e| {
                assert_eq!(e["involvedObject"]["kind"], "Node");
                assert_eq!(e["involvedObject"]["name"], NODE);
                (
                    e["reason"].as_str().unwrap_or_default().to_owned(),
                    e["message"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect()
    }

    fn wait_event(&self, reason: &str, needle: &str) -> String {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let events = self.events();
            if let Some((_, m)) = events
                .iter()
                .find(|(r, m)| r == reason && m.contains(needle))
            {
                return m.clone();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out after {WAIT:?} waiting for a {reason} Event with `{needle}`; posted: {events:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

const POD_RULE: &str = "  rules:\n    - name: pods-to-overlay\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n";

fn has_rule(ns: &Sandbox, rule: &str) -> bool {
    count(&rules(ns), rule) == 1
}

/// The (verb, group, resource) triples the RBAC of [`manifests`] grants the agent.
fn rbac_grants() -> BTreeSet<(String, String, String)> {
    rbac().grants()
}

/// The agent's /status document.
fn get_status(addr: &str) -> Value {
    let (code, body) = netwarden::obs::http::get(addr, "/status", None, WAIT).unwrap();
    assert_eq!(code, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// `netwarden_pending_templated_objects{reason=…}` from /metrics.
fn pending_gauge(addr: &str, reason: &str) -> Option<u64> {
    let (_, text) = netwarden::obs::http::get(addr, "/metrics", None, WAIT).unwrap();
    let series = format!("netwarden_pending_templated_objects{{reason=\"{reason}\"}} ");
    text.lines()
        .find_map(|l| l.strip_prefix(&series))
        .map(|v| v.parse().unwrap())
}

fn ipset_members(ns: &Sandbox, set: &str) -> Vec<String> {
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

#[test]
fn pod_cidr_rule_follows_the_node_and_is_repaired() {
    let ns = sandbox();
    let c = Cluster::new(POD_RULE, &[]);
    let mut agent = c.agent(&ns);
    // No podCIDR yet: pending, not an error, and nothing added.
    agent.wait_log_all(&[
        "pending",
        "pods-to-overlay",
        "waiting for {{ node.podCIDRs.ipv4 }}",
    ]);
    assert!(!rules(&ns).iter().any(|r| r.contains("lookup 77")));
    // Reported where an operator looks: /status (and `netwarden status`) and the gauge.
    let addr = agent.http();
    let status = get_status(&addr);
    assert_eq!(status["pending"].as_array().unwrap().len(), 1, "{status}");
    let p = &status["pending"][0];
    assert_eq!(p["name"], "pods-to-overlay", "{status}");
    assert_eq!(p["path"], "spec.rules[0]", "{status}");
    assert_eq!(p["cause"], "no_value", "{status}");
    assert!(
        p["reason"]
            .as_str()
            .unwrap()
            .contains("waiting for {{ node.podCIDRs.ipv4 }}"),
        "{status}"
    );
    assert_eq!(pending_gauge(&addr, "no_value"), Some(1));
    let out = netwarden(&["status", "--addr", &addr]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains(
            "pending  pods-to-overlay (spec.rules[0]): waiting for {{ node.podCIDRs.ipv4 }}"
        ),
        "{table}"
    );

    c.api
        .apply("", "nodes", node(&["10.244.1.0/24", "fd00:10:244:1::/64"]));
    wait_until("the podCIDR rule appears", || has_rule(&ns, RULE));
    // The value arrived: no longer pending anywhere.
    assert_eq!(get_status(&addr)["pending"], json!([]));
    assert_eq!(pending_gauge(&addr, "no_value"), Some(0));
    agent.wait_log_all(&["no longer pending", "pods-to-overlay"]);
    // Put in place because the config now names it: nobody removed it, so it is no repair.
    agent.wait_log_all(&[
        "placed: newly protected by a config change",
        "pods-to-overlay",
    ]);

    // Through a process that stays until the repair is told: a plain `ip rule del` may be gone
    // before the attribution looks (then `unknown`), on a machine loaded by parallel tests.
    let ip = IpBatch::run(&ns, "rule del priority 100 from 10.244.1.0/24 table 77");
    wait_until("the deleted rule comes back", || has_rule(&ns, RULE));
    // Told on the Node, aggregated.
    let m = c.wait_event("DriftRepaired", "restored 1 rule removed by ip");
    drop(ip);
    assert!(m.starts_with("restored 1 rule"), "{m}");
    let told: Vec<_> = c
        .events()
        .into_iter()
        .filter(|(r, _)| r == "DriftRepaired")
        .collect();
    assert_eq!(told.len(), 1, "only the deletion is a repair: {told:?}");

    // The state file holds the config and the facts the rule came from.
    let saved: Value = serde_json::from_slice(&std::fs::read(c.state_file()).unwrap()).unwrap();
    assert_eq!(saved["facts"]["node"]["pod_cidrs"][0], "10.244.1.0/24");
    assert!(saved["config"]
        .as_str()
        .unwrap()
        .contains("node.podCIDRs.ipv4"));

    let grants = rbac_grants();
    let used = c.api.accesses();
    assert!(used.is_subset(&grants), "used {used:?}, granted {grants:?}");
    c.assert_nothing_denied();
}

/// The fake server's RBAC is the API server's: a ConfigMap by name only with the field selector,
/// in the agent's namespace only; the API server's EndpointSlice by name only.
#[test]
fn the_fake_api_server_enforces_the_manifests_rbac() {
    let c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    let addr = c.api.addr.to_string();
    let get = |path: &str| {
        netwarden::obs::http::get(&addr, path, None, WAIT)
            .unwrap()
            .0
    };
    let by_name = "fieldSelector=metadata.name%3Dnetwarden";
    for (path, code) in [
        (format!("/api/v1/namespaces/{NAMESPACE}/configmaps?{by_name}"), 200),
        (format!("/api/v1/namespaces/{NAMESPACE}/configmaps"), 403),
        (format!("/api/v1/namespaces/{NAMESPACE}/configmaps?fieldSelector=metadata.name%3Dother"), 403),
        (format!("/api/v1/namespaces/default/configmaps?{by_name}"), 403),
        (format!("/api/v1/configmaps?{by_name}"), 403),
        ("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?fieldSelector=metadata.name%3Dkubernetes".into(), 200),
        ("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices?labelSelector=kubernetes.io%2Fservice-name%3Dkubernetes".into(), 403),
        (format!("/api/v1/nodes?fieldSelector=metadata.name%3D{NODE}"), 200),
        ("/api/v1/services".into(), 200),
        ("/api/v1/pods?fieldSelector=spec.nodeName%3Dnode-1".into(), 200),
        (format!("/api/v1/namespaces/{NAMESPACE}/secrets"), 403),
    ] {
        assert_eq!(get(&path), code, "{path}");
    }
    assert_eq!(c.api.denied().len(), 6);
}

#[test]
fn load_balancer_ips_join_the_set_but_never_the_api_server() {
    let ns = sandbox();
    let spec = "  ipsets:\n    - name: lb-ips\n      type: hash:ip\n      membership: exact\n      members:\n        - \"{{ services.loadBalancerIPs(type=LoadBalancer) }}\"\n      forbidden:\n        - \"{{ apiserver.endpoints }}\"\n";
    let c = Cluster::new(spec, &["10.244.1.0/24"]);
    let mut agent = c.agent(&ns);
    agent.wait_log("chains and sets in sync");
    assert_eq!(ipset_members(&ns, "lb-ips"), Vec::<String>::new());

    // A Service that (as in the kube-router incident) lists the API server's own address.
    c.api.apply(
        "",
        "services",
        lb_service("kube-system", "evil", "10.0.0.1"),
    );
    c.api
        .apply("", "services", lb_service("default", "web", "198.51.100.7"));
    wait_until("the LoadBalancer IP joins the set", || {
        ipset_members(&ns, "lb-ips") == ["198.51.100.7"]
    });
    agent.wait_log_all(&["pending", "`10.0.0.1` is forbidden"]);

    c.api.apply(
        "",
        "services",
        lb_service("default", "web2", "198.51.100.8"),
    );
    wait_until("a second IP joins", || {
        ipset_members(&ns, "lb-ips").len() == 2
    });
    c.api.delete("", "services", "default", "web");
    wait_until("the deleted Service's IP leaves", || {
        ipset_members(&ns, "lb-ips") == ["198.51.100.8"]
    });
    // Someone adds the API server's address by hand: a forbidden member is taken out.
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ipset", "add", "lb-ips", "10.0.0.1",
        ])
        .status()
        .unwrap();
    assert!(out.success());
    wait_until("the forbidden member is removed", || {
        !ipset_members(&ns, "lb-ips").contains(&"10.0.0.1".to_owned())
    });
    c.wait_event(
        "ForbiddenMembersRemoved",
        "removed 1 forbidden member from ipset lb-ips: 10.0.0.1",
    );
}

#[test]
fn chain_and_set_repairs_are_told_on_the_node() {
    let ns = sandbox();
    let spec = "  pollInterval: 200ms\n  chains:\n    - name: nw-input\n      table: filter\n      chain: NW-INPUT\n      rules: [\"-s 192.0.2.0/24 -j ACCEPT\"]\n      jumps:\n        - {chain: INPUT, rule: -j NW-INPUT, position: first}\n  ipsets:\n    - name: allowed\n      type: hash:ip\n      members: [192.0.2.1]\n      forbidden: [192.0.2.66]\n";
    let c = Cluster::new(spec, &["10.244.1.0/24"]);
    let mut agent = c.agent_with(&ns, &["--iptables-backend", "nft"]);
    agent.wait_log("chains and sets in sync");

    // The protected chain is deleted the way a person would: jump, rules, chain.
    must(&ns, &["iptables-nft", "-D", "INPUT", "-j", "NW-INPUT"]);
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-nft", "-F", "NW-INPUT"])
        .status();
    let _ = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-nft", "-X", "NW-INPUT"])
        .status();
    // Told on the Node, summed, naming the process that committed the nf_tables transaction.
    let m = c.wait_event("DriftRepaired", "removed by iptables-nft");
    assert!(m.starts_with("restored ") && m.contains(" chain"), "{m}");

    // A member taken out of the set: polled, so nobody is named.
    must(&ns, &["ipset", "del", "allowed", "192.0.2.1"]);
    c.wait_event("DriftRepaired", "restored 1 ipset removed by unknown");
    must(&ns, &["ipset", "add", "allowed", "192.0.2.66"]);
    c.wait_event(
        "ForbiddenMembersRemoved",
        "removed 1 forbidden member from ipset allowed: 192.0.2.66",
    );
    // The initial sync created the chain and the set: that is not told as a repair.
    assert!(
        !c.events()
            .iter()
            .any(|(_, m)| m.contains("ipset") && m.contains("chain")),
        "{:?}",
        c.events()
    );
}

#[test]
fn configmap_edits_apply_at_once_and_a_broken_edit_keeps_the_last_good_config() {
    let ns = sandbox();
    // The adopt selector with podLiveness makes the agent watch Pods: every grant is used.
    let first = "  adopt:\n    - name: cni\n      rules:\n        priority: 512-1536\n      owners: [aws-k8s-agent]\n      podLiveness: true\n  rules:\n    - name: a\n      priority: 100\n      from: 10.244.1.0/24\n      table: 77\n";
    let c = Cluster::new(first, &[]);
    let agent = c.agent(&ns);
    assert!(has_rule(&ns, RULE));

    let second = format!(
        "{first}    - name: b\n      priority: 101\n      from: 10.244.2.0/24\n      table: 78\n"
    );
    c.api.apply("", "configmaps", configmap(&second));
    let rule_b = "101: from 10.244.2.0/24 lookup 78";
    wait_until("the new rule is applied", || has_rule(&ns, rule_b));

    // A typo: refused whole, reported, and both rules are still protected.
    let broken = format!("{second}      tabel: 79\n");
    c.api.apply("", "configmaps", configmap(&broken));
    let m = c.wait_event("ConfigRejected", "unknown field `tabel`");
    assert!(
        m.contains("ConfigMap kube-system/netwarden key config.yaml rejected"),
        "{m}"
    );
    ns.ip(&["rule", "del", "priority", "101"]).unwrap();
    wait_until("rule b is still repaired", || has_rule(&ns, rule_b));
    let (_, metrics) = netwarden::obs::http::get(&agent.http(), "/metrics", None, WAIT).unwrap();
    assert!(
        metrics.contains("netwarden_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );

    // Rule b removed from the config: no longer protected, and left in place.
    c.api.apply("", "configmaps", configmap(first));
    wait_until("the reload is logged", || {
        agent
            .log
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.contains("config loaded"))
            .count()
            >= 3
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(has_rule(&ns, rule_b), "not deleted from the host");
    ns.ip(&["rule", "del", "priority", "101"]).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert!(!has_rule(&ns, rule_b), "not protected any more");
    assert!(has_rule(&ns, RULE));

    // Every (verb, resource) the agent used is exactly what its ClusterRole grants.
    ns.ip(&["rule", "del", "priority", "100"]).unwrap();
    c.wait_event("DriftRepaired", "restored 1 rule");
    assert_eq!(c.api.accesses(), rbac_grants());
    c.assert_nothing_denied();
}

#[test]
fn watch_expiry_outage_and_restart_during_the_outage() {
    let ns = sandbox();
    let mut c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    // A corrupt state file from an earlier life is reported, set aside (not overwritten by the
    // next write) and ignored.
    std::fs::create_dir_all(c.state_file().parent().unwrap()).unwrap();
    let corrupt = b"{\"version\": 1, \"config\": \"trunc";
    std::fs::write(c.state_file(), corrupt).unwrap();
    let mut agent = c.agent(&ns);
    let line = agent.wait_log_all(&["unusable state file set aside", "corrupt or truncated"]);
    assert!(line.contains("file=\"state\""), "{line}");
    let kept = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("kept_as="))
        .expect("where it was kept");
    assert_eq!(std::fs::read(kept).unwrap(), corrupt);
    wait_until("the podCIDR rule", || has_rule(&ns, RULE));

    // The history is compacted: every watch gets 410 and relists; a change made meanwhile is
    // picked up by the relist.
    let (lists, _) = c.api.counts();
    c.api.expire();
    c.api.bookmark();
    c.api.apply("", "nodes", node(&["10.244.2.0/24"]));
    let moved = "100: from 10.244.2.0/24 lookup 77";
    wait_until("the new podCIDR's rule", || has_rule(&ns, moved));
    assert!(c.api.counts().0 > lists, "relisted after 410");

    // The state file is written right after an update is handed to the loops (a repair never
    // waits for the disk), so it may trail the kernel by a moment.
    wait_until("the state file has the new podCIDR", || {
        std::fs::read_to_string(c.state_file()).is_ok_and(|t| t.contains("10.244.2.0/24"))
    });

    // The API server goes away: enforcement goes on.
    c.api.stop();
    ns.ip(&["rule", "del", "priority", "100"]).unwrap();
    wait_until("repaired during the outage", || has_rule(&ns, moved));
    agent.wait_log("API server unreachable");

    // The agent restarts while the API server is still away: the state file carries it.
    assert!(agent.terminate());
    ns.ip(&["rule", "del", "priority", "100"]).unwrap();
    let mut agent = c.agent(&ns);
    agent.wait_log("enforcing the last-known state from the state file");
    assert!(
        has_rule(&ns, moved),
        "rules {:?}\nstate file {}\nlog:\n{}",
        rules(&ns),
        std::fs::read_to_string(c.state_file()).unwrap_or_default(),
        agent.log.lock().unwrap().join("\n")
    );
    ns.ip(&["rule", "del", "priority", "100"]).unwrap();
    wait_until("repaired from the state file's state", || {
        has_rule(&ns, moved)
    });

    // The API server is back (same port, same objects): the watches resume by themselves.
    c.api.start_again();
    c.api.apply("", "nodes", node(&["10.244.3.0/24"]));
    wait_until("a change after the outage is applied", || {
        has_rule(&ns, "100: from 10.244.3.0/24 lookup 77")
    });
}

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

fn metrics(agent: &Agent) -> String {
    netwarden::obs::http::get(&agent.http(), "/metrics", None, WAIT)
        .unwrap()
        .1
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
    let (_, status) = netwarden::obs::http::get(&agent.http(), "/status", None, WAIT).unwrap();
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

/// The LoadBalancer IP of the `i`-th Service of the paging tests.
fn nth_ip(i: usize) -> String {
    format!("198.18.{}.{}", i / 200, i % 200 + 1)
}

#[test]
fn more_services_than_one_page_are_all_seen() {
    // kube-runtime's watcher lists 500 objects a page: 1,200 Services take three.
    const SERVICES: usize = 1_200;
    let ns = sandbox();
    let spec = "  ipsets:\n    - name: lb-ips\n      type: hash:ip\n      membership: exact\n      members:\n        - \"{{ services.loadBalancerIPs(type=LoadBalancer) }}\"\n";
    let c = Cluster::new(spec, &["10.244.1.0/24"]);
    for i in 0..SERVICES {
        c.api.apply(
            "",
            "services",
            lb_service(&format!("ns{}", i % 7), &format!("svc{i}"), &nth_ip(i)),
        );
    }
    // etcd compacts while the agent pages: its first continue gets 410 and it lists again.
    c.api.expire_after_first_page("services");
    let mut agent = c.agent(&ns);
    agent.wait_log("chains and sets in sync");
    let want: BTreeSet<String> = (0..SERVICES).map(nth_ip).collect();
    let members: BTreeSet<String> = ipset_members(&ns, "lb-ips").into_iter().collect();
    assert_eq!(members.len(), SERVICES);
    assert_eq!(members, want);

    let pages = c.api.list_pages("services");
    // The first list: one page, then its token had expired.
    assert!(!pages[0].continued && pages[0].more, "{pages:?}");
    assert!(pages[1].expired, "{pages:?}");
    // The list again, in pages of one snapshot: the first without a token, the others continuing
    // it, all at its resourceVersion, with the count of what is left.
    let list = &pages[2..];
    let first = &list[0];
    assert!(first.limit > 0 && first.limit < SERVICES, "{pages:?}");
    assert!(!first.continued && first.more, "{pages:?}");
    assert_eq!(first.remaining, Some(SERVICES - first.items), "{pages:?}");
    assert!(list.len() >= 3, "{pages:?}");
    assert!(
        list.iter()
            .all(|p| p.resource_version == first.resource_version && !p.expired),
        "{pages:?}"
    );
    assert!(list[1..].iter().all(|p| p.continued), "{pages:?}");
    assert_eq!(
        list.iter().map(|p| p.items).sum::<usize>(),
        SERVICES,
        "{pages:?}"
    );
    assert!(!list.last().unwrap().more, "{pages:?}");
}

#[test]
fn the_fake_api_server_pages_like_the_real_one() {
    use k8s_openapi::api::core::v1::Service;
    use kube::api::{Api, ListParams};
    let c = Cluster::new("  rules: []\n", &[]);
    for i in 0..1_200 {
        c.api.apply(
            "",
            "services",
            lb_service("default", &format!("svc{i:04}"), &nth_ip(i)),
        );
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let kc = kube::config::Kubeconfig::read_from(&c.kubeconfig).unwrap();
        let config = kube::Config::from_custom_kubeconfig(kc, &Default::default())
            .await
            .unwrap();
        let api: Api<Service> = Api::all(kube::Client::try_from(config).unwrap());
        let first = api.list(&ListParams::default().limit(500)).await.unwrap();
        assert_eq!(first.items.len(), 500);
        assert_eq!(first.metadata.remaining_item_count, Some(700));
        let rv = first.metadata.resource_version.clone();
        let token = first.metadata.continue_.clone().unwrap();

        // Changes between pages do not show: every page is cut from the first one's snapshot.
        c.api.delete("", "services", "default", "svc1199");
        c.api.apply(
            "",
            "services",
            lb_service("default", "svc9999", "198.19.0.1"),
        );
        let second = api
            .list(&ListParams::default().limit(500).continue_token(&token))
            .await
            .unwrap();
        assert_eq!(second.metadata.resource_version, rv);
        assert_eq!(second.metadata.remaining_item_count, Some(200));
        let third = api
            .list(
                &ListParams::default()
                    .limit(500)
                    .continue_token(second.metadata.continue_.as_deref().unwrap()),
            )
            .await
            .unwrap();
        assert_eq!(third.items.len(), 200);
        assert_eq!(third.metadata.continue_, None);
        assert_eq!(third.metadata.remaining_item_count, None);
        let names: Vec<String> = [&first, &second, &third]
            .iter()
            .flat_map(|l| l.items.iter())
            .map(|s| s.metadata.name.clone().unwrap())
            .collect();
        let want: Vec<String> = (0..1_200).map(|i| format!("svc{i:04}")).collect();
        assert_eq!(names, want, "each once, in order, as of the first page");

        // A selector: pages all the same, but no count of what is left.
        let labelled = api
            .list(&ListParams::default().labels("app").limit(500))
            .await
            .unwrap();
        assert!(labelled.metadata.continue_.is_some());
        assert_eq!(labelled.metadata.remaining_item_count, None);

        // Once the history is compacted the token is too old: 410 Expired, relist.
        c.api.expire();
        let err = api
            .list(&ListParams::default().limit(500).continue_token(&token))
            .await
            .unwrap_err();
        match err {
            kube::Error::Api(s) => assert_eq!((s.code, s.reason.as_str()), (410, "Expired")),
            other => panic!("{other:?}"),
        }
    });
}

/// A chain spec whose one rule is `rule`, in table filter.
fn chain_spec(rule: &str) -> String {
    format!("  pollInterval: 200ms\n  chains:\n    - name: nw-ct\n      table: filter\n      chain: NW-CT\n      content: contains\n      rules: [\"{rule}\"]\n")
}

fn nw_ct(ns: &Sandbox) -> Vec<String> {
    must(ns, &["iptables-nft-save", "-t", "filter"])
        .lines()
        .filter_map(|l| l.strip_prefix("-A NW-CT "))
        .map(str::to_owned)
        .collect()
}

/// Without a scratch namespace (as under the runtime's default seccomp profile), a rule written
/// otherwise than iptables prints it is given up after one write; the ConfigMap edit that writes
/// it as printed brings protection back.
#[test]
fn a_configmap_edit_brings_a_given_up_chain_back() {
    let ns = sandbox();
    let c = Cluster::new(
        &chain_spec("-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        &[],
    );
    let mut agent = c.agent_full(
        &ns,
        &["--iptables-backend", "nft"],
        &[("NETWARDEN_SCRATCH_NETNS", "off")],
    );
    agent.wait_log("repair does not take");
    let printed = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT";
    assert_eq!(nw_ct(&ns), [printed]);
    c.api
        .apply("", "configmaps", configmap(&chain_spec(printed)));
    agent.wait_log("chains and sets reloaded");
    must(&ns, &["iptables-nft", "-F", "NW-CT"]);
    wait_until("repaired after the edit", || nw_ct(&ns) == [printed]);
}

/// A ConfigMap edit with a rule iptables makes two of is refused whole: an Event, the config in
/// use stays.
#[test]
fn a_configmap_edit_with_a_rule_iptables_splits_is_rejected() {
    let ns = sandbox();
    let c = Cluster::new(&chain_spec("-s 10.0.0.1 -j RETURN"), &[]);
    let agent = c.agent_with(&ns, &["--iptables-backend", "nft"]);
    assert_eq!(
        nw_ct(&ns),
        ["-s 10.0.0.1/32 -j RETURN"],
        "compared as printed"
    );
    c.api.apply(
        "",
        "configmaps",
        configmap(&chain_spec("-s 10.0.0.1,10.0.0.2 -j RETURN")),
    );
    let m = c.wait_event("ConfigRejected", "iptables makes 2 rules of it");
    assert!(m.contains("spec.chains[0].rules[0]"), "{m}");
    must(&ns, &["iptables-nft", "-F", "NW-CT"]);
    wait_until("the config in use still protects the chain", || {
        nw_ct(&ns) == ["-s 10.0.0.1/32 -j RETURN"]
    });
    let (_, metrics) = netwarden::obs::http::get(&agent.http(), "/metrics", None, WAIT).unwrap();
    assert!(
        metrics.contains("netwarden_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
}
