//! How adopted tables are kept in the adopted-state file (`run --adopted-state`): each table as
//! last seen, with the selector that adopted it. Pure.
//!
//! Everything read back ends up in an `nft -f` transaction, so it is checked as the config's
//! tables are ([`crate::nftables::text`]): a name, comment, rule, declaration or element that
//! could leave its place (a file edited by hand) refuses the whole table rather than restoring
//! part of it.

use super::Selector;
use crate::nftables::model::{
    BaseChain, Content, DesiredChain, DesiredSet, DesiredTable, NfFamily, TableKey,
};
use crate::nftables::text;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// An adopted table as last seen.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTable {
    /// The `spec.adopt` selector that adopted it.
    pub selector: String,
    pub family: NfFamily,
    pub table: String,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub chains: Vec<SavedChain>,
    #[serde(default)]
    pub sets: Vec<SavedSet>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedChain {
    pub name: String,
    #[serde(default)]
    pub base: Option<BaseChain>,
    #[serde(default)]
    pub comment: Option<String>,
    /// As `nft list` prints them, comments included.
    #[serde(default)]
    pub rules: Vec<String>,
}

/// A set or a map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedSet {
    pub name: String,
    #[serde(default)]
    pub map: bool,
    /// The `type …` or `typeof …` line.
    pub declaration: String,
    #[serde(default)]
    pub flags: Vec<String>,
    #[serde(default)]
    pub timeout: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    /// As `nft list` prints them: `KEY` or (maps) `KEY : VALUE`.
    #[serde(default)]
    pub elements: Vec<String>,
}

impl SavedTable {
    /// The copy of an adopted table, to save.
    pub fn new(selector: &str, t: &DesiredTable) -> SavedTable {
        SavedTable {
            selector: selector.to_owned(),
            family: t.key.family,
            table: t.key.name.clone(),
            comment: t.comment.clone(),
            chains: t
                .chains
                .iter()
                .map(|c| SavedChain {
                    name: c.name.clone(),
                    base: c.base.clone(),
                    comment: c.comment.clone(),
                    rules: c.rules.iter().map(|r| r.full()).collect(),
                })
                .collect(),
            sets: t
                .sets
                .iter()
                .map(|s| SavedSet {
                    name: s.name.clone(),
                    map: s.map,
                    declaration: s.declaration.clone(),
                    flags: s.flags.clone(),
                    timeout: s.timeout.clone(),
                    comment: s.comment.clone(),
                    elements: s.elements.iter().map(ToString::to_string).collect(),
                })
                .collect(),
        }
    }

    pub fn key(&self) -> TableKey {
        TableKey {
            family: self.family,
            name: self.table.clone(),
        }
    }

    /// The table as its selector protects it again (named and moded by the selector, not by
    /// the file), or why it cannot be.
    fn readopt(&self, sel: &Selector) -> Result<DesiredTable, String> {
        let key = self.key();
        text::identifier(&key.name)?;
        let comment = self.comment.as_deref().map(text::comment).transpose()?;
        let chains = self
            .chains
            .iter()
            .map(SavedChain::readopt)
            .collect::<Result<_, _>>()?;
        let sets = self
            .sets
            .iter()
            .map(SavedSet::readopt)
            .collect::<Result<_, _>>()?;
        Ok(DesiredTable {
            name: sel.object_name(&key),
            mode: sel.adopt.mode,
            key,
            comment,
            dormant: None,
            chains,
            sets,
        })
    }
}

impl SavedChain {
    fn readopt(&self) -> Result<DesiredChain, String> {
        let name = text::identifier(&self.name)?;
        let comment = self.comment.as_deref().map(text::comment).transpose()?;
        let base = self.base.as_ref().map(base_chain).transpose()?;
        let rules = self
            .rules
            .iter()
            .map(|r| text::rule(r))
            .collect::<Result<_, _>>()?;
        Ok(DesiredChain {
            name,
            base,
            comment,
            content: Content::Exact,
            rules,
        })
    }
}

/// A base chain's words go into `type … hook … device "…" priority …; policy …;`.
fn base_chain(b: &BaseChain) -> Result<BaseChain, String> {
    text::identifier(&b.kind)?;
    text::identifier(&b.hook)?;
    if let Some(p) = &b.policy {
        if !matches!(p.as_str(), "accept" | "drop") {
            return Err(format!("unknown policy `{}`", p.escape_debug()));
        }
    }
    if let Some(d) = &b.device {
        // Written in double quotes: an interface name (at most 15 bytes, no `/`, no space).
        let ok = !d.is_empty()
            && d.len() <= 15
            && !d.contains(['/', '"'])
            && !d.chars().any(|c| c.is_whitespace() || c.is_control());
        if !ok {
            return Err(format!("`{}` is not an interface name", d.escape_debug()));
        }
    }
    Ok(b.clone())
}

impl SavedSet {
    fn readopt(&self) -> Result<DesiredSet, String> {
        let name = text::identifier(&self.name)?;
        let comment = self.comment.as_deref().map(text::comment).transpose()?;
        if !(self.declaration.starts_with("type ") || self.declaration.starts_with("typeof ")) {
            return Err(format!(
                "`{}` is not a set declaration",
                self.declaration.escape_debug()
            ));
        }
        text::contained(&self.declaration, "declaration", &[])?;
        for word in self.flags.iter().chain(&self.timeout) {
            if word.is_empty() || !word.bytes().all(|b| b.is_ascii_alphanumeric()) {
                return Err(format!(
                    "`{}` is not a set flag or timeout",
                    word.escape_debug()
                ));
            }
        }
        let elements = self
            .elements
            .iter()
            .map(|e| text::element(e, self.map))
            .collect::<Result<_, _>>()?;
        Ok(DesiredSet {
            name,
            map: self.map,
            declaration: self.declaration.clone(),
            flags: self.flags.clone(),
            timeout: self.timeout.clone(),
            comment,
            elements,
            membership: Content::Contains,
            forbidden: Vec::new(),
        })
    }
}

/// The saved tables whose selector (by name) still exists and still covers them, and that
/// `spec.nftables` does not protect itself (`configured`), back as adopted copies. Also the
/// tables refused because they do not read back, with why (`ip kube-proxy: …`).
pub fn from_saved(
    selectors: &[Selector],
    configured: impl Fn(&TableKey) -> bool,
    saved: &[SavedTable],
) -> (BTreeMap<TableKey, DesiredTable>, Vec<String>) {
    let mut tables = BTreeMap::new();
    let mut refused = Vec::new();
    for t in saved {
        let key = t.key();
        let Some(sel) = selectors
            .iter()
            .find(|s| s.adopt.name == t.selector && s.matches(&key))
        else {
            continue;
        };
        if configured(&key) {
            continue;
        }
        match t.readopt(sel) {
            Ok(copy) => {
                tables.insert(key, copy);
            }
            Err(why) => refused.push(format!("{}: {why}", key.to_string().escape_debug())),
        }
    }
    (tables, refused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::{AdoptSelector, UnknownActor};
    use crate::model::Mode;
    use crate::nftables::listing;

    fn sel(name: &str, mode: Mode, tables: &[&str]) -> Selector {
        Selector {
            adopt: AdoptSelector {
                name: name.into(),
                mode,
                rules: None,
                routes: None,
                chains: None,
                ipsets: None,
                neighbours: None,
                owners: vec!["kube-proxy".into()],
                unknown_actor: UnknownActor::Restore,
                pod_liveness: None,
            },
            family: Some(NfFamily::Ip),
            tables: tables.iter().map(|t| t.to_string()).collect(),
        }
    }

    fn key(name: &str) -> TableKey {
        TableKey {
            family: NfFamily::Ip,
            name: name.into(),
        }
    }

    /// kube-proxy's shape: base chains, a dynamic set, a verdict map, comments, a rule with a
    /// comment and an anonymous map.
    const LISTING: &str = "table ip kube-proxy { # handle 1\n\tcomment \"rules for kube-proxy\"\n\tset affinity { # handle 2\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 3h\n\t\telements = { 10.0.0.1 }\n\t}\n\tset cluster-ips { # handle 3\n\t\ttype ipv4_addr\n\t\tcomment \"Active ClusterIPs\"\n\t\telements = { 10.96.0.1, 10.96.0.10 }\n\t}\n\tmap service-ips { # handle 4\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n\t\telements = { 10.96.0.1 . tcp . 443 : goto service-2QRHZV4L-default/kubernetes/tcp/https }\n\t}\n\tchain nat-prerouting { # handle 5\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services # handle 6\n\t}\n\tchain services { # handle 7\n\t\tip daddr . meta l4proto . th dport vmap @service-ips # handle 8\n\t}\n\tchain service-2QRHZV4L-default/kubernetes/tcp/https { # handle 9\n\t\tip daddr @cluster-ips reject comment \"Reject traffic to invalid ports\" # handle 10\n\t\tnumgen random mod 1 vmap { 0 : goto services } # handle 11\n\t}\n}\n";

    fn adopted(s: &Selector) -> DesiredTable {
        let t = listing::parse(LISTING, &key("kube-proxy")).unwrap();
        super::super::copy(s, &t)
    }

    #[test]
    fn a_saved_copy_reads_back_as_the_copy_it_was() {
        let s = sel("kube-proxy", Mode::Enforce, &["kube-proxy"]);
        let copy = adopted(&s);
        let saved = SavedTable::new("kube-proxy", &copy);
        // Through the file's JSON.
        let json = serde_json::to_string(&saved).unwrap();
        let back: SavedTable = serde_json::from_str(&json).unwrap();
        let (tables, refused) = from_saved(std::slice::from_ref(&s), |_| false, &[back]);
        assert!(refused.is_empty(), "{refused:?}");
        assert_eq!(tables.get(&key("kube-proxy")), Some(&copy));
        // Named and moded by the selector, not by the file.
        let observe = sel("kube-proxy", Mode::Observe, &["kube-*"]);
        let (tables, _) = from_saved(&[observe], |_| false, &[saved]);
        let t = &tables[&key("kube-proxy")];
        assert_eq!(t.mode, Mode::Observe);
        assert_eq!(t.name, "adopted:kube-proxy/ip/kube-proxy");
    }

    #[test]
    fn a_gone_or_narrowed_selector_or_a_configured_table_brings_nothing_back() {
        let s = sel("kube-proxy", Mode::Enforce, &["kube-proxy"]);
        let saved = vec![SavedTable::new("kube-proxy", &adopted(&s))];
        // The selector is gone; another of another name covers the table.
        let other = sel("calico", Mode::Enforce, &["*"]);
        assert!(from_saved(&[other], |_| false, &saved).0.is_empty());
        // Narrowed to another table, or to another family.
        let narrowed = sel("kube-proxy", Mode::Enforce, &["kube-proxy-ipv4"]);
        assert!(from_saved(&[narrowed], |_| false, &saved).0.is_empty());
        let mut ip6 = s.clone();
        ip6.family = Some(NfFamily::Ip6);
        assert!(from_saved(&[ip6], |_| false, &saved).0.is_empty());
        // spec.nftables protects it now: the config wins.
        let (tables, refused) = from_saved(
            std::slice::from_ref(&s),
            |k| k == &key("kube-proxy"),
            &saved,
        );
        assert!(tables.is_empty() && refused.is_empty());
        // iptables-nft's tables are never adopted, whatever the file says.
        let mut nat = saved[0].clone();
        nat.table = "nat".into();
        let all = sel("kube-proxy", Mode::Enforce, &["*"]);
        assert!(from_saved(&[all], |_| false, &[nat]).0.is_empty());
    }

    #[test]
    fn what_could_leave_its_place_in_a_transaction_refuses_the_table() {
        let s = sel("kube-proxy", Mode::Enforce, &["*"]);
        let good = SavedTable::new("kube-proxy", &adopted(&s));
        let mut bad = Vec::new();
        let mut t = good.clone();
        t.table = "kube-proxy;flush".into();
        bad.push(t);
        let mut t = good.clone();
        t.chains[0].rules.push("accept; flush ruleset".into());
        bad.push(t);
        let mut t = good.clone();
        t.chains[1].name = "x\n".into();
        bad.push(t);
        let mut t = good.clone();
        t.comment = Some("a\" ; flush ruleset ; \"".into());
        bad.push(t);
        let mut t = good.clone();
        t.sets[1]
            .elements
            .push("10.0.0.1 } ; flush ruleset ; { ".into());
        bad.push(t);
        let mut t = good.clone();
        t.sets[1].declaration = "type ipv4_addr; flush ruleset".into();
        bad.push(t);
        let mut t = good.clone();
        t.sets[0].flags.push("dynamic;".into());
        bad.push(t);
        let mut t = good.clone();
        t.chains[0].base.as_mut().unwrap().device = Some("eth0\" ; x".into());
        bad.push(t);
        let mut t = good.clone();
        t.chains[0].base.as_mut().unwrap().policy = Some("accept; flush ruleset".into());
        bad.push(t);
        for t in &bad {
            let (tables, refused) =
                from_saved(std::slice::from_ref(&s), |_| false, std::slice::from_ref(t));
            assert!(tables.is_empty(), "{t:?}");
            assert_eq!(refused.len(), 1, "{t:?}");
        }
        // The same file without them: taken.
        assert_eq!(from_saved(&[s], |_| false, &[good]).0.len(), 1);
    }
}
