//! The desired state: what must be present in the kernel, keyed by kernel identity. Pure.

use crate::config::Config;
use crate::model::{DesiredAddress, DesiredRoute, DesiredRule, RouteKey, RuleKey};
use std::collections::HashMap;
use std::net::IpAddr;

/// Key of a desired address: the device is a name here (it may not exist yet).
pub type DesiredAddressKey = (String, IpAddr);

#[derive(Clone, Debug, Default)]
pub struct DesiredState {
    pub rules: HashMap<RuleKey, DesiredRule>,
    pub routes: HashMap<RouteKey, DesiredRoute>,
    pub addresses: HashMap<DesiredAddressKey, DesiredAddress>,
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
