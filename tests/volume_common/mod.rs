//! Helpers shared by the volume tests: pools in temporary directories, thin-provisioning-tools'
//! `thin_check` on a metadata image, and write patterns that show misplaced data.
#![allow(dead_code)]

use std::path::Path;
use std::process::Command;

use uthin::pool::{CreateOptions, Pool};
use uthin::tools::check::check_live;
use uthin::volume::VolumePool;

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

/// The bytes a write with id `id` puts at position `i` of its buffer: never zero, different
/// from one write to the next, so a misplaced or lost write shows.
pub fn pattern(id: u64, len: u64) -> Vec<u8> {
    (0..len)
        .map(|i| ((id.wrapping_mul(131) + i * 7) % 251 + 1) as u8)
        .collect()
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

/// Runs `thin_check` on a metadata file; Err carries its output.
pub fn thin_check(metadata: &Path) -> Result<(), String> {
    let out = Command::new("thin_check")
        .arg(metadata)
        .output()
        .map_err(|e| format!("cannot run thin_check: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "thin_check {} failed ({}):\n{}{}",
            metadata.display(),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

/// Runs `thin_check` on a metadata image held in memory (written to a temporary file).
pub fn thin_check_bytes(image: &[u8]) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let path = dir.path().join("metadata");
    std::fs::write(&path, image).map_err(|e| e.to_string())?;
    thin_check(&path)
}
