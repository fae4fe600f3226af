//! The volume layer against a plain file through the same data engine (issue 5).
//!
//! Both sides use one `DataFile` engine, 2 tokio workers, queue depth 32 (32 tasks with one
//! request each in flight), buffered I/O (`--cache direct`: both sides O_DIRECT through
//! io_uring, as `uthin serve --cache direct`; buffers are page-aligned either way). The plain side addresses a 4 GiB file directly (a
//! request is one vectored syscall, as a plain file through this engine would do it); the
//! volume side is a 4 GiB thin volume of a real pool (dm-thin metadata in `DIR/metadata`, data
//! blocks of 64 KiB in `DIR/data`) through `Volume`: splitting, mapping cache, in-flight
//! table, allocation, copy-on-write, B-tree lookups and inserts. Each round builds fresh files
//! and runs plain and volume back to back for each workload (which goes first alternates; the
//! timed workloads take turns in `--slices` slices per side, see `both`):
//!
//! - fresh-4k: a 4 KiB write into every block of a volume once (allocate on demand), in a
//!   random order, on a volume of its own in a pool of its own, against a plain file of the
//!   same size; in `--slices` slices per side taking turns (a single run of 20 000 writes
//!   lasted 0.15–0.2 s a side, and its ratio swung from 0.73 to 1.22 between rounds);
//! - overwrite-4k / read-4k: random 4 KiB, `--secs` each, in the `--ops` blocks an untimed
//!   fill wrote 4 KiB into (as fresh-4k does) on another volume and plain file;
//! - seqwrite-1m / seqread-1m: the whole 4 GiB in 1 MiB requests;
//! - cow-4k: after a snapshot, `--cow-ops` 4 KiB writes each to a different shared block (the
//!   plain side overwrites the same offsets). The default is every block of the volume once,
//!   so the metadata side (shadowing shared leaves, which takes a reference on every block in
//!   them) is paid in full, as a workload that rewrites a whole snapshot pays it;
//! - fresh-4k-big: as fresh-4k for `--secs` on a volume of `--fresh-gib` (32; a power of
//!   two, as `--size-gib`, so that the order of blocks visits each once), at most every block
//!   once: sustained allocation on a volume with more 1 MiB placement groups than a pool keeps
//!   open (4 096), so that most writes find their group closed;
//! - copy-4k: the same copies on write again (after a second snapshot), against a plain side
//!   that does the file-level work of one without any metadata: it reads the 64 KiB block,
//!   lays the 4 KiB over it and writes the whole block to a hole elsewhere in the file. So
//!   volume / plain here is what the volume adds to the copy itself (the cow-4k ratio is
//!   bounded by copying 64 KiB where the plain side writes 4 KiB);
//! - commit: the latency of a flush issued every 50 ms during `--secs` of more fresh 4 KiB
//!   writes (volume only; not part of the timed fresh-4k runs), split into its phases.
//!
//! Before each run, `sync(2)` writes back what earlier runs left dirty (untimed). The files
//! (up to ~100 GiB, sparse; a few GiB allocated) are removed at the end. The summary names the
//! machine's free page reporting state (`support/page_reporting.rs`): in a VM that reports
//! free pages, a side that fills more new pages loses to the host
//! (`scripts/bench-memory.sh`).
//!
//! ```text
//! cargo bench --bench volume -- [--dir DIR] [--size-gib 4] [--fresh-gib 32] [--ops 20000]
//!                                [--cow-ops N] [--secs 3] [--slices 6] [--rounds 3]
//!                                [--only fresh-4k,cow-4k,copy-4k,commit,...]
//!                                [--cache writeback|direct] [--cache-entries N]
//! ```

mod support;
use support::rss_mib;
#[path = "support/page_reporting.rs"]
mod page_reporting;
use page_reporting::PageReporting;

use std::io::{IoSlice, IoSliceMut};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uthin::data::{AlignedBuf, CacheMode, DataFile};
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

/// CPU time (user + system) of the whole process so far.
fn cpu_time() -> Duration {
    let mut ru = std::mem::MaybeUninit::<libc::rusage>::uninit();
    // SAFETY: getrusage fills the struct the pointer points to; it lives on our stack.
    let ok = unsafe { libc::getrusage(libc::RUSAGE_SELF, ru.as_mut_ptr()) } == 0;
    if !ok {
        return Duration::ZERO;
    }
    // SAFETY: getrusage returned 0, so it initialised the struct.
    let ru = unsafe { ru.assume_init() };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Set by `--side plain|volume` to run one side only (profiling).
static SIDE: AtomicU64 = AtomicU64::new(u64::MAX);

/// Whether side `s` (0 plain, 1 volume) runs, by `--side`.
fn side_runs(s: usize) -> bool {
    let only = SIDE.load(Ordering::Relaxed);
    only == u64::MAX || only == s as u64
}

/// Which side [`both`] runs first next time (alternates).
static FLIP: AtomicU64 = AtomicU64::new(0);

/// Slices each side of a timed workload is cut into (`--slices`, see [`both`]).
static SLICES: AtomicU64 = AtomicU64::new(6);

/// What one [`drive`] did.
#[derive(Clone, Copy, Default)]
struct Driven {
    /// Requests completed.
    done: u64,
    /// Wall-clock seconds from the first request to the last completion.
    secs: f64,
    /// CPU time of the whole process meanwhile (user + system, all threads).
    cpu: Duration,
}

impl Driven {
    fn rate(&self) -> f64 {
        self.done as f64 / self.secs
    }

    fn add(&mut self, o: Driven) {
        self.done += o.done;
        self.secs += o.secs;
        self.cpu += o.cpu;
    }
}

/// Runs `QD` tasks that call `op(target, first + i)` for the i-th request until `count`
/// requests are done in total (or `secs` pass, if given).
async fn drive<F, Fut>(
    target: &Target,
    first: u64,
    count: Option<u64>,
    secs: Option<f64>,
    op: Arc<F>,
) -> Driven
where
    F: Fn(Target, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let next = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let cpu0 = cpu_time();
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
                op(target.clone(), first + i).await;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for t in tasks {
        t.await.expect("bench task");
    }
    Driven {
        done: done.load(Ordering::Relaxed),
        secs: start.elapsed().as_secs_f64(),
        cpu: cpu_time() - cpu0,
    }
}

struct Args {
    dir: PathBuf,
    size: u64,
    /// Size of fresh-4k's volume and plain file.
    fresh_size: u64,
    ops: u64,
    cow_ops: Option<u64>,
    secs: f64,
    rounds: usize,
    /// Workloads to run (names as in WORKLOADS, plus "commit"); all when empty. Writes that
    /// later workloads need (the fill, seqwrite-1m) run anyway.
    only: Vec<String>,
    /// The data file's cache mode, on both sides.
    cache: CacheMode,
    /// The volume side's mapping cache (`uthin serve --mapping-cache-entries`).
    cache_entries: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        dir: PathBuf::from("target/volume-bench"),
        size: 4 << 30,
        fresh_size: 32 << 30,
        ops: 20_000,
        cow_ops: None,
        secs: 3.0,
        rounds: 3,
        only: Vec::new(),
        cache: CacheMode::Writeback,
        cache_entries: DEFAULT_CACHE_ENTRIES,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--dir" => a.dir = PathBuf::from(val()),
            "--size-gib" => a.size = val().parse::<u64>().expect("--size-gib N") << 30,
            "--fresh-gib" => a.fresh_size = val().parse::<u64>().expect("--fresh-gib N") << 30,
            "--ops" => a.ops = val().parse().expect("--ops N"),
            "--cow-ops" => a.cow_ops = Some(val().parse().expect("--cow-ops N")),
            "--secs" => a.secs = val().parse().expect("--secs S"),
            "--rounds" => a.rounds = val().parse().expect("--rounds N"),
            "--slices" => SLICES.store(
                val().parse::<u64>().expect("--slices N").max(1),
                Ordering::Relaxed,
            ),
            "--side" => SIDE.store(if val() == "plain" { 0 } else { 1 }, Ordering::Relaxed),
            "--cache-entries" => a.cache_entries = val().parse().expect("--cache-entries N"),
            "--only" => a.only = val().split(',').map(str::to_string).collect(),
            "--cache" => {
                a.cache = match val().as_str() {
                    "writeback" => CacheMode::Writeback,
                    "direct" => CacheMode::Direct,
                    other => panic!("--cache writeback|direct, not {other}"),
                }
            }
            _ => {}
        }
    }
    a
}

fn fresh_file(path: &Path, blocks: u64, cache: CacheMode) -> DataFile {
    let _ = std::fs::remove_file(path);
    let d = DataFile::open_with(path, BS as u32, true, cache).expect("data file");
    assert_eq!(d.cache_mode(), cache, "the storage refused O_DIRECT");
    d.grow(blocks).expect("grow");
    d
}

/// The i-th distinct block of a fixed random permutation-ish order (odd multiplier mod 2^k).
fn spread(i: u64, blocks: u64) -> u64 {
    (i.wrapping_mul(0x9E37_79B9) + 7) % blocks
}

/// The i-th fresh write of the fresh workloads and the fill: `buf` at 8 KiB into the i-th
/// block (by [`spread`]) of a target of `blocks` blocks.
async fn fresh_write(t: Target, buf: Arc<AlignedBuf>, blocks: u64, i: u64) {
    t.write(spread(i, blocks) * BS + 8192, &buf).await
}

const WORKLOADS: [&str; 8] = [
    "fresh-4k",
    "overwrite-4k",
    "read-4k",
    "seqwrite-1m",
    "seqread-1m",
    "cow-4k",
    "copy-4k",
    "fresh-4k-big",
];

/// Writes back every dirty page of the machine (untimed), so each run starts from the same
/// state instead of paying for the previous run's writeback.
fn settle() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// How [`both`] runs a workload on each side.
#[derive(Clone, Copy)]
enum Run {
    /// This many requests in one go per side (which side goes first alternates from one
    /// call to the next): for workloads whose requests change what the next ones find on
    /// a scale that slices would cut up (a sequential fill, copies on write).
    Once(u64),
    /// This many requests per side, in `--slices` slices taking turns.
    Slices(u64),
    /// `--slices` slices of `secs / slices` seconds per side taking turns, each side at most
    /// `cap` requests in all.
    Timed { secs: f64, cap: Option<u64> },
}

/// Runs the same workload on both sides; returns the rates (NaN for a side not run).
///
/// Slices (`Run::Slices`, `Run::Timed`) run alternately in the order plain, volume, volume,
/// plain, plain, … (each side's slices continue its sequence of request numbers). On these
/// shared machines the speed of the whole machine drifts by tens of percent within seconds;
/// slices that take turns put both sides under the same drift, where two back-to-back runs
/// do not (docs/volume.md has the spread of both ways). The CPU time per request printed for
/// each side (whole process, all threads) is steadier still.
async fn both<F, Fut>(sides: &[Target; 2], run: Run, op: F) -> [f64; 2]
where
    F: Fn(Target, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let op = Arc::new(op);
    let slices = SLICES.load(Ordering::Relaxed);
    let order: Vec<usize> = match run {
        Run::Slices(_) | Run::Timed { .. } => (0..2 * slices as usize)
            // 0 1 1 0 0 1 1 0 …: each side is as often first of a pair as second.
            .map(|k: usize| k.div_ceil(2) % 2)
            .collect(),
        // Alternate which side goes first from one run to the next, so a machine that gets
        // busier or quieter during a round does not favour one side.
        Run::Once(_) if FLIP.fetch_xor(1, Ordering::Relaxed) == 0 => vec![0, 1],
        Run::Once(_) => vec![1, 0],
    };
    let mut total = [Driven::default(); 2];
    let mut rates: [Vec<String>; 2] = Default::default();
    for s in order {
        if !side_runs(s) {
            continue;
        }
        settle();
        let first = total[s].done;
        let (count, secs) = match run {
            Run::Once(n) => (Some(n), None),
            // Slice k (the side's slices so far) of `slices` ends at request
            // (k + 1) * n / slices.
            Run::Slices(n) => {
                let k = rates[s].len() as u64;
                (Some((k + 1) * n / slices - first), None)
            }
            Run::Timed { secs, cap } => (
                cap.map(|c| c.saturating_sub(first)),
                Some(secs / slices as f64),
            ),
        };
        let d = drive(&sides[s], first, count, secs, op.clone()).await;
        rates[s].push(format!("{:.0}", d.rate()));
        total[s].add(d);
    }
    let mut out = [f64::NAN; 2];
    for s in 0..2 {
        if side_runs(s) {
            let t = &total[s];
            eprintln!(
                "    {}: {:.2} µs of CPU per request; per slice /s: {}",
                ["plain", "volume"][s],
                t.cpu.as_secs_f64() * 1e6 / t.done.max(1) as f64,
                rates[s].join(" ")
            );
            out[s] = t.rate();
        }
    }
    out
}

fn main() {
    let args = parse_args();
    std::fs::create_dir_all(&args.dir).expect("bench dir");
    let blocks = args.size / BS;
    let fresh_blocks = args.fresh_size / BS;
    let ops = args.ops.min(blocks);
    let cow_ops = args.cow_ops.unwrap_or(blocks).min(blocks);
    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);
    let reporting = PageReporting::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    // [workload][plain=0/volume=1] → per-round rates
    let mut res = vec![[Vec::new(), Vec::new()]; WORKLOADS.len()];
    let mut commit_lines: Vec<String> = Vec::new();
    for round in 0..args.rounds {
        // Random workloads on one file / volume, sequential and copy-on-write on another, so
        // the sequential write finds fresh space on both sides (not blocks the random
        // workloads placed at random).
        let plain_rand = Target::Plain(Arc::new(fresh_file(
            &args.dir.join("plain-rand"),
            blocks,
            args.cache,
        )));
        // Twice the volume's size: copy-4k writes its copies into the second half (a hole).
        let plain_seq = Target::Plain(Arc::new(fresh_file(
            &args.dir.join("plain-seq"),
            2 * blocks,
            args.cache,
        )));
        // A new pool in `DIR/name` of `data_size` bytes: a fresh, fully sparse data file
        // every round.
        let new_pool = |name: &str, data_size: u64| {
            let dir = args.dir.join(name);
            let _ = std::fs::remove_dir_all(&dir);
            let pool = Pool::create(
                &dir,
                &CreateOptions {
                    data_size,
                    block_size: BS,
                    metadata_size: None,
                    force: true,
                },
            )
            .expect("pool");
            VolumePool::open_with(pool, args.cache_entries, args.cache).expect("volume pool")
        };
        // rand, seq and the copies of cow-4k and copy-4k.
        let pool = new_pool("pool", args.size * 4);
        let vol = |name: &str| {
            rt.block_on(pool.create_volume(name, args.size))
                .expect("create");
            Target::Vol(Arc::new(pool.volume(name).expect("volume")))
        };
        let rand = [plain_rand, vol("rand")];
        // The fresh workloads' pairs: a pool of its own each, so that their many partly
        // written blocks do not fragment the data file the other workloads' volumes share
        // (docs/volume.md, "1 MiB sequential writes and the data file's extent tree").
        let own_pair = |name: &str, size: u64| {
            let pool = new_pool(&format!("pool-{name}"), size);
            rt.block_on(pool.create_volume(name, size)).expect("create");
            let vol = Target::Vol(Arc::new(pool.volume(name).expect("volume")));
            let plain = Target::Plain(Arc::new(fresh_file(
                &args.dir.join(format!("plain-{name}")),
                size / BS,
                args.cache,
            )));
            (pool, [plain, vol])
        };
        let fresh = want("fresh-4k").then(|| own_pair("fresh", args.size));
        let fresh_big = want("fresh-4k-big").then(|| own_pair("fresh-big", args.fresh_size));
        let seq = [plain_seq, vol("seq")];
        let filled = |len: usize, byte: u8| {
            let mut b = AlignedBuf::zeroed(len);
            b.fill(byte);
            Arc::new(b)
        };
        let buf4k = filled(4096, 0x5A);
        let buf1m = filled(1 << 20, 0xA5);
        let mut report = |w: usize, rates: [f64; 2]| {
            let io = if w == 3 || w == 4 { 1 << 20 } else { 4096 };
            for (side, rate) in rates.into_iter().enumerate() {
                if rate.is_nan() {
                    continue;
                }
                eprintln!(
                    "round {round} {:>13} {:>6}: {:>9.0} IOPS {:>8.1} MiB/s",
                    WORKLOADS[w],
                    ["plain", "volume"][side],
                    rate,
                    rate * io as f64 / (1 << 20) as f64
                );
                res[w][side].push(rate);
            }
        };
        rt.block_on(async {
            // fresh-4k, both sides with no flush: every block once, in slices.
            if let Some((_, sides)) = &fresh {
                let b = buf4k.clone();
                let r = both(sides, Run::Slices(blocks), move |t, i| {
                    fresh_write(t, b.clone(), blocks, i)
                })
                .await;
                report(0, r);
            }
            // fresh-4k-big: the same for `--secs` on the big volume, at most every block once.
            if let Some((_, sides)) = &fresh_big {
                let b = buf4k.clone();
                let run = Run::Timed {
                    secs: args.secs,
                    cap: Some(fresh_blocks),
                };
                let r = both(sides, run, move |t, i| {
                    fresh_write(t, b.clone(), fresh_blocks, i)
                })
                .await;
                report(7, r);
            }

            // The fill (untimed): 4 KiB into each of `ops` blocks of `rand`, where
            // overwrite-4k, read-4k and the commit phase work.
            let b = buf4k.clone();
            let fill = Arc::new(move |t: Target, i: u64| fresh_write(t, b.clone(), blocks, i));
            for (s, t) in rand.iter().enumerate() {
                if side_runs(s) {
                    drive(t, 0, Some(ops), None, fill.clone()).await;
                }
            }

            // The cost of a commit under load: more fresh writes on the volume (other
            // blocks), with a flush every 50 ms whose latency is recorded.
            if let Target::Vol(v) = &rand[1]
                && want("commit")
            {
                settle();
                let before = pool.commit_stats();
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
                let op =
                    Arc::new(move |t: Target, i: u64| fresh_write(t, b.clone(), blocks, ops + i));
                let rate = drive(&rand[1], 0, Some(blocks - ops), Some(args.secs), op)
                    .await
                    .rate();
                stop.store(true, Ordering::Relaxed);
                let lat = flusher.await.expect("flusher");
                let after = pool.commit_stats();
                let n = (after.flushes - before.flushes).max(1) as f64;
                let ms = |d: Duration| d.as_secs_f64() * 1e3 / n;
                if !lat.is_empty() {
                    commit_lines.push(format!(
                        "round {round}: {} flushes during {rate:.0} fresh 4k writes/s: mean {:.1} ms \
                         (data sync {:.1}, metadata {:.1}, punch {:.1}), longest {:.0} ms",
                        lat.len(),
                        lat.iter().sum::<f64>() / lat.len() as f64,
                        ms(after.data_sync - before.data_sync),
                        ms(after.metadata - before.metadata),
                        ms(after.punch - before.punch),
                        after.longest.as_secs_f64() * 1e3,
                    ));
                }
            }
            for (w, write) in [(1, true), (2, false)] {
                if !want(WORKLOADS[w]) {
                    continue;
                }
                let b = buf4k.clone();
                let run = Run::Timed {
                    secs: args.secs,
                    cap: None,
                };
                let r = both(&rand, run, move |t, i| {
                    let b = b.clone();
                    async move {
                        let mut seed = i.wrapping_mul(0x2545_F491_4F6C_DD1D) | 1;
                        let blk = spread(xorshift(&mut seed) % ops, blocks);
                        let off = blk * BS + (xorshift(&mut seed) % 16) * 4096;
                        if write {
                            t.write(off, &b).await
                        } else {
                            let mut v = AlignedBuf::zeroed(4096);
                            t.read(off, &mut v).await
                        }
                    }
                })
                .await;
                report(w, r);
            }
            for (w, write) in [(3, true), (4, false)] {
                // The sequential write fills what seqread-1m, cow-4k and copy-4k use.
                let later = want("seqread-1m") || want("cow-4k") || want("copy-4k");
                if !(want(WORKLOADS[w]) || write && later) {
                    continue;
                }
                let b = buf1m.clone();
                let r = both(&seq, Run::Once(blocks / 16), move |t, i| {
                    let b = b.clone();
                    async move {
                        if write {
                            t.write(i << 20, &b).await
                        } else {
                            let mut v = AlignedBuf::zeroed(1 << 20);
                            t.read(i << 20, &mut v).await
                        }
                    }
                })
                .await;
                report(w, r);
            }
        });
        // cow-4k: every block of "seq" is provisioned now; snapshot it and write `cow_ops`
        // distinct blocks once more.
        if want("cow-4k") {
            rt.block_on(pool.snapshot("seq", "seq-snap", false))
                .expect("snapshot");
            let b = buf4k.clone();
            let r = rt.block_on(both(&seq, Run::Once(cow_ops), move |t, i| {
                let b = b.clone();
                async move { t.write(spread(i, blocks) * BS + 4096, &b).await }
            }));
            report(5, r);
        }
        // copy-4k: every block of "seq" is shared again after a second snapshot; the plain
        // side copies the same blocks with the 4 KiB laid over them into its empty half.
        if want("copy-4k") {
            rt.block_on(pool.snapshot("seq", "seq-snap2", false))
                .expect("snapshot");
            let b = buf4k.clone();
            let r = rt.block_on(both(&seq, Run::Once(cow_ops), move |t, i| {
                let b = b.clone();
                async move {
                    let blk = spread(i, blocks);
                    match &t {
                        Target::Plain(_) => {
                            let mut block = AlignedBuf::zeroed(BS as usize);
                            t.read(blk * BS, &mut block).await;
                            block[4096..8192].copy_from_slice(&b);
                            t.write((blocks + blk) * BS, &block).await
                        }
                        Target::Vol(_) => t.write(blk * BS + 4096, &b).await,
                    }
                }
            }));
            report(6, r);
        }
        let (rss, peak) = rss_mib();
        eprintln!(
            "round {round}: {} mappings cached, data file {} MiB allocated, RSS {rss} MiB (peak {peak})",
            pool.cached_mappings(),
            pool.data().allocated_bytes().unwrap_or(0) >> 20
        );
    }
    // None for a side that did not run (`--side`).
    let med = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
        v.get(v.len() / 2).copied()
    };
    println!(
        "\nmedian of {} rounds; QD{QD}; {} GiB ({} GiB for fresh-4k-big); {} blocks filled and {} CoW \
         writes per round; {} s timed runs",
        args.rounds,
        args.size >> 30,
        args.fresh_size >> 30,
        ops,
        cow_ops,
        args.secs
    );
    println!("{}", reporting.describe());
    // The ratio is the median of the rounds' own ratios: each round's two sides ran under
    // the same conditions, where the medians of the two columns may come from different
    // rounds (on these machines that made 0.90 read as 0.95 once, docs/volume.md).
    println!("| workload | plain file | volume | volume / plain | per round |");
    println!("| --- | ---: | ---: | ---: | --- |");
    for (w, name) in WORKLOADS.iter().enumerate() {
        if res[w][0].is_empty() && res[w][1].is_empty() {
            continue;
        }
        let mut per_round: Vec<f64> = res[w][0]
            .iter()
            .zip(&res[w][1])
            .map(|(p, v)| v / p)
            .collect();
        let rounds = per_round
            .iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(" / ");
        let p = med(&mut res[w][0]);
        let v = med(&mut res[w][1]);
        let fmt = |x: Option<f64>| match x {
            None => "-".to_string(),
            Some(x) if w == 3 || w == 4 => format!("{x:.0} MiB/s"),
            Some(x) => format!("{x:.0} IOPS"),
        };
        let ratio = med(&mut per_round).map_or("-".to_string(), |r| format!("{r:.2}"));
        println!("| {name} | {} | {} | {ratio} | {rounds} |", fmt(p), fmt(v));
    }
    println!();
    for l in &commit_lines {
        println!("{l}");
    }
    // Two files of 4 and 8 GiB and a pool of up to 16 GiB: do not leave them behind.
    if let Err(e) = std::fs::remove_dir_all(&args.dir) {
        eprintln!("could not remove {}: {e}", args.dir.display());
    }
}
