//! A systemd-networkd restart against many protected rules and routes, with the real networkd
//! (tests/rig/networkd.rs). networkd deletes each foreign object once, one request at a time: its
//! burst is repaired as it goes (not held until its last deletion, as a flush that deletes in
//! passes is: tests/repair.rs). The routes through a gateway on networkd's link then wait for its
//! address: they are reported in one line, and their repair is attributed as their drift was.

mod common;
mod rig;

use common::*;
use rig::networkd::{self, Networkd};
use rig::outage::{listener_in, Outage};
use rig::{sample, scrape, wait_scrape};
use std::fmt::Write as _;
use std::time::{Duration, Instant};

const BURSTS: &str = "netwarden_removal_bursts_total";
const RULES: usize = 200;
/// Per kind: device routes and routes through the gateway.
const ROUTES: usize = 500;

fn spec() -> String {
    let mut y = String::from("  resync: 1h\n  rules:\n");
    for i in 0..RULES {
        let _ = writeln!(
            y,
            "    - {{name: rule-{i}, priority: {}, from: 10.16.{i}.0/24, table: 100}}",
            1000 + i
        );
    }
    y.push_str("  routes:\n");
    for j in 0..ROUTES {
        let (a, b) = (j / 256, j % 256);
        let _ = writeln!(
            y,
            "    - {{name: dev-{j}, table: 100, destination: 10.64.{a}.{b}/32, device: veth0}}\n    - {{name: via-{j}, table: 100, destination: 10.65.{a}.{b}/32, gateway: 10.200.0.254, device: veth0}}"
        );
    }
    y
}

fn all_present(ns: &Sandbox) -> bool {
    let r = rules(ns)
        .iter()
        .filter(|l| l.contains("lookup 100"))
        .count();
    let t = routes(ns, "100")
        .iter()
        .filter(|l| !l.contains("linkdown"))
        .count();
    r == RULES && t == 2 * ROUTES
}

/// Repairs that went through (applied or found already there), from a scrape.
fn repairs(text: &str) -> u64 {
    ["applied", "already_present"]
        .iter()
        .map(|r| rig::total(text, "netwarden_repairs_total", &[("result", r)]))
        .sum::<f64>() as u64
        - ["chain", "ipset"]
            .iter()
            .map(|k| {
                rig::total(
                    text,
                    "netwarden_repairs_total",
                    &[("kind", k), ("result", "applied")],
                )
            })
            .sum::<f64>() as u64
}

/// Objects the `restored` lines of a log count.
fn told(log: &[String]) -> u64 {
    log.iter()
        .filter(|l| l.contains("restored"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| {
            ["rules=", "routes=", "addresses="]
                .iter()
                .find_map(|p| w.strip_prefix(p))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .sum()
}

#[test]
fn a_networkd_restart_is_repaired_as_it_goes_and_its_waiting_routes_are_told_once() {
    let ns = Sandbox::create("nw-ndb").expect("create namespace");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    must(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    let network = "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.1/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", network)]).unwrap();
    nd.start().unwrap();
    nd.wait_configured("veth0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &spec());
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    wait_until("everything in place", || all_present(&ns));
    let logged = agent.log.lock().unwrap().len();
    let repaired_before = repairs(&scrape(&http));

    // The agent is frozen while networkd starts deleting, so that its first batch of events
    // holds removals that queued up: a burst, whatever the machine's speed.
    let listener = listener_in(&ns.name).unwrap();
    let mut outage = Outage::for_config(&cfg, |d| nd.ifindex(d).ok()).unwrap();
    outage.seed_addresses([(nd.ifindex("veth0").unwrap(), "10.200.0.1".parse().unwrap())]);
    agent.freeze(true);
    nd.restart().unwrap();
    let deadline = Instant::now() + WAIT;
    while outage.losses < 1 {
        let seen = listener.next(Duration::from_millis(50));
        if let Some(seen) = seen {
            outage.take(&seen);
        }
        assert!(Instant::now() < deadline, "networkd did not flush");
    }
    agent.freeze(false);
    let back = outage.settle(&listener, WAIT, || all_present(&ns));
    let summary = outage.summary("networkd restart, 1,200 objects");
    println!("{summary}");
    assert!(back, "{summary}");
    assert!(!outage.overrun, "{summary}");
    nd.wait_configured("veth0").unwrap();

    // A burst, repaired as it went: networkd was named and none was held.
    wait_scrape(&http, "a burst repaired as it goes", WAIT, |t| {
        sample(t, BURSTS, &[("pace", "as_it_goes")]).unwrap_or(0.0) >= 1.0
    });
    assert_eq!(
        sample(&scrape(&http), BURSTS, &[("pace", "held")]),
        Some(0.0),
        "networkd deletes each object once: nothing to hold"
    );
    if let (Some(first_back), Some(last_deleted)) = (outage.first_back, outage.last_deleted) {
        println!(
            "first object back {:?} before networkd's last deletion",
            last_deleted.saturating_duration_since(first_back)
        );
    }

    // The routes through the gateway waited for networkd's address: one line for all of them,
    // and their repair is networkd's or the kernel's, never `unknown`. Every repair is logged
    // once the process behind it is known: wait for all of them.
    let repaired = repairs(&scrape(&http)) - repaired_before;
    let deadline = Instant::now() + WAIT;
    while told(&agent.log.lock().unwrap()[logged..]) < repaired {
        assert!(
            Instant::now() < deadline,
            "{repaired} repairs, {} told",
            told(&agent.log.lock().unwrap()[logged..])
        );
        agent.wait_log("restored");
    }
    let log: Vec<String> = agent.log.lock().unwrap()[logged..].to_vec();
    let pending: Vec<&String> = log
        .iter()
        .filter(|l| l.contains("WARN") && l.contains("pending"))
        .collect();
    assert!(
        pending.len() <= 2,
        "{} `pending` warnings for one restart: {:#?}",
        pending.len(),
        &pending[..pending.len().min(5)]
    );
    let restored: Vec<&String> = log.iter().filter(|l| l.contains("restored")).collect();
    assert!(!restored.is_empty());
    for l in &restored {
        assert!(!l.contains("actor=unknown"), "{l}");
    }
    assert!(
        restored.iter().any(|l| l.contains(networkd::COMM)),
        "{restored:#?}"
    );
}
