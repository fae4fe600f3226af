//! The data file: the pool's data blocks, read and written by byte range inside one block.
//!
//! A [`DataFile`] is either the real file (or block device) of a pool, or, in crash tests, a
//! [`DataModel`] that remembers what was synced and can simulate a power loss. The volume layer
//! uses only this API:
//!
//! - [`read`](DataFile::read) / [`write`](DataFile::write): a byte range that starts inside
//!   one [`DataBlock`] and may run on into the blocks that follow it (the volume layer merges
//!   the pieces of a request that land on consecutive data blocks into one vectored syscall),
//!   into or from the caller's scatter-gather buffers (borrowed, never copied);
//! - [`clone_and_write`](DataFile::clone_and_write): copy-on-write where the file system
//!   shares extents (clone the old block, write what changed, in one job);
//!   [`copy_block`](DataFile::copy_block): a copy of one whole block;
//! - [`sync`](DataFile::sync): the data barrier of a commit (fdatasync);
//! - [`release`](DataFile::release): a freed block gives its space back and reads as zeros
//!   (hole punch on a regular file, BLKZEROOUT on a block device);
//! - [`make_zero`](DataFile::make_zero): before a partial write into a freshly reserved block,
//!   make sure the block reads as zeros. On a regular file that is one `SEEK_DATA` when the
//!   block is already a hole (the usual case: freed blocks are punched), so a partial write
//!   never writes a block of zeros. A block may still hold old data if the process died after
//!   the commit that freed it and before its punch; then it is punched here.
//! - [`grow`](DataFile::grow) and [`allocated_bytes`](DataFile::allocated_bytes).
//!
//! The engine (why reads go inline with `RWF_NOWAIT` and writes to a thread pool) is measured
//! and explained in docs/io-engines.md, as is [`CacheMode::Direct`], where every transfer is
//! `O_DIRECT` through io_uring (`uring.rs`) from page-aligned buffers ([`AlignedBuf`]) or
//! through a bounce buffer. An event-loop thread that polls many transfers (a vhost-user queue
//! thread) can give them a [`ThreadRing`] of its own, which it reaps itself.

mod aligned;
mod file;
mod iov;
pub mod model;
mod uring;

use std::io::{self, IoSlice, IoSliceMut};
use std::path::Path;
use std::sync::Arc;

use crate::units::DataBlock;

pub use aligned::{AlignedBuf, BUF_ALIGN};
pub use file::{CacheMode, StorageKind};
pub use model::{DataModel, PowerLoss};
pub use uring::{Entered, ThreadRing};

use file::RealFile;

enum Backend {
    File(RealFile),
    Model(Arc<DataModel>),
}

/// The pool's data file; see the module docs.
pub struct DataFile {
    block_size: u32,
    backend: Backend,
}

impl DataFile {
    /// Opens (or creates, when `create`) the data file or block device at `path`, holding
    /// blocks of `block_size` bytes (a power of two ≥ 4096), with every transfer through the
    /// page cache.
    pub fn open(path: &Path, block_size: u32, create: bool) -> io::Result<DataFile> {
        Self::open_with(path, block_size, create, CacheMode::Writeback)
    }

    /// [`open`](DataFile::open) with a choice of [`CacheMode`].
    pub fn open_with(
        path: &Path,
        block_size: u32,
        create: bool,
        cache: CacheMode,
    ) -> io::Result<DataFile> {
        check_block_size(block_size)?;
        Ok(DataFile {
            block_size,
            backend: Backend::File(RealFile::open(path, create, cache, block_size)?),
        })
    }

    /// The cache mode in effect ([`CacheMode::Direct`] falls back to
    /// [`CacheMode::Writeback`] where the storage refuses `O_DIRECT`; a model is Writeback).
    pub fn cache_mode(&self) -> CacheMode {
        match &self.backend {
            Backend::File(f) => f.cache_mode(),
            Backend::Model(_) => CacheMode::Writeback,
        }
    }

    /// A data file backed by a [`DataModel`] (crash tests). The model keeps its own block size.
    pub fn from_model(model: Arc<DataModel>) -> DataFile {
        DataFile {
            block_size: model.block_size() as u32,
            backend: Backend::Model(model),
        }
    }

    /// Size of a data block in bytes.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// What backs the data (a model reports itself as a regular file: it has holes).
    pub fn kind(&self) -> StorageKind {
        match &self.backend {
            Backend::File(f) => f.kind(),
            Backend::Model(_) => StorageKind::RegularFile,
        }
    }

    /// Number of whole data blocks the file or device holds now.
    pub fn nr_blocks(&self) -> io::Result<u64> {
        let len = match &self.backend {
            Backend::File(f) => f.len()?,
            Backend::Model(m) => m.len(),
        };
        Ok(len / u64::from(self.block_size))
    }

    /// Makes room for at least `nr_blocks` blocks: a regular file is extended (sparse); a block
    /// device must already be large enough.
    pub fn grow(&self, nr_blocks: u64) -> io::Result<()> {
        let len = nr_blocks
            .checked_mul(u64::from(self.block_size))
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "data size overflows"))?;
        match &self.backend {
            Backend::File(f) => f.grow_to(len),
            Backend::Model(m) => {
                m.grow_to(len);
                Ok(())
            }
        }
    }

    /// Byte offset of byte `offset` of `block`, for a transfer of `len` bytes. `offset` must lie
    /// inside the block; the transfer may continue into the following blocks, but not past
    /// the largest file offset.
    fn byte_offset(&self, block: DataBlock, offset: u32, len: u64) -> io::Result<u64> {
        let bs = u64::from(self.block_size);
        if u64::from(offset) >= bs {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("offset {offset} is not inside {block} of {bs} bytes"),
            ));
        }
        block
            .0
            .checked_mul(bs)
            .map(|b| b + u64::from(offset))
            .filter(|at| {
                at.checked_add(len)
                    .is_some_and(|end| end <= i64::MAX as u64)
            })
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("{len} bytes at offset {offset} of {block} are beyond any file"),
                )
            })
    }

    /// Reads `iov_len(bufs)` bytes at byte `offset` of `block` into `bufs`. The range starts
    /// inside `block` and may continue into the blocks after it.
    pub async fn read(
        &self,
        block: DataBlock,
        offset: u32,
        bufs: &mut [IoSliceMut<'_>],
    ) -> io::Result<()> {
        let len = crate::device::iov_len(bufs);
        let at = self.byte_offset(block, offset, len)?;
        match &self.backend {
            Backend::File(f) => f.read(at, bufs).await,
            Backend::Model(m) => {
                let mut pos = at;
                for b in bufs.iter_mut() {
                    m.read(pos, b)?;
                    pos += b.len() as u64;
                }
                Ok(())
            }
        }
    }

    /// Writes the concatenation of `bufs` at byte `offset` of `block`. The range starts inside
    /// `block` and may continue into the blocks after it. Not durable until
    /// [`sync`](DataFile::sync).
    pub async fn write(
        &self,
        block: DataBlock,
        offset: u32,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<()> {
        let len = crate::device::iov_len(bufs);
        let at = self.byte_offset(block, offset, len)?;
        match &self.backend {
            Backend::File(f) => f.write(at, bufs).await,
            Backend::Model(m) => {
                let mut flat = Vec::with_capacity(len as usize);
                for b in bufs {
                    flat.extend_from_slice(b);
                }
                m.write(at, &flat)
            }
        }
    }

    /// Copies the whole of block `from` to block `to` (copy-on-write).
    pub async fn copy_block(&self, from: DataBlock, to: DataBlock) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        let src = self.byte_offset(from, 0, bs)?;
        let dst = self.byte_offset(to, 0, bs)?;
        match &self.backend {
            Backend::File(f) => f.copy_range(src, dst, bs).await,
            Backend::Model(m) => {
                let mut buf = vec![0u8; bs as usize];
                m.read(src, &mut buf)?;
                m.write(dst, &buf)
            }
        }
    }

    /// Makes block `to` share block `from`'s storage where the file system has shared
    /// extents (XFS with reflink, btrfs), then writes `bufs` at `offset` in `to`: a
    /// copy-on-write that writes only what changed, as one job on the file's writer threads.
    /// `Ok(false)`, with nothing done, where it cannot (ext4, block devices, a model): the
    /// caller copies instead. Like a write, the clone is durable after the next
    /// [`sync`](DataFile::sync).
    pub async fn clone_and_write(
        &self,
        from: DataBlock,
        to: DataBlock,
        offset: u32,
        bufs: &[IoSlice<'_>],
    ) -> io::Result<bool> {
        let bs = u64::from(self.block_size);
        let src = self.byte_offset(from, 0, bs)?;
        let dst = self.byte_offset(to, 0, bs)?;
        let at = self.byte_offset(to, offset, crate::device::iov_len(bufs))?;
        match &self.backend {
            Backend::File(f) => f.clone_and_write(src, dst, bs, at, bufs).await,
            Backend::Model(_) => Ok(false),
        }
    }

    /// Makes every write so far durable (fdatasync): the first step of a commit.
    pub async fn sync(&self) -> io::Result<()> {
        match &self.backend {
            Backend::File(f) => f.sync().await,
            Backend::Model(m) => m.sync(),
        }
    }

    /// [`sync`](DataFile::sync) on the calling thread, for callers that already run on a
    /// blocking thread (the committer holds the metadata lock there).
    pub fn sync_blocking(&self) -> io::Result<()> {
        match &self.backend {
            Backend::File(f) => f.sync_blocking(),
            Backend::Model(m) => m.sync(),
        }
    }

    /// Gives the space of a freed block back and makes it read as zeros. Call only once the
    /// commit that freed it is durable (DESIGN invariant 2), and before it can be reused.
    pub async fn release(&self, block: DataBlock) -> io::Result<()> {
        let bs = u64::from(self.block_size);
        let at = self.byte_offset(block, 0, bs)?;
        match &self.backend {
            Backend::File(f) => f.zero_out(at, bs).await,
            Backend::Model(m) => m.punch(block.0),
        }
    }

    /// True when `block` is known to read as zeros without any write (a hole). On a block
    /// device this is never known, so always false.
    pub fn is_hole(&self, block: DataBlock) -> io::Result<bool> {
        let bs = u64::from(self.block_size);
        let at = self.byte_offset(block, 0, bs)?;
        match &self.backend {
            Backend::File(f) => f.is_hole(at, bs),
            Backend::Model(m) => m.is_hole(block.0),
        }
    }

    /// How many blocks from `first` on (at most `max`) are known to read as zeros without any
    /// write: one `SEEK_DATA` for the whole run. 0 on a block device.
    pub fn holes_from(&self, first: DataBlock, max: u64) -> io::Result<u64> {
        let bs = u64::from(self.block_size);
        let at = self.byte_offset(first, 0, max.saturating_mul(bs))?;
        match &self.backend {
            Backend::File(f) => Ok(f.hole_len(at, max * bs)? / bs),
            Backend::Model(m) => {
                let mut n = 0;
                while n < max && m.is_hole(first.0 + n)? {
                    n += 1;
                }
                Ok(n)
            }
        }
    }

    /// Makes a freshly reserved `block` read as zeros before a write that does not cover it
    /// whole: nothing but one `SEEK_DATA` when it is a hole already; otherwise (a punch lost to
    /// a crash, or a block device) it is punched or zeroed now.
    pub async fn make_zero(&self, block: DataBlock) -> io::Result<()> {
        if self.is_hole(block)? {
            return Ok(());
        }
        self.release(block).await
    }

    /// Bytes of storage the data file occupies (st_blocks × 512), or the device size.
    pub fn allocated_bytes(&self) -> io::Result<u64> {
        match &self.backend {
            Backend::File(f) => f.allocated_bytes(),
            Backend::Model(m) => Ok(m.allocated_blocks() * u64::from(self.block_size)),
        }
    }
}

fn check_block_size(block_size: u32) -> io::Result<()> {
    if block_size.is_power_of_two() && block_size >= 4096 {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("data block size {block_size} is not a power of two of at least 4096"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The runtime of the data module's tests (also used by `file` and `uring`).
    pub(super) fn rt() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap()
    }

    const BS: u32 = 65536;

    #[test]
    fn real_file_read_write_copy_punch() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data");
        let df = DataFile::open(&path, BS, true).unwrap();
        df.grow(16).unwrap();
        assert_eq!(df.nr_blocks().unwrap(), 16);
        assert_eq!(df.kind(), StorageKind::RegularFile);
        rt().block_on(async {
            assert!(df.is_hole(DataBlock(3)).unwrap());
            assert_eq!(df.holes_from(DataBlock(0), 16).unwrap(), 16);
            let a = vec![1u8; 1000];
            let b = vec![2u8; 24];
            df.write(DataBlock(3), 4096, &[IoSlice::new(&a), IoSlice::new(&b)])
                .await
                .unwrap();
            assert!(!df.is_hole(DataBlock(3)).unwrap());
            assert!(df.is_hole(DataBlock(2)).unwrap());
            assert!(df.is_hole(DataBlock(4)).unwrap());
            assert_eq!(df.holes_from(DataBlock(0), 16).unwrap(), 3);
            assert_eq!(df.holes_from(DataBlock(4), 12).unwrap(), 12);
            assert_eq!(df.holes_from(DataBlock(3), 16).unwrap(), 0);

            let mut x = vec![9u8; 4096];
            let mut y = vec![9u8; 1024];
            df.read(
                DataBlock(3),
                0,
                &mut [IoSliceMut::new(&mut x), IoSliceMut::new(&mut y)],
            )
            .await
            .unwrap();
            assert!(x.iter().all(|&v| v == 0));
            assert!(y[..1000].iter().all(|&v| v == 1));
            assert!(y[1000..].iter().all(|&v| v == 2));

            df.copy_block(DataBlock(3), DataBlock(7)).await.unwrap();
            let mut z = vec![0u8; BS as usize];
            df.read(DataBlock(7), 0, &mut [IoSliceMut::new(&mut z)])
                .await
                .unwrap();
            assert_eq!(&z[4096..5096], &a[..]);
            df.sync().await.unwrap();

            let before = df.allocated_bytes().unwrap();
            df.release(DataBlock(3)).await.unwrap();
            assert!(df.is_hole(DataBlock(3)).unwrap());
            assert!(df.allocated_bytes().unwrap() < before);
            df.read(DataBlock(3), 0, &mut [IoSliceMut::new(&mut z)])
                .await
                .unwrap();
            assert!(z.iter().all(|&v| v == 0));

            // make_zero punches a block that still holds data, leaves a hole alone.
            df.make_zero(DataBlock(7)).await.unwrap();
            assert!(df.is_hole(DataBlock(7)).unwrap());
            df.make_zero(DataBlock(7)).await.unwrap();
        });
    }

    /// Runs `body` on its own thread and fails (naming `what`) if it has not finished within
    /// 60 s: for tests whose bug would make a `Drop` wait forever, so that it fails instead of
    /// hanging the test run. A panic in `body` fails it too (its message is printed above).
    pub(super) fn with_time_limit(what: &str, body: impl FnOnce() + Send + 'static) {
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            body();
            let _ = done.send(());
        });
        if finished
            .recv_timeout(std::time::Duration::from_secs(60))
            .is_err()
        {
            panic!("{what} stalled or failed (see the thread's panic above)");
        }
    }

    /// A directory on the file system the repository lives on (/tmp may be tmpfs, which
    /// refused O_DIRECT before Linux 6.6). Also used by `file`'s tests.
    pub(super) fn disk_tempdir() -> tempfile::TempDir {
        let base = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp-tests");
        std::fs::create_dir_all(&base).unwrap();
        tempfile::tempdir_in(base).unwrap()
    }

    #[test]
    fn direct_mode_aligned_unaligned_and_misaligned_buffers() {
        let dir = disk_tempdir();
        let df =
            DataFile::open_with(&dir.path().join("data"), BS, true, CacheMode::Direct).unwrap();
        assert_eq!(
            df.cache_mode(),
            CacheMode::Direct,
            "the test needs O_DIRECT storage"
        );
        df.grow(8).unwrap();
        let rt = rt();
        let bs = BS as usize;
        let mut model = vec![0u8; 8 * bs];
        rt.block_on(async {
            // Aligned (page-aligned buffer), unaligned offsets/lengths, buffers at odd
            // addresses, ranges spanning blocks, unaligned writes sharing a 512-byte unit.
            let mut big = AlignedBuf::zeroed(bs + 8192);
            big.iter_mut()
                .enumerate()
                .for_each(|(i, b)| *b = (i % 241) as u8);
            let odd = vec![7u8; 4097];
            let cases: Vec<(u64, &[u8])> = vec![
                (0, &big[..]),
                (bs as u64 - 4096, &big[..8192]),
                (100, &odd[1..1001]),
                (1200, &odd[..24]),
                (1101, &odd[..50]),
                (2 * bs as u64 + 512, &odd[1..4097]),
                (3 * bs as u64 - 3, &odd[..10]),
            ];
            for (at, data) in cases {
                let block = DataBlock(at / BS as u64);
                df.write(block, (at % BS as u64) as u32, &[IoSlice::new(data)])
                    .await
                    .unwrap();
                model[at as usize..at as usize + data.len()].copy_from_slice(data);
            }
            // Two unaligned writes into one unit at once, disjoint bytes: both survive.
            let (x, y) = (vec![1u8; 10], vec![2u8; 10]);
            let (xs, ys) = ([IoSlice::new(&x)], [IoSlice::new(&y)]);
            let (a, b) = tokio::join!(
                df.write(DataBlock(5), 3, &xs),
                df.write(DataBlock(5), 300, &ys)
            );
            a.unwrap();
            b.unwrap();
            model[5 * bs + 3..5 * bs + 13].copy_from_slice(&x);
            model[5 * bs + 300..5 * bs + 310].copy_from_slice(&y);
            df.copy_block(DataBlock(0), DataBlock(6)).await.unwrap();
            model.copy_within(0..bs, 6 * bs);
            df.release(DataBlock(2)).await.unwrap();
            model[2 * bs..3 * bs].fill(0);

            // Read back aligned, unaligned and into misaligned buffers.
            let mut all = AlignedBuf::zeroed(8 * bs);
            df.read(DataBlock(0), 0, &mut [IoSliceMut::new(&mut all)])
                .await
                .unwrap();
            assert!(all[..] == model[..], "aligned read differs");
            for (at, len) in [(1u64, 1000usize), (bs as u64 - 7, 20), (5 * bs as u64, 513)] {
                let mut got = vec![0u8; len + 1];
                let block = DataBlock(at / BS as u64);
                df.read(
                    block,
                    (at % BS as u64) as u32,
                    &mut [IoSliceMut::new(&mut got[1..])],
                )
                .await
                .unwrap();
                assert!(
                    got[1..] == model[at as usize..at as usize + len],
                    "read at {at}"
                );
            }
        });
        // Partial writes leave the rest of a block a hole; nothing went to the page cache,
        // so a buffered reader sees the same bytes.
        assert!(df.is_hole(DataBlock(7)).unwrap());
        let plain = std::fs::read(dir.path().join("data")).unwrap();
        assert!(plain == model, "the file differs from the model");
    }

    /// `UTHIN_TEST_DIR` when set (scripts/test.sh points it at an XFS mount, which has
    /// shared extents), else [`disk_tempdir`].
    pub(super) fn test_dir() -> tempfile::TempDir {
        match std::env::var_os("UTHIN_TEST_DIR") {
            Some(d) => tempfile::tempdir_in(d).unwrap(),
            None => disk_tempdir(),
        }
    }

    /// `clone_and_write` either shares the block and writes the patch into the clone (which
    /// then reads like its source with the patch over it, and leaves the source alone) or
    /// refuses and changes nothing, the patch included, and keeps refusing. With
    /// `UTHIN_TEST_EXPECT_CLONES` set (scripts/test.sh on XFS) it must share.
    #[test]
    fn clone_and_write_shares_or_changes_nothing() {
        let dir = test_dir();
        let expect = std::env::var_os("UTHIN_TEST_EXPECT_CLONES").is_some();
        for cache in [CacheMode::Writeback, CacheMode::Direct] {
            let df = DataFile::open_with(&dir.path().join(format!("{cache:?}")), BS, true, cache)
                .unwrap();
            df.grow(4).unwrap();
            rt().block_on(async {
                let mut src = AlignedBuf::zeroed(BS as usize);
                for (i, b) in src.iter_mut().enumerate() {
                    *b = (i % 251) as u8 + 1;
                }
                df.write(DataBlock(1), 0, &[IoSlice::new(&src)])
                    .await
                    .unwrap();
                let patch = AlignedBuf::zeroed(4096);
                let shared = df
                    .clone_and_write(DataBlock(1), DataBlock(2), 4096, &[IoSlice::new(&patch)])
                    .await
                    .unwrap();
                assert!(shared || !expect, "{cache:?}: no shared extents here");
                let mut back = AlignedBuf::zeroed(BS as usize);
                back.fill(0xee);
                df.read(DataBlock(2), 0, &mut [IoSliceMut::new(&mut back)])
                    .await
                    .unwrap();
                if !shared {
                    assert!(back.iter().all(|&b| b == 0), "{cache:?}: a refusal wrote");
                    assert!(
                        !df.clone_and_write(DataBlock(1), DataBlock(3), 0, &[])
                            .await
                            .unwrap()
                    );
                    return;
                }
                assert!(
                    back[..4096] == src[..4096] && back[8192..] == src[8192..],
                    "{cache:?}: the clone differs from its source"
                );
                assert!(
                    back[4096..8192].iter().all(|&b| b == 0),
                    "{cache:?}: the patch is not in the clone"
                );
                df.read(DataBlock(1), 0, &mut [IoSliceMut::new(&mut back)])
                    .await
                    .unwrap();
                assert!(
                    back[..] == src[..],
                    "{cache:?}: a write into the clone reached its source"
                );
                // A patch of any alignment (in direct mode: by the bounce-buffer path).
                let odd = vec![0xabu8; 100];
                assert!(
                    df.clone_and_write(DataBlock(1), DataBlock(3), 10_003, &[IoSlice::new(&odd)])
                        .await
                        .unwrap()
                );
                df.read(DataBlock(3), 0, &mut [IoSliceMut::new(&mut back)])
                    .await
                    .unwrap();
                let mut want = src.to_vec();
                want[10_003..10_103].copy_from_slice(&odd);
                assert!(back[..] == want[..], "{cache:?}: an unaligned patch");
            });
        }
    }

    #[test]
    fn ranges_outside_a_block_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let df = DataFile::open(&dir.path().join("d"), BS, true).unwrap();
        df.grow(2).unwrap();
        rt().block_on(async {
            let a = vec![1u8; 2];
            let err = df
                .write(DataBlock(0), BS, &[IoSlice::new(&a)])
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
            // A range may run on into the next block (a run of consecutive blocks).
            df.write(DataBlock(0), BS - 1, &[IoSlice::new(&a)])
                .await
                .unwrap();
            let mut c = [0u8; 2];
            df.read(DataBlock(0), BS - 1, &mut [IoSliceMut::new(&mut c)])
                .await
                .unwrap();
            assert_eq!(c, [1, 1]);
            let mut b = vec![0u8; 16];
            // Past the end of the file: a clear error, not zeros.
            let err = df
                .read(DataBlock(5), 0, &mut [IoSliceMut::new(&mut b)])
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
        assert!(DataFile::open(&dir.path().join("e"), 1000, true).is_err());
    }

    #[test]
    fn model_backend_behaves_like_the_file() {
        let m = Arc::new(DataModel::new(BS, 8));
        let df = DataFile::from_model(m.clone());
        rt().block_on(async {
            let a = vec![5u8; 512];
            df.write(DataBlock(1), 512, &[IoSlice::new(&a)])
                .await
                .unwrap();
            assert_eq!(m.bytes_written(), 512);
            df.copy_block(DataBlock(1), DataBlock(2)).await.unwrap();
            df.sync().await.unwrap();
            df.release(DataBlock(1)).await.unwrap();
            m.power_loss(PowerLoss::DropAll);
            // The punch was not synced: the block still holds data, so make_zero punches it.
            assert!(!df.is_hole(DataBlock(1)).unwrap());
            df.make_zero(DataBlock(1)).await.unwrap();
            assert!(df.is_hole(DataBlock(1)).unwrap());
            let mut b = vec![0u8; 1024];
            df.read(DataBlock(2), 0, &mut [IoSliceMut::new(&mut b)])
                .await
                .unwrap();
            assert!(b[..512].iter().all(|&v| v == 0));
            assert!(b[512..].iter().all(|&v| v == 5));
        });
    }
}
