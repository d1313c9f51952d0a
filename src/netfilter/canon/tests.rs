use super::print::*;
use super::*;
use crate::model::Mode;
use crate::netfilter::fake::FakeTools;
use crate::netfilter::model::{ChainKey, Content, Jump, Position, Table};

const NAT: TableId = TableId {
    family: Family::Ipv4,
    table: Table::Nat,
};

fn r(s: &str) -> RuleSpec {
    RuleSpec::parse(s).unwrap()
}

fn chain(rules: &[&str], jump: &str) -> DesiredChain {
    DesiredChain {
        name: "c".into(),
        mode: Mode::Enforce,
        key: ChainKey {
            family: Family::Ipv4,
            table: Table::Nat,
            chain: "NW-C".into(),
        },
        rules: rules.iter().map(|s| r(s)).collect(),
        content: Content::Contains,
        jumps: vec![Jump {
            chain: "POSTROUTING".into(),
            rule: r(jump),
            position: Position::First,
        }],
    }
}

#[tokio::test]
async fn rules_are_rewritten_as_printed_and_the_result_is_cached() {
    let tools = FakeTools::new();
    let canon = Canonicaliser::new(BackendChoice::Nft);
    let c = chain(
        &["-p tcp --dport 80 -j ACCEPT", "-s 10.0.0.0/8 -j RETURN"],
        "-s 10.1.1.1 -j NW-C",
    );
    let out = canon
        .canonicalise(&tools, std::slice::from_ref(&c), &[])
        .await;
    assert!(
        out.refused.is_empty() && out.unavailable.is_none(),
        "{out:?}"
    );
    assert_eq!(
        out.chains[0].rules[0],
        r("-p tcp -m tcp --dport 80 -j ACCEPT")
    );
    assert_eq!(out.chains[0].rules[1], c.rules[1], "already canonical");
    assert_eq!(out.chains[0].jumps[0].rule, r("-s 10.1.1.1/32 -j NW-C"));
    assert_eq!(out.rewritten.len(), 2);
    assert_eq!(out.rewritten[0].site.to_string(), "spec.chains[0].rules[0]");
    assert_eq!(
        out.rewritten[1].site.to_string(),
        "spec.chains[0].jumps[0].rule"
    );
    // Printed, then the printed forms printed again (stable): two runs; none the second time.
    assert_eq!(tools.with(|s| s.scratch_runs), 2);
    let again = canon.canonicalise(&tools, &[c], &[]).await;
    assert_eq!(again, out);
    assert_eq!(tools.with(|s| s.scratch_runs), 2, "cached");
}

#[tokio::test]
async fn refused_rules_are_named_and_the_rest_goes_through() {
    let tools = FakeTools::new();
    let canon = Canonicaliser::new(BackendChoice::Nft);
    let c = chain(
        &[
            "-s 10.0.0.1 -j RETURN",
            "-m bogus -j ACCEPT",
            "-s 10.0.0.1,10.0.0.2 -j RETURN",
            // Jumps to a chain netwarden does not know: declared in the scratch table.
            "-j KUBE-MARK-MASQ",
        ],
        "-j NW-C",
    );
    let out = canon.canonicalise(&tools, &[c], &[]).await;
    let why: Vec<(String, &str)> = out
        .refused
        .iter()
        .map(|r| (r.site.to_string(), r.why.as_str()))
        .collect();
    assert_eq!(why.len(), 2, "{why:?}");
    assert!(why
        .iter()
        .any(|(s, w)| s == "spec.chains[0].rules[1]" && w.contains("Couldn't load match `bogus'")));
    assert!(
        why.iter()
            .any(|(s, w)| s == "spec.chains[0].rules[2]"
                && w.contains("iptables makes 2 rules of it"))
    );
    assert_eq!(out.chains[0].rules[0], r("-s 10.0.0.1/32 -j RETURN"));
    assert_eq!(out.chains[0].rules[3], r("-j KUBE-MARK-MASQ"));
}

#[tokio::test]
async fn sets_the_rules_match_on_exist_in_the_scratch_namespace() {
    let tools = FakeTools::new();
    let canon = Canonicaliser::new(BackendChoice::Nft);
    let c = chain(
        &["-m set --match-set kube-router-svip dst,dst -j ACCEPT"],
        "-j NW-C",
    );
    let out = canon.canonicalise(&tools, &[c], &[]).await;
    assert!(out.refused.is_empty(), "{out:?}");
}

#[tokio::test]
async fn without_a_scratch_namespace_only_the_core_options_are_normalised() {
    let tools = FakeTools::new();
    tools.with(|s| s.no_scratch = true);
    let canon = Canonicaliser::new(BackendChoice::Nft);
    let c = chain(
        &[
            "-p tcp --dport 80 -j ACCEPT",
            "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT",
        ],
        "-j NW-C",
    );
    let out = canon
        .canonicalise(&tools, std::slice::from_ref(&c), &[])
        .await;
    assert_eq!(
        out.chains[0].rules[0],
        r("-p tcp -m tcp --dport 80 -j ACCEPT")
    );
    assert_eq!(
        out.chains[0].rules[1], c.rules[1],
        "an extension's spelling: as written"
    );
    assert_eq!(out.rewritten.len(), 1);
    assert!(out.unavailable.is_some());
    assert!(canon.unavailable().is_some());
    // Not tried again.
    tools.with(|s| s.no_scratch = false);
    let again = canon.canonicalise(&tools, &[c], &[]).await;
    assert_eq!(again, out);
    assert_eq!(tools.with(|s| s.scratch_runs), 0);
}

#[test]
fn scratch_input_and_messages() {
    let chains: BTreeSet<String> = ["KUBE-MARK-MASQ".to_owned()].into();
    let (input, first) = scratch_input(NAT, &[r("-j ACCEPT"), r("-j KUBE-MARK-MASQ")], &chains);
    assert_eq!(
        input,
        "*nat\n:NW-RULE-0 - [0:0]\n:NW-RULE-1 - [0:0]\n:KUBE-MARK-MASQ - [0:0]\n\
         -A NW-RULE-0 -j ACCEPT\n-A NW-RULE-1 -j KUBE-MARK-MASQ\nCOMMIT\n"
    );
    assert_eq!(input.lines().nth(first - 1), Some("-A NW-RULE-0 -j ACCEPT"));
    assert_eq!(
        missing_chain("iptables-nft-restore v1.8.9 (nf_tables): Chain 'KUBE-X' does not exist"),
        Some("KUBE-X".into())
    );
    assert_eq!(
        missing_chain("iptables-restore v1.8.9 (legacy): Couldn't load target `KUBE-X':No such file or directory"),
        Some("KUBE-X".into())
    );
    assert_eq!(
        missing_set("iptables-restore v1.8.9 (legacy): Set kube-router-svip doesn't exist."),
        Some("kube-router-svip".into())
    );
    assert_eq!(
        error_line("x\nError occurred at line: 14\nTry `iptables-restore -h'"),
        Some(14)
    );
    assert_eq!(
        first_message("iptables-restore v1.8.9 (legacy): Couldn't load match `bogus':No such file\n\nError occurred at line: 3"),
        "Couldn't load match `bogus':No such file"
    );
    assert_eq!(
        set_refs(&r(
            "-m set --match-set a src,dst -m set ! --match-set b dst -j X"
        )),
        vec![("a".into(), 2), ("b".into(), 1)]
    );
}
