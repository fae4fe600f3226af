//! Block I/O: reading, writing and syncing whole 4 KiB metadata blocks.
//!
//! [`BlockIo`] is the one trait everything above talks to. Engines:
//! - [`FileIo`]: a regular file or a block device (pread/pwrite, fdatasync); a regular file can grow.
//! - [`MemIo`]: memory, for tests and benchmarks; cheap to snapshot.
//! - [`FaultyIo`]: memory with a model of power loss (unsynced writes lost, reordered or torn at
//!   512-byte sector boundaries) and injectable EIO; see [`fault`].

pub mod fault;
mod file;
mod mem;

pub use fault::{Epoch, FailRule, FaultyIo, History, IoOp, OpCounts, WriteFate};
pub use file::FileIo;
pub use mem::MemIo;

use crate::{Block, MetaBlock};
use std::io;

/// Whole-block I/O on a metadata device. Implementations synchronise internally: every method
/// takes `&self` and may be called from several threads.
pub trait BlockIo: Send + Sync {
    /// Number of 4 KiB blocks the device holds now.
    fn nr_blocks(&self) -> u64;
    /// Reads block `nr` into `buf`.
    fn read(&self, nr: MetaBlock, buf: &mut Block) -> io::Result<()>;
    /// Writes `buf` to block `nr`. Not durable until [`BlockIo::sync`] returns.
    fn write(&self, nr: MetaBlock, buf: &Block) -> io::Result<()>;
    /// Writes `data` (a whole number of blocks) to consecutive blocks from `start`. The default
    /// writes block by block; engines with a cheaper large write override it. Like `write`,
    /// not durable until `sync`, and a power loss may keep any subset of its blocks.
    fn write_run(&self, start: MetaBlock, data: &[u8]) -> io::Result<()> {
        for (i, chunk) in data.chunks(crate::BLOCK_SIZE).enumerate() {
            let block: &Block = chunk.try_into().map_err(|_| {
                io::Error::new(io::ErrorKind::InvalidInput, "write_run needs whole blocks")
            })?;
            self.write(MetaBlock(start.0 + i as u64), block)?;
        }
        Ok(())
    }

    /// Makes every write that completed before this call durable (fdatasync).
    fn sync(&self) -> io::Result<()>;
    /// Makes the device at least `nr_blocks` long (growing a regular file; a block device can
    /// only report that it is already large enough).
    fn grow(&self, nr_blocks: u64) -> io::Result<()>;
}

pub(crate) fn out_of_range(nr: MetaBlock, nr_blocks: u64) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{nr} is beyond the end of the device ({nr_blocks} blocks)"),
    )
}
