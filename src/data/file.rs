//! The real data file: a regular file or a block device, read and written with positional
//! vectored syscalls. See docs/io-engines.md for why this engine (reads inline with
//! `RWF_NOWAIT`, everything that may block on tokio's blocking pool) won on this machine, and
//! for [`CacheMode::Direct`] (every transfer `O_DIRECT` through io_uring, and why nothing
//! may then go through the page cache).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::iov::{Iovecs, WriteQueue, offload};
use super::uring::Ring;
use super::{AlignedBuf, BUF_ALIGN};

/// `_IO(0x12, 127)`: BLKZEROOUT, zero a byte range of a block device (the kernel unmaps where
/// the device guarantees zeroes, else writes zeros).
const BLKZEROOUT: libc::c_ulong = 0x127f;
/// `_IOR(0x12, 114, size_t)`: BLKGETSIZE64, size of a block device in bytes.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;

/// What backs the data file, which decides how freed blocks are made to read as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageKind {
    /// A regular file: freed blocks are hole-punched (`FALLOC_FL_PUNCH_HOLE | KEEP_SIZE`) and
    /// `SEEK_DATA` tells whether a block is a hole.
    RegularFile,
    /// A block device: freed blocks are zeroed with `BLKZEROOUT` (which unmaps only where the
    /// device guarantees that unmapped sectors read as zeros); holes cannot be detected, so a
    /// reused block is zeroed again before a partial write.
    BlockDevice,
}

/// How data transfers use the host's page cache (`uthin serve --cache`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Every transfer goes through the page cache (qemu-nbd's default `--cache=writeback`).
    #[default]
    Writeback,
    /// Every transfer bypasses the page cache: `O_DIRECT` through io_uring, like QEMU's
    /// `cache.direct=on,aio=io_uring`. Transfers not aligned for direct I/O (512 bytes on
    /// most storage; NBD and virtio-blk requests always are) go through an aligned bounce
    /// buffer, writes as a read-modify-write of their edge units. Nothing is mixed with
    /// buffered I/O, which could leave stale pages in the cache (docs/io-engines.md). Falls
    /// back to [`CacheMode::Writeback`] where the storage refuses `O_DIRECT` (some network
    /// and FUSE file systems; tmpfs accepts it since Linux 6.6).
    Direct,
}

/// The second descriptor of a [`CacheMode::Direct`] data file and its alignment rules.
struct DirectIo {
    file: Arc<File>,
    /// Required alignment of buffer addresses (`stx_dio_mem_align`).
    mem_align: usize,
    /// Required alignment of file offsets and lengths (`stx_dio_offset_align`).
    offset_align: u64,
    /// The ring direct transfers go through; `None` (thread pool) where io_uring is refused.
    ring: Option<Ring>,
    /// Held by unaligned writes on their partial edge units, by unit modulo [`RMW_STRIPES`].
    rmw: Vec<tokio::sync::Mutex<()>>,
}

impl DirectIo {
    /// Runs an aligned transfer.
    async fn transfer(&self, iov: Iovecs<'_>, off: u64) -> io::Result<()> {
        match &self.ring {
            Some(ring) => ring.transfer(fd_of(&self.file), iov, off).await,
            None => offload(&self.file, iov, off).await,
        }
    }

    /// True when `len` bytes at `off` from or into `bufs` need no bounce buffer.
    fn aligned<B: std::ops::Deref<Target = [u8]>>(&self, off: u64, bufs: &[B]) -> bool {
        off % self.offset_align == 0
            && bufs.iter().all(|b| {
                b.as_ptr() as usize % self.mem_align == 0 && b.len() as u64 % self.offset_align == 0
            })
    }

    /// `[off, off + len)` widened to the direct I/O alignment.
    fn widen(&self, off: u64, len: u64) -> (u64, u64) {
        let a = self.offset_align;
        let start = off / a * a;
        (start, (off + len).div_ceil(a) * a - start)
    }

    /// Reads through `O_DIRECT`; an unaligned read reads the aligned range around it into a
    /// bounce buffer.
    async fn read(&self, off: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let len = crate::device::iov_len(bufs);
        if len == 0 {
            return Ok(());
        }
        if self.aligned(off, bufs) {
            return self.transfer(Iovecs::for_read(bufs), off).await;
        }
        let (start, wide) = self.widen(off, len);
        let mut bounce = AlignedBuf::zeroed(wide as usize);
        self.transfer(Iovecs::for_read(&mut [IoSliceMut::new(&mut bounce)]), start)
            .await?;
        let mut at = (off - start) as usize;
        for b in bufs.iter_mut() {
            let n = b.len();
            b.copy_from_slice(&bounce[at..at + n]);
            at += n;
        }
        Ok(())
    }

    /// Writes through `O_DIRECT`. An unaligned write is a read-modify-write of the aligned
    /// range around it, holding the stripe locks of its partial edge units so that two such
    /// writes into one unit (disjoint bytes) never undo each other.
    async fn write(&self, off: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        let len = crate::device::iov_len(bufs);
        if len == 0 {
            return Ok(());
        }
        if self.aligned(off, bufs) {
            return self.transfer(Iovecs::for_write(bufs), off).await;
        }
        let a = self.offset_align;
        let (start, wide) = self.widen(off, len);
        let end = start + wide;
        let head_partial = off % a != 0;
        let tail_partial = (off + len) % a != 0;
        // Stripes of the partial edge units, in order and once each (no lock-order cycles).
        let mut stripes: Vec<usize> = [
            head_partial.then_some(start / a),
            tail_partial.then_some(end / a - 1),
        ]
        .into_iter()
        .flatten()
        .map(|unit| (unit % RMW_STRIPES as u64) as usize)
        .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let mut held = Vec::with_capacity(stripes.len());
        for s in stripes {
            held.push(self.rmw[s].lock().await);
        }
        let mut bounce = AlignedBuf::zeroed(wide as usize);
        let au = a as usize;
        if head_partial {
            self.transfer(
                Iovecs::for_read(&mut [IoSliceMut::new(&mut bounce[..au])]),
                start,
            )
            .await?;
        }
        if tail_partial && (!head_partial || wide > a) {
            let t = wide as usize - au;
            self.transfer(
                Iovecs::for_read(&mut [IoSliceMut::new(&mut bounce[t..])]),
                end - a,
            )
            .await?;
        }
        let mut at = (off - start) as usize;
        for b in bufs {
            bounce[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        }
        let r = self
            .transfer(Iovecs::for_write(&[IoSlice::new(&bounce)]), start)
            .await;
        drop(held);
        r
    }
}

/// Stripe locks of unaligned direct writes (by alignment unit).
const RMW_STRIPES: usize = 64;

/// The open data file and its engine state.
pub(crate) struct RealFile {
    file: Arc<File>,
    kind: StorageKind,
    /// Cleared the first time the kernel answers `EOPNOTSUPP` to an `RWF_NOWAIT` read, so we
    /// stop trying.
    nowait_reads: AtomicBool,
    /// Set in [`CacheMode::Direct`].
    direct: Option<DirectIo>,
    /// Buffered writes waiting for, or running on, the file's writer threads.
    writes: Arc<WriteQueue>,
    /// No byte at or past this offset holds data (regular files): found when the file is
    /// opened ([`data_end`]) and raised before every write into the file. A hole check past
    /// it needs no `SEEK_DATA`, which matters because `SEEK_DATA` waits for ext4's inode lock,
    /// held by every buffered write in flight, and the volume layer checks fresh blocks for
    /// holes under the pool's lock. Never lowered (a punched range below it is still seen by
    /// `SEEK_DATA`).
    data_end: AtomicU64,
    /// Whether `FICLONERANGE` may work here: set for regular files, cleared the first time the
    /// file system refuses it (ext4 has no shared extents; XFS with reflink and btrfs do).
    reflink: AtomicBool,
    /// Set once the copy-on-write extent size hint has been tried ([`RealFile::clone_and_write`]).
    cow_hint_set: AtomicBool,
}

fn fd_of(f: &File) -> i32 {
    f.as_raw_fd()
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

impl RealFile {
    /// Opens the file; in [`CacheMode::Direct`] also a second, `O_DIRECT` descriptor that
    /// carries every transfer (an alignment above `block_size` disables it).
    pub(crate) fn open(
        path: &Path,
        create: bool,
        cache: CacheMode,
        block_size: u32,
    ) -> io::Result<RealFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(create)
            .truncate(false)
            .open(path)
            .map_err(|e| io::Error::new(e.kind(), format!("data file {}: {e}", path.display())))?;
        let kind = if file.metadata()?.file_type().is_block_device() {
            StorageKind::BlockDevice
        } else {
            StorageKind::RegularFile
        };
        let direct = match cache {
            CacheMode::Writeback => None,
            CacheMode::Direct => open_direct(path, block_size)?,
        };
        let end = match kind {
            StorageKind::RegularFile => data_end(&file, file.metadata()?.len()).map_err(|e| {
                io::Error::new(e.kind(), format!("data file {}: {e}", path.display()))
            })?,
            StorageKind::BlockDevice => u64::MAX,
        };
        Ok(RealFile {
            file: Arc::new(file),
            kind,
            nowait_reads: AtomicBool::new(true),
            direct,
            writes: Arc::default(),
            data_end: AtomicU64::new(end),
            reflink: AtomicBool::new(kind == StorageKind::RegularFile),
            cow_hint_set: AtomicBool::new(false),
        })
    }

    /// The cache mode in effect (Direct may have fallen back to Writeback).
    pub(crate) fn cache_mode(&self) -> CacheMode {
        if self.direct.is_some() {
            CacheMode::Direct
        } else {
            CacheMode::Writeback
        }
    }

    pub(crate) fn kind(&self) -> StorageKind {
        self.kind
    }

    pub(crate) fn len(&self) -> io::Result<u64> {
        match self.kind {
            StorageKind::RegularFile => Ok(self.file.metadata()?.len()),
            StorageKind::BlockDevice => {
                let mut size: u64 = 0;
                // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which points to
                // `size` on our stack.
                cvt(unsafe { libc::ioctl(fd_of(&self.file), BLKGETSIZE64, &mut size) })?;
                Ok(size)
            }
        }
    }

    /// Makes the file at least `len` bytes long (regular files); a block device must already be
    /// that large.
    pub(crate) fn grow_to(&self, len: u64) -> io::Result<()> {
        let cur = self.len()?;
        if cur >= len {
            return Ok(());
        }
        match self.kind {
            StorageKind::RegularFile => self.file.set_len(len),
            StorageKind::BlockDevice => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("the data device has {cur} bytes, {len} are needed"),
            )),
        }
    }

    pub(crate) async fn read(&self, off: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if let Some(d) = &self.direct {
            return d.read(off, bufs).await;
        }
        let mut iov = Iovecs::for_read(bufs);
        let mut off = off;
        if self.nowait_reads.load(Ordering::Relaxed) {
            // Served from the page cache without blocking: the common case for hot data, and
            // the cheapest one (no thread hop).
            match iov.transfer_nowait(fd_of(&self.file), off) {
                Ok(n) => off += n as u64,
                Err(e) if e.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                    self.nowait_reads.store(false, Ordering::Relaxed);
                }
                Err(e) => return Err(e),
            }
            if iov.remaining() == 0 {
                return Ok(());
            }
        }
        offload(&self.file, iov, off).await
    }

    pub(crate) async fn write(&self, off: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        self.note_data(off, crate::device::iov_len(bufs));
        if let Some(d) = &self.direct {
            return d.write(off, bufs).await;
        }
        // Buffered writes may block on writeback or on the file system's journal, and ext4
        // refuses RWF_NOWAIT for buffered writes (EOPNOTSUPP), so they go to the pool, queued
        // for the file's writer threads (`WriteQueue`).
        self.writes
            .offload(&self.file, Iovecs::for_write(bufs), off)
            .await
    }

    pub(crate) async fn sync(&self) -> io::Result<()> {
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || file.sync_data())
            .await
            .map_err(|e| io::Error::other(format!("data file sync thread failed: {e}")))?
    }

    pub(crate) fn sync_blocking(&self) -> io::Result<()> {
        self.file.sync_data()
    }

    /// Copies `len` bytes from `src` to `dst` inside the file (copy-on-write of a block).
    pub(crate) async fn copy_range(&self, src: u64, dst: u64, len: u64) -> io::Result<()> {
        self.note_data(dst, len);
        if let Some(d) = &self.direct {
            // Through a bounce buffer: copy_file_range would go through the page cache.
            let mut buf = AlignedBuf::zeroed(len as usize);
            d.read(src, &mut [IoSliceMut::new(&mut buf)]).await?;
            return d.write(dst, &[IoSlice::new(&buf)]).await;
        }
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || copy_in_file(&file, src, dst, len))
            .await
            .map_err(|e| io::Error::other(format!("data file copy thread failed: {e}")))?
    }

    /// Makes `[dst, dst + len)` share `[src, src + len)`'s storage (`FICLONERANGE`: no data
    /// is copied), then writes `bufs` at `at` (inside the clone): the two steps of a
    /// copy-on-write where the file system shares extents, run as one job on the file's
    /// writer threads, so that they cost one hand-over to another thread instead of two (a
    /// profile of copy-on-write on XFS spent about a third of its time handing clones and
    /// writes to threads and back, docs/volume.md). `Ok(false)`, with nothing written, where
    /// the file system cannot clone; the first refusal switches cloning off for the file.
    ///
    /// Before the first clone, the file's copy-on-write extent size hint is set to one
    /// file-system block, where the file system has one (XFS): by default XFS gives a write
    /// into a shared extent a 128 KiB staging extent, whose unused rest stays allocated (in
    /// `st_blocks`, `du`) until XFS's background reclaim, every 5 minutes by default.
    pub(crate) async fn clone_and_write(
        &self,
        src: u64,
        dst: u64,
        len: u64,
        at: u64,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<bool> {
        /// What the job did.
        enum Cloned {
            /// Cloned, and the buffered write (if any) done.
            Yes,
            /// The file system refused the clone: nothing changed.
            Refused(io::Error),
        }
        if !self.reflink.load(Ordering::Acquire) {
            return Ok(false);
        }
        self.note_data(dst, len);
        let file = self.file.clone();
        let hinted = self.cow_hint_set.swap(true, Ordering::AcqRel);
        // In direct mode the write goes by the O_DIRECT path (io_uring) once the clone is
        // done: a blocking O_DIRECT write in the job would keep the writer thread for the
        // device's whole latency, and measured slower (docs/volume.md).
        let iov = match self.direct {
            Some(_) => Iovecs::for_write(&[]),
            None => Iovecs::for_write(bufs),
        };
        let done = self
            .writes
            .offload_with(iov, move |iov| {
                if !hinted {
                    set_cow_extent_hint(&file);
                }
                match clone_in_file(&file, src, dst, len) {
                    Ok(()) => iov.transfer_all(fd_of(&file), at).map(|()| Cloned::Yes),
                    Err(e)
                        if matches!(
                            e.raw_os_error(),
                            Some(libc::EOPNOTSUPP | libc::ENOTTY | libc::EXDEV | libc::EINVAL)
                        ) =>
                    {
                        Ok(Cloned::Refused(e))
                    }
                    Err(e) => Err(e),
                }
            })
            .await?;
        match done {
            Cloned::Refused(e) => {
                tracing::debug!("data file: no shared extents here ({e}); copies are copies");
                self.reflink.store(false, Ordering::Release);
                Ok(false)
            }
            Cloned::Yes => {
                if let Some(d) = &self.direct {
                    d.write(at, bufs).await?;
                }
                Ok(true)
            }
        }
    }

    /// Makes `[off, off + len)` read as zeros and gives its space back where the storage can.
    pub(crate) async fn zero_out(&self, off: u64, len: u64) -> io::Result<()> {
        let file = self.file.clone();
        let kind = self.kind;
        tokio::task::spawn_blocking(move || zero_out_sync(&file, kind, off, len))
            .await
            .map_err(|e| io::Error::other(format!("data file punch thread failed: {e}")))?
    }

    /// True when no byte of `[off, off + len)` is backed by data (a hole). Always false on a
    /// block device, where holes cannot be seen.
    pub(crate) fn is_hole(&self, off: u64, len: u64) -> io::Result<bool> {
        Ok(self.hole_len(off, len)? >= len)
    }

    /// How many bytes from `off` on (at most `max`) are a hole: one `SEEK_DATA`, none past the
    /// end of the data. Always 0 on a block device, where holes cannot be seen.
    pub(crate) fn hole_len(&self, off: u64, max: u64) -> io::Result<u64> {
        if self.kind == StorageKind::BlockDevice {
            return Ok(0);
        }
        if off >= self.data_end.load(Ordering::Acquire) {
            return Ok(max);
        }
        Ok(match seek_data(&self.file, off)? {
            Some(at) => at.saturating_sub(off).min(max),
            None => max,
        })
    }

    /// Raises the end of the data to cover `len` bytes at `off`, before they are written (a
    /// hole check of a range being written is not meaningful anyway: the volume layer checks
    /// only blocks it holds reserved, which nobody writes).
    fn note_data(&self, off: u64, len: u64) {
        if len > 0 {
            self.data_end
                .fetch_max(off.saturating_add(len), Ordering::AcqRel);
        }
    }

    /// Bytes of storage the file occupies (st_blocks × 512); for block devices, their size.
    pub(crate) fn allocated_bytes(&self) -> io::Result<u64> {
        match self.kind {
            StorageKind::RegularFile => Ok(self.file.metadata()?.blocks() * 512),
            StorageKind::BlockDevice => self.len(),
        }
    }
}

/// The `O_DIRECT` descriptor of `path` and its alignment, or `None` (with a warning) where the
/// storage refuses direct I/O.
fn open_direct(path: &Path, block_size: u32) -> io::Result<Option<DirectIo>> {
    use std::os::unix::fs::OpenOptionsExt;
    let direct = match OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
            tracing::warn!(
                path = %path.display(),
                "the data file's storage refuses O_DIRECT: serving with --cache writeback"
            );
            return Ok(None);
        }
        Err(e) => {
            return Err(io::Error::new(
                e.kind(),
                format!("data file {} (O_DIRECT): {e}", path.display()),
            ));
        }
    };
    let (mem_align, offset_align) = dio_alignment(&direct).unwrap_or((4096, 4096));
    if !(offset_align.is_power_of_two()
        && offset_align <= u64::from(block_size)
        && mem_align <= BUF_ALIGN)
    {
        tracing::warn!(
            offset_align,
            mem_align,
            "direct I/O alignment larger than a data block or a page: serving with --cache writeback"
        );
        return Ok(None);
    }
    let ring = match Ring::new() {
        Ok(r) => Some(r),
        Err(e) => {
            tracing::warn!("io_uring unavailable ({e}): direct I/O from the thread pool");
            None
        }
    };
    Ok(Some(DirectIo {
        file: Arc::new(direct),
        mem_align: mem_align.max(1),
        offset_align,
        ring,
        rmw: (0..RMW_STRIPES)
            .map(|_| tokio::sync::Mutex::new(()))
            .collect(),
    }))
}

/// `(memory, offset)` alignment that direct I/O on `file` needs, from `statx(STATX_DIOALIGN)`;
/// `None` when the kernel or file system does not say.
fn dio_alignment(file: &File) -> Option<(usize, u64)> {
    // SAFETY: statx is plain data; all-zero is a valid value.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: the path is a valid NUL-terminated empty string, AT_EMPTY_PATH makes statx use
    // the descriptor, and stx is a valid statx buffer on our stack.
    let r = unsafe {
        libc::statx(
            fd_of(file),
            c"".as_ptr(),
            libc::AT_EMPTY_PATH,
            libc::STATX_DIOALIGN,
            &mut stx,
        )
    };
    if r != 0 || stx.stx_mask & libc::STATX_DIOALIGN == 0 || stx.stx_dio_offset_align == 0 {
        return None;
    }
    Some((
        stx.stx_dio_mem_align as usize,
        u64::from(stx.stx_dio_offset_align),
    ))
}

/// `_IOR('X', 31, struct fsxattr)`.
const FS_IOC_FSGETXATTR: libc::c_ulong = 0x801c_581f;
/// `_IOW('X', 32, struct fsxattr)`.
const FS_IOC_FSSETXATTR: libc::c_ulong = 0x401c_5820;
/// `fsx_cowextsize` is in effect.
const FS_XFLAG_COWEXTSIZE: u32 = 0x0001_0000;

/// `struct fsxattr` of `linux/fs.h`.
#[repr(C)]
#[derive(Default)]
struct FsXattr {
    xflags: u32,
    extsize: u32,
    nextents: u32,
    projid: u32,
    cowextsize: u32,
    pad: [u8; 8],
}

/// Sets `file`'s copy-on-write extent size hint to one file-system block
/// (`FS_IOC_FSSETXATTR` with `FS_XFLAG_COWEXTSIZE`), where the file system has such a hint.
/// Only a hint: a failure is logged and changes nothing else.
fn set_cow_extent_hint(file: &File) {
    let mut x = match fs_xattr(file) {
        Ok(x) => x,
        Err(e) => {
            tracing::debug!("data file: no extent size hints: {e}");
            return;
        }
    };
    let Some(bsize) = fs_block_size(file) else {
        return;
    };
    x.xflags |= FS_XFLAG_COWEXTSIZE;
    x.cowextsize = bsize;
    // SAFETY: `x` is a live `struct fsxattr` that the kernel only reads.
    if unsafe { libc::ioctl(fd_of(file), FS_IOC_FSSETXATTR, &x) } != 0 {
        tracing::debug!(
            "data file: cannot set the copy-on-write extent size hint: {}",
            io::Error::last_os_error()
        );
    }
}

/// `file`'s `struct fsxattr` (`FS_IOC_FSGETXATTR`).
fn fs_xattr(file: &File) -> io::Result<FsXattr> {
    let mut x = FsXattr::default();
    // SAFETY: `x` is a live `struct fsxattr` that the kernel fills in.
    if unsafe { libc::ioctl(fd_of(file), FS_IOC_FSGETXATTR, &mut x) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(x)
}

/// The block size of `file`'s file system (`fstatvfs`), if it says one that fits the hint.
fn fs_block_size(file: &File) -> Option<u32> {
    // SAFETY: an all-zero `struct statvfs` is valid.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a live `struct statvfs` that the kernel fills in; the descriptor is open.
    if unsafe { libc::fstatvfs(fd_of(file), &mut st) } != 0 {
        return None;
    }
    u32::try_from(st.f_bsize).ok().filter(|&b| b != 0)
}

/// `ioctl(FICLONERANGE)` within one file.
fn clone_in_file(file: &File, src: u64, dst: u64, len: u64) -> io::Result<()> {
    /// `_IOW(0x94, 13, struct file_clone_range)`.
    const FICLONERANGE: libc::c_ulong = 0x4020_940d;
    /// `struct file_clone_range` of `linux/fs.h`.
    #[repr(C)]
    struct FileCloneRange {
        src_fd: i64,
        src_offset: u64,
        src_length: u64,
        dest_offset: u64,
    }
    let arg = FileCloneRange {
        src_fd: i64::from(fd_of(file)),
        src_offset: src,
        src_length: len,
        dest_offset: dst,
    };
    loop {
        // SAFETY: `arg` is a live `struct file_clone_range` that the kernel only reads.
        let r = unsafe { libc::ioctl(fd_of(file), FICLONERANGE, &arg) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINTR) {
            return Err(e);
        }
    }
}

/// copy_file_range inside one file, finishing short copies; falls back to read + write where
/// the kernel refuses (EXDEV, EINVAL, EOPNOTSUPP on some file systems and devices).
fn copy_in_file(file: &File, src: u64, dst: u64, len: u64) -> io::Result<()> {
    let fd = fd_of(file);
    let mut done = 0u64;
    while done < len {
        let mut off_in = (src + done) as libc::loff_t;
        let mut off_out = (dst + done) as libc::loff_t;
        // SAFETY: the two offset pointers point to locals on our stack; the kernel updates them.
        let n = unsafe {
            libc::copy_file_range(fd, &mut off_in, fd, &mut off_out, (len - done) as usize, 0)
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EXDEV | libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS) => {
                    return copy_by_buffer(file, src + done, dst + done, len - done);
                }
                _ => return Err(e),
            }
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("data file ends at byte {}, inside a data block", src + done),
            ));
        }
        done += n as u64;
    }
    Ok(())
}

fn copy_by_buffer(file: &File, src: u64, dst: u64, len: u64) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len.min(1 << 20) as usize];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], src + done)?;
        file.write_all_at(&buf[..n], dst + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Where the first data at or after `off` starts (`SEEK_DATA`), or `None` when there is none.
fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    let start = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: lseek takes no pointers. The file position it moves is not used by anything:
    // every transfer is positional.
    let r = unsafe { libc::lseek(fd_of(file), start, libc::SEEK_DATA) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENXIO) => Ok(None),
        _ => Err(e),
    }
}

/// The offset past the last data in the first `len` bytes of `file` (a multiple of 4 KiB, or
/// `len`): a binary search with `SEEK_DATA`, about 20 calls for a file of terabytes, so that
/// opening a pool reads nothing of its data file.
fn data_end(file: &File, len: u64) -> io::Result<u64> {
    const GRAIN: u64 = 4096;
    // The answer, in grains, lies in [lo, hi]: data exists at or after grain lo − 1 (or lo is
    // 0), none at or after grain hi.
    let (mut lo, mut hi) = (0, len.div_ceil(GRAIN));
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        match seek_data(file, mid * GRAIN)? {
            Some(d) => lo = (d / GRAIN + 1).max(mid + 1).min(hi),
            None => hi = mid,
        }
    }
    Ok((lo * GRAIN).min(len))
}

fn zero_out_sync(file: &File, kind: StorageKind, off: u64, len: u64) -> io::Result<()> {
    let fd = fd_of(file);
    match kind {
        StorageKind::RegularFile => {
            // SAFETY: fallocate takes no pointers.
            cvt(unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            })?;
        }
        StorageKind::BlockDevice => {
            let range: [u64; 2] = [off, len];
            // SAFETY: BLKZEROOUT reads two u64 (start, length) through the pointer, which
            // points to `range` on our stack.
            cvt(unsafe { libc::ioctl(fd, BLKZEROOUT, range.as_ptr()) })?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::{disk_tempdir, rt, test_dir};

    /// Whether `file` is on XFS (`statfs`'s `f_type` is `XFS_SUPER_MAGIC`).
    fn on_xfs(file: &File) -> bool {
        const XFS_SUPER_MAGIC: u64 = 0x5846_5342;
        // SAFETY: an all-zero `struct statfs` is valid.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        // SAFETY: `st` is a live `struct statfs` that the kernel fills in; the descriptor is
        // open.
        let r = unsafe { libc::fstatfs(fd_of(file), &mut st) };
        // `f_type` is a signed word of the platform's own width; the magic fits either way.
        r == 0 && st.f_type as u64 == XFS_SUPER_MAGIC
    }

    /// Where a clone works on XFS, the file's copy-on-write extent size hint is one
    /// file-system block afterwards (else XFS stages 128 KiB per write into a shared extent).
    /// Other file systems with clones (btrfs) have no such hint: there the clone must simply
    /// work.
    #[test]
    fn clones_set_a_one_block_cow_extent_hint() {
        const BS: u64 = 64 * 1024;
        let dir = test_dir();
        let path = dir.path().join("d");
        let f = RealFile::open(&path, true, CacheMode::Writeback, BS as u32).unwrap();
        f.file.set_len(4 * BS).unwrap();
        let shared = rt().block_on(async {
            f.write(0, &[IoSlice::new(&[7u8; BS as usize])])
                .await
                .unwrap();
            f.clone_and_write(0, 2 * BS, BS, 2 * BS, &[]).await.unwrap()
        });
        if std::env::var_os("UTHIN_TEST_EXPECT_CLONES").is_some() {
            assert!(shared, "no shared extents here");
        }
        if !shared || !on_xfs(&f.file) {
            return;
        }
        let x = fs_xattr(&f.file).unwrap();
        assert_ne!(
            x.xflags & FS_XFLAG_COWEXTSIZE,
            0,
            "no copy-on-write extent size hint"
        );
        assert_eq!(Some(x.cowextsize), fs_block_size(&f.file));
    }

    /// The end of the data is found on open and raised by writes; hole checks past it make no
    /// system call and still see data written later.
    #[test]
    fn data_end_found_on_open_and_raised_by_writes() {
        use std::os::unix::fs::FileExt;
        const MIB: u64 = 1 << 20;
        let dir = disk_tempdir();
        let path = dir.path().join("d");
        let f = File::create(&path).unwrap();
        assert_eq!(data_end(&f, 0).unwrap(), 0);
        f.set_len(64 * MIB).unwrap();
        assert_eq!(data_end(&f, 64 * MIB).unwrap(), 0);
        f.write_all_at(&[1u8; 100], MIB + 512).unwrap();
        f.write_all_at(&[1u8; 4096], 10 * MIB).unwrap();
        f.sync_all().unwrap();
        assert_eq!(data_end(&f, 64 * MIB).unwrap(), 10 * MIB + 4096);
        // Data up to the last byte of a file whose length is not a multiple of 4 KiB.
        let g = File::create(dir.path().join("g")).unwrap();
        g.write_all_at(&[1u8; 5000], 0).unwrap();
        assert_eq!(data_end(&g, 5000).unwrap(), 5000);
        drop((f, g));

        // Each mode writes 20 MiB past the data the last one left.
        for (cache, end) in [
            (CacheMode::Writeback, 10 * MIB),
            (CacheMode::Direct, 30 * MIB),
        ] {
            let rf = RealFile::open(&path, false, cache, 65536).unwrap();
            assert_eq!(rf.data_end.load(Ordering::SeqCst), end + 4096);
            assert_eq!(rf.hole_len(end + MIB, MIB).unwrap(), MIB);
            assert_eq!(rf.hole_len(2 * MIB, MIB).unwrap(), MIB);
            assert_eq!(rf.hole_len(MIB, MIB).unwrap(), 0);
            let at = end + 20 * MIB;
            let mut buf = AlignedBuf::zeroed(4096);
            buf.fill(9);
            rt().block_on(rf.write(at, &[IoSlice::new(&buf)])).unwrap();
            assert_eq!(rf.hole_len(end + MIB, 64 * MIB).unwrap(), 19 * MIB);
            assert!(!rf.is_hole(at, 65536).unwrap());
        }
    }

    /// Direct transfers where the kernel refuses io_uring: the thread pool carries them.
    #[test]
    fn direct_io_without_a_ring_uses_the_thread_pool() {
        let dir = disk_tempdir();
        let mut f = RealFile::open(&dir.path().join("d"), true, CacheMode::Direct, 65536).unwrap();
        f.grow_to(1 << 20).unwrap();
        let d = f.direct.as_mut().expect("O_DIRECT storage");
        d.ring = None;
        rt().block_on(async {
            let mut a = AlignedBuf::zeroed(8192);
            a.fill(7);
            f.write(4096, &[IoSlice::new(&a)]).await.unwrap();
            f.write(5000, &[IoSlice::new(&[9u8; 3])]).await.unwrap();
            let mut b = AlignedBuf::zeroed(16384);
            f.read(0, &mut [IoSliceMut::new(&mut b)]).await.unwrap();
            assert!(b[..4096].iter().all(|&x| x == 0));
            assert!(b[4096..5000].iter().all(|&x| x == 7));
            assert_eq!(&b[5000..5003], &[9, 9, 9]);
            assert!(b[5003..12288].iter().all(|&x| x == 7));
            assert!(b[12288..].iter().all(|&x| x == 0));
        });
    }
}
