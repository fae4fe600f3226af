//! The NBD server over in-memory exports: a stand-in for `uthin serve` that measures the
//! protocol layer alone (scripts/bench-nbd.sh) and lets real clients be tried against it by
//! hand.
//!
//! ```text
//! cargo run --release --example nbd_mem_server -- \
//!     --listen 127.0.0.1:10809 --export vol0=4G --export ro=64M,ro --block-size 64K
//! ```
//! Prints `listening on ADDR` for every listener once bound (port 0 picks a free port), then
//! serves until SIGINT/SIGTERM, and shuts down gracefully.
//!
//! `--device ram` (the default) is [`RamDisk`]: one anonymous mapping, one `memcpy` per
//! request and a bitmap of written blocks, so that a benchmark sees the cost of the protocol
//! layer and not of the device. `--device mem` is the crate's `MemDevice`, the reference the
//! tests use (a B-tree of boxed blocks behind one lock, with a copy through a temporary
//! buffer per request).

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context, Result, bail};
use clap::Parser;
use parking_lot::RwLock;
use tokio::signal::unix::{SignalKind, signal};
use uthin::device::mem::MemDevice;
use uthin::device::{BlockDevice, DevError, DevResult, DeviceInfo, Extent, check_range, iov_len};
use uthin::nbd::{Exports, ListenAddr, Listener, Server};

#[derive(Parser)]
#[command(about = "Serve in-memory block devices over NBD")]
struct Args {
    /// Where to listen: HOST:PORT or unix:PATH (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:10809")]
    listen: Vec<String>,
    /// An export: NAME=SIZE[,ro] (repeatable). SIZE takes K, M, G, T suffixes.
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    /// Allocation block size of the devices.
    #[arg(long, default_value = "64K")]
    block_size: String,
    /// Export served to clients that ask for the empty name.
    #[arg(long)]
    default: Option<String>,
    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
    /// Device implementation: `ram` (lean, for benchmarks) or `mem` (the test reference).
    #[arg(long, default_value = "ram")]
    device: String,
}

/// A sparse RAM disk: an anonymous `MAP_NORESERVE` mapping (the kernel provides zero pages
/// until a page is written), a lock per allocation block, and a bitmap of written blocks for
/// block status. Discard drops whole blocks' pages with `MADV_DONTNEED`.
struct RamDisk {
    base: *mut u8,
    info: DeviceInfo,
    /// One lock per block: readers and writers of a block never see a half-copied piece.
    locks: Vec<RwLock<()>>,
    allocated: Vec<AtomicU64>,
}

// SAFETY: the mapping is owned by the RamDisk and lives until it is dropped; every access to
// the bytes of block `b` happens while holding `locks[b]` (shared for reads, exclusive for
// writes and discards), so concurrent requests never race on the same bytes.
unsafe impl Send for RamDisk {}
// SAFETY: see `Send`: all shared access is serialised by the per-block locks.
unsafe impl Sync for RamDisk {}

impl RamDisk {
    fn new(size: u64, block_size: u32, read_only: bool) -> Result<RamDisk> {
        let len = usize::try_from(size.max(1)).context("size too large")?;
        // SAFETY: a fresh private anonymous mapping; no existing memory is affected.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
                -1,
                0,
            )
        };
        if base == libc::MAP_FAILED {
            bail!(
                "mmap of {size} bytes failed: {}",
                std::io::Error::last_os_error()
            );
        }
        let blocks = size.div_ceil(u64::from(block_size)) as usize;
        Ok(RamDisk {
            base: base.cast(),
            info: DeviceInfo {
                size,
                read_only,
                block_size,
            },
            locks: (0..blocks).map(|_| RwLock::new(())).collect(),
            allocated: (0..blocks.div_ceil(64))
                .map(|_| AtomicU64::new(0))
                .collect(),
        })
    }

    fn bs(&self) -> u64 {
        u64::from(self.info.block_size)
    }

    fn is_allocated(&self, block: u64) -> bool {
        self.allocated[(block / 64) as usize].load(Ordering::Relaxed) & (1 << (block % 64)) != 0
    }

    fn set_allocated(&self, block: u64, on: bool) {
        let word = &self.allocated[(block / 64) as usize];
        if on {
            word.fetch_or(1 << (block % 64), Ordering::Relaxed);
        } else {
            word.fetch_and(!(1 << (block % 64)), Ordering::Relaxed);
        }
    }

    /// Calls `f(block, device_offset, len)` for each block-sized piece of the range.
    fn pieces(&self, offset: u64, len: u64, mut f: impl FnMut(u64, u64, u64)) {
        let bs = self.bs();
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let n = (bs - pos % bs).min(end - pos);
            f(pos / bs, pos, n);
            pos += n;
        }
    }

    fn writable(&self, offset: u64, len: u64) -> DevResult<()> {
        check_range(offset, len, self.info.size)?;
        if self.info.read_only {
            return Err(DevError::ReadOnly);
        }
        Ok(())
    }

    /// Zeroes a range; whole blocks give their memory back when `unmap`.
    fn zero(&self, offset: u64, len: u64, unmap: bool) {
        let bs = self.bs();
        self.pieces(offset, len, |block, at, n| {
            let _guard = self.locks[block as usize].write();
            if unmap && n == bs {
                // SAFETY: [at, at+n) is inside the mapping (range checked by the caller) and
                // page-aligned (whole block, block size >= 4 KiB is checked at startup); the
                // block's lock is held exclusively.
                unsafe {
                    libc::madvise(
                        self.base.add(at as usize).cast(),
                        n as usize,
                        libc::MADV_DONTNEED,
                    );
                }
                self.set_allocated(block, false);
            } else {
                // SAFETY: inside the mapping, block lock held exclusively.
                unsafe { std::ptr::write_bytes(self.base.add(at as usize), 0, n as usize) };
                if !unmap {
                    self.set_allocated(block, true);
                }
            }
        });
    }
}

impl Drop for RamDisk {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new` with this length and is no longer used.
        unsafe { libc::munmap(self.base.cast(), self.info.size.max(1) as usize) };
    }
}

impl BlockDevice for RamDisk {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        check_range(offset, iov_len(bufs), self.info.size)?;
        let mut at = offset;
        for buf in bufs.iter_mut() {
            let mut done = 0usize;
            self.pieces(at, buf.len() as u64, |block, pos, n| {
                let _guard = self.locks[block as usize].read();
                // SAFETY: [pos, pos+n) is inside the mapping (range checked above) and the
                // destination is a distinct buffer of at least `done + n` bytes.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        self.base.add(pos as usize),
                        buf[done..].as_mut_ptr(),
                        n as usize,
                    )
                };
                done += n as usize;
            });
            at += buf.len() as u64;
        }
        Ok(())
    }

    async fn write(&self, offset: u64, bufs: &[IoSlice<'_>], _fua: bool) -> DevResult<()> {
        self.writable(offset, iov_len(bufs))?;
        let mut at = offset;
        for buf in bufs {
            let mut done = 0usize;
            self.pieces(at, buf.len() as u64, |block, pos, n| {
                let _guard = self.locks[block as usize].write();
                // SAFETY: inside the mapping (range checked above), block lock held
                // exclusively, the source is a distinct buffer.
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        buf[done..].as_ptr(),
                        self.base.add(pos as usize),
                        n as usize,
                    )
                };
                self.set_allocated(block, true);
                done += n as usize;
            });
            at += buf.len() as u64;
        }
        Ok(())
    }

    async fn flush(&self) -> DevResult<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.writable(offset, len)?;
        self.zero(offset, len, true);
        Ok(())
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> DevResult<()> {
        self.writable(offset, len)?;
        if fast_only && !may_unmap {
            return Err(DevError::NotFast);
        }
        self.zero(offset, len, may_unmap);
        Ok(())
    }

    async fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.info.size)?;
        let mut out: Vec<Extent> = Vec::new();
        self.pieces(offset, len, |block, _, n| {
            let allocated = self.is_allocated(block);
            match out.last_mut() {
                Some(last) if last.allocated == allocated => last.len += n,
                _ => out.push(Extent {
                    len: n,
                    allocated,
                    zero: !allocated,
                }),
            }
        });
        Ok(out)
    }
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("unknown size suffix in {s:?}"),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t);
    }
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let block_size = u32::try_from(parse_size(&args.block_size)?)
        .ok()
        .filter(|b| b.is_power_of_two() && *b >= 4096)
        .context("--block-size must be a power of two from 4K to 2G")?;
    match args.device.as_str() {
        "ram" => serve(&args, |size, ro| RamDisk::new(size, block_size, ro)).await,
        "mem" => serve(&args, |size, ro| Ok(MemDevice::new(size, block_size, ro))).await,
        other => bail!("unknown --device {other:?} (ram or mem)"),
    }
}

async fn serve<D: BlockDevice>(args: &Args, make: impl Fn(u64, bool) -> Result<D>) -> Result<()> {
    let exports = Arc::new(Exports::new());
    for spec in &args.exports {
        let (name, rest) = spec
            .split_once('=')
            .with_context(|| format!("--export {spec:?}: expected NAME=SIZE[,ro]"))?;
        let (size, read_only) = match rest.strip_suffix(",ro") {
            Some(size) => (size, true),
            None => (rest, false),
        };
        let size = parse_size(size)?;
        let description = format!("in-memory device, {size} bytes");
        exports.add(name, Arc::new(make(size, read_only)?), &description)?;
    }
    exports.set_default(args.default.as_deref())?;
    let server = Server::new(Arc::clone(&exports));
    let mut listeners = Vec::new();
    for l in &args.listen {
        let addr: ListenAddr = l.parse()?;
        let listener = Listener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("listening on {}", listener.local_addr());
        listeners.push(listener);
    }
    let stop = server.shutdown_handle();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.shutdown();
    });
    server.serve(listeners).await;
    Ok(())
}
