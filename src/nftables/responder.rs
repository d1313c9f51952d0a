//! The responder: the process's one reader of nf_tables notifications. It commits the images
//! the engines armed ([`super::armed`]) the moment it reads the deleting transaction's NEWGEN,
//! then relays the notifications to the engines ([`subscribe`]).
//!
//! Why this shape: a repair must commit before the deleter closes its socket, a fraction of a
//! millisecond after its NEWGEN, or it waits an RCU grace period behind that close (see
//! [`super::replay`]). Woken on another CPU, any thread (an engine's task behind the runtime's
//! reactor all the more) is too slow where waking an idle CPU takes longer than that, as on a
//! virtual machine. A thread woken on the deleter's own CPU runs before the deleter gets that
//! far. So one *sentinel* thread is pinned to each CPU the agent may run on, blocked in
//! `recv()` on a socket of its own whose filter lets only NEWGEN messages through: the
//! deleter's NEWGEN wakes the sentinel on its CPU, which reads what the transaction did from
//! the shared notification socket and commits at once. The sentinels on the other CPUs find it
//! done. The engines are woken only afterwards, through the relay: their threads do not compete
//! for the CPU either.
//!
//! Started at the first subscription, in the network namespace of the thread that subscribes
//! (the agent's); its sockets are kept for the process's life (closing a netfilter socket waits
//! for pending destruction). The engines still decide everything: they claim, at the same
//! NEWGEN, what was committed for them ([`claim`]), and commit themselves what was not.

use super::armed::{after, Armed, Board, Claim, Outcome};
use super::events::{parse_datagram, Event, Events};
use super::netlink::{Conn, NetlinkError};
use super::replay::Image;
use nix::libc;
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};
use std::io;
use std::os::fd::AsFd;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};
use tracing::{debug, warn};

const GROUP_NFTABLES: u32 = 7;
/// nf_tables' NEWGEN message type (subsystem 10, message 15).
const NEWGEN_TYPE: u16 = (10 << 8) | 15;
/// Datagrams queued for an engine before it is told that notifications were lost (as its own
/// socket's buffer would overrun).
const RELAY_QUEUE: usize = 4096;
/// How long an engine waits for the responder to be done with a transaction. It is done
/// before it relays the transaction, so this only bounds a failure.
const CLAIM_WAIT: Duration = Duration::from_secs(2);
/// More sentinels than this are not started (a sentinel costs a thread and a wake-up at every
/// transaction).
const MAX_SENTINELS: usize = 256;

/// One engine's queue of relayed notifications.
struct Relay {
    tx: tokio::sync::mpsc::Sender<Vec<Event>>,
    /// Datagrams were dropped (the queue was full): an overrun is owed first.
    lost: bool,
}

impl Relay {
    /// Queues one batch of events; false once the engine is gone.
    fn send(&mut self, events: &[Event]) -> bool {
        use tokio::sync::mpsc::error::TrySendError;
        if self.lost {
            match self.tx.try_send(vec![Event::Overrun]) {
                Ok(()) => self.lost = false,
                Err(TrySendError::Full(_)) => return true,
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        match self.tx.try_send(events.to_vec()) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                self.lost = true;
                true
            }
            Err(TrySendError::Closed(_)) => false,
        }
    }
}

/// Everything the sentinels share, behind one lock.
struct Reader {
    /// Subscribed to every nf_tables notification; read by whichever sentinel is first.
    socket: Socket,
    conn: Conn,
    board: Board,
    relays: Vec<Relay>,
    /// The last NEWGEN handled: the same NEWGEN read again on another socket is a copy.
    last_gen: Option<u32>,
}

struct Shared {
    reader: Mutex<Reader>,
    handled: Condvar,
    /// The sentinels' thread ids (what nf_tables names in the NEWGEN of their commits).
    tids: Vec<u32>,
    /// The shared socket failed: claims find nothing, arms are dropped.
    stopped: std::sync::atomic::AtomicBool,
}

impl Shared {
    fn reader(&self) -> MutexGuard<'_, Reader> {
        self.reader.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::Relaxed)
    }
}

static RESPONDER: OnceLock<Mutex<Option<Arc<Shared>>>> = OnceLock::new();

fn running() -> Option<Arc<Shared>> {
    let slot = RESPONDER.get()?.lock().unwrap_or_else(|e| e.into_inner());
    slot.as_ref().filter(|s| !s.is_stopped()).cloned()
}

/// The nf_tables notifications, relayed once the responder has acted on them; starts it (again,
/// if its socket failed) at the first call. Call before the first read of the tables, so that
/// no change falls between the read and the subscription.
pub fn subscribe() -> io::Result<Events> {
    let mut slot = RESPONDER
        .get_or_init(|| Mutex::new(None))
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let shared = match slot.as_ref().filter(|s| !s.is_stopped()) {
        Some(s) => Arc::clone(s),
        None => {
            let s = start()?;
            *slot = Some(Arc::clone(&s));
            s
        }
    };
    let (tx, rx) = tokio::sync::mpsc::channel(RELAY_QUEUE);
    shared.reader().relays.push(Relay { tx, lost: false });
    Ok(Events::relayed(rx, shared.tids.clone()))
}

/// Replaces what engine `owner` has armed (see [`Board::arm`]).
pub fn arm(owner: u64, at_gen: Option<u32>, armed: Vec<Armed>) {
    let Some(s) = running() else { return };
    let mut reader = s.reader();
    let before = reader.board.armed(owner);
    reader.board.arm(owner, at_gen, armed);
    let now = reader.board.armed(owner);
    if now != before {
        debug!(owner, armed = now, "images armed");
    }
}

/// What became of `images` at generation `genid`: `None` when the responder did not commit
/// them (the caller does).
pub fn claim(images: &[&Image], genid: u32) -> Option<Result<u32, NetlinkError>> {
    let s = running()?;
    let deadline = Instant::now() + CLAIM_WAIT;
    let mut reader = s.reader();
    loop {
        let outcome = match reader.board.claim(images, genid) {
            Claim::NotFired => return None,
            Claim::Partly => return Some(Err(NetlinkError::PartlyReplayed)),
            Claim::Done(o) => o,
            Claim::Wait => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() || s.is_stopped() {
                    warn!(genid, "the nf_tables responder did not get to the transaction in time: committing from the engine");
                    return None;
                }
                reader = s
                    .handled
                    .wait_timeout(reader, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
                continue;
            }
        };
        return Some(match outcome {
            Outcome::Committed { tid } => Ok(tid),
            Outcome::Refused(errno) => {
                Err(NetlinkError::Refused(nix::errno::Errno::from_raw(errno)))
            }
            Outcome::Failed(e) => Err(NetlinkError::Io(io::Error::other(e))),
        });
    }
}

/// Commits images at generation `genid` (see [`super::netlink::replay`]), unless the responder
/// has already, at the same NEWGEN: then what it got.
pub fn replay(images: &[&Image], genid: u32) -> Result<u32, NetlinkError> {
    claim(images, genid).unwrap_or_else(|| super::netlink::replay(images, genid))
}

fn start() -> io::Result<Arc<Shared>> {
    let mut socket = Socket::new(NETLINK_NETFILTER)?;
    socket.bind_auto()?;
    // A `nft flush ruleset` of big tables is one burst, read at its NEWGEN.
    socket.set_rx_buf_sz(8 * 1024 * 1024)?;
    socket.add_membership(GROUP_NFTABLES)?;
    socket.set_non_blocking(true)?;
    let cpus = allowed_cpus();
    let mut wakes = Vec::with_capacity(cpus.len());
    for cpu in cpus {
        match wake_socket() {
            Ok(s) => wakes.push((cpu, s)),
            // Out of descriptors, say: fewer sentinels, not none.
            Err(e) if !wakes.is_empty() => {
                warn!(error = %e, sentinels = wakes.len(), "fewer nf_tables sentinels than CPUs");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    let mut conn = Conn::open()?;
    // Read after subscribing: an engine's claim at a later generation waits for its NEWGEN.
    let gen = conn
        .generation()
        .map_err(|e| io::Error::other(e.to_string()))?;
    // Each sentinel says who it is before it is given the state that names them all.
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let mut handing = Vec::with_capacity(wakes.len());
    for (cpu, wake) in wakes {
        let (shared_tx, shared_rx) = std::sync::mpsc::sync_channel::<Arc<Shared>>(1);
        let tid_tx = tid_tx.clone();
        let spawned = std::thread::Builder::new()
            .name(cpu.map_or("nft-sentinel".into(), |c| format!("nft-sentinel{c}")))
            .stack_size(256 * 1024)
            .spawn(move || {
                pin_to(cpu);
                short_slice();
                let tid = nix::unistd::gettid().as_raw() as u32;
                let _ = tid_tx.send(tid);
                let Ok(s) = shared_rx.recv() else { return };
                if let Some(e) = watch(&s, &wake, tid) {
                    warn!(error = %e, "the nf_tables notification socket failed");
                    s.stopped.store(true, std::sync::atomic::Ordering::Relaxed);
                    s.handled.notify_all();
                    // The engines' queues close: they see the failure as their socket's.
                    s.reader().relays.clear();
                }
            });
        match spawned {
            Ok(_) => handing.push(shared_tx),
            Err(e) if !handing.is_empty() => {
                warn!(error = %e, sentinels = handing.len(), "fewer nf_tables sentinels than CPUs");
                break;
            }
            Err(e) => return Err(e),
        }
    }
    drop(tid_tx);
    let tids: Vec<u32> = tid_rx.iter().take(handing.len()).collect();
    let shared = Arc::new(Shared {
        reader: Mutex::new(Reader {
            socket,
            conn,
            board: Board::at(Some(gen)),
            relays: Vec::new(),
            last_gen: Some(gen),
        }),
        handled: Condvar::new(),
        tids,
        stopped: false.into(),
    });
    for tx in handing {
        let _ = tx.send(Arc::clone(&shared));
    }
    debug!(sentinels = shared.tids.len(), "nf_tables responder started");
    Ok(shared)
}

/// The CPUs this process may run on (at most [`MAX_SENTINELS`]); one, unpinned, when they
/// cannot be read.
fn allowed_cpus() -> Vec<Option<usize>> {
    let Ok(set) = nix::sched::sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return vec![None];
    };
    let cpus: Vec<Option<usize>> = (0..nix::sched::CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .map(Some)
        .take(MAX_SENTINELS)
        .collect();
    if cpus.is_empty() {
        vec![None]
    } else {
        cpus
    }
}

fn pin_to(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    let mut set = nix::sched::CpuSet::new();
    if set.set(cpu).is_ok() {
        // Unpinned, it still helps: a wake-up on an idle CPU may come in time.
        let _ = nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set);
    }
}

/// Asks the scheduler for short time slices (EEVDF's custom slice, Linux 6.12+; no privilege
/// needed, and no more CPU time: the thread's weight is unchanged). A task with a short slice
/// has an early deadline when woken, so it is run before the task it woke up beside (the
/// deleter) goes on to close its socket; with the default slice the deleter is usually let
/// run on. Older kernels ignore the field or refuse: nothing else changes.
fn short_slice() {
    /// `struct sched_attr` (include/uapi/linux/sched/types.h).
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }
    const SLICE_NS: u64 = 100_000;
    let size = std::mem::size_of::<SchedAttr>() as u32;
    let mut attr = SchedAttr::default();
    // SAFETY: `attr` is a live, writable `sched_attr` of `size` bytes for both calls; the
    // kernel reads or writes no more than `size`.
    let set = unsafe {
        libc::syscall(
            libc::SYS_sched_getattr,
            0,
            &mut attr as *mut SchedAttr,
            size,
            0,
        ) == 0
            && {
                // The policy and nice value stay as they are (a lower nice would need privilege).
                attr.size = size;
                attr.runtime = SLICE_NS;
                libc::syscall(libc::SYS_sched_setattr, 0, &attr as *const SchedAttr, 0) == 0
            }
    };
    if !set {
        debug!(error = %io::Error::last_os_error(), "a sentinel keeps the default time slice");
    }
}

/// A sentinel's socket: subscribed, with a filter that lets NEWGEN messages through alone (a
/// NEWGEN is always a datagram of its own), so that nothing else wakes it.
fn wake_socket() -> io::Result<Socket> {
    let mut s = Socket::new(NETLINK_NETFILTER)?;
    s.bind_auto()?;
    s.set_rx_buf_sz(256 * 1024)?;
    use crate::observe::bpf::{self, Insn};
    // `nlmsg_type` is at offset 4 of the netlink header.
    let program = bpf::assemble(&[
        Insn::Ld(bpf::BPF_H, 4),
        Insn::Jeq(bpf::be16(NEWGEN_TYPE), 2, 3),
        Insn::Ret(u32::MAX),
        Insn::Ret(0),
    ]);
    bpf::attach(s.as_fd(), &program)?;
    s.add_membership(GROUP_NFTABLES)?;
    Ok(s)
}

/// A sentinel: at every NEWGEN its socket lets through, reads the shared socket. Returns the
/// shared socket's failure.
fn watch(s: &Shared, wake: &Socket, tid: u32) -> Option<io::Error> {
    loop {
        let newgen = match wake.recv_from_full() {
            Ok((buf, _)) => parse_datagram(&buf),
            // Some NEWGENs lost: the shared socket is read all the same.
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => Vec::new(),
            Err(e) => {
                warn!(error = %e, "an nf_tables sentinel socket failed");
                return None;
            }
        };
        let failed = s.reader().pump(newgen, tid).err();
        s.handled.notify_all();
        if failed.is_some() {
            return failed;
        }
    }
}

impl Reader {
    /// Reads what the shared socket holds, then `newgen` (the NEWGEN that woke the sentinel,
    /// which the shared socket may not have been given yet).
    /// The engines are woken once, at the end: not before the commit.
    fn pump(&mut self, newgen: Vec<Event>, tid: u32) -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut relayed = Vec::new();
        let failed = loop {
            match self.socket.recv(&mut &mut buf[..], 0) {
                Ok(n) => self.take(parse_datagram(&buf[..n]), tid, &mut relayed),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break None,
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                    self.take(vec![Event::Overrun], tid, &mut relayed);
                }
                Err(e) => break Some(e),
            }
        };
        if failed.is_none() {
            self.take(newgen, tid, &mut relayed);
        }
        if !relayed.is_empty() {
            self.relays.retain_mut(|r| r.send(&relayed));
        }
        failed.map_or(Ok(()), Err)
    }

    /// Handles events in order (committing what a NEWGEN fires); pushes what to relay.
    fn take(&mut self, events: Vec<Event>, tid: u32, relayed: &mut Vec<Event>) {
        for ev in events {
            if let Event::NewGen { gen: Some(g), .. } = &ev {
                if self.last_gen.is_some_and(|l| !after(*g, l)) {
                    continue;
                }
                self.last_gen = Some(*g);
            }
            if matches!(ev, Event::Overrun) {
                self.last_gen = None;
            }
            if let Some(fire) = self.board.on_event(&ev) {
                let started = Instant::now();
                let outcome = match self.conn.commit(&fire.images(), fire.gen) {
                    Ok(()) => Outcome::Committed { tid },
                    Err(NetlinkError::Refused(e)) => Outcome::Refused(e as i32),
                    Err(e) => Outcome::Failed(e.to_string()),
                };
                debug!(gen = fire.gen, outcome = ?outcome, took_us = started.elapsed().as_micros() as u64, "responder committed images");
                self.board.record(fire, outcome);
            }
            relayed.push(ev);
        }
    }
}
