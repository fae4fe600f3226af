//! The volume layer against a plain file through the same data engine (issue 5).
//!
//! Both sides use one `DataFile` engine, 2 tokio workers, queue depth 32 (32 tasks with one
//! request each in flight), buffered I/O. The plain side addresses a 4 GiB file directly (a
//! request is one vectored syscall, as a plain file through this engine would do it); the
//! volume side is a 4 GiB thin volume of a real pool (dm-thin metadata in `DIR/metadata`, data
//! blocks of 64 KiB in `DIR/data`) through `Volume`: splitting, mapping cache, in-flight
//! table, allocation, copy-on-write, B-tree lookups and inserts. Each round builds fresh files
//! and runs plain and volume back to back for each workload:
//!
//! - fresh-4k: `--ops` 4 KiB writes, each to a block never written before (allocate on demand);
//! - overwrite-4k / read-4k: random 4 KiB in those blocks, `--secs` each;
//! - seqwrite-1m / seqread-1m: the whole 4 GiB in 1 MiB requests;
//! - cow-4k: after a snapshot, `--cow-ops` 4 KiB writes each to a different shared block (the
//!   plain side overwrites the same offsets). The default is every block of the volume once,
//!   so the metadata side (shadowing shared leaves, which takes a reference on every block in
//!   them) is paid in full, as a workload that rewrites a whole snapshot pays it;
//! - commit: the latency of a flush issued every 50 ms during `--ops / 2` more fresh 4 KiB
//!   writes (volume only; not part of the timed fresh-4k runs).
//!
//! ```text
//! cargo bench --bench volume -- [--dir DIR] [--size-gib 4] [--ops 20000] [--cow-ops N]
//!                                [--secs 3] [--rounds 3]
//! ```

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uthin::data::DataFile;
use uthin::device::BlockDevice;
use uthin::pool::{CreateOptions, Pool};
use uthin::units::DataBlock;
use uthin::volume::{DEFAULT_CACHE_ENTRIES, Volume, VolumePool};

const QD: usize = 32;
const BS: u64 = 65536;

/// Either side of the comparison, behind one interface.
enum Target {
    Plain(Arc<DataFile>),
    Vol(Arc<Volume>),
}

impl Clone for Target {
    fn clone(&self) -> Self {
        match self {
            Target::Plain(d) => Target::Plain(d.clone()),
            Target::Vol(v) => Target::Vol(v.clone()),
        }
    }
}

impl Target {
    async fn write(&self, off: u64, buf: &[u8]) {
        match self {
            Target::Plain(d) => d
                .write(DataBlock(off / BS), (off % BS) as u32, &[IoSlice::new(buf)])
                .await
                .expect("plain write"),
            Target::Vol(v) => v
                .write(off, &[IoSlice::new(buf)], false)
                .await
                .expect("volume write"),
        }
    }

    async fn read(&self, off: u64, buf: &mut [u8]) {
        match self {
            Target::Plain(d) => d
                .read(
                    DataBlock(off / BS),
                    (off % BS) as u32,
                    &mut [IoSliceMut::new(buf)],
                )
                .await
                .expect("plain read"),
            Target::Vol(v) => v
                .read(off, &mut [IoSliceMut::new(buf)])
                .await
                .expect("volume read"),
        }
    }
}

fn xorshift(s: &mut u64) -> u64 {
    *s ^= *s << 13;
    *s ^= *s >> 7;
    *s ^= *s << 17;
    *s
}

/// Runs `QD` tasks; task `t` calls `op(target, t, i)` for its i-th request until `count`
/// requests are done in total (or `secs` pass, if given). Returns requests per second.
async fn drive<F, Fut>(target: &Target, count: Option<u64>, secs: Option<f64>, op: F) -> f64
where
    F: Fn(Target, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let deadline = secs.map(|s| start + Duration::from_secs_f64(s));
    let mut tasks = Vec::new();
    for _ in 0..QD {
        let (op, next, stop, done, target) = (
            op.clone(),
            next.clone(),
            stop.clone(),
            done.clone(),
            target.clone(),
        );
        tasks.push(tokio::spawn(async move {
            loop {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if count.is_some_and(|c| i >= c) {
                    break;
                }
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    break;
                }
                op(target.clone(), i).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

struct Args {
    dir: PathBuf,
    size: u64,
    ops: u64,
    cow_ops: Option<u64>,
    secs: f64,
    rounds: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("target/volume-bench"),
        size: 4 << 30,
        ops: 20_000,
        cow_ops: None,
        secs: 3.0,
        rounds: 3,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(val()),
            "--size-gib" => a.size = val().parse::<u64>().expect("--size-gib N") << 30,
            "--ops" => a.ops = val().parse().expect("--ops N"),
            "--cow-ops" => a.cow_ops = Some(val().parse().expect("--cow-ops N")),
            "--secs" => a.secs = val().parse().expect("--secs S"),
            "--rounds" => a.rounds = val().parse().expect("--rounds N"),
            _ => {}
        }
    }
    a
}

fn fresh_file(path: &Path, blocks: u64) -> DataFile {
    let _ = std::fs::remove_file(path);
    let d = DataFile::open(path, BS as u32, true).expect("data file");
    d.grow(blocks).expect("grow");
    d
}

/// The i-th distinct block of a fixed random permutation-ish order (odd multiplier mod 2^k).
fn spread(i: u64, blocks: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9) + 7) % blocks
}

const WORKLOADS: [&str; 6] = [
    "fresh-4k",
    "overwrite-4k",
    "read-4k",
    "seqwrite-1m",
    "seqread-1m",
    "cow-4k",
];

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.dir).expect("bench dir");
    let blocks = args.size / BS;
    let ops = args.ops.min(blocks);
    let cow_ops = args.cow_ops.unwrap_or(blocks).min(blocks);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // [workload][plain=0/volume=1] → per-round rates
    let mut res = vec![[Vec::new(), Vec::new()]; WORKLOADS.len()];
    let mut commit_ms: Vec<f64> = Vec::new();
    for round in 0..args.rounds {
        let plain = Target::Plain(Arc::new(fresh_file(&args.dir.join("plain"), blocks)));
        let pool_dir = args.dir.join("pool");
        // A fresh, fully sparse data file every round.
        let _ = std::fs::remove_dir_all(&pool_dir);
        let pool = Pool::create(
            &pool_dir,
            &CreateOptions {
                data_size: args.size * 2,
                block_size: BS,
                metadata_size: None,
                force: true,
            },
        )
        .expect("pool");
        let pool = VolumePool::open(pool, DEFAULT_CACHE_ENTRIES).expect("volume pool");
        rt.block_on(pool.create_volume("bench", args.size))
            .expect("create");
        let vol = Target::Vol(Arc::new(pool.volume("bench").expect("volume")));
        let sides = [plain, vol];
        let buf4k = Arc::new(vec![0x5Au8; 4096]);
        let buf1m = Arc::new(vec![0xA5u8; 1 << 20]);
        let size = args.size;
        let mut report = |w: usize, side: usize, rate: f64| {
            let io = if w == 3 || w == 4 { 1 << 20 } else { 4096 };
            eprintln!(
                "round {round} {:>13} {:>6}: {:>9.0} IOPS {:>8.1} MiB/s",
                WORKLOADS[w],
                ["plain", "volume"][side],
                rate,
                rate * io as f64 / (1 << 20) as f64
            );
            res[w][side].push(rate);
        };
        rt.block_on(async {
            // fresh-4k, both sides with no flush.
            for (s, t) in sides.iter().enumerate() {
                let b = buf4k.clone();
                let r = drive(t, Some(ops), None, move |t, i| {
                    let b = b.clone();
                    async move { t.write(spread(i, blocks) * BS + 8192, &b).await }
                })
                .await;
                report(0, s, r);
            }
            // The cost of a commit under load: more fresh writes on the volume (other
            // blocks), with a flush every 50 ms whose latency is recorded.
            if let Target::Vol(v) = &sides[1] {
                let stop = Arc::new(AtomicBool::new(false));
                let (fv, fstop) = (v.clone(), stop.clone());
                let flusher = tokio::spawn(async move {
                    let mut lat = Vec::new();
                    while !fstop.load(Ordering::Relaxed) {
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        let t0 = Instant::now();
                        fv.flush().await.expect("flush");
                        lat.push(t0.elapsed().as_secs_f64() * 1e3);
                    }
                    lat
                });
                let b = buf4k.clone();
                drive(&sides[1], Some(ops / 2), None, move |t, i| {
                    let b = b.clone();
                    async move { t.write(spread(ops + i, blocks) * BS + 8192, &b).await }
                })
                .await;
                stop.store(true, Ordering::Relaxed);
                let lat = flusher.await.expect("flusher");
                if !lat.is_empty() {
                    commit_ms.push(lat.iter().sum::<f64>() / lat.len() as f64);
                }
            }
            for (w, write) in [(1, true), (2, false)] {
                for (s, t) in sides.iter().enumerate() {
                    let b = buf4k.clone();
                    let r = drive(t, None, Some(args.secs), move |t, i| {
                        let b = b.clone();
                        async move {
                            let mut seed = i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
                            let blk = spread(xorshift(&mut seed) % ops, blocks);
                            let off = blk * BS + (xorshift(&mut seed) % 16) * 4096;
                            if write {
                                t.write(off, &b).await
                            } else {
                                let mut v = vec![0u8; 4096];
                                t.read(off, &mut v).await
                            }
                        }
                    })
                    .await;
                    report(w, s, r);
                }
            }
            for (w, write) in [(3, true), (4, false)] {
                for (s, t) in sides.iter().enumerate() {
                    let b = buf1m.clone();
                    let n = size >> 20;
                    let r = drive(t, Some(n), None, move |t, i| {
                        let b = b.clone();
                        async move {
                            if write {
                                t.write(i << 20, &b).await
                            } else {
                                let mut v = vec![0u8; 1 << 20];
                                t.read(i << 20, &mut v).await
                            }
                        }
                    })
                    .await;
                    report(w, s, r);
                }
            }
        });
        // cow-4k: every block of the volume is provisioned now; snapshot it and write each
        // block once more.
        rt.block_on(pool.snapshot("bench", "bench-snap", false))
            .expect("snapshot");
        rt.block_on(async {
            for (s, t) in sides.iter().enumerate() {
                let b = buf4k.clone();
                let r = drive(t, Some(cow_ops), None, move |t, i| {
                    let b = b.clone();
                    async move { t.write(spread(i, blocks) * BS + 4096, &b).await }
                })
                .await;
                report(5, s, r);
            }
        });
        eprintln!(
            "round {round}: {} mappings cached, data file {} MiB allocated",
            pool.cached_mappings(),
            pool.data().allocated_bytes().unwrap_or(0) >> 20
        );
    }
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v[v.len() / 2]
    };
    println!(
        "\nmedian of {} rounds; QD{QD}; {} GiB; {} fresh and {} CoW writes per round; {} s timed runs",
        args.rounds,
        args.size >> 30,
        ops,
        cow_ops,
        args.secs
    );
    println!("| workload | plain file | volume | volume / plain |");
    println!("| --- | ---: | ---: | ---: |");
    for (w, name) in WORKLOADS.iter().enumerate() {
        let p = med(&mut res[w][0]);
        let v = med(&mut res[w][1]);
        let unit = if w == 3 || w == 4 {
            format!("{:.0} MiB/s", p)
        } else {
            format!("{:.0} IOPS", p)
        };
        let unit_v = if w == 3 || w == 4 {
            format!("{:.0} MiB/s", v)
        } else {
            format!("{:.0} IOPS", v)
        };
        println!("| {name} | {unit} | {unit_v} | {:.2} |", v / p);
    }
    if !commit_ms.is_empty() {
        println!(
            "\ncommit (flush) latency during fresh-4k, mean per round: {:?} ms",
            commit_ms
                .iter()
                .map(|m| (m * 100.0).round() / 100.0)
                .collect::<Vec<_>>()
        );
    }
}
