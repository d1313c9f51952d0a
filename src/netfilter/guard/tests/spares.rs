//! Spares: made once the image is taken, armed and replayed instead of the image, made again
//! after use or after someone touched them, given up for the image when refused, deleted when
//! no longer needed.

use super::images::{
    deleted_in_one_transaction, flannel_with_image_from, flannel_with_image_from_unchecked,
};
use super::*;

const SPARE: &str = "NETWARDEN-SPARE-";

/// The flannel chain with an image whose rules hold xtables extensions; the initial sync's own
/// restore seen, the kernel at generation 4.
async fn flannel_with_spares() -> Guard<FakeTools> {
    let tools = FakeTools::new();
    tools.with(|s| s.spares = true);
    let mut g = flannel_with_image_from(tools).await;
    g.unseen.clear();
    g.images.gen = Some(4);
    g
}

/// The spares made so far: (name, generation).
fn made(g: &Guard<FakeTools>) -> Vec<(String, u32)> {
    g.tools.with(|s| s.spares_made.clone())
}

#[tokio::test]
async fn a_spare_is_made_once_the_image_is_taken_then_armed_instead_of_the_image() {
    let mut g = flannel_with_spares().await;
    g.make_spare();
    let spares = made(&g);
    assert_eq!(spares.len(), 1);
    assert!(spares[0].0.starts_with(SPARE), "{spares:?}");
    assert_eq!(spares[0].1, 4, "at the generation read");
    assert!(g.own.contains(&4242), "its transaction is the guard's own");
    // One at a time, and nothing armed until that transaction has come through.
    g.make_spare();
    assert_eq!(made(&g).len(), 1, "not twice");
    g.arm_images();
    assert_eq!(g.tools.with(|s| s.armed.clone()), Some((Some(4), vec![])));
    g.on_event(
        NftEvent::NewGen {
            gen: Some(5),
            pid: Some(4242),
            process: Some("netwarden".into()),
        },
        &mut Pending::new(),
        &[NAT].into(),
    )
    .await;
    g.arm_images();
    let armed = g.tools.with(|s| s.armed.clone()).unwrap();
    assert_eq!((armed.0, armed.1.len()), (Some(5), 1));
    assert!(
        Arc::ptr_eq(
            g.images.best("flannel").unwrap(),
            &g.images.spares["flannel"].swap
        ),
        "the swap is what a deletion puts back"
    );
}

#[tokio::test]
async fn a_deleted_chain_is_put_back_from_its_spare_and_a_new_spare_is_made() {
    let mut g = flannel_with_spares().await;
    g.make_spare();
    g.unseen.clear();
    let restores = g.tools.with(|s| s.restores.len());
    deleted_in_one_transaction(&mut g).await;
    // The swap: the rename and the jump, two messages (the image has three).
    assert_eq!(g.tools.with(|s| s.replayed.clone()), [vec![2]]);
    assert_eq!(g.tools.with(|s| s.restores.len()), restores, "no restore");
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert!(!g.images.spares.contains_key("flannel"), "used up");
    g.unseen.clear();
    g.make_spare();
    assert_eq!(made(&g).len(), 2, "made again");
}

#[tokio::test]
async fn a_refused_spare_is_given_up_for_the_image_at_once() {
    let mut g = flannel_with_spares().await;
    g.make_spare();
    g.unseen.clear();
    g.tools
        .with(|s| s.replay_refused_once = Some(nix::errno::Errno::ENOENT));
    let restores = g.tools.with(|s| s.restores.len());
    deleted_in_one_transaction(&mut g).await;
    assert_eq!(
        g.tools.with(|s| s.replayed.clone()),
        [vec![2], vec![3]],
        "the swap refused, then the image"
    );
    assert_eq!(
        g.tools.with(|s| s.replays.clone()),
        [5, 5],
        "both at the deletion's generation"
    );
    assert_eq!(g.tools.with(|s| s.restores.len()), restores, "no restore");
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
    assert!(g.images.by_chain.contains_key("flannel"), "the image kept");
    g.unseen.clear();
    g.make_spare();
    assert_eq!(made(&g).len(), 2, "the spare made again");
}

#[tokio::test]
async fn a_spare_someone_else_touched_is_made_again_a_little_later_and_not_put_back() {
    let mut g = flannel_with_spares().await;
    g.make_spare();
    g.unseen.clear();
    let spare = made(&g)[0].0.clone();
    let mut pending = Pending::new();
    for ev in [
        NftEvent::Touch {
            family: Family::Ipv4,
            table: "nat".into(),
            chain: Some(spare.clone()),
            removed: true,
            object: Object::Rule,
        },
        NftEvent::NewGen {
            gen: Some(5),
            pid: Some(6),
            process: Some("iptables".into()),
        },
    ] {
        g.on_event(ev, &mut pending, &[NAT].into()).await;
    }
    assert!(!g.images.spares.contains_key("flannel"));
    assert!(
        Arc::ptr_eq(
            g.images.best("flannel").unwrap(),
            &g.images.by_chain["flannel"]
        ),
        "the image until the spare is made again"
    );
    g.make_spare();
    assert_eq!(made(&g).len(), 1, "not at once: another agent's, say");
    let long_ago = Instant::now() - crate::netfilter::guard::images::SPARE_AGAIN_AFTER;
    g.images.spare_touched.insert("flannel".into(), long_ago);
    g.make_spare();
    assert_eq!(made(&g), [(spare.clone(), 4), (spare, 5)]);
}

#[tokio::test]
async fn rules_the_kernel_refuses_as_dumped_get_neither_spare_nor_image() {
    let mut g = flannel_with_spares().await;
    g.tools
        .with(|s| s.spare_refused = Some(nix::errno::Errno::EINVAL));
    g.make_spare();
    assert!(
        !g.images.by_chain.contains_key("flannel"),
        "no image either"
    );
    assert!(g.images.unfit.contains_key("flannel"), "not taken again");
    // A deletion is then put back with iptables-restore, not tried from an image.
    let restores = g.tools.with(|s| s.restores.len());
    deleted_in_one_transaction(&mut g).await;
    assert!(g.tools.with(|s| s.replays.is_empty()));
    assert_eq!(g.tools.with(|s| s.restores.len()), restores + 1);
    assert_eq!(g.tools.chain(NAT, "FLANNEL-POSTRTG"), Some(intact()));
}

#[tokio::test]
async fn a_spare_refused_otherwise_leaves_the_image() {
    let mut g = flannel_with_spares().await;
    g.tools
        .with(|s| s.spare_refused = Some(nix::errno::Errno::ENOMEM));
    g.make_spare();
    g.make_spare();
    assert!(g.images.by_chain.contains_key("flannel"));
    assert!(g.images.no_spare.contains_key("flannel"), "not tried again");
    deleted_in_one_transaction(&mut g).await;
    assert_eq!(g.tools.with(|s| s.replayed.clone()), [vec![3]], "the image");
}

#[tokio::test]
async fn no_spare_for_rules_without_extensions() {
    // The plain fake image: a chain without rules, nothing a spare would save.
    let mut g = flannel_with_image_from(FakeTools::new()).await;
    g.unseen.clear();
    g.images.gen = Some(4);
    g.make_spare();
    g.make_spare();
    assert!(made(&g).is_empty());
    assert!(g.images.no_spare.contains_key("flannel"));
}

#[tokio::test]
async fn only_this_guards_spares_are_deleted_at_reload_and_when_it_stops() {
    let mut g = flannel_with_spares().await;
    let spare = crate::netfilter::guard::spares::spare_name(&g.chains[0]);
    let dropped = |g: &Guard<FakeTools>| g.tools.with(|s| s.spares_dropped.clone());
    // Another agent's spares are not this one's to delete: none at start.
    assert_eq!(dropped(&g), []);
    let reload = |chains| GuardReload {
        chains,
        sets: vec![],
        adopt: vec![],
        poll: Duration::from_secs(1),
        resync: Duration::from_secs(60),
    };
    // The chain's rules changed: the same spare, made again (replaced) later.
    g.reload(reload(vec![flannel(Content::Exact, &RULES[..1])]))
        .await
        .unwrap();
    assert_eq!(dropped(&g), []);
    // No longer protected: its spare goes.
    g.reload(reload(vec![])).await.unwrap();
    assert_eq!(dropped(&g), [(NAT, vec![spare.clone()])]);
    g.reload(reload(vec![flannel(Content::Exact, RULES)]))
        .await
        .unwrap();
    assert_eq!(dropped(&g).len(), 1, "nothing more");
    // Stopped: its spares go.
    let state = std::rc::Rc::clone(&g.tools.state);
    drop(g);
    assert_eq!(
        state.borrow().spares_dropped.last(),
        Some(&(NAT, vec![spare]))
    );
}

#[tokio::test]
async fn an_unchanged_reload_keeps_the_image_and_the_spare() {
    let mut g = flannel_with_spares().await;
    g.make_spare();
    let spare = Arc::clone(&g.images.spares["flannel"].swap);
    g.reload(GuardReload {
        chains: vec![flannel(Content::Exact, RULES)],
        sets: vec![],
        adopt: vec![],
        poll: Duration::from_secs(1),
        resync: Duration::from_secs(60),
    })
    .await
    .unwrap();
    assert!(Arc::ptr_eq(g.images.best("flannel").unwrap(), &spare));
    assert_eq!(made(&g).len(), 1, "not made again");
}

#[tokio::test]
async fn no_spare_is_made_for_a_contested_chain() {
    let mut g = flannel_with_spares().await;
    let now = Instant::now();
    // Deleted right after each repair until the next deletion would be held back.
    while g.ledger.would_repair_now("flannel", now) {
        g.ledger.on_drift("flannel", now);
        g.ledger.on_repaired("flannel", now);
    }
    g.make_spare();
    assert!(
        made(&g).is_empty(),
        "not while a deletion would be held back"
    );
    g.ledger.on_drift("flannel", now);
    assert!(g.ledger.is_contested("flannel"));
    g.make_spare();
    assert!(made(&g).is_empty(), "each repair would make it again");
}

#[tokio::test]
async fn a_chain_unfit_for_its_jumps_is_taken_again_once_they_change() {
    let tools = FakeTools::new();
    tools.with(|s| {
        s.spares = true;
        s.capture_unfit = Some(crate::nftables::replay::Unfit::Jumps);
    });
    let mut g = flannel_with_image_from_unchecked(tools).await;
    g.unseen.clear();
    assert!(!g.images.by_chain.contains_key("flannel"));
    // The second jump goes: POSTROUTING changes, and the chain is taken again.
    g.tools.with(|s| s.capture_unfit = None);
    let captures = g.tools.with(|s| s.captures);
    let mut pending = Pending::new();
    for ev in [
        NftEvent::Touch {
            family: Family::Ipv4,
            table: "nat".into(),
            chain: Some("POSTROUTING".into()),
            removed: true,
            object: Object::Rule,
        },
        NftEvent::NewGen {
            gen: Some(5),
            pid: Some(6),
            process: Some("iptables".into()),
        },
    ] {
        g.on_event(ev, &mut pending, &[NAT].into()).await;
    }
    assert_eq!(g.tools.with(|s| s.captures), captures + 1);
    assert!(g.images.by_chain.contains_key("flannel"));
    g.make_spare();
    assert_eq!(made(&g).len(), 1, "and its spare made");
}
