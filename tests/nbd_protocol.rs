//! The NBD server against a raw-socket client: malformed handshakes, options and requests,
//! exact reply formats (holes, block status, extended headers), concurrency, live export
//! changes and graceful shutdown. After the abuse, well-behaved clients are still served.

mod nbd_support;

use std::time::{Duration, Instant};

use nbd_support::*;
use uthin::nbd::wire::*;
use uthin::nbd::{ExportError, ServerConfig};

const MIB: u64 = 1 << 20;

const ERR_UNSUP: u32 = (1 << 31) | 1;
const ERR_POLICY: u32 = (1 << 31) | 2;
const ERR_INVALID: u32 = (1 << 31) | 3;
const ERR_UNKNOWN: u32 = (1 << 31) | 6;
const ERR_EXT_HEADER_REQD: u32 = (1 << 31) | 10;

const EPERM: u32 = 1;
const EIO: u32 = 5;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

/// A full write/read/flush cycle, as a client that follows the rules would do it.
fn well_behaved_session(addr: &str, export: &str) {
    let mut c = RawClient::connect_fixed(addr);
    c.structured_reply();
    c.go(export);
    let data = pattern(8192, 42);
    c.write(1, 65536, &data);
    assert_eq!(c.read(2, 65536, 8192), data);
    c.request(0, CMD_FLUSH, 3, 0, 0, &[]);
    assert_eq!(c.read_reply().error(), 0);
    c.disconnect();
}

#[test]
fn malformed_handshakes_lose_their_connection_only() {
    let srv = InProcessServer::start();
    srv.add("vol", 16 * MIB, false);
    let addr = srv.tcp.clone();

    // A client that keeps a healthy session open across all of this.
    let mut bystander = RawClient::connect_fixed(&addr);
    bystander.structured_reply();
    bystander.go("vol");
    bystander.write(1, 0, &pattern(4096, 1));

    // Garbage instead of client flags: flags without FIXED_NEWSTYLE, unknown flag bits.
    for flags in [0u32, FLAG_C_FIXED_NEWSTYLE | 0x80, 0xdead_beef] {
        let mut c = RawClient::connect(&addr);
        c.send_lossy(&flags.to_be_bytes());
        assert!(c.is_closed_by_server(), "client flags {flags:#x}");
    }
    // Bad option magic.
    let mut c = RawClient::connect_fixed(&addr);
    c.send_lossy(b"NOTMAGIC\0\0\0\x01\0\0\0\0");
    assert!(c.is_closed_by_server());
    // An option claiming more data than the server accepts.
    let mut c = RawClient::connect_fixed(&addr);
    let mut b = OPTS_MAGIC.to_be_bytes().to_vec();
    b.extend_from_slice(&OPT_GO.to_be_bytes());
    b.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send_lossy(&b);
    assert!(c.is_closed_by_server());
    // NBD_OPT_EXPORT_NAME cannot be refused politely: unknown export, name too long.
    let mut c = RawClient::connect_fixed(&addr);
    c.send_option(OPT_EXPORT_NAME, b"nope");
    assert!(c.is_closed_by_server());
    let mut c = RawClient::connect_fixed(&addr);
    c.send_option(OPT_EXPORT_NAME, &[b'x'; 5000]);
    assert!(c.is_closed_by_server());
    // Export name after extended headers.
    let mut c = RawClient::connect_fixed(&addr);
    c.extended_headers();
    c.send_option(OPT_EXPORT_NAME, b"vol");
    assert!(c.is_closed_by_server());
    // Hanging up in the middle of an option, or right after the greeting.
    let mut c = RawClient::connect_fixed(&addr);
    c.send(&OPTS_MAGIC.to_be_bytes());
    drop(c);
    drop(RawClient::connect(&addr));
    // Random bytes.
    let mut c = RawClient::connect(&addr);
    c.send_lossy(&pattern(3000, 7));
    assert!(c.is_closed_by_server());

    // The bystander did not notice; new clients are served.
    assert_eq!(bystander.read(2, 0, 4096), pattern(4096, 1));
    bystander.disconnect();
    well_behaved_session(&addr, "vol");
}

#[test]
fn handshake_times_out() {
    let srv = InProcessServer::start_with(ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    });
    srv.add("vol", MIB, false);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    let t = Instant::now();
    assert!(c.is_closed_by_server());
    assert!(t.elapsed() >= Duration::from_millis(250));
    well_behaved_session(&srv.tcp, "vol");
}

#[test]
fn bad_options_get_error_replies_and_negotiation_goes_on() {
    let srv = InProcessServer::start();
    srv.add("vol", 16 * MIB, false);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    let last = |r: Vec<OptReply>| r.last().expect("reply").reply_type;

    assert_eq!(last(c.option(4242, b"whatever")), ERR_UNSUP);
    assert_eq!(last(c.option(OPT_STARTTLS, &[])), ERR_POLICY);
    assert_eq!(last(c.option(OPT_LIST, b"x")), ERR_INVALID);
    assert_eq!(last(c.option(OPT_STRUCTURED_REPLY, b"x")), ERR_INVALID);
    assert_eq!(last(c.option(OPT_EXTENDED_HEADERS, b"xy")), ERR_INVALID);
    // Meta contexts need structured replies first.
    assert_eq!(
        last(c.option(
            OPT_SET_META_CONTEXT,
            &meta_payload("vol", &["base:allocation"])
        )),
        ERR_INVALID
    );
    // Malformed GO/INFO payloads: truncated, lengths that do not add up, trailing bytes,
    // names over 4096 bytes, invalid UTF-8.
    assert_eq!(last(c.option(OPT_GO, &[0, 0])), ERR_INVALID);
    let mut bad = info_payload("vol", &[]);
    bad[3] = 200;
    assert_eq!(last(c.option(OPT_GO, &bad)), ERR_INVALID);
    let mut bad = info_payload("vol", &[INFO_NAME]);
    bad.push(0);
    assert_eq!(last(c.option(OPT_INFO, &bad)), ERR_INVALID);
    assert_eq!(
        last(c.option(OPT_GO, &info_payload(&"n".repeat(4097), &[]))),
        ERR_INVALID
    );
    let mut bad = info_payload("vol", &[]);
    bad[4] = 0xff;
    assert_eq!(last(c.option(OPT_GO, &bad)), ERR_INVALID);
    // Unknown exports, and the default export when none is set.
    assert_eq!(
        last(c.option(OPT_GO, &info_payload("nope", &[]))),
        ERR_UNKNOWN
    );
    assert_eq!(
        last(c.option(OPT_INFO, &info_payload("", &[]))),
        ERR_UNKNOWN
    );

    c.structured_reply();
    assert_eq!(last(c.option(OPT_STRUCTURED_REPLY, &[])), ERR_INVALID);
    // Malformed meta-context queries.
    assert_eq!(
        last(c.option(OPT_SET_META_CONTEXT, &meta_payload("vol", &["nocolon"]))),
        ERR_INVALID
    );
    let mut bad = meta_payload("vol", &["base:allocation"]);
    bad.truncate(bad.len() - 3);
    assert_eq!(last(c.option(OPT_LIST_META_CONTEXT, &bad)), ERR_INVALID);
    assert_eq!(
        last(c.option(
            OPT_SET_META_CONTEXT,
            &meta_payload("nope", &["base:allocation"])
        )),
        ERR_UNKNOWN
    );
    c.extended_headers();
    assert_eq!(last(c.option(OPT_EXTENDED_HEADERS, &[])), ERR_INVALID);
    assert_eq!(
        last(c.option(OPT_STRUCTURED_REPLY, &[])),
        ERR_EXT_HEADER_REQD
    );

    // After all that, the same connection negotiates and works.
    let id = c.select_base_allocation("vol");
    c.go("vol");
    c.write(1, 0, &pattern(4096, 3));
    c.request(0, CMD_BLOCK_STATUS, 2, 0, 2 * BLOCK as u64, &[]);
    let r = c.read_reply();
    let Reply::Chunk {
        chunk_type,
        payload,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(chunk_type, REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!(be_u32(&payload[0..4]), id);
    c.disconnect();
}

#[test]
fn info_list_and_meta_contexts_describe_exports() {
    let srv = InProcessServer::start();
    srv.add("alpha", 10 * MIB, false);
    srv.add("beta", 3 * MIB + 512, true);
    srv.exports.set_default(Some("beta")).unwrap();
    let mut c = RawClient::connect_fixed(&srv.tcp);

    let list = c.option(OPT_LIST, &[]);
    let names: Vec<String> = list
        .iter()
        .filter(|r| r.reply_type == REP_SERVER)
        .map(|r| {
            let n = be_u32(&r.data[0..4]) as usize;
            String::from_utf8(r.data[4..4 + n].to_vec()).unwrap()
        })
        .collect();
    assert_eq!(names, vec!["alpha", "beta"]);
    assert_eq!(list.last().unwrap().reply_type, REP_ACK);

    // INFO on the default export: its canonical name comes back, and the block sizes.
    let info = c.option(OPT_INFO, &info_payload("", &[INFO_BLOCK_SIZE]));
    assert_eq!(info.last().unwrap().reply_type, REP_ACK);
    let find = |t: u16| {
        info.iter()
            .find(|r| r.reply_type == REP_INFO && be_u16(&r.data[0..2]) == t)
            .unwrap_or_else(|| panic!("info {t} missing in {info:?}"))
            .data
            .clone()
    };
    assert_eq!(&find(INFO_NAME)[2..], b"beta");
    assert_eq!(&find(INFO_DESCRIPTION)[2..], b"test export beta");
    let bs = find(INFO_BLOCK_SIZE);
    assert_eq!(
        (be_u32(&bs[2..6]), be_u32(&bs[6..10]), be_u32(&bs[10..14])),
        (512, BLOCK, 32 << 20)
    );
    let ex = find(INFO_EXPORT);
    assert_eq!(be_u64(&ex[2..10]), 3 * MIB + 512);
    let flags = be_u16(&ex[10..12]);
    assert_ne!(flags & TF_READ_ONLY, 0);
    assert_eq!(flags & (TF_SEND_TRIM | TF_SEND_WRITE_ZEROES), 0);
    assert_ne!(flags & TF_CAN_MULTI_CONN, 0);

    // LIST_META_CONTEXT: everything, the base: wildcard, other namespaces ignored.
    for queries in [&[][..], &["base:"][..], &["base:allocation", "qemu:x"][..]] {
        let r = c.option(OPT_LIST_META_CONTEXT, &meta_payload("alpha", queries));
        assert_eq!(r.len(), 2, "{queries:?}: {r:?}");
        assert_eq!(&r[0].data[4..], b"base:allocation");
    }
    let r = c.option(
        OPT_LIST_META_CONTEXT,
        &meta_payload("alpha", &["qemu:dirty-bitmap:x"]),
    );
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].reply_type, REP_ACK);

    // NBD_OPT_ABORT is acknowledged and the server hangs up.
    let r = c.option(OPT_ABORT, &[]);
    assert_eq!(r[0].reply_type, REP_ACK);
    assert!(c.is_closed_by_server());
}

#[test]
fn bad_requests_get_errors_and_the_connection_survives() {
    let srv = InProcessServer::start();
    srv.add("vol", 16 * MIB, false);
    srv.add("ro", MIB, true);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.go("vol"); // simple replies, block sizes requested (512-byte alignment enforced)

    let expect = |c: &mut RawClient, flags, cmd, off, len, payload: &[u8], err| {
        c.request(flags, cmd, 77, off, len, payload);
        let r = c.read_reply();
        assert_eq!(
            r,
            Reply::Simple {
                cookie: 77,
                error: err
            },
            "{cmd} {off} {len}"
        );
    };
    expect(&mut c, 0, 42, 0, 0, &[], EINVAL); // unknown command
    expect(&mut c, 0, CMD_READ, 16 * MIB - 512, 1024, &[], EINVAL); // past the end
    expect(&mut c, 0, CMD_READ, u64::MAX - 511, 1024, &[], EINVAL); // offset overflow
    expect(&mut c, 0, CMD_WRITE, 16 * MIB, 512, &[1; 512], ENOSPC); // payload drained
    expect(
        &mut c,
        0,
        CMD_WRITE_ZEROES,
        16 * MIB - 512,
        4096,
        &[],
        ENOSPC,
    );
    expect(&mut c, 0, CMD_TRIM, 16 * MIB, 512, &[], EINVAL);
    expect(&mut c, CMD_FLAG_NO_HOLE, CMD_READ, 0, 512, &[], EINVAL); // flag for another command
    expect(&mut c, 0x8000, CMD_FLUSH, 0, 0, &[], EINVAL); // unknown flag
    expect(&mut c, CMD_FLAG_DF, CMD_READ, 0, 512, &[], EINVAL); // DF without structured replies
    expect(&mut c, 0, CMD_FLUSH, 4096, 0, &[], EINVAL);
    expect(&mut c, 0, CMD_READ, 0, 64 * MIB, &[], EINVAL); // larger than the 32 MiB maximum
    expect(
        &mut c,
        0,
        CMD_WRITE,
        0,
        33 * MIB,
        &vec![0; 33 << 20],
        EINVAL,
    ); // drained too
    expect(&mut c, 0, CMD_WRITE, 1, 512, &[0; 512], EINVAL); // unaligned
    expect(&mut c, 0, CMD_BLOCK_STATUS, 0, 512, &[], EINVAL); // no metadata context
    // Zero-length requests are harmless.
    expect(&mut c, 0, CMD_WRITE, 0, 0, &[], 0);
    expect(&mut c, 0, CMD_TRIM, 0, 0, &[], 0);
    c.request(0, CMD_READ, 78, 0, 0, &[]);
    assert_eq!(
        c.read_reply(),
        Reply::Simple {
            cookie: 78,
            error: 0
        }
    );

    // Still in sync: a write and a read round-trip.
    let data = pattern(4096, 9);
    c.write(5, 8192, &data);
    assert_eq!(c.read(6, 8192, 4096), data);
    c.disconnect();

    // A read-only export refuses every kind of write with EPERM, and serves reads.
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.go("ro");
    for (cmd, payload) in [
        (CMD_WRITE, vec![0u8; 512]),
        (CMD_TRIM, vec![]),
        (CMD_WRITE_ZEROES, vec![]),
    ] {
        c.request(0, cmd, 9, 0, 512, &payload);
        assert_eq!(
            c.read_reply(),
            Reply::Simple {
                cookie: 9,
                error: EPERM
            }
        );
    }
    assert_eq!(c.read(10, 0, 512), vec![0; 512]);
    c.disconnect();
}

#[test]
fn framing_errors_drop_only_that_connection() {
    let srv = InProcessServer::start();
    let dev = srv.add("vol", 16 * MIB, false);
    let addr = srv.tcp.clone();

    // Bad request magic.
    let mut c = RawClient::connect_fixed(&addr);
    c.go("vol");
    c.send(&[0u8; 28]);
    assert!(c.is_closed_by_server());
    // A write whose payload is too large to skip.
    let mut c = RawClient::connect_fixed(&addr);
    c.go("vol");
    c.request(0, CMD_WRITE, 1, 0, 0xffff_fff0, &[]);
    assert!(c.is_closed_by_server());
    // An extended-header client sending a compact header.
    let mut c = RawClient::connect_fixed(&addr);
    c.extended_headers();
    c.go("vol");
    c.extended = false;
    c.request(0, CMD_READ, 1, 0, 512, &[0; 4]); // 32 bytes with the compact magic
    assert!(c.is_closed_by_server());
    // Disconnecting in the middle of a write payload: that write never happens.
    let mut c = RawClient::connect_fixed(&addr);
    c.go("vol");
    c.request(0, CMD_WRITE, 1, 0, 65536, &[7u8; 1000]);
    drop(c);
    // Disconnecting with requests in flight.
    let mut c = RawClient::connect_fixed(&addr);
    c.go("vol");
    for i in 0..50 {
        c.request(0, CMD_READ, i, 0, 65536, &[]);
    }
    drop(c);

    let deadline = Instant::now() + Duration::from_secs(10);
    while srv.server.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        srv.server.connections(),
        0,
        "every broken connection was closed"
    );
    assert_eq!(
        dev.mem.allocated_blocks(),
        0,
        "the half-sent write was not executed"
    );
    well_behaved_session(&addr, "vol");
}

#[test]
fn structured_reads_send_holes_for_unallocated_ranges() {
    let srv = InProcessServer::start();
    srv.add("vol", 16 * MIB, false);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.structured_reply();
    c.go("vol");
    let b = BLOCK as u64;
    let data = pattern(BLOCK as usize, 5);
    c.write(1, b, &data); // block 1 allocated; blocks 0, 2, 3 holes

    // A read of blocks 0..4: hole, data, hole (one chunk per run), the last one DONE.
    c.request(0, CMD_READ, 2, 0, 4 * b, &[]);
    let chunks = c.read_chunks();
    let kinds: Vec<(u16, u64)> = chunks
        .iter()
        .map(|r| match r {
            Reply::Chunk {
                chunk_type,
                payload,
                ..
            } => (*chunk_type, be_u64(&payload[0..8])),
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(
        kinds,
        vec![
            (REPLY_TYPE_OFFSET_HOLE, 0),
            (REPLY_TYPE_OFFSET_DATA, b),
            (REPLY_TYPE_OFFSET_HOLE, 2 * b)
        ]
    );
    let Reply::Chunk { payload, .. } = &chunks[2] else {
        unreachable!()
    };
    assert_eq!(be_u32(&payload[8..12]) as u64, 2 * b);
    assert!(chunks[2].is_done() && !chunks[0].is_done());
    // Reassembled, it is what was written.
    let all = c.read(3, 0, 4 * b as usize);
    assert_eq!(&all[b as usize..2 * b as usize], &data[..]);
    assert!(all[..b as usize].iter().all(|&x| x == 0));
    // Without hole detection, the same read is one data chunk of zeros and data.
    let plain = InProcessServer::start_with(ServerConfig {
        sparse_reads: false,
        ..ServerConfig::default()
    });
    plain.add("vol", 16 * MIB, false);
    let mut p = RawClient::connect_fixed(&plain.tcp);
    p.structured_reply();
    p.go("vol");
    p.write(1, b, &data);
    p.request(0, CMD_READ, 2, 0, 4 * b, &[]);
    let chunks = p.read_chunks();
    assert_eq!(chunks.len(), 1);
    assert!(
        matches!(&chunks[0], Reply::Chunk { chunk_type, .. } if *chunk_type == REPLY_TYPE_OFFSET_DATA)
    );
    p.disconnect();
    // A read entirely in a hole is one hole chunk.
    c.request(0, CMD_READ, 4, 8 * b, b, &[]);
    let chunks = c.read_chunks();
    assert_eq!(chunks.len(), 1);
    assert!(
        matches!(&chunks[0], Reply::Chunk { chunk_type, .. } if *chunk_type == REPLY_TYPE_OFFSET_HOLE)
    );
    // DF: one data chunk with the zeros spelled out.
    c.request(CMD_FLAG_DF, CMD_READ, 5, 0, 2 * b, &[]);
    let chunks = c.read_chunks();
    assert_eq!(chunks.len(), 1);
    let Reply::Chunk {
        chunk_type,
        payload,
        ..
    } = &chunks[0]
    else {
        unreachable!()
    };
    assert_eq!(*chunk_type, REPLY_TYPE_OFFSET_DATA);
    assert_eq!(payload.len(), 8 + 2 * b as usize);
    assert_eq!(&payload[8 + b as usize..], &data[..]);
    // A zero-length read gets a NONE chunk (never a simple reply).
    c.request(0, CMD_READ, 7, 0, 0, &[]);
    assert_eq!(
        c.read_reply(),
        Reply::Chunk {
            cookie: 7,
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_NONE,
            offset: None,
            payload: vec![]
        }
    );
    // An out-of-range read gets an error chunk (never a simple reply).
    c.request(0, CMD_READ, 6, 16 * MIB, 512, &[]);
    let r = c.read_reply();
    assert!(matches!(r, Reply::Chunk { chunk_type, .. } if chunk_type == REPLY_TYPE_ERROR));
    assert_eq!(r.error(), EINVAL);
    assert!(r.is_done());
    c.disconnect();
}

#[test]
fn block_status_reports_allocation() {
    let srv = InProcessServer::start();
    srv.add("vol", 16 * MIB, false);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.structured_reply();
    let id = c.select_base_allocation("vol");
    c.go("vol");
    let b = BLOCK as u64;
    c.write(1, 2 * b + 100 * 512, &pattern(512, 1)); // allocates block 2
    c.write(2, 3 * b, &pattern(4096, 2)); // allocates block 3

    let status = |c: &mut RawClient, flags: u16, offset: u64, len: u64| -> Vec<(u32, u32)> {
        c.request(flags, CMD_BLOCK_STATUS, 9, offset, len, &[]);
        let r = c.read_reply();
        let Reply::Chunk {
            chunk_type,
            payload,
            flags,
            ..
        } = r
        else {
            panic!("{r:?}")
        };
        assert_eq!(chunk_type, REPLY_TYPE_BLOCK_STATUS);
        assert_ne!(flags & REPLY_FLAG_DONE, 0);
        assert_eq!(be_u32(&payload[0..4]), id);
        payload[4..]
            .chunks(8)
            .map(|d| (be_u32(&d[0..4]), be_u32(&d[4..8])))
            .collect()
    };
    let hole = STATE_HOLE | STATE_ZERO;
    assert_eq!(
        status(&mut c, 0, 0, 8 * b),
        vec![
            (2 * b as u32, hole),
            (2 * b as u32, 0),
            (4 * b as u32, hole)
        ]
    );
    assert_eq!(
        status(&mut c, CMD_FLAG_REQ_ONE, 0, 8 * b),
        vec![(2 * b as u32, hole)]
    );
    assert_eq!(status(&mut c, CMD_FLAG_REQ_ONE, b, 512), vec![(512, hole)]);
    // Discard gives the blocks back.
    c.request(0, CMD_TRIM, 10, 2 * b, 2 * b, &[]);
    assert_eq!(c.read_reply().error(), 0);
    assert_eq!(status(&mut c, 0, 0, 8 * b), vec![(8 * b as u32, hole)]);
    // Write-zeroes with NO_HOLE stays allocated; without it, it may unmap.
    c.request(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 11, 0, b, &[]);
    assert_eq!(c.read_reply().error(), 0);
    c.request(CMD_FLAG_FUA, CMD_WRITE_ZEROES, 12, b, b, &[]);
    assert_eq!(c.read_reply().error(), 0);
    assert_eq!(
        status(&mut c, 0, 0, 4 * b),
        vec![(b as u32, 0), (3 * b as u32, hole)]
    );
    // FAST_ZERO that would have to write zeros fails fast with ENOTSUP.
    c.request(
        CMD_FLAG_FAST_ZERO | CMD_FLAG_NO_HOLE,
        CMD_WRITE_ZEROES,
        13,
        0,
        b,
        &[],
    );
    assert_eq!(c.read_reply().error(), 95);
    // Past the end: EINVAL; zero length: EINVAL.
    c.request(0, CMD_BLOCK_STATUS, 14, 16 * MIB - 512, 1024, &[]);
    assert_eq!(c.read_reply().error(), EINVAL);
    c.request(0, CMD_BLOCK_STATUS, 15, 0, 0, &[]);
    assert_eq!(c.read_reply().error(), EINVAL);
    c.disconnect();

    // Contexts selected for another export do not carry over.
    srv.add("other", MIB, false);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.structured_reply();
    c.select_base_allocation("vol");
    c.go("other");
    c.request(0, CMD_BLOCK_STATUS, 1, 0, 512, &[]);
    assert_eq!(c.read_reply().error(), EINVAL);
    c.disconnect();
}

#[test]
fn extended_headers_use_64_bit_lengths() {
    let srv = InProcessServer::start();
    let size = 16u64 << 30; // sparse: nothing is allocated until written
    let dev = srv.add("big", size, false);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.extended_headers();
    let id = c.select_base_allocation("big");
    assert_eq!(c.go("big").0, size);

    let data = pattern(65536, 11);
    c.write(1, 8 << 30, &data);
    assert_eq!(c.read(2, 8 << 30, 65536), data);
    // Success replies are NONE chunks echoing the request offset.
    c.request(0, CMD_FLUSH, 3, 0, 0, &[]);
    let r = c.read_reply();
    assert_eq!(
        r,
        Reply::Chunk {
            cookie: 3,
            flags: REPLY_FLAG_DONE,
            chunk_type: REPLY_TYPE_NONE,
            offset: Some(0),
            payload: vec![]
        }
    );
    // Block status over more than 4 GiB in one request, with 64-bit descriptors.
    c.request(0, CMD_BLOCK_STATUS, 4, 0, size, &[]);
    let r = c.read_reply();
    let Reply::Chunk {
        chunk_type,
        payload,
        ..
    } = r
    else {
        panic!("{r:?}")
    };
    assert_eq!(chunk_type, REPLY_TYPE_BLOCK_STATUS_EXT);
    assert_eq!(be_u32(&payload[0..4]), id);
    assert_eq!(be_u32(&payload[4..8]), 3);
    let d: Vec<(u64, u64)> = payload[8..]
        .chunks(16)
        .map(|d| (be_u64(&d[0..8]), be_u64(&d[8..16])))
        .collect();
    let hole = u64::from(STATE_HOLE | STATE_ZERO);
    assert_eq!(
        d,
        vec![
            (8 << 30, hole),
            (BLOCK as u64, 0),
            ((8 << 30) - BLOCK as u64, hole)
        ]
    );
    // A 12 GiB trim in one request.
    c.request(0, CMD_TRIM, 5, 4 << 30, 12 << 30, &[]);
    assert_eq!(c.read_reply().error(), 0);
    assert_eq!(dev.mem.allocated_blocks(), 0);
    // READ is still limited to 32 MiB; a payload on a command without one is skipped.
    c.request(0, CMD_READ, 6, 0, 1 << 32, &[]);
    assert_eq!(c.read_reply().error(), EINVAL);
    c.request(CMD_FLAG_PAYLOAD_LEN, CMD_BLOCK_STATUS, 7, 0, 16, &[0u8; 16]);
    assert_eq!(c.read_reply().error(), EINVAL);
    assert_eq!(c.read(8, 8 << 30, 512), vec![0; 512]);
    c.disconnect();
}

#[test]
fn requests_run_concurrently_and_replies_come_out_of_order() {
    let srv = InProcessServer::start();
    let dev = srv.add("vol", 16 * MIB, false);
    dev.set_slow(MIB, Duration::from_millis(500));
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.structured_reply();
    c.go("vol");
    // The slow request first, then 100 quick ones: the quick ones are all answered first.
    c.request(0, CMD_READ, 1000, MIB, 4096, &[]);
    for i in 0..100u64 {
        c.request(0, CMD_WRITE, i, i * 4096 + 2 * MIB, 4096, &pattern(4096, i));
    }
    let mut seen = Vec::new();
    for _ in 0..101 {
        let r = c.read_reply();
        assert_eq!(r.error(), 0);
        seen.push(r.cookie());
    }
    assert_eq!(seen.last(), Some(&1000), "the slow read finishes last");
    seen.sort_unstable();
    let mut expected: Vec<u64> = (0..100).collect();
    expected.push(1000);
    assert_eq!(seen, expected, "every request answered exactly once");
    for i in [0u64, 57, 99] {
        assert_eq!(c.read(2000 + i, i * 4096 + 2 * MIB, 4096), pattern(4096, i));
    }
    c.disconnect();
}

#[test]
fn device_errors_become_error_replies() {
    let srv = InProcessServer::start();
    let dev = srv.add("vol", 16 * MIB, false);
    dev.set_failing(3 * MIB);
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.go("vol");
    c.request(0, CMD_READ, 1, 3 * MIB, 4096, &[]);
    assert_eq!(
        c.read_reply(),
        Reply::Simple {
            cookie: 1,
            error: EIO
        }
    );
    // No data followed the error: the next reply parses.
    assert_eq!(c.read(2, 0, 512), vec![0; 512]);
    c.disconnect();

    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.structured_reply();
    c.go("vol");
    c.write(1, 3 * MIB, &[1; 4096]);
    c.request(0, CMD_READ, 2, 3 * MIB - 65536, 2 * 65536, &[]);
    let chunks = c.read_chunks();
    assert_eq!(chunks.len(), 1, "only the error chunk: {chunks:?}");
    assert_eq!(chunks[0].error(), EIO);
    let Reply::Chunk { payload, .. } = &chunks[0] else {
        unreachable!()
    };
    let msg_len = be_u16(&payload[4..6]) as usize;
    assert!(
        String::from_utf8_lossy(&payload[6..6 + msg_len]).contains("I/O error"),
        "the error chunk explains itself"
    );
    c.disconnect();
}

#[test]
fn exports_are_added_and_removed_live() {
    let srv = InProcessServer::start();
    let addr = srv.tcp.clone();
    let mut c = RawClient::connect_fixed(&addr);
    assert_eq!(
        c.option(OPT_GO, &info_payload("late", &[]))
            .last()
            .unwrap()
            .reply_type,
        ERR_UNKNOWN
    );
    // Added while the server runs (and while this client negotiates): served at once.
    srv.add("late", MIB, false);
    c.go("late");
    c.write(1, 0, &[5; 512]);
    assert_eq!(srv.exports.connections("late"), Some(1));
    assert!(matches!(
        srv.exports.remove_if_idle("late"),
        Err(ExportError::Busy { connections: 1, .. })
    ));

    // Removed: new clients cannot open it, the connected one carries on.
    let handle = srv.exports.remove("late").expect("was offered");
    let mut d = RawClient::connect_fixed(&addr);
    assert_eq!(
        d.option(OPT_GO, &info_payload("late", &[]))
            .last()
            .unwrap()
            .reply_type,
        ERR_UNKNOWN
    );
    assert_eq!(c.read(2, 0, 512), vec![5; 512]);
    assert_eq!(handle.connections(), 1);

    // Closing its connections: in-flight requests are answered, then the server hangs up.
    handle.device().set_slow(4096, Duration::from_millis(300));
    c.request(0, CMD_WRITE, 3, 4096, 512, &[6; 512]);
    std::thread::sleep(Duration::from_millis(50));
    handle.close_connections();
    let r = c.read_reply();
    assert_eq!((r.cookie(), r.error()), (3, 0));
    assert!(c.is_closed_by_server());
    let deadline = Instant::now() + Duration::from_secs(5);
    while handle.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(handle.connections(), 0);

    // The same name can be offered again, with another device.
    srv.add("late", 2 * MIB, false);
    assert_eq!(d.go("late").0, 2 * MIB);
    d.disconnect();
}

#[test]
fn graceful_shutdown_finishes_in_flight_requests() {
    let mut srv = InProcessServer::start();
    let dev = srv.add("vol", 16 * MIB, false);
    dev.set_slow(0, Duration::from_millis(400));
    let mut c = RawClient::connect_fixed(&srv.tcp);
    c.go("vol");
    let mut idle = RawClient::connect_fixed(&srv.tcp); // still negotiating: just closed
    c.request(CMD_FLAG_FUA, CMD_WRITE, 1, 0, 4096, &pattern(4096, 8));
    std::thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    srv.shutdown_handle().shutdown();
    let r = c.read_reply();
    assert_eq!(
        (r.cookie(), r.error()),
        (1, 0),
        "the in-flight write is answered"
    );
    assert!(c.is_closed_by_server());
    assert!(idle.is_closed_by_server());
    srv.stop();
    assert!(srv.stopped());
    assert!(t.elapsed() < Duration::from_secs(5));
    // The write completed before serve() returned.
    let mut buf = vec![0u8; 4096];
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(uthin::device::BlockDevice::read(
        &dev.mem,
        0,
        &mut [std::io::IoSliceMut::new(&mut buf)],
    ))
    .unwrap();
    assert_eq!(buf, pattern(4096, 8));
    assert!(
        std::net::TcpStream::connect(&srv.tcp).is_err(),
        "no longer listening"
    );
}

#[test]
fn unix_socket_and_tools_after_abuse() {
    require_tool("nbdinfo", "libnbd-bin");
    let srv = InProcessServer::start();
    srv.add("vol", 32 * MIB, false);
    // Some abuse first.
    for _ in 0..5 {
        let mut c = RawClient::connect(&srv.tcp);
        c.send_lossy(&pattern(100, 3));
        assert!(c.is_closed_by_server());
    }
    let out = run(
        "nbdinfo",
        &["--size", &srv.unix_uri("vol")],
        Duration::from_secs(30),
    )
    .ok("nbdinfo --size over the Unix socket");
    assert_eq!(out.stdout.trim(), (32 * MIB).to_string());
    let out = run(
        "nbdinfo",
        &["--size", &srv.tcp_uri("vol")],
        Duration::from_secs(30),
    )
    .ok("nbdinfo --size over TCP");
    assert_eq!(out.stdout.trim(), (32 * MIB).to_string());
}

#[test]
fn connections_beyond_the_limit_are_refused() {
    let srv = InProcessServer::start_with(ServerConfig {
        max_connections: 2,
        ..ServerConfig::default()
    });
    srv.add("vol", MIB, false);
    let mut a = RawClient::connect_fixed(&srv.tcp);
    a.go("vol");
    let b = RawClient::connect_fixed(&srv.tcp);
    // The third is closed at once (it does not even get the greeting).
    let mut third = std::net::TcpStream::connect(&srv.tcp).unwrap();
    third
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut buf = [0u8; 18];
    let n = std::io::Read::read(&mut third, &mut buf).unwrap_or(0);
    assert_eq!(n, 0, "over the limit: closed without a greeting");
    // The others are unaffected; once one leaves, a new client is served.
    a.write(1, 0, &[1; 512]);
    a.disconnect();
    drop(b);
    let deadline = Instant::now() + Duration::from_secs(5);
    while srv.server.connections() > 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    well_behaved_session(&srv.tcp, "vol");
}

#[test]
fn random_options_and_requests_never_take_the_server_down() {
    use rand::{Rng, SeedableRng};
    let srv = InProcessServer::start();
    srv.add("vol", 16 * MIB, false);
    srv.add("ro", MIB, true);
    // A fixed seed keeps CI reproducible; UTHIN_NBD_SEED explores others.
    let seed = std::env::var("UTHIN_NBD_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x006e_6264);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut replies = 0;

    // Random options: known and unknown codes with random data.
    for _ in 0..20 {
        let mut c = RawClient::connect_fixed(&srv.tcp);
        for _ in 0..20 {
            let code = if rng.random_bool(0.7) {
                rng.random_range(1..=12)
            } else {
                rng.random()
            };
            if code == OPT_EXPORT_NAME || code == OPT_GO || code == OPT_ABORT {
                continue; // would (rightly) end the negotiation
            }
            let len = rng.random_range(0..64);
            let data: Vec<u8> = (0..len).map(|_| rng.random()).collect();
            let r = c.option(code, &data);
            replies += r.len();
            // Track the reply modes the random options switched on.
            if r.last().map(|r| r.reply_type) == Some(REP_ACK) {
                if code == OPT_EXTENDED_HEADERS {
                    c.extended = true;
                }
                if code == OPT_STRUCTURED_REPLY || code == OPT_EXTENDED_HEADERS {
                    c.structured = true;
                }
            }
        }
        c.go(if rng.random_bool(0.5) { "vol" } else { "ro" });
        c.disconnect();
    }

    // Random requests with a valid magic on both reply modes.
    let mut closed = 0;
    for round in 0..30 {
        let mut c = RawClient::connect_fixed(&srv.tcp);
        match round % 3 {
            0 => {}
            1 => c.structured_reply(),
            _ => c.extended_headers(),
        }
        c.go("vol");
        for i in 0..40u64 {
            let command = rng.random_range(0..10u16);
            if command == CMD_DISC {
                continue;
            }
            let flags = if rng.random_bool(0.5) {
                0
            } else {
                rng.random()
            };
            let offset = if rng.random_bool(0.7) {
                rng.random_range(0..16 * MIB) & !511
            } else {
                rng.random()
            };
            let len = if rng.random_bool(0.8) {
                rng.random_range(0..256 * 1024u64) & !511
            } else {
                rng.random::<u32>() as u64
            };
            let carries_payload =
                command == CMD_WRITE || (c.extended && flags & CMD_FLAG_PAYLOAD_LEN != 0);
            if carries_payload && len > 1 << 20 {
                continue; // covered by framing_errors_drop_only_that_connection
            }
            let payload = if carries_payload {
                vec![0xa5; len as usize]
            } else {
                vec![]
            };
            c.request(flags, command, i, offset, len, &payload);
            // Every request gets a complete reply (error or not); reads carry data.
            if command == CMD_READ && !c.structured {
                let r = c.read_reply();
                assert_eq!(r.cookie(), i);
                if r.error() == 0 {
                    c.read_n(len as usize);
                }
            } else if c.structured {
                let chunks = c.read_chunks();
                assert!(chunks.iter().all(|r| r.cookie() == i));
                // Reads never get simple replies once structured replies are on, and with
                // extended headers nothing does.
                if command == CMD_READ || c.extended {
                    assert!(
                        chunks.iter().all(|r| matches!(
                            r,
                            Reply::Chunk { offset, .. } if offset.is_some() == c.extended
                        )),
                        "{chunks:?}"
                    );
                }
            } else {
                assert_eq!(c.read_reply().cookie(), i);
            }
            replies += 1;
        }
        if round % 5 == 0 {
            drop(c); // vanish without NBD_CMD_DISC
            closed += 1;
        } else {
            c.disconnect();
        }
    }
    assert!(replies > 1000, "{replies} replies");
    assert!(closed > 0);
    well_behaved_session(&srv.tcp, "vol");
}
