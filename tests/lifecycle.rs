//! The agent's lifecycle as an operator meets it: a SIGTERM at any moment, the protected
//! namespace removed under it, SIGHUP with an unchanged file and SIGHUP storms, and an agent that
//! is not allowed to change the kernel (no CAP_NET_ADMIN). The agent runs as the DaemonSet runs
//! it (tests/common/deployed.rs), but where a test removes the namespace under it: only an agent
//! that entered a namespace by name (`run --netns`, as root) can see that happen.

mod common;
use common::*;
use netwarden::telemetry::http;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(5);

/// `netwarden run` in namespace `ns`, in the given shape, with its stderr collected. Unlike
/// [`Agent`] it may never finish its initial sync, or exit.
struct Run {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
    cursor: usize,
    /// The namespace, where the agent was started inside it: its HTTP endpoints are there.
    inside: Option<String>,
    /// The HTTP endpoints' address on the host's loopback, once known.
    http: Mutex<Option<String>>,
}

impl Run {
    fn start(shape: &Shape, ns: &Sandbox, args: &[&str], env: &[(&str, &str)]) -> Run {
        let inside = match shape {
            Shape::Root => None,
            Shape::Deployed(_) => Some(ns.name.clone()),
        };
        let mut child = shape
            .run_command(Path::new(BIN), ns, args)
            .args(["--log-level", "debug", "--metrics-addr", "127.0.0.1:0"])
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the agent");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Run {
            child,
            log,
            cursor: 0,
            inside,
            http: Mutex::new(None),
        }
    }

    /// The agent of `--config CONFIG EXTRA…` in `shape`, once its initial sync is done.
    fn ready(shape: &Shape, ns: &Sandbox, config: &Path, extra: &[&str]) -> Run {
        let mut args = vec!["--config", config.to_str().unwrap()];
        args.extend_from_slice(extra);
        let mut run = Run::start(shape, ns, &args, &[]);
        run.wait_log("initial sync done");
        run
    }

    /// Waits (bounded) for a log line after the last one matched that contains `needle`.
    fn wait_log(&mut self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            {
                let log = self.log.lock().unwrap();
                if let Some(i) = (self.cursor..log.len()).find(|&i| log[i].contains(needle)) {
                    self.cursor = i + 1;
                    return log[i].clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {needle:?} within {WAIT:?}; exit {:?}; log:\n{}",
                self.child.try_wait(),
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn text(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    /// Waits (bounded) for the agent to exit.
    fn exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // The last lines may still be on their way through the pipe.
                std::thread::sleep(Duration::from_millis(50));
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not exit within {WAIT:?}; log:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
    }

    /// The HTTP endpoints' address on the host's loopback (forwarded once, when inside).
    fn http(&self) -> String {
        let mut known = self.http.lock().unwrap();
        if let Some(addr) = known.as_ref() {
            return addr.clone();
        }
        let logged = self.logged_http();
        let addr = match &self.inside {
            Some(ns) => deployed::forward(ns, logged.parse().expect("a socket address")),
            None => logged,
        };
        *known = Some(addr.clone());
        addr
    }

    fn logged_http(&self) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            let addr = self
                .log
                .lock()
                .unwrap()
                .iter()
                .filter(|l| l.contains("serving /metrics"))
                .find_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")))
                .map(str::to_string);
            if let Some(a) = addr {
                return a;
            }
            assert!(Instant::now() < deadline, "no HTTP address logged");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// The value of one series of `/metrics` (0 when absent).
    fn metric(&self, series: &str) -> f64 {
        let (code, body) = http::get(&self.http(), "/metrics", None, T).unwrap();
        assert_eq!(code, 200);
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

const RULE: &str =
    "  rules:\n    - name: pods\n      priority: 100\n      from: 10.244.1.0/24\n      table: 77\n";

/// A stand-in `iptables-nft-save` that records its pid and then never answers: the agent stays
/// in its initial sync (it reads the protected chain's table before anything is reported
/// ready) for as long as the test wants. Killed by pid when dropped.
struct StalledTool {
    dir: tempfile::TempDir,
}

impl StalledTool {
    fn new() -> StalledTool {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        for tool in ["iptables-nft-save", "ip6tables-nft-save"] {
            let path = dir.path().join(tool);
            std::fs::write(
                &path,
                "#!/bin/sh\necho $$ > \"$NW_TEST_STALLED\"\nexec sleep 3600\n",
            )
            .unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        StalledTool { dir }
    }

    fn marker(&self) -> std::path::PathBuf {
        self.dir.path().join("stalled.pid")
    }

    fn path_env(&self) -> String {
        format!(
            "{}:{}",
            self.dir.path().display(),
            std::env::var("PATH").unwrap_or_default()
        )
    }

    fn pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.marker())
            .ok()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for StalledTool {
    fn drop(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn alive(pid: i32) -> bool {
    // A zombie is gone for this purpose: only its parent's wait is missing.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.contains(") Z "))
        .unwrap_or(false)
}

/// An agent protecting a rule and a chain, held in its initial sync by [`StalledTool`]: returns
/// once the sync is waiting for the tool.
fn agent_in_its_initial_sync(ns: &Sandbox, dir: &Path) -> (Run, StalledTool) {
    let cfg = config(
        dir,
        &format!(
            "{RULE}  chains:\n    - name: fw\n      table: filter\n      chain: NW-TEST\n      \
             content: exact\n      rules:\n        - -j RETURN\n"
        ),
    );
    let tool = StalledTool::new();
    let (marker, path) = (tool.marker(), tool.path_env());
    let run = Run::start(
        &Shape::deployed(),
        ns,
        &[
            "--config",
            cfg.to_str().unwrap(),
            "--iptables-backend",
            "nft",
        ],
        &[
            ("PATH", path.as_str()),
            ("NW_TEST_STALLED", marker.to_str().unwrap()),
        ],
    );
    wait_until("the agent reads the protected table", || {
        tool.pid().is_some()
    });
    (run, tool)
}

#[test]
fn sigterm_during_the_initial_sync_exits_0_and_leaves_everything_in_place() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let before = snapshot(&ns);
    let (mut run, tool) = agent_in_its_initial_sync(&ns, dir.path());
    let stalled = tool.pid().unwrap();
    run.signal(nix::sys::signal::Signal::SIGTERM);
    let status = run.exit();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", run.text());
    let log = run.text();
    assert!(log.contains("shutting down"), "{log}");
    assert!(!log.contains("initial sync done"), "{log}");
    // Nothing was changed, and the tool the sync was waiting for was ended with it.
    assert_eq!(snapshot(&ns), before);
    wait_until("the stalled tool ended", || !alive(stalled));
}

#[test]
fn sighup_and_sigint_during_the_initial_sync_do_not_kill_the_agent() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let (mut run, _tool) = agent_in_its_initial_sync(&ns, dir.path());
    // A SIGHUP before the reload handler runs is kept for later, not fatal: had it killed the
    // agent (its default action), the exit status would say so instead of 0.
    run.signal(nix::sys::signal::Signal::SIGHUP);
    run.signal(nix::sys::signal::Signal::SIGINT);
    let status = run.exit();
    assert_eq!(status.code(), Some(0), "{status:?}; log:\n{}", run.text());
    assert!(run.text().contains("shutting down"));
}

#[test]
fn a_removed_namespace_is_reported_and_the_agent_exits_3() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), RULE);
    // Root: the agent enters the namespace by name, which is what can go away under it (the
    // DaemonSet's agent is in the node's namespace, which cannot).
    let mut run = Run::ready(&Shape::Root, &ns, &cfg, &[]);
    netwarden::testing::sandbox::run_ip(&["netns", "del", &ns.name]).unwrap();
    let line = run.wait_log("network namespace removed");
    assert!(line.contains(&ns.name), "{line}");
    let status = run.exit();
    assert_eq!(status.code(), Some(3), "{status:?}; log:\n{}", run.text());
}

#[test]
fn a_namespace_replaced_under_the_same_name_is_not_the_one_protected() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), RULE);
    // Root: the agent enters the namespace by name, which is what can go away under it (the
    // DaemonSet's agent is in the node's namespace, which cannot).
    let mut run = Run::ready(&Shape::Root, &ns, &cfg, &[]);
    netwarden::testing::sandbox::run_ip(&["netns", "del", &ns.name]).unwrap();
    netwarden::testing::sandbox::run_ip(&["netns", "add", &ns.name]).unwrap();
    run.wait_log("network namespace removed");
    assert_eq!(run.exit().code(), Some(3), "{}", run.text());
    // The new namespace of that name was not touched.
    assert!(!rules(&ns).iter().any(|r| r.contains("lookup 77")));
}

/// Replaces the config file at once (as `kubectl`/config management tools do): a read never
/// sees half of it.
fn rewrite(path: &Path, spec: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(
        &tmp,
        format!("apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n{spec}\n"),
    )
    .unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

const CONFIG_CHANGE: &str = "netwarden_resyncs_total{reason=\"config_change\"}";

#[test]
fn an_unchanged_sighup_is_a_no_op_and_a_storm_is_coalesced() {
    use nix::sys::signal::Signal::SIGHUP;
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), RULE);
    let mut run = Run::ready(&Shape::deployed(), &ns, &cfg, &[]);
    let addr = run.http();

    run.signal(SIGHUP);
    run.wait_log("config unchanged");
    assert_eq!(run.metric(CONFIG_CHANGE), 0.0, "{}", run.text());
    assert_eq!(
        run.metric("netwarden_config_reloads_total{result=\"unchanged\"}"),
        1.0
    );

    // A real change is still a reload and a resync.
    let more = |p: u32| {
        format!("    - name: extra{p}\n      priority: {p}\n      from: 10.244.{p}.0/24\n      table: 77\n")
    };
    rewrite(&cfg, &format!("{RULE}{}", more(101)));
    run.signal(SIGHUP);
    run.wait_log("config reloaded");
    wait_until("the new rule placed", || {
        rules(&ns).iter().any(|r| r.starts_with("101:"))
    });
    assert_eq!(run.metric(CONFIG_CHANGE), 1.0, "{}", run.text());

    // A storm while the liveness probe runs: the probe stays healthy, nothing is re-read for
    // an unchanged file, and a change made before the storm's last signal is applied once.
    let probing = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let prober = {
        let (probing, addr) = (probing.clone(), addr.clone());
        std::thread::spawn(move || {
            let mut codes = Vec::new();
            while probing.load(std::sync::atomic::Ordering::Relaxed) {
                codes.push(http::get(&addr, "/healthz", None, T).map(|r| r.0).ok());
                std::thread::sleep(Duration::from_millis(20));
            }
            codes
        })
    };
    for _ in 0..200 {
        run.signal(SIGHUP);
    }
    rewrite(&cfg, &format!("{RULE}{}", more(101) + &more(102)));
    for _ in 0..200 {
        run.signal(SIGHUP);
    }
    wait_until("the last change applied", || {
        rules(&ns).iter().any(|r| r.starts_with("102:"))
    });
    run.wait_log("config reloaded");
    probing.store(false, std::sync::atomic::Ordering::Relaxed);
    let codes = prober.join().unwrap();
    assert!(!codes.is_empty());
    assert!(
        codes.iter().all(|c| *c == Some(200)),
        "healthz during the storm: {codes:?}"
    );
    // One resync per change, not per signal.
    assert_eq!(run.metric(CONFIG_CHANGE), 2.0, "{}", run.text());
    assert!(run.child.try_wait().unwrap().is_none());
}

/// One SIGHUP reader serves every part of the config: a changed `spec.nftables` reaches the
/// nftables engine, and an unchanged file does not.
#[test]
fn a_sighup_with_new_nftables_tables_creates_them() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), RULE);
    let mut run = Run::ready(&Shape::deployed(), &ns, &cfg, &[]);
    let tables = || must(&ns, &["nft", "list", "tables"]);
    assert!(!tables().contains("nwtest"));
    rewrite(
        &cfg,
        &format!(
            "{RULE}  nftables:\n    - name: nwtest\n      family: inet\n      table: nwtest\n      \
             chains:\n        - name: c1\n          rules: [counter]\n"
        ),
    );
    run.signal(nix::sys::signal::Signal::SIGHUP);
    run.wait_log("config reloaded");
    wait_until("the nftables table created", || {
        tables().contains("table inet nwtest")
    });
}

/// The DaemonSet's shape without CAP_NET_ADMIN (a manifest that forgot it): the kernel refuses
/// every change the agent asks for.
fn no_net_admin() -> Shape {
    Shape::Deployed(Privileges::of_daemonset().without(&["NET_ADMIN"]))
}

#[test]
fn without_cap_net_admin_run_exits_2_even_when_everything_is_in_sync() {
    let ns = sandbox();
    ns.ip(&[
        "rule",
        "add",
        "priority",
        "100",
        "from",
        "10.244.1.0/24",
        "table",
        "77",
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), RULE);
    assert_eq!(check(&ns, &cfg, &[]).status.code(), Some(0), "in sync");
    let before = snapshot(&ns);
    let mut run = Run::start(
        &no_net_admin(),
        &ns,
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    let status = run.exit();
    let log = run.text();
    assert_eq!(status.code(), Some(2), "{status:?}; log:\n{log}");
    assert!(log.contains("CAP_NET_ADMIN"), "{log}");
    assert!(!log.contains("initial sync done"), "{log}");
    assert_eq!(snapshot(&ns), before);
}

#[test]
fn without_cap_net_admin_an_observing_agent_runs_and_is_unready_once_it_must_repair() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let observe = RULE.replace("table: 77\n", "table: 77\n      mode: observe\n");
    let cfg = config(dir.path(), &observe);
    let mut run = Run::start(
        &no_net_admin(),
        &ns,
        &["--config", cfg.to_str().unwrap()],
        &[],
    );
    // Observing needs no change to the kernel: it runs and is ready, and says what is missing.
    let done = run.wait_log("initial sync done");
    assert!(done.contains("still_drifted=1"), "{done}");
    let addr = run.http();
    assert_eq!(http::get(&addr, "/readyz", None, T).unwrap().0, 200);
    // Told to enforce, it cannot: the repair is refused and the agent says it is not ready.
    rewrite(&cfg, RULE);
    run.signal(nix::sys::signal::Signal::SIGHUP);
    run.wait_log("repair refused");
    // The refusal is logged before the loop publishes readiness: wait for the publication.
    wait_until("readiness published after the refusal", || {
        http::get(&addr, "/readyz", None, T).unwrap().0 != 200
    });
    let (code, body) = http::get(&addr, "/readyz", None, T).unwrap();
    assert_eq!(code, 503, "{body}");
    assert!(body.contains("EPERM"), "{body}");
    let (_, status) = http::get(&addr, "/status", None, T).unwrap();
    let status: netwarden::telemetry::status::Status = serde_json::from_str(&status).unwrap();
    assert!(!status.ready);
    assert_eq!(status.not_ready.as_deref(), Some(body.trim()));
    assert!(
        netwarden::telemetry::status::render_table(&status)
            .contains("; not ready: the kernel refused"),
        "{}",
        netwarden::telemetry::status::render_table(&status)
    );
    assert!(!rules(&ns).iter().any(|r| r.contains("lookup 77")));
}
