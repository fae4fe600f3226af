//! Damage-tolerant reading, for repair tools (`uthin repair`, the model of `thin_repair`).
//!
//! [`count_btree`](crate::check::count_btree) and [`BTree::iter`](crate::BTree::iter) stop at
//! the first block they cannot use: right for a checker, which must report and not guess. A
//! repair tool wants the opposite: everything that *can* be read, and an exact account of what
//! could not. [`salvage_btree`] walks a tree like the checker does, but a node that fails
//! validation (checksum, own block number, header) or sanity (keys out of order, keys outside
//! the range its parent gave it, too deep) loses only its own subtree: the walk reports the
//! block, the key range the parent assigned to it and why, and goes on with its siblings.
//!
//! [`TransactionManager::open_read_only`] gives such a walk a block cache over a metadata device
//! whose space maps may be the damaged part (a repair rebuilds them and never reads them), and
//! [`read_node`] reads any node whatever its value size (for scanning a device for trees when
//! the superblock is lost).
//!
//! Nothing here trusts a block it has not validated, and nothing panics on any input.

use crate::MetaBlock;
use crate::btree::node::Node;
use crate::btree::{MAX_DEPTH, ValueType};
use crate::checksum::{BTREE_NODE_VALIDATOR, read_le32};
use crate::error::{BlockKind, Error, Result};
use crate::io::BlockIo;
use crate::space_map::{CurrentIndex, SmId, SpaceMap};
use crate::tm::{TmConfig, TransactionManager};
use std::sync::Arc;

/// A subtree a salvage walk could not read: nothing under `block` was used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostSubtree {
    /// The node that was rejected.
    pub block: MetaBlock,
    /// First key its parent assigned to it (0 for a tree's root).
    pub first_key: u64,
    /// First key of the next subtree, exclusive (`None`: to the end of the key space).
    pub end_key: Option<u64>,
    /// Depth of the node (0 = the tree's root).
    pub depth: usize,
    /// Why it was rejected (names the block).
    pub reason: String,
}

impl LostSubtree {
    /// The lost key range as text: `keys 100..200`, `keys 100..` or `all keys`.
    pub fn key_range(&self) -> String {
        match (self.first_key, self.end_key) {
            (0, None) => "all keys".to_string(),
            (lo, None) => format!("keys {lo}.."),
            (lo, Some(hi)) => format!("keys {lo}..{hi}"),
        }
    }
}

/// Walks the tree at `root` in key order, calling `value` for every entry of every leaf that
/// could be read and `lost` for every subtree that could not (see the module documentation).
/// Entries come strictly increasing in key; a rejected node's whole subtree is skipped.
pub fn salvage_btree<V: ValueType>(
    tm: &TransactionManager,
    root: MetaBlock,
    value: &mut dyn FnMut(u64, V::Value),
    lost: &mut dyn FnMut(LostSubtree),
) {
    let mut w = Walk::<V> {
        tm,
        value,
        lost,
        _v: std::marker::PhantomData,
    };
    w.node(root, 0, 0, None);
}

struct Walk<'a, V: ValueType> {
    tm: &'a TransactionManager,
    value: &'a mut dyn FnMut(u64, V::Value),
    lost: &'a mut dyn FnMut(LostSubtree),
    _v: std::marker::PhantomData<V>,
}

enum Contents<T> {
    Leaf(Vec<(u64, T)>),
    Internal(Vec<(u64, MetaBlock)>),
}

impl<V: ValueType> Walk<'_, V> {
    fn node(&mut self, b: MetaBlock, depth: usize, lower: u64, upper: Option<u64>) {
        let lose = |reason: String| LostSubtree {
            block: b,
            first_key: lower,
            end_key: upper,
            depth,
            reason,
        };
        let contents = match self.read(b, depth, lower, upper) {
            Ok(c) => c,
            Err(e) => {
                (self.lost)(lose(e.to_string()));
                return;
            }
        };
        match contents {
            Contents::Leaf(entries) => {
                for (k, v) in entries {
                    (self.value)(k, v);
                }
            }
            Contents::Internal(children) => {
                for (i, &(key, child)) in children.iter().enumerate() {
                    let next = children.get(i + 1).map(|&(k, _)| k).or(upper);
                    self.node(child, depth + 1, key, next);
                }
            }
        }
    }

    /// Reads and checks one node: validation by the cache, header by the node parser, then the
    /// sanity a walk needs (order, bounds, depth).
    fn read(
        &self,
        b: MetaBlock,
        depth: usize,
        lower: u64,
        upper: Option<u64>,
    ) -> Result<Contents<V::Value>> {
        let bad = |reason: String| Error::malformed(b, BlockKind::BTreeNode, reason);
        if depth >= MAX_DEPTH {
            return Err(bad(format!("deeper than {MAX_DEPTH} levels (a cycle?)")));
        }
        let data = self.tm.read(b, &BTREE_NODE_VALIDATOR)?;
        let n = Node::new(b, &data, V::SIZE)?;
        let nr = n.h.nr;
        for i in 0..nr {
            let k = n.key(i);
            if i > 0 && k <= n.key(i - 1) {
                return Err(bad(format!(
                    "keys out of order at entry {i} ({k} after {})",
                    n.key(i - 1)
                )));
            }
            if k < lower || upper.is_some_and(|hi| k >= hi) {
                return Err(bad(format!(
                    "key {k} outside the range {lower}..{} its parent gives it",
                    upper.map_or(String::new(), |h| h.to_string())
                )));
            }
        }
        Ok(if n.h.leaf {
            Contents::Leaf((0..nr).map(|i| (n.key(i), V::unpack(n.value(i)))).collect())
        } else {
            Contents::Internal((0..nr).map(|i| (n.key(i), n.child(i))).collect())
        })
    }
}

/// Any B-tree node, read and validated without knowing which tree it belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawNode {
    /// Where it was read.
    pub block: MetaBlock,
    /// A leaf (else an internal node, whose values are child block numbers).
    pub leaf: bool,
    /// Bytes per value (8 in internal nodes).
    pub value_size: usize,
    /// Keys, as stored (not checked for order).
    pub keys: Vec<u64>,
    /// Values, `value_size` bytes each, concatenated.
    pub values: Vec<u8>,
}

impl RawNode {
    /// Number of entries.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when the node has no entries.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Value `i` (`None` past the end).
    pub fn value(&self, i: usize) -> Option<&[u8]> {
        self.values
            .get(i * self.value_size..(i + 1) * self.value_size)
    }

    /// Value `i` read as a le64 (child block of an internal node, or an 8-byte leaf value).
    pub fn value_u64(&self, i: usize) -> Option<u64> {
        let v = self.value(i)?;
        let bytes: [u8; 8] = v.get(..8)?.try_into().ok()?;
        Some(u64::from_le_bytes(bytes))
    }
}

/// Reads block `b` as a B-tree node of any value size (checksum, block number, header), for
/// scanning a device whose superblock is lost. Errors name the block.
pub fn read_node(tm: &TransactionManager, b: MetaBlock) -> Result<RawNode> {
    let data = tm.read(b, &BTREE_NODE_VALIDATOR)?;
    // The value size is what the header claims; the parser then checks every other field
    // against it (max_entries, nr_entries), so the reads below stay in bounds.
    let vs = read_le32(&data[..], 24) as usize;
    if vs == 0 || vs > 1024 {
        return Err(Error::malformed(
            b,
            BlockKind::BTreeNode,
            format!("value size {vs}"),
        ));
    }
    let n = Node::new(b, &data, vs)?;
    let mut values = Vec::with_capacity(n.h.nr * n.h.vs);
    for i in 0..n.h.nr {
        values.extend_from_slice(n.value(i));
    }
    Ok(RawNode {
        block: b,
        leaf: n.h.leaf,
        value_size: n.h.vs,
        keys: (0..n.h.nr).map(|i| n.key(i)).collect(),
        values,
    })
}

impl TransactionManager {
    /// Opens `io` for reading validated blocks only, without reading its space maps (in a
    /// damaged device they may be the damaged part; a repair rebuilds them): for
    /// [`salvage_btree`] and [`read_node`]. Every block of the device can be read; reference
    /// counts are unknown and every change is refused with [`Error::Poisoned`].
    pub fn open_read_only(io: Arc<dyn BlockIo>, cfg: &TmConfig) -> Self {
        let nr_blocks = io.nr_blocks();
        let placeholder = SpaceMap::new(
            SmId::Metadata,
            nr_blocks,
            CurrentIndex::Metadata {
                block: MetaBlock(0),
                entries: Vec::new(),
                dirty: false,
            },
            MetaBlock(0),
        );
        let mut tm = TransactionManager::with_maps(io, cfg, placeholder);
        tm.refuse_changes("opened read-only for salvage (no space maps)");
        tm
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::MemIo;
    use crate::{BTree, BytesValue, U64Value};

    /// A committed tree of `n` keys (key 3k → value 10k) in a fresh device; returns the io and
    /// the root.
    fn build(n: u64) -> (Arc<MemIo>, MetaBlock) {
        let io = Arc::new(MemIo::new(2048));
        let mut tm = TransactionManager::format(io.clone(), &TmConfig::default()).unwrap();
        let mut t = BTree::<U64Value>::create(&mut tm).unwrap();
        for k in 0..n {
            t.insert(&mut tm, k * 3, &(k * 10)).unwrap();
        }
        static SB: crate::DmValidator =
            crate::DmValidator::new(BlockKind::Superblock, crate::SUPERBLOCK_CSUM_XOR);
        tm.commit(&SB, |_| Ok([0u8; crate::BLOCK_SIZE])).unwrap();
        (io, t.root())
    }

    fn salvage(io: &Arc<MemIo>, root: MetaBlock) -> (Vec<(u64, u64)>, Vec<LostSubtree>) {
        let tm = TransactionManager::open_read_only(io.clone(), &TmConfig::default());
        let (mut vals, mut lost) = (Vec::new(), Vec::new());
        salvage_btree::<U64Value>(&tm, root, &mut |k, v| vals.push((k, v)), &mut |l| {
            lost.push(l)
        });
        (vals, lost)
    }

    #[test]
    fn an_intact_tree_is_read_whole() {
        let (io, root) = build(2000);
        let (vals, lost) = salvage(&io, root);
        assert!(lost.is_empty(), "{lost:?}");
        assert_eq!(vals.len(), 2000);
        assert!(
            vals.iter()
                .enumerate()
                .all(|(i, &(k, v))| k == i as u64 * 3 && v == i as u64 * 10)
        );
    }

    #[test]
    fn a_bad_leaf_loses_only_its_keys_and_names_them() {
        let (io, root) = build(2000);
        let tm = TransactionManager::open_read_only(io.clone(), &TmConfig::default());
        let top = read_node(&tm, root).unwrap();
        assert!(!top.leaf, "2000 keys need an internal root");
        let victim = MetaBlock(top.value_u64(2).unwrap());
        let victim_keys = read_node(&tm, victim).unwrap().keys;
        drop(tm);
        io.modify_block(victim, |b| b[100] ^= 1).unwrap();
        let (vals, lost) = salvage(&io, root);
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].block, victim);
        assert_eq!(lost[0].first_key, top.keys[2]);
        assert_eq!(lost[0].end_key, Some(top.keys[3]));
        assert!(lost[0].reason.contains("checksum"), "{}", lost[0].reason);
        assert_eq!(vals.len(), 2000 - victim_keys.len());
        assert!(vals.iter().all(|(k, _)| !victim_keys.contains(k)));
        assert!(vals.windows(2).all(|w| w[0].0 < w[1].0));
    }

    #[test]
    fn a_bad_root_loses_everything_and_wrong_kinds_are_rejected() {
        let (io, root) = build(10);
        io.modify_block(root, |b| b[8] ^= 1).unwrap(); // wrong block number (and checksum)
        let (vals, lost) = salvage(&io, root);
        assert!(vals.is_empty());
        assert_eq!(lost.len(), 1);
        assert_eq!(lost[0].key_range(), "all keys");
        // A block outside the device, and a node of another value size, are losses too.
        let (io, root) = build(10);
        let tm = TransactionManager::open_read_only(io.clone(), &TmConfig::default());
        let mut lost = Vec::new();
        salvage_btree::<U64Value>(&tm, MetaBlock(1 << 40), &mut |_, _| {}, &mut |l| {
            lost.push(l)
        });
        salvage_btree::<BytesValue<24>>(&tm, root, &mut |_, _| {}, &mut |l| lost.push(l));
        assert_eq!(lost.len(), 2, "{lost:?}");
        assert!(lost[1].reason.contains("value size"), "{}", lost[1].reason);
    }

    #[test]
    fn keys_outside_the_parent_range_reject_the_node() {
        let (io, root) = build(2000);
        let tm = TransactionManager::open_read_only(io.clone(), &TmConfig::default());
        let top = read_node(&tm, root).unwrap();
        // Point child 1 at child 3: a valid node, but its keys belong elsewhere.
        let c3 = top.value_u64(3).unwrap();
        drop(tm);
        io.modify_block(root, |b| {
            let max = read_le32(b, 20) as usize;
            let off = 32 + 8 * max + 8;
            b[off..off + 8].copy_from_slice(&c3.to_le_bytes());
            reseal(root, b);
        })
        .unwrap();
        let (vals, lost) = salvage(&io, root);
        assert_eq!(lost.len(), 1, "{lost:?}");
        assert!(
            lost[0].reason.contains("outside the range"),
            "{}",
            lost[0].reason
        );
        assert!(vals.windows(2).all(|w| w[0].0 < w[1].0), "no duplicates");
    }

    fn reseal(b: MetaBlock, data: &mut crate::Block) {
        use crate::checksum::Validator;
        BTREE_NODE_VALIDATOR.seal(b, data);
    }

    #[test]
    fn read_only_manager_refuses_changes() {
        let (io, _) = build(1);
        let mut tm = TransactionManager::open_read_only(io, &TmConfig::default());
        assert!(matches!(
            tm.new_block(&BTREE_NODE_VALIDATOR),
            Err(Error::Poisoned(_))
        ));
    }
}
