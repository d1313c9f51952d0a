//! `cargo bench --bench repair`: how fast the real agent puts deleted state back, timed from
//! outside the agent by an independent rtnetlink listener (`netwarden::testing::listen::Listener`).
//!
//! Everything happens inside a throw-away network namespace (`netwarden::testing::sandbox::Sandbox`,
//! removed on drop, also on panic); the host's own namespace is never touched. The agent runs as
//! a separate process as the DaemonSet runs it (`netwarden run --config F` started inside the
//! namespace with the DaemonSet's user and capabilities: tests/common/deployed.rs) and is killed
//! by pid on drop.
//!
//! 1. One protected rule deleted (RTM_DELRULE from our own netlink socket) → the RTM_NEWRULE of
//!    the same rule seen by the listener. The same for a shell watchdog built on `ip monitor rule`.
//! 2. Every protected rule and route flushed in one `ip -batch` → all of them seen back; beside it,
//!    how long `ip -batch` itself takes to add the same objects to a fresh namespace.
//! 3. The idle agent holding that state: resident memory and CPU.
//!
//! Targets are printed next to the figures, not asserted. Environment: NETWARDEN_BENCH_DELETIONS
//! (default 2000), NETWARDEN_BENCH_WATCHDOG_DELETIONS (300), NETWARDEN_BENCH_ROUNDS (5),
//! NETWARDEN_BENCH_IDLE_SECS (10), NETWARDEN_BENCH_GAP_MS (pause between single deletions, 2),
//! NETWARDEN_BENCH_LOG_LEVEL (the agent's --log-level, info; readiness is its `initial sync done`
//! line, so keep netwarden::reconcile at info, e.g. `warn,netwarden::reconcile=info`),
//! NETWARDEN_BENCH_AGENT_LOG (a file to copy the agent's log into). Results: docs/benchmarks.md.

#[path = "../tests/common/deployed.rs"]
mod deployed;

use anyhow::{anyhow, bail, ensure, Context, Result};
use deployed::Privileges;
use netwarden::apply::encode;
use netwarden::config;
use netwarden::desired::DesiredState;
use netwarden::model::{RouteKey, RuleKey};
use netwarden::observe::decode;
use netwarden::testing::listen::{Listener, Seen};
use netwarden::testing::sandbox::Sandbox;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use rtnetlink::packet_core::{Emitable, NetlinkBuffer, NetlinkMessage, NetlinkPayload, Parseable};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
// The listener's bookkeeping uses the agent's fast hasher too: it competes with the agent for
// the same two cores, so a lighter observer disturbs the race it times less.
use netwarden::model::fast::{HashMap, HashSet};
use std::collections::VecDeque;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::os::fd::AsFd;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
const RULES: usize = 1_000;
const ROUTES: usize = 10_000;
const TABLE: u32 = 100;
/// Single deletions repaired before measuring (connection set-up, page faults, caches).
const WARMUP: usize = 20;
/// Longest wait for one re-add, for the agent's readiness, for a mass repair.
const ONE_REPAIR: Duration = Duration::from_secs(5);
const AGENT_READY: Duration = Duration::from_secs(60);
const MASS_REPAIR: Duration = Duration::from_secs(60);

/// The watchdog an admin would write: re-add every rule `ip monitor rule` reports deleted.
/// iproute2 6.1 prints `Deleted 1000:\tfrom 10.16.0.0/24 lookup 100`; `read` trims the line,
/// the tab after the colon splits like any blank when `$spec` is expanded unquoted.
const WATCHDOG: &str = r#"ip monitor rule | while read -r line; do
  case $line in
    "Deleted "*)
      rest=${line#Deleted }
      prio=${rest%%:*}
      spec=${rest#*:}
      ip rule add priority "$prio" $spec
      ;;
  esac
done"#;

struct Settings {
    deletions: usize,
    watchdog_deletions: usize,
    rounds: usize,
    idle: Duration,
    gap: Duration,
    log_level: String,
}

fn env_num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .trim()
            .parse()
            .with_context(|| format!("{name}={v:?} is not a number")),
        Err(_) => Ok(default),
    }
}

impl Settings {
    fn from_env() -> Result<Settings> {
        Ok(Settings {
            deletions: env_num("NETWARDEN_BENCH_DELETIONS", 2000)?.max(1) as usize,
            watchdog_deletions: env_num("NETWARDEN_BENCH_WATCHDOG_DELETIONS", 300)?.max(1) as usize,
            rounds: env_num("NETWARDEN_BENCH_ROUNDS", 5)?.max(1) as usize,
            idle: Duration::from_secs(env_num("NETWARDEN_BENCH_IDLE_SECS", 10)?.max(1)),
            gap: Duration::from_millis(env_num("NETWARDEN_BENCH_GAP_MS", 2)?),
            log_level: std::env::var("NETWARDEN_BENCH_LOG_LEVEL").unwrap_or_else(|_| "info".into()),
        })
    }
}

// ---------------------------------------------------------------------------------------------
// The protected state

fn rule_from(i: usize) -> String {
    format!("10.{}.{}.0/24", 16 + i / 256, i % 256)
}

fn route_destination(j: usize) -> String {
    format!("10.{}.{}.{}/32", 64 + j / 65_536, (j / 256) % 256, j % 256)
}

/// 1,000 rules `priority 1000+i from 10.A.B.0/24 lookup 100` and 10,000 routes
/// `10.64.x.y/32 dev veth0` in table 100. Device routes rather than `via 10.200.0.2`: after
/// `ip rule flush` the main rule is gone, and the kernel then refuses any route whose gateway it
/// can only resolve through the main table (ENETUNREACH), for the agent and `ip` alike.
fn config_yaml() -> String {
    let mut y = String::with_capacity(2 << 20);
    y.push_str(
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nmetadata:\n  name: bench\n",
    );
    y.push_str("spec:\n  mode: enforce\n  resync: 600s\n  rules:\n");
    for i in 0..RULES {
        let _ = writeln!(
            y,
            "    - name: rule-{i:04}\n      priority: {}\n      from: {}\n      table: {TABLE}",
            1000 + i,
            rule_from(i)
        );
    }
    y.push_str("  routes:\n");
    for j in 0..ROUTES {
        let _ = writeln!(
            y,
            "    - name: route-{j:05}\n      table: {TABLE}\n      destination: {}\n      device: veth0",
            route_destination(j)
        );
    }
    y
}

/// The same objects as `ip -batch` lines.
fn batch_add_lines() -> String {
    let mut s = String::with_capacity(1 << 20);
    for i in 0..RULES {
        let _ = writeln!(
            s,
            "rule add priority {} from {} lookup {TABLE}",
            1000 + i,
            rule_from(i)
        );
    }
    for j in 0..ROUTES {
        let _ = writeln!(
            s,
            "route add {} dev veth0 table {TABLE}",
            route_destination(j)
        );
    }
    s
}

/// veth0 (10.200.0.1/24) <-> veth1 (10.200.0.2/24), both up.
fn setup_veth(sb: &Sandbox) -> Result<()> {
    sb.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])?;
    sb.ip(&["link", "set", "veth0", "up"])?;
    sb.ip(&["link", "set", "veth1", "up"])?;
    sb.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])?;
    sb.ip(&["address", "add", "10.200.0.2/24", "dev", "veth1"])?;
    Ok(())
}

/// How many of the protected rules and routes the namespace holds right now (via `ip`).
fn count_present(sb: &Sandbox) -> Result<(usize, usize)> {
    let rules = sb
        .ip(&["rule", "show"])?
        .lines()
        .filter(|l| {
            l.split(':')
                .next()
                .and_then(|p| p.trim().parse::<usize>().ok())
                .is_some_and(|p| (1000..1000 + RULES).contains(&p))
        })
        .count();
    let routes = sb
        .ip(&["route", "show", "table", &TABLE.to_string()])?
        .lines()
        .count();
    Ok((rules, routes))
}

struct TempFile(PathBuf);

impl TempFile {
    fn write(name: &str, text: &str) -> Result<TempFile> {
        let path = std::env::temp_dir().join(format!("{name}-{}.yaml", std::process::id()));
        std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
        Ok(TempFile(path))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The agent process

struct Agent {
    child: Child,
    ready: Receiver<()>,
    tail: Arc<Mutex<VecDeque<String>>>,
    lines: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Agent {
    fn spawn(config: &Path, netns: &str, log_level: &str) -> Result<Agent> {
        let mut child = Privileges::of_daemonset()
            .command_in(Path::new(BIN), netns)
            .args(["run", "--config"])
            .arg(config)
            .args(["--log-level", log_level])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("cannot start {BIN}"))?;
        let stderr = child.stderr.take().context("agent stderr")?;
        let (tx, ready) = channel();
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let lines = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (t, l, b) = (tail.clone(), lines.clone(), bytes.clone());
        // Drains the agent's stderr for its whole life, so that logging never blocks it.
        std::thread::spawn(move || {
            let mut told = false;
            // NETWARDEN_BENCH_AGENT_LOG=FILE keeps a copy of the agent's log, to see where time goes.
            let mut copy = std::env::var_os("NETWARDEN_BENCH_AGENT_LOG")
                .and_then(|p| std::fs::File::create(p).ok())
                .map(std::io::BufWriter::new);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                l.fetch_add(1, Ordering::Relaxed);
                if let Some(f) = copy.as_mut() {
                    use std::io::Write;
                    let _ = writeln!(f, "{line}");
                }
                b.fetch_add(line.len() as u64 + 1, Ordering::Relaxed);
                if !told && line.contains("initial sync done") {
                    told = true;
                    let _ = tx.send(());
                }
                let mut tail = t.lock().unwrap_or_else(|e| e.into_inner());
                if tail.len() == 40 {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        });
        Ok(Agent {
            child,
            ready,
            tail,
            lines,
            bytes,
        })
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn log_tail(&self) -> String {
        let tail = self.tail.lock().unwrap_or_else(|e| e.into_inner());
        tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }

    /// Waits (bounded) for `initial sync done` on stderr.
    fn wait_ready(&mut self, timeout: Duration) -> Result<()> {
        if self.ready.recv_timeout(timeout).is_ok() {
            return Ok(());
        }
        let status = self.child.try_wait();
        // Give the reader a moment to collect the last lines of a dying agent.
        std::thread::sleep(Duration::from_millis(100));
        bail!(
            "the agent did not log `initial sync done` within {timeout:?} (exit status: {status:?}); its stderr ends with:\n{}",
            self.log_tail()
        )
    }

    /// SIGTERM, then waits (bounded) for it to exit.
    fn stop(&mut self) -> Result<()> {
        kill(Pid::from_raw(self.pid() as i32), Signal::SIGTERM).context("SIGTERM to the agent")?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                ensure!(
                    status.success(),
                    "the agent exited with {status} on SIGTERM"
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        bail!("the agent did not exit within 10 s of SIGTERM")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill(); // SIGKILL to this pid only
            let _ = self.child.wait();
        }
    }
}

/// The watchdog shell pipeline, in its own process group (killed as a group on drop).
struct Watchdog {
    child: Option<Child>,
}

impl Watchdog {
    fn spawn(netns: &str) -> Result<Watchdog> {
        let child = Command::new("ip")
            .args(["netns", "exec", netns, "bash", "-c", WATCHDOG])
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the watchdog (ip netns exec … bash)")?;
        Ok(Watchdog { child: Some(child) })
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // The group id is the pid of the process we spawned with process_group(0); it is not
            // reaped yet, so neither the pid nor the group can have been reused.
            let _ = killpg(Pid::from_raw(child.id() as i32), Signal::SIGKILL);
            let _ = child.wait();
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop();
    }
}

struct ProcSample {
    /// utime + stime of the process (all threads), in clock ticks.
    ticks: u64,
    utime: u64,
    stime: u64,
    /// cutime + cstime: children waited for.
    child_ticks: u64,
    rss_kib: u64,
    hwm_kib: u64,
    threads: u64,
}

fn proc_sample(pid: u32) -> Result<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    // Fields after the command name, which is in parentheses and may hold blanks.
    let rest = &stat[stat.rfind(')').context("malformed /proc/PID/stat")? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = fields.get(11).context("no utime")?.parse()?;
    let stime: u64 = fields.get(12).context("no stime")?.parse()?;
    let cutime: u64 = fields.get(13).context("no cutime")?.parse()?;
    let cstime: u64 = fields.get(14).context("no cstime")?.parse()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Ok(ProcSample {
        ticks: utime + stime,
        utime,
        stime,
        child_ticks: cutime + cstime,
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        threads: kib("Threads:"),
    })
}

/// Time on CPU of all threads of a process, in ns (schedstat: finer than clock ticks).
fn cpu_ns(pid: u32) -> Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let path = task?.path().join("schedstat");
        // A thread may end between the listing and the read.
        if let Ok(text) = std::fs::read_to_string(&path) {
            total += text
                .split_whitespace()
                .next()
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(0);
        }
    }
    Ok(total)
}

/// USER_HZ, the unit of utime/stime (`getconf CLK_TCK`; 100 on every common Linux build).
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100)
}

// ---------------------------------------------------------------------------------------------
// Our own deleting socket

struct Deleter {
    sock: Socket,
    seq: u32,
    buf: Vec<u8>,
}

impl Deleter {
    /// A blocking NETLINK_ROUTE socket in the calling thread's namespace.
    fn new() -> Result<Deleter> {
        let mut sock = Socket::new(NETLINK_ROUTE).context("netlink socket")?;
        sock.bind_auto().context("netlink bind")?;
        sock.connect(&SocketAddr::new(0, 0))
            .context("netlink connect")?;
        let tv = nix::sys::time::TimeVal::new(5, 0);
        nix::sys::socket::setsockopt(
            &sock.as_fd(),
            nix::sys::socket::sockopt::ReceiveTimeout,
            &tv,
        )
        .context("SO_RCVTIMEO")?;
        Ok(Deleter {
            sock,
            seq: 0,
            buf: Vec::with_capacity(64 << 10),
        })
    }

    /// RTM_DELRULE for `key`, as bytes, built with netwarden's own encoder.
    fn encode_delete(&mut self, key: &RuleKey) -> Vec<u8> {
        self.seq = self.seq.wrapping_add(1);
        let mut msg = encode::request(M::DelRule(encode::rule(key, None)), false, false);
        msg.header.sequence_number = self.seq;
        let mut bytes = vec![0u8; msg.buffer_len()];
        msg.emit(&mut bytes);
        bytes
    }

    fn send(&self, bytes: &[u8]) -> Result<()> {
        let n = self.sock.send(bytes, 0).context("netlink send")?;
        ensure!(
            n == bytes.len(),
            "short netlink send: {n} of {}",
            bytes.len()
        );
        Ok(())
    }

    /// Reads the ack of the last request; an error code is an error.
    fn ack(&mut self) -> Result<()> {
        loop {
            self.buf.clear();
            self.sock
                .recv(&mut self.buf, 0)
                .context("no netlink ack for the deletion within 5 s")?;
            let mut at = 0;
            while at < self.buf.len() {
                let slice = &self.buf[at..];
                let nb = NetlinkBuffer::new_checked(&slice)
                    .map_err(|e| anyhow!("malformed netlink reply: {e}"))?;
                let len = nb.length() as usize;
                let msg = NetlinkMessage::<M>::parse(&nb)
                    .map_err(|e| anyhow!("unparsable netlink reply: {e}"))?;
                if msg.header.sequence_number == self.seq {
                    if let NetlinkPayload::Error(e) = msg.payload {
                        return match e.code {
                            None => Ok(()),
                            Some(code) => Err(anyhow!(
                                "the kernel refused the deletion: {}",
                                std::io::Error::from_raw_os_error(-code.get())
                            )),
                        };
                    }
                }
                if len == 0 {
                    break;
                }
                at += (len + 3) & !3;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Measurements

fn is_new_rule(seen: &Seen, key: &RuleKey) -> bool {
    match &seen.1 {
        Some(M::NewRule(m)) => decode::rule(m).is_some_and(|(k, _)| k == *key),
        _ => false,
    }
}

/// Deletes one protected rule at a time and times its re-add as the listener sees it.
fn single_deletions(
    who: &str,
    listener: &Listener,
    deleter: &mut Deleter,
    keys: &[RuleKey],
    count: usize,
    gap: Duration,
    overruns: &mut u64,
) -> Result<Vec<Duration>> {
    let mut samples = Vec::with_capacity(count);
    for i in 0..WARMUP + count {
        // 7919 is prime to the number of rules: every rule in turn, in a scattered order.
        let key = &keys[(i * 7919) % keys.len()];
        let bytes = deleter.encode_delete(key);
        std::thread::sleep(gap);
        listener.drain();
        let t0 = Instant::now();
        deleter.send(&bytes)?;
        deleter
            .ack()
            .with_context(|| format!("{who}: deleting rule {key} (#{i})"))?;
        let seen = listener.wait_for(t0 + ONE_REPAIR, |s| {
            if s.1.is_none() {
                *overruns += 1;
            }
            is_new_rule(s, key)
        });
        let Some((t1, _)) = seen else {
            bail!("{who}: rule {key} was not re-added within {ONE_REPAIR:?} of deletion #{i}");
        };
        if i >= WARMUP {
            samples.push(t1.duration_since(t0));
        }
    }
    Ok(samples)
}

struct Mass {
    /// From just before the batch started to the arrival of the last re-add.
    back: Duration,
    /// The flush batch process, start to exit.
    batch_took: Duration,
    /// From just before the batch started to the arrival of the last deletion.
    last_del: Duration,
    batch_ok: Result<(), String>,
    /// Distinct protected rules and routes the listener saw deleted (and so re-added).
    deleted: (usize, usize),
    /// Deletion notifications seen (an object deleted, re-added, deleted again counts twice).
    deletions: usize,
    overrun: bool,
    /// Objects whose last notification seen was a deletion although the kernel holds them: the
    /// deletion arrived after the re-add it caused.
    out_of_order: usize,
    /// Notifications the listener had not read yet when the dump confirmed that all was back.
    backlog_at_dump: usize,
    /// Completion was timed by polling `ip` after an overrun.
    polled: bool,
}

/// Per-object presence as the listener sees it, for the protected objects only.
struct Tracker<'a, K: std::hash::Hash + Eq> {
    protected: &'a HashSet<K>,
    deleted: HashSet<&'a K>,
    absent: HashSet<&'a K>,
    deletions: usize,
    /// What the listener saw of each object: arrival and whether it was a re-add.
    history: HashMap<&'a K, Vec<(Instant, bool)>>,
}

impl<'a, K: std::hash::Hash + Eq> Tracker<'a, K> {
    fn new(protected: &'a HashSet<K>) -> Self {
        Tracker {
            protected,
            deleted: HashSet::with_capacity_and_hasher(protected.len(), Default::default()),
            absent: HashSet::with_capacity_and_hasher(protected.len(), Default::default()),
            deletions: 0,
            history: HashMap::with_capacity_and_hasher(protected.len(), Default::default()),
        }
    }

    /// `Some(true)`: a protected object added (only the agent adds them), `Some(false)`: one
    /// deleted, `None`: anything else.
    fn note(&mut self, at: Instant, key: Option<K>, new: bool) -> Option<bool> {
        let k = key.and_then(|k| self.protected.get(&k))?;
        self.history.entry(k).or_default().push((at, new));
        if new {
            self.absent.remove(k);
        } else {
            self.deletions += 1;
            self.deleted.insert(k);
            self.absent.insert(k);
        }
        Some(new)
    }

    /// Every object seen deleted has been seen added at least once since. Its last deletion
    /// may still be the latest notification: across processes the kernel does not order them
    /// (see [`mass_round`]), so only a dump can tell for sure.
    fn all_seen_back(&self) -> bool {
        self.absent
            .iter()
            .all(|k| self.history[k].iter().any(|(_, new)| *new))
    }
}

/// `ip rule flush` + `ip route flush table 100` in one batch; times until the last re-add of a
/// protected object the listener sees, once the batch has exited, every object seen deleted has
/// been seen added again and a dump (`ip`) confirms that all of them are present.
///
/// Why the dump: notifications from two processes are not ordered for a third. On this kernel
/// the listener sometimes receives the agent's RTM_NEWRULE *before* the RTM_DELRULE (sent by
/// `ip rule flush`) that made the agent re-add the rule, so "last seen: deleted" does not mean
/// absent.
///
/// Not every object is necessarily deleted: `ip rule flush` deletes while it dumps, and a kernel
/// dump resumes by position, so rules can be skipped when the list shifts under it (the agent
/// re-adding rules makes that likelier). Those stay in place and need no repair.
fn mass_round(
    sandbox: &Sandbox,
    listener: &Listener,
    rules: &HashSet<RuleKey>,
    routes: &HashSet<RouteKey>,
) -> Result<Mass> {
    /// What the listener has shown so far.
    struct Progress<'a> {
        tr: Tracker<'a, RuleKey>,
        to: Tracker<'a, RouteKey>,
        last_new: Instant,
        last_del: Instant,
        overrun: bool,
    }
    impl Progress<'_> {
        fn take(&mut self, at: Instant, msg: Option<M>) {
            let what = match &msg {
                None => {
                    self.overrun = true;
                    None
                }
                Some(M::NewRule(m)) => self.tr.note(at, decode::rule(m).map(|(k, _)| k), true),
                Some(M::DelRule(m)) => self.tr.note(at, decode::rule(m).map(|(k, _)| k), false),
                Some(M::NewRoute(m)) => self.to.note(at, decode::route(m).map(|(k, _)| k), true),
                Some(M::DelRoute(m)) => self.to.note(at, decode::route(m).map(|(k, _)| k), false),
                _ => None,
            };
            match what {
                Some(true) => self.last_new = at,
                Some(false) => self.last_del = at,
                None => {}
            }
        }
    }

    listener.drain();
    let script = format!("rule flush\nroute flush table {TABLE}\n");
    std::thread::scope(|scope| {
        let t0 = Instant::now();
        let batch = scope.spawn(|| {
            let r = sandbox.batch(&[], &script).map_err(|e| e.to_string());
            (Instant::now(), r)
        });
        let deadline = t0 + MASS_REPAIR;
        let mut seen = Progress {
            tr: Tracker::new(rules),
            to: Tracker::new(routes),
            last_new: t0,
            last_del: t0,
            overrun: false,
        };
        let mut last_check = t0;
        let mut backlog_at_dump = 0;
        let mut polled = false;
        loop {
            let now = Instant::now();
            if seen.overrun {
                // Lost notifications: fall back to polling the kernel with `ip` until all is back.
                while !batch.is_finished() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                loop {
                    let (r, o) = count_present(sandbox)?;
                    if r == rules.len() && o == routes.len() {
                        seen.last_new = Instant::now();
                        break;
                    }
                    ensure!(
                        Instant::now() < deadline,
                        "mass repair (after a listener overrun): only {r} rules and {o} routes back within {MASS_REPAIR:?}"
                    );
                    std::thread::sleep(Duration::from_millis(2));
                }
                polled = true;
                break;
            }
            if batch.is_finished()
                && seen.tr.deletions + seen.to.deletions > 0
                && seen.tr.all_seen_back()
                && seen.to.all_seen_back()
                && now.duration_since(last_check) >= Duration::from_millis(20)
            {
                // Confirm with the kernel (more than once only when a notification arrived out
                // of order or the agent is still busy with a second deletion).
                last_check = now;
                let (r, o) = count_present(sandbox)?;
                if r == rules.len() && o == routes.len() {
                    // Everything is in place; what the listener has not read yet is still
                    // timed by its arrival. Read until it has been quiet for 20 ms.
                    let until = Instant::now() + Duration::from_secs(2);
                    while Instant::now() < until {
                        let Some((at, msg)) = listener.next(Duration::from_millis(20)) else {
                            break;
                        };
                        backlog_at_dump += 1;
                        seen.take(at, msg);
                    }
                    break;
                }
            }
            if now >= deadline {
                // Say which objects are missing and what the kernel itself holds for them.
                let tr = &seen.tr;
                let mut missing: Vec<String> = tr
                    .absent
                    .iter()
                    .take(5)
                    .map(|k| {
                        let kernel = sandbox
                            .ip(&["rule", "show", "priority", &k.priority.to_string()])
                            .unwrap_or_else(|e| e.to_string());
                        let history: Vec<String> = tr.history[k]
                            .iter()
                            .map(|(at, new)| {
                                let what = if *new { "new" } else { "del" };
                                format!("{what}@{:.3}ms", ms(at.duration_since(t0)))
                            })
                            .collect();
                        format!(
                            "rule {k} (listener saw: {}; ip rule show priority {}: {:?})",
                            history.join(" "),
                            k.priority,
                            kernel.trim()
                        )
                    })
                    .collect();
                missing.extend(seen.to.absent.iter().take(5).map(|k| format!("route {k}")));
                bail!(
                    "mass repair: not everything was back within {MASS_REPAIR:?}: {} rules and {} routes seen deleted, {} and {} of them not seen back; missing: {}",
                    tr.deleted.len(),
                    seen.to.deleted.len(),
                    tr.absent.len(),
                    seen.to.absent.len(),
                    missing.join("; ")
                );
            }
            if let Some((at, msg)) = listener.next(Duration::from_millis(20).min(deadline - now)) {
                seen.take(at, msg);
            }
        }
        let (batch_end, batch_ok) = batch
            .join()
            .map_err(|_| anyhow!("the ip -batch thread panicked"))?;
        Ok(Mass {
            back: seen.last_new.duration_since(t0),
            batch_took: batch_end.duration_since(t0),
            last_del: seen.last_del.duration_since(t0),
            batch_ok,
            deleted: (seen.tr.deleted.len(), seen.to.deleted.len()),
            deletions: seen.tr.deletions + seen.to.deletions,
            overrun: seen.overrun,
            polled,
            out_of_order: seen.tr.absent.len() + seen.to.absent.len(),
            backlog_at_dump,
        })
    })
}

/// How long `ip -batch` takes to add the same objects into a fresh namespace (same veth set-up).
/// Returns the wall time and the CPU time of the `ip` process, in clock ticks.
fn ip_batch_baseline(lines: &str) -> Result<(Duration, u64)> {
    let fresh = Sandbox::create("nwbench-ipb")?;
    setup_veth(&fresh)?;
    let me = std::process::id();
    let before = proc_sample(me)?.child_ticks;
    let t0 = Instant::now();
    fresh
        .batch(&[], lines)
        .context("ip -batch into a fresh namespace")?;
    let took = t0.elapsed();
    let ip_ticks = proc_sample(me)?.child_ticks - before;
    let (r, o) = count_present(&fresh)?;
    ensure!(
        r == RULES && o == ROUTES,
        "ip -batch added only {r} rules and {o} routes"
    );
    Ok((took, ip_ticks))
}

// ---------------------------------------------------------------------------------------------
// Statistics and output

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Nearest-rank percentile of sorted samples.
fn pct(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

struct Summary {
    n: usize,
    p50: Duration,
    p90: Duration,
    p99: Duration,
    max: Duration,
    mean: Duration,
}

fn summarize(samples: &mut [Duration]) -> Summary {
    samples.sort_unstable();
    let total: Duration = samples.iter().sum();
    Summary {
        n: samples.len(),
        p50: pct(samples, 0.50),
        p90: pct(samples, 0.90),
        p99: pct(samples, 0.99),
        max: *samples.last().expect("at least one sample"),
        mean: total / samples.len() as u32,
    }
}

fn median(v: &[Duration]) -> Duration {
    let mut s = v.to_vec();
    s.sort_unstable();
    s[(s.len() - 1) / 2]
}

fn machine_short() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{cpus} CPUs, Linux {}", kernel.trim())
}

fn machine() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "?".into());
    let iproute2 = Command::new("ip")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "?".into());
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into());
    format!(
        "{cpus} CPUs (nproc), {model}, kernel {kernel}, {iproute2}; load average at start {load}"
    )
}

/// A CDF of both latency distributions on a log-scale x axis, p50 and p99 marked.
fn svg(series: &[(&str, &str, &[Duration])], title: &str, subtitle: &str) -> String {
    const W: f64 = 760.0;
    const H: f64 = 490.0;
    const L: f64 = 70.0;
    const R: f64 = 24.0;
    const T: f64 = 56.0;
    const B: f64 = 94.0;
    let all = series.iter().flat_map(|s| s.2.iter());
    let lo = all
        .clone()
        .map(|d| ms(*d))
        .fold(f64::INFINITY, f64::min)
        .max(1e-3);
    let hi = all.map(|d| ms(*d)).fold(0.0, f64::max).max(lo * 10.0);
    let (d0, d1) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let x = |v: f64| L + (v.max(1e-3).log10() - d0 as f64) / f64::from(d1 - d0) * (W - L - R);
    let y = |p: f64| T + (1.0 - p) * (H - T - B);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r##"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"##
    );
    let _ = writeln!(s, r##"<rect width="{W}" height="{H}" fill="white"/>"##);
    let _ = writeln!(
        s,
        r##"<text x="{}" y="20" text-anchor="middle" font-size="15" font-weight="bold">{title}</text>"##,
        W / 2.0
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="37" text-anchor="middle" font-size="11" fill="#555">{subtitle}</text>"##,
        W / 2.0
    );
    // Grid: decades with labels, 2 and 5 in between; CDF every 10 %.
    for d in d0..=d1 {
        let v = 10f64.powi(d);
        let px = x(v);
        let _ = writeln!(
            s,
            r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#ccc"/>"##,
            H - B
        );
        let label = if d < 0 {
            format!("{:.*}", (-d) as usize, v)
        } else {
            format!("{v:.0}")
        };
        let _ = writeln!(
            s,
            r##"<text x="{px:.1}" y="{}" text-anchor="middle">{label}</text>"##,
            H - B + 18.0
        );
        if d < d1 {
            for m in [2.0, 5.0] {
                let px = x(v * m);
                let _ = writeln!(
                    s,
                    r##"<line x1="{px:.1}" y1="{T}" x2="{px:.1}" y2="{}" stroke="#eee"/>"##,
                    H - B
                );
            }
        }
    }
    for k in 0..=10 {
        let p = f64::from(k) / 10.0;
        let py = y(p);
        let _ = writeln!(
            s,
            r##"<line x1="{L}" y1="{py:.1}" x2="{}" y2="{py:.1}" stroke="{}"/>"##,
            W - R,
            if k % 5 == 0 { "#ccc" } else { "#eee" }
        );
        let _ = writeln!(
            s,
            r##"<text x="{}" y="{:.1}" text-anchor="end">{p:.1}</text>"##,
            L - 6.0,
            py + 4.0
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{L}" y="{T}" width="{}" height="{}" fill="none" stroke="#333"/>"##,
        W - L - R,
        H - T - B
    );
    let _ = writeln!(
        s,
        r##"<text x="{}" y="{}" text-anchor="middle">time from RTM_DELRULE sent to RTM_NEWRULE seen by an outside listener (ms, log scale)</text>"##,
        (L + W - R) / 2.0,
        H - B + 42.0
    );
    let _ = writeln!(
        s,
        r##"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">fraction of repairs done (CDF)</text>"##,
        (T + H - B) / 2.0
    );
    for (i, (name, color, samples)) in series.iter().enumerate() {
        let mut sorted = samples.to_vec();
        sorted.sort_unstable();
        let n = sorted.len() as f64;
        let mut path = format!("M{:.1},{:.1}", x(ms(sorted[0])), y(0.0));
        for (k, d) in sorted.iter().enumerate() {
            let _ = write!(path, " H{:.1} V{:.1}", x(ms(*d)), y((k + 1) as f64 / n));
        }
        let _ = writeln!(
            s,
            r##"<path d="{path}" fill="none" stroke="{color}" stroke-width="2"/>"##
        );
        for (q, label) in [(0.5, "p50"), (0.99, "p99")] {
            let v = ms(pct(&sorted, q));
            let (px, py) = (x(v), y(q));
            let _ = writeln!(
                s,
                r##"<circle cx="{px:.1}" cy="{py:.1}" r="4" fill="{color}"/><text x="{:.1}" y="{:.1}" fill="{color}">{label} {v:.3} ms</text>"##,
                px + 7.0,
                py + if q < 0.9 { 14.0 } else { -6.0 }
            );
        }
        // Legend below the axis, one entry beside the other: never over a curve.
        let (lx, ly) = (L + 20.0 + i as f64 * 320.0, H - 18.0);
        let _ = writeln!(
            s,
            r##"<line x1="{lx}" y1="{ly}" x2="{}" y2="{ly}" stroke="{color}" stroke-width="3"/><text x="{}" y="{}">{name} (n = {})</text>"##,
            lx + 24.0,
            lx + 30.0,
            ly + 4.0,
            sorted.len()
        );
    }
    s.push_str("</svg>\n");
    s
}

// ---------------------------------------------------------------------------------------------

fn main() -> Result<()> {
    let settings = Settings::from_env()?;
    println!("netwarden repair benchmark");
    println!("machine: {}", machine());
    println!(
        "state: {RULES} rules (priority 1000..{}, from 10.A.B.0/24 lookup {TABLE}) and {ROUTES} routes (10.64.x.y/32 dev veth0 table {TABLE})",
        1000 + RULES - 1
    );

    let yaml = config_yaml();
    let cfg = config::parse("bench.yaml", &yaml).map_err(|e| anyhow!("bench config: {e}"))?;
    let desired = DesiredState::from_config(&cfg);
    ensure!(
        desired.rules.len() == RULES && desired.routes.len() == ROUTES,
        "the bench config holds {} rules and {} routes",
        desired.rules.len(),
        desired.routes.len()
    );
    let rule_keys: HashSet<RuleKey> = desired.rules.keys().cloned().collect();
    let route_keys: HashSet<RouteKey> = desired.routes.keys().cloned().collect();
    let mut ordered_rules: Vec<RuleKey> = rule_keys.iter().cloned().collect();
    ordered_rules.sort();
    let config_file = TempFile::write("netwarden-bench", &yaml)?;
    let add_lines = batch_add_lines();

    let sandbox = Sandbox::create("nwbench")?;
    setup_veth(&sandbox)?;
    println!("sandbox: network namespace {}", sandbox.name);
    // Before any thread exists: the listener, our socket, threads and children all live there.
    netwarden::netns::enter(&sandbox.name)?;
    let listener = Listener::start().context("cannot start the netlink listener")?;
    let mut deleter = Deleter::new()?;

    // ---- the agent
    let started = Instant::now();
    let mut agent = Agent::spawn(&config_file.0, &sandbox.name, &settings.log_level)?;
    agent.wait_ready(AGENT_READY)?;
    let sync = started.elapsed();
    let (r, o) = count_present(&sandbox)?;
    ensure!(
        r == RULES && o == ROUTES,
        "after the initial sync only {r} rules and {o} routes are present"
    );
    let after_sync = proc_sample(agent.pid())?;
    println!(
        "\nagent pid {} (--log-level {}): process start to `initial sync done` (config parse + adding {} objects to an empty namespace): {:.1} ms, VmRSS {} KiB",
        agent.pid(),
        settings.log_level,
        RULES + ROUTES,
        ms(sync),
        after_sync.rss_kib
    );

    // ---- 1. one rule deleted → re-added (netwarden)
    println!(
        "\n1. measuring {} single rule deletions with the agent running…",
        settings.deletions
    );
    let mut overruns = 0;
    let log_lines_before = agent.lines.load(Ordering::Relaxed);
    let log_bytes_before = agent.bytes.load(Ordering::Relaxed);
    let mut nw = single_deletions(
        "netwarden",
        &listener,
        &mut deleter,
        &ordered_rules,
        settings.deletions,
        settings.gap,
        &mut overruns,
    )?;
    let log_lines = agent.lines.load(Ordering::Relaxed) - log_lines_before;
    let log_bytes = agent.bytes.load(Ordering::Relaxed) - log_bytes_before;
    let nw_sum = summarize(&mut nw);

    // ---- 2. everything at once
    println!(
        "\n2. (per round) everything deleted at once (`ip -batch`: rule flush + route flush table {TABLE}) -> all {} back, vs `ip -batch` adding them to a fresh namespace",
        RULES + ROUTES
    );
    println!(
        "   {:>5} {:>12} {:>16} {:>7} {:>17} {:>12} {:>8}",
        "round", "all back ms", "ip -batch add ms", "ratio", "deleted", "out of order", "overrun"
    );
    let mut backs = Vec::new();
    let mut baselines = Vec::new();
    let mut any_overrun = false;
    let mut batch_errors = Vec::new();
    let mut where_time_goes = Vec::new();
    let me = std::process::id();
    let tick_ms = 1e3 / clock_ticks() as f64;
    for round in 1..=settings.rounds {
        let (agent_ns0, me_ns0) = (cpu_ns(agent.pid())?, cpu_ns(me)?);
        let (agent0, me0) = (proc_sample(agent.pid())?, proc_sample(me)?);
        let m = mass_round(&sandbox, &listener, &rule_keys, &route_keys).with_context(|| {
            format!(
                "round {round}; the agent's log ends with:\n{}",
                agent.log_tail()
            )
        })?;
        let (agent_ns1, me_ns1) = (cpu_ns(agent.pid())?, cpu_ns(me)?);
        let (agent1, me1) = (proc_sample(agent.pid())?, proc_sample(me)?);
        // Let the agent settle, then check from outside that everything really is there. The
        // pause is longer than the agent's contest window (2 s): rounds closer together would be
        // a fight over every object, and the agent rightly backs off from fights.
        std::thread::sleep(Duration::from_millis(2500));
        let (r, o) = count_present(&sandbox)?;
        ensure!(
            r == RULES && o == ROUTES,
            "round {round}: after the repair only {r} rules and {o} routes are present"
        );
        let (base, base_ticks) = ip_batch_baseline(&add_lines)?;
        println!(
            "   {round:>5} {:>12.1} {:>16.1} {:>7.2} {:>17} {:>12} {:>8}",
            ms(m.back),
            ms(base),
            m.back.as_secs_f64() / base.as_secs_f64(),
            format!("{}+{}/{}", m.deleted.0, m.deleted.1, m.deletions),
            m.out_of_order,
            match (m.overrun, m.polled) {
                (false, _) => "no",
                (true, false) => "late",
                (true, true) => "polled",
            }
        );
        where_time_goes.push(format!(
            "   {round:>5} {:>9.1} {:>9.1} {:>10.1} {:>10.1} {:>13} {:>10.1} {:>10.0} {:>10.0} {:>8}",
            ms(m.batch_took),
            ms(m.last_del),
            ms(m.back.saturating_sub(m.last_del)),
            (agent_ns1 - agent_ns0) as f64 / 1e6,
            format!(
                "{:.0}/{:.0}",
                (agent1.utime - agent0.utime) as f64 * tick_ms,
                (agent1.stime - agent0.stime) as f64 * tick_ms
            ),
            (me_ns1 - me_ns0) as f64 / 1e6,
            (me1.child_ticks - me0.child_ticks) as f64 * tick_ms,
            base_ticks as f64 * tick_ms,
            m.backlog_at_dump,
        ));
        if let Err(e) = m.batch_ok {
            batch_errors.push(format!("round {round}: {e}"));
        }
        any_overrun |= m.overrun;
        backs.push(m.back);
        baselines.push(base);
        listener.drain();
    }
    println!(
        "   (deleted: distinct protected rules + routes seen deleted / deletion notifications seen;"
    );
    println!(
        "    out of order: objects whose deletion notification reached the listener after their re-add)"
    );
    println!("   where the time goes (ms; CPU from /proc: schedstat, and clock ticks of {tick_ms:.0} ms for user/sys):");
    println!(
        "   {:>5} {:>9} {:>9} {:>10} {:>10} {:>13} {:>10} {:>10} {:>10} {:>8}",
        "round",
        "flush ip",
        "last del",
        "back-l.del",
        "agent CPU",
        "usr/sys",
        "bench CPU",
        "flush CPU",
        "ip add CPU",
        "backlog"
    );
    for line in &where_time_goes {
        println!("{line}");
    }
    println!("   (flush ip: the flush `ip -batch`, start to exit; last del: last deletion notification seen;");
    println!("    back-l.del: from it to the last re-add seen; agent CPU: the agent's time on CPU in the round;");
    println!("    bench CPU: this process (listener thread, main thread); flush CPU / ip add CPU: the `ip`");
    println!("    processes; backlog: notifications not yet read by the listener when a dump showed all back)");
    for e in &batch_errors {
        println!("   note: the flush batch reported: {e}");
    }

    // ---- 3. idle
    println!("\n3. measuring the idle agent for {:?}…", settings.idle);
    std::thread::sleep(Duration::from_millis(500));
    let a = proc_sample(agent.pid())?;
    let a_ns = cpu_ns(agent.pid())?;
    let t = Instant::now();
    std::thread::sleep(settings.idle);
    let b_ns = cpu_ns(agent.pid())?;
    let b = proc_sample(agent.pid())?;
    let wall = t.elapsed();
    let idle_cpu_ms = (b_ns - a_ns) as f64 / 1e6;
    let cpu = idle_cpu_ms / 1e3 / wall.as_secs_f64() * 100.0;

    // ---- 1b. the watchdog
    println!(
        "\n1b. stopping the agent; measuring {} single rule deletions with the watchdog…",
        settings.watchdog_deletions
    );
    agent.stop()?;
    let agent_log_total = agent.lines.load(Ordering::Relaxed);
    drop(agent);
    let mut watchdog = Watchdog::spawn(&sandbox.name)?;
    // Let `ip monitor` subscribe before the first deletion (the warm-up would time out otherwise).
    std::thread::sleep(Duration::from_millis(1000));
    let mut wd = single_deletions(
        "watchdog",
        &listener,
        &mut deleter,
        &ordered_rules,
        settings.watchdog_deletions,
        settings.gap,
        &mut overruns,
    )?;
    watchdog.stop();
    drop(watchdog);
    let wd_sum = summarize(&mut wd);

    // ---- report
    let p = |s: &Summary| {
        format!(
            "n={:<5} p50 {:>8.3}  p90 {:>8.3}  p99 {:>8.3}  max {:>8.3}  mean {:>8.3} ms",
            s.n,
            ms(s.p50),
            ms(s.p90),
            ms(s.p99),
            ms(s.max),
            ms(s.mean)
        )
    };
    println!("\n==== summary ====");
    println!("\n1. one rule deleted (RTM_DELRULE from our socket) -> its RTM_NEWRULE seen by an outside listener ({WARMUP} warm-up deletions not counted, {} ms between deletions)", settings.gap.as_millis());
    println!("   netwarden  {}", p(&nw_sum));
    println!("   watchdog   {}", p(&wd_sum));
    println!(
        "   targets (netwarden): p50 <= 0.300 ms: {}, p99 <= 2.000 ms: {}",
        verdict(nw_sum.p50 <= Duration::from_micros(300)),
        verdict(nw_sum.p99 <= Duration::from_millis(2))
    );
    println!(
        "   watchdog / netwarden: p50 {:.1}x, p99 {:.1}x",
        wd_sum.p50.as_secs_f64() / nw_sum.p50.as_secs_f64(),
        wd_sum.p99.as_secs_f64() / nw_sum.p99.as_secs_f64()
    );
    println!(
        "   agent stderr during the single deletions: {log_lines} lines, {log_bytes} bytes ({:.2} lines per repair); listener overruns: {overruns}",
        log_lines as f64 / (WARMUP + settings.deletions) as f64
    );

    let ratios: Vec<f64> = backs
        .iter()
        .zip(&baselines)
        .map(|(b, i)| b.as_secs_f64() / i.as_secs_f64())
        .collect();
    let rmed = {
        let mut r = ratios.clone();
        r.sort_by(f64::total_cmp);
        r[(r.len() - 1) / 2]
    };
    let minmax = |v: &[Duration]| {
        let min = v.iter().min().copied().unwrap_or_default();
        let max = v.iter().max().copied().unwrap_or_default();
        format!("{:.1} .. {:.1}", ms(min), ms(max))
    };
    println!(
        "\n2. mass repair over {} rounds: all back median {:.1} ms (min..max {}), ip -batch add median {:.1} ms (min..max {})",
        settings.rounds,
        ms(median(&backs)),
        minmax(&backs),
        ms(median(&baselines)),
        minmax(&baselines)
    );
    println!(
        "   ratio netwarden / ip -batch: median {rmed:.2}x (min..max {:.2} .. {:.2}); target <= 1.5x: {}; listener overrun: {}",
        ratios.iter().copied().fold(f64::INFINITY, f64::min),
        ratios.iter().copied().fold(0.0, f64::max),
        verdict(rmed <= 1.5),
        if any_overrun { "yes (completion timed by polling `ip`)" } else { "no" }
    );

    println!(
        "\n3. idle agent holding {} objects: VmRSS {} KiB ({:.1} MiB), VmHWM {} KiB, {} threads; CPU {:.4} % of one core over {:.1} s ({idle_cpu_ms:.2} ms on CPU by schedstat, {} clock ticks); after the initial sync VmRSS was {} KiB",
        RULES + ROUTES,
        b.rss_kib,
        b.rss_kib as f64 / 1024.0,
        b.hwm_kib,
        b.threads,
        cpu,
        wall.as_secs_f64(),
        b.ticks - a.ticks,
        after_sync.rss_kib
    );
    println!("   agent stderr over the whole run: {agent_log_total} lines");

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/bench-repair-latency.svg");
    let title = format!("Single-rule repair latency, {RULES} rules + {ROUTES} routes protected");
    let text = svg(
        &[
            ("netwarden", "#1f77b4", &nw),
            ("ip monitor | bash watchdog", "#d62728", &wd),
        ],
        &title,
        &format!("{} (p50 and p99 marked)", machine_short()),
    );
    if let Some(dir) = out.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(&out, text).with_context(|| format!("cannot write {}", out.display()))?;
    println!("\nwrote {}", out.display());
    drop(listener);
    Ok(())
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "met"
    } else {
        "MISSED"
    }
}
