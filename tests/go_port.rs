//! Ports of the Go library's own tests (client handshake timeout, parallel
//! sends and requests, server shutdown), loopback only and bounded in time.

mod common;
use common::{client_config, server_config, within};

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::{Client, Context, Error, Server, TimeoutKind};

fn reverse_server() -> Server {
    Server::bind("127.0.0.1:0", server_config(), |ctx: &mut Context<'_>| {
        let mut body = ctx.body().to_vec();
        body.reverse();
        let _ = ctx.reply(&body);
    })
    .expect("bind server")
}

// Go's TestClientHandshakeTimeout: a peer that accepts but never speaks makes
// the client's handshake time out promptly.
#[test]
fn client_handshake_timeout() {
    within(10, || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let acceptor = thread::spawn(move || {
            // Accept and hold the socket open, saying nothing.
            let (stream, _) = listener.accept().unwrap();
            let _ = stop_rx.recv_timeout(Duration::from_secs(5));
            drop(stream);
        });
        let client = Client::new(
            addr,
            client_config()
                .handshake_timeout(Some(Duration::from_millis(200)))
                .dial_attempts(1),
        )
        .unwrap();
        let start = Instant::now();
        let mut resp = Vec::new();
        let result = client.request(b"hello", &mut resp);
        let elapsed = start.elapsed();
        assert!(
            matches!(
                result.as_ref().map_err(Error::root_cause),
                Err(Error::Timeout(TimeoutKind::Handshake))
            ),
            "got {result:?}"
        );
        assert!(elapsed < Duration::from_secs(2), "took {elapsed:?}");
        assert!(elapsed >= Duration::from_millis(150), "took {elapsed:?}");
        client.shutdown();
        let _ = stop_tx.send(());
        acceptor.join().unwrap();
    });
}

// Go's TestSend: 4 goroutines x 1024 sends, all counted by the server.
#[test]
fn parallel_sends_are_all_counted() {
    within(30, || {
        let count = Arc::new(AtomicUsize::new(0));
        let seen = count.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            server_config(),
            move |ctx: &mut Context<'_>| {
                if !ctx.expects_reply() && ctx.body().starts_with(b"send") {
                    seen.fetch_add(1, Ordering::SeqCst);
                }
            },
        )
        .unwrap();
        let client = Arc::new(Client::new(server.local_addr(), client_config()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let client = client.clone();
                thread::spawn(move || {
                    for i in 0..1024 {
                        client
                            .send(format!("send-{t}-{i}").as_bytes())
                            .expect("send");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while count.load(Ordering::SeqCst) < 4096 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(count.load(Ordering::SeqCst), 4096);
        client.shutdown();
        server.shutdown();
        assert_eq!(count.load(Ordering::SeqCst), 4096, "no extra messages");
    });
}

// Go's TestRequest: 4 goroutines x 1024 requests, each reply checked.
#[test]
fn parallel_requests_get_their_own_replies() {
    within(30, || {
        let server = reverse_server();
        let client = Arc::new(Client::new(server.local_addr(), client_config()).unwrap());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let client = client.clone();
                thread::spawn(move || {
                    let mut resp = Vec::new();
                    for i in 0..1024 {
                        let body = format!("request-{t}-{i}");
                        client.request(body.as_bytes(), &mut resp).expect("request");
                        let mut want = body.into_bytes();
                        want.reverse();
                        assert_eq!(resp, want, "thread {t} request {i}");
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        client.shutdown();
        server.shutdown();
    });
}

// Go's TestServerShutdown: shutting down a server with no connections
// returns promptly.
#[test]
fn server_shutdown_without_connections() {
    within(10, || {
        let server = reverse_server();
        let start = Instant::now();
        server.shutdown();
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "{:?}",
            start.elapsed()
        );
        // A second shutdown (and the drop after it) is harmless.
        server.shutdown();
    });
}
