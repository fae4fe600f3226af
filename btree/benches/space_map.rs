//! Allocation from a 2^32-block disk space map (dm's largest data devices): data blocks per
//! second from `data_alloc`, with the map committed (so both the committed and the current
//! bitmaps are consulted).
//!
//! `cargo bench -p uthin-btree --bench space_map` (figures in btree/DESIGN.md).

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use std::sync::Arc;
use std::time::Instant;
use uthin_btree::space_map::ENTRIES_PER_BITMAP;
use uthin_btree::*;

static SB: DmValidator =
    DmValidator::with_magic(BlockKind::Superblock, SUPERBLOCK_CSUM_XOR, 32, 27022010);

fn alloc(c: &mut Criterion) {
    let nr: u64 = 1 << 32;
    let bitmaps = nr.div_ceil(ENTRIES_PER_BITMAP);
    let dir = tempfile::tempdir().unwrap();
    let meta_blocks = bitmaps + bitmaps / 100 + 20_000;
    let io = Arc::new(FileIo::create(&dir.path().join("meta"), meta_blocks).unwrap());
    let start = Instant::now();
    let mut tm = TransactionManager::format(io, &TmConfig::default()).unwrap();
    tm.create_data_sm(nr).unwrap();
    tm.commit(&SB, |r| {
        let mut b = [0u8; BLOCK_SIZE];
        b[32..40].copy_from_slice(&27022010u64.to_le_bytes());
        b[192..320].copy_from_slice(&r.metadata_sm);
        b[64..192].copy_from_slice(&r.data_sm.unwrap());
        Ok(b)
    })
    .unwrap();
    println!(
        "space_map: created and committed a {nr}-block data space map ({bitmaps} bitmaps) in {:.1} s",
        start.elapsed().as_secs_f64()
    );
    let mut g = c.benchmark_group("data_space_map_2^32");
    g.throughput(Throughput::Elements(1));
    g.bench_function("data_alloc", |b| b.iter(|| tm.data_alloc().unwrap()));
    g.bench_function("data_inc_dec", |b| {
        let blk = tm.data_alloc().unwrap();
        b.iter(|| {
            tm.data_inc(blk).unwrap();
            tm.data_dec(blk).unwrap();
        })
    });
    g.finish();
}

criterion_group!(benches, alloc);
criterion_main!(benches);
