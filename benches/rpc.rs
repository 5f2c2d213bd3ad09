//! Criterion versions of the Go library's six benchmarks, plus the
//! handshake: loopback, 1400-byte payloads, a server that replies to
//! requests with an empty body. `examples/tools/bench.rs` prints the same
//! six in the Go tool's format; this gives criterion's statistics and
//! reports.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use monte_rpc::{Client, Config, Context, Server};

const SIZE: usize = 1400;

struct Fixture {
    server: Server,
    client: Client,
    seen: Arc<AtomicU64>,
    sent: AtomicU64,
    payload: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server(),
            move |ctx: &mut Context<'_>| {
                if ctx.expects_reply() {
                    let _ = ctx.reply(b"");
                } else {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .expect("bind");
        let client = Client::new(server.local_addr(), Config::default()).expect("client");
        let payload = (0..SIZE).map(|i| (i * 31 % 251) as u8).collect();
        Fixture {
            server,
            client,
            seen,
            sent: AtomicU64::new(0),
            payload,
        }
    }

    /// Waits until the server has counted every one-way message sent, so
    /// queued sends are inside the measurement.
    fn drain(&self) {
        let target = self.sent.load(Ordering::Relaxed);
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.seen.load(Ordering::Relaxed) < target {
            assert!(
                Instant::now() < deadline,
                "server did not receive every message"
            );
            std::hint::spin_loop();
        }
    }

    fn op(&self, kind: Op, response: &mut Vec<u8>) {
        match kind {
            Op::Send => {
                self.client.send(&self.payload).unwrap();
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Op::SendNoWait => {
                self.client.send_no_wait(&self.payload).unwrap();
                self.sent.fetch_add(1, Ordering::Relaxed);
            }
            Op::Request => self.client.request(&self.payload, response).unwrap(),
        }
    }

    fn run(&self, kind: Op, threads: usize, iters: u64) -> Duration {
        let start = Instant::now();
        if threads == 1 {
            let mut response = Vec::new();
            for _ in 0..iters {
                self.op(kind, &mut response);
            }
        } else {
            std::thread::scope(|s| {
                for t in 0..threads as u64 {
                    let share = iters / threads as u64 + u64::from(t < iters % threads as u64);
                    s.spawn(move || {
                        let mut response = Vec::new();
                        for _ in 0..share {
                            self.op(kind, &mut response);
                        }
                    });
                }
            });
        }
        self.drain();
        start.elapsed()
    }
}

#[derive(Clone, Copy)]
enum Op {
    Send,
    SendNoWait,
    Request,
}

fn rpc(c: &mut Criterion) {
    let fixture = Fixture::new();
    let parallel = std::thread::available_parallelism().map_or(2, |n| n.get()) * 4;
    let mut group = c.benchmark_group("rpc");
    group
        .throughput(Throughput::Bytes(SIZE as u64))
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    for (name, kind, threads) in [
        ("Send", Op::Send, 1),
        ("SendNoWait", Op::SendNoWait, 1),
        ("Request", Op::Request, 1),
        ("ParallelSend", Op::Send, parallel),
        ("ParallelSendNoWait", Op::SendNoWait, parallel),
        ("ParallelRequest", Op::Request, parallel),
    ] {
        group.bench_function(name, |b| {
            b.iter_custom(|iters| fixture.run(kind, threads, iters))
        });
    }
    group.finish();
    fixture.client.shutdown();
    fixture.server.shutdown();
}

/// A new connection per iteration: dial, handshake, one request. The
/// client's reactor is a single thread, so thread start-up is a small part.
fn handshake(c: &mut Criterion) {
    let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
        let _ = ctx.reply(b"");
    })
    .expect("bind");
    let reactor = monte_rpc::Reactor::new(Config::default().workers(1)).expect("reactor");
    let handle = reactor.handle();
    let thread = std::thread::spawn(move || reactor.run());
    let mut group = c.benchmark_group("connect");
    group
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group.bench_function("Handshake", |b| {
        let mut response = Vec::new();
        b.iter(|| {
            let conn = handle
                .dial(server.local_addr(), Arc::new(monte_rpc::NoHandler))
                .expect("dial");
            conn.request(b"", &mut response).expect("request");
            conn.close();
        })
    });
    group.finish();
    handle.stop();
    let _ = thread.join();
    server.shutdown();
}

criterion_group!(benches, rpc, handshake);
criterion_main!(benches);
