//! A reversing echo server: replies to every request with its body reversed
//! byte for byte, and counts what it saw. One request is special, for the
//! hostile-peer tests that make it answer large: a body of
//! `monte-rpc-test big reply:` followed by a 4-byte big-endian size `N` gets
//! a reply of `N` bytes (at most the maximum message size).
//!
//! ```text
//! cargo run --release --example server -- --addr 127.0.0.1:4444 \
//!     [--profile secure|monte] [--max-conns N] [--handshake-timeout-ms N] \
//!     [--read-timeout-ms N] [--frame-timeout-ms N] [--write-timeout-ms N] \
//!     [--accept-wait-ms N] [--max-message-size N] [--max-queued-bytes N] [--max-in-flight N] \
//!     [--workers N] [--duration-s N] [--events] [--control] \
//!     [--psk HEX | --identity FILE [--allow HEX[,HEX...]]]
//! cargo run --release --example server -- --gen-identity FILE
//! ```
//!
//! Authentication (see PROTOCOL.md and SECURITY.md): `--psk` takes 64 hex
//! characters (32 bytes) shared with the clients; `--identity` takes a
//! PKCS#8 Ed25519 key file and proves it to clients (which pin its public
//! key with `--pin`); `--allow` additionally requires clients to prove one of
//! the listed public keys. `--gen-identity FILE` writes a new identity file
//! and prints its public key in hex on stdout, then exits.
//!
//! Serves until SIGINT or SIGTERM (or for `--duration-s` seconds), then
//! shuts down and prints one line:
//! `served requests=N messages=N conns=N errors=N`, where `errors` counts
//! the connections that ended with an error, failed handshakes included.
//!
//! Diagnostics, for operators and for `tests/hostile_external.rs`, which
//! attacks this binary from another process. Each is one line on stdout,
//! with the free-form part (a reason, an error) last:
//!
//! - `--events`: `listening ADDR` once, then `open peer=ADDR id=N`,
//!   `close peer=ADDR id=N messages=N reason=ERROR` and
//!   `handshake_failed peer=ADDR reason=ERROR` for every connection
//!   (`ERROR` is the library's `Error` in `Debug` form).
//! - `--control`: reads commands on stdin, one a line, and stops serving
//!   when stdin ends:
//!   - `stats ID`: prints `stats id=ID handled=N` (connections held now,
//!     handshakes included), then every counter of the server's `Stats` as
//!     `name=N`, then this program's `requests= messages= conns= errors=`;
//!   - `flood PEER SIZE`: sends `SIZE`-byte messages with `send_no_wait`
//!     to the open connection from `PEER` until a send fails (or 10 s
//!     pass), then prints `flood peer=PEER sent=BYTES took_us=N
//!     result=ERROR|none`;
//!   - `request ID PEER TIMEOUT_MS HEX`: sends the body `HEX` as a request
//!     to `PEER` with that timeout, then prints `request id=ID took_us=N
//!     ok=HEX` or `request id=ID took_us=N err=ERROR`.
//!
//!   An unknown `PEER` gives `error=unknown peer` in place of the outcome.

#[path = "common/flags.rs"]
mod flags;
use flags::Flags;

use std::collections::HashMap;
use std::fmt;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monte_rpc::protocol::{
    generate_identity_pkcs8, identity_public_key, Ed25519KeyPair, HandshakeFactory, IdentityConfig,
    Profile, PskHandshake,
};
use monte_rpc::{Config, Connection, Context, Error, Handler, HandshakeError, Server};

const SIGINT: i32 = 2;
const SIGTERM: i32 = 15;

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" {
    fn signal(signum: i32, handler: extern "C" fn(i32)) -> usize;
}

extern "C" fn on_signal(_signum: i32) {
    // Only an atomic store: async-signal-safe.
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for signum in [SIGINT, SIGTERM] {
        // SAFETY: `signal` is the C library's, declared with its Linux
        // signature (the previous handler comes back as a pointer-sized
        // value we ignore). The handler only stores to an atomic, which is
        // async-signal-safe, and lives for the whole program.
        unsafe {
            signal(signum, on_signal);
        }
    }
}

#[derive(Default)]
struct Stats {
    requests: AtomicU64,
    messages: AtomicU64,
    conns: AtomicU64,
    errors: AtomicU64,
}

/// A request body asking for a large reply (see the module doc).
const BIG_REPLY: &[u8] = b"monte-rpc-test big reply:";

/// The reply size a request asks for with [`BIG_REPLY`], if it does.
fn big_reply_size(body: &[u8]) -> Option<usize> {
    let size = body.strip_prefix(BIG_REPLY)?;
    Some(u32::from_be_bytes(size.try_into().ok()?) as usize)
}

struct Reverser {
    stats: Arc<Stats>,
    /// The configured maximum message size: the cap on a big reply.
    max_reply: usize,
    tracker: Option<Arc<Tracker>>,
}

impl Handler for Reverser {
    fn on_message(&self, ctx: &mut Context<'_>) {
        if let Some(tracker) = &self.tracker {
            tracker.message(ctx.conn());
        }
        if ctx.expects_reply() {
            self.stats.requests.fetch_add(1, Ordering::Relaxed);
            if let Some(size) = big_reply_size(ctx.body()) {
                let size = size.min(self.max_reply);
                let _ = ctx.reply(&vec![0x5a; size]);
                return;
            }
            let mut body = ctx.body().to_vec();
            body.reverse();
            let _ = ctx.reply(&body);
        } else {
            self.stats.messages.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn on_open(&self, conn: &Connection) {
        self.stats.conns.fetch_add(1, Ordering::Relaxed);
        if let Some(tracker) = &self.tracker {
            tracker.open(conn);
        }
    }

    fn on_close(&self, conn: &Connection, reason: &Error) {
        if !matches!(reason, Error::PeerClosed | Error::Closed) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(tracker) = &self.tracker {
            tracker.close(conn, reason);
        }
    }

    fn on_handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        if !matches!(error, Error::Handshake(HandshakeError::PeerClosed)) {
            self.stats.errors.fetch_add(1, Ordering::Relaxed);
        }
        if self.tracker.as_ref().is_some_and(|t| t.events) {
            emit(format_args!(
                "handshake_failed peer={} reason={error:?}",
                Peer(peer)
            ));
        }
    }
}

/// Prints one diagnostic line on stdout. A reader that went away must not
/// take a reactor thread down with it, so write errors are ignored.
fn emit(line: fmt::Arguments<'_>) {
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
struct Tracker {
    events: bool,
    open: Mutex<HashMap<u64, Tracked>>,
}

struct Tracked {
    peer: Option<SocketAddr>,
    messages: u64,
    conn: Connection,
}

impl Tracker {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Tracked>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn open(&self, conn: &Connection) {
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

    fn message(&self, conn: &Connection) {
        if let Some(tracked) = self.lock().get_mut(&conn.id()) {
            tracked.messages += 1;
        }
    }

    fn close(&self, conn: &Connection, reason: &Error) {
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
fn control(server: Arc<Server>, stats: Arc<Stats>, tracker: Arc<Tracker>) {
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
                "flood peer={peer} sent={sent} took_us={took} result={e:?}"
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
            Err(e) => emit(format_args!("request id={id} took_us={took} err={e:?}")),
        }
    });
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

struct Args {
    addr: String,
    profile: Profile,
    max_conns: Option<usize>,
    handshake_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    frame_timeout_ms: Option<u64>,
    write_timeout_ms: Option<u64>,
    accept_wait_ms: Option<u64>,
    max_message_size: Option<usize>,
    max_queued_bytes: Option<usize>,
    max_in_flight: Option<usize>,
    workers: Option<usize>,
    duration_s: Option<u64>,
    events: bool,
    control: bool,
    profile_set: bool,
    psk: Option<[u8; 32]>,
    identity: Option<String>,
    allow: Option<Vec<[u8; 32]>>,
    gen_identity: Option<String>,
}

fn usage(msg: &str) -> ! {
    eprintln!("server: {msg}");
    eprintln!(
        "usage: server --addr HOST:PORT [--profile secure|monte] [--max-conns N] \
         [--handshake-timeout-ms N] [--read-timeout-ms N] [--frame-timeout-ms N] \
         [--write-timeout-ms N] [--accept-wait-ms N] [--max-message-size N] [--max-queued-bytes N] \
         [--max-in-flight N] [--workers N] [--duration-s N] [--events] [--control]"
    );
    eprintln!("       [--psk HEX | --identity FILE [--allow HEX[,HEX...]]] | --gen-identity FILE");
    exit(2);
}

fn parse_profile(value: &str) -> Profile {
    match value.to_ascii_lowercase().as_str() {
        "secure" => Profile::Secure,
        "monte" => Profile::Monte,
        _ => usage(&format!("--profile: expected secure or monte, got {value}")),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn load_identity(path: &str) -> Ed25519KeyPair {
    let bytes = std::fs::read(path).unwrap_or_else(|e| {
        eprintln!("server: --identity {path}: {e}");
        exit(1);
    });
    Ed25519KeyPair::from_pkcs8(&bytes).unwrap_or_else(|e| {
        eprintln!("server: --identity {path}: not a PKCS#8 Ed25519 key: {e}");
        exit(1);
    })
}

/// The handshake the authentication flags select, or `None` for `--profile`.
fn auth_handshake(args: &Args) -> Option<Arc<dyn HandshakeFactory>> {
    if let Some(psk) = args.psk {
        eprintln!("server: handshake psk");
        return Some(Arc::new(PskHandshake::factory(psk)));
    }
    let path = args.identity.as_ref()?;
    let identity = Arc::new(load_identity(path));
    let mut config = IdentityConfig::server(identity.clone());
    let clients = match &args.allow {
        Some(keys) => {
            config = config.allow_clients(keys.iter().copied());
            format!("{} allowed", keys.len())
        }
        None => "any".to_string(),
    };
    eprintln!(
        "server: handshake identity key={} clients={clients}",
        hex(&identity_public_key(&identity))
    );
    Some(Arc::new(config))
}

fn gen_identity(path: &str) -> ! {
    let pkcs8 = generate_identity_pkcs8().unwrap_or_else(|e| {
        eprintln!("server: --gen-identity: {e}");
        exit(1);
    });
    let key = Ed25519KeyPair::from_pkcs8(&pkcs8).expect("fresh PKCS#8");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, &pkcs8));
    if let Err(e) = written {
        eprintln!("server: --gen-identity {path}: {e}");
        exit(1);
    }
    eprintln!("server: wrote identity {path}; its public key (for --pin / --allow):");
    println!("{}", hex(&identity_public_key(&key)));
    exit(0);
}

fn parse_args() -> Args {
    let mut args = Args {
        addr: String::new(),
        profile: Profile::Secure,
        max_conns: None,
        handshake_timeout_ms: None,
        read_timeout_ms: None,
        frame_timeout_ms: None,
        write_timeout_ms: None,
        accept_wait_ms: None,
        max_message_size: None,
        max_queued_bytes: None,
        max_in_flight: None,
        workers: None,
        duration_s: None,
        events: false,
        control: false,
        profile_set: false,
        psk: None,
        identity: None,
        allow: None,
        gen_identity: None,
    };
    let mut flags = Flags::from_env(usage);
    while let Some((flag, value)) = flags.next_flag(&["--events", "--control"]) {
        match flag.as_str() {
            "--events" => args.events = true,
            "--control" => args.control = true,
            "--addr" => args.addr = value,
            "--profile" => {
                args.profile = parse_profile(&value);
                args.profile_set = true;
            }
            "--psk" => args.psk = Some(flags.key(&flag, &value)),
            "--identity" => args.identity = Some(value),
            "--allow" => args.allow = Some(value.split(',').map(|k| flags.key(&flag, k)).collect()),
            "--gen-identity" => args.gen_identity = Some(value),
            "--max-conns" => args.max_conns = Some(flags.num(&flag, &value)),
            "--handshake-timeout-ms" => args.handshake_timeout_ms = Some(flags.num(&flag, &value)),
            "--read-timeout-ms" => args.read_timeout_ms = Some(flags.num(&flag, &value)),
            "--frame-timeout-ms" => args.frame_timeout_ms = Some(flags.num(&flag, &value)),
            "--write-timeout-ms" => args.write_timeout_ms = Some(flags.num(&flag, &value)),
            "--accept-wait-ms" => args.accept_wait_ms = Some(flags.num(&flag, &value)),
            "--max-message-size" => args.max_message_size = Some(flags.num(&flag, &value)),
            "--max-queued-bytes" => args.max_queued_bytes = Some(flags.num(&flag, &value)),
            "--max-in-flight" => args.max_in_flight = Some(flags.num(&flag, &value)),
            "--workers" => args.workers = Some(flags.num(&flag, &value)),
            "--duration-s" => args.duration_s = Some(flags.num(&flag, &value)),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    if let Some(path) = &args.gen_identity {
        gen_identity(path);
    }
    if args.addr.is_empty() {
        usage("--addr is required");
    }
    if args.psk.is_some() && args.identity.is_some() {
        usage("--psk and --identity are exclusive");
    }
    if args.allow.is_some() && args.identity.is_none() {
        usage("--allow needs --identity");
    }
    if args.profile_set && (args.psk.is_some() || args.identity.is_some()) {
        usage("--profile cannot be combined with --psk or --identity");
    }
    args
}

fn main() {
    let args = parse_args();
    install_signal_handlers();

    let mut config = Config::server().profile(args.profile);
    if let Some(handshake) = auth_handshake(&args) {
        config = config.handshake(handshake);
    }
    if let Some(n) = args.max_conns {
        config = config.max_conns(n);
    }
    if let Some(ms) = args.handshake_timeout_ms {
        config = config.handshake_timeout(Some(Duration::from_millis(ms)));
    }
    if let Some(ms) = args.read_timeout_ms {
        config = config.read_timeout(Some(Duration::from_millis(ms)));
    }
    if let Some(ms) = args.frame_timeout_ms {
        config = config.frame_timeout(Some(Duration::from_millis(ms)));
    }
    if let Some(ms) = args.write_timeout_ms {
        config = config.write_timeout(Some(Duration::from_millis(ms)));
    }
    if let Some(ms) = args.accept_wait_ms {
        config = config.accept_wait(Duration::from_millis(ms));
    }
    if let Some(n) = args.max_message_size {
        config = config.max_message_size(n);
    }
    if let Some(n) = args.max_queued_bytes {
        config = config.max_queued_bytes(n);
    }
    if let Some(n) = args.max_in_flight {
        config = config.max_in_flight(n);
    }
    if let Some(n) = args.workers {
        config = config.workers(n);
    }

    let stats = Arc::new(Stats::default());
    let tracker = (args.events || args.control).then(|| {
        Arc::new(Tracker {
            events: args.events,
            open: Mutex::new(HashMap::new()),
        })
    });
    let handler = Reverser {
        max_reply: config.max_message_size,
        stats: stats.clone(),
        tracker: tracker.clone(),
    };
    let server = match Server::bind(args.addr.as_str(), config, handler) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("server: bind {}: {e}", args.addr);
            exit(1);
        }
    };
    eprintln!("server: listening on {}", server.local_addr());
    if args.events {
        emit(format_args!("listening {}", server.local_addr()));
    }
    if let (true, Some(tracker)) = (args.control, tracker) {
        let (server, stats) = (server.clone(), stats.clone());
        std::thread::spawn(move || control(server, stats, tracker));
    }

    let deadline = args
        .duration_s
        .map(|s| Instant::now() + Duration::from_secs(s));
    while !STOP.load(Ordering::SeqCst) {
        if deadline.is_some_and(|d| Instant::now() >= d) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }

    server.shutdown();
    println!(
        "served requests={} messages={} conns={} errors={}",
        stats.requests.load(Ordering::SeqCst),
        stats.messages.load(Ordering::SeqCst),
        stats.conns.load(Ordering::SeqCst),
        stats.errors.load(Ordering::SeqCst),
    );
}
