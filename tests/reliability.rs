//! Reliability (issue 8): crash safety (kill -9 in the middle of a mass repair), an event storm
//! that overruns the default-sized event socket, a state file that is corrupt or truncated, least
//! privilege (only CAP_NET_ADMIN and CAP_NET_RAW), and HTTP endpoints fed garbage.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Instant;

/// A plain HTTP/1.1 exchange over a fresh connection; returns the whole response ("" when the
/// server closed the connection without answering).
fn http_raw(addr: &str, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect to the agent's HTTP endpoints");
    s.set_read_timeout(Some(WAIT)).unwrap();
    s.set_write_timeout(Some(WAIT)).unwrap();
    // The server may close before reading all of a huge request: a write error is an answer too.
    let _ = s.write_all(request);
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    String::from_utf8_lossy(&out).into_owned()
}

fn get(addr: &str, path: &str) -> String {
    http_raw(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
    )
}

/// The value of an unlabelled sample in a Prometheus text exposition.
fn metric(body: &str, name: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no sample {name} in:\n{body}"))
}

const ROUTES: usize = 2000;

fn many_routes_spec() -> String {
    let mut spec = String::from("  routes:\n");
    for i in 0..ROUTES {
        spec.push_str(&format!(
            "    - name: r{i}\n      table: 100\n      destination: 10.{}.{}.0/24\n      device: veth0\n",
            100 + i / 250,
            i % 250
        ));
    }
    spec
}

/// kill -9 right after 2,000 protected routes were flushed, in the middle of their repair; the
/// restarted agent puts every one back, once.
#[test]
fn kill9_during_mass_repair_then_restart_converges() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), &many_routes_spec());
    let agent = Agent::start(&ns, &cfg);
    wait_until("all protected routes in place", || {
        routes(&ns, "100").len() == ROUTES
    });
    ns.ip(&["route", "flush", "table", "100"]).unwrap();
    let pid = nix::unistd::Pid::from_raw(agent.pid() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    let at_kill = routes(&ns, "100").len();
    drop(agent);
    eprintln!("routes present when the agent was killed: {at_kill} of {ROUTES}");
    let started = Instant::now();
    let _agent = Agent::start(&ns, &cfg);
    wait_until("every route back after the restart", || {
        routes(&ns, "100").len() == ROUTES
    });
    eprintln!("converged {:?} after the restart began", started.elapsed());
    let now = routes(&ns, "100");
    let mut unique = now.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), ROUTES, "duplicates: {now:?}");
}

/// Every prefix of a valid state file, and garbage, is a clear error naming the file: never a
/// panic, never a half-read state.
#[test]
fn truncated_or_corrupt_state_files_are_clear_errors() {
    use netwarden::cluster::statefile;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    let saved = statefile::Saved {
        version: statefile::VERSION,
        source: "ConfigMap kube-system/netwarden key config.yaml".into(),
        config: "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec: {}\n".into(),
        facts: Default::default(),
        written_at: 1,
        boot_id: statefile::boot_id(),
        netns: Some("4:4026531840".into()),
    };
    statefile::write(&path, &saved).unwrap();
    assert_eq!(statefile::read(&path).unwrap(), Some(saved));
    let full = std::fs::read(&path).unwrap();
    // No temporary file is left next to it.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    for cut in 0..full.len() {
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = statefile::read(&path).expect_err("a truncated file is an error");
        let text = e.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
    }
    for garbage in [
        &b"\x00\xff\xfe"[..],
        b"[]",
        b"{\"version\": \"1\"}",
        b"null",
    ] {
        std::fs::write(&path, garbage).unwrap();
        let e = statefile::read(&path).expect_err("garbage is an error");
        assert!(e.to_string().starts_with("state file"), "{e}");
    }
}

const RULE: &str = "100: from 10.244.1.0/24 lookup 77";

fn rule_spec() -> &'static str {
    "  rules:\n    - name: pods-to-overlay\n      priority: 100\n      from: 10.244.1.0/24\n      table: 77\n"
}

/// An event storm with the default (64 MiB) event buffer: while the agent is stopped, 200,000
/// route events pile up (100,000 foreign routes added and removed) and a protected rule is
/// removed; once thawed it notices the overrun, re-reads, puts the rule back, and counts it.
/// The storm is in table 200, where a route is protected: the event socket's filter drops the
/// notifications of tables the agent keeps no routes of, which would not fill it.
#[test]
fn event_storm_overruns_the_default_buffer_and_the_agent_converges() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "{}  routes:\n    - {{name: heard, table: 200, destination: 10.255.0.0/24, device: veth0}}\n",
        rule_spec()
    );
    let mut agent = Agent::start(&ns, &config(dir.path(), &spec));
    let addr = agent.http();
    assert_eq!(
        metric(&get(&addr, "/metrics"), "netwarden_netlink_overruns_total"),
        0.0
    );
    agent.freeze(true);
    let n = 100_000;
    let add: String = (0..n)
        .map(|i| {
            format!(
                "route add 10.{}.{}.{}/32 dev veth0 table 200\n",
                150 + i / 62500,
                (i / 250) % 250,
                i % 250
            )
        })
        .collect();
    ns.batch(&[], &add).unwrap();
    ns.batch(&[], &add.replace("route add", "route del"))
        .unwrap();
    ns.ip(&[
        "rule",
        "del",
        "priority",
        "100",
        "from",
        "10.244.1.0/24",
        "table",
        "77",
    ])
    .unwrap();
    assert_eq!(count(&rules(&ns), RULE), 0);
    agent.freeze(false);
    agent.wait_log("socket overrun");
    wait_until("rule back after the re-read", || {
        count(&rules(&ns), RULE) == 1
    });
    let body = get(&addr, "/metrics");
    assert!(
        metric(&body, "netwarden_netlink_overruns_total") >= 1.0,
        "{body}"
    );
    assert_eq!(
        routes(&ns, "200"),
        ["10.255.0.0/24 dev veth0 scope link"],
        "the storm's routes are gone, the protected one is there"
    );
}

/// The DaemonSet without its attribution capabilities (SYS_PTRACE, DAC_READ_SEARCH): only
/// CAP_NET_ADMIN and CAP_NET_RAW, as docs/operator-guide.md ("Privileges") says an operator may
/// run it. The agent still repairs a deleted rule and restores a chain through
/// iptables-restore; only the names of some actors are lost.
#[test]
fn works_with_only_net_admin_and_net_raw() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = format!(
        "{}  chains:\n    - name: guard-chain\n      table: filter\n      chain: NW-GUARD\n      rules:\n        - \"-s 10.9.0.0/16 -j DROP\"\n",
        rule_spec()
    );
    let cfg = config(dir.path(), &spec);
    let minimal = Privileges::of_daemonset().without(&["SYS_PTRACE", "DAC_READ_SEARCH"]);
    let mut agent = Agent::start_shaped(&Shape::Deployed(minimal), &ns, &cfg, &[], &[]);
    // It really runs with only those two capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid())).unwrap();
    let eff = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .unwrap()
        .trim();
    // CAP_NET_ADMIN = 12, CAP_NET_RAW = 13.
    assert_eq!(u64::from_str_radix(eff, 16).unwrap(), (1 << 12) | (1 << 13));
    assert_eq!(count(&rules(&ns), RULE), 1);
    ns.ip(&[
        "rule",
        "del",
        "priority",
        "100",
        "from",
        "10.244.1.0/24",
        "table",
        "77",
    ])
    .unwrap();
    agent.wait_log_all(&["restored", "rules=1"]);
    wait_until("rule repaired by the unprivileged agent", || {
        count(&rules(&ns), RULE) == 1
    });
    let iptables = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(["netns", "exec", &ns.name, "iptables"])
            .args(args)
            .output()
            .unwrap()
    };
    let chain = || String::from_utf8_lossy(&iptables(&["-S", "NW-GUARD"]).stdout).into_owned();
    wait_until("chain in place", || {
        chain().contains("-s 10.9.0.0/16 -j DROP")
    });
    assert!(iptables(&["-F", "NW-GUARD"]).status.success());
    agent.wait_log_all(&["restored", "names=guard-chain"]);
    wait_until("chain restored by the unprivileged agent", || {
        chain().contains("-s 10.9.0.0/16 -j DROP")
    });
    assert_eq!(agent.exited(), None, "the agent died");
}

/// The HTTP endpoints are read-only and survive garbage: raw bytes, a huge header, a request
/// line without end, POST; /healthz still answers afterwards.
#[test]
fn http_endpoints_survive_garbage() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(&ns, &config(dir.path(), rule_spec()));
    let addr = agent.http();
    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
        .collect();
    let answer = http_raw(&addr, &garbage);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 400"),
        "{answer}"
    );
    let huge = format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(1 << 20)
    );
    let answer = http_raw(&addr, huge.as_bytes());
    assert!(
        !answer.starts_with("HTTP/1.1 200"),
        "a 1 MiB header was accepted"
    );
    let answer = http_raw(
        &addr,
        b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert!(answer.starts_with("HTTP/1.1 405"), "{answer}");
    for m in ["PUT", "DELETE", "PATCH"] {
        let answer = http_raw(
            &addr,
            format!("{m} /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        );
        assert!(answer.starts_with("HTTP/1.1 405"), "{m}: {answer}");
    }
    // Half a request, then the client goes away.
    drop(TcpStream::connect(&addr).unwrap().write_all(b"GET /metr"));
    // Many connections opened and dropped.
    for _ in 0..200 {
        drop(TcpStream::connect(&addr).unwrap());
    }
    let answer = get(&addr, "/healthz");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(get(&addr, "/metrics").contains("netwarden_"));
}

/// With a big foreign table beside the protected one, a route re-dump (address removed, link
/// down, resync, overrun) reads only the protected table: the kernel filters
/// (NETLINK_GET_STRICT_CHK and RTA_TABLE in the request), so its cost does not grow with the
/// foreign table. Without the filter the dump would read all 2,000 foreign routes.
#[test]
fn route_redumps_read_only_the_protected_tables() {
    use netwarden::model::{Family, RouteKey};
    use netwarden::observe::kernel;
    use netwarden::observe::{Mirror, RouteInterest};
    let ns = sandbox();
    let mut batch = String::new();
    for i in 0..ROUTES {
        batch.push_str(&format!(
            "route add 10.{}.{}.0/24 dev veth0 table 200\n",
            100 + i / 256,
            i % 256
        ));
    }
    ns.batch(&[], &batch).unwrap();
    ns.ip(&[
        "route",
        "add",
        "10.64.0.0/24",
        "dev",
        "veth0",
        "table",
        "100",
    ])
    .unwrap();
    ns.ip(&[
        "-6",
        "route",
        "add",
        "fd00:64::/64",
        "dev",
        "veth0",
        "table",
        "100",
    ])
    .unwrap();
    let name = ns.name.clone();
    let (all, filtered, v4, mirrored) = std::thread::spawn(move || {
        netwarden::netns::enter(&name).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut handle = kernel::connect().unwrap();
            let protected = RouteKey::new(Family::Ipv4, 100, "10.64.0.0/24".parse().unwrap(), None);
            let mut everything = Mirror::new(RouteInterest::All);
            let all = kernel::dump_routes(&mut handle, &mut everything, None)
                .await
                .unwrap();
            let mut mirror = Mirror::new(RouteInterest::Keys(
                std::iter::once(protected.clone()).collect(),
            ));
            let filtered = kernel::dump_routes(&mut handle, &mut mirror, None)
                .await
                .unwrap();
            // One family: the other family's table 100 is not asked for.
            let v4 = kernel::dump_routes(&mut handle, &mut mirror, Some(Family::Ipv4))
                .await
                .unwrap();
            (all, filtered, v4, mirror.routes.contains_key(&protected))
        })
    })
    .join()
    .unwrap();
    assert!(all > ROUTES, "a full dump reads every route: {all}");
    assert_eq!(filtered, 2, "table 100 holds one IPv4 and one IPv6 route");
    assert_eq!(v4, 1);
    assert!(mirrored, "the protected route is in the mirror");
}
