//! Neighbour and FDB entries, links and sysctls against the real kernel, broken with the real
//! tools (`ip`, `bridge`, `sysctl`, `systemd-sysctl`) inside namespaces the tests create. Every
//! sysctl written here is a `net.*` one, through `ip netns exec`: it reaches only the test's
//! namespace. The agent runs as the DaemonSet runs it (its user and capabilities, no_new_privs:
//! `Agent::start*`, tests/common), so what is tested is what ships.

mod common;
mod rig;
use common::*;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Instant;

const VTEP_MAC: &str = "0a:58:0a:f4:02:00";
const NEIGH: &str = "10.244.2.0 lladdr 0a:58:0a:f4:02:00 PERMANENT";
const FDB: &str = "0a:58:0a:f4:02:00 dst 10.200.0.2 self permanent";
/// flannel's FDB entry for a peer's VTEP, added as flannel adds it.
const FDB_APPEND: [&str; 10] = [
    "bridge",
    "fdb",
    "append",
    VTEP_MAC,
    "dev",
    "flannel.1",
    "dst",
    "10.200.0.2",
    "self",
    "permanent",
];
const NEIGH6: &str = "fd00:244:2:: lladdr 0a:58:0a:f4:02:00 PERMANENT";

/// The sandbox, with `flannel.1` as flannel's VXLAN backend makes it (VNI 1, port 8472, on
/// veth0, no learning).
fn vxlan_sandbox() -> Sandbox {
    let ns = sandbox();
    ns.ip(&[
        "link",
        "add",
        "flannel.1",
        "type",
        "vxlan",
        "id",
        "1",
        "dev",
        "veth0",
        "dstport",
        "8472",
        "nolearning",
    ])
    .unwrap();
    ns.ip(&["link", "set", "flannel.1", "up"]).unwrap();
    ns
}

/// A sysctl of the namespace (a `net.*` key).
fn sysctl(ns: &Sandbox, key: &str) -> String {
    must(ns, &["sysctl", "-n", key]).trim().to_owned()
}

fn set_sysctl(ns: &Sandbox, key: &str, value: &str) {
    must(ns, &["sysctl", "-qw", &format!("{key}={value}")]);
}

fn neighbours(ns: &Sandbox) -> Vec<String> {
    lines(ns, &["neigh", "show", "dev", "flannel.1"])
}

fn fdb(ns: &Sandbox) -> Vec<String> {
    let out = must(ns, &["bridge", "fdb", "show", "dev", "flannel.1"]);
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect()
}

fn link_line(ns: &Sandbox, dev: &str) -> String {
    lines(ns, &["link", "show", "dev", dev]).join(" ")
}

/// The value of a metric sample (0 when absent).
fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    rig::total(&rig::scrape(&agent.http()), name, labels)
}

const FLANNEL_SPEC: &str = r#"  resync: 1h
  neighbours:
    - name: vtep-node2
      device: flannel.1
      address: 10.244.2.0
      lladdr: 0a:58:0a:f4:02:00
    - name: vtep6-node2
      device: flannel.1
      address: "fd00:244:2::"
      lladdr: 0a:58:0a:f4:02:00
    - name: fdb-node2
      device: flannel.1
      lladdr: 0a:58:0a:f4:02:00
      dst: 10.200.0.2
"#;

#[test]
fn flushed_neighbour_and_deleted_fdb_entries_come_back() {
    let ns = vxlan_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), FLANNEL_SPEC);
    let agent = Agent::start_with(&ns, &cfg, &[]);
    assert_eq!(count(&neighbours(&ns), NEIGH), 1, "{:?}", neighbours(&ns));
    assert_eq!(count(&fdb(&ns), FDB), 1, "{:?}", fdb(&ns));

    // `ip neigh flush` leaves permanent entries alone unless told `nud all` (or permanent), as
    // an operator clearing a device does. The process stays until its batch ends, so the
    // attribution is not a race with its exit.
    assert_eq!(count(&neighbours(&ns), NEIGH6), 1, "{:?}", neighbours(&ns));
    let flush = IpBatch::run(&ns, "neigh flush dev flannel.1 nud all");
    wait_until("the IPv4 and IPv6 neighbour entries back", || {
        count(&neighbours(&ns), NEIGH) == 1
            && count(&neighbours(&ns), NEIGH6) == 1
            && metric(
                &agent,
                "netwarden_drift_detected_total",
                &[("kind", "neighbour"), ("actor", "ip")],
            ) >= 1.0
    });
    drop(flush);

    must(
        &ns,
        &["bridge", "fdb", "del", VTEP_MAC, "dev", "flannel.1", "self"],
    );
    wait_until("the FDB entry back", || count(&fdb(&ns), FDB) == 1);
    // A VXLAN device's FDB notifications never carry the changer's port: nobody is named.
    wait_until("the FDB drift counted", || {
        metric(
            &agent,
            "netwarden_drift_detected_total",
            &[("kind", "fdb"), ("actor", "unknown")],
        ) >= 1.0
    });

    // Replaced with another remote, as after a node's address changed: put right in place.
    must(
        &ns,
        &[
            "bridge",
            "fdb",
            "replace",
            VTEP_MAC,
            "dev",
            "flannel.1",
            "dst",
            "10.200.0.9",
            "self",
            "permanent",
        ],
    );
    wait_until("the remote put right", || {
        let f = fdb(&ns);
        count(&f, FDB) == 1 && !f.iter().any(|l| l.contains("10.200.0.9"))
    });
    let out = check(&ns, &cfg, &[]);
    assert!(out.status.success(), "{out:?}");
    // Foreign entries are left alone.
    must(
        &ns,
        &[
            "ip",
            "neigh",
            "add",
            "10.244.3.0",
            "lladdr",
            "0a:58:0a:f4:03:00",
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    );
    must(
        &ns,
        &["ip", "neigh", "del", "10.244.3.0", "dev", "flannel.1"],
    );
    let status = rig::wait_all_in_sync(&agent.http(), WAIT);
    assert_eq!(status.objects.len(), 3, "{status:#?}");
    assert!(!neighbours(&ns).iter().any(|l| l.contains("10.244.3.0")));
}

#[test]
fn forwarding_and_rp_filter_are_repaired_from_netconf_events() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    // Neither a resync nor a poll within the test: only the notification can bring it back.
    let cfg = config(
        dir.path(),
        r#"  resync: 1h
  pollInterval: 1h
  sysctls:
    - name: forward-v4
      key: net.ipv4.conf.veth0.forwarding
      value: 1
    - name: no-rp-filter
      key: net.ipv4.conf.veth0.rp_filter
      value: 0
    - name: forward-v6
      key: net.ipv6.conf.all.forwarding
      value: 1
"#,
    );
    set_sysctl(&ns, "net.ipv4.conf.veth0.rp_filter", "1");
    let agent = Agent::start_with(&ns, &cfg, &[]);
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth0.forwarding"), "1");
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth0.rp_filter"), "0");
    assert_eq!(sysctl(&ns, "net.ipv6.conf.all.forwarding"), "1");

    set_sysctl(&ns, "net.ipv4.conf.veth0.forwarding", "0");
    wait_until("forwarding back", || {
        sysctl(&ns, "net.ipv4.conf.veth0.forwarding") == "1"
    });
    set_sysctl(&ns, "net.ipv4.conf.veth0.rp_filter", "2");
    wait_until("rp_filter back", || {
        sysctl(&ns, "net.ipv4.conf.veth0.rp_filter") == "0"
    });
    set_sysctl(&ns, "net.ipv6.conf.all.forwarding", "0");
    wait_until("IPv6 forwarding back", || {
        sysctl(&ns, "net.ipv6.conf.all.forwarding") == "1"
    });
    // A write through /proc carries no netlink port: nobody is named, not even the kernel.
    wait_until("three drifts counted", || {
        metric(
            &agent,
            "netwarden_drift_detected_total",
            &[("kind", "sysctl"), ("actor", "unknown")],
        ) >= 3.0
    });
    assert_eq!(
        metric(&agent, "netwarden_resyncs_total", &[("reason", "timer")]),
        0.0
    );
    let out = check(&ns, &cfg, &[]);
    assert!(out.status.success(), "{out:?}");
}

#[test]
fn settings_without_notifications_are_read_every_poll_interval() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        r#"  resync: 1h
  pollInterval: 200ms
  sysctls:
    - name: accept-local
      key: net.ipv4.conf.veth0.accept_local
      value: 1
"#,
    );
    let _agent = Agent::start_with(&ns, &cfg, &[]);
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth0.accept_local"), "1");
    set_sysctl(&ns, "net.ipv4.conf.veth0.accept_local", "0");
    wait_until("accept_local back", || {
        sysctl(&ns, "net.ipv4.conf.veth0.accept_local") == "1"
    });
}

#[test]
fn a_new_link_matching_a_pattern_gets_its_settings_at_once() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        r#"  resync: 1h
  pollInterval: 1h
  links:
    - name: pod-links
      device: "pod*"
      up: true
      mtu: 1400
  sysctls:
    - name: pods-rp-filter
      key: net.ipv4.conf.pod*.rp_filter
      value: 0
"#,
    );
    // A distribution's default, as systemd's 50-default.conf sets it: new links start with it.
    set_sysctl(&ns, "net.ipv4.conf.default.rp_filter", "2");
    set_sysctl(&ns, "net.ipv4.conf.veth0.rp_filter", "2");
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    ns.ip(&[
        "link", "add", "pod1", "type", "veth", "peer", "name", "pod1p",
    ])
    .unwrap();
    wait_until("pod1 and its peer set up", || {
        ["pod1", "pod1p"].iter().all(|d| {
            let l = link_line(&ns, d);
            l.contains(",UP") && l.contains("mtu 1400")
        }) && sysctl(&ns, "net.ipv4.conf.pod1.rp_filter") == "0"
            && sysctl(&ns, "net.ipv4.conf.pod1p.rp_filter") == "0"
    });
    // A new link's defaults are placed, not drift: nobody removed anything.
    agent.wait_log_all(&["placed", "pods-rp-filter"]);
    assert_eq!(
        metric(&agent, "netwarden_drift_detected_total", &[]),
        0.0,
        "a new link counted as drift"
    );
    // Other links are not touched.
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth0.rp_filter"), "2");
    assert!(link_line(&ns, "veth0").contains("mtu 1500"));
    // The link's objects go with it.
    ns.ip(&["link", "del", "pod1"]).unwrap();
    wait_until("pod1's objects forgotten", || {
        rig::status(&agent.http()).objects.is_empty()
    });
}

#[test]
fn a_link_set_down_or_given_another_mtu_is_put_right() {
    let ns = vxlan_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "{FLANNEL_SPEC}  links:\n    - name: flannel-link\n      device: flannel.1\n      up: true\n      mtu: 1450\n"
        ),
    );
    let agent = Agent::start_with(&ns, &cfg, &[]);
    assert!(link_line(&ns, "flannel.1").contains("mtu 1450"));
    ns.ip(&["link", "set", "flannel.1", "mtu", "1300"]).unwrap();
    wait_until("the MTU back", || {
        link_line(&ns, "flannel.1").contains("mtu 1450")
    });
    // Down: the kernel also drops the device's neighbour entries. Everything comes back.
    ns.ip(&["link", "set", "flannel.1", "down"]).unwrap();
    wait_until("up again, its entries back", || {
        link_line(&ns, "flannel.1").contains(",UP")
            && count(&neighbours(&ns), NEIGH) == 1
            && count(&neighbours(&ns), NEIGH6) == 1
            && count(&fdb(&ns), FDB) == 1
    });
    wait_until("the link drift counted", || {
        metric(
            &agent,
            "netwarden_drift_detected_total",
            &[("kind", "link"), ("actor", "unknown")],
        ) >= 2.0
    });
    let out = check(&ns, &cfg, &["-o", "json"]);
    assert!(out.status.success(), "{out:?}");
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            &json["protected"]["links"],
            &json["protected"]["neighbours"],
            &json["protected"]["fdb"]
        ),
        (&1.into(), &2.into(), &1.into())
    );
}

#[test]
fn systemd_sysctl_reapplying_distribution_defaults_is_repaired() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        r#"  resync: 1h
  pollInterval: 1h
  sysctls:
    - name: ip-forward
      key: net.ipv4.ip_forward
      value: 1
    - name: veth0-rp-filter
      key: net.ipv4.conf.veth0.rp_filter
      value: 0
    - name: all-rp-filter
      key: net.ipv4.conf.all.rp_filter
      value: 0
"#,
    );
    let agent = Agent::start_with(&ns, &cfg, &[]);
    // What a package upgrade's `sysctl --system` re-applies: systemd's rp_filter default on
    // every interface, and a cloud image's forwarding off. Only net.* keys: the real
    // systemd-sysctl applies the file given as its argument, in the namespace.
    let conf = dir.path().join("50-upgrade.conf");
    std::fs::write(
        &conf,
        "net.ipv4.conf.*.rp_filter = 2\nnet.ipv4.ip_forward = 0\n",
    )
    .unwrap();
    must(
        &ns,
        &["/lib/systemd/systemd-sysctl", conf.to_str().unwrap()],
    );
    wait_until("rp_filter and forwarding back", || {
        sysctl(&ns, "net.ipv4.conf.veth0.rp_filter") == "0"
            && sysctl(&ns, "net.ipv4.conf.all.rp_filter") == "0"
            && sysctl(&ns, "net.ipv4.ip_forward") == "1"
    });
    // It really changed them (the glob reached veth1 too, which is not protected).
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth1.rp_filter"), "2");
    wait_until("three drifts counted", || {
        metric(
            &agent,
            "netwarden_drift_detected_total",
            &[("kind", "sysctl")],
        ) >= 3.0
    });
}

#[test]
fn a_setting_fought_over_backs_off() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "  sysctls:\n    - name: no-rp-filter\n      key: net.ipv4.conf.veth0.rp_filter\n      value: 0\n",
    );
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    let repairs = |agent: &Agent| {
        metric(
            agent,
            "netwarden_repairs_total",
            &[("kind", "sysctl"), ("result", "applied")],
        )
    };
    let before = repairs(&agent);
    // A manager that writes its own value every 20 ms for 4 s.
    let mut fighter = Command::new("ip")
        .args(["netns", "exec", &ns.name, "sh", "-c"])
        .arg("end=$(($(date +%s) + 4)); while [ $(date +%s) -lt $end ]; do echo 2 > /proc/sys/net/ipv4/conf/veth0/rp_filter; sleep 0.02; done")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    agent.wait_log_all(&["contested", "no-rp-filter"]);
    let started = Instant::now();
    let _ = fighter.wait();
    let fought = repairs(&agent) - before;
    // Without the backoff every write (about 200) would be repaired.
    assert!(fought < 60.0, "{fought} repairs in a 4 s fight");
    // Once the fight stops, the setting comes back.
    wait_until("rp_filter back after the fight", || {
        sysctl(&ns, "net.ipv4.conf.veth0.rp_filter") == "0"
    });
    eprintln!("back {:?} after the fight began", started.elapsed());
}

#[test]
fn observe_mode_reports_missing_node_state_and_changes_nothing() {
    let ns = vxlan_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        &format!(
            "  mode: observe\n{FLANNEL_SPEC}  sysctls:\n    - name: forward\n      key: net.ipv4.conf.all.forwarding\n      value: 1\n"
        ),
    );
    set_sysctl(&ns, "net.ipv4.conf.all.forwarding", "0");
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    // Reported in the order repairs would go: settings, then the entries.
    agent.wait_log_all(&["drift: different", "forward"]);
    agent.wait_log_all(&["drift: missing", "vtep-node2"]);
    assert!(neighbours(&ns).is_empty(), "{:?}", neighbours(&ns));
    assert_eq!(count(&fdb(&ns), FDB), 0);
    assert_eq!(sysctl(&ns, "net.ipv4.conf.all.forwarding"), "0");
    let out = check(&ns, &cfg, &[]);
    assert_eq!(out.status.code(), Some(1));
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("2 neighbours, 1 FDB entry, 1 sysctl") && table.contains("fdb-node2"),
        "{table}"
    );
}

#[test]
fn snapshot_of_node_state_is_protected_as_it_was() {
    let ns = vxlan_sandbox();
    must(
        &ns,
        &[
            "ip",
            "neigh",
            "add",
            "10.244.2.0",
            "lladdr",
            VTEP_MAC,
            "dev",
            "flannel.1",
            "nud",
            "permanent",
        ],
    );
    must(&ns, &FDB_APPEND);
    let out = netwarden_in(
        &ns,
        &[
            "snapshot",
            "--neighbours",
            "flannel",
            "--links",
            "flannel",
            "--sysctls",
            "flannel",
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.contains("address: '10.244.2.0'"), "{yaml}");
    assert!(yaml.contains("dst: '10.200.0.2'"), "{yaml}");
    assert!(
        yaml.contains("key: 'net.ipv4.conf.flannel/1.rp_filter'"),
        "{yaml}"
    );
    assert!(
        !yaml.contains("ff02::"),
        "multicast entries are the kernel's: {yaml}"
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.yaml");
    std::fs::write(&path, &yaml).unwrap();
    let out = check(&ns, &path, &[]);
    assert!(out.status.success(), "{yaml}\n{out:?}");
    // Enforced, it repairs what it listed.
    let _agent = Agent::start_with(&ns, &path, &[]);
    ns.ip(&["neigh", "del", "10.244.2.0", "dev", "flannel.1"])
        .unwrap();
    ns.ip(&["link", "set", "flannel.1", "down"]).unwrap();
    wait_until("entry and link back", || {
        count(&neighbours(&ns), NEIGH) == 1 && link_line(&ns, "flannel.1").contains(",UP")
    });
}

/// The agent as the DaemonSet runs it, as far as settings go: inside the node's namespace, with
/// the DaemonSet's user and capabilities ([`Privileges::of_daemonset`]), /proc/sys read-only as
/// a container runtime mounts it, and (with `host_sysctl`) the namespace's /proc/sys/net bound writable at
/// another path, as the DaemonSet's hostPath volume does, passed with --sysctl-dir.
struct Contained {
    child: Child,
    log: Arc<Mutex<Vec<String>>>,
}

impl Contained {
    fn start(
        ns: &Sandbox,
        config: &std::path::Path,
        host_sysctl: Option<&std::path::Path>,
    ) -> Contained {
        let bin = BIN;
        let config = config.display();
        let (bind, dir) = match host_sysctl {
            Some(d) => (
                format!("mount --bind /proc/sys/net {} && ", d.display()),
                format!(" --sysctl-dir {}", d.display()),
            ),
            None => (String::new(), String::new()),
        };
        // Plain words (`--bounding-set=-all,+net_admin…`): nothing for the shell to expand.
        let setpriv = Privileges::of_daemonset().setpriv_args().join(" ");
        let script = format!(
            "{bind}mount --bind /proc/sys /proc/sys && mount -o remount,bind,ro /proc/sys && \
             exec setpriv {setpriv} -- {bin} run --config {config} --metrics-addr off --log-level info{dir}"
        );
        let mut child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &ns.name,
                "unshare",
                "-m",
                "--propagation",
                "private",
            ])
            .args(["sh", "-c", &script])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the contained agent");
        let stderr = child.stderr.take().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let keep = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                keep.lock().unwrap().push(line);
            }
        });
        Contained { child, log }
    }

    fn wait_log(&self, needles: &[&str]) -> String {
        let mut found = None;
        wait_until(&format!("a log line with {needles:?}"), || {
            let log = self.log.lock().unwrap();
            found = log
                .iter()
                .find(|l| needles.iter().all(|n| l.contains(n)))
                .cloned();
            found.is_some()
        });
        found.unwrap()
    }
}

impl Drop for Contained {
    fn drop(&mut self) {
        // `ip netns exec`, `unshare`, `sh` and `setpriv` each exec the next: the pid is the agent's.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn settings_are_repaired_with_the_daemonsets_capabilities_through_a_writable_mount() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "  sysctls:\n    - name: no-rp-filter\n      key: net.ipv4.conf.veth0.rp_filter\n      value: 0\n",
    );
    set_sysctl(&ns, "net.ipv4.conf.veth0.rp_filter", "2");
    // /proc/sys read-only, as in any non-privileged container: the write is refused, and said so.
    let plain = Contained::start(&ns, &cfg, None);
    let line = plain.wait_log(&["repair failed", "no-rp-filter"]);
    assert!(
        line.contains("Read-only file system") && line.contains("--sysctl-dir"),
        "{line}"
    );
    plain.wait_log(&["initial sync done"]);
    drop(plain);
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth0.rp_filter"), "2");

    // With the host's /proc/sys/net mounted writable (the DaemonSet's hostPath) it works, and
    // so do repairs from events.
    let mnt = dir.path().join("host-proc-sys-net");
    std::fs::create_dir(&mnt).unwrap();
    let agent = Contained::start(&ns, &cfg, Some(&mnt));
    agent.wait_log(&["initial sync done"]);
    assert_eq!(sysctl(&ns, "net.ipv4.conf.veth0.rp_filter"), "0");
    set_sysctl(&ns, "net.ipv4.conf.veth0.rp_filter", "2");
    wait_until("rp_filter back", || {
        sysctl(&ns, "net.ipv4.conf.veth0.rp_filter") == "0"
    });
    agent.wait_log(&["restored", "sysctls=1"]);
}

/// `ip` under flannel's command name: what it does is done by `flanneld` for the agent.
fn flanneld(dir: &std::path::Path) -> std::path::PathBuf {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(std::path::Path::new)
        .find(|p| p.exists())
        .expect("the ip tool");
    let owner = dir.join("flanneld");
    std::fs::copy(ip, &owner).unwrap();
    owner
}

#[test]
fn adopted_flannel_entries_follow_their_owner_and_are_restored_for_others() {
    let ns = vxlan_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(
        dir.path(),
        "  adopt:\n    - name: flannel\n      neighbours:\n        devices: [flannel.1]\n      owners: [flanneld]\n",
    );
    let owner = flanneld(dir.path());
    let mut agent = Agent::start_with(&ns, &cfg, &[]);
    // flanneld learns of node 2: its neighbour entry and FDB entry appear, and are adopted.
    drop(IpBatch::run_with(
        &ns,
        &owner,
        "neigh add 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1 nud permanent",
    ));
    must(&ns, &FDB_APPEND);
    agent.wait_log_all(&["adopted", "adopted:flannel/flannel.1/10.244.2.0"]);
    agent.wait_log_all(&["adopted", "adopted:flannel/flannel.1/0a:58:0a:f4:02:00"]);

    // Someone else flushes them: restored.
    drop(IpBatch::run(&ns, "neigh flush dev flannel.1 nud all"));
    must(
        &ns,
        &["bridge", "fdb", "del", VTEP_MAC, "dev", "flannel.1", "self"],
    );
    wait_until("both entries restored", || {
        count(&neighbours(&ns), NEIGH) == 1 && count(&fdb(&ns), FDB) == 1
    });

    // A reload that keeps the selector keeps them protected.
    let hup = |agent: &Agent| {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(agent.pid() as i32),
            nix::sys::signal::Signal::SIGHUP,
        )
        .unwrap()
    };
    config(
        dir.path(),
        "  pollInterval: 2s\n  adopt:\n    - name: flannel\n      neighbours:\n        devices: [flannel.1]\n      owners: [flanneld]\n",
    );
    hup(&agent);
    agent.wait_log_all(&["full refresh", "config_change"]);
    drop(IpBatch::run(&ns, "neigh flush dev flannel.1 nud all"));
    wait_until("the neighbour entry restored after the reload", || {
        count(&neighbours(&ns), NEIGH) == 1
    });

    // The node's address changes: flanneld points the FDB entry elsewhere. Followed, not fought.
    must(
        &ns,
        &[
            "bridge",
            "fdb",
            "replace",
            VTEP_MAC,
            "dev",
            "flannel.1",
            "dst",
            "10.200.0.3",
            "self",
            "permanent",
        ],
    );
    agent.wait_log_all(&["adopted", "dst 10.200.0.3", "followed=true"]);
    assert!(
        fdb(&ns).iter().any(|l| l.contains("dst 10.200.0.3")),
        "{:?}",
        fdb(&ns)
    );

    // Node 2 leaves: flanneld removes the pair. Both are forgotten, not restored.
    drop(IpBatch::run_with(
        &ns,
        &owner,
        "neigh del 10.244.2.0 dev flannel.1",
    ));
    must(
        &ns,
        &["bridge", "fdb", "del", VTEP_MAC, "dev", "flannel.1", "self"],
    );
    agent.wait_log_all(&["forgotten", "actor=flanneld"]);
    wait_until("nothing protected any more", || {
        rig::status(&agent.http()).objects.is_empty()
    });
    for kind in ["neighbour", "fdb"] {
        assert_eq!(
            metric(
                &agent,
                "netwarden_adopted_forgotten_total",
                &[("kind", kind), ("reason", "owner")]
            ),
            1.0,
            "{kind}"
        );
    }
    assert!(neighbours(&ns).is_empty() && fdb(&ns).iter().all(|l| !l.contains(VTEP_MAC)));

    // Once more, then a reload without the selector: no longer protected.
    drop(IpBatch::run_with(
        &ns,
        &owner,
        "neigh add 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1 nud permanent",
    ));
    agent.wait_log_all(&["adopted", "adopted:flannel/flannel.1/10.244.2.0"]);
    config(dir.path(), "  rules: []\n");
    hup(&agent);
    agent.wait_log_all(&["full refresh", "config_change"]);
    drop(IpBatch::run(&ns, "neigh flush dev flannel.1 nud all"));
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(600);
    while std::time::Instant::now() < deadline {
        assert!(
            neighbours(&ns).is_empty(),
            "restored after its selector went"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// `run --adopted-state`: adopted neighbour and FDB entries flushed while the agent was down are
/// put back at the next start, as last seen; once their selector is gone, they are not.
#[test]
fn adopted_flannel_entries_removed_while_the_agent_is_down_are_restored_at_start() {
    let ns = vxlan_sandbox();
    let dir = tempfile::tempdir().unwrap();
    let flannel =
        "  adopt:\n    - name: flannel\n      neighbours:\n        devices: [flannel.1]\n      owners: [flanneld]\n";
    let cfg = config(dir.path(), flannel);
    let state = dir.path().join("adopted.json");
    let state_arg = state.to_str().unwrap();
    let saved = || {
        netwarden::adopted_state::read(&state)
            .map(|s| (s.neighbours.len(), s.fdb.len()))
            .unwrap_or_default()
    };
    let owner = flanneld(dir.path());
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    drop(IpBatch::run_with(
        &ns,
        &owner,
        "neigh add 10.244.2.0 lladdr 0a:58:0a:f4:02:00 dev flannel.1 nud permanent",
    ));
    must(&ns, &FDB_APPEND);
    agent.wait_log_all(&["adopted", "adopted:flannel/flannel.1/10.244.2.0"]);
    agent.wait_log_all(&["adopted", "adopted:flannel/flannel.1/0a:58:0a:f4:02:00"]);
    wait_until("both entries saved", || saved() == (1, 1));
    assert!(agent.terminate(), "agent exits cleanly");
    drop(agent);

    // While the agent is down, both go (not by their owner).
    let flush = || {
        drop(IpBatch::run(&ns, "neigh flush dev flannel.1 nud all"));
        must(
            &ns,
            &["bridge", "fdb", "del", VTEP_MAC, "dev", "flannel.1", "self"],
        );
        assert!(count(&neighbours(&ns), NEIGH) == 0 && count(&fdb(&ns), FDB) == 0);
    };
    flush();

    // Restarted with the file: both put back by the initial sync.
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    agent.wait_log_all(&["adopted state read", "neighbours_and_fdb=2"]);
    wait_until("both entries restored", || {
        count(&neighbours(&ns), NEIGH) == 1 && count(&fdb(&ns), FDB) == 1
    });
    assert!(agent.terminate(), "agent exits cleanly");
    drop(agent);

    // Control: the selector is gone from the config. Nothing comes back, and the file forgets
    // them.
    flush();
    config(dir.path(), "  rules: []\n");
    let mut agent = Agent::start_with(&ns, &cfg, &["--adopted-state", state_arg]);
    agent.wait_log_all(&["adopted state read", "neighbours_and_fdb=0"]);
    wait_until("the file forgets them", || saved() == (0, 0));
    // The initial sync is done (the agent logged it before `start` returned): it put nothing
    // back.
    assert!(
        neighbours(&ns).is_empty() && fdb(&ns).iter().all(|l| !l.contains(VTEP_MAC)),
        "{:?} {:?}",
        neighbours(&ns),
        fdb(&ns)
    );
}
