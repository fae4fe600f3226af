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
//! 4-byte slots (0 = not cached, 1 = unmapped, else the data block's distance from the
//! chunk's `base` shifted left by two, with the low bits saying "mapped" and "owned alone").
//! A map with one entry per block made each lookup two misses (control bytes, then the
//! 40-byte entry), and in a profile of cached 4 KiB reads `get` was 11 % of the samples,
//! nearly all of it waiting for those two loads. A 4 GiB volume's 65 536 blocks take 256 KiB
//! of slots: half of what 8-byte slots took, so more of them stay in the processor's caches
//! (cached 4 KiB reads, docs/volume.md "Cached reads").
//!
//! Reads look in the group summaries first (`summary.rs`, [`MappingCache::mapped`]): one
//! word per placement group of 16 blocks, in dense pages, kept by the same locks from the
//! slots. They only say what the slots say, in an eighth of the memory and with one load.
//!
//! A slot holds 30 bits of block: a chunk's blocks lie in one window of 2^30 blocks (64 TiB
//! of 64 KiB blocks) starting at `base`: the window of the entry that claims the chunk (window
//! 0 when that entry is "unmapped"), kept until the chunk is given up. A block
//! outside its chunk's window is not cached (its lookups walk the tree); in a pool of fewer
//! than 2^30 data blocks every `base` is 0.
//!
//! Chunk layout in memory (`repr(C)`, 296 bytes): five `AtomicU64`s, `seq`, `dev` (the
//! device id, or `u64::MAX` while free), `number` (virtual block / 64), `epoch` and `base`,
//! then the 64 `AtomicU32` slots; the header shares the first cache line with slots 0–5.
//!
//! Each of the 16 shards keeps its chunks in an arena (allocated 32 chunks at a time, as
//! needed, and kept until the cache goes) and finds them through an index table: open
//! addressing with linear probing, one u64 per entry (`0` vacant, `u64::MAX` removed, else 32
//! bits of the key's hash above the arena index + 1), at most half full of live entries and
//! rebuilt when removed ones would fill it to three quarters. A chunk lives in the shard of
//! its (device, chunk number), so a placement group's entries (`place.rs`, 16 blocks inside
//! one chunk) go in under one lock ([`MappingCache::put_all`]). Keys are hashed with
//! foldhash, seeded at random per process: a guest picks the block numbers, so the seed must
//! not be fixed.
//!
//! # Lookups take no lock
//!
//! Every change happens under the shard's lock; lookups take none. In a profile of cached
//! 4 KiB reads, taking the shard's lock was a fifth of `get`'s samples: the lock's cache line
//! moved between the two cores on every lookup. Now a lookup probes the table, and checks the
//! chunk it finds with the chunk's sequence number (a seqlock): a chunk's key and epoch change
//! only between an odd and the next even `seq`, so a lookup that read the same even `seq`
//! before and after reading the key, the slot and the epoch read them together, and returns
//! the slot only when the key is its own. A single slot changes by one atomic store, seen
//! whole or not at all, and needs no `seq`. Chunks are never freed while the cache lives, so
//! a lookup that reaches a chunk just given up or given to another key reads valid memory and
//! a key that is not its own. A lookup that keeps meeting changes takes the lock. A rebuild
//! of the table can make a lookup miss; nothing can make it return an entry that was not, at
//! some instant during the call, the cache's entry for that block.
//!
//! # Bounds
//!
//! Each shard holds at most its share of `capacity` entries, and at most its share of
//! `capacity / 8` chunks (so memory stays below about 59 bytes per entry of capacity, however
//! sparsely the blocks fall: a chunk is 296 bytes, the index table, allocated whole when the
//! cache is made, takes 16 to 32 bytes per chunk of the bound, and the writers' map about 100
//! more; 256 Ki entries put one per chunk measured 13.7 MiB. A map of single entries took
//! about 64 bytes per entry, dense or not. The group summaries add at most 4 bytes per
//! entry: a 4 KiB page per [`ENTRIES_PER_SUMMARY_PAGE`] entries of capacity, at least 8).
//! When either bound is passed, an arbitrary eighth of the shard's other chunks is dropped.
//! One chunk always fits, so the cache holds at most `max(capacity, SHARDS * CHUNK)` entries.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use crossbeam_utils::CachePadded;
use foldhash::fast::RandomState;
use parking_lot::Mutex;

use crate::units::{DataBlock, DevId, VirtBlock};

use super::place::PLACE_GROUP;
use super::summary::{PAGE_GROUPS, Summaries};

const SHARDS: usize = 16;

/// Consecutive virtual blocks of a device kept together in one array of slots.
const CHUNK: u64 = 64;

/// Chunks allowed per entry of capacity, over all shards: one chunk per this many entries.
const ENTRIES_PER_CHUNK_BOUND: usize = 8;

/// Chunks allocated together in a shard's arena.
const SEGMENT: usize = 32;

/// Times a lookup retries without the lock when it meets a chunk being changed.
const OPTIMISTIC_TRIES: usize = 3;

/// Slot values (see the module docs).
const EMPTY: u32 = 0;
const UNMAPPED: u32 = 1;
const MAPPED: u32 = 0b10;
const EXCLUSIVE: u32 = 0b01;

/// Bits of a slot that hold the block's distance from its chunk's `base`.
const WINDOW_BITS: u32 = 30;

/// A chunk's `dev` while it holds no device's blocks (device ids are 24 bits).
const NO_DEV: u64 = u64::MAX;

/// Index table entries: `VACANT` ends a probe, `GONE` (a removed entry) does not; any other
/// value is `tag << 32 | (arena index + 1)`, the tag being 32 bits of the chunk key's hash.
const VACANT: u64 = 0;
const GONE: u64 = u64::MAX;

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

/// The slots of [`CHUNK`] consecutive virtual blocks of one device, in a shard's arena.
///
/// Changed only under the shard's lock, read with or without it. A change of key or epoch is
/// bracketed by `seq` (odd while it lasts); a slot alone is changed by one atomic store, which
/// a reader sees whole or not at all. `repr(C)` keeps the layout the module docs describe.
#[repr(C)]
struct Chunk {
    /// Seqlock sequence: even while the key and epoch are stable.
    seq: AtomicU64,
    /// The device of the key ([`NO_DEV`] while the chunk is free).
    dev: AtomicU64,
    /// The chunk number of the key (virtual block / [`CHUNK`]).
    number: AtomicU64,
    /// The snapshot epoch every "owned alone" bit in `slots` was learned under.
    epoch: AtomicU64,
    /// The first data block of the window the slots' blocks lie in (a multiple of
    /// 2^[`WINDOW_BITS`]).
    base: AtomicU64,
    slots: [AtomicU32; CHUNK as usize],
}

// The layout the module docs describe, and the memory bound they give.
const _: () = assert!(std::mem::size_of::<Chunk>() == 296);
// A placement group's blocks lie in one chunk, so one shard lock covers its summary word.
const _: () = assert!(CHUNK % PLACE_GROUP == 0);
// And a chunk's groups lie in one page of summaries.
const _: () = assert!(PAGE_GROUPS % (CHUNK / PLACE_GROUP) == 0);

/// Entries of capacity per page place of the group summaries (4 KiB each: 4 bytes per entry).
const ENTRIES_PER_SUMMARY_PAGE: usize = 1024;

impl Chunk {
    fn free() -> Chunk {
        Chunk {
            seq: AtomicU64::new(0),
            dev: AtomicU64::new(NO_DEV),
            number: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            base: AtomicU64::new(0),
            slots: [const { AtomicU32::new(EMPTY) }; CHUNK as usize],
        }
    }

    /// Starts a change of key or epoch (shard lock held); returns the value `end` takes.
    fn begin(&self) -> u64 {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s + 1, Ordering::Relaxed);
        // Orders the odd sequence before the stores of the change, for readers that see one.
        fence(Ordering::Release);
        s
    }

    /// Ends the change `begin` started.
    fn end(&self, s: u64) {
        self.seq.store(s + 2, Ordering::Release);
    }

    /// Slot `i` with the chunk's epoch; exact when no change can run (shard lock held), or
    /// when the caller checks `seq` around it.
    fn read(&self, i: usize) -> Option<Cached> {
        let raw = self.slots[i].load(Ordering::Acquire);
        let epoch = self.epoch.load(Ordering::Relaxed);
        match raw {
            EMPTY => None,
            UNMAPPED => Some(Cached::Unmapped),
            raw => Some(Cached::Mapped {
                block: DataBlock(self.base.load(Ordering::Relaxed) + u64::from(raw >> 2)),
                exclusive: raw & EXCLUSIVE != 0,
                epoch,
            }),
        }
    }

    /// Slot `i` if the chunk holds `key`, read without the shard lock. `Err` when a change
    /// ran meanwhile (try again).
    fn read_unlocked(&self, key: (DevId, u64), i: usize) -> Result<Option<Option<Cached>>, ()> {
        let s1 = self.seq.load(Ordering::Acquire);
        if s1 & 1 == 1 {
            return Err(());
        }
        let held = (
            self.dev.load(Ordering::Relaxed),
            self.number.load(Ordering::Relaxed),
        );
        let value = self.read(i);
        // Any load above that saw a change's store makes `seq` below show that change.
        fence(Ordering::Acquire);
        if self.seq.load(Ordering::Relaxed) != s1 {
            return Err(());
        }
        Ok((held == (u64::from(key.0.0), key.1)).then_some(value))
    }

    /// Stores `c` in slot `i` (shard lock held); returns the change in filled slots (-1, 0
    /// or 1). A data block outside the chunk's window cannot be encoded: the slot is emptied
    /// instead (the block stays uncached rather than stale).
    fn set(&self, i: usize, c: Cached) -> isize {
        let raw = match c {
            Cached::Unmapped => UNMAPPED,
            Cached::Mapped {
                block,
                exclusive,
                epoch,
            } => {
                let Some(offset) = block
                    .0
                    .checked_sub(self.base.load(Ordering::Relaxed))
                    .filter(|d| d >> WINDOW_BITS == 0)
                else {
                    return -isize::from(self.clear(i));
                };
                let mut current = self.epoch.load(Ordering::Relaxed);
                if epoch > current {
                    // Older "owned alone" bits would pass for this epoch's: clear them, in
                    // one change with the epoch, so no reader pairs an old bit with it.
                    let s = self.begin();
                    for slot in &self.slots {
                        let v = slot.load(Ordering::Relaxed);
                        if v > UNMAPPED {
                            slot.store(v & !EXCLUSIVE, Ordering::Relaxed);
                        }
                    }
                    self.epoch.store(epoch, Ordering::Relaxed);
                    self.end(s);
                    current = epoch;
                }
                let trusted = exclusive && epoch == current;
                // Fits: `offset` is below 2^30.
                ((offset as u32) << 2) | MAPPED | u32::from(trusted)
            }
        };
        let was = self.slots[i].swap(raw, Ordering::Release);
        isize::from(was == EMPTY)
    }

    /// The data block slot `i` holds as mapped, if it does (shard lock held).
    fn mapped(&self, i: usize) -> Option<DataBlock> {
        match self.read(i)? {
            Cached::Mapped { block, .. } => Some(block),
            Cached::Unmapped => None,
        }
    }

    /// Empties slot `i` (shard lock held); returns whether it was filled.
    fn clear(&self, i: usize) -> bool {
        self.slots[i].swap(EMPTY, Ordering::Release) != EMPTY
    }

    /// Gives the chunk `key`, empty, with the window that holds `block` (shard lock held; the
    /// chunk is free).
    fn claim(&self, key: (DevId, u64), epoch: u64, block: DataBlock) {
        let s = self.begin();
        self.dev.store(u64::from(key.0.0), Ordering::Relaxed);
        self.number.store(key.1, Ordering::Relaxed);
        self.epoch.store(epoch, Ordering::Relaxed);
        self.base
            .store(block.0 >> WINDOW_BITS << WINDOW_BITS, Ordering::Relaxed);
        self.end(s);
    }

    /// Empties the chunk and frees it (shard lock held).
    fn release(&self) {
        let s = self.begin();
        self.dev.store(NO_DEV, Ordering::Relaxed);
        for slot in &self.slots {
            slot.store(EMPTY, Ordering::Relaxed);
        }
        self.end(s);
    }
}

/// What the writers of a shard keep under its lock about one chunk in use.
struct Held {
    /// Index in the shard's arena.
    index: u32,
    /// The key's hash (a rebuild of the index table links the chunk again with it).
    hash: u64,
    /// Position of its entry in the shard's index table.
    pos: usize,
    /// Slots not [`EMPTY`].
    filled: u32,
}

/// The writers' side of a shard, under its lock.
#[derive(Default)]
struct Writers {
    chunks: HashMap<(DevId, u64), Held, RandomState>,
    /// Arena indices of free chunks that were used before.
    spare: Vec<u32>,
    /// Arena indices from here on were never used.
    unused: u32,
    /// Filled slots in all of the shard's chunks.
    filled: usize,
    /// [`GONE`] entries in the index table.
    gone: usize,
}

/// One shard: an index table and an arena of chunks, both read without a lock, and a lock
/// that every change takes.
struct Shard {
    /// Open addressing with linear probing; see [`VACANT`] and [`GONE`].
    table: Box<[AtomicU64]>,
    /// The arena, a segment of [`SEGMENT`] chunks at a time, allocated on first use and kept
    /// until the cache goes (a reader may still look at a chunk that was given up).
    segments: Box<[OnceLock<Box<[Chunk]>>]>,
    /// Alone on its cache line: readers never write it, and their loads of the fields above
    /// must not meet the writers' stores to it.
    writers: CachePadded<Mutex<Writers>>,
}

impl Shard {
    fn new(max_chunks: usize) -> Shard {
        // One chunk more than the bound: a chunk is added before the eviction it causes.
        let arena = max_chunks + 1;
        Shard {
            table: (0..(2 * arena).next_power_of_two().max(8))
                .map(|_| AtomicU64::new(VACANT))
                .collect(),
            segments: (0..arena.div_ceil(SEGMENT))
                .map(|_| OnceLock::new())
                .collect(),
            writers: CachePadded::new(Mutex::new(Writers::default())),
        }
    }

    /// The chunk at arena `index`, if its segment exists.
    fn chunk(&self, index: u32) -> Option<&Chunk> {
        let index = index as usize;
        self.segments
            .get(index / SEGMENT)?
            .get()
            .map(|seg| &seg[index % SEGMENT])
    }

    /// Where a probe for `hash` starts, and the tag its entries carry.
    fn probe_start(&self, hash: u64) -> (usize, u64) {
        // The low bits chose the shard; the table takes the bits above them.
        ((hash >> 8) as usize & (self.table.len() - 1), hash >> 32)
    }

    /// Slot `i` of chunk `key`, without the lock; `Err` when a chunk on the way was being
    /// changed. A miss may be false while the table is rebuilt, never a hit.
    fn peek(&self, hash: u64, key: (DevId, u64), i: usize) -> Result<Option<Cached>, ()> {
        let (mut pos, tag) = self.probe_start(hash);
        let mask = self.table.len() - 1;
        for _ in 0..self.table.len() {
            let e = self.table[pos].load(Ordering::Acquire);
            if e == VACANT {
                return Ok(None);
            }
            if e != GONE && e >> 32 == tag {
                if let Some(chunk) = self.chunk((e as u32).wrapping_sub(1)) {
                    if let Some(found) = chunk.read_unlocked(key, i)? {
                        return Ok(found);
                    }
                }
            }
            pos = (pos + 1) & mask;
        }
        Ok(None)
    }

    /// Puts an entry for arena `index` into the table (lock held); returns its position and
    /// whether it took the place of a removed entry.
    fn link(&self, hash: u64, index: u32) -> (usize, bool) {
        let (mut pos, tag) = self.probe_start(hash);
        let mask = self.table.len() - 1;
        // The table has room: at most half of it is live (see `new`), and `drop_chunk`
        // rebuilds it before removed entries fill the rest.
        loop {
            let e = self.table[pos].load(Ordering::Relaxed);
            if e == VACANT || e == GONE {
                self.table[pos].store(tag << 32 | (u64::from(index) + 1), Ordering::Release);
                return (pos, e == GONE);
            }
            pos = (pos + 1) & mask;
        }
    }
}

/// A sharded, bounded map whose lookups take no lock; see the module docs.
pub(crate) struct MappingCache {
    shards: Vec<Shard>,
    /// Filled slots per shard at most (but one chunk always fits).
    max_filled: usize,
    /// Chunks per shard at most.
    max_chunks: usize,
    hasher: RandomState,
    /// The mapped entries again, one word per placement group, for reads.
    summaries: Summaries,
}

impl MappingCache {
    /// A cache of at most about `capacity` entries (see the module docs for the bounds).
    pub(crate) fn new(capacity: usize) -> MappingCache {
        // Arena indices are u32 (and index + 1 must not be u32::MAX, see GONE).
        let max_chunks = (capacity / ENTRIES_PER_CHUNK_BOUND)
            .div_ceil(SHARDS)
            .clamp(1, 1 << 30);
        MappingCache {
            shards: (0..SHARDS).map(|_| Shard::new(max_chunks)).collect(),
            max_filled: capacity.div_ceil(SHARDS).max(1),
            max_chunks,
            hasher: RandomState::default(),
            summaries: Summaries::new(capacity.div_ceil(ENTRIES_PER_SUMMARY_PAGE)),
        }
    }

    /// The chunk key of `v` of `dev`, and `v`'s slot in it.
    fn locate(dev: DevId, v: VirtBlock) -> ((DevId, u64), usize) {
        ((dev, v.0 / CHUNK), (v.0 % CHUNK) as usize)
    }

    /// The hash of chunk `key` and the shard that holds it.
    fn shard_of(&self, key: (DevId, u64)) -> (u64, &Shard) {
        let hash = self.hasher.hash_one(key);
        // The modulo keeps the index in range.
        (hash, &self.shards[hash as usize % SHARDS])
    }

    /// What the cache knows of `v` of `dev`. Takes no lock unless a chunk on the way is
    /// being changed (a snapshot's new epoch, an eviction) several times over.
    pub(crate) fn get(&self, dev: DevId, v: VirtBlock) -> Option<Cached> {
        let (key, i) = Self::locate(dev, v);
        let (hash, shard) = self.shard_of(key);
        for _ in 0..OPTIMISTIC_TRIES {
            match shard.peek(hash, key, i) {
                Ok(found) => return found,
                Err(()) => std::hint::spin_loop(),
            }
        }
        let w = shard.writers.lock();
        let held = w.chunks.get(&key)?;
        shard.chunk(held.index)?.read(i)
    }

    /// The data block `v` of `dev` is mapped to, if the group summaries say so: for reads,
    /// which need neither "owned alone" nor "unmapped" ([`get`](MappingCache::get) has
    /// both). One load where `get` makes two dependent ones (`summary.rs`). Takes no lock.
    pub(crate) fn mapped(&self, dev: DevId, v: VirtBlock) -> Option<DataBlock> {
        self.summaries.get(dev, v)
    }

    /// Records what the caller just learned under the pool lock.
    pub(crate) fn put(&self, dev: DevId, v: VirtBlock, c: Cached) {
        self.put_all(dev, [(v, c)]);
    }

    /// [`put`](MappingCache::put) for each of `entries`, locking a shard once for a run of
    /// entries that fall into it (the blocks of one placement group all do).
    pub(crate) fn put_all(
        &self,
        dev: DevId,
        entries: impl IntoIterator<Item = (VirtBlock, Cached)>,
    ) {
        let mut held: Option<(&Shard, parking_lot::MutexGuard<'_, Writers>)> = None;
        for (v, c) in entries {
            let (key, i) = Self::locate(dev, v);
            let (hash, shard) = self.shard_of(key);
            if held.as_ref().is_none_or(|(h, _)| !std::ptr::eq(*h, shard)) {
                // One shard lock at a time: let go of the last before taking the next.
                drop(held.take());
                held = Some((shard, shard.writers.lock()));
            }
            if let Some((_, w)) = held.as_mut() {
                self.insert(shard, w, hash, key, i, c);
            }
        }
    }

    fn insert(
        &self,
        shard: &Shard,
        w: &mut Writers,
        hash: u64,
        key: (DevId, u64),
        i: usize,
        c: Cached,
    ) {
        let (epoch, block) = match c {
            Cached::Mapped { epoch, block, .. } => (epoch, block),
            Cached::Unmapped => (0, DataBlock(0)),
        };
        let index = match w.chunks.get(&key) {
            Some(h) => h.index,
            None => {
                let Some(index) = self.new_chunk(shard, w) else {
                    return;
                };
                if let Some(chunk) = shard.chunk(index) {
                    chunk.claim(key, epoch, block);
                }
                let (pos, was_gone) = shard.link(hash, index);
                w.gone -= usize::from(was_gone);
                w.chunks.insert(
                    key,
                    Held {
                        index,
                        hash,
                        pos,
                        filled: 0,
                    },
                );
                index
            }
        };
        let change = shard.chunk(index).map_or(0, |chunk| {
            // The summaries never say more than the slots: the block's bit goes before the
            // slot changes, and comes back (if the new entry is on the run) after.
            let first = i - i % PLACE_GROUP as usize;
            self.summaries.change(
                key.0,
                VirtBlock(key.1 * CHUNK + i as u64),
                || chunk.set(i, c),
                |j| chunk.mapped(first + j as usize),
            )
        });
        // 0 when an entry was replaced, the usual case: then no count needs a second lookup.
        if change != 0 {
            if let Some(h) = w.chunks.get_mut(&key) {
                h.filled = h.filled.saturating_add_signed(change as i32);
            }
            w.filled = w.filled.saturating_add_signed(change);
        }
        if w.filled > self.max_filled || w.chunks.len() > self.max_chunks {
            self.evict(shard, w, key);
        }
    }

    /// A free chunk of `shard`'s arena (lock held), allocating its segment when new.
    fn new_chunk(&self, shard: &Shard, w: &mut Writers) -> Option<u32> {
        if let Some(index) = w.spare.pop() {
            return Some(index);
        }
        let index = w.unused;
        let seg = shard.segments.get(index as usize / SEGMENT)?;
        seg.get_or_init(|| (0..SEGMENT).map(|_| Chunk::free()).collect());
        w.unused += 1;
        Some(index)
    }

    /// Frees chunk `key` of `shard` (lock held).
    fn drop_chunk(&self, shard: &Shard, w: &mut Writers, key: (DevId, u64)) {
        let Some(h) = w.chunks.remove(&key) else {
            return;
        };
        w.filled -= h.filled as usize;
        shard.table[h.pos].store(GONE, Ordering::Release);
        w.gone += 1;
        self.summaries
            .clear_blocks(key.0, VirtBlock(key.1 * CHUNK), CHUNK);
        if let Some(chunk) = shard.chunk(h.index) {
            chunk.release();
        }
        w.spare.push(h.index);
        if w.chunks.len() + w.gone > shard.table.len() / 4 * 3 {
            self.rebuild(shard, w);
        }
    }

    /// Rewrites `shard`'s index table without its removed entries (lock held). Lookups that
    /// run meanwhile may miss; they never find a wrong chunk (they check its key).
    fn rebuild(&self, shard: &Shard, w: &mut Writers) {
        for e in shard.table.iter() {
            e.store(VACANT, Ordering::Relaxed);
        }
        w.gone = 0;
        for h in w.chunks.values_mut() {
            h.pos = shard.link(h.hash, h.index).0;
        }
    }

    /// Drops an arbitrary eighth (at least one) of the shard's chunks other than `keep`
    /// (hash order is effectively random), so the cost of eviction is amortised over many
    /// inserts.
    fn evict(&self, shard: &Shard, w: &mut Writers, keep: (DevId, u64)) {
        let n = (w.chunks.len() / 8).max(1);
        let victims: Vec<(DevId, u64)> = w
            .chunks
            .keys()
            .filter(|k| **k != keep)
            .take(n)
            .copied()
            .collect();
        for k in victims {
            self.drop_chunk(shard, w, k);
        }
    }

    /// Empties the slots of chunk `key` inside `[begin, end)`; frees the chunk if it empties
    /// (lock held).
    fn forget_in(
        &self,
        shard: &Shard,
        w: &mut Writers,
        key: (DevId, u64),
        begin: VirtBlock,
        end: VirtBlock,
    ) {
        let Some(h) = w.chunks.get_mut(&key) else {
            return;
        };
        let Some(chunk) = shard.chunk(h.index) else {
            return;
        };
        let base = key.1 * CHUNK;
        let (lo, hi) = (begin.0.max(base) - base, end.0.min(base + CHUNK) - base);
        self.summaries
            .clear_blocks(key.0, VirtBlock(base + lo), hi - lo);
        let cleared = (lo as usize..hi as usize)
            .filter(|&i| chunk.clear(i))
            .count();
        h.filled -= cleared as u32;
        let empty = h.filled == 0;
        w.filled -= cleared;
        if empty {
            self.drop_chunk(shard, w, key);
        }
    }

    /// Forgets `[begin, end)` of `dev`.
    pub(crate) fn forget_range(&self, dev: DevId, begin: VirtBlock, end: VirtBlock) {
        if begin >= end {
            return;
        }
        let (first, last) = (begin.0 / CHUNK, (end.0 - 1) / CHUNK);
        if last - first < (self.max_chunks * SHARDS) as u64 {
            for c in first..=last {
                let key = (dev, c);
                let (_, shard) = self.shard_of(key);
                self.forget_in(shard, &mut shard.writers.lock(), key, begin, end);
            }
        } else {
            // More chunks in the range than the cache can hold: visit what it holds.
            for shard in &self.shards {
                let mut w = shard.writers.lock();
                let keys: Vec<(DevId, u64)> = w
                    .chunks
                    .keys()
                    .filter(|(d, c)| *d == dev && (first..=last).contains(c))
                    .copied()
                    .collect();
                for key in keys {
                    self.forget_in(shard, &mut w, key, begin, end);
                }
            }
        }
    }

    /// Forgets every entry of `dev` (deleted: its id may be reused).
    pub(crate) fn forget_device(&self, dev: DevId) {
        // Every shard's lock, in order (nothing else holds two): the summaries' places are
        // given back only while no shard can write a word.
        let mut held: Vec<_> = self.shards.iter().map(|s| s.writers.lock()).collect();
        for (shard, w) in self.shards.iter().zip(held.iter_mut()) {
            let keys: Vec<(DevId, u64)> = w
                .chunks
                .keys()
                .filter(|(d, _)| *d == dev)
                .copied()
                .collect();
            for key in keys {
                self.drop_chunk(shard, w, key);
            }
        }
        self.summaries.release_device(dev);
    }

    /// Number of entries (tests, memory figures).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.writers.lock().filled).sum()
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
        let chunks: usize = sparse
            .shards
            .iter()
            .map(|s| s.writers.lock().chunks.len())
            .sum();
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

    /// A lookup that read a table entry just before its chunk was dropped and given to another
    /// key (the entry put back by hand, as that lookup still holds it) must not return the
    /// other key's entry.
    #[test]
    fn a_stale_table_entry_never_finds_another_keys_chunk() {
        let c = MappingCache::new(1 << 16);
        let mapped = |block: u64| Cached::Mapped {
            block: DataBlock(block),
            exclusive: true,
            epoch: 1,
        };
        let a = (DevId(1), 0u64);
        let (hash_a, shard) = c.shard_of(a);
        c.put(a.0, VirtBlock(0), mapped(10));
        let (pos, entry) = {
            let w = shard.writers.lock();
            let pos = w.chunks[&a].pos;
            (pos, shard.table[pos].load(Ordering::Relaxed))
        };
        c.forget_device(a.0);
        // A key of the same shard, whose table entry goes elsewhere: its new chunk reuses
        // A's (the last one freed).
        let b = (1..)
            .map(|n| (DevId(2), n))
            .find(|&k| {
                let h = c.shard_of(k).0;
                h as usize % SHARDS == hash_a as usize % SHARDS && shard.probe_start(h).0 != pos
            })
            .expect("a key in the same shard");
        c.put(b.0, VirtBlock(b.1 * CHUNK), mapped(20));
        assert_eq!(
            shard.writers.lock().chunks[&b].index as u64 + 1,
            entry & 0xffff_ffff,
            "B took A's chunk"
        );
        shard.table[pos].store(entry, Ordering::Relaxed);
        assert_eq!(c.get(a.0, VirtBlock(0)), None);
        assert_eq!(c.get(b.0, VirtBlock(b.1 * CHUNK)), Some(mapped(20)));
    }

    /// Lookups without the lock, while a writer moves epochs, evicts, reuses chunks for other
    /// keys and so rebuilds the index tables: every hit must be an entry that was put for
    /// that block, and "owned alone" only with the epoch it was put under.
    #[test]
    fn lookups_without_the_lock_see_whole_entries() {
        use std::sync::Arc;
        use std::sync::atomic::AtomicBool;

        // Two chunks per shard: nearly every put evicts or reuses a chunk.
        let c = Arc::new(MappingCache::new(SHARDS * 16));
        // Device (2 bits), block (9 bits) and epoch (its low 19 bits): one 2^30 window.
        let block_of =
            |dev: u32, v: u64, epoch: u64| (u64::from(dev) << 28) | (v << 19) | (epoch & 0x7ffff);
        let done = Arc::new(AtomicBool::new(false));
        let readers: Vec<_> = (0..2)
            .map(|r| {
                let (c, done) = (Arc::clone(&c), Arc::clone(&done));
                std::thread::spawn(move || {
                    let (mut hits, mut owned, mut summarized, mut n) = (0u64, 0u64, 0u64, r as u64);
                    while !done.load(Ordering::Relaxed) {
                        n = n
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        let (dev, v) = (1 + (n >> 60) as u32 % 3, (n >> 20) % (CHUNK * 8));
                        if let Some(block) = c.mapped(DevId(dev), VirtBlock(v)) {
                            summarized += 1;
                            assert_eq!(
                                block.0 >> 19,
                                block_of(dev, v, 0) >> 19,
                                "summary: dev {dev} block {v}"
                            );
                        }
                        if let Some(Cached::Mapped {
                            block,
                            exclusive,
                            epoch,
                        }) = c.get(DevId(dev), VirtBlock(v))
                        {
                            hits += 1;
                            assert_eq!(
                                block.0 >> 19,
                                block_of(dev, v, 0) >> 19,
                                "dev {dev} block {v}"
                            );
                            if exclusive {
                                owned += 1;
                                assert_eq!(
                                    epoch & 0x7ffff,
                                    block.0 & 0x7ffff,
                                    "dev {dev} block {v}"
                                );
                            }
                        }
                    }
                    (hits, owned, summarized)
                })
            })
            .collect();
        let (mut n, start) = (7u64, std::time::Instant::now());
        for round in 0u64.. {
            if round % 1024 == 0 && start.elapsed() > std::time::Duration::from_secs(1) {
                break;
            }
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (dev, v) = (1 + (n >> 60) as u32 % 3, (n >> 20) % (CHUNK * 8));
            // The epoch moves every 16 puts; now and then a put comes from an older one.
            let epoch = (round / 16 + 1).saturating_sub(n >> 62 & 1);
            c.put(
                DevId(dev),
                VirtBlock(v),
                Cached::Mapped {
                    block: DataBlock(block_of(dev, v, epoch)),
                    exclusive: true,
                    epoch,
                },
            );
            match round % 50_000 {
                0 => c.forget_device(DevId(dev)),
                25_000 => c.forget_range(DevId(dev), VirtBlock(v), VirtBlock(v + CHUNK)),
                _ => {}
            }
        }
        done.store(true, Ordering::Relaxed);
        for r in readers {
            let (hits, owned, summarized) = r.join().expect("reader");
            assert!(
                hits > 0 && owned > 0 && summarized > 0,
                "{hits} hits, {owned} owned alone, {summarized} from the summaries"
            );
        }
        assert!(c.len() <= SHARDS * CHUNK as usize);
    }

    /// The group summaries say only what the cache holds: after every put, forget and
    /// eviction (a small cache), a block the summaries map is mapped there in the cache, and
    /// a placement group's run written in order is summarized whole.
    #[test]
    fn summaries_agree_with_the_cache() {
        let c = MappingCache::new(SHARDS * 16);
        let span = CHUNK * 12;
        let check = |c: &MappingCache, step: u64| {
            for dev in 1..3 {
                for v in 0..span {
                    if let Some(b) = c.mapped(DevId(dev), VirtBlock(v)) {
                        match c.get(DevId(dev), VirtBlock(v)) {
                            Some(Cached::Mapped { block, .. }) => {
                                assert_eq!(block, b, "step {step}: dev {dev} block {v}")
                            }
                            other => {
                                panic!("step {step}: dev {dev} block {v}: {other:?}, summary {b:?}")
                            }
                        }
                    }
                }
            }
        };
        let mut n = 11u64;
        let mut summarized = 0;
        for step in 0..6_000u64 {
            n = n
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let (dev, v) = (1 + (n >> 62) as u32 % 2, (n >> 20) % span);
            // Mostly the group's run (base 1000 per group), sometimes a block off it.
            let run = 1000 * (v / PLACE_GROUP) + v % PLACE_GROUP;
            let block = if n >> 40 & 7 == 0 { run + 3 } else { run };
            match n >> 44 & 31 {
                0 => c.forget_range(DevId(dev), VirtBlock(v), VirtBlock(v + n % 100)),
                1 if step % 7 == 0 => c.forget_device(DevId(dev)),
                2 => c.put(DevId(dev), VirtBlock(v), Cached::Unmapped),
                _ => c.put(
                    DevId(dev),
                    VirtBlock(v),
                    Cached::Mapped {
                        block: DataBlock(block),
                        exclusive: true,
                        epoch: step / 500,
                    },
                ),
            }
            if step % 97 == 0 {
                check(&c, step);
                summarized += (0..span)
                    .filter(|&v| c.mapped(DevId(1), VirtBlock(v)).is_some())
                    .count();
            }
        }
        assert!(summarized > 0);
        // A whole run, put as a placement group puts it.
        let big = MappingCache::new(1 << 16);
        big.put_all(
            DevId(5),
            (0..PLACE_GROUP).map(|i| {
                (
                    VirtBlock(32 + i),
                    Cached::Mapped {
                        block: DataBlock(700 + i),
                        exclusive: false,
                        epoch: 0,
                    },
                )
            }),
        );
        for i in 0..PLACE_GROUP {
            assert_eq!(
                big.mapped(DevId(5), VirtBlock(32 + i)),
                Some(DataBlock(700 + i))
            );
        }
        big.forget_device(DevId(5));
        assert_eq!(big.mapped(DevId(5), VirtBlock(33)), None);
    }

    /// A deleted device gives its summary places back: with all 8 places of a small cache
    /// taken by one device's regions, another device's blocks are summarized only after it.
    #[test]
    fn a_forgotten_device_gives_its_summary_places_back() {
        let c = MappingCache::new(1024);
        let region = |r: u64| VirtBlock(r * PLACE_GROUP * PAGE_GROUPS);
        let m = |block: u64| Cached::Mapped {
            block: DataBlock(block),
            exclusive: true,
            epoch: 0,
        };
        for r in 0..8 {
            c.put(DevId(1), region(r), m(r));
        }
        let summarized = |dev: u32| {
            (0..8)
                .filter(|&r| c.mapped(DevId(dev), region(r)).is_some())
                .count()
        };
        assert_eq!(summarized(1), 8);
        for r in 0..8 {
            c.put(DevId(2), region(r), m(100 + r));
        }
        assert_eq!(summarized(2), 0);
        c.forget_device(DevId(1));
        for r in 0..8 {
            c.put(DevId(2), region(r), m(200 + r));
        }
        assert_eq!((summarized(1), summarized(2)), (0, 8));
    }

    /// A chunk keeps the window of the entry that claimed it: blocks far above 2^30 are
    /// cached exactly, blocks of another window not at all.
    #[test]
    fn a_chunk_caches_the_window_of_its_first_block() {
        let c = MappingCache::new(1024);
        let m = |block: u64| Cached::Mapped {
            block: DataBlock(block),
            exclusive: true,
            epoch: 1,
        };
        let high = (5 << 30) + 7;
        c.put(DevId(1), VirtBlock(0), m(high));
        c.put(DevId(1), VirtBlock(1), m((6 << 30) - 1));
        c.put(DevId(1), VirtBlock(2), m(6 << 30));
        c.put(DevId(1), VirtBlock(3), m(12));
        c.put(DevId(1), VirtBlock(4), Cached::Unmapped);
        assert_eq!(c.get(DevId(1), VirtBlock(0)), Some(m(high)));
        assert_eq!(c.get(DevId(1), VirtBlock(1)), Some(m((6 << 30) - 1)));
        assert_eq!(c.get(DevId(1), VirtBlock(2)), None);
        assert_eq!(c.get(DevId(1), VirtBlock(3)), None);
        assert_eq!(c.get(DevId(1), VirtBlock(4)), Some(Cached::Unmapped));
        // The largest block a mapping can hold (40 bits in dm-thin's format), in a chunk of
        // its own.
        let top = (1 << 40) - 1;
        c.put(DevId(1), VirtBlock(CHUNK), m(top));
        assert_eq!(c.get(DevId(1), VirtBlock(CHUNK)), Some(m(top)));
        // A chunk whose first entry was unmapped takes window 0.
        c.put(DevId(1), VirtBlock(2 * CHUNK), Cached::Unmapped);
        c.put(DevId(1), VirtBlock(2 * CHUNK + 1), m(high));
        c.put(DevId(1), VirtBlock(2 * CHUNK + 2), m(9));
        assert_eq!(c.get(DevId(1), VirtBlock(2 * CHUNK + 1)), None);
        assert_eq!(c.get(DevId(1), VirtBlock(2 * CHUNK + 2)), Some(m(9)));
        assert_eq!(c.len(), 6);
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
        // Block numbers outside the chunk's window are not cached (and forget what was there).
        c.put(DevId(1), VirtBlock(4), m(1 << 30, true, 2));
        assert_eq!(c.get(DevId(1), VirtBlock(4)), None);
        assert_eq!(c.len(), 4);
        c.forget_range(DevId(1), VirtBlock(2), VirtBlock(CHUNK + 1));
        assert_eq!(c.len(), 1);
        assert_eq!(c.get(DevId(1), VirtBlock(1)), Some(m(10, false, 2)));
    }
}
