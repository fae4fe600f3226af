//! Combined pool changes: one task takes the pool's write lock and applies every change that
//! other tasks queued meanwhile (flat combining).
//!
//! Why: every provisioning write ends with a mapping insert under the pool's write lock,
//! a few microseconds. With one insert per lock acquisition, two runtime workers inserting at
//! once meet on the lock, and the loser parks its thread (a futex wait and a context switch,
//! more than the insert itself costs). Here a task queues its change and, if no other task is
//! applying changes, applies the whole queue under one acquisition; otherwise it just awaits
//! its result, which costs a task switch on its worker instead of a thread switch, and the
//! worker goes on with other requests.
//!
//! Progress: the queue is only ever drained by the task holding `active`. A task queues its
//! job *before* it tries to become active; the active task, after it clears `active`, looks
//! at the queue again and carries on if anything is there. So a job queued while another task
//! was active is either drained by that task or by the next one to become active. The
//! applying task drains at most [`MAX_TURNS`] times (one lock acquisition each) before it
//! hands the rest to a new task, so its own request is not held up by an endless stream of
//! others', and it never holds the lock for more than one queue's worth of changes.
//!
//! Cancellation: the jobs do their own bookkeeping and run whether or not their submitter
//! still waits; a drain that had to wait for the lock on the blocking pool (a commit held it)
//! runs to its end there even if the task that started it is dropped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use parking_lot::Mutex;

use crate::device::{DevError, DevResult};
use crate::pool::Pool;

use super::Shared;

/// Drains of the queue one task makes before it hands what is left to a new task.
const MAX_TURNS: usize = 4;

/// A queued change: runs under the pool's write lock and sends its own result.
type Job = Box<dyn FnOnce(&Shared, &mut Pool) + Send>;

/// The queue of pool changes and who is applying them.
#[derive(Default)]
pub(super) struct Combiner {
    queue: Mutex<Vec<Job>>,
    /// Set while one task applies the queue.
    active: AtomicBool,
}

/// Clears `active` when dropped, even if a job panicked.
struct Active<'a>(&'a AtomicBool);

impl Drop for Active<'_> {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
    }
}

impl Active<'_> {
    /// Leaves `active` set for a successor that takes it over.
    fn hand_over(self) {
        std::mem::forget(self);
    }
}

impl Combiner {
    fn pending(&self) -> bool {
        !self.queue.lock().is_empty()
    }

    /// Becomes the applying task if there is work and nobody else is applying it.
    fn activate(&self) -> Option<Active<'_>> {
        if !self.pending() {
            return None;
        }
        self.active
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .ok()
            .map(|_| Active(&self.active))
    }
}

impl Shared {
    /// Runs `f` under the pool's write lock, together with the changes other tasks queued
    /// (see the module docs). `f` does all its own bookkeeping: it runs even if the caller
    /// is cancelled.
    pub(super) async fn write_pool_combined<R, F>(self: &Arc<Self>, f: F) -> DevResult<R>
    where
        F: FnOnce(&Shared, &mut Pool) -> DevResult<R> + Send + 'static,
        R: Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Job = Box::new(move |sh, pool| {
            // The submitter may be gone (cancelled); the change stands anyway.
            let _ = tx.send(f(sh, pool));
        });
        self.combiner.queue.lock().push(job);
        self.combine().await;
        rx.await.map_err(|_| {
            DevError::Io(std::io::Error::other(
                "a queued metadata change was dropped before it ran",
            ))
        })?
    }

    /// Applies queued changes while there are any and no other task does.
    async fn combine(self: &Arc<Self>) {
        for _ in 0..MAX_TURNS {
            let Some(active) = self.combiner.activate() else {
                return;
            };
            let drained = match self.write_quickly() {
                Some(mut pool) => {
                    self.drain(&mut pool);
                    true
                }
                None => false,
            };
            if !drained {
                // A long holder (a commit) has the lock: wait for it on the blocking pool, and
                // finish there, whether or not this task is still around.
                active.hand_over();
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.combine_blocking()).await;
                return;
            }
            drop(active);
        }
        self.carry_on();
    }

    /// One turn of [`combine`](Shared::combine) on the blocking pool, for a caller that
    /// handed `active` over: takes the lock however long that takes and drains.
    fn combine_blocking(self: &Arc<Self>) {
        let active = Active(&self.combiner.active);
        let mut pool = self.pool.write();
        self.drain(&mut pool);
        drop(pool);
        drop(active);
        self.carry_on();
    }

    /// Leaves what is still queued to a new task (its submitters only wait).
    fn carry_on(self: &Arc<Self>) {
        if self.combiner.pending() {
            let me = self.clone();
            tokio::spawn(async move { me.combine().await });
        }
    }

    /// Runs every queued change under `pool`.
    fn drain(&self, pool: &mut Pool) {
        let jobs = std::mem::take(&mut *self.combiner.queue.lock());
        for job in jobs {
            job(self, pool);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use super::*;
    use crate::pool::CreateOptions;
    use crate::volume::VolumePool;

    fn shared() -> (tempfile::TempDir, Arc<Shared>) {
        let dir = tempfile::tempdir().unwrap();
        let opts = CreateOptions {
            data_size: 64 * 65536,
            block_size: 65536,
            metadata_size: Some(2 << 20),
            ..Default::default()
        };
        let pool = Pool::create(dir.path(), &opts).unwrap();
        let vp = VolumePool::open(pool, 64).unwrap();
        (dir, vp.shared.clone())
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap()
    }

    /// Another task queues a change while the applying task drains (after it took the
    /// queue, before it let go) and, finding `active` set, leaves the change to it: the
    /// applying task looks at the queue again after it lets go, so the change is applied.
    #[test]
    fn a_change_queued_during_a_drain_is_applied() {
        let (_dir, sh) = shared();
        runtime().block_on(async {
            let (tx, rx) = tokio::sync::oneshot::channel();
            sh.write_pool_combined(move |sh, _pool| {
                sh.combiner.queue.lock().push(Box::new(move |_, _| {
                    let _ = tx.send(());
                }));
                assert!(sh.combiner.activate().is_none(), "`active` is set");
                Ok(())
            })
            .await
            .unwrap();
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("the change queued during the drain was left behind")
                .unwrap();
        });
    }

    /// While a long holder (a commit) has the lock, changes wait on the blocking pool and are
    /// all applied, once each, when it lets go, and so is one queued during that drain.
    #[test]
    fn changes_queued_behind_a_long_holder_are_applied_once() {
        let (_dir, sh) = shared();
        let applied = Arc::new(AtomicUsize::new(0));
        let (held_tx, held_rx) = std::sync::mpsc::channel();
        let holder = {
            let sh = sh.clone();
            std::thread::spawn(move || {
                let _long = sh.write_long();
                held_tx.send(()).unwrap();
                std::thread::sleep(Duration::from_millis(200));
            })
        };
        held_rx.recv().unwrap();
        runtime().block_on(async {
            let mut tasks = Vec::new();
            for _ in 0..50 {
                let (sh, applied) = (sh.clone(), applied.clone());
                tasks.push(tokio::spawn(async move {
                    sh.write_pool_combined(move |_, _| Ok(applied.fetch_add(1, Ordering::SeqCst)))
                        .await
                        .unwrap()
                }));
            }
            // And one more change queued by another task during that drain.
            let (tx, rx) = tokio::sync::oneshot::channel();
            let late = sh.write_pool_combined(move |sh, _| {
                sh.combiner.queue.lock().push(Box::new(move |_, _| {
                    let _ = tx.send(());
                }));
                Ok(())
            });
            tokio::time::timeout(Duration::from_secs(10), late)
                .await
                .expect("a change queued behind the long holder was left behind")
                .unwrap();
            tokio::time::timeout(Duration::from_secs(10), rx)
                .await
                .expect("the change queued during the drain was left behind")
                .unwrap();
            let mut seen = Vec::new();
            for t in tasks {
                seen.push(
                    tokio::time::timeout(Duration::from_secs(10), t)
                        .await
                        .expect("a change queued behind the long holder was left behind")
                        .unwrap(),
                );
            }
            seen.sort_unstable();
            assert_eq!(seen, (0..50).collect::<Vec<_>>(), "each change ran once");
        });
        holder.join().unwrap();
        assert!(!sh.combiner.active.load(Ordering::SeqCst));
    }
}
