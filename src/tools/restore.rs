//! `uthin restore`: builds a pool from thin_dump's XML (what `thin_restore` does), with the
//! pool files around it. Devices get no names (`uthin adopt` names them).

use std::path::Path;

use crate::pool::details::{BlockTime, DeviceDetails};
use crate::pool::{CreateOptions, Pool, PoolError};
use crate::tools::xml::XmlSuperblock;
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
    // Keep the metadata bounded: commit every so many mappings.
    const BATCH: u64 = 100_000;
    let mut n = 0u64;
    for d in &xml.devices {
        let dev = DevId(d.dev_id);
        pool.metadata_mut().restore_device(
            dev,
            DeviceDetails {
                mapped_blocks: d.mapped_blocks,
                transaction_id: d.transaction,
                creation_time: d.creation_time,
                snapshotted_time: d.snap_time,
            },
        )?;
        for m in &d.mappings {
            pool.metadata_mut().restore_mapping(
                dev,
                VirtBlock(m.origin),
                BlockTime {
                    block: DataBlock(m.data),
                    time: m.time,
                },
            )?;
            n += 1;
            if n % BATCH == 0 {
                pool.commit()?;
            }
        }
    }
    pool.metadata_mut()
        .restore_header(xml.time, xml.transaction);
    pool.commit()?;
    pool.sync_volumes_txid()?;
    Ok(pool)
}
