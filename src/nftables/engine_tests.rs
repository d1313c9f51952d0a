//! The engine's decisions with a fake `nft`: which tables are read, what is applied, when a
//! repair is held back, when a table is only reported.

use super::*;
use crate::nftables::armed::{Armed, Trigger};
use crate::nftables::model::{Content, DesiredChain, NfFamily, RuleText};
use crate::nftables::netlink::NetlinkError;
use crate::nftables::replay::{Census, Dump, Image, Msg};
use crate::nftables::runner::Applied;
use std::cell::RefCell;
use std::rc::Rc;

#[derive(Default)]
struct Kernel {
    /// What `list` returns, in turn; the last one stays.
    listings: VecDeque<Option<String>>,
    applied: Vec<String>,
    reads: usize,
    echo: String,
    /// What `capture` returns (none: the table cannot have an image).
    image: Option<Image>,
    captures: usize,
    /// The generations replays were asked for.
    replays: Vec<u32>,
    /// What the kernel answers a replay with.
    replay_refused: Option<nix::errno::Errno>,
    /// A replay finds the responder put back only some of its images.
    replay_partly: bool,
    /// The last arming: at which generation, what.
    armed: Option<(Option<u32>, Vec<Trigger>)>,
}

#[derive(Clone, Default)]
struct Fake(Rc<RefCell<Kernel>>);

impl Nft for Fake {
    async fn list(&mut self, _: &TableKey) -> Result<Option<String>, NftError> {
        let mut k = self.0.borrow_mut();
        k.reads += 1;
        Ok(if k.listings.len() > 1 {
            k.listings.pop_front().flatten()
        } else {
            k.listings.front().cloned().flatten()
        })
    }

    async fn tables(&mut self) -> Result<Vec<TableKey>, NftError> {
        Ok(vec![key()])
    }

    async fn apply(&mut self, transaction: &str) -> Result<Applied, NftError> {
        let mut k = self.0.borrow_mut();
        k.applied.push(transaction.to_owned());
        Ok(Applied {
            pid: Some(4242),
            echo: k.echo.clone(),
        })
    }

    fn capture(&mut self, _: &TableKey, _: &Census) -> Result<Option<Image>, NetlinkError> {
        let mut k = self.0.borrow_mut();
        k.captures += 1;
        k.image
            .clone()
            .map(Some)
            .ok_or(NetlinkError::Unfit(crate::nftables::replay::Unfit::NoTable))
    }

    fn replay(&mut self, images: &[&Image], genid: u32) -> Result<u32, NetlinkError> {
        let mut k = self.0.borrow_mut();
        assert_eq!(images.len(), 1);
        k.replays.push(genid);
        if k.replay_partly {
            return Err(NetlinkError::PartlyReplayed);
        }
        match k.replay_refused {
            Some(e) => Err(NetlinkError::Refused(e)),
            None => Ok(31337),
        }
    }

    fn arm(&mut self, _owner: u64, at_gen: Option<u32>, armed: Vec<Armed>) {
        self.0.borrow_mut().armed = Some((at_gen, armed.into_iter().map(|a| a.trigger).collect()));
    }
}

/// An image of the protected table (an empty table: the engine never looks inside).
fn image() -> Image {
    let mut attrs = Vec::new();
    crate::nftables::replay::put_attr(&mut attrs, 1, b"flannel-ipv4\0");
    crate::nftables::replay::put_attr(&mut attrs, 3, &0u32.to_be_bytes());
    let table = Msg {
        kind: 0,
        family: 2,
        attrs,
    };
    Image::of_table(
        Dump {
            table: Some(table),
            ..Dump::default()
        },
        &Census::default(),
    )
    .unwrap()
}

fn new_gen(gen: u32, pid: u32) -> Event {
    Event::NewGen {
        gen: Some(gen),
        pid: Some(pid),
        process: Some("nft".into()),
    }
}

fn key() -> TableKey {
    TableKey {
        family: NfFamily::Ip,
        name: "flannel-ipv4".into(),
    }
}

fn table(rule: &str) -> DesiredTable {
    DesiredTable {
        name: "flannel".into(),
        mode: Mode::Enforce,
        key: key(),
        comment: None,
        dormant: None,
        chains: vec![DesiredChain {
            name: "postrtg".into(),
            base: None,
            comment: None,
            content: Content::Exact,
            rules: vec![crate::nftables::text::rule(rule).unwrap()],
        }],
        sets: Vec::new(),
    }
}

fn listing(rule: &str) -> Option<String> {
    Some(format!(
        "table ip flannel-ipv4 {{ # handle 1\n\tchain postrtg {{ # handle 2\n\t\t{rule} # handle 3\n\t}}\n}}\n"
    ))
}

const RULE: &str = "meta mark 0x00004000 return";

async fn engine(k: &Fake, rule: &str) -> Engine<Fake> {
    let cfg = NftConfig {
        tables: vec![table(rule)],
        adopt: Vec::new(),
    };
    Engine::start_with(k.clone(), cfg, Duration::from_secs(60), false, &[])
        .await
        .unwrap()
}

fn gone() -> BTreeMap<TableKey, Touched> {
    BTreeMap::from([(
        key(),
        Touched {
            gone: true,
            actor: Some("nft".into()),
            pid: Some(7),
        },
    )])
}

fn run<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn a_missing_table_is_created_and_read_back() {
    run(async {
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([None, listing(RULE)]);
        let e = engine(&k, RULE).await;
        let kernel = k.0.borrow();
        assert_eq!(kernel.applied.len(), 1);
        assert!(kernel.applied[0].starts_with("add table ip flannel-ipv4\n"));
        assert_eq!(kernel.reads, 2, "read, then read back");
        assert!(e.stuck.is_empty() && e.reported.is_empty());
    });
}

#[test]
fn a_table_known_deleted_is_recreated_without_reading_it_first() {
    run(async {
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([listing(RULE)]);
        let mut e = engine(&k, RULE).await;
        assert_eq!(k.0.borrow().applied.len(), 0);
        let reads = k.0.borrow().reads;
        e.sync(gone(), Why::Events).await;
        let kernel = k.0.borrow();
        assert_eq!(kernel.applied.len(), 1);
        assert_eq!(kernel.reads, reads + 1, "only the read back");
        assert_eq!(e.own.back(), Some(&4242));
    });
}

#[test]
fn a_repair_that_does_not_take_is_reported_not_repeated() {
    run(async {
        let k = Fake::default();
        // nft keeps printing something else than the config (and echoes nothing useful).
        k.0.borrow_mut().listings = VecDeque::from([listing("meta mark 0x4000 return")]);
        let mut e = engine(&k, "meta mark 0x4000 return ").await;
        assert_eq!(k.0.borrow().applied.len(), 0, "in sync as written");
        k.0.borrow_mut().listings = VecDeque::from([listing("counter")]);
        e.sync_all(Why::Resync).await;
        assert_eq!(k.0.borrow().applied.len(), 1);
        assert!(e.stuck.contains("flannel"));
        e.sync_all(Why::Resync).await;
        assert_eq!(k.0.borrow().applied.len(), 1, "only reported now");
        assert!(e.reported.contains_key("flannel"));
    });
}

#[test]
fn the_printed_form_is_learned_from_the_echo() {
    run(async {
        let k = Fake::default();
        let written = "meta mark & 0x4000 == 0 return";
        let printed = "meta mark & 0x00004000 == 0x00000000 return";
        {
            let mut kernel = k.0.borrow_mut();
            kernel.listings = VecDeque::from([None, listing(printed)]);
            kernel.echo = format!(
                "add table ip flannel-ipv4 # handle 1\nadd chain ip flannel-ipv4 postrtg # handle 2\nadd rule ip flannel-ipv4 postrtg {printed} # handle 3\n"
            );
        }
        let mut e = engine(&k, written).await;
        assert!(e.stuck.is_empty(), "the read back matches the learned form");
        assert_eq!(
            e.aliases[&key()][written],
            RuleText {
                body: printed.into(),
                comment: None
            }
        );
        e.sync_all(Why::Resync).await;
        assert_eq!(k.0.borrow().applied.len(), 1, "in sync in the printed form");
    });
}

#[test]
fn a_fight_is_backed_off_and_never_given_up() {
    run(async {
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([listing(RULE)]);
        let mut e = engine(&k, RULE).await;
        // The fighter deletes the table right after every repair: the read back still shows
        // it (the fighter comes after), the next notification says it is gone again.
        for _ in 0..3 {
            e.sync(gone(), Why::Events).await;
        }
        assert_eq!(k.0.borrow().applied.len(), 3);
        e.sync(gone(), Why::Events).await;
        assert_eq!(k.0.borrow().applied.len(), 3, "held back");
        assert!(e.contest.is_contested(&"flannel".to_string()));
        assert_eq!(e.contest.fighter(&"flannel".to_string()), Some("nft"));
        assert!(e.stuck.is_empty(), "a fight never turns protection off");
        // Its held-back repair comes when due.
        let due = e.contest.next_deadline().unwrap();
        tokio::time::sleep_until(due.into()).await;
        let (due, _) = e.contest.poll(Instant::now());
        assert_eq!(due, vec!["flannel".to_string()]);
        let retry = e.touched_by_name(&due);
        k.0.borrow_mut().listings = VecDeque::from([None, listing(RULE)]);
        e.sync(retry, Why::Retry).await;
        assert_eq!(k.0.borrow().applied.len(), 4);
    });
}

fn adopting(policy: crate::adopt::UnknownActor) -> NftConfig {
    NftConfig {
        tables: Vec::new(),
        adopt: vec![adopt::Selector {
            adopt: crate::adopt::AdoptSelector {
                name: "flannel".into(),
                mode: Mode::Enforce,
                rules: None,
                routes: None,
                chains: None,
                ipsets: None,
                neighbours: None,
                owners: vec!["flanneld".into()],
                unknown_actor: policy,
                pod_liveness: None,
            },
            family: None,
            tables: vec!["flannel-*".into()],
        }],
    }
}

/// What the adopted-state file kept: the table as adopted, with the rule `rule`.
fn saved(cfg: &NftConfig, rule: &str) -> Vec<adopt::SavedTable> {
    let observed = crate::nftables::listing::parse(&listing(rule).unwrap(), &key()).unwrap();
    let copy = adopt::copy(&cfg.adopt[0], &observed);
    vec![adopt::SavedTable::new("flannel", &copy)]
}

async fn restarted(k: &Fake, cfg: NftConfig, saved: &[adopt::SavedTable]) -> Engine<Fake> {
    Engine::start_with(k.clone(), cfg, Duration::from_secs(60), false, saved)
        .await
        .unwrap()
}

#[test]
fn a_saved_table_deleted_while_the_agent_was_down_goes_by_unknown_actor() {
    run(async {
        // unknownActor: restore: recreated as the file kept it.
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([None, listing(RULE)]);
        let cfg = adopting(crate::adopt::UnknownActor::Restore);
        let saved = saved(&cfg, RULE);
        let e = restarted(&k, cfg, &saved).await;
        {
            let kernel = k.0.borrow();
            assert_eq!(kernel.applied.len(), 1);
            assert!(kernel.applied[0].starts_with("add table ip flannel-ipv4\n"));
            assert!(kernel.applied[0].contains(RULE), "{}", kernel.applied[0]);
        }
        assert!(e.adopted.contains_key(&key()));
        assert!(e.from_file.is_empty());

        // unknownActor: forget: forgotten, left deleted.
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([None]);
        let cfg = adopting(crate::adopt::UnknownActor::Forget);
        let e = restarted(&k, cfg, &saved).await;
        assert!(k.0.borrow().applied.is_empty());
        assert!(e.adopted.is_empty());

        // Without the file, a fresh agent knows nothing of it.
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([None]);
        let e = restarted(&k, adopting(crate::adopt::UnknownActor::Restore), &[]).await;
        assert!(k.0.borrow().applied.is_empty());
        assert!(e.adopted.is_empty());
    });
}

#[test]
fn a_saved_table_that_is_there_is_adopted_as_it_is_now() {
    run(async {
        // The owner changed it while the agent was down: followed, not rolled back.
        let k = Fake::default();
        let now = "meta mark 0x00008000 return";
        k.0.borrow_mut().listings = VecDeque::from([listing(now)]);
        let cfg = adopting(crate::adopt::UnknownActor::Restore);
        let saved = saved(&cfg, RULE);
        let e = restarted(&k, cfg, &saved).await;
        assert!(k.0.borrow().applied.is_empty());
        assert_eq!(e.adopted[&key()].chains[0].rules[0].body, now);
    });
}

#[test]
fn a_saved_table_its_selector_no_longer_covers_or_the_config_names_is_not_restored() {
    run(async {
        let cfg = adopting(crate::adopt::UnknownActor::Restore);
        let saved = saved(&cfg, RULE);
        // Narrowed to other tables.
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([None]);
        let mut narrowed = cfg.clone();
        narrowed.adopt[0].tables = vec!["kube-proxy".into()];
        let e = restarted(&k, narrowed, &saved).await;
        assert!(k.0.borrow().applied.is_empty());
        assert!(e.adopted.is_empty());
        // spec.nftables names it now: the config's table is what is put back.
        let k = Fake::default();
        k.0.borrow_mut().listings = VecDeque::from([None, listing("counter")]);
        let mut named = cfg;
        named.tables = vec![table("counter")];
        let e = restarted(&k, named, &saved).await;
        assert!(e.adopted.is_empty());
        let kernel = k.0.borrow();
        assert_eq!(kernel.applied.len(), 1);
        assert!(!kernel.applied[0].contains(RULE), "{}", kernel.applied[0]);
    });
}

/// An engine in sync with an image of its table, at generation 5.
async fn with_image(k: &Fake) -> Engine<Fake> {
    {
        let mut kernel = k.0.borrow_mut();
        kernel.listings = VecDeque::from([listing(RULE)]);
        kernel.image = Some(image());
    }
    let mut e = engine(k, RULE).await;
    assert_eq!(k.0.borrow().captures, 1, "taken once found in sync");
    e.fold(&[new_gen(5, 7)]);
    e
}

#[test]
fn a_deleted_table_with_an_image_is_put_back_from_it_then_read_back() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        let reads = k.0.borrow().reads;
        e.sync(gone(), Why::Events).await;
        let kernel = k.0.borrow();
        assert_eq!(kernel.replays, [5], "at the generation of the deletion");
        assert!(kernel.applied.is_empty(), "no nft -f");
        assert_eq!(kernel.reads, reads + 1, "only the read back");
        assert_eq!((e.stats.replays, e.stats.repairs), (1, 1));
        assert_eq!(
            e.own.back(),
            Some(&31337),
            "its own transaction is not drift"
        );
        assert_eq!(
            kernel.captures, 1,
            "the image still holds: it is what the kernel has"
        );
    });
}

#[test]
fn an_image_the_kernel_refuses_is_dropped_and_nft_repairs() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        k.0.borrow_mut().replay_refused = Some(nix::errno::Errno::EINVAL);
        e.sync(gone(), Why::Events).await;
        assert_eq!(k.0.borrow().applied.len(), 1, "nft -f instead");
        assert_eq!(e.stats.repairs, 1);
        // Never tried again, never taken again.
        e.fold(&[new_gen(6, 7)]);
        e.sync(gone(), Why::Events).await;
        let kernel = k.0.borrow();
        assert_eq!(kernel.replays.len(), 1);
        assert_eq!(kernel.applied.len(), 2);
        assert_eq!(kernel.captures, 1);
    });
}

#[test]
fn a_transaction_after_the_deletion_makes_nft_repair_and_the_image_is_taken_again() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        k.0.borrow_mut().replay_refused = Some(nix::errno::Errno::ERESTART);
        e.sync(gone(), Why::Events).await;
        let kernel = k.0.borrow();
        assert_eq!(kernel.applied.len(), 1);
        assert_eq!(
            kernel.captures, 2,
            "taken again once the repair is verified"
        );
    });
}

#[test]
fn a_change_by_someone_else_drops_the_image() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        e.fold(&[
            Event::Change {
                family: NfFamily::Ip,
                table: "flannel-ipv4".into(),
                object: crate::nftables::events::Object::Rule("postrtg".into()),
                removed: true,
            },
            new_gen(6, 8),
        ]);
        let _ = e.watch.take();
        e.sync(gone(), Why::Events).await;
        let kernel = k.0.borrow();
        assert!(
            kernel.replays.is_empty(),
            "the image was not the table any more"
        );
        assert_eq!(kernel.applied.len(), 1);
    });
}

#[test]
fn a_held_back_repair_does_not_replay_and_is_decided_once() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        // A fighter: three repairs in a row, then the fourth is held back.
        for _ in 0..3 {
            e.sync(gone(), Why::Events).await;
        }
        assert_eq!(k.0.borrow().replays.len(), 3);
        e.sync(gone(), Why::Events).await;
        assert_eq!(k.0.borrow().replays.len(), 3, "held back");
        assert!(k.0.borrow().applied.is_empty());
        assert!(e.contest.is_contested(&"flannel".to_string()));
    });
}

#[test]
fn the_image_is_armed_at_the_generation_read_and_disarmed_while_contested() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        e.arm_images();
        assert_eq!(
            k.0.borrow().armed,
            Some((Some(5), vec![Trigger::TableGone(key())])),
            "armed at the generation last read"
        );
        // A fighter: after three repairs in a row the next is held back, so nothing is armed
        // that the responder would put back against the contest.
        for gen in 6..9 {
            e.sync(gone(), Why::Events).await;
            e.fold(&[new_gen(gen, 7)]);
            e.arm_images();
        }
        assert_eq!(k.0.borrow().replays.len(), 3);
        assert_eq!(k.0.borrow().armed, Some((Some(8), vec![])));
    });
}

#[test]
fn a_table_the_responder_put_back_only_partly_is_read_not_recreated() {
    run(async {
        let k = Fake::default();
        let mut e = with_image(&k).await;
        k.0.borrow_mut().replay_partly = true;
        let reads = k.0.borrow().reads;
        // The table reads back in sync (the responder did put it back).
        e.sync(gone(), Why::Events).await;
        let kernel = k.0.borrow();
        assert!(kernel.applied.is_empty(), "no nft -f: {:?}", kernel.applied);
        assert_eq!(kernel.reads, reads + 1, "read instead of assumed gone");
    });
}
