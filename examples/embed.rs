//! Embedding the reactor in a server of your own: your thread runs the
//! event loop with `poll_once`, your code accepts the connections and hands
//! them over, and you stop it when you are done.
//!
//! ```text
//! cargo run --release --example embed [-- --addr 127.0.0.1:0 --requests 100]
//! ```

use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use monte_rpc::{Client, Config, Context, Reactor};

/// A server of your own that accepts connections and hands them to a
/// monte-rpc reactor its thread drives; a client makes requests to it.
#[derive(Parser)]
#[command(name = "embed")]
struct Args {
    /// The address your server listens on (port 0: any free port)
    #[arg(long, value_name = "HOST:PORT", default_value = "127.0.0.1:0")]
    addr: String,
    /// Requests the client makes, each checked
    #[arg(long, value_name = "N", default_value_t = 100)]
    requests: u32,
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();

    // One reactor, driven by a thread this program owns.
    let mut reactor = Reactor::new(Config::server())?;
    let handle = reactor.handle();
    let served = Arc::new(AtomicUsize::new(0));

    let event_loop = std::thread::spawn(move || {
        // Your own loop: interleave the reactor with other work.
        while reactor.poll_once(Some(Duration::from_millis(50)))? {
            // ... other periodic work of the host server goes here ...
        }
        Ok::<(), monte_rpc::Error>(())
    });

    // Your own accept loop, handing each connection to the reactor.
    let listener = TcpListener::bind(args.addr.as_str())?;
    let addr = listener.local_addr()?;
    let accept_handle = handle.clone();
    let counter = served.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { break };
            let counter = counter.clone();
            let handler = Arc::new(move |ctx: &mut Context<'_>| {
                counter.fetch_add(1, Ordering::Relaxed);
                let mut body = ctx.body().to_vec();
                body.reverse();
                let _ = ctx.reply(&body);
            });
            if accept_handle.accept(stream, handler).is_err() {
                break; // the reactor stopped
            }
        }
    });

    // An ordinary client talks to it.
    let client = Client::new(addr, Config::default())?;
    let mut response = Vec::new();
    for i in 0..args.requests {
        let body = i.to_be_bytes();
        client.request(&body, &mut response)?;
        assert_eq!(response, [body[3], body[2], body[1], body[0]]);
    }
    client.shutdown();

    // Stop the reactor: it closes its connections gracefully and
    // `poll_once` returns false, ending the loop.
    handle.stop();
    event_loop.join().expect("event loop thread")?;
    println!(
        "embedded reactor served {} requests",
        served.load(Ordering::Relaxed)
    );
    Ok(())
}
