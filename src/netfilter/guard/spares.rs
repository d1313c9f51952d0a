//! Spares of protected chains ([`crate::nftables::spare`]): made (iptables-nft only) for each
//! enforced chain with an image whose rules hold xtables extensions, one transaction at a time
//! between the guard's reads; renamed into the chain when a deletion puts it back
//! ([`super::images`]); made again after that, or a little after anyone else touched them (a
//! previous run's is replaced); deleted when their chain is no longer protected and when the
//! guard stops. Only the spares of this guard's chains: another agent on the node may keep
//! others.

use super::images::{Spare, SPARE_AGAIN_AFTER};
use super::{Guard, TableId};
use crate::model::Mode;
use crate::netfilter::model::DesiredChain;
use crate::netfilter::tools::{nfproto, Tools};
use crate::nftables::netlink::NetlinkError;
use crate::nftables::spare;
use std::collections::BTreeMap;
use std::sync::Arc;
use tracing::{debug, info, warn};

/// The name of the spare of a protected chain.
pub(super) fn spare_name(c: &DesiredChain) -> String {
    spare::name(nfproto(c.key.family), c.key.table.as_str(), &c.key.chain)
}

impl<T: Tools> Guard<T> {
    /// Makes the spare of one enforced chain that has an image and no spare yet, at the
    /// generation last read; the next after this one's NEWGEN has come through. Making one
    /// waits, in the kernel, for the objects of earlier transactions to be freed (as any
    /// iptables-nft rule with an extension does): never on the repair's path.
    pub(super) fn make_spare(&mut self) {
        let Some(gen) = self.images.gen else { return };
        if !self.unseen.is_empty() {
            return;
        }
        let now = std::time::Instant::now();
        let next = self
            .chains
            .iter()
            .filter(|c| c.mode == Mode::Enforce && !self.ledger.gave_up(&c.name))
            // Not during a fight: nothing is armed then, and each repair would make it again.
            .filter(|c| self.ledger.would_repair_now(&c.name, now))
            .filter(|c| {
                !self.images.spares.contains_key(&c.name)
                    && !self.images.no_spare.contains_key(&c.name)
            })
            .filter(|c| {
                let touched = self.images.spare_touched.get(&c.name);
                touched.is_none_or(|t| t.elapsed() >= SPARE_AGAIN_AFTER)
            })
            .find_map(|c| Some((c, Arc::clone(self.images.by_chain.get(&c.name)?))));
        let Some((c, image)) = next else { return };
        let (name, table, spare) = (c.name.clone(), c.key.table_id(), spare_name(c));
        let Some(build) = spare::build(&image, &spare) else {
            // Rules without extensions come back from the image without waiting.
            self.images.no_spare.insert(name, "not needed".into());
            return;
        };
        match self
            .tools
            .make_spare(self.backend, table, &spare, &build, gen)
        {
            Ok(Some((handle, tid))) => {
                self.remember_own(tid);
                let Some(swap) = spare::swap(&image, &spare, handle) else {
                    self.images.no_spare.insert(name, "no swap".into());
                    return;
                };
                debug!(kind = "chain", name = %name, spare = %spare, "spare made");
                let swap = Arc::new(swap);
                self.images.spares.insert(name, Spare { name: spare, swap });
            }
            Ok(None) => {
                self.images.no_spare.insert(name, "not made here".into());
            }
            // Something came in between: again after its NEWGEN.
            Err(NetlinkError::Refused(nix::errno::Errno::ERESTART) | NetlinkError::Changed) => {}
            // Its rules as the dump gives them are refused (iptables-nft's `-p` for a match
            // such as multiport is not in the dump): its image would be too.
            Err(e @ NetlinkError::Refused(nix::errno::Errno::EINVAL)) => {
                info!(kind = "chain", name = %name, reason = %e, "no spare and no image: if deleted, this chain is put back with iptables-restore");
                self.images.by_chain.remove(&name);
                self.images.unfit.insert(name.clone(), e.to_string());
                self.images.no_spare.insert(name, e.to_string());
            }
            Err(e) => {
                info!(kind = "chain", name = %name, spare = %spare, reason = %e, "no spare: if deleted, this chain is put back from its image");
                self.images.no_spare.insert(name, e.to_string());
            }
        }
    }

    /// Deletes the spares of `chains` (this guard's: another agent on the node may keep spares
    /// of other chains) in the tables they are in.
    pub(super) fn drop_spares_of(&mut self, chains: &[DesiredChain]) {
        let mut by_table: BTreeMap<TableId, Vec<String>> = BTreeMap::new();
        for c in chains {
            by_table
                .entry(c.key.table_id())
                .or_default()
                .push(spare_name(c));
            self.images.forget_spare(&c.name);
        }
        for (table, names) in by_table {
            match self.tools.drop_spares(self.backend, table, &names) {
                Ok(Some(tid)) => {
                    debug!(table = %table, "spares deleted");
                    self.remember_own(tid);
                }
                Ok(None) => {}
                Err(e) => warn!(table = %table, error = %e, "spares not deleted"),
            }
        }
    }
}
