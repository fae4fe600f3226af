//! Helpers shared by the volume tests: pools in temporary directories, thin-provisioning-tools'
//! `thin_check` (from `pool_common`), and write patterns that show misplaced data.
#![allow(dead_code)]

#[path = "../pool_common/mod.rs"]
mod pool_common;
#[allow(unused_imports)] // each test binary uses a different subset
pub use pool_common::{Loop, thin_check, thin_check_bytes};

use uthin::device::BlockDevice;
use uthin::pool::{CreateOptions, Pool};
use uthin::tools::check::check_live;
use uthin::volume::{Volume, VolumePool};

/// Data block size of the test pools (the pool's smallest).
pub const BS: u64 = 65536;

/// Options for a pool of `data_blocks` data blocks and `metadata_bytes` of metadata.
pub fn create_opts(data_blocks: u64, metadata_bytes: u64) -> CreateOptions {
    CreateOptions {
        data_size: data_blocks * BS,
        block_size: BS,
        metadata_size: Some(metadata_bytes),
        force: false,
    }
}

/// A new pool of `data_blocks` data blocks and 2 MiB of metadata in a temporary directory,
/// open for the data path with a mapping cache of 1024 entries.
pub fn small_volume_pool(data_blocks: u64) -> (tempfile::TempDir, VolumePool) {
    let dir = tempfile::tempdir().unwrap();
    let pool = Pool::create(dir.path(), &create_opts(data_blocks, 2 << 20)).unwrap();
    (dir, VolumePool::open(pool, 1024).unwrap())
}

/// The bytes a write with id `id` puts at position `i` of its buffer: never zero, different
/// from one write to the next, so a misplaced or lost write shows.
pub fn pattern(id: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((id.wrapping_mul(131) + i * 7) % 251 + 1) as u8)
        .collect()
}

/// The whole of virtual block `vblock` of `v`, read into a buffer that starts non-zero (so
/// a read that leaves bytes untouched shows).
pub async fn read_block(v: &Volume, vblock: u64) -> Vec<u8> {
    let mut b = vec![0xEEu8; BS as usize];
    v.read(vblock * BS, &mut [std::io::IoSliceMut::new(&mut b)])
        .await
        .unwrap();
    b
}

/// A multi-threaded runtime like the servers'.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// `uthin check` of the open pool's current state: Err lists the problems.
pub fn uthin_check(pool: &Pool) -> Result<(), String> {
    let report = check_live(pool).map_err(|e| format!("check failed to run: {e}"))?;
    if report.is_clean() {
        Ok(())
    } else {
        Err(report.to_text())
    }
}

/// `uthin check` of a volume pool (flush first: the check reads the committed trees too).
pub fn uthin_check_volumes(vp: &VolumePool) -> Result<(), String> {
    uthin_check(&vp.pool())
}
