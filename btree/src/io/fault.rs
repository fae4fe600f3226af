//! A block device in memory that models power loss and I/O errors, for crash tests (this crate's
//! and those of the layers above it).
//!
//! The model of durability is explicit:
//! - a write that completed is visible to later reads at once, but only *pending* until the
//!   next [`BlockIo::sync`] returns; a sync makes every pending write durable;
//! - at a power loss, each pending write independently either reached the disk, did not, or was
//!   **torn**: any subset of its eight 512-byte sectors reached the disk (a sector itself is
//!   atomic). Writes may reach the disk in any order, so an older write to a block can survive
//!   while a newer one to the same block is lost. [`WriteFate`] describes one write's outcome;
//! - reads, writes and syncs can be made to fail with EIO ([`FailRule`]).
//!
//! Two ways to get crash images:
//! - [`FaultyIo::crash_image`]: "power is lost now", with a fate for each pending write;
//! - record a whole workload ([`FaultyIo::recording`]) and enumerate every sync point afterwards
//!   with [`History::epochs`]: epoch *k* is the durable image after *k* syncs plus the writes
//!   issued before the next sync, and [`Epoch::crash_image`] applies fates to those.
//!
//! Images are [`MemIo`]s sharing unchanged blocks, so thousands of them are cheap.

use super::mem::ImageBlocks;
use super::{BlockIo, MemIo, out_of_range};
use crate::{BLOCK_SIZE, Block, MetaBlock};
use parking_lot::Mutex;
use std::io;
use std::sync::Arc;

/// Size of the unit a disk writes atomically.
pub const SECTOR_SIZE: usize = 512;
/// Sectors in one metadata block.
pub const SECTORS_PER_BLOCK: usize = BLOCK_SIZE / SECTOR_SIZE;

/// What became of one unsynced write at a power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFate {
    /// Nothing of it reached the disk.
    Lost,
    /// All of it reached the disk.
    Written,
    /// Only the sectors whose bit is set (bit *i* = bytes `512*i .. 512*(i+1)`) reached the disk.
    Torn(u8),
}

/// The kind of call a [`FailRule`] applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoOp {
    /// [`BlockIo::read`].
    Read,
    /// [`BlockIo::write`].
    Write,
    /// [`BlockIo::sync`].
    Sync,
}

/// Makes chosen calls fail with EIO: skip the first `skip` matching calls, then fail the next
/// `count` (`u64::MAX` for ever). A rule with `block` set matches only reads/writes of that block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FailRule {
    /// Which calls.
    pub op: IoOp,
    /// Only this block (ignored for syncs).
    pub block: Option<MetaBlock>,
    /// Matching calls to let through first.
    pub skip: u64,
    /// Matching calls to fail after that.
    pub count: u64,
}

impl FailRule {
    /// Fails the `n`-th matching call from now (0 = the next one), once.
    pub fn nth(op: IoOp, n: u64) -> Self {
        FailRule {
            op,
            block: None,
            skip: n,
            count: 1,
        }
    }

    /// Fails every matching call from now on.
    pub fn always(op: IoOp) -> Self {
        FailRule {
            op,
            block: None,
            skip: 0,
            count: u64::MAX,
        }
    }
}

/// How many calls of each kind the device has served (failed ones included).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OpCounts {
    /// Reads.
    pub reads: u64,
    /// Writes.
    pub writes: u64,
    /// Syncs.
    pub syncs: u64,
}

#[derive(Debug, Clone)]
enum LoggedOp {
    Write(u64, Arc<Block>),
    Sync,
}

#[derive(Debug)]
struct State {
    durable: ImageBlocks,
    current: ImageBlocks,
    pending: Vec<(u64, Arc<Block>)>,
    counts: OpCounts,
    rules: Vec<FailRule>,
    log: Option<(ImageBlocks, Vec<LoggedOp>)>,
}

/// The fault-injecting, power-loss-modelling device. See the module documentation.
#[derive(Debug)]
pub struct FaultyIo {
    state: Mutex<State>,
}

impl FaultyIo {
    /// A zero-filled device of `nr_blocks` blocks, all of it durable.
    pub fn new(nr_blocks: u64) -> Self {
        Self::from_image(&MemIo::new(nr_blocks))
    }

    /// A device whose durable contents are those of `image` now.
    pub fn from_image(image: &MemIo) -> Self {
        let blocks = image.snapshot_blocks();
        FaultyIo {
            state: Mutex::new(State {
                durable: blocks.clone(),
                current: blocks,
                pending: Vec::new(),
                counts: OpCounts::default(),
                rules: Vec::new(),
                log: None,
            }),
        }
    }

    /// Like [`FaultyIo::from_image`], and records every write and sync from now on so that
    /// [`FaultyIo::history`] can enumerate the crash states of the whole workload afterwards.
    pub fn recording(image: &MemIo) -> Self {
        let io = Self::from_image(image);
        {
            let mut st = io.state.lock();
            let initial = st.durable.clone();
            st.log = Some((initial, Vec::new()));
        }
        io
    }

    /// Adds an EIO rule.
    pub fn inject(&self, rule: FailRule) {
        self.state.lock().rules.push(rule);
    }

    /// Removes every EIO rule.
    pub fn clear_faults(&self) {
        self.state.lock().rules.clear();
    }

    /// Calls served so far.
    pub fn counts(&self) -> OpCounts {
        self.state.lock().counts
    }

    /// Number of writes since the last sync (what a power loss now could lose or tear).
    pub fn pending_writes(&self) -> usize {
        self.state.lock().pending.len()
    }

    /// The blocks of the writes since the last sync, in the order they were issued.
    pub fn pending_blocks(&self) -> Vec<MetaBlock> {
        self.state
            .lock()
            .pending
            .iter()
            .map(|(b, _)| MetaBlock(*b))
            .collect()
    }

    /// What the disk holds after a power loss now in which every pending write was lost.
    pub fn durable_image(&self) -> MemIo {
        MemIo::from_blocks(self.state.lock().durable.clone())
    }

    /// What the disk holds after a power loss now: `fates[i]` is what became of the `i`-th
    /// pending write (missing entries count as [`WriteFate::Lost`]).
    pub fn crash_image(&self, fates: &[WriteFate]) -> MemIo {
        let st = self.state.lock();
        MemIo::from_blocks(apply_fates(&st.durable, &st.pending, fates))
    }

    /// The recorded workload. Empty (no epochs beyond the initial one) unless the device was
    /// made with [`FaultyIo::recording`].
    pub fn history(&self) -> History {
        let st = self.state.lock();
        match &st.log {
            Some((initial, ops)) => History {
                initial: initial.clone(),
                ops: ops.clone(),
            },
            None => History {
                initial: st.durable.clone(),
                ops: Vec::new(),
            },
        }
    }

    fn should_fail(st: &mut State, op: IoOp, block: Option<u64>) -> bool {
        let mut fail = false;
        for rule in st.rules.iter_mut() {
            if rule.op != op {
                continue;
            }
            if let (Some(want), Some(b)) = (rule.block, block)
                && want.0 != b
            {
                continue;
            }
            if rule.skip > 0 {
                rule.skip -= 1;
            } else if rule.count > 0 {
                if rule.count != u64::MAX {
                    rule.count -= 1;
                }
                fail = true;
            }
        }
        fail
    }
}

fn eio(what: &str) -> io::Error {
    io::Error::other(format!("injected EIO on {what}"))
}

fn apply_fates(
    durable: &ImageBlocks,
    pending: &[(u64, Arc<Block>)],
    fates: &[WriteFate],
) -> ImageBlocks {
    let mut img = durable.clone();
    for (i, (nr, data)) in pending.iter().enumerate() {
        let fate = fates.get(i).copied().unwrap_or(WriteFate::Lost);
        let Some(slot) = img.get_mut(*nr as usize) else {
            continue;
        };
        match fate {
            WriteFate::Lost => {}
            WriteFate::Written => *slot = Some(data.clone()),
            WriteFate::Torn(mask) => {
                let mut merged = match slot {
                    Some(b) => **b,
                    None => [0u8; BLOCK_SIZE],
                };
                for s in 0..SECTORS_PER_BLOCK {
                    if mask & (1 << s) != 0 {
                        let r = s * SECTOR_SIZE..(s + 1) * SECTOR_SIZE;
                        merged[r.clone()].copy_from_slice(&data[r]);
                    }
                }
                *slot = Some(Arc::new(merged));
            }
        }
    }
    img
}

impl BlockIo for FaultyIo {
    fn nr_blocks(&self) -> u64 {
        self.state.lock().current.len() as u64
    }

    fn read(&self, nr: MetaBlock, buf: &mut Block) -> io::Result<()> {
        let mut st = self.state.lock();
        st.counts.reads += 1;
        if Self::should_fail(&mut st, IoOp::Read, Some(nr.0)) {
            return Err(eio("read"));
        }
        let len = st.current.len() as u64;
        match st.current.get(nr.0 as usize) {
            Some(Some(b)) => buf.copy_from_slice(&b[..]),
            Some(None) => buf.fill(0),
            None => return Err(out_of_range(nr, len)),
        }
        Ok(())
    }

    fn write(&self, nr: MetaBlock, buf: &Block) -> io::Result<()> {
        let mut st = self.state.lock();
        st.counts.writes += 1;
        if Self::should_fail(&mut st, IoOp::Write, Some(nr.0)) {
            return Err(eio("write"));
        }
        let len = st.current.len() as u64;
        if nr.0 >= len {
            return Err(out_of_range(nr, len));
        }
        let data = Arc::new(*buf);
        st.current[nr.0 as usize] = Some(data.clone());
        st.pending.push((nr.0, data.clone()));
        if let Some((_, ops)) = st.log.as_mut() {
            ops.push(LoggedOp::Write(nr.0, data));
        }
        Ok(())
    }

    fn sync(&self) -> io::Result<()> {
        let mut st = self.state.lock();
        st.counts.syncs += 1;
        if Self::should_fail(&mut st, IoOp::Sync, None) {
            // A failed fdatasync may have persisted any part of the pending writes; the safe
            // model is that nothing more is known to be durable.
            return Err(eio("sync"));
        }
        let pending = std::mem::take(&mut st.pending);
        for (nr, data) in pending {
            st.durable[nr as usize] = Some(data);
        }
        if let Some((_, ops)) = st.log.as_mut() {
            ops.push(LoggedOp::Sync);
        }
        Ok(())
    }

    fn grow(&self, nr_blocks: u64) -> io::Result<()> {
        let mut st = self.state.lock();
        if (st.current.len() as u64) < nr_blocks {
            st.current.resize(nr_blocks as usize, None);
            st.durable.resize(nr_blocks as usize, None);
            if let Some((initial, _)) = st.log.as_mut() {
                initial.resize(nr_blocks as usize, None);
            }
        }
        Ok(())
    }
}

/// A recorded workload: every write and sync in order.
#[derive(Debug, Clone)]
pub struct History {
    initial: ImageBlocks,
    ops: Vec<LoggedOp>,
}

impl History {
    /// Number of syncs recorded.
    pub fn nr_syncs(&self) -> usize {
        self.ops
            .iter()
            .filter(|o| matches!(o, LoggedOp::Sync))
            .count()
    }

    /// One epoch per sync point: epoch `k` starts from the durable image after `k` syncs and
    /// holds the writes issued after that sync and before the next one (for the last epoch:
    /// before the recording ended). A power loss anywhere inside epoch `k`, including during its
    /// closing sync, leaves that durable image plus some fate of each of those writes.
    pub fn epochs(&self) -> Vec<Epoch> {
        let mut out = Vec::new();
        let mut durable = self.initial.clone();
        let mut pending: Vec<(u64, Arc<Block>)> = Vec::new();
        for op in &self.ops {
            match op {
                LoggedOp::Write(nr, data) => pending.push((*nr, data.clone())),
                LoggedOp::Sync => {
                    out.push(Epoch {
                        index: out.len(),
                        durable: durable.clone(),
                        pending: pending.clone(),
                    });
                    for (nr, data) in pending.drain(..) {
                        if let Some(slot) = durable.get_mut(nr as usize) {
                            *slot = Some(data);
                        }
                    }
                }
            }
        }
        out.push(Epoch {
            index: out.len(),
            durable,
            pending,
        });
        out
    }
}

/// The state of the device between two sync points; see [`History::epochs`].
#[derive(Debug, Clone)]
pub struct Epoch {
    index: usize,
    durable: ImageBlocks,
    pending: Vec<(u64, Arc<Block>)>,
}

impl Epoch {
    /// Number of syncs completed before this epoch.
    pub fn syncs_before(&self) -> usize {
        self.index
    }

    /// Writes issued in this epoch (candidates for loss, reordering and tearing).
    pub fn nr_pending(&self) -> usize {
        self.pending.len()
    }

    /// Blocks of those writes, in issue order.
    pub fn pending_blocks(&self) -> Vec<MetaBlock> {
        self.pending.iter().map(|(b, _)| MetaBlock(*b)).collect()
    }

    /// The disk after a power loss in this epoch: the durable image plus `fates[i]` applied to
    /// the `i`-th pending write (missing entries count as lost).
    pub fn crash_image(&self, fates: &[WriteFate]) -> MemIo {
        MemIo::from_blocks(apply_fates(&self.durable, &self.pending, fates))
    }

    /// A standard set of fate vectors for `self.nr_pending()` writes, deterministic in `seed`:
    /// everything lost; everything written; every in-order prefix written (a crash between
    /// writes); each write torn (random sectors) after its predecessors were written; and
    /// `random` vectors where each write is independently lost, written or torn (which also
    /// models reordering: a later write survives while an earlier one is lost).
    pub fn standard_fates(&self, seed: u64, random: usize) -> Vec<Vec<WriteFate>> {
        standard_fates(self.pending.len(), seed, random)
    }
}

/// See [`Epoch::standard_fates`].
pub fn standard_fates(n: usize, seed: u64, random: usize) -> Vec<Vec<WriteFate>> {
    let mut rng = SplitMix(seed ^ (n as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut out = vec![vec![WriteFate::Lost; n]];
    if n == 0 {
        return out;
    }
    out.push(vec![WriteFate::Written; n]);
    for k in 1..n {
        let mut v = vec![WriteFate::Lost; n];
        v[..k].fill(WriteFate::Written);
        out.push(v);
    }
    for k in 0..n {
        let mut v = vec![WriteFate::Lost; n];
        v[..k].fill(WriteFate::Written);
        v[k] = WriteFate::Torn(random_torn_mask(&mut rng));
        out.push(v);
    }
    for _ in 0..random {
        let v = (0..n)
            .map(|_| match rng.next() % 3 {
                0 => WriteFate::Lost,
                1 => WriteFate::Written,
                _ => WriteFate::Torn(random_torn_mask(&mut rng)),
            })
            .collect();
        out.push(v);
    }
    out
}

/// A mask with at least one sector written and at least one not (a real tear).
fn random_torn_mask(rng: &mut SplitMix) -> u8 {
    loop {
        let m = (rng.next() & 0xff) as u8;
        if m != 0 && m != 0xff {
            return m;
        }
    }
}

/// A tiny deterministic generator so this module needs no dependency.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(v: u8) -> Block {
        [v; BLOCK_SIZE]
    }

    #[test]
    fn unsynced_writes_are_visible_but_not_durable() {
        let io = FaultyIo::new(4);
        io.write(MetaBlock(1), &block(1)).unwrap();
        let mut b = [0u8; BLOCK_SIZE];
        io.read(MetaBlock(1), &mut b).unwrap();
        assert_eq!(b[0], 1);
        let img = io.durable_image();
        img.read(MetaBlock(1), &mut b).unwrap();
        assert_eq!(b[0], 0);
        io.sync().unwrap();
        io.durable_image().read(MetaBlock(1), &mut b).unwrap();
        assert_eq!(b[0], 1);
    }

    #[test]
    fn torn_and_reordered_writes() {
        let io = FaultyIo::new(4);
        io.write(MetaBlock(2), &block(1)).unwrap();
        io.write(MetaBlock(2), &block(2)).unwrap();
        let mut b = [0u8; BLOCK_SIZE];
        // The older write survives, the newer one is lost: reordering.
        io.crash_image(&[WriteFate::Written, WriteFate::Lost])
            .read(MetaBlock(2), &mut b)
            .unwrap();
        assert_eq!(b[0], 1);
        // The newer write is torn over the older one: sector 0 new, the rest old.
        io.crash_image(&[WriteFate::Written, WriteFate::Torn(1)])
            .read(MetaBlock(2), &mut b)
            .unwrap();
        assert_eq!((b[0], b[511], b[512]), (2, 2, 1));
    }

    #[test]
    fn injected_errors() {
        let io = FaultyIo::new(4);
        io.inject(FailRule::nth(IoOp::Write, 1));
        io.write(MetaBlock(0), &block(1)).unwrap();
        assert!(io.write(MetaBlock(0), &block(1)).is_err());
        io.write(MetaBlock(0), &block(1)).unwrap();
        io.inject(FailRule::always(IoOp::Sync));
        assert!(io.sync().is_err());
        assert!(io.sync().is_err());
        io.clear_faults();
        io.sync().unwrap();
        assert_eq!(io.counts().syncs, 3);
    }

    #[test]
    fn history_epochs() {
        let io = FaultyIo::recording(&MemIo::new(4));
        io.write(MetaBlock(1), &block(1)).unwrap();
        io.sync().unwrap();
        io.write(MetaBlock(2), &block(2)).unwrap();
        io.write(MetaBlock(3), &block(3)).unwrap();
        let epochs = io.history().epochs();
        assert_eq!(epochs.len(), 2);
        assert_eq!(epochs[0].nr_pending(), 1);
        assert_eq!(epochs[1].pending_blocks(), vec![MetaBlock(2), MetaBlock(3)]);
        let img = epochs[1].crash_image(&[WriteFate::Lost, WriteFate::Written]);
        let mut b = [0u8; BLOCK_SIZE];
        img.read(MetaBlock(1), &mut b).unwrap();
        assert_eq!(b[0], 1);
        img.read(MetaBlock(2), &mut b).unwrap();
        assert_eq!(b[0], 0);
        img.read(MetaBlock(3), &mut b).unwrap();
        assert_eq!(b[0], 3);
        let fates = epochs[1].standard_fates(7, 5);
        assert!(fates.len() >= 2 + 1 + 2 + 5);
    }
}
