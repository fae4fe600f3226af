//! The NBD server: every export a [`BlockDevice`](crate::device::BlockDevice), served over TCP
//! or a Unix socket with the fixed newstyle handshake of the NBD protocol
//! (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! # Use
//!
//! ```no_run
//! # async fn example(volume: std::sync::Arc<uthin::device::mem::MemDevice>) -> std::io::Result<()> {
//! use std::sync::Arc;
//! use uthin::nbd::{Exports, Listener, Server};
//!
//! let exports = Arc::new(Exports::new());
//! exports.add("vol0", volume, "a thin volume").expect("a new name");
//! let server = Server::new(Arc::clone(&exports));
//! let listener = Listener::bind(&"127.0.0.1:10809".parse().expect("valid address")).await?;
//! let stop = server.shutdown_handle();
//! // ... stop.shutdown() from a signal handler; exports.add/remove at any time ...
//! server.serve(vec![listener]).await;
//! // No request is in flight any more: flush and commit here.
//! # let _ = stop; Ok(())
//! # }
//! ```
//!
//! # What is served
//!
//! - Handshake: fixed newstyle only; `NBD_OPT_EXPORT_NAME`, `GO`, `INFO` (with
//!   `NBD_INFO_EXPORT`, `NAME`, `DESCRIPTION`, `BLOCK_SIZE`: minimum 512, preferred = the
//!   device's block size, maximum 32 MiB), `LIST`, `ABORT`, `STRUCTURED_REPLY`,
//!   `EXTENDED_HEADERS`, `LIST_META_CONTEXT` / `SET_META_CONTEXT` with `base:allocation`.
//!   `STARTTLS` is refused (`NBD_REP_ERR_POLICY`), unknown options get `NBD_REP_ERR_UNSUP`.
//! - Transmission: `READ` (with `OFFSET_HOLE` chunks for ranges that read as zeros when
//!   structured replies are on), `WRITE` (+FUA), `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`,
//!   `FAST_ZERO`), `CACHE`, `BLOCK_STATUS` (`REQ_ONE`), `DISC`; requests run concurrently and
//!   are answered out of order; replies queued together are written with one `writev`.
//! - Bad input never takes the server down: a malformed option gets an error reply, a bad
//!   request an error reply (EINVAL, ENOSPC, EPERM as the protocol says), and a client that
//!   breaks framing loses its own connection only.
//!
//! # Modules
//!
//! [`wire`] holds the byte layouts; `options` and `request` validate what clients send, once,
//! before anything acts on it; `handshake` and `transmission` drive a connection; [`Exports`]
//! is the live registry `uthin serve` feeds; [`Server`] accepts connections and shuts down
//! gracefully.

mod buffers;
mod exports;
mod handshake;
mod options;
mod request;
mod server;
mod transmission;
pub mod wire;

pub use exports::{ExportError, ExportHandle, Exports};
pub use request::MAX_REQUEST_LEN;
pub use server::{ListenAddr, ListenAddrError, Listener, Server, ServerConfig, ShutdownHandle};
