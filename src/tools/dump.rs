//! `uthin dump`: the pool's metadata as thin_dump's XML (byte for byte what `thin_dump`
//! prints for the same file).

use crate::pool::{Pool, PoolError};
use crate::tools::xml::{XmlDevice, XmlMapping, XmlSuperblock, write_xml};
use crate::units::DevId;

/// The pool's current metadata as an [`XmlSuperblock`].
pub fn dump(pool: &Pool) -> Result<XmlSuperblock, PoolError> {
    let meta = pool.metadata();
    let sb = &meta.sb;
    let mut out = XmlSuperblock {
        uuid: String::new(),
        time: sb.time,
        transaction: sb.transaction_id,
        flags: sb.flags,
        version: sb.version,
        data_block_size: sb.data_block_size_sectors,
        nr_data_blocks: meta.data_nr_blocks(),
        devices: Vec::new(),
    };
    for dev in meta.device_ids()? {
        let d = meta.details(dev)?.unwrap_or_default();
        let mut mappings = Vec::new();
        meta.walk_mappings(DevId(dev.0), &mut |vb, bt| {
            mappings.push(XmlMapping {
                origin: vb.0,
                data: bt.block.0,
                time: bt.time,
            });
            Ok(())
        })?;
        out.devices.push(XmlDevice {
            dev_id: dev.0,
            mapped_blocks: d.mapped_blocks,
            transaction: d.transaction_id,
            creation_time: d.creation_time,
            snap_time: d.snapshotted_time,
            mappings,
        });
    }
    Ok(out)
}

/// The pool's current metadata as thin_dump's XML text.
pub fn dump_xml(pool: &Pool) -> Result<String, PoolError> {
    Ok(write_xml(&dump(pool)?))
}
