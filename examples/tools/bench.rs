//! A loopback benchmark of the client and server in one process, printed in
//! Go's benchmark format so it compares with the Go library's numbers.
//!
//! A tool, not a showcase (those are `examples/server.rs`, `client.rs` and
//! `embed.rs`): it lives in `examples/tools/` and is built and run as an
//! example, `cargo run --release --example bench`.
//!
//! ```text
//! cargo run --release --example bench [-- --secs S --bench NAME \
//!     --profile secure|monte|psk|identity --size N --json PATH]
//! cargo run --release --example bench -- --help   # every flag and benchmark
//! ```
//!
//! Every benchmark sends a random payload of `--size` bytes (default 1400)
//! to a server that answers requests with an empty body:
//!
//! - `Send`, `SendNoWait`, `Request`: one caller.
//! - `ParallelSend`, `ParallelSendNoWait`, `ParallelRequest`: available
//!   cores × 4 callers sharing one `&Client`.
//! - `Handshake`: a new connection per iteration (connect, handshake, one
//!   request, close), dialled through one long-lived client reactor.
//!
//! Baselines measured in the same run put the figures in context:
//!
//! - `RawPingPong`: a bare loopback TCP ping-pong with the same message
//!   sizes as `Request` (a frame out, an empty-reply frame back), no
//!   crypto, run with both threads on one core and unpinned: the better of
//!   the two is the limit (a `#` line after the table gives both, and,
//!   with two CPUs, a third: each thread on its own core, spinning on a
//!   non-blocking socket, the cross-core round trip without wake-ups);
//! - `RawStream`: pre-built frames written in 16 KiB and in 64 KiB batches
//!   to a reader that discards them, per frame, the better of the two;
//! - `RawSend`: the same with one write per frame, to a reader blocked in
//!   `read` and to one that sleeps 20 µs between non-blocking reads (as a
//!   reactor does after one-way messages, so that a write wakes no one),
//!   the better of the two: the floor under `Send`, which returns once its
//!   frame is on the socket, so one caller makes one write per call;
//! - `Seal`: AES-256-GCM sealing of one frame on one core;
//! - `SealOpen`: sealing one frame and opening it on one core, the
//!   cryptography each frame of a one-way stream costs;
//! - `Crypto`: sealing and opening a request frame and its empty reply on
//!   one core, the cryptography one `Request` costs.
//!
//! Ratio lines after the table compare `Request` with `RawPingPong` and
//! with `RawPingPong + Crypto` (the target: at most 1.3), `Send` with
//! `RawSend`, and
//! `SendNoWait` with a stream's ceiling: each frame must be sealed, moved
//! and opened in order, so no faster than the slowest of `Seal`, the
//! opening (`SealOpen - Seal`) and `RawStream`, nor than all that work
//! (`RawStream`'s in CPU time) spread over the cores the run may use. On
//! one core that is the sum.
//!
//! Each runs a ~0.3 s warm-up, then `--secs` seconds (default 2). B/op and
//! allocs/op count every allocation in the process (client, server and
//! reactor threads) during the timed loop, divided by the iterations. The
//! `SendNoWait` benchmarks stop the clock only once the server has received
//! every message, so nothing queued goes unmeasured.
//!
//! One line per benchmark, in the Go tool's order with one column added
//! last:
//!
//! ```text
//! BenchmarkNAME-CORES  ITERATIONS  NS ns/op  MB MB/s  B B/op  N allocs/op  CPU ns-cpu/op
//! ```
//!
//! `ns-cpu/op` is the whole process's CPU time (user plus system, every
//! thread: callers, reactors, the server; from `getrusage(RUSAGE_SELF)`)
//! over the same timed interval as `ns/op`, divided by the iterations.
//! Above `ns/op`, more than one core worked per op; below it, cores were
//! idle part of the time. The baselines divide both by frames. `--json`
//! writes the same figures (`cpu_ns_per_op`).

#[path = "../common/args.rs"]
mod args;
use clap::builder::{PossibleValue, PossibleValuesParser};
use clap::{Parser, ValueEnum};
use rand::{rngs::SmallRng, RngCore, SeedableRng};

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use monte_rpc::protocol::wire::{frame_len, FRAME_OVERHEAD};
use monte_rpc::protocol::{
    generate_identity_pkcs8, identity_public_key, Ed25519KeyPair, HandshakeFactory, IdentityConfig,
    Opener, Profile, PskHandshake, Sealer,
};
use monte_rpc::{Client, Config, Context, Error, NoHandler, Reactor, Server, Waiting};
use std::sync::Arc;

// ---------------------------------------------------------------------------
// Allocation counting

struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counters are atomics
// and never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s
        // contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract
        // (`ptr` came from this allocator, which is `System` underneath).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

// ---------------------------------------------------------------------------
// CPU time

/// The CPU time (user plus system) every thread of this process has used
/// so far, exited ones included: `getrusage(RUSAGE_SELF)`.
fn process_cpu() -> Duration {
    // SAFETY: `rusage` is plain C data (integers and timevals), for which
    // all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `usage` is a valid, writable `rusage` that outlives the
    // call, which only writes to it.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| {
        Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
    };
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

fn alloc_snapshot() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::SeqCst),
        ALLOC_BYTES.load(Ordering::SeqCst),
    )
}

// ---------------------------------------------------------------------------
// Random payloads

fn random_payload(size: usize) -> Vec<u8> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x1234_5678, |d| d.as_nanos() as u64);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; size];
    rng.fill_bytes(&mut buf);
    buf
}

// ---------------------------------------------------------------------------
// Arguments

/// The wire profile both sides use: a base profile, or one of the
/// authenticated handshakes with keys made up for the run.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Mode {
    /// Ephemeral X25519, one key per direction
    Secure,
    /// The Go library's profile: one key for both directions
    Monte,
    /// `secure` plus a pre-shared key
    Psk,
    /// `secure` plus an Ed25519 server identity the client pins
    Identity,
}

/// Handshake factories for both sides in `mode`.
fn handshakes(mode: Mode) -> (Arc<dyn HandshakeFactory>, Arc<dyn HandshakeFactory>) {
    match mode {
        Mode::Secure => (Arc::new(Profile::Secure), Arc::new(Profile::Secure)),
        Mode::Monte => (Arc::new(Profile::Monte), Arc::new(Profile::Monte)),
        Mode::Psk => {
            let psk = [0x5a; 32];
            (
                Arc::new(PskHandshake::factory(psk)),
                Arc::new(PskHandshake::factory(psk)),
            )
        }
        Mode::Identity => {
            let pkcs8 = generate_identity_pkcs8().expect("identity");
            let identity = Arc::new(Ed25519KeyPair::from_pkcs8(&pkcs8).expect("identity"));
            let pin = identity_public_key(&identity);
            (
                Arc::new(IdentityConfig::pinned(pin)),
                Arc::new(IdentityConfig::server(identity)),
            )
        }
    }
}

/// The loopback benchmark of monte-rpc: client and server in one process,
/// printed in Go's benchmark format.
#[derive(Parser)]
#[command(
    name = "bench",
    after_long_help = "Environment, for experiments: MONTE_CALLERS sets the parallel \
                       benchmarks' callers; MONTE_WORKERS, MONTE_WAITING (auto, block, \
                       or a spin time in µs), MONTE_MAX_CONNS, MONTE_UNSENT (the \
                       unsent low water in bytes, 0 for none), MONTE_READ_BUF (the \
                       receive buffer in bytes) and MONTE_SNDBUF / MONTE_RCVBUF \
                       (SO_SNDBUF / SO_RCVBUF in bytes, 0 for the system's) override \
                       those settings of both sides. MONTE_ASYNC_WORKERS=N runs the async \
                       benchmarks' futures as tasks of a multi-thread tokio runtime of N \
                       workers (the peer's shape) instead of on one current-thread runtime."
)]
struct Args {
    /// Seconds each benchmark is timed, after a 0.3 s warm-up
    #[arg(long, value_name = "S", value_parser = args::positive_secs, default_value_t = 2.0)]
    secs: f64,
    /// Run only this benchmark (any case) [default: all, in this order]
    #[arg(long, value_name = "NAME", ignore_case = true, value_parser = bench_names())]
    bench: Option<String>,
    /// The wire profile of both sides
    #[arg(long, value_enum, ignore_case = true, default_value = "secure")]
    profile: Mode,
    /// Payload size in bytes
    #[arg(long, value_name = "N", default_value_t = 1400)]
    size: usize,
    /// Also write the results to this file as JSON
    #[arg(long, value_name = "PATH")]
    json: Option<String>,
}

/// `--bench`'s values: every benchmark's name, described.
fn bench_names() -> PossibleValuesParser {
    PossibleValuesParser::new(
        BENCHES
            .iter()
            .map(|b| PossibleValue::new(b.name).help(b.about)),
    )
}

// ---------------------------------------------------------------------------
// Measurement

const WARMUP: Duration = Duration::from_millis(300);
/// How long to wait for the server to see every message before calling it
/// a hang.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

/// Messages (seq 0) the benchmarks sent, and those the server received.
static SENT: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);

type BenchResult<T> = std::result::Result<T, String>;

/// One call of a benchmark; `response` is the caller's reusable buffer.
type Op<'a> = dyn Fn(&mut Vec<u8>) -> Result<(), Error> + Sync + 'a;

struct Measured {
    iterations: u64,
    elapsed: Duration,
    /// The whole process's CPU time over `elapsed`.
    cpu: Duration,
    allocs: u64,
    bytes: u64,
}

/// Spins (then sleeps) until the server has seen every message sent.
fn wait_server_drained() -> BenchResult<()> {
    let start = Instant::now();
    let mut spins = 0u32;
    loop {
        let sent = SENT.load(Ordering::SeqCst);
        let seen = SEEN.load(Ordering::SeqCst);
        if seen >= sent {
            return Ok(());
        }
        if start.elapsed() > DRAIN_LIMIT {
            return Err(format!(
                "server received {seen} of {sent} messages after {DRAIN_LIMIT:?}: \
                 queued frames never arrived (hang)"
            ));
        }
        spins += 1;
        if spins < 10_000 {
            std::hint::spin_loop();
        } else {
            std::thread::yield_now();
        }
    }
}

/// Runs `op` for `dur` on `threads` callers (0: the current thread), then
/// `finish` (still timed); counts iterations, time and allocations.
fn measure(
    threads: usize,
    dur: Duration,
    op: &Op<'_>,
    finish: &dyn Fn() -> BenchResult<()>,
) -> BenchResult<Measured> {
    if threads == 0 {
        let mut response = Vec::new();
        let mut iterations = 0u64;
        let (a0, b0) = alloc_snapshot();
        let cpu0 = process_cpu();
        let start = Instant::now();
        loop {
            op(&mut response).map_err(|e| e.to_string())?;
            iterations += 1;
            if start.elapsed() >= dur {
                break;
            }
        }
        finish()?;
        let elapsed = start.elapsed();
        let cpu = process_cpu().saturating_sub(cpu0);
        let (a1, b1) = alloc_snapshot();
        return Ok(Measured {
            iterations,
            elapsed,
            cpu,
            allocs: a1 - a0,
            bytes: b1 - b0,
        });
    }

    let ready = AtomicUsize::new(0);
    let done = AtomicUsize::new(0);
    let go = AtomicBool::new(false);
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let failure: Mutex<Option<String>> = Mutex::new(None);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                let mut response = Vec::new();
                let mut n = 0u64;
                ready.fetch_add(1, Ordering::SeqCst);
                while !go.load(Ordering::Acquire) {
                    std::thread::yield_now();
                }
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = op(&mut response) {
                        let mut f = failure.lock().unwrap_or_else(|p| p.into_inner());
                        f.get_or_insert_with(|| e.to_string());
                        stop.store(true, Ordering::SeqCst);
                        break;
                    }
                    n += 1;
                }
                total.fetch_add(n, Ordering::SeqCst);
                done.fetch_add(1, Ordering::SeqCst);
            });
        }
        while ready.load(Ordering::SeqCst) < threads {
            std::thread::yield_now();
        }
        let (a0, b0) = alloc_snapshot();
        let cpu0 = process_cpu();
        let start = Instant::now();
        go.store(true, Ordering::Release);
        while start.elapsed() < dur && !stop.load(Ordering::Relaxed) {
            let left = dur.saturating_sub(start.elapsed());
            std::thread::sleep(left.min(Duration::from_millis(10)));
        }
        stop.store(true, Ordering::SeqCst);
        while done.load(Ordering::SeqCst) < threads {
            std::thread::yield_now();
        }
        if let Some(e) = failure.lock().unwrap_or_else(|p| p.into_inner()).take() {
            return Err(e);
        }
        finish()?;
        let elapsed = start.elapsed();
        let cpu = process_cpu().saturating_sub(cpu0);
        let (a1, b1) = alloc_snapshot();
        Ok(Measured {
            iterations: total.load(Ordering::SeqCst),
            elapsed,
            cpu,
            allocs: a1 - a0,
            bytes: b1 - b0,
        })
    })
}

// ---------------------------------------------------------------------------
// Benchmarks

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    SendNoWait,
    Request,
    /// `request_async`, awaited on one current-thread tokio runtime.
    AsyncRequest,
    Handshake,
    RawPingPong,
    RawStream,
    RawSend,
    Seal,
    SealOpen,
    Crypto,
}

struct Bench {
    name: &'static str,
    kind: Kind,
    parallel: bool,
    /// What it measures, for `--help`.
    about: &'static str,
}

const BENCHES: [Bench; 15] = [
    Bench {
        name: "Send",
        kind: Kind::Send,
        parallel: false,
        about: "one caller: `send`, returns once the frame is written",
    },
    Bench {
        name: "SendNoWait",
        kind: Kind::SendNoWait,
        parallel: false,
        about: "one caller: `send_no_wait`, returns once the frame is queued",
    },
    Bench {
        name: "Request",
        kind: Kind::Request,
        parallel: false,
        about: "one caller: `request`, returns once the response is in",
    },
    Bench {
        name: "ParallelSend",
        kind: Kind::Send,
        parallel: true,
        about: "Send from available cores x 4 callers sharing one client",
    },
    Bench {
        name: "ParallelSendNoWait",
        kind: Kind::SendNoWait,
        parallel: true,
        about: "SendNoWait from available cores x 4 callers sharing one client",
    },
    Bench {
        name: "ParallelRequest",
        kind: Kind::Request,
        parallel: true,
        about: "Request from available cores x 4 callers sharing one client",
    },
    Bench {
        name: "AsyncRequest",
        kind: Kind::AsyncRequest,
        parallel: false,
        about: "one task: `request_async` awaited in turn on a current-thread tokio runtime",
    },
    Bench {
        name: "AsyncParallelRequest",
        kind: Kind::AsyncRequest,
        parallel: true,
        about: "8 `request_async` futures in flight on one connection, one current-thread \
                tokio runtime",
    },
    Bench {
        name: "Handshake",
        kind: Kind::Handshake,
        parallel: false,
        about: "a connection per op: connect, handshake, one request, close",
    },
    Bench {
        name: "RawPingPong",
        kind: Kind::RawPingPong,
        parallel: false,
        about: "baseline: bare loopback TCP ping-pong with Request's sizes, no crypto; \
                both threads on one core and unpinned, the better of the two",
    },
    Bench {
        name: "RawStream",
        kind: Kind::RawStream,
        parallel: false,
        about: "baseline: pre-built frames written in 16 KiB and 64 KiB batches, per frame; \
                the better of the two",
    },
    Bench {
        name: "RawSend",
        kind: Kind::RawSend,
        parallel: false,
        about: "baseline: pre-built frames written one per write, to a blocking and to a \
                polling reader, the better of the two: Send's floor",
    },
    Bench {
        name: "Seal",
        kind: Kind::Seal,
        parallel: false,
        about: "baseline: AES-256-GCM sealing of one frame on one core",
    },
    Bench {
        name: "SealOpen",
        kind: Kind::SealOpen,
        parallel: false,
        about: "baseline: sealing one frame and opening it, one core: a stream's crypto per frame",
    },
    Bench {
        name: "Crypto",
        kind: Kind::Crypto,
        parallel: false,
        about: "baseline: sealing and opening a request frame and its empty reply, one core",
    },
];

/// Frames per `RawStream` write of `batch` bytes.
fn frames_per_batch(size: usize, batch: usize) -> usize {
    (batch / frame_len(size)).max(1)
}

/// The calling thread's CPU affinity.
fn affinity() -> libc::cpu_set_t {
    // SAFETY: `set` is a plain bit set the call fills; pid 0 names the
    // calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let _ = libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set);
        set
    }
}

/// Sets the calling thread's CPU affinity.
fn set_affinity(set: &libc::cpu_set_t) {
    // SAFETY: `set` is a valid bit set for the call's duration; pid 0
    // names the calling thread.
    let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(set), set) };
}

/// Pins the calling thread to `cpu` (the same-core `RawPingPong`).
fn pin_thread(cpu: usize) {
    // SAFETY: `set` is a plain bit set, zeroed then given one bit.
    let set = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        set
    };
    set_affinity(&set);
}

/// The CPU the calling thread runs on now.
fn current_cpu() -> usize {
    // SAFETY: no arguments; returns -1 on failure.
    let cpu = unsafe { libc::sched_getcpu() };
    cpu.max(0) as usize
}

/// The ceilings behind the table, printed once: each baseline's variants.
static CEILING_NOTES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// The baselines: no monte-rpc runtime involved. Returns the measurement
/// and the number of frames each op moved.
fn run_baseline(kind: Kind, args: &Args, payload: &[u8]) -> BenchResult<(Measured, u64)> {
    let dur = Duration::from_secs_f64(args.secs);
    match kind {
        Kind::Seal => {
            let mut sealer = Sealer::new([7; 32], Profile::Secure);
            let mut out = vec![0u8; frame_len(payload.len())];
            let cell = Mutex::new((&mut sealer, &mut out));
            let op = |_: &mut Vec<u8>| {
                let mut g = cell.lock().unwrap_or_else(|p| p.into_inner());
                let (sealer, out) = &mut *g;
                sealer.seal_into(0, payload, out).map(|_| ())
            };
            measure(0, WARMUP, &op, &|| Ok(()))?;
            Ok((measure(0, dur, &op, &|| Ok(()))?, 1))
        }
        Kind::RawPingPong => {
            // Both threads on one core (a wake-up costs no cross-core IPI),
            // then unpinned; the limit is the better of the two. The
            // process's own affinity (taskset) still bounds both.
            let same_core = ping_pong(payload, dur, Placement::SameCore(current_cpu()))?;
            let unpinned = ping_pong(payload, dur, Placement::Unpinned)?;
            let ns = |m: &Measured| m.elapsed.as_nanos() as f64 / m.iterations.max(1) as f64;
            // Not a candidate for the limit (it burns two cores), but what
            // a round trip between two cores costs at best: where it is
            // slower than the same-core one, a design that runs the two
            // ends on two threads loses to one that runs both on one.
            let apart = match two_cpus() {
                Some((a, b)) => {
                    let m = ping_pong(payload, dur, Placement::SpinningApart(a, b))?;
                    format!(", {:.0} ns/op spinning on two cores", ns(&m))
                }
                None => String::new(),
            };
            note(format!(
                "RawPingPong: {:.0} ns/op with both threads on one core, {:.0} ns/op unpinned{apart}",
                ns(&same_core),
                ns(&unpinned)
            ));
            Ok((
                if ns(&same_core) <= ns(&unpinned) {
                    same_core
                } else {
                    unpinned
                },
                1,
            ))
        }
        Kind::RawStream => {
            let small = raw_stream(payload, dur, 16 << 10, Reader::Blocking)?;
            let large = raw_stream(payload, dur, 64 << 10, Reader::Blocking)?;
            Ok(better_stream(
                "RawStream",
                ("in 16 KiB writes", small),
                ("in 64 KiB writes", large),
            ))
        }
        Kind::RawSend => {
            // One frame per write: the batch is a frame.
            let frame = frame_len(payload.len());
            let blocking = raw_stream(payload, dur, frame, Reader::Blocking)?;
            let polling = raw_stream(payload, dur, frame, Reader::Polling)?;
            Ok(better_stream(
                "RawSend",
                ("to a blocking reader", blocking),
                ("to a polling one", polling),
            ))
        }
        Kind::SealOpen => {
            let state = Mutex::new(Crossing::new(payload.len()));
            let op = |_: &mut Vec<u8>| {
                let mut crossing = state.lock().unwrap_or_else(|p| p.into_inner());
                crossing.cross(0, payload)
            };
            measure(0, WARMUP, &op, &|| Ok(()))?;
            Ok((measure(0, dur, &op, &|| Ok(()))?, 1))
        }
        Kind::Crypto => {
            let state = Mutex::new((Crossing::new(payload.len()), Crossing::new(0)));
            let op = |_: &mut Vec<u8>| {
                let mut g = state.lock().unwrap_or_else(|p| p.into_inner());
                let (request, reply) = &mut *g;
                request.cross(1, payload)?;
                reply.cross(1, b"")
            };
            measure(0, WARMUP, &op, &|| Ok(()))?;
            Ok((measure(0, dur, &op, &|| Ok(()))?, 1))
        }
        _ => Err("not a baseline".into()),
    }
}

/// One direction of a connection's crypto, for the baselines: a frame
/// sealed into a buffer of its size and opened in place again.
struct Crossing {
    sealer: Sealer,
    opener: Opener,
    frame: Vec<u8>,
}

impl Crossing {
    fn new(payload_len: usize) -> Self {
        let key = [7; 32];
        Crossing {
            sealer: Sealer::new(key, Profile::Secure),
            opener: Opener::new(key, Profile::Secure),
            frame: vec![0u8; frame_len(payload_len)],
        }
    }

    /// Seals `payload` as frame `seq` and opens it.
    fn cross(&mut self, seq: u32, payload: &[u8]) -> monte_rpc::Result<()> {
        self.sealer.seal_into(seq, payload, &mut self.frame)?;
        self.opener.open_in_place(&mut self.frame)?;
        Ok(())
    }
}

/// Records a line for the notes printed after the table.
fn note(line: String) {
    CEILING_NOTES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(line);
}

/// A bare TCP ping-pong with `Request`'s sizes, both threads on `cpu` if
/// given.
/// Where `ping_pong`'s two threads run, and how they wait.
#[derive(Clone, Copy)]
enum Placement {
    /// Both on this CPU, blocking: a wake-up costs no cross-core IPI.
    SameCore(usize),
    /// As the process may run (taskset bounds it), blocking.
    Unpinned,
    /// One thread on each of these two CPUs, each polling its non-blocking
    /// socket without pause: the best a design that spins across cores
    /// can do, with no wake-up at all.
    SpinningApart(usize, usize),
}

/// Reads `buf` full from a non-blocking socket, polling without pause.
fn read_spinning(mut s: &TcpStream, buf: &mut [u8]) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match s.read(&mut buf[got..]) {
            Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes all of `buf` to a non-blocking socket, polling without pause.
fn write_spinning(mut s: &TcpStream, buf: &[u8]) -> std::io::Result<()> {
    let mut put = 0;
    while put < buf.len() {
        match s.write(&buf[put..]) {
            Ok(n) => put += n,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => std::hint::spin_loop(),
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Two CPUs this process may run on, if it may run on two.
fn two_cpus() -> Option<(usize, usize)> {
    let set = affinity();
    // SAFETY: `set` is a valid bit set; CPU_ISSET only reads it.
    let mut cpus = (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((cpus.next()?, cpus.next()?))
}

fn ping_pong(payload: &[u8], dur: Duration, placement: Placement) -> BenchResult<Measured> {
    let io = |e: std::io::Error| e.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let out_len = frame_len(payload.len());
    let (mine, echo_cpu, spinning) = match placement {
        Placement::SameCore(cpu) => (Some(cpu), Some(cpu), false),
        Placement::Unpinned => (None, None, false),
        Placement::SpinningApart(a, b) => (Some(a), Some(b), true),
    };
    let echo = std::thread::spawn(move || -> std::io::Result<()> {
        if let Some(cpu) = echo_cpu {
            pin_thread(cpu);
        }
        let (mut s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        s.set_nonblocking(spinning)?;
        let mut frame = vec![0u8; out_len];
        let reply = [0u8; FRAME_OVERHEAD];
        loop {
            let got = if spinning {
                read_spinning(&s, &mut frame)
            } else {
                s.read_exact(&mut frame)
            };
            if got.is_err() {
                return Ok(());
            }
            if spinning {
                write_spinning(&s, &reply)?;
            } else {
                s.write_all(&reply)?;
            }
        }
    });
    let before = affinity();
    if let Some(cpu) = mine {
        pin_thread(cpu);
    }
    let result = (|| {
        let stream = TcpStream::connect(addr).map_err(io)?;
        stream.set_nodelay(true).map_err(io)?;
        stream.set_nonblocking(spinning).map_err(io)?;
        let frame = vec![1u8; out_len];
        let op = |_: &mut Vec<u8>| {
            let mut s = &stream;
            let mut reply = [0u8; FRAME_OVERHEAD];
            if spinning {
                write_spinning(s, &frame)?;
                read_spinning(s, &mut reply)?;
            } else {
                s.write_all(&frame)?;
                s.read_exact(&mut reply)?;
            }
            Ok(())
        };
        measure(0, WARMUP, &op, &|| Ok(()))?;
        measure(0, dur, &op, &|| Ok(()))
    })();
    set_affinity(&before);
    let _ = echo.join();
    result
}

/// The faster per frame of two raw-stream variants (each with what it is
/// and its measurement), both noted for the lines after the table.
fn better_stream(
    name: &str,
    a: (&str, (Measured, u64)),
    b: (&str, (Measured, u64)),
) -> (Measured, u64) {
    let per_frame =
        |(m, n): &(Measured, u64)| m.elapsed.as_nanos() as f64 / (m.iterations * n).max(1) as f64;
    let (ns_a, ns_b) = (per_frame(&a.1), per_frame(&b.1));
    note(format!(
        "{name}: {ns_a:.0} ns/frame {}, {ns_b:.0} ns/frame {}",
        a.0, b.0
    ));
    if ns_a <= ns_b {
        a.1
    } else {
        b.1
    }
}

/// How a raw stream's reader waits for bytes.
#[derive(Clone, Copy)]
enum Reader {
    /// In a blocking `read`: each write that finds it asleep wakes it.
    Blocking,
    /// Asleep between non-blocking reads for the reactor's poll interval
    /// after one-way messages: writes wake no one.
    Polling,
}

/// Pre-built frames written in `batch`-byte writes to a reader that
/// discards them: the measurement and the frames per write.
fn raw_stream(
    payload: &[u8],
    dur: Duration,
    batch: usize,
    reader: Reader,
) -> BenchResult<(Measured, u64)> {
    let io = |e: std::io::Error| e.to_string();
    let listener = TcpListener::bind("127.0.0.1:0").map_err(io)?;
    let addr = listener.local_addr().map_err(io)?;
    let received = std::sync::Arc::new(AtomicU64::new(0));
    let counter = received.clone();
    let sink = std::thread::spawn(move || -> std::io::Result<()> {
        let (mut s, _) = listener.accept()?;
        s.set_nonblocking(matches!(reader, Reader::Polling))?;
        let mut buf = vec![0u8; 256 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(n) => {
                    counter.fetch_add(n as u64, Ordering::Relaxed);
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    std::thread::sleep(Duration::from_micros(20));
                }
                Err(e) => return Err(e),
            }
        }
    });
    let stream = TcpStream::connect(addr).map_err(io)?;
    stream.set_nodelay(true).map_err(io)?;
    let per_batch = frames_per_batch(payload.len(), batch);
    let bytes = vec![3u8; per_batch * frame_len(payload.len())];
    let sent = AtomicU64::new(0);
    let op = |_: &mut Vec<u8>| {
        (&stream).write_all(&bytes)?;
        sent.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Ok(())
    };
    let drained = || {
        let target = sent.load(Ordering::Relaxed);
        let start = Instant::now();
        while received.load(Ordering::Relaxed) < target {
            if start.elapsed() > DRAIN_LIMIT {
                return Err("raw stream reader stalled".to_string());
            }
            std::thread::yield_now();
        }
        Ok(())
    };
    measure(0, WARMUP, &op, &drained)?;
    let m = measure(0, dur, &op, &drained)?;
    drop(stream);
    let _ = sink.join();
    Ok((m, per_batch as u64))
}

struct Report {
    name: String,
    iterations: u64,
    ns_per_op: f64,
    mb_per_s: f64,
    bytes_per_op: u64,
    allocs_per_op: u64,
    /// The whole process's CPU time (user plus system, every thread) per
    /// op, over the same interval as `ns_per_op`.
    cpu_ns_per_op: f64,
}

/// A whole number from the environment variable `name`, if it holds one.
fn env_number(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

/// Tuning knobs for experiments: MONTE_WAITING (`auto`, `block`, or a
/// spin time in µs), MONTE_MAX_CONNS, MONTE_WORKERS, MONTE_UNSENT
/// (bytes; 0: none), MONTE_READ_BUF (bytes) and MONTE_SNDBUF /
/// MONTE_RCVBUF (bytes; 0: the system's) override the defaults of both
/// sides.
fn tuned(mut config: Config) -> Config {
    if let Ok(waiting) = std::env::var("MONTE_WAITING") {
        config = config.waiting(match waiting.as_str() {
            "auto" => Waiting::Auto,
            "block" => Waiting::Block,
            us => match us.parse() {
                Ok(us) => Waiting::Spin(Duration::from_micros(us)),
                Err(_) => {
                    eprintln!(
                        "bench: MONTE_WAITING={us}: expected auto, block or a spin time in µs"
                    );
                    exit(2);
                }
            },
        });
    }
    if let Some(m) = env_number("MONTE_MAX_CONNS") {
        config = config.max_conns(m);
    }
    if let Some(n) = env_number("MONTE_UNSENT") {
        config = config.unsent_low_water((n > 0).then_some(n));
    }
    if let Some(n) = env_number("MONTE_READ_BUF") {
        config = config.read_buffer_size(n);
    }
    if let Some(n) = env_number("MONTE_RCVBUF") {
        config = config.recv_buffer_size((n > 0).then_some(n));
    }
    if let Some(n) = env_number("MONTE_SNDBUF") {
        config = config.send_buffer_size((n > 0).then_some(n));
    }
    if let Some(w) = env_number("MONTE_WORKERS") {
        config = config.workers(w);
    }
    config
}

fn client_config(handshake: Arc<dyn HandshakeFactory>, size: usize) -> Config {
    tuned(Config::default())
        .handshake(handshake)
        .request_timeout(Some(Duration::from_secs(10)))
        .max_message_size((size + 64).max(1 << 20))
}

fn run_bench(
    bench: &Bench,
    addr: SocketAddr,
    args: &Args,
    handshake: &Arc<dyn HandshakeFactory>,
    payload: &[u8],
    callers: usize,
) -> BenchResult<Report> {
    if matches!(
        bench.kind,
        Kind::RawPingPong
            | Kind::RawStream
            | Kind::RawSend
            | Kind::Seal
            | Kind::SealOpen
            | Kind::Crypto
    ) {
        eprintln!("running {} ({}s)...", bench.name, args.secs);
        let (m, per_op) = run_baseline(bench.kind, args, payload)?;
        let frames = (m.iterations * per_op).max(1);
        let secs = m.elapsed.as_secs_f64();
        return Ok(Report {
            name: bench.name.to_string(),
            iterations: frames,
            ns_per_op: m.elapsed.as_nanos() as f64 / frames as f64,
            mb_per_s: payload.len() as f64 * frames as f64 / secs / 1e6,
            bytes_per_op: (m.bytes as f64 / frames as f64).round() as u64,
            allocs_per_op: (m.allocs as f64 / frames as f64).round() as u64,
            cpu_ns_per_op: m.cpu.as_nanos() as f64 / frames as f64,
        });
    }
    let config = client_config(handshake.clone(), args.size);
    let dur = Duration::from_secs_f64(args.secs);
    let threads = if bench.parallel { callers } else { 0 };
    if bench.kind == Kind::AsyncRequest {
        let in_flight = if bench.parallel { ASYNC_IN_FLIGHT } else { 1 };
        let config = if bench.parallel {
            config.max_conns(1)
        } else {
            config
        };
        let client = Arc::new(Client::new(addr, config).map_err(|e| format!("client: {e}"))?);
        measure_async(&client, payload, in_flight, WARMUP)?;
        eprintln!("running {} ({}s)...", bench.name, args.secs);
        let m = measure_async(&client, payload, in_flight, dur)?;
        client.shutdown();
        return Ok(report(bench, payload, &m));
    }

    let client = Client::new(addr, config.clone()).map_err(|e| format!("client: {e}"))?;
    let send = |_: &mut Vec<u8>| {
        client.send(payload)?;
        SENT.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let send_no_wait = |_: &mut Vec<u8>| {
        client.send_no_wait(payload)?;
        SENT.fetch_add(1, Ordering::Relaxed);
        Ok(())
    };
    let request = |response: &mut Vec<u8>| client.request(payload, response);
    // A connection per iteration through one long-lived client reactor, so
    // the figure is connection set-up (connect, X25519 on both sides, key
    // schedule, one request, close), not thread start-up.
    let dialer = Reactor::new(config.clone().workers(1)).map_err(|e| format!("reactor: {e}"))?;
    let dial_handle = dialer.handle();
    let dial_thread = std::thread::spawn(move || dialer.run());
    let handshake = |response: &mut Vec<u8>| -> Result<(), Error> {
        let conn = dial_handle.dial(addr, std::sync::Arc::new(NoHandler))?;
        conn.request(b"", response)?;
        conn.close();
        Ok(())
    };
    let op: &Op<'_> = match bench.kind {
        Kind::Send => &send,
        Kind::SendNoWait => &send_no_wait,
        Kind::Request => &request,
        Kind::Handshake => &handshake,
        _ => return Err("a baseline is not a client benchmark".into()),
    };
    let nothing = || Ok(());
    // Queued frames are part of the work: write them out (the final
    // `send` returns once its frame, and so all before it on that
    // connection, is written) and wait for the server to have read them all.
    let drain = || {
        client.send(b"").map_err(|e| format!("drain send: {e}"))?;
        SENT.fetch_add(1, Ordering::Relaxed);
        wait_server_drained()
    };
    let finish: &dyn Fn() -> BenchResult<()> = if bench.kind == Kind::SendNoWait {
        &drain
    } else {
        &nothing
    };

    // Warm-up: dial the pool, fill the buffers, settle the caches.
    measure(threads, WARMUP, op, finish)?;
    wait_server_drained()?;

    eprintln!("running {} ({}s)...", bench.name, args.secs);
    let m = measure(threads, dur, op, finish)?;
    client.shutdown();
    dial_handle.stop();
    let _ = dial_thread.join();
    // Leave no messages in flight for the next benchmark.
    wait_server_drained()?;

    Ok(report(bench, payload, &m))
}

fn report(bench: &Bench, payload: &[u8], m: &Measured) -> Report {
    let iterations = m.iterations.max(1);
    let secs = m.elapsed.as_secs_f64();
    let mb_per_s = if bench.kind == Kind::Handshake || secs == 0.0 {
        0.0
    } else {
        (payload.len() as f64 * m.iterations as f64) / secs / 1e6
    };
    Report {
        name: bench.name.to_string(),
        iterations: m.iterations,
        ns_per_op: m.elapsed.as_nanos() as f64 / iterations as f64,
        mb_per_s,
        bytes_per_op: (m.bytes as f64 / iterations as f64).round() as u64,
        allocs_per_op: (m.allocs as f64 / iterations as f64).round() as u64,
        cpu_ns_per_op: m.cpu.as_nanos() as f64 / iterations as f64,
    }
}

/// Requests in flight in `AsyncParallelRequest`: the issue's comparison
/// point with tokio-rustls (8 on one connection).
const ASYNC_IN_FLIGHT: usize = 8;

/// `in_flight` futures, each awaiting `request_async` in turn, for `dur`:
/// joined on one current-thread tokio runtime on this thread, or, with
/// MONTE_ASYNC_WORKERS=N, tasks of a multi-thread runtime of N workers
/// (the peer's shape).
fn measure_async(
    client: &Arc<Client>,
    payload: &[u8],
    in_flight: usize,
    dur: Duration,
) -> BenchResult<Measured> {
    let workers = std::env::var("MONTE_ASYNC_WORKERS")
        .ok()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n > 0);
    let runtime = match workers {
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .build(),
        None => tokio::runtime::Builder::new_current_thread().build(),
    }
    .map_err(|e| format!("runtime: {e}"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let total = Arc::new(AtomicU64::new(0));
    let payload: Arc<[u8]> = payload.into();
    let (a0, b0) = alloc_snapshot();
    let cpu0 = process_cpu();
    let start = Instant::now();
    let one = || {
        let (client, payload) = (client.clone(), payload.clone());
        let (stop, total) = (stop.clone(), total.clone());
        async move {
            let mut response = Vec::new();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                client.request_async(&payload, &mut response).await?;
                n += 1;
                if start.elapsed() >= dur {
                    stop.store(true, Ordering::Relaxed);
                }
            }
            total.fetch_add(n, Ordering::Relaxed);
            Ok::<(), Error>(())
        }
    };
    let results: Vec<Result<(), Error>> = match workers {
        Some(_) => runtime.block_on(async {
            let tasks: Vec<_> = (0..in_flight).map(|_| tokio::spawn(one())).collect();
            let mut results = Vec::with_capacity(tasks.len());
            for task in tasks {
                results.push(task.await.unwrap_or_else(|e| panic!("bench task: {e}")));
            }
            results
        }),
        None => runtime.block_on(futures::future::join_all((0..in_flight).map(|_| one()))),
    };
    let elapsed = start.elapsed();
    let cpu = process_cpu().saturating_sub(cpu0);
    let (a1, b1) = alloc_snapshot();
    for r in results {
        r.map_err(|e| e.to_string())?;
    }
    Ok(Measured {
        iterations: total.load(Ordering::Relaxed),
        elapsed,
        cpu,
        allocs: a1 - a0,
        bytes: b1 - b0,
    })
}

/// The comparisons the performance targets are stated in, from this run,
/// after the ceilings' variants.
fn print_ratios(reports: &[Report]) {
    for line in CEILING_NOTES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .iter()
    {
        println!("# {line}");
    }
    let report = |name: &str| reports.iter().find(|r| r.name == name);
    let ns = |name: &str| report(name).map(|r| r.ns_per_op);
    let cpu = |name: &str| report(name).map(|r| r.cpu_ns_per_op);
    if let (Some(req), Some(raw)) = (ns("Request"), ns("RawPingPong")) {
        println!("# Request / RawPingPong = {:.2}", req / raw);
        if let Some(crypto) = ns("Crypto") {
            println!(
                "# Request / (RawPingPong + Crypto) = {:.2} (target: at most 1.30)",
                req / (raw + crypto)
            );
        }
    }
    if let (Some(send), Some(raw)) = (ns("Send"), ns("RawSend")) {
        println!("# Send / RawSend = {:.2}", send / raw);
    }
    if let (Some(nowait), Some(seal), Some(both), Some(raw), Some(raw_cpu)) = (
        ns("SendNoWait"),
        ns("Seal"),
        ns("SealOpen"),
        ns("RawStream"),
        cpu("RawStream"),
    ) {
        // Every frame of one connection is sealed in order, moved, and
        // opened in order: no stage is faster than its own baseline, and
        // the work of all of them (the move's in CPU time: its writer and
        // reader) shares the cores this run may use.
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let open = (both - seal).max(0.0);
        let ceiling = seal.max(open).max(raw).max((both + raw_cpu) / cores);
        println!(
            "# SendNoWait / stream ceiling = {:.2} (ceiling {ceiling:.0} ns/frame: the largest of \
             Seal, SealOpen - Seal, RawStream, and SealOpen plus RawStream's CPU time over \
             {cores} cores)",
            nowait / ceiling
        );
    }
}

fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn json_number(x: f64) -> String {
    if x.is_finite() {
        format!("{x}")
    } else {
        "0".to_string()
    }
}

fn write_json(path: &str, reports: &[Report]) -> std::io::Result<()> {
    let mut out = String::from("[\n");
    for (i, r) in reports.iter().enumerate() {
        out.push_str(&format!(
            "  {{\"name\": {}, \"iterations\": {}, \"ns_per_op\": {}, \"mb_per_s\": {}, \
             \"bytes_per_op\": {}, \"allocs_per_op\": {}, \"cpu_ns_per_op\": {}}}{}\n",
            json_string(&r.name),
            r.iterations,
            json_number(r.ns_per_op),
            json_number(r.mb_per_s),
            r.bytes_per_op,
            r.allocs_per_op,
            json_number(r.cpu_ns_per_op),
            if i + 1 < reports.len() { "," } else { "" }
        ));
    }
    out.push_str("]\n");
    std::fs::write(path, out)
}

fn main() {
    let args = Args::parse();
    let (client_handshake, server_handshake) = handshakes(args.profile);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let callers = env_number("MONTE_CALLERS").unwrap_or(cores * 4);

    let selected: Vec<&Bench> = BENCHES
        .iter()
        .filter(|b| match args.bench.as_deref() {
            None => true,
            Some(n) => n.eq_ignore_ascii_case(b.name),
        })
        .collect();

    // Watchdog: a benchmark that hangs must not hang the run.
    let budget = Duration::from_secs_f64(
        selected.len() as f64 * (args.secs + WARMUP.as_secs_f64()) * 2.0 + 60.0,
    );
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        eprintln!("bench: still running after {budget:?}: something hangs; aborting");
        exit(3);
    });

    let server_config = tuned(Config::server())
        .handshake(server_handshake)
        .max_message_size((args.size + 64).max(1 << 20));
    let server = Server::bind("127.0.0.1:0", server_config, |ctx: &mut Context<'_>| {
        if ctx.expects_reply() {
            let _ = ctx.reply(b"");
        } else {
            SEEN.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap_or_else(|e| {
        eprintln!("bench: server: {e}");
        exit(1);
    });
    let addr = server.local_addr();
    let payload = random_payload(args.size);

    let mut reports = Vec::new();
    for bench in selected {
        match run_bench(bench, addr, &args, &client_handshake, &payload, callers) {
            Ok(r) => {
                println!(
                    "{:<32}\t{:>10}\t{:>12.1} ns/op\t{:>10.2} MB/s\t{:>8} B/op\t{:>6} allocs/op\t{:>10.1} ns-cpu/op",
                    format!("Benchmark{}-{cores}", r.name),
                    r.iterations,
                    r.ns_per_op,
                    r.mb_per_s,
                    r.bytes_per_op,
                    r.allocs_per_op,
                    r.cpu_ns_per_op
                );
                reports.push(r);
            }
            Err(e) => {
                eprintln!("bench: {}: {e}", bench.name);
                exit(1);
            }
        }
    }
    server.shutdown();
    print_ratios(&reports);
    println!("# server stats: {}", server.stats());

    if let Some(path) = &args.json {
        if let Err(e) = write_json(path, &reports) {
            eprintln!("bench: writing {path}: {e}");
            exit(1);
        }
    }
}
