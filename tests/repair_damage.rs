//! `uthin repair` on damaged copies of one pool (several devices, snapshots sharing trees and
//! data blocks, a deleted device's stale nodes): a block of each kind is corrupted, the pool is
//! repaired, and the result must pass `uthin check` and `thin_check`, dump (thin_dump) as the
//! original minus exactly what the corrupted block held, count every data block exactly, and
//! still read the right data through the pool's lookup. thin_repair 0.9 runs on the same damaged
//! file; what each salvages is printed (`--nocapture`) and uthin must keep all it keeps.

mod repair_common;

use std::collections::{BTreeMap, BTreeSet};
use std::os::unix::fs::FileExt;
use std::path::Path;

use repair_common::*;
use uthin::pool::Pool;
use uthin::tools::check::check_pool;
use uthin::tools::repair::{LossKind, RepairOptions, RepairReport, repair_pool};
use uthin::tools::xml::XmlSuperblock;
use uthin::units::{DataBlock, DevId, VirtBlock};

/// Each device's mappings are read back through `Pool::lookup` (every one for small devices,
/// every 7th for big ones) and the tag at the data block compared with what the device wrote;
/// the lookup's exact sharing must say "shared" exactly for blocks that several devices map.
/// (Reference counts themselves are checked by `uthin check` and `thin_check`: a tree shared by
/// two devices counts its data blocks once.)
fn reads_right(dir: &Path, built: &Built, got: &XmlSuperblock) {
    let pool = Pool::open(dir).unwrap();
    let data = std::fs::File::open(dir.join("data")).unwrap();
    let mut refs: BTreeMap<u64, u32> = BTreeMap::new();
    for d in &got.devices {
        for m in &d.mappings {
            *refs.entry(m.data).or_default() += 1;
        }
    }
    // Device 6 was deleted before the damage (some repairs bring it back): its blocks were
    // punched and read as zeros.
    for d in got.devices.iter().filter(|d| d.dev_id != 6) {
        let stride = if d.mappings.len() > 5000 { 7 } else { 1 };
        for (i, m) in d.mappings.iter().enumerate() {
            if i % stride != 0 {
                continue;
            }
            let found = pool
                .lookup(DevId(d.dev_id), VirtBlock(m.origin))
                .unwrap()
                .unwrap_or_else(|| panic!("device {} vb {} not mapped", d.dev_id, m.origin));
            assert_eq!(found.block, DataBlock(m.data));
            assert_eq!(
                found.shared,
                refs[&m.data] > 1,
                "device {} vb {}: sharing of data block {}",
                d.dev_id,
                m.origin,
                m.data
            );
            let want = &built.expected[&(d.dev_id, m.origin)];
            let mut buf = vec![0u8; want.len()];
            data.read_exact_at(&mut buf, m.data * BLOCK_SIZE).unwrap();
            assert_eq!(
                String::from_utf8_lossy(&buf),
                *want,
                "device {} vb {} reads another block's data",
                d.dev_id,
                m.origin
            );
        }
    }
}

struct Case<'a> {
    built: &'a Built,
    /// Extra arguments for thin_repair in the next run.
    thin_repair_args: Vec<String>,
    work: &'a Path,
    original: XmlSuperblock,
    comparisons: Vec<String>,
}

impl Case<'_> {
    /// Copies the pool, damages it with `damage` (which returns the dump a perfect repair
    /// gives), repairs, and checks everything; the report must be clean (nothing lost) exactly
    /// when `expect_clean`. Returns the report.
    fn run(
        &mut self,
        name: &str,
        expect_clean: bool,
        damage: impl FnOnce(&Path, &XmlSuperblock) -> XmlSuperblock,
    ) -> RepairReport {
        self.run_with(name, expect_clean, &RepairOptions::default(), damage)
    }

    fn run_with(
        &mut self,
        name: &str,
        expect_clean: bool,
        opts: &RepairOptions,
        damage: impl FnOnce(&Path, &XmlSuperblock) -> XmlSuperblock,
    ) -> RepairReport {
        let dir = self.work.join(name);
        copy_pool(&self.built.dir, &dir);
        let meta = dir.join("metadata");
        let expected = damage(&meta, &self.original);
        let damaged = std::fs::read(&meta).unwrap();
        let before = check_pool(&dir, false).unwrap();
        assert!(
            !before.is_clean(),
            "{name}: the damage is not seen by check"
        );

        let report = repair_pool(&dir, opts).unwrap();
        let text = report.to_text();
        assert_eq!(report.is_clean(), expect_clean, "{name}: {text}");
        let after = check_pool(&dir, false).unwrap();
        assert!(after.is_clean(), "{name}: {}", after.to_text());
        thin_check(&meta).unwrap_or_else(|e| panic!("{name}: thin_check: {e}"));
        let got = thin_dump(&meta);
        if got != expected {
            for (g, e) in got.devices.iter().zip(&expected.devices) {
                if g != e {
                    let (gs, es) = (triples_of(g), triples_of(e));
                    panic!(
                        "{name}: device {} differs: details {:?} vs {:?}; extra {:?}; missing {:?}\n{text}",
                        g.dev_id,
                        (g.mapped_blocks, g.transaction, g.creation_time, g.snap_time),
                        (e.mapped_blocks, e.transaction, e.creation_time, e.snap_time),
                        gs.difference(&es).take(5).collect::<Vec<_>>(),
                        es.difference(&gs).take(5).collect::<Vec<_>>()
                    );
                }
            }
            panic!(
                "{name}: header or device list differs:\n{:?}\n{:?}\n{text}",
                (&got.time, got.transaction, got.devices.len()),
                (&expected.time, expected.transaction, expected.devices.len())
            );
        }
        let kept = report.damaged_copy.clone().expect("damaged copy");
        assert_eq!(
            std::fs::read(&kept).unwrap(),
            damaged,
            "{name}: damaged copy"
        );
        reads_right(&dir, self.built, &got);

        // thin_repair 0.9 on the same damaged file.
        let ours = triples(&got);
        let args: Vec<&str> = self.thin_repair_args.iter().map(String::as_str).collect();
        let line = match thin_repair_with(&kept, &dir, &args) {
            Ok(theirs) => {
                // thin_repair may bring back a device deleted before the damage (from a stale
                // tree): its blocks were freed and may be reused, so it is no gain; compare the
                // devices the pool had.
                let live: BTreeSet<u32> = self.original.devices.iter().map(|d| d.dev_id).collect();
                let t: BTreeSet<_> = triples(&theirs)
                    .into_iter()
                    .filter(|(d, _, _)| live.contains(d))
                    .collect();
                let resurrected: Vec<u32> = theirs
                    .devices
                    .iter()
                    .map(|d| d.dev_id)
                    .filter(|d| !live.contains(d))
                    .collect();
                assert!(
                    t.is_subset(&ours),
                    "{name}: thin_repair keeps mappings uthin drops: {:?}",
                    t.difference(&ours).take(5).collect::<Vec<_>>()
                );
                format!(
                    "{name:<18} uthin {:>6} mappings, {} devices | thin_repair {:>6} mappings, {} devices{}",
                    ours.len(),
                    got.devices.len(),
                    t.len(),
                    theirs.devices.len(),
                    if resurrected.is_empty() {
                        String::new()
                    } else {
                        format!(" (incl. deleted device(s) {resurrected:?} brought back)")
                    }
                )
            }
            Err(e) => format!(
                "{name:<18} uthin {:>6} mappings, {} devices | thin_repair fails: {}",
                ours.len(),
                got.devices.len(),
                e.replace('\n', " ")
            ),
        };
        self.comparisons.push(line);
        report
    }
}

fn triples_of(d: &uthin::tools::xml::XmlDevice) -> BTreeSet<(u64, u64)> {
    d.mappings.iter().map(|m| (m.origin, m.data)).collect()
}

fn setup(work: &Path) -> (Built, XmlSuperblock) {
    let built = build_pool(&work.join("base"));
    let original = thin_dump(&built.dir.join("metadata"));
    assert_eq!(original.devices.len(), 5);
    (built, original)
}

#[test]
fn damaged_trees_lose_exactly_what_the_bad_block_held() {
    let work = tempfile::tempdir().unwrap();
    let (built, original) = setup(work.path());
    let mut case = Case {
        built: &built,
        thin_repair_args: Vec::new(),
        work: work.path(),
        original,
        comparisons: Vec::new(),
    };
    let base_meta = built.dir.join("metadata");
    let nodes = mapping_nodes(&base_meta);
    let (sb_time, sb_txid) = {
        let (_, _, t, x) = superblock_roots(&base_meta);
        (t, x)
    };

    // A bottom-level leaf shared by base, snap1 and snap2 (virtual blocks around 50,000).
    let (leaves, internal) = device_nodes(&base_meta, 1);
    let shared_leaf = *leaves
        .iter()
        .find(|b| nodes[b].contains(&(1, 50_000)))
        .unwrap();
    let held = nodes[&shared_leaf].clone();
    let devs: BTreeSet<u32> = held.iter().map(|(d, _)| *d).collect();
    assert_eq!(
        devs,
        [1, 2, 3].into(),
        "the leaf is shared by the snapshots"
    );
    let r = case.run("bottom-leaf", false, |meta, orig| {
        corrupt(meta, shared_leaf);
        without(orig, &held)
    });
    let unreadable: Vec<_> = r
        .losses
        .iter()
        .filter(|l| l.kind == LossKind::Unreadable)
        .collect();
    assert_eq!(unreadable.len(), 3, "{}", r.to_text());
    assert!(
        unreadable
            .iter()
            .all(|l| l.block == Some(shared_leaf) && l.message.contains("virtual blocks")),
        "{}",
        r.to_text()
    );
    assert_eq!(
        r.devices
            .iter()
            .find(|d| d.dev_id == 3)
            .unwrap()
            .shares_tree_with,
        Some(2),
        "snap2 shares snap1's tree again"
    );

    // An internal node below the root (its whole subtree), shared by the three as well.
    let inner = *internal
        .iter()
        .skip(1)
        .find(|b| nodes[b].contains(&(1, 50_000)))
        .expect("a non-root internal node");
    let held = nodes[&inner].clone();
    assert!(held.len() > 10_000, "an internal node holds many leaves");
    case.run("internal-node", false, |meta, orig| {
        corrupt(meta, inner);
        without(orig, &held)
    });

    // The device details leaf: every mapping stays, the details are rebuilt.
    let (_, details_root, ..) = superblock_roots(&base_meta);
    let r = case.run("details-leaf", false, |meta, orig| {
        corrupt(meta, details_root);
        let mut x = orig.clone();
        for d in &mut x.devices {
            d.transaction = sb_txid;
            d.creation_time = sb_time;
            d.snap_time = sb_time;
        }
        x
    });
    assert_eq!(
        r.losses
            .iter()
            .filter(|l| l.kind == LossKind::DetailsRebuilt)
            .count(),
        5
    );

    // The mapping tree's top level. Every device's tree is intact, only the node pointing at
    // them is lost; older copies of that node (blocks freed by earlier commits, not reused yet)
    // record each device's current tree, recognisable by its details' mapped count and its
    // latest time: all recovered, reported as such (the deleted device 6, also in those
    // copies, stays deleted: the details tree no longer lists it).
    let (top_root, ..) = superblock_roots(&base_meta);
    let r = case.run("top-level-leaf", false, |meta, orig| {
        corrupt(meta, top_root);
        orig.clone()
    });
    let older: Vec<_> = r
        .losses
        .iter()
        .filter(|l| l.kind == LossKind::OlderCopy)
        .map(|l| l.dev_id.unwrap())
        .collect();
    assert_eq!(older, [1, 2, 3, 4, 5], "{}", r.to_text());

    // The same, but without older copies to fall back on: every device is kept, empty.
    let all = nodes[&top_root].clone();
    let r = case.run("top-level-no-copies", false, |meta, orig| {
        for b in 1..(8 << 20) / 4096 {
            if b == top_root || top_or_details_shaped(&read_block(meta, b)).0 {
                corrupt(meta, b);
            }
        }
        without(orig, &all)
    });
    assert_eq!(
        r.losses
            .iter()
            .filter(|l| l.kind == LossKind::MappingsLost)
            .count(),
        5,
        "{}",
        r.to_text()
    );

    // Both trees' roots: nothing current says which devices exist. The newest consistent pair
    // of trees on the disk is the one from just before device 6 was deleted: devices 1-5 come
    // back whole, and device 6 with them, flagged (volumes.json has no name for it).
    let deleted = built.deleted.clone();
    let r = case.run("both-roots", false, |meta, orig| {
        corrupt(meta, top_root);
        corrupt(meta, details_root);
        let mut x = orig.clone();
        x.devices.push(deleted);
        x
    });
    let flagged: Vec<_> = r
        .losses
        .iter()
        .filter(|l| l.kind == LossKind::Other)
        .map(|l| l.dev_id)
        .collect();
    assert_eq!(flagged, [Some(6)], "{}", r.to_text());
    assert_eq!(r.unnamed, [6]);

    // Both roots and every older copy of them: no device survives, their names go.
    let r = case.run("both-roots-no-copies", false, |meta, orig| {
        for b in 1..(8 << 20) / 4096 {
            let (top, details) = top_or_details_shaped(&read_block(meta, b));
            if b == top_root || b == details_root || top || details {
                corrupt(meta, b);
            }
        }
        XmlSuperblock {
            devices: Vec::new(),
            ..orig.clone()
        }
    });
    let removed: Vec<_> = r
        .losses
        .iter()
        .filter(|l| l.kind == LossKind::NameRemoved)
        .map(|l| l.dev_id.unwrap())
        .collect();
    assert_eq!(removed, vec![1, 4, 5, 2, 3], "{}", r.to_text());

    // Values a checksum cannot catch: a mapping outside the data device and a data block
    // mapped twice in one device (in a leaf shared by other and other-snap).
    let (other_leaves, _) = device_nodes(&base_meta, 4);
    let leaf = *other_leaves.last().unwrap();
    let n = parse_node(&read_block(&base_meta, leaf));
    assert!(n.leaf && n.keys.len() > 10);
    let owners: BTreeSet<u32> = nodes[&leaf].iter().map(|(d, _)| *d).collect();
    assert_eq!(owners, [4, 5].into());
    let (i, j, k) = (2, 7, 3); // entry i: outside; entry j duplicates entry k's block (j > k)
    let lost: BTreeSet<(u32, u64)> = owners
        .iter()
        .flat_map(|d| [(*d, n.keys[i]), (*d, n.keys[j])])
        .collect();
    let r = case.run("bad-values", false, |meta, orig| {
        rewrite_sealed(meta, leaf, 121_107, |b| {
            let max = u32::from_le_bytes(b[20..24].try_into().unwrap()) as usize;
            let at = |e: usize| 32 + 8 * max + 8 * e;
            let outside = (NR_DATA_BLOCKS + 7) << 24;
            b[at(i)..at(i) + 8].copy_from_slice(&outside.to_le_bytes());
            let dup: [u8; 8] = b[at(k)..at(k) + 8].try_into().unwrap();
            b[at(j)..at(j) + 8].copy_from_slice(&dup);
        });
        without(orig, &lost)
    });
    let kinds: Vec<LossKind> = r.losses.iter().map(|l| l.kind).collect();
    assert_eq!(
        kinds,
        [
            LossKind::OutsideDataDevice,
            LossKind::Duplicate,
            LossKind::OutsideDataDevice,
            LossKind::Duplicate
        ],
        "{}",
        r.to_text()
    );

    // The superblock: the trees are found by scanning. Stale pairs of trees are on the disk
    // too (the one from just before device 6 was deleted has a higher transaction id in its
    // details than the current one); the pair whose devices volumes.json names wins.
    let (_, _, _, txid) = superblock_roots(&base_meta);
    case.thin_repair_args = [
        "--transaction-id".to_string(),
        txid.to_string(),
        "--data-block-size".into(),
        (BLOCK_SIZE / 512).to_string(),
        "--nr-data-blocks".into(),
        NR_DATA_BLOCKS.to_string(),
    ]
    .into();
    let r = case.run_with(
        "superblock",
        false,
        &RepairOptions {
            data_block_size: Some(BLOCK_SIZE),
            ..RepairOptions::default()
        },
        |meta, orig| {
            corrupt(meta, 0);
            orig.clone()
        },
    );
    assert_eq!(r.losses.len(), 1, "{}", r.to_text());
    assert_eq!(r.losses[0].block, Some(0));

    for c in &case.comparisons {
        eprintln!("{c}");
    }
}

#[test]
fn damaged_space_maps_lose_nothing_and_an_intact_pool_is_unchanged() {
    let work = tempfile::tempdir().unwrap();
    let (built, original) = setup(work.path());
    let mut case = Case {
        built: &built,
        thin_repair_args: Vec::new(),
        work: work.path(),
        original: original.clone(),
        comparisons: Vec::new(),
    };
    let base_meta = built.dir.join("metadata");
    let sb = read_block(&base_meta, 0);
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    // Metadata space map: root at 192 (bitmap_root = its index block at +16).
    let meta_index = le64(&sb, 192 + 16);
    let meta_bitmap = le64(&read_block(&base_meta, meta_index), 16);
    // Data space map: root at 64 (bitmap_root = the root of its index tree).
    let data_root = le64(&sb, 64 + 16);
    let root_node = read_block(&base_meta, data_root);
    assert_eq!(
        u32::from_le_bytes(root_node[4..8].try_into().unwrap()),
        2,
        "a leaf"
    );
    let max = u32::from_le_bytes(root_node[20..24].try_into().unwrap()) as usize;
    let data_bitmap = le64(&root_node, 32 + 8 * max);

    for (name, block) in [
        ("metadata-bitmap", meta_bitmap),
        ("metadata-sm-index", meta_index),
        ("data-sm-root", data_root),
        ("data-bitmap", data_bitmap),
    ] {
        let r = case.run(name, true, |meta, orig| {
            corrupt(meta, block);
            orig.clone()
        });
        assert!(r.losses.is_empty(), "{name}: {}", r.to_text());
    }

    // No damage: the same devices and mappings, byte for byte in thin_dump's text.
    let dir = work.path().join("intact");
    copy_pool(&built.dir, &dir);
    let before = std::process::Command::new("thin_dump")
        .arg(dir.join("metadata"))
        .output()
        .unwrap()
        .stdout;
    let r = repair_pool(&dir, &RepairOptions::default()).unwrap();
    assert!(r.is_clean() && r.notes.is_empty(), "{}", r.to_text());
    let after = std::process::Command::new("thin_dump")
        .arg(dir.join("metadata"))
        .output()
        .unwrap()
        .stdout;
    assert_eq!(
        String::from_utf8_lossy(&before),
        String::from_utf8_lossy(&after)
    );
    assert!(check_pool(&dir, false).unwrap().is_clean());
    thin_check(&dir.join("metadata")).unwrap();
    reads_right(&dir, &built, &original);
    // Names and sizes are untouched.
    assert_eq!(
        std::fs::read_to_string(dir.join("volumes.json")).unwrap(),
        std::fs::read_to_string(built.dir.join("volumes.json")).unwrap()
    );

    for c in &case.comparisons {
        eprintln!("{c}");
    }
}
