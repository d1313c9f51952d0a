//! A real CNI's state: Debian's containernetworking-plugins (bridge with ipMasq, then portmap)
//! wire a container namespace into the test's "host" namespace; `netwarden snapshot` protects
//! what they created; the plugins' own DEL removes it; it comes back.

mod common;
use common::*;
use std::io::Write;
use std::process::{Command, Stdio};

const PLUGINS: &str = "/usr/lib/cni";

/// Runs a CNI plugin inside the host namespace with `conf` on stdin; returns (success, stdout).
fn cni(
    host: &Sandbox,
    container: &Sandbox,
    plugin: &str,
    command: &str,
    conf: &str,
) -> (bool, String) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &host.name, "env"])
        .arg(format!("CNI_COMMAND={command}"))
        .arg("CNI_CONTAINERID=nwtest-ctr1")
        .arg(format!("CNI_NETNS=/run/netns/{}", container.name))
        .arg("CNI_IFNAME=eth0")
        .arg(format!("CNI_PATH={PLUGINS}"))
        .arg(format!("{PLUGINS}/{plugin}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run CNI plugin");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

fn nat_rules(ns: &Sandbox) -> Vec<String> {
    let out = Command::new("ip")
        .args(["netns", "exec", &ns.name, "iptables-nft-save", "-t", "nat"])
        .output()
        .unwrap();
    let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        // The agent's spare copies of protected chains are not the CNI's rules.
        .filter(|l| l.starts_with("-A ") && !l.starts_with("-A NETWARDEN-SPARE-"))
        .map(str::to_owned)
        .collect();
    v.sort();
    v
}

#[test]
fn cni_bridge_and_portmap_state_protected_by_snapshot_comes_back() {
    if !std::path::Path::new(&format!("{PLUGINS}/bridge")).exists() {
        eprintln!("SKIP: containernetworking-plugins not installed ({PLUGINS}/bridge missing)");
        return;
    }
    let host = Sandbox::create("nw-test-cnih").unwrap();
    let container = Sandbox::create("nw-test-cnic").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ipam = dir.path().join("ipam");
    let bridge_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"nwtest","type":"bridge","bridge":"cni-nw0","isGateway":true,"ipMasq":true,
            "ipam":{{"type":"host-local","subnet":"10.88.0.0/24","dataDir":"{}"}}}}"#,
        ipam.display()
    );
    let (ok, result) = cni(&host, &container, "bridge", "ADD", &bridge_conf);
    assert!(ok, "bridge ADD: {result}");
    let portmap_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"nwtest","type":"portmap","capabilities":{{"portMappings":true}},"snat":true,
            "runtimeConfig":{{"portMappings":[{{"hostPort":8080,"containerPort":80,"protocol":"tcp"}}]}},"prevResult":{result}}}"#
    );
    let (ok, out) = cni(&host, &container, "portmap", "ADD", &portmap_conf);
    assert!(ok, "portmap ADD: {out}");
    let before = nat_rules(&host);
    assert!(
        before
            .iter()
            .any(|l| l.contains("DNAT --to-destination 10.88.0.2:80")),
        "{before:?}"
    );

    // Protect it all in one step.
    let snap = netwarden_in(
        &host,
        &[
            "snapshot",
            "--chains",
            "CNI-",
            "--tables",
            "main",
            "--addresses",
            "cni-",
        ],
    );
    let yaml = String::from_utf8_lossy(&snap.stdout).into_owned();
    assert_eq!(
        snap.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&snap.stderr)
    );
    assert!(
        yaml.contains("chain: 'CNI-HOSTPORT-DNAT'") && yaml.contains("10.88.0.1/24"),
        "{yaml}"
    );
    let cfg = dir.path().join("snapshot.yaml");
    std::fs::write(&cfg, &yaml).unwrap();
    let out = netwarden(&["validate", cfg.to_str().unwrap()]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let _agent = Agent::start(&host, &cfg);
    // The plugins take their state away (as on a stray DEL); the agent may win some of the
    // races inside DEL, so its exit status says nothing here.
    let del_portmap = portmap_conf.replace("\"ADD\"", "\"DEL\"");
    let _ = cni(&host, &container, "portmap", "DEL", &del_portmap);
    let _ = cni(&host, &container, "bridge", "DEL", &bridge_conf);
    host.ip(&["address", "flush", "dev", "cni-nw0"]).unwrap();

    wait_until("CNI nat rules back", || nat_rules(&host) == before);
    wait_until("bridge address and subnet route back", || {
        routes(&host, "main")
            .iter()
            .any(|l| l.starts_with("10.88.0.0/24 dev cni-nw0"))
            && lines(&host, &["-4", "address", "show", "dev", "cni-nw0"])
                .iter()
                .any(|l| l.starts_with("inet 10.88.0.1/24"))
    });
    let out = check(&host, &cfg, &[]);
    // The veth that the bridge plugin deleted is gone for good, so its link-local route is
    // pending; everything netwarden can restore is there.
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(!table.contains("chain "), "{table}");
}
