//! The cache one watch fills: what the agent keeps of each object, by `namespace/name`, shared
//! with readers without a copy.

use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Mutex};

/// What one watch keeps: projected items by `namespace/name`, shared with readers without a
/// copy ([`Cache::snapshot`] is an `Arc`; the watch copies on write only while one is held).
pub struct Cache<I> {
    inner: Mutex<Inner<I>>,
}

struct Inner<I> {
    items: Arc<BTreeMap<String, I>>,
    /// Bumped on every change of an item.
    generation: u64,
    /// A complete list has been read at least once.
    listed: bool,
    /// A relist is under way: the items are a mix of before and after it.
    relisting: bool,
    /// The last request failed (and nothing was delivered since).
    failing: bool,
}

impl<I: Clone + PartialEq> Cache<I> {
    pub fn new() -> Arc<Cache<I>> {
        Arc::new(Cache {
            inner: Mutex::new(Inner {
                items: Arc::new(BTreeMap::new()),
                generation: 0,
                listed: false,
                relisting: false,
                failing: false,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<I>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn snapshot(&self) -> Arc<BTreeMap<String, I>> {
        self.lock().items.clone()
    }

    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Listed completely, and not in the middle of a relist.
    pub fn ready(&self) -> bool {
        let i = self.lock();
        i.listed && !i.relisting
    }

    pub fn listed(&self) -> bool {
        self.lock().listed
    }

    pub fn failing(&self) -> bool {
        self.lock().failing
    }

    /// Sets or removes (`None`) one item; whether anything changed.
    pub(super) fn put(&self, key: String, item: Option<I>) -> bool {
        let mut i = self.lock();
        let changed = match item {
            Some(item) if i.items.get(&key) != Some(&item) => {
                Arc::make_mut(&mut i.items).insert(key, item);
                true
            }
            Some(_) => false,
            None if i.items.contains_key(&key) => {
                Arc::make_mut(&mut i.items).remove(&key);
                true
            }
            None => false,
        };
        if changed {
            i.generation += 1;
        }
        changed
    }

    /// Whether there is anything a relist may have to forget.
    pub(super) fn begin_relist(&self) -> bool {
        let mut i = self.lock();
        i.relisting = i.listed;
        !i.items.is_empty()
    }

    /// A list is complete: what it did not see (by key hash; `None`: nothing was there before
    /// it) is gone.
    pub(super) fn end_relist(&self, seen: Option<&HashSet<u64>>) {
        let mut i = self.lock();
        let Some(seen) = seen else {
            i.listed = true;
            i.relisting = false;
            i.failing = false;
            return;
        };
        if i.items.keys().any(|k| !seen.contains(&key_hash(k))) {
            Arc::make_mut(&mut i.items).retain(|k, _| seen.contains(&key_hash(k)));
            i.generation += 1;
        }
        i.listed = true;
        i.relisting = false;
        i.failing = false;
    }

    pub(super) fn set_failing(&self, failing: bool) -> bool {
        let mut i = self.lock();
        let was = std::mem::replace(&mut i.failing, failing);
        // A failed relist leaves the items as they are: each one as recent as known.
        if failing {
            i.relisting = false;
        }
        was != failing
    }
}

pub(super) fn key_hash(key: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_counts_changes_and_relists_drop_what_is_gone() {
        let c: Arc<Cache<u32>> = Cache::new();
        assert!(!c.ready());
        assert!(!c.begin_relist(), "nothing to forget on a first list");
        assert!(c.put("a".into(), Some(1)));
        assert!(c.put("b".into(), Some(2)));
        c.end_relist(None);
        assert!(c.ready());
        let g = c.generation();
        assert!(!c.put("a".into(), Some(1)), "same value: no change");
        assert_eq!(c.generation(), g);
        assert!(!c.put("z".into(), None));
        // A snapshot held while the watch writes is not changed under the reader.
        let snap = c.snapshot();
        assert!(c.put("a".into(), Some(5)));
        assert_eq!(snap.get("a"), Some(&1));
        assert_eq!(c.snapshot().get("a"), Some(&5));
        // A relist that no longer sees b.
        assert!(c.begin_relist());
        assert!(!c.ready(), "mid-relist");
        c.put("a".into(), Some(5));
        c.end_relist(Some(&[key_hash("a")].into()));
        assert_eq!(c.snapshot().len(), 1);
        assert!(c.generation() > g + 1);
        // A failed relist keeps what it had.
        c.begin_relist();
        assert!(c.set_failing(true));
        assert!(c.ready() && c.failing());
    }
}
