//! The rtnetlink request socket (dumps) and the event socket's BPF filter; the event socket itself
//! is `observe::events`. Subscribing happens before the first dump so that no change falls between.

use super::mirror::{Change, Mirror};
use super::sysctl::SysctlFs;
use crate::model::{Family, SysctlKey};
use futures::StreamExt;
use rtnetlink::packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_DUMP, NLM_F_DUMP_INTR, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::AddressMessage;
use rtnetlink::packet_route::link::LinkMessage;
use rtnetlink::packet_route::route::{RouteAttribute, RouteMessage};
use rtnetlink::packet_route::rule::RuleMessage;
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::AsyncSocket;
use rtnetlink::Handle;
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use thiserror::Error;
use tracing::{debug, warn};

/// Receive buffer of the event socket. Large, so that bursts (`ip route flush` of 10,000 routes)
/// rarely overrun it; an overrun is still handled by a full re-dump.
pub const EVENT_RCVBUF: usize = 64 << 20;
/// Environment variable overriding [`EVENT_RCVBUF`] (bytes): for hosts with little memory, and
/// for tests that need to provoke an overrun.
pub const EVENT_RCVBUF_ENV: &str = "NETWARDEN_EVENT_RCVBUF";

pub(crate) fn event_rcvbuf() -> usize {
    std::env::var(EVENT_RCVBUF_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(EVENT_RCVBUF)
}
/// Receive buffer of the request socket: holds the acks of a pipelined burst and dump replies.
pub const REQUEST_RCVBUF: usize = 16 << 20;

#[derive(Debug, Error)]
pub enum ObserveError {
    #[error("cannot open an rtnetlink socket: {0}")]
    Socket(#[source] std::io::Error),
    #[error("the netlink connection closed")]
    Closed,
    #[error("dump of {what} failed: {source}")]
    Dump {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("dump of {what} was interrupted by changes {attempts} times in a row")]
    Interrupted { what: &'static str, attempts: u32 },
}

/// Sets a receive buffer beyond rmem_max (we run as root with CAP_NET_ADMIN); falls back to the
/// capped size without the capability.
pub(crate) fn set_rcvbuf(sock: &rtnetlink::sys::Socket, size: usize) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(&sock.as_fd(), sockopt::RcvBufForce, &size).is_err() {
        if let Err(e) = setsockopt(&sock.as_fd(), sockopt::RcvBuf, &size) {
            warn!(error = %e, "cannot enlarge the netlink receive buffer");
        }
    }
}

/// `nlmsg_type` of route notifications.
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
/// `rtm_table` of a route in a table above 255 (the real table is in RTA_TABLE).
const RT_TABLE_COMPAT: u32 = 252;

/// The classic BPF program of the event socket: drops, in the kernel before they are queued,
/// - notifications of changes made through the netlink socket with port id `own` (the agent's
///   applier): the agent already knows what it did, and in a mass repair its own echoes would
///   double the events it has to read;
/// - with `tables`, route notifications of every other table: a host's big foreign table (a BGP
///   feed churning tens of thousands of routes a second) is then not read, decoded and thrown
///   away by the agent. Tables above 255 share one value in the header (RT_TABLE_COMPAT): those
///   pass whenever one of them is wanted.
///
/// Offsets are into the netlink header (16 bytes; `nlmsg_type` at 4, `nlmsg_pid` at 12) and the
/// `rtmsg` after it (`rtm_table` at 16 + 4). A multicast notification is one message per skb.
pub fn event_program(own: Option<u32>, tables: Option<&[u32]>) -> Vec<nix::libc::sock_filter> {
    use super::bpf::{assemble, be16, be32, Insn as I, BPF_B, BPF_H, BPF_W};
    let mut wanted: Vec<u32> = Vec::new();
    if let Some(tables) = tables {
        for &t in tables {
            let t = if t > 255 { RT_TABLE_COMPAT } else { t };
            if !wanted.contains(&t) {
                wanted.push(t);
            }
        }
    }
    // Layout: [own-port check] [route type checks, table checks] drop accept.
    let own_len = if own.is_some() { 2 } else { 0 };
    let route_len = if tables.is_some() {
        4 + wanted.len()
    } else {
        0
    };
    let drop = own_len + route_len;
    let accept = drop + 1;
    let mut code: Vec<I> = Vec::new();
    if let Some(port) = own {
        code.push(I::Ld(BPF_W, 12));
        let next = if tables.is_some() { 2 } else { accept };
        code.push(I::Jeq(be32(port), drop, next));
    }
    if tables.is_some() {
        let table_checks = code.len() + 3;
        code.push(I::Ld(BPF_H, 4));
        code.push(I::Jeq(be16(RTM_NEWROUTE), table_checks, code.len() + 1));
        code.push(I::Jeq(be16(RTM_DELROUTE), table_checks, accept));
        code.push(I::Ld(BPF_B, 20));
        for t in &wanted {
            code.push(I::Jeq(*t, accept, code.len() + 1));
        }
    }
    code.push(I::Ret(0));
    code.push(I::Ret(u32::MAX));
    if own.is_none() && tables.is_none() {
        code = vec![I::Ret(u32::MAX)];
    }
    assemble(&code)
}

/// Makes the kernel drop the notifications of changes made through the netlink socket with port
/// id `port` (see [`event_program`]).
pub fn ignore_own_changes(sock: std::os::fd::BorrowedFd<'_>, port: u32) -> std::io::Result<()> {
    super::bpf::attach(sock, &event_program(Some(port), None))
}

/// The event socket's filter, kept to narrow or widen what it lets through later.
#[derive(Debug)]
pub struct EventFilter {
    /// A duplicate of the event socket's descriptor (the socket itself is owned by its task).
    fd: std::os::fd::OwnedFd,
    own: Option<u32>,
    /// The route tables let through now (`None`: all).
    tables: Option<Vec<u32>>,
}

impl EventFilter {
    /// The filter of another socket subscribed to route notifications (`fd`: a duplicate of its
    /// descriptor) whose program is [`event_program`]`(own, None)` now.
    pub fn new(fd: std::os::fd::OwnedFd, own: Option<u32>) -> EventFilter {
        EventFilter {
            fd,
            own,
            tables: None,
        }
    }

    /// Lets route notifications through for `tables` only (`None`: every table). True if that
    /// changed the filter.
    pub fn set_tables(&mut self, tables: Option<&[u32]>) -> bool {
        if tables == self.tables.as_deref() {
            return false;
        }
        let code = event_program(self.own, tables);
        match super::bpf::attach(self.fd.as_fd(), &code) {
            Ok(()) => {
                debug!(?tables, "route notifications let through");
                self.tables = tables.map(<[u32]>::to_vec);
                true
            }
            Err(e) => {
                // Only a cost: the mirror ignores foreign routes anyway.
                warn!(error = %e, "cannot filter route notifications by table");
                false
            }
        }
    }

    pub fn tables(&self) -> Option<&[u32]> {
        self.tables.as_deref()
    }

    /// Joins or leaves a multicast group (RTNLGRP_*) on the socket.
    pub fn set_membership(&self, group: u32, join: bool) {
        use nix::libc;
        use std::os::fd::AsRawFd;
        let opt = if join {
            libc::NETLINK_ADD_MEMBERSHIP
        } else {
            libc::NETLINK_DROP_MEMBERSHIP
        };
        // SAFETY: `group` lives across the call; the kernel copies the int.
        let rc = unsafe {
            libc::setsockopt(
                self.fd.as_raw_fd(),
                libc::SOL_NETLINK,
                opt,
                &group as *const u32 as *const libc::c_void,
                std::mem::size_of::<u32>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            debug!(group, join, error = %e, "netlink group membership unchanged");
        }
    }
}

/// Whether request sockets have NETLINK_GET_STRICT_CHK (Linux ≥ 4.20): only then does the
/// kernel honour a table in a route dump request. A property of the kernel, so process-wide;
/// cleared if a filtered dump is refused or comes back unfiltered.
static STRICT_DUMPS: AtomicBool = AtomicBool::new(false);

/// Asks the kernel to check dump requests strictly and to apply the filters they carry.
fn strict_check(sock: &rtnetlink::sys::Socket) -> std::io::Result<()> {
    use nix::libc;
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: `on` lives across the call; the kernel copies the int.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_fd().as_raw_fd(),
            libc::SOL_NETLINK,
            libc::NETLINK_GET_STRICT_CHK,
            &on as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Opens the request socket.
pub fn connect() -> Result<Handle, ObserveError> {
    let (mut conn, handle, _) = rtnetlink::new_connection().map_err(ObserveError::Socket)?;
    set_rcvbuf(conn.socket_mut().socket_mut(), REQUEST_RCVBUF);
    match strict_check(conn.socket_mut().socket_mut()) {
        Ok(()) => STRICT_DUMPS.store(true, Ordering::Relaxed),
        Err(e) => {
            debug!(error = %e, "no strict netlink checking: route re-dumps read every table");
            STRICT_DUMPS.store(false, Ordering::Relaxed);
        }
    }
    tokio::spawn(conn);
    Ok(handle)
}

/// What to dump.
#[derive(Clone, Copy, Debug)]
pub enum Dump {
    Links,
    Addresses,
    Rules,
    Routes(Option<Family>),
    /// The routes of one table (the kernel filters: strict checking).
    Table(Option<Family>, u32),
    /// IPv4 and IPv6 neighbour entries of one device.
    Neighbours(u32),
    /// FDB entries (AF_BRIDGE), of every device.
    Fdb,
}

impl Dump {
    fn what(self) -> &'static str {
        match self {
            Dump::Links => "links",
            Dump::Addresses => "addresses",
            Dump::Rules => "rules",
            Dump::Routes(_) | Dump::Table(..) => "routes",
            Dump::Neighbours(_) => "neighbours",
            Dump::Fdb => "fdb",
        }
    }

    fn request(self) -> RouteNetlinkMessage {
        use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourMessage};
        match self {
            Dump::Links => RouteNetlinkMessage::GetLink(LinkMessage::default()),
            Dump::Addresses => RouteNetlinkMessage::GetAddress(AddressMessage::default()),
            Dump::Rules => RouteNetlinkMessage::GetRule(RuleMessage::default()),
            Dump::Neighbours(ifindex) => {
                let mut m = NeighbourMessage::default();
                m.attributes.push(NeighbourAttribute::IfIndex(ifindex));
                RouteNetlinkMessage::GetNeighbour(m)
            }
            Dump::Fdb => {
                let mut m = NeighbourMessage::default();
                m.header.family = AddressFamily::Bridge;
                RouteNetlinkMessage::GetNeighbour(m)
            }
            Dump::Routes(fam) | Dump::Table(fam, _) => {
                let mut m = RouteMessage::default();
                m.header.address_family = match fam {
                    None => AddressFamily::Unspec,
                    Some(Family::Ipv4) => AddressFamily::Inet,
                    Some(Family::Ipv6) => AddressFamily::Inet6,
                };
                if let Dump::Table(_, table) = self {
                    m.attributes.push(RouteAttribute::Table(table));
                }
                RouteNetlinkMessage::GetRoute(m)
            }
        }
    }
}

/// Dumps one kind into the mirror. A dump the kernel marks as interrupted (the table changed
/// under it) is retried; its partial content is discarded by the caller's clear.
pub async fn dump(
    handle: &mut Handle,
    mirror: &mut Mirror,
    what: Dump,
) -> Result<usize, ObserveError> {
    const ATTEMPTS: u32 = 5;
    for attempt in 1..=ATTEMPTS {
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_DUMP;
        let mut req = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(what.request()));
        req.finalize();
        let mut replies = handle.request(req).map_err(|_| ObserveError::Closed)?;
        let mut count = 0;
        let mut interrupted = false;
        while let Some(reply) = replies.next().await {
            if reply.header.flags & NLM_F_DUMP_INTR != 0 {
                interrupted = true;
            }
            match reply.payload {
                NetlinkPayload::InnerMessage(m) => {
                    if let (Dump::Table(_, want), RouteNetlinkMessage::NewRoute(r)) = (what, &m) {
                        if table_of(r) != want && STRICT_DUMPS.swap(false, Ordering::Relaxed) {
                            // The kernel ignored the filter: the caller falls back to a full dump.
                            warn!(
                                "route dumps are not filtered by table; re-dumps read every table"
                            );
                        }
                    }
                    mirror.ingest_dumped(&m);
                    count += 1;
                }
                NetlinkPayload::Error(e) if e.code.is_some() => {
                    return Err(ObserveError::Dump {
                        what: what.what(),
                        source: e.to_io(),
                    });
                }
                // A dump the kernel refuses ends with its errno in NLMSG_DONE. A table that does
                // not exist (ENOENT, asked for with one family) holds no routes.
                NetlinkPayload::Done(d) if d.code < 0 => {
                    if matches!(what, Dump::Table(..)) && -d.code == nix::libc::ENOENT {
                        break;
                    }
                    return Err(ObserveError::Dump {
                        what: what.what(),
                        source: std::io::Error::from_raw_os_error(-d.code),
                    });
                }
                _ => {}
            }
        }
        if !interrupted {
            debug!(what = what.what(), count, "dumped");
            return Ok(count);
        }
        debug!(what = what.what(), attempt, "dump interrupted, retrying");
        match what {
            Dump::Routes(f) => mirror.clear_routes(f),
            Dump::Table(f, t) => mirror.clear_table(f, t),
            // Every copy of a rule is counted: a retry must not count the first try's again.
            Dump::Rules => mirror.clear_rules(),
            Dump::Neighbours(_) | Dump::Fdb => mirror.clear_neighbours(),
            _ => {}
        }
    }
    Err(ObserveError::Interrupted {
        what: what.what(),
        attempts: ATTEMPTS,
    })
}

/// The table of a route message: the attribute (tables above 255), else the header.
fn table_of(m: &RouteMessage) -> u32 {
    m.attributes
        .iter()
        .find_map(|a| match a {
            RouteAttribute::Table(t) => Some(*t),
            _ => None,
        })
        .unwrap_or(u32::from(m.header.table))
}

/// Replaces the whole mirror with a fresh dump (start, overrun, timer). Settings are read
/// separately ([`read_sysctls`]): which ones depends on the links just dumped.
pub async fn dump_all(handle: &mut Handle, mirror: &mut Mirror) -> Result<(), ObserveError> {
    mirror.clear();
    for what in [Dump::Links, Dump::Addresses, Dump::Rules] {
        dump(handle, mirror, what).await?;
    }
    dump_neighbours(handle, mirror).await?;
    dump_routes(handle, mirror, None).await.map(|_| ())
}

/// The protected neighbour entries (device by device: a node's table can be large) and FDB
/// entries, when there are any.
async fn dump_neighbours(handle: &mut Handle, mirror: &mut Mirror) -> Result<(), ObserveError> {
    if mirror.wants_neighbours() {
        for ifindex in mirror.neighbour_devices() {
            dump(handle, mirror, Dump::Neighbours(ifindex)).await?;
        }
    }
    if mirror.wants_fdb() {
        dump(handle, mirror, Dump::Fdb).await?;
    }
    Ok(())
}

/// Reads settings into the mirror (`keys`: the protected ones); returns the changes. A setting
/// that cannot be read is forgotten (its device went away meanwhile, or the kernel has no such
/// setting): the plan then writes it, which tells.
pub fn read_sysctls<'a>(
    mirror: &mut Mirror,
    keys: impl IntoIterator<Item = &'a SysctlKey>,
) -> Vec<Change> {
    let fs = SysctlFs::default();
    let mut changes = Vec::new();
    for key in keys {
        match fs.read(key) {
            Ok(v) => match mirror.set_sysctl(key, v) {
                Change::Nothing => {}
                c => changes.push(c),
            },
            Err(e) => {
                debug!(key = %key, error = %e, "cannot read setting");
                mirror.forget_sysctl(key);
            }
        }
    }
    changes
}

/// Replaces the mirror's rules with a fresh dump, which counts every copy: after someone added
/// a protected rule the mirror already held (see
/// [`Change::RuleAddedAgain`](super::mirror::Change::RuleAddedAgain)).
pub async fn dump_rules(handle: &mut Handle, mirror: &mut Mirror) -> Result<usize, ObserveError> {
    mirror.clear_rules();
    dump(handle, mirror, Dump::Rules).await
}

/// Replaces the mirror's routes of a family (or all) with a fresh dump: after events that make
/// the kernel drop routes silently, and in a full refresh. Only the tables the mirror keeps
/// routes of are read when they are few (see `RouteInterest::tables`): a full table of foreign
/// routes beside them (a BGP feed: ~1 s for 500,000 routes) is not read at all. Returns the
/// number of routes read.
pub async fn dump_routes(
    handle: &mut Handle,
    mirror: &mut Mirror,
    family: Option<Family>,
) -> Result<usize, ObserveError> {
    mirror.clear_routes(family);
    let tables = match mirror.route_tables() {
        Some(t) if STRICT_DUMPS.load(Ordering::Relaxed) => t.to_vec(),
        _ => return dump(handle, mirror, Dump::Routes(family)).await,
    };
    let mut count = 0;
    for table in tables {
        match dump(handle, mirror, Dump::Table(family, table)).await {
            Ok(n) => count += n,
            Err(ObserveError::Dump { source, .. })
                if matches!(
                    source.raw_os_error(),
                    Some(nix::libc::EINVAL | nix::libc::EOPNOTSUPP)
                ) =>
            {
                warn!(error = %source, "table-filtered route dump refused; re-dumps read every table");
                STRICT_DUMPS.store(false, Ordering::Relaxed);
            }
            Err(e) => return Err(e),
        }
        if !STRICT_DUMPS.load(Ordering::Relaxed) {
            mirror.clear_routes(family);
            return dump(handle, mirror, Dump::Routes(family)).await;
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::libc::{self, sock_filter};

    /// Runs a classic BPF program the way the kernel does for the instructions it uses.
    fn run(code: &[sock_filter], packet: &[u8]) -> u32 {
        let mut a = 0u32;
        let mut pc = 0;
        loop {
            let i = code[pc];
            let class = u32::from(i.code) & 0x07;
            let size = u32::from(i.code) & 0x18;
            match class {
                c if c == libc::BPF_LD => {
                    let at = i.k as usize;
                    a = match size {
                        s if s == libc::BPF_W => {
                            u32::from_be_bytes(packet[at..at + 4].try_into().unwrap())
                        }
                        s if s == libc::BPF_H => {
                            u32::from(u16::from_be_bytes(packet[at..at + 2].try_into().unwrap()))
                        }
                        _ => u32::from(packet[at]),
                    };
                    pc += 1;
                }
                c if c == libc::BPF_JMP => {
                    pc += 1 + usize::from(if a == i.k { i.jt } else { i.jf });
                }
                _ => return i.k,
            }
        }
    }

    /// A notification as the kernel writes it: netlink header in host order, then an rtmsg.
    fn notification(ty: u16, pid: u32, table: u8) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&36u32.to_ne_bytes());
        p.extend_from_slice(&ty.to_ne_bytes());
        p.extend_from_slice(&0u16.to_ne_bytes());
        p.extend_from_slice(&0u32.to_ne_bytes());
        p.extend_from_slice(&pid.to_ne_bytes());
        p.extend_from_slice(&[2, 32, 0, 0, table, 4, 0, 1, 0, 0, 0, 0]);
        p.extend_from_slice(&[0; 8]);
        p
    }

    const RTM_NEWRULE: u16 = 32;

    #[test]
    fn the_event_filter_drops_own_changes_and_foreign_tables() {
        let own = 4242;
        let f = event_program(Some(own), Some(&[100, 254, 1000]));
        let pass = |ty, pid, table| run(&f, &notification(ty, pid, table)) != 0;
        assert!(pass(RTM_NEWROUTE, 7, 100));
        assert!(pass(RTM_DELROUTE, 7, 254));
        assert!(
            pass(RTM_DELROUTE, 0, 252),
            "tables above 255 share RT_TABLE_COMPAT"
        );
        assert!(!pass(RTM_NEWROUTE, 7, 200), "a foreign table");
        assert!(!pass(RTM_DELROUTE, 0, 255));
        assert!(!pass(RTM_NEWROUTE, own, 100), "our own change");
        assert!(!pass(RTM_NEWRULE, own, 0));
        // Other messages pass whatever their bytes at the rtm_table offset.
        assert!(pass(RTM_NEWRULE, 7, 200));
        assert!(pass(16, 0, 200), "RTM_NEWLINK");

        // Every table: only our own changes are dropped.
        let f = event_program(Some(own), None);
        assert!(run(&f, &notification(RTM_NEWROUTE, 7, 200)) != 0);
        assert!(run(&f, &notification(RTM_NEWROUTE, own, 100)) == 0);
        // No table and no port: everything passes; no table wanted: no route passes.
        let f = event_program(None, None);
        assert!(run(&f, &notification(RTM_NEWROUTE, own, 200)) != 0);
        let f = event_program(None, Some(&[]));
        assert!(run(&f, &notification(RTM_NEWROUTE, 7, 100)) == 0);
        assert!(run(&f, &notification(RTM_NEWRULE, 7, 100)) != 0);
    }
}
