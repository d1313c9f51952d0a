use super::*;
use crate::nftables::model::NfFamily;
use crate::nftables::replay::Msg;

fn key(name: &str) -> TableKey {
    TableKey {
        family: NfFamily::Ip,
        name: name.into(),
    }
}

/// A distinct image per name (the board only compares them).
fn image(name: &str) -> Arc<Image> {
    let mut attrs = Vec::new();
    crate::nftables::replay::put_attr(&mut attrs, 3, name.as_bytes());
    let chain = Msg {
        kind: 3,
        family: 2,
        attrs,
    };
    Arc::new(Image::of_chain(chain, Vec::new(), Vec::new()))
}

fn table_gone(name: &str) -> Armed {
    Armed {
        trigger: Trigger::TableGone(key(name)),
        image: image(name),
    }
}

fn chain_gone(table: &str, chain: &str) -> Armed {
    Armed {
        trigger: Trigger::ChainGone {
            table: key(table),
            chain: chain.into(),
        },
        image: image(chain),
    }
}

fn change(table: &str, object: Object, removed: bool) -> Event {
    Event::Change {
        family: NfFamily::Ip,
        table: table.into(),
        object,
        removed,
    }
}

fn newgen(gen: u32) -> Event {
    Event::NewGen {
        gen: Some(gen),
        pid: Some(4242),
        process: Some("nft".into()),
    }
}

/// Feeds a transaction; returns what fired at its NEWGEN.
fn transaction(board: &mut Board, events: Vec<Event>, gen: u32) -> Option<Fire> {
    for ev in events {
        assert!(board.on_event(&ev).is_none());
    }
    board.on_event(&newgen(gen))
}

fn fired_names(fire: &Fire) -> Vec<Arc<Image>> {
    fire.by_owner
        .iter()
        .flat_map(|(_, v)| v.iter().cloned())
        .collect()
}

#[test]
fn a_table_deleted_right_after_the_armed_generation_fires_once() {
    let mut b = Board::default();
    b.arm(
        1,
        Some(10),
        vec![table_gone("kube-proxy"), table_gone("other")],
    );
    let fire = transaction(&mut b, vec![change("kube-proxy", Object::Table, true)], 11)
        .expect("the deletion fires the image");
    assert_eq!(fire.gen, 11);
    assert_eq!(fired_names(&fire), vec![image("kube-proxy")]);
    b.record(fire, Outcome::Committed { tid: 7 });
    // Fired once: the other image stays armed, this one waits for the engine to arm it again.
    assert_eq!(b.armed(1), 1);
    assert!(transaction(&mut b, vec![change("kube-proxy", Object::Table, true)], 12).is_none());
}

#[test]
fn nothing_fires_after_a_transaction_the_engine_has_not_read() {
    let mut b = Board::default();
    b.arm(1, Some(10), vec![table_gone("t")]);
    // Generation 11 changed something; the engine has not judged it yet.
    assert!(transaction(
        &mut b,
        vec![change("t", Object::Rule("c".into()), false)],
        11
    )
    .is_none());
    assert!(transaction(&mut b, vec![change("t", Object::Table, true)], 12).is_none());
    // Armed again at what it has read, it fires.
    b.arm(1, Some(12), vec![table_gone("t")]);
    assert!(transaction(&mut b, vec![change("t", Object::Table, true)], 13).is_some());
}

#[test]
fn a_table_deleted_and_created_again_in_one_transaction_does_not_fire() {
    let mut b = Board::default();
    b.arm(1, Some(1), vec![table_gone("t")]);
    let events = vec![
        change("t", Object::Table, true),
        change("t", Object::Table, false),
        change("t", Object::Chain("c".into()), false),
    ];
    assert!(transaction(&mut b, events, 2).is_none());
    assert_eq!(b.armed(1), 1, "not fired: still armed");
}

#[test]
fn a_chain_fires_only_when_its_table_stays() {
    let mut b = Board::default();
    b.arm(1, Some(1), vec![chain_gone("nat", "FLANNEL-POSTRTG")]);
    // Deleted with its table (a flush ruleset): the repair from the notifications handles it.
    let with_table = vec![
        change("nat", Object::Chain("FLANNEL-POSTRTG".into()), true),
        change("nat", Object::Table, true),
    ];
    assert!(transaction(&mut b, with_table, 2).is_none());
    b.arm(1, Some(2), vec![chain_gone("nat", "FLANNEL-POSTRTG")]);
    // Deleted and created again (a restore that rewrites it): nothing to put back.
    let recreated = vec![
        change("nat", Object::Chain("FLANNEL-POSTRTG".into()), true),
        change("nat", Object::Chain("FLANNEL-POSTRTG".into()), false),
    ];
    assert!(transaction(&mut b, recreated, 3).is_none());
    b.arm(1, Some(3), vec![chain_gone("nat", "FLANNEL-POSTRTG")]);
    let deleted = vec![
        change("nat", Object::Rule("POSTROUTING".into()), true),
        change("nat", Object::Chain("FLANNEL-POSTRTG".into()), true),
    ];
    assert!(transaction(&mut b, deleted, 4).is_some());
}

#[test]
fn the_engine_claims_what_was_fired_once_and_commits_the_rest_itself() {
    let mut b = Board::default();
    let (t, u) = (image("t"), image("u"));
    b.arm(1, Some(5), vec![table_gone("t")]);
    // Not read that far yet: the engine waits.
    assert_eq!(b.claim(&[&t], 6), Claim::NotFired, "nothing handled yet");
    assert!(transaction(&mut b, vec![change("x", Object::Table, false)], 5).is_none());
    assert_eq!(b.claim(&[&t], 6), Claim::Wait);
    let fire = transaction(&mut b, vec![change("t", Object::Table, true)], 6).unwrap();
    assert_eq!(b.claim(&[&t], 6), Claim::Wait, "fired, not recorded yet");
    b.record(fire, Outcome::Committed { tid: 9 });
    assert_eq!(b.claim(&[&u], 6), Claim::NotFired);
    assert_eq!(b.claim(&[&t, &u], 6), Claim::Partly);
    // Claimed (even partly) once.
    assert_eq!(b.claim(&[&t], 6), Claim::NotFired);
}

#[test]
fn a_claim_returns_what_the_kernel_said() {
    let mut b = Board::default();
    b.arm(1, Some(5), vec![table_gone("t")]);
    b.arm(2, Some(5), vec![chain_gone("filter", "c")]);
    let events = vec![
        change("t", Object::Table, true),
        change("filter", Object::Chain("c".into()), true),
    ];
    let fire = transaction(&mut b, events, 6).unwrap();
    assert_eq!(fire.images().len(), 2, "one batch for both engines");
    b.record(fire, Outcome::Refused(85));
    assert_eq!(
        b.claim(&[&image("t")], 6),
        Claim::Done(Outcome::Refused(85))
    );
    assert_eq!(b.claim(&[&image("c")], 7), Claim::Wait);
    assert!(transaction(&mut b, vec![], 7).is_none());
    assert_eq!(
        b.claim(&[&image("c")], 7),
        Claim::Done(Outcome::Refused(85))
    );
}

#[test]
fn what_an_engine_did_not_claim_is_forgotten_when_it_arms_past_it() {
    let mut b = Board::default();
    b.arm(1, Some(5), vec![table_gone("t")]);
    let fire = transaction(&mut b, vec![change("t", Object::Table, true)], 6).unwrap();
    b.record(fire, Outcome::Committed { tid: 9 });
    // The engine read generation 6 and did not ask (its contest held the repair back, say):
    // a later claim of the same image must not find this commit.
    b.arm(1, Some(6), vec![table_gone("t")]);
    assert!(transaction(&mut b, vec![], 7).is_none());
    assert_eq!(b.claim(&[&image("t")], 7), Claim::NotFired);
}

#[test]
fn lost_notifications_disarm_everything() {
    let mut b = Board::default();
    b.arm(1, Some(5), vec![table_gone("t")]);
    assert!(b.on_event(&Event::Overrun).is_none());
    assert_eq!(b.armed(1), 0);
    assert!(transaction(&mut b, vec![change("t", Object::Table, true)], 6).is_none());
    assert_eq!(b.claim(&[&image("t")], 6), Claim::NotFired);
}

#[test]
fn generations_wrap() {
    let mut b = Board::default();
    b.arm(1, Some(u32::MAX), vec![table_gone("t")]);
    let fire = transaction(&mut b, vec![change("t", Object::Table, true)], 0);
    assert!(fire.is_some(), "0 comes right after u32::MAX");
    b.record(fire.unwrap(), Outcome::Committed { tid: 1 });
    assert_eq!(
        b.claim(&[&image("t")], 0),
        Claim::Done(Outcome::Committed { tid: 1 })
    );
}
