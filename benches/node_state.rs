//! `cargo bench --bench node_state`: how fast the real agent puts back a deleted neighbour entry
//! and a flipped `forwarding` setting, beside the same change made by `ip` and by `sysctl` (and
//! by a process already running: the kernel's own floor), all timed by an independent netlink
//! listener (neighbour and IPv4 netconf notifications).
//!
//! Everything happens in a throw-away namespace (removed on drop, also on panic): a VXLAN device
//! `flannel.1` with 200 protected permanent neighbour entries, and 100 veth pairs whose IPv4
//! `forwarding` is protected through a device pattern. Each object is changed once per run (a
//! second change within 2 s of its repair would start a fight, and fights back off). The
//! sysctls written are `net.*` ones, from a thread inside the namespace.
//!
//! Rounds: NETWARDEN_BENCH_ROUNDS (default 200, at most 200 neighbour entries and 200 devices).
//! Results: docs/benchmarks.md.

#[path = "../tests/common/deployed.rs"]
mod deployed;

use anyhow::{bail, Context, Result};
use deployed::Privileges;
use netwarden::testing::sandbox::Sandbox;
use rtnetlink::packet_core::{Emitable, NetlinkHeader, NetlinkMessage, NetlinkPayload};
use rtnetlink::packet_core::{NLM_F_ACK, NLM_F_CREATE, NLM_F_REPLACE, NLM_F_REQUEST};
use rtnetlink::packet_route::neighbour::{NeighbourAttribute, NeighbourMessage, NeighbourState};
use rtnetlink::packet_route::{AddressFamily, RouteNetlinkMessage};
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};
use std::fmt::Write as _;
use std::io::{BufRead, BufReader};
use std::net::Ipv4Addr;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_netwarden");
const NEIGHBOURS: usize = 200;
const PAIRS: usize = 100;
const WAIT: Duration = Duration::from_secs(5);

fn vtep(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 244, i as u8, 0)
}

fn mac(i: usize) -> [u8; 6] {
    [0x0a, 0x58, 0x0a, 0xf4, (i >> 8) as u8, i as u8]
}

fn mac_text(i: usize) -> String {
    let m = mac(i);
    format!(
        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
        m[0], m[1], m[2], m[3], m[4], m[5]
    )
}

/// The devices whose forwarding is flipped: both ends of every pair.
fn device(i: usize) -> String {
    format!("bn{}{}", i / 2, if i.is_multiple_of(2) { 'a' } else { 'b' })
}

fn setup(sb: &Sandbox) -> Result<()> {
    let mut lines = String::from(
        "link add veth0 type veth peer name veth1\nlink set veth0 up\nlink set veth1 up\n\
         address add 10.200.0.1/24 dev veth0\n\
         link add flannel.1 type vxlan id 1 dev veth0 dstport 8472 nolearning\nlink set flannel.1 up\n",
    );
    for p in 0..PAIRS {
        let _ = writeln!(lines, "link add bn{p}a type veth peer name bn{p}b");
    }
    sb.batch(&[], &lines)?;
    Ok(())
}

fn config() -> String {
    let mut y = String::from(
        "apiVersion: netwarden.io/v1alpha1\nkind: ProtectedState\nspec:\n  resync: 1h\n  pollInterval: 1h\n  neighbours:\n",
    );
    for i in 0..NEIGHBOURS {
        let _ = writeln!(
            y,
            "    - {{name: vtep-{i}, device: flannel.1, address: {}, lladdr: \"{}\"}}",
            vtep(i),
            mac_text(i)
        );
    }
    y.push_str("  sysctls:\n    - name: bench-forwarding\n      key: net.ipv4.conf.bn*.forwarding\n      value: 1\n");
    y
}

// ---------------------------------------------------------------------------------------------
// The listener: neighbour and IPv4 netconf notifications, timestamped on arrival.

#[derive(Debug)]
enum Seen {
    /// A neighbour entry (by address) is gone or failed, or is there (permanent).
    Neighbour { address: Ipv4Addr, present: bool },
    /// A device's forwarding changed.
    Forwarding { ifindex: i32, value: i32 },
}

fn listener(netns: String) -> Result<Receiver<(Instant, Seen)>> {
    let (tx, rx) = channel();
    let (ready_tx, ready) = channel();
    std::thread::spawn(move || -> Result<()> {
        netwarden::netns::enter(&netns)?;
        let mut sock = Socket::new(NETLINK_ROUTE)?;
        // RTNLGRP_NEIGH (3) and RTNLGRP_IPV4_NETCONF (24).
        sock.bind(&SocketAddr::new(0, (1 << 2) | (1 << 23)))?;
        let _ = ready_tx.send(());
        let mut buf = Vec::with_capacity(1 << 16);
        loop {
            buf.clear();
            sock.recv(&mut buf, 0)?;
            let now = Instant::now();
            let mut at = 0;
            while at + 16 <= buf.len() {
                let len = u32::from_ne_bytes(buf[at..at + 4].try_into()?) as usize;
                let ty = u16::from_ne_bytes(buf[at + 4..at + 6].try_into()?);
                if len < 16 || at + len > buf.len() {
                    break;
                }
                if let Some(seen) = parse(ty, &buf[at + 16..at + len]) {
                    if tx.send((now, seen)).is_err() {
                        return Ok(());
                    }
                }
                at += (len + 3) & !3;
            }
        }
    });
    ready
        .recv_timeout(WAIT)
        .context("the listener did not start")?;
    Ok(rx)
}

/// Attributes of a netlink message body after a header of `skip` bytes.
fn attributes(body: &[u8], skip: usize) -> Vec<(u16, &[u8])> {
    let mut out = Vec::new();
    let mut at = skip;
    while at + 4 <= body.len() {
        let len = usize::from(u16::from_ne_bytes([body[at], body[at + 1]]));
        let kind = u16::from_ne_bytes([body[at + 2], body[at + 3]]);
        if len < 4 || at + len > body.len() {
            break;
        }
        out.push((kind, &body[at + 4..at + len]));
        at += (len + 3) & !3;
    }
    out
}

fn parse(ty: u16, body: &[u8]) -> Option<Seen> {
    match ty {
        // RTM_NEWNEIGH, RTM_DELNEIGH (IPv4 only).
        28 | 29 if body.len() >= 12 && body[0] == 2 => {
            let state = u16::from_ne_bytes([body[8], body[9]]);
            let dst = attributes(body, 12)
                .into_iter()
                .find(|(k, _)| *k == 1)
                .and_then(|(_, v)| <[u8; 4]>::try_from(v).ok())?;
            Some(Seen::Neighbour {
                address: Ipv4Addr::from(dst),
                present: ty == 28 && state == 0x80,
            })
        }
        // RTM_NEWNETCONF: NETCONFA_IFINDEX 1, NETCONFA_FORWARDING 2.
        80 => {
            let attrs = attributes(body, 4);
            let get = |k: u16| {
                attrs
                    .iter()
                    .find(|(x, _)| *x == k)
                    .and_then(|(_, v)| Some(i32::from_ne_bytes((*v).try_into().ok()?)))
            };
            Some(Seen::Forwarding {
                ifindex: get(1)?,
                value: get(2)?,
            })
        }
        _ => None,
    }
}

/// Waits (bounded) for a notification `want` says yes to; its arrival time.
fn wait_for(
    rx: &Receiver<(Instant, Seen)>,
    mut want: impl FnMut(&Seen) -> bool,
) -> Result<Instant> {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (at, seen) = rx
            .recv_timeout(left)
            .context("no such notification within 5 s")?;
        if want(&seen) {
            return Ok(at);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The actor: a thread inside the namespace that makes the changes.

enum Do {
    DeleteNeighbour(usize),
    /// The re-add from a process already running (one netlink request).
    AddNeighbourNetlink(usize),
    /// The re-add by `ip neigh replace`.
    AddNeighbourIp(usize),
    /// A write to /proc/sys/net/ipv4/conf/DEV/forwarding.
    WriteForwarding(usize, u8),
    /// `sysctl -w net.ipv4.conf.DEV.forwarding=V`.
    SysctlForwarding(usize, u8),
}

struct Actor {
    tx: Sender<(Do, Sender<Result<()>>)>,
}

impl Actor {
    fn start(netns: String, flannel: u32) -> Result<Actor> {
        let (tx, rx) = channel::<(Do, Sender<Result<()>>)>();
        std::thread::spawn(move || {
            if let Err(e) = netwarden::netns::enter(&netns) {
                eprintln!("actor: {e}");
                return;
            }
            let mut sock = match Socket::new(NETLINK_ROUTE) {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("actor: {e}");
                    return;
                }
            };
            let _ = sock.bind_auto();
            let _ = sock.connect(&SocketAddr::new(0, 0));
            for (what, done) in rx {
                let _ = done.send(act(&mut sock, flannel, what));
            }
        });
        Ok(Actor { tx })
    }

    fn run(&self, what: Do) -> Result<()> {
        let (tx, rx) = channel();
        self.tx.send((what, tx)).context("the actor is gone")?;
        rx.recv_timeout(WAIT).context("the actor did not answer")?
    }
}

fn neighbour_request(flannel: u32, i: usize, add: bool) -> Vec<u8> {
    let mut m = NeighbourMessage::default();
    m.header.family = AddressFamily::Inet;
    m.header.ifindex = flannel;
    m.header.state = NeighbourState::Permanent;
    m.attributes
        .push(NeighbourAttribute::Destination(vtep(i).into()));
    let payload = if add {
        m.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac(i).to_vec()));
        RouteNetlinkMessage::NewNeighbour(m)
    } else {
        RouteNetlinkMessage::DelNeighbour(m)
    };
    let mut header = NetlinkHeader::default();
    header.flags = NLM_F_REQUEST | NLM_F_ACK;
    if add {
        header.flags |= NLM_F_CREATE | NLM_F_REPLACE;
    }
    let mut msg = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(payload));
    msg.finalize();
    let mut buf = vec![0u8; msg.buffer_len()];
    msg.emit(&mut buf);
    buf
}

fn act(sock: &mut Socket, flannel: u32, what: Do) -> Result<()> {
    match what {
        Do::DeleteNeighbour(i) | Do::AddNeighbourNetlink(i) => {
            let add = matches!(what, Do::AddNeighbourNetlink(_));
            sock.send(&neighbour_request(flannel, i, add), 0)?;
            let mut ack = Vec::with_capacity(4096);
            sock.recv(&mut ack, 0)?;
            // The ack's error code (0: done).
            let code = i32::from_ne_bytes(ack.get(16..20).context("short ack")?.try_into()?);
            if code != 0 {
                bail!("neighbour request refused: errno {}", -code);
            }
            Ok(())
        }
        Do::AddNeighbourIp(i) => {
            let out = Command::new("ip")
                .args([
                    "neigh",
                    "replace",
                    &vtep(i).to_string(),
                    "lladdr",
                    &mac_text(i),
                ])
                .args(["dev", "flannel.1", "nud", "permanent"])
                .output()?;
            if !out.status.success() {
                bail!("ip: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        }
        Do::WriteForwarding(d, v) => {
            let path = format!("/proc/sys/net/ipv4/conf/{}/forwarding", device(d));
            std::fs::write(&path, format!("{v}\n")).with_context(|| path.clone())
        }
        Do::SysctlForwarding(d, v) => {
            let key = format!("net.ipv4.conf.{}.forwarding={v}", device(d));
            let out = Command::new("sysctl").args(["-qw", &key]).output()?;
            if !out.status.success() {
                bail!("sysctl: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The measurements

/// From the deletion seen to the entry seen back; `repair`: what puts it back (`None`: the
/// agent, on its own).
fn neighbour_round(
    rx: &Receiver<(Instant, Seen)>,
    actor: &Actor,
    i: usize,
    repair: Option<Do>,
) -> Result<Duration> {
    let a = vtep(i);
    actor.run(Do::DeleteNeighbour(i))?;
    let gone = wait_for(
        rx,
        |s| matches!(s, Seen::Neighbour { address, present: false } if *address == a),
    )?;
    if let Some(r) = repair {
        actor.run(r)?;
    }
    let back = wait_for(
        rx,
        |s| matches!(s, Seen::Neighbour { address, present: true } if *address == a),
    )?;
    Ok(back - gone)
}

/// From forwarding seen off to seen on again.
fn forwarding_round(
    rx: &Receiver<(Instant, Seen)>,
    actor: &Actor,
    ifindex: &[i32],
    d: usize,
    repair: Option<Do>,
) -> Result<Duration> {
    let want = ifindex[d];
    actor.run(Do::WriteForwarding(d, 0))?;
    let off = wait_for(
        rx,
        |s| matches!(s, Seen::Forwarding { ifindex, value: 0 } if *ifindex == want),
    )?;
    if let Some(r) = repair {
        actor.run(r)?;
    }
    let on = wait_for(
        rx,
        |s| matches!(s, Seen::Forwarding { ifindex, value: 1 } if *ifindex == want),
    )?;
    Ok(on - off)
}

fn ifindex(sb: &Sandbox, dev: &str) -> Result<i32> {
    let out = Command::new("ip")
        .args(["netns", "exec", &sb.name, "cat"])
        .arg(format!("/sys/class/net/{dev}/ifindex"))
        .output()?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("ifindex of {dev}"))
}

struct AgentProcess(Child);

impl AgentProcess {
    fn start(config: &std::path::Path, netns: &str) -> Result<AgentProcess> {
        let mut child = Privileges::of_daemonset()
            .command_in(std::path::Path::new(BIN), netns)
            .args(["run", "--config"])
            .arg(config)
            .args(["--metrics-addr", "off"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = child.stderr.take().context("stderr")?;
        let (tx, ready) = channel();
        // Drains the agent's log for its whole life.
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("initial sync done") {
                    let _ = tx.send(());
                }
            }
        });
        ready
            .recv_timeout(Duration::from_secs(30))
            .context("the agent did not finish its initial sync")?;
        Ok(AgentProcess(child))
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.0.kill(); // this pid only
        let _ = self.0.wait();
    }
}

fn pct(sorted: &[Duration], q: f64) -> Duration {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn row(what: &str, samples: &mut [Duration]) -> String {
    samples.sort_unstable();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    format!(
        "| {what} | {} | {:.3} | {:.3} | {:.3} |",
        samples.len(),
        ms(pct(samples, 0.5)),
        ms(pct(samples, 0.9)),
        ms(pct(samples, 0.99))
    )
}

fn main() -> Result<()> {
    let rounds: usize = std::env::var("NETWARDEN_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
        .clamp(1, NEIGHBOURS.min(2 * PAIRS));
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    println!(
        "node_state bench: {rounds} rounds each; Linux {}; load average at start {}",
        kernel.trim(),
        load.split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    );
    let sb = Sandbox::create("nw-bench-node")?;
    setup(&sb)?;
    let flannel = ifindex(&sb, "flannel.1")? as u32;
    let ifindexes: Vec<i32> = (0..rounds)
        .map(|d| ifindex(&sb, &device(d)))
        .collect::<Result<_>>()?;
    let rx = listener(sb.name.clone())?;
    let actor = Actor::start(sb.name.clone(), flannel)?;
    // Every entry in place and forwarding on, as the agent will keep them.
    for i in 0..NEIGHBOURS {
        actor.run(Do::AddNeighbourNetlink(i))?;
    }
    for d in 0..rounds {
        actor.run(Do::WriteForwarding(d, 1))?;
    }
    std::thread::sleep(Duration::from_millis(100));
    while rx.try_recv().is_ok() {}

    // The floors, without the agent: the same change made by the tools, and by a process
    // already running (one request, one write).
    let mut ip: Vec<Duration> = (0..rounds)
        .map(|i| neighbour_round(&rx, &actor, i, Some(Do::AddNeighbourIp(i))))
        .collect::<Result<_>>()?;
    let mut kernel_neigh: Vec<Duration> = (0..rounds)
        .map(|i| neighbour_round(&rx, &actor, i, Some(Do::AddNeighbourNetlink(i))))
        .collect::<Result<_>>()?;
    let mut sysctl: Vec<Duration> = (0..rounds)
        .map(|d| forwarding_round(&rx, &actor, &ifindexes, d, Some(Do::SysctlForwarding(d, 1))))
        .collect::<Result<_>>()?;
    let mut kernel_fwd: Vec<Duration> = (0..rounds)
        .map(|d| forwarding_round(&rx, &actor, &ifindexes, d, Some(Do::WriteForwarding(d, 1))))
        .collect::<Result<_>>()?;

    // The agent.
    let dir = std::env::temp_dir().join(format!("nw-bench-node-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let path = dir.join("config.yaml");
    std::fs::write(&path, config())?;
    let agent = AgentProcess::start(&path, &sb.name);
    let _ = std::fs::remove_dir_all(&dir);
    let agent = agent?;
    std::thread::sleep(Duration::from_millis(200));
    while rx.try_recv().is_ok() {}
    let mut neigh_agent: Vec<Duration> = (0..rounds)
        .map(|i| neighbour_round(&rx, &actor, i, None))
        .collect::<Result<_>>()?;
    let mut fwd_agent: Vec<Duration> = (0..rounds)
        .map(|d| forwarding_round(&rx, &actor, &ifindexes, d, None))
        .collect::<Result<_>>()?;
    drop(agent);

    println!("\n| change → back, as the listener sees it | n | p50 ms | p90 ms | p99 ms |");
    println!("|---|---|---|---|---|");
    println!(
        "{}",
        row("neighbour deleted → netwarden re-adds it", &mut neigh_agent)
    );
    println!(
        "{}",
        row(
            "neighbour deleted → `ip neigh replace` (floor: spawning ip)",
            &mut ip
        )
    );
    println!(
        "{}",
        row(
            "neighbour deleted → one netlink request from a running process (kernel floor)",
            &mut kernel_neigh
        )
    );
    println!(
        "{}",
        row("forwarding 1→0 → netwarden writes 1", &mut fwd_agent)
    );
    println!(
        "{}",
        row(
            "forwarding 1→0 → `sysctl -w` (floor: spawning sysctl)",
            &mut sysctl
        )
    );
    println!(
        "{}",
        row(
            "forwarding 1→0 → one write from a running process (kernel floor)",
            &mut kernel_fwd
        )
    );
    Ok(())
}
