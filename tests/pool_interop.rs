//! Interop with thin-provisioning-tools: pools written by `thin_restore` (several devices,
//! shared mappings, ranges) open in uthin, list by dev id, can be adopted and give the right
//! mappings; `thin_ls` exclusive/shared counts equal uthin's; uthin's writes pass thin_check.

mod pool_common;

use std::collections::BTreeMap;

use uthin::pool::Pool;
use uthin::tools::xml::parse_xml;
use uthin::units::{DataBlock, DevId, VirtBlock};

const XML: &str = r#"<superblock uuid="" time="3" transaction="7" flags="0" version="2" data_block_size="128" nr_data_blocks="4096">
  <device dev_id="1" mapped_blocks="1206" transaction="0" creation_time="0" snap_time="2">
    <range_mapping origin_begin="0" data_begin="0" length="1000" time="0"/>
    <range_mapping origin_begin="2000" data_begin="1000" length="200" time="1"/>
    <single_mapping origin_block="5000" data_block="1500" time="2"/>
    <single_mapping origin_block="5002" data_block="1502" time="2"/>
    <range_mapping origin_begin="9000" data_begin="3000" length="4" time="2"/>
  </device>
  <device dev_id="2" mapped_blocks="1000" transaction="3" creation_time="1" snap_time="1">
    <range_mapping origin_begin="0" data_begin="0" length="500" time="0"/>
    <range_mapping origin_begin="500" data_begin="2500" length="500" time="1"/>
  </device>
  <device dev_id="7" mapped_blocks="3" transaction="5" creation_time="2" snap_time="2">
    <single_mapping origin_block="1" data_block="4000" time="2"/>
    <single_mapping origin_block="5000" data_block="1500" time="2"/>
    <single_mapping origin_block="77777" data_block="4001" time="3"/>
  </device>
  <device dev_id="9" mapped_blocks="0" transaction="6" creation_time="3" snap_time="3">
  </device>
</superblock>
"#;

fn restored_pool() -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let pool = dir.path().join("pool");
    std::fs::create_dir(&pool).unwrap();
    pool_common::thin_restore(XML, &pool.join("metadata"), 8 << 20);
    std::fs::File::create(pool.join("data"))
        .unwrap()
        .set_len(4096 * 65536)
        .unwrap();
    (dir, pool)
}

#[test]
fn restored_pool_opens_lists_adopts_and_maps() {
    let (_d, dir) = restored_pool();
    let want = parse_xml(XML).unwrap();
    let mut pool = Pool::open(&dir).unwrap();
    assert_eq!(pool.transaction_id(), 7);
    assert_eq!(pool.data_block_size(), 65536);
    let list = pool.list().unwrap();
    let ids: Vec<u32> = list.iter().map(|v| v.dev_id.0).collect();
    assert_eq!(ids, vec![1, 2, 7, 9]);
    assert!(list.iter().all(|v| v.name.is_none() && v.size.is_none()));
    assert_eq!(list[0].mapped_blocks, 1206);

    for d in &want.devices {
        let got: BTreeMap<u64, (u64, u32)> = pool
            .mappings(DevId(d.dev_id))
            .unwrap()
            .into_iter()
            .map(|(v, bt)| (v.0, (bt.block.0, bt.time)))
            .collect();
        let exp: BTreeMap<u64, (u64, u32)> = d
            .mappings
            .iter()
            .map(|m| (m.origin, (m.data, m.time)))
            .collect();
        assert_eq!(got, exp, "device {}", d.dev_id);
    }
    // Exact sharing: dev 1 and 2 share data blocks 0..500; dev 1 and 7 share 1500.
    let m = pool.lookup(DevId(1), VirtBlock(10)).unwrap().unwrap();
    assert_eq!(m.block, DataBlock(10));
    assert!(m.shared);
    assert!(
        !pool
            .lookup(DevId(1), VirtBlock(700))
            .unwrap()
            .unwrap()
            .shared
    );
    assert!(
        pool.lookup(DevId(7), VirtBlock(5000))
            .unwrap()
            .unwrap()
            .shared
    );
    assert!(
        !pool
            .lookup(DevId(7), VirtBlock(77777))
            .unwrap()
            .unwrap()
            .shared
    );
    assert_eq!(pool.lookup(DevId(7), VirtBlock(2)).unwrap(), None);

    // thin_ls's exclusive/shared counts equal uthin's.
    let ls = pool_common::thin_ls(&dir.join("metadata"));
    for v in &list {
        let u = pool.usage(v.dev_id).unwrap();
        assert_eq!(
            ls[&v.dev_id.0],
            (u.mapped_blocks, u.exclusive_blocks, u.shared_blocks),
            "device {}",
            v.dev_id.0
        );
    }

    // Adopt and use: a write to a shared block copies it; thin tools still agree.
    pool.adopt(DevId(2), "two", 1000 * 65536).unwrap();
    assert!(pool.adopt(DevId(2), "again", 65536).is_err());
    let (old, new) = pool.break_sharing(DevId(2), VirtBlock(3)).unwrap();
    assert_eq!(old, DataBlock(3));
    assert_ne!(new, old);
    let snap = pool.snapshot("two", "two-snap", false).unwrap();
    pool.delete_volume("two").unwrap();
    pool.commit().unwrap();
    drop(pool);
    pool_common::thin_check(&dir.join("metadata")).unwrap();
    let dump = pool_common::thin_dump(&dir.join("metadata"));
    let maps = pool_common::dump_mappings(&dump);
    assert!(!maps.contains_key(&2));
    assert_eq!(maps[&snap.dev_id.0][&3], new.0);
    assert_eq!(maps[&snap.dev_id.0].len(), 1000);
    assert_eq!(maps[&1].len(), 1206);
    let pool = Pool::open(&dir).unwrap();
    let names: Vec<Option<String>> = pool.list().unwrap().into_iter().map(|v| v.name).collect();
    assert_eq!(names[0].as_deref(), Some("two-snap"));
    let report = uthin::tools::check::check_live(&pool).unwrap();
    assert!(report.is_clean(), "{}", report.to_text());
}

#[test]
fn uthin_pool_reads_back_in_thin_dump_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let opts = uthin::pool::CreateOptions {
        data_size: 1000 * 65536,
        block_size: 128 * 1024,
        metadata_size: None,
        force: false,
    };
    let mut pool = Pool::create(dir.path(), &opts).unwrap();
    let a = pool.create_volume("a", 1 << 30).unwrap();
    for vb in (0..300).chain(1000..1010) {
        pool.provision(a.dev_id, VirtBlock(vb)).unwrap();
    }
    let s = pool.snapshot("a", "s", false).unwrap();
    pool.break_sharing(s.dev_id, VirtBlock(5)).unwrap();
    pool.commit().unwrap();
    let mine = uthin::tools::dump::dump_xml(&pool).unwrap();
    drop(pool);
    let theirs = std::process::Command::new("thin_dump")
        .arg(dir.path().join("metadata"))
        .output()
        .unwrap();
    assert_eq!(mine, String::from_utf8_lossy(&theirs.stdout));
    let sb = parse_xml(&mine).unwrap();
    assert_eq!(sb.data_block_size, 256);
    assert_eq!(sb.time, 1);
}

#[test]
fn dump_and_restore_round_trip_through_both_toolsets() {
    let dir = tempfile::tempdir().unwrap();
    let xml_path = dir.path().join("in.xml");
    std::fs::write(&xml_path, XML).unwrap();
    let pool_dir = dir.path().join("restored");
    let bin = env!("CARGO_BIN_EXE_uthin");
    let out = std::process::Command::new(bin)
        .arg("--pool")
        .arg(&pool_dir)
        .args(["restore", "-i"])
        .arg(&xml_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // thin_check accepts uthin's restore, thin_dump prints the input back, and so does uthin dump.
    pool_common::thin_check(&pool_dir.join("metadata")).unwrap();
    let theirs = std::process::Command::new("thin_dump")
        .arg(pool_dir.join("metadata"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&theirs.stdout), XML);
    let mine = std::process::Command::new(bin)
        .arg("--pool")
        .arg(&pool_dir)
        .arg("dump")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&mine.stdout), XML);
    let check = std::process::Command::new(bin)
        .arg("--pool")
        .arg(&pool_dir)
        .arg("check")
        .output()
        .unwrap();
    assert!(
        check.status.success(),
        "{}",
        String::from_utf8_lossy(&check.stdout)
    );
}

#[test]
fn delta_matches_thin_delta() {
    let (_d, dir) = restored_pool();
    let bin = env!("CARGO_BIN_EXE_uthin");
    for (a, b) in [(1u32, 2u32), (2, 1), (1, 7), (7, 9), (9, 1)] {
        let theirs = std::process::Command::new("thin_delta")
            .arg(format!("--snap1={a}"))
            .arg(format!("--snap2={b}"))
            .arg(dir.join("metadata"))
            .output()
            .unwrap();
        assert!(
            theirs.status.success(),
            "{}",
            String::from_utf8_lossy(&theirs.stderr)
        );
        let mine = std::process::Command::new(bin)
            .arg("--pool")
            .arg(&dir)
            .args(["delta", &a.to_string(), &b.to_string()])
            .output()
            .unwrap();
        assert!(
            mine.status.success(),
            "{}",
            String::from_utf8_lossy(&mine.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&mine.stdout),
            String::from_utf8_lossy(&theirs.stdout),
            "delta {a} {b}"
        );
    }
}
