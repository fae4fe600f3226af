//! io_uring for the data file's direct transfers ([`CacheMode::Direct`](super::CacheMode)).
//!
//! A synchronous `O_DIRECT` write that allocates (into a hole of a sparse file) holds ext4's
//! inode lock until the device has the data, so writes from a thread pool queue behind each
//! other; an asynchronous one (io_uring) holds it only while the I/O is submitted. So direct
//! transfers go through a ring:
//!
//! - a task pushes its `READV`/`WRITEV` entry under a lock and submits it itself;
//! - a reaper thread waits for completions and wakes the task (or a thread blocked in
//!   [`Drop`], below);
//! - a short transfer is resubmitted for what remains.
//!
//! That is the data file's shared [`Ring`]. A thread that polls many transfers in an event loop
//! of its own (a vhost-user queue thread) can instead own a [`ThreadRing`]: while it polls its
//! futures inside [`ThreadRing::enter`], their transfers go to that ring, and the kernel
//! signals their completions on the thread's own eventfd, so the thread reaps them itself
//! ([`ThreadRing::reap`]). A completion then costs one wake-up (the polling thread's) instead of
//! two (the reaper's, then the polling thread's), as in QEMU's event loop. Entries are still
//! submitted one by one as they are made: batching a pass's entries into one `io_uring_enter`
//! cut 4k direct reads over vhost-user by a quarter (docs/io-engines.md).
//!
//! The kernel uses the caller's buffers and iovec array until the completion arrives. A
//! transfer future dropped before that (a cancelled request) therefore waits in its `Drop`
//! for the completion, like [`Offloaded`](super::iov::Offloaded) does for the thread pool; it
//! reaps the ring itself while it waits, since a thread ring's owner may be the thread that
//! waits.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::os::fd::RawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use io_uring::{IoUring, opcode, types};
use parking_lot::{Condvar, Mutex};

use super::iov::{Dir, Iovecs};

/// Submission queue entries; more transfers than this in flight wait for room.
const ENTRIES: u32 = 256;
/// user_data of the no-op that wakes the reaper to stop.
const STOP: u64 = u64::MAX;
/// Linux caps an iovec array at IOV_MAX.
const IOV_MAX: usize = 1024;
/// `IORING_ENTER_GETEVENTS` (the crate keeps its constants private).
const IORING_ENTER_GETEVENTS: u32 = 1;
/// How long a cancelled transfer's `Drop` sleeps between looks at the completion queue when
/// no reaper wakes it (a [`ThreadRing`] has none).
const DROP_POLL: Duration = Duration::from_millis(1);

thread_local! {
    /// The ring of the [`ThreadRing`] entered on this thread, if any.
    static CURRENT: RefCell<Option<Arc<Inner>>> = const { RefCell::new(None) };
}

/// Runs `op` until it succeeds, retrying what the kernel may refuse for a while (EINTR, EAGAIN,
/// EBUSY with a full completion backlog). Once an entry is queued it must reach the kernel:
/// its owner waits for its completion.
fn retry_transient(mut op: impl FnMut() -> io::Result<usize>) {
    loop {
        match op() {
            Ok(_) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                tracing::warn!("io_uring submit: {e}; retrying");
                std::thread::sleep(Duration::from_millis(1));
            }
        }
    }
}

/// One transfer's completion slot.
#[derive(Default)]
struct Slot {
    result: Option<i32>,
    waker: Option<Waker>,
}

/// Slots of the transfers in flight, indexed by the entries' user_data.
#[derive(Default)]
struct Slots {
    entries: Vec<Option<Slot>>,
    free: Vec<usize>,
}

impl Slots {
    fn insert(&mut self) -> usize {
        match self.free.pop() {
            Some(i) => {
                self.entries[i] = Some(Slot::default());
                i
            }
            None => {
                self.entries.push(Some(Slot::default()));
                self.entries.len() - 1
            }
        }
    }

    fn get_mut(&mut self, i: usize) -> Option<&mut Slot> {
        self.entries.get_mut(i).and_then(Option::as_mut)
    }

    fn remove(&mut self, i: usize) {
        if let Some(e) = self.entries.get_mut(i)
            && e.take().is_some()
        {
            self.free.push(i);
        }
    }
}

struct Inner {
    ring: IoUring,
    /// Serialises access to the submission queue.
    submit_lock: Mutex<()>,
    /// Also serialises access to the completion queue: whoever reaps holds it.
    slots: Mutex<Slots>,
    /// Signalled with every batch of completions the reaper thread hands out, for `Drop` of a
    /// cancelled transfer.
    completed: Condvar,
    stop: AtomicBool,
}

/// The data file's ring and its reaper thread (stopped on drop).
pub(crate) struct Ring {
    inner: Arc<Inner>,
    reaper: Option<std::thread::JoinHandle<()>>,
}

impl Ring {
    /// A ring and its reaper, or the error when the kernel refuses io_uring.
    pub(crate) fn new() -> io::Result<Ring> {
        let inner = Arc::new(Inner::new()?);
        let reaper_inner = inner.clone();
        let reaper = std::thread::Builder::new()
            .name("uthin-uring".into())
            .spawn(move || reaper_inner.reap_forever())?;
        Ok(Ring {
            inner,
            reaper: Some(reaper),
        })
    }

    /// Transfers all of `iov` at file offset `off` of `fd` (read or write by the iovecs'
    /// direction). A read that meets the end of the file fails.
    ///
    /// The transfer goes through the ring of the [`ThreadRing`] entered on the thread that
    /// polls it, if any, else through this ring.
    pub(crate) async fn transfer(&self, fd: i32, iov: Iovecs<'_>, off: u64) -> io::Result<()> {
        match CURRENT.with(|c| c.borrow().clone()) {
            Some(local) => local.transfer(fd, iov, off).await,
            None => self.inner.transfer(fd, iov, off).await,
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.inner.stop.store(true, Ordering::Release);
        let nop = opcode::Nop::new().build().user_data(STOP);
        self.inner.push_and_submit(&nop);
        if let Some(r) = self.reaper.take() {
            let _ = r.join();
        }
    }
}

/// A ring reaped by the thread that owns it, without a reaper thread: the kernel writes the
/// owner's eventfd with every completion, the owner calls [`ThreadRing::reap`] when that
/// eventfd fires and polls its transfer futures inside [`ThreadRing::enter`].
///
/// The owner must keep watching the eventfd (and reaping) while any transfer it started is in
/// flight; a transfer future dropped early reaps the ring itself while it waits.
pub struct ThreadRing {
    inner: Arc<Inner>,
}

impl ThreadRing {
    /// A ring that signals `eventfd` (an eventfd the caller's event loop watches) with every
    /// completion, or the error when the kernel refuses io_uring.
    pub fn new(eventfd: RawFd) -> io::Result<ThreadRing> {
        let inner = Inner::new()?;
        inner.ring.submitter().register_eventfd(eventfd)?;
        Ok(ThreadRing {
            inner: Arc::new(inner),
        })
    }

    /// Makes this the ring of every direct transfer started on the current thread until the
    /// guard is dropped (enter it around a polling pass of the futures whose completions the
    /// owner reaps).
    pub fn enter(&self) -> Entered {
        let previous = CURRENT.with(|c| c.replace(Some(self.inner.clone())));
        Entered { previous }
    }

    /// Hands every completion the kernel has posted to its transfer and wakes the transfer's
    /// task.
    pub fn reap(&self) {
        let mut slots = self.inner.slots.lock();
        self.inner.reap_locked(&mut slots);
    }
}

/// The scope of [`ThreadRing::enter`]; puts back the ring entered before when dropped.
pub struct Entered {
    previous: Option<Arc<Inner>>,
}

impl Drop for Entered {
    fn drop(&mut self) {
        let previous = self.previous.take();
        CURRENT.with(|c| *c.borrow_mut() = previous);
    }
}

impl Inner {
    fn new() -> io::Result<Inner> {
        Ok(Inner {
            ring: IoUring::new(ENTRIES)?,
            submit_lock: Mutex::new(()),
            slots: Mutex::new(Slots::default()),
            completed: Condvar::new(),
            stop: AtomicBool::new(false),
        })
    }

    /// The loop of [`Ring::transfer`] on this ring.
    async fn transfer(
        self: &Arc<Self>,
        fd: i32,
        mut iov: Iovecs<'_>,
        mut off: u64,
    ) -> io::Result<()> {
        while !iov.is_done() {
            // The iovec array may be held inside `iov` itself (inline, `Iovecs`). It stays in
            // place while the entry is in flight: `iov` lives in this future, which is pinned
            // and only borrows it across the await, and if the future is dropped early,
            // `Pending`'s drop waits for the completion before the future's memory can go.
            let vecs = iov.iovecs();
            let cnt = vecs.len().min(IOV_MAX) as u32;
            let entry = match iov.dir() {
                Dir::Read => opcode::Readv::new(types::Fd(fd), vecs.as_ptr(), cnt)
                    .offset(off)
                    .build(),
                Dir::Write => opcode::Writev::new(types::Fd(fd), vecs.as_ptr(), cnt)
                    .offset(off)
                    .build(),
            };
            let pending = self.start(entry);
            let r = pending.await;
            match r {
                n if n > 0 => {
                    iov.advance(n as usize);
                    off += n as u64;
                }
                0 => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("data file ends at byte {off}, inside a data block"),
                    ));
                }
                e if -e == libc::EINTR || -e == libc::EAGAIN => {}
                e => return Err(io::Error::from_raw_os_error(-e)),
            }
        }
        Ok(())
    }

    /// Queues `entry` under a fresh slot and submits it; the returned future yields its result.
    fn start(self: &Arc<Self>, entry: io_uring::squeue::Entry) -> Pending {
        let idx = self.slots.lock().insert();
        self.push_and_submit(&entry.user_data(idx as u64));
        Pending {
            inner: self.clone(),
            idx,
            done: false,
        }
    }

    /// Pushes one entry and submits. Transient refusals (a full queue, EINTR, EAGAIN, EBUSY)
    /// are retried: once pushed, the entry must reach the kernel, since its owner waits for
    /// its completion.
    fn push_and_submit(&self, entry: &io_uring::squeue::Entry) {
        let _g = self.submit_lock.lock();
        loop {
            // SAFETY: the submission queue is only touched under `submit_lock`. The entry's
            // iovecs and buffers stay alive until its completion has been seen: the `Pending`
            // future (or its Drop) waits for it.
            let pushed = unsafe {
                let mut sq = self.ring.submission_shared();
                let r = sq.push(entry);
                sq.sync();
                r.is_ok()
            };
            // `submit` reads the queue's tail, so it too runs under the lock (the reaper only
            // waits and never reads it). Submitting outside the lock was tried: no gain
            // beyond the noise in an interleaved vhost-bench A/B (docs/io-engines.md).
            retry_transient(|| self.ring.submit());
            if pushed {
                return;
            }
        }
    }

    /// Hands every posted completion to its slot and wakes the slot's task. The caller holds
    /// the slots lock, which serialises access to the completion queue.
    fn reap_locked(&self, slots: &mut Slots) {
        // SAFETY: the completion queue is only touched under the slots lock, which the caller
        // holds (`slots` is its guard's contents).
        let cq = unsafe { self.ring.completion_shared() };
        for cqe in cq {
            if cqe.user_data() == STOP {
                continue;
            }
            if let Some(slot) = slots.get_mut(cqe.user_data() as usize) {
                slot.result = Some(cqe.result());
                if let Some(w) = slot.waker.take() {
                    w.wake();
                }
            }
        }
    }

    /// The reaper thread of a shared [`Ring`]: waits for completions and hands them out.
    fn reap_forever(&self) {
        loop {
            // SAFETY: to_submit = 0, GETEVENTS, no argument: only waits for completions and
            // passes no pointer (submissions are made by their owners).
            let waited = unsafe {
                self.ring
                    .submitter()
                    .enter::<libc::sigset_t>(0, 1, IORING_ENTER_GETEVENTS, None)
            };
            if let Err(e) = waited
                && e.raw_os_error() != Some(libc::EINTR)
            {
                tracing::warn!("io_uring wait: {e}; retrying");
                std::thread::sleep(Duration::from_millis(1));
            }
            let mut slots = self.slots.lock();
            self.reap_locked(&mut slots);
            drop(slots);
            self.completed.notify_all();
            if self.stop.load(Ordering::Acquire) {
                return;
            }
        }
    }
}

/// One submitted entry; resolves to its result (bytes moved or a negated errno).
struct Pending {
    inner: Arc<Inner>,
    idx: usize,
    done: bool,
}

impl Future for Pending {
    type Output = i32;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<i32> {
        let idx = self.idx;
        let mut slots = self.inner.slots.lock();
        let Some(slot) = slots.get_mut(idx) else {
            drop(slots);
            self.done = true;
            return Poll::Ready(-libc::EIO);
        };
        match slot.result {
            Some(r) => {
                slots.remove(idx);
                drop(slots);
                self.done = true;
                Poll::Ready(r)
            }
            None => {
                slot.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // Cancelled while the kernel may still use the buffers: wait for the completion. This
        // blocks the current thread for at most one I/O; it only happens when a request is
        // abandoned mid-flight (client gone, shutdown). A thread ring's completions are reaped
        // by nobody else while its owner is blocked here (or gone), so reap from here too.
        let mut slots = self.inner.slots.lock();
        loop {
            self.inner.reap_locked(&mut slots);
            if slots.get_mut(self.idx).is_none_or(|s| s.result.is_some()) {
                break;
            }
            self.inner.completed.wait_for(&mut slots, DROP_POLL);
        }
        slots.remove(self.idx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tests::rt;
    use std::io::{IoSlice, IoSliceMut, Write};
    use std::os::fd::AsRawFd;

    #[test]
    fn reads_writes_and_cancellation() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[0u8; 1 << 20]).unwrap();
        let fd = f.as_raw_fd();
        let ring = Ring::new().unwrap();
        rt().block_on(async {
            let a = vec![3u8; 4096];
            let b = vec![4u8; 8192];
            ring.transfer(
                fd,
                Iovecs::for_write(&[IoSlice::new(&a), IoSlice::new(&b)]),
                4096,
            )
            .await
            .unwrap();
            let mut c = vec![0u8; 12288 + 4096];
            ring.transfer(fd, Iovecs::for_read(&mut [IoSliceMut::new(&mut c)]), 0)
                .await
                .unwrap();
            assert!(c[..4096].iter().all(|&x| x == 0));
            assert!(c[4096..8192].iter().all(|&x| x == 3));
            assert!(c[8192..16384].iter().all(|&x| x == 4));
            // Many at once, more than the ring holds.
            let bufs: Vec<Vec<u8>> = (0..600).map(|i| vec![(i % 251) as u8; 512]).collect();
            let slices: Vec<[IoSlice<'_>; 1]> = bufs.iter().map(|b| [IoSlice::new(b)]).collect();
            let futs = slices
                .iter()
                .enumerate()
                .map(|(i, s)| ring.transfer(fd, Iovecs::for_write(s), i as u64 * 512));
            for r in futures_util::future::join_all(futs).await {
                r.unwrap();
            }
            let mut all = vec![0u8; 600 * 512];
            ring.transfer(fd, Iovecs::for_read(&mut [IoSliceMut::new(&mut all)]), 0)
                .await
                .unwrap();
            for (i, chunk) in all.chunks(512).enumerate() {
                assert!(chunk.iter().all(|&x| x == (i % 251) as u8), "chunk {i}");
            }
            // Dropped after its first poll: Drop waits for the completion, then the buffer
            // may go.
            let mut d = vec![0u8; 65536];
            {
                let mut bufs = [IoSliceMut::new(&mut d)];
                let mut fut = Box::pin(ring.transfer(fd, Iovecs::for_read(&mut bufs), 0));
                let waker = futures_util::task::noop_waker();
                let mut cx = Context::from_waker(&waker);
                let _ = fut.as_mut().poll(&mut cx);
                drop(fut);
            }
            drop(d);
            // Past the end of the file: a clear error.
            let mut e = vec![0u8; 4096];
            let err = ring
                .transfer(
                    fd,
                    Iovecs::for_read(&mut [IoSliceMut::new(&mut e)]),
                    1 << 20,
                )
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
        drop(ring);
    }

    /// Counts its wakes.
    #[derive(Default)]
    struct CountWaker(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for CountWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn thread_ring_signals_and_is_reaped_by_its_owner() {
        // A lost completion would make a transfer's Drop wait forever.
        crate::data::tests::with_time_limit("thread ring transfer", thread_ring_case);
    }

    fn thread_ring_case() {
        use vmm_sys_util::eventfd::EventFd;
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let fd = f.as_raw_fd();
        let shared = Ring::new().unwrap();
        let efd = EventFd::new(0).unwrap();
        let local = ThreadRing::new(efd.as_raw_fd()).unwrap();
        let count = Arc::new(CountWaker::default());
        let waker = Waker::from(count.clone());
        let mut cx = Context::from_waker(&waker);

        // Started inside `enter`: they go to the thread ring.
        let a = vec![7u8; 4096];
        let b = vec![8u8; 4096];
        let sa = [IoSlice::new(&a)];
        let sb = [IoSlice::new(&b)];
        let mut wa = Box::pin(shared.transfer(fd, Iovecs::for_write(&sa), 0));
        let mut wb = Box::pin(shared.transfer(fd, Iovecs::for_write(&sb), 4096));
        {
            let _g = local.enter();
            assert!(wa.as_mut().poll(&mut cx).is_pending());
            assert!(wb.as_mut().poll(&mut cx).is_pending());
        }
        // The kernel signals the owner's eventfd; nobody hands the results out but `reap`.
        let mut signalled = 0;
        while signalled < 2 {
            signalled += efd.read().unwrap();
        }
        assert!(
            wa.as_mut().poll(&mut cx).is_pending(),
            "reaped by someone else"
        );
        local.reap();
        assert!(count.0.load(Ordering::SeqCst) >= 1, "reap woke no task");
        assert!(matches!(wa.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
        assert!(matches!(wb.as_mut().poll(&mut cx), Poll::Ready(Ok(()))));
        assert!(
            shared.inner.slots.lock().entries.is_empty(),
            "went to the shared ring"
        );

        // Outside `enter`, transfers go to the shared ring, as before.
        let mut back = vec![0u8; 8192];
        rt().block_on(shared.transfer(fd, Iovecs::for_read(&mut [IoSliceMut::new(&mut back)]), 0))
            .unwrap();
        assert!(back[..4096].iter().all(|&x| x == 7));
        assert!(back[4096..].iter().all(|&x| x == 8));

        // Cancelled on the owner thread, which does not reap while it waits in the Drop: the
        // Drop reaps the completion itself, then the buffer may go.
        let mut c = vec![0u8; 65536];
        {
            let mut bufs = [IoSliceMut::new(&mut c)];
            let mut fut = Box::pin(shared.transfer(fd, Iovecs::for_read(&mut bufs), 0));
            let _g = local.enter();
            assert!(fut.as_mut().poll(&mut cx).is_pending());
            drop(fut);
        }
        drop(c);
        assert!(local.inner.slots.lock().entries.iter().all(Option::is_none));
    }
}
