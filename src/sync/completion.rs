//! Completion slots: where a caller waits for the response to its request.
//!
//! Each connection has a fixed table of slots. A request's sequence number
//! encodes its slot index and the slot's generation
//! ([`crate::protocol::SeqSpace`]), so the reactor finds the slot
//! in O(1) with no map and no lock, and a late response to an abandoned
//! request (older generation) is recognised and dropped.
//!
//! # The slot protocol
//!
//! A slot's state word packs `generation << 32 | state`. Who may touch the
//! slot's cells (`buf`, `result`, `waiter`) is decided by the state:
//!
//! | state      | owner of the cells                          | left by                          |
//! |------------|---------------------------------------------|----------------------------------|
//! | `FREE`     | nobody                                      | a caller's CAS to `RESERVED`     |
//! | `RESERVED` | the caller that won the CAS                 | the caller's store of `WAITING` or `FREE` |
//! | `WAITING`  | nobody; the response is awaited             | a responder's CAS to `FILLING`, or the caller's cancel CAS to `RESERVED` |
//! | `FILLING`  | the responder that won the CAS              | the responder's store of `DONE`  |
//! | `DONE`     | the waiting caller                          | the caller's store of `FREE` with the next generation |
//!
//! Every transition that hands the cells over is a Release store or CAS
//! matched by an Acquire on the other side. Because a responder must match
//! both the generation and `WAITING`, a response for a cancelled request
//! (whose slot moved on to the next generation) can never fill a later
//! request's slot.

#![allow(unsafe_code)]

use std::mem;
use std::time::Instant;

use super::atomic_waker::AtomicWaker;
use super::{current, fence, park, park_timeout, spin_hint};
use super::{AtomicBool, AtomicU64, AtomicUsize};
use super::{Ordering, Thread, UnsafeCell};
use crate::clock::instant_after;
use crate::error::{Error, TimeoutKind};
use crate::protocol::wire::SeqSpace;
use crate::protocol::Role;

/// Busy-spin rounds before a waiter starts yielding instead.
pub(crate) const BUSY_SPINS: u32 = 32;

/// The spin time of [`PendingRequest::wait`] (the models' wait).
const MODEL_SPIN_TIME: std::time::Duration = std::time::Duration::from_micros(200);

const FREE: u64 = 0;
const RESERVED: u64 = 1;
const WAITING: u64 = 2;
const FILLING: u64 = 3;
const DONE: u64 = 4;

const fn pack(generation: u32, state: u64) -> u64 {
    ((generation as u64) << 32) | state
}

const fn state_of(word: u64) -> u64 {
    word & 0xffff_ffff
}

const fn generation_of(word: u64) -> u32 {
    (word >> 32) as u32
}

struct Slot {
    state: AtomicU64,
    /// The caller's response buffer, lent to the slot while it waits.
    buf: UnsafeCell<Vec<u8>>,
    /// Set by a responder that fails the request instead of answering it.
    result: UnsafeCell<Option<Error>>,
    /// The thread to unpark when the slot is filled.
    waiter: UnsafeCell<Option<Thread>>,
    /// The task to wake when the slot is filled, for a waiter that is a
    /// future rather than a thread ([`Pending::poll_answer`]): registered
    /// anew at every poll, hence an [`AtomicWaker`] rather than a cell
    /// owned by state.
    task: AtomicWaker,
    /// How long the request waits for its response, in nanoseconds
    /// ([`NO_LIMIT`]: for ever): set before it is published as `WAITING`,
    /// read by [`CompletionTable::longest_patience`].
    patience: AtomicU64,
}

/// A request's patience when it has no timeout.
pub const NO_LIMIT: u64 = u64::MAX;

// SAFETY: the cells are only touched by the single owner the state word
// designates (see the module docs), and ownership moves with Release/Acquire
// pairs, so no two threads ever access a cell at once.
unsafe impl Sync for Slot {}

/// A fixed table of completion slots for one connection's outgoing
/// requests.
pub struct CompletionTable {
    space: SeqSpace,
    slots: Box<[Slot]>,
    /// Where the next search for a free slot starts.
    hint: AtomicUsize,
    in_flight: AtomicUsize,
    closed: AtomicBool,
}

impl std::fmt::Debug for CompletionTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompletionTable")
            .field("slots", &self.slots.len())
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

/// Whom a response (or a failure) went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivered {
    /// Nobody: an unknown, late or foreign sequence number.
    Dropped,
    /// A thread waiting in [`Pending::wait_polling`] (unparked).
    ToThread,
    /// A future polling with [`Ticket::poll_answer`] (its waker woken).
    ToTask,
}

/// A request's outcome: the response in the caller's buffer, or the error
/// with the buffer handed back.
pub type Answer = Result<Vec<u8>, (Error, Vec<u8>)>;

/// How a waiter looks for its response itself instead of only waiting to
/// be handed it: the runtime's waiters read their connection's socket.
pub trait Poller {
    /// One spin round's work (reading the socket, say).
    fn poll(&mut self);
    /// The spin rounds are over (answered, or the waiter blocks or parks
    /// next).
    fn stop_spinning(&mut self);
    /// Instead of parking: waits by its own means (blocked on the socket)
    /// until `done()` or `deadline` and returns `true`; or returns `false`
    /// at once if it cannot, and the waiter parks until it is handed the
    /// response.
    fn block(&mut self, done: &dyn Fn() -> bool, deadline: Option<Instant>) -> bool;
}

/// Only spins and parks.
impl Poller for () {
    fn poll(&mut self) {}
    fn stop_spinning(&mut self) {}
    fn block(&mut self, _done: &dyn Fn() -> bool, _deadline: Option<Instant>) -> bool {
        false
    }
}

/// A request that holds a slot and has not been answered yet.
#[must_use = "a pending request holds its slot until waited on or cancelled"]
pub struct Pending<'a> {
    table: &'a CompletionTable,
    ticket: Ticket,
}

/// A request's claim on its slot without a borrow of the table, for a
/// future that owns its connection (and so the table), which it cannot
/// also borrow. Every operation takes the table the ticket came from.
/// Unlike [`Pending`], it does not cancel itself when dropped: its owner
/// cancels it or takes its answer.
#[must_use = "a ticket holds its slot until answered or cancelled"]
#[derive(Debug)]
pub struct Ticket {
    index: usize,
    generation: u32,
    done: bool,
}

impl CompletionTable {
    /// A table for requests issued by `role`, with room for `slots` in
    /// flight (rounded up to a power of two).
    pub fn new(role: Role, slots: usize) -> Self {
        let space = SeqSpace::new(role, slots);
        let slots = (0..space.slots())
            .map(|_| Slot {
                state: AtomicU64::new(pack(1, FREE)),
                buf: UnsafeCell::new(Vec::new()),
                result: UnsafeCell::new(None),
                waiter: UnsafeCell::new(None),
                task: AtomicWaker::new(),
                patience: AtomicU64::new(NO_LIMIT),
            })
            .collect();
        CompletionTable {
            space,
            slots,
            hint: AtomicUsize::new(0),
            in_flight: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
        }
    }

    /// Requests currently holding a slot.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether [`close`](Self::close) has run.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    /// The longest patience (nanoseconds, [`NO_LIMIT`] for none) among
    /// the requests waiting for their response, `None` if none waits: how
    /// long they let the peer be silent. A scan of the table, for the rare
    /// look after a request's timeout.
    pub fn longest_patience(&self) -> Option<u64> {
        self.slots
            .iter()
            // The Acquire load of WAITING sees the patience stored before.
            .filter(|slot| state_of(slot.state.load(Ordering::Acquire)) == WAITING)
            .map(|slot| slot.patience.load(Ordering::Relaxed))
            .max()
    }

    /// Takes a free slot for a new request that waits `patience`
    /// nanoseconds at most ([`NO_LIMIT`]: for ever), lending it `buf` for
    /// the response. On failure the buffer comes back with the error:
    /// [`Error::SequenceExhausted`] when every slot is taken,
    /// [`Error::Closed`] after [`close`](Self::close).
    pub fn begin(&self, buf: Vec<u8>, patience: u64) -> Result<Pending<'_>, (Error, Vec<u8>)> {
        self.begin_for(buf, Some(current()), patience)
    }

    /// [`begin`](Self::begin) for a waiter that is a future, which waits
    /// with [`Pending::poll_answer`]: no thread is unparked when the slot
    /// is filled (the thread that began the request is just some worker of
    /// an executor), only the task's waker is woken.
    pub fn begin_for_task(
        &self,
        buf: Vec<u8>,
        patience: u64,
    ) -> Result<Pending<'_>, (Error, Vec<u8>)> {
        self.begin_for(buf, None, patience)
    }

    fn begin_for(
        &self,
        buf: Vec<u8>,
        thread: Option<Thread>,
        patience: u64,
    ) -> Result<Pending<'_>, (Error, Vec<u8>)> {
        if self.is_closed() {
            return Err((Error::Closed, buf));
        }
        let n = self.slots.len();
        let start = self.hint.fetch_add(1, Ordering::Relaxed);
        for i in 0..n {
            let index = (start + i) & (n - 1);
            let slot = &self.slots[index];
            let word = slot.state.load(Ordering::Relaxed);
            if state_of(word) != FREE {
                continue;
            }
            let generation = generation_of(word);
            if slot
                .state
                .compare_exchange(
                    word,
                    pack(generation, RESERVED),
                    Ordering::Acquire,
                    Ordering::Relaxed,
                )
                .is_err()
            {
                continue;
            }
            // SAFETY: RESERVED makes this thread the cells' only owner.
            slot.buf.with_mut(|p| unsafe { *p = buf });
            slot.result.with_mut(|p| unsafe { *p = None });
            slot.waiter.with_mut(|p| unsafe { *p = thread });
            slot.patience.store(patience, Ordering::Relaxed);
            self.in_flight.fetch_add(1, Ordering::Relaxed);
            slot.state
                .store(pack(generation, WAITING), Ordering::SeqCst);
            // Store WAITING, fence, load `closed`; `close` stores `closed`,
            // fences, loads each slot. The two fences order the pairs, so
            // either the sweep sees WAITING and fails this slot, or this
            // thread sees `closed` and withdraws: a request can never slip
            // past a close and wait forever. (SeqCst accesses alone do not
            // give this in loom's model; the fences do, everywhere.)
            fence(Ordering::SeqCst);
            let mut pending = Pending {
                table: self,
                ticket: Ticket {
                    index,
                    generation,
                    done: false,
                },
            };
            if self.closed.load(Ordering::SeqCst) {
                if let Some(buf) = pending.ticket.try_cancel(self) {
                    return Err((Error::Closed, buf));
                }
                // The sweep got there first; `wait` returns its error.
            }
            return Ok(pending);
        }
        Err((Error::SequenceExhausted, buf))
    }

    /// Delivers a response: if `seq` names a slot that is waiting in that
    /// generation, copies `payload` into its buffer and wakes its caller.
    /// Returns `false` (and touches nothing) for an unknown, late or
    /// foreign sequence number.
    // The runtime asks whom it woke (`deliver`); the loom models use this.
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn complete(&self, seq: u32, payload: &[u8]) -> bool {
        self.deliver(seq, payload) != Delivered::Dropped
    }

    /// [`complete`](Self::complete), saying whom the response woke.
    pub fn deliver(&self, seq: u32, payload: &[u8]) -> Delivered {
        match self.space.decode(seq) {
            Some((index, generation)) => self.fill(index, generation, |buf, _| {
                buf.clear();
                buf.extend_from_slice(payload);
            }),
            None => Delivered::Dropped,
        }
    }

    /// Fails every waiting request with `error` and refuses new ones. Used
    /// when the connection closes, so no caller waits forever.
    pub fn close(&self, error: &Error) {
        self.closed.store(true, Ordering::SeqCst);
        fence(Ordering::SeqCst);
        self.fail_waiting(error);
    }

    /// Fails every request waiting now with `error`; later ones are taken
    /// as before. For responses that cannot come yet (they could be read
    /// only by a reactor that does not have the connection), on a
    /// connection that goes on.
    pub fn fail_waiting(&self, error: &Error) {
        for index in 0..self.slots.len() {
            loop {
                let word = self.slots[index].state.load(Ordering::SeqCst);
                if state_of(word) != WAITING {
                    break;
                }
                if self.fill(index, generation_of(word), |_, result| {
                    *result = Some(error.clone())
                }) != Delivered::Dropped
                {
                    break;
                }
            }
        }
    }

    fn fill(
        &self,
        index: usize,
        generation: u32,
        write: impl FnOnce(&mut Vec<u8>, &mut Option<Error>),
    ) -> Delivered {
        let slot = &self.slots[index];
        if slot
            .state
            .compare_exchange(
                pack(generation, WAITING),
                pack(generation, FILLING),
                Ordering::SeqCst,
                Ordering::Relaxed,
            )
            .is_err()
        {
            return Delivered::Dropped;
        }
        // SAFETY: FILLING makes this thread the cells' only owner.
        let waiter = slot.buf.with_mut(|b| {
            slot.result.with_mut(|r| unsafe { write(&mut *b, &mut *r) });
            slot.waiter.with_mut(|w| unsafe { (*w).clone() })
        });
        slot.state.store(pack(generation, DONE), Ordering::Release);
        let delivered = match waiter {
            Some(thread) => {
                thread.unpark();
                Delivered::ToThread
            }
            None => Delivered::ToTask,
        };
        slot.task.wake();
        delivered
    }
}

impl<'a> Pending<'a> {
    /// The request's sequence number, to put on the wire.
    pub fn seq(&self) -> u32 {
        self.ticket.seq(self.table)
    }

    /// The claim without the borrow, for an owner that keeps the table
    /// by other means (see [`Ticket`]).
    pub fn into_ticket(mut self) -> Ticket {
        let ticket = Ticket {
            index: self.ticket.index,
            generation: self.ticket.generation,
            done: false,
        };
        // This `Pending` no longer owns the slot: its drop must not cancel.
        self.ticket.done = true;
        ticket
    }

    fn is_done(&self) -> bool {
        self.ticket.is_done(self.table)
    }

    /// Waits for the response (or failure), spinning `spins` times before
    /// parking, and gives up at `deadline` with a request timeout. The
    /// caller's buffer comes back either way.
    // The runtime always waits with a poller; the loom models do not.
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn wait(self, spins: u32, deadline: Option<Instant>) -> Result<Vec<u8>, (Error, Vec<u8>)> {
        self.wait_polling((spins, MODEL_SPIN_TIME), deadline, &mut ())
    }

    /// [`wait`](Self::wait), spinning at most `spin.0` rounds and `spin.1`
    /// of time (the machine's [`Waiting`](crate::Waiting)), calling
    /// `poller.poll` on every spin round and trying `poller.block` before
    /// each park: the caller reads the connection itself while it waits,
    /// so the response needs no other thread to wake for it.
    pub fn wait_polling(
        mut self,
        spin: (u32, std::time::Duration),
        deadline: Option<Instant>,
        poller: &mut dyn Poller,
    ) -> Result<Vec<u8>, (Error, Vec<u8>)> {
        let (spins, spin_time) = spin;
        if spins > 0 && !spin_time.is_zero() {
            if let Some(answer) = self.wait_actively(spins, spin_time, deadline, poller) {
                return answer;
            }
        }
        loop {
            if self.is_done() {
                return self.ticket.take_answer(self.table);
            }
            // The poller minds the deadline while it blocks: the clock is
            // read here only when it did not block, or stopped before the
            // answer came.
            let blocked = poller.block(&|| self.is_done(), deadline);
            if blocked && self.is_done() {
                continue;
            }
            match deadline {
                None => {
                    if !blocked {
                        park();
                    }
                }
                Some(deadline) => {
                    let now = Instant::now();
                    if now >= deadline {
                        if let Some(buf) = self.ticket.try_cancel(self.table) {
                            return Err((Error::Timeout(TimeoutKind::Request), buf));
                        }
                        // A responder is filling the slot right now; it
                        // answered in time after all.
                        continue;
                    }
                    if !blocked {
                        park_timeout(deadline - now);
                    }
                }
            }
        }
    }

    /// Waits without sleeping, for at most `spins` rounds and `spin_time`
    /// (never past `deadline`), calling `poller.poll` on
    /// every round (the caller reads the socket itself), and returns the
    /// answer if it came. A sleeping waiter costs a futex wake-up, and on a
    /// virtual machine whose idle cores halt, a cross-core wake-up costs
    /// tens of microseconds: several round trips.
    ///
    /// The first rounds busy-spin, for one waiter at a time per pair of
    /// cores (the [`SpinPermit`](super::SpinPermit)) and only when this is
    /// the connection's one outstanding request: a busy spinner holds a
    /// core the reactors need. Every round after those yields the core
    /// instead, so with more waiters than cores each one runs a round
    /// whenever the others (reactors included) have nothing to do, and
    /// none parks while answers come in faster than a wake-up would.
    fn wait_actively(
        &mut self,
        spins: u32,
        spin_time: std::time::Duration,
        deadline: Option<Instant>,
        poller: &mut dyn Poller,
    ) -> Option<Answer> {
        let alone = self.table.in_flight() <= 1;
        let permit = super::SpinPermit::acquire(if alone { spins } else { 0 });
        let busy_rounds = if permit.is_some() { BUSY_SPINS } else { 0 };
        let mut until = instant_after(Instant::now(), spin_time);
        if let Some(deadline) = deadline {
            until = until.min(deadline);
        }
        let mut answered = false;
        for i in 0..spins {
            if self.is_done() {
                answered = true;
                break;
            }
            poller.poll();
            if self.is_done() {
                answered = true;
                break;
            }
            if i < busy_rounds {
                spin_hint();
            } else if Instant::now() >= until {
                break;
            } else {
                super::contention::yield_now();
            }
        }
        drop(permit);
        poller.stop_spinning();
        // Taken here, not by the caller: the slot is this waiter's only
        // once it saw DONE.
        answered.then(|| self.ticket.take_answer(self.table))
    }

    /// See [`Ticket::poll_answer`]. (The async API holds tickets; the
    /// loom models poll through this.)
    #[cfg_attr(not(loom), allow(dead_code))]
    pub fn poll_answer(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Answer> {
        self.ticket.poll_answer(self.table, cx)
    }

    /// Abandons the request and takes the buffer back. A response that
    /// arrives later is dropped.
    pub fn cancel(mut self) -> Vec<u8> {
        let ticket = mem::replace(&mut self.ticket, Ticket::spent());
        ticket.cancel(self.table)
    }
}

impl Drop for Pending<'_> {
    fn drop(&mut self) {
        if !self.ticket.done {
            // Dropped without waiting (a panic or an early return): free the
            // slot so it is not leaked.
            let ticket = mem::replace(&mut self.ticket, Ticket::spent());
            drop(ticket.cancel(self.table));
        }
    }
}

impl Ticket {
    /// A ticket that holds nothing (what a `Pending` keeps once it gave
    /// its claim away).
    fn spent() -> Ticket {
        Ticket {
            index: 0,
            generation: 0,
            done: true,
        }
    }

    /// The request's sequence number, to put on the wire.
    pub fn seq(&self, table: &CompletionTable) -> u32 {
        table.space.encode(self.index, self.generation)
    }

    fn slot<'t>(&self, table: &'t CompletionTable) -> &'t Slot {
        &table.slots[self.index]
    }

    /// The request's timeout changed while it waits (a future retimed
    /// after its first poll): its patience with it.
    pub fn set_patience(&self, table: &CompletionTable, patience: u64) {
        self.slot(table).patience.store(patience, Ordering::Relaxed);
    }

    fn is_done(&self, table: &CompletionTable) -> bool {
        state_of(self.slot(table).state.load(Ordering::Acquire)) == DONE
    }

    /// Polls for the answer, for a waiter that is a future: ready once the
    /// slot is filled; otherwise `cx`'s waker is registered, and the
    /// responder (or the close that fails the request) wakes it. Not to be
    /// polled again once it returned ready.
    pub fn poll_answer(
        &mut self,
        table: &CompletionTable,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Answer> {
        debug_assert!(!self.done, "polled after it was ready");
        if self.is_done(table) {
            return std::task::Poll::Ready(self.take_answer(table));
        }
        self.slot(table).task.register(cx.waker());
        // A fill that came between the check above and the registration
        // found no waker to wake: look again.
        if self.is_done(table) {
            return std::task::Poll::Ready(self.take_answer(table));
        }
        std::task::Poll::Pending
    }

    /// Gives up on the request at its deadline, for a waiter that is a
    /// future: a request timeout with the buffer back, unless a responder
    /// already claimed the slot (its answer, then, which came in time).
    pub fn time_out(mut self, table: &CompletionTable) -> Answer {
        loop {
            if let Some(buf) = self.try_cancel(table) {
                return Err((Error::Timeout(TimeoutKind::Request), buf));
            }
            if self.is_done(table) {
                return self.take_answer(table);
            }
            spin_hint();
        }
    }

    /// Abandons the request and takes the buffer back. A response that
    /// arrives later is dropped.
    pub fn cancel(mut self, table: &CompletionTable) -> Vec<u8> {
        loop {
            if let Some(buf) = self.try_cancel(table) {
                return buf;
            }
            if self.is_done(table) {
                return match self.take_answer(table) {
                    Ok(buf) | Err((_, buf)) => buf,
                };
            }
            spin_hint();
        }
    }

    /// Takes the slot back from WAITING, if no responder has claimed it.
    fn try_cancel(&mut self, table: &CompletionTable) -> Option<Vec<u8>> {
        self.slot(table)
            .state
            .compare_exchange(
                pack(self.generation, WAITING),
                pack(self.generation, RESERVED),
                Ordering::Acquire,
                Ordering::Relaxed,
            )
            .ok()?;
        let (buf, _) = self.release(table);
        Some(buf)
    }

    /// Takes the answer of a DONE slot (the slot is freed).
    fn take_answer(&mut self, table: &CompletionTable) -> Result<Vec<u8>, (Error, Vec<u8>)> {
        let (buf, result) = self.release(table);
        match result {
            None => Ok(buf),
            Some(e) => Err((e, buf)),
        }
    }

    /// Empties the cells and frees the slot for its next generation. Only
    /// called by the owner (state RESERVED or DONE).
    fn release(&mut self, table: &CompletionTable) -> (Vec<u8>, Option<Error>) {
        let slot = self.slot(table);
        // SAFETY: the caller owns the cells in RESERVED and DONE.
        let buf = slot.buf.with_mut(|p| unsafe { std::mem::take(&mut *p) });
        let result = slot.result.with_mut(|p| unsafe { (*p).take() });
        // A task's waker is not kept past its request.
        drop(slot.task.take());
        let next = table.space.next_generation(self.generation);
        self.done = true;
        table.in_flight.fetch_sub(1, Ordering::Relaxed);
        slot.state.store(pack(next, FREE), Ordering::Release);
        (buf, result)
    }
}

impl Drop for Ticket {
    fn drop(&mut self) {
        debug_assert!(
            self.done || std::thread::panicking(),
            "a ticket was dropped while its request was in flight: its slot leaks"
        );
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use std::time::{Duration, Instant};

    use super::{CompletionTable, Poller, NO_LIMIT};
    use crate::error::{Error, TimeoutKind};
    use crate::protocol::Role;

    /// Keeps the blocking poller's contract without an answer: waits until
    /// the deadline, then returns `true` (it waited). Counts its calls.
    struct SleepsUntilDeadline {
        blocks: u32,
    }

    impl Poller for SleepsUntilDeadline {
        fn poll(&mut self) {}
        fn stop_spinning(&mut self) {}
        fn block(&mut self, done: &dyn Fn() -> bool, deadline: Option<Instant>) -> bool {
            assert!(!done());
            self.blocks += 1;
            assert!(self.blocks < 100, "blocked again and again: a busy loop");
            let deadline = deadline.expect("the waiter has a deadline");
            if let Some(left) = deadline.checked_duration_since(Instant::now()) {
                std::thread::sleep(left);
            }
            true
        }
    }

    /// The longest patience is that of the requests still waiting: not of
    /// those answered or cancelled, and a retimed one's new patience.
    #[test]
    fn the_longest_patience_is_among_the_requests_still_waiting() {
        let table = CompletionTable::new(Role::Client, 4);
        assert_eq!(table.longest_patience(), None);
        let unlimited = table.begin(Vec::new(), NO_LIMIT).unwrap();
        let long = table.begin(Vec::new(), 3_000).unwrap();
        let short = table.begin_for_task(Vec::new(), 100).unwrap();
        assert_eq!(table.longest_patience(), Some(NO_LIMIT));
        assert!(table.complete(unlimited.seq(), b"answered"));
        assert_eq!(
            table.longest_patience(),
            Some(3_000),
            "an answered request waits no more"
        );
        let _ = unlimited.wait(0, None);
        drop(long.cancel());
        assert_eq!(table.longest_patience(), Some(100));
        let ticket = short.into_ticket();
        ticket.set_patience(&table, 5_000);
        assert_eq!(table.longest_patience(), Some(5_000));
        drop(ticket.cancel(&table));
        assert_eq!(table.longest_patience(), None);
    }

    #[test]
    fn a_waiter_whose_poller_waited_out_the_deadline_times_out_at_once() {
        let table = CompletionTable::new(Role::Client, 1);
        let pending = table
            .begin(Vec::with_capacity(8), NO_LIMIT)
            .expect("a free slot");
        let deadline = Instant::now() + Duration::from_millis(20);
        let mut poller = SleepsUntilDeadline { blocks: 0 };
        let answer = pending.wait_polling((0, Duration::ZERO), Some(deadline), &mut poller);
        let ended = Instant::now();
        let (err, buf) = answer.expect_err("no answer came");
        assert!(
            matches!(err, Error::Timeout(TimeoutKind::Request)),
            "{err:?}"
        );
        assert_eq!(buf.capacity(), 8, "the caller's buffer comes back");
        assert!(ended >= deadline, "ended before its deadline");
        assert!(
            ended < deadline + Duration::from_millis(500),
            "ended {:?} after its deadline",
            ended - deadline
        );
        assert_eq!(poller.blocks, 1);
        // The slot is free again.
        assert_eq!(table.in_flight(), 0);

        // A deadline already passed on entry: the poller returns at once
        // (there is nothing to wait for), and the waiter times out without
        // blocking again.
        let pending = table.begin(Vec::new(), NO_LIMIT).expect("a free slot");
        let mut poller = SleepsUntilDeadline { blocks: 0 };
        let answer = pending.wait_polling(
            (0, Duration::ZERO),
            Some(Instant::now() - Duration::from_millis(1)),
            &mut poller,
        );
        let (err, _) = answer.expect_err("no answer came");
        assert!(
            matches!(err, Error::Timeout(TimeoutKind::Request)),
            "{err:?}"
        );
        assert_eq!(poller.blocks, 1);
        assert_eq!(table.in_flight(), 0);
    }

    #[test]
    fn a_waiter_whose_poller_blocked_takes_the_answer_delivered_meanwhile() {
        struct Delivers<'a> {
            table: &'a CompletionTable,
            seq: u32,
        }
        impl Poller for Delivers<'_> {
            fn poll(&mut self) {}
            fn stop_spinning(&mut self) {}
            fn block(&mut self, done: &dyn Fn() -> bool, _deadline: Option<Instant>) -> bool {
                self.table.deliver(self.seq, b"pong");
                assert!(done());
                true
            }
        }
        let table = CompletionTable::new(Role::Client, 1);
        let pending = table.begin(Vec::new(), NO_LIMIT).expect("a free slot");
        let mut poller = Delivers {
            table: &table,
            seq: pending.seq(),
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        let answer = pending.wait_polling((0, Duration::ZERO), Some(deadline), &mut poller);
        assert_eq!(answer.expect("answered"), b"pong");
    }
}
