//! Kubernetes Events on the Node: what netwarden did, aggregated and rate-limited so that a
//! repair storm (a networkd restart removing 200 rules, or two agents fighting) becomes a few
//! Events, not thousands of API requests. The aggregation is pure ([`Aggregator`]); posting is in
//! [`super::run`].

use crate::obs::Notice;
use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// Repairs are summed over this window before one Event tells them.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Events in a burst, then one per [`REFILL`]: at most ~10 a minute from one node.
pub const BURST: u32 = 10;
pub const REFILL: Duration = Duration::from_secs(6);
/// Queued Events beyond this are dropped (and counted in the next one).
const QUEUE_MAX: usize = 20;
/// Forbidden members named in one Event at most (the count is always whole).
const MEMBERS_NAMED: usize = 5;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Normal => "Normal",
            EventType::Warning => "Warning",
        }
    }
}

/// An Event to post.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Draft {
    pub reason: &'static str,
    pub kind: EventType,
    pub message: String,
}

#[derive(Debug)]
pub struct Aggregator {
    window: Duration,
    tokens: u32,
    burst: u32,
    refill: Duration,
    last_refill: Instant,
    /// Repairs not told yet: per actor, per kind, a count; and when the first came.
    restored: BTreeMap<String, BTreeMap<&'static str, u64>>,
    /// Forbidden members removed and not told yet, per set: a count and the first few.
    forbidden: BTreeMap<String, (u64, Vec<String>)>,
    since: Option<Instant>,
    queue: VecDeque<Draft>,
    /// Events dropped for the rate limit since the last one posted.
    dropped: u64,
}

impl Aggregator {
    pub fn new(now: Instant) -> Aggregator {
        Aggregator::with(now, WINDOW, BURST, REFILL)
    }

    pub fn with(now: Instant, window: Duration, burst: u32, refill: Duration) -> Aggregator {
        Aggregator {
            window,
            tokens: burst,
            burst,
            refill,
            last_refill: now,
            restored: BTreeMap::new(),
            forbidden: BTreeMap::new(),
            since: None,
            queue: VecDeque::new(),
            dropped: 0,
        }
    }

    pub fn record(&mut self, notice: Notice, now: Instant) {
        match notice {
            Notice::Restored { counts, actor } => {
                // Nothing counted is nothing to tell (not an Event saying "restored  removed").
                if counts.iter().all(|(_, n)| *n == 0) {
                    return;
                }
                let per_kind = self.restored.entry(actor).or_default();
                for (kind, n) in counts.into_iter().filter(|(_, n)| *n > 0) {
                    *per_kind.entry(kind).or_default() += n;
                }
                self.since.get_or_insert(now);
            }
            Notice::Contested { kind, name, actor } => self.enqueue(Draft {
                reason: "Contested",
                kind: EventType::Warning,
                message: format!(
                    "{kind} {name} is removed again right after each repair (by {actor}); repairs back off"
                ),
            }),
            Notice::ForbiddenRemoved { set, members } => {
                if members.is_empty() {
                    return;
                }
                let (n, named) = self.forbidden.entry(set).or_default();
                *n += members.len() as u64;
                for m in members {
                    if named.len() < MEMBERS_NAMED && !named.contains(&m) {
                        named.push(m);
                    }
                }
                self.since.get_or_insert(now);
            }
            Notice::ConfigRejected { source, error } => self.enqueue(Draft {
                reason: "ConfigRejected",
                kind: EventType::Warning,
                message: format!(
                    "{source} rejected, the last good config stays in force: {}",
                    truncate(&error, 800)
                ),
            }),
        }
    }

    fn enqueue(&mut self, d: Draft) {
        // The same thing said twice while waiting is said once.
        if self.queue.contains(&d) {
            return;
        }
        if self.queue.len() >= QUEUE_MAX {
            self.queue.pop_front();
            self.dropped += 1;
        }
        self.queue.push_back(d);
    }

    fn refill(&mut self, now: Instant) {
        while self.tokens < self.burst && now >= self.last_refill + self.refill {
            self.tokens += 1;
            self.last_refill += self.refill;
        }
        if self.tokens == self.burst {
            self.last_refill = now;
        }
    }

    /// When [`Aggregator::take_due`] may have something: `None` when nothing waits.
    pub fn next_due(&self) -> Option<Instant> {
        let work = match (self.queue.is_empty(), self.since) {
            (false, _) => Some(self.last_refill),
            (true, Some(since)) => Some(since + self.window),
            (true, None) => None,
        }?;
        if self.tokens == 0 {
            Some(work.max(self.last_refill + self.refill))
        } else {
            Some(work)
        }
    }

    /// The Events to post now, within the rate limit. Repairs (and forbidden members removed)
    /// are never queued as drafts: they stay summed per actor (per set) until a token is free,
    /// so a storm loses no count, it is only told later and in fewer Events.
    pub fn take_due(&mut self, now: Instant) -> Vec<Draft> {
        self.refill(now);
        let mut out = Vec::new();
        while self.tokens > 0 {
            let Some(d) = self.queue.pop_front() else {
                break;
            };
            self.tokens -= 1;
            out.push(d);
        }
        if self.since.is_some_and(|s| now >= s + self.window) {
            while self.tokens > 0 {
                let Some((actor, kinds)) = self.restored.pop_first() else {
                    break;
                };
                self.tokens -= 1;
                out.push(Draft {
                    reason: "DriftRepaired",
                    kind: EventType::Normal,
                    message: restored_message(&kinds, &actor),
                });
            }
            while self.tokens > 0 {
                let Some((set, (n, named))) = self.forbidden.pop_first() else {
                    break;
                };
                self.tokens -= 1;
                let more = if n > named.len() as u64 { ", …" } else { "" };
                out.push(Draft {
                    reason: "ForbiddenMembersRemoved",
                    kind: EventType::Warning,
                    message: format!(
                        "removed {n} forbidden member{} from ipset {set}: {}{more}",
                        if n == 1 { "" } else { "s" },
                        named.join(", ")
                    ),
                });
            }
            if self.restored.is_empty() && self.forbidden.is_empty() {
                self.since = None;
            }
        }
        if let Some(first) = out.first_mut() {
            if self.dropped > 0 {
                first.message.push_str(&format!(
                    " ({} more events dropped by the rate limit)",
                    self.dropped
                ));
                self.dropped = 0;
            }
        }
        out
    }
}

fn restored_message(kinds: &BTreeMap<&'static str, u64>, actor: &str) -> String {
    let parts: Vec<String> = kinds
        .iter()
        .map(|(k, n)| match (*k, *n) {
            ("fdb", 1) => "1 FDB entry".to_owned(),
            ("fdb", n) => format!("{n} FDB entries"),
            (k, 1) => format!("1 {k}"),
            ("address", n) => format!("{n} addresses"),
            (k, n) => format!("{n} {k}s"),
        })
        .collect();
    let by = if actor.is_empty() { "unknown" } else { actor };
    format!("restored {} removed by {by}", parts.join(", "))
}

fn truncate(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn restored(n: u64, actor: &str) -> Notice {
        Notice::Restored {
            counts: vec![("rule", n), ("route", 0), ("address", 1)],
            actor: actor.into(),
        }
    }

    #[test]
    fn repairs_are_summed_over_the_window() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(t0);
        assert_eq!(a.next_due(), None);
        for i in 0..12 {
            a.record(
                restored(1, "systemd-network"),
                t0 + Duration::from_millis(i),
            );
        }
        a.record(restored(3, "ip"), t0 + Duration::from_secs(1));
        assert_eq!(a.next_due(), Some(t0 + WINDOW));
        assert!(
            a.take_due(t0 + Duration::from_secs(5)).is_empty(),
            "inside the window"
        );
        let out = a.take_due(t0 + WINDOW);
        let messages: Vec<&str> = out.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "restored 1 address, 3 rules removed by ip",
                "restored 12 addresses, 12 rules removed by systemd-network"
            ]
        );
        assert!(out
            .iter()
            .all(|d| d.reason == "DriftRepaired" && d.kind == EventType::Normal));
        assert_eq!(a.next_due(), None);
    }

    #[test]
    fn a_storm_is_rate_limited_and_nothing_is_lost() {
        let t0 = Instant::now();
        let mut a = Aggregator::with(t0, Duration::ZERO, 2, Duration::from_secs(6));
        let mut posted = Vec::new();
        // 1000 contests of distinct objects in one second, plus repairs all along.
        for i in 0..1000u64 {
            let now = t0 + Duration::from_millis(i);
            a.record(
                Notice::Contested {
                    kind: "rule",
                    name: format!("r{i}"),
                    actor: "x".into(),
                },
                now,
            );
            a.record(restored(1, "x"), now);
            posted.extend(a.take_due(now));
        }
        assert_eq!(posted.len(), 2, "only the burst within the first second");
        // A minute later: one token per 6 s.
        let later = a.take_due(t0 + Duration::from_secs(61));
        assert_eq!(later.len(), 2, "burst refilled to its cap, not beyond");
        assert!(later
            .iter()
            .chain(&posted)
            .any(|d| d.message.contains("dropped by the rate limit")));
        // Drain: the repairs summed meanwhile are still told, with every count.
        let mut all: Vec<Draft> = posted.into_iter().chain(later).collect();
        let mut now = t0 + Duration::from_secs(61);
        for _ in 0..30 {
            now += Duration::from_secs(6);
            all.extend(a.take_due(now));
        }
        assert_eq!(a.next_due(), None, "everything told");
        let total_rules: u64 = all
            .iter()
            .filter(|d| d.reason == "DriftRepaired")
            .map(|d| {
                let rules = d.message.split(", ").nth(1).unwrap();
                rules.split(' ').next().unwrap().parse::<u64>().unwrap()
            })
            .sum();
        assert!(
            all.iter().filter(|d| d.reason == "DriftRepaired").count() < 5,
            "a few summed Events, not one per repair"
        );
        assert_eq!(total_rules, 1000);
    }

    #[test]
    fn chains_sets_and_forbidden_members_are_told_like_rules() {
        let t0 = Instant::now();
        let mut a = Aggregator::new(t0);
        for _ in 0..2 {
            a.record(
                Notice::Restored {
                    counts: vec![("chain", 1)],
                    actor: "iptables-nft".into(),
                },
                t0,
            );
        }
        a.record(
            Notice::Restored {
                counts: vec![("ipset", 1)],
                actor: "unknown".into(),
            },
            t0,
        );
        for m in ["10.0.0.1", "10.0.0.2"] {
            a.record(
                Notice::ForbiddenRemoved {
                    set: "lb-ips".into(),
                    members: vec![m.into()],
                },
                t0,
            );
        }
        a.record(
            Notice::ForbiddenRemoved {
                set: "lb-ips".into(),
                members: (3..10).map(|i| format!("10.0.0.{i}")).collect(),
            },
            t0,
        );
        let out = a.take_due(t0 + WINDOW);
        let messages: Vec<&str> = out.iter().map(|d| d.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "restored 2 chains removed by iptables-nft",
                "restored 1 ipset removed by unknown",
                "removed 9 forbidden members from ipset lb-ips: 10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4, 10.0.0.5, …"
            ]
        );
        assert_eq!(out[2].reason, "ForbiddenMembersRemoved");
        // Empty notices are no Events.
        a.record(
            Notice::Restored {
                counts: vec![("chain", 0)],
                actor: "x".into(),
            },
            t0,
        );
        a.record(
            Notice::ForbiddenRemoved {
                set: "lb-ips".into(),
                members: Vec::new(),
            },
            t0,
        );
        assert_eq!(out[2].kind, EventType::Warning);
        assert_eq!(a.next_due(), None);
    }

    #[test]
    fn the_same_rejection_is_told_once() {
        let t0 = Instant::now();
        let mut a = Aggregator::with(t0, WINDOW, 1, Duration::from_secs(60));
        let rejected = Notice::ConfigRejected {
            source: "ConfigMap kube-system/nw".into(),
            error: "x:1:1: bad".into(),
        };
        a.record(rejected.clone(), t0);
        let out = a.take_due(t0);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].kind, EventType::Warning);
        assert!(out[0].message.starts_with(
            "ConfigMap kube-system/nw rejected, the last good config stays in force: x:1:1: bad"
        ));
        a.record(rejected.clone(), t0);
        a.record(rejected, t0);
        assert_eq!(a.take_due(t0).len(), 0, "no token");
        assert_eq!(a.next_due(), Some(t0 + Duration::from_secs(60)));
        assert_eq!(
            a.take_due(t0 + Duration::from_secs(60)).len(),
            1,
            "queued once"
        );
    }
}
