//! A libblkio (`virtio-blk-vhost-user`) load generator for any vhost-user-blk server: uthin or
//! `qemu-storage-daemon --export vhost-user-blk`, with the same client code for both.
//!
//! ```text
//! vhost-bench --socket PATH [--size 1G] [--qd 32] [--seconds 5] [--only NAME,...] [--no-verify]
//! ```
//!
//! Runs, on one queue at queue depth `qd`, in this order: `randwrite-fresh` (4 KiB writes to
//! distinct random never-written offsets), `randwrite-over` (4 KiB random overwrites of those),
//! `randread` (4 KiB random reads of them), `seqwrite-1m` and `seqread-1m` (1 MiB sequential over
//! the whole size, wrapping). Each phase runs `seconds` (the fresh phase stops early when every
//! 4 KiB block has been written once). Prints one line per phase:
//! `RESULT <phase> <iops> <MiB/s>`.
//!
//! Each write phase ends with a FLUSH, timed on its own, so that the next phase does not pay
//! for writes a server left in the host's page cache (a server that writes through the page
//! cache otherwise hands the writeback of one phase to the next). It prints
//! `DURABLE <phase> <iops> <MiB/s> <flush ms>`: the phase's rate with the flush's time
//! included, what a guest that needs its writes on disk gets.
//!
//! Then it verifies what a guest would see: every 4 KiB block written carries its offset and a
//! write generation in its first 16 bytes; the whole device is read back and each block must
//! hold the last generation written to it (or zeros if never written). Two writes to one block
//! are never in flight together, so "last" is well defined. `--no-verify` skips this (for
//! devices that store nothing).

use std::mem::MaybeUninit;
use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use blkio::{Blkio, Blkioq, Completion, ReqFlags};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

const SMALL: usize = 4096;
const LARGE: usize = 1 << 20;

struct Args {
    socket: String,
    size: u64,
    qd: usize,
    seconds: f64,
    only: Option<Vec<String>>,
    verify: bool,
}

fn parse_args() -> anyhow::Result<Args> {
    let mut a = Args {
        socket: String::new(),
        size: 1 << 30,
        qd: 32,
        seconds: 5.0,
        only: None,
        verify: true,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        let mut v = || it.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => a.socket = v()?,
            "--size" => {
                let s = v()?;
                let (n, m) = match s.chars().last() {
                    Some('M') => (&s[..s.len() - 1], 1u64 << 20),
                    Some('G') => (&s[..s.len() - 1], 1 << 30),
                    _ => (s.as_str(), 1),
                };
                a.size = n.parse::<u64>().context("--size")? * m;
            }
            "--qd" => a.qd = v()?.parse().context("--qd")?,
            "--seconds" => a.seconds = v()?.parse().context("--seconds")?,
            "--no-verify" => a.verify = false,
            "--only" => a.only = Some(v()?.split(',').map(str::to_string).collect()),
            other => bail!("unknown argument {other:?}"),
        }
    }
    ensure!(!a.socket.is_empty(), "--socket is required");
    ensure!(a.size % LARGE as u64 == 0, "--size must be whole MiB");
    ensure!((1..=256).contains(&a.qd), "--qd must be 1..=256");
    Ok(a)
}

/// The client: one queue, `qd` request slots of 1 MiB each in one shared region.
struct Bench {
    _blkio: Blkio,
    q: Blkioq,
    base: usize,
    qd: usize,
    /// Last generation written to each 4 KiB block (0 = never written).
    generation: Vec<u32>,
    /// Blocks with a write in flight.
    busy: Vec<bool>,
    next_generation: u32,
    completions: Vec<MaybeUninit<Completion>>,
}

/// What one slot is doing.
#[derive(Clone, Copy)]
struct Slot {
    offset: u64,
    len: usize,
    write: bool,
}

impl Bench {
    fn connect(args: &Args) -> anyhow::Result<Bench> {
        let mut b = Blkio::new("virtio-blk-vhost-user")?;
        b.set_str("path", &args.socket)?;
        b.connect()?;
        b.set_i32("num-queues", 1)?;
        let capacity = b.get_u64("capacity")?;
        ensure!(
            capacity >= args.size,
            "device has {capacity} bytes, --size asks for {}",
            args.size
        );
        let mut out = b.start()?;
        let region = b.alloc_mem_region(args.qd * LARGE)?;
        b.map_mem_region(&region)?;
        let q = out.queues.pop().context("no queue")?;
        let blocks = (args.size / SMALL as u64) as usize;
        Ok(Bench {
            _blkio: b,
            q,
            base: region.addr,
            qd: args.qd,
            generation: vec![0; blocks],
            busy: vec![false; blocks],
            next_generation: 1,
            completions: (0..args.qd).map(|_| MaybeUninit::uninit()).collect(),
        })
    }

    fn slot_buf(&mut self, slot: usize) -> &mut [u8] {
        // SAFETY: slot < qd; each slot owns LARGE bytes of the mapped region, and a slot's buffer
        // is only touched while no request uses it.
        unsafe { std::slice::from_raw_parts_mut((self.base + slot * LARGE) as *mut u8, LARGE) }
    }

    fn submit(&mut self, slot: usize, s: Slot) {
        let ptr = (self.base + slot * LARGE) as *mut u8;
        if s.write {
            let first = (s.offset / SMALL as u64) as usize;
            for i in 0..s.len / SMALL {
                let block = first + i;
                let generation = self.next_generation;
                self.next_generation += 1;
                self.generation[block] = generation;
                self.busy[block] = true;
                let buf = &mut self.slot_buf(slot)[i * SMALL..(i + 1) * SMALL];
                buf[0..8].copy_from_slice(&(block as u64 * SMALL as u64).to_le_bytes());
                buf[8..12].copy_from_slice(&generation.to_le_bytes());
                buf[12..16].copy_from_slice(&0x7575_7575u32.to_le_bytes());
            }
            self.q.write(s.offset, ptr, s.len, slot, ReqFlags::empty());
        } else {
            self.q.read(s.offset, ptr, s.len, slot, ReqFlags::empty());
        }
    }

    fn complete(&mut self, s: Slot) {
        if s.write {
            let first = (s.offset / SMALL as u64) as usize;
            for b in &mut self.busy[first..first + s.len / SMALL] {
                *b = false;
            }
        }
    }

    /// Keeps `qd` requests in flight until `next` returns None or time is up; returns
    /// (operations, bytes, elapsed).
    fn run(
        &mut self,
        seconds: f64,
        mut next: impl FnMut(&Self) -> Option<Slot>,
    ) -> anyhow::Result<(u64, u64, Duration)> {
        let start = Instant::now();
        let deadline = start + Duration::from_secs_f64(seconds);
        let mut slots: Vec<Option<Slot>> = vec![None; self.qd];
        let mut in_flight = 0usize;
        let (mut ops, mut bytes) = (0u64, 0u64);
        let mut exhausted = false;
        for (i, slot) in slots.iter_mut().enumerate() {
            match next(self) {
                Some(s) => {
                    self.submit(i, s);
                    *slot = Some(s);
                    in_flight += 1;
                }
                None => {
                    exhausted = true;
                    break;
                }
            }
        }
        while in_flight > 0 {
            let mut comps = std::mem::take(&mut self.completions);
            let n = self.q.do_io(&mut comps, 1, None, None)?;
            for c in &comps[..n] {
                // SAFETY: do_io initialised the first n entries.
                let c = unsafe { c.assume_init_ref() };
                ensure!(c.ret == 0, "request failed: {}", c.ret);
                let slot = c.user_data;
                let s = slots[slot].take().context("completion for an idle slot")?;
                self.complete(s);
                ops += 1;
                bytes += s.len as u64;
                in_flight -= 1;
                if !exhausted && Instant::now() < deadline {
                    match next(self) {
                        Some(s) => {
                            self.submit(slot, s);
                            slots[slot] = Some(s);
                            in_flight += 1;
                        }
                        None => exhausted = true,
                    }
                }
            }
            self.completions = comps;
        }
        Ok((ops, bytes, start.elapsed()))
    }

    /// Waits for the one request in flight (queued by the caller) and returns its result.
    fn wait_one(&mut self, what: &str) -> anyhow::Result<i32> {
        let mut comps = std::mem::take(&mut self.completions);
        let n = self.q.do_io(&mut comps, 1, None, None)?;
        ensure!(n == 1, "{what} lost");
        // SAFETY: do_io initialised the first entry.
        let ret = unsafe { comps[0].assume_init_ref() }.ret;
        self.completions = comps;
        Ok(ret)
    }

    /// Sends a FLUSH (nothing else is in flight) and returns how long it took.
    fn flush(&mut self) -> anyhow::Result<Duration> {
        let start = Instant::now();
        self.q.flush(0, ReqFlags::empty());
        let ret = self.wait_one("flush completion")?;
        ensure!(ret == 0, "flush failed: {ret}");
        Ok(start.elapsed())
    }

    /// Reads the first `size` bytes back and checks every 4 KiB block's stamp.
    fn verify(&mut self, size: u64) -> anyhow::Result<u64> {
        let mut checked = 0u64;
        let mut offset = 0u64;
        while offset < size {
            let ptr = self.base as *mut u8;
            self.q.read(offset, ptr, LARGE, 0, ReqFlags::empty());
            let ret = self.wait_one("verify read")?;
            ensure!(ret == 0, "verify read at {offset} failed: {ret}");
            let first = (offset / SMALL as u64) as usize;
            for i in 0..LARGE / SMALL {
                let block = first + i;
                let want = self.generation[block];
                let mut buf = [0u8; 16];
                buf.copy_from_slice(&self.slot_buf(0)[i * SMALL..i * SMALL + 16]);
                let at = u64::from_le_bytes(buf[0..8].try_into()?);
                let got = u32::from_le_bytes(buf[8..12].try_into()?);
                if want == 0 {
                    ensure!(
                        buf.iter().all(|&b| b == 0),
                        "block at {} was never written but is not zero",
                        block * SMALL
                    );
                } else {
                    ensure!(
                        at == block as u64 * SMALL as u64 && got == want,
                        "block at {}: found offset {at} generation {got}, wrote generation {want}",
                        block * SMALL
                    );
                    checked += 1;
                }
            }
            offset += LARGE as u64;
        }
        Ok(checked)
    }
}

fn main() -> anyhow::Result<()> {
    let args = parse_args()?;
    let mut b = Bench::connect(&args)?;
    let wanted = |name: &str| {
        args.only
            .as_ref()
            .is_none_or(|o| o.iter().any(|x| x == name))
    };
    let blocks = b.generation.len();
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x75_7468_696e);
    let report = |name: &str, (ops, bytes, t): (u64, u64, Duration)| {
        let s = t.as_secs_f64();
        println!(
            "RESULT {name} {:.0} {:.1}",
            ops as f64 / s,
            bytes as f64 / s / (1 << 20) as f64
        );
    };
    // A write phase: its rate, then a timed flush and the rate with the flush included.
    let report_write = |b: &mut Bench, name: &str, r: (u64, u64, Duration)| {
        report(name, r);
        let f = b.flush()?;
        let s = (r.2 + f).as_secs_f64();
        println!(
            "DURABLE {name} {:.0} {:.1} {:.1}",
            r.0 as f64 / s,
            r.1 as f64 / s / (1 << 20) as f64,
            f.as_secs_f64() * 1000.0
        );
        anyhow::Ok(())
    };

    // Fresh: a random permutation of all 4 KiB blocks, each written at most once.
    let mut order: Vec<usize> = (0..blocks).collect();
    order.shuffle(&mut rng);
    let mut written: Vec<usize> = Vec::new();
    if wanted("randwrite-fresh") {
        let mut it = order.iter();
        let r = b.run(args.seconds, |_| {
            it.next().map(|&blk| Slot {
                offset: (blk * SMALL) as u64,
                len: SMALL,
                write: true,
            })
        })?;
        written = order[..r.0 as usize].to_vec();
        report_write(&mut b, "randwrite-fresh", r)?;
    }
    if written.is_empty() {
        written = order.clone();
    }
    let pick = |b: &Bench, rng: &mut rand::rngs::StdRng, write: bool| loop {
        let blk = written[rng.random_range(0..written.len())];
        if !(write && b.busy[blk]) {
            return Some(Slot {
                offset: (blk * SMALL) as u64,
                len: SMALL,
                write,
            });
        }
    };
    if wanted("randwrite-over") {
        let r = b.run(args.seconds, |b| pick(b, &mut rng, true))?;
        report_write(&mut b, "randwrite-over", r)?;
    }
    if wanted("randread") {
        let r = b.run(args.seconds, |b| pick(b, &mut rng, false))?;
        report("randread", r);
    }
    let large_slots = args.size / LARGE as u64;
    for (name, write) in [("seqwrite-1m", true), ("seqread-1m", false)] {
        if wanted(name) {
            let mut i = 0u64;
            let r = b.run(args.seconds, |b| {
                // Skip a chunk that still has a write in flight (only possible on tiny sizes).
                for _ in 0..large_slots {
                    let offset = (i % large_slots) * LARGE as u64;
                    i += 1;
                    let first = (offset / SMALL as u64) as usize;
                    if !write || !b.busy[first..first + LARGE / SMALL].iter().any(|&x| x) {
                        return Some(Slot {
                            offset,
                            len: LARGE,
                            write,
                        });
                    }
                }
                None
            })?;
            if write {
                report_write(&mut b, name, r)?;
            } else {
                report(name, r);
            }
        }
    }
    if args.verify {
        let checked = b.verify(args.size)?;
        println!("VERIFIED {checked} written blocks of 4 KiB read back as written");
    }
    Ok(())
}
