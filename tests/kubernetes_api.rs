//! Kubernetes mode as it meets the API server's moods, against the fake API server
//! (tests/fake_apiserver): Events at start and through outages, aggregated Events, prompt
//! recovery after an outage, backoff on errors the server answers, `Retry-After` on a throttling
//! server, the API server endpoint flag, and the NetworkStateProtected Node condition.

mod cluster;
mod common;
mod fake_apiserver;
mod kustomize;

use cluster::*;
use common::*;
use fake_apiserver::{Served, Throttle};
use serde_json::Value;
use std::time::{Duration, Instant};

fn drift_events(c: &Cluster) -> Vec<Value> {
    c.event_objects()
        .into_iter()
        .filter(|e| e["reason"] == "DriftRepaired")
        .collect()
}

#[test]
fn no_event_at_a_clean_start_and_what_went_missing_while_down_is_told() {
    let ns = sandbox();
    let c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    let mut agent = c.agent(&ns);
    agent.wait_log_all(&["put in place at start", "rules=1"]);
    // Nothing ran before (no state file): placing is not repairing, and nothing is posted.
    agent.wait_log("objects put in place at start: a first start or a new boot, not drift");
    // A repair after the start is told, and it is the only DriftRepaired Event.
    let mut ip = IpShell::new(&ns);
    ip.send("rule del priority 100 from 10.244.1.0/24 table 77");
    c.wait_event("DriftRepaired", "restored 1 rule removed by ip");
    let drift = drift_events(&c);
    assert_eq!(drift.len(), 1, "{drift:?}");
    assert_eq!(drift[0]["count"], 1);
    drop(ip);
    wait_until("the state file records the boot and namespace", || {
        std::fs::read_to_string(c.state_file()).is_ok_and(|t| t.contains("boot_id"))
    });

    // The agent restarts (a rollout) in the same boot and namespace; meanwhile the rule is
    // removed. The kernel is as the last agent left it, but for that: it is told.
    assert!(agent.terminate());
    ns.ip(&["rule", "del", "priority", "100"]).unwrap();
    let mut agent = c.agent(&ns);
    agent.wait_log_all(&["from the state file", "restart_in_same_boot=true"]);
    let m = c.wait_event("DriftRepaired", "missing at start");
    assert_eq!(
        m,
        "restored 1 rule missing at start: removed while netwarden was not running"
    );
    assert!(agent.terminate());

    // The same state file in another namespace (the kernel state is new, as after a reboot):
    // what the start puts in place is not told.
    let fresh = sandbox();
    let mut agent = c.agent(&fresh);
    agent.wait_log_all(&["from the state file", "restart_in_same_boot=false"]);
    agent.wait_log_all(&["put in place at start", "rules=1"]);
    agent.wait_log("objects put in place at start: a first start or a new boot, not drift");
    assert_eq!(drift_events(&c).len(), 2, "{:?}", c.events());
}

#[test]
fn repairs_during_an_outage_are_told_after_it_with_their_counts_merged() {
    let ns = sandbox();
    let spec = "  rules:\n    - {name: a, priority: 101, from: 10.1.0.0/16, table: 77}\n    - {name: b, priority: 102, from: 10.2.0.0/16, table: 77}\n    - {name: c, priority: 103, from: 10.3.0.0/16, table: 77}\n";
    let mut c = Cluster::new(spec, &[]);
    let mut agent = c.agent(&ns);
    c.api.stop();
    agent.wait_log("API server unreachable");
    // Three repairs, one at a time, each its own Event window.
    let mut ip = IpShell::new(&ns);
    for p in 101..=103 {
        ip.send(&format!("rule del priority {p}"));
        let rule = format!("{p}: from 10.{}.0.0/16 lookup 77", p - 100);
        wait_until("the rule comes back", || has_rule(&ns, &rule));
        agent.wait_log_all(&["restored", "rules=1", "actor=ip"]);
    }
    // They were to be told while the server was away: kept, not dropped.
    agent.wait_log("cannot post the Event yet; kept and retried");
    assert!(c.events().is_empty());
    c.api.start_again();
    let e = c.wait_event_object("DriftRepaired", "restored 3 rules removed by ip");
    assert_eq!(e["count"], 3, "{e}");
    assert_eq!(drift_events(&c).len(), 1, "{:?}", c.events());
    let first = e["firstTimestamp"].as_str().unwrap();
    let last = e["lastTimestamp"].as_str().unwrap();
    assert!(first <= last, "{e}");
}

#[test]
fn a_deletion_storm_is_one_event_whose_count_grows() {
    let ns = sandbox();
    let rules: String = (0..30)
        .map(|i| {
            format!(
                "    - {{name: r{i}, priority: {}, from: 10.{i}.0.0/16, table: 77}}\n",
                200 + i
            )
        })
        .collect();
    let c = Cluster::new(&format!("  rules:\n{rules}"), &[]);
    let _agent = c.agent(&ns);
    let mut ip = IpShell::new(&ns);
    for round in 0..3 {
        for i in round * 10..round * 10 + 10 {
            ip.send(&format!("rule del priority {}", 200 + i));
        }
        let told = format!("restored {} rules removed by ip", (round + 1) * 10);
        c.wait_event("DriftRepaired", &told);
    }
    let drift = drift_events(&c);
    assert_eq!(drift.len(), 1, "one Event object: {:?}", c.events());
    assert_eq!(drift[0]["count"], 30);
    // Created once, then updated (count, last time, message) as client-go's recorder does.
    let writes: Vec<String> = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.resource == "events")
        .map(|r| r.verb)
        .collect();
    // (A round repaired in two batches far enough apart is two updates: hence "at least".)
    assert_eq!(writes[0], "create", "{writes:?}");
    assert!(
        writes.len() >= 3 && writes[1..].iter().all(|v| v == "patch"),
        "{writes:?}"
    );
}

#[test]
fn facts_are_current_within_two_seconds_after_the_api_server_returns() {
    let ns = sandbox();
    let mut c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    let mut agent = c.agent(&ns);
    wait_until("the podCIDR rule", || has_rule(&ns, RULE));
    c.api.stop();
    agent.wait_log("API server unreachable");
    // The outage lasts long enough for a growing backoff (kube-runtime's default: 0.8, 1.6,
    // 3.2, 6.4 s, … up to 30 s) to be well past the server's return.
    std::thread::sleep(Duration::from_secs(12));
    c.api.apply("", "nodes", node(&["10.244.2.0/24"]));
    let back = Instant::now();
    c.api.start_again();
    let moved = "100: from 10.244.2.0/24 lookup 77";
    wait_until("the new podCIDR's rule", || has_rule(&ns, moved));
    let took = back.elapsed();
    // The server's history was compacted meanwhile: the resumed watch got 410, and the agent
    // listed the most recent version (resourceVersion unset) at once.
    let nodes: Vec<_> = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.at >= back && r.resource == "nodes")
        .collect();
    let summary: Vec<_> = nodes
        .iter()
        .map(|r| {
            (
                r.verb.clone(),
                r.code,
                r.resource_version.clone(),
                r.at - back,
            )
        })
        .collect();
    assert_eq!(nodes[0].verb, "watch", "{summary:?}");
    assert_eq!(
        (nodes[1].verb.as_str(), nodes[1].code),
        ("list", 200),
        "{summary:?}"
    );
    assert_eq!(nodes[1].resource_version, None, "{summary:?}");
    agent.wait_log("resourceVersion expired (410); listing again");
    assert!(
        took <= Duration::from_secs(2),
        "facts current {took:?} after the server came back: {summary:?}"
    );
    println!("facts current {took:?} after the API server came back");
}

#[test]
fn a_forbidden_list_backs_off_and_says_forbidden() {
    let ns = sandbox();
    let spec = format!(
        "{POD_RULE}  ipsets:\n    - name: vips\n      type: hash:ip\n      members: [\"{{{{ services.clusterIPs }}}}\"]\n"
    );
    let c = Cluster::new(&spec, &["10.244.1.0/24"]);
    // Every delay a twentieth: the first minute is 3 s, the 30 s cap 1.5 s.
    let scale = 0.05;
    let mut agent = c.agent_with(&ns, &["--api-backoff-scale", "0.05"]);
    // RBAC loses the Services; every watch ends (410) and is listed again.
    c.api.revoke("list", "", "services");
    c.api.expire();
    let line = agent.wait_log_all(&["forbidden: cannot list services", "code=403"]);
    assert!(
        line.contains(
            r#"cannot list resource \"services\" in API group \"\" at the cluster scope"#
        ),
        "the server's own words: {line}"
    );
    let forbidden = || -> Vec<Instant> {
        c.api
            .requests()
            .into_iter()
            .filter(|r| r.verb == "list" && r.resource == "services" && r.code == 403)
            .map(|r| r.at)
            .collect()
    };
    let t0 = forbidden()[0];
    // Five scaled minutes.
    let minute = Duration::from_secs(60).mul_f64(scale);
    let cap = Duration::from_secs(30).mul_f64(scale);
    while Instant::now() < t0 + minute * 5 {
        std::thread::sleep(Duration::from_millis(100));
    }
    let times = forbidden();
    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    // After the first minute, at most one request per 30 s (a few ms of timer slack).
    for (at, gap) in times.iter().zip(&gaps) {
        if *at >= t0 + minute {
            assert!(gap.as_secs_f64() >= cap.as_secs_f64() * 0.97, "{gaps:?}");
        }
    }
    println!("forbidden lists, gaps between them (scale {scale}): {gaps:?}");
    let first_minute = times.iter().filter(|t| **t < t0 + minute).count();
    assert!(
        first_minute <= 7,
        "{first_minute} requests in the first minute: {gaps:?}"
    );
    // Still asking: not given up.
    assert!(times.len() >= first_minute + 6, "{gaps:?}");
    let m = metrics(&agent);
    let failures = metric_value(
        &m,
        "netwarden_kubernetes_request_failures_total{resource=\"services\",verb=\"list\",reason=\"forbidden\"}",
    )
    .unwrap();
    assert!(failures >= times.len() as f64 - 1.0, "{m}");
    assert_eq!(
        metric_value(
            &m,
            "netwarden_kubernetes_watch_failing{resource=\"services\"}"
        ),
        Some(1.0)
    );
    // Access back: the next retry works.
    c.api.grant("list", "", "services");
    agent.wait_log_all(&["watch works again", "resource=\"services\""]);
    wait_until("the gauge says so", || {
        metric_value(
            &metrics(&agent),
            "netwarden_kubernetes_watch_failing{resource=\"services\"}",
        ) == Some(0.0)
    });
}

#[test]
fn an_explicit_api_server_endpoint_is_used() {
    let ns = sandbox();
    let c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    // The kubeconfig names an endpoint where nothing answers.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let text = std::fs::read_to_string(&c.kubeconfig).unwrap();
    std::fs::write(&c.kubeconfig, text.replace(&c.api.url(), &dead_url)).unwrap();
    let url = c.api.url();
    let _agent = c.agent_full(&ns, &[], &[("NETWARDEN_APISERVER", url.as_str())]);
    assert!(has_rule(&ns, RULE));
    assert!(!c.api.requests().is_empty());
}

#[test]
fn the_node_condition_is_set_when_protection_fails_and_cleared_when_it_works() {
    let ns = sandbox();
    let spec = "  routes:\n    - name: via-tunnel\n      table: 77\n      destination: 10.99.0.0/16\n      device: nwtun0\n";
    let c = Cluster::new(spec, &["10.244.1.0/24"]);
    let mut agent = c.agent_with(&ns, &["--node-condition-after", "1s"]);
    agent.wait_log_all(&["pending", "via-tunnel"]);
    let condition = || c.node_condition("NetworkStateProtected");
    wait_until("the condition is False", || {
        condition().is_some_and(|c| c["status"] == "False")
    });
    let failing = condition().unwrap();
    assert_eq!(failing["reason"], "ObjectsPending", "{failing}");
    let message = failing["message"].as_str().unwrap();
    assert!(
        message.starts_with("1 cannot be put in place for more than 1s: route via-tunnel ("),
        "{message}"
    );
    // The kubelet's conditions stay (a strategic merge by type).
    assert!(c.node_condition("Ready").is_some());
    assert_eq!(
        metric_value(
            &metrics(&agent),
            "netwarden_network_state_protected{reason=\"ObjectsPending\"}"
        ),
        Some(0.0)
    );

    // The device appears: the route is put in place, the condition clears.
    must(
        &ns,
        &[
            "ip", "link", "add", "nwtun0", "type", "veth", "peer", "name", "nwtun0p",
        ],
    );
    must(&ns, &["ip", "link", "set", "nwtun0", "up"]);
    must(&ns, &["ip", "link", "set", "nwtun0p", "up"]);
    wait_until("the condition is True", || {
        condition().is_some_and(|c| c["status"] == "True")
    });
    let healthy = condition().unwrap();
    assert_eq!(healthy["reason"], "Protected", "{healthy}");
    assert!(
        healthy["lastTransitionTime"].as_str() >= failing["lastTransitionTime"].as_str(),
        "{failing} then {healthy}"
    );
    assert_eq!(
        metric_value(
            &metrics(&agent),
            "netwarden_network_state_protected{reason=\"Protected\"}"
        ),
        Some(1.0)
    );
    agent.wait_log_all(&["node condition", "status=\"True\""]);
}

/// (answer, gap to the next request) for each request in `served`: the gaps a client left after
/// each answer, as the server saw them.
fn gaps_after(served: &[Served]) -> Vec<(u16, Duration)> {
    served
        .windows(2)
        .map(|w| (w[0].code, w[1].at - w[0].at))
        .collect()
}

#[test]
fn a_throttled_list_and_watch_wait_for_retry_after_then_recover() {
    let ns = sandbox();
    let spec = format!(
        "{POD_RULE}  ipsets:\n    - name: vips\n      type: hash:ip\n      members: [\"{{{{ services.clusterIPs }}}}\"]\n"
    );
    let c = Cluster::new(&spec, &["10.244.1.0/24"]);
    // The agent's own delays a twentieth (50 ms after a first error): only the server's
    // Retry-After can space the retries by a second.
    let mut agent = c.agent_with(&ns, &["--api-backoff-scale", "0.05"]);
    // The relist after an expiry is throttled three times (a Status, as the storage layer
    // answers), the watch after it twice (plain text, as priority and fairness answers).
    c.api.throttle("list", "services", Throttle::status(3, 1));
    c.api
        .throttle("watch", "services", Throttle::priority_and_fairness(2, 1));
    let mark = Instant::now();
    c.api.expire();
    let services = || -> Vec<Served> {
        c.api
            .requests()
            .into_iter()
            .filter(|r| r.at >= mark && r.resource == "services")
            .collect()
    };
    wait_until("the watch is served again", || {
        services()
            .iter()
            .any(|r| r.verb == "watch" && r.code == 200)
    });
    // Recovered: a Service created now reaches the set through the watch.
    c.api
        .apply("", "services", lb_service("default", "web", "192.0.2.10"));
    wait_until("the Service's IP in the set", || {
        ipset_members(&ns, "vips").contains(&"10.96.0.50".to_owned())
    });
    let served = services();
    let summary: Vec<_> = served.iter().map(|r| (r.verb.as_str(), r.code)).collect();
    let throttled: Vec<_> = summary.iter().filter(|(_, code)| *code == 429).collect();
    assert_eq!(
        throttled,
        [
            &("list", 429),
            &("list", 429),
            &("list", 429),
            &("watch", 429),
            &("watch", 429)
        ],
        "{summary:?}"
    );
    let gaps = gaps_after(&served);
    for (code, gap) in &gaps {
        if *code == 429 {
            assert!(*gap >= Duration::from_secs(1), "{summary:?} {gaps:?}");
        }
    }
    println!("services requests after an expiry, throttled with Retry-After: 1: {gaps:?}");
    // Said once per episode: the throttled list, then the throttled watch after a list that
    // worked.
    assert_eq!(
        agent.count_log(&["the API server throttles", "resource=\"services\""]),
        2
    );
    agent.wait_log_all(&["watch works again", "resource=\"services\""]);
}

#[test]
fn the_node_condition_and_events_wait_for_retry_after_then_get_through() {
    let ns = sandbox();
    let c = Cluster::new(POD_RULE, &["10.244.1.0/24"]);
    // A server shutting down answers 503 with Retry-After; the condition is evaluated every
    // second, so the server's 3 s is what spaces the patches.
    c.api.throttle(
        "patch",
        "nodes/status",
        Throttle {
            code: 503,
            ..Throttle::status(2, 3)
        },
    );
    let mut agent = c.agent_with(&ns, &["--api-backoff-scale", "0.05"]);
    wait_until("the condition is True", || {
        c.node_condition("NetworkStateProtected")
            .is_some_and(|c| c["status"] == "True")
    });
    let patches: Vec<Served> = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.resource == "nodes/status")
        .collect();
    let gaps = gaps_after(&patches);
    let codes: Vec<u16> = patches.iter().map(|r| r.code).collect();
    assert_eq!(codes[..3], [503, 503, 200], "{gaps:?}");
    assert!(
        gaps[..2].iter().all(|(_, g)| *g >= Duration::from_secs(3)),
        "{gaps:?}"
    );

    // Events: a storage timeout (500 ServerTimeout) asks for 2 s, which client-go honours on any
    // 5xx; the recorder's own first retry is after 1 s.
    c.api.throttle(
        "create",
        "events",
        Throttle {
            code: 500,
            ..Throttle::status(2, 2)
        },
    );
    let mut ip = IpShell::new(&ns);
    ip.send("rule del priority 100 from 10.244.1.0/24 table 77");
    c.wait_event("DriftRepaired", "restored 1 rule removed by ip");
    let creates: Vec<Served> = c
        .api
        .requests()
        .into_iter()
        .filter(|r| r.resource == "events" && r.verb == "create")
        .collect();
    let gaps = gaps_after(&creates);
    let codes: Vec<u16> = creates.iter().map(|r| r.code).collect();
    assert_eq!(codes, [500, 500, 201], "{gaps:?}");
    assert!(
        gaps.iter().all(|(_, g)| *g >= Duration::from_secs(2)),
        "{gaps:?}"
    );
    println!(
        "condition patches {:?}, Event creates {gaps:?}",
        gaps_after(&patches)
    );
    // One line when the server starts holding Events back, one when it takes them again.
    agent.wait_log("the API server takes Events again");
    assert_eq!(agent.count_log(&["the API server asks to wait"]), 1);
}
