//! One record per protected object that is not simply in sync: what the loop knows about it
//! (pending, failed, refused, what was last reported, being placed, what the board shows).
//! Pure: the loop feeds it outcomes and findings and asks it what an object's state is.
//!
//! An object in sync with nothing to remember has no record, so the ledger stays as small as
//! the drift on the node, and the counts the loop publishes (pending, refused) are kept as the
//! records change rather than counted.

use crate::model::fast::HashMap;
use crate::model::Mode;
use crate::plan::Finding;
use crate::telemetry::status::State;
use std::hash::Hash;

/// What the loop knows about one protected object.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ObjectState {
    /// Enforced, but the kernel would not take it yet (its device, address or gateway is
    /// missing): retried when something appears.
    pub pending: bool,
    /// The netlink port of the change that made a pending object missing, when known: its
    /// eventual repair is told with that actor, as its drift was counted.
    pub pending_by: Option<u32>,
    /// Enforced, and its last repair failed.
    pub failed: bool,
    /// Its last repair was refused for lack of permission: while any object is, the agent is
    /// not ready.
    pub refused: bool,
    /// What was last logged about its drift, so logs speak of transitions, not repeats.
    pub reported: Option<Finding>,
    /// Newly protected (a config change, a new link) and not in place yet: adding it is a
    /// placement, not a repair.
    pub placing: bool,
    /// What the status board shows (`None`: in sync).
    pub board: Option<(State, Option<String>)>,
}

impl ObjectState {
    fn is_clear(&self) -> bool {
        !self.pending
            && self.pending_by.is_none()
            && !self.failed
            && !self.refused
            && !self.placing
            && self.reported.is_none()
            && self.board.is_none()
    }
}

/// How many records have each flag: the loop asks for these on every turn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    pending: usize,
    failed: usize,
    refused: usize,
    placing: usize,
    board: usize,
}

impl Counts {
    fn add(&mut self, s: &ObjectState, sign: isize) {
        let f = |n: &mut usize, on: bool| {
            if on {
                *n = n.wrapping_add_signed(sign);
            }
        };
        f(&mut self.pending, s.pending);
        f(&mut self.failed, s.failed);
        f(&mut self.refused, s.refused);
        f(&mut self.placing, s.placing);
        f(&mut self.board, s.board.is_some());
    }
}

/// The records of all objects not simply in sync.
#[derive(Debug)]
pub struct Ledger<K> {
    objects: HashMap<K, ObjectState>,
    counts: Counts,
}

impl<K> Default for Ledger<K> {
    fn default() -> Ledger<K> {
        Ledger {
            objects: HashMap::default(),
            counts: Counts::default(),
        }
    }
}

impl<K: Clone + Eq + Hash> Ledger<K> {
    /// The record of `id`, if it has one.
    pub fn get(&self, id: &K) -> Option<&ObjectState> {
        self.objects.get(id)
    }

    /// Changes the record of `id` (creating it only if the change leaves something to
    /// remember), keeping the counts, and drops it once it is clear.
    fn update<R>(&mut self, id: &K, change: impl FnOnce(&mut ObjectState) -> R) -> R {
        let Some(state) = self.objects.get_mut(id) else {
            let mut fresh = ObjectState::default();
            let r = change(&mut fresh);
            if !fresh.is_clear() {
                self.counts.add(&fresh, 1);
                self.objects.insert(id.clone(), fresh);
            }
            return r;
        };
        self.counts.add(state, -1);
        let r = change(state);
        self.counts.add(state, 1);
        if state.is_clear() {
            self.objects.remove(id);
        }
        r
    }

    /// Keeps the records `keep` says yes to (a new config no longer protects the others).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let counts = &mut self.counts;
        self.objects.retain(|id, s| {
            let kept = keep(id);
            if !kept {
                counts.add(s, -1);
            }
            kept
        });
    }

    /// Forgets everything about `id` (no longer protected). Returns what was known.
    pub fn forget(&mut self, id: &K) -> Option<ObjectState> {
        let s = self.objects.remove(id)?;
        self.counts.add(&s, -1);
        Some(s)
    }

    // --- pending ---

    pub fn is_pending(&self, id: &K) -> bool {
        self.get(id).is_some_and(|s| s.pending)
    }

    pub fn has_pending(&self) -> bool {
        self.counts.pending > 0
    }

    pub fn pending(&self) -> impl Iterator<Item = &K> {
        self.objects
            .iter()
            .filter(|(_, s)| s.pending)
            .map(|(id, _)| id)
    }

    /// Sets or clears pending (clearing forgets who made it missing).
    pub fn set_pending(&mut self, id: &K, on: bool) {
        self.update(id, |s| {
            s.pending = on;
            if !on {
                s.pending_by = None;
            }
        });
    }

    /// The port of the change that made a pending object missing, when known.
    pub fn pending_port(&self, id: &K) -> Option<u32> {
        self.get(id).and_then(|s| s.pending_by)
    }

    /// Keeps pending only the objects `keep` says yes to.
    pub fn retain_pending(&mut self, mut keep: impl FnMut(&K) -> bool) {
        let drop: Vec<K> = self.pending().filter(|id| !keep(id)).cloned().collect();
        for id in drop {
            self.set_pending(&id, false);
        }
    }

    // --- failed and refused repairs ---

    pub fn failed_count(&self) -> usize {
        self.counts.failed
    }

    pub fn refused_count(&self) -> usize {
        self.counts.refused
    }

    // --- what was reported ---

    pub fn reported(&self, id: &K) -> Option<&Finding> {
        self.get(id).and_then(|s| s.reported.as_ref())
    }

    pub fn set_reported(&mut self, id: &K, finding: Option<Finding>) {
        self.update(id, |s| s.reported = finding);
    }

    /// The objects something was reported about that `looked_at` and that are not in `seen`
    /// (the plan found nothing wrong with them): back in sync, their report is cleared.
    pub fn back_in_sync(
        &mut self,
        seen: impl Fn(&K) -> bool,
        looked_at: impl Fn(&K) -> bool,
    ) -> Vec<K> {
        let back: Vec<K> = self
            .objects
            .iter()
            .filter(|(id, s)| s.reported.is_some() && !seen(id) && looked_at(id))
            .map(|(id, _)| id.clone())
            .collect();
        for id in &back {
            self.set_reported(id, None);
        }
        back
    }

    // --- placements ---

    pub fn is_placing(&self, id: &K) -> bool {
        self.get(id).is_some_and(|s| s.placing)
    }

    pub fn set_placing(&mut self, id: &K) {
        self.update(id, |s| s.placing = true);
    }

    /// Keeps placing only the objects `keep` says yes to.
    pub fn retain_placing(&mut self, mut keep: impl FnMut(&K, &ObjectState) -> bool) {
        let drop: Vec<K> = self
            .objects
            .iter()
            .filter(|(id, s)| s.placing && !keep(id, s))
            .map(|(id, _)| id.clone())
            .collect();
        for id in drop {
            self.update(&id, |s| s.placing = false);
        }
    }

    /// What is pending stays being placed (placed when it can be); the rest is in place.
    pub fn placed_unless_pending(&mut self) {
        self.retain_placing(|_, s| s.pending);
    }

    // --- repair outcomes ---

    /// The kernel took the object: it is neither pending nor failed. True if this was its
    /// placement (a config change or a new link protected it; nobody removed it).
    pub fn applied(&mut self, id: &K) -> bool {
        if !self.objects.contains_key(id) {
            return false;
        }
        self.update(id, |s| {
            s.pending = false;
            s.pending_by = None;
            s.failed = false;
            s.refused = false;
            std::mem::take(&mut s.placing)
        })
    }

    /// The kernel would not take it yet; `port`: the change that made it missing, if known (an
    /// earlier one is kept otherwise).
    pub fn not_yet(&mut self, id: &K, port: Option<u32>) {
        self.update(id, |s| {
            s.pending = true;
            if port.is_some() {
                s.pending_by = port;
            }
        });
    }

    /// The repair failed; `refused`: for lack of permission.
    pub fn failed(&mut self, id: &K, refused: bool) {
        self.update(id, |s| {
            s.failed = true;
            s.refused = refused;
        });
    }

    // --- the board ---

    pub fn board(&self, id: &K) -> Option<&(State, Option<String>)> {
        self.get(id).and_then(|s| s.board.as_ref())
    }

    /// Objects the board shows as not in sync.
    pub fn board_count(&self) -> usize {
        self.counts.board
    }

    pub fn boarded(&self) -> impl Iterator<Item = &K> {
        self.objects
            .iter()
            .filter(|(_, s)| s.board.is_some())
            .map(|(id, _)| id)
    }

    /// Puts `state` on the board for `id`. True if that changed what the board shows.
    pub fn set_board(&mut self, id: &K, state: State, reason: Option<String>) -> bool {
        let new = (state != State::InSync).then_some((state, reason));
        if self.board(id) == new.as_ref() {
            return false;
        }
        self.update(id, |s| s.board = new);
        true
    }

    /// Already known not to be in sync (pending, or on the board other than contested): a
    /// repair of it is a retry, not new drift.
    pub fn known_out_of_sync(&self, id: &K) -> bool {
        self.get(id).is_some_and(|s| {
            s.pending || matches!(&s.board, Some((st, _)) if *st != State::Contested)
        })
    }

    /// The state the board should show for `id`: contested first, then what was reported
    /// pending, pending, a failed repair; otherwise what this plan found (`drift`: its finding
    /// and mode; `repaired`: put back by this plan).
    pub fn state_of(
        &self,
        id: &K,
        contested: bool,
        drift: Option<(&Finding, Mode)>,
        repaired: bool,
    ) -> (State, Option<String>) {
        if contested {
            return (State::Contested, None);
        }
        let s = self.get(id);
        if let Some(Finding::Pending { reason }) = s.and_then(|s| s.reported.as_ref()) {
            return (State::Pending, Some(reason.clone()));
        }
        if s.is_some_and(|s| s.pending) {
            return (State::Pending, None);
        }
        if s.is_some_and(|s| s.failed) {
            return (State::Drifted, Some("the last repair failed".to_string()));
        }
        match drift {
            None => (State::InSync, None),
            Some(_) if repaired => (State::InSync, None),
            Some((finding, mode)) => {
                let what = match finding {
                    Finding::Missing => "missing".to_string(),
                    Finding::Different { observed } => format!("different: {observed}"),
                    Finding::Pending { reason } => reason.clone(),
                };
                match (finding, mode) {
                    (Finding::Pending { .. }, _) => (State::Pending, Some(what)),
                    (_, Mode::Observe) => (State::ObserveOnly, Some(what)),
                    _ => (State::Drifted, Some(what)),
                }
            }
        }
    }

    /// Records in the ledger what [`Ledger::state_of`] says for `id`. Returns the new state if
    /// the board must change.
    pub fn restate(
        &mut self,
        id: &K,
        contested: bool,
        drift: Option<(&Finding, Mode)>,
        repaired: bool,
    ) -> Option<(State, Option<String>)> {
        let (state, reason) = self.state_of(id, contested, drift, repaired);
        self.set_board(id, state, reason.clone())
            .then_some((state, reason))
    }

    /// Number of objects with a record.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.objects.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(reason: &str) -> Finding {
        Finding::Pending {
            reason: reason.to_string(),
        }
    }

    #[test]
    fn an_object_in_sync_has_no_record() {
        let mut l: Ledger<u32> = Ledger::default();
        assert!(!l.applied(&1), "nothing known: no placement");
        l.set_pending(&1, false);
        l.set_reported(&1, None);
        assert!(!l.set_board(&1, State::InSync, None));
        assert!(l.is_empty());
        l.not_yet(&1, None);
        assert_eq!(l.len(), 1);
        assert!(!l.applied(&1));
        assert!(
            l.is_empty(),
            "applied and nothing else known: the record goes"
        );
    }

    #[test]
    fn counts_follow_every_change() {
        let mut l: Ledger<u32> = Ledger::default();
        l.not_yet(&1, None);
        l.not_yet(&2, None);
        l.failed(&3, true);
        l.failed(&4, false);
        assert!(l.has_pending());
        assert_eq!((l.failed_count(), l.refused_count()), (2, 1));
        // A refused repair that fails again for another reason is no longer refused.
        l.failed(&3, false);
        assert_eq!((l.failed_count(), l.refused_count()), (2, 0));
        l.failed(&3, true);
        l.applied(&3);
        assert_eq!((l.failed_count(), l.refused_count()), (1, 0));
        l.retain_pending(|id| *id == 2);
        assert_eq!(l.pending().copied().collect::<Vec<_>>(), vec![2]);
        l.retain(|id| *id != 2);
        assert!(!l.has_pending());
        l.forget(&4);
        assert_eq!(l.failed_count(), 0);
        assert!(l.is_empty());
        // Retain and forget keep the counts of what is left.
        l.not_yet(&5, None);
        l.set_board(&5, State::Pending, None);
        l.set_board(&6, State::Drifted, None);
        assert_eq!(l.board_count(), 2);
        l.retain(|id| *id == 5);
        assert_eq!(l.board_count(), 1);
        assert_eq!(l.forget(&5).map(|s| s.pending), Some(true));
        assert_eq!((l.board_count(), l.has_pending()), (0, false));
    }

    #[test]
    fn who_made_a_pending_object_missing_is_kept_until_it_is_no_longer_pending() {
        let mut l: Ledger<u32> = Ledger::default();
        l.not_yet(&1, Some(42));
        assert_eq!(l.pending_port(&1), Some(42));
        // A retry that fails again without a known change keeps the first one.
        l.not_yet(&1, None);
        assert_eq!(l.pending_port(&1), Some(42));
        l.not_yet(&1, Some(7));
        assert_eq!(l.pending_port(&1), Some(7));
        l.retain_pending(|_| false);
        assert_eq!(l.pending_port(&1), None);
        assert!(l.is_empty(), "nothing left to remember");
        l.not_yet(&2, Some(9));
        l.applied(&2);
        assert_eq!(l.pending_port(&2), None);
        assert!(l.is_empty());
    }

    #[test]
    fn a_placement_is_told_once_and_only_for_objects_being_placed() {
        let mut l: Ledger<u32> = Ledger::default();
        l.set_placing(&1);
        l.not_yet(&1, None);
        l.set_placing(&2);
        assert!(l.is_placing(&1));
        // A reload's end: what is in place was placed, what is pending still is being placed.
        l.placed_unless_pending();
        assert!(l.is_placing(&1));
        assert!(!l.is_placing(&2));
        assert!(l.applied(&1), "its first repair is its placement");
        assert!(!l.applied(&1), "told once");
        assert!(!l.is_pending(&1));
        l.not_yet(&3, None);
        assert!(
            !l.applied(&3),
            "a pending object that was not being placed is repaired"
        );
    }

    #[test]
    fn a_retry_is_known_drift_unless_the_object_is_contested() {
        let mut l: Ledger<u32> = Ledger::default();
        assert!(!l.known_out_of_sync(&1));
        l.not_yet(&1, None);
        assert!(l.known_out_of_sync(&1));
        l.set_board(&2, State::Drifted, Some("the last repair failed".into()));
        assert!(l.known_out_of_sync(&2));
        l.set_board(&3, State::Contested, None);
        assert!(
            !l.known_out_of_sync(&3),
            "each removal of a contested object is drift"
        );
    }

    #[test]
    fn the_board_state_takes_contest_then_pending_then_failure_then_the_plan() {
        let mut l: Ledger<u32> = Ledger::default();
        let missing = Finding::Missing;
        let diff = Finding::Different {
            observed: "table 5".into(),
        };
        // Contested wins over everything.
        l.not_yet(&1, None);
        assert_eq!(l.state_of(&1, true, None, false), (State::Contested, None));
        // Reported pending: with the reason; pending without a report: without.
        l.set_reported(&1, Some(pending("no device eth9")));
        assert_eq!(
            l.state_of(&1, false, Some((&missing, Mode::Enforce)), false),
            (State::Pending, Some("no device eth9".into()))
        );
        l.not_yet(&2, None);
        assert_eq!(l.state_of(&2, false, None, false), (State::Pending, None));
        l.failed(&3, false);
        assert_eq!(
            l.state_of(&3, false, Some((&missing, Mode::Enforce)), true),
            (State::Drifted, Some("the last repair failed".into()))
        );
        // Nothing known: what the plan found.
        assert_eq!(l.state_of(&4, false, None, false), (State::InSync, None));
        assert_eq!(
            l.state_of(&4, false, Some((&missing, Mode::Enforce)), true),
            (State::InSync, None),
            "repaired by this plan"
        );
        assert_eq!(
            l.state_of(&4, false, Some((&missing, Mode::Enforce)), false),
            (State::Drifted, Some("missing".into()))
        );
        assert_eq!(
            l.state_of(&4, false, Some((&diff, Mode::Observe)), false),
            (State::ObserveOnly, Some("different: table 5".into()))
        );
        assert_eq!(
            l.state_of(&4, false, Some((&pending("no gw"), Mode::Observe)), false),
            (State::Pending, Some("no gw".into()))
        );
    }

    #[test]
    fn restate_reports_only_changes_and_in_sync_clears_the_board() {
        let mut l: Ledger<u32> = Ledger::default();
        let missing = Finding::Missing;
        let observe = Some((&missing, Mode::Observe));
        assert_eq!(
            l.restate(&1, false, observe, false),
            Some((State::ObserveOnly, Some("missing".into())))
        );
        assert_eq!(l.restate(&1, false, observe, false), None, "no change");
        assert_eq!(l.board_count(), 1);
        assert_eq!(
            l.restate(&1, false, None, false),
            Some((State::InSync, None))
        );
        assert_eq!(l.board_count(), 0);
        assert!(l.is_empty());
        assert_eq!(
            l.restate(&1, false, None, false),
            None,
            "in sync stays quiet"
        );
    }

    #[test]
    fn back_in_sync_names_only_reported_objects_the_plan_looked_at() {
        let mut l: Ledger<u32> = Ledger::default();
        l.set_reported(&1, Some(Finding::Missing));
        l.set_reported(&2, Some(Finding::Missing));
        l.set_reported(&3, Some(Finding::Missing));
        l.not_yet(&4, None);
        // The plan looked at 1, 2 and 4 and still found 2 drifted.
        let mut back = l.back_in_sync(|id| *id == 2, |id| *id != 3);
        back.sort();
        assert_eq!(back, vec![1]);
        assert_eq!(l.reported(&1), None);
        assert_eq!(l.reported(&2), Some(&Finding::Missing));
        assert_eq!(l.reported(&3), Some(&Finding::Missing), "not looked at");
        assert!(l.is_pending(&4), "pending is not a report");
    }
}
