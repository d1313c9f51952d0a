//! Chain images: taken, replayed, refused, dropped, and armed for the responder.

use super::*;
use crate::nftables::armed::Trigger;
use crate::nftables::model::{NfFamily, TableKey};

/// The flannel chain, `exact`, in sync, with an image taken of it (the fake's replay puts the
/// chain and its jump back as a restore would).
async fn flannel_with_image() -> Guard<FakeTools> {
    flannel_with_image_from(FakeTools::new()).await
}

/// [`flannel_with_image`] with these tools.
pub(super) async fn flannel_with_image_from(tools: FakeTools) -> Guard<FakeTools> {
    let g = flannel_with_image_from_unchecked(tools).await;
    assert_eq!(g.tools.with(|s| s.captures), 1, "taken once in sync");
    g
}

/// The flannel chain in sync, its image asked for once (the tools may refuse it).
pub(super) async fn flannel_with_image_from_unchecked(tools: FakeTools) -> Guard<FakeTools> {
    tools.with(|s| {
        s.image = Some(format!(
            "*nat\n:FLANNEL-POSTRTG - [0:0]\n{}-I POSTROUTING 1 -j FLANNEL-POSTRTG\nCOMMIT\n",
            RULES
                .iter()
                .map(|r| format!("-A FLANNEL-POSTRTG {r}\n"))
                .collect::<String>()
        ))
    });
    guard(tools, vec![flannel(Content::Exact, RULES)], vec![])
        .await
        .unwrap()
}

/// flannel's cleanup in one transaction, as the guard is told of it, ending at generation 5.
pub(super) async fn deleted_in_one_transaction(g: &mut Guard<FakeTools>) {
    g.tools.apply(
        Family::Ipv4,
        "*nat\n-D POSTROUTING -j FLANNEL-POSTRTG\n-F FLANNEL-POSTRTG\n-X FLANNEL-POSTRTG\nCOMMIT\n",
    );
    let touch = |chain: &str, object| NftEvent::Touch {
        family: Family::Ipv4,
        table: "nat".into(),
        chain: Some(chain.into()),
        removed: true,
        object,
    };
    let mut pending = Pending::new();
    let all: BTreeSet<TableId> = [NAT].into();
    for ev in [
        touch("POSTROUTING", Object::Rule),
        touch("FLANNEL-POSTRTG", Object::Rule),
        touch("FLANNEL-POSTRTG", Object::Chain),
        NftEvent::NewGen {
            gen: Some(5),
            pid: Some(7),
            process: Some("iptables-nft".into()),
        },
    ] {
        g.on_event(ev, &mut pending, &all).await;
    }
}

#[tokio::test]
async fn a_deleted_chain_with_an_image_is_put_back_from_it_not_restored() {
    let mut g = flannel_with_image().await;
    // The initial sync's own restore has come through.
    g.unseen.clear();
    let restores = g.tools.with(|s| s.restores.len());
    deleted_in_one_transaction(&mut g).await;
    assert_eq!(g.tools.with(|s| s.replays.clone()), [5]);
    assert_eq!(g.tools.with(|s| s.restores.len()), restores, "no restore");
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert_eq!(g.stats.chain_repairs, 2, "the initial sync's and this one");
    assert!(g.own.contains(&31337), "its own transaction is not drift");
}

#[tokio::test]
async fn a_refused_image_is_repaired_by_restore_and_not_tried_again() {
    let mut g = flannel_with_image().await;
    g.unseen.clear();
    g.tools
        .with(|s| s.replay_refused = Some(nix::errno::Errno::ENOENT));
    let restores = g.tools.with(|s| s.restores.len());
    deleted_in_one_transaction(&mut g).await;
    assert_eq!(g.tools.with(|s| s.replays.len()), 1);
    assert_eq!(
        g.tools.with(|s| s.restores.len()),
        restores + 1,
        "restored instead"
    );
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert_eq!(
        g.tools.with(|s| s.captures),
        1,
        "a refused image is not taken again until the chain changes"
    );
}

#[tokio::test]
async fn a_chain_changed_by_someone_else_loses_its_image() {
    let mut g = flannel_with_image().await;
    g.unseen.clear();
    let mut pending = Pending::new();
    let all: BTreeSet<TableId> = [NAT].into();
    g.tools
        .apply(Family::Ipv4, "*nat\n-A FLANNEL-POSTRTG -j RETURN\nCOMMIT\n");
    for ev in [
        NftEvent::Touch {
            family: Family::Ipv4,
            table: "nat".into(),
            chain: Some("FLANNEL-POSTRTG".into()),
            removed: false,
            object: Object::Rule,
        },
        NftEvent::NewGen {
            gen: Some(4),
            pid: Some(6),
            process: Some("iptables".into()),
        },
    ] {
        g.on_event(ev, &mut pending, &all).await;
    }
    // Repaired with a restore (the stranger removed), then verified: a new image is taken.
    assert_eq!(g.tools.with(|s| s.captures), 2);
    assert!(g.tools.with(|s| s.replays.is_empty()));
}

#[tokio::test]
async fn the_image_is_armed_at_the_generation_read_not_while_a_restore_is_unseen() {
    let mut g = flannel_with_image().await;
    // What the kernel's generation read as before subscribing (a unit test subscribes to
    // nothing).
    g.images.gen = Some(4);
    let trigger = Trigger::ChainGone {
        table: TableKey {
            family: NfFamily::Ip,
            name: "nat".into(),
        },
        chain: "FLANNEL-POSTRTG".into(),
    };
    // The initial sync's own restore has not been seen yet.
    g.arm_images();
    assert_eq!(g.tools.with(|s| s.armed.clone()), Some((Some(4), vec![])));
    g.unseen.clear();
    g.arm_images();
    assert_eq!(
        g.tools.with(|s| s.armed.clone()),
        Some((Some(4), vec![trigger]))
    );
    // Given up on: nothing armed.
    deleted_in_one_transaction(&mut g).await;
    g.ledger.give_up("flannel");
    g.arm_images();
    assert_eq!(g.tools.with(|s| s.armed.clone()), Some((Some(5), vec![])));
}

#[tokio::test]
async fn a_chain_the_responder_put_back_only_partly_is_read_not_restored_blind() {
    let mut g = flannel_with_image().await;
    g.unseen.clear();
    g.tools.with(|s| s.replay_partly = true);
    let restores = g.tools.with(|s| s.restores.len());
    let reads = g.tools.with(|s| s.table_reads);
    deleted_in_one_transaction(&mut g).await;
    assert_eq!(g.tools.with(|s| s.table_reads), reads + 1, "read");
    assert_eq!(
        g.tools.with(|s| s.restores.len()),
        restores,
        "no restore from the notifications alone"
    );
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
}
