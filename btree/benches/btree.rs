//! B-tree benchmarks: inserts (sequential and random, with metadata bytes per entry), lookups
//! (cached and cold), clone, first write after a clone, commit latency.
//!
//! `cargo bench -p uthin-btree --bench btree` (figures in btree/DESIGN.md).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};
use uthin_btree::*;

const N: u64 = 1_000_000;
static SB: DmValidator =
    DmValidator::with_magic(BlockKind::Superblock, SUPERBLOCK_CSUM_XOR, 32, 27022010);

fn superblock(roots: &CommitRoots, tree: MetaBlock) -> Result<Block> {
    let mut b = [0u8; BLOCK_SIZE];
    b[32..40].copy_from_slice(&27022010u64.to_le_bytes());
    b[192..320].copy_from_slice(&roots.metadata_sm);
    b[320..328].copy_from_slice(&tree.0.to_le_bytes());
    Ok(b)
}

fn keys(random: bool) -> Vec<u64> {
    if !random {
        return (0..N).collect();
    }
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..N)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        })
        .collect()
}

/// Inserts `keys` into a fresh tree on a memory device and commits; returns the time per insert
/// and the metadata bytes per entry after the commit (space map blocks included).
fn fill(keys: &[u64]) -> (Duration, f64, TransactionManager, BTree<U64Value>) {
    let io = Arc::new(MemIo::new(65_536));
    let mut tm = TransactionManager::format(io, &TmConfig::default()).unwrap();
    let used_before = tm.nr_blocks() - tm.nr_free();
    let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
    let start = Instant::now();
    for &k in keys {
        t.insert(&mut tm, k, &k).unwrap();
    }
    let took = start.elapsed();
    let root = t.root();
    tm.commit(&SB, |r| superblock(r, root)).unwrap();
    let used = tm.nr_blocks() - tm.nr_free() - used_before;
    (
        took / keys.len() as u32,
        used as f64 * BLOCK_SIZE as f64 / keys.len() as f64,
        tm,
        t,
    )
}

fn inserts(c: &mut Criterion) {
    let mut g = c.benchmark_group("insert_1M");
    g.sample_size(10).measurement_time(Duration::from_secs(20));
    for (name, random) in [("sequential", false), ("random", true)] {
        let ks = keys(random);
        let (per, bpe, _, _) = fill(&ks);
        println!(
            "insert_1M/{name}: {:.0} ns/insert, {bpe:.1} metadata bytes/entry after commit",
            per.as_nanos()
        );
        g.bench_function(name, |b| {
            b.iter_custom(|iters| (0..iters).map(|_| fill(&ks).0 * N as u32).sum())
        });
    }
    g.finish();
}

fn lookups(c: &mut Criterion) {
    let ks = keys(true);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let sm_root;
    let root;
    {
        let io = Arc::new(FileIo::create(&path, 65_536).unwrap());
        let mut tm = TransactionManager::format(io, &TmConfig::default()).unwrap();
        let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
        for &k in &ks {
            t.insert(&mut tm, k, &k).unwrap();
        }
        root = t.root();
        let mut sm = [0u8; 128];
        tm.commit(&SB, |r| {
            sm = r.metadata_sm;
            superblock(r, root)
        })
        .unwrap();
        sm_root = sm;
    }
    let mut g = c.benchmark_group("lookup_1M_random_tree");
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(&path).unwrap());
    let tm = TransactionManager::open(io.clone(), &TmConfig::default(), &sm_root).unwrap();
    let t = BTree::<U64Value>::open(root);
    for &k in &ks {
        t.lookup(&tm, k).unwrap();
    }
    let mut i = 0usize;
    g.bench_function("cached", |b| {
        b.iter(|| {
            i = (i + 7919) % ks.len();
            black_box(t.lookup(&tm, ks[i]).unwrap())
        })
    });
    g.bench_function("cached_with_sharing_flag", |b| {
        b.iter(|| {
            i = (i + 7919) % ks.len();
            black_box(t.lookup_shared(&tm, ks[i]).unwrap())
        })
    });
    // Cold: a fresh transaction manager (empty block cache) per lookup, so every node on the
    // path is read with pread (from the kernel's page cache) and validated.
    g.bench_function("cold_block_cache", |b| {
        b.iter_batched(
            || TransactionManager::open(io.clone(), &TmConfig::default(), &sm_root).unwrap(),
            |tm| {
                i = (i + 7919) % ks.len();
                black_box(t.lookup(&tm, ks[i]).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn clones(c: &mut Criterion) {
    let (_, _, mut tm, t) = fill(&keys(false));
    let mut g = c.benchmark_group("clone_1M");
    g.bench_function("clone_tree", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let start = Instant::now();
                let c = t.clone_tree(&mut tm).unwrap();
                total += start.elapsed();
                c.delete(&mut tm).unwrap();
            }
            total
        })
    });
    let mut k = 0u64;
    g.bench_function("first_write_after_clone", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let mut c = t.clone_tree(&mut tm).unwrap();
                k = (k + 104_729) % N;
                let start = Instant::now();
                c.insert(&mut tm, k, &1).unwrap();
                total += start.elapsed();
                c.delete(&mut tm).unwrap();
            }
            total
        })
    });
    g.finish();
}

fn commits(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(FileIo::create(&dir.path().join("meta"), 65_536).unwrap());
    let mut tm = TransactionManager::format(io, &TmConfig::default()).unwrap();
    let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
    for k in keys(true) {
        t.insert(&mut tm, k, &k).unwrap();
    }
    let root = t.root();
    tm.commit(&SB, |r| superblock(r, root)).unwrap();
    let mut g = c.benchmark_group("commit_fdatasync");
    g.sample_size(20);
    let mut x = 1u64;
    for (name, inserts) in [("one_insert", 1u64), ("1000_dirty_leaves", 1000)] {
        let mut dirty = 0;
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    for _ in 0..inserts {
                        x = x
                            .wrapping_mul(6364136223846793005)
                            .wrapping_add(1442695040888963407);
                        t.insert(&mut tm, x, &x).unwrap();
                    }
                    let root = t.root();
                    let start = Instant::now();
                    let info = tm.commit(&SB, |r| superblock(r, root)).unwrap();
                    total += start.elapsed();
                    dirty = info.blocks_written;
                }
                total
            })
        });
        println!("commit_fdatasync/{name}: {dirty} blocks written per commit");
    }
    g.finish();
}

criterion_group!(benches, inserts, lookups, clones, commits);
criterion_main!(benches);
