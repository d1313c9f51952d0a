//! `cargo bench --bench scale`: the agent on a host with a big routing table (issue 8). 500,000
//! foreign routes in table 200 (NETWARDEN_SCALE_ROUTES), churned by a background `ip -batch`
//! while 1,000 protected rules and 100 protected routes are guarded. Measures the agent's RSS,
//! the latency of single-rule repairs (RTM_DELRULE from our socket → the agent's RTM_NEWRULE seen
//! by an independent listener, as benches/repair.rs does), and how long a full refresh (a re-dump
//! of every route, at every resync) takes with that table. Targets are printed, not asserted.
//! NETWARDEN_SCALE_DELETIONS (default 1000) single deletions are timed; NETWARDEN_SCALE_TABLE (200)
//! is the foreign routes' table (`main` for a BGP-like host); NETWARDEN_SCALE_BIN runs another
//! agent binary (to compare builds). Results: docs/benchmarks.md.

#[path = "../tests/common/deployed.rs"]
mod deployed;

use anyhow::{anyhow, ensure, Context, Result};
use deployed::Privileges;
use netwarden::apply::encode;
use netwarden::model::{Family, RuleAction, RuleKey};
use netwarden::observe::decode;
use netwarden::testing::listen::{Listener, Seen};
use netwarden::testing::sandbox::Sandbox;
use rtnetlink::packet_core::{Emitable, NetlinkBuffer, NetlinkMessage, NetlinkPayload, Parseable};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fmt::Write as _;
use std::io::Write;
use std::os::fd::AsFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
/// Protected rules (`NETWARDEN_SCALE_RULES` changes it).
fn rules() -> usize {
    env_num("NETWARDEN_SCALE_RULES", 1000).max(1)
}
const ROUTES: usize = 100;

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn foreign(i: usize) -> String {
    format!(
        "{}.{}.{}.{}/32",
        100 + i / 65_536,
        (i / 256) % 256,
        i % 256,
        1
    )
}

fn rule_key(i: usize) -> RuleKey {
    RuleKey::new(
        Family::Ipv4,
        1000 + i as u32,
        Some(
            format!("10.{}.{}.0/24", 16 + i / 256, i % 256)
                .parse()
                .unwrap(),
        ),
        None,
        None,
        None,
        None,
        None,
        100,
        RuleAction::Lookup,
    )
}

fn config() -> String {
    let mut y = String::from(
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  resync: 10s\n  rules:\n",
    );
    for i in 0..rules() {
        let _ = writeln!(
            y,
            "    - name: rule-{i}\n      priority: {}\n      from: 10.{}.{}.0/24\n      table: 100",
            1000 + i,
            16 + i / 256,
            i % 256
        );
    }
    y.push_str("  routes:\n");
    for j in 0..ROUTES {
        let _ = writeln!(
            y,
            "    - name: route-{j}\n      table: 100\n      destination: 10.64.0.{j}/32\n      device: veth0"
        );
    }
    y
}

fn vm_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() -> Result<()> {
    if std::env::args().any(|a| a == "--list") {
        return Ok(());
    }
    let n = env_num("NETWARDEN_SCALE_ROUTES", 500_000);
    let deletions = env_num("NETWARDEN_SCALE_DELETIONS", 1000);
    let table = std::env::var("NETWARDEN_SCALE_TABLE").unwrap_or_else(|_| "200".into());
    let bin = std::env::var("NETWARDEN_SCALE_BIN").unwrap_or_else(|_| BIN.into());
    let ns = Sandbox::create("nw-scale")?;
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])?;
    ns.ip(&["link", "set", "veth0", "up"])?;
    ns.ip(&["link", "set", "veth1", "up"])?;
    ns.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])?;

    let t = Instant::now();
    let mut batch = String::with_capacity(n * 40);
    for i in 0..n {
        let _ = writeln!(batch, "route add {} dev veth0 table {table}", foreign(i));
    }
    ns.batch(&[], &batch)?;
    println!(
        "{n} foreign routes (table {table}) added with ip -batch in {:?}",
        t.elapsed()
    );

    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("scale.yaml");
    std::fs::write(&cfg, config())?;
    let started = Instant::now();
    // As the DaemonSet runs it: started inside the namespace with its user and capabilities.
    let mut agent = Privileges::of_daemonset()
        .command_in(std::path::Path::new(&bin), &ns.name)
        .args(["run", "--config", cfg.to_str().unwrap()])
        .args(["--log-level", "info,netwarden::reconcile=debug"])
        .args(["--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    struct Kill(u32);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
    let pid = agent.id();
    let _kill = Kill(pid);
    let log = netwarden::testing::lines::collect(agent.stderr.take().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|l| l.contains("initial sync done"))
    {
        ensure!(Instant::now() < deadline, "agent not ready");
        ensure!(
            agent.try_wait()?.is_none(),
            "agent exited: {:?}",
            log.lock().unwrap()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    println!(
        "agent ready in {:?}; RSS {} KiB",
        started.elapsed(),
        vm_rss_kib(pid)
    );

    // Churn: a background ip -batch replacing foreign routes, a slice at a time.
    let stop = Arc::new(AtomicBool::new(false));
    let churned = Arc::new(AtomicU64::new(0));
    let churn = {
        let (stop, churned, name) = (stop.clone(), churned.clone(), ns.name.clone());
        let table = table.clone();
        std::thread::spawn(move || {
            let mut at = 0usize;
            while !stop.load(Ordering::Relaxed) {
                let mut b = String::new();
                for k in 0..2000 {
                    let r = foreign((at + k) % n);
                    let _ = writeln!(
                        b,
                        "route del {r} table {table}\nroute add {r} dev veth0 table {table}"
                    );
                }
                at = (at + 2000) % n;
                let mut c = Command::new("ip")
                    .args(["-n", &name, "-force", "-batch", "-"])
                    .stdin(Stdio::piped())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .unwrap();
                c.stdin.take().unwrap().write_all(b.as_bytes()).unwrap();
                c.wait().unwrap();
                churned.fetch_add(4000, Ordering::Relaxed);
            }
        })
    };

    // The agent's /metrics is on the host's loopback: scraped by a thread that stays there.
    let (scrape_tx, scrape_rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<String>>();
    {
        let addr = log
            .lock()
            .unwrap()
            .iter()
            .find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix("addr="))
                    .map(str::to_string)
            })
            .context("no metrics address in the agent's log")?;
        std::thread::spawn(move || {
            for reply in scrape_rx {
                let body = netwarden::telemetry::http::get(
                    &addr,
                    "/metrics",
                    None,
                    Duration::from_secs(5),
                )
                .map(|(_, b)| b)
                .unwrap_or_default();
                let _ = reply.send(body);
            }
        });
    }
    // Single-rule repairs, timed from outside, in the namespace (this thread only).
    netwarden::netns::enter(&ns.name)?;
    // Rules only: with every group, the listener's own backlog of route notifications (tens of
    // thousands a second) was part of each measurement (NETWARDEN_SCALE_LISTEN_ALL=1: as before).
    let listener = if std::env::var_os("NETWARDEN_SCALE_LISTEN_ALL").is_some() {
        Listener::start()?
    } else {
        Listener::start_groups(netwarden::testing::listen::IPV4_RULES)?
    };
    let mut sock = Socket::new(NETLINK_ROUTE)?;
    sock.bind_auto()?;
    sock.connect(&SocketAddr::new(0, 0))?;
    nix::sys::socket::setsockopt(
        &sock.as_fd(),
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(5, 0),
    )?;
    let rules = rules();
    let mut rss_max = 0;
    let mut lat = Vec::with_capacity(deletions);
    // The two halves of each: the bench's own deletion (send to its ack) and the rest (ack to
    // the re-add seen), to tell the kernel's wait for the churn from the agent's reaction.
    let mut del_part = Vec::with_capacity(deletions);
    let mut repair_part = Vec::with_capacity(deletions);
    // What the listener saw: the deletion's notification to the re-add's (the rule's absence,
    // without the deleting process's own send and wake-up).
    let mut outage = Vec::with_capacity(deletions);
    let churn_started = Instant::now();
    let mut buf = Vec::with_capacity(64 << 10);
    for d in 0..deletions + 20 {
        let key = rule_key(d % rules);
        let mut msg = encode::request(M::DelRule(encode::rule(&key, None)), false, false);
        msg.header.sequence_number = d as u32 + 1;
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        listener.drain();
        let sent = Instant::now();
        sock.send(&bytes, 0)?;
        // The ack (or error) of the deletion.
        buf.clear();
        sock.recv(&mut buf, 0).context("no ack")?;
        let acked = Instant::now();
        let slice = &buf[..];
        let nb = NetlinkBuffer::new_checked(&slice).map_err(|e| anyhow!("{e}"))?;
        if let Ok(m) = NetlinkMessage::<M>::parse(&nb) {
            if let NetlinkPayload::Error(e) = m.payload {
                ensure!(e.code.is_none(), "deletion refused: {e:?}");
            }
        }
        let del_seen = std::cell::Cell::new(None);
        let seen = listener
            .wait_for(sent + Duration::from_secs(5), |s: &Seen| {
                if matches!(&s.1, Some(M::DelRule(m)) if decode::rule(m).is_some_and(|(k, _)| k == key)) {
                    del_seen.set(Some(s.0));
                }
                matches!(&s.1, Some(M::NewRule(m)) if decode::rule(m).is_some_and(|(k, _)| k == key))
            })
            .ok_or_else(|| anyhow!("rule {d} not repaired within 5 s"))?;
        if d >= 20 {
            if let Some(t) = del_seen.get() {
                outage.push(seen.0.saturating_duration_since(t));
            }
            lat.push(seen.0.saturating_duration_since(sent));
            del_part.push(acked.saturating_duration_since(sent));
            repair_part.push(seen.0.saturating_duration_since(acked));
        }
        rss_max = rss_max.max(vm_rss_kib(pid));
        std::thread::sleep(Duration::from_millis(5));
    }
    // A deletion that lands during a full refresh: an address removal makes the agent re-dump
    // every route; the rule is deleted right after it.
    let mut during = Vec::new();
    for r in 0..5 {
        ns.ip(&["address", "add", "10.210.0.1/32", "dev", "veth1"])?;
        std::thread::sleep(Duration::from_millis(1500));
        let key = rule_key(r);
        let mut msg = encode::request(M::DelRule(encode::rule(&key, None)), false, false);
        msg.header.sequence_number = 100_000 + r as u32;
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        ns.ip(&["address", "del", "10.210.0.1/32", "dev", "veth1"])?;
        listener.drain();
        let sent = Instant::now();
        sock.send(&bytes, 0)?;
        buf.clear();
        sock.recv(&mut buf, 0).context("no ack")?;
        let seen = listener
            .wait_for(sent + Duration::from_secs(10), |s: &Seen| {
                matches!(&s.1, Some(M::NewRule(m)) if decode::rule(m).is_some_and(|(k, _)| k == key))
            })
            .ok_or_else(|| anyhow!("rule not repaired within 10 s of a refresh"))?;
        during.push(seen.0.saturating_duration_since(sent));
    }
    println!(
        "single-rule repair deleted right after an address removal (route re-dump): {during:?}"
    );
    // Let a couple of timer resyncs (every 10 s) happen under churn.
    while churn_started.elapsed() < Duration::from_secs(25) {
        rss_max = rss_max.max(vm_rss_kib(pid));
        std::thread::sleep(Duration::from_millis(200));
    }
    stop.store(true, Ordering::Relaxed);
    churn.join().unwrap();
    let secs = churn_started.elapsed().as_secs_f64();
    lat.sort();
    println!(
        "churn: {} foreign route changes in {secs:.1} s ({:.0}/s)",
        churned.load(Ordering::Relaxed),
        churned.load(Ordering::Relaxed) as f64 / secs
    );
    println!(
        "single-rule repair under churn ({} deletions): p50 {:?} p99 {:?} max {:?} (targets p50 <= 0.3 ms, p99 <= 2 ms)",
        lat.len(),
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().unwrap()
    );
    for (what, v) in [
        ("all", &mut lat),
        ("deletion (send to ack)", &mut del_part),
        ("after the ack (to the re-add seen)", &mut repair_part),
        ("deletion seen to re-add seen", &mut outage),
    ] {
        if v.is_empty() {
            continue;
        }
        v.sort();
        println!(
            "  {what} (n={}): p50 {:?} p90 {:?} p99 {:?} p99.9 {:?}",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.99),
            percentile(v, 0.999)
        );
    }
    println!(
        "agent RSS: max {rss_max} KiB, now {} KiB (target <= 64 MiB)",
        vm_rss_kib(pid)
    );
    // Rules are repaired without the kernel's existence check: none may be left twice.
    let shown = ns.ip(&["rule", "show"])?;
    let mut lines: Vec<&str> = shown.lines().collect();
    let all = lines.len();
    lines.sort_unstable();
    lines.dedup();
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    scrape_tx.send(reply_tx)?;
    let metrics = reply_rx.recv_timeout(Duration::from_secs(10))?;
    let sample = |name: &str, labels: &str| {
        metrics
            .lines()
            .find(|l| l.starts_with(name) && l.contains(labels))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or("?")
            .to_string()
    };
    println!(
        "rules held twice at the end: {}; rule re-dumps (rule_added_again): {}; rule repairs already present: {}",
        all - lines.len(),
        sample("netwarden_resyncs_total", "reason=\"rule_added_again\""),
        sample("netwarden_repairs_total", "kind=\"rule\",result=\"already_present\""),
    );
    for l in log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("full refresh"))
    {
        let field = |k: &str| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .unwrap_or("?")
                .to_string()
        };
        println!(
            "full refresh: reason={} took_us={} mirrored={}",
            field("reason="),
            field("took_us="),
            field("mirrored=")
        );
    }
    Ok(())
}
