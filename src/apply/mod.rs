//! Applying a plan: rtnetlink requests, pipelined. All requests of a burst are queued on one
//! socket before the first ack is awaited (up to a window, so the acks never overrun the socket),
//! so a burst costs one kernel round trip per request but no user-space round trip per request.

pub mod encode;

use crate::plan::{Op, Step};
use futures::stream::{FuturesUnordered, StreamExt};
use nix::errno::Errno;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::Handle;
use std::time::Duration;
use thiserror::Error;

/// Requests in flight at once. Each ack is ~40 bytes of payload but a few hundred bytes of
/// socket buffer; 1024 stays far below the request socket's receive buffer.
const WINDOW: usize = 1024;
/// A request the kernel has not answered in this time is reported as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("kernel refused: {errno} ({desc})", errno = .0, desc = .0.desc())]
    Kernel(Errno),
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("the netlink connection closed")]
    Closed,
}

/// What became of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// EEXIST: someone (or an earlier request) put it back first.
    AlreadyThere,
    /// The kernel cannot take it yet (device or gateway missing, device down): retried when an
    /// event says the dependency may exist.
    NotYet(Errno),
    Failed(ApplyError),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Applied | Outcome::AlreadyThere)
    }
}

/// Errors that mean "the object depends on something that is not there yet".
pub fn is_not_yet(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ENODEV | Errno::ENETUNREACH | Errno::ENETDOWN | Errno::EHOSTUNREACH
    )
}

/// The message for an op, and the message the kernel would notify once it is done (the same).
pub fn message(op: &Op) -> RouteNetlinkMessage {
    match op {
        Op::AddRule { key, protocol } => RouteNetlinkMessage::NewRule(encode::rule(key, *protocol)),
        Op::DelRule { key, protocol } => RouteNetlinkMessage::DelRule(encode::rule(key, *protocol)),
        Op::PutRoute { route, oif } => RouteNetlinkMessage::NewRoute(encode::route(route, *oif)),
        Op::AddAddress {
            ifindex,
            address,
            prefix_len,
        } => RouteNetlinkMessage::NewAddress(encode::address(*ifindex, *address, *prefix_len)),
        Op::DelAddress {
            ifindex,
            address,
            prefix_len,
        } => RouteNetlinkMessage::DelAddress(encode::address(*ifindex, *address, *prefix_len)),
    }
}

fn flags(op: &Op) -> (bool, bool) {
    match op {
        Op::AddRule { .. } | Op::AddAddress { .. } => (true, false),
        Op::PutRoute { .. } => (true, true),
        Op::DelRule { .. } | Op::DelAddress { .. } => (false, false),
    }
}

fn is_delete(op: &Op) -> bool {
    matches!(op, Op::DelRule { .. } | Op::DelAddress { .. })
}

#[derive(Clone)]
pub struct Applier {
    handle: Handle,
}

impl Applier {
    pub fn new(handle: Handle) -> Applier {
        Applier { handle }
    }

    /// Sends every op of every step, pipelined, and returns one outcome per step.
    pub async fn apply(&mut self, steps: &[Step]) -> Vec<Outcome> {
        let mut answers: Vec<Vec<Option<Result<(), ApplyError>>>> =
            steps.iter().map(|s| vec![None; s.ops.len()]).collect();
        let mut inflight: FuturesUnordered<_> = FuturesUnordered::new();
        for (si, step) in steps.iter().enumerate() {
            for (oi, op) in step.ops.iter().enumerate() {
                while inflight.len() >= WINDOW {
                    if let Some((si, oi, r)) = inflight.next().await {
                        let (si, oi): (usize, usize) = (si, oi);
                        answers[si][oi] = Some(r);
                    }
                }
                let (create, replace) = flags(op);
                let req = encode::request(message(op), create, replace);
                // `request` queues the message at once, so requests reach the kernel in order.
                match self.handle.request(req) {
                    Ok(replies) => inflight.push(async move { (si, oi, answer(replies).await) }),
                    Err(_) => answers[si][oi] = Some(Err(ApplyError::Closed)),
                }
            }
        }
        while let Some((si, oi, r)) = inflight.next().await {
            answers[si][oi] = Some(r);
        }
        steps
            .iter()
            .zip(answers)
            .map(|(step, answers)| {
                let results: Vec<_> = answers
                    .into_iter()
                    .map(|r| r.unwrap_or(Err(ApplyError::Closed)))
                    .collect();
                outcome(&step.ops, &results)
            })
            .collect()
    }
}

/// Waits for the kernel's ack or error for one request.
async fn answer(
    mut replies: impl futures::Stream<Item = rtnetlink::packet_core::NetlinkMessage<RouteNetlinkMessage>>
        + Unpin,
) -> Result<(), ApplyError> {
    let wait = async {
        while let Some(reply) = replies.next().await {
            if let NetlinkPayload::Error(e) = reply.payload {
                return match e.code {
                    None => Ok(()),
                    Some(code) => Err(ApplyError::Kernel(Errno::from_raw(-code.get()))),
                };
            }
        }
        Ok(())
    };
    tokio::time::timeout(ANSWER_TIMEOUT, wait)
        .await
        .unwrap_or(Err(ApplyError::Timeout(ANSWER_TIMEOUT)))
}

/// A step succeeds when its last op (the add) does; a delete that finds nothing to delete is fine
/// (the old copy is already gone).
fn outcome(ops: &[Op], results: &[Result<(), ApplyError>]) -> Outcome {
    for (op, r) in ops.iter().zip(results) {
        match r {
            Ok(()) => {}
            Err(ApplyError::Kernel(Errno::ENOENT | Errno::ESRCH | Errno::EADDRNOTAVAIL))
                if is_delete(op) => {}
            Err(ApplyError::Kernel(Errno::EEXIST)) if !is_delete(op) => {
                return Outcome::AlreadyThere
            }
            Err(ApplyError::Kernel(e)) if is_not_yet(*e) => return Outcome::NotYet(*e),
            Err(e) => return Outcome::Failed(e.clone()),
        }
    }
    Outcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, RuleAction, RuleKey};

    fn key() -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            1,
            None,
            None,
            None,
            None,
            None,
            None,
            77,
            RuleAction::Lookup,
        )
    }

    #[test]
    fn outcomes_classify_errnos() {
        let add = [Op::AddRule {
            key: key(),
            protocol: None,
        }];
        let k = |e| Err(ApplyError::Kernel(e));
        assert_eq!(outcome(&add, &[Ok(())]), Outcome::Applied);
        assert_eq!(outcome(&add, &[k(Errno::EEXIST)]), Outcome::AlreadyThere);
        assert_eq!(
            outcome(&add, &[k(Errno::ENODEV)]),
            Outcome::NotYet(Errno::ENODEV)
        );
        assert_eq!(
            outcome(&add, &[k(Errno::ENETUNREACH)]),
            Outcome::NotYet(Errno::ENETUNREACH)
        );
        assert_eq!(
            outcome(&add, &[k(Errno::EINVAL)]),
            Outcome::Failed(ApplyError::Kernel(Errno::EINVAL))
        );
        let swap = [
            Op::DelRule {
                key: key(),
                protocol: Some(3),
            },
            Op::AddRule {
                key: key(),
                protocol: None,
            },
        ];
        assert_eq!(
            outcome(&swap, &[k(Errno::ENOENT), Ok(())]),
            Outcome::Applied
        );
        assert_eq!(
            outcome(&swap, &[k(Errno::EPERM), Ok(())]),
            Outcome::Failed(ApplyError::Kernel(Errno::EPERM))
        );
    }
}
