//! Fault injection between a live `Client` and `Server` on 127.0.0.1.
//!
//! A small TCP proxy (std threads and sockets, one pump thread per
//! direction per connection) sits between the client and the server and is
//! switched at run time between fault modes: `pass`, `cut` (forward part of
//! the next chunk, then shut both sockets), `delay` (sleep before every
//! chunk), `reset` (SO_LINGER 0 and close: an RST), `stall` (stop
//! forwarding, keep the sockets open) and `blackhole` (a stall that never
//! ends for the connections that saw it).
//!
//! Under each mode, and under a seeded random mix of them, eight threads
//! make requests, sends and queued sends through the proxy, and every call
//! must end in exactly one of: the correct (reversed, never another call's)
//! reply, or a typed error, within its timeouts plus a slack. After the
//! proxy heals, the client's pool must recover on its own.

use rand::{rngs::SmallRng, Rng as _, RngCore, SeedableRng};
use std::collections::BTreeMap;
use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::{Client, Config, Context, Error, Server};

use proxy::{Mode, Proxy};

/// Client timeouts (request, write, dial, handshake).
const TIMEOUT: Duration = Duration::from_millis(500);
/// The longest any one call may take under faults. A call may dial (two
/// connect attempts and a handshake) and then wait for its response, so
/// this is a few timeouts plus slack, not one.
const CALL_BOUND: Duration = Duration::from_secs(3);
const THREADS: usize = 8;
/// Calls per thread during a fault phase (also bounded by `FAULT_PHASE`).
const OPS: usize = 100_000;
const FAULT_PHASE: Duration = Duration::from_millis(1500);
/// Consecutive successful requests the healed client must make...
const HEAL_STREAK: usize = 50;
/// ...within this long after the proxy heals.
const HEAL_WITHIN: Duration = Duration::from_secs(6);

// ---------------------------------------------------------------------------
// The fault proxy.
// ---------------------------------------------------------------------------

#[path = "common/proxy.rs"]
mod proxy;

// ---------------------------------------------------------------------------
// Harness.
// ---------------------------------------------------------------------------

/// Runs `body` on its own thread and fails the test if it does not finish
/// within `secs` seconds (a hung body leaks its thread, the test still ends).
fn within<T: Send + 'static>(secs: u64, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("faults-case".into())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(body)));
        })
        .expect("spawn case body");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("case did not finish within {secs} s"),
    }
}

fn reversed(body: &[u8]) -> Vec<u8> {
    body.iter().rev().copied().collect()
}

fn reverse_handler(ctx: &mut Context<'_>) {
    if ctx.expects_reply() {
        let body = reversed(ctx.body());
        let _ = ctx.reply(&body);
    }
}

fn server_config() -> Config {
    Config::server()
        .workers(2)
        .read_timeout(Some(Duration::from_secs(5)))
        .write_timeout(Some(Duration::from_secs(1)))
        .handshake_timeout(Some(TIMEOUT))
}

fn client_config() -> Config {
    Config::default()
        .workers(2)
        .request_timeout(Some(TIMEOUT))
        .write_timeout(Some(TIMEOUT))
        .dial_timeout(Some(TIMEOUT))
        .handshake_timeout(Some(TIMEOUT))
        .dial_attempts(2)
        .max_conns(4)
}

/// The variant name of an error (of its cause, for a failed dial), for the
/// tallies.
fn kind(e: &Error) -> String {
    match e.root_cause() {
        Error::Timeout(k) => format!("Timeout({k:?})"),
        Error::Handshake(h) => format!("Handshake({h:?})"),
        Error::Io(io) => format!("Io({:?})", io.kind()),
        other => format!("{other:?}"),
    }
}

/// Errors a call may end with when the network, not the peer, misbehaves.
/// The proxy only delays, truncates and closes, never alters bytes, so a
/// frame that fails to authenticate or parse would be a bug.
fn expected_under_faults(e: &Error) -> bool {
    matches!(
        e.root_cause(),
        Error::Timeout(_) | Error::Closed | Error::PeerClosed | Error::Io(_) | Error::Handshake(_)
    )
}

#[derive(Default)]
struct Tally {
    ok: usize,
    errors: BTreeMap<String, usize>,
    /// Calls that broke a rule: wrong reply, unexpected error, too slow.
    violations: Vec<String>,
    slowest: Duration,
    /// Calls over a second, for the log.
    slow: Vec<String>,
}

impl Tally {
    fn merge(&mut self, other: Tally) {
        self.ok += other.ok;
        for (k, n) in other.errors {
            *self.errors.entry(k).or_default() += n;
        }
        self.violations.extend(other.violations);
        self.slowest = self.slowest.max(other.slowest);
        self.slow.extend(other.slow);
    }
}

/// One caller: up to `OPS` calls or until `until`, checking each outcome.
fn caller(client: &Client, t: usize, until: Instant) -> Tally {
    let mut rng = SmallRng::seed_from_u64(0x9e37_79b9_7f4a_7c15 ^ (t as u64 + 1));
    let mut tally = Tally::default();
    let mut response = Vec::new();
    for i in 0..OPS {
        if Instant::now() >= until {
            break;
        }
        // Unique per thread and index; one call in five large enough to
        // span several chunks, so cuts land mid-frame.
        let mut body = format!("t{t}-i{i}:").into_bytes();
        let extra = if rng.random_range(0..5) == 0 {
            rng.random_range(0..48 << 10)
        } else {
            rng.random_range(0..512)
        };
        body.extend((0..extra).map(|_| b'a' + rng.random_range(0..26) as u8));
        let op = rng.random_range(0..10);
        let start = Instant::now();
        let result = match op {
            0 => client.send(&body),
            1 => client.send_no_wait(&body),
            _ => client.request(&body, &mut response),
        };
        let took = start.elapsed();
        tally.slowest = tally.slowest.max(took);
        if took > Duration::from_secs(1) {
            tally
                .slow
                .push(format!("t{t} i{i} op{op} {took:?} {result:?}"));
        }
        if took > CALL_BOUND {
            tally
                .violations
                .push(format!("t{t} i{i} op{op}: took {took:?} ({result:?})"));
        }
        match result {
            Ok(()) => {
                tally.ok += 1;
                if op >= 2 && response != reversed(&body) {
                    tally.violations.push(format!(
                        "t{t} i{i}: wrong reply ({} bytes, starts {:?})",
                        response.len(),
                        String::from_utf8_lossy(&response[..response.len().min(24)])
                    ));
                }
            }
            Err(e) => {
                if !expected_under_faults(&e) {
                    tally
                        .violations
                        .push(format!("t{t} i{i}: unexpected {e:?}"));
                }
                *tally.errors.entry(kind(&e)).or_default() += 1;
            }
        }
    }
    tally
}

/// Eight callers through the proxy for `FAULT_PHASE`, while `drive` sets
/// the proxy's mode (it is called every 10 ms with the time elapsed).
fn storm(client: &Arc<Client>, proxy: &Proxy, mut drive: impl FnMut(&Proxy, Duration)) -> Tally {
    let start = Instant::now();
    let until = start + FAULT_PHASE;
    let callers: Vec<_> = (0..THREADS)
        .map(|t| {
            let client = client.clone();
            thread::spawn(move || caller(&client, t, until))
        })
        .collect();
    while callers.iter().any(|c| !c.is_finished()) {
        drive(proxy, start.elapsed());
        thread::sleep(Duration::from_millis(10));
    }
    let mut tally = Tally::default();
    for c in callers {
        tally.merge(c.join().expect("caller panicked"));
    }
    tally
}

/// After the proxy heals: `HEAL_STREAK` consecutive correct requests
/// within `HEAL_WITHIN`. Returns how long it took.
fn heal(client: &Client) -> Result<Duration, String> {
    let start = Instant::now();
    let mut streak = 0;
    let mut last_error = None;
    let mut response = Vec::new();
    let mut i = 0u64;
    while streak < HEAL_STREAK {
        if start.elapsed() > HEAL_WITHIN {
            return Err(format!(
                "no {HEAL_STREAK} consecutive successes within {HEAL_WITHIN:?} \
                 (streak {streak}, last error {last_error:?}, pool {})",
                client.connections()
            ));
        }
        i += 1;
        let body = format!("heal-{i}");
        match client.request(body.as_bytes(), &mut response) {
            Ok(()) => {
                assert_eq!(response, reversed(body.as_bytes()), "heal request {i}");
                streak += 1;
            }
            Err(e) => {
                last_error = Some(e);
                streak = 0;
            }
        }
    }
    Ok(start.elapsed())
}

/// One whole case: server, proxy, client; a storm under `drive`; heal;
/// orderly teardown within bounds.
fn case(name: &'static str, drive: impl FnMut(&Proxy, Duration) + Send + 'static) {
    within(30, move || {
        let server = Server::bind("127.0.0.1:0", server_config(), reverse_handler).unwrap();
        let proxy = Proxy::start(server.local_addr());
        let client = Arc::new(Client::new(proxy.addr(), client_config()).unwrap());

        let tally = storm(&client, &proxy, drive);
        let stats = proxy.stats();
        eprintln!(
            "[faults] {name}: ok {}, errors {:?}, slowest {:?}; proxy accepted {}, cut {}, reset {}",
            tally.ok,
            tally.errors,
            tally.slowest,
            stats.accepted.load(std::sync::atomic::Ordering::Relaxed),
            stats.cuts.load(std::sync::atomic::Ordering::Relaxed),
            stats.resets.load(std::sync::atomic::Ordering::Relaxed),
        );
        for slow in &tally.slow {
            eprintln!("[faults] {name}: slow call {slow}");
        }
        assert!(
            tally.violations.is_empty(),
            "{name}: {} violations, first: {:#?}",
            tally.violations.len(),
            &tally.violations[..tally.violations.len().min(10)]
        );
        assert!(tally.ok + tally.errors.values().sum::<usize>() > 0);

        proxy.set_mode(Mode::Pass);
        match heal(&client) {
            Ok(took) => eprintln!("[faults] {name}: healed in {took:?}"),
            Err(why) => panic!("{name}: pool did not recover: {why}"),
        }
        let pool = client.connections();
        assert!((1..=4).contains(&pool), "{name}: pool of {pool}");

        let start = Instant::now();
        client.shutdown();
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{name}: client shutdown {took:?}"
        );
        drop(proxy);
        let start = Instant::now();
        server.shutdown();
        let took = start.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{name}: server shutdown {took:?}"
        );
    });
}

// ---------------------------------------------------------------------------
// Cases.
// ---------------------------------------------------------------------------

#[test]
fn pass_everything_succeeds() {
    // The baseline: with no faults, no call fails.
    within(30, || {
        let server = Server::bind("127.0.0.1:0", server_config(), reverse_handler).unwrap();
        let proxy = Proxy::start(server.local_addr());
        let client = Arc::new(Client::new(proxy.addr(), client_config()).unwrap());
        let tally = storm(&client, &proxy, |_, _| {});
        assert!(tally.violations.is_empty(), "{:#?}", tally.violations);
        assert!(
            tally.errors.is_empty(),
            "errors without faults: {:?}",
            tally.errors
        );
        assert!(tally.ok > 0);
        client.shutdown();
    });
}

#[test]
fn cut_mid_frame() {
    // Faults start after a short clean spell, so that calls are in flight
    // on established connections when the cuts land.
    case("cut", |p, t| {
        if t > Duration::from_millis(200) {
            p.set_mode(Mode::Cut)
        }
    });
}

#[test]
fn delay_below_then_above_the_timeout() {
    // A clean spell while the pool fills (so that no call queues behind a
    // chain of dials: see the ignored test below), then 100 ms per chunk
    // (slow calls, most succeed), then 700 ms per chunk: every request on
    // the pool times out.
    case("delay", |p, t| {
        if t > Duration::from_millis(700) {
            p.set_mode(Mode::Delay(700));
        } else if t > Duration::from_millis(200) {
            p.set_mode(Mode::Delay(100));
        }
    });
}

#[test]
fn reset() {
    case("reset", |p, t| {
        if t > Duration::from_millis(200) {
            p.set_mode(Mode::Reset)
        }
    });
}

#[test]
fn stall() {
    case("stall", |p, t| {
        if t > Duration::from_millis(200) {
            p.set_mode(Mode::Stall)
        }
    });
}

#[test]
fn random_mix() {
    let mut rng = SmallRng::seed_from_u64(0x5eed_f00d);
    let mut next_change = Duration::ZERO;
    case("mix", move |p, t| {
        if t < next_change {
            return;
        }
        next_change = t + Duration::from_millis(50 + rng.random_range(0..150));
        let mode = match rng.random_range(0..6) {
            0 | 1 => Mode::Pass,
            2 => Mode::Cut,
            3 => Mode::Delay(rng.random_range(0..800)),
            4 => Mode::Reset,
            _ => Mode::Stall,
        };
        p.set_mode(mode);
    });
}

/// Connections that went silent for good (a peer that vanished without a
/// FIN or RST, a dropped NAT mapping) while the client's read timeout is
/// off, its default. Requests on them time out; new connections would
/// work. The pool must stop picking the dead ones.
#[test]
fn blackholed_connections_leave_the_pool() {
    case("blackhole", |p, t| {
        if t > Duration::from_millis(200) {
            p.set_mode(Mode::Blackhole)
        }
    });
}

/// Live connections killed one at a time (a cut mid-chunk or an RST), every
/// 10 ms, while traffic flows: no call hangs and no reply reaches another
/// call (the bodies are unique).
#[test]
fn cuts_never_cross_wire_replies() {
    let seen = Arc::new(Mutex::new(0usize));
    let s = seen.clone();
    let mut rng = SmallRng::seed_from_u64(42);
    case("cross-wire", move |p, _| {
        // Kill one live connection mid-chunk every tick or so.
        if p.kill_one(rng.next_u64(), rng.random_range(0..2) == 0) {
            *s.lock().unwrap() += 1;
        }
    });
    assert!(*seen.lock().unwrap() > 0, "no connection was killed");
}

/// Eight callers make their first call at once on a fresh client while the
/// endpoint accepts TCP but never answers the handshake. Each call should
/// end within its own timeouts (two connects and one handshake, at most
/// 1.5 s here), not queue behind every other caller's failing dial.
#[test]
fn concurrent_first_calls_do_not_queue_behind_each_others_dials() {
    within(30, || {
        let server = Server::bind("127.0.0.1:0", server_config(), reverse_handler).unwrap();
        let proxy = Proxy::start(server.local_addr());
        proxy.set_mode(Mode::Stall);
        let client = Arc::new(Client::new(proxy.addr(), client_config()).unwrap());
        let callers: Vec<_> = (0..THREADS)
            .map(|t| {
                let client = client.clone();
                thread::spawn(move || {
                    let start = Instant::now();
                    let mut response = Vec::new();
                    let result = client.request(format!("first-{t}").as_bytes(), &mut response);
                    (start.elapsed(), result)
                })
            })
            .collect();
        let outcomes: Vec<_> = callers.into_iter().map(|c| c.join().unwrap()).collect();
        eprintln!("[faults] first calls: {outcomes:?}");
        for (took, result) in &outcomes {
            assert!(
                matches!(result, Err(e) if expected_under_faults(e)),
                "{result:?}"
            );
            assert!(
                *took < Duration::from_millis(2000),
                "a first call took {took:?}: {outcomes:?}"
            );
        }
        proxy.set_mode(Mode::Pass);
        heal(&client).expect("heal");
    });
}

/// A caller queued behind another caller's dial gives up at its own
/// deadline: against a listener that never answers the handshake (2 s
/// handshake timeout), a second concurrent request with a 300 ms timeout
/// returns long before the first caller's dial ends.
#[test]
fn a_caller_waiting_for_a_dial_keeps_its_own_deadline() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let held = std::thread::spawn(move || {
        // Accept and hold the sockets, saying nothing.
        let mut socks = Vec::new();
        for s in listener.incoming().take(1) {
            socks.push(s.unwrap());
        }
        std::thread::sleep(Duration::from_secs(3));
    });
    let client = Arc::new(
        Client::new(
            addr,
            Config::default()
                .handshake_timeout(Some(Duration::from_secs(2)))
                .dial_attempts(1)
                .max_conns(1),
        )
        .unwrap(),
    );
    let first = {
        let client = client.clone();
        std::thread::spawn(move || {
            let mut resp = Vec::new();
            client.request_timeout(b"first", &mut resp, Some(Duration::from_secs(5)))
        })
    };
    std::thread::sleep(Duration::from_millis(100)); // the first is dialling
    let start = Instant::now();
    let mut resp = Vec::new();
    let second = client.request_timeout(b"second", &mut resp, Some(Duration::from_millis(300)));
    let took = start.elapsed();
    // Its own deadline, reported as a request's, while it waited.
    assert!(
        matches!(
            &second,
            Err(e @ Error::Dial { phase: monte_rpc::DialPhase::Queued, .. })
                if e.timeout_kind() == Some(monte_rpc::TimeoutKind::Request)
        ),
        "second: {second:?}"
    );
    assert!(took < Duration::from_millis(1000), "second waited {took:?}");
    let first = first.join().unwrap();
    assert!(
        matches!(
            first.as_ref().map_err(Error::root_cause),
            Err(Error::Timeout(monte_rpc::TimeoutKind::Handshake))
        ),
        "first: {first:?}"
    );
    client.shutdown();
    held.join().unwrap();
}
