//! The desired state: what must be present in the kernel, keyed by kernel identity. Pure.

use crate::config::Config;
use crate::model::fast::HashMap;
use crate::model::{DesiredAddress, DesiredRoute, DesiredRule, RouteKey, RuleKey};
use std::net::IpAddr;

/// Key of a desired address: the device is a name here (it may not exist yet).
pub type DesiredAddressKey = (String, IpAddr);

#[derive(Clone, Debug, Default, PartialEq)]
pub struct DesiredState {
    pub rules: HashMap<RuleKey, DesiredRule>,
    pub routes: HashMap<RouteKey, DesiredRoute>,
    pub addresses: HashMap<DesiredAddressKey, DesiredAddress>,
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
            adopt: config.adopt.clone(),
        }
    }

    pub fn len(&self) -> usize {
        self.rules.len() + self.routes.len() + self.addresses.len()
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
pub fn expand(config: &Config, facts: &crate::cluster::facts::ClusterFacts) -> Expansion {
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
