//! `cargo bench --bench cluster`: Kubernetes mode with 10,000 Services.
//!
//! 1. Rebuilding the desired state (pure): 10,000 Service objects turned into facts, and the
//!    config (a set of every LoadBalancer IP, the API server forbidden; a podCIDR rule) expanded
//!    against them. Target: 20 ms.
//! 2. End to end: the real agent (`netwarden run --configmap … --netns NS`) watching the fake API
//!    server (tests/fake_apiserver) that holds the 10,000 Services; one more Service is created
//!    and the bench times from the watch event leaving the server to its IP being in the kernel
//!    set (`ipset test`, polled). Target: 100 ms.
//!
//! Targets are printed, not asserted. Everything happens in a throw-away namespace. Environment:
//! NETWARDEN_BENCH_SERVICES (10000), NETWARDEN_BENCH_CHANGES (10). Results: docs/benchmarks.md.

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use fake_apiserver::FakeApiServer;
use k8s_openapi::api::core::v1::Service;
use netwarden::cluster::facts::ClusterFacts;
use netwarden::cluster::run::service_facts;
use netwarden::sandbox::Sandbox;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");

const SPEC: &str = "  resync: 600s\n  pollInterval: 1h\n  rules:\n    - name: pods\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n  ipsets:\n    - name: lb-ips\n      type: hash:ip\n      membership: exact\n      members:\n        - \"{{ services.loadBalancerIPs(type=LoadBalancer) }}\"\n      forbidden:\n        - \"{{ apiserver.endpoints }}\"\n";

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn lb_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256)
}

fn service(i: usize) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": format!("svc-{i}"), "namespace": format!("ns-{}", i % 50),
                        "labels": {"app": format!("a{}", i % 7)}},
           "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"]},
           "status": {"loadBalancer": {"ingress": [{"ip": lb_ip(i)}]}}})
}

fn config_text() -> String {
    format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{SPEC}")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rebuild(n: usize) {
    let objects: Vec<Service> = (0..n)
        .map(|i| serde_json::from_value(service(i)).unwrap())
        .collect();
    let cfg = netwarden::config::parse_kubernetes("bench", &config_text()).unwrap();
    let mut facts_times = Vec::new();
    let mut expand_times = Vec::new();
    let mut members = 0;
    for _ in 0..20 {
        let t = Instant::now();
        let mut facts = ClusterFacts {
            apiserver: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        for s in &objects {
            let f = service_facts(s);
            facts
                .services
                .insert(format!("{}/{}", f.namespace, f.name), f);
        }
        facts_times.push(t.elapsed());
        let t = Instant::now();
        let ex = netwarden::desired::expand(&cfg, &facts);
        expand_times.push(t.elapsed());
        members = ex.ipsets[0].members.len();
    }
    facts_times.sort();
    expand_times.sort();
    let total = percentile(&facts_times, 0.5) + percentile(&expand_times, 0.5);
    println!("1. rebuild of the desired state, {n} Services ({members} set members), 20 runs:");
    println!(
        "   Service objects -> facts: median {:?}, max {:?}",
        percentile(&facts_times, 0.5),
        facts_times[facts_times.len() - 1]
    );
    println!(
        "   expansion (config, facts) -> desired state: median {:?}, max {:?}",
        percentile(&expand_times, 0.5),
        expand_times[expand_times.len() - 1]
    );
    println!("   total median {total:?} (target: 20 ms)");
}

struct AgentProcess(Child);

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn in_set(ns: &Sandbox, ip: &str) -> bool {
    Command::new("ip")
        .args(["netns", "exec", &ns.name, "ipset", "test", "lb-ips", ip])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn end_to_end(n: usize, changes: usize) {
    let ns = Sandbox::create("nw-bench-k8s").expect("namespace");
    let api = FakeApiServer::start();
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = api.kubeconfig(dir.path());
    api.apply(
        "",
        "configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "netwarden", "namespace": "kube-system"},
               "data": {"config.yaml": config_text()}}),
    );
    api.apply(
        "",
        "nodes",
        json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
               "spec": {"podCIDRs": ["10.244.1.0/24"]}}),
    );
    for i in 0..n {
        api.apply("", "services", service(i));
    }
    let started = Instant::now();
    let mut child = Command::new(BIN)
        .args([
            "run",
            "--configmap",
            "kube-system/netwarden",
            "--node-name",
            "n1",
        ])
        .arg("--kubeconfig")
        .arg(&kubeconfig)
        .arg("--state-file")
        .arg(dir.path().join("state.json"))
        .args([
            "--netns",
            &ns.name,
            "--metrics-addr",
            "off",
            "--log-level",
            "info",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .expect("agent");
    let stderr = child.stderr.take().unwrap();
    let agent = AgentProcess(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("agent ready within 120 s");
        if line.contains("initial sync done") {
            break;
        }
    }
    // Drain the rest of the log so the agent never blocks on a full pipe.
    std::thread::spawn(move || for _ in rx {});
    println!(
        "2. agent ready with {n} Services (list, expansion, {n}-member set created) in {:?}",
        started.elapsed()
    );
    assert!(
        in_set(&ns, &lb_ip(n - 1)),
        "the set holds the listed Services"
    );
    let mut times = Vec::new();
    for k in 0..changes {
        let i = n + k;
        let ip = lb_ip(i);
        let t = Instant::now();
        api.apply("", "services", service(i));
        let deadline = t + Duration::from_secs(10);
        while !in_set(&ns, &ip) {
            assert!(Instant::now() < deadline, "{ip} not in the set within 10 s");
            std::thread::sleep(Duration::from_millis(1));
        }
        times.push(t.elapsed());
        std::thread::sleep(Duration::from_millis(200));
    }
    times.sort();
    println!(
        "   one Service created -> its IP in the kernel set, {changes} times: median {:?}, p90 {:?}, max {:?} (target: 100 ms; includes ~2-5 ms per `ipset test` poll process)",
        percentile(&times, 0.5),
        percentile(&times, 0.9),
        times[times.len() - 1]
    );
    drop(agent);
}

fn main() {
    let n = env("NETWARDEN_BENCH_SERVICES", 10_000);
    let changes = env("NETWARDEN_BENCH_CHANGES", 10);
    rebuild(n);
    end_to_end(n, changes);
}
