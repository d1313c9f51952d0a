//! The guard's decisions against fake tools ([`crate::netfilter::fake`]): fights, spelling,
//! repairs from notifications alone, sets recreated as they were, failures.

use super::chains::Cause;
use super::*;
use crate::model::Family;
use crate::netfilter::blind::Touches;
use crate::netfilter::events::{NftEvent, Object};
use crate::netfilter::fake::{FakeSet, FakeTools};
use crate::netfilter::model::{Content, Jump, Member, Position, SetOptions, SetType};
use crate::netfilter::rulespec::RuleSpec;
use crate::telemetry::status::State;

const NAT: TableId = TableId {
    family: Family::Ipv4,
    table: Table::Nat,
};

fn r(s: &str) -> RuleSpec {
    RuleSpec::parse(s).unwrap()
}

fn flannel(content: Content, rules: &[&str]) -> DesiredChain {
    DesiredChain {
        name: "flannel".into(),
        mode: Mode::Enforce,
        key: ChainKey {
            family: Family::Ipv4,
            table: Table::Nat,
            chain: "FLANNEL-POSTRTG".into(),
        },
        rules: rules.iter().map(|s| r(s)).collect(),
        content,
        jumps: vec![Jump {
            chain: "POSTROUTING".into(),
            rule: r("-j FLANNEL-POSTRTG"),
            position: Position::First,
        }],
    }
}

const RULES: &[&str] = &[
    "-s 10.244.0.0/16 -d 10.244.0.0/16 -j RETURN",
    "-s 10.244.0.0/16 -j MASQUERADE",
];

fn intact() -> Vec<String> {
    RULES.iter().map(|s| s.to_string()).collect()
}

/// The flannel chain, `exact`, in sync.
async fn exact_flannel() -> Guard<FakeTools> {
    guard(
        FakeTools::new(),
        vec![flannel(Content::Exact, RULES)],
        vec![],
    )
    .await
    .unwrap()
}

async fn guard(
    tools: FakeTools,
    chains: Vec<DesiredChain>,
    sets: Vec<DesiredSet>,
) -> Result<Guard<FakeTools>, GuardError> {
    // Legacy: no notification socket in a unit test; notifications are fed by hand.
    let canon = Canonicaliser::new(BackendChoice::Legacy);
    let times = (Duration::from_secs(1), Duration::from_secs(60));
    Guard::start_with(tools, canon, chains, sets, times, Adoption::default()).await
}

fn telemetry(g: Guard<FakeTools>) -> (Guard<FakeTools>, Arc<Telemetry>) {
    let t = Telemetry::new();
    (g.with_telemetry(t.clone()), t)
}

fn state_of(t: &Telemetry, name: &str) -> Option<State> {
    t.board()
        .status()
        .objects
        .into_iter()
        .find(|o| o.name == name)
        .map(|o| o.state)
}

#[tokio::test]
async fn initial_sync_places_the_chain_and_its_jump() {
    let g = exact_flannel().await;
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert_eq!(
        g.tools.chain(NAT, "POSTROUTING"),
        Some(vec!["-j FLANNEL-POSTRTG".to_owned()])
    );
    assert_eq!(g.tools.with(|s| s.restores.len()), 1, "one transaction");
}

#[tokio::test]
async fn a_flush_fight_is_contested_held_back_and_repaired_when_it_stops() {
    let g = exact_flannel().await;
    let (mut g, t) = telemetry(g);
    let (tx, mut notices) = tokio::sync::mpsc::unbounded_channel();
    t.set_notices(tx);
    let flush = "*nat\n-F FLANNEL-POSTRTG\nCOMMIT\n";
    let t0 = Instant::now();
    // Twenty flushes, each right after the previous repair (as fast as the loop turns).
    g.actor = Some("iptables".into());
    let mut held = 0;
    for _ in 0..20 {
        g.tools.apply(Family::Ipv4, flush);
        let before = g.tools.with(|s| s.restores.len());
        g.sync_table(NAT, Cause::Drift, None).await;
        if g.tools.with(|s| s.restores.len()) == before {
            held += 1;
        }
    }
    assert!(held >= 15, "repairs held back during the fight: {held}");
    assert!(g.ledger.is_contested("flannel"));
    assert!(
        !g.ledger.gave_up("flannel"),
        "a fight never turns protection off"
    );
    assert_eq!(g.ledger.fighter("flannel"), Some("iptables"));
    assert_eq!(state_of(&t, "flannel"), Some(State::Contested));
    let status = t.board().status();
    let o = status.objects.iter().find(|o| o.name == "flannel").unwrap();
    assert_eq!(o.fighter.as_deref(), Some("iptables"));
    let deferred = t
        .metrics
        .repairs_deferred
        .get_or_create(&crate::telemetry::metrics::KindLabels { kind: "chain" })
        .get();
    assert!(deferred >= 1);
    assert!(
        t.board()
            .contested_by_actor()
            .contains_key(&("chain", "iptables".into())),
        "the contested gauge names the fighter"
    );
    let mut contested = 0;
    while let Ok(n) = notices.try_recv() {
        if matches!(n, crate::telemetry::Notice::Contested { kind, .. } if kind == "chain") {
            contested += 1;
        }
    }
    assert_eq!(contested, 1, "told once");
    // The fight stops: the held-back repair comes due and goes through.
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(vec![]));
    g.actor = None;
    let due = g.ledger.next_deadline().expect("a retry is scheduled");
    assert!(
        due <= Instant::now() + Duration::from_secs(1),
        "within the quiet period"
    );
    // As the loop does: sleep until the next deadline, poll, again (a deadline is a lower bound
    // that the poll makes exact).
    let mut polls = 0;
    while g.tools.chain(NAT, "FLANNEL-POSTRTG") != Some(intact()) {
        let due = g.ledger.next_deadline().expect("a retry is scheduled");
        tokio::time::sleep_until(tokio::time::Instant::from_std(due)).await;
        g.on_backoff_timer().await;
        polls += 1;
        assert!(polls < 20, "not repaired after {polls} polls");
    }
    assert!(Instant::now() <= t0 + Duration::from_secs(5));
}

#[tokio::test]
async fn a_change_between_a_repair_and_its_read_is_drift_not_a_spelling() {
    let g = exact_flannel().await;
    // Someone deletes the jump, then flushes the chain right after the agent put the jump back
    // (`iptables -D …; iptables -F …` in two transactions).
    g.tools.apply(
        Family::Ipv4,
        "*nat\n-D POSTROUTING -j FLANNEL-POSTRTG\nCOMMIT\n",
    );
    g.tools.with(|s| {
        s.after_restore = Some(Box::new(|s| {
            s.run(Family::Ipv4, "*nat\n-F FLANNEL-POSTRTG\nCOMMIT\n");
            false
        }))
    });
    let mut g = g;
    g.sync_table(NAT, Cause::Drift, None).await;
    assert!(!g.ledger.gave_up("flannel"), "not a rule printed otherwise");
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
}

#[tokio::test]
async fn occasional_flushes_are_repaired_at_once() {
    let mut g = exact_flannel().await;
    // Below the contest threshold every removal is repaired at once.
    for _ in 0..3 {
        g.tools
            .apply(Family::Ipv4, "*nat\n-F FLANNEL-POSTRTG\nCOMMIT\n");
        g.sync_table(NAT, Cause::Drift, None).await;
        assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    }
    assert!(!g.ledger.is_contested("flannel"));
}

#[tokio::test]
async fn a_rule_printed_otherwise_is_never_appended_twice() {
    // The kernel already holds the rule as iptables prints it.
    let tools = FakeTools::new();
    tools.apply(
        Family::Ipv4,
        "*nat\n:KUBE-ROUTER-INPUT - [0:0]\n-A KUBE-ROUTER-INPUT -p tcp --dport 80 -j ACCEPT\nCOMMIT\n",
    );
    let mut c = flannel(Content::Contains, &["-p tcp --dport 80 -j ACCEPT"]);
    c.key.chain = "KUBE-ROUTER-INPUT".into();
    c.jumps.clear();
    let g = guard(tools, vec![c], vec![]).await.unwrap();
    assert_eq!(
        g.tools.chain(NAT, "KUBE-ROUTER-INPUT"),
        Some(vec!["-p tcp -m tcp --dport 80 -j ACCEPT".to_owned()]),
        "compared in printed form: nothing appended"
    );
    assert!(g.tools.with(|s| s.restores.is_empty()));
    assert_eq!(
        g.chains[0].rules[0],
        r("-p tcp -m tcp --dport 80 -j ACCEPT")
    );
}

#[tokio::test]
async fn a_rule_that_cannot_be_made_canonical_refuses_the_start() {
    let c = flannel(
        Content::Contains,
        &["-s 10.0.0.1,10.0.0.2 -j RETURN", "-m bogus -j ACCEPT"],
    );
    let Err(GuardError::Refused(r)) = guard(FakeTools::new(), vec![c], vec![]).await else {
        panic!("expected a refusal");
    };
    assert_eq!(r.len(), 2, "{r:?}");
    let text = GuardError::Refused(r).to_string();
    assert!(
        text.contains(
            "iptables makes 2 rules of it (`-s 10.0.0.1/32 -j RETURN`, `-s 10.0.0.2/32 -j RETURN`)"
        ),
        "{text}"
    );
    assert!(
        text.contains("spec.chains[0].rules[1]") && text.contains("bogus"),
        "{text}"
    );
}

/// Past what the fallback normalises: conntrack prints its states in its own order.
const CT_WRITTEN: &str = "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT";
const CT_PRINTED: &str = "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT";

fn reload(chains: Vec<DesiredChain>) -> GuardReload {
    GuardReload {
        chains,
        sets: vec![],
        adopt: vec![],
        poll: Duration::from_secs(1),
        resync: Duration::from_secs(60),
    }
}

#[tokio::test]
async fn without_a_scratch_namespace_the_core_options_are_still_compared_as_printed() {
    let tools = FakeTools::new();
    tools.with(|s| s.no_scratch = true);
    let c = flannel(
        Content::Contains,
        &["-s 10.0.0.9 -p tcp --dport 80 -j RETURN"],
    );
    let g = guard(tools, vec![c], vec![]).await.unwrap();
    assert!(!g.ledger.gave_up("flannel"));
    assert_eq!(
        g.tools.chain(NAT, "FLANNEL-POSTRTG"),
        Some(vec![
            "-s 10.0.0.9/32 -p tcp -m tcp --dport 80 -j RETURN".to_owned()
        ])
    );
}

#[tokio::test]
async fn without_a_scratch_namespace_a_rule_printed_otherwise_is_given_up_until_a_reload() {
    let tools = FakeTools::new();
    tools.with(|s| s.no_scratch = true);
    let c = flannel(Content::Contains, &[CT_WRITTEN]);
    let g = guard(tools, vec![c.clone()], vec![]).await.unwrap();
    let (mut g, t) = telemetry(g);
    // Appended once (the initial sync), read back printed otherwise: given up, not appended
    // again at every read.
    assert!(g.ledger.gave_up("flannel"));
    for _ in 0..3 {
        g.sync_table(NAT, Cause::Drift, None).await;
    }
    assert_eq!(
        g.tools.chain(NAT, "FLANNEL-POSTRTG"),
        Some(vec![CT_PRINTED.to_owned()]),
        "one copy only"
    );
    assert_eq!(state_of(&t, "flannel"), Some(State::Drifted));
    // The operator writes it as printed and reloads: protected again.
    let mut fixed = c.clone();
    fixed.rules = vec![r(CT_PRINTED)];
    g.reload(reload(vec![fixed])).await.unwrap();
    assert!(!g.ledger.gave_up("flannel"));
    g.tools
        .apply(Family::Ipv4, "*nat\n-F FLANNEL-POSTRTG\nCOMMIT\n");
    g.sync_table(NAT, Cause::Drift, None).await;
    assert_eq!(
        g.tools.chain(NAT, "FLANNEL-POSTRTG"),
        Some(vec![CT_PRINTED.to_owned()])
    );
    assert_eq!(state_of(&t, "flannel"), Some(State::InSync));
}

#[tokio::test]
async fn a_reload_with_the_same_chains_re_affirms_them() {
    let tools = FakeTools::new();
    tools.with(|s| s.no_scratch = true);
    let c = flannel(Content::Contains, &[CT_WRITTEN]);
    let mut g = guard(tools, vec![c.clone()], vec![]).await.unwrap();
    assert!(g.ledger.gave_up("flannel"));
    let restores = g.tools.with(|s| s.restores.len());
    g.reload(reload(vec![c])).await.unwrap();
    // Repaired again once (the rule is still spelled otherwise, so it is given up again).
    assert_eq!(g.tools.with(|s| s.restores.len()), restores + 1);
    assert!(g.ledger.gave_up("flannel"));
}

#[tokio::test]
async fn a_deleted_chain_is_written_back_before_the_table_is_read() {
    let mut g = exact_flannel().await;
    g.tools.apply(
        Family::Ipv4,
        "*nat\n-D POSTROUTING -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n",
    );
    let mut touches = Touches::default();
    touches.add(Some("POSTROUTING"), Object::Rule, true);
    touches.add(Some("FLANNEL-POSTRTG"), Object::Rule, true);
    touches.add(Some("FLANNEL-POSTRTG"), Object::Chain, true);
    let reads = g.tools.with(|s| s.table_reads);
    let applied = g.repair_blind(NAT, &touches, &BTreeSet::new()).await;
    assert!(applied.is_some());
    assert_eq!(
        g.tools.with(|s| s.table_reads),
        reads,
        "no read before the repair"
    );
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    // The read that follows verifies it, and finds nothing more to do.
    let restores = g.tools.with(|s| s.restores.len());
    g.sync_table(NAT, Cause::Drift, applied).await;
    assert_eq!(g.tools.with(|s| s.table_reads), reads + 1);
    assert_eq!(g.tools.with(|s| s.restores.len()), restores);
    assert_eq!(
        g.tools.chain(NAT, "POSTROUTING"),
        Some(vec!["-j FLANNEL-POSTRTG".to_owned()])
    );
}

/// The notifications of a transaction that committed before one of the agent's own restores
/// (its NEWGEN still ahead in the socket) are no longer the whole story: no repair from them
/// alone, or a jump the restore already put back would be inserted twice.
#[tokio::test]
async fn notifications_older_than_an_own_restore_are_only_read() {
    let mut g = exact_flannel().await;
    let delete =
        "*nat\n-D POSTROUTING -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n";
    g.tools.apply(Family::Ipv4, delete);
    // Repaired by a read (a poll, or another transaction's) before its notifications are taken.
    g.sync_table(NAT, Cause::Drift, None).await;
    assert_eq!(g.tools.with(|s| s.restores.len()), 2);
    let touch = |chain: &str, object, removed| NftEvent::Touch {
        family: Family::Ipv4,
        table: "nat".into(),
        chain: Some(chain.into()),
        removed,
        object,
    };
    let mut pending = Pending::new();
    let all: BTreeSet<TableId> = [NAT].into();
    for ev in [
        touch("POSTROUTING", Object::Rule, true),
        touch("FLANNEL-POSTRTG", Object::Rule, true),
        touch("FLANNEL-POSTRTG", Object::Chain, true),
        NftEvent::NewGen {
            gen: None,
            pid: Some(7),
            process: Some("iptables-nft".into()),
        },
    ] {
        g.on_event(ev, &mut pending, &all).await;
    }
    assert_eq!(
        g.tools.chain(NAT, "POSTROUTING"),
        Some(vec!["-j FLANNEL-POSTRTG".to_owned()]),
        "one jump"
    );
    assert_eq!(g.tools.with(|s| s.restores.len()), 2, "nothing to repair");
    // Once the own restores' NEWGENs have come through (the initial sync's and the repair's), a
    // deletion is repaired from its notifications again.
    let mut pending = Pending::new();
    for own in g.own.clone() {
        let ev = NftEvent::NewGen {
            gen: None,
            pid: Some(own),
            process: None,
        };
        g.on_event(ev, &mut pending, &all).await;
    }
    assert!(g.unseen.is_empty());
    g.tools.apply(Family::Ipv4, delete);
    let reads = g.tools.with(|s| s.table_reads);
    g.on_event(
        touch("FLANNEL-POSTRTG", Object::Chain, true),
        &mut pending,
        &all,
    )
    .await;
    g.on_event(
        NftEvent::NewGen {
            gen: None,
            pid: Some(8),
            process: Some("iptables-nft".into()),
        },
        &mut pending,
        &all,
    )
    .await;
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert_eq!(
        g.tools.chain(NAT, "POSTROUTING"),
        Some(vec!["-j FLANNEL-POSTRTG".to_owned()])
    );
    assert_eq!(
        g.tools.with(|s| s.table_reads),
        reads + 1,
        "the verifying read"
    );
}

#[tokio::test]
async fn a_refused_repair_is_logged_once_and_retried_at_the_next_change() {
    let g = exact_flannel().await;
    let (mut g, t) = telemetry(g);
    g.tools
        .apply(Family::Ipv4, "*nat\n-F FLANNEL-POSTRTG\nCOMMIT\n");
    g.tools
        .with(|s| s.fail_restore = Some("Set kube-router-x doesn't exist.".into()));
    g.sync_table(NAT, Cause::Drift, None).await;
    assert_eq!(state_of(&t, "flannel"), Some(State::Drifted));
    assert!(
        !g.ledger.failing("flannel", &g_error()),
        "the error is remembered"
    );
    g.sync_table(NAT, Cause::Drift, None).await;
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert_eq!(state_of(&t, "flannel"), Some(State::InSync));
}

#[tokio::test]
async fn a_refused_repair_is_retried_by_itself_when_nothing_else_changes() {
    let mut g = exact_flannel().await;
    g.tools
        .apply(Family::Ipv4, "*nat\n-F FLANNEL-POSTRTG\nCOMMIT\n");
    g.tools
        .with(|s| s.fail_restore = Some("Chain 'CNI-DN-1' does not exist".into()));
    g.sync_table(NAT, Cause::Drift, None).await;
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(vec![]));
    // The guard's timer is set for the retry, with no notification to wake it.
    let due = g.ledger.next_deadline().expect("a retry");
    assert!(due > Instant::now(), "later, not at once");
    g.on_backoff_timer().await;
    assert_eq!(
        g.tools.chain(NAT, "FLANNEL-POSTRTG"),
        Some(vec![]),
        "not yet"
    );
    // Its time has come (as the timer would fire): read again and repaired.
    g.ledger
        .retry_failed("flannel", Instant::now() - Duration::from_secs(120));
    g.on_backoff_timer().await;
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    let record = g.ledger.get("flannel").unwrap();
    assert_eq!(
        (record.retry_due, record.retry_delay),
        (None, None),
        "nothing more to retry"
    );
}

fn g_error() -> String {
    "`iptables-restore ` failed (exit status: 1): Set kube-router-x doesn't exist.".into()
}

fn svip(options: SetOptions) -> DesiredSet {
    DesiredSet {
        name: "svip".into(),
        mode: Mode::Enforce,
        set: "kube-router-svip".into(),
        kind: SetType::HashIp,
        family: Family::Ipv4,
        options,
        members: vec![Member::parse("10.0.0.1").unwrap()],
        membership: Content::Contains,
        forbidden: vec![],
    }
}

#[tokio::test]
async fn a_destroyed_set_is_recreated_with_the_options_it_had() {
    let tools = FakeTools::new();
    let words = |s: &str| s.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
    tools.with(|s| {
        s.sets.insert(
            "kube-router-svip".into(),
            FakeSet {
                kind: "hash:ip".into(),
                family: "inet".into(),
                options: words("hashsize 1024 maxelem 65536 timeout 0 bucketsize 12 initval 0x99"),
                members: ["10.0.0.1".to_owned()].into(),
            },
        )
    });
    let mut g = guard(tools, vec![], vec![svip(SetOptions::default())])
        .await
        .unwrap();
    g.tools.with(|s| s.sets.clear());
    g.sync_sets(false).await;
    let set = g.tools.with(|s| s.sets["kube-router-svip"].clone());
    assert_eq!(
        set.options,
        words("hashsize 1024 maxelem 65536 timeout 0 bucketsize 12"),
        "timeout support kept: `ipset add … timeout 0` still works"
    );
    assert_eq!(set.members, ["10.0.0.1".to_owned()].into());
}

#[tokio::test]
async fn a_set_never_seen_is_created_with_the_configured_options_and_others_are_reported() {
    let opts = SetOptions {
        timeout: Some(0),
        comment: Some(true),
        ..SetOptions::default()
    };
    let g = guard(FakeTools::new(), vec![], vec![svip(opts.clone())])
        .await
        .unwrap();
    let set = g.tools.with(|s| s.sets["kube-router-svip"].clone());
    assert_eq!(set.options, ["timeout", "0", "comment"]);
    // A set made by someone else without them: reported, members still kept, never destroyed.
    g.tools.with(|s| {
        let set = s.sets.get_mut("kube-router-svip").unwrap();
        set.options.clear();
        set.members.clear();
    });
    let (mut g, t) = telemetry(g);
    g.sync_sets(false).await;
    assert_eq!(
        g.tools.with(|s| s.sets["kube-router-svip"].members.clone()),
        ["10.0.0.1".to_owned()].into()
    );
    assert_eq!(state_of(&t, "svip"), Some(State::Drifted));
    let restores = g.tools.with(|s| s.ipset_restores.len());
    g.sync_sets(false).await;
    assert_eq!(
        g.tools.with(|s| s.ipset_restores.len()),
        restores,
        "nothing to repair: the options stay reported"
    );
}

mod images;
mod spares;
