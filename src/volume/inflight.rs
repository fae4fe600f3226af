//! Per-block serialisation of mapping changes (DESIGN invariant 9).
//!
//! A write that must provision or copy a block holds that block's slot from its decision
//! ("unmapped" / "shared") until the new mapping is in the trees, so two writes to one block
//! never allocate twice and the second sees the first's mapping. Only requests on the same
//! (device, virtual block) ever wait for each other; overwrites of owned blocks and reads take
//! no slot at all. Slots exist only while someone holds or waits for them.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Arc;

use parking_lot::Mutex;

use crate::units::{DevId, VirtBlock};

const SHARDS: usize = 16;

type Key = (DevId, VirtBlock);

struct Slot {
    lock: Arc<tokio::sync::Mutex<()>>,
    /// Holders and waiters; the slot is removed when it drops to 0.
    users: usize,
}

/// The table of busy blocks.
pub(crate) struct InFlight {
    shards: Vec<Mutex<HashMap<Key, Slot>>>,
    hasher: std::collections::hash_map::RandomState,
}

/// Counts one user of a slot; removes the slot with its last user, also when a waiter is
/// cancelled.
struct Registration<'a> {
    table: &'a InFlight,
    key: Key,
}

impl Drop for Registration<'_> {
    fn drop(&mut self) {
        let mut shard = self.table.shard(&self.key).lock();
        if let Some(slot) = shard.get_mut(&self.key) {
            slot.users -= 1;
            if slot.users == 0 {
                shard.remove(&self.key);
            }
        }
    }
}

/// Exclusive right to change the mapping of one block; released on drop.
pub(crate) struct BlockGuard<'a> {
    // Field order matters: the mutex is released before the registration is dropped.
    _held: tokio::sync::OwnedMutexGuard<()>,
    _reg: Registration<'a>,
}

impl InFlight {
    pub(crate) fn new() -> InFlight {
        InFlight {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: Default::default(),
        }
    }

    fn shard(&self, key: &Key) -> &Mutex<HashMap<Key, Slot>> {
        // The modulo keeps the index in range.
        &self.shards[(self.hasher.hash_one(key) as usize) % SHARDS]
    }

    /// Waits until no one else changes the mapping of `(dev, v)`, then holds it.
    pub(crate) async fn lock(&self, dev: DevId, v: VirtBlock) -> BlockGuard<'_> {
        let key = (dev, v);
        let lock = {
            let mut shard = self.shard(&key).lock();
            let slot = shard.entry(key).or_insert_with(|| Slot {
                lock: Arc::new(tokio::sync::Mutex::new(())),
                users: 0,
            });
            slot.users += 1;
            slot.lock.clone()
        };
        let reg = Registration { table: self, key };
        let held = lock.lock_owned().await;
        BlockGuard {
            _held: held,
            _reg: reg,
        }
    }

    /// Number of busy slots (tests).
    #[cfg(test)]
    pub(crate) fn busy(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn one_holder_per_block_and_slots_go_away() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let table = Arc::new(InFlight::new());
        let inside = Arc::new(AtomicUsize::new(0));
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..64 {
                let table = table.clone();
                let inside = inside.clone();
                tasks.push(tokio::spawn(async move {
                    let _g = table.lock(DevId(1), VirtBlock(i % 2)).await;
                    assert!(inside.fetch_add(1, Ordering::SeqCst) < 2);
                    tokio::task::yield_now().await;
                    inside.fetch_sub(1, Ordering::SeqCst);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            // A cancelled waiter leaves nothing behind.
            let g = table.lock(DevId(1), VirtBlock(7)).await;
            let waiter = table.lock(DevId(1), VirtBlock(7));
            let r = tokio::time::timeout(std::time::Duration::from_millis(10), waiter).await;
            assert!(r.is_err());
            drop(g);
        });
        assert_eq!(table.busy(), 0);
    }
}
