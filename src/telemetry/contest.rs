//! Contested objects: an object removed again and again right after each repair is being fought
//! over by another process. Its repairs back off exponentially (10 ms doubling to 30 s) so that
//! the agent and the other process do not spin against each other, and it is reported as
//! contested until the fight stops. Pure: the caller passes the time and owns the timer (the loop
//! sleeps until [`Contest::next_deadline`] and then calls [`Contest::poll`]).
//!
//! A held-back repair does not wait out a long backoff once the fighting has stopped: it is done
//! when no contested object has been removed for [`Backoff::quiet`], or at its backoff time if
//! that comes first. While an object is held back it is absent, so its own fighter has nothing to
//! remove; what shows the fight going on is removals of contested objects (a fighter rarely goes
//! after just one). A fighter that removes only that one object is probed once per quiet period.

use crate::model::fast::HashMap;
use std::hash::Hash;
use std::time::{Duration, Instant};

/// The backoff schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay of the first held-back repair.
    pub initial: Duration,
    /// Longest delay.
    pub max: Duration,
    /// Removals in a row, each within `window` of the repair before it, that make an object
    /// contested. Below that, every removal is repaired at once.
    pub threshold: u32,
    /// A removal this soon after a repair continues a fight; an object not removed for this long
    /// after its last repair is calm again (back in sync).
    pub window: Duration,
    /// No contested object removed for this long: the fight looks over, held-back repairs are
    /// done now instead of at their backoff time.
    pub quiet: Duration,
}

impl Default for Backoff {
    fn default() -> Backoff {
        Backoff {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(30),
            threshold: 3,
            window: Duration::from_secs(2),
            quiet: Duration::from_secs(1),
        }
    }
}

impl Backoff {
    /// Delay at a level: `initial * 2^level`, capped at `max`.
    pub fn delay(&self, level: u32) -> Duration {
        let factor = 1u32.checked_shl(level.min(31)).unwrap_or(u32::MAX);
        self.initial.saturating_mul(factor).min(self.max)
    }
}

/// What to do with an object found drifted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Repair now. `fresh`: a new drift (false for a held-back repair whose time has come).
    Now { fresh: bool },
    /// Hold the repair back until `due`. `fresh`: a new drift (false while already waiting);
    /// `newly_contested`: this drift made the object contested.
    Later {
        due: Instant,
        fresh: bool,
        newly_contested: bool,
    },
}

#[derive(Clone, Debug, Default)]
struct Entry {
    /// Removals in a row, each soon after the repair before it.
    streak: u32,
    last_repair: Option<Instant>,
    /// A held-back repair.
    due: Option<Instant>,
    /// The held-back repair's time has come: the next drift of this object is that retry.
    retrying: bool,
    contested: bool,
    /// Who keeps removing it (the actor label), once known.
    fighter: Option<String>,
}

/// An object whose fight stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Calmed<K> {
    pub id: K,
    pub fighter: Option<String>,
}

/// Polls closer together than this are not asked for: the end of a fight need not be seen to the
/// millisecond, and after a mass repair thousands of objects would each ask for their own poll.
const MIN_POLL_GAP: Duration = Duration::from_millis(20);

/// When a held-back repair (its backoff time `due`) is done: at `due`, or once the fight has been
/// quiet (`quiet_end`: the last removal of a contested object plus the quiet period), if sooner.
fn effective_due(due: Option<Instant>, quiet_end: Option<Instant>) -> Option<Instant> {
    let due = due?;
    Some(quiet_end.map_or(due, |q| due.min(q)))
}

/// Per-object fight tracking.
#[derive(Clone, Debug)]
pub struct Contest<K> {
    backoff: Backoff,
    entries: HashMap<K, Entry>,
    /// No deadline of any entry is earlier than this (kept on every change, made exact by
    /// `poll`), so the loop can ask for the next deadline without walking every entry.
    next: Option<Instant>,
    last_poll: Option<Instant>,
    /// The last removal of a contested object: the fight's last sign of life.
    last_fight: Option<Instant>,
}

impl<K: Clone + Eq + Hash> Contest<K> {
    pub fn new(backoff: Backoff) -> Contest<K> {
        Contest {
            backoff,
            entries: HashMap::default(),
            next: None,
            last_poll: None,
            last_fight: None,
        }
    }

    pub fn backoff(&self) -> &Backoff {
        &self.backoff
    }

    /// An enforced object was found drifted at `now` and would be repaired.
    pub fn on_drift(&mut self, id: &K, now: Instant) -> Decision {
        let b = self.backoff;
        let quiet_end = self.last_fight.map(|t| t + b.quiet);
        let e = self.entries.entry(id.clone()).or_default();
        if let Some(due) = effective_due(e.due, quiet_end) {
            if due > now {
                return Decision::Later {
                    due,
                    fresh: false,
                    newly_contested: false,
                };
            }
            e.due = None;
            e.retrying = false;
            return Decision::Now { fresh: false };
        }
        if e.retrying {
            e.retrying = false;
            return Decision::Now { fresh: false };
        }
        let soon = e
            .last_repair
            .is_some_and(|t| now.saturating_duration_since(t) <= b.window);
        e.streak = if soon { e.streak + 1 } else { 0 };
        if e.streak < b.threshold {
            return Decision::Now { fresh: true };
        }
        let newly_contested = !e.contested;
        e.contested = true;
        // The backoff time; the quiet rule can only bring it forward.
        let backoff_due = now + b.delay(e.streak - b.threshold);
        e.due = Some(backoff_due);
        self.last_fight = Some(self.last_fight.map_or(now, |t| t.max(now)));
        let due = backoff_due.min(now + b.quiet);
        self.lower_next(due);
        Decision::Later {
            due,
            fresh: true,
            newly_contested,
        }
    }

    /// Whether [`Contest::on_drift`] at `now` would say [`Decision::Now`], without recording
    /// the drift. Stays true as time passes: only a drift makes it false.
    pub fn would_repair_now(&self, id: &K, now: Instant) -> bool {
        let Some(e) = self.entries.get(id) else {
            return true;
        };
        if let Some(due) = effective_due(e.due, self.quiet_end()) {
            return due <= now;
        }
        if e.retrying {
            return true;
        }
        let soon = e
            .last_repair
            .is_some_and(|t| now.saturating_duration_since(t) <= self.backoff.window);
        !soon || e.streak + 1 < self.backoff.threshold
    }

    /// The kernel accepted a repair of the object at `now`.
    pub fn on_repaired(&mut self, id: &K, now: Instant) {
        let e = self.entries.entry(id.clone()).or_default();
        e.last_repair = Some(now);
        e.retrying = false;
        self.lower_next(now + self.backoff.window);
    }

    fn lower_next(&mut self, at: Instant) {
        self.next = Some(self.next.map_or(at, |n| n.min(at)));
    }

    /// A planned retry found nothing to repair (someone else put the object back).
    pub fn retry_done(&mut self, id: &K) {
        if let Some(e) = self.entries.get_mut(id) {
            e.retrying = false;
        }
    }

    pub fn is_contested(&self, id: &K) -> bool {
        self.entries.get(id).is_some_and(|e| e.contested)
    }

    /// Whether a repair of the object is being held back at `now`.
    pub fn is_held(&self, id: &K, now: Instant) -> bool {
        self.entries
            .get(id)
            .and_then(|e| effective_due(e.due, self.quiet_end()))
            .is_some_and(|d| d > now)
    }

    fn quiet_end(&self) -> Option<Instant> {
        self.last_fight.map(|t| t + self.backoff.quiet)
    }

    /// Records who is fighting over a contested object.
    pub fn set_fighter(&mut self, id: &K, actor: &str) {
        if let Some(e) = self.entries.get_mut(id) {
            if e.contested {
                e.fighter = Some(actor.to_string());
            }
        }
    }

    pub fn fighter(&self, id: &K) -> Option<&str> {
        self.entries.get(id).and_then(|e| e.fighter.as_deref())
    }

    /// Current delay of a contested object's held-back repairs.
    pub fn current_delay(&self, id: &K) -> Option<Duration> {
        let e = self.entries.get(id)?;
        e.contested.then(|| {
            self.backoff
                .delay(e.streak.saturating_sub(self.backoff.threshold))
        })
    }

    /// The next time [`Contest::poll`] has something to do: a held-back repair comes due or a
    /// fight may be over.
    pub fn next_deadline(&self) -> Option<Instant> {
        let next = self.next?;
        Some(match self.last_poll {
            Some(p) => next.max(p + MIN_POLL_GAP),
            None => next,
        })
    }

    fn exact_next(&self) -> Option<Instant> {
        let quiet_end = self.quiet_end();
        self.entries
            .values()
            .filter_map(|e| match (effective_due(e.due, quiet_end), e.last_repair) {
                (Some(due), _) => Some(due),
                (None, Some(t)) => Some(t + self.backoff.window),
                (None, None) => None,
            })
            .min()
    }

    /// Returns the objects whose held-back repair is due (to re-plan now) and the contested
    /// objects whose fight stopped; forgets quiet objects.
    pub fn poll(&mut self, now: Instant) -> (Vec<K>, Vec<Calmed<K>>) {
        let window = self.backoff.window;
        let quiet_end = self.quiet_end();
        let mut due = Vec::new();
        let mut calmed = Vec::new();
        self.entries.retain(|id, e| {
            if let Some(d) = effective_due(e.due, quiet_end) {
                if d <= now {
                    e.due = None;
                    e.retrying = true;
                    due.push(id.clone());
                }
                return true;
            }
            let quiet = e
                .last_repair
                .is_none_or(|t| now.saturating_duration_since(t) >= window);
            if !quiet || e.retrying {
                return true;
            }
            if e.contested {
                calmed.push(Calmed {
                    id: id.clone(),
                    fighter: e.fighter.take(),
                });
            }
            false
        });
        self.last_poll = Some(now);
        self.next = self.exact_next();
        (due, calmed)
    }

    /// Forgets objects no longer protected (after a config change).
    pub fn retain(&mut self, mut keep: impl FnMut(&K) -> bool) {
        self.entries.retain(|id, _| keep(id));
    }

    pub fn contested(&self) -> impl Iterator<Item = (&K, Option<&str>)> {
        self.entries
            .iter()
            .filter(|(_, e)| e.contested)
            .map(|(id, e)| (id, e.fighter.as_deref()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn next_deadline_is_kept_without_walking_and_polls_are_spaced() {
        let mut c: Contest<u32> = Contest::new(Backoff::default());
        let t0 = Instant::now();
        assert_eq!(c.next_deadline(), None);
        for i in 0..1000u32 {
            c.on_repaired(&i, t0 + i * MS);
        }
        let window = c.backoff().window;
        assert_eq!(
            c.next_deadline(),
            Some(t0 + window),
            "the earliest repair's window"
        );
        // The first poll forgets object 0 only; the next one is asked for no sooner than 20 ms
        // later, although object 1's window ends 1 ms later.
        let (due, calmed) = c.poll(t0 + window);
        assert!(due.is_empty() && calmed.is_empty());
        assert_eq!(c.next_deadline(), Some(t0 + window + MIN_POLL_GAP));
        c.poll(t0 + window + MIN_POLL_GAP);
        // Objects 0..=20 are quiet now; the exact next is object 21's window, after the gap.
        assert_eq!(
            c.next_deadline(),
            Some((t0 + window + 21 * MS).max(t0 + window + 2 * MIN_POLL_GAP))
        );
    }

    #[test]
    fn schedule_doubles_from_10ms_to_a_30s_cap() {
        let b = Backoff::default();
        let delays: Vec<u128> = (0..14).map(|l| b.delay(l).as_millis()).collect();
        assert_eq!(
            delays,
            [10, 20, 40, 80, 160, 320, 640, 1280, 2560, 5120, 10240, 20480, 30000, 30000]
        );
        assert_eq!(b.delay(1000), b.max);
    }

    #[test]
    fn occasional_removals_are_repaired_at_once() {
        let mut c = Contest::new(Backoff::default());
        let mut t = Instant::now();
        for _ in 0..10 {
            assert_eq!(c.on_drift(&1, t), Decision::Now { fresh: true });
            c.on_repaired(&1, t);
            t += Duration::from_secs(5); // longer than the window
        }
        assert!(!c.is_contested(&1));
    }

    /// A fighter that removes the object 1 ms after every repair, for `secs` seconds, with the
    /// loop doing what the agent does. Returns the number of repairs.
    fn fight(c: &mut Contest<u32>, start: Instant, secs: u64) -> (u32, Instant) {
        let mut now = start;
        let end = start + Duration::from_secs(secs);
        let mut repairs = 0;
        let mut removed_at = Some(now);
        while now < end {
            if let Some(r) = removed_at.take() {
                now = r;
                let would = c.would_repair_now(&7, now);
                let decision = c.on_drift(&7, now);
                assert_eq!(
                    would,
                    matches!(decision, Decision::Now { .. }),
                    "{decision:?}"
                );
                match decision {
                    Decision::Now { .. } => {
                        repairs += 1;
                        c.on_repaired(&7, now);
                        removed_at = Some(now + MS);
                    }
                    Decision::Later { .. } => {}
                }
                continue;
            }
            // Nothing to do until the held-back repair: the loop sleeps until the deadline.
            now = c.next_deadline().unwrap();
            let (due, _) = c.poll(now);
            if due.contains(&7) {
                assert!(c.would_repair_now(&7, now));
                assert_eq!(c.on_drift(&7, now), Decision::Now { fresh: false });
                repairs += 1;
                c.on_repaired(&7, now);
                removed_at = Some(now + MS);
            }
        }
        (repairs, now)
    }

    #[test]
    fn would_repair_now_says_what_on_drift_decides_without_counting() {
        let mut c = Contest::new(Backoff::default());
        let t0 = Instant::now();
        assert!(c.would_repair_now(&7, t0), "never seen");
        // Asking does not count: as many asks as wanted, the fight starts at the same drift.
        for _ in 0..100 {
            assert!(c.would_repair_now(&7, t0));
        }
        let (repairs, end) = fight(&mut c, t0, 3);
        assert!(repairs > 3 && c.is_contested(&7));
        // Held back now; true again once the held-back repair is due (time alone).
        let due = c.next_deadline().unwrap();
        assert!(!c.would_repair_now(&7, end.min(due - MS)));
        assert!(c.would_repair_now(&7, due.max(end)));
    }

    #[test]
    fn a_fight_backs_off_and_calms_down() {
        let mut c = Contest::new(Backoff::default());
        let start = Instant::now();
        let (repairs, end) = fight(&mut c, start, 3);
        assert!(c.is_contested(&7));
        // 3 at once, then 10, 20, 40 … ms apart: about a dozen in 3 s instead of thousands.
        assert!((8..=15).contains(&repairs), "repairs in 3 s: {repairs}");
        c.set_fighter(&7, "fighter");
        assert_eq!(c.fighter(&7), Some("fighter"));
        // The fighter stops: the next held-back repair goes through and nothing removes it.
        let mut now = end;
        let mut calmed = Vec::new();
        for _ in 0..10 {
            now = c.next_deadline().unwrap();
            let (due, calm) = c.poll(now);
            if due.contains(&7) {
                assert_eq!(c.on_drift(&7, now), Decision::Now { fresh: false });
                c.on_repaired(&7, now);
            }
            calmed.extend(calm);
            if !calmed.is_empty() {
                break;
            }
        }
        assert_eq!(
            calmed,
            [Calmed {
                id: 7,
                fighter: Some("fighter".into())
            }]
        );
        assert!(!c.is_contested(&7));
        assert!(now - end < Duration::from_secs(10));
        assert_eq!(c.next_deadline(), None, "a calm object is forgotten");
    }

    /// Drives object `id` into a fight at level `level` (its next hold-back is `delay(level)`):
    /// removed right after each of `threshold + level` repairs, 1 ms apart from `t0`.
    fn contested_at(c: &mut Contest<u32>, id: u32, t0: Instant, level: u32) -> Instant {
        let mut t = t0;
        for _ in 0..c.backoff().threshold + level {
            if let Decision::Now { .. } = c.on_drift(&id, t) {
                c.on_repaired(&id, t);
            }
            // A held-back repair: pretend it came due and went through.
            if c.is_held(&id, t) {
                c.entries.get_mut(&id).unwrap().due = None;
                c.on_repaired(&id, t);
            }
            t += MS;
        }
        t
    }

    #[test]
    fn after_the_fight_stops_a_long_hold_back_ends_after_the_quiet_period() {
        let b = Backoff::default();
        let mut c = Contest::new(b);
        let t0 = Instant::now();
        // Level 12: the backoff alone would hold the next repair back 30 s.
        let t = contested_at(&mut c, 1, t0, 12);
        assert_eq!(b.delay(12), Duration::from_secs(30));
        let Decision::Later { due, .. } = c.on_drift(&1, t) else {
            panic!("expected a held-back repair")
        };
        // Nobody removes anything any more: the repair is done one quiet period later.
        assert_eq!(due, t + b.quiet);
        assert!(c.is_held(&1, t + b.quiet - MS));
        assert!(!c.is_held(&1, t + b.quiet));
        assert!(c.poll(t + b.quiet - MS).0.is_empty());
        let (retry, _) = c.poll(t + b.quiet);
        assert_eq!(retry, [1]);
        assert_eq!(c.on_drift(&1, t + b.quiet), Decision::Now { fresh: false });
    }

    #[test]
    fn while_contested_objects_keep_being_removed_hold_backs_run_their_course() {
        let b = Backoff::default();
        let mut c = Contest::new(b);
        let t0 = Instant::now();
        // Object 1 held back for 5.12 s (level 9).
        let t = contested_at(&mut c, 1, t0, 9);
        let Decision::Later { due, .. } = c.on_drift(&1, t) else {
            panic!("expected a held-back repair")
        };
        assert_eq!(
            due,
            t + b.quiet,
            "alone, the fight would look over after the quiet period"
        );
        // Object 2 is fought over too: each of its (held-back) repairs is removed again 1 ms
        // later, every 300 ms for 4 s.
        let mut now = contested_at(&mut c, 2, t, 0);
        let fight_ends = t + Duration::from_secs(4);
        while now < fight_ends {
            c.entries.get_mut(&2).unwrap().due = None;
            c.on_repaired(&2, now - MS);
            assert!(matches!(
                c.on_drift(&2, now),
                Decision::Later { fresh: true, .. }
            ));
            let (retry, _) = c.poll(now);
            assert!(!retry.contains(&1), "object 1 released during the fight");
            assert!(c.is_held(&1, now), "object 1 released during the fight");
            now += Duration::from_millis(300);
        }
        // The last removal of object 2 was before `now`; object 1 comes due one quiet period
        // after it, well before its 5.12 s backoff.
        let last_fight = c.last_fight.unwrap();
        assert!(last_fight > t + Duration::from_secs(3));
        assert!(!c.is_held(&1, last_fight + b.quiet));
        assert!(last_fight + b.quiet < t + b.delay(9));
        let (retry, _) = c.poll(last_fight + b.quiet);
        assert!(retry.contains(&1));
    }

    #[test]
    fn drift_while_held_back_is_not_fresh_and_keeps_the_due_time() {
        let mut c = Contest::new(Backoff::default());
        let t0 = Instant::now();
        for i in 0..3 {
            let t = t0 + MS * i;
            assert!(matches!(c.on_drift(&1, t), Decision::Now { fresh: true }));
            c.on_repaired(&1, t);
        }
        let t = t0 + MS * 3;
        let Decision::Later {
            due,
            fresh: true,
            newly_contested: true,
        } = c.on_drift(&1, t)
        else {
            panic!("expected a held-back repair")
        };
        assert_eq!(due, t + Duration::from_millis(10));
        assert!(c.is_held(&1, t));
        assert_eq!(
            c.on_drift(&1, t + MS),
            Decision::Later {
                due,
                fresh: false,
                newly_contested: false
            }
        );
        // Another object is not affected.
        assert_eq!(c.on_drift(&2, t + MS), Decision::Now { fresh: true });
        assert_eq!(c.next_deadline(), Some(due));
    }

    #[test]
    fn a_retry_that_finds_the_object_back_does_not_spin() {
        let mut c = Contest::new(Backoff::default());
        let t0 = Instant::now();
        for i in 0..4 {
            let t = t0 + MS * i;
            if let Decision::Now { .. } = c.on_drift(&1, t) {
                c.on_repaired(&1, t);
            }
        }
        let due = c.next_deadline().unwrap();
        let (retry, _) = c.poll(due);
        assert_eq!(retry, [1]);
        c.retry_done(&1);
        // No held-back repair any more: the next deadline is the calm check, not `due` again.
        assert!(c.next_deadline().unwrap() > due);
    }
}
