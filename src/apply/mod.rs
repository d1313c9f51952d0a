//! Applying a plan: rtnetlink requests on a socket of the applier's own, batched.
//!
//! A burst is written as few `sendmsg` calls as possible, each carrying many requests. Only the
//! last request of a batch asks for an acknowledgement (NLM_F_ACK); the kernel still answers every
//! failed request with an error, and since it handles the requests of one socket strictly in order,
//! the acknowledgement of the last one means every earlier one is done: no error seen for it means
//! success. That turns 2N system calls and N acknowledgements into about 2 per batch, which is what
//! makes a mass repair keep pace with `ip -batch`. A single repair is one send and one receive.

pub mod encode;
mod sysctl;

use crate::observe::decode::each_message;
use crate::plan::{Op, Step};
use nix::errno::Errno;
use rtnetlink::packet_core::{
    Emitable, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_APPEND, NLM_F_EXCL, NLM_F_REPLACE,
};
use rtnetlink::packet_route::RouteNetlinkMessage;
use rtnetlink::sys::{
    protocols::NETLINK_ROUTE, AsyncSocket, AsyncSocketExt, SocketAddr, TokioSocket,
};
use std::ops::ControlFlow;
use std::os::fd::AsFd;
use std::time::Duration;
use thiserror::Error;

/// Largest batch, in bytes of requests: well under the socket send buffer set below.
const BATCH_BYTES: usize = 128 << 10;
/// Send buffer of the request socket (a batch must fit in one skb).
const SNDBUF: usize = 1 << 20;
/// Receive buffer: errors of a whole batch (each echoes the failed request) plus the ack.
const RCVBUF: usize = 16 << 20;
/// A batch the kernel has not acknowledged in this time is reported as failed.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Debug, Error, PartialEq, Eq)]
pub enum ApplyError {
    #[error("kernel refused: {errno} ({desc})", errno = .0, desc = .0.desc())]
    Kernel(Errno),
    #[error("no answer from the kernel within {0:?}")]
    Timeout(Duration),
    #[error("the netlink socket failed: {0}")]
    Socket(String),
    /// A setting could not be written (`path`: the file below the sysctl directory).
    #[error("cannot write {path}: {desc}{hint}", desc = .errno.desc(), hint = write_hint(*.errno))]
    Write { path: String, errno: Errno },
}

/// What to do about a setting that cannot be written.
fn write_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::EROFS => " (in a container /proc/sys is read-only: mount the host's /proc/sys/net writable and pass --sysctl-dir, see docs/operator-guide.md)",
        Errno::EACCES | Errno::EPERM => " (the agent needs to run as root or with CAP_NET_ADMIN)",
        Errno::EINVAL => " (the kernel refused the value)",
        _ => "",
    }
}

impl ApplyError {
    /// The errno label of `netwarden_apply_errors_total`.
    pub fn label(&self) -> String {
        match self {
            ApplyError::Kernel(errno) | ApplyError::Write { errno, .. } => format!("{errno:?}"),
            ApplyError::Timeout(_) => "timeout".to_string(),
            ApplyError::Socket(_) => "socket".to_string(),
        }
    }
}

impl ApplyError {
    /// The kernel refused for lack of permission (no CAP_NET_ADMIN over the namespace, or a
    /// security module said no): no retry will do better.
    pub fn is_permission(&self) -> bool {
        matches!(self, ApplyError::Kernel(Errno::EPERM | Errno::EACCES))
    }
}

/// Whether this process may change the network state of its namespace: see
/// [`Applier::probe_write_access`]. Opens a socket of its own.
///
/// # Errors
///
/// The kernel's refusal (EPERM, EACCES), or why the kernel could not be asked.
pub async fn check_write_access() -> Result<(), ApplyError> {
    let mut applier = Applier::open().map_err(|e| ApplyError::Socket(e.to_string()))?;
    applier.probe_write_access().await
}

/// Whether the kernel checks a new rule against the rules it holds (see [`Applier::apply`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleAdd {
    /// NLM_F_EXCL: an existing copy is reported as EEXIST.
    Exclusive,
    /// No check: the caller knows the rule is not there.
    Unchecked,
}

/// What became of one step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    /// EEXIST: someone (or an earlier request) put it back first.
    AlreadyThere,
    /// The kernel cannot take it yet (device or gateway missing, device down): retried when an
    /// event says the dependency may exist.
    NotYet(Errno),
    Failed(ApplyError),
}

impl Outcome {
    pub fn is_success(&self) -> bool {
        matches!(self, Outcome::Applied | Outcome::AlreadyThere)
    }
}

/// Errors that mean "the object depends on something that is not there yet".
pub fn is_not_yet(errno: Errno) -> bool {
    matches!(
        errno,
        Errno::ENODEV | Errno::ENETUNREACH | Errno::ENETDOWN | Errno::EHOSTUNREACH
    )
}

/// The netlink message of an op, and the message the kernel would notify once it is done (the
/// same); `None` for a sysctl write, which is no netlink request.
pub fn message(op: &Op) -> Option<RouteNetlinkMessage> {
    use RouteNetlinkMessage as M;
    Some(match op {
        Op::AddRule { key, protocol } => M::NewRule(encode::rule(key, *protocol)),
        Op::DelRule { key, protocol } => M::DelRule(encode::rule(key, *protocol)),
        Op::PutRoute { route, oif } => M::NewRoute(encode::route(route, *oif)),
        Op::AddAddress {
            ifindex,
            address,
            attrs,
        } => M::NewAddress(encode::address_as(*ifindex, *address, attrs)),
        Op::DelAddress {
            ifindex,
            address,
            prefix_len,
        } => M::DelAddress(encode::address(*ifindex, *address, *prefix_len)),
        Op::PutNeighbour { neighbour, ifindex } => {
            M::NewNeighbour(encode::neighbour(neighbour, *ifindex))
        }
        Op::PutFdb { fdb, ifindex } => M::NewNeighbour(encode::fdb(fdb, *ifindex)),
        Op::SetLink { ifindex, up, mtu } => M::SetLink(encode::set_link(*ifindex, *up, *mtu)),
        Op::SetSysctl { .. } => return None,
    })
}

/// Folds what a successful op did into the mirror, without waiting for the kernel's
/// notification (the agent's own are filtered out, and a burst must not re-plan what is fixed).
pub fn record(mirror: &mut crate::observe::Mirror, op: &Op) {
    match (op, message(op)) {
        (Op::SetSysctl { key, value }, _) => {
            mirror.set_sysctl(key, *value);
        }
        (_, Some(m)) => {
            mirror.ingest(&m);
        }
        (_, None) => {}
    }
}

/// The request for an op, acknowledged (the batching clears that on all but the last). Public
/// so that tests can send exactly what the applier sends. `None` for a sysctl write.
pub fn request(op: &Op, rules: RuleAdd) -> Option<NetlinkMessage<RouteNetlinkMessage>> {
    let (create, replace) = flags(op);
    let mut msg = encode::request(message(op)?, create, replace);
    if rules == RuleAdd::Unchecked && matches!(op, Op::AddRule { .. }) {
        msg.header.flags &= !NLM_F_EXCL;
    }
    if let Op::PutFdb { fdb, .. } = op {
        if fdb.lladdr.has_many_remotes() {
            // One more remote in the list; a replace would leave a list as it is.
            msg.header.flags = (msg.header.flags & !NLM_F_REPLACE) | NLM_F_APPEND;
        }
    }
    Some(msg)
}

fn flags(op: &Op) -> (bool, bool) {
    match op {
        Op::AddRule { .. } | Op::AddAddress { .. } => (true, false),
        Op::PutRoute { .. } | Op::PutNeighbour { .. } | Op::PutFdb { .. } => (true, true),
        Op::DelRule { .. } | Op::DelAddress { .. } | Op::SetLink { .. } | Op::SetSysctl { .. } => {
            (false, false)
        }
    }
}

pub(crate) fn is_delete(op: &Op) -> bool {
    matches!(op, Op::DelRule { .. } | Op::DelAddress { .. })
}

/// Sends requests on a netlink socket of its own.
pub struct Applier {
    socket: TokioSocket,
    port: u32,
    seq: u32,
    buf: Vec<u8>,
    /// Where settings are written.
    sysctl: crate::observe::sysctl::SysctlFs,
}

impl Applier {
    /// Opens the request socket (in the calling thread's network namespace).
    pub fn open() -> std::io::Result<Applier> {
        use nix::sys::socket::{setsockopt, sockopt};
        let mut socket = TokioSocket::new(NETLINK_ROUTE)?;
        let sock = socket.socket_mut();
        sock.bind_auto()?;
        // Beyond rmem_max/wmem_max with CAP_NET_ADMIN; the capped sizes otherwise.
        if setsockopt(&sock.as_fd(), sockopt::SndBufForce, &SNDBUF).is_err() {
            let _ = setsockopt(&sock.as_fd(), sockopt::SndBuf, &SNDBUF);
        }
        if setsockopt(&sock.as_fd(), sockopt::RcvBufForce, &RCVBUF).is_err() {
            let _ = setsockopt(&sock.as_fd(), sockopt::RcvBuf, &RCVBUF);
        }
        let mut addr = SocketAddr::new(0, 0);
        sock.get_address(&mut addr)?;
        Ok(Applier {
            socket,
            port: addr.port_number(),
            seq: 0,
            buf: Vec::with_capacity(BATCH_BYTES),
            sysctl: crate::observe::sysctl::SysctlFs::default(),
        })
    }

    /// The netlink port id of the request socket: the kernel stamps it on the notifications of
    /// the changes this applier makes.
    pub fn port(&self) -> u32 {
        self.port
    }

    /// Returns once the kernel has finished the changes of this network namespace that were
    /// under way when it was called. Deleting an address drops the routes that depended on it
    /// only after the deletion was notified, under the routing lock; route dumps do not take
    /// that lock (Linux 6.9 and later), so a dump right after the notification could still list
    /// routes about to go, and they would be believed present. A request that takes the lock (a
    /// deletion that matches nothing, answered ESRCH) is answered after those changes are done.
    pub async fn barrier(&mut self) {
        let mut msg = encode::request(
            RouteNetlinkMessage::DelRoute(encode::no_such_route()),
            false,
            false,
        );
        self.seq = self.seq.wrapping_add(1);
        msg.header.sequence_number = self.seq;
        self.buf.clear();
        self.buf.resize(msg.buffer_len(), 0);
        msg.emit(&mut self.buf);
        let _ = self.send_batch(self.seq, 1).await;
    }

    /// [`Applier::apply_all`], sending first one route per nexthop (see [`nexthop_probes`]): when
    /// the kernel cannot take that one yet (its gateway unreachable: the link lost its address),
    /// the others through the same nexthop are not sent, they share its outcome. A networkd
    /// restart leaves a thousand routes through one gateway unplaceable until its address is
    /// back; sending each to be refused was most of the agent's work after the address went.
    pub async fn apply(&mut self, steps: &[Step], rules: RuleAdd) -> Vec<Outcome> {
        let probes = nexthop_probes(steps);
        if probes.iter().all(Option::is_none) {
            return self.apply_all(steps, rules).await;
        }
        let first: Vec<usize> = (0..steps.len()).filter(|i| probes[*i].is_none()).collect();
        let sent: Vec<&Step> = first.iter().map(|i| &steps[*i]).collect();
        let mut outcomes: Vec<Option<Outcome>> = vec![None; steps.len()];
        for (i, o) in first.iter().zip(self.apply_refs(&sent, rules).await) {
            outcomes[*i] = Some(o);
        }
        let mut rest = Vec::new();
        for (i, probe) in probes.iter().enumerate() {
            let Some(p) = probe else { continue };
            match &outcomes[*p] {
                Some(Outcome::NotYet(e)) => outcomes[i] = Some(Outcome::NotYet(*e)),
                _ => rest.push(i),
            }
        }
        if !rest.is_empty() {
            let sent: Vec<&Step> = rest.iter().map(|i| &steps[*i]).collect();
            for (i, o) in rest.iter().zip(self.apply_refs(&sent, rules).await) {
                outcomes[*i] = Some(o);
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.unwrap_or(Outcome::Failed(ApplyError::Socket("not sent".into()))))
            .collect()
    }

    /// Sends every op of every step, in order, and returns one outcome per step.
    ///
    /// `rules`: how rules are added. Asking the kernel to refuse an existing rule (NLM_F_EXCL)
    /// makes it compare the new rule with every rule it holds first: with 1,000 rules whose cache
    /// lines a busy host keeps evicting, that walk is a measurable share of a repair in the scale
    /// bench (docs/benchmarks.md). Without it a rule someone else put back first is added a
    /// second time; the caller takes that risk only when its mirror is known to be current, and
    /// removes such a copy when it sees the other add (see `reconcile`).
    pub async fn apply_all(&mut self, steps: &[Step], rules: RuleAdd) -> Vec<Outcome> {
        let refs: Vec<&Step> = steps.iter().collect();
        self.apply_refs(&refs, rules).await
    }

    async fn apply_refs(&mut self, steps: &[&Step], rules: RuleAdd) -> Vec<Outcome> {
        // Settings first (they are files, written at once), then the netlink requests.
        let mut sysctls: Vec<Option<Outcome>> = steps
            .iter()
            .map(|s| sysctl::write_step(&self.sysctl, s))
            .collect();
        let ops: Vec<(usize, &Op)> = steps
            .iter()
            .enumerate()
            .filter(|(si, _)| sysctls[*si].is_none())
            .flat_map(|(si, s)| s.ops.iter().map(move |op| (si, op)))
            .collect();
        let mut results: Vec<Result<(), ApplyError>> = Vec::with_capacity(ops.len());
        let mut at = 0;
        while at < ops.len() {
            // Fill one batch.
            self.buf.clear();
            let first_seq = self.seq.wrapping_add(1);
            let mut end = at;
            while end < ops.len() {
                let (_, op) = ops[end];
                let Some(mut msg) = request(op, rules) else {
                    unreachable!("sysctl steps are written, not sent");
                };
                let last =
                    end + 1 == ops.len() || self.buf.len() + msg.buffer_len() * 2 > BATCH_BYTES;
                if !last {
                    msg.header.flags &= !NLM_F_ACK;
                }
                self.seq = self.seq.wrapping_add(1);
                msg.header.sequence_number = self.seq;
                let len = msg.buffer_len();
                let from = self.buf.len();
                self.buf.resize(from + len, 0);
                msg.emit(&mut self.buf[from..]);
                end += 1;
                if last {
                    break;
                }
            }
            let batch = self.send_batch(first_seq, end - at).await;
            results.extend(batch);
            at = end;
        }
        let mut per_step: Vec<Vec<Result<(), ApplyError>>> = vec![Vec::new(); steps.len()];
        for ((si, _), r) in ops.iter().zip(results) {
            per_step[*si].push(r);
        }
        steps
            .iter()
            .zip(per_step)
            .enumerate()
            .map(|(si, (step, results))| match sysctls[si].take() {
                Some(written) => written,
                None => outcome(&step.ops, &results),
            })
            .collect()
    }

    /// Asks the kernel whether this process may change the network state of its namespace, and
    /// changes nothing: a rule request of no address family. The kernel checks the permission
    /// (CAP_NET_ADMIN over the namespace's user namespace) before it looks at the request and
    /// refuses with EPERM; with the permission it rejects the family (EAFNOSUPPORT). Checked at
    /// start because a node where everything is in sync would otherwise not show it.
    pub async fn probe_write_access(&mut self) -> Result<(), ApplyError> {
        use rtnetlink::packet_route::rule::RuleMessage;
        let mut msg = encode::request(
            RouteNetlinkMessage::NewRule(RuleMessage::default()),
            true,
            false,
        );
        self.seq = self.seq.wrapping_add(1);
        msg.header.sequence_number = self.seq;
        self.buf.clear();
        self.buf.resize(msg.buffer_len(), 0);
        msg.emit(&mut self.buf[..]);
        match self.send_batch(self.seq, 1).await.pop() {
            Some(Err(e)) if e.is_permission() => Err(e),
            Some(Err(ApplyError::Kernel(_))) | Some(Ok(())) | None => Ok(()),
            Some(Err(e)) => Err(e),
        }
    }

    /// Sends the batch in `self.buf` (`count` requests numbered from `first_seq`) and waits for
    /// the acknowledgement of its last request; errors before it belong to earlier requests.
    async fn send_batch(&mut self, first_seq: u32, count: usize) -> Vec<Result<(), ApplyError>> {
        let mut results: Vec<Result<(), ApplyError>> = vec![Ok(()); count];
        if let Err(e) = self.socket.send(&self.buf).await {
            return vec![Err(ApplyError::Socket(e.to_string())); count];
        }
        let last_seq = first_seq.wrapping_add(count as u32 - 1);
        let wait = async {
            let mut rx: Vec<u8> = Vec::with_capacity(64 << 10);
            loop {
                rx.clear();
                self.socket
                    .recv(&mut rx)
                    .await
                    .map_err(|e| ApplyError::Socket(e.to_string()))?;
                let done = each_message(&rx, |msg| {
                    let seq = msg.header.sequence_number;
                    let index = seq.wrapping_sub(first_seq) as usize;
                    if let NetlinkPayload::Error(e) = msg.payload {
                        if index < count {
                            if let Some(code) = e.code {
                                results[index] =
                                    Err(ApplyError::Kernel(Errno::from_raw(-code.get())));
                            }
                            if seq == last_seq {
                                return ControlFlow::Break(());
                            }
                        }
                        // Anything else: a late answer to an earlier, timed-out batch.
                    }
                    ControlFlow::Continue(())
                });
                if done.is_break() {
                    return Ok(());
                }
            }
        };
        match tokio::time::timeout(ANSWER_TIMEOUT, wait).await {
            Ok(Ok(())) => results,
            Ok(Err(e)) => vec![Err(e); count],
            Err(_) => vec![Err(ApplyError::Timeout(ANSWER_TIMEOUT)); count],
        }
    }
}

/// For each step, the earlier step whose outcome it shares if that one cannot be placed yet: the
/// first step putting a route through the same nexthop (family, table, gateway, device, onlink,
/// scope: what the kernel checks the gateway's reachability with). `None` for the first of each
/// such group and for every other step.
pub fn nexthop_probes(steps: &[Step]) -> Vec<Option<usize>> {
    type Nexthop = (
        crate::model::Family,
        u32,
        std::net::IpAddr,
        Option<u32>,
        bool,
        Option<u8>,
    );
    let mut first: std::collections::HashMap<Nexthop, usize> = std::collections::HashMap::new();
    steps
        .iter()
        .enumerate()
        .map(|(i, s)| {
            // A swap (delete, then add) is sent whole.
            let [Op::PutRoute { route, oif }] = s.ops.as_slice() else {
                return None;
            };
            let gateway = route.gateway?;
            let hop = (
                route.key.family,
                route.key.table,
                gateway,
                *oif,
                route.onlink,
                route.scope,
            );
            match first.get(&hop) {
                Some(p) => Some(*p),
                None => {
                    first.insert(hop, i);
                    None
                }
            }
        })
        .collect()
}

/// A step succeeds when its last op (the add) does; a delete that finds nothing to delete is fine
/// (the old copy is already gone).
fn outcome(ops: &[Op], results: &[Result<(), ApplyError>]) -> Outcome {
    for (op, r) in ops.iter().zip(results) {
        match r {
            Ok(()) => {}
            Err(ApplyError::Kernel(Errno::ENOENT | Errno::ESRCH | Errno::EADDRNOTAVAIL))
                if is_delete(op) => {}
            Err(ApplyError::Kernel(Errno::EEXIST)) if !is_delete(op) => {
                return Outcome::AlreadyThere
            }
            Err(ApplyError::Kernel(e)) if is_not_yet(*e) => return Outcome::NotYet(*e),
            Err(e) => return Outcome::Failed(e.clone()),
        }
    }
    Outcome::Applied
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Family, RuleAction, RuleKey};

    fn key() -> RuleKey {
        RuleKey::new(
            Family::Ipv4,
            1,
            None,
            None,
            None,
            None,
            None,
            None,
            77,
            RuleAction::Lookup,
        )
    }

    #[test]
    fn outcomes_classify_errnos() {
        let add = [Op::AddRule {
            key: key(),
            protocol: None,
        }];
        let k = |e| Err(ApplyError::Kernel(e));
        assert_eq!(outcome(&add, &[Ok(())]), Outcome::Applied);
        assert_eq!(outcome(&add, &[k(Errno::EEXIST)]), Outcome::AlreadyThere);
        assert_eq!(
            outcome(&add, &[k(Errno::ENODEV)]),
            Outcome::NotYet(Errno::ENODEV)
        );
        assert_eq!(
            outcome(&add, &[k(Errno::ENETUNREACH)]),
            Outcome::NotYet(Errno::ENETUNREACH)
        );
        assert_eq!(
            outcome(&add, &[k(Errno::EINVAL)]),
            Outcome::Failed(ApplyError::Kernel(Errno::EINVAL))
        );
        let swap = [
            Op::DelRule {
                key: key(),
                protocol: Some(3),
            },
            Op::AddRule {
                key: key(),
                protocol: None,
            },
        ];
        assert_eq!(
            outcome(&swap, &[k(Errno::ENOENT), Ok(())]),
            Outcome::Applied
        );
        assert_eq!(
            outcome(&swap, &[k(Errno::EPERM), Ok(())]),
            Outcome::Failed(ApplyError::Kernel(Errno::EPERM))
        );
    }

    #[test]
    fn one_route_per_nexthop_is_sent_first() {
        use crate::model::ObjectId;
        use crate::model::{DesiredRoute, Mode, RouteKey, RouteType};
        let step = |dst: &str, gw: Option<&str>, oif: u32| {
            let route = DesiredRoute {
                name: dst.into(),
                mode: Mode::Enforce,
                key: RouteKey::new(Family::Ipv4, 100, dst.parse().unwrap(), None),
                kind: RouteType::Unicast,
                gateway: gw.map(|g| g.parse().unwrap()),
                device: Some("veth0".into()),
                prefsrc: None,
                scope: None,
                protocol: None,
                onlink: false,
                mtu: None,
            };
            Step {
                id: ObjectId::Route(route.key.clone()),
                name: dst.into(),
                ops: vec![Op::PutRoute {
                    route,
                    oif: Some(oif),
                }],
            }
        };
        let steps = [
            step("10.64.0.1/32", None, 3),
            step("10.65.0.1/32", Some("10.200.0.254"), 3),
            step("10.65.0.2/32", Some("10.200.0.254"), 3),
            step("10.65.0.3/32", Some("10.200.0.1"), 3),
            step("10.65.0.4/32", Some("10.200.0.254"), 4),
            step("10.65.0.5/32", Some("10.200.0.254"), 3),
        ];
        assert_eq!(
            nexthop_probes(&steps),
            [None, None, Some(1), None, None, Some(1)],
            "another gateway or device is another nexthop"
        );
    }

    #[test]
    fn the_barrier_deletes_nothing_there_is() {
        let msg = encode::no_such_route();
        let (key, route) = crate::observe::decode::route(&msg).unwrap();
        assert_eq!(key.destination, "0.0.0.0/32".parse().unwrap());
        assert_eq!(key.table, crate::model::TABLE_MAIN);
        assert_eq!(route.protocol, 255);
    }

    #[test]
    fn only_rule_adds_go_unchecked_and_only_when_asked() {
        use rtnetlink::packet_core::NLM_F_CREATE;
        let add = Op::AddRule {
            key: key(),
            protocol: None,
        };
        let del = Op::DelRule {
            key: key(),
            protocol: None,
        };
        let excl = |op: &Op, rules| request(op, rules).unwrap().header.flags & NLM_F_EXCL != 0;
        assert!(excl(&add, RuleAdd::Exclusive));
        assert!(!excl(&add, RuleAdd::Unchecked));
        assert_ne!(
            request(&add, RuleAdd::Unchecked).unwrap().header.flags & NLM_F_CREATE,
            0
        );
        assert!(!excl(&del, RuleAdd::Unchecked));
        // Addresses keep the kernel's check whatever the rules do.
        let addr = Op::AddAddress {
            ifindex: 2,
            address: "10.0.0.1".parse().unwrap(),
            attrs: crate::model::ObservedAddress::with_prefix(24),
        };
        assert!(excl(&addr, RuleAdd::Unchecked));
    }

    #[test]
    fn fdb_entries_replace_a_unicast_remote_and_append_to_a_list() {
        use crate::model::{DesiredFdb, Mode};
        let fdb = |mac: &str| Op::PutFdb {
            fdb: DesiredFdb {
                name: "f".into(),
                mode: Mode::Enforce,
                device: "vx0".into(),
                lladdr: mac.parse().unwrap(),
                dst: "192.168.1.12".parse().unwrap(),
                vni: None,
            },
            ifindex: 4,
        };
        let flags = |op: &Op| request(op, RuleAdd::Exclusive).unwrap().header.flags;
        let unicast = flags(&fdb("0a:58:0a:f4:02:00"));
        assert!(unicast & NLM_F_REPLACE != 0 && unicast & NLM_F_APPEND == 0);
        let flood = flags(&fdb("00:00:00:00:00:00"));
        assert!(flood & NLM_F_APPEND != 0 && flood & NLM_F_REPLACE == 0);
        // A setting is a file, not a request.
        let key = crate::model::SysctlKey {
            scope: crate::model::sysctl::Scope::All,
            setting: crate::model::sysctl::Setting::find(crate::model::Family::Ipv4, "forwarding")
                .unwrap(),
        };
        assert!(request(&Op::SetSysctl { key, value: 1 }, RuleAdd::Exclusive).is_none());
    }
}
