//! dm-thin's metadata over the `uthin-btree` crate: the superblock, the device details tree,
//! the two-level mapping tree and the commit. No names, no volumes.json (that is `Pool`).
//!
//! Trees (as in the kernel's dm-thin-metadata.c):
//! - device details: dev id → [`DeviceDetails`] (24 bytes, references nothing);
//! - mapping, top level: dev id → root of the device's block tree (a [`SubtreeRef`]: sharing a
//!   device's tree is one reference on its root; removing the entry deletes what only it held);
//! - mapping, bottom level: virtual block → `data block << 24 | time` (a [`DataRef<24>`]: each
//!   leaf holding a value holds one reference on the data block in the data space map).
//!
//! Mapped-block counts change on every provision; like the kernel, they are kept in memory and
//! written to the details tree at commit.

use std::collections::BTreeMap;
use std::sync::Arc;

use uthin_btree::io::BlockIo;
use uthin_btree::{
    BTree, BlockKind, BytesValue, DataRef, DiskBlock, DmValidator, FileIo, MetaBlock,
    SUPERBLOCK_CSUM_XOR, SubtreeRef, TmConfig, TransactionManager,
};

use super::details::{BlockTime, DEVICE_DETAILS_SIZE, DeviceDetails};
use super::superblock::{METADATA_VERSION, SPACE_MAP_ROOT_SIZE, SUPERBLOCK_MAGIC, Superblock};
use super::{Discarded, Mapping, PoolError, Result};
use crate::units::{DataBlock, DevId, VirtBlock};

/// Validator of block 0 (and of a metadata snapshot's superblock copy).
pub(crate) static SUPERBLOCK_VALIDATOR: DmValidator = DmValidator::with_magic(
    BlockKind::Superblock,
    SUPERBLOCK_CSUM_XOR,
    32,
    SUPERBLOCK_MAGIC,
);

/// A device's block tree: virtual block → `data block << 24 | time`.
pub(crate) type BlockTree = BTree<DataRef<24>>;
/// The top level of the mapping tree: dev id → root of the device's block tree.
pub(crate) type TopTree = BTree<SubtreeRef<DataRef<24>>>;
/// The device details tree.
pub(crate) type DetailsTree = BTree<BytesValue<DEVICE_DETAILS_SIZE>>;

/// A held metadata snapshot (for `thin_dump -m` on a live pool).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataSnapshot {
    /// Block of the superblock copy (what `thin_dump -m BLOCK` takes).
    pub block: u64,
}

/// Opens a metadata file (or block device) for block I/O.
pub(crate) fn file_io(path: &std::path::Path) -> Result<Arc<dyn BlockIo>> {
    let io = FileIo::open(path)
        .map_err(|e| PoolError::io(format!("cannot open metadata {}", path.display()), e))?;
    Ok(Arc::new(io))
}

/// The cache every pool uses: 64 MiB (memory is bounded by this, not by the pool's size).
fn tm_config() -> TmConfig {
    TmConfig::default()
}

pub(crate) struct Metadata {
    io: Arc<dyn BlockIo>,
    pub(crate) tm: TransactionManager,
    /// The superblock as the next commit will write it (roots kept current).
    pub(crate) sb: Superblock,
    /// Details changed since the last commit (mapped block counts).
    dirty_details: BTreeMap<u32, DeviceDetails>,
    /// Anything changed since the last commit.
    changed: bool,
}

impl Metadata {
    /// Formats fresh metadata on `io` (grown to `nr_meta_blocks` if smaller) for
    /// `nr_data_blocks` data blocks of `data_block_sectors` sectors, and commits it.
    pub(crate) fn format(
        io: Arc<dyn BlockIo>,
        nr_meta_blocks: u64,
        nr_data_blocks: u64,
        data_block_sectors: u32,
    ) -> Result<Metadata> {
        if io.nr_blocks() < nr_meta_blocks {
            io.grow(nr_meta_blocks)
                .map_err(|e| PoolError::io("cannot size the metadata device", e))?;
        }
        let mut tm = TransactionManager::format(io.clone(), &tm_config())?;
        tm.create_data_sm(nr_data_blocks)?;
        let top = TopTree::create(&mut tm)?;
        let details = DetailsTree::create(&mut tm)?;
        let sb = Superblock {
            flags: 0,
            uuid: [0; 16],
            version: METADATA_VERSION,
            time: 0,
            transaction_id: 0,
            held_root: 0,
            data_sm_root: [0; SPACE_MAP_ROOT_SIZE],
            metadata_sm_root: [0; SPACE_MAP_ROOT_SIZE],
            data_mapping_root: top.root().0,
            device_details_root: details.root().0,
            data_block_size_sectors: data_block_sectors,
            metadata_nr_blocks: tm.nr_blocks(),
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        };
        let mut m = Metadata {
            io,
            tm,
            sb,
            dirty_details: BTreeMap::new(),
            changed: true,
        };
        m.commit()?;
        Ok(m)
    }

    /// Opens the last committed metadata: reads block 0 and the space map roots, nothing else.
    pub(crate) fn open(io: Arc<dyn BlockIo>) -> Result<Metadata> {
        let mut block = [0u8; uthin_btree::BLOCK_SIZE];
        io.read(MetaBlock(0), &mut block)
            .map_err(|e| PoolError::io("cannot read the superblock (metadata block 0)", e))?;
        let sb = Superblock::unpack(&block)?;
        let mut tm = TransactionManager::open(io.clone(), &tm_config(), &sb.metadata_sm_root)
            .map_err(|e| corrupt_root(e, "metadata space map root"))?;
        tm.open_data_sm(&sb.data_sm_root)
            .map_err(|e| corrupt_root(e, "data space map root"))?;
        for (what, root) in [
            ("data mapping root", sb.data_mapping_root),
            ("device details root", sb.device_details_root),
        ] {
            if root == 0 || root >= tm.nr_blocks() {
                return Err(PoolError::Corrupt {
                    block: 0,
                    what: format!(
                        "the superblock's {what} {root} is outside the metadata ({} blocks)",
                        tm.nr_blocks()
                    ),
                });
            }
        }
        Ok(Metadata {
            io,
            tm,
            sb,
            dirty_details: BTreeMap::new(),
            changed: false,
        })
    }

    /// Forgets every change since the last commit (reopens from block 0).
    pub(crate) fn rollback(&mut self) -> Result<()> {
        *self = Metadata::open(self.io.clone())?;
        Ok(())
    }

    pub(crate) fn has_uncommitted_changes(&self) -> bool {
        self.changed
    }

    pub(crate) fn transaction_id(&self) -> u64 {
        self.sb.transaction_id
    }

    pub(crate) fn set_transaction_id(&mut self, id: u64) {
        self.sb.transaction_id = id;
        self.changed = true;
    }

    pub(crate) fn time(&self) -> u32 {
        self.sb.time
    }

    pub(crate) fn held_root(&self) -> Option<u64> {
        (self.sb.held_root != 0).then_some(self.sb.held_root)
    }

    pub(crate) fn needs_check(&self) -> bool {
        self.sb.flags & super::superblock::FLAG_NEEDS_CHECK != 0
    }

    pub(crate) fn data_block_size(&self) -> u64 {
        self.sb.data_block_size()
    }

    pub(crate) fn data_nr_blocks(&self) -> u64 {
        self.tm.data_nr_blocks().unwrap_or(0)
    }

    pub(crate) fn data_nr_free(&self) -> Result<u64> {
        Ok(self.tm.data_nr_free()?)
    }

    pub(crate) fn metadata_nr_blocks(&self) -> u64 {
        self.tm.nr_blocks()
    }

    pub(crate) fn metadata_nr_free(&self) -> Result<u64> {
        Ok(self.tm.nr_free())
    }

    /// Metadata blocks one more change plus the commit after it may need in the worst case:
    /// every path shadowed and split (two trees of up to ~8 levels, both space maps' index
    /// paths and reference-count trees), and at commit a shadow of every space-map bitmap the
    /// transaction touched (at most all of them). dm-thin keeps such a reserve too.
    pub(crate) fn metadata_reserve(&self) -> u64 {
        use uthin_btree::space_map::ENTRIES_PER_BITMAP;
        256 + self.data_nr_blocks().div_ceil(ENTRIES_PER_BITMAP)
            + self.metadata_nr_blocks().div_ceil(ENTRIES_PER_BITMAP)
    }

    /// Refuses a change, before making it, when the metadata could run out half-way (which
    /// would abort the whole open transaction).
    pub(crate) fn check_metadata_space(&self) -> Result<()> {
        if self.metadata_nr_free()? < self.metadata_reserve() {
            return Err(PoolError::NoMetadataSpace);
        }
        Ok(())
    }

    pub(crate) fn data_count(&self, b: DataBlock) -> Result<u32> {
        Ok(self.tm.data_count(DiskBlock(b.0))?)
    }

    fn top(&self) -> TopTree {
        TopTree::open(MetaBlock(self.sb.data_mapping_root))
    }

    fn details_tree(&self) -> DetailsTree {
        DetailsTree::open(MetaBlock(self.sb.device_details_root))
    }

    /// Device ids in the metadata, in order.
    pub(crate) fn device_ids(&self) -> Result<Vec<DevId>> {
        let mut ids = Vec::new();
        for entry in self.details_tree().iter(&self.tm, ..) {
            let (k, _) = entry?;
            ids.push(DevId(k as u32));
        }
        Ok(ids)
    }

    /// The details of `dev` as the next commit will write them.
    pub(crate) fn details(&self, dev: DevId) -> Result<Option<DeviceDetails>> {
        if let Some(d) = self.dirty_details.get(&dev.0) {
            return Ok(Some(*d));
        }
        Ok(self
            .details_tree()
            .lookup(&self.tm, u64::from(dev.0))?
            .map(|raw| DeviceDetails::unpack(&raw)))
    }

    fn existing_details(&self, dev: DevId) -> Result<DeviceDetails> {
        self.details(dev)?.ok_or(PoolError::NoSuchDevice(dev.0))
    }

    fn put_details(&mut self, dev: DevId, d: DeviceDetails) -> Result<()> {
        let mut t = self.details_tree();
        t.insert(&mut self.tm, u64::from(dev.0), &d.pack())?;
        self.sb.device_details_root = t.root().0;
        self.dirty_details.remove(&dev.0);
        Ok(())
    }

    fn device_root(&self, dev: DevId) -> Result<MetaBlock> {
        self.top()
            .lookup(&self.tm, u64::from(dev.0))?
            .ok_or(PoolError::NoSuchDevice(dev.0))
    }

    fn check_new_dev(&self, dev: DevId) -> Result<()> {
        if dev > DevId::MAX {
            return Err(PoolError::InvalidArgument(format!(
                "device id {} is above dm-thin's limit {}",
                dev.0,
                DevId::MAX.0
            )));
        }
        if self.details(dev)?.is_some() || self.top().lookup(&self.tm, u64::from(dev.0))?.is_some()
        {
            return Err(PoolError::InvalidArgument(format!(
                "thin device {} already exists",
                dev.0
            )));
        }
        Ok(())
    }

    /// dm's `create_thin`: an empty block tree and fresh details.
    pub(crate) fn create_thin(&mut self, dev: DevId) -> Result<()> {
        self.check_new_dev(dev)?;
        self.check_metadata_space()?;
        self.changed = true;
        let tree = BlockTree::create(&mut self.tm)?;
        let mut top = self.top();
        top.insert(&mut self.tm, u64::from(dev.0), &tree.root())?;
        self.sb.data_mapping_root = top.root().0;
        let d = DeviceDetails {
            mapped_blocks: 0,
            transaction_id: self.sb.transaction_id,
            creation_time: self.sb.time,
            snapshotted_time: self.sb.time,
        };
        self.put_details(dev, d)
    }

    /// dm's `create_snap`: share the origin's block tree (one reference on its root), bump the
    /// pool time, record the snapshot time on both devices.
    pub(crate) fn create_snapshot(&mut self, dev: DevId, origin: DevId) -> Result<()> {
        self.check_new_dev(dev)?;
        self.check_metadata_space()?;
        let origin_root = self.device_root(origin)?;
        let mut origin_details = self.existing_details(origin)?;
        self.changed = true;
        let shared = BlockTree::open(origin_root).clone_tree(&mut self.tm)?;
        let mut top = self.top();
        top.insert(&mut self.tm, u64::from(dev.0), &shared.root())?;
        self.sb.data_mapping_root = top.root().0;
        self.sb.time = self.sb.time.wrapping_add(1);
        origin_details.snapshotted_time = self.sb.time;
        self.put_details(origin, origin_details)?;
        let d = DeviceDetails {
            mapped_blocks: origin_details.mapped_blocks,
            transaction_id: self.sb.transaction_id,
            creation_time: self.sb.time,
            snapshotted_time: self.sb.time,
        };
        self.put_details(dev, d)
    }

    /// dm's `delete_thin_device`: drops the device's reference on its block tree (nodes and
    /// data blocks only it held are freed) and its details.
    pub(crate) fn delete_device(&mut self, dev: DevId) -> Result<()> {
        self.existing_details(dev)?;
        self.changed = true;
        let mut top = self.top();
        top.remove(&mut self.tm, u64::from(dev.0))?;
        self.sb.data_mapping_root = top.root().0;
        let mut details = self.details_tree();
        details.remove(&mut self.tm, u64::from(dev.0))?;
        self.sb.device_details_root = details.root().0;
        self.dirty_details.remove(&dev.0);
        Ok(())
    }

    /// Where `vblock` of `dev` lives and whether it is shared (exactly: a node on the block
    /// tree's path with count > 1, or the data block's count > 1).
    pub(crate) fn lookup(&self, dev: DevId, vblock: VirtBlock) -> Result<Option<Mapping>> {
        let root = self.device_root(dev)?;
        let Some((raw, path_shared)) = BlockTree::open(root).lookup_shared(&self.tm, vblock.0)?
        else {
            return Ok(None);
        };
        let bt = BlockTime::unpack(raw);
        let shared = path_shared || self.data_count(bt.block)? > 1;
        Ok(Some(Mapping {
            block: bt.block,
            shared,
        }))
    }

    /// The first mapping of `dev` at or after `vblock`: its virtual and its data block.
    pub(crate) fn next_mapping(
        &self,
        dev: DevId,
        vblock: VirtBlock,
    ) -> Result<Option<(VirtBlock, DataBlock)>> {
        let root = self.device_root(dev)?;
        Ok(BlockTree::open(root)
            .lookup_ge(&self.tm, vblock.0)?
            .map(|(k, raw)| (VirtBlock(k), BlockTime::unpack(raw).block)))
    }

    /// The first data block at or after `from` that is free in both the committed and the
    /// current data space map.
    pub(crate) fn find_free_data_block(&self, from: u64) -> Result<Option<DataBlock>> {
        Ok(self
            .tm
            .data_find_free_from(DiskBlock(from))?
            .map(|b| DataBlock(b.0)))
    }

    /// Whether `block` is free in both the committed and the current data space map.
    pub(crate) fn data_block_is_free(&self, block: DataBlock) -> Result<bool> {
        Ok(self.tm.data_is_free(DiskBlock(block.0))?)
    }

    /// How many blocks from `from` on, at most `max`, are free in both data space maps one
    /// after another (0 when `from` is not).
    pub(crate) fn data_free_run(&self, from: DataBlock, max: u64) -> Result<u64> {
        Ok(self.tm.data_free_run(DiskBlock(from.0), max)?)
    }

    fn adjust_mapped(&mut self, dev: DevId, delta: i64) -> Result<()> {
        let mut d = self.existing_details(dev)?;
        d.mapped_blocks = d.mapped_blocks.saturating_add_signed(delta);
        self.dirty_details.insert(dev.0, d);
        Ok(())
    }

    /// Maps `vblock` of `dev` to `block`, which must be free (count 0 → 1). Returns the block
    /// it replaced (its count was decremented by the tree).
    pub(crate) fn insert_mapping(
        &mut self,
        dev: DevId,
        vblock: VirtBlock,
        block: DataBlock,
    ) -> Result<Option<DataBlock>> {
        if block.0 >= self.data_nr_blocks() {
            return Err(PoolError::InvalidArgument(format!(
                "{block} is outside the pool's {} data blocks",
                self.data_nr_blocks()
            )));
        }
        if vblock.0 > u64::MAX - 1 {
            return Err(PoolError::OutOfRange { dev, vblock });
        }
        let tree = self.mapping_tree(dev)?;
        self.check_metadata_space()?;
        if !self.tm.data_inc_free(DiskBlock(block.0))? {
            let count = self.data_count(block)?;
            return Err(PoolError::InvalidArgument(format!(
                "{block} is not free (count {count}): it was not reserved"
            )));
        }
        self.changed = true;
        let value = BlockTime {
            block,
            time: self.sb.time,
        }
        .pack();
        let old = self.insert_packed(dev, tree, vblock, &value)?;
        if old.is_none() {
            self.adjust_mapped(dev, 1)?;
        }
        Ok(old.map(|raw| BlockTime::unpack(raw).block))
    }

    /// Where `dev`'s mapping tree is, for [`insert_packed`](Metadata::insert_packed).
    fn mapping_tree(&self, dev: DevId) -> Result<MappingTree> {
        let (root, path_in_place) = self
            .top()
            .lookup_in_place(&self.tm, u64::from(dev.0))?
            .ok_or(PoolError::NoSuchDevice(dev.0))?;
        Ok(MappingTree {
            root,
            in_place: path_in_place && self.tm.writes_in_place(root),
        })
    }

    /// Inserts a packed block-and-time value at `vblock` in `dev`'s mapping tree `tree` (from
    /// [`mapping_tree`](Metadata::mapping_tree), with nothing changed since); returns the value
    /// it replaced. Reference counts are the caller's business.
    ///
    /// When the tree and the top-level path to it were changed in this transaction already
    /// and nothing shares them since (the common case under a write load, and during a
    /// restore), the root is written in place and keeps its block, so the top-level tree
    /// already points at it and needs no change. Otherwise the top-level path is copied first
    /// (dm-thin's order): with that path shared, by a metadata snapshot say, copying it counts
    /// the old root's new sharer before the root is changed.
    fn insert_packed(
        &mut self,
        dev: DevId,
        tree: MappingTree,
        vblock: VirtBlock,
        value: &u64,
    ) -> Result<Option<u64>> {
        if tree.in_place {
            let mut bt = BlockTree::open(tree.root);
            let old = bt.insert(&mut self.tm, vblock.0, value)?;
            if bt.root() != tree.root {
                return Err(uthin_btree::Error::Internal(format!(
                    "the mapping tree of {dev} moved from {} to {} on an insert in place",
                    tree.root,
                    bt.root()
                ))
                .into());
            }
            return Ok(old);
        }
        let mut top = self.top();
        let old = top.update_value(&mut self.tm, u64::from(dev.0), |tm, root| {
            let mut bt = BlockTree::open(*root);
            let old = bt.insert(tm, vblock.0, value)?;
            *root = bt.root();
            Ok(old)
        })?;
        self.sb.data_mapping_root = top.root().0;
        old.ok_or(PoolError::NoSuchDevice(dev.0))
    }

    /// Unmaps `[begin, end)` of `dev`.
    pub(crate) fn discard(
        &mut self,
        dev: DevId,
        begin: VirtBlock,
        end: VirtBlock,
    ) -> Result<Discarded> {
        self.device_root(dev)?;
        if end <= begin {
            return Ok(Discarded::default());
        }
        self.check_metadata_space()?;
        self.changed = true;
        let mut removed_blocks = Vec::new();
        let mut top = self.top();
        let removed = top.update_value(&mut self.tm, u64::from(dev.0), |tm, root| {
            let mut tree = BlockTree::open(*root);
            let n = tree.remove_range(tm, begin.0..end.0, |_, v| {
                removed_blocks.push(BlockTime::unpack(*v).block);
            })?;
            *root = tree.root();
            Ok(n)
        })?;
        self.sb.data_mapping_root = top.root().0;
        let unmapped = removed.ok_or(PoolError::NoSuchDevice(dev.0))?;
        self.adjust_mapped(dev, -(unmapped as i64))?;
        let mut freed = Vec::new();
        for b in &removed_blocks {
            if self.data_count(*b)? == 0 {
                freed.push(*b);
            }
        }
        Ok(Discarded {
            unmapped,
            removed: removed_blocks,
            freed,
        })
    }

    /// Restore: a device with the given details and an empty tree.
    pub(crate) fn restore_device(&mut self, dev: DevId, d: DeviceDetails) -> Result<()> {
        self.check_new_dev(dev)?;
        self.changed = true;
        let tree = BlockTree::create(&mut self.tm)?;
        let mut top = self.top();
        top.insert(&mut self.tm, u64::from(dev.0), &tree.root())?;
        self.sb.data_mapping_root = top.root().0;
        self.put_details(dev, d)
    }

    /// Restore: maps `vblock` of `dev` to `bt`, taking one more reference on the data block
    /// (restored devices may share blocks). Mapped-block counts come from the details given to
    /// [`Metadata::restore_device`].
    pub(crate) fn restore_mapping(
        &mut self,
        dev: DevId,
        vblock: VirtBlock,
        bt: BlockTime,
    ) -> Result<()> {
        if bt.block.0 >= self.data_nr_blocks() {
            return Err(PoolError::InvalidArgument(format!(
                "device {}: {vblock} maps to {}, outside the pool's {} data blocks",
                dev.0,
                bt.block,
                self.data_nr_blocks()
            )));
        }
        let tree = self.mapping_tree(dev)?;
        self.changed = true;
        self.tm.data_inc(DiskBlock(bt.block.0))?;
        let value = bt.pack();
        match self.insert_packed(dev, tree, vblock, &value)? {
            Some(_) => Err(PoolError::InvalidArgument(format!(
                "device {}: {vblock} is mapped twice",
                dev.0
            ))),
            None => Ok(()),
        }
    }

    /// Restore: the pool time and transaction id.
    pub(crate) fn restore_header(&mut self, time: u32, transaction_id: u64) {
        self.sb.time = time;
        self.sb.transaction_id = transaction_id;
        self.changed = true;
    }

    /// Calls `f` for every mapping of `dev`, in virtual block order.
    pub(crate) fn walk_mappings(
        &self,
        dev: DevId,
        f: &mut dyn FnMut(VirtBlock, BlockTime) -> Result<()>,
    ) -> Result<()> {
        let root = self.device_root(dev)?;
        for entry in BlockTree::open(root).iter(&self.tm, ..) {
            let (k, v) = entry?;
            f(VirtBlock(k), BlockTime::unpack(v))?;
        }
        Ok(())
    }

    /// The mappings of `dev` in virtual block order, one leaf in memory at a time.
    pub(crate) fn iter_mappings(
        &self,
        dev: DevId,
    ) -> Result<impl Iterator<Item = Result<(VirtBlock, BlockTime)>> + '_> {
        let root = self.device_root(dev)?;
        Ok(BlockTree::open(root).iter(&self.tm, ..).map(|e| {
            e.map(|(k, v)| (VirtBlock(k), BlockTime::unpack(v)))
                .map_err(PoolError::from)
        }))
    }

    pub(crate) fn grow_data(&mut self, nr_blocks: u64) -> Result<()> {
        self.changed = true;
        self.tm.data_extend(nr_blocks)?;
        Ok(())
    }

    pub(crate) fn grow_metadata(&mut self, nr_blocks: u64) -> Result<()> {
        self.io
            .grow(nr_blocks)
            .map_err(|e| PoolError::io("cannot grow the metadata device", e))?;
        self.changed = true;
        self.tm.extend(nr_blocks)?;
        self.sb.metadata_nr_blocks = self.tm.nr_blocks();
        Ok(())
    }

    /// dm's `reserve_metadata_snap`: commit, copy the superblock to a fresh block (space map
    /// roots wiped: the copy is not a pool of its own), take a reference on both trees' roots,
    /// record the copy as the held root.
    pub(crate) fn reserve_metadata_snap(&mut self) -> Result<MetadataSnapshot> {
        if self.sb.held_root != 0 {
            return Err(PoolError::InvalidArgument(format!(
                "a metadata snapshot is already held at block {}",
                self.sb.held_root
            )));
        }
        self.commit()?;
        self.changed = true;
        let mut copy = self.sb.clone();
        copy.data_sm_root = [0; SPACE_MAP_ROOT_SIZE];
        copy.metadata_sm_root = [0; SPACE_MAP_ROOT_SIZE];
        let packed = copy.pack();
        let nr = {
            let mut b = self.tm.new_block(&SUPERBLOCK_VALIDATOR)?;
            b.copy_from_slice(&packed);
            b.nr()
        };
        self.tm.inc(MetaBlock(self.sb.data_mapping_root))?;
        self.tm.inc(MetaBlock(self.sb.device_details_root))?;
        self.sb.held_root = nr.0;
        Ok(MetadataSnapshot { block: nr.0 })
    }

    /// dm's `release_metadata_snap`: drop the copy's references on both trees, free the copy.
    pub(crate) fn release_metadata_snap(&mut self) -> Result<()> {
        let held = self.sb.held_root;
        if held == 0 {
            return Err(PoolError::InvalidArgument(
                "no metadata snapshot is held".into(),
            ));
        }
        let copy = self.read_held_copy(held)?;
        self.changed = true;
        TopTree::open(MetaBlock(copy.data_mapping_root)).delete(&mut self.tm)?;
        DetailsTree::open(MetaBlock(copy.device_details_root)).delete(&mut self.tm)?;
        self.tm.dec(MetaBlock(held))?;
        self.sb.held_root = 0;
        Ok(())
    }

    /// Reads a metadata snapshot's superblock copy.
    pub(crate) fn read_held_copy(&self, held: u64) -> Result<Superblock> {
        let b = self.tm.read(MetaBlock(held), &SUPERBLOCK_VALIDATOR)?;
        let mut raw = [0u8; uthin_btree::BLOCK_SIZE];
        raw.copy_from_slice(&b[..]);
        // The copy records its own block number; unpack expects block 0's.
        raw[8..16].copy_from_slice(&0u64.to_le_bytes());
        let csum = super::superblock::dm_checksum(&raw[4..], SUPERBLOCK_CSUM_XOR);
        raw[0..4].copy_from_slice(&csum.to_le_bytes());
        Superblock::unpack(&raw).map_err(|e| match e {
            PoolError::Corrupt { what, .. } => PoolError::Corrupt { block: held, what },
            other => other,
        })
    }

    /// Commits: writes the changed details, then the transaction manager's sequence (space
    /// maps flushed → dirty blocks written → sync → superblock at block 0 → sync). Returns the
    /// data blocks freed in the committed transaction.
    pub(crate) fn commit(&mut self) -> Result<Vec<DataBlock>> {
        if !self.changed && self.dirty_details.is_empty() {
            // Nothing to make durable: no I/O (the volume layer's timer calls this often).
            return Ok(Vec::new());
        }
        let dirty: Vec<(u32, DeviceDetails)> =
            self.dirty_details.iter().map(|(k, v)| (*k, *v)).collect();
        for (dev, d) in dirty {
            self.put_details(DevId(dev), d)?;
        }
        let sb = &mut self.sb;
        let info = self.tm.commit(&SUPERBLOCK_VALIDATOR, |roots| {
            sb.metadata_sm_root = roots.metadata_sm;
            if let Some(d) = roots.data_sm {
                sb.data_sm_root = d;
            }
            Ok(sb.pack())
        })?;
        self.changed = false;
        let mut freed = Vec::new();
        for e in info.freed_data {
            freed.extend((e.start.0..e.start.0 + e.len).map(DataBlock));
        }
        Ok(freed)
    }
}

/// A device's mapping tree as [`Metadata::mapping_tree`] found it.
#[derive(Clone, Copy)]
struct MappingTree {
    root: MetaBlock,
    /// An insert goes into the tree in place, leaving the top-level tree as it is.
    in_place: bool,
}

fn corrupt_root(e: uthin_btree::Error, what: &str) -> PoolError {
    match PoolError::from(e) {
        PoolError::Metadata(inner) => PoolError::Corrupt {
            block: 0,
            what: format!("bad {what}: {inner}"),
        },
        other => other,
    }
}
