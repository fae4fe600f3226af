//! When is "owned alone" safe to write in place? (DESIGN invariant 7 across a crash.)
//!
//! The pool's lookup says exactly whether a block is shared in the *open* transaction. That is
//! not enough: a crash brings back the *last committed* transaction, so a block may be written
//! in place only if no other device maps it there either. Example (found by the crash test):
//! origin O and snapshot S share block B in the last commit; S writes B and copies it, so B's
//! count drops to 1 in the open transaction; O's lookup now says "owned alone"; if O wrote B in
//! place and the power failed before the next commit, S would come back mapping B — with O's
//! data in it.
//!
//! The exact rule, argued in docs/volume.md ("Writing in place"): a lookup's "owned alone" for
//! block B is safe unless B lost a reference in the open transaction. Within one transaction
//! the data path only ever (a) maps freshly reserved blocks, which were free in the last
//! commit, (b) replaces a mapping (the pool returns the replaced block) and (c) unmaps ranges.
//! Snapshots, creates and deletes commit before and after themselves, so they never fall inside
//! an open transaction. A reference to B held by another device in the last commit can only
//! have gone away through (b) or (c), and either way B passes through [`LessShared::note`].
//!
//! The set lives only for one transaction (cleared by each commit), so it holds at most what
//! one second of remaps and discards touched; past [`LIMIT`] blocks it gives up and distrusts
//! every lookup until the next commit (what the earlier, blunt rule always did).

use std::collections::HashSet;

use crate::units::DataBlock;

/// Most blocks remembered per transaction before falling back to distrusting every lookup.
pub(crate) const LIMIT: usize = 1 << 18;

/// Blocks that lost a reference in the open transaction; see the module docs. Changed under
/// the pool's write lock, read under its read lock.
#[derive(Debug, Default)]
pub(crate) struct LessShared {
    blocks: HashSet<DataBlock>,
    /// More than [`LIMIT`] blocks lost a reference: trust no lookup until the next commit.
    overflowed: bool,
}

impl LessShared {
    /// `block` lost a reference in the open transaction (a copy-on-write remap away from it, or
    /// a discard of a mapping to it).
    pub(crate) fn note(&mut self, block: DataBlock) {
        if self.overflowed {
            return;
        }
        if self.blocks.len() >= LIMIT {
            self.distrust_all();
            return;
        }
        self.blocks.insert(block);
    }

    /// `block`, a reservation (free in both the committed and the current space map), is
    /// mapped now. References it lost earlier in the open transaction (a volume wrote it,
    /// then discarded it) were not in the last commit, which has it free: no device can come
    /// back mapping it after a crash, so it is owned alone like any fresh block.
    pub(crate) fn mapped_fresh(&mut self, block: DataBlock) {
        self.blocks.remove(&block);
    }

    /// Some unknown blocks lost references: trust no lookup until the next commit.
    pub(crate) fn distrust_all(&mut self) {
        self.overflowed = true;
        self.blocks = HashSet::new();
    }

    /// Whether a lookup's "owned alone" for `block` also holds in the last commit.
    pub(crate) fn trusts(&self, block: DataBlock) -> bool {
        !self.overflowed && !self.blocks.contains(&block)
    }

    /// The open transaction was committed: what it unshared is now the durable state.
    pub(crate) fn committed(&mut self) {
        self.overflowed = false;
        if self.blocks.capacity() > 4096 {
            self.blocks = HashSet::new();
        } else {
            self.blocks.clear();
        }
    }

    /// Number of blocks remembered (tests).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fresh_mapping_is_trusted_again_unless_overflowed() {
        let mut s = LessShared::default();
        s.note(DataBlock(3));
        assert!(!s.trusts(DataBlock(3)));
        s.mapped_fresh(DataBlock(3));
        assert!(s.trusts(DataBlock(3)));
        s.distrust_all();
        s.mapped_fresh(DataBlock(3));
        assert!(!s.trusts(DataBlock(3)));
    }

    #[test]
    fn remembers_until_commit_and_overflows_to_distrust() {
        let mut s = LessShared::default();
        assert!(s.trusts(DataBlock(1)));
        s.note(DataBlock(1));
        assert!(!s.trusts(DataBlock(1)));
        assert!(s.trusts(DataBlock(2)));
        s.committed();
        assert!(s.trusts(DataBlock(1)));
        for b in 0..LIMIT as u64 + 1 {
            s.note(DataBlock(b));
        }
        assert_eq!(s.len(), 0);
        assert!(
            !s.trusts(DataBlock(u64::MAX)),
            "overflowed: nothing trusted"
        );
        s.committed();
        assert!(s.trusts(DataBlock(u64::MAX)));
    }
}
