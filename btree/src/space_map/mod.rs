//! dm's space maps: the *metadata* space map (index block + bitmaps + reference-count tree, in
//! the metadata device, counting the metadata device's own blocks, its own blocks included) and
//! the *disk* space map (index B-tree + bitmaps + reference-count tree in the metadata device,
//! counting the blocks of another device: dm-thin's data blocks).
//!
//! # How a transaction changes a space map
//!
//! Each map keeps three things:
//! - the **committed** map (what the last commit's superblock points at): its bitmaps are never
//!   written during the transaction (shadowing guarantees it), so they can still be read;
//! - the **current** on-disk structures: copies (shadows) of the committed ones, made on first
//!   modification;
//! - an in-memory **overlay** of counts changed since they were last written to the current
//!   structures. `count(b)` is the overlay's value if present, else what the current structures
//!   say.
//!
//! `inc`, `dec` and allocation only touch the overlay. The overlay is *flushed* into the
//! current structures at commit (and earlier when it grows large, so memory stays bounded):
//! bitmap by bitmap, the bitmap is shadowed, counts >= 3 go into the reference-count tree,
//! the 2-bit entries are written, the index entry is updated.
//!
//! This is what resolves the metadata space map's recursion: shadowing its bitmaps, index block
//! and tree nodes allocates and frees metadata blocks, i.e. changes the very map being written.
//! Those changes just land in the overlay, and the flush loops until the overlay is empty. It
//! terminates: after the first pass every bitmap touched, the index block and the tree paths
//! touched are already shadows of this transaction, so writing them again allocates nothing;
//! the only changes left are 0 <-> 1 counts of freshly allocated or freed sm blocks, which never
//! touch the reference-count tree. (dm reaches the same fixpoint with its buffered "uncommitted
//! ops"; the overlay is simpler to reason about and batches all writes to one bitmap.)
//!
//! **Allocation** returns a block whose count is zero in *both* the committed and the current
//! map, so a block freed in transaction N is not reused before N's commit is durable: the
//! superblock on disk may still point at it. The search starts at a cursor, skips bitmaps whose
//! index entries say they are full (`nr_free == 0`), starts inside a bitmap at
//! `none_free_before`, and tests 32 entries of both bitmaps per 64-bit word, so it never scans
//! the whole map per call.

pub mod format;

pub use format::{ENTRIES_PER_BITMAP, IndexEntry, MAX_METADATA_BLOCKS, SM_ROOT_AREA, SmRoot};

use crate::btree::{BTree, U32Value, ValueType};
use crate::checksum::{BITMAP_VALIDATOR, INDEX_VALIDATOR};
use crate::error::{BlockKind, Error, Result};
use crate::tm::TransactionManager;
use crate::{DiskBlock, MetaBlock};
use format::{bitmap_get, bitmap_set, bitmap_word, free_entries_mask};
use std::collections::{BTreeMap, HashMap};

/// Which of the transaction manager's space maps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SmId {
    Metadata,
    Data,
}

impl SmId {
    pub(crate) fn space(self) -> &'static str {
        match self {
            SmId::Metadata => "metadata",
            SmId::Data => "data",
        }
    }
}

/// The 16-byte index entries as B-tree values (the disk space map's index tree).
#[derive(Debug)]
pub(crate) struct IndexEntryValue;

impl ValueType for IndexEntryValue {
    type Value = IndexEntry;
    const SIZE: usize = 16;
    fn pack(v: &IndexEntry, out: &mut [u8]) {
        v.pack(out)
    }
    fn unpack(raw: &[u8]) -> IndexEntry {
        IndexEntry::unpack(raw)
    }
}

#[derive(Debug, Clone)]
pub(crate) enum CurrentIndex {
    /// The metadata map's entries, in memory; written to `block` (shadowed) when flushed.
    Metadata {
        block: MetaBlock,
        entries: Vec<IndexEntry>,
        dirty: bool,
    },
    /// The disk map's index B-tree.
    Disk { root: MetaBlock },
}

#[derive(Debug, Clone)]
pub(crate) enum CommittedIndex {
    Metadata(Vec<IndexEntry>),
    Disk(MetaBlock),
}

/// A set of block numbers kept as extents (freeing a volume frees long runs).
#[derive(Debug, Default, Clone)]
pub(crate) struct ExtentSet {
    map: BTreeMap<u64, u64>,
}

impl ExtentSet {
    pub(crate) fn insert(&mut self, b: u64) {
        let mut start = b;
        let mut end = b + 1;
        if let Some((&s, &e)) = self.map.range(..=b).next_back() {
            if e > b {
                return;
            }
            if e == b {
                start = s;
            }
        }
        if let Some(&e) = self.map.get(&(b + 1)) {
            self.map.remove(&(b + 1));
            end = e;
        }
        self.map.insert(start, end);
    }

    pub(crate) fn remove(&mut self, b: u64) {
        if let Some((&s, &e)) = self.map.range(..=b).next_back()
            && e > b
        {
            self.map.remove(&s);
            if s < b {
                self.map.insert(s, b);
            }
            if b + 1 < e {
                self.map.insert(b + 1, e);
            }
        }
    }

    pub(crate) fn take(&mut self) -> Vec<Extent> {
        std::mem::take(&mut self.map)
            .into_iter()
            .map(|(s, e)| Extent {
                start: DiskBlock(s),
                len: e - s,
            })
            .collect()
    }
}

/// A run of data blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// First block.
    pub start: DiskBlock,
    /// Number of blocks.
    pub len: u64,
}

/// One space map's in-memory state; see the module documentation.
#[derive(Debug, Clone)]
pub(crate) struct SpaceMap {
    pub id: SmId,
    pub nr_blocks: u64,
    pub nr_allocated: u64,
    pub index: CurrentIndex,
    pub ref_root: MetaBlock,
    pub overlay: BTreeMap<u64, u32>,
    /// (nr_blocks, index) of the last commit; `None` for a map created in this transaction.
    pub committed: Option<(u64, CommittedIndex)>,
    pub cursor: u64,
    /// A full search found nothing; cleared by a commit or a grow.
    pub exhausted: bool,
    /// Blocks whose count dropped to zero in this transaction (and is still zero).
    pub freed: ExtentSet,
    pub lowest_freed: Option<u64>,
}

impl SpaceMap {
    pub(crate) fn new(id: SmId, nr_blocks: u64, index: CurrentIndex, ref_root: MetaBlock) -> Self {
        SpaceMap {
            id,
            nr_blocks,
            nr_allocated: 0,
            index,
            ref_root,
            overlay: BTreeMap::new(),
            committed: None,
            cursor: 0,
            exhausted: false,
            freed: ExtentSet::default(),
            lowest_freed: None,
        }
    }

    pub(crate) fn root(&self) -> SmRoot {
        SmRoot {
            nr_blocks: self.nr_blocks,
            nr_allocated: self.nr_allocated,
            bitmap_root: match &self.index {
                CurrentIndex::Metadata { block, .. } => *block,
                CurrentIndex::Disk { root } => *root,
            },
            ref_count_root: self.ref_root,
        }
    }

    /// The current structures become the committed ones.
    pub(crate) fn mark_committed(&mut self) {
        let idx = match &self.index {
            CurrentIndex::Metadata { entries, .. } => CommittedIndex::Metadata(entries.clone()),
            CurrentIndex::Disk { root } => CommittedIndex::Disk(*root),
        };
        self.committed = Some((self.nr_blocks, idx));
        if let Some(low) = self.lowest_freed.take() {
            self.cursor = self.cursor.min(low);
        }
        self.exhausted = false;
    }

    fn exhausted_error(&self) -> Error {
        match self.id {
            SmId::Metadata => Error::MetadataSpaceExhausted {
                nr_blocks: self.nr_blocks,
            },
            SmId::Data => Error::DataSpaceExhausted {
                nr_blocks: self.nr_blocks,
            },
        }
    }
}

/// Free entries among the first `valid` of a bitmap, and the index of the first one (`valid`
/// if none).
pub(crate) fn count_free(bm: &crate::Block, valid: u64) -> (u32, u32) {
    let mut free = 0u32;
    let mut first = None;
    let words = valid.div_ceil(32) as usize;
    for w in 0..words {
        let mut mask = free_entries_mask(bitmap_word(bm, w));
        let end = valid - (w as u64) * 32;
        if end < 32 {
            mask &= (1u64 << (end * 2)) - 1;
        }
        if mask != 0 && first.is_none() {
            first = Some((w as u64) * 32 + mask.trailing_zeros() as u64 / 2);
        }
        free += mask.count_ones();
    }
    (free, first.unwrap_or(valid) as u32)
}

/// Number of blocks of group `g` inside a map of `nr_blocks` blocks.
pub(crate) fn valid_entries(g: u64, nr_blocks: u64) -> u32 {
    let base = g * ENTRIES_PER_BITMAP;
    nr_blocks.saturating_sub(base).min(ENTRIES_PER_BITMAP) as u32
}

impl TransactionManager {
    pub(crate) fn sm(&self, id: SmId) -> Result<&SpaceMap> {
        match id {
            SmId::Metadata => Ok(&self.meta),
            SmId::Data => self
                .data
                .as_ref()
                .ok_or_else(|| Error::InvalidArgument("no data space map is attached".into())),
        }
    }

    pub(crate) fn sm_mut(&mut self, id: SmId) -> Result<&mut SpaceMap> {
        match id {
            SmId::Metadata => Ok(&mut self.meta),
            SmId::Data => self
                .data
                .as_mut()
                .ok_or_else(|| Error::InvalidArgument("no data space map is attached".into())),
        }
    }

    /// The current index entry of bitmap `g`.
    pub(crate) fn current_ie(&self, id: SmId, g: u64) -> Result<IndexEntry> {
        let sm = self.sm(id)?;
        match &sm.index {
            CurrentIndex::Metadata { block, entries, .. } => {
                entries.get(g as usize).copied().ok_or_else(|| {
                    Error::malformed(
                        *block,
                        BlockKind::Index,
                        format!("no index entry for bitmap {g}"),
                    )
                })
            }
            CurrentIndex::Disk { root } => self.disk_ie(*root, g),
        }
    }

    fn disk_ie(&self, root: MetaBlock, g: u64) -> Result<IndexEntry> {
        let ie = BTree::<IndexEntryValue>::open(root)
            .lookup(self, g)?
            .ok_or_else(|| {
                Error::malformed(
                    root,
                    BlockKind::BTreeNode,
                    format!("the data space map's index tree has no entry for bitmap {g}"),
                )
            })?;
        format::check_index_entry(root, BlockKind::BTreeNode, g, &ie, self.meta.nr_blocks)?;
        Ok(ie)
    }

    /// The committed index entry of bitmap `g` (`None`: everything in it was free at commit).
    fn committed_ie(&self, id: SmId, g: u64) -> Result<Option<IndexEntry>> {
        let sm = self.sm(id)?;
        let Some((nr_blocks, idx)) = &sm.committed else {
            return Ok(None);
        };
        if g * ENTRIES_PER_BITMAP >= *nr_blocks {
            return Ok(None);
        }
        match idx {
            CommittedIndex::Metadata(entries) => Ok(entries.get(g as usize).copied()),
            CommittedIndex::Disk(root) => self.disk_ie(*root, g).map(Some),
        }
    }

    /// The current reference count of block `b`.
    pub(crate) fn sm_get(&self, id: SmId, b: u64) -> Result<u32> {
        let sm = self.sm(id)?;
        if b >= sm.nr_blocks {
            return Err(Error::OutOfRange {
                space: id.space(),
                block: b,
                nr_blocks: sm.nr_blocks,
            });
        }
        if let Some(&c) = sm.overlay.get(&b) {
            return Ok(c);
        }
        let g = b / ENTRIES_PER_BITMAP;
        let ie = self.current_ie(id, g)?;
        let bm = self.read_block(MetaBlock(ie.blocknr), &BITMAP_VALIDATOR)?;
        let v = bitmap_get(&bm, b % ENTRIES_PER_BITMAP);
        if v < 3 {
            return Ok(v);
        }
        let root = sm.ref_root;
        match BTree::<U32Value>::open(root).lookup(self, b)? {
            Some(c) if c >= 3 => Ok(c),
            Some(c) => Err(Error::malformed(
                root,
                BlockKind::BTreeNode,
                format!(
                    "{} block {b} has count {c} in the reference-count tree, below 3",
                    id.space()
                ),
            )),
            None => Err(Error::malformed(
                root,
                BlockKind::BTreeNode,
                format!(
                    "{} block {b} is marked 3+ in bitmap {} but missing from the reference-count tree",
                    id.space(),
                    ie.blocknr
                ),
            )),
        }
    }

    pub(crate) fn sm_set(&mut self, id: SmId, b: u64, old: u32, new: u32) -> Result<()> {
        let sm = self.sm_mut(id)?;
        sm.overlay.insert(b, new);
        if old == 0 && new > 0 {
            sm.nr_allocated += 1;
            if id == SmId::Data {
                sm.freed.remove(b);
            }
        } else if old > 0 && new == 0 {
            sm.nr_allocated = sm.nr_allocated.checked_sub(1).ok_or_else(|| {
                Error::Internal(format!(
                    "{} space map allocated count underflow",
                    id.space()
                ))
            })?;
            if id == SmId::Data {
                sm.freed.insert(b);
            }
            sm.lowest_freed = Some(sm.lowest_freed.map_or(b, |l| l.min(b)));
        }
        Ok(())
    }

    pub(crate) fn sm_inc(&mut self, id: SmId, b: u64) -> Result<()> {
        let old = self.sm_get(id, b)?;
        let new = old.checked_add(1).ok_or_else(|| {
            Error::Unsupported(format!(
                "{} block {b}: reference count overflow",
                id.space()
            ))
        })?;
        self.sm_set(id, b, old, new)
    }

    pub(crate) fn sm_dec(&mut self, id: SmId, b: u64) -> Result<()> {
        let old = self.sm_get(id, b)?;
        if old == 0 {
            return Err(Error::RefCountUnderflow {
                space: id.space(),
                block: b,
            });
        }
        self.sm_set(id, b, old, old - 1)
    }

    /// Allocates a block free in both the committed and the current map; its count becomes 1.
    pub(crate) fn sm_alloc(&mut self, id: SmId) -> Result<u64> {
        let sm = self.sm(id)?;
        if sm.exhausted {
            return Err(sm.exhausted_error());
        }
        match self.sm_find_free(id)? {
            Some(b) => {
                self.sm_set(id, b, 0, 1)?;
                self.sm_mut(id)?.cursor = b + 1;
                Ok(b)
            }
            None => {
                let sm = self.sm_mut(id)?;
                sm.exhausted = true;
                Err(sm.exhausted_error())
            }
        }
    }

    /// The next allocatable block from the cursor (wrapping once), without allocating it.
    pub(crate) fn sm_find_free(&self, id: SmId) -> Result<Option<u64>> {
        let sm = self.sm(id)?;
        let n = sm.nr_blocks;
        let start = if sm.cursor >= n { 0 } else { sm.cursor };
        if let Some(b) = self.sm_find_free_in(id, start, n)? {
            return Ok(Some(b));
        }
        self.sm_find_free_in(id, 0, start)
    }

    /// The first block in `lo..hi` whose count is zero in both the committed and the current
    /// map (and not taken in the overlay).
    pub(crate) fn sm_find_free_in(&self, id: SmId, lo: u64, hi: u64) -> Result<Option<u64>> {
        let hi = hi.min(self.sm(id)?.nr_blocks);
        let mut at = lo;
        while at < hi {
            let g = at / ENTRIES_PER_BITMAP;
            let end = ((g + 1) * ENTRIES_PER_BITMAP).min(hi);
            if let Some(b) = self.scan_group(id, g, at, end)? {
                return Ok(Some(b));
            }
            at = end;
        }
        Ok(None)
    }

    fn scan_group(&self, id: SmId, g: u64, lo: u64, hi: u64) -> Result<Option<u64>> {
        let sm = self.sm(id)?;
        let base = g * ENTRIES_PER_BITMAP;
        let cur = self.current_ie(id, g)?;
        let overlay_here = sm
            .overlay
            .range(base..base + ENTRIES_PER_BITMAP)
            .next()
            .is_some();
        if cur.nr_free == 0 && !overlay_here {
            return Ok(None);
        }
        let committed = self.committed_ie(id, g)?;
        let mut first = (lo - base).max(cur.none_free_before as u64);
        if let Some(c) = committed {
            if c.nr_free == 0 {
                return Ok(None);
            }
            first = first.max(c.none_free_before as u64);
        }
        let last = hi - base;
        if first >= last {
            return Ok(None);
        }
        let cur_bm = self.read_block(MetaBlock(cur.blocknr), &BITMAP_VALIDATOR)?;
        let com_bm = match committed {
            Some(c) if c.blocknr != cur.blocknr => {
                Some(self.read_block(MetaBlock(c.blocknr), &BITMAP_VALIDATOR)?)
            }
            _ => None,
        };
        let (first_w, last_w) = ((first / 32) as usize, ((last - 1) / 32) as usize);
        for w in first_w..=last_w {
            let mut free = free_entries_mask(bitmap_word(&cur_bm, w));
            if let Some(cb) = &com_bm {
                free &= free_entries_mask(bitmap_word(cb, w));
            }
            if w == first_w {
                free &= !0u64 << ((first % 32) * 2);
            }
            if w == last_w {
                let end = last - (w as u64) * 32;
                if end < 32 {
                    free &= (1u64 << (end * 2)) - 1;
                }
            }
            while free != 0 {
                let bit = free.trailing_zeros() as u64;
                free &= free - 1;
                let b = base + (w as u64) * 32 + bit / 2;
                match sm.overlay.get(&b) {
                    Some(&c) if c != 0 => continue,
                    _ => return Ok(Some(b)),
                }
            }
        }
        Ok(None)
    }

    /// How many blocks from `lo` on, at most `max`, are free one after another, "free" meaning
    /// what [`sm_find_free_in`](TransactionManager::sm_find_free_in) means (zero in both the
    /// committed and the current map, not taken in the overlay): 0 when `lo` is not free.
    /// Reads each bitmap of the run once; asking block by block looks up two index entries and
    /// two bitmaps per block.
    pub(crate) fn sm_free_run(&self, id: SmId, lo: u64, max: u64) -> Result<u64> {
        let sm = self.sm(id)?;
        let hi = lo.saturating_add(max).min(sm.nr_blocks);
        let mut at = lo;
        while at < hi {
            let g = at / ENTRIES_PER_BITMAP;
            let end = ((g + 1) * ENTRIES_PER_BITMAP).min(hi);
            at += self.free_run_in_group(id, g, at, end)?;
            if at < end {
                break;
            }
        }
        // A block counted in the overlay but not yet in the bitmaps (allocated in this
        // transaction, not flushed) ends the run.
        if let Some((&b, _)) = sm.overlay.range(lo..at).find(|(_, c)| **c != 0) {
            at = b;
        }
        Ok(at.saturating_sub(lo))
    }

    /// [`sm_free_run`](TransactionManager::sm_free_run) inside bitmap `g`, from the bitmaps
    /// alone: how many of `lo..hi` from `lo` on are zero in both.
    fn free_run_in_group(&self, id: SmId, g: u64, lo: u64, hi: u64) -> Result<u64> {
        let base = g * ENTRIES_PER_BITMAP;
        let cur = self.current_ie(id, g)?;
        let committed = self.committed_ie(id, g)?;
        let cur_bm = self.read_block(MetaBlock(cur.blocknr), &BITMAP_VALIDATOR)?;
        // `None`: everything in the bitmap was free at the last commit. The same block as the
        // current one: not shadowed yet, so the same counts.
        let com_bm = match committed {
            Some(c) if c.blocknr != cur.blocknr => {
                Some(self.read_block(MetaBlock(c.blocknr), &BITMAP_VALIDATOR)?)
            }
            _ => None,
        };
        let free = |i: u64| {
            bitmap_get(&cur_bm, i) == 0 && com_bm.as_ref().is_none_or(|c| bitmap_get(c, i) == 0)
        };
        Ok((lo - base..hi - base).take_while(|&i| free(i)).count() as u64)
    }

    /// Writes the overlay of map `id` into its current on-disk structures (see the module
    /// documentation for why this terminates).
    pub(crate) fn flush_sm(&mut self, id: SmId) -> Result<()> {
        if self.sm(id).is_err() {
            return Ok(());
        }
        let was = self.flushing;
        self.flushing = true;
        let r = self.flush_sm_inner(id);
        self.flushing = was;
        r
    }

    fn flush_sm_inner(&mut self, id: SmId) -> Result<()> {
        let sm = self.sm(id)?;
        let bound =
            16 * (sm.overlay.len() as u64 + sm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP)) + 1000;
        let mut rounds = 0u64;
        loop {
            let sm = self.sm(id)?;
            let first = sm.overlay.keys().next().copied();
            let index_dirty = matches!(sm.index, CurrentIndex::Metadata { dirty: true, .. });
            if let Some(b) = first {
                self.flush_group(id, b / ENTRIES_PER_BITMAP)?;
            } else if index_dirty {
                self.write_metadata_index()?;
            } else {
                return Ok(());
            }
            rounds += 1;
            if rounds > bound {
                return Err(Error::Internal(format!(
                    "the {} space map flush does not converge",
                    id.space()
                )));
            }
        }
    }

    fn flush_group(&mut self, id: SmId, g: u64) -> Result<()> {
        let base = g * ENTRIES_PER_BITMAP;
        let end = base + ENTRIES_PER_BITMAP;
        let mut ie = self.current_ie(id, g)?;
        // 1. A writable copy of the bitmap. Allocating it may add overlay entries anywhere,
        //    this group included; they are picked up below or in the next round.
        let loc = {
            let (guard, _) = self.shadow(MetaBlock(ie.blocknr), &BITMAP_VALIDATOR)?;
            guard.nr()
        };
        ie.blocknr = loc.0;

        // 2. Counts that are or were >= 3 live in the reference-count tree. While the tree is
        //    changed the overlay still holds the count, so `sm_get` stays right throughout.
        let snapshot: Vec<(u64, u32)> = self
            .sm(id)?
            .overlay
            .range(base..end)
            .map(|(&b, &c)| (b, c))
            .collect();
        let mut ref_done: HashMap<u64, u32> = HashMap::new();
        for (b, new) in snapshot {
            let old_bits = {
                let bm = self.read_block(loc, &BITMAP_VALIDATOR)?;
                bitmap_get(&bm, b - base)
            };
            if new >= 3 {
                self.ref_tree_insert(id, b, new)?;
                ref_done.insert(b, new);
            } else if old_bits == 3 {
                self.ref_tree_remove(id, b)?;
                ref_done.insert(b, new);
            }
        }

        // 3. The 2-bit entries, and the index entry's counters.
        let entries: Vec<(u64, u32)> = self
            .sm(id)?
            .overlay
            .range(base..end)
            .map(|(&b, &c)| (b, c))
            .collect();
        let mut written = Vec::with_capacity(entries.len());
        {
            let (mut bm, _) = self.shadow(loc, &BITMAP_VALIDATOR)?;
            if bm.nr() != loc {
                return Err(Error::Internal(format!(
                    "bitmap {loc} moved while being flushed"
                )));
            }
            for (b, new) in entries {
                let i = b - base;
                let old_bits = bitmap_get(&bm, i);
                if (new >= 3 || old_bits == 3) && ref_done.get(&b) != Some(&new) {
                    // Changed while the tree was being updated: the next round handles it.
                    continue;
                }
                bitmap_set(&mut bm, i, new.min(3));
                written.push(b);
            }
            // Recount the hints from the bitmap itself rather than adjusting them: metadata
            // written by other tools is not always exact here (thin_restore's is not), and an
            // exact count costs one pass over 510 words of a block already in hand.
            let valid = valid_entries(g, self.sm(id)?.nr_blocks) as u64;
            let (free, first) = count_free(&bm, valid);
            ie.nr_free = free;
            ie.none_free_before = first;
        }
        let sm = self.sm_mut(id)?;
        for b in written {
            sm.overlay.remove(&b);
        }
        // 4. The index entry.
        self.save_ie(id, g, ie)
    }

    fn save_ie(&mut self, id: SmId, g: u64, ie: IndexEntry) -> Result<()> {
        let root = match &mut self.sm_mut(id)?.index {
            CurrentIndex::Metadata {
                entries,
                dirty,
                block,
            } => {
                let slot = entries.get_mut(g as usize).ok_or_else(|| {
                    Error::malformed(
                        *block,
                        BlockKind::Index,
                        format!("no index entry for bitmap {g}"),
                    )
                })?;
                if *slot != ie {
                    *slot = ie;
                    *dirty = true;
                }
                return Ok(());
            }
            CurrentIndex::Disk { root } => *root,
        };
        let mut tree = BTree::<IndexEntryValue>::open(root);
        tree.insert(self, g, &ie)?;
        self.sm_mut(id)?.index = CurrentIndex::Disk { root: tree.root() };
        Ok(())
    }

    fn write_metadata_index(&mut self) -> Result<()> {
        let CurrentIndex::Metadata { block, .. } = &self.meta.index else {
            return Err(Error::Internal(
                "metadata space map without an index block".into(),
            ));
        };
        let (mut guard, _) = self.shadow(*block, &INDEX_VALIDATOR)?;
        let loc = guard.nr();
        // Shadowing may have changed the entries (through the overlay only); write the latest.
        if let CurrentIndex::Metadata {
            block,
            entries,
            dirty,
        } = &mut self.meta.index
        {
            format::write_metadata_index(&mut guard, entries);
            *block = loc;
            *dirty = false;
        }
        Ok(())
    }

    fn ref_tree_insert(&mut self, id: SmId, b: u64, count: u32) -> Result<()> {
        let mut tree = BTree::<U32Value>::open(self.sm(id)?.ref_root);
        tree.insert(self, b, &count)?;
        self.sm_mut(id)?.ref_root = tree.root();
        Ok(())
    }

    fn ref_tree_remove(&mut self, id: SmId, b: u64) -> Result<()> {
        let root = self.sm(id)?.ref_root;
        let mut tree = BTree::<U32Value>::open(root);
        if tree.remove(self, b)?.is_none() {
            return Err(Error::malformed(
                root,
                BlockKind::BTreeNode,
                format!(
                    "{} block {b} is missing from the reference-count tree",
                    id.space()
                ),
            ));
        }
        self.sm_mut(id)?.ref_root = tree.root();
        Ok(())
    }

    /// Grows map `id` to `new_nr` blocks. New bitmaps of the data map are allocated from the
    /// metadata map; new bitmaps of the metadata map are placed at the start of the new space.
    pub(crate) fn sm_extend(&mut self, id: SmId, new_nr: u64) -> Result<()> {
        let old = self.sm(id)?.nr_blocks;
        if new_nr < old {
            return Err(Error::InvalidArgument(format!(
                "cannot shrink the {} space map from {old} to {new_nr} blocks",
                id.space()
            )));
        }
        if new_nr == old {
            return Ok(());
        }
        let old_groups = old.div_ceil(ENTRIES_PER_BITMAP);
        let new_groups = new_nr.div_ceil(ENTRIES_PER_BITMAP);
        if id == SmId::Metadata && new_groups > format::MAX_METADATA_BITMAPS as u64 {
            return Err(Error::Unsupported(format!(
                "a metadata space map holds at most {MAX_METADATA_BLOCKS} blocks, not {new_nr}"
            )));
        }
        // The last, partial bitmap gains entries.
        if old % ENTRIES_PER_BITMAP != 0 {
            let g = old_groups - 1;
            let mut ie = self.current_ie(id, g)?;
            ie.nr_free += valid_entries(g, new_nr) - valid_entries(g, old);
            self.save_ie(id, g, ie)?;
        }
        self.sm_mut(id)?.nr_blocks = new_nr;
        for (k, g) in (old_groups..new_groups).enumerate() {
            let bitmap = match id {
                SmId::Data => self.new_block(&BITMAP_VALIDATOR)?.nr(),
                SmId::Metadata => {
                    // Nothing can be allocated from a full map, so the new bitmaps take the
                    // first blocks of the new space (free in both maps: beyond the old end).
                    let b = MetaBlock(old + k as u64);
                    self.install_new(b, &BITMAP_VALIDATOR)?;
                    self.sm_set(SmId::Metadata, b.0, 0, 1)?;
                    b
                }
            };
            let ie = IndexEntry {
                blocknr: bitmap.0,
                nr_free: valid_entries(g, new_nr),
                none_free_before: 0,
            };
            match &mut self.sm_mut(id)?.index {
                CurrentIndex::Metadata { entries, dirty, .. } => {
                    entries.push(ie);
                    *dirty = true;
                }
                CurrentIndex::Disk { .. } => self.save_ie(id, g, ie)?,
            }
        }
        self.sm_mut(id)?.exhausted = false;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_set_merges_and_splits() {
        let mut s = ExtentSet::default();
        for b in [5, 3, 4, 10, 6] {
            s.insert(b);
        }
        s.remove(4);
        s.insert(11);
        let v: Vec<(u64, u64)> = s.take().iter().map(|e| (e.start.0, e.len)).collect();
        assert_eq!(v, vec![(3, 1), (5, 2), (10, 2)]);
    }
}
