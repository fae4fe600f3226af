//! Placement of new data blocks by virtual address.
//!
//! A volume's virtual blocks are taken in groups of [`PLACE_GROUP`] (1 MiB of 64 KiB blocks,
//! aligned in the volume). The first fresh write into a group reserves a run of
//! `PLACE_GROUP` consecutive free data blocks and takes the slot of its virtual block; the
//! other slots are given back to the pool at once, but the pool's cursor has moved past the
//! run, and every new run and stash starts from it, so later allocations do not fill the
//! slots until the allocator wraps around. A later fresh write into the group finds the run's base from a mapping of the
//! group already in the mapping cache and reserves its own slot, if that block is still
//! usable.
//!
//! Why: blocks used to be handed out in arrival order (the device's stash), so a volume
//! provisioned by random 4 KiB writes had its 1 MiB stretches scattered over the data file,
//! and a later 1 MiB request was 16 separate 64 KiB transfers, where a raw image file gives
//! the device one. Placed groups keep a 1 MiB request one transfer however the volume was
//! filled. Copies on write are placed the same way, so a snapshot rewritten block by block
//! gets contiguous groups of its own.
//!
//! Placement is a hint, never a correctness matter: any usable block is a correct choice, and
//! when the slot is taken (by another device, or after a wrap-around), the pool is short of
//! long free runs, or the group's base is not cached, the write falls back to the stash
//! (`Shared::take_stashed`). Nothing of it is persistent; after a restart the bases come
//! back with the mappings that the cache reloads.

use crate::pool::{Pool, PoolError, Reservation};
use crate::units::{DataBlock, DevId, VirtBlock};

use super::cache::Cached;
use super::{DevResult, Shared, Stashed};

/// Virtual blocks placed together: a group's blocks go to consecutive data blocks.
pub(super) const PLACE_GROUP: u64 = 16;

/// Distinct bases read from the cache that a group tries before it takes a new run (a group
/// of a snapshot shows its origin's base, whose slots are taken, and its own).
const MAX_BASES: usize = 2;

/// New runs tried when the first one found is shorter than a group.
const RUN_TRIES: usize = 3;

impl Shared {
    /// Data blocks for the fresh mappings of `vbs` (ascending virtual blocks of `dev`), each
    /// at its group's slot; `None` when some cannot be placed (then nothing is reserved).
    pub(super) fn place(
        &self,
        pool: &Pool,
        dev: DevId,
        vbs: &[VirtBlock],
    ) -> DevResult<Option<Vec<Stashed>>> {
        let mut got: Vec<Reservation> = Vec::with_capacity(vbs.len());
        let mut rest = vbs;
        while let Some(first) = rest.first() {
            let group = first.0 / PLACE_GROUP;
            let n = rest
                .iter()
                .take_while(|v| v.0 / PLACE_GROUP == group)
                .count();
            let placed = match self.place_group(pool, dev, group, &rest[..n]) {
                Ok(Some(rs)) => rs,
                other => {
                    for r in got {
                        pool.release_reservation(r);
                    }
                    return other.map(|_| None);
                }
            };
            got.extend(placed);
            rest = &rest[n..];
        }
        self.stash_run(got).map(Some)
    }

    /// [`place`](Shared::place) for the virtual blocks `vbs`, all in `group`: at the slots of
    /// a base the cache suggests, else in a new run.
    fn place_group(
        &self,
        pool: &Pool,
        dev: DevId,
        group: u64,
        vbs: &[VirtBlock],
    ) -> DevResult<Option<Vec<Reservation>>> {
        let first = group * PLACE_GROUP;
        let mut bases: Vec<u64> = Vec::with_capacity(MAX_BASES);
        for u in first..first + PLACE_GROUP {
            let Some(Cached::Mapped { block, .. }) = self.cache.get(dev, VirtBlock(u)) else {
                continue;
            };
            let Some(base) = block.0.checked_sub(u - first) else {
                continue;
            };
            if bases.contains(&base) {
                continue;
            }
            if let Some(rs) = reserve_slots(pool, base, first, vbs)? {
                return Ok(Some(rs));
            }
            bases.push(base);
            if bases.len() == MAX_BASES {
                break;
            }
        }
        // From the pool's cursor, which is past every run handed out (and moves past this
        // one), so that new groups do not land in the gaps of others.
        let mut near = None;
        for _ in 0..RUN_TRIES {
            let run = match pool.reserve_data_blocks(near, PLACE_GROUP as usize) {
                Ok(run) => run,
                // The stash's way handles a full pool (it gives every stash back first).
                Err(PoolError::NoDataSpace { .. }) => return Ok(None),
                Err(e) => return Err(e.into()),
            };
            let (start, last) = match (run.first(), run.last()) {
                (Some(f), Some(l)) => (f.block().0, l.block()),
                _ => return Ok(None),
            };
            if run.len() as u64 == PLACE_GROUP {
                let mut kept = Vec::with_capacity(vbs.len());
                let mut wanted = vbs.iter().map(|v| start + (v.0 - first)).peekable();
                for r in run {
                    if wanted.peek() == Some(&r.block().0) {
                        wanted.next();
                        kept.push(r);
                    } else {
                        pool.release_reservation(r);
                    }
                }
                return Ok(Some(kept));
            }
            near = Some(DataBlock(last.0 + 1));
            for r in run {
                pool.release_reservation(r);
            }
        }
        Ok(None)
    }
}

/// Reserves the slots of `vbs` (in the group starting at virtual block `first`) in the run
/// starting at data block `base`: all of them, or none.
fn reserve_slots(
    pool: &Pool,
    base: u64,
    first: u64,
    vbs: &[VirtBlock],
) -> DevResult<Option<Vec<Reservation>>> {
    let mut got = Vec::with_capacity(vbs.len());
    for v in vbs {
        match pool.reserve_data_block_at(DataBlock(base + (v.0 - first))) {
            Ok(Some(r)) => got.push(r),
            other => {
                for r in got {
                    pool.release_reservation(r);
                }
                return other.map(|_| None).map_err(Into::into);
            }
        }
    }
    Ok(Some(got))
}
