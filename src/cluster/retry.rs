//! When to ask the API server again after a request failed. Pure: the failure is classified by
//! what the server said (or that it said nothing), and the delay follows from the class.
//!
//! - **Unreachable** (connection refused or reset, no route): retried every second, never more
//!   slowly, so that facts are current within about a second of the server answering again. A
//!   refused connection costs the server nothing; a server that answers with errors is another
//!   case.
//! - **Expired** (410 Gone on a watch or a continue token): relisted at once, as client-go does.
//! - **Answered** with an error (403, 401, 429, 5xx, …) or a request that timed out: exponential
//!   from 1 s, doubling, capped at 30 s, with a little upward jitter. The streak only resets once
//!   a watch delivers (an event, a bookmark, or a clean end after its timeout): a successful list
//!   followed by a failing watch keeps growing the delay, unlike a backoff reset by any success.
//!
//! With 1, 2, 4, 8, 16 and then 30 s, a persistent error is asked at most once per 30 s from
//! 31 s on. `scale` shrinks every delay (tests use it to run the same schedule faster).
//!
//! A 429 or any 5xx with `Retry-After: N` (kube-apiserver's API Priority and Fairness, its
//! max-in-flight limit, a storage timeout, a storage layer not ready, a server shutting down)
//! waits at least N seconds, as client-go does; the schedule above stays the floor. N is capped at [`RETRY_AFTER_MAX`], the same
//! 30 s as the schedule's own cap: whatever sits in front of the API server (a load balancer, a
//! proxy) may say an hour, and facts an hour stale are worse for the node than one request a
//! half-minute, which is no more than a persistent error already costs. The server's N is not
//! shrunk by `scale`: it is the server's time, not the agent's schedule.

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Retry interval while the server cannot be reached at all.
pub const UNREACHABLE: Duration = Duration::from_secs(1);
/// First delay after the server answered with an error.
pub const ANSWERED_BASE: Duration = Duration::from_secs(1);
/// Longest delay after errors.
pub const ANSWERED_MAX: Duration = Duration::from_secs(30);
/// Longest wait a `Retry-After` imposes (see the module's note).
pub const RETRY_AFTER_MAX: Duration = ANSWERED_MAX;

/// What went wrong with a request, as far as retrying is concerned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Failure {
    /// No answer: the connection failed or broke.
    Unreachable(String),
    /// 410: the resourceVersion or continue token is too old; relist.
    Expired,
    /// The server answered with an error Status.
    Answered {
        code: u16,
        reason: String,
        message: String,
        /// The wait its `Retry-After` asks for (429 and 5xx only), capped.
        retry_after: Option<Duration>,
    },
    /// No complete answer within the request's deadline (an overloaded server).
    Timeout,
}

impl Failure {
    /// A short, fixed label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Failure::Unreachable(_) => "unreachable",
            Failure::Expired => "expired",
            Failure::Timeout => "timeout",
            Failure::Answered { code, .. } => match code {
                401 => "unauthorized",
                403 => "forbidden",
                404 => "not_found",
                429 => "too_many_requests",
                500..=599 => "server_error",
                _ => "other",
            },
        }
    }

    /// Classifies a kube client error.
    pub fn of(e: &kube::Error) -> Failure {
        match e {
            kube::Error::Api(s) if s.code == 410 => Failure::Expired,
            kube::Error::Api(s) => Failure::Answered {
                code: s.code,
                reason: s.reason.clone(),
                message: s.message.clone(),
                retry_after: None,
            },
            other => Failure::Unreachable(other.to_string()),
        }
    }

    /// An error response: its code, its `Retry-After` header, its body (a Status, or the plain
    /// text kube-apiserver's max-in-flight and priority-and-fairness filters answer 429 with).
    pub fn of_response(code: u16, retry_after_header: Option<&[u8]>, body: &[u8]) -> Failure {
        if code == 410 {
            return Failure::Expired;
        }
        let status: Option<kube::core::Status> = serde_json::from_slice(body).ok();
        let (reason, message) = match status {
            Some(s) => (s.reason, s.message),
            None => (
                String::new(),
                String::from_utf8_lossy(&body[..body.len().min(200)])
                    .trim()
                    .to_owned(),
            ),
        };
        Failure::Answered {
            code,
            reason,
            message,
            retry_after: retry_after(code, retry_after_header),
        }
    }

    /// The wait the server asked for, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Failure::Answered { retry_after, .. } => *retry_after,
            _ => None,
        }
    }
}

/// The wait a response's `Retry-After` asks for: only on 429 and 5xx (kube-apiserver sends it
/// with a Status whose `retryAfterSeconds` is set: throttling, storage timeouts, shutdown;
/// client-go honours it on the same codes), only in whole seconds (what kube-apiserver sends; an HTTP date or anything else
/// is ignored and the agent's own schedule applies), capped at [`RETRY_AFTER_MAX`].
pub fn retry_after(code: u16, header: Option<&[u8]>) -> Option<Duration> {
    if code != 429 && !(500..600).contains(&code) {
        return None;
    }
    let text = std::str::from_utf8(header?).ok()?.trim();
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // All digits: too many of them for a u64 is a huge value, capped like any other.
    let seconds = text.parse::<u64>().unwrap_or(u64::MAX);
    Some(Duration::from_secs(seconds).min(RETRY_AFTER_MAX))
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Unreachable(e) => write!(f, "unreachable: {e}"),
            Failure::Expired => write!(f, "expired (410 Gone)"),
            Failure::Timeout => write!(f, "no answer in time"),
            Failure::Answered {
                code,
                reason,
                message,
                retry_after,
            } => {
                if reason.is_empty() {
                    write!(f, "{code}: {message}")?;
                } else {
                    write!(f, "{code} {reason}: {message}")?;
                }
                match retry_after {
                    Some(w) => write!(f, " (retry after {} s)", w.as_secs()),
                    None => Ok(()),
                }
            }
        }
    }
}

/// The delay schedule of one watch (or of the Event recorder).
#[derive(Debug)]
pub struct Backoff {
    scale: f64,
    /// Errors answered since the last sign of health.
    streak: u32,
}

impl Backoff {
    pub fn new(scale: f64) -> Backoff {
        Backoff { scale, streak: 0 }
    }

    /// How long to wait before the next request after `failure`: the schedule, or what the
    /// server's `Retry-After` asked for when that is longer.
    pub fn after(&mut self, failure: &Failure) -> Duration {
        match failure {
            Failure::Expired => Duration::ZERO,
            // Never growing: a dead endpoint costs nothing to ask, and the moment it answers
            // again the agent should know. Jitter downwards only, so the bound holds.
            Failure::Unreachable(_) => {
                UNREACHABLE.mul_f64(self.scale * (1.0 - 0.25 * unit_random()))
            }
            Failure::Answered { .. } | Failure::Timeout => {
                let doubled = ANSWERED_BASE.saturating_mul(1u32 << self.streak.min(16));
                self.streak = self.streak.saturating_add(1);
                let schedule = doubled.min(ANSWERED_MAX).mul_f64(self.scale);
                let asked = failure.retry_after().unwrap_or(Duration::ZERO);
                // Upwards only: the cap and the server's wait are floors, never undercut; the
                // jitter spreads the nodes a throttling server told the same N.
                schedule.max(asked).mul_f64(1.0 + 0.1 * unit_random())
            }
        }
    }

    /// The watch delivered: the next error starts the schedule again.
    pub fn healthy(&mut self) {
        self.streak = 0;
    }

    pub fn streak(&self) -> u32 {
        self.streak
    }
}

/// A number in [0, 1) from the standard library's randomly keyed hasher (jitter needs no more).
fn unit_random() -> f64 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(0x9e37_79b9_7f4a_7c15);
    (h.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden() -> Failure {
        Failure::Answered {
            code: 403,
            reason: "Forbidden".into(),
            message: "services is forbidden".into(),
            retry_after: None,
        }
    }

    #[test]
    fn a_persistent_error_is_asked_at_most_every_30s_after_a_minute() {
        let mut b = Backoff::new(1.0);
        let mut t = Duration::ZERO;
        let mut requests = vec![t];
        while t < Duration::from_secs(600) {
            t += b.after(&forbidden());
            requests.push(t);
        }
        for pair in requests.windows(2) {
            if pair[0] >= Duration::from_secs(60) {
                assert!(pair[1] - pair[0] >= ANSWERED_MAX, "{requests:?}");
            }
        }
        // And it does not give up: about one request per 30-33 s.
        let late = requests
            .iter()
            .filter(|r| **r >= Duration::from_secs(300))
            .count();
        assert!((8..=11).contains(&late), "{late} requests in 300 s");
        // The first minute is not a tight loop either: 1 + 2 + 4 + 8 + 16 + 30.
        let first_minute = requests
            .iter()
            .filter(|r| **r < Duration::from_secs(60))
            .count();
        assert!(first_minute <= 7, "{requests:?}");
    }

    #[test]
    fn the_streak_survives_a_list_and_resets_only_when_healthy() {
        let mut b = Backoff::new(1.0);
        for _ in 0..5 {
            b.after(&forbidden());
        }
        assert!(b.after(&forbidden()) >= Duration::from_secs(30));
        b.healthy();
        let d = b.after(&forbidden());
        assert!(
            d >= ANSWERED_BASE && d < Duration::from_millis(1200),
            "{d:?}"
        );
    }

    #[test]
    fn unreachable_is_asked_every_second_and_expiry_at_once() {
        let mut b = Backoff::new(1.0);
        for _ in 0..100 {
            let d = b.after(&Failure::Unreachable("refused".into()));
            assert!(d <= UNREACHABLE && d >= UNREACHABLE.mul_f64(0.75), "{d:?}");
        }
        assert_eq!(b.after(&Failure::Expired), Duration::ZERO);
        // Unreachable does not grow the streak.
        assert_eq!(b.streak(), 0);
        let scaled = Backoff::new(0.05).after(&forbidden());
        assert!(scaled <= Duration::from_millis(60), "{scaled:?}");
    }

    #[test]
    fn labels_name_what_the_server_said() {
        assert_eq!(forbidden().label(), "forbidden");
        let status = |code| Failure::Answered {
            code,
            reason: String::new(),
            message: String::new(),
            retry_after: None,
        };
        assert_eq!(status(429).label(), "too_many_requests");
        assert_eq!(status(503).label(), "server_error");
        assert_eq!(status(401).label(), "unauthorized");
        assert_eq!(Failure::Unreachable("x".into()).label(), "unreachable");
        assert!(forbidden().to_string().contains("403 Forbidden"));
    }

    #[test]
    fn retry_after_in_whole_seconds_on_429_and_5xx_only() {
        let secs = Duration::from_secs;
        assert_eq!(retry_after(429, Some(b"5")), Some(secs(5)));
        assert_eq!(retry_after(503, Some(b" 12 ")), Some(secs(12)));
        assert_eq!(retry_after(429, Some(b"0")), Some(Duration::ZERO));
        // Absent, or a code that gives the header no such meaning.
        assert_eq!(retry_after(429, None), None);
        assert_eq!(retry_after(500, Some(b"5")), Some(secs(5)));
        assert_eq!(retry_after(504, Some(b"2")), Some(secs(2)));
        assert_eq!(retry_after(403, Some(b"5")), None);
        assert_eq!(retry_after(409, Some(b"5")), None);
        assert_eq!(retry_after(301, Some(b"5")), None);
        // Garbage, negative, fractional, an HTTP date: the agent's own schedule applies.
        for bad in [
            &b""[..],
            b"   ",
            b"soon",
            b"-1",
            b"1.5",
            b"5s",
            b"0x10",
            b"Wed, 21 Oct 2015 07:28:00 GMT",
            b"\xff\xfe",
        ] {
            assert_eq!(retry_after(429, Some(bad)), None, "{bad:?}");
        }
        // Huge values, and more digits than a u64 holds, are capped.
        assert_eq!(retry_after(429, Some(b"3600")), Some(RETRY_AFTER_MAX));
        assert_eq!(
            retry_after(503, Some(b"99999999999999999999999999")),
            Some(RETRY_AFTER_MAX)
        );
        assert_eq!(retry_after(429, Some(b"30")), Some(secs(30)));
    }

    #[test]
    fn a_wait_asked_for_is_a_floor_the_schedule_still_applies_above_it() {
        let throttled = |secs| Failure::Answered {
            code: 429,
            reason: "TooManyRequests".into(),
            message: "Too many requests".into(),
            retry_after: Some(Duration::from_secs(secs)),
        };
        // A scaled schedule (50 ms) does not undercut the server's 2 s, nor is 2 s scaled.
        let mut b = Backoff::new(0.05);
        let d = b.after(&throttled(2));
        assert!(
            d >= Duration::from_secs(2) && d <= Duration::from_millis(2200),
            "{d:?}"
        );
        // Once the schedule is longer than what is asked, the schedule wins.
        let mut b = Backoff::new(1.0);
        for _ in 0..5 {
            b.after(&forbidden());
        }
        let d = b.after(&throttled(1));
        assert!(d >= ANSWERED_MAX, "{d:?}");
        // A throttled answer counts in the streak like any error answered.
        assert_eq!(b.streak(), 6);
        // Retry-After: 0 leaves the schedule as it is.
        let d = Backoff::new(1.0).after(&throttled(0));
        assert!(
            d >= ANSWERED_BASE && d < Duration::from_millis(1200),
            "{d:?}"
        );
    }

    #[test]
    fn error_responses_are_read_with_their_retry_after() {
        let body = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"services is forbidden: User \"x\" cannot list resource \"services\"","reason":"Forbidden","code":403}"#;
        match Failure::of_response(403, None, body) {
            Failure::Answered {
                code: 403,
                reason,
                message,
                retry_after: None,
            } => {
                assert_eq!(reason, "Forbidden");
                assert!(message.contains("cannot list"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(Failure::of_response(410, None, b"{}"), Failure::Expired);
        match Failure::of_response(502, Some(b"3"), b"<html>bad gateway</html>") {
            Failure::Answered {
                code,
                message,
                retry_after,
                ..
            } => {
                assert_eq!(code, 502);
                assert!(message.contains("bad gateway"));
                assert_eq!(
                    retry_after,
                    Some(Duration::from_secs(3)),
                    "as client-go: any 5xx"
                );
            }
            other => panic!("{other:?}"),
        }
        // Priority and fairness: plain text and the header.
        let f = Failure::of_response(
            429,
            Some(b"4"),
            b"Too many requests, please try again later.\n",
        );
        assert_eq!(f.retry_after(), Some(Duration::from_secs(4)));
        assert_eq!(f.label(), "too_many_requests");
        assert_eq!(
            f.to_string(),
            "429: Too many requests, please try again later. (retry after 4 s)"
        );
    }
}
