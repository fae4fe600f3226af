//! The `uthin` command line: argument parsing (clap), pool selection, output (human or
//! `--json`) and exit codes (0 ok, 1 error, 2 usage).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use serde_json::json;

use crate::pool::size::{format_size, parse_size};
use crate::pool::{CreateOptions, Pool, PoolError, PoolStatus, VolumeInfo};
use crate::units::DevId;

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
    /// Serve volumes over NBD and vhost-user-blk.
    Serve {
        /// Anything; this build has no server.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

/// `uthin check` options.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// Never show a progress bar.
    #[arg(long)]
    pub quiet: bool,
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
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Other(String),
}

fn print_json(value: &serde_json::Value) {
    let mut out = std::io::stdout().lock();
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

/// Runs a parsed command; returns the exit code.
pub fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let dir = pool_dir(cli.pool);
    let json = cli.json;
    match cli.command {
        Command::Pool(PoolCommand::Create {
            data_size,
            block_size,
            metadata_size,
            force,
        }) => {
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
        }
        Command::Pool(PoolCommand::Status) => {
            let pool = Pool::open(&dir)?;
            let st = pool.status()?;
            if json {
                print_json(&status_json(&dir, &st));
            } else {
                print_status(&dir, &st);
            }
        }
        Command::Pool(PoolCommand::Grow {
            data_size,
            metadata_size,
        }) => {
            if data_size.is_none() && metadata_size.is_none() {
                return Err(CliError::Other(
                    "pool grow needs --data-size SIZE and/or --metadata-size SIZE".into(),
                ));
            }
            let mut pool = Pool::open(&dir)?;
            if let Some(size) = data_size {
                pool.grow_data(size)?;
            }
            if let Some(size) = metadata_size {
                pool.grow_metadata(size)?;
            }
            let st = pool.status()?;
            if json {
                print_json(&status_json(&dir, &st));
            } else {
                println!(
                    "pool {}: {} of data, {} of metadata",
                    dir.display(),
                    format_size(st.data_total_bytes()),
                    format_size(st.metadata_total_blocks * 4096)
                );
            }
        }
        Command::Create { name, size } => {
            let mut pool = Pool::open(&dir)?;
            let v = pool.create_volume(&name, size)?;
            report_volume(json, "created", &v);
        }
        Command::Snapshot {
            origin,
            name,
            read_only,
        } => {
            let mut pool = Pool::open(&dir)?;
            let v = pool.snapshot(&origin, &name, read_only)?;
            report_volume(json, "created snapshot", &v);
        }
        Command::Delete { name } => {
            let mut pool = Pool::open(&dir)?;
            let c = pool.delete_volume(&name)?;
            // Nothing else runs on this pool: give the freed space back to the host now.
            pool.punch_freed(&c.freed)?;
            if json {
                print_json(&json!({ "deleted": name }));
            } else {
                println!("deleted {name}");
            }
        }
        Command::Rename { old, new } => {
            let mut pool = Pool::open(&dir)?;
            pool.rename(&old, &new)?;
            if json {
                print_json(&json!({ "renamed": old, "to": new }));
            } else {
                println!("renamed {old} to {new}");
            }
        }
        Command::Adopt { dev_id, name, size } => {
            let mut pool = Pool::open(&dir)?;
            let v = pool.adopt(DevId(dev_id), &name, size)?;
            report_volume(json, "adopted", &v);
        }
        Command::List => {
            let pool = Pool::open(&dir)?;
            let vols = pool.list()?;
            let mut rows = Vec::new();
            for v in &vols {
                let usage = if v.missing {
                    None
                } else {
                    Some(pool.usage(v.dev_id)?)
                };
                rows.push((v, usage));
            }
            if json {
                let bs = pool.data_block_size();
                let items: Vec<_> = rows
                    .iter()
                    .map(|(v, u)| {
                        let mut o = serde_json::to_value(v).unwrap_or_default();
                        if let (Some(u), Some(map)) = (u, o.as_object_mut()) {
                            map.insert("exclusive_bytes".into(), json!(u.exclusive_blocks * bs));
                            map.insert("shared_bytes".into(), json!(u.shared_blocks * bs));
                        }
                        o
                    })
                    .collect();
                print_json(&json!(items));
            } else {
                print_list(&rows, pool.data_block_size());
            }
        }
        Command::Check(args) => {
            let report = crate::tools::check::check_pool(&dir, !args.quiet)?;
            if json {
                print_json(&report.to_json());
            } else {
                print!("{}", report.to_text());
            }
            if !report.is_clean() {
                return Ok(ExitCode::from(EXIT_ERROR));
            }
        }
        Command::Delta { left, right } => {
            let pool = Pool::open(&dir)?;
            let l = resolve_volume(&pool, &left)?;
            let r = resolve_volume(&pool, &right)?;
            print!("{}", crate::tools::delta::delta_xml(&pool, l, r)?);
        }
        Command::Dump { output } => {
            let pool = Pool::open(&dir)?;
            let xml = crate::tools::dump::dump_xml(&pool)?;
            match output {
                Some(path) => std::fs::write(&path, xml).map_err(|e| {
                    CliError::Other(format!("cannot write {}: {e}", path.display()))
                })?,
                None => print!("{xml}"),
            }
        }
        Command::Restore {
            input,
            metadata_size,
            force,
        } => {
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
        }
        Command::Serve { .. } => {
            return Err(CliError::Other(
                "`serve` is not available in this build (the NBD/vhost servers are not linked in)"
                    .into(),
            ));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A volume given by name, or by device id for devices without one.
fn resolve_volume(pool: &Pool, arg: &str) -> Result<DevId, PoolError> {
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

fn print_list(rows: &[(&VolumeInfo, Option<crate::pool::Usage>)], block_size: u64) {
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
    for (v, u) in rows {
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
    let mut widths = [0usize; 8];
    for row in &table {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in &table {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}
