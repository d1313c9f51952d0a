//! The real offenders of the incidents, run inside a test's namespace: systemd-networkd
//! ([`networkd`]), bird ([`bird`]); an outage meter on an independent netlink listener
//! ([`outage`]); and the agent's HTTP endpoints read as a test reads them.
#![allow(dead_code)] // each test binary (and the networkd bench) uses its own subset

pub mod bird;
pub mod networkd;
pub mod outage;

use netwarden::telemetry::http::get;
use netwarden::telemetry::status::{State, Status};
use std::process::Command;
use std::time::{Duration, Instant};

const HTTP: Duration = Duration::from_secs(5);

/// One scrape of `/metrics`.
pub fn scrape(addr: &str) -> String {
    let (code, body) = get(addr, "/metrics", None, HTTP).expect("scrape /metrics");
    assert_eq!(code, 200, "/metrics: {body}");
    body
}

/// The value of the sample `name` whose labels include every one of `labels`.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
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

/// The sum of every sample `name` whose labels include `labels` (0 when there is none).
pub fn total(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name))
        .filter(|l| {
            labels
                .iter()
                .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits (bounded) until `cond` holds for a scrape; panics with the last scrape otherwise.
pub fn wait_scrape(addr: &str, what: &str, within: Duration, mut cond: impl FnMut(&str) -> bool) {
    let deadline = Instant::now() + within;
    loop {
        let text = scrape(addr);
        if cond(&text) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("{what}: not within {within:?}; last scrape:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The `/status` document.
pub fn status(addr: &str) -> Status {
    let (code, body) = get(addr, "/status", None, HTTP).expect("GET /status");
    assert_eq!(code, 200, "/status: {body}");
    serde_json::from_str(&body).expect("/status is JSON")
}

/// Waits (bounded) until every protected object is `in_sync` in `/status`; returns it.
pub fn wait_all_in_sync(addr: &str, within: Duration) -> Status {
    let deadline = Instant::now() + within;
    loop {
        let s = status(addr);
        if s.objects.iter().all(|o| o.state == State::InSync) {
            return s;
        }
        if Instant::now() >= deadline {
            panic!("not every object in sync within {within:?}: {s:#?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs a program inside the namespace (`ip netns exec`); returns (success, stdout + stderr).
pub fn exec(netns: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .expect("ip netns exec");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// As [`exec`], and it must succeed.
pub fn must(netns: &str, args: &[&str]) -> String {
    let (ok, text) = exec(netns, args);
    assert!(ok, "{args:?}: {text}");
    text
}
