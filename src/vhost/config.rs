//! What the backend tells the driver: virtio feature bits, vhost-user protocol features and the
//! virtio-blk configuration space.
//!
//! ## Configuration space (`struct virtio_blk_config`, virtio 1.2 §5.2.4, all little-endian)
//!
//! | offset | size | field | uthin's value |
//! | ---: | ---: | --- | --- |
//! | 0 | 8 | `capacity` | device size / 512 (a partial last sector is not exposed) |
//! | 8 | 4 | `size_max` | [`SEGMENT_SIZE_MAX`] |
//! | 12 | 4 | `seg_max` | [`SEGMENTS_MAX`] |
//! | 16 | 4 | `geometry` (cylinders u16, heads u8, sectors u8) | 0 (not offered) |
//! | 20 | 4 | `blk_size` | 512 (logical block size) |
//! | 24 | 1 | `physical_block_exp` | log2(device block size / 512) |
//! | 25 | 1 | `alignment_offset` | 0 |
//! | 26 | 2 | `min_io_size` (in 512-byte blocks) | device block size / 512, capped at 32768 |
//! | 28 | 4 | `opt_io_size` (in 512-byte blocks) | device block size / 512 |
//! | 32 | 1 | `wce` | 0 (`CONFIG_WCE` is not offered: the cache mode is fixed write-back) |
//! | 33 | 1 | unused | 0 |
//! | 34 | 2 | `num_queues` | the number of request queues |
//! | 36 | 4 | `max_discard_sectors` | [`MAX_DISCARD_SECTORS`] rounded down to the block size |
//! | 40 | 4 | `max_discard_seg` | [`MAX_DISCARD_SEGMENTS`] |
//! | 44 | 4 | `discard_sector_alignment` | device block size / 512 |
//! | 48 | 4 | `max_write_zeroes_sectors` | same as discard |
//! | 52 | 4 | `max_write_zeroes_seg` | [`MAX_DISCARD_SEGMENTS`] |
//! | 56 | 1 | `write_zeroes_may_unmap` | 1 |
//! | 57 | 3 | unused | 0 |
//! | 60 | 36 | secure erase and zoned fields | 0 (not offered) |
//!
//! Reads past the fields above return zeros, so a front-end that asks for a larger structure
//! than it knows (QEMU sizes its request from the features) gets a well-formed answer.

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_TOPOLOGY,
    VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::device::DeviceInfo;

/// The logical sector size of virtio-blk: request offsets and lengths count in these.
pub const SECTOR_SIZE: u64 = 512;

/// Largest single data segment a driver may put in one descriptor (`size_max`).
pub const SEGMENT_SIZE_MAX: u32 = 1 << 20;

/// Most data segments in one request (`seg_max`). Small enough for QEMU's default 128-entry
/// rings without indirect descriptors (header and status take two more).
pub const SEGMENTS_MAX: u32 = 126;

/// The longest data transfer one request may carry: what `size_max` × `seg_max` allows. Longer
/// requests come only from drivers that ignore the configuration and get IOERR.
pub const MAX_TRANSFER_BYTES: u64 = SEGMENT_SIZE_MAX as u64 * SEGMENTS_MAX as u64;

/// Upper bound of one discard or write-zeroes segment, in sectors (1 GiB), before rounding down
/// to the device block size.
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;

/// Most segments in one discard or write-zeroes request.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;

/// Size of the configuration space the backend answers from.
pub const CONFIG_SPACE_LEN: usize = 96;

/// The length of a virtio-blk serial number (`VIRTIO_BLK_ID_BYTES`).
pub const SERIAL_LEN: usize = 20;

/// Everything the request path needs to know about the device's limits, fixed for one
/// connection.
#[derive(Debug, Clone)]
pub struct BlkGeometry {
    /// Bytes the driver can address: the device size rounded down to whole sectors.
    pub size: u64,
    /// The device refuses writes.
    pub read_only: bool,
    /// Largest discard / write-zeroes segment in sectors.
    pub max_discard_sectors: u32,
    /// The serial number returned by GET_ID, zero-padded.
    pub serial: [u8; SERIAL_LEN],
}

impl BlkGeometry {
    /// Derives the limits from a device's info and the volume name. The name is truncated to
    /// 20 bytes, as virtio-blk's serial is.
    pub fn new(info: &DeviceInfo, name: &str) -> Self {
        let mut serial = [0u8; SERIAL_LEN];
        let n = name.len().min(SERIAL_LEN);
        serial[..n].copy_from_slice(&name.as_bytes()[..n]);
        let block_sectors = (u64::from(info.block_size) / SECTOR_SIZE).max(1);
        // Round the per-segment limit down to whole device blocks so that a maximal discard
        // stays aligned; keep at least one block.
        let max = u64::from(MAX_DISCARD_SECTORS);
        let max_discard_sectors = if block_sectors >= max {
            u32::try_from(block_sectors).unwrap_or(u32::MAX)
        } else {
            (max - max % block_sectors) as u32
        };
        BlkGeometry {
            size: info.size - info.size % SECTOR_SIZE,
            read_only: info.read_only,
            max_discard_sectors,
            serial,
        }
    }
}

/// The virtio features the backend offers. `read_only` adds `VIRTIO_BLK_F_RO`. MQ is always
/// offered; `num_queues` in the configuration space says how many queues there are.
pub fn virtio_features(read_only: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        VIRTIO_BLK_F_SIZE_MAX,
        VIRTIO_BLK_F_SEG_MAX,
        VIRTIO_BLK_F_BLK_SIZE,
        VIRTIO_BLK_F_TOPOLOGY,
        VIRTIO_BLK_F_FLUSH,
        VIRTIO_BLK_F_DISCARD,
        VIRTIO_BLK_F_WRITE_ZEROES,
        VIRTIO_BLK_F_MQ,
    ];
    let mut features = bits.iter().fold(0u64, |acc, &b| acc | (1u64 << b));
    if read_only {
        features |= 1 << VIRTIO_BLK_F_RO;
    }
    features | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The vhost-user protocol features the backend offers: CONFIG (QEMU's vhost-user-blk requires
/// it), MQ, REPLY_ACK, and CONFIGURE_MEM_SLOTS (which libblkio requires; the rust-vmm handler
/// implements ADD/REM_MEM_REG). INFLIGHT_SHMFD is left out: the handler does not implement it.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
}

/// Builds the configuration space described in the module documentation.
pub fn config_space(geo: &BlkGeometry, block_size: u32, num_queues: u16) -> [u8; CONFIG_SPACE_LEN] {
    let mut c = [0u8; CONFIG_SPACE_LEN];
    let put = |c: &mut [u8; CONFIG_SPACE_LEN], at: usize, bytes: &[u8]| {
        c[at..at + bytes.len()].copy_from_slice(bytes)
    };
    let block_sectors = (u64::from(block_size) / SECTOR_SIZE).max(1);
    let physical_block_exp = block_sectors.trailing_zeros() as u8;
    let min_io = block_sectors.min(1 << 15) as u16;
    let opt_io = u32::try_from(block_sectors).unwrap_or(u32::MAX);
    let discard_alignment = opt_io;
    put(&mut c, 0, &(geo.size / SECTOR_SIZE).to_le_bytes());
    put(&mut c, 8, &SEGMENT_SIZE_MAX.to_le_bytes());
    put(&mut c, 12, &SEGMENTS_MAX.to_le_bytes());
    put(&mut c, 20, &(SECTOR_SIZE as u32).to_le_bytes());
    c[24] = physical_block_exp;
    put(&mut c, 26, &min_io.to_le_bytes());
    put(&mut c, 28, &opt_io.to_le_bytes());
    put(&mut c, 34, &num_queues.to_le_bytes());
    put(&mut c, 36, &geo.max_discard_sectors.to_le_bytes());
    put(&mut c, 40, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    put(&mut c, 44, &discard_alignment.to_le_bytes());
    put(&mut c, 48, &geo.max_discard_sectors.to_le_bytes());
    put(&mut c, 52, &MAX_DISCARD_SEGMENTS.to_le_bytes());
    c[56] = 1;
    c
}

/// Reads `size` bytes at `offset` of a configuration space, zero-filled past its end.
pub fn read_config(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize)
        .saturating_add(size as usize)
        .min(space.len());
    out[..end - start].copy_from_slice(&space[start..end]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(size: u64, block_size: u32) -> DeviceInfo {
        DeviceInfo {
            size,
            read_only: false,
            block_size,
        }
    }

    #[test]
    fn config_fields_land_at_their_offsets() {
        let geo = BlkGeometry::new(&info(1 << 30, 65536), "vm-disk");
        let c = config_space(&geo, 65536, 2);
        assert_eq!(
            u64::from_le_bytes(c[0..8].try_into().unwrap()),
            (1 << 30) / 512
        );
        assert_eq!(u32::from_le_bytes(c[20..24].try_into().unwrap()), 512);
        assert_eq!(c[24], 7, "64 KiB = 2^7 sectors");
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(c[28..32].try_into().unwrap()), 128);
        assert_eq!(u16::from_le_bytes(c[34..36].try_into().unwrap()), 2);
        assert_eq!(u32::from_le_bytes(c[44..48].try_into().unwrap()), 128);
        assert_eq!(c[32], 0, "write cache enable is not offered");
        assert_eq!(
            u32::from_le_bytes(c[36..40].try_into().unwrap()) % 128,
            0,
            "maximal discards stay block aligned"
        );
        assert_eq!(c[56], 1);
    }

    #[test]
    fn huge_blocks_keep_limits_representable() {
        let geo = BlkGeometry::new(&info(1 << 40, 1 << 30), "x");
        assert_eq!(geo.max_discard_sectors, 1 << 21);
        let c = config_space(&geo, 1 << 30, 1);
        assert_eq!(u16::from_le_bytes(c[26..28].try_into().unwrap()), 1 << 15);
    }

    #[test]
    fn serial_is_truncated_and_padded() {
        let geo = BlkGeometry::new(&info(4096, 4096), "a-very-long-volume-name-indeed");
        assert_eq!(&geo.serial, b"a-very-long-volume-n");
        let geo = BlkGeometry::new(&info(4097, 4096), "short");
        assert_eq!(&geo.serial[..6], b"short\0");
        assert_eq!(geo.size, 4096, "a partial last sector is not addressable");
    }

    #[test]
    fn config_reads_past_the_end_are_zero() {
        let space = [1u8; 8];
        assert_eq!(read_config(&space, 6, 4), vec![1, 1, 0, 0]);
        assert_eq!(read_config(&space, 100, 2), vec![0, 0]);
        assert_eq!(read_config(&space, u32::MAX, 3), vec![0, 0, 0]);
    }

    #[test]
    fn features_follow_the_device() {
        let rw = virtio_features(false);
        let ro = virtio_features(true);
        assert_eq!(rw & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(ro & (1 << VIRTIO_BLK_F_RO), 0);
        assert_ne!(rw & (1 << VIRTIO_BLK_F_MQ), 0);
        assert_ne!(rw & (1 << VIRTIO_F_VERSION_1), 0);
    }
}
