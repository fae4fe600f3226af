//! Which I/O engine should the data file use? (issue 5, docs/io-engines.md)
//!
//! Runs the same workloads through five engines, interleaved in one process so that the noise of
//! this shared machine hits them all alike, and prints the median of the rounds:
//!
//! - `inline`     pread/pwrite called directly on the tokio worker thread;
//! - `nowait`     preadv2/pwritev2 with RWF_NOWAIT on the worker, falling back to the blocking pool
//!   when the kernel would block (page not cached, writeback throttling);
//! - `threadpool` every I/O on tokio's blocking thread pool (`spawn_blocking`), like `tokio::fs`;
//! - `uring`      the `io-uring` crate: one shared ring, submission inline from the task, a
//!   completion thread that wakes the tasks;
//! - `tokio-uring` the `tokio-uring` runtime (single-threaded by design) with owned buffers.
//!
//! Workloads: 4 KiB random read, 4 KiB random write, 1 MiB sequential read and write (and
//! 64 KiB random read and write: one data block, what the volume layer issues), each at
//! queue depth 32 (32 tasks, one I/O in flight each) on a 4 GiB file, buffered I/O.
//!
//! ```text
//! cargo bench --bench data_engines -- [--file PATH] [--size-gib 4] [--secs 3] [--rounds 3]
//!                                     [--engines a,b] [--workloads a,b]
//! ```

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Poll, Waker};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

const QD: usize = 32;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Workload {
    RandRead4k,
    RandWrite4k,
    SeqRead1m,
    SeqWrite1m,
    RandRead64k,
    RandWrite64k,
}

impl Workload {
    const ALL: [Workload; 6] = [
        Workload::RandRead4k,
        Workload::RandWrite4k,
        Workload::SeqRead1m,
        Workload::SeqWrite1m,
        Workload::RandRead64k,
        Workload::RandWrite64k,
    ];
    fn name(self) -> &'static str {
        match self {
            Workload::RandRead4k => "randread-4k",
            Workload::RandWrite4k => "randwrite-4k",
            Workload::SeqRead1m => "seqread-1m",
            Workload::SeqWrite1m => "seqwrite-1m",
            Workload::RandRead64k => "randread-64k",
            Workload::RandWrite64k => "randwrite-64k",
        }
    }
    fn io_size(self) -> usize {
        match self {
            Workload::RandRead4k | Workload::RandWrite4k => 4096,
            Workload::SeqRead1m | Workload::SeqWrite1m => 1 << 20,
            Workload::RandRead64k | Workload::RandWrite64k => 1 << 16,
        }
    }
    fn is_write(self) -> bool {
        matches!(
            self,
            Workload::RandWrite4k | Workload::SeqWrite1m | Workload::RandWrite64k
        )
    }
    fn is_random(self) -> bool {
        !matches!(self, Workload::SeqRead1m | Workload::SeqWrite1m)
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Engine {
    Inline,
    NoWait,
    ThreadPool,
    Uring,
    TokioUring,
}

impl Engine {
    const ALL: [Engine; 5] = [
        Engine::Inline,
        Engine::NoWait,
        Engine::ThreadPool,
        Engine::Uring,
        Engine::TokioUring,
    ];
    fn name(self) -> &'static str {
        match self {
            Engine::Inline => "inline",
            Engine::NoWait => "nowait",
            Engine::ThreadPool => "threadpool",
            Engine::Uring => "uring",
            Engine::TokioUring => "tokio-uring",
        }
    }
}

/// Where each task takes its next offset from: random (xorshift per task) or a shared
/// sequential cursor.
struct Offsets {
    size: u64,
    io: u64,
    random: bool,
    cursor: AtomicU64,
}

impl Offsets {
    fn next(&self, rng: &mut u64) -> u64 {
        if self.random {
            *rng ^= *rng << 13;
            *rng ^= *rng >> 7;
            *rng ^= *rng << 17;
            (*rng % (self.size / self.io)) * self.io
        } else {
            (self.cursor.fetch_add(self.io, Ordering::Relaxed)) % self.size
        }
    }
}

struct Shared {
    file: File,
    offsets: Offsets,
    stop: AtomicBool,
    ops: AtomicU64,
    write: bool,
}

fn check(n: std::io::Result<usize>, want: usize) {
    match n {
        Ok(n) if n == want => {}
        other => panic!("short or failed I/O: {other:?}"),
    }
}

// ---------------------------------------------------------------- io-uring crate engine

/// One ring shared by every task. A task pushes its SQE under a lock and submits it itself;
/// a completion thread waits for CQEs and wakes the owning task.
struct Ring {
    ring: io_uring::IoUring,
    submit_lock: Mutex<()>,
    slots: Mutex<slab::Slab<Slot>>,
    stop: AtomicBool,
}

#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

mod slab {
    //! A minimal slab so the bench needs no extra crate.
    /// Vector of optional entries with a free list.
    pub struct Slab<T> {
        entries: Vec<Option<T>>,
        free: Vec<usize>,
    }
    impl<T> Slab<T> {
        pub fn new() -> Self {
            Slab {
                entries: Vec::new(),
                free: Vec::new(),
            }
        }
        pub fn insert(&mut self, v: T) -> usize {
            if let Some(i) = self.free.pop() {
                self.entries[i] = Some(v);
                i
            } else {
                self.entries.push(Some(v));
                self.entries.len() - 1
            }
        }
        pub fn get_mut(&mut self, i: usize) -> Option<&mut T> {
            self.entries.get_mut(i).and_then(|e| e.as_mut())
        }
        pub fn remove(&mut self, i: usize) -> T {
            self.free.push(i);
            self.entries[i].take().expect("slab entry present")
        }
    }
}

impl Ring {
    fn new() -> Arc<Ring> {
        let ring = io_uring::IoUring::new(256).expect("io_uring setup");
        let r = Arc::new(Ring {
            ring,
            submit_lock: Mutex::new(()),
            slots: Mutex::new(slab::Slab::new()),
            stop: AtomicBool::new(false),
        });
        let r2 = r.clone();
        std::thread::spawn(move || r2.reap());
        r
    }

    fn reap(&self) {
        while !self.stop.load(Ordering::Relaxed) {
            // SAFETY: enter with to_submit = 0 only waits for completions; no pointer argument.
            let res = unsafe {
                self.ring.submitter().enter::<libc::sigset_t>(
                    0, 1,
                    1, // IORING_ENTER_GETEVENTS (the crate keeps its sys module private)
                    None,
                )
            };
            if let Err(e) = res
                && e.raw_os_error() != Some(libc::EINTR)
            {
                panic!("io_uring_enter: {e}");
            }
            // SAFETY: this thread is the only one that touches the completion queue.
            let cq = unsafe { self.ring.completion_shared() };
            let mut slots = self.slots.lock();
            for cqe in cq {
                if cqe.user_data() == u64::MAX {
                    continue;
                }
                if let Some(slot) = slots.get_mut(cqe.user_data() as usize) {
                    slot.result = Some(cqe.result());
                    if let Some(w) = slot.waker.take() {
                        w.wake();
                    }
                }
            }
        }
    }

    /// Submits one read or write of `buf` at `off` and waits for it. The buffer is owned by the
    /// caller's stack frame for the whole await; the bench never drops these futures early.
    async fn rw(&self, fd: i32, buf: &mut [u8], off: u64, write: bool) -> i32 {
        let idx = self.slots.lock().insert(Slot::default());
        let sqe = if write {
            io_uring::opcode::Write::new(io_uring::types::Fd(fd), buf.as_ptr(), buf.len() as u32)
                .offset(off)
                .build()
        } else {
            io_uring::opcode::Read::new(io_uring::types::Fd(fd), buf.as_mut_ptr(), buf.len() as u32)
                .offset(off)
                .build()
        }
        .user_data(idx as u64);
        {
            let _g = self.submit_lock.lock();
            // SAFETY: the submission queue is only touched under `submit_lock`; the buffer stays
            // alive until the completion is seen below (the future is always awaited to the end).
            unsafe {
                let mut sq = self.ring.submission_shared();
                sq.push(&sqe)
                    .expect("ring has room: at most QD entries in flight");
                sq.sync();
            }
            self.ring.submit().expect("io_uring submit");
        }
        std::future::poll_fn(|cx| {
            let mut slots = self.slots.lock();
            let slot = slots.get_mut(idx).expect("slot present until removed");
            if let Some(r) = slot.result {
                slots.remove(idx);
                Poll::Ready(r)
            } else {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        })
        .await
    }

    fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the reaper with a no-op.
        let _g = self.submit_lock.lock();
        let nop = io_uring::opcode::Nop::new().build().user_data(u64::MAX);
        // SAFETY: submission queue under `submit_lock`; NOP carries no buffer.
        unsafe {
            let mut sq = self.ring.submission_shared();
            let _ = sq.push(&nop);
            sq.sync();
        }
        let _ = self.ring.submit();
    }
}

// ---------------------------------------------------------------- runners

fn run_tokio(engine: Engine, sh: Arc<Shared>, secs: f64) -> f64 {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ring = (engine == Engine::Uring).then(Ring::new);
    let start = Instant::now();
    rt.block_on(async {
        let mut tasks = Vec::new();
        for t in 0..QD {
            let sh = sh.clone();
            let ring = ring.clone();
            tasks.push(tokio::spawn(async move {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) * 0x1234_5678_9abc);
                let io = sh.offsets.io as usize;
                let mut buf = vec![0xA5u8; io];
                let fd = sh.file.as_raw_fd();
                while !sh.stop.load(Ordering::Relaxed) {
                    let off = sh.offsets.next(&mut rng);
                    match engine {
                        Engine::Inline => {
                            if sh.write {
                                check(sh.file.write_at(&buf, off), io);
                            } else {
                                check(sh.file.read_at(&mut buf, off), io);
                            }
                            // A server runs each request as its own short task; without an
                            // await point these 32 loops would never let the others (or the
                            // runtime's timer) run.
                            tokio::task::yield_now().await;
                        }
                        Engine::NoWait => {
                            // SAFETY: iov points into `buf`, alive and exclusively ours for the
                            // duration of the synchronous call.
                            let n = unsafe {
                                let iov = libc::iovec {
                                    iov_base: buf.as_mut_ptr().cast(),
                                    iov_len: io,
                                };
                                if sh.write {
                                    libc::pwritev2(fd, &iov, 1, off as i64, libc::RWF_NOWAIT)
                                } else {
                                    libc::preadv2(fd, &iov, 1, off as i64, libc::RWF_NOWAIT)
                                }
                            };
                            if n != io as isize {
                                // Would block (or short): redo it on the blocking pool.
                                let sh2 = sh.clone();
                                let mut b = std::mem::take(&mut buf);
                                buf = tokio::task::spawn_blocking(move || {
                                    if sh2.write {
                                        check(sh2.file.write_at(&b, off), io);
                                    } else {
                                        check(sh2.file.read_at(&mut b, off), io);
                                    }
                                    b
                                })
                                .await
                                .unwrap();
                            } else {
                                tokio::task::yield_now().await;
                            }
                        }
                        Engine::ThreadPool => {
                            let sh2 = sh.clone();
                            let mut b = std::mem::take(&mut buf);
                            buf = tokio::task::spawn_blocking(move || {
                                if sh2.write {
                                    check(sh2.file.write_at(&b, off), io);
                                } else {
                                    check(sh2.file.read_at(&mut b, off), io);
                                }
                                b
                            })
                            .await
                            .unwrap();
                        }
                        Engine::Uring => {
                            let r = ring.as_ref().unwrap().rw(fd, &mut buf, off, sh.write).await;
                            assert_eq!(r, io as i32, "io_uring I/O failed or short");
                        }
                        Engine::TokioUring => unreachable!(),
                    }
                    sh.ops.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        sh.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    });
    if let Some(r) = ring {
        r.shutdown();
    }
    start.elapsed().as_secs_f64()
}

fn run_tokio_uring(sh: Arc<Shared>, secs: f64) -> f64 {
    let start = Instant::now();
    let std_file = sh.file.try_clone().unwrap();
    tokio_uring::start(async {
        let file = std::rc::Rc::new(tokio_uring::fs::File::from_std(std_file));
        let mut tasks = Vec::new();
        for t in 0..QD {
            let sh = sh.clone();
            let file = file.clone();
            tasks.push(tokio_uring::spawn(async move {
                let mut rng = 0x9E37_79B9_7F4A_7C15u64 ^ ((t as u64 + 1) * 0x1234_5678_9abc);
                let io = sh.offsets.io as usize;
                let mut buf = vec![0xA5u8; io];
                while !sh.stop.load(Ordering::Relaxed) {
                    let off = sh.offsets.next(&mut rng);
                    if sh.write {
                        let (r, b) = file.write_at(buf, off).submit().await;
                        check(r, io);
                        buf = b;
                    } else {
                        let (r, b) = file.read_at(buf, off).await;
                        check(r, io);
                        buf = b;
                    }
                    sh.ops.fetch_add(1, Ordering::Relaxed);
                }
            }));
        }
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        sh.stop.store(true, Ordering::Relaxed);
        for t in tasks {
            t.await.unwrap();
        }
    });
    start.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------- driver

struct Args {
    file: String,
    size: u64,
    secs: f64,
    rounds: usize,
    engines: Vec<Engine>,
    workloads: Vec<Workload>,
}

fn parse_args() -> Args {
    let mut a = Args {
        file: "target/data-engines.img".into(),
        size: 4 << 30,
        secs: 3.0,
        rounds: 3,
        engines: Engine::ALL.to_vec(),
        workloads: Workload::ALL.to_vec(),
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let mut val = || it.next().unwrap_or_else(|| panic!("{k} needs a value"));
        match k.as_str() {
            "--file" => a.file = val(),
            "--size-gib" => a.size = val().parse::<u64>().expect("--size-gib N") << 30,
            "--secs" => a.secs = val().parse().expect("--secs SECONDS"),
            "--rounds" => a.rounds = val().parse().expect("--rounds N"),
            "--engines" => {
                let v = val();
                a.engines = Engine::ALL
                    .into_iter()
                    .filter(|e| v.split(',').any(|n| n == e.name()))
                    .collect();
            }
            "--workloads" => {
                let v = val();
                a.workloads = Workload::ALL
                    .into_iter()
                    .filter(|w| v.split(',').any(|n| n == w.name()))
                    .collect();
            }
            // cargo bench passes --bench; ignore unknown flags.
            _ => {}
        }
    }
    a
}

fn prepare(path: &str, size: u64) -> File {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .expect("open bench file");
    if f.metadata().unwrap().len() != size {
        eprintln!("preparing {path}: writing {} GiB", size >> 30);
        f.set_len(0).unwrap();
        let chunk = vec![0x5Au8; 1 << 20];
        let mut off = 0;
        while off < size {
            f.write_all_at(&chunk, off).unwrap();
            off += chunk.len() as u64;
        }
        f.sync_all().unwrap();
    }
    f
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let args = parse_args();
    let file = prepare(&args.file, args.size);
    // Warm the page cache the same way for everyone: one sequential read of the whole file.
    {
        let mut buf = vec![0u8; 1 << 20];
        let mut off = 0;
        while off < args.size {
            file.read_exact_at(&mut buf, off).unwrap();
            off += buf.len() as u64;
        }
    }
    let mut results: Vec<Vec<Vec<f64>>> =
        vec![vec![Vec::new(); args.engines.len()]; args.workloads.len()];
    for round in 0..args.rounds {
        for (wi, &w) in args.workloads.iter().enumerate() {
            for (ei, &e) in args.engines.iter().enumerate() {
                let sh = Arc::new(Shared {
                    file: file.try_clone().unwrap(),
                    offsets: Offsets {
                        size: args.size,
                        io: w.io_size() as u64,
                        random: w.is_random(),
                        cursor: AtomicU64::new(0),
                    },
                    stop: AtomicBool::new(false),
                    ops: AtomicU64::new(0),
                    write: w.is_write(),
                });
                let elapsed = if e == Engine::TokioUring {
                    run_tokio_uring(sh.clone(), args.secs)
                } else {
                    run_tokio(e, sh.clone(), args.secs)
                };
                let ops = sh.ops.load(Ordering::Relaxed) as f64 / elapsed;
                results[wi][ei].push(ops);
                eprintln!(
                    "round {round} {:>12} {:>11}: {:>9.0} IOPS {:>8.1} MiB/s",
                    w.name(),
                    e.name(),
                    ops,
                    ops * w.io_size() as f64 / (1 << 20) as f64
                );
            }
        }
    }
    println!(
        "\nmedian of {} rounds, {} s each, QD{QD}, {} GiB file, buffered",
        args.rounds,
        args.secs,
        args.size >> 30
    );
    print!("| workload |");
    for e in &args.engines {
        print!(" {} |", e.name());
    }
    println!();
    print!("| --- |");
    for _ in &args.engines {
        print!(" ---: |");
    }
    println!();
    for (wi, w) in args.workloads.iter().enumerate() {
        print!("| {} |", w.name());
        for cell in results[wi].iter_mut() {
            let m = median(cell);
            if w.io_size() == 4096 {
                print!(" {:.0} IOPS |", m);
            } else {
                print!(" {:.0} MiB/s |", m * w.io_size() as f64 / (1 << 20) as f64);
            }
        }
        println!();
    }
}
