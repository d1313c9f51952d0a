//! Desired table + observed table → what drifted, and the operations that repair it. Pure.
//!
//! Only what drifted is touched, and never in a way that removes an owner's other objects: a
//! table that exists is never re-added (`add table` would clear its `dormant` flag) nor flushed;
//! a missing chain or set is added, a missing rule appended, an `exact` chain that differs is
//! flushed and rewritten (one transaction: no packet sees it half written). What nf_tables
//! cannot change in place (a base chain's type, hook, priority or device; a set's type or
//! flags) is reported, not recreated: recreating it would drop what its owner put there.

use super::listing::{ObservedChain, ObservedTable};
use super::model::{Content, DesiredChain, DesiredSet, DesiredTable, Element, RuleText, TableKey};
use crate::model::Mode;
use serde::Serialize;
use std::collections::{HashMap, HashSet};
use std::fmt;

mod sets;
use sets::plan_set;

/// One thing found wrong with a table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "finding", rename_all = "snake_case")]
pub enum Finding {
    TableMissing,
    Dormant {
        expected: bool,
    },
    ChainMissing {
        chain: String,
    },
    /// What nft cannot change in place (reported only).
    ChainDifferent {
        chain: String,
        detail: String,
    },
    Policy {
        chain: String,
        observed: String,
        expected: String,
    },
    RulesMissing {
        chain: String,
        rules: Vec<String>,
    },
    RuleDifferent {
        chain: String,
        comment: String,
        observed: String,
    },
    RulesOther {
        chain: String,
        extra: usize,
        reordered: bool,
    },
    SetMissing {
        set: String,
    },
    SetDifferent {
        set: String,
        detail: String,
    },
    ElementsMissing {
        set: String,
        elements: Vec<String>,
    },
    ElementsOther {
        set: String,
        elements: Vec<String>,
    },
    Forbidden {
        set: String,
        elements: Vec<String>,
    },
}

fn list(v: &[String]) -> String {
    const SHOWN: usize = 5;
    let mut s = v.iter().take(SHOWN).cloned().collect::<Vec<_>>().join(", ");
    if v.len() > SHOWN {
        s.push_str(&format!(" and {} more", v.len() - SHOWN));
    }
    s
}

impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Finding::TableMissing => write!(f, "table missing"),
            Finding::Dormant { expected: true } => write!(f, "table not dormant"),
            Finding::Dormant { expected: false } => write!(f, "table dormant"),
            Finding::ChainMissing { chain } => write!(f, "chain {chain} missing"),
            Finding::ChainDifferent { chain, detail } => write!(f, "chain {chain}: {detail}"),
            Finding::Policy {
                chain,
                observed,
                expected,
            } => write!(f, "chain {chain}: policy {observed}, expected {expected}"),
            Finding::RulesMissing { chain, rules } => {
                write!(
                    f,
                    "chain {chain}: {} rule(s) missing: {}",
                    rules.len(),
                    list(rules)
                )
            }
            Finding::RuleDifferent {
                chain,
                comment,
                observed,
            } => write!(f, "chain {chain}: rule \"{comment}\" is `{observed}`"),
            Finding::RulesOther {
                chain,
                extra,
                reordered,
            } => {
                let mut parts = Vec::new();
                if *extra > 0 {
                    parts.push(format!("{extra} rule(s) not in the config"));
                }
                if *reordered {
                    parts.push("rules out of order".to_owned());
                }
                write!(f, "chain {chain}: {}", parts.join(", "))
            }
            Finding::SetMissing { set } => write!(f, "set {set} missing"),
            Finding::SetDifferent { set, detail } => write!(f, "set {set}: {detail}"),
            Finding::ElementsMissing { set, elements } => write!(
                f,
                "set {set}: {} element(s) missing: {}",
                elements.len(),
                list(elements)
            ),
            Finding::ElementsOther { set, elements } => write!(
                f,
                "set {set}: {} element(s) not in the config: {}",
                elements.len(),
                list(elements)
            ),
            Finding::Forbidden { set, elements } => {
                write!(f, "set {set}: forbidden element(s): {}", list(elements))
            }
        }
    }
}

/// What is wrong with one protected table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TableDrift {
    pub name: String,
    pub mode: Mode,
    pub object: String,
    pub findings: Vec<Finding>,
}

impl TableDrift {
    pub fn summary(&self) -> String {
        self.findings
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Forbidden elements found, as `set: element`.
    pub fn forbidden(&self) -> Vec<String> {
        self.findings
            .iter()
            .filter_map(|f| match f {
                Finding::Forbidden { set, elements } => {
                    Some(elements.iter().map(move |e| format!("{set}: {e}")))
                }
                _ => None,
            })
            .flatten()
            .collect()
    }
}

/// One operation of a repair transaction (rendered by [`super::render`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Creates the table, or (existing table) sets or clears `dormant`.
    AddTable {
        comment: Option<String>,
        dormant: bool,
    },
    /// Creates the chain, or (existing base chain) sets its policy.
    AddChain(DesiredChain),
    FlushChain(String),
    AddRule {
        chain: String,
        rule: RuleText,
    },
    ReplaceRule {
        chain: String,
        handle: u64,
        rule: RuleText,
    },
    AddSet(DesiredSet),
    AddElements {
        set: String,
        elements: Vec<Element>,
    },
    DeleteElements {
        set: String,
        elements: Vec<Element>,
    },
}

impl Op {
    /// Transaction order: what is referenced exists before what references it (sets and chains
    /// before elements — a verdict map's `goto` names a chain — and rules), and elements are
    /// deleted before any are added.
    fn rank(&self) -> u8 {
        match self {
            Op::AddTable { .. } => 0,
            Op::AddSet(_) => 1,
            Op::AddChain(_) => 2,
            Op::DeleteElements { .. } => 3,
            Op::AddElements { .. } => 4,
            Op::FlushChain(_) => 5,
            Op::AddRule { .. } | Op::ReplaceRule { .. } => 6,
        }
    }
}

/// The repair of one table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Repair {
    pub table: TableKey,
    pub ops: Vec<Op>,
}

/// Printed forms learned from nft's echo, by the rule text the config gives.
pub type Aliases = HashMap<String, RuleText>;

fn canon<'a>(rule: &'a RuleText, aliases: &'a Aliases) -> &'a RuleText {
    aliases.get(&rule.full()).unwrap_or(rule)
}

/// Plans one table. Observe mode: findings, no operations.
pub fn plan_table(
    desired: &DesiredTable,
    observed: Option<&ObservedTable>,
    aliases: &Aliases,
) -> (Option<TableDrift>, Option<Repair>) {
    let mut findings = Vec::new();
    let mut ops = Vec::new();
    match observed {
        None => {
            findings.push(Finding::TableMissing);
            ops.push(Op::AddTable {
                comment: desired.comment.clone(),
                dormant: desired.dormant == Some(true),
            });
            for c in &desired.chains {
                plan_chain(c, None, aliases, &mut findings, &mut ops);
            }
            for s in &desired.sets {
                plan_set(s, None, &mut findings, &mut ops);
            }
            // One finding says it all.
            findings.truncate(1);
        }
        Some(t) => {
            if let Some(d) = desired.dormant.filter(|d| *d != t.dormant()) {
                findings.push(Finding::Dormant { expected: d });
                ops.push(Op::AddTable {
                    comment: None,
                    dormant: d,
                });
            }
            for c in &desired.chains {
                plan_chain(c, t.chain(&c.name), aliases, &mut findings, &mut ops);
            }
            for s in &desired.sets {
                plan_set(s, t.set(&s.name), &mut findings, &mut ops);
            }
        }
    }
    if findings.is_empty() {
        return (None, None);
    }
    let drift = TableDrift {
        name: desired.name.clone(),
        mode: desired.mode,
        object: desired.key.to_string(),
        findings,
    };
    if desired.mode != Mode::Enforce || ops.is_empty() {
        return (Some(drift), None);
    }
    ops.sort_by_key(Op::rank);
    (
        Some(drift),
        Some(Repair {
            table: desired.key.clone(),
            ops,
        }),
    )
}

fn plan_chain(
    d: &DesiredChain,
    o: Option<&ObservedChain>,
    aliases: &Aliases,
    findings: &mut Vec<Finding>,
    ops: &mut Vec<Op>,
) {
    let chain = d.name.clone();
    let Some(o) = o else {
        findings.push(Finding::ChainMissing {
            chain: chain.clone(),
        });
        ops.push(Op::AddChain(d.clone()));
        for r in &d.rules {
            ops.push(Op::AddRule {
                chain: chain.clone(),
                rule: canon(r, aliases).clone(),
            });
        }
        return;
    };
    if let Some(want) = &d.base {
        match &o.base {
            None => findings.push(Finding::ChainDifferent {
                chain: chain.clone(),
                detail: "a regular chain, expected a base chain (not recreated)".into(),
            }),
            Some(have) => {
                let mut diff = Vec::new();
                if have.kind != want.kind {
                    diff.push(format!("type {}, expected {}", have.kind, want.kind));
                }
                if have.hook != want.hook {
                    diff.push(format!("hook {}, expected {}", have.hook, want.hook));
                }
                if have.priority != want.priority {
                    diff.push(format!(
                        "priority {}, expected {}",
                        have.priority, want.priority
                    ));
                }
                if want.device.is_some() && have.device != want.device {
                    diff.push(format!(
                        "device {}, expected {}",
                        have.device.as_deref().unwrap_or("none"),
                        want.device.as_deref().unwrap_or("none")
                    ));
                }
                if !diff.is_empty() {
                    findings.push(Finding::ChainDifferent {
                        chain: chain.clone(),
                        detail: format!("{} (not recreated)", diff.join(", ")),
                    });
                } else if let Some(p) = want
                    .policy
                    .as_ref()
                    .filter(|p| have.policy.as_deref().unwrap_or("accept") != p.as_str())
                {
                    findings.push(Finding::Policy {
                        chain: chain.clone(),
                        observed: have.policy.clone().unwrap_or_else(|| "accept".into()),
                        expected: p.clone(),
                    });
                    ops.push(Op::AddChain(DesiredChain {
                        rules: Vec::new(),
                        ..d.clone()
                    }));
                }
            }
        }
    }
    let desired: Vec<&RuleText> = d.rules.iter().map(|r| canon(r, aliases)).collect();
    match d.content {
        Content::Exact => plan_exact(&chain, &desired, o, findings, ops),
        Content::Contains => plan_contains(&chain, &desired, o, findings, ops),
    }
}

fn plan_exact(
    chain: &str,
    desired: &[&RuleText],
    o: &ObservedChain,
    findings: &mut Vec<Finding>,
    ops: &mut Vec<Op>,
) {
    let observed: Vec<&RuleText> = o.rules.iter().map(|r| &r.text).collect();
    if observed == desired {
        return;
    }
    let have: HashSet<&RuleText> = observed.iter().copied().collect();
    let want: HashSet<&RuleText> = desired.iter().copied().collect();
    let missing: Vec<String> = desired
        .iter()
        .filter(|r| !have.contains(**r))
        .map(|r| r.full())
        .collect();
    let extra = observed.iter().filter(|r| !want.contains(**r)).count();
    if !missing.is_empty() {
        findings.push(Finding::RulesMissing {
            chain: chain.to_owned(),
            rules: missing.clone(),
        });
    }
    let reordered = missing.is_empty() && extra == 0;
    if extra > 0 || reordered {
        findings.push(Finding::RulesOther {
            chain: chain.to_owned(),
            extra,
            reordered,
        });
    }
    ops.push(Op::FlushChain(chain.to_owned()));
    for r in desired {
        ops.push(Op::AddRule {
            chain: chain.to_owned(),
            rule: (*r).clone(),
        });
    }
}

fn plan_contains(
    chain: &str,
    desired: &[&RuleText],
    o: &ObservedChain,
    findings: &mut Vec<Finding>,
    ops: &mut Vec<Op>,
) {
    let mut missing = Vec::new();
    for r in desired {
        let same_comment = r
            .comment
            .as_ref()
            .and_then(|c| o.rules.iter().find(|x| x.text.comment.as_ref() == Some(c)));
        match (same_comment, &r.comment) {
            (Some(x), _) if x.text == **r => {}
            (Some(x), Some(c)) => {
                findings.push(Finding::RuleDifferent {
                    chain: chain.to_owned(),
                    comment: c.clone(),
                    observed: x.text.body.clone(),
                });
                ops.push(Op::ReplaceRule {
                    chain: chain.to_owned(),
                    handle: x.handle,
                    rule: (*r).clone(),
                });
            }
            _ if o.rules.iter().any(|x| x.text == **r) => {}
            _ => {
                missing.push(r.full());
                ops.push(Op::AddRule {
                    chain: chain.to_owned(),
                    rule: (*r).clone(),
                });
            }
        }
    }
    if !missing.is_empty() {
        findings.push(Finding::RulesMissing {
            chain: chain.to_owned(),
            rules: missing,
        });
    }
}

#[cfg(test)]
#[path = "plan_tests.rs"]
mod tests;
