//! One connection as every thread sees it: its outbound queue (see
//! [`crate::outbound`]), the completion table for its requests, its read
//! side, which a caller waiting for a response may read itself, and the
//! public [`Connection`] handle.

use std::io;
use std::mem;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::conn_socket::ConnSocket;

use crate::clock::{no_time_left, CallDeadline};
use crate::config::Config;
use crate::error::{CallOp, Error, Result, TimeoutKind};
use crate::outbound::{Flushed, Mode, OutboundQueue, QueueOwner};
use crate::protocol::connection::{nanos, ConnCore};
use crate::protocol::{Role, Sealer};
use crate::read_side::{CallerReads, ReadOwner, ReadSide, TaskLease};
use crate::stats::{Counters, GaugeHeld};
use crate::sync::buffers::BufferPool;
use crate::sync::completion::{CompletionTable, Delivered, NO_LIMIT};
use crate::sync::timers::Timers;
use std::sync::Arc;
use std::task::{Wake, Waker};

use crate::sync::{lock, AtomicBool, AtomicU64, AtomicUsize, Mutex, Ordering};

/// Called once when a connection closes (the server's connection cap).
pub(crate) type ReleaseHook = Box<dyn Fn() + Send + Sync>;

/// Names a reactor (or none, [`ReactorId::NONE`]): the one a call must
/// not wait on, because its thread is the caller's.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) struct ReactorId(pub(crate) usize);

impl ReactorId {
    /// No reactor: a call from a thread that runs none.
    pub(crate) const NONE: ReactorId = ReactorId(0);
}

/// What a connection needs of the reactor that drives it. The reactor
/// implements it; a connection holds it as a trait object, so that this
/// module (below the reactor) does not name the reactor's types.
pub(crate) trait Driver: Send + Sync {
    /// Asks the reactor to act on `conn`. Fails once the reactor has
    /// stopped (it then settles the request on the spot: a connection to
    /// close is closed).
    fn ask(&self, conn: &Connection, what: Ask) -> io::Result<()>;
    /// Whether the calling thread is this reactor's (a handler calling
    /// back into the library).
    fn is_current(&self) -> bool;
    /// This reactor, as [`current_reactor`](crate::reactor::current_reactor)
    /// names it on its thread.
    fn reactor_id(&self) -> ReactorId;
    /// The reactor's counters, which its connections add to.
    fn stats(&self) -> &Counters;
    /// The epoll instance the reactor waits on, for interest changes made
    /// from other threads.
    fn registry(&self) -> &mio::Registry;
    /// The receive buffers the reactor lends its connections.
    fn recv_buffers(&self) -> &BufferPool;
    /// The output buffers the reactor lends its connections.
    fn send_buffers(&self) -> &BufferPool;
    /// The deadlines of async calls, which the reactor fires.
    fn timers(&self) -> &Timers;
    /// Wakes the reactor (a deadline came before its planned wake-up).
    fn wake(&self);
}

/// What a connection asks of its reactor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Ask {
    /// Read the socket: a caller that was reading it stopped at something
    /// only the reactor may handle.
    Read,
    /// Write the queue.
    Flush,
    /// Drop the socket (the connection is already marked closed).
    Close,
}

pub(crate) struct ConnShared {
    pub(crate) id: u64,
    pub(crate) role: Role,
    pub(crate) stream: ConnSocket,
    pub(crate) peer_addr: Option<SocketAddr>,
    /// The Ed25519 key the peer proved in the handshake, set once the
    /// handshake ends (before `on_open`).
    peer_identity: std::sync::OnceLock<[u8; 32]>,
    pub(crate) config: Arc<Config>,
    /// The reactor that drives this connection.
    driver: Arc<dyn Driver>,
    /// The slab key in the reactor, once registered.
    pub(crate) token: AtomicUsize,
    /// A dialled connection's `on_open` runs (on the dialling thread): no
    /// reactor takes the connection before it returns.
    opening: AtomicBool,
    /// Completion slots for this side's requests, made on the first
    /// request: most server-side connections never issue one, and the
    /// table is the largest per-connection structure.
    requests: std::sync::OnceLock<CompletionTable>,
    /// Calls in progress on this connection: the client pool's load metric.
    pub(crate) active_calls: AtomicUsize,
    /// How long requests answered on this connection waited for their
    /// answers, in nanoseconds, a moving average (1/8 per answer; 0 before
    /// the first): the client pool shares only connections that answer
    /// fast.
    answer_time: AtomicU64,
    /// When the client pool last gave this connection, idle, to a request,
    /// or dialled it ([`now_nanos`]): with the last read, whether it is
    /// stalled.
    taken_at: AtomicU64,
    /// The read side: read by the reactor, or by a caller waiting for a
    /// response.
    pub(crate) read: ReadSide,
    /// Wakes on the reactor's timer to take back leases that futures no
    /// longer polled still hold ([`ReadSide::reclaim_task_leases`]); made
    /// by the first lease.
    lease_reclaim: std::sync::OnceLock<Waker>,
    out: OutboundQueue,
    release: Mutex<Option<ReleaseHook>>,
}

/// A handle to one open connection. Cheap to clone; every clone drives the
/// same connection. Obtained from [`Handler::on_open`](crate::Handler::on_open), a [`Context`](crate::Context),
/// or [`ReactorHandle::dial`](crate::ReactorHandle::dial).
#[derive(Clone)]
pub struct Connection {
    pub(crate) shared: Arc<ConnShared>,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("id", &self.shared.id)
            .field("peer_addr", &self.shared.peer_addr)
            .field("closed", &self.is_closed())
            .finish()
    }
}

pub(crate) struct NewConnParts {
    pub(crate) id: u64,
    pub(crate) role: Role,
    pub(crate) stream: ConnSocket,
    /// Known to whoever made the socket: no `getpeername` here.
    pub(crate) peer_addr: Option<SocketAddr>,
    pub(crate) sealer: Option<Sealer>,
    pub(crate) config: Arc<Config>,
    pub(crate) driver: Arc<dyn Driver>,
    pub(crate) release: Option<ReleaseHook>,
    pub(crate) core: ConnCore,
}

impl Connection {
    pub(crate) fn new(parts: NewConnParts) -> Connection {
        let peer_addr = parts.peer_addr;
        let out = OutboundQueue::new(parts.sealer, &parts.config);
        Connection {
            shared: Arc::new(ConnShared {
                id: parts.id,
                role: parts.role,
                peer_addr,
                peer_identity: std::sync::OnceLock::new(),
                requests: std::sync::OnceLock::new(),
                stream: parts.stream,
                config: parts.config,
                driver: parts.driver,
                token: AtomicUsize::new(usize::MAX),
                opening: AtomicBool::new(false),
                active_calls: AtomicUsize::new(0),
                answer_time: AtomicU64::new(0),
                taken_at: AtomicU64::new(0),
                read: ReadSide::new(parts.core),
                lease_reclaim: std::sync::OnceLock::new(),
                out,
                release: Mutex::new(parts.release),
            }),
        }
    }

    /// A number that identifies this connection within the process.
    pub fn id(&self) -> u64 {
        self.shared.id
    }

    /// The peer's address.
    pub fn peer_addr(&self) -> Option<SocketAddr> {
        self.shared.peer_addr
    }

    /// The long-term Ed25519 public key the peer proved in the handshake:
    /// the client's on a server whose `identity` profile requires clients
    /// to prove one (so a handler can authorise per client), the server's
    /// on an `identity` client. `None` when the handshake authenticated no
    /// peer key (`secure`, `monte`, `psk`, or an anonymous client).
    ///
    /// ```no_run
    /// use monte_rpc::{Config, Context, Server};
    ///
    /// let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
    ///     let allowed = ctx.conn().peer_identity().is_some_and(|key| key[0] == 0x42);
    ///     let _ = ctx.reply(if allowed { b"yes" } else { b"no" });
    /// })?;
    /// # Ok::<(), monte_rpc::Error>(())
    /// ```
    pub fn peer_identity(&self) -> Option<[u8; 32]> {
        self.shared.peer_identity.get().copied()
    }

    /// Records the key the handshake authenticated (once, before the
    /// connection is handed to anyone).
    pub(crate) fn set_peer_identity(&self, key: Option<[u8; 32]>) {
        if let Some(key) = key {
            let _ = self.shared.peer_identity.set(key);
        }
    }

    /// Whether this side dialled ([`Role::Client`]) or accepted.
    pub fn role(&self) -> Role {
        self.shared.role
    }

    /// Marks the dialled connection's `on_open` as running (`true`) or
    /// returned: until it returns, a request waiting on it that the
    /// peer's messages keep from its response fails at once (see
    /// [`Error::MessagesAheadInOnOpen`]).
    pub(crate) fn set_opening(&self, running: bool) {
        self.shared.opening.store(running, Ordering::Release);
    }

    /// Whether the connection is closed (or closing).
    pub fn is_closed(&self) -> bool {
        self.shared.out.is_closed()
    }

    /// Why the connection closed, once it has.
    pub fn close_reason(&self) -> Option<Error> {
        self.shared.out.close_reason()
    }

    /// When bytes last came from the peer ([`now_nanos`]).
    pub(crate) fn last_read(&self) -> u64 {
        self.shared.read.last_read()
    }

    /// How long requests answered here waited, in nanoseconds: a moving
    /// average, so that one stall (a dial's handshake taking the cores) does
    /// not make a connection slow, while a slow handler does within a few
    /// answers.
    pub(crate) fn answer_time(&self) -> u64 {
        self.shared.answer_time.load(Ordering::Relaxed)
    }

    /// A request sent at `sent_at` ([`now_nanos`]) was answered now.
    pub(crate) fn note_answer(&self, sent_at: u64) {
        let took = crate::clock::now_nanos().saturating_sub(sent_at);
        let _ =
            self.shared
                .answer_time
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |average| {
                    Some(if took >= average {
                        average + (took - average) / 8
                    } else {
                        average - (average - took) / 8
                    })
                });
    }

    /// When the client pool last gave this connection, idle, to a request.
    pub(crate) fn taken_at(&self) -> u64 {
        self.shared.taken_at.load(Ordering::Relaxed)
    }

    /// The client pool gives this connection, idle, to a request at `now`.
    pub(crate) fn set_taken_at(&self, now: u64) {
        self.shared.taken_at.store(now, Ordering::Relaxed);
    }

    /// The longest patience among the requests on this connection still
    /// waiting for their response (nanoseconds, [`NO_LIMIT`] for one with
    /// no timeout), `None` if none waits: how long they let the peer be
    /// silent.
    pub(crate) fn longest_patience(&self) -> Option<u64> {
        self.shared
            .requests
            .get()
            .and_then(CompletionTable::longest_patience)
    }

    /// Since when the connection has been quiet while in use: its last
    /// bytes from the peer, or its last taking while idle if later (time
    /// spent idle is no silence) ([`now_nanos`]).
    pub(crate) fn quiet_since(&self) -> u64 {
        self.last_read().max(self.taken_at())
    }

    /// Whether nothing has arrived from the peer since `since`
    /// ([`now_nanos`]).
    pub(crate) fn silent_since(&self, since: u64) -> bool {
        self.shared.read.last_read() < since
    }

    /// Requests on this connection still awaiting their response.
    pub fn in_flight(&self) -> usize {
        self.shared
            .requests
            .get()
            .map_or(0, CompletionTable::in_flight)
    }

    /// Delivers the response numbered `seq` to its request, if one still
    /// waits for it: whether it did. A late or unknown response is dropped
    /// and can never reach another request's slot.
    pub(crate) fn deliver_response(&self, seq: u32, payload: &[u8]) -> Delivered {
        self.shared
            .requests
            .get()
            .map_or(Delivered::Dropped, |table| table.deliver(seq, payload))
    }

    /// Calls in progress: frames being queued or written plus requests
    /// awaiting their response. The client pool's measure of "busy".
    pub(crate) fn load(&self) -> usize {
        self.shared.active_calls.load(Ordering::Relaxed) + self.in_flight()
    }

    /// Sends a message that expects no reply, and returns once its frame is
    /// written to the socket. (Called from a handler on this connection's
    /// own reactor thread, it returns once the frame is queued, since only
    /// that thread can write it; a full queue is then [`Error::QueueFull`].)
    pub fn send(&self, body: &[u8]) -> Result<()> {
        self.submit(0, body, Mode::Direct { wait: true }, None)
            .map_err(|e| e.calling(CallOp::Send, self.peer_addr()))
    }

    /// [`send`](Self::send) within the deadline of a call that began
    /// earlier (a client's send that had to dial first).
    pub(crate) fn send_by(&self, body: &[u8], by: Option<CallDeadline>) -> Result<()> {
        self.submit(0, body, Mode::Direct { wait: true }, by)
    }

    /// Queues a message that expects no reply and returns at once. When
    /// `max_queued_bytes` are already queued it waits for room, up to the
    /// send timeout ([`Config::send_timeout`](crate::Config::send_timeout)).
    pub fn send_no_wait(&self, body: &[u8]) -> Result<()> {
        self.submit(0, body, Mode::Queue, None)
            .map_err(|e| e.calling(CallOp::SendNoWait, self.peer_addr()))
    }

    /// [`send_no_wait`](Self::send_no_wait) within the deadline of a call
    /// that began earlier.
    pub(crate) fn send_no_wait_by(&self, body: &[u8], by: Option<CallDeadline>) -> Result<()> {
        self.submit(0, body, Mode::Queue, by)
    }

    /// Sends a request and puts the response into `response`, reusing its
    /// capacity. Waits up to the configured request timeout. From a handler
    /// on this connection's own reactor thread it returns
    /// [`Error::OnReactorThread`] at once: the response could only be read
    /// by the thread that would be waiting for it.
    pub fn request(&self, body: &[u8], response: &mut Vec<u8>) -> Result<()> {
        self.request_timeout(body, response, self.shared.config.request_timeout)
    }

    /// [`request`](Self::request) with its own timeout (`None`: wait until
    /// the response or the connection's end).
    pub fn request_timeout(
        &self,
        body: &[u8],
        response: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if no_time_left(timeout) {
            let e = Error::Timeout(TimeoutKind::Request);
            self.shared.driver.stats().count_request_failure(&e, true);
            return Err(e.calling(CallOp::Request, self.peer_addr()));
        }
        // A timeout too long to add to the clock is none.
        let deadline = timeout.and_then(|t| Instant::now().checked_add(t));
        self.request_until(body, response, deadline, timeout)
            .map_err(|e| e.calling(CallOp::Request, self.peer_addr()))
    }

    /// [`request_timeout`](Self::request_timeout) until `deadline`, without
    /// the call's context on its error, for a caller that adds its own
    /// (and read the clock for its deadline already). `timeout` is the
    /// call's own, the request's patience in its completion slot (no
    /// second clock reading for it).
    pub(crate) fn request_until(
        &self,
        body: &[u8],
        response: &mut Vec<u8>,
        deadline: Option<Instant>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        if self.shared.driver.is_current() {
            return Err(Error::OnReactorThread);
        }
        let table = self.requests();
        // A close that ran before the table existed could not fail it: the
        // send below sees the closed queue and withdraws the request.
        let patience = timeout.map_or(NO_LIMIT, nanos);
        let pending = match table.begin(mem::take(response), patience) {
            Ok(p) => p,
            Err((e, buf)) => {
                *response = buf;
                return Err(e);
            }
        };
        let stats = self.shared.driver.stats();
        let in_flight = GaugeHeld::new(&stats.requests_in_flight);
        let mut reads = CallerReads::new(&self.shared.read, self);
        reads.quiet_reactor();
        // A caller that must wait for room reads nothing meanwhile: the
        // reactor gets its readable events back for that wait (the peer's
        // messages, other callers' responses), and waiting for the
        // response takes them again.
        let submitted = self.submit_or_wait(
            pending.seq(),
            body,
            Mode::Direct { wait: false },
            // The request's own deadline, none included: the send timeout
            // bounds sends only.
            Some(deadline.map(|at| CallDeadline {
                at,
                kind: TimeoutKind::Request,
            })),
            &mut || reads.wake_reactor_again(),
        );
        let result = match submitted {
            Err(e) => {
                *response = pending.cancel();
                Err(e)
            }
            Ok(()) => match pending.wait_polling(
                self.shared.config.waiting.caller_spin(),
                deadline,
                &mut reads,
            ) {
                Ok(buf) => {
                    *response = buf;
                    Ok(())
                }
                Err((e, buf)) => {
                    *response = buf;
                    Err(e)
                }
            },
        };
        // Timed out waiting for room as well as for the response.
        if let Err(e) = &result {
            let passed = deadline.is_some_and(|at| Instant::now() >= at);
            stats.count_request_failure(e, passed);
        }
        drop(reads);
        drop(in_flight);
        result
    }

    /// A future waiting for its response reads the socket itself in its
    /// polls from `now` ([`now_nanos`](crate::clock::now_nanos)), with
    /// the reactor quiet meanwhile (see [`ReadSide::lease_to_task`]).
    pub(crate) fn lease_reads(&self, now: u64) -> TaskLease {
        let (lease, look) = self.shared.read.lease_to_task(self, now);
        if let Some(at) = look {
            self.arm_lease_reclaim(at);
        }
        lease
    }

    /// The future is done reading the socket.
    pub(crate) fn end_lease(&self, lease: TaskLease) {
        self.shared.read.end_task_lease(self, lease);
    }

    /// Has the reactor look at the leases at `at`, or as soon after it as
    /// it wakes: it is not woken for this (a wake-up on the request's way
    /// out would cost more than the look saves). Anything that needs it
    /// awake meanwhile wakes it: another request on the connection (with
    /// this one in flight, the reactor writes it), a command, a timer; at
    /// the latest its sweep, within 250 ms (a future no longer polled
    /// then delays only what the peer sends unasked, and the end of the
    /// stream, by that much).
    fn arm_lease_reclaim(&self, at: u64) {
        let waker = self.shared.lease_reclaim.get_or_init(|| {
            Waker::from(Arc::new(LeaseReclaim {
                conn: Arc::downgrade(&self.shared),
            }))
        });
        let _reactor_sleeps_past = self.shared.driver.timers().insert_once(at, waker);
    }

    /// Answers the peer's request `seq` from any thread (a handler that
    /// deferred its reply). Queued like [`send_no_wait`](Self::send_no_wait).
    pub fn reply(&self, seq: u32, body: &[u8]) -> Result<()> {
        self.submit(seq, body, Mode::Queue, None)
            .map_err(|e| e.calling(CallOp::Reply, self.peer_addr()))
    }

    /// A reply made by a handler on this connection's reactor thread:
    /// queued without waiting for room (the reactor enforces the budget
    /// between frames; see `Lifecycle::within_budget`).
    pub(crate) fn queue_reply(&self, seq: u32, body: &[u8]) -> Result<()> {
        self.submit(seq, body, Mode::OnReactor, None)
    }

    /// Bytes waiting to be written: what the reactor holds against the
    /// connection's outbound budget.
    pub(crate) fn queued(&self) -> usize {
        self.shared.out.queued()
    }

    /// Closes the connection at once: queued output is dropped and pending
    /// requests fail with [`Error::Closed`].
    pub fn close(&self) {
        self.fail(Error::Closed);
    }

    /// A send's frame: its waits end by `by` if its call fixed a deadline,
    /// else by the send timeout from its first wait.
    fn submit(&self, seq: u32, body: &[u8], mode: Mode, by: Option<CallDeadline>) -> Result<()> {
        self.submit_or_wait(seq, body, mode, by.map(Some), &mut || {})
    }

    /// [`submit`](Self::submit) with the deadline as the caller fixed it
    /// (`Some(None)`: none at all; `None`: the send timeout from the first
    /// wait), calling `before_room_wait` if the call has to wait for room
    /// (see [`OutboundQueue::submit`]).
    pub(crate) fn submit_or_wait(
        &self,
        seq: u32,
        body: &[u8],
        mode: Mode,
        by: Option<Option<CallDeadline>>,
        before_room_wait: &mut dyn FnMut(),
    ) -> Result<()> {
        let sh = &*self.shared;
        let mode = self.checked_mode(body, mode)?;
        sh.active_calls.fetch_add(1, Ordering::Relaxed);
        let result = sh.out.submit(self, seq, body, mode, by, before_room_wait);
        sh.active_calls.fetch_sub(1, Ordering::Relaxed);
        result
    }

    /// Refuses a body over `max_message_size`, and picks how a frame asked
    /// to go out as `mode` is queued from the calling thread.
    pub(crate) fn checked_mode(&self, body: &[u8], mode: Mode) -> Result<Mode> {
        let sh = &*self.shared;
        let max = sh.config.max_message_size;
        if body.len() > max {
            return Err(Error::MessageTooLarge {
                len: body.len(),
                max,
            });
        }
        Ok(if mode != Mode::OnReactor && sh.driver.is_current() {
            // A handler sending on a connection of its own reactor: only
            // this thread can drain the queue, so waiting (for room, or for
            // the write) would wait for itself. Queue it; it goes out on
            // this reactor's next turn.
            Mode::ReactorQueue
        } else {
            mode
        })
    }

    /// The outbound queue, for the async calls.
    pub(crate) fn outbound(&self) -> &OutboundQueue {
        &self.shared.out
    }

    /// This side's completion table, made on the first request.
    pub(crate) fn requests(&self) -> &CompletionTable {
        let sh = &*self.shared;
        sh.requests
            .get_or_init(|| CompletionTable::new(sh.role, sh.config.max_in_flight))
    }

    /// The reactor driving this connection.
    pub(crate) fn driver(&self) -> &dyn Driver {
        &*self.shared.driver
    }

    /// The configuration the connection was made with.
    pub(crate) fn config(&self) -> &Config {
        &self.shared.config
    }

    /// Reactor side: write what is queued, as far as the socket takes it.
    /// A thread already writing hands the queue back to the reactor when
    /// done if more than `hand_back_past` bytes are queued.
    pub(crate) fn flush_from_reactor(&self, hand_back_past: usize) -> Flushed {
        self.shared.out.flush_from_reactor(self, hand_back_past)
    }

    /// Reactor side, for a connection that has been idle a while: gives
    /// back the outbound buffers if they hold nothing, so an idle
    /// connection costs little memory. They are made again on the next use
    /// (one allocation per idle period, none per message).
    pub(crate) fn release_idle_out_buffers(&self) {
        self.shared.out.release_idle_buffers(self);
    }

    /// The pool this connection's receive buffer comes from.
    pub(crate) fn recv_buffers(&self) -> &BufferPool {
        self.shared.driver.recv_buffers()
    }

    /// Reactor side: whether it waits for the socket to take more output.
    pub(crate) fn set_write_interest(&self, writable: bool) -> io::Result<()> {
        self.shared.read.set_write_interest(self, writable)
    }

    /// Reactor side: runs `f` on the connection's core unless a caller is
    /// reading it (then `None`: that caller judges the deadlines itself);
    /// see [`ReadSide::with_idle_core`].
    pub(crate) fn with_idle_core<T>(&self, f: impl FnOnce(&mut ConnCore) -> T) -> Option<T> {
        self.shared.read.with_idle_core(self, f)
    }

    /// Reactor side, graceful close: seals the output off once it is
    /// drained, or says it had failed (see [`OutboundQueue::seal_off_if_drained`]).
    pub(crate) fn seal_off_if_drained(&self) -> crate::protocol::connection::Sealed {
        self.shared.out.seal_off_if_drained()
    }

    /// Reactor side: the handshake finished; frames may now be sealed.
    pub(crate) fn install_sealer(&self, sealer: Sealer) {
        self.shared.out.install_sealer(sealer);
    }

    /// Bytes written so far and whether output is still pending: the
    /// reactor's write-timeout probe.
    pub(crate) fn write_progress(&self) -> (u64, bool) {
        self.shared.out.write_progress()
    }

    /// Marks the connection closed with `error`: output is refused, waiting
    /// senders and every pending request fail, and the reactor is told to
    /// drop the socket. Idempotent; the first error wins.
    pub(crate) fn fail(&self, error: Error) {
        let sh = &*self.shared;
        sh.out.close(&error);
        if let Some(table) = sh.requests.get() {
            table.close(&error);
        }
        let _ = sh.driver.ask(self, Ask::Close);
    }

    /// Reactor side, the final step of closing: shut the socket down and
    /// release the connection's place under the server's cap.
    pub(crate) fn finish_close(&self, error: &Error) {
        let sh = &*self.shared;
        sh.out.close(error);
        if let Some(table) = sh.requests.get() {
            table.close(error);
        }
        let _ = sh.stream.shutdown(std::net::Shutdown::Both);
        if let Some(release) = lock(&sh.release).take() {
            release();
        }
        // The handle may outlive the connection by far (an application
        // that replies later keeps it): its buffers go now. A caller
        // reading the socket meanwhile (its turn) finds it shut down, ends,
        // and drops the input as it lets go of the turn.
        // A server connection still in its handshake has no caller yet (its
        // handle is out only from `on_open`), so its turn is free here and
        // its handshake is dropped now, guarded (`discard_input`).
        sh.out.free_buffers();
        sh.read.discard_input();
    }
}

impl QueueOwner for Connection {
    fn stream(&self) -> &ConnSocket {
        &self.shared.stream
    }

    fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.peer_addr
    }

    fn buffers(&self) -> &BufferPool {
        self.shared.driver.send_buffers()
    }

    fn stats(&self) -> &Counters {
        self.shared.driver.stats()
    }

    fn ask_reactor_to_flush(&self) {
        if self.shared.driver.ask(self, Ask::Flush).is_err() {
            self.fail(Error::Closed);
        }
    }

    fn has_reactor(&self) -> bool {
        self.shared.token.load(Ordering::Acquire) != usize::MAX
    }

    fn fail(&self, error: Error) {
        Connection::fail(self, error);
    }
}

/// The waker of a connection's lease timer: on the reactor, takes back
/// the leases of futures no longer polled. It holds the connection weakly:
/// the connection holds it.
struct LeaseReclaim {
    conn: std::sync::Weak<ConnShared>,
}

impl Wake for LeaseReclaim {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let Some(shared) = self.conn.upgrade() else {
            return;
        };
        let conn = Connection { shared };
        let now = crate::clock::now_nanos();
        if let Some(at) = conn.shared.read.reclaim_task_leases(&conn, now) {
            conn.arm_lease_reclaim(at);
        }
    }
}

impl ReadOwner for Connection {
    fn stream(&self) -> &ConnSocket {
        &self.shared.stream
    }

    fn peer_addr(&self) -> Option<std::net::SocketAddr> {
        self.shared.peer_addr
    }

    fn buffers(&self) -> &BufferPool {
        self.shared.driver.recv_buffers()
    }

    fn stats(&self) -> &Counters {
        self.shared.driver.stats()
    }

    fn registry(&self) -> &mio::Registry {
        self.shared.driver.registry()
    }

    fn token(&self) -> usize {
        self.shared.token.load(Ordering::Acquire)
    }

    fn opening(&self) -> bool {
        self.shared.opening.load(Ordering::Acquire)
    }

    fn ask_reactor_to_read(&self) {
        if self.shared.driver.ask(self, Ask::Read).is_err() {
            self.fail(Error::Closed);
        }
    }

    fn fail_requests(&self, error: &Error) {
        if let Some(table) = self.shared.requests.get() {
            table.close(error);
        }
    }

    fn fail_waiting_requests(&self, error: &Error) {
        if let Some(table) = self.shared.requests.get() {
            table.fail_waiting(error);
        }
    }

    fn deliver_response(&self, seq: u32, payload: &[u8]) -> bool {
        Connection::deliver_response(self, seq, payload) != Delivered::Dropped
    }
}
