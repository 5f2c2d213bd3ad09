//! The counters behind `Server::stats` and `Client::stats` add up to what
//! actually happened.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use monte_rpc::protocol::{ClientHandshake, Handshake, Profile};
use monte_rpc::{Client, Config, Context, Error, Server, Stats, TimeoutKind, Waiting};

fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Requests, sends and a timed-out request are counted on both sides.
#[test]
fn traffic_is_counted_on_both_sides() {
    let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
        if ctx.body() == b"ignore me" {
            return;
        }
        let _ = ctx.reply(ctx.body());
    })
    .unwrap();
    let client = Client::new(
        server.local_addr(),
        Config::default()
            .max_conns(1)
            .request_timeout(Some(Duration::from_millis(100))),
    )
    .unwrap();
    let mut resp = Vec::new();
    for _ in 0..10 {
        client.request(b"hello", &mut resp).unwrap();
    }
    for _ in 0..5 {
        client.send(b"one-way").unwrap();
    }
    let c = client.stats();
    assert_eq!(c.frames_out, 15);
    assert_eq!(c.frames_in, 10);
    assert_eq!(c.requests_in_flight, 0);
    assert_eq!(c.connections_open, 1);
    assert_eq!(c.connections_opened, 1);
    eventually("the server to count every frame", || {
        server.stats().frames_in == 15
    });
    let s: Stats = server.stats();
    assert_eq!(s.frames_out, 10);
    assert_eq!(s.bytes_in, c.bytes_out);
    assert_eq!(s.connections_open, 1);

    // A request the server never answers: it times out, and since not a
    // byte came back meanwhile, the client drops that silent connection.
    assert!(matches!(
        client
            .request(b"ignore me", &mut resp)
            .as_ref()
            .map_err(Error::root_cause),
        Err(Error::Timeout(TimeoutKind::Request))
    ));
    eventually("the client to drop the silent connection", || {
        client.stats().connections_open == 0
    });
    let c = client.stats();
    assert_eq!(c.requests_timed_out, 1);
    assert_eq!(c.closed_other, 1);
    eventually("the server to see the close", || {
        server.stats().closed_by_peer == 1
    });
    assert_eq!(server.stats().connections_open, 0);
    client.shutdown();
    server.shutdown();
}

/// A peer that fails its handshake, one that sends a forged frame, and one
/// refused at the cap are each counted under their reason.
#[test]
fn failures_are_counted_by_reason() {
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server()
            .max_conns(1)
            .accept_wait(Duration::from_millis(100))
            .handshake_timeout(Some(Duration::from_millis(300))),
        |_: &mut Context<'_>| {},
    )
    .unwrap();
    let addr = server.local_addr();

    // A low-order key fails the handshake.
    let mut zero = TcpStream::connect(addr).unwrap();
    zero.write_all(&[0u8; 32]).unwrap();
    eventually("the failed handshake", || {
        server.stats().handshakes_failed == 1
    });

    // A completed handshake followed by a frame with a broken tag.
    let mut raw = TcpStream::connect(addr).unwrap();
    let mut hs = ClientHandshake::new(Profile::Secure).unwrap();
    let mut out = Vec::new();
    hs.write_output(&mut out);
    raw.write_all(&out).unwrap();
    let mut key = [0u8; 32];
    raw.read_exact(&mut key).unwrap();
    hs.read_input(&key).unwrap();
    let mut session = hs.take_session().unwrap();
    let mut frame = Vec::new();
    session
        .sealer
        .seal_append(0, b"forged", &mut frame)
        .unwrap();
    *frame.last_mut().unwrap() ^= 1;
    // The cap is 1: while this connection is open, a third waits.
    let waiting = TcpStream::connect(addr).unwrap();
    eventually("the waiting connection to be refused", || {
        server.stats().connections_refused == 1
    });
    drop(waiting);
    raw.write_all(&frame).unwrap();
    eventually("the rejected frame", || {
        server.stats().frames_rejected_authentication == 1
    });
    let s = server.stats();
    assert_eq!(s.closed_protocol_error, 2, "{s:?}");
    server.shutdown();
}

/// The fields a `Stats` has, read from its `Debug` output (which derive
/// writes from the struct itself): `(name, value)` in declaration order.
fn debug_fields(stats: &Stats) -> Vec<(String, u64)> {
    let debug = format!("{stats:?}");
    let inner = debug
        .strip_prefix("Stats { ")
        .and_then(|d| d.strip_suffix(" }"))
        .unwrap_or_else(|| panic!("unexpected Debug output: {debug}"));
    inner
        .split(", ")
        .map(|pair| {
            let (name, value) = pair.split_once(": ").expect("name: value");
            (name.to_string(), value.parse().expect("a u64"))
        })
        .collect()
}

/// A snapshot whose fields hold distinct values, so that a name paired
/// with another field's value would show.
fn distinct_stats() -> Stats {
    let mut s = Stats::default();
    s.connections_open = 1;
    s.connections_opened = 2;
    s.connections_refused = 3;
    s.closed_local = 4;
    s.closed_by_peer = 5;
    s.closed_handshake_timeout = 6;
    s.closed_read_timeout = 7;
    s.closed_write_timeout = 8;
    s.closed_frame_timeout = 9;
    s.closed_protocol_error = 10;
    s.closed_other = 11;
    s.handshakes_failed = 12;
    s.frames_in = 13;
    s.bytes_in = 14;
    s.frames_out = 15;
    s.bytes_out = 16;
    s.frames_rejected_too_short = 17;
    s.frames_rejected_too_large = 18;
    s.frames_rejected_authentication = 19;
    s.responses_dropped = 20;
    s.requests_in_flight = 21;
    s.requests_timed_out = 22;
    s.connections_waiting = 23;
    s.reads_paused = 24;
    s.reactor_wakeups = u64::MAX;
    s
}

/// `fields()` lists every field of the struct once, under its own name, with
/// its own value, in declaration order: a field added to the struct but not
/// to the list (or the other way) fails here.
#[test]
fn fields_list_every_field_once_with_its_value() {
    let stats = distinct_stats();
    let listed: Vec<(String, u64)> = stats
        .fields()
        .map(|(name, value)| (name.to_string(), value))
        .collect();
    assert_eq!(listed, debug_fields(&stats));
    assert_eq!(stats.fields().len(), listed.len());
    let mut names: Vec<&str> = stats.fields().map(|(name, _)| name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), listed.len(), "a name appears twice");
    // The two gauges the export docs name are fields.
    for gauge in ["connections_open", "requests_in_flight"] {
        assert!(names.contains(&gauge), "{gauge}");
    }
}

/// `Display` is one line of `name=value` pairs, every field once, in the
/// order of `fields()`.
#[test]
fn display_is_one_line_of_name_value_pairs() {
    let stats = distinct_stats();
    let line = stats.to_string();
    assert!(!line.contains('\n'), "{line}");
    assert!(
        line.starts_with("connections_open=1 connections_opened=2 "),
        "{line}"
    );
    assert!(
        line.ends_with(&format!(" reactor_wakeups={}", u64::MAX)),
        "{line}"
    );
    let pairs: Vec<(String, u64)> = line
        .split(' ')
        .map(|pair| {
            let (name, value) = pair.split_once('=').expect("name=value");
            (name.to_string(), value.parse().expect("a u64"))
        })
        .collect();
    assert_eq!(pairs, debug_fields(&stats));
    assert_eq!(
        Stats::default().to_string(),
        Stats::default()
            .fields()
            .map(|(name, _)| format!("{name}=0"))
            .collect::<Vec<_>>()
            .join(" ")
    );
}

/// `reactor_wakeups` counts the reactor's wake-ups for bytes or commands,
/// and a caller blocked in `request` reads its own response: its reactor
/// hears nothing of it, even on one core, where the server's reply is
/// written (and would wake a listening reactor) before the caller's own
/// write has returned.
#[test]
fn blocking_requests_do_not_wake_the_client_reactor() {
    const REQUESTS: u64 = 300;
    common::confine_to_one_core();
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server().waiting(Waiting::Block),
        |ctx: &mut Context<'_>| {
            let _ = ctx.reply(b"");
        },
    )
    .unwrap();
    let client = Client::new(
        server.local_addr(),
        Config::default().max_conns(1).waiting(Waiting::Block),
    )
    .unwrap();
    let mut resp = Vec::new();
    // The dial and handshake wake the reactor; they are not counted below.
    client.request(b"first", &mut resp).unwrap();
    let (client_before, server_before) = (client.stats(), server.stats());
    for _ in 0..REQUESTS {
        client.request(b"ping", &mut resp).unwrap();
    }
    let client_woken = client.stats().reactor_wakeups - client_before.reactor_wakeups;
    let server_woken = server.stats().reactor_wakeups - server_before.reactor_wakeups;
    // The server's reactor reads every request: it sleeps between them.
    assert!(
        server_woken >= REQUESTS / 2,
        "the server's reactor was woken {server_woken} times for {REQUESTS} requests"
    );
    // A stray timer or scheduling quirk may wake the client's reactor now
    // and then; a reactor that heard of every response, once per request.
    assert!(
        client_woken <= REQUESTS / 20,
        "the client's reactor was woken {client_woken} times for {REQUESTS} requests"
    );
}

/// A reactor woken only for its sweep (every 5 ms here: timeouts of 40 ms
/// make the tick that short) counts no wake-ups: `reactor_wakeups` is for
/// readiness and commands.
#[test]
fn sweeps_are_not_counted_as_wakeups() {
    let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
        let _ = ctx.reply(b"");
    })
    .unwrap();
    let config = Config::default()
        .max_conns(1)
        .handshake_timeout(Some(Duration::from_millis(40)));
    let client = Client::new(server.local_addr(), config).unwrap();
    let mut resp = Vec::new();
    client.request(b"first", &mut resp).unwrap();
    // Let the wake-ups the request itself may cause settle.
    std::thread::sleep(Duration::from_millis(50));
    let before = client.stats().reactor_wakeups;
    // About 60 sweeps.
    std::thread::sleep(Duration::from_millis(300));
    let woken = client.stats().reactor_wakeups - before;
    assert!(
        woken <= 5,
        "an idle client's reactor counted {woken} wake-ups in 300 ms"
    );
}

/// The root cause of a call's result, for matching.
fn root<T>(result: &Result<T, Error>) -> Option<&Error> {
    result.as_ref().err().map(Error::root_cause)
}

/// `requests_timed_out` counts every request that ran out of its own
/// time, once, wherever its time ran out, blocking or async alike: while
/// it waited for room in its connection's full queue, and while it waited
/// for the dial of a connection to an endpoint that never finishes its
/// handshake.
#[test]
fn every_request_that_runs_out_of_time_is_counted_once() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    // A peer that never reads (the client's queue fills) but keeps
    // talking (a message every 20 ms): the connection is never silent,
    // so a timed-out request does not close it.
    let stop = Arc::new(AtomicBool::new(false));
    let (addr, peer) = {
        let stop = stop.clone();
        common::raw_server_with_session(move |mut stream, mut session| {
            let mut frame = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                frame.clear();
                session
                    .sealer
                    .seal_append(0, b"still here", &mut frame)
                    .unwrap();
                if stream.write_all(&frame).is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    };
    let client = Client::new(
        addr,
        Config::default()
            .max_conns(1)
            .max_queued_bytes(64 << 10)
            .send_buffer_size(Some(16 << 10))
            .send_timeout(Some(Duration::from_millis(300)))
            .request_timeout(Some(Duration::from_millis(100))),
    )
    .unwrap();
    // Fill the kernel's buffers and the queue, to less than 1 KiB of room.
    for size in [32 << 10, 1 << 10] {
        let chunk = vec![0u8; size];
        assert!(
            (0..400).any(|_| client.send_no_wait(&chunk).is_err()),
            "the queue never filled with {size}-byte messages"
        );
    }
    let mut resp = Vec::new();
    let blocking = client.request(&[7u8; 2048], &mut resp);
    timed_out(
        &client,
        blocking,
        1,
        "a blocking request that timed out waiting for room",
    );
    let asynchronous = futures::executor::block_on(client.request_async(&[7u8; 2048], &mut resp));
    timed_out(
        &client,
        asynchronous,
        2,
        "an async request that timed out waiting for room",
    );
    // Both waited for room on the one connection the client dialled.
    assert_eq!(client.stats().connections_opened, 1);
    stop.store(true, Ordering::SeqCst);
    client.shutdown();
    peer.join().unwrap();

    // An endpoint that accepts and never answers the handshake.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::new(
        silent.local_addr().unwrap(),
        Config::default()
            .max_conns(1)
            .handshake_timeout(Some(Duration::from_secs(5)))
            .request_timeout(Some(Duration::from_millis(100)))
            // The held-back call below, however late it comes.
            .dial_backoff(Duration::from_secs(10)),
    )
    .unwrap();
    let blocking = client.request(b"hello", &mut resp);
    timed_out(
        &client,
        blocking,
        1,
        "a blocking request that timed out in its dial",
    );
    // Held back by that dial's failure (cut short after 100 ms): it fails
    // at once with that error, not having run out of its own time.
    let held_back = client.request(b"hello", &mut resp);
    timed_out(
        &client,
        held_back,
        1,
        "a request held back by another's cut-short dial",
    );
    let asynchronous = futures::executor::block_on(client.request_async(b"hello", &mut resp));
    timed_out(
        &client,
        asynchronous,
        2,
        "an async request that timed out waiting for a dial",
    );
    client.shutdown();
}

/// Checks that a request failed with a request timeout and that
/// `client` has counted `counted` timed-out requests since it started.
fn timed_out(client: &Client, result: Result<(), Error>, counted: u64, what: &str) {
    assert!(
        matches!(root(&result), Some(Error::Timeout(TimeoutKind::Request))),
        "{what}: {result:?}"
    );
    assert_eq!(client.stats().requests_timed_out, counted, "{what}");
}
