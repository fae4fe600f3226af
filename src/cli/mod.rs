//! The `uthin` command line: argument parsing (clap), pool selection, output (human or
//! `--json`) and exit codes (0 ok, 1 error, 2 usage).
//!
//! Commands that read or change a pool become a [`Request`]. While `uthin serve` owns the pool,
//! the request goes to its control socket and the server acts on the live pool; otherwise the
//! command opens the pool itself. Either way the answer is a [`Reply`] and one renderer prints
//! it, so a command's output and exit code do not depend on where it ran.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgAction, Args, Parser, Subcommand};
use serde_json::json;

use crate::daemon::control::{self, ListEntry, Reply, Request, VhostEntry};
use crate::daemon::{DEFAULT_NUM_QUEUES, ServeOptions};
use crate::data::CacheMode;
use crate::nbd::ListenAddr;
use crate::pool::size::{format_size, parse_size};
use crate::pool::{CreateOptions, Pool, PoolError, PoolStatus, VolumeInfo};
use crate::units::DevId;
use crate::volume::{DEFAULT_CACHE_ENTRIES, MAX_CACHE_ENTRIES, MIN_CACHE_ENTRIES};

/// Exit code of a failed command.
pub const EXIT_ERROR: u8 = 1;
/// Exit code of a usage error (clap uses it too).
pub const EXIT_USAGE: u8 = 2;

/// A userspace thin-provisioning pool in dm-thin's on-disk format.
#[derive(Debug, Parser)]
#[command(name = "uthin", version, about, long_about = None)]
pub struct Cli {
    /// Pool directory (default: $UTHIN_POOL, then ./uthin-pool).
    #[arg(long, global = true, value_name = "DIR")]
    pub pool: Option<PathBuf>,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output on stderr (-v, -vv); RUST_LOG overrides it.
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

fn size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pool-wide commands: create, status, grow.
    #[command(subcommand)]
    Pool(PoolCommand),
    /// Create a thin volume.
    Create {
        /// Its name.
        name: String,
        /// Its virtual size (10G, 512M, ...).
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
    /// Take a snapshot of a volume (O(1), shares every block).
    Snapshot {
        /// The volume to snapshot.
        origin: String,
        /// The snapshot's name.
        name: String,
        /// Make the snapshot read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Delete a volume (its snapshots are untouched).
    Delete {
        /// The volume.
        name: String,
    },
    /// Rename a volume.
    Rename {
        /// Current name.
        old: String,
        /// New name.
        new: String,
    },
    /// List volumes, and devices that have no name.
    List,
    /// Give a name and size to a device that has none (from thin_restore, LVM or Docker).
    Adopt {
        /// dm-thin device id.
        dev_id: u32,
        /// The name to give it.
        name: String,
        /// Its virtual size.
        #[arg(long, value_parser = size_arg)]
        size: u64,
    },
    /// Check the metadata and volumes.json: every tree, every reference count.
    Check(CheckArgs),
    /// Rebuild damaged metadata from every device and mapping that can still be read (the
    /// damaged file is kept beside it); exit 1 when something was lost.
    Repair(RepairArgs),
    /// Show how two volumes differ (thin_delta's XML); a volume is a name or a device id.
    Delta {
        /// Left volume.
        left: String,
        /// Right volume.
        right: String,
    },
    /// Print the metadata as thin_dump's XML.
    Dump {
        /// Write to this file instead of stdout.
        #[arg(short, long, value_name = "FILE")]
        output: Option<PathBuf>,
    },
    /// Create a pool from thin_dump's XML (as thin_restore does); devices get no names.
    Restore {
        /// The XML file.
        #[arg(short, long, value_name = "FILE")]
        input: PathBuf,
        /// Metadata size (default: thin_metadata_size's rule).
        #[arg(long, value_parser = size_arg)]
        metadata_size: Option<u64>,
        /// Destroy an existing pool in the directory.
        #[arg(long)]
        force: bool,
    },
    /// Serve every volume over NBD (and some over vhost-user-blk) until SIGTERM/SIGINT.
    /// Creates ./uthin-pool with a 10G volume `vol0` when there is no pool yet.
    Serve(ServeArgs),
    /// vhost-user-blk sockets of a running `uthin serve`.
    #[command(subcommand)]
    Vhost(VhostCommand),
}

fn nbd_addr_arg(s: &str) -> Result<ListenAddr, String> {
    s.parse::<ListenAddr>().map_err(|e| e.to_string())
}

fn socket_arg(s: &str) -> Result<PathBuf, String> {
    if s.is_empty() {
        return Err("the socket path is empty".into());
    }
    std::path::absolute(s).map_err(|e| format!("{s}: {e}"))
}

fn vhost_arg(s: &str) -> Result<(String, PathBuf), String> {
    match s.split_once('=') {
        Some((name, socket)) if !name.is_empty() => Ok((name.to_string(), socket_arg(socket)?)),
        _ => Err(format!("expected NAME=SOCKET, not {s:?}")),
    }
}

/// `uthin serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Serve NBD on ADDR: HOST:PORT or unix:PATH (repeatable; default 127.0.0.1:10809;
    /// 0.0.0.0:10809 serves every interface).
    #[arg(long = "nbd", value_name = "ADDR", value_parser = nbd_addr_arg)]
    pub nbd: Vec<ListenAddr>,
    /// Serve volume NAME over vhost-user-blk on the Unix socket SOCKET (repeatable).
    #[arg(long = "vhost-user", value_name = "NAME=SOCKET", value_parser = vhost_arg)]
    pub vhost_user: Vec<(String, PathBuf)>,
    /// Request queues of each vhost-user-blk socket (1-64; one thread each).
    #[arg(long, default_value_t = DEFAULT_NUM_QUEUES,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    pub num_queues: u16,
    /// How the data file uses the host's page cache: `writeback` (every transfer through it,
    /// like qemu-nbd's default) or `direct` (every transfer bypasses it: O_DIRECT through
    /// io_uring, like QEMU's cache.direct=on,aio=io_uring; see docs/io-engines.md).
    #[arg(long, value_enum, default_value_t = CacheArg::Writeback)]
    pub cache: CacheArg,
    /// Entries of the mapping cache shared by every volume (one per data block of a volume;
    /// at most about 59 bytes each). The default, 262144, covers 16 GiB of 64 KiB blocks in
    /// about 15 MiB; give more to volumes written at random over a larger range, as
    /// qcow2's l2-cache-size (docs/volume.md, "Mapping cache").
    #[arg(long, value_name = "N", default_value_t = DEFAULT_CACHE_ENTRIES as u64,
          value_parser = clap::value_parser!(u64).range(MIN_CACHE_ENTRIES as u64..=MAX_CACHE_ENTRIES as u64))]
    pub mapping_cache_entries: u64,
    /// Worker threads for the NBD connections, the commits and the control socket (1-256;
    /// default one per core). Fewer cost less CPU per request at moderate rates, where every
    /// request otherwise wakes several threads; more serve more at once (docs/nbd.md,
    /// "Worker threads"). vhost-user-blk queues have threads of their own (--num-queues).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..=256))]
    pub threads: Option<u16>,
}

/// `uthin serve --cache` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CacheArg {
    /// Every data transfer through the page cache.
    Writeback,
    /// Every data transfer bypasses the page cache (O_DIRECT through io_uring).
    Direct,
}

impl From<CacheArg> for CacheMode {
    fn from(c: CacheArg) -> CacheMode {
        match c {
            CacheArg::Writeback => CacheMode::Writeback,
            CacheArg::Direct => CacheMode::Direct,
        }
    }
}

/// `uthin vhost ...` (talks to a running `uthin serve`).
#[derive(Debug, Subcommand)]
pub enum VhostCommand {
    /// Serve a volume over vhost-user-blk on a Unix socket.
    Add {
        /// The volume.
        name: String,
        /// The socket path.
        #[arg(value_parser = socket_arg)]
        socket: PathBuf,
        /// Request queues (default: the server's --num-queues).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        num_queues: Option<u16>,
    },
    /// Stop serving a volume over vhost-user-blk (a connected VM loses the disk after its
    /// requests in flight complete).
    Remove {
        /// The volume.
        name: String,
    },
    /// List the vhost-user-blk sockets.
    List,
}

/// `uthin check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Never show a progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// `uthin repair` options.
#[derive(Debug, Args)]
pub struct RepairArgs {
    /// Report what a repair would keep and lose; write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Data block size (64K..1G), needed only when the superblock is unreadable.
    #[arg(long, value_parser = size_arg)]
    pub data_block_size: Option<u64>,
    /// Number of data blocks, when the superblock is unreadable (default: from the data file).
    #[arg(long)]
    pub nr_data_blocks: Option<u64>,
    /// Transaction id, when the superblock is unreadable (default: volumes.json's).
    #[arg(long)]
    pub transaction_id: Option<u64>,
}

/// `uthin pool ...`.
#[derive(Debug, Subcommand)]
pub enum PoolCommand {
    /// Create a pool (refuses to overwrite one unless --force).
    Create {
        /// Data space (default 100G).
        #[arg(long, value_parser = size_arg, default_value = "100G")]
        data_size: u64,
        /// Data block size: a power of two, 64K..1G.
        #[arg(long, value_parser = size_arg, default_value = "64K")]
        block_size: u64,
        /// Metadata size (default: thin_metadata_size's rule, at least 2M).
        #[arg(long, value_parser = size_arg)]
        metadata_size: Option<u64>,
        /// Destroy an existing pool in the directory.
        #[arg(long)]
        force: bool,
    },
    /// Show usage: data and metadata used/total/free, transaction id, volumes.
    Status,
    /// Grow the data space and/or the metadata.
    Grow {
        /// New data size.
        #[arg(long, value_parser = size_arg)]
        data_size: Option<u64>,
        /// New metadata size.
        #[arg(long, value_parser = size_arg)]
        metadata_size: Option<u64>,
    },
}

/// The pool directory: `--pool`, then `$UTHIN_POOL`, then `./uthin-pool`.
pub fn pool_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os("UTHIN_POOL")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    })
    .unwrap_or_else(|| PathBuf::from("uthin-pool"))
}

/// Parses the process arguments and runs the command.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version print to stdout and succeed; real usage errors exit 2.
            let code = if e.use_stderr() { EXIT_USAGE } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let serving = matches!(cli.command, Command::Serve(_));
    let levels: &[&str] = if serving {
        &["info", "uthin=debug,info", "uthin=trace,info"]
    } else {
        &["warn", "info", "uthin=debug,info", "uthin=trace,info"]
    };
    crate::daemon::init_logging(levels[usize::from(cli.verbose).min(levels.len() - 1)]);
    let json = cli.json;
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            if json {
                println!("{}", json!({ "error": e.to_string() }));
            }
            eprintln!("uthin: {e}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}

/// Something a command can fail with: the pool's errors, and usage errors found after parsing.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// A pool error.
    #[error(transparent)]
    Pool(#[from] PoolError),
    /// `uthin serve` failed.
    #[error(transparent)]
    Serve(#[from] crate::daemon::ServeError),
    /// The control socket of a running server failed.
    #[error(transparent)]
    Control(#[from] control::ClientError),
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

/// Options of a command that the client applies itself (they never travel to a server).
#[derive(Debug, Default)]
struct Local {
    /// `check --quiet`.
    quiet: bool,
    /// `dump -o FILE`.
    output: Option<PathBuf>,
}

/// Runs a parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let dir = pool_dir(cli.pool);
    let json = cli.json;
    let mut local = Local::default();
    let request = match cli.command {
        Command::Serve(args) => {
            crate::daemon::serve(
                &dir,
                ServeOptions {
                    nbd: args.nbd,
                    vhost: args.vhost_user,
                    num_queues: args.num_queues,
                    cache: args.cache.into(),
                    // In range (the parser's bounds), so it fits usize.
                    mapping_cache_entries: args.mapping_cache_entries as usize,
                    threads: args.threads.map(usize::from),
                },
            )?;
            return Ok(ExitCode::SUCCESS);
        }
        Command::Pool(PoolCommand::Create {
            data_size,
            block_size,
            metadata_size,
            force,
        }) => {
            refuse_if_served(&dir, "pool create")?;
            let pool = Pool::create(
                &dir,
                &CreateOptions {
                    data_size,
                    block_size,
                    metadata_size,
                    force,
                },
            )?;
            let st = pool.status()?;
            if json {
                print_json(&status_json(&dir, &st));
            } else {
                println!(
                    "created pool {}: {} of data in {} blocks, {} of metadata",
                    dir.display(),
                    format_size(st.data_total_bytes()),
                    format_size(st.block_size),
                    format_size(st.metadata_total_blocks * 4096)
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Restore {
            input,
            metadata_size,
            force,
        } => {
            refuse_if_served(&dir, "restore")?;
            let text = std::fs::read_to_string(&input)
                .map_err(|e| CliError::Other(format!("cannot read {}: {e}", input.display())))?;
            let xml = crate::tools::xml::parse_xml(&text)
                .map_err(|e| CliError::Other(format!("{}: {e}", input.display())))?;
            let pool = crate::tools::restore::restore(&dir, &xml, metadata_size, force)?;
            let st = pool.status()?;
            if json {
                print_json(&status_json(&dir, &st));
            } else {
                println!(
                    "restored {} devices into {} (transaction {})",
                    st.device_count,
                    dir.display(),
                    st.transaction_id
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        Command::Repair(args) => {
            refuse_if_served(&dir, "repair")?;
            return run_repair(&dir, json, args);
        }
        Command::Pool(PoolCommand::Status) => Request::Status,
        Command::Pool(PoolCommand::Grow {
            data_size,
            metadata_size,
        }) => {
            if data_size.is_none() && metadata_size.is_none() {
                return Err(CliError::Other(
                    "pool grow needs --data-size SIZE and/or --metadata-size SIZE".into(),
                ));
            }
            Request::Grow {
                data_size,
                metadata_size,
            }
        }
        Command::Create { name, size } => Request::Create { name, size },
        Command::Snapshot {
            origin,
            name,
            read_only,
        } => Request::Snapshot {
            origin,
            name,
            read_only,
        },
        Command::Delete { name } => Request::Delete { name },
        Command::Rename { old, new } => Request::Rename { old, new },
        Command::Adopt { dev_id, name, size } => Request::Adopt { dev_id, name, size },
        Command::List => Request::List,
        Command::Check(args) => {
            local.quiet = args.quiet;
            Request::Check
        }
        Command::Delta { left, right } => Request::Delta { left, right },
        Command::Dump { output } => {
            local.output = output;
            Request::Dump
        }
        Command::Vhost(VhostCommand::Add {
            name,
            socket,
            num_queues,
        }) => Request::VhostAdd {
            name,
            socket,
            num_queues,
        },
        Command::Vhost(VhostCommand::Remove { name }) => Request::VhostRemove { name },
        Command::Vhost(VhostCommand::List) => Request::VhostList,
    };
    let reply = execute(&dir, &request, &local)?;
    render(&dir, json, &request, &local, reply)
}

/// Runs `request` on the server that owns the pool, or on the pool itself when none does.
fn execute(dir: &Path, request: &Request, local: &Local) -> Result<Reply, CliError> {
    if let Some(client) = control::Client::connect(dir)? {
        return call(client, request);
    }
    match offline(dir, request, local) {
        Err(CliError::Pool(PoolError::Locked { dir: d, pid })) => {
            // A server that is starting holds the lock before its control socket exists.
            for _ in 0..20 {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(client) = control::Client::connect(dir)? {
                    return call(client, request);
                }
            }
            Err(CliError::Pool(PoolError::Locked { dir: d, pid }))
        }
        other => other,
    }
}

fn call(mut client: control::Client, request: &Request) -> Result<Reply, CliError> {
    let response = client.call(request)?;
    match (response.ok, response.reply, response.error) {
        (true, Some(reply), _) => Ok(reply),
        (_, _, Some(error)) => Err(CliError::Other(error)),
        _ => Err(CliError::Other(
            "the server answered neither a result nor an error".into(),
        )),
    }
}

/// Fails with a clear message when `uthin serve` owns the pool in `dir`.
fn refuse_if_served(dir: &Path, what: &str) -> Result<(), CliError> {
    if control::Client::connect(dir)?.is_none() {
        return Ok(());
    }
    let pid = std::fs::read_to_string(dir.join("lock"))
        .ok()
        .and_then(|t| t.trim().parse::<u32>().ok())
        .map(|p| format!(" (process {p})"))
        .unwrap_or_default();
    Err(CliError::Other(format!(
        "pool {} is being served by `uthin serve`{pid}: `{what}` needs the pool to itself; \
         stop the server first",
        dir.display()
    )))
}

/// Runs `request` on the pool in `dir`, which no server owns.
fn offline(dir: &Path, request: &Request, local: &Local) -> Result<Reply, CliError> {
    Ok(match request {
        Request::Status => Reply::Status {
            status: Pool::open(dir)?.status()?,
        },
        Request::Grow {
            data_size,
            metadata_size,
        } => {
            let mut pool = Pool::open(dir)?;
            if let Some(size) = data_size {
                pool.grow_data(*size)?;
            }
            if let Some(size) = metadata_size {
                pool.grow_metadata(*size)?;
            }
            Reply::Status {
                status: pool.status()?,
            }
        }
        Request::Create { name, size } => Reply::Volume {
            volume: Pool::open(dir)?.create_volume(name, *size)?,
        },
        Request::Snapshot {
            origin,
            name,
            read_only,
        } => Reply::Volume {
            volume: Pool::open(dir)?.snapshot(origin, name, *read_only)?,
        },
        Request::Delete { name } => {
            let mut pool = Pool::open(dir)?;
            let c = pool.delete_volume(name)?;
            // Nothing else runs on this pool: give the freed space back to the host now.
            pool.punch_freed(&c.freed)?;
            Reply::Done
        }
        Request::Rename { old, new } => {
            Pool::open(dir)?.rename(old, new)?;
            Reply::Done
        }
        Request::Adopt { dev_id, name, size } => Reply::Volume {
            volume: Pool::open(dir)?.adopt(DevId(*dev_id), name, *size)?,
        },
        Request::List => crate::daemon::list_reply(&Pool::open(dir)?).map_err(CliError::Other)?,
        Request::Check => {
            let report = crate::tools::check::check_pool(dir, !local.quiet)?;
            Reply::Check {
                clean: report.is_clean(),
                text: report.to_text(),
                json: report.to_json(),
            }
        }
        Request::Delta { left, right } => {
            let pool = Pool::open(dir)?;
            let l = resolve_volume(&pool, left)?;
            let r = resolve_volume(&pool, right)?;
            Reply::Text {
                text: crate::tools::delta::delta_xml(&pool, l, r)?,
            }
        }
        Request::Dump => Reply::Text {
            text: crate::tools::dump::dump_xml(&Pool::open(dir)?)?,
        },
        Request::VhostAdd { .. } | Request::VhostRemove { .. } | Request::VhostList => {
            return Err(CliError::Other(format!(
                "`uthin vhost` needs a running `uthin serve` on pool {} (no server listens on {})",
                dir.display(),
                control::socket_path(dir).display()
            )));
        }
    })
}

fn unexpected(reply: &Reply) -> CliError {
    CliError::Other(format!("unexpected answer: {reply:?}"))
}

/// Prints a command's answer; the exit code is 1 for a check that found problems.
fn render(
    dir: &Path,
    json: bool,
    request: &Request,
    local: &Local,
    reply: Reply,
) -> Result<ExitCode, CliError> {
    match (request, reply) {
        (Request::Create { .. }, Reply::Volume { volume }) => {
            report_volume(json, "created", &volume)
        }
        (Request::Snapshot { .. }, Reply::Volume { volume }) => {
            report_volume(json, "created snapshot", &volume)
        }
        (Request::Adopt { .. }, Reply::Volume { volume }) => {
            report_volume(json, "adopted", &volume)
        }
        (Request::Delete { name }, Reply::Done) => {
            if json {
                print_json(&json!({ "deleted": name }));
            } else {
                println!("deleted {name}");
            }
        }
        (Request::Rename { old, new }, Reply::Done) => {
            if json {
                print_json(&json!({ "renamed": old, "to": new }));
            } else {
                println!("renamed {old} to {new}");
            }
        }
        (Request::Status, Reply::Status { status }) => {
            if json {
                print_json(&status_json(dir, &status));
            } else {
                print_status(dir, &status);
            }
        }
        (Request::Grow { .. }, Reply::Status { status }) => {
            if json {
                print_json(&status_json(dir, &status));
            } else {
                println!(
                    "pool {}: {} of data, {} of metadata",
                    dir.display(),
                    format_size(status.data_total_bytes()),
                    format_size(status.metadata_total_blocks * 4096)
                );
            }
        }
        (
            Request::List,
            Reply::List {
                block_size,
                volumes,
            },
        ) => {
            if json {
                print_json(&list_json(&volumes, block_size));
            } else {
                print_list(&volumes, block_size);
            }
        }
        (
            Request::Check,
            Reply::Check {
                clean,
                text,
                json: j,
            },
        ) => {
            if json {
                print_json(&j);
            } else {
                print!("{text}");
            }
            if !clean {
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        }
        (Request::Dump, Reply::Text { text }) => match &local.output {
            Some(path) => std::fs::write(path, text)
                .map_err(|e| CliError::Other(format!("cannot write {}: {e}", path.display())))?,
            None => print!("{text}"),
        },
        (Request::Delta { .. }, Reply::Text { text }) => print!("{text}"),
        (
            Request::VhostAdd {
                name,
                socket,
                num_queues,
            },
            Reply::Done,
        ) => {
            if json {
                print_json(
                    &json!({ "vhost_added": name, "socket": socket, "num_queues": num_queues }),
                );
            } else {
                println!("serving {name} over vhost-user-blk at {}", socket.display());
            }
        }
        (Request::VhostRemove { name }, Reply::Done) => {
            if json {
                print_json(&json!({ "vhost_removed": name }));
            } else {
                println!("stopped serving {name} over vhost-user-blk");
            }
        }
        (Request::VhostList, Reply::Vhost { sockets }) => {
            if json {
                print_json(&serde_json::to_value(&sockets).unwrap_or_default());
            } else {
                print_vhost(&sockets);
            }
        }
        (_, other) => return Err(unexpected(&other)),
    }
    Ok(ExitCode::SUCCESS)
}

/// `uthin repair`: offline only (it replaces the metadata file; the pool lock makes it refuse
/// while a server owns the pool). Exit 1 when something was lost.
fn run_repair(dir: &std::path::Path, json: bool, args: RepairArgs) -> Result<ExitCode, CliError> {
    let opts = crate::tools::repair::RepairOptions {
        dry_run: args.dry_run,
        data_block_size: args.data_block_size,
        nr_data_blocks: args.nr_data_blocks,
        transaction_id: args.transaction_id,
    };
    let report = crate::tools::repair::repair_pool(dir, &opts)?;
    if json {
        print_json(&report.to_json());
    } else {
        print!("{}", report.to_text());
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_ERROR)
    })
}

/// A volume given by name, or by device id for devices without one.
pub(crate) fn resolve_volume(pool: &Pool, arg: &str) -> Result<DevId, PoolError> {
    match pool.volume(arg) {
        Ok(v) => Ok(v.dev_id),
        Err(e) => match arg.parse::<u32>() {
            Ok(id) if pool.list()?.iter().any(|v| v.dev_id.0 == id && !v.missing) => Ok(DevId(id)),
            _ => Err(e),
        },
    }
}

fn report_volume(json: bool, verb: &str, v: &VolumeInfo) {
    if json {
        print_json(&serde_json::to_value(v).unwrap_or_default());
    } else {
        println!(
            "{verb} {} (device {}, {})",
            v.name.as_deref().unwrap_or("-"),
            v.dev_id.0,
            v.size.map(format_size).unwrap_or_else(|| "-".into())
        );
    }
}

fn status_json(dir: &std::path::Path, st: &PoolStatus) -> serde_json::Value {
    let mut v = serde_json::to_value(st).unwrap_or_default();
    if let Some(map) = v.as_object_mut() {
        map.insert("pool".into(), json!(dir.display().to_string()));
        map.insert("data_total_bytes".into(), json!(st.data_total_bytes()));
        map.insert("data_used_bytes".into(), json!(st.data_used_bytes()));
        map.insert("data_free_bytes".into(), json!(st.data_free_bytes()));
        map.insert(
            "metadata_total_bytes".into(),
            json!(st.metadata_total_blocks * 4096),
        );
        map.insert(
            "metadata_used_bytes".into(),
            json!(st.metadata_used_blocks * 4096),
        );
        map.insert(
            "metadata_free_bytes".into(),
            json!(st.metadata_free_blocks * 4096),
        );
    }
    v
}

fn pct(part: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        part as f64 * 100.0 / total as f64
    }
}

fn print_status(dir: &std::path::Path, st: &PoolStatus) {
    let m = 4096u64;
    println!("Pool:                  {}", dir.display());
    println!("Data block size:       {}", format_size(st.block_size));
    println!(
        "Data space used:       {} ({} blocks, {:.1}%)",
        format_size(st.data_used_bytes()),
        st.data_used_blocks,
        pct(st.data_used_blocks, st.data_total_blocks)
    );
    println!(
        "Data space total:      {} ({} blocks)",
        format_size(st.data_total_bytes()),
        st.data_total_blocks
    );
    println!(
        "Data space available:  {} ({} blocks)",
        format_size(st.data_free_bytes()),
        st.data_free_blocks
    );
    println!(
        "Metadata space used:   {} ({} blocks, {:.1}%)",
        format_size(st.metadata_used_blocks * m),
        st.metadata_used_blocks,
        pct(st.metadata_used_blocks, st.metadata_total_blocks)
    );
    println!(
        "Metadata space total:  {} ({} blocks)",
        format_size(st.metadata_total_blocks * m),
        st.metadata_total_blocks
    );
    println!(
        "Metadata available:    {} ({} blocks)",
        format_size(st.metadata_free_blocks * m),
        st.metadata_free_blocks
    );
    println!("Transaction id:        {}", st.transaction_id);
    println!(
        "Volumes:               {} ({} thin devices)",
        st.volume_count, st.device_count
    );
    println!("Min free space:        {}%", st.min_free_space_percent);
    if let Some(b) = st.metadata_snapshot {
        println!("Metadata snapshot:     held at block {b}");
    }
    if st.needs_check {
        println!("Needs check:           yes (run `uthin check`)");
    }
}

fn list_json(rows: &[ListEntry], block_size: u64) -> serde_json::Value {
    let items: Vec<_> = rows
        .iter()
        .map(|e| {
            let mut o = serde_json::to_value(&e.volume).unwrap_or_default();
            if let (Some(u), Some(map)) = (&e.usage, o.as_object_mut()) {
                map.insert(
                    "exclusive_bytes".into(),
                    json!(u.exclusive_blocks * block_size),
                );
                map.insert("shared_bytes".into(), json!(u.shared_blocks * block_size));
            }
            o
        })
        .collect();
    json!(items)
}

fn print_table<const N: usize>(table: &[[String; N]]) {
    let mut widths = [0usize; N];
    for row in table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn print_vhost(sockets: &[VhostEntry]) {
    let mut table = vec![["NAME".to_string(), "SOCKET".into(), "QUEUES".into()]];
    for v in sockets {
        table.push([
            v.name.clone(),
            v.socket.display().to_string(),
            v.num_queues.to_string(),
        ]);
    }
    print_table(&table);
}

fn print_list(rows: &[ListEntry], block_size: u64) {
    let mut table = vec![[
        "NAME".to_string(),
        "DEV".into(),
        "SIZE".into(),
        "MAPPED".into(),
        "EXCLUSIVE".into(),
        "SHARED".into(),
        "ORIGIN".into(),
        "RO".into(),
    ]];
    for ListEntry {
        volume: v,
        usage: u,
    } in rows
    {
        let name = match (&v.name, v.missing) {
            (Some(n), true) => format!("{n} (missing)"),
            (Some(n), false) => n.clone(),
            (None, _) => "(unnamed)".into(),
        };
        let (ex, sh) = match u {
            Some(u) => (
                format_size(u.exclusive_blocks * block_size),
                format_size(u.shared_blocks * block_size),
            ),
            None => ("-".into(), "-".into()),
        };
        table.push([
            name,
            v.dev_id.0.to_string(),
            v.size.map(format_size).unwrap_or_else(|| "-".into()),
            format_size(v.mapped_bytes),
            ex,
            sh,
            v.origin.clone().unwrap_or_else(|| "-".into()),
            if v.read_only { "ro" } else { "rw" }.into(),
        ]);
    }
    print_table(&table);
}
