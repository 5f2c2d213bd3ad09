//! A reversing echo server: replies to every request with its body reversed
//! byte for byte, and counts what it saw. One request is special, for the
//! hostile-peer tests that make it answer large (see the test hooks below).
//!
//! ```text
//! cargo run --release --example server -- --addr 127.0.0.1:4444 \
//!     [--profile secure|monte] [--max-conns N] [--read-timeout-ms N] ... \
//!     [--psk HEX | --identity FILE [--allow HEX[,HEX...]]]
//! cargo run --release --example server -- --gen-identity FILE
//! cargo run --release --example server -- --help   # every flag, with its default
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

#[path = "common/args.rs"]
mod args;
use args::Wire;
use clap::Parser;
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
    PskHandshake,
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

/// A reversing echo server: replies to every request with its body
/// reversed. Serves until SIGINT or SIGTERM (or for --duration-s seconds),
/// then prints `served requests=N messages=N conns=N errors=N`.
#[derive(Parser)]
#[command(name = "server")]
struct Args {
    /// The address to listen on (port 0: any free port)
    #[arg(
        long,
        value_name = "HOST:PORT",
        required_unless_present = "gen_identity"
    )]
    addr: Option<String>,
    /// The wire profile when no authentication is asked for (--psk,
    /// --identity)
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        default_value = "secure",
        conflicts_with_all = ["psk", "identity"]
    )]
    profile: Wire,
    /// The most connections handled at once, handshakes included
    #[arg(long, value_name = "N", default_value_t = Config::server().max_conns)]
    max_conns: usize,
    /// How long a handshake may take, in milliseconds
    #[arg(long, value_name = "N", default_value_t = default_ms(Config::server().handshake_timeout))]
    handshake_timeout_ms: u64,
    /// How long a connection may receive nothing before it is closed, in
    /// milliseconds
    #[arg(long, value_name = "N", default_value_t = default_ms(Config::server().read_timeout))]
    read_timeout_ms: u64,
    /// How long a frame may take from its first byte to its last, in
    /// milliseconds [default: the read timeout]
    #[arg(long, value_name = "N")]
    frame_timeout_ms: Option<u64>,
    /// How long queued output may make no progress before the connection is
    /// closed, in milliseconds (also the send and drain timeouts)
    #[arg(long, value_name = "N", default_value_t = default_ms(Config::server().write_timeout))]
    write_timeout_ms: u64,
    /// How long a connection over --max-conns waits for a place before it
    /// is closed, in milliseconds
    #[arg(long, value_name = "N", default_value_t = default_ms(Some(Config::server().accept_wait)))]
    accept_wait_ms: u64,
    /// The largest message accepted or sent, in bytes
    #[arg(long, value_name = "N", default_value_t = Config::server().max_message_size)]
    max_message_size: usize,
    /// The most bytes queued for one connection; past it the peer is not
    /// read until its replies drain
    #[arg(long, value_name = "N", default_value_t = Config::server().max_queued_bytes)]
    max_queued_bytes: usize,
    /// Requests that may await a response on one connection at once
    #[arg(long, value_name = "N", default_value_t = Config::server().max_in_flight)]
    max_in_flight: usize,
    /// Reactor threads (by default one per available core)
    #[arg(long, value_name = "N", default_value_t = Config::server().workers)]
    workers: usize,
    /// Serve this many seconds, then shut down [default: until SIGINT or
    /// SIGTERM]
    #[arg(long, value_name = "N")]
    duration_s: Option<u64>,
    /// Print a line per connection opened, closed or failed in its
    /// handshake (for tests/hostile_external.rs)
    #[arg(long)]
    events: bool,
    /// Take `stats`, `flood` and `request` commands on stdin and stop when
    /// it ends (for tests/hostile_external.rs)
    #[arg(long)]
    control: bool,
    /// Authenticate with this pre-shared key, shared with the clients (64
    /// hex characters)
    #[arg(long, value_name = "HEX", value_parser = args::key, conflicts_with = "identity")]
    psk: Option<[u8; 32]>,
    /// Prove this PKCS#8 Ed25519 key file to the clients, which pin its
    /// public key (see --gen-identity)
    #[arg(long, value_name = "FILE")]
    identity: Option<String>,
    /// With --identity, also require clients to prove one of these public
    /// keys (64 hex characters each)
    #[arg(
        long,
        value_name = "HEX[,HEX...]",
        value_parser = args::key,
        value_delimiter = ',',
        requires = "identity"
    )]
    allow: Option<Vec<[u8; 32]>>,
    /// Write a new identity file, print its public key in hex and exit
    #[arg(long, value_name = "FILE")]
    gen_identity: Option<String>,
}

/// A timeout of the library's server defaults in milliseconds, for
/// `--help`.
fn default_ms(timeout: Option<Duration>) -> u64 {
    timeout.map_or(0, |t| t.as_millis() as u64)
}

/// A flag's milliseconds as a duration.
fn ms(millis: u64) -> Duration {
    Duration::from_millis(millis)
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

fn main() {
    let args = Args::parse();
    if let Some(path) = &args.gen_identity {
        gen_identity(path);
    }
    let addr = args.addr.as_deref().expect("clap requires --addr");
    install_signal_handlers();

    let mut config = Config::server()
        .profile(args.profile.into())
        .max_conns(args.max_conns)
        .handshake_timeout(Some(ms(args.handshake_timeout_ms)))
        // Also sets the frame timeout, unless --frame-timeout-ms does below.
        .read_timeout(Some(ms(args.read_timeout_ms)))
        // Also sets the send and drain timeouts.
        .write_timeout(Some(ms(args.write_timeout_ms)))
        .accept_wait(ms(args.accept_wait_ms))
        .max_message_size(args.max_message_size)
        .max_queued_bytes(args.max_queued_bytes)
        .max_in_flight(args.max_in_flight)
        .workers(args.workers);
    if let Some(millis) = args.frame_timeout_ms {
        config = config.frame_timeout(Some(ms(millis)));
    }
    if let Some(handshake) = auth_handshake(&args) {
        config = config.handshake(handshake);
    }

    let stats = Arc::new(Stats::default());
    let tracker = (args.events || args.control).then(|| Arc::new(Tracker::new(args.events)));
    let handler = Reverser {
        max_reply: config.max_message_size,
        stats: stats.clone(),
        tracker: tracker.clone(),
    };
    let server = match Server::bind(addr, config, handler) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("server: bind {addr}: {e}");
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
