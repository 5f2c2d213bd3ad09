//! Limits, timeouts, buffer sizes and the handshake: everything a client or
//! server can be configured with, and the defaults.
//!
//! A timeout is an `Option<Duration>`: `None` means the timeout is disabled,
//! and is only ever chosen explicitly. Unlike the Go library, a zero
//! duration does not mean "none": it is a deadline that has already passed.

use std::sync::Arc;
use std::time::Duration;

use crate::protocol::{HandshakeFactory, Profile};
use crate::waiting::Waiting;

/// Settings shared by [`Client`](crate::Client), [`Server`](crate::Server)
/// and an embedded [`Reactor`](crate::Reactor).
///
/// ```
/// use std::time::Duration;
/// use monte_rpc::{Config, protocol::Profile};
///
/// let config = Config::default()
///     .profile(Profile::Monte)
///     .read_timeout(None) // explicitly disabled
///     .write_timeout(Some(Duration::from_secs(2)));
/// assert_eq!(config.write_timeout, Some(Duration::from_secs(2)));
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct Config {
    /// Makes each connection's handshake. Default: the `secure` profile.
    pub handshake: Arc<dyn HandshakeFactory>,
    /// Reactor threads. Default: the number of available cores.
    pub workers: usize,
    /// The largest message payload sent or accepted, in bytes. A peer's
    /// frame above it is refused from its length prefix. Default: 1 MiB.
    pub max_message_size: usize,
    /// Initial size of each connection's receive buffer. Frames larger than
    /// it (up to `max_message_size`) grow the buffer. Default: 16 KiB.
    pub read_buffer_size: usize,
    /// The most bytes one connection holds for writing (queued, or in a
    /// write under way) before a sender waits for room (up to its send
    /// timeout). A single frame larger than this is let in once nothing
    /// is queued (a write under way may still be finishing). Default:
    /// 1 MiB.
    pub max_queued_bytes: usize,
    /// Requests that may await a response on one connection at once.
    /// Default: 256.
    pub max_in_flight: usize,
    /// TCP connect timeout, for each of `dial_attempts` attempts. A
    /// client's dial also ends by the deadline of the call that makes it
    /// (see [`Client::new`](crate::Client::new)). Default: 5 s.
    pub dial_timeout: Option<Duration>,
    /// How long a handshake may take. A client's handshake also ends by the
    /// deadline of the call that dials. Default: 5 s.
    pub handshake_timeout: Option<Duration>,
    /// How long a connection may receive nothing before it is closed.
    /// Default: disabled for clients, 60 s for servers.
    pub read_timeout: Option<Duration>,
    /// How long a frame may take to arrive, from its first byte to its
    /// last. The read timeout alone cannot catch a peer that trickles a
    /// frame a byte at a time (every byte resets it), so a slow frame is
    /// judged from its start. Default: the read timeout (the
    /// [`read_timeout`](Config::read_timeout) setter sets both; set this
    /// one after it for another value).
    pub frame_timeout: Option<Duration>,
    /// How long queued output may make no progress (the peer takes none
    /// of it) before the connection is closed with
    /// [`TimeoutKind::Write`](crate::TimeoutKind::Write). It also ends a
    /// connection whose reading is paused because its replies are over
    /// `max_queued_bytes`. Default: 10 s (the
    /// [`write_timeout`](Config::write_timeout) setter also sets
    /// `send_timeout` and `drain_timeout`).
    pub write_timeout: Option<Duration>,
    /// How long one `send`, `send_no_wait` or deferred `reply` call may
    /// wait: for a connection (its own dial, or another caller's), for
    /// room in a full queue, and (`send`) for its frame to be written. Past
    /// it the call fails with
    /// [`TimeoutKind::Write`](crate::TimeoutKind::Write) (as the cause of
    /// an [`Error::Dial`](crate::Error::Dial) if it ran out while
    /// dialling); the connection stays open. Default: 10 s.
    pub send_timeout: Option<Duration>,
    /// How long a graceful close may take: queued output is flushed, the
    /// write side shut, and the peer's end awaited; past it the socket is
    /// dropped. Default: 10 s.
    pub drain_timeout: Duration,
    /// How long a request waits for its response. Default: 30 s.
    pub request_timeout: Option<Duration>,
    /// Client: the most connections kept to the endpoint (default 4). A
    /// call takes an idle one, or dials while all are busy; but once there
    /// is a connection per [`workers`](Self::workers), a request shares a
    /// busy one (with about 8 requests in flight at most) while that one's
    /// answers take under 1 ms on average and it has not been quiet for
    /// 2 ms: fewer reactor wake-ups per request, while a slow handler or a
    /// stalled connection still spreads requests over more.
    /// Server: the most connections handled at once, handshakes included
    /// (default 1024, from [`Config::server`]). The server grows the
    /// process's descriptor table to fit that many, and those over the cap
    /// that may wait for a place, when it starts (8 bytes a slot, rounded
    /// up to a power of two; within the descriptor limit and at most 2^20
    /// slots), so that taking them on does not stall its accepts: see
    /// [`reserve_descriptors`](crate::reserve_descriptors).
    pub max_conns: usize,
    /// Server: how long a connection over the cap waits for a place before
    /// it is closed. Default: 1 s.
    pub accept_wait: Duration,
    /// Client: connect attempts per dial before giving up, 10 ms apart,
    /// then 20, 40, ... (each attempt within `dial_timeout`, all of them
    /// within the calling operation's deadline). Default: 3.
    pub dial_attempts: usize,
    /// Client: how long, after a dial fails, calls that would dial fail at
    /// once with that dial's error instead (a call that finds a
    /// connection open still uses it). It doubles with each dial that
    /// fails in a row, up to `dial_backoff_max`, and starts afresh after
    /// one that succeeds; the first call after it dials again. (A dial
    /// that its call's own deadline cut short holds back only calls with
    /// up to twice the time it had, and does not double the backoff of the
    /// endpoint's own failures; a retry the deadline cut short after an
    /// attempt failed, say refused, counts as that failure.) So an
    /// endpoint that is down costs one dial per backoff, not one per call.
    /// Zero disables it: every call that needs a connection dials (calls
    /// that queued behind a dial still share its result). Default: 100 ms.
    pub dial_backoff: Duration,
    /// Client: the longest `dial_backoff` grows to. Default: 2 s.
    pub dial_backoff_max: Duration,
    /// Server: the listen backlog. Default: 1024.
    pub backlog: i32,
    /// `SO_SNDBUF`, if set. Default: the system's.
    pub send_buffer_size: Option<usize>,
    /// `SO_RCVBUF`, if set. Default: the system's.
    pub recv_buffer_size: Option<usize>,
    /// `TCP_NOTSENT_LOWAT` for a connection's socket while it streams:
    /// the most bytes the kernel then holds unsent, the rest waiting in
    /// the connection's own queue (under `max_queued_bytes`). It bounds
    /// only data not yet sent, not the window in flight, so it does not
    /// cap throughput over long links. A stream's bytes piled into the
    /// kernel behind a slower reader are cold in the cache by the time
    /// they are copied; but frames written one by one (`send`, requests)
    /// would leave as a segment each under the limit, where the kernel
    /// coalesces them behind a closed window. So it is switched on once
    /// the reactor writes backlogs of queued messages (`send_no_wait`), a
    /// few writes in a row, and off again after a few writes of single
    /// frames by callers themselves (a connection whose writes are all the
    /// reactor's, as a server's replies, keeps it). With it on, a peer
    /// that stops reading leaves the bytes in the connection's queue
    /// rather than the kernel's, where the write timeout sees them. The
    /// README has the figures. Linux and Android only; ignored elsewhere.
    /// `None` (or 0): never. Default: 64 KiB.
    pub unsent_low_water: Option<usize>,
    /// How callers and reactors wait: spin where another core can make
    /// the awaited progress meanwhile, block where not (see [`Waiting`]:
    /// the rule, and what each thread does). Default: [`Waiting::Auto`].
    pub waiting: Waiting,
    /// Made from [`Config::server`]: the defaults a server needs.
    server_defaults: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            handshake: Arc::new(Profile::Secure),
            workers: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_message_size: 1 << 20,
            read_buffer_size: 16 << 10,
            max_queued_bytes: 1 << 20,
            max_in_flight: 256,
            dial_timeout: Some(Duration::from_secs(5)),
            handshake_timeout: Some(Duration::from_secs(5)),
            read_timeout: None,
            frame_timeout: None,
            write_timeout: Some(Duration::from_secs(10)),
            send_timeout: Some(Duration::from_secs(10)),
            drain_timeout: Duration::from_secs(10),
            request_timeout: Some(Duration::from_secs(30)),
            max_conns: 4,
            accept_wait: Duration::from_secs(1),
            dial_attempts: 3,
            dial_backoff: Duration::from_millis(100),
            dial_backoff_max: Duration::from_secs(2),
            backlog: 1024,
            send_buffer_size: None,
            recv_buffer_size: None,
            unsent_low_water: Some(64 << 10),
            waiting: Waiting::Auto,
            server_defaults: false,
        }
    }
}

impl std::fmt::Debug for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Config")
            .field("workers", &self.workers)
            .field("max_message_size", &self.max_message_size)
            .field("read_buffer_size", &self.read_buffer_size)
            .field("max_queued_bytes", &self.max_queued_bytes)
            .field("max_in_flight", &self.max_in_flight)
            .field("dial_timeout", &self.dial_timeout)
            .field("handshake_timeout", &self.handshake_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("frame_timeout", &self.frame_timeout)
            .field("write_timeout", &self.write_timeout)
            .field("send_timeout", &self.send_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("max_conns", &self.max_conns)
            .field("accept_wait", &self.accept_wait)
            .field("dial_backoff", &self.dial_backoff)
            .field("dial_backoff_max", &self.dial_backoff_max)
            .field("send_buffer_size", &self.send_buffer_size)
            .field("recv_buffer_size", &self.recv_buffer_size)
            .field("unsent_low_water", &self.unsent_low_water)
            .field("waiting", &self.waiting)
            .finish_non_exhaustive()
    }
}

macro_rules! setter {
    ($(#[$doc:meta])* $name:ident: $ty:ty) => {
        $(#[$doc])*
        pub fn $name(mut self, value: $ty) -> Self {
            self.$name = value;
            self
        }
    };
}

impl Config {
    /// The defaults for a server: as [`Default`], but with a 60 s read
    /// (and frame) timeout and a cap of 1024 connections. A [`Server`](crate::Server)
    /// takes only a configuration made from this (see
    /// [`Server::bind`](crate::Server::bind)), so that it cannot end up
    /// with a client's defaults (a cap of 4 connections and no read
    /// timeout) unnoticed.
    pub fn server() -> Self {
        Config {
            max_conns: 1024,
            server_defaults: true,
            ..Config::default()
        }
        .read_timeout(Some(Duration::from_secs(60)))
    }

    /// Whether this configuration was made from [`Config::server`].
    pub(crate) fn has_server_defaults(&self) -> bool {
        self.server_defaults
    }

    /// Uses the specification's handshake with `profile`.
    pub fn profile(self, profile: Profile) -> Self {
        self.handshake(Arc::new(profile))
    }

    setter!(
        /// Uses a custom handshake.
        handshake: Arc<dyn HandshakeFactory>
    );
    setter!(
        /// Sets [`Config::workers`].
        workers: usize
    );
    setter!(
        /// Sets [`Config::max_message_size`].
        max_message_size: usize
    );
    setter!(
        /// Sets [`Config::read_buffer_size`].
        read_buffer_size: usize
    );
    setter!(
        /// Sets [`Config::max_queued_bytes`].
        max_queued_bytes: usize
    );
    setter!(
        /// Sets [`Config::max_in_flight`].
        max_in_flight: usize
    );
    setter!(
        /// Sets [`Config::dial_timeout`]; `None` disables it.
        dial_timeout: Option<Duration>
    );
    setter!(
        /// Sets [`Config::handshake_timeout`]; `None` disables it.
        handshake_timeout: Option<Duration>
    );
    /// Sets [`Config::read_timeout`], and [`Config::frame_timeout`] to the
    /// same value; `None` disables both.
    ///
    /// ```
    /// use std::time::Duration;
    /// use monte_rpc::Config;
    ///
    /// let config = Config::server()
    ///     .read_timeout(Some(Duration::from_secs(30)))
    ///     .frame_timeout(Some(Duration::from_secs(5)));
    /// assert_eq!(config.read_timeout, Some(Duration::from_secs(30)));
    /// assert_eq!(config.frame_timeout, Some(Duration::from_secs(5)));
    /// ```
    pub fn read_timeout(mut self, value: Option<Duration>) -> Self {
        self.read_timeout = value;
        self.frame_timeout = value;
        self
    }
    setter!(
        /// Sets [`Config::frame_timeout`]; `None` disables it.
        frame_timeout: Option<Duration>
    );
    /// Sets [`Config::write_timeout`], and with it
    /// [`Config::send_timeout`] (to the same value) and
    /// [`Config::drain_timeout`] (the same, or 5 s for `None`); set those
    /// after it for other values. `None` disables the first two.
    ///
    /// ```
    /// use std::time::Duration;
    /// use monte_rpc::Config;
    ///
    /// let config = Config::server()
    ///     .write_timeout(Some(Duration::from_secs(4)))
    ///     .drain_timeout(Duration::from_secs(1));
    /// assert_eq!(config.send_timeout, Some(Duration::from_secs(4)));
    /// assert_eq!(config.drain_timeout, Duration::from_secs(1));
    /// ```
    pub fn write_timeout(mut self, value: Option<Duration>) -> Self {
        self.write_timeout = value;
        self.send_timeout = value;
        self.drain_timeout = value.unwrap_or(Duration::from_secs(5));
        self
    }
    setter!(
        /// Sets [`Config::send_timeout`]; `None` disables it.
        send_timeout: Option<Duration>
    );
    setter!(
        /// Sets [`Config::drain_timeout`].
        drain_timeout: Duration
    );
    setter!(
        /// Sets [`Config::request_timeout`]; `None` disables it.
        request_timeout: Option<Duration>
    );
    setter!(
        /// Sets [`Config::max_conns`].
        max_conns: usize
    );
    setter!(
        /// Sets [`Config::accept_wait`].
        accept_wait: Duration
    );
    setter!(
        /// Sets [`Config::dial_attempts`].
        dial_attempts: usize
    );
    setter!(
        /// Sets [`Config::dial_backoff`]; zero disables it.
        dial_backoff: Duration
    );
    setter!(
        /// Sets [`Config::dial_backoff_max`].
        dial_backoff_max: Duration
    );
    setter!(
        /// Sets [`Config::backlog`].
        backlog: i32
    );
    setter!(
        /// Sets [`Config::send_buffer_size`].
        send_buffer_size: Option<usize>
    );
    setter!(
        /// Sets [`Config::recv_buffer_size`].
        recv_buffer_size: Option<usize>
    );
    setter!(
        /// Sets [`Config::unsent_low_water`]; `None` never sets it (the
        /// system's: no limit but the send buffer).
        ///
        /// ```
        /// use monte_rpc::Config;
        ///
        /// assert_eq!(Config::default().unsent_low_water, Some(64 << 10));
        /// // Streams keep at most 32 KiB unsent in the kernel.
        /// let config = Config::default().unsent_low_water(Some(32 << 10));
        /// assert_eq!(config.unsent_low_water, Some(32 << 10));
        /// ```
        unsent_low_water: Option<usize>
    );
    setter!(
        /// Sets [`Config::waiting`].
        waiting: Waiting
    );

    /// What a connection's receive side is held to: its buffer, the frame
    /// limit and the deadlines it judges the peer by.
    pub(crate) fn core_limits(&self) -> crate::protocol::connection::Limits {
        crate::protocol::connection::Limits {
            buffer_size: self.read_buffer_size,
            max_message_size: self.max_message_size,
            deadlines: crate::protocol::connection::Deadlines {
                handshake: self.handshake_timeout,
                read: self.read_timeout,
                frame: self.frame_timeout,
            },
        }
    }

    /// The effective worker count (at least one).
    pub(crate) fn worker_count(&self) -> usize {
        self.workers.max(1)
    }
}
