//! What a connection's handle keeps once the connection has closed. An
//! application may keep handles (to reply later, as SECURITY.md
//! suggests); a closed connection's buffers must not stay with them. In
//! a file of its own, as it measures the process's resident memory, and
//! its tests take turns (`SERIAL`).

mod common;
use common::{client_config, server_config, wait_until, within};

use std::io::{Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use monte_rpc::{Client, Connection, Context, Server};

static SERIAL: Mutex<()> = Mutex::new(());

/// This process's resident memory, in bytes.
fn resident_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// An application may keep a connection's handle after the connection
/// closed (to reply later, as SECURITY.md suggests). A closed connection
/// must not keep its buffers with it: here 24 clients each send one
/// 900 KB message (the server's receive buffer grows to 1 MiB for it)
/// and leave, while the server's handler keeps every handle. The
/// server's memory must not grow by a buffer per closed connection.
#[test]
fn a_closed_connections_handle_does_not_keep_its_buffers() {
    kept_handles_hold_no_buffers(|addr, big| {
        let client = Client::new(addr, client_config().max_conns(1)).unwrap();
        client.send(big).unwrap();
        client.shutdown();
    });
}

/// The same for connections closed on a fault: a raw client sends one
/// small message (the handle is kept), then a 900 KB frame with a forged
/// tag, which the reactor reads in full before it fails to open it.
#[test]
fn a_connection_closed_on_a_bad_frame_does_not_keep_its_buffers() {
    kept_handles_hold_no_buffers(|addr, big| {
        let (mut stream, mut session) = common::raw_client(addr);
        let mut frames = Vec::new();
        session
            .sealer
            .seal_append(0, b"keep me", &mut frames)
            .unwrap();
        session.sealer.seal_append(0, big, &mut frames).unwrap();
        let last = frames.len() - 1;
        frames[last] ^= 1;
        stream.write_all(&frames).unwrap();
        // The server closes on the forgery: its end of stream.
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
    });
}

/// Runs `visit` (a client that sends one 900 KB message one way or
/// another and leaves) 25 times against a server whose handler keeps
/// every handle, and fails if the server's memory grew by more than
/// 8 MiB over the last 24 (a 1 MiB buffer each would be 24 MiB).
fn kept_handles_hold_no_buffers(visit: impl Fn(std::net::SocketAddr, &[u8]) + Send + 'static) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    within(60, move || {
        let handles: Arc<Mutex<Vec<Connection>>> = Arc::default();
        let server = Server::bind("127.0.0.1:0", server_config().workers(1), {
            let handles = handles.clone();
            move |ctx: &mut Context<'_>| handles.lock().unwrap().push(ctx.conn().clone())
        })
        .unwrap();
        let big = vec![0x42; 900_000];
        let visited = |n: usize| {
            visit(server.local_addr(), &big);
            // Handled, and closed on the server's side too.
            wait_until(Duration::from_secs(5), || {
                let handles = handles.lock().unwrap();
                handles.len() == n && handles.iter().all(|c| c.is_closed())
            })
        };
        assert!(visited(1));
        let before = resident_bytes();
        let visits = 24;
        for n in 2..=visits + 1 {
            assert!(visited(n), "visit {n} was not handled and closed");
        }
        let grown = resident_bytes().saturating_sub(before);
        assert!(
            grown < 8 << 20,
            "the server's memory grew by {} KiB for {visits} closed connections whose handles \
             are kept",
            grown >> 10
        );
        server.shutdown();
    });
}
