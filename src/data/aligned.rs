//! Page-aligned byte buffers.
//!
//! Direct I/O (`O_DIRECT`) needs buffers whose address is a multiple of the storage's memory
//! alignment (at most a page on Linux). `Vec<u8>` gives no such guarantee (a large `malloc` is
//! an `mmap` with a 16-byte header in front), so buffers that may reach the data file directly
//! — NBD payloads, copy-on-write bounces — are [`AlignedBuf`]s.

use std::alloc::{self, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`AlignedBuf`]: one page, enough for any direct I/O on Linux.
pub const BUF_ALIGN: usize = 4096;

/// A zero-initialised, page-aligned, fixed-length byte buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: an AlignedBuf owns its allocation exclusively, like a Box<[u8]>; the raw pointer is
// only ever used through &self / &mut self.
unsafe impl Send for AlignedBuf {}
// SAFETY: shared access only hands out &[u8], like Box<[u8]>.
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A buffer of `len` zero bytes starting on a page boundary.
    pub fn zeroed(len: usize) -> AlignedBuf {
        if len == 0 {
            // Never dereferenced (len 0); aligned like every other buffer.
            let ptr = std::ptr::without_provenance_mut::<u8>(BUF_ALIGN);
            return AlignedBuf {
                ptr: NonNull::new(ptr).unwrap_or(NonNull::dangling()),
                len: 0,
            };
        }
        let layout = Self::layout(len);
        // SAFETY: the layout has a non-zero size (len > 0 here).
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, len }
    }

    fn layout(len: usize) -> Layout {
        // Only fails when len rounded up to the alignment overflows isize, which no buffer
        // that fits in memory does; treat it like any other failed allocation.
        Layout::from_size_align(len, BUF_ALIGN)
            .unwrap_or_else(|_| alloc::handle_alloc_error(Layout::new::<u8>()))
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr points to len initialised bytes owned by self (or is dangling with
        // len == 0, which from_raw_parts allows).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and &mut self makes the access exclusive.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: allocated in `zeroed` with exactly this layout and not freed before.
            unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout(self.len)) };
        }
    }
}

impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_writable() {
        for len in [0usize, 1, 512, 4096, 65536, (1 << 20) + 3] {
            let mut b = AlignedBuf::zeroed(len);
            assert_eq!(b.len(), len);
            assert_eq!(b.as_ptr() as usize % BUF_ALIGN, 0);
            assert!(b.iter().all(|&x| x == 0));
            if len > 0 {
                b[len - 1] = 7;
                assert_eq!(b[len - 1], 7);
            }
        }
    }
}
