//! The files under deploy/: the Prometheus alerting rules pass `promtool check rules` and their
//! unit tests (`promtool test rules`), and every netwarden metric that the alerts and the Grafana
//! dashboard query is one the agent exports.

use netwarden::telemetry::metrics::exported_names;
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

/// The `netwarden_…` and `process_…` identifiers in a PromQL expression (metric names; label
/// names and values never start with those prefixes here).
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
            if word.starts_with("netwarden_") || word.starts_with("process_") {
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
    // job, cluster and node are variables, and every panel query selects by them: nothing is
    // tied to one job name or one cluster.
    let vars: BTreeSet<&str> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap())
        .collect();
    for v in ["datasource", "job", "cluster", "node", "instance"] {
        assert!(vars.contains(v), "no ${v} variable: {vars:?}");
    }
    let mut panel_exprs = Vec::new();
    strings_under(&dash["panels"], "expr", &mut panel_exprs);
    for e in &panel_exprs {
        assert!(!e.contains(r#"job="netwarden""#), "hard-coded job: {e}");
        for m in metric_names(e) {
            for label in ["job", "cluster", "node", "instance"] {
                let sel = format!(r#"{label}=~"${label}""#);
                assert!(
                    e.contains(&format!("{m}{{")) && e.contains(&sel),
                    "{m} without {sel}: {e}"
                );
            }
        }
    }
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

/// Where the alerts' runbook links point: docs/ in the repository.
const RUNBOOK_BASE: &str = "https://github.com/netwarden/netwarden/blob/main/";

/// The anchors GitHub gives the headings of a Markdown file: lower case, punctuation dropped
/// (but `-` and `_`), spaces to `-`.
fn heading_anchors(markdown: &str) -> BTreeSet<String> {
    let mut anchors = BTreeSet::new();
    let mut in_code = false;
    for line in markdown.lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code || !line.starts_with('#') {
            continue;
        }
        let text = line.trim_start_matches('#').trim();
        let slug: String = text
            .to_lowercase()
            .chars()
            .filter_map(|c| match c {
                ' ' => Some('-'),
                c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
                _ => None,
            })
            .collect();
        anchors.insert(slug);
    }
    anchors
}

/// Resolves `docs/FILE.md#anchor` (relative to the repository): Err says what is missing.
fn resolve(path_and_anchor: &str) -> Result<(), String> {
    let (path, anchor) = path_and_anchor
        .split_once('#')
        .ok_or_else(|| format!("{path_and_anchor}: no #anchor"))?;
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    let text = std::fs::read_to_string(&file).map_err(|e| format!("{path}: {e}"))?;
    if heading_anchors(&text).contains(anchor) {
        Ok(())
    } else {
        Err(format!("{path} has no heading with the anchor #{anchor}"))
    }
}

#[test]
fn heading_anchors_are_githubs() {
    let a = heading_anchors("# Runbooks\n## NetwardenDown\n```\n# not a heading\n```\n## 1. A networkd restart (k0s + kube-router, Ubuntu 24.04)\n");
    assert_eq!(
        a,
        BTreeSet::from([
            "runbooks".to_owned(),
            "netwardendown".to_owned(),
            "1-a-networkd-restart-k0s--kube-router-ubuntu-2404".to_owned(),
        ])
    );
}

#[test]
fn every_alert_has_a_runbook_link_that_resolves() {
    let text = std::fs::read_to_string(deploy("prometheus/alerts.yaml")).unwrap();
    let rules: serde_json::Value = serde_saphyr::from_str(&text).expect("alerts YAML");
    let mut alerts = 0;
    for group in rules["groups"].as_array().unwrap() {
        for rule in group["rules"].as_array().unwrap() {
            let Some(name) = rule["alert"].as_str() else {
                continue;
            };
            alerts += 1;
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_else(|| panic!("{name} has no runbook_url"));
            let path = url
                .strip_prefix(RUNBOOK_BASE)
                .unwrap_or_else(|| panic!("{name}: {url} is not under {RUNBOOK_BASE}"));
            assert!(path.starts_with("docs/"), "{name}: {url}");
            resolve(path).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }
    assert!(alerts >= 8, "{alerts} alerts");
    // The check can fail: an anchor that no heading has.
    assert!(resolve("docs/runbooks.md#netwardennosuchalert").is_err());
    assert!(resolve("docs/nosuchfile.md#x").is_err());
}

#[test]
fn links_between_the_docs_resolve() {
    let docs = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs");
    for entry in std::fs::read_dir(&docs).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "md") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let name = path.file_name().unwrap().to_str().unwrap();
        for (i, _) in text.match_indices("](") {
            let rest = &text[i + 2..];
            let Some(end) = rest.find(')') else { continue };
            let link = &rest[..end];
            if link.starts_with("http") || !link.contains('#') {
                continue;
            }
            let target = match link.split_once('#') {
                Some(("", anchor)) => format!("docs/{name}#{anchor}"),
                Some((file, anchor)) if file.ends_with(".md") && !file.contains('/') => {
                    format!("docs/{file}#{anchor}")
                }
                _ => continue,
            };
            resolve(&target).unwrap_or_else(|e| panic!("docs/{name}: link {link}: {e}"));
        }
    }
}
