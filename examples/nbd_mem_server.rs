//! The NBD server over in-memory exports (`MemDevice`): a stand-in for `uthin serve` that
//! measures the protocol layer alone (scripts/bench-nbd.sh) and lets real clients be tried
//! against it by hand.
//!
//! ```text
//! cargo run --release --example nbd_mem_server -- \
//!     --listen 127.0.0.1:10809 --export vol0=4G --export ro=64M,ro --block-size 64K
//! ```
//! Prints `listening on ADDR` for every listener once bound (port 0 picks a free port), then
//! serves until SIGINT/SIGTERM, and shuts down gracefully.

use std::sync::Arc;

use anyhow::{Context, Result, bail};
use clap::Parser;
use tokio::signal::unix::{SignalKind, signal};
use uthin::device::mem::MemDevice;
use uthin::nbd::{Exports, ListenAddr, Listener, Server};

#[derive(Parser)]
#[command(about = "Serve in-memory block devices over NBD")]
struct Args {
    /// Where to listen: HOST:PORT or unix:PATH (repeatable).
    #[arg(long = "listen", default_value = "127.0.0.1:10809")]
    listen: Vec<String>,
    /// An export: NAME=SIZE[,ro] (repeatable). SIZE takes K, M, G, T suffixes.
    #[arg(long = "export", required = true)]
    exports: Vec<String>,
    /// Allocation block size of the devices.
    #[arg(long, default_value = "64K")]
    block_size: String,
    /// Export served to clients that ask for the empty name.
    #[arg(long)]
    default: Option<String>,
    /// Worker threads of the runtime (default: one per CPU).
    #[arg(long)]
    threads: Option<usize>,
}

fn parse_size(s: &str) -> Result<u64> {
    let s = s.trim();
    let (digits, shift) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                'T' => 40,
                _ => bail!("unknown size suffix in {s:?}"),
            };
            (&s[..i], shift)
        }
        _ => (s, 0),
    };
    let n: u64 = digits.parse().with_context(|| format!("bad size {s:?}"))?;
    n.checked_mul(1 << shift)
        .with_context(|| format!("size {s:?} is too large"))
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    if let Some(t) = args.threads {
        rt.worker_threads(t);
    }
    rt.enable_all().build()?.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let block_size = u32::try_from(parse_size(&args.block_size)?)
        .ok()
        .filter(|b| b.is_power_of_two())
        .context("--block-size must be a power of two below 4G")?;
    let exports = Arc::new(Exports::new());
    for spec in &args.exports {
        let (name, rest) = spec
            .split_once('=')
            .with_context(|| format!("--export {spec:?}: expected NAME=SIZE[,ro]"))?;
        let (size, read_only) = match rest.strip_suffix(",ro") {
            Some(size) => (size, true),
            None => (rest, false),
        };
        let size = parse_size(size)?;
        let description = format!("in-memory device, {size} bytes");
        exports.add(
            name,
            Arc::new(MemDevice::new(size, block_size, read_only)),
            &description,
        )?;
    }
    exports.set_default(args.default.as_deref())?;
    let server = Server::new(Arc::clone(&exports));
    let mut listeners = Vec::new();
    for l in &args.listen {
        let addr: ListenAddr = l.parse()?;
        let listener = Listener::bind(&addr)
            .await
            .with_context(|| format!("cannot listen on {addr}"))?;
        println!("listening on {}", listener.local_addr());
        listeners.push(listener);
    }
    let stop = server.shutdown_handle();
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        stop.shutdown();
    });
    server.serve(listeners).await;
    Ok(())
}
