//! dm's block checksum and the validators that check and seal each kind of block.
//!
//! Every persistent-data block starts with the same 16 bytes:
//!
//! ```text
//! offset  size  field
//!      0     4  csum      le32: crc32c of bytes 4..4096, computed as dm does (below)
//!      4     4  (flags / padding, depends on the kind)
//!      8     8  blocknr   le64: the block's own number, so a misdirected write is caught
//! ```
//!
//! dm computes `crc32c(seed = 0xffffffff, bytes 4..4096)` *without* the final inversion, then
//! xors a per-kind constant; that equals `!crc32c_standard(bytes) ^ xor`.

use crate::error::{BlockKind, Error, Result};
use crate::{Block, MetaBlock};

/// xor constant of dm-thin's superblock checksum (`THIN_SUPERBLOCK_CSUM_XOR`).
pub const SUPERBLOCK_CSUM_XOR: u32 = 160774;
/// xor constant of B-tree node checksums (`BTREE_CSUM_XOR`).
pub const BTREE_CSUM_XOR: u32 = 121107;
/// xor constant of space-map bitmap checksums (`BITMAP_CSUM_XOR`).
pub const BITMAP_CSUM_XOR: u32 = 240779;
/// xor constant of the metadata space map's index block checksum (`INDEX_CSUM_XOR`).
pub const INDEX_CSUM_XOR: u32 = 160478;

/// dm's checksum of `data` with the per-kind constant `xor` (`dm_bm_checksum`).
pub fn dm_checksum(data: &[u8], xor: u32) -> u32 {
    !crc32c::crc32c(data) ^ xor
}

/// Checks a block read from disk and seals one before it is written: one validator per kind
/// of block. Implement it for a block kind of your own (the pool's superblock) and pass a
/// `&'static` instance to the transaction manager.
pub trait Validator: Send + Sync + 'static {
    /// The kind of block this validator is for (used in error messages).
    fn kind(&self) -> BlockKind;
    /// Returns an error naming the block if `data`, read from block `nr`, is not a valid block
    /// of this kind.
    fn check(&self, nr: MetaBlock, data: &Block) -> Result<()>;
    /// Fills in the block number and checksum of `data` before it is written to block `nr`.
    fn seal(&self, nr: MetaBlock, data: &mut Block);
}

/// The validator shared by all dm block kinds: checksum over bytes 4..4096 with a per-kind xor,
/// block number at offset 8, and optionally a le64 magic number at a fixed offset.
#[derive(Debug)]
pub struct DmValidator {
    kind: BlockKind,
    xor: u32,
    magic: Option<(usize, u64)>,
}

impl DmValidator {
    /// A validator for blocks of `kind` checksummed with `xor`.
    pub const fn new(kind: BlockKind, xor: u32) -> Self {
        DmValidator {
            kind,
            xor,
            magic: None,
        }
    }

    /// A validator that additionally requires the le64 `magic` at byte `offset`
    /// (dm-thin's superblock keeps 27022010 at offset 32).
    pub const fn with_magic(kind: BlockKind, xor: u32, offset: usize, magic: u64) -> Self {
        DmValidator {
            kind,
            xor,
            magic: Some((offset, magic)),
        }
    }
}

/// Reads the stored checksum (offset 0).
pub fn stored_checksum(data: &Block) -> u32 {
    u32::from_le_bytes([data[0], data[1], data[2], data[3]])
}

/// Reads the stored block number (offset 8).
pub fn stored_blocknr(data: &Block) -> u64 {
    read_le64(data, 8)
}

pub(crate) fn read_le64(data: &[u8], off: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&data[off..off + 8]);
    u64::from_le_bytes(b)
}

pub(crate) fn read_le32(data: &[u8], off: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&data[off..off + 4]);
    u32::from_le_bytes(b)
}

pub(crate) fn write_le64(data: &mut [u8], off: usize, v: u64) {
    data[off..off + 8].copy_from_slice(&v.to_le_bytes());
}

pub(crate) fn write_le32(data: &mut [u8], off: usize, v: u32) {
    data[off..off + 4].copy_from_slice(&v.to_le_bytes());
}

impl Validator for DmValidator {
    fn kind(&self) -> BlockKind {
        self.kind
    }

    fn check(&self, nr: MetaBlock, data: &Block) -> Result<()> {
        let computed = dm_checksum(&data[4..], self.xor);
        let stored = stored_checksum(data);
        if computed != stored {
            return Err(Error::BadChecksum {
                block: nr,
                kind: self.kind,
                stored,
                computed,
            });
        }
        let found = stored_blocknr(data);
        if found != nr.0 {
            return Err(Error::WrongBlockNumber {
                block: nr,
                kind: self.kind,
                found,
            });
        }
        if let Some((off, expected)) = self.magic {
            let found = read_le64(data, off);
            if found != expected {
                return Err(Error::BadMagic {
                    block: nr,
                    kind: self.kind,
                    found,
                    expected,
                });
            }
        }
        Ok(())
    }

    fn seal(&self, nr: MetaBlock, data: &mut Block) {
        write_le64(data, 8, nr.0);
        let csum = dm_checksum(&data[4..], self.xor);
        write_le32(data, 0, csum);
    }
}

/// Validator of B-tree nodes.
pub static BTREE_NODE_VALIDATOR: DmValidator =
    DmValidator::new(BlockKind::BTreeNode, BTREE_CSUM_XOR);
/// Validator of space-map bitmap blocks.
pub static BITMAP_VALIDATOR: DmValidator = DmValidator::new(BlockKind::Bitmap, BITMAP_CSUM_XOR);
/// Validator of the metadata space map's index block.
pub static INDEX_VALIDATOR: DmValidator = DmValidator::new(BlockKind::Index, INDEX_CSUM_XOR);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BLOCK_SIZE;

    #[test]
    fn checksum_matches_dm_definition() {
        // dm: crc32c(~0, data) without final inversion, xor constant. For the empty input the
        // raw register stays 0xffffffff.
        assert_eq!(dm_checksum(&[], 0), 0xffff_ffff);
        assert_eq!(dm_checksum(&[], 5), 0xffff_fffa);
        // "123456789" has the standard CRC-32C 0xe3069283.
        assert_eq!(dm_checksum(b"123456789", 0), !0xe306_9283u32);
    }

    #[test]
    fn seal_then_check_round_trips_and_catches_damage() {
        let mut b = [0u8; BLOCK_SIZE];
        b[100] = 7;
        BTREE_NODE_VALIDATOR.seal(MetaBlock(42), &mut b);
        BTREE_NODE_VALIDATOR.check(MetaBlock(42), &b).unwrap();
        assert!(matches!(
            BTREE_NODE_VALIDATOR.check(MetaBlock(43), &b),
            Err(Error::WrongBlockNumber { found: 42, .. })
        ));
        assert!(matches!(
            BITMAP_VALIDATOR.check(MetaBlock(42), &b),
            Err(Error::BadChecksum { .. })
        ));
        b[4000] ^= 1;
        let err = BTREE_NODE_VALIDATOR.check(MetaBlock(42), &b).unwrap_err();
        assert_eq!(err.block(), Some(MetaBlock(42)));
        assert!(err.is_corruption());
    }
}
