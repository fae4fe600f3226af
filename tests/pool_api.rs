//! The data-path API's promises: ENOSPC changes nothing and grow resumes writes; the minimum
//! free space guard; blocks freed in a transaction are not handed out before it is durable and
//! punched; reservations are exclusive; `&self` calls run concurrently under a read lock;
//! exact sharing after a snapshot is deleted; O(1) snapshots; metadata snapshots for
//! `thin_dump -m`.

mod pool_common;

use std::collections::HashSet;
use std::sync::Arc;

use parking_lot::RwLock;
use uthin::pool::{CreateOptions, Pool, PoolError};
use uthin::units::{DataBlock, VirtBlock};

const BS: u64 = 65536;

fn pool(blocks: u64) -> (tempfile::TempDir, Pool) {
    let dir = tempfile::tempdir().unwrap();
    let p = Pool::create(
        dir.path(),
        &CreateOptions {
            data_size: blocks * BS,
            block_size: BS,
            metadata_size: Some(4 << 20),
            force: false,
        },
    )
    .unwrap();
    (dir, p)
}

#[test]
fn out_of_space_changes_nothing_and_grow_resumes() {
    let (dir, mut p) = pool(64);
    let v = p.create_volume("v", 1000 * BS).unwrap();
    for vb in 0..64 {
        p.provision(v.dev_id, VirtBlock(vb)).unwrap();
    }
    p.commit().unwrap();
    let before = p.status().unwrap();
    let err = p.provision(v.dev_id, VirtBlock(64)).unwrap_err();
    assert!(matches!(err, PoolError::NoDataSpace { .. }), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    assert!(err.to_string().contains("pool grow"), "{err}");
    assert!(p.reserve_data_block().is_err());
    // Nothing else changed; reads go on.
    assert_eq!(p.status().unwrap(), before);
    assert_eq!(p.volume("v").unwrap().mapped_blocks, 64);
    assert_eq!(p.lookup(v.dev_id, VirtBlock(64)).unwrap(), None);
    assert!(p.lookup(v.dev_id, VirtBlock(3)).unwrap().is_some());
    // New volumes are refused below the minimum free space, with a hint to grow.
    let err = p.create_volume("w", BS).unwrap_err();
    assert!(err.to_string().contains("grow"), "{err}");
    // Grow: writes resume, the new space is usable.
    p.grow_data(128 * BS).unwrap();
    let b = p.provision(v.dev_id, VirtBlock(64)).unwrap();
    assert!(b.0 >= 64);
    p.create_volume("w", BS).unwrap();
    p.commit().unwrap();
    let report = uthin::tools::check::check_live(&p).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    drop(p);
    pool_common::thin_check(&dir.path().join("metadata")).unwrap();
}

#[test]
fn freed_blocks_wait_for_commit_and_punch() {
    let (_dir, mut p) = pool(16);
    let v = p.create_volume("v", 16 * BS).unwrap();
    // Fill all but the guard: 14 blocks.
    for vb in 0..14 {
        p.provision(v.dev_id, VirtBlock(vb)).unwrap();
    }
    p.commit().unwrap();
    let d = p.discard(v.dev_id, VirtBlock(0), VirtBlock(4)).unwrap();
    assert_eq!(d.unmapped, 4);
    assert_eq!(d.freed.len(), 4);
    // Freed in this (uncommitted) transaction: never reserved, even when nothing else is free.
    let r1 = p.reserve_data_block().unwrap();
    let r2 = p.reserve_data_block().unwrap();
    assert_ne!(r1.block(), r2.block(), "a reservation is handed out once");
    let err = p.reserve_data_block().unwrap_err();
    assert!(matches!(err, PoolError::NoDataSpace { .. }));
    p.release_reservation(r1);
    p.release_reservation(r2);
    // After the commit they are returned to be punched, and still held back until released.
    let c = p.commit().unwrap();
    let freed: HashSet<DataBlock> = c.freed.iter().copied().collect();
    assert_eq!(freed, d.freed.iter().copied().collect());
    let mut got = Vec::new();
    while let Ok(r) = p.reserve_data_block() {
        assert!(
            !freed.contains(&r.block()),
            "{} was not punched yet",
            r.block()
        );
        got.push(r);
    }
    assert_eq!(got.len(), 2);
    for r in got {
        p.release_reservation(r);
    }
    p.release_freed(&c.freed);
    let mut held = Vec::new();
    while let Ok(r) = p.reserve_data_block() {
        held.push(r);
    }
    assert_eq!(held.len(), 6);
}

#[test]
fn copy_on_write_then_exclusive_after_the_snapshot_goes() {
    let (_dir, mut p) = pool(256);
    let v = p.create_volume("v", 100 * BS).unwrap();
    for vb in 0..50 {
        p.provision(v.dev_id, VirtBlock(vb)).unwrap();
    }
    let s = p.snapshot("v", "s", false).unwrap();
    assert_eq!(s.mapped_blocks, 50);
    let m = p.lookup(v.dev_id, VirtBlock(7)).unwrap().unwrap();
    assert!(m.shared);
    // Break sharing on the origin: the snapshot keeps the old block, only this block copies.
    let (old, new) = p.break_sharing(v.dev_id, VirtBlock(7)).unwrap();
    assert_eq!(old, m.block);
    assert_eq!(
        p.lookup(s.dev_id, VirtBlock(7)).unwrap().unwrap().block,
        old
    );
    let after = p.lookup(v.dev_id, VirtBlock(7)).unwrap().unwrap();
    assert_eq!(after.block, new);
    assert!(!after.shared);
    assert!(p.lookup(v.dev_id, VirtBlock(8)).unwrap().unwrap().shared);
    assert_eq!(p.status().unwrap().data_used_blocks, 51);
    // Once the snapshot is gone nothing is shared any more: writes go in place (the kernel's
    // time heuristic would keep copying).
    let c = p.delete_volume("s").unwrap();
    // Only the snapshot held the old copy of block 7: it is freed, nothing else.
    assert_eq!(c.freed, vec![old]);
    for vb in 0..50 {
        assert!(!p.lookup(v.dev_id, VirtBlock(vb)).unwrap().unwrap().shared);
    }
}

#[test]
fn readers_run_concurrently_with_a_writer() {
    let (_dir, mut p) = pool(4096);
    let v = p.create_volume("v", 4096 * BS).unwrap();
    for vb in 0..1000 {
        p.provision(v.dev_id, VirtBlock(vb)).unwrap();
    }
    p.commit().unwrap();
    let dev = v.dev_id;
    let p = Arc::new(RwLock::new(p));
    let readers: Vec<_> = (0..4)
        .map(|t| {
            let p = p.clone();
            std::thread::spawn(move || {
                for i in 0..5000u64 {
                    let vb = (i * 7 + t) % 1000;
                    let g = p.read();
                    let m = g.lookup(dev, VirtBlock(vb)).unwrap().unwrap();
                    assert!(!m.shared);
                    if i % 50 == 0 {
                        let r = g.reserve_data_block().unwrap();
                        g.release_reservation(r);
                    }
                }
            })
        })
        .collect();
    for vb in 1000..2000 {
        let r = p.read().reserve_data_block().unwrap();
        p.write().insert_mapping(dev, VirtBlock(vb), r).unwrap();
        if vb % 100 == 0 {
            p.write().commit().unwrap();
        }
    }
    for r in readers {
        r.join().unwrap();
    }
    let g = p.read();
    assert_eq!(g.volume("v").unwrap().mapped_blocks, 2000);
    let report = uthin::tools::check::check_live(&g).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}

#[test]
fn metadata_snapshot_is_what_thin_dump_m_reads() {
    let (dir, mut p) = pool(512);
    let v = p.create_volume("v", 100 * BS).unwrap();
    for vb in 0..30 {
        p.provision(v.dev_id, VirtBlock(vb)).unwrap();
    }
    let snap = p.reserve_metadata_snap().unwrap();
    assert!(p.reserve_metadata_snap().is_err());
    assert_eq!(p.status().unwrap().metadata_snapshot, Some(snap.block));
    // Change the live pool after the snapshot.
    for vb in 30..40 {
        p.provision(v.dev_id, VirtBlock(vb)).unwrap();
    }
    p.discard(v.dev_id, VirtBlock(0), VirtBlock(5)).unwrap();
    p.commit().unwrap();
    let report = uthin::tools::check::check_live(&p).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    let meta = dir.path().join("metadata");
    pool_common::thin_check(&meta).unwrap();
    let out = std::process::Command::new("thin_dump")
        .arg(format!("--metadata-snap={}", snap.block))
        .arg(&meta)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held = uthin::tools::xml::parse_xml(&String::from_utf8_lossy(&out.stdout)).unwrap();
    let maps = pool_common::dump_mappings(&held);
    assert_eq!(
        maps[&v.dev_id.0].len(),
        30,
        "the snapshot shows the state when it was taken"
    );
    assert_eq!(
        pool_common::dump_mappings(&pool_common::thin_dump(&meta))[&v.dev_id.0].len(),
        35
    );
    p.release_metadata_snap().unwrap();
    assert_eq!(p.status().unwrap().metadata_snapshot, None);
    let report = uthin::tools::check::check_live(&p).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    drop(p);
    pool_common::thin_check(&meta).unwrap();
}

#[test]
fn metadata_exhaustion_fails_cleanly_and_grow_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let mut p = Pool::create(
        dir.path(),
        &CreateOptions {
            data_size: 1_000_000 * BS,
            block_size: BS,
            metadata_size: Some(2 << 20),
            force: false,
        },
    )
    .unwrap();
    let v = p.create_volume("v", 1 << 40).unwrap();
    let mut mapped = 0u64;
    let err = loop {
        // Scattered virtual blocks: many half-empty leaves, metadata runs out fast.
        match p.provision(v.dev_id, VirtBlock(mapped * 977 % 4_000_000)) {
            Ok(_) => mapped += 1,
            Err(e) => break e,
        }
        if mapped % 5000 == 0 {
            p.commit().unwrap();
        }
        assert!(mapped < 1_000_000, "metadata never ran out");
    };
    assert!(matches!(err, PoolError::NoMetadataSpace), "{err}");
    assert_eq!(err.errno(), libc::ENOSPC);
    assert!(err.to_string().contains("--metadata-size"), "{err}");
    // Nothing was half done: the open transaction commits, and everything checks clean.
    assert_eq!(p.volume("v").unwrap().mapped_blocks, mapped);
    assert!(p.create_volume("w", BS).is_err());
    p.commit().unwrap();
    let report = uthin::tools::check::check_live(&p).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    pool_common::thin_check(&dir.path().join("metadata")).unwrap();
    p.grow_metadata(8 << 20).unwrap();
    p.provision(v.dev_id, VirtBlock(4_000_001)).unwrap();
    p.create_volume("w", BS).unwrap();
    assert_eq!(p.volume("v").unwrap().mapped_blocks, mapped + 1);
    let report = uthin::tools::check::check_live(&p).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
    drop(p);
    pool_common::thin_check(&dir.path().join("metadata")).unwrap();
}

/// A block given back with `release_zeroed` is reported zeroed to its next holder only, by
/// whichever way it is reserved next; a plain release, or any reservation in between, forgets
/// it. (Were a reservation path to keep the mark, a volume could skip zeroing a block another
/// holder wrote into.)
#[test]
fn zeroed_blocks_are_reported_once_and_forgotten_by_any_reservation() {
    let (_dir, p) = pool(1000);
    let at = |b: u64| p.reserve_data_block_at(DataBlock(b)).unwrap().unwrap();
    // Given back zeroed, reserved again at the same place: zeroed, once.
    p.release_zeroed(at(100));
    let r = at(100);
    assert!(r.known_zeroed());
    p.release_reservation(r);
    let r = at(100);
    assert!(!r.known_zeroed(), "a plain release must forget it");
    p.release_reservation(r);
    // A batch reservation takes the mark, and a later single reservation does not see it.
    for b in 200..204 {
        p.release_zeroed(at(b));
    }
    let batch = p.reserve_data_blocks(Some(DataBlock(200)), 2).unwrap();
    assert_eq!(batch[0].block(), DataBlock(200));
    assert!(batch.iter().all(|r| r.known_zeroed()));
    for r in batch {
        p.release_reservation(r);
    }
    assert!(!at(200).known_zeroed());
    assert!(!at(201).known_zeroed());
    assert!(at(202).known_zeroed());
    // The cursor's way (reserve_data_block) takes the mark too.
    let (_dir2, q) = pool(4);
    for b in 0..4 {
        q.release_zeroed(q.reserve_data_block_at(DataBlock(b)).unwrap().unwrap());
    }
    let r = q.reserve_data_block().unwrap();
    assert!(r.known_zeroed());
    let b = r.block();
    q.release_reservation(r);
    let again = q.reserve_data_block_at(b).unwrap().unwrap();
    assert!(!again.known_zeroed());
}

#[test]
fn batch_reservations_are_consecutive_and_respect_hints() {
    let (_dir, mut p) = pool(1000);
    let v = p.create_volume("v", 1000 * BS).unwrap();
    let rs = p.reserve_data_blocks(None, 16).unwrap();
    assert_eq!(rs.len(), 16);
    for w in rs.windows(2) {
        assert_eq!(w[1].block().0, w[0].block().0 + 1);
    }
    let near = p.reserve_data_blocks(Some(DataBlock(500)), 8).unwrap();
    assert_eq!(near[0].block(), DataBlock(500));
    assert_eq!(near.len(), 8);
    // A batch stops at the first block that is not usable (here: reserved by the first batch).
    let short = p.reserve_data_blocks(Some(DataBlock(10)), 100).unwrap();
    assert_eq!(short[0].block(), DataBlock(16));
    for (i, r) in rs.into_iter().enumerate() {
        p.insert_mapping(v.dev_id, VirtBlock(i as u64), r).unwrap();
    }
    for r in near.into_iter().chain(short) {
        p.release_reservation(r);
    }
    assert_eq!(p.volume("v").unwrap().mapped_blocks, 16);
    assert_eq!(p.status().unwrap().data_used_blocks, 16);
}
