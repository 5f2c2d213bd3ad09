//! A reversing echo server: replies to every request with its body reversed
//! byte for byte, and counts what it saw. One request is special, for the
//! hostile-peer tests that make it answer large (see the test hooks below).
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
//! attacks this binary from another process: `--events` prints a line per
//! connection opened, closed (with its reason) or failed in its handshake,
//! and `--control` takes commands on stdin (counters, server-side floods
//! and requests). They, and the big reply, are in
//! `examples/tools/server_test_hooks.rs`, which documents their lines.

#[path = "common/flags.rs"]
mod flags;
use flags::Flags;
#[path = "tools/server_test_hooks.rs"]
mod test_hooks;
use test_hooks::{big_reply_size, emit, Tracker};

use std::net::SocketAddr;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
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
        if let Some(tracker) = &self.tracker {
            tracker.handshake_failed(peer, error);
        }
    }
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
    let tracker = (args.events || args.control).then(|| Arc::new(Tracker::new(args.events)));
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
        std::thread::spawn(move || test_hooks::control(server, stats, tracker));
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
