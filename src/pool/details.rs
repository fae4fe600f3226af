//! Values stored in dm-thin's trees: device details and mapping entries (`block_time`).

use crate::units::DataBlock;

/// Per-device record in the device details tree (dev id → details).
///
/// Byte layout (24 bytes, little endian; kernel `struct disk_device_details`):
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 8 | mapped blocks: number of virtual blocks with a mapping |
/// | 8 | 8 | transaction id of the pool when the device was created |
/// | 16 | 4 | creation time (pool time at creation) |
/// | 20 | 4 | snapshotted time (pool time of the last snapshot taken of or as this device) |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct DeviceDetails {
    /// Number of mapped virtual blocks.
    pub mapped_blocks: u64,
    /// Pool transaction id when the device was created.
    pub transaction_id: u64,
    /// Pool time when the device was created.
    pub creation_time: u32,
    /// Pool time of the latest snapshot involving this device.
    pub snapshotted_time: u32,
}

/// Size of a packed [`DeviceDetails`].
pub const DEVICE_DETAILS_SIZE: usize = 24;

impl DeviceDetails {
    /// Encodes into the 24-byte on-disk form.
    pub fn pack(&self) -> [u8; DEVICE_DETAILS_SIZE] {
        let mut b = [0u8; DEVICE_DETAILS_SIZE];
        b[0..8].copy_from_slice(&self.mapped_blocks.to_le_bytes());
        b[8..16].copy_from_slice(&self.transaction_id.to_le_bytes());
        b[16..20].copy_from_slice(&self.creation_time.to_le_bytes());
        b[20..24].copy_from_slice(&self.snapshotted_time.to_le_bytes());
        b
    }

    /// Decodes the 24-byte on-disk form.
    pub fn unpack(b: &[u8; DEVICE_DETAILS_SIZE]) -> DeviceDetails {
        let u64_at = |at: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[at..at + 8]);
            u64::from_le_bytes(a)
        };
        let u32_at = |at: usize| {
            let mut a = [0u8; 4];
            a.copy_from_slice(&b[at..at + 4]);
            u32::from_le_bytes(a)
        };
        DeviceDetails {
            mapped_blocks: u64_at(0),
            transaction_id: u64_at(8),
            creation_time: u32_at(16),
            snapshotted_time: u32_at(20),
        }
    }
}

/// Bits of a mapping value that hold the time; the data block sits above them.
pub const TIME_BITS: u32 = 24;
/// Largest data block number a mapping value can hold (40 bits).
pub const MAX_DATA_BLOCK: u64 = (1 << (64 - TIME_BITS)) - 1;

/// A mapping-tree leaf value: `data block << 24 | time` (dm-thin's `block_time`), little endian
/// u64 on disk. The time is the pool time when the mapping was made; dm-thin uses it to guess
/// sharing, uthin keeps it correct for compatibility and decides sharing from reference counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockTime {
    /// The mapped data block.
    pub block: DataBlock,
    /// Pool time (24 bits) when the mapping was made.
    pub time: u32,
}

impl BlockTime {
    /// Packs into the on-disk u64. `block` must be ≤ [`MAX_DATA_BLOCK`] (the pool never has
    /// more data blocks than that); the time is truncated to 24 bits as in dm-thin.
    pub fn pack(&self) -> u64 {
        (self.block.0 << TIME_BITS) | u64::from(self.time & ((1 << TIME_BITS) - 1))
    }

    /// Unpacks the on-disk u64.
    pub fn unpack(v: u64) -> BlockTime {
        BlockTime {
            block: DataBlock(v >> TIME_BITS),
            time: (v & ((1 << TIME_BITS) - 1)) as u32,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn details_round_trip_layout() {
        let d = DeviceDetails {
            mapped_blocks: 0x0102_0304_0506_0708,
            transaction_id: 9,
            creation_time: 10,
            snapshotted_time: 11,
        };
        let b = d.pack();
        assert_eq!(b[0], 0x08);
        assert_eq!(&b[8..16], &9u64.to_le_bytes());
        assert_eq!(&b[20..24], &11u32.to_le_bytes());
        assert_eq!(DeviceDetails::unpack(&b), d);
    }

    #[test]
    fn block_time_packing() {
        let bt = BlockTime {
            block: DataBlock(5),
            time: 3,
        };
        assert_eq!(bt.pack(), (5 << 24) | 3);
        assert_eq!(BlockTime::unpack(bt.pack()), bt);
        let big = BlockTime {
            block: DataBlock(MAX_DATA_BLOCK),
            time: 0xff_ffff,
        };
        assert_eq!(BlockTime::unpack(big.pack()), big);
        // Time wraps at 24 bits, as in dm-thin.
        let wrapped = BlockTime {
            block: DataBlock(1),
            time: 0x0100_0002,
        };
        assert_eq!(BlockTime::unpack(wrapped.pack()).time, 2);
    }
}
