//! `kill -9` of `uthin serve` under a flushing write load (invariant 4 through the whole
//! stack): clients write 4 KiB slots and flush in rounds, a snapshot is taken live, the server
//! is killed without warning; then `uthin check` and thin_check find the metadata clean, and
//! after a restart every write acknowledged before a successful flush reads back (a write not
//! covered by a flush may read as before or after). Three crash cycles, each starting from what
//! the previous one verified; the second runs with `--cache direct`, the third with the
//! smallest mapping cache (`--mapping-cache-entries 1024`).

mod nbd_support;
mod serve_support;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use uthin::nbd::wire::{CMD_FLUSH, CMD_WRITE, REQUEST_MAGIC, SIMPLE_REPLY_MAGIC};

use nbd_support::{RawClient, pattern, require_tool, run};
use serve_support::ServeProcess;

const SLOT: u64 = 4096;
/// Each writer owns 4 MiB: 64 data blocks of 16 slots, so rounds mix first writes into fresh
/// blocks, overwrites in place and (after the snapshot) copies.
const SLOTS: u64 = 1024;
const WRITERS: u64 = 2;
const WRITES_PER_ROUND: usize = 8;

/// The 4 KiB a write with `tag` puts in `slot`.
fn slot_data(tag: u64, slot: u64) -> Vec<u8> {
    pattern(SLOT as usize, tag.wrapping_mul(1_000_003) ^ slot)
}

/// What each slot may hold after a crash.
#[derive(Clone)]
struct Model {
    /// The last write covered by a successful flush (None: zeros).
    durable: Vec<Option<u64>>,
    /// Writes sent after the last successful flush (any of them may have survived).
    pending: Vec<Vec<u64>>,
}

impl Model {
    fn new() -> Model {
        Model {
            durable: vec![None; SLOTS as usize],
            pending: vec![Vec::new(); SLOTS as usize],
        }
    }

    fn flushed(&mut self) {
        for (d, p) in self.durable.iter_mut().zip(&mut self.pending) {
            if let Some(&last) = p.last() {
                *d = Some(last);
            }
            p.clear();
        }
    }
}

/// A request on a raw connection; any failure (the server died) is an `Err`.
fn request(s: &mut TcpStream, cmd: u16, offset: u64, payload: &[u8]) -> std::io::Result<()> {
    let mut b = Vec::with_capacity(28 + payload.len());
    b.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&cmd.to_be_bytes());
    b.extend_from_slice(&7u64.to_be_bytes());
    b.extend_from_slice(&offset.to_be_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    b.extend_from_slice(payload);
    s.write_all(&b)?;
    let mut r = [0u8; 16];
    s.read_exact(&mut r)?;
    let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
    let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
    if magic != SIMPLE_REPLY_MAGIC || error != 0 {
        return Err(std::io::Error::other(format!(
            "reply magic {magic:#x}, error {error}"
        )));
    }
    Ok(())
}

/// Writes and flushes in rounds on `writer`'s region until the connection breaks.
fn write_until_killed(
    addr: String,
    writer: u64,
    mut model: Model,
    flushes: Arc<AtomicU64>,
) -> Model {
    let mut c = RawClient::connect_fixed(&addr);
    c.go("c");
    let mut stream = c.stream;
    let mut rng = rand::rngs::StdRng::seed_from_u64(writer ^ 0x5eed);
    let base = writer * SLOTS * SLOT;
    let mut tag = (writer << 40) | rng.random_range(0..1u64 << 30) << 8;
    loop {
        for _ in 0..WRITES_PER_ROUND {
            let slot = rng.random_range(0..SLOTS);
            tag += 1;
            // Recorded before sending: a write in flight at the crash may or may not survive.
            model.pending[slot as usize].push(tag);
            if request(
                &mut stream,
                CMD_WRITE,
                base + slot * SLOT,
                &slot_data(tag, slot),
            )
            .is_err()
            {
                return model;
            }
        }
        if request(&mut stream, CMD_FLUSH, 0, &[]).is_err() {
            return model;
        }
        model.flushed();
        flushes.fetch_add(1, Ordering::Relaxed);
    }
}

/// Reads every slot of `writer`'s region and checks it against `model`; returns the model of
/// what is there now (all durable).
fn verify(addr: &str, writer: u64, model: &Model) -> Model {
    let mut c = RawClient::connect_fixed(addr);
    c.go("c");
    let base = writer * SLOTS * SLOT;
    let mut now = Model::new();
    let mut survived_pending = 0;
    for slot in 0..SLOTS {
        let got = c.read(slot, base + slot * SLOT, SLOT as usize);
        let i = slot as usize;
        let durable_ok = match model.durable[i] {
            Some(t) => got == slot_data(t, slot),
            None => got.iter().all(|&b| b == 0),
        };
        if durable_ok {
            now.durable[i] = model.durable[i];
            continue;
        }
        let pending = model.pending[i]
            .iter()
            .rev()
            .find(|&&t| got == slot_data(t, slot));
        match pending {
            Some(&t) => {
                now.durable[i] = Some(t);
                survived_pending += 1;
            }
            None => panic!(
                "writer {writer} slot {slot}: holds neither its last flushed write {:?} nor a later one",
                model.durable[i]
            ),
        }
    }
    c.disconnect();
    eprintln!(
        "writer {writer}: every flushed write is there ({survived_pending} later writes survived too)"
    );
    now
}

#[test]
fn kill_9_under_a_flushing_load_loses_no_flushed_write() {
    require_tool("thin_check", "thin-provisioning-tools");
    let mut s = ServeProcess::start_fresh();
    s.ok(&["create", "c", "--size", "64M"]);
    let mut models: Vec<Model> = (0..WRITERS).map(|_| Model::new()).collect();
    for cycle in 0..3 {
        let flushes = Arc::new(AtomicU64::new(0));
        let writers: Vec<_> = (0..WRITERS)
            .map(|w| {
                let (addr, model, f) = (s.tcp.clone(), models[w as usize].clone(), flushes.clone());
                std::thread::spawn(move || write_until_killed(addr, w, model, f))
            })
            .collect();
        // A live snapshot in the middle of the load (copy-on-write after it).
        let wait_for = |n: u64| {
            let deadline = Instant::now() + Duration::from_secs(60);
            while flushes.load(Ordering::Relaxed) < n {
                assert!(
                    Instant::now() < deadline,
                    "only {} flushes",
                    flushes.load(Ordering::Relaxed)
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        };
        wait_for(5);
        s.ok(&["snapshot", "c", &format!("snap{cycle}")]);
        let done = flushes.load(Ordering::Relaxed);
        wait_for(done + 150);
        s.kill9();
        models = writers.into_iter().map(|w| w.join().unwrap()).collect();
        eprintln!(
            "cycle {cycle}: killed after {} flushes",
            flushes.load(Ordering::Relaxed)
        );

        // The metadata the killed server left is clean, for uthin and for thin_check.
        let check = s.uthin(&["check"]);
        assert_eq!(
            check.code,
            Some(0),
            "uthin check after kill -9:\n{}",
            check.text()
        );
        run(
            "thin_check",
            &[s.pool.join("metadata").to_str().unwrap()],
            Duration::from_secs(60),
        )
        .ok("thin_check after kill -9");

        // The middle cycle runs with `--cache direct` (O_DIRECT through io_uring), the others
        // through the page cache; each restart also reads the other mode's data. The last
        // runs with the smallest mapping cache `serve` accepts (the writers' 128 blocks fit
        // in it; volume_model and volume_crash overflow small caches).
        s.extra = match cycle {
            0 => vec!["--cache".into(), "direct".into()],
            1 => vec!["--mapping-cache-entries".into(), "1024".into()],
            _ => Vec::new(),
        };
        s.start();
        s.assert_cache_mode(if cycle == 0 { "Direct" } else { "Writeback" });
        if cycle == 1 {
            assert!(
                s.log().contains("mapping cache: 1024 entries"),
                "serve did not take --mapping-cache-entries:\n{}",
                s.log()
            );
        }
        models = (0..WRITERS)
            .map(|w| verify(&s.tcp, w, &models[w as usize]))
            .collect();
        assert!(s.ok(&["list"]).contains(&format!("snap{cycle}")));
    }
    assert_eq!(s.stop().code(), Some(0));
    assert!(s.ok(&["check"]).contains("clean"));
}
