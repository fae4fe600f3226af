//! Model test of the pool: random create / snapshot / delete / write (provision or break
//! sharing) / discard / commit / reopen / crash against a simple model, with blocks given back
//! zeroed and taken again through the lock-free `Reserver` (which must only ever hand out a
//! block that nobody holds, now or in the last commit). After every step every
//! mapping matches the model, `shared` is exact, no volume sees another's blocks, and the
//! pool's own check is clean; regularly also `thin_check` and a `thin_dump` comparison.

mod pool_common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use proptest::prelude::*;
use uthin::pool::{CreateOptions, Pool};
use uthin::units::{DataBlock, DevId, VirtBlock};

const NAMES: usize = 6;
const VBLOCKS: u64 = 300;

#[derive(Debug, Clone)]
enum Op {
    Create(usize),
    Snapshot(usize, usize),
    Delete(usize),
    Write(usize, u64, u64),
    Discard(usize, u64, u64),
    Commit,
    Reopen,
    Crash,
    Rename(usize, usize),
    /// Reserve this data block if usable and give it back zeroed (`Pool::release_zeroed`).
    GiveBackZeroed(u64),
    /// Map this virtual block of this volume, if unmapped, to this data block if the
    /// `Reserver` hands it out (only blocks given back zeroed and not reserved since).
    MapZeroed(usize, u64, u64),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => (0..NAMES).prop_map(Op::Create),
        2 => (0..NAMES, 0..NAMES).prop_map(|(a, b)| Op::Snapshot(a, b)),
        1 => (0..NAMES).prop_map(Op::Delete),
        8 => (0..NAMES, 0..VBLOCKS, 1..40u64).prop_map(|(v, b, n)| Op::Write(v, b, n)),
        2 => (0..NAMES, 0..VBLOCKS, 1..80u64).prop_map(|(v, b, n)| Op::Discard(v, b, n)),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
        1 => Just(Op::Crash),
        1 => (0..NAMES, 0..NAMES).prop_map(|(a, b)| Op::Rename(a, b)),
        // Low data blocks: where writes and discards take and free blocks.
        3 => (0..120u64).prop_map(Op::GiveBackZeroed),
        3 => (0..NAMES, 0..VBLOCKS, 0..120u64).prop_map(|(v, vb, b)| Op::MapZeroed(v, vb, b)),
    ]
}

fn name(i: usize) -> String {
    format!("vol{i}")
}

/// The model: name → (dev id, virtual block → data block).
#[derive(Debug, Clone, Default, PartialEq)]
struct Model {
    vols: BTreeMap<String, (u32, BTreeMap<u64, u64>)>,
}

impl Model {
    fn owners(&self) -> BTreeMap<u64, usize> {
        let mut n = BTreeMap::new();
        for (_, m) in self.vols.values() {
            for b in m.values() {
                *n.entry(*b).or_default() += 1;
            }
        }
        n
    }
}

fn verify(pool: &Pool, model: &Model) {
    let owners = model.owners();
    let mut named = BTreeSet::new();
    for (name, (dev, map)) in &model.vols {
        let info = pool.volume(name).expect("model volume exists");
        assert_eq!(info.dev_id, DevId(*dev), "{name}");
        assert_eq!(info.mapped_blocks, map.len() as u64, "{name} mapped blocks");
        named.insert(*dev);
        let mappings = pool.mappings(DevId(*dev)).unwrap();
        let got: BTreeMap<u64, u64> = mappings.iter().map(|(v, bt)| (v.0, bt.block.0)).collect();
        assert_eq!(&got, map, "{name} mappings");
        for (vb, b) in map {
            let m = pool
                .lookup(DevId(*dev), VirtBlock(*vb))
                .unwrap()
                .expect("mapped");
            assert_eq!(m.block, DataBlock(*b));
            assert_eq!(
                m.shared,
                owners[b] > 1,
                "{name} block {vb}: shared must be exact"
            );
        }
    }
    // Devices: exactly the model's (no leaks of whole devices).
    let devs: BTreeSet<u32> = pool.list().unwrap().iter().map(|v| v.dev_id.0).collect();
    assert_eq!(devs, named);
    // Data space accounting: every referenced block counted once per distinct leaf holder is
    // checked by `check`; here: used blocks = distinct blocks in the model.
    let st = pool.status().unwrap();
    assert_eq!(
        st.data_used_blocks,
        owners.len() as u64,
        "data blocks in use"
    );
    let report = uthin::tools::check::check_live(pool).unwrap();
    assert!(report.is_clean(), "check:\n{}", report.to_text());
}

fn thin_tools_agree(dir: &Path, model: &Model) {
    let meta = dir.join("metadata");
    pool_common::thin_check(&meta).unwrap();
    let dump = pool_common::thin_dump(&meta);
    let got = pool_common::dump_mappings(&dump);
    let want: BTreeMap<u32, BTreeMap<u64, u64>> =
        model.vols.values().map(|(d, m)| (*d, m.clone())).collect();
    assert_eq!(got, want, "thin_dump disagrees with the model");
}

fn run(ops: Vec<Op>) {
    let dir = tempfile::tempdir().unwrap();
    let opts = CreateOptions {
        data_size: 2000 * 65536,
        block_size: 65536,
        metadata_size: Some(4 << 20),
        force: false,
    };
    let mut pool = Pool::create(dir.path(), &opts).unwrap();
    let mut model = Model::default();
    let mut committed = model.clone();
    let size = VBLOCKS * 65536;
    for (step, op) in ops.into_iter().enumerate() {
        match op {
            Op::Create(i) => {
                let r = pool.create_volume(&name(i), size);
                if let std::collections::btree_map::Entry::Vacant(e) = model.vols.entry(name(i)) {
                    let v = r.unwrap();
                    e.insert((v.dev_id.0, BTreeMap::new()));
                    committed = model.clone();
                } else {
                    assert!(r.is_err());
                }
            }
            Op::Snapshot(a, b) => {
                let r = pool.snapshot(&name(a), &name(b), false);
                match model.vols.get(&name(a)) {
                    Some((_, map)) if !model.vols.contains_key(&name(b)) => {
                        let map = map.clone();
                        let v = r.unwrap();
                        model.vols.insert(name(b), (v.dev_id.0, map));
                        committed = model.clone();
                    }
                    _ => assert!(r.is_err()),
                }
            }
            Op::Delete(i) => {
                let r = pool.delete_volume(&name(i));
                if model.vols.remove(&name(i)).is_some() {
                    let c = r.unwrap();
                    pool.release_freed(&c.freed);
                    committed = model.clone();
                } else {
                    assert!(r.is_err());
                }
            }
            Op::Rename(a, b) => {
                let r = pool.rename(&name(a), &name(b));
                if model.vols.contains_key(&name(a)) && !model.vols.contains_key(&name(b)) {
                    r.unwrap();
                    let v = model.vols.remove(&name(a)).unwrap();
                    model.vols.insert(name(b), v.clone());
                    // Rename is durable at once; the committed model follows the name too.
                    if let Some(cv) = committed.vols.remove(&name(a)) {
                        committed.vols.insert(name(b), cv);
                    }
                } else {
                    assert!(r.is_err());
                }
            }
            Op::Write(i, begin, n) => {
                let Some((dev, _)) = model.vols.get(&name(i)).cloned() else {
                    continue;
                };
                for vb in begin..(begin + n).min(VBLOCKS) {
                    let before = model.owners();
                    let m = pool.lookup(DevId(dev), VirtBlock(vb)).unwrap();
                    let new = match m {
                        None => Some(pool.provision(DevId(dev), VirtBlock(vb))),
                        Some(m) if m.shared => Some(
                            pool.break_sharing(DevId(dev), VirtBlock(vb))
                                .map(|(_, n)| n),
                        ),
                        Some(_) => None, // written in place: no metadata change
                    };
                    if let Some(r) = new {
                        match r {
                            Ok(b) => {
                                assert!(
                                    !before.contains_key(&b.0),
                                    "step {step}: new block {b} is already someone's"
                                );
                                model.vols.get_mut(&name(i)).unwrap().1.insert(vb, b.0);
                            }
                            Err(e) => {
                                assert_eq!(e.errno(), libc::ENOSPC, "{e}");
                                break;
                            }
                        }
                    }
                }
            }
            Op::Discard(i, begin, n) => {
                let Some((dev, _)) = model.vols.get(&name(i)).cloned() else {
                    continue;
                };
                let end = (begin + n).min(VBLOCKS);
                let d = pool
                    .discard(DevId(dev), VirtBlock(begin), VirtBlock(end))
                    .unwrap();
                let map = &mut model.vols.get_mut(&name(i)).unwrap().1;
                let gone: Vec<u64> = map.range(begin..end).map(|(k, _)| *k).collect();
                assert_eq!(d.unmapped, gone.len() as u64);
                let lost: Vec<DataBlock> = gone.iter().map(|k| DataBlock(map[k])).collect();
                assert_eq!(
                    d.removed, lost,
                    "discard reports every block that lost a mapping"
                );
                for k in gone {
                    map.remove(&k);
                }
                let owners = model.owners();
                for b in &d.freed {
                    assert!(!owners.contains_key(&b.0), "freed {b} is still mapped");
                }
            }
            Op::GiveBackZeroed(b) => {
                if let Some(r) = pool.reserve_data_block_at(DataBlock(b)).unwrap() {
                    assert!(
                        !model.owners().contains_key(&b),
                        "step {step}: {b} is mapped"
                    );
                    assert!(
                        !committed.owners().contains_key(&b),
                        "step {step}: {b} is mapped in the last commit"
                    );
                    pool.release_zeroed(r);
                }
            }
            Op::MapZeroed(i, vb, b) => {
                let Some((dev, map)) = model.vols.get(&name(i)).cloned() else {
                    continue;
                };
                if map.contains_key(&vb) {
                    continue;
                }
                let Some(r) = pool.reserver().reserve_zeroed_at(DataBlock(b)) else {
                    continue;
                };
                assert!(r.known_zeroed());
                assert!(
                    !model.owners().contains_key(&b) && !committed.owners().contains_key(&b),
                    "step {step}: the reserver handed out {b}, which is someone's"
                );
                assert!(
                    pool.reserve_data_block_at(DataBlock(b)).unwrap().is_none(),
                    "step {step}: {b} reserved twice"
                );
                pool.insert_mapping(DevId(dev), VirtBlock(vb), r).unwrap();
                model.vols.get_mut(&name(i)).unwrap().1.insert(vb, b);
            }
            Op::Commit => {
                let c = pool.commit().unwrap();
                pool.release_freed(&c.freed);
                committed = model.clone();
                thin_tools_agree(dir.path(), &model);
            }
            Op::Reopen => {
                pool.commit().unwrap();
                drop(pool);
                pool = Pool::open(dir.path()).unwrap();
                committed = model.clone();
            }
            Op::Crash => {
                // Drop without committing: the metadata falls back to the last commit.
                drop(pool);
                pool = Pool::open(dir.path()).unwrap();
                model = committed.clone();
                thin_tools_agree(dir.path(), &model);
            }
        }
        verify(&pool, &model);
    }
    pool.commit().unwrap();
    verify(&pool, &model);
    thin_tools_agree(dir.path(), &model);
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, max_shrink_iters: 200, .. ProptestConfig::default() })]
    #[test]
    fn pool_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
        run(ops);
    }
}

#[test]
fn snapshot_chain_and_delete_middle() {
    run(vec![
        Op::Create(0),
        Op::Write(0, 0, 40),
        Op::Snapshot(0, 1),
        Op::Write(1, 10, 5),
        Op::Snapshot(1, 2),
        Op::Write(2, 0, 3),
        Op::Commit,
        Op::Delete(1),
        Op::Write(0, 10, 5),
        Op::Commit,
        Op::Crash,
        Op::Discard(2, 0, 100),
        Op::Reopen,
    ]);
}

/// A block given back zeroed, then mapped by a write through the cursor, is not handed out
/// by the reserver; one freed by a discard is not either, before or after the commit.
#[test]
fn zeroed_blocks_taken_by_others_are_not_handed_out() {
    run(vec![
        Op::Create(0),
        Op::GiveBackZeroed(0),
        Op::GiveBackZeroed(1),
        Op::Write(0, 0, 2),
        Op::MapZeroed(0, 10, 0),
        Op::MapZeroed(0, 11, 1),
        Op::Discard(0, 0, 2),
        Op::MapZeroed(0, 12, 0),
        Op::Commit,
        Op::MapZeroed(0, 13, 1),
        Op::GiveBackZeroed(0),
        Op::MapZeroed(0, 14, 0),
        Op::MapZeroed(0, 15, 0),
    ]);
}
