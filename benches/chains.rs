//! Chains and sets benchmark (harness = false; reports, asserts nothing).
//!
//! 1. A protected nat chain and its jump deleted in one iptables-nft transaction → restored by
//!    the agent (64 such chains, deleted in turn: a chain deleted again within 2 s of its repair
//!    would be a fight, which the agent rightly backs off from). Measured from outside, on an
//!    nf_tables notification socket in the same namespace: from the NEWGEN of the deleting
//!    transaction to the NEWGEN of the agent's repair (commit to commit), 200 runs. Beside it,
//!    with the agent gone: how long one `iptables-nft-restore` of the same repair takes in the
//!    same table, spawn to exit, and a shell's read-then-write (`iptables-nft-save -t nat`, then
//!    that restore). And the reactive floor: the agent gone, the same deletion, and the instant
//!    its NEWGEN arrives the same `iptables-nft-restore` the agent applies is spawned, timed like
//!    the repair (commit to commit). It holds what the kernel costs after the deletion (and what
//!    a busy machine costs a woken process), which a restore into a quiet table does not: what a
//!    perfectly reactive agent would take. And that kernel cost alone: how long closing a
//!    netfilter netlink socket blocks at the deletion's NEWGEN (see [`measure_release_wait`]).
//!    The same deletion and repair once more with chains whose rules are all native nf_tables
//!    expressions (no `-m comment`, no `MASQUERADE`), 60 runs: iptables-nft writes those two
//!    as xtables compat expressions, and the kernel makes every rule with a compat expression
//!    wait, whoever adds it, until the objects a transaction deleted are freed (an RCU grace
//!    period; `nft_compat_wait_for_destructors`). The agent puts flannel's chains back by
//!    renaming their spares (`netwarden::nftables::spare`), which creates no such expression:
//!    the runs start once all 64 spares are made.
//! 2. A protected 10,000-member set: one member removed → time until it is back (polled every
//!    `pollInterval` = 1 s); and the CPU the agent spends polling the quiet set for 20 s, from
//!    /proc/PID/stat (own and reaped children's time: the ipset processes it runs).
//!
//! Everything happens in throw-away namespaces; this process enters them itself, so the tools it
//! runs and its notification socket live there too. Run as root: `cargo bench --bench chains`.

#[path = "../tests/common/deployed.rs"]
mod deployed;

use deployed::Privileges;
use netwarden::nftables::events::{Event, Events};
use netwarden::testing::commit_clock;
use netwarden::testing::sandbox::Sandbox;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
const RUNS: usize = 200;
const NATIVE_RUNS: usize = 60;
const WARMUP: usize = 10;

fn config(dir: &std::path::Path, spec: &str) -> std::path::PathBuf {
    let p = dir.join("bench.yaml");
    std::fs::write(
        &p,
        format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}"),
    )
    .unwrap();
    p
}

/// Starts the agent (release build when benchmarking) as the DaemonSet runs it (its user and
/// capabilities, started inside the namespace) and waits for its initial sync. With
/// `CHAINS_BENCH_LOG=FILE` in the environment it logs at debug level, appended to FILE (where each
/// repair's time goes: `restoring` since_cause_us, `restore ran` tool_us, `table read` took_us).
fn agent(ns: &str, cfg: &std::path::Path) -> Child {
    let keep = std::env::var_os("CHAINS_BENCH_LOG");
    let level = if keep.is_some() { "debug" } else { "info" };
    let mut child = Privileges::of_daemonset()
        .command_in(std::path::Path::new(BIN), ns)
        .args(["run", "--config"])
        .arg(cfg)
        .args(["--log-level", level])
        .stderr(Stdio::piped())
        .spawn()
        .expect("start agent");
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let mut log = keep.map(|path| {
        let mut file = std::fs::OpenOptions::new();
        file.create(true)
            .append(true)
            .open(path)
            .expect("CHAINS_BENCH_LOG")
    });
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.contains("initial sync done") {
            break;
        }
    }
    // Keep draining so the agent never blocks on a full pipe.
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            if let Some(log) = log.as_mut() {
                let _ = writeln!(log, "{line}");
            }
        }
    });
    child
}

fn pipe(program: &str, args: &[&str], input: &str) -> (Duration, Option<u32>) {
    let started = Instant::now();
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .spawn()
        .expect(program);
    let pid = child.id();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let status = child.wait().unwrap();
    assert!(status.success(), "{program} failed");
    (started.elapsed(), Some(pid))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
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

/// Protected chains, each deleted in turn: an object deleted again within 2 s of its last
/// repair counts towards a fight (the agent then backs off, as it should), so each chain is
/// deleted once every 64 runs, well over 2 s apart.
const CHAINS: usize = 64;

fn chain_name(i: usize) -> String {
    format!("FLANNEL-POSTRTG-{i:02}")
}

/// flannel's nat chain and its jump, `CHAINS` times.
fn chain_spec() -> String {
    spec_of(
        &[
            r#"-s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#,
            r#"-s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#,
        ],
        JUMP_MATCH,
    )
}

/// The same chains with native expressions only.
fn native_spec() -> String {
    spec_of(
        &[
            "-s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
            "-s 10.244.0.0/16 ! -d 224.0.0.0/4 -j ACCEPT",
        ],
        "",
    )
}

/// What flannel's jump matches on besides its target.
const JUMP_MATCH: &str = r#"-m comment --comment "flanneld masq" "#;

fn spec_of(rules: &[&str], jump_match: &str) -> String {
    let mut spec = String::from("  chains:\n");
    for i in 0..CHAINS {
        let c = chain_name(i);
        spec.push_str(&format!(
            "    - name: flannel-postrtg-{i:02}\n      table: nat\n      chain: {c}\n      rules:\n"
        ));
        for r in rules {
            spec.push_str(&format!("        - {r}\n"));
        }
        spec.push_str(&format!(
            "      jumps:\n        - chain: POSTROUTING\n          rule: {jump_match}-j {c}\n          position: first\n"
        ));
    }
    spec
}

/// flannel's cleanup of one chain, in one transaction (`jump_match`: what its jump matches on).
fn delete_with(i: usize, jump_match: &str) -> String {
    let c = chain_name(i);
    format!("*nat\n-D POSTROUTING {jump_match}-j {c}\n-F {c}\n-X {c}\nCOMMIT\n")
}

fn delete(i: usize) -> String {
    delete_with(i, JUMP_MATCH)
}

/// The agent's repair of deleted chain `c` (as its debug log shows it): the chain declared with
/// its rules and its jump inserted at the head of POSTROUTING (which makes iptables-nft read that
/// chain's rules first).
fn recreate(c: &str) -> String {
    format!(
        "*nat\n:{c} - [0:0]\n\
         -A {c} -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment \"flanneld masq\" -j RETURN\n\
         -A {c} -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment \"flanneld masq\" -j MASQUERADE --random-fully\n\
         -I POSTROUTING 1 -m comment --comment \"flanneld masq\" -j {c}\nCOMMIT\n"
    )
}

/// Spawns `iptables-nft-restore --noflush -w` with `input`, not waited for.
fn spawn_restore(input: &str) -> Child {
    let mut child = Command::new("iptables-nft-restore")
        .args(["--noflush", "-w"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("iptables-nft-restore");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child
}

/// The reactive floor of one run: chain `i` deleted as in the agent's runs and, the instant the
/// deletion's NEWGEN arrives, the agent's repair spawned from here: commit to commit. `None`
/// when either NEWGEN is not seen within 5 s.
async fn measure_reactive(events: &mut Events, i: usize) -> Option<f64> {
    let repair = recreate(&chain_name(i));
    commit_clock::commit_to_commit(
        events,
        spawn_restore(&delete(i)),
        Some(|| Ok(spawn_restore(&repair))),
    )
    .await
    .expect("iptables-nft-restore")
}

/// The kernel's part of the gap between the floor and the reactive floor, for one run: chain
/// `i` deleted and, the instant the deletion's NEWGEN arrives, a netfilter netlink socket
/// opened, bound and closed here, the close timed. On current kernels, releasing such a socket
/// waits (holding the nf_tables commit mutex) for the pending release of what the last
/// transaction deleted (nf_tables' destroy work), which waits for an RCU grace period; a
/// transaction with an xtables match or target (`-m comment`, `-j MASQUERADE`) waits for the
/// same before it commits. Every iptables-nft run closes such sockets (its extension revision
/// probes) before committing. The chain is put back afterwards, untimed.
async fn measure_release_wait(events: &mut Events, i: usize) -> Option<f64> {
    use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};
    let mut del = spawn_restore(&delete(i));
    let deleter = Some(del.id());
    let mut out = None;
    let deadline = Instant::now() + Duration::from_secs(5);
    while out.is_none() && Instant::now() < deadline {
        let Ok(Ok(batch)) = tokio::time::timeout(Duration::from_secs(5), events.next()).await
        else {
            break;
        };
        if batch
            .iter()
            .any(|ev| matches!(ev, Event::NewGen { pid, .. } if *pid == deleter))
        {
            let mut socket = Socket::new(NETLINK_NETFILTER).unwrap();
            socket.bind_auto().unwrap();
            let t = Instant::now();
            drop(socket);
            out = Some(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    assert!(del.wait().unwrap().success());
    pipe(
        "iptables-nft-restore",
        &["--noflush", "-w"],
        &recreate(&chain_name(i)),
    );
    commit_clock::drain(events).await;
    out
}

/// What [`chain_bench`] measured, in ms.
struct ChainFigures {
    repaired: Vec<f64>,
    restore_alone: Vec<f64>,
    save_and_restore: Vec<f64>,
    reactive: Vec<f64>,
    release_wait: Vec<f64>,
}

/// The agent started in the namespace this thread is in, protecting `spec`; `runs` deletions
/// (`delete` of the run's chain), each timed to the agent's repair. Stops the agent.
/// Waits (30 s at most) until the nat table of the namespace this thread is in holds
/// `n` of the agent's spares: the chains it renames into a deleted chain.
fn wait_for_spares(n: usize) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let out = Command::new("nft")
            .args(["list", "chains", "ip"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let made = text.matches("chain NETWARDEN-SPARE-").count();
        if made == n {
            return;
        }
        assert!(Instant::now() < deadline, "{made} spares of {n} made");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn repaired_runs(
    rt: &tokio::runtime::Runtime,
    ns: &str,
    (spec, spares): (&str, usize),
    runs: usize,
    delete: impl Fn(usize) -> String,
) -> Vec<f64> {
    let dir = tempfile::tempdir().unwrap();
    let mut child = agent(ns, &config(dir.path(), spec));
    wait_for_spares(spares);
    let mut repaired = Vec::new();
    rt.block_on(async {
        let mut events = Events::subscribe().unwrap();
        for run in 0..runs + WARMUP {
            let deletion = spawn_restore(&delete(run % CHAINS));
            let took = commit_clock::commit_to_commit(&mut events, deletion, None::<fn() -> _>)
                .await
                .expect("iptables-nft-restore")
                .unwrap_or_else(|| panic!("run {run}: no repair seen within 5 s"));
            if run >= WARMUP {
                repaired.push(took);
            }
            // Let the agent finish verifying before the next deletion (and keep each chain's
            // deletions more than 2 s apart: 64 chains × 40 ms).
            tokio::time::sleep(Duration::from_millis(40)).await;
            commit_clock::drain(&mut events).await;
        }
    });
    let _ = child.kill();
    let _ = child.wait();
    repaired
}

/// Native-expression chains deleted and repaired, in a namespace of their own.
fn native_bench(rt: &tokio::runtime::Runtime) -> Vec<f64> {
    let ns = Sandbox::create("nw-bench-native").unwrap();
    netwarden::netns::enter(&ns.name).unwrap();
    repaired_runs(rt, &ns.name, (&native_spec(), 0), NATIVE_RUNS, |i| {
        delete_with(i, "")
    })
}

fn chain_bench(rt: &tokio::runtime::Runtime) -> ChainFigures {
    let ns = Sandbox::create("nw-bench-chains").unwrap();
    netwarden::netns::enter(&ns.name).unwrap();
    let mut f = ChainFigures {
        repaired: repaired_runs(rt, &ns.name, (&chain_spec(), CHAINS), RUNS, delete),
        restore_alone: Vec::new(),
        save_and_restore: Vec::new(),
        reactive: Vec::new(),
        release_wait: Vec::new(),
    };
    // The floors, with the agent gone: it neither reacts to them nor competes for the CPU. The
    // table holds what it held during the agent's runs.
    let scratch = "BENCH-SCRATCH";
    let drop_scratch = format!(
        "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j {scratch}\n-F {scratch}\n-X {scratch}\nCOMMIT\n"
    );
    for _ in 0..50 {
        let (took, _) = pipe(
            "iptables-nft-restore",
            &["--noflush", "-w"],
            &recreate(scratch),
        );
        f.restore_alone.push(took.as_secs_f64() * 1e3);
        pipe("iptables-nft-restore", &["--noflush", "-w"], &drop_scratch);
        let t = Instant::now();
        let saved = Command::new("iptables-nft-save")
            .args(["-t", "nat"])
            .output()
            .unwrap();
        assert!(saved.status.success());
        pipe(
            "iptables-nft-restore",
            &["--noflush", "-w"],
            &recreate(scratch),
        );
        f.save_and_restore.push(t.elapsed().as_secs_f64() * 1e3);
        pipe("iptables-nft-restore", &["--noflush", "-w"], &drop_scratch);
    }
    rt.block_on(async {
        let mut events = Events::subscribe().unwrap();
        for run in 0..RUNS + WARMUP {
            match measure_reactive(&mut events, run % CHAINS).await {
                Some(ms) if run >= WARMUP => f.reactive.push(ms),
                Some(_) => {}
                None => eprintln!("reactive run {run}: not timed (no NEWGEN within 5 s)"),
            }
            // The same pause between runs as the agent's.
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        for run in 0..50 + WARMUP {
            match measure_release_wait(&mut events, run % CHAINS).await {
                Some(ms) if run >= WARMUP => f.release_wait.push(ms),
                Some(_) => {}
                None => eprintln!("release run {run}: not timed (no NEWGEN within 5 s)"),
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
    });
    f
}

fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0))
        .collect();
    // Fields 14-17 (utime, stime, cutime, cstime), counted from 3 after the command name.
    (f[11] + f[12], f[13] + f[14])
}

fn set_bench() -> (Vec<f64>, f64, f64) {
    let ns = Sandbox::create("nw-bench-sets").unwrap();
    netwarden::netns::enter(&ns.name).unwrap();
    let mut members = String::new();
    let mut restore = String::from("create big hash:ip family inet maxelem 131072\n");
    for i in 0..10_000u32 {
        let ip = format!("10.{}.{}.{}", 100 + i / 65536, (i / 256) % 256, i % 256);
        members.push_str(&format!("        - {ip}\n"));
        restore.push_str(&format!("add big {ip}\n"));
    }
    pipe("ipset", &["restore"], &restore);
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("  pollInterval: 1s\n  ipsets:\n    - name: big\n      type: hash:ip\n      membership: exact\n      members:\n{members}");
    let mut child = agent(&ns.name, &config(dir.path(), &spec));
    let mut restored = Vec::new();
    for i in 0..20u32 {
        let ip = format!("10.100.{}.{}", (i * 37 / 256) % 256, (i * 37) % 256);
        let t0 = Instant::now();
        let ok = Command::new("ipset")
            .args(["del", "big", &ip])
            .status()
            .unwrap();
        assert!(ok.success());
        loop {
            let back = Command::new("ipset")
                .args(["test", "big", &ip])
                .stderr(Stdio::null())
                .stdout(Stdio::null())
                .status()
                .unwrap();
            if back.success() {
                break;
            }
            assert!(t0.elapsed() < Duration::from_secs(5), "member not restored");
            std::thread::sleep(Duration::from_millis(5));
        }
        restored.push(t0.elapsed().as_secs_f64() * 1e3);
        // De-phase the next removal against the poll timer.
        std::thread::sleep(Duration::from_millis(137));
    }
    std::thread::sleep(Duration::from_secs(2));
    // /proc/PID/stat counts in USER_HZ, which Linux fixes at 100 for user space.
    let hz = 100.0;
    let (own0, kids0) = cpu_ticks(child.id());
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs(20));
    let (own1, kids1) = cpu_ticks(child.id());
    let secs = t0.elapsed().as_secs_f64();
    let own = (own1 - own0) as f64 / hz / secs * 100.0;
    let kids = (kids1 - kids0) as f64 / hz / secs * 100.0;
    let _ = child.kill();
    let _ = child.wait();
    (restored, own, kids)
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = Sandbox::create("nw-bench-probe") {
        eprintln!("chains bench: cannot create a network namespace ({e}); needs root, skipped");
        return;
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // Each part runs in its own thread: each enters its own namespace.
    let (chains, native) = std::thread::spawn(move || {
        let chains = chain_bench(&rt);
        (
            chains,
            std::thread::scope(|s| s.spawn(|| native_bench(&rt)).join().unwrap()),
        )
    })
    .join()
    .unwrap();
    let (restored, own, kids) = std::thread::spawn(set_bench).join().unwrap();
    // A repair committed before the deleter's socket is closed takes well under 1 ms; one that
    // comes after waits for the grace period that close waits for.
    let within = |v: &[f64]| v.iter().filter(|ms| **ms < 1.0).count();
    let won = (within(&chains.repaired), chains.repaired.len());
    let won_native = (within(&native), native.len());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "kernel {} cores {}",
        kernel.trim(),
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(0)
    );
    println!(
        "| measurement | runs | p50 ms | p99 ms | min ms | max ms |\n|---|---|---|---|---|---|"
    );
    println!(
        "{}",
        summary(
            "nat chain + jump deleted (one nft transaction) → restored, commit to commit (64 chains protected)",
            chains.repaired
        )
    );
    println!(
        "{}",
        summary(
            "the same with native expressions only (no `-m comment`, no MASQUERADE), commit to commit (64 chains protected)",
            native
        )
    );
    println!(
        "{}",
        summary(
            "the same repair spawned by a script at the deletion's NEWGEN, agent gone, commit to commit (reactive floor)",
            chains.reactive
        )
    );
    println!(
        "{}",
        summary(
            "a netfilter netlink socket closed at the deletion's NEWGEN: how long close() waits for the kernel to release the deleted objects (an RCU grace period)",
            chains.release_wait
        )
    );
    println!(
        "{}",
        summary(
            "one iptables-nft-restore of the same repair (2-rule chain, jump inserted first) into a quiet table, spawn to exit (floor)",
            chains.restore_alone
        )
    );
    println!(
        "{}",
        summary(
            "iptables-nft-save -t nat, then that restore, spawn to exit (a shell's read-then-write)",
            chains.save_and_restore
        )
    );
    println!(
        "{}",
        summary(
            "10,000-member set, one member removed → back (pollInterval 1 s)",
            restored
        )
    );
    println!(
        "\nrestored within 1 ms of the deletion's commit: {} of {} (flannel's chains), {} of {} (native)",
        won.0, won.1, won_native.0, won_native.1
    );
    println!("polling a quiet 10,000-member set every 1 s for 20 s: agent {own:.2} % of one core, its ipset children {kids:.2} %, total {:.2} %", own + kids);
}
