//! Property tests against a model: random sequences of inserts, removes, range removes, clones
//! (snapshots), deletes, commits and reopen-from-last-commit on a two-level tree (a top-level
//! tree of subtrees whose values are data blocks counted in the data space map, like dm-thin's
//! mapping tree). After **every** step the space maps' counts must equal a full recount and the
//! trees must hold what the model holds.

mod common;
use common::*;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use uthin_btree::check::count_btree;
use uthin_btree::tm::DEFAULT_OVERLAY_LIMIT;
use uthin_btree::*;

type Leaf = DataRef<0>;
type Top = SubtreeRef<Leaf>;

const KEYS: u64 = 3000;
const MAX_TREES: usize = 6;

#[derive(Debug, Clone)]
enum Op {
    /// Insert `len` keys from `start` (step `step`) into tree `t`, each mapped to a new data block.
    Insert {
        t: usize,
        start: u64,
        len: u64,
        step: u64,
    },
    /// Overwrite existing keys from `start` with new data blocks.
    Overwrite {
        t: usize,
        start: u64,
        len: u64,
    },
    Remove {
        t: usize,
        key: u64,
    },
    RemoveRange {
        t: usize,
        start: u64,
        len: u64,
    },
    Clone {
        t: usize,
    },
    Delete {
        t: usize,
    },
    Commit,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let t = 0..MAX_TREES;
    prop_oneof![
        6 => (t.clone(), 0..KEYS, 1..400u64, 1..4u64).prop_map(|(t, start, len, step)| Op::Insert { t, start, len, step }),
        2 => (t.clone(), 0..KEYS, 1..100u64).prop_map(|(t, start, len)| Op::Overwrite { t, start, len }),
        2 => (t.clone(), 0..KEYS).prop_map(|(t, key)| Op::Remove { t, key }),
        2 => (t.clone(), 0..KEYS, 1..800u64).prop_map(|(t, start, len)| Op::RemoveRange { t, start, len }),
        2 => t.clone().prop_map(|t| Op::Clone { t }),
        1 => t.clone().prop_map(|t| Op::Delete { t }),
        2 => Just(Op::Commit),
        1 => Just(Op::Reopen),
    ]
}

/// Model: tree id -> (key -> data block).
type Model = BTreeMap<u64, BTreeMap<u64, u64>>;

struct World {
    io: Arc<MemIo>,
    tm: TransactionManager,
    top: BTree<Top>,
    model: Model,
    committed: (Model, u64),
    next_id: u64,
    trans: u64,
    cache_blocks: usize,
    overlay_limit: usize,
}

impl World {
    fn new(cache_blocks: usize, overlay_limit: usize) -> Self {
        let io = Arc::new(MemIo::new(3000));
        let mut tm = TransactionManager::format(io.clone(), &TmConfig { cache_blocks }).unwrap();
        tm.set_overlay_limit(overlay_limit);
        tm.create_data_sm(40_000).unwrap();
        let mut top = BTree::<Top>::create(&mut tm).unwrap();
        let r = BTree::<Leaf>::create(&mut tm).unwrap().root();
        top.insert(&mut tm, 0, &r).unwrap();
        let mut model = Model::new();
        model.insert(0, BTreeMap::new());
        let mut w = World {
            io,
            tm,
            top,
            model,
            committed: (Model::new(), 0),
            next_id: 1,
            trans: 0,
            cache_blocks,
            overlay_limit,
        };
        w.commit();
        w
    }

    fn commit(&mut self) {
        self.trans += 1;
        let sb = TestSuper {
            trans_id: self.trans,
            mapping_root: self.top.root().0,
            ..Default::default()
        };
        commit(&mut self.tm, &sb).unwrap();
        self.committed = (self.model.clone(), self.top.root().0);
    }

    fn id(&self, t: usize) -> u64 {
        let ids: Vec<u64> = self.model.keys().copied().collect();
        ids[t % ids.len()]
    }

    fn with_subtree<R>(
        &mut self,
        id: u64,
        f: impl FnOnce(&mut TransactionManager, &mut BTree<Leaf>) -> Result<R>,
    ) -> R {
        self.top
            .update_value(&mut self.tm, id, |tm, root| {
                let mut t = BTree::<Leaf>::open(*root);
                let r = f(tm, &mut t)?;
                *root = t.root();
                Ok(r)
            })
            .unwrap()
            .expect("tree exists")
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Insert {
                t,
                start,
                len,
                step,
            } => {
                let id = self.id(t);
                let keys: Vec<u64> = (0..len).map(|i| (start + i * step) % KEYS).collect();
                let mut blocks = Vec::new();
                for _ in &keys {
                    blocks.push(self.tm.data_alloc().unwrap().0);
                }
                let olds = self.with_subtree(id, |tm, tree| {
                    keys.iter()
                        .zip(&blocks)
                        .map(|(k, b)| tree.insert(tm, *k, b))
                        .collect::<Result<Vec<_>>>()
                });
                let m = self.model.get_mut(&id).unwrap();
                for ((k, b), old) in keys.iter().zip(&blocks).zip(olds) {
                    assert_eq!(old, m.insert(*k, *b), "insert {k} into tree {id}");
                }
            }
            Op::Overwrite { t, start, len } => {
                let id = self.id(t);
                let keys: Vec<u64> = self.model[&id]
                    .range(start..start + len)
                    .map(|(k, _)| *k)
                    .collect();
                let mut blocks = Vec::new();
                for _ in &keys {
                    blocks.push(self.tm.data_alloc().unwrap().0);
                }
                self.with_subtree(id, |tm, tree| {
                    for (k, b) in keys.iter().zip(&blocks) {
                        tree.insert(tm, *k, b)?;
                    }
                    Ok(())
                });
                let m = self.model.get_mut(&id).unwrap();
                for (k, b) in keys.iter().zip(&blocks) {
                    m.insert(*k, *b);
                }
            }
            Op::Remove { t, key } => {
                let id = self.id(t);
                let got = self.with_subtree(id, |tm, tree| tree.remove(tm, key));
                assert_eq!(got, self.model.get_mut(&id).unwrap().remove(&key));
            }
            Op::RemoveRange { t, start, len } => {
                let id = self.id(t);
                let mut seen = Vec::new();
                let n = self.with_subtree(id, |tm, tree| {
                    tree.remove_range(tm, start..start + len, |k, v| seen.push((k, *v)))
                });
                let m = self.model.get_mut(&id).unwrap();
                let want: Vec<(u64, u64)> =
                    m.range(start..start + len).map(|(k, v)| (*k, *v)).collect();
                assert_eq!(seen, want);
                assert_eq!(n as usize, want.len());
                m.retain(|k, _| !(start..start + len).contains(k));
            }
            Op::Clone { t } => {
                if self.model.len() >= MAX_TREES {
                    return;
                }
                let id = self.id(t);
                let root = self.top.lookup(&self.tm, id).unwrap().unwrap();
                let clone = BTree::<Leaf>::open(root).clone_tree(&mut self.tm).unwrap();
                let new_id = self.next_id;
                self.next_id += 1;
                assert_eq!(
                    self.top
                        .insert(&mut self.tm, new_id, &clone.root())
                        .unwrap(),
                    None
                );
                let m = self.model[&id].clone();
                self.model.insert(new_id, m);
            }
            Op::Delete { t } => {
                if self.model.len() <= 1 {
                    return;
                }
                let id = self.id(t);
                assert!(self.top.remove(&mut self.tm, id).unwrap().is_some());
                self.model.remove(&id);
            }
            Op::Commit => self.commit(),
            Op::Reopen => {
                let (mut tm, sb) = open(self.io.clone(), self.cache_blocks, 0).unwrap();
                assert_eq!(sb.trans_id, self.trans);
                tm.set_overlay_limit(self.overlay_limit);
                self.tm = tm;
                self.top = BTree::open(MetaBlock(sb.mapping_root));
                self.model = self.committed.0.clone();
                self.next_id = self
                    .next_id
                    .max(self.model.keys().max().map_or(0, |k| k + 1));
            }
        }
    }

    fn check(&self, full: bool) -> std::result::Result<(), TestCaseError> {
        let top = self.top.root();
        let problems = recount(&self.tm, |tm, c| count_btree::<Top>(tm, top, c));
        prop_assert!(problems.is_empty(), "recount: {:#?}", problems);
        // A run of free data blocks found in one pass is what asking block by block says.
        for probe in (0..3000u64).step_by(97).chain([39_990]) {
            let want = (probe..probe + 40)
                .take_while(|&b| b < 40_000 && self.tm.data_is_free(DiskBlock(b)).unwrap())
                .count() as u64;
            let got = self.tm.data_free_run(DiskBlock(probe), 40).unwrap();
            prop_assert_eq!(got, want, "free run from data block {}", probe);
        }
        if full {
            let ids: Vec<u64> = self.top.iter(&self.tm, ..).map(|r| r.unwrap().0).collect();
            prop_assert_eq!(ids, self.model.keys().copied().collect::<Vec<_>>());
            for (id, m) in &self.model {
                let root = self.top.lookup(&self.tm, *id).unwrap().unwrap();
                let t = BTree::<Leaf>::open(root);
                let got: Vec<(u64, u64)> = t.iter(&self.tm, ..).map(|r| r.unwrap()).collect();
                prop_assert_eq!(&got, &m.iter().map(|(k, v)| (*k, *v)).collect::<Vec<_>>());
                prop_assert_eq!(t.count(&self.tm).unwrap(), m.len() as u64);
                // Sharing is reported exactly: a write may go in place (no node on the path
                // shared, the data block counted once) iff no other tree sees this mapping.
                for (k, v) in m.iter().step_by(37) {
                    let (got, path_shared) = t.lookup_shared(&self.tm, *k).unwrap().unwrap();
                    prop_assert_eq!(got, *v);
                    let exclusive = !path_shared && self.tm.data_count(DiskBlock(*v)).unwrap() == 1;
                    let holders = self.model.values().filter(|o| o.get(k) == Some(v)).count();
                    prop_assert_eq!(exclusive, holders == 1, "tree {} key {} block {}", id, k, v);
                }
                // Nearest-key lookups and bounded iteration at keys spread over the key space
                // (present, absent, below and above everything).
                use std::ops::Bound::*;
                for probe in (0..KEYS + 10).step_by(211).chain([0, u64::MAX]) {
                    let le = m.range(..=probe).next_back().map(|(k, v)| (*k, *v));
                    let ge = m.range(probe..).next().map(|(k, v)| (*k, *v));
                    prop_assert_eq!(
                        t.lookup_le(&self.tm, probe).unwrap(),
                        le,
                        "lookup_le {}",
                        probe
                    );
                    prop_assert_eq!(
                        t.lookup_ge(&self.tm, probe).unwrap(),
                        ge,
                        "lookup_ge {}",
                        probe
                    );
                    let hi = probe.saturating_add(313);
                    for (lo_b, hi_b) in [
                        (Included(probe), Excluded(hi)),
                        (Excluded(probe), Included(hi)),
                        (Excluded(probe), Unbounded),
                    ] {
                        let got: Vec<(u64, u64)> =
                            t.iter(&self.tm, (lo_b, hi_b)).map(|r| r.unwrap()).collect();
                        let want: Vec<(u64, u64)> =
                            m.range((lo_b, hi_b)).map(|(k, v)| (*k, *v)).collect();
                        prop_assert_eq!(got, want, "iter {:?}..{:?}", lo_b, hi_b);
                    }
                }
            }
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, max_shrink_iters: 200, ..ProptestConfig::default() })]

    #[test]
    fn trees_and_space_maps_match_the_model(ops in proptest::collection::vec(op(), 1..80)) {
        run(World::new(256, DEFAULT_OVERLAY_LIMIT), &ops)?;
    }

    /// The same with a tiny cache (dirty blocks written early all the time) and space maps that
    /// flush their overlays into the bitmaps every few changes, mid-transaction.
    #[test]
    fn with_early_writes_and_mid_transaction_flushes(ops in proptest::collection::vec(op(), 1..60)) {
        run(World::new(24, 7), &ops)?;
    }
}

fn run(mut w: World, ops: &[Op]) -> std::result::Result<(), TestCaseError> {
    for (i, op) in ops.iter().enumerate() {
        w.apply(op);
        w.check(i % 8 == 7 || i + 1 == ops.len())?;
    }
    w.commit();
    w.check(true)?;
    let (tm, _) = open(w.io.clone(), 256, 0).unwrap();
    w.tm = tm;
    w.check(true)?;
    Ok(())
}
