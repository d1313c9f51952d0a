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
            let pending = |(cause, reason): (PendingCause, String)| Pending {
                name: o.name.clone(),
                path: o.path.clone(),
                cause,
                reason,
            };
            let obj = Object {
                at: o.at,
                path: o.path.clone(),
            };
            let mut b = Builder::new(&self.file, "");
            match &o.kind {
                Kind::Rule(r) => {
                    let combos = match combinations(&o.fields, facts, explicit_family(&r.family)) {
                        Ok(c) => c,
                        Err(reason) => {
                            out.pending.push(pending(reason));
                            continue;
                        }
                    };
                    for combo in combos {
                        let mut raw = r.clone();
                        for ((f, _), v) in o.fields.iter().zip(combo) {
                            set(rule_field(&mut raw, f), v);
                        }
                        match b.rule(&obj, &raw, self.mode) {
                            Some(x) => out.rules.push(x),
                            None => out
                                .pending
                                .push(pending((PendingCause::InvalidValue, first_error(&mut b)))),
                        }
                    }
                }
                Kind::Route(r) => {
                    let combos = match combinations(&o.fields, facts, explicit_family(&r.family)) {
                        Ok(c) => c,
                        Err(reason) => {
                            out.pending.push(pending(reason));
                            continue;
                        }
                    };
                    for combo in combos {
                        let mut raw = r.clone();
                        for ((f, _), v) in o.fields.iter().zip(combo) {
                            set(route_field(&mut raw, f), v);
                        }
                        match b.route(&obj, &raw, self.mode) {
                            Some(x) => out.routes.push(x),
                            None => out
                                .pending
                                .push(pending((PendingCause::InvalidValue, first_error(&mut b)))),
                        }
                    }
                }
                Kind::Address(a) => {
                    let combos = match combinations(&o.fields, facts, None) {
                        Ok(c) => c,
                        Err(reason) => {
                            out.pending.push(pending(reason));
                            continue;
                        }
                    };
                    for combo in combos {
                        let mut raw = a.clone();
                        for v in combo {
                            set(&mut raw.address, v);
                        }
                        match b.address(&obj, &raw, self.mode) {
                            Some(x) => out.addresses.push(x),
                            None => out
                                .pending
                                .push(pending((PendingCause::InvalidValue, first_error(&mut b)))),
                        }
                    }
                }
                Kind::IpSet(s) => {
                    let (raw, notes) = expand_set(s, &o.fields, facts);
                    out.pending.extend(notes.into_iter().map(pending));
                    match b.ipset(&obj, &raw, self.mode) {
                        Some(x) => out.ipsets.push(x),
                        None => out
                            .pending
                            .push(pending((PendingCause::InvalidValue, first_error(&mut b)))),
                    }
                }
            }
        }
        out
    }
}

fn first_error(b: &mut Builder<'_>) -> String {
    let errors = std::mem::take(&mut b.errors);
    errors
        .into_iter()
        .map(|e| format!("{}: {}", e.field, e.message))
        .next()
        .unwrap_or_else(|| "invalid after expansion".to_owned())
}

/// Every combination of the fields' values whose families agree (with each other and with the
/// object's explicit family). `Err` says why there is none.
fn combinations(
    fields: &[(String, Templated)],
    facts: &ClusterFacts,
    family: Option<Family>,
) -> Result<Vec<Vec<String>>, (PendingCause, String)> {
    let mut lists = Vec::with_capacity(fields.len());
    for (_, t) in fields {
        let Some(values) = t.values(facts) else {
            return Err((
                PendingCause::NoValue,
                format!("waiting for {}: no such value yet", t.template),
            ));
        };
        let had_values = !values.is_empty();
        let values: Vec<String> = values
            .into_iter()
            .filter(|v| {
                family.is_none() || template::family_of(v).is_none_or(|f| Some(f) == family)
            })
            .collect();
        if values.is_empty() {
            let of = family
                .map(|f| format!(" of family {f}"))
                .unwrap_or_default();
            // Values of another family only are as good as none: the object waits.
            let cause = if had_values {
                PendingCause::NoFamily
            } else {
                PendingCause::NoValue
            };
            return Err((
                cause,
                format!("waiting for {}: no value{of} yet", t.template),
            ));
        }
        lists.push(values);
    }
    let total = lists.iter().try_fold(1usize, |n, l| n.checked_mul(l.len()));
    if total.is_none_or(|n| n > MAX_EXPANSION) {
        return Err((
            PendingCause::TooMany,
            format!("its templates expand to more than {MAX_EXPANSION} objects: narrow them"),
        ));
    }
    let mut combos: Vec<Vec<String>> = vec![Vec::new()];
    for list in &lists {
        let mut next = Vec::with_capacity(combos.len() * list.len());
        for c in &combos {
            for v in list {
                let mut c = c.clone();
                c.push(v.clone());
                next.push(c);
            }
        }
        combos = next;
    }
    // One object per value of one family: a combination mixing families is no object.
    combos.retain(|c| {
        let mut fams = c.iter().filter_map(|v| template::family_of(v));
        let first = fams.next();
        fams.all(|f| Some(f) == first)
    });
    if combos.is_empty() {
        return Err((
            PendingCause::NoFamily,
            "its templates have no values of one family".to_owned(),
        ));
    }
    Ok(combos)
}

/// The set with each templated entry replaced by its values of the set's family. A member that a
/// forbidden entry covers is left out (that is what `forbidden` is for: an API server address
/// that some Service also lists must not enter the set), and noted.
fn expand_set(
    s: &RawIpSet,
    fields: &[(String, Templated)],
    facts: &ClusterFacts,
) -> (RawIpSet, Vec<(PendingCause, String)>) {
    let family = explicit_family(&s.family).unwrap_or(Family::Ipv4);
    let mut notes = Vec::new();
    let mut raw = s.clone();
    let mut expand_list = |list: &Option<Vec<Scalar>>, name: &str| -> Option<Vec<Scalar>> {
        let list = list.as_ref()?;
        let mut out = Vec::with_capacity(list.len());
        for (j, entry) in list.iter().enumerate() {
            let key = format!("{name}[{j}]");
            let Some((_, t)) = fields.iter().find(|(f, _)| *f == key) else {
                out.push(entry.clone());
                continue;
            };
            let Some(at) = entry.as_ref() else { continue };
            match t.values(facts) {
                None => notes.push((
                    PendingCause::NoValue,
                    format!("{key}: waiting for {}: no such value yet", t.template),
                )),
                Some(values) => out.extend(
                    values
                        .into_iter()
                        .filter(|v| template::family_of(v).is_none_or(|f| f == family))
                        .map(|v| Some(Spanned::new(v, at.referenced, at.defined))),
                ),
            }
        }
        Some(out)
    };
    raw.forbidden = expand_list(&s.forbidden, "forbidden");
    raw.members = expand_list(&s.members, "members");
    let forbidden: Vec<ipnet::IpNet> = raw
        .forbidden
        .iter()
        .flatten()
        .flatten()
        .filter_map(|f| values::prefix(&f.value).ok())
        .collect();
    if let Some(members) = &mut raw.members {
        members.retain(|m| {
            let Some(m) = m else { return true };
            let Ok(member) = Member::parse(&m.value) else {
                return true;
            };
            match forbidden.iter().find(|f| member.overlaps(f)) {
                Some(f) => {
                    notes.push((
                        PendingCause::ForbiddenMember,
                        format!("member `{}` is forbidden by `{f}`: left out", m.value),
                    ));
                    false
                }
                None => true,
            }
        });
    }
    (raw, notes)
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
