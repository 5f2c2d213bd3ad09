//! Dialling: dial errors name the address and the phase.
//!
//! The endpoints are loopback listeners that misbehave on purpose. Every
//! call runs under [`common::within`], so a regression fails the test
//! instead of hanging it.

mod common;

use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;

use common::within;
use monte_rpc::{Client, Config, DialPhase, Error};

/// The settings these tests dial with: the defaults for everything about
/// dialling (5 s connect timeout, 3 attempts, 5 s handshake timeout).
fn config() -> Config {
    Config::default().workers(1)
}

/// A listener that accepts every connection and closes it at once, and
/// counts them: each one is one dial by the client.
fn hang_up_server() -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    thread::spawn(move || {
        for stream in listener.incoming() {
            match stream {
                Ok(s) => {
                    count.fetch_add(1, Ordering::SeqCst);
                    drop(s);
                }
                Err(_) => return,
            }
        }
    });
    (addr, accepted)
}

#[test]
fn a_refused_dial_names_the_address_and_the_phase() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let client = Client::new(addr, config().dial_attempts(1)).unwrap();
    let e = within(5, move || {
        client.send(b"hello").expect_err("nothing listens")
    });
    let text = e.to_string();
    // "dialling 127.0.0.1:PORT: connect: Connection refused (os error 111)"
    assert!(
        text.starts_with(&format!("dialling {addr}: connect: ")),
        "{text}"
    );
    assert!(!text.contains("i/o error"), "{text}");
    assert!(
        matches!(
            &e,
            Error::Dial { addr: a, phase: DialPhase::Connect, .. } if *a == addr
        ),
        "{e:?}"
    );
    assert!(matches!(e.root_cause(), Error::Io(_)), "{e:?}");
    assert_eq!(e.io_kind(), std::io::ErrorKind::ConnectionRefused, "{e:?}");
    // The cause is chained for `std::error::Error` reporters too.
    let source = std::error::Error::source(&e).expect("a source");
    assert!(source.to_string().contains("refused"), "{source}");
}

#[test]
fn a_failed_handshake_names_the_address_and_the_phase() {
    let (addr, accepted) = hang_up_server();
    let client = Client::new(addr, config().dial_attempts(1)).unwrap();
    let (e, stats) = within(5, move || {
        let e = client.send(b"hello").expect_err("the peer hung up");
        (e, client.stats())
    });
    let text = e.to_string();
    // "dialling 127.0.0.1:PORT: handshake: peer closed during the handshake"
    // (or the reset the peer's close may turn into).
    assert!(
        text.starts_with(&format!("dialling {addr}: handshake: ")),
        "{text}"
    );
    assert!(
        matches!(
            e,
            Error::Dial {
                phase: DialPhase::Handshake,
                ..
            }
        ),
        "{e:?}"
    );
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    assert_eq!(stats.handshakes_failed, 1);
}
