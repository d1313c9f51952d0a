//! The `NetworkStateProtected` Node condition, as node-problem-detector sets its own: `False`
//! with a reason and a message when protection has been failing for longer than a configured
//! time, `True` when it works. Pure: fed the objects that are not in place (from the status
//! board) and the forbidden set members taken out, it says what the condition is.
//!
//! Failing, in the order the reason is chosen:
//! - `RepairsFailing`: objects whose repair fails or does not take (a chain that cannot be
//!   written, a route the kernel refuses), longer than the threshold;
//! - `Contested`: objects another process keeps removing, longer than the threshold;
//! - `ForbiddenMembersReturning`: forbidden members keep coming back into a set (removed again
//!   and again, each time within the threshold of the last, for longer than the threshold);
//! - `ObjectsPending`: objects that cannot be put in place (their device or gateway is missing),
//!   longer than the threshold.
//!
//! A brief failure (a repair racing its owner for a second, a device appearing late) changes
//! nothing; templated objects waiting for a cluster fact are not failures (the node may not have
//! a podCIDR yet): `netwarden_pending_templated_objects` tells those.

use crate::telemetry::status::State;
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

/// The condition's type on the Node.
pub const TYPE: &str = "NetworkStateProtected";
/// Objects named in a message at most.
const NAMED: usize = 3;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    pub status: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Condition {
    pub fn status_str(&self) -> &'static str {
        if self.status {
            "True"
        } else {
            "False"
        }
    }
}

#[derive(Debug)]
pub struct Tracker {
    after: Duration,
    /// Objects not in place: their state, reason, and since when in that state.
    since: HashMap<(String, String), (State, Option<String>, Instant)>,
    /// Per set: the first and last removal of forbidden members of the current streak, and
    /// how many were removed in it.
    forbidden: BTreeMap<String, (Instant, Instant, u64)>,
}

impl Tracker {
    pub fn new(after: Duration) -> Tracker {
        Tracker {
            after,
            since: HashMap::new(),
            forbidden: BTreeMap::new(),
        }
    }

    /// The objects not in place now (`(kind, name, state, reason)`); the others are in place.
    pub fn observe(
        &mut self,
        unhealthy: Vec<(String, String, State, Option<String>)>,
        now: Instant,
    ) {
        let mut next = HashMap::with_capacity(unhealthy.len());
        for (kind, name, state, reason) in unhealthy {
            let key = (kind, name);
            let since = match self.since.get(&key) {
                Some((s, _, t)) if *s == state => *t,
                _ => now,
            };
            next.insert(key, (state, reason, since));
        }
        self.since = next;
    }

    /// Forbidden members were taken out of `set`.
    pub fn forbidden_removed(&mut self, set: &str, members: u64, now: Instant) {
        let after = self.after;
        let e = self
            .forbidden
            .entry(set.to_owned())
            .or_insert((now, now, 0));
        if now.duration_since(e.1) > after {
            *e = (now, now, 0);
        }
        e.1 = now;
        e.2 += members;
    }

    pub fn evaluate(&mut self, now: Instant) -> Condition {
        let after = self.after;
        self.forbidden
            .retain(|_, (_, last, _)| now.duration_since(*last) <= after);
        let long = |state: State| -> Vec<String> {
            let mut v: Vec<String> = self
                .since
                .iter()
                .filter(|(_, (s, _, t))| *s == state && now.duration_since(*t) >= after)
                .map(|((kind, name), (_, reason, _))| match reason {
                    Some(r) => format!("{kind} {name} ({r})"),
                    None => format!("{kind} {name}"),
                })
                .collect();
            v.sort();
            v
        };
        let returning: Vec<String> = self
            .forbidden
            .iter()
            .filter(|(_, (first, last, _))| last.duration_since(*first) >= after)
            .map(|(set, (_, _, n))| format!("ipset {set} ({n} removed)"))
            .collect();
        let t = human(after);
        let groups = [
            ("RepairsFailing", "repairs failing", long(State::Drifted)),
            (
                "Contested",
                "removed again after each repair",
                long(State::Contested),
            ),
            (
                "ForbiddenMembersReturning",
                "forbidden members coming back",
                returning,
            ),
            (
                "ObjectsPending",
                "cannot be put in place",
                long(State::Pending),
            ),
        ];
        let failing: Vec<_> = groups.into_iter().filter(|g| !g.2.is_empty()).collect();
        let Some((reason, _, _)) = failing.first() else {
            return Condition {
                status: true,
                reason: "Protected",
                message: "every protected object is in place or being repaired".to_owned(),
            };
        };
        let parts: Vec<String> = failing
            .iter()
            .map(|(_, what, items)| {
                let more = if items.len() > NAMED {
                    format!(" and {} more", items.len() - NAMED)
                } else {
                    String::new()
                };
                let named: Vec<&str> = items.iter().take(NAMED).map(String::as_str).collect();
                format!(
                    "{} {what} for more than {t}: {}{more}",
                    items.len(),
                    named.join(", ")
                )
            })
            .collect();
        Condition {
            status: false,
            reason,
            message: parts.join("; "),
        }
    }
}

/// `5m`, `90s`, `1h`: a threshold as operators write it.
pub fn human(d: Duration) -> String {
    let s = d.as_secs();
    if d.subsec_millis() != 0 || s == 0 {
        format!("{}ms", d.as_millis())
    } else if s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(300);

    fn obj(
        kind: &str,
        name: &str,
        state: State,
        reason: &str,
    ) -> (String, String, State, Option<String>) {
        (kind.into(), name.into(), state, Some(reason.into()))
    }

    #[test]
    fn healthy_until_a_failure_lasts_longer_than_the_threshold() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(T);
        assert!(tr.evaluate(t0).status);
        let pending = vec![obj(
            "route",
            "r1",
            State::Pending,
            "device tunl9 does not exist",
        )];
        tr.observe(pending.clone(), t0);
        tr.observe(pending.clone(), t0 + T - Duration::from_secs(1));
        assert!(
            tr.evaluate(t0 + T - Duration::from_secs(1)).status,
            "not yet"
        );
        tr.observe(pending.clone(), t0 + T);
        let c = tr.evaluate(t0 + T);
        assert_eq!((c.status, c.reason), (false, "ObjectsPending"));
        assert_eq!(
            c.message,
            "1 cannot be put in place for more than 5m: route r1 (device tunl9 does not exist)"
        );
        // Back in place: True at once.
        tr.observe(Vec::new(), t0 + T + Duration::from_secs(1));
        let c = tr.evaluate(t0 + T + Duration::from_secs(1));
        assert_eq!((c.status, c.reason), (true, "Protected"));
    }

    #[test]
    fn a_change_of_state_starts_the_clock_again_and_reasons_have_an_order() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(T);
        tr.observe(vec![obj("rule", "a", State::Pending, "x")], t0);
        tr.observe(vec![obj("rule", "a", State::Drifted, "EINVAL")], t0 + T);
        assert!(tr.evaluate(t0 + T).status, "drifted only just now");
        let mut now = t0 + T;
        let many: Vec<_> = (0..5)
            .map(|i| {
                obj(
                    "chain",
                    &format!("c{i}"),
                    State::Drifted,
                    "repair does not take",
                )
            })
            .chain([obj("route", "p", State::Pending, "gateway")])
            .collect();
        tr.observe(many.clone(), now);
        now += T;
        tr.observe(many, now);
        let c = tr.evaluate(now);
        assert_eq!(c.reason, "RepairsFailing");
        assert!(
            c.message.starts_with("5 repairs failing for more than 5m: chain c0 (repair does not take), chain c1 (repair does not take), chain c2 (repair does not take) and 2 more; 1 cannot be put in place"),
            "{}",
            c.message
        );
    }

    #[test]
    fn forbidden_members_that_keep_coming_back() {
        let t0 = Instant::now();
        let mut tr = Tracker::new(Duration::from_secs(60));
        // Once: not a pattern.
        tr.forbidden_removed("lb", 1, t0);
        assert!(tr.evaluate(t0 + Duration::from_secs(30)).status);
        // Again every 20 s for two minutes.
        let mut now = t0;
        for _ in 0..6 {
            now += Duration::from_secs(20);
            tr.forbidden_removed("lb", 1, now);
        }
        let c = tr.evaluate(now);
        assert_eq!((c.status, c.reason), (false, "ForbiddenMembersReturning"));
        assert!(c.message.contains("ipset lb (7 removed)"), "{}", c.message);
        // It stops: healthy once a threshold passes without one.
        assert!(tr.evaluate(now + Duration::from_secs(61)).status);
    }

    #[test]
    fn thresholds_read_as_written() {
        assert_eq!(human(Duration::from_secs(300)), "5m");
        assert_eq!(human(Duration::from_secs(90)), "90s");
        assert_eq!(human(Duration::from_secs(7200)), "2h");
        assert_eq!(human(Duration::from_millis(1500)), "1500ms");
    }
}
