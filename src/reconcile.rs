//! The reconcile loop: one task that owns the mirror, the desired state and the applier.
//!
//! Fast path: a batch of events is folded into the mirror; if it touched protected objects, only
//! those are re-planned and repaired at once. Events that can hide silent kernel deletions (an
//! address removed, a link down or gone) re-dump the routes first. A lost event (overrun) and the
//! resync timer re-dump everything.

use crate::apply::{self, Applier, Outcome};
use crate::desired::DesiredState;
use crate::model::{Family, Kind, Mode};
use crate::observe::kernel::{self, Events, ObserveError};
use crate::observe::{Change, Mirror, RouteInterest};
use crate::plan::{self, Dirty, Finding, ObjectId, Plan};
use futures::StreamExt;
use rtnetlink::packet_core::{NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::SocketAddr;
use rtnetlink::Handle;
use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::time::{Duration, Instant};
use thiserror::Error;
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
    /// Netlink port of the socket that sent each removal: the process that removed it.
    removed_by: HashMap<ObjectId, u32>,
}

/// Why a full refresh ran.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResyncReason {
    Start,
    Timer,
    Overrun,
}

impl ResyncReason {
    fn as_str(self) -> &'static str {
        match self {
            ResyncReason::Start => "start",
            ResyncReason::Timer => "timer",
            ResyncReason::Overrun => "overrun",
        }
    }
}

/// Counters kept by the loop (exported as metrics by the observability layer).
#[derive(Clone, Debug, Default)]
pub struct Stats {
    pub repairs: u64,
    pub repair_failures: u64,
    pub resyncs: u64,
    pub overruns: u64,
    pub events: u64,
}

pub struct Agent {
    desired: DesiredState,
    mirror: Mirror,
    handle: Handle,
    applier: Applier,
    events: Events,
    resync: Duration,
    /// What was last said about each drifted object, so logs speak of transitions, not repeats.
    reported: HashMap<ObjectId, Finding>,
    /// Enforced objects that could not be applied yet. Retried when something appears (a link,
    /// an address, a route, a rule): any of those can make a device or gateway available.
    pending: HashSet<ObjectId>,
    pub stats: Stats,
}

impl Agent {
    /// Subscribes to kernel events, dumps the kernel and repairs everything once. Events that
    /// happen during the dump are queued and handled by [`Agent::run`].
    pub async fn start(desired: DesiredState, resync: Duration) -> Result<Agent, ReconcileError> {
        let events = kernel::subscribe()?;
        let handle = kernel::connect()?;
        let interest = RouteInterest::Keys(desired.routes.keys().cloned().collect());
        let mut agent = Agent {
            desired,
            mirror: Mirror::new(interest),
            applier: Applier::new(handle.clone()),
            handle,
            events,
            resync,
            reported: HashMap::new(),
            pending: HashSet::new(),
            stats: Stats::default(),
        };
        agent.full_resync(ResyncReason::Start).await?;
        let drifted = agent.reported.len();
        info!(
            protected = agent.desired.len(),
            rules = agent.desired.rules.len(),
            routes = agent.desired.routes.len(),
            addresses = agent.desired.addresses.len(),
            still_drifted = drifted,
            "initial sync done"
        );
        Ok(agent)
    }

    pub fn mirror(&self) -> &Mirror {
        &self.mirror
    }

    /// Runs until `shutdown` completes. Leaves every object in place on the way out.
    pub async fn run(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<Stats, ReconcileError> {
        tokio::pin!(shutdown);
        let mut timer =
            tokio::time::interval_at(tokio::time::Instant::now() + self.resync, self.resync);
        timer.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                biased;
                _ = &mut shutdown => {
                    info!("shutting down; protected state stays in place");
                    return Ok(self.stats);
                }
                ev = self.events.next() => {
                    let Some(first) = ev else { return Err(ReconcileError::EventsClosed) };
                    self.on_events(first).await?;
                }
                _ = timer.tick() => {
                    self.full_resync(ResyncReason::Timer).await?;
                }
            }
        }
    }

    async fn full_resync(&mut self, reason: ResyncReason) -> Result<(), ReconcileError> {
        let started = Instant::now();
        self.stats.resyncs += 1;
        kernel::dump_all(&mut self.handle, &mut self.mirror).await?;
        debug!(
            reason = reason.as_str(),
            mirrored = self.mirror.len(),
            took_us = started.elapsed().as_micros() as u64,
            "full refresh"
        );
        let plan = plan::plan_all(&self.desired, &self.mirror);
        self.execute(plan, started, None, &HashMap::new()).await;
        Ok(())
    }

    /// Folds a batch of queued events into the mirror, then repairs what they touched.
    async fn on_events(
        &mut self,
        first: (NetlinkMessage<RouteNetlinkMessage>, SocketAddr),
    ) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let mut batch = Batch::default();
        let mut next = Some(first);
        let mut count = 0;
        while let Some((msg, _)) = next.take() {
            count += 1;
            let port = msg.header.port_number;
            match msg.payload {
                NetlinkPayload::Overrun(_) => batch.overrun = true,
                NetlinkPayload::InnerMessage(m) => {
                    let change = self.mirror.ingest(&m);
                    self.note(change, port, &mut batch);
                }
                _ => {}
            }
            if count < MAX_BATCH {
                next = self.events.try_recv().ok();
            }
        }
        self.stats.events += count as u64;
        if batch.overrun {
            self.stats.overruns += 1;
            warn!("netlink events were lost (socket overrun); re-reading the kernel state");
            return self.full_resync(ResyncReason::Overrun).await;
        }
        if let Some(family) = batch.redump {
            if !self.desired.routes.is_empty() {
                kernel::dump_routes(&mut self.handle, &mut self.mirror, family).await?;
                batch.full = true;
            }
        }
        if batch.appeared {
            for id in &self.pending {
                match id {
                    ObjectId::Rule(k) => batch.dirty.rules.insert(k.clone()),
                    ObjectId::Route(k) => batch.dirty.routes.insert(k.clone()),
                    ObjectId::Address(k) => batch.dirty.addresses.insert(k.clone()),
                };
            }
        }
        let plan = if batch.full {
            plan::plan_all(&self.desired, &self.mirror)
        } else if batch.dirty.is_empty() {
            return Ok(());
        } else {
            plan::plan_dirty(&self.desired, &self.mirror, &batch.dirty)
        };
        let scope = (!batch.full).then_some(&batch.dirty);
        self.execute(plan, started, scope, &batch.removed_by).await;
        Ok(())
    }

    /// Records what one change means for this batch.
    fn note(&self, change: Change, port: u32, batch: &mut Batch) {
        match change {
            Change::Rule { key, removed } => {
                batch.appeared |= !removed;
                if self.desired.rules.contains_key(&key) {
                    if removed {
                        batch.removed_by.insert(ObjectId::Rule(key.clone()), port);
                    }
                    batch.dirty.rules.insert(key);
                }
            }
            Change::Route { key, removed } => {
                batch.appeared |= !removed;
                if self.desired.routes.contains_key(&key) {
                    if removed {
                        batch.removed_by.insert(ObjectId::Route(key.clone()), port);
                    }
                    batch.dirty.routes.insert(key);
                }
            }
            Change::Address { key, removed } => {
                if let Some(link) = self.mirror.link(key.ifindex) {
                    let dk = (link.name.clone(), key.address);
                    if self.desired.addresses.contains_key(&dk) {
                        if removed {
                            batch.removed_by.insert(ObjectId::Address(dk.clone()), port);
                        }
                        batch.dirty.addresses.insert(dk);
                    }
                }
                if removed {
                    // The kernel drops IPv4 routes that depended on the address (its prefix,
                    // gateways behind it, prefsrc) without RTM_DELROUTE.
                    let fam = Family::of(&key.address);
                    batch.redump = Some(match batch.redump {
                        None => Some(fam),
                        Some(Some(f)) if f == fam => Some(fam),
                        _ => None,
                    });
                } else {
                    batch.appeared = true;
                }
            }
            Change::LinkReady { .. } => batch.full = true,
            Change::LinkLost { .. } => {
                batch.redump = Some(None);
                batch.full = true;
            }
            Change::LinkOther | Change::Nothing => {}
        }
    }

    /// Applies a plan's repairs, updates the mirror with what the kernel accepted and logs.
    /// `scope`: the objects the plan looked at (`None`: all of them).
    async fn execute(
        &mut self,
        plan: Plan,
        started: Instant,
        scope: Option<&Dirty>,
        removed_by: &HashMap<ObjectId, u32>,
    ) {
        let outcomes = if plan.steps.is_empty() {
            Vec::new()
        } else {
            self.applier.apply(&plan.steps).await
        };
        let took = started.elapsed();
        let mut restored: Vec<(Kind, &str)> = Vec::new();
        let mut now_pending: HashMap<ObjectId, Finding> = HashMap::new();
        for (step, outcome) in plan.steps.iter().zip(&outcomes) {
            match outcome {
                Outcome::Applied | Outcome::AlreadyThere => {
                    self.pending.remove(&step.id);
                    // The kernel said yes: mirror it now rather than waiting for the
                    // notification, so a burst does not re-plan what is already fixed.
                    for op in &step.ops {
                        self.mirror.ingest(&apply::message(op));
                    }
                    self.stats.repairs += 1;
                    restored.push((step.id.kind(), &step.name));
                    if let Some(port) = removed_by.get(&step.id) {
                        debug!(kind = %step.id.kind(), name = %step.name, netlink_port = port, "restored");
                    }
                }
                Outcome::NotYet(errno) => {
                    self.pending.insert(step.id.clone());
                    let reason = format!(
                        "kernel says {errno} ({}); waiting for the device or gateway",
                        errno.desc()
                    );
                    now_pending.insert(step.id.clone(), Finding::Pending { reason });
                }
                Outcome::Failed(e) => {
                    self.stats.repair_failures += 1;
                    error!(kind = %step.id.kind(), name = %step.name, error = %e, "repair failed");
                }
            }
        }
        self.report(&plan, &now_pending, scope);
        if !restored.is_empty() {
            let count = |k| restored.iter().filter(|(kind, _)| *kind == k).count();
            let names: Vec<&str> = restored.iter().take(5).map(|(_, n)| *n).collect();
            let by: Vec<u32> = {
                let mut v: Vec<u32> = removed_by.values().copied().collect();
                v.sort_unstable();
                v.dedup();
                v
            };
            info!(
                rules = count(Kind::Rule),
                routes = count(Kind::Route),
                addresses = count(Kind::Address),
                took_us = took.as_micros() as u64,
                names = %names.join(","),
                removed_by_netlink_port = ?by,
                "restored"
            );
        }
    }

    /// Logs drift that is not being repaired (observe mode, pending) when it starts and stops.
    fn report(
        &mut self,
        plan: &Plan,
        now_pending: &HashMap<ObjectId, Finding>,
        scope: Option<&Dirty>,
    ) {
        let mut seen: HashSet<ObjectId> = HashSet::new();
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
            match finding {
                Finding::Pending { reason } => {
                    warn!(kind = %d.kind, name = %d.name, object = %d.object, %reason, "pending")
                }
                Finding::Missing => {
                    warn!(kind = %d.kind, name = %d.name, object = %d.object, mode = "observe", "drift: missing")
                }
                Finding::Different { observed } => {
                    warn!(kind = %d.kind, name = %d.name, object = %d.object, %observed, mode = "observe", "drift: different")
                }
            }
            self.reported.insert(d.id.clone(), finding.clone());
        }
        // A pending object the plan looked at and found nothing wrong with is no longer pending.
        let looked_at = |id: &ObjectId| match (scope, id) {
            (None, _) => true,
            (Some(d), ObjectId::Rule(k)) => d.rules.contains(k),
            (Some(d), ObjectId::Route(k)) => d.routes.contains(k),
            (Some(d), ObjectId::Address(k)) => d.addresses.contains(k),
        };
        self.pending
            .retain(|id| seen.contains(id) || !looked_at(id));
        if scope.is_none() {
            // Anything reported before and absent from a complete plan is back in sync.
            let back: Vec<ObjectId> = self
                .reported
                .keys()
                .filter(|id| !seen.contains(id))
                .cloned()
                .collect();
            for id in back {
                self.reported.remove(&id);
                info!(kind = %id.kind(), "back in sync");
            }
        }
    }
}
