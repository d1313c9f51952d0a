//! The incidents of DESIGN.md reproduced with the real offenders, one test per incident: the
//! distribution's systemd-networkd restarted (stop + start) and reconfigured inside the test's
//! namespace (tests/rig/networkd.rs), the real iptables and ipset run the way flannel and
//! kube-router do, a late link for Submariner. Each asserts that the offender really removed the
//! protected objects (networkd's own log, and the agent naming the actor), that every object is
//! back, and prints the outage as an independent netlink listener saw it.

mod common;
mod rig;

use common::*;
use rig::networkd::{self, Networkd};
use rig::outage::{listener_in, Outage};
use rig::{exec, must, sample, scrape, total, wait_all_in_sync, wait_scrape};
use std::path::Path;
use std::time::{Duration, Instant};

const DRIFT: &str = "netwarden_drift_detected_total";
const REPAIRS: &str = "netwarden_repairs_total";

/// A namespace with `veth0` <-> `veth1`, both up, no addresses: networkd gives veth0 its address.
fn node() -> Sandbox {
    let ns = Sandbox::create("nw-off").expect("create namespace");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    ns
}

/// A `.network` file giving `link` a static address, as netplan writes one for a node's NIC.
fn network_file(link: &str, address: &str) -> String {
    format!(
        "[Match]\nName={link}\n\n[Network]\nAddress={address}\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n"
    )
}

/// networkd managing `links` (name, address), running and done configuring them.
fn networkd_for(ns: &Sandbox, links: &[(&str, &str)]) -> Networkd {
    let files: Vec<(String, String)> = links
        .iter()
        .map(|(l, a)| (format!("10-{l}.network"), network_file(l, a)))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(n, t)| (n.as_str(), t.as_str()))
        .collect();
    let mut nd = Networkd::new(&ns.name, &files).expect("networkd rig");
    nd.start_dbus().expect("dbus-daemon");
    nd.start().expect("start networkd");
    for (l, _) in links {
        nd.wait_configured(l).expect("networkd configures the link");
    }
    nd
}

/// Reads the listener until every protected object is back (confirmed by `present`), prints
/// the outage and returns it.
fn measure(
    what: &str,
    ns: &Sandbox,
    listener: &netwarden::listen::Listener,
    outage: &mut Outage,
    present: impl Fn(&Sandbox) -> bool,
) {
    let back = outage.settle(listener, WAIT, || present(ns));
    println!("{}", outage.summary(what));
    assert!(
        back,
        "{what}: not everything came back within {WAIT:?}; missing: {:?}\n{}",
        outage.missing(),
        snapshot(ns).join("\n")
    );
}

fn outage_for(ns: &Sandbox, cfg: &Path, nd: &Networkd) -> Outage {
    let _ = ns;
    Outage::for_config(cfg, |d| nd.ifindex(d).ok()).expect("protected objects of the config")
}

// ---------------------------------------------------------------------------------------------
// k0s + kube-router: networkd deletes `from <podCIDR> lookup 77` and table 77

const KUBE_ROUTER: &str = r#"  rules:
    - name: kube-router-pod-cidr
      priority: 100
      from: 10.244.1.0/24
      table: 77
  routes:
    - name: kube-router-overlay-default
      table: 77
      destination: default
      gateway: 10.200.0.254
      device: veth0
    - name: kube-router-pods
      table: 77
      destination: 10.244.0.0/16
      device: veth0
"#;

const KR_RULE: &str = "100: from 10.244.1.0/24 lookup 77";
const KR_ROUTES: [&str; 2] = [
    "default via 10.200.0.254 dev veth0",
    "10.244.0.0/16 dev veth0 scope link",
];

fn kube_router_present(ns: &Sandbox) -> bool {
    let t77 = routes(ns, "77");
    count(&rules(ns), KR_RULE) == 1 && KR_ROUTES.iter().all(|r| count(&t77, r) == 1)
}

#[test]
fn kube_router_rule_and_table_77_survive_networkd_restart_and_reconfigure() {
    let ns = node();
    let mut nd = networkd_for(&ns, &[("veth0", "10.200.0.1/24")]);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), KUBE_ROUTER);
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    wait_all_in_sync(&http, WAIT);
    assert!(kube_router_present(&ns), "{:?}", snapshot(&ns));

    for (round, how) in ["restart", "networkctl reconfigure veth0"]
        .into_iter()
        .enumerate()
    {
        let before = scrape(&http);
        let rule_drift = sample(&before, DRIFT, &[("kind", "rule"), ("actor", networkd::COMM)]);
        let removals = nd
            .log_lines("Removing foreign routing policy rule")
            .len();
        let listener = listener_in(&ns.name).unwrap();
        let mut outage = outage_for(&ns, &cfg, &nd);

        let t0 = Instant::now();
        if round == 0 {
            nd.restart().expect("restart networkd");
        } else {
            nd.networkctl(&["reconfigure", "veth0"]).expect("reconfigure");
        }
        nd.wait_configured("veth0").unwrap();
        let configured = t0.elapsed();
        measure(
            &format!("kube-router, networkd {how}"),
            &ns,
            &listener,
            &mut outage,
            kube_router_present,
        );
        println!("  networkd {how}: configured again after {configured:?}");

        // networkd itself removed the rule and the routes (its log), and the agent named it.
        let removed = nd.log_lines("Removing foreign routing policy rule");
        assert!(
            removed[removals..]
                .iter()
                .any(|l| l.contains("10.244.1.0/24") && l.contains("table: 77")),
            "networkd did not remove the rule ({how}): {removed:?}"
        );
        assert!(
            outage.lost().len() == outage.protected(),
            "every protected object should have been lost ({how}): {}",
            outage.summary("lost")
        );
        agent.wait_log_all(&["restored", "kube-router-pod-cidr", "actor="]);
        wait_scrape(&http, "rule drift by systemd-network", WAIT, |t| {
            sample(t, DRIFT, &[("kind", "rule"), ("actor", networkd::COMM)]).unwrap_or(0.0)
                > rule_drift.unwrap_or(0.0)
        });
        let after = wait_all_in_sync(&http, WAIT);
        let rule = after
            .objects
            .iter()
            .find(|o| o.name == "kube-router-pod-cidr")
            .unwrap();
        assert_eq!(rule.last_actor.as_deref(), Some(networkd::COMM), "{rule:?}");
        assert!(kube_router_present(&ns));
    }
    assert!(
        agent
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("restored") && l.contains("actor=systemd-network")),
        "no repair attributed to systemd-network in the agent's log"
    );
    let _ = (&exec, &must, &total, &REPAIRS, Duration::ZERO);
}
