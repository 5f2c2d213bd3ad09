//! The async API's futures: a request, a send, a queued message or a reply
//! on one connection, awaited from any executor.
//!
//! They run on the same reactors as the blocking calls and never block the
//! thread that polls them (but for a send first polled in its own
//! dialled connection's `on_open`, before a reactor has the connection:
//! it writes as the blocking send does, see `Handler::on_open`): a
//! request waits in its completion slot for the
//! reactor to fill it and wake the task
//! ([`Ticket::poll_answer`](crate::sync::completion::Ticket::poll_answer))
//! (where spinning pays, a lone request first reads the socket itself at
//! each poll for the spin time, waking its own task: see
//! [`Waiting`](crate::Waiting)),
//! a frame waits for room or for its write on the outbound queue's list of
//! tasks, and a deadline is kept by the connection's reactor
//! ([`Timers`](crate::sync::timers::Timers)), so no executor timer is
//! involved (and a handler that blocks that reactor delays the deadline,
//! as it delays the response). A future does nothing until first polled (its deadline starts
//! then) and cancels its call when dropped: a request frees its slot (a
//! late response is dropped and can never reach another request), and a
//! frame not yet queued is never sent. Each call allocates nothing in
//! steady state.

use std::future::Future;
use std::mem;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use crate::clock::{no_time_left, now_nanos, CallDeadline};
use crate::conn::{Connection, Driver};
use crate::error::{CallOp, Error, Result, TimeoutKind};
use crate::outbound::{Mode, QueueOwner, QueueWait};
use crate::protocol::connection::nanos;
use crate::read_side::TaskLease;
use crate::stats::Counters;
use crate::sync::completion::{Answer, CompletionTable, Ticket, BUSY_SPINS, NO_LIMIT};
use crate::sync::timers::TimerKey;
use crate::sync::{Ordering, SpinPermit};
use crate::waiting::{FutureWait, HANDED_OVER};

/// The async calls of a connection (here rather than in `conn.rs`, which
/// the futures build on).
impl Connection {
    /// [`request`](Self::request) for async code: a future that resolves
    /// once the response is in `response` (its capacity reused), within
    /// the configured request timeout from its first poll (or its own:
    /// [`RequestFuture::timeout`]). It never blocks the thread that polls
    /// it, works under any executor, and allocates nothing per call in
    /// steady state. Dropping it cancels the request: the slot is freed,
    /// `response` is left empty with its capacity, and a late response is
    /// dropped. Polled on this connection's own reactor thread (in one of
    /// its handlers), it fails with
    /// [`Error::OnReactorThread`](crate::Error::OnReactorThread), as
    /// [`request`](Self::request) does: only that reactor reads the
    /// response.
    ///
    /// ```no_run
    /// # async fn run(conn: monte_rpc::Connection) -> monte_rpc::Result<()> {
    /// let mut response = Vec::new();
    /// conn.request_async(b"ping", &mut response).await?;
    /// conn.request_async(b"again", &mut response)
    ///     .timeout(Some(std::time::Duration::from_millis(50)))
    ///     .await?;
    /// # Ok(()) }
    /// ```
    pub fn request_async<'a>(
        &'a self,
        body: &'a [u8],
        response: &'a mut Vec<u8>,
    ) -> RequestFuture<'a> {
        RequestFuture::new(self.clone(), body, response)
    }

    /// [`send`](Self::send) for async code: resolves once the frame is
    /// written to the socket, within the send timeout from the first poll.
    /// Dropped before its frame is queued, it sends nothing.
    pub fn send_async<'a>(&'a self, body: &'a [u8]) -> SendFuture<'a> {
        SendFuture::new(self.clone(), 0, body, CallOp::Send)
    }

    /// [`send_no_wait`](Self::send_no_wait) for async code: resolves once
    /// the frame is queued, waiting for room (without blocking the thread,
    /// but in this connection's own `on_open`: see
    /// [`Handler::on_open`](crate::Handler::on_open)) while
    /// `max_queued_bytes` are queued, up to the send timeout.
    pub fn send_no_wait_async<'a>(&'a self, body: &'a [u8]) -> SendFuture<'a> {
        SendFuture::new(self.clone(), 0, body, CallOp::SendNoWait)
    }

    /// [`reply`](Self::reply) for async code: a deferred reply to the
    /// peer's request `seq`, queued like
    /// [`send_no_wait_async`](Self::send_no_wait_async).
    pub fn reply_async<'a>(&'a self, seq: u32, body: &'a [u8]) -> SendFuture<'a> {
        SendFuture::new(self.clone(), seq, body, CallOp::Reply)
    }
}

/// An async call's deadline, and its timer on the connection's reactor
/// while the call waits.
#[derive(Debug)]
pub(crate) struct Deadline {
    timeout: Option<Duration>,
    kind: TimeoutKind,
    /// When the call began (its first poll, [`now_nanos`]).
    started: Option<u64>,
    /// When it passes ([`now_nanos`]), from the first poll on.
    at: Option<u64>,
    timer: Option<TimerKey>,
}

impl Deadline {
    pub(crate) fn new(timeout: Option<Duration>, kind: TimeoutKind) -> Self {
        Deadline {
            timeout,
            kind,
            started: None,
            at: None,
            timer: None,
        }
    }

    /// Its timeout replaced (a future's `timeout`, which may come after
    /// the first poll): counted from the call's start all the same, and
    /// once the call began, the timer armed for the old one goes (the
    /// next wait arms one for the new).
    pub(crate) fn retime(&mut self, timeout: Option<Duration>, driver: &dyn Driver) {
        self.timeout = timeout;
        if let Some(started) = self.started {
            self.disarm(driver);
            self.at = timeout.map(|t| started.saturating_add(nanos(t)));
        }
    }

    /// [`retime`](Self::retime) to end at `at` ([`now_nanos`]; `None`:
    /// never): the deadline of an enclosing call, retimed.
    pub(crate) fn retime_to(&mut self, at: Option<u64>, driver: &dyn Driver) {
        let from = self.started.unwrap_or_else(now_nanos);
        let timeout = at.map(|at| Duration::from_nanos(at.saturating_sub(from)));
        self.retime(timeout, driver);
    }

    /// When it passes ([`now_nanos`]), once the call began.
    pub(crate) fn at(&self) -> Option<u64> {
        self.at
    }

    /// What is left of it (`None`: no deadline), zero once passed.
    pub(crate) fn left(&self) -> Option<Duration> {
        self.at
            .map(|at| Duration::from_nanos(at.saturating_sub(now_nanos())))
    }

    /// The call begins: its timeout runs from now.
    pub(crate) fn start(&mut self) {
        let now = now_nanos();
        self.started = Some(now);
        self.at = self.timeout.map(|t| now.saturating_add(nanos(t)));
    }

    /// How long the call waits in all ([`NO_LIMIT`]: for ever), for its
    /// completion slot.
    pub(crate) fn patience(&self) -> u64 {
        self.timeout.map_or(NO_LIMIT, nanos)
    }

    /// Whether the call was given no time at all (a zero timeout): it
    /// fails before it does anything.
    pub(crate) fn none_given(&self) -> bool {
        no_time_left(self.timeout)
    }

    pub(crate) fn passed(&self) -> bool {
        self.at.is_some_and(|at| now_nanos() >= at)
    }

    /// The call waits: the reactor wakes `cx`'s task when the deadline
    /// passes.
    pub(crate) fn arm(&mut self, driver: &dyn Driver, cx: &Context<'_>) {
        let Some(at) = self.at else { return };
        let timers = driver.timers();
        match self.timer {
            Some(key) => timers.update(key, cx.waker()),
            None => {
                let (key, wake_reactor) = timers.insert(at, cx.waker());
                self.timer = Some(key);
                if wake_reactor {
                    driver.wake();
                }
            }
        }
    }

    pub(crate) fn disarm(&mut self, driver: &dyn Driver) {
        if let Some(key) = self.timer.take() {
            driver.timers().remove(key);
        }
    }
}

enum RequestStage {
    /// Not polled yet.
    Start,
    /// Holds a slot; its frame waits for room in the queue.
    Queuing(Ticket),
    /// The frame is queued or written; the response is awaited.
    Awaiting(Ticket),
    /// Resolved (or dropped).
    Done,
}

impl RequestStage {
    /// Takes the ticket of a stage that holds one, leaving `Done`.
    fn take_ticket(&mut self) -> Ticket {
        match mem::replace(self, RequestStage::Done) {
            RequestStage::Queuing(ticket) | RequestStage::Awaiting(ticket) => ticket,
            RequestStage::Start | RequestStage::Done => unreachable!("no ticket to take"),
        }
    }
}

/// A request in flight, from
/// [`Connection::request_async`](crate::Connection::request_async): resolves
/// once the response is in the caller's buffer, or with the call's error.
///
/// Dropping it cancels the request: its slot is freed at once, the
/// caller's buffer is given back (empty), and a response that arrives
/// later is dropped.
#[must_use = "futures do nothing unless polled"]
pub struct RequestFuture<'a> {
    /// Its own handle (a reference count), so the future needs no borrow
    /// of the connection and its slot's ticket no borrow of the table.
    conn: Connection,
    body: &'a [u8],
    response: &'a mut Vec<u8>,
    mode: Mode,
    stage: RequestStage,
    deadline: Deadline,
    queued: QueueWait,
    /// Counted in the reactor's requests in flight.
    counted: bool,
    /// Reads the socket itself in its polls, the reactor quiet, until
    /// `spin_until` (see `spin_window`)...
    lease: Option<TaskLease>,
    spin_until: u64,
    /// ...for this many polls so far...
    spins: u32,
    /// ...handing the core over at each (one core), not spinning...
    hand_over: bool,
    /// ...with leave to busy-spin its first rounds.
    permit: Option<SpinPermit>,
}

impl std::fmt::Debug for RequestFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match self.stage {
            RequestStage::Start => "start",
            RequestStage::Queuing(_) => "queuing",
            RequestStage::Awaiting(_) => "awaiting",
            RequestStage::Done => "done",
        };
        f.debug_struct("RequestFuture")
            .field("conn", &self.conn.id())
            .field("stage", &stage)
            .field("timeout", &self.deadline.timeout)
            .finish()
    }
}

impl<'a> RequestFuture<'a> {
    pub(crate) fn new(conn: Connection, body: &'a [u8], response: &'a mut Vec<u8>) -> Self {
        let deadline = Deadline::new(conn.config().request_timeout, TimeoutKind::Request);
        RequestFuture {
            conn,
            body,
            response,
            mode: Mode::Direct { wait: false },
            stage: RequestStage::Start,
            deadline,
            queued: QueueWait::default(),
            counted: false,
            lease: None,
            spin_until: 0,
            spins: 0,
            hand_over: false,
            permit: None,
        }
    }

    /// Its own timeout in place of the configured
    /// [`request_timeout`](crate::Config::request_timeout) (`None`: wait
    /// until the response or the connection's end), from the first poll
    /// (also when set after it).
    pub fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.deadline.retime(timeout, self.conn.driver());
        self.repatience();
        self
    }

    /// Its deadline moved to `at` ([`now_nanos`]; `None`: none), by the
    /// client's call it serves.
    pub(crate) fn retime_to(&mut self, at: Option<u64>) {
        self.deadline.retime_to(at, self.conn.driver());
        self.repatience();
    }

    /// Retimed while its request waits: the slot's patience follows.
    fn repatience(&self) {
        if let RequestStage::Queuing(ticket) | RequestStage::Awaiting(ticket) = &self.stage {
            ticket.set_patience(self.conn.requests(), self.deadline.patience());
        }
    }

    /// Moves the call on as far as it can. The ticket stays in `stage`
    /// while anything that could panic runs (a waker's clone as a wait is
    /// registered), so a poll that unwinds leaves it for `drop` to cancel
    /// rather than leaking its slot.
    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Answer> {
        let RequestFuture {
            conn,
            body,
            response,
            mode,
            stage,
            deadline,
            queued,
            counted,
            lease,
            spin_until,
            spins,
            hand_over,
            permit,
        } = self;
        let table = conn.requests();
        loop {
            match stage {
                RequestStage::Start => {
                    *stage = RequestStage::Done;
                    let buf = mem::take(*response);
                    if conn.driver().is_current() {
                        // As the blocking call: only this reactor reads the
                        // response and keeps the deadline, and a handler
                        // that blocks on the future holds it.
                        return Poll::Ready(Err((Error::OnReactorThread, buf)));
                    }
                    if !QueueOwner::has_reactor(&*conn)
                        && crate::opening::opening_on_this_thread(|c| c.id() == conn.id()).is_some()
                    {
                        // From its own `on_open`: its reactor, the only
                        // reader of the response, takes it after that.
                        return Poll::Ready(Err((Error::AsyncRequestInOnOpen, buf)));
                    }
                    if deadline.none_given() {
                        // As the blocking call: no time at all fails before
                        // anything is sent.
                        return Poll::Ready(Err((Error::Timeout(TimeoutKind::Request), buf)));
                    }
                    deadline.start();
                    *mode = match conn.checked_mode(body, *mode) {
                        Ok(mode) => mode,
                        Err(e) => return Poll::Ready(Err((e, buf))),
                    };
                    let ticket = table
                        .begin_for_task(buf, deadline.patience())?
                        .into_ticket();
                    if table.in_flight() > 1 && *mode == (Mode::Direct { wait: false }) {
                        // Other requests are in flight: their responses
                        // keep the reactor turning, and it writes every
                        // frame queued meanwhile in one go. A lone request
                        // writes itself (no hop to the reactor).
                        *mode = Mode::Queue;
                    }
                    Counters::inc(&conn.driver().stats().requests_in_flight);
                    *counted = true;
                    if let Some((from, until, handing_over)) = spin_window(conn, table, deadline) {
                        // Before the request is written: a response that
                        // lands first must not wake the reactor either.
                        *lease = Some(conn.lease_reads(from));
                        *spin_until = until;
                        *hand_over = handing_over;
                    }
                    *stage = RequestStage::Queuing(ticket);
                }
                RequestStage::Queuing(ticket) => {
                    if queued.has_waited() && deadline.passed() {
                        // Polled again only after its deadline (woken for
                        // room and by its timer together, or its executor
                        // was late): room now must not send it. (Not on
                        // the first pass: no clock reading there, and a
                        // call with room goes out.)
                        return Poll::Ready(stage.take_ticket().time_out(table));
                    }
                    let seq = ticket.seq(table);
                    match conn
                        .outbound()
                        .poll_submit(conn, seq, body, *mode, queued, cx)
                    {
                        Poll::Ready(Ok(_)) => {
                            let ticket = stage.take_ticket();
                            *stage = RequestStage::Awaiting(ticket);
                        }
                        Poll::Ready(Err(e)) => {
                            return Poll::Ready(Err((e, stage.take_ticket().cancel(table))))
                        }
                        Poll::Pending if deadline.passed() => {
                            return Poll::Ready(stage.take_ticket().time_out(table))
                        }
                        Poll::Pending => {
                            // Waiting for room, it reads nothing: the
                            // reactor hears of the socket again, as for a
                            // blocking caller, and the call does not spin.
                            if let Some(lease) = lease.take() {
                                conn.end_lease(lease);
                            }
                            deadline.arm(conn.driver(), cx);
                            return Poll::Pending;
                        }
                    }
                }
                RequestStage::Awaiting(ticket) => {
                    let read = &conn.shared.read;
                    let now = match lease {
                        Some(lease) if read.lease_current(lease) => Some(now_nanos()),
                        _ => None,
                    };
                    let spinning = now.is_some_and(|now| now < *spin_until);
                    if spinning {
                        read.renew_task_leases(now.unwrap_or(0));
                        read.read_while_waiting(&*conn);
                    } else if let Some(lease) = lease.take() {
                        // Its window ended, or the reactor took its lease
                        // back (it was not polled for a while).
                        conn.end_lease(lease);
                        *permit = None;
                    }
                    return match ticket.poll_answer(table, cx) {
                        Poll::Ready(answer) => {
                            // The ticket is spent: its slot is free.
                            *stage = RequestStage::Done;
                            Poll::Ready(answer)
                        }
                        Poll::Pending if deadline.passed() => {
                            Poll::Ready(stage.take_ticket().time_out(table))
                        }
                        Poll::Pending if spinning => {
                            *spins += 1;
                            if *hand_over {
                                // One core: the thread that will answer
                                // needs this one. A yield that nobody
                                // took means it is not here: sleep.
                                if crate::sync::contention::yield_now() < HANDED_OVER {
                                    *spin_until = 0;
                                    if let Some(lease) = lease.take() {
                                        conn.end_lease(lease);
                                    }
                                    deadline.arm(conn.driver(), cx);
                                    return Poll::Pending;
                                }
                            } else {
                                // As a spinning caller: busy for its first
                                // rounds while no more spinners than half
                                // the cores do (the permit), then giving
                                // the core away each round, which also
                                // tells the contention detector how the
                                // cores are held.
                                if *spins == 1 {
                                    *permit = SpinPermit::acquire(1);
                                } else if *spins > BUSY_SPINS {
                                    *permit = None;
                                }
                                if permit.is_none() {
                                    crate::sync::contention::yield_now();
                                }
                            }
                            // Polled again at once: the executor runs its
                            // other tasks in between, but does not park.
                            cx.waker().wake_by_ref();
                            Poll::Pending
                        }
                        Poll::Pending => {
                            deadline.arm(conn.driver(), cx);
                            Poll::Pending
                        }
                    };
                }
                RequestStage::Done => panic!("RequestFuture polled after it resolved"),
            }
        }
    }

    /// Leaves every list the call is on.
    fn end(&mut self) {
        if let Some(lease) = self.lease.take() {
            self.conn.end_lease(lease);
        }
        self.permit = None;
        self.deadline.disarm(self.conn.driver());
        self.conn.outbound().forget(&mut self.queued);
        if mem::take(&mut self.counted) {
            Counters::dec(&self.conn.driver().stats().requests_in_flight);
        }
    }
}

impl Future for RequestFuture<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let answer = ready!(this.step(cx));
        this.end();
        Poll::Ready(match answer {
            Ok(buf) => {
                *this.response = buf;
                Ok(())
            }
            Err((e, buf)) => {
                *this.response = buf;
                // A zero timeout fails before the deadline starts.
                let passed = this.deadline.passed() || this.deadline.none_given();
                this.conn.driver().stats().count_request_failure(&e, passed);
                Err(e.calling(CallOp::Request, this.conn.peer_addr()))
            }
        })
    }
}

impl Drop for RequestFuture<'_> {
    fn drop(&mut self) {
        match mem::replace(&mut self.stage, RequestStage::Done) {
            RequestStage::Queuing(ticket) | RequestStage::Awaiting(ticket) => {
                let mut buf = ticket.cancel(self.conn.requests());
                buf.clear();
                *self.response = buf;
                self.end();
            }
            RequestStage::Start => self.response.clear(),
            RequestStage::Done => {}
        }
    }
}

/// From and until when ([`now_nanos`]) a request just begun reads the
/// socket itself in its polls, re-polled at once, instead of waiting for
/// the reactor to wake its task, and whether it hands the core over at
/// each poll (one core) rather than spinning; `None`: it does not. The
/// rule is [`Waiting`](crate::Waiting)'s, for a lone request only (with
/// others in flight, their responses keep the reactor turning).
fn spin_window(
    conn: &Connection,
    table: &CompletionTable,
    deadline: &Deadline,
) -> Option<(u64, u64, bool)> {
    let (time, hand_over) = match conn.config().waiting.future_wait() {
        FutureWait::Sleep => return None,
        FutureWait::Spin(time) => (time, false),
        FutureWait::HandOver(time) => (time, true),
    };
    if table.in_flight() > 1 {
        return None;
    }
    let started = deadline.started?;
    Some((started, started.saturating_add(nanos(time)), hand_over))
}

#[derive(Clone, Copy)]
enum SendStage {
    Start,
    /// Waits for room in the queue.
    Queuing,
    /// Queued; waits until the queue is written up to here.
    Writing(u64),
    Done,
}

/// A frame on its way out, from
/// [`Connection::send_async`](crate::Connection::send_async),
/// [`send_no_wait_async`](crate::Connection::send_no_wait_async) or
/// [`reply_async`](crate::Connection::reply_async): resolves once the frame
/// is written (`send_async`) or queued (the others), within the send
/// timeout from the first poll ([`Config::send_timeout`](crate::Config::send_timeout)).
///
/// Dropping it before the frame is queued means the frame is never sent;
/// once queued, it is written whether or not the future is still there.
#[must_use = "futures do nothing unless polled"]
pub struct SendFuture<'a> {
    conn: Connection,
    body: &'a [u8],
    seq: u32,
    op: CallOp,
    mode: Mode,
    stage: SendStage,
    deadline: Deadline,
    queued: QueueWait,
    /// Counted in the connection's calls in progress (the client pool's
    /// load).
    counted: bool,
}

impl std::fmt::Debug for SendFuture<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let stage = match self.stage {
            SendStage::Start => "start",
            SendStage::Queuing => "queuing",
            SendStage::Writing(_) => "writing",
            SendStage::Done => "done",
        };
        f.debug_struct("SendFuture")
            .field("conn", &self.conn.id())
            .field("op", &self.op)
            .field("stage", &stage)
            .finish()
    }
}

impl<'a> SendFuture<'a> {
    pub(crate) fn new(conn: Connection, seq: u32, body: &'a [u8], op: CallOp) -> Self {
        let mode = match op {
            CallOp::Send => Mode::Direct { wait: true },
            _ => Mode::Queue,
        };
        let deadline = Deadline::new(conn.config().send_timeout, TimeoutKind::Write);
        SendFuture {
            conn,
            body,
            seq,
            op,
            mode,
            stage: SendStage::Start,
            deadline,
            queued: QueueWait::default(),
            counted: false,
        }
    }

    /// Its own timeout in place of the send timeout, from the first poll.
    pub(crate) fn timeout(mut self, timeout: Option<Duration>) -> Self {
        self.deadline.retime(timeout, self.conn.driver());
        self
    }

    /// Its deadline moved to `at` ([`now_nanos`]; `None`: none), by the
    /// client's call it serves.
    pub(crate) fn retime_to(&mut self, at: Option<u64>) {
        self.deadline.retime_to(at, self.conn.driver());
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let conn = &self.conn;
        let out = conn.outbound();
        loop {
            let waiting = match self.stage {
                SendStage::Start => {
                    self.deadline.start();
                    if !conn.has_reactor()
                        && crate::opening::opening_on_this_thread(|c| c.id() == conn.id()).is_some()
                    {
                        // Awaited in the connection's own `on_open`: no
                        // reactor has it until that returns, so nobody
                        // else would write what this send waits for. This
                        // thread writes it, as the blocking send does.
                        // Its own deadline, none included (not the send
                        // timeout, which `None` means to `submit`).
                        let by = CallDeadline::after(self.deadline.timeout, self.deadline.kind);
                        let sent = conn.submit_or_wait(
                            self.seq,
                            self.body,
                            self.mode,
                            Some(by),
                            &mut || {},
                        );
                        return Poll::Ready(sent);
                    }
                    self.mode = conn.checked_mode(self.body, self.mode)?;
                    conn.shared.active_calls.fetch_add(1, Ordering::Relaxed);
                    self.counted = true;
                    self.stage = SendStage::Queuing;
                    continue;
                }
                SendStage::Queuing => {
                    if self.queued.has_waited() && self.deadline.passed() {
                        // As a request's: out of time before it found room.
                        return Poll::Ready(Err(Error::Timeout(self.deadline.kind)));
                    }
                    match out.poll_submit(
                        conn,
                        self.seq,
                        self.body,
                        self.mode,
                        &mut self.queued,
                        cx,
                    ) {
                        Poll::Ready(Ok(None)) => return Poll::Ready(Ok(())),
                        Poll::Ready(Ok(Some(end))) => {
                            self.stage = SendStage::Writing(end);
                            continue;
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => Poll::Pending,
                    }
                }
                SendStage::Writing(end) => out.poll_written(end, &mut self.queued, cx),
                SendStage::Done => panic!("SendFuture polled after it resolved"),
            };
            return match waiting {
                Poll::Ready(result) => Poll::Ready(result),
                Poll::Pending if self.deadline.passed() => {
                    Poll::Ready(Err(Error::Timeout(self.deadline.kind)))
                }
                Poll::Pending => {
                    self.deadline.arm(conn.driver(), cx);
                    Poll::Pending
                }
            };
        }
    }

    fn end(&mut self) {
        self.stage = SendStage::Done;
        self.deadline.disarm(self.conn.driver());
        self.conn.outbound().forget(&mut self.queued);
        if mem::take(&mut self.counted) {
            self.conn
                .shared
                .active_calls
                .fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Future for SendFuture<'_> {
    type Output = Result<()>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<()>> {
        let this = self.get_mut();
        let result = ready!(this.step(cx));
        this.end();
        Poll::Ready(result.map_err(|e| e.calling(this.op, this.conn.peer_addr())))
    }
}

impl Drop for SendFuture<'_> {
    fn drop(&mut self) {
        if !matches!(self.stage, SendStage::Start | SendStage::Done) {
            self.end();
        }
    }
}
