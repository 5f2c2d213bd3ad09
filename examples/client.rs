//! Exercises a reversing echo server (see the `server` example).
//!
//! ```text
//! cargo run --release --example client -- --addr 127.0.0.1:4444 \
//!     [--profile secure|monte] [--n N] [--size S] [--threads T] \
//!     [--psk HEX | --pin HEX [--identity FILE]]
//! cargo run --release --example client -- --help   # every flag, with its default
//! ```
//!
//! Authentication (see PROTOCOL.md and SECURITY.md): `--psk` takes the
//! server's 64-hex-character pre-shared key; `--pin` takes the server's
//! Ed25519 public key (from `server --gen-identity`) and accepts no other
//! server; `--identity` is this client's PKCS#8 key file, proven when the
//! server requires client identities (`server --allow`).
//!
//! Makes N sequential requests, then N requests spread over T threads,
//! checking every reply is the body reversed; then N `send_no_wait` and N
//! `send`. Prints `ok requests=2N sends=N nowait=N` on success; on any
//! error prints it to stderr and exits 1.

#[path = "common/args.rs"]
mod args;
use args::Wire;
use clap::Parser;
use rand::{rngs::SmallRng, RngCore, SeedableRng};

use std::process::exit;
use std::time::Duration;

use std::sync::Arc;

use monte_rpc::protocol::{Ed25519KeyPair, HandshakeFactory, IdentityConfig, PskHandshake};
use monte_rpc::{Client, Config};

fn seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 32)
}

/// Exercises the reversing echo server of the `server` example: N
/// sequential requests, N more over T threads, N `send_no_wait` and N
/// `send`, checking every reply. Prints `ok requests=2N sends=N nowait=N`.
#[derive(Parser)]
#[command(name = "client")]
struct Args {
    /// The server's address
    #[arg(long, value_name = "HOST:PORT")]
    addr: String,
    /// The wire profile when no authentication is asked for (--psk, --pin)
    #[arg(
        long,
        value_enum,
        ignore_case = true,
        default_value = "secure",
        conflicts_with_all = ["psk", "pin", "identity"]
    )]
    profile: Wire,
    /// Calls of each kind
    #[arg(long, value_name = "N", default_value_t = 1000)]
    n: usize,
    /// Message size in bytes
    #[arg(long, value_name = "S", default_value_t = 1400)]
    size: usize,
    /// Threads sharing the client for the parallel requests (0 counts as 1)
    #[arg(long, value_name = "T", default_value_t = 8)]
    threads: usize,
    /// Authenticate with the server's pre-shared key (64 hex characters)
    #[arg(long, value_name = "HEX", value_parser = args::key, conflicts_with_all = ["pin", "identity"])]
    psk: Option<[u8; 32]>,
    /// Accept only the server proving this Ed25519 public key (64 hex
    /// characters, from `server --gen-identity`)
    #[arg(long, value_name = "HEX", value_parser = args::key)]
    pin: Option<[u8; 32]>,
    /// With --pin, prove this PKCS#8 Ed25519 key file, for a server that
    /// requires client identities (`server --allow`)
    #[arg(long, value_name = "FILE", requires = "pin")]
    identity: Option<String>,
}

/// The handshake the authentication flags select, or `None` for `--profile`.
fn auth_handshake(args: &Args) -> Result<Option<Arc<dyn HandshakeFactory>>, String> {
    if let Some(psk) = args.psk {
        return Ok(Some(Arc::new(PskHandshake::factory(psk))));
    }
    // An identity client that pins no server authenticates nobody, so
    // --identity requires --pin.
    if args.pin.is_none() {
        return Ok(None);
    }
    let mut config = IdentityConfig {
        pinned_server: args.pin,
        ..IdentityConfig::default()
    };
    if let Some(path) = &args.identity {
        let bytes = std::fs::read(path).map_err(|e| format!("--identity {path}: {e}"))?;
        let key = Ed25519KeyPair::from_pkcs8(&bytes)
            .map_err(|e| format!("--identity {path}: not a PKCS#8 Ed25519 key: {e}"))?;
        config = config.with_identity(Arc::new(key));
    }
    Ok(Some(Arc::new(config)))
}

/// One request with a fresh random body; checks the reply is its reverse.
fn checked_request(
    client: &Client,
    rng: &mut SmallRng,
    body: &mut [u8],
    response: &mut Vec<u8>,
) -> Result<(), String> {
    rng.fill_bytes(body);
    client
        .request(body, response)
        .map_err(|e| format!("request: {e}"))?;
    let ok = response.len() == body.len() && response.iter().eq(body.iter().rev());
    if !ok {
        return Err(format!(
            "reply mismatch: sent {} bytes, got {} bytes that are not the body reversed",
            body.len(),
            response.len()
        ));
    }
    Ok(())
}

fn run(args: &Args) -> Result<(), String> {
    let mut config = Config::default().profile(args.profile.into());
    if let Some(handshake) = auth_handshake(args)? {
        config = config.handshake(handshake);
    }
    let config = config
        .max_message_size(args.size.max(1 << 20))
        .request_timeout(Some(Duration::from_secs(10)));
    let client = Client::new(args.addr.as_str(), config).map_err(|e| format!("client: {e}"))?;
    let base_seed = seed();

    // 1. Sequential requests.
    let mut rng = SmallRng::seed_from_u64(base_seed);
    let mut body = vec![0u8; args.size];
    let mut response = Vec::new();
    for _ in 0..args.n {
        checked_request(&client, &mut rng, &mut body, &mut response)?;
    }

    // 2. The same number of requests over `threads` threads sharing &Client.
    let client_ref = &client;
    let size = args.size;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..args.threads)
            .map(|t| {
                let count = args.n / args.threads + usize::from(t < args.n % args.threads);
                s.spawn(move || -> Result<(), String> {
                    let mut rng = SmallRng::seed_from_u64(
                        base_seed ^ ((t as u64 + 1) * 0x9E37_79B9_7F4A_7C15),
                    );
                    let mut body = vec![0u8; size];
                    let mut response = Vec::new();
                    for _ in 0..count {
                        checked_request(client_ref, &mut rng, &mut body, &mut response)
                            .map_err(|e| format!("thread {t}: {e}"))?;
                    }
                    Ok(())
                })
            })
            .collect();
        handles.into_iter().try_for_each(|h| {
            h.join()
                .unwrap_or_else(|_| Err("a request thread panicked".to_string()))
        })
    })?;

    // 3. Messages that expect no reply.
    for _ in 0..args.n {
        rng.fill_bytes(&mut body);
        client
            .send_no_wait(&body)
            .map_err(|e| format!("send_no_wait: {e}"))?;
    }
    for _ in 0..args.n {
        rng.fill_bytes(&mut body);
        client.send(&body).map_err(|e| format!("send: {e}"))?;
    }

    client.shutdown();
    Ok(())
}

fn main() {
    let mut args = Args::parse();
    args.threads = args.threads.max(1);
    match run(&args) {
        Ok(()) => println!(
            "ok requests={} sends={} nowait={}",
            2 * args.n,
            args.n,
            args.n
        ),
        Err(e) => {
            eprintln!("client: {e}");
            exit(1);
        }
    }
}
