//! When to repair a burst of removals: once it has settled. Pure timing logic, no I/O.
//!
//! Deleting tools work in passes. `ip route flush` dumps the table and deletes what it finds,
//! then dumps again, and stops only when a dump comes back empty. So a route put back while the
//! flush is still running is found by its next pass and deleted again: each such repair is wasted
//! work for the agent, for the flushing process and for every other listener on the node, and it
//! makes the flush itself take longer. Measured with 11,000 objects (`cargo bench --bench repair`),
//! repairing during the flush meant 12–16k deletions instead of 11k and all objects back after
//! 1.7–2.7× the time `ip -batch` takes to add them; holding the repair until the burst settles
//! brought that to about 1.2×.
//!
//! A single removal, or a few, is still repaired at once: only when one batch of events holds at
//! least [`BURST_MIN`] removals of protected objects does the agent keep reading events, until no
//! protected object has been removed for [`QUIET`], or [`HOLD_MAX`] after the batch began, then
//! plans once for everything the burst touched.

use std::time::{Duration, Instant};

/// Protected objects removed in one batch of events that make it a burst.
pub const BURST_MIN: usize = 64;
/// A burst has settled once no protected object was removed for this long. Longer than the
/// gaps inside a flush on a busy node (a few ms when the flushing process is preempted).
pub const QUIET: Duration = Duration::from_millis(5);
/// The longest a burst holds its repair back, from the first event of the batch: a deleter that
/// never stops does not keep the objects it removed away for longer than this.
pub const HOLD_MAX: Duration = Duration::from_millis(250);

/// Whether to keep reading events before planning, for one batch.
#[derive(Clone, Debug)]
pub struct Settle {
    started: Instant,
    removals: usize,
    last_removal: Instant,
}

impl Settle {
    /// A batch whose first event was taken at `started`.
    pub fn new(started: Instant) -> Settle {
        Settle {
            started,
            removals: 0,
            last_removal: started,
        }
    }

    /// The batch has seen `removals` protected objects removed so far (a running total), the
    /// latest of them noticed by `now`.
    pub fn seen(&mut self, removals: usize, now: Instant) {
        if removals > self.removals {
            self.removals = removals;
            self.last_removal = now;
        }
    }

    /// Whether this batch is a burst.
    pub fn is_burst(&self) -> bool {
        self.removals >= BURST_MIN
    }

    /// How long to wait for more events before planning; `None`: plan now.
    pub fn wait(&self, now: Instant) -> Option<Duration> {
        if !self.is_burst() {
            return None;
        }
        let until = (self.last_removal + QUIET).min(self.started + HOLD_MAX);
        until.checked_duration_since(now).filter(|d| !d.is_zero())
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
        assert_eq!(s.wait(t0), None);
    }

    #[test]
    fn a_burst_waits_until_removals_stop_for_the_quiet_time() {
        let t0 = Instant::now();
        let mut s = Settle::new(t0);
        s.seen(BURST_MIN, t0 + ms(1));
        assert_eq!(s.wait(t0 + ms(1)), Some(QUIET));
        assert_eq!(s.wait(t0 + ms(3)), Some(QUIET - ms(2)));
        // More removals push the end out again.
        s.seen(BURST_MIN + 10, t0 + ms(4));
        assert_eq!(s.wait(t0 + ms(5)), Some(QUIET - ms(1)));
        // The same total again is not a new removal.
        s.seen(BURST_MIN + 10, t0 + ms(8));
        assert_eq!(s.wait(t0 + ms(4) + QUIET), None);
        assert_eq!(s.removals(), BURST_MIN + 10);
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
            let left = s.wait(now);
            if now >= t0 + HOLD_MAX {
                assert_eq!(left, None, "still holding at {:?}", now - t0);
                assert!(!s.may_hold(now));
            } else {
                assert!(left.unwrap() <= t0 + HOLD_MAX - now);
                assert!(s.may_hold(now));
            }
            now += ms(1);
        }
        assert!(s.held(now) > HOLD_MAX);
    }
}
