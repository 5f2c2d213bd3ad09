//! The counters behind `Server::stats` and `Client::stats` add up to what
//! actually happened.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use monte_rpc::protocol::{ClientHandshake, Handshake, Profile};
use monte_rpc::{Client, Config, Context, Error, Server, Stats, TimeoutKind};

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
        client.request(b"ignore me", &mut resp),
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
