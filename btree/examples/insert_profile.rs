//! Inserts 1M random keys into a fresh tree and commits (a target for `perf record`).
//!
//! `cargo run --release -p uthin-btree --example insert_profile [random|sequential] [lookups]`

use std::sync::Arc;
use std::time::Instant;
use uthin_btree::*;

fn main() {
    let random = std::env::args().nth(1).as_deref() != Some("sequential");
    let io = Arc::new(MemIo::new(65_536));
    let mut tm = TransactionManager::format(io, &TmConfig::default()).expect("format");
    let mut t = BTree::<U64Value>::create(&mut tm).expect("create");
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let start = Instant::now();
    for i in 0..1_000_000u64 {
        let k = if random {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        } else {
            i
        };
        t.insert(&mut tm, k, &k).expect("insert");
    }
    println!("{:.0} ns/insert", start.elapsed().as_nanos() as f64 / 1e6);
    if std::env::args().nth(2).as_deref() == Some("lookups") {
        let start = Instant::now();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut found = 0u64;
        for i in 0..4_000_000u64 {
            let k = if random {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x
            } else {
                (i * 7919) % 1_000_000
            };
            found += t.lookup(&tm, k).expect("lookup").is_some() as u64;
        }
        println!(
            "{:.0} ns/lookup ({found} found)",
            start.elapsed().as_nanos() as f64 / 4e6
        );
    }
}
