//! The plan for one set or map: what nft cannot change in place is reported, missing and
//! changed elements are added, other and forbidden ones deleted.

use super::super::listing::ObservedSet;
use super::super::model::{Content, DesiredSet, Element, Forbidden};
use super::super::{schema, text};
use super::{Finding, Op};
use std::collections::{HashMap, HashSet};

/// The declaration's parsed form (checked when the config was loaded; a listing's own line may
/// name types netwarden does not model, which then only match exactly).
fn decl(s: &DesiredSet) -> Option<schema::Declaration> {
    let (kind, text) = s.declaration.split_once(' ')?;
    schema::declaration(kind, text, s.map).ok().map(|(_, d)| d)
}

fn is_forbidden(e: &Element, forbidden: &[Forbidden], d: Option<&schema::Declaration>) -> bool {
    let nets = d.and_then(|d| schema::element_nets(&e.key, d));
    forbidden.iter().any(|f| match f {
        Forbidden::Exact(x) => *x == e.key,
        Forbidden::Net(n) => nets
            .as_deref()
            .is_some_and(|nets| schema::overlaps(nets, n)),
    })
}

pub(super) fn plan_set(
    d: &DesiredSet,
    o: Option<&ObservedSet>,
    findings: &mut Vec<Finding>,
    ops: &mut Vec<Op>,
) {
    let set = d.name.clone();
    let Some(o) = o else {
        findings.push(Finding::SetMissing { set: set.clone() });
        ops.push(Op::AddSet(DesiredSet {
            elements: Vec::new(),
            ..d.clone()
        }));
        if !d.elements.is_empty() {
            ops.push(Op::AddElements {
                set,
                elements: d.elements.clone(),
            });
        }
        return;
    };
    let diff = unchangeable_differences(d, o);
    if !diff.is_empty() {
        findings.push(Finding::SetDifferent {
            set,
            detail: format!("{} (not recreated; elements not compared)", diff.join(", ")),
        });
        return;
    }
    let changes = ElementChanges::of(d, o);
    let text = |v: &[Element]| v.iter().map(ToString::to_string).collect::<Vec<_>>();
    if !changes.add.is_empty() {
        findings.push(Finding::ElementsMissing {
            set: set.clone(),
            elements: text(&changes.add),
        });
    }
    if !changes.other.is_empty() {
        findings.push(Finding::ElementsOther {
            set: set.clone(),
            elements: text(&changes.other),
        });
    }
    if !changes.forbidden.is_empty() {
        findings.push(Finding::Forbidden {
            set: set.clone(),
            elements: text(&changes.forbidden),
        });
    }
    let ElementChanges {
        add,
        mut delete,
        other,
        forbidden,
    } = changes;
    delete.extend(other);
    delete.extend(forbidden);
    if !delete.is_empty() {
        ops.push(Op::DeleteElements {
            set: set.clone(),
            elements: delete,
        });
    }
    if !add.is_empty() {
        ops.push(Op::AddElements { set, elements: add });
    }
}

/// What differs that nft cannot change in place (kind, declaration, flags, timeout), described.
fn unchangeable_differences(d: &DesiredSet, o: &ObservedSet) -> Vec<String> {
    let mut diff = Vec::new();
    if o.map != d.map {
        diff.push(format!(
            "a {}, expected a {}",
            if o.map { "map" } else { "set" },
            d.kind()
        ));
    }
    if text::collapse(&o.declaration) != d.declaration {
        diff.push(format!("`{}`, expected `{}`", o.declaration, d.declaration));
    }
    let mut flags = o.flags.clone();
    flags.sort();
    let mut want = d.flags.clone();
    want.sort();
    if !d.flags.is_empty() && flags != want {
        diff.push(format!(
            "flags {}, expected {}",
            o.flags.join(","),
            d.flags.join(",")
        ));
    }
    if d.timeout.is_some() && o.timeout != d.timeout {
        diff.push(format!(
            "timeout {}, expected {}",
            o.timeout.as_deref().unwrap_or("none"),
            d.timeout.as_deref().unwrap_or("none")
        ));
    }
    diff
}

/// How a set's elements differ from the desired ones.
#[derive(Debug, Default, PartialEq, Eq)]
struct ElementChanges {
    /// Missing, or with another value (a map).
    add: Vec<Element>,
    /// The elements whose value changed, as they are now.
    delete: Vec<Element>,
    /// Not desired, in an `exact` set (forbidden ones excepted).
    other: Vec<Element>,
    forbidden: Vec<Element>,
}

impl ElementChanges {
    fn of(d: &DesiredSet, o: &ObservedSet) -> ElementChanges {
        let declaration = decl(d);
        let have: HashMap<&str, &Element> =
            o.elements.iter().map(|e| (e.key.as_str(), e)).collect();
        let want_keys: HashSet<&str> = d.elements.iter().map(|e| e.key.as_str()).collect();
        let mut changes = ElementChanges::default();
        for e in &d.elements {
            match have.get(e.key.as_str()) {
                Some(x) if x.value == e.value => {}
                Some(x) => {
                    changes.delete.push((*x).clone());
                    changes.add.push(e.clone());
                }
                None => changes.add.push(e.clone()),
            }
        }
        changes.forbidden = o
            .elements
            .iter()
            .filter(|e| is_forbidden(e, &d.forbidden, declaration.as_ref()))
            .cloned()
            .collect();
        if d.membership == Content::Exact {
            changes.other = o
                .elements
                .iter()
                .filter(|e| !want_keys.contains(e.key.as_str()) && !changes.forbidden.contains(e))
                .cloned()
                .collect();
        }
        changes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(key: &str, value: Option<&str>) -> Element {
        Element {
            key: key.into(),
            value: value.map(Into::into),
        }
    }

    fn desired(membership: Content, elements: Vec<Element>) -> DesiredSet {
        DesiredSet {
            name: "m".into(),
            map: true,
            declaration: "type ipv4_addr : verdict".into(),
            flags: vec!["interval".into()],
            timeout: None,
            comment: None,
            elements,
            membership,
            forbidden: vec![Forbidden::Exact("9.9.9.9".into())],
        }
    }

    fn observed(elements: Vec<Element>) -> ObservedSet {
        ObservedSet {
            name: "m".into(),
            map: true,
            declaration: "type ipv4_addr : verdict".into(),
            flags: vec!["interval".into()],
            elements,
            ..ObservedSet::default()
        }
    }

    #[test]
    fn element_changes_sort_missing_changed_other_and_forbidden() {
        let want = vec![
            element("1.1.1.1", Some("accept")),
            element("2.2.2.2", Some("drop")),
            element("3.3.3.3", Some("accept")),
        ];
        let have = vec![
            element("1.1.1.1", Some("accept")),
            element("2.2.2.2", Some("accept")),
            element("4.4.4.4", Some("accept")),
            element("9.9.9.9", Some("accept")),
        ];
        let exact = ElementChanges::of(
            &desired(Content::Exact, want.clone()),
            &observed(have.clone()),
        );
        assert_eq!(
            exact,
            ElementChanges {
                add: vec![want[1].clone(), want[2].clone()],
                delete: vec![have[1].clone()],
                other: vec![have[2].clone()],
                forbidden: vec![have[3].clone()],
            }
        );
        let contains = ElementChanges::of(&desired(Content::Contains, want), &observed(have));
        assert!(
            contains.other.is_empty(),
            "contains leaves other elements alone"
        );
        assert_eq!(contains.forbidden.len(), 1, "but not forbidden ones");
    }

    #[test]
    fn what_nft_cannot_change_in_place_is_described() {
        let d = desired(Content::Contains, Vec::new());
        assert!(unchangeable_differences(&d, &observed(Vec::new())).is_empty());
        let mut o = observed(Vec::new());
        o.map = false;
        o.flags = vec!["constant".into()];
        assert_eq!(
            unchangeable_differences(&d, &o),
            vec!["a set, expected a map", "flags constant, expected interval"]
        );
    }
}
