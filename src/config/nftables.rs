//! `spec.nftables`: native nftables tables, checked like the rest of the file (every problem
//! with its position and field path) and as strictly as the iptables chains: names, comments,
//! rules and elements end up in an `nft -f` transaction, so each is checked by
//! [`crate::nftables::text`] to stay within its own command. The value checks themselves live in
//! the nftables module; this is the glue to the file's positions.

use super::build::{Builder, Object};
use super::netfilter::content;
use super::raw::{RawNftChain, RawNftSet, RawNftTable, Scalar};
use super::values;
use crate::model::Mode;
use crate::nftables::model::{
    BaseChain, Content, DesiredChain, DesiredSet, DesiredTable, Element, Forbidden, NfFamily,
    NftConfig, RuleText, TableKey,
};
use crate::nftables::{schema, text};
use serde_saphyr::Spanned;
use std::collections::{HashMap, HashSet};

fn family(s: &str) -> Result<NfFamily, String> {
    NfFamily::parse(s)
        .ok_or_else(|| format!("unknown family `{s}`: use ip, ip6, inet, arp, bridge or netdev"))
}

fn policy(s: &str) -> Result<String, String> {
    match s {
        "accept" | "drop" => Ok(s.to_owned()),
        _ => Err(format!("unknown policy `{s}`: use accept or drop")),
    }
}

fn set_flag(s: &str) -> Result<String, String> {
    match s {
        "interval" | "timeout" | "constant" | "dynamic" => Ok(s.to_owned()),
        _ => Err(format!(
            "unknown set flag `{s}`: use interval, timeout, constant or dynamic"
        )),
    }
}

/// A timeout as nft prints it: `30s`, `1h`, `1h30m`, `2d`.
fn timeout(s: &str) -> Result<String, String> {
    let mut digits = false;
    let mut ok = !s.is_empty();
    for c in s.chars() {
        if c.is_ascii_digit() {
            digits = true;
        } else if matches!(c, 'd' | 'h' | 'm' | 's') && digits {
            digits = false;
        } else {
            ok = false;
        }
    }
    if ok && !digits {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "`{s}` is not a timeout as nft prints it: numbers with units d, h, m, s (`30s`, `1h30m`)"
        ))
    }
}

/// The chain and set names a rule or map value refers to: `jump X`, `goto X`, `@X`.
fn references(text: &str) -> (Vec<String>, Vec<String>) {
    let words = text::words(text);
    let mut chains = Vec::new();
    let mut sets = Vec::new();
    for (i, w) in words.iter().enumerate() {
        if matches!(w.as_str(), "jump" | "goto") {
            if let Some(c) = words.get(i + 1) {
                chains.push(c.trim_end_matches([',', '}']).to_owned());
            }
        }
        if let Some(s) = w.strip_prefix('@') {
            sets.push(s.trim_end_matches([',', '}']).to_owned());
        }
    }
    (chains, sets)
}

impl Builder<'_> {
    pub(super) fn nftables(
        &mut self,
        raw: &Option<Vec<Spanned<RawNftTable>>>,
        global: Mode,
    ) -> NftConfig {
        let mut tables = Vec::new();
        let mut keys: HashMap<TableKey, (String, u64)> = HashMap::new();
        for (i, item) in raw.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.nftables[{i}]"),
            };
            if let Some(t) = self.nft_table(&obj, &item.value, global) {
                self.unique_identity(&mut keys, t.key.clone(), &t.name, &obj, "table", || {
                    t.key.to_string()
                });
                tables.push(t);
            }
        }
        NftConfig {
            tables,
            adopt: Vec::new(),
        }
    }

    /// The `nftables` parts of `spec.adopt`, joined with their entries' owners and policy
    /// (`selectors`: the entries that validated).
    pub(super) fn nft_adopt(
        &mut self,
        raw: &Option<Vec<Spanned<super::raw::RawAdopt>>>,
        selectors: &[crate::adopt::AdoptSelector],
    ) -> Vec<crate::nftables::adopt::Selector> {
        let mut out = Vec::new();
        for (i, item) in raw.iter().flatten().enumerate() {
            let Some(n) = &item.value.nftables else {
                continue;
            };
            let path = format!("spec.adopt[{i}].nftables");
            let family = self.opt(&n.value.family, format!("{path}.family"), family);
            let tables = self.name_patterns(
                &n.value.names,
                n.referenced,
                &path,
                text::identifier,
                "calico-*",
            );
            let name = item.value.name.as_ref().map(|s| s.value.as_str());
            let adopt = selectors.iter().find(|s| Some(s.name.as_str()) == name);
            if let (Some(tables), Some(adopt)) = (tables, adopt) {
                if n.value.family.is_none() || family.is_some() {
                    out.push(crate::nftables::adopt::Selector {
                        adopt: adopt.clone(),
                        family,
                        tables,
                    });
                }
            }
        }
        out
    }

    fn nft_table(&mut self, obj: &Object, r: &RawNftTable, global: Mode) -> Option<DesiredTable> {
        let before = self.errors.len();
        let name = self.req(&r.name, obj, "name", values::object_name);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let family = self.req(&r.family, obj, "family", family);
        let table = self.req(&r.table, obj, "table", text::identifier);
        let comment = self.opt(&r.comment, obj.field("comment"), text::comment);
        let dormant = self.opt(&r.dormant, obj.field("dormant"), values::boolean);
        let mut names: HashMap<String, u64> = HashMap::new();
        let mut chains = Vec::new();
        for (j, item) in r.chains.iter().flatten().enumerate() {
            let cobj = Object {
                at: item.referenced,
                path: format!("{}.chains[{j}]", obj.path),
            };
            if let Some(c) = self.nft_chain(&cobj, &item.value, family) {
                self.unique_in_table(&mut names, &c.name, &cobj, "chain");
                chains.push(c);
            }
        }
        let mut set_names: HashMap<String, u64> = HashMap::new();
        let mut sets = Vec::new();
        let lists = [(&r.sets, "sets", false), (&r.maps, "maps", true)];
        for (list, field, map) in lists {
            for (j, item) in list.iter().flatten().enumerate() {
                let sobj = Object {
                    at: item.referenced,
                    path: format!("{}.{field}[{j}]", obj.path),
                };
                if let Some(s) = self.nft_set(&sobj, &item.value, map) {
                    self.unique_in_table(&mut set_names, &s.name, &sobj, "set or map");
                    sets.push(s);
                }
            }
        }
        self.nft_references(obj, r, &chains, &sets);
        if self.errors.len() != before {
            return None;
        }
        Some(DesiredTable {
            name: name?,
            mode,
            key: TableKey {
                family: family?,
                name: table?,
            },
            comment,
            dormant,
            chains,
            sets,
        })
    }

    fn unique_in_table(
        &mut self,
        seen: &mut HashMap<String, u64>,
        name: &str,
        obj: &Object,
        what: &str,
    ) {
        if let Some(line) = seen.get(name) {
            let message = format!("the table already has a {what} `{name}` (line {line})");
            self.error(obj.at, obj.field("name"), message);
        } else {
            seen.insert(name.to_owned(), obj.at.line());
        }
    }

    /// Every chain a protected rule or map element jumps to, and every set a rule names, must be
    /// protected in the same table: after a `nft delete table` the whole table is created in one
    /// transaction, and a reference to something it does not create would fail all of it.
    fn nft_references(
        &mut self,
        obj: &Object,
        r: &RawNftTable,
        chains: &[DesiredChain],
        sets: &[DesiredSet],
    ) {
        let chain_names: HashSet<&str> = chains.iter().map(|c| c.name.as_str()).collect();
        let set_names: HashSet<&str> = sets.iter().map(|s| s.name.as_str()).collect();
        let check = |b: &mut Self, raw: &Scalar, field: String, text: &str| {
            let (cs, ss) = references(text);
            let at = raw.as_ref().map_or(obj.at, |s| s.referenced);
            for c in cs.iter().filter(|c| !chain_names.contains(c.as_str())) {
                b.error(at, field.clone(), format!(
                    "jumps to chain `{c}`, which this table entry does not protect: after a `nft delete table` it could not be recreated (protect `{c}`; `content: contains` without rules protects just the chain)"
                ));
            }
            for s in ss.iter().filter(|s| !set_names.contains(s.as_str())) {
                b.error(at, field.clone(), format!(
                    "uses set `{s}`, which this table entry does not protect: after a `nft delete table` it could not be recreated (protect `{s}` under sets or maps)"
                ));
            }
        };
        for (j, c) in r.chains.iter().flatten().enumerate() {
            for (k, raw) in c.value.rules.iter().flatten().enumerate() {
                if let Some(t) = raw {
                    check(
                        self,
                        raw,
                        format!("{}.chains[{j}].rules[{k}]", obj.path),
                        &t.value,
                    );
                }
            }
        }
        for (j, m) in r.maps.iter().flatten().enumerate() {
            for (k, raw) in m.value.elements.iter().flatten().enumerate() {
                if let Some(t) = raw {
                    let value = t.value.split_once(" : ").map_or("", |(_, v)| v);
                    check(
                        self,
                        raw,
                        format!("{}.maps[{j}].elements[{k}]", obj.path),
                        value,
                    );
                }
            }
        }
    }

    fn nft_chain(
        &mut self,
        obj: &Object,
        r: &RawNftChain,
        family: Option<NfFamily>,
    ) -> Option<DesiredChain> {
        let before = self.errors.len();
        let name = self.req(&r.name, obj, "name", text::identifier);
        let comment = self.opt(&r.comment, obj.field("comment"), text::comment);
        let content = self
            .opt(&r.content, obj.field("content"), content)
            .unwrap_or_default();
        let base = self.nft_base(obj, r, family);
        let mut rules: Vec<RuleText> = Vec::new();
        for (j, raw) in r.rules.iter().flatten().enumerate() {
            let field = format!("{}.rules[{j}]", obj.path);
            if raw.is_none() {
                self.error(
                    obj.at,
                    field,
                    "is empty: write the rule as `nft list` prints it",
                );
                continue;
            }
            if let Some(rule) = self.opt(raw, field.clone(), text::rule) {
                let clash = rules
                    .iter()
                    .any(|x| x == &rule || (x.comment.is_some() && x.comment == rule.comment));
                if clash {
                    let at = raw.as_ref().map_or(obj.at, |s| s.referenced);
                    self.error(at, field, "the chain already lists this rule (or another with the same comment, which identifies a rule)");
                    continue;
                }
                rules.push(rule);
            }
        }
        if self.errors.len() != before {
            return None;
        }
        Some(DesiredChain {
            name: name?,
            base: base.ok()?,
            comment,
            content,
            rules,
        })
    }

    /// The base chain part: none of type, hook, priority → a regular chain; any → all three.
    fn nft_base(
        &mut self,
        obj: &Object,
        r: &RawNftChain,
        family: Option<NfFamily>,
    ) -> Result<Option<BaseChain>, ()> {
        let given = r.kind.is_some() || r.hook.is_some() || r.priority.is_some();
        if !given {
            for (raw, field) in [(&r.policy, "policy"), (&r.device, "device")] {
                if let Some(s) = raw {
                    self.error(
                        s.referenced,
                        obj.field(field),
                        "only base chains (with type, hook and priority) have one",
                    );
                }
            }
            return if r.policy.is_some() || r.device.is_some() {
                Err(())
            } else {
                Ok(None)
            };
        }
        let hooks = family.map(schema::hooks).unwrap_or(&[]);
        let kind = self.req(&r.kind, obj, "type", |s| Ok(s.to_owned()));
        let hook = self.req(&r.hook, obj, "hook", |s| {
            if family.is_none() || hooks.contains(&s) {
                Ok(s.to_owned())
            } else {
                Err(format!(
                    "`{s}` is not a hook of {} tables: use {}",
                    family.map_or("these", |f| f.as_str()),
                    hooks.join(", ")
                ))
            }
        });
        let hook_name = r.hook.as_ref().map_or("", |h| h.value.as_str()).to_owned();
        let priority = self.req(&r.priority, obj, "priority", |s| {
            schema::priority(family.unwrap_or(NfFamily::Ip), &hook_name, s)
        });
        let policy = self.opt(&r.policy, obj.field("policy"), policy);
        let device = self.opt(&r.device, obj.field("device"), values::ifname);
        if let (Some(f), Some(k), Some(h)) = (family, &kind, &hook) {
            if let Err(m) = schema::chain_type(f, k, h) {
                let at = r.kind.as_ref().map_or(obj.at, |s| s.referenced);
                self.error(at, obj.field("type"), m);
            }
            let needs_device = f == NfFamily::Netdev || h == "ingress";
            match (&r.device, needs_device) {
                (None, true) => self.error(obj.at, obj.field("device"), format!("is required: a {f} {h} chain hooks into one device")),
                (Some(d), false) => self.error(d.referenced, obj.field("device"), format!("only netdev chains and inet ingress chains have a device, not a {f} {h} chain")),
                _ => {}
            }
        }
        match (kind, hook, priority) {
            (Some(kind), Some(hook), Some(priority)) => Ok(Some(BaseChain {
                kind,
                hook,
                priority,
                policy,
                device,
            })),
            _ => Err(()),
        }
    }

    fn nft_set(&mut self, obj: &Object, r: &RawNftSet, map: bool) -> Option<DesiredSet> {
        let before = self.errors.len();
        let name = self.req(&r.name, obj, "name", text::identifier);
        let comment = self.opt(&r.comment, obj.field("comment"), text::comment);
        let timeout = self.opt(&r.timeout, obj.field("timeout"), timeout);
        let membership = self
            .opt(&r.membership, obj.field("membership"), content)
            .unwrap_or(Content::Contains);
        let mut flags = Vec::new();
        for (j, raw) in r.flags.iter().flatten().enumerate() {
            if let Some(f) = self.opt(raw, format!("{}.flags[{j}]", obj.path), set_flag) {
                flags.push(f);
            }
        }
        let declared = self.nft_set_declaration(obj, r, map);
        let interval = flags.iter().any(|f| f == "interval");
        let decl = declared.as_ref().map(|(_, d)| d);
        let forbidden = self.nft_set_forbidden(obj, r, decl);
        let elements = self.nft_set_elements(obj, r, map, decl, interval, &forbidden);
        if self.errors.len() != before {
            return None;
        }
        Some(DesiredSet {
            name: name?,
            map,
            declaration: declared?.0,
            flags,
            timeout,
            comment,
            elements,
            membership,
            forbidden,
        })
    }

    /// `type` or `typeof` (one of them), read by the schema.
    fn nft_set_declaration(
        &mut self,
        obj: &Object,
        r: &RawNftSet,
        map: bool,
    ) -> Option<(String, schema::Declaration)> {
        match (&r.kind, &r.type_of) {
            (Some(_), Some(t)) => {
                self.error(
                    t.referenced,
                    obj.field("typeof"),
                    "give `type` or `typeof`, not both",
                );
                None
            }
            (None, None) => {
                self.error(obj.at, obj.field("type"), "is required (or `typeof`)");
                None
            }
            (Some(_), None) => self.opt(&r.kind, obj.field("type"), |s| {
                schema::declaration("type", s, map)
            }),
            (None, Some(_)) => self.opt(&r.type_of, obj.field("typeof"), |s| {
                schema::declaration("typeof", s, map)
            }),
        }
    }

    /// `forbidden`: prefixes for a set keyed by address, else exact keys.
    fn nft_set_forbidden(
        &mut self,
        obj: &Object,
        r: &RawNftSet,
        decl: Option<&schema::Declaration>,
    ) -> Vec<Forbidden> {
        let mut forbidden = Vec::new();
        for (j, raw) in r.forbidden.iter().flatten().enumerate() {
            let field = format!("{}.forbidden[{j}]", obj.path);
            let f = if decl.is_some_and(schema::keyed_by_address) {
                self.opt(raw, field, values::prefix).map(Forbidden::Net)
            } else {
                self.opt(raw, field, |s| {
                    text::element(s, false).map(|e| Forbidden::Exact(e.key))
                })
            };
            forbidden.extend(f);
        }
        forbidden
    }

    /// `elements`, checked against the declaration and in canonical form; a forbidden or
    /// repeated one is an error.
    fn nft_set_elements(
        &mut self,
        obj: &Object,
        r: &RawNftSet,
        map: bool,
        decl: Option<&schema::Declaration>,
        interval: bool,
        forbidden: &[Forbidden],
    ) -> Vec<Element> {
        let mut elements: Vec<Element> = Vec::new();
        let mut keys = HashSet::new();
        for (j, raw) in r.elements.iter().flatten().enumerate() {
            let field = format!("{}.elements[{j}]", obj.path);
            let parsed = self.opt(raw, field.clone(), |s| {
                let e = text::element(s, map)?;
                match decl {
                    Some(d) => {
                        schema::check_element(&e, d, interval)?;
                        Ok(schema::canonical_element(&e, d))
                    }
                    None => Ok(e),
                }
            });
            let Some(e) = parsed else { continue };
            let at = raw.as_ref().map_or(obj.at, |s| s.referenced);
            let nets = decl.and_then(|d| schema::element_nets(&e.key, d));
            let hit = forbidden.iter().find(|f| match f {
                Forbidden::Exact(x) => *x == e.key,
                Forbidden::Net(n) => nets.as_deref().is_some_and(|v| schema::overlaps(v, n)),
            });
            if let Some(f) = hit {
                self.error(at, field, format!("`{e}` is forbidden by `{f}`"));
                continue;
            }
            if !keys.insert(e.key.clone()) {
                self.error(at, field, format!("`{}` is listed twice", e.key));
                continue;
            }
            elements.push(e);
        }
        elements
    }
}

#[cfg(test)]
#[path = "nftables_tests.rs"]
mod tests;
