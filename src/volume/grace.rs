//! Grace periods for freed data blocks.
//!
//! A request looks a mapping up (in the cache or the trees) and then does its data I/O. If a
//! concurrent discard, delete or copy-on-write frees that block, the block must not be punched
//! and handed to someone else while the request's I/O may still touch it — otherwise a slow
//! read could return another volume's data. Every data I/O therefore runs inside an
//! [`IoGuard`], and the punch of freed blocks first waits ([`Grace::synchronize`]) for every
//! guard that existed when the blocks were freed. Guards cost two atomic operations on a
//! counter of their thread's own; waiting is done only by the committer.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};

use crossbeam_utils::CachePadded;
use tokio::sync::Notify;

/// Counters per phase, one per cache line, so that requests on different threads do not
/// write the same line (two shared counters were 2 % of a worker's samples in a profile of
/// cached 4 KiB reads, docs/volume.md).
const STRIPES: usize = 16;

/// A counter alone on its cache line.
type Stripe = CachePadded<AtomicUsize>;

thread_local! {
    /// The stripe this thread counts its guards in, assigned round robin on first use.
    static MY_STRIPE: Cell<Option<usize>> = const { Cell::new(None) };
}

/// The calling thread's stripe.
fn my_stripe() -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    MY_STRIPE.with(|s| {
        s.get().unwrap_or_else(|| {
            let i = NEXT.fetch_add(1, SeqCst) % STRIPES;
            s.set(Some(i));
            i
        })
    })
}

/// Two-phase reader counter (the classic epoch scheme), striped by thread. `synchronize`
/// calls must not overlap; the committer runs them one at a time.
pub(crate) struct Grace {
    epoch: AtomicU64,
    active: [[Stripe; STRIPES]; 2],
    /// Set while a `synchronize` waits: only then does a guard that empties its stripe
    /// notify (a notification is a write to a shared line too).
    waiting: AtomicBool,
    drained: Notify,
}

/// One request's data I/O in progress. It may be dropped on another thread than the one
/// that took it: it remembers its stripe.
pub(crate) struct IoGuard<'a> {
    grace: &'a Grace,
    phase: usize,
    stripe: usize,
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.grace.leave(self.phase, self.stripe);
    }
}

impl Grace {
    pub(crate) fn new() -> Grace {
        Grace {
            epoch: AtomicU64::new(0),
            active: Default::default(),
            waiting: AtomicBool::new(false),
            drained: Notify::new(),
        }
    }

    /// Starts a data I/O.
    pub(crate) fn enter(&self) -> IoGuard<'_> {
        let stripe = my_stripe();
        loop {
            let e = self.epoch.load(SeqCst);
            let phase = (e & 1) as usize;
            self.active[phase][stripe].fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return IoGuard {
                    grace: self,
                    phase,
                    stripe,
                };
            }
            // A synchronize flipped the epoch in between: count in the new phase instead.
            self.leave(phase, stripe);
        }
    }

    fn leave(&self, phase: usize, stripe: usize) {
        // SeqCst orders this against `synchronize`: either its sum sees the decrement, or
        // the decrement comes after the sum's read of this stripe, hence after `waiting` was
        // set, and the load below sees it.
        if self.active[phase][stripe].fetch_sub(1, SeqCst) == 1 && self.waiting.load(SeqCst) {
            self.drained.notify_waiters();
        }
    }

    /// Waits until every [`IoGuard`] that existed when this was called is dropped.
    ///
    /// Summing the stripes one by one is enough: a guard of the old phase counted after its
    /// stripe was read entered before the epoch flip but checks the epoch again after
    /// counting itself, sees the flip and moves to the new phase.
    pub(crate) async fn synchronize(&self) {
        /// Clears `waiting` when the wait ends, also when it is cancelled.
        struct Waiting<'a>(&'a AtomicBool);
        impl Drop for Waiting<'_> {
            fn drop(&mut self) {
                self.0.store(false, SeqCst);
            }
        }
        self.waiting.store(true, SeqCst);
        let _waiting = Waiting(&self.waiting);
        let old = (self.epoch.fetch_add(1, SeqCst) & 1) as usize;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            let left: usize = self.active[old].iter().map(|s| s.load(SeqCst)).sum();
            if left == 0 {
                return;
            }
            drained.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn synchronize_waits_for_older_guards_only() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let g = Arc::new(Grace::new());
        rt.block_on(async {
            let old = g.enter();
            let g2 = g.clone();
            let waiter = tokio::spawn(async move { g2.synchronize().await });
            tokio::time::sleep(Duration::from_millis(20)).await;
            // A guard taken after synchronize started does not hold it up...
            let newer = g.enter();
            assert!(!waiter.is_finished());
            // ...the older one does.
            drop(old);
            tokio::time::timeout(Duration::from_secs(5), waiter)
                .await
                .expect("synchronize returns once the old guard is gone")
                .unwrap();
            drop(newer);
            g.synchronize().await;
        });
    }

    /// Guards taken on several threads (so in several stripes) and dropped on another one
    /// all hold a synchronize up until the last is gone.
    #[test]
    fn synchronize_waits_for_guards_of_every_stripe() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let g = Grace::new();
        let guards: Vec<IoGuard<'_>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..STRIPES + 3).map(|_| s.spawn(|| g.enter())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let stripes: std::collections::HashSet<usize> = guards.iter().map(|x| x.stripe).collect();
        assert!(stripes.len() > 1, "the threads all counted in one stripe");
        rt.block_on(async {
            let sync = g.synchronize();
            tokio::pin!(sync);
            let mut guards = guards;
            while let Some(last) = guards.pop() {
                // Not done while any guard is left, even in another stripe.
                let waited = tokio::time::timeout(Duration::from_millis(5), sync.as_mut()).await;
                assert!(waited.is_err(), "{} guards left", guards.len() + 1);
                drop(last);
            }
            tokio::time::timeout(Duration::from_secs(5), sync)
                .await
                .expect("synchronize returns once every guard is gone");
        });
        assert!(!g.waiting.load(SeqCst));
    }
}
