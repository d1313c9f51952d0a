//! nf_tables change notifications (NETLINK_NETFILTER, group NFNLGRP_NFTABLES): a socket and a
//! decoder of the few fields needed (family, table, the chain or set touched, whether it was
//! removed, and the NEWGEN message that ends a transaction with the process that committed it).
//! Every family is decoded; the iptables guard keeps its part through
//! [`crate::netfilter::events`]. Decoded by hand: a header and a few string attributes do not
//! need the whole nf_tables message model as a dependency.

use super::model::NfFamily;
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};
use std::io;

const GROUP_NFTABLES: u32 = 7;
const SUBSYS_NFTABLES: u16 = 10;
// enum nf_tables_msg_types (uapi/linux/netfilter/nf_tables.h).
const NEWTABLE: u16 = 0;
const DELTABLE: u16 = 2;
const NEWCHAIN: u16 = 3;
const DELCHAIN: u16 = 5;
const NEWRULE: u16 = 6;
const DELRULE: u16 = 8;
const NEWSET: u16 = 9;
const DELSET: u16 = 11;
const NEWSETELEM: u16 = 12;
const DELSETELEM: u16 = 14;
const NEWGEN: u16 = 15;
// Attribute 1 is the table in every message above; 2 or 3 the chain or set.
const ATTR_TABLE: u16 = 1;
const CHAIN_NAME: u16 = 3;
const RULE_CHAIN: u16 = 2;
const SET_NAME: u16 = 2;
const ELEM_SET: u16 = 2;
const GEN_ID: u16 = 1;
const GEN_PROC_PID: u16 = 2;
const GEN_PROC_NAME: u16 = 3;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// What a notification touched.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Object {
    Table,
    Chain(String),
    /// A rule, in this chain.
    Rule(String),
    Set(String),
    /// Elements of this set.
    Elements(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Change {
        family: NfFamily,
        table: String,
        object: Object,
        removed: bool,
    },
    /// The end of a transaction, with the process that committed it.
    NewGen {
        /// The generation the transaction made (what a batch may require to still be current).
        gen: Option<u32>,
        pid: Option<u32>,
        process: Option<String>,
    },
    /// Notifications were lost (ENOBUFS): anything may have changed.
    Overrun,
}

/// The notifications: from a socket of its own, or relayed by the responder
/// ([`super::responder::subscribe`], what the engines use).
pub struct Events {
    source: Source,
}

enum Source {
    Socket(Box<TokioSocket>),
    /// With the ids of the responder's threads: their commits are the process's own.
    Relayed(tokio::sync::mpsc::Receiver<Vec<Event>>, Vec<u32>),
}

impl Events {
    /// Opens the socket and joins the group. Call before the first read of the tables, so that
    /// no change falls between the read and the subscription.
    pub fn subscribe() -> io::Result<Events> {
        let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
        let s = socket.socket_mut();
        s.bind_auto()?;
        // A kube-proxy resync or a `nft flush ruleset` with thousands of elements is one burst.
        s.set_rx_buf_sz(8 * 1024 * 1024)?;
        s.add_membership(GROUP_NFTABLES)?;
        Ok(Events {
            source: Source::Socket(Box::new(socket)),
        })
    }

    /// Events the responder relays through `rx`, a datagram at a time.
    pub(super) fn relayed(rx: tokio::sync::mpsc::Receiver<Vec<Event>>, tids: Vec<u32>) -> Events {
        Events {
            source: Source::Relayed(rx, tids),
        }
    }

    /// The threads that relay these events and commit images: what a NEWGEN names when the
    /// transaction is the process's own.
    pub fn relayers(&self) -> &[u32] {
        match &self.source {
            Source::Relayed(_, tids) => tids,
            Source::Socket(_) => &[],
        }
    }

    /// The events of the next datagram.
    pub async fn next(&mut self) -> io::Result<Vec<Event>> {
        let socket = match &mut self.source {
            Source::Socket(s) => s,
            Source::Relayed(rx, _) => {
                return rx
                    .recv()
                    .await
                    .ok_or_else(|| io::Error::other("the nf_tables responder stopped"));
            }
        };
        match socket.recv_from_full().await {
            Ok((buf, _)) => Ok(parse_datagram(&buf)),
            Err(e) if e.raw_os_error() == Some(nix::errno::Errno::ENOBUFS as i32) => {
                Ok(vec![Event::Overrun])
            }
            Err(e) => Err(e),
        }
    }
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Attributes of a message body: (type without flag bits, payload).
pub(crate) fn attributes(mut b: &[u8]) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 4 {
        let (Some(len), Some(kind)) = (u16_at(b, 0), u16_at(b, 2)) else {
            break;
        };
        let len = usize::from(len);
        if len < 4 || len > b.len() {
            break;
        }
        out.push((kind & 0x3fff, &b[4..len]));
        let padded = (len + 3) & !3;
        b = b.get(padded..).unwrap_or(&[]);
    }
    out
}

pub(crate) fn string(v: &[u8]) -> String {
    let end = v.iter().position(|&c| c == 0).unwrap_or(v.len());
    String::from_utf8_lossy(&v[..end]).into_owned()
}

/// Decodes every nf_tables message of a datagram; others are skipped.
pub fn parse_datagram(mut buf: &[u8]) -> Vec<Event> {
    let mut out = Vec::new();
    while buf.len() >= NLMSG_HDRLEN {
        let (Some(len), Some(kind)) = (u32_at(buf, 0), u16_at(buf, 4)) else {
            break;
        };
        let len = len as usize;
        if len < NLMSG_HDRLEN || len > buf.len() {
            break;
        }
        let msg = &buf[..len];
        buf = buf.get((len + 3) & !3..).unwrap_or(&[]);
        if kind >> 8 != SUBSYS_NFTABLES || msg.len() < NLMSG_HDRLEN + NFGENMSG_LEN {
            continue;
        }
        let attrs = attributes(&msg[NLMSG_HDRLEN + NFGENMSG_LEN..]);
        let attr = |t: u16| attrs.iter().find(|(k, _)| *k == t).map(|(_, v)| *v);
        let msg_type = kind & 0xff;
        if msg_type == NEWGEN {
            out.push(Event::NewGen {
                gen: attr(GEN_ID)
                    .and_then(|v| v.get(..4))
                    .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                pid: attr(GEN_PROC_PID)
                    .and_then(|v| v.get(..4))
                    .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                process: attr(GEN_PROC_NAME).map(string),
            });
            continue;
        }
        let Some(family) = NfFamily::from_nfproto(msg[NLMSG_HDRLEN]) else {
            continue;
        };
        let named = |t: u16| attr(t).map(string).unwrap_or_default();
        let (object, removed) = match msg_type {
            NEWTABLE | DELTABLE => (Object::Table, msg_type == DELTABLE),
            NEWCHAIN | DELCHAIN => (Object::Chain(named(CHAIN_NAME)), msg_type == DELCHAIN),
            NEWRULE | DELRULE => (Object::Rule(named(RULE_CHAIN)), msg_type == DELRULE),
            NEWSET | DELSET => (Object::Set(named(SET_NAME)), msg_type == DELSET),
            NEWSETELEM | DELSETELEM => (Object::Elements(named(ELEM_SET)), msg_type == DELSETELEM),
            _ => continue,
        };
        let Some(table) = attr(ATTR_TABLE).map(string) else {
            continue;
        };
        out.push(Event::Change {
            family,
            table,
            object,
            removed,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        while v.len() % 4 != 0 {
            v.push(0);
        }
        v
    }

    fn msg(msg_type: u16, family: u8, attrs: &[Vec<u8>]) -> Vec<u8> {
        let body: Vec<u8> = attrs.concat();
        let len = NLMSG_HDRLEN + NFGENMSG_LEN + body.len();
        let mut v = Vec::new();
        v.extend_from_slice(&(len as u32).to_ne_bytes());
        v.extend_from_slice(&((SUBSYS_NFTABLES << 8) | msg_type).to_ne_bytes());
        v.extend_from_slice(&[0; 10]);
        v.extend_from_slice(&[family, 0, 0, 0]);
        v.extend_from_slice(&body);
        v
    }

    #[test]
    fn decodes_every_family_and_object() {
        let mut d = msg(
            DELSETELEM,
            2,
            &[attr(1, b"kube-proxy\0"), attr(2, b"cluster-ips\0")],
        );
        d.extend(msg(
            DELCHAIN,
            10,
            &[
                attr(1, b"kube-proxy\0"),
                attr(2, &7u64.to_be_bytes()),
                attr(3, b"services\0"),
            ],
        ));
        d.extend(msg(NEWRULE, 1, &[attr(1, b"t\0"), attr(2, b"c\0")]));
        d.extend(msg(DELTABLE, 5, &[attr(1, b"nd\0")]));
        d.extend(msg(NEWSET, 7, &[attr(1, b"b\0"), attr(2, b"s\0")]));
        d.extend(msg(NEWTABLE, 99, &[attr(1, b"x\0")]));
        d.extend(msg(
            NEWGEN,
            0,
            &[
                attr(1, &9u32.to_be_bytes()),
                attr(2, &4242u32.to_be_bytes()),
                attr(3, b"nft\0"),
            ],
        ));
        let change = |family, table: &str, object, removed| Event::Change {
            family,
            table: table.into(),
            object,
            removed,
        };
        assert_eq!(
            parse_datagram(&d),
            vec![
                change(
                    NfFamily::Ip,
                    "kube-proxy",
                    Object::Elements("cluster-ips".into()),
                    true
                ),
                change(
                    NfFamily::Ip6,
                    "kube-proxy",
                    Object::Chain("services".into()),
                    true
                ),
                change(NfFamily::Inet, "t", Object::Rule("c".into()), false),
                change(NfFamily::Netdev, "nd", Object::Table, true),
                change(NfFamily::Bridge, "b", Object::Set("s".into()), false),
                Event::NewGen {
                    gen: Some(9),
                    pid: Some(4242),
                    process: Some("nft".into())
                },
            ]
        );
        assert_eq!(parse_datagram(&d[..7]), vec![]);
    }
}
