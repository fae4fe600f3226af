//! uthin: a userspace thin-provisioning pool.
//!
//! A pool is a metadata file in dm-thin's on-disk format (see the `uthin-btree` crate) and a
//! data file of fixed-size data blocks. Thin volumes and O(1) snapshots live in the pool and
//! are served over NBD and vhost-user-blk. See `docs/` and the repository's DESIGN notes for the
//! layers; each is one module here.
#![deny(missing_docs)]

pub mod cli;
pub mod daemon;
pub mod data;
pub mod device;
pub mod nbd;
pub mod pool;
pub mod tools;
pub mod units;
pub mod vhost;
pub mod volume;
