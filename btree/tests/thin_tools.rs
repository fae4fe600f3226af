//! The format judged by an independent implementation: thin-provisioning-tools' `thin_check`
//! and `thin_dump` must accept metadata this crate writes (through a minimal, test-only dm-thin
//! superblock), and this crate must read what `thin_restore` writes.
//! scripts/test.sh installs the tools (Debian package thin-provisioning-tools).

mod common;
use common::*;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use uthin_btree::check::count_btree;
use uthin_btree::*;

type Mapping = DataRef<24>;
type Top = SubtreeRef<Mapping>;
type Details = BytesValue<24>;

fn details(mapped: u64, trans: u64, ctime: u32, stime: u32) -> [u8; 24] {
    let mut d = [0u8; 24];
    d[0..8].copy_from_slice(&mapped.to_le_bytes());
    d[8..16].copy_from_slice(&trans.to_le_bytes());
    d[16..20].copy_from_slice(&ctime.to_le_bytes());
    d[20..24].copy_from_slice(&stime.to_le_bytes());
    d
}

fn run(cmd: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| {
        panic!("cannot run {cmd} ({e}); scripts/test.sh installs thin-provisioning-tools")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn thin_check_clean(path: &Path) {
    let (ok, text) = run("thin_check", &[path.to_str().unwrap()]);
    assert!(ok, "thin_check failed:\n{text}");
    for bad in [
        "differ", "error", "leaked", "corrupt", "damage", "missing", "too few", "mismatch",
    ] {
        assert!(
            !text.to_lowercase().contains(bad),
            "thin_check reported '{bad}':\n{text}"
        );
    }
}

/// Builds a pool-like metadata file: two devices, one a snapshot of the other that then diverges,
/// enough mappings for multi-level trees, a data space map; commits several times.
fn build(path: &Path) -> Vec<(u32, Vec<(u64, u64)>)> {
    let io = Arc::new(MemIo::new(4096));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    tm.create_data_sm(100_000).unwrap();
    let mut top = BTree::<Top>::create(&mut tm).unwrap();
    let mut det = BTree::<Details>::create(&mut tm).unwrap();
    let mut sb = TestSuper {
        trans_id: 1,
        data_block_sectors: 128,
        metadata_nr_blocks: 4096,
        ..Default::default()
    };
    // Device 1: 3000 sequential mappings and a few scattered ones.
    let dev1 = BTree::<Mapping>::create(&mut tm).unwrap().root();
    top.insert(&mut tm, 1, &dev1).unwrap();
    for vb in (0..3000u64).chain([10_000, 20_000, 1 << 30]) {
        let b = tm.data_alloc().unwrap();
        top.update_value(&mut tm, 1, |tm, root| {
            let mut t = BTree::<Mapping>::open(*root);
            t.insert(tm, vb, &(b.0 << 24 | 1))?;
            *root = t.root();
            Ok(())
        })
        .unwrap();
    }
    sb.mapping_root = top.root().0;
    sb.details_root = det.root().0;
    commit(&mut tm, &sb).unwrap();

    // Device 2: a snapshot of device 1 (shares every node), then overwrites and discards.
    let root1 = top.lookup(&tm, 1).unwrap().unwrap();
    tm.inc(root1).unwrap();
    top.insert(&mut tm, 2, &root1).unwrap();
    for vb in (0..3000u64).step_by(37) {
        let b = tm.data_alloc().unwrap();
        top.update_value(&mut tm, 2, |tm, root| {
            let mut t = BTree::<Mapping>::open(*root);
            t.insert(tm, vb, &(b.0 << 24 | 2))?;
            *root = t.root();
            Ok(())
        })
        .unwrap();
    }
    top.update_value(&mut tm, 1, |tm, root| {
        let mut t = BTree::<Mapping>::open(*root);
        t.remove_range(tm, 1000..1500, |_, _| {})?;
        *root = t.root();
        Ok(())
    })
    .unwrap();
    // Device 3: created and deleted again in the same transaction; device 4 empty.
    let r3 = BTree::<Mapping>::create(&mut tm).unwrap().root();
    top.insert(&mut tm, 3, &r3).unwrap();
    top.remove(&mut tm, 3).unwrap();
    let r4 = BTree::<Mapping>::create(&mut tm).unwrap().root();
    top.insert(&mut tm, 4, &r4).unwrap();

    let mut expected = Vec::new();
    for dev in [1u32, 2, 4] {
        let root = top.lookup(&tm, dev as u64).unwrap().unwrap();
        let maps: Vec<(u64, u64)> = BTree::<Mapping>::open(root)
            .iter(&tm, ..)
            .map(|r| r.unwrap())
            .collect();
        det.insert(&mut tm, dev as u64, &details(maps.len() as u64, 1, 0, 1))
            .unwrap();
        expected.push((dev, maps));
    }
    sb.trans_id = 2;
    sb.mapping_root = top.root().0;
    sb.details_root = det.root().0;
    commit(&mut tm, &sb).unwrap();
    let problems = recount(&tm, |tm, c| {
        count_btree::<Top>(tm, top.root(), c)?;
        count_btree::<Details>(tm, det.root(), c)
    });
    assert!(problems.is_empty(), "{problems:#?}");
    std::fs::write(path, io.to_bytes()).unwrap();
    expected
}

#[test]
fn thin_check_and_thin_dump_accept_our_metadata() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("meta");
    let expected = build(&path);
    thin_check_clean(&path);
    let (ok, xml) = run("thin_dump", &[path.to_str().unwrap()]);
    assert!(ok, "thin_dump failed:\n{xml}");
    assert!(xml.contains("transaction=\"2\""), "{xml}");
    assert!(xml.contains("nr_data_blocks=\"100000\""), "{xml}");
    // Every mapping appears in the dump (expanded from range_mapping runs).
    for (dev, maps) in &expected {
        let dump = dump_device(&xml, *dev);
        assert_eq!(&dump, maps, "device {dev}");
    }
}

/// Parses thin_dump's XML for one device into (virtual block, data block << 24 | time).
fn dump_device(xml: &str, dev: u32) -> Vec<(u64, u64)> {
    let attr = |line: &str, name: &str| -> u64 {
        let key = format!("{name}=\"");
        let start = line.find(&key).unwrap() + key.len();
        let end = line[start..].find('"').unwrap() + start;
        line[start..end].parse().unwrap()
    };
    let mut out = Vec::new();
    let mut inside = false;
    for line in xml.lines() {
        let line = line.trim();
        if line.starts_with("<device ") {
            inside = attr(line, "dev_id") == dev as u64;
        } else if line.starts_with("</device") {
            inside = false;
        } else if inside && line.starts_with("<single_mapping") {
            let (o, d, t) = (
                attr(line, "origin_block"),
                attr(line, "data_block"),
                attr(line, "time"),
            );
            out.push((o, d << 24 | t));
        } else if inside && line.starts_with("<range_mapping") {
            let (o, d, n, t) = (
                attr(line, "origin_begin"),
                attr(line, "data_begin"),
                attr(line, "length"),
                attr(line, "time"),
            );
            for i in 0..n {
                out.push((o + i, (d + i) << 24 | t));
            }
        }
    }
    out
}

#[test]
fn we_read_what_thin_restore_wrote() {
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("in.xml");
    let meta = dir.path().join("meta");
    let mut s = String::from(
        "<superblock uuid=\"\" time=\"2\" transaction=\"5\" data_block_size=\"128\" nr_data_blocks=\"200000\">\n",
    );
    let mut want: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    for dev in [3u32, 9] {
        let mut maps = Vec::new();
        s += &format!(
            "<device dev_id=\"{dev}\" mapped_blocks=\"0\" transaction=\"1\" creation_time=\"0\" snap_time=\"0\">\n"
        );
        for i in 0..5000u64 {
            let vb = i * 3 + dev as u64;
            let db = (dev as u64) * 10_000 + i;
            s += &format!(
                "<single_mapping origin_block=\"{vb}\" data_block=\"{db}\" time=\"1\"/>\n"
            );
            maps.push((vb, db << 24 | 1));
        }
        s += "</device>\n";
        want.push((dev, maps));
    }
    s += "</superblock>\n";
    std::fs::write(&xml, s).unwrap();
    std::fs::write(&meta, vec![0u8; 4096 * 2048]).unwrap();
    let (ok, text) = run(
        "thin_restore",
        &["-i", xml.to_str().unwrap(), "-o", meta.to_str().unwrap()],
    );
    assert!(ok, "thin_restore failed: {text}");

    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(&meta).unwrap());
    let (tm, sb) = open(io, 4096, 0).unwrap();
    assert_eq!(sb.trans_id, 5);
    let top = BTree::<Top>::open(MetaBlock(sb.mapping_root));
    let det = BTree::<Details>::open(MetaBlock(sb.details_root));
    for (dev, maps) in &want {
        let root = top.lookup(&tm, *dev as u64).unwrap().unwrap();
        let got: Vec<(u64, u64)> = BTree::<Mapping>::open(root)
            .iter(&tm, ..)
            .map(|r| r.unwrap())
            .collect();
        assert_eq!(&got, maps, "device {dev}");
        assert!(det.lookup(&tm, *dev as u64).unwrap().is_some());
        for (vb, v) in maps.iter().step_by(101) {
            assert_eq!(
                BTree::<Mapping>::open(root)
                    .lookup_shared(&tm, *vb)
                    .unwrap(),
                Some((*v, false))
            );
            assert_eq!(tm.data_count(Mapping::block(*v)).unwrap(), 1);
        }
    }
    // Our recount agrees block by block with the tools' space maps (their summary hints —
    // nr_allocated, nr_free, none_free_before — are not exact, and thin_check does not mind).
    let mut c = RefCounter::new();
    c.inc_meta(MetaBlock(0));
    count_btree::<Top>(&tm, top.root(), &mut c).unwrap();
    count_btree::<Details>(&tm, det.root(), &mut c).unwrap();
    tm.count_space_map_blocks(&mut c).unwrap();
    assert!(c.problems().is_empty(), "{:#?}", c.problems());
    let wrong: Vec<String> = tm
        .verify_metadata_counts(&c)
        .unwrap()
        .into_iter()
        .chain(tm.verify_data_counts(&c).unwrap())
        .filter(|d| !d.is_hint())
        .map(|d| d.to_string())
        .collect();
    assert!(wrong.is_empty(), "{wrong:#?}");
}

#[test]
fn thin_restore_output_survives_our_transactions() {
    // Open a tools-written pool, change it through this crate, commit: thin_check still agrees.
    let dir = tempfile::tempdir().unwrap();
    let xml = dir.path().join("in.xml");
    let meta = dir.path().join("meta");
    std::fs::write(
        &xml,
        "<superblock uuid=\"\" time=\"1\" transaction=\"1\" data_block_size=\"128\" nr_data_blocks=\"20000\">\n\
         <device dev_id=\"1\" mapped_blocks=\"600\" transaction=\"0\" creation_time=\"0\" snap_time=\"0\">\n\
         <range_mapping origin_begin=\"0\" data_begin=\"0\" length=\"600\" time=\"0\"/>\n\
         </device>\n</superblock>\n",
    )
    .unwrap();
    std::fs::write(&meta, vec![0u8; 4096 * 1024]).unwrap();
    let (ok, text) = run(
        "thin_restore",
        &["-i", xml.to_str().unwrap(), "-o", meta.to_str().unwrap()],
    );
    assert!(ok, "thin_restore failed: {text}");
    let io: Arc<dyn BlockIo> = Arc::new(FileIo::open(&meta).unwrap());
    let mut raw = [0u8; BLOCK_SIZE];
    io.read(MetaBlock(0), &mut raw).unwrap();
    let (mut tm, mut sb) = open(io.clone(), 1024, 0).unwrap();
    let mut top = BTree::<Top>::open(MetaBlock(sb.mapping_root));
    // Snapshot device 1 as device 2, overwrite some blocks of 2, discard some of 1.
    let r1 = top.lookup(&tm, 1).unwrap().unwrap();
    tm.inc(r1).unwrap();
    top.insert(&mut tm, 2, &r1).unwrap();
    for vb in (0..600u64).step_by(5) {
        let b = tm.data_alloc().unwrap();
        top.update_value(&mut tm, 2, |tm, root| {
            let mut t = BTree::<Mapping>::open(*root);
            t.insert(tm, vb, &(b.0 << 24 | 1))?;
            *root = t.root();
            Ok(())
        })
        .unwrap();
    }
    top.update_value(&mut tm, 1, |tm, root| {
        let mut t = BTree::<Mapping>::open(*root);
        t.remove_range(tm, 100..300, |_, _| {})?;
        *root = t.root();
        Ok(())
    })
    .unwrap();
    let mut det = BTree::<Details>::open(MetaBlock(sb.details_root));
    let d1 = det.lookup(&tm, 1).unwrap().unwrap();
    det.insert(&mut tm, 2, &d1).unwrap();
    sb.mapping_root = top.root().0;
    sb.details_root = det.root().0;
    sb.trans_id = 2;
    sb.data_block_sectors = 128;
    sb.metadata_nr_blocks = 1024;
    let info = commit(&mut tm, &sb).unwrap();
    // Of the 200 blocks discarded from device 1, the snapshot still maps 160; the other 40 it
    // had overwritten, so their last reference went.
    assert_eq!(info.freed_data.iter().map(|e| e.len).sum::<u64>(), 40);
    drop(tm);
    thin_check_clean(&meta);
}

#[test]
fn thin_check_notices_a_count_we_got_wrong() {
    // The negative control: the judge must be able to fail. Take a reference nobody holds.
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(MemIo::new(1024));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    tm.create_data_sm(1000).unwrap();
    let top = BTree::<Top>::create(&mut tm).unwrap();
    let det = BTree::<Details>::create(&mut tm).unwrap();
    tm.inc(det.root()).unwrap();
    let sb = TestSuper {
        trans_id: 1,
        mapping_root: top.root().0,
        details_root: det.root().0,
        data_block_sectors: 128,
        metadata_nr_blocks: 1024,
        ..Default::default()
    };
    commit(&mut tm, &sb).unwrap();
    let path = dir.path().join("meta");
    std::fs::write(&path, io.to_bytes()).unwrap();
    let (_, text) = run("thin_check", &[path.to_str().unwrap()]);
    assert!(
        text.contains("differ"),
        "thin_check missed a wrong count:\n{text}"
    );
}

#[test]
fn thin_check_accepts_grown_space_maps() {
    // Metadata grown past its first bitmap, data grown across bitmaps, then used.
    let dir = tempfile::tempdir().unwrap();
    let io = Arc::new(MemIo::new(1000));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    tm.create_data_sm(5000).unwrap();
    let mut top = BTree::<Top>::create(&mut tm).unwrap();
    let mut det = BTree::<Details>::create(&mut tm).unwrap();
    let mut sb = TestSuper {
        trans_id: 1,
        data_block_sectors: 128,
        metadata_nr_blocks: 1000,
        ..Default::default()
    };
    sb.mapping_root = top.root().0;
    sb.details_root = det.root().0;
    commit(&mut tm, &sb).unwrap();
    tm.extend(20_000).unwrap();
    tm.data_extend(50_000).unwrap();
    let r = BTree::<Mapping>::create(&mut tm).unwrap().root();
    top.insert(&mut tm, 0, &r).unwrap();
    let mut n = 0u64;
    for vb in (0..40_000u64).step_by(2) {
        let b = tm.data_alloc().unwrap();
        top.update_value(&mut tm, 0, |tm, root| {
            let mut t = BTree::<Mapping>::open(*root);
            t.insert(tm, vb, &(b.0 << 24))?;
            *root = t.root();
            Ok(())
        })
        .unwrap();
        n += 1;
    }
    det.insert(&mut tm, 0, &details(n, 1, 0, 0)).unwrap();
    sb.trans_id = 2;
    sb.metadata_nr_blocks = 20_000;
    sb.mapping_root = top.root().0;
    sb.details_root = det.root().0;
    commit(&mut tm, &sb).unwrap();
    let path = dir.path().join("meta");
    std::fs::write(&path, io.to_bytes()).unwrap();
    thin_check_clean(&path);
}
