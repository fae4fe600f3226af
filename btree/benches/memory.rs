//! Resident memory stays under the configured cache bound while a 10M-entry tree is built
//! (and read back): prints the cache occupancy and the process's resident set size.
//!
//! `cargo bench -p uthin-btree --bench memory` (figures in btree/DESIGN.md).

use std::sync::Arc;
use std::time::Instant;
use uthin_btree::*;

static SB: DmValidator =
    DmValidator::with_magic(BlockKind::Superblock, SUPERBLOCK_CSUM_XOR, 32, 27022010);

fn status(field: &str) -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn main() {
    // `cargo bench` passes --bench; nothing else is accepted.
    let entries: u64 = std::env::var("UTHIN_MEMORY_ENTRIES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000_000);
    let cache_bytes = 32 << 20;
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(FileIo::create(&dir.path().join("meta"), 200_000).unwrap());
    let cfg = TmConfig::with_cache_bytes(cache_bytes);
    let mut tm = TransactionManager::format(io, &cfg).unwrap();
    let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
    let rss_start = status("VmRSS:");
    let start = Instant::now();
    let mut max_cache = 0;
    for k in 0..entries {
        t.insert(&mut tm, k, &k).unwrap();
        if k % 1_000_000 == 999_999 {
            let root = t.root();
            tm.commit(&SB, |r| {
                let mut b = [0u8; BLOCK_SIZE];
                b[32..40].copy_from_slice(&27022010u64.to_le_bytes());
                b[192..320].copy_from_slice(&r.metadata_sm);
                b[320..328].copy_from_slice(&root.0.to_le_bytes());
                Ok(b)
            })
            .unwrap();
            let s = tm.cache_stats();
            max_cache = max_cache.max(s.blocks);
            println!(
                "memory: {:>9} entries, cache {} of {} blocks, RSS {} MiB (peak {} MiB), {:.1} s",
                k + 1,
                s.blocks,
                s.capacity,
                status("VmRSS:") / 1024,
                status("VmHWM:") / 1024,
                start.elapsed().as_secs_f64()
            );
        }
    }
    let mut sum = 0u64;
    for (i, r) in t.iter(&tm, ..).enumerate() {
        let (k, v) = r.unwrap();
        assert_eq!((k, v), (i as u64, i as u64));
        sum += 1;
    }
    assert_eq!(sum, entries);
    let used = tm.nr_blocks() - tm.nr_free();
    println!(
        "memory: {entries} entries ({} MiB of metadata), cache bound {} MiB: largest cache {} blocks, RSS at start {} MiB, peak RSS {} MiB",
        (used * BLOCK_SIZE as u64) >> 20,
        cache_bytes >> 20,
        max_cache,
        rss_start / 1024,
        status("VmHWM:") / 1024
    );
}
