//! Positional vectored I/O on a raw file descriptor, done either right here (optionally with
//! `RWF_NOWAIT`) or on tokio's blocking thread pool with buffers that the caller only borrows.
//!
//! The blocking-pool path is the one place in the data engine where a buffer borrowed by a
//! future is used by another thread. [`Offloaded`] makes that safe against cancellation: its
//! `Drop` waits until the other thread is done with the buffers (or until the job was dropped
//! without running), so dropping the future early can never let the I/O outlive the borrow.

use std::fs::File;
use std::future::Future;
use std::io::{self, IoSlice, IoSliceMut};
use std::marker::PhantomData;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use smallvec::SmallVec;

/// Direction of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// File → buffers.
    Read,
    /// Buffers → file.
    Write,
}

/// Iovecs an [`Iovecs`] holds without a heap allocation.
const INLINE_IOVECS: usize = 4;

/// An iovec array that points into buffers borrowed for `'a` (mutably for reads).
pub(crate) struct Iovecs<'a> {
    /// Held inline up to [`INLINE_IOVECS`]: a request's iovecs are usually one or two, and a
    /// heap allocation per request cost a `malloc` and a `free` on every cached read. So an
    /// `Iovecs` must not move while a submitted io_uring entry points at its array (see
    /// `uring::Inner::transfer`).
    iov: SmallVec<[libc::iovec; INLINE_IOVECS]>,
    /// Index of the first iovec not yet fully transferred.
    first: usize,
    dir: Dir,
    _borrow: PhantomData<&'a mut [u8]>,
}

impl<'a> Iovecs<'a> {
    /// Describes `bufs` as the destination of a read.
    pub(crate) fn for_read(bufs: &'a mut [IoSliceMut<'_>]) -> Self {
        let iov = bufs
            .iter_mut()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: b.len(),
            })
            .collect();
        Iovecs {
            iov,
            first: 0,
            dir: Dir::Read,
            _borrow: PhantomData,
        }
    }

    /// Describes `bufs` as the source of a write.
    pub(crate) fn for_write(bufs: &'a [IoSlice<'_>]) -> Self {
        let iov = bufs
            .iter()
            .filter(|b| !b.is_empty())
            .map(|b| libc::iovec {
                // The kernel only reads through this pointer for a write.
                iov_base: b.as_ptr() as *mut libc::c_void,
                iov_len: b.len(),
            })
            .collect();
        Iovecs {
            iov,
            first: 0,
            dir: Dir::Write,
            _borrow: PhantomData,
        }
    }

    /// Direction of the transfer.
    pub(crate) fn dir(&self) -> Dir {
        self.dir
    }

    /// The iovecs still to transfer.
    pub(crate) fn iovecs(&self) -> &[libc::iovec] {
        &self.iov[self.first..]
    }

    /// Bytes still to transfer.
    pub(crate) fn remaining(&self) -> usize {
        self.iov[self.first..].iter().map(|v| v.iov_len).sum()
    }

    pub(crate) fn is_done(&self) -> bool {
        self.first == self.iov.len()
    }

    /// Marks `n` more bytes as transferred.
    pub(crate) fn advance(&mut self, mut n: usize) {
        while n > 0 && self.first < self.iov.len() {
            let v = &mut self.iov[self.first];
            if n >= v.iov_len {
                n -= v.iov_len;
                self.first += 1;
            } else {
                // SAFETY: n < iov_len, so the new base stays inside the same buffer.
                v.iov_base = unsafe { v.iov_base.cast::<u8>().add(n).cast() };
                v.iov_len -= n;
                n = 0;
            }
        }
    }

    /// One preadv2/pwritev2 of what remains, at file offset `off`. Returns the bytes moved.
    fn syscall(&self, fd: i32, off: u64, flags: i32) -> io::Result<usize> {
        let rest = &self.iov[self.first..];
        // Linux caps an iovec array at IOV_MAX (1024); a longer list is finished by the loop
        // in the caller.
        let cnt = rest.len().min(1024) as libc::c_int;
        let off = i64::try_from(off).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: every iovec points into a live buffer borrowed for 'a (mutably for reads), as
        // built by `for_read`/`for_write` and moved forward only within its buffer by `advance`.
        let n = unsafe {
            match self.dir {
                Dir::Read => libc::preadv2(fd, rest.as_ptr(), cnt, off, flags),
                Dir::Write => libc::pwritev2(fd, rest.as_ptr(), cnt, off, flags),
            }
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Transfers everything that remains, blocking the calling thread. `off` is the file offset
    /// of the first remaining byte. A read that meets the end of the file fails.
    pub(crate) fn transfer_all(&mut self, fd: i32, mut off: u64) -> io::Result<()> {
        while !self.is_done() {
            match self.syscall(fd, off, 0) {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("data file ends at byte {off}, inside a data block"),
                    ));
                }
                Ok(n) => {
                    self.advance(n);
                    off += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Tries the transfer without blocking (`RWF_NOWAIT`): moves what the page cache can
    /// serve right now. Returns the bytes moved; `Err` only for real errors, including
    /// `EOPNOTSUPP` when the file does not support non-blocking I/O of this kind.
    pub(crate) fn transfer_nowait(&mut self, fd: i32, mut off: u64) -> io::Result<usize> {
        let mut moved = 0;
        while !self.is_done() {
            match self.syscall(fd, off, libc::RWF_NOWAIT) {
                Ok(0) => break,
                Ok(n) => {
                    self.advance(n);
                    off += n as u64;
                    moved += n;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(moved)
    }
}

// SAFETY: an `Iovecs<'a>` stands for `&'a mut` borrows of byte buffers, which are Send; the raw
// pointers only lose that because the compiler cannot see the borrow. For the `'static` form
// sent to a pool thread, `Offloaded` keeps the buffers alive and unaliased (see `prepare`).
unsafe impl Send for Iovecs<'_> {}

/// Set when the pool thread no longer touches the buffers: after the syscalls, or when the job
/// is dropped without running (runtime shutdown).
struct Finished {
    done: Mutex<bool>,
    cv: Condvar,
}

/// Marks the job finished when dropped, whether it ran or not.
struct FinishGuard(Arc<Finished>);

impl Drop for FinishGuard {
    fn drop(&mut self) {
        *self.0.done.lock() = true;
        self.0.cv.notify_all();
    }
}

/// A transfer handed to a pool thread with buffers borrowed for `'a`: resolves to the
/// transfer's result (`T` is what the job reports besides success: `()` for a plain transfer).
pub(crate) struct Offloaded<'a, T = ()> {
    result: tokio::sync::oneshot::Receiver<io::Result<T>>,
    finished: Arc<Finished>,
    _borrow: PhantomData<&'a mut [u8]>,
}

/// One transfer to run on another thread, and what reports its end.
type Job = Box<dyn FnOnce() + Send + 'static>;

/// The work of a plain transfer, `iov.transfer_all(file, off)`, keeping the file open until
/// it has run.
fn transfer_at(
    file: &Arc<File>,
    off: u64,
) -> impl FnOnce(&mut Iovecs<'static>) -> io::Result<()> + Send + 'static {
    let file = file.clone();
    move |iov| iov.transfer_all(file.as_raw_fd(), off)
}

/// Packs `iov.transfer_all(file, off)` as a job for another thread, and the future that waits
/// for it.
fn prepare<'a>(file: &Arc<File>, iov: Iovecs<'a>, off: u64) -> (Job, Offloaded<'a>) {
    prepare_with(iov, transfer_at(file, off))
}

/// Packs `work(iov)` as a job for another thread, and the future that waits for its result.
/// `work` is the only code that may touch the buffers, and only until it returns.
fn prepare_with<'a, T: Send + 'static>(
    iov: Iovecs<'a>,
    work: impl FnOnce(&mut Iovecs<'static>) -> io::Result<T> + Send + 'static,
) -> (Job, Offloaded<'a, T>) {
    // SAFETY: this only erases the lifetime of the borrow. The returned `Offloaded<'a>` keeps
    // the buffers borrowed for as long as it exists, and its `Drop` blocks until `FinishGuard`
    // has run, i.e. until the pool thread has returned from its last syscall on them or the job
    // was dropped unrun. So no syscall touches the buffers after `'a` ends, whether the future
    // is awaited to completion or dropped (cancelled) half way. The one way around this is to
    // leak the future (`mem::forget` of a polled future), which nothing in uthin does; callers
    // outside the crate only see futures that own an `Offloaded` and drop it normally.
    let mut iov: Iovecs<'static> =
        unsafe { std::mem::transmute::<Iovecs<'a>, Iovecs<'static>>(iov) };
    let finished = Arc::new(Finished {
        done: Mutex::new(false),
        cv: Condvar::new(),
    });
    let guard = FinishGuard(finished.clone());
    let (tx, rx) = tokio::sync::oneshot::channel();
    let job: Job = Box::new(move || {
        let r = work(&mut iov);
        // The buffers are no longer touched: release the borrow before reporting.
        drop(iov);
        drop(guard);
        // The waiter may be gone (cancelled); nothing to report to then.
        let _ = tx.send(r);
    });
    let fut = Offloaded {
        result: rx,
        finished,
        _borrow: PhantomData,
    };
    (job, fut)
}

/// Starts `iov.transfer_all(file, off)` on tokio's blocking thread pool.
pub(crate) fn offload<'a>(file: &Arc<File>, iov: Iovecs<'a>, off: u64) -> Offloaded<'a> {
    let (job, fut) = prepare(file, iov, off);
    // Dropped unrun at runtime shutdown: the job's guard then ends the borrow and its sender
    // reports the failure.
    drop(tokio::task::spawn_blocking(job));
    fut
}

/// How long at most a writer thread that found the queue empty keeps looking for a new write
/// before it ends its turn; never longer than it has spent running writes in this turn, and
/// only while writes come in a stream ([`QueueState::lingers_left`]). Ending a turn at once made the
/// next write start a new one: a blocking-pool thread woken for it and put back to sleep
/// after it. Once requests came a little slower than the writers ran them, that was a wake-up
/// every few writes, and the wake-ups slowed the requests further: fresh 4 KiB writes on a
/// large volume ran at half speed or full speed for seconds at a time (docs/io-engines.md,
/// "Writer threads that linger").
const LINGER: Duration = Duration::from_micros(50);

/// Most threads running one file's queued writes at a time. Buffered writes to one regular
/// file hold its inode lock for the whole syscall (ext4, XFS), so more writers only spin on
/// that lock; two keep one write ready while the other is in the kernel.
const MAX_WRITERS: usize = 2;

/// Writes of at least this many bytes never start a second writer: the first holds the
/// inode lock for as long as it copies one (a 1 MiB write, about 300 µs), and a second spins
/// on the lock all that time (`rwsem_spin_on_owner` was 23 % of the server's samples during
/// 1 MiB writes over vhost-user, docs/io-engines.md). Small writes still get two writers.
const LARGE_WRITE: usize = 128 * 1024;

/// A file's buffered writes, run by at most [`MAX_WRITERS`] threads of tokio's blocking pool
/// that each take queued writes until none are left (and none came for a moment, [`LINGER`]).
///
/// Handing each write to its own pool thread (`offload`) woke an idle thread per write; with
/// writes queued, a writer that is already running takes the next one without a wake-up, so
/// under load a write costs one hand-back instead of two thread switches.
#[derive(Default)]
pub(crate) struct WriteQueue {
    state: Mutex<QueueState>,
}

#[derive(Default)]
struct QueueState {
    jobs: std::collections::VecDeque<Job>,
    /// Writer threads started and not yet finished.
    writers: usize,
    /// When the last writer to end its turn (leaving none) found the queue empty.
    emptied: Option<Instant>,
    /// Lingers ([`LINGER`]) that may still run out in a row before writers stop lingering; 0:
    /// writers do not linger. Set to [`FUTILE_LINGERS`] when a write that had to start a
    /// writer came within `LINGER` of the queue going empty, so that lingering would have
    /// caught it, and whenever a linger catches a write. At a steady moderate rate (one write
    /// a millisecond) every turn would otherwise spin for `LINGER` in vain: 17–42 % more CPU
    /// per write (docs/io-engines.md).
    lingers_left: u32,
}

/// Lingers in a row that catch no write before writers stop lingering. One is not enough: a
/// stream of writes has gaps longer than `LINGER` now and then, and a writer that stopped
/// lingering at the first of them paid a wake-up for each short gap after it (measured: a
/// median 8 % fewer fresh writes a second than lingering always, docs/io-engines.md).
const FUTILE_LINGERS: u32 = 2;

impl QueueState {
    /// Whether writers linger when they find the queue empty.
    fn lingering(&self) -> bool {
        self.lingers_left > 0
    }

    /// Counts in a new writer if `jobs` needs one after a write of `len` bytes was queued,
    /// deciding whether writers linger when it is the only one; returns whether to start it.
    fn start_writer(&mut self, len: usize) -> bool {
        let start = self.writers == 0
            || (self.writers < MAX_WRITERS && self.jobs.len() > self.writers && len < LARGE_WRITE);
        if start && self.writers == 0 && self.emptied.is_some_and(|t| t.elapsed() <= LINGER) {
            self.lingers_left = FUTILE_LINGERS;
        }
        self.writers += usize::from(start);
        start
    }
}

impl WriteQueue {
    /// Queues `iov.transfer_all(file, off)` for the file's writer threads.
    pub(crate) fn offload<'a>(
        self: &Arc<Self>,
        file: &Arc<File>,
        iov: Iovecs<'a>,
        off: u64,
    ) -> Offloaded<'a> {
        self.offload_with(iov, transfer_at(file, off))
    }

    /// Queues `work(iov)` like a write: for a step that must run right before the transfer
    /// and under the same conditions (it changes the file too), so that the two cost one
    /// hand-over to a writer thread instead of two (`RealFile::clone_and_write`).
    pub(crate) fn offload_with<'a, T: Send + 'static>(
        self: &Arc<Self>,
        iov: Iovecs<'a>,
        work: impl FnOnce(&mut Iovecs<'static>) -> io::Result<T> + Send + 'static,
    ) -> Offloaded<'a, T> {
        let len = iov.remaining();
        let (job, fut) = prepare_with(iov, work);
        self.push(job, len);
        fut
    }

    /// Queues `job` (a write of `len` bytes), starting a writer thread when none runs or
    /// when small jobs pile up behind the running ones.
    fn push(self: &Arc<Self>, job: Job, len: usize) {
        let mut s = self.state.lock();
        s.jobs.push_back(job);
        let start = s.start_writer(len);
        drop(s);
        if start {
            let writer = Writer(self.clone());
            drop(tokio::task::spawn_blocking(move || drop(writer)));
        }
    }
}

/// One writer thread's turn, counted in `writers`. Its work is done in `Drop`, so that it
/// happens however the turn ends: run by the pool thread (the normal case) or dropped unrun
/// at runtime shutdown (the queued writes then run on the dropping thread). The last look at
/// the queue and the count going down happen under one lock, so a job queued after that look
/// finds `writers` lowered and starts a new writer.
struct Writer(Arc<WriteQueue>);

impl Drop for Writer {
    fn drop(&mut self) {
        // Time spent running jobs this turn, and when the queue was last found empty.
        let mut busy = Duration::ZERO;
        let mut idle_since = None;
        loop {
            let mut s = self.0.state.lock();
            if let Some(job) = s.jobs.pop_front() {
                if idle_since.is_some() {
                    s.lingers_left = FUTILE_LINGERS;
                }
                drop(s);
                let t0 = Instant::now();
                job();
                busy += t0.elapsed();
                idle_since = None;
                continue;
            }
            let since = *idle_since.get_or_insert_with(Instant::now);
            if !s.lingering() || since.elapsed() >= busy.min(LINGER) {
                if s.lingering() && !busy.is_zero() {
                    s.lingers_left -= 1;
                }
                s.writers -= 1;
                if s.writers == 0 {
                    s.emptied = Some(since);
                }
                return;
            }
            drop(s);
            // Lets a runnable thread of this CPU (a runtime worker queueing the next write)
            // go first; the writer stays runnable, so that write needs no wake-up.
            std::thread::yield_now();
        }
    }
}

impl<T> Future for Offloaded<'_, T> {
    type Output = io::Result<T>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.result).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(_)) => Poll::Ready(Err(io::Error::other(
                "data file I/O job was dropped before it ran (runtime shutting down)",
            ))),
        }
    }
}

impl<T> Drop for Offloaded<'_, T> {
    fn drop(&mut self) {
        // Cancellation while a pool thread may still be using the buffers: wait for it. This
        // blocks the current thread for at most one syscall (or, for a queued write, the writes
        // queued before it); it only happens when a request is abandoned mid-flight (client
        // gone, shutdown).
        let mut done = self.finished.done.lock();
        while !*done {
            self.finished.cv.wait(&mut done);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn advance_walks_across_iovecs() {
        let mut a = [0u8; 3];
        let mut b = [0u8; 5];
        let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
        let mut iov = Iovecs::for_read(&mut bufs);
        assert_eq!(iov.remaining(), 8);
        iov.advance(2);
        assert_eq!(iov.remaining(), 6);
        iov.advance(3);
        assert_eq!(iov.remaining(), 3);
        iov.advance(3);
        assert!(iov.is_done());
    }

    fn writers(q: &WriteQueue) -> usize {
        q.state.lock().writers
    }

    /// Queued writes from many tasks all land, at most `MAX_WRITERS` threads run them, and
    /// the writers are gone once the queue is empty; a write dropped while queued has landed
    /// when its `Drop` returns (the buffer may go).
    #[test]
    fn queued_writes_land_and_writers_end() {
        // A queued write that no writer runs makes its future's Drop wait forever.
        crate::data::tests::with_time_limit("queued writes", queued_writes_body);
    }

    fn queued_writes_body() {
        let f = Arc::new(tempfile::tempfile().unwrap());
        let q = Arc::new(WriteQueue::default());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_time()
            .build()
            .unwrap();
        let all = async {
            let mut tasks = Vec::new();
            for t in 0..8u8 {
                let (f, q) = (f.clone(), q.clone());
                tasks.push(tokio::spawn(async move {
                    for i in 0..64u64 {
                        let buf = [t + 1; 512];
                        let bufs = [IoSlice::new(&buf)];
                        let off = (u64::from(t) * 64 + i) * 512;
                        q.offload(&f, Iovecs::for_write(&bufs), off).await.unwrap();
                    }
                }));
            }
            // Many queued at once from one place: never more than MAX_WRITERS threads.
            let bufs: Vec<[u8; 512]> = (0..64).map(|_| [0xee; 512]).collect();
            let slices: Vec<[IoSlice<'_>; 1]> = bufs.iter().map(|b| [IoSlice::new(b)]).collect();
            let pending: Vec<_> = slices
                .iter()
                .enumerate()
                .map(|(i, s)| q.offload(&f, Iovecs::for_write(s), (512 + i as u64) * 512))
                .collect();
            assert!(writers(&q) <= MAX_WRITERS, "{} writers", writers(&q));
            for p in pending {
                p.await.unwrap();
            }
            for t in tasks {
                t.await.unwrap();
            }
            // The last writer counts itself out right after its last job.
            let t0 = std::time::Instant::now();
            while writers(&q) != 0 {
                assert!(t0.elapsed().as_secs() < 10, "{} writers left", writers(&q));
                tokio::time::sleep(std::time::Duration::from_millis(1)).await;
            }
            assert!(
                q.state.lock().emptied.is_some(),
                "the last turn's end is recorded"
            );
            // Dropped at once, while queued or running: its Drop returns after the write.
            let last = vec![0x77u8; 512];
            {
                let bufs = [IoSlice::new(&last)];
                drop(q.offload(&f, Iovecs::for_write(&bufs), 576 * 512));
            }
            drop(last);
        };
        rt.block_on(all);
        let mut data = vec![0u8; 577 * 512];
        Iovecs::for_read(&mut [IoSliceMut::new(&mut data)])
            .transfer_all(f.as_raw_fd(), 0)
            .unwrap();
        for (n, sector) in data.chunks(512).enumerate() {
            let want = match n {
                0..512 => (n / 64) as u8 + 1,
                512..576 => 0xee,
                _ => 0x77,
            };
            assert!(sector.iter().all(|&b| b == want), "sector {n}");
        }
    }

    /// Writers start lingering when the write that had to start one came within `LINGER` of
    /// the queue going empty; a writer joining a running one leaves the decision alone.
    #[test]
    fn writers_start_lingering_for_writes_in_a_stream() {
        let mut s = QueueState::default();
        assert!(s.start_writer(4096));
        assert!(!s.lingering(), "the first write of all");
        s.writers = 0;
        s.lingers_left = 1;
        s.emptied = Some(Instant::now() + Duration::from_secs(1));
        assert!(s.start_writer(4096));
        assert!(s.lingering(), "a write right after the queue went empty");
        assert_eq!(s.lingers_left, FUTILE_LINGERS);
        s.writers = 0;
        s.emptied = Some(Instant::now() - 20 * LINGER);
        assert!(s.start_writer(4096));
        assert!(s.lingering(), "one long gap does not stop the lingering");
        assert!(
            !s.start_writer(4096),
            "one writer and nothing queued behind its job"
        );
        assert_eq!(s.writers, 1);
    }

    /// A second writer starts for small writes piling up behind the first, never for large
    /// ones (it would only spin on the inode lock while the first copies).
    #[test]
    fn large_writes_never_start_a_second_writer() {
        let mut s = QueueState::default();
        assert!(
            s.start_writer(1 << 20),
            "the first writer starts for any write"
        );
        s.jobs.push_back(Box::new(|| {}));
        s.jobs.push_back(Box::new(|| {}));
        assert!(!s.start_writer(LARGE_WRITE), "two large writes queued");
        assert_eq!(s.writers, 1);
        assert!(s.start_writer(LARGE_WRITE - 1), "a small write behind them");
        assert_eq!(s.writers, 2);
    }

    /// Writers stop lingering after `FUTILE_LINGERS` lingers in a row that caught nothing.
    #[test]
    fn writers_stop_lingering_when_no_write_comes() {
        crate::data::tests::with_time_limit("futile lingers", || {
            let f = Arc::new(tempfile::tempfile().unwrap());
            let q = Arc::new(WriteQueue::default());
            q.state.lock().lingers_left = FUTILE_LINGERS;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_time()
                .build()
                .unwrap();
            rt.block_on(async {
                for n in 1..=FUTILE_LINGERS {
                    // Well apart: no write comes while a writer lingers.
                    tokio::time::sleep(Duration::from_millis(2)).await;
                    let buf = [n as u8; 512];
                    let bufs = [IoSlice::new(&buf)];
                    q.offload(&f, Iovecs::for_write(&bufs), 0).await.unwrap();
                    while writers(&q) != 0 {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    let s = q.state.lock();
                    assert_eq!(
                        FUTILE_LINGERS - s.lingers_left,
                        n,
                        "lingers that caught nothing"
                    );
                    assert_eq!(
                        s.lingering(),
                        n < FUTILE_LINGERS,
                        "after {n} futile lingers"
                    );
                }
            });
        });
    }

    /// A job queued with `offload_with` runs its step and transfer on a writer thread and
    /// hands back the step's value or error; dropped at once, its future's Drop returns only
    /// after the job is done with the buffers.
    #[test]
    fn queued_job_returns_its_value_and_drop_waits() {
        crate::data::tests::with_time_limit("queued job", queued_job_body);
    }

    fn queued_job_body() {
        use std::os::unix::fs::FileExt;
        let f = Arc::new(tempfile::tempfile().unwrap());
        let q = Arc::new(WriteQueue::default());
        crate::data::tests::rt().block_on(async {
            // The step writes 0x11 over 1 KiB, the transfer 0x22 over its second half.
            let data = [0x22u8; 512];
            let bufs = [IoSlice::new(&data)];
            let g = f.clone();
            let got = q
                .offload_with(Iovecs::for_write(&bufs), move |iov| {
                    g.write_all_at(&[0x11; 1024], 0)?;
                    iov.transfer_all(g.as_raw_fd(), 512)?;
                    Ok(7u32)
                })
                .await
                .unwrap();
            assert_eq!(got, 7);
            let err = q
                .offload_with(Iovecs::for_write(&bufs), |_| -> io::Result<()> {
                    Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP))
                })
                .await
                .unwrap_err();
            assert_eq!(err.raw_os_error(), Some(libc::EOPNOTSUPP));
            // Dropped at once: the job (slow on purpose) has written when Drop returns.
            let last = vec![0x33u8; 512];
            {
                let bufs = [IoSlice::new(&last)];
                let g = f.clone();
                drop(q.offload_with(Iovecs::for_write(&bufs), move |iov| {
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    iov.transfer_all(g.as_raw_fd(), 1024)
                }));
            }
            drop(last);
        });
        let mut back = vec![0u8; 1536];
        f.read_exact_at(&mut back, 0).unwrap();
        assert!(back[..512].iter().all(|&b| b == 0x11));
        assert!(back[512..1024].iter().all(|&b| b == 0x22));
        assert!(back[1024..].iter().all(|&b| b == 0x33));
    }

    #[test]
    fn offloaded_read_and_drop_before_completion() {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(&[9u8; 8192]).unwrap();
        let f = Arc::new(f);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut a = vec![0u8; 4096];
            let mut b = vec![0u8; 4096];
            {
                let mut bufs = [IoSliceMut::new(&mut a), IoSliceMut::new(&mut b)];
                offload(&f, Iovecs::for_read(&mut bufs), 0).await.unwrap();
            }
            assert!(a.iter().chain(b.iter()).all(|&x| x == 9));
            // Dropped at once: Drop must wait for the thread, then the buffer may go.
            let mut c = vec![0u8; 8192];
            {
                let mut bufs = [IoSliceMut::new(&mut c)];
                drop(offload(&f, Iovecs::for_read(&mut bufs), 0));
            }
            drop(c);
            // Reading past the end fails clearly.
            let mut d = vec![0u8; 4096];
            let mut bufs = [IoSliceMut::new(&mut d)];
            let err = offload(&f, Iovecs::for_read(&mut bufs), 8192)
                .await
                .unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        });
    }
}
