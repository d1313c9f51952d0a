//! An independent rtnetlink listener on its own thread and socket: sees the kernel's
//! notifications the way any other process would, with a timestamp taken on arrival. The demo and
//! the benchmarks use it to time repairs from outside the agent.

use crate::observe::decode::each_message;
use crate::observe::events::GROUPS;
use crate::observe::kernel::EVENT_RCVBUF;
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Only IPv4 rules: for timing rule repairs beside a churning route table, whose notifications
/// would otherwise queue in front of the one being timed (and cost the listener CPU).
pub const IPV4_RULES: u32 = 1 << 7;

/// A notification and when it arrived. `None` message: the socket overran.
pub type Seen = (Instant, Option<RouteNetlinkMessage>);

pub struct Listener {
    rx: Receiver<Seen>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Listener {
    /// Subscribes in the calling thread's network namespace; the socket is bound before this
    /// returns, so every change made afterwards is seen.
    pub fn start() -> std::io::Result<Listener> {
        Listener::start_groups(GROUPS)
    }

    /// [`Listener::start`] for some multicast groups only (bits as in [`GROUPS`]).
    pub fn start_groups(groups: u32) -> std::io::Result<Listener> {
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        sock.bind(&SocketAddr::new(0, groups))?;
        {
            use nix::sys::socket::{setsockopt, sockopt};
            let _ = setsockopt(&sock.as_fd(), sockopt::RcvBufForce, &EVENT_RCVBUF);
            let tv = nix::sys::time::TimeVal::new(0, 50_000);
            setsockopt(&sock.as_fd(), sockopt::ReceiveTimeout, &tv)
                .map_err(std::io::Error::from)?;
        }
        let (tx, rx) = channel();
        let stop = Arc::new(AtomicBool::new(false));
        let halt = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut buf: Vec<u8> = Vec::with_capacity(1 << 20);
            while !halt.load(Ordering::Relaxed) {
                buf.clear();
                match sock.recv(&mut buf, 0) {
                    Ok(_) => {
                        let now = Instant::now();
                        let sent = each_message(&buf, |msg| match msg.payload {
                            NetlinkPayload::InnerMessage(m) => match tx.send((now, Some(m))) {
                                Ok(()) => ControlFlow::Continue(()),
                                Err(_) => ControlFlow::Break(()),
                            },
                            _ => ControlFlow::Continue(()),
                        });
                        if sent.is_break() {
                            return; // nobody listens any more
                        }
                    }
                    Err(e) if e.raw_os_error() == Some(libc_enobufs()) => {
                        if tx.send((Instant::now(), None)).is_err() {
                            return;
                        }
                    }
                    Err(_) => {} // timeout: check the stop flag
                }
            }
        });
        Ok(Listener {
            rx,
            stop,
            thread: Some(thread),
        })
    }

    /// The next notification, waiting at most `timeout`.
    pub fn next(&self, timeout: Duration) -> Option<Seen> {
        self.rx.recv_timeout(timeout).ok()
    }

    /// Waits until `done` says yes for a notification, or the deadline passes.
    pub fn wait_for(&self, deadline: Instant, mut done: impl FnMut(&Seen) -> bool) -> Option<Seen> {
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            let seen = self.next(left)?;
            if done(&seen) {
                return Some(seen);
            }
        }
    }

    /// Drops what has queued up so far.
    pub fn drain(&self) {
        while self.rx.try_recv().is_ok() {}
    }
}

fn libc_enobufs() -> i32 {
    nix::errno::Errno::ENOBUFS as i32
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
