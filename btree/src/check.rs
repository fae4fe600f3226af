//! Recounting: walk trees and space-map structures, count every reference, and compare with
//! the space maps. The model of `thin_check`; the tests run it after every step.

use crate::btree::{BTree, MAX_DEPTH, U32Value, ValueType};
use crate::cache::BlockHasher;
use crate::checksum::{BITMAP_VALIDATOR, BTREE_NODE_VALIDATOR};
use crate::error::Result;
use crate::space_map::format::bitmap_get;
use crate::space_map::{CurrentIndex, ENTRIES_PER_BITMAP, IndexEntryValue, SmId, valid_entries};
use crate::tm::TransactionManager;
use crate::{DiskBlock, MetaBlock};
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasherDefault;

/// Counts per block: a dense vector for blocks below a bound (the common case: checking is
/// dominated by counting, so no hashing there), a hash map above it (so a wild block number from
/// damaged metadata costs one entry, not gigabytes).
#[derive(Debug, Default, Clone)]
struct Counts {
    dense: Vec<u32>,
    sparse: HashMap<u64, u32, BuildHasherDefault<BlockHasher>>,
}

/// Blocks counted densely at most (256 MiB of counters).
const DENSE_LIMIT: u64 = 1 << 26;

impl Counts {
    fn with_capacity(n: u64) -> Self {
        Counts {
            dense: vec![0; n.min(DENSE_LIMIT) as usize],
            sparse: HashMap::default(),
        }
    }

    fn inc(&mut self, b: u64) -> u32 {
        if b < DENSE_LIMIT {
            let i = b as usize;
            if i >= self.dense.len() {
                let want = (i + 1).max(self.dense.len() * 2).min(DENSE_LIMIT as usize);
                self.dense.resize(want, 0);
            }
            self.dense[i] = self.dense[i].saturating_add(1);
            self.dense[i]
        } else {
            let c = self.sparse.entry(b).or_insert(0);
            *c = c.saturating_add(1);
            *c
        }
    }

    fn get(&self, b: u64) -> u32 {
        if b < DENSE_LIMIT {
            self.dense.get(b as usize).copied().unwrap_or(0)
        } else {
            self.sparse.get(&b).copied().unwrap_or(0)
        }
    }
}

/// Reference counts found by walking, and the structural problems seen on the way.
#[derive(Debug, Default, Clone)]
pub struct RefCounter {
    meta: Counts,
    data: Counts,
    problems: Vec<String>,
}

impl RefCounter {
    /// An empty counter.
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty counter with room for the given numbers of metadata and data blocks (saves
    /// regrowing when the sizes are known, e.g. from the space maps).
    pub fn with_capacity(metadata_blocks: u64, data_blocks: u64) -> Self {
        RefCounter {
            meta: Counts::with_capacity(metadata_blocks),
            data: Counts::with_capacity(data_blocks),
            problems: Vec::new(),
        }
    }

    /// Counts one reference to metadata block `b`; returns its count so far.
    pub fn inc_meta(&mut self, b: MetaBlock) -> u32 {
        self.meta.inc(b.0)
    }

    /// Counts one reference to data block `b`.
    pub fn inc_data(&mut self, b: DiskBlock) {
        self.data.inc(b.0);
    }

    /// References counted to metadata block `b`.
    pub fn meta(&self, b: MetaBlock) -> u32 {
        self.meta.get(b.0)
    }

    /// References counted to data block `b`.
    pub fn data(&self, b: DiskBlock) -> u32 {
        self.data.get(b.0)
    }

    /// Records a structural problem.
    pub fn problem(&mut self, what: String) {
        self.problems.push(what);
    }

    /// Structural problems found (node fill, key order).
    pub fn problems(&self) -> &[String] {
        &self.problems
    }
}

/// A count that differs from what the walk found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Discrepancy {
    /// "metadata" or "data".
    pub space: &'static str,
    /// The block, or `None` for a map-wide figure.
    pub block: Option<u64>,
    /// What the count should be.
    pub expected: u64,
    /// What the space map says.
    pub actual: u64,
    /// Which figure.
    pub what: &'static str,
}

impl Discrepancy {
    /// True for the summary figures (allocated total, a bitmap's free count and first free
    /// entry) that the kernel only uses as search hints and thin_check does not verify; uthin
    /// writes them exact, other tools (thin_restore) not always.
    pub fn is_hint(&self) -> bool {
        self.what != "reference count"
    }
}

impl fmt::Display for Discrepancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.block {
            Some(b) => write!(
                f,
                "{} block {b}: {} is {}, expected {}",
                self.space, self.what, self.actual, self.expected
            ),
            None => write!(
                f,
                "{} space map: {} is {}, expected {}",
                self.space, self.what, self.actual, self.expected
            ),
        }
    }
}

/// Counts the tree rooted at `root` into `c`: one reference to the root, then, on the first
/// visit of each node only, one per child and (through `V::count`) what each value references.
/// Checks each node's fill (all but the root), key order and key bounds on the way.
pub fn count_btree<V: ValueType>(
    tm: &TransactionManager,
    root: MetaBlock,
    c: &mut RefCounter,
) -> Result<()> {
    walk::<V>(tm, root, 0, true, None, None, c)
}

fn walk<V: ValueType>(
    tm: &TransactionManager,
    b: MetaBlock,
    depth: usize,
    is_root: bool,
    lower: Option<u64>,
    upper: Option<u64>,
    c: &mut RefCounter,
) -> Result<()> {
    if c.inc_meta(b) > 1 {
        return Ok(());
    }
    if depth >= MAX_DEPTH {
        c.problem(format!("{b}: tree deeper than {MAX_DEPTH}"));
        return Ok(());
    }
    let data = tm.read(b, &BTREE_NODE_VALIDATOR)?;
    let n = crate::btree::node::Node::new(b, &data, V::SIZE)?;
    let nr = n.h.nr;
    if !is_root && nr < n.h.min() {
        c.problem(format!(
            "{b}: {nr} entries, fewer than max_entries/3 = {}",
            n.h.min()
        ));
    }
    for i in 1..nr {
        if n.key(i) <= n.key(i - 1) {
            c.problem(format!("{b}: keys out of order at {i}"));
        }
    }
    if nr > 0 {
        if let Some(lo) = lower
            && n.key(0) < lo
        {
            c.problem(format!(
                "{b}: first key {} below its parent key {lo}",
                n.key(0)
            ));
        }
        if let Some(hi) = upper
            && n.key(nr - 1) >= hi
        {
            c.problem(format!(
                "{b}: last key {} not below the next parent key {hi}",
                n.key(nr - 1)
            ));
        }
    }
    if n.h.leaf {
        let values: Vec<V::Value> = (0..nr).map(|i| V::unpack(n.value(i))).collect();
        drop(data);
        for v in &values {
            V::count(tm, v, c)?;
        }
    } else {
        let kids: Vec<(MetaBlock, u64, Option<u64>)> = (0..nr)
            .map(|i| {
                (
                    n.child(i),
                    n.key(i),
                    if i + 1 < nr {
                        Some(n.key(i + 1))
                    } else {
                        upper
                    },
                )
            })
            .collect();
        drop(data);
        for (child, lo, hi) in kids {
            walk::<V>(tm, child, depth + 1, false, Some(lo), hi, c)?;
        }
    }
    Ok(())
}

impl TransactionManager {
    /// Counts the current space-map structures into `c`: the metadata map's index block,
    /// bitmaps and reference-count tree, and the data map's index tree, bitmaps and
    /// reference-count tree. With the caller's superblock and trees, that is every reference to
    /// a metadata block.
    pub fn count_space_map_blocks(&self, c: &mut RefCounter) -> Result<()> {
        if let CurrentIndex::Metadata { block, entries, .. } = &self.meta.index {
            c.inc_meta(*block);
            for ie in entries {
                c.inc_meta(MetaBlock(ie.blocknr));
            }
        }
        count_btree::<U32Value>(self, self.meta.ref_root, c)?;
        if let Some(d) = &self.data {
            if let CurrentIndex::Disk { root } = &d.index {
                count_btree::<IndexEntryValue>(self, *root, c)?;
                for item in BTree::<IndexEntryValue>::open(*root).iter(self, ..) {
                    let (_, ie) = item?;
                    c.inc_meta(MetaBlock(ie.blocknr));
                }
            }
            count_btree::<U32Value>(self, d.ref_root, c)?;
        }
        Ok(())
    }

    /// Compares every metadata block's count with `expected` (and the allocated total, and —
    /// when nothing is pending in the overlay — each index entry's free count).
    pub fn verify_metadata_counts(&self, expected: &RefCounter) -> Result<Vec<Discrepancy>> {
        self.verify_map(SmId::Metadata, &|b| expected.meta(MetaBlock(b)))
    }

    /// Compares every data block's count with `expected`.
    pub fn verify_data_counts(&self, expected: &RefCounter) -> Result<Vec<Discrepancy>> {
        self.verify_map(SmId::Data, &|b| expected.data(DiskBlock(b)))
    }

    fn verify_map(&self, id: SmId, expected: &dyn Fn(u64) -> u32) -> Result<Vec<Discrepancy>> {
        let sm = self.sm(id)?;
        let mut out = Vec::new();
        let mut allocated = 0u64;
        for g in 0..sm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) {
            // One index lookup and one bitmap read per 16320 blocks.
            let ie = self.current_ie(id, g)?;
            let bm = self.read(MetaBlock(ie.blocknr), &BITMAP_VALIDATOR)?;
            let base = g * ENTRIES_PER_BITMAP;
            for i in 0..valid_entries(g, sm.nr_blocks) as u64 {
                let b = base + i;
                let actual = match sm.overlay.get(&b) {
                    Some(&c) => c,
                    None => match bitmap_get(&bm, i) {
                        3 => self.sm_get(id, b)?,
                        v => v,
                    },
                };
                let want = expected(b);
                if actual != 0 {
                    allocated += 1;
                }
                if actual != want {
                    out.push(Discrepancy {
                        space: id.space(),
                        block: Some(b),
                        expected: want as u64,
                        actual: actual as u64,
                        what: "reference count",
                    });
                }
            }
        }
        if allocated != sm.nr_allocated {
            out.push(Discrepancy {
                space: id.space(),
                block: None,
                expected: allocated,
                actual: sm.nr_allocated,
                what: "allocated blocks",
            });
        }
        if sm.overlay.is_empty() {
            for g in 0..sm.nr_blocks.div_ceil(ENTRIES_PER_BITMAP) {
                let ie = self.current_ie(id, g)?;
                let bm = self.read(MetaBlock(ie.blocknr), &BITMAP_VALIDATOR)?;
                let free = (0..valid_entries(g, sm.nr_blocks) as u64)
                    .filter(|&i| bitmap_get(&bm, i) == 0)
                    .count() as u64;
                if free != ie.nr_free as u64 {
                    out.push(Discrepancy {
                        space: id.space(),
                        block: Some(ie.blocknr),
                        expected: free,
                        actual: ie.nr_free as u64,
                        what: "free entries of bitmap",
                    });
                }
                let first_free =
                    (0..valid_entries(g, sm.nr_blocks) as u64).find(|&i| bitmap_get(&bm, i) == 0);
                if let Some(f) = first_free
                    && (ie.none_free_before as u64) > f
                {
                    out.push(Discrepancy {
                        space: id.space(),
                        block: Some(ie.blocknr),
                        expected: f,
                        actual: ie.none_free_before as u64,
                        what: "none_free_before of bitmap",
                    });
                }
            }
        }
        Ok(out)
    }
}
