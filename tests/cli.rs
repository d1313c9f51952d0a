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
        let out = netwarden(&["run", "--config", f, "--netns", &ns.name]);
        assert_eq!(out.status.code(), Some(2), "run {f}");
        let out = netwarden(&["check", "--config", f, "--netns", &ns.name]);
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
    let left = netwarden::sandbox::run_ip(&["netns", "list"]).unwrap();
    assert!(!left.contains(name), "sandbox {name} left behind");
}
