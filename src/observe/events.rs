//! The event socket: rtnetlink notifications (links, addresses, routes, rules), read many per
//! system call straight into the reconcile loop.
//!
//! rtnetlink's multicast connection reads one datagram per `recv` on a task of its own and hands
//! every message to the loop through a channel. A multicast notification is one datagram, so an
//! `ip route flush` of 10,000 routes, or a churning BGP feed in a protected table, meant as many
//! system calls and task wake-ups, about a tenth of the agent's CPU in a mass repair. Here the
//! loop itself waits for the socket and takes up to [`SLOTS`] notifications per `recvmmsg`.

use super::decode::{each_message, netconf, Netconf, RTM_DELNETCONF, RTM_NEWNETCONF};
use super::kernel::{event_rcvbuf, ignore_own_changes, set_rcvbuf, EventFilter, ObserveError};
use nix::sys::socket::{recvmmsg, MsgFlags, MultiHeaders};
use rtnetlink::packet_core::NetlinkPayload;
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::collections::VecDeque;
use std::io::IoSliceMut;
use std::ops::ControlFlow;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tracing::warn;

/// rtnetlink multicast group bits (RTNLGRP_* - 1): everything the agent watches.
pub const GROUPS: u32 = (1 << 0) // link
    | (1 << 4) // ipv4 ifaddr
    | (1 << 6) // ipv4 route
    | (1 << 7) // ipv4 rule
    | (1 << 8) // ipv6 ifaddr
    | (1 << 10) // ipv6 route
    | (1 << 18); // ipv6 rule

/// Notifications read per system call.
pub const SLOTS: usize = 64;
/// Room for one notification. Link notifications are the largest: a NIC with many SR-IOV
/// virtual functions describes each of them. A larger one arrives truncated and is treated as
/// lost (a full re-read). The buffer is allocated zeroed, so the memory a slot's tail never
/// receives is never touched either.
const SLOT_BYTES: usize = 64 << 10;

/// Multicast groups (RTNLGRP_*) joined only while something of theirs is protected: a node's
/// neighbour notifications (every ARP state change) are many, and nothing else needs them.
pub const RTNLGRP_NEIGH: u32 = 3;
pub const RTNLGRP_IPV4_NETCONF: u32 = 24;
pub const RTNLGRP_IPV6_NETCONF: u32 = 25;

/// What the event socket delivers.
#[derive(Debug)]
pub enum Event {
    /// A notification, with the netlink port id of the socket whose request made the change
    /// (0: the kernel itself).
    Message(RouteNetlinkMessage, u32),
    /// Settings of a device changed (RTM_NEWNETCONF; always port 0: no request is behind a
    /// write through /proc).
    Netconf(Netconf),
    /// Notifications were lost: the socket overran (ENOBUFS), or one was too large to read.
    Overrun,
}

/// The subscribed socket and what it has read but not handed out yet.
pub struct EventSocket {
    fd: AsyncFd<Socket>,
    buf: Vec<u8>,
    queue: VecDeque<Event>,
    /// The optional groups joined now.
    joined: Vec<u32>,
}

impl std::fmt::Debug for EventSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSocket")
            .field("queued", &self.queue.len())
            .finish()
    }
}

impl EventSocket {
    /// Subscribes (in the calling thread's network namespace) to links, IPv4/IPv6 addresses,
    /// routes and rules. With `own_port`, changes made through that socket (the applier's) are
    /// dropped by the kernel. Also returns the socket's filter, to narrow route notifications
    /// to the tables of interest (none if the descriptor cannot be duplicated).
    pub fn subscribe(
        own_port: Option<u32>,
    ) -> Result<(EventSocket, Option<EventFilter>), ObserveError> {
        let mut sock = Socket::new(NETLINK_ROUTE).map_err(ObserveError::Socket)?;
        sock.bind(&SocketAddr::new(0, GROUPS))
            .map_err(ObserveError::Socket)?;
        sock.set_non_blocking(true).map_err(ObserveError::Socket)?;
        set_rcvbuf(&sock, event_rcvbuf());
        if let Some(port) = own_port {
            if let Err(e) = ignore_own_changes(sock.as_fd(), port) {
                // Only a cost, not a correctness issue: our own echoes are harmless no-ops.
                warn!(error = %e, "cannot filter the agent's own notifications");
            }
        }
        let filter = match sock.as_fd().try_clone_to_owned() {
            Ok(fd) => Some(EventFilter::new(fd, own_port)),
            Err(e) => {
                warn!(error = %e, "cannot keep the event socket's filter");
                None
            }
        };
        // SAFETY: the Socket owns its descriptor (closed when it is dropped, which the AsyncFd
        // that takes it over does last) and always reports that same descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(sock, Interest::READABLE) }
            .map_err(|e| ObserveError::Socket(e.into()))?;
        Ok((
            EventSocket {
                fd,
                // One allocation, zeroed by the allocator (fresh pages: not touched until used).
                buf: vec![0u8; SLOTS * SLOT_BYTES],
                queue: VecDeque::with_capacity(SLOTS),
                joined: Vec::new(),
            },
            filter,
        ))
    }

    /// Joins exactly these optional groups ([`RTNLGRP_NEIGH`], the netconf groups) and leaves
    /// the others. Call before the dump that the notifications then keep current.
    pub fn set_groups(&mut self, groups: &[u32]) {
        let sock = self.fd.get_ref();
        for g in groups {
            if self.joined.contains(g) {
                continue;
            }
            match sock.add_membership(*g) {
                Ok(()) => self.joined.push(*g),
                Err(e) => warn!(group = g, error = %e, "cannot join a netlink group"),
            }
        }
        self.joined.retain(|g| {
            groups.contains(g) || {
                let _ = sock.drop_membership(*g);
                false
            }
        });
    }

    /// The next event, waiting for one. `None`: the socket failed (logged).
    /// Cancel-safe: nothing is read between the wait and the hand-out.
    pub async fn next(&mut self) -> Option<Event> {
        loop {
            if let Some(ev) = self.queue.pop_front() {
                return Some(ev);
            }
            let mut ready = match self.fd.readable().await {
                Ok(r) => r,
                Err(e) => {
                    warn!(error = %e, "the event socket failed");
                    return None;
                }
            };
            let fd = ready.get_inner().as_raw_fd();
            match read(fd, &mut self.buf, &mut self.queue) {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => ready.clear_ready(),
                Err(e) => {
                    warn!(error = %e, "reading the event socket failed");
                    return None;
                }
            }
        }
    }

    /// The next event if one is already there, without waiting.
    pub fn try_next(&mut self) -> Option<Event> {
        if self.queue.is_empty() {
            // WouldBlock: nothing queued (the readiness is cleared by the next wait); any other
            // error shows again, and is reported, at the next wait.
            let _ = read(
                self.fd.get_ref().as_raw_fd(),
                &mut self.buf,
                &mut self.queue,
            );
        }
        self.queue.pop_front()
    }
}

/// One `recvmmsg` on `fd`: every notification it returns is parsed into `queue`. Returns how many
/// datagrams were read. (The message headers are made per call: they hold raw pointers, which
/// would make the agent's future not `Send`.)
fn read(fd: RawFd, buf: &mut [u8], queue: &mut VecDeque<Event>) -> std::io::Result<usize> {
    let mut headers = MultiHeaders::<()>::preallocate(SLOTS, None);
    let mut slices: Vec<[IoSliceMut; 1]> = buf
        .chunks_mut(SLOT_BYTES)
        .map(|c| [IoSliceMut::new(c)])
        .collect();
    let results = match recvmmsg(
        fd,
        &mut headers,
        slices.iter_mut(),
        MsgFlags::MSG_DONTWAIT,
        None,
    ) {
        Ok(r) => r,
        Err(nix::errno::Errno::ENOBUFS) => {
            queue.push_back(Event::Overrun);
            return Ok(1);
        }
        Err(nix::errno::Errno::EINTR) => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut datagrams = 0;
    for r in results {
        datagrams += 1;
        if r.flags.contains(MsgFlags::MSG_TRUNC) {
            warn!(
                bytes = r.bytes,
                "a notification larger than the read buffer was cut short; re-reading the kernel"
            );
            queue.push_back(Event::Overrun);
            continue;
        }
        let Some(data) = r.iovs().next() else {
            continue;
        };
        parse_into(&data[..r.bytes.min(data.len())], queue);
    }
    Ok(datagrams)
}

/// The notifications in one datagram (normally exactly one).
fn parse_into(data: &[u8], queue: &mut VecDeque<Event>) {
    // A multicast notification is one message per datagram: netconf ones (which
    // netlink-packet-route does not parse) are told by their type.
    if data.len() >= 16 {
        let len = u32::from_ne_bytes([data[0], data[1], data[2], data[3]]) as usize;
        let ty = u16::from_ne_bytes([data[4], data[5]]);
        if ty == RTM_NEWNETCONF {
            // A message cut short is dropped, as `each_message` drops one.
            if let Some(n) = data.get(16..len).and_then(netconf) {
                queue.push_back(Event::Netconf(n));
            }
            return;
        }
        if ty == RTM_DELNETCONF {
            // A device going away: its link notification says so.
            return;
        }
    }
    let _ = each_message(data, |msg| {
        if let NetlinkPayload::InnerMessage(m) = msg.payload {
            queue.push_back(Event::Message(m, msg.header.port_number));
        }
        ControlFlow::Continue(())
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, RuleAction, RuleKey};
    use rtnetlink::packet_core::{Emitable, NetlinkHeader, NetlinkMessage};

    fn rule_notification(priority: u32, port: u32) -> Vec<u8> {
        let key = RuleKey::new(
            Family::Ipv4,
            priority,
            None,
            None,
            None,
            None,
            None,
            None,
            100,
            RuleAction::Lookup,
        );
        let mut header = NetlinkHeader::default();
        header.port_number = port;
        let mut msg = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::DelRule(crate::apply::encode::rule(
                &key, None,
            ))),
        );
        msg.finalize();
        let mut buf = vec![0u8; msg.buffer_len()];
        msg.emit(&mut buf);
        buf
    }

    #[test]
    fn every_message_of_a_datagram_is_queued_with_its_port() {
        let mut data = rule_notification(7, 4242);
        data.extend(rule_notification(8, 0));
        let mut queue = VecDeque::new();
        parse_into(&data, &mut queue);
        let got: Vec<(u32, u32)> = queue
            .iter()
            .map(|e| match e {
                Event::Message(RouteNetlinkMessage::DelRule(m), port) => {
                    let (key, _) = crate::observe::decode::rule(m).expect("a rule");
                    (key.priority, *port)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(got, vec![(7, 4242), (8, 0)]);
    }

    #[test]
    fn the_walk_over_a_datagram_stops_when_told() {
        let mut data = rule_notification(7, 1);
        data.extend(rule_notification(8, 2));
        let mut ports = Vec::new();
        let flow = each_message(&data, |msg| {
            ports.push(msg.header.port_number);
            ControlFlow::Break(())
        });
        assert!(flow.is_break());
        assert_eq!(ports, vec![1]);
    }

    #[test]
    fn netconf_notifications_are_decoded_by_hand() {
        // As Linux 6.18 sends `sysctl -w net.ipv4.conf.v0.rp_filter=2` for ifindex 3.
        let mut data = Vec::new();
        data.extend_from_slice(&36u32.to_ne_bytes());
        data.extend_from_slice(&RTM_NEWNETCONF.to_ne_bytes());
        data.extend_from_slice(&[0; 10]);
        data.extend_from_slice(&[2, 0, 0, 0]);
        for (ty, v) in [(1u16, 3i32), (3, 2)] {
            data.extend_from_slice(&8u16.to_ne_bytes());
            data.extend_from_slice(&ty.to_ne_bytes());
            data.extend_from_slice(&v.to_ne_bytes());
        }
        let mut queue = VecDeque::new();
        parse_into(&data, &mut queue);
        let Some(Event::Netconf(n)) = queue.pop_front() else {
            panic!("{queue:?}");
        };
        assert_eq!((n.family, n.ifindex), (Family::Ipv4, 3));
        assert_eq!(n.values.len(), 1);
        assert_eq!((n.values[0].0.name(), n.values[0].1), ("rp_filter", 2));
        // Cut short: nothing.
        parse_into(&data[..30], &mut queue);
        assert!(queue.is_empty());
    }

    #[test]
    fn garbage_and_short_data_queue_nothing() {
        let mut queue = VecDeque::new();
        parse_into(&[0u8; 10], &mut queue);
        parse_into(&[0xffu8; 64], &mut queue);
        let mut cut = rule_notification(7, 1);
        cut.truncate(cut.len() - 4);
        parse_into(&cut, &mut queue);
        assert!(queue.is_empty(), "{queue:?}");
    }
}
