//! Adopted chains and sets (`spec.adopt[].chains`, `spec.adopt[].ipsets`): what a CNI creates at
//! run time, protected as last seen. Pure: the judgement of one read against the adopted copies;
//! the guard does the reading and the restoring.
//!
//! The rule: while an adopted chain or set exists, its content is its owner's business and the
//! copy follows it. Its removal is judged by who made it ([`AdoptSelector::decide`]): an owner →
//! forgotten; anyone else → restored with the last-seen content; nobody known → the selector's
//! unknown-actor policy. One refinement: a chain *emptied* is judged like a removal, because
//! removal tools empty a chain first (`iptables -X` refuses one with rules; `iptables -F` comes
//! before it), and following a stranger's flush would leave an empty copy to restore. Any other
//! change is followed whoever made it: CNIs rewrite their chains through `iptables-restore`
//! child processes, which nf_tables names instead of the CNI.
//!
//! Sets never have an actor (ipset has no notifications): every content change is taken as the
//! owner's (kube-router swaps and flushes sets on every sync), only a destroyed set is judged.

use super::model::{ChainKey, DesiredChain, Member, SetType, TableId};
use super::parse::{create_options, SavedSet, SavedTable};
use super::rulespec::RuleSpec;
use crate::adopt::{self, Actor, AdoptSelector, Verdict};
use crate::model::{Family, Mode};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// An adopted chain: its rules as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedChain {
    pub selector: String,
    pub key: ChainKey,
    pub rules: Vec<RuleSpec>,
}

/// An adopted set: its type, creation options and members as last seen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AdoptedSet {
    pub selector: String,
    pub name: String,
    pub kind: SetType,
    pub family: Family,
    /// `create` options other than the family (`hashsize 1024`, `timeout 30`, `comment`…).
    pub options: Vec<String>,
    pub members: BTreeSet<Member>,
}

/// What a read meant for one adopted (or adoptable) object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Seen for the first time: adopted as seen.
    Adopted,
    /// Its owner changed it: the copy follows.
    Updated,
    /// Removed by an owner (or by nobody known, under `forget`): no longer protected.
    Forgotten,
    /// Removed or emptied by someone else: to be restored as last seen.
    Restore,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Adopted => "adopted",
            Outcome::Updated => "updated",
            Outcome::Forgotten => "forgotten",
            Outcome::Restore => "restore",
        })
    }
}

/// The name an adopted chain goes by in logs, `status` and `check`.
pub fn chain_name(selector: &str, key: &ChainKey) -> String {
    format!(
        "{}{selector}/{}/{}/{}",
        adopt::ADOPTED_PREFIX,
        key.family,
        key.table,
        key.chain
    )
}

pub fn set_name(selector: &str, set: &str) -> String {
    format!("{}{selector}/{set}", adopt::ADOPTED_PREFIX)
}

impl AdoptedChain {
    /// The protected chain it stands for: exactly these rules, no jumps (those live in builtin
    /// chains that others share).
    pub fn desired(&self, mode: Mode) -> DesiredChain {
        DesiredChain {
            name: chain_name(&self.selector, &self.key),
            mode,
            key: self.key.clone(),
            rules: self.rules.clone(),
            content: super::model::Content::Exact,
            jumps: Vec::new(),
        }
    }
}

impl AdoptedSet {
    /// The protected set it stands for (for `check` and `status`): exactly these members.
    pub fn desired(&self, mode: Mode) -> super::model::DesiredSet {
        super::model::DesiredSet {
            name: set_name(&self.selector, &self.name),
            mode,
            set: self.name.clone(),
            kind: self.kind,
            family: self.family,
            options: Default::default(),
            members: self.members.iter().copied().collect(),
            membership: super::model::Content::Exact,
            forbidden: Vec::new(),
        }
    }
}

/// A content change is followed, unless it emptied the chain: then it is judged like a removal,
/// except that what an owner (or, under `forget`, nobody known) empties stays adopted, empty.
fn content_change(sel: &AdoptSelector, actor: Actor<'_>, emptied: bool) -> Outcome {
    match sel.decide(actor) {
        Verdict::Restore if emptied => Outcome::Restore,
        _ => Outcome::Updated,
    }
}

fn removal(sel: &AdoptSelector, actor: Actor<'_>) -> Outcome {
    match sel.decide(actor) {
        Verdict::Restore => Outcome::Restore,
        Verdict::Forget => Outcome::Forgotten,
    }
}

/// Judges one read of table `id`: updates `adopted` (new chains adopted, owners' changes
/// followed, forgotten chains dropped) and says what happened to each chain that changed.
/// Chains to restore keep their last-seen copy. `configured` are the chains `spec.chains`
/// protects (never adopted); `actor` made the transaction that was read (unknown for polls),
/// `ancestors` are the names of its parent, grandparent… (see [`AdoptSelector::on_behalf`]).
pub fn judge_table(
    selectors: &[AdoptSelector],
    adopted: &mut BTreeMap<ChainKey, AdoptedChain>,
    id: TableId,
    observed: Option<&SavedTable>,
    actor: Actor<'_>,
    ancestors: &[String],
    configured: &dyn Fn(&ChainKey) -> bool,
) -> Vec<(ChainKey, Outcome)> {
    let mut out = Vec::new();
    let keys: Vec<ChainKey> = adopted
        .keys()
        .filter(|k| k.table_id() == id)
        .cloned()
        .collect();
    for key in keys {
        let sel = adopted
            .get(&key)
            .and_then(|a| selectors.iter().find(|s| s.name == a.selector))
            .filter(|s| s.chains.as_ref().is_some_and(|c| c.matches(&key)));
        let Some(sel) = sel.filter(|_| !configured(&key)) else {
            // No selector covers it any more (config changed): no longer protected.
            adopted.remove(&key);
            out.push((key, Outcome::Forgotten));
            continue;
        };
        let actor = sel.on_behalf(actor, ancestors);
        let Some(copy) = adopted.get_mut(&key) else {
            continue;
        };
        let seen = observed.and_then(|t| t.chains.get(&key.chain));
        let outcome = match seen {
            Some(c) if c.rules == copy.rules => continue,
            Some(c) => {
                let emptied = c.rules.is_empty() && !copy.rules.is_empty();
                let o = content_change(sel, actor, emptied);
                if o == Outcome::Updated {
                    copy.rules = c.rules.clone();
                }
                o
            }
            None => removal(sel, actor),
        };
        if outcome == Outcome::Forgotten {
            adopted.remove(&key);
        }
        out.push((key, outcome));
    }
    for (chain, c) in observed.iter().flat_map(|t| t.chains.iter()) {
        let key = ChainKey {
            family: id.family,
            table: id.table,
            chain: chain.clone(),
        };
        if c.builtin || adopted.contains_key(&key) || configured(&key) {
            continue;
        }
        let Some(sel) = adopt::select_chain(selectors, &key) else {
            continue;
        };
        // The name goes into restore input: only names config validation would accept.
        if crate::netfilter::model::valid_chain_name(chain).is_err() {
            continue;
        }
        adopted.insert(
            key.clone(),
            AdoptedChain {
                selector: sel.name.clone(),
                key: key.clone(),
                rules: c.rules.clone(),
            },
        );
        out.push((key, Outcome::Adopted));
    }
    out
}

/// Why a set that a selector matches cannot be adopted.
pub fn set_unadoptable(name: &str, seen: &SavedSet) -> Option<String> {
    if crate::netfilter::model::valid_set_name(name).is_err() {
        return Some("its name is not one netwarden writes into restore input".into());
    }
    if SetType::parse(&seen.kind).is_none() {
        return Some(format!(
            "type {} is not one netwarden restores (hash:ip, hash:net, hash:ip,port, hash:net,port)",
            seen.kind
        ));
    }
    if !seen.other.is_empty() {
        return Some(format!("member `{}` cannot be read back", seen.other[0]));
    }
    None
}

/// Judges one read of an ipset that a selector matches (`adopted`: the copy, if any). Every
/// change of a set that exists is taken as the owner's; a destroyed set goes by the unknown-actor
/// policy. Returns the new copy (`None`: not or no longer protected) and what happened.
pub fn judge_set(
    sel: &AdoptSelector,
    adopted: Option<&AdoptedSet>,
    name: &str,
    seen: Option<(&SavedSet, Vec<String>)>,
) -> (Option<AdoptedSet>, Option<Outcome>) {
    match (adopted, seen) {
        (None, None) => (None, None),
        (Some(copy), None) => match removal(sel, Actor::Unknown) {
            Outcome::Restore => (Some(copy.clone()), Some(Outcome::Restore)),
            o => (None, Some(o)),
        },
        (copy, Some((s, options))) => {
            if set_unadoptable(name, s).is_some() {
                // Changed into something that cannot be restored: let it go.
                return (None, copy.map(|_| Outcome::Forgotten));
            }
            let Some(kind) = SetType::parse(&s.kind) else {
                return (None, None);
            };
            let family = match s.family.as_deref() {
                Some("inet6") => Family::Ipv6,
                _ => Family::Ipv4,
            };
            let now = AdoptedSet {
                selector: sel.name.clone(),
                name: name.to_owned(),
                kind,
                family,
                options,
                members: s.members.iter().copied().collect(),
            };
            let outcome = match copy {
                None => Some(Outcome::Adopted),
                Some(c) if *c == now => None,
                Some(_) => Some(Outcome::Updated),
            };
            (Some(now), outcome)
        }
    }
}

/// `ipset restore -exist` input recreating a set as last seen.
pub fn restore_set(set: &AdoptedSet) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = write!(
        out,
        "create {} {} family {}",
        set.name,
        set.kind,
        super::model::ipset_family(set.family)
    );
    for o in &set.options {
        let _ = write!(out, " {o}");
    }
    out.push('\n');
    for m in &set.members {
        let _ = writeln!(out, "add {} {m}", set.name);
    }
    out
}

/// How adopted chains and sets are kept in the adopted-state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedChain {
    pub selector: String,
    pub key: ChainKey,
    /// As `iptables-save` prints them after `-A CHAIN`.
    pub rules: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedAdoptedSet {
    pub selector: String,
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub family: Family,
    #[serde(default)]
    pub options: Vec<String>,
    pub members: Vec<String>,
}

impl From<&AdoptedChain> for SavedChain {
    fn from(c: &AdoptedChain) -> SavedChain {
        SavedChain {
            selector: c.selector.clone(),
            key: c.key.clone(),
            rules: c.rules.iter().map(ToString::to_string).collect(),
        }
    }
}

impl From<&AdoptedSet> for SavedAdoptedSet {
    fn from(s: &AdoptedSet) -> SavedAdoptedSet {
        SavedAdoptedSet {
            selector: s.selector.clone(),
            name: s.name.clone(),
            kind: s.kind.as_str().to_owned(),
            family: s.family,
            options: s.options.clone(),
            members: s.members.iter().map(ToString::to_string).collect(),
        }
    }
}

/// The saved chains and sets that a selector still covers, back in memory. What does not read
/// back (a file edited by hand) is skipped: its names and rules would go into restore input.
pub fn from_saved(
    selectors: &[AdoptSelector],
    chains: &[SavedChain],
    sets: &[SavedAdoptedSet],
) -> (
    BTreeMap<ChainKey, AdoptedChain>,
    BTreeMap<String, AdoptedSet>,
) {
    let mut out_chains = BTreeMap::new();
    for c in chains {
        let covered = selectors
            .iter()
            .find(|s| s.name == c.selector)
            .is_some_and(|s| s.chains.as_ref().is_some_and(|sel| sel.matches(&c.key)));
        if !covered || crate::netfilter::model::valid_chain_name(&c.key.chain).is_err() {
            continue;
        }
        let rules: Result<Vec<RuleSpec>, _> =
            c.rules.iter().map(|r| RuleSpec::from_saved(r)).collect();
        let Ok(rules) = rules else { continue };
        out_chains.insert(
            c.key.clone(),
            AdoptedChain {
                selector: c.selector.clone(),
                key: c.key.clone(),
                rules,
            },
        );
    }
    let mut out_sets = BTreeMap::new();
    for s in sets {
        let covered = selectors
            .iter()
            .find(|sel| sel.name == s.selector)
            .is_some_and(|sel| sel.ipsets.as_ref().is_some_and(|i| i.matches(&s.name)));
        let Some(kind) = SetType::parse(&s.kind) else {
            continue;
        };
        if !covered || crate::netfilter::model::valid_set_name(&s.name).is_err() {
            continue;
        }
        let members: Result<BTreeSet<Member>, _> =
            s.members.iter().map(|m| Member::parse(m)).collect();
        let Ok(members) = members else { continue };
        let options: String = s.options.join(" ");
        if create_options(&format!("create {} {kind} {options}", s.name), &s.name) != s.options {
            continue;
        }
        out_sets.insert(
            s.name.clone(),
            AdoptedSet {
                selector: s.selector.clone(),
                name: s.name.clone(),
                kind,
                family: s.family,
                options: s.options.clone(),
                members,
            },
        );
    }
    (out_chains, out_sets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adopt::{ChainSelector, SetSelector, UnknownActor};
    use crate::netfilter::model::Table;
    use crate::netfilter::parse::{ipset_save, iptables_save};

    fn kube_router(policy: UnknownActor) -> AdoptSelector {
        AdoptSelector {
            name: "kube-router".into(),
            mode: Mode::Enforce,
            rules: None,
            routes: None,
            chains: Some(ChainSelector {
                family: Family::Ipv4,
                tables: vec![Table::Nat, Table::Filter],
                names: vec!["KUBE-ROUTER-*".into()],
            }),
            ipsets: Some(SetSelector {
                names: vec!["kube-router-*".into()],
            }),
            neighbours: None,
            owners: vec!["kube-router".into()],
            unknown_actor: policy,
            pod_liveness: None,
        }
    }

    const NAT: TableId = TableId {
        family: Family::Ipv4,
        table: Table::Nat,
    };

    fn nat(body: &str) -> SavedTable {
        let text =
            format!("*nat\n:PREROUTING ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n{body}COMMIT\n");
        iptables_save(&text).unwrap().remove("nat").unwrap()
    }

    const X: &str = ":KUBE-ROUTER-X - [0:0]\n:OTHER - [0:0]\n\
        -A KUBE-ROUTER-X -s 10.1.0.0/16 -j RETURN\n-A KUBE-ROUTER-X -j MASQUERADE\n";

    fn key(chain: &str) -> ChainKey {
        ChainKey {
            family: Family::Ipv4,
            table: Table::Nat,
            chain: chain.into(),
        }
    }

    fn never(_: &ChainKey) -> bool {
        false
    }

    #[test]
    fn chains_are_adopted_followed_and_judged_on_removal() {
        let sels = [kube_router(UnknownActor::Restore)];
        let mut adopted = BTreeMap::new();
        let out = judge_table(
            &sels,
            &mut adopted,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &never,
        );
        assert_eq!(out, vec![(key("KUBE-ROUTER-X"), Outcome::Adopted)]);
        assert_eq!(adopted[&key("KUBE-ROUTER-X")].rules.len(), 2);
        assert!(!adopted.contains_key(&key("OTHER")), "not selected");
        let copy = adopted.clone();

        // Nothing changed: nothing to say.
        assert!(judge_table(
            &sels,
            &mut adopted,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &never
        )
        .is_empty());

        // The owner adds a rule: the copy follows.
        let more = format!("{X}-A KUBE-ROUTER-X -j ACCEPT\n");
        let out = judge_table(
            &sels,
            &mut adopted,
            NAT,
            Some(&nat(&more)),
            Actor::Process("kube-router"),
            &[],
            &never,
        );
        assert_eq!(out, vec![(key("KUBE-ROUTER-X"), Outcome::Updated)]);
        assert_eq!(adopted[&key("KUBE-ROUTER-X")].rules.len(), 3);

        // Someone else flushes or deletes it: restore, keeping the last copy.
        for gone in [":KUBE-ROUTER-X - [0:0]\n", ""] {
            let mut a = adopted.clone();
            let out = judge_table(
                &sels,
                &mut a,
                NAT,
                Some(&nat(gone)),
                Actor::Process("iptables"),
                &[],
                &never,
            );
            assert_eq!(out, vec![(key("KUBE-ROUTER-X"), Outcome::Restore)]);
            assert_eq!(a, adopted);
            let d = a[&key("KUBE-ROUTER-X")].desired(Mode::Enforce);
            assert_eq!(d.name, "adopted:kube-router/ipv4/nat/KUBE-ROUTER-X");
            assert_eq!(d.rules.len(), 3);
        }
        // Another process changing rules without emptying the chain is followed too (CNIs write
        // through `iptables-restore` children, which nf_tables names instead of the CNI).
        let mut a = copy.clone();
        let out = judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat(&more)),
            Actor::Process("iptables-restor"),
            &[],
            &never,
        );
        assert_eq!(out[0].1, Outcome::Updated);
        assert_eq!(a[&key("KUBE-ROUTER-X")].rules.len(), 3);

        // The owner deletes it: forgotten.
        let mut a = adopted.clone();
        let out = judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat("")),
            Actor::Process("kube-router"),
            &[],
            &never,
        );
        assert_eq!(out, vec![(key("KUBE-ROUTER-X"), Outcome::Forgotten)]);
        assert!(a.is_empty());

        // No table at all (nft: deleted): same as a missing chain.
        let mut a = adopted.clone();
        assert_eq!(
            judge_table(&sels, &mut a, NAT, None, Actor::Process("nft"), &[], &never)[0].1,
            Outcome::Restore
        );
    }

    #[test]
    fn children_of_an_owner_act_for_it() {
        let sels = [kube_router(UnknownActor::Restore)];
        let mut base = BTreeMap::new();
        judge_table(
            &sels,
            &mut base,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &never,
        );
        // kube-router deletes its chain through an `iptables` child.
        let family = ["kube-router".to_string(), "containerd-shim".to_string()];
        let mut a = base.clone();
        let out = judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat("")),
            Actor::Process("iptables"),
            &family,
            &never,
        );
        assert_eq!(out[0].1, Outcome::Forgotten);
        // A shell's `iptables`: another process.
        let mut a = base.clone();
        let shell = ["bash".to_string(), "sshd".to_string()];
        let out = judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat("")),
            Actor::Process("iptables"),
            &shell,
            &never,
        );
        assert_eq!(out[0].1, Outcome::Restore);
        assert_eq!(sels[0].on_behalf(Actor::Unknown, &family), Actor::Unknown);
    }

    #[test]
    fn unknown_actors_go_by_the_policy() {
        for (policy, gone, emptied, changed) in [
            (
                UnknownActor::Restore,
                Outcome::Restore,
                Outcome::Restore,
                Outcome::Updated,
            ),
            (
                UnknownActor::Forget,
                Outcome::Forgotten,
                Outcome::Updated,
                Outcome::Updated,
            ),
        ] {
            let sels = [kube_router(policy)];
            let mut base = BTreeMap::new();
            judge_table(
                &sels,
                &mut base,
                NAT,
                Some(&nat(X)),
                Actor::Unknown,
                &[],
                &never,
            );
            let cases = [
                ("", gone),
                (":KUBE-ROUTER-X - [0:0]\n", emptied),
                (
                    ":KUBE-ROUTER-X - [0:0]\n-A KUBE-ROUTER-X -j ACCEPT\n",
                    changed,
                ),
            ];
            for (body, want) in cases {
                let mut a = base.clone();
                let out = judge_table(
                    &sels,
                    &mut a,
                    NAT,
                    Some(&nat(body)),
                    Actor::Unknown,
                    &[],
                    &never,
                );
                assert_eq!(out[0].1, want, "{policy:?} {body:?}");
            }
        }
    }

    #[test]
    fn configured_chains_and_odd_names_are_not_adopted() {
        let sels = [kube_router(UnknownActor::Restore)];
        let mut a = BTreeMap::new();
        let configured = |k: &ChainKey| k.chain == "KUBE-ROUTER-X";
        assert!(judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &configured
        )
        .is_empty());
        let odd = ":KUBE-ROUTER-$x - [0:0]\n";
        assert!(judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat(odd)),
            Actor::Unknown,
            &[],
            &never
        )
        .is_empty());
        // A selector that no longer covers an adopted chain lets it go.
        judge_table(
            &sels,
            &mut a,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &never,
        );
        let mut other = kube_router(UnknownActor::Restore);
        other.chains.as_mut().unwrap().names = vec!["CALI-*".into()];
        let out = judge_table(
            &[other],
            &mut a,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &never,
        );
        assert_eq!(out, vec![(key("KUBE-ROUTER-X"), Outcome::Forgotten)]);
    }

    const SET: &str = "create kube-router-y hash:net family inet hashsize 1024 maxelem 65536 timeout 0 bucketsize 12 initval 0x1a2b3c4d\n\
        add kube-router-y 10.1.0.0/24\nadd kube-router-y 10.2.0.5\n";

    #[test]
    fn sets_follow_every_change_and_are_judged_when_destroyed() {
        let sel = kube_router(UnknownActor::Restore);
        let sets = ipset_save(SET).unwrap();
        let seen = &sets["kube-router-y"];
        let opts = create_options(SET, "kube-router-y");
        assert_eq!(
            opts,
            [
                "hashsize",
                "1024",
                "maxelem",
                "65536",
                "timeout",
                "0",
                "bucketsize",
                "12"
            ]
        );
        let (copy, out) = judge_set(&sel, None, "kube-router-y", Some((seen, opts.clone())));
        assert_eq!(out, Some(Outcome::Adopted));
        let copy = copy.unwrap();
        assert_eq!(copy.kind, SetType::HashNet);
        assert_eq!(
            restore_set(&copy),
            "create kube-router-y hash:net family inet hashsize 1024 maxelem 65536 timeout 0 bucketsize 12\n\
             add kube-router-y 10.1.0.0/24\nadd kube-router-y 10.2.0.5\n"
        );
        assert_eq!(
            judge_set(
                &sel,
                Some(&copy),
                "kube-router-y",
                Some((seen, opts.clone()))
            )
            .1,
            None
        );
        let mut fewer = seen.clone();
        fewer.members.clear();
        let (now, out) = judge_set(
            &sel,
            Some(&copy),
            "kube-router-y",
            Some((&fewer, opts.clone())),
        );
        assert_eq!(
            out,
            Some(Outcome::Updated),
            "emptied sets are the owner's business"
        );
        assert!(now.unwrap().members.is_empty());
        let (kept, out) = judge_set(&sel, Some(&copy), "kube-router-y", None);
        assert_eq!((kept.as_ref(), out), (Some(&copy), Some(Outcome::Restore)));
        let forget = kube_router(UnknownActor::Forget);
        assert_eq!(
            judge_set(&forget, Some(&copy), "kube-router-y", None),
            (None, Some(Outcome::Forgotten))
        );
        let mut odd = seen.clone();
        odd.kind = "list:set".into();
        assert!(set_unadoptable("kube-router-y", &odd).is_some());
        assert_eq!(
            judge_set(&sel, None, "kube-router-y", Some((&odd, vec![]))),
            (None, None)
        );
    }

    #[test]
    fn saved_form_round_trips_and_refuses_what_cannot_be_restored() {
        let sel = kube_router(UnknownActor::Restore);
        let sels = std::slice::from_ref(&sel);
        let mut chains = BTreeMap::new();
        judge_table(
            sels,
            &mut chains,
            NAT,
            Some(&nat(X)),
            Actor::Unknown,
            &[],
            &never,
        );
        let sets = ipset_save(SET).unwrap();
        let (set, _) = judge_set(
            &sel,
            None,
            "kube-router-y",
            Some((&sets["kube-router-y"], create_options(SET, "kube-router-y"))),
        );
        let set = set.unwrap();
        let saved_chains: Vec<SavedChain> = chains.values().map(SavedChain::from).collect();
        let saved_sets = vec![SavedAdoptedSet::from(&set)];
        let (c, s) = from_saved(sels, &saved_chains, &saved_sets);
        assert_eq!(c, chains);
        assert_eq!(s.values().next(), Some(&set));

        let mut bad = saved_chains.clone();
        bad[0].key.chain = "KUBE-ROUTER-X\nCOMMIT".into();
        let mut bad_set = saved_sets.clone();
        bad_set[0].options.push("x\ny".into());
        let (c, s) = from_saved(sels, &bad, &bad_set);
        assert!(c.is_empty() && s.is_empty());
        // A selector that no longer exists: nothing comes back.
        let (c, s) = from_saved(&[], &saved_chains, &saved_sets);
        assert!(c.is_empty() && s.is_empty());
    }
}
