//! `netwarden snapshot`: a config that protects what is live now, filtered by selectors, so an
//! operator can protect a working node's state in one step. Reading is effectful ([`take`]); the
//! YAML rendering is pure and unit-tested. The output is validated with the config parser
//! before it is printed.

use crate::model::{Family, Mode};
use crate::netfilter::model::{Content, Table, TableId};
use crate::netfilter::parse::{self, SavedSet, SavedTable};
use crate::netfilter::tools::{self, BackendChoice, ToolError};
use crate::observe::kernel::{self, ObserveError};
use crate::observe::{Mirror, RouteInterest};
use regex_automata::meta::Regex;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use thiserror::Error;

mod nft;
mod node;
mod routing;

#[cfg(test)]
use nft::render_nft_tables;

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
        out.push_str(&routing::render(sel, &mirror));
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
        out.push_str(&nft::nft_tables(re, &style).await?);
    }
    crate::config::parse("snapshot", &out).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    Ok(out)
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
            // netwarden's own spares are not the node's state.
            if c.builtin || !matches(re, chain) || crate::netfilter::model::is_spare(chain) {
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
    fn netwardens_own_spares_are_not_snapshotted() {
        let save = "*nat\n:POSTROUTING ACCEPT [0:0]\n:NETWARDEN-SPARE-0A1B2C3D - [0:0]\n\
            :NAT-X - [0:0]\n-A NETWARDEN-SPARE-0A1B2C3D -j MASQUERADE\n-A NAT-X -j MASQUERADE\nCOMMIT\n";
        let mut saved = BTreeMap::new();
        let nat = TableId {
            family: Family::Ipv4,
            table: Table::Nat,
        };
        saved.insert(nat, parse::iptables_save(save).unwrap()["nat"].clone());
        let yaml = render_chains(&saved, &selector("N").unwrap(), Content::Contains);
        assert!(yaml.contains("chain: 'NAT-X'"), "{yaml}");
        assert!(!yaml.contains("NETWARDEN-SPARE"), "{yaml}");
    }

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
