//! Repairs → the text of one `nft -f -` transaction. Pure.
//!
//! Every name, comment, rule and element was checked when the config was read (or, adopted,
//! when it was listed) by [`super::text`], so each stays within its own command.

use super::model::{DesiredChain, DesiredSet, Element, TableKey};
use super::plan::{Op, Repair};
use std::fmt::Write;

/// nft reads a long element list fine, but one command per this many keeps a line (and the
/// error message nft prints with it) bounded.
const ELEMENTS_PER_COMMAND: usize = 1000;

/// The transaction: every repair, one command a line, all applied or none.
pub fn transaction(repairs: &[Repair]) -> String {
    let mut out = String::new();
    for r in repairs {
        for op in &r.ops {
            op_line(&mut out, &r.table, op);
        }
    }
    out
}

fn op_line(out: &mut String, t: &TableKey, op: &Op) {
    let tk = format!("{} {}", t.family, t.name);
    match op {
        Op::AddTable { comment, dormant } => {
            let mut body = Vec::new();
            if let Some(c) = comment {
                body.push(format!("comment \"{c}\";"));
            }
            if *dormant {
                body.push("flags dormant;".to_owned());
            }
            if body.is_empty() {
                let _ = writeln!(out, "add table {tk}");
            } else {
                let _ = writeln!(out, "add table {tk} {{ {} }}", body.join(" "));
            }
        }
        Op::AddChain(c) => {
            let _ = writeln!(out, "add chain {tk} {}{}", c.name, chain_block(c));
        }
        Op::FlushChain(c) => {
            let _ = writeln!(out, "flush chain {tk} {c}");
        }
        Op::AddRule { chain, rule } => {
            let _ = writeln!(out, "add rule {tk} {chain} {}", rule.full());
        }
        Op::ReplaceRule {
            chain,
            handle,
            rule,
        } => {
            let _ = writeln!(
                out,
                "replace rule {tk} {chain} handle {handle} {}",
                rule.full()
            );
        }
        Op::AddSet(s) => {
            let _ = writeln!(out, "add {} {tk} {} {}", s.kind(), s.name, set_block(s));
        }
        Op::AddElements { set, elements } => elements_lines(out, "add", &tk, set, elements, true),
        Op::DeleteElements { set, elements } => {
            elements_lines(out, "delete", &tk, set, elements, false)
        }
    }
}

/// ` { type nat hook prerouting priority -100; policy accept; comment "…"; }`, or nothing for
/// a regular chain without a comment.
fn chain_block(c: &DesiredChain) -> String {
    let mut body = Vec::new();
    if let Some(b) = &c.base {
        let device = b
            .device
            .as_ref()
            .map(|d| format!(" device \"{d}\""))
            .unwrap_or_default();
        body.push(format!(
            "type {} hook {}{device} priority {};",
            b.kind, b.hook, b.priority
        ));
        if let Some(p) = &b.policy {
            body.push(format!("policy {p};"));
        }
    }
    if let Some(cm) = &c.comment {
        body.push(format!("comment \"{cm}\";"));
    }
    if body.is_empty() {
        String::new()
    } else {
        format!(" {{ {} }}", body.join(" "))
    }
}

/// `{ type ipv4_addr; flags interval; timeout 1h; comment "…"; }`
pub fn set_block(s: &DesiredSet) -> String {
    let mut body = vec![format!("{};", s.declaration)];
    if !s.flags.is_empty() {
        body.push(format!("flags {};", s.flags.join(",")));
    }
    if let Some(t) = &s.timeout {
        body.push(format!("timeout {t};"));
    }
    if let Some(c) = &s.comment {
        body.push(format!("comment \"{c}\";"));
    }
    format!("{{ {} }}", body.join(" "))
}

fn elements_lines(
    out: &mut String,
    verb: &str,
    tk: &str,
    set: &str,
    elements: &[Element],
    with_values: bool,
) {
    for chunk in elements.chunks(ELEMENTS_PER_COMMAND) {
        let list: Vec<String> = chunk
            .iter()
            .map(|e| {
                if with_values {
                    e.to_string()
                } else {
                    e.key.clone()
                }
            })
            .collect();
        let _ = writeln!(out, "{verb} element {tk} {set} {{ {} }}", list.join(", "));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::model::{BaseChain, Content, NfFamily, RuleText};

    #[test]
    fn renders_one_command_a_line() {
        let table = TableKey {
            family: NfFamily::Ip,
            name: "kube-proxy".into(),
        };
        let chain = DesiredChain {
            name: "nat-prerouting".into(),
            base: Some(BaseChain {
                kind: "nat".into(),
                hook: "prerouting".into(),
                priority: -100,
                policy: Some("accept".into()),
                device: None,
            }),
            comment: None,
            content: Content::Exact,
            rules: Vec::new(),
        };
        let set = DesiredSet {
            name: "cluster-ips".into(),
            map: false,
            declaration: "type ipv4_addr".into(),
            flags: vec!["interval".into()],
            timeout: None,
            comment: Some("Active ClusterIPs".into()),
            elements: Vec::new(),
            membership: Content::Contains,
            forbidden: Vec::new(),
        };
        let e = |k: &str| Element {
            key: k.into(),
            value: None,
        };
        let repair = Repair {
            table: table.clone(),
            ops: vec![
                Op::AddTable {
                    comment: Some("rules for kube-proxy".into()),
                    dormant: false,
                },
                Op::AddSet(set),
                Op::AddChain(chain),
                Op::DeleteElements {
                    set: "cluster-ips".into(),
                    elements: vec![e("10.0.0.9")],
                },
                Op::AddElements {
                    set: "cluster-ips".into(),
                    elements: vec![e("10.96.0.1"), e("10.96.0.10")],
                },
                Op::FlushChain("nat-prerouting".into()),
                Op::AddRule {
                    chain: "nat-prerouting".into(),
                    rule: RuleText {
                        body: "jump services".into(),
                        comment: Some("why".into()),
                    },
                },
                Op::ReplaceRule {
                    chain: "nat-prerouting".into(),
                    handle: 7,
                    rule: RuleText {
                        body: "accept".into(),
                        comment: None,
                    },
                },
            ],
        };
        assert_eq!(
            transaction(&[repair]),
            "add table ip kube-proxy { comment \"rules for kube-proxy\"; }\n\
             add set ip kube-proxy cluster-ips { type ipv4_addr; flags interval; comment \"Active ClusterIPs\"; }\n\
             add chain ip kube-proxy nat-prerouting { type nat hook prerouting priority -100; policy accept; }\n\
             delete element ip kube-proxy cluster-ips { 10.0.0.9 }\n\
             add element ip kube-proxy cluster-ips { 10.96.0.1, 10.96.0.10 }\n\
             flush chain ip kube-proxy nat-prerouting\n\
             add rule ip kube-proxy nat-prerouting jump services comment \"why\"\n\
             replace rule ip kube-proxy nat-prerouting handle 7 accept\n"
        );
    }

    #[test]
    fn long_element_lists_are_split() {
        let table = TableKey {
            family: NfFamily::Ip6,
            name: "t".into(),
        };
        let elements: Vec<Element> = (0..2500)
            .map(|i| Element {
                key: format!("fd00::{i:x}"),
                value: None,
            })
            .collect();
        let text = transaction(&[Repair {
            table,
            ops: vec![Op::AddElements {
                set: "s".into(),
                elements,
            }],
        }]);
        assert_eq!(text.lines().count(), 3);
        assert!(text.starts_with("add element ip6 t s { fd00::0, fd00::1,"));
    }
}
