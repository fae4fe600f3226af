//! [`MemMetadata`]: an in-memory model of the pool's thin metadata, with the same data-path
//! contract as the real pool (docs/pool.md): exact sharing from reference counts, reservations
//! that never hand out a block freed by a transaction that is not yet durable or not yet
//! punched, and commits that survive a simulated crash while everything after them is lost.
//!
//! It lets the volume layer's concurrency, cache, group commit and crash behaviour be tested
//! and benchmarked on their own. Snapshots copy the origin's map (O(mapped blocks)), which is
//! fine for a model; the real pool shares trees.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use parking_lot::Mutex;

use super::meta::{BlockMapping, ThinMetadata};
use crate::device::{DevError, DevResult};
use crate::units::{DataBlock, DevId, VirtBlock};

#[derive(Clone, Default, Debug)]
struct MetaState {
    devs: BTreeMap<DevId, BTreeMap<u64, DataBlock>>,
    counts: HashMap<DataBlock, u32>,
    nr_blocks: u64,
}

impl MetaState {
    fn count(&self, b: DataBlock) -> u32 {
        self.counts.get(&b).copied().unwrap_or(0)
    }

    /// Decrements `b`; true when it reached 0.
    fn dec(&mut self, b: DataBlock) -> bool {
        match self.counts.get_mut(&b) {
            Some(c) if *c > 1 => {
                *c -= 1;
                false
            }
            Some(_) => {
                self.counts.remove(&b);
                true
            }
            None => false,
        }
    }

    fn inc(&mut self, b: DataBlock) {
        *self.counts.entry(b).or_insert(0) += 1;
    }
}

/// The "disk" of a [`MemMetadata`]: its last committed state. Survives dropping the
/// metadata, so a test can crash (drop everything) and reopen.
#[derive(Clone, Default)]
pub struct MemMetaDisk(Arc<Mutex<MetaState>>);

#[derive(Default)]
struct Alloc {
    reserved: HashSet<DataBlock>,
    quarantined: HashSet<DataBlock>,
    cursor: u64,
}

/// In-memory thin metadata; see the module docs.
pub struct MemMetadata {
    disk: MemMetaDisk,
    cur: MetaState,
    alloc: Mutex<Alloc>,
    /// Blocks whose count reached 0 in the open transaction.
    freed_in_txn: Vec<DataBlock>,
    /// Freed by commits inside other calls, not yet returned.
    unreported: Vec<DataBlock>,
}

impl MemMetadata {
    /// Empty metadata for a data file of `nr_blocks` blocks, committed to a new disk.
    pub fn new(nr_blocks: u64) -> MemMetadata {
        let disk = MemMetaDisk::default();
        disk.0.lock().nr_blocks = nr_blocks;
        MemMetadata::open(&disk)
    }

    /// Opens the last committed state of `disk` (after a simulated crash).
    pub fn open(disk: &MemMetaDisk) -> MemMetadata {
        MemMetadata {
            cur: disk.0.lock().clone(),
            disk: disk.clone(),
            alloc: Mutex::new(Alloc::default()),
            freed_in_txn: Vec::new(),
            unreported: Vec::new(),
        }
    }

    /// The disk holding the committed state.
    pub fn disk(&self) -> MemMetaDisk {
        self.disk.clone()
    }

    /// Creates an empty thin device `dev` and commits (as the pool does).
    pub fn create(&mut self, dev: DevId) -> DevResult<()> {
        if self.cur.devs.contains_key(&dev) {
            return Err(DevError::Io(std::io::Error::other(format!("{dev} exists"))));
        }
        self.cur.devs.insert(dev, BTreeMap::new());
        let freed = self.commit()?;
        self.unreported.extend(freed);
        Ok(())
    }

    /// Creates `snap` sharing every block of `origin`, and commits (as the pool does).
    pub fn snapshot(&mut self, origin: DevId, snap: DevId) -> DevResult<()> {
        let map = self
            .cur
            .devs
            .get(&origin)
            .ok_or_else(|| DevError::Gone(format!("{origin} does not exist")))?
            .clone();
        if self.cur.devs.contains_key(&snap) {
            return Err(DevError::Io(std::io::Error::other(format!(
                "{snap} exists"
            ))));
        }
        for b in map.values() {
            self.cur.inc(*b);
        }
        self.cur.devs.insert(snap, map);
        let freed = self.commit()?;
        self.unreported.extend(freed);
        Ok(())
    }

    /// Deletes `dev`, freeing blocks whose count drops to 0, and commits.
    pub fn delete(&mut self, dev: DevId) -> DevResult<()> {
        let map = self
            .cur
            .devs
            .remove(&dev)
            .ok_or_else(|| DevError::Gone(format!("{dev} does not exist")))?;
        for b in map.values() {
            if self.cur.dec(*b) {
                self.freed_in_txn.push(*b);
            }
        }
        let freed = self.commit()?;
        self.unreported.extend(freed);
        Ok(())
    }

    /// Grows the data space to `nr_blocks` (in the open transaction).
    pub fn grow(&mut self, nr_blocks: u64) {
        self.cur.nr_blocks = self.cur.nr_blocks.max(nr_blocks);
    }

    /// Number of data blocks with a count above 0.
    pub fn used_blocks(&self) -> u64 {
        self.cur.counts.len() as u64
    }

    /// Number of mapped blocks of `dev`.
    pub fn mapped_blocks(&self, dev: DevId) -> u64 {
        self.cur.devs.get(&dev).map_or(0, |m| m.len() as u64)
    }

    /// Every mapped block of `dev` (tests).
    pub fn mappings(&self, dev: DevId) -> Vec<(VirtBlock, DataBlock)> {
        self.cur
            .devs
            .get(&dev)
            .map(|m| m.iter().map(|(v, b)| (VirtBlock(*v), *b)).collect())
            .unwrap_or_default()
    }

    /// Consistency check: every count equals the number of mappings to the block, no mapping
    /// points past the data space, no free block is reserved twice. Returns what is wrong.
    pub fn check(&self) -> Result<(), String> {
        let mut want: HashMap<DataBlock, u32> = HashMap::new();
        for (dev, map) in &self.cur.devs {
            for (v, b) in map {
                if b.0 >= self.cur.nr_blocks {
                    return Err(format!("{dev} maps virtual block {v} to {b}, past the end"));
                }
                *want.entry(*b).or_insert(0) += 1;
            }
        }
        if want != self.cur.counts {
            return Err("data block reference counts disagree with the mappings".into());
        }
        let a = self.alloc.lock();
        for b in a.quarantined.iter().chain(a.reserved.iter()) {
            if self.cur.count(*b) != 0 {
                return Err(format!("{b} is reserved or quarantined but mapped"));
            }
        }
        Ok(())
    }
}

impl ThinMetadata for MemMetadata {
    type Reservation = DataBlock;

    fn reserved_block(r: &DataBlock) -> DataBlock {
        *r
    }

    fn lookup(&self, dev: DevId, vblock: VirtBlock) -> DevResult<Option<BlockMapping>> {
        let map = self
            .cur
            .devs
            .get(&dev)
            .ok_or_else(|| DevError::Gone(format!("{dev} does not exist")))?;
        Ok(map.get(&vblock.0).map(|&block| BlockMapping {
            block,
            shared: self.cur.count(block) > 1,
        }))
    }

    fn reserve(&self) -> DevResult<DataBlock> {
        let mut a = self.alloc.lock();
        let n = self.cur.nr_blocks;
        let disk = self.disk.0.lock();
        for i in 0..n {
            let b = DataBlock((a.cursor + i) % n);
            if self.cur.count(b) == 0
                && disk.count(b) == 0
                && !a.reserved.contains(&b)
                && !a.quarantined.contains(&b)
            {
                a.reserved.insert(b);
                a.cursor = b.0 + 1;
                return Ok(b);
            }
        }
        Err(DevError::NoSpace(format!("all {n} data blocks are in use")))
    }

    fn release_reservation(&self, r: DataBlock) {
        self.alloc.lock().reserved.remove(&r);
    }

    fn insert_mapping(
        &mut self,
        dev: DevId,
        vblock: VirtBlock,
        r: DataBlock,
    ) -> DevResult<Option<DataBlock>> {
        self.alloc.lock().reserved.remove(&r);
        let map = self
            .cur
            .devs
            .get_mut(&dev)
            .ok_or_else(|| DevError::Gone(format!("{dev} does not exist")))?;
        let old = map.insert(vblock.0, r);
        self.cur.inc(r);
        if let Some(o) = old
            && self.cur.dec(o)
        {
            self.freed_in_txn.push(o);
        }
        Ok(old)
    }

    fn discard(&mut self, dev: DevId, begin: VirtBlock, end: VirtBlock) -> DevResult<u64> {
        let map = self
            .cur
            .devs
            .get_mut(&dev)
            .ok_or_else(|| DevError::Gone(format!("{dev} does not exist")))?;
        let gone: Vec<u64> = map.range(begin.0..end.0).map(|(v, _)| *v).collect();
        let mut freed = Vec::new();
        for v in &gone {
            if let Some(b) = map.remove(v) {
                freed.push(b);
            }
        }
        for b in freed {
            if self.cur.dec(b) {
                self.freed_in_txn.push(b);
            }
        }
        Ok(gone.len() as u64)
    }

    fn commit(&mut self) -> DevResult<Vec<DataBlock>> {
        *self.disk.0.lock() = self.cur.clone();
        let freed = std::mem::take(&mut self.freed_in_txn);
        self.alloc.lock().quarantined.extend(freed.iter().copied());
        Ok(freed)
    }

    fn release_freed(&self, blocks: &[DataBlock]) {
        let mut a = self.alloc.lock();
        for b in blocks {
            a.quarantined.remove(b);
        }
    }

    fn take_freed(&mut self) -> Vec<DataBlock> {
        std::mem::take(&mut self.unreported)
    }
}
