//! dm-thin's superblock: metadata block 0, the only block ever written in place.
//!
//! Byte layout (little endian; kernel `struct thin_disk_superblock`), 364 bytes used, the rest of
//! the 4096-byte block zero:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 4 | checksum: crc32c of bytes 4..4096, dm style (see [`dm_checksum`]), xor 160774 |
//! | 4 | 4 | flags (bit 0: needs_check) |
//! | 8 | 8 | this block's number (always 0) |
//! | 16 | 16 | uuid (dm-thin leaves it zero) |
//! | 32 | 8 | magic 27022010 |
//! | 40 | 4 | metadata version (uthin writes 2; 1 and 2 are read) |
//! | 44 | 4 | time: bumped by every snapshot; stored in each mapping (`block_time`) |
//! | 48 | 8 | transaction id, set by the owner (uthin: by volumes.json operations) |
//! | 56 | 8 | held root: block of a metadata snapshot's superblock copy, 0 if none |
//! | 64 | 128 | data space map root (`sm_root`) |
//! | 192 | 128 | metadata space map root (`sm_root`) |
//! | 320 | 8 | data mapping root: top level of the two-level mapping tree |
//! | 328 | 8 | device details root |
//! | 336 | 4 | data block size in 512-byte sectors |
//! | 340 | 4 | metadata block size in sectors (8: 4 KiB) |
//! | 344 | 8 | number of metadata blocks |
//! | 352 | 4 | compat flags |
//! | 356 | 4 | compat read-only flags |
//! | 360 | 4 | incompat flags |
//!
//! Everything that changes in a commit lives in the first 512-byte sector and the rest of the
//! block is always zero, so a sector-atomic write of block 0 leaves either the old or the new
//! superblock, never a mix: this is what makes a commit atomic (DESIGN.md invariant 1).

use super::PoolError;

/// Size of a metadata block in bytes (dm-thin's only metadata block size).
pub const METADATA_BLOCK_SIZE: usize = 4096;
/// dm-thin's superblock magic number.
pub const SUPERBLOCK_MAGIC: u64 = 27_022_010;
/// Checksum xor constant of the superblock.
pub const SUPERBLOCK_CSUM_XOR: u32 = 160_774;
/// The metadata version uthin writes (2: adds the compat/incompat flag words).
pub const METADATA_VERSION: u32 = 2;
/// Size of each embedded space map root.
pub const SPACE_MAP_ROOT_SIZE: usize = 128;
/// Flag bit: the kernel asks for a check before the next activation.
pub const FLAG_NEEDS_CHECK: u32 = 1;
/// Bytes of block 0 that carry data; the rest is zero.
pub const SUPERBLOCK_USED_BYTES: usize = 364;

/// dm's block checksum: crc32c seeded with !0, without the final inversion, xor a per-type
/// constant, over everything after the 4-byte checksum field.
pub fn dm_checksum(data_after_csum: &[u8], xor: u32) -> u32 {
    // The crc32c crate returns the standard (finally inverted) CRC; undo the inversion.
    crc32c::crc32c(data_after_csum) ^ 0xffff_ffff ^ xor
}

/// The decoded superblock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    /// Flag bits ([`FLAG_NEEDS_CHECK`]).
    pub flags: u32,
    /// Opaque uuid (zero in pools made by the kernel and by uthin).
    pub uuid: [u8; 16],
    /// Metadata version (1 or 2).
    pub version: u32,
    /// Snapshot time counter.
    pub time: u32,
    /// Owner-defined transaction id.
    pub transaction_id: u64,
    /// Metadata snapshot superblock copy, 0 when none is held.
    pub held_root: u64,
    /// Packed root of the data space map.
    pub data_sm_root: [u8; SPACE_MAP_ROOT_SIZE],
    /// Packed root of the metadata space map.
    pub metadata_sm_root: [u8; SPACE_MAP_ROOT_SIZE],
    /// Root block of the top-level mapping tree (dev id → subtree root).
    pub data_mapping_root: u64,
    /// Root block of the device details tree (dev id → details).
    pub device_details_root: u64,
    /// Data block size in 512-byte sectors.
    pub data_block_size_sectors: u32,
    /// Number of metadata blocks the metadata space map covers.
    pub metadata_nr_blocks: u64,
    /// Compat feature flags (ignored when unknown).
    pub compat_flags: u32,
    /// Compat read-only feature flags (unknown ones force read-only).
    pub compat_ro_flags: u32,
    /// Incompat feature flags (unknown ones refuse the pool).
    pub incompat_flags: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    // Callers pass offsets inside the fixed 4096-byte block.
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

impl Superblock {
    /// Encodes into a full metadata block, checksum included.
    pub fn pack(&self) -> [u8; METADATA_BLOCK_SIZE] {
        let mut b = [0u8; METADATA_BLOCK_SIZE];
        b[4..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&0u64.to_le_bytes());
        b[16..32].copy_from_slice(&self.uuid);
        b[32..40].copy_from_slice(&SUPERBLOCK_MAGIC.to_le_bytes());
        b[40..44].copy_from_slice(&self.version.to_le_bytes());
        b[44..48].copy_from_slice(&self.time.to_le_bytes());
        b[48..56].copy_from_slice(&self.transaction_id.to_le_bytes());
        b[56..64].copy_from_slice(&self.held_root.to_le_bytes());
        b[64..192].copy_from_slice(&self.data_sm_root);
        b[192..320].copy_from_slice(&self.metadata_sm_root);
        b[320..328].copy_from_slice(&self.data_mapping_root.to_le_bytes());
        b[328..336].copy_from_slice(&self.device_details_root.to_le_bytes());
        b[336..340].copy_from_slice(&self.data_block_size_sectors.to_le_bytes());
        b[340..344].copy_from_slice(&((METADATA_BLOCK_SIZE / 512) as u32).to_le_bytes());
        b[344..352].copy_from_slice(&self.metadata_nr_blocks.to_le_bytes());
        b[352..356].copy_from_slice(&self.compat_flags.to_le_bytes());
        b[356..360].copy_from_slice(&self.compat_ro_flags.to_le_bytes());
        b[360..364].copy_from_slice(&self.incompat_flags.to_le_bytes());
        let csum = dm_checksum(&b[4..], SUPERBLOCK_CSUM_XOR);
        b[0..4].copy_from_slice(&csum.to_le_bytes());
        b
    }

    /// Decodes and validates block 0 (checksum, block number, magic, version, block sizes,
    /// feature flags). Errors name block 0 and what is wrong.
    pub fn unpack(b: &[u8]) -> Result<Superblock, PoolError> {
        let corrupt = |what: String| PoolError::Corrupt { block: 0, what };
        if b.len() != METADATA_BLOCK_SIZE {
            return Err(corrupt(format!(
                "superblock is {} bytes, expected {METADATA_BLOCK_SIZE}",
                b.len()
            )));
        }
        let magic = le_u64(b, 32);
        if magic != SUPERBLOCK_MAGIC {
            return Err(corrupt(format!(
                "not a dm-thin superblock (magic {magic}, expected {SUPERBLOCK_MAGIC})"
            )));
        }
        let stored = le_u32(b, 0);
        let computed = dm_checksum(&b[4..], SUPERBLOCK_CSUM_XOR);
        if stored != computed {
            return Err(corrupt(format!(
                "superblock checksum mismatch (stored {stored:#010x}, computed {computed:#010x})"
            )));
        }
        let blocknr = le_u64(b, 8);
        if blocknr != 0 {
            return Err(corrupt(format!(
                "superblock says it is block {blocknr}, expected 0"
            )));
        }
        let version = le_u32(b, 40);
        if !(1..=METADATA_VERSION).contains(&version) {
            return Err(corrupt(format!(
                "unsupported metadata version {version} (uthin reads 1 and 2)"
            )));
        }
        let meta_sectors = le_u32(b, 340);
        if meta_sectors as usize * 512 != METADATA_BLOCK_SIZE {
            return Err(corrupt(format!(
                "metadata block size is {meta_sectors} sectors, expected 8"
            )));
        }
        let data_block_size_sectors = le_u32(b, 336);
        if data_block_size_sectors == 0
            || data_block_size_sectors % 128 != 0
            || data_block_size_sectors > 2_097_152
        {
            return Err(corrupt(format!(
                "data block size of {data_block_size_sectors} sectors is not a multiple of 64 KiB up to 1 GiB"
            )));
        }
        let mut uuid = [0u8; 16];
        uuid.copy_from_slice(&b[16..32]);
        let mut data_sm_root = [0u8; SPACE_MAP_ROOT_SIZE];
        data_sm_root.copy_from_slice(&b[64..192]);
        let mut metadata_sm_root = [0u8; SPACE_MAP_ROOT_SIZE];
        metadata_sm_root.copy_from_slice(&b[192..320]);
        let (compat_flags, compat_ro_flags, incompat_flags) = if version >= 2 {
            (le_u32(b, 352), le_u32(b, 356), le_u32(b, 360))
        } else {
            (0, 0, 0)
        };
        if incompat_flags != 0 {
            return Err(corrupt(format!(
                "unknown incompatible features {incompat_flags:#x}: this pool needs a newer tool"
            )));
        }
        Ok(Superblock {
            flags: le_u32(b, 4),
            uuid,
            version,
            time: le_u32(b, 44),
            transaction_id: le_u64(b, 48),
            held_root: le_u64(b, 56),
            data_sm_root,
            metadata_sm_root,
            data_mapping_root: le_u64(b, 320),
            device_details_root: le_u64(b, 328),
            data_block_size_sectors,
            metadata_nr_blocks: le_u64(b, 344),
            compat_flags,
            compat_ro_flags,
            incompat_flags,
        })
    }

    /// Data block size in bytes.
    pub fn data_block_size(&self) -> u64 {
        u64::from(self.data_block_size_sectors) * 512
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Superblock {
        Superblock {
            flags: 0,
            uuid: [0; 16],
            version: 2,
            time: 7,
            transaction_id: 42,
            held_root: 0,
            data_sm_root: [3; SPACE_MAP_ROOT_SIZE],
            metadata_sm_root: [4; SPACE_MAP_ROOT_SIZE],
            data_mapping_root: 10,
            device_details_root: 11,
            data_block_size_sectors: 128,
            metadata_nr_blocks: 1024,
            compat_flags: 0,
            compat_ro_flags: 0,
            incompat_flags: 0,
        }
    }

    #[test]
    fn round_trip_and_layout() {
        let sb = sample();
        let b = sb.pack();
        assert!(b[SUPERBLOCK_USED_BYTES..].iter().all(|&x| x == 0));
        assert_eq!(&b[32..40], &SUPERBLOCK_MAGIC.to_le_bytes());
        assert_eq!(&b[336..340], &128u32.to_le_bytes());
        assert_eq!(&b[340..344], &8u32.to_le_bytes());
        assert_eq!(Superblock::unpack(&b).unwrap(), sb);
    }

    #[test]
    fn checksum_matches_dm_definition() {
        // dm: crc32c(~0, data) without final inversion, then xor. Computed bit by bit here.
        let data = [1u8, 2, 3, 4, 5];
        let mut crc: u32 = !0;
        for &byte in &data {
            crc ^= u32::from(byte);
            for _ in 0..8 {
                crc = if crc & 1 != 0 {
                    (crc >> 1) ^ 0x82f6_3b78
                } else {
                    crc >> 1
                };
            }
        }
        assert_eq!(dm_checksum(&data, 160_774), crc ^ 160_774);
    }

    #[test]
    fn corruption_is_reported_not_trusted() {
        let mut b = sample().pack();
        b[100] ^= 1;
        let err = Superblock::unpack(&b).unwrap_err().to_string();
        assert!(err.contains("block 0") && err.contains("checksum"), "{err}");
        let mut b = sample().pack();
        b[32] ^= 1;
        assert!(
            Superblock::unpack(&b)
                .unwrap_err()
                .to_string()
                .contains("magic")
        );
        assert!(Superblock::unpack(&[0u8; 10]).is_err());
        let mut sb = sample();
        sb.incompat_flags = 4;
        assert!(Superblock::unpack(&sb.pack()).is_err());
        let mut sb = sample();
        sb.data_block_size_sectors = 100;
        assert!(Superblock::unpack(&sb.pack()).is_err());
    }
}
