//! The real data file: a regular file or a block device, read and written with positional
//! vectored syscalls. See docs/io-engines.md for why this engine (reads inline with
//! `RWF_NOWAIT`, everything that may block on tokio's blocking pool) won on this machine.

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use super::iov::{Iovecs, offload};

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

/// The open data file and its engine state.
pub(crate) struct RealFile {
    file: Arc<File>,
    kind: StorageKind,
    /// Cleared the first time the kernel answers `EOPNOTSUPP` to an `RWF_NOWAIT` read, so we
    /// stop trying.
    nowait_reads: AtomicBool,
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
    pub(crate) fn open(path: &Path, create: bool) -> io::Result<RealFile> {
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
        Ok(RealFile {
            file: Arc::new(file),
            kind,
            nowait_reads: AtomicBool::new(true),
        })
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
        // Buffered writes may block on writeback or on the file system's journal, and ext4
        // refuses RWF_NOWAIT for buffered writes (EOPNOTSUPP), so they go to the pool.
        offload(&self.file, Iovecs::for_write(bufs), off).await
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
        let file = self.file.clone();
        tokio::task::spawn_blocking(move || copy_in_file(&file, src, dst, len))
            .await
            .map_err(|e| io::Error::other(format!("data file copy thread failed: {e}")))?
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

    /// How many bytes from `off` on (at most `max`) are a hole: one `SEEK_DATA`. Always 0 on a
    /// block device, where holes cannot be seen.
    pub(crate) fn hole_len(&self, off: u64, max: u64) -> io::Result<u64> {
        if self.kind == StorageKind::BlockDevice {
            return Ok(0);
        }
        let start = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: lseek takes no pointers. The file position it moves is not used by anything:
        // every transfer is positional.
        let r = unsafe { libc::lseek(fd_of(&self.file), start, libc::SEEK_DATA) };
        if r < 0 {
            let e = io::Error::last_os_error();
            // ENXIO: no data at or after `off`.
            return if e.raw_os_error() == Some(libc::ENXIO) {
                Ok(max)
            } else {
                Err(e)
            };
        }
        Ok((r as u64).saturating_sub(off).min(max))
    }

    /// Bytes of storage the file occupies (st_blocks × 512); for block devices, their size.
    pub(crate) fn allocated_bytes(&self) -> io::Result<u64> {
        match self.kind {
            StorageKind::RegularFile => Ok(self.file.metadata()?.blocks() * 512),
            StorageKind::BlockDevice => self.len(),
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
