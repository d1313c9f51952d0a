//! The command line: bad configs are refused with exit 2 and change nothing; the demo runs.

mod common;
use common::*;
use std::path::PathBuf;

fn invalid_configs() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/configs/invalid");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 8,
        "expected one invalid config per class, found {}",
        files.len()
    );
    files
}

#[test]
fn validate_refuses_each_invalid_config_with_file_and_line() {
    for file in invalid_configs() {
        let out = netwarden(&["validate", file.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{}: {stderr}", file.display());
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(
            stderr.contains(name),
            "{name}: error does not name the file: {stderr}"
        );
        if name != "empty.yaml" {
            // file:line:column: …
            let after = stderr.split(name).nth(1).unwrap_or("");
            assert!(
                after.starts_with(':') && after[1..].starts_with(|c: char| c.is_ascii_digit()),
                "{name}: error does not name a line: {stderr}"
            );
        }
    }
}

#[test]
fn run_and_check_with_an_invalid_config_change_nothing() {
    let ns = sandbox();
    let before = snapshot(&ns);
    for file in invalid_configs() {
        let f = file.to_str().unwrap();
        let out = netwarden_in(&ns, &["run", "--config", f]);
        assert_eq!(out.status.code(), Some(2), "run {f}");
        let out = netwarden_in(&ns, &["check", "--config", f]);
        assert_eq!(out.status.code(), Some(2), "check {f}");
    }
    assert_eq!(snapshot(&ns), before);
}

#[test]
fn example_config_is_valid() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(netwarden::demo::EXAMPLE_PATH);
    let out = netwarden(&["validate", example.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = netwarden::config::load(&example).unwrap();
    assert_eq!(
        (cfg.rules.len(), cfg.routes.len(), cfg.addresses.len()),
        (3, 3, 1)
    );
}

/// As root, on purpose: `--netns` itself is what is tested (a name that is not there).
#[test]
fn unknown_namespace_is_an_error() {
    let example = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(netwarden::demo::EXAMPLE_PATH);
    let out = netwarden(&[
        "check",
        "--config",
        example.to_str().unwrap(),
        "--netns",
        "nw-test-does-not-exist",
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("nw-test-does-not-exist"));
}

#[test]
fn demo_restores_everything_and_cleans_up() {
    let out = netwarden(&["demo"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("all 7 protected objects back"), "{stdout}");
    assert!(stdout.contains("check: in sync"), "{stdout}");
    let name = stdout
        .split_whitespace()
        .find(|w| w.starts_with("netwarden-demo-"))
        .expect("sandbox name in the report");
    let left = netwarden::testing::sandbox::run_ip(&["netns", "list"]).unwrap();
    assert!(!left.contains(name), "sandbox {name} left behind");
}

fn example() -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(netwarden::demo::EXAMPLE_PATH)
        .display()
        .to_string()
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the binary with standard input from `input`.
fn netwarden_stdin(args: &[&str], input: &str, env: &[(&str, &str)]) -> std::process::Output {
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(args);
    with_stdin(cmd, input, env)
}

/// Runs `cmd` with standard input from `input`.
fn with_stdin(
    mut cmd: std::process::Command,
    input: &str,
    env: &[(&str, &str)],
) -> std::process::Output {
    use std::io::Write;
    let mut child = cmd
        .envs(env.iter().copied())
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn check_json_is_one_documented_document_and_o_is_short_for_output() {
    let ns = sandbox();
    let ex = example();
    let args = ["check", "--config", &ex];
    let long = netwarden_in(&ns, &[&args[..], &["--output", "json"]].concat());
    let short = netwarden_in(&ns, &[&args[..], &["-o", "json"]].concat());
    // Nothing of the example is in the sandbox: drift.
    assert_eq!(long.status.code(), Some(1), "{}", stderr(&long));
    assert_eq!(short.status.code(), Some(1), "{}", stderr(&short));
    let doc: serde_json::Value = serde_json::from_slice(&short.stdout).unwrap();
    let again: serde_json::Value = serde_json::from_slice(&long.stdout).unwrap();
    assert_eq!(doc, again);
    assert_eq!(doc["apiVersion"], "netwarden.io/v1alpha1");
    assert_eq!(doc["kind"], "CheckReport");
    assert_eq!(doc["inSync"], false);
    assert_eq!(
        doc["protected"],
        serde_json::json!({
            "rules": 3, "routes": 3, "addresses": 1, "chains": 0, "ipsets": 0,
            "neighbours": 0, "fdb": 0, "links": 0, "sysctls": 0
        })
    );
    for item in doc["drift"].as_array().unwrap() {
        for key in ["kind", "name", "object", "mode", "state", "detail"] {
            assert!(item.get(key).is_some(), "{key} missing in {item}");
        }
    }
    // The table's first line counts every kind.
    let table = netwarden_in(&ns, &args);
    let first = String::from_utf8_lossy(&table.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    assert!(
        first.ends_with("of 7 protected objects: 3 rules, 3 routes, 1 address, 0 chains, 0 ipsets"),
        "{first}"
    );
}

/// A reader that stops early (`netwarden check -o json | head`): no panic, no error message,
/// the command's own exit code.
#[test]
fn a_closed_pipe_is_a_quiet_exit() {
    let ns = sandbox();
    let ex = example();
    let closed = || {
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        writer
    };
    for (args, code) in [
        (vec!["check", "--config", &ex, "-o", "json"], 1),
        (vec!["check", "--config", &ex], 1),
        (vec!["validate", &ex], 0),
        (vec!["snapshot", "--tables", "main"], 0),
    ] {
        let out = one_shot(&ns, &args).stdout(closed()).output().unwrap();
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(
            !err.contains("panicked") && !err.contains("Broken pipe"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn an_invalid_log_level_is_an_error_and_rust_log_is_honoured() {
    let ex = example();
    let out = netwarden(&["--log-level", "verbose", "validate", &ex]);
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("verbose"), "{}", stderr(&out));
    for (var, value) in [("RUST_LOG", "infoo"), ("NETWARDEN_LOG_LEVEL", "loud")] {
        let out = netwarden_stdin(&["validate", &ex], "", &[(var, value)]);
        assert_eq!(out.status.code(), Some(2), "{var}={value}");
        assert!(stderr(&out).contains(value), "{}", stderr(&out));
    }
    // The snapshot's warning (no selector) is at warn: RUST_LOG=error hides it, --log-level wins
    // over RUST_LOG, and without either it shows (info).
    let ns = sandbox();
    let snap = ["snapshot"];
    let warned = |out: &std::process::Output| stderr(out).contains("no selector given");
    assert!(warned(&with_stdin(one_shot(&ns, &snap), "", &[])));
    assert!(!warned(&with_stdin(
        one_shot(&ns, &snap),
        "",
        &[("RUST_LOG", "error")]
    )));
    let args = [&["--log-level", "warn"][..], &snap[..]].concat();
    assert!(warned(&with_stdin(
        one_shot(&ns, &args),
        "",
        &[("RUST_LOG", "error")]
    )));
}

#[test]
fn validate_reads_standard_input() {
    let text = std::fs::read_to_string(example()).unwrap();
    let out = netwarden_stdin(&["validate", "-"], &text, &[]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("<stdin>: valid: 3 rules"));
    let bad = text.replacen("table:", "tabel:", 1);
    let out = netwarden_stdin(&["validate", "-"], &bad, &[]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with("netwarden: <stdin>:"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn validate_accepts_a_configmap_manifest() {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples/kube-router/configmap.yaml");
    let out = netwarden(&["validate", manifest.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout)
            .contains("ConfigMap netwarden/netwarden data.config.yaml: 3 objects with templates"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    // An error names the line of the manifest.
    let text = std::fs::read_to_string(&manifest).unwrap();
    let line = text.lines().position(|l| l.trim() == "table: 77").unwrap() + 1;
    let out = netwarden_stdin(
        &["validate", "-"],
        &text.replace("table: 77", "tabel: 77"),
        &[],
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).starts_with(&format!("netwarden: <stdin>:{line}:")),
        "line {line}: {}",
        stderr(&out)
    );
}

#[test]
fn snapshot_defaults_are_safe_to_enforce() {
    let ns = sandbox();
    must(&ns, &["iptables-nft", "-t", "nat", "-N", "NW-SNAP"]);
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "NW-SNAP",
            "-d",
            "10.9.0.0/16",
            "-j",
            "RETURN",
        ],
    );
    must(&ns, &["ipset", "create", "nw-snap", "hash:ip"]);
    must(&ns, &["ipset", "add", "nw-snap", "10.9.0.1"]);
    let base = [
        "snapshot",
        "--iptables-backend",
        "nft",
        "--chains",
        "NW-SNAP",
        "--sets",
        "nw-snap",
        "--tables",
        "main",
    ];
    let out = netwarden_in(&ns, &base);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let cfg = netwarden::config::parse("snapshot", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
    assert_eq!(cfg.mode, netwarden::model::Mode::Enforce);
    assert!(
        yaml.contains("content: contains") && !yaml.contains("content: exact"),
        "{yaml}"
    );
    assert!(
        yaml.contains("membership: contains") && !yaml.contains("membership: exact"),
        "{yaml}"
    );
    // The sandbox's prefix route: its scope by name, as `ip route` prints it.
    assert!(yaml.contains("scope: link"), "{yaml}");
    assert!(!yaml.contains("scope: 253"), "{yaml}");

    let args = [
        &base[..],
        &[
            "--mode",
            "observe",
            "--content",
            "exact",
            "--membership",
            "exact",
        ],
    ]
    .concat();
    let out = netwarden_in(&ns, &args);
    let yaml = String::from_utf8_lossy(&out.stdout).into_owned();
    let cfg = netwarden::config::parse("snapshot", &yaml).unwrap();
    assert_eq!(cfg.mode, netwarden::model::Mode::Observe);
    assert!(
        yaml.contains("content: exact") && yaml.contains("membership: exact"),
        "{yaml}"
    );

    // No selector: a warning, and a config that says it protects nothing.
    let out = netwarden_in(&ns, &["snapshot"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("no selector given"),
        "{}",
        stderr(&out)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("nothing is protected"));
}

/// As root with `--netns`, on purpose: what `--netns` itself does (enter the namespace before
/// looking) is what is tested. Each command there sees what it sees started inside the
/// namespace with the DaemonSet's privileges, as everywhere else in the tests: a snapshot of
/// the namespace's table 77, in sync for `check`, present for `networkd`.
#[test]
fn with_netns_a_command_sees_what_it_sees_inside_the_namespace() {
    let ns = sandbox();
    ns.ip(&["rule", "add", "priority", "100", "table", "77"])
        .unwrap();
    ns.ip(&["route", "add", "10.9.0.0/24", "dev", "veth0", "table", "77"])
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("snapshot.yaml");
    let cfg = snap.to_str().unwrap();
    let empty = tempfile::tempdir().unwrap();
    let root = empty.path().to_str().unwrap();
    let why = "`--netns` is what is tested";
    for (args, code) in [
        (
            vec!["snapshot", "--tables", "77", "--priorities", "100-100"],
            0,
        ),
        (vec!["check", "--config", cfg, "-o", "json"], 0),
        (
            vec!["networkd", "--config", cfg, "--root", root, "-o", "json"],
            0,
        ),
    ] {
        let inside = netwarden_in(&ns, &args);
        let as_root = netwarden_as_root_because(why, &ns, &args);
        assert_eq!(
            inside.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&inside)
        );
        assert_eq!(
            as_root.status.code(),
            Some(code),
            "{args:?}: {}",
            stderr(&as_root)
        );
        // A snapshot's first line repeats its command line.
        let body = |out: &std::process::Output| {
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.lines()
                .filter(|l| !l.starts_with("# Protects what was live"))
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(body(&as_root), body(&inside), "{args:?}");
        if args[0] == "snapshot" {
            let yaml = body(&inside);
            assert!(
                yaml.contains("destination: '10.9.0.0/24'") && yaml.contains("priority: 100"),
                "{yaml}"
            );
            std::fs::write(&snap, yaml).unwrap();
        }
        if args[0] == "networkd" {
            let json: serde_json::Value = serde_json::from_slice(&inside.stdout).unwrap();
            assert_eq!(json["missing"], 0, "{json:#}");
        }
    }
}

/// `--netns` in the agent's pod (here: the deployed shape, which can open the name): entering a
/// namespace needs CAP_SYS_ADMIN, which the DaemonSet does not grant. The error says so and what
/// to do instead, once.
#[test]
fn netns_without_cap_sys_admin_says_what_to_do() {
    let ns = sandbox();
    for args in [
        vec!["snapshot", "--tables", "main", "--netns", &ns.name],
        vec!["check", "--config", &example(), "--netns", &ns.name],
    ] {
        let out = netwarden_in(&ns, &args);
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
        assert!(
            err.contains("needs CAP_SYS_ADMIN") && err.contains("leave out --netns"),
            "{err}"
        );
        assert_eq!(err.matches("Operation not permitted").count(), 1, "{err}");
    }
}
