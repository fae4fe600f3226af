//! The rust-vmm `VhostUserBackend` for one connection: queue processing and completions.
//!
//! ## Threads and request flow
//!
//! `vhost-user-backend` runs one epoll thread per queue (we map queue *i* to thread *i*). On a
//! kick that thread pops the available chains, [`POP_BATCH`] at a time, validates each
//! ([`parse`]) and, if it needs the device, pushes the request's future into the queue's own
//! executor (a `FuturesUnordered`). After each batch the thread polls the executor: futures
//! that finish at once (a cached read, an in-memory device) complete in the same pass, with
//! one used-ring update and at most one notification; then it pops the next batch, so the
//! driver refills the ring while the thread works through the rest. Futures that wait on
//! I/O register a waker that writes the queue's *completion eventfd*, which the same epoll
//! loop watches, so the thread goes back to its rings instead of blocking and is woken when
//! the device has finished something.
//!
//! Each queue also owns a [`ThreadRing`] (an io_uring that signals the same completion eventfd):
//! the executor is polled with it entered, so the data file's direct transfers (`--cache
//! direct`) started by the queue's requests go to it, and the thread reaps their completions
//! itself (on every completion wake-up, and once per kick after its last batch), one wake-up
//! per batch of completions instead of two.
//!
//! With [`Dispatch::Runtime`] each request runs as a task on a tokio runtime instead, and the
//! executor only holds the tasks' join handles; the completion path is the same (those tasks'
//! transfers use the data file's shared ring).
//!
//! Notifications: while draining the ring, guest kicks are suppressed (`disable_notification`),
//! and re-enabled with a re-check for chains that raced in. After adding used entries the
//! driver is signalled only if `needs_notification` says so, which implements EVENT_IDX
//! (`used_event`) or, without it, signals every batch.
//!
//! ## Stopping a queue
//!
//! `GET_VRING_BASE` (the front-end stopping a queue, on VM shutdown or reset) must not return
//! while requests of that queue are in flight, or a late completion would write a used ring the
//! front-end believes idle. `stop_vring` therefore waits until the queue's in-flight count is
//! zero; the queue thread keeps reaping completions meanwhile. The server does the same for all
//! queues when a connection ends, before it accepts the next one.

use std::future::Future;
use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use parking_lot::{Condvar, Mutex};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VhostUserBackend, VringMutex, VringT};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{
    EventConsumer, EventFlag, EventNotifier, new_event_consumer_and_notifier,
};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::config::{
    BlkGeometry, CONFIG_SPACE_LEN, config_space, protocol_features, read_config, virtio_features,
};
use super::request::{Completion, DescSegment, GuestMem, IoRequest, Parsed, parse};
use super::{Dispatch, VhostUserBlkConfig};
use crate::data::ThreadRing;
use crate::device::BlockDevice;

/// The atomically replaceable guest memory of one connection.
pub type AtomicGuestMem = GuestMemoryAtomic<GuestMem>;

/// The vring type the backend uses.
pub type Vring = VringMutex<AtomicGuestMem>;

type RequestFuture = Pin<Box<dyn Future<Output = Completion> + Send>>;

/// Chains a queue thread pops and starts before it puts what finished on the used ring and
/// notifies, then comes back for more. Small, so that the driver (on another CPU) gets the
/// first completions and refills the ring while the thread works through the rest: popping the
/// whole ring first made the two sides take turns, each idle while the other worked. Measured
/// on the null device (docs/vhost.md, "Handing completions back early"): 4k reads at QD32 went
/// from 362k IOPS (whole ring) to 513k (8), 589k (4), 835k (2) and 718k (1).
const POP_BATCH: usize = 2;

/// Wakes a queue thread by writing its completion eventfd; coalesces wakes until the thread
/// has polled again.
struct CompletionWaker {
    fd: EventFd,
    pending: AtomicBool,
}

impl Wake for CompletionWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if !self.pending.swap(true, Ordering::AcqRel) {
            if let Err(e) = self.fd.write(1) {
                tracing::error!("cannot wake a vhost-user-blk queue thread: {e}");
            }
        }
    }
}

/// Per-queue state. The executor is only touched by the queue's own thread; `in_flight` is also
/// read by the front-end thread in `stop_vring`.
struct QueueWorker {
    executor: Mutex<FuturesUnordered<RequestFuture>>,
    wake: Arc<CompletionWaker>,
    waker: Waker,
    /// The queue thread's own io_uring for direct data transfers, signalling `wake.fd`
    /// (`None` where the kernel refuses io_uring: the data file's shared ring serves).
    ring: Option<ThreadRing>,
    in_flight: Mutex<usize>,
    idle: Condvar,
}

impl QueueWorker {
    fn new() -> io::Result<Self> {
        let wake = Arc::new(CompletionWaker {
            fd: EventFd::new(EFD_NONBLOCK)?,
            pending: AtomicBool::new(false),
        });
        let ring = match ThreadRing::new(wake.fd.as_raw_fd()) {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::debug!("vhost-user-blk queue without its own io_uring: {e}");
                None
            }
        };
        Ok(QueueWorker {
            executor: Mutex::new(FuturesUnordered::new()),
            ring,
            waker: Waker::from(Arc::clone(&wake)),
            wake,
            in_flight: Mutex::new(0),
            idle: Condvar::new(),
        })
    }

    fn wait_idle(&self, queue: usize) {
        let mut n = self.in_flight.lock();
        while *n > 0 {
            if self
                .idle
                .wait_for(&mut n, Duration::from_secs(5))
                .timed_out()
            {
                tracing::warn!(
                    "vhost-user-blk queue {queue}: still waiting for {} requests",
                    *n
                );
            }
        }
    }
}

/// The vhost-user-blk backend of one connection, generic over the device it serves.
pub struct BlkBackend<D: BlockDevice> {
    device: Arc<D>,
    geo: BlkGeometry,
    config: [u8; CONFIG_SPACE_LEN],
    features: u64,
    queue_size: usize,
    mem: AtomicGuestMem,
    queues: Vec<QueueWorker>,
    dispatch: Dispatch,
    /// Set by `quiesce`: kicks are ignored, chains stay in the avail ring.
    quiesced: AtomicBool,
}

impl<D: BlockDevice> BlkBackend<D> {
    /// A backend for one connection, reading guest memory through `mem` (the same object the
    /// daemon updates on SET_MEM_TABLE / ADD_MEM_REG).
    pub fn new(device: Arc<D>, cfg: &VhostUserBlkConfig, mem: AtomicGuestMem) -> io::Result<Self> {
        let info = device.info();
        let geo = BlkGeometry::new(&info, &cfg.name);
        let config = config_space(&geo, info.block_size, cfg.num_queues);
        let queues = (0..cfg.num_queues)
            .map(|_| QueueWorker::new())
            .collect::<io::Result<Vec<_>>>()?;
        Ok(BlkBackend {
            features: virtio_features(info.read_only),
            device,
            geo,
            config,
            queue_size: usize::from(cfg.queue_size),
            mem,
            queues,
            dispatch: cfg.dispatch.clone(),
            quiesced: AtomicBool::new(false),
        })
    }

    /// The eventfd each queue thread's epoll must watch for completions (register it with the
    /// daemon's epoll handler of the same index under [`Self::completion_event_id`]).
    pub fn completion_fd(&self, queue: usize) -> Option<&EventFd> {
        self.queues.get(queue).map(|q| &q.wake.fd)
    }

    /// The epoll token of the completion eventfd: past the queue tokens, as the handler requires.
    pub fn completion_event_id(&self) -> u64 {
        self.queues.len() as u64 + 1
    }

    /// Stops taking chains from the rings: after this returns, no new request starts (chains
    /// the driver adds stay in the avail ring for whoever serves the rings next). Together with
    /// [`Self::wait_idle`] this lets a server hand the rings back with every popped request
    /// completed, so the front-end resumes exactly at the used index after a reconnect.
    pub fn quiesce(&self) {
        self.quiesced.store(true, Ordering::Release);
        for q in &self.queues {
            // A pop in progress holds the executor lock and counts its chains before releasing
            // it; once we have held the lock, every later pop sees the flag.
            drop(q.executor.lock());
        }
    }

    /// Waits until no request of any queue is in flight.
    pub fn wait_idle(&self) {
        for (i, q) in self.queues.iter().enumerate() {
            q.wait_idle(i);
        }
    }

    fn start(&self, req: IoRequest) -> RequestFuture {
        let device = Arc::clone(&self.device);
        match &self.dispatch {
            Dispatch::QueueThread(_) => Box::pin(async move { req.run(&*device).await }),
            Dispatch::Runtime(handle) => {
                let head = req.head();
                let task = handle.spawn(async move { req.run(&*device).await });
                Box::pin(async move {
                    task.await.unwrap_or_else(|e| {
                        // Only a runtime shutting down cancels a task; the status byte is unset.
                        tracing::error!("virtio-blk request task failed: {e}");
                        Completion { head, used_len: 0 }
                    })
                })
            }
        }
    }

    /// Pops and starts the available chains of `vring`, at most [`POP_BATCH`] of them; returns
    /// the requests answered at once, and whether it stopped at the limit (then notifications
    /// stay disabled and the caller comes back for the rest). Every popped chain counts as in
    /// flight until its used-ring entry is written. `continuing` says that the previous call
    /// stopped at the limit: if a [`quiesce`](Self::quiesce) came in between, the rest of the
    /// chains stay in the avail ring (like chains added after it) for whoever serves the
    /// rings next, and notifications are enabled again, as a pass that is not cut short
    /// leaves them.
    fn process_queue(
        &self,
        worker: &QueueWorker,
        vring: &Vring,
        continuing: bool,
    ) -> (Vec<Completion>, bool) {
        let mut answered = Vec::new();
        // Held while popping: `quiesce` takes it to know that no pop is under way.
        let executor = worker.executor.lock();
        if self.quiesced.load(Ordering::Acquire) {
            if continuing && let Err(e) = vring.get_mut().enable_notification() {
                tracing::warn!("vhost-user-blk: cannot enable notifications: {e}");
            }
            return (answered, false);
        }
        let mut popped = 0usize;
        let mut more = false;
        {
            let mut state = vring.get_mut();
            'pop: loop {
                if let Err(e) = state.disable_notification() {
                    tracing::warn!("vhost-user-blk: cannot disable notifications: {e}");
                }
                loop {
                    if popped == POP_BATCH {
                        more = true;
                        break 'pop;
                    }
                    // The memory map is loaded afresh for every chain: this loop keeps popping
                    // chains the driver adds meanwhile, and a chain added after an ADD_MEM_REG
                    // was acknowledged may use that region.
                    let mem = self.mem.memory().into_inner();
                    let Some(chain) = state.get_queue_mut().pop_descriptor_chain(&*mem) else {
                        break;
                    };
                    popped += 1;
                    let head = chain.head_index();
                    let segments = chain.map(|d| DescSegment {
                        addr: d.addr(),
                        len: d.len(),
                        device_writes: d.is_write_only(),
                    });
                    match parse(&mem, head, segments, &self.geo) {
                        Parsed::Done(c) => answered.push(c),
                        Parsed::Io(req) => executor.push(self.start(req)),
                    }
                }
                match state.enable_notification() {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        tracing::warn!("vhost-user-blk: cannot enable notifications: {e}");
                        break;
                    }
                }
            }
        }
        if popped > 0 {
            *worker.in_flight.lock() += popped;
        }
        (answered, more)
    }

    /// Polls the queue's executor, puts everything finished on the used ring and notifies.
    /// With `reap_ring`, first takes the completions of the queue's io_uring (else only new
    /// futures and those already woken are polled: between two batches of a kick, so that the
    /// used ring gets what finished at once without an extra look at the ring per batch).
    fn reap(
        &self,
        worker: &QueueWorker,
        vring: &Vring,
        mut done: Vec<Completion>,
        reap_ring: bool,
    ) {
        {
            // Transfers that the ring has finished are polled in the pass below, so their wakes
            // need not write the eventfd: `pending` stays set while they are handed out.
            if reap_ring && let Some(ring) = &worker.ring {
                worker.wake.pending.store(true, Ordering::Release);
                ring.reap();
                worker.wake.pending.store(false, Ordering::Release);
            }
            let mut cx = Context::from_waker(&worker.waker);
            // Direct transfers started in this pass go to the queue's ring (each submitted as
            // it is made: batching them cost reads a quarter, docs/io-engines.md).
            let _ring = worker.ring.as_ref().map(ThreadRing::enter);
            let _runtime = match &self.dispatch {
                Dispatch::QueueThread(Some(handle)) => Some(handle.enter()),
                _ => None,
            };
            let mut executor = worker.executor.lock();
            while let Poll::Ready(Some(c)) = executor.poll_next_unpin(&mut cx) {
                done.push(c);
            }
        }
        if !done.is_empty() {
            let mut state = vring.get_mut();
            for c in &done {
                if let Err(e) = state.add_used(c.head, c.used_len) {
                    tracing::warn!("vhost-user-blk: cannot complete descriptor {}: {e}", c.head);
                }
            }
            // On error (unreadable used_event), signal anyway: a spurious interrupt is harmless,
            // a missing one hangs the guest.
            if state.needs_notification().unwrap_or(true) {
                if let Err(e) = state.signal_used_queue() {
                    tracing::warn!("vhost-user-blk: cannot signal the driver: {e}");
                }
            }
        }
        if !done.is_empty() {
            let mut n = worker.in_flight.lock();
            *n = n.saturating_sub(done.len());
            if *n == 0 {
                worker.idle.notify_all();
            }
        }
    }
}

impl<D: BlockDevice> VhostUserBackend for BlkBackend<D> {
    type Bitmap = ();
    type Vring = Vring;

    fn num_queues(&self) -> usize {
        self.queues.len()
    }

    fn max_queue_size(&self) -> usize {
        self.queue_size
    }

    fn features(&self) -> u64 {
        self.features
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, _enabled: bool) {
        // The handler sets EVENT_IDX on every queue; `needs_notification` and
        // `enable_notification` follow it.
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        read_config(&self.config, offset, size)
    }

    fn set_config(&self, offset: u32, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!("virtio-blk config space is read-only (write at offset {offset})"),
        ))
    }

    fn update_memory(&self, _mem: AtomicGuestMem) -> io::Result<()> {
        // `self.mem` is the same GuestMemoryAtomic the handler just updated; each kick loads
        // the current map, and requests in flight keep the map they started with.
        Ok(())
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.queues.len()).map(|i| 1u64 << i).collect()
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        match new_event_consumer_and_notifier(EventFlag::NONBLOCK) {
            Ok(pair) => Some(pair),
            Err(e) => {
                tracing::error!("vhost-user-blk: cannot create an exit event: {e}");
                None
            }
        }
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        if let Some(q) = self.queues.get(queue_index as usize) {
            q.wait_idle(queue_index as usize);
        }
        Ok(())
    }

    fn handle_event(
        &self,
        device_event: u16,
        _evset: EventSet,
        vrings: &[Vring],
        thread_id: usize,
    ) -> io::Result<()> {
        // Errors returned from here stop the queue thread for good, so nothing below returns one:
        // problems with guest input are answered in the request's status byte.
        let (Some(worker), Some(vring)) = (self.queues.get(thread_id), vrings.first()) else {
            tracing::error!("vhost-user-blk: event for unknown queue thread {thread_id}");
            return Ok(());
        };
        if device_event != 0 {
            if u64::from(device_event) == self.completion_event_id() {
                // A spurious wake-up finds nothing to read; that is fine.
                let _ = worker.wake.fd.read();
            }
            self.reap(worker, vring, Vec::new(), true);
            return Ok(());
        }
        // A kick: the ring's chains in batches of `POP_BATCH`, each batch's inline completions
        // handed back before the next batch is popped; the ring's completions once, at the end.
        let mut continuing = false;
        loop {
            let (answered, more) = self.process_queue(worker, vring, continuing);
            self.reap(worker, vring, answered, !more);
            if !more {
                return Ok(());
            }
            continuing = true;
        }
    }
}

#[cfg(test)]
mod tests {
    //! The queue path without a socket: a split ring laid out by hand in guest memory, as a
    //! driver would, processed through `handle_event`.
    use std::fs::File;
    use std::os::unix::io::{FromRawFd, IntoRawFd};

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::device::mem::MemDevice;
    use crate::device::{DevResult, DeviceInfo, Extent};

    const QSIZE: u16 = 16;
    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const INDIRECT: u64 = 0x4000;
    const HDR: u64 = 0x5000;
    const DATA: u64 = 0x6000;
    const STATUS: u64 = 0x7000;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;
    const F_INDIRECT: u16 = 4;

    struct Ring<D: BlockDevice = MemDevice> {
        mem: AtomicGuestMem,
        vring: Vring,
        call: EventFd,
        backend: BlkBackend<D>,
        next_avail: u16,
    }

    fn guest_memory() -> AtomicGuestMem {
        GuestMemoryAtomic::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap(),
        )
    }

    impl Ring {
        fn new(event_idx: bool) -> Ring {
            Ring::with_device(
                guest_memory(),
                Arc::new(MemDevice::new(1 << 20, 4096, false)),
                event_idx,
            )
        }
    }

    impl<D: BlockDevice> Ring<D> {
        fn with_device(mem: AtomicGuestMem, dev: Arc<D>, event_idx: bool) -> Ring<D> {
            let vring = Vring::new(mem.clone(), 256).unwrap();
            vring.set_queue_size(QSIZE);
            vring.set_queue_info(DESC, AVAIL, USED).unwrap();
            vring.set_queue_event_idx(event_idx);
            vring.set_queue_ready(true);
            vring.set_enabled(true);
            let call = EventFd::new(EFD_NONBLOCK).unwrap();
            // SAFETY: the descriptor is a fresh duplicate owned by nothing else.
            let file = unsafe { File::from_raw_fd(call.try_clone().unwrap().into_raw_fd()) };
            vring.set_call(Some(file));
            let cfg = VhostUserBlkConfig::new("ring").with_dispatch(Dispatch::QueueThread(None));
            let backend = BlkBackend::new(dev, &cfg, mem.clone()).unwrap();
            Ring {
                mem,
                vring,
                call,
                backend,
                next_avail: 0,
            }
        }

        fn m(&self) -> vm_memory::GuestMemoryLoadGuard<GuestMem> {
            self.mem.memory()
        }

        fn desc(&self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
            let at = GuestAddress(table + 16 * u64::from(i));
            let mut d = [0u8; 16];
            d[0..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            self.m().write_slice(&d, at).unwrap();
        }

        fn header(&self, req_type: u32, sector: u64) {
            let mut h = [0u8; 16];
            h[0..4].copy_from_slice(&req_type.to_le_bytes());
            h[8..16].copy_from_slice(&sector.to_le_bytes());
            self.m().write_slice(&h, GuestAddress(HDR)).unwrap();
        }

        /// Makes `head` available and kicks the backend.
        fn submit(&mut self, head: u16) {
            self.make_available(head);
            self.kick();
        }

        /// Puts `head` on the avail ring, without a kick.
        fn make_available(&mut self, head: u16) {
            let slot = AVAIL + 4 + 2 * u64::from(self.next_avail % QSIZE);
            self.m()
                .write_obj(head.to_le(), GuestAddress(slot))
                .unwrap();
            self.next_avail = self.next_avail.wrapping_add(1);
            self.m()
                .write_obj(self.next_avail.to_le(), GuestAddress(AVAIL + 2))
                .unwrap();
        }

        /// Signals the backend that chains are available.
        fn kick(&self) {
            self.backend
                .handle_event(0, EventSet::IN, std::slice::from_ref(&self.vring), 0)
                .unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.m().read_obj(GuestAddress(USED + 2)).unwrap()
        }

        fn used_elem(&self, i: u16) -> (u32, u32) {
            let at = USED + 4 + 8 * u64::from(i % QSIZE);
            let id: u32 = self.m().read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.m().read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        }

        fn status(&self) -> u8 {
            self.m().read_obj(GuestAddress(STATUS)).unwrap()
        }

        /// Interrupts raised since the last call.
        fn interrupts(&self) -> u64 {
            self.call.read().unwrap_or(0)
        }

        /// The driver asks to be interrupted once the used index passes `idx` (EVENT_IDX).
        fn set_used_event(&self, idx: u16) {
            let at = AVAIL + 4 + 2 * u64::from(QSIZE);
            self.m().write_obj(idx.to_le(), GuestAddress(at)).unwrap();
        }
    }

    #[test]
    fn direct_and_indirect_chains_complete_on_the_used_ring() {
        let mut r = Ring::new(false);
        // A write through three direct descriptors.
        r.m()
            .write_slice(&[0x42u8; 512], GuestAddress(DATA))
            .unwrap();
        r.header(1, 2);
        r.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        r.desc(DESC, 1, DATA, 512, F_NEXT, 2);
        r.desc(DESC, 2, STATUS, 1, F_WRITE, 0);
        r.submit(0);
        assert_eq!(r.used_idx(), 1);
        assert_eq!(r.used_elem(0), (0, 1));
        assert_eq!(r.status(), 0);
        assert_eq!(r.interrupts(), 1);

        // A read through an indirect table.
        r.m().write_slice(&[0u8; 512], GuestAddress(DATA)).unwrap();
        r.header(0, 2);
        r.desc(INDIRECT, 0, HDR, 16, F_NEXT, 1);
        r.desc(INDIRECT, 1, DATA, 512, F_NEXT | F_WRITE, 2);
        r.desc(INDIRECT, 2, STATUS, 1, F_WRITE, 0);
        r.desc(DESC, 5, INDIRECT, 48, F_INDIRECT, 0);
        r.submit(5);
        assert_eq!(r.used_idx(), 2);
        assert_eq!(r.used_elem(1), (5, 513));
        assert_eq!(r.status(), 0);
        let mut back = [0u8; 512];
        r.m().read_slice(&mut back, GuestAddress(DATA)).unwrap();
        assert!(back.iter().all(|&b| b == 0x42));

        // A head index past the ring cannot be completed; the queue goes on.
        r.submit(999);
        r.header(4, 0);
        r.desc(DESC, 0, HDR, 16, F_NEXT, 2);
        r.submit(0);
        assert_eq!(r.used_elem(r.used_idx() - 1), (0, 1));
        assert_eq!(*r.backend.queues[0].in_flight.lock(), 0);
    }

    #[test]
    fn event_idx_suppresses_interrupts_until_used_event() {
        let mut r = Ring::new(true);
        r.header(4, 0);
        r.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        r.desc(DESC, 1, STATUS, 1, F_WRITE, 0);
        // The driver wants an interrupt only when used idx passes 2 (after the third entry).
        r.set_used_event(2);
        r.submit(0);
        r.submit(0);
        assert_eq!(r.used_idx(), 2);
        assert_eq!(r.interrupts(), 0, "no interrupt before used_event");
        r.submit(0);
        assert_eq!(r.used_idx(), 3);
        assert_eq!(r.interrupts(), 1);
        // The backend publishes avail_event so the driver kicks only for new chains.
        let avail_event: u16 = r
            .m()
            .read_obj(GuestAddress(USED + 4 + 8 * u64::from(QSIZE)))
            .unwrap();
        assert_eq!(avail_event, 3);
    }

    /// A device that answers every flush at once and records the used index the driver could
    /// see at that moment.
    struct UsedWatcher {
        mem: AtomicGuestMem,
        seen: Mutex<Vec<u16>>,
    }

    impl BlockDevice for UsedWatcher {
        fn info(&self) -> DeviceInfo {
            DeviceInfo {
                size: 1 << 20,
                read_only: false,
                block_size: 4096,
            }
        }
        async fn read(&self, _: u64, _: &mut [std::io::IoSliceMut<'_>]) -> DevResult<()> {
            Ok(())
        }
        async fn write(&self, _: u64, _: &[std::io::IoSlice<'_>], _: bool) -> DevResult<()> {
            Ok(())
        }
        async fn flush(&self) -> DevResult<()> {
            let used: u16 = self.mem.memory().read_obj(GuestAddress(USED + 2)).unwrap();
            self.seen.lock().push(used);
            Ok(())
        }
        async fn discard(&self, _: u64, _: u64) -> DevResult<()> {
            Ok(())
        }
        async fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> DevResult<()> {
            Ok(())
        }
        async fn block_status(&self, _: u64, len: u64) -> DevResult<Vec<Extent>> {
            Ok(vec![Extent {
                len,
                allocated: true,
                zero: false,
            }])
        }
    }

    #[test]
    fn one_kick_hands_back_completions_batch_by_batch() {
        let mem = guest_memory();
        let dev = Arc::new(UsedWatcher {
            mem: mem.clone(),
            seen: Mutex::new(Vec::new()),
        });
        let mut r = Ring::with_device(mem, Arc::clone(&dev), false);
        r.header(4, 0);
        r.desc(DESC, 0, HDR, 16, F_NEXT, 1);
        r.desc(DESC, 1, STATUS, 1, F_WRITE, 0);
        // Three batches' worth of flushes, one kick.
        let n = 3 * POP_BATCH as u16;
        for _ in 0..n {
            r.make_available(0);
        }
        r.kick();
        assert_eq!(r.used_idx(), n);
        // Each batch's requests ran after the batches before it were on the used ring, and
        // each batch was signalled (no EVENT_IDX here).
        let expected: Vec<u16> = (0..n)
            .map(|i| i / POP_BATCH as u16 * POP_BATCH as u16)
            .collect();
        assert_eq!(*dev.seen.lock(), expected);
        assert_eq!(r.interrupts(), 3);
    }
}
