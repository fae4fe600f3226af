//! The pool's error type: every variant names the thing that is wrong.

use std::path::PathBuf;

use crate::units::{DevId, VirtBlock};

/// Why a pool operation failed.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A file or device operation failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, with the path.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A metadata block failed validation (checksum, block number, magic, layout).
    #[error("corrupt metadata at block {block}: {what}")]
    Corrupt {
        /// The metadata block number.
        block: u64,
        /// What is wrong with it.
        what: String,
    },
    /// No free data block is left (ENOSPC); nothing was changed.
    #[error(
        "the pool is out of data space ({total} blocks, all in use): grow it with `uthin pool grow --data-size SIZE`"
    )]
    NoDataSpace {
        /// Data blocks in the pool.
        total: u64,
    },
    /// No free metadata block is left; nothing was changed.
    #[error(
        "the pool is out of metadata space: grow it with `uthin pool grow --metadata-size SIZE`"
    )]
    NoMetadataSpace,
    /// New volumes and snapshots are refused while free data space is under the minimum.
    #[error(
        "only {free_percent:.1}% of the pool's data space is free, under the {min_percent}% minimum: \
         grow the pool with `uthin pool grow --data-size SIZE` (or free space) before creating volumes"
    )]
    BelowMinFreeSpace {
        /// Free data space now, in percent.
        free_percent: f64,
        /// The minimum.
        min_percent: u8,
    },
    /// No volume has this name.
    #[error("no volume named `{0}`")]
    NoSuchVolume(String),
    /// No thin device has this id in the metadata.
    #[error("no thin device with id {0}")]
    NoSuchDevice(u32),
    /// The name is taken.
    #[error("a volume named `{0}` already exists")]
    VolumeExists(String),
    /// The device already has a name (adopt).
    #[error("thin device {dev_id} already has the name `{name}`")]
    DeviceNamed {
        /// The device.
        dev_id: u32,
        /// Its name.
        name: String,
    },
    /// The volume is read-only.
    #[error("volume `{0}` is read-only")]
    ReadOnlyVolume(String),
    /// A virtual block beyond what a mapping can address.
    #[error("{vblock} of {dev} is out of range")]
    OutOfRange {
        /// The device.
        dev: DevId,
        /// The block.
        vblock: VirtBlock,
    },
    /// A bad argument (name, size, option).
    #[error("{0}")]
    InvalidArgument(String),
    /// Another process owns the pool.
    #[error("pool {} is in use by {}", dir.display(), match pid { Some(p) => format!("process {p}"), None => "another process".to_string() })]
    Locked {
        /// The pool directory.
        dir: PathBuf,
        /// The holder's pid, when it could be read.
        pid: Option<u32>,
    },
    /// `pool create` over an existing pool without `--force`.
    #[error("{} already holds a pool; refusing to overwrite it (use --force to destroy it)", .0.display())]
    PoolExists(PathBuf),
    /// The directory has no pool.
    #[error("no pool at {} (no metadata file): create one with `uthin --pool {} pool create`", .0.display(), .0.display())]
    NoPool(PathBuf),
    /// volumes.json cannot be read.
    #[error("bad volumes file {0}")]
    BadVolumesFile(String),
    /// `set_transaction_id` with a stale old id.
    #[error("transaction id is {actual}, not {expected}")]
    TransactionIdMismatch {
        /// The id the caller expected.
        expected: u64,
        /// The id the metadata has.
        actual: u64,
    },
    /// A crash injected by a test (fault-injecting I/O or a stopped volumes.json write).
    #[error("injected crash: {0}")]
    InjectedCrash(String),
    /// Any other failure of the metadata layer (I/O, an aborted transaction, ...).
    #[error("metadata: {0}")]
    Metadata(uthin_btree::Error),
    /// The pool cannot be changed (opened read-only, or a previous commit failed).
    #[error("the pool is read-only: {0}")]
    ReadOnlyPool(String),
}

impl PoolError {
    /// An I/O error with context.
    pub fn io(context: impl Into<String>, source: std::io::Error) -> PoolError {
        PoolError::Io {
            context: context.into(),
            source,
        }
    }

    /// The errno a block-device server reports for this error.
    pub fn errno(&self) -> i32 {
        match self {
            PoolError::Io { source, .. } => source.raw_os_error().unwrap_or(libc::EIO),
            PoolError::NoDataSpace { .. }
            | PoolError::NoMetadataSpace
            | PoolError::BelowMinFreeSpace { .. } => libc::ENOSPC,
            PoolError::NoSuchVolume(_) | PoolError::NoSuchDevice(_) => libc::ENOENT,
            PoolError::VolumeExists(_) | PoolError::DeviceNamed { .. } => libc::EEXIST,
            PoolError::ReadOnlyVolume(_) | PoolError::ReadOnlyPool(_) => libc::EROFS,
            PoolError::OutOfRange { .. } | PoolError::InvalidArgument(_) => libc::EINVAL,
            PoolError::Locked { .. } => libc::EBUSY,
            _ => libc::EIO,
        }
    }
}

impl From<uthin_btree::Error> for PoolError {
    fn from(e: uthin_btree::Error) -> Self {
        use uthin_btree::Error as E;
        match e {
            E::MetadataSpaceExhausted { .. } => PoolError::NoMetadataSpace,
            E::DataSpaceExhausted { nr_blocks } => PoolError::NoDataSpace { total: nr_blocks },
            ref c if c.is_corruption() => PoolError::Corrupt {
                block: c.block().map_or(u64::MAX, |b| b.0),
                what: c.to_string(),
            },
            E::Io { ref source, .. } => {
                let errno = source.raw_os_error().unwrap_or(libc::EIO);
                PoolError::Io {
                    context: e.to_string(),
                    source: std::io::Error::from_raw_os_error(errno),
                }
            }
            other => PoolError::Metadata(other),
        }
    }
}

impl From<PoolError> for crate::device::DevError {
    fn from(e: PoolError) -> Self {
        match e {
            PoolError::NoDataSpace { .. } | PoolError::NoMetadataSpace => {
                crate::device::DevError::NoSpace(e.to_string())
            }
            PoolError::ReadOnlyVolume(_) => crate::device::DevError::ReadOnly,
            PoolError::Io { source, .. } => crate::device::DevError::Io(source),
            other => crate::device::DevError::Io(std::io::Error::other(other.to_string())),
        }
    }
}
