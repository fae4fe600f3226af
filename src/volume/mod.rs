//! The volume layer: byte-range read / write / flush / discard / write-zeroes on the thin
//! volumes of a [`Pool`], over the data file ([`DataFile`]).
//!
//! A [`VolumePool`] owns the pool (in a `parking_lot::RwLock`), the data file, the mapping
//! cache, the per-block in-flight table and the group committer. A [`Volume`] is one thin
//! device of it and implements [`BlockDevice`], the API both servers use. docs/volume.md
//! describes the data path and argues each invariant of DESIGN.md; in short:
//!
//! - **Overwrite of an owned block** (cached as owned alone): one write to the data file, no
//!   lock (the cache's lookups take none), no metadata change. The pieces of a large request
//!   that land on consecutive data blocks go out as one vectored syscall.
//! - **First write to an unmapped block**: reserve a data block, make sure it reads as zeros (a
//!   `SEEK_DATA`, normally), write only the bytes given, then insert the mapping under the
//!   write lock (one acquisition for all the inserts queued at that moment: `combine.rs`;
//!   into a group opened on an empty stretch, the block and its slot are known without
//!   the pool lock: `place.rs`). **Write to a shared block**: reserve, copy the old block
//!   (skipped when the write covers it whole), apply the write, insert. The mapping is
//!   inserted only after the data is written, and a commit syncs the data before the
//!   metadata, so a durable mapping never points at data that is not (invariant 3). The
//!   blocks of one request are reserved together and come out consecutive, so its pieces
//!   still coalesce.
//! - Writes that must provision or copy hold the in-flight slots of their blocks; writes to
//!   different blocks never wait for each other (invariant 9).
//! - **Flush / FUA**: group commit. fdatasync(data) without any lock (up to three passes while
//!   mappings keep being inserted), then under the write lock one more fdatasync only if a
//!   mapping was inserted after the last pass began, the pool's commit, and
//!   then — after every I/O that might still use them has finished — the freed blocks are
//!   punched and given back to the allocator (invariant 2).
//! - **Snapshots, creates, deletes, growth** go through [`VolumePool`]'s methods (or
//!   [`VolumePool::exclusive`]), which drain the origin's writes first (a per-volume gate), so
//!   every write acknowledged before a snapshot is in it and no later write lands in a block
//!   that just became shared.
//! - **Writing in place** is trusted only when it is safe across a crash, not just in the open
//!   transaction (`sharing.rs`).

mod cache;
mod combine;
mod grace;
mod inflight;
mod pieces;
mod place;
mod sharing;
mod summary;

use std::collections::{HashMap, VecDeque};
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use futures_util::future::try_join_all;
use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use crate::data::{AlignedBuf, CacheMode, DataFile};
use crate::device::{BlockDevice, DevError, DevResult, DeviceInfo, Extent, check_range, iov_len};
use crate::pool::{Pool, PoolError, Reservation, Reserver, VolumeInfo};
use crate::units::{DataBlock, DevId, VirtBlock};

use cache::{Cached, MappingCache};
use grace::Grace;
use inflight::InFlight;
use pieces::{Piece, Run, coalesce, nonzero_ranges, pieces, single_piece, split, split_mut};
use sharing::LessShared;

/// Lock-free data syncs a commit makes at most before the one it makes under the pool's write
/// lock (see `Shared::sync_data_unlocked`).
const LOCK_FREE_SYNC_PASSES: usize = 3;

/// How long a runtime worker waits for the pool's lock held by a short holder before handing
/// the operation to the blocking pool (`Shared::read_pool`).
const QUICK_LOCK_WAIT: Duration = Duration::from_micros(50);

/// Default bound of the mapping cache, in entries (at most about 59 bytes each, `cache.rs`):
/// 256 Ki entries cover 16 GiB of 64 KiB blocks in about 15 MiB.
pub const DEFAULT_CACHE_ENTRIES: usize = 256 * 1024;

/// The smallest mapping cache `uthin serve` accepts: one chunk per shard (`cache.rs` keeps
/// that many whatever the bound).
pub const MIN_CACHE_ENTRIES: usize = 1024;

/// The largest mapping cache `uthin serve` accepts: 64 Mi entries (a 4 TiB volume of 64 KiB
/// blocks, at most about 4.5 GiB of memory).
pub const MAX_CACHE_ENTRIES: usize = 64 << 20;

/// Most blocks one [`BlockDevice::block_status`] call looks at; the answer may be shorter
/// than asked, as the API allows.
const STATUS_MAX_BLOCKS: u64 = 16 * 1024;

/// Blocks a device reserves at a time for its allocation stash (4 MiB of 64 KiB blocks).
const STASH_BLOCKS: usize = 64;

/// A data block reserved ahead for one device.
struct Stashed {
    r: Reservation,
    /// Known to read as zeros (checked when stashed; nobody else can write a reserved block),
    /// so a partial write into it needs no `SEEK_DATA` and writes nothing but its bytes.
    hole: bool,
}

impl Stashed {
    /// Gives the unused block back to the pool, saying that it reads as zeros when that is
    /// known: a stashed block is reserved for its device alone, so a hole when stashed is a
    /// hole still. A later write that reserves it again (into a closed placement group,
    /// `place.rs`) then skips its `SEEK_DATA`.
    fn give_back(self, pool: &Pool) {
        if self.hole {
            pool.release_zeroed(self.r);
        } else {
            pool.release_reservation(self.r);
        }
    }
}

/// Per-device state shared by every [`Volume`] handle of that device.
struct DevState {
    /// Blocks reserved ahead in runs of consecutive blocks from the pool's cursor, handed out
    /// in order when a write's blocks cannot be placed by virtual address (`place.rs`).
    stash: Mutex<VecDeque<Stashed>>,
    /// Runs placed by virtual address whose other slots are still reserved (`place.rs`).
    groups: Mutex<place::OpenGroups>,
    /// Writes (and discards) hold it shared for their whole duration; a snapshot or delete of
    /// the device holds it exclusively, which drains in-flight writes and holds new ones.
    gate: tokio::sync::RwLock<()>,
    /// Bumped by each snapshot of the device: cache entries of older epochs are no longer
    /// trusted to be owned alone.
    snap_epoch: AtomicU64,
    /// Set when the device is deleted; every later request fails with `Gone`.
    gone: AtomicBool,
    /// Bumped (under the pool's write lock) by every unmap of the device's blocks: a write
    /// that looked a block up under an older value must look again before mapping it.
    discards: AtomicU64,
}

/// What the group committer has done so far: how many commits, and where their time went.
/// The data sync usually dominates: it writes back every dirty page of the data file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CommitStats {
    /// Commits that changed metadata (flushes with nothing to commit only sync the data).
    pub commits: u64,
    /// Flushes (and timer ticks) that ran the committer, commits included.
    pub flushes: u64,
    /// Time in the first, lock-free fdatasync of the data file.
    pub data_sync: Duration,
    /// Time holding the pool's write lock: the second data sync when needed and the pool's
    /// commit (metadata writes, two syncs, the superblock).
    pub metadata: Duration,
    /// Time punching freed blocks (after waiting for I/O that might still use them).
    pub punch: Duration,
    /// The longest single flush.
    pub longest: Duration,
}

/// What [`VolumePool::exclusive`] does to a device around a pool operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Nothing to drain (create, grow, rename, status).
    None,
    /// The device is the origin of a snapshot: drain its writes, then distrust its cached
    /// exclusivity.
    Snapshot(DevId),
    /// The device is being deleted: drain its writes; once deleted, fail every later request.
    Delete(DevId),
}

struct Shared {
    pool: RwLock<Pool>,
    /// The pool's reservations, without its lock (`place.rs`, `Shared::place_zeroed`).
    reserver: Reserver,
    data: DataFile,
    block_size: u64,
    cache: MappingCache,
    inflight: InFlight,
    grace: Grace,
    devs: Mutex<HashMap<DevId, Arc<DevState>>>,
    /// Blocks that lost a reference in the open transaction: a lookup's "owned alone" is not
    /// trusted for them (`sharing.rs`). Changed under the pool's write lock, read under its
    /// read lock.
    less_shared: Mutex<LessShared>,
    /// How many commits or pool operations hold or wait for the pool's write lock for their
    /// I/O: while any do, tasks go to the blocking pool at once instead of waiting briefly on
    /// a runtime worker (`read_pool`, `write_pool`).
    long_hold: AtomicUsize,
    /// Open groups of all devices (`place.rs`), bounded by `place::MAX_OPEN_GROUPS`.
    open_groups: AtomicUsize,
    /// Mapping inserts queued for one task to apply under one write lock (`combine.rs`).
    combiner: combine::Combiner,
    /// Mapping changes not yet committed.
    dirty: AtomicBool,
    /// Counts mapping insertions, so the committer knows whether data written for a mapping
    /// may have missed its first (lock-free) fdatasync.
    inserts: AtomicU64,
    /// Group commit: the committer's turn, the number of the last commit started, and of the
    /// last one finished.
    commit_turn: tokio::sync::Mutex<()>,
    commits_started: AtomicU64,
    commits_done: AtomicU64,
    /// Set when a sync or commit failed: durability is unknown, so writes and flushes fail
    /// until the pool is reopened.
    failed: Mutex<Option<String>>,
    stats: Mutex<CommitStats>,
}

/// The pool's write lock held by a long holder ([`Shared::write_long`]).
struct LongWrite<'a> {
    guard: RwLockWriteGuard<'a, Pool>,
    holders: &'a AtomicUsize,
}

impl std::ops::Deref for LongWrite<'_> {
    type Target = Pool;
    fn deref(&self) -> &Pool {
        &self.guard
    }
}

impl std::ops::DerefMut for LongWrite<'_> {
    fn deref_mut(&mut self) -> &mut Pool {
        &mut self.guard
    }
}

impl Drop for LongWrite<'_> {
    fn drop(&mut self) {
        // Counted down while the lock is still held: a quick user that sees 0 and waits
        // briefly finds the lock free in a moment (or gives up after the wait).
        self.holders.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The data path of one pool: pool + data file + caches + committer. Cheap to clone.
#[derive(Clone)]
pub struct VolumePool {
    shared: Arc<Shared>,
}

/// One thin volume (or snapshot) of a [`VolumePool`], served through [`BlockDevice`].
pub struct Volume {
    shared: Arc<Shared>,
    dev: DevId,
    size: AtomicU64,
    read_only: bool,
    state: Arc<DevState>,
}

fn io_err(e: std::io::Error) -> DevError {
    DevError::Io(e)
}

fn join_err(e: tokio::task::JoinError) -> DevError {
    DevError::Io(std::io::Error::other(format!(
        "metadata thread failed: {e}"
    )))
}

/// For control operations, which report [`PoolError`]s (with their errno) to the daemon.
fn to_pool_err(e: DevError) -> PoolError {
    match e {
        DevError::Io(source) => PoolError::io("volume layer", source),
        DevError::NoSpace(why) => {
            PoolError::io(why, std::io::Error::from_raw_os_error(libc::ENOSPC))
        }
        other => PoolError::ReadOnlyPool(other.to_string()),
    }
}

/// Reservations taken for one round of a write; any not consumed by an insert (error,
/// cancellation, retry) go back to the pool when this is dropped.
struct Reserved {
    shared: Arc<Shared>,
    list: Vec<Option<Reservation>>,
    /// Parallel to `list`: the block is known to be a hole.
    holes: Vec<bool>,
}

impl Reserved {
    /// Holds `blocks` (from `take_blocks` or the open groups): from here on they go back to
    /// the pool unless an insert consumes them.
    fn new(shared: Arc<Shared>, blocks: Vec<Stashed>) -> Reserved {
        let (list, holes) = blocks.into_iter().map(|s| (Some(s.r), s.hole)).unzip();
        Reserved {
            shared,
            list,
            holes,
        }
    }

    fn take(&mut self, k: usize) -> Option<Reservation> {
        self.list.get_mut(k).and_then(Option::take)
    }

    /// The `k`-th reserved block and whether it is known to be a hole.
    fn block(&self, k: usize) -> DevResult<(DataBlock, bool)> {
        match (self.list.get(k), self.holes.get(k)) {
            (Some(Some(r)), Some(&hole)) => Ok((r.block(), hole)),
            _ => Err(DevError::Io(std::io::Error::other(
                "reservation missing for a piece",
            ))),
        }
    }
}

impl Drop for Reserved {
    fn drop(&mut self) {
        if self.list.iter().all(Option::is_none) {
            return;
        }
        let pool = self.shared.pool.read();
        for r in self.list.drain(..).flatten() {
            pool.release_reservation(r);
        }
    }
}

/// A write round's plan: what to do with each piece, the blocks reserved for the fresh ones
/// and copies (indexed by the plans' `k`), and the device's discard count when it was made.
type RoundPlan = (Vec<Plan>, Reserved, u64);

/// What one round of a write does with one piece.
#[derive(Debug, Clone, Copy)]
enum Plan {
    /// The device owns the block alone, in the last commit too: write in place.
    InPlace(DataBlock),
    /// Unmapped: write into a fresh block (`k`-th reservation of the round).
    Fresh(usize),
    /// Shared (or not yet known to be owned in the last commit): copy into a fresh block.
    Copy { old: DataBlock, k: usize },
}

impl VolumePool {
    /// The data path over `pool` and `data` (the pool's data file, or in crash tests a
    /// [`DataModel`](crate::data::DataModel)), with a mapping cache of at most `cache_entries`.
    pub fn new(pool: Pool, data: DataFile, cache_entries: usize) -> VolumePool {
        let block_size = u64::from(data.block_size());
        VolumePool {
            shared: Arc::new(Shared {
                reserver: pool.reserver(),
                pool: RwLock::new(pool),
                data,
                block_size,
                cache: MappingCache::new(cache_entries),
                inflight: InFlight::new(),
                grace: Grace::new(),
                devs: Mutex::new(HashMap::new()),
                less_shared: Mutex::new(LessShared::default()),
                long_hold: AtomicUsize::new(0),
                open_groups: AtomicUsize::new(0),
                combiner: Default::default(),
                dirty: AtomicBool::new(false),
                inserts: AtomicU64::new(0),
                commit_turn: tokio::sync::Mutex::new(()),
                commits_started: AtomicU64::new(0),
                commits_done: AtomicU64::new(0),
                failed: Mutex::new(None),
                stats: Mutex::new(CommitStats::default()),
            }),
        }
    }

    /// The data path over `pool` and its own data file (`DIR/data`), all through the page
    /// cache.
    pub fn open(pool: Pool, cache_entries: usize) -> Result<VolumePool, PoolError> {
        Self::open_with(pool, cache_entries, CacheMode::Writeback)
    }

    /// [`open`](VolumePool::open) with a choice of how the data file uses the page cache.
    pub fn open_with(
        pool: Pool,
        cache_entries: usize,
        cache: CacheMode,
    ) -> Result<VolumePool, PoolError> {
        let path = pool.data_path();
        let bs = u32::try_from(pool.data_block_size()).map_err(|_| {
            PoolError::InvalidArgument(format!(
                "data block size {} does not fit the data engine",
                pool.data_block_size()
            ))
        })?;
        let data = DataFile::open_with(&path, bs, false, cache)
            .map_err(|e| PoolError::io(format!("cannot open {}", path.display()), e))?;
        Ok(VolumePool::new(pool, data, cache_entries))
    }

    /// A handle on the named volume. Every handle of one device shares its gate.
    pub fn volume(&self, name: &str) -> Result<Volume, PoolError> {
        let info = self.shared.pool.read().volume(name)?;
        self.volume_of(&info)
    }

    /// A handle on the device `info` describes (from [`Pool::volume`] or [`Pool::list`]).
    pub fn volume_of(&self, info: &VolumeInfo) -> Result<Volume, PoolError> {
        let size = info.size.ok_or_else(|| {
            PoolError::InvalidArgument(format!(
                "thin device {} has no name and so no size: name it with `uthin adopt` first",
                info.dev_id.0
            ))
        })?;
        Ok(Volume {
            shared: self.shared.clone(),
            dev: info.dev_id,
            size: AtomicU64::new(size),
            read_only: info.read_only,
            state: self.shared.dev_state(info.dev_id),
        })
    }

    /// The data file.
    pub fn data(&self) -> &DataFile {
        &self.shared.data
    }

    /// Read access to the pool (status, list, lookups in tests). It waits while a commit runs;
    /// do not hold it across I/O.
    pub fn pool(&self) -> RwLockReadGuard<'_, Pool> {
        self.shared.pool.read()
    }

    /// Makes every write completed before this call durable (group commit).
    pub async fn commit(&self) -> DevResult<()> {
        self.shared.commit().await
    }

    /// Creates a volume of `size` bytes (committed when this returns).
    pub async fn create_volume(&self, name: &str, size: u64) -> Result<VolumeInfo, PoolError> {
        let name = name.to_string();
        self.shared
            .exclusive(Drain::None, true, move |p| {
                Ok((p.create_volume(&name, size)?, Vec::new()))
            })
            .await
    }

    /// Snapshots `origin` as `name` (committed when this returns). Writes to the origin that
    /// were acknowledged before this call are in the snapshot; later ones are not.
    pub async fn snapshot(
        &self,
        origin: &str,
        name: &str,
        read_only: bool,
    ) -> Result<VolumeInfo, PoolError> {
        let dev = self.shared.pool.read().volume(origin)?.dev_id;
        let (origin, name) = (origin.to_string(), name.to_string());
        self.shared
            .exclusive(Drain::Snapshot(dev), true, move |p| {
                same_device(p, &origin, dev)?;
                Ok((p.snapshot(&origin, &name, read_only)?, Vec::new()))
            })
            .await
    }

    /// Deletes a volume (committed when this returns); later requests on its handles fail with
    /// [`DevError::Gone`]. Blocks only it held are punched.
    pub async fn delete_volume(&self, name: &str) -> Result<(), PoolError> {
        let dev = self.shared.pool.read().volume(name)?.dev_id;
        let name = name.to_string();
        self.shared
            .exclusive(Drain::Delete(dev), true, move |p| {
                same_device(p, &name, dev)?;
                Ok(((), p.delete_volume(&name)?.freed))
            })
            .await
    }

    /// Grows the data space to `size` bytes (committed when this returns); writes that failed
    /// with [`DevError::NoSpace`] succeed again afterwards.
    pub async fn grow_data(&self, size: u64) -> Result<(), PoolError> {
        // The data file first: the metadata must never count blocks the file does not have.
        self.shared
            .data
            .grow(size / self.shared.block_size)
            .map_err(|e| PoolError::io("cannot grow the data file", e))?;
        self.shared
            .exclusive(Drain::None, true, move |p| {
                Ok((p.grow_data(size)?, Vec::new()))
            })
            .await
    }

    /// Grows the metadata to `size` bytes (committed when this returns).
    pub async fn grow_metadata(&self, size: u64) -> Result<(), PoolError> {
        self.shared
            .exclusive(Drain::None, true, move |p| {
                Ok((p.grow_metadata(size)?, Vec::new()))
            })
            .await
    }

    /// Runs any other pool operation that needs the write lock (rename, adopt, metadata
    /// snapshots, ...): drains `drain`'s writes, syncs the data first (an operation that
    /// commits must not map unsynced data), runs `op`, then punches whatever commits made
    /// inside it freed. Use the methods above for create, snapshot, delete and growth.
    pub async fn exclusive<R, F>(&self, drain: Drain, op: F) -> Result<R, PoolError>
    where
        F: FnOnce(&mut Pool) -> Result<R, PoolError> + Send + 'static,
        R: Send + 'static,
    {
        self.shared
            .exclusive(drain, false, move |p| Ok((op(p)?, Vec::new())))
            .await
    }

    /// Commits dirty metadata every `period` (the "at least once a second" rule) until the
    /// pool is dropped. Errors are logged; the next flush reports them.
    pub fn spawn_periodic_commit(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Shared> = Arc::downgrade(&self.shared);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(shared) = weak.upgrade() else { break };
                if shared.dirty.load(Ordering::Acquire)
                    && let Err(e) = shared.commit().await
                {
                    tracing::error!("periodic commit failed: {e}");
                }
            }
        })
    }

    /// What the group committer has done so far.
    pub fn commit_stats(&self) -> CommitStats {
        *self.shared.stats.lock()
    }

    /// Number of entries in the mapping cache (memory figures).
    pub fn cached_mappings(&self) -> usize {
        self.shared.cache.len()
    }

    /// Gives the pool back (tests reopen pools); `None` while volumes or clones still exist.
    pub fn into_pool(self) -> Option<Pool> {
        Arc::into_inner(self.shared).map(|s| s.pool.into_inner())
    }
}

/// Refuses an operation on `name` if it no longer names the device that was drained.
fn same_device(p: &Pool, name: &str, dev: DevId) -> Result<(), PoolError> {
    let now = p.volume(name)?.dev_id;
    if now == dev {
        Ok(())
    } else {
        Err(PoolError::InvalidArgument(format!(
            "volume `{name}` changed from {dev} to {now} while waiting for its writes to drain"
        )))
    }
}

impl Shared {
    /// Reads the pieces of one request that are mapped: neighbours in the data file merged,
    /// the resulting runs issued together (with direct I/O each is a device round trip, and a
    /// request's pieces are rarely consecutive data blocks).
    async fn read_runs(&self, runs: Vec<Run<IoSliceMut<'_>>>) -> DevResult<()> {
        try_join_all(
            coalesce(runs, self.block_size)
                .into_iter()
                .map(|mut run| async move {
                    self.data.read(run.block, run.offset, &mut run.bufs).await
                }),
        )
        .await
        .map_err(io_err)?;
        Ok(())
    }

    /// Writes the pieces of one request, merged and issued like [`Shared::read_runs`].
    async fn write_runs(&self, runs: Vec<Run<IoSlice<'_>>>) -> DevResult<()> {
        let runs = coalesce(runs, self.block_size);
        try_join_all(
            runs.iter()
                .map(|run| self.data.write(run.block, run.offset, &run.bufs)),
        )
        .await
        .map_err(io_err)?;
        Ok(())
    }

    fn dev_state(&self, dev: DevId) -> Arc<DevState> {
        self.devs
            .lock()
            .entry(dev)
            .or_insert_with(|| {
                Arc::new(DevState {
                    stash: Mutex::new(VecDeque::new()),
                    groups: Mutex::new(place::OpenGroups::default()),
                    gate: tokio::sync::RwLock::new(()),
                    snap_epoch: AtomicU64::new(0),
                    gone: AtomicBool::new(false),
                    discards: AtomicU64::new(0),
                })
            })
            .clone()
    }

    fn check_failed(&self) -> DevResult<()> {
        match &*self.failed.lock() {
            Some(why) => Err(DevError::Io(std::io::Error::other(format!(
                "the pool failed a commit earlier and must be reopened: {why}"
            )))),
            None => Ok(()),
        }
    }

    fn fail(&self, e: &DevError) {
        let mut f = self.failed.lock();
        if f.is_none() {
            *f = Some(e.to_string());
        }
    }

    /// Runs `f` under the pool's read lock. The lock's other holders are short (a lookup,
    /// an insert: microseconds) or long (a commit or pool operation doing its I/O, counted
    /// in `long_hold`). Against a short holder the runtime worker waits briefly instead of
    /// paying the blocking pool's two thread switches (one interleaved A/B of fresh 4 KiB
    /// writes through the page cache: +6–10 %; a second could not tell them apart,
    /// docs/volume.md); against a long one, or when the brief wait runs out, `f` runs on the
    /// blocking pool so the workers keep serving requests that need no lock (cached reads
    /// and overwrites).
    /// `f` does all its own bookkeeping: it completes even if the caller is cancelled.
    async fn read_pool<R, F>(self: &Arc<Self>, f: F) -> DevResult<R>
    where
        F: FnOnce(&Shared, &Pool) -> DevResult<R> + Send + 'static,
        R: Send + 'static,
    {
        if let Some(p) = self.read_quickly() {
            return f(self, &p);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let p = me.pool.read();
            f(&me, &p)
        })
        .await
        .map_err(join_err)?
    }

    /// [`read_pool`](Shared::read_pool) with the write lock.
    async fn write_pool<R, F>(self: &Arc<Self>, f: F) -> DevResult<R>
    where
        F: FnOnce(&Shared, &mut Pool) -> DevResult<R> + Send + 'static,
        R: Send + 'static,
    {
        if let Some(mut p) = self.write_quickly() {
            return f(self, &mut p);
        }
        let me = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut p = me.pool.write();
            f(&me, &mut p)
        })
        .await
        .map_err(join_err)?
    }

    /// The pool's read lock now, or after a brief wait unless a long holder has it.
    fn read_quickly(&self) -> Option<RwLockReadGuard<'_, Pool>> {
        self.pool.try_read().or_else(|| {
            (self.long_hold.load(Ordering::Acquire) == 0)
                .then(|| self.pool.try_read_for(QUICK_LOCK_WAIT))
                .flatten()
        })
    }

    /// [`read_quickly`](Shared::read_quickly) with the write lock.
    fn write_quickly(&self) -> Option<RwLockWriteGuard<'_, Pool>> {
        self.pool.try_write().or_else(|| {
            (self.long_hold.load(Ordering::Acquire) == 0)
                .then(|| self.pool.try_write_for(QUICK_LOCK_WAIT))
                .flatten()
        })
    }

    /// The pool's write lock for a long holder (blocking; call on the blocking pool): counts
    /// itself in `long_hold` before waiting, so that quick lock users stop waiting on
    /// workers, and out when the guard drops.
    fn write_long(&self) -> LongWrite<'_> {
        self.long_hold.fetch_add(1, Ordering::AcqRel);
        LongWrite {
            guard: self.pool.write(),
            holders: &self.long_hold,
        }
    }

    /// A lookup under the caller's pool lock (read or write), as a cache entry: "owned alone"
    /// only when the pool says so *and* the block lost no reference in the open transaction.
    fn lookup_locked(
        &self,
        pool: &Pool,
        dev: DevId,
        state: &DevState,
        v: VirtBlock,
    ) -> DevResult<Cached> {
        let epoch = state.snap_epoch.load(Ordering::Acquire);
        Ok(match pool.lookup(dev, v)? {
            None => Cached::Unmapped,
            Some(m) => Cached::Mapped {
                block: m.block,
                exclusive: !m.shared && self.less_shared.lock().trusts(m.block),
                epoch,
            },
        })
    }

    /// Looks `vbs` of `dev` up in the pool (not the cache) and caches the answers.
    async fn lookup_many(
        self: &Arc<Self>,
        dev: DevId,
        state: &Arc<DevState>,
        vbs: Vec<VirtBlock>,
    ) -> DevResult<Vec<Cached>> {
        let state = state.clone();
        self.read_pool(move |sh, pool| {
            vbs.iter()
                .map(|&v| {
                    let c = sh.lookup_locked(pool, dev, &state, v)?;
                    // Filled under the read lock: no mapping change can slip in between.
                    sh.cache.put(dev, v, c);
                    Ok(c)
                })
                .collect()
        })
        .await
    }

    /// Where `v` of `dev` lives, from the cache or the pool. The caller holds an
    /// [`grace::IoGuard`] if it will do I/O on the block.
    async fn mapping(
        self: &Arc<Self>,
        dev: DevId,
        state: &Arc<DevState>,
        v: VirtBlock,
    ) -> DevResult<Cached> {
        if let Some(c) = self.cache.get(dev, v) {
            return Ok(c);
        }
        let mut found = self.lookup_many(dev, state, vec![v]).await?;
        found
            .pop()
            .ok_or_else(|| DevError::Io(std::io::Error::other("lookup returned nothing")))
    }

    /// Reserves `n` data blocks, consecutive from the first usable block at or after `near`
    /// (else the pool's cursor) where the free space allows; all or none.
    fn reserve_run(
        &self,
        pool: &Pool,
        near: Option<DataBlock>,
        n: usize,
    ) -> DevResult<Vec<Reservation>> {
        let mut out: Vec<Reservation> = Vec::with_capacity(n);
        let mut near = near;
        while out.len() < n {
            match pool.reserve_data_blocks(near, n - out.len()) {
                Ok(run) => {
                    near = run.last().map(|r| DataBlock(r.block().0 + 1));
                    out.extend(run);
                }
                Err(e) => {
                    for r in out {
                        pool.release_reservation(r);
                    }
                    return Err(e.into());
                }
            }
        }
        Ok(out)
    }

    /// Marks which of `run` are holes: one `SEEK_DATA` per stretch of consecutive blocks,
    /// plus one after each block that holds data (a punch lost to a crash).
    fn stash_run(&self, run: Vec<Reservation>) -> DevResult<Vec<Stashed>> {
        let mut out: Vec<Stashed> = Vec::with_capacity(run.len());
        let mut known_holes = 0u64;
        let mut prev: Option<DataBlock> = None;
        for r in run {
            let b = r.block();
            let follows = prev.is_some_and(|p| p.0 + 1 == b.0);
            if follows && known_holes > 1 {
                known_holes -= 1;
            } else {
                // How far the holes reach from here (bounded by the stash size).
                match self.data.holes_from(b, STASH_BLOCKS as u64) {
                    Ok(n) => known_holes = n,
                    Err(e) => {
                        // Not knowing only costs a SEEK_DATA later (make_zero).
                        tracing::warn!("cannot look for holes at {b}: {e}");
                        known_holes = 0;
                    }
                }
            }
            out.push(Stashed {
                r,
                hole: known_holes > 0,
            });
            prev = Some(b);
        }
        Ok(out)
    }

    /// Takes `n` blocks for `state`'s device from its allocation stash, consecutive when
    /// possible: when the stash's first `n` are not consecutive, a fresh run is reserved and
    /// put first (what was left serves later single-block writes).
    fn take_stashed(&self, pool: &Pool, state: &DevState, n: usize) -> DevResult<Vec<Stashed>> {
        let mut stash = state.stash.lock();
        let consecutive = stash.len() >= n
            && stash
                .iter()
                .take(n)
                .zip(stash.iter().skip(1))
                .all(|(a, b)| a.r.block().0 + 1 == b.r.block().0);
        if !consecutive {
            // From the pool's cursor, past every run handed out: not into the gaps of
            // groups placed by virtual address.
            let run = self.stash_run(self.reserve_run(pool, None, n.max(STASH_BLOCKS))?)?;
            for s in run.into_iter().rev() {
                stash.push_front(s);
            }
        }
        Ok(stash.drain(..n).collect())
    }

    /// Blocks for the fresh mappings of `vbs` (ascending virtual blocks of `dev`): placed by
    /// virtual address (`place.rs`) when their slots are free, else from
    /// [`take_stashed`](Shared::take_stashed); when the pool is out of space, the stashes of
    /// all devices go back to it first (they may hold the last free blocks), then exactly as
    /// many blocks are reserved, or the write fails with ENOSPC having changed nothing.
    fn take_blocks(
        &self,
        pool: &Pool,
        dev: DevId,
        state: &DevState,
        vbs: &[VirtBlock],
    ) -> DevResult<Vec<Stashed>> {
        if let Some(placed) = self.place(pool, dev, state, vbs)? {
            return Ok(placed);
        }
        let n = vbs.len();
        match self.take_stashed(pool, state, n) {
            Err(DevError::NoSpace(_)) => {
                let states: Vec<Arc<DevState>> = self.devs.lock().values().cloned().collect();
                for st in states {
                    self.give_back_reserved(pool, &st);
                }
                self.stash_run(self.reserve_run(pool, None, n)?)
            }
            r => r,
        }
    }

    /// Gives every block `state`'s device holds in reserve back to the pool: its stash and
    /// the slots of its open groups.
    fn give_back_reserved(&self, pool: &Pool, state: &DevState) {
        for s in state.stash.lock().drain(..) {
            s.give_back(pool);
        }
        self.close_groups(pool, state);
    }

    async fn commit(self: &Arc<Self>) -> DevResult<()> {
        self.check_failed()?;
        // Any commit that starts after this point covers every write completed before it.
        let need = self.commits_started.load(Ordering::SeqCst) + 1;
        let _turn = self.commit_turn.lock().await;
        if self.commits_done.load(Ordering::SeqCst) >= need {
            return Ok(());
        }
        let mine = self.commits_started.fetch_add(1, Ordering::SeqCst) + 1;
        let r = self.commit_now().await;
        if let Err(e) = &r {
            self.fail(e);
        } else {
            self.commits_done.store(mine, Ordering::SeqCst);
        }
        r
    }

    /// Syncs the data file with no lock held, as far as that can go; returns the insert count
    /// the last sync covers. A mapping inserted during a sync may have written its data after
    /// the sync started, so if the count has moved by the time the caller holds the pool's
    /// write lock, it syncs once more there — where that sync stalls every allocating write.
    /// Under a steady write load inserts never pause, so up to [`LOCK_FREE_SYNC_PASSES`]
    /// passes shrink what is left for it (each syncs only what was written during the one
    /// before). The count is always read before the sync that covers it.
    async fn sync_data_unlocked(&self) -> std::io::Result<u64> {
        let mut covered = self.inserts.load(Ordering::SeqCst);
        self.data.sync().await?;
        for _ in 1..LOCK_FREE_SYNC_PASSES {
            let now = self.inserts.load(Ordering::SeqCst);
            if now == covered {
                break;
            }
            covered = now;
            self.data.sync().await?;
        }
        Ok(covered)
    }

    /// The second half of [`sync_data_unlocked`](Shared::sync_data_unlocked), called with the
    /// pool's write lock held (no insert can happen now): syncs again if a mapping was
    /// inserted after the last lock-free sync began, since its data may have been written
    /// after that sync started.
    fn sync_data_locked(&self, covered: u64) -> std::io::Result<()> {
        if self.inserts.load(Ordering::SeqCst) != covered {
            self.data.sync_blocking()?;
        }
        Ok(())
    }

    /// One commit; the caller holds `commit_turn`.
    async fn commit_now(self: &Arc<Self>) -> DevResult<()> {
        let start = Instant::now();
        // The bulk of the data, with no lock held.
        let inserts_before = self.sync_data_unlocked().await.map_err(io_err)?;
        let synced = Instant::now();
        let dirty = self.dirty.load(Ordering::SeqCst);
        let mut committed_at = synced;
        if dirty {
            let me = self.clone();
            let freed = tokio::task::spawn_blocking(move || -> DevResult<Vec<DataBlock>> {
                let mut pool = me.write_long();
                me.sync_data_locked(inserts_before).map_err(io_err)?;
                me.dirty.store(false, Ordering::SeqCst);
                let committed = pool.commit()?;
                me.less_shared.lock().committed();
                Ok(committed.freed)
            })
            .await
            .map_err(join_err)??;
            committed_at = Instant::now();
            self.release_freed(freed).await?;
        }
        let done = Instant::now();
        let mut st = self.stats.lock();
        st.flushes += 1;
        st.commits += u64::from(dirty);
        st.data_sync += synced - start;
        st.metadata += committed_at - synced;
        st.punch += done - committed_at;
        st.longest = st.longest.max(done - start);
        Ok(())
    }

    /// Punches blocks freed by a durable commit and gives them back to the allocator, once no
    /// request that might have looked them up is still doing I/O.
    async fn release_freed(&self, freed: Vec<DataBlock>) -> DevResult<()> {
        if freed.is_empty() {
            return Ok(());
        }
        self.grace.synchronize().await;
        for b in &freed {
            self.data.release(*b).await.map_err(io_err)?;
        }
        self.pool.read().release_freed(&freed);
        Ok(())
    }

    /// Runs `op` under the write lock after draining `drain` (see [`VolumePool::exclusive`]).
    /// `op` returns its result and blocks it freed that the pool does not report through
    /// `take_unreported_freed` (a delete's). `commits`: a successful `op` ends with a commit
    /// of everything, so the open transaction is empty afterwards.
    async fn exclusive<R, F>(
        self: &Arc<Self>,
        drain: Drain,
        commits: bool,
        op: F,
    ) -> Result<R, PoolError>
    where
        F: FnOnce(&mut Pool) -> Result<(R, Vec<DataBlock>), PoolError> + Send + 'static,
        R: Send + 'static,
    {
        self.check_failed().map_err(to_pool_err)?;
        let state = match drain {
            Drain::None => None,
            Drain::Snapshot(d) | Drain::Delete(d) => Some(self.dev_state(d)),
        };
        // Drain first (writes of the device finish, new ones wait), then take the
        // committer's turn so no group commit runs in between.
        let _gate = match &state {
            Some(s) => Some(s.gate.write().await),
            None => None,
        };
        let _turn = self.commit_turn.lock().await;
        let inserts_before = self
            .sync_data_unlocked()
            .await
            .map_err(|e| PoolError::io("cannot sync the data file", e))?;
        let me = self.clone();
        let st = state.clone();
        let (r, freed) = tokio::task::spawn_blocking(move || {
            let mut pool = me.write_long();
            if let Err(e) = me.sync_data_locked(inserts_before) {
                return (
                    Err(PoolError::io("cannot sync the data file", e)),
                    Vec::new(),
                );
            }
            let result = op(&mut pool);
            if let (Drain::Snapshot(_), Some(s)) = (drain, &st) {
                // Even a failed snapshot may have gone half way; distrusting is always safe.
                s.snap_epoch.fetch_add(1, Ordering::AcqRel);
            }
            // Whatever commits the operation made, what they freed is ours to punch, whether
            // or not it succeeded in the end.
            let mut freed = pool.take_unreported_freed();
            let r = match result {
                Ok((r, mut own)) => {
                    freed.append(&mut own);
                    Ok(r)
                }
                Err(e) => Err(e),
            };
            if commits && r.is_ok() {
                // Everything, the data path's changes included, is committed now.
                me.dirty.store(false, Ordering::SeqCst);
                me.less_shared.lock().committed();
            } else {
                // The operation may have changed the trees: the next flush must commit them.
                me.dirty.store(true, Ordering::SeqCst);
            }
            if let (Drain::Delete(d), Some(s), Ok(_)) = (drain, &st, &r) {
                me.give_back_reserved(&pool, s);
                s.gone.store(true, Ordering::Release);
                me.cache.forget_device(d);
                me.devs.lock().remove(&d);
            }
            (r, freed)
        })
        .await
        .map_err(|e| to_pool_err(join_err(e)))?;
        self.release_freed(freed).await.map_err(to_pool_err)?;
        r
    }
}

impl Volume {
    /// The device id.
    pub fn dev(&self) -> DevId {
        self.dev
    }

    /// Changes the size the volume reports and enforces (after a resize in the pool).
    pub fn set_size(&self, size: u64) {
        self.size.store(size, Ordering::Release);
    }

    fn alive(&self) -> DevResult<()> {
        if self.state.gone.load(Ordering::Acquire) {
            return Err(DevError::Gone(format!("{} was deleted", self.dev)));
        }
        Ok(())
    }

    fn writable(&self, offset: u64, len: u64) -> DevResult<()> {
        check_range(offset, len, self.size.load(Ordering::Acquire))?;
        if self.read_only {
            return Err(DevError::ReadOnly);
        }
        self.alive()?;
        self.shared.check_failed()
    }

    /// The block, if the cache says this device owns `v` alone (and no snapshot happened
    /// since that was learned).
    fn cached_owned(&self, v: VirtBlock) -> Option<DataBlock> {
        match self.shared.cache.get(self.dev, v) {
            Some(Cached::Mapped {
                block,
                exclusive: true,
                epoch,
            }) if epoch == self.state.snap_epoch.load(Ordering::Acquire) => Some(block),
            _ => None,
        }
    }

    async fn read_impl(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let sh = &self.shared;
        let bs = sh.block_size;
        let len = iov_len(bufs);
        let _io = sh.grace.enter();
        if let Some(p) = single_piece(offset, len, bs) {
            if let Some(block) = sh.cache.mapped(self.dev, p.vblock) {
                return sh.data.read(block, p.offset, bufs).await.map_err(io_err);
            }
            return match sh.mapping(self.dev, &self.state, p.vblock).await? {
                Cached::Unmapped => {
                    bufs.iter_mut().for_each(|b| b.fill(0));
                    Ok(())
                }
                Cached::Mapped { block, .. } => {
                    sh.data.read(block, p.offset, bufs).await.map_err(io_err)
                }
            };
        }
        let ps = pieces(offset, len, bs);
        let mut found: Vec<Option<Cached>> = ps
            .iter()
            .map(|p| sh.cache.get(self.dev, p.vblock))
            .collect();
        let missing: Vec<VirtBlock> = ps
            .iter()
            .zip(&found)
            .filter(|(_, c)| c.is_none())
            .map(|(p, _)| p.vblock)
            .collect();
        if !missing.is_empty() {
            let mut looked_up = sh
                .lookup_many(self.dev, &self.state, missing)
                .await?
                .into_iter();
            for c in found.iter_mut().filter(|c| c.is_none()) {
                *c = looked_up.next();
            }
        }
        let lens: Vec<usize> = ps.iter().map(|p| p.len).collect();
        let parts = split_mut(bufs, &lens);
        let mut runs = Vec::with_capacity(ps.len());
        for ((p, c), mut part) in ps.iter().zip(found).zip(parts) {
            match c {
                Some(Cached::Mapped { block, .. }) => runs.push(Run {
                    block,
                    offset: p.offset,
                    len: p.len as u64,
                    bufs: part,
                }),
                _ => part.iter_mut().for_each(|b| b.fill(0)),
            }
        }
        sh.read_runs(runs).await
    }

    /// Writes a request; the caller holds the device's gate (shared).
    async fn write_impl(&self, offset: u64, bufs: &[IoSlice<'_>]) -> DevResult<()> {
        let sh = &self.shared;
        let bs = sh.block_size;
        let len = iov_len(bufs);
        if let Some(p) = single_piece(offset, len, bs) {
            // Fast path: a block this device owns alone. No lock (cache lookups take none).
            {
                let _io = sh.grace.enter();
                if let Some(block) = self.cached_owned(p.vblock) {
                    return sh.data.write(block, p.offset, bufs).await.map_err(io_err);
                }
            }
            return self.write_slow(&[p], &[bufs.to_vec()]).await;
        }
        let ps = pieces(offset, len, bs);
        let lens: Vec<usize> = ps.iter().map(|p| p.len).collect();
        let parts = split(bufs, &lens);
        {
            let _io = sh.grace.enter();
            let owned: Vec<DataBlock> = ps
                .iter()
                .map_while(|p| self.cached_owned(p.vblock))
                .collect();
            if owned.len() == ps.len() {
                let runs = ps
                    .iter()
                    .zip(owned)
                    .zip(parts)
                    .map(|((p, block), part)| Run {
                        block,
                        offset: p.offset,
                        len: p.len as u64,
                        bufs: part,
                    })
                    .collect();
                return sh.write_runs(runs).await;
            }
        }
        self.write_slow(&ps, &parts).await
    }

    /// Writes pieces of which some must (or may) provision or copy: holds their blocks'
    /// in-flight slots, then runs rounds until every piece is written and mapped.
    async fn write_slow(&self, ps: &[Piece], parts: &[Vec<IoSlice<'_>>]) -> DevResult<()> {
        // Slots are taken in ascending block order (pieces are in order), so two requests
        // never wait for each other in a cycle.
        let mut slots = Vec::with_capacity(ps.len());
        for p in ps {
            slots.push(self.shared.inflight.lock(self.dev, p.vblock).await);
        }
        let mut todo: Vec<usize> = (0..ps.len()).collect();
        while !todo.is_empty() {
            todo = self.write_round(ps, parts, &todo).await?;
        }
        Ok(())
    }

    /// The plan of a round whose blocks are all unmapped with their slots waiting in the
    /// device's open groups, or given back unwritten by their closed groups (`place.rs`),
    /// made without the pool lock: every piece is fresh.
    /// The cache's "unmapped" is trusted here because the caller holds the blocks' in-flight
    /// slots: only a write maps a block, and the cache hears of every mapping change under the
    /// lock that makes it. Returns `None` (nothing taken) when any block does not qualify.
    fn plan_fresh_unlocked(&self, vbs: &[VirtBlock]) -> Option<RoundPlan> {
        let sh = &self.shared;
        // Read first: an unmap that runs after this makes the insert look again.
        let discards = self.state.discards.load(Ordering::Acquire);
        if !vbs
            .iter()
            .all(|&v| sh.cache.get(self.dev, v) == Some(Cached::Unmapped))
        {
            return None;
        }
        // All of the slots or none (`take_open`, `place_zeroed`), so one block per piece.
        let slots = sh
            .take_open(&self.state, vbs)
            .or_else(|| sh.place_zeroed(self.dev, vbs))?;
        let reserved = Reserved::new(sh.clone(), slots);
        Some((
            (0..vbs.len()).map(Plan::Fresh).collect(),
            reserved,
            discards,
        ))
    }

    /// The plan of a round from one trip under the pool's read lock: look every block up
    /// (the cache may say "shared" when the sharer has gone, so ask the pool for every block
    /// the cache does not say is unmapped or owned alone; its "unmapped" is trusted as in
    /// [`plan_fresh_unlocked`](Volume::plan_fresh_unlocked), its "owned alone" as on the
    /// fast path), decide, and reserve what is needed.
    async fn plan_locked(&self, vbs: Vec<VirtBlock>) -> DevResult<RoundPlan> {
        let (dev, state, me) = (self.dev, self.state.clone(), self.shared.clone());
        self.shared
            .read_pool(move |sh, pool| {
                let discards = state.discards.load(Ordering::Acquire);
                let epoch = state.snap_epoch.load(Ordering::Acquire);
                let mut fresh_vbs = Vec::new();
                let mut plans = Vec::with_capacity(vbs.len());
                for v in vbs {
                    let c = match sh.cache.get(dev, v) {
                        Some(Cached::Unmapped) => Cached::Unmapped,
                        // Owned alone in this epoch: the fast path writes such a block in
                        // place with no in-flight slot, so this round must not copy it (after
                        // an overflow of `LessShared` a lookup would say "shared").
                        Some(
                            c @ Cached::Mapped {
                                exclusive: true,
                                epoch: e,
                                ..
                            },
                        ) if e == epoch => c,
                        _ => {
                            let c = sh.lookup_locked(pool, dev, &state, v)?;
                            sh.cache.put(dev, v, c);
                            c
                        }
                    };
                    let k = fresh_vbs.len();
                    plans.push(match c {
                        Cached::Mapped {
                            block,
                            exclusive: true,
                            epoch: e,
                        } if e == epoch => Plan::InPlace(block),
                        Cached::Mapped { block, .. } => {
                            fresh_vbs.push(v);
                            Plan::Copy { old: block, k }
                        }
                        Cached::Unmapped => {
                            fresh_vbs.push(v);
                            Plan::Fresh(k)
                        }
                    });
                }
                let blocks = if fresh_vbs.is_empty() {
                    Vec::new()
                } else {
                    sh.take_blocks(pool, dev, &state, &fresh_vbs)?
                };
                // Held by a guard from here on: released even if our caller is cancelled.
                Ok((plans, Reserved::new(me, blocks), discards))
            })
            .await
    }

    /// One round of [`write_slow`](Volume::write_slow) over the pieces `todo`: decide each
    /// piece from a fresh lookup, reserve what is needed (all or nothing: ENOSPC changes
    /// nothing), write the data in runs of consecutive blocks, then map the new blocks.
    /// Returns the pieces whose mapping changed under us (a concurrent discard): they go again.
    async fn write_round(
        &self,
        ps: &[Piece],
        parts: &[Vec<IoSlice<'_>>],
        todo: &[usize],
    ) -> DevResult<Vec<usize>> {
        let sh = &self.shared;
        let bs = sh.block_size;
        let _io = sh.grace.enter();
        let vbs: Vec<VirtBlock> = todo.iter().map(|&i| ps[i].vblock).collect();
        // Fresh blocks with their slots waiting need no lock at all; else one trip under the
        // read lock.
        let (plans, mut reserved, discards) = match self.plan_fresh_unlocked(&vbs) {
            Some(planned) => planned,
            None => self.plan_locked(vbs).await?,
        };
        let fresh = reserved.list.len();
        let new_block = |k: usize| -> DevResult<DataBlock> { Ok(reserved.block(k)?.0) };
        // Copies of partially written shared blocks: the old block with the write laid over
        // it, written whole (measured faster than copy_file_range + write: docs/io-engines.md).
        // Page-aligned, so that the read of the old block and the write of the new one may
        // take the direct path (CacheMode::Direct).
        // Where the file system shares extents (XFS with reflink, btrfs), the new block is a
        // clone of the old one instead, with the piece written into it in the same job
        // (`cloned`: done here, no run below).
        let mut copies: Vec<AlignedBuf> = Vec::new();
        let mut cloned = vec![false; todo.len()];
        for (n, (&i, plan)) in todo.iter().zip(&plans).enumerate() {
            let p = ps[i];
            match *plan {
                Plan::Copy { old, k } if !p.whole(bs) => {
                    if sh
                        .data
                        .clone_and_write(old, new_block(k)?, p.offset, &parts[i])
                        .await
                        .map_err(io_err)?
                    {
                        cloned[n] = true;
                        continue;
                    }
                    let mut block = AlignedBuf::zeroed(bs as usize);
                    sh.data
                        .read(old, 0, &mut [IoSliceMut::new(&mut block)])
                        .await
                        .map_err(io_err)?;
                    let mut at = p.offset as usize;
                    for b in &parts[i] {
                        block[at..at + b.len()].copy_from_slice(b);
                        at += b.len();
                    }
                    copies.push(block);
                }
                Plan::Fresh(k) if !p.whole(bs) => {
                    // A reused block may still hold data if a punch was lost to a crash.
                    let (block, hole) = reserved.block(k)?;
                    if !hole {
                        sh.data.make_zero(block).await.map_err(io_err)?;
                    }
                }
                _ => {}
            }
        }
        let mut runs = Vec::with_capacity(todo.len());
        let mut next_copy = copies.iter();
        for (n, (&i, plan)) in todo.iter().zip(&plans).enumerate() {
            let p = ps[i];
            // The piece's own bytes, at its place in `block`.
            let piece_at = |block: DataBlock| Run {
                block,
                offset: p.offset,
                len: p.len as u64,
                bufs: parts[i].clone(),
            };
            let run = match *plan {
                Plan::InPlace(block) => piece_at(block),
                Plan::Fresh(k) => piece_at(new_block(k)?),
                // Cloned, the piece written with the clone.
                Plan::Copy { .. } if cloned[n] => continue,
                // Covered whole (the piece is then the block): only the piece.
                Plan::Copy { k, .. } if p.whole(bs) => piece_at(new_block(k)?),
                // Read and patched: written whole, or into a block known to be a hole only
                // where it is not zeros, so that the parts of the old block that were holes
                // (or zeros) take no space in the new one.
                Plan::Copy { k, .. } => {
                    let copy = next_copy.next().ok_or_else(|| {
                        DevError::Io(std::io::Error::other("copy buffer missing for a piece"))
                    })?;
                    let (block, hole) = reserved.block(k)?;
                    if hole {
                        runs.extend(nonzero_ranges(copy).into_iter().map(|(at, len)| Run {
                            block,
                            // Below the block size, which fits in u32 (checked by DataFile).
                            offset: at as u32,
                            len: len as u64,
                            bufs: vec![IoSlice::new(&copy[at..at + len])],
                        }));
                        continue;
                    }
                    Run {
                        block,
                        offset: 0,
                        len: bs,
                        bufs: vec![IoSlice::new(copy)],
                    }
                }
            };
            runs.push(run);
        }
        sh.write_runs(runs).await?;
        if fresh == 0 {
            return Ok(Vec::new());
        }
        // Map the new blocks. Each mapping is checked again under the write lock: a discard
        // may have unmapped the block while we copied, and the copy would then bring the
        // discarded data back; such pieces go round again.
        let mut inserts = Vec::with_capacity(fresh);
        for (&i, plan) in todo.iter().zip(&plans) {
            let (old, k) = match *plan {
                Plan::InPlace(_) => continue,
                Plan::Fresh(k) => (None, k),
                Plan::Copy { old, k } => (Some(old), k),
            };
            let r = reserved.take(k).ok_or_else(|| {
                DevError::Io(std::io::Error::other("reservation missing for a piece"))
            })?;
            inserts.push((i, ps[i].vblock, old, r));
        }
        let (dev, state) = (self.dev, self.state.clone());
        sh.write_pool_combined(move |sh, pool| {
            let mut retry = Vec::new();
            let mut failure: Option<DevError> = None;
            // Only an unmap can have changed these mappings since we looked (we hold their
            // slots and the device's gate); if none ran, no need to look again.
            let recheck = state.discards.load(Ordering::Acquire) != discards;
            for (i, v, old, r) in inserts {
                if failure.is_some() {
                    pool.release_reservation(r);
                    continue;
                }
                let now = if recheck {
                    match pool.lookup(dev, v) {
                        Ok(m) => m.map(|m| m.block),
                        Err(e) => {
                            pool.release_reservation(r);
                            failure = Some(e.into());
                            continue;
                        }
                    }
                } else {
                    old
                };
                if now != old {
                    pool.release_reservation(r);
                    retry.push(i);
                    continue;
                }
                let block = r.block();
                match pool.insert_mapping(dev, v, r) {
                    Ok(replaced) => {
                        // What the cache says here must be what a lookup would say: a write
                        // that finds the block "owned alone" in the cache writes it in place
                        // with no in-flight slot, so a concurrent write that looked it up as
                        // shared and copied it would lose that write.
                        let exclusive = {
                            let mut less = sh.less_shared.lock();
                            if let Some(o) = replaced {
                                less.note(o);
                            }
                            less.mapped_fresh(block);
                            less.trusts(block)
                        };
                        sh.cache.put(
                            dev,
                            v,
                            Cached::Mapped {
                                block,
                                exclusive,
                                epoch: state.snap_epoch.load(Ordering::Acquire),
                            },
                        );
                        sh.inserts.fetch_add(1, Ordering::SeqCst);
                        sh.dirty.store(true, Ordering::SeqCst);
                    }
                    Err(e) => failure = Some(e.into()),
                }
            }
            match failure {
                Some(e) => Err(e),
                None => Ok(retry),
            }
        })
        .await
    }

    /// Unmaps the whole blocks `[begin, end)`.
    async fn unmap_blocks(&self, begin: VirtBlock, end: VirtBlock) -> DevResult<()> {
        if begin >= end {
            return Ok(());
        }
        let (dev, state) = (self.dev, self.state.clone());
        self.shared
            .write_pool(move |sh, pool| {
                // A discard that changes nothing is not worth a metadata change (a trim of a
                // never-written range, which file systems send a lot of).
                let anything_mapped = (begin.0..end.0)
                    .take(64)
                    .any(|v| !matches!(sh.cache.get(dev, VirtBlock(v)), Some(Cached::Unmapped)));
                if !anything_mapped && end.0 - begin.0 <= 64 {
                    return Ok(());
                }
                state.discards.fetch_add(1, Ordering::AcqRel);
                let result = pool.discard(dev, begin, end);
                // Forget the range even after an error: the trees may have changed half way.
                sh.cache.forget_range(dev, begin, end);
                let mut less = sh.less_shared.lock();
                match &result {
                    // Every block that lost a mapping is less shared than in the last commit
                    // (`sharing.rs`).
                    Ok(d) => d.removed.iter().for_each(|&b| less.note(b)),
                    // The trees may have changed half way: trust no lookup until the commit.
                    Err(_) => less.distrust_all(),
                }
                drop(less);
                let d = result?;
                if d.unmapped > 0 {
                    sh.dirty.store(true, Ordering::SeqCst);
                }
                Ok(())
            })
            .await
    }

    /// Zeroes `[offset, offset + len)`: whole blocks are unmapped when `unmap`, partial
    /// pieces (and every piece when not `unmap`) get zeros written, except where unmapped.
    async fn zero_range(&self, offset: u64, len: u64, unmap: bool) -> DevResult<()> {
        let _gate = self.state.gate.read().await;
        self.alive()?;
        let bs = self.shared.block_size;
        let ps = pieces(offset, len, bs);
        let zeros = vec![0u8; bs.min(len) as usize];
        let mut run: Option<(u64, u64)> = None;
        for p in &ps {
            if unmap && p.whole(bs) {
                run = match run {
                    Some((b, e)) if e == p.vblock.0 => Some((b, e + 1)),
                    Some((b, e)) => {
                        self.unmap_blocks(VirtBlock(b), VirtBlock(e)).await?;
                        Some((p.vblock.0, p.vblock.0 + 1))
                    }
                    None => Some((p.vblock.0, p.vblock.0 + 1)),
                };
                continue;
            }
            let mapped = {
                let _io = self.shared.grace.enter();
                self.shared.mapping(self.dev, &self.state, p.vblock).await? != Cached::Unmapped
            };
            // An unmapped block already reads as zeros; with `unmap` it may stay so.
            if mapped || !unmap {
                let piece_zeros = [IoSlice::new(&zeros[..p.len])];
                self.write_slow(std::slice::from_ref(p), &[piece_zeros.to_vec()])
                    .await?;
            }
        }
        if let Some((b, e)) = run {
            self.unmap_blocks(VirtBlock(b), VirtBlock(e)).await?;
        }
        Ok(())
    }
}

impl BlockDevice for Volume {
    fn info(&self) -> DeviceInfo {
        DeviceInfo {
            size: self.size.load(Ordering::Acquire),
            read_only: self.read_only,
            // The data file checked that the block size fits in u32.
            block_size: self.shared.block_size as u32,
        }
    }

    async fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let len = iov_len(bufs);
        check_range(offset, len, self.size.load(Ordering::Acquire))?;
        self.alive()?;
        if len == 0 {
            return Ok(());
        }
        self.read_impl(offset, bufs).await
    }

    async fn write(&self, offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        let len = iov_len(bufs);
        self.writable(offset, len)?;
        if len > 0 {
            let _gate = self.state.gate.read().await;
            self.alive()?;
            self.write_impl(offset, bufs).await?;
        }
        if fua {
            self.shared.commit().await?;
        }
        Ok(())
    }

    async fn flush(&self) -> DevResult<()> {
        self.alive()?;
        self.shared.commit().await
    }

    async fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.writable(offset, len)?;
        self.zero_range(offset, len, true).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> DevResult<()> {
        self.writable(offset, len)?;
        if fast_only && !may_unmap {
            return Err(DevError::NotFast);
        }
        self.zero_range(offset, len, may_unmap).await
    }

    async fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.size.load(Ordering::Acquire))?;
        self.alive()?;
        let bs = self.shared.block_size;
        let (dev, state) = (self.dev, self.state.clone());
        self.shared
            .read_pool(move |sh, pool| {
                let mut out: Vec<Extent> = Vec::new();
                for p in pieces(offset, len, bs)
                    .into_iter()
                    .take(STATUS_MAX_BLOCKS as usize)
                {
                    let mapped = match sh.cache.get(dev, p.vblock) {
                        Some(c) => c != Cached::Unmapped,
                        None => sh.lookup_locked(pool, dev, &state, p.vblock)? != Cached::Unmapped,
                    };
                    let ext = Extent {
                        len: p.len as u64,
                        allocated: mapped,
                        zero: !mapped,
                    };
                    match out.last_mut() {
                        Some(last) if last.allocated == ext.allocated && last.zero == ext.zero => {
                            last.len += ext.len
                        }
                        _ => out.push(ext),
                    }
                }
                Ok(out)
            })
            .await
    }
}
