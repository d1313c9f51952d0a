//! Protected tables deleted whole, put back from their image ([`crate::nftables::replay`]) the
//! moment the deleting transaction's NEWGEN is read: before anything is read, planned or
//! spawned, so that the repair commits before the deleter closes its socket.
//!
//! An image is the table as the kernel held it when the engine last found it in sync. It is
//! dropped when anyone else's transaction changes the table (its NEWGEN says which), when the
//! engine repairs the table with `nft -f` (the kernel then holds what the config says, not what
//! was verified), on lost notifications and on reload; it is taken again the next time the
//! table is found in sync. The kernel only takes the batch at the generation the engine last
//! read: a transaction it has not read yet makes it refuse, and `nft -f` repairs as before.
//!
//! Between syncs, the images a deletion may put back at once are armed for the responder
//! ([`crate::nftables::responder`]), which commits them from its own thread at the NEWGEN; the
//! engine then claims that commit instead of making its own.

use super::{Engine, Planned, Why};
use crate::model::Mode;
use crate::nftables::armed::{Armed, Trigger};
use crate::nftables::events::Event;
use crate::nftables::listing::ObservedTable;
use crate::nftables::model::TableKey;
use crate::nftables::netlink::NetlinkError;
use crate::nftables::plan::{self, Aliases};
use crate::nftables::replay::{Census, Image, Unfit};
use crate::nftables::runner::Nft;
use crate::nftables::watch::Touched;
use crate::telemetry::contest::Decision;
use crate::telemetry::status::NFTABLES_KIND;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{debug, info, warn};

/// What the engine holds for replays.
#[derive(Debug, Default)]
pub(super) struct Images {
    by_table: HashMap<TableKey, Arc<Image>>,
    /// Tables that cannot have an image, and why (said once; forgotten on reload).
    unfit: HashMap<TableKey, String>,
    /// The generation of the last transaction read.
    pub(super) gen: Option<u32>,
}

impl Images {
    /// No images yet; the kernel at generation `gen`.
    pub(super) fn at(gen: Option<u32>) -> Images {
        Images {
            gen,
            ..Images::default()
        }
    }

    /// Follows one notification: `ended` are the tables a transaction by someone else just
    /// ended on (with whether it deleted them), as [`crate::nftables::watch::Watch`] said.
    pub(super) fn on_event(&mut self, ev: &Event, ended: &[(TableKey, bool)]) {
        match ev {
            Event::NewGen { gen, .. } => self.gen = gen.or(self.gen),
            Event::Overrun => self.by_table.clear(),
            Event::Change { .. } => {}
        }
        for (key, gone) in ended {
            // A deletion keeps the image: it is what puts the table back.
            if !gone {
                self.by_table.remove(key);
            }
        }
    }

    /// The kernel holds what the engine wrote, not the verified state.
    pub(super) fn written(&mut self, key: &TableKey) {
        self.by_table.remove(key);
    }

    /// Whether a table found in sync is worth an image: it holds exactly what the config
    /// names (an owner's extra objects are not recreated; a dump would only be thrown away).
    pub(super) fn worth_one(
        desired: &crate::nftables::model::DesiredTable,
        observed: &ObservedTable,
    ) -> bool {
        Census::of_observed(observed) == Census::of_desired(desired)
    }

    pub(super) fn clear(&mut self) {
        *self = Images {
            gen: self.gen,
            ..Images::default()
        };
    }
}

/// Tables put back from their image in this sync, and what the contest decided for every
/// deleted table looked at (so that the rest of the sync does not decide twice).
#[derive(Debug, Default)]
pub(super) struct Replayed {
    pub tables: HashSet<TableKey>,
    pub decided: HashMap<String, Decision>,
    /// From the start of the sync to the commit.
    pub took: Duration,
    /// Deleted tables that may be back all the same: read before they are repaired.
    pub reread: Vec<TableKey>,
}

impl<N: Nft> Engine<N> {
    /// Puts back at once, in one batch, the touched tables that were deleted whole, have an
    /// image and may be repaired now.
    pub(super) fn replay_gone(
        &mut self,
        touched: &BTreeMap<TableKey, Touched>,
        started: Instant,
    ) -> Replayed {
        let mut out = Replayed::default();
        let now = Instant::now();
        let mut ready = Vec::new();
        for (key, t) in touched {
            if !t.gone || !self.images.by_table.contains_key(key) {
                continue;
            }
            let Some(d) = self.tables.iter().find(|d| &d.key == key) else {
                continue;
            };
            if d.mode != Mode::Enforce || self.stuck.contains(&d.name) {
                continue;
            }
            let decision = self.contest.on_drift(&d.name, now);
            if matches!(decision, Decision::Now { .. }) {
                ready.push(key.clone());
            }
            out.decided.insert(d.name.clone(), decision);
        }
        let Some(gen) = self.images.gen.filter(|_| !ready.is_empty()) else {
            return out;
        };
        let images: Vec<&Image> = ready
            .iter()
            .filter_map(|k| self.images.by_table.get(k).map(|i| &**i))
            .collect();
        match self.nft.replay(&images, gen) {
            Ok(tid) => {
                out.took = started.elapsed();
                self.remember_own(Some(tid));
                self.stats.replays += 1;
                out.tables = ready.into_iter().collect();
            }
            Err(NetlinkError::PartlyReplayed) => {
                debug!(
                    kind = NFTABLES_KIND,
                    "the responder put back only some of the deleted tables: reading them"
                );
                out.reread = ready;
            }
            Err(e) => {
                let raced = matches!(e, NetlinkError::Refused(nix::errno::Errno::ERESTART));
                for k in ready {
                    self.images.by_table.remove(&k);
                    if raced {
                        debug!(kind = NFTABLES_KIND, table = %k, "a transaction came after the deletion: repairing with nft -f");
                    } else {
                        warn!(kind = NFTABLES_KIND, table = %k, error = %e, "the kernel refused the table's image: repairing with nft -f, and only with it from now on");
                        self.images.unfit.insert(k, e.to_string());
                    }
                }
            }
        }
        out
    }

    /// Arms, for the responder, the image of each table that a deletion now would have put
    /// back at once ([`Engine::replay_gone`]'s conditions, without deciding anything).
    pub(super) fn arm_images(&mut self) {
        let now = Instant::now();
        let armed = self
            .images
            .by_table
            .iter()
            .filter(|(key, _)| {
                self.tables.iter().any(|d| {
                    &d.key == *key
                        && d.mode == Mode::Enforce
                        && !self.stuck.contains(&d.name)
                        && self.contest.would_repair_now(&d.name, now)
                })
            })
            .map(|(key, image)| Armed {
                trigger: Trigger::TableGone(key.clone()),
                image: Arc::clone(image),
            })
            .collect();
        self.nft.arm(self.owner, self.images.gen, armed);
    }

    /// A replayed table as restored: what the deletion took is what was put back.
    pub(super) fn restored_from_image(
        &mut self,
        t: &Touched,
        desired: &crate::nftables::model::DesiredTable,
        aliases: &Aliases,
        why: Why,
        took: Duration,
    ) {
        let (Some(drift), _) = plan::plan_table(desired, None, aliases) else {
            return;
        };
        let p = Planned {
            key: desired.key.clone(),
            name: desired.name.clone(),
            drift,
            repair: None,
            actor: t.actor.clone().unwrap_or_else(|| "unknown".into()),
        };
        self.restored(&p, why, took, "image");
    }

    /// Takes the image of each protected table just found in sync that has none, unless a
    /// change to it is already queued (the image would not be of the state verified).
    pub(super) fn capture_settled(&mut self, settled: &[TableKey]) {
        for key in settled {
            if self.images.by_table.contains_key(key) || self.images.unfit.contains_key(key) {
                continue;
            }
            let Some(expected) = self
                .tables
                .iter()
                .find(|d| &d.key == key && d.mode == Mode::Enforce)
                .map(Census::of_desired)
            else {
                continue;
            };
            if self.drain_queued().is_err() || self.watch.touched(key) {
                continue;
            }
            match self.nft.capture(key, &expected) {
                Ok(Some(image)) => {
                    debug!(kind = NFTABLES_KIND, table = %key, messages = image.len(), "image taken");
                    self.images.by_table.insert(key.clone(), Arc::new(image));
                }
                // Changed since it was read: the next sync tries again.
                Ok(None)
                | Err(NetlinkError::Changed)
                | Err(NetlinkError::Unfit(Unfit::MoreThanConfigured)) => {}
                Err(e) => {
                    info!(kind = NFTABLES_KIND, table = %key, reason = %e, "if deleted whole, this table is put back with nft -f");
                    self.images.unfit.insert(key.clone(), e.to_string());
                }
            }
        }
    }
}
