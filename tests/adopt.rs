//! Adopted state (`spec.adopt`) against the real kernel and the real agent: per-pod rules added
//! by a process named like the AWS VPC CNI's agent are adopted as they appear; a restart of the
//! distribution's systemd-networkd (tests/rig/networkd.rs) wipes them and they are all restored;
//! the owner deleting one is legitimate (it stays deleted); `ip` deleting one is drift (restored).
//! The agent runs as the DaemonSet runs it (tests/common/deployed.rs), and the AWS VPC CNI
//! overlay's own selector is tested against the CNI's processes in their real shapes.

mod common;
mod rig;

use common::*;
use rig::networkd::Networkd;
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Adds and deletes rules over its own NETLINK_ROUTE socket, under the process name given by
/// prctl(PR_SET_NAME), as the CNI's agent does. Commands on stdin, one a line:
/// `add|del to|from IPV4 PRIORITY TABLE`; answers `ok ERRNO` (0: done).
const OWNER: &str = r#"
import ctypes, socket, struct, sys
ctypes.CDLL(None).prctl(15, sys.argv[1].encode(), 0, 0, 0)
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
s.bind((0, 0))
def attr(t, data):
    l = 4 + len(data)
    return struct.pack("HH", l, t) + data + b"\0" * ((4 - l % 4) % 4)
seq = 0
print("ready", flush=True)
for line in sys.stdin:
    op, direction, ip, prio, table = line.split()
    to = direction == "to"
    # fib_rule_hdr: family, dst_len, src_len, tos, table, res1, res2, action (1: to table), flags
    body = struct.pack("BBBBBBBBI", 2, 32 if to else 0, 0 if to else 32, 0, 0, 0, 0, 1, 0)
    body += attr(6, struct.pack("I", int(prio))) + attr(15, struct.pack("I", int(table)))
    body += attr(1 if to else 2, socket.inet_aton(ip))
    kind, flags = (32, 0x605) if op == "add" else (33, 0x5)
    seq += 1
    s.send(struct.pack("IHHII", 16 + len(body), kind, flags, seq, 0) + body)
    print("ok", -struct.unpack("i", s.recv(65536)[16:20])[0], flush=True)
"#;

/// The owner program, running in the namespace; killed by pid on drop.
struct Owner {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Owner {
    fn start(ns: &Sandbox, name: &str) -> Owner {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.name, "python3", "-c", OWNER, name])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("run python3");
        let stdin = child.stdin.take().unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let mut owner = Owner {
            child,
            stdin,
            stdout,
        };
        assert_eq!(owner.line(), "ready");
        owner
    }

    /// One answer line, bounded: a hung program fails the test instead of hanging it.
    fn line(&mut self) -> String {
        let pid = self.child.id();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            s.spawn(|| {
                let mut l = String::new();
                let _ = self.stdout.read_line(&mut l);
                let _ = tx.send(l);
            });
            match rx.recv_timeout(WAIT) {
                Ok(l) => l.trim().to_string(),
                Err(_) => {
                    // Unblocks the reader thread.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid as i32),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                    panic!("owner program did not answer within {WAIT:?}");
                }
            }
        })
    }

    /// Runs one command; returns the errno (0: done).
    fn run(&mut self, cmd: &str) -> i32 {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let answer = self.line();
        answer
            .strip_prefix("ok ")
            .and_then(|e| e.parse().ok())
            .unwrap_or_else(|| panic!("unexpected answer `{answer}` to `{cmd}`"))
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Pods (address, ENI table) as the VPC CNI places them.
const PODS: [(&str, u32); 3] = [("10.1.1.20", 2), ("10.1.1.21", 2), ("10.1.2.20", 3)];

const SPEC: &str = "  adopt:
    - name: vpc-cni
      rules:
        family: ipv4
        priority: 512-1536
      owners: [aws-k8s-agent, aws-cni]
      unknownActor: restore
";

fn to_rule(pod: &str) -> String {
    format!("512: from all to {pod} lookup main")
}

fn from_rule(pod: &str, table: u32) -> String {
    format!("1536: from {pod} lookup {table}")
}

fn all_present(ns: &Sandbox) -> bool {
    let r = rules(ns);
    PODS.iter().all(|(pod, table)| {
        count(&r, &to_rule(pod)) == 1 && count(&r, &from_rule(pod, *table)) == 1
    })
}

fn adopted_count(agent: &Agent) -> usize {
    agent
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("adopted selector=vpc-cni"))
        .count()
}

/// The owner adds each pod's pair of rules, as the CNI does when a pod starts.
fn add_pods(owner: &mut Owner) {
    for (pod, table) in PODS {
        assert_eq!(owner.run(&format!("add to {pod} 512 254")), 0);
        assert_eq!(owner.run(&format!("add from {pod} 1536 {table}")), 0);
    }
}

/// A namespace with `veth0` <-> `veth1`, up, and networkd managing veth0.
fn node_with_networkd() -> (Sandbox, Networkd) {
    let ns = Sandbox::create("nw-adopt").expect("create namespace");
    ns.ip(&[
        "link", "add", "veth0", "type", "veth", "peer", "name", "veth1",
    ])
    .unwrap();
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    ns.ip(&["link", "set", "veth1", "up"]).unwrap();
    let file = "[Match]\nName=veth0\n\n[Network]\nAddress=10.200.0.1/24\nLinkLocalAddressing=no\nIPv6AcceptRA=no\n";
    let mut nd = Networkd::new(&ns.name, &[("10-veth0.network", file)]).expect("networkd rig");
    nd.start_dbus().expect("dbus-daemon");
    nd.start().expect("start networkd");
    nd.wait_configured("veth0")
        .expect("networkd configures veth0");
    (ns, nd)
}

#[test]
fn adopted_rules_survive_networkd_owner_deletions_are_kept_others_repaired() {
    let (ns, mut nd) = node_with_networkd();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    agent.wait_log("initial sync done");

    let mut owner = Owner::start(&ns, "aws-k8s-agent");
    add_pods(&mut owner);
    assert!(all_present(&ns), "{:?}", rules(&ns));
    wait_until("every per-pod rule adopted", || {
        adopted_count(&agent) == 2 * PODS.len()
    });
    // A rule outside the selector is not adopted (nor protected).
    ns.ip(&[
        "rule", "add", "priority", "2000", "from", "10.9.9.9", "table", "9",
    ])
    .unwrap();

    // networkd restart: it removes every foreign rule; all adopted ones come back.
    nd.restart().expect("restart networkd");
    nd.wait_configured("veth0").unwrap();
    let removed = nd.log_lines("Removing foreign routing policy rule");
    assert!(
        PODS.iter()
            .all(|(pod, _)| removed.iter().any(|l| l.contains(&format!("{pod}/32")))),
        "networkd did not remove the per-pod rules: {removed:?}"
    );
    wait_until("adopted rules restored after the networkd restart", || {
        all_present(&ns)
    });
    agent.wait_log_all(&["restored", "systemd-network"]);
    assert_eq!(
        count(&rules(&ns), "2000: from 10.9.9.9 lookup 9"),
        0,
        "a rule no selector adopts is not restored"
    );

    // The owner deletes a pod's rules (the pod went away): they stay deleted.
    let (gone, gone_table) = PODS[2];
    assert_eq!(owner.run(&format!("del from {gone} 1536 {gone_table}")), 0);
    assert_eq!(owner.run(&format!("del to {gone} 512 254")), 0);
    agent.wait_log_all(&["forgotten", "aws-k8s-agent"]);
    agent.wait_log_all(&["forgotten", "aws-k8s-agent"]);
    let deadline = Instant::now() + Duration::from_millis(500);
    while Instant::now() < deadline {
        let r = rules(&ns);
        assert_eq!(
            count(&r, &from_rule(gone, gone_table)),
            0,
            "restored: {r:?}"
        );
        assert_eq!(count(&r, &to_rule(gone)), 0, "restored: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Someone else (`ip`) deletes another pod's rule: drift, restored.
    let (pod, table) = PODS[0];
    ns.ip(&[
        "rule",
        "del",
        "priority",
        "1536",
        "from",
        pod,
        "table",
        &table.to_string(),
    ])
    .unwrap();
    wait_until("rule deleted by ip restored", || {
        count(&rules(&ns), &from_rule(pod, table)) == 1
    });
    // The owner lookup comes before the repair; it must stay cheap (the whole batch: decode,
    // lookup, plan, request, ack).
    let line = agent.wait_log_all(&["restored", "took_us="]);
    let took: u64 = line
        .split("took_us=")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or_else(|| panic!("no took_us in {line}"));
    println!("adopted rule removed by ip: restored in {took} us");
    assert!(took < 50_000, "repair of an adopted rule took {took} us");
    // And the owner's forgotten rules are still gone after all that.
    let r = rules(&ns);
    assert_eq!(count(&r, &from_rule(gone, gone_table)), 0, "{r:?}");

    // The owner adds the pod back: adopted again.
    let before = adopted_count(&agent);
    assert_eq!(owner.run(&format!("add to {gone} 512 254")), 0);
    wait_until("re-added rule adopted again", || {
        adopted_count(&agent) == before + 1
    });
    ns.ip(&[
        "rule", "del", "priority", "512", "to", gone, "table", "main",
    ])
    .unwrap();
    wait_until("re-adopted rule restored", || {
        count(&rules(&ns), &to_rule(gone)) == 1
    });
}

#[test]
fn adopted_rules_survive_an_agent_restart_and_show_their_origin() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), SPEC);
    let state = dir.path().join("adopted.json");
    let state_arg = state.to_str().unwrap();
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    let mut owner = Owner::start(&ns, "aws-k8s-agent");
    add_pods(&mut owner);
    wait_until("every per-pod rule adopted", || {
        adopted_count(&agent) == 2 * PODS.len()
    });
    wait_until("adopted-state file written", || {
        netwarden::adopted_state::read(&state)
            .map(|s| s.rules.len() == 2 * PODS.len())
            .unwrap_or(false)
    });
    let http = agent.http();
    let st = rig::status(&http);
    let adopted: Vec<_> = st
        .objects
        .iter()
        .filter(|o| o.origin == "adopted")
        .collect();
    assert_eq!(adopted.len(), 2 * PODS.len(), "{st:#?}");
    assert!(adopted
        .iter()
        .all(|o| o.name.starts_with("adopted:vpc-cni/")));
    rig::wait_scrape(&http, "adopted objects gauge", WAIT, |t| {
        rig::sample(
            t,
            "netwarden_protected_objects_by_origin",
            &[("kind", "rule"), ("origin", "adopted")],
        ) == Some(2.0 * PODS.len() as f64)
    });
    assert!(agent.terminate(), "agent exits cleanly");
    drop(agent);

    // While the agent is down, a pod's rule goes (not by its owner).
    let (pod, table) = PODS[1];
    ns.ip(&[
        "rule",
        "del",
        "priority",
        "1536",
        "from",
        pod,
        "table",
        &table.to_string(),
    ])
    .unwrap();
    assert_eq!(count(&rules(&ns), &from_rule(pod, table)), 0);

    // `check` with the file sees the drift of the adopted rule; without it, nothing to check.
    let cfg_arg = cfg.to_str().unwrap();
    let base = ["check", "--config", cfg_arg];
    let out = netwarden_in(&ns, &[&base[..], &["--adopted-state", state_arg]].concat());
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("adopted:vpc-cni/1536"), "{text}");
    assert!(text.contains("(6 adopted)"), "{text}");
    let out = netwarden_in(&ns, &base);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Restarted, the agent knows it from the file and puts it back at its initial sync.
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    agent.wait_log_all(&["adopted state read", "rules=6"]);
    assert!(all_present(&ns), "{:?}", rules(&ns));

    // Without the file it would not have been restored: a fresh agent does not know it.
    drop(agent);
    ns.ip(&[
        "rule",
        "del",
        "priority",
        "1536",
        "from",
        pod,
        "table",
        &table.to_string(),
    ])
    .unwrap();
    let agent = Agent::start(&ns, &cfg);
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(count(&rules(&ns), &from_rule(pod, table)), 0);
    drop(agent);
}

#[test]
fn adopted_routes_are_restored_after_the_kernel_drops_them_and_forgotten_when_the_owner_deletes_them(
) {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    // `ip` plays the owner here; the kernel is never an owner.
    let cfg = config(
        dir.path(),
        "  adopt:
    - name: eni-routes
      routes:
        table: 150-160
        device: veth*
      owners: [ip]
",
    );
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    let gw = "default via 10.200.0.2 dev veth0";
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        "10.200.0.2",
        "dev",
        "veth0",
        "table",
        "150",
    ])
    .unwrap();
    ns.ip(&[
        "route",
        "add",
        "10.60.0.0/24",
        "dev",
        "veth0",
        "table",
        "151",
    ])
    .unwrap();
    // Outside the selector: another table.
    ns.ip(&[
        "route",
        "add",
        "10.70.0.0/24",
        "dev",
        "veth0",
        "table",
        "170",
    ])
    .unwrap();
    agent.wait_log_all(&["adopted", "eni-routes", "10.200.0.2"]);
    agent.wait_log_all(&["adopted", "eni-routes", "10.60.0.0/24"]);

    // The kernel drops every route of a link that goes down, without RTM_DELROUTE: restored
    // once the link is back.
    ns.ip(&["link", "set", "veth0", "down"]).unwrap();
    assert!(routes(&ns, "150").is_empty());
    ns.ip(&["link", "set", "veth0", "up"]).unwrap();
    wait_until("adopted routes back after link down/up", || {
        count(&routes(&ns, "150"), gw) == 1
            && count(&routes(&ns, "151"), "10.60.0.0/24 dev veth0 scope link") == 1
    });
    assert!(
        routes(&ns, "170").is_empty(),
        "a route no selector adopts is not restored"
    );

    // The owner deletes one: it stays deleted.
    let ip = IpBatch::run(&ns, "route del 10.60.0.0/24 dev veth0 table 151");
    agent.wait_log_all(&["forgotten", "actor=ip"]);
    drop(ip);
    std::thread::sleep(Duration::from_millis(300));
    assert!(routes(&ns, "151").is_empty(), "{:?}", routes(&ns, "151"));
    assert_eq!(count(&routes(&ns, "150"), gw), 1);
}

/// The AWS VPC CNI overlay's adopt selectors (deploy/examples/aws-vpc-cni/configmap.yaml), as
/// a `spec` body for a file config: `podLiveness` dropped (it needs Kubernetes mode); everything
/// else, `owners` and `unknownActor` included, as shipped.
fn vpc_cni_overlay_adopt() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/examples/aws-vpc-cni/configmap.yaml");
    let cm: serde_json::Value =
        serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let config: serde_json::Value =
        serde_saphyr::from_str(cm["data"]["config.yaml"].as_str().unwrap()).unwrap();
    let mut adopt = config["spec"]["adopt"].clone();
    for sel in adopt.as_array_mut().unwrap() {
        sel.as_object_mut().unwrap().remove("podLiveness");
    }
    // JSON is YAML (flow style).
    format!("  adopt: {adopt}\n")
}

/// A pod's `512: from all to POD lookup main`, as the CNI adds it; waits until it is adopted.
fn add_pod_rule(ns: &Sandbox, agent: &mut Agent, pod: &str) {
    ns.ip(&["rule", "add", "priority", "512", "to", pod, "table", "main"])
        .unwrap();
    agent.wait_log_all(&["adopted", &format!("to {pod}")]);
}

/// `rule del` of that pod's rule, as `ip` reads it.
fn del_pod_rule(pod: &str) -> String {
    format!("rule del priority 512 to {pod} table main")
}

/// Waits for the decision on `pod`'s rule: `forgotten` (returns the log line) or `restored`.
fn forgotten(agent: &mut Agent, pod: &str) -> String {
    agent.wait_log_all(&["forgotten", &format!("to {pod}")])
}

#[test]
fn as_deployed_the_vpc_cni_overlays_owners_are_forgotten_and_strangers_repaired() {
    use common::offender::{named_ip, once, Offender, Socket, Who};
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = vpc_cni_overlay_adopt();
    assert!(spec.contains("aws-k8s-agent"), "{spec}");
    let cfg = config(dir.path(), &spec);
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    agent.wait_log("initial sync done");
    let http = agent.http();

    // aws-k8s-agent (ipamd): a root process with more capabilities than the agent, deleting
    // through a later netlink socket of a long-lived process. Named, so forgotten as the owner's.
    let pod = "10.1.1.31";
    add_pod_rule(&ns, &mut agent, pod);
    let ipamd = named_ip(dir.path(), "aws-k8s-agent");
    let holder = Offender::batch(
        &ns.name,
        Who::Root,
        Socket::Later,
        &ipamd,
        &del_pod_rule(pod),
    );
    let line = forgotten(&mut agent, pod);
    assert!(
        line.contains("actor=aws-k8s-agent") && line.contains("reason=\"owner\""),
        "{line}"
    );
    drop(holder);

    // `ip` run by aws-k8s-agent (a child of the owner acts for it): named `ip`, forgotten
    // through its parent.
    let pod = "10.1.1.32";
    add_pod_rule(&ns, &mut agent, pod);
    let parent = dir.path().join("nwsh");
    std::fs::create_dir_all(&parent).unwrap();
    let parent = parent.join("aws-k8s-agent");
    std::os::unix::fs::symlink("/bin/sh", &parent).unwrap();
    let mut cmd = std::process::Command::new(&parent);
    // A compound command: the shell forks `ip` instead of becoming it.
    cmd.args(["-c", "ip -batch -; true"])
        .stdin(std::process::Stdio::piped());
    common::deployed::in_netns(&mut cmd, &ns.name);
    let mut child = cmd.spawn().unwrap();
    let mut stdin = child.stdin.take().unwrap();
    writeln!(stdin, "{}", del_pod_rule(pod)).unwrap();
    stdin.flush().unwrap();
    let line = forgotten(&mut agent, pod);
    assert!(
        line.contains("actor=ip")
            && line.contains("ancestors=aws-k8s-agent")
            && line.contains("reason=\"owner\""),
        "{line}"
    );
    drop(stdin);
    child.wait().unwrap();

    // The aws-cni plugin: a short-lived host process (run by the container runtime at pod
    // deletion), its first socket. Named if seen in time, unknown otherwise: forgotten either
    // way under the overlay's `unknownActor`.
    let pod = "10.1.1.33";
    add_pod_rule(&ns, &mut agent, pod);
    let plugin = named_ip(dir.path(), "aws-cni");
    once(
        &ns.name,
        Who::Root,
        Socket::First,
        &plugin,
        &del_pod_rule(pod).split(' ').collect::<Vec<_>>(),
    );
    forgotten(&mut agent, pod);

    // aws-k8s-agent in the aws-node container's own PID namespace (no hostPID there): its
    // port id is its pid *in that namespace* (1 here), which on the node is another process.
    // Short-lived socket: gone before it can be looked up; never named after the node's pid 1.
    let pod = "10.1.1.34";
    add_pod_rule(&ns, &mut agent, pod);
    let del = del_pod_rule(pod);
    let mut args = vec!["--pid", "--fork", ipamd.to_str().unwrap()];
    args.extend(del.split(' '));
    once(
        &ns.name,
        Who::Root,
        Socket::First,
        std::path::Path::new("unshare"),
        &args,
    );
    let line = forgotten(&mut agent, pod);
    assert!(
        line.contains("actor=aws-k8s-agent") || line.contains("actor=unknown"),
        "{line}"
    );

    // A stranger: systemd-networkd's user with an ambient NET_ADMIN, a later socket. Named,
    // not an owner: repaired.
    let pod = "10.1.1.35";
    add_pod_rule(&ns, &mut agent, pod);
    let networkd = named_ip(dir.path(), "systemd-networkd");
    let holder = Offender::batch(
        &ns.name,
        Who::network_user(),
        Socket::Later,
        &networkd,
        &del_pod_rule(pod),
    );
    agent.wait_log_all(&["restored", "actor=systemd-network"]);
    wait_until("the stranger's deletion repaired", || {
        count(&rules(&ns), &to_rule(pod)) == 1
    });
    drop(holder);

    // What stays protected: the stranger's victim; what does not: the owners' four.
    let st = rig::status(&http);
    let adopted = st.objects.iter().filter(|o| o.origin == "adopted").count();
    assert_eq!(adopted, 1, "{st:#?}");
    let r = rules(&ns);
    for pod in ["10.1.1.31", "10.1.1.32", "10.1.1.33", "10.1.1.34"] {
        assert_eq!(count(&r, &to_rule(pod)), 0, "{pod}: {r:?}");
    }
}
