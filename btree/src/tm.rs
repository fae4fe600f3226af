//! The transaction manager: shadowing, reference counts of metadata blocks, the data space map,
//! and the commit protocol.
//!
//! # Rules
//! - A block reachable from the last committed superblock is never written: to modify it, it is
//!   *shadowed* — copied to a freshly allocated block, once per transaction (later changes in the
//!   same transaction go to the copy). Only blocks allocated in the current transaction are
//!   ever written before the commit.
//! - Allocation returns only blocks free in both the committed and the current space map, so a
//!   block freed in transaction N is not reused until N's superblock is durable.
//! - Commit: flush the space maps' overlays into their (shadowed) structures → write every dirty
//!   block → sync → the caller's superblock is written to block 0 → sync. Until the superblock
//!   write reaches the disk the old superblock, and everything it references, is intact; after it
//!   the new one is. dm-thin's superblock fits in the first 512-byte sector, so the (sector-
//!   atomic) superblock write cannot be torn into a mix of the two.
//! - An error in the middle of a change *poisons* the transaction manager: every later change
//!   fails with [`Error::Poisoned`]; drop it and reopen from the last committed superblock.
//!
//! Read-only calls take `&self` and may run on many threads at once (the block cache locks
//! internally); changes take `&mut self`.

use crate::cache::BlockHasher;
use crate::cache::{BlockCache, BlockMut};
use crate::checksum::{BITMAP_VALIDATOR, BTREE_NODE_VALIDATOR, INDEX_VALIDATOR, Validator};
use crate::error::{Error, OptBlock, Result};
use crate::io::BlockIo;
use crate::space_map::format::{self, MAX_METADATA_BLOCKS, SM_ROOT_AREA};
use crate::space_map::{
    CommittedIndex, CurrentIndex, ENTRIES_PER_BITMAP, Extent, IndexEntry, SmId, SmRoot, SpaceMap,
    valid_entries,
};
use crate::{Block, DiskBlock, MetaBlock};
use std::collections::HashSet;
use std::hash::BuildHasherDefault;
use std::ops::Deref;
use std::sync::Arc;

/// Overlay entries a space map may hold before it is flushed mid-transaction (bounds memory).
pub const DEFAULT_OVERLAY_LIMIT: usize = 65_536;

/// Settings of a transaction manager.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TmConfig {
    /// Blocks the cache may hold (memory is about 4 KiB plus ~100 bytes per block).
    pub cache_blocks: usize,
}

impl Default for TmConfig {
    /// 16384 blocks: 64 MiB.
    fn default() -> Self {
        TmConfig {
            cache_blocks: 16384,
        }
    }
}

impl TmConfig {
    /// A cache of about `bytes` bytes.
    pub fn with_cache_bytes(bytes: usize) -> Self {
        TmConfig {
            cache_blocks: (bytes / crate::BLOCK_SIZE).max(64),
        }
    }
}

/// The space map roots to store in the superblock being committed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommitRoots {
    /// The metadata space map's root, packed into a 128-byte superblock area.
    pub metadata_sm: [u8; SM_ROOT_AREA],
    /// The data space map's root, if one is attached.
    pub data_sm: Option<[u8; SM_ROOT_AREA]>,
}

/// What a commit did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CommitInfo {
    /// Data blocks whose reference count dropped to zero in the committed transaction: now that
    /// the commit is durable they may be reused and their space returned (hole punched). Punch
    /// them before the next allocation can hand them out again.
    pub freed_data: Vec<Extent>,
    /// Metadata blocks written (dirty blocks, superblock excluded).
    pub blocks_written: usize,
}

/// Cache occupancy, for memory accounting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Blocks cached now.
    pub blocks: usize,
    /// Of those, blocks modified and not yet written.
    pub dirty: usize,
    /// The bound.
    pub capacity: usize,
}

/// A validated metadata block, shared with the cache (cheap to clone).
#[derive(Debug, Clone)]
pub struct BlockRef {
    nr: MetaBlock,
    data: Arc<Block>,
}

impl BlockRef {
    /// The block's number.
    pub fn nr(&self) -> MetaBlock {
        self.nr
    }
}

impl Deref for BlockRef {
    type Target = Block;
    fn deref(&self) -> &Block {
        &self.data
    }
}

/// See the module documentation.
pub struct TransactionManager {
    pub(crate) cache: Arc<BlockCache>,
    pub(crate) meta: SpaceMap,
    pub(crate) data: Option<SpaceMap>,
    /// Blocks allocated in this transaction and referenced once: writable in place. A block
    /// leaves the set when another reference is taken on it.
    shadows: HashSet<u64, BuildHasherDefault<BlockHasher>>,
    pub(crate) flushing: bool,
    /// Depth of B-tree operations in progress: housekeeping waits for the outermost to finish.
    pub(crate) nested: u32,
    overlay_limit: usize,
    poisoned: Option<String>,
}

impl std::fmt::Debug for TransactionManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TransactionManager")
            .field("metadata_blocks", &self.meta.nr_blocks)
            .field("metadata_allocated", &self.meta.nr_allocated)
            .field("data_blocks", &self.data.as_ref().map(|d| d.nr_blocks))
            .field("poisoned", &self.poisoned)
            .finish()
    }
}

impl TransactionManager {
    pub(crate) fn with_maps(io: Arc<dyn BlockIo>, cfg: &TmConfig, meta: SpaceMap) -> Self {
        TransactionManager {
            cache: Arc::new(BlockCache::new(io, cfg.cache_blocks)),
            meta,
            data: None,
            shadows: HashSet::default(),
            flushing: false,
            nested: 0,
            overlay_limit: DEFAULT_OVERLAY_LIMIT,
            poisoned: None,
        }
    }

    /// Formats a fresh metadata device: a metadata space map over all of `io` (at most
    /// [`MAX_METADATA_BLOCKS`]), with block 0 reserved (count 1) for the caller's superblock.
    /// Nothing is durable until the first [`TransactionManager::commit`].
    pub fn format(io: Arc<dyn BlockIo>, cfg: &TmConfig) -> Result<Self> {
        let nr_blocks = io.nr_blocks().min(MAX_METADATA_BLOCKS);
        let groups = nr_blocks.div_ceil(ENTRIES_PER_BITMAP);
        // Superblock, bitmaps, index block, ref-count tree root, and room to work.
        if nr_blocks < groups + 3 + 16 {
            return Err(Error::InvalidArgument(format!(
                "a metadata device of {nr_blocks} blocks is too small"
            )));
        }
        let index_block = MetaBlock(groups + 1);
        let ref_root = MetaBlock(groups + 2);
        let entries: Vec<IndexEntry> = (0..groups)
            .map(|g| IndexEntry {
                blocknr: 1 + g,
                nr_free: valid_entries(g, nr_blocks),
                none_free_before: 0,
            })
            .collect();
        let meta = SpaceMap::new(
            SmId::Metadata,
            nr_blocks,
            CurrentIndex::Metadata {
                block: index_block,
                entries,
                dirty: true,
            },
            ref_root,
        );
        let mut tm = Self::with_maps(io, cfg, meta);
        for g in 0..groups {
            tm.install_new(MetaBlock(1 + g), &BITMAP_VALIDATOR)?;
        }
        tm.install_new(index_block, &INDEX_VALIDATOR)?;
        {
            let mut root = tm.install_new(ref_root, &BTREE_NODE_VALIDATOR)?;
            crate::btree::node::init(&mut root, true, 4);
        }
        for b in 0..=ref_root.0 {
            tm.meta.overlay.insert(b, 1);
        }
        tm.meta.nr_allocated = ref_root.0 + 1;
        tm.meta.cursor = ref_root.0 + 1;
        Ok(tm)
    }

    /// Opens the metadata of the last commit: `metadata_sm_root` is the metadata space map root
    /// the caller read from its superblock (at least 32 bytes; dm-thin keeps 128).
    pub fn open(io: Arc<dyn BlockIo>, cfg: &TmConfig, metadata_sm_root: &[u8]) -> Result<Self> {
        let root = SmRoot::unpack(metadata_sm_root)?;
        let dev_blocks = io.nr_blocks();
        if root.nr_blocks > dev_blocks
            || root.nr_blocks > MAX_METADATA_BLOCKS
            || root.nr_blocks == 0
        {
            return Err(Error::InvalidArgument(format!(
                "the metadata space map covers {} blocks but the device has {dev_blocks} (and the format allows {MAX_METADATA_BLOCKS})",
                root.nr_blocks
            )));
        }
        for (what, b) in [
            ("index block", root.bitmap_root),
            ("reference-count tree", root.ref_count_root),
        ] {
            if b.0 == 0 || b.0 >= root.nr_blocks {
                return Err(Error::InvalidArgument(format!(
                    "the metadata space map's {what} {b} is outside the device"
                )));
            }
        }
        if root.nr_allocated > root.nr_blocks {
            return Err(Error::InvalidArgument(format!(
                "the metadata space map claims {} allocated of {} blocks",
                root.nr_allocated, root.nr_blocks
            )));
        }
        let placeholder = SpaceMap::new(
            SmId::Metadata,
            root.nr_blocks,
            CurrentIndex::Metadata {
                block: root.bitmap_root,
                entries: Vec::new(),
                dirty: false,
            },
            root.ref_count_root,
        );
        let mut tm = Self::with_maps(io, cfg, placeholder);
        let groups = root.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) as usize;
        let index = tm.read_block(root.bitmap_root, &INDEX_VALIDATOR)?;
        let entries =
            format::read_metadata_index(root.bitmap_root, &index, groups, root.nr_blocks)?;
        tm.meta.index = CurrentIndex::Metadata {
            block: root.bitmap_root,
            entries: entries.clone(),
            dirty: false,
        };
        tm.meta.nr_allocated = root.nr_allocated;
        tm.meta.committed = Some((root.nr_blocks, CommittedIndex::Metadata(entries)));
        Ok(tm)
    }

    /// Creates an empty data space map of `nr_blocks` blocks (its bitmaps, index tree and
    /// reference-count tree live in the metadata device). Replaces any attached one.
    pub fn create_data_sm(&mut self, nr_blocks: u64) -> Result<()> {
        self.check_live()?;
        let r = (|| {
            let index_root =
                crate::btree::BTree::<crate::space_map::IndexEntryValue>::create(self)?.root();
            let ref_root = crate::btree::BTree::<crate::btree::U32Value>::create(self)?.root();
            self.data = Some(SpaceMap::new(
                SmId::Data,
                0,
                CurrentIndex::Disk { root: index_root },
                ref_root,
            ));
            self.sm_extend(SmId::Data, nr_blocks)
        })();
        self.poison_on_err(r)?;
        self.after_change()
    }

    /// Attaches the committed data space map whose root the caller read from its superblock.
    pub fn open_data_sm(&mut self, root: &[u8]) -> Result<()> {
        let root = SmRoot::unpack(root)?;
        for (what, b) in [
            ("index tree", root.bitmap_root),
            ("reference-count tree", root.ref_count_root),
        ] {
            if b.0 == 0 || b.0 >= self.meta.nr_blocks {
                return Err(Error::InvalidArgument(format!(
                    "the data space map's {what} {b} is outside the metadata device"
                )));
            }
        }
        if root.nr_allocated > root.nr_blocks {
            return Err(Error::InvalidArgument(format!(
                "the data space map claims {} allocated of {} blocks",
                root.nr_allocated, root.nr_blocks
            )));
        }
        let mut sm = SpaceMap::new(
            SmId::Data,
            root.nr_blocks,
            CurrentIndex::Disk {
                root: root.bitmap_root,
            },
            root.ref_count_root,
        );
        sm.nr_allocated = root.nr_allocated;
        sm.committed = Some((root.nr_blocks, CommittedIndex::Disk(root.bitmap_root)));
        self.data = Some(sm);
        Ok(())
    }

    // ---------------------------------------------------------------- state

    fn check_live(&self) -> Result<()> {
        match &self.poisoned {
            Some(why) => Err(Error::Poisoned(why.clone())),
            None => Ok(()),
        }
    }

    /// Marks the transaction as failed if `r` is an error (see the module documentation).
    pub(crate) fn poison_on_err<T>(&mut self, r: Result<T>) -> Result<T> {
        if let Err(e) = &r
            && self.poisoned.is_none()
            && !matches!(e, Error::Poisoned(_))
        {
            self.poisoned = Some(e.summary());
        }
        r
    }

    /// Sets how many changed counts a space map buffers in memory before writing them to its
    /// bitmaps mid-transaction (default [`DEFAULT_OVERLAY_LIMIT`]). Lower means less memory and
    /// more writes; tests set it low to exercise mid-transaction flushes.
    pub fn set_overlay_limit(&mut self, entries: usize) {
        self.overlay_limit = entries.max(1);
    }

    /// From now on every change fails with [`Error::Poisoned`] saying `why` (a read-only
    /// manager, see [`TransactionManager::open_read_only`]).
    pub(crate) fn refuse_changes(&mut self, why: &str) {
        self.poisoned = Some(why.to_string());
    }

    /// Why changes are refused, if an earlier error poisoned this transaction.
    pub fn poisoned(&self) -> Option<&str> {
        self.poisoned.as_deref()
    }

    /// Called after each change: keeps the overlays and the cache within their bounds.
    pub(crate) fn after_change(&mut self) -> Result<()> {
        if self.flushing || self.nested > 0 {
            return Ok(());
        }
        let r = (|| {
            if self
                .data
                .as_ref()
                .is_some_and(|d| d.overlay.len() > self.overlay_limit)
            {
                self.flush_sm(SmId::Data)?;
            }
            if self.meta.overlay.len() > self.overlay_limit {
                self.flush_sm(SmId::Metadata)?;
            }
            self.cache.evict_for_writer()
        })();
        self.poison_on_err(r)
    }

    // ---------------------------------------------------------------- blocks

    /// Number of blocks of the metadata device the metadata space map covers.
    pub fn nr_blocks(&self) -> u64 {
        self.meta.nr_blocks
    }

    /// Metadata blocks with a zero count now.
    pub fn nr_free(&self) -> u64 {
        self.meta.nr_blocks - self.meta.nr_allocated
    }

    /// Reads and validates metadata block `nr` as a block of `v`'s kind.
    pub fn read(&self, nr: MetaBlock, v: &'static dyn Validator) -> Result<BlockRef> {
        Ok(BlockRef {
            nr,
            data: self.read_block(nr, v)?,
        })
    }

    pub(crate) fn read_block(
        &self,
        nr: MetaBlock,
        v: &'static dyn Validator,
    ) -> Result<Arc<Block>> {
        if nr.0 >= self.meta.nr_blocks {
            return Err(Error::OutOfRange {
                space: "metadata",
                block: nr.0,
                nr_blocks: self.meta.nr_blocks,
            });
        }
        self.cache.read(nr, v)
    }

    pub(crate) fn install_new(
        &mut self,
        nr: MetaBlock,
        v: &'static dyn Validator,
    ) -> Result<BlockMut> {
        self.shadows.insert(nr.0);
        self.cache.install(nr, v, None)
    }

    /// Allocates a zeroed metadata block (count 1), writable in this transaction.
    pub fn new_block(&mut self, v: &'static dyn Validator) -> Result<BlockMut> {
        self.check_live()?;
        let r = (|| {
            self.cache.evict_for_writer()?;
            let b = self.sm_alloc(SmId::Metadata)?;
            self.install_new(MetaBlock(b), v)
        })();
        self.poison_on_err(r)
    }

    /// Returns block `orig` writable, shadowing it if needed: if it was not allocated in this
    /// transaction, or is shared (count > 1), it is copied to a new block and `orig`'s count
    /// drops by one. The flag is true when `orig` was shared: the caller must then take a
    /// reference on everything the block references (both copies now reference it).
    pub fn shadow(
        &mut self,
        orig: MetaBlock,
        v: &'static dyn Validator,
    ) -> Result<(BlockMut, bool)> {
        self.check_live()?;
        let r = self.shadow_inner(orig, v);
        self.poison_on_err(r)
    }

    fn shadow_inner(
        &mut self,
        orig: MetaBlock,
        v: &'static dyn Validator,
    ) -> Result<(BlockMut, bool)> {
        if orig.0 == 0 {
            return Err(Error::InvalidArgument(
                "block 0 holds the superblock and is never shadowed".into(),
            ));
        }
        // A block in the shadow set was allocated in this transaction and nobody took another
        // reference on it since (`inc` removes it from the set), so its count is 1: write it in
        // place without looking the count up.
        if self.shadows.contains(&orig.0) {
            return Ok((self.cache.take(orig, v)?, false));
        }
        let shared = self.sm_get(SmId::Metadata, orig.0)? > 1;
        let src = self.read_block(orig, v)?;
        self.cache.evict_for_writer()?;
        let new = MetaBlock(self.sm_alloc(SmId::Metadata)?);
        self.shadows.insert(new.0);
        let guard = self.cache.install(new, v, Some(&src))?;
        self.sm_dec(SmId::Metadata, orig.0)?;
        Ok((guard, shared))
    }

    /// Whether the next [`shadow`](Self::shadow) of `b` writes it in place: `b` was allocated
    /// in this transaction and nobody took another reference on it since. A B-tree whose root
    /// is such a block keeps its root block through any insert (a full root splits beneath
    /// itself), so a parent pointing at it needs no change.
    pub fn writes_in_place(&self, b: MetaBlock) -> bool {
        self.shadows.contains(&b.0)
    }

    /// Takes one more reference on metadata block `b`.
    pub fn inc(&mut self, b: MetaBlock) -> Result<()> {
        self.check_live()?;
        let r = self
            .guard_super(b)
            .and_then(|_| self.sm_inc(SmId::Metadata, b.0));
        // Shared now: the next change must copy it, even though it is new in this transaction.
        self.shadows.remove(&b.0);
        self.poison_on_err(r)
    }

    /// Releases one reference on metadata block `b` (freeing it at zero; what it references is
    /// the caller's business, e.g. [`crate::BTree::delete`]).
    pub fn dec(&mut self, b: MetaBlock) -> Result<()> {
        self.check_live()?;
        let r = self
            .guard_super(b)
            .and_then(|_| self.sm_dec(SmId::Metadata, b.0));
        self.poison_on_err(r)
    }

    fn guard_super(&self, b: MetaBlock) -> Result<()> {
        if b.0 == 0 {
            return Err(Error::InvalidArgument(
                "block 0 is the superblock; its count stays 1".into(),
            ));
        }
        Ok(())
    }

    /// Reference count of metadata block `b` now.
    pub fn ref_count(&self, b: MetaBlock) -> Result<u32> {
        self.sm_get(SmId::Metadata, b.0)
    }

    /// Grows the metadata space map to `nr_blocks` (growing the device first if needed).
    pub fn extend(&mut self, nr_blocks: u64) -> Result<()> {
        self.check_live()?;
        if nr_blocks > MAX_METADATA_BLOCKS {
            return Err(Error::Unsupported(format!(
                "a metadata space map holds at most {MAX_METADATA_BLOCKS} blocks, not {nr_blocks}"
            )));
        }
        self.cache.io().grow(nr_blocks).map_err(|e| Error::Io {
            block: OptBlock(None),
            kind: crate::BlockKind::Unknown,
            op: "grow",
            source: e,
        })?;
        let r = self.sm_extend(SmId::Metadata, nr_blocks);
        self.poison_on_err(r)
    }

    /// Cache occupancy.
    pub fn cache_stats(&self) -> CacheStats {
        CacheStats {
            blocks: self.cache.len(),
            dirty: self.cache.nr_dirty(),
            capacity: self.cache.capacity(),
        }
    }

    // ---------------------------------------------------------------- data space map

    /// True if a data space map is attached.
    pub fn has_data_sm(&self) -> bool {
        self.data.is_some()
    }

    /// Blocks the data space map covers.
    pub fn data_nr_blocks(&self) -> Result<u64> {
        Ok(self.sm(SmId::Data)?.nr_blocks)
    }

    /// Data blocks with a zero count now.
    pub fn data_nr_free(&self) -> Result<u64> {
        let sm = self.sm(SmId::Data)?;
        Ok(sm.nr_blocks - sm.nr_allocated)
    }

    /// Reference count of data block `b` now.
    pub fn data_count(&self, b: DiskBlock) -> Result<u32> {
        self.sm_get(SmId::Data, b.0)
    }

    /// Takes one more reference on data block `b`.
    pub fn data_inc(&mut self, b: DiskBlock) -> Result<()> {
        self.check_live()?;
        let r = self.sm_inc(SmId::Data, b.0);
        self.poison_on_err(r)?;
        self.after_change()
    }

    /// Takes data block `b` from no reference to one, as [`data_inc`](Self::data_inc) does,
    /// with one count lookup for the check and the change. Returns `false` (and changes
    /// nothing) when `b` already has references.
    pub fn data_inc_free(&mut self, b: DiskBlock) -> Result<bool> {
        self.check_live()?;
        let old = self.sm_get(SmId::Data, b.0)?;
        if old != 0 {
            return Ok(false);
        }
        let r = self.sm_set(SmId::Data, b.0, 0, 1);
        self.poison_on_err(r)?;
        self.after_change()?;
        Ok(true)
    }

    /// Releases one reference on data block `b`.
    pub fn data_dec(&mut self, b: DiskBlock) -> Result<()> {
        self.check_live()?;
        let r = self.sm_dec(SmId::Data, b.0);
        self.poison_on_err(r)?;
        self.after_change()
    }

    /// The block [`TransactionManager::data_alloc`] would return, without allocating it.
    pub fn data_find_free(&self) -> Result<Option<DiskBlock>> {
        Ok(self.sm_find_free(SmId::Data)?.map(DiskBlock))
    }

    /// The first block at or after `from` that is free in both the committed and the current
    /// map (`None` if there is none up to the end; wrap around yourself). Make it yours with
    /// [`TransactionManager::data_inc`], which also takes a block from 0 to 1.
    pub fn data_find_free_from(&self, from: DiskBlock) -> Result<Option<DiskBlock>> {
        Ok(self
            .sm_find_free_in(SmId::Data, from.0, u64::MAX)?
            .map(DiskBlock))
    }

    /// Whether `b` is free in both the committed and the current map: what
    /// [`TransactionManager::data_find_free_from`] would say of `b` alone, without searching on.
    pub fn data_is_free(&self, b: DiskBlock) -> Result<bool> {
        Ok(self.sm_find_free_in(SmId::Data, b.0, b.0 + 1)? == Some(b.0))
    }

    /// How many blocks from `from` on, at most `max`, are free one after another as
    /// [`TransactionManager::data_is_free`] means it (0 when `from` is not): a run of free
    /// blocks found in one pass over their bitmaps.
    pub fn data_free_run(&self, from: DiskBlock, max: u64) -> Result<u64> {
        self.sm_free_run(SmId::Data, from.0, max)
    }

    /// Allocates a data block free in both the committed and the current map (count 1).
    /// [`Error::DataSpaceExhausted`] leaves everything unchanged (the transaction stays usable).
    pub fn data_alloc(&mut self) -> Result<DiskBlock> {
        self.check_live()?;
        match self.sm_alloc(SmId::Data) {
            Ok(b) => {
                self.after_change()?;
                Ok(DiskBlock(b))
            }
            Err(e @ Error::DataSpaceExhausted { .. }) => Err(e),
            Err(e) => self.poison_on_err(Err(e)),
        }
    }

    /// Grows the data space map to `nr_blocks`.
    pub fn data_extend(&mut self, nr_blocks: u64) -> Result<()> {
        self.check_live()?;
        let r = self.sm_extend(SmId::Data, nr_blocks);
        self.poison_on_err(r)?;
        self.after_change()
    }

    // ---------------------------------------------------------------- commit

    /// Commits the transaction: flushes the space maps, calls `build` with their roots to get
    /// the superblock, writes every dirty block, syncs, writes the superblock (sealed by `v`) to
    /// block 0, syncs. On success everything changed so far is durable and the next transaction
    /// starts; on error the transaction manager is poisoned (the old superblock is intact unless
    /// the error came after its write).
    pub fn commit<F>(&mut self, v: &'static dyn Validator, build: F) -> Result<CommitInfo>
    where
        F: FnOnce(&CommitRoots) -> Result<Block>,
    {
        self.check_live()?;
        let r = self.commit_inner(v, build);
        self.poison_on_err(r)
    }

    fn commit_inner<F>(&mut self, v: &'static dyn Validator, build: F) -> Result<CommitInfo>
    where
        F: FnOnce(&CommitRoots) -> Result<Block>,
    {
        self.flush_sm(SmId::Data)?;
        self.flush_sm(SmId::Metadata)?;
        if !self.meta.overlay.is_empty()
            || self.data.as_ref().is_some_and(|d| !d.overlay.is_empty())
        {
            return Err(Error::Internal(
                "space map overlays not empty after flushing".into(),
            ));
        }
        let roots = CommitRoots {
            metadata_sm: self.meta.root().pack(),
            data_sm: self.data.as_ref().map(|d| d.root().pack()),
        };
        let mut sb = build(&roots)?;
        let io = self.cache.io().clone();
        let blocks_written = self.cache.write_dirty()?;
        io.sync().map_err(sync_error)?;
        v.seal(MetaBlock(0), &mut sb);
        io.write(MetaBlock(0), &sb).map_err(|e| Error::Io {
            block: OptBlock(Some(MetaBlock(0))),
            kind: v.kind(),
            op: "write",
            source: e,
        })?;
        io.sync().map_err(sync_error)?;
        self.cache.insert_clean(MetaBlock(0), &sb, v);

        self.meta.mark_committed();
        let mut freed_data = Vec::new();
        if let Some(d) = self.data.as_mut() {
            d.mark_committed();
            freed_data = d.freed.take();
        }
        self.shadows.clear();
        Ok(CommitInfo {
            freed_data,
            blocks_written,
        })
    }
}

fn sync_error(e: std::io::Error) -> Error {
    Error::Io {
        block: OptBlock(None),
        kind: crate::BlockKind::Unknown,
        op: "sync",
        source: e,
    }
}
