//! Adoption: kernel rules and routes that `spec.adopt` selectors match are protected as they
//! appear, forgotten when their owner removes them or no pod holds their IP, and saved to the
//! adopted-state file.

use crate::adopt::{self, Actor, Verdict};
use crate::desired::DesiredState;
use crate::model::fast::HashSet;
use crate::model::ObjectId;
use crate::model::{DesiredRule, RouteKey, RuleKey};
use crate::observe::RouteInterest;
use crate::pod_liveness;
use crate::telemetry::attribution;
use crate::telemetry::metrics::ForgetLabels;
use std::path::PathBuf;
use std::time::Instant;
use tracing::{debug, error, info};

use super::batch::Batch;
use super::{kind_str, Agent};

/// Reads the adopted-state file (the rules, routes, neighbour and FDB entries it holds join
/// `desired`) and starts its writer. A file that cannot be read is ignored: the selectors adopt
/// again what is there.
pub(super) fn open_adopted_state(
    path: PathBuf,
    desired: &mut DesiredState,
) -> (
    crate::adopted_state::Merged,
    Option<crate::adopted_state::Writer>,
) {
    let mut merged = crate::adopted_state::Merged::default();
    match crate::adopted_state::read(&path) {
        Ok(saved) => {
            merged = crate::adopted_state::merge(saved, desired);
            info!(
                path = %path.display(),
                rules = merged.rules.len(),
                routes = merged.routes.len(),
                neighbours_and_fdb = merged.node.len(),
                "adopted state read"
            );
        }
        Err(e) => error!(error = %e, "adopted-state file ignored"),
    }
    let store = match crate::adopted_state::Writer::spawn(path) {
        Ok(w) => Some(w),
        Err(e) => {
            error!(error = %e, "cannot start the adopted-state writer");
            None
        }
    };
    (merged, store)
}

/// Which routes the mirror keeps: the protected ones, and every route of the tables adopt
/// selectors look at.
pub(super) fn route_interest(d: &DesiredState) -> RouteInterest {
    let keys = d.routes.keys().cloned().collect();
    let tables = adopt::route_tables(&d.adopt);
    if tables.is_empty() {
        RouteInterest::Keys(keys)
    } else {
        RouteInterest::KeysAndTables(keys, tables)
    }
}

impl Agent {
    /// The adopted-state writer, for the netfilter guard to save its part of the file.
    pub fn adopted_store(&self) -> Option<crate::adopted_state::Writer> {
        self.store.clone()
    }

    /// Hands the adopted rules, routes, neighbour and FDB entries to the adopted-state writer
    /// (its thread does the disk work).
    pub(super) fn save_adopted(&self) {
        let Some(store) = &self.store else {
            return;
        };
        let mut rules: Vec<crate::adopted_state::AdoptedRule> = self
            .adopted
            .iter()
            .filter_map(|(key, selector)| {
                Some(crate::adopted_state::AdoptedRule {
                    selector: selector.clone(),
                    key: key.clone(),
                    protocol: self.desired.rules.get(key)?.protocol,
                })
            })
            .collect();
        rules.sort_by(|a, b| a.key.cmp(&b.key));
        let mut routes: Vec<crate::adopted_state::AdoptedRoute> = self
            .adopted_routes
            .iter()
            .filter_map(|(key, selector)| {
                Some(crate::adopted_state::AdoptedRoute {
                    selector: selector.clone(),
                    route: self.desired.routes.get(key)?.clone(),
                })
            })
            .collect();
        routes.sort_by(|a, b| a.route.key.cmp(&b.route.key));
        let (mut neighbours, mut fdb) = (Vec::new(), Vec::new());
        for (id, selector) in &self.adopted_node {
            match id {
                ObjectId::Neighbour(n) => neighbours.extend(
                    self.desired
                        .neighbours
                        .get(n)
                        .map(|e| crate::adopted_state::AdoptedNeighbour::new(selector, e)),
                ),
                ObjectId::Fdb(f) => fdb.extend(
                    self.desired
                        .fdb
                        .get(f)
                        .map(|e| crate::adopted_state::AdoptedFdb::new(selector, e)),
                ),
                _ => {}
            }
        }
        neighbours.sort_by(|a, b| (&a.device, a.address).cmp(&(&b.device, b.address)));
        fdb.sort_by(|a, b| (&a.device, &a.lladdr, a.dst).cmp(&(&b.device, &b.lladdr, b.dst)));
        store.save(crate::adopted_state::AdoptedState {
            version: crate::adopted_state::VERSION,
            rules,
            routes,
            neighbours,
            fdb,
            ..Default::default()
        });
    }

    /// Adopts a kernel rule the mirror holds if a selector matches it. True if adopted.
    pub(super) fn adopt_rule(&mut self, key: &RuleKey) -> bool {
        if self.desired.adopt.is_empty()
            || self.desired.rules.contains_key(key)
            || (self.liveness.has_dismissed()
                && self.liveness.is_dismissed(&ObjectId::Rule(key.clone())))
        {
            return false;
        }
        let protocol = match self.mirror.rules.get(key) {
            Some(protos) => protos.first().copied().flatten(),
            None => return false,
        };
        let Some(sel) = adopt::select_rule(&self.desired.adopt, key, protocol) else {
            return false;
        };
        let rule: DesiredRule = sel.adopt_rule(key, protocol);
        info!(selector = %sel.name, object = %rule.describe(), "adopted");
        self.adopted.insert(key.clone(), sel.name.clone());
        self.desired.rules.insert(key.clone(), rule);
        true
    }

    /// Adopts a kernel route the mirror holds if a selector matches it. True if adopted.
    pub(super) fn adopt_route(&mut self, key: &RouteKey) -> bool {
        if self.desired.adopt.is_empty()
            || self.desired.routes.contains_key(key)
            || (self.liveness.has_dismissed()
                && self.liveness.is_dismissed(&ObjectId::Route(key.clone())))
        {
            return false;
        }
        let Some(route) = self.mirror.routes.get(key).and_then(|l| l.first()) else {
            return false;
        };
        let device = route
            .oif
            .and_then(|i| self.mirror.link(i))
            .map(|l| l.name.as_str());
        let Some(sel) = adopt::select_route(&self.desired.adopt, key, route, device) else {
            return false;
        };
        let desired = sel.adopt_route(key, route, device);
        info!(selector = %sel.name, object = %desired.describe(), "adopted");
        self.adopted_routes.insert(key.clone(), sel.name.clone());
        self.desired.routes.insert(key.clone(), desired);
        true
    }

    /// Adopts every kernel rule a selector matches (after a dump). True if any was adopted.
    pub(super) fn adopt_from_mirror(&mut self) -> bool {
        if self.desired.adopt.is_empty() {
            return false;
        }
        let keys: Vec<RuleKey> = self
            .mirror
            .rules
            .keys()
            .filter(|k| !self.desired.rules.contains_key(*k))
            .cloned()
            .collect();
        let mut any = false;
        for key in keys {
            any |= self.adopt_rule(&key);
        }
        let keys: Vec<RouteKey> = self
            .mirror
            .routes
            .keys()
            .filter(|k| !self.desired.routes.contains_key(*k))
            .cloned()
            .collect();
        for key in keys {
            any |= self.adopt_route(&key);
        }
        any
    }

    /// Decides, before any repair, which removals of adopted rules were their owners': those
    /// are forgotten (and left out of the batch); the rest are drift like any other. One lookup
    /// of the removing processes serves the whole batch.
    pub(super) fn judge_adopted_removals(&mut self, batch: &mut Batch) {
        let mut ports: Vec<u32> = batch.adopted_removed.iter().map(|(_, p)| *p).collect();
        ports.sort_unstable();
        ports.dedup();
        let identities = self.resolver.identify(&ports);
        for (id, port) in std::mem::take(&mut batch.adopted_removed) {
            // Removed and added again within the batch: still there, nothing to decide.
            let (present, selector) = match &id {
                ObjectId::Rule(k) => (self.mirror.rules.contains_key(k), self.adopted.get(k)),
                ObjectId::Route(k) => (
                    self.mirror.routes.contains_key(k),
                    self.adopted_routes.get(k),
                ),
                _ => continue,
            };
            let Some(sel_name) = selector.filter(|_| !present) else {
                continue;
            };
            let Some(sel) = self.desired.adopt.iter().find(|s| &s.name == sel_name) else {
                continue;
            };
            let who = identities.get(&port);
            let name = who.map(|w| w.name.as_str());
            let ancestors = who.map_or(&[][..], |w| w.ancestors.as_slice());
            let actor = match (port, name) {
                (attribution::KERNEL_PORT, _) => Actor::Kernel,
                (_, None) | (_, Some(attribution::UNKNOWN)) => Actor::Unknown,
                (_, Some(n)) => Actor::Process(n),
            };
            // A child of an owner (`ip` run by a CNI daemon) acts for the owner.
            let actor = sel.on_behalf(actor, ancestors);
            let verdict = sel.decide(actor);
            let actor_name = name.unwrap_or(attribution::UNKNOWN).to_string();
            let object = self.describe(&id);
            let reason = match actor {
                Actor::Unknown => "unknown_actor",
                _ => "owner",
            };
            if verdict == Verdict::Forget {
                info!(
                    selector = %sel.name,
                    actor = %actor_name,
                    ancestors = %ancestors.join(","),
                    netlink_port = port,
                    kind = kind_str(&id),
                    %object,
                    reason,
                    "forgotten: removed by its owner (or by nobody known, under unknownActor: forget)"
                );
                batch.dirty.remove(&id);
                self.drop_adopted(&id, reason);
                batch.removed_by.remove(&id);
                batch.adoption_changed = true;
            } else {
                debug!(selector = %sel.name, actor = %actor_name, ancestors = %ancestors.join(","), %object, "adopted object removed by a non-owner: drift");
            }
        }
    }

    /// Stops protecting an adopted object (it stays in the kernel as it is) and counts why.
    pub(super) fn drop_adopted(&mut self, id: &ObjectId, reason: &'static str) {
        match id {
            ObjectId::Rule(k) => {
                self.adopted.remove(k);
                self.desired.rules.remove(k);
            }
            ObjectId::Route(k) => {
                self.adopted_routes.remove(k);
                self.desired.routes.remove(k);
            }
            _ => return,
        }
        self.forget_record(id, reason);
    }

    /// What forgetting any adopted object shares, once its kind's maps have dropped it: its
    /// record and contest go, and why it was forgotten is counted.
    pub(super) fn forget_record(&mut self, id: &ObjectId, reason: &'static str) {
        if self.ledger.forget(id).is_some_and(|s| s.refused) {
            self.telemetry.set_refused(self.ledger.refused_count());
        }
        self.contest.retain(|i| i != id);
        self.telemetry
            .metrics
            .adopted_forgotten
            .get_or_create(&ForgetLabels {
                kind: kind_str(id),
                reason,
            })
            .inc();
    }

    /// Follows the adopted objects of `podLiveness` selectors that are tied to a pod IP (and
    /// only those), then judges them against the pods. True if any was forgotten or adopted
    /// again: the catalog and the adopted-state file are out of date.
    pub(super) fn sync_liveness(&mut self) -> bool {
        if self.pods.is_none() {
            return false;
        }
        self.retrack();
        let changed = self.judge_pods();
        if changed {
            // Adopted again: followed again.
            self.retrack();
        }
        changed
    }

    /// Keeps dismissed only what is still in the kernel and would be adopted by a `podLiveness`
    /// selector; the rest may be adopted again as any object.
    pub(super) fn prune_dismissed(&mut self) {
        let (m, adopt) = (&self.mirror, &self.desired.adopt);
        let follows =
            |s: Option<&adopt::AdoptSelector>| s.is_some_and(|s| s.pod_liveness.is_some());
        self.liveness.retain_dismissed(|id| match id {
            ObjectId::Rule(k) => m.rules.get(k).is_some_and(|p| {
                follows(adopt::select_rule(adopt, k, p.first().copied().flatten()))
            }),
            ObjectId::Route(k) => m.routes.get(k).and_then(|l| l.first()).is_some_and(|r| {
                let device = r.oif.and_then(|i| m.link(i)).map(|l| l.name.as_str());
                follows(adopt::select_route(adopt, k, r, device))
            }),
            _ => false,
        });
    }

    pub(super) fn retrack(&mut self) {
        let adopt = &self.desired.adopt;
        let grace = |selector: &str| {
            adopt
                .iter()
                .find(|s| s.name == selector)
                .and_then(|s| s.pod_liveness)
        };
        let mut followed: HashSet<ObjectId> = HashSet::default();
        for (k, selector) in &self.adopted {
            let ip = pod_liveness::rule_ip(k.from.as_ref(), k.to.as_ref());
            if let (Some(g), Some(ip)) = (grace(selector), ip) {
                let id = ObjectId::Rule(k.clone());
                self.liveness.track(id.clone(), ip, g);
                followed.insert(id);
            }
        }
        for (k, selector) in &self.adopted_routes {
            if let (Some(g), Some(ip)) = (grace(selector), pod_liveness::route_ip(&k.destination)) {
                let id = ObjectId::Route(k.clone());
                self.liveness.track(id.clone(), ip, g);
                followed.insert(id);
            }
        }
        self.liveness.retain(|id| followed.contains(id));
    }

    /// Forgets the adopted objects whose pod is gone, adopts again those whose IP a pod holds
    /// again. True if anything changed.
    pub(super) fn judge_pods(&mut self) -> bool {
        let Some(pods) = &self.pods else {
            return false;
        };
        let judgement = {
            // Held briefly: the Kubernetes thread waits for it to publish the next view.
            let view = pods.borrow();
            let judgement = self.liveness.judge(&view, Instant::now());
            if view.usable() {
                debug!(
                    pod_ips = view.ips.len(),
                    followed = self.liveness.len() + judgement.forget.len(),
                    held = self.liveness.held(),
                    "pod liveness"
                );
            }
            judgement
        };
        let mut changed = false;
        for (id, reason) in judgement.forget {
            let selector = match &id {
                ObjectId::Rule(k) => self.adopted.get(k),
                ObjectId::Route(k) => self.adopted_routes.get(k),
                _ => None,
            }
            .cloned()
            .unwrap_or_default();
            let object = self.describe(&id);
            info!(
                %selector,
                kind = kind_str(&id),
                %object,
                reason = %reason.as_str(),
                "forgotten: no pod on this node holds its IP"
            );
            self.drop_adopted(&id, reason.as_str());
            changed = true;
        }
        for id in judgement.revive {
            changed |= match &id {
                ObjectId::Rule(k) => self.adopt_rule(k),
                ObjectId::Route(k) => self.adopt_route(k),
                _ => false,
            };
        }
        changed
    }

    /// A new view of the pods, or the end of a grace period.
    pub(super) fn on_pods(&mut self) {
        if self.judge_pods() {
            self.retrack();
            self.telemetry.set_catalog(&self.desired);
            self.save_adopted();
        }
    }
}
