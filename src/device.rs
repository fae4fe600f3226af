//! The block-device API that every server of uthin uses.
//!
//! NBD and vhost-user-blk are thin translators: they parse a request, validate it once against
//! [`DeviceInfo`], and call one method of [`BlockDevice`]. All block semantics (allocate on demand,
//! copy on write, discard, durability) live behind this trait, in the volume layer. The servers
//! never see the pool's trees.
//!
//! Byte offsets and lengths may have any alignment; a device splits requests that span its
//! internal blocks. A request that reaches outside the device fails with
//! [`DevError::OutOfRange`]; it is never clamped.
//!
//! Buffers are borrowed scatter-gather lists ([`IoSliceMut`] / [`IoSlice`]), so the vhost-user
//! backend can hand guest memory to the device without copying it, and the NBD server its
//! per-request buffer. A future returned by a method borrows those buffers until it completes.

use std::future::Future;
use std::io::{IoSlice, IoSliceMut};

pub mod mem;

/// What a device tells its clients when they connect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceInfo {
    /// Size in bytes.
    pub size: u64,
    /// Writes, discards and write-zeroes are refused with [`DevError::ReadOnly`].
    pub read_only: bool,
    /// The device's allocation unit in bytes (the pool's data block size): the preferred I/O
    /// size and the granularity at which discard gives space back. A power of two.
    pub block_size: u32,
}

/// One run of a block-status answer: `len` bytes with the same state, starting where the
/// previous extent ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    /// Length in bytes (never zero).
    pub len: u64,
    /// False when no storage backs this range (an unprovisioned hole).
    pub allocated: bool,
    /// True when the range is known to read as zeros.
    pub zero: bool,
}

/// Why a device request failed. Servers map these to their protocol's error codes through
/// [`DevError::errno`].
#[derive(Debug, thiserror::Error)]
pub enum DevError {
    /// The byte range `[offset, offset + len)` is not inside a device of `size` bytes.
    #[error("range {offset}+{len} is outside the device ({size} bytes)")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request in bytes.
        len: u64,
        /// Device size in bytes.
        size: u64,
    },
    /// The device is read-only.
    #[error("the device is read-only")]
    ReadOnly,
    /// The pool has no free data (or metadata) blocks left; nothing else changed.
    #[error("no space left in the pool: {0}")]
    NoSpace(String),
    /// `write_zeroes` with `fast_only` could not be done without writing data.
    #[error("zeroing this range is not fast")]
    NotFast,
    /// The device was deleted or the server is shutting down.
    #[error("the device is gone: {0}")]
    Gone(String),
    /// The metadata or data I/O failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl DevError {
    /// The POSIX errno that NBD (and logs) report for this error.
    pub fn errno(&self) -> i32 {
        match self {
            DevError::OutOfRange { .. } => libc::EINVAL,
            DevError::ReadOnly => libc::EPERM,
            DevError::NoSpace(_) => libc::ENOSPC,
            DevError::NotFast => libc::ENOTSUP,
            DevError::Gone(_) => libc::ESHUTDOWN,
            DevError::Io(e) => e.raw_os_error().unwrap_or(libc::EIO),
        }
    }
}

/// Result of a device request.
pub type DevResult<T> = Result<T, DevError>;

/// Checks that `[offset, offset + len)` lies inside a device of `size` bytes.
pub fn check_range(offset: u64, len: u64, size: u64) -> DevResult<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(DevError::OutOfRange { offset, len, size }),
    }
}

/// Total length in bytes of a scatter-gather list.
pub fn iov_len<T: std::ops::Deref<Target = [u8]>>(bufs: &[T]) -> u64 {
    bufs.iter().map(|b| b.len() as u64).sum()
}

/// A virtual block device: one thin volume or snapshot (or, in tests, memory).
///
/// Every method may be called concurrently from many tasks and connections. A successful
/// [`flush`](BlockDevice::flush) makes every write that completed before it was called durable,
/// whichever connection or queue sent it.
pub trait BlockDevice: Send + Sync + 'static {
    /// Size, read-only flag and allocation unit. Cheap; may change after a resize.
    fn info(&self) -> DeviceInfo;

    /// Reads `iov_len(bufs)` bytes at `offset` into `bufs`, in order. Unprovisioned ranges read
    /// as zeros.
    fn read(
        &self,
        offset: u64,
        bufs: &mut [IoSliceMut<'_>],
    ) -> impl Future<Output = DevResult<()>> + Send;

    /// Writes the concatenation of `bufs` at `offset`. With `fua`, the write is durable when the
    /// call returns (as if followed by a flush).
    fn write(
        &self,
        offset: u64,
        bufs: &[IoSlice<'_>],
        fua: bool,
    ) -> impl Future<Output = DevResult<()>> + Send;

    /// Makes every write completed before this call durable.
    fn flush(&self) -> impl Future<Output = DevResult<()>> + Send;

    /// Unmaps `[offset, offset + len)`: the range reads as zeros afterwards. Whole allocation
    /// blocks inside the range give their space back; partial edges are zeroed.
    fn discard(&self, offset: u64, len: u64) -> impl Future<Output = DevResult<()>> + Send;

    /// Makes `[offset, offset + len)` read as zeros. With `may_unmap` the device may deallocate
    /// (like discard); without it, the range stays (or becomes) allocated. With `fast_only`, fails
    /// with [`DevError::NotFast`] instead of writing zeros explicitly.
    fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> impl Future<Output = DevResult<()>> + Send;

    /// Describes `[offset, offset + len)` as consecutive extents covering at least the first
    /// byte and at most the whole range. Extents never extend past the range.
    fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> impl Future<Output = DevResult<Vec<Extent>>> + Send;

    /// Hints that `[offset, offset + len)` will be read soon (NBD_CMD_CACHE). The default only
    /// validates the range.
    fn prefetch(&self, offset: u64, len: u64) -> impl Future<Output = DevResult<()>> + Send {
        let size = self.info().size;
        async move { check_range(offset, len, size) }
    }
}
