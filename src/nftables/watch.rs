//! Which protected tables the notifications touched, transaction by transaction. Pure.
//!
//! nf_tables notifies every object a transaction adds or removes, then one NEWGEN message naming
//! the process that committed it. A table whose last table-level notification in the stream is
//! its deletion, with nothing of it added since, is known to be gone: it need not be read before
//! it is recreated (a `nft flush ruleset` deletes every table: one burst, no reads).

use super::events::{Event, Object};
use super::model::TableKey;
use std::collections::{BTreeMap, HashSet};

/// What the committed transactions did to one protected table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Touched {
    /// Deleted and not re-added.
    pub gone: bool,
    /// The process that committed the last transaction touching it (`None`: not known, e.g. a
    /// resync).
    pub actor: Option<String>,
    /// Its pid, for reading its ancestors.
    pub pid: Option<u32>,
}

#[derive(Debug, Default)]
pub struct Watch {
    watched: HashSet<TableKey>,
    /// Adopt selectors: the tables they match are watched too, existing or not.
    adopt: Vec<super::adopt::Selector>,
    /// The open transaction: table → gone.
    open: BTreeMap<TableKey, bool>,
    done: BTreeMap<TableKey, Touched>,
    overrun: bool,
}

impl Watch {
    pub fn new(watched: impl IntoIterator<Item = TableKey>) -> Watch {
        Watch {
            watched: watched.into_iter().collect(),
            ..Watch::default()
        }
    }

    pub fn set_watched(&mut self, watched: impl IntoIterator<Item = TableKey>) {
        self.watched = watched.into_iter().collect();
        self.open.retain(|k, _| self.watched.contains(k));
        self.done.retain(|k, _| self.watched.contains(k));
    }

    /// Also watches the tables these selectors adopt.
    pub fn set_adopt(&mut self, adopt: Vec<super::adopt::Selector>) {
        self.adopt = adopt;
    }

    fn watches(&self, key: &TableKey) -> bool {
        self.watched.contains(key) || super::adopt::select(&self.adopt, key).is_some()
    }

    /// Folds one notification in; `own` says whether a pid is one of netwarden's own `nft`
    /// processes (whose transactions are not drift). Returns the watched tables a transaction
    /// by someone else just ended on, each with whether it left the table deleted.
    pub fn on_event(&mut self, ev: &Event, own: impl Fn(u32) -> bool) -> Vec<(TableKey, bool)> {
        match ev {
            Event::Change {
                family,
                table,
                object,
                removed,
            } => {
                let key = TableKey {
                    family: *family,
                    name: table.clone(),
                };
                if !self.watches(&key) {
                    return Vec::new();
                }
                let gone = self.open.entry(key).or_insert(false);
                match (object, removed) {
                    (Object::Table, r) => *gone = *r,
                    (_, false) => *gone = false,
                    (_, true) => {}
                }
                Vec::new()
            }
            Event::NewGen { pid, process, .. } => {
                let open = std::mem::take(&mut self.open);
                if pid.is_some_and(&own) {
                    return Vec::new();
                }
                let ended = open.iter().map(|(k, gone)| (k.clone(), *gone)).collect();
                for (key, gone) in open {
                    self.done.insert(
                        key,
                        Touched {
                            gone,
                            actor: Some(process.clone().unwrap_or_else(|| "unknown".into())),
                            pid: *pid,
                        },
                    );
                }
                ended
            }
            Event::Overrun => {
                self.overrun = true;
                Vec::new()
            }
        }
    }

    /// The tables committed transactions touched since the last call, and whether
    /// notifications were lost (then everything must be read).
    pub fn take(&mut self) -> (BTreeMap<TableKey, Touched>, bool) {
        (
            std::mem::take(&mut self.done),
            std::mem::replace(&mut self.overrun, false),
        )
    }

    /// Whether a committed foreign transaction touched `key` since the last [`Watch::take`].
    pub fn touched(&self, key: &TableKey) -> bool {
        self.done.contains_key(key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nftables::model::NfFamily;

    fn key(name: &str) -> TableKey {
        TableKey {
            family: NfFamily::Ip,
            name: name.into(),
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

    fn gen(pid: u32, process: &str) -> Event {
        Event::NewGen {
            gen: None,
            pid: Some(pid),
            process: Some(process.into()),
        }
    }

    #[test]
    fn a_flush_ruleset_leaves_every_table_gone_without_a_read() {
        let mut w = Watch::new([key("kube-proxy"), key("flannel-ipv4")]);
        let own = |_| false;
        for ev in [
            change("kube-proxy", Object::Rule("services".into()), true),
            change("kube-proxy", Object::Chain("services".into()), true),
            change("kube-proxy", Object::Set("cluster-ips".into()), true),
            change("kube-proxy", Object::Table, true),
            change("flannel-ipv4", Object::Table, true),
            change("filter", Object::Table, true),
            gen(77, "nft"),
        ] {
            w.on_event(&ev, own);
        }
        let (done, overrun) = w.take();
        assert!(!overrun);
        assert_eq!(done.len(), 2, "the unprotected table is not watched");
        for t in done.values() {
            assert_eq!(
                t,
                &Touched {
                    gone: true,
                    actor: Some("nft".into()),
                    pid: Some(77)
                }
            );
        }
    }

    #[test]
    fn a_table_deleted_and_recreated_must_be_read_and_own_transactions_are_not_drift() {
        let mut w = Watch::new([key("kube-proxy")]);
        let own = |p| p == 5;
        w.on_event(&change("kube-proxy", Object::Table, true), own);
        w.on_event(&gen(9, "kube-proxy"), own);
        w.on_event(&change("kube-proxy", Object::Table, false), own);
        w.on_event(
            &change("kube-proxy", Object::Chain("services".into()), false),
            own,
        );
        w.on_event(&gen(10, "nft"), own);
        assert!(w.touched(&key("kube-proxy")));
        let (done, _) = w.take();
        assert!(!done[&key("kube-proxy")].gone);
        assert_eq!(done[&key("kube-proxy")].actor.as_deref(), Some("nft"));
        w.on_event(
            &change("kube-proxy", Object::Elements("s".into()), false),
            own,
        );
        w.on_event(&gen(5, "nft"), own);
        assert!(w.take().0.is_empty(), "netwarden's own transaction");
        w.on_event(&Event::Overrun, own);
        assert!(w.take().1);
    }
}
