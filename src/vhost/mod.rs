//! vhost-user-blk: serves a [`BlockDevice`] to a VM (QEMU, cloud-hypervisor) or a libblkio
//! client as a virtio-blk disk over a Unix socket.
//!
//! vhost-user splits a virtio device in two: the front-end (the VMM) owns the VM and forwards
//! the guest's virtqueues, guest memory (as shared file descriptors) and eventfds over a Unix
//! socket; the back-end (this module) reads requests straight from the rings in guest memory,
//! does the I/O and writes the used ring. The message protocol is handled by rust-vmm's
//! `vhost-user-backend`; this module supplies the virtio-blk device model:
//!
//! * `config` — offered features and the configuration space (byte layout there);
//! * `request` — request parsing and validation (wire layout there) and execution;
//! * `backend` — the `VhostUserBackend` of one connection: queue threads, asynchronous
//!   completions, EVENT_IDX;
//! * this file — [`VhostUserBlkServer`]: the listening socket, one connection at a time,
//!   reconnects, and stopping.
//!
//! ```no_run
//! # use std::sync::Arc;
//! # use uthin::device::mem::MemDevice;
//! # use uthin::vhost::{VhostUserBlkConfig, VhostUserBlkServer};
//! let device = Arc::new(MemDevice::new(1 << 30, 65536, false));
//! let server = VhostUserBlkServer::start(device, "/tmp/vol0.sock", VhostUserBlkConfig::new("vol0"))?;
//! // ... QEMU: -chardev socket,id=c0,path=/tmp/vol0.sock -device vhost-user-blk-pci,chardev=c0
//! server.stop()?;
//! # Ok::<(), uthin::vhost::VhostError>(())
//! ```

use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;

use parking_lot::Mutex;
use vhost::vhost_user::Listener;
use vhost_user_backend::{ShutdownHandle, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

mod backend;
pub mod config;
mod request;

pub use backend::BlkBackend;

use crate::device::BlockDevice;

/// Where request futures run.
#[derive(Clone, Debug)]
pub enum Dispatch {
    /// On the queue's own thread, polled by the queue's executor (no cross-thread hand-off).
    /// Device futures must not block; a waker from any thread resumes them. With a runtime
    /// handle, polling happens inside that runtime's context, so devices may use tokio I/O,
    /// timers and `tokio::spawn`.
    QueueThread(Option<tokio::runtime::Handle>),
    /// Each request is spawned as a task on this tokio runtime; the queue thread only collects
    /// the results. For devices whose futures do heavy CPU work or block.
    Runtime(tokio::runtime::Handle),
}

/// How a volume is presented to the driver.
#[derive(Clone, Debug)]
pub struct VhostUserBlkConfig {
    /// The serial number the guest sees (GET_ID; `/sys/block/vda/serial`), truncated to 20 bytes.
    pub name: String,
    /// Number of request queues (1..=64), one thread each.
    pub num_queues: u16,
    /// Largest ring size the driver may choose (power of two, up to 32768).
    pub queue_size: u16,
    /// Where request futures run.
    pub dispatch: Dispatch,
}

impl VhostUserBlkConfig {
    /// One queue of up to 1024 entries, requests polled on the queue thread inside the current
    /// tokio runtime if there is one.
    pub fn new(name: &str) -> Self {
        VhostUserBlkConfig {
            name: name.to_string(),
            num_queues: 1,
            queue_size: 1024,
            dispatch: Dispatch::QueueThread(tokio::runtime::Handle::try_current().ok()),
        }
    }

    /// Sets the number of queues.
    pub fn with_queues(mut self, num_queues: u16) -> Self {
        self.num_queues = num_queues;
        self
    }

    /// Sets where request futures run.
    pub fn with_dispatch(mut self, dispatch: Dispatch) -> Self {
        self.dispatch = dispatch;
        self
    }

    fn validate(&self) -> Result<(), VhostError> {
        if !(1..=64).contains(&self.num_queues) {
            return Err(VhostError::Config(format!(
                "num_queues must be 1..=64, not {}",
                self.num_queues
            )));
        }
        if !self.queue_size.is_power_of_two() {
            return Err(VhostError::Config(format!(
                "queue_size must be a power of two, not {}",
                self.queue_size
            )));
        }
        Ok(())
    }
}

/// Why a server could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// The configuration is invalid.
    #[error("invalid vhost-user-blk configuration: {0}")]
    Config(String),
    /// The socket could not be created.
    #[error("cannot listen on {path}: {source}")]
    Listen {
        /// The socket path.
        path: PathBuf,
        /// What failed.
        source: vhost::vhost_user::Error,
    },
    /// A system call failed.
    #[error("vhost-user-blk server: {0}")]
    Io(#[from] std::io::Error),
    /// The server thread panicked.
    #[error("the vhost-user-blk server thread for {0} panicked")]
    Panicked(PathBuf),
}

/// The live connection, as the stopping side sees it.
struct Connection {
    /// Closes the vhost-user socket.
    shutdown: ShutdownHandle,
    /// Stops taking new requests and waits for those in flight.
    drain: Box<dyn Fn() + Send + Sync>,
}

/// State shared between a server's thread and its handle.
struct Shared {
    stop: AtomicBool,
    stop_event: EventFd,
    connection: Mutex<Option<Connection>>,
    connections_served: AtomicU64,
}

/// A vhost-user-blk server for one device on one socket. It serves one front-end connection at
/// a time and, when that connection ends (VM shutdown, reboot, QEMU `reconnect`, a client
/// exiting), waits for its requests to finish and listens for the next one, until
/// [`stop`](Self::stop).
pub struct VhostUserBlkServer {
    socket: PathBuf,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
}

impl VhostUserBlkServer {
    /// Binds `socket` (replacing a stale socket file) and starts serving `device` on a thread
    /// of its own. Returns once the socket accepts connections.
    pub fn start<D: BlockDevice>(
        device: Arc<D>,
        socket: impl AsRef<Path>,
        config: VhostUserBlkConfig,
    ) -> Result<Self, VhostError> {
        config.validate()?;
        let socket = socket.as_ref().to_path_buf();
        let listener = Listener::new(&socket, true).map_err(|source| VhostError::Listen {
            path: socket.clone(),
            source,
        })?;
        let shared = Arc::new(Shared {
            stop: AtomicBool::new(false),
            stop_event: EventFd::new(EFD_NONBLOCK)?,
            connection: Mutex::new(None),
            connections_served: AtomicU64::new(0),
        });
        let thread_shared = Arc::clone(&shared);
        let thread_socket = socket.clone();
        let thread = std::thread::Builder::new()
            .name(format!("vhost-blk {}", config.name))
            .spawn(move || {
                serve_connections(device, listener, config, &thread_shared, &thread_socket)
            })?;
        Ok(VhostUserBlkServer {
            socket,
            shared,
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// How many front-end connections have ended so far.
    pub fn connections_served(&self) -> u64 {
        self.shared.connections_served.load(Ordering::Acquire)
    }

    /// Stops taking requests, lets those in flight finish, disconnects the front-end (if any),
    /// stops listening and removes the socket file. For live removal of a volume and for
    /// shutdown. Because every request taken from the rings has completed before the socket
    /// closes, a front-end that reconnects (QEMU `reconnect=N`) to the next server on this path
    /// resumes exactly where this one stopped, although INFLIGHT_SHMFD is not offered.
    pub fn stop(mut self) -> Result<(), VhostError> {
        self.request_stop();
        match self.thread.take().map(JoinHandle::join) {
            Some(Err(_)) => Err(VhostError::Panicked(self.socket.clone())),
            _ => Ok(()),
        }
    }

    fn request_stop(&self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Err(e) = self.shared.stop_event.write(1) {
            tracing::error!("cannot signal the vhost-user-blk server to stop: {e}");
        }
        if let Some(conn) = self.shared.connection.lock().as_ref() {
            (conn.drain)();
            conn.shutdown.shutdown();
        }
    }
}

impl Drop for VhostUserBlkServer {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            self.request_stop();
            let _ = thread.join();
        }
    }
}

/// Waits until the listener has a connection (true) or a stop was requested (false).
fn wait_for_connection(listener: &Listener, stop_event: &EventFd) -> std::io::Result<bool> {
    let mut fds = [
        libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop_event.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        // SAFETY: `fds` is a valid array of two pollfd structures that outlives the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents != 0 {
            return Ok(true);
        }
    }
}

fn serve_connections<D: BlockDevice>(
    device: Arc<D>,
    mut listener: Listener,
    config: VhostUserBlkConfig,
    shared: &Shared,
    socket: &Path,
) {
    let where_ = socket.display();
    while !shared.stop.load(Ordering::Acquire) {
        match wait_for_connection(&listener, &shared.stop_event) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => {
                tracing::error!("vhost-user-blk {where_}: poll failed, stopping: {e}");
                break;
            }
        }
        if let Err(e) = serve_one(&device, &mut listener, &config, shared) {
            tracing::warn!("vhost-user-blk {where_}: connection ended: {e}");
            // A broken accept would spin; breathe before listening again.
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        shared.connections_served.fetch_add(1, Ordering::AcqRel);
    }
    // Dropping the listener removes the socket file.
    drop(listener);
    tracing::info!("vhost-user-blk {where_}: stopped");
}

/// Accepts one connection and serves it until it ends; then waits for its requests and stops
/// its queue threads.
fn serve_one<D: BlockDevice>(
    device: &Arc<D>,
    listener: &mut Listener,
    config: &VhostUserBlkConfig,
    shared: &Shared,
) -> Result<(), String> {
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(
        BlkBackend::new(Arc::clone(device), config, mem.clone()).map_err(|e| e.to_string())?,
    );
    let mut daemon = VhostUserDaemon::new(config.name.clone(), Arc::clone(&backend), mem)
        .map_err(|e| format!("cannot create the vhost-user daemon: {e}"))?;
    let handlers = daemon.get_epoll_handlers();
    let stop_queue_threads = || {
        for h in &handlers {
            h.send_exit_event();
        }
    };
    for (i, h) in handlers.iter().enumerate() {
        let fd = backend.completion_fd(i).map(|f| f.as_raw_fd());
        let registered = match fd {
            Some(fd) => h.register_listener(fd, EventSet::IN, backend.completion_event_id()),
            None => Err(std::io::Error::other("no completion eventfd")),
        };
        if let Err(e) = registered {
            stop_queue_threads();
            return Err(format!("cannot watch queue {i}'s completions: {e}"));
        }
    }
    if let Err(e) = daemon.start(listener) {
        stop_queue_threads();
        return Err(format!("cannot accept: {e}"));
    }
    if let Some(shutdown) = daemon.shutdown_handle() {
        let drained = Arc::clone(&backend);
        let conn = Connection {
            shutdown,
            drain: Box::new(move || {
                drained.quiesce();
                drained.wait_idle();
            }),
        };
        let mut slot = shared.connection.lock();
        // A stop requested while we were accepting found no connection to close: close it here.
        // (`request_stop` sets the flag before taking this lock, so one of us sees the other.)
        if shared.stop.load(Ordering::Acquire) {
            (conn.drain)();
            conn.shutdown.shutdown();
        }
        *slot = Some(conn);
    }
    tracing::info!("vhost-user-blk {}: front-end connected", config.name);
    let result = daemon.wait();
    *shared.connection.lock() = None;
    // No late completion may touch the rings of the next connection (the front-end reuses the
    // same guest rings after a reconnect): wait for every request before accepting again.
    backend.wait_idle();
    stop_queue_threads();
    tracing::info!("vhost-user-blk {}: front-end disconnected", config.name);
    match result {
        // The front-end closing its socket is how every connection ends.
        Ok(())
        | Err(vhost_user_backend::Error::HandleRequest(
            vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage,
        )) => Ok(()),
        Err(e) => Err(e.to_string()),
    }
}
