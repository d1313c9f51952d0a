//! Spares of protected iptables-nft chains against the real kernel: made, renamed into a deleted
//! chain, made again, left alone by other agents, replaced after a kill, deleted at a stop.

mod common;
use common::chains::*;
use common::*;
use std::collections::BTreeMap;

/// The agent on iptables-nft, logging at debug level (the spare lines are debug).
fn nft_agent(ns: &Sandbox, cfg: &std::path::Path) -> Agent {
    let debug = [("NETWARDEN_LOG_LEVEL", "debug")];
    Agent::start_full(ns, cfg, &["--iptables-backend", "nft"], &debug)
}

#[test]
fn a_chain_and_its_jump_deleted_in_one_transaction_come_back_from_the_image() {
    let ns = sandbox();
    // Someone else's rule in POSTROUTING: the jump must go back first, before it.
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "POSTROUTING",
            "-s",
            "10.9.0.0/16",
            "-j",
            "MASQUERADE",
        ],
    );
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), FLANNEL_SPEC);
    let mut agent = nft_agent(&ns, &cfg);
    agent.wait_log_all(&["image taken", "name=flannel-postrtg"]);
    agent.wait_log("chains and sets in sync");
    // The chain's rules hold xtables extensions (the comment, MASQUERADE): a spare is made, a
    // copy of the chain that nothing jumps to.
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let before = saved(&ns, "iptables-nft-save", "nat");
    assert_eq!(chain_lines(&before, "POSTROUTING")[0], JUMP);
    let spare_rules: Vec<String> = flannel_lines()
        .iter()
        .map(|l| l.replace("-A FLANNEL-POSTRTG ", "-A SPARE "))
        .collect();
    let made = spares(&ns, "nat");
    let (spare, rules) = made.first_key_value().expect("a spare");
    assert_eq!((made.len(), rules), (1, &spare_rules), "{made:?}");
    let spare_handle = chain_handle(&ns, spare).unwrap();

    // flannel's cleanup in one transaction: jump, rules and chain. Put back, as it was (the
    // jump first, the rules in order), by the responder at the deletion's NEWGEN, once the
    // guard has armed it: the spare renamed into the chain, the jump written again.
    agent.wait_log_all(&["images armed", "armed=2"]);
    must_feed(
        &ns,
        &["iptables-nft-restore", "--noflush"],
        "*nat\n-D POSTROUTING -m comment --comment \"flanneld masq\" -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n",
    );
    agent.wait_log_all(&["responder committed images", "Committed"]);
    let line = agent.wait_log_all(&["restored", "names=flannel-postrtg", "via=\"spare\""]);
    assert!(line.contains("what=chain missing"), "{line}");
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
    assert_eq!(
        chain_handle(&ns, "FLANNEL-POSTRTG").as_ref(),
        Some(&spare_handle),
        "the spare itself, renamed"
    );
    // flannel's own check of its jump still finds it.
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-C",
            "POSTROUTING",
            "-m",
            "comment",
            "--comment",
            "flanneld masq",
            "-j",
            "FLANNEL-POSTRTG",
        ],
    );
    // A new spare is made, under the same name.
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let again = spares(&ns, "nat");
    assert_eq!(again.get(spare), Some(&spare_rules), "{again:?}");
    assert_ne!(chain_handle(&ns, spare), Some(spare_handle));

    // Someone flushes the spare: it is made again, whole.
    must(&ns, &["iptables-nft", "-t", "nat", "-F", spare]);
    wait_until("the spare made again", || {
        spares(&ns, "nat").get(spare) == Some(&spare_rules)
    });

    // A stranger's rule in the exact chain: removed with iptables-restore, which drops the
    // image (the chain is what the guard wrote); verified in sync, a new one is taken.
    must(
        &ns,
        &[
            "iptables-nft",
            "-t",
            "nat",
            "-A",
            "FLANNEL-POSTRTG",
            "-j",
            "RETURN",
        ],
    );
    agent.wait_log_all(&["restored", "names=flannel-postrtg", "via=\"restore\""]);
    agent.wait_log_all(&["image taken", "name=flannel-postrtg"]);
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);

    // Stopped, netwarden leaves no spare behind.
    assert!(agent.terminate(), "the agent stops on SIGTERM");
    assert_eq!(spares(&ns, "nat"), BTreeMap::new());
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
}

/// A chain whose match checks the protocol `-p` gave (multiport): the kernel's dump of the rule
/// does not say it, so the agent gives it back to the rule (or the kernel refuses the copy).
#[test]
fn a_chain_whose_match_checks_the_protocol_comes_back_from_its_spare() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let spec = r#"  chains:
    - name: hostports
      table: nat
      chain: HOSTPORTS
      rules:
        - -p tcp -m comment --comment "hostports" -m multiport --dports 80,443 -j DNAT --to-destination 10.88.0.5
        - '! -p udp -m comment --comment "hostports" -j RETURN'
      jumps:
        - chain: PREROUTING
          rule: -m comment --comment "hostports" -j HOSTPORTS
"#;
    let cfg = config(dir.path(), spec);
    let mut agent = nft_agent(&ns, &cfg);
    agent.wait_log_all(&["spare made", "name=hostports"]);
    let before = saved(&ns, "iptables-nft-save", "nat");
    assert_eq!(chain_lines(&before, "HOSTPORTS").len(), 2, "{before:?}");
    agent.wait_log_all(&["images armed", "armed=1"]);
    must_feed(
        &ns,
        &["iptables-nft-restore", "--noflush"],
        "*nat\n-D PREROUTING -m comment --comment \"hostports\" -j HOSTPORTS\n-F HOSTPORTS\n-X HOSTPORTS\nCOMMIT\n",
    );
    agent.wait_log_all(&["restored", "names=hostports", "via=\"spare\""]);
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
}

/// The shell block of docs/operator-guide.md that deletes spares by hand.
fn documented_spare_cleanup() -> String {
    let guide = include_str!("../docs/operator-guide.md");
    guide
        .split("```sh\n")
        .skip(1)
        .filter_map(|b| b.split("```").next())
        .find(|b| b.contains("NETWARDEN-SPARE-"))
        .expect("a cleanup block in the operator guide")
        .to_owned()
}

#[test]
fn a_killed_agents_spare_is_replaced_at_the_next_start_or_deleted_with_the_documented_commands() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let cfg = config(dir.path(), FLANNEL_SPEC);
    let mut agent = nft_agent(&ns, &cfg);
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let before = saved(&ns, "iptables-nft-save", "nat");
    let made = spares(&ns, "nat");
    assert_eq!(made.len(), 1, "{made:?}");
    let spare = made.keys().next().unwrap().clone();
    // Someone adds a rule to the spare the agent will leave behind.
    must(
        &ns,
        &["iptables-nft", "-t", "nat", "-A", &spare, "-j", "RETURN"],
    );
    let first = chain_handle(&ns, &spare).unwrap();
    // Killed (SIGKILL): nothing deletes its spare.
    drop(agent);
    assert_eq!(chain_handle(&ns, &spare), Some(first.clone()));
    // The next start replaces it with a copy of the chain again.
    let mut agent = nft_agent(&ns, &cfg);
    agent.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    assert_eq!(
        spares(&ns, "nat"),
        made,
        "one, under the same name, a copy again"
    );
    assert_ne!(chain_handle(&ns, &spare), Some(first));
    drop(agent);
    // By hand, as the operator guide says: only the spare goes.
    must(&ns, &["sh", "-c", &documented_spare_cleanup()]);
    assert_eq!(spares(&ns, "nat"), BTreeMap::new());
    assert_eq!(saved(&ns, "iptables-nft-save", "nat"), before);
    assert_eq!(
        chain_lines(&saved(&ns, "iptables-nft-save", "nat"), "FLANNEL-POSTRTG"),
        flannel_lines()
    );
}

/// Two agents on one node with different chains (the DaemonSet and a per-node agent): each
/// deletes only its own spares.
#[test]
fn an_agent_leaves_another_agents_spares_alone() {
    let ns = sandbox();
    let dir = tempfile::tempdir().unwrap();
    let other = tempfile::tempdir().unwrap();
    let mut flannel = nft_agent(&ns, &config(dir.path(), FLANNEL_SPEC));
    flannel.wait_log_all(&["spare made", "name=flannel-postrtg"]);
    let (spare, _) = spares(&ns, "nat").pop_first().unwrap();
    let handle = chain_handle(&ns, &spare).unwrap();
    let per_node = r#"  chains:
    - name: per-node
      table: nat
      chain: PER-NODE
      rules:
        - -s 10.50.0.0/16 -m comment --comment "per node" -j MASQUERADE
"#;
    let mut node = nft_agent(&ns, &config(other.path(), per_node));
    node.wait_log_all(&["spare made", "name=per-node"]);
    assert_eq!(spares(&ns, "nat").len(), 2);
    assert!(node.terminate(), "stops on SIGTERM");
    let left = spares(&ns, "nat");
    assert_eq!(
        left.keys().collect::<Vec<_>>(),
        [&spare],
        "only its own gone"
    );
    assert_eq!(
        chain_handle(&ns, &spare),
        Some(handle),
        "the other's untouched"
    );
}
