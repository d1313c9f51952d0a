//! Configured sets (`spec.ipsets`), polled: ipset sends no notifications.
//!
//! Each set is read with `ipset save NAME` (no header-only shortcut: swapping one member for
//! another leaves `ipset list -t` unchanged); when the text is byte-for-byte what it was at the
//! last in-sync read, nothing is parsed or planned, which keeps a quiet 10,000-member set cheap.
//! A set's creation options are remembered as seen, so that a set destroyed is recreated as its
//! owner made it (`timeout 0` included, or members added with a timeout would fail).

use super::{digest, Guard, Tools};
use crate::model::Mode;
use crate::netfilter::model::{DesiredSet, Member};
use crate::netfilter::plan::{self, SetDrift, SetFinding, SetRepair};
use crate::netfilter::{render, tools};
use crate::telemetry::status::State;
use crate::telemetry::Notice;
use std::time::Instant;
use tracing::{error, info, warn};

impl<T: Tools> Guard<T> {
    /// Checks the protected sets (adopted ones first). `full` re-plans regardless of the text.
    pub(super) async fn sync_sets(&mut self, full: bool) {
        self.sync_adopted_sets(full).await;
        if self.sets.is_empty() {
            return;
        }
        let started = Instant::now();
        let mut drifts: Vec<SetDrift> = Vec::new();
        let mut repairs = Vec::new();
        let sets = self.sets.clone();
        for d in &sets {
            if let Some((drift, repair)) = self.plan_one(d, full).await {
                drifts.push(drift);
                repairs.extend(repair);
            }
        }
        let applied = self.apply_sets(&repairs).await;
        let took = started.elapsed();
        for d in &drifts {
            self.report_set(d, applied, took);
        }
    }

    /// Reads and plans one set; `None` when it is in sync (or cannot be read).
    async fn plan_one(&mut self, d: &DesiredSet, full: bool) -> Option<(SetDrift, Vec<SetRepair>)> {
        self.stats.set_reads += 1;
        let text = match self.tools.ipset_save_text(&d.set).await {
            Ok(t) => t,
            Err(e) => {
                error!(set = %d.set, error = %e, "cannot read the set");
                return None;
            }
        };
        let digest = text.as_deref().map(digest);
        if !full && self.ledger.digest_unchanged(&d.name, digest) {
            return None;
        }
        let observed = match text
            .as_deref()
            .map(|t| tools::parse_set(&d.set, t))
            .transpose()
        {
            Ok(o) => o.flatten(),
            Err(e) => {
                error!(set = %d.set, error = %e, "cannot read the set");
                return None;
            }
        };
        if let Some(o) = &observed {
            self.ledger.set_seen_options(&d.name, o.options.clone());
        }
        let seen = self.ledger.seen_options(&d.name).map(<[String]>::to_vec);
        let (drift, repair) = plan::plan_set(d, observed.as_ref(), seen.as_deref());
        match drift {
            None => {
                self.ledger.no_forbidden(&d.name);
                self.ledger.set_digest(&d.name, digest);
                if self.ledger.in_sync(&d.name) {
                    self.out.state(&d.name, State::InSync, None);
                    info!(kind = "ipset", name = %d.name, "back in sync");
                }
                None
            }
            Some(drift) => {
                self.ledger.set_digest(&d.name, None);
                Some((drift, repair))
            }
        }
    }

    /// One `ipset restore` for every set's repair. True when it went through (or there was
    /// nothing to do).
    async fn apply_sets(&mut self, repairs: &[SetRepair]) -> bool {
        if repairs.is_empty() {
            return true;
        }
        let input = render::ipset_restore(repairs);
        match self.tools.ipset_restore(&input).await {
            Ok(()) => true,
            Err(e) => {
                self.stats.repair_failures += 1;
                self.out.repairs("ipset", "failed", repairs.len());
                error!(kind = "ipset", error = %e, "repair failed");
                false
            }
        }
    }

    /// Counts, tells and logs one set's drift and what was done about it.
    fn report_set(&mut self, d: &SetDrift, applied: bool, took: std::time::Duration) {
        let text = d
            .findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ");
        let repaired = d.mode == Mode::Enforce && applied;
        self.report_forbidden(d, repaired);
        let repairable = d.findings.iter().any(SetFinding::repairable);
        if repaired && repairable {
            self.stats.set_repairs += 1;
            self.out.repairs("ipset", "applied", 1);
            // Forbidden members alone are told as such, not as a set restored.
            if d.findings
                .iter()
                .any(|f| !matches!(f, SetFinding::Forbidden { .. }) && f.repairable())
            {
                // Sets are polled: who changed one is not known.
                self.out.tell(Notice::Restored {
                    counts: vec![("ipset", 1)],
                    actor: "unknown".to_owned(),
                });
            }
            self.out.repaired(&d.name, "unknown");
            if d.findings.iter().all(SetFinding::repairable) {
                self.ledger.in_sync(&d.name);
            }
            info!(kind = "ipset", name = %d.name, set = %d.object, what = %text, took_us = took.as_micros() as u64, "restored");
        }
        let left: Vec<String> = d
            .findings
            .iter()
            .filter(|f| !repaired || !f.repairable())
            .map(ToString::to_string)
            .collect();
        if left.is_empty() {
            return;
        }
        let left = left.join("; ");
        if self.ledger.report(&d.name, &left) {
            let (state, mode) = if d.mode == Mode::Observe {
                (State::ObserveOnly, "observe")
            } else {
                (State::Drifted, "enforce")
            };
            self.out.state(&d.name, state, Some(left.clone()));
            warn!(kind = "ipset", name = %d.name, set = %d.object, mode, drift = %left, "drift");
        }
    }

    /// Forbidden members: counted and logged at `warn`; in observe mode each once while it stays.
    fn report_forbidden(&mut self, d: &SetDrift, removed: bool) {
        let mut forbidden: Vec<Member> = d.forbidden().to_vec();
        if d.mode == Mode::Observe {
            // Still there since the last poll: already reported and counted.
            forbidden = self.ledger.new_forbidden(&d.name, &forbidden);
        }
        if forbidden.is_empty() {
            return;
        }
        let n = forbidden.len() as u64;
        self.stats.forbidden_members += n;
        if removed {
            self.stats.forbidden_removed += n;
            self.out.tell(Notice::ForbiddenRemoved {
                set: d.object.clone(),
                members: forbidden.iter().map(ToString::to_string).collect(),
            });
        }
        let action = if removed { "removed" } else { "reported" };
        self.out.forbidden(action, forbidden.len());
        for m in &forbidden {
            warn!(
                kind = "ipset",
                name = %d.name,
                set = %d.object,
                member = %m,
                action,
                mode = if d.mode == Mode::Enforce { "enforce" } else { "observe" },
                forbidden_total = self.stats.forbidden_members,
                "forbidden member in protected set"
            );
        }
    }
}
