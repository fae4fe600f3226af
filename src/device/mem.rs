//! [`MemDevice`]: a sparse in-memory [`BlockDevice`], the reference the servers' protocol tests
//! run against. It has the same semantics as a thin volume (holes read as zeros, discard
//! deallocates whole blocks) without a pool, so protocol code can be tested on its own.

use std::collections::BTreeMap;
use std::io::{IoSlice, IoSliceMut};

use parking_lot::Mutex;

use super::{BlockDevice, DevError, DevResult, DeviceInfo, Extent, check_range, iov_len};

/// A sparse in-memory block device with allocation blocks of `block_size` bytes.
pub struct MemDevice {
    info: DeviceInfo,
    blocks: Mutex<BTreeMap<u64, Box<[u8]>>>,
}

impl MemDevice {
    /// A device of `size` bytes, all holes. `block_size` must be a power of two.
    pub fn new(size: u64, block_size: u32, read_only: bool) -> Self {
        assert!(
            block_size.is_power_of_two(),
            "block size must be a power of two"
        );
        MemDevice {
            info: DeviceInfo {
                size,
                read_only,
                block_size,
            },
            blocks: Mutex::new(BTreeMap::new()),
        }
    }

    /// Number of allocated blocks (for tests of discard).
    pub fn allocated_blocks(&self) -> usize {
        self.blocks.lock().len()
    }

    fn bs(&self) -> u64 {
        u64::from(self.info.block_size)
    }

    fn writable(&self, offset: u64, len: u64) -> DevResult<()> {
        check_range(offset, len, self.info.size)?;
        if self.info.read_only {
            return Err(DevError::ReadOnly);
        }
        Ok(())
    }

    /// Calls `f(block, offset_in_block, chunk_len, pos_in_request)` for each block piece of the
    /// range.
    fn for_each_piece(&self, offset: u64, len: u64, mut f: impl FnMut(u64, usize, usize, usize)) {
        let bs = self.bs();
        let mut pos = 0u64;
        while pos < len {
            let at = offset + pos;
            let in_block = at % bs;
            let n = (bs - in_block).min(len - pos);
            f(at / bs, in_block as usize, n as usize, pos as usize);
            pos += n;
        }
    }

    fn zero_range(&self, offset: u64, len: u64, unmap: bool) {
        let bs = self.bs() as usize;
        let mut blocks = self.blocks.lock();
        self.for_each_piece(offset, len, |b, at, n, _| {
            if unmap && n == bs {
                blocks.remove(&b);
            } else if !unmap {
                let blk = blocks
                    .entry(b)
                    .or_insert_with(|| vec![0; bs].into_boxed_slice());
                blk[at..at + n].fill(0);
            } else if let Some(blk) = blocks.get_mut(&b) {
                blk[at..at + n].fill(0);
            }
        });
    }
}

impl BlockDevice for MemDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        check_range(offset, iov_len(bufs), self.info.size)?;
        // Straight from the blocks into the caller's buffers: no staging copy, so protocol
        // benchmarks on MemDevice measure the protocol rather than this model.
        let blocks = self.blocks.lock();
        let mut at = offset;
        for buf in bufs.iter_mut() {
            let len = buf.len() as u64;
            self.for_each_piece(at, len, |b, in_block, n, pos| {
                let dst = &mut buf[pos..pos + n];
                match blocks.get(&b) {
                    Some(blk) => dst.copy_from_slice(&blk[in_block..in_block + n]),
                    None => dst.fill(0),
                }
            });
            at += len;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, bufs: &[IoSlice<'_>], _fua: bool) -> DevResult<()> {
        self.writable(offset, iov_len(bufs))?;
        let bs = self.bs() as usize;
        let mut blocks = self.blocks.lock();
        let mut at = offset;
        for buf in bufs {
            let len = buf.len() as u64;
            self.for_each_piece(at, len, |b, in_block, n, pos| {
                let blk = blocks
                    .entry(b)
                    .or_insert_with(|| vec![0; bs].into_boxed_slice());
                blk[in_block..in_block + n].copy_from_slice(&buf[pos..pos + n]);
            });
            at += len;
        }
        Ok(())
    }

    async fn flush(&self) -> DevResult<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.writable(offset, len)?;
        self.zero_range(offset, len, true);
        Ok(())
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
        self.zero_range(offset, len, may_unmap);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.info.size)?;
        let blocks = self.blocks.lock();
        let mut out: Vec<Extent> = Vec::new();
        self.for_each_piece(offset, len, |b, _, n, _| {
            let allocated = blocks.contains_key(&b);
            let ext = Extent {
                len: n as u64,
                allocated,
                zero: !allocated,
            };
            match out.last_mut() {
                Some(last) if last.allocated == ext.allocated && last.zero == ext.zero => {
                    last.len += ext.len
                }
                _ => out.push(ext),
            }
        });
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    #[test]
    fn holes_read_zero_and_discard_frees() {
        let dev = MemDevice::new(1 << 20, 65536, false);
        block_on(async {
            let data = vec![7u8; 1000];
            dev.write(65000, &[IoSlice::new(&data)], false)
                .await
                .unwrap();
            assert_eq!(dev.allocated_blocks(), 2);
            let mut out = vec![1u8; 2000];
            dev.read(64500, &mut [IoSliceMut::new(&mut out)])
                .await
                .unwrap();
            assert!(out[..500].iter().all(|&b| b == 0));
            assert!(out[500..1500].iter().all(|&b| b == 7));
            assert!(out[1500..].iter().all(|&b| b == 0));
            dev.discard(0, 1 << 20).await.unwrap();
            assert_eq!(dev.allocated_blocks(), 0);
            let st = dev.block_status(0, 1 << 20).await.unwrap();
            assert_eq!(
                st,
                vec![Extent {
                    len: 1 << 20,
                    allocated: false,
                    zero: true
                }]
            );
        });
    }

    #[test]
    fn out_of_range_and_read_only_are_refused() {
        let dev = MemDevice::new(4096, 4096, true);
        block_on(async {
            let mut b = [0u8; 512];
            let err = dev
                .read(4000, &mut [IoSliceMut::new(&mut b)])
                .await
                .unwrap_err();
            assert!(matches!(err, DevError::OutOfRange { .. }));
            let err = dev.write(0, &[IoSlice::new(&b)], false).await.unwrap_err();
            assert!(matches!(err, DevError::ReadOnly));
            assert_eq!(err.errno(), libc::EPERM);
        });
    }
}
