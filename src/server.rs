//! The server: worker reactors that accept, run handshakes and handlers
//! (see [`crate::reactor`]'s listener), under a connection cap whose
//! overflow waits in a waiting room of its own thread.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::clock::instant_after;
use crate::config::Config;
use crate::conn::ReleaseHook;
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::protocol::REFUSED_AT_CAP;
use crate::reactor::Gate;
use crate::sync::{lock, AtomicBool, AtomicUsize, Mutex, Ordering};
use crate::workers::Workers;

/// The most a refused connection's input is read before it is closed:
/// a client's first flight (its key, a handshake frame, a few pipelined
/// requests), not whatever a flooding peer keeps sending.
const REFUSAL_DRAIN: usize = 4 << 10;
const WAKE: Token = Token(0);

/// The connection cap, shared by the reactors that accept, the waiting
/// room and every connection (which gives its place back on close).
struct Limit {
    active: AtomicUsize,
    max: usize,
    /// Wakes the waiting room.
    waker: Waker,
    stop: AtomicBool,
    /// Connections closed at the cap after the accept wait.
    refused: crate::sync::AtomicU64,
    /// Accepted over the cap, not yet seen by the waiting room.
    arrivals: Mutex<Vec<Arrival>>,
    /// Connections in the waiting room or on their way there: while any
    /// wait, a new connection queues behind them rather than take a place
    /// that frees up.
    waiting: AtomicUsize,
    /// How long a connection over the cap may wait for a place.
    accept_wait: Duration,
}

impl Limit {
    /// A cap of `config.max_conns` (at least 1), none taken, whose waiting
    /// room waits on `room`.
    fn new(config: &Config, room: &Poll) -> io::Result<Limit> {
        Ok(Limit {
            active: AtomicUsize::new(0),
            max: config.max_conns.max(1),
            waker: Waker::new(room.registry(), WAKE)?,
            stop: AtomicBool::new(false),
            refused: crate::sync::AtomicU64::new(0),
            arrivals: Mutex::new(Vec::new()),
            waiting: AtomicUsize::new(0),
            accept_wait: config.accept_wait,
        })
    }

    fn try_acquire(&self) -> bool {
        self.active
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    /// Gives a place back; wakes the waiting room only if someone waits
    /// there. (A connection that starts waiting after this check wakes
    /// the room itself, which then finds the place free.)
    fn release(&self) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        if self.waiting.load(Ordering::SeqCst) > 0 {
            let _ = self.waker.wake();
        }
    }

    /// Connections allowed to wait for a place (each for at most the
    /// accept wait): four times the cap, and at least 256. Past that a new
    /// connection is refused at once, so a flood cannot hold descriptors
    /// without bound.
    fn max_waiting(&self) -> usize {
        max_waiting(self.max)
    }

    /// Turns a connection away at the cap, telling the client so: the
    /// refusal takes the place of the server's key ([`REFUSED_AT_CAP`]),
    /// so the client's dial fails with `Error::ConnectionLimit`, not with a
    /// reset. What the client already sent is read first: closing a
    /// socket with unread input would reset the connection, and the reset
    /// could overtake the refusal.
    fn refuse(&self, Arrival { stream, peer }: Arrival) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        crate::events::refused_at_cap(Some(peer), self.max);
        // A fresh non-blocking socket: 32 bytes fit in its send buffer.
        let _ = (&stream).write(&REFUSED_AT_CAP);
        // At most REFUSAL_DRAIN bytes: a peer that keeps streaming must not
        // hold the thread that refuses it (a reactor, or the waiting room).
        let mut sink = [0u8; 256];
        let mut drained = 0;
        while drained < REFUSAL_DRAIN {
            match (&stream).read(&mut sink) {
                Ok(n) if n > 0 => drained += n,
                _ => break,
            }
        }
        let _ = stream.shutdown(std::net::Shutdown::Write);
    }

    /// The hook a connection gives its place back with.
    fn release_hook(self: &Arc<Self>) -> ReleaseHook {
        let limit = self.clone();
        Box::new(move || limit.release())
    }
}

/// What becomes of an accepted connection: admitted under the cap and
/// placed on a reactor, or sent to the waiting room.
struct Admission {
    limit: Arc<Limit>,
    workers: Arc<Workers>,
    handler: Arc<dyn Handler>,
}

impl Admission {
    /// Hands an admitted connection (its place taken) to the reactor with
    /// the fewest connections (see [`Workers::least_loaded`]).
    fn place(&self, stream: std::net::TcpStream, peer: Option<SocketAddr>) {
        let release = self.limit.release_hook();
        match self.workers.least_loaded(true) {
            Some(reactor) => {
                // A refusal (the reactor stopped meanwhile) has closed the
                // connection and given its place back.
                let _ = reactor.adopt(stream, peer, self.handler.clone(), Some(release));
            }
            None => release(),
        }
    }
}

impl Gate for Admission {
    fn take(&self, stream: std::net::TcpStream, peer: SocketAddr) {
        let limit = &self.limit;
        if limit.stop.load(Ordering::Acquire) {
            // Shutting down: closed unread, as the backlog will be.
            return;
        }
        if limit.waiting.load(Ordering::SeqCst) == 0 && limit.try_acquire() {
            self.place(stream, Some(peer));
            return;
        }
        let arrival = Arrival { stream, peer };
        if limit.waiting.load(Ordering::SeqCst) >= limit.max_waiting() {
            // The room is full: refused here, so that a flood faster than
            // the room empties its queue cannot hold descriptors either.
            limit.refuse(arrival);
            return;
        }
        let mut arrivals = lock(&limit.arrivals);
        arrivals.push(arrival);
        limit.waiting.fetch_add(1, Ordering::SeqCst);
        drop(arrivals);
        let _ = limit.waker.wake();
    }
}

/// A running server. Dropping it shuts it down.
///
/// ```no_run
/// use monte_rpc::{Config, Context, Server};
/// let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
///     let _ = ctx.reply(b"pong");
/// })
/// .unwrap();
/// println!("listening on {}", server.local_addr());
/// server.shutdown();
/// ```
pub struct Server {
    local_addr: SocketAddr,
    workers: Arc<Workers>,
    limit: Arc<Limit>,
    /// Shared with the reactors, which close it when the last one stops.
    listener: Arc<mio::net::TcpListener>,
    waiting_room: Mutex<Option<JoinHandle<()>>>,
    /// The listener is the server's own ([`Server::bind`]): shutdown may
    /// stop it listening. One the caller bound ([`Server::serve`]) may be
    /// shared (a copy kept for the next server, a descriptor another
    /// process holds), and shutting it down would stop it for them too.
    owns_listener: bool,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("local_addr", &self.local_addr)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `addr` (port 0 picks a free port) and serves `handler`.
    ///
    /// `config` must be made from [`Config::server`] (with any setters
    /// applied): a [`Config::default`] holds a client's defaults, a cap of
    /// 4 connections and no read timeout, and is refused with
    /// [`Error::InvalidConfig`](crate::Error::InvalidConfig) rather than
    /// served with them.
    ///
    /// ```
    /// use monte_rpc::{handler, Config, Error, Server};
    ///
    /// let refused = Server::bind("127.0.0.1:0", Config::default(), handler(|_| {}));
    /// assert!(matches!(refused, Err(Error::InvalidConfig(_))));
    /// let server = Server::bind("127.0.0.1:0", Config::server().max_conns(64), handler(|_| {}))?;
    /// # Ok::<(), Error>(())
    /// ```
    pub fn bind(addr: impl ToSocketAddrs, config: Config, handler: impl Handler) -> Result<Server> {
        check_server_config(&config)?;
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| io::Error::other("address resolved to nothing"))?;
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
        socket.set_reuse_address(true)?;
        socket.bind(&addr.into())?;
        socket.listen(config.backlog)?;
        Self::serve_on(socket.into(), config, handler, true)
    }

    /// Serves `handler` on a listener the caller bound. `config` must be
    /// made from [`Config::server`], as for [`bind`](Self::bind). The
    /// listener stays listening after [`shutdown`](Self::shutdown) (the
    /// caller may keep a copy for another server, or share it with another
    /// process): connections the reactors accept before they stop are
    /// closed, and those after wait in its backlog.
    pub fn serve(listener: TcpListener, config: Config, handler: impl Handler) -> Result<Server> {
        Self::serve_on(listener, config, handler, false)
    }

    fn serve_on(
        listener: TcpListener,
        config: Config,
        handler: impl Handler,
        owns_listener: bool,
    ) -> Result<Server> {
        check_server_config(&config)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        // Before the reactors start, so that (in a program not yet
        // threaded) the growth waits for nothing.
        // Room for the connections over the cap the waiting room holds too:
        // a storm past the cap must not grow the table either.
        let most = config.max_conns.max(1);
        let sockets = most.saturating_add(max_waiting(most));
        crate::descriptors::reserve_for_server(&listener, sockets, config.workers);
        let listener = mio::net::TcpListener::from_std(listener);
        let poll = Poll::new()?;
        let limit = Arc::new(Limit::new(&config, &poll)?);
        let workers = Arc::new(Workers::spawn(&config, "monte-rpc-server")?);
        let admission = Arc::new(Admission {
            limit: limit.clone(),
            workers: workers.clone(),
            handler: Arc::new(handler),
        });
        let room = WaitingRoom {
            poll,
            waiting: VecDeque::new(),
            limit: limit.clone(),
            admission: admission.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("monte-rpc-wait".into())
            .spawn(move || room.run());
        let listener = Arc::new(listener);
        let server = Server {
            local_addr,
            workers,
            limit,
            listener: listener.clone(),
            waiting_room: Mutex::new(thread.ok()),
            owns_listener,
        };
        if lock(&server.waiting_room).is_none() {
            return Err(
                io::Error::other("could not start the server's waiting-room thread").into(),
            );
        }
        for reactor in server.workers.handles() {
            // On an error `server` shuts down as it is dropped.
            reactor.listen(listener.clone(), admission.clone())?;
        }
        Ok(server)
    }

    /// The bound address.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// A snapshot of the server's counters, over all its reactors.
    pub fn stats(&self) -> crate::Stats {
        let mut stats = crate::Stats::default();
        self.workers.add_stats(&mut stats);
        stats.connections_refused += self.limit.refused.load(Ordering::Relaxed);
        stats.connections_waiting += self.limit.waiting.load(Ordering::Relaxed) as u64;
        stats
    }

    /// Connections handled right now, handshakes included.
    pub fn connections(&self) -> usize {
        self.limit.active.load(Ordering::Acquire)
    }

    /// Shuts down gracefully: stops admitting, lets running handlers
    /// finish, flushes queued output, closes every connection (failing
    /// requests still pending on them with [`Error::Closed`](crate::Error::Closed))
    /// and joins every thread before it returns. Called from a handler
    /// (an admin's "stop" message, say), it cannot join the reactor the
    /// handler runs on: that one stops once the handler returns, and the
    /// next `shutdown` (or the drop) joins it.
    pub fn shutdown(&self) {
        self.limit.stop.store(true, Ordering::Release);
        // Stop listening now: a reactor busy in a handler keeps the
        // listener open until it stops, and connections meanwhile would
        // be accepted only to be closed. On Linux a listening socket shut
        // for reading refuses them at once (elsewhere this fails, and the
        // gate closes what the reactors still accept). Only the server's
        // own: the shutdown acts on the socket, every copy of it included.
        if self.owns_listener {
            let _ = socket2::SockRef::from(&*self.listener).shutdown(std::net::Shutdown::Read);
        }
        let _ = self.limit.waker.wake();
        if let Some(t) = lock(&self.waiting_room).take() {
            let _ = t.join();
        }
        self.workers.stop_and_join();
        // What was still on its way to the room, or in it, is closed now
        // (the room dropped its own when it stopped).
        lock(&self.limit.arrivals).clear();
        self.limit.waiting.store(0, Ordering::SeqCst);
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The most connections over a cap of `max_conns` that wait for a place
/// at once (SECURITY.md).
fn max_waiting(max_conns: usize) -> usize {
    max_conns.saturating_mul(4).max(256)
}

/// Refuses a configuration not made from [`Config::server`].
fn check_server_config(config: &Config) -> Result<()> {
    if config.has_server_defaults() {
        Ok(())
    } else {
        Err(Error::InvalidConfig(
            "a Server needs a configuration made from Config::server() (a cap of 1024 \
             connections and a 60 s read timeout); Config::default() holds a client's \
             defaults (a cap of 4 connections, no read timeout)",
        ))
    }
}

/// A connection accepted over the cap, with its peer's address.
struct Arrival {
    stream: std::net::TcpStream,
    peer: SocketAddr,
}

/// Connections accepted over the cap wait here, each for at most the
/// accept wait, for a place; the room admits them in order of arrival as
/// places free up, and turns away whoever waited the whole wait.
struct WaitingRoom {
    poll: Poll,
    /// Each with the time it must have a place by.
    waiting: VecDeque<(Arrival, Instant)>,
    limit: Arc<Limit>,
    admission: Arc<Admission>,
}

impl WaitingRoom {
    fn run(mut self) {
        let mut events = Events::with_capacity(8);
        loop {
            let now = Instant::now();
            let timeout = self
                .waiting
                .front()
                .map(|(_, deadline)| deadline.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return;
                }
            }
            if self.limit.stop.load(Ordering::Acquire) {
                return;
            }
            self.take_arrivals();
            self.admit_waiting();
        }
    }

    fn take_arrivals(&mut self) {
        let arrivals = std::mem::take(&mut *lock(&self.limit.arrivals));
        let deadline = instant_after(Instant::now(), self.limit.accept_wait);
        for arrival in arrivals {
            if self.waiting.len() >= self.limit.max_waiting() {
                // The room is full too: refuse at once rather than hold
                // descriptors without bound.
                self.refuse(arrival);
            } else {
                self.waiting.push_back((arrival, deadline));
            }
        }
    }

    fn admit_waiting(&mut self) {
        let now = Instant::now();
        while let Some((_, deadline)) = self.waiting.front() {
            // A free place first: one that came free by now is taken even
            // by a connection whose wait is over (with an accept wait of
            // 0, every connection that came to the room while another was
            // on its way here).
            if self.limit.try_acquire() {
                let (arrival, _) = self.waiting.pop_front().expect("front exists");
                self.limit.waiting.fetch_sub(1, Ordering::SeqCst);
                self.admission.place(arrival.stream, Some(arrival.peer));
                continue;
            }
            if *deadline > now {
                break;
            }
            // Waited its whole accept wait.
            let (arrival, _) = self.waiting.pop_front().expect("front exists");
            self.refuse(arrival);
        }
        // Refuse expired connections further back too.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].1 <= now {
                let (arrival, _) = self.waiting.remove(i).expect("index in range");
                self.refuse(arrival);
            } else {
                i += 1;
            }
        }
    }

    /// Turns away a connection that waited (or found the room full).
    fn refuse(&self, arrival: Arrival) {
        self.limit.waiting.fetch_sub(1, Ordering::SeqCst);
        self.limit.refuse(arrival);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection in the waiting room whose accept wait is over (at
    /// once, with `accept_wait` 0) while a place is free takes the place:
    /// it was refused, though nothing stood in its way.
    #[test]
    fn a_wait_that_is_over_still_takes_a_free_place() {
        let config = Config::server()
            .workers(1)
            .max_conns(1)
            .accept_wait(Duration::ZERO);
        let poll = Poll::new().unwrap();
        let limit = Arc::new(Limit::new(&config, &poll).unwrap());
        let workers = Arc::new(Workers::spawn(&config, "monte-rpc-test").unwrap());
        let admission = Arc::new(Admission {
            limit: limit.clone(),
            workers: workers.clone(),
            handler: Arc::new(crate::handler::handler(|_| {})),
        });
        let mut room = WaitingRoom {
            poll,
            waiting: VecDeque::new(),
            limit: limit.clone(),
            admission,
        };
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (stream, peer) = listener.accept().unwrap();
        // As the reactors' accepts leave it.
        stream.set_nonblocking(true).unwrap();
        // It waited while the cap was reached; the place came free since.
        limit.waiting.fetch_add(1, Ordering::SeqCst);
        room.waiting
            .push_back((Arrival { stream, peer }, Instant::now()));
        room.admit_waiting();
        assert_eq!(limit.refused.load(Ordering::SeqCst), 0, "refused");
        assert_eq!(limit.active.load(Ordering::SeqCst), 1, "not admitted");
        assert_eq!(limit.waiting.load(Ordering::SeqCst), 0);
        assert!(room.waiting.is_empty());
        workers.stop_and_join();
    }
}
