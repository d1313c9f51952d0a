//! Tests of the Event aggregation ([`super::Aggregator`]).

use super::*;

fn restored(n: u64, actor: &str) -> Notice {
    Notice::Restored {
        counts: vec![("rule", n), ("route", 0), ("address", 1)],
        actor: actor.into(),
    }
}

/// Takes and completes every due post as the server would accept it.
fn drain(a: &mut Aggregator, now: Instant) -> Vec<Post> {
    let mut out = Vec::new();
    while let Some(p) = a.take(now) {
        let outcome = match &p.name {
            Some(_) => Outcome::Updated,
            None => Outcome::Created(format!("ev{}", out.len())),
        };
        a.done(&p, outcome, now);
        out.push(p);
    }
    out
}

fn wall() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// Every kind the loop protects is named as an operator reads it (FDB entries, not "fdbs").
#[test]
fn every_kind_is_named_in_plain_words() {
    let t0 = Instant::now();
    let mut a = Aggregator::new(t0);
    let counts = vec![("fdb", 2), ("neighbour", 1), ("link", 3), ("sysctl", 1)];
    let actor = "unknown".to_owned();
    a.record(Notice::Restored { counts, actor }, t0, wall());
    a.record(
        Notice::Restored {
            counts: vec![("fdb", 1)],
            actor: "bridge".into(),
        },
        t0,
        wall(),
    );
    let out = drain(&mut a, t0 + WINDOW);
    let messages: Vec<&str> = out.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "restored 1 FDB entry removed by bridge",
            "restored 2 FDB entries, 3 links, 1 neighbour, 1 sysctl removed by unknown"
        ]
    );
}

#[test]
fn repairs_are_summed_over_the_window_per_actor() {
    let t0 = Instant::now();
    let mut a = Aggregator::new(t0);
    assert_eq!(a.next_due(), None);
    for i in 0..12 {
        a.record(
            restored(1, "systemd-network"),
            t0 + Duration::from_millis(i),
            wall(),
        );
    }
    a.record(restored(3, "ip"), t0 + Duration::from_secs(1), wall());
    assert_eq!(a.next_due(), Some(t0 + WINDOW));
    assert!(drain(&mut a, t0 + Duration::from_secs(5)).is_empty());
    let out = drain(&mut a, t0 + WINDOW + Duration::from_secs(1));
    let messages: Vec<&str> = out.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "restored 12 addresses, 12 rules removed by systemd-network",
            "restored 1 address, 3 rules removed by ip"
        ]
    );
    assert_eq!(out[0].count, 24);
    assert!(out.iter().all(|p| p.key.reason == "DriftRepaired"
        && p.kind == EventType::Normal
        && p.name.is_none()));
    assert_eq!(a.next_due(), None);
}

#[test]
fn a_storm_is_one_event_whose_count_grows() {
    let t0 = Instant::now();
    let mut a = Aggregator::new(t0);
    let mut posts = Vec::new();
    // A rule removed and restored every 100 ms for five minutes.
    for i in 0..3000u64 {
        let now = t0 + Duration::from_millis(100 * i);
        a.record(
            Notice::Restored {
                counts: vec![("rule", 1)],
                actor: "x".into(),
            },
            now,
            wall(),
        );
        posts.extend(drain(&mut a, now));
    }
    posts.extend(drain(&mut a, t0 + Duration::from_secs(400)));
    assert_eq!(posts.iter().filter(|p| p.name.is_none()).count(), 1);
    assert!(posts.len() <= 32, "{} requests", posts.len());
    let last = posts.last().unwrap();
    assert_eq!(
        last.name.as_deref(),
        Some("ev0"),
        "updates of the one Event"
    );
    assert_eq!(last.count, 3000);
    assert_eq!(last.message, "restored 3000 rules removed by x");
}

#[test]
fn an_outage_loses_nothing_and_one_post_tells_it_all() {
    let t0 = Instant::now();
    let mut a = Aggregator::with(t0, Duration::ZERO, BURST, REFILL);
    let mut now = t0;
    let mut attempts = 0;
    for i in 0..50u64 {
        now = t0 + Duration::from_secs(i);
        a.record(restored(1, "ip"), now, wall());
        while let Some(p) = a.take(now) {
            attempts += 1;
            a.done(&p, Outcome::Retry, now);
        }
    }
    // Backed off: far fewer attempts than seconds, and the rate limit kept its tokens.
    assert!(attempts <= 12, "{attempts} attempts in 50 s");
    assert_eq!(a.unsent(), 1);
    a.reachable_again();
    let out = drain(&mut a, now);
    assert_eq!(out.len(), 1);
    assert_eq!(
        out[0].message,
        "restored 50 addresses, 50 rules removed by ip"
    );
    assert_eq!(out[0].count, 100);
    assert_eq!(out[0].first, wall());
    // Then updates of the same Event.
    a.record(restored(1, "ip"), now, wall());
    let out = drain(&mut a, now + Duration::from_secs(1));
    assert_eq!(out[0].name.as_deref(), Some("ev0"));
    assert_eq!(out[0].count, 102);
}

#[test]
fn a_post_waits_for_the_servers_retry_after_even_when_a_watch_recovers() {
    let t0 = Instant::now();
    let mut a = Aggregator::with(t0, Duration::ZERO, BURST, REFILL);
    a.record(restored(1, "ip"), t0, wall());
    let p = a.take(t0).unwrap();
    a.done(&p, Outcome::Throttled(Duration::from_secs(5)), t0);
    // The backoff alone would allow a post after 1 s; the server asked for 5.
    assert_eq!(a.next_due(), Some(t0 + Duration::from_secs(5)));
    assert!(a.take(t0 + Duration::from_secs(2)).is_none());
    // A watch working again ends the backoff, not the server's wait.
    a.reachable_again();
    assert!(a.take(t0 + Duration::from_millis(4999)).is_none());
    let out = drain(&mut a, t0 + Duration::from_secs(5));
    assert_eq!(out.len(), 1);
    // A wait shorter than the backoff leaves the backoff as the floor.
    a.record(restored(1, "ip"), t0 + Duration::from_secs(5), wall());
    let now = t0 + Duration::from_secs(6);
    let p = a.take(now).unwrap();
    a.done(&p, Outcome::Throttled(Duration::ZERO), now);
    assert_eq!(a.next_due(), Some(now + Duration::from_secs(1)));
    // And a success lifts it all.
    let out = drain(&mut a, now + Duration::from_secs(1));
    assert_eq!(out.len(), 1);
    assert_eq!(a.next_due(), None);
}

#[test]
fn occurrences_during_a_post_are_told_next() {
    let t0 = Instant::now();
    let mut a = Aggregator::with(t0, Duration::ZERO, BURST, REFILL);
    a.record(restored(1, "ip"), t0, wall());
    let p = a.take(t0).unwrap();
    a.record(restored(1, "ip"), t0, wall());
    assert!(a.take(t0).is_none(), "one post of a series at a time");
    a.done(&p, Outcome::Created("e".into()), t0);
    let next = a.take(t0).unwrap();
    assert_eq!((next.name.as_deref(), next.count), (Some("e"), 4));
    // The Event expired meanwhile: told again on a new one.
    a.done(&next, Outcome::Gone, t0);
    let again = a.take(t0).unwrap();
    assert_eq!((again.name, again.count), (None, 4));
}

#[test]
fn a_quiet_series_ends_and_the_next_occurrence_is_a_new_event() {
    let t0 = Instant::now();
    let mut a = Aggregator::with(t0, Duration::ZERO, BURST, REFILL);
    a.record(restored(1, "ip"), t0, wall());
    drain(&mut a, t0);
    let later = t0 + SERIES_GAP + Duration::from_secs(1);
    a.record(restored(1, "ip"), later, wall());
    let p = a.take(later).unwrap();
    assert_eq!((p.name, p.count), (None, 2));
}

#[test]
fn a_superseded_rejection_is_not_told() {
    let t0 = Instant::now();
    let mut a = Aggregator::with(t0, WINDOW, 1, Duration::from_secs(60));
    let source = "ConfigMap kube-system/nw";
    let rejected = |e: &str| Notice::ConfigRejected {
        source: source.into(),
        error: e.into(),
    };
    a.record(rejected("x:1:1: bad"), t0, wall());
    let out = drain(&mut a, t0);
    assert_eq!(out.len(), 1);
    assert!(out[0].message.starts_with(
        "ConfigMap kube-system/nw rejected, the last good config stays in force: x:1:1: bad"
    ));
    // Two more bad edits while no token is left: one series, the latest error.
    a.record(rejected("x:2:1: worse"), t0, wall());
    a.record(rejected("x:3:1: worst"), t0, wall());
    assert_eq!(a.unsent(), 1);
    // Fixed before the token came back: nothing more is said.
    a.record(
        Notice::ConfigAccepted {
            source: source.into(),
        },
        t0,
        wall(),
    );
    assert_eq!(a.unsent(), 0);
    assert_eq!(a.next_due(), None);
    // A rejection never posted is forgotten whole.
    let mut b = Aggregator::with(t0, WINDOW, 0, Duration::from_secs(60));
    b.record(rejected("e"), t0, wall());
    b.record(
        Notice::ConfigAccepted {
            source: source.into(),
        },
        t0,
        wall(),
    );
    assert_eq!(b.next_due(), None);
}

#[test]
fn chains_sets_forbidden_members_and_the_start() {
    let t0 = Instant::now();
    let mut a = Aggregator::new(t0);
    for _ in 0..2 {
        a.record(
            Notice::Restored {
                counts: vec![("chain", 1)],
                actor: "iptables-nft".into(),
            },
            t0,
            wall(),
        );
    }
    for m in ["10.0.0.1", "10.0.0.2"] {
        a.record(
            Notice::ForbiddenRemoved {
                set: "lb-ips".into(),
                members: vec![m.into()],
            },
            t0,
            wall(),
        );
    }
    a.record(
        Notice::ForbiddenRemoved {
            set: "lb-ips".into(),
            members: (3..10).map(|i| format!("10.0.0.{i}")).collect(),
        },
        t0,
        wall(),
    );
    a.record(
        Notice::PlacedAtStart {
            counts: vec![("rule", 2), ("route", 0)],
        },
        t0,
        wall(),
    );
    // Empty notices are nothing.
    a.record(
        Notice::Restored {
            counts: vec![("chain", 0)],
            actor: "x".into(),
        },
        t0,
        wall(),
    );
    a.record(
        Notice::ForbiddenRemoved {
            set: "lb-ips".into(),
            members: Vec::new(),
        },
        t0,
        wall(),
    );
    let out = drain(&mut a, t0 + WINDOW);
    let messages: Vec<&str> = out.iter().map(|p| p.message.as_str()).collect();
    assert_eq!(
        messages,
        [
            "restored 2 rules missing at start: removed while netwarden was not running",
            "restored 2 chains removed by iptables-nft",
            "removed 9 forbidden members from ipset lb-ips: 10.0.0.1, 10.0.0.2, 10.0.0.3, 10.0.0.4, 10.0.0.5, …",
        ]
    );
    assert_eq!(out[2].kind, EventType::Warning);
    assert_eq!(out[2].count, 9);
}

#[test]
fn the_rate_limit_holds_and_too_many_series_are_counted() {
    let t0 = Instant::now();
    let mut a = Aggregator::with(t0, Duration::ZERO, 2, Duration::from_secs(6));
    for i in 0..100 {
        a.record(
            Notice::Contested {
                kind: "rule",
                name: format!("r{i}"),
                actor: "x".into(),
            },
            t0,
            wall(),
        );
    }
    assert_eq!(a.take_dropped(), 100 - SERIES_MAX as u64);
    assert_eq!(drain(&mut a, t0).len(), 2);
    assert_eq!(a.next_due(), Some(t0 + Duration::from_secs(6)));
    assert_eq!(drain(&mut a, t0 + Duration::from_secs(60)).len(), 2);
    // Refused for good: forgotten, not retried.
    let p = a.take(t0 + Duration::from_secs(120)).unwrap();
    a.done(&p, Outcome::Rejected, t0 + Duration::from_secs(120));
    assert_eq!(a.unsent(), SERIES_MAX - 5);
}
