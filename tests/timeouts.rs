//! The write-side timeouts each mean one thing: `send_timeout` bounds how
//! long one call waits (and fails that call only), `write_timeout` closes a
//! connection whose output makes no progress. Tested against a raw peer
//! that completes the handshake and then never reads.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::protocol::{Handshake, Profile, ServerHandshake};
use monte_rpc::{Client, Config, Error, TimeoutKind};

/// Accepts one connection, runs the server side of the handshake by hand,
/// then holds the socket without reading it until `hold` passes.
fn silent_server(hold: Duration) -> (std::net::SocketAddr, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let mut hs = ServerHandshake::new(Profile::Secure).unwrap();
        let mut input = Vec::new();
        let mut chunk = [0u8; 64];
        while input.len() < 32 {
            let n = stream.read(&mut chunk).unwrap();
            assert!(n > 0, "client went away during the handshake");
            input.extend_from_slice(&chunk[..n]);
        }
        let used = hs.read_input(&input).unwrap();
        assert_eq!(used, 32);
        let mut out = Vec::new();
        hs.write_output(&mut out);
        stream.write_all(&out).unwrap();
        assert!(hs.take_session().is_some());
        thread::sleep(hold);
        drop::<TcpStream>(stream);
    });
    (addr, server)
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
