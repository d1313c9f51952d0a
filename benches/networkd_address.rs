//! `cargo bench --bench networkd_address`: how systemd-networkd puts its own address back, and
//! when a second writer putting it back first breaks networkd.
//!
//! networkd 252 removes its static IPv4 address and adds it again whenever it (re)configures the
//! link: its own config compares unequal to what the kernel holds (the broadcast address it
//! computes only when it adds). If another process adds the address back in between, networkd
//! can loop on the address and mark the link `failed`. This bench measures, with the
//! distribution's own networkd in the rig of tests/rig/networkd.rs (throw-away namespace, private
//! mount namespace), no agent involved:
//!
//! 1. **networkd's own gap**: its RTM_DELADDR → its RTM_NEWADDR, for a restart (stop + start),
//!    `networkctl reconfigure` and `networkctl reload` after the .network file changed;
//! 2. **the unsafe window**: a restart, and a second writer adding the address back D ms after
//!    networkd's RTM_DELADDR, either as the agent used to (`plain`: address and prefix length)
//!    or exactly as it was (`exact`: broadcast, label, flags, protocol, from the deletion's
//!    notification). Per trial: the link's state once networkd is done (`configured`/`failed`)
//!    and how many times networkd logged `Configuring static address`.
//!
//! Environment: NETWARDEN_BENCH_ROUNDS (10 per operation), NETWARDEN_BENCH_DELAYS_MS
//! (0,1,2,3,5,7,10,15,20,30,50), NETWARDEN_BENCH_TRIALS (2 per delay and style).

#[allow(dead_code)]
#[path = "../tests/rig/networkd.rs"]
mod networkd;
#[allow(dead_code)]
#[path = "../tests/rig/outage.rs"]
mod outage;

use anyhow::{anyhow, bail, ensure, Context, Result};
use netwarden::testing::listen::{Listener, Seen};
use netwarden::testing::sandbox::Sandbox;
use networkd::Networkd;
use outage::{listener_in, ms};
use rtnetlink::packet_core::{
    Emitable, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST,
};
use rtnetlink::packet_route::address::{AddressAttribute, AddressMessage};
use rtnetlink::packet_route::RouteNetlinkMessage as M;
use rtnetlink::sys::{protocols::NETLINK_ROUTE, Socket};
use std::net::IpAddr;
use std::time::{Duration, Instant};

const ADDRESS: &str = "10.200.0.1";
const NETWORK: &str = "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.1/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";
const SETTLE: Duration = Duration::from_secs(60);

fn env_num(name: &str, default: u64) -> Result<u64> {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .with_context(|| format!("{name}={v} is not a number")),
        Err(_) => Ok(default),
    }
}

/// A netlink socket in the namespace, for adding the address back.
struct Writer {
    sock: Socket,
    seq: u32,
}

impl Writer {
    fn open(netns: &str) -> Result<Writer> {
        let netns = netns.to_string();
        std::thread::spawn(move || -> Result<Writer> {
            netwarden::netns::enter(&netns)?;
            let mut sock = Socket::new(NETLINK_ROUTE)?;
            sock.bind_auto()?;
            Ok(Writer { sock, seq: 0 })
        })
        .join()
        .map_err(|_| anyhow!("the writer thread panicked"))?
    }

    /// Sends RTM_NEWADDR (create, exclusive) and returns the kernel's answer (0 or -errno).
    fn add(&mut self, msg: AddressMessage) -> Result<i32> {
        self.seq += 1;
        let mut req = NetlinkMessage::from(M::NewAddress(msg));
        req.header.flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
        req.header.sequence_number = self.seq;
        req.finalize();
        let mut buf = vec![0u8; req.buffer_len()];
        req.emit(&mut buf);
        self.sock.send(&buf, 0)?;
        let mut rx = Vec::with_capacity(8192);
        loop {
            rx.clear();
            self.sock.recv(&mut rx, 0)?;
            let mut code = None;
            let _ = netwarden::observe::decode::each_message(&rx, |m| {
                if let NetlinkPayload::Error(e) = m.payload {
                    if m.header.sequence_number == self.seq {
                        code = Some(e.code.map_or(0, |c| c.get()));
                    }
                }
                std::ops::ControlFlow::Continue(())
            });
            if let Some(c) = code {
                return Ok(c);
            }
        }
    }
}

/// The address message as the agent used to send it: the address and its prefix length only.
fn plain(removed: &AddressMessage) -> AddressMessage {
    let ip: IpAddr = ADDRESS.parse().unwrap();
    netwarden::apply::encode::address(removed.header.index, ip, removed.header.prefix_len)
}

/// The address message exactly as the kernel described the removed address (what it carried
/// that can be set: broadcast, label, flags, protocol, prefix route metric; lifetimes forever).
fn exact(removed: &AddressMessage) -> AddressMessage {
    let mut msg = AddressMessage::default();
    msg.header = removed.header.clone();
    msg.attributes = removed
        .attributes
        .iter()
        .filter(|a| {
            matches!(
                a,
                AddressAttribute::Local(_)
                    | AddressAttribute::Address(_)
                    | AddressAttribute::Broadcast(_)
                    | AddressAttribute::Label(_)
                    | AddressAttribute::Flags(_)
                    | AddressAttribute::Protocol(_)
                    | AddressAttribute::RoutePriority(_)
            )
        })
        .cloned()
        .collect();
    msg
}

/// networkd's RTM_DELADDR and RTM_NEWADDR of our address, as the listener saw them.
fn is_ours(m: &AddressMessage) -> bool {
    netwarden::observe::decode::address(m)
        .is_some_and(|(k, _)| k.address == ADDRESS.parse::<IpAddr>().unwrap())
}

fn wait_del(listener: &Listener, within: Duration) -> Option<(Instant, AddressMessage)> {
    let mut found = None;
    listener.wait_for(Instant::now() + within, |(at, m)| match m {
        Some(M::DelAddress(a)) if is_ours(a) => {
            found = Some((*at, a.clone()));
            true
        }
        _ => false,
    });
    found
}

fn wait_new(listener: &Listener, within: Duration) -> Option<Instant> {
    listener
        .wait_for(
            Instant::now() + within,
            |(_, m): &Seen| matches!(m, Some(M::NewAddress(a)) if is_ours(a)),
        )
        .map(|(at, _)| at)
}

fn pct(v: &[Duration], q: f64) -> Duration {
    let mut s = v.to_vec();
    s.sort();
    s[((s.len() - 1) as f64 * q).round() as usize]
}

/// networkd running again with a clean address (as networkd itself adds it), link configured.
fn reset(ns: &Sandbox, nd: &mut Networkd) -> Result<()> {
    nd.stop()?;
    let _ = ns.ip(&["address", "flush", "dev", "veth0"]);
    nd.clear_log();
    nd.start()?;
    nd.wait_configured("veth0")
}

fn gaps(ns: &Sandbox, nd: &mut Networkd, rounds: usize) -> Result<()> {
    println!("\n1. networkd's own gap (its RTM_DELADDR -> its RTM_NEWADDR), {rounds} rounds each:");
    for op in ["restart", "reconfigure", "reload"] {
        let mut v = Vec::new();
        for i in 0..rounds {
            let listener = listener_in(&ns.name)?;
            match op {
                "restart" => nd.restart()?,
                "reconfigure" => {
                    nd.networkctl(&["reconfigure", "veth0"])?;
                }
                _ => {
                    // A changed .network file (a comment line more each time): reloaded, the
                    // link is reconfigured with it.
                    nd.write_file("10-veth0.network", &format!("{NETWORK}# {i}\n"))?;
                    nd.networkctl(&["reload"])?;
                }
            }
            let (del, _) = wait_del(&listener, Duration::from_secs(10))
                .with_context(|| format!("{op}: networkd did not remove its address"))?;
            let new = wait_new(&listener, Duration::from_secs(10))
                .with_context(|| format!("{op}: networkd did not add its address back"))?;
            nd.wait_configured("veth0")?;
            v.push(new.saturating_duration_since(del));
        }
        println!(
            "  {op:<12} p50 {:>7.3} ms  p90 {:>7.3} ms  min {:>7.3} ms  max {:>7.3} ms",
            ms(pct(&v, 0.5)),
            ms(pct(&v, 0.9)),
            ms(pct(&v, 0.0)),
            ms(pct(&v, 1.0))
        );
    }
    Ok(())
}

struct Trial {
    state: String,
    configuring: usize,
    answer: i32,
    late: bool,
    networkd_gap: Option<Duration>,
}

fn trial(
    ns: &Sandbox,
    nd: &mut Networkd,
    writer: &mut Writer,
    delay: Duration,
    exact_copy: bool,
) -> Result<Trial> {
    reset(ns, nd)?;
    let before = nd.log_lines("Configuring static address").len();
    let listener = listener_in(&ns.name)?;
    nd.restart()?;
    let (del_at, removed) =
        wait_del(&listener, Duration::from_secs(10)).context("networkd did not remove it")?;
    let target = del_at + delay;
    if let Some(left) = target.checked_duration_since(Instant::now()) {
        std::thread::sleep(left);
    }
    let sent = Instant::now();
    let msg = if exact_copy {
        exact(&removed)
    } else {
        plain(&removed)
    };
    let answer = writer.add(msg)?;
    // Whose add came first: ours is answered 0, networkd's first makes ours EEXIST.
    let late = answer != 0;
    let state = nd.wait_settled("veth0", SETTLE);
    let configuring = nd.log_lines("Configuring static address").len() - before;
    let networkd_gap = (sent > del_at).then(|| sent - del_at);
    Ok(Trial {
        state,
        configuring,
        answer,
        late,
        networkd_gap,
    })
}

fn window(ns: &Sandbox, nd: &mut Networkd, delays: &[u64], trials: usize) -> Result<()> {
    println!(
        "\n2. a second writer adds the address D ms after networkd removed it (restart), {trials} trials each:"
    );
    println!("  D (ms)  style   link state after (per trial)        `Configuring static address` lines   our add");
    let mut writer = Writer::open(&ns.name)?;
    for &d in delays {
        for exact_copy in [false, true] {
            let mut states = Vec::new();
            let mut lines = Vec::new();
            let mut answers = Vec::new();
            for _ in 0..trials {
                let t = trial(ns, nd, &mut writer, Duration::from_millis(d), exact_copy)?;
                states.push(t.state);
                lines.push(t.configuring);
                answers.push(if t.late {
                    format!("errno {}", -t.answer)
                } else {
                    "added".to_string()
                });
                let _ = t.networkd_gap;
            }
            println!(
                "  {d:>6}  {:<6}  {:<36} {:<36} {}",
                if exact_copy { "exact" } else { "plain" },
                states.join(","),
                lines
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                answers.join(",")
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let rounds = env_num("NETWARDEN_BENCH_ROUNDS", 10)? as usize;
    let trials = env_num("NETWARDEN_BENCH_TRIALS", 2)? as usize;
    let delays: Vec<u64> = std::env::var("NETWARDEN_BENCH_DELAYS_MS")
        .unwrap_or_else(|_| "0,1,2,3,5,7,10,15,20,30,50".into())
        .split(',')
        .map(|s| s.trim().parse().context("NETWARDEN_BENCH_DELAYS_MS"))
        .collect::<Result<_>>()?;
    ensure!(
        rounds > 0 && trials > 0,
        "rounds and trials must be at least 1"
    );
    println!(
        "netwarden networkd-address benchmark ({})",
        networkd::BINARY
    );
    let ns = Sandbox::create("nwbench-ndaddr")?;
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])?;
    ns.ip(&["link", "set", "veth1", "up"])?;
    ns.ip(&["link", "set", "veth0", "up"])?;
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", NETWORK)])?;
    nd.start_dbus()?;
    nd.start()?;
    nd.wait_configured("veth0")?;
    if std::env::var_os("NETWARDEN_BENCH_SKIP_GAPS").is_none() {
        gaps(&ns, &mut nd, rounds)?;
    }
    window(&ns, &mut nd, &delays, trials)?;
    if nd.pid().is_none() {
        bail!("networkd is not running at the end");
    }
    Ok(())
}
