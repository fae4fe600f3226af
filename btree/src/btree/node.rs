//! dm's B-tree node: byte layout, parsing (never trusting a header field) and entry edits.
//!
//! ```text
//! offset          size             field
//!      0             4             csum         le32, dm checksum with xor 121107 over bytes 4..4096
//!      4             4             flags        le32: 1 = INTERNAL, 2 = LEAF (exactly one)
//!      8             8             blocknr      le64: this block's number
//!     16             4             nr_entries   le32
//!     20             4             max_entries  le32: 3 * ((4096 - 32) / (8 + value_size) / 3)
//!     24             4             value_size   le32: 8 in internal nodes (child block numbers)
//!     28             4             padding
//!     32     8*max_entries         keys         le64 each, strictly increasing
//!  32+8*max  vs*max_entries        values       value_size bytes each
//! ```
//!
//! In an internal node `key[i]` is a lower bound of every key in child `i` and greater than
//! every key of child `i-1`; values are le64 child block numbers. A node other than a tree's
//! root holds at least `max_entries / 3` entries (thin_check refuses fewer).

use crate::checksum::{read_le32, read_le64, write_le32, write_le64};
use crate::error::{BlockKind, Error, Result};
use crate::{BLOCK_SIZE, Block, MetaBlock};

pub(crate) const HEADER_SIZE: usize = 32;
pub(crate) const INTERNAL_FLAG: u32 = 1;
pub(crate) const LEAF_FLAG: u32 = 2;
const NR_ENTRIES_OFF: usize = 16;

/// Largest number of entries dm puts in a node whose values are `value_size` bytes.
pub const fn max_entries(value_size: usize) -> usize {
    let n = (BLOCK_SIZE - HEADER_SIZE) / (8 + value_size);
    3 * (n / 3)
}

/// The parsed, checked header of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hdr {
    pub leaf: bool,
    pub nr: usize,
    pub max: usize,
    pub vs: usize,
}

impl Hdr {
    pub fn min(&self) -> usize {
        self.max / 3
    }
    fn key_off(&self, i: usize) -> usize {
        HEADER_SIZE + 8 * i
    }
    fn val_off(&self, i: usize) -> usize {
        HEADER_SIZE + 8 * self.max + self.vs * i
    }
}

/// Parses and checks the header of node `nr` whose leaves should hold `leaf_vs`-byte values.
/// Every field used for indexing is checked here, so later accesses stay in bounds.
pub(crate) fn parse(nr: MetaBlock, data: &Block, leaf_vs: usize) -> Result<Hdr> {
    let bad = |reason: String| Error::malformed(nr, BlockKind::BTreeNode, reason);
    let flags = read_le32(data, 4);
    let leaf = match flags {
        LEAF_FLAG => true,
        INTERNAL_FLAG => false,
        f => return Err(bad(format!("flags {f:#x} are neither INTERNAL nor LEAF"))),
    };
    let n = read_le32(data, NR_ENTRIES_OFF) as usize;
    let max = read_le32(data, 20) as usize;
    let vs = read_le32(data, 24) as usize;
    let want_vs = if leaf { leaf_vs } else { 8 };
    if vs != want_vs {
        return Err(bad(format!(
            "value size {vs}, expected {want_vs} (not the tree this reference should point to)"
        )));
    }
    if max != max_entries(vs) || max < 3 {
        return Err(bad(format!(
            "max_entries {max}, expected {} for {vs}-byte values",
            max_entries(vs)
        )));
    }
    if n > max {
        return Err(bad(format!("nr_entries {n} exceeds max_entries {max}")));
    }
    if !leaf && n == 0 {
        return Err(bad("internal node without entries".into()));
    }
    Ok(Hdr {
        leaf,
        nr: n,
        max,
        vs,
    })
}

/// Read access to a parsed node.
#[derive(Clone, Copy)]
pub(crate) struct Node<'a> {
    /// Where the node lives (for error messages and debugging).
    #[allow(dead_code)]
    pub nr: MetaBlock,
    pub data: &'a Block,
    pub h: Hdr,
}

impl<'a> Node<'a> {
    pub fn new(nr: MetaBlock, data: &'a Block, leaf_vs: usize) -> Result<Self> {
        let h = parse(nr, data, leaf_vs)?;
        Ok(Node { nr, data, h })
    }

    pub fn key(&self, i: usize) -> u64 {
        read_le64(self.data, self.h.key_off(i))
    }

    pub fn value(&self, i: usize) -> &'a [u8] {
        let off = self.h.val_off(i);
        &self.data[off..off + self.h.vs]
    }

    /// Child `i` of an internal node.
    pub fn child(&self, i: usize) -> MetaBlock {
        MetaBlock(read_le64(self.data, self.h.val_off(i)))
    }

    /// Binary search: `Ok(i)` if `key[i] == key`, else `Err(insertion position)`.
    pub fn search(&self, key: u64) -> std::result::Result<usize, usize> {
        let (mut lo, mut hi) = (0, self.h.nr);
        while lo < hi {
            let mid = (lo + hi) / 2;
            let k = self.key(mid);
            if k == key {
                return Ok(mid);
            }
            if k < key {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        Err(lo)
    }

    /// Index of the largest key <= `key` (the child to descend into), if any.
    pub fn lower_bound(&self, key: u64) -> Option<usize> {
        match self.search(key) {
            Ok(i) => Some(i),
            Err(0) => None,
            Err(i) => Some(i - 1),
        }
    }

    pub fn entries(&self) -> Entries {
        let mut e = Entries::with_capacity(self.h.vs, self.h.nr + 1);
        for i in 0..self.h.nr {
            e.keys.push(self.key(i));
        }
        e.vals
            .extend_from_slice(&self.data[self.h.val_off(0)..self.h.val_off(self.h.nr)]);
        e
    }
}

/// Writes the header of an empty node.
pub(crate) fn init(data: &mut Block, leaf: bool, vs: usize) {
    write_le32(data, 4, if leaf { LEAF_FLAG } else { INTERNAL_FLAG });
    write_le32(data, NR_ENTRIES_OFF, 0);
    write_le32(data, 20, max_entries(vs) as u32);
    write_le32(data, 24, vs as u32);
    write_le32(data, 28, 0);
}

pub(crate) fn set_key(data: &mut Block, h: &Hdr, i: usize, key: u64) {
    write_le64(data, h.key_off(i), key);
}

pub(crate) fn set_value(data: &mut Block, h: &Hdr, i: usize, v: &[u8]) {
    let off = h.val_off(i);
    data[off..off + h.vs].copy_from_slice(v);
}

/// Inserts an entry at `pos`; the caller checked `h.nr < h.max`. Updates `h`.
pub(crate) fn insert_at(data: &mut Block, h: &mut Hdr, pos: usize, key: u64, v: &[u8]) {
    let nr = h.nr;
    data.copy_within(h.key_off(pos)..h.key_off(nr), h.key_off(pos + 1));
    data.copy_within(h.val_off(pos)..h.val_off(nr), h.val_off(pos + 1));
    set_key(data, h, pos, key);
    set_value(data, h, pos, v);
    h.nr += 1;
    write_le32(data, NR_ENTRIES_OFF, h.nr as u32);
}

/// Removes entries `from..to`. Updates `h`.
pub(crate) fn remove_range(data: &mut Block, h: &mut Hdr, from: usize, to: usize) {
    let nr = h.nr;
    data.copy_within(h.key_off(to)..h.key_off(nr), h.key_off(from));
    data.copy_within(h.val_off(to)..h.val_off(nr), h.val_off(from));
    h.nr -= to - from;
    write_le32(data, NR_ENTRIES_OFF, h.nr as u32);
}

/// Keys and packed values of some entries, for restructuring nodes.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entries {
    pub vs: usize,
    pub keys: Vec<u64>,
    pub vals: Vec<u8>,
}

impl Entries {
    pub fn with_capacity(vs: usize, n: usize) -> Self {
        Entries {
            vs,
            keys: Vec::with_capacity(n),
            vals: Vec::with_capacity(n * vs),
        }
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn insert(&mut self, pos: usize, key: u64, v: &[u8]) {
        self.keys.insert(pos, key);
        let off = pos * self.vs;
        self.vals.splice(off..off, v.iter().copied());
    }

    pub fn push(&mut self, key: u64, v: &[u8]) {
        self.keys.push(key);
        self.vals.extend_from_slice(v);
    }

    pub fn append(&mut self, other: &Entries) {
        self.keys.extend_from_slice(&other.keys);
        self.vals.extend_from_slice(&other.vals);
    }

    /// Entries `r`.
    pub fn slice(&self, from: usize, to: usize) -> Entries {
        Entries {
            vs: self.vs,
            keys: self.keys[from..to].to_vec(),
            vals: self.vals[from * self.vs..to * self.vs].to_vec(),
        }
    }

    /// Replaces entries `from..to` with `with`.
    pub fn splice(&mut self, from: usize, to: usize, with: &Entries) {
        self.keys.splice(from..to, with.keys.iter().copied());
        self.vals
            .splice(from * self.vs..to * self.vs, with.vals.iter().copied());
    }

    /// Writes these entries as the whole content of a node (header included; the checksum and
    /// block number are filled in when the block is written).
    pub fn write_node(&self, data: &mut Block, leaf: bool) {
        init(data, leaf, self.vs);
        let h = Hdr {
            leaf,
            nr: self.len(),
            max: max_entries(self.vs),
            vs: self.vs,
        };
        for (i, k) in self.keys.iter().enumerate() {
            set_key(data, &h, i, *k);
        }
        let voff = h.val_off(0);
        data[voff..voff + self.vals.len()].copy_from_slice(&self.vals);
        // Clear the unused tails so identical trees give identical blocks.
        data[h.key_off(self.len())..voff].fill(0);
        let end = h.val_off(h.max);
        data[voff + self.vals.len()..end].fill(0);
        data[end..].fill(0);
        write_le32(data, NR_ENTRIES_OFF, self.len() as u32);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_entries_matches_dm() {
        assert_eq!(max_entries(8), 252);
        assert_eq!(max_entries(4), 336);
        assert_eq!(max_entries(16), 168);
        assert_eq!(max_entries(24), 126);
    }

    #[test]
    fn edit_and_parse() {
        let mut b = [0u8; BLOCK_SIZE];
        init(&mut b, true, 8);
        let mut h = parse(MetaBlock(1), &b, 8).unwrap();
        for k in [5u64, 1, 9, 3] {
            let pos = Node {
                nr: MetaBlock(1),
                data: &b,
                h,
            }
            .search(k)
            .unwrap_err();
            insert_at(&mut b, &mut h, pos, k, &(k * 10).to_le_bytes());
        }
        let n = Node::new(MetaBlock(1), &b, 8).unwrap();
        assert_eq!(
            (0..4).map(|i| n.key(i)).collect::<Vec<_>>(),
            vec![1, 3, 5, 9]
        );
        assert_eq!(n.value(2), &50u64.to_le_bytes());
        assert_eq!(n.lower_bound(4), Some(1));
        assert_eq!(n.lower_bound(0), None);
        remove_range(&mut b, &mut h, 1, 3);
        let n = Node::new(MetaBlock(1), &b, 8).unwrap();
        assert_eq!(n.h.nr, 2);
        assert_eq!(n.key(1), 9);
        assert!(parse(MetaBlock(1), &b, 16).is_err());
        write_le32(&mut b, 4, 3);
        assert!(parse(MetaBlock(1), &b, 8).is_err());
    }
}
