//! Re-reading the kernel: full refreshes (start, timer, overrun, a new config), the event
//! filter, held-back repairs whose time came, and pending objects retried after progress.

use super::Reload;
use crate::adopt;
use crate::desired::DesiredState;
use crate::model::fast::{HashMap, HashSet};
use crate::model::ObjectId;
use crate::observe::kernel;
use crate::plan::{self, Dirty};
use crate::telemetry::attribution;
use crate::telemetry::metrics::ReasonLabels;
use std::time::Instant;
use tracing::{debug, info};

use super::adoption::route_interest;
use super::{protects, Agent, Cause, ReconcileError, ResyncReason};

/// Objects `new` protects that `old` did not.
pub(super) fn newly_protected(old: &DesiredState, new: &DesiredState) -> HashSet<ObjectId> {
    new.ids().filter(|id| !old.protects(id)).collect()
}

impl Agent {
    /// A new config: protect what it names from now on.
    pub(super) async fn reload(&mut self, reload: Reload) -> Result<(), ReconcileError> {
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
        // Forgets what the new config no longer protects (placements too).
        self.ledger.retain(|id| protects(d, id));
        for id in newly_protected(&old, d) {
            self.ledger.set_placing(&id);
        }
        self.mirror.set_interest(route_interest(d));
        self.sync_interest();
        let d = &self.desired;
        self.telemetry.set_refused(self.ledger.refused_count());
        self.contest.retain(|id| protects(d, id));
        self.handoff.retain(|id| protects(d, id));
        self.telemetry.set_catalog(d);
        self.save_adopted();
        let r = self.full_resync(ResyncReason::ConfigChange).await;
        // What is in place now was placed; what is still pending is placed when it can be.
        self.ledger.placed_unless_pending();
        r
    }

    /// Held-back repairs whose time has come; fights that stopped.
    pub(super) async fn on_backoff_timer(&mut self) {
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

    /// Narrows the event socket to the route tables the mirror keeps, or widens it to every
    /// table while something is pending (a route added anywhere can make a gateway reachable).
    /// True if it was widened: a route that appeared just before was not heard, so the caller
    /// retries what is pending.
    pub(super) fn sync_event_filter(&mut self) -> bool {
        if let Some(f) = &mut self.sightings_filter {
            f.set_tables(self.mirror.route_tables());
        }
        let Some(filter) = &mut self.event_filter else {
            return false;
        };
        let tables = if !self.ledger.has_pending() {
            self.mirror.route_tables()
        } else {
            None
        };
        let widened = tables.is_none() && filter.tables().is_some();
        filter.set_tables(tables) && widened
    }

    /// Lets route notifications of every table through (see `sync_event_filter`).
    pub(super) fn widen_event_filter(&mut self) {
        if let Some(filter) = &mut self.event_filter {
            filter.set_tables(None);
        }
    }

    pub(super) async fn full_resync(&mut self, reason: ResyncReason) -> Result<(), ReconcileError> {
        let started = Instant::now();
        // Before the dump: a new config's tables must be heard from now on.
        self.sync_event_filter();
        self.count_resync(reason);
        self.rules_maybe_stale = true;
        kernel::dump_all(&mut self.handle, &mut self.mirror).await?;
        let adopted_node = self.refresh_node_state(reason != ResyncReason::Start);
        self.prune_dismissed();
        let adopted = self.adopt_from_mirror() | adopted_node;
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

    pub(super) fn count_resync(&self, reason: ResyncReason) {
        self.telemetry
            .metrics
            .resyncs
            .get_or_create(&ReasonLabels {
                reason: reason.as_str(),
            })
            .inc();
    }

    /// The agent does not hear its own changes (see `EventSocket::subscribe`), so what its repairs
    /// make possible — a link route that makes a pending gateway route's next hop reachable, an
    /// address a route needs — is retried here, for as long as the retries make progress.
    pub(super) async fn retry_pending(&mut self, mut progress: plan::Progress) {
        let mut rounds = 0;
        while progress.repaired > 0 && self.ledger.has_pending() && rounds < 8 {
            rounds += 1;
            // Only what the repairs can have made possible: a thousand routes through a gateway
            // whose link lost its address are not tried again because other routes came back.
            let dirty = plan::unblocked(&self.desired, self.ledger.pending(), &progress);
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
}
