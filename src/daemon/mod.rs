//! `uthin serve`: one process owns the pool and serves every volume and snapshot.
//!
//! The daemon ties the layers together and adds nothing to their semantics:
//!
//! * the [`Pool`] (which holds `DIR/lock`) inside a [`VolumePool`], whose periodic commit runs
//!   every second when something is dirty;
//! * one NBD [`Server`] over a live [`Exports`] registry: every named volume and snapshot is an
//!   export named after it, added and removed as volumes come and go;
//! * vhost-user-blk sockets ([`VhostUserBlkServer`]) for the volumes asked for with
//!   `--vhost-user NAME=SOCKET` or `uthin vhost add`;
//! * the control socket (`DIR/control.sock`, [`control`]) through which the command line's
//!   `create`, `snapshot`, `delete`, `rename`, `adopt`, `list`, `pool status`, `pool grow`,
//!   `check`, `dump`, `delta` and `vhost` act on the live pool.
//!
//! Deleting a volume that a client uses is **refused** (NBD connections on it, or a vhost-user
//! socket serving it), with a message saying what uses it; nothing is deferred, so a delete
//! that succeeds has freed the space when it returns. SIGTERM or SIGINT stops accepting,
//! finishes the requests in flight, commits and returns (exit 0).

pub mod control;

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, watch};
use tracing::{error, info, warn};

use crate::data::CacheMode;
use crate::nbd::{ExportError, ExportHandle, Exports, ListenAddr, Listener, Server};
use crate::pool::size::format_size;
use crate::pool::{CreateOptions, Pool, PoolError, VolumeInfo};
use crate::units::DevId;
use crate::vhost::{Dispatch, VhostUserBlkConfig, VhostUserBlkServer};
use crate::volume::{DEFAULT_CACHE_ENTRIES, Drain, Volume, VolumePool};
use control::{LineRead, ListEntry, Reply, Request, Response, VhostEntry};

/// Where NBD clients are served when no `--nbd` is given (loopback only: serving other hosts
/// must be asked for).
pub const DEFAULT_NBD_ADDR: &str = "127.0.0.1:10809";
/// NBD's well-known port (URIs may leave it out).
const NBD_DEFAULT_PORT: &str = "10809";
/// Data size of the pool `serve` creates when there is none.
pub const DEFAULT_POOL_DATA_SIZE: u64 = 100 << 30;
/// Name of the volume `serve` creates in a new default pool.
pub const DEFAULT_VOLUME: &str = "vol0";
/// Size of that volume.
pub const DEFAULT_VOLUME_SIZE: u64 = 10 << 30;
/// vhost-user-blk request queues per socket when `--num-queues` is not given.
pub const DEFAULT_NUM_QUEUES: u16 = 4;
/// How often dirty metadata is committed without a client asking.
const COMMIT_PERIOD: Duration = Duration::from_secs(1);
/// Control connections served at once (each is one `uthin` command).
const MAX_CONTROL_CONNECTIONS: usize = 64;
/// A control connection that sends nothing for this long is closed.
const CONTROL_IDLE: Duration = Duration::from_secs(300);

/// What `uthin serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// NBD listen addresses; empty means [`DEFAULT_NBD_ADDR`].
    pub nbd: Vec<ListenAddr>,
    /// `(volume, socket)` pairs to serve over vhost-user-blk from the start.
    pub vhost: Vec<(String, PathBuf)>,
    /// Request queues of each vhost-user-blk socket.
    pub num_queues: u16,
    /// How the data file uses the host's page cache.
    pub cache: CacheMode,
    /// Entries of the volumes' mapping cache.
    pub mapping_cache_entries: usize,
    /// Worker threads of the runtime that runs the NBD connections, the commits and the
    /// control socket; `None`: tokio's default (one per core, or `TOKIO_WORKER_THREADS`).
    pub threads: Option<usize>,
}

impl Default for ServeOptions {
    fn default() -> Self {
        ServeOptions {
            nbd: Vec::new(),
            vhost: Vec::new(),
            num_queues: DEFAULT_NUM_QUEUES,
            cache: CacheMode::default(),
            mapping_cache_entries: DEFAULT_CACHE_ENTRIES,
            threads: None,
        }
    }
}

/// Why `serve` could not start or did not stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// Opening, creating or committing the pool failed.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// An NBD listen address could not be bound.
    #[error("cannot listen for NBD clients on {addr}: {source}")]
    Listen {
        /// The address.
        addr: ListenAddr,
        /// What failed.
        source: std::io::Error,
    },
    /// The control socket could not be created.
    #[error("cannot create the control socket {path}: {source}")]
    Control {
        /// Its path.
        path: PathBuf,
        /// What failed.
        source: std::io::Error,
    },
    /// A `--vhost-user` socket could not be served.
    #[error("--vhost-user {name}={}: {why}", socket.display())]
    Vhost {
        /// The volume.
        name: String,
        /// The socket.
        socket: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The runtime or a signal handler could not be set up.
    #[error("cannot start the server: {0}")]
    Setup(std::io::Error),
    /// The final commit failed: the last second of writes may not be durable.
    #[error("the final commit failed: {0}")]
    Commit(String),
}

/// Runs `uthin serve` on the pool in `dir` until SIGTERM or SIGINT.
pub fn serve(dir: &Path, opts: ServeOptions) -> Result<(), ServeError> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = opts.threads {
        builder.worker_threads(n);
    }
    let rt = builder
        .enable_all()
        .thread_name("uthin-serve")
        .build()
        .map_err(ServeError::Setup)?;
    rt.block_on(run(dir, opts))
}

/// Sets up logging for the command line: `RUST_LOG` if set, else `default` (e.g. "info"),
/// to stderr, coloured only on a terminal.
pub fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Opens the pool in `dir`; when there is none and `dir` is missing or empty, creates the
/// default pool (README's first command) with one volume.
fn open_or_create(dir: &Path) -> Result<Pool, PoolError> {
    match Pool::open(dir) {
        Err(PoolError::NoPool(_)) if dir_missing_or_empty(dir) => {
            let opts = CreateOptions {
                data_size: DEFAULT_POOL_DATA_SIZE,
                ..CreateOptions::default()
            };
            let mut pool = Pool::create(dir, &opts)?;
            pool.create_volume(DEFAULT_VOLUME, DEFAULT_VOLUME_SIZE)?;
            info!(
                "created pool {} ({} of sparse data in {} blocks) with a {} volume `{}`",
                dir.display(),
                format_size(DEFAULT_POOL_DATA_SIZE),
                format_size(pool.data_block_size()),
                format_size(DEFAULT_VOLUME_SIZE),
                DEFAULT_VOLUME
            );
            Ok(pool)
        }
        other => other,
    }
}

fn dir_missing_or_empty(dir: &Path) -> bool {
    match std::fs::read_dir(dir) {
        Ok(mut entries) => entries.next().is_none(),
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

async fn run(dir: &Path, opts: ServeOptions) -> Result<(), ServeError> {
    let pool = tokio::task::block_in_place(|| open_or_create(dir))?;
    let volumes = VolumePool::open_with(pool, opts.mapping_cache_entries, opts.cache)?;
    info!(
        "data file cache mode: {:?}; mapping cache: {} entries; worker threads: {}",
        volumes.data().cache_mode(),
        opts.mapping_cache_entries,
        tokio::runtime::Handle::current().metrics().num_workers()
    );
    let exports: Arc<Exports<Volume>> = Arc::new(Exports::new());
    let server = Arc::new(Server::new(Arc::clone(&exports)));

    let addrs = if opts.nbd.is_empty() {
        vec![ListenAddr::Tcp(DEFAULT_NBD_ADDR.to_string())]
    } else {
        opts.nbd.clone()
    };
    let mut listeners = Vec::new();
    for addr in &addrs {
        let l = Listener::bind(addr)
            .await
            .map_err(|source| ServeError::Listen {
                addr: addr.clone(),
                source,
            })?;
        listeners.push(l);
    }
    let bound: Vec<ListenAddr> = listeners.iter().map(|l| l.local_addr().clone()).collect();

    let daemon = Arc::new(Daemon {
        dir: dir.to_path_buf(),
        volumes: volumes.clone(),
        exports,
        num_queues: opts.num_queues,
        runtime: tokio::runtime::Handle::current(),
        state: tokio::sync::Mutex::new(State::default()),
    });
    {
        let mut st = daemon.state.lock().await;
        let infos = {
            let v = volumes.clone();
            tokio::task::spawn_blocking(move || v.pool().list())
                .await
                .map_err(|e| ServeError::Setup(std::io::Error::other(e)))??
        };
        for info in &infos {
            daemon.export(&mut st, info);
        }
        for (name, socket) in &opts.vhost {
            daemon
                .vhost_add(&mut st, name, socket, None)
                .await
                .map_err(|why| ServeError::Vhost {
                    name: name.clone(),
                    socket: socket.clone(),
                    why,
                })?;
        }
    }

    let control_path = control::socket_path(dir);
    let control_listener = control::bind(&control_path)
        .and_then(|l| {
            l.set_nonblocking(true)?;
            tokio::net::UnixListener::from_std(l)
        })
        .map_err(|source| ServeError::Control {
            path: control_path.clone(),
            source,
        })?;

    let committer = volumes.spawn_periodic_commit(COMMIT_PERIOD);
    let nbd_stop = server.shutdown_handle();
    let nbd_task = tokio::spawn({
        let server = Arc::clone(&server);
        async move { server.serve(listeners).await }
    });
    let (stop_control, stop_rx) = watch::channel(false);
    let control_task = tokio::spawn(Arc::clone(&daemon).control_loop(control_listener, stop_rx));

    daemon.log_ready(&bound, &control_path).await;

    wait_for_signal().await?;
    info!("stopping: no new clients; finishing requests in flight");
    // A second signal while we drain means the operator wants out now: that is as safe as a
    // crash (the last committed transaction survives), so allow it.
    tokio::spawn(async {
        if wait_for_signal().await.is_ok() {
            warn!("second signal: exiting without the final commit");
            std::process::exit(130);
        }
    });

    stop_control.send_replace(true);
    let _ = control_task.await;
    // Wait for a control operation in progress; none starts after this.
    let mut st = daemon.state.lock().await;
    st.stopping = true;
    nbd_stop.shutdown();
    let _ = nbd_task.await;
    let vhosts: Vec<_> = st
        .served
        .values_mut()
        .filter_map(|s| s.vhost.take())
        .collect();
    for v in vhosts {
        let socket = v.socket.clone();
        match tokio::task::spawn_blocking(move || v.server.stop()).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => warn!("vhost-user-blk {}: {e}", socket.display()),
            Err(e) => warn!("vhost-user-blk {}: {e}", socket.display()),
        }
    }
    committer.abort();
    let committed = volumes.commit().await;
    let _ = std::fs::remove_file(&control_path);
    st.served.clear();
    drop(st);
    committed.map_err(|e| ServeError::Commit(e.to_string()))?;
    info!("stopped; everything written is committed");
    Ok(())
}

/// Waits for SIGTERM or SIGINT.
async fn wait_for_signal() -> Result<(), ServeError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(ServeError::Setup)?;
    let mut int = signal(SignalKind::interrupt()).map_err(ServeError::Setup)?;
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    Ok(())
}

/// A vhost-user-blk socket serving one volume.
struct VhostServed {
    server: VhostUserBlkServer,
    socket: PathBuf,
    num_queues: u16,
}

/// One named volume or snapshot being served.
struct Served {
    name: String,
    volume: Arc<Volume>,
    /// Its NBD export under its current name.
    export: Option<ExportHandle<Volume>>,
    /// Exports under names it had before a rename: no new client can reach them, but clients
    /// that connected before the rename still use them.
    retired: Vec<ExportHandle<Volume>>,
    vhost: Option<VhostServed>,
}

#[derive(Default)]
struct State {
    served: HashMap<DevId, Served>,
    /// Shutdown has begun: control operations are refused.
    stopping: bool,
}

impl State {
    fn by_name(&self, name: &str) -> Option<DevId> {
        self.served
            .iter()
            .find(|(_, s)| s.name == name)
            .map(|(d, _)| *d)
    }
}

struct Daemon {
    dir: PathBuf,
    volumes: VolumePool,
    exports: Arc<Exports<Volume>>,
    num_queues: u16,
    runtime: tokio::runtime::Handle,
    /// Control operations run one at a time, under this lock.
    state: tokio::sync::Mutex<State>,
}

fn description(info: &VolumeInfo) -> String {
    let size = info.size.map(format_size).unwrap_or_default();
    let mut d = match &info.origin {
        Some(o) => format!("thin snapshot of {o}, {size}"),
        None => format!("thin volume, {size}"),
    };
    if info.read_only {
        d.push_str(", read-only");
    }
    d
}

/// A reply's error text: the pool's own message, which names what is wrong.
fn msg(e: impl std::fmt::Display) -> String {
    e.to_string()
}

impl Daemon {
    /// Starts serving `info` over NBD (named devices with a size only).
    fn export(&self, st: &mut State, info: &VolumeInfo) {
        let Some(name) = info.name.clone() else {
            info!(
                "thin device {} has no name and is not exported (name it with `uthin adopt`)",
                info.dev_id.0
            );
            return;
        };
        if info.missing || info.size.is_none() {
            warn!("volume `{name}` has no device in the metadata and is not exported");
            return;
        }
        let volume = match self.volumes.volume_of(info) {
            Ok(v) => Arc::new(v),
            Err(e) => {
                error!("volume `{name}` cannot be served: {e}");
                return;
            }
        };
        let export = match self
            .exports
            .add(&name, Arc::clone(&volume), &description(info))
        {
            Ok(h) => Some(h),
            Err(e) => {
                error!("volume `{name}` cannot be exported over NBD: {e}");
                None
            }
        };
        st.served.insert(
            info.dev_id,
            Served {
                name,
                volume,
                export,
                retired: Vec::new(),
                vhost: None,
            },
        );
    }

    /// Runs one control request.
    async fn handle(&self, req: Request) -> Response {
        let mut st = self.state.lock().await;
        if st.stopping {
            return Response::error("the server is stopping");
        }
        match self.execute(&mut st, req).await {
            Ok(reply) => Response::ok(reply),
            Err(e) => Response::error(e),
        }
    }

    async fn execute(&self, st: &mut State, req: Request) -> Result<Reply, String> {
        let vp = &self.volumes;
        match req {
            Request::Create { name, size } => {
                let info = vp.create_volume(&name, size).await.map_err(msg)?;
                self.export(st, &info);
                info!("created volume `{name}` ({})", format_size(size));
                Ok(Reply::Volume { volume: info })
            }
            Request::Snapshot {
                origin,
                name,
                read_only,
            } => {
                let info = vp.snapshot(&origin, &name, read_only).await.map_err(msg)?;
                self.export(st, &info);
                info!("created snapshot `{name}` of `{origin}`");
                Ok(Reply::Volume { volume: info })
            }
            Request::Delete { name } => {
                self.delete(st, &name).await?;
                Ok(Reply::Done)
            }
            Request::Rename { old, new } => {
                let (o, n) = (old.clone(), new.clone());
                vp.exclusive(Drain::None, move |p| p.rename(&o, &n))
                    .await
                    .map_err(msg)?;
                if let Some(dev) = st.by_name(&old)
                    && let Some(s) = st.served.get_mut(&dev)
                {
                    s.name = new.clone();
                    if let Some(h) = s.export.take() {
                        self.exports.remove(h.name());
                        s.retired.push(h);
                    }
                    s.retired.retain(|h| h.connections() > 0);
                    let info = vp.pool().volume(&new).map_err(msg)?;
                    match self
                        .exports
                        .add(&new, Arc::clone(&s.volume), &description(&info))
                    {
                        Ok(h) => s.export = Some(h),
                        Err(e) => error!("volume `{new}` cannot be exported over NBD: {e}"),
                    }
                }
                info!("renamed volume `{old}` to `{new}`");
                Ok(Reply::Done)
            }
            Request::Adopt { dev_id, name, size } => {
                let n = name.clone();
                let info = vp
                    .exclusive(Drain::None, move |p| p.adopt(DevId(dev_id), &n, size))
                    .await
                    .map_err(msg)?;
                self.export(st, &info);
                Ok(Reply::Volume { volume: info })
            }
            Request::List => self.blocking(list_reply).await,
            Request::Status => {
                self.blocking(|p| {
                    Ok(Reply::Status {
                        status: p.status().map_err(msg)?,
                    })
                })
                .await
            }
            Request::Grow {
                data_size,
                metadata_size,
            } => {
                if data_size.is_none() && metadata_size.is_none() {
                    return Err(
                        "pool grow needs --data-size SIZE and/or --metadata-size SIZE".into(),
                    );
                }
                if let Some(size) = data_size {
                    vp.grow_data(size).await.map_err(msg)?;
                }
                if let Some(size) = metadata_size {
                    vp.grow_metadata(size).await.map_err(msg)?;
                }
                info!("pool grown");
                self.blocking(|p| {
                    Ok(Reply::Status {
                        status: p.status().map_err(msg)?,
                    })
                })
                .await
            }
            Request::Check => {
                vp.commit().await.map_err(msg)?;
                self.blocking(|p| {
                    let report = crate::tools::check::check_live(p).map_err(msg)?;
                    Ok(Reply::Check {
                        clean: report.is_clean(),
                        text: report.to_text(),
                        json: report.to_json(),
                    })
                })
                .await
            }
            Request::Dump => {
                vp.commit().await.map_err(msg)?;
                self.blocking(|p| {
                    Ok(Reply::Text {
                        text: crate::tools::dump::dump_xml(p).map_err(msg)?,
                    })
                })
                .await
            }
            Request::Delta { left, right } => {
                self.blocking(move |p| {
                    let l = crate::cli::resolve_volume(p, &left).map_err(msg)?;
                    let r = crate::cli::resolve_volume(p, &right).map_err(msg)?;
                    Ok(Reply::Text {
                        text: crate::tools::delta::delta_xml(p, l, r).map_err(msg)?,
                    })
                })
                .await
            }
            Request::VhostAdd {
                name,
                socket,
                num_queues,
            } => {
                self.vhost_add(st, &name, &socket, num_queues).await?;
                Ok(Reply::Done)
            }
            Request::VhostRemove { name } => {
                let served = st
                    .by_name(&name)
                    .and_then(|d| st.served.get_mut(&d))
                    .ok_or_else(|| format!("no volume named `{name}` is served"))?;
                let v = served
                    .vhost
                    .take()
                    .ok_or_else(|| format!("volume `{name}` is not served over vhost-user"))?;
                let socket = v.socket.clone();
                tokio::task::spawn_blocking(move || v.server.stop())
                    .await
                    .map_err(msg)?
                    .map_err(msg)?;
                info!(
                    "stopped serving `{name}` over vhost-user at {}",
                    socket.display()
                );
                Ok(Reply::Done)
            }
            Request::VhostList => {
                let mut sockets: Vec<VhostEntry> = st
                    .served
                    .values()
                    .filter_map(|s| {
                        s.vhost.as_ref().map(|v| VhostEntry {
                            name: s.name.clone(),
                            socket: v.socket.clone(),
                            num_queues: v.num_queues,
                        })
                    })
                    .collect();
                sockets.sort_by(|a, b| a.name.cmp(&b.name));
                Ok(Reply::Vhost { sockets })
            }
        }
    }

    /// Runs `f` on the pool under its read lock, on the blocking pool (it may walk trees).
    async fn blocking<F>(&self, f: F) -> Result<Reply, String>
    where
        F: FnOnce(&Pool) -> Result<Reply, String> + Send + 'static,
    {
        let vp = self.volumes.clone();
        tokio::task::spawn_blocking(move || f(&vp.pool()))
            .await
            .map_err(msg)?
    }

    /// Deletes a volume nobody uses; refuses (and changes nothing) if a client uses it.
    async fn delete(&self, st: &mut State, name: &str) -> Result<(), String> {
        let dev = st.by_name(name);
        if let Some(s) = dev.and_then(|d| st.served.get(&d)) {
            if let Some(v) = &s.vhost {
                return Err(format!(
                    "volume `{name}` is served over vhost-user at {}: remove that first \
                     (`uthin vhost remove {name}`)",
                    v.socket.display()
                ));
            }
            let old = s.retired.iter().map(|h| h.connections()).sum::<usize>();
            if old > 0 {
                return Err(busy(name, old));
            }
        }
        // Stop offering the export, atomically with respect to clients connecting to it.
        let removed = match self.exports.remove_if_idle(name) {
            Ok(h) => Some(h),
            Err(ExportError::Busy { connections, .. }) => return Err(busy(name, connections)),
            Err(ExportError::NotFound(_)) => None,
            Err(e) => return Err(e.to_string()),
        };
        if let Err(e) = self.volumes.delete_volume(name).await {
            // Offer it again: nothing was deleted.
            if let Some(h) = removed
                && let Some(s) = dev.and_then(|d| st.served.get_mut(&d))
            {
                let desc = self
                    .volumes
                    .pool()
                    .volume(name)
                    .map(|i| description(&i))
                    .unwrap_or_default();
                s.export = self
                    .exports
                    .add(h.name(), Arc::clone(h.device()), &desc)
                    .ok();
            }
            return Err(e.to_string());
        }
        if let Some(d) = dev {
            st.served.remove(&d);
        }
        info!("deleted volume `{name}`");
        Ok(())
    }

    async fn vhost_add(
        &self,
        st: &mut State,
        name: &str,
        socket: &Path,
        num_queues: Option<u16>,
    ) -> Result<(), String> {
        let served = st
            .by_name(name)
            .and_then(|d| st.served.get_mut(&d))
            .ok_or_else(|| format!("no volume named `{name}` is served"))?;
        if let Some(v) = &served.vhost {
            return Err(format!(
                "volume `{name}` is already served over vhost-user at {}",
                v.socket.display()
            ));
        }
        check_socket_path(socket)?;
        let num_queues = num_queues.unwrap_or(self.num_queues);
        let cfg = VhostUserBlkConfig::new(name)
            .with_queues(num_queues)
            .with_dispatch(Dispatch::QueueThread(Some(self.runtime.clone())));
        let server = VhostUserBlkServer::start(Arc::clone(&served.volume), socket, cfg)
            .map_err(|e| e.to_string())?;
        info!(
            "serving `{name}` over vhost-user-blk at {} ({num_queues} queues)",
            socket.display()
        );
        served.vhost = Some(VhostServed {
            server,
            socket: socket.to_path_buf(),
            num_queues,
        });
        Ok(())
    }

    async fn control_loop(
        self: Arc<Self>,
        listener: tokio::net::UnixListener,
        mut stop: watch::Receiver<bool>,
    ) {
        let slots = Arc::new(Semaphore::new(MAX_CONTROL_CONNECTIONS));
        loop {
            let accepted = tokio::select! {
                _ = stop.wait_for(|s| *s) => break,
                a = listener.accept() => a,
            };
            let stream = match accepted {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!("control socket: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                let mut stream = stream;
                let _ = stream
                    .write_all(
                        &Response::error("too many control connections; try again").to_line(),
                    )
                    .await;
                continue;
            };
            let me = Arc::clone(&self);
            tokio::spawn(async move {
                me.control_connection(stream).await;
                drop(slot);
            });
        }
    }

    async fn control_connection(&self, stream: tokio::net::UnixStream) {
        let (read, mut write) = stream.into_split();
        let mut read = tokio::io::BufReader::new(read);
        let mut line = Vec::new();
        loop {
            let got = tokio::time::timeout(
                CONTROL_IDLE,
                control::read_line_bounded(&mut read, &mut line, control::MAX_REQUEST),
            )
            .await;
            let (response, last) = match got {
                Err(_) | Ok(Err(_)) | Ok(Ok(LineRead::Eof)) => return,
                Ok(Ok(LineRead::TooLong)) => (
                    Response::error(format!(
                        "malformed control message: longer than {} bytes",
                        control::MAX_REQUEST
                    )),
                    true,
                ),
                Ok(Ok(LineRead::Line)) => match control::parse_request(&line) {
                    Ok(req) => {
                        tracing::debug!("control request: {req:?}");
                        (self.handle(req).await, false)
                    }
                    Err(e) => {
                        warn!("control socket: {e}");
                        (Response::error(e), false)
                    }
                },
            };
            if write.write_all(&response.to_line()).await.is_err() || last {
                return;
            }
        }
    }

    async fn log_ready(&self, bound: &[ListenAddr], control: &Path) {
        let st = self.state.lock().await;
        let mut names: Vec<&str> = st.served.values().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        let listen: Vec<String> = bound.iter().map(|a| a.to_string()).collect();
        info!(
            "serving pool {}: {} volume(s) [{}]; NBD on {}; control socket {}",
            self.dir.display(),
            names.len(),
            names.join(", "),
            listen.join(", "),
            control.display()
        );
        let example = names.first().copied().unwrap_or(DEFAULT_VOLUME);
        for addr in bound {
            let uri = nbd_uri(addr, example);
            info!("connect: qemu-img info {uri}");
            info!("connect: nbdinfo {uri}");
            info!(
                "connect: mkdir -p /tmp/{example} && nbdfuse /tmp/{example} {uri}   (the disk is /tmp/{example}/nbd)"
            );
            info!(
                "connect: qemu-system-x86_64 ... -drive file={uri},format=raw,if=virtio,cache=none"
            );
        }
        info!(
            "connect: vhost-user: uthin --pool {} vhost add {example} /tmp/{example}.sock, then \
             qemu-system-x86_64 ... -object memory-backend-memfd,id=mem,size=2G,share=on \
             -machine memory-backend=mem -chardev socket,id=vu0,path=/tmp/{example}.sock,reconnect=1 \
             -device vhost-user-blk-pci,chardev=vu0",
            self.dir.display()
        );
        for s in st.served.values() {
            if let Some(v) = &s.vhost {
                info!("vhost-user-blk: `{}` at {}", s.name, v.socket.display());
            }
        }
        info!(
            "ready (pid {}); stop with SIGTERM or Ctrl-C",
            std::process::id()
        );
    }
}

fn busy(name: &str, connections: usize) -> String {
    format!(
        "volume `{name}` is in use by {connections} NBD connection(s): disconnect them first \
         (deleting a volume in use is refused, not deferred)"
    )
}

/// Refuses a vhost-user socket path that would replace something that is not a stale socket.
fn check_socket_path(path: &Path) -> Result<(), String> {
    use std::os::unix::fs::FileTypeExt;
    if !path.is_absolute() {
        return Err(format!(
            "vhost-user socket path {} must be absolute",
            path.display()
        ));
    }
    match std::fs::symlink_metadata(path) {
        Err(_) => Ok(()),
        Ok(m) if !m.file_type().is_socket() => Err(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        )),
        Ok(_) => match std::os::unix::net::UnixStream::connect(path) {
            Ok(_) => Err(format!(
                "{} is in use: another server listens on it",
                path.display()
            )),
            Err(_) => Ok(()),
        },
    }
}

/// The NBD URI of `export` at a bound address (the default port left out, as users write it).
pub fn nbd_uri(addr: &ListenAddr, export: &str) -> String {
    match addr {
        ListenAddr::Tcp(a) => match a.rsplit_once(':') {
            Some((host, NBD_DEFAULT_PORT)) => format!("nbd://{host}/{export}"),
            _ => format!("nbd://{a}/{export}"),
        },
        ListenAddr::Unix(p) => format!("nbd+unix:///{export}?socket={}", p.display()),
    }
}

/// `list`'s answer: every device with its usage (also what the command line computes offline).
pub(crate) fn list_reply(p: &Pool) -> Result<Reply, String> {
    let mut volumes = Vec::new();
    for v in p.list().map_err(msg)? {
        let usage = if v.missing {
            None
        } else {
            Some(p.usage(v.dev_id).map_err(msg)?)
        };
        volumes.push(ListEntry { volume: v, usage });
    }
    Ok(Reply::List {
        block_size: p.data_block_size(),
        volumes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_leave_the_default_port_out() {
        assert_eq!(
            nbd_uri(&ListenAddr::Tcp("127.0.0.1:10809".into()), "vol0"),
            "nbd://127.0.0.1/vol0"
        );
        assert_eq!(
            nbd_uri(&ListenAddr::Tcp("[::1]:10900".into()), "v"),
            "nbd://[::1]:10900/v"
        );
        assert_eq!(
            nbd_uri(&ListenAddr::Unix("/run/u.sock".into()), "v"),
            "nbd+unix:///v?socket=/run/u.sock"
        );
    }

    #[test]
    fn socket_paths_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        assert!(check_socket_path(Path::new("rel.sock")).is_err());
        let file = dir.path().join("file");
        std::fs::write(&file, b"x").unwrap();
        assert!(
            check_socket_path(&file)
                .unwrap_err()
                .contains("not a socket")
        );
        let live = dir.path().join("live.sock");
        let _l = std::os::unix::net::UnixListener::bind(&live).unwrap();
        assert!(check_socket_path(&live).unwrap_err().contains("in use"));
        assert!(check_socket_path(&dir.path().join("new.sock")).is_ok());
    }

    #[test]
    fn default_pool_only_in_an_empty_place() {
        let dir = tempfile::tempdir().unwrap();
        assert!(dir_missing_or_empty(&dir.path().join("missing")));
        assert!(dir_missing_or_empty(dir.path()));
        std::fs::write(dir.path().join("x"), b"").unwrap();
        assert!(!dir_missing_or_empty(dir.path()));
    }
}
