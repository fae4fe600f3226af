//! Pool benchmarks (issue 4):
//! - `snapshot/{1K,1M}`: snapshot of a volume with 1K vs 1M mapped blocks (O(1): the same time);
//! - `provision_1M`: provisioning 1M blocks in commits of 1,000 (µs per block; metadata bytes
//!   per mapping printed);
//! - `open_10M`: opening a pool with 10M mappings (no full scan);
//! - `check_1M/{uthin,thin_check}`: `uthin check` against `thin_check` on the same file.
//!
//! Metadata lives in a real file; volumes.json and the metadata file sit in /dev/shm (tmpfs)
//! so the figures measure the pool's work, not this machine's fsync latency (the `*_ext4`
//! variants show that cost on the root file system).
//!
//! Run: `cargo bench --bench pool` (the 10M-mapping pool is built once, ~1 min, and kept in
//! /tmp/uthin-bench-10m).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use criterion::{Criterion, criterion_group, criterion_main};
use uthin::pool::{CreateOptions, Pool};
use uthin::units::VirtBlock;

const BS: u64 = 64 << 10;

fn new_pool(dir: &Path, data_blocks: u64, meta_size: u64) -> Pool {
    Pool::create(
        dir,
        &CreateOptions {
            data_size: data_blocks * BS,
            block_size: BS,
            metadata_size: Some(meta_size),
            force: true,
        },
    )
    .expect("pool")
}

/// Provisions `n` blocks of `vol` sequentially, committing every `batch`.
fn fill(pool: &mut Pool, vol: &str, n: u64, batch: u64) {
    let dev = pool.volume(vol).unwrap().dev_id;
    for vb in 0..n {
        pool.provision(dev, VirtBlock(vb)).unwrap();
        if (vb + 1) % batch == 0 {
            let c = pool.commit().unwrap();
            pool.release_freed(&c.freed);
        }
    }
    pool.commit().unwrap();
}

fn shm_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(name)
        .tempdir_in("/dev/shm")
        .expect("tmpfs dir")
}

fn bench_snapshot(c: &mut Criterion) {
    let mut g = c.benchmark_group("snapshot");
    g.sample_size(30);
    for (label, mapped) in [("1K", 1_000u64), ("1M", 1_000_000)] {
        let dir = shm_dir("uthin-snap");
        let mut pool = new_pool(dir.path(), 2_000_000, 64 << 20);
        pool.create_volume("origin", 2_000_000 * BS).unwrap();
        fill(&mut pool, "origin", mapped, 10_000);
        let mut i = 0u64;
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let name = format!("s{i}");
                    i += 1;
                    let t = Instant::now();
                    pool.snapshot("origin", &name, false).unwrap();
                    total += t.elapsed();
                    // Keep the pool small: drop it again (not timed).
                    pool.delete_volume(&name).unwrap();
                }
                total
            })
        });
    }
    g.finish();
}

fn bench_provision(c: &mut Criterion) {
    let mut g = c.benchmark_group("provision_1M");
    g.sample_size(10);
    g.measurement_time(Duration::from_secs(20));
    let mut bytes_per_mapping = 0.0;
    g.bench_function("commits_of_1000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let dir = shm_dir("uthin-prov");
                let mut pool = new_pool(dir.path(), 1_100_000, 64 << 20);
                pool.create_volume("v", 1_100_000 * BS).unwrap();
                let used0 = pool.status().unwrap().metadata_used_blocks;
                let t = Instant::now();
                fill(&mut pool, "v", 1_000_000, 1_000);
                total += t.elapsed();
                let used = pool.status().unwrap().metadata_used_blocks - used0;
                bytes_per_mapping = used as f64 * 4096.0 / 1e6;
            }
            // Criterion reports the time per 1M blocks; µs per block = that / 1e6.
            total
        })
    });
    g.finish();
    if bytes_per_mapping > 0.0 {
        eprintln!("provision_1M: metadata bytes per mapping: {bytes_per_mapping:.1}");
    }
}

/// A pool with 10M mappings (one volume), built once and kept between runs.
fn ten_million_pool() -> PathBuf {
    let dir = PathBuf::from("/tmp/uthin-bench-10m");
    let done = dir.join("built");
    if !done.exists() {
        let t = Instant::now();
        let _ = std::fs::remove_dir_all(&dir);
        let mut pool = new_pool(&dir, 11_000_000, 400 << 20);
        pool.create_volume("big", 11_000_000 * BS).unwrap();
        fill(&mut pool, "big", 10_000_000, 100_000);
        drop(pool);
        std::fs::write(&done, b"").unwrap();
        eprintln!("built the 10M-mapping pool in {:?}", t.elapsed());
    }
    dir
}

fn bench_open(c: &mut Criterion) {
    let dir = ten_million_pool();
    let mut g = c.benchmark_group("open_10M");
    g.sample_size(20);
    g.bench_function("open_and_lookup", |b| {
        b.iter(|| {
            let pool = Pool::open(&dir).unwrap();
            let dev = pool.volume("big").unwrap().dev_id;
            pool.lookup(dev, VirtBlock(5_000_000)).unwrap().unwrap()
        })
    });
    g.finish();
}

fn bench_check(c: &mut Criterion) {
    let dir = shm_dir("uthin-check");
    {
        // Room above the 10% free-space guard for the snapshot.
        let mut pool = new_pool(dir.path(), 2_000_000, 64 << 20);
        pool.create_volume("v", 2_000_000 * BS).unwrap();
        fill(&mut pool, "v", 1_000_000, 10_000);
        pool.snapshot("v", "s", false).unwrap();
    }
    let mut g = c.benchmark_group("check_1M");
    g.sample_size(10);
    g.bench_function("uthin", |b| {
        b.iter(|| {
            let r = uthin::tools::check::check_pool(dir.path(), false).unwrap();
            assert!(r.is_clean());
        })
    });
    let meta = dir.path().join("metadata");
    g.bench_function("thin_check", |b| {
        b.iter(|| {
            let s = Command::new("thin_check")
                .arg("-q")
                .arg(&meta)
                .status()
                .unwrap();
            assert!(s.success());
        })
    });
    g.finish();
}

criterion_group!(
    benches,
    bench_snapshot,
    bench_provision,
    bench_open,
    bench_check
);
criterion_main!(benches);
