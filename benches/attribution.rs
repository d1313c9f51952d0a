//! `cargo bench --bench attribution`: how often the agent names the process that removed a
//! protected rule, by the agent's privileges and the offender's shape.
//!
//! The agent runs in the DaemonSet's shape (tests/common/deployed.rs: the capabilities,
//! runAsUser and no_new_privs of deploy/base/daemonset.yaml, in the host's PID namespace), and,
//! for comparison, with that set minus or plus a capability and as full root. Each offender
//! (tests/common/offender.rs) deletes the rule with the real `ip`, under a name of its own:
//!
//! - who: root with every capability (more than the agent has), systemd-networkd's user with
//!   an ambient NET_ADMIN, or root in a PID namespace of its own (a CNI daemon's container
//!   without hostPID: its port ids are pids of its namespace);
//! - through its first netlink socket (port id = pid) or a later one (port id ≠ pid);
//! - long-lived (`ip -batch -` holding its socket until the agent has answered) or short-lived
//!   (`ip rule del`, gone a fraction of a millisecond after the change).
//!
//! Each deletion is repaired and its `restored … actor=` line read: the actor is the offender's
//! name (named), `unknown`, or another name (wrong). Reported, not asserted. Environment:
//! NETWARDEN_BENCH_TRIALS (20 per cell); NETWARDEN_AGENT_BIN measures another build of the agent
//! (the "before" figures of docs/benchmarks.md). Results: docs/benchmarks.md.

#[path = "../tests/common/mod.rs"]
mod common;

use common::offender::{named_ip, once, Offender, Socket, Who};
use common::{config, sandbox, Agent, Privileges, Sandbox, Shape};
use std::fmt::Write as _;

/// Protected rules the deletions rotate over. One object removed again within 2 s of each of its
/// last three repairs is contested (src/telemetry/contest.rs): its repair is then held back and logged
/// without the actor, which would be counted here as `unknown`. With this many rules each one is
/// deleted again only after 200 other deletions, each of which waits for its repair.
const RULES: u32 = 200;

/// `spec` with the [`RULES`] rules: `r{i}`, priority 1000 + i, from 10.245.i.0/24.
fn spec() -> String {
    let mut s = String::from("  rules:\n");
    for i in 0..RULES {
        write!(
            s,
            "    - name: r{i}\n      priority: {}\n      from: 10.245.{i}.0/24\n      table: 77\n",
            1000 + i
        )
        .unwrap();
    }
    s
}

#[derive(Default)]
struct Tally {
    named: u32,
    unknown: u32,
    wrong: Vec<String>,
}

fn actor_of(line: &str) -> String {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("actor="))
        .unwrap_or("?")
        .trim_matches('"')
        .to_string()
}

/// One cell: `trials` deletions by one offender shape; `next` is the rule to delete next (see
/// [`RULES`]).
#[allow(clippy::too_many_arguments)]
fn cell(
    agent: &mut Agent,
    ns: &Sandbox,
    program: &std::path::Path,
    who: Who,
    socket: Socket,
    long: bool,
    trials: u32,
    next: &mut u32,
) -> Tally {
    let name = program.file_name().unwrap().to_str().unwrap().to_string();
    let mut t = Tally::default();
    for _ in 0..trials {
        let i = *next;
        *next = (*next + 1) % RULES;
        let priority = (1000 + i).to_string();
        let restored = format!("names=r{i} ");
        let line = if long {
            let del = format!("rule del priority {priority}");
            let _holder = Offender::batch(&ns.name, who, socket, program, &del);
            agent.wait_log_all(&["restored", &restored])
        } else {
            once(
                &ns.name,
                who,
                socket,
                program,
                &["rule", "del", "priority", &priority],
            );
            agent.wait_log_all(&["restored", &restored])
        };
        match actor_of(&line) {
            a if a == name => t.named += 1,
            a if a == "unknown" => t.unknown += 1,
            a => t.wrong.push(a),
        }
    }
    t
}

fn main() {
    let trials: u32 = std::env::var("NETWARDEN_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let base = Privileges::of_daemonset();
    // The DaemonSet's set, then without the capabilities attribution needs beyond NET_ADMIN
    // and NET_RAW, one and both.
    let mut shapes: Vec<(String, Shape)> = vec![(
        format!("DaemonSet ({})", base.capabilities.join(" + ")),
        Shape::Deployed(base.clone()),
    )];
    for less in [
        &["DAC_READ_SEARCH"][..],
        &["SYS_PTRACE"],
        &["SYS_PTRACE", "DAC_READ_SEARCH"],
    ] {
        if less
            .iter()
            .all(|c| base.capabilities.iter().any(|b| b == c))
        {
            shapes.push((
                format!("DaemonSet without {}", less.join(", ")),
                Shape::Deployed(base.clone().without(less)),
            ));
        }
    }
    shapes.push(("root (every capability)".into(), Shape::Root));
    let dir = tempfile::tempdir().unwrap();
    let program = named_ip(dir.path(), "nw-offender");
    let mut report = String::new();
    for (label, shape) in &shapes {
        let ns = sandbox();
        let cfg = config(dir.path(), &spec());
        let mut next = 0;
        let mut agent = Agent::start_shaped(shape, &ns, &cfg, &[], &[]);
        // Past the initial sync's own `restored` line: each trial waits for its own.
        agent.wait_log("initial sync done");
        writeln!(report, "\nagent: {label}; {trials} deletions per cell").unwrap();
        writeln!(
            report,
            "| offender | socket | lifetime | named | unknown | wrong |"
        )
        .unwrap();
        writeln!(report, "|---|---|---|---|---|---|").unwrap();
        for (who_label, who) in [
            ("root, all capabilities", Who::Root),
            (
                "systemd-network uid, ambient NET_ADMIN",
                Who::network_user(),
            ),
            ("root in its own PID namespace", Who::Contained),
        ] {
            for (socket_label, socket) in [("first", Socket::First), ("later", Socket::Later)] {
                if who == Who::Contained && socket == Socket::Later {
                    // Its `ip` is pid 1 of its namespace: a later socket gets port 1 too.
                    continue;
                }
                for (life, long) in [("long-lived", true), ("short-lived", false)] {
                    let t = cell(
                        &mut agent, &ns, &program, who, socket, long, trials, &mut next,
                    );
                    let mut wrong: Vec<String> = t.wrong.clone();
                    wrong.sort();
                    wrong.dedup();
                    writeln!(
                        report,
                        "| {who_label} | {socket_label} | {life} | {} | {} | {}{} |",
                        t.named,
                        t.unknown,
                        t.wrong.len(),
                        if wrong.is_empty() {
                            String::new()
                        } else {
                            format!(" ({})", wrong.join(", "))
                        }
                    )
                    .unwrap();
                }
            }
        }
        eprintln!("{report}");
    }
    println!("{report}");
}
