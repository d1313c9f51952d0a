//! Adoption's side of a sync: whether a read of an adoptable table adopts it, follows its
//! owner's change, forgets it or restores it ([`crate::nftables::adopt::judge`] decides).

use super::Engine;
use crate::nftables::adopt::{self, Judgement};
use crate::nftables::listing::ObservedTable;
use crate::nftables::model::TableKey;
use crate::nftables::runner::Nft;
use crate::nftables::watch::Touched;
use crate::telemetry::metrics::ForgetLabels;
use crate::telemetry::status::NFTABLES_KIND;
use std::sync::Arc;
use tracing::{debug, info};

impl<N: Nft> Engine<N> {
    /// Adoption's view of a read of an adoptable table: adopted, followed (the owner changed
    /// it) or forgotten; `true` when the copy is to be compared with the table (and repaired).
    pub(super) fn judge_adopted(
        &mut self,
        key: &TableKey,
        t: &Touched,
        observed: Option<&ObservedTable>,
    ) -> bool {
        let Some(sel) = adopt::select(&self.selectors, key).cloned() else {
            return false;
        };
        // A copy from the adopted-state file serves a table deleted while the agent was down;
        // one that is there is adopted as it is now: what its owner changed meanwhile cannot be
        // told from a stranger's change, and rolling the owner back is worse than following.
        let from_file = self.from_file.remove(key);
        let copy = self
            .adopted
            .get(key)
            .map(|c| &**c)
            .filter(|_| !(from_file && observed.is_some()));
        // Any difference from the copy, additions included (an owner's are followed).
        let changed =
            copy.is_some_and(|c| observed.map(|o| adopt::copy(&sel, o)).as_ref() != Some(c));
        let name = t.actor.as_deref().unwrap_or("unknown");
        let actor = if name == "unknown" {
            crate::adopt::Actor::Unknown
        } else {
            crate::adopt::Actor::Process(name)
        };
        let ancestors = t
            .pid
            .and_then(|p| self.ancestors.get(&p).cloned())
            .unwrap_or_default();
        match adopt::judge(&sel, copy, observed, changed, actor, &ancestors) {
            Judgement::Adopt(c) => {
                info!(kind = NFTABLES_KIND, selector = %sel.adopt.name, name = %c.name, table = %key, chains = c.chains.len(), sets = c.sets.len(), "adopted");
                self.adopted.insert(key.clone(), Arc::new(c));
                self.save_adopted();
                self.publish();
                false
            }
            Judgement::Follow(c) => {
                debug!(kind = NFTABLES_KIND, name = %c.name, actor = name, ancestors = %ancestors.join(","), "adopted table changed: copy updated");
                self.adopted.insert(key.clone(), Arc::new(c));
                self.save_adopted();
                false
            }
            Judgement::Forget => {
                let c = self.adopted.remove(key);
                let reason = if name == "unknown" {
                    "unknown_actor"
                } else {
                    "owner"
                };
                info!(kind = NFTABLES_KIND, selector = %sel.adopt.name, table = %key, actor = name, ancestors = %ancestors.join(","), "adopted table removed by an owner (or, under unknownActor: forget, by nobody known): forgotten");
                if let (Some(t), Some(c)) = (&self.telemetry, c) {
                    t.metrics
                        .adopted_forgotten
                        .get_or_create(&ForgetLabels {
                            kind: NFTABLES_KIND,
                            reason,
                        })
                        .inc();
                    self.reported.remove(&c.name);
                }
                self.save_adopted();
                self.publish();
                false
            }
            Judgement::Restore => true,
            Judgement::Nothing => {
                if let Some(c) = self.adopted.get(key) {
                    let n = c.name.clone();
                    self.in_sync(&n);
                }
                false
            }
        }
    }
}
