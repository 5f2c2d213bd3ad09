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

mod dispatch;
mod entry;
mod handle;
mod listen;

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use slab::Slab;

use crate::clock::{instant_after, nanos_at, now_nanos};
use crate::config::Config;
use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::handler::{guard_handler, Handler};
use crate::outbound::OUTBOUND_BUFFER;
use crate::protocol::connection::{nanos, Phase};
use crate::stats::Counters;
use crate::sync::buffers::BufferPool;
use crate::sync::mailbox::Mailbox;
use crate::sync::timers::Timers;
use crate::sync::{AtomicBool, AtomicUsize, Ordering};
use crate::waiting::MESSAGE_POLL_INTERVAL;

use dispatch::Served;
use entry::Entry;
pub use handle::ReactorHandle;
pub(crate) use handle::{current_reactor, on_reactor_thread, ReactorShared};
use handle::{settle_after_stop, Command, RunningGuard};
pub(crate) use listen::Gate;

const WAKER: Token = Token(usize::MAX - 1);
/// The sweep timer's token (see [`crate::sys::SweepTimer`]).
const SWEEP: Token = Token(usize::MAX - 3);

/// The longest interval between a reactor's sweeps of its connections'
/// deadlines.
const MAX_TICK: Duration = Duration::from_millis(250);

/// How often at most a reactor asks the allocator to return freed memory.
const TRIM_INTERVAL: Duration = Duration::from_secs(5);

/// Buffers of each kind a reactor keeps for its connections to borrow
/// once they gave them back; more are freed.
const POOLED_BUFFERS: usize = 64;

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
    /// Connections that used up a turn's reads with bytes perhaps left
    /// (see `FILLS_PER_TURN`): read again next turn, which does not sleep.
    read_next_turn: Vec<usize>,
    /// `read_next_turn` as it was when this turn began (its capacity kept).
    read_this_turn: Vec<usize>,
    /// Connections whose flush used up a turn's write rounds with the
    /// socket still taking bytes: flushed again next turn, which does not
    /// sleep (no WRITABLE edge would announce them).
    flush_next_turn: Vec<usize>,
    /// `flush_next_turn` as it was when this turn began.
    flush_this_turn: Vec<usize>,
    config: Arc<Config>,
    /// The sweep's interval: an eighth of the shortest deadline a
    /// connection may be held to, within 5 to 250 ms...
    tick: Duration,
    /// ...and while a connection drains, an eighth of the drain timeout
    /// too: the only deadline kept only while connections drain, so that a
    /// short one does not make an idle reactor sweep every few
    /// milliseconds for its whole life.
    drain_tick: Duration,
    next_sweep: Instant,
    /// Fires at `next_sweep`, so that a reactor with nothing sooner to do
    /// sleeps with no timeout (none where the system has no timer
    /// descriptors, or it failed: then the wait's timeout is the sweep).
    sweep_timer: Option<crate::sys::SweepTimer>,
    stopping: bool,
    /// Buffers were given back since the last trim of freed memory...
    trim_pending: bool,
    /// ...which may run again from then.
    next_trim: Instant,
    /// What this turn's handlers were given: the busy-poll that follows
    /// (see [`Waiting`](crate::Waiting)) depends on it.
    served: Served,
    /// Poll without sleeping until then...
    busy_until: Option<Instant>,
    /// ...this long apart (zero: back to back).
    busy_interval: Duration,
    last_poll: Instant,
    /// The listener this reactor accepts from, if it serves one.
    listener: Option<listen::Listener>,
}

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
        let sweep_timer = crate::sys::SweepTimer::new().ok().filter(|t| {
            poll.registry()
                .register(&mut SourceFd(&t.as_raw_fd()), SWEEP, Interest::READABLE)
                .is_ok()
        });
        let eighth = |t: Option<Duration>| {
            t.map_or(MAX_TICK, |t| t / 8)
                .clamp(Duration::from_millis(5), MAX_TICK)
        };
        let tick = [
            config.handshake_timeout,
            config.read_timeout,
            config.frame_timeout,
            config.write_timeout,
        ]
        .into_iter()
        .map(eighth)
        .min()
        .unwrap_or(MAX_TICK);
        let drain_tick = tick.min(eighth(Some(config.drain_timeout)));
        let mut reactor = Reactor {
            poll,
            events: Events::with_capacity(1024),
            shared: Arc::new(ReactorShared {
                mailbox: Mailbox::new(),
                waker,
                registry,
                recv_buffers: BufferPool::new(config.read_buffer_size.max(64), POOLED_BUFFERS),
                send_buffers: BufferPool::new(OUTBOUND_BUFFER, POOLED_BUFFERS),
                stopped: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
                config: config.clone(),
                stats: Counters::default(),
                timers: Timers::new(),
            }),
            conns: Slab::new(),
            commands: Vec::new(),
            // Sized up front: a first use in the middle of steady traffic
            // (say, the first connection whose reading resumes) must not
            // allocate. More than this at once grows them, once.
            dirty: Vec::with_capacity(64),
            resume: Vec::with_capacity(64),
            read_next_turn: Vec::with_capacity(64),
            flush_next_turn: Vec::with_capacity(64),
            read_this_turn: Vec::with_capacity(64),
            flush_this_turn: Vec::with_capacity(64),
            config,
            tick,
            drain_tick,
            next_sweep: Instant::now() + tick,
            sweep_timer,
            stopping: false,
            trim_pending: false,
            next_trim: Instant::now(),
            served: Served::Nothing,
            busy_until: None,
            busy_interval: Duration::ZERO,
            last_poll: Instant::now(),
            listener: None,
        };
        reactor.arm_sweep_timer(tick);
        Ok(reactor)
    }

    /// Has the next sweep come `within` from now at the latest: a
    /// connection began to drain, and its drain deadline may be nearer
    /// than the sweep.
    fn sweep_within(&mut self, within: Duration) {
        let at = Instant::now() + within;
        if at < self.next_sweep {
            self.next_sweep = at;
            self.arm_sweep_timer(within);
        }
    }

    /// Sets the sweep timer to fire `after` from now. If it fails, the
    /// reactor goes back to waits with a timeout.
    fn arm_sweep_timer(&mut self, after: Duration) {
        if let Some(timer) = &self.sweep_timer {
            if timer.arm(after).is_err() {
                self.sweep_timer = None;
            }
        }
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
        let sweep_wait = self.next_sweep.saturating_duration_since(now);
        let mut wait = sweep_wait;
        if let Some(t) = timeout {
            wait = wait.min(t);
        }
        if let Some(at) = self.listener.as_ref().and_then(|l| l.resume_at()) {
            wait = wait.min(at.saturating_duration_since(now));
        }
        let busy = self.busy_until.is_some_and(|until| now < until);
        let polled = if busy {
            // Awake as far as producers can tell, so their commands need no
            // wake-up either; give the core to anyone else who wants it.
            // Back to back after requests (yielding the core between
            // polls); after one-way messages, asleep between polls, but
            // not in epoll: bytes arriving meanwhile cost their sender no
            // wake-up, and the next poll reads them as one batch.
            // (Not while connections wait to be read on or flushed from
            // the last turn: they have work now.)
            let mut now = Instant::now();
            if self.read_next_turn.is_empty() && self.flush_next_turn.is_empty() {
                crate::sync::contention::yield_now();
                let next = self.last_poll + self.busy_interval;
                now = Instant::now();
                if now < next {
                    std::thread::sleep(next - now);
                    now = Instant::now();
                }
            }
            self.last_poll = now;
            self.poll.poll(&mut self.events, Some(Duration::ZERO))
        } else {
            // Connections left to read or flush from the last turn (or
            // resumed after its reads): look for events without sleeping.
            if !self.read_next_turn.is_empty()
                || !self.flush_next_turn.is_empty()
                || !self.resume.is_empty()
                || !self.shared.mailbox.prepare_sleep()
            {
                wait = Duration::ZERO;
            }
            // An async call's deadline may come before the next sweep.
            let now_ns = nanos_at(now);
            let until = now_ns.saturating_add(nanos(wait));
            if let Some(at) = self.shared.timers.sleeping_until(until) {
                wait = wait.min(Duration::from_nanos(at.saturating_sub(now_ns)));
            }
            // Nothing sooner than the sweep: its timer wakes the reactor,
            // and the wait needs no timeout of its own.
            let by_timer = wait == sweep_wait && !wait.is_zero() && self.sweep_timer.is_some();
            let polled = self
                .poll
                .poll(&mut self.events, (!by_timer).then_some(wait));
            self.shared.timers.awake();
            self.shared.mailbox.awake();
            // Woken by readiness or a command, not by the sweep's timer.
            let woken = self.events.iter().any(|e| e.token() != SWEEP);
            if !wait.is_zero() && woken {
                Counters::inc(&self.shared.stats.reactor_wakeups);
            }
            polled
        };
        match polled {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
        self.run_commands();
        std::mem::swap(&mut self.read_next_turn, &mut self.read_this_turn);
        std::mem::swap(&mut self.flush_next_turn, &mut self.flush_this_turn);
        let events = std::mem::replace(&mut self.events, Events::with_capacity(0));
        let mut accepted = false;
        let mut sweep_fired = false;
        for event in events.iter() {
            let token = event.token();
            if token == WAKER {
                continue;
            }
            if token == SWEEP {
                sweep_fired = true;
                continue;
            }
            if token == listen::LISTENER {
                self.accept_batch();
                accepted = true;
                continue;
            }
            let key = token.0;
            if !self.conns.contains(key) {
                continue;
            }
            // A connection waiting to be read on from the last turn is read
            // below, to the end of the socket or of its fills: not twice.
            let queued = self.conns[key].read_queued;
            if !queued && (event.is_readable() || event.is_read_closed() || event.is_error()) {
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
        // A batch left over from an earlier turn, or the end of a pause:
        // one batch per turn, between the connections' own events.
        if !accepted
            && self
                .listener
                .as_ref()
                .and_then(|l| l.resume_at())
                .is_some_and(|at| Instant::now() >= at)
        {
            self.accept_batch();
        }
        self.flush_dirty();
        // After every connection's own events and the replies they made:
        // those the last turn left unread (their bytes announce themselves
        // no more, edge-triggered).
        if !self.read_this_turn.is_empty() {
            while let Some(key) = self.read_this_turn.pop() {
                if let Some(entry) = self.conns.get_mut(key) {
                    entry.read_queued = false;
                    self.on_readable(key, false);
                }
            }
            self.flush_dirty();
        }
        // And those whose flush the last turn cut short.
        while let Some(key) = self.flush_this_turn.pop() {
            if let Some(entry) = self.conns.get_mut(key) {
                entry.flush_queued = false;
                self.flush(key);
            }
        }
        // One clock reading for the rest of the turn: the waking time, the
        // timers, the sweep (read again if resumed reads ran handlers).
        let mut now = Instant::now();
        match std::mem::replace(&mut self.served, Served::Nothing) {
            Served::Nothing => {}
            served => {
                // How long to stay awake, and how: see `Waiting`.
                let waiting = self.config.waiting;
                let tight = served >= Served::TaskResponses
                    || (self.busy_until.is_some_and(|until| now < until)
                        && self.busy_interval.is_zero());
                let (interval, time) = if tight {
                    (Duration::ZERO, waiting.reactor_after_requests())
                } else {
                    (MESSAGE_POLL_INTERVAL, waiting.reactor_after_messages())
                };
                self.busy_interval = interval;
                self.busy_until = time.map(|d| instant_after(now, d));
            }
        }
        // Edge-triggered: bytes that arrived while reading was paused are
        // announced no more, so resumed connections are read now.
        if !self.resume.is_empty() {
            while let Some(key) = self.resume.pop() {
                if self.conns.contains(key) {
                    self.on_readable(key, false);
                }
            }
            // The replies those reads made: nothing else would write them
            // before the reactor's next wake-up.
            self.flush_dirty();
            now = Instant::now();
        }
        self.shared.timers.fire(nanos_at(now));
        if sweep_fired {
            if let Some(timer) = &self.sweep_timer {
                timer.clear();
            }
        }
        if now >= self.next_sweep {
            let tick = if self.sweep() {
                self.drain_tick
            } else {
                self.tick
            };
            self.next_sweep = Instant::now() + tick;
            self.arm_sweep_timer(tick);
        } else if sweep_fired {
            // Early (it should not be: it was set after `next_sweep`):
            // wait for the rest.
            self.arm_sweep_timer(self.next_sweep - now);
        }
        if self.stopping && self.conns.is_empty() {
            self.shared.stopped.store(true, Ordering::Release);
            self.close_mailbox();
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
                Command::Listen(listener) => self.listen(listener),
            }
        }
        self.commands = commands;
    }

    /// Starts accepting from a listener registered for this reactor, and
    /// takes what already waits.
    fn listen(&mut self, listener: listen::Listener) {
        if self.stopping || self.listener.is_some() {
            listener.deregister(&self.shared.registry);
            return;
        }
        self.listener = Some(listener);
        self.accept_batch();
    }

    /// Accepts what the listener holds, up to a batch.
    fn accept_batch(&mut self) {
        if let Some(listener) = &mut self.listener {
            listener.accept(Instant::now());
        }
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
            let reason = conn.close_reason().unwrap_or(Error::Closed);
            close_unadded(&conn, &*handler, handshaking, &reason);
            return;
        }
        let now = now_nanos();
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
            let reason = conn.close_reason().unwrap_or_else(|| Error::from(e));
            close_unadded(&conn, &*handler, handshaking, &reason);
            return;
        }
        conn.shared.token.store(key, Ordering::Release);
        // Closed on its way here (a dialled connection, after its
        // `on_open`): its Close command came first and found no
        // connection. Closed now, with its own reason, as that command
        // would have (its socket, shut down, would read as the peer's
        // end).
        let closed = conn.close_reason();
        entry.insert(Entry::new(conn, handler, handshaking, &self.config, now));
        if let Some(reason) = closed {
            self.close(key, reason);
            return;
        }
        // Server handshakes may owe output before any input (custom ones),
        // and bytes read past a dialled handshake must be processed: one
        // pass now.
        self.on_readable(key, false);
        // A dialled connection's `on_open` ran before this reactor had it:
        // what it queued asked for a flush that found no connection (and
        // the queue still counts on this reactor to write it).
        if self.conns.contains(key) {
            self.flush(key);
        }
    }

    fn begin_stop(&mut self) {
        if self.stopping {
            return;
        }
        self.stopping = true;
        if let Some(listener) = self.listener.take() {
            listener.deregister(&self.shared.registry);
        }
        let now = now_nanos();
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            let entry = &mut self.conns[key];
            entry.close_locally(now);
            self.flush(key);
        }
        self.sweep_within(self.drain_tick);
    }

    /// Closes connections whose deadlines passed (see [`Entry::sweep`]).
    /// Returns whether a connection still drains.
    fn sweep(&mut self) -> bool {
        let now = Instant::now();
        let now_nanos = now_nanos();
        let mut released = false;
        let expired: Vec<(usize, Error)> = self
            .conns
            .iter_mut()
            .filter_map(|(key, entry)| entry.sweep(now_nanos, &mut released).map(|err| (key, err)))
            .collect();
        for (key, err) in expired {
            self.close(key, err);
        }
        let draining = self
            .conns
            .iter()
            .any(|(_, entry)| entry.life().phase() == Phase::Draining);
        // Connections went idle and gave their buffers back: once the
        // burst is over (nothing given back for a sweep), the freed memory
        // goes back to the OS, at most every few seconds.
        if released {
            self.trim_pending = true;
        } else if self.trim_pending && now >= self.next_trim {
            self.trim_pending = false;
            self.next_trim = now + TRIM_INTERVAL;
            crate::sys::return_free_memory();
        }
        draining
    }

    /// Refuses every later command and settles the ones already queued:
    /// connections handed over after the stop are closed here (a dialled
    /// one's handler told: its `on_open` ran).
    fn close_mailbox(&self) {
        let mut left = Vec::new();
        self.shared.mailbox.close(&mut left);
        for cmd in left {
            match cmd {
                Command::Add {
                    conn,
                    handler,
                    handshaking,
                } => {
                    self.shared.connections.fetch_sub(1, Ordering::Relaxed);
                    self.shared.stats.uncount_open();
                    let reason = conn.close_reason().unwrap_or(Error::Closed);
                    close_unadded(&conn, &*handler, handshaking, &reason);
                }
                cmd => settle_after_stop(cmd, &self.shared.stats),
            }
        }
    }

    /// Removes a connection: deregisters it, fails what waits on it and
    /// tells the handler.
    fn close(&mut self, key: usize, err: Error) {
        let Some(entry) = self.conns.try_remove(key) else {
            return;
        };
        self.shared.connections.fetch_sub(1, Ordering::Relaxed);
        self.shared
            .stats
            .count_close(&err, entry.life().is_handshaking());
        let fd = entry.conn.shared.stream.as_raw_fd();
        let _ = self.shared.registry.deregister(&mut SourceFd(&fd));
        entry.conn.finish_close(&err);
        let conn = &entry.conn;
        crate::events::closed(
            conn.id(),
            conn.peer_addr(),
            &err,
            entry.life().is_handshaking(),
        );
        let handler = entry.handler.clone();
        let conn = entry.conn.clone();
        let _ = guard_handler(|| match entry.life().is_handshaking() {
            false => handler.on_close(&conn, &err),
            true => handler.on_handshake_failed(conn.peer_addr(), &err),
        });
    }
}

/// Closes a connection handed to a reactor that could not take it (it
/// stops, or the socket would not register), with `reason` (its own, if
/// it was closed on its way). A dialled one's `on_open` ran on the
/// dialling thread, which handed it on as open: its `on_close` follows
/// here. A server's never got past its handshake: nothing was told of
/// it. The stats take back its opening (as for a connection refused at
/// the hand-over) rather than count a close.
fn close_unadded(conn: &Connection, handler: &dyn Handler, handshaking: bool, reason: &Error) {
    conn.finish_close(reason);
    if !handshaking {
        crate::events::closed(conn.id(), conn.peer_addr(), reason, false);
        let _ = guard_handler(|| handler.on_close(conn, reason));
    }
}

impl Drop for Reactor {
    fn drop(&mut self) {
        self.shared.stopped.store(true, Ordering::Release);
        let keys: Vec<usize> = self.conns.iter().map(|(k, _)| k).collect();
        for key in keys {
            self.close(key, Error::Closed);
        }
        // A connection left in the mailbox would keep this reactor's shared
        // half, and itself, alive forever.
        self.close_mailbox();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use super::Reactor;
    use crate::{Config, Context};

    /// A reactor whose sweep timer could not be made or set sweeps all the
    /// same, on `epoll_wait` timeouts: a connection that never starts its
    /// handshake is closed at its deadline, not left open forever by a
    /// reactor asleep with no timeout.
    #[test]
    fn without_its_sweep_timer_a_reactor_still_sweeps() {
        let config = Config::server().handshake_timeout(Some(Duration::from_millis(60)));
        let mut reactor = Reactor::new(config).unwrap();
        // What a failed `timerfd_create` or `timerfd_settime` leaves.
        reactor.sweep_timer = None;
        let handle = reactor.handle();
        let driver = std::thread::spawn(move || reactor.run());

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut silent = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let handler = Arc::new(|_: &mut Context<'_>| {});
        handle.accept(accepted, handler).unwrap();

        let started = Instant::now();
        silent
            .set_read_timeout(Some(Duration::from_secs(3)))
            .unwrap();
        let read = silent.read(&mut [0; 64]);
        let waited = started.elapsed();
        assert!(
            matches!(read, Ok(0)),
            "the silent connection was not closed after {waited:?}: {read:?}"
        );
        assert!(
            waited < Duration::from_secs(2),
            "closed only after {waited:?}"
        );
        assert_eq!(handle.stats().closed_handshake_timeout, 1);

        handle.stop();
        driver.join().unwrap().unwrap();
    }

    /// Notes the reasons its connections closed with.
    struct NotesCloses(std::sync::Mutex<Vec<String>>);

    impl crate::Handler for NotesCloses {
        fn on_message(&self, _: &mut Context<'_>) {}
        fn on_close(&self, _: &crate::Connection, reason: &crate::Error) {
            self.0.lock().unwrap().push(format!("{reason:?}"));
        }
    }

    /// A dialled connection (its `on_open` run) over loopback, driven by
    /// `handle`'s reactor once added, and its peer's socket.
    fn dialled_connection(
        handle: &crate::ReactorHandle,
        config: &Config,
    ) -> (crate::Connection, TcpStream) {
        use crate::conn::{Connection, NewConnParts};
        use crate::conn_socket::ConnSocket;
        use crate::protocol::connection::{ConnCore, ReadPhase};
        use crate::protocol::{Opener, Profile, Role, Sealer};

        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let key = [5u8; 32];
        let conn = Connection::new(NewConnParts {
            id: crate::sync::next_conn_id(),
            role: Role::Client,
            peer_addr: ours.peer_addr().ok(),
            stream: ConnSocket::new(ours),
            sealer: Some(Sealer::new(key, Profile::Secure)),
            config: Arc::new(config.clone()),
            driver: handle.shared.clone(),
            release: None,
            core: ConnCore::new(
                ReadPhase::Open {
                    opener: Opener::new(key, Profile::Secure),
                },
                Role::Client,
                config.core_limits(),
                &[],
                crate::clock::now_nanos(),
            ),
        });
        (conn, theirs)
    }

    /// A dialled connection handed to a reactor that is stopping (its
    /// Stop command came first): its `on_open` ran, so its `on_close`
    /// must follow. The reactor closed it without telling the handler.
    #[test]
    fn a_dialled_connection_added_as_the_reactor_stops_is_told_of_its_close() {
        let config = Config::default();
        let reactor = Reactor::new(config.clone()).unwrap();
        let handle = reactor.handle();
        let (conn, _theirs) = dialled_connection(&handle, &config);
        let closes = Arc::new(NotesCloses(std::sync::Mutex::default()));
        // Both commands wait in the mailbox until the reactor runs.
        handle.stop();
        handle.add(conn, closes.clone(), false).unwrap();
        std::thread::spawn(move || reactor.run())
            .join()
            .unwrap()
            .unwrap();
        assert_eq!(*closes.0.lock().unwrap(), ["Closed"]);
        assert_eq!(handle.stats().connections_open, 0);
    }

    /// What the handler of a dialled connection left in the mailbox of a
    /// reactor dropped without ever running heard, after `on_its_way` did
    /// what it does to the connection first; and the connections the
    /// reactor's stats count open then.
    fn closes_heard_in_a_dropped_reactor(
        on_its_way: impl FnOnce(&crate::Connection),
    ) -> (Vec<String>, u64) {
        let config = Config::default();
        let reactor = Reactor::new(config.clone()).unwrap();
        let handle = reactor.handle();
        let (conn, _theirs) = dialled_connection(&handle, &config);
        let closes = Arc::new(NotesCloses(std::sync::Mutex::default()));
        on_its_way(&conn);
        handle.add(conn, closes.clone(), false).unwrap();
        drop(reactor);
        let heard = closes.0.lock().unwrap().clone();
        (heard, handle.stats().connections_open)
    }

    /// As above, the reactor dropped without ever running: the connection
    /// left in its mailbox is closed, and its handler told.
    #[test]
    fn a_dialled_connection_left_in_a_dropped_reactors_mailbox_is_told_of_its_close() {
        let (heard, open) = closes_heard_in_a_dropped_reactor(|_| {});
        assert_eq!((heard, open), (vec!["Closed".to_string()], 0));
    }

    /// As above, the connection failed on its way (a write timed out):
    /// its handler hears that reason, not a bare close.
    #[test]
    fn a_dialled_connection_failed_on_its_way_to_a_dropped_reactor_keeps_its_reason() {
        let (heard, open) = closes_heard_in_a_dropped_reactor(|conn| {
            conn.fail(crate::Error::Timeout(crate::TimeoutKind::Write));
        });
        assert_eq!((heard, open), (vec!["Timeout(Write)".to_string()], 0));
    }

    /// A dialled connection closed after its `on_open` and before its
    /// reactor takes it: the Close command comes first and finds no
    /// connection, then the connection is added. It stayed until the shut
    /// socket's end of stream closed it as the peer's doing
    /// (`PeerClosed`, counted as closed by the peer); it is now closed as
    /// it is added, with its own reason.
    #[test]
    fn a_connection_closed_before_its_reactor_takes_it_closes_with_its_reason() {
        let config = Config::default();
        let reactor = Reactor::new(config.clone()).unwrap();
        let handle = reactor.handle();
        let driver = std::thread::spawn(move || reactor.run());
        let (conn, _theirs) = dialled_connection(&handle, &config);
        let closes = Arc::new(NotesCloses(std::sync::Mutex::default()));
        // Its Close command first, then the Add, as in the window.
        conn.close();
        handle.add(conn, closes.clone(), false).unwrap();

        let started = Instant::now();
        while closes.0.lock().unwrap().is_empty() && started.elapsed() < Duration::from_secs(3) {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(*closes.0.lock().unwrap(), ["Closed"]);
        let stats = handle.stats();
        assert_eq!(
            (
                stats.closed_local,
                stats.closed_by_peer,
                stats.connections_open
            ),
            (1, 0, 0)
        );

        handle.stop();
        driver.join().unwrap().unwrap();
    }
}
