//! The snapshot of nftables tables: every chain with its rules and every set and map with its
//! elements, of the tables whose name the selector matches.

use super::{matches, object_name, q, SnapshotError, Style};
use crate::netfilter::model::Content;
use crate::nftables::listing::{self, ObservedChain, ObservedSet, ObservedTable};
use crate::nftables::runner::{Nft, NftBinary};
use regex_automata::meta::Regex;
use std::fmt::Write;

/// nftables wiring: the tables whose name `re` matches, read with `nft -a -s list table`. The
/// tables iptables-nft and its siblings manage are left out (`--chains` covers those).
pub(super) async fn nft_tables(re: &Regex, style: &Style) -> Result<String, SnapshotError> {
    let mut nft = NftBinary::default();
    let mut tables = Vec::new();
    for key in nft.tables().await? {
        if !matches(re, &key.name) || key.family.is_xtables_table(&key.name) {
            continue;
        }
        if let Some(text) = nft.list(&key).await? {
            tables.push(listing::parse(&text, &key)?);
        }
    }
    Ok(render_nft_tables(&tables, style.content, style.membership))
}

/// `spec.nftables` for observed tables: every chain with its rules (`content` as asked), every
/// set and map with its elements (`membership` as asked; no elements for `dynamic` or `timeout`
/// sets, whose elements come and go).
pub(super) fn render_nft_tables(
    tables: &[ObservedTable],
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
            render_chain(&mut out, c, content);
        }
        for (map, field) in [(false, "sets"), (true, "maps")] {
            let sets: Vec<_> = t.sets.iter().filter(|s| s.map == map).collect();
            if !sets.is_empty() {
                let _ = writeln!(out, "      {field}:");
            }
            for s in sets {
                render_set(&mut out, s, membership);
            }
        }
    }
    out
}

fn render_chain(out: &mut String, c: &ObservedChain, content: Content) {
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

/// A set or map; its elements only if they do not come and go (`dynamic`, `timeout`).
fn render_set(out: &mut String, s: &ObservedSet, membership: Content) {
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
