//! Fixed newstyle negotiation, server side: greeting, client flags, then options until the
//! client picks an export (`NBD_OPT_GO` / `NBD_OPT_EXPORT_NAME`) or leaves.
//!
//! Each option's payload is read whole (at most [`MAX_OPTION_LEN`] bytes) and parsed by
//! [`parse_option`] before anything is decided, so a malformed option gets its error reply and
//! the next option is read from the right place.

use std::io;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tracing::debug;

use crate::device::{BlockDevice, DeviceInfo};

use super::exports::{ExportEntry, Exports, Lease};
use super::options::{
    ClientOption, InfoRequest, MAX_OPTION_LEN, MetaRequest, OptionRefusal, option_name,
    parse_option,
};
use super::request::{Limits, MAX_REQUEST_LEN};
use super::wire::{
    FLAG_C_FIXED_NEWSTYLE, FLAG_C_NO_ZEROES, INFO_DESCRIPTION, INFO_NAME, OPTION_HEADER_LEN,
    OptionError, OptionHeader, REP_ACK, REP_INFO, REP_META_CONTEXT, REP_SERVER, ReplyMode,
    TF_CAN_MULTI_CONN, TF_HAS_FLAGS, TF_READ_ONLY, TF_SEND_CACHE, TF_SEND_DF, TF_SEND_FAST_ZERO,
    TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_TRIM, TF_SEND_WRITE_ZEROES, export_name_reply, greeting,
    info_block_size, info_export, info_string, option_reply_header, rep_meta_context, rep_server,
};

/// The id the server gives the `base:allocation` metadata context.
pub(crate) const BASE_ALLOCATION_ID: u32 = 1;
/// The name of the only metadata context the server offers.
pub(crate) const BASE_ALLOCATION: &str = "base:allocation";

/// What the client and the server agreed on for the transmission phase.
pub(crate) struct Session<D> {
    /// The export, counted as used by this connection until the session ends.
    pub lease: Lease<D>,
    /// Request validation parameters.
    pub limits: Limits,
    /// The device's preferred I/O size (reads this large are checked for holes).
    pub preferred_block: u32,
}

/// How a negotiation ended.
pub(crate) enum Outcome<D> {
    /// Enter the transmission phase.
    Transmission(Session<D>),
    /// The client left (`NBD_OPT_ABORT`, or closed the connection between options).
    ClientLeft,
}

/// Transmission flags for a device, given the reply mode of the connection.
pub(crate) fn transmission_flags(info: &DeviceInfo, mode: ReplyMode) -> u16 {
    // CAN_MULTI_CONN is safe: BlockDevice::flush covers writes from every connection.
    let mut flags = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_CACHE | TF_CAN_MULTI_CONN;
    if info.read_only {
        flags |= TF_READ_ONLY;
    } else {
        flags |= TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    }
    if mode >= ReplyMode::Structured {
        // Every read up to the maximum request size can be sent as one chunk.
        flags |= TF_SEND_DF;
    }
    flags
}

/// `(minimum, preferred, maximum)` block sizes advertised for a device.
///
/// The minimum is 512 (sector-sized requests), or 1 when the size is not a multiple of 512 so
/// that an obedient client can still reach the last bytes. The preferred size is the device's
/// allocation unit, kept within [512, maximum] as the protocol requires; the maximum is
/// [`MAX_REQUEST_LEN`].
pub(crate) fn block_sizes(info: &DeviceInfo) -> (u32, u32, u32) {
    let min = if info.size % 512 == 0 { 512 } else { 1 };
    let preferred = if info.block_size.is_power_of_two() {
        info.block_size.clamp(512, MAX_REQUEST_LEN)
    } else {
        4096
    };
    (min, preferred, MAX_REQUEST_LEN)
}

fn protocol_error(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// Per-connection negotiation state.
struct Negotiation {
    mode: ReplyMode,
    no_zeroes: bool,
    /// `(canonical export name, base:allocation selected)` from the last
    /// `NBD_OPT_SET_META_CONTEXT`.
    meta: Option<(String, bool)>,
}

impl Negotiation {
    fn base_allocation_for(&self, export: &str) -> Option<u32> {
        match &self.meta {
            Some((name, true)) if name == export => Some(BASE_ALLOCATION_ID),
            _ => None,
        }
    }

    fn session<D: BlockDevice>(&self, lease: Lease<D>, want_block_size: bool) -> Session<D> {
        let info = lease.entry().device().info();
        let (min, preferred, _) = block_sizes(&info);
        let limits = Limits {
            size: info.size,
            read_only: info.read_only,
            mode: self.mode,
            // Only a client that asked for the block sizes promised to honour them.
            min_block: if want_block_size { min } else { 1 },
            base_allocation: self.base_allocation_for(lease.entry().name()),
        };
        Session {
            lease,
            limits,
            preferred_block: preferred,
        }
    }
}

/// Writes one option reply (header and payload in one write).
async fn reply<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    reply_type: u32,
    payload: &[u8],
) -> io::Result<()> {
    let mut msg = Vec::with_capacity(20 + payload.len());
    msg.extend_from_slice(&option_reply_header(
        option,
        reply_type,
        payload.len() as u32,
    ));
    msg.extend_from_slice(payload);
    wr.write_all(&msg).await
}

async fn refuse<W: AsyncWrite + Unpin>(
    wr: &mut W,
    option: u32,
    refusal: &OptionRefusal,
) -> io::Result<()> {
    debug!(
        option = %option_name(option),
        error = ?refusal.error,
        "refusing option: {}",
        refusal.message
    );
    reply(wr, option, refusal.error.code(), refusal.message.as_bytes()).await
}

/// Runs the handshake on a fresh connection. I/O errors and protocol violations that end the
/// connection are returned as errors (the caller logs them and closes).
pub(crate) async fn negotiate<R, W, D>(
    rd: &mut BufReader<R>,
    wr: &mut W,
    exports: &Exports<D>,
) -> io::Result<Outcome<D>>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    D: BlockDevice,
{
    wr.write_all(&greeting()).await?;
    let client_flags = rd.read_u32().await?;
    if client_flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(protocol_error(
            "the client does not speak fixed newstyle negotiation (the only one served)".into(),
        ));
    }
    let unknown = client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if unknown != 0 {
        return Err(protocol_error(format!("unknown client flags {unknown:#x}")));
    }
    let mut state = Negotiation {
        mode: ReplyMode::Simple,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        meta: None,
    };
    let mut data = Vec::new();
    loop {
        let mut head = [0u8; OPTION_HEADER_LEN];
        // A client may hang up between options; that is not an error worth a warning.
        match rd.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(Outcome::ClientLeft),
            Err(e) => return Err(e),
        }
        let Some(header) = OptionHeader::parse(&head) else {
            return Err(protocol_error("bad magic in option header".into()));
        };
        if header.len > MAX_OPTION_LEN {
            return Err(protocol_error(format!(
                "{} with {} bytes of data (at most {MAX_OPTION_LEN} accepted)",
                option_name(header.option),
                header.len
            )));
        }
        data.clear();
        data.resize(header.len as usize, 0);
        rd.read_exact(&mut data).await?;
        let option = match parse_option(header.option, &data) {
            Ok(o) => o,
            Err(refusal) => {
                // NBD_OPT_EXPORT_NAME cannot be answered with an error: hang up.
                if header.option == super::wire::OPT_EXPORT_NAME {
                    return Err(protocol_error(refusal.message));
                }
                refuse(wr, header.option, &refusal).await?;
                continue;
            }
        };
        let code = header.option;
        match option {
            ClientOption::ExportName(name) => {
                if state.mode == ReplyMode::Extended {
                    return Err(protocol_error(
                        "NBD_OPT_EXPORT_NAME after extended headers were negotiated".into(),
                    ));
                }
                let Some(lease) = exports.attach(&name) else {
                    return Err(protocol_error(format!(
                        "NBD_OPT_EXPORT_NAME for unknown export {name:?}"
                    )));
                };
                let info = lease.entry().device().info();
                let flags = transmission_flags(&info, state.mode);
                wr.write_all(&export_name_reply(info.size, flags, state.no_zeroes))
                    .await?;
                return Ok(Outcome::Transmission(state.session(lease, false)));
            }
            ClientOption::Abort => {
                // The client may already be gone; a failed ACK changes nothing.
                let _ = reply(wr, code, REP_ACK, &[]).await;
                return Ok(Outcome::ClientLeft);
            }
            ClientOption::List => {
                for (name, description) in exports.list() {
                    reply(wr, code, REP_SERVER, &rep_server(&name, &description)).await?;
                }
                reply(wr, code, REP_ACK, &[]).await?;
            }
            ClientOption::StartTls => {
                let refusal = OptionRefusal {
                    error: OptionError::Policy,
                    message: "TLS is not supported by this server".into(),
                };
                refuse(wr, code, &refusal).await?;
            }
            ClientOption::Info(req) => {
                let Some(entry) = exports.lookup(&req.name) else {
                    refuse(wr, code, &unknown_export(&req.name)).await?;
                    continue;
                };
                send_info(wr, code, &entry, &req, state.mode).await?;
                reply(wr, code, REP_ACK, &[]).await?;
            }
            ClientOption::Go(req) => {
                let Some(lease) = exports.attach(&req.name) else {
                    refuse(wr, code, &unknown_export(&req.name)).await?;
                    continue;
                };
                send_info(wr, code, lease.entry(), &req, state.mode).await?;
                reply(wr, code, REP_ACK, &[]).await?;
                return Ok(Outcome::Transmission(
                    state.session(lease, req.want_block_size),
                ));
            }
            ClientOption::StructuredReply => {
                let refusal = match state.mode {
                    ReplyMode::Simple => None,
                    ReplyMode::Structured => Some(OptionRefusal {
                        error: OptionError::Invalid,
                        message: "structured replies are already negotiated".into(),
                    }),
                    ReplyMode::Extended => Some(OptionRefusal {
                        error: OptionError::ExtendedHeadersRequired,
                        message: "extended headers are already negotiated".into(),
                    }),
                };
                match refusal {
                    Some(r) => refuse(wr, code, &r).await?,
                    None => {
                        state.mode = ReplyMode::Structured;
                        reply(wr, code, REP_ACK, &[]).await?;
                    }
                }
            }
            ClientOption::ExtendedHeaders => {
                if state.mode == ReplyMode::Extended {
                    let r = OptionRefusal {
                        error: OptionError::Invalid,
                        message: "extended headers are already negotiated".into(),
                    };
                    refuse(wr, code, &r).await?;
                } else {
                    state.mode = ReplyMode::Extended;
                    reply(wr, code, REP_ACK, &[]).await?;
                }
            }
            ClientOption::ListMetaContext(req) => {
                if exports.lookup(&req.export).is_none() {
                    refuse(wr, code, &unknown_export(&req.export)).await?;
                    continue;
                }
                if list_matches(&req) {
                    // Context ids in list replies are reserved (zero).
                    reply(
                        wr,
                        code,
                        REP_META_CONTEXT,
                        &rep_meta_context(0, BASE_ALLOCATION),
                    )
                    .await?;
                }
                reply(wr, code, REP_ACK, &[]).await?;
            }
            ClientOption::SetMetaContext(req) => {
                // A new selection replaces the old one even when it fails.
                state.meta = None;
                if state.mode == ReplyMode::Simple {
                    let r = OptionRefusal {
                        error: OptionError::Invalid,
                        message: "NBD_OPT_SET_META_CONTEXT needs structured replies first".into(),
                    };
                    refuse(wr, code, &r).await?;
                    continue;
                }
                let Some(entry) = exports.lookup(&req.export) else {
                    refuse(wr, code, &unknown_export(&req.export)).await?;
                    continue;
                };
                let selected = req.queries.iter().any(|q| q == BASE_ALLOCATION);
                if selected {
                    reply(
                        wr,
                        code,
                        REP_META_CONTEXT,
                        &rep_meta_context(BASE_ALLOCATION_ID, BASE_ALLOCATION),
                    )
                    .await?;
                }
                reply(wr, code, REP_ACK, &[]).await?;
                state.meta = Some((entry.name().to_owned(), selected));
            }
            ClientOption::Unknown(other) => {
                let r = OptionRefusal {
                    error: OptionError::Unsupported,
                    message: format!("{} is not supported", option_name(other)),
                };
                refuse(wr, code, &r).await?;
            }
        }
    }
}

fn unknown_export(name: &str) -> OptionRefusal {
    OptionRefusal {
        error: OptionError::UnknownExport,
        message: if name.is_empty() {
            "there is no default export: ask for an export by name (see NBD_OPT_LIST)".into()
        } else {
            format!(
                "no export named {:?}",
                super::wire::truncate_utf8(name, 256)
            )
        },
    }
}

/// Does a `NBD_OPT_LIST_META_CONTEXT` query list `base:allocation`? No query means every
/// context; `base:` is the namespace wildcard; other namespaces and leaves are ignored.
fn list_matches(req: &MetaRequest) -> bool {
    req.queries.is_empty()
        || req
            .queries
            .iter()
            .any(|q| q == "base:" || q == BASE_ALLOCATION)
}

/// Sends the `NBD_REP_INFO` records for an export: the name when asked for (or when the
/// client used the default-export name), the description when there is one, the block sizes
/// and the export size and flags.
async fn send_info<W: AsyncWrite + Unpin, D: BlockDevice>(
    wr: &mut W,
    code: u32,
    entry: &ExportEntry<D>,
    req: &InfoRequest,
    mode: ReplyMode,
) -> io::Result<()> {
    let info = entry.device().info();
    if req.want_name || req.name != entry.name() {
        reply(wr, code, REP_INFO, &info_string(INFO_NAME, entry.name())).await?;
    }
    if !entry.description().is_empty() {
        reply(
            wr,
            code,
            REP_INFO,
            &info_string(INFO_DESCRIPTION, entry.description()),
        )
        .await?;
    }
    let (min, preferred, max) = block_sizes(&info);
    reply(wr, code, REP_INFO, &info_block_size(min, preferred, max)).await?;
    let flags = transmission_flags(&info, mode);
    reply(wr, code, REP_INFO, &info_export(info.size, flags)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_follow_read_only_and_mode() {
        let rw = DeviceInfo {
            size: 1 << 30,
            read_only: false,
            block_size: 65536,
        };
        let f = transmission_flags(&rw, ReplyMode::Simple);
        assert_eq!(f & TF_READ_ONLY, 0);
        assert_ne!(f & TF_SEND_TRIM, 0);
        assert_ne!(f & TF_SEND_FAST_ZERO, 0);
        assert_ne!(f & TF_CAN_MULTI_CONN, 0);
        assert_eq!(f & TF_SEND_DF, 0);
        assert_ne!(
            transmission_flags(&rw, ReplyMode::Structured) & TF_SEND_DF,
            0
        );
        let ro = DeviceInfo {
            read_only: true,
            ..rw
        };
        let f = transmission_flags(&ro, ReplyMode::Extended);
        assert_ne!(f & TF_READ_ONLY, 0);
        assert_eq!(
            f & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO),
            0
        );
    }

    #[test]
    fn block_sizes_obey_the_protocol_rules() {
        let mut info = DeviceInfo {
            size: 10 << 30,
            read_only: false,
            block_size: 65536,
        };
        assert_eq!(block_sizes(&info), (512, 65536, 32 << 20));
        info.block_size = 1 << 30;
        assert_eq!(block_sizes(&info), (512, 32 << 20, 32 << 20));
        info.block_size = 256;
        assert_eq!(block_sizes(&info).1, 512);
        info.size = 1000;
        assert_eq!(block_sizes(&info).0, 1);
    }
}
