//! Kubernetes Events on the Node: what netwarden did, aggregated the way client-go's recorder
//! does it (one Event object per kind of happening, whose `count`, `lastTimestamp` and message
//! are updated as it happens again) and rate-limited, so that a repair storm is one Event with a
//! large count, not thousands of API requests. Pure: [`Aggregator`] decides what to send; the
//! sending is in [`super::recorder`].
//!
//! A *series* is keyed by reason and subject (`DriftRepaired` by the actor that removed the
//! objects, `ForbiddenMembersRemoved` by set, `Contested` by object, `ConfigRejected` by
//! ConfigMap). It holds cumulative totals since its Event was created; a post makes the server's
//! Event match them, so whatever the server missed (an outage, the rate limit) is merged into the
//! next post and no count is lost. A series quiet for [`SERIES_GAP`] ends: what comes after is a
//! new Event, as client-go starts a new one once its aggregation window has passed.

use crate::telemetry::Notice;
use std::collections::BTreeMap;
use std::time::{Duration, Instant, SystemTime};

/// Repairs are summed over this window before a post tells them.
pub const WINDOW: Duration = Duration::from_secs(10);
/// Posts in a burst, then one per [`REFILL`]: at most ~10 a minute from one node.
pub const BURST: u32 = 10;
pub const REFILL: Duration = Duration::from_secs(6);
/// A series without a new occurrence for this long ends (its Event stays as it is).
pub const SERIES_GAP: Duration = Duration::from_secs(600);
/// Distinct series held at most; a new one beyond that is dropped (and counted).
const SERIES_MAX: usize = 64;
/// Forbidden members named in one Event at most (the count is always whole).
const MEMBERS_NAMED: usize = 5;
/// Retries of a post that found no server: doubling from 1 s to this.
const RETRY_MAX: Duration = Duration::from_secs(30);

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

/// What a series is about.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key {
    pub reason: &'static str,
    pub subject: String,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum What {
    /// Objects put back, per kind; `at_start`: found missing when the agent started.
    Restored {
        kinds: BTreeMap<&'static str, u64>,
        at_start: bool,
    },
    /// Forbidden members taken out of a set, the first few named.
    Forbidden { named: Vec<String> },
    /// A message told as it is (the latest one).
    Text(String),
}

#[derive(Clone, Debug)]
struct Series {
    kind: EventType,
    what: What,
    /// Occurrences since the Event was created (objects restored, members removed, times).
    count: u64,
    first: SystemTime,
    last: SystemTime,
    last_seen: Instant,
    /// Not told yet since this time.
    dirty_since: Option<Instant>,
    /// Told at once rather than summed over the window.
    immediate: bool,
    /// The Event on the server: its name and the count it holds.
    posted: Option<(String, u64)>,
    in_flight: bool,
}

/// One request to make: create an Event (`name: None`) or update one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Post {
    pub key: Key,
    pub name: Option<String>,
    pub kind: EventType,
    pub message: String,
    pub count: u64,
    pub first: SystemTime,
    pub last: SystemTime,
}

/// How a post went.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Created, with the server's name for it.
    Created(String),
    Updated,
    /// The Event to update is gone (expired after its TTL, or deleted): create a new one.
    Gone,
    /// No server, or it answered "later" (429, 5xx): keep it and try again.
    Retry,
    /// The server answered "later" and how much later (a 429's or 5xx's `Retry-After`, capped):
    /// as `Retry`, not before then.
    Throttled(Duration),
    /// The server refused it for good (403, 422): forget this post.
    Rejected,
}

/// What a notice tells, before it joins its series.
struct Told {
    key: Key,
    kind: EventType,
    what: What,
    /// How many it counts (a restoration counts its kinds).
    n: u64,
    /// Posted at once rather than at the end of the window.
    immediate: bool,
}

impl Told {
    /// `None` for a notice that is no Event of its own.
    fn of(notice: Notice) -> Option<Told> {
        let told = |key, kind, what, n, immediate| {
            Some(Told {
                key,
                kind,
                what,
                n,
                immediate,
            })
        };
        match notice {
            Notice::Restored { counts, actor } => {
                let kinds: BTreeMap<&'static str, u64> =
                    counts.into_iter().filter(|(_, n)| *n > 0).collect();
                let by = if actor.is_empty() { "unknown" } else { &actor };
                let key = key("DriftRepaired", by);
                told(
                    key,
                    EventType::Normal,
                    What::restored(kinds, false),
                    0,
                    false,
                )
            }
            Notice::PlacedAtStart { counts } => {
                let kinds: BTreeMap<&'static str, u64> =
                    counts.into_iter().filter(|(_, n)| *n > 0).collect();
                let key = key("DriftRepaired", "at start");
                told(
                    key,
                    EventType::Normal,
                    What::restored(kinds, true),
                    0,
                    false,
                )
            }
            Notice::ForbiddenRemoved { set, members } => {
                let n = members.len() as u64;
                let what = What::Forbidden { named: members };
                told(
                    key("ForbiddenMembersRemoved", &set),
                    EventType::Warning,
                    what,
                    n,
                    false,
                )
            }
            Notice::Contested { kind, name, actor } => {
                let text = format!(
                    "{kind} {name} is removed again right after each repair (by {actor}); repairs back off"
                );
                let key = key("Contested", &format!("{kind} {name}"));
                told(key, EventType::Warning, What::Text(text), 1, true)
            }
            Notice::NetworkdAtRisk {
                objects,
                names,
                preventable,
            } => {
                let text = networkd_at_risk(objects, &names, preventable);
                let key = key("NetworkdWillRemove", "restart");
                told(key, EventType::Warning, What::Text(text), 1, true)
            }
            Notice::ConfigRejected { source, error } => {
                let text = format!(
                    "{source} rejected, the last good config stays in force: {}",
                    truncate(&error, 800)
                );
                let key = key("ConfigRejected", &source);
                told(key, EventType::Warning, What::Text(text), 1, true)
            }
            Notice::ConfigAccepted { .. } => None,
        }
    }
}

fn networkd_at_risk(objects: usize, names: &[String], preventable: bool) -> String {
    format!(
        "systemd-networkd's next restart would remove {objects} protected objects ({}{}); {}",
        names.join(", "),
        if objects > names.len() { ", ..." } else { "" },
        if preventable {
            "`netwarden networkd` prints the drop-in that prevents it; netwarden repairs them meanwhile"
        } else {
            "netwarden repairs them"
        }
    )
}

#[derive(Debug)]
pub struct Aggregator {
    window: Duration,
    tokens: u32,
    burst: u32,
    refill: Duration,
    last_refill: Instant,
    series: BTreeMap<Key, Series>,
    /// No post before this (after a post found no server).
    retry_at: Option<Instant>,
    retry_delay: Duration,
    /// No post before this either: the server asked to wait (a `Retry-After`). Unlike
    /// `retry_at`, a watch that works again does not lift it.
    throttled_until: Option<Instant>,
    /// Series dropped because [`SERIES_MAX`] were held.
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
            series: BTreeMap::new(),
            retry_at: None,
            retry_delay: Duration::ZERO,
            throttled_until: None,
            dropped: 0,
        }
    }

    pub fn record(&mut self, notice: Notice, now: Instant, wall: SystemTime) {
        if let Notice::ConfigAccepted { source } = &notice {
            self.superseded(&key("ConfigRejected", source));
            return;
        }
        let Some(told) = Told::of(notice) else {
            return;
        };
        let n = match &told.what {
            What::Restored { kinds, .. } => kinds.values().sum(),
            _ => told.n,
        };
        // Nothing counted is nothing to tell (not an Event saying "restored  removed").
        if n == 0 {
            return;
        }
        self.expire(now);
        let ended = self.series.get(&told.key).is_some_and(|s| {
            s.dirty_since.is_none() && !s.in_flight && now.duration_since(s.last_seen) >= SERIES_GAP
        });
        if ended {
            self.series.remove(&told.key);
        }
        if !self.series.contains_key(&told.key) && self.series.len() >= SERIES_MAX && !self.evict()
        {
            self.dropped += 1;
            return;
        }
        let Told {
            key,
            kind,
            what,
            immediate,
            ..
        } = told;
        let s = self.series.entry(key).or_insert_with(|| Series {
            kind,
            what: what.empty(),
            count: 0,
            first: wall,
            last: wall,
            last_seen: now,
            dirty_since: None,
            immediate,
            posted: None,
            in_flight: false,
        });
        s.merge(what);
        s.count += n;
        s.last = wall;
        s.last_seen = now;
        s.dirty_since.get_or_insert(now);
    }

    /// A good config replaced a refused one: a rejection not told yet is not told at all.
    fn superseded(&mut self, key: &Key) {
        if let Some(s) = self.series.get_mut(key) {
            if s.in_flight {
                return;
            }
            match &s.posted {
                None => {
                    self.series.remove(key);
                }
                Some((_, count)) => {
                    s.count = *count;
                    s.dirty_since = None;
                }
            }
        }
    }

    /// Drops series that ended (told, and quiet for [`SERIES_GAP`]).
    fn expire(&mut self, now: Instant) {
        self.series.retain(|_, s| {
            s.dirty_since.is_some() || s.in_flight || now.duration_since(s.last_seen) < SERIES_GAP
        });
    }

    /// Makes room by forgetting the told series quiet the longest; false if all wait to be told.
    fn evict(&mut self) -> bool {
        let oldest = self
            .series
            .iter()
            .filter(|(_, s)| s.dirty_since.is_none() && !s.in_flight)
            .min_by_key(|(_, s)| s.last_seen)
            .map(|(k, _)| k.clone());
        oldest.is_some_and(|k| self.series.remove(&k).is_some())
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

    fn due_at(&self, s: &Series) -> Option<Instant> {
        if s.in_flight {
            return None;
        }
        let since = s.dirty_since?;
        Some(if s.immediate {
            since
        } else {
            since + self.window
        })
    }

    /// When [`Aggregator::take`] may have something: `None` when nothing waits.
    pub fn next_due(&self) -> Option<Instant> {
        let mut due = self.series.values().filter_map(|s| self.due_at(s)).min()?;
        if self.tokens == 0 {
            due = due.max(self.last_refill + self.refill);
        }
        if let Some(r) = self.not_before() {
            due = due.max(r);
        }
        Some(due)
    }

    /// The next post to make now, if any (the one waiting longest), within the rate limit. It
    /// is in flight until [`Aggregator::done`].
    pub fn take(&mut self, now: Instant) -> Option<Post> {
        if self.not_before().is_some_and(|r| now < r) {
            return None;
        }
        self.refill(now);
        if self.tokens == 0 {
            return None;
        }
        let key = self
            .series
            .iter()
            .filter_map(|(k, s)| self.due_at(s).filter(|d| *d <= now).map(|d| (d, k)))
            .min()
            .map(|(_, k)| k.clone())?;
        self.tokens -= 1;
        let s = self.series.get_mut(&key)?;
        s.in_flight = true;
        Some(Post {
            name: s.posted.as_ref().map(|(n, _)| n.clone()),
            kind: s.kind,
            message: s.message(&key),
            count: s.count,
            first: s.first,
            last: s.last,
            key,
        })
    }

    /// The outcome of a post made from [`Aggregator::take`].
    pub fn done(&mut self, post: &Post, outcome: Outcome, now: Instant) {
        let Some(s) = self.series.get_mut(&post.key) else {
            return;
        };
        s.in_flight = false;
        let told = |s: &mut Series, name: String| {
            s.posted = Some((name, post.count));
            // Occurrences recorded while the post was on its way are still to be told.
            if s.count == post.count {
                s.dirty_since = None;
            } else {
                s.dirty_since = Some(now);
            }
        };
        match outcome {
            Outcome::Created(name) => told(s, name),
            Outcome::Updated => {
                let name = post.name.clone().unwrap_or_default();
                told(s, name);
            }
            Outcome::Gone => {
                // Told again on a new Event, at once.
                s.posted = None;
                s.dirty_since = Some(now - self.window.min(now.elapsed()));
                self.tokens += 1;
            }
            Outcome::Retry | Outcome::Throttled(_) => {
                // Not the rate limit's doing: the token is not spent.
                self.tokens = (self.tokens + 1).min(self.burst);
                self.retry_delay = (self.retry_delay * 2).clamp(Duration::from_secs(1), RETRY_MAX);
                self.retry_at = Some(now + self.retry_delay);
                // The doubling stays the floor; the server's wait may be longer.
                if let Outcome::Throttled(asked) = outcome {
                    self.throttled_until = Some(now + asked);
                }
                return;
            }
            Outcome::Rejected => {
                self.series.remove(&post.key);
            }
        }
        self.retry_delay = Duration::ZERO;
        self.retry_at = None;
        self.throttled_until = None;
    }

    /// The earliest a post may go after failures: the backoff's time or the server's, the later.
    fn not_before(&self) -> Option<Instant> {
        self.retry_at.max(self.throttled_until)
    }

    /// The server is back: posts waiting for it may go now (but not before a wait it asked for).
    pub fn reachable_again(&mut self) {
        self.retry_at = None;
        self.retry_delay = Duration::ZERO;
    }

    /// Series with something not told yet.
    pub fn unsent(&self) -> usize {
        self.series
            .values()
            .filter(|s| s.dirty_since.is_some())
            .count()
    }

    /// Series dropped since the last call.
    pub fn take_dropped(&mut self) -> u64 {
        std::mem::take(&mut self.dropped)
    }
}

fn key(reason: &'static str, subject: &str) -> Key {
    Key {
        reason,
        subject: subject.to_owned(),
    }
}

impl What {
    /// The same kind of content, with nothing in it yet.
    fn empty(&self) -> What {
        match self {
            What::Restored { at_start, .. } => What::restored(BTreeMap::new(), *at_start),
            What::Forbidden { .. } => What::Forbidden { named: Vec::new() },
            What::Text(t) => What::Text(t.clone()),
        }
    }

    fn restored(kinds: BTreeMap<&'static str, u64>, at_start: bool) -> What {
        What::Restored { kinds, at_start }
    }
}

impl Series {
    fn merge(&mut self, what: What) {
        match (&mut self.what, what) {
            (What::Restored { kinds, .. }, What::Restored { kinds: more, .. }) => {
                for (k, n) in more {
                    *kinds.entry(k).or_default() += n;
                }
            }
            (What::Forbidden { named }, What::Forbidden { named: more }) => {
                for m in more {
                    if named.len() < MEMBERS_NAMED && !named.contains(&m) {
                        named.push(m);
                    }
                }
            }
            (mine, other) => *mine = other,
        }
    }

    fn message(&self, key: &Key) -> String {
        match &self.what {
            What::Restored { kinds, at_start } => {
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
                if *at_start {
                    format!(
                        "restored {} missing at start: removed while netwarden was not running",
                        parts.join(", ")
                    )
                } else {
                    format!("restored {} removed by {}", parts.join(", "), key.subject)
                }
            }
            What::Forbidden { named } => {
                let n = self.count;
                let more = if n > named.len() as u64 { ", …" } else { "" };
                format!(
                    "removed {n} forbidden member{} from ipset {}: {}{more}",
                    if n == 1 { "" } else { "s" },
                    key.subject,
                    named.join(", ")
                )
            }
            What::Text(t) => t.clone(),
        }
    }
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
#[path = "events_tests.rs"]
mod tests;
