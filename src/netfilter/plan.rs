//! The diff for chains and sets: desired vs what `iptables-save` / `ipset save` printed, as
//! findings (for logs and `check`) and the smallest repair (for the restore input). Pure.
//!
//! Ownership follows the config: an `exact` chain is rewritten as a whole (flush + rules, one
//! transaction) when anything inside differs; a `contains` chain only gets its missing rules
//! appended; a missing jump is added without touching the chain it jumps to. Sets get missing
//! members added, forbidden ones deleted, and (only when `exact`) extra ones deleted.

use super::model::{Content, DesiredChain, Position, TableId};
use super::parse::SavedTable;
use super::rulespec::RuleSpec;
use crate::model::Mode;
use serde::Serialize;
use std::collections::HashMap;
use std::fmt;

mod sets;
pub use sets::{conflicts, plan_set, SetCreate, SetDrift, SetFinding, SetRepair};

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum ChainFinding {
    /// The chain does not exist.
    Missing,
    /// Its rules were changed (known from a notification, before the chain was read).
    Changed,
    /// Rules inside the chain differ (`reordered`: same rules, another order; exact mode only).
    Rules {
        #[serde(serialize_with = "display_list")]
        missing: Vec<RuleSpec>,
        #[serde(serialize_with = "display_list")]
        extra: Vec<RuleSpec>,
        reordered: bool,
    },
    JumpMissing {
        chain: String,
        #[serde(serialize_with = "display_one")]
        rule: RuleSpec,
    },
    JumpNotFirst {
        chain: String,
        #[serde(serialize_with = "display_one")]
        rule: RuleSpec,
    },
}

pub(super) fn display_list<S: serde::Serializer, T: fmt::Display>(
    v: &[T],
    s: S,
) -> Result<S::Ok, S::Error> {
    s.collect_seq(v.iter().map(ToString::to_string))
}

fn display_one<S: serde::Serializer, T: fmt::Display>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl fmt::Display for ChainFinding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ChainFinding::Missing => f.write_str("chain missing"),
            ChainFinding::Changed => f.write_str("rules changed"),
            ChainFinding::Rules {
                missing,
                extra,
                reordered,
            } => {
                let mut parts = Vec::new();
                if !missing.is_empty() {
                    parts.push(format!(
                        "{} rule(s) missing: `{}`",
                        missing.len(),
                        missing[0]
                    ));
                }
                if !extra.is_empty() {
                    parts.push(format!("{} extra rule(s): `{}`", extra.len(), extra[0]));
                }
                if *reordered {
                    parts.push("rules out of order".to_owned());
                }
                f.write_str(&parts.join("; "))
            }
            ChainFinding::JumpMissing { chain, rule } => {
                write!(f, "jump missing in {chain}: `{rule}`")
            }
            ChainFinding::JumpNotFirst { chain, rule } => {
                write!(f, "jump not first in {chain}: `{rule}`")
            }
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChainDrift {
    pub name: String,
    pub mode: Mode,
    pub object: String,
    pub findings: Vec<ChainFinding>,
}

/// What one `iptables-restore --noflush` transaction must do in one table.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TableRepair {
    /// User chains to declare (which creates or flushes them) and then fill, in order.
    pub rewrite: Vec<(String, Vec<RuleSpec>)>,
    /// Rules to delete first (a jump to move to the front).
    pub delete: Vec<(String, RuleSpec)>,
    /// Rules to append to chains that are not rewritten.
    pub append: Vec<(String, RuleSpec)>,
    /// Rules to insert at the head of a chain, in the order they must end up in.
    pub insert_first: Vec<(String, RuleSpec)>,
}

impl TableRepair {
    pub fn is_empty(&self) -> bool {
        self.rewrite.is_empty()
            && self.delete.is_empty()
            && self.append.is_empty()
            && self.insert_first.is_empty()
    }
}

/// How many rules each chain a repair writes to holds right after it, given what it held before
/// (`before`: the table as read, `None` inside when it did not exist; `None`: not read). `None`
/// for a chain whose count before is not known. A chain declared by the repair holds what the
/// repair puts in it.
pub fn expected_counts(
    repair: &TableRepair,
    before: Option<Option<&SavedTable>>,
) -> std::collections::BTreeMap<String, Option<usize>> {
    let mut out: std::collections::BTreeMap<String, Option<usize>> = Default::default();
    for (chain, rules) in &repair.rewrite {
        out.insert(chain.clone(), Some(rules.len()));
    }
    let had = |chain: &str| {
        before.map(|t| {
            t.and_then(|t| t.chains.get(chain))
                .map_or(0, |c| c.rules.len())
        })
    };
    let mut change = |chain: &str, delta: isize| {
        let entry = out.entry(chain.to_owned()).or_insert_with(|| had(chain));
        *entry = entry.and_then(|n| n.checked_add_signed(delta));
    };
    for (chain, _) in &repair.delete {
        change(chain, -1);
    }
    for (chain, _) in repair.append.iter().chain(&repair.insert_first) {
        change(chain, 1);
    }
    out
}

/// Multiset difference `a - b`, in `a`'s order.
fn minus(a: &[RuleSpec], b: &[RuleSpec]) -> Vec<RuleSpec> {
    let mut left: HashMap<&RuleSpec, usize> = HashMap::new();
    for r in b {
        *left.entry(r).or_default() += 1;
    }
    a.iter()
        .filter(|r| match left.get_mut(r) {
            Some(n) if *n > 0 => {
                *n -= 1;
                false
            }
            _ => true,
        })
        .cloned()
        .collect()
}

/// Plans one table. `desired` are the protected chains of that table; `observed` what
/// `iptables-save -t` printed (`None`: the table does not exist).
pub fn plan_table(
    desired: &[&DesiredChain],
    observed: Option<&SavedTable>,
) -> (Vec<ChainDrift>, TableRepair) {
    let mut drifts = Vec::new();
    let mut repair = TableRepair::default();
    let rules_of = |chain: &str| -> Option<&Vec<RuleSpec>> {
        observed.and_then(|t| t.chains.get(chain)).map(|c| &c.rules)
    };
    // How many jumps must sit at the head of each chain: a jump is "first" when it is inside
    // that leading block, so two first-jumps into one chain do not fight.
    let mut head: HashMap<&str, usize> = HashMap::new();
    for c in desired {
        for j in &c.jumps {
            if j.position == Position::First {
                *head.entry(j.chain.as_str()).or_default() += 1;
            }
        }
    }
    // Chains whose head block is broken (an enforced first-jump missing or pushed out of it by
    // another rule): all their enforced first-jumps are put back at the head in one go, not one
    // per repair.
    let broken: std::collections::HashSet<&str> = desired
        .iter()
        .filter(|c| c.mode == Mode::Enforce)
        .flat_map(|c| &c.jumps)
        .filter(|j| j.position == Position::First)
        .filter(|j| {
            let rules = rules_of(&j.chain).map_or(&[][..], Vec::as_slice);
            let head = head.get(j.chain.as_str()).copied().unwrap_or(1);
            rules
                .iter()
                .position(|r| r == &j.rule)
                .is_none_or(|i| i >= head)
        })
        .map(|j| j.chain.as_str())
        .collect();
    for c in desired {
        let enforce = c.mode == Mode::Enforce;
        let mut findings = Vec::new();
        plan_rules(
            c,
            rules_of(&c.key.chain),
            &mut findings,
            enforce.then_some(&mut repair),
        );
        for j in &c.jumps {
            let rules = rules_of(&j.chain).map_or(&[][..], Vec::as_slice);
            let head = head.get(j.chain.as_str()).copied().unwrap_or(1);
            let head = (head, broken.contains(j.chain.as_str()));
            plan_jump(
                j,
                rules,
                head,
                &mut findings,
                enforce.then_some(&mut repair),
            );
        }
        if !findings.is_empty() {
            drifts.push(ChainDrift {
                name: c.name.clone(),
                mode: c.mode,
                object: c.key.to_string(),
                findings,
            });
        }
    }
    (drifts, repair)
}

/// The chain's own rules against what it holds (`None`: it does not exist).
fn plan_rules(
    c: &DesiredChain,
    observed: Option<&Vec<RuleSpec>>,
    findings: &mut Vec<ChainFinding>,
    repair: Option<&mut TableRepair>,
) {
    let chain = &c.key.chain;
    let Some(observed) = observed else {
        findings.push(ChainFinding::Missing);
        if let Some(repair) = repair {
            repair.rewrite.push((chain.clone(), c.rules.clone()));
        }
        return;
    };
    let missing = minus(&c.rules, observed);
    match c.content {
        Content::Exact if observed != &c.rules => {
            let extra = minus(observed, &c.rules);
            let reordered = missing.is_empty() && extra.is_empty();
            findings.push(ChainFinding::Rules {
                missing,
                extra,
                reordered,
            });
            if let Some(repair) = repair {
                repair.rewrite.push((chain.clone(), c.rules.clone()));
            }
        }
        Content::Contains if !missing.is_empty() => {
            if let Some(repair) = repair {
                for r in &missing {
                    repair.append.push((chain.clone(), r.clone()));
                }
            }
            findings.push(ChainFinding::Rules {
                missing,
                extra: Vec::new(),
                reordered: false,
            });
        }
        _ => {}
    }
}

/// One jump against the rules of the chain it lives in; `head`: how many first-jumps share the
/// head of that chain, and whether that head block is broken (then every first-jump of it is put
/// back at the head, in config order).
fn plan_jump(
    j: &super::model::Jump,
    rules: &[RuleSpec],
    (head, broken): (usize, bool),
    findings: &mut Vec<ChainFinding>,
    repair: Option<&mut TableRepair>,
) {
    let at = rules.iter().position(|r| r == &j.rule);
    let (chain, rule) = (j.chain.clone(), j.rule.clone());
    match (j.position, at) {
        (Position::Any, Some(_)) => {}
        (Position::Any, None) => {
            findings.push(ChainFinding::JumpMissing {
                chain: chain.clone(),
                rule: rule.clone(),
            });
            if let Some(repair) = repair {
                repair.append.push((chain, rule));
            }
        }
        (Position::First, at) => {
            match at {
                Some(i) if i < head => {}
                Some(_) => findings.push(ChainFinding::JumpNotFirst {
                    chain: chain.clone(),
                    rule: rule.clone(),
                }),
                None => findings.push(ChainFinding::JumpMissing {
                    chain: chain.clone(),
                    rule: rule.clone(),
                }),
            }
            if let (Some(repair), true) = (repair, broken) {
                if at.is_some() {
                    repair.delete.push((chain.clone(), rule.clone()));
                }
                repair.insert_first.push((chain, rule));
            }
        }
    }
}

/// Which tables the desired chains live in, with their chains.
pub fn by_table(
    chains: &[DesiredChain],
) -> std::collections::BTreeMap<TableId, Vec<&DesiredChain>> {
    let mut out: std::collections::BTreeMap<TableId, Vec<&DesiredChain>> = Default::default();
    for c in chains {
        out.entry(c.key.table_id()).or_default().push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;
    use crate::netfilter::model::{ChainKey, Jump, Table};
    use crate::netfilter::parse::iptables_save;

    fn r(s: &str) -> RuleSpec {
        RuleSpec::parse(s).unwrap()
    }

    fn flannel(content: Content, position: Position) -> DesiredChain {
        DesiredChain {
            name: "flannel".into(),
            mode: Mode::Enforce,
            key: ChainKey {
                family: Family::Ipv4,
                table: Table::Nat,
                chain: "FLANNEL-POSTRTG".into(),
            },
            rules: vec![
                r("-s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN"),
                r("-s 10.244.0.0/16 -j MASQUERADE"),
            ],
            content,
            jumps: vec![Jump {
                chain: "POSTROUTING".into(),
                rule: r("-j FLANNEL-POSTRTG"),
                position,
            }],
        }
    }

    fn nat(body: &str) -> SavedTable {
        let text =
            format!("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n{body}COMMIT\n");
        iptables_save(&text).unwrap().remove("nat").unwrap()
    }

    const INTACT: &str = ":FLANNEL-POSTRTG - [0:0]\n-A POSTROUTING -j FLANNEL-POSTRTG\n\
        -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN\n\
        -A FLANNEL-POSTRTG -s 10.244.0.0/16 -j MASQUERADE\n";

    #[test]
    fn intact_chain_needs_nothing() {
        let d = flannel(Content::Exact, Position::First);
        let (drift, repair) = plan_table(&[&d], Some(&nat(INTACT)));
        assert!(drift.is_empty(), "{drift:?}");
        assert!(repair.is_empty());
    }

    #[test]
    fn missing_chain_is_declared_with_its_rules_and_jump() {
        let d = flannel(Content::Exact, Position::First);
        let (drift, repair) = plan_table(&[&d], Some(&nat("")));
        assert_eq!(drift[0].findings[0], ChainFinding::Missing);
        assert_eq!(
            repair.rewrite,
            vec![("FLANNEL-POSTRTG".into(), d.rules.clone())]
        );
        assert_eq!(
            repair.insert_first,
            vec![("POSTROUTING".into(), r("-j FLANNEL-POSTRTG"))]
        );
        // No table at all (nft: the table was deleted): the same.
        let (_, again) = plan_table(&[&d], None);
        assert_eq!(again, repair);
    }

    #[test]
    fn only_the_jump_missing_leaves_the_chain_alone() {
        let d = flannel(Content::Exact, Position::Any);
        let body = INTACT.replace("-A POSTROUTING -j FLANNEL-POSTRTG\n", "");
        let (drift, repair) = plan_table(&[&d], Some(&nat(&body)));
        assert!(repair.rewrite.is_empty(), "chain must not be flushed");
        assert_eq!(
            repair.append,
            vec![("POSTROUTING".into(), r("-j FLANNEL-POSTRTG"))]
        );
        assert!(matches!(
            drift[0].findings[..],
            [ChainFinding::JumpMissing { .. }]
        ));
    }

    #[test]
    fn jump_behind_another_rule_moves_to_the_front() {
        let d = flannel(Content::Exact, Position::First);
        let body = INTACT.replace(
            "-A POSTROUTING -j FLANNEL-POSTRTG\n",
            "-A POSTROUTING -j KUBE-POSTROUTING\n-A POSTROUTING -j FLANNEL-POSTRTG\n",
        );
        let (drift, repair) = plan_table(&[&d], Some(&nat(&body)));
        assert!(matches!(
            drift[0].findings[..],
            [ChainFinding::JumpNotFirst { .. }]
        ));
        assert_eq!(repair.delete.len(), 1);
        assert_eq!(repair.insert_first.len(), 1);
        // Any position: fine where it is.
        let any = flannel(Content::Exact, Position::Any);
        assert!(plan_table(&[&any], Some(&nat(&body))).1.is_empty());
    }

    #[test]
    fn exact_rewrites_on_missing_extra_or_reordered_rules() {
        let d = flannel(Content::Exact, Position::Any);
        let missing = INTACT.replace("-A FLANNEL-POSTRTG -s 10.244.0.0/16 -j MASQUERADE\n", "");
        let extra = format!("{INTACT}-A FLANNEL-POSTRTG -j ACCEPT\n");
        let reordered = ":FLANNEL-POSTRTG - [0:0]\n-A POSTROUTING -j FLANNEL-POSTRTG\n\
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 -j MASQUERADE\n\
            -A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN\n";
        for (body, want) in [
            (missing.as_str(), (1, 0, false)),
            (extra.as_str(), (0, 1, false)),
            (reordered, (0, 0, true)),
        ] {
            let (drift, repair) = plan_table(&[&d], Some(&nat(body)));
            let ChainFinding::Rules {
                missing,
                extra,
                reordered,
            } = &drift[0].findings[0]
            else {
                panic!("{drift:?}");
            };
            assert_eq!((missing.len(), extra.len(), *reordered), want);
            assert_eq!(repair.rewrite.len(), 1);
            assert!(repair.append.is_empty());
        }
    }

    #[test]
    fn contains_appends_only_what_is_missing() {
        let d = flannel(Content::Contains, Position::Any);
        let body = ":FLANNEL-POSTRTG - [0:0]\n-A POSTROUTING -j FLANNEL-POSTRTG\n\
            -A FLANNEL-POSTRTG -j ACCEPT\n-A FLANNEL-POSTRTG -s 10.244.0.0/16 -j MASQUERADE\n";
        let (_, repair) = plan_table(&[&d], Some(&nat(body)));
        assert!(repair.rewrite.is_empty());
        assert_eq!(
            repair.append,
            vec![(
                "FLANNEL-POSTRTG".into(),
                r("-s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN")
            )]
        );
    }

    #[test]
    fn observe_mode_reports_without_repair() {
        let mut d = flannel(Content::Exact, Position::First);
        d.mode = Mode::Observe;
        let (drift, repair) = plan_table(&[&d], Some(&nat("")));
        assert_eq!(drift.len(), 1);
        assert!(repair.is_empty());
    }

    #[test]
    fn expected_counts_follow_the_repair() {
        let d = flannel(Content::Exact, Position::First);
        let body = INTACT.replace(
            "-A POSTROUTING -j FLANNEL-POSTRTG\n",
            "-A POSTROUTING -j KUBE-POSTROUTING\n-A POSTROUTING -j FLANNEL-POSTRTG\n",
        );
        let before = nat(&body);
        let (_, repair) = plan_table(&[&d], Some(&before));
        // The jump moves to the head: one deleted, one inserted.
        let counts = expected_counts(&repair, Some(Some(&before)));
        assert_eq!(counts.get("POSTROUTING"), Some(&Some(2)));
        let (_, repair) = plan_table(&[&d], None);
        let counts = expected_counts(&repair, Some(None));
        assert_eq!(
            counts.get("POSTROUTING"),
            Some(&Some(1)),
            "no table: nothing before"
        );
        let counts = expected_counts(&repair, None);
        assert_eq!(counts.get("FLANNEL-POSTRTG"), Some(&Some(2)));
        assert_eq!(counts.get("POSTROUTING"), Some(&None), "not read: unknown");
    }

    #[test]
    fn a_rule_pushed_into_the_head_moves_every_first_jump_at_once() {
        let mut chains: Vec<DesiredChain> = (0..3)
            .map(|i| {
                let mut c = flannel(Content::Exact, Position::First);
                c.name = format!("f{i}");
                c.key.chain = format!("F{i}");
                c.jumps[0].rule = r(&format!("-j F{i}"));
                c
            })
            .collect();
        chains[2].rules.clear();
        let mut body = String::from("-A POSTROUTING -j MASQUERADE\n");
        for (i, c) in chains.iter().enumerate() {
            body.push_str(&format!(":F{i} - [0:0]\n-A POSTROUTING -j F{i}\n"));
            for rule in &c.rules {
                body.push_str(&format!("-A F{i} {rule}\n"));
            }
        }
        let refs: Vec<&DesiredChain> = chains.iter().collect();
        let (drift, repair) = plan_table(&refs, Some(&nat(&body)));
        // Only the last one is out of the head block, but all three go back in front of the
        // foreign rule in one transaction.
        assert_eq!(drift.len(), 1, "{drift:?}");
        assert_eq!(repair.delete.len(), 3);
        assert_eq!(
            repair.insert_first,
            (0..3)
                .map(|i| ("POSTROUTING".to_owned(), r(&format!("-j F{i}"))))
                .collect::<Vec<_>>()
        );
        assert!(repair.rewrite.is_empty());
    }
}
