//! A running guard's reload: new chains, sets and adopt selectors (a ConfigMap edit, new facts,
//! a SIGHUP in file mode).

use super::chains::{self, Cause};
use super::{refusals, watched_tables, Adoption, Guard, GuardError, GuardReload, TableId};
use crate::netfilter::events::NftEvents;
use crate::netfilter::tools::{Backend, Tools};
use std::collections::{BTreeSet, HashSet};
use tracing::{error, info};

impl<T: Tools> Guard<T> {
    /// New chains and sets: protect these from now on. What is no longer listed stops being
    /// protected and is left as it is in the kernel. Chains whose repair did not take are
    /// repaired again (a reload re-affirms them). Unchanged, only those are looked at again.
    ///
    /// New adopt selectors: chains and sets they no longer cover are forgotten (left in the
    /// kernel as they are) and the ones they newly cover are adopted, both by the table and set
    /// reads below.
    pub(super) async fn reload(&mut self, r: GuardReload) -> Result<(), GuardError> {
        // The images are of chains the new config may not protect as the old one did.
        self.tools.arm(self.owner, None, Vec::new());
        let canonical = self
            .canon
            .canonicalise(&self.tools, &r.chains, &r.sets)
            .await;
        if !canonical.refused.is_empty() {
            // The reload path checks this before anything is applied; kept as a last guard.
            error!(error = %refusals(&canonical.refused), "chains not reloaded; keeping the ones in use");
            return Ok(());
        }
        chains::log_canonical(&canonical);
        let selectors = Adoption::netfilter_selectors(&r.adopt);
        let unchanged = canonical.chains == self.chains
            && r.sets == self.sets
            && selectors == self.adoption.selectors
            && (r.poll, r.resync) == (self.poll, self.resync);
        let reaffirmed = self.ledger.clear_give_ups();
        for name in &reaffirmed {
            info!(kind = "chain", name = %name, "reloaded: repairing the chain again");
        }
        if unchanged {
            let tables: BTreeSet<TableId> =
                reaffirmed.iter().filter_map(|n| self.table_of(n)).collect();
            self.out.announce = false;
            self.sync_tables(&tables, Cause::Place).await;
            self.out.announce = true;
            return Ok(());
        }
        self.images.clear();
        let read_chains = !self.chains.is_empty() || self.adoption.adopts_chains();
        let will_read_chains = !canonical.chains.is_empty()
            || !self.adoption.chains.is_empty()
            || selectors.iter().any(|s| s.chains.is_some());
        if will_read_chains && !read_chains && self.events.is_none() {
            // Started with no chains: no backend was detected and no socket opened.
            self.backend = self.canon.backend(&self.tools).await;
            if self.backend == Backend::Nft {
                self.images.gen = self.tools.generation();
                self.events = Some(NftEvents::subscribe().map_err(GuardError::Subscribe)?);
            }
        }
        if selectors != self.adoption.selectors {
            info!(
                selectors = %selectors.iter().map(|s| s.name.as_str()).collect::<Vec<_>>().join(","),
                "chain and set adopt selectors reloaded"
            );
            self.adoption.selectors = selectors;
        }
        // Spares of chains no longer protected (by name: chain, table and family).
        let gone: Vec<_> = self
            .chains
            .iter()
            .filter(|c| !canonical.chains.iter().any(|n| n.key == c.key))
            .cloned()
            .collect();
        self.drop_spares_of(&gone);
        self.chains = canonical.chains;
        self.sets = r.sets;
        self.poll = r.poll;
        self.resync = r.resync;
        self.watched = watched_tables(&self.chains, &self.adoption);
        let (adopted_chains, adopted_sets) = self.adoption.desired();
        let names: HashSet<String> = self
            .chains
            .iter()
            .chain(&adopted_chains)
            .map(|c| c.name.clone())
            .chain(
                self.sets
                    .iter()
                    .chain(&adopted_sets)
                    .map(|s| s.name.clone()),
            )
            .collect();
        self.ledger.retain(|n| names.contains(n));
        // Members may have changed with the same set text: plan every set again.
        self.ledger.clear_digests();
        let tables: BTreeSet<TableId> = self.watched.keys().copied().collect();
        self.out.announce = false;
        self.sync_tables(&tables, Cause::Place).await;
        self.sync_sets(true).await;
        self.publish();
        self.out.announce = true;
        info!(
            chains = self.chains.len(),
            ipsets = self.sets.len(),
            "chains and sets reloaded"
        );
        Ok(())
    }
}
