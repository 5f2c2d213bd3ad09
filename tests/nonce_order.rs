//! Nonce order equals wire order: many threads sending at once on a single
//! connection. A frame sealed with counter n that reached the wire at any
//! other position would fail to open at the server and close the
//! connection, so every message arriving, with no connection closed, proves
//! the order held.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monte_rpc::{Client, Config, Connection, Context, Error, Handler, Server};

struct Counter {
    messages: AtomicUsize,
    closes: Mutex<Vec<String>>,
}

struct Shared(Arc<Counter>);

impl Handler for Shared {
    fn on_message(&self, ctx: &mut Context<'_>) {
        self.0.messages.fetch_add(1, Ordering::Relaxed);
        if ctx.expects_reply() {
            let _ = ctx.reply(ctx.body());
        }
    }
    fn on_close(&self, _conn: &Connection, reason: &Error) {
        self.0.closes.lock().unwrap().push(reason.to_string());
    }
}

/// 8 threads × 2,000 mixed sends, queued sends and requests share one
/// connection; every one arrives and the connection never fails.
#[test]
fn concurrent_senders_keep_nonce_order_on_one_connection() {
    const THREADS: usize = 8;
    const EACH: usize = 2_000;
    let counter = Arc::new(Counter {
        messages: AtomicUsize::new(0),
        closes: Mutex::new(Vec::new()),
    });
    let server = Server::bind("127.0.0.1:0", Config::server(), Shared(counter.clone())).unwrap();
    let client = Client::new(
        server.local_addr(),
        Config::default()
            .max_conns(1)
            .request_timeout(Some(Duration::from_secs(10))),
    )
    .unwrap();
    std::thread::scope(|s| {
        for t in 0..THREADS {
            let client = &client;
            s.spawn(move || {
                let body = vec![t as u8; 100 + t * 37];
                let mut resp = Vec::new();
                for i in 0..EACH {
                    match i % 3 {
                        0 => client.send(&body).unwrap(),
                        1 => client.send_no_wait(&body).unwrap(),
                        _ => {
                            client.request(&body, &mut resp).unwrap();
                            assert_eq!(resp, body);
                        }
                    }
                }
            });
        }
    });
    assert_eq!(client.connections(), 1);
    let deadline = Instant::now() + Duration::from_secs(20);
    while counter.messages.load(Ordering::Relaxed) < THREADS * EACH {
        assert!(Instant::now() < deadline, "messages lost");
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(
        counter.closes.lock().unwrap().is_empty(),
        "connection failed: {:?}",
        counter.closes.lock().unwrap()
    );
    client.shutdown();
    server.shutdown();
}
