//! nf_tables change notifications as the iptables guard needs them: iptables-nft, nft,
//! kube-proxy and flannel changes arrive as they are committed. The socket and the decoding are
//! [`crate::nftables::events`]' (one decoder for both engines); this keeps what concerns the
//! iptables families (ip, ip6) and their tables, chains and rules. iptables-legacy and ipset send
//! nothing: those are polled.

use crate::model::Family;
use crate::nftables::events::{self as nft, Event, Events};
use crate::nftables::model::NfFamily;
use std::io;

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
        /// The generation the transaction made.
        gen: Option<u32>,
        pid: Option<u32>,
        process: Option<String>,
    },
    /// Notifications were lost (ENOBUFS): anything may have changed.
    Overrun,
}

pub struct NftEvents {
    events: Events,
}

impl NftEvents {
    /// Opens the socket and joins the group. Call before reading the tables, so that no change
    /// falls between the read and the subscription.
    pub fn subscribe() -> io::Result<NftEvents> {
        Ok(NftEvents {
            events: crate::nftables::responder::subscribe()?,
        })
    }

    /// The threads that commit images (the responder's): their transactions are the process's
    /// own.
    pub fn relayers(&self) -> &[u32] {
        self.events.relayers()
    }

    /// The events of the next datagram that concern the iptables families (possibly none).
    pub async fn next(&mut self) -> io::Result<Vec<NftEvent>> {
        Ok(iptables_events(self.events.next().await?))
    }
}

/// Decodes every netlink message of a datagram; what is not about iptables tables is skipped.
pub fn parse_datagram(buf: &[u8]) -> Vec<NftEvent> {
    iptables_events(nft::parse_datagram(buf))
}

/// The events of an iptables family (sets and elements are native nftables only), and every
/// NEWGEN and overrun.
fn iptables_events(events: Vec<Event>) -> Vec<NftEvent> {
    events
        .into_iter()
        .filter_map(|ev| match ev {
            Event::NewGen { gen, pid, process } => Some(NftEvent::NewGen { gen, pid, process }),
            Event::Overrun => Some(NftEvent::Overrun),
            Event::Change {
                family,
                table,
                object,
                removed,
            } => {
                let family = match family {
                    NfFamily::Ip => Family::Ipv4,
                    NfFamily::Ip6 => Family::Ipv6,
                    _ => return None,
                };
                let (chain, object) = match object {
                    nft::Object::Table => (None, Object::Table),
                    nft::Object::Chain(c) => (Some(c), Object::Chain),
                    nft::Object::Rule(c) => (Some(c), Object::Rule),
                    nft::Object::Set(_) | nft::Object::Elements(_) => return None,
                };
                Some(NftEvent::Touch {
                    family,
                    table,
                    chain,
                    removed,
                    object,
                })
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    const NLMSG_HDRLEN: usize = 16;
    const NFGENMSG_LEN: usize = 4;
    const SUBSYS_NFTABLES: u16 = 10;
    const NFT_MSG_DELRULE: u16 = 8;
    const NFT_MSG_DELCHAIN: u16 = 5;
    const NFT_MSG_NEWRULE: u16 = 6;
    const NFT_MSG_NEWSET: u16 = 9;
    const NFT_MSG_NEWGEN: u16 = 15;
    const NFPROTO_IPV4: u8 = 2;
    const NFPROTO_IPV6: u8 = 10;

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
        // A set of an iptables family: native nftables only, not the guard's.
        dgram.extend(msg(
            NFT_MSG_NEWSET,
            NFPROTO_IPV4,
            &[attr(1, b"nat\0"), attr(2, b"s\0")],
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
                    gen: Some(9),
                    pid: Some(4242),
                    process: Some("iptables".into())
                },
            ]
        );
        // Truncated input stops cleanly.
        assert_eq!(parse_datagram(&dgram[..10]), vec![]);
    }
}
