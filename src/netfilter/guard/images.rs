//! Protected iptables-nft chains deleted whole, put back from their image
//! ([`crate::nftables::replay`]) at the deletion's NEWGEN, before the repair from the
//! notifications ([`crate::netfilter::blind`]): that one spawns `iptables-restore`, which
//! commits only after the deleter has closed its socket and the kernel has waited a grace
//! period for the deleted objects; a batch already compiled and committed on the agent's open
//! socket comes before that.
//!
//! As for nftables tables: an image is the chain, its rules and the one rule in each chain
//! configured to jump to it, as the kernel held them when the guard last found the chain in
//! sync with exactly its configured rules. It is dropped when anyone else changes the chain
//! (not when they delete it: that is what it is for), when the guard rewrites the chain with
//! `iptables-restore`, on lost notifications and on reload, and taken again the next time the
//! chain is found in sync. The batch is only valid at the generation the guard last read;
//! refused, the repair from the notifications follows as before.
//!
//! Between transactions, the images a deletion may put back at once are armed for the
//! responder ([`crate::nftables::responder`]), which commits them from its own thread at the
//! NEWGEN; the guard then claims that commit instead of making its own.

use super::{Guard, TableId};
use crate::model::Mode;
use crate::netfilter::blind::Touches;
use crate::netfilter::model::{DesiredChain, Position};
use crate::netfilter::plan::{ChainDrift, ChainFinding};
use crate::netfilter::tools::Tools;
use crate::nftables::armed::{Armed, Trigger};
use crate::nftables::model::{NfFamily, TableKey};
use crate::nftables::netlink::NetlinkError;
use crate::nftables::replay::{Image, Unfit};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Instant;
use tracing::{debug, info, warn};

/// How long one of the guard's own restores may go unseen before it is taken as one that
/// committed nothing.
pub(super) const UNSEEN_FOR: std::time::Duration = std::time::Duration::from_secs(2);

#[derive(Debug, Default)]
pub(super) struct ChainImages {
    /// By the protected chain's name (its entry's `name`).
    pub(super) by_chain: HashMap<String, Arc<Image>>,
    /// Chains that cannot have an image now, and why (tried again once the chain changes).
    pub(super) unfit: HashMap<String, String>,
    /// The generation of the last transaction read.
    pub(super) gen: Option<u32>,
    /// The spare of each chain that has one ([`crate::nftables::spare`]), by the protected
    /// chain's name.
    pub(super) spares: HashMap<String, Spare>,
    /// Chains that get no spare now, and why (tried again once their image is taken again).
    pub(super) no_spare: HashMap<String, String>,
    /// When someone else last touched a chain's spare: it is made again only
    /// [`SPARE_AGAIN_AFTER`] later.
    pub(super) spare_touched: HashMap<String, Instant>,
}

/// How long a spare someone else touched is left before it is made again: two agents on one
/// node (a DaemonSet's surge) would otherwise replace each other's spares back and forth.
pub(super) const SPARE_AGAIN_AFTER: std::time::Duration = std::time::Duration::from_secs(2);

/// A spare in the kernel, and the image that puts its chain back from it.
#[derive(Debug)]
pub(super) struct Spare {
    pub(super) name: String,
    pub(super) swap: Arc<Image>,
}

impl ChainImages {
    /// No images yet; the kernel at generation `gen`.
    pub(super) fn at(gen: Option<u32>) -> ChainImages {
        ChainImages {
            gen,
            ..ChainImages::default()
        }
    }

    /// What a protected chain is put back from: its spare, or else its image.
    pub(super) fn best(&self, name: &str) -> Option<&Arc<Image>> {
        match self.spares.get(name) {
            Some(s) => Some(&s.swap),
            None => self.by_chain.get(name),
        }
    }

    /// A transaction by someone else ended: the chains it changed without deleting them are no
    /// longer their image, and spares it touched are no longer copies.
    pub(super) fn forget_changed(&mut self, chains: &[DesiredChain], id: TableId, t: &Touches) {
        for c in chains.iter().filter(|c| c.key.table_id() == id) {
            let chain = &c.key.chain;
            if t.table || (t.changed.contains(chain) && !t.deleted.contains(chain)) {
                self.by_chain.remove(&c.name);
                self.unfit.remove(&c.name);
                self.forget_spare(&c.name);
            }
            // A chain unfit for its jumps (none, or two) may have one jump again now.
            if c.jumps.iter().any(|j| t.changed.contains(&j.chain)) {
                self.unfit.remove(&c.name);
            }
            let touched = |s: &Spare| t.changed.contains(&s.name) || t.deleted.contains(&s.name);
            if self.spares.get(&c.name).is_some_and(touched) {
                self.forget_spare(&c.name);
                self.spare_touched.insert(c.name.clone(), Instant::now());
            }
        }
    }

    /// The spare is no copy of the chain's image any more (it is made again, replacing it).
    pub(super) fn forget_spare(&mut self, name: &str) {
        self.spares.remove(name);
        self.no_spare.remove(name);
    }

    /// The guard rewrote the chain: the kernel holds what it wrote, not what was verified.
    pub(super) fn written(&mut self, name: &str) {
        self.by_chain.remove(name);
        self.forget_spare(name);
    }

    pub(super) fn clear(&mut self) {
        *self = ChainImages {
            gen: self.gen,
            ..ChainImages::default()
        };
    }
}

/// The chains a protected chain's jumps live in, each with whether its jump goes first.
fn jumps_to(c: &DesiredChain) -> Vec<(String, bool)> {
    c.jumps
        .iter()
        .filter(|j| j.rule.target() == Some(&c.key.chain))
        .map(|j| (j.chain.clone(), j.position == Position::First))
        .collect()
}

impl<T: Tools> Guard<T> {
    /// Puts back at once, in one batch, the protected chains of table `id` that the
    /// transaction deleted and that have an image and may be repaired now. Returns the chains
    /// it decided about (put back, or held back as contested): the repair from the
    /// notifications leaves them alone.
    pub(super) fn replay_deleted(&mut self, id: TableId, t: &Touches) -> BTreeSet<String> {
        let started = Instant::now();
        let Some(gen) = self.images.gen else {
            return BTreeSet::new();
        };
        let drifts: Vec<ChainDrift> = self
            .chains
            .iter()
            .filter(|c| c.key.table_id() == id && c.mode == Mode::Enforce)
            .filter(|c| t.deleted.contains(&c.key.chain) && !t.table)
            .filter(|c| self.images.by_chain.contains_key(&c.name))
            .filter(|c| !self.ledger.gave_up(&c.name) && !self.ledger.is_held(&c.name, started))
            .map(|c| ChainDrift {
                name: c.name.clone(),
                mode: c.mode,
                object: c.key.to_string(),
                findings: vec![ChainFinding::Missing],
            })
            .collect();
        if drifts.is_empty() {
            return BTreeSet::new();
        }
        let (allowed, fresh) = self.decide(&drifts, true, started);
        let decided: BTreeSet<String> = drifts.iter().map(|d| d.name.clone()).collect();
        let spared: Vec<String> = allowed
            .iter()
            .filter(|n| self.images.spares.contains_key(*n))
            .cloned()
            .collect();
        let mut result = self.replay_images(&allowed, gen);
        let mut via = if spared.is_empty() { "image" } else { "spare" };
        if !spared.is_empty()
            && matches!(result, Some(Err(ref e)) if !matches!(e, NetlinkError::PartlyReplayed))
        {
            // A spare someone deleted or changed since: the chains' own images, at once.
            debug!(
                kind = "chain",
                spares = spared.len(),
                "a spare was refused: putting back the chains' images"
            );
            spared.iter().for_each(|n| self.images.forget_spare(n));
            result = self.replay_images(&allowed, gen);
            via = "image";
        }
        let Some(result) = result else {
            return decided;
        };
        // Renamed into the chains, or refused: either way no longer spares.
        spared.iter().for_each(|n| self.images.forget_spare(n));
        match result {
            Ok(tid) => {
                self.remember_own(tid);
                let enforced: Vec<&ChainDrift> = drifts
                    .iter()
                    .filter(|d| allowed.contains(&d.name))
                    .collect();
                self.restored(id, &enforced, (&fresh, true), started, via);
                decided
            }
            // Some may be back: the read that follows repairs what is not.
            Err(NetlinkError::PartlyReplayed) => decided,
            Err(e) => {
                let raced = matches!(e, NetlinkError::Refused(nix::errno::Errno::ERESTART));
                for name in &allowed {
                    self.images.by_chain.remove(name);
                    if raced {
                        debug!(kind = "chain", name = %name, "a transaction came after the deletion: repairing with iptables-restore");
                    } else {
                        warn!(kind = "chain", name = %name, error = %e, "the kernel refused the chain's image: repairing with iptables-restore");
                        self.images.unfit.insert(name.clone(), e.to_string());
                    }
                }
                // Decided already: the restore from the notifications repairs them now.
                decided.difference(&allowed).cloned().collect()
            }
        }
    }

    /// Commits what the chains named are put back from (each its spare, or else its image);
    /// `None` when none has either.
    fn replay_images(
        &self,
        names: &BTreeSet<String>,
        gen: u32,
    ) -> Option<Result<u32, NetlinkError>> {
        let images: Vec<&Image> = names
            .iter()
            .filter_map(|n| self.images.best(n).map(|i| &**i))
            .collect();
        (!images.is_empty()).then(|| self.tools.replay(&images, gen))
    }

    /// Arms, for the responder, the image of each chain that a deletion now would have put
    /// back at once ([`Guard::replay_deleted`]'s conditions, without deciding anything).
    /// Nothing while one of the guard's own restores has not been seen: a deletion then is
    /// repaired from a fresh read.
    pub(super) fn arm_images(&mut self) {
        let now = Instant::now();
        // As at a NEWGEN: a restore without changes commits nothing, its NEWGEN never comes.
        self.unseen
            .retain(|(_, at)| now.saturating_duration_since(*at) < UNSEEN_FOR);
        let armed = self
            .chains
            .iter()
            .filter(|c| c.mode == Mode::Enforce && self.unseen.is_empty())
            .filter(|c| !self.ledger.gave_up(&c.name) && self.ledger.would_repair_now(&c.name, now))
            .filter_map(|c| {
                let image = self.images.best(&c.name)?;
                let id = c.key.table_id();
                let family = match id.family {
                    crate::model::Family::Ipv4 => NfFamily::Ip,
                    crate::model::Family::Ipv6 => NfFamily::Ip6,
                };
                Some(Armed {
                    trigger: Trigger::ChainGone {
                        table: TableKey {
                            family,
                            name: id.table.as_str().to_owned(),
                        },
                        chain: c.key.chain.clone(),
                    },
                    image: Arc::clone(image),
                })
            })
            .collect();
        self.tools.arm(self.owner, self.images.gen, armed);
    }

    /// Takes the image of each enforced protected chain of table `id` that is in sync (not in
    /// `drifted`) and has none.
    pub(super) fn capture_chains(&mut self, id: TableId, drifted: &BTreeSet<&str>) {
        let wanted: Vec<DesiredChain> = self
            .chains
            .iter()
            .filter(|c| c.key.table_id() == id && c.mode == Mode::Enforce)
            .filter(|c| !drifted.contains(c.name.as_str()) && !self.ledger.gave_up(&c.name))
            .filter(|c| {
                !self.images.by_chain.contains_key(&c.name)
                    && !self.images.unfit.contains_key(&c.name)
            })
            .cloned()
            .collect();
        for c in wanted {
            let (name, chain, rules) = (c.name.clone(), &c.key.chain, c.rules.len());
            let jumps = jumps_to(&c);
            match self
                .tools
                .capture_chain(self.backend, id, chain, rules, &jumps)
            {
                Ok(Some(image)) => {
                    debug!(kind = "chain", name = %name, table = %id, messages = image.len(), "image taken");
                    self.images.no_spare.remove(&name);
                    self.images.by_chain.insert(name, Arc::new(image));
                }
                Ok(None) | Err(NetlinkError::Changed) => {}
                Err(e) => {
                    if !matches!(e, NetlinkError::Unfit(Unfit::MoreThanConfigured)) {
                        info!(kind = "chain", name = %name, table = %id, reason = %e, "if deleted, this chain is put back with iptables-restore");
                    }
                    self.images.unfit.insert(name, e.to_string());
                }
            }
        }
    }
}
