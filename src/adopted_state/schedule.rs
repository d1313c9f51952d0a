//! When the adopted-state file is written. Pure (the writer thread passes the clock in).
//!
//! An owner such as kube-proxy changes its objects at every Service or Endpoint change, on a big
//! cluster many times a second, and every change it makes is followed and saved. Writing the
//! whole file (JSON, fsync, rename) at each one would cost the node a disk write per change.
//! So: a change after a quiet spell is written at once; changes that keep coming are written
//! together at most once per interval, the newest state at the end of it, so that none is lost.
//! A stop (or flush) writes what is pending at once.

use std::time::{Duration, Instant};

/// How often, at most, the file is written while changes keep coming.
pub const INTERVAL: Duration = Duration::from_secs(1);

/// What the writer does next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// Nothing to write: wait for a change.
    Idle,
    /// Write now.
    Now,
    /// Write at this moment (unless told to hurry meanwhile).
    At(Instant),
}

#[derive(Clone, Debug)]
pub struct Schedule {
    interval: Duration,
    /// A change not written yet (or whose write failed).
    dirty: bool,
    /// When the last write began.
    last: Option<Instant>,
    /// Dirty only because the last write failed: not hurried (a flush would retry in a loop).
    retry_only: bool,
}

impl Schedule {
    pub fn new(interval: Duration) -> Schedule {
        Schedule {
            interval,
            dirty: false,
            last: None,
            retry_only: false,
        }
    }

    /// Something was handed over to be saved.
    pub fn changed(&mut self) {
        self.dirty = true;
        self.retry_only = false;
    }

    /// What to do at `now`; `hurry`: a stop or flush wants what is pending written at once.
    pub fn next(&self, now: Instant, hurry: bool) -> Next {
        if !self.dirty {
            return Next::Idle;
        }
        let hurry = hurry && !self.retry_only;
        match self.last.map(|l| l + self.interval) {
            Some(due) if !hurry && now < due => Next::At(due),
            _ => Next::Now,
        }
    }

    /// A write of everything handed over so far begins at `now`.
    pub fn writing(&mut self, now: Instant) {
        self.dirty = false;
        self.retry_only = false;
        self.last = Some(now);
    }

    /// The write did not reach the disk: tried again an interval after it began (not at once:
    /// a full disk would otherwise be written in a loop).
    pub fn failed(&mut self) {
        // A change handed over during the write is not a retry.
        self.retry_only = !self.dirty;
        self.dirty = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn nothing_changed_nothing_written() {
        let s = Schedule::new(S);
        assert_eq!(s.next(Instant::now(), false), Next::Idle);
        assert_eq!(
            s.next(Instant::now(), true),
            Next::Idle,
            "a flush of nothing"
        );
    }

    #[test]
    fn a_change_after_a_quiet_spell_is_written_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        s.changed();
        assert_eq!(s.next(t0, false), Next::Now, "the first");
        s.writing(t0);
        assert_eq!(s.next(t0, false), Next::Idle);
        s.changed();
        let later = t0 + Duration::from_secs(5);
        assert_eq!(s.next(later, false), Next::Now, "long after the last write");
    }

    #[test]
    fn changes_that_keep_coming_are_written_once_per_interval_the_newest_last() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        s.changed();
        s.writing(t0);
        // Ten changes within the interval: held until its end, then one write of them all.
        let mut writes = 0;
        for i in 1..=10u32 {
            let now = t0 + Duration::from_millis(90) * i;
            s.changed();
            match s.next(now, false) {
                Next::At(due) => assert_eq!(due, t0 + S),
                Next::Now => writes += 1,
                Next::Idle => panic!("change {i} dropped"),
            }
        }
        assert_eq!(writes, 0, "none before the interval ends");
        assert_eq!(s.next(t0 + S, false), Next::Now, "the newest, at its end");
        s.writing(t0 + S);
        assert_eq!(s.next(t0 + S, false), Next::Idle);
        // A change during that write (after it took the state) waits for the next interval.
        s.changed();
        assert_eq!(
            s.next(t0 + S + Duration::from_millis(1), false),
            Next::At(t0 + 2 * S)
        );
    }

    #[test]
    fn a_stop_writes_what_is_pending_at_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        s.changed();
        s.writing(t0);
        s.changed();
        let now = t0 + Duration::from_millis(10);
        assert_eq!(s.next(now, false), Next::At(t0 + S));
        assert_eq!(s.next(now, true), Next::Now);
    }

    #[test]
    fn a_failed_write_is_tried_again_an_interval_later() {
        let t0 = Instant::now();
        let mut s = Schedule::new(S);
        s.changed();
        s.writing(t0);
        s.failed();
        assert_eq!(
            s.next(t0 + Duration::from_millis(5), false),
            Next::At(t0 + S)
        );
        assert_eq!(s.next(t0 + S, false), Next::Now, "not given up");
        // A flush does not hurry a retry (it would write a failing disk in a loop)…
        let soon = t0 + Duration::from_millis(5);
        assert_eq!(s.next(soon, true), Next::At(t0 + S));
        // …but does hurry a change made since.
        s.changed();
        assert_eq!(s.next(soon, true), Next::Now);
        // A change handed over during a write that fails is hurried too.
        s.writing(soon);
        s.changed();
        s.failed();
        assert_eq!(s.next(soon, true), Next::Now);
    }
}
