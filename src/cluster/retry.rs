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

use std::hash::{BuildHasher, Hasher};
use std::time::Duration;

/// Retry interval while the server cannot be reached at all.
pub const UNREACHABLE: Duration = Duration::from_secs(1);
/// First delay after the server answered with an error.
pub const ANSWERED_BASE: Duration = Duration::from_secs(1);
/// Longest delay after errors.
pub const ANSWERED_MAX: Duration = Duration::from_secs(30);

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
            },
            other => Failure::Unreachable(other.to_string()),
        }
    }
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
            } => write!(f, "{code} {reason}: {message}"),
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

    /// How long to wait before the next request after `failure`.
    pub fn after(&mut self, failure: &Failure) -> Duration {
        let (base, spread) = match failure {
            Failure::Expired => return Duration::ZERO,
            // Never growing: a dead endpoint costs nothing to ask, and the moment it answers
            // again the agent should know. Jitter downwards only, so the bound holds.
            Failure::Unreachable(_) => (UNREACHABLE, -0.25),
            Failure::Answered { .. } | Failure::Timeout => {
                let doubled = ANSWERED_BASE.saturating_mul(1u32 << self.streak.min(16));
                self.streak = self.streak.saturating_add(1);
                // Upwards only: the cap is a floor on the interval, never undercut.
                (doubled.min(ANSWERED_MAX), 0.1)
            }
        };
        base.mul_f64(self.scale * (1.0 + spread * unit_random()))
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
        };
        assert_eq!(status(429).label(), "too_many_requests");
        assert_eq!(status(503).label(), "server_error");
        assert_eq!(status(401).label(), "unauthorized");
        assert_eq!(Failure::Unreachable("x".into()).label(), "unreachable");
        assert!(forbidden().to_string().contains("403 Forbidden"));
    }
}
