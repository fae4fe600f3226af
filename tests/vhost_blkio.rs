//! The vhost-user-blk backend driven through its real Unix socket by libblkio's pure-Rust
//! `virtio-blk-vhost-user` driver (the same client the benchmark uses), serving a `MemDevice`.
//! Requests that libblkio would never send (bad headers, unknown types, buffers outside the
//! shared memory) are crafted with `virtio-driver`, the crate under libblkio, whose virtqueue
//! API lets the test place arbitrary descriptors.

mod serve_support;

use std::mem::MaybeUninit;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use uthin::device::mem::MemDevice;
use uthin::vhost::{Dispatch, VhostUserBlkConfig, VhostUserBlkServer};

const MIB: u64 = 1 << 20;
const BLOCK: u32 = 65536;

fn socket_in(dir: &tempfile::TempDir) -> PathBuf {
    dir.path().join("vol.sock")
}

/// Logs go to the test output with RUST_LOG (e.g. `RUST_LOG=uthin=debug`).
fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

fn serve(dev: &Arc<MemDevice>, path: &Path, queues: u16) -> VhostUserBlkServer {
    init_logging();
    let cfg = VhostUserBlkConfig::new("test-volume-with-a-long-name").with_queues(queues);
    VhostUserBlkServer::start(Arc::clone(dev), path, cfg).expect("server starts")
}

/// A libblkio connection with one shared buffer region.
struct Client {
    blkio: Blkio,
    queues: Vec<Blkioq>,
    buf: MemoryRegion,
}

impl Client {
    fn connect(path: &Path, num_queues: i32, read_only: bool) -> blkio::Result<Client> {
        let mut blkio = Blkio::new("virtio-blk-vhost-user")?;
        blkio.set_str("path", path.to_str().unwrap())?;
        blkio.set_bool("read-only", read_only)?;
        blkio.connect()?;
        blkio.set_i32("num-queues", num_queues)?;
        let out = blkio.start()?;
        let buf = blkio.alloc_mem_region(16 * MIB as usize)?;
        blkio.map_mem_region(&buf)?;
        Ok(Client {
            blkio,
            queues: out.queues,
            buf,
        })
    }

    fn capacity(&self) -> u64 {
        self.blkio.get_u64("capacity").unwrap()
    }

    /// The shared buffer as a byte slice.
    fn mem(&mut self) -> &mut [u8] {
        // SAFETY: the region is a live mmap of `len` bytes owned by `self.blkio`, and the test
        // never has a request in flight while it holds this slice.
        unsafe { std::slice::from_raw_parts_mut(self.buf.addr as *mut u8, self.buf.len) }
    }

    fn ptr(&self, at: usize) -> *mut u8 {
        (self.buf.addr + at) as *mut u8
    }
}

/// Waits for `n` completions on `q` and returns their (user_data, ret) pairs.
fn wait(q: &mut Blkioq, n: usize) -> Vec<(usize, i32)> {
    let mut out = Vec::new();
    let mut comps: Vec<MaybeUninit<Completion>> = (0..n).map(|_| MaybeUninit::uninit()).collect();
    while out.len() < n {
        let want = n - out.len();
        let mut timeout = Duration::from_secs(10);
        let got = q
            .do_io(&mut comps[..want], want, Some(&mut timeout), None)
            .expect("do_io");
        assert!(got > 0, "timed out waiting for completions");
        for c in &comps[..got] {
            // SAFETY: do_io initialised the first `got` entries.
            let c = unsafe { c.assume_init_ref() };
            out.push((c.user_data, c.ret));
        }
    }
    out
}

fn all_ok(results: &[(usize, i32)]) {
    for (id, ret) in results {
        assert_eq!(*ret, 0, "request {id} failed");
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn read_write_patterns_many_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(64 * MIB, BLOCK, false));
    let server = serve(&dev, &path, 1);
    read_write_patterns(&path);
    server.stop().unwrap();
    assert!(!path.exists(), "stop removes the socket");
}

/// Writes and reads patterns (many requests in flight, scatter-gather, zeros, flush, out of
/// range) on a 64 MiB device served at `path`.
fn read_write_patterns(path: &Path) {
    let mut c = Client::connect(path, 1, false).unwrap();
    assert_eq!(c.capacity(), 64 * MIB);

    // (offset, len): aligned 4k, sector-aligned odd sizes, block-spanning, 1 MiB, the last sector.
    let writes: Vec<(u64, usize)> = vec![
        (0, 4096),
        (5120, 512),
        (65536 - 1024, 4096),
        (3 * MIB + 512 * 7, 512 * 33),
        (8 * MIB, MIB as usize),
        (64 * MIB - 512, 512),
        (20 * MIB, 128 * 1024),
    ];
    // All writes in flight at once, each from its own part of the shared buffer.
    let mut at = 0usize;
    let mut slots = Vec::new();
    for (i, &(off, len)) in writes.iter().enumerate() {
        let data = pattern(i as u64, len);
        c.mem()[at..at + len].copy_from_slice(&data);
        slots.push(at);
        let p = c.ptr(at);
        c.queues[0].write(off, p, len, i, ReqFlags::empty());
        at += len;
    }
    all_ok(&wait(&mut c.queues[0], writes.len()));
    c.mem().fill(0xee);
    let mut at = 0usize;
    for (i, &(off, len)) in writes.iter().enumerate() {
        let p = c.ptr(at);
        c.queues[0].read(off, p, len, i, ReqFlags::empty());
        at += len;
    }
    all_ok(&wait(&mut c.queues[0], writes.len()));
    for (i, &(_, len)) in writes.iter().enumerate() {
        let got = &c.mem()[slots[i]..slots[i] + len];
        assert!(
            got == pattern(i as u64, len).as_slice(),
            "write {i} reads back"
        );
    }

    // Scatter-gather: one request from three separate buffers.
    let parts = [
        (0usize, 4096usize),
        (100_000, 512),
        (200_000, 8192 - 4096 - 512),
    ];
    let mut iov = Vec::new();
    let whole = pattern(99, 8192);
    let mut pos = 0;
    for &(at, len) in &parts {
        c.mem()[at..at + len].copy_from_slice(&whole[pos..pos + len]);
        iov.push(libc::iovec {
            iov_base: c.ptr(at).cast(),
            iov_len: len,
        });
        pos += len;
    }
    c.queues[0].writev(
        30 * MIB,
        iov.as_ptr(),
        iov.len() as u32,
        1,
        ReqFlags::empty(),
    );
    all_ok(&wait(&mut c.queues[0], 1));
    let p = c.ptr(1_000_000);
    c.queues[0].read(30 * MIB, p, 8192, 2, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    assert!(&c.mem()[1_000_000..1_000_000 + 8192] == whole.as_slice());

    // Unwritten space reads as zeros; flush succeeds.
    let p = c.ptr(0);
    c.queues[0].read(40 * MIB, p, 65536, 3, ReqFlags::empty());
    c.queues[0].flush(4, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 2));
    assert!(c.mem()[..65536].iter().all(|&b| b == 0));

    // Out of range: the backend answers IOERR, libblkio reports an error.
    let p = c.ptr(0);
    c.queues[0].read(64 * MIB - 512, p, 1024, 5, ReqFlags::empty());
    c.queues[0].write(64 * MIB, p, 512, 6, ReqFlags::empty());
    for (id, ret) in wait(&mut c.queues[0], 2) {
        assert!(ret < 0, "out-of-range request {id} must fail");
    }
}

#[test]
fn discard_and_write_zeroes_give_space_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(16 * MIB, BLOCK, false));
    let server = serve(&dev, &path, 1);
    let mut c = Client::connect(&path, 1, false).unwrap();

    c.mem()[..4 * MIB as usize].fill(0x5a);
    let p = c.ptr(0);
    c.queues[0].write(0, p, 4 * MIB as usize, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    assert_eq!(dev.allocated_blocks(), 64);

    // Discard 1 MiB: 16 blocks go.
    c.queues[0].discard(MIB, MIB, 1, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    assert_eq!(dev.allocated_blocks(), 48);
    // Write-zeroes allowing unmap frees, with NO_UNMAP keeps the blocks allocated.
    c.queues[0].write_zeroes(2 * MIB, MIB, 2, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    assert_eq!(dev.allocated_blocks(), 32);
    c.queues[0].write_zeroes(3 * MIB, MIB, 3, ReqFlags::NO_UNMAP);
    all_ok(&wait(&mut c.queues[0], 1));
    assert_eq!(dev.allocated_blocks(), 32);

    c.mem()[..4 * MIB as usize].fill(0xff);
    let p = c.ptr(0);
    c.queues[0].read(0, p, 4 * MIB as usize, 4, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    let m = c.mem();
    assert!(m[..MIB as usize].iter().all(|&b| b == 0x5a));
    assert!(m[MIB as usize..4 * MIB as usize].iter().all(|&b| b == 0));
    drop(c);
    server.stop().unwrap();
}

#[test]
fn read_only_device_is_advertised_and_reads_work() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(4 * MIB, BLOCK, true));
    let server = serve(&dev, &path, 1);
    // A writable open fails: the device offers VIRTIO_BLK_F_RO.
    let err = Client::connect(&path, 1, false)
        .err()
        .expect("writable open must fail");
    assert!(err.message().contains("read-only"), "{}", err.message());
    let mut c = Client::connect(&path, 1, true).unwrap();
    let p = c.ptr(0);
    c.queues[0].read(0, p, 4096, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    drop(c);
    server.stop().unwrap();
}

#[test]
fn multiple_queues_run_in_parallel() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(64 * MIB, BLOCK, false));
    let server = serve(&dev, &path, 4);
    let mut c = Client::connect(&path, 4, false).unwrap();
    assert_eq!(c.queues.len(), 4);
    let base = c.buf.addr;
    // Each queue writes its own 4 MiB stripe from its own thread, 32 requests in flight.
    std::thread::scope(|s| {
        for (qi, q) in c.queues.iter_mut().enumerate() {
            s.spawn(move || {
                let mem_at = qi * 4 * MIB as usize;
                // SAFETY: each thread owns a disjoint 4 MiB part of the 16 MiB region.
                let mem = unsafe {
                    std::slice::from_raw_parts_mut((base + mem_at) as *mut u8, 4 * MIB as usize)
                };
                let data = pattern(qi as u64 + 1000, mem.len());
                mem.copy_from_slice(&data);
                for i in 0..32usize {
                    let off = (qi as u64 * 4 + 16) * MIB + i as u64 * 131072;
                    let p = (base + mem_at + i * 131072) as *mut u8;
                    q.write(off, p, 131072, i, ReqFlags::empty());
                }
                all_ok(&wait(q, 32));
            });
        }
    });
    // Read every stripe back through a different queue than wrote it.
    c.mem().fill(0);
    for qi in 0..4usize {
        let off = (qi as u64 * 4 + 16) * MIB;
        let p = c.ptr(qi * 4 * MIB as usize);
        c.queues[(qi + 1) % 4].read(off, p, 4 * MIB as usize, qi, ReqFlags::empty());
        all_ok(&wait(&mut c.queues[(qi + 1) % 4], 1));
    }
    for qi in 0..4usize {
        let at = qi * 4 * MIB as usize;
        let want = pattern(qi as u64 + 1000, 4 * MIB as usize);
        assert!(
            &c.mem()[at..at + 4 * MIB as usize] == want.as_slice(),
            "stripe {qi}"
        );
    }
    drop(c);
    server.stop().unwrap();
}

#[test]
fn reconnect_after_the_client_goes_away() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(8 * MIB, BLOCK, false));
    let server = serve(&dev, &path, 2);
    for round in 0..3u64 {
        let mut c = Client::connect(&path, 2, false).unwrap();
        if round > 0 {
            // What the previous connection wrote is there.
            let p = c.ptr(0);
            c.queues[1].read((round - 1) * MIB, p, 65536, 0, ReqFlags::empty());
            all_ok(&wait(&mut c.queues[1], 1));
            assert!(c.mem()[..65536] == pattern(round - 1, 65536)[..]);
        }
        let data = pattern(round, 65536);
        c.mem()[..65536].copy_from_slice(&data);
        let p = c.ptr(0);
        // Leave requests in flight when the client disappears.
        for i in 0..8u64 {
            c.queues[0].write(
                round * MIB + i * 65536,
                p,
                65536,
                i as usize,
                ReqFlags::empty(),
            );
        }
        all_ok(&wait(&mut c.queues[0], 1));
        drop(c);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.connections_served() < 3 {
        assert!(
            Instant::now() < deadline,
            "server did not see the clients leave"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    server.stop().unwrap();
}

#[test]
fn stop_disconnects_a_live_client_and_frees_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(MIB, BLOCK, false));
    let server = serve(&dev, &path, 1);
    let _c = Client::connect(&path, 1, false).unwrap();
    server.stop().unwrap();
    assert!(!path.exists());
    assert!(Client::connect(&path, 1, false).is_err());
    // The same path can be served again (a restart, or a re-added volume).
    let server = serve(&dev, &path, 1);
    let mut c = Client::connect(&path, 1, false).unwrap();
    let p = c.ptr(0);
    c.queues[0].read(0, p, 512, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    drop(c);
    server.stop().unwrap();
}

#[test]
fn requests_can_run_as_runtime_tasks() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(8 * MIB, BLOCK, false));
    let cfg = VhostUserBlkConfig::new("rt").with_dispatch(Dispatch::Runtime(rt.handle().clone()));
    let server = VhostUserBlkServer::start(Arc::clone(&dev), &path, cfg).unwrap();
    let mut c = Client::connect(&path, 1, false).unwrap();
    let data = pattern(7, 65536);
    c.mem()[..65536].copy_from_slice(&data);
    let p = c.ptr(0);
    for i in 0..16u64 {
        c.queues[0].write(i * 65536, p, 65536, i as usize, ReqFlags::empty());
    }
    all_ok(&wait(&mut c.queues[0], 16));
    let p = c.ptr(MIB as usize);
    c.queues[0].read(15 * 65536, p, 65536, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    assert!(c.mem()[MIB as usize..MIB as usize + 65536] == data[..]);
    drop(c);
    server.stop().unwrap();
}

/// Hand-made requests through virtio-driver's raw virtqueue.
mod raw {
    use super::*;
    use virtio_driver::virtqueue::{Virtqueue, VirtqueueLayout};
    use virtio_driver::{
        QueueNotifier, VhostUser, VirtioBlkConfig, VirtioFeatureFlags, VirtioTransport, iovec,
    };

    const QUEUE_SIZE: u16 = 16;

    /// Per-request memory inside the shared ring area: the device can reach all of it.
    #[derive(Clone, Copy)]
    #[repr(C)]
    pub struct RawReq {
        header: [u8; 32],
        data: [u8; 1024],
        status: u8,
    }

    pub struct RawQueue {
        vq: Virtqueue<'static, RawReq>,
        notifier: Box<dyn QueueNotifier>,
        // Owns the shared memory `vq` points into; dropped last.
        _transport: Box<VhostUser<VirtioBlkConfig, RawReq>>,
    }

    /// One descriptor to add: where it points and whether the device writes it.
    pub enum Desc {
        Header(usize),
        Data(usize),
        DataIn(usize),
        Status,
        Raw(u64, usize, bool),
    }

    impl RawQueue {
        pub fn connect(path: &Path) -> RawQueue {
            let features = VirtioFeatureFlags::VERSION_1.bits();
            let mut t = Box::new(
                VhostUser::<VirtioBlkConfig, RawReq>::new(path.to_str().unwrap(), features)
                    .expect("vhost-user handshake"),
            );
            let vq_features = VirtioFeatureFlags::from_bits_truncate(t.get_features());
            let layout = VirtqueueLayout::new::<RawReq>(1, QUEUE_SIZE as usize, vq_features)
                .expect("layout");
            let mem = t.alloc_queue_mem(&layout).expect("queue memory");
            // SAFETY: the memory is a mapping owned by the transport, which RawQueue keeps (boxed,
            // so it does not move) until after the virtqueue is dropped.
            let mem: &'static mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(mem.as_mut_ptr(), mem.len()) };
            let vq = Virtqueue::new(t.iova_translator(), mem, QUEUE_SIZE, vq_features)
                .expect("virtqueue");
            t.setup_queues(std::slice::from_ref(&vq))
                .expect("setup queues");
            let notifier = t.get_submission_notifier(0);
            RawQueue {
                vq,
                notifier,
                _transport: t,
            }
        }

        /// Sends one request with `header` bytes and the given descriptors; returns the
        /// completed request memory (status, data).
        pub fn request(&mut self, header: &[u8], data: &[u8], descs: &[Desc]) -> RawReq {
            let id = self
                .vq
                .add_request(|req, add| {
                    req.header = [0; 32];
                    req.header[..header.len()].copy_from_slice(header);
                    req.data = [0; 1024];
                    req.data[..data.len()].copy_from_slice(data);
                    req.status = 0xff;
                    for d in descs {
                        let (base, len, writes) = match *d {
                            Desc::Header(len) => (req.header.as_mut_ptr() as u64, len, false),
                            Desc::Data(len) => (req.data.as_mut_ptr() as u64, len, false),
                            Desc::DataIn(len) => (req.data.as_mut_ptr() as u64, len, true),
                            Desc::Status => (&mut req.status as *mut u8 as u64, 1, true),
                            Desc::Raw(addr, len, writes) => (addr, len, writes),
                        };
                        add(
                            iovec {
                                iov_base: base as *mut libc::c_void,
                                iov_len: len,
                            },
                            writes,
                        )?;
                    }
                    Ok(())
                })
                .expect("add request");
            self.notifier.notify().expect("kick");
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Some(done) = self.vq.completions().next() {
                    assert_eq!(done.id, id);
                    return done.req;
                }
                assert!(Instant::now() < deadline, "no completion for a raw request");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }

    pub fn header(req_type: u32, sector: u64) -> [u8; 16] {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&req_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        h
    }

    impl RawReq {
        pub fn status(&self) -> u8 {
            self.status
        }
        pub fn data(&self) -> &[u8] {
            &self.data
        }
    }
}

#[test]
fn malformed_requests_are_refused_and_the_server_stays_up() {
    use raw::{Desc, RawQueue, header};
    const IOERR: u8 = 1;
    const UNSUPP: u8 = 2;
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(MIB, BLOCK, false));
    let server = serve(&dev, &path, 1);
    let mut q = RawQueue::connect(&path);

    let cases: Vec<(&str, [u8; 16], Vec<Desc>, u8)> = vec![
        (
            "8-byte header",
            header(0, 0),
            vec![Desc::Header(8), Desc::Status],
            IOERR,
        ),
        (
            "unknown type",
            header(0x4242, 0),
            vec![Desc::Header(16), Desc::Status],
            UNSUPP,
        ),
        (
            "SCSI passthrough",
            header(2, 0),
            vec![Desc::Header(16), Desc::Status],
            UNSUPP,
        ),
        (
            "read past the end",
            header(0, MIB / 512),
            vec![Desc::Header(16), Desc::DataIn(512), Desc::Status],
            IOERR,
        ),
        (
            "write past the end",
            header(1, MIB / 512 - 1),
            vec![Desc::Header(16), Desc::Data(1024), Desc::Status],
            IOERR,
        ),
        (
            "sector overflow",
            header(1, u64::MAX),
            vec![Desc::Header(16), Desc::Data(512), Desc::Status],
            IOERR,
        ),
        (
            "write of a partial sector",
            header(1, 0),
            vec![Desc::Header(16), Desc::Data(100), Desc::Status],
            IOERR,
        ),
        (
            "read into memory the client never shared",
            header(0, 0),
            vec![
                Desc::Header(16),
                Desc::Raw(0x10_0000, 512, true),
                Desc::Status,
            ],
            IOERR,
        ),
        (
            "write from memory the client never shared",
            header(1, 0),
            vec![
                Desc::Header(16),
                Desc::Raw(0xffff_ffff_f000, 4096, false),
                Desc::Status,
            ],
            IOERR,
        ),
        (
            "discard list not a multiple of 16 bytes",
            header(11, 0),
            vec![Desc::Header(16), Desc::Data(15), Desc::Status],
            IOERR,
        ),
    ];
    for (what, hdr, descs, want) in cases {
        let done = q.request(&hdr, &[0u8; 1024], &descs);
        assert_eq!(done.status(), want, "{what}");
    }
    assert_eq!(
        dev.allocated_blocks(),
        0,
        "nothing refused reached the device"
    );

    // A chain without a status byte is returned unanswered, and the queue keeps working.
    let done = q.request(&header(0, 0), &[], &[Desc::Header(16)]);
    assert_eq!(done.status(), 0xff);

    // GET_ID with no room for the id still succeeds (nothing to write).
    let done = q.request(&header(8, 0), &[], &[Desc::Header(16), Desc::Status]);
    assert_eq!(done.status(), 0);

    // A valid write and read after all that.
    let data = [0x3cu8; 1024];
    let done = q.request(
        &header(1, 8),
        &data,
        &[Desc::Header(16), Desc::Data(1024), Desc::Status],
    );
    assert_eq!(done.status(), 0);
    drop(q);

    // Read-only devices refuse writes that reach the wire.
    let ro_path = dir.path().join("ro.sock");
    let ro = Arc::new(MemDevice::new(MIB, BLOCK, true));
    let ro_server = serve(&ro, &ro_path, 1);
    let mut q = RawQueue::connect(&ro_path);
    for t in [1u32, 11, 13] {
        let mut seg = [0u8; 16];
        seg[8..12].copy_from_slice(&8u32.to_le_bytes());
        let done = q.request(
            &header(t, 0),
            &seg,
            &[Desc::Header(16), Desc::Data(16), Desc::Status],
        );
        assert_eq!(done.status(), IOERR, "type {t} on a read-only device");
    }
    assert_eq!(ro.allocated_blocks(), 0);
    drop(q);
    ro_server.stop().unwrap();

    let mut c = Client::connect(&path, 1, false).unwrap();
    let p = c.ptr(0);
    c.queues[0].read(8 * 512, p, 1024, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    assert!(c.mem()[..1024].iter().all(|&b| b == 0x3c));
    drop(c);
    server.stop().unwrap();
}

#[test]
fn get_id_is_the_truncated_name() {
    use raw::{Desc, RawQueue, header};
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(MIB, BLOCK, false));
    let server = serve(&dev, &path, 1);
    let mut q = RawQueue::connect(&path);
    let done = q.request(
        &header(8, 0),
        &[],
        &[Desc::Header(16), Desc::DataIn(20), Desc::Status],
    );
    assert_eq!(done.status(), 0);
    assert_eq!(&done.data()[..20], b"test-volume-with-a-l");
    drop(q);
    server.stop().unwrap();
}

/// A MemDevice whose writes take a while, to have requests in flight when the server stops.
struct SlowDevice(MemDevice, std::sync::atomic::AtomicUsize);

impl uthin::device::BlockDevice for SlowDevice {
    fn info(&self) -> uthin::device::DeviceInfo {
        self.0.info()
    }
    async fn read(
        &self,
        offset: u64,
        bufs: &mut [std::io::IoSliceMut<'_>],
    ) -> uthin::device::DevResult<()> {
        self.0.read(offset, bufs).await
    }
    async fn write(
        &self,
        offset: u64,
        bufs: &[std::io::IoSlice<'_>],
        fua: bool,
    ) -> uthin::device::DevResult<()> {
        self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        self.0.write(offset, bufs, fua).await
    }
    async fn flush(&self) -> uthin::device::DevResult<()> {
        self.0.flush().await
    }
    async fn discard(&self, offset: u64, len: u64) -> uthin::device::DevResult<()> {
        self.0.discard(offset, len).await
    }
    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> uthin::device::DevResult<()> {
        self.0.write_zeroes(offset, len, may_unmap, fast_only).await
    }
    async fn block_status(
        &self,
        offset: u64,
        len: u64,
    ) -> uthin::device::DevResult<Vec<uthin::device::Extent>> {
        self.0.block_status(offset, len).await
    }
}

#[test]
fn stop_completes_requests_in_flight_before_disconnecting() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_time()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(SlowDevice(
        MemDevice::new(8 * MIB, BLOCK, false),
        std::sync::atomic::AtomicUsize::new(0),
    ));
    // Device futures sleep on tokio's timer while polled on the queue thread.
    let cfg = VhostUserBlkConfig::new("slow")
        .with_dispatch(Dispatch::QueueThread(Some(rt.handle().clone())));
    let server = VhostUserBlkServer::start(Arc::clone(&dev), &path, cfg).unwrap();
    let mut c = Client::connect(&path, 1, false).unwrap();
    c.mem()[..65536].fill(0x11);
    let p = c.ptr(0);
    for i in 0..16u64 {
        c.queues[0].write(i * 65536, p, 65536, i as usize, ReqFlags::empty());
    }
    // Submit (do_io with min 0 kicks the device), then stop while the writes sleep.
    let mut none: Vec<MaybeUninit<Completion>> = Vec::new();
    c.queues[0].do_io(&mut none, 0, None, None).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while dev.1.load(std::sync::atomic::Ordering::SeqCst) < 16 {
        assert!(
            Instant::now() < deadline,
            "the writes never reached the device ({} of 16)",
            dev.1.load(std::sync::atomic::Ordering::SeqCst)
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    assert_eq!(dev.0.allocated_blocks(), 0, "the writes are still sleeping");
    server.stop().unwrap();
    // Every write taken before the stop completed, on the device and on the used ring.
    assert_eq!(dev.0.allocated_blocks(), 16);
    all_ok(&wait(&mut c.queues[0], 16));
}

#[test]
fn garbage_on_the_socket_ends_only_that_connection() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let path = socket_in(&dir);
    let dev = Arc::new(MemDevice::new(MIB, BLOCK, false));
    let server = serve(&dev, &path, 1);
    // A vhost-user header announcing a huge payload, then noise; and a message type that does
    // not exist; and a connection that closes mid-header.
    let mut huge = vec![0u8; 12];
    huge[0..4].copy_from_slice(&1u32.to_le_bytes()); // GET_FEATURES
    huge[4..8].copy_from_slice(&1u32.to_le_bytes()); // version 1
    huge[8..12].copy_from_slice(&u32::MAX.to_le_bytes()); // payload size
    huge.extend_from_slice(&[0xa5; 64]);
    let mut unknown = vec![0u8; 12];
    unknown[0..4].copy_from_slice(&9999u32.to_le_bytes());
    unknown[4..8].copy_from_slice(&1u32.to_le_bytes());
    for bytes in [huge, unknown, vec![1, 0, 0]] {
        let mut s = std::os::unix::net::UnixStream::connect(&path).unwrap();
        let _ = s.write_all(&bytes);
        drop(s);
    }
    let mut c = Client::connect(&path, 1, false).unwrap();
    let p = c.ptr(0);
    c.queues[0].read(0, p, 4096, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    drop(c);
    server.stop().unwrap();
}

/// `uthin serve` on a fresh 1 GiB pool with a 64 MiB volume `vol` served over vhost-user-blk
/// on `vol.sock`, with the extra serve arguments `extra`; returns the server and the socket.
fn serve_vol(extra: &[&str]) -> (serve_support::ServeProcess, PathBuf) {
    let mut s = serve_support::ServeProcess::with_pool("1G");
    s.ok(&["create", "vol", "--size", "64M"]);
    let sock = s.dir.path().join("vol.sock");
    s.extra = [
        "--vhost-user".to_string(),
        format!("vol={}", sock.display()),
    ]
    .into_iter()
    .chain(extra.iter().map(|a| a.to_string()))
    .collect();
    s.start();
    (s, sock)
}

/// The same patterns through `uthin serve --vhost-user` on a real pool; then the socket managed
/// live over the control socket (list, remove, add), a read-only snapshot served while the
/// origin changes, delete refused while a socket serves the volume, and a restart.
#[test]
fn serve_vhost_user_patterns_live_add_remove_and_restart() {
    init_logging();
    let (mut s, sock) = serve_vol(&["--num-queues", "2"]);
    let sock_s = sock.to_str().unwrap().to_string();
    read_write_patterns(&sock);
    let list = s.ok(&["vhost", "list"]);
    assert!(
        list.contains("vol") && list.contains(&sock_s) && list.contains(" 2"),
        "{list}"
    );
    s.fails(&["delete", "vol"], "uthin vhost remove vol");

    assert_eq!(
        s.ok(&["vhost", "remove", "vol"]),
        "stopped serving vol over vhost-user-blk\n"
    );
    assert!(!sock.exists(), "remove takes the socket away");
    s.ok(&["snapshot", "vol", "vol-ro", "--read-only"]);
    let ro_sock = s.dir.path().join("ro.sock");
    s.ok(&["vhost", "add", "vol-ro", ro_sock.to_str().unwrap()]);
    s.ok(&["vhost", "add", "vol", &sock_s, "--num-queues", "1"]);
    let err = Client::connect(&ro_sock, 1, false)
        .err()
        .expect("a read-only snapshot refuses a writable open");
    assert!(err.message().contains("read-only"), "{}", err.message());

    // The origin is rewritten; the snapshot keeps what the patterns wrote.
    let mut c = Client::connect(&sock, 1, false).unwrap();
    c.mem()[..4096].copy_from_slice(&pattern(77, 4096));
    let p = c.ptr(0);
    c.queues[0].write(0, p, 4096, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    c.queues[0].flush(1, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[0], 1));
    let mut ro = Client::connect(&ro_sock, 1, true).unwrap();
    let p = ro.ptr(0);
    ro.queues[0].read(0, p, 4096, 0, ReqFlags::empty());
    all_ok(&wait(&mut ro.queues[0], 1));
    assert!(
        ro.mem()[..4096] == pattern(0, 4096)[..],
        "the snapshot keeps the old data"
    );
    drop((c, ro));

    // A restart serves the socket again (from --vhost-user) with the same data.
    assert_eq!(s.stop().code(), Some(0));
    assert!(!sock.exists());
    s.start();
    let mut c = Client::connect(&sock, 2, false).unwrap();
    let p = c.ptr(0);
    c.queues[1].read(0, p, 4096, 0, ReqFlags::empty());
    all_ok(&wait(&mut c.queues[1], 1));
    assert!(
        c.mem()[..4096] == pattern(77, 4096)[..],
        "the data survives the restart"
    );
    drop(c);
    assert_eq!(s.stop().code(), Some(0));
}

/// The same patterns through `uthin serve --cache direct --vhost-user`: guest buffers go to
/// the data file with O_DIRECT through io_uring.
#[test]
fn serve_vhost_user_patterns_with_cache_direct() {
    init_logging();
    let (mut s, sock) = serve_vol(&["--cache", "direct"]);
    s.assert_cache_mode("Direct");
    read_write_patterns(&sock);
    assert_eq!(s.stop().code(), Some(0));
    assert!(s.ok(&["check"]).contains("clean"));
}
