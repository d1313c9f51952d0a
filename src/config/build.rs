//! Checks every value of a shape-valid document and builds the model values. All problems are
//! collected; a [`Config`] is returned only when there are none.

use super::raw::{RawAddress, RawDocument, RawIpSet, RawRoute, RawRule, RawSpec, Scalar};
use super::template::Templated;
use super::values;
use super::{Config, FieldError, API_VERSION, DEFAULT_RESYNC, KIND};
use crate::model::{Family, Mode};
use serde_saphyr::{Location, Spanned};
use std::collections::HashMap;

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
pub(super) struct FamilyEvidence<'a> {
    pub(super) field: &'static str,
    pub(super) raw: &'a Scalar,
    pub(super) family: Option<Family>,
    pub(super) what: &'static str,
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

        let rules = self.rules(spec, mode);
        let routes = self.routes(spec, mode);
        let addresses = self.addresses(spec, mode);
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
    pub(super) fn family(
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
}
