//! The incidents of DESIGN.md reproduced with the real offenders, one test per incident: the
//! distribution's systemd-networkd restarted (stop + start) and reconfigured inside the test's
//! namespace (tests/rig/networkd.rs), the real iptables and ipset run the way flannel and
//! kube-router do, a late link for Submariner. Each asserts that the offender really removed the
//! protected objects (networkd's own log, and the agent naming the actor), that every object is
//! back, and prints the outage as an independent netlink listener saw it. The tests that name
//! systemd-networkd run the agent with the DaemonSet's privileges (tests/common/deployed.rs).

mod common;
mod rig;

use common::*;
use rig::networkd::{self, Networkd};
use rig::outage::{listener_in, Outage};
use rig::{exec, must, sample, scrape, status, total, wait_all_in_sync, wait_scrape};
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
    listener: &netwarden::testing::listen::Listener,
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

/// With `NW_OUTAGE_TRACE` set, prints what the agent logged about repairs so far.
fn trace_agent(agent: &Agent) {
    if std::env::var_os("NW_OUTAGE_TRACE").is_some() {
        for l in agent.log.lock().unwrap().iter().filter(|l| {
            ["restored", "pending", "contested", "drift"]
                .iter()
                .any(|w| l.contains(w))
        }) {
            println!("    agent: {l}");
        }
    }
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
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    let http = agent.http();
    wait_all_in_sync(&http, WAIT);
    assert!(kube_router_present(&ns), "{:?}", snapshot(&ns));

    for (round, how) in ["restart", "networkctl reconfigure veth0"]
        .into_iter()
        .enumerate()
    {
        let before = scrape(&http);
        let rule_drift = sample(
            &before,
            DRIFT,
            &[("kind", "rule"), ("actor", networkd::COMM)],
        );
        let removals = nd.log_lines("Removing foreign routing policy rule").len();
        let listener = listener_in(&ns.name).unwrap();
        let mut outage = outage_for(&ns, &cfg, &nd);

        let t0 = Instant::now();
        if round == 0 {
            nd.restart().expect("restart networkd");
        } else {
            nd.networkctl(&["reconfigure", "veth0"])
                .expect("reconfigure");
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
        trace_agent(&agent);

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
}

// ---------------------------------------------------------------------------------------------
// AWS VPC CNI: per-pod rules for pods on secondary ENIs, wiped by a networkd restart

/// Pods (address, ENI, table) as the VPC CNI places them.
const AWS_PODS: [(&str, &str, u32); 3] = [
    ("10.1.1.20", "eni1", 2),
    ("10.1.1.21", "eni1", 2),
    ("10.1.2.20", "eni2", 3),
];
/// Secondary ENIs (link, address, gateway, table).
const AWS_ENIS: [(&str, &str, &str, u32); 2] = [
    ("eni1", "10.1.1.10/24", "10.1.1.1", 2),
    ("eni2", "10.1.2.10/24", "10.1.2.1", 3),
];

fn aws_spec() -> String {
    let mut y = String::from("  rules:\n");
    for (i, (pod, _, table)) in AWS_PODS.iter().enumerate() {
        // `to POD lookup main` at 512, `from POD lookup ENI-TABLE` at 1536, as the CNI adds them.
        y += &format!(
            "    - name: pod{i}-to\n      priority: 512\n      to: {pod}/32\n      table: main\n\
             \x20   - name: pod{i}-from\n      priority: 1536\n      from: {pod}/32\n      table: {table}\n"
        );
    }
    y += "  routes:\n";
    for (eni, _, gw, table) in AWS_ENIS {
        y += &format!(
            "    - name: {eni}-gateway\n      table: {table}\n      destination: {gw}/32\n      device: {eni}\n\
             \x20   - name: {eni}-default\n      table: {table}\n      destination: default\n      gateway: {gw}\n      device: {eni}\n"
        );
    }
    y
}

fn aws_present(ns: &Sandbox) -> bool {
    let r = rules(ns);
    AWS_PODS.iter().all(|(pod, _, table)| {
        count(&r, &format!("512: from all to {pod} lookup main")) == 1
            && count(&r, &format!("1536: from {pod} lookup {table}")) == 1
    }) && AWS_ENIS.iter().all(|(eni, _, gw, table)| {
        let t = routes(ns, &table.to_string());
        count(&t, &format!("default via {gw} dev {eni}")) == 1
            && count(&t, &format!("{gw} dev {eni} scope link")) == 1
    })
}

#[test]
fn aws_vpc_cni_per_pod_rules_survive_networkd_restart() {
    let ns = node();
    for (eni, ..) in AWS_ENIS {
        let peer = format!("{eni}p");
        ns.ip(&["link", "add", eni, "type", "veth", "peer", "name", &peer])
            .unwrap();
        ns.ip(&["link", "set", eni, "up"]).unwrap();
        ns.ip(&["link", "set", &peer, "up"]).unwrap();
    }
    // The primary interface and both secondary ENIs are managed by networkd, as netplan does.
    let mut links = vec![("veth0", "10.200.0.1/24")];
    links.extend(AWS_ENIS.iter().map(|(eni, addr, ..)| (*eni, *addr)));
    let mut nd = networkd_for(&ns, &links);
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &aws_spec());
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    let http = agent.http();
    wait_all_in_sync(&http, WAIT);
    assert!(aws_present(&ns), "{:?}", snapshot(&ns));

    let before = scrape(&http);
    let listener = listener_in(&ns.name).unwrap();
    let mut outage = outage_for(&ns, &cfg, &nd);
    nd.restart().expect("restart networkd");
    for (l, _) in &links {
        nd.wait_configured(l).unwrap();
    }
    measure(
        "AWS VPC CNI, networkd restart",
        &ns,
        &listener,
        &mut outage,
        aws_present,
    );

    // networkd removed every pod's rules itself.
    let removed = nd.log_lines("Removing foreign routing policy rule");
    for (pod, _, _) in AWS_PODS {
        assert!(
            removed.iter().any(|l| l.contains(&format!("{pod}/32"))),
            "networkd did not remove the rules of {pod}: {removed:?}"
        );
    }
    let rules_before = total(
        &before,
        DRIFT,
        &[("kind", "rule"), ("actor", networkd::COMM)],
    );
    wait_scrape(&http, "rule drift by systemd-network", WAIT, |t| {
        total(t, DRIFT, &[("kind", "rule"), ("actor", networkd::COMM)])
            >= rules_before + 2.0 * AWS_PODS.len() as f64
    });
    agent.wait_log_all(&["restored", "actor=", "systemd-network"]);
    wait_all_in_sync(&http, WAIT);
    assert!(aws_present(&ns));
    let _ = (&exec, &must, &REPAIRS, Duration::ZERO);
}

// ---------------------------------------------------------------------------------------------
// How networkd puts its address back: `noprefixroute`, then the prefix route on its own

/// networkd adds its address with IFA_F_NOPREFIXROUTE and then the prefix route itself. A
/// protected route through a gateway on that link fails (ENETUNREACH) when the address comes
/// back and can only be applied once the prefix route exists, a route the agent does not
/// protect: its RTM_NEWROUTE must wake the pending route (it used to wait for an unrelated
/// later event or the resync timer; here the resync is an hour).
#[test]
fn a_pending_gateway_route_is_applied_when_an_unprotected_prefix_route_appears() {
    let ns = node();
    // No IPv6 on the links: its address events (DAD ending) would wake the route by chance.
    must(
        &ns.name,
        &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "  resync: 1h\n  routes:\n    - name: via-gateway\n      table: 77\n      destination: default\n      gateway: 10.200.0.254\n      device: veth0\n",
    );
    let mut agent = Agent::start(&ns, &cfg);
    agent.wait_log_all(&["pending", "via-gateway"]);
    let http = agent.http();
    let unreachable = |t: &str| {
        total(
            t,
            "netwarden_apply_errors_total",
            &[("kind", "route"), ("errno", "ENETUNREACH")],
        )
    };
    // The start's attempt, made after the event socket lets every table's routes through (so
    // nothing that appears from then on goes unheard, and no blind retry follows it).
    wait_scrape(&http, "the start's attempt", WAIT, |t| {
        unreachable(t) == 1.0
    });
    ns.ip(&[
        "address",
        "add",
        "10.200.0.1/24",
        "dev",
        "veth0",
        "noprefixroute",
    ])
    .unwrap();
    // The address alone does not make the gateway reachable: the retry it woke fails.
    wait_scrape(&http, "a retry after the address", WAIT, |t| {
        unreachable(t) == 2.0
    });
    assert!(routes(&ns, "77").is_empty());
    let t0 = Instant::now();
    ns.ip(&[
        "route",
        "add",
        "10.200.0.0/24",
        "dev",
        "veth0",
        "proto",
        "kernel",
        "scope",
        "link",
        "src",
        "10.200.0.1",
    ])
    .unwrap();
    // An event-driven repair takes milliseconds; allow 500 ms on a loaded machine.
    let within = Duration::from_millis(500);
    while count(&routes(&ns, "77"), "default via 10.200.0.254 dev veth0") == 0 {
        assert!(
            t0.elapsed() < within,
            "the pending route was not applied within {within:?} of its prefix route"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "gateway route applied {:?} after the prefix route",
        t0.elapsed()
    );
}

/// What a networkd restart does to a route through a gateway, step by step: networkd deletes
/// it (repaired), removes its address (the kernel drops the route: pending), re-adds the address
/// without a prefix route (a retry fails), adds other routes (a retry fails), and finally the
/// prefix route (applied). The retries of a pending object are not removals: they must not make
/// it "contested" and hold its repair back (before the fix, the third retry within 2 s of the
/// last repair did, and after a few restarts the backoff reached seconds).
#[test]
fn retries_of_a_pending_route_do_not_make_it_contested() {
    let ns = node();
    must(
        &ns.name,
        &["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"],
    );
    ns.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "  resync: 1h\n  routes:\n    - name: via-gateway\n      table: 77\n      destination: default\n      gateway: 10.200.0.254\n      device: veth0\n",
    );
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    let route = "default via 10.200.0.254 dev veth0";
    let unreachable = |t: &str| {
        total(
            t,
            "netwarden_apply_errors_total",
            &[("kind", "route"), ("errno", "ENETUNREACH")],
        )
    };

    ns.ip(&["route", "del", "default", "table", "77"]).unwrap();
    agent.wait_log_all(&["restored", "via-gateway"]);
    ns.ip(&["address", "del", "10.200.0.1/24", "dev", "veth0"])
        .unwrap();
    agent.wait_log_all(&["pending", "via-gateway"]);
    let failed = unreachable(&scrape(&http));
    ns.ip(&[
        "address",
        "add",
        "10.200.0.1/24",
        "dev",
        "veth0",
        "noprefixroute",
    ])
    .unwrap();
    wait_scrape(&http, "a retry after the address", WAIT, |t| {
        unreachable(t) >= failed + 1.0
    });
    ns.ip(&["route", "add", "10.201.0.0/24", "dev", "veth0"])
        .unwrap();
    wait_scrape(&http, "a retry after another route", WAIT, |t| {
        unreachable(t) >= failed + 2.0
    });
    ns.ip(&[
        "route",
        "add",
        "10.200.0.0/24",
        "dev",
        "veth0",
        "src",
        "10.200.0.1",
    ])
    .unwrap();
    wait_until("the route once its gateway is reachable", || {
        count(&routes(&ns, "77"), route) == 1
    });
    let text = scrape(&http);
    assert_eq!(
        total(&text, "netwarden_repairs_deferred_total", &[]),
        0.0,
        "a repair was held back:\n{text}"
    );
    assert!(
        !agent
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.contains("contested")),
        "the pending route was reported contested"
    );
    wait_all_in_sync(&http, WAIT);
}

// ---------------------------------------------------------------------------------------------
// Submariner: a route on tunl0, protected before tunl0 exists

/// Creates the late link and brings it up. With the ipip module loaded, `tunl0` is the fallback
/// device every new namespace gets at once, so it cannot appear late: then the late link is an
/// ipip tunnel of another name. Without ipip (this kernel has none, and no modprobe), a veth
/// named `tunl0` stands in: what matters to the agent is the RTM_NEWLINK of a link of that name.
fn late_tunnel_name(ns: &Sandbox) -> &'static str {
    if lines(ns, &["link", "show"])
        .iter()
        .any(|l| l.contains("tunl0"))
    {
        "calico-ipip"
    } else {
        "tunl0"
    }
}

fn create_tunnel(ns: &Sandbox, name: &str) {
    if name == "tunl0" {
        ns.ip(&[
            "link",
            "add",
            name,
            "type",
            "veth",
            "peer",
            "name",
            "tunl0-peer",
        ])
        .unwrap();
        ns.ip(&["link", "set", "tunl0-peer", "up"]).unwrap();
    } else {
        ns.ip(&[
            "link",
            "add",
            name,
            "type",
            "ipip",
            "local",
            "10.200.0.1",
            "remote",
            "10.200.0.2",
        ])
        .unwrap();
    }
    ns.ip(&["link", "set", name, "up"]).unwrap();
}

#[test]
fn submariner_route_on_tunl0_is_applied_when_the_link_appears() {
    use rtnetlink::packet_route::link::{LinkAttribute, LinkFlags};
    use rtnetlink::packet_route::RouteNetlinkMessage as M;

    let ns = sandbox();
    let tunnel = late_tunnel_name(&ns);
    let dir = tempfile::tempdir().unwrap();
    // Submariner's route agent: the remote cluster's CIDRs through the tunnel, in table 150.
    let cfg = config(
        dir.path(),
        &format!(
            "  routes:\n    - name: submariner-remote-pods\n      table: 150\n      destination: 10.3.0.0/16\n      device: {tunnel}\n      scope: link\n    - name: submariner-remote-services\n      table: 150\n      destination: 10.4.0.0/16\n      device: {tunnel}\n      scope: link\n"
        ),
    );
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    agent.wait_log_all(&["pending", "submariner-remote-pods", tunnel]);
    let st = status(&http);
    assert!(
        st.objects
            .iter()
            .all(|o| o.state == netwarden::telemetry::status::State::Pending),
        "{st:#?}"
    );
    assert!(!snapshot(&ns).iter().any(|l| l.contains("table 150")));

    let listener = listener_in(&ns.name).unwrap();
    // calico-node creates tunl0 a while after the route agent started.
    std::thread::sleep(Duration::from_secs(1));
    create_tunnel(&ns, tunnel);

    let deadline = Instant::now() + WAIT;
    let mut link_up = None;
    let mut back = Vec::new();
    while back.len() < 2 {
        let Some((at, msg)) = listener.next(deadline.saturating_duration_since(Instant::now()))
        else {
            panic!(
                "routes not seen within {WAIT:?} (link up seen: {}); {:?}",
                link_up.is_some(),
                snapshot(&ns)
            );
        };
        match msg {
            Some(M::NewLink(l))
                if l.header.flags.contains(LinkFlags::Up)
                    && l.attributes
                        .iter()
                        .any(|a| matches!(a, LinkAttribute::IfName(n) if n == tunnel)) =>
            {
                link_up.get_or_insert(at);
            }
            Some(M::NewRoute(r)) => {
                if let Some((k, _)) = netwarden::observe::decode::route(&r) {
                    if k.table == 150 {
                        back.push(at);
                    }
                }
            }
            _ => {}
        }
    }
    let link_up = link_up.expect("the link's RTM_NEWLINK (up) before its routes");
    let after = back
        .iter()
        .max()
        .unwrap()
        .saturating_duration_since(link_up);
    println!(
        "Submariner: both routes on {tunnel} applied {:.3} ms after the link came up",
        rig::outage::ms(after)
    );
    assert!(after < Duration::from_secs(1), "{after:?}");
    let t150 = routes(&ns, "150");
    for dst in ["10.3.0.0/16", "10.4.0.0/16"] {
        assert_eq!(
            count(&t150, &format!("{dst} dev {tunnel} scope link")),
            1,
            "{t150:?}"
        );
    }
    wait_all_in_sync(&http, WAIT);
}

// ---------------------------------------------------------------------------------------------
// Canal (RKE2): a flannel pod's cleanup removes FLANNEL-POSTRTG and FLANNEL-FWD

const CANAL: &str = r#"  chains:
    - name: flannel-postrtg
      table: nat
      chain: FLANNEL-POSTRTG
      rules:
        - -m comment --comment "flanneld masq" -j RETURN
        - -s 10.42.0.0/16 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j RETURN
        - -s 10.42.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
        - '! -s 10.42.0.0/16 -d 10.42.1.0/24 -m comment --comment "flanneld masq" -j RETURN'
        - '! -s 10.42.0.0/16 -d 10.42.0.0/16 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully'
      jumps:
        - chain: POSTROUTING
          rule: -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
          position: first
    - name: flannel-fwd
      table: filter
      chain: FLANNEL-FWD
      rules:
        - -s 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
        - -d 10.42.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT
      jumps:
        - chain: FORWARD
          rule: -m comment --comment "flanneld forward" -j FLANNEL-FWD
"#;

/// The protected lines of both tables, as `iptables-nft-save` prints them.
fn canal_lines(ns: &Sandbox) -> (Vec<String>, Vec<String>) {
    let pick = |table: &str, chains: &[&str]| -> Vec<String> {
        let (_, text) = exec(&ns.name, &["iptables-nft-save", "-t", table]);
        text.lines()
            .filter(|l| chains.iter().any(|c| l.starts_with(&format!("-A {c} "))))
            .map(str::to_owned)
            .collect()
    };
    (
        pick("nat", &["FLANNEL-POSTRTG", "POSTROUTING"]),
        pick("filter", &["FLANNEL-FWD", "FORWARD"]),
    )
}

#[test]
fn canal_flannel_chains_removed_by_a_flannel_pod_cleanup_come_back() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), CANAL);
    let mut agent = Agent::start_with(&ns, &cfg, &["--iptables-backend", "nft"]);
    agent.wait_log("chains and sets in sync");
    let whole = canal_lines(&ns);
    assert_eq!(whole.0.len(), 6, "{:?}", whole.0);
    assert_eq!(whole.1.len(), 3, "{:?}", whole.1);

    // flannel's cleanup on pod shutdown (iptables.go: DeleteIPTables): each rule of the jump
    // deleted, then the chain flushed and deleted, through the same iptables binary.
    let t0 = Instant::now();
    for (table, builtin, jump, chain) in [
        ("nat", "POSTROUTING", "flanneld masq", "FLANNEL-POSTRTG"),
        ("filter", "FORWARD", "flanneld forward", "FLANNEL-FWD"),
    ] {
        // The agent may put a jump back before -X runs; then -X fails (chain in use): that is
        // the repair winning, which is the point.
        let _ = exec(
            &ns.name,
            &[
                "iptables-nft",
                "-t",
                table,
                "-D",
                builtin,
                "-m",
                "comment",
                "--comment",
                jump,
                "-j",
                chain,
            ],
        );
        let _ = exec(&ns.name, &["iptables-nft", "-t", table, "-F", chain]);
        let _ = exec(&ns.name, &["iptables-nft", "-t", table, "-X", chain]);
    }
    let cleanup = t0.elapsed();
    // Seen back by reading (iptables-save takes a few ms, so this is an upper bound).
    wait_until("both chains and their jumps back", || {
        canal_lines(&ns) == whole
    });
    let seen_back = t0.elapsed();
    let restored: Vec<String> = agent
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("restored") && l.contains("kind=\"chain\""))
        .cloned()
        .collect();
    let took: Vec<String> = restored
        .iter()
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("took_us=")))
        .map(str::to_owned)
        .collect();
    println!(
        "Canal: flannel cleanup (6 iptables commands) took {:.3} ms; both chains and jumps seen back {:.3} ms after it began ({:.3} ms after it ended); agent repairs: {}",
        rig::outage::ms(cleanup),
        rig::outage::ms(seen_back),
        rig::outage::ms(seen_back.saturating_sub(cleanup)),
        took.join(" ")
    );
    assert!(
        restored.iter().any(|l| l.contains("flannel-postrtg"))
            && restored.iter().any(|l| l.contains("flannel-fwd")),
        "the agent did not report restoring both chains: {restored:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// kube-router svip: the node's (API server's) address inserted into the service VIP set

#[test]
fn kube_router_svip_forbidden_member_is_removed() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    // kube-router's IPv4 and IPv6 service-VIP sets; the API server endpoint / node address must
    // never be in them (the REJECT rule in KUBE-ROUTER-SERVICES would cut the node off).
    let cfg = config(
        dir.path(),
        r#"  pollInterval: 100ms
  ipsets:
    - name: kube-router-svip
      type: hash:ip
      forbidden: [10.200.0.1]
    - name: inet6:kube-router-svip
      type: hash:ip
      family: ipv6
      forbidden: ["fd00:200::1"]
"#,
    );
    // kube-router created the sets with the service VIPs before the agent started.
    must(
        &ns.name,
        &["ipset", "create", "kube-router-svip", "hash:ip"],
    );
    must(
        &ns.name,
        &[
            "ipset",
            "create",
            "inet6:kube-router-svip",
            "hash:ip",
            "family",
            "inet6",
        ],
    );
    for vip in ["10.96.0.1", "10.96.0.10"] {
        must(&ns.name, &["ipset", "add", "kube-router-svip", vip]);
    }
    must(
        &ns.name,
        &["ipset", "add", "inet6:kube-router-svip", "fd00:96::10"],
    );
    let mut agent = Agent::start(&ns, &cfg);
    agent.wait_log("chains and sets in sync");

    for (set, bad, keep) in [
        ("kube-router-svip", "10.200.0.1", "10.96.0.10"),
        ("inet6:kube-router-svip", "fd00:200::1", "fd00:96::10"),
    ] {
        let t0 = Instant::now();
        must(&ns.name, &["ipset", "add", set, bad]);
        wait_until("forbidden member gone", || {
            !must(&ns.name, &["ipset", "list", set])
                .lines()
                .any(|l| l == bad)
        });
        let gone = t0.elapsed();
        let line = agent.wait_log_all(&[
            "forbidden member in protected set",
            &format!("member={bad}"),
        ]);
        assert!(line.contains("action=\"removed\""), "{line}");
        let listed = must(&ns.name, &["ipset", "list", set]);
        assert!(listed.lines().any(|l| l == keep), "{listed}");
        println!(
            "kube-router svip: {bad} in {set} for {:.3} ms (poll interval 100 ms)",
            rig::outage::ms(gone)
        );
    }
}
