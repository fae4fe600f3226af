//! The transmission phase of one connection.
//!
//! Three kinds of tasks share a connection:
//! - the **reader** (the connection's own task) reads request headers, validates them
//!   ([`validate`]), reads write payloads into pooled buffers, and spawns one task per request;
//! - **request tasks** call the device and turn the result into a reply, so requests run
//!   concurrently and complete in any order;
//! - the **writer** takes replies from a channel as they complete and writes everything that
//!   is queued with one `writev`, so replies to many small requests share a system call.
//!
//! Memory is bounded per connection by a semaphore of [`BUDGET`] bytes: each request holds
//! [`BASE_COST`] plus its data length until its reply has been written, and the reader waits
//! for budget before reading the next request. When the reader stops (client `NBD_CMD_DISC`,
//! end of stream, protocol error, server shutdown, export closed), the connection waits until
//! the whole budget is back, i.e. every request already read has been executed and answered,
//! and then closes.

use std::fmt;
use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Range;
use std::sync::Arc;

use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tracing::{debug, warn};

use crate::device::{BlockDevice, DevError, Extent};

use super::buffers::{BufferPool, PooledBuf};
use super::handshake::Session;
use super::request::{Command, Limits, Verdict, device_error, validate};
use super::wire::{
    COMPACT_REQUEST_LEN, EXTENDED_REQUEST_LEN, NbdError, ReplyMode, ReplyPrefix, RequestHeader,
    STATE_HOLE, STATE_ZERO, StatusDescriptor, block_status_chunk, command_name, error_chunk,
};

/// Bytes of in-flight requests one connection may hold (request and reply buffers).
const BUDGET: u32 = 96 << 20;
/// What a request costs besides its data buffer: bounds the number of requests in flight
/// (96 MiB / 64 KiB = 1536) even when they carry no data.
const BASE_COST: u32 = 64 << 10;
/// At most this many replies go into one `writev`.
const MAX_BATCH: usize = 256;
/// The most extents sent in one block-status reply (512 KiB of descriptors in compact mode).
const MAX_EXTENTS: usize = 1 << 16;
/// Reads ask the device for holes at most this many times before reading the rest as data.
const MAX_STATUS_CALLS: usize = 16;

/// Why a connection's transmission phase ended.
#[derive(Debug)]
pub(crate) enum End {
    /// The client sent `NBD_CMD_DISC`.
    Disconnect,
    /// The client closed the connection between requests.
    ClientClosed,
    /// The server is shutting down or the export was closed.
    Stopped,
    /// The client broke the protocol; the connection was dropped.
    ProtocolError(String),
    /// Reading from or writing to the socket failed.
    Io(io::Error),
}

impl fmt::Display for End {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            End::Disconnect => f.write_str("client sent NBD_CMD_DISC"),
            End::ClientClosed => f.write_str("client closed the connection"),
            End::Stopped => f.write_str("server shutdown or export closed"),
            End::ProtocolError(m) => write!(f, "protocol error: {m}"),
            End::Io(e) => write!(f, "I/O error: {e}"),
        }
    }
}

/// A reply ready to be written, as borrowed slices (no copy of read data).
enum Body {
    /// Header-only reply: simple reply, final NONE chunk, single hole chunk.
    Prefix(ReplyPrefix),
    /// Header followed by the data of a buffer: a read.
    PrefixData(ReplyPrefix, PooledBuf),
    /// A reply built on the heap: error chunks, block status.
    Bytes(Vec<u8>),
    /// A read reply in several chunks (data and holes), all from one buffer.
    Chunks {
        chunks: Vec<(ReplyPrefix, Range<usize>)>,
        buf: PooledBuf,
    },
}

struct Reply {
    body: Body,
    /// Returned to the connection's budget once the reply is written (or dropped).
    _permit: OwnedSemaphorePermit,
}

impl Reply {
    fn push_slices<'a>(&'a self, out: &mut Vec<IoSlice<'a>>) {
        match &self.body {
            Body::Prefix(p) => out.push(IoSlice::new(p.as_bytes())),
            Body::PrefixData(p, buf) => {
                out.push(IoSlice::new(p.as_bytes()));
                out.push(IoSlice::new(buf));
            }
            Body::Bytes(b) => out.push(IoSlice::new(b)),
            Body::Chunks { chunks, buf } => {
                for (prefix, range) in chunks {
                    out.push(IoSlice::new(prefix.as_bytes()));
                    if !range.is_empty() {
                        out.push(IoSlice::new(buf.get(range.clone()).unwrap_or(&[])));
                    }
                }
            }
        }
    }
}

/// What request tasks share: the device and what was negotiated.
struct Conn<D> {
    device: Arc<D>,
    limits: Limits,
    /// Reads at least this long are checked for holes (structured replies only).
    sparse_read_min: u32,
    pool: Arc<BufferPool>,
}

/// One run of a read: `len` bytes at `start` (relative to the request) that are data or zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    len: u64,
    zero: bool,
}

fn push_run(runs: &mut Vec<Run>, start: u64, len: u64, zero: bool) {
    match runs.last_mut() {
        Some(last) if last.zero == zero && last.start + last.len == start => last.len += len,
        _ => runs.push(Run { start, len, zero }),
    }
}

/// Turns device extents into block-status descriptors for a request of `len` bytes: lengths
/// clipped to the request, equal neighbours merged, at most one with `req_one`, at most
/// [`MAX_EXTENTS`]. Never empty: a device that says nothing gets "status 0" (allocated,
/// contents unknown) for the whole range, which the protocol allows for any range.
fn status_descriptors(extents: &[Extent], len: u64, req_one: bool) -> Vec<StatusDescriptor> {
    let mut out: Vec<StatusDescriptor> = Vec::new();
    let mut covered = 0u64;
    for e in extents {
        let n = e.len.min(len - covered);
        if n == 0 {
            break;
        }
        let flags = if e.allocated { 0 } else { STATE_HOLE } | if e.zero { STATE_ZERO } else { 0 };
        match out.last_mut() {
            Some(last) if last.flags == flags => last.len += n,
            _ => {
                if out.len() == MAX_EXTENTS || (req_one && !out.is_empty()) {
                    break;
                }
                out.push(StatusDescriptor { len: n, flags });
            }
        }
        covered += n;
        if covered == len {
            break;
        }
    }
    if out.is_empty() {
        out.push(StatusDescriptor { len, flags: 0 });
    }
    out
}

impl<D: BlockDevice> Conn<D> {
    fn mode(&self) -> ReplyMode {
        self.limits.mode
    }

    fn ok(&self, cookie: u64, request_offset: u64) -> Body {
        match self.mode() {
            // With extended headers, simple replies are gone: a NONE chunk says "done".
            ReplyMode::Extended => Body::Prefix(ReplyPrefix::none(
                ReplyMode::Extended,
                cookie,
                request_offset,
            )),
            _ => Body::Prefix(ReplyPrefix::simple(cookie, None)),
        }
    }

    fn error(&self, cookie: u64, request_offset: u64, error: NbdError, message: &str) -> Body {
        match self.mode() {
            ReplyMode::Simple => Body::Prefix(ReplyPrefix::simple(cookie, Some(error))),
            mode => Body::Bytes(error_chunk(mode, cookie, request_offset, error, message)),
        }
    }

    fn device_failure(
        &self,
        cookie: u64,
        request_offset: u64,
        command: &Command,
        err: &DevError,
    ) -> Body {
        let error = device_error(command, err);
        match error {
            NbdError::Io => warn!(%err, ?command, "device request failed"),
            _ => debug!(%err, ?command, "device request failed"),
        }
        self.error(cookie, request_offset, error, &err.to_string())
    }

    /// Result of a command that returns no data.
    fn status(
        &self,
        cookie: u64,
        request_offset: u64,
        command: &Command,
        r: Result<(), DevError>,
    ) -> Body {
        match r {
            Ok(()) => self.ok(cookie, request_offset),
            Err(e) => self.device_failure(cookie, request_offset, command, &e),
        }
    }

    async fn execute(&self, cookie: u64, command: Command, payload: Option<PooledBuf>) -> Body {
        let dev = &*self.device;
        match command {
            Command::Read {
                offset,
                len,
                single_chunk,
            } => self.read(cookie, offset, len, single_chunk).await,
            Command::Write { offset, fua, .. } => {
                let Some(buf) = payload else {
                    // The reader always reads a write's payload; this cannot happen.
                    return self.error(cookie, offset, NbdError::Io, "write payload missing");
                };
                let r = dev.write(offset, &[IoSlice::new(&buf)], fua).await;
                drop(buf);
                self.status(cookie, offset, &command, r)
            }
            Command::Flush => {
                let r = dev.flush().await;
                self.status(cookie, 0, &command, r)
            }
            Command::Trim { offset, len, fua } => {
                let mut r = dev.discard(offset, len).await;
                if r.is_ok() && fua {
                    r = dev.flush().await;
                }
                self.status(cookie, offset, &command, r)
            }
            Command::Cache { offset, len } => {
                let r = dev.prefetch(offset, len).await;
                self.status(cookie, offset, &command, r)
            }
            Command::WriteZeroes {
                offset,
                len,
                fua,
                may_unmap,
                fast_only,
            } => {
                let mut r = dev.write_zeroes(offset, len, may_unmap, fast_only).await;
                if r.is_ok() && fua {
                    r = dev.flush().await;
                }
                self.status(cookie, offset, &command, r)
            }
            Command::BlockStatus {
                offset,
                len,
                req_one,
                context_id,
            } => match dev.block_status(offset, len).await {
                Ok(extents) => {
                    let descriptors = status_descriptors(&extents, len, req_one);
                    Body::Bytes(block_status_chunk(
                        self.mode(),
                        cookie,
                        offset,
                        context_id,
                        &descriptors,
                    ))
                }
                Err(e) => self.device_failure(cookie, offset, &command, &e),
            },
            // The reader handles DISC itself; answer defensively rather than panic.
            Command::Disconnect => self.ok(cookie, 0),
        }
    }

    async fn read(&self, cookie: u64, offset: u64, len: u32, single_chunk: bool) -> Body {
        let mode = self.mode();
        if len == 0 {
            // With structured replies a read is never answered with a simple reply.
            return match mode {
                ReplyMode::Simple => Body::Prefix(ReplyPrefix::simple(cookie, None)),
                _ => Body::Prefix(ReplyPrefix::none(mode, cookie, offset)),
            };
        }
        if mode != ReplyMode::Simple && !single_chunk && len >= self.sparse_read_min {
            return self.sparse_read(cookie, offset, len).await;
        }
        let mut buf = self.pool.take(len as usize);
        match self
            .device
            .read(offset, &mut [IoSliceMut::new(&mut buf)])
            .await
        {
            Ok(()) => {
                let prefix = match mode {
                    ReplyMode::Simple => ReplyPrefix::simple(cookie, None),
                    _ => {
                        ReplyPrefix::offset_data(mode, cookie, offset, true, offset, u64::from(len))
                    }
                };
                Body::PrefixData(prefix, buf)
            }
            Err(e) => self.device_failure(
                cookie,
                offset,
                &Command::Read {
                    offset,
                    len,
                    single_chunk,
                },
                &e,
            ),
        }
    }

    /// A structured read that sends `OFFSET_HOLE` chunks for ranges that read as zeros and
    /// reads only the rest from the device.
    async fn sparse_read(&self, cookie: u64, offset: u64, len: u32) -> Body {
        let mode = self.mode();
        let total = u64::from(len);
        let mut runs: Vec<Run> = Vec::new();
        let mut pos = 0u64;
        for _ in 0..MAX_STATUS_CALLS {
            if pos == total {
                break;
            }
            // Holes are an optimisation: if the device cannot tell, read everything.
            let Ok(extents) = self.device.block_status(offset + pos, total - pos).await else {
                break;
            };
            let before = pos;
            for e in &extents {
                let n = e.len.min(total - pos);
                if n == 0 {
                    break;
                }
                push_run(&mut runs, pos, n, e.zero);
                pos += n;
            }
            if pos == before {
                break;
            }
        }
        if pos < total {
            push_run(&mut runs, pos, total - pos, false);
        }
        let command = Command::Read {
            offset,
            len,
            single_chunk: false,
        };
        if let [only] = runs.as_slice() {
            if only.zero {
                return Body::Prefix(ReplyPrefix::offset_hole(
                    mode, cookie, offset, true, offset, len,
                ));
            }
            let mut buf = self.pool.take(len as usize);
            return match self
                .device
                .read(offset, &mut [IoSliceMut::new(&mut buf)])
                .await
            {
                Ok(()) => Body::PrefixData(
                    ReplyPrefix::offset_data(mode, cookie, offset, true, offset, total),
                    buf,
                ),
                Err(e) => self.device_failure(cookie, offset, &command, &e),
            };
        }
        let mut buf = self.pool.take(len as usize);
        let mut chunks = Vec::with_capacity(runs.len());
        let last = runs.len() - 1;
        for (i, run) in runs.iter().enumerate() {
            // Runs lie inside the request, so they fit in usize and u32.
            let range = run.start as usize..(run.start + run.len) as usize;
            let at = offset + run.start;
            let done = i == last;
            if run.zero {
                chunks.push((
                    ReplyPrefix::offset_hole(mode, cookie, offset, done, at, run.len as u32),
                    0..0,
                ));
                continue;
            }
            let Some(part) = buf.get_mut(range.clone()) else {
                return self.error(cookie, offset, NbdError::Io, "internal error: bad read run");
            };
            if let Err(e) = self.device.read(at, &mut [IoSliceMut::new(part)]).await {
                return self.device_failure(cookie, offset, &command, &e);
            }
            chunks.push((
                ReplyPrefix::offset_data(mode, cookie, offset, done, at, run.len),
                range,
            ));
        }
        Body::Chunks { chunks, buf }
    }
}

/// Resolves when the server stops, the export closes or the writer fails.
async fn stop_signal(
    mut server: watch::Receiver<bool>,
    mut export: watch::Receiver<bool>,
    mut writer_failed: watch::Receiver<bool>,
) {
    // A dropped sender counts as a stop too (wait_for returns an error at once).
    tokio::select! {
        _ = server.wait_for(|s| *s) => {}
        _ = export.wait_for(|s| *s) => {}
        _ = writer_failed.wait_for(|s| *s) => {}
    }
}

/// Reads `n` bytes and throws them away (the payload of a rejected request).
async fn drain<R: AsyncRead + Unpin>(rd: &mut BufReader<R>, n: u64) -> io::Result<()> {
    let copied = tokio::io::copy(&mut (&mut *rd).take(n), &mut tokio::io::sink()).await?;
    if copied < n {
        return Err(io::ErrorKind::UnexpectedEof.into());
    }
    Ok(())
}

/// Writes every slice, however many `writev` calls it takes.
async fn write_all_vectored<W: AsyncWrite + Unpin>(
    wr: &mut W,
    mut slices: &mut [IoSlice<'_>],
) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let n = wr.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

async fn writer_loop<W: AsyncWrite + Unpin>(
    mut wr: W,
    mut replies: mpsc::UnboundedReceiver<Reply>,
    failed: watch::Sender<bool>,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(MAX_BATCH);
    let result = loop {
        let Some(first) = replies.recv().await else {
            break Ok(());
        };
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match replies.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        let mut slices = Vec::with_capacity(batch.len() * 2);
        for r in &batch {
            r.push_slices(&mut slices);
        }
        let written = write_all_vectored(&mut wr, &mut slices).await;
        drop(slices);
        // Dropping the replies returns their buffers to the pool and their budget.
        batch.clear();
        if let Err(e) = written {
            break Err(e);
        }
    };
    match &result {
        Ok(()) => {
            let _ = wr.shutdown().await;
        }
        Err(_) => {
            failed.send_replace(true);
        }
    }
    result
}

/// Runs the transmission phase until the client leaves or the server stops, then waits for
/// every request already read to be answered. Returns why it ended.
pub(crate) async fn run<R, W, D>(
    mut rd: BufReader<R>,
    wr: W,
    session: Session<D>,
    pool: Arc<BufferPool>,
    sparse_reads: bool,
    server_stop: watch::Receiver<bool>,
) -> End
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let Session {
        lease,
        limits,
        preferred_block,
    } = session;
    let conn = Arc::new(Conn {
        device: Arc::clone(lease.entry().device()),
        limits,
        sparse_read_min: if sparse_reads {
            preferred_block
        } else {
            u32::MAX
        },
        pool,
    });
    let (tx, rx) = mpsc::unbounded_channel::<Reply>();
    let (failed_tx, failed_rx) = watch::channel(false);
    let writer = tokio::spawn(writer_loop(wr, rx, failed_tx));
    let budget = Arc::new(Semaphore::new(BUDGET as usize));

    let stop = stop_signal(server_stop, lease.closing(), failed_rx);
    tokio::pin!(stop);
    let extended = conn.limits.mode == ReplyMode::Extended;
    let header_len = if extended {
        EXTENDED_REQUEST_LEN
    } else {
        COMPACT_REQUEST_LEN
    };
    let mut header_buf = [0u8; EXTENDED_REQUEST_LEN];

    let end = loop {
        // Wait for the next request (or a stop). EOF before a header is a clean close.
        let first = tokio::select! {
            biased;
            _ = &mut stop => break End::Stopped,
            r = rd.fill_buf() => r.map(|b| b.is_empty()),
        };
        match first {
            Ok(true) => break End::ClientClosed,
            Ok(false) => {}
            Err(e) => break End::Io(e),
        }
        let header_bytes = &mut header_buf[..header_len];
        let read = tokio::select! {
            biased;
            _ = &mut stop => break End::Stopped,
            r = rd.read_exact(header_bytes) => r,
        };
        if let Err(e) = read {
            break End::Io(e);
        }
        let header = match RequestHeader::parse(&header_buf[..header_len], extended) {
            Ok(h) => h,
            Err(magic) => {
                break End::ProtocolError(format!("bad request magic {magic:#010x}"));
            }
        };
        match validate(&header, &conn.limits) {
            Verdict::Execute(Command::Disconnect) => break End::Disconnect,
            Verdict::Execute(command) => {
                let cost = BASE_COST + command.buffer_len();
                let permit = tokio::select! {
                    biased;
                    _ = &mut stop => break End::Stopped,
                    p = Arc::clone(&budget).acquire_many_owned(cost) => p,
                };
                let Ok(permit) = permit else {
                    break End::Stopped; // the semaphore is never closed
                };
                let payload = match command {
                    Command::Write { len, .. } => {
                        let mut buf = conn.pool.take(len as usize);
                        let read = tokio::select! {
                            biased;
                            _ = &mut stop => break End::Stopped,
                            r = rd.read_exact(&mut buf) => r,
                        };
                        if let Err(e) = read {
                            break End::Io(e);
                        }
                        Some(buf)
                    }
                    _ => None,
                };
                let conn = Arc::clone(&conn);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let body = conn.execute(header.cookie, command, payload).await;
                    // The writer is gone only if the connection failed: nothing to answer.
                    let _ = tx.send(Reply {
                        body,
                        _permit: permit,
                    });
                });
            }
            Verdict::Reject {
                rejection,
                drain: n,
            } => {
                debug!(
                    command = command_name(header.command),
                    offset = header.offset,
                    length = header.length,
                    error = %rejection.error,
                    "rejected request: {}",
                    rejection.message
                );
                if n > 0 {
                    let drained = tokio::select! {
                        biased;
                        _ = &mut stop => break End::Stopped,
                        r = drain(&mut rd, n) => r,
                    };
                    if let Err(e) = drained {
                        break End::Io(e);
                    }
                }
                let permit = tokio::select! {
                    biased;
                    _ = &mut stop => break End::Stopped,
                    p = Arc::clone(&budget).acquire_many_owned(BASE_COST) => p,
                };
                let Ok(permit) = permit else {
                    break End::Stopped;
                };
                let body = conn.error(
                    header.cookie,
                    header.offset,
                    rejection.error,
                    &rejection.message,
                );
                let _ = tx.send(Reply {
                    body,
                    _permit: permit,
                });
            }
            Verdict::Disconnect(message) => break End::ProtocolError(message),
        }
    };
    drop(tx);
    // Every request read so far holds budget until its reply is written or dropped: taking
    // the whole budget waits for all of them.
    let _all = budget.acquire_many(BUDGET).await;
    match writer.await {
        Ok(Ok(())) => end,
        Ok(Err(e)) => match end {
            End::Stopped | End::ClientClosed | End::Disconnect => End::Io(e),
            other => other,
        },
        Err(join) => End::Io(io::Error::other(format!("reply writer failed: {join}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(len: u64, allocated: bool) -> Extent {
        Extent {
            len,
            allocated,
            zero: !allocated,
        }
    }

    #[test]
    fn descriptors_are_merged_clipped_and_limited() {
        let e = [
            ext(100, true),
            ext(50, true),
            ext(200, false),
            ext(500, true),
        ];
        let d = status_descriptors(&e, 400, false);
        assert_eq!(
            d,
            vec![
                StatusDescriptor { len: 150, flags: 0 },
                StatusDescriptor {
                    len: 200,
                    flags: STATE_HOLE | STATE_ZERO
                },
                StatusDescriptor { len: 50, flags: 0 },
            ]
        );
        let d = status_descriptors(&e, 400, true);
        assert_eq!(d, vec![StatusDescriptor { len: 150, flags: 0 }]);
        let d = status_descriptors(&e, 120, true);
        assert_eq!(d, vec![StatusDescriptor { len: 120, flags: 0 }]);
        assert_eq!(
            status_descriptors(&[], 4096, false),
            vec![StatusDescriptor {
                len: 4096,
                flags: 0
            }]
        );
        let many: Vec<Extent> = (0..(MAX_EXTENTS as u64 + 10))
            .map(|i| ext(512, i % 2 == 0))
            .collect();
        assert_eq!(
            status_descriptors(&many, u64::MAX, false).len(),
            MAX_EXTENTS
        );
    }

    #[test]
    fn runs_merge_only_when_adjacent_and_alike() {
        let mut runs = Vec::new();
        push_run(&mut runs, 0, 10, false);
        push_run(&mut runs, 10, 10, false);
        push_run(&mut runs, 20, 5, true);
        push_run(&mut runs, 25, 5, true);
        push_run(&mut runs, 30, 1, false);
        assert_eq!(
            runs,
            vec![
                Run {
                    start: 0,
                    len: 20,
                    zero: false
                },
                Run {
                    start: 20,
                    len: 10,
                    zero: true
                },
                Run {
                    start: 30,
                    len: 1,
                    zero: false
                }
            ]
        );
    }
}
