//! On-disk structures of dm's space maps.
//!
//! **Space map root** (`disk_sm_root`, 32 bytes; dm-thin keeps each in a 128-byte area of its
//! superblock, the rest zero):
//! ```text
//!  0  8  nr_blocks        le64  blocks the map covers
//!  8  8  nr_allocated     le64  blocks whose count is not zero
//! 16  8  bitmap_root      le64  metadata map: the index block; disk map: root of the index B-tree
//! 24  8  ref_count_root   le64  root of the B-tree (le32 values) holding counts >= 3
//! ```
//!
//! **Index entry** (`disk_index_entry`, 16 bytes), one per bitmap:
//! ```text
//!  0  8  blocknr           le64  the bitmap block
//!  8  4  nr_free           le32  entries of the bitmap whose count is 0
//! 12  4  none_free_before  le32  no entry below this one is free
//! ```
//!
//! **Bitmap block**: a 16-byte header (csum le32 with xor 240779, not_used le32, blocknr le64)
//! then 510 le64 words of 2-bit counts: 16320 entries. Entry `i` of a word keeps its HIGH bit at
//! bit `2i` and its LOW bit at bit `2i+1` of the little-endian word. Values 0, 1, 2 are counts;
//! 3 means "3 or more, see the reference-count tree".
//!
//! **Metadata index block**: csum le32 (xor 160478), padding le32, blocknr le64, then 255 index
//! entries: so a metadata space map covers at most 255 * 16320 blocks (~15.9 GiB).
//!
//! The disk (data) space map keeps its index entries in a B-tree (key: bitmap number, value: the
//! 16-byte entry, 168 per leaf) and its bitmaps and both maps' reference-count trees in the
//! metadata device, all counted by the metadata space map.

use crate::checksum::{read_le32, read_le64, write_le32, write_le64};
use crate::error::{BlockKind, Error, Result};
use crate::{Block, MetaBlock};

/// Size of a bitmap block's header.
pub const BITMAP_HEADER_SIZE: usize = 16;
/// Entries (blocks counted) per bitmap block.
pub const ENTRIES_PER_BITMAP: u64 = ((crate::BLOCK_SIZE - BITMAP_HEADER_SIZE) * 4) as u64;
/// 64-bit words per bitmap block.
pub const WORDS_PER_BITMAP: usize = (crate::BLOCK_SIZE - BITMAP_HEADER_SIZE) / 8;
/// Index entries in the metadata space map's index block.
pub const MAX_METADATA_BITMAPS: usize = 255;
/// The largest metadata space map dm supports, in blocks.
pub const MAX_METADATA_BLOCKS: u64 = MAX_METADATA_BITMAPS as u64 * ENTRIES_PER_BITMAP;
/// Bytes of a packed space map root.
pub const SM_ROOT_SIZE: usize = 32;
/// Bytes dm-thin reserves for each space map root in its superblock.
pub const SM_ROOT_AREA: usize = 128;
const INDEX_ENTRIES_OFF: usize = 16;

/// Mask of the HIGH bits' positions (bit 2i of each entry).
const EVEN_BITS: u64 = 0x5555_5555_5555_5555;

/// One index entry; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IndexEntry {
    /// The bitmap block.
    pub blocknr: u64,
    /// Free entries in the bitmap.
    pub nr_free: u32,
    /// No entry below this one is free.
    pub none_free_before: u32,
}

impl IndexEntry {
    /// Packs into 16 bytes.
    pub fn pack(&self, out: &mut [u8]) {
        write_le64(out, 0, self.blocknr);
        write_le32(out, 8, self.nr_free);
        write_le32(out, 12, self.none_free_before);
    }

    /// Unpacks from 16 bytes.
    pub fn unpack(raw: &[u8]) -> Self {
        IndexEntry {
            blocknr: read_le64(raw, 0),
            nr_free: read_le32(raw, 8),
            none_free_before: read_le32(raw, 12),
        }
    }
}

/// A space map's root as stored in the caller's superblock; see the module documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SmRoot {
    /// Blocks the map covers.
    pub nr_blocks: u64,
    /// Blocks with a non-zero count.
    pub nr_allocated: u64,
    /// Index block (metadata map) or index tree root (disk map).
    pub bitmap_root: MetaBlock,
    /// Root of the reference-count tree.
    pub ref_count_root: MetaBlock,
}

impl SmRoot {
    /// Packs into a 128-byte superblock area (32 bytes used, the rest zero).
    pub fn pack(&self) -> [u8; SM_ROOT_AREA] {
        let mut out = [0u8; SM_ROOT_AREA];
        write_le64(&mut out, 0, self.nr_blocks);
        write_le64(&mut out, 8, self.nr_allocated);
        write_le64(&mut out, 16, self.bitmap_root.0);
        write_le64(&mut out, 24, self.ref_count_root.0);
        out
    }

    /// Unpacks from at least 32 bytes.
    pub fn unpack(raw: &[u8]) -> Result<Self> {
        if raw.len() < SM_ROOT_SIZE {
            return Err(Error::InvalidArgument(format!(
                "a space map root needs {SM_ROOT_SIZE} bytes, got {}",
                raw.len()
            )));
        }
        Ok(SmRoot {
            nr_blocks: read_le64(raw, 0),
            nr_allocated: read_le64(raw, 8),
            bitmap_root: MetaBlock(read_le64(raw, 16)),
            ref_count_root: MetaBlock(read_le64(raw, 24)),
        })
    }
}

/// The 2-bit count of entry `i` of a bitmap block.
pub fn bitmap_get(data: &Block, i: u64) -> u32 {
    let w = bitmap_word(data, (i / 32) as usize);
    let bit = (i % 32) * 2;
    let hi = (w >> bit) & 1;
    let lo = (w >> (bit + 1)) & 1;
    ((hi << 1) | lo) as u32
}

/// Sets the 2-bit count of entry `i` (`v` is 0..=3).
pub fn bitmap_set(data: &mut Block, i: u64, v: u32) {
    let wi = (i / 32) as usize;
    let bit = (i % 32) * 2;
    let mut w = bitmap_word(data, wi);
    w &= !(0b11 << bit);
    w |= (((v as u64 >> 1) & 1) << bit) | ((v as u64 & 1) << (bit + 1));
    write_le64(data, BITMAP_HEADER_SIZE + 8 * wi, w);
}

/// Word `wi` of a bitmap block.
pub fn bitmap_word(data: &Block, wi: usize) -> u64 {
    read_le64(data, BITMAP_HEADER_SIZE + 8 * wi)
}

/// One bit (at position 2i) per entry of `w` whose count is zero.
pub fn free_entries_mask(w: u64) -> u64 {
    !(w | (w >> 1)) & EVEN_BITS
}

/// Reads the entries of a metadata index block (`n` of them, `n <= 255`), checking that each
/// points inside the device.
pub fn read_metadata_index(
    nr: MetaBlock,
    data: &Block,
    n: usize,
    nr_blocks: u64,
) -> Result<Vec<IndexEntry>> {
    if n > MAX_METADATA_BITMAPS {
        return Err(Error::malformed(
            nr,
            BlockKind::Index,
            format!("{n} bitmaps needed, the index block holds {MAX_METADATA_BITMAPS}"),
        ));
    }
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let off = INDEX_ENTRIES_OFF + 16 * i;
        let ie = IndexEntry::unpack(&data[off..off + 16]);
        check_index_entry(nr, BlockKind::Index, i as u64, &ie, nr_blocks)?;
        out.push(ie);
    }
    Ok(out)
}

/// Checks that an index entry is plausible: its bitmap inside the metadata device, its counts
/// inside a bitmap.
pub fn check_index_entry(
    at: MetaBlock,
    kind: BlockKind,
    i: u64,
    ie: &IndexEntry,
    meta_blocks: u64,
) -> Result<()> {
    if ie.blocknr == 0 || ie.blocknr >= meta_blocks {
        return Err(Error::malformed(
            at,
            kind,
            format!(
                "index entry {i} points at bitmap block {} outside 1..{meta_blocks}",
                ie.blocknr
            ),
        ));
    }
    if ie.nr_free as u64 > ENTRIES_PER_BITMAP || ie.none_free_before as u64 > ENTRIES_PER_BITMAP {
        return Err(Error::malformed(
            at,
            kind,
            format!(
                "index entry {i} has nr_free {} / none_free_before {} beyond {ENTRIES_PER_BITMAP}",
                ie.nr_free, ie.none_free_before
            ),
        ));
    }
    Ok(())
}

/// Writes index entries into a metadata index block (the rest of the entries zeroed).
pub fn write_metadata_index(data: &mut Block, entries: &[IndexEntry]) {
    write_le32(data, 4, 0);
    data[INDEX_ENTRIES_OFF..].fill(0);
    for (i, ie) in entries.iter().enumerate() {
        let off = INDEX_ENTRIES_OFF + 16 * i;
        ie.pack(&mut data[off..off + 16]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BLOCK_SIZE;

    #[test]
    fn bitmap_encoding_puts_high_bit_first() {
        let mut b = [0u8; BLOCK_SIZE];
        bitmap_set(&mut b, 0, 1);
        // Count 1 = low bit only = bit 1 of word 0.
        assert_eq!(bitmap_word(&b, 0), 0b10);
        bitmap_set(&mut b, 0, 2);
        assert_eq!(bitmap_word(&b, 0), 0b01);
        bitmap_set(&mut b, 33, 3);
        assert_eq!(bitmap_word(&b, 1), 0b1100);
        assert_eq!(bitmap_get(&b, 33), 3);
        assert_eq!(bitmap_get(&b, 0), 2);
        assert_eq!(free_entries_mask(bitmap_word(&b, 0)) & 1, 0);
        assert_eq!(free_entries_mask(bitmap_word(&b, 0)) & 0b100, 0b100);
        assert_eq!(ENTRIES_PER_BITMAP, 16320);
        assert_eq!(WORDS_PER_BITMAP * 32, 16320);
    }

    #[test]
    fn root_round_trip() {
        let r = SmRoot {
            nr_blocks: 1,
            nr_allocated: 2,
            bitmap_root: MetaBlock(3),
            ref_count_root: MetaBlock(4),
        };
        assert_eq!(SmRoot::unpack(&r.pack()).unwrap(), r);
        assert!(SmRoot::unpack(&[0u8; 8]).is_err());
    }
}
