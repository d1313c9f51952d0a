//! `cargo bench --bench networkd`: a real systemd-networkd restart against the real agent.
//!
//! A throw-away namespace with `veth0` managed by the distribution's systemd-networkd (run by
//! the rig of tests/rig/networkd.rs: private mount namespace, private /run, fake udev database),
//! 200 protected rules and 2,000 protected routes on `veth0`: 1,000 device routes and 1,000
//! through a gateway on veth0's subnet. Each round restarts networkd (stop with SIGTERM and
//! wait, start again): it deletes every foreign rule and route, then removes and re-adds its own
//! address (the kernel drops every IPv4 route on the link with it; the gateway routes cannot be
//! put back until the address is: ENETUNREACH), and the agent puts everything back. An
//! independent rtnetlink listener (`netwarden::testing::listen::Listener`, created inside the namespace)
//! times, per round:
//!
//! - **flush → all back**: from the first protected object lost to the last one seen re-added;
//! - the flush itself: from the first loss to the last (networkd deleting, the kernel dropping);
//! - **longest missing**: the longest any single protected object was missing;
//! - **longest missing, less the time its link had no address** (when nobody can add it);
//! - networkd's own address gap (its address removed → re-added).
//!
//! With NETWARDEN_BENCH_DROPIN=1 networkd runs with the drop-ins `netwarden networkd` prints for
//! this config (ManageForeignRoutingPolicyRules=no, ManageForeignRoutes=no, KeepConfiguration=
//! static on veth0): then a restart should remove nothing protected.
//!
//! Reported (median, p90, max over the rounds), not asserted. Environment:
//! NETWARDEN_BENCH_RESTARTS (20), NETWARDEN_BENCH_RESTART_GAP_MS (2500: longer than the agent's
//! 2 s "contested" window, so that each restart is measured as a fresh event; shorter gaps show
//! the backoff instead), NETWARDEN_BENCH_LOG_LEVEL (info), NETWARDEN_BENCH_AGENT (another
//! `netwarden` binary to measure, e.g. one built from an older commit, for a before/after).
//! Results: docs/benchmarks.md.

#[path = "../tests/common/deployed.rs"]
mod deployed;
#[allow(dead_code)]
#[path = "../tests/rig/networkd.rs"]
mod networkd;
#[allow(dead_code)]
#[path = "../tests/rig/outage.rs"]
mod outage;

use anyhow::{bail, ensure, Context, Result};
use deployed::Privileges;
use netwarden::testing::sandbox::Sandbox;
use networkd::Networkd;
use outage::{listener_in, ms, Outage};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
const RULES: usize = 200;
/// Half of them device routes, half through the gateway.
const ROUTES: usize = 2_000;
const GATEWAY: &str = "10.200.0.254";
const TABLE: u32 = 100;
const AGENT_READY: Duration = Duration::from_secs(60);
const ALL_BACK: Duration = Duration::from_secs(30);

fn env_num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

/// 200 rules `priority 1000+i from 10.16.i.0/24 lookup 100`; in table 100, 1,000 routes
/// `10.64.x.y/32 dev veth0` (device routes on the link networkd manages) and 1,000 routes
/// `10.65.x.y/32 via 10.200.0.254 dev veth0` (through a gateway on its subnet).
fn config_yaml() -> String {
    let mut y = String::from(
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  resync: 600s\n  rules:\n",
    );
    for i in 0..RULES {
        let _ = writeln!(
            y,
            "    - name: rule-{i}\n      priority: {}\n      from: 10.16.{i}.0/24\n      table: {TABLE}",
            1000 + i
        );
    }
    y.push_str("  routes:\n");
    for j in 0..ROUTES / 2 {
        let _ = writeln!(
            y,
            "    - name: route-{j}\n      table: {TABLE}\n      destination: 10.64.{}.{}/32\n      device: veth0",
            j / 256,
            j % 256
        );
        let _ = writeln!(
            y,
            "    - name: via-{j}\n      table: {TABLE}\n      destination: 10.65.{}.{}/32\n      gateway: {GATEWAY}\n      device: veth0",
            j / 256,
            j % 256
        );
    }
    y
}

/// How many of the protected rules and routes the kernel holds.
fn present(ns: &Sandbox) -> Result<(usize, usize)> {
    let rules = ns
        .ip(&["rule", "show", "table", &TABLE.to_string()])?
        .lines()
        .filter(|l| l.contains("from 10.16."))
        .count();
    let routes = ns
        .ip(&["route", "show", "table", &TABLE.to_string()])?
        .lines()
        .filter(|l| {
            (l.starts_with("10.64.") || l.starts_with("10.65."))
                && l.contains("dev veth0")
                && !l.contains("linkdown")
        })
        .count();
    Ok((rules, routes))
}

/// The agent as a separate process, as the DaemonSet runs it (started inside the namespace with
/// its user and capabilities); killed by pid on drop.
struct Agent {
    child: Child,
    ready: Receiver<()>,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    fn spawn(config: &Path, netns: &str, level: &str) -> Result<Agent> {
        let bin = std::env::var("NETWARDEN_BENCH_AGENT").unwrap_or_else(|_| BIN.to_string());
        let mut child = Privileges::of_daemonset()
            .command_in(Path::new(&bin), netns)
            .args(["run", "--config"])
            .arg(config)
            .args(["--log-level", level])
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {bin}"))?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let (tx, ready) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        // NW_BENCH_AGENT_LOG=1: keep every line, and print the last ones if a round fails.
        let keep_all = std::env::var_os("NW_BENCH_AGENT_LOG").is_some();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("initial sync done") {
                    let _ = tx.send(());
                }
                if keep_all
                    || line.contains("contested")
                    || line.contains("WARN")
                    || line.contains("ERROR")
                    || line.contains("restored")
                {
                    keep.lock().unwrap().push(line);
                }
            }
        });
        Ok(Agent { child, ready, log })
    }

    fn wait_ready(&mut self) -> Result<()> {
        if self.ready.recv_timeout(AGENT_READY).is_ok() {
            return Ok(());
        }
        bail!(
            "the agent did not log `initial sync done` within {AGENT_READY:?} (exit: {:?})",
            self.child.try_wait()
        )
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Round {
    span: Duration,
    flush: Duration,
    longest: Duration,
    addressed: Duration,
    no_address: Duration,
    address_gap: Duration,
    address_removals: usize,
    lost: usize,
    overrun: bool,
}

fn pct(v: &[Duration], q: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() - 1) as f64 * q).round() as usize]
}

fn line(what: &str, v: &[Duration]) {
    println!(
        "  {what:<38} p50 {:>8.3} ms   p90 {:>8.3} ms   max {:>8.3} ms",
        ms(pct(v, 0.5)),
        ms(pct(v, 0.9)),
        ms(pct(v, 1.0))
    );
}

fn main() -> Result<()> {
    let restarts = env_num("NETWARDEN_BENCH_RESTARTS", 20)? as usize;
    let gap = Duration::from_millis(env_num("NETWARDEN_BENCH_RESTART_GAP_MS", 2500)?);
    let level = std::env::var("NETWARDEN_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into());
    ensure!(restarts > 0, "NETWARDEN_BENCH_RESTARTS must be at least 1");
    println!("netwarden networkd-restart benchmark");
    let dropin = std::env::var_os("NETWARDEN_BENCH_DROPIN").is_some_and(|v| v == "1");
    println!(
        "state: {RULES} rules (priority 1000.., from 10.16.i.0/24 lookup {TABLE}) and {ROUTES} routes in table {TABLE} (half 10.64.x.y/32 dev veth0, half 10.65.x.y/32 via {GATEWAY} dev veth0); veth0 managed by {}{}",
        networkd::BINARY,
        if dropin { ", with the drop-ins that prevent its flush" } else { "" }
    );

    let ns = Sandbox::create("nwbench-nd")?;
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])?;
    ns.ip(&["link", "set", "veth1", "up"])?;
    ns.ip(&["link", "set", "veth0", "up"])?;
    let network = "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.1/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", network)])?;
    if dropin {
        // What `netwarden networkd` prints for this config (tests/offenders_networkd_advice.rs
        // checks that it does).
        nd.write_conf(
            "60-netwarden.conf",
            "[Network]\nManageForeignRoutingPolicyRules=no\nManageForeignRoutes=no\n",
        )?;
        nd.write_etc(
            "network/10-veth0.network.d/60-netwarden.conf",
            "[Network]\nKeepConfiguration=static\n",
        )?;
    }
    nd.start()?;
    nd.wait_configured("veth0")?;

    let dir = tempfile::tempdir()?;
    let cfg = dir.path().join("bench.yaml");
    std::fs::write(&cfg, config_yaml())?;
    let mut agent = Agent::spawn(&cfg, &ns.name, &level)?;
    agent.wait_ready()?;
    ensure!(
        present(&ns)? == (RULES, ROUTES),
        "after the initial sync: {:?}",
        present(&ns)?
    );

    let mut rounds = Vec::with_capacity(restarts);
    for i in 0..restarts {
        std::thread::sleep(gap);
        let listener = listener_in(&ns.name)?;
        let mut out = Outage::for_config(&cfg, |d| nd.ifindex(d).ok())?;
        out.seed_addresses([(nd.ifindex("veth0")?, "10.200.0.1".parse()?)]);
        let logged = agent.log.lock().unwrap().len();
        nd.restart()?;
        let back = out.settle(&listener, ALL_BACK, || {
            present(&ns).is_ok_and(|p| p == (RULES, ROUTES))
        });
        if !back && std::env::var_os("NW_BENCH_AGENT_LOG").is_some() {
            let log = agent.log.lock().unwrap();
            for l in &log[logged..] {
                eprintln!("agent: {l}");
            }
            eprintln!("{}", out.summary("failed round"));
            let mut missing = out.missing();
            missing.sort();
            eprintln!(
                "missing per the listener: {} {:?}",
                missing.len(),
                &missing[..missing.len().min(20)]
            );
            let table = ns.ip(&["route", "show", "table", &TABLE.to_string()])?;
            eprintln!(
                "table {TABLE}: {} routes, {} linkdown; veth0: {}",
                table.lines().count(),
                table.lines().filter(|l| l.contains("linkdown")).count(),
                ns.ip(&["-4", "address", "show", "dev", "veth0"])?
            );
        }
        ensure!(
            back,
            "restart {i}: not everything back within {ALL_BACK:?}: {:?}",
            present(&ns)?
        );
        // networkd's own address may come back after the agent's last repair: read on until it
        // has, so that its gap is measured too.
        nd.wait_configured("veth0")?;
        out.settle(&listener, ALL_BACK, || true);
        if std::env::var_os("NW_OUTAGE_TRACE").is_some() {
            eprintln!("{}", out.summary(&format!("restart {i}")));
        }
        let (addressed, worst) = out.longest_with_address();
        let worst = worst.map(|k| k.to_string()).unwrap_or_default();
        let r = Round {
            span: out.span(),
            flush: out.flush(),
            longest: out.longest(),
            addressed,
            no_address: out.longest_without_address(),
            address_gap: out.longest_address_gap,
            address_removals: out.address_removals,
            lost: out.lost().len(),
            overrun: out.overrun,
        };
        if std::env::var_os("NW_BENCH_AGENT_LOG").is_some() {
            let log = agent.log.lock().unwrap();
            for l in log[logged..].iter().filter(|l| {
                [
                    "burst", "deleters", "WARN", "dumped", "resync", "rules=2", "rules=1",
                ]
                .iter()
                .any(|w| l.contains(w))
            }) {
                eprintln!("agent: {}", &l[..l.len().min(240)]);
            }
            eprintln!(
                "listener: first loss {:?}, last deletion {:?}, first back {:?}, last back {:?}",
                out.first_loss.map(|t| t.elapsed()),
                out.last_deleted.map(|t| t.elapsed()),
                out.first_back.map(|t| t.elapsed()),
                out.last_back.map(|t| t.elapsed())
            );
        }
        let (pending, unknown) = {
            let log = agent.log.lock().unwrap();
            let new = &log[logged..];
            (
                new.iter()
                    .filter(|l| l.contains("WARN") && l.contains("pending"))
                    .count(),
                new.iter()
                    .filter(|l| l.contains("restored") && l.contains("actor=unknown"))
                    .count(),
            )
        };
        println!(
            "  restart {i:>2}: {:>4} objects lost, first -> last loss {:>7.3} ms, flush -> all back {:>8.3} ms, longest missing {:>8.3} ms ({:>7.3} ms less no-address time: {worst}), no address {:>7.3} ms, networkd's address gap {:>7.3} ms ({} removal); agent: {pending} `pending` warnings, {unknown} repairs of actor=unknown{}",
            r.lost,
            ms(r.flush),
            ms(r.span),
            ms(r.longest),
            ms(r.addressed),
            ms(r.no_address),
            ms(r.address_gap),
            r.address_removals,
            if r.overrun { " (listener overran)" } else { "" }
        );
        rounds.push(r);
    }
    ensure!(
        dropin
            || !nd
                .log_lines("Removing foreign routing policy rule")
                .is_empty(),
        "networkd never removed a foreign rule: it did not flush (container mode?)"
    );

    println!(
        "\nresults over {restarts} networkd restarts ({} s apart):",
        gap.as_secs_f64()
    );
    let spans: Vec<Duration> = rounds.iter().map(|r| r.span).collect();
    let longest: Vec<Duration> = rounds.iter().map(|r| r.longest).collect();
    let gaps: Vec<Duration> = rounds.iter().map(|r| r.address_gap).collect();
    let flushes: Vec<Duration> = rounds.iter().map(|r| r.flush).collect();
    line("first -> last loss (networkd's flush)", &flushes);
    line("flush -> last object restored", &spans);
    line("longest any protected object missing", &longest);
    let addressed: Vec<Duration> = rounds.iter().map(|r| r.addressed).collect();
    line("  less the time its link had no address", &addressed);
    let no_address: Vec<Duration> = rounds.iter().map(|r| r.no_address).collect();
    line("veth0 without an IPv4 address", &no_address);
    line("networkd's own address gap", &gaps);
    let lost: Vec<usize> = rounds.iter().map(|r| r.lost).collect();
    println!(
        "  objects lost per restart: min {} max {} (of {}); listener overruns: {}",
        lost.iter().min().unwrap(),
        lost.iter().max().unwrap(),
        RULES + ROUTES,
        rounds.iter().filter(|r| r.overrun).count()
    );
    let kept = agent.log.lock().unwrap().clone();
    let contested = kept.iter().filter(|l| l.contains("contested")).count();
    let warnings = kept
        .iter()
        .filter(|l| l.contains("WARN") || l.contains("ERROR"))
        .count();
    println!("  agent: {contested} `contested` log lines, {warnings} warnings/errors");
    Ok(())
}
