//! How a server's reactors accept: whichever is awake accepts, and each
//! connection goes to the reactor that holds the fewest; and how a
//! client's dials spread over its reactors the same way.

mod common;
use common::{client_config, server_config, wait_until, within};

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use monte_rpc::{Client, Connection, Context, Handler, Server};

/// What the server's handler saw.
#[derive(Default)]
struct Seen {
    opened_on: Mutex<HashMap<String, usize>>,
    holding: AtomicBool,
    go_on: Mutex<Option<mpsc::Receiver<()>>>,
}

/// Echoes, records which server thread opened each connection, and holds
/// a request whose body is `hold` until told to go on.
#[derive(Clone, Default)]
struct Recorder(Arc<Seen>);

impl std::ops::Deref for Recorder {
    type Target = Seen;
    fn deref(&self) -> &Seen {
        &self.0
    }
}

impl Handler for Recorder {
    fn on_message(&self, ctx: &mut Context<'_>) {
        if ctx.body() == b"hold" {
            let go_on = self.go_on.lock().unwrap().take().expect("one hold");
            self.holding.store(true, Ordering::SeqCst);
            let _ = go_on.recv_timeout(Duration::from_secs(10));
        }
        let body = ctx.body().to_vec();
        let _ = ctx.reply(&body);
    }

    fn on_open(&self, _conn: &Connection) {
        let name = thread::current().name().unwrap_or("?").to_string();
        *self.opened_on.lock().unwrap().entry(name).or_default() += 1;
    }
}

/// A client of one connection, with a request answered on it.
fn connected_client(server: &Server) -> Client {
    let client = Client::new(server.local_addr(), client_config().max_conns(1)).unwrap();
    let mut resp = Vec::new();
    client.request(b"hello", &mut resp).unwrap();
    assert_eq!(resp, b"hello");
    client
}

// Four connections opened one after another on a server of two reactors
// end up two on each: a reactor that accepts a connection while it holds
// more than another gives the connection to that one.
#[test]
fn connections_opened_one_after_another_spread_over_the_reactors() {
    within(30, || {
        let recorder = Recorder::default();
        let server = Server::bind("127.0.0.1:0", server_config(), recorder.clone()).unwrap();
        let clients: Vec<Client> = (0..4).map(|_| connected_client(&server)).collect();
        let opened = recorder.opened_on.lock().unwrap().clone();
        let mut counts: Vec<usize> = opened.values().copied().collect();
        counts.sort();
        assert_eq!(counts, [2, 2], "connections per server thread: {opened:?}");
        drop(clients);
        server.shutdown();
    });
}

// A reactor stuck in a handler does not hold up a new connection while
// another reactor is free: the free one accepts it and, holding no more
// than the stuck one, keeps it and runs its handshake. (Dealt out in turn
// by a thread of its own, the third connection went to the stuck reactor,
// and its handshake waited for the handler.)
#[test]
fn a_reactor_stuck_in_a_handler_does_not_hold_up_new_connections() {
    within(30, || {
        let recorder = Recorder::default();
        let (go_on, release) = mpsc::channel();
        *recorder.go_on.lock().unwrap() = Some(release);
        let server = Server::bind("127.0.0.1:0", server_config(), recorder.clone()).unwrap();
        // One connection on each reactor.
        let first = Arc::new(connected_client(&server));
        let _second = connected_client(&server);
        let held = {
            let first = first.clone();
            thread::spawn(move || {
                let mut resp = Vec::new();
                first.request(b"hold", &mut resp).map(|()| resp)
            })
        };
        assert!(wait_until(Duration::from_secs(5), || recorder
            .holding
            .load(Ordering::SeqCst)));
        // Within a second, while the handler still holds its reactor.
        let third = Client::new(
            server.local_addr(),
            client_config()
                .max_conns(1)
                .handshake_timeout(Some(Duration::from_secs(1))),
        )
        .unwrap();
        let mut resp = Vec::new();
        let answered = third.request(b"third", &mut resp);
        go_on.send(()).unwrap();
        assert_eq!(held.join().unwrap().unwrap(), b"hold");
        answered.expect("the third connection, while one reactor is stuck");
        assert_eq!(resp, b"third");
        server.shutdown();
    });
}

// A burst of connections larger than what a reactor accepts in one turn is
// accepted whole, though the listener announces it only once (edge-
// triggered): the reactor comes back for the rest by itself.
#[test]
fn a_burst_of_connections_is_accepted_whole() {
    within(30, || {
        let server = Server::bind(
            "127.0.0.1:0",
            server_config().workers(1),
            Recorder::default(),
        )
        .unwrap();
        // The kernel completes these connections before the reactor has
        // accepted any of them.
        let burst: Vec<std::net::TcpStream> = (0..200)
            .map(|_| std::net::TcpStream::connect(server.local_addr()).unwrap())
            .collect();
        assert!(
            wait_until(Duration::from_secs(10), || server.connections() == 200),
            "accepted {} of 200",
            server.connections()
        );
        drop(burst);
        server.shutdown();
    });
}

// Once a server shuts down it stops listening at once, though a handler
// still runs on one of its reactors (which holds the listener until it
// stops): new connections are refused by the kernel, instead of completing
// into a backlog that no one would serve.
#[cfg(target_os = "linux")]
#[test]
fn a_server_shutting_down_refuses_new_connections_at_once() {
    within(30, || {
        let recorder = Recorder::default();
        let (go_on, release) = mpsc::channel();
        *recorder.go_on.lock().unwrap() = Some(release);
        let server = Arc::new(
            Server::bind("127.0.0.1:0", server_config().workers(1), recorder.clone()).unwrap(),
        );
        let addr = server.local_addr();
        let client = Arc::new(connected_client(&server));
        let held = {
            let client = client.clone();
            thread::spawn(move || {
                let mut resp = Vec::new();
                client.request(b"hold", &mut resp)
            })
        };
        assert!(wait_until(Duration::from_secs(5), || recorder
            .holding
            .load(Ordering::SeqCst)));
        let shutting = {
            let server = server.clone();
            thread::spawn(move || server.shutdown())
        };
        let refused = wait_until(Duration::from_secs(5), || {
            matches!(
                std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
            )
        });
        go_on.send(()).unwrap();
        let _ = held.join().unwrap();
        shutting.join().unwrap();
        assert!(refused, "a connection was still taken while shutting down");
    });
}

/// A server serving a listener the caller bound leaves it listening when
/// it shuts down: the caller may keep a copy for the next server (or
/// share it with another process), and a shutdown acts on the socket,
/// every copy of it included.
#[test]
fn shutdown_leaves_a_callers_listener_listening() {
    within(30, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = monte_rpc::Server::serve(
            listener.try_clone().unwrap(),
            common::server_config(),
            |ctx: &mut monte_rpc::Context<'_>| {
                let _ = ctx.reply(b"pong");
            },
        )
        .unwrap();
        let client = monte_rpc::Client::new(addr, common::client_config()).unwrap();
        client.request(b"ping", &mut Vec::new()).unwrap();
        client.shutdown();
        server.shutdown();
        drop(server);
        // The caller's copy still listens: a new connection is accepted.
        let _dialled = std::net::TcpStream::connect(addr)
            .expect("the caller's listener refused a connection after the server's shutdown");
        listener.set_nonblocking(true).unwrap();
        assert!(
            common::wait_until(std::time::Duration::from_secs(2), || listener
                .accept()
                .is_ok()),
            "nothing to accept on the caller's listener"
        );
    });
}

// A client's connections spread over its reactors too, whatever else has
// drawn on them meanwhile: an async call takes a reactor for its timers
// from the same round robin that placed dials, so a dial after one landed
// on the reactor of the dial before (with two reactors), and the client's
// two connections shared one thread.
#[test]
fn a_clients_connections_spread_over_its_reactors() {
    within(30, || {
        let hold = common::Hold::new();
        let held_here = hold.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            server_config(),
            move |ctx: &mut monte_rpc::Context<'_>| {
                if ctx.body() == b"hold" {
                    held_here.hold();
                }
                // A message first: the client's handler says which of its
                // threads reads this connection.
                let _ = ctx.conn().send_no_wait(b"which thread?");
                let _ = ctx.reply(b"ok");
            },
        )
        .unwrap();
        let read_on: Arc<Mutex<HashMap<String, usize>>> = Arc::default();
        let seen = read_on.clone();
        let client = Arc::new(
            Client::with_handler(
                server.local_addr(),
                client_config().workers(2).max_conns(2),
                move |_: &mut monte_rpc::Context<'_>| {
                    let name = thread::current().name().unwrap_or("?").to_string();
                    *seen.lock().unwrap().entry(name).or_default() += 1;
                },
            )
            .unwrap(),
        );
        let mut resp = Vec::new();
        client.request(b"first", &mut resp).unwrap();
        // An async call, made and dropped: it draws a reactor for its
        // timers.
        drop(client.request_async(b"unpolled", &mut Vec::new()));
        // The first connection busy: the next request dials a second.
        let held = {
            let client = client.clone();
            thread::spawn(move || client.request(b"hold", &mut Vec::new()))
        };
        assert!(hold.held());
        client.request(b"second", &mut resp).unwrap();
        hold.release();
        held.join().unwrap().unwrap();
        assert_eq!(client.connections(), 2);
        assert!(
            wait_until(Duration::from_secs(5), || read_on
                .lock()
                .unwrap()
                .values()
                .sum::<usize>()
                == 3),
            "the client's handler heard {:?}",
            read_on.lock().unwrap()
        );
        let threads = read_on.lock().unwrap().len();
        assert_eq!(
            threads,
            2,
            "connections per client thread: {:?}",
            read_on.lock().unwrap()
        );
        client.shutdown();
        server.shutdown();
    });
}
