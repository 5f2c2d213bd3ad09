//! The write-side timeouts each mean one thing: `send_timeout` bounds how
//! long one call waits (and fails that call only), `write_timeout` closes a
//! connection whose output makes no progress. Tested against a raw peer
//! that completes the handshake and then never reads. And on the read
//! side, a peer that trickles a response cannot hold a waiting caller past
//! the frame timeout.

use std::io::{Read, Write};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::{Client, Config, Error, TimeoutKind};

mod common;

/// Accepts one connection, runs the server side of the handshake by hand,
/// then holds the socket without reading it until `hold` passes.
fn silent_server(hold: Duration) -> (std::net::SocketAddr, thread::JoinHandle<()>) {
    common::raw_server(move |stream| {
        thread::sleep(hold);
        drop(stream);
    })
}

/// Floods the client's only connection with `send_no_wait` until a call
/// fails; returns that error and when it came.
fn flood(client: &Client) -> (Error, Duration) {
    let body = vec![0x33; 64 << 10];
    let start = Instant::now();
    loop {
        if let Err(e) = client.send_no_wait(&body) {
            return (e, start.elapsed());
        }
        assert!(start.elapsed() < Duration::from_secs(10), "no call failed");
    }
}

#[test]
fn send_timeout_fails_the_call_and_leaves_the_connection_open() {
    let (addr, server) = silent_server(Duration::from_secs(3));
    let config = Config::default()
        .max_conns(1)
        .write_timeout(None)
        .send_timeout(Some(Duration::from_millis(300)));
    let client = Client::new(addr, config).unwrap();
    let (err, took) = flood(&client);
    assert!(
        matches!(err.root_cause(), Error::Timeout(TimeoutKind::Write)),
        "the full queue gave {err:?}"
    );
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_secs(2),
        "failed after {took:?}"
    );
    // The call failed, not the connection: nothing closed it.
    assert_eq!(client.stats().closed_write_timeout, 0);
    assert_eq!(client.stats().connections_open, 1);
    // A second call waits its own send timeout again.
    let start = Instant::now();
    let err = client.send_no_wait(&[0; 64 << 10]).unwrap_err();
    assert!(
        matches!(err.root_cause(), Error::Timeout(TimeoutKind::Write)),
        "{err:?}"
    );
    assert!(start.elapsed() >= Duration::from_millis(250));
    client.shutdown();
    server.join().unwrap();
}

#[test]
fn write_timeout_closes_a_connection_whose_output_is_stuck() {
    let (addr, server) = silent_server(Duration::from_secs(3));
    let config = Config::default()
        .max_conns(1)
        .write_timeout(Some(Duration::from_millis(300)))
        .send_timeout(None);
    let client = Client::new(addr, config).unwrap();
    // With no send timeout, the call waits until the connection itself is
    // closed at the write timeout.
    let (err, took) = flood(&client);
    assert!(
        matches!(err.root_cause(), Error::Timeout(TimeoutKind::Write)),
        "the stuck connection gave {err:?}"
    );
    assert!(took < Duration::from_secs(3), "failed after {took:?}");
    let closed = (0..100).any(|_| {
        thread::sleep(Duration::from_millis(20));
        client.stats().closed_write_timeout == 1
    });
    assert!(
        closed,
        "the connection was not closed: {:?}",
        client.stats()
    );
    client.shutdown();
    server.join().unwrap();
}

/// A server that answers with a frame it never finishes, a byte every 10
/// ms: each byte resets the read timeout, so only the frame timeout (judged
/// from the frame's first byte) can end it. A caller waiting for that
/// response sleeps in the socket's `recv`, woken by every byte; it must
/// fail at the frame timeout, not hold on until its own request timeout.
#[test]
fn a_trickled_response_fails_the_waiting_request_at_the_frame_timeout() {
    let (addr, server) = common::raw_server(|mut stream| {
        // The request (whatever it is), then a frame of 100 bytes whose
        // length prefix and first bytes come, and the rest never does.
        let mut request = [0u8; 256];
        assert!(stream.read(&mut request).unwrap() > 0);
        stream.write_all(&100u32.to_be_bytes()).unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if stream.write_all(&[0x5a]).is_err() {
                return; // the client closed the connection
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let config = Config::default()
        .workers(1)
        .waiting(monte_rpc::Waiting::Block)
        .read_timeout(Some(Duration::from_millis(300)))
        .request_timeout(Some(Duration::from_secs(10)));
    let client = Client::new(addr, config).unwrap();
    let started = Instant::now();
    let error = client
        .request(b"ping", &mut Vec::new())
        .expect_err("a response that never completes completed");
    let waited = started.elapsed();
    assert_eq!(error.timeout_kind(), Some(TimeoutKind::Frame), "{error:?}");
    assert!(
        waited < Duration::from_secs(2),
        "the request failed only after {waited:?}: {error}"
    );
    drop(client);
    server.join().unwrap();
}
