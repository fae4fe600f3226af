//! What the volume layer needs from the thin metadata: the pool's data-path API
//! (docs/pool.md "Data path"), as a trait so the volume machinery can also run over
//! [`MemMetadata`](super::MemMetadata), an in-memory model used by tests and benchmarks.
//!
//! The volume layer keeps the implementation in a `parking_lot::RwLock`: `&self` methods run
//! under the read lock (concurrently), `&mut self` methods under the write lock.

use crate::device::DevResult;
use crate::units::{DataBlock, DevId, VirtBlock};

/// Where a virtual block lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockMapping {
    /// The data block holding it.
    pub block: DataBlock,
    /// True when another device (or a shared mapping subtree) holds the block too: a write
    /// must copy it first. Exact, from reference counts.
    pub shared: bool,
}

/// The thin metadata's data path, block by block; see the module docs.
pub trait ThinMetadata: Send + Sync + 'static {
    /// A data block set aside for one mapping, not yet mapped.
    type Reservation: Send + Sync + 'static;

    /// The data block a reservation stands for.
    fn reserved_block(r: &Self::Reservation) -> DataBlock;

    /// Where `vblock` of `dev` lives, or `None` when it is unprovisioned.
    fn lookup(&self, dev: DevId, vblock: VirtBlock) -> DevResult<Option<BlockMapping>>;

    /// Sets aside a free data block (memory only). `DevError::NoSpace` when none is left.
    /// Never returns a block freed by a transaction that is not yet durable, nor one awaiting
    /// [`release_freed`](ThinMetadata::release_freed).
    fn reserve(&self) -> DevResult<Self::Reservation>;

    /// Gives back a reservation that will not be used.
    fn release_reservation(&self, r: Self::Reservation);

    /// Maps `vblock` of `dev` to the reserved block. Returns the block it replaced (whose count
    /// is decremented; freed at 0).
    fn insert_mapping(
        &mut self,
        dev: DevId,
        vblock: VirtBlock,
        r: Self::Reservation,
    ) -> DevResult<Option<DataBlock>>;

    /// Unmaps `[begin, end)` of `dev`; returns how many blocks were mapped.
    fn discard(&mut self, dev: DevId, begin: VirtBlock, end: VirtBlock) -> DevResult<u64>;

    /// Makes the transaction durable (the data must already be synced). Returns the data
    /// blocks freed in it: punch them, then [`release_freed`](ThinMetadata::release_freed).
    fn commit(&mut self) -> DevResult<Vec<DataBlock>>;

    /// The holes of these blocks (from a commit) are punched: they may be reserved again.
    fn release_freed(&self, blocks: &[DataBlock]);

    /// Blocks freed by commits made inside other calls (snapshot, create, delete) that were not
    /// yet returned by [`commit`](ThinMetadata::commit). They must be punched and released too.
    fn take_freed(&mut self) -> Vec<DataBlock>;
}
