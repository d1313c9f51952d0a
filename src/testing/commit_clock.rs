//! Commit-to-commit timing for the chain and nftables benchmarks, read on an nf_tables
//! notification socket the way any other process would see the transactions: from the NEWGEN of
//! a trigger process's transaction (a deletion) to the NEWGEN of the repair. The repair is
//! either whoever commits next (the agent), or a process spawned here the instant the trigger's
//! NEWGEN arrives (the reactive floor: a perfectly reactive script doing the agent's work).

use crate::nftables::events::{Event, Events};
use std::io;
use std::process::Child;
use std::time::{Duration, Instant};

/// How long a run may take before it is not timed.
const RUN_BOUND: Duration = Duration::from_secs(5);

/// Times one run: `trigger` (already spawned, not waited for: the socket must be read while it
/// commits) and, for the reactive floor, `spawn_repair`, run at the trigger's NEWGEN. Both
/// processes are waited for. `Ok(None)`: not timed (a NEWGEN not seen within 5 s, or this
/// socket lost notifications: a burst of thousands of elements can overrun it).
///
/// # Errors
///
/// The socket fails, or the trigger or the spawned repair exits unsuccessfully.
pub async fn commit_to_commit(
    events: &mut Events,
    mut trigger: Child,
    spawn_repair: Option<impl FnOnce() -> io::Result<Child>>,
) -> io::Result<Option<f64>> {
    let me = Some(trigger.id());
    let mut spawn_repair = spawn_repair.map(Some);
    let mut t0 = None;
    let mut repairer: Option<Child> = None;
    let deadline = Instant::now() + RUN_BOUND;
    let mut out = None;
    let mut lost = false;
    while out.is_none() && !lost && Instant::now() < deadline {
        let Ok(batch) = tokio::time::timeout(RUN_BOUND, events.next()).await else {
            break;
        };
        let now = Instant::now();
        for ev in batch? {
            if ev == Event::Overrun {
                lost = true;
            }
            let Event::NewGen { pid, .. } = ev else {
                continue;
            };
            if pid == me && t0.is_none() {
                t0 = Some(now);
                if let Some(spawn) = spawn_repair.as_mut().and_then(Option::take) {
                    repairer = Some(spawn()?);
                }
            } else if let Some(t0) = t0 {
                let ends = match (&spawn_repair, &repairer) {
                    (None, _) => pid != me,
                    (Some(_), Some(r)) => pid == Some(r.id()),
                    (Some(_), None) => false,
                };
                if ends && out.is_none() {
                    out = Some((now - t0).as_secs_f64() * 1e3);
                }
            }
        }
    }
    succeeded(&mut trigger, "the trigger")?;
    if let Some(mut r) = repairer {
        succeeded(&mut r, "the spawned repair")?;
    }
    drain(events).await;
    Ok(out.filter(|_| !lost))
}

/// Reads whatever notifications are still queued (until 2 ms pass without one).
pub async fn drain(events: &mut Events) {
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(2), events.next()).await {}
}

fn succeeded(child: &mut Child, what: &str) -> io::Result<()> {
    let status = child.wait()?;
    if status.success() {
        Ok(())
    } else {
        Err(io::Error::other(format!("{what} failed: {status}")))
    }
}
