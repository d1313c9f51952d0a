//! Signals for `netwarden run`, from the process's first instruction to its last: SIGTERM and
//! SIGINT stop the agent cleanly (exit 0, everything left in place) whenever they come, also
//! before the handlers could be installed or during the initial sync; SIGHUP never kills it.
//!
//! The handlers need the async runtime, which exists only once the namespace is entered and the
//! config read. Until then the three signals are held pending (blocked), not left to their
//! default action (which kills the process: exit 143 for SIGTERM). Installing the handlers then
//! lets them through.

use nix::sys::signal::{SigSet, Signal as Sig};
use tokio::signal::unix::{signal, Signal, SignalKind};

fn held() -> SigSet {
    let mut set = SigSet::empty();
    for s in [Sig::SIGTERM, Sig::SIGINT, Sig::SIGHUP] {
        set.add(s);
    }
    set
}

/// Holds SIGTERM, SIGINT and SIGHUP pending for the calling thread and the threads it starts
/// from now on. Call first in `main`, before any thread exists.
pub fn hold() {
    let _ = held().thread_block();
}

/// Lets the held signals through again: for commands that install no handler, whose signals
/// keep their default action.
pub fn release() {
    let _ = held().thread_unblock();
}

/// SIGTERM or SIGINT: stop.
#[derive(Debug)]
pub struct Stop {
    term: Signal,
    int: Signal,
}

impl Stop {
    /// Completes at the next SIGTERM or SIGINT (one received before the call counts).
    pub async fn requested(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Installs the handlers (call inside the runtime), then lets the held signals through: one
/// that came in the meantime reaches its handler now. Returns the stop signals and the SIGHUP
/// stream (a SIGHUP that comes before anything reads the stream is kept for its first read).
///
/// # Errors
///
/// When a handler cannot be installed.
pub fn install() -> std::io::Result<(Stop, Signal)> {
    let term = signal(SignalKind::terminate())?;
    let int = signal(SignalKind::interrupt())?;
    let hup = signal(SignalKind::hangup())?;
    release();
    Ok((Stop { term, int }, hup))
}
