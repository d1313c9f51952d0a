//! Adopted nftables tables (`spec.adopt[].nftables`): tables an owner rewrites all the time
//! (kube-proxy rewrites its maps and service chains at every sync) are protected as they were
//! last seen, and what the owner does to them is followed. Pure: matching, the copy of a table,
//! and the follow / restore / forget decision; the engine does the I/O.
//!
//! As for adopted iptables chains: a change by an owner (or a process whose parent, grandparent…
//! is one — kube-proxy runs `nft` as a child) is followed, and a table an owner deletes is
//! forgotten. A change by anyone else is drift from the copy: deleted chains, sets, rules and
//! elements are put back as last seen (chains are rewritten as they were: an owner like kube-proxy
//! would do the same at its next sync). Elements someone else added are left (sets can be filled
//! from the packet path, which sends no notification), and the elements of `dynamic` or
//! `timeout` sets are never protected (they come and go without notice).

use super::listing::ObservedTable;
use super::model::{BaseChain, Content, DesiredChain, DesiredSet, DesiredTable, TableKey};
use crate::adopt::{Actor, Verdict, ADOPTED_PREFIX};
use crate::model::Mode;

mod saved;

pub use super::model::Selector;
pub use saved::{from_saved, SavedChain, SavedSet, SavedTable};

/// The first selector that adopts a table.
pub fn select<'a>(selectors: &'a [Selector], key: &TableKey) -> Option<&'a Selector> {
    selectors.iter().find(|s| s.matches(key))
}

/// A table as seen, as a protected table: every chain with its rules (`exact`), every set and map
/// with its elements (none for `dynamic` or `timeout` sets).
pub fn copy(sel: &Selector, t: &ObservedTable) -> DesiredTable {
    DesiredTable {
        name: sel.object_name(&t.key),
        mode: sel.adopt.mode,
        key: t.key.clone(),
        comment: t.comment.clone(),
        dormant: None,
        chains: t
            .chains
            .iter()
            .map(|c| DesiredChain {
                name: c.name.clone(),
                base: c.base.clone().map(|b| BaseChain {
                    policy: b.policy.or_else(|| Some("accept".into())),
                    ..b
                }),
                comment: c.comment.clone(),
                content: Content::Exact,
                rules: c.rules.iter().map(|r| r.text.clone()).collect(),
            })
            .collect(),
        sets: t
            .sets
            .iter()
            .map(|s| {
                let transient = s.flags.iter().any(|f| f == "dynamic" || f == "timeout");
                DesiredSet {
                    name: s.name.clone(),
                    map: s.map,
                    declaration: s.declaration.clone(),
                    flags: s.flags.clone(),
                    timeout: s.timeout.clone(),
                    comment: s.comment.clone(),
                    elements: if transient {
                        Vec::new()
                    } else {
                        s.elements.clone()
                    },
                    membership: Content::Contains,
                    forbidden: Vec::new(),
                }
            })
            .collect(),
    }
}

/// What a read of an adopted (or adoptable) table calls for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Judgement {
    /// First seen: protect this copy.
    Adopt(DesiredTable),
    /// Changed by an owner: the copy becomes this.
    Follow(DesiredTable),
    /// Changed or deleted by someone else: put the copy back.
    Restore,
    /// Deleted by an owner (or, under `unknownActor: forget`, by nobody known).
    Forget,
    Nothing,
}

/// Judges one read. `copy`: what is protected now; `observed`: the table read (`None`: gone);
/// `changed`: whether it differs from the copy; `actor`/`ancestors`: who committed the change.
pub fn judge(
    sel: &Selector,
    copy_now: Option<&DesiredTable>,
    observed: Option<&ObservedTable>,
    changed: bool,
    actor: Actor<'_>,
    ancestors: &[String],
) -> Judgement {
    let actor = sel.adopt.on_behalf(actor, ancestors);
    match (copy_now, observed) {
        (None, Some(t)) => Judgement::Adopt(copy(sel, t)),
        (None, None) => Judgement::Nothing,
        (Some(_), Some(_)) if !changed => Judgement::Nothing,
        (Some(_), Some(t)) => match sel.adopt.decide(actor) {
            Verdict::Forget => Judgement::Follow(copy(sel, t)),
            Verdict::Restore => Judgement::Restore,
        },
        (Some(_), None) => match sel.adopt.decide(actor) {
            Verdict::Forget => Judgement::Forget,
            Verdict::Restore => Judgement::Restore,
        },
    }
}

/// The mode of an adopted table (its selector's).
pub fn mode(selectors: &[Selector], name: &str) -> Mode {
    selectors
        .iter()
        .find(|s| name.starts_with(&format!("{ADOPTED_PREFIX}{}/", s.adopt.name)))
        .map_or(Mode::Observe, |s| s.adopt.mode)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::{AdoptSelector, UnknownActor};
    use crate::nftables::listing;
    use crate::nftables::model::NfFamily;

    fn sel() -> Selector {
        Selector {
            adopt: AdoptSelector {
                name: "kube-proxy".into(),
                mode: Mode::Enforce,
                rules: None,
                routes: None,
                chains: None,
                ipsets: None,
                neighbours: None,
                owners: vec!["kube-proxy".into()],
                unknown_actor: UnknownActor::Restore,
                pod_liveness: None,
            },
            family: None,
            tables: vec!["kube-proxy".into(), "calico-*".into()],
        }
    }

    fn key(family: NfFamily, name: &str) -> TableKey {
        TableKey {
            family,
            name: name.into(),
        }
    }

    const LISTING: &str = "table ip kube-proxy { # handle 1\n\tset affinity { # handle 2\n\t\ttype ipv4_addr\n\t\tflags dynamic,timeout\n\t\ttimeout 3h\n\t\telements = { 10.0.0.1 }\n\t}\n\tset cluster-ips { # handle 3\n\t\ttype ipv4_addr\n\t\telements = { 10.96.0.1 }\n\t}\n\tchain services { # handle 4\n\t\tjump x # handle 5\n\t}\n\tchain x { # handle 6\n\t}\n}\n";

    #[test]
    fn matching_never_takes_iptables_nft_tables() {
        let s = sel();
        assert!(s.matches(&key(NfFamily::Ip6, "kube-proxy")));
        assert!(s.matches(&key(NfFamily::Inet, "calico-filter")));
        assert!(!s.matches(&key(NfFamily::Ip, "kube-proxy-x")));
        let mut all = sel();
        all.tables = vec!["n*".into(), "f*".into()];
        assert!(!all.matches(&key(NfFamily::Ip, "nat")), "iptables-nft's");
        assert!(!all.matches(&key(NfFamily::Ip6, "filter")));
        assert!(
            all.matches(&key(NfFamily::Inet, "filter")),
            "not an iptables family table"
        );
    }

    #[test]
    fn a_copy_is_the_table_as_seen_without_transient_elements() {
        let t = listing::parse(LISTING, &key(NfFamily::Ip, "kube-proxy")).unwrap();
        let c = copy(&sel(), &t);
        assert_eq!(c.name, "adopted:kube-proxy/ip/kube-proxy");
        assert!(
            c.sets[0].elements.is_empty(),
            "a dynamic set's elements come and go"
        );
        assert_eq!(c.sets[1].elements.len(), 1);
        assert_eq!(c.chains[0].rules[0].body, "jump x");
        assert_eq!(c.chains[0].content, Content::Exact);
        // Adopted as seen, it is in sync with what was seen.
        assert_eq!(
            crate::nftables::plan::plan_table(&c, Some(&t), &Default::default()),
            (None, None)
        );
    }

    #[test]
    fn owners_are_followed_others_restored() {
        let s = sel();
        let t = listing::parse(LISTING, &key(NfFamily::Ip, "kube-proxy")).unwrap();
        let c = copy(&s, &t);
        let owner = Actor::Process("kube-proxy");
        let nft = Actor::Process("nft");
        assert!(matches!(
            judge(&s, None, Some(&t), true, nft, &[]),
            Judgement::Adopt(_)
        ));
        assert!(matches!(
            judge(&s, Some(&c), Some(&t), true, owner, &[]),
            Judgement::Follow(_)
        ));
        assert_eq!(
            judge(&s, Some(&c), Some(&t), false, nft, &[]),
            Judgement::Nothing
        );
        assert_eq!(
            judge(&s, Some(&c), Some(&t), true, nft, &[]),
            Judgement::Restore
        );
        // kube-proxy runs `nft` as a child: that nft acts for the owner.
        let kp = vec!["kube-proxy".to_owned()];
        assert!(matches!(
            judge(&s, Some(&c), Some(&t), true, nft, &kp),
            Judgement::Follow(_)
        ));
        assert_eq!(judge(&s, Some(&c), None, true, nft, &kp), Judgement::Forget);
        assert_eq!(
            judge(&s, Some(&c), None, true, nft, &[]),
            Judgement::Restore
        );
        assert_eq!(
            judge(&s, Some(&c), None, true, Actor::Unknown, &[]),
            Judgement::Restore
        );
        let mut forget = sel();
        forget.adopt.unknown_actor = UnknownActor::Forget;
        assert_eq!(
            judge(&forget, Some(&c), None, true, Actor::Unknown, &[]),
            Judgement::Forget
        );
        assert_eq!(mode(&[s], &c.name), Mode::Enforce);
    }
}
