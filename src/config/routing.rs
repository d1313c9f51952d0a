//! `spec.rules`, `spec.routes` and `spec.addresses`: each object checked and built, and no two
//! protecting one kernel object.

use super::build::{Builder, FamilyEvidence, Object};
use super::raw::{RawAddress, RawRoute, RawRule, RawSpec, Scalar};
use super::values::{self, Selector};
use crate::model::{
    DesiredAddress, DesiredRoute, DesiredRule, Family, Mode, RouteKey, RouteType, RuleAction,
    RuleKey, TABLE_MAIN,
};
use ipnet::IpNet;
use std::collections::HashMap;
use std::net::IpAddr;

/// Smallest MTU the kernel accepts for IPv4 (RFC 791) and IPv6 (RFC 8200).
const MTU_MIN_V4: u32 = 68;
const MTU_MIN_V6: u32 = 1280;
const MTU_MAX: u32 = 65535;

impl Builder<'_> {
    /// `spec.rules`, templated ones set aside.
    pub(super) fn rules(&mut self, spec: &RawSpec, mode: Mode) -> Vec<DesiredRule> {
        let mut rules = Vec::new();
        let mut rule_keys: HashMap<RuleKey, (String, u64)> = HashMap::new();
        for (i, item) in spec.rules.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.rules[{i}]"),
            };
            if self.templated_rule(&obj, &item.value, mode) {
                continue;
            }
            if let Some(rule) = self.rule(&obj, &item.value, mode) {
                self.unique_identity(
                    &mut rule_keys,
                    rule.key.clone(),
                    &rule.name,
                    &obj,
                    "rule",
                    || rule.key.to_string(),
                );
                rules.push(rule);
            }
        }
        rules
    }

    /// `spec.routes`, templated ones set aside.
    pub(super) fn routes(&mut self, spec: &RawSpec, mode: Mode) -> Vec<DesiredRoute> {
        let mut routes = Vec::new();
        let mut route_keys: HashMap<RouteKey, (String, u64)> = HashMap::new();
        for (i, item) in spec.routes.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.routes[{i}]"),
            };
            if self.templated_route(&obj, &item.value, mode) {
                continue;
            }
            if let Some(route) = self.route(&obj, &item.value, mode) {
                self.unique_identity(
                    &mut route_keys,
                    route.key.clone(),
                    &route.name,
                    &obj,
                    "route",
                    || format!("{} {}", route.key.family, route.key),
                );
                routes.push(route);
            }
        }
        routes
    }

    /// `spec.addresses`, templated ones set aside.
    pub(super) fn addresses(&mut self, spec: &RawSpec, mode: Mode) -> Vec<DesiredAddress> {
        let mut addresses = Vec::new();
        let mut address_keys: HashMap<(String, IpAddr), (String, u64)> = HashMap::new();
        for (i, item) in spec.addresses.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.addresses[{i}]"),
            };
            if self.templated_address(&obj, &item.value, mode) {
                continue;
            }
            if let Some(address) = self.address(&obj, &item.value, mode) {
                let key = (address.device.clone(), address.address);
                self.unique_identity(
                    &mut address_keys,
                    key,
                    &address.name,
                    &obj,
                    "address",
                    || format!("{} dev {}", address.address, address.device),
                );
                addresses.push(address);
            }
        }
        addresses
    }

    pub(super) fn rule(&mut self, obj: &Object, r: &RawRule, global: Mode) -> Option<DesiredRule> {
        let before = self.errors.len();
        let name = self.name(&r.name, obj);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let explicit = self.opt(&r.family, obj.field("family"), values::family);
        let priority = self.req(&r.priority, obj, "priority", |s| {
            values::u32_value(s, 0, false)
        });
        let from = self.opt(&r.from, obj.field("from"), values::selector);
        let to = self.opt(&r.to, obj.field("to"), values::selector);
        let iif = self.opt(&r.iif, obj.field("iif"), values::ifname);
        let oif = self.opt(&r.oif, obj.field("oif"), values::ifname);
        let (fwmark, fwmask) = self.rule_fwmark(obj, r);
        let (action, table) = self.rule_action(obj, r);
        let protocol = self.opt(&r.protocol, obj.field("protocol"), values::protocol);
        let family = self.family(
            obj,
            "rule",
            explicit,
            &[
                FamilyEvidence {
                    field: "from",
                    raw: &r.from,
                    family: from.and_then(Selector::family),
                    what: "prefix",
                },
                FamilyEvidence {
                    field: "to",
                    raw: &r.to,
                    family: to.and_then(Selector::family),
                    what: "prefix",
                },
            ],
        );
        if self.errors.len() != before {
            return None;
        }
        let key = RuleKey::new(
            family,
            priority?,
            from.and_then(Selector::net),
            to.and_then(Selector::net),
            iif,
            oif,
            fwmark,
            fwmask,
            // Non-lookup actions carry table 0; RuleKey::new enforces that too.
            table.unwrap_or(0),
            action?,
        );
        Some(DesiredRule {
            name: name?,
            mode,
            key,
            protocol,
        })
    }

    /// `fwmark` and `fwmask` (a mask without a mark is an error).
    fn rule_fwmark(&mut self, obj: &Object, r: &RawRule) -> (Option<u32>, Option<u32>) {
        let fwmark = self.opt(&r.fwmark, obj.field("fwmark"), |s| {
            values::u32_value(s, 0, true)
        });
        let fwmask = self.opt(&r.fwmask, obj.field("fwmask"), |s| {
            values::u32_value(s, 0, true)
        });
        if let (Some(mask), None) = (&r.fwmask, &r.fwmark) {
            self.error(
                mask.referenced,
                obj.field("fwmask"),
                "`fwmask` needs `fwmark`: a mask on its own matches nothing",
            );
        }
        (fwmark, fwmask)
    }

    /// `action` (lookup when absent) and the `table` it looks up: required for lookup, an error
    /// for the others.
    fn rule_action(&mut self, obj: &Object, r: &RawRule) -> (Option<RuleAction>, Option<u32>) {
        // An unknown action is reported by itself; whether `table` belongs depends on it.
        let action = match &r.action {
            None => Some(RuleAction::Lookup),
            Some(_) => self.opt(&r.action, obj.field("action"), values::rule_action),
        };
        let table = match (action, &r.table) {
            (Some(RuleAction::Lookup), _) => self.req(&r.table, obj, "table", values::table),
            (Some(_), Some(t)) => {
                let message = format!(
                    "a `{}` rule looks up no table: remove `table` or use action lookup",
                    raw_text(&r.action)
                );
                self.error(t.referenced, obj.field("table"), message);
                None
            }
            _ => None,
        };
        (action, table)
    }

    pub(super) fn route(
        &mut self,
        obj: &Object,
        r: &RawRoute,
        global: Mode,
    ) -> Option<DesiredRoute> {
        let before = self.errors.len();
        let name = self.name(&r.name, obj);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let explicit = self.opt(&r.family, obj.field("family"), values::family);
        let table = self
            .opt(&r.table, obj.field("table"), values::table)
            .unwrap_or(TABLE_MAIN);
        let destination = self.req(&r.destination, obj, "destination", values::destination);
        let gateway = self.opt(&r.gateway, obj.field("gateway"), values::address);
        let device = self.opt(&r.device, obj.field("device"), values::ifname);
        let prefsrc = self.opt(&r.source, obj.field("source"), values::address);
        let metric = self.opt(&r.metric, obj.field("metric"), |s| {
            values::u32_value(s, 0, false)
        });
        let scope = self.opt(&r.scope, obj.field("scope"), values::scope);
        let protocol = self.opt(&r.protocol, obj.field("protocol"), values::protocol);
        let onlink = self
            .opt(&r.onlink, obj.field("onlink"), values::boolean)
            .unwrap_or(false);
        let kind = self.opt(&r.kind, obj.field("type"), values::route_type);
        let family = self.route_family(obj, r, explicit, destination.flatten(), gateway, prefsrc);
        let mtu = self.route_mtu(obj, r, family);
        // Type-specific rules only make sense once the type itself is known.
        if r.kind.is_none() || kind.is_some() {
            let kind = kind.unwrap_or(RouteType::Unicast);
            self.route_type_rules(obj, r, kind);
        }
        self.onlink_needs_gateway(obj, r, onlink);
        if self.errors.len() != before {
            return None;
        }
        let kind = kind.unwrap_or(RouteType::Unicast);
        let destination = destination?.unwrap_or_else(|| family.any());
        Some(DesiredRoute {
            name: name?,
            mode,
            key: RouteKey::new(family, table, destination, metric),
            kind,
            gateway,
            device,
            prefsrc,
            scope,
            protocol,
            onlink,
            mtu,
        })
    }

    /// A route's family, from `family` or its destination, gateway and source.
    fn route_family(
        &mut self,
        obj: &Object,
        r: &RawRoute,
        explicit: Option<Family>,
        destination: Option<IpNet>,
        gateway: Option<IpAddr>,
        prefsrc: Option<IpAddr>,
    ) -> Family {
        self.family(
            obj,
            "route",
            explicit,
            &[
                FamilyEvidence {
                    field: "destination",
                    raw: &r.destination,
                    family: destination.map(|n| Family::of_net(&n)),
                    what: "prefix",
                },
                FamilyEvidence {
                    field: "gateway",
                    raw: &r.gateway,
                    family: gateway.map(|a| Family::of(&a)),
                    what: "address",
                },
                FamilyEvidence {
                    field: "source",
                    raw: &r.source,
                    family: prefsrc.map(|a| Family::of(&a)),
                    what: "address",
                },
            ],
        )
    }

    /// `mtu`, within what the kernel accepts for the family.
    fn route_mtu(&mut self, obj: &Object, r: &RawRoute, family: Family) -> Option<u32> {
        self.opt(&r.mtu, obj.field("mtu"), |s| {
            let min = match family {
                Family::Ipv4 => MTU_MIN_V4,
                Family::Ipv6 => MTU_MIN_V6,
            };
            let mtu = values::u32_value(s, 0, false)?;
            if mtu < min || mtu > MTU_MAX {
                return Err(format!(
                    "`{s}` is out of range: must be between {min} and {MTU_MAX} for an {family} route"
                ));
            }
            Ok(mtu)
        })
    }

    fn onlink_needs_gateway(&mut self, obj: &Object, r: &RawRoute, onlink: bool) {
        if let (Some(on), None) = (&r.onlink, &r.gateway) {
            if onlink {
                self.error(
                    on.referenced,
                    obj.field("onlink"),
                    "`onlink` needs a `gateway`: it tells the kernel the gateway is reachable on the device",
                );
            }
        }
    }

    /// What each route type may and must have, as the kernel sees it.
    fn route_type_rules(&mut self, obj: &Object, r: &RawRoute, kind: RouteType) {
        if let Some(g) = &r.gateway {
            if kind != RouteType::Unicast {
                self.error(
                    g.referenced,
                    obj.field("gateway"),
                    format!("{kind} routes cannot have a gateway"),
                );
            }
        }
        if let Some(d) = &r.device {
            if !kind.forwards() {
                self.error(
                    d.referenced,
                    obj.field("device"),
                    format!("{kind} routes cannot have a device: they drop the packets themselves"),
                );
            }
        }
        // Without these the kernel refuses the route (ENODEV), so it could never be enforced.
        match kind {
            RouteType::Unicast if r.gateway.is_none() && r.device.is_none() => self.error(
                obj.at,
                obj.path.clone(),
                "a unicast route needs a `gateway` or a `device`",
            ),
            RouteType::Local if r.device.is_none() => self.error(
                obj.at,
                obj.field("device"),
                "is required: local routes need a device",
            ),
            _ => {}
        }
    }

    pub(super) fn address(
        &mut self,
        obj: &Object,
        r: &RawAddress,
        global: Mode,
    ) -> Option<DesiredAddress> {
        let before = self.errors.len();
        let name = self.name(&r.name, obj);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let device = self.req(&r.device, obj, "device", values::ifname);
        let address = self.req(&r.address, obj, "address", values::interface_address);
        let managed_by = self.opt(&r.managed_by, obj.field("managedBy"), values::process_name);
        if self.errors.len() != before {
            return None;
        }
        let address = address?;
        Some(DesiredAddress {
            name: name?,
            mode,
            device: device?,
            address: address.addr(),
            prefix_len: address.prefix_len(),
            managed_by,
        })
    }
}

fn raw_text(raw: &Scalar) -> &str {
    raw.as_ref().map_or("", |s| s.value.as_str())
}
