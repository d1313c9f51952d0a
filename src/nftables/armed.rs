//! The images the engines arm for the responder ([`super::responder`]), which of them a
//! transaction fires, and what the responder did with them, for the engines to claim. Pure.
//!
//! The responder commits an image on its own thread, as soon as it reads the deleting
//! transaction's NEWGEN, instead of waiting for an engine's task to be scheduled: the repair
//! has to commit before the deleter closes its socket (see [`super::replay`]). It must commit
//! exactly what the engine would have, so an engine arms an image only with the generation it
//! has read through (`at_gen`), and the image fires only at the transaction right after it:
//! anything in between, the engine has not judged yet, and it repairs as before. Each armed
//! image fires once; the engine arms again after it has looked at the transaction.

use super::events::{Event, Object};
use super::model::TableKey;
use super::replay::Image;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;

/// A number of its own for each engine that arms images.
pub fn new_owner() -> u64 {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// What deletion puts an image back.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Trigger {
    /// The table deleted whole, and not created again in the same transaction.
    TableGone(TableKey),
    /// The chain deleted, not created again, and its table neither deleted nor created.
    ChainGone { table: TableKey, chain: String },
}

/// One image an engine arms.
#[derive(Clone, Debug)]
pub struct Armed {
    pub trigger: Trigger,
    pub image: Arc<Image>,
}

/// What one transaction deleted, folded notification by notification.
#[derive(Debug, Default)]
struct Transaction {
    /// Tables touched, each with whether it is gone now: its last table-level notification a
    /// deletion, nothing of it added since.
    gone: HashMap<TableKey, bool>,
    /// Tables added or deleted.
    table_level: HashSet<TableKey>,
    /// Chains deleted and not created again.
    chains_gone: HashSet<(TableKey, String)>,
}

impl Transaction {
    fn add(&mut self, key: TableKey, object: &Object, removed: bool) {
        match (object, removed) {
            (Object::Table, r) => {
                self.gone.insert(key.clone(), r);
                self.table_level.insert(key);
            }
            (Object::Chain(c), true) => {
                self.chains_gone.insert((key, c.clone()));
            }
            (o, false) => {
                if let Object::Chain(c) = o {
                    self.chains_gone.remove(&(key.clone(), c.clone()));
                }
                self.gone.insert(key, false);
            }
            _ => {}
        }
    }

    fn fires(&self, t: &Trigger) -> bool {
        match t {
            Trigger::TableGone(k) => self.gone.get(k) == Some(&true),
            Trigger::ChainGone { table, chain } => {
                !self.table_level.contains(table)
                    && self.chains_gone.contains(&(table.clone(), chain.clone()))
            }
        }
    }
}

/// What the responder got from the kernel for one commit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed by this thread (what nf_tables names in the NEWGEN).
    Committed { tid: u32 },
    /// The kernel refused the batch with this errno.
    Refused(i32),
    /// The socket failed.
    Failed(String),
}

/// Images to commit now, in one batch valid at `gen`.
#[derive(Debug)]
pub struct Fire {
    pub gen: u32,
    pub by_owner: Vec<(u64, Vec<Arc<Image>>)>,
}

impl Fire {
    pub fn images(&self) -> Vec<&Image> {
        self.by_owner
            .iter()
            .flat_map(|(_, v)| v.iter().map(|i| &**i))
            .collect()
    }
}

#[derive(Debug)]
struct Fired {
    gen: u32,
    owner: u64,
    images: Vec<Arc<Image>>,
    outcome: Outcome,
}

/// What became of images an engine would commit at a generation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Claim {
    /// The responder has not read that far yet.
    Wait,
    /// The responder committed (or tried to commit) all of them.
    Done(Outcome),
    /// It put back only some: the engine's repair reads the rest.
    Partly,
    /// It did not fire them: the engine commits them itself.
    NotFired,
}

#[derive(Debug, Default)]
struct Arming {
    at_gen: u32,
    armed: Vec<Armed>,
}

/// The armed images of every engine, the transaction being read, and what was fired.
#[derive(Debug, Default)]
pub struct Board {
    owners: HashMap<u64, Arming>,
    txn: Transaction,
    fired: Vec<Fired>,
    /// The last transaction handled; `None` before the first, and after lost notifications.
    handled: Option<u32>,
}

/// Whether generation `a` comes after `b` (generations wrap).
pub fn after(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) > 0
}

impl Board {
    /// A board for a kernel at generation `gen`, read after subscribing: transactions after
    /// it are waited for.
    pub fn at(gen: Option<u32>) -> Board {
        Board {
            handled: gen,
            ..Board::default()
        }
    }

    /// Replaces what `owner` has armed. `at_gen`: the last transaction it has read (its images
    /// are of the state then); `None` arms nothing. What it did not claim up to `at_gen`, it
    /// never will: forgotten.
    pub fn arm(&mut self, owner: u64, at_gen: Option<u32>, armed: Vec<Armed>) {
        if let Some(g) = at_gen {
            self.fired.retain(|f| f.owner != owner || after(f.gen, g));
        }
        match at_gen {
            Some(at_gen) if !armed.is_empty() => {
                self.owners.insert(owner, Arming { at_gen, armed });
            }
            _ => {
                self.owners.remove(&owner);
            }
        }
    }

    /// How many images `owner` has armed.
    pub fn armed(&self, owner: u64) -> usize {
        self.owners.get(&owner).map_or(0, |a| a.armed.len())
    }

    /// Folds one notification; at the NEWGEN of a transaction that deleted what an image was
    /// armed for, right after the generation it was armed at, returns what to commit now
    /// (then [`Board::record`]).
    pub fn on_event(&mut self, ev: &Event) -> Option<Fire> {
        let gen = match ev {
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
                self.txn.add(key, object, *removed);
                return None;
            }
            Event::Overrun => {
                self.owners.clear();
                self.txn = Transaction::default();
                self.handled = None;
                return None;
            }
            Event::NewGen { gen, .. } => *gen,
        };
        let txn = std::mem::take(&mut self.txn);
        let gen = gen?;
        let mut by_owner = Vec::new();
        for (owner, a) in self.owners.iter_mut() {
            if a.at_gen.wrapping_add(1) != gen {
                continue;
            }
            let (fire, keep) = std::mem::take(&mut a.armed)
                .into_iter()
                .partition(|x: &Armed| txn.fires(&x.trigger));
            a.armed = keep;
            if !fire.is_empty() {
                by_owner.push((*owner, fire.into_iter().map(|x| x.image).collect()));
            }
        }
        self.owners.retain(|_, a| !a.armed.is_empty());
        if by_owner.is_empty() {
            self.handled = Some(gen);
            return None;
        }
        Some(Fire { gen, by_owner })
    }

    /// What committing `fire` gave; the transaction is handled.
    pub fn record(&mut self, fire: Fire, outcome: Outcome) {
        for (owner, images) in fire.by_owner {
            self.fired.push(Fired {
                gen: fire.gen,
                owner,
                images,
                outcome: outcome.clone(),
            });
        }
        self.handled = Some(fire.gen);
    }

    /// What became of `images`, which an engine would commit at generation `gen` (the last
    /// it read): claimed once.
    pub fn claim(&mut self, images: &[&Image], gen: u32) -> Claim {
        match self.handled {
            None => return Claim::NotFired,
            Some(h) if after(gen, h) => return Claim::Wait,
            Some(_) => {}
        }
        let fired_with = |i: &Image| {
            self.fired
                .iter()
                .position(|f| !after(f.gen, gen) && f.images.iter().any(|x| **x == *i))
        };
        let found: Vec<Option<usize>> = images.iter().map(|i| fired_with(i)).collect();
        if found.iter().all(Option::is_none) {
            return Claim::NotFired;
        }
        let first = found[0];
        let claim = if found.iter().all(|f| *f == first) {
            first.map_or(Claim::Partly, |at| {
                Claim::Done(self.fired[at].outcome.clone())
            })
        } else {
            Claim::Partly
        };
        for at in found.into_iter().flatten() {
            let f = &mut self.fired[at];
            f.images.retain(|x| !images.iter().any(|i| **x == **i));
        }
        self.fired.retain(|f| !f.images.is_empty());
        claim
    }
}

#[cfg(test)]
#[path = "armed_tests.rs"]
mod tests;
