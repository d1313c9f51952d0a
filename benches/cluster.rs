//! `cargo bench --bench cluster`: Kubernetes mode with 10,000 and 50,000 Services as kubectl
//! leaves them (managedFields, the last-applied annotation; about 2.3 KB of JSON each).
//!
//! 1. Pure: the Services' JSON read into what the agent keeps (`cluster::slim`; paid once per
//!    Service, as it is listed or changes), and the rebuild a change causes: the config (a set of
//!    every LoadBalancer IP, the API server forbidden; a podCIDR rule) expanded against them.
//!    Target: 20 ms for 10,000.
//! 2. End to end, for each size: the real agent (`netwarden run --configmap … --netns NS`)
//!    watching the fake API server (tests/fake_apiserver) that holds the Services. Printed: the
//!    list (`resourceVersion=0`, one response from the "watch cache", read as it arrives), the
//!    time to the initial sync, the agent's peak RSS (VmHWM; goal: 64 MiB, the DaemonSet's limit
//!    is 256Mi) and, with the template, one Service created → its IP in the kernel set (`ipset
//!    test`, polled; target 100 ms). The same agent with a config without `services.*`
//!    templates shows what it costs when nothing needs the Services (it does not watch them).
//!
//! Targets are printed, not asserted. Everything happens in throw-away namespaces. Environment:
//! NETWARDEN_BENCH_SERVICES (`10000,50000`), NETWARDEN_BENCH_CHANGES (10), NETWARDEN_BENCH_BIN
//! (another agent binary, e.g. an older build, run the same way). Results: docs/benchmarks.md.

#[path = "../tests/fake_apiserver/mod.rs"]
mod fake_apiserver;

use fake_apiserver::FakeApiServer;
use netwarden::cluster::slim::{service_facts, Interner, Service};
use netwarden::model::facts::ClusterFacts;
use netwarden::testing::sandbox::Sandbox;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

const SPEC: &str = "  resync: 600s\n  pollInterval: 1h\n  rules:\n    - name: pods\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n  ipsets:\n    - name: lb-ips\n      type: hash:ip\n      membership: exact\n      members:\n        - \"{{ services.loadBalancerIPs(type=LoadBalancer) }}\"\n      forbidden:\n        - \"{{ apiserver.endpoints }}\"\n";
/// The same without any `services.*` template.
const SPEC_NO_SERVICES: &str = "  resync: 600s\n  pollInterval: 1h\n  rules:\n    - name: pods\n      priority: 100\n      from: \"{{ node.podCIDRs.ipv4 }}\"\n      table: 77\n";

fn env_list(name: &str, default: &[usize]) -> Vec<usize> {
    std::env::var(name)
        .ok()
        .map(|v| v.split(',').filter_map(|n| n.trim().parse().ok()).collect())
        .unwrap_or_else(|| default.to_vec())
}

fn lb_ip(i: usize) -> String {
    format!("10.{}.{}.{}", 100 + i / 65_536, (i / 256) % 256, i % 256)
}

/// A LoadBalancer Service as `kubectl apply` and a cloud controller leave it.
fn service(i: usize) -> Value {
    let name = format!("svc-{i}");
    let ns = format!("ns-{}", i % 50);
    let app = format!("a{}", i % 7);
    let cluster_ip = format!("10.96.{}.{}", (i / 256) % 256, i % 256);
    let applied = json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"annotations": {}, "labels": {"app": app, "tier": "web", "team": "payments"},
                     "name": name, "namespace": ns},
        "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP", "targetPort": 8080},
                           {"name": "https", "port": 443, "protocol": "TCP", "targetPort": 8443}],
                 "selector": {"app": app}, "type": "LoadBalancer"}});
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": ns,
            "labels": {"app": app, "tier": "web", "team": "payments"},
            "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": format!("{applied}\n"),
                "service.beta.kubernetes.io/aws-load-balancer-type": "nlb"},
            "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
            "managedFields": [
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "manager": "kubectl-client-side-apply",
                 "operation": "Update", "time": "2024-01-01T00:00:00Z",
                 "fieldsV1": {"f:metadata": {"f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}, "f:service.beta.kubernetes.io/aws-load-balancer-type": {}},
                                             "f:labels": {".": {}, "f:app": {}, "f:team": {}, "f:tier": {}}},
                              "f:spec": {"f:allocateLoadBalancerNodePorts": {}, "f:externalTrafficPolicy": {}, "f:internalTrafficPolicy": {},
                                         "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}},
                                                     "k:{\"port\":443,\"protocol\":\"TCP\"}": {".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                                         "f:selector": {}, "f:sessionAffinity": {}, "f:type": {}}}},
                {"apiVersion": "v1", "fieldsType": "FieldsV1", "manager": "aws-cloud-controller-manager",
                 "operation": "Update", "subresource": "status", "time": "2024-01-01T00:00:05Z",
                 "fieldsV1": {"f:metadata": {"f:finalizers": {".": {}, "v:\"service.kubernetes.io/load-balancer-cleanup\"": {}}},
                              "f:status": {"f:loadBalancer": {"f:ingress": {}}}}}]},
        "spec": {"allocateLoadBalancerNodePorts": true, "clusterIP": cluster_ip, "clusterIPs": [cluster_ip],
                 "externalTrafficPolicy": "Cluster", "internalTrafficPolicy": "Cluster",
                 "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack",
                 "ports": [{"name": "http", "nodePort": 30000 + i % 2000, "port": 80, "protocol": "TCP", "targetPort": 8080},
                           {"name": "https", "nodePort": 32000 + i % 700, "port": 443, "protocol": "TCP", "targetPort": 8443}],
                 "selector": {"app": app}, "sessionAffinity": "None", "type": "LoadBalancer"},
        "status": {"loadBalancer": {"ingress": [{"ip": lb_ip(i), "ipMode": "VIP"}]}}})
}

fn config_text(spec: &str) -> String {
    format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn rebuild(n: usize) {
    let texts: Vec<String> = (0..n).map(|i| service(i).to_string()).collect();
    let bytes: usize = texts.iter().map(String::len).sum();
    let cfg = netwarden::config::parse_kubernetes("bench", &config_text(SPEC)).unwrap();
    let mut facts_times = Vec::new();
    let mut expand_times = Vec::new();
    let mut members = 0;
    for _ in 0..10 {
        let t = Instant::now();
        let mut facts = ClusterFacts {
            apiserver: vec!["10.0.0.1".parse().unwrap()],
            ..Default::default()
        };
        let services = std::sync::Arc::make_mut(&mut facts.services);
        let strings = Interner::default();
        for text in &texts {
            let s: Service = serde_json::from_str(text).unwrap();
            let f = service_facts(s, &strings);
            services.insert(format!("{}/{}", f.namespace, f.name), f.into());
        }
        facts_times.push(t.elapsed());
        let t = Instant::now();
        let ex = netwarden::desired::expand(&cfg, &facts);
        expand_times.push(t.elapsed());
        members = ex.ipsets[0].members.len();
    }
    facts_times.sort();
    expand_times.sort();
    println!(
        "1. {n} Services ({} MB of JSON, {members} set members), 10 runs:",
        bytes / 1_000_000
    );
    println!(
        "   Service JSON -> what the agent keeps (paid once per Service, as it is listed or changes): median {:?}, max {:?}",
        percentile(&facts_times, 0.5),
        facts_times[facts_times.len() - 1]
    );
    println!(
        "   rebuild on a change: expansion (config, facts) -> desired state: median {:?}, max {:?} (target for 10000: 20 ms)",
        percentile(&expand_times, 0.5),
        expand_times[expand_times.len() - 1]
    );
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

/// Peak and current resident set of a process, in MiB (VmHWM, VmRSS).
fn rss(pid: u32) -> (f64, f64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            .map_or(0.0, |kb| kb / 1024.0)
    };
    (field("VmHWM:"), field("VmRSS:"))
}

/// A field of a log line (`took_ms=123`).
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
}

/// Starts the agent; waits for its initial sync, collecting the Services list line on the way.
fn start_agent(
    api: &FakeApiServer,
    dir: &std::path::Path,
    ns: &Sandbox,
) -> (AgentProcess, Receiver<String>, Duration, Option<String>) {
    let bin = std::env::var("NETWARDEN_BENCH_BIN")
        .unwrap_or_else(|_| env!("CARGO_BIN_EXE_netwarden").to_owned());
    let started = Instant::now();
    let mut child = Command::new(bin)
        .args([
            "run",
            "--configmap",
            "kube-system/netwarden",
            "--node-name",
            "n1",
        ])
        .arg("--kubeconfig")
        .arg(api.kubeconfig(dir))
        .arg("--state-file")
        .arg(dir.join("state.json"))
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
    let trace = std::env::var("NETWARDEN_BENCH_TRACE").is_ok();
    let t0 = Instant::now();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if trace {
                eprintln!(
                    "   [{:>7.3}s] {}",
                    t0.elapsed().as_secs_f64(),
                    &line[line.len().min(27)..]
                );
            }
            let _ = tx.send(line);
        }
    });
    if trace {
        let pid = agent.0.id();
        std::thread::spawn(move || {
            let mut last = 0.0;
            loop {
                let (peak, now) = rss(pid);
                if now == 0.0 {
                    break;
                }
                if (now - last).abs() >= 2.0 {
                    eprintln!(
                        "   [{:>7.3}s] RSS {now:.1} MiB (peak {peak:.1})",
                        t0.elapsed().as_secs_f64()
                    );
                    last = now;
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        });
    }
    let mut listed = None;
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(300))
            .expect("agent ready within 300 s");
        if line.contains("listed") && line.contains("services") {
            listed = Some(line.clone());
        }
        if line.contains("initial sync done") {
            break;
        }
    }
    (agent, rx, started.elapsed(), listed)
}

fn end_to_end(api: &FakeApiServer, n: usize, changes: usize, with_services: bool) {
    let ns = Sandbox::create("nw-bench-k8s").expect("namespace");
    let dir = tempfile::tempdir().unwrap();
    let spec = if with_services {
        SPEC
    } else {
        SPEC_NO_SERVICES
    };
    api.apply(
        "",
        "configmaps",
        json!({"apiVersion": "v1", "kind": "ConfigMap",
               "metadata": {"name": "netwarden", "namespace": "kube-system"},
               "data": {"config.yaml": config_text(spec)}}),
    );
    let (agent, rx, ready, listed) = start_agent(api, dir.path(), &ns);
    let what = if with_services {
        "with a services.loadBalancerIPs template"
    } else {
        "without services.* templates"
    };
    println!("2. {n} Services, config {what}:");
    println!("   agent ready (list, expansion, kernel sync) in {ready:?}");
    match &listed {
        Some(line) => println!(
            "   Services list (resourceVersion=0, one response): {} ms for {} objects, {} kept",
            field(line, "took_ms").unwrap_or("?"),
            field(line, "objects").unwrap_or("?"),
            field(line, "kept").unwrap_or("?"),
        ),
        None => println!("   Services not listed (not watched)"),
    }
    let (peak, now) = rss(agent.0.id());
    println!(
        "   RSS after the initial sync: peak {peak:.1} MiB, now {now:.1} MiB (goal: peak 64 MiB)"
    );
    if with_services {
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
            let deadline = t + Duration::from_secs(20);
            while !in_set(&ns, &ip) {
                assert!(Instant::now() < deadline, "{ip} not in the set within 20 s");
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
        for k in 0..changes {
            api.delete(
                "",
                "services",
                &format!("ns-{}", (n + k) % 50),
                &format!("svc-{}", n + k),
            );
        }
        let (peak, now) = rss(agent.0.id());
        println!("   RSS after the changes: peak {peak:.1} MiB, now {now:.1} MiB");
        // The history is compacted: the watch gets 410 and the agent lists again, from "etcd"
        // (resourceVersion unset) in pages of 500, updating its cache in place.
        while rx.try_recv().is_ok() {}
        api.expire();
        let relisted = loop {
            let line = rx
                .recv_timeout(Duration::from_secs(300))
                .expect("relisted within 300 s");
            if line.contains("listed") && line.contains("services") {
                break line;
            }
        };
        let (peak, now) = rss(agent.0.id());
        println!(
            "   relist after a 410 (pages of 500): {} ms; RSS peak {peak:.1} MiB, now {now:.1} MiB",
            field(&relisted, "took_ms").unwrap_or("?")
        );
    }
    // Keep reading the log so the agent never blocks on a full pipe.
    std::thread::spawn(move || for _ in rx {});
    drop(agent);
}

fn main() {
    let sizes = env_list("NETWARDEN_BENCH_SERVICES", &[10_000, 50_000]);
    let changes = env_list("NETWARDEN_BENCH_CHANGES", &[10])[0];
    for &n in &sizes {
        rebuild(n);
    }
    for &n in &sizes {
        let api = FakeApiServer::start();
        api.apply(
            "",
            "nodes",
            json!({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"},
                   "spec": {"podCIDRs": ["10.244.1.0/24"]}}),
        );
        let loading = Instant::now();
        for i in 0..n {
            api.apply("", "services", service(i));
        }
        // Compacted: the fake server keeps no history of the load (memory of the bench only).
        api.expire();
        println!(
            "   ({n} Services loaded into the fake API server in {:?})",
            loading.elapsed()
        );
        end_to_end(&api, n, changes, true);
        end_to_end(&api, n, changes, false);
    }
}
