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

use parking_lot::{Condvar, Mutex};

/// Direction of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dir {
    /// File → buffers.
    Read,
    /// Buffers → file.
    Write,
}

/// An iovec array that points into buffers borrowed for `'a` (mutably for reads).
pub(crate) struct Iovecs<'a> {
    iov: Vec<libc::iovec>,
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
// sent to a pool thread, `Offloaded` keeps the buffers alive and unaliased (see `offload`).
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

/// A transfer running on tokio's blocking pool with buffers borrowed for `'a`.
pub(crate) struct Offloaded<'a> {
    handle: tokio::task::JoinHandle<io::Result<()>>,
    finished: Arc<Finished>,
    _borrow: PhantomData<&'a mut [u8]>,
}

/// Starts `iov.transfer_all(file, off)` on tokio's blocking thread pool.
pub(crate) fn offload<'a>(file: &Arc<File>, iov: Iovecs<'a>, off: u64) -> Offloaded<'a> {
    // SAFETY: this only erases the lifetime of the borrow. The returned `Offloaded<'a>` keeps
    // the buffers borrowed for as long as it exists, and its `Drop` blocks until `FinishGuard`
    // has run, i.e. until the pool thread has returned from its last syscall on them or the job
    // was dropped unrun. So no syscall touches the buffers after `'a` ends, whether the future
    // is awaited to completion or dropped (cancelled) half way. The one way around this is to
    // leak the future (`mem::forget` of a polled future), which nothing in uthin does; callers
    // outside the crate only see futures that own an `Offloaded` and drop it normally.
    let iov: Iovecs<'static> = unsafe { std::mem::transmute::<Iovecs<'a>, Iovecs<'static>>(iov) };
    let job = iov;
    let finished = Arc::new(Finished {
        done: Mutex::new(false),
        cv: Condvar::new(),
    });
    let guard = FinishGuard(finished.clone());
    let file = file.clone();
    let handle = tokio::task::spawn_blocking(move || {
        let _guard = guard;
        let mut job = job;
        job.transfer_all(file.as_raw_fd(), off)
    });
    Offloaded {
        handle,
        finished,
        _borrow: PhantomData,
    }
}

impl Future for Offloaded<'_> {
    type Output = io::Result<()>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match Pin::new(&mut self.handle).poll(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Ok(r)) => Poll::Ready(r),
            Poll::Ready(Err(e)) => Poll::Ready(Err(io::Error::other(format!(
                "data file I/O thread failed: {e}"
            )))),
        }
    }
}

impl Drop for Offloaded<'_> {
    fn drop(&mut self) {
        // Cancellation while the pool thread may still be using the buffers: wait for it. This
        // blocks the current thread for at most one syscall; it only happens when a request is
        // abandoned mid-flight (client gone, shutdown).
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
