//! What the guard knows about each protected chain and set, one record per object (by object
//! name: `flannel-postrtg`, `adopted:kube-router/kube-router-y`), and the fight over them.
//! Pure: no I/O, the caller passes the time.
//!
//! - A chain removed again right after each repair is *contested* (the rtnetlink agent's
//!   [`Contest`] policy: repairs back off from 10 ms to 30 s, and come 1 s after the fighting
//!   stops). A fight never turns protection off.
//! - A chain whose repair was applied and read back printed otherwise than written (a rule spec
//!   iptables spells differently, when no scratch namespace could check it first) is *given up*:
//!   only reported, so that nothing is appended forever, until a reload re-affirms it.
//! - What was last reported, so that logs speak of transitions, not of every poll.

use crate::netfilter::model::Member;
use crate::telemetry::contest::{Backoff, Calmed, Contest, Decision};
use std::collections::{BTreeMap, HashSet};
use std::time::{Duration, Instant};

/// The first retry of a failed repair, and the longest wait between two.
const RETRY_FIRST: Duration = Duration::from_secs(1);
const RETRY_MAX: Duration = Duration::from_secs(60);

/// One protected chain or set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Record {
    /// The drift last reported (its text); `None` when in sync or not reported.
    pub reported: Option<String>,
    /// The repair does not take: only reported until a reload.
    pub gave_up: bool,
    /// The last repair error, so that a failing repair is logged when the error changes.
    pub failing: Option<String>,
    /// A failed repair is read and tried again at `retry_due`; each failure in a row doubles
    /// `retry_delay` (1 s to 60 s).
    pub retry_due: Option<Instant>,
    pub retry_delay: Option<Duration>,
    /// Digest of the set's `ipset save` text at its last in-sync read.
    pub digest: Option<u64>,
    /// Forbidden members already reported (observe mode): each reported once.
    pub known_forbidden: HashSet<Member>,
    /// The set's creation options as last seen (`hashsize 1024 … timeout 0`): a destroyed set is
    /// recreated with them.
    pub seen_options: Option<Vec<String>>,
}

/// Every record, and the fights.
#[derive(Debug)]
pub struct Ledger {
    records: BTreeMap<String, Record>,
    contest: Contest<String>,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger::new(Backoff::default())
    }
}

impl Ledger {
    pub fn new(backoff: Backoff) -> Ledger {
        Ledger {
            records: BTreeMap::new(),
            contest: Contest::new(backoff),
        }
    }

    pub fn get(&self, name: &str) -> Option<&Record> {
        self.records.get(name)
    }

    fn record(&mut self, name: &str) -> &mut Record {
        self.records.entry(name.to_owned()).or_default()
    }

    /// Keeps the records (and fights) of the objects still protected.
    pub fn retain(&mut self, keep: impl Fn(&str) -> bool) {
        self.records.retain(|n, _| keep(n));
        self.contest.retain(|n| keep(n));
    }

    /// Remembers a drift as reported; true when it is news (not what was last said).
    pub fn report(&mut self, name: &str, text: &str) -> bool {
        let r = self.record(name);
        if r.reported.as_deref() == Some(text) {
            return false;
        }
        r.reported = Some(text.to_owned());
        true
    }

    /// The object is in sync; true when a drift had been reported (it is back).
    pub fn in_sync(&mut self, name: &str) -> bool {
        let Some(r) = self.records.get_mut(name) else {
            return false;
        };
        r.failing = None;
        r.retry_due = None;
        r.retry_delay = None;
        r.reported.take().is_some()
    }

    pub fn is_reported(&self, name: &str) -> bool {
        self.get(name).is_some_and(|r| r.reported.is_some())
    }

    /// Every record, by object name.
    pub fn records(&self) -> impl Iterator<Item = (&String, &Record)> {
        self.records.iter()
    }

    /// Number of objects with a drift reported.
    pub fn reported(&self) -> usize {
        self.records
            .values()
            .filter(|r| r.reported.is_some())
            .count()
    }

    pub fn give_up(&mut self, name: &str) {
        self.record(name).gave_up = true;
        self.contest.retain(|n| n != name);
    }

    pub fn gave_up(&self, name: &str) -> bool {
        self.get(name).is_some_and(|r| r.gave_up)
    }

    /// A reload re-affirms every chain: what was given up is repaired again. Returns the names.
    pub fn clear_give_ups(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        for (name, r) in &mut self.records {
            if std::mem::take(&mut r.gave_up) {
                r.reported = None;
                out.push(name.clone());
            }
        }
        out
    }

    /// Remembers a repair error; true when it differs from the last one (worth logging).
    pub fn failing(&mut self, name: &str, error: &str) -> bool {
        let r = self.record(name);
        if r.failing.as_deref() == Some(error) {
            return false;
        }
        r.failing = Some(error.to_owned());
        true
    }

    /// Is the set's text the same as at its last in-sync read?
    pub fn digest_unchanged(&self, name: &str, digest: Option<u64>) -> bool {
        digest.is_some() && self.get(name).and_then(|r| r.digest) == digest
    }

    pub fn set_digest(&mut self, name: &str, digest: Option<u64>) {
        match digest {
            Some(_) => self.record(name).digest = digest,
            None => {
                if let Some(r) = self.records.get_mut(name) {
                    r.digest = None;
                }
            }
        }
    }

    /// Forgets every set digest: the next read plans every set again.
    pub fn clear_digests(&mut self) {
        for r in self.records.values_mut() {
            r.digest = None;
        }
    }

    /// Of the forbidden members seen now, those not reported at the last poll (observe mode:
    /// a member that stays is reported once).
    pub fn new_forbidden(&mut self, name: &str, now: &[Member]) -> Vec<Member> {
        let r = self.record(name);
        let fresh = now
            .iter()
            .filter(|m| !r.known_forbidden.contains(m))
            .copied()
            .collect();
        r.known_forbidden = now.iter().copied().collect();
        fresh
    }

    pub fn no_forbidden(&mut self, name: &str) {
        if let Some(r) = self.records.get_mut(name) {
            r.known_forbidden.clear();
        }
    }

    pub fn seen_options(&self, name: &str) -> Option<&[String]> {
        self.get(name).and_then(|r| r.seen_options.as_deref())
    }

    pub fn set_seen_options(&mut self, name: &str, options: Vec<String>) {
        self.record(name).seen_options = Some(options);
    }

    /// An enforced chain was found drifted at `now`: repair now or hold back (contested).
    pub fn on_drift(&mut self, name: &str, now: Instant) -> Decision {
        self.contest.on_drift(&name.to_owned(), now)
    }

    /// A repair of the chain was applied at `now`.
    pub fn on_repaired(&mut self, name: &str, now: Instant) {
        self.contest.on_repaired(&name.to_owned(), now);
    }

    pub fn is_contested(&self, name: &str) -> bool {
        self.contest.is_contested(&name.to_owned())
    }

    /// Whether a drift now would be repaired at once ([`Contest::would_repair_now`]).
    pub fn would_repair_now(&self, name: &str, now: Instant) -> bool {
        self.contest.would_repair_now(&name.to_owned(), now)
    }

    pub fn is_held(&self, name: &str, now: Instant) -> bool {
        self.contest.is_held(&name.to_owned(), now)
    }

    pub fn set_fighter(&mut self, name: &str, actor: &str) {
        self.contest.set_fighter(&name.to_owned(), actor);
    }

    pub fn fighter(&self, name: &str) -> Option<&str> {
        self.contest.fighter(&name.to_owned())
    }

    /// The delay of a contested chain's held-back repairs.
    pub fn backoff(&self, name: &str) -> Option<Duration> {
        self.contest.current_delay(&name.to_owned())
    }

    /// The repair failed (a chain its rules jump to is gone, say): read it again and retry
    /// later, sooner the first times. Nothing else may come to wake the guard: the owner
    /// creating what was missing is not a change of a watched chain.
    pub fn retry_failed(&mut self, name: &str, now: Instant) {
        let r = self.record(name);
        let delay = r
            .retry_delay
            .map_or(RETRY_FIRST, |d| (d * 2).min(RETRY_MAX));
        r.retry_delay = Some(delay);
        r.retry_due = Some(now + delay);
    }

    /// Objects whose failed repair is to be retried now; each is returned once per failure.
    pub fn failed_due(&mut self, now: Instant) -> Vec<String> {
        let mut due = Vec::new();
        for (name, r) in &mut self.records {
            if r.retry_due.is_some_and(|t| t <= now) {
                r.retry_due = None;
                due.push(name.clone());
            }
        }
        due
    }

    /// When [`Ledger::poll`] or [`Ledger::failed_due`] has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let retries = self.records.values().filter_map(|r| r.retry_due);
        self.contest
            .next_deadline()
            .into_iter()
            .chain(retries)
            .min()
    }

    /// Chains whose held-back repair is due, and fights that stopped.
    pub fn poll(&mut self, now: Instant) -> (Vec<String>, Vec<Calmed<String>>) {
        self.contest.poll(now)
    }

    /// A due retry found nothing to repair.
    pub fn retry_done(&mut self, name: &str) {
        self.contest.retry_done(&name.to_owned());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn a_failed_repair_is_retried_later_each_time_and_no_more_once_in_sync() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        assert_eq!(l.next_deadline(), None);
        l.failing("x", "Chain 'CNI-DN-1' does not exist");
        l.retry_failed("x", t0);
        assert_eq!(l.next_deadline(), Some(t0 + RETRY_FIRST));
        assert!(l.failed_due(t0).is_empty(), "not yet");
        assert_eq!(l.failed_due(t0 + RETRY_FIRST), ["x"]);
        assert!(l.failed_due(t0 + RETRY_FIRST).is_empty(), "once");
        assert_eq!(l.next_deadline(), None);
        // Failed again: twice the wait, up to the longest.
        l.retry_failed("x", t0);
        assert_eq!(l.next_deadline(), Some(t0 + 2 * RETRY_FIRST));
        for _ in 0..10 {
            l.retry_failed("x", t0);
        }
        assert_eq!(l.next_deadline(), Some(t0 + RETRY_MAX));
        // Repaired: no retry, and the next failure starts over.
        l.in_sync("x");
        assert_eq!(l.next_deadline(), None);
        l.retry_failed("x", t0);
        assert_eq!(l.next_deadline(), Some(t0 + RETRY_FIRST));
    }

    #[test]
    fn reports_are_transitions() {
        let mut l = Ledger::default();
        assert!(l.report("a", "chain missing"));
        assert!(!l.report("a", "chain missing"), "said once");
        assert!(l.report("a", "1 rule(s) missing"), "a new drift is news");
        assert_eq!(l.reported(), 1);
        assert!(l.in_sync("a"), "back in sync after a report");
        assert!(!l.in_sync("a"));
        assert!(!l.in_sync("never-seen"));
    }

    #[test]
    fn a_fight_is_contested_not_given_up() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        // Flushed 1 ms after every repair until the repairs are held back.
        let mut t = t0;
        let mut repairs = 0;
        while let Decision::Now { .. } = l.on_drift("flannel", t) {
            l.on_repaired("flannel", t);
            repairs += 1;
            t += MS;
        }
        assert_eq!(repairs, 3, "the contest threshold");
        assert!(l.is_contested("flannel"));
        assert!(l.is_held("flannel", t));
        assert!(!l.gave_up("flannel"), "a fight never turns protection off");
        l.set_fighter("flannel", "iptables-nft");
        assert_eq!(l.fighter("flannel"), Some("iptables-nft"));
        // The fight stops: the held-back repair comes due (10 ms, well within the quiet period).
        let due = l.next_deadline().unwrap();
        assert_eq!(due, t + Duration::from_millis(10));
        let (retry, _) = l.poll(due);
        assert_eq!(retry, ["flannel".to_owned()]);
        assert_eq!(l.on_drift("flannel", due), Decision::Now { fresh: false });
    }

    #[test]
    fn give_up_lasts_until_a_reload_and_drops_the_fight() {
        let mut l = Ledger::default();
        let t0 = Instant::now();
        for i in 0..4u32 {
            if let Decision::Now { .. } = l.on_drift("x", t0 + MS * i) {
                l.on_repaired("x", t0 + MS * i);
            }
        }
        assert!(l.is_contested("x"));
        l.report("x", "1 rule(s) missing");
        l.give_up("x");
        assert!(l.gave_up("x"));
        assert!(!l.is_contested("x"), "given up: no retries scheduled");
        assert_eq!(l.clear_give_ups(), ["x".to_owned()]);
        assert!(!l.gave_up("x"));
        assert!(!l.is_reported("x"), "reported afresh if still drifted");
        assert!(l.clear_give_ups().is_empty());
    }

    #[test]
    fn failures_are_logged_when_they_change() {
        let mut l = Ledger::default();
        assert!(l.failing("x", "Set y doesn't exist"));
        assert!(!l.failing("x", "Set y doesn't exist"));
        assert!(l.failing("x", "something else"));
        l.report("x", "drift");
        l.in_sync("x");
        assert!(
            l.failing("x", "something else"),
            "a new failure after a recovery"
        );
    }

    #[test]
    fn set_bookkeeping() {
        let mut l = Ledger::default();
        assert!(!l.digest_unchanged("s", Some(1)));
        l.set_digest("s", Some(1));
        assert!(l.digest_unchanged("s", Some(1)));
        assert!(
            !l.digest_unchanged("s", None),
            "a missing set is never unchanged"
        );
        l.clear_digests();
        assert!(!l.digest_unchanged("s", Some(1)));
        let m = |s| Member::parse(s).unwrap();
        assert_eq!(l.new_forbidden("s", &[m("10.96.0.1")]), [m("10.96.0.1")]);
        assert!(l.new_forbidden("s", &[m("10.96.0.1")]).is_empty());
        assert_eq!(
            l.new_forbidden("s", &[m("10.96.0.1"), m("10.96.0.2")]),
            [m("10.96.0.2")]
        );
        l.set_seen_options("s", vec!["timeout".into(), "0".into()]);
        assert_eq!(
            l.seen_options("s"),
            Some(&["timeout".to_owned(), "0".to_owned()][..])
        );
        l.retain(|n| n != "s");
        assert_eq!(l.seen_options("s"), None);
    }
}
