//! Listening sockets, the accept loops, per-connection tasks and graceful shutdown.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio::net::{TcpListener, UnixListener};
use tokio::sync::{Notify, watch};
use tokio::task::JoinSet;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::device::BlockDevice;

use super::buffers::BufferPool;
use super::exports::Exports;
use super::handshake::{Outcome, negotiate};
use super::transmission::{self, End};

/// Capacity of each connection's read buffer: enough for dozens of small requests per
/// `read` system call.
const READ_BUFFER: usize = 128 << 10;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    /// A TCP address, `HOST:PORT` (`127.0.0.1:10809`, `[::1]:10809`, `localhost:0`).
    Tcp(String),
    /// A Unix socket path (written `unix:PATH`).
    Unix(PathBuf),
}

/// A listen address that cannot be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid NBD listen address {0:?}: expected HOST:PORT or unix:PATH")]
pub struct ListenAddrError(String);

impl FromStr for ListenAddr {
    type Err = ListenAddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(ListenAddrError(s.to_owned()));
            }
            return Ok(ListenAddr::Unix(PathBuf::from(path)));
        }
        let Some((host, port)) = s.rsplit_once(':') else {
            return Err(ListenAddrError(s.to_owned()));
        };
        if host.is_empty() || port.parse::<u16>().is_err() {
            return Err(ListenAddrError(s.to_owned()));
        }
        Ok(ListenAddr::Tcp(s.to_owned()))
    }
}

impl fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ListenAddr::Tcp(a) => f.write_str(a),
            ListenAddr::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

enum ListenerKind {
    Tcp(TcpListener),
    Unix(UnixListener),
}

/// A bound listening socket, ready to be handed to [`Server::serve`]. A Unix socket's file is
/// removed when the listener is dropped.
pub struct Listener {
    kind: ListenerKind,
    addr: ListenAddr,
}

impl fmt::Debug for Listener {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Listener")
            .field("addr", &self.addr)
            .finish()
    }
}

/// Removes `path` if it is a Unix socket nobody listens on (left by a killed server).
fn remove_stale_socket(path: &Path) {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return;
    };
    if !meta.file_type().is_socket() {
        return;
    }
    if let Err(e) = std::os::unix::net::UnixStream::connect(path) {
        if e.kind() == io::ErrorKind::ConnectionRefused {
            let _ = std::fs::remove_file(path);
        }
    }
}

impl Listener {
    /// Binds `addr`. For TCP, port 0 picks a free port (see [`Listener::local_addr`]). For a
    /// Unix socket, a stale socket file from a dead server is replaced; a live one is not.
    pub async fn bind(addr: &ListenAddr) -> io::Result<Listener> {
        match addr {
            ListenAddr::Tcp(a) => {
                let l = TcpListener::bind(a.as_str()).await?;
                let local = l.local_addr()?;
                Ok(Listener {
                    kind: ListenerKind::Tcp(l),
                    addr: ListenAddr::Tcp(local.to_string()),
                })
            }
            ListenAddr::Unix(p) => {
                remove_stale_socket(p);
                let l = UnixListener::bind(p)?;
                Ok(Listener {
                    kind: ListenerKind::Unix(l),
                    addr: addr.clone(),
                })
            }
        }
    }

    /// The address actually bound (with the real port when 0 was asked for).
    pub fn local_addr(&self) -> &ListenAddr {
        &self.addr
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenAddr::Unix(p) = &self.addr {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Tunables of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A client must reach the transmission phase within this time, or it is disconnected.
    pub handshake_timeout: Duration,
    /// At most this many bytes of free I/O buffers are kept for reuse.
    pub buffer_cache_bytes: usize,
    /// Connections beyond this many are closed as soon as they are accepted (each open
    /// connection holds a read buffer and up to 96 MiB of in-flight requests).
    pub max_connections: usize,
    /// With structured replies, reads of at least the device's block size ask the device
    /// for holes first (`BlockDevice::block_status`) and send `OFFSET_HOLE` chunks for them
    /// instead of zeros. Turn off if the device's block status is not cheap.
    pub sparse_reads: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            handshake_timeout: Duration::from_secs(30),
            buffer_cache_bytes: 256 << 20,
            max_connections: 1024,
            sparse_reads: true,
        }
    }
}

/// Counts live connections and wakes a waiter when none is left.
#[derive(Default)]
struct Tracker {
    count: AtomicUsize,
    idle: Notify,
}

struct TrackerGuard(Arc<Shared>);

impl Drop for TrackerGuard {
    fn drop(&mut self) {
        if self.0.tracker.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.tracker.idle.notify_waiters();
        }
    }
}

/// State shared by the accept loops and connections, independent of the device type.
struct Shared {
    config: ServerConfig,
    stop: watch::Sender<bool>,
    pool: Arc<BufferPool>,
    tracker: Tracker,
    next_id: AtomicU64,
}

impl Shared {
    fn enter(self: &Arc<Self>) -> TrackerGuard {
        self.tracker.count.fetch_add(1, Ordering::AcqRel);
        TrackerGuard(Arc::clone(self))
    }

    async fn wait_idle(&self) {
        loop {
            let notified = self.tracker.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.tracker.count.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}

/// Stops a running [`Server`] from another task (e.g. a signal handler). Cloneable.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl fmt::Debug for ShutdownHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ShutdownHandle")
            .field("stopping", &*self.shared.stop.borrow())
            .finish()
    }
}

impl ShutdownHandle {
    /// Starts a graceful shutdown: listeners stop accepting, connections stop reading new
    /// requests, answer the ones in flight and close. [`Server::serve`] returns when all of
    /// that is done.
    pub fn shutdown(&self) {
        self.shared.stop.send_replace(true);
    }
}

/// An NBD server over the exports of a registry.
pub struct Server<D> {
    exports: Arc<Exports<D>>,
    shared: Arc<Shared>,
}

impl<D> fmt::Debug for Server<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Server")
            .field("exports", &self.exports)
            .field(
                "connections",
                &self.shared.tracker.count.load(Ordering::Acquire),
            )
            .finish()
    }
}

impl<D: BlockDevice> Server<D> {
    /// A server offering the exports of `exports` (which may change while it runs).
    pub fn new(exports: Arc<Exports<D>>) -> Self {
        Self::with_config(exports, ServerConfig::default())
    }

    /// A server with explicit tunables.
    pub fn with_config(exports: Arc<Exports<D>>, config: ServerConfig) -> Self {
        let (stop, _) = watch::channel(false);
        let pool = BufferPool::new(config.buffer_cache_bytes);
        Server {
            exports,
            shared: Arc::new(Shared {
                config,
                stop,
                pool,
                tracker: Tracker::default(),
                next_id: AtomicU64::new(1),
            }),
        }
    }

    /// The registry this server serves.
    pub fn exports(&self) -> &Arc<Exports<D>> {
        &self.exports
    }

    /// A handle that stops [`Server::serve`].
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            shared: Arc::clone(&self.shared),
        }
    }

    /// Number of open client connections (in handshake or transmission).
    pub fn connections(&self) -> usize {
        self.shared.tracker.count.load(Ordering::Acquire)
    }

    /// Accepts clients on `listeners` until [`ShutdownHandle::shutdown`], then waits for every
    /// connection to finish its in-flight requests and close. When this returns no request
    /// is running on any device: the caller may flush and commit.
    pub async fn serve(&self, listeners: Vec<Listener>) {
        let mut accept_loops = JoinSet::new();
        for listener in listeners {
            info!(addr = %listener.local_addr(), "NBD server listening");
            accept_loops.spawn(accept_loop(
                Arc::clone(&self.shared),
                Arc::clone(&self.exports),
                listener,
            ));
        }
        let mut stop = self.shared.stop.subscribe();
        let _ = stop.wait_for(|s| *s).await;
        while accept_loops.join_next().await.is_some() {}
        let open = self.connections();
        if open > 0 {
            info!(
                connections = open,
                "NBD server stopping: finishing in-flight requests"
            );
        }
        self.shared.wait_idle().await;
        info!("NBD server stopped");
    }
}

async fn accept_loop<D: BlockDevice>(
    shared: Arc<Shared>,
    exports: Arc<Exports<D>>,
    listener: Listener,
) {
    let mut stop = shared.stop.subscribe();
    loop {
        let accepted = match &listener.kind {
            ListenerKind::Tcp(l) => tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                r = l.accept() => r.map(|(s, peer)| {
                    // Replies are written whole; Nagle would only delay them.
                    if let Err(e) = s.set_nodelay(true) {
                        warn!(%peer, "cannot set TCP_NODELAY: {e}");
                    }
                    let (rd, wr) = s.into_split();
                    spawn_connection(&shared, &exports, rd, wr, peer.to_string());
                }),
            },
            ListenerKind::Unix(l) => tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => break,
                r = l.accept() => r.map(|(s, _)| {
                    let (rd, wr) = s.into_split();
                    spawn_connection(&shared, &exports, rd, wr, listener.addr.to_string());
                }),
            },
        };
        if let Err(e) = accepted {
            // Typically EMFILE: wait for connections to close instead of spinning.
            warn!(addr = %listener.addr, "accept failed: {e}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    debug!(addr = %listener.addr, "stopped accepting");
}

fn spawn_connection<R, W, D>(
    shared: &Arc<Shared>,
    exports: &Arc<Exports<D>>,
    rd: R,
    wr: W,
    peer: String,
) where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let guard = shared.enter();
    if shared.tracker.count.load(Ordering::Acquire) > shared.config.max_connections {
        warn!(
            %peer,
            limit = shared.config.max_connections,
            "too many connections: closing the new one"
        );
        return; // dropping the halves closes the socket
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let span = info_span!("nbd", conn = id, %peer);
    let shared = Arc::clone(shared);
    let exports = Arc::clone(exports);
    tokio::spawn(
        async move {
            connection(&shared, &exports, rd, wr).await;
            drop(guard);
        }
        .instrument(span),
    );
}

async fn connection<R, W, D>(shared: &Arc<Shared>, exports: &Exports<D>, rd: R, mut wr: W)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
    D: BlockDevice,
{
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let mut stop = shared.stop.subscribe();
    let negotiated = tokio::select! {
        biased;
        _ = stop.wait_for(|s| *s) => {
            debug!("server shutting down: closing a connection in handshake");
            return;
        }
        r = tokio::time::timeout(
            shared.config.handshake_timeout,
            negotiate(&mut rd, &mut wr, exports),
        ) => r,
    };
    let session = match negotiated {
        Err(_) => {
            warn!(
                "handshake not finished within {:?}: disconnecting",
                shared.config.handshake_timeout
            );
            return;
        }
        Ok(Err(e)) if client_vanished(&e) => {
            debug!("client left during the handshake: {e}");
            return;
        }
        Ok(Err(e)) => {
            warn!("handshake failed: {e}");
            return;
        }
        Ok(Ok(Outcome::ClientLeft)) => {
            debug!("client ended the handshake");
            return;
        }
        Ok(Ok(Outcome::Transmission(session))) => session,
    };
    let export = session.lease.entry().name().to_owned();
    info!(
        %export,
        mode = ?session.limits.mode,
        size = session.limits.size,
        read_only = session.limits.read_only,
        "client connected"
    );
    let end = transmission::run(
        rd,
        wr,
        session,
        Arc::clone(&shared.pool),
        shared.config.sparse_reads,
        stop,
    )
    .await;
    match &end {
        End::ProtocolError(_) => warn!(%export, "connection dropped: {end}"),
        End::Io(e) if !client_vanished(e) => warn!(%export, "connection closed: {end}"),
        _ => info!(%export, "client disconnected: {end}"),
    }
}

/// Errors that only mean the client went away (not worth a warning).
fn client_vanished(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "127.0.0.1:10809".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("127.0.0.1:10809".into())
        );
        assert_eq!(
            "[::1]:0".parse::<ListenAddr>().unwrap(),
            ListenAddr::Tcp("[::1]:0".into())
        );
        assert_eq!(
            "unix:/run/uthin/nbd.sock".parse::<ListenAddr>().unwrap(),
            ListenAddr::Unix("/run/uthin/nbd.sock".into())
        );
        for bad in ["", "10809", "host:", ":10809", "host:99999", "unix:"] {
            assert!(bad.parse::<ListenAddr>().is_err(), "{bad:?}");
        }
        assert_eq!(ListenAddr::Unix("/tmp/x".into()).to_string(), "unix:/tmp/x");
    }
}
