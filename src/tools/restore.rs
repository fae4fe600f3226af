//! `uthin restore`: builds a pool from thin_dump's XML (what `thin_restore` does), with the
//! pool files around it. Devices get no names (`uthin adopt` names them).

use std::path::Path;

use crate::pool::details::{BlockTime, DeviceDetails};
use crate::pool::metadata::Metadata;
use crate::pool::{CreateOptions, Pool, PoolError};
use crate::tools::xml::{XmlDevice, XmlMapping, XmlSuperblock};
use crate::units::{DataBlock, DevId, VirtBlock};

/// Creates a pool in `dir` holding exactly the devices and mappings of `xml`.
pub fn restore(
    dir: &Path,
    xml: &XmlSuperblock,
    metadata_size: Option<u64>,
    force: bool,
) -> Result<Pool, PoolError> {
    let block_size = u64::from(xml.data_block_size) * 512;
    let data_size = xml.nr_data_blocks.checked_mul(block_size).ok_or_else(|| {
        PoolError::InvalidArgument(format!(
            "{} data blocks of {block_size} bytes do not fit in 64 bits",
            xml.nr_data_blocks
        ))
    })?;
    let opts = CreateOptions {
        data_size,
        block_size,
        metadata_size,
        force,
    };
    let mut pool = Pool::create(dir, &opts)?;
    let mut since_commit = 0u64;
    for d in &xml.devices {
        write_device(pool.metadata_mut(), d, &mut since_commit)?;
    }
    pool.metadata_mut()
        .restore_header(xml.time, xml.transaction);
    pool.commit()?;
    pool.sync_volumes_txid()?;
    Ok(pool)
}

/// Mappings written between two commits: keeps the dirty blocks (and so memory) bounded.
const MAPPINGS_PER_COMMIT: u64 = 100_000;

/// Writes one device with its details and mappings into fresh metadata (what `restore` and
/// `repair` share), committing every [`MAPPINGS_PER_COMMIT`] mappings; `since_commit` carries
/// the count across devices. The data space map takes one reference per mapping, so blocks
/// mapped by several devices end up counted exactly.
pub(crate) fn write_device(
    meta: &mut Metadata,
    d: &XmlDevice,
    since_commit: &mut u64,
) -> Result<(), PoolError> {
    begin_device(meta, d)?;
    for m in &d.mappings {
        add_mapping(meta, DevId(d.dev_id), m, since_commit)?;
    }
    Ok(())
}

/// The first half of [`write_device`]: the device's details and an empty tree (`d.mappings`
/// is not looked at), for writers that stream the mappings with [`add_mapping`].
pub(crate) fn begin_device(meta: &mut Metadata, d: &XmlDevice) -> Result<(), PoolError> {
    meta.restore_device(
        DevId(d.dev_id),
        DeviceDetails {
            mapped_blocks: d.mapped_blocks,
            transaction_id: d.transaction,
            creation_time: d.creation_time,
            snapshotted_time: d.snap_time,
        },
    )
}

/// One mapping of a device begun with [`begin_device`] (see [`write_device`]).
pub(crate) fn add_mapping(
    meta: &mut Metadata,
    dev: DevId,
    m: &XmlMapping,
    since_commit: &mut u64,
) -> Result<(), PoolError> {
    meta.restore_mapping(
        dev,
        VirtBlock(m.origin),
        BlockTime {
            block: DataBlock(m.data),
            time: m.time,
        },
    )?;
    *since_commit += 1;
    if *since_commit >= MAPPINGS_PER_COMMIT {
        meta.commit()?;
        *since_commit = 0;
    }
    Ok(())
}
