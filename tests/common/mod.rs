//! Shared rig for the integration tests: a namespace per test (removed on drop, also on panic),
//! the real agent binary running inside it (killed by pid on drop), real iproute2 to break things.
#![allow(dead_code)] // each test binary uses its own subset

pub mod chains;
pub mod deployed;
pub mod offender;

pub use deployed::Privileges;
pub use netwarden::testing::sandbox::Sandbox;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
pub const WAIT: Duration = Duration::from_secs(10);

/// The agent binary [`Agent`] starts: this build's, or the one NETWARDEN_AGENT_BIN names (a
/// before/after measurement with another build: benches/attribution.rs).
pub fn agent_bin() -> PathBuf {
    std::env::var_os("NETWARDEN_AGENT_BIN").map_or_else(|| PathBuf::from(BIN), PathBuf::from)
}

/// A namespace with `veth0` (10.200.0.1/24, fd00:200::1/64) <-> `veth1` (10.200.0.2/24), both up.
pub fn sandbox() -> Sandbox {
    let ns = Sandbox::create("nw-test").expect("create namespace");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    ns.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])
        .unwrap();
    ns.ip(&["address", "add", "10.200.0.2/24", "dev", "veth1"])
        .unwrap();
    ns.ip(&[
        "-6",
        "address",
        "add",
        "fd00:200::1/64",
        "dev",
        "veth0",
        "nodad",
    ])
    .unwrap();
    ns
}

/// Writes a config (the `spec` body, indented by the caller as YAML under `spec:`).
pub fn config(dir: &Path, spec: &str) -> PathBuf {
    let path = dir.join("netwarden.yaml");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(
        f,
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}"
    )
    .unwrap();
    path
}

/// How the agent is started.
#[derive(Clone, Debug)]
pub enum Shape {
    /// As root with every capability, entering the namespace itself (`--netns`); its HTTP
    /// endpoints are on the host's loopback. Not what ships: only on purpose
    /// ([`Agent::start_as_root_because`], a comparison of shapes).
    Root,
    /// With exactly the given privileges (normally [`Privileges::of_daemonset`]), started inside
    /// the namespace as the DaemonSet's container is (hostNetwork, hostPID); its HTTP endpoints
    /// are inside the namespace and forwarded to the host's loopback ([`deployed::forward`]).
    Deployed(Privileges),
}

impl Shape {
    /// The DaemonSet's shape.
    pub fn deployed() -> Shape {
        Shape::Deployed(Privileges::of_daemonset())
    }

    /// `BIN ARGS` (any subcommand) for namespace `ns` in this shape, not yet spawned: as root
    /// with `--netns NAME` appended, or deployed: started inside the namespace with the
    /// privileges and no `--netns`, as on the node itself (hostNetwork) or through `kubectl exec`
    /// in the agent's pod, whose processes get the container's privileges.
    pub fn command(&self, bin: &Path, ns: &Sandbox, args: &[&str]) -> Command {
        match self {
            Shape::Root => {
                let mut cmd = Command::new(bin);
                cmd.args(args).args(["--netns", &ns.name]);
                cmd
            }
            Shape::Deployed(privileges) => {
                let mut cmd = privileges.command_in(bin, &ns.name);
                cmd.args(args);
                cmd
            }
        }
    }

    /// `BIN run ARGS` for namespace `ns` in this shape, not yet spawned.
    pub fn run_command(&self, bin: &Path, ns: &Sandbox, args: &[&str]) -> Command {
        self.command(bin, ns, &[&["run"], args].concat())
    }
}

/// The agent, running in a namespace. Its stderr is collected line by line.
pub struct Agent {
    child: Child,
    lines: Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
    cursor: usize,
    /// Where a test reaches the HTTP endpoints, when not where the agent logged them.
    http: Option<String>,
}

impl Agent {
    /// Starts `netwarden run --config CONFIG` in the shape the DaemonSet runs it (see
    /// [`Shape::Deployed`]) and waits until it reports its initial sync. Every `start*` launcher
    /// below starts the deployed shape; root is reachable only through
    /// [`Agent::start_as_root_because`].
    pub fn start(ns: &Sandbox, config: &Path) -> Agent {
        Agent::start_full(ns, config, &[], &[])
    }

    /// As [`Agent::start`], with more arguments for `run`.
    pub fn start_with(ns: &Sandbox, config: &Path, extra: &[&str]) -> Agent {
        Agent::start_full(ns, config, extra, &[])
    }

    /// As [`Agent::start`], with environment variables for the agent.
    pub fn start_with_env(ns: &Sandbox, config: &Path, env: &[(&str, &str)]) -> Agent {
        Agent::start_full(ns, config, &[], env)
    }

    /// As [`Agent::start`], with more arguments and environment variables.
    pub fn start_full(ns: &Sandbox, config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_shaped(&Shape::deployed(), ns, config, extra, env)
    }

    /// As [`Agent::start_full`], as root with every capability: only for a test that compares
    /// root with the deployed shape, or needs something the DaemonSet does not do. `reason` says
    /// which; it is logged with the test's output so that a root agent is never silent.
    pub fn start_as_root_because(
        reason: &str,
        ns: &Sandbox,
        config: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        assert!(!reason.trim().is_empty(), "a root agent needs a reason");
        eprintln!("starting the agent as root: {reason}");
        Agent::start_shaped(&Shape::Root, ns, config, extra, env)
    }

    /// As [`Agent::start_full`], in the given shape.
    pub fn start_shaped(
        shape: &Shape,
        ns: &Sandbox,
        config: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let config = config.to_str().expect("UTF-8 path");
        let args: Vec<&str> = ["--config", config]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        Agent::start_run_shaped(shape, ns, &args, env)
    }

    /// Starts `netwarden run ARGS` (no `--config` of its own: Kubernetes mode passes
    /// `--configmap`) in the deployed shape and waits until it reports its initial sync.
    pub fn start_run(ns: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Agent {
        Agent::start_run_shaped(&Shape::deployed(), ns, args, env)
    }

    /// As [`Agent::start_run`], in the given shape.
    pub fn start_run_shaped(
        shape: &Shape,
        ns: &Sandbox,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Agent {
        let mut child = shape
            .run_command(&agent_bin(), ns, args)
            .envs(env.iter().copied())
            .args(["--log-level", "debug"])
            // Any free port on the loopback (the host's, or the namespace's when deployed); see
            // Agent::http.
            .args(["--metrics-addr", "127.0.0.1:0"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start agent");
        let stderr = child.stderr.take().unwrap();
        let (tx, lines) = channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line.clone());
                let _ = tx.send(line);
            }
        });
        let mut agent = Agent {
            child,
            lines,
            log,
            cursor: 0,
            http: None,
        };
        agent.wait_log("initial sync done");
        // Later waits also see what was logged during the initial sync.
        agent.cursor = 0;
        if let Shape::Deployed(_) = shape {
            let inside = agent.logged_http().parse().expect("a socket address");
            agent.http = Some(deployed::forward(&ns.name, inside));
        }
        agent
    }

    /// Waits (bounded) for a log line containing every one of `needles`, looking at the lines
    /// after the last one a previous wait matched; returns it.
    pub fn wait_log_all(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(i) =
                    (self.cursor..log.len()).find(|&i| needles.iter().all(|n| log[i].contains(n)))
                {
                    self.cursor = i + 1;
                    return log[i].clone();
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if self.lines.recv_timeout(left).is_err() {
                panic!(
                    "no log line with {needles:?} within {WAIT:?}; exit status {:?}; log:\n{}",
                    self.child.try_wait(),
                    self.log.lock().unwrap().join("\n")
                );
            }
        }
    }

    pub fn wait_log(&mut self, needle: &str) -> String {
        self.wait_log_all(&[needle])
    }

    /// The address of the agent's HTTP endpoints on the host's loopback.
    pub fn http(&self) -> String {
        self.http.clone().unwrap_or_else(|| self.logged_http())
    }

    /// The address the agent logged for its HTTP endpoints.
    fn logged_http(&self) -> String {
        let log = self.log.lock().unwrap();
        let line = log
            .iter()
            .find(|l| l.contains("serving /metrics"))
            .expect("no HTTP endpoints logged");
        let addr = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("addr="))
            .expect("no addr= in the log line");
        addr.to_string()
    }

    /// How many lines logged so far contain every one of `needles`.
    pub fn count_log(&self, needles: &[&str]) -> usize {
        let log = self.log.lock().unwrap();
        log.iter()
            .filter(|l| needles.iter().all(|n| l.contains(n)))
            .count()
    }

    /// The agent's exit status, if it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().expect("wait for the agent")
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) the agent: a stopped agent reads no events.
    pub fn freeze(&self, frozen: bool) {
        use nix::sys::signal::{kill, Signal};
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        kill(
            pid,
            if frozen {
                Signal::SIGSTOP
            } else {
                Signal::SIGCONT
            },
        )
        .unwrap();
    }

    /// Sends SIGTERM and waits (bounded) for the exit; returns whether it exited successfully.
    pub fn terminate(&mut self) -> bool {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.success();
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        panic!("agent did not exit within {WAIT:?} of SIGTERM");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            // A failed test shows what the agent said (wait_until's message does not).
            if let Ok(log) = self.log.lock() {
                eprintln!("agent log (pid {}):\n{}", self.child.id(), log.join("\n"));
            }
        }
        if self.child.try_wait().ok().flatten().is_none() {
            self.freeze(false);
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `cond` until it holds or `WAIT` passes: a bounded wait on kernel state.
pub fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if cond() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    panic!("timed out after {WAIT:?} waiting for: {what}");
}

/// Lines of an `ip` listing, trimmed.
pub fn lines(ns: &Sandbox, args: &[&str]) -> Vec<String> {
    normalise(&ns.ip(args).unwrap())
}

fn normalise(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

pub fn rules(ns: &Sandbox) -> Vec<String> {
    lines(ns, &["rule", "show"])
}

pub fn rules6(ns: &Sandbox) -> Vec<String> {
    lines(ns, &["-6", "rule", "show"])
}

pub fn routes(ns: &Sandbox, table: &str) -> Vec<String> {
    match ns.ip(&["route", "show", "table", table]) {
        Ok(text) => normalise(&text),
        // A table without routes does not exist for the kernel, and `ip` fails on it: a wait for
        // a route's first appearance polls exactly that.
        Err(e) if e.to_string().contains("FIB table does not exist") => Vec::new(),
        Err(e) => panic!("{e}"),
    }
}

pub fn count(list: &[String], line: &str) -> usize {
    list.iter().filter(|l| l.as_str() == line).count()
}

/// Runs the binary with arguments, as root on the host: only for commands that read no kernel
/// state (`validate`, `status`, `demo`). A command that looks at a namespace runs in the shape
/// an operator runs it: [`netwarden_in`].
pub fn netwarden(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run netwarden")
}

/// `netwarden ARGS` (`check`, `snapshot`, `networkd`, a `run` that exits at once) for the
/// namespace `ns`, in the deployed shape ([`Shape::command`]), not yet spawned.
pub fn one_shot(ns: &Sandbox, args: &[&str]) -> Command {
    Shape::deployed().command(Path::new(BIN), ns, args)
}

/// Runs `netwarden ARGS` for the namespace `ns` in the deployed shape ([`one_shot`]).
pub fn netwarden_in(ns: &Sandbox, args: &[&str]) -> Output {
    one_shot(ns, args).output().expect("run netwarden")
}

/// As [`netwarden_in`], as root with `--netns NAME`: only for a test of `--netns` itself.
/// `reason` says why; it is logged with the test's output so that a root command is never
/// silent.
pub fn netwarden_as_root_because(reason: &str, ns: &Sandbox, args: &[&str]) -> Output {
    assert!(!reason.trim().is_empty(), "a root command needs a reason");
    eprintln!("running netwarden {} as root: {reason}", args.join(" "));
    Shape::Root
        .command(Path::new(BIN), ns, args)
        .output()
        .expect("run netwarden")
}

/// `netwarden check --config CONFIG EXTRA…` in the namespace, in the deployed shape: an
/// independent look at the namespace.
pub fn check(ns: &Sandbox, config: &Path, extra: &[&str]) -> Output {
    let args = [&["check", "--config", config.to_str().unwrap()], extra].concat();
    netwarden_in(ns, &args)
}

/// Everything a namespace holds, to show that a command changed nothing.
pub fn snapshot(ns: &Sandbox) -> Vec<String> {
    let mut all = Vec::new();
    for args in [
        &["rule", "show"][..],
        &["-6", "rule", "show"],
        &["route", "show", "table", "all"],
        &["-6", "route", "show", "table", "all"],
        &["address", "show"],
    ] {
        all.extend(lines(ns, args));
    }
    // IPv6 duplicate address detection finishes on its own schedule: an address that was
    // `tentative` a moment ago is the same address, not a change anyone made; the kernel adds
    // the `local` route of a link-local address only once its DAD is done.
    all.iter()
        .filter(|l| !l.starts_with("local fe80:"))
        .map(|l| {
            l.split_whitespace()
                .filter(|w| *w != "tentative")
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// `ip -batch -` in the namespace with its standard input held open: the process, and its
/// netlink socket, stay until this is dropped, so the attribution is not a race with a process
/// that exits a fraction of a millisecond after its change. (A plain `ip rule del` is usually
/// named too, by the thread that watches changes as they happen, but on a loaded machine it can
/// be gone first and is then `unknown`.)
pub struct IpBatch(Child);

impl IpBatch {
    pub fn run(ns: &Sandbox, line: &str) -> IpBatch {
        IpBatch::run_with(ns, Path::new("ip"), line)
    }

    /// As [`IpBatch::run`], with another `ip` binary (a copy named like an owner process).
    pub fn run_with(ns: &Sandbox, ip: &Path, line: &str) -> IpBatch {
        let mut child = Command::new(ip)
            .args(["-n", &ns.name, "-batch", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run ip");
        let stdin = child.stdin.as_mut().unwrap();
        writeln!(stdin, "{line}").unwrap();
        stdin.flush().unwrap();
        IpBatch(child)
    }
}

impl Drop for IpBatch {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs a tool inside the namespace with `input` on its standard input (one `nft -f -` or
/// `iptables-restore` transaction); panics with its standard error if it fails.
pub fn must_feed(ns: &Sandbox, args: &[&str], input: &str) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ip netns exec");
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(input.as_bytes()).unwrap();
    drop(stdin);
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{args:?} failed: {}\n{input}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a tool inside the namespace; returns (success, stdout + stderr).
pub fn exec(ns: &Sandbox, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name])
        .args(args)
        .output()
        .expect("ip netns exec");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// [`exec`] that must succeed; returns its output.
pub fn must(ns: &Sandbox, args: &[&str]) -> String {
    let (ok, text) = exec(ns, args);
    assert!(ok, "{args:?}: {text}");
    text
}
