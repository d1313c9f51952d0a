//! Executing a plan: contested objects' repairs held back, the rest applied, the outcomes written
//! to the ledger and the mirror, the board brought up to date.

use crate::apply::{self, Outcome, RuleAdd};
use crate::model::fast::{HashMap, HashSet};
use crate::model::Kind;
use crate::obs::attribution;
use crate::obs::contest::Decision;
use crate::obs::metrics::{ErrorLabels, KindLabels, RepairLabels};
use crate::obs::status::State;
use crate::plan::{self, Dirty, Drift, Finding, ObjectId, Plan};
use std::time::Instant;
use tracing::{error, info};

use super::tell::{Detection, Report, Restored};
use super::{kind_str, protects, Agent, Cause};

pub(super) fn in_scope(d: &Dirty, id: &ObjectId) -> bool {
    d.contains(id)
}

/// Ports of the changes behind the repairs that went through.
pub(super) fn restored_ports(
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

impl Agent {
    /// Applies a plan's repairs, updates the mirror with what the kernel accepted and logs.
    /// `scope`: the objects the plan looked at (`None`: all of them). Repairs of contested objects
    /// are held back until their backoff runs out (the loop's backoff timer retries them).
    pub(super) async fn execute(
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
        let earlier: HashMap<ObjectId, u32> = if !self.ledger.has_pending() {
            HashMap::default()
        } else {
            plan.steps
                .iter()
                .filter_map(|s| Some((s.id.clone(), self.ledger.pending_port(&s.id)?)))
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
            .filter(|s| self.ledger.known_out_of_sync(&s.id))
            .map(|s| s.id.clone())
            .collect();
        if cause != Cause::Start {
            let metrics = &self.telemetry.metrics;
            let contest = &mut self.contest;
            let ledger = &self.ledger;
            plan.steps.retain(|step| {
                if ledger.is_placing(&step.id) {
                    return true;
                }
                // A retry of a pending object (something appeared) is not a new removal: it
                // must not count towards a fight, or a route waiting for its gateway would be
                // held back after three retries.
                let decision = if ledger.is_pending(&step.id) && !contest.is_held(&step.id, now) {
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
                    let placement = self.ledger.applied(&step.id);
                    // The kernel said yes: mirror it now rather than waiting for the
                    // notification, so a burst does not re-plan what is already fixed.
                    for op in &step.ops {
                        apply::record(&mut self.mirror, op);
                    }
                    repaired.insert(step.id.clone());
                    if placement {
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
                    self.ledger.not_yet(&step.id, port_of(&step.id));
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
                    self.ledger.failed(&step.id, e.is_permission());
                    let errno = e.label();
                    metrics
                        .apply_errors
                        .get_or_create(&ErrorLabels { kind, errno })
                        .inc();
                    if e.is_permission() {
                        error!(kind = %step.id.kind(), name = %step.name, error = %e, "repair refused: no permission to change the kernel (CAP_NET_ADMIN?); not ready");
                    } else {
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
        self.telemetry.set_refused(self.ledger.refused_count());
        let observed = self.report(&plan, &now_pending, scope);
        if cause != Cause::Start {
            for (id, name) in observed
                .into_iter()
                .filter(|(id, _)| !self.ledger.is_placing(id))
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
            None => touched.extend(self.ledger.boarded().cloned()),
            Some(d) => touched.extend(self.ledger.boarded().filter(|id| in_scope(d, id)).cloned()),
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

    /// Recomputes the state of `ids` and publishes the changes to the board.
    pub(super) fn update_states(
        &mut self,
        ids: &[ObjectId],
        drift: &HashMap<ObjectId, &Drift>,
        repaired: &HashSet<ObjectId>,
    ) {
        let mut changes: Vec<(ObjectId, State, Option<String>)> = Vec::new();
        for id in ids {
            if !protects(&self.desired, id) {
                continue;
            }
            let contested = self.contest.is_contested(id);
            let found = drift.get(id).map(|d| (&d.finding, d.mode));
            if let Some((state, reason)) =
                self.ledger
                    .restate(id, contested, found, repaired.contains(id))
            {
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
}
