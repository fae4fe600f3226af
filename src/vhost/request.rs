//! One virtio-blk request: validated once from its descriptor chain, then executed against a
//! [`BlockDevice`] with guest memory passed by reference.
//!
//! ## Wire layout (virtio 1.2 §5.2.6, little-endian)
//!
//! The driver's buffers form two byte streams, the device-readable descriptors first, then the
//! device-writable ones. With `VIRTIO_F_VERSION_1` the split of either stream into descriptors is
//! free (no framing requirement), so the parser works on streams, not on descriptor positions.
//!
//! ```text
//! readable:  type: u32 | reserved (ioprio): u32 | sector: u64 | data-out ...
//! writable:  data-in ... | status: u8
//! ```
//!
//! * `IN` (0): data-in receives `len` bytes read at `sector × 512`.
//! * `OUT` (1): data-out is written at `sector × 512`.
//! * `FLUSH` (4): makes completed writes durable.
//! * `GET_ID` (8): data-in receives the 20-byte serial (the volume name).
//! * `DISCARD` (11), `WRITE_ZEROES` (13): data-out is an array of 16-byte segments
//!   `sector: u64 | num_sectors: u32 | flags: u32` where flag bit 0 is `unmap` (write-zeroes only).
//!
//! Status: `OK` (0), `IOERR` (1), `UNSUPP` (2). A chain with no writable byte has nowhere to
//! put a status: it is returned to the driver with a used length of 0 and nothing else happens.
//!
//! Every check happens here, before the device is called: descriptors outside guest memory,
//! readable descriptors after writable ones, short headers, data lengths that are not whole
//! sectors or exceed the advertised transfer size, ranges past the end of the device, writes to
//! a read-only device (IOERR); unknown types and reserved flags (UNSUPP).

use std::io::{IoSlice, IoSliceMut};
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures_util::FutureExt;
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES,
};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::config::{BlkGeometry, MAX_DISCARD_SEGMENTS, MAX_TRANSFER_BYTES, SECTOR_SIZE};
use crate::device::{BlockDevice, DevError, DevResult};

/// The guest memory map of one connection (no dirty-page bitmap: migration logging is not offered).
pub type GuestMem = GuestMemoryMmap<()>;

/// Size of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: u64 = 16;

/// Size of one discard / write-zeroes segment (`struct virtio_blk_discard_write_zeroes`).
const SEGMENT_LEN: u64 = 16;

/// Bit 0 of a write-zeroes segment's flags: the device may deallocate the range.
const SEGMENT_FLAG_UNMAP: u32 = 1;

/// A status byte value (`VIRTIO_BLK_S_*`).
pub type Status = u8;
const S_OK: Status = VIRTIO_BLK_S_OK as Status;
const S_IOERR: Status = VIRTIO_BLK_S_IOERR as Status;
const S_UNSUPP: Status = VIRTIO_BLK_S_UNSUPP as Status;

/// One descriptor as the driver gave it: a guest-physical range and its direction.
#[derive(Debug, Clone, Copy)]
pub struct DescSegment {
    /// Guest-physical address of the buffer.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// The device writes this buffer (`VIRTQ_DESC_F_WRITE`).
    pub device_writes: bool,
}

/// A host pointer into guest memory, valid while the `Arc<GuestMem>` it was taken from lives.
#[derive(Debug, Clone, Copy)]
struct GuestBuf {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a GuestBuf is only a pointer and a length into a shared mapping of guest memory; it
// is dereferenced only while the owning `IoRequest` (which holds the mapping's `Arc`) is alive,
// from whichever thread runs that request.
unsafe impl Send for GuestBuf {}
// SAFETY: as for Send; sharing the pointer value itself carries no access.
unsafe impl Sync for GuestBuf {}

/// A discard or write-zeroes range in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ZeroRange {
    offset: u64,
    len: u64,
    unmap: bool,
}

/// The device call a validated request makes.
#[derive(Debug)]
enum Op {
    Read { offset: u64, bufs: Vec<GuestBuf> },
    Write { offset: u64, bufs: Vec<GuestBuf> },
    Flush,
    Discard(Vec<ZeroRange>),
    WriteZeroes(Vec<ZeroRange>),
}

/// What the used ring receives for a finished request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Completion {
    /// Head descriptor index of the chain.
    pub head: u16,
    /// Bytes the device wrote into the chain's writable buffers (data-in and status).
    pub used_len: u32,
}

/// A validated request that needs the device.
#[derive(Debug)]
pub struct IoRequest {
    head: u16,
    /// Keeps the guest mapping alive for every pointer in `op`.
    mem: Arc<GuestMem>,
    status_addr: GuestAddress,
    /// Used length on success: data-in bytes plus the status byte.
    used_len_ok: u32,
    op: Op,
}

/// The outcome of parsing a chain: a request to run, or one already answered (refused, or
/// GET_ID which needs no device), whose status byte has been written.
#[derive(Debug)]
pub enum Parsed {
    /// Run it with [`IoRequest::run`].
    Io(IoRequest),
    /// Put this completion on the used ring.
    Done(Completion),
}

/// Validates the chain `segments` (headed by descriptor `head`) against `geo`. Never touches
/// memory outside `mem`; any defect is answered in the chain's status byte.
pub fn parse(
    mem: &Arc<GuestMem>,
    head: u16,
    segments: impl IntoIterator<Item = DescSegment>,
    geo: &BlkGeometry,
) -> Parsed {
    let mut readable: Vec<DescSegment> = Vec::new();
    let mut writable: Vec<DescSegment> = Vec::new();
    let mut misordered = false;
    for seg in segments {
        if seg.device_writes {
            writable.push(seg);
        } else {
            misordered |= !writable.is_empty();
            readable.push(seg);
        }
    }
    let readable_len: u64 = readable.iter().map(|s| u64::from(s.len)).sum();
    let writable_len: u64 = writable.iter().map(|s| u64::from(s.len)).sum();

    // The status is the last writable byte.
    let status_addr = writable
        .iter()
        .rev()
        .find(|s| s.len > 0)
        .and_then(|s| s.addr.0.checked_add(u64::from(s.len) - 1))
        .map(GuestAddress)
        .filter(|&a| mem.address_in_range(a));
    let Some(status_addr) = status_addr else {
        tracing::debug!(
            head,
            "virtio-blk request without a writable status byte in guest memory"
        );
        return Parsed::Done(Completion { head, used_len: 0 });
    };
    let reply = |status: Status, used_len: u32, why: &str| {
        if status != S_OK {
            tracing::debug!(head, status, "virtio-blk request refused: {why}");
        }
        write_status(mem, status_addr, status);
        Parsed::Done(Completion { head, used_len })
    };
    if misordered {
        return reply(S_IOERR, 1, "readable descriptor after a writable one");
    }
    if readable_len < HEADER_LEN {
        return reply(S_IOERR, 1, "header shorter than 16 bytes");
    }
    let mut header = [0u8; HEADER_LEN as usize];
    if read_stream(mem, &readable, 0, &mut header).is_none() {
        return reply(S_IOERR, 1, "header outside guest memory");
    }
    let req_type = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    let sector = u64::from_le_bytes(sector_bytes);
    let out_len = readable_len - HEADER_LEN;
    let in_len = writable_len - 1;

    let io = |op: Op, used_len_ok: u32| {
        Parsed::Io(IoRequest {
            head,
            mem: Arc::clone(mem),
            status_addr,
            used_len_ok,
            op,
        })
    };

    match req_type {
        VIRTIO_BLK_T_IN => {
            let Some(offset) = data_range(sector, in_len, geo) else {
                return reply(S_IOERR, 1, "read range invalid or outside the device");
            };
            let Some(bufs) = map_stream(mem, &writable, 0, in_len) else {
                return reply(S_IOERR, 1, "read buffer outside guest memory");
            };
            // in_len <= MAX_TRANSFER_BYTES, far below u32::MAX.
            io(Op::Read { offset, bufs }, in_len as u32 + 1)
        }
        VIRTIO_BLK_T_OUT => {
            if geo.read_only {
                return reply(S_IOERR, 1, "write to a read-only device");
            }
            let Some(offset) = data_range(sector, out_len, geo) else {
                return reply(S_IOERR, 1, "write range invalid or outside the device");
            };
            let Some(bufs) = map_stream(mem, &readable, HEADER_LEN, out_len) else {
                return reply(S_IOERR, 1, "write buffer outside guest memory");
            };
            io(Op::Write { offset, bufs }, 1)
        }
        VIRTIO_BLK_T_FLUSH => io(Op::Flush, 1),
        VIRTIO_BLK_T_GET_ID => {
            let n = (in_len as usize).min(geo.serial.len());
            if write_stream(mem, &writable, &geo.serial[..n]).is_none() {
                return reply(S_IOERR, 1, "GET_ID buffer outside guest memory");
            }
            reply(S_OK, n as u32 + 1, "")
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            let is_discard = req_type == VIRTIO_BLK_T_DISCARD;
            if geo.read_only {
                return reply(S_IOERR, 1, "discard or write-zeroes on a read-only device");
            }
            if out_len == 0
                || out_len % SEGMENT_LEN != 0
                || out_len / SEGMENT_LEN > u64::from(MAX_DISCARD_SEGMENTS)
            {
                return reply(S_IOERR, 1, "bad discard/write-zeroes segment list length");
            }
            // At most MAX_DISCARD_SEGMENTS × 16 bytes.
            let mut raw = vec![0u8; out_len as usize];
            if read_stream(mem, &readable, HEADER_LEN, &mut raw).is_none() {
                return reply(S_IOERR, 1, "segment list outside guest memory");
            }
            let mut ranges = Vec::with_capacity(raw.len() / SEGMENT_LEN as usize);
            for seg in raw.chunks_exact(SEGMENT_LEN as usize) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&seg[0..8]);
                let seg_sector = u64::from_le_bytes(s);
                let num_sectors = u32::from_le_bytes([seg[8], seg[9], seg[10], seg[11]]);
                let flags = u32::from_le_bytes([seg[12], seg[13], seg[14], seg[15]]);
                let allowed = if is_discard { 0 } else { SEGMENT_FLAG_UNMAP };
                if flags & !allowed != 0 {
                    return reply(S_UNSUPP, 1, "reserved or unsupported segment flags");
                }
                if num_sectors > geo.max_discard_sectors {
                    return reply(S_IOERR, 1, "segment longer than the advertised maximum");
                }
                let len = u64::from(num_sectors) * SECTOR_SIZE;
                let Some(offset) = sector_range(seg_sector, len, geo) else {
                    return reply(S_IOERR, 1, "segment outside the device");
                };
                ranges.push(ZeroRange {
                    offset,
                    len,
                    unmap: is_discard || flags & SEGMENT_FLAG_UNMAP != 0,
                });
            }
            if is_discard {
                io(Op::Discard(ranges), 1)
            } else {
                io(Op::WriteZeroes(ranges), 1)
            }
        }
        _ => reply(S_UNSUPP, 1, "unknown request type"),
    }
}

/// Byte offset of a data transfer of `len` bytes at `sector`, if it is whole sectors, within
/// the advertised transfer size and inside the device.
fn data_range(sector: u64, len: u64, geo: &BlkGeometry) -> Option<u64> {
    if len % SECTOR_SIZE != 0 || len > MAX_TRANSFER_BYTES {
        return None;
    }
    sector_range(sector, len, geo)
}

/// Byte offset of `[sector × 512, + len)` if that range lies inside the device.
fn sector_range(sector: u64, len: u64, geo: &BlkGeometry) -> Option<u64> {
    let offset = sector.checked_mul(SECTOR_SIZE)?;
    let end = offset.checked_add(len)?;
    (end <= geo.size).then_some(offset)
}

/// Calls `f(addr, len)` for the pieces of the byte range `[skip, skip + take)` of the stream
/// formed by `segs`. Returns None if the stream is shorter or an address overflows.
fn for_stream_range(
    segs: &[DescSegment],
    mut skip: u64,
    mut take: u64,
    mut f: impl FnMut(GuestAddress, usize) -> Option<()>,
) -> Option<()> {
    for seg in segs {
        if take == 0 {
            break;
        }
        let len = u64::from(seg.len);
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(take);
        let addr = seg.addr.0.checked_add(skip)?;
        f(GuestAddress(addr), n as usize)?;
        skip = 0;
        take -= n;
    }
    (take == 0).then_some(())
}

/// Host pointers for a byte range of a descriptor stream; None if any byte is outside guest
/// memory.
fn map_stream(mem: &GuestMem, segs: &[DescSegment], skip: u64, take: u64) -> Option<Vec<GuestBuf>> {
    let mut bufs = Vec::with_capacity(segs.len());
    for_stream_range(segs, skip, take, |addr, len| {
        for slice in GuestMemoryBackend::get_slices(mem, addr, len) {
            let slice = slice.ok()?;
            bufs.push(GuestBuf {
                ptr: slice.ptr_guard_mut().as_ptr(),
                len: slice.len(),
            });
        }
        Some(())
    })?;
    Some(bufs)
}

/// Copies the stream range starting at `skip` into `out`.
fn read_stream(mem: &GuestMem, segs: &[DescSegment], skip: u64, out: &mut [u8]) -> Option<()> {
    let mut pos = 0usize;
    for_stream_range(segs, skip, out.len() as u64, |addr, len| {
        mem.read_slice(&mut out[pos..pos + len], addr).ok()?;
        pos += len;
        Some(())
    })
}

/// Copies `data` to the start of the stream.
fn write_stream(mem: &GuestMem, segs: &[DescSegment], data: &[u8]) -> Option<()> {
    let mut pos = 0usize;
    for_stream_range(segs, 0, data.len() as u64, |addr, len| {
        mem.write_slice(&data[pos..pos + len], addr).ok()?;
        pos += len;
        Some(())
    })
}

fn write_status(mem: &GuestMem, addr: GuestAddress, status: Status) {
    // The address was checked against this same memory map when the request was parsed.
    if let Err(e) = mem.write_obj(status, addr) {
        tracing::warn!(
            "cannot write a virtio-blk status byte at {:#x}: {e}",
            addr.0
        );
    }
}

/// Lets through at most one log line per second, counting the lines it held back: a full pool
/// fails every write, and the log must not grow by one line per request.
struct LogLimiter {
    last_second: AtomicU64,
    suppressed: AtomicU64,
}

static DEVICE_ERROR_LOG: LogLimiter = LogLimiter {
    last_second: AtomicU64::new(0),
    suppressed: AtomicU64::new(0),
};

impl LogLimiter {
    /// Some(number held back since the last line) if this line may be logged.
    fn admit(&self) -> Option<u64> {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_second.load(Ordering::Relaxed);
        if now != last
            && self
                .last_second
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

impl IoRequest {
    /// Head descriptor index of the chain.
    pub fn head(&self) -> u16 {
        self.head
    }

    /// Runs the request on `device`, writes its status byte and returns the used-ring entry.
    /// A panic inside the device is caught and answered with IOERR.
    pub async fn run<D: BlockDevice>(self, device: &D) -> Completion {
        let result = AssertUnwindSafe(execute(device, &self.op))
            .catch_unwind()
            .await;
        let status = match result {
            Ok(Ok(())) => S_OK,
            Ok(Err(e)) => {
                if let Some(suppressed) = DEVICE_ERROR_LOG.admit() {
                    tracing::warn!(
                        "virtio-blk {}: {e} ({suppressed} similar errors not logged)",
                        self.op.describe()
                    );
                }
                S_IOERR
            }
            Err(_) => {
                tracing::error!("virtio-blk {}: the device panicked", self.op.describe());
                S_IOERR
            }
        };
        write_status(&self.mem, self.status_addr, status);
        Completion {
            head: self.head,
            used_len: if status == S_OK { self.used_len_ok } else { 1 },
        }
    }
}

impl Op {
    fn describe(&self) -> String {
        match self {
            Op::Read { offset, bufs } => format!("read at {offset} ({} segments)", bufs.len()),
            Op::Write { offset, bufs } => format!("write at {offset} ({} segments)", bufs.len()),
            Op::Flush => "flush".to_string(),
            Op::Discard(r) => format!("discard of {} ranges", r.len()),
            Op::WriteZeroes(r) => format!("write-zeroes of {} ranges", r.len()),
        }
    }
}

async fn execute<D: BlockDevice>(device: &D, op: &Op) -> DevResult<()> {
    match op {
        Op::Read { offset, bufs } => {
            let mut iov: Vec<IoSliceMut<'_>> = bufs
                .iter()
                // SAFETY: ptr/len describe a range of a live guest mapping (the IoRequest's Arc
                // keeps it mapped for as long as this future, which borrows the request, runs).
                // The guest may touch the same bytes concurrently, as with DMA; any byte value is
                // valid for u8, and the slices do not outlive the mapping.
                .map(|b| IoSliceMut::new(unsafe { std::slice::from_raw_parts_mut(b.ptr, b.len) }))
                .collect();
            device.read(*offset, &mut iov).await
        }
        Op::Write { offset, bufs } => {
            let iov: Vec<IoSlice<'_>> = bufs
                .iter()
                // SAFETY: as for reads above.
                .map(|b| IoSlice::new(unsafe { std::slice::from_raw_parts(b.ptr, b.len) }))
                .collect();
            device.write(*offset, &iov, false).await
        }
        Op::Flush => device.flush().await,
        Op::Discard(ranges) => {
            for r in ranges {
                device.discard(r.offset, r.len).await?;
            }
            Ok(())
        }
        Op::WriteZeroes(ranges) => {
            for r in ranges {
                match device.write_zeroes(r.offset, r.len, r.unmap, false).await {
                    // fast_only is false, so NotFast cannot happen; treat it as a failure anyway.
                    Err(DevError::NotFast) => return Err(DevError::NotFast),
                    other => other?,
                }
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::DeviceInfo;
    use crate::device::mem::MemDevice;

    const MEM_BASE: u64 = 0x1_0000;
    const MEM_LEN: usize = 0x10_0000;
    const HDR: u64 = MEM_BASE;
    const DATA: u64 = MEM_BASE + 0x1000;
    const STATUS: u64 = MEM_BASE + 0x200;

    fn setup(read_only: bool) -> (Arc<GuestMem>, MemDevice, BlkGeometry) {
        let mem = Arc::new(GuestMem::from_ranges(&[(GuestAddress(MEM_BASE), MEM_LEN)]).unwrap());
        let dev = MemDevice::new(1 << 20, 4096, read_only);
        let info = DeviceInfo {
            size: 1 << 20,
            read_only,
            block_size: 4096,
        };
        (mem, dev, BlkGeometry::new(&info, "serial-0123456789abcdef"))
    }

    fn header(mem: &GuestMem, req_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        mem.write_slice(&h, GuestAddress(HDR)).unwrap();
    }

    fn seg(addr: u64, len: u32, device_writes: bool) -> DescSegment {
        DescSegment {
            addr: GuestAddress(addr),
            len,
            device_writes,
        }
    }

    fn status(mem: &GuestMem) -> u8 {
        mem.read_obj(GuestAddress(STATUS)).unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(f)
    }

    fn run(parsed: Parsed, dev: &MemDevice) -> Completion {
        match parsed {
            Parsed::Io(req) => block_on(req.run(dev)),
            Parsed::Done(c) => c,
        }
    }

    #[test]
    fn write_then_read_through_split_descriptors() {
        let (mem, dev, geo) = setup(false);
        header(&mem, VIRTIO_BLK_T_OUT, 3);
        mem.write_slice(&[0xabu8; 1024], GuestAddress(DATA))
            .unwrap();
        // Header split over two descriptors, data over two: no framing assumption.
        let chain = [
            seg(HDR, 10, false),
            seg(HDR + 10, 6, false),
            seg(DATA, 512, false),
            seg(DATA + 512, 512, false),
            seg(STATUS, 1, true),
        ];
        let c = run(parse(&mem, 7, chain, &geo), &dev);
        assert_eq!(
            c,
            Completion {
                head: 7,
                used_len: 1
            }
        );
        assert_eq!(status(&mem), S_OK);

        header(&mem, VIRTIO_BLK_T_IN, 3);
        mem.write_slice(&[0u8; 1024], GuestAddress(DATA)).unwrap();
        // Data-in and status share the last descriptor.
        let chain = [
            seg(HDR, 16, false),
            seg(DATA, 1000, true),
            seg(DATA + 1000, 25, true),
        ];
        let status_at = DATA + 1024;
        let c = run(parse(&mem, 1, chain, &geo), &dev);
        assert_eq!(c.used_len, 1025);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(status_at)).unwrap(), S_OK);
        let mut back = [0u8; 1024];
        mem.read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back.iter().all(|&b| b == 0xab));
    }

    #[test]
    fn malformed_requests_get_ioerr_or_unsupp() {
        let (mem, dev, geo) = setup(false);
        let cases: Vec<(&str, u32, u64, Vec<DescSegment>, u8)> = vec![
            (
                "short header",
                VIRTIO_BLK_T_IN,
                0,
                vec![seg(HDR, 8, false), seg(STATUS, 1, true)],
                S_IOERR,
            ),
            (
                "unknown type",
                0x77,
                0,
                vec![seg(HDR, 16, false), seg(STATUS, 1, true)],
                S_UNSUPP,
            ),
            (
                "read past the end",
                VIRTIO_BLK_T_IN,
                (1 << 20) / 512 - 1,
                vec![
                    seg(HDR, 16, false),
                    seg(DATA, 1024, true),
                    seg(STATUS, 1, true),
                ],
                S_IOERR,
            ),
            (
                "sector overflow",
                VIRTIO_BLK_T_OUT,
                u64::MAX / 4,
                vec![
                    seg(HDR, 16, false),
                    seg(DATA, 512, false),
                    seg(STATUS, 1, true),
                ],
                S_IOERR,
            ),
            (
                "partial sector",
                VIRTIO_BLK_T_OUT,
                0,
                vec![
                    seg(HDR, 16, false),
                    seg(DATA, 100, false),
                    seg(STATUS, 1, true),
                ],
                S_IOERR,
            ),
            (
                "data outside guest memory",
                VIRTIO_BLK_T_IN,
                0,
                vec![
                    seg(HDR, 16, false),
                    seg(0xdead_0000_0000, 512, true),
                    seg(STATUS, 1, true),
                ],
                S_IOERR,
            ),
            (
                "data straddling the end of guest memory",
                VIRTIO_BLK_T_OUT,
                0,
                vec![
                    seg(HDR, 16, false),
                    seg(MEM_BASE + MEM_LEN as u64 - 256, 512, false),
                    seg(STATUS, 1, true),
                ],
                S_IOERR,
            ),
            (
                "header outside guest memory",
                VIRTIO_BLK_T_IN,
                0,
                vec![seg(0x10, 16, false), seg(STATUS, 1, true)],
                S_IOERR,
            ),
            (
                "readable after writable",
                VIRTIO_BLK_T_IN,
                0,
                vec![
                    seg(DATA, 512, true),
                    seg(HDR, 16, false),
                    seg(STATUS, 1, true),
                ],
                S_IOERR,
            ),
        ];
        for (what, t, sector, chain, want) in cases {
            header(&mem, t, sector);
            mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
            let c = run(parse(&mem, 0, chain, &geo), &dev);
            assert_eq!(status(&mem), want, "{what}");
            assert_eq!(c.used_len, 1, "{what}");
        }
        assert_eq!(
            dev.allocated_blocks(),
            0,
            "no refused request reached the device"
        );
    }

    #[test]
    fn no_status_byte_means_no_answer() {
        let (mem, dev, geo) = setup(false);
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let c = run(parse(&mem, 3, [seg(HDR, 16, false)], &geo), &dev);
        assert_eq!(
            c,
            Completion {
                head: 3,
                used_len: 0
            }
        );
        let c = run(
            parse(
                &mem,
                4,
                [seg(HDR, 16, false), seg(0xdead_0000, 1, true)],
                &geo,
            ),
            &dev,
        );
        assert_eq!(
            c,
            Completion {
                head: 4,
                used_len: 0
            }
        );
    }

    #[test]
    fn read_only_refuses_every_write_kind() {
        let (mem, dev, geo) = setup(true);
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&mem, t, 0);
            mem.write_slice(&[0u8; 16], GuestAddress(DATA)).unwrap();
            let chain = [
                seg(HDR, 16, false),
                seg(DATA, 512, false),
                seg(STATUS, 1, true),
            ];
            run(parse(&mem, 0, chain, &geo), &dev);
            assert_eq!(status(&mem), S_IOERR, "type {t}");
        }
        header(&mem, VIRTIO_BLK_T_IN, 0);
        let chain = [
            seg(HDR, 16, false),
            seg(DATA, 512, true),
            seg(STATUS, 1, true),
        ];
        run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(status(&mem), S_OK, "reads still work");
    }

    fn segment(sector: u64, num: u32, flags: u32) -> [u8; 16] {
        let mut s = [0u8; 16];
        s[0..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..16].copy_from_slice(&flags.to_le_bytes());
        s
    }

    #[test]
    fn discard_and_write_zeroes_segments() {
        let (mem, dev, geo) = setup(false);
        block_on(dev.write(0, &[IoSlice::new(&[1u8; 65536])], false)).unwrap();
        assert_eq!(dev.allocated_blocks(), 16);
        // Two discard segments: blocks 0-3 and 8-11.
        let mut list = Vec::new();
        list.extend_from_slice(&segment(0, 32, 0));
        list.extend_from_slice(&segment(64, 32, 0));
        mem.write_slice(&list, GuestAddress(DATA)).unwrap();
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let chain = [
            seg(HDR, 16, false),
            seg(DATA, 32, false),
            seg(STATUS, 1, true),
        ];
        run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(dev.allocated_blocks(), 8);

        // Write-zeroes with unmap frees, without unmap keeps the blocks.
        mem.write_slice(&segment(32, 8, SEGMENT_FLAG_UNMAP), GuestAddress(DATA))
            .unwrap();
        header(&mem, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        let chain = [
            seg(HDR, 16, false),
            seg(DATA, 16, false),
            seg(STATUS, 1, true),
        ];
        run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(dev.allocated_blocks(), 7);
        mem.write_slice(&segment(40, 8, 0), GuestAddress(DATA))
            .unwrap();
        run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(status(&mem), S_OK);
        assert_eq!(dev.allocated_blocks(), 7);

        // Flags: unmap on discard and unknown bits are unsupported.
        for (t, flags) in [(VIRTIO_BLK_T_DISCARD, 1), (VIRTIO_BLK_T_WRITE_ZEROES, 2)] {
            mem.write_slice(&segment(0, 8, flags), GuestAddress(DATA))
                .unwrap();
            header(&mem, t, 0);
            run(parse(&mem, 0, chain, &geo), &dev);
            assert_eq!(status(&mem), S_UNSUPP);
        }
        // Bad lists: not a multiple of 16, too long a segment, past the end.
        header(&mem, VIRTIO_BLK_T_DISCARD, 0);
        let short = [
            seg(HDR, 16, false),
            seg(DATA, 15, false),
            seg(STATUS, 1, true),
        ];
        run(parse(&mem, 0, short, &geo), &dev);
        assert_eq!(status(&mem), S_IOERR);
        mem.write_slice(
            &segment(0, geo.max_discard_sectors + 1, 0),
            GuestAddress(DATA),
        )
        .unwrap();
        run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(status(&mem), S_IOERR);
        mem.write_slice(&segment(2040, 16, 0), GuestAddress(DATA))
            .unwrap();
        run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(status(&mem), S_IOERR);
        assert_eq!(dev.allocated_blocks(), 7);
    }

    #[test]
    fn get_id_returns_the_truncated_name() {
        let (mem, dev, geo) = setup(false);
        header(&mem, VIRTIO_BLK_T_GET_ID, 0);
        let chain = [
            seg(HDR, 16, false),
            seg(DATA, 20, true),
            seg(STATUS, 1, true),
        ];
        let c = run(parse(&mem, 0, chain, &geo), &dev);
        assert_eq!(c.used_len, 21);
        let mut id = [0u8; 20];
        mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"serial-0123456789abc");
    }

    #[test]
    fn device_error_logging_is_rate_limited() {
        let limiter = LogLimiter {
            last_second: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        };
        assert_eq!(limiter.admit(), Some(0), "the first error is logged");
        let admitted = (0..1000).filter(|_| limiter.admit().is_some()).count();
        // At most one more line if the second changed during the loop.
        assert!(admitted <= 1, "{admitted} lines in one burst");
    }

    #[test]
    fn flush_succeeds() {
        let (mem, dev, geo) = setup(false);
        header(&mem, VIRTIO_BLK_T_FLUSH, 0);
        let c = run(
            parse(&mem, 9, [seg(HDR, 16, false), seg(STATUS, 1, true)], &geo),
            &dev,
        );
        assert_eq!(
            c,
            Completion {
                head: 9,
                used_len: 1
            }
        );
        assert_eq!(status(&mem), S_OK);
    }
}
