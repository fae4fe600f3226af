//! Group summaries: a compact second view of the mapping cache, for reads.
//!
//! A fresh write places its block in its placement group's run (`place.rs`): the 16 virtual
//! blocks of a group go to 16 consecutive data blocks. So one word per group, "the run starts
//! at data block `base`, and these of its 16 blocks are mapped there", says as much for reads
//! as 16 of the cache's slots, in an eighth of their memory, and a read finds it with one
//! load from a dense array instead of two dependent loads (the chunk index, then the chunk)
//! scattered over the cache's whole footprint.
//!
//! Why: in cached 4 KiB reads every read copies a page the processor has not touched for a
//! long time, and what a lookup loads is rarely still in a cache. A throwaway build that
//! looked reads up in a dense per-volume array of such words (32 KiB for a 4 GiB volume) was
//! level with the plain file (read-4k 0.98–1.03, median 1.005, 6 runs) where the mapping
//! cache alone gave 0.91–0.98 (median 0.95) in the same interleaved runs (docs/volume.md,
//! "Cached reads").
//!
//! # Layout
//!
//! A word (`u64`): bits 0–39 the data block of the run's first slot (`base`, 40 bits as in
//! dm-thin's mappings), bits 40–55 one bit per block of the group (bit 40 + i: virtual block
//! `16 g + i` maps to `base + i`), bits 56–63 zero. A word with no bit set says nothing.
//!
//! Words live in pages of [`PAGE_GROUPS`] consecutive groups of one device (512 groups: 8 192
//! blocks, 512 MiB of 64 KiB blocks; 4 KiB of words). A pool has a fixed number of page
//! places (a power of two, from the cache's capacity); `keys[p]` says which (device, region)
//! place `p` holds: [`VACANT`], [`GONE`] (released; a probe goes on past it) or
//! `(device << 40 | region) + 1`. A (device, region) goes to the first free place among
//! [`PROBES`] from its hash, on the first mapped entry cached for it, and keeps it until the
//! device is forgotten; when all of them are taken its reads use the mapping cache alone.
//! Pages are allocated when first taken and kept while the cache lives.
//!
//! # Consistency
//!
//! The rule: a bit set in a word means the mapping cache holds that block as mapped to
//! `base + i` at that moment. The cache keeps it so, under the shard lock of the slot's
//! chunk: a slot about to change loses its bit first, and once it has changed its group is
//! summarized again from its 16 slots ([`Summaries::change`]); slots about to be emptied,
//! and every slot of a chunk given up, lose their bits ([`Summaries::clear_blocks`]). A
//! group's 16 blocks lie in one chunk, so one lock covers each word, and a word changes by
//! one atomic store.
//!
//! A read takes no lock: it finds the place of its (device, region), then loads the word
//! between two loads of the place's generation, which [`Summaries::release_device`] makes odd
//! while it empties the place and even again after (a seqlock). A read that saw the same even
//! generation before and after, and its own key, read a word of its own region, which the
//! rule above makes an entry the cache held at some instant during the call.

use std::hash::BuildHasher;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering, fence};

use foldhash::fast::RandomState;
use parking_lot::Mutex;

use crate::units::{DataBlock, DevId, VirtBlock};

use super::place::PLACE_GROUP;

/// Groups per page.
pub(super) const PAGE_GROUPS: u64 = 512;

/// Places a (device, region) may take, from the one its hash names.
const PROBES: usize = 8;

/// `keys` values: never taken (a probe stops here), given up (a probe goes on).
const VACANT: u64 = 0;
const GONE: u64 = u64::MAX;

/// Bits of a word that hold `base`.
const BASE_BITS: u32 = 40;
const BASE_MASK: u64 = (1 << BASE_BITS) - 1;

/// One page: the words of [`PAGE_GROUPS`] consecutive groups.
struct Page {
    words: [AtomicU64; PAGE_GROUPS as usize],
}

/// The group summaries of one mapping cache; see the module docs.
pub(super) struct Summaries {
    /// Which (device, region) each place holds.
    keys: Box<[AtomicU64]>,
    /// Seqlock generation of each place: odd while [`Summaries::release_device`] empties it.
    gens: Box<[AtomicU64]>,
    /// Each place's page, allocated when the place is first taken.
    pages: Box<[OnceLock<Box<Page>>]>,
    /// Taken to give a place out or back (the shard locks order the words' writers).
    places: Mutex<()>,
    hasher: RandomState,
}

impl Summaries {
    /// Summaries with about `places` page places (rounded down to a power of two, at least
    /// [`PROBES`]): at most that many 4 KiB pages.
    pub(super) fn new(places: usize) -> Summaries {
        let n = if places <= PROBES {
            PROBES
        } else {
            1 << places.ilog2()
        };
        Summaries {
            keys: (0..n).map(|_| AtomicU64::new(VACANT)).collect(),
            gens: (0..n).map(|_| AtomicU64::new(0)).collect(),
            pages: (0..n).map(|_| OnceLock::new()).collect(),
            places: Mutex::new(()),
            hasher: RandomState::default(),
        }
    }

    /// The `keys` value of `v`'s region of `dev`, its group and the block's index in it.
    /// `None` for what cannot be encoded: regions from 2^40 − 1 up (virtual blocks from
    /// about 2^53), device ids above dm-thin's 24 bits.
    fn key(dev: DevId, v: VirtBlock) -> Option<(u64, u64, u64)> {
        let group = v.0 / PLACE_GROUP;
        let region = group / PAGE_GROUPS;
        // 24 + 40 bits, and + 1 stays below GONE.
        (region < BASE_MASK && dev <= DevId::MAX).then(|| {
            (
                (u64::from(dev.0) << BASE_BITS | region) + 1,
                group,
                v.0 % PLACE_GROUP,
            )
        })
    }

    /// The probe positions of `key`.
    fn probes(&self, key: u64) -> impl Iterator<Item = usize> {
        let mask = self.keys.len() - 1;
        let start = self.hasher.hash_one(key) as usize;
        (0..PROBES).map(move |i| (start + i) & mask)
    }

    /// The place holding `key`, if any.
    fn find(&self, key: u64) -> Option<usize> {
        for p in self.probes(key) {
            match self.keys[p].load(Ordering::Acquire) {
                k if k == key => return Some(p),
                VACANT => return None,
                _ => {}
            }
        }
        None
    }

    /// The page of the place holding `key`, if any (for writers, under a shard lock).
    fn page(&self, key: u64) -> Option<&Page> {
        self.find(key)
            .and_then(|p| self.pages[p].get())
            .map(|b| &**b)
    }

    /// The data block `v` of `dev` maps to, if its group's word says so. Takes no lock.
    pub(super) fn get(&self, dev: DevId, v: VirtBlock) -> Option<DataBlock> {
        let (key, group, i) = Self::key(dev, v)?;
        let p = self.find(key)?;
        let g1 = self.gens[p].load(Ordering::Acquire);
        if g1 & 1 == 1 || self.keys[p].load(Ordering::Acquire) != key {
            return None;
        }
        let w = self.pages[p].get()?.words[(group % PAGE_GROUPS) as usize].load(Ordering::Acquire);
        // Any load above that saw a release's store makes the generation below show it.
        fence(Ordering::Acquire);
        if self.gens[p].load(Ordering::Relaxed) != g1 {
            return None;
        }
        (w >> (BASE_BITS + i as u32) & 1 == 1).then(|| DataBlock((w & BASE_MASK) + i))
    }

    /// Takes a place for `key` (or finds the one another shard just took).
    fn take(&self, key: u64) -> Option<usize> {
        let _places = self.places.lock();
        let mut free = None;
        for p in self.probes(key) {
            match self.keys[p].load(Ordering::Relaxed) {
                k if k == key => return Some(p),
                VACANT => {
                    free = free.or(Some(p));
                    break;
                }
                GONE => free = free.or(Some(p)),
                _ => {}
            }
        }
        let p = free?;
        // A place's words are all zero while it is free (`release_device` empties them).
        self.pages[p].get_or_init(|| {
            Box::new(Page {
                words: [const { AtomicU64::new(0) }; PAGE_GROUPS as usize],
            })
        });
        self.keys[p].store(key, Ordering::Release);
        Some(p)
    }

    /// Runs `change_slot` (the cache changing `v`'s slot) with `v`'s bit taken away first,
    /// then summarizes `v`'s group again: `mapped(j)` is what the cache then holds as mapped
    /// for the group's block `j`. The run's start is that of `v`'s block (the newest), else
    /// the word's, else that of the group's first mapped block: the first of these on which
    /// some block is mapped. Every block mapped on that run gets its bit. The caller holds
    /// the lock of the shard of `v`'s chunk.
    pub(super) fn change<R>(
        &self,
        dev: DevId,
        v: VirtBlock,
        change_slot: impl FnOnce() -> R,
        mapped: impl Fn(u64) -> Option<DataBlock>,
    ) -> R {
        let Some((key, group, i)) = Self::key(dev, v) else {
            return change_slot();
        };
        let found = self.find(key);
        let word_of = |p: usize| {
            self.pages[p]
                .get()
                .map(|page| &page.words[(group % PAGE_GROUPS) as usize])
        };
        if let Some(word) = found.and_then(word_of) {
            let bit = 1u64 << (BASE_BITS + i as u32);
            let w = word.load(Ordering::Relaxed);
            if w & bit != 0 {
                word.store(w & !bit, Ordering::Release);
            }
        }
        let out = change_slot();
        let base_of = |j: u64| mapped(j).and_then(|b| b.0.checked_sub(j));
        let p = match found {
            Some(p) => p,
            None if base_of(i).is_some() => match self.take(key) {
                Some(p) => p,
                None => return out,
            },
            None => return out,
        };
        let Some(word) = word_of(p) else {
            return out;
        };
        let w = word.load(Ordering::Relaxed);
        let bits = |base: u64| {
            (0..PLACE_GROUP)
                .filter(|&j| base_of(j) == Some(base))
                .fold(0, |m, j| m | 1 << (BASE_BITS + j as u32))
        };
        let word_base = (w >> BASE_BITS != 0).then_some(w & BASE_MASK);
        let new = [base_of(i), word_base, (0..PLACE_GROUP).find_map(base_of)]
            .into_iter()
            .flatten()
            .filter(|&b| b <= BASE_MASK)
            .map(|b| b | bits(b))
            .find(|&w| w >> BASE_BITS != 0)
            .unwrap_or(0);
        if new != w {
            word.store(new, Ordering::Release);
        }
        out
    }

    /// Takes away the bits of the `n` blocks from `first` of `dev`, which lie in one chunk
    /// (their slots are about to be emptied). The caller holds that chunk's shard lock.
    pub(super) fn clear_blocks(&self, dev: DevId, first: VirtBlock, n: u64) {
        let Some((key, _, _)) = Self::key(dev, first) else {
            return;
        };
        let Some(page) = self.page(key) else {
            return;
        };
        // A chunk's blocks lie in one page: pages hold a whole number of chunks.
        for v in first.0..first.0 + n {
            let word = &page.words[(v / PLACE_GROUP % PAGE_GROUPS) as usize];
            let bit = 1u64 << (BASE_BITS + (v % PLACE_GROUP) as u32);
            let w = word.load(Ordering::Relaxed);
            if w & bit != 0 {
                word.store(w & !bit, Ordering::Release);
            }
        }
    }

    /// Gives back the places of `dev` (deleted; its id may be reused). The caller holds every
    /// shard's lock, and has given up every chunk of `dev` (so no bit of its words is set).
    pub(super) fn release_device(&self, dev: DevId) {
        let _places = self.places.lock();
        for (p, k) in self.keys.iter().enumerate() {
            let held = k.load(Ordering::Relaxed);
            if held == VACANT || held == GONE || (held - 1) >> BASE_BITS != u64::from(dev.0) {
                continue;
            }
            let g = self.gens[p].load(Ordering::Relaxed);
            self.gens[p].store(g + 1, Ordering::Relaxed);
            fence(Ordering::Release);
            if let Some(page) = self.pages[p].get() {
                for w in &page.words {
                    w.store(0, Ordering::Relaxed);
                }
            }
            k.store(GONE, Ordering::Relaxed);
            self.gens[p].store(g + 2, Ordering::Release);
        }
    }

    /// Places taken (tests).
    #[cfg(test)]
    fn taken(&self) -> usize {
        self.keys
            .iter()
            .filter(|k| !matches!(k.load(Ordering::Relaxed), VACANT | GONE))
            .count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Slots kept the way the cache keeps them, summarized after each change.
    struct Slots {
        s: Summaries,
        map: std::cell::RefCell<std::collections::HashMap<(u32, u64), u64>>,
    }

    impl Slots {
        fn set(&self, dev: u32, v: u64, block: Option<u64>) {
            let first = v - v % PLACE_GROUP;
            self.s.change(
                DevId(dev),
                VirtBlock(v),
                || match block {
                    Some(b) => self.map.borrow_mut().insert((dev, v), b),
                    None => self.map.borrow_mut().remove(&(dev, v)),
                },
                |j| {
                    self.map
                        .borrow()
                        .get(&(dev, first + j))
                        .copied()
                        .map(DataBlock)
                },
            );
        }

        fn get(&self, dev: u32, v: u64) -> Option<u64> {
            self.s.get(DevId(dev), VirtBlock(v)).map(|b| b.0)
        }
    }

    #[test]
    fn a_word_holds_the_blocks_of_its_groups_run() {
        let t = Slots {
            s: Summaries::new(8),
            map: Default::default(),
        };
        let (set, get) = (|v, b| t.set(3, v, b), |v| t.get(3, v));
        set(17, Some(101));
        set(18, Some(102));
        assert_eq!(
            (get(17), get(18), get(16), get(19)),
            (Some(101), Some(102), None, None)
        );
        // The newest block's run wins; blocks on the old one lose their bits.
        set(19, Some(500));
        assert_eq!((get(19), get(18), get(17)), (Some(500), None, None));
        // A block that comes back to the old run takes it back, with its neighbours.
        set(17, Some(101));
        assert_eq!((get(17), get(18), get(19)), (Some(101), Some(102), None));
        // Emptied slots lose their bits; an unmapped one keeps the word's run.
        t.s.clear_blocks(DevId(3), VirtBlock(17), 1);
        assert_eq!((get(17), get(18)), (None, Some(102)));
        set(18, None);
        assert_eq!(get(18), None);
        // With no bit left, a change takes the run of the first mapped block.
        set(20, Some(900));
        set(20, None);
        assert_eq!((get(17), get(19)), (Some(101), None));
        // Below the run's start there is no base.
        set(21 + 16, Some(2));
        assert_eq!(get(21 + 16), None);
        // Other devices and groups are apart.
        assert_eq!(t.get(4, 17), None);
        set(20 + 16 * PAGE_GROUPS, Some(4));
        assert_eq!((get(20 + 16 * PAGE_GROUPS), get(17)), (Some(4), Some(101)));
        // The largest data block a mapping holds.
        set(32, Some((1 << 40) - 1));
        assert_eq!(get(32), Some((1 << 40) - 1));
        // Device ids beyond dm-thin's 24 bits are not summarized.
        t.set(1 << 24, 5, Some(6));
        assert_eq!(t.get(1 << 24, 5), None);
    }

    #[test]
    fn places_are_bounded_and_given_back_with_their_device() {
        let s = Summaries::new(8);
        let region = |r: u64| VirtBlock(r * PLACE_GROUP * PAGE_GROUPS);
        let put = |dev: u32, v: VirtBlock, b: u64| {
            s.change(DevId(dev), v, || (), |j| (j == 0).then_some(DataBlock(b)))
        };
        for r in 0..64 {
            put(1, region(r), r * 100);
        }
        assert_eq!(s.taken(), 8);
        let kept: Vec<u64> = (0..64)
            .filter(|&r| s.get(DevId(1), region(r)).is_some())
            .collect();
        assert_eq!(kept.len(), 8);
        for &r in &kept {
            assert_eq!(s.get(DevId(1), region(r)), Some(DataBlock(r * 100)));
        }
        // The cache empties the words before it gives the places back.
        for &r in &kept {
            s.clear_blocks(DevId(1), region(r), 64);
        }
        s.release_device(DevId(1));
        assert_eq!(s.taken(), 0);
        put(2, region(5), 7);
        assert_eq!(s.get(DevId(2), region(5)), Some(DataBlock(7)));
        assert_eq!(s.get(DevId(1), region(5)), None);
        // Beyond the regions a key can name: nothing.
        put(2, VirtBlock(u64::MAX - 15), 7);
        assert_eq!(s.get(DevId(2), VirtBlock(u64::MAX - 15)), None);
    }
}
