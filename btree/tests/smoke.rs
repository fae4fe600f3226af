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

#[test]
fn transaction_manager_is_shareable_between_reader_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<TransactionManager>();
    assert_send_sync::<FaultyIo>();
    let io = Arc::new(MemIo::new(4000));
    let mut tm = TransactionManager::format(io, &TmConfig { cache_blocks: 64 }).unwrap();
    let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
    for k in 0..60_000u64 {
        t.insert(&mut tm, k * 2, &k).unwrap();
    }
    // A small cache: the readers evict each other's blocks while they look up.
    std::thread::scope(|s| {
        for th in 0..4u64 {
            let (tm, t) = (&tm, &t);
            s.spawn(move || {
                for i in 0..20_000u64 {
                    let k = (i * 7919 + th * 104_729) % 60_000;
                    assert_eq!(t.lookup(tm, k * 2).unwrap(), Some(k));
                    assert_eq!(t.lookup(tm, k * 2 + 1).unwrap(), None);
                    assert_eq!(t.lookup_shared(tm, k * 2).unwrap(), Some((k, false)));
                }
                assert_eq!(t.iter(tm, 1000..1010).count(), 5);
            });
        }
    });
}

#[test]
fn freed_blocks_are_not_reused_before_the_commit() {
    let io = Arc::new(MemIo::new(300));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    tm.create_data_sm(100).unwrap();
    let mut t = BTree::<DataRef<0>>::create(&mut tm).unwrap();
    for k in 0..100u64 {
        let b = tm.data_alloc().unwrap();
        t.insert(&mut tm, k, &b.0).unwrap();
    }
    assert!(matches!(
        tm.data_alloc(),
        Err(Error::DataSpaceExhausted { nr_blocks: 100 })
    ));
    assert!(
        tm.poisoned().is_none(),
        "running out of data space changes nothing"
    );
    commit(
        &mut tm,
        &TestSuper {
            roots: vec![t.root().0],
            ..Default::default()
        },
    )
    .unwrap();
    // Free ten data blocks and a metadata node: none of them comes back in this transaction.
    let mut freed = Vec::new();
    t.remove_range(&mut tm, 40..50, |_, v| freed.push(*v))
        .unwrap();
    assert_eq!(tm.data_nr_free().unwrap(), 10);
    assert!(matches!(
        tm.data_alloc(),
        Err(Error::DataSpaceExhausted { .. })
    ));
    assert_eq!(tm.data_find_free().unwrap(), None);
    assert_eq!(tm.data_find_free_from(DiskBlock(0)).unwrap(), None);
    let before = tm.nr_free();
    let committed_root = t.root();
    let mut metas = Vec::new();
    while let Ok(b) = tm.new_block(&uthin_btree::checksum::BITMAP_VALIDATOR) {
        metas.push(b.nr());
        if metas.len() as u64 > before {
            break;
        }
    }
    assert!(
        tm.poisoned().is_some(),
        "running out of metadata space poisons"
    );
    // Every block handed out was free at the last commit: none of the committed tree's nodes.
    let mut c = RefCounter::new();
    uthin_btree::check::count_btree::<DataRef<0>>(&tm, committed_root, &mut c).unwrap();
    assert!(metas.iter().all(|b| c.meta(*b) == 0));

    // A fresh transaction manager on the last commit: commit the removal, then they return.
    let (mut tm, s) = open(io.clone(), 64, 1).unwrap();
    let mut t = BTree::<DataRef<0>>::open(MetaBlock(s.roots[0]));
    t.remove_range(&mut tm, 40..50, |_, _| {}).unwrap();
    let info = commit(
        &mut tm,
        &TestSuper {
            roots: vec![t.root().0],
            ..Default::default()
        },
    )
    .unwrap();
    let punched: Vec<u64> = info
        .freed_data
        .iter()
        .flat_map(|e| e.start.0..e.start.0 + e.len)
        .collect();
    let mut want = freed.clone();
    want.sort();
    assert_eq!(punched, want);
    let mut again: Vec<u64> = (0..10).map(|_| tm.data_alloc().unwrap().0).collect();
    again.sort();
    assert_eq!(again, want);
}

#[test]
fn metadata_and_data_space_maps_grow() {
    let io = Arc::new(MemIo::new(64));
    let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
    tm.create_data_sm(10).unwrap();
    let mut t = BTree::<DataRef<0>>::create(&mut tm).unwrap();
    let mut k = 0u64;
    let fill = |tm: &mut TransactionManager, t: &mut BTree<DataRef<0>>, k: &mut u64| loop {
        match tm.data_alloc() {
            Ok(b) => {
                t.insert(tm, *k, &b.0).unwrap();
                *k += 1;
            }
            Err(Error::DataSpaceExhausted { .. }) => break,
            Err(e) => panic!("{e}"),
        }
    };
    fill(&mut tm, &mut t, &mut k);
    assert_eq!(k, 10);
    // Grow data across several bitmaps, and metadata past its first bitmap (16320 blocks).
    tm.data_extend(40_000).unwrap();
    tm.extend(20_000).unwrap();
    assert_eq!(io.nr_blocks(), 20_000);
    fill(&mut tm, &mut t, &mut k);
    assert_eq!(k, 40_000);
    let s = TestSuper {
        roots: vec![t.root().0],
        ..Default::default()
    };
    commit(&mut tm, &s).unwrap();
    let problems = recount(&tm, |tm, c| {
        uthin_btree::check::count_btree::<DataRef<0>>(tm, t.root(), c)
    });
    assert!(problems.is_empty(), "{problems:?}");
    drop(tm);
    let (tm, s) = open(io, 256, 1).unwrap();
    assert_eq!(tm.nr_blocks(), 20_000);
    assert_eq!(tm.data_nr_blocks().unwrap(), 40_000);
    assert_eq!(tm.data_nr_free().unwrap(), 0);
    let t = BTree::<DataRef<0>>::open(MetaBlock(s.roots[0]));
    assert_eq!(t.count(&tm).unwrap(), 40_000);
    let problems = recount(&tm, |tm, c| {
        uthin_btree::check::count_btree::<DataRef<0>>(tm, t.root(), c)
    });
    assert!(problems.is_empty(), "{problems:?}");
}
