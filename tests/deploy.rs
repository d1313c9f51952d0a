//! The files under deploy/: the Prometheus alerting rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`), and every netwarden metric that the alerts and the Grafana
//! dashboard query is one the agent exports.

use netwarden::obs::metrics::exported_names;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy")
        .join(path)
}

fn promtool(args: &[&str], dir: &Path) {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("promtool (Debian package prometheus; `make deps` installs it)");
    assert!(
        out.status.success(),
        "promtool {args:?}:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn alert_rules_pass_promtool_checks_and_unit_tests() {
    let dir = deploy("prometheus");
    promtool(&["check", "rules", "alerts.yaml"], &dir);
    promtool(&["test", "rules", "alerts_test.yaml"], &dir);
}

/// The `netwarden_…` identifiers in a PromQL expression (metric names; label names and values
/// never start with the prefix here).
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let mut word = String::new();
    let mut in_string = false;
    for c in expr.chars().chain(std::iter::once(' ')) {
        if c == '"' {
            in_string = !in_string;
            word.clear();
            continue;
        }
        if in_string {
            continue;
        }
        if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
            word.push(c);
        } else {
            if word.starts_with("netwarden_") {
                names.insert(word.clone());
            }
            word.clear();
        }
    }
    names
}

#[test]
fn metric_names_are_found_in_promql() {
    let e = r#"histogram_quantile(0.99, sum by (le) (rate(netwarden_repair_duration_seconds_bucket{job="netwarden_x"}[5m]))) / netwarden_ready"#;
    assert_eq!(
        metric_names(e).into_iter().collect::<Vec<_>>(),
        [
            "netwarden_ready",
            "netwarden_repair_duration_seconds_bucket"
        ]
    );
}

fn check(what: &str, exprs: &[String]) {
    let exported = exported_names();
    let mut used = BTreeSet::new();
    for e in exprs {
        used.extend(metric_names(e));
    }
    assert!(!used.is_empty(), "{what}: no netwarden metric found");
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "{what} queries metrics the agent does not export: {missing:?}\nexported: {exported:?}"
    );
}

/// Every string value under a key named `key`, anywhere in a JSON document.
fn strings_under(v: &serde_json::Value, key: &str, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match v {
                    serde_json::Value::String(s) if k == key => out.push(s.clone()),
                    _ => strings_under(v, key, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| strings_under(v, key, out)),
        _ => {}
    }
}

#[test]
fn the_dashboard_queries_only_exported_metrics() {
    let text = std::fs::read_to_string(deploy("grafana/netwarden.json")).unwrap();
    let dash: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let mut exprs = Vec::new();
    strings_under(&dash, "expr", &mut exprs);
    strings_under(&dash, "definition", &mut exprs);
    assert!(exprs.len() >= 15, "panels lost their queries? {exprs:?}");
    check("the dashboard", &exprs);
    // Every panel has a query and a unique id.
    let panels = dash["panels"].as_array().unwrap();
    let ids: BTreeSet<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
    assert_eq!(ids.len(), panels.len());
    assert!(panels
        .iter()
        .all(|p| !p["targets"].as_array().unwrap().is_empty()));
}

#[test]
fn the_alerts_query_only_exported_metrics() {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).unwrap();
    let rules: serde_json::Value = serde_saphyr::from_str(&text).expect("alerts YAML");
    let mut exprs = Vec::new();
    strings_under(&rules, "expr", &mut exprs);
    assert!(exprs.len() >= 5);
    check("the alerts", &exprs);
}
