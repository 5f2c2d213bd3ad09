//! Shutdown of clients and servers: under load, mid-request, and on drop.
//!
//! The tests in this file run one at a time (`SERIAL`), so that the thread
//! count in the drop test sees only its own client's and server's threads.

mod common;
use common::{wait_until, within};

use std::io::{Read, Write};
use std::net::Shutdown;
use std::panic::resume_unwind;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::{Client, Config, Context, Error, Server, TimeoutKind};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Joins `handle`, failing if the thread does not end by `deadline`.
fn join_by<T>(handle: thread::JoinHandle<T>, deadline: Instant, what: &str) -> T {
    while !handle.is_finished() {
        assert!(Instant::now() < deadline, "{what} did not return in time");
        thread::sleep(Duration::from_millis(2));
    }
    match handle.join() {
        Ok(v) => v,
        Err(panic) => resume_unwind(panic),
    }
}

/// The common settings with a 2 s write timeout: shutdown flushes are
/// bounded by it.
fn client_config() -> Config {
    common::client_config().write_timeout(Some(Duration::from_secs(2)))
}

fn server_config() -> Config {
    common::server_config().write_timeout(Some(Duration::from_secs(2)))
}

/// Names of this process's threads that belong to monte-rpc.
fn monte_threads() -> Vec<String> {
    let mut names = Vec::new();
    for entry in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        if let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) {
            let comm = comm.trim().to_string();
            if comm.starts_with("monte-rpc") {
                names.push(comm);
            }
        }
    }
    names.sort();
    names
}

/// Asserts that this process's monte-rpc threads are back to `before`
/// (`what` went meanwhile). A thread that was joined may still be listed
/// for a moment: `pthread_join` returns as the exiting thread clears its
/// id, before the kernel unlists it (a thread that merely exits on its own
/// within the grace would pass too; one blocked or running would not).
fn assert_threads_back_to(before: &[String], what: &str) {
    assert!(
        wait_until(Duration::from_secs(2), || monte_threads() == before),
        "threads left after {what}: {:?} (before: {before:?})",
        monte_threads()
    );
}

#[derive(Debug, Default)]
struct Tally {
    ok_requests: usize,
    ok_sends: usize,
    ok_no_wait: usize,
    error: Option<Error>,
    error_after_shutdown: bool,
}

// 8 threads mix requests, sends and send_no_wait until client.shutdown():
// all return, the errors are Closed (or a timeout), and every send_no_wait
// that returned Ok reaches the server.
#[test]

fn client_shutdown_under_load() {
    let _serial = serial();
    within(30, || {
        let no_wait_seen = Arc::new(AtomicUsize::new(0));
        let sends_seen = Arc::new(AtomicUsize::new(0));
        let (nw, sn) = (no_wait_seen.clone(), sends_seen.clone());
        let server = Server::bind(
            "127.0.0.1:0",
            server_config(),
            move |ctx: &mut Context<'_>| match ctx.body().first() {
                Some(b'N') => {
                    nw.fetch_add(1, Ordering::SeqCst);
                }
                Some(b'S') => {
                    sn.fetch_add(1, Ordering::SeqCst);
                }
                Some(b'R') => {
                    let body = ctx.body().to_vec();
                    let _ = ctx.reply(&body);
                }
                _ => {}
            },
        )
        .unwrap();
        let client = Arc::new(Client::new(server.local_addr(), client_config()).unwrap());
        let shut = Arc::new(AtomicBool::new(false));
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let client = client.clone();
                let shut = shut.clone();
                thread::spawn(move || {
                    let mut tally = Tally::default();
                    let mut resp = Vec::new();
                    for i in 0usize.. {
                        let result = match (i + t) % 3 {
                            0 => {
                                let body = format!("R{t}-{i}");
                                client.request(body.as_bytes(), &mut resp).map(|()| {
                                    assert_eq!(resp, body.as_bytes());
                                    tally.ok_requests += 1;
                                })
                            }
                            1 => client
                                .send(format!("S{t}-{i}").as_bytes())
                                .map(|()| tally.ok_sends += 1),
                            _ => client
                                .send_no_wait(format!("N{t}-{i}").as_bytes())
                                .map(|()| tally.ok_no_wait += 1),
                        };
                        if let Err(e) = result {
                            tally.error_after_shutdown = shut.load(Ordering::SeqCst);
                            tally.error = Some(e);
                            break;
                        }
                    }
                    tally
                })
            })
            .collect();
        thread::sleep(Duration::from_millis(300));
        shut.store(true, Ordering::SeqCst);
        let start = Instant::now();
        client.shutdown();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "client.shutdown took {:?}",
            start.elapsed()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let tallies: Vec<Tally> = threads
            .into_iter()
            .map(|h| join_by(h, deadline, "a caller thread"))
            .collect();
        let mut ok_no_wait = 0;
        let mut ok_sends = 0;
        for (t, tally) in tallies.iter().enumerate() {
            ok_no_wait += tally.ok_no_wait;
            ok_sends += tally.ok_sends;
            assert!(
                tally.error_after_shutdown,
                "thread {t} failed before shutdown: {tally:?}"
            );
            assert!(
                tally.ok_requests > 0,
                "thread {t} made no progress: {tally:?}"
            );
        }
        // Delivered so far can never exceed what was accepted.
        assert!(no_wait_seen.load(Ordering::SeqCst) <= ok_no_wait);
        // Everything accepted is flushed by the graceful shutdown.
        wait_until(Duration::from_secs(3), || server.connections() == 0);
        let start = Instant::now();
        server.shutdown();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "server.shutdown took {:?}",
            start.elapsed()
        );
        assert_eq!(
            no_wait_seen.load(Ordering::SeqCst),
            ok_no_wait,
            "send_no_wait calls that returned Ok vs messages the server saw"
        );
        assert!(
            sends_seen.load(Ordering::SeqCst) >= ok_sends,
            "a completed send was lost"
        );
        // Checked last so that the delivery checks above always run.
        for (t, tally) in tallies.iter().enumerate() {
            assert!(
                matches!(
                    tally.error.as_ref().map(Error::root_cause),
                    Some(Error::Closed | Error::Timeout(_))
                ),
                "thread {t}: an error after shutdown must be Closed or a timeout: {tally:?}"
            );
        }
    });
}

// Shutting the server down while a client request is in its (slow) handler:
// the request ends with Ok or an error, and shutdown returns.
#[test]
fn server_shutdown_with_request_in_flight() {
    let _serial = serial();
    within(20, || {
        let entered = Arc::new(AtomicBool::new(false));
        let flag = entered.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            server_config(),
            move |ctx: &mut Context<'_>| {
                flag.store(true, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(200));
                let _ = ctx.reply(b"late");
            },
        )
        .unwrap();
        let client = Arc::new(Client::new(server.local_addr(), client_config()).unwrap());
        let caller = {
            let client = client.clone();
            thread::spawn(move || {
                let mut resp = Vec::new();
                let result = client.request(b"slow", &mut resp);
                (result, resp)
            })
        };
        assert!(wait_until(Duration::from_secs(5), || entered.load(Ordering::SeqCst)));
        let start = Instant::now();
        server.shutdown();
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "server.shutdown took {:?}",
            start.elapsed()
        );
        let (result, resp) = join_by(
            caller,
            Instant::now() + Duration::from_secs(6),
            "the request",
        );
        match result {
            Ok(()) => assert_eq!(resp, b"late"),
            Err(e) => assert!(
                matches!(
                    e.root_cause(),
                    Error::Closed
                        | Error::PeerClosed
                        | Error::Timeout(TimeoutKind::Request)
                        | Error::Io(_)
                ),
                "unexpected error {e:?}"
            ),
        }
        // The server is gone: a new request fails instead of hanging.
        let mut resp = Vec::new();
        assert!(client.request(b"again", &mut resp).is_err());
        client.shutdown();
    });
}

// Dropping a Client and a Server stops and joins all of their threads.
#[test]
fn drop_joins_every_thread() {
    let _serial = serial();
    within(20, || {
        let before = monte_threads();
        let server = Server::bind("127.0.0.1:0", server_config(), |ctx: &mut Context<'_>| {
            let _ = ctx.reply(b"x");
        })
        .unwrap();
        let client = Client::new(server.local_addr(), client_config()).unwrap();
        let mut resp = Vec::new();
        client.request(b"x", &mut resp).unwrap();
        client.send_no_wait(b"y").unwrap();
        // 2 client workers, 2 server workers and the waiting room. A
        // thread takes its name once it first runs, and nothing above
        // needs the waiting room or every reactor to have run yet.
        let running = wait_until(Duration::from_secs(5), || {
            monte_threads().len() == before.len() + 5
        });
        assert!(running, "threads while running: {:?}", monte_threads());
        drop(client);
        drop(server);
        assert_threads_back_to(&before, "drop");
    });
}

// A peer that half-closes (shuts its write side, as a client's graceful
// shutdown does) still gets the replies to the requests it sent before.
#[test]

fn server_answers_requests_sent_before_a_half_close() {
    let _serial = serial();
    within(20, || {
        let server = Server::bind("127.0.0.1:0", server_config(), |ctx: &mut Context<'_>| {
            let _ = ctx.reply(b"pong");
        })
        .unwrap();
        let (mut stream, session) = common::raw_client(server.local_addr());
        let (mut input, mut chunk) = (Vec::new(), [0u8; 4096]);
        let (mut sealer, mut opener) = (session.sealer, session.opener);
        let mut frames = Vec::new();
        for seq in [1u32, 3, 5] {
            sealer.seal_append(seq, b"ping", &mut frames).unwrap();
        }
        stream.write_all(&frames).unwrap();
        stream.shutdown(Shutdown::Write).unwrap();
        // Read everything until the server closes (or the read times out).
        loop {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => input.extend_from_slice(&chunk[..n]),
            }
        }
        let (replies, _) = common::open_messages(&mut opener, &mut input, 1 << 20);
        server.shutdown();
        assert_eq!(
            replies,
            vec![
                (1, b"pong".to_vec()),
                (3, b"pong".to_vec()),
                (5, b"pong".to_vec())
            ],
            "replies to requests sent before the half-close"
        );
    });
}

// A handler may shut its own server (or client) down, an admin "stop"
// message say. Its reactor cannot join its own thread: shutdown stops
// the other reactors and joins them, leaves its own to stop once the
// handler returns, and a later shutdown (here the owner's) joins it.
// Joining it there panicked ("failed to join thread": EDEADLK), which
// closed the connection as a handler panic and left threads unjoined.
#[test]
fn a_handler_may_shut_its_own_server_and_client_down() {
    let _serial = serial();
    within(30, || {
        let before = monte_threads();
        let server_slot: Arc<std::sync::OnceLock<Server>> = Arc::default();
        let client_slot: Arc<std::sync::OnceLock<Client>> = Arc::default();
        let returned = Arc::new(AtomicUsize::new(0));
        let server = Server::bind("127.0.0.1:0", server_config(), {
            let (slot, returned) = (server_slot.clone(), returned.clone());
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"stop" {
                    slot.get().unwrap().shutdown();
                    returned.fetch_add(1, Ordering::SeqCst);
                } else {
                    // Asks the client to stop itself.
                    let _ = ctx.conn().send(b"stop");
                }
            }
        })
        .unwrap();
        let addr = server.local_addr();
        assert!(server_slot.set(server).is_ok());
        let client = Client::with_handler(addr, client_config(), {
            let (slot, returned) = (client_slot.clone(), returned.clone());
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"stop" {
                    slot.get().unwrap().shutdown();
                    returned.fetch_add(10, Ordering::SeqCst);
                }
            }
        })
        .unwrap();
        assert!(client_slot.set(client).is_ok());
        let client = client_slot.get().unwrap();
        client.send(b"stop yourself").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || returned.load(Ordering::SeqCst)
                == 10),
            "the client's handler did not return from shutting its client down ({})",
            returned.load(Ordering::SeqCst)
        );
        let other = Client::new(addr, client_config()).unwrap();
        other.send(b"stop").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || returned.load(Ordering::SeqCst)
                == 11),
            "the server's handler did not return from shutting its server down ({})",
            returned.load(Ordering::SeqCst)
        );
        other.shutdown();
        // The owners' shutdowns join what the handlers' could not.
        client.shutdown();
        server_slot.get().unwrap().shutdown();
        assert_threads_back_to(&before, "the owners' shutdowns");
    });
}

// A dial whose handshake never ends (the server's listener never
// accepts, and the handshake has no timeout) must not hold shutdown: the
// async calls' dial thread, and a blocking call dialling with no timeout
// of its own, give up when the client shuts down, and shutdown returns.
#[test]
fn shutdown_does_not_wait_for_a_dial_that_never_ends() {
    let _serial = serial();
    within(30, || {
        // Connects (the kernel completes TCP's handshake into the
        // backlog), then never answers the client's key.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = client_config()
            .handshake_timeout(None)
            .request_timeout(None);
        let client = Arc::new(Client::new(listener.local_addr().unwrap(), config).unwrap());
        let mut response = Vec::new();
        let timed = futures::executor::block_on(
            client
                .request_async(b"x", &mut response)
                .timeout(Some(Duration::from_millis(200))),
        );
        assert!(timed.is_err(), "{timed:?}");
        // A blocking call with no timeout, dialling (or waiting for the
        // async calls' dial).
        let blocking = {
            let client = client.clone();
            thread::spawn(move || client.request(b"y", &mut Vec::new()))
        };
        thread::sleep(Duration::from_millis(100));
        let shutting = {
            let client = client.clone();
            thread::spawn(move || client.shutdown())
        };
        let deadline = Instant::now() + Duration::from_secs(4);
        join_by(shutting, deadline, "shutdown");
        let outcome = join_by(blocking, deadline, "the blocking call");
        assert!(
            matches!(
                outcome.as_ref().map_err(Error::root_cause),
                Err(Error::Closed)
            ),
            "{outcome:?}"
        );
        // Dials given up at shutdown are no failed handshakes.
        assert_eq!(client.stats().handshakes_failed, 0);
        drop(listener);
    });
}

// Two threads shutting one client down at once: neither may return
// before the queued frames are written and the connections drained (the
// second used to return at once, while the first was still draining: a
// process that exits then loses messages whose `send_no_wait` was Ok).
#[test]
fn concurrent_shutdowns_both_wait_for_the_drain() {
    let _serial = serial();
    within(30, || {
        let handled = Arc::new(AtomicUsize::new(0));
        let server = Server::bind("127.0.0.1:0", server_config(), {
            let handled = handled.clone();
            move |_: &mut Context<'_>| {
                // A slow reader: the drain takes a while.
                thread::sleep(Duration::from_millis(2));
                handled.fetch_add(1, Ordering::SeqCst);
            }
        })
        .unwrap();
        let client =
            Arc::new(Client::new(server.local_addr(), client_config().max_conns(1)).unwrap());
        let sent = 150;
        for _ in 0..sent {
            client.send_no_wait(&[0x51; 1024]).unwrap();
        }
        let shutdowns: Vec<_> = (0..2)
            .map(|_| {
                let (client, handled) = (client.clone(), handled.clone());
                thread::spawn(move || {
                    client.shutdown();
                    handled.load(Ordering::SeqCst)
                })
            })
            .collect();
        for shutdown in shutdowns {
            let seen = shutdown.join().unwrap();
            assert_eq!(
                seen, sent,
                "a shutdown returned before the server had every message"
            );
        }
        server.shutdown();
    });
}

// A client's `on_open` runs on the thread that dials: for async calls,
// the pool's dial thread. Shutting the client down there must not join
// that very thread (it panicked: "failed to join thread"); the owner's
// shutdown joins it later.
#[test]
fn on_open_on_the_async_dial_thread_may_shut_its_client_down() {
    let _serial = serial();
    within(30, || {
        let before = monte_threads();
        struct Stopper(Arc<std::sync::OnceLock<Client>>, Arc<AtomicUsize>);
        impl monte_rpc::Handler for Stopper {
            fn on_message(&self, _: &mut Context<'_>) {}
            fn on_open(&self, _: &monte_rpc::Connection) {
                self.0.get().unwrap().shutdown();
                self.1.fetch_add(1, Ordering::SeqCst);
            }
        }
        let server =
            Server::bind("127.0.0.1:0", server_config(), |_: &mut Context<'_>| {}).unwrap();
        let slot: Arc<std::sync::OnceLock<Client>> = Arc::default();
        let returned = Arc::new(AtomicUsize::new(0));
        let client = Client::with_handler(
            server.local_addr(),
            client_config(),
            Stopper(slot.clone(), returned.clone()),
        )
        .unwrap();
        assert!(slot.set(client).is_ok());
        let client = slot.get().unwrap();
        let started = Instant::now();
        let sent = futures::executor::block_on(client.send_async(b"dial for me"));
        assert!(
            sent.is_err(),
            "the client shut down as it dialled: {sent:?}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || returned.load(Ordering::SeqCst)
                == 1),
            "on_open did not return from shutting its client down"
        );
        // Not the shutdown's 1 s grace for calls under way: the call
        // waiting for the dial is woken as shutdown begins, and ends.
        assert!(
            started.elapsed() < Duration::from_millis(900),
            "the call and the shutdown from on_open took {:?}",
            started.elapsed()
        );
        client.shutdown();
        server.shutdown();
        assert_threads_back_to(&before, "the owners' shutdowns");
    });
}

// The same from a blocking call's dial, on the calling thread: the call
// waits for its dial, which waits for on_open, which waits for the
// shutdown, which waited out its 1 s grace for that very call.
#[test]
fn on_open_of_a_blocking_calls_dial_may_shut_its_client_down_at_once() {
    let _serial = serial();
    within(30, || {
        struct Stopper(Arc<std::sync::OnceLock<Client>>);
        impl monte_rpc::Handler for Stopper {
            fn on_message(&self, _: &mut Context<'_>) {}
            fn on_open(&self, _: &monte_rpc::Connection) {
                self.0.get().unwrap().shutdown();
            }
        }
        let server =
            Server::bind("127.0.0.1:0", server_config(), |_: &mut Context<'_>| {}).unwrap();
        let slot: Arc<std::sync::OnceLock<Client>> = Arc::default();
        let client =
            Client::with_handler(server.local_addr(), client_config(), Stopper(slot.clone()))
                .unwrap();
        assert!(slot.set(client).is_ok());
        let client = slot.get().unwrap();
        let started = Instant::now();
        let sent = client.send(b"dial for me");
        let took = started.elapsed();
        assert!(
            sent.is_err(),
            "the client shut down as it dialled: {sent:?}"
        );
        assert!(
            took < Duration::from_millis(700),
            "the call and the shutdown from on_open took {took:?}"
        );
        client.shutdown();
        server.shutdown();
    });
}

// A dial pausing between attempts (the pauses double, up to 640 ms)
// gives up within its abandon check too, not at the end of the pause:
// shutdown then returns at once rather than after the pause.
#[test]
fn shutdown_does_not_wait_out_a_dials_pause_between_attempts() {
    let _serial = serial();
    within(30, || {
        // Nothing listens: every connect is refused at once.
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let config = client_config().dial_attempts(10).request_timeout(None);
        let client = Arc::new(Client::new(addr, config).unwrap());
        let blocking = {
            let client = client.clone();
            thread::spawn(move || client.request(b"x", &mut Vec::new()))
        };
        // Past 10 + 20 + 40 + 80 + 160 + 320 ms of pauses: in the 640 ms one.
        thread::sleep(Duration::from_millis(800));
        let started = Instant::now();
        client.shutdown();
        let took = started.elapsed();
        let outcome = join_by(
            blocking,
            Instant::now() + Duration::from_secs(2),
            "the call",
        );
        assert!(outcome.is_err(), "{outcome:?}");
        assert!(took < Duration::from_millis(300), "shutdown took {took:?}");
    });
}

// The drain deadline is kept as closely as the others: the reactor's
// sweep ran at an eighth of the shortest other timeout (250 ms at the
// defaults), so a 20 ms drain_timeout closed a peer that never reads nor
// closes only at the next sweep, about 250 ms into the shutdown.
#[test]
fn a_short_drain_timeout_is_kept() {
    let _serial = serial();
    within(30, || {
        let mut slowest = Duration::ZERO;
        for _ in 0..3 {
            let config = server_config().drain_timeout(Duration::from_millis(20));
            let server = Server::bind("127.0.0.1:0", config, |_: &mut Context<'_>| {}).unwrap();
            // Completes the handshake, then neither reads nor closes.
            let (stream, _session) = common::raw_client(server.local_addr());
            assert!(wait_until(Duration::from_secs(2), || server.connections() == 1));
            let started = Instant::now();
            server.shutdown();
            slowest = slowest.max(started.elapsed());
            drop(stream);
        }
        assert!(
            slowest < Duration::from_millis(150),
            "a shutdown with a 20 ms drain took {slowest:?}"
        );
    });
}

/// A peer that half-closes while a reply it does not read is stuck in the
/// server's queue starts a drain: a short drain timeout closes it on time,
/// not at the sweep's usual interval (250 ms here).
#[test]
fn a_short_drain_after_the_peers_end_is_kept() {
    let _serial = serial();
    within(30, || {
        // The usual sweep comes at any point of its 250 ms: four tries make
        // a drain kept only by it show (at most a 0.4 chance each to come
        // within the bound).
        let mut slowest = Duration::ZERO;
        for _ in 0..4 {
            slowest = slowest.max(drain_after_the_peers_end(Duration::from_millis(20)));
        }
        assert!(
            slowest < Duration::from_millis(100),
            "a 20 ms drain after the peer's end took {slowest:?}"
        );
    });
}

/// How long a connection takes to close once its peer half-closed with a
/// reply it does not read stuck in the server's queue, with `drain`.
fn drain_after_the_peers_end(drain: Duration) -> Duration {
    let config = server_config()
        .workers(1)
        .send_buffer_size(Some(8192))
        .drain_timeout(drain);
    let server = Server::bind("127.0.0.1:0", config, |ctx: &mut Context<'_>| {
        // More than the socket buffers on both sides hold while the peer
        // does not read.
        let _ = ctx.reply(&vec![7u8; 900 * 1024]);
    })
    .unwrap();
    let (mut stream, session) = common::raw_client(server.local_addr());
    assert!(wait_until(Duration::from_secs(2), || server.connections() == 1));
    let mut sealer = session.sealer;
    let mut frame = Vec::new();
    sealer
        .seal_append(1, b"a big one, please", &mut frame)
        .unwrap();
    stream.write_all(&frame).unwrap();
    // The reply is queued once the server has it (written in part).
    thread::sleep(Duration::from_millis(50));
    let started = Instant::now();
    stream.shutdown(Shutdown::Write).unwrap();
    assert!(wait_until(Duration::from_secs(2), || server.connections() == 0));
    let took = started.elapsed();
    drop(stream);
    server.shutdown();
    took
}

/// This process's threads whose name starts with `prefix`, by id.
#[cfg(target_os = "linux")]
fn threads_named(prefix: &str) -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .filter_map(|t| t.ok())
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .filter(|tid| {
            std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .is_ok_and(|comm| comm.starts_with(prefix))
        })
        .collect()
}

/// How often the threads `tids` went to sleep (`voluntary_ctxt_switches`):
/// each sleep ended in a wake-up.
#[cfg(target_os = "linux")]
fn sleeps(tids: &[String]) -> u64 {
    tids.iter()
        .filter_map(|tid| std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).ok())
        .filter_map(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
                .and_then(|n| n.trim().parse::<u64>().ok())
        })
        .sum()
}

/// A short drain timeout shortens the sweep only while a connection
/// drains: a reactor holding an idle connection wakes for its sweep at
/// the usual interval (250 ms with these timeouts), not every 5 ms for
/// its whole life.
#[cfg(target_os = "linux")]
#[test]
fn a_short_drain_timeout_does_not_wake_an_idle_reactor() {
    let _serial = serial();
    within(30, || {
        let before = threads_named("monte-rpc-serve");
        let config = server_config()
            .workers(1)
            .drain_timeout(Duration::from_millis(10));
        let server = Server::bind("127.0.0.1:0", config, |_: &mut Context<'_>| {}).unwrap();
        // A thread takes its name once it runs.
        let mut reactors = Vec::new();
        assert!(wait_until(Duration::from_secs(2), || {
            reactors = threads_named("monte-rpc-serve");
            reactors.retain(|t| !before.contains(t));
            reactors.len() == 1
        }));
        let (stream, _session) = common::raw_client(server.local_addr());
        assert!(wait_until(Duration::from_secs(2), || server.connections() == 1));
        thread::sleep(Duration::from_millis(50));
        let start = sleeps(&reactors);
        thread::sleep(Duration::from_millis(500));
        let woken = sleeps(&reactors) - start;
        assert!(
            woken <= 10,
            "an idle reactor woke {woken} times in 500 ms (a sweep every {} ms)",
            500 / woken.max(1)
        );
        let started = Instant::now();
        server.shutdown();
        assert!(
            started.elapsed() < Duration::from_millis(150),
            "a shutdown with a 10 ms drain took {:?}",
            started.elapsed()
        );
        drop(stream);
    });
}
