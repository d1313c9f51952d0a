//! Adopted-state benchmark (harness = false; reports, asserts nothing): what following a busy
//! owner costs the agent, with and without `run --adopted-state`.
//!
//! A kube-proxy-shaped table (SERVICES service chains with an endpoint chain each, a verdict map
//! with an element per service, a set of CLUSTER_IPS elements) is adopted (`spec.adopt[].nftables`,
//! owner kube-proxy). Then CHANGES owner changes as kube-proxy makes them at a Service change (a
//! service chain and an endpoint chain added, their map element and cluster IP added), each
//! committed by an `nft` run under kube-proxy's name and followed by the agent before the next
//! one comes. Reported: the agent's CPU time (utime + stime of /proc/PID/task/TID/stat) per
//! change, for its main thread (the engines' loop) and for the adopted-state writer thread
//! apart; the `nft list` children it runs are not counted (they cost the same either way). Also
//! how many times the file was written (the writer's debug log).
//!
//! Everything happens in throw-away namespaces. Run as root:
//! `cargo bench --bench adopted_state`.

#[path = "../tests/common/deployed.rs"]
mod deployed;

use deployed::Privileges;
use netwarden::testing::sandbox::Sandbox;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
const SERVICES: usize = 500;
const CLUSTER_IPS: usize = 5000;
const CHANGES: usize = 100;

/// The table as kube-proxy writes it, `services` services big.
fn table(services: usize) -> String {
    let mut t = String::from(
        "table ip kube-proxy {\n\tcomment \"rules for kube-proxy\"\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tchain mark-for-masquerade {\n\t\tmeta mark set meta mark | 0x4000\n\t}\n\
         \tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\t}\n",
    );
    let ips: Vec<String> = (0..CLUSTER_IPS).map(cluster_ip).collect();
    t += &format!(
        "\tset cluster-ips {{\n\t\ttype ipv4_addr\n\t\telements = {{ {} }}\n\t}}\n",
        ips.join(", ")
    );
    t += "\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t}\n";
    for i in 0..services {
        t += &service(i);
    }
    t += "}\n";
    for i in 0..services {
        t += &map_element(i);
    }
    t
}

fn cluster_ip(i: usize) -> String {
    format!("10.96.{}.{}", i / 256, i % 256)
}

/// Service `i`'s two chains, inside the table block.
fn service(i: usize) -> String {
    let ip = cluster_ip(i);
    let ep = format!("10.244.{}.{}", i / 256, i % 256);
    format!(
        "\tchain service-{i:05}-ns/svc/tcp/http {{\n\t\tip daddr {ip} tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade\n\t\tnumgen random mod 1 vmap {{ 0 : goto endpoint-{i:05}-ns/svc/tcp/http }}\n\t}}\n\
         \tchain endpoint-{i:05}-ns/svc/tcp/http {{\n\t\tip saddr {ep} jump mark-for-masquerade\n\t\tmeta l4proto tcp dnat to {ep}:8080\n\t}}\n"
    )
}

fn map_element(i: usize) -> String {
    format!(
        "add element ip kube-proxy service-ips {{ {} . tcp . 80 : goto service-{i:05}-ns/svc/tcp/http }}\n",
        cluster_ip(i)
    )
}

/// What kube-proxy commits when service `i` appears.
fn change(i: usize) -> String {
    format!(
        "table ip kube-proxy {{\n{}}}\n{}add element ip kube-proxy cluster-ips {{ {} }}\n",
        service(i),
        map_element(i),
        cluster_ip(i)
    )
}

fn nft_f(ns: &str, nft: &str, script: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, nft, "-f", "-"])
        .stdin(Stdio::piped())
        .spawn()
        .expect("nft");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    assert!(child.wait().unwrap().success(), "nft -f failed");
}

struct Agent {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Agent {
    /// The agent as the DaemonSet runs it (its user and capabilities, started inside the
    /// namespace; setpriv execs it, so the child's pid is the agent's).
    fn start(ns: &str, cfg: &std::path::Path, state: Option<&std::path::Path>) -> Agent {
        let mut cmd = Privileges::of_daemonset().command_in(std::path::Path::new(BIN), ns);
        cmd.args(["run", "--config"]).arg(cfg).args([
            "--log-level",
            "debug",
            "--metrics-addr",
            "off",
        ]);
        if let Some(s) = state {
            cmd.arg("--adopted-state").arg(s);
        }
        let mut child = cmd.stderr(Stdio::piped()).spawn().expect("start agent");
        let log = netwarden::testing::lines::collect(child.stderr.take().unwrap());
        let agent = Agent { child, log };
        agent.wait_count("initial sync done", 1);
        agent
    }

    fn count(&self, needle: &str) -> usize {
        let log = self.log.lock().unwrap();
        log.iter().filter(|l| l.contains(needle)).count()
    }

    fn wait_count(&self, needle: &str, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.count(needle) < n {
            assert!(Instant::now() < deadline, "no {n} × `{needle}` in 60 s");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// CPU seconds of the agent's threads: (the writer thread, all the others).
    fn cpu(&self) -> (f64, f64) {
        let tick = 100.0; // USER_HZ on Linux
        let (mut writer, mut rest) = (0.0, 0.0);
        let tasks = format!("/proc/{}/task", self.child.id());
        for task in std::fs::read_dir(tasks).unwrap().flatten() {
            let Ok(stat) = std::fs::read_to_string(task.path().join("stat")) else {
                continue;
            };
            // The fields after the parenthesised name: state is the 3rd, utime the 14th.
            let (name, after) = stat.rsplit_once(')').unwrap();
            let fields: Vec<&str> = after.split_whitespace().collect();
            let t: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
            if name.contains("nw-adopted") {
                writer += t / tick;
            } else {
                rest += t / tick;
            }
        }
        (writer, rest)
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Run {
    costs: Option<[(String, f64); 4]>,
    loop_ms: f64,
    writer_ms: f64,
    writes: usize,
    file_bytes: u64,
    wall_s: f64,
}

fn run(with_state: bool) -> Run {
    let ns = Sandbox::create("nw-bench-adst").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let owner = dir.path().join("kube-proxy");
    std::fs::copy("/usr/sbin/nft", &owner).unwrap();
    let owner = owner.to_str().unwrap();
    nft_f(&ns.name, "nft", &table(SERVICES));
    let cfg = dir.path().join("netwarden.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let state = dir.path().join("adopted.json");
    let agent = Agent::start(&ns.name, &cfg, with_state.then_some(state.as_path()));
    agent.wait_count("table=ip kube-proxy", 1);
    // Whatever the start wrote is done before the clock starts.
    std::thread::sleep(Duration::from_secs(2));
    let written = "adopted state written";
    let writes_before = agent.count(written);
    let (w0, r0) = agent.cpu();
    let started = Instant::now();
    for i in 0..CHANGES {
        nft_f(&ns.name, owner, &change(SERVICES + i));
        agent.wait_count("adopted table changed: copy updated", i + 1);
    }
    let wall_s = started.elapsed().as_secs_f64();
    // The writer's last write (the new writer may hold it up to its interval).
    std::thread::sleep(Duration::from_secs(3));
    let (w1, r1) = agent.cpu();
    let writes = agent.count(written) - writes_before;
    let file_bytes = std::fs::metadata(&state).map(|m| m.len()).unwrap_or(0);
    if with_state {
        let saved = netwarden::adopted_state::read(&state).expect("file reads");
        let chains = saved.nftables.first().map_or(0, |t| t.chains.len());
        assert_eq!(
            chains,
            4 + 2 * (SERVICES + CHANGES),
            "the file holds the last change"
        );
    }
    Run {
        costs: with_state.then(|| hand_over_and_write(&ns.name)),
        loop_ms: (r1 - r0) * 1e3 / CHANGES as f64,
        writer_ms: (w1 - w0) * 1e3 / CHANGES as f64,
        writes,
        file_bytes,
        wall_s,
    }
}

/// In-process, on the table as adopted after the run: what one hand-over costs the engine's loop
/// (before: every adopted table made into its saved form; now: an `Arc` clone per table) and
/// what one write costs the writer thread (JSON, then the atomic write with its fsyncs). Mean
/// of `REPEAT`, in ms.
fn hand_over_and_write(ns: &str) -> [(String, f64); 4] {
    const REPEAT: u32 = 20;
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "nft",
            "-a",
            "-s",
            "list",
            "table",
            "ip",
            "kube-proxy",
        ])
        .output()
        .expect("nft list");
    let key = netwarden::nftables::model::TableKey {
        family: netwarden::nftables::model::NfFamily::Ip,
        name: "kube-proxy".into(),
    };
    let listing = String::from_utf8(out.stdout).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("netwarden.yaml");
    std::fs::write(&cfg, CONFIG).unwrap();
    let cfg = netwarden::config::load(&cfg).unwrap();
    let sel = &cfg.nftables.adopt[0];
    let observed = netwarden::nftables::listing::parse(&listing, &key).unwrap();
    let copy = std::sync::Arc::new(netwarden::nftables::adopt::copy(sel, &observed));
    let time = |f: &mut dyn FnMut()| {
        let started = Instant::now();
        for _ in 0..REPEAT {
            f();
        }
        started.elapsed().as_secs_f64() * 1e3 / f64::from(REPEAT)
    };
    let saved = || netwarden::nftables::adopt::SavedTable::new("kube-proxy", &copy);
    let state = netwarden::adopted_state::AdoptedState {
        version: netwarden::adopted_state::VERSION,
        nftables: vec![saved()],
        ..Default::default()
    };
    let json = serde_json::to_vec_pretty(&state).unwrap();
    let path = dir.path().join("adopted.json");
    [
        (
            "the table in its saved form (before: at each change, on the loop; now: at each write, on the writer thread)".into(),
            time(&mut || drop(std::hint::black_box(saved()))),
        ),
        (
            "now, at each change on the loop: an Arc clone of the table".into(),
            time(&mut || drop(std::hint::black_box(std::sync::Arc::clone(&copy)))),
        ),
        (
            format!("JSON of the file, {} KiB (each write, writer thread)", json.len() / 1024),
            time(&mut || drop(std::hint::black_box(serde_json::to_vec_pretty(&state)))),
        ),
        (
            "atomic write with fsyncs, wall (each write, writer thread)".into(),
            time(&mut || netwarden::files::write_atomic(&path, &json).unwrap()),
        ),
    ]
}

const CONFIG: &str = "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  adopt:\n    - name: kube-proxy\n      nftables:\n        family: ip\n        names: [kube-proxy]\n      owners: [kube-proxy]\n";

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if let Err(e) = Sandbox::create("nw-bench-probe") {
        eprintln!(
            "adopted_state bench: cannot create a network namespace ({e}); needs root, skipped"
        );
        return;
    }
    // Alternated, twice each: the machine's load drifts over a run.
    let runs: Vec<(bool, Run)> = [false, true, false, true]
        .into_iter()
        .map(|with| (with, run(with)))
        .collect();
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "table: {SERVICES} services ({} chains, {} rules), {CLUSTER_IPS} cluster IPs; {CHANGES} owner changes, each followed before the next; loadavg {}",
        4 + 2 * SERVICES,
        4 + 4 * SERVICES,
        load.trim()
    );
    println!("| agent | loop CPU ms/change | writer CPU ms/change | file writes | file size | wall s |\n|---|---|---|---|---|---|");
    let costs = runs.last().and_then(|(_, r)| r.costs.clone());
    for (with, r) in runs {
        let name = if with {
            "with --adopted-state"
        } else {
            "without --adopted-state"
        };
        println!(
            "| {name} | {:.2} | {:.2} | {} | {} KiB | {:.1} |",
            r.loop_ms,
            r.writer_ms,
            r.writes,
            r.file_bytes / 1024,
            r.wall_s
        );
    }
    println!("\n| one hand-over or write of the table above | mean ms |\n|---|---|");
    for (what, ms) in costs.into_iter().flatten() {
        println!("| {what} | {ms:.3} |");
    }
}
