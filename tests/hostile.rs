//! Hostile peers against a live server on 127.0.0.1.
//!
//! Every case attacks a `Server` with a hand-rolled raw client (a std
//! `TcpStream` that runs the handshake with `ClientHandshake`, or skips it)
//! and checks three things:
//!
//! - the bad connection is closed, as the raw socket sees it (a read returns
//!   0 or an error within a deadline) and, when it got past the handshake,
//!   with the expected reason in `Handler::on_close`;
//! - a good `Client` on another connection keeps working during the attack
//!   (a background caller checks every reversed reply) and after it;
//! - the server's memory does not grow with the attack: the process RSS
//!   after many repetitions is within a generous bound of the RSS after a
//!   warm-up of the same shape.
//!
//! The cases run one at a time (a file-wide lock), so that each RSS
//! measurement sees only its own attack, and each runs on its own thread
//! with a deadline, so none can hang the run.

mod common;
use common::{reversed, wait_until, within};

use std::collections::{HashMap, HashSet};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use monte_rpc::protocol::{
    ClientHandshake, Decoded, FrameDecoder, Handshake, Opener, Profile, Sealer, MIN_CIPHERTEXT_LEN,
};
use monte_rpc::{Client, Config, Connection, Context, Error, Handler, Server, TimeoutKind};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_millis(300);
const READ_TIMEOUT: Duration = Duration::from_millis(500);
const WRITE_TIMEOUT: Duration = Duration::from_millis(500);
/// The server's maximum message size.
const MAX_MESSAGE: usize = 64 << 10;
/// The largest ciphertext length the server accepts in a length prefix.
const MAX_CIPHERTEXT: usize = MAX_MESSAGE + MIN_CIPHERTEXT_LEN;
/// The most the process RSS may grow between warm-up and end of an attack.
const RSS_BOUND: u64 = 16 << 20;
/// How long a connection the server should close may take to show it.
const CLOSE_WAIT: Duration = Duration::from_secs(3);

// ---------------------------------------------------------------------------
// Harness: serial cases with a deadline, polling, RSS.
// ---------------------------------------------------------------------------

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one case: alone (no other case of this file runs meanwhile), on its
/// own thread, failing if it takes more than 30 s.
fn case<T: Send + 'static>(name: &'static str, body: impl FnOnce() -> T + Send + 'static) -> T {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    let value = within(30, body);
    eprintln!("[hostile] {name}: passed in {:?}", start.elapsed());
    value
}

/// The process's resident set size in bytes.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .expect("statm has a resident field")
        .parse()
        .expect("resident pages");
    pages * 4096
}

/// Asserts the RSS grew by less than `RSS_BOUND` since `base`.
fn check_rss(name: &str, base: u64, attacks: usize) {
    let after = rss();
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
fn settle(server: &Server, n: usize) {
    assert!(
        wait_until(Duration::from_secs(3), || server.connections() == n),
        "server still holds {} connections, expected {n}",
        server.connections()
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
// The server side: a recording, reversing handler.
// ---------------------------------------------------------------------------

/// What the server's handler saw, keyed by the peer's address (the raw
/// socket's local address).
#[derive(Default)]
struct Events {
    opened: HashMap<SocketAddr, usize>,
    messages: HashMap<SocketAddr, u64>,
    closed: HashMap<SocketAddr, Vec<Error>>,
}

#[derive(Default)]
struct Log {
    events: Mutex<Events>,
    changed: Condvar,
}

impl Log {
    fn update(&self, f: impl FnOnce(&mut Events)) {
        f(&mut self.events());
        self.changed.notify_all();
    }

    fn events(&self) -> MutexGuard<'_, Events> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for `on_close` of the connection from `peer`,
    /// and takes its reason.
    fn take_close(&self, peer: SocketAddr, timeout: Duration) -> Option<Error> {
        let deadline = Instant::now() + timeout;
        let mut g = self.events();
        loop {
            if let Some(reasons) = g.closed.get_mut(&peer) {
                let reason = reasons.remove(0);
                if reasons.is_empty() {
                    g.closed.remove(&peer);
                }
                return Some(reason);
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

    /// Takes the `on_close` reason of `peer`, failing if it is missing or
    /// does not satisfy `expected`.
    fn expect_close(&self, peer: SocketAddr, what: &str, expected: impl Fn(&Error) -> bool) {
        let reason = self
            .take_close(peer, CLOSE_WAIT)
            .unwrap_or_else(|| panic!("{what}: on_close never ran for {peer}"));
        assert!(expected(&reason), "{what}: on_close reason {reason:?}");
    }

    /// Takes how many times `on_open` ran for `peer`.
    fn take_opened(&self, peer: SocketAddr) -> usize {
        self.events().opened.remove(&peer).unwrap_or(0)
    }

    /// Takes how many messages `peer` got through to the handler.
    fn take_messages(&self, peer: SocketAddr) -> u64 {
        self.events().messages.remove(&peer).unwrap_or(0)
    }

    /// Whether `on_close` ran for `peer` and was not taken yet.
    fn has_close(&self, peer: SocketAddr) -> bool {
        self.events().closed.contains_key(&peer)
    }
}

type OpenHook = Box<dyn Fn(&Connection) + Send + Sync>;

/// Replies to every request with its body reversed and records every
/// callback in the log; `hook` runs in `on_open`.
struct Recorder {
    log: Arc<Log>,
    hook: Option<OpenHook>,
}

impl Handler for Recorder {
    fn on_message(&self, ctx: &mut Context<'_>) {
        if let Some(peer) = ctx.conn().peer_addr() {
            self.log
                .update(|e| *e.messages.entry(peer).or_default() += 1);
        }
        let body = reversed(ctx.body());
        let _ = ctx.reply(&body);
    }

    fn on_open(&self, conn: &Connection) {
        if let Some(peer) = conn.peer_addr() {
            self.log.update(|e| *e.opened.entry(peer).or_default() += 1);
        }
        if let Some(hook) = &self.hook {
            hook(conn);
        }
    }

    fn on_close(&self, conn: &Connection, reason: &Error) {
        if let Some(peer) = conn.peer_addr() {
            self.log
                .update(|e| e.closed.entry(peer).or_default().push(reason.clone()));
        }
    }
}

fn server_config() -> Config {
    Config::server()
        .workers(2)
        .handshake_timeout(Some(HANDSHAKE_TIMEOUT))
        .read_timeout(Some(READ_TIMEOUT))
        .write_timeout(Some(WRITE_TIMEOUT))
        .request_timeout(Some(Duration::from_secs(5)))
        .max_message_size(MAX_MESSAGE)
}

fn start(config: Config, hook: Option<OpenHook>) -> (Server, Arc<Log>) {
    let log = Arc::new(Log::default());
    let handler = Recorder {
        log: log.clone(),
        hook,
    };
    let server = Server::bind("127.0.0.1:0", config, handler).expect("bind server");
    (server, log)
}

// ---------------------------------------------------------------------------
// The good client: requests in a loop, every reply checked.
// ---------------------------------------------------------------------------

fn good_config() -> Config {
    Config::default()
        .workers(1)
        .max_conns(1)
        .request_timeout(Some(Duration::from_secs(3)))
        .write_timeout(Some(Duration::from_secs(3)))
}

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
    fn start(addr: SocketAddr) -> Good {
        let client = Arc::new(Client::new(addr, good_config()).expect("good client"));
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
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
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
            sealer: session.sealer,
            opener: session.opener,
            decoder: FrameDecoder::new(MAX_MESSAGE),
            input,
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
            if let Decoded::Frame(n) = self.decoder.decode(&self.input).expect("server frame") {
                let (seq, payload) = self
                    .opener
                    .open_in_place(&mut self.input[..n])
                    .expect("open server frame");
                let frame = (seq, payload.to_vec());
                self.input.drain(..n);
                return frame;
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
/// throughout. `attack` gets the iteration number, the server's address and
/// the log.
fn repeated(
    name: &str,
    config: Config,
    warm_up: usize,
    attacks: usize,
    mut attack: impl FnMut(usize, SocketAddr, &Log),
) {
    let (server, log) = start(config, None);
    let addr = server.local_addr();
    let good = Good::start(addr);
    for i in 0..warm_up {
        attack(i, addr, &log);
    }
    settle(&server, 1);
    let base = rss();
    for i in warm_up..warm_up + attacks {
        attack(i, addr, &log);
    }
    settle(&server, 1);
    check_rss(name, base, attacks);
    let n = good.finish();
    eprintln!("[hostile] {name}: good client made {n} requests during the attack");
    server.shutdown();
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

// An all-zero (or other low-order) client key: the server answers nothing,
// closes the connection and never calls on_open or on_close for it.
#[test]
fn low_order_client_key_is_refused_before_on_open() {
    case("1 low-order client key", || {
        let peers = Arc::new(Mutex::new(HashSet::new()));
        let seen = peers.clone();
        let (server, log) = start(server_config(), None);
        let addr = server.local_addr();
        let good = Good::start(addr);
        let attack = |i: usize| {
            // Every other attack uses the all-zero key.
            let key = if i % 2 == 0 {
                LOW_ORDER_KEYS[0]
            } else {
                LOW_ORDER_KEYS[(i / 2) % LOW_ORDER_KEYS.len()]
            };
            let mut s = tcp(addr);
            seen.lock().unwrap().insert(s.local_addr().unwrap());
            s.write_all(&key).unwrap();
            expect_closed(&mut s, 0, &format!("low-order key {i}"));
        };
        for i in 0..20 {
            attack(i);
        }
        settle(&server, 1);
        let base = rss();
        for i in 20..220 {
            attack(i);
        }
        settle(&server, 1);
        check_rss("1 low-order client key", base, 200);
        let n = good.finish();
        thread::sleep(Duration::from_millis(50));
        let events = log.events();
        for peer in peers.lock().unwrap().iter() {
            assert!(!events.opened.contains_key(peer), "on_open ran for {peer}");
            assert!(!events.closed.contains_key(peer), "on_close ran for {peer}");
            assert!(!events.messages.contains_key(peer), "message from {peer}");
        }
        drop(events);
        eprintln!("[hostile] 1: good client made {n} requests during the attack");
        server.shutdown();
    });
}

// ---------------------------------------------------------------------------
// 2. Slowloris handshakes.
// ---------------------------------------------------------------------------

/// Opens `n` connections that send 10 of the 32 handshake bytes and go
/// silent; returns how long after its connect each one was closed.
fn slowloris_round(addr: SocketAddr, n: usize) -> Vec<Duration> {
    let key = *ClientHandshake::new(Profile::Secure).unwrap().public_key();
    let mut socks = Vec::new();
    let mut starts = Vec::new();
    for _ in 0..n {
        let start = Instant::now();
        let mut s = tcp(addr);
        s.write_all(&key[..10]).unwrap();
        socks.push(s);
        starts.push(start);
    }
    let refs: Vec<&TcpStream> = socks.iter().collect();
    let closes = watch_closes(&refs, starts[0] + HANDSHAKE_TIMEOUT * 4);
    closes
        .iter()
        .zip(&starts)
        .enumerate()
        .map(|(i, (close, start))| {
            let (at, data) = close.unwrap_or_else(|| panic!("slowloris socket {i} still open"));
            assert_eq!(data, 0, "the server answered a partial key");
            at.duration_since(*start)
        })
        .collect()
}

// 10 of 32 handshake bytes, then silence: closed at the handshake timeout,
// never reported to the handler.
#[test]
fn slowloris_handshake_is_closed_at_the_handshake_timeout() {
    case("2 slowloris handshake", || {
        let (server, log) = start(server_config(), None);
        let addr = server.local_addr();
        let good = Good::start(addr);
        let check = |times: &[Duration]| {
            let min = times.iter().min().unwrap();
            let max = times.iter().max().unwrap();
            eprintln!(
                "[hostile] 2: {} slowloris sockets closed after {min:?}..{max:?} (timeout {HANDSHAKE_TIMEOUT:?})",
                times.len()
            );
            assert!(
                *min >= HANDSHAKE_TIMEOUT * 4 / 5,
                "closed too early: {min:?}"
            );
            assert!(*max <= HANDSHAKE_TIMEOUT * 3, "closed too late: {max:?}");
        };
        check(&slowloris_round(addr, 100));
        settle(&server, 1);
        let base = rss();
        for _ in 0..2 {
            check(&slowloris_round(addr, 100));
        }
        settle(&server, 1);
        check_rss("2 slowloris handshake", base, 200);
        let events = log.events();
        // Only the good client ever opened, and nothing closed yet.
        assert_eq!(events.opened.len(), 1, "opened: {:?}", events.opened);
        assert!(events.closed.is_empty(), "closed: {:?}", events.closed);
        drop(events);
        good.finish();
        server.shutdown();
    });
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

// A length prefix of 0xFFFFFFFF or of max + 1 as the first frame:
// FrameTooLarge from the prefix alone, nothing allocated for it.
#[test]
fn oversized_length_prefix_is_frame_too_large() {
    case("3 oversized length prefix", || {
        repeated(
            "3 oversized length prefix",
            server_config(),
            20,
            200,
            |i, addr, log| {
                let prefix = if i % 2 == 0 {
                    u32::MAX
                } else {
                    (MAX_CIPHERTEXT + 1) as u32
                };
                let peer = send_bad_prefix(addr, prefix, i % 4 >= 2);
                log.expect_close(peer, "oversized prefix", |e| {
                    matches!(e, Error::FrameTooLarge { len, max }
                        if *len == prefix as usize && *max == MAX_CIPHERTEXT)
                });
                assert_eq!(log.take_opened(peer), 1);
                assert_eq!(log.take_messages(peer), 0);
            },
        );
    });
}

// A length prefix of 0 to 19 (below sequence number plus tag):
// FrameTooShort with the claimed length.
#[test]
fn undersized_length_prefix_is_frame_too_short() {
    case("4 undersized length prefix", || {
        repeated(
            "4 undersized length prefix",
            server_config(),
            20,
            200,
            |i, addr, log| {
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
        );
    });
}

// ---------------------------------------------------------------------------
// 5, 6, 7. Frames that do not authenticate.
// ---------------------------------------------------------------------------

// A frame with one tag bit flipped (the first frame, or after an honest
// one): Authentication, and the frame never reaches the handler.
#[test]
fn flipped_tag_bit_is_authentication() {
    case("5 flipped tag bit", || {
        repeated(
            "5 flipped tag bit",
            server_config(),
            20,
            200,
            |i, addr, log| {
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
        );
    });
}

// A frame sent again after it was accepted: Authentication (its counter is
// behind the opener's), and it reaches the handler only once.
#[test]
fn replayed_frame_is_authentication() {
    case("6 replayed frame", || {
        repeated(
            "6 replayed frame",
            server_config(),
            20,
            200,
            |i, addr, log| {
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
        );
    });
}

// Random bytes after the handshake: closed with FrameTooShort,
// FrameTooLarge or Authentication. A third of the attacks get a random
// prefix in the valid range (then a whole frame of junk follows:
// Authentication), a third one below 20, a third fully random bytes.
#[test]
fn random_bytes_after_the_handshake_are_refused() {
    case("7 random bytes", || {
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let tally = Arc::new(Mutex::new([0usize; 3]));
        let counts = tally.clone();
        repeated(
            "7 random bytes",
            server_config(),
            21,
            201,
            move |i, addr, log| {
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
                counts.lock().unwrap()[kind] += 1;
                assert_eq!(log.take_opened(raw.local), 1);
                assert_eq!(log.take_messages(raw.local), 0);
            },
        );
        let [short, large, auth] = *tally.lock().unwrap();
        eprintln!(
            "[hostile] 7: FrameTooShort {short}, FrameTooLarge {large}, Authentication {auth}"
        );
    });
}

// ---------------------------------------------------------------------------
// 8, 9. Half a frame.
// ---------------------------------------------------------------------------

// Part of a frame (1 byte up to all but one), then the client's end of the
// stream: closed with PeerClosed, and the handler never sees a message.
#[test]
fn half_a_frame_then_close_is_peer_closed() {
    case("8 half a frame, then close", || {
        repeated(
            "8 half a frame, then close",
            server_config(),
            20,
            200,
            |i, addr, log| {
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
        );
    });
}

/// Opens `n` connections that send part of a frame and go silent; checks
/// each is closed at the read timeout with Timeout(Read). Returns the
/// shortest and longest time to the close.
fn stall_round(addr: SocketAddr, log: &Log, n: usize) -> (Duration, Duration) {
    let mut raws = Vec::new();
    let mut starts = Vec::new();
    for i in 0..n {
        let mut raw = Raw::connect(addr);
        let frame = raw.seal(1, &[0xcd; 300]);
        let cut = 1 + (i * 37) % (frame.len() - 1);
        raw.stream.write_all(&frame[..cut]).unwrap();
        starts.push(Instant::now());
        raws.push(raw);
    }
    let refs: Vec<&TcpStream> = raws.iter().map(|r| &r.stream).collect();
    let closes = watch_closes(&refs, starts[n - 1] + READ_TIMEOUT * 4);
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
    assert!(min >= READ_TIMEOUT * 4 / 5, "closed too early: {min:?}");
    assert!(max <= READ_TIMEOUT * 3, "closed too late: {max:?}");
    (min, max)
}

// Part of a frame, then silence: closed at the read timeout, and on_close
// gets Timeout(Read).
#[test]
fn half_a_frame_then_silence_is_a_read_timeout() {
    case("9 half a frame, then silence", || {
        let (server, log) = start(server_config(), None);
        let addr = server.local_addr();
        let good = Good::start(addr);
        let (min, max) = stall_round(addr, &log, 100);
        eprintln!("[hostile] 9: closed after {min:?}..{max:?} (read timeout {READ_TIMEOUT:?})");
        settle(&server, 1);
        let base = rss();
        for _ in 0..2 {
            let (min, max) = stall_round(addr, &log, 100);
            eprintln!("[hostile] 9: closed after {min:?}..{max:?} (read timeout {READ_TIMEOUT:?})");
        }
        settle(&server, 1);
        check_rss("9 half a frame, then silence", base, 200);
        good.finish();
        server.shutdown();
    });
}

// ---------------------------------------------------------------------------
// 10. A peer that never reads.
// ---------------------------------------------------------------------------

/// What one flooding thread achieved.
struct Flood {
    peer: SocketAddr,
    sent: u64,
    result: Option<Error>,
    took: Duration,
}

// The server floods a peer that never reads with send_no_wait (64 KiB
// messages, max_queued_bytes 1 MiB): the flood ends with Timeout(Write) or
// Closed within a few seconds, after a bounded number of bytes, and the
// connection is closed with Timeout(Write).
#[test]
fn non_reading_peer_is_closed_at_the_write_timeout() {
    case("10 non-reading peer", || {
        let victims: Arc<Mutex<HashSet<SocketAddr>>> = Arc::default();
        let floods: Arc<Mutex<Vec<Flood>>> = Arc::default();
        let threads: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let hook: OpenHook = {
            let victims = victims.clone();
            let floods = floods.clone();
            let threads = threads.clone();
            Box::new(move |conn: &Connection| {
                let Some(peer) = conn.peer_addr() else { return };
                if !victims.lock().unwrap().contains(&peer) {
                    return;
                }
                let conn = conn.clone();
                let floods = floods.clone();
                threads.lock().unwrap().push(thread::spawn(move || {
                    let start = Instant::now();
                    let mut sent = 0u64;
                    let result = loop {
                        if start.elapsed() > Duration::from_secs(10) {
                            break None;
                        }
                        match conn.send_no_wait(&vec![0u8; 64 << 10]) {
                            Ok(()) => sent += 64 << 10,
                            Err(e) => break Some(e),
                        }
                    };
                    floods.lock().unwrap().push(Flood {
                        peer,
                        sent,
                        result,
                        took: start.elapsed(),
                    });
                }));
            })
        };
        let config = server_config().max_queued_bytes(1 << 20);
        let (server, log) = start(config, Some(hook));
        let addr = server.local_addr();
        let good = Good::start(addr);

        let round = |n: usize| {
            let mut raws = Vec::new();
            for _ in 0..n {
                let stream = tcp(addr);
                victims.lock().unwrap().insert(stream.local_addr().unwrap());
                raws.push(Raw::handshake(stream));
            }
            // Never read, but keep sending one-way messages every 50 ms, so
            // that the read timeout cannot be what closes the connection;
            // wait for every flood to end.
            let deadline = Instant::now() + Duration::from_secs(10);
            let mut keepalives = vec![0u64; n];
            while floods.lock().unwrap().len() < n {
                assert!(Instant::now() < deadline, "the floods did not end");
                for (raw, sent) in raws.iter_mut().zip(&mut keepalives) {
                    let frame = raw.seal(0, b"still here");
                    if raw.stream.write_all(&frame).is_ok() {
                        *sent += 1;
                    }
                }
                thread::sleep(Duration::from_millis(50));
            }
            for t in std::mem::take(&mut *threads.lock().unwrap()) {
                t.join().unwrap();
            }
            let done = std::mem::take(&mut *floods.lock().unwrap());
            let mut max_sent = 0;
            let mut max_took = Duration::ZERO;
            for f in &done {
                assert!(
                    matches!(
                        f.result,
                        Some(Error::Timeout(TimeoutKind::Write) | Error::Closed)
                    ),
                    "flood to {} ended with {:?} after {:?} and {} bytes",
                    f.peer,
                    f.result,
                    f.took,
                    f.sent
                );
                assert!(f.took < Duration::from_secs(5), "flood took {:?}", f.took);
                assert!(f.sent < 16 << 20, "the server took {} bytes", f.sent);
                max_sent = max_sent.max(f.sent);
                max_took = max_took.max(f.took);
            }
            let timeouts = done
                .iter()
                .filter(|f| matches!(f.result, Some(Error::Timeout(_))))
                .count();
            for (mut raw, keepalives) in raws.into_iter().zip(keepalives) {
                log.expect_close(raw.local, "non-reading peer", |e| {
                    matches!(e, Error::Timeout(TimeoutKind::Write))
                });
                let sent = done.iter().find(|f| f.peer == raw.local).unwrap().sent;
                // What the kernel buffered is delivered, then the end.
                let data = await_close(&mut raw.stream, Duration::from_secs(5))
                    .expect("the server did not close the non-reading peer");
                assert!(data <= sent + sent / 100, "drained {data} of {sent} bytes");
                assert_eq!(log.take_opened(raw.local), 1);
                assert!(log.take_messages(raw.local) <= keepalives);
                victims.lock().unwrap().remove(&raw.local);
            }
            eprintln!(
                "[hostile] 10: {n} floods ended within {max_took:?} ({timeouts} with Timeout(Write), \
                 {} with Closed), at most {} KiB accepted",
                n - timeouts,
                max_sent >> 10
            );
        };
        round(4);
        round(4);
        settle(&server, 1);
        let base = rss();
        for _ in 0..3 {
            round(4);
        }
        settle(&server, 1);
        check_rss("10 non-reading peer", base, 12);
        good.finish();
        server.shutdown();
    });
}

// ---------------------------------------------------------------------------
// 11. Idle sockets over the connection cap.
// ---------------------------------------------------------------------------

// The server holds 8 connections (the good client's and 7 idle ones); the
// idle sockets over the cap are closed after the accept wait, the admitted
// ones stay until they go, and then a new client is served. (The handshake
// timeout is 3 s here, so that it does not close the admitted idle sockets
// during the accept wait.)
#[test]
fn idle_sockets_over_the_cap_are_closed_after_the_accept_wait() {
    case("11 idle sockets over the cap", || {
        const CAP: usize = 8;
        let accept_wait = Duration::from_millis(300);
        let config = server_config()
            .max_conns(CAP)
            .accept_wait(accept_wait)
            .handshake_timeout(Some(Duration::from_secs(3)));
        let (server, log) = start(config, None);
        let addr = server.local_addr();
        let good = Good::start(addr);
        assert_eq!(server.connections(), 1);

        let round = |n: usize| {
            let start = Instant::now();
            let socks: Vec<TcpStream> = (0..n).map(|_| tcp(addr)).collect();
            let refs: Vec<&TcpStream> = socks.iter().collect();
            let closes = watch_closes(&refs, start + Duration::from_millis(1200));
            let times: Vec<Duration> = closes
                .iter()
                .flatten()
                .map(|(at, data)| {
                    assert_eq!(*data, 0, "the server sent something to an idle socket");
                    at.duration_since(start)
                })
                .collect();
            assert_eq!(
                times.len(),
                n - (CAP - 1),
                "closed {} of {n} idle sockets, expected all but {} admitted",
                times.len(),
                CAP - 1
            );
            let min = *times.iter().min().unwrap();
            let max = *times.iter().max().unwrap();
            assert!(min >= accept_wait * 4 / 5, "closed too early: {min:?}");
            assert!(max <= accept_wait * 3, "closed too late: {max:?}");
            assert_eq!(server.connections(), CAP);
            // The good client, admitted before, keeps working meanwhile.
            check_client(&good.client, "capped");
            // The admitted idle sockets go; their places come back.
            drop(socks);
            settle(&server, 1);
            let fresh = Client::new(addr, good_config()).unwrap();
            check_client(&fresh, "fresh");
            fresh.shutdown();
            settle(&server, 1);
            eprintln!(
                "[hostile] 11: {} of {n} idle sockets closed after {min:?}..{max:?} (accept wait {accept_wait:?})",
                times.len()
            );
        };
        round(2 * CAP);
        let base = rss();
        for _ in 0..2 {
            round(64);
        }
        check_rss("11 idle sockets over the cap", base, 128);
        good.finish();
        // No idle socket was ever opened.
        assert!(log.events().opened.len() <= 3 + 1);
        server.shutdown();
    });
}

// The same attack with the short handshake timeout (300 ms, as long as the
// accept wait): the admitted idle sockets are closed by the handshake
// timeout and the others by the accept wait (or, admitted into a place
// freed meanwhile, by the handshake timeout after it), so every one of them
// goes within about twice the timeouts, and a new client is then served
// without the test closing anything.
#[test]
fn idle_sockets_over_the_cap_all_go_with_a_short_handshake_timeout() {
    case("11b idle sockets, short handshake timeout", || {
        const CAP: usize = 8;
        let accept_wait = Duration::from_millis(300);
        let config = server_config().max_conns(CAP).accept_wait(accept_wait);
        let (server, log) = start(config, None);
        let addr = server.local_addr();
        let good = Good::start(addr);
        let round = |n: usize| {
            let start = Instant::now();
            let socks: Vec<TcpStream> = (0..n).map(|_| tcp(addr)).collect();
            let refs: Vec<&TcpStream> = socks.iter().collect();
            let closes = watch_closes(&refs, start + Duration::from_secs(3));
            let times: Vec<Duration> = closes
                .iter()
                .enumerate()
                .map(|(i, close)| {
                    let (at, data) = close.unwrap_or_else(|| panic!("idle socket {i} still open"));
                    assert_eq!(data, 0, "the server sent something to an idle socket");
                    at.duration_since(start)
                })
                .collect();
            let min = *times.iter().min().unwrap();
            let max = *times.iter().max().unwrap();
            assert!(min >= accept_wait * 4 / 5, "closed too early: {min:?}");
            assert!(
                max <= (accept_wait + HANDSHAKE_TIMEOUT) * 2,
                "closed too late: {max:?}"
            );
            settle(&server, 1);
            let fresh = Client::new(addr, good_config()).unwrap();
            check_client(&fresh, "fresh");
            fresh.shutdown();
            settle(&server, 1);
            eprintln!(
                "[hostile] 11b: all {n} idle sockets closed after {min:?}..{max:?} \
                 (accept wait {accept_wait:?}, handshake timeout {HANDSHAKE_TIMEOUT:?})"
            );
            drop(socks);
        };
        round(2 * CAP);
        let base = rss();
        round(64);
        check_rss("11b idle sockets, short handshake timeout", base, 64);
        // Only the good client and the fresh ones were opened.
        assert!(log.events().opened.len() <= 3);
        good.finish();
        server.shutdown();
    });
}

// ---------------------------------------------------------------------------
// 12. Responses nobody asked for.
// ---------------------------------------------------------------------------

// Frames with the server's request parity (even sequence numbers) that the
// server never issued are dropped; the connection stays open and a
// following request gets its reply.
#[test]
fn response_to_an_unissued_request_is_dropped() {
    case("12 unasked-for response", || {
        let mut raw: Option<Raw> = None;
        let mut requests = 0u64;
        repeated(
            "12 unasked-for response",
            server_config(),
            50,
            200,
            |i, addr, log| {
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
                    assert_eq!(
                        log.take_messages(conn.local),
                        requests,
                        "bogus reached the handler"
                    );
                    requests = 0;
                    conn.stream.shutdown(Shutdown::Write).unwrap();
                    expect_closed(&mut conn.stream, 0, "unasked-for response");
                    log.expect_close(conn.local, "unasked-for response", |e| {
                        matches!(e, Error::PeerClosed)
                    });
                    assert_eq!(log.take_opened(conn.local), 1);
                }
            },
        );
    });
}

// ---------------------------------------------------------------------------
// 13. Responses after their request timed out.
// ---------------------------------------------------------------------------

/// One round: the server's request `first` times out after `timeout`; the
/// raw client answers it `late_after` after it read it, either before the
/// server's next request (`during_next == false`) or while it is pending;
/// the next request must get exactly its own answer.
fn late_round(
    conn: &Connection,
    raw: &mut Raw,
    timeout: Duration,
    late_after: Duration,
    during_next: bool,
    round: usize,
) {
    let first = format!("first-{round}");
    let timed = {
        let conn = conn.clone();
        let body = first.clone();
        thread::spawn(move || {
            let start = Instant::now();
            let mut resp = Vec::new();
            let result = conn.request_timeout(body.as_bytes(), &mut resp, Some(timeout));
            (result, start.elapsed())
        })
    };
    let (s1, got) = raw.recv(Duration::from_secs(3));
    let read_at = Instant::now();
    assert_eq!(got, first.as_bytes());
    assert!(s1 != 0 && s1 % 2 == 0, "server request number {s1:#x}");
    let (result, took) = timed.join().unwrap();
    assert!(
        matches!(result, Err(Error::Timeout(TimeoutKind::Request))),
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
    let pending = {
        let conn = conn.clone();
        let body = second.clone();
        thread::spawn(move || {
            let mut resp = Vec::new();
            let result =
                conn.request_timeout(body.as_bytes(), &mut resp, Some(Duration::from_secs(3)));
            result.map(|()| resp)
        })
    };
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
    let resp = pending
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("round {round}: {e:?}"));
    assert_eq!(
        String::from_utf8_lossy(&resp),
        answer,
        "round {round}: the second request got another answer"
    );
}

// A response that arrives after its request timed out is dropped and never
// delivered to the next request (with one request slot, which the next
// request reuses in a new generation).
#[test]
fn late_response_never_reaches_the_next_request() {
    case("13 late response", || {
        let conns: Arc<Mutex<HashMap<SocketAddr, Connection>>> = Arc::default();
        let hook: OpenHook = {
            let conns = conns.clone();
            Box::new(move |conn: &Connection| {
                if let Some(peer) = conn.peer_addr() {
                    conns.lock().unwrap().insert(peer, conn.clone());
                }
            })
        };
        let (server, log) = start(server_config().max_in_flight(1), Some(hook));
        let addr = server.local_addr();
        let good = Good::start(addr);
        let mut raw = Raw::connect(addr);
        let mut conn = None;
        assert!(wait_until(Duration::from_secs(3), || {
            conn = conns.lock().unwrap().get(&raw.local).cloned();
            conn.is_some()
        }));
        let conn = conn.unwrap();
        // The brief's timing: a 100 ms request timeout, the late answer
        // 300 ms after the request, before and during the next request.
        let ms = Duration::from_millis;
        late_round(&conn, &mut raw, ms(100), ms(300), false, 0);
        late_round(&conn, &mut raw, ms(100), ms(300), true, 1);
        // Quick rounds, alternating.
        for round in 2..12 {
            late_round(&conn, &mut raw, ms(10), ms(0), round % 2 == 0, round);
        }
        let base = rss();
        for round in 12..112 {
            late_round(&conn, &mut raw, ms(10), ms(0), round % 2 == 0, round);
        }
        check_rss("13 late response", base, 100);
        assert!(!log.has_close(raw.local), "the raw connection was closed");
        // The handler never saw the late answers (nor anything else).
        assert_eq!(log.take_messages(raw.local), 0);
        raw.stream.shutdown(Shutdown::Write).unwrap();
        expect_closed(&mut raw.stream, 0, "late response");
        log.expect_close(raw.local, "late response", |e| {
            matches!(e, Error::PeerClosed)
        });
        conns.lock().unwrap().clear();
        good.finish();
        server.shutdown();
    });
}
