//! A soak run: a reversing server, a fault proxy that kills random
//! connections (a cut mid-chunk or an RST) every few hundred ms, and a
//! client through it with many caller threads doing mixed sends, queued
//! sends and requests of random sizes, every reply checked.
//!
//! A tool, not a showcase (those are `examples/server.rs`, `client.rs` and
//! `embed.rs`): it lives in `examples/tools/` and is built and run as an
//! example, `cargo run --release --example soak`.
//!
//! ```text
//! cargo run --release --example soak -- [--secs N] [--threads T] [--conns C]
//!     [--max-size B] [--kill-every-ms M] [--report-every-s R] [--final-msgs F]
//!     [--seed S]
//! cargo run --release --example soak -- --help   # every flag, with its default
//! ```
//!
//! Every R seconds it prints one line: elapsed time, calls/s, errors by
//! kind, request latency percentiles and resident memory. At the end it
//! stops the callers, disables the kills, sends F queued messages that must
//! all reach the server (checked by the server's count once the client has
//! shut down), and checks that memory stayed flat. The last line starts with
//! `soak ok` or `soak FAILED`; a failed check exits with 1, a run that
//! overstays `secs + 60` s is ended by a watchdog with 3.

use clap::Parser;
use rand::{rngs::SmallRng, Rng as _, RngCore, SeedableRng};

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monte_rpc::{Client, Config, Context, Error, Server};

use proxy::Proxy;

/// Message tags: the first byte of every body.
const TAG_REQUEST: u8 = b'R';
const TAG_SEND: u8 = b'S';
const TAG_NO_WAIT: u8 = b'N';
const TAG_FINAL: u8 = b'F';

/// A soak run: mixed calls through a proxy that kills random connections,
/// every reply checked, memory watched. Ends with `soak ok` (exit 0) or
/// `soak FAILED` (exit 1).
#[derive(Parser)]
#[command(name = "soak")]
struct Args {
    /// Seconds of mixed calls under connection kills
    #[arg(long, value_name = "N", default_value_t = 60)]
    secs: u64,
    /// Caller threads sharing the client (0 counts as 1)
    #[arg(long, value_name = "T", default_value_t = 16)]
    threads: usize,
    /// The client's connections (0 counts as 1)
    #[arg(long, value_name = "C", default_value_t = 4)]
    conns: usize,
    /// The largest random body, in bytes
    #[arg(long, value_name = "B", default_value_t = 64 << 10)]
    max_size: usize,
    /// Milliseconds between connection kills (0: none)
    #[arg(long, value_name = "M", default_value_t = 500)]
    kill_every_ms: u64,
    /// Seconds between report lines (0 counts as 1)
    #[arg(long, value_name = "R", default_value_t = 60)]
    report_every_s: u64,
    /// Queued messages sent after the kills stop, all of which must arrive
    #[arg(long, value_name = "F", default_value_t = 20_000)]
    final_msgs: u64,
    /// Seed of the random bodies, sizes, call kinds and kills
    #[arg(long, value_name = "S", default_value_t = 0x50a6_2024)]
    seed: u64,
}

fn parse_args() -> Args {
    let mut args = Args::parse();
    args.threads = args.threads.max(1);
    args.conns = args.conns.max(1);
    args.report_every_s = args.report_every_s.max(1);
    args
}

/// Resident memory in MiB, from /proc/self/statm (pages of 4096 bytes).
fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (pages * 4096) as f64 / (1 << 20) as f64
}

/// The variant name of an error.
fn kind(e: &Error) -> &'static str {
    match e.root_cause() {
        Error::Handshake(_) => "Handshake",
        Error::FrameTooLarge { .. } => "FrameTooLarge",
        Error::FrameTooShort { .. } => "FrameTooShort",
        Error::Authentication => "Authentication",
        Error::ReceiveFailed => "ReceiveFailed",
        Error::CounterExhausted => "CounterExhausted",
        Error::MessageTooLarge { .. } => "MessageTooLarge",
        Error::BufferTooSmall { .. } => "BufferTooSmall",
        Error::SequenceExhausted => "SequenceExhausted",
        Error::Timeout(_) => "Timeout",
        Error::Closed => "Closed",
        Error::PeerClosed => "PeerClosed",
        Error::ConnectionLimit => "ConnectionLimit",
        Error::HandlerPanicked => "HandlerPanicked",
        Error::Io(_) => "Io",
        _ => "Other",
    }
}

/// Errors the kills can explain. Anything else (a frame that fails to
/// authenticate, say) is a failure: the proxy never alters bytes.
fn explained(e: &Error) -> bool {
    matches!(
        e.root_cause(),
        Error::Timeout(_) | Error::Closed | Error::PeerClosed | Error::Io(_) | Error::Handshake(_)
    )
}

/// What the callers share with the reporter.
struct Shared {
    stop: AtomicBool,
    calls: AtomicU64,
    /// Calls that returned Ok, by tag.
    ok: [AtomicU64; 256],
    errors: Mutex<BTreeMap<&'static str, u64>>,
    wrong_replies: AtomicU64,
    unexplained: Mutex<Vec<String>>,
    slowest_us: AtomicU64,
    /// One latency histogram per caller, drained by the reporter.
    latency: Vec<Mutex<Histogram<u64>>>,
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds")
}

fn caller(client: &Client, shared: &Shared, t: usize, max_size: usize, seed: u64) {
    let mut rng =
        SmallRng::seed_from_u64(seed ^ (t as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    let mut body = Vec::with_capacity(max_size.max(9));
    let mut response = Vec::new();
    let mut i = 0u64;
    while !shared.stop.load(Ordering::Relaxed) {
        i += 1;
        let op = rng.random_range(0..10);
        let tag = match op {
            0 | 1 => TAG_SEND,
            2 | 3 => TAG_NO_WAIT,
            _ => TAG_REQUEST,
        };
        // Mostly small bodies, some up to the maximum.
        let len = if rng.random_range(0..4) == 0 {
            rng.random_range(0..max_size as u64 + 1) as usize
        } else {
            rng.random_range(0..1024) as usize
        }
        .max(9);
        body.clear();
        body.push(tag);
        body.extend_from_slice(&((t as u64) << 40 | i).to_le_bytes());
        body.resize(len, 0);
        rng.fill_bytes(&mut body[9..]);
        let start = Instant::now();
        let result = match tag {
            TAG_SEND => client.send(&body),
            TAG_NO_WAIT => client.send_no_wait(&body),
            _ => client.request(&body, &mut response),
        };
        let us = start.elapsed().as_micros() as u64;
        shared.calls.fetch_add(1, Ordering::Relaxed);
        shared.slowest_us.fetch_max(us, Ordering::Relaxed);
        match result {
            Ok(()) => {
                shared.ok[tag as usize].fetch_add(1, Ordering::Relaxed);
                if tag == TAG_REQUEST {
                    let _ = shared.latency[t].lock().unwrap().record(us.max(1));
                    if !response.iter().eq(body.iter().rev()) {
                        shared.wrong_replies.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            Err(e) => {
                if !explained(&e) {
                    let mut u = shared.unexplained.lock().unwrap();
                    if u.len() < 20 {
                        u.push(format!("{e:?}"));
                    }
                }
                *shared.errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
            }
        }
    }
}

fn main() {
    let args = parse_args();
    let started = Instant::now();

    let limit = args.secs + 60;
    thread::spawn(move || {
        thread::sleep(Duration::from_secs(limit));
        eprintln!("soak FAILED: watchdog: the run exceeded {limit} s");
        std::process::exit(3);
    });

    // The server: reverses requests, counts one-way messages by tag.
    let counts: Arc<Vec<AtomicU64>> = Arc::new((0..256).map(|_| AtomicU64::new(0)).collect());
    let c = counts.clone();
    let max_message = args.max_size.max(9);
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server()
            .max_message_size(max_message)
            .write_timeout(Some(Duration::from_secs(2))),
        move |ctx: &mut Context<'_>| {
            if ctx.expects_reply() {
                let mut body = ctx.body().to_vec();
                body.reverse();
                let _ = ctx.reply(&body);
            } else if let Some(&tag) = ctx.body().first() {
                c[tag as usize].fetch_add(1, Ordering::Relaxed);
            }
        },
    )
    .expect("bind server");
    let proxy = Arc::new(Proxy::start(server.local_addr()));
    let client = Arc::new(
        Client::new(
            proxy.addr(),
            Config::default()
                .max_conns(args.conns)
                .max_message_size(max_message)
                .request_timeout(Some(Duration::from_secs(1)))
                .write_timeout(Some(Duration::from_secs(1)))
                .dial_timeout(Some(Duration::from_secs(1)))
                .handshake_timeout(Some(Duration::from_secs(1)))
                .dial_attempts(2),
        )
        .expect("client"),
    );
    println!(
        "soak: {} s, {} threads, {} conns, bodies up to {} B, a kill every {} ms, seed {:#x}",
        args.secs, args.threads, args.conns, args.max_size, args.kill_every_ms, args.seed
    );

    // The killer: one random live connection every M ms, cut or reset.
    let kills_on = Arc::new(AtomicBool::new(args.kill_every_ms > 0));
    let killer_stop = Arc::new(AtomicBool::new(false));
    let kills = Arc::new(AtomicU64::new(0));
    let killer = {
        let (proxy, on, stop, kills) = (
            proxy.clone(),
            kills_on.clone(),
            killer_stop.clone(),
            kills.clone(),
        );
        let every = Duration::from_millis(args.kill_every_ms.max(1));
        let mut rng = SmallRng::seed_from_u64(args.seed ^ 0x6b11);
        thread::spawn(move || {
            while !stop.load(Ordering::Acquire) {
                thread::sleep(every);
                if on.load(Ordering::Acquire)
                    && proxy.kill_one(rng.next_u64(), rng.random_range(0..2) == 0)
                {
                    kills.fetch_add(1, Ordering::Relaxed);
                }
            }
        })
    };

    let shared = Arc::new(Shared {
        stop: AtomicBool::new(false),
        calls: AtomicU64::new(0),
        ok: std::array::from_fn(|_| AtomicU64::new(0)),
        errors: Mutex::new(BTreeMap::new()),
        wrong_replies: AtomicU64::new(0),
        unexplained: Mutex::new(Vec::new()),
        slowest_us: AtomicU64::new(0),
        latency: (0..args.threads).map(|_| Mutex::new(histogram())).collect(),
    });
    let callers: Vec<_> = (0..args.threads)
        .map(|t| {
            let (client, shared) = (client.clone(), shared.clone());
            let (max_size, seed) = (args.max_size, args.seed);
            thread::spawn(move || caller(&client, &shared, t, max_size, seed))
        })
        .collect();

    // Reports every R s until the run time is up.
    let mut total = histogram();
    let mut last_calls = 0;
    let mut last_at = started;
    let mut baseline_rss = None;
    let report = |total: &mut Histogram<u64>, last_calls: &mut u64, last_at: &mut Instant| {
        let mut interval = histogram();
        for h in &shared.latency {
            let mut h = h.lock().unwrap();
            let _ = interval.add(&*h);
            h.reset();
        }
        let _ = total.add(&interval);
        let calls = shared.calls.load(Ordering::Relaxed);
        let secs = last_at.elapsed().as_secs_f64().max(1e-9);
        let rate = (calls - *last_calls) as f64 / secs;
        *last_calls = calls;
        *last_at = Instant::now();
        let rss = rss_mib();
        println!(
            "t={:>6.1}s calls/s={:>8.0} errors={:?} kills={} req_us p50={} p99={} p999={} \
             rss={:.1}MiB",
            started.elapsed().as_secs_f64(),
            rate,
            shared.errors.lock().unwrap(),
            kills.load(Ordering::Relaxed),
            interval.value_at_quantile(0.5),
            interval.value_at_quantile(0.99),
            interval.value_at_quantile(0.999),
            rss
        );
        rss
    };
    let run_until = started + Duration::from_secs(args.secs);
    let every = Duration::from_secs(args.report_every_s);
    let mut next_report = started + every;
    while Instant::now() < run_until {
        let now = Instant::now();
        if now >= next_report {
            let rss = report(&mut total, &mut last_calls, &mut last_at);
            baseline_rss.get_or_insert(rss);
            next_report += every;
        }
        thread::sleep(
            next_report
                .min(run_until)
                .saturating_duration_since(Instant::now())
                .min(Duration::from_millis(200)),
        );
    }

    // Stop the callers, then the kills.
    shared.stop.store(true, Ordering::Release);
    for c in callers {
        c.join().expect("caller panicked");
    }
    kills_on.store(false, Ordering::Release);
    killer_stop.store(true, Ordering::Release);
    killer.join().expect("killer panicked");
    proxy.disarm();
    let final_rss = report(&mut total, &mut last_calls, &mut last_at);
    let baseline_rss = baseline_rss.unwrap_or(final_rss);

    // Connections killed just before the kills stopped may not be noticed
    // yet: let them finish closing before the clean phase starts.
    thread::sleep(Duration::from_millis(500));

    // The clean phase: F queued sends, which must all arrive.
    let phase_start = Instant::now();
    let per_thread = args.final_msgs / args.threads as u64;
    let extra = args.final_msgs % args.threads as u64;
    let clean_errors = Arc::new(Mutex::new(BTreeMap::<&'static str, u64>::new()));
    let finals: Vec<_> = (0..args.threads)
        .map(|t| {
            let (client, errors) = (client.clone(), clean_errors.clone());
            let n = per_thread + u64::from((t as u64) < extra);
            thread::spawn(move || {
                let mut accepted = 0u64;
                let mut failures = 0u64;
                let mut body = vec![TAG_FINAL; 64];
                while accepted < n && failures < 1000 {
                    body[1..9].copy_from_slice(&((t as u64) << 40 | accepted).to_le_bytes());
                    match client.send_no_wait(&body) {
                        Ok(()) => accepted += 1,
                        Err(e) => {
                            failures += 1;
                            *errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                        }
                    }
                }
                accepted
            })
        })
        .collect();
    let final_accepted: u64 = finals.into_iter().map(|f| f.join().unwrap()).sum();
    let shutdown_start = Instant::now();
    client.shutdown();
    let shutdown_took = shutdown_start.elapsed();
    // The server counts in its handler, before it answers the client's
    // close; allow a moment all the same.
    let deadline = Instant::now() + Duration::from_secs(5);
    while counts[TAG_FINAL as usize].load(Ordering::Relaxed) < final_accepted
        && Instant::now() < deadline
    {
        thread::sleep(Duration::from_millis(10));
    }
    let final_counted = counts[TAG_FINAL as usize].load(Ordering::Relaxed);
    let clean_took = phase_start.elapsed();
    let proxy_stats = {
        let s = proxy.stats();
        (
            s.accepted.load(Ordering::Relaxed),
            s.cuts.load(Ordering::Relaxed),
            s.resets.load(Ordering::Relaxed),
        )
    };
    drop(proxy);
    let client_stats = client.stats();
    server.shutdown();
    let server_stats = server.stats();
    println!("client stats: {client_stats:?}");
    println!("server stats: {server_stats:?}");

    // The report.
    let ok = |tag: u8| shared.ok[tag as usize].load(Ordering::Relaxed);
    let counted = |tag: u8| counts[tag as usize].load(Ordering::Relaxed);
    let lost = |tag: u8| ok(tag).saturating_sub(counted(tag));
    let stats = proxy_stats;
    println!(
        "proxy: {} connections accepted, {} cut, {} reset",
        stats.0, stats.1, stats.2
    );
    println!(
        "kill phase: {} calls, {} kills; requests ok {}, p50={}us p99={}us p999={}us max={}us (slowest call {}us)",
        shared.calls.load(Ordering::Relaxed),
        kills.load(Ordering::Relaxed),
        ok(TAG_REQUEST),
        total.value_at_quantile(0.5),
        total.value_at_quantile(0.99),
        total.value_at_quantile(0.999),
        total.max(),
        shared.slowest_us.load(Ordering::Relaxed),
    );
    println!(
        "kill phase one-way: send ok {} / server counted {} (lost with killed connections: {}); \
         send_no_wait ok {} / counted {} (lost: {})",
        ok(TAG_SEND),
        counted(TAG_SEND),
        lost(TAG_SEND),
        ok(TAG_NO_WAIT),
        counted(TAG_NO_WAIT),
        lost(TAG_NO_WAIT),
    );
    println!(
        "clean phase: send_no_wait accepted {} / server counted {}, errors {:?}, \
         client shutdown {:?}, phase {:?}",
        final_accepted,
        final_counted,
        clean_errors.lock().unwrap(),
        shutdown_took,
        clean_took
    );
    let rss_bound = (baseline_rss + 32.0).max(baseline_rss * 1.25);
    println!(
        "memory: rss after first interval {baseline_rss:.1} MiB, at end {final_rss:.1} MiB \
         (bound {rss_bound:.1} MiB)"
    );

    let mut failures = Vec::new();
    let wrong = shared.wrong_replies.load(Ordering::Relaxed);
    if wrong > 0 {
        failures.push(format!("{wrong} requests got a wrong reply"));
    }
    let unexplained = shared.unexplained.lock().unwrap();
    if !unexplained.is_empty() {
        failures.push(format!("unexplained errors: {unexplained:?}"));
    }
    if final_counted != final_accepted {
        failures.push(format!(
            "clean phase: {final_accepted} send_no_wait accepted but the server counted \
             {final_counted}"
        ));
    }
    if final_accepted < args.final_msgs {
        failures.push(format!(
            "clean phase: only {final_accepted} of {} send_no_wait accepted",
            args.final_msgs
        ));
    }
    if ok(TAG_REQUEST) == 0 && args.secs > 0 {
        failures.push("no request succeeded".into());
    }
    if final_rss > rss_bound {
        failures.push(format!(
            "memory grew from {baseline_rss:.1} MiB to {final_rss:.1} MiB"
        ));
    }
    let elapsed = started.elapsed().as_secs_f64();
    if failures.is_empty() {
        println!(
            "soak ok: {:.1}s, {} calls, {} kills, {} clean-phase messages all delivered",
            elapsed,
            shared.calls.load(Ordering::Relaxed),
            kills.load(Ordering::Relaxed),
            final_accepted
        );
    } else {
        println!("soak FAILED after {elapsed:.1}s: {}", failures.join("; "));
        std::process::exit(1);
    }
}

// ---------------------------------------------------------------------------
// The fault proxy (the same as tests/faults.rs uses).
// ---------------------------------------------------------------------------

// The fault modes other than `Pass` are used by the tests only.
#[allow(dead_code)]
#[path = "../../tests/common/proxy.rs"]
mod proxy;
