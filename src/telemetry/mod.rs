//! Observability: metrics, the HTTP endpoints (`/metrics`, `/healthz`, `/readyz`, `/status`),
//! attribution of changes to processes, and contested-object backoff. docs/metrics.md describes
//! what an operator sees.
//!
//! The reconcile loop owns the work; this module gives it a cheap way to publish: counters are
//! atomics, object states go to a board under a short lock, and the HTTP server runs on a thread
//! and runtime of its own, so a scrape never competes with a repair for the loop's thread.

pub mod attribution;
mod conns;
pub mod contest;
pub mod http;
pub mod logfmt;
pub mod metrics;
pub mod process;
pub mod status;

use crate::desired::DesiredState;
use metrics::{Metrics, ResultLabels};
use prometheus_client::registry::Registry;
use status::Board;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// Default address of the HTTP endpoints. Port 10370: the Prometheus default port allocations
/// list (wiki) has 9100-9999 fully allocated, and 10370 is not among the ports it lists outside
/// that range; it also stays clear of Kubernetes' node ports (10248-10260), the NodePort range
/// and the Linux ephemeral range. See docs/metrics.md.
pub const DEFAULT_METRICS_ADDR: &str = "0.0.0.0:10370";

/// A liveness probe for the loop: the loop answers on the oneshot.
pub type Ping = oneshot::Sender<()>;

/// What the agent shares with the HTTP side.
#[derive(Debug)]
pub struct Telemetry {
    pub metrics: Metrics,
    registry: Registry,
    board: Arc<Mutex<Board>>,
    /// The initial sync is done.
    synced: AtomicBool,
    /// Protected objects whose last repair the kernel refused (EPERM, EACCES): the agent is
    /// running but cannot do its job, so it is not ready.
    refused: AtomicUsize,
    ping_tx: mpsc::Sender<Ping>,
    ping_rx: Mutex<Option<mpsc::Receiver<Ping>>>,
    /// Where repairs and fights are also told (Kubernetes mode: Events on the Node).
    notices: Mutex<Option<mpsc::UnboundedSender<Notice>>>,
}

/// Something worth telling the cluster about (Kubernetes mode turns these into Events).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Notice {
    /// Objects put back, counted per kind (`rule`, `route`, `chain`, `ipset`, ...), and who had
    /// removed them.
    Restored {
        counts: Vec<(&'static str, u64)>,
        actor: String,
    },
    /// An object removed again right after each repair.
    Contested {
        kind: &'static str,
        name: String,
        actor: String,
    },
    /// A new config was refused; the last good one stays in force.
    ConfigRejected { source: String, error: String },
    /// Members a protected set must never hold were taken out of it.
    ForbiddenRemoved { set: String, members: Vec<String> },
    /// Objects found missing and put in place by the initial sync, counted per kind. Whether
    /// that is drift depends on what ran before (Kubernetes mode decides, docs/kubernetes.md).
    PlacedAtStart { counts: Vec<(&'static str, u64)> },
    /// A new config was loaded: an earlier refusal of it is superseded.
    ConfigAccepted { source: String },
    /// systemd-networkd's next restart would take protected objects away (told once, at start):
    /// how many, the first names, and whether a drop-in prevents it.
    NetworkdAtRisk {
        objects: usize,
        names: Vec<String>,
        preventable: bool,
    },
}

impl Telemetry {
    pub fn new() -> Arc<Telemetry> {
        let board = Arc::new(Mutex::new(Board::default()));
        let (metrics, registry) = Metrics::new(board.clone());
        metrics.start_time.set(status::unix_now());
        let (ping_tx, ping_rx) = mpsc::channel(8);
        Arc::new(Telemetry {
            metrics,
            registry,
            board,
            synced: AtomicBool::new(false),
            refused: AtomicUsize::new(0),
            ping_tx,
            ping_rx: Mutex::new(Some(ping_rx)),
            notices: Mutex::new(None),
        })
    }

    /// Also tells repairs and fights to `tx` from now on.
    pub fn set_notices(&self, tx: mpsc::UnboundedSender<Notice>) {
        *self.notices.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx);
    }

    /// Tells a notice to whoever listens (nobody outside Kubernetes mode). Never blocks.
    pub fn notice(&self, n: Notice) {
        if let Some(tx) = &*self.notices.lock().unwrap_or_else(|e| e.into_inner()) {
            let _ = tx.send(n);
        }
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    pub fn board(&self) -> MutexGuard<'_, Board> {
        self.board.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The initial sync is done.
    pub fn set_ready(&self) {
        self.synced.store(true, Ordering::Release);
        self.publish_readiness();
    }

    /// How many protected objects the kernel refused to repair for lack of permission.
    pub fn set_refused(&self, objects: usize) {
        if self.refused.swap(objects, Ordering::AcqRel) != objects {
            self.publish_readiness();
        }
    }

    fn publish_readiness(&self) {
        let why = self.not_ready_reason();
        let mut board = self.board();
        board.ready = why.is_none();
        board.not_ready = why;
    }

    /// Whether the initial sync is done (the loop then answers liveness probes).
    pub fn is_started(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    /// Ready: the initial sync is done and the kernel accepts the agent's repairs.
    pub fn is_ready(&self) -> bool {
        self.not_ready_reason().is_none()
    }

    /// Why the agent is not ready, if it is not.
    pub fn not_ready_reason(&self) -> Option<String> {
        if !self.is_started() {
            return Some(status::NOT_SYNCED.into());
        }
        match self.refused.load(Ordering::Acquire) {
            0 => None,
            n => Some(format!(
                "the kernel refused the repair of {n} protected object{} (EPERM/EACCES: is \
                 CAP_NET_ADMIN missing?)",
                if n == 1 { "" } else { "s" }
            )),
        }
    }

    /// The loop's end of the liveness probe (taken once).
    pub fn take_pings(&self) -> Option<mpsc::Receiver<Ping>> {
        self.ping_rx
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Asks the loop whether it is alive; false if it does not answer within `timeout`.
    pub async fn ping(&self, timeout: Duration) -> bool {
        let (tx, rx) = oneshot::channel();
        if self.ping_tx.try_send(tx).is_err() {
            // Full: earlier probes are still waiting, so the loop is not answering.
            return false;
        }
        matches!(tokio::time::timeout(timeout, rx).await, Ok(Ok(())))
    }

    /// Counts a config load (at start or on SIGHUP).
    pub fn config_loaded(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
        self.metrics.config_last_ok.set(i64::from(ok));
        if ok {
            self.metrics.config_last_success.set(status::unix_now());
        }
    }

    /// Reports a state file found unusable at start and renamed `aside` (`file`: which one, as
    /// the metric labels it).
    pub fn state_file_set_aside(&self, file: &'static str, aside: &std::path::Path, why: &str) {
        self.metrics
            .state_files_set_aside
            .get_or_create(&metrics::FileLabels { file })
            .inc();
        tracing::error!(file, kept_as = %aside.display(), error = %why, "unusable state file set aside; starting without it");
    }

    /// Counts a SIGHUP that found the config file as it was: nothing to do.
    pub fn config_unchanged(&self) {
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels {
                result: "unchanged",
            })
            .inc();
    }

    /// Publishes the protected objects (names, descriptions, modes).
    pub fn set_catalog(&self, desired: &DesiredState) {
        let mode = |m: crate::model::Mode| format!("{m:?}").to_lowercase();
        let catalog = desired
            .ids()
            .filter_map(|id| {
                let (name, describe, m) = desired.entry(&id)?;
                let name = name.to_owned();
                Some((id, name, describe, mode(m)))
            })
            .collect();
        self.board().set_catalog(catalog);
    }
}
