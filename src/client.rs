//! The client: a pool of up to `max_conns` connections to one endpoint,
//! served by its own reactor threads, with calls spread over the pool.

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::blocking_calls;
use crate::clock::{nanos_at, no_time_left, CallDeadline, LazyDeadline};
use crate::config::Config;
use crate::conn::Connection;
use crate::error::{CallOp, Error, Result, TimeoutKind};
use crate::handler::{Handler, NoHandler};
use crate::pool::{CallKind, Pool};
use crate::workers::Workers;

/// A client for one endpoint. `Send + Sync`: share it between threads with
/// a reference or an `Arc`.
///
/// ```no_run
/// use monte_rpc::{Client, Config};
/// let client = Client::new("127.0.0.1:4444", Config::default()).unwrap();
/// let mut response = Vec::new();
/// client.request(b"ping", &mut response).unwrap();
/// client.send_no_wait(b"fire and forget").unwrap();
/// client.shutdown();
/// ```
pub struct Client {
    /// The connections and their dialling, shared with the thread that
    /// dials for async calls.
    pub(crate) pool: Arc<Pool>,
}

/// How long `shutdown` lets calls already under way finish before it
/// closes the connections under them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("addr", &self.pool.addr)
            .field("connections", &self.connections())
            .finish_non_exhaustive()
    }
}

impl Client {
    /// A client for `addr` that ignores requests from the server.
    ///
    /// `new` resolves `addr` at once, on the calling thread (a host name
    /// goes to the system resolver, which may block), keeps the first
    /// address it yields, and starts the client's reactor threads. It does
    /// not connect: the first call ([`send`](Self::send),
    /// [`send_no_wait`](Self::send_no_wait), [`request`](Self::request))
    /// dials the first connection, on the caller's thread, and so does a
    /// later call that finds every connection busy with fewer than
    /// `max_conns` open, or none open (after the server closed them). The
    /// address is never resolved again: if the name comes to point
    /// elsewhere, make a new client.
    ///
    /// # How long a dial may take
    ///
    /// A dial is part of the call that makes it, and ends by that call's
    /// deadline: the request timeout for [`request`](Self::request) (or
    /// the timeout given to [`request_timeout`](Self::request_timeout)),
    /// the send timeout ([`Config::send_timeout`]) for
    /// [`send`](Self::send) and [`send_no_wait`](Self::send_no_wait),
    /// counted from the call's start. Within it, each of the
    /// `dial_attempts` connect attempts gets at most `dial_timeout`, the
    /// pauses between attempts (10, 20, 40 ms, ...) are skipped when they
    /// would leave no time for another, and the handshake gets at most
    /// `handshake_timeout`. A call that waits for another call's dial
    /// waits no longer than its own deadline either. So with the defaults
    /// (5 s connect timeout, 3 attempts) a request with a 1 s timeout to an
    /// endpoint that never answers a connect fails after 1 s, not 15.
    ///
    /// A deadline shorter than a connect and a handshake (a round trip or
    /// two, plus the key exchange) leaves the client unable to connect:
    /// give the calls that may dial the time it takes.
    ///
    /// # Errors
    ///
    /// From `new`, only what resolving and starting threads can fail with:
    /// [`Error::Io`] if `addr` does not resolve (a missing port, an unknown
    /// name) or resolves to no address, or if a reactor cannot be started.
    /// Whether anything listens at the address is not known yet.
    ///
    /// From the call that dials, the dial's failure, an [`Error::Dial`]
    /// that names the address and the phase, with the cause as its
    /// `source`: in [`DialPhase::Connect`](crate::DialPhase::Connect), [`Error::Io`] if the connect
    /// fails (refused, unreachable) on each of `dial_attempts` tries, or
    /// [`Error::Timeout`] with [`TimeoutKind::Dial`] if it takes longer
    /// than `dial_timeout`; in [`DialPhase::Handshake`](crate::DialPhase::Handshake), [`Error::Handshake`]
    /// or [`TimeoutKind::Handshake`] if the handshake fails or takes longer
    /// than `handshake_timeout`. When the call's own deadline ends the dial
    /// first, the cause is the call's timeout: [`TimeoutKind::Request`] for
    /// a request, [`TimeoutKind::Write`] for a send (the kind a send timeout
    /// reports everywhere), in the phase it cut short
    /// ([`DialPhase::Queued`](crate::DialPhase::Queued) if the call was waiting for another call's
    /// dial). Calls that waited for another caller's dial get that dial's
    /// error rather than dialling again.
    ///
    /// After a failed dial the client backs off: for
    /// [`dial_backoff`](Config::dial_backoff) (100 ms by default, doubling
    /// with each dial that fails in a row up to
    /// [`dial_backoff_max`](Config::dial_backoff_max), 2 s), a call that
    /// would dial fails at once with that dial's error instead; a call that
    /// finds a connection open uses it. The first call after the backoff
    /// dials again, and a dial that succeeds ends the doubling. A dial
    /// that the calling operation's own deadline cut short holds back only
    /// calls with no more time than it had (up to twice that), and does
    /// not double the backoff of the endpoint's own failures.
    ///
    /// ```
    /// use monte_rpc::{Client, Config, DialPhase, Error};
    ///
    /// // Nothing listens on the port of a listener just closed: `new`
    /// // succeeds all the same, and the first call reports the refusal.
    /// let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let client = Client::new(addr, Config::default().dial_attempts(1))?;
    /// let e = client.send(b"hello").unwrap_err();
    /// assert!(matches!(e, Error::Dial { phase: DialPhase::Connect, .. }));
    /// assert!(matches!(e.root_cause(), Error::Io(_)));
    ///
    /// // A name that cannot resolve fails in `new` itself.
    /// assert!(matches!(Client::new("127.0.0.1", Config::default()), Err(Error::Io(_))));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn new(addr: impl ToSocketAddrs, config: Config) -> Result<Client> {
        Self::with_handler(addr, config, NoHandler)
    }

    /// A client whose `handler` answers requests the server sends it. It
    /// resolves `addr` and dials like [`new`](Self::new): the address at
    /// once, the first connection on the first call.
    pub fn with_handler(
        addr: impl ToSocketAddrs,
        config: Config,
        handler: impl Handler,
    ) -> Result<Client> {
        let addr = addr
            .to_socket_addrs()?
            .next()
            .ok_or_else(|| Error::from(std::io::Error::other("address resolved to nothing")))?;
        let workers = Workers::spawn(&config, "monte-rpc-client")?;
        Ok(Client {
            pool: Arc::new(Pool::new(addr, config, Arc::new(handler), workers)),
        })
    }

    /// The endpoint.
    pub fn addr(&self) -> SocketAddr {
        self.pool.addr
    }

    /// A snapshot of the client's counters, over all its reactors.
    pub fn stats(&self) -> crate::Stats {
        let mut stats = crate::Stats::default();
        self.pool.workers.add_stats(&mut stats);
        stats
    }

    /// Open connections in the pool.
    pub fn connections(&self) -> usize {
        self.pool.open()
    }

    /// Sends a message that expects no reply, and returns once it is
    /// written to the socket.
    ///
    /// It waits for a connection (dialling one if it must, see
    /// [`new`](Self::new)), for room in a full queue and for its frame to
    /// be written, all within the send timeout from the call's start
    /// ([`Config::send_timeout`]; then a [`TimeoutKind::Write`] timeout).
    /// A dial the send timeout ends fails with [`Error::Dial`] whose cause
    /// is that timeout; any other failure comes as [`Error::Call`] naming
    /// this call and the server (see [`Error::root_cause`]).
    pub fn send(&self, body: &[u8]) -> Result<()> {
        let call = || {
            let _call = blocking_calls::enter(&self.pool.signal).ok_or(Error::Closed)?;
            let mut deadline = self.write_deadline();
            let conn = self.pool.pick(&mut deadline, CallKind::Send)?;
            conn.send_by(body, deadline.if_read())
        };
        call().map_err(|e| e.calling(CallOp::Send, Some(self.pool.addr)))
    }

    /// Queues a message that expects no reply, and returns once it is
    /// queued: at once on an open connection with room in its queue, else
    /// after waiting for room, up to the send timeout
    /// ([`Config::send_timeout`]).
    ///
    /// It needs a connection to queue on: a call that must dial first (see
    /// [`new`](Self::new)) waits for the dial, or for another call's, no
    /// longer than the send timeout from its start, and a dial the send
    /// timeout ends fails with [`Error::Dial`] whose cause is
    /// [`TimeoutKind::Write`]. The send timeout from the call's start bounds
    /// the whole call: the dial and the wait for room together.
    pub fn send_no_wait(&self, body: &[u8]) -> Result<()> {
        let call = || {
            let _call = blocking_calls::enter(&self.pool.signal).ok_or(Error::Closed)?;
            let mut deadline = self.write_deadline();
            let conn = self.pool.pick(&mut deadline, CallKind::Send)?;
            conn.send_no_wait_by(body, deadline.if_read())
        };
        call().map_err(|e| e.calling(CallOp::SendNoWait, Some(self.pool.addr)))
    }

    /// Sends a request and puts its response into `response`, reusing its
    /// capacity, within the configured request timeout
    /// ([`Config::request_timeout`]).
    ///
    /// The timeout covers the whole call: finding a connection, dialling
    /// one if it must (see [`new`](Self::new)) and waiting for another
    /// call's dial included. Past it the call fails with a
    /// [`TimeoutKind::Request`] timeout ([`Error::timeout_kind`]): as
    /// [`Error::Dial`] if it ran out during a dial, else as [`Error::Call`]
    /// naming this call and the server.
    pub fn request(&self, body: &[u8], response: &mut Vec<u8>) -> Result<()> {
        self.request_timeout(body, response, self.pool.config.request_timeout)
    }

    /// [`request`](Self::request) with its own timeout (`None`: no limit),
    /// which covers the whole call, a dial included, as the configured one
    /// does for `request`. With `None`, a dial is bounded only by
    /// `dial_attempts`, `dial_timeout` and `handshake_timeout`.
    pub fn request_timeout(
        &self,
        body: &[u8],
        response: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        self.request_bare(body, response, timeout)
            .map_err(|e| e.calling(CallOp::Request, Some(self.pool.addr)))
    }

    fn request_bare(
        &self,
        body: &[u8],
        response: &mut Vec<u8>,
        timeout: Option<Duration>,
    ) -> Result<()> {
        let _call = blocking_calls::enter(&self.pool.signal).ok_or(Error::Closed)?;
        // One clock reading for the deadline and the connection's
        // timestamps, unless the call has to wait for a connection.
        let start = Instant::now();
        // The deadline covers finding a connection too (which may dial).
        let deadline = CallDeadline::after_from(start, timeout, TimeoutKind::Request);
        // The connection counts the time that runs out once it has the
        // request; this counts the time that ran out before.
        let (conn, sent_at) = match self.connection_for_request(start, timeout, deadline) {
            Ok(found) => found,
            Err(e) => {
                let passed = no_time_left(timeout) || deadline.is_some_and(|d| d.passed());
                // Any reactor's counters (all are summed).
                if let Some(first) = self.pool.workers.handles().first() {
                    first.driver().stats().count_request_failure(&e, passed);
                }
                return Err(e);
            }
        };
        let result = conn.request_until(body, response, deadline.map(|d| d.at), timeout);
        if result.is_ok() {
            conn.note_answer(sent_at);
        }
        if let Err(Error::Timeout(TimeoutKind::Request)) = &result {
            self.pool.drop_if_silent(&conn, sent_at);
        }
        result
    }

    /// The connection a request that started at `start` goes out on,
    /// found by its `deadline` (which covers finding the connection, a
    /// dial included), with when the request leaves, as a connection's
    /// timestamp.
    fn connection_for_request(
        &self,
        start: Instant,
        timeout: Option<Duration>,
        deadline: Option<CallDeadline>,
    ) -> Result<(Connection, u64)> {
        if no_time_left(timeout) {
            return Err(Error::Timeout(TimeoutKind::Request));
        }
        if let Some(conn) = self
            .pool
            .choose_for(CallKind::Request, Some(nanos_at(start)))
        {
            return Ok((conn, nanos_at(start)));
        }
        let conn = self
            .pool
            .pick_after_choosing(&mut LazyDeadline::Read(deadline), CallKind::Request)?;
        let now = Instant::now();
        if deadline.is_some_and(|d| now >= d.at) {
            return Err(Error::Timeout(TimeoutKind::Request));
        }
        Ok((conn, nanos_at(now)))
    }

    /// How long a send may wait: its send timeout, over the dial, the
    /// wait for room and the write together, counted from its first wait.
    fn write_deadline(&self) -> LazyDeadline {
        LazyDeadline::Unread {
            timeout: self.pool.config.send_timeout,
            kind: TimeoutKind::Write,
        }
    }

    /// Shuts down gracefully: new calls fail with [`Error::Closed`] (in
    /// the call's context, [`Error::Call`]); calls
    /// already under way get up to one second to finish (so a request in
    /// flight gets its response and a frame being queued is queued); then
    /// every queued frame is written, connections are half-closed and
    /// drained, anything still pending fails, and every thread is joined
    /// (but, called from a handler, the reactor it runs on: that one stops
    /// once the handler returns, and the next `shutdown` or the drop joins
    /// it). Called from several threads at once, each returns once all of
    /// that is done, whichever of them did it; but not a call from a
    /// reactor thread, which does not wait for another call's joins (a
    /// dial's `on_open` may wait for that reactor), nor the threads of a
    /// call made from an async dial's thread (`on_open`, or a waker that
    /// dropped the client): that thread is joined by a later `shutdown`
    /// or the drop.
    pub fn shutdown(&self) {
        self.pool.signal.close();
        // Async calls waiting for a dial look again, find the client
        // closed and end, rather than wait out the grace below (the dial
        // they wait for may be the very thread running this shutdown).
        self.pool.wake_dial_waiters();
        let grace = Instant::now() + SHUTDOWN_GRACE;
        // Not for this thread's own calls, from within one of which (its
        // dial's `on_open`) this shutdown may come: they wait for it.
        let own = blocking_calls::here(&self.pool.signal);
        while self.pool.signal.calls_inside() > own && Instant::now() < grace {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.pool.close();
    }
}

impl Drop for Client {
    fn drop(&mut self) {
        self.shutdown();
    }
}
