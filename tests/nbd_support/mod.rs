//! Shared by the NBD integration tests: the server under test (a [`Target`]), a raw protocol
//! client for malformed-input tests, a fault-injecting device, and a runner for external
//! clients (qemu-io, nbdinfo, fio...) that fails with the package to install when a tool is
//! missing.
//!
//! The tests talk to a [`Target`] only through NBD URIs and `create_export`, so pointing them
//! at `uthin serve` instead of the in-process server means one more `Target` implementation
//! (start `uthin serve` on a temporary pool, create exports with `uthin create`), selected in
//! [`target`].
#![allow(dead_code)]

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use uthin::device::mem::MemDevice;
use uthin::device::{BlockDevice, DevError, DevResult, DeviceInfo, Extent};
use uthin::nbd::wire::*;
use uthin::nbd::{Exports, ListenAddr, Listener, Server, ServerConfig, ShutdownHandle};

/// Allocation block size of the test devices (the pool's default data block size).
pub const BLOCK: u32 = 64 << 10;

// ---------------------------------------------------------------------------------------------
// A MemDevice with injectable delays and failures
// ---------------------------------------------------------------------------------------------

/// [`MemDevice`] plus fault injection: requests touching `slow_at` wait `slow_for` first,
/// reads touching `fail_at` fail with EIO.
pub struct TestDevice {
    pub mem: MemDevice,
    slow_at: AtomicU64,
    slow_ms: AtomicU64,
    fail_at: AtomicU64,
}

impl TestDevice {
    pub fn new(size: u64, read_only: bool) -> TestDevice {
        TestDevice {
            mem: MemDevice::new(size, BLOCK, read_only),
            slow_at: AtomicU64::new(u64::MAX),
            slow_ms: AtomicU64::new(0),
            fail_at: AtomicU64::new(u64::MAX),
        }
    }

    /// Requests whose range contains `offset` sleep `delay` before running.
    pub fn set_slow(&self, offset: u64, delay: Duration) {
        self.slow_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
        self.slow_at.store(offset, Ordering::SeqCst);
    }

    /// Reads whose range contains `offset` fail with EIO.
    pub fn set_failing(&self, offset: u64) {
        self.fail_at.store(offset, Ordering::SeqCst);
    }

    async fn maybe_wait(&self, offset: u64, len: u64) {
        let at = self.slow_at.load(Ordering::SeqCst);
        if at >= offset && at < offset.saturating_add(len.max(1)) {
            let ms = self.slow_ms.load(Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
    }
}

impl BlockDevice for TestDevice {
    fn info(&self) -> DeviceInfo {
        self.mem.info()
    }

    async fn read(&self, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> DevResult<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.maybe_wait(offset, len).await;
        let fail = self.fail_at.load(Ordering::SeqCst);
        if fail >= offset && fail < offset + len {
            return Err(DevError::Io(std::io::Error::from_raw_os_error(libc::EIO)));
        }
        self.mem.read(offset, bufs).await
    }

    async fn write(&self, offset: u64, bufs: &[IoSlice<'_>], fua: bool) -> DevResult<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        self.maybe_wait(offset, len).await;
        self.mem.write(offset, bufs, fua).await
    }

    async fn flush(&self) -> DevResult<()> {
        self.mem.flush().await
    }

    async fn discard(&self, offset: u64, len: u64) -> DevResult<()> {
        self.mem.discard(offset, len).await
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u64,
        may_unmap: bool,
        fast_only: bool,
    ) -> DevResult<()> {
        self.mem
            .write_zeroes(offset, len, may_unmap, fast_only)
            .await
    }

    async fn block_status(&self, offset: u64, len: u64) -> DevResult<Vec<Extent>> {
        self.mem.block_status(offset, len).await
    }
}

// ---------------------------------------------------------------------------------------------
// The server under test
// ---------------------------------------------------------------------------------------------

/// The NBD server running in this process, on its own runtime thread, listening on a free
/// TCP port and on a Unix socket.
pub struct InProcessServer {
    pub exports: Arc<Exports<TestDevice>>,
    pub server: Arc<Server<TestDevice>>,
    /// `127.0.0.1:PORT`
    pub tcp: String,
    pub unix: PathBuf,
    shutdown: ShutdownHandle,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl InProcessServer {
    pub fn start() -> InProcessServer {
        Self::start_with(ServerConfig::default())
    }

    pub fn start_with(config: ServerConfig) -> InProcessServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let unix = dir.path().join("nbd.sock");
        let exports = Arc::new(Exports::new());
        let server = Arc::new(Server::with_config(Arc::clone(&exports), config));
        let shutdown = server.shutdown_handle();
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = {
            let server = Arc::clone(&server);
            let unix = unix.clone();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("runtime");
                rt.block_on(async move {
                    let tcp = Listener::bind(&ListenAddr::Tcp("127.0.0.1:0".into()))
                        .await
                        .expect("bind tcp");
                    let sock = Listener::bind(&ListenAddr::Unix(unix))
                        .await
                        .expect("bind unix");
                    tx.send(tcp.local_addr().to_string()).expect("send addr");
                    server.serve(vec![tcp, sock]).await;
                });
            })
        };
        let tcp = rx.recv().expect("server started");
        InProcessServer {
            exports,
            server,
            tcp,
            unix,
            shutdown,
            thread: Some(thread),
            _dir: dir,
        }
    }

    /// Adds a sparse in-memory export and returns its device.
    pub fn add(&self, name: &str, size: u64, read_only: bool) -> Arc<TestDevice> {
        let dev = Arc::new(TestDevice::new(size, read_only));
        self.exports
            .add(name, Arc::clone(&dev), &format!("test export {name}"))
            .expect("add export");
        dev
    }

    pub fn shutdown_handle(&self) -> ShutdownHandle {
        self.shutdown.clone()
    }

    /// Starts a graceful shutdown and waits until `serve` has returned.
    pub fn stop(&mut self) {
        self.shutdown.shutdown();
        if let Some(t) = self.thread.take() {
            t.join().expect("server thread");
        }
    }

    /// True once `serve` has returned.
    pub fn stopped(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for InProcessServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// What the client tests need from a server: URIs of exports, a way to create them, and the
/// number of open connections.
pub trait Target: Sync {
    /// `nbd://HOST:PORT/NAME`
    fn tcp_uri(&self, export: &str) -> String;
    /// `nbd+unix:///NAME?socket=PATH`
    fn unix_uri(&self, export: &str) -> String;
    /// Creates an empty (all-holes) export; allocation unit [`BLOCK`].
    fn create_export(&self, name: &str, size: u64, read_only: bool);
    /// Client connections the server has open now. (A target in another process can count
    /// the ESTABLISHED sockets on its port.)
    fn connections(&self) -> usize;
    /// The description `nbdinfo --list` shows for an export made by `create_export`.
    fn description(&self, name: &str) -> String;
}

impl Target for InProcessServer {
    fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    fn create_export(&self, name: &str, size: u64, read_only: bool) {
        self.add(name, size, read_only);
    }

    fn connections(&self) -> usize {
        self.server.connections()
    }

    fn description(&self, name: &str) -> String {
        format!("test export {name}")
    }
}

/// The in-process server over `TestDevice` exports, as a target. (`tests/serve_support` has
/// the other target: `uthin serve` on a temporary pool.)
pub fn target() -> impl Target {
    InProcessServer::start()
}

// ---------------------------------------------------------------------------------------------
// External tools
// ---------------------------------------------------------------------------------------------

/// Panics, naming the Debian package to install, unless `tool` is on PATH.
pub fn require_tool(tool: &str, package: &str) {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "{tool} is not installed: install the Debian package {package} \
         (scripts/test.sh installs it)"
    );
}

/// Output of an external command.
pub struct Output {
    pub status: std::process::ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    /// Panics with the command's output unless it succeeded.
    pub fn ok(self, what: &str) -> Output {
        assert!(
            self.status.success(),
            "{what} failed ({}):\nstdout:\n{}\nstderr:\n{}",
            self.status,
            self.stdout,
            self.stderr
        );
        self
    }
}

/// Runs `qemu-io -f raw -c C1 -c C2 ... URI` (within `limit`). qemu-io exits 0 even when a
/// command fails, so callers look at its output.
pub fn qemu_io(uri: &str, commands: &[&str], limit: Duration) -> Output {
    require_tool("qemu-io", "qemu-utils");
    let mut args = vec!["-f", "raw"];
    for c in commands {
        args.push("-c");
        args.push(c);
    }
    args.push(uri);
    run("qemu-io", &args, limit)
}

/// Runs `program args...` with a time limit, capturing its output.
pub fn run(program: &str, args: &[&str], limit: Duration) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let out_path = dir.path().join("stdout");
    let err_path = dir.path().join("stderr");
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("stdout file"))
        .stderr(std::fs::File::create(&err_path).expect("stderr file"))
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{program} {args:?} did not finish within {limit:?}\nstdout:\n{}\nstderr:\n{}",
                std::fs::read_to_string(&out_path).unwrap_or_default(),
                std::fs::read_to_string(&err_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: std::fs::read_to_string(&out_path).unwrap_or_default(),
        stderr: std::fs::read_to_string(&err_path).unwrap_or_default(),
    }
}

/// Bytes of disk a file really uses (its allocated blocks).
pub fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).expect("stat").blocks() * 512
}

// ---------------------------------------------------------------------------------------------
// A raw protocol client, for what real clients never send
// ---------------------------------------------------------------------------------------------

/// One option reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub reply_type: u32,
    pub data: Vec<u8>,
}

/// One reply (simple) or reply chunk (structured / extended).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple {
        cookie: u64,
        error: u32,
    },
    Chunk {
        cookie: u64,
        flags: u16,
        chunk_type: u16,
        /// Extended headers only: the request offset echoed back.
        offset: Option<u64>,
        payload: Vec<u8>,
    },
}

impl Reply {
    pub fn cookie(&self) -> u64 {
        match self {
            Reply::Simple { cookie, .. } | Reply::Chunk { cookie, .. } => *cookie,
        }
    }

    pub fn is_done(&self) -> bool {
        match self {
            Reply::Simple { .. } => true,
            Reply::Chunk { flags, .. } => flags & REPLY_FLAG_DONE != 0,
        }
    }

    /// The NBD error of a simple reply or an error chunk (0 for success).
    pub fn error(&self) -> u32 {
        match self {
            Reply::Simple { error, .. } => *error,
            Reply::Chunk {
                chunk_type,
                payload,
                ..
            } if chunk_type & 0x8000 != 0 => be_u32(&payload[0..4]),
            Reply::Chunk { .. } => 0,
        }
    }
}

/// A blocking NBD client that sends exactly the bytes it is told to.
pub struct RawClient {
    pub stream: TcpStream,
    pub extended: bool,
    pub structured: bool,
}

impl RawClient {
    /// Connects and checks the greeting.
    pub fn connect(addr: &str) -> RawClient {
        let stream = TcpStream::connect(addr).expect("connect");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        stream.set_nodelay(true).expect("nodelay");
        let mut c = RawClient {
            stream,
            extended: false,
            structured: false,
        };
        let g = c.read_n(18);
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
        c
    }

    /// Connects and sends the usual client flags (fixed newstyle, no zeroes).
    pub fn connect_fixed(addr: &str) -> RawClient {
        let mut c = Self::connect(addr);
        c.send(&(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES).to_be_bytes());
        c
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).expect("send");
    }

    /// Sends, ignoring errors (the server may already have closed).
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.stream.read_exact(&mut b).expect("read from server");
        b
    }

    /// True if the server closed the connection (EOF or reset) within the read timeout.
    pub fn is_closed_by_server(&mut self) -> bool {
        let mut b = [0u8; 1];
        loop {
            match self.stream.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue, // drain whatever it still sent
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
                Err(e) => panic!("server did not close the connection: {e}"),
            }
        }
    }

    pub fn send_option(&mut self, option: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
        b.extend_from_slice(&option.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    pub fn read_option_reply(&mut self) -> OptReply {
        let h = self.read_n(20);
        assert_eq!(be_u64(&h[0..8]), OPT_REPLY_MAGIC, "option reply magic");
        let len = be_u32(&h[16..20]) as usize;
        OptReply {
            option: be_u32(&h[8..12]),
            reply_type: be_u32(&h[12..16]),
            data: self.read_n(len),
        }
    }

    /// Sends an option and reads replies until a final one (ACK or error).
    pub fn option(&mut self, option: u32, data: &[u8]) -> Vec<OptReply> {
        self.send_option(option, data);
        let mut replies = Vec::new();
        loop {
            let r = self.read_option_reply();
            assert_eq!(r.option, option);
            let last = r.reply_type == REP_ACK || r.reply_type & (1 << 31) != 0;
            replies.push(r);
            if last {
                return replies;
            }
        }
    }

    pub fn structured_reply(&mut self) {
        let r = self.option(OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(r.last().map(|r| r.reply_type), Some(REP_ACK));
        self.structured = true;
    }

    pub fn extended_headers(&mut self) {
        let r = self.option(OPT_EXTENDED_HEADERS, &[]);
        assert_eq!(r.last().map(|r| r.reply_type), Some(REP_ACK));
        self.extended = true;
        self.structured = true;
    }

    /// `NBD_OPT_SET_META_CONTEXT` for `base:allocation`; returns the context id.
    pub fn select_base_allocation(&mut self, export: &str) -> u32 {
        let r = self.option(
            OPT_SET_META_CONTEXT,
            &meta_payload(export, &["base:allocation"]),
        );
        assert_eq!(r.len(), 2, "{r:?}");
        assert_eq!(r[0].reply_type, REP_META_CONTEXT);
        assert_eq!(&r[0].data[4..], b"base:allocation");
        be_u32(&r[0].data[0..4])
    }

    /// `NBD_OPT_GO` with a block-size request; panics unless it succeeds. Returns
    /// `(size, transmission flags)`.
    pub fn go(&mut self, export: &str) -> (u64, u16) {
        let r = self.option(OPT_GO, &info_payload(export, &[INFO_BLOCK_SIZE]));
        let last = r.last().expect("a reply");
        assert_eq!(last.reply_type, REP_ACK, "GO failed: {r:?}");
        let export_info = r
            .iter()
            .find(|r| r.reply_type == REP_INFO && be_u16(&r.data[0..2]) == INFO_EXPORT)
            .expect("NBD_INFO_EXPORT");
        (
            be_u64(&export_info.data[2..10]),
            be_u16(&export_info.data[10..12]),
        )
    }

    /// Sends a request header (compact or extended as negotiated) and an optional payload.
    pub fn request(
        &mut self,
        flags: u16,
        command: u16,
        cookie: u64,
        offset: u64,
        len: u64,
        payload: &[u8],
    ) {
        let mut b = Vec::with_capacity(32 + payload.len());
        if self.extended {
            b.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        } else {
            b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        }
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&command.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        if self.extended {
            b.extend_from_slice(&len.to_be_bytes());
        } else {
            b.extend_from_slice(&(len as u32).to_be_bytes());
        }
        b.extend_from_slice(payload);
        self.send(&b);
    }

    /// Reads one simple reply header or one structured/extended chunk. (The data after a
    /// successful simple read reply is left to the caller: see [`RawClient::read`].)
    pub fn read_reply(&mut self) -> Reply {
        let magic = be_u32(&self.read_n(4));
        match magic {
            SIMPLE_REPLY_MAGIC => {
                let r = self.read_n(12);
                Reply::Simple {
                    error: be_u32(&r[0..4]),
                    cookie: be_u64(&r[4..12]),
                }
            }
            STRUCTURED_REPLY_MAGIC => {
                let r = self.read_n(16);
                let len = be_u32(&r[12..16]) as usize;
                Reply::Chunk {
                    flags: be_u16(&r[0..2]),
                    chunk_type: be_u16(&r[2..4]),
                    cookie: be_u64(&r[4..12]),
                    offset: None,
                    payload: self.read_n(len),
                }
            }
            EXTENDED_REPLY_MAGIC => {
                let r = self.read_n(28);
                let len = be_u64(&r[20..28]) as usize;
                Reply::Chunk {
                    flags: be_u16(&r[0..2]),
                    chunk_type: be_u16(&r[2..4]),
                    cookie: be_u64(&r[4..12]),
                    offset: Some(be_u64(&r[12..20])),
                    payload: self.read_n(len),
                }
            }
            other => panic!("unexpected reply magic {other:#x}"),
        }
    }

    /// Reads every chunk of one structured reply (until DONE).
    pub fn read_chunks(&mut self) -> Vec<Reply> {
        let mut v = Vec::new();
        loop {
            let r = self.read_reply();
            let done = r.is_done();
            v.push(r);
            if done {
                return v;
            }
        }
    }

    /// Writes `data` at `offset` and expects success.
    pub fn write(&mut self, cookie: u64, offset: u64, data: &[u8]) {
        self.request(0, CMD_WRITE, cookie, offset, data.len() as u64, data);
        let r = self.read_reply();
        assert_eq!(r.cookie(), cookie);
        assert_eq!(r.error(), 0, "write failed: {r:?}");
        assert!(r.is_done());
    }

    /// Reads `len` bytes at `offset`, reassembling data and hole chunks (structured) or the
    /// simple reply's payload. Panics on an error reply.
    pub fn read(&mut self, cookie: u64, offset: u64, len: usize) -> Vec<u8> {
        self.request(0, CMD_READ, cookie, offset, len as u64, &[]);
        if !self.structured {
            let r = self.read_reply();
            assert_eq!(r, Reply::Simple { cookie, error: 0 });
            return self.read_n(len);
        }
        let mut out = vec![0xEEu8; len];
        let mut covered = 0usize;
        for chunk in self.read_chunks() {
            let Reply::Chunk {
                chunk_type,
                payload,
                cookie: c,
                ..
            } = chunk
            else {
                panic!("simple reply to a structured read");
            };
            assert_eq!(c, cookie);
            match chunk_type {
                REPLY_TYPE_OFFSET_DATA => {
                    let at = (be_u64(&payload[0..8]) - offset) as usize;
                    let data = &payload[8..];
                    out[at..at + data.len()].copy_from_slice(data);
                    covered += data.len();
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let at = (be_u64(&payload[0..8]) - offset) as usize;
                    let n = be_u32(&payload[8..12]) as usize;
                    out[at..at + n].fill(0);
                    covered += n;
                }
                REPLY_TYPE_NONE => {}
                t => panic!("unexpected chunk type {t:#x} in a read reply"),
            }
        }
        assert_eq!(covered, len, "chunks must cover the read exactly");
        out
    }

    pub fn disconnect(mut self) {
        self.request(0, CMD_DISC, 0, 0, 0, &[]);
        assert!(self.is_closed_by_server());
    }
}

/// Payload of `NBD_OPT_GO` / `NBD_OPT_INFO`.
pub fn info_payload(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        b.extend_from_slice(&i.to_be_bytes());
    }
    b
}

/// Payload of `NBD_OPT_{LIST,SET}_META_CONTEXT`.
pub fn meta_payload(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&(export.len() as u32).to_be_bytes());
    b.extend_from_slice(export.as_bytes());
    b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        b.extend_from_slice(&(q.len() as u32).to_be_bytes());
        b.extend_from_slice(q.as_bytes());
    }
    b
}

/// A deterministic pseudo-random byte pattern.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}
