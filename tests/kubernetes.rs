//! Kubernetes mode against a fake API server (tests/fake_apiserver) on the host's loopback and a
//! real network namespace: the agent runs as the DaemonSet runs it, inside the namespace (the
//! node's network), where the API server's address is forwarded to the host's loopback
//! (tests/cluster).
//! Templates, ConfigMap edits, repairs told as Events, RBAC, paging; pod liveness is in
//! tests/kubernetes_pods.rs, outages, Events, backoff and the Node condition in
//! tests/kubernetes_api.rs.

mod cluster;
mod common;
mod fake_apiserver;
mod kustomize;

use cluster::*;
use common::*;
use serde_json::{json, Value};
use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

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

    // The state file holds the config and the facts the rule came from (written at most every
    // 2 s: it may trail the kernel by a moment).
    wait_until("the state file has the podCIDR", || {
        std::fs::read(c.state_file())
            .ok()
            .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
            .is_some_and(|saved| saved["facts"]["node"]["pod_cidrs"][0] == "10.244.1.0/24")
    });
    let saved: Value = serde_json::from_slice(&std::fs::read(c.state_file()).unwrap()).unwrap();
    assert!(saved["config"]
        .as_str()
        .unwrap()
        .contains("node.podCIDRs.ipv4"));
    // Only what the templates read: no Service, no EndpointSlice watched, no label kept.
    assert_eq!(saved["facts"]["services"], json!({}));
    assert_eq!(saved["facts"]["node"]["labels"], json!({}));
    let used = c.api.accesses();
    for resource in ["services", "endpointslices"] {
        assert!(
            !used.iter().any(|(_, _, r)| r == resource),
            "{resource} not needed, not asked for: {used:?}"
        );
    }

    let grants = rbac_grants();
    assert!(used.is_subset(&grants), "used {used:?}, granted {grants:?}");
    // Every request said who it came from.
    let requests = c.api.requests();
    let agent_name = format!("netwarden/{}", env!("CARGO_PKG_VERSION"));
    assert!(
        requests
            .iter()
            .all(|r| r.user_agent.as_deref() == Some(agent_name.as_str())),
        "{:?}",
        requests
            .iter()
            .map(|r| r.user_agent.clone())
            .collect::<BTreeSet<_>>()
    );
    c.assert_nothing_denied();
}

/// The fake server's RBAC is the API server's: a ConfigMap by name only with the field selector,
/// in the agent's namespace only; the API server's EndpointSlice by name only; a Node's `status`
/// subresource is a resource of its own (`nodes/status`: patch, and nothing else of the Node).
#[test]
fn the_fake_api_server_enforces_the_manifests_rbac() {
    let c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    let addr = c.api.addr.to_string();
    let get = |path: &str| {
        netwarden::telemetry::http::get(&addr, path, None, WAIT)
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

    let condition =
        r#"{"status":{"conditions":[{"type":"NetworkStateProtected","status":"True"}]}}"#;
    let node = format!("/api/v1/nodes/{NODE}");
    for (method, path, code) in [
        ("PATCH", format!("{node}/status"), 200),
        ("PATCH", node.clone(), 403),
        ("GET", format!("{node}/status"), 403),
    ] {
        let (got, body) = request(&addr, method, &path, condition);
        assert_eq!(got, code, "{method} {path}: {body}");
    }
    let denied = c.api.denied();
    let resources: Vec<(&str, &str)> = denied[6..]
        .iter()
        .map(|a| (a.verb.as_str(), a.resource.as_str()))
        .collect();
    assert_eq!(resources, [("patch", "nodes"), ("get", "nodes/status")]);
    // The refusal says what kube-apiserver says.
    let (_, body) = request(&addr, "PATCH", &node, condition);
    assert!(
        body.contains(&format!(
            "nodes \\\"{NODE}\\\" is forbidden: User \\\"system:serviceaccount:{NAMESPACE}:netwarden\\\" cannot patch resource \\\"nodes\\\""
        )),
        "{body}"
    );
    assert_eq!(
        c.node_condition("NetworkStateProtected").unwrap()["status"],
        "True"
    );
}

/// One HTTP/1.1 request with a strategic merge patch body; (status code, body).
fn request(addr: &str, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        conn,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/strategic-merge-patch+json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut answer = String::new();
    conn.read_to_string(&mut answer).unwrap();
    let code = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    let body = answer
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_owned();
    (code, body)
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
    // The adopt selector with podLiveness makes the agent watch Pods, the set's templates the
    // Services and the API server's EndpointSlices: every grant is used.
    let first = "  adopt:\n    - name: cni\n      rules:\n        priority: 512-1536\n      owners: [aws-k8s-agent]\n      podLiveness: true\n  ipsets:\n    - name: lb\n      type: hash:ip\n      members: [\"{{ services.loadBalancerIPs }}\"]\n      forbidden: [\"{{ apiserver.endpoints }}\"]\n  rules:\n    - name: a\n      priority: 100\n      from: 10.244.1.0/24\n      table: 77\n";
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
    let mut ip = IpShell::new(&ns);
    ip.send("rule del priority 101");
    wait_until("rule b is still repaired", || has_rule(&ns, rule_b));
    c.wait_event("DriftRepaired", "restored 1 rule removed by ip");
    let (_, metrics) =
        netwarden::telemetry::http::get(&agent.http(), "/metrics", None, WAIT).unwrap();
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

    // Every (verb, resource) the agent used is exactly what its ClusterRole grants. A second
    // repair by the same process updates the same Event (patch).
    ip.send("rule del priority 100");
    c.wait_event("DriftRepaired", "restored 2 rules removed by ip");
    // The Node condition was set once the initial sync was done (patch of nodes/status).
    wait_until("the node condition is set", || {
        c.node_condition("NetworkStateProtected").is_some()
    });
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

/// The LoadBalancer IP of the `i`-th Service of the paging tests.
fn nth_ip(i: usize) -> String {
    format!("198.18.{}.{}", i / 200, i % 200 + 1)
}

#[test]
fn services_are_listed_from_the_watch_cache_and_relisted_in_pages_after_a_410() {
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
    let mut agent = c.agent(&ns);
    agent.wait_log("chains and sets in sync");
    let want: BTreeSet<String> = (0..SERVICES).map(nth_ip).collect();
    let members: BTreeSet<String> = ipset_members(&ns, "lb-ips").into_iter().collect();
    assert_eq!(members, want);
    // Every node lists with resourceVersion=0: the watch cache answers, not etcd, with every
    // Service in one response.
    let pages = c.api.list_pages("services");
    assert_eq!(pages.len(), 1, "{pages:?}");
    assert!(pages[0].from_cache && pages[0].items == SERVICES && !pages[0].more);

    // The history is compacted: the watch gets 410. The cache that served the list may be
    // behind, so the agent lists the most recent version, from etcd, in pages of one snapshot;
    // and etcd compacts again while it pages: its first continue gets 410 and it lists again.
    c.api.delete("", "services", "ns0", "svc0");
    c.api.expire_after_first_page("services");
    c.api.expire();
    let mut want = want;
    want.remove(&nth_ip(0));
    agent.wait_log_all(&["listed", "resource=\"services\"", "objects=1199"]);
    wait_until("the deleted Service's IP leaves the set", || {
        ipset_members(&ns, "lb-ips").len() == SERVICES - 1
    });
    let members: BTreeSet<String> = ipset_members(&ns, "lb-ips").into_iter().collect();
    assert_eq!(members, want);
    let pages = c.api.list_pages("services");
    let after = &pages[1..];
    assert!(
        !after[0].from_cache && !after[0].continued && after[0].more,
        "{pages:?}"
    );
    assert!(after[1].expired, "{pages:?}");
    // The list again: the first page without a token, the others continuing it, all at its
    // resourceVersion, with the count of what is left.
    let list = &after[2..];
    let first = &list[0];
    assert!(first.limit == 500, "{pages:?}");
    assert!(
        !first.continued && first.more && !first.from_cache,
        "{pages:?}"
    );
    assert_eq!(
        first.remaining,
        Some(SERVICES - 1 - first.items),
        "{pages:?}"
    );
    assert_eq!(list.len(), 3, "{pages:?}");
    assert!(
        list.iter()
            .all(|p| p.resource_version == first.resource_version && !p.expired),
        "{pages:?}"
    );
    assert!(list[1..].iter().all(|p| p.continued), "{pages:?}");
    assert_eq!(
        list.iter().map(|p| p.items).sum::<usize>(),
        SERVICES - 1,
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
    let (_, metrics) =
        netwarden::telemetry::http::get(&agent.http(), "/metrics", None, WAIT).unwrap();
    assert!(
        metrics.contains("netwarden_config_reloads_total{result=\"failure\"} 1"),
        "{metrics}"
    );
}
