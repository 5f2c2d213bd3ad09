//! Counters of what a client, server or reactor has done, and the plain
//! snapshot they are read into.
//!
//! Each reactor keeps its own counters (relaxed atomic adds, no allocation),
//! so reactors on different cores never share a counter's cache line on the
//! hot path; a [`Stats`] snapshot sums them.

use crate::error::{Error, TimeoutKind};
use crate::sync::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[$doc:meta])* $name:ident),* $(,)?) => {
        /// A snapshot of counters, summed over every reactor of a client or
        /// server (or one embedded reactor).
        ///
        /// ```
        /// # use monte_rpc::{Config, Context, Server};
        /// let server = Server::bind("127.0.0.1:0", Config::server(), |_: &mut Context<'_>| {})?;
        /// let stats = server.stats();
        /// assert_eq!(stats.connections_open, 0);
        /// # Ok::<(), monte_rpc::Error>(())
        /// ```
        ///
        /// # Exporting
        ///
        /// Two ways out, both listing every field under its own name, in
        /// the order the fields are declared:
        ///
        /// - for logs, `Display`: one line of `name=value` pairs separated
        ///   by single spaces (logfmt), such as `connections_open=2
        ///   connections_opened=5 ... reactor_wakeups=0`;
        /// - for a metrics system (Prometheus, statsd, ...),
        ///   [`fields`](Self::fields): every `(name, value)` pair, to feed
        ///   to your exporter. Take a snapshot every scrape or interval.
        ///
        /// Three fields are gauges, values now: `connections_open`,
        /// `connections_waiting` and `requests_in_flight`. Every other field is a counter: it only
        /// grows over the life of the client, server or reactor, so
        /// rates come from the differences between snapshots.
        ///
        /// ```
        /// use std::fmt::Write;
        /// use monte_rpc::{handler, Config, Server};
        ///
        /// let server = Server::bind("127.0.0.1:0", Config::server(), handler(|_| {}))?;
        /// let stats = server.stats();
        ///
        /// // A log line.
        /// let line = stats.to_string();
        /// assert!(line.starts_with("connections_open=0 connections_opened=0 "));
        ///
        /// // Prometheus' text format.
        /// let mut page = String::new();
        /// for (name, value) in stats.fields() {
        ///     let (metric, kind) = match name {
        ///         "connections_open" | "connections_waiting" | "requests_in_flight" => {
        ///             (format!("monte_rpc_{name}"), "gauge")
        ///         }
        ///         _ => (format!("monte_rpc_{name}_total"), "counter"),
        ///     };
        ///     writeln!(page, "# TYPE {metric} {kind}\n{metric} {value}").unwrap();
        /// }
        /// assert!(page.contains("# TYPE monte_rpc_frames_in_total counter\nmonte_rpc_frames_in_total 0\n"));
        /// # Ok::<(), monte_rpc::Error>(())
        /// ```
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
        #[non_exhaustive]
        pub struct Stats {
            $($(#[$doc])* pub $name: u64,)*
        }

        impl Stats {
            /// Every field as `(name, value)`, in declaration order; the
            /// name is the field's own. See [Exporting](Self#exporting).
            pub fn fields(&self) -> impl ExactSizeIterator<Item = (&'static str, u64)> {
                [$((stringify!($name), self.$name)),*].into_iter()
            }
        }

        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            /// Adds these counters into `into`.
            pub(crate) fn add_to(&self, into: &mut Stats) {
                $(into.$name += self.$name.load(Ordering::Relaxed);)*
            }
        }
    };
}

counters! {
    /// Connections open now (handshakes included).
    connections_open,
    /// Connections accepted (server) or dialled (client) in all.
    connections_opened,
    /// Server: connections closed because the cap stayed full for the
    /// whole accept wait.
    connections_refused,
    /// Server: connections accepted over the cap, waiting for a place now
    /// (at most the accept wait each).
    connections_waiting,
    /// Connections closed in an orderly way by this side.
    closed_local,
    /// Connections the peer closed.
    closed_by_peer,
    /// Connections closed at the handshake timeout.
    closed_handshake_timeout,
    /// Connections closed at the read (idle) timeout.
    closed_read_timeout,
    /// Connections closed at the write timeout.
    closed_write_timeout,
    /// Connections closed because a frame did not complete within the
    /// frame timeout, counted from its first byte.
    closed_frame_timeout,
    /// Connections closed because the peer broke the protocol (bad frame,
    /// failed authentication, handshake rejected).
    closed_protocol_error,
    /// Connections closed by an I/O error or for another reason.
    closed_other,
    /// Handshakes that failed.
    handshakes_failed,
    /// Messages received and opened: a frame each, or a record each of a
    /// bundled frame (PROTOCOL.md, "Bundled frames").
    frames_in,
    /// Bytes received (wire bytes of opened frames).
    bytes_in,
    /// Messages queued for sending (a bundled frame counts each of its
    /// messages).
    frames_out,
    /// Wire bytes queued for sending.
    bytes_out,
    /// Frames refused because their length prefix was below the minimum.
    frames_rejected_too_short,
    /// Frames refused because their length prefix was above the maximum.
    frames_rejected_too_large,
    /// Frames that failed authentication.
    frames_rejected_authentication,
    /// Responses that matched no waiting request (unknown, or late after a
    /// timeout) and were dropped.
    responses_dropped,
    /// Requests awaiting their response now.
    requests_in_flight,
    /// Requests that ran out of their own time (blocking or async): while
    /// waiting for a connection (a dial included), for room in the
    /// queue, or for the response.
    requests_timed_out,
    /// Times a connection's reading and dispatch paused because its queued
    /// output passed `max_queued_bytes` (a peer not reading its replies).
    reads_paused,
    /// Times a reactor asleep in epoll was woken by a socket's readiness or
    /// a command (a queued frame, a new connection, ...), not by a timer.
    /// Each costs a thread wake-up; a caller blocked in `request` reads
    /// its own response, so round trips add none on the calling side.
    reactor_wakeups,
}

/// One line of `name=value` pairs separated by single spaces, every field
/// in declaration order: see [Exporting](Stats#exporting).
impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, (name, value)) in self.fields().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{name}={value}")?;
        }
        Ok(())
    }
}

/// A gauge counted up while this lives: down again on every way out,
/// unwinding included.
pub(crate) struct GaugeHeld<'a>(&'a AtomicU64);

impl<'a> GaugeHeld<'a> {
    pub(crate) fn new(gauge: &'a AtomicU64) -> Self {
        Counters::inc(gauge);
        GaugeHeld(gauge)
    }
}

impl Drop for GaugeHeld<'_> {
    fn drop(&mut self) {
        Counters::dec(self.0);
    }
}

impl Counters {
    pub(crate) fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn dec(counter: &AtomicU64) {
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Takes back the count of a connection handed to a reactor that never
    /// took it (it had stopped).
    pub(crate) fn uncount_open(&self) {
        Self::dec(&self.connections_open);
        Self::dec(&self.connections_opened);
    }

    /// Counts a request that failed with `error` if that is its own
    /// timeout (bare, or as the cause of a dial's failure) and its own
    /// deadline has indeed passed (`deadline_passed`): not a request that
    /// failed early with another call's timeout (a dial that call's
    /// deadline cut short, or a connection closed as silent). Each layer
    /// counts only where the time ran out under it: a connection's request
    /// while it waited for room or for its response, a client's while it
    /// waited for a connection (its dial included).
    pub(crate) fn count_request_failure(&self, error: &Error, deadline_passed: bool) {
        if deadline_passed && matches!(error.root_cause(), Error::Timeout(TimeoutKind::Request)) {
            Self::inc(&self.requests_timed_out);
        }
    }

    /// Counts a closed connection by its reason, and a rejected frame if
    /// that was the reason.
    pub(crate) fn count_close(&self, reason: &Error, during_handshake: bool) {
        Self::dec(&self.connections_open);
        if during_handshake {
            Self::inc(&self.handshakes_failed);
        }
        let counter = match reason {
            Error::Closed => &self.closed_local,
            Error::PeerClosed => &self.closed_by_peer,
            Error::Timeout(TimeoutKind::Handshake) => &self.closed_handshake_timeout,
            Error::Timeout(TimeoutKind::Read) => &self.closed_read_timeout,
            Error::Timeout(TimeoutKind::Write) => &self.closed_write_timeout,
            Error::Timeout(TimeoutKind::Frame) => &self.closed_frame_timeout,
            Error::FrameTooShort { .. } => {
                Self::inc(&self.frames_rejected_too_short);
                &self.closed_protocol_error
            }
            Error::FrameTooLarge { .. } => {
                Self::inc(&self.frames_rejected_too_large);
                &self.closed_protocol_error
            }
            Error::Authentication => {
                Self::inc(&self.frames_rejected_authentication);
                &self.closed_protocol_error
            }
            Error::Handshake(crate::HandshakeError::PeerClosed) => &self.closed_by_peer,
            // The application's own handshake code failed, not the peer.
            Error::Handshake(
                crate::HandshakeError::Panicked | crate::HandshakeError::UsedMoreThanGiven { .. },
            ) => &self.closed_other,
            Error::Handshake(_)
            | Error::ReceiveFailed
            | Error::CounterExhausted
            | Error::MalformedBundle { .. } => &self.closed_protocol_error,
            _ => &self.closed_other,
        };
        Self::inc(counter);
    }
}
