//! The wiring, written once: the engines (the rtnetlink agent, the netfilter guard, the nftables
//! engine) started and run side by side with the HTTP endpoints, config reloads and signals, for
//! `netwarden run`, Kubernetes mode and the demo. The top layer: it imports the engines; only the
//! commands import it.

pub mod reload;

pub use reload::{reload_on_sighup, GuardSide, ReloadFollowers, RELOAD_GAP};

use crate::config::Config;
use crate::desired::DesiredState;
use crate::lifecycle::Stop;
use crate::netfilter::canon::Canonicaliser;
use crate::netfilter::guard::{Adoption, Guard, GuardReload};
use crate::netfilter::model::{DesiredChain, DesiredSet};
use crate::netfilter::tools::BackendChoice;
use crate::netns;
use crate::nftables::engine::Engine;
use crate::nftables::model::NftConfig;
use crate::nftables::runner::NftBinary;
use crate::pod_liveness::PodView;
use crate::reconcile::{self, Agent, Reload};
use crate::telemetry::{self, Telemetry};
use anyhow::Context;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use tokio::sync::{mpsc, watch};

/// Exit code of `run --netns NAME` when the namespace was removed (or replaced) under the agent.
pub const EXIT_NETNS_GONE: u8 = 3;

/// How `run` ended, when it did not fail.
#[derive(Debug)]
pub enum Ended {
    /// SIGTERM or SIGINT.
    Stopped,
    /// The namespace given by `--netns` was removed.
    NetnsGone,
}

impl Ended {
    pub fn code(self) -> ExitCode {
        match self {
            Ended::Stopped => ExitCode::SUCCESS,
            Ended::NetnsGone => ExitCode::from(EXIT_NETNS_GONE),
        }
    }
}

/// Enters the namespace (setns moves the calling thread only: threads started before, such as the
/// Kubernetes one, stay on the host's network) and builds a single-threaded runtime: the repair
/// path is one event → one request, and staying on one thread avoids cross-thread wakeups.
pub fn runtime(
    netns: Option<&str>,
) -> anyhow::Result<(tokio::runtime::Runtime, Option<netns::Entered>)> {
    let entered = netns.map(netns::enter).transpose()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    Ok((rt, entered))
}

/// What `run` and Kubernetes mode share, before any engine starts.
pub struct HostOptions<'a> {
    pub netns: Option<&'a str>,
    pub metrics_addr: Option<&'a str>,
    pub adopted_state: Option<PathBuf>,
}

/// The process an agent runs in: its runtime (in the namespace) and what runs within it.
pub struct Host {
    pub rt: tokio::runtime::Runtime,
    pub env: Env,
}

/// What the agent's tasks share: the namespace entered, telemetry (served over HTTP), the
/// adopted-state file.
pub struct Env {
    pub entered: Option<netns::Entered>,
    pub telemetry: Arc<Telemetry>,
    pub adopted_state: Option<PathBuf>,
}

impl Host {
    /// In this order: the HTTP port bound on the host's network, `on_host` (what must stay on the
    /// host's network, such as the Kubernetes thread), the adopted-state file checked, the
    /// namespace entered and the runtime built, the endpoints served.
    pub fn prepare<T>(
        opts: HostOptions,
        telemetry: Arc<Telemetry>,
        on_host: impl FnOnce() -> anyhow::Result<T>,
    ) -> anyhow::Result<(Host, T)> {
        let listener = bind_metrics(opts.metrics_addr)?;
        let on_host = on_host()?;
        let adopted_state = check_adopted_state(opts.adopted_state, &telemetry);
        let (rt, entered) = runtime(opts.netns)?;
        if let Some(listener) = listener {
            let addr = telemetry::http::spawn(listener, telemetry.clone())?;
            tracing::info!(%addr, "serving /metrics, /healthz, /readyz, /status");
        }
        let env = Env {
            entered,
            telemetry,
            adopted_state,
        };
        let host = Host { rt, env };
        Ok((host, on_host))
    }
}

/// Binds the HTTP endpoints' port. Call before entering the namespace, so that the endpoints are
/// on the host's network.
pub fn bind_metrics(metrics_addr: Option<&str>) -> anyhow::Result<Option<std::net::TcpListener>> {
    Ok(match metrics_addr {
        Some("off") => None,
        Some(addr) => Some(
            telemetry::http::bind(addr).with_context(|| format!("cannot listen on {addr}"))?,
        ),
        None => telemetry::http::bind(telemetry::DEFAULT_METRICS_ADDR)
            .map_err(|e| {
                tracing::warn!(addr = telemetry::DEFAULT_METRICS_ADDR, error = %e, "no HTTP endpoints")
            })
            .ok(),
    })
}

/// Sets an unusable adopted-state file aside before anything reads or writes it (see
/// [`crate::adopted_state::read_or_set_aside`]). Returns the path to keep adopted state in:
/// none if the file can be neither read nor set aside, so that nothing overwrites it.
pub fn check_adopted_state(path: Option<PathBuf>, telemetry: &Telemetry) -> Option<PathBuf> {
    let path = path?;
    match crate::adopted_state::read_or_set_aside(&path) {
        Ok((_, None)) => Some(path),
        Ok((_, Some((aside, why)))) => {
            telemetry.state_file_set_aside("adopted_state", &aside, &why.to_string());
            Some(path)
        }
        Err(e) => {
            tracing::error!(error = %e, "adopted state is neither read nor saved");
            None
        }
    }
}

/// The chain and set selectors of `spec.adopt`, with the chains and sets the adopted-state
/// file kept for them (a file that cannot be read is reported by the agent and ignored here).
pub fn adoption(selectors: &[crate::adopt::AdoptSelector], state: Option<&Path>) -> Adoption {
    let saved = state.and_then(|p| crate::adopted_state::read(p).ok());
    Adoption::new(selectors, saved.as_ref())
}

/// Refuses to start (exit 2) when the kernel would refuse every repair: without CAP_NET_ADMIN
/// over the namespace. An agent that only observes needs no such right and goes on.
pub async fn require_kernel_access(enforces: bool) -> anyhow::Result<()> {
    match crate::apply::check_write_access().await {
        Ok(()) => Ok(()),
        Err(e) if e.is_permission() && !enforces => {
            tracing::warn!(error = %e, "the kernel refuses changes from this process (no CAP_NET_ADMIN?); fine while everything is observed, but a repair will be refused");
            Ok(())
        }
        Err(e) if e.is_permission() => Err(anyhow::anyhow!(
            "no kernel access: the kernel refuses changes to this network namespace ({e}); \
             netwarden needs CAP_NET_ADMIN in it to repair anything"
        )),
        Err(e) => Err(anyhow::anyhow!("cannot reach the kernel: {e}")),
    }
}

/// Completes when the namespace the agent entered is gone (never, without `--netns`), saying so.
pub async fn netns_gone(entered: Option<&netns::Entered>) {
    match entered {
        Some(ns) => {
            ns.gone().await;
            tracing::error!(
                netns = %ns.name,
                "network namespace removed (or replaced) under the agent: nothing left to protect; exiting"
            );
        }
        None => std::future::pending().await,
    }
}

/// Starts the check at start of what systemd-networkd would remove (see
/// [`crate::networkd::host`]).
pub fn check_networkd(root: Option<PathBuf>, desired: &DesiredState, telemetry: &Arc<Telemetry>) {
    if let Some(root) = root {
        tokio::spawn(crate::networkd::host::check_at_start(
            root,
            desired.clone(),
            telemetry.clone(),
        ));
    }
}

/// `start` raced against a stop and the end of the namespace: a stop during the wait for the
/// cluster or the initial sync ends it where it is (what was applied stays, nothing is undone).
pub async fn unless_ended<T>(
    stop: &mut Stop,
    entered: Option<&netns::Entered>,
    start: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<Result<T, Ended>> {
    tokio::select! {
        _ = stop.requested() => {
            tracing::info!("shutting down during the initial sync; what is in place stays");
            Ok(Err(Ended::Stopped))
        }
        _ = netns_gone(entered) => Ok(Err(Ended::NetnsGone)),
        r = start => r.map(Ok),
    }
}

/// What the engines protect from the start.
pub struct Protect<'a> {
    /// The config's settings (modes, intervals, adopt selectors, `spec.nftables`).
    pub config: &'a Config,
    /// The rtnetlink objects (templates expanded in Kubernetes mode).
    pub desired: DesiredState,
    pub chains: Vec<DesiredChain>,
    pub sets: Vec<DesiredSet>,
    /// Pod liveness from the cluster (Kubernetes mode).
    pub pods: Option<watch::Receiver<PodView>>,
}

/// How the engines run: the iptables backend, where they publish, the adopted-state file.
pub struct Wiring {
    pub backend: BackendChoice,
    pub telemetry: Arc<Telemetry>,
    pub adopted_state: Option<PathBuf>,
}

/// The engines, started.
pub struct Engines {
    pub agent: Agent,
    pub guard: Option<Guard>,
    pub nftables: Option<Engine<NftBinary>>,
}

/// Where each engine takes its new configs from.
#[derive(Default)]
pub struct Inputs {
    pub agent: Option<mpsc::Receiver<Reload>>,
    pub guard: Option<mpsc::Receiver<GuardReload>>,
    pub nftables: Option<mpsc::Receiver<NftConfig>>,
}

impl Engines {
    /// The kernel access checked, then the nftables engine, then chains and sets, then the
    /// rtnetlink agent: `initial sync done` then means everything is in place.
    pub async fn start(p: Protect<'_>, w: Wiring) -> anyhow::Result<Engines> {
        let cfg = p.config;
        require_kernel_access(cfg.enforces_anything()).await?;
        // What the adopted-state file kept (a file that cannot be read is reported by the agent
        // and ignored here): each engine takes its own part.
        let saved = w
            .adopted_state
            .as_deref()
            .and_then(|p| crate::adopted_state::read(p).ok());
        let saved_tables = saved.as_ref().map_or(&[][..], |s| &s.nftables[..]);
        let nft = Engine::start(cfg.nftables.clone(), cfg.resync, saved_tables)
            .await?
            .with_telemetry(w.telemetry.clone());
        let adoption = Adoption::new(&cfg.adopt, saved.as_ref());
        let guard = Guard::start_adopting(
            p.chains,
            p.sets,
            cfg.poll_interval,
            cfg.resync,
            w.backend,
            adoption,
        )
        .await?
        .with_telemetry(w.telemetry.clone());
        let opts = reconcile::Options {
            resync: cfg.resync,
            telemetry: w.telemetry,
            adopted_state: w.adopted_state,
            pods: p.pods,
        };
        let agent = Agent::start(p.desired, opts).await?;
        // One writer for the adopted-state file: the agent's, which the guard and the nftables
        // engine share for their parts.
        let guard = guard.with_store(agent.adopted_store());
        let nft = nft.with_store(agent.adopted_store());
        Ok(Engines {
            agent,
            guard: Some(guard),
            nftables: Some(nft),
        })
    }

    /// The rtnetlink agent alone (the demo).
    pub fn agent_only(agent: Agent) -> Engines {
        Engines {
            agent,
            guard: None,
            nftables: None,
        }
    }

    /// The guard's canonicaliser, which checks the rule specs of a new config.
    pub fn canonicaliser(&self) -> Option<Canonicaliser> {
        self.guard.as_ref().map(Guard::canonicaliser)
    }

    /// Runs the engines side by side until `stop`, the failure of one of them, or the end of
    /// `beside` (a task that feeds them, failing or not).
    pub async fn run(
        self,
        stop: impl Future<Output = ()>,
        inputs: Inputs,
        beside: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        let guard = async {
            match self.guard {
                Some(g) => g.run_with(inputs.guard).await,
                None => std::future::pending().await,
            }
        };
        let nft = async {
            match self.nftables {
                Some(n) => n.run(inputs.nftables).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            r = self.agent.run_with(stop, inputs.agent) => r?,
            r = guard => r?,
            r = nft => r?,
            r = beside => r?,
        }
        Ok(())
    }

    /// [`Engines::run`], also ended by the end of the namespace. However it ends, what the
    /// engines last handed to the adopted-state writer is written before this returns (the
    /// writer holds changes that keep coming for up to its interval).
    pub async fn run_in(
        self,
        entered: Option<&netns::Entered>,
        stop: impl Future<Output = ()>,
        inputs: Inputs,
        beside: impl Future<Output = anyhow::Result<()>>,
    ) -> anyhow::Result<Ended> {
        let store = self.agent.adopted_store();
        let ended = tokio::select! {
            r = self.run(stop, inputs, beside) => r.map(|()| Ended::Stopped),
            _ = netns_gone(entered) => Ok(Ended::NetnsGone),
        };
        if let Some(store) = store {
            flush_adopted_state(store).await;
        }
        ended
    }
}

/// How long a stop waits for the adopted-state file to be written: a disk that hangs must not
/// keep the agent from exiting within its pod's grace period.
pub const FLUSH_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

async fn flush_adopted_state(store: crate::adopted_state::Writer) {
    let flushed = tokio::task::spawn_blocking(move || store.flush(FLUSH_WITHIN)).await;
    if !flushed.unwrap_or(false) {
        tracing::warn!(
            within_s = FLUSH_WITHIN.as_secs(),
            "the adopted state last handed over may not be in the adopted-state file"
        );
    }
}
