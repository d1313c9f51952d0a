//! iptables chains as the integration tests read them, and flannel's chain (tests/chains.rs,
//! tests/chain_spares.rs).

use super::{exec, must};
use netwarden::testing::sandbox::Sandbox;
use std::collections::BTreeMap;

/// The `-A` lines of one table, as `iptables-save` prints them, without netwarden's spares
/// (see [`spares`]).
pub fn saved(ns: &Sandbox, save: &str, table: &str) -> Vec<String> {
    must(ns, &[save, "-t", table])
        .lines()
        .filter(|l| l.starts_with("-A ") && !l.starts_with("-A NETWARDEN-SPARE-"))
        .map(str::to_owned)
        .collect()
}

/// netwarden's spares in a table: chain name, then its rules as `iptables-save` prints them
/// with the spare's name replaced by `SPARE`.
pub fn spares(ns: &Sandbox, table: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for l in must(ns, &["iptables-nft-save", "-t", table]).lines() {
        if let Some(chain) = l.strip_prefix(":NETWARDEN-SPARE-") {
            let name = chain.split(' ').next().unwrap_or_default();
            out.entry(format!("NETWARDEN-SPARE-{name}")).or_default();
        }
        if let Some(rest) = l.strip_prefix("-A NETWARDEN-SPARE-") {
            let (name, rule) = rest.split_once(' ').unwrap_or((rest, ""));
            out.entry(format!("NETWARDEN-SPARE-{name}"))
                .or_default()
                .push(format!("-A SPARE {rule}"));
        }
    }
    out
}

/// The handle nf_tables gave a chain (`nft -a`), if it exists.
pub fn chain_handle(ns: &Sandbox, chain: &str) -> Option<String> {
    let (ok, out) = exec(ns, &["nft", "-a", "list", "chain", "ip", "nat", chain]);
    if !ok {
        return None;
    }
    let head = out
        .lines()
        .find(|l| l.contains(&format!("chain {chain} ")))?;
    head.split("# handle ").nth(1).map(|h| h.trim().to_owned())
}

pub const FLANNEL_SPEC: &str = r#"  chains:
    - name: flannel-postrtg
      table: nat
      chain: FLANNEL-POSTRTG
      rules:
        - -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN
        - -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully
        - '! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN'
      jumps:
        - chain: POSTROUTING
          rule: -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG
          position: first
    - name: v6-forward
      family: ipv6
      table: filter
      chain: NW-FORWARD6
      rules: ["-s fd00:10:244::/56 -j ACCEPT"]
      jumps:
        - chain: FORWARD
          rule: -j NW-FORWARD6
"#;

pub const JUMP: &str = r#"-A POSTROUTING -m comment --comment "flanneld masq" -j FLANNEL-POSTRTG"#;

pub fn flannel_lines() -> Vec<String> {
    vec![
        r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d 10.244.0.0/16 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
        r#"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 -m comment --comment "flanneld masq" -j MASQUERADE --random-fully"#.to_owned(),
        r#"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.1.0/24 -m comment --comment "flanneld masq" -j RETURN"#.to_owned(),
    ]
}

pub fn chain_lines(lines: &[String], chain: &str) -> Vec<String> {
    lines
        .iter()
        .filter(|l| l.starts_with(&format!("-A {chain} ")))
        .cloned()
        .collect()
}
