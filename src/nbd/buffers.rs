//! Reusable I/O buffers for read and write payloads.
//!
//! A 1 MiB request buffer from `malloc` is an `mmap` (glibc's threshold), so a fresh buffer
//! per request costs a system call, page faults and zeroing on every request. The pool keeps
//! freed buffers in power-of-two size classes (4 KiB .. 32 MiB) and hands them out again; a
//! buffer returns to the pool when its [`PooledBuf`] is dropped, i.e. once the reply carrying
//! it has been written to the socket. The pool's total size is capped, so idle memory stays
//! bounded whatever the clients do. Buffers are page-aligned ([`AlignedBuf`]), so a write
//! payload can go to the data file with `O_DIRECT` as it is (`uthin serve --cache direct`).
//!
//! A reused buffer holds an earlier request's bytes. That is safe because every user fills the
//! part it sends: a device read fills the whole range or fails (and a failed read sends no
//! data), and a write payload is read in full before the device sees it.

use std::ops::{Deref, DerefMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::Mutex;

use crate::data::AlignedBuf;

/// Smallest size class: 4 KiB.
const MIN_SHIFT: u32 = 12;
/// Largest size class: 32 MiB, the largest request the server accepts.
const MAX_SHIFT: u32 = 25;
const CLASSES: usize = (MAX_SHIFT - MIN_SHIFT + 1) as usize;

/// A capped pool of buffers in power-of-two size classes, shared by all connections.
pub(crate) struct BufferPool {
    classes: [Mutex<Vec<AlignedBuf>>; CLASSES],
    cached_bytes: AtomicUsize,
    max_cached_bytes: usize,
}

impl BufferPool {
    /// A pool that keeps at most `max_cached_bytes` of free buffers.
    pub(crate) fn new(max_cached_bytes: usize) -> Arc<BufferPool> {
        Arc::new(BufferPool {
            classes: std::array::from_fn(|_| Mutex::new(Vec::new())),
            cached_bytes: AtomicUsize::new(0),
            max_cached_bytes,
        })
    }

    /// The size class index for `len` bytes, or `None` above the largest class.
    fn class_of(len: usize) -> Option<usize> {
        let shift = len
            .max(1)
            .next_power_of_two()
            .trailing_zeros()
            .max(MIN_SHIFT);
        (shift <= MAX_SHIFT).then(|| (shift - MIN_SHIFT) as usize)
    }

    /// A buffer of exactly `len` usable bytes (contents unspecified).
    pub(crate) fn take(self: &Arc<Self>, len: usize) -> PooledBuf {
        let data = match Self::class_of(len) {
            Some(class) => {
                let reused = self.classes[class].lock().pop();
                match reused {
                    Some(buf) => {
                        self.cached_bytes.fetch_sub(buf.len(), Ordering::Relaxed);
                        buf
                    }
                    None => AlignedBuf::zeroed(1 << (class as u32 + MIN_SHIFT)),
                }
            }
            None => AlignedBuf::zeroed(len),
        };
        PooledBuf {
            data: Some(data),
            len,
            pool: Arc::clone(self),
        }
    }

    fn give_back(&self, buf: AlignedBuf) {
        let size = buf.len();
        let Some(class) = Self::class_of(size) else {
            return;
        };
        if size != 1 << (class as u32 + MIN_SHIFT) {
            return; // not one of ours
        }
        let cached = self.cached_bytes.fetch_add(size, Ordering::Relaxed);
        if cached + size > self.max_cached_bytes {
            self.cached_bytes.fetch_sub(size, Ordering::Relaxed);
            return;
        }
        self.classes[class].lock().push(buf);
    }

    /// Bytes currently held by free buffers.
    #[cfg(test)]
    pub(crate) fn cached_bytes(&self) -> usize {
        self.cached_bytes.load(Ordering::Relaxed)
    }
}

/// A buffer of `len` bytes borrowed from a [`BufferPool`]; returned to it on drop.
pub(crate) struct PooledBuf {
    /// Always `Some` until dropped.
    data: Option<AlignedBuf>,
    len: usize,
    pool: Arc<BufferPool>,
}

impl Deref for PooledBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match &self.data {
            Some(d) => &d[..self.len],
            None => &[],
        }
    }
}

impl DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        match &mut self.data {
            Some(d) => &mut d[..self.len],
            None => &mut [],
        }
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        if let Some(d) = self.data.take() {
            self.pool.give_back(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_reused_by_size_class() {
        let pool = BufferPool::new(1 << 20);
        let mut a = pool.take(5000);
        assert_eq!(a.len(), 5000);
        a[4999] = 9;
        let ptr = a.as_ptr();
        drop(a);
        assert_eq!(pool.cached_bytes(), 8192);
        let b = pool.take(8192);
        assert_eq!(b.as_ptr(), ptr, "same 8 KiB class");
        assert_eq!(pool.cached_bytes(), 0);
        let c = pool.take(4096);
        assert_ne!(c.as_ptr(), ptr);
    }

    #[test]
    fn the_cache_is_capped() {
        let pool = BufferPool::new(64 << 10);
        let bufs: Vec<_> = (0..8).map(|_| pool.take(16 << 10)).collect();
        drop(bufs);
        assert_eq!(pool.cached_bytes(), 64 << 10);
        // Oversized requests are served but never cached.
        let big = pool.take(64 << 20);
        assert_eq!(big.len(), 64 << 20);
        drop(big);
        assert_eq!(pool.cached_bytes(), 64 << 10);
    }
}
