//! systemd-networkd's own address, protected by the agent while networkd runs (the README's and
//! `examples/demo.yaml`'s advice). networkd 252 removes that address and adds it back whenever it
//! starts or reconfigures the link; an address put back by someone else in between, without the
//! broadcast address networkd gave it, made networkd loop on it (65,536 `Configuring static
//! address` requests) and mark the link `failed`. These tests run the distribution's networkd in
//! the rig (tests/rig/networkd.rs) and check that the agent never drives it there.

mod common;
mod rig;

use common::*;
use rig::networkd::{self, Networkd};
use rig::outage::listener_in;
use rig::{sample, scrape, wait_scrape};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use std::net::IpAddr;
use std::time::{Duration, Instant};

const HANDOFFS: &str = "netwarden_owner_handoffs_total";
const ADDRESS: &str = "inet 10.200.0.1/24 brd 10.200.0.255 scope global veth0";
/// networkd's own route through its address's subnet: it must come back too.
const NETWORKD_ROUTE: &str = "10.99.0.0/16 via 10.200.0.254 dev veth0 proto static";
const PROTECTED_ROUTE: &str = "default via 10.200.0.254 dev veth0";
const PROTECTED_RULE: &str = "100: from 10.244.1.0/24 lookup 77";

fn network_file(comment: usize) -> String {
    format!(
        "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.1/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n\n\
         [Route]\nDestination=10.99.0.0/16\nGateway=10.200.0.254\n# {comment}\n"
    )
}

/// The node's address, protected; and what depends on it: a route through a gateway on its
/// subnet (dropped by the kernel with the address) and a rule (deleted by networkd).
fn spec(managed_by: &str) -> String {
    format!(
        "  resync: 1h\n  addresses:\n    - name: node-address\n      device: veth0\n      address: 10.200.0.1/24\n{managed_by}\
         \x20 routes:\n    - name: overlay-default\n      table: 77\n      destination: default\n      gateway: 10.200.0.254\n      device: veth0\n\
         \x20 rules:\n    - name: pod-cidr\n      priority: 100\n      from: 10.244.1.0/24\n      table: 77\n"
    )
}

fn node() -> Sandbox {
    let ns = Sandbox::create("nw-nda").expect("create namespace");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    // No IPv6 on the links: networkd is told not to configure it, the kernel would anyway.
    must(&ns, &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    ns
}

fn addresses(ns: &Sandbox) -> Vec<String> {
    lines(ns, &["-4", "address", "show", "dev", "veth0"])
}

/// Everything back as it should be: networkd's address exactly as networkd made it (with its
/// broadcast), networkd's own route, and the protected route and rule.
fn all_back(ns: &Sandbox) -> bool {
    count(&addresses(ns), ADDRESS) == 1
        && count(&routes(ns, "main"), NETWORKD_ROUTE) == 1
        && count(&routes(ns, "77"), PROTECTED_ROUTE) == 1
        && count(&rules(ns), PROTECTED_RULE) == 1
}

/// `Configuring static address` lines networkd has logged so far: one per address it puts in
/// place; the storm this guards against logs 65,536.
fn configuring(nd: &Networkd) -> usize {
    nd.log_lines("Configuring static address").len()
}

/// Waits (bounded) until networkd has started configuring the address again after `before`
/// lines, then until it is done with the link; returns its state.
fn settle(nd: &Networkd, before: usize) -> String {
    let deadline = Instant::now() + WAIT;
    while configuring(nd) <= before {
        assert!(
            Instant::now() < deadline,
            "networkd did not configure its address again:\n{}",
            nd.log_text()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    nd.wait_settled("veth0", WAIT * 3)
}

/// Repairs of protected addresses the agent made (added, or found already back).
fn address_repairs(http: &str) -> f64 {
    let text = scrape(http);
    ["applied", "already_present"]
        .iter()
        .map(|r| {
            sample(
                &text,
                "netwarden_repairs_total",
                &[("kind", "address"), ("result", r)],
            )
            .unwrap_or(0.0)
        })
        .sum()
}

#[test]
fn networkd_keeps_its_own_protected_address_through_restarts_reconfigures_and_reloads() {
    const ROUNDS: usize = 10;
    let ns = node();
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", &network_file(0))]).unwrap();
    nd.start_dbus().unwrap();
    nd.start().unwrap();
    nd.wait_configured("veth0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &spec(""));
    let agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    wait_until("everything in place", || all_back(&ns));

    let mut reload = 0;
    let handed_at_start =
        sample(&scrape(&http), HANDOFFS, &[("outcome", "owner_restored")]).unwrap_or(0.0);
    for how in ["restart", "reconfigure", "reload"] {
        for round in 0..ROUNDS {
            let repaired = address_repairs(&http);
            let before = configuring(&nd);
            match how {
                "restart" => nd.restart().unwrap(),
                "reconfigure" => {
                    nd.networkctl(&["reconfigure", "veth0"]).unwrap();
                }
                _ => {
                    // A changed .network file: the reload reconfigures the link with it.
                    reload += 1;
                    nd.write_file("10-veth0.network", &network_file(reload))
                        .unwrap();
                    nd.networkctl(&["reload"]).unwrap();
                }
            }
            let state = settle(&nd, before);
            let requests = configuring(&nd) - before;
            assert_eq!(
                state, "configured",
                "{how} {round}: networkd left the link {state:?} after {requests} `Configuring static address` requests"
            );
            assert!(
                requests <= 2,
                "{how} {round}: a request storm: {requests} `Configuring static address` lines"
            );
            wait_until(&format!("{how} {round}: address and routes back"), || {
                all_back(&ns)
            });
            // networkd removed its address and the agent left it to networkd: the agent never
            // added it itself. (When the agent reads networkd's removal and re-add in one batch,
            // as on a busy machine, there is nothing to hand off: no owner_restored then.)
            assert_eq!(
                address_repairs(&http),
                repaired,
                "{how} {round}: the agent put networkd's address back itself"
            );
            assert_eq!(nd.admin_state("veth0").as_deref(), Some("configured"));
        }
    }
    let text = scrape(&http);
    assert!(
        sample(&text, HANDOFFS, &[("outcome", "owner_restored")]).unwrap_or(0.0) > handed_at_start,
        "networkd's removals were never seen and left to it"
    );
    assert_eq!(
        sample(&text, HANDOFFS, &[("outcome", "grace_expired")]),
        Some(0.0),
        "networkd always put its address back itself"
    );
    assert!(
        nd.log_lines("Failed to configure address").is_empty(),
        "{:?}",
        nd.log_lines("Failed to configure address")
    );
}

/// The address as the rig's networkd made it, removed by someone who is not its owner, is
/// repaired at once and exactly as it was; networkd, restarted afterwards, still handles it as
/// its own (removes it and adds it again, as networkd 252 does with an address whose broadcast it
/// did not set explicitly) and the link stays configured. An address put back without its
/// broadcast would instead be kept as it is by networkd forever.
#[test]
fn an_address_removed_by_someone_else_comes_back_as_networkd_made_it() {
    let ns = node();
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", &network_file(0))]).unwrap();
    nd.start().unwrap();
    nd.wait_configured("veth0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &spec("      managedBy: systemd-networkd\n"));
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    wait_until("everything in place", || all_back(&ns));

    let _ip = IpBatch::run(&ns, "address del 10.200.0.1/24 dev veth0");
    agent.wait_log_all(&["restored", "addresses=1", "actor=ip"]);
    assert_eq!(count(&addresses(&ns), ADDRESS), 1, "{:?}", addresses(&ns));
    assert_eq!(
        sample(&scrape(&http), HANDOFFS, &[("outcome", "owner_restored")]),
        Some(0.0),
        "`ip` is not the owner: nothing to hand off"
    );

    let removals = nd.log_lines("Removing foreign address").len();
    let before = configuring(&nd);
    nd.restart().unwrap();
    nd.wait_configured("veth0").unwrap();
    assert!(
        nd.log_lines("Removing foreign address")[removals..]
            .iter()
            .any(|l| l.contains("10.200.0.1/24")),
        "networkd no longer re-applies its address: {:?}",
        nd.log_lines("10.200.0.1/24")
    );
    assert!(configuring(&nd) - before <= 2);
    wait_until("everything back after the restart", || all_back(&ns));
}

/// networkd no longer configures the address (its .network file now gives the link another one)
/// and removes it on reload: the agent leaves it to networkd for the grace, then restores it as it
/// was. The address is away for at least the grace: networkd is not raced.
#[test]
fn an_address_its_owner_does_not_put_back_is_restored_after_the_grace() {
    let ns = node();
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", &network_file(0))]).unwrap();
    nd.start_dbus().unwrap();
    nd.start().unwrap();
    nd.wait_configured("veth0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &spec(""));
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    wait_until("everything in place", || all_back(&ns));

    let listener = listener_in(&ns.name).unwrap();
    let ours: IpAddr = "10.200.0.1".parse().unwrap();
    let is_ours = |m: &rtnetlink::packet_route::address::AddressMessage| {
        netwarden::observe::decode::address(m).is_some_and(|(k, _)| k.address == ours)
    };
    nd.write_file(
        "10-veth0.network",
        "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.9/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n",
    )
    .unwrap();
    nd.networkctl(&["reload"]).unwrap();
    let (gone, _) = listener
        .wait_for(
            Instant::now() + WAIT,
            |(_, m)| matches!(m, Some(M::DelAddress(a)) if is_ours(a)),
        )
        .expect("networkd removes the address it no longer configures");
    let (back, _) = listener
        .wait_for(
            Instant::now() + WAIT,
            |(_, m)| matches!(m, Some(M::NewAddress(a)) if is_ours(a)),
        )
        .expect("the agent restores it");
    let away = back.saturating_duration_since(gone);
    let grace = netwarden::handoff::OWNER_GRACE;
    assert!(
        away >= grace - Duration::from_millis(5),
        "restored after {away:?}, before networkd's grace of {grace:?}"
    );
    agent.wait_log_all(&["not put back by its owner in time", "node-address"]);
    agent.wait_log_all(&["restored", "addresses=1", "actor=systemd-network"]);
    // As it was, broadcast included (a secondary address now: networkd added 10.200.0.9/24).
    assert!(
        addresses(&ns)
            .iter()
            .any(|l| l.starts_with("inet 10.200.0.1/24 brd 10.200.0.255 scope global")),
        "{:?}",
        addresses(&ns)
    );
    wait_scrape(&http, "one grace expired", WAIT, |t| {
        sample(t, HANDOFFS, &[("outcome", "grace_expired")]) == Some(1.0)
    });
    assert_eq!(nd.admin_state("veth0").as_deref(), Some("configured"));
    let _ = networkd::COMM;
}
