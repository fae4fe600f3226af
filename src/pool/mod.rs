//! The thin pool: dm-thin's metadata (superblock, device details, two-level mapping tree, data
//! and metadata space maps) over the `uthin-btree` crate, plus `volumes.json` for names and
//! sizes. See `docs/pool.md` for the API the data path builds on and the crash protocol.

mod error;

pub mod details;
pub mod files;
pub mod size;
pub mod superblock;
pub mod volumes;

pub use error::PoolError;
mod info;
pub use info::{Committed, Discarded, Mapping, PoolStatus, Usage, VolumeInfo};
