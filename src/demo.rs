//! `netwarden demo`: a sandbox namespace with a veth pair, the example config protected by a real
//! agent, then what a systemd-networkd restart does to it (protected rules and routes deleted,
//! the address removed), timed from outside the agent by an independent netlink listener.

use crate::app::{Engines, Inputs};
use crate::config;
use crate::desired::DesiredState;
use crate::model::ObjectId;
use crate::observe::decode;
use crate::reconcile::{Agent, Options};
use crate::testing::listen::Listener;
use crate::testing::sandbox::{Sandbox, SandboxError};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use std::collections::HashMap;
use std::io::Write;
use std::time::{Duration, Instant};
use thiserror::Error;

/// The example config, shipped in the binary so that the demo runs from anywhere.
pub const EXAMPLE: &str = include_str!("../examples/demo.yaml");
pub const EXAMPLE_PATH: &str = "examples/demo.yaml";

#[derive(Debug, Error)]
pub enum DemoError {
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("the example config is invalid: {0}")]
    Config(String),
    #[error(transparent)]
    Netns(#[from] crate::netns::NetnsError),
    #[error("the agent failed: {0}")]
    Agent(String),
    #[error("cannot write the report: {0}")]
    Output(#[from] std::io::Error),
    #[error("not everything came back within {0:?}: {1}")]
    NotRestored(Duration, String),
}

/// A removal and the restore that followed, as the outside listener saw them.
struct Timing {
    kind: &'static str,
    name: String,
    removed: Instant,
    back: Option<Instant>,
}

fn object_of(desired: &DesiredState, msg: &M) -> Option<(ObjectId, bool)> {
    match msg {
        M::NewRule(m) | M::DelRule(m) => {
            let (key, _) = decode::rule(m)?;
            desired
                .rules
                .contains_key(&key)
                .then_some((ObjectId::Rule(key), matches!(msg, M::DelRule(_))))
        }
        M::NewRoute(m) | M::DelRoute(m) => {
            let (key, _) = decode::route(m)?;
            desired
                .routes
                .contains_key(&key)
                .then_some((ObjectId::Route(key), matches!(msg, M::DelRoute(_))))
        }
        M::NewAddress(m) | M::DelAddress(m) => {
            let (key, _) = decode::address(m)?;
            let dk = desired
                .addresses
                .keys()
                .find(|(_, a)| *a == key.address)?
                .clone();
            Some((ObjectId::Address(dk), matches!(msg, M::DelAddress(_))))
        }
        _ => None,
    }
}

fn name_of(desired: &DesiredState, id: &ObjectId) -> String {
    desired
        .entry(id)
        .map(|(name, ..)| name.to_owned())
        .unwrap_or_default()
}

/// Runs the demo, writing the report to `out`. Must be called before any other thread exists:
/// it moves the calling thread into the sandbox namespace.
pub fn run(out: &mut impl Write, timeout: Duration) -> Result<(), DemoError> {
    let cfg = config::parse(EXAMPLE_PATH, EXAMPLE).map_err(|e| DemoError::Config(e.to_string()))?;
    let desired = DesiredState::from_config(&cfg);
    let sandbox = Sandbox::create("netwarden-demo")?;
    set_up(&sandbox, &cfg, out)?;
    crate::netns::enter(&sandbox.name)?;
    let started = Instant::now();
    let agent = AgentThread::start(desired.clone(), cfg.resync, timeout)?;
    writeln!(
        out,
        "agent ready: initial sync took {:.1} ms",
        started.elapsed().as_secs_f64() * 1e3
    )?;
    let listener = Listener::start()?;
    let t0 = restart_networkd(&sandbox, &cfg, out)?;
    let (timings, overruns) = watch_restores(&listener, &desired, timeout)?;
    report(out, &timings, t0, overruns)?;
    // An independent check, as an operator would run it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut desired = desired;
    let plan = rt
        .block_on(crate::check::check(&mut desired))
        .map_err(|e| DemoError::Agent(e.to_string()))?;
    write!(
        out,
        "check: {}",
        crate::check::Report::new(&desired, &plan).render_table()
    )?;
    agent.stop();
    drop(listener);
    writeln!(out, "sandbox {} removed", sandbox.name)?;
    Ok(())
}

/// A veth pair with an address at each end in the sandbox.
fn set_up(sandbox: &Sandbox, cfg: &config::Config, out: &mut impl Write) -> Result<(), DemoError> {
    sandbox.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])?;
    sandbox.ip(&["link", "set", "veth0", "up"])?;
    sandbox.ip(&["link", "set", "veth1", "up"])?;
    sandbox.ip(&["address", "add", "10.200.0.1/24", "dev", "veth0"])?;
    sandbox.ip(&["address", "add", "10.200.0.2/24", "dev", "veth1"])?;
    writeln!(
        out,
        "sandbox: network namespace {} with veth0 (10.200.0.1/24) <-> veth1 (10.200.0.2/24)",
        sandbox.name
    )?;
    writeln!(
        out,
        "protecting {EXAMPLE_PATH}: {} rules, {} routes, {} addresses",
        cfg.rules.len(),
        cfg.routes.len(),
        cfg.addresses.len()
    )?;
    Ok(())
}

/// The agent on its own thread and runtime, wired as `netwarden run` wires it ([`crate::app`]).
struct AgentThread {
    stop: tokio::sync::oneshot::Sender<()>,
    thread: std::thread::JoinHandle<()>,
}

impl AgentThread {
    /// Returns once the agent's initial sync is done.
    fn start(
        desired: DesiredState,
        resync: Duration,
        timeout: Duration,
    ) -> Result<Self, DemoError> {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (stop, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            let rt = match crate::app::runtime(None) {
                Ok((rt, _)) => rt,
                Err(e) => return ready_tx.send(Err(e.to_string())).unwrap_or(()),
            };
            rt.block_on(async move {
                let agent = match Agent::start(desired, Options::new(resync)).await {
                    Ok(agent) => agent,
                    Err(e) => return ready_tx.send(Err(e.to_string())).unwrap_or(()),
                };
                let _ = ready_tx.send(Ok(()));
                let stop = async {
                    let _ = stop_rx.await;
                };
                let engines = Engines::agent_only(agent);
                let beside = std::future::pending();
                if let Err(e) = engines.run(stop, Inputs::default(), beside).await {
                    tracing::error!(error = %e, "agent stopped");
                }
            });
        });
        let ready = ready_rx
            .recv_timeout(timeout)
            .map_err(|_| DemoError::Agent("not ready in time".into()))?;
        ready.map_err(DemoError::Agent)?;
        Ok(AgentThread { stop, thread })
    }

    fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.thread.join();
    }
}

/// What a systemd-networkd restart does: the rules deleted, table 77 flushed, the address
/// removed. Returns when it started.
fn restart_networkd(
    sandbox: &Sandbox,
    cfg: &config::Config,
    out: &mut impl Write,
) -> Result<Instant, DemoError> {
    writeln!(
        out,
        "\nsimulating a systemd-networkd restart: deleting the rules, flushing table 77, removing 10.200.0.1/24 from veth0"
    )?;
    // `ip -batch` takes the family once for all lines: one batch per family.
    let mut v4 = String::new();
    let mut v6 = String::new();
    for r in cfg.rules.iter() {
        let script = if r.key.family == crate::model::Family::Ipv6 {
            &mut v6
        } else {
            &mut v4
        };
        script.push_str(&format!("rule del priority {}\n", r.key.priority));
    }
    v4.push_str("route flush table 77\naddress del 10.200.0.1/24 dev veth0\n");
    let t0 = Instant::now();
    sandbox.batch(&["-6"], &v6)?;
    sandbox.batch(&[], &v4)?;
    Ok(t0)
}

/// Each protected object's removal and return, as the outside listener saw them, and how many
/// times the listener overran.
fn watch_restores(
    listener: &Listener,
    desired: &DesiredState,
    timeout: Duration,
) -> Result<(HashMap<ObjectId, Timing>, usize), DemoError> {
    let mut timings: HashMap<ObjectId, Timing> = HashMap::new();
    let deadline = Instant::now() + timeout;
    let total = desired.len();
    let mut overruns = 0;
    while timings.len() < total || timings.values().any(|t| t.back.is_none()) {
        let Some((at, msg)) = listener.next(deadline.saturating_duration_since(Instant::now()))
        else {
            let missing: Vec<String> = timings
                .values()
                .filter(|t| t.back.is_none())
                .map(|t| t.name.clone())
                .collect();
            return Err(DemoError::NotRestored(timeout, missing.join(", ")));
        };
        let Some(msg) = msg else {
            overruns += 1;
            continue;
        };
        let Some((id, removed)) = object_of(desired, &msg) else {
            continue;
        };
        if removed {
            // Removed again after it was back: when the agent's repair of a route came before
            // the batch removed the address, the kernel takes the route with the address. It
            // is back once the last removal is repaired.
            timings
                .entry(id.clone())
                .and_modify(|t| t.back = None)
                .or_insert_with(|| Timing {
                    kind: id.kind().as_str(),
                    name: name_of(desired, &id),
                    removed: at,
                    back: None,
                });
        } else if let Some(t) = timings.get_mut(&id) {
            t.back.get_or_insert(at);
        }
    }
    Ok((timings, overruns))
}

/// The table of outages and its summary.
fn report(
    out: &mut impl Write,
    timings: &HashMap<ObjectId, Timing>,
    t0: Instant,
    overruns: usize,
) -> Result<(), DemoError> {
    let mut rows: Vec<&Timing> = timings.values().collect();
    rows.sort_by_key(|t| t.removed);
    writeln!(
        out,
        "\n{:<8} {:<22} {:>14} {:>14}",
        "KIND", "NAME", "REMOVED AT", "BACK AFTER"
    )?;
    let mut outages = Vec::new();
    for t in &rows {
        let back = t
            .back
            .map(|b| b.duration_since(t.removed))
            .unwrap_or_default();
        outages.push(back);
        writeln!(
            out,
            "{:<8} {:<22} {:>11.3} ms {:>11.3} ms",
            t.kind,
            t.name,
            t.removed.duration_since(t0).as_secs_f64() * 1e3,
            back.as_secs_f64() * 1e3
        )?;
    }
    outages.sort();
    let last_back = rows.iter().filter_map(|t| t.back).max().unwrap_or(t0);
    writeln!(
        out,
        "\nall {} protected objects back; median outage {:.3} ms, longest {:.3} ms; everything back {:.3} ms after the batch started{}",
        rows.len(),
        outages.get(outages.len() / 2).copied().unwrap_or_default().as_secs_f64() * 1e3,
        outages.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        last_back.duration_since(t0).as_secs_f64() * 1e3,
        if overruns > 0 { format!(" ({overruns} listener overruns)") } else { String::new() }
    )?;
    Ok(())
}
