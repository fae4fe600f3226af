//! `uthin serve` as a test target: the real binary on a temporary pool, listening on a free TCP
//! port of 127.0.0.1 and on a Unix socket, managed with the real command line. Used by the NBD
//! client tests (tests/nbd_clients.rs makes it a `Target`), the live-management and crash tests
//! (tests/serve_*.rs) and the vhost-user tests.
#![allow(dead_code)]

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// The `uthin` binary under test.
pub fn uthin_bin() -> &'static str {
    env!("CARGO_BIN_EXE_uthin")
}

/// Output of one `uthin` command.
#[derive(Debug)]
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl CliOutput {
    pub fn text(&self) -> String {
        format!("{}{}", self.stdout, self.stderr)
    }
}

/// Runs `uthin --pool POOL args...`.
pub fn uthin_at(pool: &Path, args: &[&str]) -> CliOutput {
    let o = Command::new(uthin_bin())
        .arg("--pool")
        .arg(pool)
        .args(args)
        .env_remove("UTHIN_POOL")
        .env_remove("RUST_LOG")
        .output()
        .expect("uthin runs");
    CliOutput {
        code: o.status.code(),
        stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
    }
}

/// A running (or stopped) `uthin serve`.
pub struct ServeProcess {
    /// Holds the pool, the sockets and the log.
    pub dir: tempfile::TempDir,
    /// The pool directory.
    pub pool: PathBuf,
    /// `127.0.0.1:PORT` of the NBD listener (changes at each start: port 0 is asked for).
    pub tcp: String,
    /// The NBD Unix socket.
    pub unix: PathBuf,
    /// Extra `serve` arguments.
    pub extra: Vec<String>,
    child: Option<Child>,
    log: PathBuf,
    starts: usize,
}

impl ServeProcess {
    /// A fresh pool with `data_size` of data space (e.g. "4G"), not yet served.
    pub fn with_pool(data_size: &str) -> ServeProcess {
        let dir = tempfile::tempdir().expect("tempdir");
        let pool = dir.path().join("pool");
        let out = uthin_at(&pool, &["pool", "create", "--data-size", data_size]);
        assert_eq!(out.code, Some(0), "pool create: {}", out.text());
        let unix = dir.path().join("nbd.sock");
        let log = dir.path().join("serve.log");
        ServeProcess {
            dir,
            pool,
            tcp: String::new(),
            unix,
            extra: Vec::new(),
            child: None,
            log,
            starts: 0,
        }
    }

    /// A fresh 4 GiB pool, served.
    pub fn start_fresh() -> ServeProcess {
        Self::start_fresh_with(&[])
    }

    /// A fresh 4 GiB pool, served with extra `serve` arguments (e.g. `--cache direct`).
    pub fn start_fresh_with(extra: &[&str]) -> ServeProcess {
        let mut s = Self::with_pool("4G");
        s.extra = extra.iter().map(|a| a.to_string()).collect();
        s.start();
        s
    }

    /// Asserts that the latest start serves with cache mode `mode` (`Direct` or `Writeback`,
    /// as its "data file cache mode" log line says); shows the whole log on failure.
    pub fn assert_cache_mode(&self, mode: &str) {
        let log = self.log();
        let last = log.rsplit("cache mode: ").next().unwrap_or("");
        assert!(
            last.starts_with(mode),
            "serve did not run with {mode}:\n{log}"
        );
    }

    /// The log of every start so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Starts `uthin serve` and waits until it says it is ready.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("log file");
        let before = self.log().len();
        let child = Command::new(uthin_bin())
            .arg("--pool")
            .arg(&self.pool)
            .arg("serve")
            .args(["--nbd", "127.0.0.1:0", "--nbd"])
            .arg(format!("unix:{}", self.unix.display()))
            .args(&self.extra)
            .env_remove("UTHIN_POOL")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("uthin serve starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let text = self.log();
            let new = &text[before..];
            if new.contains("ready (pid") {
                self.tcp = parse_tcp(new).unwrap_or_else(|| panic!("no NBD address in:\n{new}"));
                return;
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                panic!("uthin serve exited with {status} before it was ready:\n{new}");
            }
            assert!(
                Instant::now() < deadline,
                "uthin serve not ready after 60 s:\n{new}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Process id of the running server.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// True while the server process runs.
    pub fn running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| c.try_wait().ok().flatten().is_none())
    }

    /// SIGTERM, then waits (at most 60 s) for the exit status.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        // SAFETY: kill(2) on the pid of our own child, which has not been reaped yet.
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
        wait_with_limit(&mut child, Duration::from_secs(60), &self.log())
    }

    /// SIGKILL: no chance to commit or clean up.
    pub fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        let _ = child.kill();
        let _ = child.wait();
    }

    /// `uthin --pool POOL args...`.
    pub fn uthin(&self, args: &[&str]) -> CliOutput {
        uthin_at(&self.pool, args)
    }

    /// `uthin --pool POOL args...`, which must succeed; its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let o = self.uthin(args);
        assert_eq!(o.code, Some(0), "uthin {args:?}: {}", o.text());
        o.stdout
    }

    /// `uthin --pool POOL args...`, which must fail with exit code 1 and mention `needle`.
    pub fn fails(&self, args: &[&str], needle: &str) -> CliOutput {
        let o = self.uthin(args);
        assert_eq!(o.code, Some(1), "uthin {args:?} should fail: {}", o.text());
        assert!(
            o.stderr.contains(needle),
            "uthin {args:?} should mention {needle:?}: {}",
            o.text()
        );
        assert!(!o.text().contains("panicked"), "{}", o.text());
        o
    }

    /// The data file's allocated bytes.
    pub fn data_allocated(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(self.pool.join("data"))
            .expect("stat data")
            .blocks()
            * 512
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn wait_with_limit(child: &mut Child, limit: Duration, log: &str) -> ExitStatus {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(s) = child.try_wait().expect("wait") {
            return s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("uthin serve did not stop within {limit:?}:\n{log}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The TCP address in the server's "serving pool ...; NBD on A, B; control socket ..." line.
pub fn parse_tcp(log: &str) -> Option<String> {
    let line = log.lines().find(|l| l.contains("; NBD on "))?;
    let list = line.split("; NBD on ").nth(1)?.split(';').next()?;
    list.split(", ")
        .find(|a| !a.starts_with("unix:"))
        .map(str::to_string)
}

/// Established TCP connections whose local port is `port` (the server's side of each client).
pub fn established_on_port(port: u16) -> usize {
    let mut n = 0;
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let mut text = String::new();
        if let Ok(mut f) = std::fs::File::open(table) {
            let _ = f.read_to_string(&mut text);
        }
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            // sl local_address rem_address st ...; st 01 = ESTABLISHED
            let Some(local) = f.get(1) else { continue };
            let Some(port_hex) = local.rsplit(':').next() else {
                continue;
            };
            if u16::from_str_radix(port_hex, 16).ok() == Some(port) && f.get(3) == Some(&"01") {
                n += 1;
            }
        }
    }
    n
}

impl ServeProcess {
    /// `nbd://127.0.0.1:PORT/EXPORT`
    pub fn tcp_uri(&self, export: &str) -> String {
        format!("nbd://{}/{export}", self.tcp)
    }

    /// `nbd+unix:///EXPORT?socket=PATH`
    pub fn unix_uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.unix.display())
    }

    /// A volume; a read-only export is a read-only snapshot of a volume named `NAME.origin`.
    pub fn create_export(&self, name: &str, size: u64, read_only: bool) {
        let size = size.to_string();
        if read_only {
            let origin = format!("{name}.origin");
            self.ok(&["create", &origin, "--size", &size]);
            self.ok(&["snapshot", &origin, name, "--read-only"]);
        } else {
            self.ok(&["create", name, "--size", &size]);
        }
    }

    /// Established client connections on the NBD TCP port.
    pub fn connections(&self) -> usize {
        let port = self
            .tcp
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("a TCP port");
        established_on_port(port)
    }

    /// The NBD description of a volume, as `nbdinfo --list` shows it.
    pub fn description(&self, name: &str) -> String {
        let list = self.ok(&["list", "--json"]);
        let v: serde_json::Value = serde_json::from_str(&list).expect("list --json");
        let vol = v
            .as_array()
            .and_then(|a| a.iter().find(|x| x["name"] == name))
            .unwrap_or_else(|| panic!("no volume {name} in {list}"));
        let size = uthin::pool::size::format_size(vol["size"].as_u64().expect("size"));
        let mut d = match vol["origin"].as_str() {
            Some(o) => format!("thin snapshot of {o}, {size}"),
            None => format!("thin volume, {size}"),
        };
        if vol["read_only"] == true {
            d.push_str(", read-only");
        }
        d
    }
}
