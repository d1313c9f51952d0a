//! Shared rig for the integration tests: a namespace per test (removed on drop, also on panic),
//! the real agent binary running inside it (killed by pid on drop), real iproute2 to break things.
#![allow(dead_code)] // each test binary uses its own subset

pub use netwarden::sandbox::Sandbox;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc::{channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
pub const WAIT: Duration = Duration::from_secs(10);

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

/// The agent, running in a namespace. Its stderr is collected line by line.
pub struct Agent {
    child: Child,
    lines: Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
    cursor: usize,
}

impl Agent {
    /// Starts `netwarden run` and waits until it reports its initial sync.
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

    pub fn start_full(ns: &Sandbox, config: &Path, extra: &[&str], env: &[(&str, &str)]) -> Agent {
        let config = config.to_str().expect("UTF-8 path");
        let args: Vec<&str> = ["--config", config]
            .into_iter()
            .chain(extra.iter().copied())
            .collect();
        Agent::start_run(ns, &args, env)
    }

    /// Starts `netwarden run ARGS --netns NS` (no `--config` of its own: Kubernetes mode passes
    /// `--configmap`) and waits until it reports its initial sync.
    pub fn start_run(ns: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Agent {
        let mut cmd = Command::new(BIN);
        cmd.envs(env.iter().copied())
            .arg("run")
            .args(args)
            .args(["--netns", &ns.name, "--log-level", "debug"])
            // Any free port on the host's loopback; see Agent::http.
            .args(["--metrics-addr", "127.0.0.1:0"]);
        Agent::spawn(cmd)
    }

    /// Starts `netwarden run --config CONFIG` in the namespace as the DaemonSet runs it: root
    /// uid with only CAP_NET_ADMIN and CAP_NET_RAW (`ip netns exec` enters the namespace, as
    /// setns needs a capability the agent does not have), and waits for its initial sync.
    pub fn start_capped(ns: &Sandbox, config: &Path) -> Agent {
        let caps = "-all,+net_admin,+net_raw";
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name, "setpriv"])
            .args([
                "--inh-caps",
                caps,
                "--ambient-caps",
                caps,
                "--bounding-set",
                caps,
            ])
            .arg("--")
            .arg(BIN)
            .args(["run", "--config", config.to_str().expect("UTF-8 path")])
            .args(["--log-level", "debug", "--metrics-addr", "127.0.0.1:0"]);
        Agent::spawn(cmd)
    }

    fn spawn(mut cmd: Command) -> Agent {
        let mut child = cmd
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
        };
        agent.wait_log("initial sync done");
        // Later waits also see what was logged during the initial sync.
        agent.cursor = 0;
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

    /// The address of the agent's HTTP endpoints, from its log.
    pub fn http(&self) -> String {
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

/// Runs the binary with arguments.
pub fn netwarden(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("run netwarden")
}

/// `netwarden check --config CONFIG --netns NS EXTRA…`: an independent look at the namespace.
pub fn check(ns: &Sandbox, config: &Path, extra: &[&str]) -> Output {
    let mut args = vec![
        "check",
        "--config",
        config.to_str().unwrap(),
        "--netns",
        &ns.name,
    ];
    args.extend_from_slice(extra);
    netwarden(&args)
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
