//! The block cache: bounded, sharded, with dirty tracking and per-kind validation.
//!
//! - Reads take `&self` and lock one of [`NR_SHARDS`] shards for a hash lookup, so many threads
//!   read in parallel. A block read from disk is validated (checksum, block number, magic) once,
//!   when it enters the cache; a cached block remembers which validator accepted it.
//! - A block is modified by *checking it out* ([`BlockMut`]): it leaves its shard while the
//!   caller holds it (a read of a checked-out block is reported as an internal error rather
//!   than returning stale bytes) and comes back dirty when the guard drops.
//! - Memory is bounded by the configured number of blocks (plus the few blocks checked out or
//!   held by readers at a time): each shard evicts with the CLOCK algorithm. Readers evict only
//!   clean blocks; writers may also evict a dirty block by writing it first. That early write is
//!   safe because only blocks allocated in the current transaction are ever dirty (the
//!   transaction manager guarantees it), and nothing committed points at them yet.
//! - Dirty blocks are sealed (checksum and block number filled in by their validator) just
//!   before they are written.

use crate::checksum::Validator;
use crate::error::{BlockKind, Error, OptBlock, Result};
use crate::io::BlockIo;
use crate::{BLOCK_SIZE, Block, MetaBlock};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Number of independently locked parts of the cache.
pub const NR_SHARDS: usize = 16;
const CHECKED_OUT: usize = usize::MAX;

/// A hasher for block numbers: one multiply, good enough for keys that are small integers.
#[derive(Default)]
pub(crate) struct BlockHasher(u64);

impl Hasher for BlockHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (n ^ (n >> 29)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

pub(crate) type BlockMap<V> = HashMap<u64, V, BuildHasherDefault<BlockHasher>>;

struct Slot {
    nr: u64,
    data: Arc<Block>,
    dirty: bool,
    validator: &'static dyn Validator,
    referenced: bool,
}

#[derive(Default)]
struct Shard {
    map: BlockMap<usize>,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    hand: usize,
    len: usize,
}

impl Shard {
    fn insert_slot(&mut self, slot: Slot) {
        let nr = slot.nr;
        let idx = match self.free.pop() {
            Some(i) => {
                self.slots[i] = Some(slot);
                i
            }
            None => {
                self.slots.push(Some(slot));
                self.slots.len() - 1
            }
        };
        self.map.insert(nr, idx);
        self.len += 1;
    }

    fn remove_slot(&mut self, idx: usize) -> Option<Slot> {
        let slot = self.slots.get_mut(idx)?.take()?;
        self.free.push(idx);
        self.len -= 1;
        Some(slot)
    }

    /// Evicts until at most `cap` blocks remain. Dirty victims are written first when `io` is
    /// given, and skipped otherwise.
    fn evict(&mut self, cap: usize, io: Option<&dyn BlockIo>) -> Result<()> {
        let mut budget = 2 * self.slots.len() + 2;
        while self.len > cap && budget > 0 {
            budget -= 1;
            if self.slots.is_empty() {
                break;
            }
            self.hand = (self.hand + 1) % self.slots.len();
            let idx = self.hand;
            let Some(slot) = self.slots[idx].as_mut() else {
                continue;
            };
            if slot.referenced {
                slot.referenced = false;
                continue;
            }
            if slot.dirty {
                let Some(io) = io else { continue };
                let data = Arc::make_mut(&mut slot.data);
                slot.validator.seal(MetaBlock(slot.nr), data);
                io.write(MetaBlock(slot.nr), data).map_err(|e| Error::Io {
                    block: OptBlock(Some(MetaBlock(slot.nr))),
                    kind: slot.validator.kind(),
                    op: "write",
                    source: e,
                })?;
                slot.dirty = false;
            }
            let nr = slot.nr;
            self.remove_slot(idx);
            self.map.remove(&nr);
        }
        Ok(())
    }
}

/// See the module documentation.
pub(crate) struct BlockCache {
    io: Arc<dyn BlockIo>,
    shards: Box<[Mutex<Shard>]>,
    shard_cap: usize,
    /// Some shard may hold more than `shard_cap` blocks (set without a lock held elsewhere, so
    /// the writer's check after every change costs one atomic load).
    over_capacity: AtomicBool,
}

fn same_validator(a: &'static dyn Validator, b: &'static dyn Validator) -> bool {
    std::ptr::addr_eq(a as *const dyn Validator, b as *const dyn Validator)
}

impl BlockCache {
    pub(crate) fn new(io: Arc<dyn BlockIo>, capacity_blocks: usize) -> Self {
        let shards = (0..NR_SHARDS)
            .map(|_| Mutex::new(Shard::default()))
            .collect();
        BlockCache {
            io,
            shards,
            shard_cap: (capacity_blocks / NR_SHARDS).max(2),
            over_capacity: AtomicBool::new(false),
        }
    }

    pub(crate) fn io(&self) -> &Arc<dyn BlockIo> {
        &self.io
    }

    fn shard(&self, nr: u64) -> &Mutex<Shard> {
        // The low bits of consecutive block numbers differ, so they spread over the shards.
        &self.shards[(nr as usize) % NR_SHARDS]
    }

    fn read_from_disk(&self, nr: MetaBlock, v: &'static dyn Validator) -> Result<Arc<Block>> {
        let mut data = Arc::new([0u8; BLOCK_SIZE]);
        // A freshly created Arc has exactly one owner.
        let buf =
            Arc::get_mut(&mut data).ok_or_else(|| Error::Internal("fresh Arc shared".into()))?;
        self.io.read(nr, buf).map_err(|e| Error::Io {
            block: OptBlock(Some(nr)),
            kind: v.kind(),
            op: "read",
            source: e,
        })?;
        v.check(nr, &data)?;
        Ok(data)
    }

    /// Returns the validated contents of block `nr`.
    pub(crate) fn read(&self, nr: MetaBlock, v: &'static dyn Validator) -> Result<Arc<Block>> {
        {
            let mut shard = self.shard(nr.0).lock();
            if let Some(&idx) = shard.map.get(&nr.0) {
                if idx == CHECKED_OUT {
                    return Err(Error::Internal(format!(
                        "{nr} read while it is being modified"
                    )));
                }
                if let Some(slot) = shard.slots[idx].as_mut() {
                    slot.referenced = true;
                    if !same_validator(slot.validator, v) {
                        if slot.dirty {
                            return Err(Error::malformed(
                                nr,
                                v.kind(),
                                format!("block is a {} of this transaction", slot.validator.kind()),
                            ));
                        }
                        v.check(nr, &slot.data)?;
                        slot.validator = v;
                    }
                    return Ok(slot.data.clone());
                }
            }
        }
        let data = self.read_from_disk(nr, v)?;
        let mut shard = self.shard(nr.0).lock();
        if let Some(&idx) = shard.map.get(&nr.0) {
            if idx != CHECKED_OUT
                && let Some(slot) = shard.slots[idx].as_ref()
            {
                return Ok(slot.data.clone());
            }
            return Ok(data);
        }
        shard.insert_slot(Slot {
            nr: nr.0,
            data: data.clone(),
            dirty: false,
            validator: v,
            referenced: true,
        });
        // Readers never write: a shard full of dirty blocks stays over its bound until the
        // writer's next eviction or the commit.
        shard.evict(self.shard_cap, None)?;
        if shard.len > self.shard_cap {
            self.over_capacity.store(true, Ordering::Release);
        }
        Ok(data)
    }

    /// Checks block `nr` out for modification (reading and validating it if needed).
    pub(crate) fn take(
        self: &Arc<Self>,
        nr: MetaBlock,
        v: &'static dyn Validator,
    ) -> Result<BlockMut> {
        {
            let mut shard = self.shard(nr.0).lock();
            match shard.map.get(&nr.0).copied() {
                Some(CHECKED_OUT) => {
                    return Err(Error::Internal(format!("{nr} is already being modified")));
                }
                Some(idx) => {
                    let slot = shard
                        .remove_slot(idx)
                        .ok_or_else(|| Error::Internal(format!("cache slot of {nr} vanished")))?;
                    shard.map.insert(nr.0, CHECKED_OUT);
                    if !same_validator(slot.validator, v) {
                        if slot.dirty {
                            shard.map.remove(&nr.0);
                            return Err(Error::malformed(
                                nr,
                                v.kind(),
                                format!("block is a {} of this transaction", slot.validator.kind()),
                            ));
                        }
                        if let Err(e) = v.check(nr, &slot.data) {
                            shard.map.remove(&nr.0);
                            return Err(e);
                        }
                    }
                    return Ok(self.guard(nr, slot.data, v));
                }
                None => {
                    shard.map.insert(nr.0, CHECKED_OUT);
                }
            }
        }
        match self.read_from_disk(nr, v) {
            Ok(data) => Ok(self.guard(nr, data, v)),
            Err(e) => {
                self.shard(nr.0).lock().map.remove(&nr.0);
                Err(e)
            }
        }
    }

    /// Checks out a new block `nr` holding `contents` (zeros when `None`), replacing whatever
    /// the cache held for that number.
    pub(crate) fn install(
        self: &Arc<Self>,
        nr: MetaBlock,
        v: &'static dyn Validator,
        contents: Option<&Block>,
    ) -> Result<BlockMut> {
        {
            let mut shard = self.shard(nr.0).lock();
            match shard.map.get(&nr.0).copied() {
                Some(CHECKED_OUT) => {
                    return Err(Error::Internal(format!("{nr} is already being modified")));
                }
                Some(idx) => {
                    shard.remove_slot(idx);
                }
                None => {}
            }
            shard.map.insert(nr.0, CHECKED_OUT);
        }
        let data = match contents {
            Some(c) => Arc::new(*c),
            None => Arc::new([0u8; BLOCK_SIZE]),
        };
        Ok(self.guard(nr, data, v))
    }

    fn guard(
        self: &Arc<Self>,
        nr: MetaBlock,
        data: Arc<Block>,
        v: &'static dyn Validator,
    ) -> BlockMut {
        BlockMut {
            nr,
            data: Some(data),
            validator: v,
            cache: self.clone(),
        }
    }

    /// Returns a checked-out block to the cache, dirty. Never fails and never evicts (it runs
    /// in `Drop`); the next writer call evicts.
    fn put_back(&self, nr: MetaBlock, data: Arc<Block>, v: &'static dyn Validator) {
        let mut shard = self.shard(nr.0).lock();
        shard.map.remove(&nr.0);
        shard.insert_slot(Slot {
            nr: nr.0,
            data,
            dirty: true,
            validator: v,
            referenced: true,
        });
        if shard.len > self.shard_cap {
            self.over_capacity.store(true, Ordering::Release);
        }
    }

    /// Brings every shard back under its bound, writing dirty victims.
    pub(crate) fn evict_for_writer(&self) -> Result<()> {
        if !self.over_capacity.swap(false, Ordering::AcqRel) {
            return Ok(());
        }
        for s in self.shards.iter() {
            let mut shard = s.lock();
            if shard.len > self.shard_cap
                && let Err(e) = shard.evict(self.shard_cap, Some(&*self.io))
            {
                self.over_capacity.store(true, Ordering::Release);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Stores a clean, already-written block (the superblock after a commit).
    pub(crate) fn insert_clean(&self, nr: MetaBlock, data: &Block, v: &'static dyn Validator) {
        let mut shard = self.shard(nr.0).lock();
        if let Some(idx) = shard.map.remove(&nr.0)
            && idx != CHECKED_OUT
        {
            shard.remove_slot(idx);
        }
        shard.insert_slot(Slot {
            nr: nr.0,
            data: Arc::new(*data),
            dirty: false,
            validator: v,
            referenced: true,
        });
    }

    /// Seals and writes every dirty block in block order; they become clean.
    pub(crate) fn write_dirty(&self) -> Result<usize> {
        let mut dirty: Vec<u64> = Vec::new();
        for s in self.shards.iter() {
            let shard = s.lock();
            for (&nr, &idx) in shard.map.iter() {
                if idx == CHECKED_OUT {
                    return Err(Error::Internal(format!(
                        "{} still being modified at commit",
                        MetaBlock(nr)
                    )));
                }
                if shard.slots[idx].as_ref().is_some_and(|s| s.dirty) {
                    dirty.push(nr);
                }
            }
        }
        dirty.sort_unstable();
        // Seal each block, then write runs of consecutive blocks with one call each (new blocks
        // are mostly allocated in order, so a commit is a few large writes, not thousands).
        const MAX_RUN: usize = 256;
        let mut run: Vec<u8> = Vec::with_capacity(MAX_RUN * BLOCK_SIZE);
        let mut run_start = 0u64;
        let mut run_blocks: Vec<u64> = Vec::with_capacity(MAX_RUN);
        for &nr in &dirty {
            if !run_blocks.is_empty()
                && (nr != run_start + run_blocks.len() as u64 || run_blocks.len() == MAX_RUN)
            {
                self.write_run(run_start, &run, &run_blocks)?;
                run.clear();
                run_blocks.clear();
            }
            let mut shard = self.shard(nr).lock();
            let Some(&idx) = shard.map.get(&nr) else {
                continue;
            };
            let Some(slot) = shard.slots[idx].as_mut() else {
                continue;
            };
            let data = Arc::make_mut(&mut slot.data);
            slot.validator.seal(MetaBlock(nr), data);
            if run_blocks.is_empty() {
                run_start = nr;
            }
            run.extend_from_slice(&data[..]);
            run_blocks.push(nr);
        }
        if !run_blocks.is_empty() {
            self.write_run(run_start, &run, &run_blocks)?;
        }
        Ok(dirty.len())
    }

    /// Writes sealed consecutive blocks starting at `start`, then marks them clean.
    fn write_run(&self, start: u64, data: &[u8], blocks: &[u64]) -> Result<()> {
        self.io
            .write_run(MetaBlock(start), data)
            .map_err(|e| Error::Io {
                block: OptBlock(Some(MetaBlock(start))),
                kind: BlockKind::Unknown,
                op: "write",
                source: e,
            })?;
        for &nr in blocks {
            let mut shard = self.shard(nr).lock();
            if let Some(&idx) = shard.map.get(&nr)
                && let Some(slot) = shard.slots.get_mut(idx).and_then(|s| s.as_mut())
            {
                slot.dirty = false;
            }
        }
        Ok(())
    }

    /// Number of blocks held (for tests and memory accounting).
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len).sum()
    }

    /// Number of dirty blocks held.
    pub(crate) fn nr_dirty(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().slots.iter().flatten().filter(|s| s.dirty).count())
            .sum()
    }

    pub(crate) fn capacity(&self) -> usize {
        self.shard_cap * NR_SHARDS
    }
}

/// A metadata block checked out for modification. Dereferences to the block's bytes; goes back
/// to the cache as dirty when dropped. The checksum and block number are filled in when the
/// block is written, not here.
pub struct BlockMut {
    nr: MetaBlock,
    data: Option<Arc<Block>>,
    validator: &'static dyn Validator,
    cache: Arc<BlockCache>,
}

impl BlockMut {
    /// The block's number.
    pub fn nr(&self) -> MetaBlock {
        self.nr
    }

    /// The kind of block.
    pub fn kind(&self) -> BlockKind {
        self.validator.kind()
    }
}

impl Deref for BlockMut {
    type Target = Block;
    fn deref(&self) -> &Block {
        // `data` is `Some` from construction until `drop`.
        self.data.as_deref().unwrap_or(&ZERO_BLOCK)
    }
}

static ZERO_BLOCK: Block = [0u8; BLOCK_SIZE];

impl DerefMut for BlockMut {
    fn deref_mut(&mut self) -> &mut Block {
        let data = self.data.get_or_insert_with(|| Arc::new([0u8; BLOCK_SIZE]));
        // Unique unless a reader still holds the clean copy it read earlier; then copy once.
        Arc::make_mut(data)
    }
}

impl Drop for BlockMut {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            self.cache.put_back(self.nr, data, self.validator);
        }
    }
}

impl std::fmt::Debug for BlockMut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockMut({}, {})", self.nr, self.validator.kind())
    }
}
