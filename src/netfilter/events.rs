//! nf_tables change notifications (NETLINK_NETFILTER, group NFNLGRP_NFTABLES): iptables-nft,
//! nft, kube-proxy and flannel changes arrive here as they are committed. Only the few fields
//! needed are decoded by hand (message type, family, table and chain names, the NEWGEN sender),
//! which avoids a dependency on the full nf_tables message model for what is a header and two
//! string attributes. iptables-legacy and ipset send nothing: those are polled.

use crate::model::Family;
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, AsyncSocket, AsyncSocketExt, TokioSocket};
use std::io;

/// NFNLGRP_NFTABLES.
const GROUP_NFTABLES: u32 = 7;
/// NFNL_SUBSYS_NFTABLES: the high byte of the netlink message type.
const SUBSYS_NFTABLES: u16 = 10;
// enum nf_tables_msg_types (uapi/linux/netfilter/nf_tables.h).
const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWGEN: u16 = 15;
// Attribute 1 is the table name in table, chain and rule messages alike.
const NFTA_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_GEN_PROC_PID: u16 = 2;
const NFTA_GEN_PROC_NAME: u16 = 3;
const NFPROTO_IPV4: u8 = 2;
const NFPROTO_IPV6: u8 = 10;
const NLMSG_HDRLEN: usize = 16;
const NFGENMSG_LEN: usize = 4;

/// What a [`NftEvent::Touch`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Object {
    Table,
    Chain,
    Rule,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NftEvent {
    /// A table, chain or rule of an iptables family was added or removed. `chain` is `None` for
    /// a whole-table message.
    Touch {
        family: Family,
        table: String,
        chain: Option<String>,
        removed: bool,
        object: Object,
    },
    /// The end of a transaction, with the process that committed it.
    NewGen {
        pid: Option<u32>,
        process: Option<String>,
    },
    /// Notifications were lost (ENOBUFS): anything may have changed.
    Overrun,
}

pub struct NftEvents {
    socket: TokioSocket,
}

impl NftEvents {
    /// Opens the socket and joins the group. Call before reading the tables, so that no change
    /// falls between the read and the subscription.
    pub fn subscribe() -> io::Result<NftEvents> {
        let mut socket = TokioSocket::new(NETLINK_NETFILTER)?;
        let s = socket.socket_mut();
        s.bind_auto()?;
        // A kube-proxy resync rewrites thousands of rules in one transaction.
        s.set_rx_buf_sz(8 * 1024 * 1024)?;
        s.add_membership(GROUP_NFTABLES)?;
        Ok(NftEvents { socket })
    }

    /// The events of the next datagram.
    pub async fn next(&mut self) -> io::Result<Vec<NftEvent>> {
        match self.socket.recv_from_full().await {
            Ok((buf, _)) => Ok(parse_datagram(&buf)),
            Err(e) if e.raw_os_error() == Some(libc_enobufs()) => Ok(vec![NftEvent::Overrun]),
            Err(e) => Err(e),
        }
    }
}

fn libc_enobufs() -> i32 {
    nix::errno::Errno::ENOBUFS as i32
}

pub(crate) fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

pub(crate) fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// Attributes of a message body: (type without flag bits, payload). (Also read by
/// [`crate::nftables::events`].)
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

/// Decodes every netlink message of a datagram; what is not about iptables tables is skipped.
pub fn parse_datagram(mut buf: &[u8]) -> Vec<NftEvent> {
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
        let family = msg[NLMSG_HDRLEN];
        let attrs = attributes(&msg[NLMSG_HDRLEN + NFGENMSG_LEN..]);
        let attr = |t: u16| attrs.iter().find(|(k, _)| *k == t).map(|(_, v)| *v);
        let msg_type = kind & 0xff;
        if msg_type == NFT_MSG_NEWGEN {
            out.push(NftEvent::NewGen {
                pid: attr(NFTA_GEN_PROC_PID)
                    .and_then(|v| v.get(..4))
                    .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]])),
                process: attr(NFTA_GEN_PROC_NAME).map(string),
            });
            continue;
        }
        let family = match family {
            NFPROTO_IPV4 => Family::Ipv4,
            NFPROTO_IPV6 => Family::Ipv6,
            _ => continue,
        };
        let (chain_attr, removed, object) = match msg_type {
            NFT_MSG_NEWTABLE => (None, false, Object::Table),
            NFT_MSG_DELTABLE => (None, true, Object::Table),
            NFT_MSG_NEWCHAIN => (Some(NFTA_CHAIN_NAME), false, Object::Chain),
            NFT_MSG_DELCHAIN => (Some(NFTA_CHAIN_NAME), true, Object::Chain),
            NFT_MSG_NEWRULE => (Some(NFTA_RULE_CHAIN), false, Object::Rule),
            NFT_MSG_DELRULE => (Some(NFTA_RULE_CHAIN), true, Object::Rule),
            _ => continue,
        };
        let Some(table) = attr(NFTA_TABLE).map(string) else {
            continue;
        };
        out.push(NftEvent::Touch {
            family,
            table,
            chain: chain_attr.and_then(attr).map(string),
            removed,
            object,
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
        v.extend_from_slice(&[0; 10]); // flags, seq, port
        v.extend_from_slice(&[family, 0, 0, 0]);
        v.extend_from_slice(&body);
        v
    }

    #[test]
    fn decodes_a_chain_delete_transaction() {
        let mut dgram = msg(
            NFT_MSG_DELRULE,
            NFPROTO_IPV4,
            &[
                attr(1, b"nat\0"),
                attr(2, b"POSTROUTING\0"),
                attr(3, &7u64.to_be_bytes()),
            ],
        );
        dgram.extend(msg(
            NFT_MSG_DELCHAIN,
            NFPROTO_IPV6,
            &[
                attr(1, b"nat\0"),
                attr(2, &1u64.to_be_bytes()),
                attr(3, b"FLANNEL-POSTRTG\0"),
            ],
        ));
        dgram.extend(msg(
            NFT_MSG_NEWRULE,
            1, /* inet: not iptables */
            &[attr(1, b"x\0"), attr(2, b"y\0")],
        ));
        dgram.extend(msg(
            NFT_MSG_NEWGEN,
            0,
            &[
                attr(1, &9u32.to_be_bytes()),
                attr(2, &4242u32.to_be_bytes()),
                attr(3, b"iptables\0"),
            ],
        ));
        assert_eq!(
            parse_datagram(&dgram),
            vec![
                NftEvent::Touch {
                    family: Family::Ipv4,
                    table: "nat".into(),
                    chain: Some("POSTROUTING".into()),
                    removed: true,
                    object: Object::Rule,
                },
                NftEvent::Touch {
                    family: Family::Ipv6,
                    table: "nat".into(),
                    chain: Some("FLANNEL-POSTRTG".into()),
                    removed: true,
                    object: Object::Chain,
                },
                NftEvent::NewGen {
                    pid: Some(4242),
                    process: Some("iptables".into())
                },
            ]
        );
        // Truncated input stops cleanly.
        assert_eq!(parse_datagram(&dgram[..10]), vec![]);
    }
}
