//! What the engine says about its tables: logs, metrics, the status board and the notices that
//! become Kubernetes Events. Decisions stay in the engine; these only tell them.

use super::{Engine, Planned, Why};
use crate::model::Mode;
use crate::nftables::plan::{self, TableDrift};
use crate::nftables::runner::{Nft, NftError};
use crate::telemetry::metrics::{DriftLabels, ForbiddenLabels, KindLabels, RepairLabels};
use crate::telemetry::status::{State, NFTABLES_KIND};
use crate::telemetry::Notice;
use std::time::{Duration, Instant};
use tracing::{debug, error, info, warn};

impl<N: Nft> Engine<N> {
    pub(super) fn publish(&self) {
        let Some(t) = &self.telemetry else { return };
        let mode = |m: Mode| format!("{m:?}").to_lowercase();
        let catalog = self
            .tables
            .iter()
            .chain(self.adopted.values().map(|t| &**t))
            .map(|d| (d.name.clone(), d.key.to_string(), mode(d.mode)))
            .collect();
        t.board().set_nftables_catalog(catalog);
        for d in self
            .tables
            .iter()
            .chain(self.adopted.values().map(|t| &**t))
        {
            if let Some(why) = self.reported.get(&d.name) {
                let state = if d.mode == Mode::Observe {
                    State::ObserveOnly
                } else {
                    State::Drifted
                };
                t.board()
                    .set_nftables_state(&d.name, state, Some(why.clone()), None);
            }
        }
    }

    pub(super) fn board_state(&self, name: &str, state: State, reason: Option<String>) {
        if let Some(t) = &self.telemetry {
            let fighter = self.contest.fighter(&name.to_string()).map(str::to_owned);
            t.board()
                .set_nftables_state(name, state, reason, fighter.as_deref());
        }
    }

    pub(super) fn tell(&self, n: Notice) {
        if let Some(t) = &self.telemetry {
            t.notice(n);
        }
    }

    pub(super) fn count_repairs(&self, result: &'static str, n: usize) {
        if let Some(t) = &self.telemetry {
            t.metrics
                .repairs
                .get_or_create(&RepairLabels {
                    kind: NFTABLES_KIND,
                    result,
                })
                .inc_by(n as u64);
        }
    }

    pub(super) fn in_sync(&mut self, name: &str) {
        if self.reported.remove(name).is_some() {
            info!(kind = NFTABLES_KIND, name, "back in sync");
            self.board_state(name, State::InSync, None);
        }
    }

    /// Drift that is only reported (observe mode, or what nft cannot change in place).
    pub(super) fn report(&mut self, d: &TableDrift) {
        let text = d.summary();
        if self.reported.get(&d.name) == Some(&text) {
            return;
        }
        let mode = if d.mode == Mode::Observe {
            "observe"
        } else {
            "enforce"
        };
        warn!(kind = NFTABLES_KIND, name = %d.name, table = %d.object, mode, drift = %text, "drift");
        let forbidden = d.forbidden();
        if !forbidden.is_empty() {
            self.count_forbidden("reported", &d.name, &d.object, &forbidden);
        }
        let state = if d.mode == Mode::Observe {
            State::ObserveOnly
        } else {
            State::Drifted
        };
        self.board_state(&d.name, state, Some(text.clone()));
        self.reported.insert(d.name.clone(), text);
    }

    pub(super) fn count_forbidden(
        &mut self,
        result: &'static str,
        name: &str,
        table: &str,
        elements: &[String],
    ) {
        self.stats.forbidden += elements.len() as u64;
        if let Some(t) = &self.telemetry {
            t.metrics
                .forbidden_members
                .get_or_create(&ForbiddenLabels { result })
                .inc_by(elements.len() as u64);
        }
        for e in elements {
            warn!(kind = NFTABLES_KIND, name, table, element = %e, action = result, forbidden_total = self.stats.forbidden, "forbidden element in protected set");
        }
    }

    pub(super) fn hold(&mut self, p: &Planned, newly_contested: bool) {
        self.contest.set_fighter(&p.name, &p.actor);
        if let Some(t) = &self.telemetry {
            t.metrics
                .repairs_deferred
                .get_or_create(&KindLabels {
                    kind: NFTABLES_KIND,
                })
                .inc();
        }
        let delay = self.contest.current_delay(&p.name).unwrap_or_default();
        if newly_contested {
            warn!(kind = NFTABLES_KIND, name = %p.name, table = %p.key, actor = %p.actor, drift = %p.drift.summary(), "contested: changed again right after each repair; repairs back off");
            self.tell(Notice::Contested {
                kind: NFTABLES_KIND,
                name: p.name.clone(),
                actor: p.actor.clone(),
            });
        } else {
            debug!(kind = NFTABLES_KIND, name = %p.name, delay_ms = delay.as_millis() as u64, "repair held back");
        }
        self.board_state(&p.name, State::Contested, Some(p.drift.summary()));
    }

    pub(super) fn restored(&mut self, p: &Planned, why: Why, took: Duration, via: &'static str) {
        self.stats.repairs += 1;
        self.count_repairs("applied", 1);
        let forbidden = p.drift.forbidden();
        if !forbidden.is_empty() {
            self.count_forbidden("removed", &p.name, &p.drift.object, &forbidden);
            self.tell(Notice::ForbiddenRemoved {
                set: p.drift.object.clone(),
                members: forbidden.clone(),
            });
        }
        if let Some(t) = &self.telemetry {
            // What is missing when the agent starts is the initial sync, not drift.
            if why != Why::Start {
                t.metrics
                    .drift_detected
                    .get_or_create(&DriftLabels {
                        kind: NFTABLES_KIND,
                        actor: p.actor.clone(),
                    })
                    .inc();
            }
            t.metrics
                .repair_duration
                .get_or_create(&KindLabels {
                    kind: NFTABLES_KIND,
                })
                .observe(took.as_secs_f64());
            t.board().record_nftables_repair(
                &p.name,
                &p.actor,
                crate::telemetry::status::unix_now(),
            );
        }
        let more_than_forbidden = p
            .drift
            .findings
            .iter()
            .any(|f| !matches!(f, plan::Finding::Forbidden { .. }));
        if more_than_forbidden && why != Why::Start {
            self.tell(Notice::Restored {
                counts: vec![(NFTABLES_KIND, 1)],
                actor: p.actor.clone(),
            });
        }
        self.contest.on_repaired(&p.name, Instant::now());
        self.reported.remove(&p.name);
        info!(kind = NFTABLES_KIND, name = %p.name, table = %p.key, actor = %p.actor, what = %p.drift.summary(), took_us = took.as_micros() as u64, via, "restored");
    }

    pub(super) fn failed(&mut self, apply: &[Planned], e: &NftError) {
        self.stats.failures += 1;
        self.count_repairs("failed", apply.len());
        let names: Vec<&str> = apply.iter().map(|p| p.name.as_str()).collect();
        error!(kind = NFTABLES_KIND, names = %names.join(","), error = %e, "repair failed");
        for p in apply {
            self.board_state(&p.name, State::Drifted, Some(e.to_string()));
            self.reported.insert(p.name.clone(), e.to_string());
        }
    }
}
