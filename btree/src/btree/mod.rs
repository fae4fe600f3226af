//! B-trees in dm's node format: u64 keys, fixed-size values ([`ValueType`]), copy-on-write
//! through the transaction manager, shared by reference counting.
//!
//! # Sharing
//! A node's reference count is the number of parents (or roots) pointing at it. Cloning a tree
//! takes one reference on its root: O(1). Modifying goes down the root-to-leaf path shadowing
//! each node; shadowing a node whose count is above one copies it and takes a reference on
//! everything it points at (child nodes, or what its values reference through the value type),
//! so both copies stay exactly counted and every node not on the path stays shared.
//!
//! # Node fill
//! Every node except a root keeps at least `max_entries / 3` entries (thin_check's rule), after
//! every operation. A full node first gives entries to a sibling with room; when it must split:
//! - an append (the new key goes past the node's last key) leaves the node full-ish
//!   (`max + 1 - min` entries) and starts a new right node with `min` entries; as appends go on,
//!   the left sibling is topped up to `max` before the next split. Sequential inserts so leave
//!   nearly every node full (~16.3 bytes per 8-byte-valued entry).
//! - a prepend mirrors that;
//! - an insert in the middle splits two full siblings into three nodes 2/3 full (B*-tree).
//!
//! Removal merges a node that fell below the minimum with a sibling, or takes entries from it,
//! and a root left with a single child is replaced by that child.

pub(crate) mod node;
mod value;

pub use node::max_entries;
pub use value::{BytesValue, DataRef, SubtreeRef, U32Value, U64Value, ValueType};

use crate::MetaBlock;
use crate::cache::BlockMut;
use crate::checksum::BTREE_NODE_VALIDATOR;
use crate::error::{BlockKind, Error, Result};
use crate::tm::{BlockRef, TransactionManager};
use node::{Entries, Hdr, Node};
use std::marker::PhantomData;
use std::ops::{Bound, RangeBounds};

/// Deepest tree accepted (a deeper one can only come from corruption or a cycle).
pub const MAX_DEPTH: usize = 24;

/// A handle on a B-tree: just its root block. Operations take the transaction manager; a
/// modifying operation may move the root (read [`BTree::root`] afterwards and store it).
pub struct BTree<V: ValueType> {
    root: MetaBlock,
    _v: PhantomData<fn() -> V>,
}

impl<V: ValueType> Clone for BTree<V> {
    /// Copies the handle only (no reference taken); see [`BTree::clone_tree`] for sharing.
    fn clone(&self) -> Self {
        BTree::open(self.root)
    }
}

impl<V: ValueType> std::fmt::Debug for BTree<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BTree(root {})", self.root)
    }
}

/// What a lookup also finds out about the nodes on its path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum PathCheck {
    None,
    /// Whether any has a reference count above one.
    Shared,
    /// Whether all are written in place by the next change.
    InPlace,
}

fn node_at<'a>(nr: MetaBlock, data: &'a crate::Block, vs: usize) -> Result<Node<'a>> {
    Node::new(nr, data, vs)
}

fn too_deep(nr: MetaBlock) -> Error {
    Error::malformed(
        nr,
        BlockKind::BTreeNode,
        format!("tree deeper than {MAX_DEPTH} levels (a cycle?)"),
    )
}

/// How the entries of a full node (plus the new one) are placed.
enum Plan {
    /// Move entries to the left sibling until it is full.
    FillLeft,
    /// Move entries to the right sibling until it is full.
    FillRight,
    /// Share evenly with the left / right sibling.
    EvenLeft,
    EvenRight,
    /// Split the node alone into two (sizes of the left and right part).
    SplitOne(usize, usize),
    /// Split the node and its left / right sibling into three.
    SplitTwoLeft,
    SplitTwoRight,
}

impl<V: ValueType> BTree<V> {
    /// Creates an empty tree (one empty leaf).
    pub fn create(tm: &mut TransactionManager) -> Result<Self> {
        if node::max_entries(V::SIZE) < 3 {
            return Err(Error::Unsupported(format!(
                "{}-byte values do not fit three to a node",
                V::SIZE
            )));
        }
        let mut leaf = tm.new_block(&BTREE_NODE_VALIDATOR)?;
        node::init(&mut leaf, true, V::SIZE);
        Ok(BTree::open(leaf.nr()))
    }

    /// A handle on the existing tree rooted at `root` (no I/O, no reference taken).
    pub fn open(root: MetaBlock) -> Self {
        BTree {
            root,
            _v: PhantomData,
        }
    }

    /// The root block (what to store in a superblock or a parent tree).
    pub fn root(&self) -> MetaBlock {
        self.root
    }

    fn read(tm: &TransactionManager, b: MetaBlock) -> Result<BlockRef> {
        tm.read(b, &BTREE_NODE_VALIDATOR)
    }

    /// The value stored under `key`.
    pub fn lookup(&self, tm: &TransactionManager, key: u64) -> Result<Option<V::Value>> {
        Ok(self.lookup_inner(tm, key, PathCheck::None)?.map(|(v, _)| v))
    }

    /// The value stored under `key`, and whether every node on the path from the root to its
    /// leaf is written in place by the next change
    /// ([`TransactionManager::writes_in_place`]): then changing what the value points at
    /// in place needs no change to this tree, since no copy of the path can see it.
    pub fn lookup_in_place(
        &self,
        tm: &TransactionManager,
        key: u64,
    ) -> Result<Option<(V::Value, bool)>> {
        self.lookup_inner(tm, key, PathCheck::InPlace)
    }

    /// The value stored under `key`, and whether any node on the path from the root to its leaf
    /// has a reference count above one (the path is shared with another tree, so a change would
    /// copy it). The referenced thing itself (a data block) has its own count to check.
    pub fn lookup_shared(
        &self,
        tm: &TransactionManager,
        key: u64,
    ) -> Result<Option<(V::Value, bool)>> {
        self.lookup_inner(tm, key, PathCheck::Shared)
    }

    /// A lookup that also answers `check` about the path (false for [`PathCheck::None`]).
    fn lookup_inner(
        &self,
        tm: &TransactionManager,
        key: u64,
        check: PathCheck,
    ) -> Result<Option<(V::Value, bool)>> {
        let mut b = self.root;
        let mut flag = check == PathCheck::InPlace;
        for _ in 0..MAX_DEPTH {
            match check {
                PathCheck::None => {}
                PathCheck::Shared => {
                    if !flag {
                        flag = tm.ref_count(b)? > 1;
                    }
                }
                PathCheck::InPlace => flag = flag && tm.writes_in_place(b),
            }
            let data = Self::read(tm, b)?;
            let n = node_at(b, &data, V::SIZE)?;
            if n.h.leaf {
                return Ok(match n.search(key) {
                    Ok(i) => Some((V::unpack(n.value(i)), flag)),
                    Err(_) => None,
                });
            }
            match n.lower_bound(key) {
                None => return Ok(None),
                Some(i) => b = n.child(i),
            }
        }
        Err(too_deep(b))
    }

    /// The entry with the largest key <= `key`.
    pub fn lookup_le(&self, tm: &TransactionManager, key: u64) -> Result<Option<(u64, V::Value)>> {
        self.le(tm, self.root, key, 0)
    }

    fn le(
        &self,
        tm: &TransactionManager,
        b: MetaBlock,
        key: u64,
        depth: usize,
    ) -> Result<Option<(u64, V::Value)>> {
        if depth >= MAX_DEPTH {
            return Err(too_deep(b));
        }
        let data = Self::read(tm, b)?;
        let n = node_at(b, &data, V::SIZE)?;
        if n.h.leaf {
            return Ok(n
                .lower_bound(key)
                .map(|i| (n.key(i), V::unpack(n.value(i)))));
        }
        let Some(i) = n.lower_bound(key) else {
            return Ok(None);
        };
        for j in (0..=i).rev() {
            if let Some(r) = self.le(tm, n.child(j), key, depth + 1)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// The entry with the smallest key >= `key`.
    pub fn lookup_ge(&self, tm: &TransactionManager, key: u64) -> Result<Option<(u64, V::Value)>> {
        self.ge(tm, self.root, key, 0)
    }

    fn ge(
        &self,
        tm: &TransactionManager,
        b: MetaBlock,
        key: u64,
        depth: usize,
    ) -> Result<Option<(u64, V::Value)>> {
        if depth >= MAX_DEPTH {
            return Err(too_deep(b));
        }
        let data = Self::read(tm, b)?;
        let n = node_at(b, &data, V::SIZE)?;
        if n.h.leaf {
            let i = match n.search(key) {
                Ok(i) | Err(i) => i,
            };
            return Ok((i < n.h.nr).then(|| (n.key(i), V::unpack(n.value(i)))));
        }
        let start = n.lower_bound(key).unwrap_or(0);
        for j in start..n.h.nr {
            if let Some(r) = self.ge(tm, n.child(j), key, depth + 1)? {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }

    /// Iterates over the entries whose keys are in `range`, in key order, reading one leaf at a
    /// time.
    pub fn iter<'a>(
        &self,
        tm: &'a TransactionManager,
        range: impl RangeBounds<u64>,
    ) -> Iter<'a, V> {
        Iter::new(
            tm,
            self.root,
            range.start_bound().cloned(),
            range.end_bound().cloned(),
        )
    }

    /// Number of entries (reads every leaf).
    pub fn count(&self, tm: &TransactionManager) -> Result<u64> {
        let mut total = 0u64;
        let mut stack = vec![(self.root, 0usize)];
        while let Some((b, depth)) = stack.pop() {
            if depth >= MAX_DEPTH {
                return Err(too_deep(b));
            }
            let data = Self::read(tm, b)?;
            let n = node_at(b, &data, V::SIZE)?;
            if n.h.leaf {
                total += n.h.nr as u64;
            } else {
                for i in 0..n.h.nr {
                    stack.push((n.child(i), depth + 1));
                }
            }
        }
        Ok(total)
    }

    /// Shares this tree: takes one reference on the root and returns a handle on the same root.
    /// O(1); the two trees part ways node by node as either is modified.
    pub fn clone_tree(&self, tm: &mut TransactionManager) -> Result<Self> {
        tm.inc(self.root)?;
        Ok(BTree::open(self.root))
    }

    /// Releases this tree's reference on its root; nodes whose count drops to zero are freed,
    /// and so is what their values reference (through the value type). Shared nodes are only
    /// decremented.
    pub fn delete(self, tm: &mut TransactionManager) -> Result<()> {
        tm.nested += 1;
        let r = Self::delete_from(tm, self.root);
        tm.nested -= 1;
        tm.poison_on_err(r)?;
        tm.after_change()
    }

    fn delete_from(tm: &mut TransactionManager, root: MetaBlock) -> Result<()> {
        let mut stack = vec![(root, 0usize)];
        while let Some((b, depth)) = stack.pop() {
            if depth >= MAX_DEPTH {
                return Err(too_deep(b));
            }
            if tm.ref_count(b)? > 1 {
                tm.dec(b)?;
                continue;
            }
            let data = Self::read(tm, b)?;
            let n = node_at(b, &data, V::SIZE)?;
            if n.h.leaf {
                let values: Vec<V::Value> = (0..n.h.nr).map(|i| V::unpack(n.value(i))).collect();
                drop(data);
                tm.dec(b)?;
                for v in values {
                    V::dec(tm, &v)?;
                }
            } else {
                for i in 0..n.h.nr {
                    stack.push((n.child(i), depth + 1));
                }
                drop(data);
                tm.dec(b)?;
            }
        }
        Ok(())
    }

    // ------------------------------------------------------------ modification helpers

    /// Makes node `b` writable; if it was shared, takes references on what it points at.
    fn shadow_node(tm: &mut TransactionManager, b: MetaBlock) -> Result<BlockMut> {
        let (guard, shared) = tm.shadow(b, &BTREE_NODE_VALIDATOR)?;
        if shared {
            let h = node::parse(guard.nr(), &guard, V::SIZE)?;
            let n = Node {
                nr: guard.nr(),
                data: &guard,
                h,
            };
            if h.leaf {
                let values: Vec<V::Value> = (0..h.nr).map(|i| V::unpack(n.value(i))).collect();
                for v in values {
                    V::inc(tm, &v)?;
                }
            } else {
                let children: Vec<MetaBlock> = (0..h.nr).map(|i| n.child(i)).collect();
                for c in children {
                    tm.inc(c)?;
                }
            }
        }
        Ok(guard)
    }

    /// Node `b`, already made writable in this operation, for another change in place. Its
    /// parent points at `b`, so getting a different block back would be a bookkeeping bug:
    /// report it rather than write through a stale pointer.
    fn write_lock(tm: &mut TransactionManager, b: MetaBlock) -> Result<BlockMut> {
        let (guard, _) = tm.shadow(b, &BTREE_NODE_VALIDATOR)?;
        if guard.nr() != b {
            return Err(Error::Internal(format!(
                "{b} moved while the tree was being changed"
            )));
        }
        Ok(guard)
    }

    fn vs(leaf: bool) -> usize {
        if leaf { V::SIZE } else { 8 }
    }

    /// Shadows the path to the leaf that holds (or would hold) `key`. Returns the path of
    /// (internal node, child index) pairs and the leaf, all writable.
    fn shadow_path(
        &mut self,
        tm: &mut TransactionManager,
        key: u64,
    ) -> Result<(Vec<(MetaBlock, usize)>, BlockMut)> {
        let mut path = Vec::new();
        let mut guard = Self::shadow_node(tm, self.root)?;
        self.root = guard.nr();
        loop {
            let h = node::parse(guard.nr(), &guard, V::SIZE)?;
            if h.leaf {
                return Ok((path, guard));
            }
            if path.len() >= MAX_DEPTH {
                return Err(too_deep(guard.nr()));
            }
            let n = Node {
                nr: guard.nr(),
                data: &guard,
                h,
            };
            let i = match n.lower_bound(key) {
                Some(i) => i,
                None => {
                    // The key goes below every key: lower the first separator.
                    node::set_key(&mut guard, &h, 0, key);
                    0
                }
            };
            let child = Node {
                nr: guard.nr(),
                data: &guard,
                h,
            }
            .child(i);
            let cg = Self::shadow_node(tm, child)?;
            if cg.nr() != child {
                node::set_value(&mut guard, &h, i, &cg.nr().0.to_le_bytes());
            }
            path.push((guard.nr(), i));
            guard = cg;
        }
    }

    /// Inserts or replaces the value under `key`. The tree takes over the caller's reference on
    /// what `value` references; a replaced value's reference is released. Returns the old value.
    pub fn insert(
        &mut self,
        tm: &mut TransactionManager,
        key: u64,
        value: &V::Value,
    ) -> Result<Option<V::Value>> {
        tm.nested += 1;
        let r = self.insert_inner(tm, key, value);
        tm.nested -= 1;
        let old = tm.poison_on_err(r)?;
        tm.after_change()?;
        Ok(old)
    }

    fn insert_inner(
        &mut self,
        tm: &mut TransactionManager,
        key: u64,
        value: &V::Value,
    ) -> Result<Option<V::Value>> {
        let mut packed = vec![0u8; V::SIZE];
        V::pack(value, &mut packed);
        let (path, mut leaf) = self.shadow_path(tm, key)?;
        let mut h = node::parse(leaf.nr(), &leaf, V::SIZE)?;
        let n = Node {
            nr: leaf.nr(),
            data: &leaf,
            h,
        };
        match n.search(key) {
            Ok(i) => {
                let old = V::unpack(n.value(i));
                node::set_value(&mut leaf, &h, i, &packed);
                drop(leaf);
                V::dec(tm, &old)?;
                Ok(Some(old))
            }
            Err(pos) if h.nr < h.max => {
                node::insert_at(&mut leaf, &mut h, pos, key, &packed);
                Ok(None)
            }
            Err(pos) => {
                let mut ents = n.entries();
                ents.insert(pos, key, &packed);
                let loc = leaf.nr();
                drop(leaf);
                self.overflow(tm, &path, loc, true, ents, pos)?;
                Ok(None)
            }
        }
    }

    /// Places `ents` (one more than a node holds) that belong in node `loc`, whose parents are
    /// `path`; `pos` is where the extra entry went.
    fn overflow(
        &mut self,
        tm: &mut TransactionManager,
        path: &[(MetaBlock, usize)],
        loc: MetaBlock,
        leaf: bool,
        ents: Entries,
        pos: usize,
    ) -> Result<()> {
        let max = node::max_entries(Self::vs(leaf));
        let min = max / 3;
        let append = pos + 1 == ents.len();
        let prepend = pos == 0;
        let Some((&(ploc, i), parent_path)) = path.split_last() else {
            return self.split_root(tm, loc, leaf, ents, append, prepend);
        };
        let mut parent = Self::write_lock(tm, ploc)?;
        let ph = node::parse(parent.nr(), &parent, V::SIZE)?;
        let pn = Node {
            nr: parent.nr(),
            data: &parent,
            h: ph,
        };
        let mut pents = pn.entries();
        let sibling_nr = |j: usize| -> Result<usize> {
            let c = pn.child(j);
            let d = Self::read(tm, c)?;
            Ok(node_at(c, &d, V::SIZE)?.h.nr)
        };
        let left = if i > 0 {
            Some(sibling_nr(i - 1)?)
        } else {
            None
        };
        let right = if i + 1 < ph.nr {
            Some(sibling_nr(i + 1)?)
        } else {
            None
        };
        let plan = if append && left.is_some_and(|l| l < max) {
            Plan::FillLeft
        } else if prepend && right.is_some_and(|r| r < max) {
            Plan::FillRight
        } else if append {
            Plan::SplitOne(max + 1 - min, min)
        } else if prepend {
            Plan::SplitOne(min, max + 1 - min)
        } else if left.is_some_and(|l| l < max) {
            Plan::EvenLeft
        } else if right.is_some_and(|r| r < max) {
            Plan::EvenRight
        } else if left.is_some() {
            Plan::SplitTwoLeft
        } else if right.is_some() {
            Plan::SplitTwoRight
        } else {
            Plan::SplitOne(ents.len() / 2, ents.len() - ents.len() / 2)
        };
        // The group of consecutive children being rewritten: (first child index, their blocks
        // with None for a new one, all their entries, sizes of the output nodes).
        let (first, mut blocks, all, sizes): (usize, Vec<Option<MetaBlock>>, Entries, Vec<usize>) =
            match plan {
                Plan::FillLeft | Plan::EvenLeft | Plan::SplitTwoLeft => {
                    let lg = Self::shadow_node(tm, pn.child(i - 1))?;
                    let lh = node::parse(lg.nr(), &lg, V::SIZE)?;
                    let mut all = Node {
                        nr: lg.nr(),
                        data: &lg,
                        h: lh,
                    }
                    .entries();
                    all.append(&ents);
                    let t = all.len();
                    let sizes = match plan {
                        Plan::FillLeft => vec![max, t - max],
                        Plan::EvenLeft => vec![t / 2, t - t / 2],
                        _ => vec![t / 3, t / 3, t - 2 * (t / 3)],
                    };
                    let mut blocks = vec![Some(lg.nr()), Some(loc)];
                    if sizes.len() == 3 {
                        blocks.push(None);
                    }
                    (i - 1, blocks, all, sizes)
                }
                Plan::FillRight | Plan::EvenRight | Plan::SplitTwoRight => {
                    let rg = Self::shadow_node(tm, pn.child(i + 1))?;
                    let rh = node::parse(rg.nr(), &rg, V::SIZE)?;
                    let mut all = ents.clone();
                    all.append(
                        &Node {
                            nr: rg.nr(),
                            data: &rg,
                            h: rh,
                        }
                        .entries(),
                    );
                    let t = all.len();
                    let sizes = match plan {
                        Plan::FillRight => vec![t - max, max],
                        Plan::EvenRight => vec![t / 2, t - t / 2],
                        _ => vec![t / 3, t / 3, t - 2 * (t / 3)],
                    };
                    let mut blocks = vec![Some(loc), Some(rg.nr())];
                    if sizes.len() == 3 {
                        blocks.insert(1, None);
                    }
                    (i, blocks, all, sizes)
                }
                Plan::SplitOne(a, b) => {
                    let blocks = if prepend {
                        vec![None, Some(loc)]
                    } else {
                        vec![Some(loc), None]
                    };
                    (i, blocks, ents.clone(), vec![a, b])
                }
            };
        // Write the output nodes.
        let n_in = blocks.iter().filter(|b| b.is_some()).count();
        let mut out = Entries::with_capacity(8, blocks.len());
        let mut at = 0;
        for (k, size) in sizes.iter().enumerate() {
            let part = all.slice(at, at + size);
            at += size;
            let mut g = match blocks[k] {
                Some(b) => Self::write_lock(tm, b)?,
                None => {
                    let g = tm.new_block(&BTREE_NODE_VALIDATOR)?;
                    blocks[k] = Some(g.nr());
                    g
                }
            };
            part.write_node(&mut g, leaf);
            let sep = if k == 0 {
                pents.keys[first].min(part.keys[0])
            } else {
                part.keys[0]
            };
            out.push(sep, &g.nr().0.to_le_bytes());
        }
        pents.splice(first, first + n_in, &out);
        let pmax = node::max_entries(8);
        if pents.len() <= pmax {
            pents.write_node(&mut parent, false);
            return Ok(());
        }
        // The parent overflows by one: the new child's entry is the extra one.
        let added = match plan {
            Plan::SplitOne(..) if prepend => first,
            Plan::SplitOne(..) => first + 1,
            Plan::SplitTwoLeft => first + 2,
            Plan::SplitTwoRight => first + 1,
            _ => first,
        };
        drop(parent);
        self.overflow(tm, parent_path, ploc, false, pents, added)
    }

    /// The root is full: its entries move into two new children and it becomes an internal node
    /// above them (the root keeps its block).
    fn split_root(
        &mut self,
        tm: &mut TransactionManager,
        loc: MetaBlock,
        leaf: bool,
        ents: Entries,
        append: bool,
        prepend: bool,
    ) -> Result<()> {
        let max = node::max_entries(Self::vs(leaf));
        let min = max / 3;
        let t = ents.len();
        let left_size = if append {
            t - min
        } else if prepend {
            min
        } else {
            t / 2
        };
        let mut out = Entries::with_capacity(8, 2);
        for part in [ents.slice(0, left_size), ents.slice(left_size, t)] {
            let mut g = tm.new_block(&BTREE_NODE_VALIDATOR)?;
            part.write_node(&mut g, leaf);
            out.push(part.keys[0], &g.nr().0.to_le_bytes());
        }
        let mut root = Self::write_lock(tm, loc)?;
        out.write_node(&mut root, false);
        self.root = root.nr();
        Ok(())
    }

    /// Replaces the value under `key` through `f`, **without** touching reference counts: for
    /// values that are moved rather than copied, such as the root of a subtree that `f` modifies
    /// (shadowing moved the subtree's reference from its old root to its new one). The path to
    /// the value is made writable *before* `f` runs, so a shared path is copied with the old value
    /// counted correctly. Returns `None` (and does not call `f`) if `key` is absent.
    pub fn update_value<R>(
        &mut self,
        tm: &mut TransactionManager,
        key: u64,
        f: impl FnOnce(&mut TransactionManager, &mut V::Value) -> Result<R>,
    ) -> Result<Option<R>> {
        if self.lookup(tm, key)?.is_none() {
            return Ok(None);
        }
        tm.nested += 1;
        let r = (|| {
            let (_, leaf) = self.shadow_path(tm, key)?;
            let h = node::parse(leaf.nr(), &leaf, V::SIZE)?;
            let n = Node {
                nr: leaf.nr(),
                data: &leaf,
                h,
            };
            let Ok(i) = n.search(key) else {
                return Err(Error::Internal(format!(
                    "key {key} vanished from {}",
                    leaf.nr()
                )));
            };
            let mut v = V::unpack(n.value(i));
            drop(leaf);
            let out = f(tm, &mut v)?;
            // Find the value again rather than trusting the old position: cheap (the path is
            // writable already, nothing is copied) and right even if `f` changed this tree.
            let (_, mut leaf) = self.shadow_path(tm, key)?;
            let h = node::parse(leaf.nr(), &leaf, V::SIZE)?;
            let found = Node {
                nr: leaf.nr(),
                data: &leaf,
                h,
            }
            .search(key);
            let Ok(i) = found else {
                return Err(Error::Internal(format!(
                    "key {key} vanished while its value was updated"
                )));
            };
            let mut packed = vec![0u8; V::SIZE];
            V::pack(&v, &mut packed);
            node::set_value(&mut leaf, &h, i, &packed);
            Ok(out)
        })();
        tm.nested -= 1;
        let out = tm.poison_on_err(r)?;
        tm.after_change()?;
        Ok(Some(out))
    }

    /// Removes `key`; its value's reference is released. Returns the removed value.
    pub fn remove(&mut self, tm: &mut TransactionManager, key: u64) -> Result<Option<V::Value>> {
        if self.lookup(tm, key)?.is_none() {
            return Ok(None);
        }
        let mut removed = None;
        tm.nested += 1;
        let r = self.remove_leaf_run(tm, key, key.saturating_add(1), &mut |_, v| {
            removed = Some(v.clone());
        });
        tm.nested -= 1;
        tm.poison_on_err(r)?;
        tm.after_change()?;
        Ok(removed)
    }

    /// Removes every entry with a key in `range`, calling `on_removed(key, value)` for each after
    /// its reference was released. Returns how many were removed.
    pub fn remove_range(
        &mut self,
        tm: &mut TransactionManager,
        range: impl RangeBounds<u64>,
        mut on_removed: impl FnMut(u64, &V::Value),
    ) -> Result<u64> {
        let mut lo = match range.start_bound() {
            Bound::Included(&k) => k,
            Bound::Excluded(&k) => match k.checked_add(1) {
                Some(k) => k,
                None => return Ok(0),
            },
            Bound::Unbounded => 0,
        };
        // Exclusive end; `None` means up to and including u64::MAX.
        let hi: Option<u64> = match range.end_bound() {
            Bound::Included(&k) => k.checked_add(1),
            Bound::Excluded(&k) => Some(k),
            Bound::Unbounded => None,
        };
        let mut total = 0u64;
        loop {
            let Some((k, _)) = self.lookup_ge(tm, lo)? else {
                break;
            };
            if hi.is_some_and(|h| k >= h) {
                break;
            }
            let mut last = k;
            let mut n = 0u64;
            // Keys below `to` go; u64::MAX (only reachable with an open end) is removed alone.
            let (from, to) = if k == u64::MAX {
                (k, k)
            } else {
                (k, hi.unwrap_or(u64::MAX))
            };
            tm.nested += 1;
            let r = self.remove_leaf_run(tm, from, to, &mut |key, v| {
                last = key;
                n += 1;
                on_removed(key, v);
            });
            tm.nested -= 1;
            tm.poison_on_err(r)?;
            total += n;
            tm.after_change()?;
            if n == 0 {
                let e = Error::Internal(format!("range removal made no progress at key {k}"));
                return tm.poison_on_err(Err(e));
            }
            match last.checked_add(1) {
                Some(next) => lo = next,
                None => break,
            }
        }
        Ok(total)
    }

    /// Removes, from the leaf holding `from` (which exists), the run of entries with keys in
    /// `from..to` (`to == u64::MAX` with `from == u64::MAX` removes just that key), then restores
    /// the minimum fill on the way up.
    fn remove_leaf_run(
        &mut self,
        tm: &mut TransactionManager,
        from: u64,
        to: u64,
        on_removed: &mut dyn FnMut(u64, &V::Value),
    ) -> Result<()> {
        let (path, mut leaf) = self.shadow_path(tm, from)?;
        let mut h = node::parse(leaf.nr(), &leaf, V::SIZE)?;
        let n = Node {
            nr: leaf.nr(),
            data: &leaf,
            h,
        };
        let start = match n.search(from) {
            Ok(i) | Err(i) => i,
        };
        let mut end = start;
        while end < h.nr && (n.key(end) < to || (from == u64::MAX && n.key(end) == u64::MAX)) {
            end += 1;
        }
        let removed: Vec<(u64, V::Value)> = (start..end)
            .map(|i| (n.key(i), V::unpack(n.value(i))))
            .collect();
        node::remove_range(&mut leaf, &mut h, start, end);
        let loc = leaf.nr();
        drop(leaf);
        for (k, v) in &removed {
            V::dec(tm, v)?;
            on_removed(*k, v);
        }
        self.rebalance_up(tm, path, loc)
    }

    /// Restores the minimum fill of `loc` and its ancestors after removals.
    fn rebalance_up(
        &mut self,
        tm: &mut TransactionManager,
        mut path: Vec<(MetaBlock, usize)>,
        mut loc: MetaBlock,
    ) -> Result<()> {
        loop {
            let Some((ploc, i)) = path.pop() else {
                return self.collapse_root(tm);
            };
            let nh = {
                let d = Self::read(tm, loc)?;
                node_at(loc, &d, V::SIZE)?.h
            };
            if nh.nr >= nh.min() {
                return self.collapse_root(tm);
            }
            let mut parent = Self::write_lock(tm, ploc)?;
            let ph = node::parse(parent.nr(), &parent, V::SIZE)?;
            if ph.nr < 2 {
                // Only the root can have a single child; collapsing makes the child the root.
                drop(parent);
                return self.collapse_root(tm);
            }
            let pn = Node {
                nr: parent.nr(),
                data: &parent,
                h: ph,
            };
            let mut pents = pn.entries();
            let (li, ri) = if i > 0 { (i - 1, i) } else { (i, i + 1) };
            let lg = Self::shadow_node(tm, pn.child(li))?;
            let rg = Self::shadow_node(tm, pn.child(ri))?;
            let lh = node::parse(lg.nr(), &lg, V::SIZE)?;
            let rh = node::parse(rg.nr(), &rg, V::SIZE)?;
            let mut all = Node {
                nr: lg.nr(),
                data: &lg,
                h: lh,
            }
            .entries();
            all.append(
                &Node {
                    nr: rg.nr(),
                    data: &rg,
                    h: rh,
                }
                .entries(),
            );
            let (lnr, rnr) = (lg.nr(), rg.nr());
            let mut lg = lg;
            let mut rg = rg;
            if all.len() <= lh.max {
                all.write_node(&mut lg, lh.leaf);
                drop(lg);
                drop(rg);
                tm.dec(rnr)?;
                let mut sep = Entries::with_capacity(8, 1);
                sep.push(pents.keys[li], &lnr.0.to_le_bytes());
                pents.splice(li, ri + 1, &sep);
            } else {
                let half = all.len() / 2;
                let (a, b) = (all.slice(0, half), all.slice(half, all.len()));
                a.write_node(&mut lg, lh.leaf);
                b.write_node(&mut rg, rh.leaf);
                let mut seps = Entries::with_capacity(8, 2);
                seps.push(pents.keys[li], &lnr.0.to_le_bytes());
                seps.push(b.keys[0], &rnr.0.to_le_bytes());
                pents.splice(li, ri + 1, &seps);
            }
            pents.write_node(&mut parent, false);
            loc = parent.nr();
        }
    }

    /// While the root is an internal node with one child, that child becomes the root.
    fn collapse_root(&mut self, tm: &mut TransactionManager) -> Result<()> {
        for _ in 0..MAX_DEPTH {
            let d = Self::read(tm, self.root)?;
            let n = node_at(self.root, &d, V::SIZE)?;
            if n.h.leaf || n.h.nr != 1 {
                return Ok(());
            }
            let child = n.child(0);
            let old = self.root;
            drop(d);
            // The root's reference on the child passes to the tree handle; free the old root
            // without touching what it pointed at.
            tm.dec(old)?;
            self.root = child;
        }
        Err(too_deep(self.root))
    }
}

/// Ordered iteration over a key range; see [`BTree::iter`]. Yields `Err` once and stops if a
/// block cannot be read.
pub struct Iter<'a, V: ValueType> {
    tm: &'a TransactionManager,
    /// (node, index of the next entry or child to visit).
    stack: Vec<(BlockRef, Hdr, usize)>,
    end: Bound<u64>,
    start: Option<(MetaBlock, Bound<u64>)>,
    done: bool,
    _v: PhantomData<fn() -> V>,
}

impl<'a, V: ValueType> Iter<'a, V> {
    fn new(
        tm: &'a TransactionManager,
        root: MetaBlock,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Self {
        Iter {
            tm,
            stack: Vec::new(),
            end,
            start: Some((root, start)),
            done: false,
            _v: PhantomData,
        }
    }

    fn push(&mut self, b: MetaBlock) -> Result<Hdr> {
        if self.stack.len() >= MAX_DEPTH {
            return Err(too_deep(b));
        }
        let data = self.tm.read(b, &BTREE_NODE_VALIDATOR)?;
        let h = node::parse(b, &data, V::SIZE)?;
        self.stack.push((data, h, 0));
        Ok(h)
    }

    /// Descends from `root` to the first entry not below `start`.
    fn seek(&mut self, root: MetaBlock, start: Bound<u64>) -> Result<()> {
        let key = match start {
            Bound::Included(k) | Bound::Excluded(k) => Some(k),
            Bound::Unbounded => None,
        };
        let mut b = root;
        loop {
            let h = self.push(b)?;
            let Some((data, _, idx)) = self.stack.last_mut() else {
                return Err(Error::Internal("iterator stack empty".into()));
            };
            let n = Node { nr: b, data, h };
            if h.leaf {
                if let Some(k) = key {
                    *idx = match n.search(k) {
                        Ok(i) if matches!(start, Bound::Excluded(_)) => i + 1,
                        Ok(i) | Err(i) => i,
                    };
                }
                return Ok(());
            }
            let i = key.and_then(|k| n.lower_bound(k)).unwrap_or(0);
            *idx = i + 1;
            b = n.child(i);
        }
    }

    fn advance(&mut self) -> Result<Option<(u64, V::Value)>> {
        if let Some((root, start)) = self.start.take() {
            self.seek(root, start)?;
        }
        loop {
            let Some((data, h, idx)) = self.stack.last_mut() else {
                return Ok(None);
            };
            let n = Node {
                nr: data.nr(),
                data,
                h: *h,
            };
            if h.leaf {
                if *idx < h.nr {
                    let i = *idx;
                    *idx += 1;
                    let k = n.key(i);
                    let in_range = match self.end {
                        Bound::Included(e) => k <= e,
                        Bound::Excluded(e) => k < e,
                        Bound::Unbounded => true,
                    };
                    if !in_range {
                        return Ok(None);
                    }
                    return Ok(Some((k, V::unpack(n.value(i)))));
                }
                self.stack.pop();
                continue;
            }
            if *idx < h.nr {
                let child = n.child(*idx);
                *idx += 1;
                self.push(child)?;
            } else {
                self.stack.pop();
            }
        }
    }
}

impl<V: ValueType> Iterator for Iter<'_, V> {
    type Item = Result<(u64, V::Value)>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.done {
            return None;
        }
        match self.advance() {
            Ok(Some(x)) => Some(Ok(x)),
            Ok(None) => {
                self.done = true;
                None
            }
            Err(e) => {
                self.done = true;
                Some(Err(e))
            }
        }
    }
}
