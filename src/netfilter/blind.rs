//! Repairs planned from a transaction's nf_tables notifications alone, before the table is read
//! back (which is a process spawn more and was most of a repair's time). Pure.
//!
//! Only what the notifications prove is written:
//! - a protected chain *deleted* is gone with its rules, and so is every rule that jumped to it
//!   (nf_tables refuses to delete a chain something still jumps to): the chain is declared with
//!   its rules, its jumps into it are put back, and so are the jumps other protected chains kept
//!   in it;
//! - an `exact` chain whose rules changed is declared and filled again: the same transaction
//!   whatever it holds now.
//!
//! Anything else (a rule removed from a `contains` chain or from a builtin chain, a table removed)
//! is left to the read that follows every repair, which also verifies this one.

use super::events::Object;
use super::model::{Content, DesiredChain, Position};
use super::plan::TableRepair;
use std::collections::BTreeSet;

/// What one transaction did to one table's chains.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Touches {
    /// Chains deleted (and not created again later in the transaction).
    pub deleted: BTreeSet<String>,
    /// Chains whose rules changed, or that were created.
    pub changed: BTreeSet<String>,
    /// The table itself was added or removed.
    pub table: bool,
}

impl Touches {
    /// Adds one notification of the transaction, in order.
    pub fn add(&mut self, chain: Option<&str>, object: Object, removed: bool) {
        let Some(chain) = chain.filter(|_| object != Object::Table) else {
            self.table = true;
            return;
        };
        match (object, removed) {
            (Object::Chain, true) => {
                self.deleted.insert(chain.to_owned());
            }
            (Object::Chain, false) => {
                self.deleted.remove(chain);
                self.changed.insert(chain.to_owned());
            }
            _ => {
                self.changed.insert(chain.to_owned());
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.deleted.is_empty() && self.changed.is_empty() && !self.table
    }
}

/// The repair the notifications prove necessary for `desired` (the enforced, configured chains
/// of the table that may be repaired now), and the names of the chains it repairs.
pub fn plan(desired: &[&DesiredChain], t: &Touches) -> (Vec<String>, TableRepair) {
    let mut names = Vec::new();
    let mut repair = TableRepair::default();
    if t.table {
        return (names, repair);
    }
    let gone = |c: &str| t.deleted.contains(c);
    let mut jumps: Vec<(String, super::rulespec::RuleSpec, Position)> = Vec::new();
    for c in desired {
        let chain = &c.key.chain;
        let rewrite = gone(chain) || (c.content == Content::Exact && t.changed.contains(chain));
        if !rewrite {
            continue;
        }
        repair.rewrite.push((chain.clone(), c.rules.clone()));
        names.push(c.name.clone());
        if gone(chain) {
            // Its jumps went with it: nothing may jump to a chain that is deleted.
            for j in c.jumps.iter().filter(|j| j.rule.target() == Some(chain)) {
                jumps.push((j.chain.clone(), j.rule.clone(), j.position));
            }
        }
    }
    // Jumps that lived in a deleted chain which is now declared again.
    let rewritten: BTreeSet<&str> = repair.rewrite.iter().map(|(c, _)| c.as_str()).collect();
    for c in desired {
        for j in c
            .jumps
            .iter()
            .filter(|j| gone(&j.chain) && rewritten.contains(j.chain.as_str()))
        {
            jumps.push((j.chain.clone(), j.rule.clone(), j.position));
        }
    }
    let mut seen = BTreeSet::new();
    for (chain, rule, position) in jumps {
        // A jump into a deleted chain that is not declared again would fail the transaction.
        let host_ok = !gone(&chain) || rewritten.contains(chain.as_str());
        if !host_ok || !seen.insert((chain.clone(), rule.clone())) {
            continue;
        }
        match position {
            Position::First => repair.insert_first.push((chain, rule)),
            Position::Any => repair.append.push((chain, rule)),
        }
    }
    (names, repair)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, Mode};
    use crate::netfilter::model::{ChainKey, Jump, Table};
    use crate::netfilter::rulespec::RuleSpec;

    fn r(s: &str) -> RuleSpec {
        RuleSpec::parse(s).unwrap()
    }

    fn chain(name: &str, chain: &str, content: Content, jumps: Vec<Jump>) -> DesiredChain {
        DesiredChain {
            name: name.into(),
            mode: Mode::Enforce,
            key: ChainKey {
                family: Family::Ipv4,
                table: Table::Nat,
                chain: chain.into(),
            },
            rules: vec![r("-s 10.244.0.0/16 -j RETURN")],
            content,
            jumps,
        }
    }

    fn jump(host: &str, target: &str, position: Position) -> Jump {
        Jump {
            chain: host.into(),
            rule: r(&format!("-j {target}")),
            position,
        }
    }

    fn touches(events: &[(&str, Object, bool)]) -> Touches {
        let mut t = Touches::default();
        for (c, o, removed) in events {
            t.add(Some(c), *o, *removed);
        }
        t
    }

    #[test]
    fn a_deleted_chain_comes_back_with_its_jump() {
        let flannel = chain(
            "flannel",
            "FLANNEL-POSTRTG",
            Content::Exact,
            vec![jump("POSTROUTING", "FLANNEL-POSTRTG", Position::First)],
        );
        // flannel's cleanup in one transaction: -D POSTROUTING …; -F; -X.
        let t = touches(&[
            ("POSTROUTING", Object::Rule, true),
            ("FLANNEL-POSTRTG", Object::Rule, true),
            ("FLANNEL-POSTRTG", Object::Chain, true),
        ]);
        let (names, repair) = plan(&[&flannel], &t);
        assert_eq!(names, ["flannel"]);
        assert_eq!(
            repair.rewrite,
            vec![("FLANNEL-POSTRTG".into(), flannel.rules.clone())]
        );
        assert_eq!(
            repair.insert_first,
            vec![("POSTROUTING".into(), r("-j FLANNEL-POSTRTG"))]
        );
        assert!(repair.append.is_empty() && repair.delete.is_empty());
    }

    #[test]
    fn an_exact_chain_changed_is_rewritten_a_contains_one_is_left_to_the_read() {
        let exact = chain(
            "a",
            "A",
            Content::Exact,
            vec![jump("FORWARD", "A", Position::Any)],
        );
        let contains = chain("b", "B", Content::Contains, vec![]);
        let t = touches(&[("A", Object::Rule, true), ("B", Object::Rule, true)]);
        let (names, repair) = plan(&[&exact, &contains], &t);
        assert_eq!(names, ["a"]);
        assert_eq!(repair.rewrite.len(), 1);
        assert!(
            repair.append.is_empty(),
            "the chain still exists: its jump may be there"
        );
        // Deleted, a contains chain is written back too (its other rules went with it).
        let t = touches(&[("B", Object::Chain, true)]);
        assert_eq!(plan(&[&contains], &t).0, ["b"]);
    }

    #[test]
    fn jumps_kept_in_a_deleted_chain_come_back_with_it() {
        let host = chain("host", "KUBE-ROUTER-INPUT", Content::Contains, vec![]);
        let inner = chain(
            "inner",
            "NW-INNER",
            Content::Exact,
            vec![jump("KUBE-ROUTER-INPUT", "NW-INNER", Position::First)],
        );
        // The host chain deleted: the jump into NW-INNER went with it, NW-INNER itself stayed.
        let t = touches(&[
            ("KUBE-ROUTER-INPUT", Object::Rule, true),
            ("KUBE-ROUTER-INPUT", Object::Chain, true),
        ]);
        let (names, repair) = plan(&[&host, &inner], &t);
        assert_eq!(names, ["host"]);
        assert_eq!(
            repair.insert_first,
            vec![("KUBE-ROUTER-INPUT".into(), r("-j NW-INNER"))]
        );
        // Its host not protected (so not declared again): the jump cannot be written blind.
        let t = touches(&[("OTHER", Object::Chain, true)]);
        let lone = chain(
            "lone",
            "NW-L",
            Content::Exact,
            vec![jump("OTHER", "NW-L", Position::Any)],
        );
        assert!(plan(&[&lone], &t).1.is_empty());
    }

    #[test]
    fn recreated_in_the_same_transaction_or_table_events_are_not_deletions() {
        let c = chain("c", "C", Content::Contains, vec![]);
        let t = touches(&[("C", Object::Chain, true), ("C", Object::Chain, false)]);
        assert!(t.deleted.is_empty());
        assert!(plan(&[&c], &t).0.is_empty());
        let mut t = touches(&[("C", Object::Chain, true)]);
        t.add(None, Object::Table, true);
        assert!(
            plan(&[&c], &t).1.is_empty(),
            "a table event is left to the read"
        );
    }
}
