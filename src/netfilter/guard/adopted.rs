//! What `spec.adopt[].chains` and `spec.adopt[].ipsets` protect: the guard's side of
//! [`crate::netfilter::adopted`] (which judges, purely): reading, logging, counting, restoring.
//!
//! Metrics and the state file are updated before the log line that announces a change, so that
//! whoever reads the log finds them current.

use super::{digest, Guard, Tools};
use crate::adopt::{self, Actor, AdoptSelector};
use crate::model::Mode;
use crate::netfilter::adopted::{self as judge, AdoptedChain, AdoptedSet, Outcome};
use crate::netfilter::model::{ChainKey, DesiredChain, DesiredSet, TableId};
use crate::netfilter::parse::SavedTable;
use crate::netfilter::tools;
use crate::telemetry::status::State;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::time::Instant;
use tracing::{debug, error, info, warn};

/// What the guard adopts (`spec.adopt[].chains`, `spec.adopt[].ipsets`) and what it has adopted.
#[derive(Clone, Debug, Default)]
pub struct Adoption {
    /// Only the selectors that name chains or ipsets.
    pub selectors: Vec<AdoptSelector>,
    pub chains: BTreeMap<ChainKey, AdoptedChain>,
    pub sets: BTreeMap<String, AdoptedSet>,
}

impl Adoption {
    /// The chain and set selectors of `selectors`, with what the adopted-state file kept for
    /// them (protected at once after a restart, also if removed while the agent was down).
    pub fn new(
        selectors: &[AdoptSelector],
        saved: Option<&crate::adopted_state::AdoptedState>,
    ) -> Adoption {
        let selectors = Adoption::netfilter_selectors(selectors);
        let (chains, sets) = match saved {
            Some(st) => judge::from_saved(&selectors, &st.chains, &st.ipsets),
            None => Default::default(),
        };
        Adoption {
            selectors,
            chains,
            sets,
        }
    }

    /// The selectors that name chains or ipsets.
    pub(super) fn netfilter_selectors(selectors: &[AdoptSelector]) -> Vec<AdoptSelector> {
        selectors
            .iter()
            .filter(|s| s.chains.is_some() || s.ipsets.is_some())
            .cloned()
            .collect()
    }

    /// The tables chain selectors look into.
    pub(super) fn tables(&self) -> BTreeSet<TableId> {
        self.selectors
            .iter()
            .filter_map(|s| s.chains.as_ref())
            .flat_map(|c| {
                c.tables.iter().map(|&table| TableId {
                    family: c.family,
                    table,
                })
            })
            .chain(self.chains.keys().map(ChainKey::table_id))
            .collect()
    }

    pub(super) fn adopts_chains(&self) -> bool {
        !self.chains.is_empty() || self.selectors.iter().any(|s| s.chains.is_some())
    }

    fn adopts_sets(&self) -> bool {
        !self.sets.is_empty() || self.selectors.iter().any(|s| s.ipsets.is_some())
    }

    /// Does a change of this chain concern adoption?
    pub(super) fn covers(&self, key: &ChainKey) -> bool {
        self.chains.contains_key(key) || adopt::select_chain(&self.selectors, key).is_some()
    }

    pub(super) fn mode(&self, selector: &str) -> Mode {
        self.selectors
            .iter()
            .find(|s| s.name == selector)
            .map_or(Mode::Observe, |s| s.mode)
    }

    /// Adopted chains and sets, as `check` and `status` list them beside the configured ones.
    pub fn desired(&self) -> (Vec<DesiredChain>, Vec<DesiredSet>) {
        let chains = self
            .chains
            .values()
            .map(|c| c.desired(self.mode(&c.selector)))
            .collect();
        let sets = self
            .sets
            .values()
            .map(|s| s.desired(self.mode(&s.selector)))
            .collect();
        (chains, sets)
    }

    /// The selector that covers adopted (or adoptable) set `name`.
    fn set_selector(&self, name: &str) -> Option<&AdoptSelector> {
        match self.sets.get(name) {
            Some(c) => self.selectors.iter().find(|s| {
                s.name == c.selector && s.ipsets.as_ref().is_some_and(|i| i.matches(name))
            }),
            None => adopt::select_set(&self.selectors, name),
        }
    }
}

impl<T: Tools> Guard<T> {
    /// Adoption's view of a fresh read of table `id`: new chains adopted, owners' changes
    /// followed, chains their owner removed forgotten; the chains to restore keep their copy.
    pub(super) fn judge_chains(&mut self, id: TableId, observed: Option<&SavedTable>) {
        if !self.adoption.adopts_chains() {
            return;
        }
        let actor_name = self.actor.clone();
        let actor = match actor_name.as_deref() {
            None | Some("unknown") => Actor::Unknown,
            Some(p) => Actor::Process(p),
        };
        let configured: HashSet<&ChainKey> = self.chains.iter().map(|c| &c.key).collect();
        // Selectors of this table's adopted chains, for the log of those forgotten.
        let before: HashMap<ChainKey, String> = self
            .adoption
            .chains
            .iter()
            .filter(|(k, _)| k.table_id() == id)
            .map(|(k, c)| (k.clone(), c.selector.clone()))
            .collect();
        let outcomes = judge::judge_table(
            &self.adoption.selectors,
            &mut self.adoption.chains,
            id,
            observed,
            actor,
            &self.ancestors,
            &|k| configured.contains(k),
        );
        let covered: Vec<bool> = outcomes
            .iter()
            .map(|(k, _)| self.adoption.covers(k) && !configured.contains(k))
            .collect();
        if outcomes.iter().any(|(_, o)| *o != Outcome::Restore) {
            self.save_adopted();
            self.publish();
        }
        let actor = actor_name.as_deref().unwrap_or("unknown");
        for ((key, outcome), covered) in outcomes.iter().zip(covered) {
            let copy = self.adoption.chains.get(key);
            let selector = copy
                .map(|c| c.selector.as_str())
                .or_else(|| before.get(key).map(String::as_str))
                .unwrap_or("-");
            let rules = copy.map_or(0, |c| c.rules.len());
            match outcome {
                Outcome::Restore => {
                    debug!(kind = "chain", selector = %selector, object = %key, actor = %actor, "adopted chain removed or emptied by someone else: drift")
                }
                Outcome::Forgotten if !covered => {
                    info!(kind = "chain", selector = %selector, object = %key, "no adopt selector covers the chain any more (or spec.chains protects it now): forgotten as adopted, left as it is")
                }
                Outcome::Forgotten => {
                    // A named actor that makes a selector forget is an owner (or acts for one).
                    let reason = if actor == "unknown" {
                        "unknown_actor"
                    } else {
                        "owner"
                    };
                    self.out.forgotten("chain", reason);
                    info!(kind = "chain", selector = %selector, object = %key, actor = %actor, ancestors = %self.ancestors.join(","), "adopted chain removed by an owner (or, under unknownActor: forget, by nobody known): forgotten");
                }
                Outcome::Adopted => {
                    info!(kind = "chain", selector = %selector, object = %key, rules, "adopted")
                }
                Outcome::Updated => {
                    debug!(kind = "chain", selector = %selector, object = %key, actor, rules, "adopted chain changed: copy updated")
                }
            }
        }
    }

    /// Adopted sets: every set whose name a selector matches is read (`ipset list -n`, then
    /// `ipset save NAME`, skipped when the text did not change), adopted or followed as seen;
    /// a destroyed one is recreated as last seen or forgotten, as the unknown-actor policy says
    /// (ipset names no actor).
    pub(super) async fn sync_adopted_sets(&mut self, full: bool) {
        if !self.adoption.adopts_sets() {
            return;
        }
        let names = match self.tools.ipset_names().await {
            Ok(n) => n,
            Err(e) => {
                error!(error = %e, "cannot list the sets");
                return;
            }
        };
        let configured: HashSet<String> = self.sets.iter().map(|s| s.set.clone()).collect();
        let candidates: BTreeSet<String> = names
            .iter()
            .filter(|n| {
                !configured.contains(n.as_str())
                    && adopt::select_set(&self.adoption.selectors, n).is_some()
            })
            .cloned()
            .chain(self.adoption.sets.keys().cloned())
            .collect();
        let mut changed = false;
        for name in candidates {
            let sel = self.adoption.set_selector(&name).cloned();
            let Some(sel) = sel.filter(|_| !configured.contains(&name)) else {
                // No selector covers it any more: no longer protected.
                if self.adoption.sets.remove(&name).is_some() {
                    info!(kind = "ipset", set = %name, "no adopt selector covers the set any more: forgotten, left as it is");
                }
                changed = true;
                continue;
            };
            changed |= self
                .adopted_set(&sel, &name, names.contains(&name), full)
                .await;
        }
        if changed {
            self.save_adopted();
            self.publish();
        }
    }

    /// Reads and judges one adoptable set; true when the adopted copies changed.
    async fn adopted_set(
        &mut self,
        sel: &AdoptSelector,
        name: &str,
        exists: bool,
        full: bool,
    ) -> bool {
        let key = judge::set_name(&sel.name, name);
        let text = if exists {
            self.stats.set_reads += 1;
            match self.tools.ipset_save_text(name).await {
                Ok(t) => t,
                Err(e) => {
                    error!(set = %name, error = %e, "cannot read the set");
                    return false;
                }
            }
        } else {
            None
        };
        let digest = text.as_deref().map(digest);
        if !full && self.ledger.digest_unchanged(&key, digest) {
            return false;
        }
        let seen = match text
            .as_deref()
            .map(|t| tools::parse_set(name, t))
            .transpose()
        {
            Ok(s) => s.flatten(),
            Err(e) => {
                error!(set = %name, error = %e, "cannot read the set");
                return false;
            }
        };
        let copy = self.adoption.sets.get(name);
        if let Some(why) = seen.as_ref().and_then(|s| judge::set_unadoptable(name, s)) {
            if copy.is_none() && self.ledger.report(&key, &why) {
                warn!(kind = "ipset", selector = %sel.name, set = %name, reason = %why, "not adopted");
            }
        }
        let options = seen.as_ref().map(|s| s.options.clone()).unwrap_or_default();
        let (now, outcome) = judge::judge_set(sel, copy, name, seen.as_ref().map(|s| (s, options)));
        match &now {
            Some(n) => {
                self.adoption.sets.insert(name.to_owned(), n.clone());
            }
            None => {
                self.adoption.sets.remove(name);
            }
        }
        self.ledger.set_digest(&key, digest);
        let Some(outcome) = outcome else {
            return false;
        };
        let members = now.as_ref().map_or(0, |n| n.members.len());
        match outcome {
            Outcome::Adopted => {
                info!(kind = "ipset", selector = %sel.name, set = %name, members, "adopted")
            }
            Outcome::Updated => {
                debug!(kind = "ipset", selector = %sel.name, set = %name, members, "adopted set changed: copy updated")
            }
            Outcome::Forgotten if seen.is_none() => {
                self.out.forgotten("ipset", "unknown_actor");
                info!(kind = "ipset", selector = %sel.name, set = %name, "adopted set destroyed (ipset names no actor; unknownActor: forget): forgotten");
            }
            Outcome::Forgotten => {
                info!(kind = "ipset", selector = %sel.name, set = %name, "adopted set changed into one that cannot be restored: forgotten")
            }
            Outcome::Restore => {
                if let Some(set) = now {
                    self.restore_adopted_set(sel, &set).await;
                }
                return false;
            }
        }
        true
    }

    async fn restore_adopted_set(&mut self, sel: &AdoptSelector, set: &AdoptedSet) {
        let name = judge::set_name(&sel.name, &set.name);
        if sel.mode != Mode::Enforce {
            if self.ledger.report(&name, "set missing") {
                warn!(kind = "ipset", name = %name, set = %set.name, mode = "observe", drift = "set missing", "drift");
                self.out
                    .state(&name, State::ObserveOnly, Some("set missing".into()));
            }
            return;
        }
        let started = Instant::now();
        match self.tools.ipset_restore(&judge::restore_set(set)).await {
            Ok(()) => {
                self.stats.set_repairs += 1;
                self.out.repairs("ipset", "applied", 1);
                self.ledger.in_sync(&name);
                self.out.repaired(&name, "unknown");
                info!(kind = "ipset", name = %name, set = %set.name, actor = "unknown", members = set.members.len(), what = "set missing", took_us = started.elapsed().as_micros() as u64, "restored");
            }
            Err(e) => {
                self.stats.repair_failures += 1;
                self.out.repairs("ipset", "failed", 1);
                error!(kind = "ipset", name = %name, error = %e, "repair failed");
            }
        }
    }
}
