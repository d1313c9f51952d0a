//! The reconcile loop: one task that owns the mirror, the desired state and the applier.
//!
//! Fast path: a batch of events is folded into the mirror; if it touched protected objects, only
//! those are re-planned and repaired at once. Events that can hide silent kernel deletions (an
//! address removed, a link down or gone) re-dump the routes first. A lost event (overrun) and the
//! resync timer re-dump everything.
//!
//! Here: the agent, its constructor and the select loop. [`batch`]: events into a batch;
//! [`burst`]: when a burst of removals is repaired; [`execute`]: a plan executed (contested
//! repairs held back, the rest applied, the mirror and the board brought up to date); [`ledger`]:
//! one record per protected object (pending, failed, refused, reported, placing, board state),
//! pure; [`tell`]: what was found and done, counted and logged with the processes behind it;
//! [`refresh`]: full refreshes, reloads, retries; [`adoption`]: `spec.adopt` and pod liveness;
//! [`owners`]: addresses left to their owner to put back; [`node`]: neighbours, links and
//! sysctls.

mod adoption;
mod batch;
mod burst;
mod execute;
mod ledger;
mod node;
mod owners;
mod refresh;
mod tell;

use crate::apply::Applier;
use crate::desired::DesiredState;
use crate::handoff::Handoff;
use crate::model::fast::HashMap;
use crate::model::ObjectId;
use crate::model::{RouteKey, RuleKey};
use crate::observe::events::EventSocket;
use crate::observe::kernel::{self, ObserveError};
use crate::observe::Mirror;
use crate::pod_liveness::{PodView, Tracker};
use crate::telemetry::attribution::{self, LabelCap};
use crate::telemetry::contest::{Backoff, Contest};
use crate::telemetry::{Ping, Telemetry};
use adoption::{open_adopted_state, route_interest};
use batch::Batch;
use ledger::Ledger;
use rtnetlink::Handle;
use std::future::Future;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tell::spawn_attribution;
use tell::Report;
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// A new config for the loop (from a SIGHUP or a ConfigMap edit).
#[derive(Debug)]
pub struct Reload {
    pub desired: DesiredState,
    pub resync: Duration,
}

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("the kernel event stream ended")]
    EventsClosed,
}

/// Why a full refresh ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    Start,
    Timer,
    Overrun,
    /// Routes re-dumped: a link went down or away.
    LinkDown,
    /// Routes re-dumped: an address was removed.
    AddressRemoved,
    /// A new config was loaded (SIGHUP).
    ConfigChange,
    /// Rules re-dumped: someone else added a protected rule that was already there.
    RuleAddedAgain,
}

impl ResyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Start => "start",
            ResyncReason::Timer => "timer",
            ResyncReason::Overrun => "overrun",
            ResyncReason::LinkDown => "link_down",
            ResyncReason::AddressRemoved => "address_removed",
            ResyncReason::ConfigChange => "config_change",
            ResyncReason::RuleAddedAgain => "rule_added_again",
        }
    }
}

/// Why a plan is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cause {
    /// The initial sync: what is missing then is not counted as drift.
    Start,
    /// A full refresh (timer, overrun, config change).
    Resync,
    /// A batch of events; `redumped`: the routes were re-read after the kernel may have dropped
    /// some silently (a route found missing then was removed by the kernel); `rules_current`: the
    /// mirror's rules are the kernel's (see `Agent::rules_maybe_stale`).
    Events { redumped: bool, rules_current: bool },
    /// Held-back repairs of contested objects whose time has come.
    Retry,
    /// Addresses their owner did not put back within the grace (see `handoff`).
    OwnerLate,
    /// Pending objects, retried because the agent's own repairs may have made them possible.
    Pending,
}

/// How an agent starts, besides its desired state.
pub struct Options {
    /// How often the whole kernel state is read again and compared.
    pub resync: Duration,
    /// Where metrics and object states are published.
    pub telemetry: Arc<Telemetry>,
    /// The adopted-state file: the rules and routes adopted through `spec.adopt` are kept in it
    /// and read from it at start (protected at once, also those removed while the agent was
    /// down).
    pub adopted_state: Option<PathBuf>,
    /// The IPs of this node's pods (Kubernetes mode, from its thread), for `podLiveness`
    /// selectors.
    pub pods: Option<watch::Receiver<PodView>>,
}

impl Options {
    /// Resyncs every `resync`, with telemetry of its own, no adopted-state file and no pods.
    pub fn new(resync: Duration) -> Options {
        Options {
            resync,
            telemetry: Telemetry::new(),
            adopted_state: None,
            pods: None,
        }
    }
}

pub struct Agent {
    desired: DesiredState,
    mirror: Mirror,
    handle: Handle,
    applier: Applier,
    /// Notifications read after a rule dump may predate it (a removal the dump already shows
    /// undone): until the event queue has once been read to the end, a rule the mirror says is
    /// missing may be there, and rules are added with the kernel's existence check. See
    /// [`RuleAdd`].
    rules_maybe_stale: bool,
    events: EventSocket,
    /// The event socket's filter: route notifications of the tables the mirror keeps only.
    event_filter: Option<kernel::EventFilter>,
    /// The same for the attribution's socket (never widened: only protected changes are named).
    sightings_filter: Option<kernel::EventFilter>,
    resync: Duration,
    /// What is known about each protected object not simply in sync: pending (retried when
    /// something appears: a link, an address, a route or a rule can make a device or gateway
    /// available), failed, refused, last reported, being placed, its board state.
    ledger: Ledger<ObjectId>,
    telemetry: Arc<Telemetry>,
    /// Objects fought over, and their held-back repairs.
    contest: Contest<ObjectId>,
    /// Addresses removed by their owner, left to it to put back for a while.
    handoff: Handoff<ObjectId>,
    /// Bursts repaired as they go: what was put back, and who deletes (see `burst`).
    pacer: burst::Pacer<ObjectId>,
    actors: LabelCap,
    /// Lookups of the processes behind changes, on their own thread.
    attribution: Option<std::sync::mpsc::Sender<attribution::Request>>,
    answers: mpsc::UnboundedReceiver<attribution::Answer>,
    /// Reports waiting for their lookup.
    awaiting: HashMap<u64, Report>,
    next_report: u64,
    pings: Option<mpsc::Receiver<Ping>>,
    /// Adopted rules (in `desired.rules` too), by the selector that adopted them.
    adopted: HashMap<RuleKey, String>,
    /// Adopted routes (in `desired.routes` too), by the selector that adopted them.
    adopted_routes: HashMap<RouteKey, String>,
    /// Synchronous lookups of the processes behind removals of adopted objects: the decision to
    /// restore or forget needs the actor before the repair.
    resolver: attribution::Resolver,
    /// Writes the adopted rules to the adopted-state file, when there is one.
    store: Option<crate::adopted_state::Writer>,
    /// The IPs of this node's pods (Kubernetes mode), for `podLiveness` selectors.
    pods: Option<watch::Receiver<PodView>>,
    /// Adopted objects of `podLiveness` selectors tied to a pod IP.
    liveness: Tracker<ObjectId>,
    /// When the settings the kernel does not notify were last read.
    polled_at: Instant,
    /// Adopted neighbour and FDB entries (in `desired` too), by the selector that adopted them.
    adopted_node: HashMap<ObjectId, String>,
}

fn kind_str(id: &ObjectId) -> &'static str {
    id.kind().as_str()
}

/// Whether the desired state protects an object.
fn protects(desired: &DesiredState, id: &ObjectId) -> bool {
    desired.protects(id)
}

/// Whether the pods' view changed (false: its sender is gone); never, without one.
async fn pods_changed(rx: &mut Option<watch::Receiver<PodView>>) -> bool {
    match rx {
        Some(rx) => rx.changed().await.is_ok(),
        None => std::future::pending().await,
    }
}

/// The next item of an optional channel; never, without one.
async fn next<T>(rx: &mut Option<mpsc::Receiver<T>>) -> Option<T> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Agent {
    /// Subscribes to kernel events, dumps the kernel and repairs everything once. Events that
    /// happen during the dump are queued and handled by [`Agent::run`].
    pub async fn start(mut desired: DesiredState, opts: Options) -> Result<Agent, ReconcileError> {
        let Options {
            resync,
            telemetry,
            adopted_state,
            pods,
        } = opts;
        let (merged, store) = match adopted_state {
            Some(path) => open_adopted_state(path, &mut desired),
            None => Default::default(),
        };
        let applier = Applier::open().map_err(ObserveError::Socket)?;
        let (events, event_filter) = EventSocket::subscribe(Some(applier.port()))?;
        let handle = kernel::connect()?;
        let interest = route_interest(&desired);
        telemetry.set_catalog(&desired);
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let (attribution, sightings_filter, resolver) =
            spawn_attribution(answers_tx, applier.port());
        let mut agent = Agent {
            desired,
            mirror: Mirror::new(interest),
            applier,
            rules_maybe_stale: true,
            handle,
            events,
            event_filter,
            sightings_filter,
            resync,
            ledger: Ledger::default(),
            pings: telemetry.take_pings(),
            telemetry,
            contest: Contest::new(Backoff::default()),
            handoff: Handoff::default(),
            pacer: burst::Pacer::default(),
            actors: LabelCap::default(),
            attribution,
            answers,
            awaiting: HashMap::default(),
            next_report: 0,
            adopted: merged.rules,
            adopted_routes: merged.routes,
            resolver,
            store,
            pods: None,
            liveness: Tracker::default(),
            polled_at: Instant::now(),
            adopted_node: merged.node,
        };
        agent.sync_interest();
        agent.full_resync(ResyncReason::Start).await?;
        agent.telemetry.set_ready();
        // Every protected object not in sync now: pending, observed drift, failed repairs.
        let drifted = agent.ledger.board_count();
        info!(
            protected = agent.desired.len(),
            rules = agent.desired.rules.len(),
            routes = agent.desired.routes.len(),
            addresses = agent.desired.addresses.len(),
            still_drifted = drifted,
            failed = agent.ledger.failed_count(),
            "initial sync done"
        );
        if let Some(pods) = pods {
            agent.follow_pods(pods);
        }
        Ok(agent)
    }

    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Ties the adopted objects of `podLiveness` selectors to the pods of this node: `pods`
    /// tells which IPs they hold (from the Kubernetes thread).
    fn follow_pods(&mut self, pods: watch::Receiver<PodView>) {
        self.pods = Some(pods);
        if self.sync_liveness() {
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
    }

    /// Runs until `shutdown` completes. Leaves every object in place on the way out.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), ReconcileError> {
        self.run_with(shutdown, None).await
    }

    /// [`Agent::run`], also taking new configs from `reloads`.
    pub async fn run_with(
        mut self,
        shutdown: impl Future<Output = ()>,
        mut reloads: Option<mpsc::Receiver<Reload>>,
    ) -> Result<(), ReconcileError> {
        tokio::pin!(shutdown);
        let new_timer = |every: Duration| {
            let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            t
        };
        let mut timer = new_timer(self.resync);
        loop {
            // Wide already if something is pending: it was widened before the repair that failed
            // (see `execute`), so nothing that could make it possible went unheard.
            self.sync_event_filter();
            // The earliest held-back repair of a contested object (or end of a fight).
            let deadline = self.contest.next_deadline();
            let backoff = tokio::time::sleep_until(tokio::time::Instant::from_std(
                deadline.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            // The earliest end of a grace period of an adopted object no pod holds the IP of.
            let grace_end = self.liveness.next_deadline();
            // The earliest end of an owner's chance to put its address back.
            let owner_due = self.handoff.next_deadline();
            let owner_late = tokio::time::sleep_until(tokio::time::Instant::from_std(
                owner_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            let grace = tokio::time::sleep_until(tokio::time::Instant::from_std(
                grace_end.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            // The next read of the settings the kernel does not notify.
            let poll_at = self.next_poll();
            let poll = tokio::time::sleep_until(tokio::time::Instant::from_std(
                poll_at.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600)),
            ));
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    info!("shutting down; protected state stays in place");
                    return Ok(());
                }
                ev = self.events.next() => {
                    let Some(first) = ev else { return Err(ReconcileError::EventsClosed) };
                    self.on_events(first).await?;
                }
                _ = backoff, if deadline.is_some() => self.on_backoff_timer().await,
                Some(answer) = self.answers.recv() => {
                    if let Some(report) = self.awaiting.remove(&answer.id) {
                        self.finish(report, &answer.names);
                    }
                }
                Some(reload) = next(&mut reloads) => {
                    let every = reload.resync;
                    self.reload(reload).await?;
                    if every != self.resync {
                        self.resync = every;
                        timer = new_timer(every);
                    }
                }
                Some(ping) = next(&mut self.pings) => { let _ = ping.send(()); }
                alive = pods_changed(&mut self.pods) => {
                    if !alive {
                        warn!("the Pod watch stopped; adopted objects are no longer tied to pods");
                        self.pods = None;
                    }
                    self.on_pods();
                }
                _ = grace, if grace_end.is_some() => self.on_pods(),
                _ = poll, if poll_at.is_some() => self.on_poll().await,
                _ = owner_late, if owner_due.is_some() => self.on_owner_late().await,
                _ = timer.tick() => {
                    self.full_resync(ResyncReason::Timer).await?;
                }
            }
        }
    }

    fn name_of(&self, id: &ObjectId) -> String {
        self.desired
            .entry(id)
            .map(|(name, ..)| name.to_owned())
            .unwrap_or_default()
    }

    fn describe(&self, id: &ObjectId) -> String {
        self.desired
            .entry(id)
            .map(|(_, describe, _)| describe)
            .unwrap_or_default()
    }
}
