//! The bounded mapping cache: (device, virtual block) → data block + "owned alone", or
//! "unmapped". It lets reads and overwrites of owned blocks go straight to the data file with
//! no pool lock and no tree walk.
//!
//! Consistency rule: an entry is only ever written while the caller holds the pool lock that
//! makes it true (the read lock for a lookup result, the write lock for a mapping change), so
//! the cache never disagrees with the trees except in the safe direction: an entry saying
//! "shared" may be stale after the sharer went away (a write then rechecks under the lock).
//!
//! Exclusivity is invalidated by snapshots without visiting the entries: an entry comes back
//! with the device's snapshot epoch it was learned under (kept per chunk, below), and an entry
//! from an older epoch is no longer trusted to be owned alone.
//!
//! # Layout
//!
//! Entries live in chunks of [`CHUNK`] consecutive virtual blocks of one device: an array of
//! 8-byte slots (0 = not cached, 1 = unmapped, else the data block shifted left by two with
//! the low bits saying "mapped" and "owned alone"), found through a small hash map of chunks
//! per shard. A lookup is one probe of that small map, which stays in the CPU's cache, and one
//! load from the slot array; a map with one entry per block made each lookup two misses
//! (control bytes, then the 40-byte entry), and in a profile of cached 4 KiB reads `get` was
//! 11 % of the samples, nearly all of it waiting for those two loads. A 4 GiB volume's
//! 65 536 blocks take 512 KiB of slots.
//!
//! The snapshot epoch is kept per chunk: every "owned alone" in a chunk was learned under the
//! chunk's epoch. An entry of a newer epoch clears the older ones' "owned alone" bits first
//! (only snapshots move an epoch, so that is rare); an entry of an older epoch is stored as
//! not owned alone, which is what its reader would make of it anyway.
//!
//! A chunk lives in the shard of its (device, chunk number), so a placement group's entries
//! (`place.rs`, 16 blocks inside one chunk) go in under one lock ([`MappingCache::put_all`]).
//! The chunk maps are hashed with foldhash, seeded at random per process: a guest picks the
//! block numbers, so the seed must not be fixed.
//!
//! # Bounds
//!
//! Each shard holds at most its share of `capacity` entries, and at most its share of
//! `capacity / 8` chunks (so memory stays near the 64 bytes per entry of capacity that a map
//! of single entries took, however sparsely the blocks fall: a chunk is about 530 bytes).
//! When either bound is passed, an arbitrary eighth of the shard's other chunks is dropped.
//! One chunk always fits, so the cache holds at most `max(capacity, SHARDS * CHUNK)` entries.

use std::collections::HashMap;
use std::hash::BuildHasher;

use crossbeam_utils::CachePadded;
use foldhash::fast::RandomState;
use parking_lot::{Mutex, MutexGuard};

use crate::units::{DataBlock, DevId, VirtBlock};

const SHARDS: usize = 16;

/// Consecutive virtual blocks of a device kept together in one array of slots.
const CHUNK: u64 = 64;

/// Chunks allowed per entry of capacity, over all shards: one chunk per this many entries.
const ENTRIES_PER_CHUNK_BOUND: usize = 8;

/// Slot values (see the module docs).
const EMPTY: u64 = 0;
const UNMAPPED: u64 = 1;
const MAPPED: u64 = 0b10;
const EXCLUSIVE: u64 = 0b01;

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

/// The slots of [`CHUNK`] consecutive virtual blocks of one device.
struct Chunk {
    /// The snapshot epoch every "owned alone" bit in `slots` was learned under.
    epoch: u64,
    /// Slots not [`EMPTY`].
    filled: u32,
    slots: [u64; CHUNK as usize],
}

impl Chunk {
    fn new(epoch: u64) -> Box<Chunk> {
        Box::new(Chunk {
            epoch,
            filled: 0,
            slots: [EMPTY; CHUNK as usize],
        })
    }

    fn get(&self, i: usize) -> Option<Cached> {
        match self.slots[i] {
            EMPTY => None,
            UNMAPPED => Some(Cached::Unmapped),
            raw => Some(Cached::Mapped {
                block: DataBlock(raw >> 2),
                exclusive: raw & EXCLUSIVE != 0,
                epoch: self.epoch,
            }),
        }
    }

    /// Stores `c` in slot `i`; returns the change in filled slots (-1, 0 or 1). A data block
    /// of 2^62 or more cannot be encoded: the slot is emptied instead (the block stays
    /// uncached rather than stale).
    fn set(&mut self, i: usize, c: Cached) -> isize {
        let raw = match c {
            Cached::Unmapped => UNMAPPED,
            Cached::Mapped {
                block,
                exclusive,
                epoch,
            } => {
                if block.0 >> 62 != 0 {
                    return -isize::from(self.clear(i));
                }
                if epoch > self.epoch {
                    // Older "owned alone" bits would pass for this epoch's: clear them.
                    for s in self.slots.iter_mut().filter(|s| **s > UNMAPPED) {
                        *s &= !EXCLUSIVE;
                    }
                    self.epoch = epoch;
                }
                let trusted = exclusive && epoch == self.epoch;
                (block.0 << 2) | MAPPED | u64::from(trusted)
            }
        };
        let added = self.slots[i] == EMPTY;
        self.slots[i] = raw;
        self.filled += u32::from(added);
        isize::from(added)
    }

    /// Empties slot `i`; returns whether it was filled.
    fn clear(&mut self, i: usize) -> bool {
        let was = self.slots[i] != EMPTY;
        self.slots[i] = EMPTY;
        self.filled -= u32::from(was);
        was
    }
}

/// (device, chunk number) → chunk, and how many slots are filled in them all.
#[derive(Default)]
struct Shard {
    chunks: HashMap<(DevId, u64), Box<Chunk>, RandomState>,
    filled: usize,
}

/// A sharded, bounded map; see the module docs. Each shard (its lock and its table's header)
/// is alone on its cache line, so that two threads locking neighbouring shards do not write
/// the same line.
pub(crate) struct MappingCache {
    shards: Vec<CachePadded<Mutex<Shard>>>,
    /// Filled slots per shard at most (but one chunk always fits).
    max_filled: usize,
    /// Chunks per shard at most.
    max_chunks: usize,
    hasher: RandomState,
}

impl MappingCache {
    /// A cache of at most about `capacity` entries (see the module docs for the bounds).
    pub(crate) fn new(capacity: usize) -> MappingCache {
        MappingCache {
            shards: (0..SHARDS)
                .map(|_| CachePadded::new(Mutex::new(Shard::default())))
                .collect(),
            max_filled: capacity.div_ceil(SHARDS).max(1),
            max_chunks: (capacity / ENTRIES_PER_CHUNK_BOUND).div_ceil(SHARDS).max(1),
            hasher: RandomState::default(),
        }
    }

    /// The chunk key of `v` of `dev`, and `v`'s slot in it.
    fn locate(dev: DevId, v: VirtBlock) -> ((DevId, u64), usize) {
        ((dev, v.0 / CHUNK), (v.0 % CHUNK) as usize)
    }

    /// The index of the shard that holds chunk `key`.
    fn shard_of(&self, key: (DevId, u64)) -> usize {
        // The modulo keeps the index in range.
        (self.hasher.hash_one(key) as usize) % SHARDS
    }

    pub(crate) fn get(&self, dev: DevId, v: VirtBlock) -> Option<Cached> {
        let (key, i) = Self::locate(dev, v);
        let s = self.shards[self.shard_of(key)].lock();
        s.chunks.get(&key).and_then(|c| c.get(i))
    }

    /// Records what the caller just learned under the pool lock.
    pub(crate) fn put(&self, dev: DevId, v: VirtBlock, c: Cached) {
        let (key, i) = Self::locate(dev, v);
        let mut s = self.shards[self.shard_of(key)].lock();
        self.insert(&mut s, key, i, c);
    }

    /// [`put`](MappingCache::put) for each of `entries`, locking a shard once for a run of
    /// entries that fall into it (the blocks of one placement group all do).
    pub(crate) fn put_all(
        &self,
        dev: DevId,
        entries: impl IntoIterator<Item = (VirtBlock, Cached)>,
    ) {
        let mut held: Option<(usize, MutexGuard<'_, Shard>)> = None;
        for (v, c) in entries {
            let (key, i) = Self::locate(dev, v);
            let n = self.shard_of(key);
            if held.as_ref().is_none_or(|(h, _)| *h != n) {
                // One shard lock at a time: let go of the last before taking the next.
                drop(held.take());
                held = Some((n, self.shards[n].lock()));
            }
            if let Some((_, s)) = held.as_mut() {
                self.insert(s, key, i, c);
            }
        }
    }

    fn insert(&self, s: &mut Shard, key: (DevId, u64), i: usize, c: Cached) {
        let epoch = match c {
            Cached::Mapped { epoch, .. } => epoch,
            Cached::Unmapped => 0,
        };
        let change = s
            .chunks
            .entry(key)
            .or_insert_with(|| Chunk::new(epoch))
            .set(i, c);
        s.filled = s.filled.saturating_add_signed(change);
        if s.filled > self.max_filled || s.chunks.len() > self.max_chunks {
            self.evict(s, key);
        }
    }

    /// Drops an arbitrary eighth (at least one) of the shard's chunks other than `keep`
    /// (hash order is effectively random), so the cost of eviction is amortised over many
    /// inserts.
    fn evict(&self, s: &mut Shard, keep: (DevId, u64)) {
        let n = (s.chunks.len() / 8).max(1);
        let victims: Vec<(DevId, u64)> = s
            .chunks
            .keys()
            .filter(|k| **k != keep)
            .take(n)
            .copied()
            .collect();
        for k in victims {
            if let Some(c) = s.chunks.remove(&k) {
                s.filled -= c.filled as usize;
            }
        }
    }

    /// Forgets `[begin, end)` of `dev`.
    pub(crate) fn forget_range(&self, dev: DevId, begin: VirtBlock, end: VirtBlock) {
        if begin >= end {
            return;
        }
        let (first, last) = (begin.0 / CHUNK, (end.0 - 1) / CHUNK);
        // Empties the slots of chunk `key` inside the range; drops the chunk if it empties.
        let forget = |s: &mut Shard, key: (DevId, u64)| {
            let Some(chunk) = s.chunks.get_mut(&key) else {
                return;
            };
            let base = key.1 * CHUNK;
            let (lo, hi) = (begin.0.max(base) - base, end.0.min(base + CHUNK) - base);
            let cleared = (lo as usize..hi as usize)
                .filter(|&i| chunk.clear(i))
                .count();
            let empty = chunk.filled == 0;
            s.filled -= cleared;
            if empty {
                s.chunks.remove(&key);
            }
        };
        if last - first < (self.max_chunks * SHARDS) as u64 {
            for c in first..=last {
                let key = (dev, c);
                forget(&mut self.shards[self.shard_of(key)].lock(), key);
            }
        } else {
            // More chunks in the range than the cache can hold: visit what it holds.
            for shard in &self.shards {
                let mut s = shard.lock();
                let keys: Vec<(DevId, u64)> = s
                    .chunks
                    .keys()
                    .filter(|(d, c)| *d == dev && (first..=last).contains(c))
                    .copied()
                    .collect();
                for key in keys {
                    forget(&mut s, key);
                }
            }
        }
    }

    /// Forgets every entry of `dev` (deleted: its id may be reused).
    pub(crate) fn forget_device(&self, dev: DevId) {
        for shard in &self.shards {
            let mut s = shard.lock();
            let mut dropped = 0;
            s.chunks.retain(|(d, _), c| {
                let keep = *d != dev;
                if !keep {
                    dropped += c.filled as usize;
                }
                keep
            });
            s.filled -= dropped;
        }
    }

    /// Number of entries (tests, memory figures).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().filled).sum()
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
        let bound = 160.max(SHARDS * CHUNK as usize);
        assert!(c.len() <= bound, "{} entries", c.len());
        // Sparse: one entry per chunk, so the chunk bound is the one that holds.
        let sparse = MappingCache::new(160);
        for v in 0..10_000 {
            sparse.put(DevId(1), VirtBlock(v * CHUNK), Cached::Unmapped);
        }
        let chunks: usize = sparse.shards.iter().map(|s| s.lock().chunks.len()).sum();
        assert!(chunks <= SHARDS * sparse.max_chunks, "{chunks} chunks");
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
            .chain(3 * CHUNK..3 * CHUNK + 2)
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
        assert!(
            small.len() <= 160.max(SHARDS * CHUNK as usize),
            "{} entries",
            small.len()
        );
    }

    #[test]
    fn owned_alone_holds_only_for_the_epoch_it_was_learned_in() {
        let c = MappingCache::new(1024);
        let m = |block: u64, exclusive: bool, epoch: u64| Cached::Mapped {
            block: DataBlock(block),
            exclusive,
            epoch,
        };
        c.put(DevId(1), VirtBlock(1), m(10, true, 1));
        assert_eq!(c.get(DevId(1), VirtBlock(1)), Some(m(10, true, 1)));
        // A neighbour learned after a snapshot: the older entry is no longer owned alone.
        c.put(DevId(1), VirtBlock(2), m(11, true, 2));
        assert_eq!(c.get(DevId(1), VirtBlock(1)), Some(m(10, false, 2)));
        assert_eq!(c.get(DevId(1), VirtBlock(2)), Some(m(11, true, 2)));
        // A lookup made before the snapshot, stored after: not owned alone either.
        c.put(DevId(1), VirtBlock(3), m(12, true, 1));
        assert_eq!(c.get(DevId(1), VirtBlock(3)), Some(m(12, false, 2)));
        // Unmapped and other chunks are untouched by epochs.
        c.put(DevId(1), VirtBlock(4), Cached::Unmapped);
        c.put(DevId(1), VirtBlock(CHUNK), m(13, true, 1));
        assert_eq!(c.get(DevId(1), VirtBlock(4)), Some(Cached::Unmapped));
        assert_eq!(c.get(DevId(1), VirtBlock(CHUNK)), Some(m(13, true, 1)));
        // Block numbers that do not fit a slot are not cached (and forget what was there).
        c.put(DevId(1), VirtBlock(4), m(1 << 62, true, 2));
        assert_eq!(c.get(DevId(1), VirtBlock(4)), None);
        assert_eq!(c.len(), 4);
        c.forget_range(DevId(1), VirtBlock(2), VirtBlock(CHUNK + 1));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(DevId(1), VirtBlock(1)), Some(m(10, false, 2)));
    }
}
