//! The agent's own nf_tables netlink socket: dumps one table, or one iptables-nft chain and
//! its jumps, into an [`Image`] and commits a batch of images (see [`super::replay`] for why).
//! One socket for the process's life ([`shared`]), opened in the namespace the process is in
//! at its first use: closing a netfilter socket makes the kernel wait for pending object
//! destruction (an RCU grace period), which the repair path must never do.

use super::model::TableKey;
use super::replay::{self, c_str, Census, Dump, Image, Msg, Unfit, F_REQUEST, SUBSYS_NFTABLES};
use super::spare;
use rtnetlink::sys::{protocols::NETLINK_NETFILTER, Socket};
use std::io;
use std::os::fd::AsFd;
use thiserror::Error;

const GETTABLE: u16 = 1;
const GETCHAIN: u16 = 4;
const GETRULE: u16 = 7;
const GETSET: u16 = 10;
const GETSETELEM: u16 = 13;
const GETGEN: u16 = 16;
const GEN_ID: u16 = 1;
const F_ACK: u16 = 0x4;
const F_DUMP: u16 = 0x300;
const F_DUMP_INTR: u16 = 0x10;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
/// Attribute 1 names the table in tables, chains, rules, sets and element lists.
const ATTR_TABLE: u16 = 1;
const ELEM_LIST_SET: u16 = 2;
const CHAIN_HANDLE: u16 = 2;
const CHAIN_NAME: u16 = 3;
const RULE_CHAIN: u16 = 2;

#[derive(Debug, Error)]
pub enum NetlinkError {
    #[error("nf_tables netlink socket: {0}")]
    Io(#[from] io::Error),
    #[error("the kernel refused the request: {0}")]
    Refused(nix::errno::Errno),
    #[error("the table changed while it was read")]
    Changed,
    #[error("the responder put back only some of these images")]
    PartlyReplayed,
    #[error("no image: {0}")]
    Unfit(#[from] Unfit),
}

/// Runs `f` on the process's socket, opening it at the first call.
pub fn shared<R>(f: impl FnOnce(&mut Conn) -> Result<R, NetlinkError>) -> Result<R, NetlinkError> {
    static SHARED: std::sync::Mutex<Option<Conn>> = std::sync::Mutex::new(None);
    let mut conn = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    if conn.is_none() {
        *conn = Some(Conn::open()?);
    }
    match conn.as_mut() {
        Some(c) => f(c),
        None => Err(NetlinkError::Io(io::ErrorKind::NotConnected.into())),
    }
}

/// Commits images on the process's socket; returns the id of the thread that committed (what
/// nf_tables names in the transaction's NEWGEN).
pub fn replay(images: &[&Image], genid: u32) -> Result<u32, NetlinkError> {
    shared(|c| c.commit(images, genid))?;
    Ok(nix::unistd::gettid().as_raw() as u32)
}

#[derive(Debug)]
pub struct Conn {
    socket: Socket,
    seq: u32,
}

impl Conn {
    pub fn open() -> io::Result<Conn> {
        let mut socket = Socket::new(NETLINK_NETFILTER)?;
        socket.bind_auto()?;
        crate::observe::kernel::set_rcvbuf(&socket, 4 << 20);
        Ok(Conn { socket, seq: 1 })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    /// The kernel's current generation (what a NEWGEN names).
    pub fn generation(&mut self) -> Result<u32, NetlinkError> {
        let mut gens = Vec::new();
        let reply = self.request(GETGEN, F_ACK, 0, &[], &mut gens)?;
        reply
            .iter()
            .find_map(|m| replay::attr(&m.attrs, GEN_ID).and_then(|v| v.get(..4)))
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
            .ok_or(NetlinkError::Io(io::ErrorKind::InvalidData.into()))
    }

    /// The table's image as the kernel holds it now, if it holds `expected`; `None` when the
    /// table does not exist.
    pub fn capture(
        &mut self,
        key: &TableKey,
        expected: &Census,
    ) -> Result<Option<Image>, NetlinkError> {
        let family = key.family.nfproto();
        let mut name = Vec::new();
        replay::put_attr(&mut name, ATTR_TABLE, c_str(&key.name).as_slice());
        let mut gens = Vec::new();
        let table = match self.request(GETTABLE, F_ACK, family, &name, &mut gens) {
            Ok(mut m) => m.pop(),
            Err(NetlinkError::Refused(nix::errno::Errno::ENOENT)) => return Ok(None),
            Err(e) => return Err(e),
        };
        let of_table = |m: &Msg| replay::attr(&m.attrs, ATTR_TABLE) == Some(&c_str(&key.name)[..]);
        let mut chains = self.request(GETCHAIN, F_DUMP, family, &[], &mut gens)?;
        chains.retain(of_table);
        let mut sets = self.request(GETSET, F_DUMP, family, &name, &mut gens)?;
        sets.retain(of_table);
        let mut elements = Vec::new();
        for set in &sets {
            let mut which = name.clone();
            let set_name = replay::attr(&set.attrs, replay::SET_NAME).unwrap_or_default();
            replay::put_attr(&mut which, ELEM_LIST_SET, set_name);
            elements.extend(self.request(GETSETELEM, F_DUMP, family, &which, &mut gens)?);
        }
        let mut rules = self.request(GETRULE, F_DUMP, family, &name, &mut gens)?;
        rules.retain(of_table);
        // Every reply carries the generation it was read at: all the same, or the table may
        // have changed between the dumps.
        if gens.windows(2).any(|w| w[0] != w[1]) {
            return Err(NetlinkError::Changed);
        }
        let dump = Dump {
            table,
            chains,
            sets,
            elements,
            rules,
        };
        Ok(Some(Image::of_table(dump, expected)?))
    }

    /// The image of iptables-nft chain `chain` of table `table` (family `family`, NFPROTO_*),
    /// if it holds `rules` rules and each of `jumps` (chain, put first) holds exactly one rule
    /// that jumps to it; `None` when the chain does not exist.
    pub fn capture_chain(
        &mut self,
        family: u8,
        table: &str,
        chain: &str,
        rules: usize,
        jumps: &[(String, bool)],
    ) -> Result<Option<Image>, NetlinkError> {
        let mut gens = Vec::new();
        let Some(msg) = self.chain(family, table, chain, &mut gens)? else {
            return Ok(None);
        };
        let own = self.rules_of(family, table, chain, &mut gens)?;
        if own.len() != rules {
            return Err(Unfit::MoreThanConfigured.into());
        }
        let mut to = Vec::new();
        for (parent, first) in jumps {
            let mut these: Vec<Msg> = self
                .rules_of(family, table, parent, &mut gens)?
                .into_iter()
                .filter(|r| replay::jumps_to(r, chain))
                .collect();
            if these.len() != 1 {
                return Err(Unfit::Jumps.into());
            }
            to.push((these.remove(0), *first));
        }
        if gens.windows(2).any(|w| w[0] != w[1]) {
            return Err(NetlinkError::Changed);
        }
        Ok(Some(Image::of_chain(msg, own, to)))
    }

    /// Creates a spare ([`super::spare`]) with `build` at generation `genid`, replacing one
    /// of that name in the same transaction; returns its handle.
    pub fn make_spare(
        &mut self,
        family: u8,
        table: &str,
        spare: &str,
        build: &Image,
        genid: u32,
    ) -> Result<u64, NetlinkError> {
        let there = self.chain_handle(family, table, spare)?.is_some();
        let removal = spare::removal(family, table, spare);
        let images: Vec<&Image> = match there {
            true => vec![&removal, build],
            false => vec![build],
        };
        self.commit(&images, genid)?;
        self.chain_handle(family, table, spare)?
            .ok_or(NetlinkError::Changed)
    }

    /// Chain `chain` as the kernel lists it, if it exists.
    fn chain(
        &mut self,
        family: u8,
        table: &str,
        chain: &str,
        gens: &mut Vec<u16>,
    ) -> Result<Option<Msg>, NetlinkError> {
        let mut named = Vec::new();
        replay::put_attr(&mut named, ATTR_TABLE, &c_str(table));
        replay::put_attr(&mut named, CHAIN_NAME, &c_str(chain));
        match self.request(GETCHAIN, F_ACK, family, &named, gens) {
            Ok(mut found) => Ok(found.pop()),
            Err(NetlinkError::Refused(nix::errno::Errno::ENOENT)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The handle of chain `chain`, if it exists.
    fn chain_handle(
        &mut self,
        family: u8,
        table: &str,
        chain: &str,
    ) -> Result<Option<u64>, NetlinkError> {
        let found = self.chain(family, table, chain, &mut Vec::new())?;
        Ok(found.and_then(|m| {
            let h = replay::attr(&m.attrs, CHAIN_HANDLE)?.get(..8)?;
            Some(u64::from_be_bytes(h.try_into().ok()?))
        }))
    }

    /// Deletes the spares named that are in the table; returns how many it deleted.
    pub fn drop_spares(
        &mut self,
        family: u8,
        table: &str,
        names: &[String],
    ) -> Result<usize, NetlinkError> {
        let mut name = Vec::new();
        replay::put_attr(&mut name, ATTR_TABLE, &c_str(table));
        let mut gens = Vec::new();
        let chains = match self.request(GETCHAIN, F_DUMP, family, &name, &mut gens) {
            Err(NetlinkError::Refused(nix::errno::Errno::ENOENT)) => return Ok(0),
            r => r?,
        };
        let doomed: Vec<Image> = chains
            .iter()
            .filter(|m| replay::attr(&m.attrs, ATTR_TABLE) == Some(&c_str(table)[..]))
            .filter_map(|m| replay::attr(&m.attrs, CHAIN_NAME).map(super::events::string))
            .filter(|n| spare::is_spare(n) && names.contains(n))
            .map(|n| spare::removal(family, table, &n))
            .collect();
        if doomed.is_empty() {
            return Ok(0);
        }
        // Unconditional (generation 0): a spare is netwarden's whatever else changed.
        self.commit(&doomed.iter().collect::<Vec<_>>(), 0)?;
        Ok(doomed.len())
    }

    /// The rules of one chain, in order.
    fn rules_of(
        &mut self,
        family: u8,
        table: &str,
        chain: &str,
        gens: &mut Vec<u16>,
    ) -> Result<Vec<Msg>, NetlinkError> {
        let mut which = Vec::new();
        replay::put_attr(&mut which, ATTR_TABLE, &c_str(table));
        replay::put_attr(&mut which, RULE_CHAIN, &c_str(chain));
        let mut rules = self.request(GETRULE, F_DUMP, family, &which, gens)?;
        rules.retain(|r| replay::attr(&r.attrs, RULE_CHAIN) == Some(&c_str(chain)[..]));
        Ok(rules)
    }

    /// Commits the images in one transaction at generation `genid`.
    pub fn commit(&mut self, images: &[&Image], genid: u32) -> Result<(), NetlinkError> {
        let first = self.next_seq();
        let (bytes, acks) = replay::batch(images, genid, first);
        self.seq = self.seq.wrapping_add(acks as u32 + 1);
        if bytes.len() > 200_000 {
            use nix::sys::socket::{setsockopt, sockopt};
            let want = bytes.len() * 2;
            let _ = setsockopt(&self.socket.as_fd(), sockopt::SndBufForce, &want)
                .or_else(|_| setsockopt(&self.socket.as_fd(), sockopt::SndBuf, &want));
        }
        self.socket.send(&bytes, 0)?;
        // The kernel handles the batch inside send(): every answer is queued when it returns.
        let mut first_error = None;
        let mut answered = 0;
        while answered < acks && first_error.is_none() {
            let (buf, _) = self.socket.recv_from_full()?;
            for (kind, _, body) in messages(&buf) {
                if kind == NLMSG_ERROR {
                    answered += 1;
                    let code = body
                        .get(..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    if code < 0 && first_error.is_none() {
                        first_error = Some(nix::errno::Errno::from_raw(-code));
                    }
                }
            }
        }
        // A refused batch answers fewer than `acks` times: drop what else is queued.
        self.drain();
        match first_error {
            Some(e) => Err(NetlinkError::Refused(e)),
            None => Ok(()),
        }
    }

    fn drain(&mut self) {
        let mut buf = vec![0u8; 65536];
        while matches!(self.socket.recv(&mut &mut buf[..], libc_dontwait()), Ok(n) if n > 0) {}
    }

    /// Sends one request and reads its answers: the nf_tables messages, until the dump ends or
    /// the request is acknowledged. Pushes the generation of each answer to `gens`.
    fn request(
        &mut self,
        msg: u16,
        flags: u16,
        family: u8,
        attrs: &[u8],
        gens: &mut Vec<u16>,
    ) -> Result<Vec<Msg>, NetlinkError> {
        let seq = self.next_seq();
        let mut out = Vec::new();
        replay::put_msg(
            &mut out,
            (SUBSYS_NFTABLES << 8) | msg,
            F_REQUEST | flags,
            seq,
            family,
            attrs,
            false,
        );
        self.socket.send(&out, 0)?;
        let mut found = Vec::new();
        loop {
            let (buf, _) = self.socket.recv_from_full()?;
            for (kind, hflags, body) in messages(&buf) {
                match kind {
                    NLMSG_DONE => return Ok(found),
                    NLMSG_ERROR => {
                        let code = body
                            .get(..4)
                            .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                        if code < 0 {
                            return Err(NetlinkError::Refused(nix::errno::Errno::from_raw(-code)));
                        }
                        return Ok(found);
                    }
                    k if k >> 8 == SUBSYS_NFTABLES && body.len() >= 4 => {
                        if hflags & F_DUMP_INTR != 0 {
                            return Err(NetlinkError::Changed);
                        }
                        gens.push(u16::from_be_bytes([body[2], body[3]]));
                        found.push(Msg {
                            kind: k & 0xff,
                            family: body[0],
                            attrs: body[4..].to_vec(),
                        });
                    }
                    _ => {}
                }
            }
        }
    }
}

/// The messages of a datagram: (type, flags, body after the header).
fn messages(mut b: &[u8]) -> Vec<(u16, u16, &[u8])> {
    let mut out = Vec::new();
    while b.len() >= 16 {
        let len = u32::from_ne_bytes(b[..4].try_into().unwrap()) as usize;
        if len < 16 || len > b.len() {
            break;
        }
        let kind = u16::from_ne_bytes([b[4], b[5]]);
        let flags = u16::from_ne_bytes([b[6], b[7]]);
        out.push((kind, flags, &b[16..len]));
        b = b.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    out
}

fn libc_dontwait() -> i32 {
    nix::sys::socket::MsgFlags::MSG_DONTWAIT.bits()
}
