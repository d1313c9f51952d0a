//! Observability against the real kernel and the real agent: drift attributed to the process
//! that made it (`ip`, a program of another name, the kernel), a fighter making an object
//! contested, the metrics scraped by promtool and by a real Prometheus server, `netwarden
//! status`, and config reload on SIGHUP. Each test has a namespace of its own. The agent runs as
//! the DaemonSet does (tests/common/deployed.rs: its capabilities only, started inside the
//! namespace, its HTTP endpoints forwarded to the host's loopback); the attribution tests meet
//! offenders in their real shapes (tests/common/offender.rs).

mod common;
use common::*;
use netwarden::telemetry::http::get;
use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const RULE: &str = "100: from 10.244.1.0/24 lookup 77";
const T: Duration = Duration::from_secs(5);

const SPEC: &str = r#"  rules:
    - name: pods-to-overlay
      priority: 100
      from: 10.244.1.0/24
      table: 77
  routes:
    - name: via-peer
      table: 100
      destination: 10.80.0.0/24
      gateway: 10.200.0.2
      device: veth0
"#;

/// Deletes the protected rule with its own NETLINK_ROUTE socket (RTM_DELRULE), under the
/// process name given by prctl(PR_SET_NAME). `once SECS`: one deletion, then the socket stays
/// open SECS seconds. `fight SECS`: deletes it again and again for SECS seconds.
const DELETER: &str = r#"
import ctypes, socket, struct, sys, time
name, mode, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
ctypes.CDLL(None).prctl(15, name.encode(), 0, 0, 0)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, 0))
def attr(t, data):
    l = 4 + len(data)
    return struct.pack("HH", l, t) + data + b"\0" * ((4 - l % 4) % 4)
# fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action (1: to table), flags
body = struct.pack("BBBBBBBBI", 2, 0, 24, 0, 77, 0, 0, 1, 0)
body += attr(6, struct.pack("I", 100)) + attr(2, socket.inet_aton("10.244.1.0"))
seq = 0
def delete():
    global seq
    seq += 1
    s.send(struct.pack("IHHII", 16 + len(body), 33, 0x5, seq, 0) + body)
    return struct.unpack("i", s.recv(65536)[16:20])[0]
if mode == "once":
    assert delete() == 0
    print("deleted", flush=True)
    time.sleep(secs)
else:
    end, n = time.time() + secs, 0
    while time.time() < end:
        if delete() == 0:
            n += 1
        else:
            time.sleep(0.0005)
    print("deleted", n, flush=True)
"#;

/// Runs the deleter inside the namespace; killed by pid on drop.
struct Deleter(Child);

impl Deleter {
    fn start(ns: &Sandbox, name: &str, mode: &str, secs: f64) -> Deleter {
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "python3",
                "-c",
                DELETER,
                name,
                mode,
                &secs.to_string(),
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3");
        Deleter(child)
    }

    /// Waits (bounded) for it to finish; returns its output.
    fn finish(mut self, within: Duration) -> String {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(status) = self.0.try_wait().unwrap() {
                let mut out = String::new();
                std::io::Read::read_to_string(self.0.stdout.as_mut().unwrap(), &mut out).unwrap();
                assert!(status.success(), "deleter failed: {out}");
                return out;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("deleter still running after {within:?}");
    }
}

impl Drop for Deleter {
    fn drop(&mut self) {
        if self.0.try_wait().ok().flatten().is_none() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

fn scrape(addr: &str) -> String {
    let (code, body) = get(addr, "/metrics", None, T).expect("scrape");
    assert_eq!(code, 200);
    body
}

/// The value of the sample `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .find(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

fn value(addr: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    sample(&scrape(addr), name, labels).unwrap_or(0.0)
}

fn wait_metric(addr: &str, name: &str, labels: &[(&str, &str)], want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(addr);
        if sample(&text, name, labels) == Some(want) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{name}{labels:?} never became {want} within {within:?}; last scrape:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn drift_is_attributed_to_ip_to_another_program_and_to_the_kernel() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    let http = agent.http();
    assert_eq!(get(&http, "/readyz", None, T).unwrap().0, 200);
    assert_eq!(
        get(&http, "/healthz", None, T).unwrap(),
        (200, "ok\n".to_string())
    );
    let drift = "netwarden_drift_detected_total";

    // `ip rule del`.
    let ip = IpBatch::run(&ns, "rule del priority 100 from 10.244.1.0/24 table 77");
    wait_until("rule back", || count(&rules(&ns), RULE) == 1);
    agent.wait_log_all(&["restored", "pods-to-overlay", "actor=ip"]);
    wait_metric(
        &http,
        drift,
        &[("kind", "rule"), ("actor", "ip")],
        1.0,
        WAIT,
    );
    drop(ip);

    let deleter = Deleter::start(&ns, "nw-deleter", "once", 0.3);
    wait_until("rule back after the program's deletion", || {
        count(&rules(&ns), RULE) == 1
            && agent
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|l| l.contains("actor=nw-deleter"))
    });
    assert!(deleter.finish(WAIT).contains("deleted"));
    wait_metric(
        &http,
        drift,
        &[("kind", "rule"), ("actor", "nw-deleter")],
        1.0,
        WAIT,
    );

    // A route changed in place (another gateway): attributed to `ip` as well.
    let ip = IpBatch::run(
        &ns,
        "route replace 10.80.0.0/24 via 10.200.0.3 dev veth0 table 100",
    );
    wait_metric(
        &http,
        drift,
        &[("kind", "route"), ("actor", "ip")],
        1.0,
        WAIT,
    );
    drop(ip);
    wait_until("original gateway back", || {
        routes(&ns, "100")
            .iter()
            .any(|l| l.starts_with("10.80.0.0/24 via 10.200.0.2"))
    });

    // The kernel drops the gateway route with the address that made the gateway reachable.
    ns.ip(&["address", "del", "10.200.0.1/24", "dev", "veth0"])
        .unwrap();
    agent.wait_log_all(&["pending", "via-peer"]);
    wait_metric(
        &http,
        drift,
        &[("kind", "route"), ("actor", "kernel")],
        1.0,
        WAIT,
    );
    let text = scrape(&http);
    assert_eq!(
        sample(
            &text,
            "netwarden_resyncs_total",
            &[("reason", "address_removed")]
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "netwarden_protected_objects",
            &[("kind", "route"), ("state", "pending")]
        ),
        Some(1.0)
    );
    // The kernel refuses the route while its gateway is unreachable (the errno is the label).
    assert!(
        sample(&text, "netwarden_apply_errors_total", &[("kind", "route")]).unwrap_or(0.0) >= 1.0,
        "{text}"
    );
    ns.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])
        .unwrap();
    wait_metric(
        &http,
        "netwarden_protected_objects",
        &[("kind", "route"), ("state", "in_sync")],
        1.0,
        WAIT,
    );

    // Every repair counted and timed; no drift left.
    let text = scrape(&http);
    let applied = sample(
        &text,
        "netwarden_repairs_total",
        &[("kind", "rule"), ("result", "applied")],
    )
    .unwrap();
    assert_eq!(applied, 3.0, "initial sync + two repairs:\n{text}");
    let timed = sample(
        &text,
        "netwarden_repair_duration_seconds_count",
        &[("kind", "rule")],
    )
    .unwrap();
    assert_eq!(timed, 2.0, "the two event-driven repairs are timed");
    let fast = sample(
        &text,
        "netwarden_repair_duration_seconds_bucket",
        &[("kind", "rule"), ("le", "0.08192")],
    )
    .unwrap();
    assert_eq!(fast, 2.0, "each repair took less than 80 ms:\n{text}");

    // `netwarden status` asks the running agent.
    let out = netwarden(&["status", "--addr", &http]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let table = String::from_utf8_lossy(&out.stdout);
    let row = table
        .lines()
        .find(|l| l.contains("pods-to-overlay"))
        .unwrap_or_else(|| panic!("{table}"));
    let cells: Vec<&str> = row.split_whitespace().collect();
    assert_eq!(
        &cells[..5],
        ["rule", "pods-to-overlay", "in_sync", "enforce", "3"],
        "{table}"
    );
    assert!(row.contains("ago") && row.contains("nw-deleter"), "{table}");
    let route = table.lines().find(|l| l.contains("via-peer")).unwrap();
    assert!(
        route.contains("kernel") && route.contains("in_sync"),
        "{table}"
    );
    assert!(table.contains("2 objects, 2 in sync, 0 not"), "{table}");
    let out = netwarden(&["status", "--addr", &http, "--output", "json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["ready"], true);
    assert_eq!(json["objects"][0]["last_actor"], "nw-deleter");
}

#[test]
fn a_fighter_makes_the_object_contested_and_repairs_back_off() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_with(&ns, &config(dir.path(), SPEC), &[]);
    let http = agent.http();
    let applied = |http: &str| {
        value(
            http,
            "netwarden_repairs_total",
            &[("kind", "rule"), ("result", "applied")],
        )
    };
    let before = applied(&http);

    // 6 s: long enough for the backoff alone to hold a repair back 5 s (10 ms doubling).
    let fighter = Deleter::start(&ns, "nw-fighter", "fight", 6.0);
    // While it fights: contested, and the fighter is named in the log and the metric.
    agent.wait_log_all(&["contested", "pods-to-overlay", "actor=nw-fighter"]);
    wait_metric(
        &http,
        "netwarden_contested_objects",
        &[("kind", "rule"), ("actor", "nw-fighter")],
        1.0,
        WAIT,
    );
    let (_, status) = get(&http, "/status", None, T).unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let rule = &status["objects"][0];
    assert_eq!(
        (rule["state"].as_str(), rule["fighter"].as_str()),
        (Some("contested"), Some("nw-fighter")),
        "{status}"
    );
    let out = fighter.finish(Duration::from_secs(15));
    let stopped = Instant::now();
    let repairs = applied(&http) - before;
    // Without backoff the agent would put it back thousands of times in 6 s.
    assert!(
        repairs < 50.0,
        "{repairs} repairs in 6 s of fighting ({out})"
    );
    assert!(
        value(
            &http,
            "netwarden_repairs_deferred_total",
            &[("kind", "rule")]
        ) >= 1.0
    );

    // The fight stops: the held-back repair goes through once nothing contested has been removed
    // for the quiet period (1 s), not at the end of its backoff (by now 2.5–5 s after the last
    // removal), and after a quiet while the rule is in sync.
    let deadline = stopped + Duration::from_secs(35);
    while count(&rules(&ns), RULE) != 1 {
        assert!(
            Instant::now() < deadline,
            "rule not back after the fight; log:\n{}",
            agent.log.lock().unwrap().join("\n")
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let back = stopped.elapsed();
    assert!(
        back < Duration::from_millis(2500),
        "the held-back repair came {back:?} after the fight stopped; log:\n{}",
        agent.log.lock().unwrap().join("\n")
    );
    agent.wait_log_all(&["no longer contested", "actor=nw-fighter"]);
    wait_metric(
        &http,
        "netwarden_protected_objects",
        &[("kind", "rule"), ("state", "in_sync")],
        1.0,
        WAIT,
    );
    assert!(sample(
        &scrape(&http),
        "netwarden_contested_objects",
        &[("kind", "rule")]
    )
    .is_none());
    assert_eq!(count(&rules(&ns), RULE), 1);
}

#[test]
fn promtool_accepts_a_real_scrape() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&ns, &config(dir.path(), SPEC));
    let http = agent.http();
    ns.ip(&["rule", "del", "priority", "100"]).unwrap();
    // Counted once the remover is looked up, a moment after the repair.
    wait_metric(
        &http,
        "netwarden_drift_detected_total",
        &[("kind", "rule")],
        1.0,
        WAIT,
    );
    let text = scrape(&http);
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus; `make deps` installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics:\n{}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // OpenMetrics when asked for, as Prometheus asks.
    let (_, om) = get(
        &http,
        "/metrics",
        Some("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"),
        T,
    )
    .unwrap();
    assert!(om.ends_with("# EOF\n") && om.contains("# TYPE netwarden_drift_detected counter"));
}

/// A Prometheus server on loopback with a scratch config and storage; killed by pid on drop.
struct Prometheus {
    child: Child,
    addr: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = tempfile::tempdir().unwrap();
        let cfg = dir.path().join("prometheus.yml");
        std::fs::write(
            &cfg,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: netwarden\n    static_configs:\n      - targets: ['{target}']\n"
            ),
        )
        .unwrap();
        // A free loopback port for its API.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new("prometheus")
            .arg(format!("--config.file={}", cfg.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus (Debian package prometheus; `make deps` installs it)");
        Prometheus {
            child,
            addr,
            _dir: dir,
        }
    }

    /// The value of an instant query, if it has exactly one series.
    fn query(&self, q: &str) -> Option<f64> {
        let enc: String = q
            .bytes()
            .map(|b| match b {
                b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'.' => {
                    (b as char).to_string()
                }
                _ => format!("%{b:02X}"),
            })
            .collect();
        let (code, body) = get(&self.addr, &format!("/api/v1/query?query={enc}"), None, T).ok()?;
        if code != 200 {
            return None;
        }
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        let result = v["data"]["result"].as_array()?;
        if result.len() != 1 {
            return None;
        }
        result[0]["value"][1].as_str()?.parse().ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn a_real_prometheus_scrapes_the_drift_counter() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&ns, &config(dir.path(), SPEC));
    let http = agent.http();
    let prom = Prometheus::start(&http);
    let within = Duration::from_secs(30);
    let deadline = Instant::now() + within;
    let wait = |what: &str, q: &str, want: f64| loop {
        if prom.query(q) == Some(want) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus: {what} ({q} = {want}) not seen within {within:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    wait("the agent is scraped", r#"up{job="netwarden"}"#, 1.0);
    wait("the agent is ready", "netwarden_ready", 1.0);
    let _ip = IpBatch::run(&ns, "rule del priority 100");
    wait_until("rule back", || count(&rules(&ns), RULE) == 1);
    wait(
        "the drift counter",
        r#"netwarden_drift_detected_total{job="netwarden",kind="rule",actor="ip"}"#,
        1.0,
    );
    wait(
        "objects in sync",
        r#"sum(netwarden_protected_objects{state="in_sync"})"#,
        2.0,
    );
}

#[test]
fn sighup_reloads_the_config_and_a_bad_one_is_refused() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let mut agent = Agent::start(&ns, &cfg);
    let http = agent.http();
    let hup = |agent: &Agent| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    let reloads = |result| {
        value(
            &http,
            "netwarden_config_reloads_total",
            &[("result", result)],
        )
    };
    assert_eq!(reloads("success"), 1.0);
    let loaded_at = value(
        &http,
        "netwarden_config_last_reload_success_timestamp_seconds",
        &[],
    );
    assert!(loaded_at > 1.6e9, "{loaded_at}");

    let more = format!("{SPEC}    - name: second\n      table: 100\n      destination: 10.81.0.0/24\n      type: blackhole\n");
    config(dir.path(), &more);
    hup(&agent);
    agent.wait_log("config reloaded");
    wait_until("the new route", || {
        routes(&ns, "100")
            .iter()
            .any(|l| l.starts_with("blackhole 10.81.0.0/24"))
    });
    wait_metric(
        &http,
        "netwarden_resyncs_total",
        &[("reason", "config_change")],
        1.0,
        WAIT,
    );
    assert_eq!(reloads("success"), 2.0);

    std::fs::write(
        &cfg,
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  rules: [oops\n",
    )
    .unwrap();
    hup(&agent);
    agent.wait_log("config reload refused");
    wait_metric(
        &http,
        "netwarden_config_reloads_total",
        &[("result", "failure")],
        1.0,
        WAIT,
    );
    assert_eq!(
        value(&http, "netwarden_config_last_reload_successful", &[]),
        0.0
    );
    // The config in use stays: its objects are still protected.
    ns.ip(&["route", "del", "blackhole", "10.81.0.0/24", "table", "100"])
        .unwrap();
    wait_until("route of the kept config back", || {
        routes(&ns, "100")
            .iter()
            .any(|l| l.starts_with("blackhole 10.81.0.0/24"))
    });
}

/// The agent does not read back its own repairs: the kernel drops their notifications on the
/// agent's event socket (a socket filter on the sender's port), so a mass repair costs one event
/// per removal, not two.
#[test]
fn the_agent_does_not_hear_its_own_repairs() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let mut spec = String::from("  rules:\n");
    for i in 0..50 {
        spec.push_str(&format!(
            "    - {{name: r{i}, priority: {}, from: 10.1.{i}.0/24, table: 100}}\n",
            1000 + i
        ));
    }
    let agent = Agent::start(&ns, &config(dir.path(), &spec));
    let http = agent.http();
    let before = value(&http, EVENTS, &[]);
    let repaired = value(&http, REPAIRS, &[("kind", "rule"), ("result", "applied")]);
    let deletions: String = (0..50)
        .map(|i| format!("rule del priority {}\n", 1000 + i))
        .collect();
    ns.batch(&[], &deletions).unwrap();
    wait_until("all 50 rules back", || {
        rules(&ns)
            .iter()
            .filter(|l| l.contains("lookup 100"))
            .count()
            == 50
    });
    // The rules are in the kernel a moment before their repairs are counted: the sentinel's
    // count below must not be taken before these are.
    wait_metric(
        &http,
        REPAIRS,
        &[("kind", "rule"), ("result", "applied")],
        repaired + 50.0,
        T,
    );
    let read = events_read_through_sentinel(&ns, &http, before);
    // 51 removals; with its own 51 re-adds echoed back it would be 102.
    assert!((51.0..=60.0).contains(&read), "events read: {read}");
}

const EVENTS: &str = "netwarden_netlink_events_total";
const REPAIRS: &str = "netwarden_repairs_total";

/// Events the agent has read since `before` (its `netlink_events_total` then), up to and including
/// the removal of the protected rule of priority 1000: a sentinel, whose repair being counted
/// means every earlier event has been read (in order).
fn events_read_through_sentinel(ns: &Sandbox, http: &str, before: f64) -> f64 {
    let repairs = value(
        http,
        "netwarden_repairs_total",
        &[("kind", "rule"), ("result", "applied")],
    );
    ns.ip(&["rule", "del", "priority", "1000"]).unwrap();
    wait_metric(
        http,
        "netwarden_repairs_total",
        &[("kind", "rule"), ("result", "applied")],
        repairs + 1.0,
        T,
    );
    value(http, EVENTS, &[]) - before
}

/// Route notifications of tables the agent keeps no routes of are dropped by the event socket's
/// filter in the kernel: a big churning foreign table is not read at all.
#[test]
fn the_agent_does_not_hear_foreign_tables() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = "  rules:\n    - {name: r0, priority: 1000, from: 10.1.0.0/24, table: 100}\n  routes:\n    - {name: p0, table: 100, destination: 10.64.0.0/24, device: veth0}\n";
    let agent = Agent::start(&ns, &config(dir.path(), spec));
    let http = agent.http();
    let before = value(&http, EVENTS, &[]);
    let foreign: String = (0..1000)
        .map(|i| {
            format!(
                "route add 10.{}.{}.0/24 dev veth0 table 200\n",
                100 + i / 256,
                i % 256
            )
        })
        .collect();
    ns.batch(&[], &foreign).unwrap();
    // A protected route in the same batch of work: its table is heard.
    ns.ip(&["route", "del", "10.64.0.0/24", "table", "100"])
        .unwrap();
    wait_until("protected route back", || {
        ns.ip(&["route", "show", "table", "100"])
            .unwrap()
            .contains("10.64.0.0/24")
    });
    let read = events_read_through_sentinel(&ns, &http, before);
    // The route's and the rule's removals; with table 200 heard it would be over 1,000.
    assert!((2.0..=20.0).contains(&read), "events read: {read}");
}

/// The capability mask of `names` (`NET_ADMIN`, …) as /proc/PID/status prints it.
fn capability_mask(names: &[String]) -> u64 {
    names
        .iter()
        .map(|n| match n.as_str() {
            "DAC_READ_SEARCH" => 2,
            "NET_ADMIN" => 12,
            "NET_RAW" => 13,
            "SYS_PTRACE" => 19,
            other => panic!("capability {other}: add its number here"),
        })
        .fold(0, |m, bit| m | 1 << bit)
}

#[test]
fn the_deployed_agent_has_the_daemonsets_privileges_and_no_more() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start_with(&ns, &config(dir.path(), SPEC), &[]);
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("{name} in {status}"))
            .trim()
            .to_string()
    };
    let want = Privileges::of_daemonset();
    let mask = format!("{:016x}", capability_mask(&want.capabilities));
    for set in ["CapPrm:", "CapEff:", "CapBnd:"] {
        assert_eq!(field(set), mask, "{set}");
    }
    assert_eq!(field("CapInh:"), "0000000000000000");
    assert_eq!(field("CapAmb:"), "0000000000000000");
    assert_eq!(field("NoNewPrivs:"), "1");
    assert!(field("Uid:").starts_with(&format!("{}\t", want.uid)));
    // In the namespace from the start (hostNetwork), in the host's PID namespace (hostPID).
    let netns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap();
    let holder = std::fs::File::open(format!("/run/netns/{}", ns.name)).unwrap();
    let inode = std::os::unix::fs::MetadataExt::ino(&holder.metadata().unwrap());
    assert_eq!(
        netns(&agent.pid().to_string()).to_string_lossy(),
        format!("net:[{inode}]")
    );
    assert_eq!(
        std::fs::read_link(format!("/proc/{}/ns/pid", agent.pid())).unwrap(),
        std::fs::read_link("/proc/self/ns/pid").unwrap()
    );
    // And its endpoints answer through the rig's forwarder.
    assert_eq!(get(&agent.http(), "/readyz", None, T).unwrap().0, 200);
}

/// One protected rule per offender shape (priority 101…), so that the shapes' deletions, which
/// follow each other within milliseconds, are four objects' first removals and not one object's
/// fight (three removals of one object within 2 s make it contested, and its repair is then
/// held back and logged without the actor).
fn shape_rules(n: u32) -> String {
    (1..=n)
        .map(|i| {
            format!(
                "    - name: shape-{i}\n      priority: {}\n      from: 10.244.{i}.0/24\n      table: 77\n",
                100 + i
            )
        })
        .collect::<String>()
}

/// The `drift` debug line of the deletion of rule `rule` by `name`; returns its netlink port.
fn drift_port(agent: &mut Agent, rule: &str, name: &str) -> u32 {
    let line = agent.wait_log_all(&["drift", &format!("name={rule} "), &format!("actor={name}")]);
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("netlink_port=Some("))
        .and_then(|p| p.strip_suffix(')')?.parse().ok())
        .unwrap_or_else(|| panic!("no netlink_port in {line}"))
}

#[test]
fn as_deployed_another_uid_and_a_more_capable_root_are_named_through_any_socket() {
    use common::offender::{named_ip, Offender, Socket, Who};
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!("  rules:\n{}", shape_rules(4));
    let mut agent = Agent::start_with(&ns, &config(dir.path(), &spec), &[]);
    agent.wait_log("initial sync done");
    let unknown = |text: &str| {
        sample(
            text,
            "netwarden_drift_detected_total",
            &[("kind", "rule"), ("actor", "unknown")],
        )
    };
    let unknown_before = unknown(&scrape(&agent.http()));
    let cases = [
        ("nw-root-first", Who::Root, Socket::First),
        ("nw-root-later", Who::Root, Socket::Later),
        ("nw-uid-first", Who::network_user(), Socket::First),
        ("nw-uid-later", Who::network_user(), Socket::Later),
    ];
    for (i, (name, who, socket)) in (1..).zip(cases) {
        let (rule, line) = (
            format!("shape-{i}"),
            format!("{}: from 10.244.{i}.0/24 lookup 77", 100 + i),
        );
        wait_until("rule in place", || count(&rules(&ns), &line) == 1);
        let program = named_ip(dir.path(), name);
        let del = format!("rule del priority {}", 100 + i);
        let offender = Offender::batch(&ns.name, who, socket, &program, &del);
        // Named while it still holds the socket: no race with its exit.
        let port = drift_port(&mut agent, &rule, name);
        match socket {
            Socket::First => assert_eq!(port, offender.pid(), "{name}: port id = pid"),
            Socket::Later => assert_ne!(port, offender.pid(), "{name}: a later socket"),
        }
        agent.wait_log_all(&[
            "restored",
            &format!("names={rule} "),
            &format!("actor={name}"),
        ]);
        wait_until("rule restored", || count(&rules(&ns), &line) == 1);
    }
    let text = scrape(&agent.http());
    for (name, ..) in cases {
        assert_eq!(
            sample(
                &text,
                "netwarden_drift_detected_total",
                &[("kind", "rule"), ("actor", name)]
            ),
            Some(1.0),
            "{text}"
        );
    }
    assert_eq!(unknown(&text), unknown_before, "{text}");
}
