//! The thirteen hostile-peer cases, written once against any server under
//! attack: an in-process `Server` (`tests/hostile.rs`) or the example server
//! binary in a child process (`tests/hostile_external.rs`). Owns the
//! [`Target`] trait those two implement, the event [`Log`] both feed, and
//! everything the cases share: the raw attacking client, the good client,
//! the RSS and counter checks.
//!
//! Every case attacks with a hand-rolled raw client (a std `TcpStream` that
//! runs the handshake with `ClientHandshake`, or skips it) and checks:
//!
//! - the bad connection is closed, as the raw socket sees it (a read returns
//!   0 or an error within a deadline) and with the expected reason in the
//!   server's `on_close` or `on_handshake_failed`;
//! - the server's counters ([`Stats`]) moved by exactly the attacks, under
//!   the expected reasons, and no other close or rejection counter moved;
//! - a good `Client` on another connection keeps working during the attack
//!   (a background caller checks every reversed reply) and after it;
//! - the server's memory does not grow with the attack: its RSS after many
//!   repetitions is within a generous bound of the RSS after a warm-up of
//!   the same shape.
//!
//! Included with `#[path]` by both test files, which declare `mod common`.

use std::collections::VecDeque;
use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use monte_rpc::protocol::wire::{
    check_records, records, Decoded, FrameDecoder, MIN_CIPHERTEXT_LEN, RECORD_HEADER_LEN, SEQ_LEN,
};
use monte_rpc::protocol::{ClientHandshake, Handshake, Opener, Profile, PskHandshake, Sealer};
use monte_rpc::{Client, Config, Error, HandshakeError, Stats, TimeoutKind};

use crate::common::{reversed, wait_until};

/// The server's maximum message size, in every setting.
pub const MAX_MESSAGE: usize = 64 << 10;
/// The largest ciphertext length the server accepts in a length prefix:
/// the attackers' handshakes agree on bundled frames, whose one message
/// carries a 4-byte length besides (PROTOCOL.md, "Bundled frames").
pub const MAX_CIPHERTEXT: usize = MAX_MESSAGE + MIN_CIPHERTEXT_LEN + RECORD_HEADER_LEN - SEQ_LEN;
/// The most the server's RSS may grow between warm-up and end of an attack.
const RSS_BOUND: u64 = 16 << 20;
/// How long a connection the server should close may take to show it.
pub const CLOSE_WAIT: Duration = Duration::from_secs(3);
/// The message size of case 10's flood: the largest the server sends.
const FLOOD_MESSAGE: usize = MAX_MESSAGE;

// ---------------------------------------------------------------------------
// The server under attack.
// ---------------------------------------------------------------------------

/// The server settings the cases' bounds are derived from. Both targets
/// configure their server from this, so a bound never drifts from the
/// setting it checks.
#[derive(Clone, Debug)]
pub struct Settings {
    pub workers: usize,
    pub handshake_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    pub max_message: usize,
    pub max_queued_bytes: usize,
    /// 1, so that case 13's next request reuses the timed-out request's
    /// slot (in a new generation).
    pub max_in_flight: usize,
    pub max_conns: usize,
    pub accept_wait: Duration,
    /// How long a frame may take from its first byte to its last.
    pub frame_timeout: Duration,
    /// The `psk` profile with this key, instead of `secure`.
    pub psk: Option<[u8; 32]>,
}

impl Settings {
    /// Every case but 11: short timeouts, no practical cap.
    pub fn general() -> Settings {
        Settings {
            workers: 2,
            handshake_timeout: Duration::from_millis(300),
            read_timeout: Duration::from_millis(500),
            write_timeout: Duration::from_millis(500),
            max_message: MAX_MESSAGE,
            max_queued_bytes: 1 << 20,
            max_in_flight: 1,
            max_conns: 1024,
            accept_wait: Duration::from_secs(1),
            // The library's default: the read timeout.
            frame_timeout: Duration::from_millis(500),
            psk: None,
        }
    }

    /// Case 11: a cap of 8 connections with a 300 ms accept wait.
    pub fn capped(handshake_timeout: Duration) -> Settings {
        Settings {
            max_conns: 8,
            accept_wait: Duration::from_millis(300),
            handshake_timeout,
            ..Settings::general()
        }
    }

    /// Case 14: a write timeout long enough to watch the server's memory
    /// while a peer that never reads is still connected.
    pub fn budget() -> Settings {
        Settings {
            write_timeout: Duration::from_secs(2),
            ..Settings::general()
        }
    }

    /// Case 15: the `psk` profile, a cap of 8 connections, and a read
    /// timeout far longer than the handshake timeout, so that a slot held
    /// past the handshake timeout shows.
    pub fn psk() -> Settings {
        Settings {
            psk: Some(TEST_PSK),
            max_conns: 8,
            accept_wait: Duration::from_millis(300),
            read_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(5),
            ..Settings::general()
        }
    }

    /// The configuration of a good client of a server with these settings.
    pub fn client_config(&self) -> Config {
        let config = Config::default()
            .workers(1)
            .max_conns(1)
            .request_timeout(Some(Duration::from_secs(3)))
            .write_timeout(Some(Duration::from_secs(3)));
        match self.psk {
            Some(psk) => config.handshake(Arc::new(PskHandshake::factory(psk))),
            None => config,
        }
    }
}

/// The pre-shared key of [`Settings::psk`].
pub const TEST_PSK: [u8; 32] = [0x5c; 32];

/// A request body that makes either target's handler reply with a body of
/// the size in the 4 big-endian bytes that follow it (the example server's
/// convention; see its module doc).
pub const BIG_REPLY: &[u8] = b"monte-rpc-test big reply:";

/// A server under attack, wherever it runs.
pub trait Target {
    fn addr(&self) -> SocketAddr;
    fn settings(&self) -> &Settings;
    /// What the server's handler saw.
    fn log(&self) -> &Log;
    /// Connections the server handles now, handshakes included.
    fn connections(&self) -> usize;
    /// The server's counters.
    fn stats(&self) -> Stats;
    /// The server's resident set size in bytes.
    fn rss(&self) -> u64;
    /// Makes the server send `size`-byte messages with `send_no_wait` on
    /// the open connection from `peer` until one fails (or 10 s pass); the
    /// outcome lands in the log as a [`Flood`].
    fn start_flood(&self, peer: SocketAddr, size: usize);
    /// Makes the server send `body` as a request on the open connection
    /// from `peer`, with `timeout`; the outcome lands in the log as an
    /// [`Answer`] under the returned id.
    fn start_request(&self, peer: SocketAddr, body: &[u8], timeout: Duration) -> u64;
}

/// How a server-side flood ([`Target::start_flood`]) ended.
#[derive(Debug)]
pub struct Flood {
    pub sent: u64,
    /// The error that stopped it; `None` if it ran out of time.
    pub result: Option<Error>,
    pub took: Duration,
}

/// How a server-side request ([`Target::start_request`]) ended.
#[derive(Debug)]
pub struct Answer {
    pub result: Result<Vec<u8>, Error>,
    pub took: Duration,
}

/// What the server's handler saw, keyed by the peer's address (the raw
/// socket's local address).
#[derive(Default)]
pub struct Events {
    pub opened: HashMap<SocketAddr, usize>,
    /// Messages that reached the handler. The external server reports a
    /// connection's count with its close, so read it only after the close.
    pub messages: HashMap<SocketAddr, u64>,
    pub closed: HashMap<SocketAddr, Vec<Error>>,
    /// `on_handshake_failed` reasons.
    pub failed: HashMap<SocketAddr, Vec<Error>>,
    pub floods: HashMap<SocketAddr, Flood>,
    pub answers: HashMap<u64, Answer>,
    /// Closes and handshake failures recorded in all, never reset: lets a
    /// reader tell when every close the counters know of was reported.
    pub ends: u64,
}

/// The handler's events, as a target records them, with waits for them.
#[derive(Default)]
pub struct Log {
    events: Mutex<Events>,
    changed: Condvar,
}

impl Log {
    pub fn update(&self, f: impl FnOnce(&mut Events)) {
        f(&mut self.events());
        self.changed.notify_all();
    }

    pub fn events(&self) -> MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn record_open(&self, peer: SocketAddr) {
        self.update(|e| *e.opened.entry(peer).or_default() += 1);
    }

    pub fn record_close(&self, peer: SocketAddr, messages: u64, reason: Error) {
        self.update(|e| {
            if messages > 0 {
                *e.messages.entry(peer).or_default() += messages;
            }
            e.closed.entry(peer).or_default().push(reason);
            e.ends += 1;
        });
    }

    pub fn record_handshake_failure(&self, peer: SocketAddr, reason: Error) {
        self.update(|e| {
            e.failed.entry(peer).or_default().push(reason);
            e.ends += 1;
        });
    }

    /// Waits up to `timeout` for `f` to return something.
    pub fn wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&mut Events) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut g = self.events();
        loop {
            if let Some(v) = f(&mut g) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits up to `timeout` for `on_close` of the connection from `peer`,
    /// and takes its reason.
    pub fn take_close(&self, peer: SocketAddr, timeout: Duration) -> Option<Error> {
        self.wait_for(timeout, |e| take_first(&mut e.closed, peer))
    }

    /// Takes the `on_close` reason of `peer`, failing if it is missing or
    /// does not satisfy `expected`.
    pub fn expect_close(&self, peer: SocketAddr, what: &str, expected: impl Fn(&Error) -> bool) {
        let reason = self
            .take_close(peer, CLOSE_WAIT)
            .unwrap_or_else(|| panic!("{what}: on_close never ran for {peer}"));
        assert!(expected(&reason), "{what}: on_close reason {reason:?}");
    }

    /// Takes the `on_handshake_failed` reason of `peer`, failing if it is
    /// missing or does not satisfy `expected`.
    pub fn expect_handshake_failure(
        &self,
        peer: SocketAddr,
        what: &str,
        expected: impl Fn(&Error) -> bool,
    ) {
        let reason = self
            .wait_for(CLOSE_WAIT, |e| take_first(&mut e.failed, peer))
            .unwrap_or_else(|| panic!("{what}: on_handshake_failed never ran for {peer}"));
        assert!(
            expected(&reason),
            "{what}: on_handshake_failed reason {reason:?}"
        );
    }

    /// Takes how many times `on_open` ran for `peer`.
    pub fn take_opened(&self, peer: SocketAddr) -> usize {
        self.events().opened.remove(&peer).unwrap_or(0)
    }

    /// Takes how many messages `peer` got through to the handler.
    pub fn take_messages(&self, peer: SocketAddr) -> u64 {
        self.events().messages.remove(&peer).unwrap_or(0)
    }

    /// Whether `on_close` ran for `peer` and was not taken yet.
    pub fn has_close(&self, peer: SocketAddr) -> bool {
        self.events().closed.contains_key(&peer)
    }

    /// Asserts the handler never heard of `peer` as an open connection.
    pub fn assert_never_opened(&self, peer: SocketAddr, what: &str) {
        let e = self.events();
        assert!(
            !e.opened.contains_key(&peer),
            "{what}: on_open ran for {peer}"
        );
        assert!(
            !e.closed.contains_key(&peer),
            "{what}: on_close ran for {peer}"
        );
        assert!(
            !e.messages.contains_key(&peer),
            "{what}: message from {peer}"
        );
    }

    pub fn record_flood(&self, peer: SocketAddr, flood: Flood) {
        self.update(|e| {
            e.floods.insert(peer, flood);
        });
    }

    pub fn has_flood(&self, peer: SocketAddr) -> bool {
        self.events().floods.contains_key(&peer)
    }

    pub fn take_flood(&self, peer: SocketAddr) -> Option<Flood> {
        self.events().floods.remove(&peer)
    }

    pub fn record_answer(&self, id: u64, answer: Answer) {
        self.update(|e| {
            e.answers.insert(id, answer);
        });
    }

    /// Waits up to `timeout` for the outcome of request `id`.
    pub fn take_answer(&self, id: u64, timeout: Duration) -> Option<Answer> {
        self.wait_for(timeout, |e| e.answers.remove(&id))
    }
}

fn take_first(map: &mut HashMap<SocketAddr, Vec<Error>>, peer: SocketAddr) -> Option<Error> {
    let reasons = map.get_mut(&peer)?;
    let reason = reasons.remove(0);
    if reasons.is_empty() {
        map.remove(&peer);
    }
    Some(reason)
}

// ---------------------------------------------------------------------------
// Counters.
// ---------------------------------------------------------------------------

/// The counters a case accounts for: every one must move by exactly what
/// the case expects (zero unless it says otherwise), so an attack closed
/// for the wrong reason, or a good connection closed by the attack, fails.
pub const ACCOUNTED: [&str; 15] = [
    "connections_refused",
    "closed_local",
    "closed_by_peer",
    "closed_handshake_timeout",
    "closed_read_timeout",
    "closed_write_timeout",
    "closed_frame_timeout",
    "closed_protocol_error",
    "closed_other",
    "handshakes_failed",
    "frames_rejected_too_short",
    "frames_rejected_too_large",
    "frames_rejected_authentication",
    "responses_dropped",
    "requests_timed_out",
];

/// The counter `name` of `stats` (an accounted counter, or one of the
/// others a case reads).
pub fn counter(stats: &Stats, name: &str) -> u64 {
    match name {
        "connections_open" => stats.connections_open,
        "connections_opened" => stats.connections_opened,
        "connections_refused" => stats.connections_refused,
        "closed_local" => stats.closed_local,
        "closed_by_peer" => stats.closed_by_peer,
        "closed_handshake_timeout" => stats.closed_handshake_timeout,
        "closed_read_timeout" => stats.closed_read_timeout,
        "closed_write_timeout" => stats.closed_write_timeout,
        "closed_frame_timeout" => stats.closed_frame_timeout,
        "reads_paused" => stats.reads_paused,
        "closed_protocol_error" => stats.closed_protocol_error,
        "closed_other" => stats.closed_other,
        "handshakes_failed" => stats.handshakes_failed,
        "frames_rejected_too_short" => stats.frames_rejected_too_short,
        "frames_rejected_too_large" => stats.frames_rejected_too_large,
        "frames_rejected_authentication" => stats.frames_rejected_authentication,
        "responses_dropped" => stats.responses_dropped,
        "requests_in_flight" => stats.requests_in_flight,
        "requests_timed_out" => stats.requests_timed_out,
        _ => panic!("unknown counter {name}"),
    }
}

/// Every close, as the counters see it (each close counts one reason).
pub fn closes(stats: &Stats) -> u64 {
    stats.closed_local
        + stats.closed_by_peer
        + stats.closed_handshake_timeout
        + stats.closed_read_timeout
        + stats.closed_write_timeout
        + stats.closed_frame_timeout
        + stats.closed_protocol_error
        + stats.closed_other
}

/// How much each accounted counter moved since `before`.
fn moved(t: &dyn Target, before: &Stats) -> Vec<(&'static str, u64)> {
    let now = t.stats();
    ACCOUNTED
        .iter()
        .map(|name| (*name, counter(&now, name) - counter(before, name)))
        .collect()
}

/// Asserts that, since `before`, each accounted counter moved by what
/// `expected` lists for it, and the others not at all. Waits up to 3 s for
/// the counters to get there, since some close is counted just after the
/// socket shows it.
pub fn expect_counts(t: &dyn Target, before: &Stats, what: &str, expected: &[(&str, u64)]) {
    for (name, _) in expected {
        assert!(ACCOUNTED.contains(name), "{name} is not accounted");
    }
    let want = |name: &str| {
        expected
            .iter()
            .find(|(n, _)| *n == name)
            .map_or(0, |(_, v)| *v)
    };
    let mut got = Vec::new();
    let matched = wait_until(Duration::from_secs(3), || {
        got = moved(t, before);
        got.iter().all(|(name, v)| *v == want(name))
    });
    let wrong: Vec<String> = got
        .iter()
        .filter(|(name, v)| *v != want(name))
        .map(|(name, v)| format!("{name} moved by {v}, expected {}", want(name)))
        .collect();
    assert!(matched, "{what}: counters: {}", wrong.join("; "));
    let shown: Vec<String> = got
        .iter()
        .filter(|(_, v)| *v > 0)
        .map(|(name, v)| format!("{name} +{v}"))
        .collect();
    eprintln!("[hostile] {what}: counters {}", shown.join(", "));
}

// ---------------------------------------------------------------------------
// Harness: polling, RSS, junk.
// ---------------------------------------------------------------------------

/// Asserts the server's RSS grew by less than `RSS_BOUND` since `base`.
fn check_rss(t: &dyn Target, name: &str, base: u64, attacks: usize) {
    let after = t.rss();
    let growth = after.saturating_sub(base);
    eprintln!(
        "[hostile] {name}: RSS {} KiB after warm-up, {} KiB after {attacks} attacks, growth {} KiB",
        base >> 10,
        after >> 10,
        growth >> 10
    );
    assert!(
        growth < RSS_BOUND,
        "{name}: RSS grew by {growth} bytes over {attacks} attacks (from {base} to {after})"
    );
}

/// Waits until the server holds exactly `n` connections (handshakes
/// included): every attack connection has given back its place.
pub fn settle(t: &dyn Target, n: usize) {
    let mut held = 0;
    assert!(
        wait_until(Duration::from_secs(3), || {
            held = t.connections();
            held == n
        }),
        "server still holds {held} connections, expected {n}"
    );
}

/// A small deterministic generator for junk bytes.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

// ---------------------------------------------------------------------------
// The good client: requests in a loop, every reply checked.
// ---------------------------------------------------------------------------

/// Makes a few requests on `client` and checks every reply.
fn check_client(client: &Client, tag: &str) {
    let mut resp = Vec::new();
    for i in 0..5 {
        let body = format!("{tag}-{i}-{}", "ab".repeat(i * 7));
        client
            .request(body.as_bytes(), &mut resp)
            .unwrap_or_else(|e| panic!("good client request {tag}-{i} failed: {e:?}"));
        assert_eq!(resp, reversed(body.as_bytes()), "good client {tag}-{i}");
    }
}

/// A good client with a caller that works in the background until
/// [`finish`](Good::finish).
struct Good {
    client: Arc<Client>,
    stop: Arc<AtomicBool>,
    caller: Option<JoinHandle<Result<u64, String>>>,
}

impl Good {
    /// Connects (before the attack starts) and starts the background caller.
    fn start(t: &dyn Target) -> Good {
        let config = t.settings().client_config();
        let client = Arc::new(Client::new(t.addr(), config).expect("good client"));
        check_client(&client, "before");
        let stop = Arc::new(AtomicBool::new(false));
        let started = Arc::new(AtomicBool::new(false));
        let caller = {
            let client = client.clone();
            let stop = stop.clone();
            let started = started.clone();
            thread::spawn(move || {
                let mut resp = Vec::new();
                let mut n = 0u64;
                // At least one request during the attack, however loaded
                // the machine: the attack starts only once it is under way.
                while n == 0 || !stop.load(Ordering::SeqCst) {
                    started.store(true, Ordering::SeqCst);
                    let body = format!("during-{n}-{}", "xyz".repeat((n % 13) as usize));
                    if let Err(e) = client.request(body.as_bytes(), &mut resp) {
                        return Err(format!("request {n} failed: {e:?}"));
                    }
                    if resp != reversed(body.as_bytes()) {
                        return Err(format!("request {n} got a wrong reply {resp:?}"));
                    }
                    n += 1;
                    thread::sleep(Duration::from_millis(2));
                }
                Ok(n)
            })
        };
        assert!(
            wait_until(Duration::from_secs(10), || started.load(Ordering::SeqCst)),
            "the good caller did not start"
        );
        Good {
            client,
            stop,
            caller: Some(caller),
        }
    }

    /// Stops the background caller, fails if any of its requests failed,
    /// and checks the client still works now. Returns the requests made
    /// during the attack.
    fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        let caller = self.caller.take().expect("caller runs");
        let n = caller
            .join()
            .expect("good caller panicked")
            .unwrap_or_else(|e| panic!("good client failed during the attack: {e}"));
        assert!(n > 0, "the good client made no request during the attack");
        check_client(&self.client, "after");
        self.client.shutdown();
        n
    }
}

impl Drop for Good {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

// ---------------------------------------------------------------------------
// The raw client.
// ---------------------------------------------------------------------------

/// A plain blocking TCP connection to `addr`, with 5 s I/O timeouts.
fn tcp(addr: SocketAddr) -> TcpStream {
    let stream = super::common::connect_with_timeouts(addr);
    let _ = stream.set_nodelay(true);
    stream
}

/// A raw client past the handshake: it seals and opens frames itself.
struct Raw {
    stream: TcpStream,
    local: SocketAddr,
    sealer: Sealer,
    opener: Opener,
    decoder: FrameDecoder,
    input: Vec<u8>,
    /// Messages of a bundled frame not yet taken.
    received: VecDeque<(u32, Vec<u8>)>,
}

impl Raw {
    fn connect(addr: SocketAddr) -> Raw {
        Raw::handshake(tcp(addr))
    }

    /// Runs the client side of the handshake by hand on `stream`.
    fn handshake(mut stream: TcpStream) -> Raw {
        let local = stream.local_addr().unwrap();
        let mut hs = ClientHandshake::new(Profile::Secure).unwrap();
        let mut out = Vec::new();
        let mut input = Vec::new();
        let mut chunk = [0u8; 256];
        let session = loop {
            out.clear();
            hs.write_output(&mut out);
            stream.write_all(&out).expect("write handshake");
            if let Some(s) = hs.take_session() {
                break s;
            }
            let n = stream.read(&mut chunk).expect("read handshake");
            assert!(n > 0, "server closed during the handshake");
            input.extend_from_slice(&chunk[..n]);
            let used = hs.read_input(&input).expect("server handshake");
            input.drain(..used);
        };
        Raw {
            stream,
            local,
            decoder: FrameDecoder::for_direction(MAX_MESSAGE, session.opener.bundles()),
            sealer: session.sealer,
            opener: session.opener,
            input,
            received: VecDeque::new(),
        }
    }

    /// One sealed frame.
    fn seal(&mut self, seq: u32, body: &[u8]) -> Vec<u8> {
        let mut frame = Vec::new();
        self.sealer.seal_append(seq, body, &mut frame).unwrap();
        frame
    }

    fn send(&mut self, seq: u32, body: &[u8]) {
        let frame = self.seal(seq, body);
        self.stream.write_all(&frame).expect("write frame");
    }

    /// Reads and opens the server's next frame within `timeout`.
    fn recv(&mut self, timeout: Duration) -> (u32, Vec<u8>) {
        let deadline = Instant::now() + timeout;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(message) = self.received.pop_front() {
                return message;
            }
            if let Decoded::Frame(n) = self.decoder.decode(&self.input).expect("server frame") {
                let plain = self
                    .opener
                    .open_frame_in_place(&mut self.input[..n])
                    .expect("open server frame");
                if self.opener.bundles() {
                    check_records(plain, MAX_MESSAGE).expect("server's records");
                    let messages = records(plain).map(|(seq, body)| (seq, body.to_vec()));
                    self.received.extend(messages);
                } else {
                    let seq = u32::from_be_bytes(plain[..4].try_into().unwrap());
                    self.received.push_back((seq, plain[4..].to_vec()));
                }
                self.input.drain(..n);
                continue;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "no frame from the server within {timeout:?}"
            );
            self.stream.set_read_timeout(Some(left)).unwrap();
            match self.stream.read(&mut chunk) {
                Ok(0) => panic!("the server closed instead of answering"),
                Ok(n) => self.input.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(e) => panic!("read from the server: {e}"),
            }
        }
    }

    /// Sends request `seq` and checks its reversed reply.
    fn round_trip(&mut self, seq: u32, body: &[u8]) {
        self.send(seq, body);
        let (got, reply) = self.recv(Duration::from_secs(3));
        assert_eq!(got, seq, "reply sequence number");
        assert_eq!(reply, reversed(body), "reply body");
    }
}

/// Reads until the peer closes `stream` (a read of 0, or an error other
/// than a timeout) for at most `limit`. Returns the bytes that came before
/// the end, or `None` if the connection is still open.
fn await_close(stream: &mut TcpStream, limit: Duration) -> Option<u64> {
    let deadline = Instant::now() + limit;
    let mut buf = vec![0u8; 64 << 10];
    let mut data = 0u64;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        stream.set_read_timeout(Some(left)).unwrap();
        match stream.read(&mut buf) {
            Ok(0) => return Some(data),
            Ok(n) => data += n as u64,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return Some(data),
        }
    }
}

/// Asserts the server closes `stream` within `CLOSE_WAIT` after sending
/// exactly `expected_data` bytes.
fn expect_closed(stream: &mut TcpStream, expected_data: u64, what: &str) {
    match await_close(stream, CLOSE_WAIT) {
        Some(data) => assert_eq!(data, expected_data, "{what}: bytes before the close"),
        None => panic!("{what}: the server did not close the connection"),
    }
}

/// Watches many sockets at once until `until`: returns for each when the
/// server closed it (and the bytes it sent first), or `None` if it is
/// still open. Leaves the sockets non-blocking.
fn watch_closes(socks: &[&TcpStream], until: Instant) -> Vec<Option<(Instant, u64)>> {
    let mut result: Vec<Option<(Instant, u64)>> = vec![None; socks.len()];
    let mut data = vec![0u64; socks.len()];
    for s in socks {
        s.set_nonblocking(true).unwrap();
    }
    let mut buf = [0u8; 4096];
    loop {
        let mut open = 0;
        for (i, mut s) in socks.iter().copied().enumerate() {
            if result[i].is_some() {
                continue;
            }
            loop {
                match s.read(&mut buf) {
                    Ok(0) => {
                        result[i] = Some((Instant::now(), data[i]));
                        break;
                    }
                    Ok(n) => data[i] += n as u64,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        open += 1;
                        break;
                    }
                    Err(_) => {
                        result[i] = Some((Instant::now(), data[i]));
                        break;
                    }
                }
            }
        }
        if open == 0 || Instant::now() >= until {
            return result;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// Runs `attack` `warm_up` times, measures the RSS, runs it `attacks` more
/// times and checks the RSS growth, all with a good client working
/// throughout; then checks the counters moved by what `expected` says for
/// the total number of attacks. `attack` gets the iteration number.
fn repeated(
    t: &dyn Target,
    name: &str,
    warm_up: usize,
    attacks: usize,
    mut attack: impl FnMut(usize),
    expected: impl FnOnce(u64) -> Vec<(&'static str, u64)>,
) {
    let good = Good::start(t);
    let before = t.stats();
    for i in 0..warm_up {
        attack(i);
    }
    settle(t, 1);
    let base = t.rss();
    for i in warm_up..warm_up + attacks {
        attack(i);
    }
    settle(t, 1);
    check_rss(t, name, base, attacks);
    expect_counts(t, &before, name, &expected((warm_up + attacks) as u64));
    let n = good.finish();
    eprintln!("[hostile] {name}: good client made {n} requests during the attack");
}

// ---------------------------------------------------------------------------
// 1. Low-order client keys.
// ---------------------------------------------------------------------------

/// X25519 public keys of small order: the all-zero key, 1, a point of order
/// 8, and p - 1 (order 2). Each gives an all-zero shared secret.
const LOW_ORDER_KEYS: [[u8; 32]; 4] = [
    [0; 32],
    [
        1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0,
    ],
    [
        0xe0, 0xeb, 0x7a, 0x7c, 0x3b, 0x41, 0xb8, 0xae, 0x16, 0x56, 0xe3, 0xfa, 0xf1, 0x9f, 0xc4,
        0x6a, 0xda, 0x09, 0x8d, 0xeb, 0x9c, 0x32, 0xb1, 0xfd, 0x86, 0x62, 0x05, 0x16, 0x5f, 0x49,
        0xb8, 0x00,
    ],
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Case 1: an all-zero (or other low-order) client key: the server answers
/// nothing, closes the connection and reports the handshake failure with
/// LowOrderPublicKey, never calling on_open or on_close for it.
pub fn low_order_client_key(t: &dyn Target) {
    let name = "1 low-order client key";
    let addr = t.addr();
    let log = t.log();
    let mut peers = HashSet::new();
    repeated(
        t,
        name,
        20,
        200,
        |i| {
            // Every other attack uses the all-zero key.
            let key = if i % 2 == 0 {
                LOW_ORDER_KEYS[0]
            } else {
                LOW_ORDER_KEYS[(i / 2) % LOW_ORDER_KEYS.len()]
            };
            let mut s = tcp(addr);
            let peer = s.local_addr().unwrap();
            peers.insert(peer);
            s.write_all(&key).unwrap();
            expect_closed(&mut s, 0, &format!("low-order key {i}"));
            log.expect_handshake_failure(peer, name, |e| {
                matches!(e, Error::Handshake(HandshakeError::LowOrderPublicKey))
            });
        },
        |n| vec![("closed_protocol_error", n), ("handshakes_failed", n)],
    );
    for peer in &peers {
        log.assert_never_opened(*peer, name);
    }
}

// ---------------------------------------------------------------------------
// 2. Slowloris handshakes.
// ---------------------------------------------------------------------------

/// Opens `n` connections that send 10 of the 32 handshake bytes and go
/// silent; checks each is closed at the handshake timeout, reported as a
/// handshake failure and never opened. Returns the shortest and longest
/// time from connect to close.
fn slowloris_round(t: &dyn Target, n: usize) -> (Duration, Duration) {
    let timeout = t.settings().handshake_timeout;
    let key = *ClientHandshake::new(Profile::Secure).unwrap().public_key();
    let mut socks = Vec::new();
    let mut starts = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let mut s = tcp(t.addr());
        s.write_all(&key[..10]).unwrap();
        socks.push(s);
        starts.push(start);
    }
    let refs: Vec<&TcpStream> = socks.iter().collect();
    let closes = watch_closes(&refs, starts[0] + timeout * 4);
    let mut times = Vec::new();
    for (i, (close, start)) in closes.iter().zip(&starts).enumerate() {
        let (at, data) = close.unwrap_or_else(|| panic!("slowloris socket {i} still open"));
        assert_eq!(data, 0, "the server answered a partial key");
        times.push(at.duration_since(*start));
        let peer = socks[i].local_addr().unwrap();
        t.log().expect_handshake_failure(peer, "slowloris", |e| {
            matches!(e, Error::Timeout(TimeoutKind::Handshake))
        });
        t.log().assert_never_opened(peer, "slowloris");
    }
    let min = *times.iter().min().unwrap();
    let max = *times.iter().max().unwrap();
    eprintln!(
        "[hostile] 2: {n} slowloris sockets closed after {min:?}..{max:?} (timeout {timeout:?})"
    );
    assert!(min >= timeout * 4 / 5, "closed too early: {min:?}");
    assert!(max <= timeout * 3, "closed too late: {max:?}");
    (min, max)
}

/// Case 2: 10 of 32 handshake bytes, then silence: closed at the handshake
/// timeout, reported only as a handshake failure.
pub fn slowloris_handshake(t: &dyn Target) {
    let name = "2 slowloris handshake";
    let good = Good::start(t);
    let before = t.stats();
    slowloris_round(t, 100);
    settle(t, 1);
    let base = t.rss();
    for _ in 0..2 {
        slowloris_round(t, 100);
    }
    settle(t, 1);
    check_rss(t, name, base, 200);
    expect_counts(
        t,
        &before,
        name,
        &[
            ("closed_handshake_timeout", 300),
            ("handshakes_failed", 300),
        ],
    );
    good.finish();
}

// ---------------------------------------------------------------------------
// 3, 4. Length prefixes out of range.
// ---------------------------------------------------------------------------

/// Sends `prefix` as the first frame after a valid handshake: over a
/// finished handshake, or (`pipelined`) in the same write as the client key.
/// Returns the peer address; checks the server closes the socket.
fn send_bad_prefix(addr: SocketAddr, prefix: u32, pipelined: bool) -> SocketAddr {
    let (mut stream, peer, expected_data) = if pipelined {
        let mut s = tcp(addr);
        let peer = s.local_addr().unwrap();
        let key = *ClientHandshake::new(Profile::Secure).unwrap().public_key();
        let mut wire = key.to_vec();
        wire.extend_from_slice(&prefix.to_be_bytes());
        s.write_all(&wire).unwrap();
        // The server's key comes back before the close.
        (s, peer, 32)
    } else {
        let mut raw = Raw::connect(addr);
        raw.stream.write_all(&prefix.to_be_bytes()).unwrap();
        (raw.stream, raw.local, 0)
    };
    expect_closed(&mut stream, expected_data, &format!("prefix {prefix:#x}"));
    peer
}

/// Case 3: a length prefix of 0xFFFFFFFF or of max + 1 as the first frame:
/// FrameTooLarge from the prefix alone, nothing allocated for it.
pub fn oversized_length_prefix(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    repeated(
        t,
        "3 oversized length prefix",
        20,
        200,
        |i| {
            let prefix = if i % 2 == 0 {
                u32::MAX
            } else {
                (MAX_CIPHERTEXT + 1) as u32
            };
            let peer = send_bad_prefix(addr, prefix, i % 4 >= 2);
            log.expect_close(peer, "oversized prefix", |e| {
                matches!(e, Error::FrameTooLarge { len, max, .. }
                    if *len == prefix as usize && *max == MAX_CIPHERTEXT)
            });
            assert_eq!(log.take_opened(peer), 1);
            assert_eq!(log.take_messages(peer), 0);
        },
        |n| {
            vec![
                ("closed_protocol_error", n),
                ("frames_rejected_too_large", n),
            ]
        },
    );
}

/// Case 4: a length prefix of 0 to 19 (below sequence number plus tag):
/// FrameTooShort with the claimed length.
pub fn undersized_length_prefix(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    repeated(
        t,
        "4 undersized length prefix",
        20,
        200,
        |i| {
            let prefix = (i % MIN_CIPHERTEXT_LEN) as u32;
            let peer = send_bad_prefix(addr, prefix, i % 40 >= 20);
            log.expect_close(
                peer,
                "undersized prefix",
                |e| matches!(e, Error::FrameTooShort { len } if *len == prefix as usize),
            );
            assert_eq!(log.take_opened(peer), 1);
            assert_eq!(log.take_messages(peer), 0);
        },
        |n| {
            vec![
                ("closed_protocol_error", n),
                ("frames_rejected_too_short", n),
            ]
        },
    );
}

// ---------------------------------------------------------------------------
// 5, 6, 7. Frames that do not authenticate.
// ---------------------------------------------------------------------------

/// Case 5: a frame with one tag bit flipped (the first frame, or after an
/// honest one): Authentication, and the frame never reaches the handler.
pub fn flipped_tag_bit(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    repeated(
        t,
        "5 flipped tag bit",
        20,
        200,
        |i| {
            let mut raw = Raw::connect(addr);
            let honest_first = i % 2 == 1;
            if honest_first {
                raw.round_trip(1, b"honest");
            }
            let mut frame = raw.seal(3, b"tampered request");
            let bit = (i * 7) % (16 * 8);
            let at = frame.len() - 1 - bit / 8;
            frame[at] ^= 1 << (bit % 8);
            raw.stream.write_all(&frame).unwrap();
            expect_closed(&mut raw.stream, 0, "flipped tag bit");
            log.expect_close(raw.local, "flipped tag bit", |e| {
                matches!(e, Error::Authentication)
            });
            assert_eq!(log.take_opened(raw.local), 1);
            assert_eq!(log.take_messages(raw.local), u64::from(honest_first));
        },
        |n| {
            vec![
                ("closed_protocol_error", n),
                ("frames_rejected_authentication", n),
            ]
        },
    );
}

/// Case 6: a frame sent again after it was accepted: Authentication (its
/// counter is behind the opener's), and it reaches the handler only once.
pub fn replayed_frame(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    repeated(
        t,
        "6 replayed frame",
        20,
        200,
        |i| {
            let mut raw = Raw::connect(addr);
            let first = raw.seal(1, b"replay me");
            raw.stream.write_all(&first).unwrap();
            let (seq, reply) = raw.recv(Duration::from_secs(3));
            assert_eq!((seq, &reply[..]), (1, &b"em yalper"[..]));
            let second = i % 2 == 1;
            if second {
                raw.round_trip(3, b"second");
            }
            raw.stream.write_all(&first).unwrap();
            expect_closed(&mut raw.stream, 0, "replayed frame");
            log.expect_close(raw.local, "replayed frame", |e| {
                matches!(e, Error::Authentication)
            });
            assert_eq!(log.take_opened(raw.local), 1);
            assert_eq!(log.take_messages(raw.local), 1 + u64::from(second));
        },
        |n| {
            vec![
                ("closed_protocol_error", n),
                ("frames_rejected_authentication", n),
            ]
        },
    );
}

/// Case 7: random bytes after the handshake: closed with FrameTooShort,
/// FrameTooLarge or Authentication. A third of the attacks get a random
/// prefix in the valid range (then a whole frame of junk follows:
/// Authentication), a third one below 20, a third fully random bytes.
pub fn random_bytes(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let tally = Mutex::new([0u64; 3]);
    repeated(
        t,
        "7 random bytes",
        21,
        201,
        |i| {
            let mut raw = Raw::connect(addr);
            let mut junk = vec![0u8; MAX_CIPHERTEXT + 4 + 512];
            rng.fill(&mut junk);
            let mode = i % 3;
            match mode {
                0 => {
                    let len = 20 + rng.next() % (MAX_CIPHERTEXT as u64 - 19);
                    junk[..4].copy_from_slice(&(len as u32).to_be_bytes());
                }
                1 => {
                    let len = rng.next() % 20;
                    junk[..4].copy_from_slice(&(len as u32).to_be_bytes());
                }
                _ => {}
            }
            // The server may close (and reset) while this is written.
            let _ = raw.stream.write_all(&junk);
            if await_close(&mut raw.stream, CLOSE_WAIT).is_none() {
                panic!("random bytes {i}: the server did not close the connection");
            }
            let reason = log
                .take_close(raw.local, CLOSE_WAIT)
                .unwrap_or_else(|| panic!("random bytes {i}: no on_close"));
            let kind = match reason {
                Error::FrameTooShort { .. } => 0,
                Error::FrameTooLarge { .. } => 1,
                Error::Authentication => 2,
                other => panic!("random bytes {i} (mode {mode}): on_close reason {other:?}"),
            };
            match mode {
                0 => assert_eq!(kind, 2, "valid-length junk: {reason:?}"),
                1 => assert_eq!(kind, 0, "short-length junk: {reason:?}"),
                _ => {}
            }
            tally.lock().unwrap()[kind] += 1;
            assert_eq!(log.take_opened(raw.local), 1);
            assert_eq!(log.take_messages(raw.local), 0);
        },
        |n| {
            let [short, large, auth] = *tally.lock().unwrap();
            eprintln!(
                "[hostile] 7: FrameTooShort {short}, FrameTooLarge {large}, Authentication {auth}"
            );
            vec![
                ("closed_protocol_error", n),
                ("frames_rejected_too_short", short),
                ("frames_rejected_too_large", large),
                ("frames_rejected_authentication", auth),
            ]
        },
    );
}

// ---------------------------------------------------------------------------
// 8, 9. Half a frame.
// ---------------------------------------------------------------------------

/// Case 8: part of a frame (1 byte up to all but one), then the client's end of
/// the stream: closed with PeerClosed, and the handler never sees a
/// message.
pub fn half_a_frame_then_close(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    repeated(
        t,
        "8 half a frame, then close",
        20,
        200,
        |i| {
            let mut raw = Raw::connect(addr);
            let frame = raw.seal(1, &[0xab; 200]);
            let cut = 1 + (i * 13) % (frame.len() - 1);
            raw.stream.write_all(&frame[..cut]).unwrap();
            raw.stream.shutdown(Shutdown::Write).unwrap();
            expect_closed(&mut raw.stream, 0, &format!("half a frame ({cut} bytes)"));
            log.expect_close(raw.local, "half a frame, then close", |e| {
                matches!(e, Error::PeerClosed)
            });
            assert_eq!(log.take_opened(raw.local), 1);
            assert_eq!(log.take_messages(raw.local), 0);
        },
        |n| vec![("closed_by_peer", n)],
    );
}

/// Opens `n` connections that send part of a frame and go silent; checks
/// each is closed at the read timeout with Timeout(Read).
fn stall_round(t: &dyn Target, n: usize) {
    let timeout = t.settings().read_timeout;
    let log = t.log();
    let mut raws = Vec::new();
    let mut starts = Vec::new();
    for i in 0..n {
        let mut raw = Raw::connect(t.addr());
        let frame = raw.seal(1, &[0xcd; 300]);
        let cut = 1 + (i * 37) % (frame.len() - 1);
        raw.stream.write_all(&frame[..cut]).unwrap();
        starts.push(Instant::now());
        raws.push(raw);
    }
    let refs: Vec<&TcpStream> = raws.iter().map(|r| &r.stream).collect();
    let closes = watch_closes(&refs, starts[n - 1] + timeout * 4);
    let mut times = Vec::new();
    for ((raw, start), close) in raws.iter().zip(&starts).zip(&closes) {
        let (at, data) = close.unwrap_or_else(|| panic!("stalled {} still open", raw.local));
        assert_eq!(data, 0, "the server sent something to a stalled peer");
        times.push(at.duration_since(*start));
        log.expect_close(raw.local, "half a frame, then silence", |e| {
            matches!(e, Error::Timeout(TimeoutKind::Read))
        });
        assert_eq!(log.take_opened(raw.local), 1);
        assert_eq!(log.take_messages(raw.local), 0);
    }
    let min = *times.iter().min().unwrap();
    let max = *times.iter().max().unwrap();
    eprintln!("[hostile] 9: closed after {min:?}..{max:?} (read timeout {timeout:?})");
    assert!(min >= timeout * 4 / 5, "closed too early: {min:?}");
    assert!(max <= timeout * 3, "closed too late: {max:?}");
}

/// Case 9: part of a frame, then silence: closed at the read timeout, and
/// on_close gets Timeout(Read).
pub fn half_a_frame_then_silence(t: &dyn Target) {
    let name = "9 half a frame, then silence";
    let good = Good::start(t);
    let before = t.stats();
    stall_round(t, 100);
    settle(t, 1);
    let base = t.rss();
    for _ in 0..2 {
        stall_round(t, 100);
    }
    settle(t, 1);
    check_rss(t, name, base, 200);
    expect_counts(t, &before, name, &[("closed_read_timeout", 300)]);
    good.finish();
}

// ---------------------------------------------------------------------------
// 10. A peer that never reads.
// ---------------------------------------------------------------------------

/// One round of case 10: `n` peers that never read while the server floods
/// each of them.
fn flood_round(t: &dyn Target, n: usize) {
    let log = t.log();
    let mut raws: Vec<Raw> = (0..n).map(|_| Raw::connect(t.addr())).collect();
    let mut keepalives = vec![0u64; n];
    // Never read, but keep sending one-way messages every 50 ms, so that
    // the read timeout cannot be what closes the connection.
    let mut keep_alive = |raws: &mut [Raw]| {
        for (raw, sent) in raws.iter_mut().zip(&mut keepalives) {
            let frame = raw.seal(0, b"still here");
            if raw.stream.write_all(&frame).is_ok() {
                *sent += 1;
            }
        }
    };
    for i in 0..n {
        t.start_flood(raws[i].local, FLOOD_MESSAGE);
        keep_alive(&mut raws);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while !raws.iter().all(|r| log.has_flood(r.local)) {
        assert!(Instant::now() < deadline, "the floods did not end");
        keep_alive(&mut raws);
        thread::sleep(Duration::from_millis(50));
    }
    let mut max_sent = 0;
    let mut max_took = Duration::ZERO;
    let mut timeouts = 0;
    for (mut raw, keepalives) in raws.into_iter().zip(keepalives) {
        let f = log.take_flood(raw.local).expect("flood outcome");
        assert!(
            matches!(
                f.result.as_ref().map(Error::root_cause),
                Some(Error::Timeout(TimeoutKind::Write) | Error::Closed)
            ),
            "flood to {} ended with {:?} after {:?} and {} bytes",
            raw.local,
            f.result,
            f.took,
            f.sent
        );
        assert!(f.took < Duration::from_secs(5), "flood took {:?}", f.took);
        assert!(f.sent < 16 << 20, "the server took {} bytes", f.sent);
        max_sent = max_sent.max(f.sent);
        max_took = max_took.max(f.took);
        if matches!(f.result, Some(Error::Timeout(_))) {
            timeouts += 1;
        }
        log.expect_close(raw.local, "non-reading peer", |e| {
            matches!(e, Error::Timeout(TimeoutKind::Write))
        });
        // What the kernel buffered is delivered, then the end.
        let data = await_close(&mut raw.stream, Duration::from_secs(5))
            .expect("the server did not close the non-reading peer");
        assert!(
            data <= f.sent + f.sent / 100,
            "drained {data} of {} bytes",
            f.sent
        );
        assert_eq!(log.take_opened(raw.local), 1);
        assert!(log.take_messages(raw.local) <= keepalives);
    }
    eprintln!(
        "[hostile] 10: {n} floods ended within {max_took:?} ({timeouts} with Timeout(Write), \
         {} with Closed), at most {} KiB accepted",
        n - timeouts,
        max_sent >> 10
    );
}

/// Case 10: the server floods a peer that never reads with send_no_wait (64 KiB
/// messages, max_queued_bytes 1 MiB): the flood ends with Timeout(Write)
/// or Closed within a few seconds, after a bounded number of bytes, and
/// the connection is closed with Timeout(Write).
pub fn non_reading_peer(t: &dyn Target) {
    let name = "10 non-reading peer";
    let good = Good::start(t);
    let before = t.stats();
    flood_round(t, 4);
    flood_round(t, 4);
    settle(t, 1);
    let base = t.rss();
    for _ in 0..3 {
        flood_round(t, 4);
    }
    settle(t, 1);
    check_rss(t, name, base, 12);
    expect_counts(t, &before, name, &[("closed_write_timeout", 20)]);
    good.finish();
}

// ---------------------------------------------------------------------------
// 11. Idle sockets over the connection cap.
// ---------------------------------------------------------------------------

/// Case 11: against `Settings::capped` with a handshake timeout longer than the
/// accept wait: the server holds its cap of connections (the good
/// client's and cap - 1 idle ones); the idle sockets over the cap are
/// closed after the accept wait, the admitted ones stay until they go, and
/// then a new client is served.
pub fn idle_sockets_over_the_cap(t: &dyn Target) {
    let name = "11 idle sockets over the cap";
    let cap = t.settings().max_conns;
    let accept_wait = t.settings().accept_wait;
    assert!(t.settings().handshake_timeout >= accept_wait * 4);
    let addr = t.addr();
    let good = Good::start(t);
    let before = t.stats();
    assert_eq!(t.connections(), 1);
    let mut idle = HashSet::new();
    let mut refused = 0;
    let mut round = |n: usize| {
        let start = Instant::now();
        let socks: Vec<TcpStream> = (0..n).map(|_| tcp(addr)).collect();
        idle.extend(socks.iter().map(|s| s.local_addr().unwrap()));
        let refs: Vec<&TcpStream> = socks.iter().collect();
        let closes = watch_closes(&refs, start + accept_wait * 4);
        let times: Vec<Duration> = closes
            .iter()
            .flatten()
            .map(|(at, data)| {
                // Only the refusal at the cap (PROTOCOL.md): 32 bytes.
                assert_eq!(
                    *data, 32,
                    "the server sent an idle socket more than its refusal"
                );
                at.duration_since(start)
            })
            .collect();
        assert_eq!(
            times.len(),
            n - (cap - 1),
            "closed {} of {n} idle sockets, expected all but {} admitted",
            times.len(),
            cap - 1
        );
        refused += times.len() as u64;
        let min = *times.iter().min().unwrap();
        let max = *times.iter().max().unwrap();
        assert!(min >= accept_wait * 4 / 5, "closed too early: {min:?}");
        assert!(max <= accept_wait * 3, "closed too late: {max:?}");
        assert_eq!(t.connections(), cap);
        // The good client, admitted before, keeps working meanwhile.
        check_client(&good.client, "capped");
        // The admitted idle sockets go; their places come back.
        drop(socks);
        settle(t, 1);
        fresh_client(t, addr);
        eprintln!(
            "[hostile] 11: {} of {n} idle sockets closed after {min:?}..{max:?} (accept wait {accept_wait:?})",
            times.len()
        );
    };
    round(2 * cap);
    let base = t.rss();
    for _ in 0..2 {
        round(64);
    }
    check_rss(t, name, base, 128);
    // The refused never reached a reactor; the admitted idle ones ended
    // their handshake when the test dropped them, and each round's fresh
    // client closed its connection.
    let admitted = 3 * (cap as u64 - 1);
    expect_counts(
        t,
        &before,
        name,
        &[
            ("connections_refused", refused),
            ("closed_by_peer", admitted + 3),
            ("handshakes_failed", admitted),
        ],
    );
    good.finish();
    for peer in &idle {
        t.log().assert_never_opened(*peer, name);
    }
}

/// A fresh client is served once places are free. Its connection is then
/// forgotten by the log: a later idle socket may get the same ephemeral
/// port, and must not be taken for it.
fn fresh_client(t: &dyn Target, addr: SocketAddr) {
    let known: HashSet<SocketAddr> = t.log().events().opened.keys().copied().collect();
    let fresh = Client::new(addr, t.settings().client_config()).unwrap();
    check_client(&fresh, "fresh");
    fresh.shutdown();
    settle(t, 1);
    t.log().update(|e| {
        let new: Vec<SocketAddr> = e
            .opened
            .keys()
            .filter(|p| !known.contains(p))
            .copied()
            .collect();
        for peer in new {
            e.opened.remove(&peer);
            e.closed.remove(&peer);
            e.messages.remove(&peer);
        }
    });
}

/// Case 11b: the same attack with a handshake timeout as short as the accept
/// wait: the admitted idle sockets are closed by the handshake timeout
/// and the others by the accept wait (or, admitted into a place freed
/// meanwhile, by the handshake timeout after it), so every one of them
/// goes within about twice the timeouts, and a new client is then served
/// without the test closing anything.
pub fn idle_sockets_over_the_cap_short_handshake(t: &dyn Target) {
    let name = "11b idle sockets, short handshake timeout";
    let accept_wait = t.settings().accept_wait;
    let handshake_timeout = t.settings().handshake_timeout;
    let addr = t.addr();
    let good = Good::start(t);
    let before = t.stats();
    let mut idle = HashSet::new();
    let mut round = |n: usize| {
        let start = Instant::now();
        let socks: Vec<TcpStream> = (0..n).map(|_| tcp(addr)).collect();
        idle.extend(socks.iter().map(|s| s.local_addr().unwrap()));
        let refs: Vec<&TcpStream> = socks.iter().collect();
        let closes = watch_closes(&refs, start + Duration::from_secs(3));
        let times: Vec<Duration> = closes
            .iter()
            .enumerate()
            .map(|(i, close)| {
                let (at, data) = close.unwrap_or_else(|| panic!("idle socket {i} still open"));
                // Nothing (admitted, then closed at the handshake timeout)
                // or the refusal at the cap (PROTOCOL.md): 32 bytes.
                assert!(
                    data == 0 || data == 32,
                    "the server sent an idle socket {data} bytes"
                );
                at.duration_since(start)
            })
            .collect();
        let min = *times.iter().min().unwrap();
        let max = *times.iter().max().unwrap();
        assert!(min >= accept_wait * 4 / 5, "closed too early: {min:?}");
        assert!(
            max <= (accept_wait + handshake_timeout) * 2,
            "closed too late: {max:?}"
        );
        settle(t, 1);
        fresh_client(t, addr);
        eprintln!(
            "[hostile] 11b: all {n} idle sockets closed after {min:?}..{max:?} \
             (accept wait {accept_wait:?}, handshake timeout {handshake_timeout:?})"
        );
        drop(socks);
    };
    round(16);
    let base = t.rss();
    round(64);
    check_rss(t, name, base, 64);
    // Each idle socket was either refused after the accept wait or
    // admitted and closed at the handshake timeout; which, depends on the
    // race between the two timers.
    let mut by_timeout = 0;
    let refused = wait_until(Duration::from_secs(3), || {
        let now = t.stats();
        by_timeout = now.closed_handshake_timeout - before.closed_handshake_timeout;
        now.connections_refused - before.connections_refused + by_timeout == 80
    });
    assert!(refused, "idle sockets not all accounted for");
    let refused = 80 - by_timeout;
    assert!(refused > 0, "no idle socket was refused at the cap");
    expect_counts(
        t,
        &before,
        name,
        &[
            ("connections_refused", refused),
            ("closed_handshake_timeout", by_timeout),
            ("handshakes_failed", by_timeout),
            ("closed_by_peer", 2),
        ],
    );
    good.finish();
    for peer in &idle {
        t.log().assert_never_opened(*peer, name);
    }
}

// ---------------------------------------------------------------------------
// 12. Responses nobody asked for.
// ---------------------------------------------------------------------------

/// Case 12: frames with the server's request parity (even sequence numbers)
/// that the server never issued are dropped; the connection stays open and
/// a following request gets its reply.
pub fn unasked_for_response(t: &dyn Target) {
    let (addr, log) = (t.addr(), t.log());
    let mut raw: Option<Raw> = None;
    let mut requests = 0u64;
    repeated(
        t,
        "12 unasked-for response",
        50,
        200,
        |i| {
            let conn = raw.get_or_insert_with(|| Raw::connect(addr));
            let bogus = match i % 5 {
                0 => 2,
                1 => 0x7fff_fffe,
                2 => 0xffff_fffe,
                3 => 0x100,
                _ => ((i as u32).wrapping_mul(2_654_435_761) & !1).max(2),
            };
            let body = format!("after-bogus-{i}");
            if i % 2 == 0 {
                conn.send(bogus, b"an answer to nothing");
                conn.send(1, body.as_bytes());
            } else {
                // Both frames in one write: one read, two frames.
                let mut wire = conn.seal(bogus, b"an answer to nothing");
                wire.extend_from_slice(&conn.seal(1, body.as_bytes()));
                conn.stream.write_all(&wire).unwrap();
            }
            let (seq, reply) = conn.recv(Duration::from_secs(3));
            assert_eq!(
                (seq, reply),
                (1, reversed(body.as_bytes())),
                "after {bogus:#x}"
            );
            requests += 1;
            assert!(!log.has_close(conn.local), "closed after {bogus:#x}");
            if i % 50 == 49 {
                // Every 50 attacks, a fresh connection.
                let mut conn = raw.take().unwrap();
                conn.stream.shutdown(Shutdown::Write).unwrap();
                expect_closed(&mut conn.stream, 0, "unasked-for response");
                log.expect_close(conn.local, "unasked-for response", |e| {
                    matches!(e, Error::PeerClosed)
                });
                assert_eq!(log.take_opened(conn.local), 1);
                assert_eq!(
                    log.take_messages(conn.local),
                    requests,
                    "bogus reached the handler"
                );
                requests = 0;
            }
        },
        |n| vec![("responses_dropped", n), ("closed_by_peer", n / 50)],
    );
}

// ---------------------------------------------------------------------------
// 13. Responses after their request timed out.
// ---------------------------------------------------------------------------

/// One round: the server's request `first` times out after `timeout`; the
/// raw client answers it `late_after` after it read it, either before the
/// server's next request (`during_next == false`) or while it is pending;
/// the next request must get exactly its own answer.
fn late_round(
    t: &dyn Target,
    raw: &mut Raw,
    timeout: Duration,
    late_after: Duration,
    during_next: bool,
    round: usize,
) {
    let log = t.log();
    let first = format!("first-{round}");
    let timed = t.start_request(raw.local, first.as_bytes(), timeout);
    let (s1, got) = raw.recv(Duration::from_secs(3));
    let read_at = Instant::now();
    assert_eq!(got, first.as_bytes());
    assert!(s1 != 0 && s1 % 2 == 0, "server request number {s1:#x}");
    let Answer { result, took } = log
        .take_answer(timed, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("round {round}: the first request never ended"));
    assert!(
        matches!(
            result.as_ref().map_err(Error::root_cause),
            Err(Error::Timeout(TimeoutKind::Request))
        ),
        "round {round}: {result:?}"
    );
    assert!(
        took >= timeout && took < timeout + Duration::from_secs(1),
        "request timeout took {took:?}"
    );
    thread::sleep(late_after.saturating_sub(read_at.elapsed()));
    let late = format!("late-{round}");
    if !during_next {
        raw.send(s1, late.as_bytes());
        if !late_after.is_zero() {
            // Let the server take it in before it asks again.
            thread::sleep(Duration::from_millis(50));
        }
    }
    let second = format!("second-{round}");
    let pending = t.start_request(raw.local, second.as_bytes(), Duration::from_secs(3));
    let (s2, got) = raw.recv(Duration::from_secs(3));
    assert_eq!(got, second.as_bytes());
    assert_ne!(
        s2, s1,
        "a request number was reused while its response could still come"
    );
    if during_next {
        raw.send(s1, late.as_bytes());
    }
    let answer = format!("answer-{round}");
    raw.send(s2, answer.as_bytes());
    let resp = log
        .take_answer(pending, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("round {round}: the second request never ended"))
        .result
        .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    assert_eq!(
        String::from_utf8_lossy(&resp),
        answer,
        "round {round}: the second request got another answer"
    );
}

/// Case 13: a response that arrives after its request timed out is dropped and
/// never delivered to the next request (with one request slot, which the
/// next request reuses in a new generation).
pub fn late_response(t: &dyn Target) {
    let name = "13 late response";
    assert_eq!(t.settings().max_in_flight, 1);
    let log = t.log();
    let good = Good::start(t);
    let before = t.stats();
    let mut raw = Raw::connect(t.addr());
    // The brief's timing: a 100 ms request timeout, the late answer 300 ms
    // after the request, before and during the next request.
    let ms = Duration::from_millis;
    late_round(t, &mut raw, ms(100), ms(300), false, 0);
    late_round(t, &mut raw, ms(100), ms(300), true, 1);
    // Quick rounds, alternating.
    for round in 2..12 {
        late_round(t, &mut raw, ms(10), ms(0), round % 2 == 0, round);
    }
    let base = t.rss();
    for round in 12..112 {
        late_round(t, &mut raw, ms(10), ms(0), round % 2 == 0, round);
    }
    check_rss(t, name, base, 100);
    assert!(!log.has_close(raw.local), "the raw connection was closed");
    raw.stream.shutdown(Shutdown::Write).unwrap();
    expect_closed(&mut raw.stream, 0, "late response");
    log.expect_close(raw.local, "late response", |e| {
        matches!(e, Error::PeerClosed)
    });
    assert_eq!(log.take_opened(raw.local), 1);
    // The handler never saw the late answers (nor anything else).
    assert_eq!(log.take_messages(raw.local), 0);
    settle(t, 1);
    expect_counts(
        t,
        &before,
        name,
        &[
            ("requests_timed_out", 112),
            ("responses_dropped", 112),
            ("closed_by_peer", 1),
        ],
    );
    assert_eq!(
        t.stats().requests_in_flight,
        0,
        "a request is still pending"
    );
    good.finish();
}

// ---------------------------------------------------------------------------
// 14. Pipelined requests whose replies are never read.
// ---------------------------------------------------------------------------

/// Case 14 (with [`Settings::budget`]): a peer that never reads sends one
/// largest one-way message (the server's receive buffer grows to its full
/// size), then pipelines `n` requests for 32 KiB replies in one write. The
/// server must stop dispatching once `max_queued_bytes` are queued, leave
/// the other requests unread, and close the peer at the write timeout; its
/// memory must grow by at most about twice `max_queued_bytes` plus a
/// receive buffer, whatever `n` is. (Before the budget was checked per
/// frame, every request in the receive buffer was answered first: about
/// 1,200 replies, 38 MiB, per buffer here.)
pub fn pipelined_requests_never_read(t: &dyn Target) {
    let name = "14 pipelined requests, replies never read";
    let s = t.settings().clone();
    let reply = 32 << 10;
    // Two queue buffers at the budget plus a reply each, the receive
    // buffer, and slack for the allocator and the good client.
    let bound = 2 * (s.max_queued_bytes + reply) as u64 + s.max_message as u64 + (3 << 20);
    let mut body = BIG_REPLY.to_vec();
    body.extend_from_slice(&(reply as u32).to_be_bytes());
    let good = Good::start(t);
    let before = t.stats();
    for n in [2_000usize, 20_000] {
        let mut raw = Raw::connect(t.addr());
        raw.send(0, &vec![0x11; s.max_message]);
        let mut batch = Vec::new();
        for i in 0..n {
            let seq = 2 * i as u32 + 1;
            raw.sealer.seal_append(seq, &body, &mut batch).unwrap();
        }
        let base = t.rss();
        let mut writer = raw.stream.try_clone().unwrap();
        let write = thread::spawn(move || {
            // Blocks once the server stops reading; fails once it closes.
            let _ = writer.write_all(&batch);
        });
        let start = Instant::now();
        let mut peak = base;
        while !t.log().has_close(raw.local) {
            assert!(
                start.elapsed() < s.write_timeout * 4,
                "{name}: the non-reading peer was not closed"
            );
            peak = peak.max(t.rss());
            thread::sleep(Duration::from_millis(5));
        }
        write.join().unwrap();
        log_close_reason(t, raw.local, name, TimeoutKind::Write);
        let growth = peak.saturating_sub(base);
        let dispatched = t.log().take_messages(raw.local);
        eprintln!(
            "[hostile] {name}: {n} requests: {dispatched} messages dispatched, peak RSS growth {} KiB \
             (bound {} KiB), closed after {:?}",
            growth >> 10,
            bound >> 10,
            start.elapsed()
        );
        assert!(
            growth < bound,
            "{name}: {n} pipelined requests grew the server by {growth} bytes (bound {bound})"
        );
        assert!(
            dispatched < n as u64 / 4,
            "{name}: {dispatched} of {n} requests were answered for a peer that reads nothing"
        );
        assert_eq!(t.log().take_opened(raw.local), 1);
    }
    settle(t, 1);
    let paused = counter(&t.stats(), "reads_paused") - counter(&before, "reads_paused");
    assert!(paused >= 2, "{name}: reading paused {paused} times");
    expect_counts(t, &before, name, &[("closed_write_timeout", 2)]);
    good.finish();
}

/// Takes the `on_close` reason of `peer` and checks it is `Timeout(kind)`.
fn log_close_reason(t: &dyn Target, peer: SocketAddr, what: &str, kind: TimeoutKind) {
    t.log()
        .expect_close(peer, what, |e| matches!(e, Error::Timeout(k) if *k == kind));
}

// ---------------------------------------------------------------------------
// 15. A `psk` peer without the key.
// ---------------------------------------------------------------------------

/// Case 15 (with [`Settings::psk`]): peers that do not hold the PSK send a
/// client key and then nothing, filling every place under the cap but the
/// good client's. A server that counted its handshake done once it had
/// answered would open them (`on_open`) and keep them until the read
/// timeout; they must instead fail at the handshake timeout, never be
/// opened, and leave room for a real client.
pub fn psk_peer_without_the_key(t: &dyn Target) {
    let name = "15 psk peer without the key";
    let s = t.settings().clone();
    assert!(s.psk.is_some(), "{name} needs a psk server");
    let timeout = s.handshake_timeout;
    let good = Good::start(t);
    let before = t.stats();
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let rounds = 3;
    let per_round = s.max_conns - 1;
    for round in 0..rounds {
        let mut socks = Vec::new();
        let mut starts = Vec::new();
        for _ in 0..per_round {
            let mut stream = tcp(t.addr());
            let mut key = [0u8; 32];
            rng.fill(&mut key);
            stream.write_all(&key).unwrap();
            starts.push(Instant::now());
            socks.push(stream);
        }
        let locals: Vec<SocketAddr> = socks.iter().map(|s| s.local_addr().unwrap()).collect();
        let refs: Vec<&TcpStream> = socks.iter().collect();
        let closes = watch_closes(&refs, starts[per_round - 1] + timeout * 4);
        for ((local, start), close) in locals.iter().zip(&starts).zip(&closes) {
            let (at, _) = close.unwrap_or_else(|| {
                panic!("{name}: round {round}: {local} without the key still holds its place")
            });
            let took = at.duration_since(*start);
            assert!(
                took >= timeout * 4 / 5 && took <= timeout * 3,
                "{name}: {local} closed after {took:?} (handshake timeout {timeout:?})"
            );
            t.log().expect_handshake_failure(*local, name, |e| {
                matches!(e, Error::Timeout(TimeoutKind::Handshake))
            });
            t.log().assert_never_opened(*local, name);
        }
        // Their places are free again: a real client gets one.
        fresh_client(t, t.addr());
    }
    let n = (rounds * per_round) as u64;
    expect_counts(
        t,
        &before,
        name,
        &[
            ("closed_handshake_timeout", n),
            ("handshakes_failed", n),
            // The fresh clients, which go themselves.
            ("closed_by_peer", rounds as u64),
        ],
    );
    good.finish();
}

// ---------------------------------------------------------------------------
// 16. A frame trickled a byte at a time.
// ---------------------------------------------------------------------------

/// Opens `n` connections that send the length prefix of a largest frame
/// and then one byte of it well within every read timeout; checks each is
/// closed at the frame timeout, counted from the frame's first byte, with
/// Timeout(Frame).
fn trickle_round(t: &dyn Target, n: usize) {
    let s = t.settings();
    let (timeout, every) = (s.frame_timeout, s.read_timeout * 2 / 5);
    let log = t.log();
    let mut raws: Vec<Raw> = (0..n).map(|_| Raw::connect(t.addr())).collect();
    let mut starts = Vec::new();
    for raw in &mut raws {
        raw.stream
            .write_all(&(MAX_CIPHERTEXT as u32).to_be_bytes())
            .unwrap();
        raw.stream.set_nonblocking(true).unwrap();
        starts.push(Instant::now());
    }
    let until = starts[n - 1] + timeout * 4;
    let mut closed: Vec<Option<Instant>> = vec![None; n];
    let mut last_byte = Instant::now();
    let mut buf = [0u8; 256];
    while closed.iter().any(Option::is_none) && Instant::now() < until {
        let trickle = last_byte.elapsed() >= every;
        for (raw, closed) in raws.iter_mut().zip(&mut closed) {
            if closed.is_some() {
                continue;
            }
            match raw.stream.read(&mut buf) {
                Ok(0) => *closed = Some(Instant::now()),
                Ok(_) => panic!("the server sent something to a trickling peer"),
                Err(e) if e.kind() == ErrorKind::WouldBlock => {
                    if trickle {
                        let _ = raw.stream.write(&[0xee]);
                    }
                }
                Err(_) => *closed = Some(Instant::now()),
            }
        }
        if trickle {
            last_byte = Instant::now();
        }
        thread::sleep(Duration::from_millis(5));
    }
    let mut times = Vec::new();
    for ((raw, start), close) in raws.iter().zip(&starts).zip(&closed) {
        let at = close.unwrap_or_else(|| {
            panic!(
                "{} trickling a byte every {every:?} still open after {:?}",
                raw.local,
                start.elapsed()
            )
        });
        times.push(at.duration_since(*start));
        log.expect_close(raw.local, "trickled frame", |e| {
            matches!(e, Error::Timeout(TimeoutKind::Frame))
        });
        assert_eq!(log.take_opened(raw.local), 1);
        assert_eq!(log.take_messages(raw.local), 0);
    }
    let min = *times.iter().min().unwrap();
    let max = *times.iter().max().unwrap();
    eprintln!("[hostile] 16: closed after {min:?}..{max:?} (frame timeout {timeout:?})");
    assert!(min >= timeout * 4 / 5, "closed too early: {min:?}");
    assert!(max <= timeout * 3, "closed too late: {max:?}");
}

/// Case 16: a peer sends the length prefix of a largest frame, then one
/// byte every 200 ms, below the 500 ms read timeout: every byte used to
/// reset that timeout, so the peer held its place forever. It is closed
/// at the frame timeout with Timeout(Frame).
pub fn trickled_frame(t: &dyn Target) {
    let name = "16 trickled frame";
    let good = Good::start(t);
    let before = t.stats();
    trickle_round(t, 20);
    settle(t, 1);
    let base = t.rss();
    for _ in 0..2 {
        trickle_round(t, 20);
    }
    settle(t, 1);
    check_rss(t, name, base, 40);
    expect_counts(t, &before, name, &[("closed_frame_timeout", 60)]);
    good.finish();
}
