//! The reconcile loop: one task that owns the mirror, the desired state and the applier.
//!
//! Fast path: a batch of events is folded into the mirror; if it touched protected objects, only
//! those are re-planned and repaired at once. Events that can hide silent kernel deletions (an
//! address removed, a link down or gone) re-dump the routes first. A lost event (overrun) and the
//! resync timer re-dump everything.

mod node;

use crate::adopt::{self, Actor, Verdict};
use crate::apply::{self, Applier, Outcome, RuleAdd};
use crate::burst;
use crate::desired::DesiredState;
use crate::handoff::{self, Handoff, Remover};
use crate::model::fast::{HashMap, HashSet};
use crate::model::{DesiredRule, Family, Kind, Mode, RouteKey, RuleKey};
use crate::obs::attribution::{self, LabelCap};
use crate::obs::contest::{Backoff, Contest, Decision};
use crate::obs::metrics::{
    BurstLabels, DriftLabels, ErrorLabels, ForgetLabels, HandoffLabels, KindLabels, ReasonLabels,
    RepairLabels,
};
use crate::obs::status::State;
use crate::obs::{Ping, Reload, Telemetry};
use crate::observe::events::{Event, EventSocket};
use crate::observe::kernel::{self, ObserveError};
use crate::observe::{Change, Mirror, RouteInterest};
use crate::plan::{self, Dirty, Drift, Finding, ObjectId, Plan};
use crate::pod_liveness::{self, PodView, Tracker};
use rtnetlink::Handle;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use thiserror::Error;
use tokio::sync::{mpsc, watch};
use tracing::{debug, error, info, warn};

/// Most events folded into one plan; the rest wait for the next turn of the loop.
const MAX_BATCH: usize = 16_384;

#[derive(Debug, Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error("the kernel event stream ended")]
    EventsClosed,
}

/// What a batch of events calls for.
#[derive(Default)]
struct Batch {
    dirty: Dirty,
    /// Re-plan everything (a link appeared or was lost, routes were re-dumped).
    full: bool,
    /// Something was added: pending objects may be applicable now.
    appeared: bool,
    overrun: bool,
    /// Re-dump the routes of a family (`Some(None)`: all families).
    redump: Option<Option<Family>>,
    /// Why the routes are re-dumped.
    redump_reason: Option<ResyncReason>,
    /// Netlink port of the socket that sent the last change (removal or otherwise) of each
    /// protected object: the process that made it (0: the kernel).
    removed_by: HashMap<ObjectId, u32>,
    /// Adopted rules removed in this batch, with the port of the removal: an owner's removal
    /// is forgotten rather than repaired.
    adopted_removed: Vec<(ObjectId, u32)>,
    /// Protected addresses removed in this batch, with the port of the removal: an owner's
    /// removal is left to the owner first (see `handoff`).
    addresses_removed: Vec<(ObjectId, u32)>,
    /// Rules were adopted or forgotten: the status catalog is out of date.
    adoption_changed: bool,
    /// Protected objects seen removed (a burst holds the repair until they stop).
    removals: usize,
    /// The protected objects removed, and the ports of the processes that removed them (few),
    /// to decide a burst's pace.
    removed_ids: Vec<ObjectId>,
    removal_ports: Vec<u32>,
    /// Someone else added a protected rule the mirror already held: the rules are re-dumped to
    /// count the copies.
    rule_added_again: bool,
    /// A link appeared, went or was renamed: device patterns may cover other links now.
    links_changed: bool,
    /// A `default` setting changed: the kernel copies it, silently, to every device that never
    /// had its own value written.
    sysctl_default_changed: bool,
    /// Adopted neighbour and FDB entries removed in this batch (judged like adopted rules).
    adopted_node_removed: Vec<ObjectId>,
}

impl Batch {
    /// A protected rule or route was removed by the process behind `port`.
    fn removed(&mut self, id: &ObjectId, port: u32) {
        self.removals += 1;
        self.removed_ids.push(id.clone());
        if !self.removal_ports.contains(&port) {
            self.removal_ports.push(port);
        }
    }
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

/// Drift found by one plan, reported once its actor is known.
#[derive(Debug)]
struct Detection {
    id: ObjectId,
    name: String,
    /// The netlink port of the change (0: kernel); none known: `unknown`.
    port: Option<u32>,
    /// This drift made the object contested; the delay of its held-back repair.
    newly_contested: Option<Duration>,
}

/// The `restored` log line.
#[derive(Debug)]
struct Restored {
    /// Objects put back, by kind (every kind, in [`Kind::ALL`] order).
    counts: Vec<(&'static str, u64)>,
    took_us: u64,
    names: String,
    ports: Vec<u32>,
}

/// What a plan's execution has to say once the processes behind the changes are known.
#[derive(Debug, Default)]
struct Report {
    detections: Vec<Detection>,
    restored: Option<Restored>,
    /// Known fighters of the contested objects whose held-back repairs went through.
    fighters: Vec<String>,
    /// From the initial sync: what it restores was missing at start, nobody was seen removing it.
    at_start: bool,
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
    /// What was last said about each drifted object, so logs speak of transitions, not repeats.
    reported: HashMap<ObjectId, Finding>,
    /// Enforced objects that could not be applied yet. Retried when something appears (a link,
    /// an address, a route, a rule): any of those can make a device or gateway available.
    pending: HashSet<ObjectId>,
    /// The netlink port of the change that made a pending object missing, when known: its
    /// eventual repair is logged with that actor, as its drift was counted.
    pending_by: HashMap<ObjectId, u32>,
    telemetry: Arc<Telemetry>,
    /// Objects fought over, and their held-back repairs.
    contest: Contest<ObjectId>,
    /// Addresses removed by their owner, left to it to put back for a while.
    handoff: Handoff<ObjectId>,
    /// Bursts repaired as they go: what was put back, and who deletes (see `burst`).
    pacer: burst::Pacer<ObjectId>,
    /// Enforced objects whose last repair failed.
    failed: HashSet<ObjectId>,
    /// Those of them the kernel refused for lack of permission (EPERM, EACCES): while any is
    /// left the agent is not ready (it runs, but cannot do its job).
    refused: HashSet<ObjectId>,
    /// What the board says about objects not in sync (in sync: absent).
    states: HashMap<ObjectId, (State, Option<String>)>,
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
    /// Objects a config change newly protects that were not put in place yet: adding them is
    /// a placement, not a repair (no drift, no fight, no `restored` notice or Event: nobody
    /// removed them). An object leaves the set once it is in place.
    placing: HashSet<ObjectId>,
    /// When the settings the kernel does not notify were last read.
    polled_at: Instant,
    /// Adopted neighbour and FDB entries (in `desired` too), by the selector that adopted them.
    adopted_node: HashMap<ObjectId, String>,
}

impl Agent {
    /// Subscribes to kernel events, dumps the kernel and repairs everything once. Events that
    /// happen during the dump are queued and handled by [`Agent::run`].
    pub async fn start(desired: DesiredState, resync: Duration) -> Result<Agent, ReconcileError> {
        Agent::start_with(desired, resync, Telemetry::new()).await
    }

    /// [`Agent::start`], publishing metrics and object states to `telemetry`.
    pub async fn start_with(
        desired: DesiredState,
        resync: Duration,
        telemetry: Arc<Telemetry>,
    ) -> Result<Agent, ReconcileError> {
        Agent::start_adopting(desired, resync, telemetry, None).await
    }

    /// [`Agent::start_with`], keeping the rules adopted through `spec.adopt` in `adopted_state`
    /// (read at start: they are protected at once, also those removed while the agent was down).
    pub async fn start_adopting(
        mut desired: DesiredState,
        resync: Duration,
        telemetry: Arc<Telemetry>,
        adopted_state: Option<std::path::PathBuf>,
    ) -> Result<Agent, ReconcileError> {
        let mut adopted = HashMap::default();
        let mut adopted_routes = HashMap::default();
        let mut store = None;
        if let Some(path) = adopted_state {
            match crate::adopted_state::read(&path) {
                Ok(saved) => {
                    (adopted, adopted_routes) = crate::adopted_state::merge(saved, &mut desired);
                    info!(
                        path = %path.display(),
                        rules = adopted.len(),
                        routes = adopted_routes.len(),
                        "adopted state read"
                    );
                }
                Err(e) => error!(error = %e, "adopted-state file ignored"),
            }
            match crate::adopted_state::Writer::spawn(path) {
                Ok(w) => store = Some(w),
                Err(e) => error!(error = %e, "cannot start the adopted-state writer"),
            }
        }
        let applier = Applier::open().map_err(ObserveError::Socket)?;
        let (events, event_filter) = EventSocket::subscribe(Some(applier.port()))?;
        let handle = kernel::connect()?;
        let interest = route_interest(&desired);
        telemetry.set_catalog(&desired);
        let (answers_tx, answers) = mpsc::unbounded_channel();
        let mut resolver = attribution::Resolver::default();
        let (attribution, sightings_filter) = match attribution::spawn_filtered(
            answers_tx,
            Some(applier.port()),
        ) {
            Ok(spawned) => {
                // Adopted removals are judged on the loop with a resolver of its own: it uses
                // what the watcher saw too (a short-lived owner is gone by then).
                resolver = resolver.with_sightings(spawned.sightings);
                (Some(spawned.requests), spawned.filter)
            }
            Err(e) => {
                warn!(error = %e, "cannot start the attribution thread; actors will be unknown");
                (None, None)
            }
        };
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
            reported: HashMap::default(),
            pending: HashSet::default(),
            pending_by: HashMap::default(),
            pings: telemetry.take_pings(),
            telemetry,
            contest: Contest::new(Backoff::default()),
            handoff: Handoff::default(),
            pacer: burst::Pacer::default(),
            failed: HashSet::default(),
            refused: HashSet::default(),
            states: HashMap::default(),
            actors: LabelCap::default(),
            attribution,
            answers,
            awaiting: HashMap::default(),
            next_report: 0,
            adopted,
            adopted_routes,
            resolver,
            store,
            pods: None,
            liveness: Tracker::default(),
            placing: HashSet::default(),
            polled_at: Instant::now(),
            adopted_node: HashMap::default(),
        };
        agent.sync_interest();
        agent.full_resync(ResyncReason::Start).await?;
        agent.telemetry.set_ready();
        // Every protected object not in sync now: pending, observed drift, failed repairs.
        let drifted = agent.states.len();
        info!(
            protected = agent.desired.len(),
            rules = agent.desired.rules.len(),
            routes = agent.desired.routes.len(),
            addresses = agent.desired.addresses.len(),
            still_drifted = drifted,
            failed = agent.failed.len(),
            "initial sync done"
        );
        Ok(agent)
    }

    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Ties the adopted objects of `podLiveness` selectors to the pods of this node: `pods`
    /// tells which IPs they hold (from the Kubernetes thread).
    pub fn with_pods(mut self, pods: watch::Receiver<PodView>) -> Agent {
        self.pods = Some(pods);
        if self.sync_liveness() {
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
        self
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

    /// A new config: protect what it names from now on.
    async fn reload(&mut self, reload: Reload) -> Result<(), ReconcileError> {
        let old = std::mem::replace(&mut self.desired, reload.desired);
        // The new config's device patterns cover the links there are before anything is
        // compared with the old one.
        self.follow_links(false);
        self.keep_adopted_node(&old);
        // What liveness dismissed stays dismissed (in Kubernetes mode a reload comes with any
        // Service change: clearing would protect a stale rule anew each time), unless no
        // podLiveness selector would adopt it any more.
        self.prune_dismissed();
        // Adopted rules stay protected if a selector of the new config still adopts them (also
        // those missing right now: they are being repaired).
        let adopted = std::mem::take(&mut self.adopted);
        for (key, _) in adopted {
            let Some(rule) = old.rules.get(&key) else {
                continue;
            };
            if self.desired.rules.contains_key(&key) {
                continue;
            }
            if let Some(sel) = adopt::select_rule(&self.desired.adopt, &key, rule.protocol) {
                let name = sel.name.clone();
                let r = sel.adopt_rule(&key, rule.protocol);
                self.desired.rules.insert(key.clone(), r);
                self.adopted.insert(key, name);
            }
        }
        for (key, selector) in std::mem::take(&mut self.adopted_routes) {
            let Some(route) = old.routes.get(&key) else {
                continue;
            };
            if self.desired.routes.contains_key(&key) {
                continue;
            }
            let kept = self
                .desired
                .adopt
                .iter()
                .find(|s| s.name == selector)
                .and_then(|s| s.readopt_route(route));
            if let Some(route) = kept {
                self.desired.routes.insert(key.clone(), route);
                self.adopted_routes.insert(key, selector);
            }
        }
        let d = &self.desired;
        let mut placing = newly_protected(&old, d);
        placing.extend(self.placing.drain().filter(|id| protects(d, id)));
        self.placing = placing;
        self.mirror.set_interest(route_interest(d));
        self.sync_interest();
        let d = &self.desired;
        self.pending.retain(|id| protects(d, id));
        self.pending_by.retain(|id, _| protects(d, id));
        self.reported.retain(|id, _| protects(d, id));
        self.failed.retain(|id| protects(d, id));
        self.refused.retain(|id| protects(d, id));
        self.telemetry.set_refused(self.refused.len());
        self.states.retain(|id, _| protects(d, id));
        self.contest.retain(|id| protects(d, id));
        self.handoff.retain(|id| protects(d, id));
        self.telemetry.set_catalog(d);
        self.save_adopted();
        let r = self.full_resync(ResyncReason::ConfigChange).await;
        // What is in place now was placed; what is still pending is placed when it can be.
        let pending = &self.pending;
        self.placing.retain(|id| pending.contains(id));
        r
    }

    /// Held-back repairs whose time has come; fights that stopped.
    async fn on_backoff_timer(&mut self) {
        let now = Instant::now();
        let (due, calmed) = self.contest.poll(now);
        for c in &calmed {
            info!(
                kind = %c.id.kind(),
                name = %self.name_of(&c.id),
                actor = %c.fighter.as_deref().unwrap_or(attribution::UNKNOWN),
                "no longer contested"
            );
        }
        if !calmed.is_empty() {
            let ids: Vec<ObjectId> = calmed.into_iter().map(|c| c.id).collect();
            self.update_states(&ids, &HashMap::default(), &HashSet::default());
        }
        if due.is_empty() {
            return;
        }
        let mut dirty = Dirty::default();
        for id in &due {
            dirty.insert(id.clone());
        }
        let plan = plan::plan_dirty(&self.desired, &self.mirror, &dirty);
        self.execute(plan, now, Some(&dirty), &HashMap::default(), Cause::Retry)
            .await;
        for id in &due {
            self.contest.retry_done(id);
        }
    }

    fn name_of(&self, id: &ObjectId) -> String {
        self.desired
            .entry(id)
            .map(|(name, ..)| name.to_owned())
            .unwrap_or_default()
    }

    /// Narrows the event socket to the route tables the mirror keeps, or widens it to every
    /// table while something is pending (a route added anywhere can make a gateway reachable).
    /// True if it was widened: a route that appeared just before was not heard, so the caller
    /// retries what is pending.
    fn sync_event_filter(&mut self) -> bool {
        if let Some(f) = &mut self.sightings_filter {
            f.set_tables(self.mirror.route_tables());
        }
        let Some(filter) = &mut self.event_filter else {
            return false;
        };
        let tables = if self.pending.is_empty() {
            self.mirror.route_tables()
        } else {
            None
        };
        let widened = tables.is_none() && filter.tables().is_some();
        filter.set_tables(tables) && widened
    }

    /// Lets route notifications of every table through (see `sync_event_filter`).
    fn widen_event_filter(&mut self) {
        if let Some(filter) = &mut self.event_filter {
            filter.set_tables(None);
        }
    }

    async fn full_resync(&mut self, reason: ResyncReason) -> Result<(), ReconcileError> {
        let started = Instant::now();
        // Before the dump: a new config's tables must be heard from now on.
        self.sync_event_filter();
        self.count_resync(reason);
        self.rules_maybe_stale = true;
        kernel::dump_all(&mut self.handle, &mut self.mirror).await?;
        self.refresh_node_state(reason != ResyncReason::Start);
        self.prune_dismissed();
        let adopted = self.adopt_from_mirror();
        let judged = self.sync_liveness();
        if adopted || judged || reason == ResyncReason::Start {
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
        debug!(
            reason = reason.as_str(),
            mirrored = self.mirror.len(),
            took_us = started.elapsed().as_micros() as u64,
            "full refresh"
        );
        let plan = plan::plan_all(&self.desired, &self.mirror);
        let cause = if reason == ResyncReason::Start {
            Cause::Start
        } else {
            Cause::Resync
        };
        let progress = self
            .execute(plan, started, None, &HashMap::default(), cause)
            .await;
        self.retry_pending(progress).await;
        Ok(())
    }

    fn count_resync(&self, reason: ResyncReason) {
        self.telemetry
            .metrics
            .resyncs
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// Folds a batch of queued events into the mirror, then repairs what they touched.
    async fn on_events(&mut self, first: Event) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let mut batch = Batch::default();
        let mut next = Some(first);
        let mut count = 0;
        let mut settle = burst::Settle::new(started);
        // Decided before reading: this batch may hold notifications older than the last dump.
        let mut rules_current = !self.rules_maybe_stale;
        while let Some(event) = next.take() {
            count += 1;
            match event {
                Event::Overrun => batch.overrun = true,
                Event::Message(m, port) => {
                    let change = self.mirror.ingest(&m);
                    self.note(change, port, &mut batch);
                }
                Event::Netconf(n) => {
                    let change = self.mirror.ingest_netconf(&n);
                    self.note(change, attribution::KERNEL_PORT, &mut batch);
                }
            }
            if batch.removals > settle.removals() {
                let was_burst = settle.is_burst();
                settle.seen(batch.removals, Instant::now());
                if settle.is_burst() && !was_burst {
                    settle.set_pace(self.burst_pace(&batch));
                }
            }
            // A held burst reads on (past MAX_BATCH too) until it settles, but never past its
            // longest hold, even if events keep coming; see `burst`.
            let read_on = if settle.holds() {
                settle.may_hold(Instant::now())
            } else {
                count < MAX_BATCH
            };
            if read_on {
                next = self.events.try_next();
                if next.is_none() {
                    // Read to the end: whatever predates the last dump has been read.
                    self.rules_maybe_stale = false;
                }
            }
            if next.is_none() && !batch.overrun {
                if let Some(wait) = settle.wait(Instant::now()) {
                    match tokio::time::timeout(wait, self.events.next()).await {
                        Ok(Some(ev)) => next = Some(ev),
                        Ok(None) => return Err(ReconcileError::EventsClosed),
                        Err(_) => {} // settled
                    }
                }
            }
        }
        self.telemetry.metrics.events.inc_by(count as u64);
        if batch.sysctl_default_changed {
            self.reread_device_settings(&mut batch);
        }
        if settle.is_burst() {
            let pace = settle.pace().as_str();
            self.telemetry
                .metrics
                .bursts
                .get_or_create(&BurstLabels { pace })
                .inc();
            debug!(
                removed = settle.removals(),
                events = count,
                held_ms = settle.held(Instant::now()).as_millis() as u64,
                pace,
                "a burst of removals; repairing"
            );
        }
        if !batch.adopted_removed.is_empty() {
            self.judge_adopted_removals(&mut batch);
        }
        if !batch.adopted_node_removed.is_empty() {
            self.judge_adopted_node_removals(&mut batch);
        }
        if !batch.addresses_removed.is_empty() {
            self.hand_off_addresses(&mut batch);
        }
        if batch.adoption_changed {
            if self.sync_liveness() {
                let d = &self.desired;
                batch.dirty.retain(|id| d.protects(id));
            }
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
        if batch.overrun {
            self.telemetry.metrics.overruns.inc();
            warn!("netlink events were lost (socket overrun); re-reading the kernel state");
            return self.full_resync(ResyncReason::Overrun).await;
        }
        let mut redumped = false;
        if let Some(family) = batch.redump {
            if !self.desired.routes.is_empty() {
                self.count_resync(batch.redump_reason.unwrap_or(ResyncReason::LinkDown));
                // The kernel drops the routes after it notified the change: let it finish.
                self.applier.barrier().await;
                kernel::dump_routes(&mut self.handle, &mut self.mirror, family).await?;
                batch.full = true;
                redumped = true;
            }
        }
        if batch.rule_added_again {
            // Counts the copies: a second one is removed by the plan (the keys are dirty).
            self.count_resync(ResyncReason::RuleAddedAgain);
            self.rules_maybe_stale = true;
            rules_current = false;
            kernel::dump_rules(&mut self.handle, &mut self.mirror).await?;
        }
        if batch.appeared {
            for id in &self.pending {
                batch.dirty.insert(id.clone());
            }
        }
        let followed = batch.links_changed && self.follow_links(true);
        let plan = if batch.full {
            plan::plan_all(&self.desired, &self.mirror)
        } else if batch.dirty.is_empty() {
            return Ok(());
        } else {
            plan::plan_dirty(&self.desired, &self.mirror, &batch.dirty)
        };
        let scope = (!batch.full).then_some(&batch.dirty);
        let progress = self
            .execute(
                plan,
                started,
                scope,
                &batch.removed_by,
                Cause::Events {
                    redumped,
                    rules_current,
                },
            )
            .await;
        self.retry_pending(progress).await;
        if followed {
            // What a new link brought is placed, or waits like any pending object.
            let pending = &self.pending;
            self.placing.retain(|id| pending.contains(id));
        }
        if settle.is_burst() {
            if settle.pace() == burst::Pace::AsItGoes {
                // Watched for a second removal: a deleter in passes after all.
                self.pacer.repaired(&batch.removed_ids, Instant::now());
            }
            drop(batch);
            release_freed_memory();
        }
        Ok(())
    }

    /// The pace of a burst (see `burst`): who removed its objects so far (looked up once per
    /// netlink port, synchronously: this decides whether to wait), and whether it removed again
    /// what the agent put back during a burst repaired as it goes.
    fn burst_pace(&mut self, batch: &Batch) -> burst::Pace {
        let now = Instant::now();
        self.pacer.prune(now);
        let unnamed: Vec<u32> = self
            .pacer
            .unnamed(&batch.removal_ports)
            .into_iter()
            .filter(|p| *p != attribution::KERNEL_PORT)
            .collect();
        if !unnamed.is_empty() {
            let started = Instant::now();
            let names = self.resolver.resolve(&unnamed);
            debug!(
                ports = ?unnamed,
                names = ?names,
                took_us = started.elapsed().as_micros() as u64,
                "deleters of a burst looked up"
            );
            for port in unnamed {
                let name = names
                    .get(&port)
                    .filter(|n| n.as_str() != attribution::UNKNOWN)
                    .cloned();
                self.pacer.learn(port, name, now);
            }
        }
        self.pacer
            .pace(&batch.removal_ports, &batch.removed_ids, now)
    }

    /// The agent does not hear its own changes (see `EventSocket::subscribe`), so what its repairs
    /// make possible — a link route that makes a pending gateway route's next hop reachable, an
    /// address a route needs — is retried here, for as long as the retries make progress.
    async fn retry_pending(&mut self, mut progress: plan::Progress) {
        let mut rounds = 0;
        while progress.repaired > 0 && !self.pending.is_empty() && rounds < 8 {
            rounds += 1;
            // Only what the repairs can have made possible: a thousand routes through a gateway
            // whose link lost its address are not tried again because other routes came back.
            let dirty = plan::unblocked(&self.desired, &self.pending, &progress);
            if dirty.is_empty() {
                return;
            }
            let plan = plan::plan_dirty(&self.desired, &self.mirror, &dirty);
            progress = self
                .execute(
                    plan,
                    Instant::now(),
                    Some(&dirty),
                    &HashMap::default(),
                    Cause::Pending,
                )
                .await;
        }
    }

    /// Records what one change means for this batch.
    fn note(&mut self, change: Change, port: u32, batch: &mut Batch) {
        match change {
            Change::Rule { key, removed } => {
                batch.appeared |= !removed;
                if removed && self.liveness.has_dismissed() {
                    self.liveness.undismiss(&ObjectId::Rule(key.clone()));
                }
                if removed && self.adopted.contains_key(&key) {
                    batch
                        .adopted_removed
                        .push((ObjectId::Rule(key.clone()), port));
                } else if !removed && !self.desired.rules.contains_key(&key) {
                    batch.adoption_changed |= self.adopt_rule(&key);
                }
                if self.desired.rules.contains_key(&key) {
                    let id = ObjectId::Rule(key.clone());
                    if removed {
                        batch.removed(&id, port);
                    }
                    batch.removed_by.insert(id, port);
                    batch.dirty.rules.insert(key);
                }
            }
            Change::Route { key, removed } => {
                batch.appeared |= !removed;
                if removed && self.liveness.has_dismissed() {
                    self.liveness.undismiss(&ObjectId::Route(key.clone()));
                }
                if removed && self.adopted_routes.contains_key(&key) {
                    batch
                        .adopted_removed
                        .push((ObjectId::Route(key.clone()), port));
                } else if !removed && !self.desired.routes.contains_key(&key) {
                    batch.adoption_changed |= self.adopt_route(&key);
                }
                if self.desired.routes.contains_key(&key) {
                    let id = ObjectId::Route(key.clone());
                    if removed {
                        batch.removed(&id, port);
                    }
                    batch.removed_by.insert(id, port);
                    batch.dirty.routes.insert(key);
                }
            }
            Change::Address { key, removed } => {
                if let Some(link) = self.mirror.link(key.ifindex) {
                    let dk = (link.name.clone(), key.address);
                    if self.desired.addresses.contains_key(&dk) {
                        let id = ObjectId::Address(dk.clone());
                        if removed {
                            batch.addresses_removed.push((id.clone(), port));
                        } else {
                            self.owner_returned(&id);
                        }
                        batch.removed_by.insert(id, port);
                        batch.dirty.addresses.insert(dk);
                    }
                }
                if removed {
                    // The kernel drops IPv4 routes that depended on the address (its prefix,
                    // gateways behind it, prefsrc) without RTM_DELROUTE.
                    let fam = Family::of(&key.address);
                    batch
                        .redump_reason
                        .get_or_insert(ResyncReason::AddressRemoved);
                    batch.redump = Some(match batch.redump {
                        None => Some(fam),
                        Some(Some(f)) if f == fam => Some(fam),
                        _ => None,
                    });
                } else {
                    batch.appeared = true;
                }
            }
            Change::LinkReady { .. } => {
                batch.full = true;
                batch.links_changed = true;
            }
            Change::LinkLost { .. } => {
                batch.redump_reason = Some(ResyncReason::LinkDown);
                batch.redump = Some(None);
                batch.full = true;
                batch.links_changed = true;
            }
            Change::RuleAddedAgain { key } => {
                // Our own adds are not heard (the socket filter), unless the filter could not be
                // attached: those are no second copy.
                if port != self.applier.port() && self.desired.rules.contains_key(&key) {
                    batch.rule_added_again = true;
                    batch.removed_by.insert(ObjectId::Rule(key.clone()), port);
                    batch.dirty.rules.insert(key);
                }
            }
            Change::RouteAppeared => batch.appeared = true,
            Change::LinkOther { .. }
            | Change::Neighbour { .. }
            | Change::Fdb { .. }
            | Change::Sysctl { .. } => self.note_node(change, port, batch),
            Change::Nothing => {}
        }
    }

    /// The adopted-state writer, for the netfilter guard to save its part of the file.
    pub fn adopted_store(&self) -> Option<crate::adopted_state::Writer> {
        self.store.clone()
    }

    /// Hands the adopted rules to the adopted-state writer (its thread does the disk work).
    fn save_adopted(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let mut rules: Vec<crate::adopted_state::AdoptedRule> = self
            .adopted
            .iter()
            .filter_map(|(key, selector)| {
                Some(crate::adopted_state::AdoptedRule {
                    selector: selector.clone(),
                    key: key.clone(),
                    protocol: self.desired.rules.get(key)?.protocol,
                })
            })
            .collect();
        rules.sort_by(|a, b| a.key.cmp(&b.key));
        let mut routes: Vec<crate::adopted_state::AdoptedRoute> = self
            .adopted_routes
            .iter()
            .filter_map(|(key, selector)| {
                Some(crate::adopted_state::AdoptedRoute {
                    selector: selector.clone(),
                    route: self.desired.routes.get(key)?.clone(),
                })
            })
            .collect();
        routes.sort_by(|a, b| a.route.key.cmp(&b.route.key));
        store.save(crate::adopted_state::AdoptedState {
            version: crate::adopted_state::VERSION,
            rules,
            routes,
            ..Default::default()
        });
    }

    /// Adopts a kernel rule the mirror holds if a selector matches it. True if adopted.
    fn adopt_rule(&mut self, key: &RuleKey) -> bool {
        if self.desired.adopt.is_empty()
            || self.desired.rules.contains_key(key)
            || (self.liveness.has_dismissed()
                && self.liveness.is_dismissed(&ObjectId::Rule(key.clone())))
        {
            return false;
        }
        let protocol = match self.mirror.rules.get(key) {
            Some(protos) => protos.first().copied().flatten(),
            None => return false,
        };
        let Some(sel) = adopt::select_rule(&self.desired.adopt, key, protocol) else {
            return false;
        };
        let rule: DesiredRule = sel.adopt_rule(key, protocol);
        info!(selector = %sel.name, object = %rule.describe(), "adopted");
        self.adopted.insert(key.clone(), sel.name.clone());
        self.desired.rules.insert(key.clone(), rule);
        true
    }

    /// Adopts a kernel route the mirror holds if a selector matches it. True if adopted.
    fn adopt_route(&mut self, key: &RouteKey) -> bool {
        if self.desired.adopt.is_empty()
            || self.desired.routes.contains_key(key)
            || (self.liveness.has_dismissed()
                && self.liveness.is_dismissed(&ObjectId::Route(key.clone())))
        {
            return false;
        }
        let Some(route) = self.mirror.routes.get(key).and_then(|l| l.first()) else {
            return false;
        };
        let device = route
            .oif
            .and_then(|i| self.mirror.link(i))
            .map(|l| l.name.as_str());
        let Some(sel) = adopt::select_route(&self.desired.adopt, key, route, device) else {
            return false;
        };
        let desired = sel.adopt_route(key, route, device);
        info!(selector = %sel.name, object = %desired.describe(), "adopted");
        self.adopted_routes.insert(key.clone(), sel.name.clone());
        self.desired.routes.insert(key.clone(), desired);
        true
    }

    /// Adopts every kernel rule a selector matches (after a dump). True if any was adopted.
    fn adopt_from_mirror(&mut self) -> bool {
        if self.desired.adopt.is_empty() {
            return false;
        }
        let keys: Vec<RuleKey> = self
            .mirror
            .rules
            .keys()
            .filter(|k| !self.desired.rules.contains_key(*k))
            .cloned()
            .collect();
        let mut any = false;
        for key in keys {
            any |= self.adopt_rule(&key);
        }
        let keys: Vec<RouteKey> = self
            .mirror
            .routes
            .keys()
            .filter(|k| !self.desired.routes.contains_key(*k))
            .cloned()
            .collect();
        for key in keys {
            any |= self.adopt_route(&key);
        }
        any
    }

    /// Decides, before any repair, which removed addresses are left to their owner for a while
    /// (see `handoff`): those leave the batch. One lookup of the removing processes serves the
    /// whole batch.
    fn hand_off_addresses(&mut self, batch: &mut Batch) {
        let removed = std::mem::take(&mut batch.addresses_removed);
        let mut ports: Vec<u32> = removed
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| *p != attribution::KERNEL_PORT)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let names = if ports.is_empty() {
            std::collections::HashMap::new()
        } else {
            self.resolver.resolve(&ports)
        };
        let now = Instant::now();
        for (id, port) in removed {
            let ObjectId::Address(dk) = &id else { continue };
            let (Some(want), Some(index)) = (
                self.desired.addresses.get(dk),
                self.mirror.link_index(&dk.0),
            ) else {
                continue;
            };
            let key = crate::model::AddressKey {
                ifindex: index,
                address: dk.1,
            };
            // Removed and added again within the batch: nothing to decide.
            if self.mirror.addresses.contains_key(&key) || want.mode != Mode::Enforce {
                continue;
            }
            let remover = match (port, names.get(&port).map(String::as_str)) {
                (attribution::KERNEL_PORT, _) => Remover::Kernel,
                (_, None | Some(attribution::UNKNOWN)) => Remover::Unknown,
                (_, Some(n)) => Remover::Process(n),
            };
            let handoff::Verdict::AwaitOwner(owner) =
                handoff::judge(want.managed_by.as_deref(), remover)
            else {
                continue;
            };
            info!(
                name = %want.name,
                object = %want.describe(),
                owner = %owner,
                netlink_port = port,
                grace_ms = self.handoff.grace().as_millis() as u64,
                "address removed by its owner; leaving it to the owner to put back"
            );
            self.handoff.await_owner(&id, &owner, port, now);
            batch.dirty.addresses.remove(dk);
            let reason = format!(
                "removed by {owner}, its owner: waiting for {owner} to put it back (up to {} ms)",
                self.handoff.grace().as_millis()
            );
            self.states
                .insert(id.clone(), (State::Pending, Some(reason.clone())));
            self.telemetry
                .board()
                .set_state(&id, State::Pending, Some(reason));
        }
    }

    /// A protected address came back while left to its owner: the owner put it back.
    fn owner_returned(&mut self, id: &ObjectId) {
        let Some(back) = self.handoff.returned(id, Instant::now()) else {
            return;
        };
        info!(
            name = %self.name_of(id),
            owner = %back.owner,
            waited_us = back.waited.as_micros() as u64,
            "address put back by its owner"
        );
        self.count_handoff("owner_restored");
    }

    /// Owners that did not put their address back within the grace: the agent does.
    async fn on_owner_late(&mut self) {
        let now = Instant::now();
        let late = self.handoff.expired(now);
        if late.is_empty() {
            return;
        }
        let mut dirty = Dirty::default();
        let mut removed_by = HashMap::default();
        for l in &late {
            info!(
                name = %self.name_of(&l.id),
                owner = %l.owner,
                waited_ms = l.waited.as_millis() as u64,
                "address not put back by its owner in time; restoring it"
            );
            self.count_handoff("grace_expired");
            // Its waiting state is no drift seen before: the repair is counted as a new one.
            self.states.remove(&l.id);
            if let ObjectId::Address(k) = &l.id {
                dirty.addresses.insert(k.clone());
            }
            removed_by.insert(l.id.clone(), l.port);
        }
        let plan = plan::plan_dirty(&self.desired, &self.mirror, &dirty);
        let progress = self
            .execute(plan, now, Some(&dirty), &removed_by, Cause::OwnerLate)
            .await;
        self.retry_pending(progress).await;
    }

    fn count_handoff(&self, outcome: &'static str) {
        self.telemetry
            .metrics
            .handoffs
            .get_or_create(&HandoffLabels { outcome })
            .inc();
    }

    /// Decides, before any repair, which removals of adopted rules were their owners': those
    /// are forgotten (and left out of the batch); the rest are drift like any other. One lookup
    /// of the removing processes serves the whole batch.
    fn judge_adopted_removals(&mut self, batch: &mut Batch) {
        let mut ports: Vec<u32> = batch.adopted_removed.iter().map(|(_, p)| *p).collect();
        ports.sort_unstable();
        ports.dedup();
        let identities = self.resolver.identify(&ports);
        for (id, port) in std::mem::take(&mut batch.adopted_removed) {
            // Removed and added again within the batch: still there, nothing to decide.
            let (present, selector) = match &id {
                ObjectId::Rule(k) => (self.mirror.rules.contains_key(k), self.adopted.get(k)),
                ObjectId::Route(k) => (
                    self.mirror.routes.contains_key(k),
                    self.adopted_routes.get(k),
                ),
                _ => continue,
            };
            let Some(sel_name) = selector.filter(|_| !present) else {
                continue;
            };
            let Some(sel) = self.desired.adopt.iter().find(|s| &s.name == sel_name) else {
                continue;
            };
            let who = identities.get(&port);
            let name = who.map(|w| w.name.as_str());
            let ancestors = who.map_or(&[][..], |w| w.ancestors.as_slice());
            let actor = match (port, name) {
                (attribution::KERNEL_PORT, _) => Actor::Kernel,
                (_, None) | (_, Some(attribution::UNKNOWN)) => Actor::Unknown,
                (_, Some(n)) => Actor::Process(n),
            };
            // A child of an owner (`ip` run by a CNI daemon) acts for the owner.
            let actor = sel.on_behalf(actor, ancestors);
            let verdict = sel.decide(actor);
            let actor_name = name.unwrap_or(attribution::UNKNOWN).to_string();
            let object = self.describe(&id);
            let reason = match actor {
                Actor::Unknown => "unknown_actor",
                _ => "owner",
            };
            if verdict == Verdict::Forget {
                info!(
                    selector = %sel.name,
                    actor = %actor_name,
                    ancestors = %ancestors.join(","),
                    netlink_port = port,
                    kind = kind_str(&id),
                    %object,
                    reason,
                    "forgotten: removed by its owner (or by nobody known, under unknownActor: forget)"
                );
                batch.dirty.remove(&id);
                self.drop_adopted(&id, reason);
                batch.removed_by.remove(&id);
                batch.adoption_changed = true;
            } else {
                debug!(selector = %sel.name, actor = %actor_name, ancestors = %ancestors.join(","), %object, "adopted object removed by a non-owner: drift");
            }
        }
    }

    /// Stops protecting an adopted object (it stays in the kernel as it is) and counts why.
    fn drop_adopted(&mut self, id: &ObjectId, reason: &'static str) {
        match id {
            ObjectId::Rule(k) => {
                self.adopted.remove(k);
                self.desired.rules.remove(k);
            }
            ObjectId::Route(k) => {
                self.adopted_routes.remove(k);
                self.desired.routes.remove(k);
            }
            _ => return,
        }
        self.pending.remove(id);
        self.pending_by.remove(id);
        self.reported.remove(id);
        self.failed.remove(id);
        if self.refused.remove(id) {
            self.telemetry.set_refused(self.refused.len());
        }
        self.states.remove(id);
        self.contest.retain(|i| i != id);
        self.telemetry
            .metrics
            .adopted_forgotten
            .get_or_create(&ForgetLabels {
                kind: kind_str(id),
                reason,
            })
            .inc();
    }

    /// Follows the adopted objects of `podLiveness` selectors that are tied to a pod IP (and
    /// only those), then judges them against the pods. True if any was forgotten or adopted
    /// again: the catalog and the adopted-state file are out of date.
    fn sync_liveness(&mut self) -> bool {
        if self.pods.is_none() {
            return false;
        }
        self.retrack();
        let changed = self.judge_pods();
        if changed {
            // Adopted again: followed again.
            self.retrack();
        }
        changed
    }

    /// Keeps dismissed only what is still in the kernel and would be adopted by a `podLiveness`
    /// selector; the rest may be adopted again as any object.
    fn prune_dismissed(&mut self) {
        let (m, adopt) = (&self.mirror, &self.desired.adopt);
        let follows =
            |s: Option<&adopt::AdoptSelector>| s.is_some_and(|s| s.pod_liveness.is_some());
        self.liveness.retain_dismissed(|id| match id {
            ObjectId::Rule(k) => m.rules.get(k).is_some_and(|p| {
                follows(adopt::select_rule(adopt, k, p.first().copied().flatten()))
            }),
            ObjectId::Route(k) => m.routes.get(k).and_then(|l| l.first()).is_some_and(|r| {
                let device = r.oif.and_then(|i| m.link(i)).map(|l| l.name.as_str());
                follows(adopt::select_route(adopt, k, r, device))
            }),
            _ => false,
        });
    }

    fn retrack(&mut self) {
        let adopt = &self.desired.adopt;
        let grace = |selector: &str| {
            adopt
                .iter()
                .find(|s| s.name == selector)
                .and_then(|s| s.pod_liveness)
        };
        let mut followed: HashSet<ObjectId> = HashSet::default();
        for (k, selector) in &self.adopted {
            let ip = pod_liveness::rule_ip(k.from.as_ref(), k.to.as_ref());
            if let (Some(g), Some(ip)) = (grace(selector), ip) {
                let id = ObjectId::Rule(k.clone());
                self.liveness.track(id.clone(), ip, g);
                followed.insert(id);
            }
        }
        for (k, selector) in &self.adopted_routes {
            if let (Some(g), Some(ip)) = (grace(selector), pod_liveness::route_ip(&k.destination)) {
                let id = ObjectId::Route(k.clone());
                self.liveness.track(id.clone(), ip, g);
                followed.insert(id);
            }
        }
        self.liveness.retain(|id| followed.contains(id));
    }

    /// Forgets the adopted objects whose pod is gone, adopts again those whose IP a pod holds
    /// again. True if anything changed.
    fn judge_pods(&mut self) -> bool {
        let Some(pods) = &self.pods else {
            return false;
        };
        let judgement = {
            // Held briefly: the Kubernetes thread waits for it to publish the next view.
            let view = pods.borrow();
            let judgement = self.liveness.judge(&view, Instant::now());
            if view.usable() {
                debug!(
                    pod_ips = view.ips.len(),
                    followed = self.liveness.len() + judgement.forget.len(),
                    held = self.liveness.held(),
                    "pod liveness"
                );
            }
            judgement
        };
        let mut changed = false;
        for (id, reason) in judgement.forget {
            let selector = match &id {
                ObjectId::Rule(k) => self.adopted.get(k),
                ObjectId::Route(k) => self.adopted_routes.get(k),
                _ => None,
            }
            .cloned()
            .unwrap_or_default();
            let object = self.describe(&id);
            info!(
                %selector,
                kind = kind_str(&id),
                %object,
                reason = %reason.as_str(),
                "forgotten: no pod on this node holds its IP"
            );
            self.drop_adopted(&id, reason.as_str());
            changed = true;
        }
        for id in judgement.revive {
            changed |= match &id {
                ObjectId::Rule(k) => self.adopt_rule(k),
                ObjectId::Route(k) => self.adopt_route(k),
                _ => false,
            };
        }
        changed
    }

    /// A new view of the pods, or the end of a grace period.
    fn on_pods(&mut self) {
        if self.judge_pods() {
            self.retrack();
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
    }

    fn describe(&self, id: &ObjectId) -> String {
        self.desired
            .entry(id)
            .map(|(_, describe, _)| describe)
            .unwrap_or_default()
    }

    /// Applies a plan's repairs, updates the mirror with what the kernel accepted and logs.
    /// `scope`: the objects the plan looked at (`None`: all of them). Repairs of contested objects
    /// are held back until their backoff runs out (the loop's backoff timer retries them).
    async fn execute(
        &mut self,
        mut plan: Plan,
        started: Instant,
        scope: Option<&Dirty>,
        removed_by: &HashMap<ObjectId, u32>,
        cause: Cause,
    ) -> plan::Progress {
        let now = Instant::now();
        let mut report = Report::default();
        if self.handoff.next_deadline().is_some() {
            // Left to their owners for now: no repair, and no drift to report yet.
            let h = &self.handoff;
            plan.steps.retain(|s| !h.is_waiting(&s.id));
            plan.drift.retain(|d| !h.is_waiting(&d.id));
        }
        // Who made the pending objects of this plan missing: their repair is that change's.
        let earlier: HashMap<ObjectId, u32> = if self.pending_by.is_empty() {
            HashMap::default()
        } else {
            plan.steps
                .iter()
                .filter_map(|s| Some((s.id.clone(), *self.pending_by.get(&s.id)?)))
                .collect()
        };
        let port_of = |id: &ObjectId| match (removed_by.get(id), id, cause) {
            (Some(p), _, _) => Some(*p),
            // Found missing after a re-dump: the kernel dropped it with an address or link.
            (None, ObjectId::Route(_), Cause::Events { redumped: true, .. }) => {
                Some(attribution::KERNEL_PORT)
            }
            _ => earlier.get(id).copied(),
        };
        let mut held: HashSet<ObjectId> = HashSet::default();
        // Objects already known not to be in sync (pending, failed): a retry, not new drift.
        let known: HashSet<ObjectId> = plan
            .steps
            .iter()
            .filter(|s| {
                self.pending.contains(&s.id)
                    || matches!(self.states.get(&s.id), Some((st, _)) if *st != State::Contested)
            })
            .map(|s| s.id.clone())
            .collect();
        if cause != Cause::Start {
            let metrics = &self.telemetry.metrics;
            let contest = &mut self.contest;
            let pending = &self.pending;
            let placing = &self.placing;
            plan.steps.retain(|step| {
                if placing.contains(&step.id) {
                    return true;
                }
                // A retry of a pending object (something appeared) is not a new removal: it
                // must not count towards a fight, or a route waiting for its gateway would be
                // held back after three retries.
                let decision = if pending.contains(&step.id) && !contest.is_held(&step.id, now) {
                    Decision::Now { fresh: false }
                } else {
                    contest.on_drift(&step.id, now)
                };
                let (fresh, keep, newly) = match decision {
                    Decision::Now { fresh } => (fresh, true, None),
                    Decision::Later {
                        due,
                        fresh,
                        newly_contested,
                    } => {
                        if fresh {
                            let kind = kind_str(&step.id);
                            metrics
                                .repairs_deferred
                                .get_or_create(&KindLabels { kind })
                                .inc();
                        }
                        (fresh, false, newly_contested.then(|| due - now))
                    }
                };
                if fresh && !known.contains(&step.id) {
                    report.detections.push(Detection {
                        id: step.id.clone(),
                        name: step.name.clone(),
                        port: port_of(&step.id),
                        newly_contested: newly,
                    });
                }
                if !keep {
                    held.insert(step.id.clone());
                }
                keep
            });
        }
        if plan.steps.iter().any(plan::Step::needs_gateway) {
            // Heard from now on: a route or address appearing anywhere may make this one possible
            // if it fails (pending objects are retried on what appears).
            self.widen_event_filter();
        }
        let outcomes = if plan.steps.is_empty() {
            Vec::new()
        } else {
            let rules = match cause {
                Cause::Events {
                    rules_current: true,
                    ..
                } => RuleAdd::Unchecked,
                _ => RuleAdd::Exclusive,
            };
            let outcomes = self.applier.apply(&plan.steps, rules).await;
            if let Cause::Events { .. } = cause {
                // The repair is in the kernel; what follows (metrics, logs, status, attribution)
                // can wait. The change woke whoever watches it, often on this CPU: let them run
                // first. On a busy node they otherwise waited for this bookkeeping and then a
                // CPU: the scale bench's listener saw the re-add up to 1.4 ms later at p99 (0.4
                // ms with the yield). With nothing else runnable this returns at once.
                std::thread::yield_now();
            }
            outcomes
        };
        let took = started.elapsed();
        let acked = Instant::now();
        let acked_unix = crate::obs::status::unix_now();
        let metrics = &self.telemetry.metrics;
        let mut restored: Vec<(Kind, &str)> = Vec::new();
        let mut placed: Vec<&str> = Vec::new();
        let mut repaired: HashSet<ObjectId> = HashSet::default();
        let mut now_pending: HashMap<ObjectId, Finding> = HashMap::default();
        for (step, outcome) in plan.steps.iter().zip(&outcomes) {
            let kind = kind_str(&step.id);
            let result = match outcome {
                Outcome::Applied => "applied",
                Outcome::AlreadyThere => "already_present",
                Outcome::NotYet(_) => "not_yet",
                Outcome::Failed(_) => "failed",
            };
            metrics
                .repairs
                .get_or_create(&RepairLabels { kind, result })
                .inc();
            match outcome {
                Outcome::Applied | Outcome::AlreadyThere => {
                    self.pending.remove(&step.id);
                    self.pending_by.remove(&step.id);
                    self.failed.remove(&step.id);
                    self.refused.remove(&step.id);
                    // The kernel said yes: mirror it now rather than waiting for the
                    // notification, so a burst does not re-plan what is already fixed.
                    for op in &step.ops {
                        apply::record(&mut self.mirror, op);
                    }
                    repaired.insert(step.id.clone());
                    if self.placing.remove(&step.id) {
                        placed.push(&step.name);
                        continue;
                    }
                    restored.push((step.id.kind(), &step.name));
                    if cause != Cause::Start {
                        self.contest.on_repaired(&step.id, acked);
                    }
                    if let Cause::Events { .. } = cause {
                        metrics
                            .repair_duration
                            .get_or_create(&KindLabels { kind })
                            .observe(took.as_secs_f64());
                    }
                }
                Outcome::NotYet(errno) => {
                    self.pending.insert(step.id.clone());
                    if let Some(port) = port_of(&step.id) {
                        self.pending_by.insert(step.id.clone(), port);
                    }
                    let errno_label = format!("{errno:?}");
                    metrics
                        .apply_errors
                        .get_or_create(&ErrorLabels {
                            kind,
                            errno: errno_label,
                        })
                        .inc();
                    let reason = format!(
                        "kernel says {errno} ({}); waiting for the device or gateway",
                        errno.desc()
                    );
                    now_pending.insert(step.id.clone(), Finding::Pending { reason });
                }
                Outcome::Failed(e) => {
                    self.failed.insert(step.id.clone());
                    let errno = e.label();
                    metrics
                        .apply_errors
                        .get_or_create(&ErrorLabels { kind, errno })
                        .inc();
                    if e.is_permission() {
                        self.refused.insert(step.id.clone());
                        error!(kind = %step.id.kind(), name = %step.name, error = %e, "repair refused: no permission to change the kernel (CAP_NET_ADMIN?); not ready");
                    } else {
                        self.refused.remove(&step.id);
                        error!(kind = %step.id.kind(), name = %step.name, error = %e, "repair failed");
                    }
                }
            }
        }
        {
            let mut board = self.telemetry.board();
            for id in &repaired {
                board.record_repair(id, acked_unix);
            }
        }
        self.telemetry.set_refused(self.refused.len());
        let observed = self.report(&plan, &now_pending, scope);
        if cause != Cause::Start {
            for (id, name) in observed
                .into_iter()
                .filter(|(id, _)| !self.placing.contains(id))
            {
                let port = port_of(&id);
                report.detections.push(Detection {
                    id,
                    name,
                    port,
                    newly_contested: None,
                });
            }
        }
        let mut touched: Vec<ObjectId> = plan.drift.iter().map(|d| d.id.clone()).collect();
        match scope {
            None => touched.extend(self.states.keys().cloned()),
            Some(d) => touched.extend(self.states.keys().filter(|id| in_scope(d, id)).cloned()),
        }
        let drift: HashMap<ObjectId, &Drift> =
            plan.drift.iter().map(|d| (d.id.clone(), d)).collect();
        self.update_states(&touched, &drift, &repaired);
        if cause == Cause::Retry {
            report.fighters = repaired
                .iter()
                .filter_map(|id| self.contest.fighter(id).map(str::to_string))
                .collect();
        }
        if !placed.is_empty() {
            info!(
                objects = placed.len(),
                names = %placed.iter().take(5).copied().collect::<Vec<_>>().join(","),
                "placed: newly protected by a config change or a new link"
            );
        }
        if !restored.is_empty() {
            let count = |k| restored.iter().filter(|(kind, _)| *kind == k).count() as u64;
            let names: Vec<&str> = restored.iter().take(5).map(|(_, n)| *n).collect();
            let mut by: Vec<u32> = restored_ports(&plan, &repaired, port_of);
            by.sort_unstable();
            by.dedup();
            report.at_start = cause == Cause::Start;
            report.restored = Some(Restored {
                counts: Kind::ALL.iter().map(|k| (k.as_str(), count(*k))).collect(),
                took_us: took.as_micros() as u64,
                names: names.join(","),
                ports: by,
            });
        }
        self.dispatch(report);
        plan::Progress::of(&plan, &repaired)
    }

    /// Sends a report's ports for lookup on the attribution thread (after the repair, so the
    /// lookup never delays it), or finishes it at once when no lookup is needed.
    fn dispatch(&mut self, report: Report) {
        let mut ports: Vec<u32> = report
            .detections
            .iter()
            .filter_map(|d| d.port)
            .chain(report.restored.iter().flat_map(|r| r.ports.iter().copied()))
            .filter(|p| *p != attribution::KERNEL_PORT)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        if report.detections.is_empty() && report.restored.is_none() {
            return;
        }
        if !ports.is_empty() {
            if let Some(tx) = &self.attribution {
                let id = self.next_report;
                self.next_report += 1;
                if tx.send(attribution::Request { id, ports }).is_ok() {
                    self.awaiting.insert(id, report);
                    return;
                }
            }
        }
        self.finish(report, &std::collections::HashMap::new());
    }

    /// Counts and logs a report's drift and repairs with the processes behind them.
    fn finish(&mut self, report: Report, names: &std::collections::HashMap<u32, String>) {
        let actor_of = |port: Option<u32>| -> String {
            match port {
                None => attribution::UNKNOWN.to_string(),
                Some(attribution::KERNEL_PORT) => attribution::KERNEL.to_string(),
                Some(p) => names
                    .get(&p)
                    .cloned()
                    .unwrap_or_else(|| attribution::UNKNOWN.to_string()),
            }
        };
        let mut board_actors: Vec<(ObjectId, String, Option<String>)> = Vec::new();
        for d in &report.detections {
            let actor = actor_of(d.port);
            let label = self.actors.label(&actor);
            let kind = kind_str(&d.id);
            self.telemetry
                .metrics
                .drift_detected
                .get_or_create(&DriftLabels {
                    kind,
                    actor: label.clone(),
                })
                .inc();
            debug!(kind, name = %d.name, actor = %actor, netlink_port = ?d.port, "drift");
            let fighter = if self.contest.is_contested(&d.id) {
                self.contest.set_fighter(&d.id, &label);
                Some(label)
            } else {
                None
            };
            if let Some(delay) = d.newly_contested {
                self.telemetry.notice(crate::obs::Notice::Contested {
                    kind,
                    name: d.name.clone(),
                    actor: actor.clone(),
                });
                warn!(
                    kind,
                    name = %d.name,
                    actor = %actor,
                    backoff_ms = delay.as_millis() as u64,
                    "contested: removed again right after each repair; repairs back off"
                );
            }
            board_actors.push((d.id.clone(), actor, fighter));
        }
        if !board_actors.is_empty() {
            let mut board = self.telemetry.board();
            for (id, actor, fighter) in &board_actors {
                board.record_actor(id, actor);
                if let Some(f) = fighter {
                    if board.state(id) == Some(State::Contested) {
                        board.set_fighter(id, f);
                    }
                }
            }
        }
        if let Some(r) = report.restored {
            let mut actors: Vec<String> = r.ports.iter().map(|p| actor_of(Some(*p))).collect();
            actors.extend(report.fighters.iter().cloned());
            actors.sort();
            actors.dedup();
            if actors.is_empty() {
                // Found missing by a dump (start, resync, a pending retry): nobody was seen.
                actors.push(attribution::UNKNOWN.to_string());
            }
            let n = |kind: &str| {
                r.counts
                    .iter()
                    .find(|(k, _)| *k == kind)
                    .map_or(0, |(_, n)| *n)
            };
            if report.at_start {
                // Not a repair of anything seen removed: a first start, a reboot, or a removal
                // while the agent was down; the listener knows which (Kubernetes mode).
                info!(
                    rules = n("rule"),
                    routes = n("route"),
                    addresses = n("address"),
                    neighbours = n("neighbour"),
                    fdb = n("fdb"),
                    links = n("link"),
                    sysctls = n("sysctl"),
                    took_us = r.took_us,
                    names = %r.names,
                    "put in place at start"
                );
                self.telemetry
                    .notice(crate::obs::Notice::PlacedAtStart { counts: r.counts });
                return;
            }
            info!(
                rules = n("rule"),
                routes = n("route"),
                addresses = n("address"),
                neighbours = n("neighbour"),
                fdb = n("fdb"),
                links = n("link"),
                sysctls = n("sysctl"),
                took_us = r.took_us,
                names = %r.names,
                actor = %actors.join(","),
                removed_by_netlink_port = ?r.ports,
                "restored"
            );
            self.telemetry.notice(crate::obs::Notice::Restored {
                counts: r.counts,
                actor: actors.join(","),
            });
        }
    }

    /// Recomputes the state of `ids` and publishes the changes to the board.
    fn update_states(
        &mut self,
        ids: &[ObjectId],
        drift: &HashMap<ObjectId, &Drift>,
        repaired: &HashSet<ObjectId>,
    ) {
        let mut changes: Vec<(ObjectId, State, Option<String>)> = Vec::new();
        for id in ids {
            let (state, reason) = if !protects(&self.desired, id) {
                continue;
            } else if self.contest.is_contested(id) {
                (State::Contested, None)
            } else if let Some(Finding::Pending { reason }) = self.reported.get(id) {
                (State::Pending, Some(reason.clone()))
            } else if self.pending.contains(id) {
                (State::Pending, None)
            } else if self.failed.contains(id) {
                (State::Drifted, Some("the last repair failed".to_string()))
            } else {
                match drift.get(id) {
                    Some(d) if repaired.contains(id) => {
                        let _ = d;
                        (State::InSync, None)
                    }
                    Some(d) => {
                        let what = match &d.finding {
                            Finding::Missing => "missing".to_string(),
                            Finding::Different { observed } => format!("different: {observed}"),
                            Finding::Pending { reason } => reason.clone(),
                        };
                        match (&d.finding, d.mode) {
                            (Finding::Pending { .. }, _) => (State::Pending, Some(what)),
                            (_, Mode::Observe) => (State::ObserveOnly, Some(what)),
                            _ => (State::Drifted, Some(what)),
                        }
                    }
                    None => (State::InSync, None),
                }
            };
            let old = self.states.get(id);
            if state == State::InSync {
                if self.states.remove(id).is_some() {
                    changes.push((id.clone(), state, None));
                }
            } else if old != Some(&(state, reason.clone())) {
                self.states.insert(id.clone(), (state, reason.clone()));
                changes.push((id.clone(), state, reason));
            }
        }
        if !changes.is_empty() {
            let mut board = self.telemetry.board();
            for (id, state, reason) in changes {
                board.set_state(&id, state, reason);
                if state == State::Contested {
                    if let Some(f) = self.contest.fighter(&id) {
                        board.set_fighter(&id, f);
                    }
                }
            }
        }
    }

    /// Logs drift that is not being repaired (observe mode, pending) when it starts and stops.
    /// Returns the objects newly found drifted in observe mode.
    fn report(
        &mut self,
        plan: &Plan,
        now_pending: &HashMap<ObjectId, Finding>,
        scope: Option<&Dirty>,
    ) -> Vec<(ObjectId, String)> {
        let mut observed = Vec::new();
        let mut seen: HashSet<ObjectId> = HashSet::default();
        let mut newly_pending: Vec<(&Drift, &str)> = Vec::new();
        for d in &plan.drift {
            let finding = now_pending.get(&d.id).unwrap_or(&d.finding);
            let repaired = d.mode == Mode::Enforce
                && !matches!(finding, Finding::Pending { .. })
                && !now_pending.contains_key(&d.id);
            seen.insert(d.id.clone());
            if repaired {
                self.reported.remove(&d.id);
                continue;
            }
            if self.reported.get(&d.id) == Some(finding) {
                continue;
            }
            if d.mode == Mode::Observe && !matches!(finding, Finding::Pending { .. }) {
                observed.push((d.id.clone(), d.name.clone()));
            }
            match finding {
                Finding::Pending { reason } => newly_pending.push((d, reason)),
                Finding::Missing => {
                    warn!(kind = %d.kind, name = %d.name, object = %d.object, mode = "observe", "drift: missing")
                }
                Finding::Different { observed } => {
                    warn!(kind = %d.kind, name = %d.name, object = %d.object, %observed, mode = "observe", "drift: different")
                }
            }
            self.reported.insert(d.id.clone(), finding.clone());
        }
        log_pending(&newly_pending);
        // A pending object the plan looked at and found nothing wrong with is no longer pending.
        let looked_at = |id: &ObjectId| scope.is_none_or(|d| d.contains(id));
        self.pending
            .retain(|id| seen.contains(id) || !looked_at(id));
        let pending = &self.pending;
        self.pending_by.retain(|id, _| pending.contains(id));
        // Anything reported before, looked at by this plan and not drifted is back in sync (also
        // after a plan of only the objects events touched: otherwise the next drift of an
        // observe-mode object would match the stale report and go unlogged).
        let back: Vec<ObjectId> = self
            .reported
            .keys()
            .filter(|id| !seen.contains(id) && looked_at(id))
            .cloned()
            .collect();
        for id in back {
            self.reported.remove(&id);
            info!(kind = %id.kind(), "back in sync");
        }
        observed
    }
}

/// Objects newly found pending, one warning each when they are few; one warning per reason,
/// with a count and the first names, when many wait for the same thing (a networkd restart leaves
/// a thousand routes through its gateway waiting for its address: a thousand lines said nothing
/// more than one). Each is still logged at debug.
fn log_pending(pending: &[(&Drift, &str)]) {
    /// Up to this many objects of one reason are logged one by one.
    const EACH: usize = 3;
    let mut by_reason: Vec<(&str, Vec<&Drift>)> = Vec::new();
    for (d, reason) in pending {
        match by_reason.iter_mut().find(|(r, _)| r == reason) {
            Some((_, list)) => list.push(d),
            None => by_reason.push((reason, vec![d])),
        }
    }
    for (reason, list) in by_reason {
        if list.len() <= EACH {
            for d in list {
                warn!(kind = %d.kind, name = %d.name, object = %d.object, %reason, "pending");
            }
            continue;
        }
        for d in &list {
            debug!(kind = %d.kind, name = %d.name, object = %d.object, %reason, "pending");
        }
        let names: Vec<&str> = list.iter().take(5).map(|d| d.name.as_str()).collect();
        warn!(
            objects = list.len(),
            names = %names.join(","),
            %reason,
            "pending: objects that cannot be applied yet"
        );
    }
}

/// Gives the heap a burst's plan used back to the system. One plan for thousands of objects
/// peaks at several MiB; glibc keeps freed memory below the top of its heap, and the idle agent
/// would then show that peak as its resident size for good (62 MiB instead of 49 MiB after the
/// repair bench's mass rounds). Bursts are rare, so the trim's cost does not matter.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

/// Objects `new` protects that `old` did not.
fn newly_protected(old: &DesiredState, new: &DesiredState) -> HashSet<ObjectId> {
    new.ids().filter(|id| !old.protects(id)).collect()
}

fn kind_str(id: &ObjectId) -> &'static str {
    id.kind().as_str()
}

fn in_scope(d: &Dirty, id: &ObjectId) -> bool {
    d.contains(id)
}

/// Which routes the mirror keeps: the protected ones, and every route of the tables adopt
/// selectors look at.
fn route_interest(d: &DesiredState) -> RouteInterest {
    let keys = d.routes.keys().cloned().collect();
    let tables = adopt::route_tables(&d.adopt);
    if tables.is_empty() {
        RouteInterest::Keys(keys)
    } else {
        RouteInterest::KeysAndTables(keys, tables)
    }
}

/// Whether the desired state protects an object.
fn protects(desired: &DesiredState, id: &ObjectId) -> bool {
    desired.protects(id)
}

/// Ports of the changes behind the repairs that went through.
fn restored_ports(
    plan: &Plan,
    repaired: &HashSet<ObjectId>,
    port_of: impl Fn(&ObjectId) -> Option<u32>,
) -> Vec<u32> {
    plan.steps
        .iter()
        .filter(|s| repaired.contains(&s.id))
        .filter_map(|s| port_of(&s.id))
        .collect()
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
