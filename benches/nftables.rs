//! nftables benchmark (harness = false; reports, asserts nothing).
//!
//! 1. The kube-proxy-shaped table of examples/nftables-kube-proxy.yaml deleted (`nft delete
//!    table`) → whole again. Measured from outside, on an nf_tables notification socket in the
//!    same namespace: from the NEWGEN of the deleting transaction to the NEWGEN of the agent's
//!    repair (commit to commit). Beside it, the floor: one `nft -f` of the very transaction the
//!    agent applies (the whole table), spawn to exit.
//! 2. `nft flush ruleset` with that table and a table holding a 5,000-element protected set →
//!    all back (one transaction), commit to commit; beside it one `nft -f` of the same
//!    transaction.
//! 3. Beside each, the reactive floor: with the agent gone, the same trigger, and the moment its
//!    NEWGEN arrives the same `nft -f` spawned, commit to commit: what a perfectly reactive
//!    script doing the agent's work takes, kernel work after the deletion included.
//!
//! Runs are spaced 3 s apart: a table deleted again within 2 s of its repair three times running
//! is contested and its repairs back off (that is a fight, not what is measured here).
//!
//! Everything happens in throw-away namespaces; this process enters them itself, so `nft` and
//! the notification socket live there too. Run as root: `cargo bench --bench nftables`.

#[path = "../tests/common/deployed.rs"]
mod deployed;

use deployed::Privileges;
use netwarden::nftables::events::Events;
use netwarden::nftables::plan::{self, Aliases};
use netwarden::nftables::render;
use netwarden::testing::commit_clock;
use netwarden::testing::sandbox::Sandbox;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
const WARMUP: usize = 5;

/// The agent as the DaemonSet runs it (its user and capabilities, started inside the namespace),
/// once its initial sync is done.
fn agent(ns: &str, cfg: &std::path::Path) -> Child {
    let mut child = Privileges::of_daemonset()
        .command_in(std::path::Path::new(BIN), ns)
        .args(["run", "--config"])
        .arg(cfg)
        .args(["--log-level", "info", "--metrics-addr", "off"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        if line.unwrap().contains("initial sync done") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    child
}

/// Runs `nft ARGS` with `input` on standard input; spawn to exit.
fn nft(args: &[&str], input: &str) -> Duration {
    let started = Instant::now();
    let mut child = spawn_nft(args, input).expect("nft");
    assert!(child.wait().unwrap().success(), "nft {args:?} failed");
    started.elapsed()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn summary(name: &str, mut v: Vec<f64>) -> String {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!(
        "| {name} | {} | {:.2} | {:.2} | {:.2} | {:.2} |",
        v.len(),
        percentile(&v, 0.5),
        percentile(&v, 0.99),
        v[0],
        v[v.len() - 1]
    )
}

/// The example, plus (`elements` > 0) a table with a set of that many protected elements.
fn config(elements: usize) -> String {
    let example = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/nftables-kube-proxy.yaml"),
    )
    .unwrap();
    if elements == 0 {
        return example;
    }
    let list: Vec<String> = (0..elements)
        .map(|i| format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256))
        .collect();
    format!(
        "{example}    - name: big\n      family: ip\n      table: bench\n      sets:\n        - name: members\n          type: ipv4_addr\n          elements: [{}]\n",
        list.join(", ")
    )
}

/// The transaction that creates every protected table from nothing: what the agent applies
/// after a `nft flush ruleset`.
fn creation(cfg: &netwarden::config::Config, only: Option<&str>) -> String {
    let repairs: Vec<_> = cfg
        .nftables
        .tables
        .iter()
        .filter(|t| only.is_none_or(|o| t.key.name == o))
        .filter_map(|t| plan::plan_table(t, None, &Aliases::new()).1)
        .collect();
    render::transaction(&repairs)
}

/// Commit to commit ([`commit_clock`]): `trigger` runs a transaction; the time from its NEWGEN
/// to the NEWGEN of the repair. `repair: None` times the agent's repair (the next NEWGEN by
/// another process). `Some(transaction)` times the reactive floor: the moment the trigger's
/// NEWGEN arrives, an `nft -f` of that transaction is spawned and its own NEWGEN ends the clock.
/// That is a perfectly reactive script doing the agent's work, kernel costs after the deletion
/// included (deleted chains and rules are freed after an RCU grace period, and the next
/// transaction waits for that).
async fn commit_to_commit(
    events: &mut Events,
    trigger: &[&str],
    repair: Option<&str>,
) -> Option<f64> {
    let child = Command::new("nft").args(trigger).spawn().unwrap();
    let out = commit_clock::commit_to_commit(
        events,
        child,
        repair.map(|t| move || spawn_nft(&["-f", "-"], t)),
    )
    .await
    .expect("nft");
    if repair.is_none() {
        // A table deleted again within 2 s of its repair, three times running, is contested
        // and its repairs back off (a fight): runs are spaced well beyond that window (the
        // agent notes its repair after nft exits and reads it back) so that each one measures
        // a plain repair.
        tokio::time::sleep(Duration::from_millis(3000)).await;
        commit_clock::drain(events).await;
    }
    out
}

/// `nft ARGS` with `input` on its stdin, running.
fn spawn_nft(args: &[&str], input: &str) -> std::io::Result<Child> {
    let mut r = Command::new("nft")
        .args(args)
        .stdin(Stdio::piped())
        .spawn()?;
    r.stdin.take().expect("piped").write_all(input.as_bytes())?;
    Ok(r)
}

fn scenario(
    rt: &tokio::runtime::Runtime,
    elements: usize,
    runs: usize,
    trigger: &[&str],
    only: Option<&str>,
) -> (Vec<f64>, Vec<f64>, Vec<f64>) {
    let ns = Sandbox::create("nw-bench-nft").unwrap();
    netwarden::netns::enter(&ns.name).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bench.yaml");
    std::fs::write(&path, config(elements)).unwrap();
    let cfg = netwarden::config::load(&path).unwrap();
    let create = creation(&cfg, only);
    let mut child = agent(&ns.name, &path);
    let mut repaired = Vec::new();
    let mut floor = Vec::new();
    rt.block_on(async {
        let mut events = Events::subscribe().unwrap();
        for run in 0..runs + WARMUP {
            match commit_to_commit(&mut events, trigger, None).await {
                Some(ms) if run >= WARMUP => repaired.push(ms),
                Some(_) => {}
                None => {
                    eprintln!("run {run}: not timed (notifications lost, or no repair within 5 s)")
                }
            }
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    // The floor, agent gone: the same transaction into the same emptied namespace.
    for _ in 0..runs.min(50) {
        nft(trigger, "");
        let took = nft(&["-f", "-"], &create);
        floor.push(took.as_secs_f64() * 1e3);
    }
    let mut reactive = Vec::new();
    rt.block_on(async {
        let mut events = Events::subscribe().unwrap();
        for _ in 0..runs {
            reactive.extend(commit_to_commit(&mut events, trigger, Some(&create)).await);
        }
    });
    (repaired, floor, reactive)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = Sandbox::create("nw-bench-probe") {
        eprintln!("nftables bench: cannot create a network namespace ({e}); needs root, skipped");
        return;
    }
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    };
    let r = rt();
    let (deleted, deleted_floor, deleted_reactive) = std::thread::spawn(move || {
        scenario(
            &r,
            0,
            40,
            &["delete", "table", "ip", "kube-proxy"],
            Some("kube-proxy"),
        )
    })
    .join()
    .unwrap();
    let r = rt();
    let (flushed, flushed_floor, flushed_reactive) =
        std::thread::spawn(move || scenario(&r, 5000, 20, &["flush", "ruleset"], None))
            .join()
            .unwrap();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "kernel {} cores {} loadavg {}",
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0),
        load.trim()
    );
    println!(
        "| measurement | runs | p50 ms | p99 ms | min ms | max ms |\n|---|---|---|---|---|---|"
    );
    println!(
        "{}",
        summary(
            "kube-proxy table deleted → whole again, commit to commit",
            deleted
        )
    );
    println!(
        "{}",
        summary(
            "one `nft -f` of the same table, spawn to exit (floor)",
            deleted_floor
        )
    );
    println!(
        "{}",
        summary(
            "the same `nft -f` spawned at the deletion's NEWGEN, commit to commit (reactive floor)",
            deleted_reactive
        )
    );
    println!(
        "{}",
        summary(
            "`nft flush ruleset`, 3 tables (one a 5,000-element set) → all back, commit to commit",
            flushed
        )
    );
    println!(
        "{}",
        summary(
            "one `nft -f` of the same three tables, spawn to exit (floor)",
            flushed_floor
        )
    );
    println!(
        "{}",
        summary(
            "the same `nft -f` spawned at the flush's NEWGEN, commit to commit (reactive floor)",
            flushed_reactive
        )
    );
}
