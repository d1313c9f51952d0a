//! Restore input for `iptables-restore --noflush` and `ipset restore -exist`. Pure.
//!
//! Everything interpolated here was validated (chain, set and rule specs from config, members
//! parsed into addresses, set options numbers or words from config or from `ipset save`, where
//! only plain words are kept): a rule spec is re-rendered from its tokens, so no line break,
//! header or `COMMIT` can come from config.

use super::model::{ipset_family, Table};
use super::plan::{SetRepair, TableRepair};
use std::fmt::Write;

/// One transaction for one table. With `--noflush`, declaring a user chain creates it or flushes
/// it; builtin chains are never declared (that would set their policy) and never flushed.
pub fn iptables_restore(table: Table, repair: &TableRepair) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "*{}", table.as_str());
    for (chain, _) in &repair.rewrite {
        debug_assert!(
            !table.is_builtin(chain),
            "builtin chain {chain} would be flushed"
        );
        let _ = writeln!(out, ":{chain} - [0:0]");
    }
    for (chain, rule) in &repair.delete {
        let _ = writeln!(out, "-D {chain} {rule}");
    }
    for (chain, rules) in &repair.rewrite {
        for rule in rules {
            let _ = writeln!(out, "-A {chain} {rule}");
        }
    }
    for (chain, rule) in &repair.append {
        let _ = writeln!(out, "-A {chain} {rule}");
    }
    // Inserting at 1 in reverse keeps the configured order at the head.
    for (chain, rule) in repair.insert_first.iter().rev() {
        let _ = writeln!(out, "-I {chain} 1 {rule}");
    }
    out.push_str("COMMIT\n");
    out
}

pub fn ipset_restore(repairs: &[SetRepair]) -> String {
    let mut out = String::new();
    for r in repairs {
        if let Some((name, kind, family, options)) = &r.create {
            let _ = write!(out, "create {name} {kind} family {}", ipset_family(*family));
            for o in options {
                let _ = write!(out, " {o}");
            }
            out.push('\n');
        }
    }
    for r in repairs {
        for (name, m) in &r.del {
            let _ = writeln!(out, "del {name} {m}");
        }
        for (name, m) in &r.add {
            let _ = writeln!(out, "add {name} {m}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Family;
    use crate::netfilter::model::{Member, SetType};
    use crate::netfilter::rulespec::RuleSpec;

    fn r(s: &str) -> RuleSpec {
        RuleSpec::parse(s).unwrap()
    }

    #[test]
    fn table_transaction() {
        let repair = TableRepair {
            rewrite: vec![(
                "FLANNEL-POSTRTG".into(),
                vec![r(r#"-m comment --comment "flanneld masq" -j RETURN"#)],
            )],
            delete: vec![("POSTROUTING".into(), r("-j FLANNEL-POSTRTG"))],
            append: vec![("FORWARD".into(), r("-j ACCEPT"))],
            insert_first: vec![
                ("POSTROUTING".into(), r("-j A")),
                ("POSTROUTING".into(), r("-j B")),
            ],
        };
        assert_eq!(
            iptables_restore(Table::Nat, &repair),
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n-D POSTROUTING -j FLANNEL-POSTRTG\n\
             -A FLANNEL-POSTRTG -m comment --comment \"flanneld masq\" -j RETURN\n\
             -A FORWARD -j ACCEPT\n-I POSTROUTING 1 -j B\n-I POSTROUTING 1 -j A\nCOMMIT\n"
        );
    }

    #[test]
    fn set_restore() {
        let m = |s| Member::parse(s).unwrap();
        let repair = SetRepair {
            create: Some((
                "svc".into(),
                SetType::HashIpPort,
                Family::Ipv6,
                vec!["timeout".into(), "0".into(), "comment".into()],
            )),
            add: vec![("svc".into(), m("fd00::1,443"))],
            del: vec![("svc".into(), m("fd00::2,udp:53"))],
        };
        assert_eq!(
            ipset_restore(&[repair]),
            "create svc hash:ip,port family inet6 timeout 0 comment\ndel svc fd00::2,udp:53\nadd svc fd00::1,tcp:443\n"
        );
    }
}
