//! `netwarden snapshot`: a config that protects what is live now, filtered by selectors, so an
//! operator can protect a working node's state in one step. Reading is effectful ([`take`]); the
//! YAML rendering is pure and unit-tested. The output is validated with the config parser
//! before it is printed.

use crate::model::route::scope_name;
use crate::model::{protocol_name, table_name, Family, Mode, RouteType, RuleAction, PROTO_UNSPEC};
use crate::netfilter::model::{Content, Table, TableId};
use crate::netfilter::parse::{self, SavedSet, SavedTable};
use crate::netfilter::tools::{self, BackendChoice, ToolError};
use crate::observe::kernel::{self, ObserveError};
use crate::observe::{Mirror, RouteInterest};
use regex_automata::meta::Regex;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use thiserror::Error;

mod node;

#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Observe(#[from] ObserveError),
    #[error(transparent)]
    Tool(#[from] ToolError),
    #[error(transparent)]
    Nft(#[from] crate::nftables::runner::NftError),
    #[error("cannot read an nftables listing: {0}")]
    Listing(#[from] crate::nftables::listing::ListingError),
    #[error("the snapshot does not validate (a netwarden bug, please report it):\n{0}")]
    Invalid(String),
}

/// What to include. A kind without a selector is left out.
#[derive(Debug, Default)]
pub struct Selectors {
    /// Route tables whose routes to protect.
    pub tables: Vec<u32>,
    /// Rule priorities, inclusive.
    pub priorities: Option<(u32, u32)>,
    /// User chains (regex anchored at the start, so a plain prefix works as one).
    pub chains: Option<Regex>,
    pub sets: Option<Regex>,
    /// Devices whose addresses to protect.
    pub addresses: Option<Regex>,
    /// nftables tables (regex on the table name, anchored at the start).
    pub nft_tables: Option<Regex>,
    /// Devices whose permanent neighbour entries and VXLAN FDB entries to protect.
    pub neighbours: Option<Regex>,
    /// Devices whose admin state and MTU to protect.
    pub links: Option<Regex>,
    /// Devices whose forwarding and rp_filter settings to protect (with `all` and `default`).
    pub sysctls: Option<Regex>,
}

impl Selectors {
    /// Nothing selected: the snapshot would protect nothing.
    pub fn is_empty(&self) -> bool {
        self.tables.is_empty()
            && self.priorities.is_none()
            && self.chains.is_none()
            && self.sets.is_none()
            && self.addresses.is_none()
            && self.nft_tables.is_none()
            && !self.node_state()
    }

    /// Some node state is selected (neighbours, links, sysctls).
    fn node_state(&self) -> bool {
        self.neighbours.is_some() || self.links.is_some() || self.sysctls.is_some()
    }
}

/// How the snapshot protects what it lists. The defaults are safe to enforce at once: chains
/// and sets `contains` (what is there now is required, nothing that appears later is removed),
/// so enforcing the snapshot never deletes a rule or a member that its owner adds afterwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    /// `spec.mode`.
    pub mode: Mode,
    /// `content` of every chain.
    pub content: Content,
    /// `membership` of every set.
    pub membership: Content,
}

impl Default for Style {
    fn default() -> Style {
        Style {
            mode: Mode::Enforce,
            content: Content::Contains,
            membership: Content::Contains,
        }
    }
}

/// Compiles a selector: a regex matched from the start of the name (`CNI-` is a prefix).
pub fn selector(pattern: &str) -> Result<Regex, String> {
    Regex::new(&format!("^(?:{pattern})")).map_err(|e| format!("`{pattern}`: {e}"))
}

pub(crate) fn matches(re: &Regex, s: &str) -> bool {
    re.is_match(s)
}

/// Parses `A-B` (or a single priority).
pub fn priorities(s: &str) -> Result<(u32, u32), String> {
    let (a, b) = s.split_once('-').unwrap_or((s, s));
    let p = |x: &str| {
        x.trim()
            .parse::<u32>()
            .map_err(|_| format!("`{s}`: use A-B, e.g. 100-32765"))
    };
    let (a, b) = (p(a)?, p(b)?);
    if a > b {
        return Err(format!("`{s}`: the range is empty"));
    }
    Ok((a, b))
}

/// Reads the kernel and the tools, renders the config and validates it.
pub async fn take(
    sel: &Selectors,
    style: Style,
    backend: BackendChoice,
    command: &str,
) -> Result<String, SnapshotError> {
    let mut out = header(command, style.mode);
    if sel.is_empty() {
        out.push_str("  # No selector was given: nothing is protected.\n");
    }
    if !sel.tables.is_empty()
        || sel.priorities.is_some()
        || sel.addresses.is_some()
        || sel.node_state()
    {
        let mut handle = kernel::connect()?;
        let mut mirror = Mirror::new(RouteInterest::All);
        if let Some(re) = &sel.neighbours {
            node::want_neighbours(&mut handle, &mut mirror, re).await?;
        }
        kernel::dump_all(&mut handle, &mut mirror).await?;
        out.push_str(&render_kernel(sel, &mirror));
        out.push_str(&node::render(sel, &mut mirror));
    }
    if let Some(re) = &sel.chains {
        let backend = tools::detect(backend).await;
        let mut saved = BTreeMap::new();
        for family in [Family::Ipv4, Family::Ipv6] {
            let text = tools::run(&backend.save_binary(family), &[], None)
                .await?
                .stdout;
            let tables = parse::iptables_save(&text).map_err(|source| ToolError::Parse {
                program: backend.save_binary(family),
                source,
            })?;
            for (name, t) in tables {
                if let Some(table) = Table::parse(&name) {
                    saved.insert(TableId { family, table }, t);
                }
            }
        }
        out.push_str(&render_chains(&saved, re, style.content));
    }
    if let Some(re) = &sel.sets {
        let text = tools::run("ipset", &["save"], None).await?.stdout;
        let sets = parse::ipset_save(&text).map_err(|source| ToolError::Parse {
            program: "ipset".into(),
            source,
        })?;
        out.push_str(&render_sets(&sets, re, style.membership));
    }
    if let Some(re) = &sel.nft_tables {
        out.push_str(&nft_tables(re, &style).await?);
    }
    crate::config::parse("snapshot", &out).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    Ok(out)
}

/// nftables wiring: the tables whose name `re` matches, read with `nft -a -s list table`. The
/// tables iptables-nft and its siblings manage are left out (`--chains` covers those).
async fn nft_tables(re: &Regex, style: &Style) -> Result<String, SnapshotError> {
    use crate::nftables::runner::{Nft, NftBinary};
    let mut nft = NftBinary::default();
    let mut tables = Vec::new();
    for key in nft.tables().await? {
        if !matches(re, &key.name) || key.family.is_xtables_table(&key.name) {
            continue;
        }
        if let Some(text) = nft.list(&key).await? {
            tables.push(crate::nftables::listing::parse(&text, &key)?);
        }
    }
    Ok(render_nft_tables(&tables, style.content, style.membership))
}

/// `spec.nftables` for observed tables: every chain with its rules (`content` as asked), every
/// set and map with its elements (`membership` as asked; no elements for `dynamic` or `timeout`
/// sets, whose elements come and go).
fn render_nft_tables(
    tables: &[crate::nftables::listing::ObservedTable],
    content: Content,
    membership: Content,
) -> String {
    if tables.is_empty() {
        return String::new();
    }
    let mut out = String::from("  nftables:\n");
    for t in tables {
        let _ = writeln!(
            out,
            "    - name: {}",
            object_name(&["nft", t.key.family.as_str(), &t.key.name])
        );
        let _ = writeln!(
            out,
            "      family: {}\n      table: {}",
            t.key.family,
            q(&t.key.name)
        );
        if let Some(c) = &t.comment {
            let _ = writeln!(out, "      comment: {}", q(c));
        }
        if !t.chains.is_empty() {
            out.push_str("      chains:\n");
        }
        for c in &t.chains {
            let _ = writeln!(out, "        - name: {}", q(&c.name));
            if let Some(b) = &c.base {
                let _ = writeln!(
                    out,
                    "          type: {}\n          hook: {}\n          priority: {}",
                    b.kind, b.hook, b.priority
                );
                if let Some(p) = &b.policy {
                    let _ = writeln!(out, "          policy: {p}");
                }
                if let Some(d) = &b.device {
                    let _ = writeln!(out, "          device: {}", q(d));
                }
            }
            if let Some(cm) = &c.comment {
                let _ = writeln!(out, "          comment: {}", q(cm));
            }
            let _ = writeln!(out, "          content: {content}");
            if !c.rules.is_empty() {
                out.push_str("          rules:\n");
            }
            for r in &c.rules {
                let _ = writeln!(out, "            - {}", q(&r.text.full()));
            }
        }
        for (map, field) in [(false, "sets"), (true, "maps")] {
            let sets: Vec<_> = t.sets.iter().filter(|s| s.map == map).collect();
            if !sets.is_empty() {
                let _ = writeln!(out, "      {field}:");
            }
            for s in sets {
                let (kind, decl) = s.declaration.split_once(' ').unwrap_or(("type", ""));
                let _ = writeln!(
                    out,
                    "        - name: {}\n          {kind}: {}",
                    q(&s.name),
                    q(decl)
                );
                if !s.flags.is_empty() {
                    let _ = writeln!(out, "          flags: [{}]", s.flags.join(", "));
                }
                if let Some(to) = &s.timeout {
                    let _ = writeln!(out, "          timeout: {to}");
                }
                if let Some(cm) = &s.comment {
                    let _ = writeln!(out, "          comment: {}", q(cm));
                }
                let transient = s.flags.iter().any(|f| f == "dynamic" || f == "timeout");
                if !transient {
                    let _ = writeln!(out, "          membership: {membership}");
                }
                if !s.elements.is_empty() && !transient {
                    out.push_str("          elements:\n");
                    for e in &s.elements {
                        let _ = writeln!(out, "            - {}", q(&e.to_string()));
                    }
                }
            }
        }
    }
    out
}

fn header(command: &str, mode: Mode) -> String {
    let mode = match mode {
        Mode::Enforce => "enforce",
        Mode::Observe => "observe",
    };
    format!(
        "# Protects what was live when this was taken ({command}).\n\
         # Review it before use: everything listed here will be put back when it goes missing.\n\
         apiVersion: {}\nkind: {}\nmetadata:\n  name: snapshot\nspec:\n  mode: {mode}\n",
        crate::config::API_VERSION,
        crate::config::KIND
    )
}

/// A YAML single-quoted scalar: no escapes but `''`, and nothing in it is a tag or a comment.
pub(crate) fn q(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// An object name from parts: the config's name alphabet, at most 63 characters.
pub(crate) fn object_name(parts: &[&str]) -> String {
    let joined = parts.join("-");
    let mut n: String = joined
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect();
    n.truncate(63);
    n
}

/// Uniquifies names across the whole file (the config requires it).
#[derive(Default)]
pub(crate) struct Names(HashMap<String, usize>);

impl Names {
    pub(crate) fn get(&mut self, base: String) -> String {
        let n = self.0.entry(base.clone()).or_default();
        *n += 1;
        if *n == 1 {
            base
        } else {
            let suffix = format!("-{n}");
            let mut b = base;
            b.truncate(63 - suffix.len());
            b + &suffix
        }
    }
}

fn action_name(a: RuleAction) -> Option<&'static str> {
    Some(match a {
        RuleAction::Lookup => "lookup",
        RuleAction::Blackhole => "blackhole",
        RuleAction::Unreachable => "unreachable",
        RuleAction::Prohibit => "prohibit",
        _ => return None,
    })
}

fn render_kernel(sel: &Selectors, mirror: &Mirror) -> String {
    let mut names = Names::default();
    let mut out = String::new();
    if let Some((lo, hi)) = sel.priorities {
        let mut rules: Vec<_> = mirror
            .rules
            .iter()
            .filter(|(k, _)| (lo..=hi).contains(&k.priority))
            .collect();
        rules.sort_by(|a, b| {
            (a.0.family, a.0.priority)
                .cmp(&(b.0.family, b.0.priority))
                .then(a.0.to_string().cmp(&b.0.to_string()))
        });
        let mut body = String::new();
        for (k, protocols) in rules {
            let Some(action) = action_name(k.action) else {
                let _ = writeln!(body, "    # not expressible in the config, left out: {k}");
                continue;
            };
            if k.invert || k.extra.is_some() || k.tos != 0 {
                let _ = writeln!(body, "    # not expressible in the config, left out: {k}");
                continue;
            }
            let name = names.get(object_name(&[
                "rule",
                &k.family.to_string(),
                &k.priority.to_string(),
            ]));
            let _ = writeln!(
                body,
                "    - name: {name}\n      family: {}\n      priority: {}",
                k.family, k.priority
            );
            if let Some(f) = k.from {
                let _ = writeln!(body, "      from: {}", q(&f.to_string()));
            }
            if let Some(t) = k.to {
                let _ = writeln!(body, "      to: {}", q(&t.to_string()));
            }
            if let Some(i) = &k.iif {
                let _ = writeln!(body, "      iif: {}", q(i));
            }
            if let Some(o) = &k.oif {
                let _ = writeln!(body, "      oif: {}", q(o));
            }
            if let Some((mark, mask)) = k.fwmark {
                let _ = writeln!(
                    body,
                    "      fwmark: {}\n      fwmask: {}",
                    q(&format!("{mark:#x}")),
                    q(&format!("{mask:#x}"))
                );
            }
            let _ = writeln!(body, "      action: {action}");
            if k.action == RuleAction::Lookup {
                let _ = writeln!(body, "      table: {}", q(&table_name(k.table)));
            }
            if let Some(Some(p)) = protocols.first() {
                if *p != PROTO_UNSPEC {
                    let _ = writeln!(body, "      protocol: {}", q(&protocol_name(*p)));
                }
            }
        }
        if !body.is_empty() {
            out.push_str("  rules:\n");
            out.push_str(&body);
        }
    }
    if !sel.tables.is_empty() {
        let mut routes: Vec<_> = mirror
            .routes
            .iter()
            .filter(|(k, _)| sel.tables.contains(&k.table))
            .collect();
        routes.sort_by_key(|(k, _)| (k.family, k.table, k.destination.to_string(), k.metric));
        let mut body = String::new();
        for (k, observed) in routes {
            for r in observed {
                let configurable = !matches!(r.kind, RouteType::Other(_));
                if !configurable || r.multipath || k.tos != 0 || k.source_prefix.is_some() {
                    let _ = writeln!(
                        body,
                        "    # not expressible in the config, left out: {} table {} {}",
                        k.family,
                        table_name(k.table),
                        k.destination
                    );
                    continue;
                }
                let device = r.oif.and_then(|i| mirror.link(i)).map(|l| l.name.clone());
                if r.kind == RouteType::Unicast && r.gateway.is_none() && device.is_none() {
                    continue;
                }
                let name = names.get(object_name(&[
                    "route",
                    &k.family.to_string(),
                    &table_name(k.table),
                    &k.destination.to_string(),
                ]));
                let _ = writeln!(
                    body,
                    "    - name: {name}\n      family: {}\n      table: {}\n      destination: {}\n      metric: {}\n      type: {}",
                    k.family,
                    q(&table_name(k.table)),
                    q(&k.destination.to_string()),
                    k.metric,
                    r.kind
                );
                if let Some(g) = r.gateway {
                    let _ = writeln!(body, "      gateway: {}", q(&g.to_string()));
                }
                if let (Some(d), true) = (&device, r.kind.forwards()) {
                    let _ = writeln!(body, "      device: {}", q(d));
                }
                if let Some(s) = r.prefsrc {
                    let _ = writeln!(body, "      source: {}", q(&s.to_string()));
                }
                if r.scope != 0 {
                    let _ = writeln!(body, "      scope: {}", scope_name(r.scope));
                }
                if r.protocol != PROTO_UNSPEC {
                    let _ = writeln!(body, "      protocol: {}", q(&protocol_name(r.protocol)));
                }
                if r.onlink && r.gateway.is_some() {
                    let _ = writeln!(body, "      onlink: true");
                }
                if let Some(m) = r.mtu {
                    let _ = writeln!(body, "      mtu: {m}");
                }
            }
        }
        if !body.is_empty() {
            out.push_str("  routes:\n");
            out.push_str(&body);
        }
    }
    if let Some(re) = &sel.addresses {
        let mut addrs: Vec<_> = mirror
            .addresses
            .iter()
            .filter_map(|(k, a)| {
                let dev = mirror.link(k.ifindex)?.name.clone();
                let link_local = match k.address {
                    std::net::IpAddr::V6(v6) => v6.segments()[0] & 0xffc0 == 0xfe80,
                    std::net::IpAddr::V4(v4) => v4.is_loopback(),
                };
                let lo = dev == "lo";
                (matches(re, &dev) && !link_local && !lo).then_some((dev, k.address, a.prefix_len))
            })
            .collect();
        addrs.sort();
        if !addrs.is_empty() {
            out.push_str("  addresses:\n");
            for (dev, addr, len) in addrs {
                let name = names.get(object_name(&["address", &dev, &addr.to_string()]));
                let _ = writeln!(
                    out,
                    "    - name: {name}\n      device: {}\n      address: {}",
                    q(&dev),
                    q(&format!("{addr}/{len}"))
                );
            }
        }
    }
    out
}

/// The chains whose names match, each with its rules as printed (`content` as asked), and the
/// jumps into them from builtin chains. A jump from another user chain is covered when that
/// chain is selected too (it is one of its rules); otherwise it is named in a comment.
pub fn render_chains(
    saved: &BTreeMap<TableId, SavedTable>,
    re: &Regex,
    content: Content,
) -> String {
    let mut body = String::new();
    for (id, table) in saved {
        for (chain, c) in &table.chains {
            if c.builtin || !matches(re, chain) {
                continue;
            }
            let name = object_name(&[
                "chain",
                &id.family.to_string(),
                id.table.as_str(),
                &chain.to_lowercase(),
            ]);
            let _ = writeln!(
                body,
                "    - name: {name}\n      family: {}\n      table: {}\n      chain: {}\n      content: {content}",
                id.family,
                id.table,
                q(chain)
            );
            if c.rules.is_empty() {
                body.push_str("      rules: []\n");
            } else {
                body.push_str("      rules:\n");
                for r in &c.rules {
                    let _ = writeln!(body, "        - {}", q(&r.to_string()));
                }
            }
            let mut jumps = String::new();
            for (from, fc) in &table.chains {
                for (i, r) in fc.rules.iter().enumerate() {
                    if r.target() != Some(chain.as_str()) || from == chain {
                        continue;
                    }
                    if fc.builtin {
                        let position = if i == 0 { "first" } else { "any" };
                        let _ = writeln!(jumps, "        - chain: {}\n          rule: {}\n          position: {position}", q(from), q(&r.to_string()));
                    } else if !matches(re, from) {
                        let _ = writeln!(
                            jumps,
                            "        # jump from {from} (not selected) left out: `{r}`"
                        );
                    }
                }
            }
            if !jumps.is_empty() {
                body.push_str("      jumps:\n");
                body.push_str(&jumps);
            }
        }
    }
    if body.is_empty() {
        return String::new();
    }
    format!("  chains:\n{body}")
}

/// The creation options a set was made with that the config can name (`hashsize` is left out:
/// the kernel grows it as the set fills, so what is seen is not what the owner asked for).
fn set_options(words: &[String]) -> String {
    let mut out = String::new();
    let mut it = words.iter().peekable();
    while let Some(w) = it.next() {
        match w.as_str() {
            "maxelem" | "timeout" => {
                if let Some(v) = it.next().filter(|v| v.bytes().all(|b| b.is_ascii_digit())) {
                    let _ = writeln!(out, "      {w}: {v}");
                }
            }
            "counters" | "comment" | "skbinfo" => {
                let _ = writeln!(out, "      {w}: true");
            }
            _ => {}
        }
    }
    out
}

pub fn render_sets(sets: &HashMap<String, SavedSet>, re: &Regex, membership: Content) -> String {
    let mut names: Vec<&String> = sets.keys().filter(|n| matches(re, n)).collect();
    names.sort();
    let mut body = String::new();
    for n in names {
        let s = &sets[n];
        if crate::netfilter::model::SetType::parse(&s.kind).is_none() {
            let _ = writeln!(
                body,
                "    # {n}: type {} is not supported, left out",
                s.kind
            );
            continue;
        }
        let family = if s.family.as_deref() == Some("inet6") {
            "ipv6"
        } else {
            "ipv4"
        };
        let mut members: Vec<_> = s.members.iter().collect();
        members.sort();
        let _ = writeln!(
            body,
            "    - name: {}\n      type: {}\n      family: {family}\n      membership: {membership}",
            q(n),
            q(&s.kind)
        );
        body.push_str(&set_options(&s.options));
        if members.is_empty() {
            body.push_str("      members: []\n");
        } else {
            body.push_str("      members:\n");
            for m in members {
                let _ = writeln!(body, "        - {}", q(&m.to_string()));
            }
        }
    }
    if body.is_empty() {
        return String::new();
    }
    format!("  ipsets:\n{body}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = "*nat\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n\
        :CNI-HOSTPORT-DNAT - [0:0]\n:CNI-DN-abc - [0:0]\n:CNI-1234 - [0:0]\n:OTHER - [0:0]\n\
        -A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT\n\
        -A POSTROUTING -s 10.88.0.5/32 -m comment --comment \"name: \\\"bridge\\\" id: \\\"x\\\"\" -j CNI-1234\n\
        -A CNI-HOSTPORT-DNAT -p tcp -m comment --comment \"dnat name: \\\"bridge\\\"\" -m multiport --dports 8080 -j CNI-DN-abc\n\
        -A CNI-DN-abc -p tcp -m tcp --dport 8080 -j DNAT --to-destination 10.88.0.5:80\n\
        -A CNI-1234 -d 10.88.0.0/16 -j ACCEPT\n\
        -A CNI-1234 ! -d 224.0.0.0/4 -j MASQUERADE\n\
        -A OTHER -j CNI-1234\nCOMMIT\n";

    #[test]
    fn chains_snapshot_validates_and_keeps_rules_verbatim() {
        let mut saved = BTreeMap::new();
        let tables = parse::iptables_save(SAVE).unwrap();
        saved.insert(
            TableId {
                family: Family::Ipv4,
                table: Table::Nat,
            },
            tables["nat"].clone(),
        );
        let yaml = format!(
            "{}{}",
            header("test", Mode::Enforce),
            render_chains(&saved, &selector("CNI-").unwrap(), Content::Contains)
        );
        let cfg =
            crate::config::parse("snap.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(cfg.chains.len(), 3, "{yaml}");
        let br = cfg
            .chains
            .iter()
            .find(|c| c.key.chain == "CNI-1234")
            .unwrap();
        assert_eq!(
            br.rules, tables["nat"].chains["CNI-1234"].rules,
            "rules survive the round trip, `!` included"
        );
        assert_eq!(br.jumps.len(), 1);
        assert_eq!(br.jumps[0].chain, "POSTROUTING");
        assert!(yaml.contains("# jump from OTHER (not selected) left out"));
        let hp = cfg
            .chains
            .iter()
            .find(|c| c.key.chain == "CNI-HOSTPORT-DNAT")
            .unwrap();
        assert_eq!(hp.jumps[0].chain, "PREROUTING");
        assert_eq!(format!("{:?}", hp.jumps[0].position), "First");
        // Nothing selected: nothing rendered.
        assert_eq!(
            render_chains(&saved, &selector("KUBE-").unwrap(), Content::Contains),
            ""
        );
        // contains by default (safe to enforce), exact when asked.
        assert!(br.content == Content::Contains, "{yaml}");
        let exact = render_chains(&saved, &selector("CNI-1234").unwrap(), Content::Exact);
        assert!(exact.contains("content: exact"), "{exact}");
    }

    #[test]
    fn sets_snapshot_validates() {
        let sets = parse::ipset_save("create a hash:ip family inet hashsize 1024 maxelem 65536 timeout 0 comment bucketsize 12 initval 0x1\nadd a 10.0.0.1\nadd a 10.0.0.2\ncreate b hash:net,port family inet6\nadd b fd00::/64,tcp:80\ncreate c list:set size 8\ncreate skip hash:ip family inet\n").unwrap();
        let yaml = format!(
            "{}{}",
            header("test", Mode::Observe),
            render_sets(&sets, &selector("a|b|c").unwrap(), Content::Contains)
        );
        let cfg =
            crate::config::parse("snap.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        assert_eq!(cfg.ipsets.len(), 2);
        assert_eq!(cfg.ipsets[0].members.len(), 2);
        assert_eq!(cfg.ipsets[0].membership, Content::Contains);
        assert_eq!(cfg.mode, Mode::Observe);
        assert_eq!(cfg.ipsets[0].mode, Mode::Observe);
        // The options its owner made it with that the config can name (not the grown hashsize).
        let o = &cfg.ipsets[0].options;
        assert_eq!(
            (o.hashsize, o.maxelem, o.timeout, o.comment, o.counters),
            (None, Some(65536), Some(0), Some(true), None)
        );
        assert!(yaml.contains("c: type list:set is not supported"));
    }

    #[test]
    fn nft_tables_snapshot_takes_content_and_membership() {
        use crate::nftables::model::{NfFamily, TableKey};
        let key = TableKey {
            family: NfFamily::Ip,
            name: "flannel-ipv4".into(),
        };
        let listing = "table ip flannel-ipv4 { # handle 7\n\tset pods { # handle 2\n\t\ttype ipv4_addr\n\t\tflags interval\n\t\telements = { 10.244.0.0/16 }\n\t}\n\tchain postrtg { # handle 1\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\t\tip saddr @pods masquerade # handle 3\n\t}\n}\n";
        let table = crate::nftables::listing::parse(listing, &key).unwrap();
        for (content, membership) in [
            (Content::Contains, Content::Contains),
            (Content::Exact, Content::Exact),
            (Content::Contains, Content::Exact),
        ] {
            let yaml = format!(
                "{}{}",
                header("test", Mode::Enforce),
                render_nft_tables(std::slice::from_ref(&table), content, membership)
            );
            let cfg =
                crate::config::parse("snap.yaml", &yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
            let t = &cfg.nftables.tables[0];
            assert_eq!(t.chains[0].content, content, "{yaml}");
            assert_eq!(t.sets[0].membership, membership, "{yaml}");
            assert_eq!(t.sets[0].elements.len(), 1, "{yaml}");
        }
    }

    #[test]
    fn priority_ranges() {
        assert_eq!(priorities("100-200"), Ok((100, 200)));
        assert_eq!(priorities("7"), Ok((7, 7)));
        assert!(priorities("200-100").is_err());
        assert!(priorities("a-b").is_err());
    }
}
