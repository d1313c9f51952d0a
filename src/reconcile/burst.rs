//! When to repair a burst of removals: as it goes, or once it has settled. Pure timing logic, no
//! I/O.
//!
//! Deleting tools work in passes. `ip route flush` dumps the table and deletes what it finds,
//! then dumps again, and stops only when a dump comes back empty. So a route put back while the
//! flush is still running is found by its next pass and deleted again: each such repair is wasted
//! work for the agent, for the flushing process and for every other listener on the node, and it
//! makes the flush itself take longer. `cargo bench --bench repair` measures what holding the
//! repair until the burst settles saves (docs/benchmarks.md, "Everything at once").
//!
//! A single removal, or a few, is still repaired at once: only when one batch of events holds at
//! least [`BURST_MIN`] removals of protected objects does the agent keep reading events until the
//! burst has settled, then plans once for everything the burst touched. Settled is decided by
//! what the deleters do, not by how fast the node runs them: no protected object removed for
//! [`QUIET`] *and* every process that removed them has closed its netlink socket (`ip` has
//! exited), looked up in /proc/net/netlink. A deleter that keeps its socket (a daemon) is taken to
//! be done after [`QUIET_OPEN`] without a removal; a busy node may leave a running `ip` unscheduled
//! for longer than [`QUIET`], not for that long. The hold ends early when an object is removed a
//! second time within it (someone else puts the objects back: holding saves nothing), and at
//! [`HOLD_MAX`] in any case.
//!
//! Not every deleter runs in passes. systemd-networkd marks the foreign rules and routes once
//! when it (re)configures a link and deletes each of them once, one request at a time (tens of
//! milliseconds for a few thousand): an object put back meanwhile is a new foreign object to it,
//! not deleted again until its next (re)configuration. Holding its burst kept the first objects it
//! deleted away for its whole flush. So [`Pacer`] tells the two apart: a burst whose removals all
//! come from a deleter known to delete once ([`ONE_PASS`]) is repaired as it goes, unless an
//! object the agent put back during it is removed again, which shows passes after all; everything
//! else is held as above.

use crate::model::fast::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// Protected objects removed in one batch of events that make it a burst.
pub const BURST_MIN: usize = 64;
/// A burst has settled once no protected object was removed for this long and every deleter has
/// closed its netlink socket.
pub const QUIET: Duration = Duration::from_millis(5);
/// A burst whose deleter still holds its netlink socket has settled once no protected object was
/// removed for this long: a daemon that keeps its socket may be done. Longer than a busy node
/// leaves a runnable process waiting for a CPU, so that a flush still running is not taken for a
/// finished one (a wait of [`QUIET`] was, under load: the repair then raced the flush's passes).
pub const QUIET_OPEN: Duration = Duration::from_millis(50);
/// The longest a burst holds its repair back, from the first event of the batch. A held burst
/// removes each protected object at most once (nothing puts them back meanwhile; a second
/// removal ends the hold), so it ends by itself; this bound only caps a deleter that removes
/// thousands of objects slowly. Far above what a flush of a few thousand takes on a busy node:
/// 250 ms, the bound before, was reached by `ip route flush` of 3,000 routes under load.
pub const HOLD_MAX: Duration = Duration::from_secs(2);

/// Process names (as the kernel reports them) of deleters that delete each object once per
/// run: a burst of theirs is repaired as it goes.
pub const ONE_PASS: &[&str] = &["systemd-network"];

/// How long an object put back during a burst repaired as it goes is watched for a second
/// removal (a deleter in passes comes back to it within its own run).
pub const REDELETION_WATCH: Duration = Duration::from_secs(1);

/// How a burst is repaired.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Pace {
    /// Once it has settled (or at [`HOLD_MAX`]).
    #[default]
    Held,
    /// Batch by batch, as the events arrive.
    AsItGoes,
}

impl Pace {
    pub fn as_str(self) -> &'static str {
        match self {
            Pace::Held => "held",
            Pace::AsItGoes => "as_it_goes",
        }
    }
}

/// Who removed the objects of a burst: a process name per netlink port, or nothing known
/// (`None`: the process was gone, or processes cannot be looked up).
pub type Deleters<'a> = &'a [Option<&'a str>];

/// Decides a burst's pace. A deleter that could not be named is treated as one that runs in
/// passes: holding costs only time, repairing in the middle of a flush costs the work twice.
pub fn pace(deleters: Deleters<'_>, deleted_again: bool) -> Pace {
    let one_pass = |d: &Option<&str>| d.is_some_and(|n| ONE_PASS.contains(&n));
    if !deleted_again && !deleters.is_empty() && deleters.iter().all(one_pass) {
        Pace::AsItGoes
    } else {
        Pace::Held
    }
}

/// What a burst repaired as it goes needs across batches: the objects put back, to see them
/// deleted again; and the names of the deleters, looked up once per netlink port.
#[derive(Clone, Debug)]
pub struct Pacer<K> {
    repaired: HashMap<K, Instant>,
    names: HashMap<u32, (Option<String>, Instant)>,
}

impl<K: Clone + Eq + Hash> Default for Pacer<K> {
    fn default() -> Self {
        Pacer {
            repaired: HashMap::default(),
            names: HashMap::default(),
        }
    }
}

impl<K: Clone + Eq + Hash> Pacer<K> {
    /// The ports among `ports` whose process is not known yet (to look up, then [`Pacer::learn`]).
    pub fn unnamed(&self, ports: &[u32]) -> Vec<u32> {
        ports
            .iter()
            .filter(|p| !self.names.contains_key(p))
            .copied()
            .collect()
    }

    /// Remembers the process behind a port (`None`: unknown) as of `now`.
    pub fn learn(&mut self, port: u32, name: Option<String>, now: Instant) {
        self.names.insert(port, (name, now));
    }

    /// The pace of a burst whose removals so far came from `ports` and removed `removed`.
    pub fn pace<'a>(
        &self,
        ports: &[u32],
        removed: impl IntoIterator<Item = &'a K>,
        now: Instant,
    ) -> Pace
    where
        K: 'a,
    {
        let deleted_again = removed.into_iter().any(|k| {
            self.repaired
                .get(k)
                .is_some_and(|t| now.saturating_duration_since(*t) < REDELETION_WATCH)
        });
        let names: Vec<Option<&str>> = ports
            .iter()
            .map(|p| self.names.get(p).and_then(|(n, _)| n.as_deref()))
            .collect();
        pace(&names, deleted_again)
    }

    /// Objects put back by a repair of a burst that goes as it goes, at `now`.
    pub fn repaired<'a>(&mut self, ids: impl IntoIterator<Item = &'a K>, now: Instant)
    where
        K: 'a,
    {
        for id in ids {
            self.repaired.insert(id.clone(), now);
        }
    }

    /// Forgets what is older than the watch (names too: a port may be another process's later).
    pub fn prune(&mut self, now: Instant) {
        let fresh = |t: &Instant| now.saturating_duration_since(*t) < REDELETION_WATCH;
        self.repaired.retain(|_, t| fresh(t));
        self.names.retain(|_, (_, t)| fresh(t));
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.repaired.is_empty() && self.names.is_empty()
    }
}

/// What to do next while reading one batch (see [`Settle::step`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// Plan now: not a held burst, or it has settled.
    Plan,
    /// Wait this long for more events, then ask again.
    Wait(Duration),
    /// Quiet long enough: look whether a deleter still holds its netlink socket
    /// ([`Settle::looked`]), then ask again.
    Look,
}

/// Whether to keep reading events before planning, for one batch.
#[derive(Clone, Debug)]
pub struct Settle {
    started: Instant,
    removals: usize,
    last_removal: Instant,
    pace: Pace,
    /// The last look at the deleters' sockets since the last removal: when, and whether one was
    /// still open.
    looked: Option<(Instant, bool)>,
    /// An object was removed twice within the batch: someone puts them back.
    removed_again: bool,
}

impl Settle {
    /// A batch whose first event was taken at `started`.
    pub fn new(started: Instant) -> Settle {
        Settle {
            started,
            removals: 0,
            last_removal: started,
            pace: Pace::Held,
            looked: None,
            removed_again: false,
        }
    }

    /// Sets how the burst is repaired (held by default).
    pub fn set_pace(&mut self, pace: Pace) {
        self.pace = pace;
    }

    pub fn pace(&self) -> Pace {
        self.pace
    }

    /// Whether this batch is a burst whose repair waits for it to settle.
    pub fn holds(&self) -> bool {
        self.is_burst() && self.pace == Pace::Held && !self.removed_again
    }

    /// The batch has seen `removals` protected objects removed so far (a running total), the
    /// latest of them noticed by `now`.
    pub fn seen(&mut self, removals: usize, now: Instant) {
        if removals > self.removals {
            self.removals = removals;
            self.last_removal = now;
            // A removal since: the deleters may be others, or still at it.
            self.looked = None;
        }
    }

    /// An object already removed in this batch was removed again: it was put back meanwhile by
    /// someone else, so holding the repair saves nothing.
    pub fn removed_again(&mut self) {
        self.removed_again = true;
    }

    /// The deleters' sockets as seen at `now`: whether one of them is still open.
    pub fn looked(&mut self, open: bool, now: Instant) {
        self.looked = Some((now, open));
    }

    /// Whether this batch is a burst.
    pub fn is_burst(&self) -> bool {
        self.removals >= BURST_MIN
    }

    /// What to do next at `now`: plan, wait for more events, or look at the deleters' sockets.
    pub fn step(&self, now: Instant) -> Step {
        let end = self.started + HOLD_MAX;
        if !self.holds() || now >= end {
            return Step::Plan;
        }
        let wait = |until: Instant| Step::Wait(until.min(end).saturating_duration_since(now));
        let quiet = self.last_removal + QUIET;
        if now < quiet {
            return wait(quiet);
        }
        match self.looked {
            None => Step::Look,
            Some((_, false)) => Step::Plan,
            Some((at, true)) => {
                let give_up = self.last_removal + QUIET_OPEN;
                let again = at + QUIET;
                if now >= give_up {
                    Step::Plan
                } else if now >= again {
                    Step::Look
                } else {
                    wait(again.min(give_up))
                }
            }
        }
    }

    /// Whether the batch may still be held at `now`: before [`HOLD_MAX`] from its start.
    pub fn may_hold(&self, now: Instant) -> bool {
        now < self.started + HOLD_MAX
    }

    /// How long the repair has been held back beyond the batch's first event.
    pub fn held(&self, now: Instant) -> Duration {
        now.saturating_duration_since(self.started)
    }

    pub fn removals(&self) -> usize {
        self.removals
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_few_removals_are_repaired_at_once() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN - 1, t0);
        assert!(!s.is_burst());
        assert_eq!(s.step(t0), Step::Plan);
    }

    #[test]
    fn a_burst_waits_until_removals_stop_for_the_quiet_time() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN, t0 + ms(1));
        assert_eq!(s.step(t0 + ms(1)), Step::Wait(QUIET));
        assert_eq!(s.step(t0 + ms(3)), Step::Wait(QUIET - ms(2)));
        // More removals push the end out again.
        s.seen(BURST_MIN + 10, t0 + ms(4));
        assert_eq!(s.step(t0 + ms(5)), Step::Wait(QUIET - ms(1)));
        // The same total again is not a new removal.
        s.seen(BURST_MIN + 10, t0 + ms(8));
        let quiet = t0 + ms(4) + QUIET;
        assert_eq!(s.step(quiet), Step::Look, "quiet: are the deleters done?");
        s.looked(false, quiet);
        assert_eq!(
            s.step(quiet),
            Step::Plan,
            "every deleter's socket is closed"
        );
        assert_eq!(s.removals(), BURST_MIN + 10);
    }

    /// The flush that failed under load: `ip` not scheduled for longer than QUIET, then on with
    /// its deletions. Its socket is still open, so the burst has not settled.
    #[test]
    fn a_deleter_that_still_holds_its_socket_is_waited_for_not_timed_out() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN, t0);
        let mut now = t0 + QUIET;
        assert_eq!(s.step(now), Step::Look);
        s.looked(true, now);
        // Looked at again every QUIET while it stays quiet, up to QUIET_OPEN.
        assert_eq!(s.step(now), Step::Wait(QUIET));
        now += QUIET;
        assert_eq!(s.step(now), Step::Look);
        s.looked(true, now);
        // It goes on deleting (a preempted flush) well past the old 250 ms bound.
        let mut total = BURST_MIN;
        while now < t0 + ms(900) {
            now += QUIET_OPEN - ms(1);
            total += 100;
            s.seen(total, now);
            assert_eq!(
                s.step(now),
                Step::Wait(QUIET),
                "still flushing at {:?}",
                now - t0
            );
        }
        // It exits: settled a QUIET after its last deletion.
        now += QUIET;
        assert_eq!(s.step(now), Step::Look);
        s.looked(false, now);
        assert_eq!(s.step(now), Step::Plan);
        assert!(s.held(now) > ms(900));
    }

    #[test]
    fn a_deleter_that_keeps_its_socket_is_done_after_quiet_open() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN, t0);
        let mut now = t0 + QUIET;
        let mut looks = 0;
        loop {
            match s.step(now) {
                Step::Look => {
                    looks += 1;
                    s.looked(true, now);
                }
                Step::Wait(d) => now += d,
                Step::Plan => break,
            }
        }
        assert_eq!(now, t0 + QUIET_OPEN);
        assert_eq!(
            looks,
            (QUIET_OPEN.as_millis() / QUIET.as_millis()) as usize - 1
        );
    }

    #[test]
    fn a_burst_whose_objects_are_put_back_and_removed_again_is_not_held() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN * 2, t0);
        assert!(s.holds());
        s.removed_again();
        assert!(!s.holds());
        assert_eq!(s.step(t0), Step::Plan);
    }

    #[test]
    fn a_burst_repaired_as_it_goes_does_not_wait() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN * 3, t0);
        s.set_pace(Pace::AsItGoes);
        assert!(s.is_burst());
        assert!(!s.holds());
        assert_eq!(s.step(t0), Step::Plan);
    }

    #[test]
    fn networkd_is_repaired_as_it_goes_everyone_else_is_held() {
        assert_eq!(pace(&[Some("systemd-network")], false), Pace::AsItGoes);
        assert_eq!(pace(&[Some("ip")], false), Pace::Held);
        assert_eq!(pace(&[None], false), Pace::Held, "unknown deleter");
        assert_eq!(pace(&[], false), Pace::Held);
        assert_eq!(
            pace(&[Some("systemd-network"), Some("ip")], false),
            Pace::Held,
            "networkd and a flush at once"
        );
        assert_eq!(
            pace(&[Some("systemd-network")], true),
            Pace::Held,
            "an object put back was deleted again: passes after all"
        );
    }

    #[test]
    fn the_pacer_sees_objects_deleted_again_within_the_watch() {
        let t0 = Instant::now();
        let mut p: Pacer<u32> = Pacer::default();
        assert_eq!(p.unnamed(&[10, 11]), [10, 11]);
        p.learn(10, Some("systemd-network".into()), t0);
        p.learn(11, None, t0);
        assert!(p.unnamed(&[10, 11]).is_empty());
        assert_eq!(p.pace(&[10], &[1, 2], t0), Pace::AsItGoes);
        assert_eq!(
            p.pace(&[10, 11], &[1], t0),
            Pace::Held,
            "one deleter unknown"
        );
        p.repaired(&[1, 2], t0 + ms(1));
        assert_eq!(p.pace(&[10], &[3], t0 + ms(2)), Pace::AsItGoes);
        assert_eq!(
            p.pace(&[10], &[3, 2], t0 + ms(2)),
            Pace::Held,
            "2 deleted again"
        );
        // Long after: another run, not a second pass.
        let later = t0 + ms(1) + REDELETION_WATCH;
        assert_eq!(p.pace(&[10], &[2], later), Pace::AsItGoes);
        p.prune(later);
        assert!(p.is_empty(), "names are forgotten too");
        assert_eq!(p.unnamed(&[10]), [10]);
    }

    #[test]
    fn a_burst_that_never_stops_is_held_at_most_hold_max() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        let mut now = t0;
        let mut total = 0;
        while now < t0 + HOLD_MAX + ms(50) {
            total += BURST_MIN;
            s.seen(total, now);
            let step = s.step(now);
            if now >= t0 + HOLD_MAX {
                assert_eq!(step, Step::Plan, "still holding at {:?}", now - t0);
                assert!(!s.may_hold(now));
            } else {
                assert!(matches!(step, Step::Wait(d) if d <= t0 + HOLD_MAX - now));
                assert!(s.may_hold(now));
            }
            now += ms(1);
        }
        // Quiet just before the bound, deleter still there: the bound wins.
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN, t0 + HOLD_MAX - ms(1));
        assert_eq!(s.step(t0 + HOLD_MAX - ms(1)), Step::Wait(ms(1)));
        assert_eq!(s.step(t0 + HOLD_MAX), Step::Plan);
    }
}
