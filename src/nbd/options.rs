//! Parsing of handshake options. The whole option payload is read first, then parsed here in
//! one pass that checks every length against what is really there; the negotiation code only
//! ever sees a well-formed [`ClientOption`] or an [`OptionRefusal`] that says which error reply
//! to send.

use super::wire::{
    MAX_STRING_LEN, OPT_ABORT, OPT_EXPORT_NAME, OPT_EXTENDED_HEADERS, OPT_GO, OPT_INFO, OPT_LIST,
    OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT, OPT_STARTTLS, OPT_STRUCTURED_REPLY, OptionError,
    be_u16, be_u32,
};

/// The largest option payload the server reads. Legitimate options are a few names and
/// queries of at most 4 KiB each; anything larger is a client to hang up on.
pub const MAX_OPTION_LEN: u32 = 1 << 20;

/// `NBD_OPT_INFO` / `NBD_OPT_GO` payload.
///
/// ```text
/// [0..4)        length N of the export name
/// [4..4+N)      export name
/// [4+N..6+N)    number R of information requests
/// R times:      16-bit NBD_INFO_* code
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct InfoRequest {
    /// The export asked for (empty: the default export).
    pub name: String,
    /// `NBD_INFO_NAME` was requested.
    pub want_name: bool,
    /// `NBD_INFO_BLOCK_SIZE` was requested: the client promises to honour block sizes.
    pub want_block_size: bool,
}

/// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` payload.
///
/// ```text
/// [0..4)        length N of the export name
/// [4..4+N)      export name
/// [4+N..8+N)    number Q of queries
/// Q times:      [0..4) length L of the query, [4..4+L) query ("namespace:leaf")
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MetaRequest {
    /// The export the contexts are for.
    pub export: String,
    /// The queries, each a valid protocol string containing a namespace colon.
    pub queries: Vec<String>,
}

/// A well-formed option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ClientOption {
    /// `NBD_OPT_EXPORT_NAME` (the payload is the bare name).
    ExportName(String),
    /// `NBD_OPT_ABORT` (any payload is ignored, as the protocol asks).
    Abort,
    /// `NBD_OPT_LIST`.
    List,
    /// `NBD_OPT_STARTTLS`.
    StartTls,
    /// `NBD_OPT_INFO`.
    Info(InfoRequest),
    /// `NBD_OPT_GO`.
    Go(InfoRequest),
    /// `NBD_OPT_STRUCTURED_REPLY`.
    StructuredReply,
    /// `NBD_OPT_LIST_META_CONTEXT`.
    ListMetaContext(MetaRequest),
    /// `NBD_OPT_SET_META_CONTEXT`.
    SetMetaContext(MetaRequest),
    /// `NBD_OPT_EXTENDED_HEADERS`.
    ExtendedHeaders,
    /// An option this server does not know.
    Unknown(u32),
}

/// Why an option was refused, and with which error reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OptionRefusal {
    /// The error reply type.
    pub error: OptionError,
    /// The message sent with it.
    pub message: String,
}

fn invalid(message: impl Into<String>) -> OptionRefusal {
    OptionRefusal {
        error: OptionError::Invalid,
        message: message.into(),
    }
}

/// A reader over an option payload whose every access is bounds-checked.
struct Cursor<'a> {
    data: &'a [u8],
    what: &'static str,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, field: &str) -> Result<&'a [u8], OptionRefusal> {
        if self.data.len() < n {
            return Err(invalid(format!(
                "{}: the option ends inside the {field} ({n} bytes needed, {} left)",
                self.what,
                self.data.len()
            )));
        }
        let (head, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(head)
    }

    fn u16(&mut self, field: &str) -> Result<u16, OptionRefusal> {
        self.take(2, field).map(be_u16)
    }

    fn u32(&mut self, field: &str) -> Result<u32, OptionRefusal> {
        self.take(4, field).map(be_u32)
    }

    /// A length-prefixed protocol string.
    fn string(&mut self, field: &str) -> Result<String, OptionRefusal> {
        let len = self.u32(field)? as usize;
        if len > MAX_STRING_LEN {
            return Err(invalid(format!(
                "{}: the {field} is {len} bytes long, more than the 4096 allowed",
                self.what
            )));
        }
        let bytes = self.take(len, field)?;
        protocol_string(bytes, self.what, field)
    }

    fn finish(&self) -> Result<(), OptionRefusal> {
        if self.data.is_empty() {
            Ok(())
        } else {
            Err(invalid(format!(
                "{}: {} unexpected bytes after the last field",
                self.what,
                self.data.len()
            )))
        }
    }
}

/// Checks that `bytes` is a protocol string: UTF-8 without NUL, at most 4096 bytes.
pub(crate) fn protocol_string(
    bytes: &[u8],
    what: &str,
    field: &str,
) -> Result<String, OptionRefusal> {
    if bytes.len() > MAX_STRING_LEN {
        return Err(invalid(format!(
            "{what}: the {field} is longer than 4096 bytes"
        )));
    }
    let s = std::str::from_utf8(bytes)
        .map_err(|_| invalid(format!("{what}: the {field} is not valid UTF-8")))?;
    if s.contains('\0') {
        return Err(invalid(format!(
            "{what}: the {field} contains a NUL character"
        )));
    }
    Ok(s.to_owned())
}

fn no_payload(
    data: &[u8],
    what: &str,
    option: ClientOption,
) -> Result<ClientOption, OptionRefusal> {
    if data.is_empty() {
        Ok(option)
    } else {
        Err(invalid(format!(
            "{what} takes no data, but {} bytes came with it",
            data.len()
        )))
    }
}

fn info_request(data: &[u8], what: &'static str) -> Result<InfoRequest, OptionRefusal> {
    let mut c = Cursor { data, what };
    let name = c.string("export name")?;
    let count = c.u16("number of information requests")?;
    let mut req = InfoRequest {
        name,
        want_name: false,
        want_block_size: false,
    };
    for _ in 0..count {
        match c.u16("information request")? {
            super::wire::INFO_NAME => req.want_name = true,
            super::wire::INFO_BLOCK_SIZE => req.want_block_size = true,
            // NBD_INFO_EXPORT is always sent; unknown requests are ignored, as required.
            _ => {}
        }
    }
    c.finish()?;
    Ok(req)
}

fn meta_request(data: &[u8], what: &'static str) -> Result<MetaRequest, OptionRefusal> {
    let mut c = Cursor { data, what };
    let export = c.string("export name")?;
    let count = c.u32("number of queries")?;
    // Each query takes at least its 4-byte length: a count the payload cannot hold is
    // malformed, and refusing it here keeps `Vec::with_capacity` bounded.
    if count as usize > c.data.len() / 4 {
        return Err(invalid(format!(
            "{what}: {count} queries announced but only {} bytes follow",
            c.data.len()
        )));
    }
    let mut queries = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let q = c.string("query")?;
        if !q.contains(':') {
            return Err(invalid(format!(
                "{what}: query {q:?} has no namespace (expected \"namespace:name\")"
            )));
        }
        queries.push(q);
    }
    c.finish()?;
    Ok(MetaRequest { export, queries })
}

/// Parses the payload of option `code`. Never fails for unknown options (they become
/// [`ClientOption::Unknown`], answered with `NBD_REP_ERR_UNSUP`).
pub(crate) fn parse_option(code: u32, data: &[u8]) -> Result<ClientOption, OptionRefusal> {
    match code {
        OPT_EXPORT_NAME => protocol_string(data, "NBD_OPT_EXPORT_NAME", "export name")
            .map(ClientOption::ExportName),
        OPT_ABORT => Ok(ClientOption::Abort),
        OPT_LIST => no_payload(data, "NBD_OPT_LIST", ClientOption::List),
        OPT_STARTTLS => no_payload(data, "NBD_OPT_STARTTLS", ClientOption::StartTls),
        OPT_INFO => info_request(data, "NBD_OPT_INFO").map(ClientOption::Info),
        OPT_GO => info_request(data, "NBD_OPT_GO").map(ClientOption::Go),
        OPT_STRUCTURED_REPLY => no_payload(
            data,
            "NBD_OPT_STRUCTURED_REPLY",
            ClientOption::StructuredReply,
        ),
        OPT_LIST_META_CONTEXT => {
            meta_request(data, "NBD_OPT_LIST_META_CONTEXT").map(ClientOption::ListMetaContext)
        }
        OPT_SET_META_CONTEXT => {
            meta_request(data, "NBD_OPT_SET_META_CONTEXT").map(ClientOption::SetMetaContext)
        }
        OPT_EXTENDED_HEADERS => no_payload(
            data,
            "NBD_OPT_EXTENDED_HEADERS",
            ClientOption::ExtendedHeaders,
        ),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Human-readable name of an option code, for logs.
pub(crate) fn option_name(code: u32) -> String {
    match code {
        OPT_EXPORT_NAME => "NBD_OPT_EXPORT_NAME".into(),
        OPT_ABORT => "NBD_OPT_ABORT".into(),
        OPT_LIST => "NBD_OPT_LIST".into(),
        OPT_STARTTLS => "NBD_OPT_STARTTLS".into(),
        OPT_INFO => "NBD_OPT_INFO".into(),
        OPT_GO => "NBD_OPT_GO".into(),
        OPT_STRUCTURED_REPLY => "NBD_OPT_STRUCTURED_REPLY".into(),
        OPT_LIST_META_CONTEXT => "NBD_OPT_LIST_META_CONTEXT".into(),
        OPT_SET_META_CONTEXT => "NBD_OPT_SET_META_CONTEXT".into(),
        OPT_EXTENDED_HEADERS => "NBD_OPT_EXTENDED_HEADERS".into(),
        other => format!("option {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::wire::{INFO_BLOCK_SIZE, INFO_EXPORT, INFO_NAME};

    fn string(s: &[u8]) -> Vec<u8> {
        let mut b = (s.len() as u32).to_be_bytes().to_vec();
        b.extend_from_slice(s);
        b
    }

    fn go(name: &[u8], infos: &[u16]) -> Vec<u8> {
        let mut b = string(name);
        b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }

    fn meta(export: &[u8], queries: &[&[u8]]) -> Vec<u8> {
        let mut b = string(export);
        b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            b.extend_from_slice(&string(q));
        }
        b
    }

    #[test]
    fn go_and_info_parse() {
        let opt = parse_option(OPT_GO, &go(b"vol0", &[INFO_NAME, INFO_BLOCK_SIZE, 77])).unwrap();
        assert_eq!(
            opt,
            ClientOption::Go(InfoRequest {
                name: "vol0".into(),
                want_name: true,
                want_block_size: true
            })
        );
        let opt = parse_option(OPT_INFO, &go(b"", &[INFO_EXPORT])).unwrap();
        assert!(matches!(opt, ClientOption::Info(InfoRequest { ref name, .. }) if name.is_empty()));
    }

    #[test]
    fn malformed_go_is_invalid() {
        let refused = |data: &[u8]| parse_option(OPT_GO, data).unwrap_err().error;
        // Name length beyond the payload.
        let mut b = go(b"vol0", &[]);
        b[3] = 50;
        assert_eq!(refused(&b), OptionError::Invalid);
        // Missing request count.
        assert_eq!(refused(&string(b"vol0")), OptionError::Invalid);
        // Too many requests announced.
        let mut b = go(b"vol0", &[INFO_NAME]);
        b[9] = 3;
        assert_eq!(refused(&b), OptionError::Invalid);
        // Trailing garbage.
        let mut b = go(b"vol0", &[]);
        b.push(0);
        assert_eq!(refused(&b), OptionError::Invalid);
        // Name over 4096 bytes, non-UTF-8, or with a NUL.
        assert_eq!(refused(&go(&[b'a'; 4097], &[])), OptionError::Invalid);
        assert_eq!(refused(&go(&[0xff, 0xfe], &[])), OptionError::Invalid);
        assert_eq!(refused(&go(b"a\0b", &[])), OptionError::Invalid);
        // Too short for anything.
        assert_eq!(refused(&[0, 0]), OptionError::Invalid);
    }

    #[test]
    fn meta_context_requests() {
        let opt = parse_option(
            OPT_SET_META_CONTEXT,
            &meta(b"vol0", &[b"base:allocation", b"qemu:dirty-bitmap:x"]),
        )
        .unwrap();
        assert_eq!(
            opt,
            ClientOption::SetMetaContext(MetaRequest {
                export: "vol0".into(),
                queries: vec!["base:allocation".into(), "qemu:dirty-bitmap:x".into()]
            })
        );
        let refused = |data: &[u8]| parse_option(OPT_LIST_META_CONTEXT, data).unwrap_err().error;
        assert_eq!(refused(&meta(b"vol0", &[b"nocolon"])), OptionError::Invalid);
        let mut b = meta(b"vol0", &[]);
        let at = b.len() - 4;
        b[at..].copy_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(refused(&b), OptionError::Invalid);
        let mut b = meta(b"vol0", &[b"base:allocation"]);
        b.pop();
        assert_eq!(refused(&b), OptionError::Invalid);
    }

    #[test]
    fn payload_free_options() {
        assert_eq!(parse_option(OPT_LIST, &[]).unwrap(), ClientOption::List);
        assert_eq!(
            parse_option(OPT_LIST, &[1]).unwrap_err().error,
            OptionError::Invalid
        );
        assert_eq!(
            parse_option(OPT_STRUCTURED_REPLY, &[0; 4])
                .unwrap_err()
                .error,
            OptionError::Invalid
        );
        assert_eq!(
            parse_option(OPT_ABORT, &[1, 2, 3]).unwrap(),
            ClientOption::Abort
        );
        assert_eq!(
            parse_option(4242, &[1, 2]).unwrap(),
            ClientOption::Unknown(4242)
        );
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"vol0").unwrap(),
            ClientOption::ExportName("vol0".into())
        );
    }
}
