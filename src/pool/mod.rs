//! The thin pool: dm-thin's metadata (superblock, device details, two-level mapping tree, data
//! and metadata space maps) over the `uthin-btree` crate, plus `volumes.json` for names and
//! sizes. See `docs/pool.md` for the API the data path builds on and the crash protocol.
//!
//! Layering: [`Pool`] (this file) owns names, the volumes.json protocol, reservations and the
//! freed-block quarantine; `metadata.rs` owns the dm-thin trees and the commit; the `uthin-btree`
//! crate below it owns blocks, shadowing, space maps and B-trees.

mod error;
mod info;
pub(crate) mod metadata;

pub mod details;
pub mod files;
pub mod size;
pub mod superblock;
pub mod volumes;

use foldhash::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use uthin_btree::io::BlockIo;

pub use error::PoolError;
pub use info::{Committed, Discarded, Mapping, PoolStatus, Usage, VolumeInfo};
pub use metadata::MetadataSnapshot;

use crate::units::{DataBlock, DevId, VirtBlock};
use files::{PoolLock, PoolPaths};
use metadata::Metadata;
use volumes::{CrashAt, Pending, PendingOp, Reconciled, VolumeRecord, VolumesFile, VolumesStore};

/// Result of pool operations.
pub type Result<T> = std::result::Result<T, PoolError>;

/// Options of [`Pool::create`].
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Data space in bytes (rounded down to whole blocks).
    pub data_size: u64,
    /// Data block size in bytes: a power of two, 64 KiB..1 GiB.
    pub block_size: u64,
    /// Metadata size in bytes; `None`: thin_metadata_size's rule ([`size::default_metadata_size`]).
    pub metadata_size: Option<u64>,
    /// Destroy an existing pool in the directory.
    pub force: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            data_size: 100 << 30,
            block_size: size::DEFAULT_DATA_BLOCK_SIZE,
            metadata_size: None,
            force: false,
        }
    }
}

/// How to open a pool; the defaults open `DIR/metadata` as a file. Tests substitute the
/// metadata I/O (a fault-injecting engine) and stop volumes.json writes at chosen steps.
#[derive(Clone, Default)]
pub struct OpenOptions {
    /// Metadata block I/O to use instead of `DIR/metadata`.
    pub metadata_io: Option<Arc<dyn BlockIo>>,
    /// Where to stop volumes.json writes (crash tests).
    pub volumes_crash: Option<CrashAt>,
    /// Skip the `DIR/lock` flock (only for tests that open the same directory twice on
    /// purpose, e.g. to reopen after a simulated crash while the crashed pool is still alive).
    pub no_lock: bool,
}

/// A data block set aside for one mapping: free in both the committed and the current data
/// space map and handed to nobody else. Consumed by [`Pool::insert_mapping`]; give it back with
/// [`Pool::release_reservation`] if it will not be used. Not `Clone`: one reservation, one use.
#[derive(Debug, PartialEq, Eq)]
pub struct Reservation {
    block: DataBlock,
    /// The block was given back by [`Pool::release_zeroed`] and reserved by nobody since.
    zeroed: bool,
}

impl Reservation {
    /// The reserved data block (write the data here before inserting the mapping).
    pub fn block(&self) -> DataBlock {
        self.block
    }

    /// Whether the block is known to read as zeros: its last holder gave it back unwritten
    /// with [`Pool::release_zeroed`], and nobody has reserved it since. `false` says nothing.
    pub fn known_zeroed(&self) -> bool {
        self.zeroed
    }
}

/// A handle on a pool's reservations that needs no access to the pool (the volume layer uses
/// it without taking the lock it keeps the pool under). It only reserves blocks that are
/// usable by construction, and gives reservations back; from [`Pool::reserver`].
#[derive(Clone)]
pub struct Reserver(Arc<Mutex<Allocator>>);

impl Reserver {
    /// Reserves `block` if it was given back zeroed ([`Pool::release_zeroed`]) and nobody has
    /// reserved it since; `None` otherwise (then [`Pool::reserve_data_block_at`] can tell).
    /// Such a block is usable without asking the space maps: it was free in both and inside
    /// the pool when it was reserved, the pool never shrinks, and a block is only ever
    /// allocated or quarantined after a reservation, which would have cleared its mark. The
    /// reservation is [`known_zeroed`](Reservation::known_zeroed).
    pub fn reserve_zeroed_at(&self, block: DataBlock) -> Option<Reservation> {
        let mut a = self.0.lock();
        (a.is_zeroed(block.0) && !a.reserved.contains(&block.0)).then(|| a.reserve(block.0))
    }

    /// [`Pool::release_zeroed`].
    pub fn release_zeroed(&self, r: Reservation) {
        self.0.lock().release_zeroed(r);
    }
}

/// Blocks per window of [`Allocator::zeroed`].
const ZEROED_WINDOW: u64 = 16;

/// Windows [`Allocator::zeroed`] keeps at most (about 1.5 MiB); past that, blocks given back
/// as zeroed are forgotten (their next holder checks them).
const MAX_ZEROED_WINDOWS: usize = 64 * 1024;

#[derive(Debug, Default)]
struct Allocator {
    /// Blocks reserved and not yet inserted or released. (foldhash: with SipHash, the
    /// lookups in this set of up to 60 Ki blocks took 5 % of the CPU of fresh writes.)
    reserved: HashSet<u64>,
    /// Blocks freed by a durable commit whose holes the data layer has not confirmed punched.
    quarantined: HashSet<u64>,
    /// Free, unreserved blocks known to read as zeros ([`Pool::release_zeroed`]): window
    /// (block / [`ZEROED_WINDOW`]) → a bit per block of the window. A block leaves it when
    /// anyone reserves it, so a bit is only ever set for a block nobody could have written
    /// since it was given back (data goes only into reserved or mapped blocks). In memory
    /// only: after a restart every block is checked again.
    zeroed: foldhash::HashMap<u64, u16>,
    /// Where the next search starts (keeps allocation roughly sequential).
    cursor: u64,
}

/// `block`'s window in [`Allocator::zeroed`] and its bit there.
fn zeroed_bit(block: u64) -> (u64, u16) {
    (block / ZEROED_WINDOW, 1u16 << (block % ZEROED_WINDOW))
}

impl Allocator {
    /// Whether `block` is marked as given back zeroed and not reserved since.
    fn is_zeroed(&self, block: u64) -> bool {
        let (window, bit) = zeroed_bit(block);
        self.zeroed.get(&window).is_some_and(|m| m & bit != 0)
    }

    /// Takes back an unused reservation.
    fn release(&mut self, r: Reservation) {
        self.reserved.remove(&r.block.0);
    }

    /// Takes back an unused reservation of a block that reads as zeros, and marks it so.
    fn release_zeroed(&mut self, r: Reservation) {
        let b = r.block.0;
        if !self.reserved.remove(&b) {
            return;
        }
        let (window, bit) = zeroed_bit(b);
        if let Some(mask) = self.zeroed.get_mut(&window) {
            *mask |= bit;
        } else if self.zeroed.len() < MAX_ZEROED_WINDOWS {
            self.zeroed.insert(window, bit);
        }
    }

    /// Reserves `block` (the caller checked that it is usable).
    fn reserve(&mut self, block: u64) -> Reservation {
        self.reserved.insert(block);
        let (window, bit) = zeroed_bit(block);
        let mut zeroed = false;
        if let Some(mask) = self.zeroed.get_mut(&window) {
            zeroed = *mask & bit != 0;
            *mask &= !bit;
            if *mask == 0 {
                self.zeroed.remove(&window);
            }
        }
        Reservation {
            block: DataBlock(block),
            zeroed,
        }
    }
}

/// An open thin pool. `&self` methods may be called concurrently; see `docs/pool.md`.
pub struct Pool {
    paths: PoolPaths,
    _lock: Option<PoolLock>,
    meta: Metadata,
    volumes: VolumesFile,
    store: VolumesStore,
    /// Reservations; shared with the [`Reserver`] handles the pool gives out.
    alloc: Arc<Mutex<Allocator>>,
    /// How volumes.json was reconciled at open.
    reconciled: Reconciled,
    /// Set when a commit failed: the on-disk state is unknown until the pool is reopened.
    failed: Option<String>,
    /// Blocks freed by commits made inside other operations (create, snapshot, grow, ...),
    /// not yet handed to the caller: the next [`Pool::commit`] returns them.
    unreported_freed: Mutex<Vec<DataBlock>>,
}

fn check_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '+' | '@'))
        && !name.starts_with('.')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(PoolError::InvalidArgument(format!(
            "invalid volume name `{name}`: use 1-128 letters, digits and - _ . + @, not starting with . or -"
        )))
    }
}

impl Pool {
    /// Creates a pool in `dir` (made if missing): sparse data file (or a block device behind
    /// a `DIR/data` symlink), fresh metadata, an empty volumes.json. Refuses to overwrite an
    /// existing pool unless `opts.force`.
    pub fn create(dir: &Path, opts: &CreateOptions) -> Result<Pool> {
        Pool::create_with(dir, opts, OpenOptions::default())
    }

    /// [`Pool::create`] with test hooks (`hooks.metadata_io` replaces `DIR/metadata`).
    pub fn create_with(dir: &Path, opts: &CreateOptions, hooks: OpenOptions) -> Result<Pool> {
        size::check_data_block_size(opts.block_size).map_err(PoolError::InvalidArgument)?;
        let nr_data_blocks = opts.data_size / opts.block_size;
        if nr_data_blocks == 0 {
            return Err(PoolError::InvalidArgument(format!(
                "data size {} is smaller than one {} block",
                size::format_size(opts.data_size),
                size::format_size(opts.block_size)
            )));
        }
        if nr_data_blocks > details::MAX_DATA_BLOCK {
            return Err(PoolError::InvalidArgument(format!(
                "data size {} needs more than dm-thin's 2^40 blocks",
                size::format_size(opts.data_size)
            )));
        }
        let metadata_size = match opts.metadata_size {
            Some(s) => {
                size::check_metadata_size(s).map_err(PoolError::InvalidArgument)?;
                s
            }
            None => size::default_metadata_size(opts.data_size, opts.block_size),
        };
        std::fs::create_dir_all(dir)
            .map_err(|e| PoolError::io(format!("cannot create {}", dir.display()), e))?;
        let paths = PoolPaths::new(dir);
        let lock = if hooks.no_lock {
            None
        } else {
            Some(PoolLock::acquire(&paths)?)
        };
        if !opts.force && (paths.metadata().exists() && has_superblock(&paths.metadata())) {
            return Err(PoolError::PoolExists(dir.to_path_buf()));
        }
        if opts.force && !files::is_block_device(&paths.data()) {
            // A recreated pool must not show the old pool's data in fresh blocks: start from an
            // empty sparse file.
            let _ = std::fs::remove_file(paths.data());
        }
        files::ensure_size(&paths.data(), nr_data_blocks * opts.block_size)?;
        let io = match hooks.metadata_io {
            Some(io) => io,
            None => {
                let meta_file = paths.metadata();
                if !files::is_block_device(&meta_file) {
                    // A fresh file: drop any old content so nothing stale is read back.
                    let _ = std::fs::remove_file(&meta_file);
                }
                files::ensure_size(&meta_file, metadata_size)?;
                metadata::file_io(&meta_file)?
            }
        };
        let nr_meta_blocks = metadata_size / superblock::METADATA_BLOCK_SIZE as u64;
        let meta = Metadata::format(
            io,
            nr_meta_blocks,
            nr_data_blocks,
            (opts.block_size / 512) as u32,
        )?;
        let mut store = VolumesStore::new(dir, paths.volumes());
        if let Some(c) = hooks.volumes_crash {
            store = store.with_crash(c);
        }
        let volumes = VolumesFile::new(meta.transaction_id());
        store.write(&volumes)?;
        Ok(Pool {
            paths,
            _lock: lock,
            meta,
            volumes,
            store,
            alloc: Arc::new(Mutex::new(Allocator::default())),
            reconciled: Reconciled::Consistent,
            failed: None,
            unreported_freed: Mutex::new(Vec::new()),
        })
    }

    /// Opens the pool in `dir`: takes the lock, reads the superblock (no full scan), and
    /// reconciles volumes.json with the metadata's transaction id (a pool without volumes.json,
    /// e.g. made by thin_restore, gets an empty one: its devices are listed by dev id).
    pub fn open(dir: &Path) -> Result<Pool> {
        Pool::open_with(dir, OpenOptions::default())
    }

    /// [`Pool::open`] with test hooks.
    pub fn open_with(dir: &Path, opts: OpenOptions) -> Result<Pool> {
        let paths = PoolPaths::new(dir);
        if opts.metadata_io.is_none() && !paths.metadata().exists() {
            return Err(PoolError::NoPool(dir.to_path_buf()));
        }
        let lock = if opts.no_lock {
            None
        } else {
            Some(PoolLock::acquire(&paths)?)
        };
        let io = match opts.metadata_io {
            Some(io) => io,
            None => metadata::file_io(&paths.metadata())?,
        };
        let meta = Metadata::open(io)?;
        {
            let f = files::open_rw(&paths.data())?;
            let have = files::file_or_device_size(&f, &paths.data())?;
            let need = meta.data_nr_blocks() * meta.data_block_size();
            if have < need {
                return Err(PoolError::InvalidArgument(format!(
                    "data file {} holds {have} bytes but the metadata maps {} blocks of {} ({need} bytes)",
                    paths.data().display(),
                    meta.data_nr_blocks(),
                    size::format_size(meta.data_block_size())
                )));
            }
        }
        let mut store = VolumesStore::new(dir, paths.volumes());
        if let Some(c) = opts.volumes_crash {
            store = store.with_crash(c);
        }
        let (volumes, reconciled) = if store.exists() {
            let mut v = store.read()?;
            let r = v.reconcile(meta.transaction_id());
            if matches!(r, Reconciled::RolledBack(_) | Reconciled::RolledForward(_)) {
                store.write(&v)?;
            }
            (v, r)
        } else {
            let v = VolumesFile::new(meta.transaction_id());
            store.write(&v)?;
            (v, Reconciled::Consistent)
        };
        Ok(Pool {
            paths,
            _lock: lock,
            meta,
            volumes,
            store,
            alloc: Arc::new(Mutex::new(Allocator::default())),
            reconciled,
            failed: None,
            unreported_freed: Mutex::new(Vec::new()),
        })
    }

    /// The pool directory.
    pub fn dir(&self) -> &Path {
        &self.paths.dir
    }

    /// `DIR/data`: the data file the volume layer reads and writes.
    pub fn data_path(&self) -> PathBuf {
        self.paths.data()
    }

    /// Data block size in bytes.
    pub fn data_block_size(&self) -> u64 {
        self.meta.data_block_size()
    }

    /// How volumes.json was reconciled with the metadata at open.
    pub fn reconciled(&self) -> &Reconciled {
        &self.reconciled
    }

    pub(crate) fn metadata(&self) -> &Metadata {
        &self.meta
    }

    pub(crate) fn metadata_mut(&mut self) -> &mut Metadata {
        &mut self.meta
    }

    /// Makes volumes.json agree with the metadata's transaction id after a restore.
    pub(crate) fn sync_volumes_txid(&mut self) -> Result<()> {
        self.volumes.transaction_id = self.meta.transaction_id();
        self.store.write(&self.volumes)
    }

    /// The names file as it stands (for `check`).
    pub fn volumes_file(&self) -> &VolumesFile {
        &self.volumes
    }

    /// The metadata transaction id.
    pub fn transaction_id(&self) -> u64 {
        self.meta.transaction_id()
    }

    /// Sets the metadata transaction id (dm's `set_transaction_id old new`); durable at the
    /// next commit. volumes.json follows it, so prefer the named operations.
    pub fn set_transaction_id(&mut self, old: u64, new: u64) -> Result<()> {
        let actual = self.meta.transaction_id();
        if actual != old {
            return Err(PoolError::TransactionIdMismatch {
                expected: old,
                actual,
            });
        }
        self.meta.set_transaction_id(new);
        Ok(())
    }

    // ----- names -----

    fn record(&self, name: &str) -> Result<&VolumeRecord> {
        self.volumes
            .volumes
            .get(name)
            .ok_or_else(|| PoolError::NoSuchVolume(name.to_string()))
    }

    fn free_dev_id(&self) -> Result<DevId> {
        let mut used = self.volumes.dev_ids();
        used.extend(self.meta.device_ids()?.into_iter().map(|d| d.0));
        (1..=DevId::MAX.0)
            .find(|id| !used.contains(id))
            .map(DevId)
            .ok_or_else(|| PoolError::InvalidArgument("all 2^24 device ids are in use".into()))
    }

    fn check_min_free_space(&self) -> Result<()> {
        let total = self.meta.data_nr_blocks();
        let free = self.meta.data_nr_free()?;
        let min = self.volumes.min_free_space_percent;
        if total > 0 && (free as f64) * 100.0 < f64::from(min) * total as f64 {
            return Err(PoolError::BelowMinFreeSpace {
                free_percent: free as f64 * 100.0 / total as f64,
                min_percent: min,
            });
        }
        Ok(())
    }

    /// Runs one operation under the volumes.json protocol: pending record, metadata change with
    /// transaction id T+1 and commit, final record. On a metadata error before the commit the
    /// in-memory metadata is rolled back to the last commit and the pending record dropped.
    fn transact(
        &mut self,
        op: PendingOp,
        change: impl FnOnce(&mut Metadata) -> Result<()>,
    ) -> Result<Committed> {
        self.check_usable()?;
        if self.meta.has_uncommitted_changes() {
            // Make the data path's changes durable first, so a rollback below only ever
            // undoes this operation.
            self.commit_internal()?;
        }
        let next = self.meta.transaction_id() + 1;
        let mut pending = self.volumes.clone();
        pending.pending = Some(Pending {
            transaction_id: next,
            op: op.clone(),
        });
        self.store.write(&pending)?;
        if let Err(e) = change(&mut self.meta) {
            // Nothing of this operation reached the disk: forget it in memory and drop the
            // pending record (if that write fails too, the record says T+1 while the metadata
            // says T, which the next open rolls back).
            self.meta.rollback()?;
            self.store.write(&self.volumes)?;
            return Err(e);
        }
        self.meta.set_transaction_id(next);
        // A failed commit may or may not have written the superblock: leave the pending record
        // for the next open to resolve from the metadata, and refuse further changes.
        let committed = Committed {
            freed: self.commit_raw()?,
        };
        self.volumes.apply(&op);
        self.volumes.transaction_id = next;
        self.volumes.pending = None;
        self.store.write(&self.volumes)?;
        Ok(committed)
    }

    /// A commit made inside another operation: its freed blocks wait for the caller's next
    /// [`Pool::commit`] (or [`Pool::take_unreported_freed`]).
    fn commit_internal(&mut self) -> Result<()> {
        let freed = self.commit_raw()?;
        self.unreported_freed.lock().extend(freed);
        Ok(())
    }

    fn check_usable(&self) -> Result<()> {
        match &self.failed {
            Some(why) => Err(PoolError::ReadOnlyPool(format!(
                "an earlier failure ({why}) left the pool to be reopened"
            ))),
            None => Ok(()),
        }
    }

    fn quarantine(&self, blocks: &[DataBlock]) {
        let mut a = self.alloc.lock();
        a.quarantined.extend(blocks.iter().map(|b| b.0));
    }

    /// Creates a thin volume of `size` bytes (nothing allocated until written).
    pub fn create_volume(&mut self, name: &str, size: u64) -> Result<VolumeInfo> {
        check_name(name)?;
        if size == 0 {
            return Err(PoolError::InvalidArgument(format!(
                "volume `{name}` needs a size above 0"
            )));
        }
        if self.volumes.volumes.contains_key(name) {
            return Err(PoolError::VolumeExists(name.to_string()));
        }
        self.check_min_free_space()?;
        let dev = self.free_dev_id()?;
        let rec = VolumeRecord {
            name: name.to_string(),
            dev_id: dev.0,
            size,
            read_only: false,
            origin: None,
            created: volumes::rfc3339_now(),
        };
        let c = self.transact(PendingOp::Create(rec), |m| m.create_thin(dev))?;
        self.unreported_freed.lock().extend(c.freed);
        self.volume(name)
    }

    /// Takes a snapshot `name` of volume `origin`: O(1), it shares the origin's mapping tree.
    /// Bumps the pool time, as dm-thin does. Snapshots of snapshots work to any depth.
    pub fn snapshot(&mut self, origin: &str, name: &str, read_only: bool) -> Result<VolumeInfo> {
        check_name(name)?;
        let orig = self.record(origin)?.clone();
        if self.volumes.volumes.contains_key(name) {
            return Err(PoolError::VolumeExists(name.to_string()));
        }
        self.check_min_free_space()?;
        let dev = self.free_dev_id()?;
        let rec = VolumeRecord {
            name: name.to_string(),
            dev_id: dev.0,
            size: orig.size,
            read_only,
            origin: Some(origin.to_string()),
            created: volumes::rfc3339_now(),
        };
        let c = self.transact(PendingOp::Create(rec), |m| {
            m.create_snapshot(dev, DevId(orig.dev_id))
        })?;
        self.unreported_freed.lock().extend(c.freed);
        self.volume(name)
    }

    /// Deletes a volume. Data blocks whose count drops to 0 are freed; they are returned (with
    /// any left over from earlier internal commits) for the caller to punch and then
    /// [`Pool::release_freed`]. Snapshots and origins sharing them are untouched.
    pub fn delete_volume(&mut self, name: &str) -> Result<Committed> {
        let rec = self.record(name)?.clone();
        let dev = DevId(rec.dev_id);
        let exists = self.meta.details(dev)?.is_some();
        let op = PendingOp::Delete {
            name: name.to_string(),
            dev_id: rec.dev_id,
        };
        let mut c = self.transact(op, |m| if exists { m.delete_device(dev) } else { Ok(()) })?;
        c.freed.append(&mut self.unreported_freed.lock());
        Ok(c)
    }

    /// Renames a volume (volumes.json only; one atomic write). Snapshots naming it as their
    /// origin follow the new name.
    pub fn rename(&mut self, old: &str, new: &str) -> Result<()> {
        self.check_usable()?;
        check_name(new)?;
        let mut rec = self.record(old)?.clone();
        if self.volumes.volumes.contains_key(new) {
            return Err(PoolError::VolumeExists(new.to_string()));
        }
        let mut next = self.volumes.clone();
        next.volumes.remove(old);
        rec.name = new.to_string();
        next.volumes.insert(new.to_string(), rec);
        for v in next.volumes.values_mut() {
            if v.origin.as_deref() == Some(old) {
                v.origin = Some(new.to_string());
            }
        }
        self.store.write(&next)?;
        self.volumes = next;
        Ok(())
    }

    /// Names a device that exists in the metadata but has no name (a pool made by
    /// thin_restore, LVM or Docker). volumes.json only; one atomic write.
    pub fn adopt(&mut self, dev: DevId, name: &str, size: u64) -> Result<VolumeInfo> {
        self.check_usable()?;
        check_name(name)?;
        if size == 0 {
            return Err(PoolError::InvalidArgument(format!(
                "volume `{name}` needs a size above 0"
            )));
        }
        if self.meta.details(dev)?.is_none() {
            return Err(PoolError::NoSuchDevice(dev.0));
        }
        if let Some(rec) = self.volumes.by_dev_id(dev.0) {
            return Err(PoolError::DeviceNamed {
                dev_id: dev.0,
                name: rec.name.clone(),
            });
        }
        if self.volumes.volumes.contains_key(name) {
            return Err(PoolError::VolumeExists(name.to_string()));
        }
        let mut next = self.volumes.clone();
        next.volumes.insert(
            name.to_string(),
            VolumeRecord {
                name: name.to_string(),
                dev_id: dev.0,
                size,
                read_only: false,
                origin: None,
                created: volumes::rfc3339_now(),
            },
        );
        self.store.write(&next)?;
        self.volumes = next;
        self.volume(name)
    }

    fn info_for(&self, dev: DevId, rec: Option<&VolumeRecord>) -> Result<VolumeInfo> {
        let details = self.meta.details(dev)?;
        let d = details.unwrap_or_default();
        Ok(VolumeInfo {
            name: rec.map(|r| r.name.clone()),
            dev_id: dev,
            size: rec.map(|r| r.size),
            read_only: rec.is_some_and(|r| r.read_only),
            origin: rec.and_then(|r| r.origin.clone()),
            created: rec.map(|r| r.created.clone()).filter(|c| !c.is_empty()),
            mapped_blocks: d.mapped_blocks,
            mapped_bytes: d.mapped_blocks * self.data_block_size(),
            creation_time: d.creation_time,
            snapshotted_time: d.snapshotted_time,
            missing: details.is_none(),
        })
    }

    /// One named volume.
    pub fn volume(&self, name: &str) -> Result<VolumeInfo> {
        let rec = self.record(name)?;
        self.info_for(DevId(rec.dev_id), Some(rec))
    }

    /// Every device: named volumes (by name), then devices without a name (by dev id).
    pub fn list(&self) -> Result<Vec<VolumeInfo>> {
        let mut out = Vec::new();
        for rec in self.volumes.volumes.values() {
            out.push(self.info_for(DevId(rec.dev_id), Some(rec))?);
        }
        for dev in self.meta.device_ids()? {
            if self.volumes.by_dev_id(dev.0).is_none() {
                out.push(self.info_for(dev, None)?);
            }
        }
        Ok(out)
    }

    /// Exclusive and shared blocks of a device (walks its mapping tree, as `thin_ls` does).
    pub fn usage(&self, dev: DevId) -> Result<Usage> {
        let mut u = Usage::default();
        self.meta.walk_mappings(dev, &mut |_, bt| {
            u.mapped_blocks += 1;
            if self.meta.data_count(bt.block)? > 1 {
                u.shared_blocks += 1;
            } else {
                u.exclusive_blocks += 1;
            }
            Ok(())
        })?;
        Ok(u)
    }

    /// Every mapping of a device in virtual block order (dump, tests).
    pub fn mappings(&self, dev: DevId) -> Result<Vec<(VirtBlock, details::BlockTime)>> {
        let mut out = Vec::new();
        self.meta.walk_mappings(dev, &mut |vb, bt| {
            out.push((vb, bt));
            Ok(())
        })?;
        Ok(out)
    }

    /// Pool-wide usage.
    pub fn status(&self) -> Result<PoolStatus> {
        let data_total = self.meta.data_nr_blocks();
        let data_free = self.meta.data_nr_free()?;
        let meta_total = self.meta.metadata_nr_blocks();
        let meta_free = self.meta.metadata_nr_free()?;
        Ok(PoolStatus {
            block_size: self.data_block_size(),
            data_total_blocks: data_total,
            data_used_blocks: data_total - data_free,
            data_free_blocks: data_free,
            metadata_total_blocks: meta_total,
            metadata_used_blocks: meta_total - meta_free,
            metadata_free_blocks: meta_free,
            transaction_id: self.meta.transaction_id(),
            time: self.meta.time(),
            device_count: self.meta.device_ids()?.len() as u64,
            volume_count: self.volumes.volumes.len() as u64,
            min_free_space_percent: self.volumes.min_free_space_percent,
            metadata_snapshot: self.meta.held_root(),
            needs_check: self.meta.needs_check(),
        })
    }

    /// Grows the data space to `new_size` bytes (the data file is extended sparsely; a block
    /// device must already be that large). Committed before it returns.
    pub fn grow_data(&mut self, new_size: u64) -> Result<()> {
        self.check_usable()?;
        let bs = self.data_block_size();
        let blocks = new_size / bs;
        let have = self.meta.data_nr_blocks();
        if blocks < have {
            return Err(PoolError::InvalidArgument(format!(
                "cannot shrink the data space from {} to {}",
                size::format_size(have * bs),
                size::format_size(blocks * bs)
            )));
        }
        if blocks > details::MAX_DATA_BLOCK {
            return Err(PoolError::InvalidArgument(format!(
                "data size {} needs more than dm-thin's 2^40 blocks",
                size::format_size(new_size)
            )));
        }
        if blocks == have {
            return Ok(());
        }
        files::ensure_size(&self.paths.data(), blocks * bs)?;
        self.meta.grow_data(blocks)?;
        self.commit_internal()
    }

    /// Grows the metadata to `new_size` bytes (at most dm's ~15.9 GiB). Committed before it
    /// returns.
    pub fn grow_metadata(&mut self, new_size: u64) -> Result<()> {
        self.check_usable()?;
        size::check_metadata_size(new_size).map_err(PoolError::InvalidArgument)?;
        let blocks = new_size / superblock::METADATA_BLOCK_SIZE as u64;
        let have = self.meta.metadata_nr_blocks();
        if blocks < have {
            return Err(PoolError::InvalidArgument(format!(
                "cannot shrink the metadata from {} to {}",
                size::format_size(have * 4096),
                size::format_size(new_size)
            )));
        }
        if blocks == have {
            return Ok(());
        }
        self.meta.grow_metadata(blocks)?;
        self.commit_internal()
    }

    /// Takes a metadata snapshot (dm's `reserve_metadata_snap`) so `thin_dump -m` can read a
    /// consistent copy of a live pool. Committed before it returns.
    pub fn reserve_metadata_snap(&mut self) -> Result<MetadataSnapshot> {
        self.check_usable()?;
        if self.meta.has_uncommitted_changes() {
            self.commit_internal()?;
        }
        let s = self.meta.reserve_metadata_snap()?;
        self.commit_internal()?;
        Ok(s)
    }

    /// Releases the metadata snapshot. Committed before it returns.
    pub fn release_metadata_snap(&mut self) -> Result<()> {
        self.check_usable()?;
        self.meta.release_metadata_snap()?;
        self.commit_internal()
    }

    // ----- data path -----

    /// Where `vblock` of `dev` lives, and exactly whether it is shared (see [`Mapping`]).
    pub fn lookup(&self, dev: DevId, vblock: VirtBlock) -> Result<Option<Mapping>> {
        self.meta.lookup(dev, vblock)
    }

    /// The first mapping of `dev` at or after `vblock` (one descent of its tree): its virtual
    /// and its data block.
    pub fn next_mapping(
        &self,
        dev: DevId,
        vblock: VirtBlock,
    ) -> Result<Option<(VirtBlock, DataBlock)>> {
        self.meta.next_mapping(dev, vblock)
    }

    /// Reserves a free data block (in memory only). Fails with [`PoolError::NoDataSpace`]
    /// (ENOSPC) when none is left; nothing else changes.
    pub fn reserve_data_block(&self) -> Result<Reservation> {
        let mut a = self.alloc.lock();
        let total = self.meta.data_nr_blocks();
        let b = self.find_usable(&a, a.cursor.min(total), total)?;
        a.cursor = b.0 + 1;
        Ok(a.reserve(b.0))
    }

    /// Reserves up to `max` data blocks at once (at least one): the first usable block at or
    /// after `near` (else after the pool's cursor), then the blocks right after it for as long
    /// as they are usable, so a large write gets consecutive data blocks and each volume can
    /// keep its own locality hint. [`PoolError::NoDataSpace`] when none is left.
    pub fn reserve_data_blocks(
        &self,
        near: Option<DataBlock>,
        max: usize,
    ) -> Result<Vec<Reservation>> {
        let mut a = self.alloc.lock();
        let total = self.meta.data_nr_blocks();
        let start = near.map_or(a.cursor, |b| b.0).min(total);
        let first = self.find_usable(&a, start, total)?;
        let mut out = vec![a.reserve(first.0)];
        let mut next = first.0 + 1;
        // Free in both space maps, found in one pass over their bitmaps.
        let free = self
            .meta
            .data_free_run(DataBlock(next), (max.max(1) - 1) as u64)?;
        let end = next + free;
        while next < end {
            if a.reserved.contains(&next) || a.quarantined.contains(&next) {
                break;
            }
            out.push(a.reserve(next));
            next += 1;
        }
        // The pool's cursor stays past every run handed out, hinted or not: the next search
        // from it does not fill the gaps a volume leaves on purpose (the data layer places a
        // volume's blocks by virtual address, see `volume::place`).
        if near.is_none() || next > a.cursor {
            a.cursor = next;
        }
        Ok(out)
    }

    /// Reserves exactly `block` if it is usable (inside the pool, free in both space maps,
    /// neither reserved nor waiting for its hole punch); `None` if it is not.
    ///
    /// A block given back zeroed ([`Pool::release_zeroed`]) and not reserved since is usable
    /// without asking the space maps: it was free in both when it was reserved, and a block
    /// is only ever allocated through a reservation, which would have cleared its mark. (The
    /// two space map lookups took most of the time a closed placement group's write spent
    /// under the pool's lock, docs/volume.md.)
    pub fn reserve_data_block_at(&self, block: DataBlock) -> Result<Option<Reservation>> {
        let mut a = self.alloc.lock();
        if block.0 >= self.meta.data_nr_blocks()
            || a.reserved.contains(&block.0)
            || a.quarantined.contains(&block.0)
        {
            return Ok(None);
        }
        if !a.is_zeroed(block.0) && !self.meta.data_block_is_free(block)? {
            return Ok(None);
        }
        Ok(Some(a.reserve(block.0)))
    }

    /// The first block at or after `from` (wrapping once) free in both space maps and neither
    /// reserved nor waiting for its hole punch.
    fn find_usable(&self, a: &Allocator, from: u64, total: u64) -> Result<DataBlock> {
        let mut from = from;
        let mut wrapped = from == 0;
        loop {
            if from >= total {
                if wrapped {
                    return Err(PoolError::NoDataSpace { total });
                }
                wrapped = true;
                from = 0;
                continue;
            }
            match self.meta.find_free_data_block(from)? {
                Some(b) if a.reserved.contains(&b.0) || a.quarantined.contains(&b.0) => {
                    from = b.0 + 1;
                }
                Some(b) => return Ok(b),
                None if !wrapped => {
                    wrapped = true;
                    from = 0;
                }
                None => return Err(PoolError::NoDataSpace { total }),
            }
        }
    }

    /// Gives back an unused reservation.
    pub fn release_reservation(&self, r: Reservation) {
        self.alloc.lock().release(r);
    }

    /// Gives back an unused reservation whose block the caller knows reads as zeros (a hole
    /// when it was reserved, and not written since). The block's next reservation says so
    /// ([`Reservation::known_zeroed`]), which spares the data layer a hole check (docs/volume.md,
    /// "Known holes for closed groups").
    pub fn release_zeroed(&self, r: Reservation) {
        self.alloc.lock().release_zeroed(r);
    }

    /// A handle on this pool's reservations that works without the pool itself.
    pub fn reserver(&self) -> Reserver {
        Reserver(self.alloc.clone())
    }

    /// Maps `vblock` of `dev` to the reserved block (count 0 → 1), consuming the reservation.
    /// Returns the block it replaced, if any; that block's count is decremented (freed when
    /// it drops to 0, i.e. this was a copy-on-write of a block nobody else holds any more).
    pub fn insert_mapping(
        &mut self,
        dev: DevId,
        vblock: VirtBlock,
        r: Reservation,
    ) -> Result<Option<DataBlock>> {
        let block = r.block;
        if let Err(e) = self.check_usable() {
            self.release_reservation(r);
            return Err(e);
        }
        let result = self.meta.insert_mapping(dev, vblock, block);
        self.alloc.lock().reserved.remove(&block.0);
        result
    }

    /// Allocates a data block and maps `vblock` to it (reserve + insert). Write the data
    /// before the next commit.
    pub fn provision(&mut self, dev: DevId, vblock: VirtBlock) -> Result<DataBlock> {
        if self.meta.details(dev)?.is_none() {
            return Err(PoolError::NoSuchDevice(dev.0));
        }
        let r = self.reserve_data_block()?;
        let b = r.block;
        match self.insert_mapping(dev, vblock, r) {
            Ok(_) => Ok(b),
            Err(e) => Err(e),
        }
    }

    /// Remaps a shared `vblock` to a fresh block: returns `(old, new)`; copy `old` into `new`
    /// before the next commit.
    pub fn break_sharing(
        &mut self,
        dev: DevId,
        vblock: VirtBlock,
    ) -> Result<(DataBlock, DataBlock)> {
        let old = self
            .lookup(dev, vblock)?
            .ok_or_else(|| PoolError::InvalidArgument(format!("{vblock} of {dev} is not mapped")))?
            .block;
        let r = self.reserve_data_block()?;
        let new = r.block;
        self.insert_mapping(dev, vblock, r)?;
        Ok((old, new))
    }

    /// Unmaps `[begin, end)` of `dev`. Returns how many blocks lost their mapping and which
    /// data blocks were freed (count reached 0).
    pub fn discard(&mut self, dev: DevId, begin: VirtBlock, end: VirtBlock) -> Result<Discarded> {
        self.check_usable()?;
        self.meta.discard(dev, begin, end)
    }

    /// Commits the transaction: dm-thin's sequence, superblock written last. Returns the data
    /// blocks freed in it; they stay out of reach of [`Pool::reserve_data_block`] until
    /// [`Pool::release_freed`] says their holes are punched.
    ///
    /// The returned list also holds blocks freed by commits that other operations made
    /// (create, snapshot, grow, metadata snapshots), so the caller sees every freed block once.
    /// The pool never commits on its own: only this call and the operations above do.
    pub fn commit(&mut self) -> Result<Committed> {
        let mut freed = self.commit_raw()?;
        freed.append(&mut self.unreported_freed.lock());
        Ok(Committed { freed })
    }

    /// Blocks freed by commits made inside other operations and not yet returned (the next
    /// [`Pool::commit`] would return them).
    pub fn take_unreported_freed(&self) -> Vec<DataBlock> {
        std::mem::take(&mut *self.unreported_freed.lock())
    }

    fn commit_raw(&mut self) -> Result<Vec<DataBlock>> {
        self.check_usable()?;
        match self.meta.commit() {
            Ok(freed) => {
                self.quarantine(&freed);
                Ok(freed)
            }
            Err(e) => {
                self.failed = Some(e.to_string());
                Err(e)
            }
        }
    }

    /// For tools that own the pool offline (the CLI): punches holes in `blocks` of the data
    /// file (a regular file; a block device is left alone) and releases them, as the data
    /// layer does after a commit.
    pub fn punch_freed(&self, blocks: &[DataBlock]) -> Result<()> {
        if !blocks.is_empty() && !files::is_block_device(&self.paths.data()) {
            let f = files::open_rw(&self.paths.data())?;
            files::punch_blocks(&f, blocks, self.data_block_size()).map_err(|e| {
                PoolError::io(
                    format!("cannot punch holes in {}", self.paths.data().display()),
                    e,
                )
            })?;
        }
        self.release_freed(blocks);
        Ok(())
    }

    /// The data layer punched holes in these blocks (returned by a commit): they may be
    /// reserved again.
    pub fn release_freed(&self, blocks: &[DataBlock]) {
        let mut a = self.alloc.lock();
        for b in blocks {
            a.quarantined.remove(&b.0);
        }
    }

    /// Counts of the data space map (tests, check).
    pub fn data_ref_count(&self, b: DataBlock) -> Result<u32> {
        self.meta.data_count(b)
    }
}

fn has_superblock(path: &Path) -> bool {
    use std::io::Read;
    let mut buf = [0u8; 64];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut buf))
        .map(|()| buf[32..40] == superblock::SUPERBLOCK_MAGIC.to_le_bytes())
        .unwrap_or(false)
}
