//! A client's connections: choosing one for a call, and dialling more
//! while all are busy and fewer than `max_conns` are open, one dial at a
//! time, with a backoff after a failed one. A request may share a
//! connection that has requests in flight while that connection keeps
//! answering (see [`SHARED_REQUESTS`]): its frames then ride the same reads
//! and writes as theirs, where a connection of its own costs its reactor a
//! wake-up. A blocking call dials on its own thread; an async call never
//! blocks, so a dial it needs runs on a thread the pool starts for it (and
//! joins), and async calls with no connection to use wait for that dial on
//! a list of tasks to wake.

use std::mem;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use slab::Slab;

use crate::clock::{instant_after, now_nanos, CallDeadline, LazyDeadline};
use crate::config::Config;
use crate::conn::{Connection, Driver, ReactorId};
use crate::error::{thread_start_error, DialPhase, Error, Result, TimeoutKind};
use crate::handler::Handler;
use crate::opening::opening_on_this_thread;
use crate::reactor::{current_reactor, on_reactor_thread};
use crate::sync::completion::NO_LIMIT;
use crate::sync::signal::ShutdownSignal;
use crate::sync::wake::{wake_all, DropLater};
use crate::sync::{lock, read, write, Condvar, Mutex, MutexGuard, RwLock};
use crate::workers::Workers;

/// About the most requests in flight a connection may carry before a
/// request prefers another connection (an idle one, or a new one while
/// under `max_conns`); callers choosing at once may each see room, so the
/// bound is soft. Sharing puts several callers' frames in one read and one
/// write of the connection's reactors, where a connection each costs a
/// reactor wake-up per request. A busy connection is shared only while its
/// answers come fast ([`FAST_ANSWER`]) and keep coming ([`SILENT_AFTER`]);
/// see [`may_share`].
const SHARED_REQUESTS: usize = 8;

/// See [`SHARED_REQUESTS`]: the most a connection's answers may take on
/// average (as their callers saw them, from the request's write to the
/// caller's return; a moving average over answers, 0 on a new connection)
/// for it to be shared. About a scheduler's time slice: answers slower than
/// that come from a slow handler, whose requests the server could work on
/// side by side on other connections (a 20 ms handler is slow at its first
/// answer, a 2 ms one within about six), not from many callers sharing a
/// few cores.
const FAST_ANSWER: Duration = Duration::from_millis(1);

/// See [`SHARED_REQUESTS`]: a busy connection from which nothing came for
/// this long (since its last bytes, or since the pool gave it, idle, to a
/// request) counts as stalled, a handler stuck or a peer gone, and is not
/// shared: requests joining it would wait for the stall. Longer than the
/// pauses of a loaded machine (many callers and reactors on few cores; the
/// README has the figures), so that those do not spread requests.
const SILENT_AFTER: Duration = Duration::from_millis(2);

/// What the pool knows of a connection when a request looks for one.
#[derive(Debug, Clone, Copy)]
struct ShareView {
    /// Calls in progress on it.
    load: usize,
    /// Its answers' average time, in nanoseconds.
    answer_time: u64,
    /// Nanoseconds since bytes last came from it, or since the pool last
    /// gave it, idle, to a request, whichever was later.
    quiet_for: u64,
}

/// What `may_share` looks at of `conn`, at `now` ([`now_nanos`]).
fn share_view(conn: &Connection, now: u64) -> ShareView {
    ShareView {
        load: conn.load(),
        answer_time: conn.answer_time(),
        quiet_for: now.saturating_sub(conn.quiet_since()),
    }
}

/// Whether a request may use a connection in this state without dialling
/// first: an idle one always; a busy one while it carries fewer than
/// [`SHARED_REQUESTS`], answers within [`FAST_ANSWER`] on average, and has
/// not been quiet for [`SILENT_AFTER`].
fn may_share(view: ShareView) -> bool {
    view.load == 0
        || (view.load < SHARED_REQUESTS
            && view.answer_time < FAST_ANSWER.as_nanos() as u64
            && view.quiet_for < SILENT_AFTER.as_nanos() as u64)
}

/// What a call will use the connection it picks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallKind {
    /// A send: wants a connection with nothing in progress (its own write).
    Send,
    /// A request: may share a busy connection ([`may_share`]).
    Request,
}

/// The pool; shared with the thread of an async call's dial.
pub(crate) struct Pool {
    pub(crate) addr: SocketAddr,
    pub(crate) config: Config,
    handler: Arc<dyn Handler>,
    pub(crate) workers: Workers,
    /// Read by every call, written only when a connection joins or
    /// leaves: callers choosing a connection never wait on each other.
    conns: RwLock<Vec<Connection>>,
    /// Serialises dialling, so a burst of callers grows the pool one
    /// connection at a time instead of dialling past `max_conns`. Holds the
    /// last failed dial, so callers that queued behind it, and calls during
    /// the backoff after it, fail with it instead of each dialling again.
    dial_lock: Mutex<DialState>,
    /// The dial made for async calls, and the calls waiting for it.
    async_dial: Mutex<AsyncDial>,
    /// Signalled when a shutdown has joined the dial threads it took, for
    /// a shutdown beside it that waits for them (`AsyncDial::joining`).
    dial_threads_joined: Condvar,
    pub(crate) signal: ShutdownSignal,
}

/// The dial made on behalf of async calls.
#[derive(Default)]
struct AsyncDial {
    /// Its threads not yet joined: the last dial's, and any earlier one
    /// still waking its calls. Joined by a later dial once they ended
    /// (never waited for under this lock: a thread waking its calls has
    /// let it go, and a waker may take its time or lock it again), or by
    /// shutdown.
    threads: Vec<std::thread::JoinHandle<()>>,
    /// The threads a shutdown took off `threads` and is joining.
    joining: Vec<std::thread::ThreadId>,
    running: bool,
    /// Async calls with no connection to use, woken when a dial ends
    /// (whoever made it). Entries are reused.
    waiters: Slab<Option<Waker>>,
}

/// An async call's place on the list of calls waiting for a dial; given
/// back with [`Pool::forget`].
#[derive(Debug, Default)]
pub(crate) struct DialWait(Option<usize>);

/// What the last dials left, under the dial lock.
#[derive(Default)]
struct DialState {
    /// The last dial, if it failed.
    failed: Option<FailedDial>,
    /// Dials failed in a row (not counting those cut short by their
    /// calls), 0 after one that succeeds: each doubles the backoff.
    failures: u32,
    /// Dials cut short by their calls' deadlines since the last real
    /// failure or success: each doubles the backoff of the next one cut
    /// short (see [`DialState::failed`]).
    cut_short: u32,
}

/// A blocking caller's hold on the pool's dial lock. Async calls that
/// found it held wait to be woken when it is let go, whether this caller
/// dialled or not (it found a connection, or the pool backs off), so
/// letting it go wakes them, on every way out.
struct DialTurn<'a> {
    pool: &'a Pool,
    state: Option<MutexGuard<'a, DialState>>,
}

impl<'a> DialTurn<'a> {
    fn new(pool: &'a Pool, state: MutexGuard<'a, DialState>) -> Self {
        DialTurn {
            pool,
            state: Some(state),
        }
    }
}

impl std::ops::Deref for DialTurn<'_> {
    type Target = DialState;
    fn deref(&self) -> &DialState {
        self.state.as_deref().expect("held until dropped")
    }
}

impl std::ops::DerefMut for DialTurn<'_> {
    fn deref_mut(&mut self) -> &mut DialState {
        self.state.as_deref_mut().expect("held until dropped")
    }
}

impl Drop for DialTurn<'_> {
    fn drop(&mut self) {
        // The lock first: a woken call may take it at once.
        drop(self.state.take());
        self.pool.wake_dial_waiters();
    }
}

/// A failed dial, and the backoff after it.
struct FailedDial {
    /// When it failed.
    at: Instant,
    /// Until when calls fail with its error instead of dialling.
    until: Instant,
    error: Error,
    /// The dial ran out of its own call's deadline after this long, not
    /// out of the connect's or the handshake's timeouts: it shows only
    /// that the endpoint did not answer that soon, so a call with much
    /// more time left than that is not held back by it.
    cut_short_after: Option<Duration>,
}

impl FailedDial {
    /// Whether it holds back a call that has `left` to run (`None`: no
    /// limit). A dial cut short holds back the calls with up to twice the
    /// time it ran: a call with the same timeout may have a little more
    /// left than the failed dial had (its caller was not delayed on the
    /// way to the dial), and must not dial again for that.
    fn holds_back(&self, left: Option<Duration>) -> bool {
        match (self.cut_short_after, left) {
            (None, _) => true,
            (Some(_), None) => false,
            (Some(ran), Some(left)) => left <= ran.saturating_mul(2),
        }
    }

    /// Its error, for a call it holds back whose deadline has `kind`: a
    /// dial cut short by another call's deadline failed with that call's
    /// timeout (a send's `Write`, say), while this call fails because its
    /// own time would not do either, a timeout of its own kind.
    fn error_for(&self, kind: Option<TimeoutKind>) -> Error {
        match (&self.error, self.cut_short_after, kind) {
            (
                Error::Dial {
                    addr,
                    phase,
                    source,
                },
                Some(_),
                Some(kind),
            ) if matches!(**source, Error::Timeout(_)) => {
                Error::Timeout(kind).dialling(*addr, *phase)
            }
            _ => self.error.clone(),
        }
    }
}

impl DialState {
    /// Records a failed dial and starts the backoff after it:
    /// `config.dial_backoff`, doubled for each earlier failure in a row, at
    /// most `config.dial_backoff_max`. The endpoint's own failures (a
    /// refusal, a reset, a dial or handshake timeout) and the dials cut
    /// short by their calls' deadlines (an endpoint slower than those
    /// calls allowed) keep separate rows: a cut-short dial's backoff, which
    /// holds back only calls with no more time than it had, doubles with
    /// both (a dead endpoint keeps impatient calls failing fast), but a
    /// real failure's, which holds back every call, doubles with real
    /// failures only (a string of impatient calls to a slow endpoint must
    /// not make its next real failure hold back every call for longer).
    fn failed(&mut self, error: Error, config: &Config, cut_short_after: Option<Duration>) {
        let in_a_row = if cut_short_after.is_some() {
            self.cut_short = self.cut_short.saturating_add(1);
            self.failures.saturating_add(self.cut_short)
        } else {
            self.failures = self.failures.saturating_add(1);
            self.cut_short = 0;
            self.failures
        };
        let doublings = in_a_row.saturating_sub(1).min(30);
        let backoff = config
            .dial_backoff
            .saturating_mul(1 << doublings)
            .min(config.dial_backoff_max);
        let at = Instant::now();
        self.failed = Some(FailedDial {
            at,
            until: instant_after(at, backoff),
            error,
            cut_short_after,
        });
    }

    /// Records a dial that succeeded: the backoff starts afresh.
    fn succeeded(&mut self) {
        *self = DialState::default();
    }
}

/// What waiting for another caller's dial gave.
enum Waited<'a> {
    Dialled(Connection),
    Lock(MutexGuard<'a, DialState>),
}

impl Pool {
    pub(crate) fn new(
        addr: SocketAddr,
        config: Config,
        handler: Arc<dyn Handler>,
        workers: Workers,
    ) -> Pool {
        Pool {
            addr,
            config,
            handler,
            workers,
            conns: RwLock::new(Vec::new()),
            dial_lock: Mutex::new(DialState::default()),
            async_dial: Mutex::new(AsyncDial::default()),
            dial_threads_joined: Condvar::new(),
            signal: ShutdownSignal::new(),
        }
    }

    /// Open connections.
    pub(crate) fn open(&self) -> usize {
        read(&self.conns).iter().filter(|c| !c.is_closed()).count()
    }

    /// Picks a connection with nothing in progress (for a request, or one
    /// it may share: [`SHARED_REQUESTS`]), else the least loaded one,
    /// dialling a new one while under `max_conns` and all are busy. The
    /// dial, or the wait for another caller's, ends by `deadline`.
    pub(crate) fn pick(&self, deadline: &mut LazyDeadline, kind: CallKind) -> Result<Connection> {
        match self.choose_for(kind, None) {
            Some(conn) => Ok(conn),
            None => self.pick_after_choosing(deadline, kind),
        }
    }

    /// [`pick`](Self::pick) for a caller whose own
    /// [`choose_for`](Self::choose_for) just found nothing: dials, or
    /// waits for another caller's dial, without looking again first.
    pub(crate) fn pick_after_choosing(
        &self,
        deadline: &mut LazyDeadline,
        kind: CallKind,
    ) -> Result<Connection> {
        self.pick_avoiding(deadline, kind, current_reactor())
    }

    /// [`pick_after_choosing`](Self::pick_after_choosing) for a call that
    /// must not wait on `avoid`'s connections (see
    /// [`choose_avoiding`](Self::choose_avoiding)): the async calls' dial
    /// thread, dialling for a handler's request.
    fn pick_avoiding(
        &self,
        deadline: &mut LazyDeadline,
        kind: CallKind,
        avoid: ReactorId,
    ) -> Result<Connection> {
        if let Some(conn) = self.opening_here() {
            return Ok(self.open_instead(conn));
        }
        // All busy (or none) and room for more. One caller dials at a time;
        // the others use the least loaded connection meanwhile, or wait for
        // the dial if there is none.
        let (mut dialling, queued_at) = match self.dial_lock.try_lock() {
            Ok(guard) => (DialTurn::new(self, guard), None),
            // Poisoned by a panic in an earlier dial: the lock is ours (and
            // must be taken out of the error, or the error, alive to the
            // end of this statement, would hold it while we wait for it).
            Err(std::sync::TryLockError::Poisoned(p)) => {
                (DialTurn::new(self, p.into_inner()), None)
            }
            Err(std::sync::TryLockError::WouldBlock) => match self.choose(true) {
                Some(conn) => return Ok(conn),
                None => {
                    let queued_at = Instant::now();
                    let guard = match self.wait_for_dial(deadline.get())? {
                        Waited::Dialled(conn) => return Ok(conn),
                        Waited::Lock(guard) => DialTurn::new(self, guard),
                    };
                    // The dial this caller queued behind: its connection,
                    // or (below) its failure, without a dial of our own.
                    if let Some(conn) = self.choose(true) {
                        return Ok(conn);
                    }
                    (guard, Some(queued_at))
                }
            },
        };
        if let Some(conn) = self.choose_avoiding(kind, None, avoid) {
            return Ok(conn);
        }
        if let Some(failed) = &dialling.failed {
            // Backing off after a failed dial, or queued behind that very
            // dial: no dial of our own. A busy connection if there is one,
            // else that dial's error.
            let now = Instant::now();
            let left = deadline.get().map(|d| d.at.saturating_duration_since(now));
            if (now < failed.until || queued_at.is_some_and(|q| failed.at >= q))
                && failed.holds_back(left)
            {
                let kind = deadline.get().map(|d| d.kind);
                return self.choose(true).ok_or_else(|| failed.error_for(kind));
            }
        }
        // Given up when the client shuts down: shutdown must not wait for
        // a dial bounded only by its own timeouts, or by none.
        let dial_started = Instant::now();
        // On the reactor with the fewest connections (dials are one at a
        // time, under the dial lock, and the reactor counts a connection
        // before the lock is let go): a round robin that async calls also
        // draw from for their timers could stack them on one.
        let reactor = self
            .workers
            .least_loaded_but(avoid)
            .unwrap_or_else(|| self.workers.pick());
        let dialled = reactor.dial_within(self.addr, self.handler.clone(), deadline.get(), &|| {
            self.signal.is_closed()
        });
        let result = match dialled {
            Ok(conn) if self.signal.is_closed() => {
                conn.close();
                Err(Error::Closed)
            }
            Ok(conn) => {
                dialling.succeeded();
                conn.set_taken_at(now_nanos());
                // Joined to the pool before the dial lock is released, so
                // the next dialler sees it and stays within `max_conns`.
                write(&self.conns).push(conn.clone());
                Ok(conn)
            }
            // Given up because the client is shutting down: no failure to
            // back off from.
            Err(Error::Closed) if self.signal.is_closed() => Err(Error::Closed),
            Err(e) => {
                // Cut short by this call's own deadline (a timeout of the
                // call's kind, not the connect's or the handshake's, and
                // the deadline passed; not a call made from `on_open`
                // that failed the connection being opened): the
                // backoff holds back only the calls with no more time
                // than this one had.
                let cut_short = matches!(
                    e.timeout_kind(),
                    Some(TimeoutKind::Request | TimeoutKind::Write)
                ) && !matches!(
                    e,
                    Error::Dial {
                        phase: DialPhase::Open,
                        ..
                    }
                ) && deadline.get().is_some_and(|d| d.passed());
                let ran = cut_short.then(|| dial_started.elapsed());
                dialling.failed(e.clone(), &self.config, ran);
                self.choose(true).ok_or(e)
            }
        };
        // Async calls waiting for a connection look again, with the dial
        // lock free (`DialTurn`'s drop).
        drop(dialling);
        result
    }

    /// `conn`, the connection being opened, unless it closed already (in
    /// `on_open`, or as it fails): an open one of the pool's is as good.
    fn open_instead(&self, conn: Connection) -> Connection {
        if conn.is_closed() {
            self.choose(true).unwrap_or(conn)
        } else {
            conn
        }
    }

    /// The connection this thread is dialling for this pool, if the call
    /// comes from its `on_open` (see [`crate::opening`]): not in the pool
    /// yet, and the pool's dial is this very thread's.
    fn opening_here(&self) -> Option<Connection> {
        opening_on_this_thread(|conn| {
            let theirs = (conn.driver() as *const dyn Driver).cast::<()>();
            self.workers
                .handles()
                .iter()
                .any(|h| (h.driver() as *const dyn Driver).cast::<()>() == theirs)
        })
    }

    /// Waits for the dial another caller is making: polls (the wait is
    /// rare and short) for its connection or for the dial lock, until
    /// `deadline`.
    fn wait_for_dial(&self, deadline: Option<CallDeadline>) -> Result<Waited<'_>> {
        loop {
            match self.dial_lock.try_lock() {
                Ok(guard) => return Ok(Waited::Lock(guard)),
                Err(std::sync::TryLockError::Poisoned(p)) => {
                    return Ok(Waited::Lock(p.into_inner()))
                }
                Err(std::sync::TryLockError::WouldBlock) => {}
            }
            if let Some(conn) = self.choose(true) {
                return Ok(Waited::Dialled(conn));
            }
            if let Some(d) = deadline.filter(|d| Instant::now() >= d.at) {
                return Err(Error::Timeout(d.kind).dialling(self.addr, DialPhase::Queued));
            }
            if self.signal.is_closed() {
                return Err(Error::Closed.dialling(self.addr, DialPhase::Queued));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    /// The least loaded open connection, dropping closed ones from the
    /// pool. Unless `any`, only if it is idle or the pool is full.
    pub(crate) fn choose(&self, any: bool) -> Option<Connection> {
        let pool = read(&self.conns);
        if pool.iter().any(|c| c.is_closed()) {
            drop(pool);
            write(&self.conns).retain(|c| !c.is_closed());
            return self.choose(any);
        }
        let full = pool.len() >= self.config.max_conns.max(1);
        let (conn, load) = pool
            .iter()
            .map(|c| (c, c.load()))
            .min_by_key(|&(_, load)| load)?;
        (any || full || load == 0).then(|| conn.clone())
    }

    /// [`choose`](Self::choose) without `any`, but a request also takes
    /// a busy connection it may share ([`may_share`]), once the pool holds
    /// an open connection per reactor of the client (`config.workers`, at
    /// most `max_conns`): as many as spread the work over the cores, and no
    /// more while those answer fast (the first `spread` connections are
    /// preferred). `now` is the call's own clock reading ([`now_nanos`]),
    /// if it took one.
    pub(crate) fn choose_for(&self, kind: CallKind, now: Option<u64>) -> Option<Connection> {
        self.choose_avoiding(kind, now, current_reactor())
    }

    /// [`choose_for`](Self::choose_for) for a request that must not wait
    /// on `avoid`'s connections (the reactor of the handler it comes from,
    /// which would have to read the response meanwhile).
    fn choose_avoiding(
        &self,
        kind: CallKind,
        now: Option<u64>,
        avoid: ReactorId,
    ) -> Option<Connection> {
        if kind == CallKind::Send {
            return self.choose(false);
        }
        let now = now.unwrap_or_else(now_nanos);
        let pool = read(&self.conns);
        let spread = self.config.max_conns.max(1).min(self.config.workers.max(1));
        // Closed connections are dropped by `choose`, below.
        let view = |c: &Connection| share_view(c, now);
        let shared = if pool.len() >= spread && !pool.iter().any(|c| c.is_closed()) {
            // The least loaded of the first `spread` that may be shared,
            // else of the rest: connections dialled past `spread` (while
            // the first were slow or stalled, or when the client started)
            // then fall idle again, and requests keep packed.
            pool.iter()
                .enumerate()
                .map(|(i, c)| (c, view(c), i >= spread))
                .filter(|&(_, v, _)| may_share(v))
                .min_by_key(|&(_, v, extra)| (extra, v.load))
                .map(|(c, _, _)| c.clone())
        } else {
            None
        };
        drop(pool);
        let mut conn = match shared {
            Some(conn) => conn,
            None => self.choose(false)?,
        };
        // A request from a handler cannot wait on a connection of its own
        // reactor (which would have to read the response meanwhile):
        // another reactor's that it may share, else a new one (dialled
        // elsewhere) while the pool has room, else the least loaded
        // elsewhere.
        if avoid != ReactorId::NONE && conn.driver().reactor_id() == avoid {
            let pool = read(&self.conns);
            let elsewhere = pool
                .iter()
                .filter(|c| !c.is_closed() && c.driver().reactor_id() != avoid);
            let shareable = elsewhere
                .clone()
                .filter(|c| may_share(view(c)))
                .min_by_key(|c| c.load());
            let full = pool.len() >= self.config.max_conns.max(1);
            conn = match shareable {
                Some(c) => c.clone(),
                None if !full => return None,
                None => match elsewhere.min_by_key(|c| c.load()) {
                    Some(c) => c.clone(),
                    None => conn,
                },
            };
        }
        if conn.load() == 0 {
            conn.set_taken_at(now);
        }
        Some(conn)
    }

    /// After a request timed out on `conn` with not a byte back since it
    /// was sent (at `sent_at`, [`now_nanos`]): closes the connection if it
    /// looks dead (a peer or path that vanished without a FIN), so that
    /// the pool dials afresh instead of choosing it again. One timeout is
    /// no proof while other requests still wait on it (theirs may be
    /// longer, and the server merely slow), unless it has been silent,
    /// since it was last taken idle, for as long as the longest timeout
    /// among the requests still waiting (a link that died under steady
    /// traffic, where some request always waits; a request with no
    /// timeout lets it be silent for ever). Nor while output waits in its
    /// queue and a write timeout judges it: closing would drop it.
    pub(crate) fn drop_if_silent(&self, conn: &Connection, sent_at: u64) {
        // Output still queued (messages `send_no_wait` accepted, a send
        // under way, unwritten request frames) would be dropped with the
        // connection; whether the peer takes it is the write timeout's to
        // judge. Without one, nothing would: the silence decides.
        let judged = self.config.write_timeout.is_some();
        if !conn.silent_since(sent_at) || (judged && conn.queued() > 0) {
            return;
        }
        // The requests still waiting (the timed-out one no longer does),
        // and how long they let the peer be silent.
        let dead = match conn.longest_patience() {
            None => true,
            Some(NO_LIMIT) => false,
            Some(patience) => conn.quiet_since() < now_nanos().saturating_sub(patience),
        };
        if dead {
            conn.fail(Error::Timeout(TimeoutKind::Request));
        }
    }

    /// [`pick`](Self::pick) for an async call, which must not block: an
    /// idle connection (for a request, or one it may share), else a busy
    /// one while a dial for more runs on a thread of the pool's, else (none
    /// open) pending until a dial ends.
    /// A dial's failure fails the calls that waited since `since`, and
    /// during the backoff after it, the calls that find no connection.
    pub(crate) fn poll_pick(
        self: &Arc<Self>,
        since: Instant,
        wait: &mut DialWait,
        cx: &mut Context<'_>,
        kind: CallKind,
    ) -> Poll<Result<Connection>> {
        if let Some(conn) = self.choose_for(kind, None) {
            self.forget(wait);
            return Poll::Ready(Ok(conn));
        }
        // From `on_open`: a send may use the connection being opened (it
        // writes, or queues for its reactor to flush once it takes the
        // connection), but a request's response is read by that reactor
        // only after `on_open` returns.
        if let Some(conn) = self.opening_here() {
            self.forget(wait);
            return Poll::Ready(match kind {
                CallKind::Send => Ok(self.open_instead(conn)),
                // A busy connection's reactor reads, though.
                CallKind::Request => self.choose(true).ok_or(Error::AsyncRequestInOnOpen),
            });
        }
        // Declared before the lock: a waker taken off the list is dropped
        // with it let go, on every return.
        let mut stale = DropLater::default();
        let mut dial = lock(&self.async_dial);
        if self.signal.is_closed() {
            stale.keep(Self::unregister(&mut dial, wait));
            return Poll::Ready(Err(Error::Closed));
        }
        // Under the lock a dial's end takes its waiters' wakers under: a
        // dial that ended before this look left its connection in the
        // pool, and one that ends after it wakes this call.
        // A handler's request cannot wait on its own reactor's
        // connections: neither a busy one here, nor the dial's, if the
        // dial finds one (that dial places a new one elsewhere).
        let avoid = match kind {
            CallKind::Request => current_reactor(),
            CallKind::Send => ReactorId::NONE,
        };
        let busy = self.busy_avoiding(avoid);
        let state = if dial.running {
            None
        } else {
            match self.dial_lock.try_lock() {
                Ok(state) => Some(state),
                Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
                // A blocking call is dialling; its end wakes us.
                Err(std::sync::TryLockError::WouldBlock) => None,
            }
        };
        if let Some(state) = state {
            let failed = state
                .failed
                .as_ref()
                // The async dial has no deadline but the dial's own
                // timeouts: a blocking call's dial cut short by its
                // deadline holds it back no more than a call without one.
                .filter(|failed| failed.holds_back(None))
                .filter(|failed| Instant::now() < failed.until || failed.at >= since);
            if let Some(failed) = failed {
                stale.keep(Self::unregister(&mut dial, wait));
                return Poll::Ready(busy.ok_or_else(|| failed.error.clone()));
            }
            drop(state);
            if let Err(e) = self.start_async_dial(&mut dial, avoid) {
                stale.keep(Self::unregister(&mut dial, wait));
                return Poll::Ready(busy.ok_or(e));
            }
        }
        if let Some(conn) = busy {
            stale.keep(Self::unregister(&mut dial, wait));
            return Poll::Ready(Ok(conn));
        }
        match wait.0 {
            Some(key) => stale.keep(dial.waiters[key].replace(cx.waker().clone())),
            None => wait.0 = Some(dial.waiters.insert(Some(cx.waker().clone()))),
        }
        Poll::Pending
    }

    /// A busy connection an async call may use while a dial for more runs:
    /// the least loaded open one not on `avoid`.
    fn busy_avoiding(&self, avoid: ReactorId) -> Option<Connection> {
        if avoid == ReactorId::NONE {
            return self.choose(true);
        }
        read(&self.conns)
            .iter()
            .filter(|c| !c.is_closed() && c.driver().reactor_id() != avoid)
            .min_by_key(|c| c.load())
            .cloned()
    }

    /// Starts the dial for async calls on a thread of its own, for a call
    /// that must not wait on `avoid`'s connections, and joins the earlier
    /// dials' threads that ended (at once: they have).
    fn start_async_dial(self: &Arc<Self>, dial: &mut AsyncDial, avoid: ReactorId) -> Result<()> {
        let mut i = 0;
        while i < dial.threads.len() {
            if dial.threads[i].is_finished() {
                let _ = dial.threads.swap_remove(i).join();
            } else {
                i += 1;
            }
        }
        let pool = self.clone();
        let name = "monte-rpc-dial";
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // Bounded by the dial's own timeouts; the calls waiting for
                // it keep their deadlines. However it ends, a panic in the
                // application code it runs included (a handshake's drop, a
                // logger), the step below must run: a pool left believing
                // a dial runs starts no other.
                let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    let deadline = &mut LazyDeadline::Read(None);
                    match avoid {
                        ReactorId::NONE => pool.pick(deadline, CallKind::Send),
                        // For a handler's request: a connection it can
                        // use, else a new one on another reactor.
                        avoid => match pool.choose_avoiding(CallKind::Request, None, avoid) {
                            Some(conn) => Ok(conn),
                            None => pool.pick_avoiding(deadline, CallKind::Request, avoid),
                        },
                    }
                }));
                // One locked step, then the wake-ups with no lock held.
                let mut dial = lock(&pool.async_dial);
                dial.running = false;
                Self::wake_waiters(dial);
            })
            .map_err(|e| thread_start_error(name, e))?;
        dial.threads.push(thread);
        dial.running = true;
        Ok(())
    }

    /// Wakes the async calls waiting for a dial (they look again).
    pub(crate) fn wake_dial_waiters(&self) {
        Self::wake_waiters(lock(&self.async_dial));
    }

    /// Takes the waiters' wakers off the list under its lock, and wakes
    /// them once it is let go: a woken call's future may be dropped (its
    /// drop takes it off the list) or polled there and then. (A call that
    /// looks after the lock is let go finds what the dial left.)
    fn wake_waiters(mut dial: MutexGuard<'_, AsyncDial>) {
        let mut woken: Vec<Waker> = dial
            .waiters
            .iter_mut()
            .filter_map(|(_, w)| w.take())
            .collect();
        drop(dial);
        wake_all(&mut woken);
    }

    /// Takes `wait`'s call off the list; returns its waker, to be dropped
    /// with the lock let go ([`DropLater`]).
    #[must_use]
    fn unregister(dial: &mut AsyncDial, wait: &mut DialWait) -> Option<Waker> {
        wait.0.take().and_then(|key| dial.waiters.remove(key))
    }

    /// An async call stopped waiting for a dial (it ended or was dropped).
    pub(crate) fn forget(&self, wait: &mut DialWait) {
        if wait.0.is_some() {
            // The guard goes at the end of the statement, the waker after.
            let removed = Self::unregister(&mut lock(&self.async_dial), wait);
            drop(removed);
        }
    }

    /// Joins the async calls' dial threads, and returns once every one
    /// that a shutdown beside this one took is joined too: each shutdown
    /// returns with them all ended.
    ///
    /// Two exceptions, where waiting could deadlock: a dial thread (a
    /// handler's `on_open` on the connection it dialled, or a waker it
    /// woke that dropped the client) cannot join itself, and ends once
    /// this returns: it is put back for a later shutdown to join, and it
    /// does not wait if another shutdown is joining it. A reactor thread
    /// (a handler's shutdown) does not wait for the other shutdown's
    /// joins: a dial thread's `on_open` may be waiting for that reactor.
    fn join_dial_threads(&self) {
        let here = std::thread::current().id();
        let mut dial = lock(&self.async_dial);
        let threads = mem::take(&mut dial.threads);
        let (own, others): (Vec<_>, Vec<_>) =
            threads.into_iter().partition(|t| t.thread().id() == here);
        let taken: Vec<_> = others.iter().map(|t| t.thread().id()).collect();
        dial.joining.extend_from_slice(&taken);
        drop(dial);
        for thread in others {
            let _ = thread.join();
        }
        let mut dial = lock(&self.async_dial);
        dial.joining.retain(|id| !taken.contains(id));
        // Put back only after the others are joined: another dial thread
        // shutting down meanwhile would otherwise join this one while this
        // one joins it.
        dial.threads.extend(own);
        if !taken.is_empty() {
            self.dial_threads_joined.notify_all();
        }
        if on_reactor_thread() {
            return;
        }
        while !dial.joining.is_empty() && !dial.joining.contains(&here) {
            dial = self
                .dial_threads_joined
                .wait(dial)
                .unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Shutdown's last steps, once calls had their grace: joins the async
    /// calls' dial (bounded by the dial timeouts), stops the reactors
    /// (which fails whatever still waits on a connection), wakes async
    /// calls still waiting for a dial, and empties the pool.
    pub(crate) fn close(&self) {
        self.join_dial_threads();
        self.workers.stop_and_join();
        self.wake_dial_waiters();
        write(&self.conns).clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;

    fn view(load: usize, answer_time: u64, quiet_for: u64) -> ShareView {
        ShareView {
            load,
            answer_time,
            quiet_for,
        }
    }

    #[test]
    fn an_idle_connection_is_always_taken() {
        assert!(may_share(view(0, 50 * MS, 10_000 * MS)));
    }

    #[test]
    fn a_busy_connection_is_shared_while_it_answers_fast_and_keeps_answering() {
        assert!(may_share(view(1, 0, 0)));
        assert!(may_share(view(SHARED_REQUESTS - 1, MS / 10, MS)));
        // Full.
        assert!(!may_share(view(SHARED_REQUESTS, 0, 0)));
        // A slow handler.
        assert!(!may_share(view(1, 2 * MS, 0)));
        // Stalled: nothing since its last answer, or since it was taken.
        assert!(!may_share(view(1, 0, 3 * MS)));
    }

    /// The backoff a failure just recorded in `state` runs for.
    fn backoff(state: &DialState) -> Duration {
        let failed = state.failed.as_ref().unwrap();
        failed.until - failed.at
    }

    #[test]
    fn dials_cut_short_double_their_own_backoff_but_not_that_of_real_failures() {
        let config = Config::default()
            .dial_backoff(Duration::from_millis(100))
            .dial_backoff_max(Duration::from_secs(10));
        let cut = Some(Duration::from_millis(50));
        let mut state = DialState::default();
        // A dead endpoint and impatient calls: every dial cut short, and
        // the calls with as little time keep failing fast for longer.
        for expected in [100, 200, 400] {
            state.failed(Error::Closed, &config, cut);
            assert_eq!(backoff(&state), Duration::from_millis(expected));
        }
        // The endpoint's own failure: the first in its row.
        state.failed(Error::Closed, &config, None);
        assert_eq!(backoff(&state), Duration::from_millis(100));
        // A cut-short dial after it doubles on both.
        state.failed(Error::Closed, &config, cut);
        assert_eq!(backoff(&state), Duration::from_millis(200));
        state.failed(Error::Closed, &config, None);
        assert_eq!(backoff(&state), Duration::from_millis(200));
        // Success starts afresh.
        state.succeeded();
        state.failed(Error::Closed, &config, None);
        assert_eq!(backoff(&state), Duration::from_millis(100));
    }
}
