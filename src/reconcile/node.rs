//! The loop's hooks for neighbour and FDB entries, links and sysctls: which notifications are
//! wanted, device patterns following the links, the poll of settings the kernel does not
//! notify, and who a change is attributed to.

use super::{Agent, Batch, Cause};
use crate::adopt::{self, Actor, Verdict};
use crate::desired::DesiredState;
use crate::model::fast::{HashMap, HashSet};
use crate::model::sysctl::{Scope, Setting, SysctlKey};
use crate::model::{FdbId, NeighbourId, ObjectId};
use crate::observe::events::{RTNLGRP_IPV4_NETCONF, RTNLGRP_IPV6_NETCONF, RTNLGRP_NEIGH};
use crate::observe::kernel;
use crate::observe::mirror::NeighbourInterest;
use crate::observe::Change;
use crate::plan;
use crate::telemetry::attribution::{self, KERNEL_PORT};
use std::time::Instant;
use tracing::{debug, info};

impl Agent {
    /// Keeps the protected neighbour and FDB entries in the mirror (and only those), and joins
    /// the notification groups of what is protected. Before a dump.
    pub(super) fn sync_interest(&mut self) {
        let d = &self.desired;
        // The devices adopt selectors look at: every entry of theirs is kept.
        let adopted: Vec<String> = d
            .adopt
            .iter()
            .filter_map(|s| s.neighbours.as_ref())
            .flat_map(|n| n.devices.iter().cloned())
            .collect();
        let mut groups = Vec::new();
        let neighbours = !d.neighbours.is_empty() || !d.fdb.is_empty() || !adopted.is_empty();
        self.mirror.set_neighbour_interest(NeighbourInterest {
            neighbours: d.neighbours.keys().cloned().collect(),
            fdb: d.fdb.keys().cloned().collect(),
            devices: adopted,
        });
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

    /// After a dump: the pattern entries cover the links there are, every protected setting is
    /// read, and the neighbour and FDB entries of adopt selectors' devices are adopted. True if
    /// any was adopted (the catalog and the adopted-state file are out of date).
    pub(super) fn refresh_node_state(&mut self, place: bool) -> bool {
        self.follow_links(place);
        let keys: Vec<SysctlKey> = self.desired.sysctls.keys().cloned().collect();
        kernel::read_sysctls(&mut self.mirror, &keys);
        self.adopt_node_from_mirror()
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
            for id in after.difference(&before) {
                self.ledger.set_placing(id);
            }
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
        self.ledger.retain(|id| d.protects(id));
        self.telemetry.set_refused(self.ledger.refused_count());
        self.contest.retain(|id| d.protects(id));
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
                if !removed && self.adopt_or_follow_neighbour(&id) {
                    batch.adoption_changed = true;
                    return;
                }
                let id = ObjectId::Neighbour(id);
                if removed && self.adopted_node.contains_key(&id) {
                    batch.adopted_node_removed.push(id.clone());
                }
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
                if !removed && self.adopt_or_follow_fdb(&id) {
                    batch.adoption_changed = true;
                    return;
                }
                let id = ObjectId::Fdb(id);
                if removed && self.adopted_node.contains_key(&id) {
                    batch.adopted_node_removed.push(id.clone());
                }
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

/// Adopted neighbour and FDB entries (`spec.adopt[].neighbours`, see `adopt::neighbours`).
impl Agent {
    /// Adopts every entry of the selectors' devices the mirror holds (after a dump). True if
    /// any was adopted.
    fn adopt_node_from_mirror(&mut self) -> bool {
        if !self.desired.adopt.iter().any(|s| s.neighbours.is_some()) {
            return false;
        }
        let m = &self.mirror;
        let name = |i: u32| m.link(i).map(|l| l.name.clone());
        let neighbours: Vec<NeighbourId> = m
            .neighbours()
            .filter_map(|(i, address, _)| {
                Some(NeighbourId {
                    device: name(i)?,
                    address,
                })
            })
            .collect();
        let fdb: Vec<FdbId> = m
            .fdb_remotes()
            .filter_map(|(i, lladdr, r)| {
                let dst = r.dst.filter(|_| lladdr.has_many_remotes());
                Some(FdbId {
                    device: name(i)?,
                    lladdr,
                    dst,
                })
            })
            .collect();
        let mut any = false;
        for id in neighbours {
            any |= self.adopt_or_follow_neighbour(&id);
        }
        for id in fdb {
            any |= self.adopt_or_follow_fdb(&id);
        }
        any
    }

    /// A neighbour entry of an adopt selector's device was added or changed: adopted if new,
    /// followed if adopted (its owner's business). True if the desired state changed.
    fn adopt_or_follow_neighbour(&mut self, id: &NeighbourId) -> bool {
        let oid = ObjectId::Neighbour(id.clone());
        let adopted = self.adopted_node.contains_key(&oid);
        if self.desired.protects(&oid) && !adopted {
            return false; // the config's own
        }
        let Some(sel) = adopt::select_neighbours(&self.desired.adopt, &id.device) else {
            return false;
        };
        let Some(observed) = self
            .mirror
            .link_index(&id.device)
            .and_then(|i| self.mirror.neighbour(i, id.address))
        else {
            return false;
        };
        // Failing or a cache entry: drift of an adopted entry (or nothing to adopt).
        let Some(entry) = sel.adopt_neighbour(id, observed) else {
            return false;
        };
        if self.desired.neighbours.get(id) == Some(&entry) {
            return false;
        }
        info!(kind = "neighbour", selector = %sel.name, name = %entry.name, object = %entry.describe(), followed = adopted, "adopted");
        self.adopted_node.insert(oid, sel.name.clone());
        self.desired.neighbours.insert(id.clone(), entry);
        true
    }

    /// As [`Agent::adopt_or_follow_neighbour`], for an FDB entry.
    fn adopt_or_follow_fdb(&mut self, id: &FdbId) -> bool {
        let oid = ObjectId::Fdb(id.clone());
        let adopted = self.adopted_node.contains_key(&oid);
        if self.desired.protects(&oid) && !adopted {
            return false;
        }
        let Some(sel) = adopt::select_neighbours(&self.desired.adopt, &id.device) else {
            return false;
        };
        let Some(ifindex) = self.mirror.link_index(&id.device) else {
            return false;
        };
        let Some(entry) = self
            .mirror
            .fdb(ifindex, id)
            .iter()
            .find_map(|r| sel.adopt_fdb(id, r))
        else {
            return false;
        };
        if self.desired.fdb.get(id) == Some(&entry) {
            return false;
        }
        info!(kind = "fdb", selector = %sel.name, name = %entry.name, object = %entry.describe(), followed = adopted, "adopted");
        self.adopted_node.insert(oid, sel.name.clone());
        self.desired.fdb.insert(id.clone(), entry);
        true
    }

    /// On a reload: adopted entries stay protected (with the new selector's mode) while a
    /// selector of the same name still adopts their device, also those missing right now (they
    /// are being repaired); the others are left as they are (see
    /// [`DesiredState::keep_adopted_node`]).
    pub(super) fn keep_adopted_node(&mut self, old: &DesiredState) {
        let adopted = std::mem::take(&mut self.adopted_node);
        self.adopted_node = self
            .desired
            .keep_adopted_node(adopted, &old.neighbours, &old.fdb);
    }

    /// Decides, before any repair, which removals of adopted entries were their owners'. The
    /// kernel names a neighbour entry's remover; an FDB entry's never (`unknownActor`), but it
    /// goes with its neighbour entry (same device and MAC) when an owner removed that one.
    pub(super) fn judge_adopted_node_removals(&mut self, batch: &mut Batch) {
        let mut removed = std::mem::take(&mut batch.adopted_node_removed);
        // Neighbour entries first: their verdict may take FDB entries along.
        removed.sort_by_key(|id| matches!(id, ObjectId::Fdb(_)));
        removed.dedup();
        let mut ports: Vec<u32> = removed
            .iter()
            .filter_map(|id| batch.removed_by.get(id).copied())
            .filter(|p| *p != KERNEL_PORT)
            .collect();
        ports.sort_unstable();
        ports.dedup();
        let names = self.resolver.resolve(&ports);
        for id in removed {
            let still = match &id {
                ObjectId::Neighbour(n) => self
                    .mirror
                    .link_index(&n.device)
                    .and_then(|i| self.mirror.neighbour(i, n.address))
                    .is_some(),
                ObjectId::Fdb(f) => self
                    .mirror
                    .link_index(&f.device)
                    .is_some_and(|i| !self.mirror.fdb(i, f).is_empty()),
                _ => continue,
            };
            let Some(sel_name) = self.adopted_node.get(&id).filter(|_| !still).cloned() else {
                continue; // back within the batch, or forgotten with its pair
            };
            let Some(sel) = self.desired.adopt.iter().find(|s| s.name == sel_name) else {
                continue;
            };
            let port = batch.removed_by.get(&id).copied();
            let name = port.and_then(|p| names.get(&p)).map(String::as_str);
            let actor = match (port, name) {
                (Some(KERNEL_PORT), _) if id.kind().port_names_actor() => Actor::Kernel,
                (_, None) | (_, Some(attribution::UNKNOWN)) => Actor::Unknown,
                (_, Some(n)) => Actor::Process(n),
            };
            let reason = match actor {
                Actor::Unknown => "unknown_actor",
                _ => "owner",
            };
            let object = self.desired.entry(&id).map(|e| e.1).unwrap_or_default();
            if sel.decide(actor) == Verdict::Restore {
                debug!(selector = %sel_name, actor = %name.unwrap_or(attribution::UNKNOWN), %object, "adopted object removed by a non-owner: drift");
                continue;
            }
            info!(
                selector = %sel_name,
                actor = %name.unwrap_or(attribution::UNKNOWN),
                netlink_port = ?port,
                kind = id.kind().as_str(),
                %object,
                "forgotten: removed by its owner"
            );
            let mut gone = vec![(id.clone(), reason)];
            if let ObjectId::Neighbour(n) = &id {
                // The FDB entry of the same device and MAC goes with it.
                let lladdr = self.desired.neighbours.get(n).map(|e| e.lladdr);
                gone.extend(
                    self.desired
                        .fdb
                        .keys()
                        .filter(|f| f.device == n.device && Some(f.lladdr) == lladdr)
                        .map(|f| ObjectId::Fdb(f.clone()))
                        .filter(|f| self.adopted_node.contains_key(f))
                        .map(|f| (f, "owner")),
                );
            }
            for (id, reason) in gone {
                batch.dirty.remove(&id);
                batch.removed_by.remove(&id);
                self.drop_adopted_node(&id, reason);
            }
            batch.adoption_changed = true;
        }
    }

    /// Stops protecting an adopted entry (it stays in the kernel as it is) and counts why.
    fn drop_adopted_node(&mut self, id: &ObjectId, reason: &'static str) {
        self.adopted_node.remove(id);
        match id {
            ObjectId::Neighbour(k) => {
                self.desired.neighbours.remove(k);
            }
            ObjectId::Fdb(k) => {
                self.desired.fdb.remove(k);
            }
            _ => return,
        }
        self.forget_record(id, reason);
    }
}
