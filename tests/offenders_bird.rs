//! Coexistence with a routing daemon: BIRD 2 (Debian's bird2) in the test's namespace installs
//! `proto bird` routes in main and in table 100 from static protocols; the agent protects other
//! routes in the same tables, and one route that BIRD installs identically. Neither fights:
//! BIRD's routes are never touched, the agent's are restored, no object becomes contested, and
//! the shared route does not flap while BIRD is reconfigured.

mod common;
mod rig;

use common::*;
use rig::bird::Bird;
use rig::outage::listener_in;
use rig::{scrape, status, total, wait_all_in_sync};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use std::time::{Duration, Instant};

/// BIRD's config; `extra` goes into the main-table static protocol (a reconfiguration).
fn bird_conf(extra: &str) -> String {
    format!(
        r#"log stderr all;
router id 10.200.0.1;
ipv4 table t100;
protocol device {{ scan time 1; }}
protocol kernel kmain {{
  scan time 1;
  ipv4 {{ import none; export all; }};
}}
protocol kernel k100 {{
  scan time 1;
  kernel table 100;
  ipv4 {{ table t100; import none; export all; }};
}}
protocol static smain {{
  ipv4;
  route 10.90.0.0/24 via 10.200.0.254;
  route 10.91.0.0/24 via 10.200.0.254;
{extra}}}
protocol static s100 {{
  ipv4 {{ table t100; }};
  route 10.92.0.0/24 via 10.200.0.254;
}}
"#
    )
}

/// The agent's: two routes of its own (main, table 100) and BIRD's 10.91.0.0/24, identically.
const SPEC: &str = r#"  routes:
    - name: own-main
      destination: 10.93.0.0/24
      gateway: 10.200.0.254
      device: veth0
    - name: own-table-100
      table: 100
      destination: 10.94.0.0/24
      gateway: 10.200.0.254
      device: veth0
    - name: shared-with-bird
      destination: 10.91.0.0/24
      gateway: 10.200.0.254
      device: veth0
"#;

/// BIRD's routes as `ip route` prints them (main, then table 100).
const BIRD_MAIN: [&str; 2] = [
    "10.90.0.0/24 via 10.200.0.254 dev veth0 proto bird metric 32",
    "10.91.0.0/24 via 10.200.0.254 dev veth0 proto bird metric 32",
];
const BIRD_100: &str = "10.92.0.0/24 via 10.200.0.254 dev veth0 proto bird metric 32";

fn bird_lines(ns: &Sandbox) -> Vec<String> {
    let mut v: Vec<String> = routes(ns, "main")
        .into_iter()
        .chain(routes(ns, "100"))
        .filter(|l| l.contains("proto bird"))
        .collect();
    v.sort();
    v
}

fn route_repairs(text: &str) -> f64 {
    total(text, "netwarden_repairs_total", &[("kind", "route")])
}

#[test]
fn bird_and_the_agent_share_main_and_table_100_without_a_fight() {
    let ns = Sandbox::create("nw-bird").unwrap();
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])
        .unwrap();

    let bird = Bird::start(&ns.name, &bird_conf("")).expect("start bird");
    wait_until("BIRD's routes in main and table 100", || {
        bird_lines(&ns).len() == 3
    });
    // BIRD's metric is 32 (its kernel protocol's default); check the lines themselves.
    let mut expected: Vec<String> = BIRD_MAIN.iter().map(|s| s.to_string()).collect();
    expected.push(BIRD_100.to_string());
    expected.sort();
    let shown = bird_lines(&ns);
    assert_eq!(shown, expected, "BIRD's routes:\n{}", bird.log_text());

    // The shared route is BIRD's with metric 32: the agent protects that identity.
    let cfg_dir = tempfile::tempdir().unwrap();
    let spec = SPEC.replace(
        "      destination: 10.91.0.0/24\n",
        "      destination: 10.91.0.0/24\n      metric: 32\n",
    );
    let cfg = config(cfg_dir.path(), &spec);
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    wait_all_in_sync(&http, WAIT);
    // The initial sync added the agent's two routes, and left BIRD's alone.
    let start = scrape(&http);
    assert_eq!(
        total(
            &start,
            "netwarden_repairs_total",
            &[("kind", "route"), ("result", "applied")]
        ),
        2.0,
        "{start}"
    );
    assert_eq!(bird_lines(&ns), expected);
    let listener = listener_in(&ns.name).unwrap();

    // Someone deletes the agent's routes: restored, BIRD's untouched.
    ns.ip(&["route", "del", "10.93.0.0/24"]).unwrap();
    ns.ip(&["route", "del", "10.94.0.0/24", "table", "100"])
        .unwrap();
    wait_until("the agent's routes back", || {
        count(
            &routes(&ns, "main"),
            "10.93.0.0/24 via 10.200.0.254 dev veth0",
        ) == 1
            && count(
                &routes(&ns, "100"),
                "10.94.0.0/24 via 10.200.0.254 dev veth0",
            ) == 1
    });
    agent.wait_log_all(&["restored", "own-main"]);
    assert_eq!(bird_lines(&ns), expected);
    let before = scrape(&http);

    // Two reconfigurations of BIRD (a route added, then removed again), each seen in the kernel.
    let t0 = Instant::now();
    let extra = "  route 10.95.0.0/24 via 10.200.0.254;\n";
    bird.configure(&bird_conf(extra)).expect("birdc configure");
    wait_until("BIRD's new route", || bird_lines(&ns).len() == 4);
    bird.configure(&bird_conf("")).expect("birdc configure");
    wait_until("BIRD's route withdrawn", || bird_lines(&ns) == expected);
    let reconfigured = t0.elapsed();
    // And one more period of BIRD's kernel scan (1 s) with nothing to do.
    let window = Duration::from_millis(1500);
    let mut shared_events = 0;
    let mut bird_events = 0;
    let mut seen = 0;
    while let Some((_, msg)) = listener.next(window.saturating_sub(t0.elapsed())) {
        seen += 1;
        if let Some(M::NewRoute(r) | M::DelRoute(r)) = &msg {
            if let Some((k, _)) = netwarden::observe::decode::route(r) {
                let dst = k.destination.to_string();
                if dst == "10.91.0.0/24" {
                    shared_events += 1;
                } else if dst == "10.90.0.0/24" || dst == "10.92.0.0/24" {
                    bird_events += 1;
                }
            }
        }
        if t0.elapsed() >= window {
            break;
        }
    }
    let after = scrape(&http);
    println!(
        "bird: 2 reconfigurations applied in {:.3} ms; over {:.0} ms, {seen} notifications: the shared route changed {shared_events} times, BIRD's others {bird_events} times; agent route repairs {} -> {}",
        rig::outage::ms(reconfigured),
        rig::outage::ms(t0.elapsed()),
        route_repairs(&before),
        route_repairs(&after)
    );
    assert_eq!(shared_events, 0, "the shared route flapped");
    assert_eq!(bird_events, 0, "BIRD's routes were touched");
    assert_eq!(route_repairs(&after), route_repairs(&before), "{after}");
    assert_eq!(
        total(
            &after,
            "netwarden_drift_detected_total",
            &[("kind", "route")]
        ),
        total(
            &before,
            "netwarden_drift_detected_total",
            &[("kind", "route")]
        ),
    );

    // No fight: nothing contested, nothing deferred, everything in sync; BIRD's routes as before.
    assert_eq!(total(&after, "netwarden_contested_objects", &[]), 0.0);
    assert_eq!(
        total(
            &after,
            "netwarden_protected_objects",
            &[("state", "contested")]
        ),
        0.0
    );
    assert_eq!(total(&after, "netwarden_repairs_deferred_total", &[]), 0.0);
    let st = status(&http);
    assert!(
        st.objects
            .iter()
            .all(|o| o.state == netwarden::telemetry::status::State::InSync && o.fighter.is_none()),
        "{st:#?}"
    );
    assert_eq!(bird_lines(&ns), expected);
    let errors: Vec<String> = bird
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("<ERR>") || l.contains("File exists"))
        .cloned()
        .collect();
    assert!(errors.is_empty(), "BIRD logged errors: {errors:?}");
}
