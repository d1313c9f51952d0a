//! What reaches the agent from outside its config: the adopted-state file (stale after a config
//! change, or corrupt), names the kernel holds, and input that never ends.

mod common;
use common::*;
use netwarden::telemetry::http;
use std::time::Duration;

const T: Duration = Duration::from_secs(5);

fn eni(routes: &str) -> String {
    format!("  adopt:\n    - name: eni\n      routes:\n        table: 100\n{routes}      owners: [aws-k8s-agent]\n")
}

fn saved_routes(path: &std::path::Path) -> Vec<String> {
    let mut v: Vec<String> = netwarden::adopted_state::read(path)
        .map(|s| {
            s.routes
                .iter()
                .map(|r| r.route.key.destination.to_string())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn a_selector_narrowed_while_the_agent_was_down_does_not_bring_back_what_it_no_longer_covers() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("adopted.json");
    let state_arg = state.to_str().unwrap();
    let cfg = config(dir.path(), &eni(""));
    for (dst, proto) in [("10.1.2.0/24", "boot"), ("10.1.3.0/24", "static")] {
        ns.ip(&[
            "route", "add", dst, "dev", "veth0", "table", "100", "proto", proto,
        ])
        .unwrap();
    }
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    wait_until("both routes adopted and saved", || {
        saved_routes(&state) == ["10.1.2.0/24", "10.1.3.0/24"]
    });
    assert!(agent.terminate());
    drop(agent);
    // Removed while the agent is down; then the selector is narrowed to protocol static.
    for dst in ["10.1.2.0/24", "10.1.3.0/24"] {
        ns.ip(&["route", "del", dst, "table", "100"]).unwrap();
    }
    config(dir.path(), &eni("        protocols: [static]\n"));
    let _agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    // The initial sync put back what the selector still covers, and only that.
    let table = routes(&ns, "100");
    assert!(
        table.iter().any(|r| r.starts_with("10.1.3.0/24")),
        "{table:?}"
    );
    assert!(
        !table.iter().any(|r| r.starts_with("10.1.2.0/24")),
        "a route the selector no longer covers came back: {table:?}"
    );
    wait_until("the file follows the narrowed selector", || {
        saved_routes(&state) == ["10.1.3.0/24"]
    });
}

#[test]
fn a_corrupt_adopted_state_file_is_kept_aside_and_reported() {
    let ns = sandbox();
    ns.ip(&[
        "route",
        "add",
        "10.1.3.0/24",
        "dev",
        "veth0",
        "table",
        "100",
        "proto",
        "static",
    ])
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("adopted.json");
    let garbage = b"{\"version\": 1, \"rules\": [ {\"selector\": \"eni\n\x1b[31m";
    std::fs::write(&state, garbage).unwrap();
    let cfg = config(dir.path(), &eni(""));
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state.to_str().unwrap()]);
    let line = agent.wait_log("unusable state file set aside");
    assert!(line.contains("file=\"adopted_state\""), "{line}");
    let kept: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("adopted.json.corrupt-")
        })
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(std::fs::read(&kept[0]).unwrap(), garbage);
    assert!(line.contains(&kept[0].display().to_string()), "{line}");
    let (_, metrics) = http::get(&agent.http(), "/metrics", None, T).unwrap();
    assert!(
        metrics.contains("netwarden_state_files_set_aside_total{file=\"adopted_state\"} 1\n"),
        "{metrics}"
    );
    // The agent goes on with a fresh file.
    wait_until("a new adopted-state file", || {
        saved_routes(&state) == ["10.1.3.0/24"]
    });
}

#[test]
fn names_from_the_kernel_cannot_forge_or_recolour_log_lines() {
    let ns = sandbox();
    // An interface name may hold an escape sequence (the kernel refuses only '/', ':' and
    // white space); a route on it differs from the protected one, observed and logged.
    let hostile = "nw\x1b[31mX";
    ns.ip(&[
        "link", "add", hostile, "type", "veth", "peer", "name", "nwpeer",
    ])
    .unwrap();
    ns.ip(&["link", "set", hostile, "up"]).unwrap();
    ns.ip(&["route", "add", "10.9.0.0/24", "dev", hostile, "table", "77"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "  routes:\n    - name: observed\n      mode: observe\n      table: 77\n      destination: 10.9.0.0/24\n      device: veth0\n",
    );
    let mut agent = Agent::start(&ns, &cfg);
    let line = agent.wait_log("drift: different");
    assert!(line.contains("nw\\u{1b}[31mX"), "{line:?}");
    let log = agent.log.lock().unwrap().clone();
    assert!(
        log.iter().all(|l| !l.contains('\x1b')),
        "a raw escape byte in the log: {log:?}"
    );
}

#[test]
fn a_config_that_never_ends_is_refused_with_a_clear_error() {
    let out = netwarden(&["validate", "/dev/zero"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("/dev/zero: the config is larger than 16777216 bytes"),
        "{stderr}"
    );
    // The same on standard input.
    let out = std::process::Command::new(BIN)
        .args(["validate", "-"])
        .stdin(std::fs::File::open("/dev/zero").unwrap())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("<stdin>: the config is larger than 16777216 bytes"),
        "{stderr}"
    );
}
