//! The half of a reactor that other threads share: the commands they send
//! it (through a mailbox that wakes it only when it is not already going
//! to look), the [`Driver`] its connections reach it through, and the
//! public [`ReactorHandle`].

use std::io;
use std::sync::Arc;

use mio::{Registry, Waker};

use crate::clock::now_nanos;
use crate::clock::CallDeadline;
use crate::config::Config;
use crate::conn::{Ask, Connection, Driver, NewConnParts, ReactorId, ReleaseHook};
use crate::conn_socket::ConnSocket;
use crate::error::{DialPhase, Error, Result};
use crate::handler::{guard_handler, Handler};
use crate::protocol::connection::{ConnCore, ReadPhase};
use crate::protocol::{guard_handshake, Role};
use crate::stats::{Counters, Stats};
use crate::sync::buffers::BufferPool;
use crate::sync::mailbox::{Mailbox, PushError};
use crate::sync::timers::Timers;
use crate::sync::{AtomicBool, AtomicUsize, Ordering};

thread_local! {
    /// The reactor (its shared half's address) this thread is running, or 0.
    static CURRENT_REACTOR: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Whether this thread runs a reactor (a handler's call, say).
pub(crate) fn on_reactor_thread() -> bool {
    current_reactor() != ReactorId::NONE
}

/// The reactor this thread runs, if any ([`ReactorId::NONE`]).
pub(crate) fn current_reactor() -> ReactorId {
    ReactorId(CURRENT_REACTOR.with(|c| c.get()))
}

/// Marks the thread as running a reactor for as long as it lives.
pub(super) struct RunningGuard(usize);

impl RunningGuard {
    pub(super) fn enter(reactor: &Arc<ReactorShared>) -> RunningGuard {
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
    /// Accept from this listener too, already registered (see
    /// [`super::listen`]).
    Listen(super::listen::Listener),
}

/// The part of a reactor other threads share.
pub(crate) struct ReactorShared {
    pub(super) mailbox: Mailbox<Command>,
    pub(super) waker: Waker,
    pub(super) registry: Registry,
    /// Receive buffers lent to this reactor's connections.
    pub(super) recv_buffers: BufferPool,
    /// Output buffers lent to this reactor's connections.
    pub(super) send_buffers: BufferPool,
    pub(super) stopped: AtomicBool,
    pub(super) connections: AtomicUsize,
    pub(super) config: Arc<Config>,
    pub(crate) stats: Counters,
    /// The deadlines of async calls on this reactor's connections.
    pub(super) timers: Timers,
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
        current_reactor() == self.reactor_id()
    }

    fn reactor_id(&self) -> ReactorId {
        ReactorId(self as *const ReactorShared as usize)
    }

    fn stats(&self) -> &Counters {
        &self.stats
    }

    fn registry(&self) -> &Registry {
        &self.registry
    }

    fn recv_buffers(&self) -> &BufferPool {
        &self.recv_buffers
    }

    fn send_buffers(&self) -> &BufferPool {
        &self.send_buffers
    }

    fn timers(&self) -> &Timers {
        &self.timers
    }

    fn wake(&self) {
        // A failed wake-up leaves the reactor to its next sweep.
        let _ = self.waker.wake();
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
        if let Err(e) = stream.set_nonblocking(true) {
            return Err(e.into());
        }
        let peer = stream.peer_addr().ok();
        self.adopt(stream, peer, handler, None)
    }

    /// [`accept`](Self::accept) for a non-blocking socket whose peer is
    /// known (a server's accept returns it), with the hook that gives its
    /// place under the server's cap back.
    pub(crate) fn adopt(
        &self,
        stream: std::net::TcpStream,
        peer: Option<std::net::SocketAddr>,
        handler: Arc<dyn Handler>,
        release: Option<ReleaseHook>,
    ) -> Result<()> {
        let config = self.shared.config.clone();
        let _ = crate::dial::tune(&socket2::SockRef::from(&stream), &config);
        // The factory is the application's: its panic fails this
        // connection, not the reactor that takes it.
        let handshake = match guard_handshake(|| config.handshake.server_for_peer(peer)) {
            Ok(h) => h,
            Err(e) => {
                if let Some(r) = release {
                    r();
                }
                // A failed handshake like any other: counted, logged and
                // told to the handler (the server drops this error).
                Counters::inc(&self.shared.stats.handshakes_failed);
                crate::events::closed(crate::sync::next_conn_id(), peer, &e, true);
                let _ = guard_handler(|| handler.on_handshake_failed(peer, &e));
                return Err(e);
            }
        };
        let conn = Connection::new(NewConnParts {
            id: crate::sync::next_conn_id(),
            role: Role::Server,
            stream: ConnSocket::new(stream),
            peer_addr: peer,
            sealer: None,
            config,
            driver: self.shared.clone(),
            release,
            core: ConnCore::new(
                ReadPhase::Handshaking { handshake },
                Role::Server,
                self.shared.config.core_limits(),
                &[],
                now_nanos(),
            ),
        });
        self.add(conn, handler, true)
    }

    /// Dials `addr` on the calling thread (connect, then the client side of
    /// the handshake, each within its timeout) and hands the connection to
    /// this reactor. Requests from the peer go to `handler`.
    ///
    /// # Errors
    ///
    /// [`Error::Closed`] if the reactor has stopped (before the dial, or
    /// during it: the dial then gives up within 50 ms, and whatever else
    /// it met is not reported). Otherwise a failed dial is
    /// [`Error::Dial`], which names `addr`, the phase (connect, handshake,
    /// or [`DialPhase::Open`] if `handler.on_open` panicked or the
    /// connection closed during it) and the cause.
    pub fn dial(
        &self,
        addr: std::net::SocketAddr,
        handler: Arc<dyn Handler>,
    ) -> Result<Connection> {
        self.dial_within(addr, handler, None, &|| self.is_stopped())
    }

    /// [`dial`](Self::dial), ended by the deadline of the call that dials,
    /// or once `abandoned` (see [`crate::dial::dial`]).
    pub(crate) fn dial_within(
        &self,
        addr: std::net::SocketAddr,
        handler: Arc<dyn Handler>,
        call: Option<CallDeadline>,
        abandoned: &dyn Fn() -> bool,
    ) -> Result<Connection> {
        if self.is_stopped() {
            return Err(Error::Closed);
        }
        let config = self.shared.config.clone();
        let (stream, session, leftover) = match crate::dial::dial(addr, &config, call, abandoned) {
            Ok(dialled) => dialled,
            // Given up by its owner (shut down): no failed dial, no
            // failed handshake, only the end.
            Err(_) if abandoned() => return Err(Error::Closed),
            Err(e) => {
                // A refusal at the server's cap is no failed handshake.
                let refused = matches!(e.root_cause(), Error::ConnectionLimit);
                if !refused
                    && matches!(
                        e,
                        Error::Dial {
                            phase: DialPhase::Handshake,
                            ..
                        }
                    )
                {
                    Counters::inc(&self.shared.stats.handshakes_failed);
                }
                crate::events::dial_failed(&e);
                return Err(e);
            }
        };
        let conn = Connection::new(NewConnParts {
            id: crate::sync::next_conn_id(),
            role: Role::Client,
            stream: ConnSocket::new(stream),
            peer_addr: Some(addr),
            sealer: Some(session.sealer),
            core: ConnCore::new(
                ReadPhase::Open {
                    opener: session.opener,
                },
                Role::Client,
                config.core_limits(),
                &leftover,
                now_nanos(),
            ),
            config,
            driver: self.shared.clone(),
            release: None,
        });
        conn.set_peer_identity(session.peer_identity);
        crate::events::opened(conn.id(), Role::Client, Some(addr));
        // Before the reactor has it: once it does, it may dispatch the
        // peer's first messages, and on_open must come first.
        // A call on the client from `on_open` (or from an `on_close`
        // below) uses this connection: the pool's dial is this thread's
        // own until this returns.
        let _opening = crate::opening::Opening::enter(&conn);
        conn.set_opening(true);
        let opened = guard_handler(|| handler.on_open(&conn));
        conn.set_opening(false);
        let (failed, ran) = match opened {
            Err(panicked) => (Some(panicked), false),
            // Closed from `on_open` (by the handler, or by a call of its
            // that failed the connection): no connection to hand on.
            Ok(()) => (conn.close_reason(), true),
        };
        if let Some(e) = failed {
            conn.finish_close(&e);
            crate::events::closed(conn.id(), Some(addr), &e, false);
            if ran {
                // `on_open` ran to its end: the close follows it.
                let _ = guard_handler(|| handler.on_close(&conn, &e));
            }
            if abandoned() {
                // Given up by its owner meanwhile (a call of `on_open`'s
                // failed as the reactors stopped): only the end.
                return Err(Error::Closed);
            }
            let e = e.dialling(addr, DialPhase::Open);
            crate::events::dial_failed(&e);
            return Err(e);
        }
        if let Err(e) = self.add(conn.clone(), handler.clone(), false) {
            // Its own reason, if it was failed on its way.
            let reason = conn.close_reason().unwrap_or_else(|| e.clone());
            crate::events::closed(conn.id(), Some(addr), &reason, false);
            let _ = guard_handler(|| handler.on_close(&conn, &reason));
            return Err(e);
        }
        Ok(conn)
    }

    pub(super) fn add(
        &self,
        conn: Connection,
        handler: Arc<dyn Handler>,
        handshaking: bool,
    ) -> Result<()> {
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

    /// The reactor as its connections see it (its timers, its wake-up).
    pub(crate) fn driver(&self) -> &dyn Driver {
        &*self.shared
    }

    /// Has the reactor accept from a listener it shares with others, and
    /// hand what it accepts to `gate`. The
    /// listener is registered here, so an error shows now; the reactor
    /// takes it over at its next turn (and then accepts what already
    /// waits, so no edge announced before is lost).
    pub(crate) fn listen(
        &self,
        listener: Arc<mio::net::TcpListener>,
        gate: Arc<dyn super::listen::Gate>,
    ) -> Result<()> {
        let listener = super::listen::Listener::register(listener, gate, &self.shared.registry)?;
        match self.shared.push(Command::Listen(listener)) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => Err(Error::Closed),
            // Queued; only the wake-up failed.
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

/// What a command means once its reactor is gone: a connection handed over
/// or to be closed is closed; nothing else needs doing. A connection handed
/// over is one whose push was refused here: its pusher hears of it and
/// tells the handler (the reactor's own drain does that itself).
pub(super) fn settle_after_stop(cmd: Command, stats: &Counters) {
    match cmd {
        Command::Add { conn, .. } => {
            stats.uncount_open();
            conn.finish_close(&Error::Closed);
        }
        Command::Close(conn) => {
            let reason = conn.close_reason().unwrap_or(Error::Closed);
            conn.finish_close(&reason);
        }
        Command::Flush(_) | Command::Read(_) | Command::Stop | Command::Listen(_) => {}
    }
}
