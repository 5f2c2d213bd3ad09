//! A connection's read side: its core behind the read turn, the socket's
//! epoll interest, and when bytes last came; shared by the reactor and the
//! callers waiting for responses on the connection.
//!
//! A caller waiting for its response reads the socket itself when no other
//! thread does (the turn of [`ReadTurn`]), delivers every response it finds
//! straight to its completion slot, and leaves anything else (a peer's
//! request or message, the end of the stream, an error) to the reactor,
//! which it tells: a response then wakes one thread, not two. Before a
//! reactor has the connection (a dialled connection's `on_open`, whose
//! request may wait behind the peer's greeting), a caller sets the peer's
//! messages aside for the reactor instead, within a limit, and reads on.
//! While callers read, the reactor's readable interest is off; so it is
//! while a future awaiting a lone request spins (a [`TaskLease`], which
//! the reactor takes back from a future no longer polled). The read side reaches the
//! connection around it (socket, reactor, completion table) through
//! [`ReadOwner`].

use std::io;
use std::time::{Duration, Instant};

use crate::conn_socket::{ConnSocket, WAIT_SLICE};

use crate::clock::{nanos_at, now_nanos};
use crate::error::{socket_error, Error, SocketOp};
use crate::protocol::connection::{nanos, ConnCore, Filled, Held, Next, Taker};
use crate::stats::Counters;
use crate::sync::buffers::BufferPool;
use crate::sync::completion::Poller;
use crate::sync::read_turn::{ReadGuard, ReadTurn};
use crate::sync::{lock, AtomicBool, AtomicU64, Mutex, Ordering};

/// What the read side needs of the connection around it.
pub(crate) trait ReadOwner {
    /// The socket.
    fn stream(&self) -> &ConnSocket;
    /// The peer's address, as known when the connection was made.
    fn peer_addr(&self) -> Option<std::net::SocketAddr>;
    /// The pool receive buffers are borrowed from and given back to.
    fn buffers(&self) -> &BufferPool;
    /// The counters frames read are added to.
    fn stats(&self) -> &Counters;
    /// The reactor's epoll instance, for interest changes.
    fn registry(&self) -> &mio::Registry;
    /// The connection's key in its reactor, `usize::MAX` until registered.
    fn token(&self) -> usize;
    /// Whether the dialled connection's `on_open` runs: no reactor takes
    /// the connection before it returns.
    fn opening(&self) -> bool;
    /// Hands the reading to the reactor (something only it may handle).
    fn ask_reactor_to_read(&self);
    /// Fails every request waiting on the connection with `error`: it is
    /// ending, and no reactor has it yet to close it.
    fn fail_requests(&self, error: &Error);
    /// Fails every request waiting on the connection now with `error`, on
    /// a connection that goes on: their responses cannot come before a
    /// reactor has it.
    fn fail_waiting_requests(&self, error: &Error);
    /// Delivers a response: whether a request was waiting for it.
    fn deliver_response(&self, seq: u32, payload: &[u8]) -> bool;
}

/// Frames a caller reads in one go before handing the rest to the reactor.
const CALLER_READ_FRAMES: u64 = 64;

/// What a caller's pass over the connection reads.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    /// Only the bytes already buffered.
    Buffered,
    /// The socket too, without waiting.
    Socket,
    /// The socket too, its first read sleeping until bytes come (at most
    /// a slice: [`ConnSocket::waiting`]).
    WaitInRecv,
}

/// What a caller-thread reader did with its turn.
enum CallerRead {
    /// Read until the socket would block.
    Drained,
    /// Did not read: what is buffered is the reactor's, and the reactor
    /// knows.
    Declined,
    /// Stopped where the reactor must read next (something only it
    /// handles, the frame budget, or a readiness event the caller took).
    Reactor,
}

/// Who wants the reactor told about this socket's readiness.
#[derive(Default)]
struct Interest {
    /// Callers reading the socket while they wait for their responses:
    /// while one is, the reactor is not woken for arriving bytes.
    callers_waiting: u32,
    /// Futures reading the socket in their spin windows ([`TaskLease`]):
    /// they quiet the reactor as waiting callers do.
    task_leases: u32,
    /// A reactor timer will look at the leases
    /// ([`ReadSide::reclaim_task_leases`]).
    reclaim_armed: bool,
    /// The reactor waits to write queued output.
    writable: bool,
}

impl Interest {
    /// Whether the reactor hears of arriving bytes.
    fn readable(&self) -> bool {
        self.callers_waiting == 0 && self.task_leases == 0
    }
}

/// How long after a lease holder's last poll the reactor may take the
/// socket's readable events back: a future runs only when its executor
/// polls it, and one its executor no longer polls (a stalled executor, a
/// future kept but not awaited) must not keep the connection's other
/// traffic unread.
pub(crate) const TASK_LEASE_GRACE: Duration = Duration::from_millis(1);

/// A future's lease on the socket's readable events while it spins: see
/// [`ReadSide::lease_to_task`]. Ended with [`ReadSide::end_task_lease`].
#[must_use = "a lease keeps the reactor quiet until it is ended"]
#[derive(Debug)]
pub(crate) struct TaskLease {
    epoch: u64,
}

/// How a waiting caller waits: it reads its connection itself each spin
/// round (see [`ReadSide::read_while_waiting`]), with the reactor's
/// readable events off meanwhile (its wake-up per response would only find
/// the bytes read, and would take a core from the spinner or the peer),
/// and instead of parking, blocks on the socket while it holds the read
/// turn (see [`ReadSide::wait_on_socket`]).
pub(crate) struct CallerReads<'a, O: ReadOwner> {
    side: &'a ReadSide,
    owner: &'a O,
    /// Readable events are taken away from the reactor while this caller
    /// spins (see [`ReadSide::callers_waiting`]).
    quiet: bool,
}

impl<'a, O: ReadOwner> CallerReads<'a, O> {
    pub(crate) fn new(side: &'a ReadSide, owner: &'a O) -> Self {
        CallerReads {
            side,
            owner,
            quiet: false,
        }
    }

    /// Takes readable events away from the reactor now, before the
    /// request is written: a response that lands before this caller starts
    /// waiting must not wake the reactor, which would read it and then
    /// have to wake this caller (two thread switches instead of none).
    /// Given back when the caller has to wait for room in the queue first,
    /// stops spinning, cannot wait on the socket, or is dropped.
    pub(crate) fn quiet_reactor(&mut self) {
        if !self.quiet {
            self.quiet = true;
            self.side.callers_waiting(self.owner, 1);
        }
    }

    /// Gives the reactor its readable events back, if this caller took
    /// them ([`quiet_reactor`](Self::quiet_reactor)): for a wait in which
    /// it reads nothing, and when it is done.
    pub(crate) fn wake_reactor_again(&mut self) {
        if std::mem::take(&mut self.quiet) {
            self.side.callers_waiting(self.owner, -1);
        }
    }
}

impl<O: ReadOwner> Poller for CallerReads<'_, O> {
    fn poll(&mut self) {
        self.quiet_reactor();
        self.side.read_while_waiting(self.owner);
    }

    fn stop_spinning(&mut self) {
        self.wake_reactor_again();
    }

    fn block(&mut self, done: &dyn Fn() -> bool, deadline: Option<Instant>) -> bool {
        let waited = self.side.wait_on_socket(self.owner, done, deadline);
        // Before a park (or another round), the reactor must hear of the
        // socket again: a parked caller reads nothing.
        self.wake_reactor_again();
        waited
    }
}

impl<O: ReadOwner> Drop for CallerReads<'_, O> {
    fn drop(&mut self) {
        self.wake_reactor_again();
    }
}

/// A caller counted among those reading the socket while they wait
/// ([`ReadSide::callers_waiting`]) for as long as it lives: dropped, it
/// stops being counted, on every way out of the wait.
struct CallerListening<'a, O: ReadOwner> {
    side: &'a ReadSide,
    owner: &'a O,
}

impl<'a, O: ReadOwner> CallerListening<'a, O> {
    fn new(side: &'a ReadSide, owner: &'a O) -> Self {
        side.callers_waiting(owner, 1);
        CallerListening { side, owner }
    }
}

impl<O: ReadOwner> Drop for CallerListening<'_, O> {
    fn drop(&mut self) {
        self.side.callers_waiting(self.owner, -1);
        if std::thread::panicking() {
            // The turn was dropped, not released: frames read and not yet
            // taken, and any readiness announced meanwhile, are the
            // reactor's now.
            self.owner.ask_reactor_to_read();
        }
    }
}

/// The read side; see the module docs.
pub(crate) struct ReadSide {
    /// The core, read by the reactor or by a caller waiting for a response.
    pub(crate) core: ReadTurn<ConnCore>,
    /// What the reactor's epoll reports for this socket; every change is
    /// made under this lock so the kernel's state is the last one computed.
    interest: Mutex<Interest>,
    /// When bytes last arrived ([`now_nanos`]), set by whoever read them:
    /// the client pool's liveness probe and the reactor's idle watch.
    last_read: AtomicU64,
    /// Whether the silence is this side's (its reading paused for the
    /// output budget, or a graceful close under way), as the reactor's
    /// lifecycle says: a caller holding the turn judges the peer's
    /// deadlines by it too.
    silence_ours: AtomicBool,
    /// When reading last resumed after a pause ([`now_nanos`]), not yet
    /// applied to the core (0: none): the peer's deadlines restart there,
    /// whichever thread holds the turn next.
    resumed_at: AtomicU64,
    /// When a future holding a lease last polled ([`now_nanos`]).
    lease_polled: AtomicU64,
    /// Bumped (under the interest lock) as the reactor takes stale leases
    /// back: a lease of an older epoch no longer counts.
    lease_epoch: AtomicU64,
}

impl ReadSide {
    pub(crate) fn new(core: ConnCore) -> Self {
        ReadSide {
            last_read: AtomicU64::new(core.last_read()),
            silence_ours: AtomicBool::new(false),
            resumed_at: AtomicU64::new(0),
            lease_polled: AtomicU64::new(0),
            lease_epoch: AtomicU64::new(0),
            core: ReadTurn::new(core, ConnCore::discard_input),
            interest: Mutex::new(Interest::default()),
        }
    }

    /// When bytes last arrived ([`now_nanos`]).
    pub(crate) fn last_read(&self) -> u64 {
        self.last_read.load(Ordering::Relaxed)
    }

    /// The reactor read bytes at `now`.
    pub(crate) fn note_read(&self, now: u64) {
        self.last_read.store(now, Ordering::Relaxed);
    }

    /// Reactor side: whether the silence is now this side's (see
    /// `silence_ours`); `resumed_at`, if reading resumed then.
    pub(crate) fn note_silence(&self, ours: bool, resumed_at: Option<u64>) {
        if let Some(at) = resumed_at {
            self.resumed_at.store(at, Ordering::Release);
        }
        self.silence_ours.store(ours, Ordering::Release);
    }

    /// Whoever holds the turn: restarts the peer's deadlines at a resume
    /// not yet applied to the core.
    pub(crate) fn apply_resume(&self, core: &mut ConnCore) {
        if self.resumed_at.load(Ordering::Acquire) != 0 {
            let at = self.resumed_at.swap(0, Ordering::AcqRel);
            if at != 0 {
                core.resume(at);
            }
        }
    }

    /// Caller side, instead of parking: if no other thread reads the socket,
    /// takes the read turn and blocks on the socket until `done()` (its
    /// response, delivered by its own reads) or `deadline`, reading and
    /// delivering every response that lands meanwhile. The kernel then
    /// wakes this caller directly, where a parked caller needs the reactor
    /// woken first and then itself: one wake-up per response instead of
    /// two. It sleeps in `recv` itself where the socket allows and a slice
    /// is left before its deadlines ([`ConnSocket::may_wait_in_recv`]),
    /// else in `ppoll`. Returns `false` (park
    /// instead) when another thread has the turn, or the reactor must
    /// handle what is buffered.
    pub(crate) fn wait_on_socket(
        &self,
        owner: &impl ReadOwner,
        done: &dyn Fn() -> bool,
        deadline: Option<Instant>,
    ) -> bool {
        let Some(inbound) = self.core.try_take() else {
            return false;
        };
        // Messages set aside before the reactor had the connection are its
        // to dispatch first: it is told, and this caller parks.
        let set_aside_due = inbound.has_set_aside() && owner.token() != usize::MAX;
        if inbound.held.is_some() || inbound.eof || !inbound.is_open() || set_aside_due {
            self.read_with_turn(owner, inbound);
            return false;
        }
        // Given back when this wait ends, or as it unwinds (a task's
        // waker that panics while this caller delivers its response)...
        let listening = CallerListening::new(self, owner);
        // ...after the turn (declared later, dropped first), so that an
        // unwinding caller can hand what it leaves to the reactor.
        let mut inbound = inbound;
        let mut reactor_needed = false;
        // The first pass decodes only what is buffered: the request was
        // just written, so a read would most likely find nothing.
        let mut pass = Pass::Buffered;
        let mut at = Instant::now();
        loop {
            let mut now = nanos_at(at);
            if let CallerRead::Reactor = self.read_responses(owner, &mut inbound, pass, now) {
                reactor_needed = true;
                break;
            }
            if done() {
                break;
            }
            if pass != Pass::Buffered {
                // Reading may have taken a while: a wait in `recv`, or
                // others' large responses.
                at = Instant::now();
                now = nanos_at(at);
            }
            // The peer's deadlines hold while a caller has the turn (the
            // reactor's sweep cannot look then): one that passed closes
            // the connection, through the reactor. Not while the silence
            // is this side's, and counted from the last resume. Whose the
            // silence is, first: the reactor notes a resume's time before
            // it says the silence is the peer's again (`note_silence`), so
            // a caller that sees the latter sees the former too.
            let ours = self.silence_ours.load(Ordering::Acquire);
            self.apply_resume(&mut inbound);
            if let Some(kind) = inbound.expired(now, ours) {
                inbound.held = Some(Held::Failed(Error::Timeout(kind)));
                reactor_needed = true;
                break;
            }
            // While the silence is ours the peer's deadlines wait: no
            // wake-up for them (one past would make every wait zero, a
            // spin until the resume).
            let core_wait = match ours {
                true => None,
                false => inbound
                    .next_deadline()
                    .map(|at| Duration::from_nanos(at.saturating_sub(now))),
            };
            let timeout = match deadline {
                None => core_wait,
                Some(d) => match d.checked_duration_since(at) {
                    Some(left) if !left.is_zero() => Some(core_wait.map_or(left, |w| w.min(left))),
                    _ => break,
                },
            };
            let socket = owner.stream();
            if socket.may_wait_in_recv(timeout) {
                // The next pass sleeps in its read (no `ppoll`), a slice at
                // most; `at` is still current.
                pass = Pass::WaitInRecv;
            } else {
                // A slice at most, as in `recv`: the call's end (a
                // response another thread delivered, a close) shows only
                // between waits.
                let slice = timeout.map_or(WAIT_SLICE, |t| t.min(WAIT_SLICE));
                pass = match crate::sys::wait_readable(socket, Some(slice)) {
                    true => Pass::Socket,
                    false => Pass::Buffered,
                };
                at = Instant::now();
            }
        }
        // Readable events go back to the reactor before the turn does
        // (unless the caller quieted it before writing its request: then
        // they come back as `block` ends, and epoll reports at once any
        // bytes already there, so none are lost):
        // bytes that arrived after this caller's last read are then either
        // announced (epoll reports them as the interest comes back, the
        // reactor finds the turn held and raises WANTED) or read by the
        // holder's own release loop.
        drop(listening);
        if reactor_needed {
            self.hand_over(owner, inbound);
        } else {
            self.give_back(owner, inbound);
        }
        true
    }

    /// A caller starts (+1) or stops (-1) reading the socket while it
    /// waits (spinning, or blocked on it).
    /// The first takes readable events away from the reactor, the last
    /// gives them back (and epoll then reports at once any bytes already
    /// there). Without this, each response would wake both the caller and
    /// the reactor, and the reactor only to find the bytes read.
    fn callers_waiting(&self, owner: &impl ReadOwner, delta: i32) {
        let mut interest = lock(&self.interest);
        let before = interest.readable();
        interest.callers_waiting = interest.callers_waiting.wrapping_add_signed(delta);
        if before != interest.readable() {
            // A failure means the reactor dropped the socket: there is
            // nobody left to tell.
            let _ = apply_interest(owner, &interest);
        }
    }

    /// A future waiting for its response starts reading the socket itself
    /// in its polls (as a spinning caller does, see
    /// [`read_while_waiting`](Self::read_while_waiting)), at `now`
    /// ([`now_nanos`]): the reactor is not woken for the bytes meanwhile.
    /// Unlike a caller's count, a lease holds only while its future is
    /// polled: each poll renews it ([`renew_task_leases`](Self::renew_task_leases)),
    /// and the reactor takes every lease back once none was renewed for
    /// [`TASK_LEASE_GRACE`] ([`reclaim_task_leases`](Self::reclaim_task_leases)),
    /// at its first wake-up after that (see `Connection::arm_lease_reclaim`).
    /// Returns the lease, and when that look is due if no timer is armed
    /// for it yet: the caller arms one.
    pub(crate) fn lease_to_task(
        &self,
        owner: &impl ReadOwner,
        now: u64,
    ) -> (TaskLease, Option<u64>) {
        self.renew_task_leases(now);
        let mut interest = lock(&self.interest);
        let was_readable = interest.readable();
        interest.task_leases += 1;
        if was_readable {
            // A failure means the reactor dropped the socket: there is
            // nobody left to tell.
            let _ = apply_interest(owner, &interest);
        }
        let look = (!interest.reclaim_armed).then(|| {
            interest.reclaim_armed = true;
            now.saturating_add(nanos(TASK_LEASE_GRACE))
        });
        let lease = TaskLease {
            epoch: self.lease_epoch.load(Ordering::Relaxed),
        };
        (lease, look)
    }

    /// A future holding a lease polled at `now` ([`now_nanos`]): the leases
    /// stand for [`TASK_LEASE_GRACE`] more. (One mark for all of them: a
    /// future no longer polled beside others that are keeps the reactor
    /// quiet only as long as they do.)
    pub(crate) fn renew_task_leases(&self, now: u64) {
        self.lease_polled.fetch_max(now, Ordering::Relaxed);
    }

    /// Whether `lease` still counts: the reactor has not taken it back
    /// (then the reactor reads for its future, which stops spinning).
    pub(crate) fn lease_current(&self, lease: &TaskLease) -> bool {
        self.lease_epoch.load(Ordering::Relaxed) == lease.epoch
    }

    /// The future is done reading (its response came, its window ended,
    /// it must wait for room first, or it went): its lease stops counting,
    /// unless the reactor took it back already.
    pub(crate) fn end_task_lease(&self, owner: &impl ReadOwner, lease: TaskLease) {
        let mut interest = lock(&self.interest);
        if self.lease_current(&lease) && interest.task_leases > 0 {
            interest.task_leases -= 1;
            if interest.readable() {
                let _ = apply_interest(owner, &interest);
            }
        }
    }

    /// Reactor side, at the timer [`lease_to_task`](Self::lease_to_task)
    /// asked for: takes every lease back once none was renewed for
    /// [`TASK_LEASE_GRACE`] (no future holding one was polled since; one
    /// polled late finds its lease gone, stops spinning, and is woken by
    /// the reactor). Returns when to look again, while leases stand.
    pub(crate) fn reclaim_task_leases(&self, owner: &impl ReadOwner, now: u64) -> Option<u64> {
        let mut interest = lock(&self.interest);
        if interest.task_leases == 0 {
            interest.reclaim_armed = false;
            return None;
        }
        let due = self
            .lease_polled
            .load(Ordering::Relaxed)
            .saturating_add(nanos(TASK_LEASE_GRACE));
        if now < due {
            return Some(due);
        }
        interest.task_leases = 0;
        // Under the lock, as every change of the leases.
        self.lease_epoch.fetch_add(1, Ordering::Relaxed);
        interest.reclaim_armed = false;
        if interest.readable() {
            let _ = apply_interest(owner, &interest);
        }
        None
    }

    /// Reactor side: whether it waits for the socket to take more output.
    pub(crate) fn set_write_interest(
        &self,
        owner: &impl ReadOwner,
        writable: bool,
    ) -> io::Result<()> {
        let mut interest = lock(&self.interest);
        interest.writable = writable;
        apply_interest(owner, &interest)
    }

    /// Caller side, while waiting for a response: reads the socket if no
    /// other thread is reading it, and delivers the responses found (this
    /// caller's or others') straight to their slots, so a response wakes
    /// no reactor on its way. Anything else (a peer's request or message,
    /// the end of the stream, an error) is left for the reactor, which is
    /// told. A future holding a lease calls it at each poll.
    pub(crate) fn read_while_waiting(&self, owner: &impl ReadOwner) {
        if !crate::sys::readable_now(owner.stream()) {
            return;
        }
        if let Some(inbound) = self.core.try_take() {
            self.read_with_turn(owner, inbound);
        }
    }

    /// Reads with the turn held, then gives it back (reading again while
    /// readiness events came meanwhile), or hands the reading to the
    /// reactor.
    fn read_with_turn<'a>(&'a self, owner: &impl ReadOwner, mut inbound: ReadGuard<'a, ConnCore>) {
        match self.read_responses(owner, &mut inbound, Pass::Socket, now_nanos()) {
            CallerRead::Reactor => self.hand_over(owner, inbound),
            CallerRead::Drained | CallerRead::Declined => self.give_back(owner, inbound),
        }
    }

    /// Gives the turn back; while `release` returns it (a readiness event
    /// came), reads again first.
    fn give_back<'a>(&'a self, owner: &impl ReadOwner, mut inbound: ReadGuard<'a, ConnCore>) {
        while let Some(again) = self.core.release(inbound) {
            inbound = again;
            if let CallerRead::Reactor =
                self.read_responses(owner, &mut inbound, Pass::Socket, now_nanos())
            {
                self.hand_over(owner, inbound);
                return;
            }
        }
    }

    /// Lets go of the turn and hands the reading to the reactor. Before a
    /// reactor has the connection (a dialled connection's `on_open` waits
    /// for a response) it can do nothing until `on_open` returns: an end
    /// the caller found (the peer's end of stream, a failed read or frame,
    /// a deadline passed) fails the waiting requests now, rather than at
    /// their timeouts. What ended it stays in the core for the reactor,
    /// which closes the connection once it has it. While `on_open` runs,
    /// so does a message of the peer's that the set-aside ones leave no
    /// room for: the responses behind it wait for the reactor, which
    /// takes the connection only once `on_open` returns, and the requests
    /// waiting fail now, on a connection that goes on.
    fn hand_over(&self, owner: &impl ReadOwner, inbound: ReadGuard<'_, ConnCore>) {
        let no_reactor = owner.token() == usize::MAX;
        let ending = match &inbound.held {
            _ if !no_reactor => None,
            Some(Held::Failed(e)) => Some(e.clone()),
            _ if inbound.eof => Some(Error::PeerClosed),
            _ => None,
        };
        let stuck = owner.opening() && matches!(inbound.held, Some(Held::Message { .. }));
        let limit = inbound.set_aside_limit();
        drop(inbound);
        if let Some(e) = ending {
            owner.fail_requests(&e);
        } else if stuck {
            owner.fail_waiting_requests(&Error::MessagesAheadInOnOpen { limit });
        }
        owner.ask_reactor_to_read();
    }

    /// Reads and delivers responses until the socket would block, at most
    /// [`CALLER_READ_FRAMES`] of them (so a peer flooding the connection
    /// cannot pin a caller past its deadline). `pass` says whether to read
    /// the socket, and whether the first read may wait. `now`
    /// ([`now_nanos`]) is when the pass starts; the clock is read again
    /// only before a read that follows delivered responses (copying large
    /// ones out takes a while), so a request's own response costs no
    /// reading here.
    fn read_responses(
        &self,
        owner: &impl ReadOwner,
        inbound: &mut ReadGuard<'_, ConnCore>,
        pass: Pass,
        mut now: u64,
    ) -> CallerRead {
        if inbound.has_set_aside() && owner.token() != usize::MAX {
            // Messages set aside before the reactor had the connection:
            // it dispatches them first, and the frames behind them wait
            // their turn. It may not know of them (it found the turn
            // taken when it took the connection): it is told.
            return CallerRead::Reactor;
        }
        if inbound.held.is_some() || inbound.eof || !inbound.is_open() {
            // The reactor's to read (it was told, or is in the handshake).
            // Taking the turn may have consumed its readiness event,
            // though: then it must be told again. While `on_open` runs
            // (no reactor takes the connection before it returns), what
            // stops the reading fails the waiting requests
            // ([`hand_over`](Self::hand_over)).
            return if inbound.announced() || owner.opening() {
                CallerRead::Reactor
            } else {
                CallerRead::Declined
            };
        }
        let stats = owner.stats();
        let (mut delivered, mut read_any) = (0u64, false);
        let mut drained = pass == Pass::Buffered;
        let mut wait = pass == Pass::WaitInRecv;
        // Responses were delivered since `now` was read.
        let mut stale = false;
        let outcome = loop {
            // `next_frame` leaves a message, or an error, as held for the
            // reactor.
            match inbound.next_frame(now, Taker::Caller) {
                Ok(Next::Message { .. }) => unreachable!("a caller is given responses only"),
                Ok(Next::Response { seq, len }) => {
                    if !owner.deliver_response(seq, inbound.consume_payload(len)) {
                        Counters::inc(&stats.responses_dropped);
                    }
                    delivered += 1;
                    stale = true;
                    if delivered == CALLER_READ_FRAMES {
                        break CallerRead::Reactor;
                    }
                }
                Ok(Next::ReactorsTurn) => {
                    // Before a reactor has the connection (a dialled
                    // connection's `on_open` waits for this response), a
                    // message of the peer's is set aside for the reactor
                    // to dispatch first, within a limit, and reading
                    // goes on.
                    if owner.token() == usize::MAX && inbound.set_aside_held() {
                        continue;
                    }
                    break CallerRead::Reactor;
                }
                Ok(Next::NeedBytes) if drained => break CallerRead::Drained,
                Ok(Next::NeedBytes) => {
                    if std::mem::take(&mut stale) {
                        now = now_nanos();
                    }
                    let socket = owner.stream();
                    let filled = match wait {
                        true => inbound.fill(socket.waiting(), now, owner.buffers()),
                        false => inbound.fill(socket, now, owner.buffers()),
                    };
                    match filled {
                        Ok(Filled::Bytes { drained: d }) => {
                            if std::mem::take(&mut wait) {
                                // They came at the end of a wait: the
                                // peer's silence ended now, not when the
                                // pass began.
                                now = now_nanos();
                                inbound.note_bytes_at(now);
                            }
                            read_any = true;
                            // A short read ends the pass only if no
                            // readiness event came with the turn: the
                            // reactor's edge may also have brought the
                            // peer's end of stream or an error, which no
                            // further edge would announce (the reactor
                            // itself trusts a short read only for an edge
                            // that brought bytes alone).
                            drained = d && !inbound.announced();
                        }
                        Ok(Filled::WouldBlock) => break CallerRead::Drained,
                        Ok(Filled::Eof) => {
                            inbound.eof = true;
                            break CallerRead::Reactor;
                        }
                        Err(e) => {
                            let failed = socket_error(SocketOp::Reading, owner.peer_addr(), e);
                            inbound.held = Some(Held::Failed(failed));
                            break CallerRead::Reactor;
                        }
                    }
                }
                // A caller's errors come back as the reactor's turn.
                Err(e) => {
                    inbound.held = Some(Held::Failed(e));
                    break CallerRead::Reactor;
                }
            }
        };
        let (frames, bytes) = inbound.take_counts();
        if read_any {
            self.last_read.store(inbound.last_read(), Ordering::Relaxed);
        }
        if frames > 0 {
            Counters::add(&stats.frames_in, frames);
            Counters::add(&stats.bytes_in, bytes);
        }
        if let CallerRead::Drained = outcome {
            // Nothing unread: the buffer goes back to the reactor's pool.
            inbound.lend_back(owner.buffers());
        }
        outcome
    }

    /// Reactor side, closing the connection: its input (receive buffer,
    /// a frame held for the reactor, messages set aside, an unfinished
    /// handshake) is dropped now if no thread reads, else by the thread
    /// that does as it lets go of the turn.
    pub(crate) fn discard_input(&self) {
        self.core.close();
    }

    /// Reactor side: runs `f` on the connection's core unless a caller is
    /// reading it (then `None`: that caller judges the deadlines itself),
    /// and gives the turn back. If a readiness event came with the turn or
    /// while `f` ran, bytes arrived that the reactor (the one calling here)
    /// must still read: it is told.
    pub(crate) fn with_idle_core<T>(
        &self,
        owner: &impl ReadOwner,
        f: impl FnOnce(&mut ConnCore) -> T,
    ) -> Option<T> {
        let mut core = self.core.try_take()?;
        self.apply_resume(&mut core);
        let result = f(&mut core);
        let announced = core.announced();
        if self.core.release(core).is_some() || announced {
            owner.ask_reactor_to_read();
        }
        Some(result)
    }
}

fn apply_interest(owner: &impl ReadOwner, interest: &Interest) -> io::Result<()> {
    let token = owner.token();
    if token == usize::MAX {
        // Not registered yet: the reactor registers it readable, and a
        // caller waiting meanwhile only misses the saving.
        return Ok(());
    }
    crate::sys::epoll_modify(
        owner.registry(),
        owner.stream(),
        token,
        interest.readable(),
        interest.writable,
    )
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::protocol::connection::{Deadlines, Limits, ReadPhase};
    use crate::protocol::{Opener, Profile, Role, Sealer};
    use std::io::Write;
    use std::sync::atomic::AtomicUsize as Count;

    /// A connection's surroundings, recording what the read side tells
    /// them.
    struct Owner {
        stream: ConnSocket,
        buffers: BufferPool,
        stats: Counters,
        poll: mio::Poll,
        asked_reactor: Count,
        delivered: Mutex<Vec<u32>>,
        failed: Mutex<Vec<Error>>,
    }

    impl ReadOwner for Owner {
        fn stream(&self) -> &ConnSocket {
            &self.stream
        }
        fn peer_addr(&self) -> Option<std::net::SocketAddr> {
            None
        }
        fn buffers(&self) -> &BufferPool {
            &self.buffers
        }
        fn stats(&self) -> &Counters {
            &self.stats
        }
        fn registry(&self) -> &mio::Registry {
            self.poll.registry()
        }
        fn token(&self) -> usize {
            usize::MAX // not registered: interest changes are skipped
        }
        fn opening(&self) -> bool {
            false
        }
        fn ask_reactor_to_read(&self) {
            self.asked_reactor
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
        fn fail_requests(&self, error: &Error) {
            lock(&self.failed).push(error.clone());
        }
        fn fail_waiting_requests(&self, error: &Error) {
            lock(&self.failed).push(error.clone());
        }
        fn deliver_response(&self, seq: u32, _payload: &[u8]) -> bool {
            lock(&self.delivered).push(seq);
            true
        }
    }

    /// A client connection's read side over loopback, and its peer's
    /// socket and sealer.
    fn connection() -> (ReadSide, Owner, std::net::TcpStream, Sealer) {
        connection_on(ConnSocket::new, Deadlines::default())
    }

    /// [`connection`] with its socket made by `socket`, and the peer held
    /// to `deadlines`.
    fn connection_on(
        socket: fn(std::net::TcpStream) -> ConnSocket,
        deadlines: Deadlines,
    ) -> (ReadSide, Owner, std::net::TcpStream, Sealer) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        let key = [3u8; 32];
        let limits = Limits {
            buffer_size: 4096,
            max_message_size: 1 << 16,
            deadlines,
        };
        let core = ConnCore::new(
            ReadPhase::Open {
                opener: Opener::new(key, Profile::Secure),
            },
            Role::Client,
            limits,
            &[],
            now_nanos(),
        );
        let owner = Owner {
            stream: socket(ours),
            buffers: BufferPool::new(4096, 4),
            stats: Counters::default(),
            poll: mio::Poll::new().unwrap(),
            asked_reactor: Count::new(0),
            delivered: Mutex::new(Vec::new()),
            failed: Mutex::new(Vec::new()),
        };
        (
            ReadSide::new(core),
            owner,
            theirs,
            Sealer::new(key, Profile::Secure),
        )
    }

    /// A caller on a socket it cannot sleep in `recv` on, with no deadline
    /// anywhere, hears of its call's end (here a flag; a response another
    /// thread delivered, a close) within a slice: its `poll` had no bound
    /// and held it until the peer's next bytes.
    #[test]
    fn a_caller_polling_with_no_deadline_sees_its_call_end() {
        let (side, owner, mut theirs, _) = connection_on(ConnSocket::polling, Deadlines::default());
        let ended = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            let caller = s.spawn(|| {
                side.wait_on_socket(
                    &owner,
                    &|| ended.load(std::sync::atomic::Ordering::SeqCst),
                    None,
                )
            });
            std::thread::sleep(Duration::from_millis(50));
            ended.store(true, std::sync::atomic::Ordering::SeqCst);
            let started = Instant::now();
            while !caller.is_finished() && started.elapsed() < Duration::from_secs(2) {
                std::thread::sleep(Duration::from_millis(5));
            }
            let finished = caller.is_finished();
            // Unblocks a caller still asleep in `poll`, so the test ends.
            theirs.write_all(&[0]).unwrap();
            assert!(finished, "the caller slept on past its call's end");
            caller.join().unwrap();
        });
    }

    /// A caller holds the read turn through this side's pause (its output
    /// over budget) and past the resume, which the reactor notes meanwhile
    /// without the turn: the caller judges the peer's silence from the
    /// resume. Judged from the peer's last bytes, before the pause, a peer
    /// that answers within the read timeout of the resume is closed for
    /// its silence (`Timeout(Read)`, handed to the reactor). And through
    /// the pause it sleeps: with the read deadline past, its waits were
    /// all zero, a spin that took a core.
    #[test]
    fn a_caller_holding_the_turn_judges_silence_from_a_resume_it_did_not_see() {
        let deadlines = Deadlines {
            read: Some(Duration::from_millis(400)),
            ..Deadlines::default()
        };
        let (side, owner, mut theirs, mut sealer) = connection_on(ConnSocket::new, deadlines);
        // The reactor paused reading, as over budget.
        side.note_silence(true, None);
        std::thread::scope(|s| {
            let caller = s.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(10);
                let cpu = crate::sys::tests_only::thread_cpu_time();
                let waited = side.wait_on_socket(
                    &owner,
                    &|| !lock(&owner.delivered).is_empty(),
                    Some(deadline),
                );
                (waited, crate::sys::tests_only::thread_cpu_time() - cpu)
            });
            // Past the read timeout, the silence this side's (not looked
            // at before: a look takes the turn, which the caller may be
            // taking then).
            std::thread::sleep(Duration::from_millis(1200));
            assert!(side.core.try_take().is_none(), "the caller is not waiting");
            // The reactor resumes reading; the caller has the turn.
            side.note_silence(false, Some(now_nanos()));
            // Well within the read timeout of the resume, the peer answers.
            std::thread::sleep(Duration::from_millis(100));
            let mut frame = Vec::new();
            sealer.seal_append(1, b"the response", &mut frame).unwrap();
            theirs.write_all(&frame).unwrap();
            let (waited, cpu) = caller.join().unwrap();
            assert!(waited, "the caller did not wait on the socket");
            // A spin through the pause would take most of its second.
            assert!(
                cpu < Duration::from_millis(300),
                "the caller used {cpu:?} of CPU in 1.3 s"
            );
        });
        assert_eq!(*lock(&owner.delivered), vec![1], "the response was lost");
        let core = side.core.try_take().expect("the turn is free");
        match &core.held {
            None => {}
            Some(Held::Failed(e)) => panic!("the caller ended the connection: {e}"),
            Some(Held::Message { .. }) => panic!("a message was read"),
        }
    }

    /// Half a frame, read into the receive buffer.
    fn half_a_frame(sealer: &mut Sealer, theirs: &mut std::net::TcpStream) {
        let mut frame = Vec::new();
        sealer.seal_append(1, &[7; 1000], &mut frame).unwrap();
        theirs.write_all(&frame[..frame.len() / 2]).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }

    /// The connection closes while a caller holds the read turn with half a
    /// frame buffered: the close cannot take the turn, so the caller must
    /// drop the input as it gives the turn back, or the buffer stays for as
    /// long as any handle to the connection lives.
    #[test]
    fn input_held_by_a_caller_at_the_close_goes_when_it_gives_the_turn_back() {
        let (side, owner, mut theirs, mut sealer) = connection();
        half_a_frame(&mut sealer, &mut theirs);
        let mut turn = side.core.try_take().expect("the turn is free");
        side.read_responses(&owner, &mut turn, Pass::Socket, now_nanos());
        assert!(turn.buffer_len() > 0, "the half frame was not read");
        side.discard_input();
        side.give_back(&owner, turn);
        let core = side.core.try_take().expect("the turn is free");
        assert_eq!(core.buffer_len(), 0, "the closed connection kept its input");
    }

    /// As above, with the caller asleep in `recv` when the connection
    /// closes: the shutdown wakes it with the end of the stream, which it
    /// hands to the reactor (dropping the turn, not releasing it).
    #[test]
    fn input_of_a_caller_asleep_in_recv_at_the_close_goes_as_it_wakes() {
        let (side, owner, mut theirs, mut sealer) = connection();
        half_a_frame(&mut sealer, &mut theirs);
        std::thread::scope(|s| {
            let caller = s.spawn(|| {
                let deadline = Instant::now() + Duration::from_secs(5);
                side.wait_on_socket(&owner, &|| false, Some(deadline))
            });
            std::thread::sleep(Duration::from_millis(100));
            assert!(side.core.try_take().is_none(), "the caller is not waiting");
            side.discard_input();
            owner.stream.shutdown(std::net::Shutdown::Both).unwrap();
            assert!(
                caller.join().unwrap(),
                "the caller did not wait on the socket"
            );
        });
        assert_eq!(
            owner
                .asked_reactor
                .load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the caller did not hand the end of the stream to the reactor"
        );
        let core = side.core.try_take().expect("the turn is free");
        assert_eq!(core.buffer_len(), 0, "the closed connection kept its input");
    }

    /// The reactor hears of the peer's response and its end of stream in
    /// one edge while a caller holds the turn: the caller, reading again
    /// for it, must read on to the end of the stream (and hand that to the
    /// reactor), not stop at the short read that brought the response.
    #[test]
    fn a_caller_reading_for_an_announced_edge_reads_to_the_end_of_the_stream() {
        let (side, owner, mut theirs, mut sealer) = connection();
        let mut frame = Vec::new();
        sealer.seal_append(1, b"the response", &mut frame).unwrap();
        theirs.write_all(&frame).unwrap();
        theirs.shutdown(std::net::Shutdown::Write).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let turn = side.core.try_take().expect("the turn is free");
        // The reactor's edge (bytes and the peer's end) while it is held.
        assert!(side.core.announce().is_none());
        side.give_back(&owner, turn);
        assert_eq!(*lock(&owner.delivered), vec![1]);
        assert!(
            side.core.try_take().is_some_and(|core| core.eof),
            "the end of stream was left unread"
        );
        assert_eq!(
            owner
                .asked_reactor
                .load(std::sync::atomic::Ordering::SeqCst),
            1,
            "the reactor was not told of the end of stream"
        );
    }
}
