//! Placement of new data blocks by virtual address.
//!
//! A volume's virtual blocks are taken in groups of [`PLACE_GROUP`] (1 MiB of 64 KiB blocks,
//! aligned in the volume). The first fresh write into a group reserves a run of
//! `PLACE_GROUP` consecutive free data blocks from the pool's cursor and takes the slot of
//! its virtual block; the run's other slots stay reserved for the group in the device's
//! table of open groups, with what one `SEEK_DATA` for the whole run said about their holes.
//! Later fresh writes into the group take their slots from the table. When the tree said the
//! group was empty as it opened, its other blocks are cached as unmapped at once (under the
//! read lock), so those later writes plan themselves with no pool lock at all
//! (`Volume::plan_fresh_unlocked`).
//!
//! The table is bounded ([`MAX_OPEN_GROUPS`] per pool): the oldest open group of the device
//! gives its unused slots back when a new one needs room. The pool's cursor has moved past
//! every run, and every new run and stash starts from it, so the slots of a closed group stay
//! free for a while; a later write into such a group (or any group after a restart) finds the
//! run's base from a mapping of the group in the mapping cache, else from the group's first
//! mapping in the tree, and reserves its slot if it is still usable. A closing group gives
//! its unused slots back saying which are holes (`Stashed::give_back`,
//! `Pool::release_zeroed`), and the pool says so again when the slot is reserved next, unless
//! someone else reserved it in between. Such a slot is free in both space maps by
//! construction, so a write whose blocks the cache says are unmapped, and whose group's base
//! a cached mapping gives, takes it with no pool lock at all (`Shared::place_zeroed`, the
//! pool's `Reserver`). Otherwise whether the slot is a hole is left to the write, which asks
//! with one `SEEK_DATA` (`DataFile::make_zero`) after the pool's lock is released: a slot
//! below the end of the data file's data needs that system call, which waits for ext4's
//! inode lock behind every buffered write in flight, and waiting for it under the pool's
//! read lock stalled every other request (a writer waiting for the lock blocks new readers).
//!
//! Why: blocks used to be handed out in arrival order (the device's stash), so a volume
//! provisioned by random 4 KiB writes had its 1 MiB stretches scattered over the data file,
//! and a later 1 MiB request was 16 separate 64 KiB transfers, where a raw image file gives
//! the device one. Placed groups keep a 1 MiB request one transfer however the volume was
//! filled. Copies on write are placed the same way, so a snapshot rewritten block by block
//! gets contiguous groups of its own.
//!
//! Placement is a hint, never a correctness matter: any usable block is a correct choice, and
//! when a slot is taken (by another device, or after a wrap-around), the pool is short of
//! long free runs, or the group's base is unknown, the write falls back to the stash
//! (`Shared::take_stashed`). Nothing of it is persistent. Reserved slots are the pool's free
//! space held back; when the pool runs out, every open group gives its slots back first
//! (`Shared::take_blocks`).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::sync::atomic::Ordering;

use smallvec::SmallVec;

use crate::pool::{Pool, PoolError, Reservation};
use crate::units::{DataBlock, DevId, VirtBlock};

use super::cache::Cached;
use super::{DevResult, DevState, Shared, Stashed};

/// Virtual blocks placed together: a group's blocks go to consecutive data blocks.
pub(super) const PLACE_GROUP: u64 = 16;

/// Open groups (with reserved slots) in the whole pool at most: 4 Ki groups hold at most
/// 60 Ki blocks back (3.75 GiB of 64 KiB blocks), in about 2 MiB of memory, and cover a
/// 4 GiB volume filled in random order.
pub(super) const MAX_OPEN_GROUPS: usize = 4096;

/// Distinct bases read from the cache that a group tries before it takes a new run (a group
/// of a snapshot shows its origin's base, whose slots are taken, and its own).
const MAX_BASES: usize = 2;

/// New runs tried when the first one found is shorter than a group.
const RUN_TRIES: usize = 3;

/// A device's open groups: the reserved, still unused slots of runs it placed.
#[derive(Default)]
pub(super) struct OpenGroups {
    /// Group number → its slots (index = virtual block − the group's first).
    groups: HashMap<u64, Vec<Option<Stashed>>>,
    /// Group numbers in the order they were opened (may name groups already closed, at most
    /// about as many as are open).
    order: VecDeque<u64>,
}

impl OpenGroups {
    /// Takes every reserved slot out (to give back to the pool); returns how many groups
    /// were open.
    pub(super) fn drain(&mut self) -> (usize, Vec<Stashed>) {
        self.order.clear();
        let n = self.groups.len();
        let slots = self
            .groups
            .drain()
            .flat_map(|(_, slots)| slots.into_iter().flatten())
            .collect();
        (n, slots)
    }
}

impl Shared {
    /// Data blocks for the fresh mappings of `vbs` (ascending virtual blocks of `dev`), each
    /// at its group's slot; `None` when some cannot be placed (then nothing is reserved).
    pub(super) fn place(
        &self,
        pool: &Pool,
        dev: DevId,
        state: &DevState,
        vbs: &[VirtBlock],
    ) -> DevResult<Option<Vec<Stashed>>> {
        let mut got: Vec<Stashed> = Vec::with_capacity(vbs.len());
        for these in vbs.chunk_by(same_group) {
            match self.place_group(pool, dev, state, group_of(these), these) {
                Ok(Some(placed)) => got.extend(placed),
                other => {
                    for s in got {
                        s.give_back(pool);
                    }
                    return other.map(|_| None);
                }
            }
        }
        Ok(Some(got))
    }

    /// [`place`](Shared::place) for the virtual blocks `vbs`, all in `group`: from the open
    /// group, else at the slots of a base the cache (or, with nothing cached, the tree)
    /// suggests, else in a new run.
    fn place_group(
        &self,
        pool: &Pool,
        dev: DevId,
        state: &DevState,
        group: u64,
        vbs: &[VirtBlock],
    ) -> DevResult<Option<Vec<Stashed>>> {
        let first = group * PLACE_GROUP;
        if let Some(got) = self.take_open(state, vbs) {
            return Ok(Some(got));
        }
        let mut bases = 0;
        for base in self.cached_bases(dev, first) {
            if let Some(rs) = reserve_slots(pool, base, first, vbs)? {
                return Ok(Some(reserved_again(rs)));
            }
            bases += 1;
        }
        // Whether the tree says no block of the group is mapped.
        let mut empty = false;
        if bases == 0 {
            // Nothing of the group cached (after a restart, or evicted): ask the tree for
            // the group's first mapping, one descent.
            match pool.next_mapping(dev, VirtBlock(first))? {
                Some((u, block)) if u.0 < first + PLACE_GROUP => {
                    if let Some(base) = block.0.checked_sub(u.0 - first)
                        && let Some(rs) = reserve_slots(pool, base, first, vbs)?
                    {
                        return Ok(Some(reserved_again(rs)));
                    }
                }
                _ => empty = true,
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
            let Some(last) = run.last().map(|r| r.block()) else {
                return Ok(None);
            };
            if run.len() as u64 == PLACE_GROUP {
                let mut slots: Vec<Option<Stashed>> =
                    self.stash_run(run)?.into_iter().map(Some).collect();
                let got = vbs
                    .iter()
                    .filter_map(|v| slots[(v.0 - first) as usize].take())
                    .collect();
                self.open_group(pool, state, group, slots);
                if empty {
                    // Under the read lock, so true now, and kept true by the cache's rule
                    // (every mapping change updates it): the group's other blocks are
                    // unmapped. A later fresh write into the group then needs no pool lock
                    // at all (`Volume::plan_fresh_unlocked`).
                    self.cache.put_all(
                        dev,
                        (first..first + PLACE_GROUP)
                            .filter(|u| !vbs.iter().any(|v| v.0 == *u))
                            .map(|u| (VirtBlock(u), Cached::Unmapped)),
                    );
                }
                return Ok(Some(got));
            }
            near = Some(DataBlock(last.0 + 1));
            for r in run {
                pool.release_reservation(r);
            }
        }
        Ok(None)
    }

    /// The bases (the data block of the group's first slot) that the cached mappings of the
    /// group starting at virtual block `first` suggest: at most [`MAX_BASES`] distinct ones,
    /// found lazily. Called for every write into a closed group, so the bases seen so far
    /// are kept inline (no allocation).
    fn cached_bases(&self, dev: DevId, first: u64) -> impl Iterator<Item = u64> + '_ {
        let mut seen: SmallVec<[u64; MAX_BASES]> = SmallVec::new();
        (first..first + PLACE_GROUP)
            .filter_map(move |u| match self.cache.get(dev, VirtBlock(u)) {
                Some(Cached::Mapped { block, .. }) => block.0.checked_sub(u - first),
                _ => None,
            })
            .filter(move |base| {
                let new = !seen.contains(base);
                if new {
                    seen.push(*base);
                }
                new
            })
            .take(MAX_BASES)
    }

    /// The slots of `vbs` (ascending, unmapped) in the runs of their closed groups, reserved
    /// with no pool lock (`Volume::plan_fresh_unlocked`): only slots their group gave back
    /// unwritten, and nobody reserved since, qualify (`Reserver::reserve_zeroed_at`); they
    /// need no space map lookup and no `SEEK_DATA`. All of them or none.
    ///
    /// On a volume with more groups than the pool keeps open, most fresh writes find their
    /// group closed; planning them under the pool's read lock, against the inserts under its
    /// write lock, was the largest cost they added (docs/volume.md, "Closed groups without
    /// the pool's lock").
    pub(super) fn place_zeroed(&self, dev: DevId, vbs: &[VirtBlock]) -> Option<Vec<Stashed>> {
        let mut got: Vec<Stashed> = Vec::with_capacity(vbs.len());
        for these in vbs.chunk_by(same_group) {
            let first = group_of(these) * PLACE_GROUP;
            let placed = self.cached_bases(dev, first).find_map(|base| {
                let Ok(rs) = slots_at(
                    base,
                    first,
                    these,
                    |b| Ok::<_, Infallible>(self.reserver.reserve_zeroed_at(b)),
                    |r| self.reserver.release_zeroed(r),
                );
                rs
            });
            match placed {
                Some(rs) => got.extend(reserved_again(rs)),
                None => {
                    for s in got {
                        self.reserver.release_zeroed(s.r);
                    }
                    return None;
                }
            }
        }
        Some(got)
    }

    /// The slots of `vbs` (ascending, distinct) from the device's open groups, if every one
    /// of them is waiting there (else it takes none). Needs no pool lock: the slots are the
    /// device's own reservations.
    pub(super) fn take_open(&self, state: &DevState, vbs: &[VirtBlock]) -> Option<Vec<Stashed>> {
        let mut open = state.groups.lock();
        let waiting = |open: &OpenGroups, v: &VirtBlock| {
            open.groups
                .get(&(v.0 / PLACE_GROUP))
                .is_some_and(|slots| slots[(v.0 % PLACE_GROUP) as usize].is_some())
        };
        if !vbs.iter().all(|v| waiting(&open, v)) {
            return None;
        }
        let mut got = Vec::with_capacity(vbs.len());
        for v in vbs {
            let group = v.0 / PLACE_GROUP;
            let Some(slots) = open.groups.get_mut(&group) else {
                continue;
            };
            if let Some(s) = slots[(v.0 % PLACE_GROUP) as usize].take() {
                got.push(s);
            }
            if slots.iter().all(Option::is_none) {
                open.groups.remove(&group);
                self.open_groups.fetch_sub(1, Ordering::AcqRel);
            }
        }
        Some(got)
    }

    /// Keeps the unused `slots` of a new run for `group`, closing the device's oldest open
    /// group if the pool has [`MAX_OPEN_GROUPS`] open; gives them back if none can close.
    fn open_group(&self, pool: &Pool, state: &DevState, group: u64, slots: Vec<Option<Stashed>>) {
        if slots.iter().all(Option::is_none) {
            return;
        }
        let mut open = state.groups.lock();
        while self.open_groups.load(Ordering::Acquire) >= MAX_OPEN_GROUPS {
            let Some(oldest) = open.order.pop_front() else {
                break;
            };
            if let Some(old) = open.groups.remove(&oldest) {
                self.open_groups.fetch_sub(1, Ordering::AcqRel);
                for s in old.into_iter().flatten() {
                    s.give_back(pool);
                }
            }
        }
        if self.open_groups.load(Ordering::Acquire) >= MAX_OPEN_GROUPS {
            for s in slots.into_iter().flatten() {
                s.give_back(pool);
            }
            return;
        }
        if let Some(stale) = open.groups.insert(group, slots) {
            // Two writes opened the group at once: the first run's slots go back.
            for s in stale.into_iter().flatten() {
                s.give_back(pool);
            }
        } else {
            self.open_groups.fetch_add(1, Ordering::AcqRel);
        }
        open.order.push_back(group);
        // Groups closed by use stay named in `order` until they come up for closing; keep
        // that list proportional to the open groups, not to the volume.
        if open.order.len() > 2 * open.groups.len() + 64 {
            let OpenGroups { groups, order } = &mut *open;
            order.retain(|g| groups.contains_key(g));
        }
    }

    /// Gives every open group's slots of `state`'s device back to the pool.
    pub(super) fn close_groups(&self, pool: &Pool, state: &DevState) {
        let (n, slots) = state.groups.lock().drain();
        self.open_groups.fetch_sub(n, Ordering::AcqRel);
        for s in slots {
            s.give_back(pool);
        }
    }
}

/// Slots of a closed group, reserved again: holes if the pool says so (the group gave them
/// back unwritten and nobody took them since, `Pool::release_zeroed`), else the write checks
/// them, outside the pool's lock.
fn reserved_again(rs: Vec<Reservation>) -> Vec<Stashed> {
    rs.into_iter()
        .map(|r| Stashed {
            hole: r.known_zeroed(),
            r,
        })
        .collect()
}

/// Whether two ascending virtual blocks fall into one placement group (`slice::chunk_by`).
fn same_group(a: &VirtBlock, b: &VirtBlock) -> bool {
    a.0 / PLACE_GROUP == b.0 / PLACE_GROUP
}

/// The placement group of `vbs`, a non-empty run of blocks of one group.
fn group_of(vbs: &[VirtBlock]) -> u64 {
    vbs.first().map_or(0, |v| v.0 / PLACE_GROUP)
}

/// Reserves the slots of `vbs` (in the group starting at virtual block `first`) in the run
/// starting at data block `base` with `take`: all of them, or none (what was taken goes back
/// with `give`).
fn slots_at<E>(
    base: u64,
    first: u64,
    vbs: &[VirtBlock],
    mut take: impl FnMut(DataBlock) -> Result<Option<Reservation>, E>,
    mut give: impl FnMut(Reservation),
) -> Result<Option<Vec<Reservation>>, E> {
    let mut got = Vec::with_capacity(vbs.len());
    for v in vbs {
        match take(DataBlock(base + (v.0 - first))) {
            Ok(Some(r)) => got.push(r),
            other => {
                got.into_iter().for_each(&mut give);
                return other.map(|_| None);
            }
        }
    }
    Ok(Some(got))
}

/// [`slots_at`] under the pool's lock: any usable block (`Pool::reserve_data_block_at`).
fn reserve_slots(
    pool: &Pool,
    base: u64,
    first: u64,
    vbs: &[VirtBlock],
) -> DevResult<Option<Vec<Reservation>>> {
    slots_at(
        base,
        first,
        vbs,
        |b| pool.reserve_data_block_at(b),
        |r| pool.release_reservation(r),
    )
    .map_err(Into::into)
}
