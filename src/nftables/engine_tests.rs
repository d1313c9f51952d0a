//! The engine's decisions with a fake `nft`: which tables are read, what is applied, when a
//! repair is held back, when a table is only reported.

use super::*;
use crate::nftables::model::{Content, DesiredChain, NfFamily, RuleText};
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
