//! A connection's outbound queue, which callers and the reactor both write
//! through.
//!
//! Frames are sealed and appended under the queue's lock, so the order of
//! nonces is the order on the wire. Writing happens outside the lock by one
//! writer at a time (`writing`), which takes the whole buffer and swaps in a
//! spare: frames appended meanwhile are written by the same writer in its
//! next round, coalescing parallel senders into few syscalls. A caller that
//! finds the queue idle writes its frame itself (no thread hop); when the
//! socket would block, or a caller only queues (`send_no_wait`), the reactor
//! takes over (`reactor_flushing`) until the queue is empty. Before a
//! reactor has the connection (a dialled connection's `on_open` runs
//! then), a waiting caller writes on itself instead. How the
//! writes go also decides how much the kernel may hold unsent (see
//! [`LowWater`]): little while the reactor streams queued messages, the
//! system's while callers write their own frames. The queue reaches the
//! connection around it (its socket, its reactor, its failure) through
//! [`QueueOwner`].

use std::mem;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use crate::conn_socket::ConnSocket;
use slab::Slab;

use crate::clock::CallDeadline;
use crate::config::Config;
use crate::error::{socket_error, Error, Result, SocketOp, TimeoutKind};
use crate::protocol::connection::{Buffers, Sealed};
use crate::protocol::wire::{
    append_record, frame_len, BUNDLE_LIMIT, LENGTH_PREFIX_LEN, RECORD_HEADER_LEN, TAG_LEN,
};
use crate::protocol::{Reservation, Sealer};
use crate::socket_write::{write_nonblocking, WriteOutcome};
use crate::stats::Counters;
use crate::sync::buffers::BufferPool;
use crate::sync::wake::{wake_all, DropLater};
use crate::sync::{lock, AtomicBool, AtomicUsize, Condvar, Mutex, MutexGuard, Ordering};

/// Rounds a caller-thread writer makes before handing the rest of the queue
/// to the reactor, so one caller never writes for everyone indefinitely.
const CALLER_WRITE_ROUNDS: usize = 4;

/// Rounds a reactor's flush makes in one turn. Each round writes all that
/// is queued; a producer that keeps up with the socket would otherwise keep
/// the reactor writing (and its other connections, timers and commands
/// waiting) for as long as it goes on. The rest is flushed next turn.
const REACTOR_WRITE_ROUNDS: usize = 16;

/// The longest a caller that writes before a reactor has the connection
/// waits for room in the socket before it looks again whether the
/// connection closed meanwhile.
const WRITABLE_SLICE: Duration = Duration::from_millis(50);

/// Capacity each of the two outbound buffers has (borrowed from the
/// reactor's pool on first use), so that coalescing a handful of frames
/// never grows them on the hot path. Idle connections give them back (see
/// [`OutboundQueue::release_idle_buffers`]).
pub(crate) const OUTBOUND_BUFFER: usize = 16 << 10;

/// What the queue needs of the connection around it.
pub(crate) trait QueueOwner {
    /// The socket frames are written to.
    fn stream(&self) -> &ConnSocket;
    /// The peer's address, as known when the connection was made (the
    /// socket may no longer say once it failed).
    fn peer_addr(&self) -> Option<std::net::SocketAddr>;
    /// The pool the queue's buffers are borrowed from and given back to.
    fn buffers(&self) -> &BufferPool;
    /// The counters written frames and bytes are added to.
    fn stats(&self) -> &Counters;
    /// Hands the rest of the queue to the reactor.
    fn ask_reactor_to_flush(&self);
    /// Whether a reactor has the connection yet: a dialled connection's
    /// `on_open` runs before (and its reactor flushes what was queued once
    /// it takes the connection).
    fn has_reactor(&self) -> bool;
    /// Closes the connection with `error` (a write failed, or the nonce
    /// counter ran out).
    fn fail(&self, error: Error);
}

/// The queue's state, under its lock.
struct Outbound {
    sealer: Option<Sealer>,
    buf: Vec<u8>,
    /// Where in `buf` the bundled frame still taking messages starts, if
    /// the sealer bundles (PROTOCOL.md, "Bundled frames"): messages queued
    /// behind one another join it, and it is sealed when a writer takes
    /// the buffer, when the next message would take it past the bundle
    /// limit, or when a caller must see its own message written. Its tag
    /// is counted in `queued_total` from the start.
    bundle: Option<usize>,
    /// Bundles closed full (their tag's room appended) and not yet sealed,
    /// as `start..end` in `buf`, oldest first: a sender that fills one
    /// does not seal it under the lock; the writer takes their counters in
    /// order and seals them outside it.
    unsealed: Vec<(usize, usize)>,
    /// Where the writer keeps its reservations while it seals outside the
    /// lock: kept here for its capacity.
    reserved: Vec<(usize, usize, Reservation)>,
    spare: Vec<u8>,
    /// Bytes at the start of `buf` already written.
    head: usize,
    writing: bool,
    reactor_flushing: bool,
    queued_total: u64,
    /// Frames queued so far, and how many of them (and of `queued_total`'s
    /// bytes) were already added to the stats: counted once per write
    /// round instead of once per frame, off the callers' hot path.
    frames_queued: u64,
    frames_counted: u64,
    bytes_counted: u64,
    written_total: u64,
    waiters: usize,
    /// The async calls waiting on the queue, as the threads in `waiters`
    /// wait on the condition variable: woken together with them. Entries
    /// are reused, so steady traffic allocates nothing here.
    tasks: Slab<Option<Waker>>,
    /// Wakers `notify` took off `tasks`, woken once the lock is let go
    /// (`wake_tasks`): a waker may drop its task's future, whose drop
    /// locks the queue, or poll it inline. Its capacity is kept.
    to_wake: Vec<Waker>,
    /// An empty list with capacity that `wake_tasks` puts in place of the
    /// one it takes: a `notify` by another thread while it wakes then
    /// allocates nothing either.
    to_wake_spare: Vec<Waker>,
    closed: Option<Error>,
    /// The reactor is closing the connection gracefully and waits for the
    /// queue to drain: a caller-thread writer that empties it must tell
    /// the reactor, which would otherwise wait out its drain deadline.
    draining: bool,
    /// The reactor paused reading this connection over its budget while a
    /// caller-thread writer had the queue: that writer must tell the
    /// reactor when it is done, or reading would never resume.
    reactor_waits: bool,
    /// Whether the socket's unsent low water is on now, by what the
    /// writes look like.
    low_water: LowWater,
}

/// Writes in a row of one kind before the socket's unsent low water
/// follows them.
const LOW_WATER_STREAK: u8 = 4;

/// A reactor write at least this large is a stream's: the queue had
/// backed up behind it.
const STREAM_WRITE: usize = 16 << 10;

/// When a connection's socket limits what the kernel holds unsent
/// (`TCP_NOTSENT_LOWAT`, [`Config::unsent_low_water`]): once the reactor
/// writes backlogs of queued messages, write after write (a one-way
/// stream), and not while callers write their frames one by one (`send`,
/// requests), whose frames would then leave as a segment each instead of
/// coalescing in the kernel behind a closed window. A few writes in a row
/// of one kind switch it. Small reactor writes (replies) and large writes
/// by a caller (one that found a stream's backlog and wrote it) count for
/// neither, so a connection whose writes are all the reactor's (a
/// server's replies) keeps it once on: its writes are batches anyway.
#[derive(Debug)]
struct LowWater {
    /// The configured limit; `None` (or 0, the system's): never switched
    /// on.
    limit: Option<u32>,
    on: bool,
    streaming: u8,
    direct: u8,
}

impl LowWater {
    fn new(limit: Option<usize>) -> Self {
        LowWater {
            limit: limit
                .filter(|&n| n > 0)
                .map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            on: false,
            streaming: 0,
            direct: 0,
        }
    }

    /// Notes a write of `len` bytes, by the reactor or by a caller; returns
    /// the limit to set on the socket if it is to change (0: the system's,
    /// which is what a socket starts with).
    fn note_write(&mut self, on_reactor: bool, len: usize) -> Option<u32> {
        let limit = self.limit?;
        if on_reactor && len >= STREAM_WRITE {
            self.direct = 0;
            self.streaming = self.streaming.saturating_add(1);
            if !self.on && self.streaming >= LOW_WATER_STREAK {
                self.on = true;
                return Some(limit);
            }
        } else if !on_reactor && len < STREAM_WRITE {
            self.streaming = 0;
            self.direct = self.direct.saturating_add(1);
            if self.on && self.direct >= LOW_WATER_STREAK {
                self.on = false;
                return Some(0);
            }
        }
        None
    }
}

/// Sets the socket's unsent low water (0: the system's). Linux and
/// Android only; a failure leaves the socket as it was, which only costs
/// the optimisation.
fn set_unsent_low_water(stream: &ConnSocket, limit: u32) {
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let _ = socket2::SockRef::from(stream).set_tcp_notsent_lowat(limit);
    #[cfg(not(any(target_os = "linux", target_os = "android")))]
    let _ = (stream, limit);
}

impl Outbound {
    fn pending(&self) -> usize {
        self.buf.len() - self.head
    }

    /// Frees the buffers once the queue is closed (nothing more is
    /// written, and the handle may live on for long, held by the
    /// application), unless a writer has one out: it frees them as it
    /// finishes.
    fn free_buffers_if_closed(&mut self) {
        if self.closed.is_some() && !self.writing {
            self.buf = Vec::new();
            self.bundle = None;
            self.unsealed.clear();
            self.spare = Vec::new();
            self.head = 0;
        }
    }

    /// The wire size of a frame of one message of `len` bytes.
    fn frame_len(&self, len: usize) -> usize {
        match &self.sealer {
            Some(sealer) => sealer.frame_len(len),
            None => frame_len(len),
        }
    }

    /// Seals `body` as message `seq` onto the end of `buf`: its own frame,
    /// or a record of the open bundle (starting one if none is open or it
    /// is full). Returns the bytes it adds to the queue. A bundle closed
    /// to make room is sealed here.
    fn append(&mut self, seq: u32, body: &[u8]) -> Result<usize> {
        let Some(sealer) = self.sealer.as_mut() else {
            return Err(Error::Closed);
        };
        if !sealer.bundles() {
            return sealer.seal_append(seq, body, &mut self.buf);
        }
        let record = RECORD_HEADER_LEN + body.len();
        if let Some(start) = self.bundle {
            if self.buf.len() - start - LENGTH_PREFIX_LEN + record <= BUNDLE_LIMIT {
                append_record(&mut self.buf, seq, body);
                return Ok(record);
            }
            self.close_bundle();
        }
        if body.len() > u32::MAX as usize - TAG_LEN - RECORD_HEADER_LEN {
            return Err(Error::MessageTooLarge {
                len: body.len(),
                max: u32::MAX as usize - TAG_LEN - RECORD_HEADER_LEN,
            });
        }
        self.bundle = Some(Sealer::start_bundle(&mut self.buf));
        append_record(&mut self.buf, seq, body);
        Ok(LENGTH_PREFIX_LEN + record + TAG_LEN)
    }

    /// Closes the open bundle, if any, for a writer to seal: appends its
    /// tag's room and puts it on the list of bundles to seal.
    fn close_bundle(&mut self) {
        if let Some(start) = self.bundle.take() {
            self.buf.extend_from_slice(&[0; TAG_LEN]);
            self.unsealed.push((start, self.buf.len()));
        }
    }

    /// Seals every bundle queued, in order, under the lock: what is queued
    /// is then all sealed frames, and a frame sealed next comes after
    /// them. On error (the counter used up, after 2^64 frames) the
    /// bundles' messages are dropped from the queue, which the caller
    /// closes with that error: their calls had returned (`send_no_wait`,
    /// replies), as they do for any queued message a failure ends.
    ///
    /// Not built on `reserve_bundles`: that fills the writer's list, which
    /// a writer may have out (empty, without capacity, in its place) while
    /// a sender seals here, and filling it would allocate.
    fn seal_bundles(&mut self) -> Result<()> {
        self.close_bundle();
        let Outbound {
            sealer,
            unsealed,
            buf,
            ..
        } = self;
        let Some(sealer) = sealer.as_mut() else {
            return Ok(());
        };
        for (start, end) in unsealed.drain(..) {
            sealer.seal_prepared(&mut buf[start..end])?;
        }
        Ok(())
    }

    /// A writer's side of [`seal_bundles`](Self::seal_bundles): closes the
    /// open bundle and takes every queued bundle's counter, in order, into
    /// `reserved`, for the writer to seal once it has taken the buffer and
    /// let the lock go.
    fn reserve_bundles(&mut self, reserved: &mut Vec<(usize, usize, Reservation)>) -> Result<()> {
        self.close_bundle();
        let Outbound {
            sealer, unsealed, ..
        } = self;
        let Some(sealer) = sealer.as_mut() else {
            return Ok(());
        };
        for &(start, end) in unsealed.iter() {
            reserved.push((start, end, sealer.reserve()?));
        }
        unsealed.clear();
        Ok(())
    }

    /// What the connection holds against its budget: everything queued
    /// and not yet written, the bytes waiting in `buf` and those a writer
    /// took out of it for the write in progress.
    fn held(&self) -> usize {
        (self.queued_total - self.written_total) as usize
    }

    /// Whether a frame of `frame` bytes must wait for room: while what is
    /// held and the frame would pass the budget. A frame larger than the
    /// budget fits beside nothing: it is let in once nothing is queued,
    /// while a write under way may still be finishing, but only a write
    /// within the budget (the connection then holds that write and this
    /// frame, `limit + frame` at most). A write of more, an earlier large
    /// frame's, must end first: a writer takes everything queued out for
    /// its write, so each round of a slow write would otherwise let one
    /// more large frame in beside the unwritten rest it puts back.
    fn lacks_room(&self, frame: usize, limit: usize) -> bool {
        if self.closed.is_some() {
            return false;
        }
        if frame > limit {
            return self.pending() > 0 || self.held() > limit;
        }
        self.held() > 0 && self.held() + frame > limit
    }

    /// Puts `wait`'s task on the list to wake at the queue's next change.
    /// Returns the waker it replaced, for the caller to drop once it has
    /// let the lock go ([`DropLater`]): a waker's drop may drop a future,
    /// whose drop takes this lock.
    #[must_use]
    fn register(&mut self, wait: &mut QueueWait, waker: &Waker) -> Option<Waker> {
        match wait.0 {
            Some(key) => {
                let entry = &mut self.tasks[key];
                if entry.as_ref().is_some_and(|w| w.will_wake(waker)) {
                    return None;
                }
                entry.replace(waker.clone())
            }
            None => {
                self.room_for_tasks();
                wait.0 = Some(self.tasks.insert(Some(waker.clone())));
                None
            }
        }
    }

    /// Makes room for a few waiting tasks at the connection's first async
    /// call (every one passes here before it may wait), so that the
    /// first time one must wait, or a first peak of tasks waiting
    /// together (or a thread waking them while others register), comes
    /// in steady traffic without an allocation. A connection that never
    /// sees an async call (most idle ones) holds none of it.
    fn room_for_tasks(&mut self) {
        if self.tasks.capacity() == 0 {
            self.tasks.reserve(TASKS_ROOM);
            self.to_wake.reserve(TASKS_ROOM);
            self.to_wake_spare.reserve(TASKS_ROOM);
        }
    }

    /// Takes `wait`'s task off the list. Returns its waker, for the caller
    /// to drop with the lock let go (see [`register`](Self::register)).
    #[must_use]
    fn unregister(&mut self, wait: &mut QueueWait) -> Option<Waker> {
        wait.0.take().and_then(|key| self.tasks.remove(key))
    }
}

/// An async call's place on the queue's list of tasks to wake (room made,
/// bytes written, the queue closed); empty until it first has to wait.
/// Given back with [`OutboundQueue::forget`] when the call ends.
#[derive(Debug, Default)]
pub(crate) struct QueueWait(Option<usize>);

impl QueueWait {
    /// Whether the call has had to wait on the queue (its place stays
    /// until [`OutboundQueue::forget`]): a poll after that is a re-poll.
    pub(crate) fn has_waited(&self) -> bool {
        self.0.is_some()
    }
}

/// Async calls a connection has room for on its list of waiting tasks
/// from its first one on.
const TASKS_ROOM: usize = 8;

/// How a frame is handed to the outbound queue.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Mode {
    /// Write it now if the queue is idle; with `wait`, return only once it
    /// is written.
    Direct { wait: bool },
    /// Queue it and let the reactor write it.
    Queue,
    /// A reply made on this connection's reactor thread, which flushes
    /// after the batch.
    OnReactor,
    /// Any other send made on the connection's reactor thread: queued
    /// without waiting, flushed on the reactor's next turn.
    ReactorQueue,
}

/// What the reactor's flush achieved.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Flushed {
    /// The queue is empty.
    Empty,
    /// The socket is full with this many bytes still queued; wait for
    /// WRITABLE.
    Blocked(usize),
    /// The turn's write rounds were used up with this many bytes queued
    /// and the socket still taking them: flush again next turn (no
    /// WRITABLE edge will say so).
    More(usize),
    /// Another thread is writing and will finish the queue; this many
    /// bytes are held (its write included). Past the budget, that writer hands the queue back
    /// to the reactor when it is done.
    Busy(usize),
    /// The connection is closed.
    Closed,
}

/// The queue: its state under a lock, the condition variable senders wait
/// on for room or for their write, and the closed flag readable without
/// the lock.
pub(crate) struct OutboundQueue {
    state: Mutex<Outbound>,
    cv: Condvar,
    /// Set (under the lock) when `Outbound::closed` is: lets the client
    /// pool skip closed connections without taking their locks.
    closed: AtomicBool,
    /// What [`Outbound::held`] was when the lock was last let go, stored
    /// under it wherever it changes: the reactor checks the budget before
    /// each frame it dispatches, and a lock there would be taken for every
    /// one-way message of a stream.
    held: AtomicUsize,
    /// `max_queued_bytes`.
    limit: usize,
    /// How long one call may wait on the queue.
    send_timeout: Option<Duration>,
}

impl OutboundQueue {
    /// An empty queue that seals with `sealer` (none until the handshake
    /// ends: frames are refused until [`install_sealer`](Self::install_sealer)).
    pub(crate) fn new(sealer: Option<Sealer>, config: &Config) -> Self {
        OutboundQueue {
            state: Mutex::new(Outbound {
                sealer,
                // Made on first use: a connection that never sends (most
                // idle ones) costs nothing here.
                buf: Vec::new(),
                bundle: None,
                unsealed: Vec::new(),
                reserved: Vec::new(),
                spare: Vec::new(),
                head: 0,
                writing: false,
                reactor_flushing: false,
                queued_total: 0,
                frames_queued: 0,
                frames_counted: 0,
                bytes_counted: 0,
                written_total: 0,
                waiters: 0,
                tasks: Slab::new(),
                to_wake: Vec::new(),
                to_wake_spare: Vec::new(),
                closed: None,
                draining: false,
                reactor_waits: false,
                low_water: LowWater::new(config.unsent_low_water),
            }),
            cv: Condvar::new(),
            closed: AtomicBool::new(false),
            held: AtomicUsize::new(0),
            limit: config.max_queued_bytes,
            send_timeout: config.send_timeout,
        }
    }

    /// Whether the queue refuses output (the connection is closed or
    /// closing).
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Why the queue was closed, once it was.
    pub(crate) fn close_reason(&self) -> Option<Error> {
        lock(&self.state).closed.clone()
    }

    /// Refuses further output with `error` (the first error wins) and wakes
    /// every sender waiting on the queue.
    pub(crate) fn close(&self, error: &Error) {
        let mut g = lock(&self.state);
        if g.closed.is_none() {
            g.closed = Some(error.clone());
            self.closed.store(true, Ordering::Release);
        }
        self.notify(&mut g);
        drop(self.wake_tasks(g));
    }

    /// Frees the buffers of a closed queue (see
    /// `Outbound::free_buffers_if_closed`).
    pub(crate) fn free_buffers(&self) {
        lock(&self.state).free_buffers_if_closed();
    }

    /// Seals `body` as frame `seq` and hands it on as `mode` says. Waits
    /// for room unless `mode` is one of the reactor thread's;
    /// `Direct { wait: true }` also waits until the frame is written, and so
    /// does any `Direct` before a reactor has the connection (no one else
    /// would write what the socket did not take: a request's response
    /// cannot come before its frame is out). The
    /// waits end by `by`: the call's own deadline (`Some`; `Some(None)`:
    /// none), or the send timeout from the first wait (`None`). If the
    /// call has to wait for room, `before_room_wait`
    /// runs (outside the lock) before it first sleeps: a caller that
    /// prepared to go straight on undoes that there (a request gives the
    /// reactor back the readable events it took for its response, which a
    /// caller still queueing would not read).
    pub(crate) fn submit(
        &self,
        owner: &impl QueueOwner,
        seq: u32,
        body: &[u8],
        mode: Mode,
        by: Option<Option<CallDeadline>>,
        before_room_wait: &mut dyn FnMut(),
    ) -> Result<()> {
        // One deadline for every wait of this call (room, then the
        // write): the call's own, or the send timeout from the first wait.
        let mut deadline = by;
        let mut g = lock(&self.state);
        let frame = g.frame_len(body.len());
        match mode {
            Mode::OnReactor => {}
            Mode::ReactorQueue => {
                if g.lacks_room(frame, self.limit) {
                    return Err(Error::QueueFull);
                }
            }
            _ => g = self.wait_for_room(owner, g, frame, &mut deadline, before_room_wait)?,
        }
        match self.enqueue(owner, g, seq, body, mode)? {
            (Some(g), end) if mode == (Mode::Direct { wait: true }) => {
                self.wait_written(owner, g, end, &mut deadline)
            }
            // A request's frame must be out before its response can come,
            // and before a reactor has the connection no one else writes
            // what the socket did not take at once.
            (Some(g), end) if matches!(mode, Mode::Direct { .. }) && !owner.has_reactor() => {
                self.wait_written(owner, g, end, &mut deadline)
            }
            _ => Ok(()),
        }
    }

    /// [`submit`](Self::submit) for an async call: never blocks. Pending
    /// (with the task on the list to wake) while the queue has no room;
    /// once the frame is queued, ready with the point the call must see
    /// written before it is done (`Direct { wait: true }`), if not already.
    /// The caller keeps its own deadline.
    pub(crate) fn poll_submit(
        &self,
        owner: &impl QueueOwner,
        seq: u32,
        body: &[u8],
        mode: Mode,
        wait: &mut QueueWait,
        cx: &mut Context<'_>,
    ) -> Poll<Result<Option<u64>>> {
        // Declared before the lock: a waker taken off the list is dropped
        // after it, on every return (see `register`).
        let mut stale = DropLater::default();
        let mut g = lock(&self.state);
        g.room_for_tasks();
        let frame = g.frame_len(body.len());
        let must_wait = g.lacks_room(frame, self.limit);
        match mode {
            Mode::OnReactor => {}
            Mode::ReactorQueue if must_wait => {
                stale.keep(g.unregister(wait));
                return Poll::Ready(Err(Error::QueueFull));
            }
            _ if must_wait => {
                stale.keep(g.register(wait, cx.waker()));
                return Poll::Pending;
            }
            _ => {}
        }
        stale.keep(g.unregister(wait));
        Poll::Ready(match self.enqueue(owner, g, seq, body, mode) {
            Err(e) => Err(e),
            Ok((Some(g), end)) if mode == (Mode::Direct { wait: true }) => {
                if g.written_total >= end {
                    Ok(None)
                } else if let Some(e) = &g.closed {
                    Err(e.clone())
                } else {
                    Ok(Some(end))
                }
            }
            Ok(_) => Ok(None),
        })
    }

    /// An async call's wait for its frame to be written, up to `end` of
    /// everything queued ([`poll_submit`](Self::poll_submit)).
    pub(crate) fn poll_written(
        &self,
        end: u64,
        wait: &mut QueueWait,
        cx: &mut Context<'_>,
    ) -> Poll<Result<()>> {
        // Before the lock: dropped after it (see `register`).
        let mut stale = DropLater::default();
        let mut g = lock(&self.state);
        if g.written_total >= end {
            stale.keep(g.unregister(wait));
            return Poll::Ready(Ok(()));
        }
        if let Some(e) = g.closed.clone() {
            stale.keep(g.unregister(wait));
            return Poll::Ready(Err(e));
        }
        stale.keep(g.register(wait, cx.waker()));
        Poll::Pending
    }

    /// An async call ended (or was dropped) while on the list of tasks to
    /// wake: takes it off.
    pub(crate) fn forget(&self, wait: &mut QueueWait) {
        if wait.0.is_some() {
            // Dropped with the lock let go (see `register`).
            let removed = lock(&self.state).unregister(wait);
            drop(removed);
        }
    }

    /// Wakes everyone waiting on the queue: the threads now, the tasks
    /// once the lock is let go (`wake_tasks`, which every caller calls
    /// next). Only the slow paths (a full queue, a blocked socket) have
    /// tasks here.
    fn notify(&self, g: &mut Outbound) {
        if g.waiters > 0 {
            self.cv.notify_all();
        }
        let Outbound { tasks, to_wake, .. } = g;
        to_wake.extend(tasks.iter_mut().filter_map(|(_, task)| task.take()));
    }

    /// Wakes the tasks `notify` took off the list, with the lock let go,
    /// and takes it again. Free when there are none.
    fn wake_tasks<'a>(&'a self, mut g: MutexGuard<'a, Outbound>) -> MutexGuard<'a, Outbound> {
        if g.to_wake.is_empty() {
            return g;
        }
        let spare = mem::take(&mut g.to_wake_spare);
        let mut woken = mem::replace(&mut g.to_wake, spare);
        drop(g);
        wake_all(&mut woken);
        let mut g = lock(&self.state);
        // Tasks another thread took off meanwhile are its to wake; only
        // the allocation comes back, as the spare, or in place of a list
        // with less room.
        if g.to_wake_spare.capacity() < woken.capacity() {
            g.to_wake_spare = woken;
        } else if g.to_wake.capacity() < woken.capacity() {
            woken.append(&mut g.to_wake);
            g.to_wake = woken;
        }
        g
    }

    /// Seals `body` as frame `seq`, appends it, and hands the queue on as
    /// `mode` says: to the reactor, or written now by this thread if no
    /// one is writing. Returns the lock if it still holds it
    /// (`Mode::Direct`) and how far the queue must be written to include
    /// this frame.
    fn enqueue<'a>(
        &'a self,
        owner: &impl QueueOwner,
        mut g: MutexGuard<'a, Outbound>,
        seq: u32,
        body: &[u8],
        mode: Mode,
    ) -> Result<(Option<MutexGuard<'a, Outbound>>, u64)> {
        if let Some(e) = &g.closed {
            return Err(e.clone());
        }
        let frame = g.frame_len(body.len());
        let out = &mut *g;
        if out.sealer.is_none() {
            return Err(Error::Closed);
        }
        if out.buf.capacity() == 0 {
            out.buf = owner.buffers().take().unwrap_or_default();
            out.buf.clear();
            out.buf.reserve(OUTBOUND_BUFFER.max(frame));
            // Room for the bundles of a backlog a few buffers long, so
            // that a stream allocates nothing here per message.
            out.unsealed.reserve(16);
            out.reserved.reserve(16);
        }
        let mut appended = out.append(seq, body);
        let ends_bundle = match mode {
            Mode::Direct { .. } => true,
            Mode::Queue => seq != 0,
            Mode::OnReactor | Mode::ReactorQueue => false,
        };
        if ends_bundle && appended.is_ok() {
            // Its caller writes it now, or waits to see it written: the
            // bundle ends with it, so that where it ends is known. So does
            // a request or a reply queued from another thread (an async
            // request while others are in flight, a reply made later):
            // left open for the reactor to seal, a one-core
            // AsyncParallelRequest lost 10% (its reactor wrote sooner,
            // with fewer requests a write). One-way messages bundle.
            appended = out.seal_bundles().and(appended);
        }
        let frame = match appended {
            Ok(frame) => frame,
            Err(e) => {
                if matches!(e, Error::CounterExhausted) {
                    drop(g);
                    owner.fail(e.clone());
                }
                return Err(e);
            }
        };
        g.queued_total += frame as u64;
        self.held.store(g.held(), Ordering::Release);
        g.frames_queued += 1;
        let end = g.queued_total;
        match mode {
            Mode::OnReactor => Ok((Some(g), end)),
            Mode::Queue | Mode::ReactorQueue => {
                // Checked under the queue's lock: a reactor that takes the
                // connection meanwhile flushes, under it, after this frame.
                if !g.writing && !g.reactor_flushing && owner.has_reactor() {
                    g.reactor_flushing = true;
                    drop(g);
                    owner.ask_reactor_to_flush();
                    return Ok((None, end));
                }
                Ok((Some(g), end))
            }
            Mode::Direct { .. } => {
                if !g.writing && !g.reactor_flushing {
                    g = self.write_out(owner, g, CALLER_WRITE_ROUNDS, false).0;
                }
                Ok((Some(g), end))
            }
        }
    }

    fn wait_for_room<'a>(
        &'a self,
        owner: &impl QueueOwner,
        mut g: MutexGuard<'a, Outbound>,
        frame: usize,
        deadline: &mut Option<Option<CallDeadline>>,
        before_room_wait: &mut dyn FnMut(),
    ) -> Result<MutexGuard<'a, Outbound>> {
        let mut told = false;
        while g.lacks_room(frame, self.limit) {
            if !told {
                told = true;
                drop(g);
                before_room_wait();
                g = lock(&self.state);
                continue;
            }
            g = self.wait_for_progress(owner, g, deadline)?;
        }
        Ok(g)
    }

    /// Waits until the queue is written up to `end`.
    fn wait_written<'a>(
        &'a self,
        owner: &impl QueueOwner,
        mut g: MutexGuard<'a, Outbound>,
        end: u64,
        deadline: &mut Option<Option<CallDeadline>>,
    ) -> Result<()> {
        loop {
            if g.written_total >= end {
                return Ok(());
            }
            if let Some(e) = &g.closed {
                return Err(e.clone());
            }
            g = self.wait_for_progress(owner, g, deadline)?;
        }
    }

    /// One wait for the queue to move on, within the call's deadline: on
    /// the condition variable while a caller or the reactor writes it. But
    /// before a reactor has the connection (a dialled connection's
    /// `on_open` runs before), no one else would write what the socket did
    /// not take at once: the caller then waits for room in the socket (in
    /// slices, so that a close meanwhile shows) and writes on itself.
    fn wait_for_progress<'a>(
        &'a self,
        owner: &impl QueueOwner,
        mut g: MutexGuard<'a, Outbound>,
        deadline: &mut Option<Option<CallDeadline>>,
    ) -> Result<MutexGuard<'a, Outbound>> {
        let unattended = |g: &Outbound| !g.writing && !g.reactor_flushing && g.pending() > 0;
        if !unattended(&g) {
            return self.wait_cv(g, deadline);
        }
        if owner.has_reactor() {
            // Between the reactor taking the connection and its first
            // flush (which would write this), or replies it queued for the
            // end of its turn: asking it to flush costs a command and
            // waits for no one.
            g.reactor_flushing = true;
            drop(g);
            owner.ask_reactor_to_flush();
            return Ok(lock(&self.state));
        }
        drop(g);
        let left = self.time_left(deadline)?;
        crate::sys::wait_writable(
            owner.stream(),
            Some(left.map_or(WRITABLE_SLICE, |l| l.min(WRITABLE_SLICE))),
        );
        let g = lock(&self.state);
        Ok(if unattended(&g) {
            self.write_out(owner, g, CALLER_WRITE_ROUNDS, false).0
        } else {
            g
        })
    }

    /// The time left before the call's deadline (decided here if the call
    /// brought none: the send timeout from now), `None` for no limit;
    /// the timeout once it has passed.
    fn time_left(&self, deadline: &mut Option<Option<CallDeadline>>) -> Result<Option<Duration>> {
        let deadline = *deadline
            .get_or_insert_with(|| CallDeadline::after(self.send_timeout, TimeoutKind::Write));
        match deadline {
            None => Ok(None),
            Some(d) => match d.at.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Ok(Some(left)),
                _ => Err(Error::Timeout(d.kind)),
            },
        }
    }

    /// One wait on the outbound condition variable, bounded by the call's
    /// deadline (decided at its first wait, if the call brought none: the
    /// send timeout from then).
    fn wait_cv<'a>(
        &'a self,
        mut g: MutexGuard<'a, Outbound>,
        deadline: &mut Option<Option<CallDeadline>>,
    ) -> Result<MutexGuard<'a, Outbound>> {
        let left = self.time_left(deadline)?;
        g.waiters += 1;
        let g = match left {
            None => self.cv.wait(g).unwrap_or_else(|e| e.into_inner()),
            Some(left) => {
                self.cv
                    .wait_timeout(g, left)
                    .unwrap_or_else(|e| e.into_inner())
                    .0
            }
        };
        let mut g = g;
        g.waiters -= 1;
        Ok(g)
    }

    /// Writes the queue, round by round, as the single writer. Called with
    /// `writing == false`; returns with it `false` again, and whether it
    /// stopped at `max_rounds` with the socket still taking bytes.
    fn write_out<'a>(
        &'a self,
        owner: &impl QueueOwner,
        mut g: MutexGuard<'a, Outbound>,
        max_rounds: usize,
        on_reactor: bool,
    ) -> (MutexGuard<'a, Outbound>, bool) {
        g.writing = true;
        let mut hand_off = false;
        let mut failure = None;
        let mut rounds = 0;
        let mut used_up = false;
        loop {
            if g.pending() == 0 {
                g.buf.clear();
                g.head = 0;
                if on_reactor {
                    g.reactor_flushing = false;
                }
                break;
            }
            if g.closed.is_some() {
                break;
            }
            if rounds == max_rounds {
                // Before a reactor has the connection, the rest stays the
                // caller's (see `wait_written`). The reactor itself goes on
                // next turn (`Flushed::More`).
                if owner.has_reactor() {
                    hand_off = !on_reactor && !g.reactor_flushing;
                    g.reactor_flushing = true;
                }
                used_up = true;
                break;
            }
            rounds += 1;
            let (queued, queued_bytes) = (g.frames_queued, g.queued_total);
            let frames = queued - mem::replace(&mut g.frames_counted, queued);
            let bytes = queued_bytes - mem::replace(&mut g.bytes_counted, queued_bytes);
            Counters::add(&owner.stats().frames_out, frames);
            Counters::add(&owner.stats().bytes_out, bytes);
            let mut reserved = mem::take(&mut g.reserved);
            if let Err(e) = g.reserve_bundles(&mut reserved) {
                g.reserved = reserved;
                failure = Some(e);
                break;
            }
            let spare = mem::take(&mut g.spare);
            let mut data = mem::replace(&mut g.buf, spare);
            let head = mem::replace(&mut g.head, 0);
            let low_water = g.low_water.note_write(on_reactor, data.len() - head);
            drop(g);
            // Sealed with the lock let go: senders queue on meanwhile,
            // behind these bundles, with later counters.
            let sealed = reserved
                .drain(..)
                .try_for_each(|(start, end, reservation)| {
                    reservation.seal_prepared(&mut data[start..end])
                });
            if let Err(e) = sealed {
                g = lock(&self.state);
                g.reserved = reserved;
                data.clear();
                g.spare = data;
                failure = Some(e);
                break;
            }
            if let Some(limit) = low_water {
                set_unsent_low_water(owner.stream(), limit);
            }
            let (n, outcome) = write_nonblocking(owner.stream(), &data[head..]);
            g = lock(&self.state);
            g.reserved = reserved;
            g.written_total += n as u64;
            self.held.store(g.held(), Ordering::Release);
            match outcome {
                WriteOutcome::Done => {
                    data.clear();
                    g.spare = data;
                    if on_reactor && g.pending() > 0 {
                        // Room was made and bytes written, and another
                        // round follows: whoever waits for either hears of
                        // it now, not once the reactor, whose rounds are
                        // not counted, stops finding more to write. (A
                        // caller's few rounds end soon: its waiters are
                        // woken together then, which costs less.)
                        self.notify(&mut g);
                        g = self.wake_tasks(g);
                    }
                }
                WriteOutcome::Blocked => {
                    // Put the unwritten rest back in front of what was
                    // appended meanwhile, where it lies: moving it to the
                    // front on every short write would copy a full queue
                    // many times over while a stream waits on its socket.
                    // The written prefix is dropped once it is at least as
                    // long as the rest (so the move costs at most one copy
                    // per byte written), and whenever keeping it would
                    // make the buffer grow: the buffers never allocate
                    // more than they would with the prefix dropped at
                    // once, which is what SECURITY.md's memory bound
                    // counts.
                    let mut appended = mem::take(&mut g.buf);
                    let mut written = head + n;
                    if written >= data.len() - written
                        || data.len() + appended.len() > data.capacity()
                    {
                        data.drain(..written);
                        written = 0;
                    }
                    // A bundle opened meanwhile moves with what it was
                    // appended to.
                    let moved = data.len();
                    g.bundle = g.bundle.map(|start| moved + start);
                    for (start, end) in g.unsealed.iter_mut() {
                        *start += moved;
                        *end += moved;
                    }
                    data.extend_from_slice(&appended);
                    appended.clear();
                    g.spare = appended;
                    g.buf = data;
                    g.head = written;
                    // A caller hands the rest to the reactor, if one has the
                    // connection yet: a dialled connection's `on_open` runs
                    // before, and the caller then writes on itself
                    // (`wait_written`); whatever it leaves, the reactor
                    // writes once it takes the connection.
                    if on_reactor || owner.has_reactor() {
                        hand_off = !on_reactor && !g.reactor_flushing;
                        g.reactor_flushing = true;
                    }
                    break;
                }
                WriteOutcome::Failed(e) => {
                    data.clear();
                    g.spare = data;
                    failure = Some(socket_error(SocketOp::Writing, owner.peer_addr(), e));
                    break;
                }
            }
        }
        g.writing = false;
        if let Some(e) = &failure {
            // Recorded before the lock is let go: a graceful close that
            // finds the queue empty in between (the peer's end of stream,
            // read meanwhile) would otherwise close it as drained, and
            // every waiting sender would get a bare `Closed` instead of
            // the write's error.
            if g.closed.is_none() {
                g.closed = Some(e.clone());
                self.closed.store(true, Ordering::Release);
            }
        }
        self.notify(&mut g);
        if !on_reactor
            && (g.draining || mem::take(&mut g.reactor_waits))
            && g.pending() == 0
            && !g.reactor_flushing
        {
            g.reactor_flushing = true;
            hand_off = true;
        }
        // Closed while this writer had a buffer out, or by its failure.
        g.free_buffers_if_closed();
        if let Some(e) = failure {
            drop(g);
            owner.fail(e);
            g = lock(&self.state);
        } else if hand_off {
            drop(g);
            owner.ask_reactor_to_flush();
            g = lock(&self.state);
        }
        (self.wake_tasks(g), used_up)
    }

    /// Reactor side: write what is queued, as far as the socket takes it.
    /// A thread already writing hands the queue back when done if more
    /// than `hand_back_past` bytes are held (its write included).
    pub(crate) fn flush_from_reactor(
        &self,
        owner: &impl QueueOwner,
        hand_back_past: usize,
    ) -> Flushed {
        let mut g = lock(&self.state);
        if g.closed.is_some() {
            return Flushed::Closed;
        }
        if g.writing {
            if g.held() > hand_back_past {
                // The reactor pauses reading on this: the writer hands the
                // queue back when it is done, which resumes it.
                g.reactor_waits = true;
            }
            return Flushed::Busy(g.held());
        }
        if g.pending() == 0 {
            let mut g = g;
            g.reactor_flushing = false;
            return Flushed::Empty;
        }
        let (g, used_up) = self.write_out(owner, g, REACTOR_WRITE_ROUNDS, true);
        if g.closed.is_some() {
            Flushed::Closed
        } else if g.pending() == 0 {
            Flushed::Empty
        } else if used_up {
            Flushed::More(g.pending())
        } else {
            Flushed::Blocked(g.pending())
        }
    }

    /// Reactor side, for a connection that has been idle a while: gives
    /// back both buffers if they hold nothing. They are made again on the
    /// next use (one allocation per idle period, none per message).
    pub(crate) fn release_idle_buffers(&self, owner: &impl QueueOwner) {
        let mut g = lock(&self.state);
        if g.pending() == 0 && !g.writing && !g.reactor_flushing {
            let (mut buf, mut spare) = (mem::take(&mut g.buf), mem::take(&mut g.spare));
            g.head = 0;
            drop(g);
            buf.clear();
            spare.clear();
            owner.buffers().give(buf);
            owner.buffers().give(spare);
        }
    }

    /// Bytes waiting to be written, those of a write in progress
    /// included: what the connection holds against its budget.
    pub(crate) fn queued(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }

    /// Reactor side, graceful close: if nothing is queued, refuse further
    /// output ([`Sealed::Drained`]); if the queue had failed, say with
    /// what, so that the close is the failure's.
    pub(crate) fn seal_off_if_drained(&self) -> Sealed {
        let mut g = lock(&self.state);
        g.draining = true;
        match &g.closed {
            Some(Error::Closed) => return Sealed::Drained,
            Some(failure) => return Sealed::Failed(failure.clone()),
            None => {}
        }
        if g.pending() == 0 && !g.writing {
            g.closed = Some(Error::Closed);
            self.closed.store(true, Ordering::Release);
            self.notify(&mut g);
            drop(self.wake_tasks(g));
            return Sealed::Drained;
        }
        Sealed::Pending
    }

    /// The handshake finished; frames may now be sealed.
    pub(crate) fn install_sealer(&self, sealer: Sealer) {
        lock(&self.state).sealer = Some(sealer);
    }

    /// Bytes written so far and whether output is still pending: the
    /// reactor's write-timeout probe.
    pub(crate) fn write_progress(&self) -> (u64, bool) {
        let g = lock(&self.state);
        (g.written_total, g.pending() > 0)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream as StdStream};
    use std::sync::atomic::AtomicUsize;
    use std::sync::Arc;

    use super::*;
    use crate::protocol::Profile;

    /// A connection around the queue whose failure lets the reactor's
    /// graceful close (the peer's end of stream read meanwhile) run first,
    /// as it can between a failed write and the close it causes.
    struct Owner<'a> {
        queue: &'a OutboundQueue,
        stream: ConnSocket,
        buffers: BufferPool,
        stats: Counters,
        failures: AtomicUsize,
        /// Whether a reactor has the connection (`has_reactor`).
        reactor: AtomicBool,
        flushes_asked: AtomicUsize,
        /// Frames this owner still appends to its own queue, one each time
        /// a writer lets go of the lock to write: a producer that keeps up
        /// with the socket.
        producer: AtomicUsize,
        /// How many it appends each time (1 unless a test says), and how
        /// large each is (1,400 bytes unless a test says).
        producer_burst: AtomicUsize,
        producer_len: AtomicUsize,
    }

    impl<'a> Owner<'a> {
        fn new(queue: &'a OutboundQueue, stream: StdStream) -> Self {
            Owner {
                queue,
                stream: ConnSocket::new(stream),
                buffers: BufferPool::new(OUTBOUND_BUFFER, 2),
                stats: Counters::default(),
                failures: AtomicUsize::new(0),
                reactor: AtomicBool::new(true),
                flushes_asked: AtomicUsize::new(0),
                producer: AtomicUsize::new(0),
                producer_burst: AtomicUsize::new(1),
                producer_len: AtomicUsize::new(1400),
            }
        }
    }

    /// A loopback connection: our end non-blocking, as a connection's
    /// socket is, and the peer's.
    fn socket_pair() -> (StdStream, StdStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = StdStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        (ours, theirs)
    }

    /// The peer reads everything, until our end closes.
    fn reading_to_the_end(mut theirs: StdStream) -> std::thread::JoinHandle<()> {
        std::thread::spawn(move || {
            let mut sink = [0; 64 << 10];
            while matches!(theirs.read(&mut sink), Ok(n) if n > 0) {}
        })
    }

    fn queue(config: &Config) -> OutboundQueue {
        OutboundQueue::new(Some(Sealer::new([7; 32], Profile::Secure)), config)
    }

    /// A queue whose sealer bundles (PROTOCOL.md, "Bundled frames").
    fn bundling_queue(config: &Config) -> OutboundQueue {
        let sealer = Sealer::new([7; 32], Profile::Secure).with_bundles();
        OutboundQueue::new(Some(sealer), config)
    }

    impl QueueOwner for Owner<'_> {
        fn stream(&self) -> &ConnSocket {
            for _ in 0..self.producer_burst.load(Ordering::Relaxed) {
                let left = self.producer.load(Ordering::Relaxed);
                if left > 0 {
                    self.producer.store(left - 1, Ordering::Relaxed);
                    let body = vec![3; self.producer_len.load(Ordering::Relaxed)];
                    self.queue
                        .submit(self, 0, &body, Mode::Queue, None, &mut || {})
                        .unwrap();
                }
            }
            &self.stream
        }
        fn peer_addr(&self) -> Option<std::net::SocketAddr> {
            socket2::SockRef::from(&self.stream)
                .peer_addr()
                .ok()
                .and_then(|a| a.as_socket())
        }
        fn buffers(&self) -> &BufferPool {
            &self.buffers
        }
        fn stats(&self) -> &Counters {
            &self.stats
        }
        fn ask_reactor_to_flush(&self) {
            self.flushes_asked.fetch_add(1, Ordering::Relaxed);
        }
        fn has_reactor(&self) -> bool {
            self.reactor.load(Ordering::Relaxed)
        }
        fn fail(&self, error: Error) {
            self.failures.fetch_add(1, Ordering::Relaxed);
            self.queue.seal_off_if_drained();
            self.queue.close(&error);
        }
    }

    /// A task's waker that drops the task's future, as an executor does
    /// when the waker held the task's last reference: the future's drop
    /// takes the call off the queue's list (`forget`), which locks the
    /// queue.
    struct DropsItsFuture {
        queue: &'static OutboundQueue,
        wait: std::sync::Mutex<QueueWait>,
    }

    impl std::task::Wake for DropsItsFuture {
        fn wake(self: Arc<Self>) {
            self.queue.forget(&mut self.wait.lock().unwrap());
        }
    }

    /// Puts a task on `queue`'s list, waiting for a write up to `end`,
    /// with a waker that drops its future when woken.
    fn wait_with_a_dropping_waker(queue: &'static OutboundQueue, end: u64) {
        let task = Arc::new(DropsItsFuture {
            queue,
            wait: std::sync::Mutex::new(QueueWait::default()),
        });
        let waker = Waker::from(task.clone());
        let mut cx = Context::from_waker(&waker);
        let mut wait = task.wait.lock().unwrap();
        assert!(queue.poll_written(end, &mut wait, &mut cx).is_pending());
    }

    /// Runs `step` on a thread: what it returns if it ends within 5 s.
    fn within_5s<T: Send + 'static>(step: impl FnOnce() -> T + Send + 'static) -> Option<T> {
        let (done, ended) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = done.send(step());
        });
        ended.recv_timeout(Duration::from_secs(5)).ok()
    }

    /// Tasks are woken with the queue's lock let go: a waker that drops
    /// its future (or polls it inline) locks the queue again. Under the
    /// lock, the reactor's flush and the queue's close deadlocked on it.
    #[test]
    fn a_waker_that_drops_its_future_is_woken_outside_the_lock() {
        let (ours, theirs) = socket_pair();
        let reader = reading_to_the_end(theirs);
        // Leaked: a deadlocked thread keeps it for the rest of the run.
        let queue: &'static OutboundQueue = Box::leak(Box::new(queue(&Config::default())));
        let owner = Owner::new(queue, ours);
        queue
            .submit(&owner, 1, &[1; 1400], Mode::Queue, None, &mut || {})
            .unwrap();
        let end = lock(&queue.state).queued_total;
        wait_with_a_dropping_waker(queue, end);
        let owner = within_5s(move || {
            assert_eq!(queue.flush_from_reactor(&owner, usize::MAX), Flushed::Empty);
            owner
        })
        .expect("the reactor's flush deadlocked waking the task");
        assert!(
            lock(&queue.state).tasks.is_empty(),
            "the dropped future is still listed"
        );
        wait_with_a_dropping_waker(queue, u64::MAX);
        within_5s(move || queue.close(&Error::Closed))
            .expect("closing the queue deadlocked waking the task");
        assert!(
            lock(&queue.state).tasks.is_empty(),
            "the dropped future is still listed"
        );
        drop(owner);
        reader.join().unwrap();
    }

    /// A producer that appends as fast as the socket takes its frames
    /// never lets the queue empty: the reactor's flush still ends after a
    /// bounded number of rounds, and says that more is left for its next
    /// turn, so that its other connections, timers and commands are not
    /// held for as long as the producer goes on.
    #[test]
    fn a_reactor_flush_ends_while_a_producer_keeps_up_with_the_socket() {
        let (ours, theirs) = socket_pair();
        let reader = reading_to_the_end(theirs);
        let queue = queue(&Config::default());
        let owner = Owner::new(&queue, ours);
        let endless = 100_000;
        owner.producer.store(endless, Ordering::Relaxed);
        queue
            .submit(&owner, 0, &[1; 1400], Mode::Queue, None, &mut || {})
            .unwrap();
        let asked = owner.flushes_asked.load(Ordering::Relaxed);
        let flushed = queue.flush_from_reactor(&owner, usize::MAX);
        let rounds = endless - owner.producer.load(Ordering::Relaxed);
        assert!(rounds <= 64, "the flush went on for {rounds} rounds");
        assert!(
            matches!(flushed, Flushed::More(n) if n > 0),
            "the producer's frames are left for the next turn: {flushed:?}"
        );
        // The next turns write the rest once the producer stops.
        owner.producer.store(0, Ordering::Relaxed);
        while queue.flush_from_reactor(&owner, usize::MAX) != Flushed::Empty {
            crate::sys::wait_writable(owner.stream(), Some(Duration::from_millis(50)));
        }
        assert_eq!(
            owner.flushes_asked.load(Ordering::Relaxed),
            asked,
            "the reactor asks itself nothing"
        );
        let g = lock(&queue.state);
        assert_eq!(g.frames_queued, 1 + rounds as u64);
        assert_eq!(g.written_total, g.queued_total);
        drop(g);
        drop(owner);
        reader.join().unwrap();
    }

    /// Before a reactor has the connection (a dialled connection's
    /// `on_open` runs then), no one but the callers writes: a send that
    /// must wait for room in the queue makes it, a send that the socket
    /// takes only later writes on until it has, and nothing is handed to
    /// the reactor.
    #[test]
    fn before_a_reactor_has_the_connection_callers_write_it_themselves() {
        let (ours, mut theirs) = socket_pair();
        // Small socket buffers, whatever the system's: the large frame
        // below cannot fit until the peer reads.
        socket2::SockRef::from(&ours)
            .set_send_buffer_size(64 << 10)
            .unwrap();
        socket2::SockRef::from(&theirs)
            .set_recv_buffer_size(64 << 10)
            .unwrap();
        let started = Instant::now();
        // The peer reads nothing for a while, then everything.
        let reader = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(200));
            let mut sink = [0; 64 << 10];
            let mut total = 0;
            while let Ok(n @ 1..) = theirs.read(&mut sink) {
                total += n;
            }
            total
        });
        let config = Config::default()
            .max_queued_bytes(64 << 10)
            .send_timeout(Some(Duration::from_secs(10)));
        let queue = queue(&config);
        let owner = Owner::new(&queue, ours);
        owner.reactor.store(false, Ordering::Relaxed);
        let (small, large) = (48 << 10, 8 << 20);
        let send = |seq, len, mode| {
            queue.submit(&owner, seq, &vec![seq as u8; len], mode, None, &mut || {})
        };
        // Queued for the reactor, which would write it once it took the
        // connection; the next send needs its room.
        send(1, small, Mode::Queue).unwrap();
        send(2, small, Mode::Direct { wait: true }).unwrap();
        send(3, large, Mode::Direct { wait: true }).unwrap();
        // It had to wait for the peer to read: written on by this thread.
        assert!(started.elapsed() >= Duration::from_millis(150));
        assert_eq!(owner.flushes_asked.load(Ordering::Relaxed), 0);
        assert_eq!(owner.failures.load(Ordering::Relaxed), 0);
        drop(owner);
        let written = 2 * frame_len(small) + frame_len(large);
        assert_eq!(reader.join().unwrap(), written);
    }

    #[test]
    fn the_low_water_follows_streams_and_leaves_frame_by_frame_writers() {
        let mut lw = LowWater::new(Some(64 << 10));
        let big = STREAM_WRITE;
        // A stream: the fourth large reactor write in a row switches it on.
        for _ in 1..LOW_WATER_STREAK {
            assert_eq!(lw.note_write(true, big), None);
        }
        assert_eq!(lw.note_write(true, big), Some(64 << 10));
        assert_eq!(lw.note_write(true, big), None, "set once");
        // Replies (small reactor writes) count for neither.
        for _ in 0..10 {
            assert_eq!(lw.note_write(true, 100), None);
        }
        // A caller that writes a stream's backlog counts for neither.
        for _ in 0..10 {
            assert_eq!(lw.note_write(false, big), None);
        }
        // Callers' own writes, interrupted by a large reactor write, do
        // not switch it off; four in a row do.
        for _ in 1..LOW_WATER_STREAK {
            assert_eq!(lw.note_write(false, 1400), None);
        }
        assert_eq!(lw.note_write(true, big), None);
        for _ in 1..LOW_WATER_STREAK {
            assert_eq!(lw.note_write(false, 1400), None);
        }
        assert_eq!(lw.note_write(false, 1400), Some(0));
        assert_eq!(lw.note_write(false, 1400), None, "cleared once");
        // Not configured: never.
        for limit in [None, Some(0)] {
            let mut off = LowWater::new(limit);
            for _ in 0..10 {
                assert_eq!(off.note_write(true, big), None);
            }
        }
        // Past what the option holds: the most it can say.
        assert_eq!(LowWater::new(Some(usize::MAX)).limit, Some(u32::MAX));
    }

    #[cfg(any(target_os = "linux", target_os = "android"))]
    #[test]
    fn a_stream_of_queued_messages_sets_the_low_water_on_its_socket() {
        let (ours, theirs) = socket_pair();
        let reader = reading_to_the_end(theirs);
        let queue = queue(&Config::default().unsent_low_water(Some(48 << 10)));
        let owner = Owner::new(&queue, ours);
        let lowat = || {
            socket2::SockRef::from(&owner.stream)
                .tcp_notsent_lowat()
                .unwrap()
        };
        let system = lowat();
        let body = [1; 1400];
        let mut seq = 0;
        // Queued messages the reactor writes as a backlog, round by round.
        for _ in 0..LOW_WATER_STREAK {
            for _ in 0..(STREAM_WRITE / body.len() + 1) {
                seq += 1;
                queue
                    .submit(&owner, seq, &body, Mode::Queue, None, &mut || {})
                    .unwrap();
            }
            assert_eq!(queue.flush_from_reactor(&owner, usize::MAX), Flushed::Empty);
        }
        assert_eq!(lowat(), 48 << 10);
        // Frames written one by one by their callers: off again.
        for _ in 0..LOW_WATER_STREAK {
            seq += 1;
            let direct = Mode::Direct { wait: true };
            queue
                .submit(&owner, seq, &body, direct, None, &mut || {})
                .unwrap();
        }
        assert_eq!(lowat(), system);
        assert_eq!(owner.failures.load(Ordering::Relaxed), 0);
        drop(owner);
        reader.join().unwrap();
    }

    /// A loopback connection to a slow reader: our end non-blocking with a
    /// 16 KiB send buffer, theirs read `chunk` bytes at a time with a
    /// pause after each read (16 KiB receive buffer), so that our writes
    /// keep coming up short. The reader returns all it read once our end
    /// closes.
    fn slow_reader(chunk: usize, pause: Duration) -> (StdStream, std::thread::JoinHandle<Vec<u8>>) {
        let (ours, mut theirs) = socket_pair();
        socket2::SockRef::from(&ours)
            .set_send_buffer_size(16 << 10)
            .unwrap();
        socket2::SockRef::from(&theirs)
            .set_recv_buffer_size(16 << 10)
            .unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = Vec::new();
            let mut buf = vec![0; chunk];
            loop {
                match theirs.read(&mut buf) {
                    Ok(0) => return all,
                    Ok(n) => all.extend_from_slice(&buf[..n]),
                    Err(e) => panic!("reading the stream: {e}"),
                }
                std::thread::sleep(pause);
            }
        });
        (ours, reader)
    }

    /// The payload of frame `seq` in these tests.
    fn body(seq: u32) -> [u8; 1400] {
        [seq as u8; 1400]
    }

    /// Opens what the reader got with `queue`'s key: frames 1 to `frames`,
    /// each in order and intact, and nothing after them.
    fn assert_stream(wire: Vec<u8>, frames: u32) {
        assert_eq!(read_stream(wire, false), frames, "one frame a message");
    }

    /// Opens every frame of `wire` (bundled or not), checks that they carry
    /// messages 1, 2, ... in order, intact, and returns how many frames
    /// carried them.
    fn read_stream(mut wire: Vec<u8>, bundled: bool) -> u32 {
        let mut opener = crate::protocol::Opener::new([7; 32], Profile::Secure);
        if bundled {
            opener = opener.with_bundles();
        }
        let (mut at, mut frames, mut next) = (0, 0, 1);
        while at < wire.len() {
            let len = u32::from_be_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
            let plain = opener
                .open_frame_in_place(&mut wire[at..at + 4 + len])
                .unwrap();
            if bundled {
                crate::protocol::wire::check_records(plain, 1 << 20).unwrap();
                for (seq, payload) in crate::protocol::wire::records(plain) {
                    assert_eq!((seq, payload), (next, &body(next)[..]));
                    next += 1;
                }
            } else {
                let seq = u32::from_be_bytes(plain[..4].try_into().unwrap());
                assert_eq!((seq, &plain[4..]), (next, &body(next)[..]));
                next += 1;
            }
            at += 4 + len;
            frames += 1;
        }
        frames
    }

    /// A stream whose socket keeps filling: every short write leaves the
    /// rest where it lies (dropping the written prefix only once it is as
    /// long as the rest), and frames queued meanwhile go behind it. What
    /// the peer reads must be every frame, in order, intact, and the
    /// buffer must never hold more than twice what is pending.
    #[test]
    fn short_writes_keep_the_stream_in_order_and_the_buffer_bounded() {
        let (ours, reader) = slow_reader(8 << 10, Duration::from_micros(100));
        let queue = queue(&Config::default().max_queued_bytes(64 << 10));
        let owner = Owner::new(&queue, ours);
        let frames: u32 = 200;
        let (mut short_writes, mut kept_prefix) = (0, 0);
        let give_up = Instant::now() + Duration::from_secs(20);
        let mut flush = |queue: &OutboundQueue| {
            assert!(Instant::now() < give_up, "the stream never drained");
            match queue.flush_from_reactor(&owner, usize::MAX) {
                Flushed::Empty => true,
                Flushed::Blocked(pending) => {
                    short_writes += 1;
                    let g = lock(&queue.state);
                    kept_prefix += usize::from(g.head > 0);
                    assert_eq!(g.pending(), pending);
                    assert!(
                        g.buf.len() <= 2 * pending,
                        "{} bytes held for {pending} pending",
                        g.buf.len()
                    );
                    // What dropping the prefix at once allows: lengths up
                    // to the budget and a frame, doubled by growth.
                    let most = 2 * ((64 << 10) + frame_len(1400));
                    for b in [&g.buf, &g.spare] {
                        assert!(b.capacity() <= most, "{} bytes allocated", b.capacity());
                    }
                    false
                }
                Flushed::More(_) => false,
                other => panic!("flushing the stream: {other:?}"),
            }
        };
        for seq in 1..=frames {
            loop {
                match queue.submit(
                    &owner,
                    seq,
                    &body(seq),
                    Mode::ReactorQueue,
                    None,
                    &mut || {},
                ) {
                    Ok(()) => break,
                    Err(Error::QueueFull) => {
                        flush(&queue);
                        std::thread::sleep(Duration::from_micros(100));
                    }
                    Err(e) => panic!("queueing frame {seq}: {e}"),
                }
            }
            if seq % 8 == 0 {
                flush(&queue);
            }
        }
        while !flush(&queue) {
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(
            short_writes > 0,
            "the socket never filled: the test proves nothing"
        );
        assert!(
            kept_prefix > 0,
            "no short write left its prefix in place: the test proves nothing"
        );
        drop(owner);
        assert_stream(reader.join().unwrap(), frames);
    }

    /// A reactor's replies appended behind a kept written prefix: after a
    /// short write leaves its written prefix in place, the handlers' next
    /// replies go on top of it (a buffer that grows then grows with the
    /// written prefix in it). Replies of 40 KiB (capacities off the powers
    /// of two) are queued past the 64 KiB budget, then flushed to a slow
    /// reader, over and over: neither buffer may ever allocate more than
    /// SECURITY.md's bound, twice the budget and a frame.
    #[test]
    fn replies_appended_behind_a_kept_prefix_keep_the_buffers_bounded() {
        let (ours, reader) = slow_reader(8 << 10, Duration::from_micros(200));
        let budget = 64 << 10;
        let queue = queue(&Config::default().max_queued_bytes(budget));
        let owner = Owner::new(&queue, ours);
        let reply = vec![0x52; 40 << 10];
        let most = 2 * (budget + frame_len(reply.len()));
        let give_up = Instant::now() + Duration::from_secs(20);
        let mut largest = 0;
        for seq in 1..=200u32 {
            queue
                .submit(&owner, seq, &reply, Mode::OnReactor, None, &mut || {})
                .unwrap();
            if lock(&queue.state).pending() > budget {
                // Over the budget: the reactor flushes; reading goes on
                // once the socket took enough.
                while let Flushed::Blocked(pending) | Flushed::More(pending) =
                    queue.flush_from_reactor(&owner, usize::MAX)
                {
                    {
                        let g = lock(&queue.state);
                        largest = largest.max(g.buf.capacity()).max(g.spare.capacity());
                    }
                    if pending <= budget {
                        break;
                    }
                    assert!(Instant::now() < give_up, "the stream never drained");
                    std::thread::sleep(Duration::from_micros(200));
                }
            }
            let g = lock(&queue.state);
            largest = largest.max(g.buf.capacity()).max(g.spare.capacity());
        }
        assert!(
            largest <= most,
            "{largest} bytes allocated for one buffer, against {most} with the prefix dropped"
        );
        while !matches!(queue.flush_from_reactor(&owner, usize::MAX), Flushed::Empty) {
            assert!(Instant::now() < give_up, "the stream never drained");
            std::thread::sleep(Duration::from_micros(200));
        }
        drop(owner);
        let wire = reader.join().unwrap();
        assert_eq!(wire.len(), 200 * frame_len(reply.len()));
    }

    /// Callers that queue while the writer is in the middle of a write
    /// must still count the bytes it holds: the queue's budget is what the
    /// connection holds, written or not. A slow reader keeps the writes
    /// short; a second thread queues frames as fast as room allows: with
    /// `Mode::ReactorQueue` it retries at once when refused (so it queues
    /// during the writes), with `Mode::Queue` it waits for room (so a lost
    /// wake-up fails it at the send timeout). After every short write the
    /// queue holds at most the budget, and the reader gets every frame, in
    /// order, intact.
    fn queue_during_writes(mode: Mode, bundled: bool) {
        let (ours, reader) = slow_reader(4 << 10, Duration::from_micros(300));
        let limit = 32 << 10;
        let config = Config::default()
            .max_queued_bytes(limit)
            .send_timeout(Some(Duration::from_secs(10)));
        let queue = if bundled {
            bundling_queue(&config)
        } else {
            queue(&config)
        };
        let owner = Owner::new(&queue, ours);
        let frames: u32 = 400;
        let give_up = Instant::now() + Duration::from_secs(20);
        let mut most = 0;
        std::thread::scope(|s| {
            let queuing = s.spawn(|| {
                for seq in 1..=frames {
                    loop {
                        match queue.submit(&owner, seq, &body(seq), mode, None, &mut || {}) {
                            Ok(()) => break,
                            Err(Error::QueueFull) => std::thread::yield_now(),
                            Err(e) => panic!("queueing frame {seq}: {e}"),
                        }
                        assert!(Instant::now() < give_up, "frame {seq} never found room");
                    }
                }
            });
            loop {
                let done = queuing.is_finished();
                match queue.flush_from_reactor(&owner, usize::MAX) {
                    Flushed::Empty if done => break,
                    Flushed::Empty => {}
                    Flushed::Blocked(pending) | Flushed::More(pending) => most = most.max(pending),
                    other => panic!("flushing the stream: {other:?}"),
                }
                assert!(Instant::now() < give_up, "the stream never drained");
                std::thread::sleep(Duration::from_micros(50));
            }
            queuing.join().unwrap();
        });
        assert!(most > 0, "the socket never filled: the test proves nothing");
        assert!(
            most <= limit,
            "{most} bytes queued against a budget of {limit}"
        );
        drop(owner);
        let sealed = read_stream(reader.join().unwrap(), bundled);
        if bundled && mode == Mode::ReactorQueue {
            // Queued behind the writes, they went out bundled.
            assert!(sealed < frames / 2, "{sealed} frames for {frames} messages");
        } else {
            // Unbundled, or requests queued from another thread (numbered):
            // a frame each.
            assert_eq!(sealed, frames);
        }
    }

    /// A bundle opened by a producer while a write is under way (the
    /// owner appends a message each time the writer lets go of the lock)
    /// is at the start of the buffer the writer finds when it comes back:
    /// a short write puts its unwritten rest in front of it, and the open
    /// bundle must move with it, or its next message and its seal would
    /// land on frames already sealed.
    #[test]
    fn a_short_write_moves_the_bundle_opened_during_it() {
        short_write_with_bundles_queued_during_it(1, 1400);
    }

    /// The same with bundles closed full during the write (two messages
    /// of 12 KiB a time): they wait unsealed behind the unwritten rest,
    /// and must move with it too.
    #[test]
    fn a_short_write_moves_the_full_bundles_closed_during_it() {
        short_write_with_bundles_queued_during_it(2, 12 << 10);
    }

    fn short_write_with_bundles_queued_during_it(burst: usize, len: usize) {
        let (ours, reader) = slow_reader(8 << 10, Duration::from_micros(100));
        let queue = bundling_queue(&Config::default().max_queued_bytes(1 << 20));
        let owner = Owner::new(&queue, ours);
        let queued: u32 = 48;
        for seq in 1..=queued {
            let body = body(seq);
            let submitted = queue.submit(&owner, seq, &body, Mode::ReactorQueue, None, &mut || {});
            submitted.unwrap();
        }
        let produced: u32 = 64;
        owner.producer_burst.store(burst, Ordering::Relaxed);
        owner.producer_len.store(len, Ordering::Relaxed);
        owner.producer.store(produced as usize, Ordering::Relaxed);
        let (give_up, mut short_writes) = (Instant::now() + Duration::from_secs(20), 0);
        loop {
            match queue.flush_from_reactor(&owner, usize::MAX) {
                Flushed::Empty => break,
                Flushed::Blocked(_) => short_writes += 1,
                Flushed::More(_) => {}
                other => panic!("flushing: {other:?}"),
            }
            assert!(Instant::now() < give_up, "the stream never drained");
            std::thread::sleep(Duration::from_micros(100));
        }
        assert!(
            short_writes > 0,
            "the socket never filled: the test proves nothing"
        );
        assert_eq!(owner.producer.load(Ordering::Relaxed), 0);
        drop(owner);
        let mut wire = reader.join().unwrap();
        let mut opener = crate::protocol::Opener::new([7; 32], Profile::Secure).with_bundles();
        let (mut at, mut messages) = (0, Vec::new());
        while at < wire.len() {
            let len = u32::from_be_bytes(wire[at..at + 4].try_into().unwrap()) as usize;
            let plain = opener
                .open_frame_in_place(&mut wire[at..at + 4 + len])
                .unwrap();
            crate::protocol::wire::check_records(plain, 1 << 20).unwrap();
            let opened = crate::protocol::wire::records(plain).map(|(s, b)| (s, b.to_vec()));
            messages.extend(opened);
            at += 4 + len;
        }
        let want: Vec<(u32, Vec<u8>)> = (1..=queued)
            .map(|seq| (seq, body(seq).to_vec()))
            .chain((1..=produced).map(|_| (0, vec![3; len])))
            .collect();
        assert!(messages == want, "every message once, in order");
    }

    #[test]
    fn frames_queued_during_a_write_stay_within_the_budget() {
        queue_during_writes(Mode::ReactorQueue, false);
    }

    #[test]
    fn senders_waiting_for_room_get_it_as_writes_make_it() {
        queue_during_writes(Mode::Queue, false);
    }

    /// The same with bundled frames: messages join the bundle at the end
    /// of the queue while a write is under way, and a short write puts its
    /// unwritten rest in front of that open bundle, which must move with
    /// it. Numbered messages queued from another thread (`Mode::Queue`:
    /// async requests, replies made later) end their bundle instead.
    #[test]
    fn bundles_built_during_short_writes_stay_whole_and_in_order() {
        queue_during_writes(Mode::ReactorQueue, true);
        queue_during_writes(Mode::Queue, true);
    }

    #[test]
    fn room_counts_the_write_under_way_and_a_frame_over_the_budget_goes_alone() {
        let queue = queue(&Config::default());
        let mut g = lock(&queue.state);
        let limit = 1000;
        // Nothing held: any frame goes.
        assert!(!g.lacks_room(1000, limit));
        assert!(!g.lacks_room(5000, limit));
        // A write of 600 bytes under way, nothing queued behind it.
        g.queued_total = 600;
        assert!(!g.lacks_room(400, limit));
        assert!(g.lacks_room(401, limit));
        assert!(
            !g.lacks_room(5000, limit),
            "a frame over the budget goes alone"
        );
        // Queued bytes behind the write: the large frame waits for them.
        g.buf.extend_from_slice(&[0; 10]);
        g.queued_total += 10;
        assert!(!g.lacks_room(390, limit));
        assert!(g.lacks_room(391, limit));
        assert!(g.lacks_room(5000, limit));
        // A large frame's write under way, all of it taken out of the
        // buffer (nothing pending): the next large frame waits for it, or
        // a slow write's every round would let one more in.
        g.buf.clear();
        g.queued_total = 5000;
        g.written_total = 1000;
        assert_eq!(g.pending(), 0);
        assert!(
            g.lacks_room(5000, limit),
            "a large frame joined a write of 4000 bytes held"
        );
        assert!(g.lacks_room(10, limit));
        // Written down to the budget: it may go again.
        g.written_total = 4000;
        assert!(!g.lacks_room(5000, limit));
        // A closed queue refuses with its error instead of waiting.
        g.closed = Some(Error::Closed);
        assert!(!g.lacks_room(5000, limit));
    }

    #[test]
    fn a_write_the_peer_cut_short_reports_the_socket_error_not_a_bare_close() {
        let (ours, theirs) = socket_pair();
        // The peer resets the connection: our next write fails.
        socket2::SockRef::from(&theirs)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        let mut theirs = theirs;
        theirs.set_nonblocking(true).unwrap();
        let _ = theirs.read(&mut [0; 1]);
        drop(theirs);
        std::thread::sleep(Duration::from_millis(20));

        let queue = queue(&Config::default());
        let owner = Owner::new(&queue, ours);
        let error = queue
            .submit(
                &owner,
                1,
                &[1; 1400],
                Mode::Direct { wait: true },
                None,
                &mut || {},
            )
            .expect_err("a write to a reset connection succeeded");
        assert_eq!(owner.failures.load(Ordering::Relaxed), 1);
        assert!(
            matches!(&error, Error::Io(e) if e.to_string().contains("writing to")),
            "{error:?}"
        );
        assert!(
            matches!(queue.close_reason(), Some(Error::Io(_))),
            "{:?}",
            queue.close_reason()
        );
    }
}
