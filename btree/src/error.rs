//! The crate's error type: every failure that concerns a metadata block names the block and what
//! kind of block it was supposed to be, so a corrupt file is reported, never trusted.

use crate::MetaBlock;
use std::fmt;
use std::io;

/// What a metadata block was expected to hold when it was read or written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// The caller's superblock (block 0 for dm-thin).
    Superblock,
    /// A B-tree node (internal or leaf).
    BTreeNode,
    /// A space-map bitmap block (2-bit reference counts).
    Bitmap,
    /// The metadata space map's index block.
    Index,
    /// A block of a kind defined by the caller (its validator names it).
    Other(&'static str),
    /// No particular kind (raw I/O, allocation bookkeeping).
    Unknown,
}

impl fmt::Display for BlockKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlockKind::Superblock => f.write_str("superblock"),
            BlockKind::BTreeNode => f.write_str("btree node"),
            BlockKind::Bitmap => f.write_str("space map bitmap"),
            BlockKind::Index => f.write_str("space map index"),
            BlockKind::Other(name) => f.write_str(name),
            BlockKind::Unknown => f.write_str("block"),
        }
    }
}

/// Everything that can go wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The block I/O engine failed.
    #[error("{op} of {block} ({kind}) failed: {source}")]
    Io {
        /// The block concerned (`None` for a sync).
        block: OptBlock,
        /// What it was expected to hold.
        kind: BlockKind,
        /// "read", "write" or "sync".
        op: &'static str,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The stored checksum does not match the block's contents.
    #[error("{block} ({kind}): bad checksum: stored {stored:#010x}, computed {computed:#010x}")]
    BadChecksum {
        /// The block read.
        block: MetaBlock,
        /// What it was expected to hold.
        kind: BlockKind,
        /// Checksum field found in the block.
        stored: u32,
        /// Checksum computed over the block.
        computed: u32,
    },
    /// The block records another block number than the one it was read from (a misdirected write).
    #[error("{block} ({kind}): records block number {found}")]
    WrongBlockNumber {
        /// The block read.
        block: MetaBlock,
        /// What it was expected to hold.
        kind: BlockKind,
        /// The block number written inside it.
        found: u64,
    },
    /// The block's magic number is not the expected one.
    #[error("{block} ({kind}): bad magic {found:#x}, expected {expected:#x}")]
    BadMagic {
        /// The block read.
        block: MetaBlock,
        /// What it was expected to hold.
        kind: BlockKind,
        /// Magic found.
        found: u64,
        /// Magic expected.
        expected: u64,
    },
    /// The block passed its checksum but its contents make no sense (a header field out of range,
    /// a value size that does not match the tree, a reference outside the device).
    #[error("{block} ({kind}): malformed: {reason}")]
    Malformed {
        /// The block concerned.
        block: MetaBlock,
        /// What it was expected to hold.
        kind: BlockKind,
        /// What is wrong.
        reason: String,
    },
    /// No free metadata block is left (grow the metadata device).
    #[error("metadata space exhausted: all {nr_blocks} metadata blocks are in use")]
    MetadataSpaceExhausted {
        /// Size of the metadata space map in blocks.
        nr_blocks: u64,
    },
    /// No free block is left in the data space map.
    #[error("data space exhausted: all {nr_blocks} data blocks are in use")]
    DataSpaceExhausted {
        /// Size of the data space map in blocks.
        nr_blocks: u64,
    },
    /// A block number outside the space a space map covers.
    #[error("{space} block {block} is out of range (the space map has {nr_blocks} blocks)")]
    OutOfRange {
        /// "metadata" or "data".
        space: &'static str,
        /// The block number asked for.
        block: u64,
        /// Number of blocks the space map covers.
        nr_blocks: u64,
    },
    /// A reference count would go below zero (a double free): the metadata is inconsistent.
    #[error("{space} block {block}: reference count would drop below zero")]
    RefCountUnderflow {
        /// "metadata" or "data".
        space: &'static str,
        /// The block.
        block: u64,
    },
    /// A space map root or other argument handed in by the caller is invalid.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A request this crate cannot honour (for example a space map larger than the format allows).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// An earlier error left the transaction half done; drop the transaction manager and reopen
    /// from the last committed superblock.
    #[error("the transaction was aborted by an earlier error ({0}); reopen from the last commit")]
    Poisoned(String),
    /// A bug in this crate's own bookkeeping was detected (reported instead of panicking).
    #[error("internal error: {0}")]
    Internal(String),
}

/// An optional block number that prints well inside error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptBlock(pub Option<MetaBlock>);

impl fmt::Display for OptBlock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(b) => b.fmt(f),
            None => f.write_str("the metadata device"),
        }
    }
}

impl Error {
    /// The metadata block this error is about, if any.
    pub fn block(&self) -> Option<MetaBlock> {
        match self {
            Error::Io { block, .. } => block.0,
            Error::BadChecksum { block, .. }
            | Error::WrongBlockNumber { block, .. }
            | Error::BadMagic { block, .. }
            | Error::Malformed { block, .. } => Some(*block),
            _ => None,
        }
    }

    /// True for errors that mean the metadata on disk is damaged (as opposed to I/O failures,
    /// exhausted space or misuse).
    pub fn is_corruption(&self) -> bool {
        matches!(
            self,
            Error::BadChecksum { .. }
                | Error::WrongBlockNumber { .. }
                | Error::BadMagic { .. }
                | Error::Malformed { .. }
                | Error::RefCountUnderflow { .. }
        )
    }

    pub(crate) fn malformed(block: MetaBlock, kind: BlockKind, reason: impl Into<String>) -> Self {
        Error::Malformed {
            block,
            kind,
            reason: reason.into(),
        }
    }

    /// A copy of this error good enough to report again later (for the poisoned state).
    pub(crate) fn summary(&self) -> String {
        self.to_string()
    }
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;
