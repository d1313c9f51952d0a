//! Objects with templates: checked at load time with stand-in values (so every other field gets
//! its usual file:line:field error), kept as written, and expanded against [`ClusterFacts`] by
//! the same builder that checks literal objects. Pure.
//!
//! A template yielding a list makes one object per value of the object's family (an explicit
//! `family`, or the family of the template's `.ipv4`/`.ipv6`). A fact that does not exist yet
//! (no podCIDR, no such annotation, no matching Service) leaves the object *pending*: reported,
//! not an error, and expanded as soon as the fact appears.

use super::build::{Builder, Object, TemplatedKind as Kind, TemplatedObject};
use super::raw::{RawAddress, RawIpSet, RawRoute, RawRule, Scalar};
use super::template::{self, Templated};
use super::values;
use crate::model::facts::ClusterFacts;
use crate::model::{DesiredAddress, DesiredRoute, DesiredRule, Family, Mode};
use crate::netfilter::model::{DesiredSet, Member};
use serde_saphyr::Spanned;

mod combine;
use combine::{combinations, expand_set};

/// Upper bound on the objects one templated object may expand to (the product of its fields'
/// values): a mistaken template must not make the agent build millions of rules.
const MAX_EXPANSION: usize = 100_000;

const ALLOWED: &str = "from, to (rules), destination, gateway, source (routes), address (addresses), members and forbidden (ipsets)";

/// The templated objects of a config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Templates {
    pub(super) file: String,
    /// `spec.mode`, for objects without their own.
    pub(super) mode: Mode,
    pub(super) objects: Vec<TemplatedObject>,
}

/// An object that could not be expanded (yet), and why.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Pending {
    pub name: String,
    /// Where it is in the config (`spec.rules[0]`).
    pub path: String,
    /// The kind of reason, for the pending gauge's label.
    pub cause: PendingCause,
    pub reason: String,
}

/// Why a templated object (or one of its values) is not protected: a small, fixed set, so that
/// it can be a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PendingCause {
    /// A fact does not exist yet (no podCIDR, no such annotation, no matching Service).
    NoValue,
    /// Values exist, but none of the object's family, or not of one family across fields.
    NoFamily,
    /// The templates would make more than [`MAX_EXPANSION`] objects.
    TooMany,
    /// A value does not fit its field (an annotation that is not an address).
    InvalidValue,
    /// A set member left out because a `forbidden` entry covers it.
    ForbiddenMember,
    /// The expansion protects the same object as another entry of the config.
    Duplicate,
}

impl PendingCause {
    pub const ALL: [PendingCause; 6] = [
        PendingCause::NoValue,
        PendingCause::NoFamily,
        PendingCause::TooMany,
        PendingCause::InvalidValue,
        PendingCause::ForbiddenMember,
        PendingCause::Duplicate,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            PendingCause::NoValue => "no_value",
            PendingCause::NoFamily => "no_family",
            PendingCause::TooMany => "too_many",
            PendingCause::InvalidValue => "invalid_value",
            PendingCause::ForbiddenMember => "forbidden_member",
            PendingCause::Duplicate => "duplicate",
        }
    }
}

/// The objects the templates expand to, besides the literal ones of the config.
#[derive(Clone, Debug, Default)]
pub struct Expanded {
    pub rules: Vec<DesiredRule>,
    pub routes: Vec<DesiredRoute>,
    pub addresses: Vec<DesiredAddress>,
    pub ipsets: Vec<DesiredSet>,
    pub pending: Vec<Pending>,
}

fn set(slot: &mut Scalar, value: String) {
    if let Some(s) = slot {
        s.value = value;
    }
}

fn rule_field<'a>(r: &'a mut RawRule, f: &str) -> &'a mut Scalar {
    match f {
        "from" => &mut r.from,
        _ => &mut r.to,
    }
}

fn route_field<'a>(r: &'a mut RawRoute, f: &str) -> &'a mut Scalar {
    match f {
        "destination" => &mut r.destination,
        "gateway" => &mut r.gateway,
        _ => &mut r.source,
    }
}

fn written(raw: &Scalar) -> String {
    raw.as_ref().map(|s| s.value.clone()).unwrap_or_default()
}

fn explicit_family(raw: &Scalar) -> Option<Family> {
    raw.as_ref().and_then(|s| values::family(&s.value).ok())
}

impl Templates {
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    pub fn len(&self) -> usize {
        self.objects.len()
    }

    /// Every template of the config (Kubernetes mode watches what they refer to).
    pub fn templates(&self) -> impl Iterator<Item = &template::Template> {
        self.objects
            .iter()
            .flat_map(|o| o.fields.iter().map(|(_, t)| &t.template))
    }

    /// Expands every templated object against the facts.
    pub fn expand(&self, facts: &ClusterFacts) -> Expanded {
        let mut out = Expanded::default();
        for o in &self.objects {
            let obj = Object {
                at: o.at,
                path: o.path.clone(),
            };
            let mut b = Builder::new(&self.file, "");
            let mut pending = Vec::new();
            match &o.kind {
                Kind::Rule(r) => {
                    let combos = combinations(&o.fields, facts, explicit_family(&r.family));
                    out.rules.extend(build_each(combos, &mut pending, |combo| {
                        let mut raw = r.clone();
                        for ((f, _), v) in o.fields.iter().zip(combo) {
                            set(rule_field(&mut raw, f), v);
                        }
                        b.rule(&obj, &raw, self.mode)
                            .ok_or_else(|| first_error(&mut b))
                    }));
                }
                Kind::Route(r) => {
                    let combos = combinations(&o.fields, facts, explicit_family(&r.family));
                    out.routes.extend(build_each(combos, &mut pending, |combo| {
                        let mut raw = r.clone();
                        for ((f, _), v) in o.fields.iter().zip(combo) {
                            set(route_field(&mut raw, f), v);
                        }
                        b.route(&obj, &raw, self.mode)
                            .ok_or_else(|| first_error(&mut b))
                    }));
                }
                Kind::Address(a) => {
                    let combos = combinations(&o.fields, facts, None);
                    out.addresses
                        .extend(build_each(combos, &mut pending, |combo| {
                            let mut raw = a.clone();
                            for v in combo {
                                set(&mut raw.address, v);
                            }
                            b.address(&obj, &raw, self.mode)
                                .ok_or_else(|| first_error(&mut b))
                        }));
                }
                Kind::IpSet(s) => {
                    let (raw, notes) = expand_set(s, &o.fields, facts);
                    pending.extend(notes);
                    match b.ipset(&obj, &raw, self.mode) {
                        Some(x) => out.ipsets.push(x),
                        None => pending.push((PendingCause::InvalidValue, first_error(&mut b))),
                    }
                }
            }
            out.pending
                .extend(pending.into_iter().map(|(cause, reason)| Pending {
                    name: o.name.clone(),
                    path: o.path.clone(),
                    cause,
                    reason,
                }));
        }
        out
    }
}

/// One object built from each combination of values; no combination, or one that does not
/// build, leaves the object (that value of it) pending.
fn build_each<T>(
    combos: Result<Vec<Vec<String>>, (PendingCause, String)>,
    pending: &mut Vec<(PendingCause, String)>,
    mut build: impl FnMut(Vec<String>) -> Result<T, String>,
) -> Vec<T> {
    let combos = match combos {
        Ok(c) => c,
        Err(reason) => {
            pending.push(reason);
            return Vec::new();
        }
    };
    let mut built = Vec::new();
    for combo in combos {
        match build(combo) {
            Ok(x) => built.push(x),
            Err(error) => pending.push((PendingCause::InvalidValue, error)),
        }
    }
    built
}

fn first_error(b: &mut Builder<'_>) -> String {
    let errors = std::mem::take(&mut b.errors);
    errors
        .into_iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .next()
        .unwrap_or_else(|| "invalid after expansion".to_owned())
}

impl Builder<'_> {
    /// Finds the templates of an object. `refused`: fields where a template is an error.
    /// Returns whether the object has any template (valid or not) and the valid ones.
    pub(super) fn scan(
        &mut self,
        obj: &Object,
        allowed: &[(String, &Scalar)],
        refused: &[(&str, &Scalar)],
    ) -> (bool, Vec<(String, Templated)>) {
        let mut any = false;
        let mut found = Vec::new();
        for (f, raw) in refused {
            if let Some(s) = raw {
                if template::has_template(&s.value) {
                    any = true;
                    let message = format!(
                        "`{}`: a template is not allowed here; templates go in {ALLOWED}",
                        s.value
                    );
                    self.error(s.referenced, obj.field(f), message);
                }
            }
        }
        for (f, raw) in allowed {
            let Some(s) = raw else { continue };
            if !template::has_template(&s.value) {
                continue;
            }
            any = true;
            if !self.kubernetes {
                let message = format!(
                    "`{}` is a template: templates are expanded only in Kubernetes mode (`netwarden run --configmap`; check with `netwarden validate --kubernetes`)",
                    s.value
                );
                self.error(s.referenced, obj.field(f), message);
                continue;
            }
            match template::parse(&s.value) {
                Ok(t) => found.push((f.clone(), t)),
                Err(e) => self.error(s.referenced, obj.field(f), e),
            }
        }
        (any, found)
    }

    /// Errors about a stand-in value name the value as written instead: (stand-in, written).
    fn restore_messages(&mut self, before: usize, swapped: &[(String, String)]) {
        for e in &mut self.errors[before..] {
            for (sample, written) in swapped {
                e.message = e.message.replace(sample.as_str(), written);
            }
        }
    }

    fn templated_object(
        &mut self,
        obj: &Object,
        name: &Scalar,
        kind: Kind,
        fields: Vec<(String, Templated)>,
    ) {
        let name = name.as_ref().map(|n| n.value.clone()).unwrap_or_default();
        self.templated.push(TemplatedObject {
            at: obj.at,
            path: obj.path.clone(),
            name,
            kind,
            fields,
        });
    }

    /// A rule with templates: checked with stand-ins and set aside. False: no templates.
    pub(super) fn templated_rule(&mut self, obj: &Object, r: &RawRule, mode: Mode) -> bool {
        let allowed = [("from".to_owned(), &r.from), ("to".to_owned(), &r.to)];
        let refused = [
            ("name", &r.name),
            ("family", &r.family),
            ("priority", &r.priority),
            ("iif", &r.iif),
            ("oif", &r.oif),
            ("fwmark", &r.fwmark),
            ("fwmask", &r.fwmask),
            ("table", &r.table),
            ("action", &r.action),
            ("protocol", &r.protocol),
            ("mode", &r.mode),
        ];
        let (any, fields) = self.scan(obj, &allowed, &refused);
        if !any || fields.is_empty() {
            return any;
        }
        let family = explicit_family(&r.family);
        let mut sample = r.clone();
        let mut swapped = Vec::new();
        for (f, t) in &fields {
            let slot = rule_field(&mut sample, f);
            let stand_in = t.sample(family);
            swapped.push((stand_in.clone(), written(slot)));
            set(slot, stand_in);
        }
        let before = self.errors.len();
        let ok = self.rule(obj, &sample, mode).is_some();
        self.restore_messages(before, &swapped);
        if ok {
            self.templated_object(obj, &r.name, Kind::Rule(r.clone()), fields);
        }
        true
    }

    pub(super) fn templated_route(&mut self, obj: &Object, r: &RawRoute, mode: Mode) -> bool {
        let allowed = [
            ("destination".to_owned(), &r.destination),
            ("gateway".to_owned(), &r.gateway),
            ("source".to_owned(), &r.source),
        ];
        let refused = [
            ("name", &r.name),
            ("family", &r.family),
            ("table", &r.table),
            ("device", &r.device),
            ("metric", &r.metric),
            ("scope", &r.scope),
            ("type", &r.kind),
            ("protocol", &r.protocol),
            ("onlink", &r.onlink),
            ("mtu", &r.mtu),
            ("mode", &r.mode),
        ];
        let (any, fields) = self.scan(obj, &allowed, &refused);
        if !any || fields.is_empty() {
            return any;
        }
        let family = explicit_family(&r.family);
        let mut sample = r.clone();
        let mut swapped = Vec::new();
        for (f, t) in &fields {
            let slot = route_field(&mut sample, f);
            let stand_in = t.sample(family);
            swapped.push((stand_in.clone(), written(slot)));
            set(slot, stand_in);
        }
        let before = self.errors.len();
        let ok = self.route(obj, &sample, mode).is_some();
        self.restore_messages(before, &swapped);
        if ok {
            self.templated_object(obj, &r.name, Kind::Route(r.clone()), fields);
        }
        true
    }

    pub(super) fn templated_address(&mut self, obj: &Object, a: &RawAddress, mode: Mode) -> bool {
        let allowed = [("address".to_owned(), &a.address)];
        let refused = [
            ("name", &a.name),
            ("device", &a.device),
            ("managedBy", &a.managed_by),
            ("mode", &a.mode),
        ];
        let (any, fields) = self.scan(obj, &allowed, &refused);
        if !any || fields.is_empty() {
            return any;
        }
        let mut sample = a.clone();
        let stand_in = fields[0].1.sample(None);
        let swapped = [(stand_in.clone(), written(&a.address))];
        set(&mut sample.address, stand_in);
        let before = self.errors.len();
        let ok = self.address(obj, &sample, mode).is_some();
        self.restore_messages(before, &swapped);
        if ok {
            self.templated_object(obj, &a.name, Kind::Address(a.clone()), fields);
        }
        true
    }

    pub(super) fn templated_ipset(&mut self, obj: &Object, s: &RawIpSet, mode: Mode) -> bool {
        let mut allowed = Vec::new();
        for (list, name) in [(&s.members, "members"), (&s.forbidden, "forbidden")] {
            for (j, entry) in list.iter().flatten().enumerate() {
                allowed.push((format!("{name}[{j}]"), entry));
            }
        }
        let refused = [
            ("name", &s.name),
            ("type", &s.kind),
            ("family", &s.family),
            ("membership", &s.membership),
            ("mode", &s.mode),
            ("hashsize", &s.hashsize),
            ("maxelem", &s.maxelem),
            ("timeout", &s.timeout),
            ("counters", &s.counters),
            ("comment", &s.comment),
            ("skbinfo", &s.skbinfo),
        ];
        let (any, fields) = self.scan(obj, &allowed, &refused);
        if !any || fields.is_empty() {
            return any;
        }
        // Stand-ins of the set's family (TEST-NET addresses for members, a broadcast address
        // for forbidden entries); everything else is checked as written.
        let family = explicit_family(&s.family);
        let mut sample = s.clone();
        let mut swapped = Vec::new();
        for (list, name) in [
            (&mut sample.members, "members"),
            (&mut sample.forbidden, "forbidden"),
        ] {
            for (j, entry) in list.iter_mut().flatten().enumerate() {
                let key = format!("{name}[{j}]");
                if let Some((_, t)) = fields.iter().find(|(f, _)| *f == key) {
                    // A forbidden stand-in that covers no plausible member (or other stand-in).
                    let stand_in = match (name, family) {
                        ("forbidden", Some(Family::Ipv6)) => "ff0f::ffff".to_owned(),
                        ("forbidden", _) => "255.255.255.255".to_owned(),
                        _ => t.sample(family),
                    };
                    swapped.push((stand_in.clone(), written(entry)));
                    set(entry, stand_in);
                }
            }
        }
        let before = self.errors.len();
        let ok = self.ipset(obj, &sample, mode).is_some();
        self.restore_messages(before, &swapped);
        if ok {
            self.templated_object(obj, &s.name, Kind::IpSet(s.clone()), fields);
        }
        true
    }
}
