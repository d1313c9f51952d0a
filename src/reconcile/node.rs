//! The loop's hooks for neighbour and FDB entries, links and sysctls: which notifications are
//! wanted, device patterns following the links, the poll of settings the kernel does not
//! notify, and who a change is attributed to.

use super::{Agent, Batch, Cause};
use crate::model::fast::{HashMap, HashSet};
use crate::model::sysctl::{Scope, Setting, SysctlKey};
use crate::model::ObjectId;
use crate::obs::attribution::KERNEL_PORT;
use crate::observe::events::{RTNLGRP_IPV4_NETCONF, RTNLGRP_IPV6_NETCONF, RTNLGRP_NEIGH};
use crate::observe::kernel;
use crate::observe::mirror::NeighbourInterest;
use crate::observe::Change;
use crate::plan;
use std::time::Instant;

impl Agent {
    /// Keeps the protected neighbour and FDB entries in the mirror (and only those), and joins
    /// the notification groups of what is protected. Before a dump.
    pub(super) fn sync_interest(&mut self) {
        let d = &self.desired;
        self.mirror.set_neighbour_interest(NeighbourInterest {
            neighbours: d.neighbours.keys().cloned().collect(),
            fdb: d.fdb.keys().cloned().collect(),
            devices: None,
        });
        let mut groups = Vec::new();
        let neighbours = !d.neighbours.is_empty() || !d.fdb.is_empty();
        if neighbours {
            groups.push(RTNLGRP_NEIGH);
        }
        // Who deletes a neighbour entry is named only in the notification of its failure.
        if let Some(f) = &self.sightings_filter {
            f.set_membership(RTNLGRP_NEIGH, neighbours);
        }
        if !d.sysctls.is_empty() || !d.sysctl_patterns.is_empty() {
            groups.extend([RTNLGRP_IPV4_NETCONF, RTNLGRP_IPV6_NETCONF]);
        }
        self.events.set_groups(&groups);
    }

    /// After a dump: the pattern entries cover the links there are, and every protected
    /// setting is read.
    pub(super) fn refresh_node_state(&mut self, place: bool) {
        self.follow_links(place);
        let keys: Vec<SysctlKey> = self.desired.sysctls.keys().cloned().collect();
        kernel::read_sysctls(&mut self.mirror, &keys);
    }

    /// Makes the device patterns cover the links that exist now. Objects a new link brings are
    /// *placed* when `place` (not drift: nobody changed them, the link just came with the
    /// kernel's defaults); those of links that went are forgotten. True if anything changed.
    pub(super) fn follow_links(&mut self, place: bool) -> bool {
        if !self.desired.has_patterns() {
            return false;
        }
        let before: HashSet<ObjectId> = self.pattern_ids();
        let names: Vec<String> = self.mirror.links().map(|l| l.name.clone()).collect();
        if !self.desired.follow_links(names.iter().map(String::as_str)) {
            return false;
        }
        if place {
            let after = self.pattern_ids();
            self.placing.extend(after.difference(&before).cloned());
        }
        // New settings are read before they are planned.
        let new: Vec<SysctlKey> = self
            .desired
            .sysctls
            .keys()
            .filter(|k| !before.contains(&ObjectId::Sysctl((*k).clone())))
            .cloned()
            .collect();
        kernel::read_sysctls(&mut self.mirror, &new);
        let d = &self.desired;
        self.pending.retain(|id| d.protects(id));
        self.reported.retain(|id, _| d.protects(id));
        self.failed.retain(|id| d.protects(id));
        self.states.retain(|id, _| d.protects(id));
        self.contest.retain(|id| d.protects(id));
        self.placing.retain(|id| d.protects(id));
        self.telemetry.set_catalog(d);
        true
    }

    fn pattern_ids(&self) -> HashSet<ObjectId> {
        let d = &self.desired;
        let links = d.links.values().filter(|l| l.pattern.is_some());
        let sysctls = d.sysctls.values().filter(|s| s.pattern.is_some());
        links
            .map(|l| ObjectId::Link(l.device.clone()))
            .chain(sysctls.map(|s| ObjectId::Sysctl(s.key.clone())))
            .collect()
    }

    /// Records what a change of a neighbour or FDB entry, a link attribute or a setting means
    /// for this batch.
    pub(super) fn note_node(&mut self, change: Change, port: u32, batch: &mut Batch) {
        match change {
            Change::LinkOther { index } => {
                if let Some(l) = self.mirror.link(index) {
                    let id = ObjectId::Link(l.name.clone());
                    if self.desired.protects(&id) {
                        batch.dirty.insert(id);
                    }
                }
            }
            Change::Neighbour { id, removed } => {
                let id = ObjectId::Neighbour(id);
                if self.desired.protects(&id) {
                    batch.removals += usize::from(removed);
                    // `ip neigh del` is told as the entry failing, with the remover's port, then
                    // as its removal with port 0: the remover is kept.
                    if port != KERNEL_PORT || !batch.removed_by.contains_key(&id) {
                        batch.removed_by.insert(id.clone(), port);
                    }
                    batch.dirty.insert(id);
                }
            }
            Change::Fdb { id, removed } => {
                let id = ObjectId::Fdb(id);
                if self.desired.protects(&id) {
                    batch.removals += usize::from(removed);
                    note_port(&mut batch.removed_by, &id, port);
                    batch.dirty.insert(id);
                }
            }
            Change::Sysctl { family, ifindex } => {
                let Some(scope) = self.mirror.sysctl_scope(ifindex) else {
                    return;
                };
                batch.sysctl_default_changed |= scope == Scope::Default;
                for setting in Setting::of_family(family) {
                    let id = ObjectId::Sysctl(SysctlKey {
                        scope: scope.clone(),
                        setting,
                    });
                    if self.desired.protects(&id) {
                        batch.dirty.insert(id);
                    }
                }
            }
            _ => {}
        }
    }

    /// A `default` setting changed: the kernel copied it to every device that never had its
    /// own value written, without a notification for them. The protected device settings are
    /// read again.
    pub(super) fn reread_device_settings(&mut self, batch: &mut Batch) {
        let keys: Vec<SysctlKey> = self
            .desired
            .sysctls
            .keys()
            .filter(|k| matches!(k.scope, Scope::Device(_)))
            .cloned()
            .collect();
        for change in kernel::read_sysctls(&mut self.mirror, &keys) {
            self.note_node(change, KERNEL_PORT, batch);
        }
    }

    /// When the settings the kernel does not notify are read next; `None` when none is
    /// protected.
    pub(super) fn next_poll(&self) -> Option<Instant> {
        let polled = self.desired.sysctls.keys().any(|k| !k.setting.notified());
        polled.then(|| self.polled_at + self.desired.poll)
    }

    /// Reads the settings the kernel does not notify and repairs those that changed.
    pub(super) async fn on_poll(&mut self) {
        let started = Instant::now();
        self.polled_at = started;
        let keys: Vec<SysctlKey> = self
            .desired
            .sysctls
            .keys()
            .filter(|k| !k.setting.notified())
            .cloned()
            .collect();
        let mut batch = Batch::default();
        for change in kernel::read_sysctls(&mut self.mirror, &keys) {
            self.note_node(change, KERNEL_PORT, &mut batch);
        }
        if batch.dirty.is_empty() {
            return;
        }
        let plan = plan::plan_dirty(&self.desired, &self.mirror, &batch.dirty);
        let cause = Cause::Events {
            redumped: false,
            rules_current: false,
        };
        self.execute(plan, started, Some(&batch.dirty), &batch.removed_by, cause)
            .await;
    }
}

/// Kinds whose notifications never name who made a change (see `Kind::port_names_actor`):
/// a port other than 0 is believed, 0 means nobody known rather than the kernel.
fn note_port(removed_by: &mut HashMap<ObjectId, u32>, id: &ObjectId, port: u32) {
    if port != KERNEL_PORT || id.kind().port_names_actor() {
        removed_by.insert(id.clone(), port);
    }
}
