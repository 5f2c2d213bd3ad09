//! A server whose handler hands its work to async tasks, and a client
//! that keeps many async requests in flight, in one process on tokio.
//!
//! ```text
//! cargo run --release --example async_server [-- --requests N --in-flight N --delay-ms N]
//! ```
//!
//! Handlers run on the library's reactor threads and must not block or
//! await there. This one copies what it needs (the connection handle, the
//! request's sequence number, the body) into a task on the tokio runtime
//! and returns at once; the task waits for its (simulated) I/O and replies
//! through the connection with `reply_async`. The client side awaits
//! `request_async` from `--in-flight` tasks at once on the same runtime.
//! Neither side blocks a tokio worker: no `spawn_blocking`, no thread per
//! call. Prints `async server answered N requests (M in flight)` and exits.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use monte_rpc::{Client, Config, Context, Server};

/// Async handlers and async callers over monte-rpc, on tokio.
#[derive(Parser, Debug)]
#[command(name = "async_server")]
struct Args {
    /// Requests the client sends in all.
    #[arg(long, default_value_t = 2000)]
    requests: u64,
    /// Requests the client keeps in flight at once, each from a task.
    #[arg(long, default_value_t = 64)]
    in_flight: u64,
    /// How long each request's simulated I/O takes on the server.
    #[arg(long, default_value_t = 2)]
    delay_ms: u64,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;

    // The server: the handler only hands the request to a task.
    let spawner = runtime.handle().clone();
    let delay = Duration::from_millis(args.delay_ms);
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server(),
        move |ctx: &mut Context<'_>| {
            if !ctx.expects_reply() {
                return;
            }
            let (conn, seq, body) = (ctx.conn().clone(), ctx.seq(), ctx.body().to_vec());
            spawner.spawn(async move {
                tokio::time::sleep(delay).await; // a database, another service...
                let mut reply = body;
                reply.reverse();
                if let Err(e) = conn.reply_async(seq, &reply).await {
                    eprintln!("reply to {:?}: {e}", conn.peer_addr());
                }
            });
        },
    )?;

    // The client: `in_flight` tasks share the requests between them.
    let client = Arc::new(Client::new(server.local_addr(), Config::default())?);
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let answered = runtime.block_on(async {
        let mut tasks = Vec::new();
        for _ in 0..args.in_flight {
            let (client, next, total) = (client.clone(), next.clone(), args.requests);
            tasks.push(tokio::spawn(async move {
                let mut response = Vec::new();
                let mut answered = 0u64;
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return Ok::<u64, monte_rpc::Error>(answered);
                    }
                    let body = i.to_be_bytes();
                    client.request_async(&body, &mut response).await?;
                    let mut expected = body;
                    expected.reverse();
                    assert_eq!(response, expected, "request {i} got another's response");
                    answered += 1;
                }
            }));
        }
        let mut answered = 0;
        for task in tasks {
            answered += task.await??;
        }
        Ok::<u64, Box<dyn std::error::Error>>(answered)
    })?;
    let took = started.elapsed();
    client.shutdown();
    server.shutdown();
    eprintln!(
        "{answered} requests in {took:?} with {} ms of server-side I/O each",
        args.delay_ms
    );
    println!(
        "async server answered {answered} requests ({} in flight)",
        args.in_flight
    );
    Ok(())
}
