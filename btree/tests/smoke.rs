mod common;
use common::*;
use std::sync::Arc;
use uthin_btree::*;

#[test]
fn insert_commit_reopen_sequential_and_random() {
    let io = Arc::new(MemIo::new(20_000));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
    for k in 0..100_000u64 {
        assert_eq!(t.insert(&mut tm, k, &(k * 3)).unwrap(), None);
    }
    let problems = recount(&tm, |tm, c| {
        uthin_btree::check::count_btree::<U64Value>(tm, t.root(), c)
    });
    assert!(problems.is_empty(), "{problems:?}");
    let s = TestSuper {
        roots: vec![t.root().0],
        ..Default::default()
    };
    commit(&mut tm, &s).unwrap();
    let problems = recount(&tm, |tm, c| {
        uthin_btree::check::count_btree::<U64Value>(tm, t.root(), c)
    });
    assert!(problems.is_empty(), "{problems:?}");
    let used = tm.nr_blocks() - tm.nr_free();
    eprintln!(
        "sequential: {used} blocks, {} B/entry",
        used as f64 * 4096.0 / 100_000.0
    );
    drop(tm);
    let (tm, s) = open(io.clone(), 1024, 1).unwrap();
    let t = BTree::<U64Value>::open(MetaBlock(s.roots[0]));
    for k in (0..100_000u64).step_by(7) {
        assert_eq!(t.lookup(&tm, k).unwrap(), Some(k * 3));
    }
    assert_eq!(t.count(&tm).unwrap(), 100_000);
    let v: Vec<u64> = t.iter(&tm, 10..20).map(|r| r.unwrap().0).collect();
    assert_eq!(v, (10..20).collect::<Vec<_>>());
    assert_eq!(
        t.lookup_le(&tm, 500_000).unwrap(),
        Some((99_999, 99_999 * 3))
    );
    assert_eq!(t.lookup_ge(&tm, 500).unwrap(), Some((500, 1500)));
    let problems = recount(&tm, |tm, c| {
        uthin_btree::check::count_btree::<U64Value>(tm, t.root(), c)
    });
    assert!(problems.is_empty(), "{problems:?}");
}

#[test]
fn random_insert_remove_clone() {
    use std::collections::BTreeMap;
    let io = Arc::new(MemIo::new(20_000));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
    let mut model = BTreeMap::new();
    let mut x = 12345u64;
    for i in 0..50_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = x % 100_000;
        t.insert(&mut tm, k, &i).unwrap();
        model.insert(k, i);
    }
    let c = t.clone_tree(&mut tm).unwrap();
    let cmodel = model.clone();
    for i in 0..30_000u64 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let k = x % 100_000;
        assert_eq!(
            t.remove(&mut tm, k).unwrap(),
            model.remove(&k),
            "remove {k} at {i}"
        );
    }
    let n = t.remove_range(&mut tm, 20_000..60_000, |_, _| {}).unwrap();
    let before = model.len();
    model.retain(|k, _| !(20_000..60_000).contains(k));
    assert_eq!(n as usize, before - model.len());
    let got: Vec<(u64, u64)> = t.iter(&tm, ..).map(|r| r.unwrap()).collect();
    assert_eq!(got, model.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>());
    let got: Vec<(u64, u64)> = c.iter(&tm, ..).map(|r| r.unwrap()).collect();
    assert_eq!(
        got,
        cmodel.iter().map(|(a, b)| (*a, *b)).collect::<Vec<_>>()
    );
    let problems = recount(&tm, |tm, cc| {
        uthin_btree::check::count_btree::<U64Value>(tm, t.root(), cc)?;
        uthin_btree::check::count_btree::<U64Value>(tm, c.root(), cc)
    });
    assert!(problems.is_empty(), "{problems:?}");
    c.delete(&mut tm).unwrap();
    let problems = recount(&tm, |tm, cc| {
        uthin_btree::check::count_btree::<U64Value>(tm, t.root(), cc)
    });
    assert!(problems.is_empty(), "{problems:?}");
    commit(
        &mut tm,
        &TestSuper {
            roots: vec![t.root().0],
            ..Default::default()
        },
    )
    .unwrap();
    let problems = recount(&tm, |tm, cc| {
        uthin_btree::check::count_btree::<U64Value>(tm, t.root(), cc)
    });
    assert!(problems.is_empty(), "{problems:?}");
}
