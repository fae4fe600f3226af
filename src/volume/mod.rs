//! The volume layer: byte-range read / write / flush / discard / write-zeroes on thin volumes,
//! over the pool's thin metadata ([`ThinMetadata`]) and the data file ([`DataFile`]).
//!
//! A [`VolumePool`] owns the metadata (in a `parking_lot::RwLock`), the data file, the mapping
//! cache, the per-block in-flight table and the group committer. A [`Volume`] is one thin
//! device of it and implements [`BlockDevice`], the API both servers use. docs/volume.md
//! describes the data path and argues each invariant of DESIGN.md; in short:
//!
//! - **Overwrite of an owned block** (cached as owned alone): one write to the data file, no
//!   lock beyond the cache shard, no metadata change.
//! - **First write to an unmapped block**: reserve a data block, make sure it reads as zeros (a
//!   `SEEK_DATA`, normally), write only the bytes given, then insert the mapping under the
//!   write lock. **Write to a shared block**: reserve, copy the old block (skipped when the
//!   write covers it whole), apply the write, insert. The mapping is inserted only after the
//!   data is written, and a commit syncs the data before the metadata, so a durable mapping
//!   never points at data that is not (invariant 3).
//! - Two writes to one block that must provision or copy are serialised by the in-flight
//!   table; writes to different blocks never wait for each other (invariant 9).
//! - **Flush / FUA**: group commit. fdatasync(data) without any lock, then under the write lock
//!   a second fdatasync only if a mapping was inserted meanwhile, the metadata commit, and
//!   then — after every I/O that might still use them has finished — the freed blocks are
//!   punched and given back to the allocator (invariant 2).
//! - **Snapshots** go through [`VolumePool::exclusive`], which drains the origin's writes
//!   first (a per-volume gate), so every write acknowledged before the snapshot is in it and
//!   no later write lands in a block that just became shared.

mod cache;
mod grace;
mod inflight;
mod mem_meta;
mod meta;

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::data::DataFile;
use crate::device::{BlockDevice, DevError, DevResult, DeviceInfo, Extent, check_range, iov_len};
use crate::units::{DataBlock, DevId, VirtBlock};

use cache::{Cached, MappingCache};
use grace::Grace;
use inflight::InFlight;

pub use mem_meta::{MemMetaDisk, MemMetadata};
pub use meta::{BlockMapping, ThinMetadata};

/// Default bound of the mapping cache, in entries (about 64 bytes each with the map's
/// overhead): 256 Ki entries cover 16 GiB of 64 KiB blocks in about 16 MiB.
pub const DEFAULT_CACHE_ENTRIES: usize = 256 * 1024;

/// Most blocks one [`BlockDevice::block_status`] call looks at; the answer may be shorter
/// than asked, as the API allows.
const STATUS_MAX_BLOCKS: u64 = 16 * 1024;

/// Per-device state shared by every [`Volume`] handle of that device.
struct DevState {
    /// Writes (and discards) hold it shared for their whole duration; a snapshot or delete of
    /// the device holds it exclusively, which drains in-flight writes and holds new ones.
    gate: tokio::sync::RwLock<()>,
    /// Bumped by each snapshot of the device: cache entries of older epochs are no longer
    /// trusted to be owned alone.
    snap_epoch: AtomicU64,
    /// Set when the device is deleted; every later request fails with `Gone`.
    gone: AtomicBool,
}

/// What [`VolumePool::exclusive`] does to a device around a metadata operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Drain {
    /// Nothing to drain (create, grow, status).
    None,
    /// The device is the origin of a snapshot: drain its writes, then distrust its cached
    /// exclusivity.
    Snapshot(DevId),
    /// The device is being deleted: drain its writes, then fail every later request.
    Delete(DevId),
}

struct Shared<M: ThinMetadata> {
    meta: RwLock<M>,
    data: DataFile,
    block_size: u64,
    cache: MappingCache,
    inflight: InFlight,
    grace: Grace,
    devs: Mutex<HashMap<DevId, Arc<DevState>>>,
    /// Mapping changes not yet committed.
    dirty: AtomicBool,
    /// Set (under the write lock) when a mapping change in the open transaction may have made
    /// a block less shared (a copy-on-write remap, a discard); cleared when the transaction is
    /// committed. While set, a lookup's "owned alone" is not trusted for writing in place: the
    /// last *committed* transaction may still share the block, and a crash would bring that
    /// sharer back with our write in its data (found by the crash test). Such a write copies
    /// instead. Entries cached as owned before the flag was set stay trusted: only a snapshot
    /// can make a block more shared, and snapshots bump the device's epoch.
    unshared_in_txn: AtomicBool,
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
}

/// The data path of one pool: metadata + data file + caches + committer. Cheap to clone.
pub struct VolumePool<M: ThinMetadata> {
    shared: Arc<Shared<M>>,
}

impl<M: ThinMetadata> Clone for VolumePool<M> {
    fn clone(&self) -> Self {
        VolumePool {
            shared: self.shared.clone(),
        }
    }
}

/// One thin volume (or snapshot) of a [`VolumePool`], served through [`BlockDevice`].
pub struct Volume<M: ThinMetadata> {
    shared: Arc<Shared<M>>,
    dev: DevId,
    size: AtomicU64,
    read_only: bool,
    state: Arc<DevState>,
}

/// Releases a reservation that was not consumed (error or cancellation).
struct ReservationGuard<'a, M: ThinMetadata> {
    meta: &'a RwLock<M>,
    r: Option<M::Reservation>,
}

impl<M: ThinMetadata> Drop for ReservationGuard<'_, M> {
    fn drop(&mut self) {
        if let Some(r) = self.r.take() {
            self.meta.read().release_reservation(r);
        }
    }
}

fn io_err(e: std::io::Error) -> DevError {
    DevError::Io(e)
}

fn join_err(e: tokio::task::JoinError) -> DevError {
    DevError::Io(std::io::Error::other(format!("commit thread failed: {e}")))
}

impl<M: ThinMetadata> VolumePool<M> {
    /// The data path over `meta` and `data`, with a mapping cache of at most `cache_entries`.
    pub fn new(meta: M, data: DataFile, cache_entries: usize) -> VolumePool<M> {
        let block_size = u64::from(data.block_size());
        VolumePool {
            shared: Arc::new(Shared {
                meta: RwLock::new(meta),
                data,
                block_size,
                cache: MappingCache::new(cache_entries),
                inflight: InFlight::new(),
                grace: Grace::new(),
                devs: Mutex::new(HashMap::new()),
                dirty: AtomicBool::new(false),
                unshared_in_txn: AtomicBool::new(false),
                inserts: AtomicU64::new(0),
                commit_turn: tokio::sync::Mutex::new(()),
                commits_started: AtomicU64::new(0),
                commits_done: AtomicU64::new(0),
                failed: Mutex::new(None),
            }),
        }
    }

    /// A handle on device `dev` of `size` bytes. Every handle of one device shares its gate.
    pub fn volume(&self, dev: DevId, size: u64, read_only: bool) -> Volume<M> {
        Volume {
            shared: self.shared.clone(),
            dev,
            size: AtomicU64::new(size),
            read_only,
            state: self.shared.dev_state(dev),
        }
    }

    /// The data file.
    pub fn data(&self) -> &DataFile {
        &self.shared.data
    }

    /// Read access to the metadata (status, lookups in tests). Do not hold it across I/O.
    pub fn meta(&self) -> parking_lot::RwLockReadGuard<'_, M> {
        self.shared.meta.read()
    }

    /// Makes every write completed before this call durable (group commit).
    pub async fn commit(&self) -> DevResult<()> {
        self.shared.commit().await
    }

    /// Runs a metadata operation that needs the write lock and may commit on its own
    /// (snapshot, delete, create, grow): drains `drain`'s writes, syncs the data first (the
    /// operation's commit must not map unsynced data), runs `op`, then punches whatever its
    /// commit freed.
    pub async fn exclusive<R, F>(&self, drain: Drain, op: F) -> DevResult<R>
    where
        F: FnOnce(&mut M) -> DevResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.shared.exclusive(drain, op).await
    }

    /// Commits dirty metadata every `period` (the "at least once a second" rule) until the
    /// pool is dropped. Errors are logged; the next flush reports them.
    pub fn spawn_periodic_commit(&self, period: Duration) -> tokio::task::JoinHandle<()> {
        let weak: Weak<Shared<M>> = Arc::downgrade(&self.shared);
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

    /// Number of entries in the mapping cache (memory figures).
    pub fn cached_mappings(&self) -> usize {
        self.shared.cache.len()
    }

    /// Gives the metadata back (tests reopen pools).
    pub fn into_metadata(self) -> Option<M> {
        Arc::into_inner(self.shared).map(|s| s.meta.into_inner())
    }
}

impl<M: ThinMetadata> Shared<M> {
    fn dev_state(&self, dev: DevId) -> Arc<DevState> {
        self.devs
            .lock()
            .entry(dev)
            .or_insert_with(|| {
                Arc::new(DevState {
                    gate: tokio::sync::RwLock::new(()),
                    snap_epoch: AtomicU64::new(0),
                    gone: AtomicBool::new(false),
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

    /// Where `v` of `dev` lives, from the cache or (under the read lock, caching the answer)
    /// from the trees. The caller holds an [`grace::IoGuard`] if it will do I/O on the block.
    fn mapping(&self, dev: DevId, state: &DevState, v: VirtBlock) -> DevResult<Cached> {
        if let Some(c) = self.cache.get(dev, v) {
            return Ok(c);
        }
        let meta = self.meta.read();
        let c = self.lookup_locked(&meta, dev, state, v)?;
        // Filled under the read lock: no mapping change can slip in between.
        self.cache.put(dev, v, c);
        Ok(c)
    }

    /// A lookup under the caller's metadata lock (read or write), as a cache entry.
    fn lookup_locked(
        &self,
        meta: &M,
        dev: DevId,
        state: &DevState,
        v: VirtBlock,
    ) -> DevResult<Cached> {
        let epoch = state.snap_epoch.load(Ordering::Acquire);
        let unshared = self.unshared_in_txn.load(Ordering::SeqCst);
        Ok(match meta.lookup(dev, v)? {
            None => Cached::Unmapped,
            Some(m) => Cached::Mapped {
                block: m.block,
                exclusive: !m.shared && !unshared,
                epoch,
            },
        })
    }

    /// Looks `v` up in the trees, bypassing the cache (a write about to copy rechecks: the
    /// sharer may be gone).
    fn fresh_mapping(&self, dev: DevId, state: &DevState, v: VirtBlock) -> DevResult<Cached> {
        let meta = self.meta.read();
        let c = self.lookup_locked(&meta, dev, state, v)?;
        self.cache.put(dev, v, c);
        Ok(c)
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

    /// One commit; the caller holds `commit_turn`.
    async fn commit_now(self: &Arc<Self>) -> DevResult<()> {
        let inserts_before = self.inserts.load(Ordering::SeqCst);
        // The bulk of the data, with no lock held.
        self.data.sync().await.map_err(io_err)?;
        if !self.dirty.load(Ordering::SeqCst) {
            return Ok(());
        }
        let me = self.clone();
        let freed = tokio::task::spawn_blocking(move || -> DevResult<Vec<DataBlock>> {
            let mut meta = me.meta.write();
            if me.inserts.load(Ordering::SeqCst) != inserts_before {
                // Mappings inserted after the first sync started: their data was written
                // before the insert, but maybe after that sync. No insert can happen now.
                me.data.sync_blocking().map_err(io_err)?;
            }
            me.dirty.store(false, Ordering::SeqCst);
            me.unshared_in_txn.store(false, Ordering::SeqCst);
            let mut freed = meta.commit()?;
            freed.extend(meta.take_freed());
            Ok(freed)
        })
        .await
        .map_err(join_err)??;
        self.release_freed(freed).await
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
        self.meta.read().release_freed(&freed);
        Ok(())
    }

    async fn exclusive<R, F>(self: &Arc<Self>, drain: Drain, op: F) -> DevResult<R>
    where
        F: FnOnce(&mut M) -> DevResult<R> + Send + 'static,
        R: Send + 'static,
    {
        self.check_failed()?;
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
        let inserts_before = self.inserts.load(Ordering::SeqCst);
        self.data.sync().await.map_err(io_err)?;
        let me = self.clone();
        let st = state.clone();
        let (r, freed) = tokio::task::spawn_blocking(move || {
            let mut meta = me.meta.write();
            if me.inserts.load(Ordering::SeqCst) != inserts_before {
                me.data.sync_blocking().map_err(io_err)?;
            }
            let r = op(&mut meta)?;
            match (drain, &st) {
                (Drain::Snapshot(_), Some(s)) => {
                    s.snap_epoch.fetch_add(1, Ordering::AcqRel);
                }
                (Drain::Delete(d), Some(s)) => {
                    s.gone.store(true, Ordering::Release);
                    me.cache.forget_device(d);
                    me.devs.lock().remove(&d);
                }
                _ => {}
            }
            // The operation may have committed: what it freed is ours to punch.
            let freed = meta.take_freed();
            me.dirty.store(true, Ordering::SeqCst);
            Ok::<_, DevError>((r, freed))
        })
        .await
        .map_err(join_err)??;
        self.release_freed(freed).await?;
        Ok(r)
    }
}

/// Splits a scatter-gather list into consecutive pieces of the given lengths (which add up to
/// at most the list's length), borrowing disjoint parts of the same buffers.
fn split_mut<'a>(bufs: &'a mut [IoSliceMut<'_>], lens: &[usize]) -> Vec<Vec<IoSliceMut<'a>>> {
    let mut out: Vec<Vec<IoSliceMut<'a>>> = Vec::with_capacity(lens.len());
    let mut want = lens.iter().copied();
    let mut need = want.next().unwrap_or(0);
    let mut cur: Vec<IoSliceMut<'a>> = Vec::new();
    for b in bufs.iter_mut() {
        let mut rest: &'a mut [u8] = &mut b[..];
        while !rest.is_empty() {
            if need == 0 {
                out.push(std::mem::take(&mut cur));
                match want.next() {
                    Some(n) => need = n,
                    None => return out,
                }
                continue;
            }
            let take = need.min(rest.len());
            let (head, tail) = rest.split_at_mut(take);
            cur.push(IoSliceMut::new(head));
            rest = tail;
            need -= take;
        }
    }
    if !cur.is_empty() || need == 0 {
        out.push(cur);
    }
    out
}

/// [`split_mut`] for write buffers.
fn split<'a>(bufs: &'a [IoSlice<'_>], lens: &[usize]) -> Vec<Vec<IoSlice<'a>>> {
    let mut out: Vec<Vec<IoSlice<'a>>> = Vec::with_capacity(lens.len());
    let mut want = lens.iter().copied();
    let mut need = want.next().unwrap_or(0);
    let mut cur: Vec<IoSlice<'a>> = Vec::new();
    for b in bufs {
        let mut rest: &'a [u8] = b;
        while !rest.is_empty() {
            if need == 0 {
                out.push(std::mem::take(&mut cur));
                match want.next() {
                    Some(n) => need = n,
                    None => return out,
                }
                continue;
            }
            let take = need.min(rest.len());
            cur.push(IoSlice::new(&rest[..take]));
            rest = &rest[take..];
            need -= take;
        }
    }
    if !cur.is_empty() || need == 0 {
        out.push(cur);
    }
    out
}

/// One block's part of a request.
#[derive(Debug, Clone, Copy)]
struct Piece {
    vblock: VirtBlock,
    /// Offset inside the block.
    offset: u32,
    len: usize,
}

/// Cuts `[offset, offset + len)` at block boundaries.
fn pieces(offset: u64, len: u64, bs: u64) -> Vec<Piece> {
    let mut out = Vec::with_capacity((len / bs + 2) as usize);
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let in_block = pos % bs;
        let n = (bs - in_block).min(end - pos);
        out.push(Piece {
            vblock: VirtBlock(pos / bs),
            // < bs ≤ u32::MAX (the data file checks block sizes).
            offset: in_block as u32,
            len: n as usize,
        });
        pos += n;
    }
    out
}

impl<M: ThinMetadata> Volume<M> {
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

    async fn read_piece(&self, p: Piece, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let sh = &self.shared;
        let _io = sh.grace.enter();
        match sh.mapping(self.dev, &self.state, p.vblock)? {
            Cached::Unmapped => {
                for b in bufs.iter_mut() {
                    b.fill(0);
                }
                Ok(())
            }
            Cached::Mapped { block, .. } => {
                sh.data.read(block, p.offset, bufs).await.map_err(io_err)
            }
        }
    }

    /// Writes one block's piece. The caller holds the device's gate (shared).
    async fn write_piece(&self, p: Piece, bufs: &[IoSlice<'_>]) -> DevResult<()> {
        let sh = &self.shared;
        let epoch_ok = |e: u64| e == self.state.snap_epoch.load(Ordering::Acquire);
        // Fast path: a block this device owns alone. No lock but the cache shard's.
        {
            let _io = sh.grace.enter();
            if let Some(Cached::Mapped {
                block,
                exclusive: true,
                epoch,
            }) = sh.cache.get(self.dev, p.vblock)
                && epoch_ok(epoch)
            {
                return sh.data.write(block, p.offset, bufs).await.map_err(io_err);
            }
        }
        // Slow path: the mapping may change; one writer per block from here on.
        let _slot = sh.inflight.lock(self.dev, p.vblock).await;
        loop {
            let _io = sh.grace.enter();
            let before = sh.fresh_mapping(self.dev, &self.state, p.vblock)?;
            let old = match before {
                Cached::Mapped {
                    block,
                    exclusive: true,
                    epoch,
                } if epoch_ok(epoch) => {
                    // Provisioned by the writer before us, or the sharer went away.
                    return sh.data.write(block, p.offset, bufs).await.map_err(io_err);
                }
                Cached::Mapped { block, .. } => Some(block),
                Cached::Unmapped => None,
            };
            let mut res = ReservationGuard {
                meta: &sh.meta,
                r: Some(sh.meta.read().reserve()?),
            };
            let new = match &res.r {
                Some(r) => M::reserved_block(r),
                None => unreachable!("the reservation was just stored"),
            };
            let whole = p.offset == 0 && p.len as u64 == sh.block_size;
            match old {
                Some(o) if !whole => {
                    // Copy-on-write as one read of the old block, the write laid over it in
                    // memory, and one whole-block write: measured faster here than
                    // copy_file_range followed by the write (docs/io-engines.md).
                    let mut block = vec![0u8; sh.block_size as usize];
                    sh.data
                        .read(o, 0, &mut [IoSliceMut::new(&mut block)])
                        .await
                        .map_err(io_err)?;
                    let mut at = p.offset as usize;
                    for b in bufs {
                        block[at..at + b.len()].copy_from_slice(b);
                        at += b.len();
                    }
                    sh.data
                        .write(new, 0, &[IoSlice::new(&block)])
                        .await
                        .map_err(io_err)?;
                }
                _ => {
                    if !whole {
                        // A reused block may still hold data if a punch was lost to a crash.
                        sh.data.make_zero(new).await.map_err(io_err)?;
                    }
                    sh.data.write(new, p.offset, bufs).await.map_err(io_err)?;
                }
            }
            let mut meta = sh.meta.write();
            // A discard may have unmapped the block while we copied: then the copy would bring
            // the discarded data back. Start again from what the trees say now.
            let now = meta.lookup(self.dev, p.vblock)?.map(|m| m.block);
            if now != old {
                drop(meta);
                continue;
            }
            let r = res.r.take().expect("reservation still held");
            if meta.insert_mapping(self.dev, p.vblock, r)?.is_some() {
                sh.unshared_in_txn.store(true, Ordering::SeqCst);
            }
            sh.cache.put(
                self.dev,
                p.vblock,
                Cached::Mapped {
                    block: new,
                    exclusive: true,
                    epoch: self.state.snap_epoch.load(Ordering::Acquire),
                },
            );
            sh.inserts.fetch_add(1, Ordering::SeqCst);
            sh.dirty.store(true, Ordering::SeqCst);
            return Ok(());
        }
    }

    /// Unmaps the whole blocks `[begin, end)`.
    fn unmap_blocks(&self, begin: VirtBlock, end: VirtBlock) -> DevResult<()> {
        if begin >= end {
            return Ok(());
        }
        let sh = &self.shared;
        let mut meta = sh.meta.write();
        let n = meta.discard(self.dev, begin, end)?;
        sh.cache.forget_range(self.dev, begin, end);
        if n > 0 {
            sh.dirty.store(true, Ordering::SeqCst);
            sh.unshared_in_txn.store(true, Ordering::SeqCst);
        }
        Ok(())
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
            let whole = p.len as u64 == bs;
            if unmap && whole {
                run = match run {
                    Some((b, e)) if e == p.vblock.0 => Some((b, e + 1)),
                    Some((b, e)) => {
                        self.unmap_blocks(VirtBlock(b), VirtBlock(e))?;
                        Some((p.vblock.0, p.vblock.0 + 1))
                    }
                    None => Some((p.vblock.0, p.vblock.0 + 1)),
                };
                continue;
            }
            let mapped = {
                let _io = self.shared.grace.enter();
                self.shared.mapping(self.dev, &self.state, p.vblock)? != Cached::Unmapped
            };
            // An unmapped block already reads as zeros; with `unmap` it may stay so.
            if mapped || !unmap {
                self.write_piece(*p, &[IoSlice::new(&zeros[..p.len])])
                    .await?;
            }
        }
        if let Some((b, e)) = run {
            self.unmap_blocks(VirtBlock(b), VirtBlock(e))?;
        }
        Ok(())
    }
}

impl<M: ThinMetadata> BlockDevice for Volume<M> {
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
        let ps = pieces(offset, len, self.shared.block_size);
        let lens: Vec<usize> = ps.iter().map(|p| p.len).collect();
        let parts = split_mut(bufs, &lens);
        for (p, mut part) in ps.into_iter().zip(parts) {
            self.read_piece(p, &mut part).await?;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        let len = iov_len(bufs);
        self.writable(offset, len)?;
        {
            let _gate = self.state.gate.read().await;
            self.alive()?;
            let ps = pieces(offset, len, self.shared.block_size);
            let lens: Vec<usize> = ps.iter().map(|p| p.len).collect();
            let parts = split(bufs, &lens);
            for (p, part) in ps.into_iter().zip(parts) {
                self.write_piece(p, &part).await?;
            }
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
        let mut out: Vec<Extent> = Vec::new();
        let meta = self.shared.meta.read();
        for p in pieces(offset, len, bs)
            .into_iter()
            .take(STATUS_MAX_BLOCKS as usize)
        {
            let mapped = match self.shared.cache.get(self.dev, p.vblock) {
                Some(c) => c != Cached::Unmapped,
                None => meta.lookup(self.dev, p.vblock)?.is_some(),
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cut_at_block_boundaries() {
        let ps = pieces(65000, 70000, 65536);
        let v: Vec<(u64, u32, usize)> = ps.iter().map(|p| (p.vblock.0, p.offset, p.len)).collect();
        assert_eq!(v, vec![(0, 65000, 536), (1, 0, 65536), (2, 0, 3928)]);
        assert!(pieces(10, 0, 4096).is_empty());
    }

    #[test]
    fn split_keeps_order_and_lengths() {
        let mut a = vec![1u8; 5];
        let mut b = vec![2u8; 7];
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let parts = split_mut(&mut bufs, &[3, 6, 3]);
        let lens: Vec<Vec<usize>> = parts
            .iter()
            .map(|p| p.iter().map(|s| s.len()).collect())
            .collect();
        assert_eq!(lens, vec![vec![3], vec![2, 4], vec![3]]);
        let x = [9u8; 4];
        let wb = [IoSlice::new(&x), IoSlice::new(&x)];
        let parts = split(&wb, &[8]);
        assert_eq!(parts.len(), 1);
        assert_eq!(iov_len(&parts[0]), 8);
    }
}
