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
