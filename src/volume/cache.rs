//! The bounded mapping cache: (device, virtual block) → data block + "owned alone", or
//! "unmapped". It lets reads and overwrites of owned blocks go straight to the data file with
//! no pool lock and no tree walk.
//!
//! Consistency rule: an entry is only ever written while the caller holds the pool lock that
//! makes it true (the read lock for a lookup result, the write lock for a mapping change), so
//! the cache never disagrees with the trees except in the safe direction: an entry saying
//! "shared" may be stale after the sharer went away (a write then rechecks under the lock).
//!
//! Exclusivity is invalidated by snapshots without touching the entries: each entry records
//! the device's snapshot epoch when it was filled, and an entry from an older epoch is no longer
//! trusted to be owned alone.
//!
//! The shards are chosen by runs of [`SHARD_SPAN`] virtual blocks (a placement group,
//! `place.rs`), so that the entries a group's opening records go in under one lock
//! ([`MappingCache::put_all`]). Keys are hashed with foldhash, seeded at random per process:
//! SipHash (std's default) was a tenth of the samples of the cache in a profile of fresh
//! writes, and a guest picks the block numbers, so the seed must not be fixed.

use std::collections::HashMap;
use std::hash::BuildHasher;

use crossbeam_utils::CachePadded;
use foldhash::fast::RandomState;
use parking_lot::Mutex;

use crate::units::{DataBlock, DevId, VirtBlock};

const SHARDS: usize = 16;

/// Consecutive virtual blocks of a device that share a shard: a placement group's.
const SHARD_SPAN: u64 = super::place::PLACE_GROUP;

/// What the cache knows about one virtual block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cached {
    /// Not provisioned: reads as zeros.
    Unmapped,
    /// Lives in `block`; `exclusive` when no other device shares it (valid only while the
    /// device's snapshot epoch is still `epoch`).
    Mapped {
        block: DataBlock,
        exclusive: bool,
        epoch: u64,
    },
}

type Key = (DevId, VirtBlock);

/// A sharded, bounded map; see the module docs. Each shard (its lock and its table's header)
/// is alone on its cache line, so that two threads locking neighbouring shards do not write
/// the same line.
pub(crate) struct MappingCache {
    shards: Vec<CachePadded<Mutex<Shard>>>,
    per_shard: usize,
    hasher: RandomState,
}

type Shard = HashMap<Key, Cached, RandomState>;

impl MappingCache {
    /// A cache of at most about `capacity` entries (at least one per shard).
    pub(crate) fn new(capacity: usize) -> MappingCache {
        let per_shard = capacity.div_ceil(SHARDS).max(1);
        MappingCache {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(Shard::default())))
                .collect(),
            per_shard,
            hasher: RandomState::default(),
        }
    }

    /// The index of the shard of `v` of `dev`.
    fn shard_of(&self, dev: DevId, v: VirtBlock) -> usize {
        // The modulo keeps the index in range.
        (self.hasher.hash_one((dev, v.0 / SHARD_SPAN)) as usize) % SHARDS
    }

    fn shard(&self, dev: DevId, v: VirtBlock) -> &Mutex<Shard> {
        &self.shards[self.shard_of(dev, v)]
    }

    pub(crate) fn get(&self, dev: DevId, v: VirtBlock) -> Option<Cached> {
        self.shard(dev, v).lock().get(&(dev, v)).copied()
    }

    /// Records what the caller just learned under the pool lock.
    pub(crate) fn put(&self, dev: DevId, v: VirtBlock, c: Cached) {
        self.insert(&mut self.shard(dev, v).lock(), (dev, v), c);
    }

    /// [`put`](MappingCache::put) for each of `entries`, locking a shard once for a run of
    /// entries that fall into it (the blocks of one placement group all do).
    pub(crate) fn put_all(
        &self,
        dev: DevId,
        entries: impl IntoIterator<Item = (VirtBlock, Cached)>,
    ) {
        let mut held: Option<(usize, parking_lot::MutexGuard<'_, Shard>)> = None;
        for (v, c) in entries {
            let i = self.shard_of(dev, v);
            if held.as_ref().is_none_or(|(h, _)| *h != i) {
                // One shard lock at a time: let go of the last before taking the next.
                drop(held.take());
                held = Some((i, self.shards[i].lock()));
            }
            if let Some((_, s)) = held.as_mut() {
                self.insert(s, (dev, v), c);
            }
        }
    }

    fn insert(&self, s: &mut Shard, key: Key, c: Cached) {
        if s.len() >= self.per_shard && !s.contains_key(&key) {
            // Evict an arbitrary eighth of the shard (hash order is effectively random),
            // so the cost of eviction is amortised over many inserts.
            let n = (self.per_shard / 8).max(1);
            let victims: Vec<Key> = s.keys().take(n).copied().collect();
            for k in victims {
                s.remove(&k);
            }
        }
        s.insert(key, c);
    }

    /// Forgets `[begin, end)` of `dev`.
    pub(crate) fn forget_range(&self, dev: DevId, begin: VirtBlock, end: VirtBlock) {
        let n = end.0.saturating_sub(begin.0);
        if n as usize <= self.per_shard * SHARDS {
            for v in begin.0..end.0 {
                self.shard(dev, VirtBlock(v))
                    .lock()
                    .remove(&(dev, VirtBlock(v)));
            }
        } else {
            for s in &self.shards {
                s.lock()
                    .retain(|(d, v), _| *d != dev || v.0 < begin.0 || v.0 >= end.0);
            }
        }
    }

    /// Forgets every entry of `dev` (deleted: its id may be reused).
    pub(crate) fn forget_device(&self, dev: DevId) {
        for s in &self.shards {
            s.lock().retain(|(d, _), _| *d != dev);
        }
    }

    /// Number of entries (tests, memory figures).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_forgets() {
        let c = MappingCache::new(160);
        for v in 0..10_000 {
            c.put(DevId(1), VirtBlock(v), Cached::Unmapped);
        }
        assert!(c.len() <= 160, "{} entries", c.len());
        c.put(DevId(2), VirtBlock(5), Cached::Unmapped);
        c.put(DevId(2), VirtBlock(6), Cached::Unmapped);
        c.forget_range(DevId(2), VirtBlock(5), VirtBlock(6));
        assert_eq!(c.get(DevId(2), VirtBlock(5)), None);
        assert_eq!(c.get(DevId(2), VirtBlock(6)), Some(Cached::Unmapped));
        c.forget_range(DevId(2), VirtBlock(0), VirtBlock(1 << 40));
        assert_eq!(c.get(DevId(2), VirtBlock(6)), None);
        c.put(DevId(3), VirtBlock(1), Cached::Unmapped);
        c.forget_device(DevId(3));
        assert_eq!(c.get(DevId(3), VirtBlock(1)), None);
    }

    #[test]
    fn put_all_records_every_entry_across_shards() {
        let c = MappingCache::new(100_000);
        let mapped = |v: u64| Cached::Mapped {
            block: DataBlock(v * 3),
            exclusive: v % 2 == 0,
            epoch: 1,
        };
        // Runs inside one span, across spans, and back to an earlier shard.
        let vs: Vec<u64> = (5..70)
            .chain(3 * SHARD_SPAN..3 * SHARD_SPAN + 2)
            .chain(0..2)
            .collect();
        c.put_all(DevId(7), vs.iter().map(|&v| (VirtBlock(v), mapped(v))));
        for &v in &vs {
            assert_eq!(c.get(DevId(7), VirtBlock(v)), Some(mapped(v)), "block {v}");
        }
        assert_eq!(c.get(DevId(7), VirtBlock(2)), None);
        assert_eq!(c.get(DevId(8), VirtBlock(5)), None);
        // Bounded like `put`.
        let small = MappingCache::new(160);
        small.put_all(
            DevId(1),
            (0..10_000).map(|v| (VirtBlock(v), Cached::Unmapped)),
        );
        assert!(small.len() <= 160, "{} entries", small.len());
    }
}
