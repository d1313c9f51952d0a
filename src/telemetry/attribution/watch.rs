//! The two attribution threads: one watches changes as they happen and identifies each changer
//! at once (a *sighting*: the earliest moment a short-lived process can be seen), the other
//! answers the reconcile loop's lookups after its repairs.

use super::{Identity, Resolver, Sighting, Sightings, KERNEL_PORT, SIGHTING_TTL};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// rtnetlink groups whose changes are watched: IPv4/IPv6 addresses, routes and rules. The loop
/// adds neighbour entries while some are protected (see `EventFilter::set_membership`): their
/// notifications name the changer for `ip neigh`-made changes; the kernel's own cache updates
/// have port 0 and are skipped at once.
const CHANGE_GROUPS: u32 = (1 << 4) | (1 << 6) | (1 << 7) | (1 << 8) | (1 << 10) | (1 << 18);
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_NEWRULE: u16 = 32;
const RTM_DELRULE: u16 = 33;
/// A port sighted this recently is not looked up again.
const SIGHTING_FRESH: Duration = Duration::from_secs(1);
/// Longest the watcher scans every process's sockets for one batch of changes: it runs at normal
/// priority, beside the repairs.
const WATCH_SCAN_BUDGET: Duration = Duration::from_millis(10);

/// Port ids of the changes (additions, replacements, removals of addresses, routes, rules and
/// neighbour entries) in a buffer of netlink messages.
pub fn change_ports(buf: &[u8]) -> Vec<u32> {
    let mut ports = Vec::new();
    let mut off = 0;
    while off + 16 <= buf.len() {
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().unwrap_or_default()) as usize;
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().unwrap_or_default());
        let port = u32::from_ne_bytes(buf[off + 12..off + 16].try_into().unwrap_or_default());
        if len < 16 {
            break;
        }
        let change = matches!(
            ty,
            RTM_NEWADDR
                | RTM_DELADDR
                | RTM_NEWROUTE
                | RTM_DELROUTE
                | RTM_NEWRULE
                | RTM_DELRULE
                | RTM_NEWNEIGH
                | RTM_DELNEIGH
        );
        if change && port != KERNEL_PORT {
            ports.push(port);
        }
        off += (len + 3) & !3;
    }
    ports
}

/// Watches changes on a socket of its own, on its own thread, and identifies each changer at
/// once, in parallel with the repair: a short-lived `ip rule del` is usually gone by the time
/// the repair is acknowledged, and a socket that a process opens for one request is closed
/// right after. Best effort: a lost or late sighting leaves the lookup to [`Resolver`].
/// Returns the socket's filter: route notifications of foreign tables need no sighting (their
/// changes are never reported), and on a host with a churning big table they were most of this
/// thread's work.
pub fn watch_changes(
    sightings: Sightings,
    own_port: Option<u32>,
) -> std::io::Result<crate::observe::kernel::EventFilter> {
    use nix::sys::socket::{
        bind, setsockopt, socket, sockopt, AddressFamily, NetlinkAddr, SockFlag, SockProtocol,
        SockType,
    };
    use std::os::fd::AsRawFd;
    let fd = socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkRoute,
    )?;
    let _ = setsockopt(&fd, sockopt::RcvBuf, &(4 << 20));
    if let Some(port) = own_port {
        // The agent's own repairs need no name; in a mass repair they would be half the traffic.
        use std::os::fd::AsFd;
        let _ = crate::observe::kernel::ignore_own_changes(fd.as_fd(), port);
    }
    bind(fd.as_raw_fd(), &NetlinkAddr::new(0, CHANGE_GROUPS))?;
    let filter = crate::observe::kernel::EventFilter::new(fd.try_clone()?, own_port);
    std::thread::Builder::new()
        .name("nw-sightings".into())
        .spawn(move || name_changers(&fd, &sightings))?;
    Ok(filter)
}

/// Notification headers read per system call.
const HEADERS: usize = 64;

/// The sightings thread: the port of each change notification, identified at once unless it
/// was seen a moment ago. Returns when the socket fails or the sightings are poisoned.
fn name_changers(fd: &std::os::fd::OwnedFd, sightings: &Sightings) {
    // Not lowered: it must see a process before a short-lived one is gone.
    let mut resolver = Resolver::default().with_scan_budget(WATCH_SCAN_BUDGET);
    let mut reader = HeaderReader::new();
    let mut ports: Vec<u32> = Vec::with_capacity(HEADERS);
    loop {
        ports.clear();
        match reader.read_ports(fd, &mut ports) {
            Ok(()) => {}
            // ENOBUFS: sightings were lost; the resolver still looks later.
            Err(nix::errno::Errno::ENOBUFS | nix::errno::Errno::EINTR) => continue,
            Err(_) => return,
        }
        let Some(fresh) = not_seen_lately(sightings, &ports) else {
            return;
        };
        if fresh.is_empty() {
            continue;
        }
        let seen: Vec<(u32, Identity)> = resolver
            .identify_now(&fresh)
            .into_iter()
            .filter(|(_, who)| who.name != super::UNKNOWN)
            .collect();
        if seen.is_empty() {
            continue;
        }
        let now = Instant::now();
        let Ok(mut s) = sightings.lock() else { return };
        if s.len() > 1024 {
            s.retain(|_, x| now.duration_since(x.at) < SIGHTING_TTL);
        }
        for (port, who) in seen {
            s.insert(port, Sighting { who, at: now });
        }
    }
}

/// Reads change notifications a batch at a time, only their headers.
///
/// Only the 16-byte header of each notification is read (the rest of the datagram is discarded
/// by the kernel, MSG_TRUNC), up to HEADERS of them per system call: a mass deletion sends tens
/// of thousands, and this thread reading each in full, one recv at a time, cost a tenth of the
/// agent's CPU in a mass repair. Notifications carry one message per datagram, so the header
/// is the whole story.
struct HeaderReader {
    heads: [[u8; 16]; HEADERS],
    headers: nix::sys::socket::MultiHeaders<()>,
}

impl HeaderReader {
    fn new() -> Self {
        HeaderReader {
            heads: [[0u8; 16]; HEADERS],
            headers: nix::sys::socket::MultiHeaders::<()>::preallocate(HEADERS, None),
        }
    }

    /// Waits for at least one notification; adds the ports of those read to `ports`.
    fn read_ports(
        &mut self,
        fd: &std::os::fd::OwnedFd,
        ports: &mut Vec<u32>,
    ) -> Result<(), nix::errno::Errno> {
        use nix::sys::socket::{recvmmsg, MsgFlags};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        let mut slices: Vec<[IoSliceMut; 1]> = self
            .heads
            .iter_mut()
            .map(|h| [IoSliceMut::new(h)])
            .collect();
        let results = recvmmsg(
            fd.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )?;
        for r in results {
            if let Some(head) = r.iovs().next() {
                ports.extend(change_ports(head));
            }
        }
        Ok(())
    }
}

/// The ports not sighted within [`SIGHTING_FRESH`], sorted and without repeats; `None` if the
/// sightings are poisoned.
fn not_seen_lately(sightings: &Sightings, ports: &[u32]) -> Option<Vec<u32>> {
    let mut fresh: Vec<u32> = {
        let s = sightings.lock().ok()?;
        let now = Instant::now();
        ports
            .iter()
            .copied()
            .filter(|p| {
                s.get(p)
                    .is_none_or(|x| now.duration_since(x.at) >= SIGHTING_FRESH)
            })
            .collect()
    };
    fresh.sort_unstable();
    fresh.dedup();
    Some(fresh)
}

/// Lowers the calling thread's scheduling priority (nice 10): on a busy node the attribution
/// thread yields the CPU to the reconcile loop, which does the repairs.
fn lower_priority() {
    // SAFETY: plain syscalls on the calling thread; setpriority with a thread id affects only
    // that thread on Linux.
    unsafe {
        let tid = nix::libc::gettid();
        nix::libc::setpriority(nix::libc::PRIO_PROCESS, tid as nix::libc::id_t, 10);
    }
}

/// A lookup on the attribution thread.
#[derive(Debug)]
pub struct Request {
    pub id: u64,
    pub ports: Vec<u32>,
}

/// Its answer: port id → process name (not yet capped as a label).
#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub names: HashMap<u32, String>,
}

/// Starts the attribution thread (in the calling thread's network namespace). Requests go in
/// through the returned sender; answers come out through `answers`.
pub fn spawn(
    answers: tokio::sync::mpsc::UnboundedSender<Answer>,
    own_port: Option<u32>,
) -> std::io::Result<std::sync::mpsc::Sender<Request>> {
    spawn_filtered(answers, own_port).map(|s| s.requests)
}

/// What [`spawn_filtered`] started.
pub struct Spawned {
    /// Lookups for the attribution thread.
    pub requests: std::sync::mpsc::Sender<Request>,
    /// The filter of the socket that watches changes (none if it could not be opened), to
    /// narrow it to the route tables of interest.
    pub filter: Option<crate::observe::kernel::EventFilter>,
    /// What that watcher saw, for other resolvers (the loop's own, for adopted objects).
    pub sightings: Sightings,
}

/// [`spawn`], also returning the watcher's filter and sightings.
pub fn spawn_filtered(
    answers: tokio::sync::mpsc::UnboundedSender<Answer>,
    own_port: Option<u32>,
) -> std::io::Result<Spawned> {
    let (tx, rx) = std::sync::mpsc::channel::<Request>();
    let sightings: Sightings = Arc::default();
    let mut resolver = Resolver::default();
    let filter = match watch_changes(sightings.clone(), own_port) {
        Ok(filter) => {
            resolver = resolver.with_sightings(sightings.clone());
            Some(filter)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch changes as they happen");
            None
        }
    };
    std::thread::Builder::new()
        .name("nw-attribution".into())
        .spawn(move || {
            lower_priority();
            if let Err(e) = super::check_namespace_view() {
                tracing::warn!(error = %e, "attribution of changes to processes may be wrong");
            }
            // Requests that queued up while a lookup ran are looked up together: during a mass
            // repair there is one per batch of events, and each lookup reads the whole netlink
            // socket table and may wait for sightings.
            while let Ok(first) = rx.recv() {
                let mut requests = vec![first];
                requests.extend(rx.try_iter());
                let mut ports: Vec<u32> = requests
                    .iter()
                    .flat_map(|r| r.ports.iter().copied())
                    .collect();
                ports.sort_unstable();
                ports.dedup();
                let names = resolver.resolve(&ports);
                for req in requests {
                    let mine = req
                        .ports
                        .iter()
                        .filter_map(|p| Some((*p, names.get(p)?.clone())))
                        .collect();
                    if answers
                        .send(Answer {
                            id: req.id,
                            names: mine,
                        })
                        .is_err()
                    {
                        return;
                    }
                }
            }
        })?;
    Ok(Spawned {
        requests: tx,
        filter,
        sightings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_ports_are_read_from_message_headers() {
        let msg = |len: u32, ty: u16, port: u32| {
            let mut m = Vec::new();
            m.extend_from_slice(&len.to_ne_bytes());
            m.extend_from_slice(&ty.to_ne_bytes());
            m.extend_from_slice(&0u16.to_ne_bytes());
            m.extend_from_slice(&0u32.to_ne_bytes());
            m.extend_from_slice(&port.to_ne_bytes());
            m.resize(((len + 3) & !3) as usize, 0);
            m
        };
        let mut buf = msg(20, RTM_DELRULE, 4242);
        buf.extend(msg(16, RTM_NEWRULE, 7));
        buf.extend(msg(18, RTM_DELROUTE, 0));
        buf.extend(msg(16, 16 /* RTM_NEWLINK */, 8));
        buf.extend(msg(16, RTM_DELADDR, 99));
        buf.extend(msg(16, RTM_DELNEIGH, 55));
        buf.extend(msg(16, RTM_NEWNEIGH, 0));
        buf.extend([1, 2, 3]);
        assert_eq!(change_ports(&buf), [4242, 7, 99, 55]);
        assert!(change_ports(&msg(8, RTM_DELRULE, 1)[..8]).is_empty());
        assert!(
            change_ports(&[0u8; 32]).is_empty(),
            "a zero length stops the walk"
        );
    }
}
