//! Corruption tests: flip bytes in every block of a committed metadata file (used or free, at
//! the checksum, the block number, the header fields and random places), then open it, read
//! everything, recount, and change and commit it. Each run must either return correct data or
//! stop at an error that names the damaged block — never panic, never return wrong data.

mod common;
use common::*;
use std::collections::BTreeMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use uthin_btree::check::count_btree;
use uthin_btree::*;

type Leaf = DataRef<24>;
type Top = SubtreeRef<Leaf>;
type Details = BytesValue<24>;
type Model = BTreeMap<u64, BTreeMap<u64, u64>>;

const META_BLOCKS: u64 = 400;

fn build() -> (MemIo, Model) {
    let io = Arc::new(MemIo::new(META_BLOCKS));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    tm.create_data_sm(50_000).unwrap();
    let mut top = BTree::<Top>::create(&mut tm).unwrap();
    let mut det = BTree::<Details>::create(&mut tm).unwrap();
    let mut model = Model::new();
    for dev in 1..=2u64 {
        let mut t = BTree::<Leaf>::create(&mut tm).unwrap();
        let mut m = BTreeMap::new();
        for i in 0..2500u64 {
            let vb = i * (dev + 1);
            let b = tm.data_alloc().unwrap();
            t.insert(&mut tm, vb, &(b.0 << 24 | dev)).unwrap();
            m.insert(vb, b.0 << 24 | dev);
        }
        top.insert(&mut tm, dev, &t.root()).unwrap();
        det.insert(&mut tm, dev, &[dev as u8; 24]).unwrap();
        model.insert(dev, m);
    }
    // A snapshot so some nodes and data blocks are shared (counts of 2, and 3+ in the trees).
    for snap in 3..=5u64 {
        let r = top.lookup(&tm, 1).unwrap().unwrap();
        tm.inc(r).unwrap();
        top.insert(&mut tm, snap, &r).unwrap();
        det.insert(&mut tm, snap, &[snap as u8; 24]).unwrap();
        model.insert(snap, model[&1].clone());
    }
    let sb = TestSuper {
        trans_id: 7,
        mapping_root: top.root().0,
        details_root: det.root().0,
        data_block_sectors: 128,
        metadata_nr_blocks: META_BLOCKS,
        ..Default::default()
    };
    commit(&mut tm, &sb).unwrap();
    (io.snapshot(), model)
}

/// Everything a user of the metadata can do; wrong data is a panic (a test failure).
fn exercise(img: MemIo, model: &Model) -> Result<()> {
    let io: Arc<dyn BlockIo> = Arc::new(img);
    let (mut tm, sb) = open(io, 64, 0)?;
    assert_eq!(
        sb.trans_id, 7,
        "superblock accepted with a wrong transaction id"
    );
    let mut top = BTree::<Top>::open(MetaBlock(sb.mapping_root));
    let det = BTree::<Details>::open(MetaBlock(sb.details_root));
    let devs: Vec<u64> = top
        .iter(&tm, ..)
        .map(|r| r.map(|x| x.0))
        .collect::<Result<_>>()?;
    assert_eq!(
        devs,
        model.keys().copied().collect::<Vec<_>>(),
        "wrong device list"
    );
    for (dev, m) in model {
        let root = top.lookup(&tm, *dev)?.expect("device present");
        let t = BTree::<Leaf>::open(root);
        let got: Vec<(u64, u64)> = t.iter(&tm, ..).collect::<Result<_>>()?;
        assert!(
            got == m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>(),
            "wrong mappings of device {dev}"
        );
        for (k, v) in m.iter().step_by(53) {
            assert_eq!(t.lookup(&tm, *k)?, Some(*v), "wrong lookup");
            assert_eq!(
                t.lookup_le(&tm, *k)?.map(|x| x.1),
                Some(*v),
                "wrong lookup_le"
            );
            assert!(
                tm.data_count(Leaf::block(*v))? >= 1,
                "mapped block counted free"
            );
        }
        assert_eq!(
            det.lookup(&tm, *dev)?,
            Some([*dev as u8; 24]),
            "wrong details"
        );
    }
    let problems = recount(&tm, |tm, c| {
        count_btree::<Top>(tm, top.root(), c)?;
        count_btree::<Details>(tm, det.root(), c)
    });
    // A recount that could not read a block reports the error; anything else is wrong data.
    if let Some(p) = problems.iter().find(|p| !p.contains("metadata block")) {
        panic!("recount found wrong counts: {p}");
    }
    if let Some(p) = problems.first() {
        return Err(Error::InvalidArgument(p.clone()));
    }
    // And change it.
    let b = tm.data_alloc()?;
    top.update_value(&mut tm, 2, |tm, root| {
        let mut t = BTree::<Leaf>::open(*root);
        t.insert(tm, 1, &(b.0 << 24))?;
        t.remove_range(tm, 100..400, |_, _| {})?;
        *root = t.root();
        Ok(())
    })?;
    top.remove(&mut tm, 4)?;
    let sb2 = TestSuper {
        trans_id: 8,
        mapping_root: top.root().0,
        details_root: det.root().0,
        ..Default::default()
    };
    commit(&mut tm, &sb2)?;
    Ok(())
}

#[test]
fn flipped_bytes_in_every_block_are_reported_never_trusted() {
    let (base, model) = build();
    exercise(base.snapshot(), &model).expect("the undamaged image works");
    let mut cases = 0;
    let mut detected = 0;
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for b in 0..META_BLOCKS {
        // Every header field of a used block, and random places; free blocks get two flips.
        let used = !base.is_unwritten(MetaBlock(b));
        let mut offsets = if used {
            vec![0usize, 5, 9, 17, 21, 25]
        } else {
            vec![0usize]
        };
        for _ in 0..if used { 4 } else { 1 } {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            offsets.push((seed % BLOCK_SIZE as u64) as usize);
        }
        for off in offsets {
            let img = base.snapshot();
            let was_used = used;
            img.modify_block(MetaBlock(b), |d| d[off] ^= 0x5a).unwrap();
            let r = catch_unwind(AssertUnwindSafe(|| exercise(img, &model)));
            match r {
                Err(_) => panic!("block {b} byte {off}: panic (see above)"),
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    detected += 1;
                    assert!(was_used, "block {b} was never written, yet: {e}");
                    let text = e.to_string();
                    assert!(
                        e.block() == Some(MetaBlock(b))
                            || text.contains(&format!("metadata block {b}")),
                        "block {b} byte {off}: the error does not name the damaged block: {e}"
                    );
                }
            }
            cases += 1;
        }
    }
    println!("corruption cases: {cases}, errors reported: {detected}");
    assert!(detected > 100, "only {detected} damaged blocks noticed");
}

/// Damage that a checksum cannot catch: a buggy writer sealed nonsense (header fields, keys,
/// values, bitmap words out of line with the index). Data may then be wrong, but nothing may
/// panic or loop: every call returns.
#[test]
fn sealed_nonsense_never_panics() {
    use uthin_btree::checksum::{BITMAP_VALIDATOR, BTREE_NODE_VALIDATOR, INDEX_VALIDATOR};
    let (base, model) = build();
    let validators: [&'static dyn Validator; 4] = [
        &SB_VALIDATOR,
        &BTREE_NODE_VALIDATOR,
        &BITMAP_VALIDATOR,
        &INDEX_VALIDATOR,
    ];
    let mut seed = 0x853c_49e6_748f_ea9bu64;
    let mut rnd = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut cases = 0;
    for b in 0..META_BLOCKS {
        if base.is_unwritten(MetaBlock(b)) {
            continue;
        }
        let mut raw = [0u8; BLOCK_SIZE];
        base.read(MetaBlock(b), &mut raw).unwrap();
        let Some(v) = validators
            .iter()
            .find(|v| v.check(MetaBlock(b), &raw).is_ok())
        else {
            panic!("block {b} matches no validator");
        };
        // Header fields (flags, nr_entries, max_entries, value_size; the superblock's roots),
        // the first keys and values, and random words.
        let mut offsets: Vec<usize> =
            vec![4, 16, 20, 24, 48, 64, 80, 192, 208, 320, 328, 32, 40, 2048];
        for _ in 0..4 {
            offsets.push(16 + (rnd() as usize % (BLOCK_SIZE - 24)));
        }
        for off in offsets {
            for pattern in [0u64, u64::MAX, 0x8000_0000, rnd()] {
                let img = base.snapshot();
                img.modify_block(MetaBlock(b), |d| {
                    d[off..off + 8].copy_from_slice(&pattern.to_le_bytes());
                    v.seal(MetaBlock(b), d);
                })
                .unwrap();
                let r = catch_unwind(AssertUnwindSafe(|| {
                    // Wrong data is possible here; panics from the library are not.
                    exercise_tolerant(img, &model)
                }));
                assert!(
                    r.is_ok(),
                    "block {b} ({:?}) offset {off} pattern {pattern:#x}: panic",
                    v.kind()
                );
                cases += 1;
            }
        }
    }
    println!("sealed-nonsense cases: {cases}");
}

/// Like `exercise`, without asserting the data (it may be legitimately wrong): just runs every
/// operation and ignores the results.
fn exercise_tolerant(img: MemIo, model: &Model) {
    let io: Arc<dyn BlockIo> = Arc::new(img);
    let Ok((mut tm, sb)) = open(io, 64, 0) else {
        return;
    };
    let mut top = BTree::<Top>::open(MetaBlock(sb.mapping_root));
    let det = BTree::<Details>::open(MetaBlock(sb.details_root));
    let _ = top.iter(&tm, ..).take(100).count();
    for dev in model.keys() {
        if let Ok(Some(root)) = top.lookup(&tm, *dev) {
            let t = BTree::<Leaf>::open(root);
            let _ = t.iter(&tm, ..).take(20_000).count();
            let _ = t.count(&tm);
            for k in (0..8000).step_by(397) {
                let _ = t.lookup_shared(&tm, k);
                let _ = t.lookup_le(&tm, k);
                let _ = t.lookup_ge(&tm, k);
            }
        }
        let _ = det.lookup(&tm, *dev);
    }
    let _ = recount(&tm, |tm, c| {
        count_btree::<Top>(tm, top.root(), c)?;
        count_btree::<Details>(tm, det.root(), c)
    });
    for _ in 0..50 {
        let Ok(b) = tm.data_alloc() else { break };
        let _ = tm.data_count(b);
    }
    let _ = top.update_value(&mut tm, 2, |tm, root| {
        let mut t = BTree::<Leaf>::open(*root);
        t.insert(tm, 1, &(1 << 24))?;
        t.remove_range(tm, 100..400, |_, _| {})?;
        *root = t.root();
        Ok(())
    });
    let _ = top.remove(&mut tm, 4);
    let _ = top.remove(&mut tm, 5);
    let sb2 = TestSuper {
        trans_id: 8,
        mapping_root: top.root().0,
        details_root: det.root().0,
        ..Default::default()
    };
    let _ = commit(&mut tm, &sb2);
}
