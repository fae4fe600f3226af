//! In-memory block device.

use super::{BlockIo, out_of_range};
use crate::{BLOCK_SIZE, Block, MetaBlock};
use parking_lot::RwLock;
use std::io;
use std::sync::Arc;

/// One block of an in-memory image: `None` reads as zeros. Blocks are shared between snapshots
/// (copy on write), so cloning an image costs one pointer per block.
pub(crate) type ImageBlocks = Vec<Option<Arc<Block>>>;

/// A metadata device in memory. `sync` is a no-op: everything written is "durable" (use
/// [`super::FaultyIo`] to model power loss).
#[derive(Debug, Default)]
pub struct MemIo {
    blocks: RwLock<ImageBlocks>,
}

impl MemIo {
    /// A zero-filled device of `nr_blocks` blocks.
    pub fn new(nr_blocks: u64) -> Self {
        MemIo {
            blocks: RwLock::new(vec![None; nr_blocks as usize]),
        }
    }

    pub(crate) fn from_blocks(blocks: ImageBlocks) -> Self {
        MemIo {
            blocks: RwLock::new(blocks),
        }
    }

    /// A device holding `bytes` (padded with zeros to a whole number of blocks).
    pub fn from_bytes(bytes: &[u8]) -> Self {
        let blocks = bytes
            .chunks(BLOCK_SIZE)
            .map(|chunk| {
                if chunk.iter().all(|&b| b == 0) {
                    None
                } else {
                    let mut b = [0u8; BLOCK_SIZE];
                    b[..chunk.len()].copy_from_slice(chunk);
                    Some(Arc::new(b))
                }
            })
            .collect();
        MemIo::from_blocks(blocks)
    }

    /// The whole device as bytes (for writing it to a file, e.g. to run `thin_check` on it).
    pub fn to_bytes(&self) -> Vec<u8> {
        let blocks = self.blocks.read();
        let mut out = vec![0u8; blocks.len() * BLOCK_SIZE];
        for (i, b) in blocks.iter().enumerate() {
            if let Some(b) = b {
                out[i * BLOCK_SIZE..(i + 1) * BLOCK_SIZE].copy_from_slice(&b[..]);
            }
        }
        out
    }

    pub(crate) fn snapshot_blocks(&self) -> ImageBlocks {
        self.blocks.read().clone()
    }

    /// An independent copy of the device as it is now (cheap: blocks are shared until written).
    pub fn snapshot(&self) -> MemIo {
        MemIo::from_blocks(self.blocks.read().clone())
    }

    /// Applies `f` to the stored bytes of block `nr` (for corruption tests).
    pub fn modify_block(&self, nr: MetaBlock, f: impl FnOnce(&mut Block)) -> io::Result<()> {
        let mut blocks = self.blocks.write();
        let len = blocks.len() as u64;
        let slot = blocks
            .get_mut(nr.0 as usize)
            .ok_or_else(|| out_of_range(nr, len))?;
        let mut data = match slot {
            Some(b) => **b,
            None => [0u8; BLOCK_SIZE],
        };
        f(&mut data);
        *slot = Some(Arc::new(data));
        Ok(())
    }

    /// True if block `nr` has never been written (or holds only zeros from the start).
    pub fn is_unwritten(&self, nr: MetaBlock) -> bool {
        matches!(self.blocks.read().get(nr.0 as usize), Some(None))
    }
}

impl BlockIo for MemIo {
    fn nr_blocks(&self) -> u64 {
        self.blocks.read().len() as u64
    }

    fn read(&self, nr: MetaBlock, buf: &mut Block) -> io::Result<()> {
        let blocks = self.blocks.read();
        match blocks.get(nr.0 as usize) {
            Some(Some(b)) => buf.copy_from_slice(&b[..]),
            Some(None) => buf.fill(0),
            None => return Err(out_of_range(nr, blocks.len() as u64)),
        }
        Ok(())
    }

    fn write(&self, nr: MetaBlock, buf: &Block) -> io::Result<()> {
        let mut blocks = self.blocks.write();
        let len = blocks.len() as u64;
        let slot = blocks
            .get_mut(nr.0 as usize)
            .ok_or_else(|| out_of_range(nr, len))?;
        *slot = Some(Arc::new(*buf));
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        Ok(())
    }

    fn grow(&self, nr_blocks: u64) -> io::Result<()> {
        let mut blocks = self.blocks.write();
        if (blocks.len() as u64) < nr_blocks {
            blocks.resize(nr_blocks as usize, None);
        }
        Ok(())
    }
}
