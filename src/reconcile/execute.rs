//! Executing a plan: contested objects' repairs held back, the rest applied, the outcomes written
//! to the ledger and the mirror, the board brought up to date.

use crate::apply::{self, Outcome, RuleAdd};
use crate::model::fast::{HashMap, HashSet};
use crate::model::Kind;
use crate::model::ObjectId;
use crate::plan::{self, Dirty, Drift, Finding, Plan};
use crate::telemetry::attribution;
use crate::telemetry::contest::Decision;
use crate::telemetry::metrics::{ErrorLabels, KindLabels, RepairLabels};
use crate::telemetry::status::State;
use std::time::{Duration, Instant};
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

/// Who made the objects of a plan the way they are.
struct Ports<'a> {
    removed_by: &'a HashMap<ObjectId, u32>,
    /// Of pending objects: the change that made them missing, seen before this plan.
    earlier: HashMap<ObjectId, u32>,
    cause: Cause,
}

impl Ports<'_> {
    /// The netlink port of the change behind `id` (0: the kernel); `None`: not known.
    fn of(&self, id: &ObjectId) -> Option<u32> {
        match (self.removed_by.get(id), id, self.cause) {
            (Some(p), _, _) => Some(*p),
            // Found missing after a re-dump: the kernel dropped it with an address or link.
            (None, ObjectId::Route(_), Cause::Events { redumped: true, .. }) => {
                Some(attribution::KERNEL_PORT)
            }
            _ => self.earlier.get(id).copied(),
        }
    }
}

/// What the kernel took of a plan.
#[derive(Default)]
struct Done<'p> {
    /// Objects now in place.
    repaired: HashSet<ObjectId>,
    /// Objects the kernel would not take yet, and why.
    now_pending: HashMap<ObjectId, Finding>,
    /// Objects put back, by kind and name.
    restored: Vec<(Kind, &'p str)>,
    /// Objects newly protected and now in place (nobody removed them).
    placed: Vec<&'p str>,
}

impl Done<'_> {
    /// Logs the placements; the `restored` report of the repairs, if any.
    fn summary(&self, plan: &Plan, ports: &Ports, took: Duration) -> Option<Restored> {
        if !self.placed.is_empty() {
            info!(
                objects = self.placed.len(),
                names = %self.placed.iter().take(5).copied().collect::<Vec<_>>().join(","),
                "placed: newly protected by a config change or a new link"
            );
        }
        if self.restored.is_empty() {
            return None;
        }
        let count = |k| self.restored.iter().filter(|(kind, _)| *kind == k).count() as u64;
        let names: Vec<&str> = self.restored.iter().take(5).map(|(_, n)| *n).collect();
        let mut by: Vec<u32> = restored_ports(plan, &self.repaired, |id| ports.of(id));
        by.sort_unstable();
        by.dedup();
        Some(Restored {
            counts: Kind::ALL.iter().map(|k| (k.as_str(), count(*k))).collect(),
            took_us: took.as_micros() as u64,
            names: names.join(","),
            ports: by,
        })
    }
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
        let mut report = Report::default();
        if self.handoff.next_deadline().is_some() {
            // Left to their owners for now: no repair, and no drift to report yet.
            let h = &self.handoff;
            plan.steps.retain(|s| !h.is_waiting(&s.id));
            plan.drift.retain(|d| !h.is_waiting(&d.id));
        }
        let ports = Ports {
            removed_by,
            earlier: self.pending_ports(&plan),
            cause,
        };
        if cause != Cause::Start {
            self.hold_back(&mut plan, &ports, &mut report);
        }
        if plan.steps.iter().any(plan::Step::needs_gateway) {
            // Heard from now on: a route or address appearing anywhere may make this one possible
            // if it fails (pending objects are retried on what appears).
            self.widen_event_filter();
        }
        let outcomes = self.apply_steps(&plan, cause).await;
        let took = started.elapsed();
        let done = self.record_outcomes(&plan, &outcomes, &ports, took);
        self.telemetry.set_refused(self.ledger.refused_count());
        let observed = self.report(&plan, &done.now_pending, scope);
        if cause != Cause::Start {
            for (id, name) in observed
                .into_iter()
                .filter(|(id, _)| !self.ledger.is_placing(id))
            {
                let port = ports.of(&id);
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
        self.update_states(&touched, &drift, &done.repaired);
        if cause == Cause::Retry {
            report.fighters = done
                .repaired
                .iter()
                .filter_map(|id| self.contest.fighter(id).map(str::to_string))
                .collect();
        }
        report.restored = done.summary(&plan, &ports, took);
        report.at_start = cause == Cause::Start;
        self.dispatch(report);
        plan::Progress::of(&plan, &done.repaired)
    }

    /// Who made the pending objects of a plan missing: their repair is that change's.
    fn pending_ports(&self, plan: &Plan) -> HashMap<ObjectId, u32> {
        if !self.ledger.has_pending() {
            return HashMap::default();
        }
        plan.steps
            .iter()
            .filter_map(|s| Some((s.id.clone(), self.ledger.pending_port(&s.id)?)))
            .collect()
    }

    /// Holds back the repairs of contested objects (the loop's backoff timer retries them) and
    /// notes new drift in `report`.
    fn hold_back(&mut self, plan: &mut Plan, ports: &Ports, report: &mut Report) {
        let now = Instant::now();
        // Objects already known not to be in sync (pending, failed): a retry, not new drift.
        let known: HashSet<ObjectId> = plan
            .steps
            .iter()
            .filter(|s| self.ledger.known_out_of_sync(&s.id))
            .map(|s| s.id.clone())
            .collect();
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
                    port: ports.of(&step.id),
                    newly_contested: newly,
                });
            }
            keep
        });
    }

    /// Sends the plan's requests to the kernel: one outcome per step.
    async fn apply_steps(&mut self, plan: &Plan, cause: Cause) -> Vec<Outcome> {
        if plan.steps.is_empty() {
            return Vec::new();
        }
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
            // first: on a busy node they otherwise waited for this bookkeeping and then a
            // CPU, which showed in the scale bench's p99 (docs/benchmarks.md, "A big routing
            // table"). With nothing else runnable this returns at once.
            std::thread::yield_now();
        }
        outcomes
    }

    /// Counts each outcome, writes it to the ledger and (what the kernel took) to the mirror
    /// and the board.
    fn record_outcomes<'p>(
        &mut self,
        plan: &'p Plan,
        outcomes: &[Outcome],
        ports: &Ports,
        took: Duration,
    ) -> Done<'p> {
        let cause = ports.cause;
        let acked = Instant::now();
        let acked_unix = crate::telemetry::status::unix_now();
        let mut done = Done::default();
        for (step, outcome) in plan.steps.iter().zip(outcomes) {
            let kind = kind_str(&step.id);
            let result = match outcome {
                Outcome::Applied => "applied",
                Outcome::AlreadyThere => "already_present",
                Outcome::NotYet(_) => "not_yet",
                Outcome::Failed(_) => "failed",
            };
            let metrics = &self.telemetry.metrics;
            metrics
                .repairs
                .get_or_create(&RepairLabels { kind, result })
                .inc();
            match outcome {
                Outcome::Applied | Outcome::AlreadyThere => {
                    self.record_applied(step, cause, acked, took, &mut done);
                }
                Outcome::NotYet(errno) => {
                    self.ledger.not_yet(&step.id, ports.of(&step.id));
                    metrics
                        .apply_errors
                        .get_or_create(&ErrorLabels {
                            kind,
                            errno: format!("{errno:?}"),
                        })
                        .inc();
                    let reason = format!(
                        "kernel says {errno} ({}); waiting for the device or gateway",
                        errno.desc()
                    );
                    done.now_pending
                        .insert(step.id.clone(), Finding::Pending { reason });
                }
                Outcome::Failed(e) => self.record_failed(step, e),
            }
        }
        let mut board = self.telemetry.board();
        for id in &done.repaired {
            board.record_repair(id, acked_unix);
        }
        done
    }

    /// The kernel took the step: mirrored at once, and counted as placed (a first placement)
    /// or restored (a repair, timed when events showed the drift).
    fn record_applied<'p>(
        &mut self,
        step: &'p plan::Step,
        cause: Cause,
        acked: Instant,
        took: Duration,
        done: &mut Done<'p>,
    ) {
        let placement = self.ledger.applied(&step.id);
        // The kernel said yes: mirror it now rather than waiting for the
        // notification, so a burst does not re-plan what is already fixed.
        for op in &step.ops {
            apply::record(&mut self.mirror, op);
        }
        done.repaired.insert(step.id.clone());
        if placement {
            done.placed.push(&step.name);
            return;
        }
        done.restored.push((step.id.kind(), &step.name));
        if cause != Cause::Start {
            self.contest.on_repaired(&step.id, acked);
        }
        if let Cause::Events { .. } = cause {
            self.telemetry
                .metrics
                .repair_duration
                .get_or_create(&KindLabels {
                    kind: kind_str(&step.id),
                })
                .observe(took.as_secs_f64());
        }
    }

    /// The kernel refused the step for good (or for lack of permission: then not ready).
    fn record_failed(&mut self, step: &plan::Step, e: &apply::ApplyError) {
        self.ledger.failed(&step.id, e.is_permission());
        self.telemetry
            .metrics
            .apply_errors
            .get_or_create(&ErrorLabels {
                kind: kind_str(&step.id),
                errno: e.label(),
            })
            .inc();
        if e.is_permission() {
            error!(kind = %step.id.kind(), name = %step.name, error = %e, "repair refused: no permission to change the kernel (CAP_NET_ADMIN?); not ready");
        } else {
            error!(kind = %step.id.kind(), name = %step.name, error = %e, "repair failed");
        }
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
