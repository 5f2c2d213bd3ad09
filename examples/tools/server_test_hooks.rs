//! The server example's hooks for `tests/hostile_external.rs`, which
//! attacks that binary from another process: the `--events` lines, the
//! `--control` commands on stdin and the big-reply request. A tool, not a
//! showcase: `examples/server.rs` includes it with `#[path]` so that the
//! server itself reads as the example to copy from.
//!
//! Each diagnostic is one line on stdout, with the free-form part (a
//! reason, an error) last:
//!
//! - `--events`: `listening ADDR` once, then `open peer=ADDR id=N`,
//!   `close peer=ADDR id=N messages=N reason=ERROR` and
//!   `handshake_failed peer=ADDR reason=ERROR` for every connection
//!   (`ERROR` is the library's `Error` in `Debug` form).
//! - `--control`: reads commands on stdin, one a line, and stops serving
//!   when stdin ends:
//!   - `stats ID`: prints `stats id=ID handled=N` (connections held now,
//!     handshakes included), then every counter of the server's `Stats` as
//!     `name=N`, then the server's own `requests= messages= conns= errors=`;
//!   - `flood PEER SIZE`: sends `SIZE`-byte messages with `send_no_wait`
//!     to the open connection from `PEER` until a send fails (or 10 s
//!     pass), then prints `flood peer=PEER sent=BYTES took_us=N
//!     result=ERROR|none`;
//!   - `request ID PEER TIMEOUT_MS HEX`: sends the body `HEX` as a request
//!     to `PEER` with that timeout, then prints `request id=ID took_us=N
//!     ok=HEX` or `request id=ID took_us=N err=ERROR`.
//!
//!   An unknown `PEER` gives `error=unknown peer` in place of the outcome.
//! - A request whose body is `monte-rpc-test big reply:` followed by a
//!   4-byte big-endian size `N` gets a reply of `N` bytes (at most the
//!   maximum message size), for the cases that make the server answer
//!   large.

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monte_rpc::{Connection, Error, Server};

use crate::{Stats, STOP};

/// A request body asking for a large reply (see the module doc).
const BIG_REPLY: &[u8] = b"monte-rpc-test big reply:";

/// The reply size a request asks for with [`BIG_REPLY`], if it does.
pub fn big_reply_size(body: &[u8]) -> Option<usize> {
    let size = body.strip_prefix(BIG_REPLY)?;
    Some(u32::from_be_bytes(size.try_into().ok()?) as usize)
}

/// Prints one diagnostic line on stdout. A reader that went away must not
/// take a reactor thread down with it, so write errors are ignored.
pub fn emit(line: fmt::Arguments<'_>) {
    let _ = writeln!(std::io::stdout().lock(), "{line}");
}

/// A peer address, or `-` when the socket no longer knows it.
struct Peer(Option<SocketAddr>);

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(addr) => write!(f, "{addr}"),
            None => f.write_str("-"),
        }
    }
}

/// Per-connection bookkeeping for `--events` and `--control` (the plain
/// server has none): messages per connection for the close line, and the
/// open connections' handles for the commands that call a peer.
pub struct Tracker {
    events: bool,
    open: Mutex<HashMap<u64, Tracked>>,
}

struct Tracked {
    peer: Option<SocketAddr>,
    messages: u64,
    conn: Connection,
}

impl Tracker {
    /// A tracker that prints the `--events` lines if `events`.
    pub fn new(events: bool) -> Tracker {
        Tracker {
            events,
            open: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn open(&self, conn: &Connection) {
        let tracked = Tracked {
            peer: conn.peer_addr(),
            messages: 0,
            conn: conn.clone(),
        };
        self.lock().insert(conn.id(), tracked);
        if self.events {
            emit(format_args!(
                "open peer={} id={}",
                Peer(conn.peer_addr()),
                conn.id()
            ));
        }
    }

    pub fn message(&self, conn: &Connection) {
        if let Some(tracked) = self.lock().get_mut(&conn.id()) {
            tracked.messages += 1;
        }
    }

    pub fn close(&self, conn: &Connection, reason: &Error) {
        let tracked = self.lock().remove(&conn.id());
        if self.events {
            let messages = tracked.map_or(0, |t| t.messages);
            emit(format_args!(
                "close peer={} id={} messages={messages} reason={reason:?}",
                Peer(conn.peer_addr()),
                conn.id()
            ));
        }
    }

    pub fn handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        if self.events {
            emit(format_args!(
                "handshake_failed peer={} reason={error:?}",
                Peer(peer)
            ));
        }
    }

    /// The open connection from `peer`.
    fn find(&self, peer: SocketAddr) -> Option<Connection> {
        self.lock()
            .values()
            .find(|t| t.peer == Some(peer))
            .map(|t| t.conn.clone())
    }
}

/// Serves the `--control` commands on stdin until it ends, then stops the
/// server (so a server whose controller died does not linger).
pub fn control(server: Arc<Server>, stats: Arc<Stats>, tracker: Arc<Tracker>) {
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let words: Vec<&str> = line.split_whitespace().collect();
        match words[..] {
            ["stats", id] => emit_stats(id, &server, &stats),
            ["flood", peer, size] => match (peer.parse(), size.parse()) {
                (Ok(peer), Ok(size)) => flood(&tracker, peer, size),
                _ => eprintln!("server: bad command {line:?}"),
            },
            ["request", id, peer, timeout_ms, body] => {
                match (peer.parse(), timeout_ms.parse(), unhex(body)) {
                    (Ok(peer), Ok(ms), Some(body)) => {
                        request(&tracker, id, peer, Duration::from_millis(ms), body)
                    }
                    _ => eprintln!("server: bad command {line:?}"),
                }
            }
            [] => {}
            _ => eprintln!("server: unknown command {line:?}"),
        }
    }
    STOP.store(true, Ordering::SeqCst);
}

fn emit_stats(id: &str, server: &Server, stats: &Stats) {
    // Connections first: a close is counted before its place is given
    // back, so every close behind this figure is in the counters below.
    let handled = server.connections();
    let s = server.stats();
    emit(format_args!(
        "stats id={id} handled={handled} connections_open={} connections_opened={} \
         connections_refused={} closed_local={} closed_by_peer={} closed_handshake_timeout={} \
         closed_read_timeout={} closed_write_timeout={} closed_frame_timeout={} \
         closed_protocol_error={} closed_other={} reads_paused={} handshakes_failed={} frames_in={} bytes_in={} frames_out={} bytes_out={} \
         frames_rejected_too_short={} frames_rejected_too_large={} \
         frames_rejected_authentication={} responses_dropped={} requests_in_flight={} \
         requests_timed_out={} requests={} messages={} conns={} errors={}",
        s.connections_open,
        s.connections_opened,
        s.connections_refused,
        s.closed_local,
        s.closed_by_peer,
        s.closed_handshake_timeout,
        s.closed_read_timeout,
        s.closed_write_timeout,
        s.closed_frame_timeout,
        s.closed_protocol_error,
        s.closed_other,
        s.reads_paused,
        s.handshakes_failed,
        s.frames_in,
        s.bytes_in,
        s.frames_out,
        s.bytes_out,
        s.frames_rejected_too_short,
        s.frames_rejected_too_large,
        s.frames_rejected_authentication,
        s.responses_dropped,
        s.requests_in_flight,
        s.requests_timed_out,
        stats.requests.load(Ordering::Relaxed),
        stats.messages.load(Ordering::Relaxed),
        stats.conns.load(Ordering::Relaxed),
        stats.errors.load(Ordering::Relaxed),
    ));
}

/// Floods `peer` on a thread of its own: the calls may wait for room in
/// the connection's queue, and the commands after this one must not.
fn flood(tracker: &Tracker, peer: SocketAddr, size: usize) {
    let Some(conn) = tracker.find(peer) else {
        emit(format_args!("flood peer={peer} error=unknown peer"));
        return;
    };
    std::thread::spawn(move || {
        let body = vec![0u8; size];
        let start = Instant::now();
        let mut sent = 0u64;
        let result = loop {
            if start.elapsed() > Duration::from_secs(10) {
                break None;
            }
            match conn.send_no_wait(&body) {
                Ok(()) => sent += size as u64,
                Err(e) => break Some(e),
            }
        };
        let took = start.elapsed().as_micros();
        match result {
            Some(e) => emit(format_args!(
                "flood peer={peer} sent={sent} took_us={took} result={:?}",
                e.root_cause()
            )),
            None => emit(format_args!(
                "flood peer={peer} sent={sent} took_us={took} result=none"
            )),
        }
    });
}

/// Sends a request to `peer` on a thread of its own, since it waits for
/// the answer.
fn request(tracker: &Tracker, id: &str, peer: SocketAddr, timeout: Duration, body: Vec<u8>) {
    let Some(conn) = tracker.find(peer) else {
        emit(format_args!("request id={id} error=unknown peer"));
        return;
    };
    let id = id.to_string();
    std::thread::spawn(move || {
        let start = Instant::now();
        let mut resp = Vec::new();
        let result = conn.request_timeout(&body, &mut resp, Some(timeout));
        let took = start.elapsed().as_micros();
        match result {
            Ok(()) => emit(format_args!(
                "request id={id} took_us={took} ok={}",
                hex(&resp)
            )),
            // The cause, as the tests parse it (the call's context is theirs).
            Err(e) => emit(format_args!(
                "request id={id} took_us={took} err={:?}",
                e.root_cause()
            )),
        }
    });
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}
