//! Dialling: the TCP connect and the client side of the handshake, run on
//! the calling thread with blocking sockets and their own timeouts, so that
//! a reactor never blocks on a slow endpoint.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

use crate::config::Config;
use crate::error::{DialPhase, Error, HandshakeError, Result, TimeoutKind};
use crate::protocol::Session;

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

fn connect_once(addr: SocketAddr, config: &Config) -> Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    tune(&socket, config)?;
    let target = SockAddr::from(addr);
    let connected = match config.dial_timeout {
        Some(t) => socket.connect_timeout(&target, t.max(Duration::from_micros(1))),
        None => socket.connect(&target),
    };
    match connected {
        Ok(()) => Ok(socket),
        Err(e) if e.kind() == io::ErrorKind::TimedOut || e.kind() == io::ErrorKind::WouldBlock => {
            Err(Error::Timeout(TimeoutKind::Dial))
        }
        Err(e) => Err(e.into()),
    }
}

/// Connects (retrying up to `dial_attempts` times) and runs the client
/// handshake. Returns the socket, the session, and any bytes the peer sent
/// after its handshake that were already read. Every error is an
/// [`Error::Dial`] that names `addr` and the phase that failed.
pub(crate) fn dial(addr: SocketAddr, config: &Config) -> Result<(TcpStream, Session, Vec<u8>)> {
    let attempts = config.dial_attempts.max(1);
    let mut last = Error::Closed;
    for attempt in 0..attempts {
        match connect_once(addr, config) {
            Ok(socket) => {
                return handshake(socket.into(), config)
                    .map_err(|e| e.dialling(addr, DialPhase::Handshake))
            }
            Err(e) => last = e,
        }
        if attempt + 1 < attempts {
            std::thread::sleep(Duration::from_millis(10 << attempt.min(6)));
        }
    }
    Err(last.dialling(addr, DialPhase::Connect))
}

/// Runs the client side of the configured handshake on a blocking socket.
pub(crate) fn handshake(
    mut stream: TcpStream,
    config: &Config,
) -> Result<(TcpStream, Session, Vec<u8>)> {
    let deadline = config.handshake_timeout.map(|t| Instant::now() + t);
    let timed_out = || Error::Timeout(TimeoutKind::Handshake);
    let remaining = || -> Result<Option<Duration>> {
        match deadline {
            None => Ok(None),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(timed_out())
                } else {
                    Ok(Some(left))
                }
            }
        }
    };
    let mut hs = config.handshake.client()?;
    let mut out = Vec::new();
    let mut input = Vec::new();
    let mut chunk = [0u8; 4096];
    let session = loop {
        out.clear();
        hs.write_output(&mut out);
        if !out.is_empty() {
            stream.set_write_timeout(remaining()?)?;
            stream.write_all(&out).map_err(|e| match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => timed_out(),
                _ => e.into(),
            })?;
        }
        if let Some(session) = hs.take_session() {
            break session;
        }
        stream.set_read_timeout(remaining()?)?;
        let n = match stream.read(&mut chunk) {
            Ok(0) => return Err(HandshakeError::PeerClosed.into()),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::TimedOut =>
            {
                return Err(timed_out())
            }
            Err(e) => return Err(e.into()),
        };
        input.extend_from_slice(&chunk[..n]);
        let used = hs.read_input(&input)?;
        input.drain(..used);
    };
    stream.set_read_timeout(None)?;
    stream.set_write_timeout(None)?;
    stream.set_nonblocking(true)?;
    Ok((stream, session, input))
}
