//! Chaos (issue 8): threads delete random protected rules, routes, addresses, chain rules and set
//! members at well over 1,000 deletions/s while another adds and removes foreign rules and routes.
//! When the chaos stops: every protected object comes back (those the agent did not mark as
//! contested within 100 ms, set members, seen by polls, within a few poll intervals; the contested ones once their backoff expires), none twice, every
//! foreign object is as the chaos left it, and the agent's memory did not grow.
//!
//! NETWARDEN_CHAOS_SECS sets the length of the chaos (default 8 s; the CI bound is 2 min).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const RULES: usize = 1500;
const ROUTES: usize = 3000;
const ADDRS: usize = 10;
const CHAIN_RULES: usize = 10;
const MEMBERS: usize = 100;

fn rule_line(i: usize) -> String {
    format!(
        "{}: from 10.{}.{}.0/24 lookup 77",
        1000 + i,
        50 + i / 250,
        i % 250
    )
}
fn route_dst(i: usize) -> String {
    format!("10.{}.{}.0/24", 100 + i / 250, i % 250)
}
fn addr(i: usize) -> String {
    format!("10.201.0.{}", i + 1)
}

fn spec() -> String {
    let mut s = String::from("  pollInterval: 100ms\n  rules:\n");
    for i in 0..RULES {
        s.push_str(&format!(
            "    - name: rule{i}\n      priority: {}\n      from: 10.{}.{}.0/24\n      table: 77\n",
            1000 + i,
            50 + i / 250,
            i % 250
        ));
    }
    s.push_str("  routes:\n");
    for i in 0..ROUTES {
        s.push_str(&format!(
            "    - name: route{i}\n      table: 100\n      destination: {}\n      device: veth0\n",
            route_dst(i)
        ));
    }
    s.push_str("  addresses:\n");
    for i in 0..ADDRS {
        s.push_str(&format!(
            "    - name: addr{i}\n      device: veth0\n      address: {}/32\n",
            addr(i)
        ));
    }
    s.push_str("  chains:\n    - name: chaos-chain\n      table: filter\n      chain: NW-CHAOS\n      rules:\n");
    for i in 0..CHAIN_RULES {
        s.push_str(&format!("        - \"-s 10.9.0.{i}/32 -j DROP\"\n"));
    }
    s.push_str("  ipsets:\n    - name: nw-chaos\n      type: hash:ip\n      members: [");
    let members: Vec<String> = (0..MEMBERS).map(|i| format!("10.8.0.{i}")).collect();
    s.push_str(&members.join(", "));
    s.push_str("]\n");
    s
}

struct Rng(u64);
impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 % n as u64) as usize
    }
}

/// Runs a tool in the namespace with `input` on stdin; errors (objects already gone) are fine.
fn feed(ns: &str, tool: &[&str], input: &str) {
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", ns])
        .args(tool)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait().unwrap();
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

fn contested_objects(addr: &str) -> f64 {
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .filter(|l| l.starts_with("netwarden_contested_objects{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// What is missing or doubled among the protected objects right now.
fn protected_problems(ns: &Sandbox) -> Vec<String> {
    let mut problems = Vec::new();
    let rules = rules(ns);
    for i in 0..RULES {
        let n = count(&rules, &rule_line(i));
        if n != 1 {
            problems.push(format!("rule {i} x{n}"));
        }
    }
    let routes: BTreeSet<String> = routes(ns, "100")
        .into_iter()
        .filter_map(|l| l.split(' ').next().map(str::to_owned))
        .collect();
    for i in 0..ROUTES {
        if !routes.contains(&route_dst(i)) {
            problems.push(format!("route {i}"));
        }
    }
    let addrs = ns
        .ip(&["-4", "-o", "address", "show", "dev", "veth0"])
        .unwrap();
    for i in 0..ADDRS {
        let n = addrs.matches(&format!("inet {}/32 ", addr(i))).count();
        if n != 1 {
            problems.push(format!("address {i} x{n}"));
        }
    }
    let chain = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables", "-S", "NW-CHAOS"])
        .output()
        .unwrap();
    let chain = String::from_utf8_lossy(&chain.stdout);
    for i in 0..CHAIN_RULES {
        let n = chain
            .lines()
            .filter(|l| *l == format!("-A NW-CHAOS -s 10.9.0.{i}/32 -j DROP"))
            .count();
        if n != 1 {
            problems.push(format!("chain rule {i} x{n}"));
        }
    }
    let set = std::process::Command::new("ip")
        .args(["netns", "exec", &ns.name, "ipset", "list", "nw-chaos"])
        .output()
        .unwrap();
    let set: BTreeSet<String> = String::from_utf8_lossy(&set.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    for i in 0..MEMBERS {
        if !set.contains(&format!("10.8.0.{i}")) {
            problems.push(format!("member {i}"));
        }
    }
    problems
}

#[test]
fn chaos_then_everything_protected_is_back_and_foreign_state_untouched() {
    let secs: u64 = std::env::var("NETWARDEN_CHAOS_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&ns, &config(dir.path(), &spec()));
    let http = agent.http();
    let pid = agent.pid();
    wait_until("everything protected in place", || {
        protected_problems(&ns).is_empty()
    });

    let stop = Arc::new(AtomicBool::new(false));
    let deletions = Arc::new(AtomicU64::new(0));
    let mut threads = Vec::new();
    // Two deleters of rules and routes (with the odd address), 100 deletions per `ip -batch`.
    for t in 0..2u64 {
        let (stop, deletions, name) = (stop.clone(), deletions.clone(), ns.name.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x9e37_79b9_7f4a_7c15 + t);
            // Paced at 700 deletions/s per thread (one batch of 100 every 140 ms): unpaced, two
            // threads reach 12,000/s and nearly every object becomes contested.
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += Duration::from_millis(140);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let mut batch = String::new();
                for _ in 0..100 {
                    match rng.below(200) {
                        0 => batch.push_str(&format!(
                            "address del {}/32 dev veth0\n",
                            addr(rng.below(ADDRS))
                        )),
                        k if k % 2 == 0 => {
                            let i = rng.below(RULES);
                            batch.push_str(&format!(
                                "rule del priority {} from 10.{}.{}.0/24 table 77\n",
                                1000 + i,
                                50 + i / 250,
                                i % 250
                            ))
                        }
                        _ => batch.push_str(&format!(
                            "route del {} table 100\n",
                            route_dst(rng.below(ROUTES))
                        )),
                    }
                }
                feed(&name, &["ip", "-force", "-batch", "-"], &batch);
                deletions.fetch_add(100, Ordering::Relaxed);
            }
        }));
    }
    // Chain rules and set members, through the tools' batch modes.
    {
        let (stop, deletions, name) = (stop.clone(), deletions.clone(), ns.name.clone());
        threads.push(std::thread::spawn(move || {
            let mut rng = Rng(0x1234_5678_9abc_def1);
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                next += Duration::from_millis(50);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
                let i = rng.below(CHAIN_RULES);
                feed(
                    &name,
                    &["iptables-restore", "--noflush"],
                    &format!("*filter\n-D NW-CHAOS -s 10.9.0.{i}/32 -j DROP\nCOMMIT\n"),
                );
                let dels: String = (0..20)
                    .map(|_| format!("del nw-chaos 10.8.0.{}\n", rng.below(MEMBERS)))
                    .collect();
                feed(&name, &["ipset", "-exist", "restore"], &dels);
                deletions.fetch_add(21, Ordering::Relaxed);
            }
        }));
    }
    // Foreign rules and routes come and go; the model says what the chaos left.
    let foreign = {
        let (stop, name) = (stop.clone(), ns.name.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(0xdead_beef_cafe_f00d);
            let mut routes = BTreeSet::new();
            let mut rules = BTreeSet::new();
            while !stop.load(Ordering::Relaxed) {
                let mut batch = String::new();
                for _ in 0..100 {
                    let i = rng.below(500);
                    if rng.below(2) == 0 {
                        let dst = format!("10.150.{}.{}/32", i / 250, i % 250);
                        if routes.insert(dst.clone()) {
                            batch.push_str(&format!("route add {dst} dev veth0 table 200\n"));
                        } else {
                            routes.remove(&dst);
                            batch.push_str(&format!("route del {dst} table 200\n"));
                        }
                    } else if rules.insert(i) {
                        batch.push_str(&format!("rule add priority {} table 300\n", 20000 + i));
                    } else {
                        rules.remove(&i);
                        batch.push_str(&format!("rule del priority {} table 300\n", 20000 + i));
                    }
                }
                feed(&name, &["ip", "-batch", "-"], &batch);
            }
            (routes, rules)
        })
    };

    // RSS through the chaos.
    let started = Instant::now();
    let mut rss = Vec::new();
    while started.elapsed() < Duration::from_secs(secs) {
        rss.push(vm_rss_kib(pid));
        std::thread::sleep(Duration::from_millis(100));
    }
    stop.store(true, Ordering::Relaxed);
    for t in threads {
        t.join().unwrap();
    }
    let (foreign_routes, foreign_rules) = foreign.join().unwrap();
    let stopped = Instant::now();
    let chaos = stopped - started;
    let total = deletions.load(Ordering::Relaxed);
    let rate = total as f64 / chaos.as_secs_f64();
    eprintln!("chaos: {total} deletions in {chaos:?} ({rate:.0}/s)");
    assert!(rate >= 1000.0, "only {rate:.0} deletions/s");

    // Back within 100 ms, except contested objects (they wait for their backoff).
    // Set members are seen by polls only (`ipset save` every pollInterval, 100 ms at least): they
    // are checked by the bounded wait below, not against the 100 ms.
    let evented = |p: &String| !p.starts_with("member");
    let mut quick = None;
    while stopped.elapsed() < Duration::from_millis(100) {
        if !protected_problems(&ns).iter().any(evented) {
            quick = Some(stopped.elapsed());
            break;
        }
    }
    let contested = contested_objects(&http);
    let at_100ms: Vec<String> = protected_problems(&ns)
        .into_iter()
        .filter(evented)
        .collect();
    eprintln!(
        "after 100 ms: all back = {quick:?}; {} missing or doubled, {contested} contested: {:?}",
        at_100ms.len(),
        &at_100ms[..at_100ms.len().min(20)]
    );
    // Objects still missing must be contested ones: the agent said so for each of them.
    let log = agent.log.lock().unwrap().clone();
    // A fight over a chain is not a rule iptables-save prints otherwise: the chain must stay
    // enforced (it used to turn report-only under this chaos). The guard says `repair does not
    // take` when it gives a chain up.
    assert!(
        !log.iter().any(|l| l.contains("does not take")),
        "the guard gave up on a chain under the chaos"
    );
    for problem in &at_100ms {
        let words: Vec<&str> = problem.split(' ').collect();
        let name = match words[..] {
            ["rule", i, ..] => format!("name=rule{i} "),
            ["route", i, ..] => format!("name=route{i} "),
            ["address", i, ..] => format!("name=addr{i} "),
            _ => "name=chaos-chain ".to_string(),
        };
        // The rtnetlink loop says `contested: removed again`, the chain guard `contested:
        // changed again` (a chain is changed, not removed, when one of its rules goes).
        assert!(
            log.iter().any(|l| (l.contains("contested: removed again")
                || l.contains("contested: changed again"))
                && l.contains(&name)),
            "{problem} not back within 100 ms of the end of the chaos, and never contested; chain log:\n{}",
            log.iter()
                .filter(|l| l.contains("chain"))
                .rev()
                .take(8)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The chain's missing rules are one contested object.
    let objects: BTreeSet<&str> = at_100ms
        .iter()
        .map(|p| {
            if p.starts_with("chain rule") {
                "chain"
            } else {
                p.as_str()
            }
        })
        .collect();
    assert!(
        quick.is_some() || objects.len() as f64 <= contested,
        "{} objects not back within 100 ms but only {contested} contested: {:?}",
        at_100ms.len(),
        &at_100ms[..at_100ms.len().min(20)]
    );
    // Every contested object comes back once its backoff (at most 30 s) expires.
    let deadline = stopped + Duration::from_secs(35);
    let all_back = loop {
        let problems = protected_problems(&ns);
        if problems.is_empty() {
            break stopped.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "{} still missing or doubled 35 s after the chaos: {:?}",
            problems.len(),
            &problems[..problems.len().min(20)]
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    eprintln!("everything back {all_back:?} after the chaos stopped");

    // Foreign objects exactly as the chaos left them.
    let now_routes: BTreeSet<String> = routes(&ns, "200")
        .into_iter()
        .filter_map(|l| l.split(' ').next().map(|d| format!("{d}/32")))
        .collect();
    assert_eq!(now_routes, foreign_routes);
    let now_rules: BTreeSet<usize> = rules(&ns)
        .iter()
        .filter(|l| l.ends_with("lookup 300"))
        .filter_map(|l| l.split(':').next()?.parse::<usize>().ok())
        .map(|p| p - 20000)
        .collect();
    assert_eq!(now_rules, foreign_rules);

    // Memory: the mean VmRSS of the last quarter of the chaos against the first quarter. The
    // first quarter already holds every protected object and the fight's bookkeeping; allow 10%
    // plus 2 MiB for allocator noise (glibc arenas, the odd re-dump buffer).
    let q = (rss.len() / 4).max(1);
    let mean = |s: &[u64]| s.iter().sum::<u64>() / s.len() as u64;
    let (first, last) = (mean(&rss[..q]), mean(&rss[rss.len() - q..]));
    eprintln!("VmRSS first quarter {first} KiB, last quarter {last} KiB");
    assert!(
        last <= first + first / 10 + 2048,
        "memory grew: {first} KiB -> {last} KiB ({rss:?})"
    );
}
