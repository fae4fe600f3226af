//! A stand-alone vhost-user-blk server for tests and benchmarks of the vhost layer, without a
//! pool: it serves one device per socket, either a sparse in-memory `MemDevice` or a plain
//! raw image file, until SIGINT/SIGTERM. Each volume's serial (GET_ID) is its socket's file
//! name without extension.
//!
//! ```text
//! vhost-serve --socket PATH [--socket PATH2 ...]
//!             (--mem SIZE | --null SIZE | --file IMAGE [--file IMAGE2 ...])
//!             [--block-size BYTES] [--queues N] [--read-only] [--dispatch queue|runtime]
//! ```
//!
//! `--null` is a device that does nothing (reads leave the buffer as it is, writes are dropped):
//! it measures the vhost layer's own cost, like qemu-storage-daemon's `null-co` driver.
//!
//! `--file` is a simple positional-I/O device (pread/pwrite, fdatasync, hole punching) run as
//! tokio tasks (`--dispatch runtime` is implied): good enough for the end-to-end VM test of the
//! vhost layer before `uthin serve` exists, not a data path to measure.

use std::fs::{File, OpenOptions};
use std::io::{IoSlice, IoSliceMut};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, bail};
use uthin::device::mem::MemDevice;
use uthin::device::{BlockDevice, DevError, DevResult, DeviceInfo, Extent, check_range, iov_len};
use uthin::vhost::{Dispatch, VhostUserBlkConfig, VhostUserBlkServer};

/// A raw image file as a block device.
struct FileDevice {
    file: File,
    info: DeviceInfo,
}

impl FileDevice {
    fn open(path: &PathBuf, block_size: u32, read_only: bool) -> anyhow::Result<Self> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .with_context(|| format!("cannot open {}", path.display()))?;
        let size = file.metadata()?.len();
        Ok(FileDevice {
            file,
            info: DeviceInfo {
                size,
                read_only,
                block_size,
            },
        })
    }

    fn writable(&self, offset: u64, len: u64) -> DevResult<()> {
        check_range(offset, len, self.info.size)?;
        if self.info.read_only {
            return Err(DevError::ReadOnly);
        }
        Ok(())
    }

    fn punch(&self, offset: u64, len: u64, mode: i32) -> DevResult<()> {
        // SAFETY: fallocate on a file descriptor we own, with plain integer arguments.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                mode,
                offset as libc::off_t,
                len as libc::off_t,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error().into());
        }
        Ok(())
    }
}

impl BlockDevice for FileDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    async fn read(&self, mut offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        check_range(offset, iov_len(bufs), self.info.size)?;
        for b in bufs.iter_mut() {
            self.file.read_exact_at(b, offset)?;
            offset += b.len() as u64;
        }
        Ok(())
    }

    async fn write(&self, mut offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        self.writable(offset, iov_len(bufs))?;
        for b in bufs {
            self.file.write_all_at(b, offset)?;
            offset += b.len() as u64;
        }
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    async fn flush(&self) -> DevResult<()> {
        self.file.sync_data()?;
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.writable(offset, len)?;
        self.punch(
            offset,
            len,
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        )
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        _fast_only: bool,
    ) -> DevResult<()> {
        self.writable(offset, len)?;
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
        };
        self.punch(offset, len, mode)
    }

    async fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.info.size)?;
        Ok(vec![Extent {
            len,
            allocated: true,
            zero: false,
        }])
    }
}

/// A device that does no I/O: the cost of the protocol alone.
struct NullDevice {
    info: DeviceInfo,
}

impl BlockDevice for NullDevice {
    fn info(&self) -> DeviceInfo {
        self.info.clone()
    }

    async fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        check_range(offset, iov_len(bufs), self.info.size)
    }

    async fn write(&self, offset: u64, bufs: &[IoSlice<'_>], _fua: bool) -> DevResult<()> {
        check_range(offset, iov_len(bufs), self.info.size)
    }

    async fn flush(&self) -> DevResult<()> {
        Ok(())
    }

    async fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        check_range(offset, len, self.info.size)
    }

    async fn write_zeroes(&self, offset: u64, len: u64, _: bool, _: bool) -> DevResult<()> {
        check_range(offset, len, self.info.size)
    }

    async fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        check_range(offset, len, self.info.size)?;
        Ok(vec![Extent {
            len,
            allocated: true,
            zero: false,
        }])
    }
}

fn parse_size(s: &str) -> anyhow::Result<u64> {
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    let n: u64 = num.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(mult).context("size overflows")
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut sockets = Vec::new();
    let mut files = Vec::new();
    let mut mem_size = None;
    let mut null_size = None;
    let mut block_size = 65536u32;
    let mut queues = 1u16;
    let mut read_only = false;
    let mut runtime_dispatch = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--socket" => sockets.push(PathBuf::from(value()?)),
            "--file" => files.push(PathBuf::from(value()?)),
            "--mem" => mem_size = Some(parse_size(&value()?)?),
            "--null" => null_size = Some(parse_size(&value()?)?),
            "--block-size" => block_size = u32::try_from(parse_size(&value()?)?)?,
            "--queues" => queues = value()?.parse().context("--queues")?,
            "--read-only" => read_only = true,
            "--dispatch" => match value()?.as_str() {
                "queue" => runtime_dispatch = false,
                "runtime" => runtime_dispatch = true,
                other => bail!("--dispatch must be queue or runtime, not {other:?}"),
            },
            other => bail!("unknown argument {other:?} (see the source's header for usage)"),
        }
    }
    if sockets.is_empty() {
        bail!("at least one --socket is needed");
    }
    if !block_size.is_power_of_two() {
        bail!("--block-size must be a power of two");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dispatch = if runtime_dispatch || !files.is_empty() {
        Dispatch::Runtime(runtime.handle().clone())
    } else {
        Dispatch::QueueThread(Some(runtime.handle().clone()))
    };
    let mut servers = Vec::new();
    for (i, socket) in sockets.iter().enumerate() {
        // The serial the guest sees is the socket's file name without extension.
        let name = socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| format!("vol{i}"));
        let cfg = VhostUserBlkConfig::new(&name)
            .with_queues(queues)
            .with_dispatch(dispatch.clone());
        let server = if let Some(size) = null_size {
            let info = DeviceInfo {
                size,
                read_only,
                block_size,
            };
            VhostUserBlkServer::start(Arc::new(NullDevice { info }), socket, cfg)?
        } else if let Some(size) = mem_size {
            let dev = Arc::new(MemDevice::new(size, block_size, read_only));
            VhostUserBlkServer::start(dev, socket, cfg)?
        } else {
            let Some(file) = files.get(i) else {
                bail!("socket {} has no --file (or give --mem)", socket.display());
            };
            let dev = Arc::new(FileDevice::open(file, block_size, read_only)?);
            VhostUserBlkServer::start(dev, socket, cfg)?
        };
        eprintln!("vhost-serve: serving {name} on {}", socket.display());
        servers.push(server);
    }
    runtime.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        anyhow::Ok(())
    })?;
    for s in servers {
        s.stop()?;
    }
    eprintln!("vhost-serve: stopped");
    Ok(())
}
