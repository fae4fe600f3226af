//! Validation of transmission requests, done once, up front, before any device call (nbdkit's
//! `validate_request` habit): command, flags, read-only, range, alignment and size are all
//! checked here, and a request that passes becomes a [`Command`] the executor can run without
//! further checks. Device errors are mapped to NBD errors here too ([`device_error`]), so every
//! error a client can see is decided in this file.

use crate::device::DevError;

use super::wire::{
    CMD_BLOCK_STATUS, CMD_CACHE, CMD_DISC, CMD_FLAG_DF, CMD_FLAG_FAST_ZERO, CMD_FLAG_FUA,
    CMD_FLAG_NO_HOLE, CMD_FLAG_PAYLOAD_LEN, CMD_FLAG_REQ_ONE, CMD_FLUSH, CMD_READ, CMD_TRIM,
    CMD_WRITE, CMD_WRITE_ZEROES, NbdError, ReplyMode, RequestHeader, command_name,
};

/// The largest READ or WRITE the server accepts (the `NBD_INFO_BLOCK_SIZE` maximum): 32 MiB,
/// the size the protocol says no client should consider excessive.
pub const MAX_REQUEST_LEN: u32 = 32 << 20;

/// The largest payload the server reads and discards to answer a bad write with an error
/// instead of dropping the connection (nbdkit's limit: twice the maximum request).
pub const MAX_DRAIN_LEN: u64 = 2 * MAX_REQUEST_LEN as u64;

/// What a connection negotiated, as far as request validation is concerned.
#[derive(Debug, Clone)]
pub(crate) struct Limits {
    /// Export size in bytes, as announced in the handshake.
    pub size: u64,
    /// The export is read-only.
    pub read_only: bool,
    /// Reply headers in use (also tells whether request headers are extended).
    pub mode: ReplyMode,
    /// Alignment the client promised to honour (`NBD_INFO_BLOCK_SIZE` requested with
    /// `NBD_OPT_GO`); 1 when it did not, then any alignment is served.
    pub min_block: u32,
    /// The id of `base:allocation` if the client selected it for this export.
    pub base_allocation: Option<u32>,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Command {
    /// Read `len` bytes at `offset`; `single_chunk`: reply with one content chunk (DF flag).
    Read {
        offset: u64,
        len: u32,
        single_chunk: bool,
    },
    /// Write the `len`-byte payload that follows the header.
    Write { offset: u64, len: u32, fua: bool },
    /// Make completed writes durable.
    Flush,
    /// Discard a range.
    Trim { offset: u64, len: u64, fua: bool },
    /// Prefetch hint.
    Cache { offset: u64, len: u64 },
    /// Zero a range.
    WriteZeroes {
        offset: u64,
        len: u64,
        fua: bool,
        may_unmap: bool,
        fast_only: bool,
    },
    /// Describe allocation of a range in the `base:allocation` context.
    BlockStatus {
        offset: u64,
        len: u64,
        req_one: bool,
        context_id: u32,
    },
    /// The client is leaving (no reply).
    Disconnect,
}

impl Command {
    /// Bytes of data buffer this command holds while in flight (request or reply payload).
    pub(crate) fn buffer_len(&self) -> u32 {
        match *self {
            Command::Read { len, .. } | Command::Write { len, .. } => len,
            _ => 0,
        }
    }
}

/// A request refused with an error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rejection {
    /// The error sent to the client.
    pub error: NbdError,
    /// A human-readable reason (sent in structured error chunks, and logged).
    pub message: String,
}

/// The outcome of validating one request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Run it (after reading the payload of a write).
    Execute(Command),
    /// Skip `drain` payload bytes, then answer with an error; the connection goes on.
    Reject { rejection: Rejection, drain: u64 },
    /// The stream cannot be resynchronised cheaply: drop the connection.
    Disconnect(String),
}

fn reject(error: NbdError, message: String, payload: u64) -> Verdict {
    if payload > MAX_DRAIN_LEN {
        Verdict::Disconnect(format!(
            "{message}, and its {payload}-byte payload is too large to skip"
        ))
    } else {
        Verdict::Reject {
            rejection: Rejection { error, message },
            drain: payload,
        }
    }
}

/// Validates a request header against what the connection negotiated.
pub(crate) fn validate(h: &RequestHeader, limits: &Limits) -> Verdict {
    let extended = limits.mode == ReplyMode::Extended;
    let name = command_name(h.command);
    // How many payload bytes follow the header: a write's data; with extended headers, any
    // command may carry a payload announced by CMD_FLAG_PAYLOAD_LEN.
    let payload = if h.command == CMD_WRITE || (extended && h.flags & CMD_FLAG_PAYLOAD_LEN != 0) {
        h.length
    } else {
        0
    };

    let mut valid_flags = CMD_FLAG_FUA;
    match h.command {
        // Whatever its fields say, DISC ends the session (as QEMU and nbdkit do).
        CMD_DISC => return Verdict::Execute(Command::Disconnect),
        CMD_READ => {
            if limits.mode >= ReplyMode::Structured {
                valid_flags |= CMD_FLAG_DF;
            }
        }
        CMD_WRITE => {
            if extended {
                valid_flags |= CMD_FLAG_PAYLOAD_LEN;
            }
        }
        CMD_WRITE_ZEROES => {
            valid_flags |= CMD_FLAG_NO_HOLE;
            if !limits.read_only {
                valid_flags |= CMD_FLAG_FAST_ZERO;
            }
        }
        CMD_BLOCK_STATUS => valid_flags |= CMD_FLAG_REQ_ONE,
        CMD_FLUSH | CMD_TRIM | CMD_CACHE => {}
        other => {
            return reject(NbdError::Inval, format!("unknown command {other}"), payload);
        }
    }
    if h.flags & !valid_flags != 0 {
        return reject(
            NbdError::Inval,
            format!(
                "flags {:#x} are not valid for {name} on this connection",
                h.flags & !valid_flags
            ),
            payload,
        );
    }
    if payload != 0 && h.command != CMD_WRITE {
        return reject(
            NbdError::Inval,
            format!("{name} does not take a payload"),
            payload,
        );
    }
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && limits.read_only {
        return reject(
            NbdError::Perm,
            format!("{name} refused: the export is read-only"),
            payload,
        );
    }
    if h.command == CMD_FLUSH {
        if h.offset != 0 || h.length != 0 {
            return reject(
                NbdError::Inval,
                "FLUSH must have zero offset and length".into(),
                payload,
            );
        }
        return Verdict::Execute(Command::Flush);
    }
    if matches!(h.command, CMD_READ | CMD_WRITE) && h.length > u64::from(MAX_REQUEST_LEN) {
        return reject(
            NbdError::Inval,
            format!(
                "{name} of {} bytes is larger than the maximum of {MAX_REQUEST_LEN}",
                h.length
            ),
            payload,
        );
    }
    let in_range = h
        .offset
        .checked_add(h.length)
        .is_some_and(|end| end <= limits.size);
    if !in_range {
        // The protocol asks for ENOSPC on writes past the end, EINVAL otherwise.
        let error = if matches!(h.command, CMD_WRITE | CMD_WRITE_ZEROES) {
            NbdError::NoSpc
        } else {
            NbdError::Inval
        };
        return reject(
            error,
            format!(
                "{name} of {} bytes at offset {} is outside the export ({} bytes)",
                h.length, h.offset, limits.size
            ),
            payload,
        );
    }
    let aligned_command = matches!(
        h.command,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES
    );
    let min = u64::from(limits.min_block);
    if aligned_command && min > 1 && (h.offset % min != 0 || h.length % min != 0) {
        return reject(
            NbdError::Inval,
            format!(
                "{name} of {} bytes at offset {} is not aligned to the {min}-byte minimum block size",
                h.length, h.offset
            ),
            payload,
        );
    }

    let fua = h.flags & CMD_FLAG_FUA != 0;
    let command = match h.command {
        // Lengths of READ and WRITE were checked against MAX_REQUEST_LEN above.
        CMD_READ => Command::Read {
            offset: h.offset,
            len: h.length as u32,
            single_chunk: h.flags & CMD_FLAG_DF != 0,
        },
        CMD_WRITE => Command::Write {
            offset: h.offset,
            len: h.length as u32,
            fua,
        },
        CMD_TRIM => Command::Trim {
            offset: h.offset,
            len: h.length,
            fua,
        },
        CMD_CACHE => Command::Cache {
            offset: h.offset,
            len: h.length,
        },
        CMD_WRITE_ZEROES => Command::WriteZeroes {
            offset: h.offset,
            len: h.length,
            fua,
            may_unmap: h.flags & CMD_FLAG_NO_HOLE == 0,
            fast_only: h.flags & CMD_FLAG_FAST_ZERO != 0,
        },
        CMD_BLOCK_STATUS => {
            let Some(context_id) = limits.base_allocation else {
                return reject(
                    NbdError::Inval,
                    "BLOCK_STATUS without a metadata context selected for this export".into(),
                    payload,
                );
            };
            if h.length == 0 {
                return reject(
                    NbdError::Inval,
                    "BLOCK_STATUS of zero length".into(),
                    payload,
                );
            }
            Command::BlockStatus {
                offset: h.offset,
                len: h.length,
                req_one: h.flags & CMD_FLAG_REQ_ONE != 0,
                context_id,
            }
        }
        // Every other command returned or was rejected above.
        _ => {
            return reject(
                NbdError::Inval,
                format!("unknown command {}", h.command),
                payload,
            );
        }
    };
    Verdict::Execute(command)
}

/// The NBD error for a failed device call. A range the device calls out of bounds (it shrank
/// under the client) is ENOSPC for writes, as for a request past the end.
pub(crate) fn device_error(command: &Command, err: &DevError) -> NbdError {
    match err {
        DevError::OutOfRange { .. }
            if matches!(command, Command::Write { .. } | Command::WriteZeroes { .. }) =>
        {
            NbdError::NoSpc
        }
        DevError::NotFast => NbdError::NotSup,
        other => NbdError::from_errno(other.errno()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            size: 1 << 20,
            read_only: false,
            mode: ReplyMode::Structured,
            min_block: 512,
            base_allocation: Some(1),
        }
    }

    fn req(command: u16, flags: u16, offset: u64, length: u64) -> RequestHeader {
        RequestHeader {
            flags,
            command,
            cookie: 1,
            offset,
            length,
        }
    }

    fn rejected(v: Verdict) -> (NbdError, u64) {
        match v {
            Verdict::Reject { rejection, drain } => (rejection.error, drain),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn good_requests_become_commands() {
        let l = limits();
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_FUA, 4096, 4096), &l),
            Verdict::Execute(Command::Write {
                offset: 4096,
                len: 4096,
                fua: true
            })
        );
        assert_eq!(
            validate(
                &req(
                    CMD_WRITE_ZEROES,
                    CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
                    0,
                    1 << 20
                ),
                &l
            ),
            Verdict::Execute(Command::WriteZeroes {
                offset: 0,
                len: 1 << 20,
                fua: false,
                may_unmap: false,
                fast_only: true
            })
        );
        assert_eq!(
            validate(&req(CMD_DISC, 0xffff, 7, 7), &l),
            Verdict::Execute(Command::Disconnect)
        );
        assert_eq!(
            validate(&req(CMD_READ, CMD_FLAG_DF, 0, 0), &l),
            Verdict::Execute(Command::Read {
                offset: 0,
                len: 0,
                single_chunk: true
            })
        );
    }

    #[test]
    fn out_of_range_is_enospc_for_writes_and_einval_otherwise() {
        let l = limits();
        assert_eq!(
            rejected(validate(&req(CMD_WRITE, 0, 1 << 20, 512), &l)),
            (NbdError::NoSpc, 512)
        );
        assert_eq!(
            rejected(validate(&req(CMD_WRITE_ZEROES, 0, u64::MAX - 511, 512), &l)).0,
            NbdError::NoSpc
        );
        assert_eq!(
            rejected(validate(&req(CMD_READ, 0, (1 << 20) - 512, 1024), &l)),
            (NbdError::Inval, 0)
        );
        assert_eq!(
            rejected(validate(&req(CMD_TRIM, 0, u64::MAX, 512), &l)).0,
            NbdError::Inval
        );
        assert_eq!(
            rejected(validate(&req(CMD_BLOCK_STATUS, 0, 0, (1 << 20) + 1), &l)).0,
            NbdError::Inval
        );
    }

    #[test]
    fn bad_flags_commands_and_sizes() {
        let mut l = limits();
        assert_eq!(rejected(validate(&req(99, 0, 0, 0), &l)).0, NbdError::Inval);
        assert_eq!(
            rejected(validate(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), &l)).0,
            NbdError::Inval
        );
        // Payload flag is only meaningful with extended headers.
        assert_eq!(
            rejected(validate(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512), &l)),
            (NbdError::Inval, 512)
        );
        assert_eq!(
            rejected(validate(&req(CMD_FLUSH, 0, 1, 0), &l)).0,
            NbdError::Inval
        );
        // Unaligned with a 512-byte minimum; fine without one.
        assert_eq!(
            rejected(validate(&req(CMD_WRITE, 0, 1, 512), &l)),
            (NbdError::Inval, 512)
        );
        l.min_block = 1;
        assert!(matches!(
            validate(&req(CMD_WRITE, 0, 1, 511), &l),
            Verdict::Execute(_)
        ));
        // Oversized reads are refused; oversized writes are drained, or dropped when huge.
        l.size = u64::MAX;
        assert_eq!(
            rejected(validate(&req(CMD_READ, 0, 0, 64 << 20), &l)),
            (NbdError::Inval, 0)
        );
        assert_eq!(
            rejected(validate(&req(CMD_WRITE, 0, 0, 64 << 20), &l)),
            (NbdError::Inval, 64 << 20)
        );
        assert!(matches!(
            validate(&req(CMD_WRITE, 0, 0, (64 << 20) + 1), &l),
            Verdict::Disconnect(_)
        ));
        // DF needs structured replies.
        l.mode = ReplyMode::Simple;
        assert_eq!(
            rejected(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &l)).0,
            NbdError::Inval
        );
    }

    #[test]
    fn read_only_and_block_status_rules() {
        let mut l = limits();
        l.read_only = true;
        for cmd in [CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES] {
            assert_eq!(
                rejected(validate(&req(cmd, 0, 0, 512), &l)).0,
                NbdError::Perm
            );
        }
        assert!(matches!(
            validate(&req(CMD_READ, 0, 0, 512), &l),
            Verdict::Execute(_)
        ));
        assert!(matches!(
            validate(&req(CMD_FLUSH, 0, 0, 0), &l),
            Verdict::Execute(_)
        ));
        l.base_allocation = None;
        assert_eq!(
            rejected(validate(&req(CMD_BLOCK_STATUS, 0, 0, 512), &l)).0,
            NbdError::Inval
        );
        l.base_allocation = Some(3);
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 512), &l),
            Verdict::Execute(Command::BlockStatus {
                offset: 0,
                len: 512,
                req_one: true,
                context_id: 3
            })
        );
        assert_eq!(
            rejected(validate(&req(CMD_BLOCK_STATUS, 0, 0, 0), &l)).0,
            NbdError::Inval
        );
    }

    #[test]
    fn extended_payloads_on_other_commands_are_drained() {
        let mut l = limits();
        l.mode = ReplyMode::Extended;
        assert_eq!(
            rejected(validate(
                &req(CMD_BLOCK_STATUS, CMD_FLAG_PAYLOAD_LEN, 0, 16),
                &l
            )),
            (NbdError::Inval, 16)
        );
        assert!(matches!(
            validate(&req(CMD_WRITE, CMD_FLAG_PAYLOAD_LEN, 0, 512), &l),
            Verdict::Execute(Command::Write { .. })
        ));
        // 64-bit lengths for commands without payload.
        l.size = 1 << 40;
        assert!(matches!(
            validate(&req(CMD_TRIM, 0, 0, 1 << 36), &l),
            Verdict::Execute(Command::Trim { len, .. }) if len == 1 << 36
        ));
    }

    #[test]
    fn device_errors_map_to_nbd_errors() {
        let w = Command::Write {
            offset: 0,
            len: 1,
            fua: false,
        };
        let r = Command::Read {
            offset: 0,
            len: 1,
            single_chunk: false,
        };
        let oor = DevError::OutOfRange {
            offset: 0,
            len: 1,
            size: 0,
        };
        assert_eq!(device_error(&w, &oor), NbdError::NoSpc);
        assert_eq!(device_error(&r, &oor), NbdError::Inval);
        assert_eq!(device_error(&w, &DevError::ReadOnly), NbdError::Perm);
        assert_eq!(
            device_error(&w, &DevError::NoSpace("x".into())),
            NbdError::NoSpc
        );
        assert_eq!(device_error(&w, &DevError::NotFast), NbdError::NotSup);
        assert_eq!(
            device_error(&r, &DevError::Gone("x".into())),
            NbdError::Shutdown
        );
        assert_eq!(
            device_error(
                &r,
                &DevError::Io(std::io::Error::from_raw_os_error(libc::EIO))
            ),
            NbdError::Io
        );
    }
}
