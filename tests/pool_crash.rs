//! Crash tests: every operation that changes the pool is stopped at every sync point of the
//! metadata (through the fault-injecting engine: unsynced writes lost, or all applied) and at
//! every step of its volumes.json writes. After each simulated crash the pool reopens, the
//! operation happened entirely or not at all, volumes.json agrees with the metadata, and both
//! `uthin check` and `thin_check` are clean.

mod pool_common;

use std::path::Path;
use std::sync::Arc;

use uthin::pool::volumes::CrashAt;
use uthin::pool::{CreateOptions, OpenOptions, Pool};
use uthin::units::{DevId, VirtBlock};
use uthin_btree::io::fault::standard_fates;
use uthin_btree::io::{BlockIo, FailRule, FaultyIo, IoOp, MemIo};

const META_BLOCKS: u64 = 1024;

fn create_opts() -> CreateOptions {
    CreateOptions {
        data_size: 512 * 65536,
        block_size: 65536,
        metadata_size: Some(META_BLOCKS * 4096),
        force: false,
    }
}

/// A pool whose metadata lives in a fault-injecting engine; returns the durable image after
/// `setup` ran and committed.
fn base_pool(dir: &Path, setup: impl FnOnce(&mut Pool)) -> MemIo {
    let io = Arc::new(FaultyIo::new(META_BLOCKS));
    let hooks = OpenOptions {
        metadata_io: Some(io.clone() as Arc<dyn BlockIo>),
        no_lock: true,
        ..OpenOptions::default()
    };
    let mut pool = Pool::create_with(dir, &create_opts(), hooks).unwrap();
    setup(&mut pool);
    pool.commit().unwrap();
    drop(pool);
    io.durable_image()
}

fn open_image(dir: &Path, image: &MemIo, crash: Option<CrashAt>) -> (Pool, Arc<FaultyIo>) {
    let io = Arc::new(FaultyIo::from_image(image));
    let pool = Pool::open_with(
        dir,
        OpenOptions {
            metadata_io: Some(io.clone() as Arc<dyn BlockIo>),
            volumes_crash: crash,
            no_lock: true,
        },
    )
    .unwrap_or_else(|e| panic!("pool reopens after a crash: {e}"));
    (pool, io)
}

/// The state an operation can leave: names → (dev id, mapped blocks).
fn state(pool: &Pool) -> Vec<(Option<String>, u32, u64)> {
    let mut s: Vec<_> = pool
        .list()
        .unwrap()
        .into_iter()
        .map(|v| (v.name, v.dev_id.0, v.mapped_blocks))
        .collect();
    let st = pool.status().unwrap();
    s.push((Some("(pool size)".into()), 0, st.data_total_blocks));
    s
}

/// Checks the pool reopened from `image`; returns true when the operation happened.
fn assert_consistent(
    dir: &Path,
    image: &MemIo,
    before: &[(Option<String>, u32, u64)],
    after: &[(Option<String>, u32, u64)],
    what: &str,
) -> bool {
    let (pool, _) = open_image(dir, image, None);
    let vf = pool.volumes_file();
    assert!(
        vf.pending.is_none(),
        "{what}: pending record left after open"
    );
    assert_eq!(
        vf.transaction_id,
        pool.transaction_id(),
        "{what}: transaction ids"
    );
    let s = state(&pool);
    assert!(
        s == before || s == after,
        "{what}: neither before nor after:\n got    {s:?}\n before {before:?}\n after  {after:?}"
    );
    // No name points at a missing device, no device is left without its name.
    for v in pool.list().unwrap() {
        assert!(!v.missing, "{what}: {v:?} is missing from the metadata");
        assert!(
            v.name.is_some(),
            "{what}: device {} lost its name",
            v.dev_id.0
        );
    }
    let report = uthin::tools::check::check_live(&pool).unwrap();
    assert!(
        report.is_clean(),
        "{what}: uthin check:\n{}",
        report.to_text()
    );
    drop(pool);
    let file = dir.join("crash-image.meta");
    std::fs::write(&file, image.to_bytes()).unwrap();
    pool_common::thin_check(&file).unwrap_or_else(|e| panic!("{what}: {e}"));
    s == after
}

/// Runs `op` on a copy of `base` and crashes it at every metadata sync and every volumes.json
/// step; checks each crash leaves "before" or "after".
fn crash_everywhere(
    name: &str,
    setup: impl FnOnce(&mut Pool),
    op: impl Fn(&mut Pool) -> Result<(), uthin::pool::PoolError>,
) {
    let dir = tempfile::tempdir().unwrap();
    let base = base_pool(dir.path(), setup);
    let vol_json = std::fs::read(dir.path().join("volumes.json")).unwrap();
    let reset = || std::fs::write(dir.path().join("volumes.json"), &vol_json).unwrap();

    // A clean run: the "after" state and how many syncs and json steps the operation takes.
    let (before, after, syncs, steps) = {
        reset();
        let counter = CrashAt::never();
        let (mut pool, io) = open_image(dir.path(), &base, Some(counter.clone()));
        let before = state(&pool);
        let syncs0 = io.counts().syncs;
        let steps0 = counter.steps_taken();
        op(&mut pool).unwrap();
        pool.commit().unwrap();
        let syncs = io.counts().syncs - syncs0;
        let steps = counter.steps_taken() - steps0;
        let after = state(&pool);
        (before, after, syncs, steps)
    };
    assert!(syncs + steps > 0, "{name}: the operation wrote nothing");

    let mut outcomes = [0u32; 2];
    // Metadata: fail the k-th sync, then lose power with the unsynced writes lost, written,
    // written in part (every prefix), torn at sector boundaries, or at random (reordered).
    for k in 0..syncs {
        reset();
        let (mut pool, io) = open_image(dir.path(), &base, None);
        io.inject(FailRule::nth(IoOp::Sync, k));
        let _ = op(&mut pool).and_then(|()| pool.commit().map(|_| ()));
        drop(pool);
        // volumes.json as the crash left it (each reopen below reconciles and rewrites it).
        let crashed_json = std::fs::read(dir.path().join("volumes.json")).unwrap();
        let fates = standard_fates(io.pending_writes(), k, 3);
        for (i, f) in fates.iter().enumerate() {
            let image = io.crash_image(f);
            std::fs::write(dir.path().join("volumes.json"), &crashed_json).unwrap();
            let happened = assert_consistent(
                dir.path(),
                &image,
                &before,
                &after,
                &format!("{name}: sync {k}, fates #{i} {f:?}"),
            );
            outcomes[usize::from(happened)] += 1;
        }
    }
    // volumes.json: stop before each step of each write.
    for k in 0..steps {
        reset();
        let (mut pool, io) = open_image(dir.path(), &base, Some(CrashAt::after_steps(k)));
        let _ = op(&mut pool).and_then(|()| pool.commit().map(|_| ()));
        drop(pool);
        let happened = assert_consistent(
            dir.path(),
            &io.durable_image(),
            &before,
            &after,
            &format!("{name}: volumes.json step {k}"),
        );
        outcomes[usize::from(happened)] += 1;
    }
    // Crashes early leave "before", late ones "after": both must have been seen, or the
    // crash points did not cover the operation.
    assert!(
        outcomes[0] > 0 && outcomes[1] > 0,
        "{name}: outcomes before/after = {outcomes:?} ({syncs} syncs, {steps} json steps)"
    );
    eprintln!(
        "{name}: {syncs} syncs, {steps} volumes.json steps, outcomes before/after {outcomes:?}"
    );
}

fn filled(pool: &mut Pool) {
    let a = pool.create_volume("a", 64 * 65536).unwrap();
    for vb in 0..20 {
        pool.provision(a.dev_id, VirtBlock(vb)).unwrap();
    }
    pool.snapshot("a", "snap", false).unwrap();
}

#[test]
fn crash_in_create() {
    crash_everywhere("create", filled, |p| {
        p.create_volume("b", 1 << 20).map(|_| ())
    });
}

#[test]
fn crash_in_snapshot() {
    crash_everywhere("snapshot", filled, |p| {
        p.snapshot("a", "s2", true).map(|_| ())
    });
}

#[test]
fn crash_in_delete() {
    crash_everywhere("delete", filled, |p| p.delete_volume("a").map(|_| ()));
}

#[test]
fn crash_in_rename_and_adopt() {
    crash_everywhere("rename", filled, |p| p.rename("a", "renamed"));
}

#[test]
fn crash_in_provision_commit() {
    crash_everywhere("provision", filled, |p| {
        let dev = p.volume("snap")?.dev_id;
        for vb in 0..30 {
            match p.lookup(dev, VirtBlock(vb))? {
                Some(m) if m.shared => {
                    p.break_sharing(dev, VirtBlock(vb))?;
                }
                Some(_) => {}
                None => {
                    p.provision(dev, VirtBlock(vb))?;
                }
            }
        }
        p.commit().map(|_| ())
    });
}

#[test]
fn crash_in_discard_and_grow() {
    crash_everywhere("discard", filled, |p| {
        let dev = p.volume("a")?.dev_id;
        p.discard(dev, VirtBlock(5), VirtBlock(15))?;
        p.commit().map(|_| ())
    });
    crash_everywhere("grow", filled, |p| p.grow_data(1024 * 65536));
}

#[test]
fn unnamed_devices_survive_and_can_be_adopted() {
    let dir = tempfile::tempdir().unwrap();
    let base = base_pool(dir.path(), filled);
    // Lose volumes.json entirely (as with a pool from thin_restore): devices are listed by id.
    std::fs::remove_file(dir.path().join("volumes.json")).unwrap();
    let (mut pool, _) = open_image(dir.path(), &base, None);
    let list = pool.list().unwrap();
    assert_eq!(list.len(), 2);
    assert!(list.iter().all(|v| v.name.is_none()));
    pool.adopt(DevId(list[0].dev_id.0), "again", 1 << 20)
        .unwrap();
    assert!(
        pool.adopt(DevId(list[0].dev_id.0), "twice", 1 << 20)
            .is_err()
    );
    assert!(pool.adopt(DevId(999), "none", 1 << 20).is_err());
}
