//! The status board: what the loop publishes about each protected object (its state, its last
//! repair), read by the HTTP side for `/status`, the state gauges and `netwarden status`.
//!
//! The loop writes it under a short lock: after a batch, only the objects that batch touched.

use crate::config::{Pending, PendingCause};
use crate::model::fast::HashMap;
use crate::model::ObjectId;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

mod table;
pub use table::{ago, render_table};

/// The state of a protected object.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// In the kernel as desired.
    InSync,
    /// Enforced, but cannot be applied yet (its device or gateway is missing).
    Pending,
    /// Enforced and not as desired: the last repair failed.
    Drifted,
    /// Removed again and again right after each repair: repairs back off.
    Contested,
    /// Not as desired, but the object is in observe mode: reported, left alone.
    ObserveOnly,
}

impl State {
    pub const ALL: [State; 5] = [
        State::InSync,
        State::Pending,
        State::Drifted,
        State::Contested,
        State::ObserveOnly,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::InSync => "in_sync",
            State::Pending => "pending",
            State::Drifted => "drifted",
            State::Contested => "contested",
            State::ObserveOnly => "observe_only",
        }
    }
}

pub const KINDS: [&str; 7] = [
    "rule",
    "route",
    "address",
    "neighbour",
    "fdb",
    "link",
    "sysctl",
];
/// Kinds the netfilter guard publishes (beside the rtnetlink agent's [`KINDS`]).
pub const NETFILTER_KINDS: [&str; 2] = ["chain", "ipset"];
/// The kind the nftables engine publishes ([`crate::nftables`]): one object per protected table.
pub const NFTABLES_KIND: &str = "nft_table";

fn config_origin() -> String {
    "config".to_string()
}

/// One protected object as `/status` shows it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ObjectStatus {
    pub kind: String,
    pub name: String,
    /// `config` (named in the config) or `adopted` (through `spec.adopt`).
    #[serde(default = "config_origin")]
    pub origin: String,
    pub object: String,
    pub mode: String,
    pub state: State,
    /// Why it is pending or drifted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Repairs since the agent started.
    pub repairs: u64,
    /// Unix time of the last repair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_repair_unix: Option<f64>,
    /// Who removed or changed it before the last repair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_actor: Option<String>,
    /// Who keeps removing it, while contested.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fighter: Option<String>,
}

/// A templated object that is not protected (yet), as `/status` shows it (Kubernetes mode).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingStatus {
    pub name: String,
    /// Where it is in the config (`spec.rules[0]`); empty when not known.
    pub path: String,
    /// `no_value`, `no_family`, `too_many`, `invalid_value`, `forbidden_member`, `duplicate`.
    pub cause: String,
    pub reason: String,
}

/// The `/status` document.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// `netwarden.io/v1alpha1` and `Status`, as in every JSON document netwarden prints
    /// (docs/cli.md). Absent from agents before they were added: read as those values.
    #[serde(rename = "apiVersion", default = "api_version")]
    pub api_version: String,
    #[serde(default = "status_kind")]
    pub kind: String,
    pub version: String,
    pub ready: bool,
    /// Why the agent is not ready (what `/readyz` answers), when it is not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_ready: Option<String>,
    pub now_unix: f64,
    pub objects: Vec<ObjectStatus>,
    /// Templated objects waiting for a cluster fact (or left out), and why.
    #[serde(default)]
    pub pending: Vec<PendingStatus>,
}

fn api_version() -> String {
    crate::config::API_VERSION.to_owned()
}

fn status_kind() -> String {
    "Status".to_owned()
}

#[derive(Clone, Debug)]
struct Entry {
    status: ObjectStatus,
}

/// Why an agent is not ready before its initial sync is done.
pub const NOT_SYNCED: &str = "initial sync not done";

/// What the loop publishes.
#[derive(Debug, Default)]
pub struct Board {
    pub ready: bool,
    /// Why not ready, when not.
    pub not_ready: Option<String>,
    objects: HashMap<ObjectId, Entry>,
    /// Chains and sets, by name: published by the netfilter guard.
    netfilter: HashMap<String, ObjectStatus>,
    /// nftables tables, by name: published by the nftables engine.
    nftables: HashMap<String, ObjectStatus>,
    /// The templated objects of the last expansion that are not protected.
    templates_pending: Vec<Pending>,
}

impl ObjectStatus {
    /// A newly protected object: in sync, nothing known about it yet.
    fn new(kind: String, name: String, object: String, mode: String) -> ObjectStatus {
        ObjectStatus {
            kind,
            origin: crate::adopt::origin(&name).to_string(),
            name,
            object,
            mode,
            state: State::InSync,
            reason: None,
            repairs: 0,
            last_repair_unix: None,
            last_actor: None,
            fighter: None,
        }
    }
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

impl Board {
    /// Replaces the set of protected objects (at start and after a config change), keeping what
    /// is known about objects that stay.
    pub fn set_catalog(&mut self, catalog: Vec<(ObjectId, String, String, String)>) {
        let mut old = std::mem::take(&mut self.objects);
        for (id, name, object, mode) in catalog {
            let kind = id.kind().to_string();
            let entry = match old.remove(&id) {
                Some(mut e) => {
                    e.status.origin = crate::adopt::origin(&name).to_string();
                    e.status.name = name;
                    e.status.object = object;
                    e.status.mode = mode;
                    e
                }
                None => Entry {
                    status: ObjectStatus::new(kind, name, object, mode),
                },
            };
            self.objects.insert(id, entry);
        }
    }

    /// Replaces the guard's chains and sets: `(kind, name, object, mode)`, keeping what is
    /// known about those that stay.
    pub fn set_netfilter_catalog(&mut self, catalog: Vec<(&'static str, String, String, String)>) {
        let mut old = std::mem::take(&mut self.netfilter);
        for (kind, name, object, mode) in catalog {
            let status = match old.remove(&name) {
                Some(mut st) => {
                    st.object = object;
                    st.mode = mode;
                    st
                }
                None => ObjectStatus::new(kind.to_string(), name.clone(), object, mode),
            };
            self.netfilter.insert(name, status);
        }
    }

    /// Replaces the nftables engine's tables: `(name, object, mode)`, keeping what is known
    /// about those that stay.
    pub fn set_nftables_catalog(&mut self, catalog: Vec<(String, String, String)>) {
        let mut old = std::mem::take(&mut self.nftables);
        for (name, object, mode) in catalog {
            let status = match old.remove(&name) {
                Some(mut st) => {
                    st.object = object;
                    st.mode = mode;
                    st
                }
                None => ObjectStatus::new(NFTABLES_KIND.to_string(), name.clone(), object, mode),
            };
            self.nftables.insert(name, status);
        }
    }

    /// An nftables table's state; `fighter` while contested.
    pub fn set_nftables_state(
        &mut self,
        name: &str,
        state: State,
        reason: Option<String>,
        fighter: Option<&str>,
    ) {
        if let Some(st) = self.nftables.get_mut(name) {
            st.state = state;
            st.reason = reason;
            st.fighter = fighter.map(str::to_string);
        }
    }

    pub fn record_nftables_repair(&mut self, name: &str, actor: &str, at_unix: f64) {
        if let Some(st) = self.nftables.get_mut(name) {
            if st.state != State::Contested {
                st.state = State::InSync;
                st.reason = None;
            }
            st.repairs += 1;
            st.last_repair_unix = Some(at_unix);
            st.last_actor = Some(actor.to_string());
        }
    }

    pub fn set_netfilter_state(&mut self, name: &str, state: State, reason: Option<String>) {
        if let Some(st) = self.netfilter.get_mut(name) {
            st.state = state;
            st.reason = reason;
            if state != State::Contested {
                st.fighter = None;
            }
        }
    }

    /// Who keeps changing a contested chain.
    pub fn set_netfilter_fighter(&mut self, name: &str, actor: &str) {
        if let Some(st) = self.netfilter.get_mut(name) {
            st.fighter = Some(actor.to_string());
        }
    }

    pub fn record_netfilter_repair(&mut self, name: &str, actor: &str, at_unix: f64) {
        if let Some(st) = self.netfilter.get_mut(name) {
            st.state = State::InSync;
            st.reason = None;
            st.fighter = None;
            st.repairs += 1;
            st.last_repair_unix = Some(at_unix);
            st.last_actor = Some(actor.to_string());
        }
    }

    pub fn set_state(&mut self, id: &ObjectId, state: State, reason: Option<String>) {
        if let Some(e) = self.objects.get_mut(id) {
            e.status.state = state;
            e.status.reason = reason;
            if state != State::Contested {
                e.status.fighter = None;
            }
        }
    }

    pub fn state(&self, id: &ObjectId) -> Option<State> {
        self.objects.get(id).map(|e| e.status.state)
    }

    pub fn record_repair(&mut self, id: &ObjectId, at_unix: f64) {
        if let Some(e) = self.objects.get_mut(id) {
            e.status.repairs += 1;
            e.status.last_repair_unix = Some(at_unix);
        }
    }

    pub fn record_actor(&mut self, id: &ObjectId, actor: &str) {
        if let Some(e) = self.objects.get_mut(id) {
            e.status.last_actor = Some(actor.to_string());
        }
    }

    pub fn set_fighter(&mut self, id: &ObjectId, actor: &str) {
        if let Some(e) = self.objects.get_mut(id) {
            e.status.fighter = Some(actor.to_string());
        }
    }

    /// Object counts by (kind, state), every combination present.
    pub fn state_counts(&self) -> BTreeMap<(&'static str, State), usize> {
        let mut counts = BTreeMap::new();
        for kind in KINDS {
            for state in State::ALL {
                counts.insert((kind, state), 0);
            }
        }
        for kind in NETFILTER_KINDS {
            for state in State::ALL {
                counts.insert((kind, state), 0);
            }
        }
        for (id, e) in &self.objects {
            *counts.entry((kind_str(id), e.status.state)).or_default() += 1;
        }
        for st in self.netfilter.values() {
            if let Some(kind) = NETFILTER_KINDS.iter().find(|k| **k == st.kind) {
                *counts.entry((*kind, st.state)).or_default() += 1;
            }
        }
        for state in State::ALL {
            counts.entry((NFTABLES_KIND, state)).or_default();
        }
        for st in self.nftables.values() {
            *counts.entry((NFTABLES_KIND, st.state)).or_default() += 1;
        }
        counts
    }

    /// The templated objects of the latest expansion that are not protected (replaces the
    /// previous list: what got its value is gone from it).
    pub fn set_templates_pending(&mut self, pending: Vec<Pending>) {
        self.templates_pending = pending;
    }

    /// Pending templated objects by cause, every cause present.
    pub fn templates_pending_counts(&self) -> BTreeMap<&'static str, usize> {
        let mut out: BTreeMap<&'static str, usize> =
            PendingCause::ALL.iter().map(|c| (c.as_str(), 0)).collect();
        for p in &self.templates_pending {
            *out.entry(p.cause.as_str()).or_default() += 1;
        }
        out
    }

    /// Protected objects by kind and origin (`config`, `adopted`).
    pub fn origin_counts(&self) -> BTreeMap<(&'static str, &'static str), usize> {
        let mut out = BTreeMap::new();
        let kinds = || {
            KINDS
                .iter()
                .chain(NETFILTER_KINDS.iter())
                .chain(std::iter::once(&NFTABLES_KIND))
        };
        for kind in kinds() {
            for origin in ["config", "adopted"] {
                out.insert((*kind, origin), 0);
            }
        }
        let all = self
            .objects
            .values()
            .map(|e| &e.status)
            .chain(self.netfilter.values())
            .chain(self.nftables.values());
        for st in all {
            let kind = kinds().find(|k| **k == st.kind);
            let origin = crate::adopt::origin(&st.name);
            if let Some(kind) = kind {
                *out.entry((*kind, origin)).or_default() += 1;
            }
        }
        out
    }

    /// Objects enforced and not in place (pending, drifted, contested): `(kind, name, state,
    /// reason)`. Objects in observe mode are not failing: they are left alone by choice.
    pub fn unhealthy(&self) -> Vec<(String, String, State, Option<String>)> {
        self.objects
            .values()
            .map(|e| &e.status)
            .chain(self.netfilter.values())
            .filter(|st| matches!(st.state, State::Pending | State::Drifted | State::Contested))
            .map(|st| {
                (
                    st.kind.clone(),
                    st.name.clone(),
                    st.state,
                    st.reason.clone(),
                )
            })
            .collect()
    }

    /// Contested objects by (kind, fighter), chains included.
    pub fn contested_by_actor(&self) -> BTreeMap<(&'static str, String), usize> {
        let mut out = BTreeMap::new();
        let fighter = |st: &ObjectStatus| {
            st.fighter
                .clone()
                .unwrap_or_else(|| super::attribution::UNKNOWN.to_string())
        };
        for (id, e) in &self.objects {
            if e.status.state == State::Contested {
                *out.entry((kind_str(id), fighter(&e.status))).or_default() += 1;
            }
        }
        for st in self.netfilter.values() {
            let kind = NETFILTER_KINDS.iter().find(|k| **k == st.kind);
            if let (Some(kind), State::Contested) = (kind, st.state) {
                *out.entry((*kind, fighter(st))).or_default() += 1;
            }
        }
        for st in self.nftables.values() {
            if st.state == State::Contested {
                let actor = st
                    .fighter
                    .clone()
                    .unwrap_or_else(|| super::attribution::UNKNOWN.to_string());
                *out.entry((NFTABLES_KIND, actor)).or_default() += 1;
            }
        }
        out
    }

    pub fn status(&self) -> Status {
        let mut objects: Vec<ObjectStatus> = self
            .objects
            .values()
            .map(|e| e.status.clone())
            .chain(self.netfilter.values().cloned())
            .chain(self.nftables.values().cloned())
            .collect();
        objects.sort_by(|a, b| {
            kind_rank(&a.kind)
                .cmp(&kind_rank(&b.kind))
                .then_with(|| a.name.cmp(&b.name))
        });
        Status {
            api_version: api_version(),
            kind: status_kind(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            ready: self.ready,
            not_ready: self.not_ready.clone(),
            now_unix: unix_now(),
            objects,
            pending: self
                .templates_pending
                .iter()
                .map(|p| PendingStatus {
                    name: p.name.clone(),
                    path: p.path.clone(),
                    cause: p.cause.as_str().to_owned(),
                    reason: p.reason.clone(),
                })
                .collect(),
        }
    }
}

fn kind_str(id: &ObjectId) -> &'static str {
    id.kind().as_str()
}

fn kind_rank(kind: &str) -> usize {
    KINDS
        .iter()
        .chain(NETFILTER_KINDS.iter())
        .chain(std::iter::once(&NFTABLES_KIND))
        .position(|k| *k == kind)
        .unwrap_or(KINDS.len() + NETFILTER_KINDS.len() + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, RuleAction, RuleKey};

    fn rule(prio: u32) -> ObjectId {
        ObjectId::Rule(RuleKey::new(
            Family::Ipv4,
            prio,
            None,
            None,
            None,
            None,
            None,
            None,
            77,
            RuleAction::Lookup,
        ))
    }

    fn board() -> Board {
        let mut b = Board::default();
        b.set_catalog(vec![
            (
                rule(100),
                "pods".into(),
                "100: lookup 77".into(),
                "enforce".into(),
            ),
            (
                rule(200),
                "other".into(),
                "200: lookup 77".into(),
                "observe".into(),
            ),
        ]);
        b
    }

    #[test]
    fn chains_and_sets_from_the_guard_show_with_their_origin() {
        let mut b = board();
        b.set_netfilter_catalog(vec![
            (
                "chain",
                "flannel".into(),
                "ipv4 nat FLANNEL-POSTRTG".into(),
                "enforce".into(),
            ),
            (
                "ipset",
                "adopted:kube-router/kube-router-y".into(),
                "kube-router-y".into(),
                "enforce".into(),
            ),
        ]);
        b.record_netfilter_repair("adopted:kube-router/kube-router-y", "unknown", 5.0);
        b.set_netfilter_state("flannel", State::ObserveOnly, Some("chain missing".into()));
        let o = b.origin_counts();
        assert_eq!(o[&("chain", "config")], 1);
        assert_eq!(o[&("ipset", "adopted")], 1);
        let c = b.state_counts();
        assert_eq!(c[&("chain", State::ObserveOnly)], 1);
        assert_eq!(c[&("ipset", State::InSync)], 1);
        let st = b.status();
        let set = st.objects.iter().find(|o| o.kind == "ipset").unwrap();
        assert_eq!((set.origin.as_str(), set.repairs), ("adopted", 1));
        assert_eq!(set.last_actor.as_deref(), Some("unknown"));
        assert_eq!(
            st.objects.last().unwrap().kind,
            "ipset",
            "after the core kinds"
        );
        // A new catalog keeps what is known about objects that stay.
        b.set_netfilter_catalog(vec![(
            "ipset",
            "adopted:kube-router/kube-router-y".into(),
            "kube-router-y".into(),
            "enforce".into(),
        )]);
        assert_eq!(
            b.status()
                .objects
                .iter()
                .filter(|o| o.kind == "chain")
                .count(),
            0
        );
        assert_eq!(b.origin_counts()[&("ipset", "adopted")], 1);
    }

    #[test]
    fn counts_cover_every_kind_and_state() {
        let mut b = board();
        b.set_state(&rule(100), State::Contested, None);
        b.set_fighter(&rule(100), "fighter");
        let c = b.state_counts();
        assert_eq!(
            c.len(),
            50,
            "7 rtnetlink kinds, chain, ipset, nft_table × 5 states"
        );
        assert_eq!(c[&("nft_table", State::InSync)], 0);
        assert_eq!(c[&("rule", State::Contested)], 1);
        assert_eq!(c[&("rule", State::InSync)], 1);
        assert_eq!(c[&("route", State::InSync)], 0);
        assert_eq!(
            b.contested_by_actor().into_iter().collect::<Vec<_>>(),
            [(("rule", "fighter".to_string()), 1)]
        );
        b.set_state(&rule(100), State::InSync, None);
        assert!(b.contested_by_actor().is_empty());
        assert_eq!(
            b.status().objects[1].fighter,
            None,
            "the fight is forgotten"
        );
    }

    #[test]
    fn catalog_changes_keep_history_of_objects_that_stay() {
        let mut b = board();
        b.record_repair(&rule(100), 10.0);
        b.set_catalog(vec![(
            rule(100),
            "pods".into(),
            "x".into(),
            "enforce".into(),
        )]);
        let s = b.status();
        assert_eq!(s.objects.len(), 1);
        assert_eq!(s.objects[0].repairs, 1);
    }

    #[test]
    fn table_shows_state_last_repair_and_actor() {
        let mut b = board();
        b.record_repair(&rule(100), 1000.0);
        b.record_actor(&rule(100), "ip");
        b.set_state(&rule(200), State::ObserveOnly, Some("missing".into()));
        let mut s = b.status();
        s.now_unix = 1042.0;
        let t = render_table(&s);
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("KIND  NAME   STATE"), "{t}");
        assert!(
            lines[1].starts_with("rule  other  observe_only  observe  0        -"),
            "{t}"
        );
        assert!(lines[1].ends_with("200: lookup 77 (missing)"), "{t}");
        assert!(
            lines[2].starts_with("rule  pods   in_sync       enforce  1        42s ago      ip"),
            "{t}"
        );
        assert_eq!(
            lines[3],
            "2 objects, 1 in sync, 1 not; initial sync not done yet"
        );
        // JSON round trip, as `netwarden status` reads it.
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn pending_templates_are_shown_counted_and_cleared() {
        let mut b = board();
        b.set_templates_pending(vec![Pending {
            name: "pods-to-overlay".into(),
            path: "spec.rules[0]".into(),
            cause: PendingCause::NoValue,
            reason: "waiting for {{ node.podCIDRs.ipv4 }}: no such value yet".into(),
        }]);
        let counts = b.templates_pending_counts();
        assert_eq!(counts.len(), PendingCause::ALL.len());
        assert_eq!(counts["no_value"], 1);
        assert_eq!(counts["duplicate"], 0);
        let s = b.status();
        assert_eq!(s.pending[0].cause, "no_value");
        let t = render_table(&s);
        assert!(
            t.contains("pending  pods-to-overlay (spec.rules[0]): waiting for {{ node.podCIDRs.ipv4 }}: no such value yet [no_value]\n"),
            "{t}"
        );
        assert!(
            t.ends_with("0 not; 1 templated object pending; initial sync not done yet\n"),
            "{t}"
        );
        let back: Status = serde_json::from_str(&serde_json::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
        b.set_templates_pending(Vec::new());
        assert!(b.status().pending.is_empty());
        assert!(b.templates_pending_counts().values().all(|n| *n == 0));
    }

    #[test]
    fn ages() {
        assert_eq!(ago(-3.0), "0s ago");
        assert_eq!(ago(59.0), "59s ago");
        assert_eq!(ago(600.0), "10m ago");
        assert_eq!(ago(3.0 * 3600.0), "3h ago");
        assert_eq!(ago(3.0 * 86400.0), "3d ago");
    }
}
