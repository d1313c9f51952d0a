//! The desired state: what must be present in the kernel, keyed by kernel identity. Pure.

mod adopted_node;
mod patterns;

use crate::config::Config;
use crate::model::fast::HashMap;
use crate::model::{
    DesiredAddress, DesiredFdb, DesiredLink, DesiredNeighbour, DesiredRoute, DesiredRule,
    DesiredSysctl, FdbId, Mode, NeighbourId, ObjectId, RouteKey, RuleKey, SysctlKey,
};
use std::time::Duration;

/// Key of a desired address: the device is a name here (it may not exist yet).
pub use crate::model::DesiredAddressKey;

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    pub rules: HashMap<RuleKey, DesiredRule>,
    pub routes: HashMap<RouteKey, DesiredRoute>,
    pub addresses: HashMap<DesiredAddressKey, DesiredAddress>,
    pub neighbours: HashMap<NeighbourId, DesiredNeighbour>,
    pub fdb: HashMap<FdbId, DesiredFdb>,
    /// Links by device name: the config's own, and one per link a pattern matches now.
    pub links: HashMap<String, DesiredLink>,
    /// Entries whose device is a pattern (`cni*`), as written; see [`DesiredState::follow_links`].
    pub link_patterns: Vec<DesiredLink>,
    /// Settings of `all`, `default` and devices, and one per link a pattern matches now.
    pub sysctls: HashMap<SysctlKey, DesiredSysctl>,
    /// Entries whose device is a pattern (the pattern in `key.scope`), as written.
    pub sysctl_patterns: Vec<DesiredSysctl>,
    /// How often settings the kernel does not notify are read (`spec.pollInterval`).
    pub poll: Duration,
    /// Selectors of kernel objects protected as they are seen (`spec.adopt`); the loop adds
    /// what they adopt to `rules`.
    pub adopt: Vec<crate::adopt::AdoptSelector>,
}

impl DesiredState {
    /// The desired state of a validated config. Validation has already refused two objects with
    /// the same identity, so nothing is silently dropped here.
    pub fn from_config(config: &Config) -> DesiredState {
        DesiredState {
            rules: config
                .rules
                .iter()
                .map(|r| (r.key.clone(), r.clone()))
                .collect(),
            routes: config
                .routes
                .iter()
                .map(|r| (r.key.clone(), r.clone()))
                .collect(),
            addresses: config
                .addresses
                .iter()
                .map(|a| ((a.device.clone(), a.address), a.clone()))
                .collect(),
            neighbours: config
                .neighbours
                .iter()
                .map(|n| (n.id(), n.clone()))
                .collect(),
            fdb: config.fdb.iter().map(|f| (f.id(), f.clone())).collect(),
            links: config
                .links
                .iter()
                .filter(|l| !crate::model::link::is_pattern(&l.device))
                .map(|l| (l.device.clone(), l.clone()))
                .collect(),
            link_patterns: config
                .links
                .iter()
                .filter(|l| crate::model::link::is_pattern(&l.device))
                .cloned()
                .collect(),
            sysctls: config
                .sysctls
                .iter()
                .filter(|s| !patterns::is_pattern_entry(s))
                .map(|s| (s.key.clone(), s.clone()))
                .collect(),
            sysctl_patterns: config
                .sysctls
                .iter()
                .filter(|s| patterns::is_pattern_entry(s))
                .cloned()
                .collect(),
            poll: config.poll_interval,
            adopt: config.adopt.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.rules.len()
            + self.routes.len()
            + self.addresses.len()
            + self.neighbours.len()
            + self.fdb.len()
            + self.links.len()
            + self.sysctls.len()
    }

    /// Whether an object is protected.
    pub fn protects(&self, id: &ObjectId) -> bool {
        match id {
            ObjectId::Rule(k) => self.rules.contains_key(k),
            ObjectId::Route(k) => self.routes.contains_key(k),
            ObjectId::Address(k) => self.addresses.contains_key(k),
            ObjectId::Neighbour(k) => self.neighbours.contains_key(k),
            ObjectId::Fdb(k) => self.fdb.contains_key(k),
            ObjectId::Link(k) => self.links.contains_key(k),
            ObjectId::Sysctl(k) => self.sysctls.contains_key(k),
        }
    }

    /// A protected object's name, description (as logs and `/status` show it) and mode.
    pub fn entry(&self, id: &ObjectId) -> Option<(&str, String, Mode)> {
        match id {
            ObjectId::Rule(k) => self.rules.get(k).map(|r| (&r.name, r.describe(), r.mode)),
            ObjectId::Route(k) => self.routes.get(k).map(|r| (&r.name, r.describe(), r.mode)),
            ObjectId::Address(k) => self
                .addresses
                .get(k)
                .map(|a| (&a.name, a.describe(), a.mode)),
            ObjectId::Neighbour(k) => self
                .neighbours
                .get(k)
                .map(|n| (&n.name, n.describe(), n.mode)),
            ObjectId::Fdb(k) => self.fdb.get(k).map(|f| (&f.name, f.describe(), f.mode)),
            ObjectId::Link(k) => self.links.get(k).map(|l| (&l.name, l.describe(), l.mode)),
            ObjectId::Sysctl(k) => self.sysctls.get(k).map(|s| (&s.name, s.describe(), s.mode)),
        }
        .map(|(name, describe, mode)| (name.as_str(), describe, mode))
    }

    /// Every protected object's identity.
    pub fn ids(&self) -> impl Iterator<Item = ObjectId> + '_ {
        let rules = self.rules.keys().cloned().map(ObjectId::Rule);
        let routes = self.routes.keys().cloned().map(ObjectId::Route);
        let addresses = self.addresses.keys().cloned().map(ObjectId::Address);
        let neighbours = self.neighbours.keys().cloned().map(ObjectId::Neighbour);
        let fdb = self.fdb.keys().cloned().map(ObjectId::Fdb);
        let links = self.links.keys().cloned().map(ObjectId::Link);
        let sysctls = self.sysctls.keys().cloned().map(ObjectId::Sysctl);
        rules
            .chain(routes)
            .chain(addresses)
            .chain(neighbours)
            .chain(fdb)
            .chain(links)
            .chain(sysctls)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Tables that hold protected routes: the only ones whose routes the mirror keeps.
    pub fn route_tables(&self) -> std::collections::HashSet<u32> {
        self.routes.keys().map(|k| k.table).collect()
    }
}

/// Everything a config protects once its templates are expanded against cluster facts.
#[derive(Clone, Debug, Default)]
pub struct Expansion {
    pub desired: DesiredState,
    pub chains: Vec<crate::netfilter::model::DesiredChain>,
    pub ipsets: Vec<crate::netfilter::model::DesiredSet>,
    /// Templated objects not (yet) protected, and why.
    pub pending: Vec<crate::config::Pending>,
}

/// Expands a config against cluster facts: its literal objects plus what its templates yield.
/// Pure. An expanded object with the identity of an object already protected (a literal one, or
/// an earlier expansion) is left out and reported as pending, as validation would have refused it
/// had it been written out.
pub fn expand(config: &Config, facts: &crate::model::facts::ClusterFacts) -> Expansion {
    let mut desired = DesiredState::from_config(config);
    let ex = config.templates.expand(facts);
    let mut pending = ex.pending;
    let mut clash = |name: &str, other: &str, kind: &str| {
        pending.push(crate::config::Pending {
            name: name.to_owned(),
            path: String::new(),
            cause: crate::config::PendingCause::Duplicate,
            reason: format!("protects the same {kind} as `{other}`: left out"),
        });
    };
    for r in ex.rules {
        match desired.rules.get(&r.key) {
            Some(o) if o.name != r.name => clash(&r.name, &o.name, "rule"),
            Some(_) => {}
            None => {
                desired.rules.insert(r.key.clone(), r);
            }
        }
    }
    for r in ex.routes {
        match desired.routes.get(&r.key) {
            Some(o) if o.name != r.name => clash(&r.name, &o.name, "route"),
            Some(_) => {}
            None => {
                desired.routes.insert(r.key.clone(), r);
            }
        }
    }
    for a in ex.addresses {
        let key = (a.device.clone(), a.address);
        match desired.addresses.get(&key) {
            Some(o) if o.name != a.name => clash(&a.name, &o.name, "address"),
            Some(_) => {}
            None => {
                desired.addresses.insert(key, a);
            }
        }
    }
    let mut ipsets = config.ipsets.clone();
    ipsets.extend(ex.ipsets);
    Expansion {
        desired,
        chains: config.chains.clone(),
        ipsets,
        pending,
    }
}
