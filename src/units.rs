//! Newtypes for the numbering spaces of a pool, so block numbers of different spaces cannot be
//! mixed up: a data block (in the data file) is not a virtual block (in a volume), and neither is
//! a metadata block (`uthin_btree::MetaBlock`, in the metadata file).

use std::fmt;

/// Index of a data block in the pool's data file: byte offset = index × data block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DataBlock(pub u64);

/// Index of a block inside one thin volume: byte offset in the volume = index × data block size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtBlock(pub u64);

/// dm-thin's device id of a thin volume or snapshot (24 bits in dm-thin).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DevId(pub u32);

impl DevId {
    /// The largest device id dm-thin accepts ((1 << 24) - 1).
    pub const MAX: DevId = DevId((1 << 24) - 1);
}

impl fmt::Display for DataBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "data block {}", self.0)
    }
}

impl fmt::Display for VirtBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "virtual block {}", self.0)
    }
}

impl fmt::Display for DevId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device {}", self.0)
    }
}
