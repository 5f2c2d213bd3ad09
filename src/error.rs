//! The crate's one public error type.
//!
//! Every failure a caller can see is a variant of [`Error`], and each variant
//! names one cause, so a caller can tell a timeout from a closed connection
//! from a peer that sent garbage without parsing strings. Handshake failures
//! carry a [`HandshakeError`] that says which step failed. A failed dial is
//! [`Error::Dial`]: the address, the [`DialPhase`] and the error underneath,
//! which [`Error::root_cause`] reaches.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;

/// Which deadline ran out, carried by [`Error::Timeout`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TimeoutKind {
    /// The TCP connect did not complete within the dial timeout.
    Dial,
    /// The handshake did not complete within the handshake timeout.
    Handshake,
    /// Nothing arrived from the peer within the read (idle) timeout.
    Read,
    /// A frame's first byte arrived but not its last within the frame
    /// timeout: a peer trickling a frame byte by byte.
    Frame,
    /// Queued output made no progress within the write timeout.
    Write,
    /// A request got no response within its request timeout.
    Request,
}

impl fmt::Display for TimeoutKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TimeoutKind::Dial => "dial",
            TimeoutKind::Handshake => "handshake",
            TimeoutKind::Read => "read",
            TimeoutKind::Frame => "frame",
            TimeoutKind::Write => "write",
            TimeoutKind::Request => "request",
        })
    }
}

/// Why a handshake failed, carried by [`Error::Handshake`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The peer's public key gave an all-zero X25519 shared secret: it is a
    /// low-order point, which would let the peer fix the session key.
    LowOrderPublicKey,
    /// The system random generator failed while making an ephemeral key.
    KeyGeneration,
    /// The peer closed the connection before the handshake finished.
    PeerClosed,
    /// Input was fed to a handshake that had already finished or failed.
    AlreadyFinished,
    /// A user-defined handshake rejected the peer; the code is the
    /// implementation's own.
    Rejected(u32),
    /// Application code the handshake ran panicked (a custom `Handshake`,
    /// its factory, or a callback such as an `identity` server's
    /// allow-list): the panic is contained, and only this connection is
    /// closed (on a client, the dial fails with it).
    Panicked,
    /// A custom [`Handshake`](crate::protocol::Handshake)'s `read_input`
    /// said it used more bytes than it was given (a bug in the
    /// handshake): only this connection is closed (on a client, the dial
    /// fails with it).
    UsedMoreThanGiven {
        /// What `read_input` returned.
        used: usize,
        /// The bytes it was given.
        given: usize,
    },
    /// A custom [`Handshake`](crate::protocol::Handshake) left this many
    /// of the peer's bytes unconsumed without finishing: as many as a
    /// connection holds for it at most (the larger of the largest frame
    /// and `read_buffer_size`). It waits for a message larger than any
    /// frame; holding on would let the peer's bytes take ever more memory
    /// until the handshake deadline. Only this connection is closed (on a
    /// client, the dial fails with it); a server counts it as a protocol
    /// error, the peer having sent more than the handshake takes.
    LeftUnconsumed {
        /// The bytes it left unconsumed.
        held: usize,
    },
    /// An `identity` client config pins no server key, so it would accept
    /// any server: pin one (`IdentityConfig::pinned`) or opt out explicitly
    /// (`IdentityConfig::unpinned_client`, `allow_unpinned_server`).
    NoPinnedServer,
    /// What the peer sent right after the handshake does not start a frame
    /// this side accepts (its length prefix is below the minimum or above
    /// the maximum): the peer most likely speaks another protocol, such as
    /// an HTTP server answering a request it cannot parse. The `secure`
    /// and `monte` handshakes take any 32 bytes for the server's key, so
    /// such a peer gets past them and shows here, on the client. (A peer of
    /// this protocol whose first message is above this side's
    /// `max_message_size` reads the same.)
    NotThisProtocol {
        /// The first bytes the peer sent, up to 16.
        sent: [u8; 16],
        /// How many of `sent` the peer sent.
        sent_len: u8,
    },
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::LowOrderPublicKey => {
                f.write_str("peer public key is a low-order point (all-zero shared secret)")
            }
            HandshakeError::KeyGeneration => f.write_str("ephemeral key generation failed"),
            HandshakeError::PeerClosed => f.write_str("peer closed during the handshake"),
            HandshakeError::AlreadyFinished => f.write_str("handshake already finished"),
            HandshakeError::Panicked => f.write_str("the handshake's application code panicked"),
            HandshakeError::UsedMoreThanGiven { used, given } => write!(
                f,
                "the handshake's read_input said it used {used} bytes of the {given} it was given"
            ),
            HandshakeError::LeftUnconsumed { held } => write!(
                f,
                "the handshake left {held} of the peer's bytes unconsumed without finishing, \
                 as many as a connection holds for it (the larger of the largest frame and \
                 read_buffer_size)"
            ),
            HandshakeError::Rejected(code) => write!(f, "handshake rejected (code {code})"),
            HandshakeError::NotThisProtocol { sent, sent_len } => {
                let sent = &sent[..usize::from(*sent_len).min(sent.len())];
                write!(
                    f,
                    "the peer does not speak this protocol: it sent \"{}\"..., and what \
                     followed the handshake is not a frame within the size limit",
                    sent.escape_ascii()
                )
            }
            HandshakeError::NoPinnedServer => f.write_str(
                "identity client without a pinned server key: pin one with \
                 IdentityConfig::pinned, or accept any server explicitly with \
                 IdentityConfig::unpinned_client / allow_unpinned_server",
            ),
        }
    }
}

/// What a dial was doing when it failed, carried by [`Error::Dial`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DialPhase {
    /// The TCP connect (every attempt, and the pauses between them).
    Connect,
    /// The client side of the handshake, on a connected socket.
    Handshake,
    /// Waiting for the dial another call to the same client was making.
    Queued,
    /// The application's [`Handler::on_open`](crate::Handler::on_open),
    /// run on the dialled connection before anything else may use it: it
    /// panicked, or the connection closed meanwhile.
    Open,
}

impl fmt::Display for DialPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DialPhase::Connect => "connect",
            DialPhase::Handshake => "handshake",
            DialPhase::Queued => "waiting for another call's dial",
            DialPhase::Open => "on_open",
        })
    }
}

/// The call that failed, carried by [`Error::Call`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum CallOp {
    /// `send`.
    Send,
    /// `send_no_wait`.
    SendNoWait,
    /// `request` or `request_timeout`.
    Request,
    /// `reply` (a handler's, or a deferred one).
    Reply,
}

impl fmt::Display for CallOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CallOp::Send => "send",
            CallOp::SendNoWait => "send_no_wait",
            CallOp::Request => "request",
            CallOp::Reply => "reply",
        })
    }
}

/// Everything that can go wrong in monte-rpc.
///
/// Errors are cheap to clone, so one connection failure can be handed to
/// every request that was waiting on that connection. The errors of calls
/// come in context: [`Error::Call`] (which call, to whom) or
/// [`Error::Dial`] (which address, which phase), around the cause.
///
/// ```
/// use monte_rpc::{Error, TimeoutKind};
///
/// fn retryable(e: &Error) -> bool {
///     // `root_cause` looks through the context a call or a dial adds.
///     matches!(e.root_cause(), Error::Timeout(TimeoutKind::Request) | Error::Closed)
/// }
/// assert!(retryable(&Error::Closed));
/// assert!(!retryable(&Error::Authentication));
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum Error {
    /// The handshake failed; the connection is closed.
    Handshake(HandshakeError),
    /// A frame's length prefix is above the configured maximum. Detected
    /// from the 4-byte prefix alone, before anything is sized for it.
    ///
    /// Both lengths are ciphertext lengths, as the prefix counts them: a
    /// message plus 20 bytes of sequence number and tag, so `max` is
    /// `max_message_size + 20`. Where the handshake agreed on bundled
    /// frames (PROTOCOL.md), a frame's message also has a 4-byte length
    /// (`max` is `max_message_size + 24`), and a frame of several may be
    /// 16 KiB whatever the message size; a record in one that is larger
    /// than `max_message_size` is reported as a frame of its own would
    /// be. The message says which.
    ///
    /// ```
    /// use monte_rpc::Error;
    ///
    /// let e = Error::FrameTooLarge { len: 1949127801, max: (1 << 20) + 20, max_message: 1 << 20 };
    /// assert_eq!(
    ///     e.to_string(),
    ///     "frame length prefix of 1949127801 bytes exceeds the limit of 1048596 \
    ///      (max_message_size 1048576 plus 20 bytes of sequence number and tag)"
    /// );
    /// ```
    FrameTooLarge {
        /// The ciphertext length the prefix claimed.
        len: usize,
        /// The largest ciphertext length this side accepts.
        max: usize,
        /// The configured `max_message_size` the limit comes from.
        max_message: usize,
    },
    /// A frame's length prefix is below 20 bytes (sequence number plus tag),
    /// so it cannot be a valid frame.
    FrameTooShort {
        /// The ciphertext length the prefix claimed.
        len: usize,
    },
    /// A frame failed to authenticate: a flipped bit, a replayed, reordered
    /// or truncated frame, or a peer holding other keys. Fatal for the
    /// connection.
    Authentication,
    /// The receiving direction already failed to open a frame and refuses
    /// all further input, so a failed open can never be retried.
    ReceiveFailed,
    /// A direction's 64-bit frame counter is used up; sealing or opening
    /// another frame would reuse a nonce.
    CounterExhausted,
    /// A bundled frame (PROTOCOL.md, "Bundled frames") whose records do
    /// not fill its plaintext exactly: a record's header or payload runs
    /// `claimed` bytes where only `left` remain. Also a frame of several
    /// records whose plaintext (`claimed`) is over the bundle limit
    /// (`left`). The frame authenticated, so the peer built it so: fatal
    /// for the connection.
    MalformedBundle {
        /// The bytes the record's header or payload needs.
        claimed: usize,
        /// The bytes of plaintext left for it.
        left: usize,
    },
    /// A message to send is larger than the configured maximum message size.
    MessageTooLarge {
        /// The payload length that was offered.
        len: usize,
        /// The largest payload this side sends.
        max: usize,
    },
    /// A caller-provided buffer cannot hold the sealed frame.
    BufferTooSmall {
        /// Bytes the frame needs.
        needed: usize,
        /// Bytes the buffer has.
        available: usize,
    },
    /// Every request sequence number is in use by a pending request.
    SequenceExhausted,
    /// A deadline ran out.
    Timeout(TimeoutKind),
    /// The connection, client or server is closed (or shutting down); the
    /// call did not and will not complete.
    Closed,
    /// The peer closed the connection.
    PeerClosed,
    /// The server refused the connection: its connection cap stayed full
    /// for the whole accept wait (or too many connections already waited).
    /// The server says so on the wire (see PROTOCOL.md), so the client's
    /// dial fails with this rather than with a reset.
    ConnectionLimit,
    /// A configuration that does not fit its use: the message says which
    /// and what to do instead (a [`Server`](crate::Server) given a client's
    /// configuration).
    InvalidConfig(&'static str),
    /// The connection's outbound queue already holds `max_queued_bytes`,
    /// and the call could not wait for room because it was made on the
    /// connection's own reactor thread (from a handler).
    QueueFull,
    /// A call that waits (a `request`) was made on a reactor thread, from
    /// a handler: the response could only be read by that same thread, so
    /// it would wait for itself. Make the call from another thread.
    OnReactorThread,
    /// An async request on a client (with no other connection to take) or
    /// on the connection was made from a dialled connection's `on_open`
    /// (or from the `on_close` that follows it when the connection closed
    /// there), which runs before the connection's reactor takes the
    /// connection: past its short spin (see [`Waiting`](crate::Waiting)),
    /// only that reactor reads an async request's response, so the
    /// request could only wait until its deadline. Make it a
    /// blocking request (a blocking caller reads its own response), or
    /// after `on_open` returns.
    AsyncRequestInOnOpen,
    /// A request on a dialled connection while its `on_open` runs, whose
    /// peer sent more messages ahead of the response than the connection
    /// holds for its handler until `on_open` returns (`limit` bytes: one
    /// message of the larger of `max_message_size` and `read_buffer_size`,
    /// with its framing). The response could be read only past them, by
    /// the connection's reactor, which takes the connection once `on_open`
    /// returns: every request waiting on the connection then (from
    /// `on_open`, or from a thread it started) fails with this at once,
    /// rather than at its deadline. The request was sent: the peer runs
    /// it, and its late response is dropped (counted in
    /// `responses_dropped`), so a retry runs it twice. The connection
    /// stays open; the messages reach `on_message` in order after
    /// `on_open`. Make the request after `on_open` returns, or raise the
    /// limits.
    ///
    /// ```
    /// use monte_rpc::Error;
    ///
    /// let e = Error::MessagesAheadInOnOpen { limit: 8_248 };
    /// assert!(e.to_string().starts_with(
    ///     "a request made while on_open runs is behind more than 8248 bytes"
    /// ));
    /// ```
    MessagesAheadInOnOpen {
        /// The bytes of messages the connection holds for its handler.
        limit: usize,
    },
    /// The application's handler panicked; its connection was closed and
    /// the reactor carried on.
    HandlerPanicked,
    /// An operating-system I/O error.
    Io(Arc<io::Error>),
    /// Dialling `addr` failed in `phase`; `source` says how. It is what
    /// each phase can fail with: in [`DialPhase::Connect`], [`Error::Io`]
    /// (a refusal, an unreachable network) or [`Error::Timeout`]; in
    /// [`DialPhase::Handshake`], [`Error::Handshake`], [`Error::Io`],
    /// [`Error::Timeout`] or what a custom handshake returns; in
    /// [`DialPhase::Queued`], [`Error::Timeout`]; in [`DialPhase::Open`],
    /// [`Error::HandlerPanicked`] or the reason the connection closed
    /// during `on_open`. The timeout is the
    /// dial's own ([`TimeoutKind::Dial`], [`TimeoutKind::Handshake`]) or,
    /// when the call's deadline ran out first, the call's
    /// ([`TimeoutKind::Request`] for a request, [`TimeoutKind::Write`] for
    /// a send). [`root_cause`](Error::root_cause) and
    /// [`io_kind`](Error::io_kind) look through to `source`.
    ///
    /// ```
    /// use monte_rpc::{Client, Config, DialPhase, Error};
    ///
    /// let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    /// let client = Client::new(addr, Config::default().dial_attempts(1))?;
    /// let e = client.send(b"hello").unwrap_err();
    /// assert!(matches!(e, Error::Dial { phase: DialPhase::Connect, .. }));
    /// assert_eq!(e.io_kind(), std::io::ErrorKind::ConnectionRefused);
    /// // "dialling 127.0.0.1:PORT: connect: Connection refused (os error 111)"
    /// assert!(e.to_string().starts_with(&format!("dialling {addr}: connect: ")));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    Dial {
        /// The address dialled.
        addr: SocketAddr,
        /// What the dial was doing.
        phase: DialPhase,
        /// Why it failed. Never an [`Error::Dial`] itself.
        source: Arc<Error>,
    },
    /// A call on a client or a connection failed: which call, to whom,
    /// and why. Every error of `send`, `send_no_wait`, `request` and
    /// `reply` comes in this context, except a failed dial, which is
    /// [`Error::Dial`] (naming the address and the phase). Match on
    /// [`root_cause`](Error::root_cause), or ask
    /// [`timeout_kind`](Error::timeout_kind) and
    /// [`io_kind`](Error::io_kind), to tell the causes apart.
    ///
    /// ```
    /// use monte_rpc::{handler, CallOp, Client, Config, Error, Server};
    ///
    /// let server = Server::bind("127.0.0.1:0", Config::server(), handler(|_| {}))?;
    /// let client = Client::new(server.local_addr(), Config::default())?;
    /// let e = client.send(&vec![0; 2 << 20]).unwrap_err(); // over 1 MiB
    /// assert!(matches!(e, Error::Call { op: CallOp::Send, .. }));
    /// assert!(matches!(e.root_cause(), Error::MessageTooLarge { .. }));
    /// // "send to 127.0.0.1:PORT: message of 2097152 bytes exceeds ..."
    /// assert!(e.to_string().starts_with(&format!("send to {}: ", server.local_addr())));
    /// # Ok::<(), Error>(())
    /// ```
    Call {
        /// The call.
        op: CallOp,
        /// The peer, if known.
        peer: Option<SocketAddr>,
        /// Why it failed. Never an [`Error::Call`] or [`Error::Dial`].
        source: Arc<Error>,
    },
}

impl Error {
    /// The error underneath the context: for [`Error::Dial`] its `source`,
    /// for anything else the error itself. Match on it to tell causes
    /// apart whatever was being done (a timeout from a refusal, say).
    ///
    /// ```
    /// use std::sync::Arc;
    /// use monte_rpc::{DialPhase, Error, TimeoutKind};
    ///
    /// let e = Error::Dial {
    ///     addr: "127.0.0.1:5000".parse().unwrap(),
    ///     phase: DialPhase::Connect,
    ///     source: Arc::new(Error::Timeout(TimeoutKind::Request)),
    /// };
    /// assert!(matches!(e.root_cause(), Error::Timeout(TimeoutKind::Request)));
    /// assert_eq!(e.to_string(), "dialling 127.0.0.1:5000: connect: request timeout");
    /// ```
    pub fn root_cause(&self) -> &Error {
        match self {
            Error::Dial { source, .. } | Error::Call { source, .. } => source.root_cause(),
            e => e,
        }
    }

    /// Which deadline ran out, if this is a timeout (also under the
    /// context of a failed dial).
    pub fn timeout_kind(&self) -> Option<TimeoutKind> {
        match self.root_cause() {
            Error::Timeout(kind) => Some(*kind),
            _ => None,
        }
    }

    /// Puts `self` in the context of the call `op` to `peer`, unless it
    /// already has one (a failed dial, or an inner call's context).
    pub(crate) fn calling(self, op: CallOp, peer: Option<SocketAddr>) -> Error {
        match self {
            e @ (Error::Dial { .. } | Error::Call { .. }) => e,
            e => Error::Call {
                op,
                peer,
                source: Arc::new(e),
            },
        }
    }

    /// Wraps `self` as a failed dial of `addr` in `phase`, unless it
    /// already is one.
    pub(crate) fn dialling(self, addr: SocketAddr, phase: DialPhase) -> Error {
        match self {
            e @ Error::Dial { .. } => e,
            e => Error::Dial {
                addr,
                phase,
                source: Arc::new(e),
            },
        }
    }

    /// The `io::ErrorKind` closest to this error, for callers that speak
    /// `std::io`.
    pub fn io_kind(&self) -> io::ErrorKind {
        match self {
            Error::Dial { source, .. } | Error::Call { source, .. } => source.io_kind(),
            Error::Io(e) => e.kind(),
            Error::Timeout(_) => io::ErrorKind::TimedOut,
            Error::Closed => io::ErrorKind::NotConnected,
            Error::PeerClosed => io::ErrorKind::ConnectionReset,
            Error::BufferTooSmall { .. } | Error::MessageTooLarge { .. } => {
                io::ErrorKind::InvalidInput
            }
            Error::AsyncRequestInOnOpen | Error::MessagesAheadInOnOpen { .. } => {
                io::ErrorKind::InvalidInput
            }
            _ => io::ErrorKind::InvalidData,
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Handshake(e) => write!(f, "handshake failed: {e}"),
            Error::FrameTooLarge {
                len,
                max,
                max_message,
            } => {
                // `max` counts the framing, so it is not the configured
                // message size: say both, and what lies between.
                write!(
                    f,
                    "frame length prefix of {len} bytes exceeds the limit of {max} "
                )?;
                let framing = max.saturating_sub(*max_message);
                let record = crate::protocol::RECORD_HEADER_LEN - crate::protocol::SEQ_LEN;
                if framing == crate::protocol::MIN_CIPHERTEXT_LEN {
                    write!(
                        f,
                        "(max_message_size {max_message} plus {framing} bytes of sequence \
                         number and tag)"
                    )
                } else if framing == crate::protocol::MIN_CIPHERTEXT_LEN + record {
                    write!(
                        f,
                        "(max_message_size {max_message} plus {framing} bytes of sequence \
                         number, length and tag)"
                    )
                } else {
                    write!(
                        f,
                        "(a bundled frame's {} bytes of records plus a {}-byte tag; \
                         max_message_size {max_message})",
                        crate::protocol::BUNDLE_LIMIT,
                        crate::protocol::TAG_LEN
                    )
                }
            }
            Error::FrameTooShort { len } => {
                write!(f, "frame of {len} bytes is below the minimum of 20")
            }
            Error::Authentication => f.write_str("frame failed authentication"),
            Error::ReceiveFailed => {
                f.write_str("receiving direction already failed; input refused")
            }
            Error::CounterExhausted => f.write_str("frame counter exhausted"),
            Error::MalformedBundle { claimed, left } => write!(
                f,
                "bundled frame malformed: a record needs {claimed} bytes where \
                 {left} are left of the frame's plaintext"
            ),
            Error::MessageTooLarge { len, max } => {
                write!(f, "message of {len} bytes exceeds the maximum of {max}")
            }
            Error::BufferTooSmall { needed, available } => {
                write!(f, "buffer of {available} bytes cannot hold {needed}")
            }
            Error::SequenceExhausted => f.write_str("all request sequence numbers are in use"),
            Error::Timeout(kind) => write!(f, "{kind} timeout"),
            Error::Closed => f.write_str("closed"),
            Error::PeerClosed => f.write_str("peer closed the connection"),
            Error::ConnectionLimit => {
                f.write_str("the server refused the connection: its connection limit is reached")
            }
            Error::InvalidConfig(why) => write!(f, "invalid configuration: {why}"),
            Error::HandlerPanicked => f.write_str("handler panicked"),
            Error::QueueFull => f.write_str("outbound queue full"),
            Error::OnReactorThread => {
                f.write_str("a waiting call was made on a reactor thread, which it would block")
            }
            Error::AsyncRequestInOnOpen => f.write_str(
                "an async request was made from a dialled connection's on_open (or the on_close \
                 that follows a close there), before the connection's reactor reads it",
            ),
            Error::MessagesAheadInOnOpen { limit } => write!(
                f,
                "a request made while on_open runs is behind more than {limit} bytes of the \
                 peer's messages, which wait for the handler until on_open returns (the request \
                 was sent)"
            ),
            Error::Io(e) => write!(f, "i/o error: {e}"),
            Error::Dial {
                addr,
                phase,
                source,
            } => {
                write!(f, "dialling {addr}: {phase}: ")?;
                // The phase already says what failed: no "i/o error" or
                // "handshake failed" in front of the cause.
                match &**source {
                    Error::Io(e) => write!(f, "{e}"),
                    Error::Handshake(e) => write!(f, "{e}"),
                    e => write!(f, "{e}"),
                }
            }
            Error::Call { op, peer, source } => {
                match peer {
                    Some(peer) => write!(f, "{op} to {peer}: ")?,
                    None => write!(f, "{op}: ")?,
                }
                match &**source {
                    // The socket error says what it was doing and to whom.
                    Error::Io(e) => write!(f, "{e}"),
                    e => write!(f, "{e}"),
                }
            }
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Io(e) => Some(&**e),
            Error::Dial { source, .. } | Error::Call { source, .. } => Some(&**source),
            _ => None,
        }
    }
}

/// What a connection was doing when its socket failed.
#[derive(Debug, Clone, Copy)]
pub(crate) enum SocketOp {
    Reading,
    Writing,
}

/// A socket error on a connection, with what was being done and to whom:
/// an [`Error::Io`] of the same kind whose message says so, and whose
/// `source()` is the system's error. A write the peer cut short also
/// points at the likeliest reason a peer of this library closes: a frame
/// over its `max_message_size`.
pub(crate) fn socket_error(op: SocketOp, peer: Option<SocketAddr>, e: io::Error) -> Error {
    let kind = e.kind();
    Error::Io(Arc::new(io::Error::new(
        kind,
        SocketFailure {
            op,
            peer,
            source: e,
        },
    )))
}

#[derive(Debug)]
struct SocketFailure {
    op: SocketOp,
    peer: Option<SocketAddr>,
    source: io::Error,
}

impl fmt::Display for SocketFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.op {
            SocketOp::Reading => "reading from",
            SocketOp::Writing => "writing to",
        };
        match self.peer {
            Some(peer) => write!(f, "{what} {peer}: {}", self.source)?,
            None => write!(f, "{what} the peer: {}", self.source)?,
        }
        let cut_short = matches!(
            self.source.kind(),
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset
        );
        if cut_short && matches!(self.op, SocketOp::Writing) {
            f.write_str(
                " (the peer closed the connection; a monte-rpc peer does so when a \
                 frame exceeds its max_message_size, and counts it in its \
                 frames_rejected_too_large)",
            )?;
        }
        Ok(())
    }
}

impl std::error::Error for SocketFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

/// A thread the library needed could not be started (the system's
/// thread or memory limits): an [`Error::Io`] of the same kind whose
/// message names the thread, and whose `source()` is the system's error.
pub(crate) fn thread_start_error(thread: &str, e: io::Error) -> Error {
    Error::Io(Arc::new(io::Error::new(
        e.kind(),
        ThreadStartFailure {
            thread: thread.to_owned(),
            source: e,
        },
    )))
}

#[derive(Debug)]
struct ThreadStartFailure {
    thread: String,
    source: io::Error,
}

impl fmt::Display for ThreadStartFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "starting the thread {}: {}", self.thread, self.source)
    }
}

impl std::error::Error for ThreadStartFailure {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.source)
    }
}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(Arc::new(e))
    }
}

impl From<HandshakeError> for Error {
    fn from(e: HandshakeError) -> Self {
        Error::Handshake(e)
    }
}

impl From<Error> for io::Error {
    fn from(e: Error) -> Self {
        io::Error::new(e.io_kind(), e)
    }
}

/// Shorthand for results whose error is [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_that_could_not_start_is_named_with_the_systems_error() {
        let e = thread_start_error("monte-rpc-dial", io::Error::from(io::ErrorKind::WouldBlock));
        assert_eq!(e.io_kind(), io::ErrorKind::WouldBlock);
        let message = e.to_string();
        assert!(
            message.contains("starting the thread monte-rpc-dial"),
            "{message}"
        );
        let source = std::error::Error::source(&e).expect("the system's error, as the source");
        assert!(std::error::Error::source(source).is_some(), "{source}");
    }
}
