//! Dialling: the TCP connect and the client side of the handshake, run on
//! the calling thread, so that a reactor never blocks on a slow endpoint.
//!
//! The socket is non-blocking from its creation, and every wait is a
//! `ppoll` bounded by the time left: no switching the socket between
//! blocking and not, and no socket timeouts set and reset around each
//! step (a system call each, a dozen per dial). Once dialled, it becomes
//! the connection's [`ConnSocket`](crate::conn_socket::ConnSocket), set up
//! once for the connection's life.

use std::io::{self, Read};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::clock::CallDeadline;
use crate::config::Config;
use crate::error::{DialPhase, Error, HandshakeError, Result, TimeoutKind};
use crate::protocol::wire::frame_len;
use crate::protocol::{
    check_unconsumed, guard_handshake, read_handshake_input, FrameDecoder, Session,
};
use crate::socket_write::write_all_nonblocking;

/// Applies the configured socket options to a new socket.
pub(crate) fn tune(socket: &Socket, config: &Config) -> io::Result<()> {
    socket.set_tcp_nodelay(true)?;
    if let Some(n) = config.send_buffer_size {
        socket.set_send_buffer_size(n)?;
    }
    if let Some(n) = config.recv_buffer_size {
        socket.set_recv_buffer_size(n)?;
    }
    Ok(())
}

/// When one step of a dial must end and the timeout it fails with then:
/// the step's own timeout (`own`, reported as `own_kind`) from now, or the
/// call's deadline if that comes first.
fn step_deadline(
    own: Option<Duration>,
    own_kind: TimeoutKind,
    call: Option<CallDeadline>,
) -> Option<CallDeadline> {
    let own = CallDeadline::after(own, own_kind);
    match (own, call) {
        (Some(own), Some(call)) if call.at < own.at => Some(call),
        (Some(own), _) => Some(own),
        (None, call) => call,
    }
}

/// The time left before `until`, or the timeout it fails with if none is.
fn time_left(until: Option<CallDeadline>) -> Result<Option<Duration>> {
    match until {
        None => Ok(None),
        Some(d) => match d.at.checked_duration_since(Instant::now()) {
            Some(left) if !left.is_zero() => Ok(Some(left)),
            _ => Err(Error::Timeout(d.kind)),
        },
    }
}

/// The longest a dial waits at a time before it looks whether its owner
/// has given up on it (shut down): shutdown must not wait for a dial that
/// only its own timeouts bound, or none.
const ABANDON_CHECK: Duration = Duration::from_millis(50);

/// A wait of what is `left` (`None`: no limit), at most [`ABANDON_CHECK`]
/// at a time; [`Error::Closed`] once the owner has given up.
fn wait_slice(left: Option<Duration>, abandoned: &dyn Fn() -> bool) -> Result<Option<Duration>> {
    if abandoned() {
        return Err(Error::Closed);
    }
    Ok(Some(
        left.map_or(ABANDON_CHECK, |left| left.min(ABANDON_CHECK)),
    ))
}

/// One connect attempt, within `dial_timeout` and the call's deadline,
/// until `abandoned`.
fn connect_once(
    addr: SocketAddr,
    config: &Config,
    call: Option<CallDeadline>,
    abandoned: &dyn Fn() -> bool,
) -> Result<Socket> {
    let until = step_deadline(config.dial_timeout, TimeoutKind::Dial, call);
    time_left(until)?;
    let socket = nonblocking_socket(Domain::for_address(addr))?;
    tune(&socket, config)?;
    match socket.connect(&SockAddr::from(addr)) {
        Ok(()) => return Ok(socket),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
        Err(e) => return Err(e.into()),
    }
    // In progress: writable once connected, or once it failed.
    while !crate::sys::wait_writable(&socket, wait_slice(time_left(until)?, abandoned)?) {}
    match socket.take_error()? {
        None => Ok(socket),
        // The kernel gave up first (its SYN retries outlast the timeout
        // set, or there is none): a dial timeout all the same.
        Some(e) if e.kind() == io::ErrorKind::TimedOut => {
            Err(Error::Timeout(until.map_or(TimeoutKind::Dial, |d| d.kind)))
        }
        Some(e) => Err(e.into()),
    }
}

/// A TCP socket, non-blocking from its creation on Linux (one call),
/// made so after it elsewhere.
fn nonblocking_socket(domain: Domain) -> io::Result<Socket> {
    #[cfg(target_os = "linux")]
    let socket = Socket::new(domain, Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
    #[cfg(not(target_os = "linux"))]
    let socket = {
        let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
        socket.set_nonblocking(true)?;
        socket
    };
    Ok(socket)
}

/// Connects (retrying up to `dial_attempts` times) and runs the client
/// handshake. Returns the socket, the session, and any bytes the peer sent
/// after its handshake that were already read. Every error is an
/// [`Error::Dial`] that names `addr` and the phase that failed.
///
/// The whole dial ends by `call`'s deadline, if it has one: each connect
/// attempt gets at most `dial_timeout` and the time left, the pauses
/// between attempts are skipped when no time would be left after them, and
/// the handshake gets at most `handshake_timeout` and the time left. When
/// the call's deadline is what ends a step, the cause is [`Error::Timeout`]
/// with `call.kind`, except for a connect attempt after the first: the
/// failure of the attempt before it (a refusal, say) is the dial's. And it
/// ends, with [`Error::Closed`] as the cause, within [`ABANDON_CHECK`] of
/// `abandoned` turning true (its owner shut down).
pub(crate) fn dial(
    addr: SocketAddr,
    config: &Config,
    call: Option<CallDeadline>,
    abandoned: &dyn Fn() -> bool,
) -> Result<(TcpStream, Session, Vec<u8>)> {
    let attempts = config.dial_attempts.max(1);
    let mut last = Error::Closed;
    for attempt in 0..attempts {
        if abandoned() {
            last = Error::Closed;
            break;
        }
        if attempt > 0 {
            let pause = Duration::from_millis(10 << (attempt - 1).min(6));
            if call.is_some_and(|c| Instant::now() + pause >= c.at) {
                break;
            }
            // In slices too: the owner may give up meanwhile.
            let until = Instant::now() + pause;
            while let Some(left) = until.checked_duration_since(Instant::now()) {
                if left.is_zero() || abandoned() {
                    break;
                }
                std::thread::sleep(left.min(ABANDON_CHECK));
            }
            if abandoned() {
                last = Error::Closed;
                break;
            }
            // A sleep ends late: past the call's deadline, the last
            // attempt's error stands, as when the pause is skipped.
            if call.is_some_and(|c| c.passed()) {
                break;
            }
        }
        match connect_once(addr, config, call, abandoned) {
            Ok(socket) => {
                return handshake(socket.into(), config, call, abandoned)
                    .map_err(|e| e.dialling(addr, DialPhase::Handshake))
            }
            // An attempt the call's deadline cut short says less than the
            // failure that made it retry: that one stands.
            Err(Error::Timeout(kind)) if attempt > 0 && call.is_some_and(|c| c.kind == kind) => {}
            Err(e) => last = e,
        }
        if call.is_some_and(|c| c.passed()) {
            break;
        }
    }
    Err(last.dialling(addr, DialPhase::Connect))
}

/// Runs the client side of the configured handshake on a non-blocking
/// socket, within `handshake_timeout` and the call's deadline, until
/// `abandoned`.
pub(crate) fn handshake(
    mut stream: TcpStream,
    config: &Config,
    call: Option<CallDeadline>,
    abandoned: &dyn Fn() -> bool,
) -> Result<(TcpStream, Session, Vec<u8>)> {
    let until = step_deadline(config.handshake_timeout, TimeoutKind::Handshake, call);
    let remaining = || time_left(until);
    // The factory and the handshake may be the application's: a panic in
    // them fails this dial (on an async call's dial thread it would
    // otherwise leave the pool believing a dial still runs).
    let mut hs = guard_handshake(|| config.handshake.client())?;
    let mut out = Vec::new();
    let mut input = Vec::new();
    let mut chunk = [0u8; 4096];
    // The peer's first bytes, to name a peer that speaks something else.
    let mut first = PeerSample::default();
    // As a connection's receive buffer holds at most.
    let most_unconsumed = frame_len(config.max_message_size).max(config.read_buffer_size);
    let session = loop {
        out.clear();
        guard_handshake(|| {
            hs.write_output(&mut out);
            Ok(())
        })?;
        write_all_nonblocking(&stream, &out, || {
            if !crate::sys::wait_writable(&stream, wait_slice(remaining()?, abandoned)?) {
                // Timed out, or interrupted: the deadline says which.
                remaining()?;
            }
            Ok(())
        })?;
        if let Some(session) = guard_handshake(|| Ok(hs.take_session()))? {
            break session;
        }
        // Unfinished: what it left unconsumed is the handshake's, not
        // frames that follow it.
        check_unconsumed(input.len(), most_unconsumed)?;
        // The peer's answer takes a moment to come: wait first, then read
        // (in slices, and without asking the handshake for output again
        // until it has new input).
        let n = loop {
            while !crate::sys::wait_readable(&stream, wait_slice(remaining()?, abandoned)?) {
                // Timed out, or interrupted: the deadline says which.
                remaining()?;
            }
            match stream.read(&mut chunk) {
                Ok(0) => return Err(HandshakeError::PeerClosed.into()),
                Ok(n) => break n,
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e.into()),
            }
        };
        first.add(&chunk[..n]);
        input.extend_from_slice(&chunk[..n]);
        let used = guard_handshake(|| read_handshake_input(hs.as_mut(), &input))?;
        input.drain(..used);
    };
    if input.is_empty() {
        // What arrived right behind the handshake, if anything: a peer
        // that answers in its own protocol usually sends it at once.
        match stream.read(&mut chunk) {
            Ok(n) => input.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    check_first_frame(&input, config, session.opener.bundles(), &first)?;
    // The handshake goes before the socket is handed on, its drop guarded
    // as its steps are (a drop that panicked on the way out of this
    // function took the socket being returned with it, open).
    guard_handshake(move || {
        drop(hs);
        Ok(())
    })?;
    Ok((stream, session, input))
}

/// Up to 16 of the first bytes a peer sent.
#[derive(Default)]
struct PeerSample {
    bytes: [u8; 16],
    len: usize,
}

impl PeerSample {
    fn add(&mut self, data: &[u8]) {
        let n = data.len().min(self.bytes.len() - self.len);
        self.bytes[self.len..self.len + n].copy_from_slice(&data[..n]);
        self.len += n;
    }
}

/// Checks that what the peer sent right after its handshake, if anything,
/// starts a frame this side accepts. The `secure` and `monte` handshakes
/// take any 32 bytes for the server's key, so a peer that speaks another
/// protocol (an HTTP server answering a request it cannot parse) passes
/// them, and shows only here: its reply goes on as text, whose first four
/// bytes read as a length prefix of hundreds of megabytes.
fn check_first_frame(
    input: &[u8],
    config: &Config,
    bundles: bool,
    first: &PeerSample,
) -> Result<()> {
    match FrameDecoder::for_direction(config.max_message_size, bundles).decode(input) {
        Err(Error::FrameTooLarge { .. } | Error::FrameTooShort { .. }) => {
            Err(HandshakeError::NotThisProtocol {
                sent: first.bytes,
                sent_len: first.len as u8,
            }
            .into())
        }
        _ => Ok(()),
    }
}
