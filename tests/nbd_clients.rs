//! Real NBD clients against the server: qemu-io, qemu-img, nbdinfo, nbdcopy and fio's nbd
//! engine. Each test gets its own server and exports; the clients only see NBD URIs, so every
//! test runs twice: against the in-process server over `TestDevice` (`in_process::*`: the
//! protocol layer) and against the real `uthin serve` binary on a temporary pool (`serve::*`:
//! the whole stack, exports made with `uthin create`).
//!
//! A missing tool fails the test with the Debian package to install (scripts/test.sh installs
//! them); nothing is skipped.

mod nbd_support;
mod serve_support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use nbd_support::*;
use serve_support::ServeProcess;

impl Target for ServeProcess {
    fn tcp_uri(&self, export: &str) -> String {
        ServeProcess::tcp_uri(self, export)
    }
    fn unix_uri(&self, export: &str) -> String {
        ServeProcess::unix_uri(self, export)
    }
    fn create_export(&self, name: &str, size: u64, read_only: bool) {
        ServeProcess::create_export(self, name, size, read_only)
    }
    fn connections(&self) -> usize {
        ServeProcess::connections(self)
    }
    fn description(&self, name: &str) -> String {
        ServeProcess::description(self, name)
    }
}

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

fn qemu_io(uri: &str, commands: &[&str]) -> Output {
    let out = nbd_support::qemu_io(uri, commands, LIMIT);
    assert!(
        !out.stdout.contains("failed") && !out.stderr.contains("failed"),
        "qemu-io reported a failure:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    out
}

/// `(offset, length, description)` lines of `nbdinfo --map`.
fn nbd_map(uri: &str) -> Vec<(u64, u64, String)> {
    require_tool("nbdinfo", "libnbd-bin");
    let out = run("nbdinfo", &["--map", uri], LIMIT).ok("nbdinfo --map");
    out.stdout
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            assert!(f.len() >= 4, "unexpected nbdinfo --map line {l:?}");
            (
                f[0].parse().expect("offset"),
                f[1].parse().expect("length"),
                f[3..].join(" "),
            )
        })
        .collect()
}

/// The allocated (`data`) ranges of an export, as `nbdinfo --map` reports them.
fn data_ranges(uri: &str) -> Vec<(u64, u64)> {
    let map = nbd_map(uri);
    let mut next = 0;
    for (off, len, _) in &map {
        assert_eq!(*off, next, "map extents are contiguous: {map:?}");
        next = off + len;
    }
    map.into_iter()
        .filter(|(_, _, d)| d == "data")
        .map(|(o, l, _)| (o, l))
        .collect()
}

/// Writes a sparse raw image with random data in `extents` (offset, length).
fn sparse_image(path: &Path, size: u64, extents: &[(u64, usize)]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).expect("create image");
    f.set_len(size).expect("size image");
    for (i, (off, len)) in extents.iter().enumerate() {
        f.write_all_at(&pattern(*len, i as u64 + 100), *off)
            .expect("write image");
    }
}

fn qemu_io_patterns_over_tcp_and_unix(t: &impl Target) {
    t.create_export("disk", 64 * MIB, false);
    t.create_export("ro", 8 * MIB, true);
    for uri in [t.tcp_uri("disk"), t.unix_uri("disk")] {
        qemu_io(
            &uri,
            &[
                "write -P 0x11 0 1M",
                // Unaligned writes land exactly where asked.
                "write -P 0x22 4097 5000",
                "read -P 0x11 0 4097",
                "read -P 0x22 4097 5000",
                "read -P 0x11 9097 1039479",
                "write -P 0x33 1048575 3",
                "read -P 0x33 1048575 3",
                // FUA write, flush, concurrent writes.
                "write -f -P 0x44 2M 64k",
                "flush",
                "aio_write -P 0x55 3M 64k",
                "aio_write -P 0x66 4M 1M",
                "aio_flush",
                "read -P 0x44 2M 64k",
                "read -P 0x55 3M 64k",
                "read -P 0x66 4M 1M",
                // Discard and write-zeroes (with and without unmap) read back as zeros.
                "discard 4M 1M",
                "read -P 0 4M 1M",
                "write -z 2M 32k",
                "read -P 0 2M 32k",
                "read -P 0x44 2129920 32k",
                "write -z -u 3M 64k",
                "read -P 0 3M 64k",
                // Large request split by qemu to the advertised maximum.
                "write -P 0x77 16M 40M",
                "read -P 0x77 16M 40M",
                "flush",
            ],
        )
        .ok("qemu-io");
    }
    // Nothing written past what was asked: the tail of the disk is still holes.
    assert_eq!(
        data_ranges(&t.tcp_uri("disk")).last().map(|(o, l)| o + l),
        Some(56 * MIB)
    );
    // A read-only export: reads work, writes are refused.
    let ro = t.tcp_uri("ro");
    let out = run(
        "qemu-io",
        &["-r", "-f", "raw", "-c", "read -P 0 0 1M", &ro],
        LIMIT,
    )
    .ok("qemu-io read-only read");
    assert!(out.stdout.contains("read 1048576/1048576"));
    let out = run(
        "qemu-io",
        &["-f", "raw", "-c", "write -P 1 0 4k", &ro],
        LIMIT,
    );
    assert!(
        !out.status.success(),
        "a write to a read-only export must fail"
    );
}

fn qemu_img_info_convert_and_compare(t: &impl Target) {
    require_tool("qemu-img", "qemu-utils");
    let size = 48 * MIB;
    t.create_export("dst", size, false);
    t.create_export("back", size, false);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let extents = [
        (0, 4096),
        (5 * MIB + 512, 70000),
        (20 * MIB, 3 << 20),
        (size - 4096, 4096),
    ];
    sparse_image(&src, size, &extents);
    let src = src.to_str().unwrap();
    let dst = t.tcp_uri("dst");

    let info = run("qemu-img", &["info", "--output=json", &dst], LIMIT).ok("qemu-img info");
    assert!(
        info.stdout.contains(&format!("\"virtual-size\": {size}")),
        "{}",
        info.stdout
    );
    // raw file -> export
    run(
        "qemu-img",
        &["convert", "-n", "-f", "raw", "-O", "raw", src, &dst],
        LIMIT,
    )
    .ok("qemu-img convert raw -> nbd");
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &dst],
        LIMIT,
    )
    .ok("qemu-img compare raw nbd");
    // Holes stayed holes: only blocks holding data are allocated.
    let allocated: u64 = data_ranges(&dst).iter().map(|(_, l)| l).sum();
    assert!(
        allocated <= 6 * MIB,
        "{allocated} bytes allocated for ~3.2 MiB of data"
    );
    // export -> qcow2 -> another export
    let qcow = dir.path().join("copy.qcow2");
    let qcow = qcow.to_str().unwrap();
    run(
        "qemu-img",
        &["convert", "-f", "raw", "-O", "qcow2", &dst, qcow],
        LIMIT,
    )
    .ok("qemu-img convert nbd -> qcow2");
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "qcow2", src, qcow],
        LIMIT,
    )
    .ok("qemu-img compare raw qcow2");
    let back = t.tcp_uri("back");
    run(
        "qemu-img",
        &["convert", "-n", "-f", "qcow2", "-O", "raw", qcow, &back],
        LIMIT,
    )
    .ok("qemu-img convert qcow2 -> nbd");
    run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", &dst, &back],
        LIMIT,
    )
    .ok("qemu-img compare nbd nbd");
    // compare notices a difference.
    qemu_io(&back, &["write -P 0x5a 30M 512"]).ok("qemu-io");
    let out = run(
        "qemu-img",
        &["compare", "-f", "raw", "-F", "raw", src, &back],
        LIMIT,
    );
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    // export -> raw file
    let out_raw = dir.path().join("out.raw");
    run(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "raw",
            &dst,
            out_raw.to_str().unwrap(),
        ],
        LIMIT,
    )
    .ok("qemu-img convert nbd -> raw");
    assert_eq!(
        std::fs::read(&out_raw).unwrap(),
        std::fs::read(src).unwrap()
    );
}

fn nbdinfo_lists_sizes_and_maps_exports(t: &impl Target) {
    t.create_export("alpha", 8 * MIB, true);
    t.create_export("beta", 64 * MIB, false);
    require_tool("nbdinfo", "libnbd-bin");
    let base = t.tcp_uri("");
    let out = run("nbdinfo", &["--list", &base], LIMIT).ok("nbdinfo --list");
    for needle in [
        "export=\"alpha\"",
        "export=\"beta\"",
        &format!("description: {}", t.description("beta")),
        "export-size: 67108864",
        "is_read_only: true",
        "can_multi_conn: true",
        "can_fast_zero: true",
        "block_size_preferred: 65536",
        "base:allocation",
    ] {
        assert!(
            out.stdout.contains(needle),
            "{needle:?} missing:\n{}",
            out.stdout
        );
    }
    let beta = t.tcp_uri("beta");
    let out = run("nbdinfo", &["--size", &beta], LIMIT).ok("nbdinfo --size");
    assert_eq!(out.stdout.trim(), (64 * MIB).to_string());

    // Only the blocks written are allocated, at the export's 64 KiB granularity.
    assert_eq!(data_ranges(&beta), vec![]);
    qemu_io(
        &beta,
        &[
            "write -P 1 327680 4k",
            "write -P 2 10M 1M",
            "write -P 3 40M 1",
        ],
    )
    .ok("qemu-io");
    assert_eq!(
        data_ranges(&beta),
        vec![(327680, 65536), (10 * MIB, MIB), (40 * MIB, 65536)]
    );
    let map = nbd_map(&beta);
    assert!(
        map.iter().all(|(_, _, d)| d == "data" || d == "hole,zero"),
        "{map:?}"
    );
    // Discarding gives the blocks back.
    qemu_io(&beta, &["discard 10M 1M"]).ok("qemu-io discard");
    assert_eq!(data_ranges(&beta), vec![(327680, 65536), (40 * MIB, 65536)]);
}

fn nbdcopy_copies_sparsely_in_and_out(t: &impl Target) {
    require_tool("nbdcopy", "libnbd-bin");
    let size = 64 * MIB;
    t.create_export("vol", size, false);
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    sparse_image(
        &src,
        size,
        &[(MIB, 2 << 20), (33 * MIB, 65536), (60 * MIB, 100)],
    );
    let vol = t.tcp_uri("vol");

    run("nbdcopy", &[src.to_str().unwrap(), &vol], LIMIT).ok("nbdcopy in");
    assert_eq!(
        data_ranges(&vol),
        vec![(MIB, 2 * MIB), (33 * MIB, 65536), (60 * MIB, 65536)],
        "only the source's data became allocated"
    );
    let out = dir.path().join("out.raw");
    run("nbdcopy", &[&vol, out.to_str().unwrap()], LIMIT).ok("nbdcopy out");
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    assert!(
        allocated_bytes(&out) < 4 * MIB,
        "the copy out is sparse ({} bytes allocated)",
        allocated_bytes(&out)
    );
    // Export to export, several connections each side.
    t.create_export("copy", size, false);
    let copy = t.tcp_uri("copy");
    run("nbdcopy", &["--connections=4", &vol, &copy], LIMIT).ok("nbdcopy nbd -> nbd");
    assert_eq!(data_ranges(&copy), data_ranges(&vol));
    let out2 = dir.path().join("out2.raw");
    run("nbdcopy", &[&copy, out2.to_str().unwrap()], LIMIT).ok("nbdcopy out again");
    assert_eq!(std::fs::read(&out2).unwrap(), std::fs::read(&src).unwrap());
}

/// Runs fio's nbd engine, recording the most connections the server had while it ran.
fn fio(t: &impl Target, args: &[&str]) -> (Output, usize) {
    require_tool("fio", "fio");
    let running = AtomicBool::new(true);
    let max_conns = AtomicUsize::new(0);
    let out = std::thread::scope(|scope| {
        scope.spawn(|| {
            while running.load(Ordering::Relaxed) {
                max_conns.fetch_max(t.connections(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(2));
            }
        });
        let out = run("fio", args, LIMIT);
        running.store(false, Ordering::Relaxed);
        out
    });
    (out, max_conns.into_inner())
}

fn fio_nbd_engine_verifies_random_and_sequential_io(t: &impl Target) {
    t.create_export("fio", 256 * MIB, false);
    let uri = format!("--uri={}", t.tcp_uri("fio"));
    let common = [
        "--ioengine=nbd",
        uri.as_str(),
        "--verify=crc32c",
        "--verify_fatal=1",
        "--do_verify=1",
        // fio would otherwise leave *-verify.state files in the working directory.
        "--verify_state_save=0",
        "--group_reporting",
    ];
    // 4 jobs = 4 connections, each on its own 32 MiB region.
    let mut args = common.to_vec();
    args.extend([
        "--name=rand",
        "--rw=randwrite",
        "--bs=4k",
        "--iodepth=16",
        "--numjobs=4",
        "--size=24M",
        "--offset_increment=32M",
    ]);
    let (out, conns) = fio(t, &args);
    let out = out.ok("fio randwrite + verify");
    assert!(out.stdout.contains("err= 0"), "{}", out.stdout);
    assert!(conns >= 2, "fio's jobs used {conns} connection(s)");

    let mut args = common.to_vec();
    args.extend([
        "--name=seq",
        "--rw=write",
        "--bs=1M",
        "--iodepth=8",
        "--numjobs=2",
        "--size=64M",
        "--offset=128M",
        "--offset_increment=64M",
    ]);
    let (out, _) = fio(t, &args);
    let out = out.ok("fio sequential write + verify");
    assert!(out.stdout.contains("err= 0"), "{}", out.stdout);

    // Mixed random I/O with odd sizes, then a verify-only pass over what the first job wrote.
    let mut args = common.to_vec();
    args.extend([
        "--name=mixed",
        "--rw=randrw",
        "--bsrange=512-128k",
        "--iodepth=32",
        "--numjobs=1",
        "--size=16M",
        "--offset=200M",
    ]);
    let (out, _) = fio(t, &args);
    out.ok("fio randrw");
}

/// Runs each test body against both servers, `uthin serve` in both cache modes.
macro_rules! against_both_servers {
    ($($name:ident),* $(,)?) => {
        mod in_process {
            $( #[test] fn $name() { super::$name(&super::InProcessServer::start()); } )*
        }
        mod serve {
            $( #[test] fn $name() { super::$name(&super::ServeProcess::start_fresh()); } )*
        }
        mod serve_direct {
            $( #[test] fn $name() {
                let s = super::ServeProcess::start_fresh_with(&["--cache", "direct"]);
                s.assert_cache_mode("Direct");
                super::$name(&s);
            } )*
        }
    };
}

/// `serve --threads 1`: one worker thread for every connection, commit and control request
/// still serves every client (the log says how many it runs).
#[test]
fn serve_with_one_worker_thread() {
    let s = ServeProcess::start_fresh_with(&["--threads", "1"]);
    assert!(
        s.log().contains("worker threads: 1\n"),
        "no `worker threads: 1` in the log:\n{}",
        s.log()
    );
    qemu_io_patterns_over_tcp_and_unix(&s);
    fio_nbd_engine_verifies_random_and_sequential_io(&s);
}

against_both_servers!(
    qemu_io_patterns_over_tcp_and_unix,
    qemu_img_info_convert_and_compare,
    nbdinfo_lists_sizes_and_maps_exports,
    nbdcopy_copies_sparsely_in_and_out,
    fio_nbd_engine_verifies_random_and_sequential_io
);
