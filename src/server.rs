//! The server: an acceptor thread that enforces the connection cap, and
//! worker reactors that run handshakes and handlers.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use socket2::{Domain, Protocol, Socket, Type};

use crate::config::Config;
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::protocol::REFUSED_AT_CAP;
use crate::sync::{lock, AtomicBool, AtomicUsize, Mutex, Ordering};
use crate::workers::Workers;

const LISTENER: Token = Token(0);

/// The most a refused connection's input is read before it is closed:
/// a client's first flight (its key, a handshake frame, a few pipelined
/// requests), not whatever a flooding peer keeps sending.
const REFUSAL_DRAIN: usize = 4 << 10;
const WAKE: Token = Token(1);

/// The connection cap shared by the acceptor and every connection.
struct Limit {
    active: AtomicUsize,
    max: usize,
    waker: Waker,
    stop: AtomicBool,
    /// Connections closed at the cap after the accept wait.
    refused: crate::sync::AtomicU64,
}

impl Limit {
    fn try_acquire(&self) -> bool {
        self.active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.active.fetch_sub(1, Ordering::AcqRel);
        let _ = self.waker.wake();
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
    acceptor: Mutex<Option<JoinHandle<()>>>,
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
        Self::serve(socket.into(), config, handler)
    }

    /// Serves `handler` on a listener the caller bound. `config` must be
    /// made from [`Config::server`], as for [`bind`](Self::bind).
    pub fn serve(listener: TcpListener, config: Config, handler: impl Handler) -> Result<Server> {
        check_server_config(&config)?;
        listener.set_nonblocking(true)?;
        let local_addr = listener.local_addr()?;
        let mut listener = mio::net::TcpListener::from_std(listener);
        let poll = Poll::new()?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)?;
        let limit = Arc::new(Limit {
            active: AtomicUsize::new(0),
            max: config.max_conns.max(1),
            waker: Waker::new(poll.registry(), WAKE)?,
            stop: AtomicBool::new(false),
            refused: crate::sync::AtomicU64::new(0),
        });
        let workers = Arc::new(Workers::spawn(&config, "monte-rpc-server")?);
        let acceptor = Acceptor {
            poll,
            listener,
            waiting: VecDeque::new(),
            retry_accept: None,
            limit: limit.clone(),
            workers: workers.clone(),
            handler: Arc::new(handler),
            config,
        };
        let thread = std::thread::Builder::new()
            .name("monte-rpc-accept".into())
            .spawn(move || acceptor.run())?;
        Ok(Server {
            local_addr,
            workers,
            limit,
            acceptor: Mutex::new(Some(thread)),
        })
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
        stats
    }

    /// Connections handled right now, handshakes included.
    pub fn connections(&self) -> usize {
        self.limit.active.load(Ordering::Acquire)
    }

    /// Shuts down gracefully: stops accepting, lets running handlers
    /// finish, flushes queued output, closes every connection (failing
    /// requests still pending on them with [`Error::Closed`](crate::Error::Closed))
    /// and joins every thread before it returns.
    pub fn shutdown(&self) {
        self.limit.stop.store(true, Ordering::Release);
        let _ = self.limit.waker.wake();
        if let Some(t) = lock(&self.acceptor).take() {
            let _ = t.join();
        }
        self.workers.stop_and_join();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
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

struct Acceptor {
    poll: Poll,
    listener: mio::net::TcpListener,
    /// Accepted over the cap, waiting for a place until their deadline.
    waiting: VecDeque<(std::net::TcpStream, Instant)>,
    /// When to try accepting again after an error such as EMFILE.
    retry_accept: Option<Instant>,
    limit: Arc<Limit>,
    workers: Arc<Workers>,
    handler: Arc<dyn Handler>,
    config: Config,
}

impl Acceptor {
    fn run(mut self) {
        let mut events = Events::with_capacity(64);
        loop {
            let now = Instant::now();
            let timeout = self
                .waiting
                .front()
                .map(|(_, deadline)| *deadline)
                .into_iter()
                .chain(self.retry_accept)
                .min()
                .map(|at| at.saturating_duration_since(now));
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    return;
                }
            }
            if self.limit.stop.load(Ordering::Acquire) {
                return;
            }
            self.retry_accept = None;
            self.accept_all();
            self.admit_waiting();
        }
    }

    /// Connections allowed to wait for a place (each for at most the
    /// accept wait): four times the cap, and at least 256. Past that a new
    /// connection is refused at once, so a flood cannot hold descriptors
    /// without bound.
    fn max_waiting(&self) -> usize {
        (self.limit.max * 4).max(256)
    }

    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // mio hands back a non-blocking socket; the reactor
                    // takes it as a std stream.
                    let stream = std::net::TcpStream::from(std::os::fd::OwnedFd::from(stream));
                    let _ = crate::dial::tune(&socket2::SockRef::from(&stream), &self.config);
                    if self.waiting.is_empty() && self.limit.try_acquire() {
                        self.hand_over(stream);
                        continue;
                    }
                    if self.waiting.len() >= self.max_waiting() {
                        // The wait queue is full too: refuse at once rather
                        // than hold descriptors without bound.
                        self.refuse(stream);
                        continue;
                    }
                    let deadline = Instant::now() + self.config.accept_wait;
                    self.waiting.push_back((stream, deadline));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // One connection that died before it was accepted: the rest
                // of the backlog is still there, and an edge-triggered
                // listener would not announce it again.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                // Out of descriptors (or similar): come back shortly rather
                // than spin; the poll timeout brings the acceptor back.
                Err(_) => {
                    self.retry_accept = Some(Instant::now() + Duration::from_millis(50));
                    return;
                }
            }
        }
    }

    /// Gives an admitted connection (its place already taken) to a worker.
    fn hand_over(&self, stream: std::net::TcpStream) {
        let limit = self.limit.clone();
        let _ = self.workers.pick().accept_with_release(
            stream,
            self.handler.clone(),
            Some(Box::new(move || limit.release())),
        );
    }

    fn admit_waiting(&mut self) {
        let now = Instant::now();
        while let Some((_, deadline)) = self.waiting.front() {
            if *deadline <= now {
                // Waited its whole accept wait.
                let (stream, _) = self.waiting.pop_front().expect("front exists");
                self.refuse(stream);
                continue;
            }
            if !self.limit.try_acquire() {
                break;
            }
            let (stream, _) = self.waiting.pop_front().expect("front exists");
            self.hand_over(stream);
        }
        // Refuse expired connections further back too.
        let mut i = 0;
        while i < self.waiting.len() {
            if self.waiting[i].1 <= now {
                let (stream, _) = self.waiting.remove(i).expect("index in range");
                self.refuse(stream);
            } else {
                i += 1;
            }
        }
    }

    /// Turns a connection away at the cap, telling the client so: the
    /// refusal takes the place of the server's key ([`REFUSED_AT_CAP`]),
    /// so the client's dial fails with `Error::ConnectionLimit`, not with a
    /// reset. What the client already sent is read first: closing a
    /// socket with unread input would reset the connection, and the reset
    /// could overtake the refusal.
    fn refuse(&self, stream: std::net::TcpStream) {
        self.limit.refused.fetch_add(1, Ordering::Relaxed);
        crate::events::refused_at_cap(stream.peer_addr().ok(), self.limit.max);
        // A fresh non-blocking socket: 32 bytes fit in its send buffer.
        let _ = (&stream).write(&REFUSED_AT_CAP);
        // At most REFUSAL_DRAIN bytes: a peer that keeps streaming must not
        // hold the acceptor, the one thread that admits every connection.
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
}
