//! Chains: read, judge, plan, repair, verify.
//!
//! Every repair is verified by reading the table again. What it finds decides what comes next:
//! - in sync: done;
//! - drifted again, by someone else (the table does not hold what the restore left): a new drift.
//!   A chain changed again right after each repair is *contested* (see [`super::ledger`]): its
//!   repairs back off, the fighter is named, and it is repaired once the fight stops. A fight never
//!   turns protection off;
//! - holding exactly what the restore wrote, yet drifted: the rules are printed otherwise than
//!   written (only possible where no scratch namespace could print them first). No number of
//!   restores fixes that: the chain is *given up* (reported with the printed form) until a
//!   reload re-affirms it, so that nothing is appended forever.

use super::{Guard, Tools};
use crate::model::Mode;
use crate::netfilter::blind::{self, Touches};
use crate::netfilter::canon::Canonical;
use crate::netfilter::model::{DesiredChain, TableId};
use crate::netfilter::parse::SavedTable;
use crate::netfilter::plan::{self, ChainDrift, ChainFinding, TableRepair};
use crate::netfilter::render;
use crate::netfilter::rulespec::RuleSpec;
use crate::telemetry::contest::Decision;
use crate::telemetry::status::State;
use crate::telemetry::Notice;
use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;
use tracing::{debug, error, info, warn};

/// Restores in one sync of a table at most (a safety net: a fight is held back well before).
const MAX_ROUNDS: u32 = 16;

/// Why a table is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cause {
    /// The initial sync, or a reload placing what a config names: nobody removed anything, so
    /// what is found missing does not count towards a fight (unless it goes again at once).
    Place,
    /// A transaction of another process, a poll, a resync, lost notifications.
    Drift,
    /// A held-back repair of a contested chain whose time has come.
    Retry,
}

/// A restore that was applied: what it must have left, to judge the read that follows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) struct Applied {
    /// The chains it repaired (object names).
    names: BTreeSet<String>,
    /// Rules each chain it wrote to holds after it; `None` where that is not known.
    expected: BTreeMap<String, Option<usize>>,
    /// The rules it wrote, by chain.
    wrote: BTreeMap<String, Vec<RuleSpec>>,
}

impl Applied {
    /// `before`: the table as read before the restore (`None`: not read).
    pub fn new(
        names: BTreeSet<String>,
        repair: &TableRepair,
        before: Option<Option<&SavedTable>>,
    ) -> Self {
        let mut wrote: BTreeMap<String, Vec<RuleSpec>> = BTreeMap::new();
        for (chain, rules) in &repair.rewrite {
            wrote
                .entry(chain.clone())
                .or_default()
                .extend(rules.iter().cloned());
        }
        for (chain, rule) in repair.append.iter().chain(&repair.insert_first) {
            wrote.entry(chain.clone()).or_default().push(rule.clone());
        }
        Applied {
            names,
            expected: plan::expected_counts(repair, before),
            wrote,
        }
    }

    /// Is this finding about a rule the restore wrote (and nothing else)?
    fn about_what_it_wrote(&self, chain: &str, f: &ChainFinding) -> bool {
        let wrote = |c: &str, r: &RuleSpec| self.wrote.get(c).is_some_and(|w| w.contains(r));
        match f {
            ChainFinding::Rules {
                missing,
                extra,
                reordered,
            } => {
                !*reordered && !missing.is_empty() && missing.iter().all(|r| wrote(chain, r)) && {
                    // What is there instead is what it wrote, printed otherwise: as many.
                    extra.is_empty() || extra.len() == missing.len()
                }
            }
            ChainFinding::JumpMissing { chain, rule } => wrote(chain, rule),
            ChainFinding::Missing | ChainFinding::Changed | ChainFinding::JumpNotFirst { .. } => {
                false
            }
        }
    }

    /// Of `drifts` found right after the restore, the chains it repaired that drift only for rules
    /// it wrote, although every chain it wrote holds as many rules as it left there: written, but
    /// printed otherwise. Empty when anything else changed the table meanwhile (a fight, not a
    /// spelling).
    pub fn printed_otherwise(
        &self,
        drifts: &[ChainDrift],
        observed: Option<&SavedTable>,
    ) -> Vec<String> {
        let holds = |chain: &str| {
            observed
                .and_then(|t| t.chains.get(chain))
                .map(|c| c.rules.len())
        };
        let as_left = self
            .expected
            .iter()
            .all(|(chain, want)| want.is_some() && holds(chain) == *want);
        if !as_left {
            return Vec::new();
        }
        drifts
            .iter()
            .filter(|d| d.mode == Mode::Enforce && self.names.contains(&d.name))
            .filter(|d| {
                let own = d.object.rsplit(' ').next().unwrap_or_default();
                d.findings.iter().all(|f| self.about_what_it_wrote(own, f))
            })
            .map(|d| d.name.clone())
            .collect()
    }
}

/// Logs what canonicalisation did: each rewritten rule once at `info`; rule specs compared as
/// written at `warn`.
pub(super) fn log_canonical(c: &Canonical) {
    for r in &c.rewritten {
        info!(
            name = %r.chain,
            site = %r.site,
            written = %r.written,
            printed = %r.printed,
            "rule spec compared in the form iptables prints it"
        );
    }
    if let Some(why) = &c.unavailable {
        warn!(reason = %why, "rule specs are compared as written, but for iptables' own options (no scratch namespace to print them in): write them as iptables-save prints them");
    }
}

impl<T: Tools> Guard<T> {
    pub(super) async fn sync_tables(&mut self, tables: &BTreeSet<TableId>, cause: Cause) {
        for &id in tables {
            self.sync_table(id, cause, None).await;
        }
    }

    /// Reads, judges, plans and repairs one table until it is in sync, held back or given up.
    /// `applied`: a restore done just before (from the notifications alone), which this read
    /// verifies.
    pub(super) async fn sync_table(&mut self, id: TableId, cause: Cause, applied: Option<Applied>) {
        let mut applied = applied;
        let mut rounds = u32::from(applied.is_some());
        loop {
            let started = Instant::now();
            let Some(observed) = self.read_table(id).await else {
                return;
            };
            self.judge_chains(id, observed.as_ref());
            let desired = self.desired_chains(id);
            let refs: Vec<&DesiredChain> = desired.iter().collect();
            let (drifts, _) = plan::plan_table(&refs, observed.as_ref());
            if let Some(a) = applied.take() {
                let stuck = a.printed_otherwise(&drifts, observed.as_ref());
                if !stuck.is_empty() {
                    self.give_up(&stuck, &drifts, observed.as_ref());
                    continue;
                }
            }
            let counts = cause != Cause::Place || rounds > 0;
            let (now, fresh) = self.decide(&drifts, counts, Instant::now());
            self.report_chains(&desired, &drifts, &now);
            if now.is_empty() {
                let drifted: BTreeSet<&str> = drifts.iter().map(|d| d.name.as_str()).collect();
                self.capture_chains(id, &drifted);
                return;
            }
            rounds += 1;
            if rounds > MAX_ROUNDS {
                warn!(table = %id, rounds, "the table keeps changing under every repair; left until the next change");
                return;
            }
            // Chains held back, given up or observed stay as they are; the plan still counts
            // their first-jumps, so that two chains' jumps never fight over the head.
            let limited: Vec<DesiredChain> = desired
                .iter()
                .cloned()
                .map(|mut c| {
                    if !now.contains(&c.name) {
                        c.mode = Mode::Observe;
                    }
                    c
                })
                .collect();
            let refs: Vec<&DesiredChain> = limited.iter().collect();
            let (repairing, repair) = plan::plan_table(&refs, observed.as_ref());
            if repair.is_empty() {
                return;
            }
            if !self
                .restore(id, &repair, &repairing, (&fresh, counts), started)
                .await
            {
                return;
            }
            applied = Some(Applied::new(now, &repair, Some(observed.as_ref())));
        }
    }

    /// Writes back, before any read, what the notifications of a transaction prove missing in
    /// table `id` ([`blind`]), but for the chains in `decided` (put back from their image, or
    /// held back, just before). Returns the restore to verify, if one was applied.
    pub(super) async fn repair_blind(
        &mut self,
        id: TableId,
        touches: &Touches,
        decided: &BTreeSet<String>,
    ) -> Option<Applied> {
        let now = Instant::now();
        let owned: Vec<DesiredChain> = self
            .chains
            .iter()
            .filter(|c| c.key.table_id() == id && c.mode == Mode::Enforce)
            .filter(|c| !self.ledger.gave_up(&c.name) && !self.ledger.is_held(&c.name, now))
            .filter(|c| !decided.contains(&c.name))
            .cloned()
            .collect();
        let candidates: Vec<&DesiredChain> = owned.iter().collect();
        let (names, repair) = blind::plan(&candidates, touches);
        if repair.is_empty() {
            return None;
        }
        let drifts: Vec<ChainDrift> = candidates
            .iter()
            .filter(|c| names.contains(&c.name))
            .map(|c| ChainDrift {
                name: c.name.clone(),
                mode: c.mode,
                object: c.key.to_string(),
                findings: vec![if touches.deleted.contains(&c.key.chain) {
                    ChainFinding::Missing
                } else {
                    ChainFinding::Changed
                }],
            })
            .collect();
        let (allowed, fresh) = self.decide(&drifts, true, now);
        let repair = if allowed.len() == names.len() {
            repair
        } else {
            // This drift made some contested: the others are still repaired now.
            let allowed: Vec<&DesiredChain> = candidates
                .iter()
                .filter(|c| allowed.contains(&c.name))
                .copied()
                .collect();
            blind::plan(&allowed, touches).1
        };
        if repair.is_empty() {
            return None;
        }
        let drifts: Vec<ChainDrift> = drifts
            .into_iter()
            .filter(|d| allowed.contains(&d.name))
            .collect();
        if !self
            .restore(id, &repair, &drifts, (&fresh, true), now)
            .await
        {
            return None;
        }
        Some(Applied::new(allowed, &repair, None))
    }

    /// Repair now or hold back, per enforced drifted chain (`counts`: a drift that counts
    /// towards a fight). Returns the chains to repair now and those whose drift is fresh.
    pub(super) fn decide(
        &mut self,
        drifts: &[ChainDrift],
        counts: bool,
        now: Instant,
    ) -> (BTreeSet<String>, BTreeSet<String>) {
        let mut repair = BTreeSet::new();
        let mut fresh_ones = BTreeSet::new();
        for d in drifts.iter().filter(|d| d.mode == Mode::Enforce) {
            if !counts {
                repair.insert(d.name.clone());
                continue;
            }
            let decision = self.ledger.on_drift(&d.name, now);
            if let Some(a) = self.actor.as_deref().filter(|a| *a != "unknown") {
                if self.ledger.is_contested(&d.name) {
                    self.ledger.set_fighter(&d.name, a);
                }
            }
            match decision {
                Decision::Now { fresh } => {
                    if fresh {
                        fresh_ones.insert(d.name.clone());
                    }
                    repair.insert(d.name.clone());
                }
                Decision::Later {
                    due,
                    fresh,
                    newly_contested,
                } => self.hold_back(
                    d,
                    due.saturating_duration_since(now),
                    fresh,
                    newly_contested,
                ),
            }
        }
        (repair, fresh_ones)
    }

    fn hold_back(&mut self, d: &ChainDrift, delay: std::time::Duration, fresh: bool, newly: bool) {
        let actor = self.actor.clone().unwrap_or_else(|| "unknown".into());
        if fresh {
            self.out.deferred("chain");
            self.out.drift("chain", &actor, 1);
        }
        let delay_ms = delay.as_millis() as u64;
        if newly {
            warn!(kind = "chain", name = %d.name, object = %d.object, actor = actor.as_str(), backoff_ms = delay_ms, "contested: changed again right after each repair; repairs back off");
            self.out.tell(Notice::Contested {
                kind: "chain",
                name: d.name.clone(),
                actor: actor.clone(),
            });
        }
        let fighter = self.ledger.fighter(&d.name).map(str::to_owned);
        self.out.contested(&d.name, fighter.as_deref(), delay_ms);
    }

    /// Applies one restore of table `id`. True when iptables took it. `fresh`: the chains whose
    /// drift is new, and whether the drift counts towards a fight (not when placing).
    async fn restore(
        &mut self,
        id: TableId,
        repair: &TableRepair,
        drifts: &[ChainDrift],
        fresh: (&BTreeSet<String>, bool),
        started: Instant,
    ) -> bool {
        let input = render::iptables_restore(id.table, repair);
        // Where a repair's time goes: from its cause (the NEWGEN or the read) to the spawn, then
        // the tool's run (spawn to exit, which holds its commit).
        debug!(table = %id, input = %input, since_cause_us = started.elapsed().as_micros() as u64, "restoring");
        let enforced: Vec<&ChainDrift> =
            drifts.iter().filter(|d| d.mode == Mode::Enforce).collect();
        let spawned = Instant::now();
        let ran = self.tools.restore(self.backend, id.family, &input).await;
        debug!(table = %id, tool_us = spawned.elapsed().as_micros() as u64, ok = ran.is_ok(), "restore ran");
        match ran {
            Ok(pid) => {
                if let Some(pid) = pid {
                    self.remember_own(pid);
                }
                for d in &enforced {
                    self.images.written(&d.name);
                }
                self.restored(id, &enforced, fresh, started, "restore");
                true
            }
            Err(e) => {
                self.stats.repair_failures += 1;
                self.out.repairs("chain", "failed", enforced.len());
                let error = e.to_string();
                for d in &enforced {
                    if self.ledger.failing(&d.name, &error) {
                        error!(kind = "chain", name = %d.name, table = %id, error = %e, "repair failed");
                    }
                    self.ledger.retry_failed(&d.name, Instant::now());
                    self.out.state(&d.name, State::Drifted, Some(error.clone()));
                }
                false
            }
        }
    }

    /// A transaction of the guard's own (a restore's pid, or the thread that committed an
    /// image): not drift when its NEWGEN comes, and until then what others' notifications say
    /// is not the whole story.
    pub(super) fn remember_own(&mut self, pid: u32) {
        self.own.push_back(pid);
        if self.own.len() > 16 {
            self.own.pop_front();
        }
        self.unseen.push((pid, Instant::now()));
        if self.unseen.len() > 16 {
            self.unseen.remove(0);
        }
    }

    /// Bookkeeping of an applied restore or image: counts, the fight's clock, the board, the
    /// log (`via`: how).
    pub(super) fn restored(
        &mut self,
        id: TableId,
        enforced: &[&ChainDrift],
        (fresh, counts): (&BTreeSet<String>, bool),
        started: Instant,
        via: &'static str,
    ) {
        let now = Instant::now();
        let actor = self.actor.clone().unwrap_or_else(|| "unknown".into());
        let names: Vec<&str> = enforced.iter().map(|d| d.name.as_str()).collect();
        self.stats.chain_repairs += names.len() as u64;
        self.out.repairs("chain", "applied", names.len());
        let new_drift = names.iter().filter(|n| fresh.contains(**n)).count();
        if new_drift > 0 {
            self.out.drift("chain", &actor, new_drift);
            // Once per drift, like the metric: a re-apply is not another chain restored.
            self.out.tell(Notice::Restored {
                counts: vec![("chain", new_drift as u64)],
                actor: actor.clone(),
            });
        }
        for d in enforced {
            if counts {
                self.ledger.on_repaired(&d.name, now);
            }
            self.out.repaired(&d.name, &actor);
            if self.ledger.is_contested(&d.name) {
                let fighter = self.ledger.fighter(&d.name).map(str::to_owned);
                let delay = self.ledger.backoff(&d.name).unwrap_or_default();
                self.out
                    .contested(&d.name, fighter.as_deref(), delay.as_millis() as u64);
            }
        }
        let what: Vec<String> = enforced
            .iter()
            .flat_map(|d| d.findings.iter().map(ToString::to_string))
            .collect();
        info!(
            kind = "chain",
            table = %id,
            actor = actor.as_str(),
            names = %names.join(","),
            what = %what.join("; "),
            took_us = started.elapsed().as_micros() as u64,
            via,
            "restored"
        );
    }

    /// The restore was applied and read back as written, yet the chains drift: rules iptables
    /// prints otherwise than the config writes them. Reported with the printed form and left
    /// alone until a reload.
    fn give_up(&mut self, names: &[String], drifts: &[ChainDrift], observed: Option<&SavedTable>) {
        for d in drifts.iter().filter(|d| names.contains(&d.name)) {
            let chain = d.object.rsplit(' ').next().unwrap_or_default();
            let printed: Vec<String> = observed
                .and_then(|t| t.chains.get(chain))
                .map(|c| c.rules.iter().map(|r| format!("`{r}`")).collect())
                .unwrap_or_default();
            error!(
                kind = "chain",
                name = %d.name,
                object = %d.object,
                drift = %d.findings.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "),
                printed = %printed.join(", "),
                "repair does not take: iptables prints these rules otherwise than the config writes them; write them as iptables-save prints them (`netwarden snapshot` does). Only reporting this chain until a reload (the file edited and a SIGHUP, or a ConfigMap edit)"
            );
            self.ledger.give_up(&d.name);
            self.ledger.report(&d.name, "repair does not take");
            self.out.state(
                &d.name,
                State::Drifted,
                Some("repair does not take: rules printed otherwise than written".into()),
            );
        }
    }

    async fn read_table(&mut self, id: TableId) -> Option<Option<SavedTable>> {
        self.stats.table_reads += 1;
        let started = Instant::now();
        let read = self.tools.save_table(self.backend, id).await;
        debug!(table = %id, took_us = started.elapsed().as_micros() as u64, "table read");
        match read {
            Ok(t) => Some(t),
            Err(e) => {
                error!(table = %id, error = %e, "cannot read the table");
                None
            }
        }
    }

    /// The protected chains of a table (configured and adopted), given-up ones demoted to
    /// observe.
    fn desired_chains(&self, id: TableId) -> Vec<DesiredChain> {
        let adopted = self
            .adoption
            .chains
            .values()
            .filter(|c| c.key.table_id() == id)
            .map(|c| c.desired(self.adoption.mode(&c.selector)));
        self.chains
            .iter()
            .filter(|c| c.key.table_id() == id)
            .cloned()
            .chain(adopted)
            .map(|mut c| {
                if self.ledger.gave_up(&c.name) {
                    c.mode = Mode::Observe;
                }
                c
            })
            .collect()
    }

    /// Logs drift that is not being repaired now (observe mode, given up), and chains back in
    /// sync. Held-back chains were told as contested.
    fn report_chains(
        &mut self,
        desired: &[DesiredChain],
        drifts: &[ChainDrift],
        now: &BTreeSet<String>,
    ) {
        let at = Instant::now();
        for d in drifts {
            if d.mode == Mode::Enforce || self.ledger.gave_up(&d.name) {
                continue;
            }
            let text: Vec<String> = d.findings.iter().map(ToString::to_string).collect();
            let text = text.join("; ");
            if self.ledger.report(&d.name, &text) {
                warn!(kind = "chain", name = %d.name, object = %d.object, mode = "observe", drift = %text, "drift");
                self.out
                    .state(&d.name, State::ObserveOnly, Some(text.clone()));
            }
        }
        let drifted: BTreeSet<&str> = drifts.iter().map(|d| d.name.as_str()).collect();
        for c in desired {
            if drifted.contains(c.name.as_str()) || now.contains(&c.name) {
                continue;
            }
            if self.ledger.in_sync(&c.name) {
                info!(kind = "chain", name = %c.name, "back in sync");
                if !self.ledger.is_held(&c.name, at) && !self.ledger.is_contested(&c.name) {
                    self.out.state(&c.name, State::InSync, None);
                }
            }
        }
    }
}
