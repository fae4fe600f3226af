//! `uthin repair` through the binary: exit codes and messages, a pool in use, an unreadable
//! superblock (refused, then rebuilt from a scan with `--data-block-size`), `--dry-run` writing
//! nothing, `--json`, and metadata behind a symlink or on a block device (a loop device).

mod repair_common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use repair_common::{
    Loop, corrupt, device_nodes, parse_node, read_block, superblock_roots, text, thin_check,
    thin_dump, uthin,
};
use uthin::pool::{CreateOptions, Pool};
use uthin::units::{DevId, VirtBlock};

fn run(pool: &Path, args: &[&str], code: i32) -> String {
    let o = uthin(pool, args);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(code), "uthin {args:?}: {t}");
    assert!(!t.contains("panicked"), "uthin {args:?} panicked: {t}");
    t
}

/// A small pool: `a` (dev 1, 800 mappings), its snapshot `s` (dev 2) which rewrote 10
/// blocks, `b` (dev 3, 20 mappings).
fn small_pool(dir: &Path) -> PathBuf {
    let pool_dir = dir.join("pool");
    let mut pool = Pool::create(
        &pool_dir,
        &CreateOptions {
            data_size: 1 << 30,
            block_size: 64 << 10,
            metadata_size: Some(4 << 20),
            force: false,
        },
    )
    .unwrap();
    let a = pool.create_volume("a", 1 << 30).unwrap().dev_id;
    for vb in 0..800 {
        pool.provision(a, VirtBlock(vb)).unwrap();
    }
    pool.commit().unwrap();
    let s = pool.snapshot("a", "s", false).unwrap().dev_id;
    for vb in 300..310 {
        pool.break_sharing(s, VirtBlock(vb)).unwrap();
    }
    let b = pool.create_volume("b", 1 << 30).unwrap().dev_id;
    for vb in 1000..1020 {
        pool.provision(b, VirtBlock(vb)).unwrap();
    }
    pool.commit().unwrap();
    assert_eq!((a, s, b), (DevId(1), DevId(2), DevId(3)));
    pool_dir
}

/// Every file of a directory (recursively) with its bytes.
fn snapshot_dir(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        let m = std::fs::symlink_metadata(&p).unwrap();
        if m.is_dir() {
            out.extend(snapshot_dir(&p));
        } else if m.file_type().is_symlink() {
            out.insert(
                p.clone(),
                std::fs::read_link(&p)
                    .unwrap()
                    .into_os_string()
                    .into_encoded_bytes(),
            );
        } else if p.file_name().unwrap() != "data" {
            out.insert(p.clone(), std::fs::read(&p).unwrap());
        } else {
            out.insert(p.clone(), m.len().to_le_bytes().to_vec());
        }
    }
    out
}

fn a_leaf_of_device_3(meta: &Path) -> u64 {
    let (leaves, _) = device_nodes(meta, 3);
    assert_eq!(leaves.len(), 1);
    leaves[0]
}

#[test]
fn refuses_while_the_pool_is_in_use() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = small_pool(tmp.path());
    let before = snapshot_dir(&pool);
    let mut holder = Command::new("flock")
        .arg("--exclusive")
        .arg(pool.join("lock"))
        .args(["sleep", "30"])
        .spawn()
        .expect("flock(1) runs");
    std::thread::sleep(std::time::Duration::from_millis(300));
    std::fs::write(pool.join("lock"), format!("{}\n", holder.id())).unwrap();
    let o = uthin(&pool, &["repair"]);
    let _ = holder.kill();
    let _ = holder.wait();
    let t = text(&o);
    assert_eq!(o.status.code(), Some(1), "{t}");
    assert!(
        t.contains(&format!("in use by process {}", holder.id())) && t.contains("stop it first"),
        "{t}"
    );
    std::fs::write(pool.join("lock"), "").unwrap();
    assert_eq!(snapshot_dir(&pool), before, "nothing was written");
}

#[test]
fn unreadable_superblock_is_refused_then_rebuilt_from_a_scan() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = small_pool(tmp.path());
    let meta = pool.join("metadata");
    let original = thin_dump(&meta);
    corrupt(&meta, 0);
    let before = snapshot_dir(&pool);

    let t = run(&pool, &["repair"], 1);
    assert!(
        t.contains("metadata block 0")
            || t.contains("block 0") && t.contains("superblock is unreadable"),
        "{t}"
    );
    assert!(
        t.contains("thin_repair needs them") && t.contains("--data-block-size"),
        "{t}"
    );
    assert_eq!(
        snapshot_dir(&pool),
        before,
        "a refused repair writes nothing"
    );
    // thin_repair 0.9 asks for them too.
    let e = repair_common::thin_repair(&meta, tmp.path()).unwrap_err();
    assert!(e.contains("transaction id"), "{e}");

    let t = run(&pool, &["repair", "--data-block-size", "64K"], 1);
    assert!(t.contains("superblock unreadable"), "{t}");
    let repaired = thin_dump(&meta);
    assert_eq!(repaired, original, "{t}");
    run(&pool, &["check"], 0);
    thin_check(&meta).unwrap();
    // A wrong block size is refused as such.
    corrupt(&meta, 0);
    let t = run(&pool, &["repair", "--data-block-size", "3000"], 1);
    assert!(t.contains("3000") || t.contains("power of two"), "{t}");
    // The other fields can be given too; volumes.json follows the transaction id.
    let t = run(
        &pool,
        &[
            "repair",
            "--data-block-size",
            "64K",
            "--nr-data-blocks",
            "16000",
            "--transaction-id",
            "42",
        ],
        1,
    );
    let repaired = thin_dump(&meta);
    assert_eq!(
        (repaired.transaction, repaired.nr_data_blocks),
        (42, 16000),
        "{t}"
    );
    assert_eq!(repaired.devices, original.devices);
    run(&pool, &["check"], 0);
    let v: serde_json::Value =
        serde_json::from_slice(&std::fs::read(pool.join("volumes.json")).unwrap()).unwrap();
    assert_eq!(v["transaction_id"], 42);
}

#[test]
fn dry_run_writes_nothing_and_json_reports_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = small_pool(tmp.path());
    let meta = pool.join("metadata");
    let leaf = a_leaf_of_device_3(&meta);
    let lost_keys = parse_node(&read_block(&meta, leaf)).keys;
    corrupt(&meta, leaf);
    let before = snapshot_dir(&pool);

    let t = run(&pool, &["repair", "--dry-run"], 1);
    assert!(t.contains("dry run: nothing written"), "{t}");
    assert!(
        t.contains(&format!("metadata block {leaf}")) && t.contains("device 3"),
        "{t}"
    );
    let o = uthin(&pool, &["--json", "repair", "--dry-run"]);
    assert_eq!(o.status.code(), Some(1));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["dry_run"], true);
    assert_eq!(j["clean"], false);
    assert!(j["damaged_copy"].is_null());
    assert_eq!(j["losses"][0]["block"], leaf);
    assert_eq!(j["losses"][0]["dev_id"], 3);
    assert_eq!(j["devices"][2]["mappings"], 0);
    assert_eq!(j["devices"][2]["mapped_before"], lost_keys.len());
    assert_eq!(snapshot_dir(&pool), before, "--dry-run wrote something");

    // The real repair: exit 1 (something was lost), then a clean pool.
    let o = uthin(&pool, &["--json", "repair"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let kept = PathBuf::from(j["damaged_copy"].as_str().unwrap());
    assert_eq!(kept.parent(), Some(pool.as_path()));
    assert_eq!(std::fs::read(&kept).unwrap(), before[&meta]);
    run(&pool, &["check"], 0);
    let dump = thin_dump(&meta);
    assert!(dump.devices[2].mappings.is_empty());
    assert_eq!(dump.devices[0].mappings.len(), 800);
    // Repairing the repaired pool is clean: exit 0.
    let t = run(&pool, &["repair"], 0);
    assert!(t.contains("clean: nothing was lost"), "{t}");
}

#[test]
fn metadata_behind_a_symlink_stays_there() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = small_pool(tmp.path());
    let elsewhere = tmp.path().join("fast-disk");
    std::fs::create_dir(&elsewhere).unwrap();
    let real = elsewhere.join("pool-meta");
    std::fs::rename(pool.join("metadata"), &real).unwrap();
    std::os::unix::fs::symlink(&real, pool.join("metadata")).unwrap();
    let leaf = a_leaf_of_device_3(&real);
    corrupt(&real, leaf);
    run(&pool, &["repair"], 1);
    assert!(
        std::fs::symlink_metadata(pool.join("metadata"))
            .unwrap()
            .file_type()
            .is_symlink(),
        "the symlink is kept"
    );
    let kept: Vec<_> = std::fs::read_dir(&elsewhere)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("pool-meta.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "the damaged copy sits beside the real file");
    run(&pool, &["check"], 0);
    thin_check(&real).unwrap();
}

#[test]
fn metadata_on_a_block_device_is_copied_aside_and_overwritten() {
    let tmp = tempfile::tempdir().unwrap();
    let pool = small_pool(tmp.path());
    let image = tmp.path().join("meta.img");
    std::fs::copy(pool.join("metadata"), &image).unwrap();
    let dev = Loop::attach(&image);
    std::fs::remove_file(pool.join("metadata")).unwrap();
    std::os::unix::fs::symlink(&dev.0, pool.join("metadata")).unwrap();
    let original = thin_dump(Path::new(&dev.0));
    let (_, details_root, ..) = superblock_roots(Path::new(&dev.0));
    corrupt(Path::new(&dev.0), details_root);

    let t = run(&pool, &["repair"], 1);
    assert!(t.contains("details rebuilt"), "{t}");
    let repaired = thin_dump(Path::new(&dev.0));
    assert_eq!(repaired.devices.len(), original.devices.len());
    for (r, o) in repaired.devices.iter().zip(&original.devices) {
        assert_eq!(r.mappings, o.mappings);
    }
    run(&pool, &["check"], 0);
    let kept: Vec<_> = std::fs::read_dir(&pool)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("metadata.damaged-"))
        .collect();
    assert_eq!(kept.len(), 1, "{kept:?}");
    assert_eq!(
        std::fs::metadata(&kept[0]).unwrap().len(),
        std::fs::metadata(&image).unwrap().len()
    );
    assert!(!pool.join("metadata.repair-tmp").exists());
    drop(dev);
}

#[test]
fn diverged_snapshots_get_the_metadata_room_they_need() {
    // Ten snapshots of a 20,000-block volume, each rewritten in one block: in the old metadata
    // they share all but one leaf; fresh metadata writes each tree whole (only identical trees
    // are shared again), which does not fit in the 2 MiB the pool had.
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pool");
    let mut pool = Pool::create(
        &dir,
        &CreateOptions {
            data_size: 4 << 30,
            block_size: 64 << 10,
            metadata_size: Some(2 << 20),
            force: false,
        },
    )
    .unwrap();
    let v = pool.create_volume("v", 1 << 40).unwrap().dev_id;
    for vb in 0..20_000 {
        pool.provision(v, VirtBlock(vb)).unwrap();
    }
    pool.commit().unwrap();
    for i in 0..10u64 {
        let s = pool.snapshot("v", &format!("s{i}"), false).unwrap().dev_id;
        pool.break_sharing(s, VirtBlock(i * 2000)).unwrap();
    }
    pool.commit().unwrap();
    drop(pool);
    let meta = dir.join("metadata");
    let original = thin_dump(&meta);
    let size_before = std::fs::metadata(&meta).unwrap().len();
    let o = uthin(&dir, &["--json", "repair"]);
    assert_eq!(o.status.code(), Some(0), "{}", text(&o));
    let j: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(
        j["notes"][0].as_str().unwrap().contains("metadata grew"),
        "{j}"
    );
    let size_after = std::fs::metadata(&meta).unwrap().len();
    assert!(size_after > size_before, "{size_before} -> {size_after}");
    assert_eq!(j["metadata_blocks"], size_after / 4096);
    assert_eq!(thin_dump(&meta), original);
    run(&dir, &["check"], 0);
    thin_check(&meta).unwrap();
}

#[test]
fn random_damage_never_panics_and_never_invents_mappings() {
    use rand::{Rng, SeedableRng};
    let tmp = tempfile::tempdir().unwrap();
    let pool = small_pool(tmp.path());
    let meta = pool.join("metadata");
    let original = thin_dump(&meta);
    let known: std::collections::BTreeSet<(u32, u64, u64)> = original
        .devices
        .iter()
        .flat_map(|d| d.mappings.iter().map(move |m| (d.dev_id, m.origin, m.data)))
        .collect();
    let pristine = std::fs::read(&meta).unwrap();
    let volumes = std::fs::read(pool.join("volumes.json")).unwrap();
    let used = 64u64; // the small pool's metadata lives in its first blocks
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    for round in 0..40 {
        std::fs::write(&meta, &pristine).unwrap();
        std::fs::write(pool.join("volumes.json"), &volumes).unwrap();
        for e in std::fs::read_dir(&pool).unwrap() {
            let p = e.unwrap().path();
            if p.to_string_lossy().contains(".damaged-") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let mut what = Vec::new();
        for _ in 0..rng.random_range(1..4) {
            let b = rng.random_range(1..used);
            if rng.random_bool(0.5) {
                corrupt(&meta, b);
                what.push(format!("flip {b}"));
            } else {
                // Damage a checksum cannot see: random fields of a node, resealed.
                let (at, v): (usize, u64) = match rng.random_range(0..4) {
                    0 => (16, rng.random_range(0..400)), // nr_entries
                    1 => (32 + 8 * rng.random_range(0..20), rng.random()), // a key
                    2 => (
                        32 + 8 * 252 + 8 * rng.random_range(0..20),
                        rng.random_range(0..3000),
                    ), // a value
                    _ => (4, rng.random_range(0..4)),    // flags
                };
                repair_common::rewrite_sealed(&meta, b, 121_107, |blk| {
                    let n = if at == 16 || at == 4 { 4 } else { 8 };
                    blk[at..at + n].copy_from_slice(&v.to_le_bytes()[..n]);
                });
                what.push(format!("field {at} of {b} = {v}"));
            }
        }
        let o = uthin(&pool, &["--json", "repair"]);
        let t = text(&o);
        assert!(
            matches!(o.status.code(), Some(0 | 1)) && !t.contains("panicked"),
            "round {round} ({what:?}): {t}"
        );
        let j: serde_json::Value = match serde_json::from_slice(&o.stdout) {
            Ok(j) => j,
            Err(_) => panic!("round {round} ({what:?}): no report: {t}"),
        };
        if j.get("error").is_some() {
            // Refusing (e.g. nothing recognisable) is allowed; it must say why and change nothing.
            assert_ne!(std::fs::read(&meta).unwrap(), pristine);
            continue;
        }
        let c = uthin(&pool, &["check"]);
        assert_eq!(
            c.status.code(),
            Some(0),
            "round {round} ({what:?}): {}\n{t}",
            text(&c)
        );
        thin_check(&meta).unwrap_or_else(|e| panic!("round {round} ({what:?}): {e}\n{t}"));
        let flagged: std::collections::BTreeSet<u64> = j["losses"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|l| {
                let k = l["kind"].as_str().unwrap();
                k == "tree found through an older copy" || k == "other"
            })
            .filter_map(|l| l["dev_id"].as_u64())
            .collect();
        for d in thin_dump(&meta).devices {
            for m in &d.mappings {
                assert!(
                    known.contains(&(d.dev_id, m.origin, m.data))
                        || flagged.contains(&u64::from(d.dev_id)),
                    "round {round} ({what:?}): device {} vb {} -> {} is invented\n{t}",
                    d.dev_id,
                    m.origin,
                    m.data
                );
            }
        }
    }
}
