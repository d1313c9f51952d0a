//! `spec.chains`, `spec.ipsets` and `spec.pollInterval`: checked like the rest of the file (every
//! problem with its position and field path), and more strictly than the rest, because chain
//! names, set names and rule specs end up inside `iptables-restore` / `ipset restore` input.

use super::build::{Builder, Object};
use super::raw::{RawChain, RawIpSet, RawSpec};
use super::{values, DEFAULT_POLL_INTERVAL};
use crate::model::{Family, Mode};
pub(super) use crate::netfilter::model::{
    valid_chain_name as chain_name, valid_set_name as set_name,
};
use crate::netfilter::model::{
    ChainKey, Content, DesiredChain, DesiredSet, Jump, Member, Position, SetOptions, SetType, Table,
};
use crate::netfilter::rulespec::RuleSpec;
use ipnet::IpNet;
use std::collections::HashMap;
use std::time::Duration;

const POLL_MIN: Duration = Duration::from_millis(100);
/// ipset's bounds: the smallest hash size it makes, and IPSET_MAX_TIMEOUT (seconds).
const HASHSIZE_MIN: u64 = 64;
const HASHSIZE_MAX: u64 = 1 << 31;
const TIMEOUT_MAX: u64 = 2_147_483;
const POLL_MAX: Duration = Duration::from_secs(3600);

pub(super) fn table(s: &str) -> Result<Table, String> {
    Table::parse(s).ok_or_else(|| format!("unknown table `{s}`: use filter, nat, mangle or raw"))
}

pub(super) fn content(s: &str) -> Result<Content, String> {
    match s {
        "exact" => Ok(Content::Exact),
        "contains" => Ok(Content::Contains),
        _ => Err(format!("unknown value `{s}`: use exact or contains")),
    }
}

fn position(s: &str) -> Result<Position, String> {
    match s {
        "first" => Ok(Position::First),
        "any" => Ok(Position::Any),
        _ => Err(format!("unknown position `{s}`: use first or any")),
    }
}

fn set_type(s: &str) -> Result<SetType, String> {
    SetType::parse(s).ok_or_else(|| {
        format!("unsupported set type `{s}`: use hash:ip, hash:net, hash:ip,port or hash:net,port")
    })
}

fn hashsize(s: &str) -> Result<u32, String> {
    let v = values::uint(s, HASHSIZE_MIN, HASHSIZE_MAX, false)?;
    if !v.is_power_of_two() {
        return Err(format!(
            "`{s}` is not a power of two: ipset rounds hash sizes up to one (use {})",
            v.next_power_of_two()
        ));
    }
    u32::try_from(v).map_err(|_| format!("`{s}` is out of range"))
}

fn maxelem(s: &str) -> Result<u32, String> {
    values::u32_value(s, 1, false)
}

fn timeout(s: &str) -> Result<u32, String> {
    let v = values::uint(s, 0, TIMEOUT_MAX, false)?;
    u32::try_from(v).map_err(|_| format!("`{s}` is out of range"))
}

fn rule_spec(s: &str) -> Result<RuleSpec, String> {
    RuleSpec::parse(s).map_err(|e| e.to_string())
}

fn poll_interval(s: &str) -> Result<Duration, String> {
    // The duration syntax is resync's; only the bounds differ.
    let d = match values::resync(s) {
        Ok(d) => d,
        Err(e) if e.contains("too short") => {
            let ms: u64 = s
                .strip_suffix("ms")
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            Duration::from_millis(ms)
        }
        Err(e) => return Err(e.replace("resync", "pollInterval")),
    };
    if d < POLL_MIN || d > POLL_MAX {
        return Err(format!(
            "`{s}` is out of range: pollInterval must be between 100ms and 1h"
        ));
    }
    Ok(d)
}

impl Builder<'_> {
    /// `- ! -s 10.0.0.0/8 -j X` is a YAML *tag* `!` followed by the scalar `-s 10.0.0.0/8 -j X`:
    /// YAML drops the negation silently, which would invert the rule. Refused with the fix.
    fn yaml_tag(&mut self, raw: &super::raw::Scalar, field: &str) -> bool {
        let Some(s) = raw else { return false };
        if s.value.starts_with('!') {
            return false;
        }
        let line = self
            .text
            .lines()
            .nth(s.referenced.line().saturating_sub(1) as usize)
            .unwrap_or("");
        let col = (s.referenced.column().saturating_sub(1) as usize).min(line.len());
        let (before, at) = line.split_at(col);
        let tagged = at.starts_with('!') || before.trim_end().ends_with('!');
        if tagged {
            self.error(
                s.referenced,
                field,
                format!(
                    "starts with `!`, which YAML reads as a tag and drops, inverting the match: quote the rule, e.g. \"! {}\"",
                    s.value
                ),
            );
        }
        tagged
    }

    pub(super) fn netfilter(
        &mut self,
        spec: &RawSpec,
        global: Mode,
    ) -> (Vec<DesiredChain>, Vec<DesiredSet>, Duration) {
        let poll = self
            .opt(&spec.poll_interval, "spec.pollInterval", poll_interval)
            .unwrap_or(DEFAULT_POLL_INTERVAL);

        let mut chains = Vec::new();
        // Jumps are checked once every chain is known: they may name a chain protected later.
        let mut jump_refs = Vec::new();
        let mut keys: HashMap<ChainKey, (String, u64)> = HashMap::new();
        for (i, item) in spec.chains.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.chains[{i}]"),
            };
            if let Some(chain) = self.chain(&obj, &item.value, global, &mut jump_refs) {
                self.unique_identity(
                    &mut keys,
                    chain.key.clone(),
                    &chain.name,
                    &obj,
                    "chain",
                    || chain.key.to_string(),
                );
                chains.push(chain);
            }
        }
        for (key, jump_chain, at, field) in jump_refs {
            let target = ChainKey {
                chain: jump_chain.clone(),
                ..key.clone()
            };
            let protected = chains.iter().find(|c| c.key == target);
            let message = if jump_chain == key.chain {
                Some("a jump lives in another chain (usually a builtin one such as POSTROUTING), not in the protected chain itself: put the rule in `rules`".to_owned())
            } else if key.table.is_builtin(&jump_chain) {
                None
            } else {
                match protected {
                    None => Some(format!(
                        "`{jump_chain}` is neither a builtin chain of the {} table nor a chain protected in this file: netwarden would have to create it without knowing its rules",
                        key.table
                    )),
                    Some(c) if c.content == Content::Exact => Some(format!(
                        "`{jump_chain}` is protected with content: exact by `{}`: list this rule in its `rules` instead, or the two would undo each other",
                        c.name
                    )),
                    Some(_) => None,
                }
            };
            if let Some(m) = message {
                self.error(at, field, m);
            }
        }

        let mut sets = Vec::new();
        for (i, item) in spec.ipsets.iter().flatten().enumerate() {
            let obj = Object {
                at: item.referenced,
                path: format!("spec.ipsets[{i}]"),
            };
            if self.templated_ipset(&obj, &item.value, global) {
                continue;
            }
            if let Some(set) = self.ipset(&obj, &item.value, global) {
                sets.push(set);
            }
        }
        (chains, sets, poll)
    }

    fn chain(
        &mut self,
        obj: &Object,
        r: &RawChain,
        global: Mode,
        jump_refs: &mut Vec<(ChainKey, String, serde_saphyr::Location, String)>,
    ) -> Option<DesiredChain> {
        let before = self.errors.len();
        let name = self.req(&r.name, obj, "name", values::object_name);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let family = self
            .opt(&r.family, obj.field("family"), values::family)
            .unwrap_or(Family::Ipv4);
        let table = self.req(&r.table, obj, "table", table);
        let chain = self.req(&r.chain, obj, "chain", chain_name);
        let content = self
            .opt(&r.content, obj.field("content"), content)
            .unwrap_or_default();
        if let (Some(t), Some(c), Some(raw)) = (table, &chain, &r.chain) {
            if t.is_builtin(c) && content == Content::Exact {
                let message = format!(
                    "`{c}` is a builtin chain of the {t} table: netwarden never flushes builtin chains; use `content: contains` to require rules in it (or protect your own chain and a jump to it)"
                );
                self.error(raw.referenced, obj.field("chain"), message);
            }
        }
        let rules = self.chain_rules(obj, r);
        let jumps = self.chain_jumps(obj, r, family, table, &chain, jump_refs);
        if self.errors.len() != before {
            return None;
        }
        Some(DesiredChain {
            name: name?,
            mode,
            key: ChainKey {
                family,
                table: table?,
                chain: chain?,
            },
            rules,
            content,
            jumps,
        })
    }

    /// A chain's `rules`, as iptables-save prints them after `-A CHAIN`.
    fn chain_rules(&mut self, obj: &Object, r: &RawChain) -> Vec<RuleSpec> {
        let mut rules = Vec::new();
        for (j, raw) in r.rules.iter().flatten().enumerate() {
            let field = format!("{}.rules[{j}]", obj.path);
            if raw.is_none() {
                self.error(
                    obj.at,
                    field,
                    "is empty: write the rule as iptables-save prints it after `-A CHAIN`",
                );
                continue;
            }
            if self.yaml_tag(raw, &field) {
                continue;
            }
            if let Some(rule) = self.opt(raw, field, rule_spec) {
                rules.push(rule);
            }
        }
        rules
    }

    /// A chain's `jumps`; each jump's source chain is noted in `jump_refs` (checked once every
    /// chain is known).
    fn chain_jumps(
        &mut self,
        obj: &Object,
        r: &RawChain,
        family: Family,
        table: Option<Table>,
        chain: &Option<String>,
        jump_refs: &mut Vec<(ChainKey, String, serde_saphyr::Location, String)>,
    ) -> Vec<Jump> {
        let mut jumps = Vec::new();
        for (j, item) in r.jumps.iter().flatten().enumerate() {
            let jobj = Object {
                at: item.referenced,
                path: format!("{}.jumps[{j}]", obj.path),
            };
            let jr = &item.value;
            if self.yaml_tag(&jr.rule, &jobj.field("rule")) {
                continue;
            }
            let jchain = self.req(&jr.chain, &jobj, "chain", chain_name);
            let rule = self.req(&jr.rule, &jobj, "rule", rule_spec);
            let position = self
                .opt(&jr.position, jobj.field("position"), position)
                .unwrap_or_default();
            if let (Some(jc), Some(t), Some(c), Some(raw)) = (&jchain, table, chain, &jr.chain) {
                let key = ChainKey {
                    family,
                    table: t,
                    chain: c.clone(),
                };
                jump_refs.push((key, jc.clone(), raw.referenced, jobj.field("chain")));
            }
            if let (Some(chain), Some(rule)) = (jchain, rule) {
                jumps.push(Jump {
                    chain,
                    rule,
                    position,
                });
            }
        }
        jumps
    }

    pub(super) fn ipset(&mut self, obj: &Object, r: &RawIpSet, global: Mode) -> Option<DesiredSet> {
        let before = self.errors.len();
        let set = self.req(&r.name, obj, "name", set_name);
        let mode = self
            .opt(&r.mode, obj.field("mode"), values::mode)
            .unwrap_or(global);
        let kind = self.req(&r.kind, obj, "type", set_type);
        let family = self
            .opt(&r.family, obj.field("family"), values::family)
            .unwrap_or(Family::Ipv4);
        // Sets default to `contains`: a set listed only to guard it (forbidden members) must not
        // lose the members its owner put there.
        let membership = self
            .opt(&r.membership, obj.field("membership"), content)
            .unwrap_or(Content::Contains);
        let options = SetOptions {
            hashsize: self.opt(&r.hashsize, obj.field("hashsize"), hashsize),
            maxelem: self.opt(&r.maxelem, obj.field("maxelem"), maxelem),
            timeout: self.opt(&r.timeout, obj.field("timeout"), timeout),
            counters: self.opt(&r.counters, obj.field("counters"), values::boolean),
            comment: self.opt(&r.comment, obj.field("comment"), values::boolean),
            skbinfo: self.opt(&r.skbinfo, obj.field("skbinfo"), values::boolean),
        };
        let mut forbidden: Vec<(IpNet, String)> = Vec::new();
        for (j, raw) in r.forbidden.iter().flatten().enumerate() {
            let field = format!("{}.forbidden[{j}]", obj.path);
            let Some(net) = self.opt(raw, field.clone(), values::prefix) else {
                continue;
            };
            if Family::of_net(&net) != family {
                let at = raw.as_ref().map_or(obj.at, |s| s.referenced);
                self.error(
                    at,
                    field,
                    format!(
                        "`{net}` is {}, but the set is {family}",
                        Family::of_net(&net)
                    ),
                );
                continue;
            }
            forbidden.push((net, field));
        }
        let mut members = Vec::new();
        for (j, raw) in r.members.iter().flatten().enumerate() {
            let field = format!("{}.members[{j}]", obj.path);
            let Some(m) = self.opt(raw, field.clone(), |s| member(s, kind, family)) else {
                continue;
            };
            if let Some((f, ffield)) = forbidden.iter().find(|(f, _)| m.overlaps(f)) {
                let at = raw.as_ref().map_or(obj.at, |s| s.referenced);
                self.error(at, field, format!("`{m}` is forbidden by `{f}` ({ffield})"));
                continue;
            }
            members.push(m);
        }
        if self.errors.len() != before {
            return None;
        }
        Some(DesiredSet {
            name: set.clone()?,
            mode,
            set: set?,
            kind: kind?,
            family,
            options,
            members,
            membership,
            forbidden: forbidden.into_iter().map(|(f, _)| f).collect(),
        })
    }
}

/// A member as the set's type takes it.
fn member(s: &str, kind: Option<SetType>, family: Family) -> Result<Member, String> {
    let m = Member::parse(s)?;
    if m.family() != family {
        return Err(format!("`{s}` is {}, but the set is {family}", m.family()));
    }
    let Some(kind) = kind else {
        return Ok(m);
    };
    if kind.has_port() && m.port.is_none() {
        return Err(format!(
            "`{s}` has no port: {kind} members look like `10.0.0.1,tcp:80`"
        ));
    }
    if !kind.has_port() && m.port.is_some() {
        return Err(format!("`{s}` has a port, but {kind} members have none"));
    }
    if !kind.takes_prefixes() && m.net.prefix_len() != m.net.max_prefix_len() {
        return Err(format!(
            "`{s}` is a prefix: {kind} holds single addresses (use hash:net)"
        ));
    }
    Ok(m)
}
