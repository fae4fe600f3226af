//! The control socket of `uthin serve`: `DIR/control.sock`, through which the command line
//! manages a pool that a running server owns.
//!
//! # Wire format
//!
//! A Unix stream socket, mode 0600 (owner only). The client sends requests and the server
//! answers each one in order, on the same connection; several requests may follow each other.
//! Every message is **one line of UTF-8 JSON terminated by `\n`** (JSON escapes newlines inside
//! strings, so a message never contains a raw `\n`):
//!
//! ```text
//! request  = {"op": "<operation>", <arguments>...}                  at most 1 MiB
//! response = {"ok": true,  "reply": {"kind": "<kind>", <fields>...}}
//!          | {"ok": false, "error": "<message naming what is wrong>"}
//! ```
//!
//! Operations and their arguments are the variants of [`Request`] (`snake_case`, e.g.
//! `{"op":"create","name":"vol1","size":1073741824}`); replies are the variants of [`Reply`].
//! A line that is not valid UTF-8 or JSON, names an unknown operation or lacks an argument gets
//! an error response and the connection stays usable; a request longer than 1 MiB gets an error
//! response and the connection is closed (the rest of the line cannot be told from the next
//! request; a client that reads on after the response may get `ECONNRESET` rather than the end
//! of the stream, because what it sent was not all read). The server never acts on a message
//! it could not parse whole.

use std::io::{self, BufRead, BufReader, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufRead, AsyncBufReadExt};

use crate::pool::{PoolStatus, Usage, VolumeInfo};

/// Name of the control socket inside the pool directory.
pub const SOCKET_NAME: &str = "control.sock";

/// Longest request line the server reads, in bytes (newline excluded).
pub const MAX_REQUEST: usize = 1 << 20;

/// The control socket of the pool in `dir`.
pub fn socket_path(dir: &Path) -> PathBuf {
    dir.join(SOCKET_NAME)
}

/// What the command line asks a running server to do. Each variant mirrors the offline
/// subcommand of the same name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// `uthin create NAME --size SIZE`.
    Create {
        /// Volume name.
        name: String,
        /// Virtual size in bytes.
        size: u64,
    },
    /// `uthin snapshot ORIGIN NAME [--read-only]`.
    Snapshot {
        /// The volume to snapshot.
        origin: String,
        /// The snapshot's name.
        name: String,
        /// Make the snapshot read-only.
        #[serde(default)]
        read_only: bool,
    },
    /// `uthin delete NAME`.
    Delete {
        /// Volume name.
        name: String,
    },
    /// `uthin rename OLD NEW`.
    Rename {
        /// Current name.
        old: String,
        /// New name.
        new: String,
    },
    /// `uthin adopt DEV_ID NAME --size SIZE`.
    Adopt {
        /// dm-thin device id.
        dev_id: u32,
        /// The name to give it.
        name: String,
        /// Its virtual size in bytes.
        size: u64,
    },
    /// `uthin list`.
    List,
    /// `uthin pool status`.
    Status,
    /// `uthin pool grow`.
    Grow {
        /// New data size in bytes.
        #[serde(default)]
        data_size: Option<u64>,
        /// New metadata size in bytes.
        #[serde(default)]
        metadata_size: Option<u64>,
    },
    /// `uthin check`: run by the server on the current metadata.
    Check,
    /// `uthin dump`: thin_dump's XML of the current metadata.
    Dump,
    /// `uthin delta A B`.
    Delta {
        /// Left volume (name or device id).
        left: String,
        /// Right volume (name or device id).
        right: String,
    },
    /// `uthin vhost add NAME SOCKET`: serve a volume over vhost-user-blk.
    VhostAdd {
        /// Volume name.
        name: String,
        /// Socket path (as the server process sees it: make it absolute).
        socket: PathBuf,
        /// Request queues (default: the server's `--num-queues`).
        #[serde(default)]
        num_queues: Option<u16>,
    },
    /// `uthin vhost remove NAME`.
    VhostRemove {
        /// Volume name.
        name: String,
    },
    /// `uthin vhost list`.
    VhostList,
}

/// One row of `list`: a device and, unless it is missing from the metadata, its usage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ListEntry {
    /// The device.
    pub volume: VolumeInfo,
    /// Exclusive and shared blocks (`None` for a name whose device is missing).
    pub usage: Option<Usage>,
}

/// One vhost-user-blk socket a server offers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VhostEntry {
    /// The volume served.
    pub name: String,
    /// The socket path.
    pub socket: PathBuf,
    /// Request queues offered.
    pub num_queues: u16,
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Reply {
    /// A volume was created, snapshotted or adopted.
    Volume {
        /// It, as `list` would show it.
        volume: VolumeInfo,
    },
    /// Done; nothing to report (delete, rename, vhost add/remove).
    Done,
    /// The devices of the pool.
    List {
        /// Data block size in bytes.
        block_size: u64,
        /// Every device.
        volumes: Vec<ListEntry>,
    },
    /// Pool-wide figures (status, grow).
    Status {
        /// The figures.
        status: PoolStatus,
    },
    /// A check's report, rendered by the server.
    Check {
        /// Nothing wrong.
        clean: bool,
        /// The text report.
        text: String,
        /// The JSON report.
        json: serde_json::Value,
    },
    /// Text output (dump, delta).
    Text {
        /// The text.
        text: String,
    },
    /// The vhost-user-blk sockets offered.
    Vhost {
        /// One entry per socket.
        sockets: Vec<VhostEntry>,
    },
}

/// The envelope of every answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Response {
    /// True when the request succeeded (`reply` is set), false when it failed (`error` is).
    pub ok: bool,
    /// The answer of a successful request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<Reply>,
    /// Why the request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// A success.
    pub fn ok(reply: Reply) -> Response {
        Response {
            ok: true,
            reply: Some(reply),
            error: None,
        }
    }

    /// A failure, with a message that names what is wrong.
    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            reply: None,
            error: Some(message.into()),
        }
    }

    /// The response as one protocol line (newline included).
    pub fn to_line(&self) -> Vec<u8> {
        // Serializing plain data (strings, numbers, JSON values) cannot fail.
        let mut line = serde_json::to_vec(self)
            .unwrap_or_else(|e| format!("{{\"ok\":false,\"error\":\"{e}\"}}").into_bytes());
        line.push(b'\n');
        line
    }
}

/// Parses one request line (without its newline). The error is the message to send back.
pub fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line)
        .map_err(|e| format!("malformed control message: not UTF-8 ({e})"))?;
    serde_json::from_str(text).map_err(|e| format!("malformed control message: {e}"))
}

/// How reading one line ended.
#[derive(Debug, PartialEq, Eq)]
pub enum LineRead {
    /// A whole line is in the buffer (without its newline).
    Line,
    /// The peer closed the connection (a partial last line is dropped).
    Eof,
    /// The line is longer than the limit; the connection cannot be resynchronised.
    TooLong,
}

/// Reads one `\n`-terminated line of at most `max` bytes into `line` (cleared first), without
/// ever buffering more than `max` bytes of it.
pub async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    line: &mut Vec<u8>,
    max: usize,
) -> io::Result<LineRead> {
    line.clear();
    loop {
        let buf = reader.fill_buf().await?;
        if buf.is_empty() {
            return Ok(LineRead::Eof);
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                if line.len() + i > max {
                    return Ok(LineRead::TooLong);
                }
                line.extend_from_slice(&buf[..i]);
                reader.consume(i + 1);
                return Ok(LineRead::Line);
            }
            None => {
                let n = buf.len();
                if line.len() + n > max {
                    return Ok(LineRead::TooLong);
                }
                line.extend_from_slice(buf);
                reader.consume(n);
            }
        }
    }
}

/// Binds the control socket at `path` with mode 0600, replacing a stale socket file.
///
/// The socket is bound inside a fresh owner-only directory, made 0600 there, and then renamed
/// into place, so at no moment can another user connect to it (binding at `path` directly
/// would leave it reachable, with the umask's mode, until the chmod). The caller owns the pool
/// lock, so a socket file already at `path` belongs to a server that is gone.
pub fn bind(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let private = dir.join(format!(".control.{}.tmp", std::process::id()));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new().mode(0o700).create(&private)?;
    let result = (|| {
        let tmp = private.join("sock");
        let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))?;
        std::fs::rename(&tmp, path)?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Why the command line could not talk to a server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Connecting, sending or receiving failed.
    #[error("control socket {path}: {source}")]
    Io {
        /// The socket.
        path: PathBuf,
        /// What failed.
        source: io::Error,
    },
    /// The server closed the connection without answering (it crashed or is stopping).
    #[error(
        "control socket {0}: the server closed the connection without answering (is it stopping?)"
    )]
    NoAnswer(PathBuf),
    /// The answer could not be parsed.
    #[error("control socket {path}: malformed answer from the server: {what}")]
    BadAnswer {
        /// The socket.
        path: PathBuf,
        /// What is wrong with it.
        what: String,
    },
}

/// A connection to a running server's control socket (blocking; for the command line).
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Client {
    /// Connects to the server owning the pool in `dir`. `Ok(None)` when no server runs there
    /// (no socket, or a stale one nobody listens on).
    pub fn connect(dir: &Path) -> Result<Option<Client>, ClientError> {
        let path = socket_path(dir);
        let stream = match UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
                ) =>
            {
                return Ok(None);
            }
            Err(source) => return Err(ClientError::Io { path, source }),
        };
        let writer = stream.try_clone().map_err(|source| ClientError::Io {
            path: path.clone(),
            source,
        })?;
        Ok(Some(Client {
            path,
            reader: BufReader::new(stream),
            writer,
        }))
    }

    /// Sends one request and waits for its answer.
    pub fn call(&mut self, request: &Request) -> Result<Response, ClientError> {
        let io_err = |source| ClientError::Io {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(request).map_err(|e| ClientError::BadAnswer {
            path: self.path.clone(),
            what: format!("cannot encode the request: {e}"),
        })?;
        line.push(b'\n');
        self.writer.write_all(&line).map_err(io_err)?;
        let mut answer = Vec::new();
        let n = self
            .reader
            .read_until(b'\n', &mut answer)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        if n == 0 || answer.last() != Some(&b'\n') {
            return Err(ClientError::NoAnswer(self.path.clone()));
        }
        serde_json::from_slice(&answer).map_err(|e| ClientError::BadAnswer {
            path: self.path.clone(),
            what: e.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_round_trip_and_read_as_documented() {
        let r = Request::Create {
            name: "vol1".into(),
            size: 1 << 30,
        };
        let line = serde_json::to_string(&r).unwrap();
        assert_eq!(line, r#"{"op":"create","name":"vol1","size":1073741824}"#);
        assert_eq!(parse_request(line.as_bytes()).unwrap(), r);
        assert_eq!(
            parse_request(br#"{"op":"snapshot","origin":"a","name":"b"}"#).unwrap(),
            Request::Snapshot {
                origin: "a".into(),
                name: "b".into(),
                read_only: false
            }
        );
        assert_eq!(parse_request(br#"{"op":"list"}"#).unwrap(), Request::List);
    }

    #[test]
    fn malformed_requests_are_named() {
        for (bad, needle) in [
            (&b"\xff\xfe"[..], "not UTF-8"),
            (b"not json", "malformed"),
            (br#"{"op":"explode"}"#, "unknown variant"),
            (br#"{"op":"create","name":"x"}"#, "missing field `size`"),
            (br#"{"op":"create","name":"x","size":-1}"#, "invalid value"),
            (br#"[1,2,3]"#, "malformed"),
            (b"", "malformed"),
        ] {
            let e = parse_request(bad).unwrap_err();
            assert!(e.contains(needle), "{bad:?}: {e}");
        }
    }

    #[test]
    fn responses_are_single_lines() {
        let r = Response::ok(Reply::Text {
            text: "a\nb\n".into(),
        });
        let line = r.to_line();
        assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
        assert_eq!(line.last(), Some(&b'\n'));
        let back: Response = serde_json::from_slice(&line).unwrap();
        assert_eq!(back, r);
        let e = Response::error("no volume named `x`");
        assert_eq!(
            String::from_utf8(e.to_line()).unwrap(),
            "{\"ok\":false,\"error\":\"no volume named `x`\"}\n"
        );
    }

    #[test]
    fn bounded_lines() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let data = b"short\nabcdefghij\nlast-without-newline".to_vec();
            let mut r = tokio::io::BufReader::with_capacity(4, &data[..]);
            let mut line = Vec::new();
            assert_eq!(
                read_line_bounded(&mut r, &mut line, 8).await.unwrap(),
                LineRead::Line
            );
            assert_eq!(line, b"short");
            assert_eq!(
                read_line_bounded(&mut r, &mut line, 8).await.unwrap(),
                LineRead::TooLong
            );
            let mut r = tokio::io::BufReader::with_capacity(4, &b"x"[..]);
            assert_eq!(
                read_line_bounded(&mut r, &mut line, 8).await.unwrap(),
                LineRead::Eof
            );
        });
    }

    #[test]
    fn bound_socket_is_owner_only_and_replaces_a_stale_one() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        std::fs::write(&path, b"stale").unwrap();
        let l = bind(&path).unwrap();
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o777, 0o600);
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(SOCKET_NAME)]);
        let _c = UnixStream::connect(&path).unwrap();
        drop(l);
    }
}
