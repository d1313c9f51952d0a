//! Parsers for what the tools print: `iptables-save` and `ipset save` / `ipset list -t`. Pure.

use super::model::Member;
use super::rulespec::RuleSpec;
use std::collections::{BTreeMap, HashMap};
use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("line {line}: {what}: `{text}`")]
    Line {
        line: usize,
        what: &'static str,
        text: String,
    },
}

fn line_error(line: usize, what: &'static str, text: &str) -> ParseError {
    ParseError::Line {
        line: line + 1,
        what,
        text: text.chars().take(200).collect(),
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedChain {
    /// A builtin chain has a policy (`:INPUT ACCEPT`); a user chain has `-`.
    pub builtin: bool,
    pub rules: Vec<RuleSpec>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedTable {
    pub chains: BTreeMap<String, SavedChain>,
}

/// Parses `iptables-save` output: table name -> chains with their rules in order.
pub fn iptables_save(text: &str) -> Result<HashMap<String, SavedTable>, ParseError> {
    let mut tables = HashMap::new();
    let mut current: Option<(String, SavedTable)> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('*') {
            if let Some((n, t)) = current.take() {
                tables.insert(n, t);
            }
            current = Some((name.to_owned(), SavedTable::default()));
            continue;
        }
        let Some((_, table)) = current.as_mut() else {
            return Err(line_error(i, "outside a table", line));
        };
        if line == "COMMIT" {
            if let Some((n, t)) = current.take() {
                tables.insert(n, t);
            }
        } else if let Some(decl) = line.strip_prefix(':') {
            let mut parts = decl.split_whitespace();
            let (Some(name), Some(policy)) = (parts.next(), parts.next()) else {
                return Err(line_error(i, "bad chain declaration", line));
            };
            let chain = table.chains.entry(name.to_owned()).or_default();
            chain.builtin = policy != "-";
        } else if let Some(rest) = line.strip_prefix("-A ") {
            let (chain, spec) = rest.split_once(' ').unwrap_or((rest, ""));
            let rule = RuleSpec::from_saved(spec).map_err(|_| line_error(i, "bad rule", line))?;
            table
                .chains
                .entry(chain.to_owned())
                .or_default()
                .rules
                .push(rule);
        } else {
            return Err(line_error(i, "unexpected line", line));
        }
    }
    // Output cut short (no COMMIT) still says what exists.
    if let Some((n, t)) = current.take() {
        tables.insert(n, t);
    }
    Ok(tables)
}

/// Counts rules (`-A` lines): how kube-proxy's iptables wrapper tells which backend is in use.
pub fn count_rules(text: &str) -> usize {
    text.lines().filter(|l| l.starts_with("-A ")).count()
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SavedSet {
    pub kind: String,
    /// `inet` / `inet6` (absent for types without a family).
    pub family: Option<String>,
    /// Creation options as printed (`hashsize 1024 maxelem 65536 timeout 0`), without the family
    /// and the random hash seed ([`create_options`]).
    pub options: Vec<String>,
    /// Hashed with the fast hasher: a Service change re-reads a set of every LoadBalancer IP,
    /// and SipHash over its members was most of the guard's share of that change.
    pub members: crate::model::fast::HashSet<Member>,
    /// Members netwarden cannot read (other types' syntax); kept so "exact" never deletes them
    /// blindly. Stored as printed.
    pub other: Vec<String>,
}

/// Parses `ipset save` output: set name -> type, family and members.
pub fn ipset_save(text: &str) -> Result<HashMap<String, SavedSet>, ParseError> {
    let mut sets: HashMap<String, SavedSet> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let mut parts = line.split_whitespace();
        match parts.next() {
            None => continue,
            Some("create") => {
                let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                    return Err(line_error(i, "bad create line", line));
                };
                let mut family = None;
                while let Some(p) = parts.next() {
                    if p == "family" {
                        family = parts.next().map(str::to_owned);
                    }
                }
                sets.insert(
                    name.to_owned(),
                    SavedSet {
                        kind: kind.to_owned(),
                        family,
                        options: create_options(line, name),
                        ..SavedSet::default()
                    },
                );
            }
            Some("add") => {
                let (Some(name), Some(member)) = (parts.next(), parts.next()) else {
                    return Err(line_error(i, "bad add line", line));
                };
                let Some(set) = sets.get_mut(name) else {
                    return Err(line_error(i, "member of an undeclared set", line));
                };
                match Member::parse(member) {
                    Ok(m) => {
                        set.members.insert(m);
                    }
                    Err(_) => set.other.push(member.to_owned()),
                }
            }
            Some(_) => return Err(line_error(i, "unexpected line", line)),
        }
    }
    Ok(sets)
}

/// `create` options of a set as `ipset save` printed them, without the family (kept apart) and
/// the hash seed (`initval`, random per set). Only plain words and numbers are kept: they are
/// written back into `ipset restore` input.
pub fn create_options(text: &str, name: &str) -> Vec<String> {
    let Some(line) = text.lines().find(|l| {
        let mut p = l.split_whitespace();
        p.next() == Some("create") && p.next() == Some(name)
    }) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut parts = line.split_whitespace().skip(3);
    while let Some(p) = parts.next() {
        if p == "family" || p == "initval" {
            parts.next();
            continue;
        }
        if p.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'/' | b':'))
        {
            out.push(p.to_owned());
        }
    }
    out
}

/// What `ipset list -t` says about one set: enough to notice that it changed without reading
/// every member.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SetHeader {
    pub kind: String,
    pub entries: u64,
    /// The `Header:` and `Size in memory:` lines, which move with most changes.
    pub fingerprint: String,
}

pub fn ipset_list_terse(text: &str) -> HashMap<String, SetHeader> {
    let mut out = HashMap::new();
    let mut name: Option<String> = None;
    let mut header = SetHeader {
        kind: String::new(),
        entries: 0,
        fingerprint: String::new(),
    };
    let mut flush = |name: &mut Option<String>, header: &mut SetHeader| {
        if let Some(n) = name.take() {
            out.insert(
                n,
                std::mem::replace(
                    header,
                    SetHeader {
                        kind: String::new(),
                        entries: 0,
                        fingerprint: String::new(),
                    },
                ),
            );
        }
    };
    for line in text.lines() {
        if let Some(n) = line.strip_prefix("Name: ") {
            flush(&mut name, &mut header);
            name = Some(n.trim().to_owned());
        } else if let Some(t) = line.strip_prefix("Type: ") {
            header.kind = t.trim().to_owned();
        } else if let Some(e) = line.strip_prefix("Number of entries: ") {
            header.entries = e.trim().parse().unwrap_or(0);
        } else if line.starts_with("Header: ") || line.starts_with("Size in memory: ") {
            header.fingerprint.push_str(line);
            header.fingerprint.push('\n');
        }
    }
    flush(&mut name, &mut header);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAVE: &str = r#"# Generated by iptables-nft-save v1.8.9 (nf_tables) on Sun Nov 22 02:13:06 2026
*nat
:PREROUTING ACCEPT [0:0]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [0:0]
:POSTROUTING ACCEPT [0:0]
:FLANNEL-POSTRTG - [0:0]
-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully
COMMIT
# Completed on Sun Nov 22 02:13:06 2026
*filter
:INPUT ACCEPT [0:0]
:FORWARD DROP [0:0]
:OUTPUT ACCEPT [0:0]
COMMIT
"#;

    #[test]
    fn iptables_save_output_parses() {
        let t = iptables_save(SAVE).unwrap();
        let nat = &t["nat"];
        assert!(nat.chains["POSTROUTING"].builtin);
        let fl = &nat.chains["FLANNEL-POSTRTG"];
        assert!(!fl.builtin);
        assert_eq!(fl.rules.len(), 2);
        assert_eq!(fl.rules[1].tokens()[2], "!");
        assert_eq!(
            nat.chains["POSTROUTING"].rules[0],
            RuleSpec::parse(r#"-m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#).unwrap()
        );
        assert!(t["filter"].chains["FORWARD"].rules.is_empty());
        assert_eq!(count_rules(SAVE), 3);
        assert!(iptables_save("-A X -j ACCEPT\n").is_err());
        assert!(iptables_save("*nat\nbogus\n").is_err());
    }

    #[test]
    fn ipset_save_output_parses() {
        let text = "create s1 hash:ip family inet hashsize 1024 maxelem 65536 bucketsize 12 initval 0xd02484a1\n\
                    add s1 10.0.0.1\nadd s1 10.0.0.2 timeout 30\n\
                    create s2 hash:net,port family inet6 hashsize 1024 maxelem 65536\n\
                    add s2 fd00::/64,tcp:80\n\
                    create s3 list:set size 8\nadd s3 s1\n";
        let sets = ipset_save(text).unwrap();
        assert_eq!(sets["s1"].kind, "hash:ip");
        assert_eq!(sets["s1"].family.as_deref(), Some("inet"));
        assert_eq!(
            sets["s1"].options,
            ["hashsize", "1024", "maxelem", "65536", "bucketsize", "12"]
        );
        assert_eq!(sets["s1"].members.len(), 2);
        assert!(sets["s1"]
            .members
            .contains(&Member::parse("10.0.0.2").unwrap()));
        assert!(sets["s2"]
            .members
            .contains(&Member::parse("fd00::/64,80").unwrap()));
        assert_eq!(sets["s3"].other, vec!["s1".to_owned()]);
        assert!(ipset_save("add nope 10.0.0.1\n").is_err());
    }

    #[test]
    fn ipset_terse_listing_parses() {
        let text = "Name: s1\nType: hash:ip\nRevision: 6\nHeader: family inet hashsize 1024 maxelem 65536\n\
                    Size in memory: 256\nReferences: 0\nNumber of entries: 1\n\
                    Name: s2\nType: hash:net\nRevision: 7\nHeader: family inet6\nSize in memory: 512\nReferences: 1\nNumber of entries: 10000\n";
        let h = ipset_list_terse(text);
        assert_eq!(h["s1"].entries, 1);
        assert_eq!(h["s2"].entries, 10000);
        assert_eq!(h["s2"].kind, "hash:net");
        assert!(h["s1"].fingerprint.contains("Size in memory: 256"));
    }
}
