//! What the pool reports: per-volume and pool-wide figures (plain data, serializable for
//! `--json`).

use serde::{Deserialize, Serialize};

use crate::units::{DataBlock, DevId};

/// A thin device as `list` shows it: its name record (when it has one) and its metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeInfo {
    /// Name from volumes.json; `None` for a device found only in the metadata.
    pub name: Option<String>,
    /// dm-thin device id.
    #[serde(serialize_with = "ser_dev", deserialize_with = "de_dev")]
    pub dev_id: DevId,
    /// Virtual size in bytes (`None` when the device has no name: dm-thin keeps no sizes).
    pub size: Option<u64>,
    /// Writes are refused.
    pub read_only: bool,
    /// Name of the origin it was snapshotted from.
    pub origin: Option<String>,
    /// Creation date (RFC 3339), when known.
    pub created: Option<String>,
    /// Mapped virtual blocks (from the device details).
    pub mapped_blocks: u64,
    /// Mapped bytes (`mapped_blocks` × block size).
    pub mapped_bytes: u64,
    /// Pool time at creation.
    pub creation_time: u32,
    /// Pool time of the last snapshot involving it.
    pub snapshotted_time: u32,
    /// The device is named in volumes.json but missing from the metadata (only after another
    /// tool changed the metadata; `uthin check` reports it).
    pub missing: bool,
}

fn ser_dev<S: serde::Serializer>(d: &DevId, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u32(d.0)
}

// Deserialize: `uthin serve` sends these over its control socket (src/daemon).
fn de_dev<'de, D: serde::Deserializer<'de>>(d: D) -> Result<DevId, D::Error> {
    u32::deserialize(d).map(DevId)
}

/// A volume's blocks split as `thin_ls` does: exclusive (data block count 1) and shared.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Mapped blocks found by walking the tree.
    pub mapped_blocks: u64,
    /// Mapped blocks whose data block nobody else references.
    pub exclusive_blocks: u64,
    /// Mapped blocks whose data block is referenced elsewhere too.
    pub shared_blocks: u64,
}

/// Pool-wide figures, what `docker info` and `dmsetup status` show.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PoolStatus {
    /// Data block size in bytes.
    pub block_size: u64,
    /// Data blocks in the pool.
    pub data_total_blocks: u64,
    /// Data blocks in use.
    pub data_used_blocks: u64,
    /// Free data blocks.
    pub data_free_blocks: u64,
    /// Metadata blocks (4 KiB) in the pool.
    pub metadata_total_blocks: u64,
    /// Metadata blocks in use.
    pub metadata_used_blocks: u64,
    /// Free metadata blocks.
    pub metadata_free_blocks: u64,
    /// Metadata transaction id.
    pub transaction_id: u64,
    /// Pool time (snapshot counter).
    pub time: u32,
    /// Thin devices in the metadata.
    pub device_count: u64,
    /// Devices with a name.
    pub volume_count: u64,
    /// Minimum free data space (percent) for new volumes and snapshots.
    pub min_free_space_percent: u8,
    /// Block of the held metadata snapshot, if one is reserved.
    pub metadata_snapshot: Option<u64>,
    /// The superblock's needs_check flag.
    pub needs_check: bool,
}

impl PoolStatus {
    /// Data bytes in the pool.
    pub fn data_total_bytes(&self) -> u64 {
        self.data_total_blocks * self.block_size
    }
    /// Data bytes in use.
    pub fn data_used_bytes(&self) -> u64 {
        self.data_used_blocks * self.block_size
    }
    /// Free data bytes.
    pub fn data_free_bytes(&self) -> u64 {
        self.data_free_blocks * self.block_size
    }
}

/// A lookup's answer: where a virtual block lives and whether a write must copy it first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mapping {
    /// The data block.
    pub block: DataBlock,
    /// True when the block is reachable from another device (a node on the path or the data
    /// block itself has a reference count above 1): a write must copy it (break sharing).
    pub shared: bool,
}

/// What a discard did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Virtual blocks that had a mapping and lost it.
    pub unmapped: u64,
    /// Every data block that lost a mapping (in virtual block order): these are now less
    /// shared than in the last commit, so the data path must not overwrite them in place
    /// before the next commit (a crash would bring the old sharer back).
    pub removed: Vec<DataBlock>,
    /// Data blocks whose count reached 0 (freed in this transaction; punched after commit);
    /// a subset of `removed`.
    pub freed: Vec<DataBlock>,
}

/// What a commit made durable.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Committed {
    /// Data blocks freed in the committed transaction: punch holes in them, then
    /// `Pool::release_freed`. They are not handed out before that.
    pub freed: Vec<DataBlock>,
}
