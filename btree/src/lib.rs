//! uthin's persistent-data library: dm-thin's on-disk B-trees and space maps, crash-safe.
//!
//! The same structures as the Linux kernel's `drivers/md/persistent-data/` and
//! thin-provisioning-tools' `src/pdata`, so `thin_check` and `thin_dump` read what this crate
//! writes. Layers, each talking only to the one below:
//!
//! 1. [`io`]: whole-block I/O ([`BlockIo`]): file, memory, and a fault-injecting engine that
//!    models power loss.
//! 2. block cache (inside [`TransactionManager`]): bounded, dirty tracking, one
//!    [`Validator`] per block kind (dm's crc32c with per-kind xor, block number, magic).
//! 3. [`TransactionManager`]: shadowing, reference counts, commit.
//! 4. [`space_map`]: dm's metadata and disk space maps.
//! 5. [`BTree`]: dm's B-tree with value types that count what they reference.
//!
//! See `btree/DESIGN.md` for the byte layouts and the crash-safety argument.
#![deny(missing_docs)]

pub mod btree;
mod cache;
pub mod check;
pub mod checksum;
mod error;
pub mod io;
pub mod space_map;
pub mod tm;

pub use btree::{BTree, BytesValue, DataRef, Iter, SubtreeRef, U32Value, U64Value, ValueType};
pub use cache::BlockMut;
pub use check::{Discrepancy, RefCounter};
pub use checksum::{DmValidator, SUPERBLOCK_CSUM_XOR, Validator, dm_checksum};
pub use error::{BlockKind, Error, Result};
pub use io::{BlockIo, FaultyIo, FileIo, MemIo};
pub use space_map::{Extent, SM_ROOT_AREA, SmRoot};
pub use tm::{BlockRef, CacheStats, CommitInfo, CommitRoots, TmConfig, TransactionManager};

use std::fmt;

/// Size of a metadata block.
pub const BLOCK_SIZE: usize = 4096;

/// The bytes of one metadata block.
pub type Block = [u8; BLOCK_SIZE];

/// Number of a 4 KiB block in the metadata device.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct MetaBlock(pub u64);

impl fmt::Display for MetaBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "metadata block {}", self.0)
    }
}

/// Number of a block counted by the data (disk) space map — for dm-thin, a data block of the
/// pool's data device. Not a metadata block: the two spaces must not be mixed up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct DiskBlock(pub u64);

impl fmt::Display for DiskBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "data block {}", self.0)
    }
}
