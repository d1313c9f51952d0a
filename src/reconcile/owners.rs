//! Addresses removed by their owner are left to the owner to put back for a while (see
//! `crate::handoff`); the agent repairs them if the owner is late.

use crate::handoff::{self, Remover};
use crate::model::fast::HashMap;
use crate::model::Mode;
use crate::model::ObjectId;
use crate::plan::{self, Dirty};
use crate::telemetry::attribution;
use crate::telemetry::metrics::HandoffLabels;
use crate::telemetry::status::State;
use std::time::Instant;
use tracing::info;

use super::batch::Batch;
use super::{Agent, Cause};

impl Agent {
    /// Decides, before any repair, which removed addresses are left to their owner for a while
    /// (see `handoff`): those leave the batch. One lookup of the removing processes serves the
    /// whole batch.
    pub(super) fn hand_off_addresses(&mut self, batch: &mut Batch) {
        let removed = std::mem::take(&mut batch.addresses_removed);
        let mut ports: Vec<u32> = removed
            .iter()
            .map(|(_, p)| *p)
            .filter(|p| *p != attribution::KERNEL_PORT)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let names = if ports.is_empty() {
            std::collections::HashMap::new()
        } else {
            self.resolver.resolve(&ports)
        };
        let now = Instant::now();
        for (id, port) in removed {
            let ObjectId::Address(dk) = &id else { continue };
            let (Some(want), Some(index)) = (
                self.desired.addresses.get(dk),
                self.mirror.link_index(&dk.0),
            ) else {
                continue;
            };
            let key = crate::model::AddressKey {
                ifindex: index,
                address: dk.1,
            };
            // Removed and added again within the batch: nothing to decide.
            if self.mirror.addresses.contains_key(&key) || want.mode != Mode::Enforce {
                continue;
            }
            let remover = match (port, names.get(&port).map(String::as_str)) {
                (attribution::KERNEL_PORT, _) => Remover::Kernel,
                (_, None | Some(attribution::UNKNOWN)) => Remover::Unknown,
                (_, Some(n)) => Remover::Process(n),
            };
            let handoff::Verdict::AwaitOwner(owner) =
                handoff::judge(want.managed_by.as_deref(), remover)
            else {
                continue;
            };
            info!(
                name = %want.name,
                object = %want.describe(),
                owner = %owner,
                netlink_port = port,
                grace_ms = self.handoff.grace().as_millis() as u64,
                "address removed by its owner; leaving it to the owner to put back"
            );
            self.handoff.await_owner(&id, &owner, port, now);
            batch.dirty.addresses.remove(dk);
            let reason = format!(
                "removed by {owner}, its owner: waiting for {owner} to put it back (up to {} ms)",
                self.handoff.grace().as_millis()
            );
            self.ledger
                .set_board(&id, State::Pending, Some(reason.clone()));
            self.telemetry
                .board()
                .set_state(&id, State::Pending, Some(reason));
        }
    }

    /// A protected address came back while left to its owner: the owner put it back.
    pub(super) fn owner_returned(&mut self, id: &ObjectId) {
        let Some(back) = self.handoff.returned(id, Instant::now()) else {
            return;
        };
        info!(
            name = %self.name_of(id),
            owner = %back.owner,
            waited_us = back.waited.as_micros() as u64,
            "address put back by its owner"
        );
        self.count_handoff("owner_restored");
    }

    /// Owners that did not put their address back within the grace: the agent does.
    pub(super) async fn on_owner_late(&mut self) {
        let now = Instant::now();
        let late = self.handoff.expired(now);
        if late.is_empty() {
            return;
        }
        let mut dirty = Dirty::default();
        let mut removed_by = HashMap::default();
        for l in &late {
            info!(
                name = %self.name_of(&l.id),
                owner = %l.owner,
                waited_ms = l.waited.as_millis() as u64,
                "address not put back by its owner in time; restoring it"
            );
            self.count_handoff("grace_expired");
            // Its waiting state is no drift seen before: the repair is counted as a new one.
            self.ledger.set_board(&l.id, State::InSync, None);
            if let ObjectId::Address(k) = &l.id {
                dirty.addresses.insert(k.clone());
            }
            removed_by.insert(l.id.clone(), l.port);
        }
        let plan = plan::plan_dirty(&self.desired, &self.mirror, &dirty);
        let progress = self
            .execute(plan, now, Some(&dirty), &removed_by, Cause::OwnerLate)
            .await;
        self.retry_pending(progress).await;
    }

    pub(super) fn count_handoff(&self, outcome: &'static str) {
        self.telemetry
            .metrics
            .handoffs
            .get_or_create(&HandoffLabels { outcome })
            .inc();
    }
}
