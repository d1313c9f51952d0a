//! Telling what a plan found and did: drift and repairs counted and logged with the processes
//! behind them (looked up on the attribution thread), transitions of unrepaired drift logged.

use crate::model::fast::{HashMap, HashSet};
use crate::model::Mode;
use crate::model::ObjectId;
use crate::observe::kernel;
use crate::plan::{Dirty, Drift, Finding, Plan};
use crate::telemetry::attribution;
use crate::telemetry::metrics::DriftLabels;
use crate::telemetry::status::State;
use std::time::Duration;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{kind_str, Agent};

/// Drift found by one plan, reported once its actor is known.
#[derive(Debug)]
pub(super) struct Detection {
    pub(super) id: ObjectId,
    pub(super) name: String,
    /// The netlink port of the change (0: kernel); none known: `unknown`.
    pub(super) port: Option<u32>,
    /// This drift made the object contested; the delay of its held-back repair.
    pub(super) newly_contested: Option<Duration>,
}

/// The `restored` log line.
#[derive(Debug)]
pub(super) struct Restored {
    /// Objects put back, by kind (every kind, in [`Kind::ALL`] order).
    pub(super) counts: Vec<(&'static str, u64)>,
    pub(super) took_us: u64,
    pub(super) names: String,
    pub(super) ports: Vec<u32>,
}

/// What a plan's execution has to say once the processes behind the changes are known.
#[derive(Debug, Default)]
pub(super) struct Report {
    pub(super) detections: Vec<Detection>,
    pub(super) restored: Option<Restored>,
    /// Known fighters of the contested objects whose held-back repairs went through.
    pub(super) fighters: Vec<String>,
    /// From the initial sync: what it restores was missing at start, nobody was seen removing it.
    pub(super) at_start: bool,
}

/// Objects newly found pending, one warning each when they are few; one warning per reason,
/// with a count and the first names, when many wait for the same thing (a networkd restart leaves
/// a thousand routes through its gateway waiting for its address: a thousand lines said nothing
/// more than one). Each is still logged at debug.
pub(super) fn log_pending(pending: &[(&Drift, &str)]) {
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

/// Starts the attribution thread: its requests, the filter of its socket, and the loop's own
/// resolver for decisions that need the actor at once (it uses what the thread's watcher saw
/// too: a short-lived owner is gone by then). Without the thread actors are unknown.
pub(super) fn spawn_attribution(
    answers: mpsc::UnboundedSender<attribution::Answer>,
    own_port: u32,
) -> (
    Option<std::sync::mpsc::Sender<attribution::Request>>,
    Option<kernel::EventFilter>,
    attribution::Resolver,
) {
    let resolver = attribution::Resolver::default();
    match attribution::spawn_filtered(answers, Some(own_port)) {
        Ok(spawned) => (
            Some(spawned.requests),
            spawned.filter,
            resolver.with_sightings(spawned.sightings),
        ),
        Err(e) => {
            warn!(error = %e, "cannot start the attribution thread; actors will be unknown");
            (None, None, resolver)
        }
    }
}

/// The process behind a change: its name from `names`, `kernel` for the kernel's own, or
/// `unknown`.
fn actor_of(port: Option<u32>, names: &std::collections::HashMap<u32, String>) -> String {
    match port {
        None => attribution::UNKNOWN.to_string(),
        Some(attribution::KERNEL_PORT) => attribution::KERNEL.to_string(),
        Some(p) => names
            .get(&p)
            .cloned()
            .unwrap_or_else(|| attribution::UNKNOWN.to_string()),
    }
}

impl Agent {
    /// Sends a report's ports for lookup on the attribution thread (after the repair, so the
    /// lookup never delays it), or finishes it at once when no lookup is needed.
    pub(super) fn dispatch(&mut self, report: Report) {
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
    pub(super) fn finish(
        &mut self,
        report: Report,
        names: &std::collections::HashMap<u32, String>,
    ) {
        self.count_detections(&report.detections, names);
        if let Some(r) = report.restored {
            self.tell_restored(r, &report.fighters, report.at_start, names);
        }
    }

    /// Counts drift by actor, names the fighters of contested objects, and puts the actors on
    /// the board.
    fn count_detections(
        &mut self,
        detections: &[Detection],
        names: &std::collections::HashMap<u32, String>,
    ) {
        let mut board_actors: Vec<(ObjectId, String, Option<String>)> = Vec::new();
        for d in detections {
            let actor = actor_of(d.port, names);
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
                self.telemetry.notice(crate::telemetry::Notice::Contested {
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
        if board_actors.is_empty() {
            return;
        }
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

    /// The `restored` log line and notice (at start: `put in place at start`, nobody having
    /// been seen removing anything).
    fn tell_restored(
        &self,
        r: Restored,
        fighters: &[String],
        at_start: bool,
        names: &std::collections::HashMap<u32, String>,
    ) {
        let mut actors: Vec<String> = r.ports.iter().map(|p| actor_of(Some(*p), names)).collect();
        actors.extend(fighters.iter().cloned());
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
        if at_start {
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
                .notice(crate::telemetry::Notice::PlacedAtStart { counts: r.counts });
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
        self.telemetry.notice(crate::telemetry::Notice::Restored {
            counts: r.counts,
            actor: actors.join(","),
        });
    }

    /// Logs drift that is not being repaired (observe mode, pending) when it starts and stops.
    /// Returns the objects newly found drifted in observe mode.
    pub(super) fn report(
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
                self.ledger.set_reported(&d.id, None);
                continue;
            }
            if self.ledger.reported(&d.id) == Some(finding) {
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
            self.ledger.set_reported(&d.id, Some(finding.clone()));
        }
        log_pending(&newly_pending);
        // A pending object the plan looked at and found nothing wrong with is no longer pending.
        let looked_at = |id: &ObjectId| scope.is_none_or(|d| d.contains(id));
        self.ledger
            .retain_pending(|id| seen.contains(id) || !looked_at(id));
        // Anything reported before, looked at by this plan and not drifted is back in sync (also
        // after a plan of only the objects events touched: otherwise the next drift of an
        // observe-mode object would match the stale report and go unlogged).
        for id in self.ledger.back_in_sync(|id| seen.contains(id), looked_at) {
            info!(kind = %id.kind(), "back in sync");
        }
        observed
    }
}
