//! Grace periods for freed data blocks.
//!
//! A request looks a mapping up (in the cache or the trees) and then does its data I/O. If a
//! concurrent discard, delete or copy-on-write frees that block, the block must not be punched
//! and handed to someone else while the request's I/O may still touch it — otherwise a slow
//! read could return another volume's data. Every data I/O therefore runs inside an
//! [`IoGuard`], and the punch of freed blocks first waits ([`Grace::synchronize`]) for every
//! guard that existed when the blocks were freed. Guards cost two atomic operations; waiting is
//! done only by the committer.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::SeqCst};

use tokio::sync::Notify;

/// Two-phase reader counter (the classic epoch scheme). `synchronize` calls must not overlap;
/// the committer runs them one at a time.
pub(crate) struct Grace {
    epoch: AtomicU64,
    active: [AtomicUsize; 2],
    drained: Notify,
}

/// One request's data I/O in progress.
pub(crate) struct IoGuard<'a> {
    grace: &'a Grace,
    phase: usize,
}

impl Drop for IoGuard<'_> {
    fn drop(&mut self) {
        self.grace.leave(self.phase);
    }
}

impl Grace {
    pub(crate) fn new() -> Grace {
        Grace {
            epoch: AtomicU64::new(0),
            active: [AtomicUsize::new(0), AtomicUsize::new(0)],
            drained: Notify::new(),
        }
    }

    /// Starts a data I/O.
    pub(crate) fn enter(&self) -> IoGuard<'_> {
        loop {
            let e = self.epoch.load(SeqCst);
            let phase = (e & 1) as usize;
            self.active[phase].fetch_add(1, SeqCst);
            if self.epoch.load(SeqCst) == e {
                return IoGuard { grace: self, phase };
            }
            // A synchronize flipped the epoch in between: count in the new phase instead.
            self.leave(phase);
        }
    }

    fn leave(&self, phase: usize) {
        if self.active[phase].fetch_sub(1, SeqCst) == 1 {
            self.drained.notify_waiters();
        }
    }

    /// Waits until every [`IoGuard`] that existed when this was called is dropped.
    pub(crate) async fn synchronize(&self) {
        let old = (self.epoch.fetch_add(1, SeqCst) & 1) as usize;
        loop {
            let drained = self.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            if self.active[old].load(SeqCst) == 0 {
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
}
