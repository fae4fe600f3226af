//! NBD wire format: constants, byte layouts, and the encoders/decoders for every fixed-size
//! structure the server reads or writes (NetworkBlockDevice/nbd `doc/proto.md`).
//!
//! All integers are big-endian. Decoders here only split bytes into fields and check magic
//! numbers; what the fields *mean* (is this option well formed, is this request in range) is
//! decided once, up front, in the `options` and `request` modules next to this one.

use std::fmt;

// ---------------------------------------------------------------------------------------------
// Magic numbers
// ---------------------------------------------------------------------------------------------

/// `"NBDMAGIC"`: first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `"IHAVEOPT"`: sent by the server after [`NBD_MAGIC`] and by the client before each option.
pub const OPTS_MAGIC: u64 = 0x4948_4156_454f_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of a compact (32-bit length) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of an extended (64-bit length) transmission request.
pub const EXTENDED_REQUEST_MAGIC: u32 = 0x21e4_1c71;
/// Magic of a simple reply.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of a structured reply chunk.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
/// Magic of an extended reply chunk.
pub const EXTENDED_REPLY_MAGIC: u32 = 0x6e8a_278c;

// ---------------------------------------------------------------------------------------------
// Handshake flags
// ---------------------------------------------------------------------------------------------

/// Server handshake flag: fixed newstyle negotiation is supported.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
/// Server handshake flag: the client may ask us to omit the 124 zero bytes after
/// `NBD_OPT_EXPORT_NAME`.
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flag: the client speaks fixed newstyle.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
/// Client flag: omit the 124 zero bytes after `NBD_OPT_EXPORT_NAME`.
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// ---------------------------------------------------------------------------------------------
// Transmission flags (16 bits, per export)
// ---------------------------------------------------------------------------------------------

/// Always set.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
/// The export refuses writes.
pub const TF_READ_ONLY: u16 = 1 << 1;
/// `NBD_CMD_FLUSH` is supported.
pub const TF_SEND_FLUSH: u16 = 1 << 2;
/// `NBD_CMD_FLAG_FUA` is supported.
pub const TF_SEND_FUA: u16 = 1 << 3;
/// `NBD_CMD_TRIM` is supported.
pub const TF_SEND_TRIM: u16 = 1 << 5;
/// `NBD_CMD_WRITE_ZEROES` (and `NBD_CMD_FLAG_NO_HOLE`) is supported.
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
/// `NBD_CMD_FLAG_DF` is supported on reads (only with structured replies).
pub const TF_SEND_DF: u16 = 1 << 7;
/// A flush on one connection covers writes completed on every connection.
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
/// `NBD_CMD_CACHE` is supported.
pub const TF_SEND_CACHE: u16 = 1 << 10;
/// `NBD_CMD_FLAG_FAST_ZERO` is supported on write-zeroes.
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

// ---------------------------------------------------------------------------------------------
// Options and option replies
// ---------------------------------------------------------------------------------------------

/// `NBD_OPT_EXPORT_NAME`: choose an export and enter transmission (no reply on error).
pub const OPT_EXPORT_NAME: u32 = 1;
/// `NBD_OPT_ABORT`: the client ends the session.
pub const OPT_ABORT: u32 = 2;
/// `NBD_OPT_LIST`: list the exports.
pub const OPT_LIST: u32 = 3;
/// `NBD_OPT_STARTTLS`: upgrade to TLS (refused: uthin serves without TLS).
pub const OPT_STARTTLS: u32 = 5;
/// `NBD_OPT_INFO`: describe an export.
pub const OPT_INFO: u32 = 6;
/// `NBD_OPT_GO`: describe an export and enter transmission.
pub const OPT_GO: u32 = 7;
/// `NBD_OPT_STRUCTURED_REPLY`: use structured replies.
pub const OPT_STRUCTURED_REPLY: u32 = 8;
/// `NBD_OPT_LIST_META_CONTEXT`: list metadata contexts.
pub const OPT_LIST_META_CONTEXT: u32 = 9;
/// `NBD_OPT_SET_META_CONTEXT`: select metadata contexts for `NBD_CMD_BLOCK_STATUS`.
pub const OPT_SET_META_CONTEXT: u32 = 10;
/// `NBD_OPT_EXTENDED_HEADERS`: 64-bit request/reply headers.
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply: success, end of this option's replies.
pub const REP_ACK: u32 = 1;
/// Option reply: one export (reply to `NBD_OPT_LIST`).
pub const REP_SERVER: u32 = 2;
/// Option reply: one information record (reply to `NBD_OPT_INFO` / `NBD_OPT_GO`).
pub const REP_INFO: u32 = 3;
/// Option reply: one metadata context.
pub const REP_META_CONTEXT: u32 = 4;

/// An option error reply (bit 31 set); the payload, if any, is a human-readable message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptionError {
    /// `NBD_REP_ERR_UNSUP`: the option is unknown to this server.
    Unsupported,
    /// `NBD_REP_ERR_POLICY`: known and valid, but refused by policy.
    Policy,
    /// `NBD_REP_ERR_INVALID`: known but syntactically or semantically invalid.
    Invalid,
    /// `NBD_REP_ERR_UNKNOWN`: the named export does not exist.
    UnknownExport,
    /// `NBD_REP_ERR_SHUTDOWN`: the server is shutting down.
    Shutdown,
    /// `NBD_REP_ERR_TOO_BIG`: the request or its reply is too large.
    TooBig,
    /// `NBD_REP_ERR_EXT_HEADER_REQD`: extended headers are in use, structured replies alone
    /// cannot be selected any more.
    ExtendedHeadersRequired,
}

impl OptionError {
    /// The reply type on the wire.
    pub fn code(self) -> u32 {
        const ERR: u32 = 1 << 31;
        match self {
            OptionError::Unsupported => ERR | 1,
            OptionError::Policy => ERR | 2,
            OptionError::Invalid => ERR | 3,
            OptionError::UnknownExport => ERR | 6,
            OptionError::Shutdown => ERR | 7,
            OptionError::TooBig => ERR | 9,
            OptionError::ExtendedHeadersRequired => ERR | 10,
        }
    }
}

/// `NBD_INFO_EXPORT`: size and transmission flags.
pub const INFO_EXPORT: u16 = 0;
/// `NBD_INFO_NAME`: the canonical export name.
pub const INFO_NAME: u16 = 1;
/// `NBD_INFO_DESCRIPTION`: a human-readable description.
pub const INFO_DESCRIPTION: u16 = 2;
/// `NBD_INFO_BLOCK_SIZE`: minimum / preferred / maximum block sizes.
pub const INFO_BLOCK_SIZE: u16 = 3;

/// The longest string (export name, query, message) the protocol allows, in bytes.
pub const MAX_STRING_LEN: usize = 4096;

// ---------------------------------------------------------------------------------------------
// Commands, command flags, reply types
// ---------------------------------------------------------------------------------------------

/// `NBD_CMD_READ`.
pub const CMD_READ: u16 = 0;
/// `NBD_CMD_WRITE`.
pub const CMD_WRITE: u16 = 1;
/// `NBD_CMD_DISC`.
pub const CMD_DISC: u16 = 2;
/// `NBD_CMD_FLUSH`.
pub const CMD_FLUSH: u16 = 3;
/// `NBD_CMD_TRIM`.
pub const CMD_TRIM: u16 = 4;
/// `NBD_CMD_CACHE`.
pub const CMD_CACHE: u16 = 5;
/// `NBD_CMD_WRITE_ZEROES`.
pub const CMD_WRITE_ZEROES: u16 = 6;
/// `NBD_CMD_BLOCK_STATUS`.
pub const CMD_BLOCK_STATUS: u16 = 7;

/// `NBD_CMD_FLAG_FUA`: durable before the reply.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
/// `NBD_CMD_FLAG_NO_HOLE`: write-zeroes must leave the range allocated.
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
/// `NBD_CMD_FLAG_DF`: reply to a read with at most one content chunk.
pub const CMD_FLAG_DF: u16 = 1 << 2;
/// `NBD_CMD_FLAG_REQ_ONE`: block status with one extent only.
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
/// `NBD_CMD_FLAG_FAST_ZERO`: fail write-zeroes with ENOTSUP unless it is fast.
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;
/// `NBD_CMD_FLAG_PAYLOAD_LEN`: (extended headers) the length field is a payload length.
pub const CMD_FLAG_PAYLOAD_LEN: u16 = 1 << 5;

/// Structured reply flag: last chunk of this reply.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;

/// `NBD_REPLY_TYPE_NONE`: empty final chunk.
pub const REPLY_TYPE_NONE: u16 = 0;
/// `NBD_REPLY_TYPE_OFFSET_DATA`: offset + data.
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
/// `NBD_REPLY_TYPE_OFFSET_HOLE`: offset + length of a range that reads as zeros.
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
/// `NBD_REPLY_TYPE_BLOCK_STATUS`: context id + 32-bit extents.
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
/// `NBD_REPLY_TYPE_BLOCK_STATUS_EXT`: context id + count + 64-bit extents.
pub const REPLY_TYPE_BLOCK_STATUS_EXT: u16 = 6;
/// `NBD_REPLY_TYPE_ERROR`: error + message.
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) | 1;

/// `base:allocation` state bit: the extent is a hole (unallocated).
pub const STATE_HOLE: u32 = 1 << 0;
/// `base:allocation` state bit: the extent reads as zeros.
pub const STATE_ZERO: u32 = 1 << 1;

/// The error values NBD allows on the wire (not host errnos: the protocol fixes these numbers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NbdError {
    /// `NBD_EPERM` (1): operation not permitted (e.g. write to a read-only export).
    Perm,
    /// `NBD_EIO` (5): input/output error.
    Io,
    /// `NBD_ENOMEM` (12): cannot allocate memory.
    NoMem,
    /// `NBD_EINVAL` (22): invalid argument.
    Inval,
    /// `NBD_ENOSPC` (28): no space left (also: write beyond the end).
    NoSpc,
    /// `NBD_EOVERFLOW` (75): value too large.
    Overflow,
    /// `NBD_ENOTSUP` (95): operation not supported (fast zero refused).
    NotSup,
    /// `NBD_ESHUTDOWN` (108): the server is shutting down.
    Shutdown,
}

impl NbdError {
    /// The value sent on the wire.
    pub fn code(self) -> u32 {
        match self {
            NbdError::Perm => 1,
            NbdError::Io => 5,
            NbdError::NoMem => 12,
            NbdError::Inval => 22,
            NbdError::NoSpc => 28,
            NbdError::Overflow => 75,
            NbdError::NotSup => 95,
            NbdError::Shutdown => 108,
        }
    }

    /// Maps a host errno to the NBD error a client should see. This is the one place where
    /// device errors become protocol errors (nbdkit's `nbd_errno`, QEMU's
    /// `system_errno_to_nbd_errno`). Unknown errnos are I/O errors: they come from the
    /// storage below, never from the client's request, which was validated before.
    pub fn from_errno(errno: i32) -> NbdError {
        match errno {
            libc::EPERM | libc::EROFS => NbdError::Perm,
            libc::ENOMEM => NbdError::NoMem,
            libc::EINVAL => NbdError::Inval,
            libc::ENOSPC | libc::EDQUOT | libc::EFBIG => NbdError::NoSpc,
            libc::EOVERFLOW => NbdError::Overflow,
            libc::ENOTSUP => NbdError::NotSup,
            libc::ESHUTDOWN => NbdError::Shutdown,
            _ => NbdError::Io,
        }
    }
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = match self {
            NbdError::Perm => "EPERM",
            NbdError::Io => "EIO",
            NbdError::NoMem => "ENOMEM",
            NbdError::Inval => "EINVAL",
            NbdError::NoSpc => "ENOSPC",
            NbdError::Overflow => "EOVERFLOW",
            NbdError::NotSup => "ENOTSUP",
            NbdError::Shutdown => "ESHUTDOWN",
        };
        f.write_str(name)
    }
}

// ---------------------------------------------------------------------------------------------
// Handshake
// ---------------------------------------------------------------------------------------------

/// Length of the server greeting.
pub const GREETING_LEN: usize = 18;

/// The server greeting of newstyle negotiation.
///
/// ```text
/// [ 0.. 8)  NBD_MAGIC ("NBDMAGIC")
/// [ 8..16)  OPTS_MAGIC ("IHAVEOPT")
/// [16..18)  handshake flags (FIXED_NEWSTYLE | NO_ZEROES)
/// ```
pub fn greeting() -> [u8; GREETING_LEN] {
    let mut b = [0u8; GREETING_LEN];
    b[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    b[8..16].copy_from_slice(&OPTS_MAGIC.to_be_bytes());
    b[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    b
}

/// Length of an option request header.
pub const OPTION_HEADER_LEN: usize = 16;

/// An option request header as received.
///
/// ```text
/// [ 0.. 8)  OPTS_MAGIC
/// [ 8..12)  option code
/// [12..16)  length of the option data that follows
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    /// The option code (`NBD_OPT_*`).
    pub option: u32,
    /// Bytes of option data that follow.
    pub len: u32,
}

impl OptionHeader {
    /// Splits an option header; `None` when the magic is wrong (the stream is out of sync).
    pub fn parse(b: &[u8; OPTION_HEADER_LEN]) -> Option<OptionHeader> {
        if be_u64(&b[0..8]) != OPTS_MAGIC {
            return None;
        }
        Some(OptionHeader {
            option: be_u32(&b[8..12]),
            len: be_u32(&b[12..16]),
        })
    }
}

/// Length of an option reply header.
pub const OPTION_REPLY_HEADER_LEN: usize = 20;

/// Encodes an option reply header; `payload_len` bytes of data follow it.
///
/// ```text
/// [ 0.. 8)  OPT_REPLY_MAGIC
/// [ 8..12)  option code being answered
/// [12..16)  reply type (REP_* or an OptionError code)
/// [16..20)  length of the reply data
/// ```
pub fn option_reply_header(
    option: u32,
    reply_type: u32,
    payload_len: u32,
) -> [u8; OPTION_REPLY_HEADER_LEN] {
    let mut b = [0u8; OPTION_REPLY_HEADER_LEN];
    b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    b[8..12].copy_from_slice(&option.to_be_bytes());
    b[12..16].copy_from_slice(&reply_type.to_be_bytes());
    b[16..20].copy_from_slice(&payload_len.to_be_bytes());
    b
}

/// Encodes the reply to `NBD_OPT_EXPORT_NAME`: size, transmission flags and (unless the client
/// asked for `NO_ZEROES`) 124 bytes of zeros.
///
/// ```text
/// [ 0.. 8)  export size in bytes
/// [ 8..10)  transmission flags
/// [10..134) zeros (omitted with NBD_FLAG_C_NO_ZEROES)
/// ```
pub fn export_name_reply(size: u64, flags: u16, no_zeroes: bool) -> Vec<u8> {
    let mut b = Vec::with_capacity(134);
    b.extend_from_slice(&size.to_be_bytes());
    b.extend_from_slice(&flags.to_be_bytes());
    if !no_zeroes {
        b.resize(134, 0);
    }
    b
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_EXPORT`.
///
/// ```text
/// [ 0.. 2)  NBD_INFO_EXPORT (0)
/// [ 2..10)  export size in bytes
/// [10..12)  transmission flags
/// ```
pub fn info_export(size: u64, flags: u16) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    b[2..10].copy_from_slice(&size.to_be_bytes());
    b[10..12].copy_from_slice(&flags.to_be_bytes());
    b
}

/// Payload of `NBD_REP_INFO` / `NBD_INFO_BLOCK_SIZE`.
///
/// ```text
/// [ 0.. 2)  NBD_INFO_BLOCK_SIZE (3)
/// [ 2.. 6)  minimum block size
/// [ 6..10)  preferred block size
/// [10..14)  maximum block size
/// ```
pub fn info_block_size(min: u32, preferred: u32, max: u32) -> [u8; 14] {
    let mut b = [0u8; 14];
    b[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    b[2..6].copy_from_slice(&min.to_be_bytes());
    b[6..10].copy_from_slice(&preferred.to_be_bytes());
    b[10..14].copy_from_slice(&max.to_be_bytes());
    b
}

/// Payload of `NBD_REP_INFO` carrying a string (`NBD_INFO_NAME`, `NBD_INFO_DESCRIPTION`).
///
/// ```text
/// [0..2)  info type
/// [2..)   the string, not NUL-terminated
/// ```
pub fn info_string(info_type: u16, s: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(2 + s.len());
    b.extend_from_slice(&info_type.to_be_bytes());
    b.extend_from_slice(s.as_bytes());
    b
}

/// Payload of `NBD_REP_SERVER` (one export in the reply to `NBD_OPT_LIST`).
///
/// ```text
/// [0..4)      length N of the name
/// [4..4+N)    export name
/// [4+N..)     description (human-readable, may be empty)
/// ```
pub fn rep_server(name: &str, description: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len() + description.len());
    b.extend_from_slice(&(name.len() as u32).to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b.extend_from_slice(description.as_bytes());
    b
}

/// Payload of `NBD_REP_META_CONTEXT`.
///
/// ```text
/// [0..4)  metadata context id (0 in replies to NBD_OPT_LIST_META_CONTEXT)
/// [4..)   context name, e.g. "base:allocation"
/// ```
pub fn rep_meta_context(id: u32, name: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + name.len());
    b.extend_from_slice(&id.to_be_bytes());
    b.extend_from_slice(name.as_bytes());
    b
}

// ---------------------------------------------------------------------------------------------
// Transmission: requests
// ---------------------------------------------------------------------------------------------

/// Length of a compact request header.
pub const COMPACT_REQUEST_LEN: usize = 28;
/// Length of an extended request header.
pub const EXTENDED_REQUEST_LEN: usize = 32;

/// A transmission request header, as received (not yet validated).
///
/// Compact (without extended headers):
/// ```text
/// [ 0.. 4)  REQUEST_MAGIC
/// [ 4.. 6)  command flags
/// [ 6.. 8)  command type
/// [ 8..16)  cookie (handle), echoed in the reply
/// [16..24)  offset
/// [24..28)  length (32 bits)
/// ```
/// Extended (after `NBD_OPT_EXTENDED_HEADERS`): the same up to byte 24, then
/// ```text
/// [24..32)  length (64 bits)
/// ```
/// with `EXTENDED_REQUEST_MAGIC` in place of `REQUEST_MAGIC`. A write's payload follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    /// Command flags (`NBD_CMD_FLAG_*`).
    pub flags: u16,
    /// Command type (`NBD_CMD_*`).
    pub command: u16,
    /// The client's opaque cookie.
    pub cookie: u64,
    /// Byte offset in the export.
    pub offset: u64,
    /// Length in bytes (effect length, or payload length with `CMD_FLAG_PAYLOAD_LEN`).
    pub length: u64,
}

impl RequestHeader {
    /// Splits a request header of [`COMPACT_REQUEST_LEN`] or [`EXTENDED_REQUEST_LEN`] bytes.
    /// Returns the magic found when it is not the one expected for this mode (the stream is
    /// out of sync and the connection must be dropped).
    pub fn parse(b: &[u8], extended: bool) -> Result<RequestHeader, u32> {
        let expected_len = if extended {
            EXTENDED_REQUEST_LEN
        } else {
            COMPACT_REQUEST_LEN
        };
        debug_assert_eq!(b.len(), expected_len);
        if b.len() != expected_len {
            return Err(0);
        }
        let magic = be_u32(&b[0..4]);
        let expected_magic = if extended {
            EXTENDED_REQUEST_MAGIC
        } else {
            REQUEST_MAGIC
        };
        if magic != expected_magic {
            return Err(magic);
        }
        Ok(RequestHeader {
            flags: be_u16(&b[4..6]),
            command: be_u16(&b[6..8]),
            cookie: be_u64(&b[8..16]),
            offset: be_u64(&b[16..24]),
            length: if extended {
                be_u64(&b[24..32])
            } else {
                u64::from(be_u32(&b[24..28]))
            },
        })
    }
}

/// Human-readable name of a command, for logs and error messages.
pub fn command_name(command: u16) -> &'static str {
    match command {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "unknown command",
    }
}

// ---------------------------------------------------------------------------------------------
// Transmission: replies
// ---------------------------------------------------------------------------------------------

/// Which reply headers a connection uses; fixed when transmission starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ReplyMode {
    /// Simple replies only.
    Simple,
    /// `NBD_OPT_STRUCTURED_REPLY` was negotiated.
    Structured,
    /// `NBD_OPT_EXTENDED_HEADERS` was negotiated (implies structured replies).
    Extended,
}

/// Length of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Length of a structured reply chunk header.
pub const STRUCTURED_HEADER_LEN: usize = 20;
/// Length of an extended reply chunk header.
pub const EXTENDED_HEADER_LEN: usize = 32;

/// The longest fixed reply prefix we build: an extended chunk header plus the 12-byte
/// offset/length of an `OFFSET_HOLE` payload.
pub const MAX_REPLY_PREFIX: usize = EXTENDED_HEADER_LEN + 12;

/// A reply prefix (headers and fixed payload fields) built in place, without a heap
/// allocation, ready to be sent before an optional data buffer.
#[derive(Clone, Copy)]
pub struct ReplyPrefix {
    bytes: [u8; MAX_REPLY_PREFIX],
    len: u8,
}

impl ReplyPrefix {
    fn new() -> ReplyPrefix {
        ReplyPrefix {
            bytes: [0; MAX_REPLY_PREFIX],
            len: 0,
        }
    }

    fn put(&mut self, b: &[u8]) {
        let at = usize::from(self.len);
        // Invariant: callers build at most MAX_REPLY_PREFIX bytes (the largest is an
        // extended header + hole payload, checked by the unit tests).
        self.bytes[at..at + b.len()].copy_from_slice(b);
        self.len += b.len() as u8;
    }

    /// The encoded bytes.
    pub fn as_bytes(&self) -> &[u8] {
        &self.bytes[..usize::from(self.len)]
    }

    /// A simple reply.
    ///
    /// ```text
    /// [ 0.. 4)  SIMPLE_REPLY_MAGIC
    /// [ 4.. 8)  error (0 = success)
    /// [ 8..16)  cookie
    /// ```
    /// A successful read's data follows.
    pub fn simple(cookie: u64, error: Option<NbdError>) -> ReplyPrefix {
        let mut p = ReplyPrefix::new();
        p.put(&SIMPLE_REPLY_MAGIC.to_be_bytes());
        p.put(&error.map_or(0, NbdError::code).to_be_bytes());
        p.put(&cookie.to_be_bytes());
        p
    }

    /// A structured (or, in extended mode, extended) chunk header for a payload of
    /// `payload_len` bytes.
    ///
    /// Structured:
    /// ```text
    /// [ 0.. 4)  STRUCTURED_REPLY_MAGIC
    /// [ 4.. 6)  flags (REPLY_FLAG_DONE on the last chunk)
    /// [ 6.. 8)  chunk type
    /// [ 8..16)  cookie
    /// [16..20)  payload length (32 bits)
    /// ```
    /// Extended:
    /// ```text
    /// [ 0.. 4)  EXTENDED_REPLY_MAGIC
    /// [ 4.. 6)  flags
    /// [ 6.. 8)  chunk type
    /// [ 8..16)  cookie
    /// [16..24)  offset of the request this chunk answers
    /// [24..32)  payload length (64 bits)
    /// ```
    pub fn chunk(
        mode: ReplyMode,
        cookie: u64,
        request_offset: u64,
        flags: u16,
        chunk_type: u16,
        payload_len: u64,
    ) -> ReplyPrefix {
        let mut p = ReplyPrefix::new();
        match mode {
            ReplyMode::Extended => {
                p.put(&EXTENDED_REPLY_MAGIC.to_be_bytes());
                p.put(&flags.to_be_bytes());
                p.put(&chunk_type.to_be_bytes());
                p.put(&cookie.to_be_bytes());
                p.put(&request_offset.to_be_bytes());
                p.put(&payload_len.to_be_bytes());
            }
            ReplyMode::Structured | ReplyMode::Simple => {
                debug_assert!(mode == ReplyMode::Structured);
                debug_assert!(payload_len <= u64::from(u32::MAX));
                p.put(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
                p.put(&flags.to_be_bytes());
                p.put(&chunk_type.to_be_bytes());
                p.put(&cookie.to_be_bytes());
                p.put(&(payload_len as u32).to_be_bytes());
            }
        }
        p
    }

    /// An `OFFSET_DATA` chunk header and its offset field; `data_len` bytes of data follow.
    ///
    /// ```text
    /// chunk header (type OFFSET_DATA, length 8 + data_len)
    /// [0..8)  offset of the data in the export
    /// ```
    pub fn offset_data(
        mode: ReplyMode,
        cookie: u64,
        request_offset: u64,
        done: bool,
        data_offset: u64,
        data_len: u64,
    ) -> ReplyPrefix {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let mut p = ReplyPrefix::chunk(
            mode,
            cookie,
            request_offset,
            flags,
            REPLY_TYPE_OFFSET_DATA,
            8 + data_len,
        );
        p.put(&data_offset.to_be_bytes());
        p
    }

    /// An `OFFSET_HOLE` chunk: `hole_len` bytes at `hole_offset` read as zeros.
    ///
    /// ```text
    /// chunk header (type OFFSET_HOLE, length 12)
    /// [ 0.. 8)  offset of the hole in the export
    /// [ 8..12)  hole length (nonzero)
    /// ```
    pub fn offset_hole(
        mode: ReplyMode,
        cookie: u64,
        request_offset: u64,
        done: bool,
        hole_offset: u64,
        hole_len: u32,
    ) -> ReplyPrefix {
        let flags = if done { REPLY_FLAG_DONE } else { 0 };
        let mut p = ReplyPrefix::chunk(
            mode,
            cookie,
            request_offset,
            flags,
            REPLY_TYPE_OFFSET_HOLE,
            12,
        );
        p.put(&hole_offset.to_be_bytes());
        p.put(&hole_len.to_be_bytes());
        p
    }

    /// A final `NONE` chunk: the request succeeded and nothing else follows.
    pub fn none(mode: ReplyMode, cookie: u64, request_offset: u64) -> ReplyPrefix {
        ReplyPrefix::chunk(
            mode,
            cookie,
            request_offset,
            REPLY_FLAG_DONE,
            REPLY_TYPE_NONE,
            0,
        )
    }
}

impl fmt::Debug for ReplyPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ReplyPrefix({:02x?})", self.as_bytes())
    }
}

/// A final `NBD_REPLY_TYPE_ERROR` chunk with a human-readable message (cut to the protocol's
/// 4096-byte string limit on a character boundary).
///
/// ```text
/// chunk header (type ERROR, flags DONE, length 6 + N)
/// [0..4)    error (NBD_E*)
/// [4..6)    message length N
/// [6..6+N)  message
/// ```
pub fn error_chunk(
    mode: ReplyMode,
    cookie: u64,
    request_offset: u64,
    error: NbdError,
    message: &str,
) -> Vec<u8> {
    let message = truncate_utf8(message, MAX_STRING_LEN);
    let payload_len = 6 + message.len() as u64;
    let head = ReplyPrefix::chunk(
        mode,
        cookie,
        request_offset,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        payload_len,
    );
    let mut b = Vec::with_capacity(head.as_bytes().len() + payload_len as usize);
    b.extend_from_slice(head.as_bytes());
    b.extend_from_slice(&error.code().to_be_bytes());
    b.extend_from_slice(&(message.len() as u16).to_be_bytes());
    b.extend_from_slice(message.as_bytes());
    b
}

/// One `base:allocation` extent descriptor before encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StatusDescriptor {
    /// Length in bytes (nonzero).
    pub len: u64,
    /// `STATE_HOLE` / `STATE_ZERO` bits.
    pub flags: u32,
}

/// A final block-status chunk for one metadata context.
///
/// Structured mode, type `BLOCK_STATUS`:
/// ```text
/// chunk header (flags DONE, length 4 + 8 * n)
/// [0..4)    metadata context id
/// n times:  [0..4) extent length (32 bits), [4..8) status flags (32 bits)
/// ```
/// Extended mode, type `BLOCK_STATUS_EXT`:
/// ```text
/// chunk header (flags DONE, length 8 + 16 * n)
/// [0..4)    metadata context id
/// [4..8)    number of descriptors n
/// n times:  [0..8) extent length (64 bits), [8..16) status flags (64 bits)
/// ```
/// In structured mode every length must fit in 32 bits; the caller guarantees it (a compact
/// request's length does).
pub fn block_status_chunk(
    mode: ReplyMode,
    cookie: u64,
    request_offset: u64,
    context_id: u32,
    extents: &[StatusDescriptor],
) -> Vec<u8> {
    let extended = mode == ReplyMode::Extended;
    let (chunk_type, payload_len) = if extended {
        (REPLY_TYPE_BLOCK_STATUS_EXT, 8 + 16 * extents.len() as u64)
    } else {
        (REPLY_TYPE_BLOCK_STATUS, 4 + 8 * extents.len() as u64)
    };
    let head = ReplyPrefix::chunk(
        mode,
        cookie,
        request_offset,
        REPLY_FLAG_DONE,
        chunk_type,
        payload_len,
    );
    let mut b = Vec::with_capacity(head.as_bytes().len() + payload_len as usize);
    b.extend_from_slice(head.as_bytes());
    b.extend_from_slice(&context_id.to_be_bytes());
    if extended {
        b.extend_from_slice(&(extents.len() as u32).to_be_bytes());
        for e in extents {
            b.extend_from_slice(&e.len.to_be_bytes());
            b.extend_from_slice(&u64::from(e.flags).to_be_bytes());
        }
    } else {
        for e in extents {
            debug_assert!(e.len <= u64::from(u32::MAX));
            b.extend_from_slice(&(e.len.min(u64::from(u32::MAX)) as u32).to_be_bytes());
            b.extend_from_slice(&e.flags.to_be_bytes());
        }
    }
    b
}

/// The longest prefix of `s` that is at most `max` bytes and ends on a character boundary.
pub fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// Byte helpers (callers pass slices of the exact length; checked by the slicing above)
// ---------------------------------------------------------------------------------------------

/// Big-endian u16 from exactly 2 bytes.
pub fn be_u16(b: &[u8]) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(b);
    u16::from_be_bytes(a)
}

/// Big-endian u32 from exactly 4 bytes.
pub fn be_u32(b: &[u8]) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(b);
    u32::from_be_bytes(a)
}

/// Big-endian u64 from exactly 8 bytes.
pub fn be_u64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greeting_layout() {
        let g = greeting();
        assert_eq!(&g[0..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(be_u16(&g[16..18]), 3);
    }

    #[test]
    fn request_headers_parse_in_both_modes() {
        let mut b = Vec::new();
        b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b.extend_from_slice(&CMD_FLAG_FUA.to_be_bytes());
        b.extend_from_slice(&CMD_WRITE.to_be_bytes());
        b.extend_from_slice(&0x1122_3344_5566_7788u64.to_be_bytes());
        b.extend_from_slice(&4096u64.to_be_bytes());
        b.extend_from_slice(&512u32.to_be_bytes());
        let h = RequestHeader::parse(&b, false).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                cookie: 0x1122_3344_5566_7788,
                offset: 4096,
                length: 512
            }
        );

        let mut e = Vec::new();
        e.extend_from_slice(&EXTENDED_REQUEST_MAGIC.to_be_bytes());
        e.extend_from_slice(&0u16.to_be_bytes());
        e.extend_from_slice(&CMD_TRIM.to_be_bytes());
        e.extend_from_slice(&7u64.to_be_bytes());
        e.extend_from_slice(&0u64.to_be_bytes());
        e.extend_from_slice(&(5u64 << 32).to_be_bytes());
        let h = RequestHeader::parse(&e, true).unwrap();
        assert_eq!(h.length, 5 << 32);
        assert_eq!(h.command, CMD_TRIM);

        // A compact header on an extended connection is a framing error.
        assert!(RequestHeader::parse(&b[..28], false).is_ok());
        let mut wrong = e.clone();
        wrong[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        assert_eq!(RequestHeader::parse(&wrong, true), Err(REQUEST_MAGIC));
    }

    #[test]
    fn reply_prefixes_have_the_documented_sizes() {
        let s = ReplyPrefix::simple(9, Some(NbdError::Inval));
        assert_eq!(s.as_bytes().len(), SIMPLE_REPLY_LEN);
        assert_eq!(be_u32(&s.as_bytes()[4..8]), 22);

        let d = ReplyPrefix::offset_data(ReplyMode::Structured, 1, 0, true, 4096, 512);
        assert_eq!(d.as_bytes().len(), STRUCTURED_HEADER_LEN + 8);
        assert_eq!(be_u32(&d.as_bytes()[16..20]), 520);
        assert_eq!(be_u16(&d.as_bytes()[4..6]), REPLY_FLAG_DONE);

        // The largest prefix fits the inline buffer.
        let h = ReplyPrefix::offset_hole(ReplyMode::Extended, 1, 10, false, 4096, 8192);
        assert_eq!(h.as_bytes().len(), MAX_REPLY_PREFIX);
        assert_eq!(be_u32(&h.as_bytes()[0..4]), EXTENDED_REPLY_MAGIC);
        assert_eq!(be_u64(&h.as_bytes()[16..24]), 10);
        assert_eq!(be_u64(&h.as_bytes()[24..32]), 12);
        assert_eq!(be_u32(&h.as_bytes()[40..44]), 8192);
    }

    #[test]
    fn error_chunk_truncates_long_messages_on_char_boundaries() {
        let msg = "é".repeat(3000); // 6000 bytes
        let c = error_chunk(ReplyMode::Structured, 1, 0, NbdError::Io, &msg);
        let msg_len = usize::from(be_u16(&c[24..26]));
        assert!(msg_len <= MAX_STRING_LEN);
        assert_eq!(msg_len % 2, 0);
        assert_eq!(be_u32(&c[16..20]) as usize, 6 + msg_len);
        assert!(std::str::from_utf8(&c[26..]).is_ok());
    }

    #[test]
    fn block_status_chunks_in_both_modes() {
        let ext = [
            StatusDescriptor {
                len: 65536,
                flags: 0,
            },
            StatusDescriptor {
                len: 131072,
                flags: STATE_HOLE | STATE_ZERO,
            },
        ];
        let c = block_status_chunk(ReplyMode::Structured, 5, 0, 1, &ext);
        assert_eq!(c.len(), 20 + 4 + 16);
        assert_eq!(be_u16(&c[6..8]), REPLY_TYPE_BLOCK_STATUS);
        assert_eq!(be_u32(&c[28..32]), 0);
        assert_eq!(be_u32(&c[32..36]), 131072);
        assert_eq!(be_u32(&c[36..40]), 3);

        let c = block_status_chunk(ReplyMode::Extended, 5, 0, 1, &ext);
        assert_eq!(c.len(), 32 + 8 + 32);
        assert_eq!(be_u16(&c[6..8]), REPLY_TYPE_BLOCK_STATUS_EXT);
        assert_eq!(be_u32(&c[36..40]), 2);
        assert_eq!(be_u64(&c[56..64]), 131072);
        assert_eq!(be_u64(&c[64..72]), 3);
    }

    #[test]
    fn errno_mapping() {
        assert_eq!(NbdError::from_errno(libc::EROFS), NbdError::Perm);
        assert_eq!(NbdError::from_errno(libc::EDQUOT), NbdError::NoSpc);
        assert_eq!(NbdError::from_errno(libc::ESHUTDOWN), NbdError::Shutdown);
        assert_eq!(NbdError::from_errno(libc::ENOTSUP), NbdError::NotSup);
        assert_eq!(NbdError::from_errno(libc::ENODATA), NbdError::Io);
    }
}
