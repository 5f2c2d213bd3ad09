//! The reactor: one single-threaded, edge-triggered mio event loop that
//! moves bytes between sockets and the protocol core.
//!
//! # The edge-triggered contract
//!
//! A socket is announced readable once per edge, so every read drains it
//! until `WouldBlock`: anything left unread would never be announced again.
//! Received bytes land in the connection's receive buffer, complete frames
//! are opened in place there, and the handler sees a borrow of the
//! plaintext. Output is written by whoever finds the queue idle (see
//! [`crate::conn`]); the reactor asks for WRITABLE only while it owns a
//! queue the socket would not take.
//!
//! A reactor runs on a thread of the caller's choosing: [`Reactor::run`], or
//! [`Reactor::poll_once`] from the caller's own loop. Other threads reach it
//! through a [`ReactorHandle`], whose commands go through a
//! [`Mailbox`](crate::sync::mailbox::Mailbox) and wake it only when it is
//! not already going to look.

use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};
use slab::Slab;

use crate::clock::now_nanos;
use crate::config::Config;
use crate::conn::{Ask, Connection, Driver, NewConnParts, ReleaseHook};
use crate::error::{Error, HandshakeError, Result, TimeoutKind};
use crate::handler::{Context, Handler};
use crate::outbound::Flushed;
use crate::protocol::connection::{ConnCore, Filled, Held, ReadPhase};
use crate::protocol::{Role, Session};
use crate::stats::{Counters, Stats};
use crate::sync::mailbox::{Mailbox, PushError};
use std::sync::Arc;

use crate::sync::{AtomicBool, AtomicUsize, Ordering};

const WAKER: Token = Token(usize::MAX - 1);

/// How long a connection must see no byte in or out before its buffers are
/// given back: long enough that a connection in use keeps them (no
/// allocation per message), short enough that thousands of idle
/// connections cost little.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

thread_local! {
    /// The reactor (its shared half's address) this thread is running, or 0.
    static CURRENT_REACTOR: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the thread as running a reactor for as long as it lives.
struct RunningGuard(usize);

impl RunningGuard {
    fn enter(reactor: &Arc<ReactorShared>) -> RunningGuard {
        let prev = CURRENT_REACTOR.with(|c| c.replace(Arc::as_ptr(reactor) as usize));
        RunningGuard(prev)
    }
}

impl Drop for RunningGuard {
    fn drop(&mut self) {
        CURRENT_REACTOR.with(|c| c.set(self.0));
    }
}

/// What other threads ask of a reactor.
pub(crate) enum Command {
    /// Take over a connection, whose messages go to `handler`
    /// (`handshaking`: it still has to run the server side of the
    /// handshake).
    Add {
        conn: Connection,
        handler: Arc<dyn Handler>,
        handshaking: bool,
    },
    /// Read this connection: a caller that was reading it stopped at
    /// something only the reactor may handle.
    Read(Connection),
    /// Write this connection's queue.
    Flush(Connection),
    /// Drop this connection's socket (already marked closed).
    Close(Connection),
    /// Close every connection gracefully, then stop.
    Stop,
}

/// The part of a reactor other threads share.
pub(crate) struct ReactorShared {
    mailbox: Mailbox<Command>,
    waker: Waker,
    registry: Registry,
    stopped: AtomicBool,
    connections: AtomicUsize,
    config: Arc<Config>,
    pub(crate) stats: Counters,
}

impl Driver for ReactorShared {
    fn ask(&self, conn: &Connection, what: Ask) -> io::Result<()> {
        let conn = conn.clone();
        self.push(match what {
            Ask::Read => Command::Read(conn),
            Ask::Flush => Command::Flush(conn),
            Ask::Close => Command::Close(conn),
        })
        .map(|_| ())
    }

    fn is_current(&self) -> bool {
        CURRENT_REACTOR.with(|c| c.get()) == self as *const ReactorShared as usize
    }

    fn stats(&self) -> &Counters {
        &self.stats
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }
}

impl ReactorShared {
    /// Hands a command to the reactor. Once it has stopped, the command is
    /// settled here instead (a connection handed over is closed), so no
    /// connection is left in a mailbox no one reads.
    pub(crate) fn push(&self, cmd: Command) -> io::Result<bool> {
        match self.mailbox.push(cmd, &self.waker) {
            Ok(woke) => Ok(woke),
            Err(PushError::Notify(e)) => Err(e),
            Err(PushError::Closed(cmd)) => {
                settle_after_stop(cmd, &self.stats);
                Err(io::ErrorKind::NotConnected.into())
            }
        }
    }
}

/// A handle to a reactor, usable from any thread.
#[derive(Clone)]
pub struct ReactorHandle {
    pub(crate) shared: Arc<ReactorShared>,
}

impl std::fmt::Debug for ReactorHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReactorHandle")
            .field("connections", &self.connections())
            .field("stopped", &self.is_stopped())
            .finish()
    }
}

impl ReactorHandle {
    /// Hands the reactor a connection this program accepted itself. The
    /// reactor runs the server side of the handshake, then calls
    /// `handler.on_open` with the connection.
    pub fn accept(&self, stream: std::net::TcpStream, handler: Arc<dyn Handler>) -> Result<()> {
        self.accept_with_release(stream, handler, None)
    }

    pub(crate) fn accept_with_release(
        &self,
        stream: std::net::TcpStream,
        handler: Arc<dyn Handler>,
        release: Option<ReleaseHook>,
    ) -> Result<()> {
        let config = self.shared.config.clone();
        if let Err(e) = stream.set_nonblocking(true) {
            if let Some(r) = release {
                r();
            }
            return Err(e.into());
        }
        let _ = stream.set_nodelay(true);
        let peer = stream.peer_addr().ok();
        let handshake = match config.handshake.server_for_peer(peer) {
            Ok(h) => h,
            Err(e) => {
                if let Some(r) = release {
                    r();
                }
                return Err(e);
            }
        };
        let conn = Connection::new(NewConnParts {
            id: crate::sync::next_conn_id(),
            role: Role::Server,
            stream: mio::net::TcpStream::from_std(stream),
            sealer: None,
            config,
            driver: self.shared.clone(),
            release,
            core: ConnCore::new(
                ReadPhase::Handshaking {
                    handshake,
                    out: Vec::new(),
                },
                self.shared.config.read_buffer_size,
                &[],
                self.shared.config.max_message_size,
                self.shared.config.deadlines(),
                now_nanos(),
            ),
        });
        self.add(conn, handler, true)
    }

    /// Dials `addr` on the calling thread (connect, then the client side of
    /// the handshake, each within its timeout) and hands the connection to
    /// this reactor. Requests from the peer go to `handler`.
    pub fn dial(
        &self,
        addr: std::net::SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> Result<Connection> {
        let config = self.shared.config.clone();
        let (stream, session, leftover) = match crate::dial::dial(addr, &config) {
            Ok(dialled) => dialled,
            Err(e) => {
                if matches!(
                    e,
                    Error::Handshake(_) | Error::Timeout(TimeoutKind::Handshake)
                ) {
                    Counters::inc(&self.shared.stats.handshakes_failed);
                }
                return Err(e);
            }
        };
        let conn = Connection::new(NewConnParts {
            id: crate::sync::next_conn_id(),
            role: Role::Client,
            stream: mio::net::TcpStream::from_std(stream),
            sealer: Some(session.sealer),
            core: ConnCore::new(
                ReadPhase::Open {
                    opener: session.opener,
                },
                config.read_buffer_size,
                &leftover,
                config.max_message_size,
                config.deadlines(),
                now_nanos(),
            ),
            config,
            driver: self.shared.clone(),
            release: None,
        });
        conn.set_peer_identity(session.peer_identity);
        // Before the reactor has it: once it does, it may dispatch the
        // peer's first messages, and on_open must come first.
        if let Err(e) = guard_handler(|| handler.on_open(&conn)) {
            conn.finish_close(&e);
            return Err(e);
        }
        if let Err(e) = self.add(conn.clone(), handler.clone(), false) {
            let _ = guard_handler(|| handler.on_close(&conn, &e));
            return Err(e);
        }
        Ok(conn)
    }

    fn add(&self, conn: Connection, handler: Arc<dyn Handler>, handshaking: bool) -> Result<()> {
        if self.is_stopped() {
            conn.finish_close(&Error::Closed);
            return Err(Error::Closed);
        }
        self.shared.connections.fetch_add(1, Ordering::Relaxed);
        // Counted open from here, not from when the reactor takes it: a
        // dialled connection is in use (callers read it themselves) at once.
        Counters::inc(&self.shared.stats.connections_open);
        Counters::inc(&self.shared.stats.connections_opened);
        match self.shared.push(Command::Add {
            conn,
            handler,
            handshaking,
        }) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                // Stopped meanwhile: the connection was closed (and
                // uncounted) on the spot.
                self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                Err(Error::Closed)
            }
            // Queued; only the wake-up failed, and the reactor's next turn
            // takes it.
            Err(_) => Ok(()),
        }
    }

    /// Asks the reactor to stop: it closes every connection gracefully
    /// (queued output is flushed first) and then its loop returns.
    pub fn stop(&self) {
        let _ = self.shared.push(Command::Stop);
    }

    /// Whether the reactor has stopped.
    pub fn is_stopped(&self) -> bool {
        self.shared.stopped.load(Ordering::Acquire)
    }

    /// A snapshot of this reactor's counters.
    pub fn stats(&self) -> Stats {
        let mut stats = Stats::default();
        self.add_stats(&mut stats);
        stats
    }

    pub(crate) fn add_stats(&self, into: &mut Stats) {
        self.shared.stats.add_to(into);
    }

    /// Connections the reactor holds (including ones being handed over).
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::Relaxed)
    }
}

struct Entry {
    conn: Connection,
    /// Gets the connection's messages and life events.
    handler: Arc<dyn Handler>,
    /// The server side of the handshake is still running.
    handshaking: bool,
    writable: bool,
    /// The peer has shut its write side (end of stream was read).
    read_closed: bool,
    /// Reading is paused until queued output drains (backpressure).
    read_paused: bool,
    /// Reading resumed after a pause: the core's deadlines restart at the
    /// next read (see [`ConnCore::resume`]).
    resumed: bool,
    /// This side began the close (its shutdown), so the end is orderly.
    local_close: bool,
    /// (bytes written, when that count was last seen to change)
    write_watch: (u64, Instant),
    /// (bytes written, last read, when either last changed), and whether
    /// the buffers were given back since: the idle-release watch.
    activity: (u64, u64, Instant),
    buffers_released: bool,
    /// Set while closing gracefully: output is flushed, then the write side
    /// is shut, then the peer's end is awaited until this deadline.
    draining: Option<Instant>,
    write_shut: bool,
}

/// One event loop. Create it, give [`handle`](Reactor::handle)s to other
/// threads, and drive it with [`run`](Reactor::run) or
/// [`poll_once`](Reactor::poll_once) on a thread of your choosing.
///
/// ```no_run
/// use std::sync::Arc;
/// use monte_rpc::{Config, Context, Reactor};
///
/// let mut reactor = Reactor::new(Config::server()).unwrap();
/// let handle = reactor.handle();
/// let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
/// std::thread::spawn(move || {
///     for stream in listener.incoming() {
///         let echo = Arc::new(|ctx: &mut Context<'_>| {
///             let body = ctx.body().to_vec();
///             let _ = ctx.reply(&body);
///         });
///         let _ = handle.accept(stream.unwrap(), echo);
///     }
/// });
/// reactor.run().unwrap(); // until handle.stop()
/// ```
pub struct Reactor {
    poll: Poll,
    events: Events,
    shared: Arc<ReactorShared>,
    conns: Slab<Entry>,
    commands: Vec<Command>,
    /// Connections with output to flush after this batch.
    dirty: Vec<usize>,
    /// Connections whose paused reading may resume: their output drained.
    resume: Vec<usize>,
    config: Arc<Config>,
    tick: Duration,
    next_sweep: Instant,
    stopping: bool,
    /// What this turn's handlers were given: the busy-poll that follows
    /// (see [`Config::busy_poll`]) depends on it.
    served: Served,
    /// Poll without sleeping until then...
    busy_until: Option<Instant>,
    /// ...this long apart (zero: back to back).
    busy_interval: Duration,
    last_poll: Instant,
}

/// What a reactor's handlers were given in one turn.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
enum Served {
    /// Nothing (or only responses, which the waiting callers read).
    Nothing,
    /// One-way messages: more are likely to follow, and nobody waits on
    /// them, so they are best read in batches.
    Messages,
    /// Requests, answered at once: the peer waits for the answers, and its
    /// next request is likely to follow at once.
    Requests,
}

/// How far apart a reactor polls while busy after one-way messages, asleep
/// in between (plus the OS timer slack: 50 µs by default on Linux). The
/// reactor never sleeps in epoll while messages stream in, so their senders
/// pay no cross-core wake-up, and each poll reads a batch. `bench --bench
/// Send` on the reference machine, 2 s runs in one session: 2.44-2.54 us/op
/// with the reactor sleeping in epoll between messages, 2.85-3.12 polling
/// back to back, 2.13-2.21 yielding between polls 20 us apart, 1.46-1.96
/// asleep between them.
const MESSAGE_POLL_INTERVAL: Duration = Duration::from_micros(20);

impl std::fmt::Debug for Reactor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reactor")
            .field("connections", &self.conns.len())
            .field("stopping", &self.stopping)
            .finish()
    }
}

impl Reactor {
    /// A reactor with its own `mio::Poll`.
    pub fn new(config: Config) -> Result<Reactor> {
        let poll = Poll::new()?;
        let waker = Waker::new(poll.registry(), WAKER)?;
        let registry = poll.registry().try_clone()?;
        let config = Arc::new(config);
        let tick = [
            config.handshake_timeout,
            config.read_timeout,
            config.frame_timeout,
            config.write_timeout,
        ]
        .into_iter()
        .flatten()
        .map(|t| t / 8)
        .min()
        .unwrap_or(Duration::from_millis(250))
        .clamp(Duration::from_millis(5), Duration::from_millis(250));
        Ok(Reactor {
            poll,
            events: Events::with_capacity(1024),
            shared: Arc::new(ReactorShared {
                mailbox: Mailbox::new(),
                waker,
                registry,
                stopped: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
                config: config.clone(),
                stats: Counters::default(),
            }),
            conns: Slab::new(),
            commands: Vec::new(),
            // Sized up front: a first use in the middle of steady traffic
            // (say, the first connection whose reading resumes) must not
            // allocate. More than this at once grows them, once.
            dirty: Vec::with_capacity(64),
            resume: Vec::with_capacity(64),
            config,
            tick,
            next_sweep: Instant::now() + tick,
            stopping: false,
            served: Served::Nothing,
            busy_until: None,
            busy_interval: Duration::ZERO,
            last_poll: Instant::now(),
        })
    }

    /// A handle for other threads.
    pub fn handle(&self) -> ReactorHandle {
        ReactorHandle {
            shared: self.shared.clone(),
        }
    }

    /// Runs the loop until the reactor is stopped and every connection is
    /// closed.
    pub fn run(mut self) -> Result<()> {
        while self.poll_once(None)? {}
        Ok(())
    }

    /// One turn of the loop: waits up to `timeout` (or until the next timer)
    /// for events, handles them, and returns `false` once the reactor has
    /// stopped.
    pub fn poll_once(&mut self, timeout: Option<Duration>) -> Result<bool> {
        if self.shared.stopped.load(Ordering::Acquire) {
            return Ok(false);
        }
        let _running = RunningGuard::enter(&self.shared);
        let now = Instant::now();
        let mut wait = self.next_sweep.saturating_duration_since(now);
        if let Some(t) = timeout {
            wait = wait.min(t);
        }
        let busy = self.busy_until.is_some_and(|until| now < until);
        let polled = if busy {
            // Awake as far as producers can tell, so their commands need no
            // wake-up either; give the core to anyone else who wants it.
            // Back to back after requests (yielding the core between
            // polls); after one-way messages, asleep between polls, but
            // not in epoll: bytes arriving meanwhile cost their sender no
            // wake-up, and the next poll reads them as one batch.
            crate::sync::yield_now();
            let next = self.last_poll + self.busy_interval;
            let now = Instant::now();
            if now < next {
                std::thread::sleep(next - now);
            }
            self.last_poll = Instant::now();
            self.poll.poll(&mut self.events, Some(Duration::ZERO))
        } else {
            if !self.shared.mailbox.prepare_sleep() {
                wait = Duration::ZERO;
            }
            let polled = self.poll.poll(&mut self.events, Some(wait));
            self.shared.mailbox.awake();
            polled
        };
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        self.run_commands();
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        for event in events.iter() {
            let token = event.token();
            if token == WAKER {
                continue;
            }
            let key = token.0;
            if !self.conns.contains(key) {
                continue;
            }
            if event.is_readable() || event.is_read_closed() || event.is_error() {
                // A short read may end the read only if this edge did not
                // also bring the peer's end of stream or an error: those
                // would then wait unread, with no further edge to announce
                // them. (Anything arriving after this event raises its own.)
                let bytes_only = !event.is_read_closed() && !event.is_error();
                self.on_readable(key, bytes_only);
            }
            if event.is_writable() && self.conns.contains(key) {
                self.on_writable(key);
            }
        }
        self.events = events;
        self.flush_dirty();
        match std::mem::replace(&mut self.served, Served::Nothing) {
            Served::Nothing => {}
            served => {
                let now = Instant::now();
                let tight = served == Served::Requests
                    || (self.busy_until.is_some_and(|until| now < until)
                        && self.busy_interval.is_zero());
                self.busy_interval = if tight {
                    Duration::ZERO
                } else {
                    MESSAGE_POLL_INTERVAL
                };
                self.busy_until = self.config.busy_poll.map(|d| now + d);
            }
        }
        // Edge-triggered: bytes that arrived while reading was paused are
        // announced no more, so resumed connections are read now.
        while let Some(key) = self.resume.pop() {
            if self.conns.contains(key) {
                self.conns[key].resumed = true;
                self.on_readable(key, false);
            }
        }
        if Instant::now() >= self.next_sweep {
            self.sweep();
            self.next_sweep = Instant::now() + self.tick;
        }
        if self.stopping && self.conns.is_empty() {
            self.shared.stopped.store(true, Ordering::Release);
            // Connections handed over after the stop are closed here, and
            // the mailbox refuses any more.
            let mut left = Vec::new();
            self.shared.mailbox.close(&mut left);
            for cmd in left {
                settle_after_stop(cmd, &self.shared.stats);
            }
            return Ok(false);
        }
        Ok(true)
    }

    fn run_commands(&mut self) {
        let mut commands = std::mem::take(&mut self.commands);
        self.shared.mailbox.drain_into(&mut commands);
        for cmd in commands.drain(..) {
            match cmd {
                Command::Add {
                    conn,
                    handler,
                    handshaking,
                } => self.add(conn, handler, handshaking),
                Command::Read(conn) => {
                    if let Some(key) = self.key_of(&conn) {
                        self.on_readable(key, false);
                    }
                }
                Command::Flush(conn) => {
                    if let Some(key) = self.key_of(&conn) {
                        self.flush(key);
                    }
                }
                Command::Close(conn) => {
                    // The reason the connection was failed with, for
                    // `on_close`.
                    let reason = conn.close_reason().unwrap_or(Error::Closed);
                    match self.key_of(&conn) {
                        Some(key) => self.close(key, reason),
                        None => conn.finish_close(&reason),
                    }
                }
                Command::Stop => self.begin_stop(),
            }
        }
        self.commands = commands;
    }

    fn key_of(&self, conn: &Connection) -> Option<usize> {
        let key = conn.shared.token.load(Ordering::Acquire);
        match self.conns.get(key) {
            Some(e) if e.conn.id() == conn.id() => Some(key),
            _ => None,
        }
    }

    fn add(&mut self, conn: Connection, handler: Arc<dyn Handler>, handshaking: bool) {
        if self.stopping || self.shared.stopped.load(Ordering::Acquire) {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            self.shared.stats.uncount_open();
            conn.finish_close(&Error::Closed);
            return;
        }
        let now = Instant::now();
        let entry = self.conns.vacant_entry();
        let key = entry.key();
        let fd = conn.shared.stream.as_raw_fd();
        if let Err(e) =
            self.shared
                .registry
                .register(&mut SourceFd(&fd), Token(key), Interest::READABLE)
        {
            self.shared.connections.fetch_sub(1, Ordering::Relaxed);
            self.shared.stats.uncount_open();
            conn.finish_close(&Error::from(e));
            return;
        }
        conn.shared.token.store(key, Ordering::Release);
        entry.insert(Entry {
            conn,
            handler,
            handshaking,
            writable: false,
            resumed: false,
            write_watch: (0, now),
            activity: (0, 0, now),
            buffers_released: false,
            draining: None,
            write_shut: false,
            read_closed: false,
            read_paused: false,
            local_close: false,
        });
        // Server handshakes may owe output before any input (custom ones),
        // and bytes read past a dialled handshake must be processed: one
        // pass now.
        self.on_readable(key, false);
    }

    /// Reads the connection if no caller is reading it. `bytes_only`: the
    /// readiness edge announced only bytes, so a short read ends the read
    /// (see [`Filled::Bytes`]).
    fn on_readable(&mut self, key: usize, bytes_only: bool) {
        let conn = self.conns[key].conn.clone();
        let Some(mut inbound) = conn.shared.read.core.announce() else {
            // A caller is reading it, and reads again before it lets go.
            return;
        };
        if std::mem::take(&mut self.conns[key].resumed) {
            inbound.resume(now_nanos());
        }
        let result = loop {
            let read = self.read_all(key, &conn, &mut inbound, bytes_only);
            if read.is_err() || !self.conns.contains(key) {
                break read;
            }
            match conn.shared.read.core.release(inbound) {
                Some(again) => inbound = again,
                None => break Ok(()),
            }
        };
        if let Err(e) = result {
            self.close(key, e);
            return;
        }
        self.after_io(key);
    }

    /// Drains the socket into the receive buffer, processing frames as they
    /// complete (and first whatever a caller-thread reader left).
    fn read_all(
        &mut self,
        key: usize,
        conn: &Connection,
        inbound: &mut ConnCore,
        bytes_only: bool,
    ) -> Result<()> {
        let mut now = now_nanos();
        let mut drained = false;
        loop {
            if self.conns[key].read_paused {
                return Ok(());
            }
            if !self.process(key, conn, inbound, now)? {
                // Over the outbound budget: the replies were flushed as far
                // as the socket took them. Reading stays paused (the frames
                // not yet dispatched stay in the buffer) until they drain;
                // if the socket took enough, go on.
                if !self.conns.contains(key) || self.conns[key].read_paused {
                    return Ok(());
                }
                continue;
            }
            if inbound.eof {
                return self.on_end_of_stream(key);
            }
            if drained {
                return Ok(());
            }
            match inbound.fill(&conn.shared.stream, now)? {
                Filled::Bytes { drained: d } => {
                    drained = d && bytes_only;
                    now = now_nanos();
                    conn.shared.read.note_read(now)
                }
                Filled::Eof => inbound.eof = true,
                Filled::WouldBlock => return Ok(()),
            }
        }
    }

    /// The peer finished sending (a half-close, as in its graceful
    /// shutdown). Replies to what it sent are still owed: flush them, then
    /// close.
    fn on_end_of_stream(&mut self, key: usize) -> Result<()> {
        let drain_time = self.drain_time();
        let entry = &mut self.conns[key];
        if entry.handshaking {
            return Err(HandshakeError::PeerClosed.into());
        }
        if entry.read_closed {
            return Ok(());
        }
        entry.read_closed = true;
        if entry.draining.is_none() {
            entry.draining = Some(Instant::now() + drain_time);
        }
        self.dirty.push(key);
        Ok(())
    }

    /// Runs the handshake, then dispatches what a caller-thread reader left
    /// and the complete frames in the receive buffer, one at a time, while
    /// the connection's queued output stays within `max_queued_bytes`.
    /// Returns `false` if it stopped at the budget: the queue was flushed
    /// and, if the socket would not take it, reading is paused (see
    /// [`Reactor::flush`]); the rest of the frames wait in the buffer.
    fn process(
        &mut self,
        key: usize,
        conn: &Connection,
        inbound: &mut ConnCore,
        now: u64,
    ) -> Result<bool> {
        if let ReadPhase::Handshaking { handshake, out } = &mut inbound.phase {
            let rb = &mut inbound.rbuf;
            if rb.end > rb.start {
                let used = handshake.read_input(rb.unconsumed())?;
                rb.start += used;
            }
            out.clear();
            handshake.write_output(out);
            if !out.is_empty() {
                write_handshake(conn, out)?;
            }
            match handshake.take_session() {
                Some(Session {
                    sealer,
                    opener,
                    peer_identity,
                    ..
                }) => {
                    conn.set_peer_identity(peer_identity);
                    conn.install_sealer(sealer);
                    inbound.phase = ReadPhase::Open { opener };
                    self.conns[key].handshaking = false;
                    let handler = self.conns[key].handler.clone();
                    guard_handler(|| handler.on_open(conn))?;
                }
                None => return Ok(true),
            }
        }
        let stats = &self.shared.stats;
        let handler = &*self.conns[key].handler;
        let mut dispatched = false;
        let mut served = Served::Nothing;
        // Replies made here queue without waiting for room (this thread is
        // the one that would drain the queue), so the budget is checked
        // after each one: a peer that pipelines requests and never reads
        // the replies makes the server hold at most one reply past it.
        let mut within_budget = true;
        match inbound.held.take() {
            None => {}
            Some(Held::Failed(e)) => return Err(e),
            Some(Held::Frame { seq, len }) => {
                // Counted in the stats by the caller that opened it.
                let result = dispatch(conn, handler, seq, inbound.payload(len), stats);
                inbound.consume(len);
                dispatched = true;
                let what = result?;
                served = served.max(what);
                within_budget = what != Served::Requests || !conn.over_budget();
            }
        }
        let (mut frames, mut bytes) = (0u64, 0u64);
        let result = loop {
            if !within_budget {
                break Ok(());
            }
            match inbound.open_next(now) {
                Ok(Some((seq, len))) => {
                    frames += 1;
                    bytes += len as u64;
                    let result = dispatch(conn, handler, seq, inbound.payload(len), stats);
                    inbound.consume(len);
                    match result {
                        Ok(what) => {
                            served = served.max(what);
                            within_budget = what != Served::Requests || !conn.over_budget();
                        }
                        Err(e) => break Err(e),
                    }
                }
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        if frames > 0 {
            Counters::add(&stats.frames_in, frames);
            Counters::add(&stats.bytes_in, bytes);
        }
        self.served = self.served.max(served);
        result?;
        if !within_budget {
            self.flush(key);
            return Ok(false);
        }
        if frames > 0 || dispatched {
            self.dirty.push(key);
        }
        Ok(true)
    }

    fn on_writable(&mut self, key: usize) {
        self.flush(key);
    }

    fn flush(&mut self, key: usize) {
        let entry = &mut self.conns[key];
        let limit = self.config.max_queued_bytes;
        match entry.conn.flush_from_reactor() {
            Flushed::Blocked(queued) => {
                if queued > limit && !entry.read_paused {
                    // The peer sends requests faster than it reads the
                    // replies: stop reading it until its replies drain, so
                    // what it makes us queue stays bounded.
                    entry.read_paused = true;
                    Counters::inc(&self.shared.stats.reads_paused);
                }
                if !entry.writable {
                    entry.writable = true;
                    if let Err(e) = entry.conn.set_write_interest(true) {
                        self.close(key, e.into());
                        return;
                    }
                }
            }
            Flushed::Busy(queued) if queued > limit => {
                // Another thread is writing a queue past the budget: pause
                // as if blocked; that writer hands the queue back to this
                // reactor when it is done (`reactor_waits`), and the flush
                // that follows resumes reading.
                if !entry.read_paused {
                    entry.read_paused = true;
                    Counters::inc(&self.shared.stats.reads_paused);
                }
            }
            Flushed::Empty | Flushed::Busy(_) => {
                if entry.read_paused {
                    entry.read_paused = false;
                    self.resume.push(key);
                }
                if entry.writable {
                    entry.writable = false;
                    let _ = entry.conn.set_write_interest(false);
                }
            }
            Flushed::Closed => {}
        }
        self.after_io(key);
    }

    fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            if self.conns.contains(key) {
                self.flush(key);
            }
        }
        self.dirty = dirty;
    }

    /// Advances a graceful close once output has drained.
    fn after_io(&mut self, key: usize) {
        let Some(entry) = self.conns.get_mut(key) else {
            return;
        };
        if entry.draining.is_none() {
            return;
        }
        if !entry.write_shut {
            if !entry.conn.seal_off_if_drained() {
                return;
            }
            entry.write_shut = true;
            let _ = entry.conn.shared.stream.shutdown(std::net::Shutdown::Write);
        }
        if entry.read_closed || entry.handshaking {
            let reason = if entry.local_close {
                Error::Closed
            } else {
                Error::PeerClosed
            };
            self.close(key, reason);
        }
    }

    /// How long a graceful close may take to flush and hear the peer's end.
    fn drain_time(&self) -> Duration {
        self.config.write_timeout.unwrap_or(Duration::from_secs(5))
    }

    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        let deadline = Instant::now() + self.drain_time();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let entry = &mut self.conns[key];
            entry.local_close = true;
            entry.draining.get_or_insert(deadline);
            self.flush(key);
        }
    }

    /// Closes connections whose deadlines passed. The graceful-close and
    /// write deadlines are the reactor's; the peer's (handshake, read,
    /// frame) are the core's, asked under the read turn (a caller holding
    /// the turn asks them itself). Gives an idle connection's buffers back.
    fn sweep(&mut self) {
        let now = Instant::now();
        let now_nanos = now_nanos();
        let mut expired = Vec::new();
        for (key, entry) in self.conns.iter_mut() {
            if let Some(deadline) = entry.draining {
                if now >= deadline {
                    expired.push((key, Error::Closed));
                    continue;
                }
            }
            let last_read = entry.conn.shared.read.last_read();
            let (written, pending) = entry.conn.write_progress();
            let active = (written, last_read) != (entry.activity.0, entry.activity.1);
            if active {
                entry.activity = (written, last_read, now);
                entry.buffers_released = false;
            }
            let release = !active
                && !entry.buffers_released
                && now.duration_since(entry.activity.2) >= IDLE_RELEASE;
            // While reading is paused the silence is ours, and the write
            // timeout judges the peer.
            let paused = entry.read_paused || entry.draining.is_some();
            let timeout = entry
                .conn
                .with_idle_core(|core| {
                    if release {
                        core.release_buffer_if_empty();
                    }
                    core.expired(now_nanos, paused)
                })
                .flatten();
            if release {
                entry.conn.release_idle_out_buffers();
                entry.buffers_released = true;
            }
            if let Some(kind) = timeout {
                expired.push((key, Error::Timeout(kind)));
                continue;
            }
            if !pending || written != entry.write_watch.0 {
                entry.write_watch = (written, now);
            } else if let Some(t) = self.config.write_timeout {
                if now.duration_since(entry.write_watch.1) >= t {
                    expired.push((key, Error::Timeout(TimeoutKind::Write)));
                }
            }
        }
        for (key, err) in expired {
            self.close(key, err);
        }
    }

    /// Removes a connection: deregisters it, fails what waits on it and
    /// tells the handler.
    fn close(&mut self, key: usize, err: Error) {
        let Some(entry) = self.conns.try_remove(key) else {
            return;
        };
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        self.shared.stats.count_close(&err, entry.handshaking);
        let fd = entry.conn.shared.stream.as_raw_fd();
        let _ = self.shared.registry.deregister(&mut SourceFd(&fd));
        entry.conn.finish_close(&err);
        let handler = entry.handler.clone();
        let conn = entry.conn.clone();
        let _ = guard_handler(|| match entry.handshaking {
            false => handler.on_close(&conn, &err),
            true => handler.on_handshake_failed(conn.peer_addr(), &err),
        });
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, Error::Closed);
        }
        // Refuse every later command and settle the ones already queued:
        // a connection left in the mailbox would keep this reactor's shared
        // half, and itself, alive forever.
        let mut left = Vec::new();
        self.shared.mailbox.close(&mut left);
        for cmd in left {
            settle_after_stop(cmd, &self.shared.stats);
        }
    }
}

/// What a command means once its reactor is gone: a connection handed over
/// or to be closed is closed; nothing else needs doing.
fn settle_after_stop(cmd: Command, stats: &Counters) {
    match cmd {
        Command::Add { conn, .. } => {
            stats.uncount_open();
            conn.finish_close(&Error::Closed);
        }
        Command::Close(conn) => {
            let reason = conn.close_reason().unwrap_or(Error::Closed);
            conn.finish_close(&reason);
        }
        Command::Flush(_) | Command::Read(_) | Command::Stop => {}
    }
}

/// Writes handshake output on a fresh non-blocking socket. Handshake
/// messages are small; a socket that cannot take them is treated as dead.
fn write_handshake(conn: &Connection, out: &[u8]) -> Result<()> {
    let mut stream = &conn.shared.stream;
    let mut at = 0;
    let mut spins = 0;
    while at < out.len() {
        match stream.write(&out[at..]) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero).into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && spins < 1000 => {
                spins += 1;
                std::thread::yield_now();
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Calls the handler for one message; a response to one of our requests
/// goes to its completion slot instead. Says which it was, and whether the
/// handler replied at once (a peer is waiting on this side).
fn dispatch(
    conn: &Connection,
    handler: &dyn Handler,
    seq: u32,
    payload: &[u8],
    stats: &Counters,
) -> Result<Served> {
    // A response to one of our requests? Unknown or late ones are dropped:
    // they can never reach another request's slot.
    if let Some(delivered) = conn.deliver_response(seq, payload) {
        if !delivered {
            Counters::inc(&stats.responses_dropped);
        }
        return Ok(Served::Nothing);
    }
    let mut ctx = Context {
        conn,
        seq,
        body: payload,
        replied: false,
    };
    guard_handler(|| handler.on_message(&mut ctx))?;
    Ok(if ctx.replied {
        Served::Requests
    } else {
        Served::Messages
    })
}

/// Runs handler code; a panic closes the connection instead of killing the
/// reactor thread and every other connection on it.
fn guard_handler(f: impl FnOnce()) -> Result<()> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|_| Error::HandlerPanicked)
}
