//! Events into a batch: each change the mirror took is noted (what is dirty, what was removed
//! and by which port, what calls for a re-dump), a burst of removals is read on until it settles,
//! then the batch is planned and executed.

use crate::model::fast::{HashMap, HashSet};
use crate::model::ObjectId;
use crate::model::{AddressKey, Family};
use crate::observe::events::Event;
use crate::observe::kernel;
use crate::observe::Change;
use crate::plan::{self, Dirty};
use crate::telemetry::attribution;
use crate::telemetry::metrics::BurstLabels;
use std::time::Instant;
use tracing::{debug, warn};

use super::{burst, Agent, Cause, ReconcileError, ResyncReason};

/// Most events folded into one plan; the rest wait for the next turn of the loop.
pub(super) const MAX_BATCH: usize = 16_384;

/// What a batch of events calls for.
#[derive(Default)]
pub(super) struct Batch {
    pub(super) dirty: Dirty,
    /// Re-plan everything (a link appeared or was lost, routes were re-dumped).
    pub(super) full: bool,
    /// Something was added: pending objects may be applicable now.
    pub(super) appeared: bool,
    pub(super) overrun: bool,
    /// Re-dump the routes of a family (`Some(None)`: all families).
    pub(super) redump: Option<Option<Family>>,
    /// Why the routes are re-dumped.
    pub(super) redump_reason: Option<ResyncReason>,
    /// Netlink port of the socket that sent the last change (removal or otherwise) of each
    /// protected object: the process that made it (0: the kernel).
    pub(super) removed_by: HashMap<ObjectId, u32>,
    /// Adopted rules removed in this batch, with the port of the removal: an owner's removal
    /// is forgotten rather than repaired.
    pub(super) adopted_removed: Vec<(ObjectId, u32)>,
    /// Protected addresses removed in this batch, with the port of the removal: an owner's
    /// removal is left to the owner first (see `handoff`).
    pub(super) addresses_removed: Vec<(ObjectId, u32)>,
    /// Rules were adopted or forgotten: the status catalog is out of date.
    pub(super) adoption_changed: bool,
    /// Protected objects seen removed (a burst holds the repair until they stop).
    pub(super) removals: usize,
    /// The protected objects removed, and the ports of the processes that removed them (few),
    /// to decide a burst's pace and to see when its deleters are done.
    pub(super) removed_ids: HashSet<ObjectId>,
    pub(super) removal_ports: Vec<u32>,
    /// Someone else added a protected rule the mirror already held: the rules are re-dumped to
    /// count the copies.
    pub(super) rule_added_again: bool,
    /// A link appeared, went or was renamed: device patterns may cover other links now.
    pub(super) links_changed: bool,
    /// A `default` setting changed: the kernel copies it, silently, to every device that never
    /// had its own value written.
    pub(super) sysctl_default_changed: bool,
    /// Adopted neighbour and FDB entries removed in this batch (judged like adopted rules).
    pub(super) adopted_node_removed: Vec<ObjectId>,
    /// An object was removed twice in this batch (someone put it back in between).
    pub(super) removed_again: bool,
}

impl Batch {
    /// A protected rule or route was removed by the process behind `port`.
    fn removed(&mut self, id: &ObjectId, port: u32) {
        self.removals += 1;
        if !self.removed_ids.insert(id.clone()) {
            self.removed_again = true;
        }
        if !self.removal_ports.contains(&port) {
            self.removal_ports.push(port);
        }
    }
}

/// Gives the heap a burst's plan used back to the system. One plan for thousands of objects
/// peaks at several MiB; glibc keeps freed memory below the top of its heap, and the idle agent
/// would then show that peak as its resident size for good (measured: docs/benchmarks.md,
/// "Things the bench had to allow for"). Bursts are rare, so the trim's cost does not matter.
pub(super) fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and releases the allocator's own free memory.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}

impl Agent {
    /// Folds a batch of queued events into the mirror, then repairs what they touched.
    pub(super) async fn on_events(&mut self, first: Event) -> Result<(), ReconcileError> {
        let started = Instant::now();
        let mut batch = Batch::default();
        let mut settle = burst::Settle::new(started);
        // Decided before reading: this batch may hold notifications older than the last dump.
        let mut rules_current = !self.rules_maybe_stale;
        let count = self.read_batch(first, &mut batch, &mut settle).await?;
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
        self.judge_removals(&mut batch);
        if batch.overrun {
            self.telemetry.metrics.overruns.inc();
            warn!("netlink events were lost (socket overrun); re-reading the kernel state");
            return self.full_resync(ResyncReason::Overrun).await;
        }
        let (redumped, rules_reread) = self.redump(&mut batch).await?;
        rules_current &= !rules_reread;
        if batch.appeared {
            for id in self.ledger.pending() {
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
        let cause = Cause::Events {
            redumped,
            rules_current,
        };
        let progress = self
            .execute(plan, started, scope, &batch.removed_by, cause)
            .await;
        self.retry_pending(progress).await;
        if followed {
            // What a new link brought is placed, or waits like any pending object.
            self.ledger.placed_unless_pending();
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

    /// Folds `first` and the events queued behind it into the mirror and notes them in `batch`;
    /// a held burst of removals is read on until it settles. Returns how many events were read.
    async fn read_batch(
        &mut self,
        first: Event,
        batch: &mut Batch,
        settle: &mut burst::Settle,
    ) -> Result<usize, ReconcileError> {
        let mut next = Some(first);
        let mut count = 0;
        while let Some(event) = next.take() {
            count += 1;
            match event {
                Event::Overrun => batch.overrun = true,
                Event::Message(m, port) => {
                    let change = self.mirror.ingest(&m);
                    self.note(change, port, batch);
                }
                Event::Netconf(n) => {
                    let change = self.mirror.ingest_netconf(&n);
                    self.note(change, attribution::KERNEL_PORT, batch);
                }
            }
            if batch.removals > settle.removals() {
                let was_burst = settle.is_burst();
                settle.seen(batch.removals, Instant::now());
                if settle.is_burst() && !was_burst {
                    settle.set_pace(self.burst_pace(batch));
                }
                if batch.removed_again {
                    settle.removed_again();
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
            while next.is_none() && !batch.overrun {
                match settle.step(Instant::now()) {
                    burst::Step::Plan => break,
                    burst::Step::Look => {
                        let open = self.resolver.any_open(&batch.removal_ports);
                        settle.looked(open, Instant::now());
                        if !open {
                            // What the deleters did before they closed is queued by now.
                            next = self.events.try_next();
                        }
                    }
                    burst::Step::Wait(wait) => {
                        match tokio::time::timeout(wait, self.events.next()).await {
                            Ok(Some(ev)) => next = Some(ev),
                            Ok(None) => return Err(ReconcileError::EventsClosed),
                            Err(_) => {} // quiet so far
                        }
                    }
                }
            }
        }
        Ok(count)
    }

    /// Before any repair: judges the removals of adopted objects (an owner's are forgotten),
    /// leaves addresses their owner removed to the owner, and brings the catalog and the
    /// adopted-state file up to date.
    fn judge_removals(&mut self, batch: &mut Batch) {
        if !batch.adopted_removed.is_empty() {
            self.judge_adopted_removals(batch);
        }
        if !batch.adopted_node_removed.is_empty() {
            self.judge_adopted_node_removals(batch);
        }
        if !batch.addresses_removed.is_empty() {
            self.hand_off_addresses(batch);
        }
        if batch.adoption_changed {
            if self.sync_liveness() {
                let d = &self.desired;
                batch.dirty.retain(|id| d.protects(id));
            }
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
    }

    /// Re-reads what the batch says the kernel may have changed silently or twice: the routes
    /// (after an address or link went) and the rules (a protected rule added again). Returns
    /// whether the routes were re-read and whether the rules were.
    async fn redump(&mut self, batch: &mut Batch) -> Result<(bool, bool), ReconcileError> {
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
        if !batch.rule_added_again {
            return Ok((redumped, false));
        }
        // Counts the copies: a second one is removed by the plan (the keys are dirty).
        self.count_resync(ResyncReason::RuleAddedAgain);
        self.rules_maybe_stale = true;
        kernel::dump_rules(&mut self.handle, &mut self.mirror).await?;
        Ok((redumped, true))
    }

    /// The pace of a burst (see `burst`): who removed its objects so far (looked up once per
    /// netlink port, synchronously: this decides whether to wait), and whether it removed again
    /// what the agent put back during a burst repaired as it goes.
    pub(super) fn burst_pace(&mut self, batch: &Batch) -> burst::Pace {
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

    /// Records what one change means for this batch.
    pub(super) fn note(&mut self, change: Change, port: u32, batch: &mut Batch) {
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
            Change::Address { key, removed } => self.note_address(&key, removed, port, batch),
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

    /// An address added or removed: a protected one is dirty (and, removed, maybe left to its
    /// owner); a removal re-dumps the routes (the kernel drops IPv4 routes that depended on the
    /// address, its prefix, gateways behind it, prefsrc, without RTM_DELROUTE).
    fn note_address(&mut self, key: &AddressKey, removed: bool, port: u32, batch: &mut Batch) {
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
        if !removed {
            batch.appeared = true;
            return;
        }
        let fam = Family::of(&key.address);
        batch
            .redump_reason
            .get_or_insert(ResyncReason::AddressRemoved);
        batch.redump = Some(match batch.redump {
            None => Some(fam),
            Some(Some(f)) if f == fam => Some(fam),
            _ => None,
        });
    }
}
