//! `uthin serve` managed live: the real binary, real clients (qemu-io, nbdinfo, a raw NBD
//! client), the real command line talking to the control socket.
//!
//! - the first run on a fresh machine (no pool) creates and serves the default pool;
//! - create / snapshot / rename / delete while clients are connected (delete is refused while
//!   a client uses the volume), a live snapshot holding exactly the acknowledged writes;
//! - a write that runs out of space fails with ENOSPC and succeeds after a live `pool grow`;
//! - discard gives the space back to the host file system;
//! - a restart serves the same data;
//! - the control socket: owner-only, garbage answered with errors, a second server refused,
//!   offline-only commands refused, live output identical to offline output.

mod nbd_support;
mod serve_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nbd_support::{RawClient, pattern, require_tool, run};
use serve_support::{ServeProcess, parse_tcp, uthin_bin};

const MIB: u64 = 1 << 20;
const LIMIT: Duration = Duration::from_secs(120);

/// qemu-io's combined output (it exits 0 even when a command fails, so callers look at it).
fn qemu_io(uri: &str, commands: &[&str]) -> String {
    let out = nbd_support::qemu_io(uri, commands, LIMIT);
    format!("{}{}", out.stdout, out.stderr)
}

/// qemu-io commands that must all succeed.
fn qemu_io_ok(uri: &str, commands: &[&str]) {
    let out = qemu_io(uri, commands);
    assert!(
        !out.contains("failed") && !out.contains("Pattern verification"),
        "qemu-io {commands:?} on {uri}:\n{out}"
    );
}

fn nbd_list(s: &ServeProcess) -> String {
    require_tool("nbdinfo", "libnbd-bin");
    run("nbdinfo", &["--list", &s.tcp_uri("")], LIMIT)
        .ok("nbdinfo --list")
        .stdout
}

/// Retries `uthin delete NAME` while the server still counts a connection that just closed.
fn delete_when_idle(s: &ServeProcess, name: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let o = s.uthin(&["delete", name]);
        if o.code == Some(0) {
            assert_eq!(o.stdout, format!("deleted {name}\n"));
            return;
        }
        assert!(o.stderr.contains("in use"), "{}", o.text());
        assert!(
            Instant::now() < deadline,
            "{name} stays in use: {}",
            o.text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn first_run_creates_and_serves_the_default_pool() {
    require_tool("qemu-img", "qemu-utils");
    let cwd = tempfile::tempdir().unwrap();
    // README's first command binds the default port; if something else on this machine holds
    // it, the test asks for a free one instead (everything else is the same).
    let default_port_free = std::net::TcpListener::bind("127.0.0.1:10809").is_ok();
    let log_path = cwd.path().join("serve.log");
    let mut cmd = Command::new(uthin_bin());
    cmd.arg("serve");
    if !default_port_free {
        cmd.args(["--nbd", "127.0.0.1:0"]);
    }
    let mut child = cmd
        .current_dir(cwd.path())
        .env_remove("UTHIN_POOL")
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("ready (pid") {
            break log;
        }
        assert!(child.try_wait().unwrap().is_none(), "serve exited:\n{log}");
        assert!(Instant::now() < deadline, "not ready:\n{log}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let pool = cwd.path().join("uthin-pool");
    let data = std::fs::metadata(pool.join("data")).unwrap();
    assert_eq!(data.len(), 100 << 30, "100 GiB of data space");
    assert!(data.blocks() * 512 < MIB, "the data file is sparse");
    let uri = if default_port_free {
        "nbd://127.0.0.1/vol0".to_string()
    } else {
        format!("nbd://{}/vol0", parse_tcp(&log).unwrap())
    };
    for hint in [
        format!("qemu-img info {uri}"),
        format!("nbdinfo {uri}"),
        "nbdfuse".to_string(),
        "vhost-user-blk-pci".to_string(),
        "created pool uthin-pool".to_string(),
    ] {
        assert!(log.contains(&hint), "the log should show {hint:?}:\n{log}");
    }
    let info = run("qemu-img", &["info", "--output=json", &uri], LIMIT).ok("qemu-img info");
    assert!(
        info.stdout.contains("\"virtual-size\": 10737418240"),
        "{}",
        info.stdout
    );
    // Commands without --pool find the same default pool and its server.
    let list = Command::new(uthin_bin())
        .arg("list")
        .current_dir(cwd.path())
        .env_remove("UTHIN_POOL")
        .output()
        .unwrap();
    let list = String::from_utf8_lossy(&list.stdout).into_owned();
    assert!(list.contains("vol0") && list.contains("10G"), "{list}");
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "SIGTERM exits 0");
    assert!(!pool.join("control.sock").exists());
    // A second run serves the pool it finds rather than creating another.
    let again = Command::new(uthin_bin())
        .args(["list", "--json"])
        .current_dir(cwd.path())
        .env_remove("UTHIN_POOL")
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&again.stdout).contains("\"vol0\""));
}

#[test]
fn create_snapshot_rename_delete_with_clients_connected() {
    require_tool("nbdinfo", "libnbd-bin");
    let s = ServeProcess::start_fresh();
    assert_eq!(
        s.ok(&["create", "a", "--size", "64M"]),
        "created a (device 1, 64M)\n"
    );
    // Exported at once.
    let size = run("nbdinfo", &["--size", &s.tcp_uri("a")], LIMIT).ok("nbdinfo --size");
    assert_eq!(size.stdout.trim(), (64 * MIB).to_string());
    qemu_io_ok(&s.tcp_uri("a"), &["write -P 0x11 0 4M", "flush"]);

    // A client stays connected to `a` through what follows.
    let mut c = RawClient::connect_fixed(&s.tcp);
    c.go("a");
    assert_eq!(
        s.ok(&["snapshot", "a", "a-snap"]),
        "created snapshot a-snap (device 2, 64M)\n"
    );
    // The origin is rewritten (by the connected client and by another one): the snapshot
    // keeps the old data, the origin reads the new.
    c.write(1, 0, &[0x22; 65536]);
    qemu_io_ok(&s.tcp_uri("a"), &["write -P 0x22 64k 4032k"]);
    qemu_io_ok(&s.tcp_uri("a"), &["read -P 0x22 0 4M"]);
    qemu_io_ok(
        &s.unix_uri("a-snap"),
        &["read -P 0x11 0 4M", "read -P 0 4M 60M"],
    );

    // Deleting a volume in use is refused, and changes nothing.
    s.fails(&["delete", "a"], "in use by 1 NBD connection");
    assert!(nbd_list(&s).contains("export=\"a\""));
    assert_eq!(c.read(2, 0, 4096), vec![0x22; 4096]);
    c.disconnect();
    delete_when_idle(&s, "a");
    let list = nbd_list(&s);
    assert!(!list.contains("export=\"a\""), "{list}");
    assert!(list.contains("export=\"a-snap\""), "{list}");
    qemu_io_ok(&s.tcp_uri("a-snap"), &["read -P 0x11 0 4M"]);

    // Rename with a client connected: it keeps its device, the new name is exported, the old
    // one is gone, and the volume cannot be deleted while that client remains.
    let mut c2 = RawClient::connect_fixed(&s.tcp);
    c2.go("a-snap");
    assert_eq!(
        s.ok(&["rename", "a-snap", "golden"]),
        "renamed a-snap to golden\n"
    );
    let list = nbd_list(&s);
    assert!(list.contains("export=\"golden\"") && !list.contains("export=\"a-snap\""));
    assert_eq!(c2.read(3, 0, 4096), vec![0x11; 4096]);
    s.fails(&["delete", "golden"], "in use by 1 NBD connection");
    c2.disconnect();
    delete_when_idle(&s, "golden");
    assert!(
        s.ok(&["list"]).lines().count() == 1,
        "only the header is left"
    );
}

#[test]
fn live_snapshot_holds_every_acknowledged_write() {
    let s = ServeProcess::start_fresh();
    s.ok(&["create", "seq", "--size", "1G"]);
    const BLOCKS: u64 = 16384; // 64 KiB blocks in 1 GiB
    let acked = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    // One client writes 4 KiB at the start of block 0, 1, 2, ... each after the previous one
    // was acknowledged, while the snapshot is taken.
    let writer = {
        let (acked, stop, addr) = (acked.clone(), stop.clone(), s.tcp.clone());
        std::thread::spawn(move || {
            let mut c = RawClient::connect_fixed(&addr);
            c.go("seq");
            for i in 0..BLOCKS {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                c.write(i, i * 65536, &pattern(4096, i));
                acked.store(i + 1, Ordering::SeqCst);
            }
            c.disconnect();
        })
    };
    while acked.load(Ordering::SeqCst) < 200 {
        std::thread::sleep(Duration::from_millis(5));
    }
    let before = acked.load(Ordering::SeqCst);
    s.ok(&["snapshot", "seq", "seq-snap", "--read-only"]);
    let after = acked.load(Ordering::SeqCst);
    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    assert!(
        after < BLOCKS,
        "the writer finished before the snapshot returned"
    );

    // The snapshot holds a prefix of the writes: every write acknowledged before the snapshot
    // was asked for, none sent after it returned.
    let mut c = RawClient::connect_fixed(&s.tcp);
    c.go("seq-snap");
    let mut prefix = None;
    for i in 0..(after + 64).min(BLOCKS) {
        let got = c.read(i, i * 65536, 4096);
        let written = got == pattern(4096, i);
        assert!(
            written || got.iter().all(|&b| b == 0),
            "block {i} holds neither its write nor zeros"
        );
        match (prefix, written) {
            (None, false) => prefix = Some(i),
            (Some(k), true) => panic!("block {i} is in the snapshot but block {k} is not"),
            _ => {}
        }
    }
    let k = prefix.unwrap_or(after + 64);
    assert!(
        k >= before && k <= after + 1,
        "snapshot holds {k} writes; {before} were acknowledged before it, {after} when it returned"
    );
}

#[test]
fn enospc_write_succeeds_after_a_live_grow() {
    // 32 MiB of data space: 512 blocks.
    let mut s = ServeProcess::with_pool("32M");
    s.start();
    s.ok(&["create", "big", "--size", "256M"]);
    let uri = s.tcp_uri("big");
    let out = qemu_io(&uri, &["write -P 0x33 0 48M"]);
    assert!(
        out.contains("No space left on device"),
        "the write that does not fit fails with ENOSPC:\n{out}"
    );
    // Reads go on.
    qemu_io_ok(&uri, &["read -P 0 100M 1M"]);
    let st: serde_json::Value = serde_json::from_str(&s.ok(&["pool", "status", "--json"])).unwrap();
    assert_eq!(st["data_total_bytes"], 32 * MIB);
    assert_eq!(
        s.ok(&["pool", "grow", "--data-size", "128M"]),
        format!(
            "pool {}: 128M of data, {} of metadata\n",
            s.pool.display(),
            {
                let m = st["metadata_total_bytes"].as_u64().unwrap();
                uthin::pool::size::format_size(m)
            }
        )
    );
    qemu_io_ok(
        &uri,
        &["write -P 0x33 0 48M", "flush", "read -P 0x33 0 48M"],
    );
    let st: serde_json::Value = serde_json::from_str(&s.ok(&["pool", "status", "--json"])).unwrap();
    assert_eq!(st["data_total_bytes"], 128 * MIB);
    assert!(st["data_used_bytes"].as_u64().unwrap() >= 48 * MIB);
    assert_eq!(s.pool.join("data").metadata().unwrap().len(), 128 * MIB);
}

#[test]
fn discard_gives_the_space_back_to_the_host() {
    let s = ServeProcess::start_fresh();
    s.ok(&["create", "d", "--size", "128M"]);
    let uri = s.tcp_uri("d");
    let empty = s.data_allocated();
    qemu_io_ok(&uri, &["write -P 0x44 0 64M", "flush"]);
    let full = s.data_allocated();
    assert!(
        full >= empty + 64 * MIB,
        "64 MiB written: {empty} -> {full} bytes allocated"
    );
    qemu_io_ok(&uri, &["discard 0 64M", "flush"]);
    let after = s.data_allocated();
    assert!(
        full - after >= 63 * MIB,
        "trim + flush gives ~64 MiB back: {full} -> {after} bytes allocated"
    );
    qemu_io_ok(&uri, &["read -P 0 0 64M"]);
    let list: serde_json::Value = serde_json::from_str(&s.ok(&["list", "--json"])).unwrap();
    assert_eq!(list[0]["mapped_bytes"], 0);
}

#[test]
fn restart_serves_the_same_data() {
    let mut s = ServeProcess::start_fresh();
    s.ok(&["create", "r", "--size", "32M"]);
    s.ok(&["snapshot", "r", "r0", "--read-only"]);
    // No flush: the graceful stop commits.
    qemu_io_ok(
        &s.tcp_uri("r"),
        &["write -P 0x55 1M 3M", "write -P 0x66 31M 1M"],
    );
    let before = s.ok(&["list"]);
    assert_eq!(s.stop().code(), Some(0));
    assert!(!s.pool.join("control.sock").exists());
    assert!(s.ok(&["check"]).contains("clean"));
    s.start();
    assert_eq!(s.ok(&["list"]), before);
    qemu_io_ok(
        &s.tcp_uri("r"),
        &[
            "read -P 0 0 1M",
            "read -P 0x55 1M 3M",
            "read -P 0x66 31M 1M",
        ],
    );
    qemu_io_ok(&s.tcp_uri("r0"), &["read -P 0 0 32M"]);
    assert_eq!(s.stop().code(), Some(0));
}

/// Sends `line` on a control connection and returns the answer line.
fn control(stream: &mut UnixStream, reader: &mut BufReader<UnixStream>, line: &[u8]) -> String {
    stream.write_all(line).unwrap();
    let mut answer = String::new();
    reader.read_line(&mut answer).unwrap();
    answer
}

#[test]
fn control_socket_is_private_and_survives_garbage() {
    let mut s = ServeProcess::start_fresh();
    s.ok(&["create", "v", "--size", "16M"]);
    let sock = s.pool.join("control.sock");
    let mode = std::fs::metadata(&sock).unwrap().mode();
    assert_eq!(mode & 0o777, 0o600, "control.sock is owner-only");

    let mut stream = UnixStream::connect(&sock).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    for (bad, needle) in [
        (&b"hello\n"[..], "malformed control message"),
        (b"{}\n", "missing field `op`"),
        (b"{\"op\":\"create\"}\n", "missing field `name`"),
        (
            b"{\"op\":\"create\",\"name\":\"x\",\"size\":\"big\"}\n",
            "invalid type",
        ),
        (b"\xff\xfe\n", "not UTF-8"),
        (b"[]\n", "malformed control message"),
        (b"{\"op\":\"explode\"}\n", "unknown variant `explode`"),
        (
            b"{\"op\":\"delete\",\"name\":\"nope\"}\n",
            "no volume named `nope`",
        ),
        (
            b"{\"op\":\"create\",\"name\":\"../x\",\"size\":1}\n",
            "invalid volume name",
        ),
        (
            b"{\"op\":\"vhost_add\",\"name\":\"v\",\"socket\":\"relative.sock\"}\n",
            "must be absolute",
        ),
    ] {
        let answer = control(&mut stream, &mut reader, bad);
        let v: serde_json::Value = serde_json::from_str(&answer).unwrap();
        assert_eq!(v["ok"], false, "{bad:?}: {answer}");
        assert!(
            v["error"].as_str().unwrap().contains(needle),
            "{bad:?} should say {needle:?}: {answer}"
        );
    }
    // The same connection still works.
    let answer = control(&mut stream, &mut reader, b"{\"op\":\"list\"}\n");
    assert!(answer.starts_with("{\"ok\":true"), "{answer}");

    // An over-long request gets an error and the connection is closed.
    let mut long = UnixStream::connect(&sock).unwrap();
    long.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let junk = vec![b'x'; 2 << 20];
    let _ = long.write_all(&junk);
    let mut answer = String::new();
    // The answer, then the end of the stream; or, when the server closed with some of the
    // junk still unread in its socket, ECONNRESET after the answer (AF_UNIX reports that to
    // the peer once it has read what was queued for it).
    match long.read_to_string(&mut answer) {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        Err(e) => panic!("reading the answer to an over-long request: {e}"),
    }
    assert!(answer.contains("longer than"), "{answer:?}");
    // A client that leaves in the middle of a request.
    {
        let mut half = UnixStream::connect(&sock).unwrap();
        half.write_all(b"{\"op\":\"cre").unwrap();
    }
    // More connections than the server takes at once: the extra ones are told so. (First let
    // the server notice that the last two connections are gone.)
    std::thread::sleep(Duration::from_millis(300));
    let mut idle: Vec<UnixStream> = (0..64)
        .map(|_| UnixStream::connect(&sock).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = UnixStream::connect(&sock).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let mut answer = String::new();
    extra.read_to_string(&mut answer).unwrap();
    assert!(answer.contains("too many control connections"), "{answer}");
    idle.clear();
    std::thread::sleep(Duration::from_millis(200));
    assert!(s.ok(&["list"]).contains("16M"), "the server still answers");
    assert!(s.running());

    // A second server on the same pool gets the lock error naming the first one's pid.
    let second = std::process::Command::new(uthin_bin())
        .arg("--pool")
        .arg(&s.pool)
        .args(["serve", "--nbd", "127.0.0.1:0"])
        .env_remove("UTHIN_POOL")
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(
        err.contains(&format!("in use by process {}", s.pid())),
        "{err}"
    );
    // Commands that need the pool to themselves refuse clearly.
    s.fails(
        &["pool", "create", "--force"],
        "is being served by `uthin serve`",
    );
    let xml = s.pool.join("../dump.xml");
    std::fs::write(&xml, "<superblock/>").unwrap();
    s.fails(
        &["restore", "-i", xml.to_str().unwrap(), "--force"],
        &format!("(process {})", s.pid()),
    );
}

#[test]
fn live_commands_print_what_offline_commands_print() {
    let mut s = ServeProcess::start_fresh();
    s.ok(&["create", "base", "--size", "96M"]);
    qemu_io_ok(&s.tcp_uri("base"), &["write -P 1 0 8M", "flush"]);
    s.ok(&["snapshot", "base", "snap", "--read-only"]);
    qemu_io_ok(&s.tcp_uri("base"), &["write -P 2 1M 1M", "flush"]);
    let commands: &[&[&str]] = &[
        &["list"],
        &["list", "--json"],
        &["pool", "status"],
        &["pool", "status", "--json"],
        &["check"],
        &["check", "--json"],
        &["dump"],
        &["delta", "base", "snap"],
        &["delete", "nope"],
        &["create", "base", "--size", "1G"],
        &["snapshot", "missing", "x"],
        &["--json", "rename", "nope", "x"],
    ];
    let live: Vec<_> = commands.iter().map(|c| s.uthin(c)).collect();
    assert!(live[4].stdout.contains("clean"), "{}", live[4].text());
    assert!(live[6].stdout.contains("<superblock"), "{}", live[6].text());
    assert_eq!(s.stop().code(), Some(0));
    for (c, l) in commands.iter().zip(&live) {
        let o = s.uthin(c);
        assert_eq!(
            (l.code, &l.stdout, &l.stderr),
            (o.code, &o.stdout, &o.stderr),
            "uthin {c:?}: live vs offline"
        );
    }
    // thin_check agrees with the metadata the server left.
    require_tool("thin_check", "thin-provisioning-tools");
    run(
        "thin_check",
        &[s.pool.join("metadata").to_str().unwrap()],
        LIMIT,
    )
    .ok("thin_check");
    // vhost commands need a server.
    s.fails(&["vhost", "list"], "needs a running `uthin serve`");
}
