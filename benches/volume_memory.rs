//! Memory of the data path after many provisioned blocks (issue 5): provisions `--blocks`
//! data blocks of one thin volume through the volume layer (a 512-byte write at the start of
//! each 64 KiB block, QD32, so the data file grows by one 4 KiB file-system block per data
//! block), commits, reads every block back (filling the mapping cache to its bound), and prints
//! the process's resident memory at each step. Memory is bounded by the caches (the pool's
//! B-tree block cache and the volume layer's mapping cache), not by the number of mappings.
//!
//! ```text
//! cargo bench --bench volume_memory -- [--dir DIR] [--blocks 1048576] [--cache-entries 262144]
//! ```

mod support;
use support::rss_mib;

use std::io::{IoSlice, IoSliceMut};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use uthin::device::BlockDevice;
use uthin::pool::{CreateOptions, Pool};
use uthin::volume::{DEFAULT_CACHE_ENTRIES, Volume, VolumePool};

const BS: u64 = 65536;
const QD: u64 = 32;

/// Runs `op(i)` for i in 0..n on QD tasks.
async fn run<F, Fut>(vol: &Arc<Volume>, n: u64, op: F)
where
    F: Fn(Arc<Volume>, u64) -> Fut + Send + Sync + Clone + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..QD {
        let (next, vol, op) = (next.clone(), vol.clone(), op.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                op(vol.clone(), i).await;
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

fn main() {
    let mut dir = PathBuf::from("target/volume-memory");
    let mut blocks: u64 = 1 << 20;
    let mut cache = DEFAULT_CACHE_ENTRIES;
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dir" => dir = PathBuf::from(val()),
            "--blocks" => blocks = val().parse().expect("--blocks N"),
            "--cache-entries" => cache = val().parse().expect("--cache-entries N"),
            _ => {}
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let report = |what: &str, t0: Instant, vp: &VolumePool| {
        let (rss, peak) = rss_mib();
        let st = vp.pool().status().expect("status");
        println!(
            "{what:<28} {:>7.1} s  RSS {rss:>5} MiB (peak {peak:>5})  {:>8} mappings cached  \
             metadata {:>6} blocks used  data {:>8} blocks used",
            t0.elapsed().as_secs_f64(),
            vp.cached_mappings(),
            st.metadata_used_blocks,
            st.data_used_blocks,
        );
    };
    let pool = Pool::create(
        &dir,
        &CreateOptions {
            data_size: (blocks + blocks / 8) * BS,
            block_size: BS,
            metadata_size: None,
            force: true,
        },
    )
    .expect("pool");
    let vp = VolumePool::open(pool, cache).expect("volume pool");
    let t0 = Instant::now();
    report("open", t0, &vp);
    rt.block_on(async {
        vp.create_volume("v", blocks * BS).await.expect("create");
        let v = Arc::new(vp.volume("v").expect("volume"));
        let commits = vp.spawn_periodic_commit(std::time::Duration::from_secs(1));
        let t = Instant::now();
        run(&v, blocks, |v, i| async move {
            v.write(i * BS, &[IoSlice::new(&[0xA5u8; 512])], false)
                .await
                .expect("write");
        })
        .await;
        v.flush().await.expect("flush");
        report(&format!("{blocks} blocks provisioned"), t, &vp);
        let t = Instant::now();
        run(&v, blocks, |v, i| async move {
            let mut b = [0u8; 512];
            v.read(i * BS, &mut [IoSliceMut::new(&mut b)])
                .await
                .expect("read");
            assert_eq!(b[0], 0xA5);
        })
        .await;
        report("all read back", t, &vp);
        commits.abort();
    });
    println!("mapping cache bound: {cache} entries");
    drop(vp);
    let _ = std::fs::remove_dir_all(&dir);
}
