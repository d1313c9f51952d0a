//! Checks every value of a shape-valid document and builds the model values. All problems are
//! collected; a [`Config`] is returned only when there are none.

use super::raw::{RawAddress, RawDocument, RawIpSet, RawRoute, RawRule, RawSpec, Scalar};
use super::template::Templated;
use super::values::{self, Selector};
use super::{Config, FieldError, API_VERSION, DEFAULT_RESYNC, KIND};
use crate::model::{
    DesiredAddress, DesiredRoute, DesiredRule, Family, Mode, RouteKey, RouteType, RuleAction,
    RuleKey, TABLE_MAIN,
};
use serde_saphyr::{Location, Spanned};
use std::collections::HashMap;
use std::net::IpAddr;

/// Smallest MTU the kernel accepts for IPv4 (RFC 791) and IPv6 (RFC 8200).
const MTU_MIN_V4: u32 = 68;
const MTU_MIN_V6: u32 = 1280;
const MTU_MAX: u32 = 65535;

#[derive(Clone, Debug, PartialEq, Eq)]
/// An object with templates, kept as written until it is expanded (`super::expand`).
pub(super) struct TemplatedObject {
    pub(super) at: Location,
    pub(super) path: String,
    pub(super) name: String,
    pub(super) kind: TemplatedKind,
    /// Field (`from`, `members[2]`) and its template.
    pub(super) fields: Vec<(String, Templated)>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum TemplatedKind {
    Rule(RawRule),
    Route(RawRoute),
    Address(RawAddress),
    IpSet(RawIpSet),
}

/// Checks a document; `kubernetes`: templates are allowed (Kubernetes mode), else each is an error.
pub(super) fn build_with(
    file: &str,
    text: &str,
    doc: Spanned<RawDocument>,
    kubernetes: bool,
) -> Result<Config, Vec<FieldError>> {
    let mut b = Builder::new(file, text);
    b.kubernetes = kubernetes;
    let config = b.document(doc);
    if b.errors.is_empty() {
        Ok(config)
    } else {
        // Stable sort: errors on one position keep the order the fields are checked in.
        b.errors.sort_by_key(|e| (e.line, e.column));
        Err(b.errors)
    }
}

pub(super) struct Builder<'f> {
    file: &'f str,
    /// The source, for checks that need what was written rather than what YAML made of it.
    pub(super) text: &'f str,
    pub(super) errors: Vec<FieldError>,
    /// Templates are allowed (Kubernetes mode).
    pub(super) kubernetes: bool,
    /// Objects with templates, set aside for expansion against cluster facts.
    pub(super) templated: Vec<TemplatedObject>,
}

/// Where an object sits: its position (for problems with the object or a missing field) and its
/// path prefix.
pub(super) struct Object {
    pub(super) at: Location,
    pub(super) path: String,
}

impl Object {
    pub(super) fn field(&self, name: &str) -> String {
        format!("{}.{name}", self.path)
    }
}

/// A value an object's family was inferred from (or checked against).
struct FamilyEvidence<'a> {
    field: &'static str,
    raw: &'a Scalar,
    family: Option<Family>,
    what: &'static str,
}

impl<'f> Builder<'f> {
    pub(super) fn new(file: &'f str, text: &'f str) -> Builder<'f> {
        Builder {
            file,
            text,
            errors: Vec::new(),
            kubernetes: false,
            templated: Vec::new(),
        }
    }
}

impl Builder<'_> {
    pub(super) fn error(
        &mut self,
        at: Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) {
        self.errors.push(FieldError {
            file: self.file.to_owned(),
            line: at.line(),
            column: at.column(),
            field: field.into(),
            message: message.into(),
        });
    }

    /// Parses an optional field; `None` when absent or invalid (then with an error recorded).
    pub(super) fn opt<T>(
        &mut self,
        raw: &Scalar,
        field: impl Into<String>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let spanned = raw.as_ref()?;
        // Block scalars (`|`) keep their newline; no value here may span lines or hide
        // control characters, and echoing them raw would garble the error output.
        if spanned.value.chars().any(char::is_control) {
            let message = format!(
                "`{}` contains a line break or control character",
                spanned.value.escape_debug()
            );
            self.error(spanned.referenced, field, message);
            return None;
        }
        match parse(&spanned.value) {
            Ok(v) => Some(v),
            Err(message) => {
                self.error(spanned.referenced, field, message);
                None
            }
        }
    }

    /// Parses a required field, reporting its absence at the object.
    pub(super) fn req<T>(
        &mut self,
        raw: &Scalar,
        obj: &Object,
        name: &str,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        if raw.is_none() {
            self.error(obj.at, obj.field(name), "is required");
            return None;
        }
        self.opt(raw, obj.field(name), parse)
    }

    fn document(&mut self, doc: Spanned<RawDocument>) -> Config {
        let root = Object {
            at: doc.referenced,
            path: String::new(),
        };
        let doc = doc.value;
        self.exact(&doc.api_version, &root, "apiVersion", API_VERSION);
        self.exact(&doc.kind, &root, "kind", KIND);

        let Some(spec) = doc.spec else {
            return Config {
                mode: Mode::default(),
                resync: DEFAULT_RESYNC,
                rules: Vec::new(),
                routes: Vec::new(),
                addresses: Vec::new(),
                chains: Vec::new(),
                ipsets: Vec::new(),
                neighbours: Vec::new(),
                fdb: Vec::new(),
                links: Vec::new(),
                sysctls: Vec::new(),
                poll_interval: super::DEFAULT_POLL_INTERVAL,
                templates: super::Templates::default(),
                adopt: Vec::new(),
                nftables: Default::default(),
            };
        };
        self.spec(&spec.value)
    }

    fn exact(&mut self, raw: &Scalar, root: &Object, name: &str, expected: &str) {
        match raw {
            None => self.error(
                root.at,
                name,
                format!("is required: set it to `{expected}`"),
            ),
            Some(v) if v.value != expected => self.error(
                v.referenced,
                name,
                format!("must be `{expected}`, not `{}`", v.value.escape_debug()),
            ),
            Some(_) => {}
        }
    }

    fn spec(&mut self, spec: &RawSpec) -> Config {
        let mode = self
            .opt(&spec.mode, "spec.mode", values::mode)
            .unwrap_or_default();
        let resync = self
            .opt(&spec.resync, "spec.resync", values::resync)
            .unwrap_or(DEFAULT_RESYNC);
        self.unique_names(spec);

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

        let (chains, ipsets, poll_interval) = self.netfilter(spec, mode);
        let adopt = self.adopt(spec, mode);
        let mut nftables = self.nftables(&spec.nftables, mode);
        nftables.adopt = self.nft_adopt(&spec.adopt, &adopt);
        let node = self.node_state(spec, mode);
        Config {
            mode,
            resync,
            rules,
            routes,
            addresses,
            chains,
            ipsets,
            neighbours: node.neighbours,
            fdb: node.fdb,
            links: node.links,
            sysctls: node.sysctls,
            poll_interval,
            templates: super::Templates {
                file: self.file.to_owned(),
                mode,
                objects: std::mem::take(&mut self.templated),
            },
            adopt,
            nftables,
        }
    }

    /// Two objects with one kernel identity would fight over the same kernel object (and the
    /// desired state keeps only one per key), so refuse the second.
    pub(super) fn unique_identity<K: std::hash::Hash + Eq>(
        &mut self,
        seen: &mut HashMap<K, (String, u64)>,
        key: K,
        name: &str,
        obj: &Object,
        kind: &str,
        describe: impl FnOnce() -> String,
    ) {
        if let Some((other, line)) = seen.get(&key) {
            let message = format!(
                "protects the same {kind} as `{other}` (line {line}): both are `{}`",
                describe()
            );
            self.error(obj.at, obj.path.clone(), message);
        } else {
            seen.insert(key, (name.to_owned(), obj.at.line()));
        }
    }

    pub(super) fn name(&mut self, raw: &Scalar, obj: &Object) -> Option<String> {
        self.req(raw, obj, "name", values::object_name)
    }

    /// Names are unique across all kinds. Checked in file order, so that the error lands on the
    /// later use whatever the order of the lists.
    fn unique_names(&mut self, spec: &RawSpec) {
        fn named<'a, T>(
            list: &'a Option<Vec<Spanned<T>>>,
            kind: &str,
            name: impl Fn(&T) -> &Scalar,
        ) -> Vec<(&'a Spanned<String>, String)> {
            let items = list.iter().flatten().enumerate();
            items
                .filter_map(|(i, item)| {
                    let n = name(&item.value).as_ref()?;
                    Some((n, format!("spec.{kind}[{i}].name")))
                })
                .collect()
        }
        let mut all = named(&spec.rules, "rules", |r| &r.name);
        all.extend(named(&spec.routes, "routes", |r| &r.name));
        all.extend(named(&spec.addresses, "addresses", |a| &a.name));
        all.extend(named(&spec.chains, "chains", |c| &c.name));
        all.extend(named(&spec.ipsets, "ipsets", |s| &s.name));
        all.extend(named(&spec.adopt, "adopt", |a| &a.name));
        all.extend(named(&spec.nftables, "nftables", |t| &t.name));
        all.extend(named(&spec.neighbours, "neighbours", |n| &n.name));
        all.extend(named(&spec.links, "links", |l| &l.name));
        all.extend(named(&spec.sysctls, "sysctls", |s| &s.name));
        all.sort_by_key(|(n, _)| (n.referenced.line(), n.referenced.column()));
        let mut first_use: HashMap<&str, u64> = HashMap::new();
        for (n, path) in all {
            if let Some(line) = first_use.get(n.value.as_str()) {
                let message = format!("name `{}` is already used at line {line}", n.value);
                self.error(n.referenced, path, message);
            } else {
                first_use.insert(&n.value, n.referenced.line());
            }
        }
    }

    /// The object's family: the explicit one, else the first evidence's, else IPv4. Every
    /// evidence of another family is an error.
    fn family(
        &mut self,
        obj: &Object,
        kind: &str,
        explicit: Option<Family>,
        evidence: &[FamilyEvidence<'_>],
    ) -> Family {
        let inferred = evidence.iter().find_map(|e| e.family.map(|f| (f, e.field)));
        let (family, reason) = match (explicit, inferred) {
            (Some(f), _) => (f, "set by `family`".to_owned()),
            (None, Some((f, field))) => (f, format!("taken from `{field}`")),
            (None, None) => return Family::Ipv4,
        };
        for e in evidence {
            let (Some(f), Some(raw)) = (e.family, e.raw) else {
                continue;
            };
            if f != family {
                let message = format!(
                    "`{}` is an {f} {}, but the {kind} is {family} ({reason})",
                    raw.value, e.what
                );
                self.error(raw.referenced, obj.field(e.field), message);
            }
        }
        family
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
        let family = self.family(
            obj,
            "route",
            explicit,
            &[
                FamilyEvidence {
                    field: "destination",
                    raw: &r.destination,
                    family: destination.flatten().map(|n| Family::of_net(&n)),
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
        );
        let mtu = self.opt(&r.mtu, obj.field("mtu"), |s| {
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
        });

        // Type-specific rules only make sense once the type itself is known.
        if r.kind.is_none() || kind.is_some() {
            let kind = kind.unwrap_or(RouteType::Unicast);
            self.route_type_rules(obj, r, kind);
        }
        if let (Some(on), None) = (&r.onlink, &r.gateway) {
            if onlink {
                self.error(
                    on.referenced,
                    obj.field("onlink"),
                    "`onlink` needs a `gateway`: it tells the kernel the gateway is reachable on the device",
                );
            }
        }

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
