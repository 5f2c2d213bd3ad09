//! The write-side timeouts each mean one thing: `send_timeout` bounds how
//! long one call waits (and fails that call only), `write_timeout` closes a
//! connection whose output makes no progress. Tested against a raw peer
//! that completes the handshake and then never reads. And on the read
//! side, a peer that trickles a response cannot hold a waiting caller past
//! the frame timeout. And a request waiting for room in a full queue
//! leaves the reactor listening to the peer.

use std::io::{Read, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::{Client, Config, Error, TimeoutKind};

mod common;

/// Accepts one connection, runs the server side of the handshake by hand,
/// then holds the socket without reading it until `hold` passes.
fn silent_server(hold: Duration) -> (std::net::SocketAddr, thread::JoinHandle<()>) {
    common::raw_server(move |stream| {
        thread::sleep(hold);
        drop(stream);
    })
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

/// A server that answers with a frame it never finishes, a byte every 10
/// ms: each byte resets the read timeout, so only the frame timeout (judged
/// from the frame's first byte) can end it. A caller waiting for that
/// response sleeps in the socket's `recv`, woken by every byte; it must
/// fail at the frame timeout, not hold on until its own request timeout.
#[test]
fn a_trickled_response_fails_the_waiting_request_at_the_frame_timeout() {
    let (addr, server) = common::raw_server(|mut stream| {
        // The request (whatever it is), then a frame of 100 bytes whose
        // length prefix and first bytes come, and the rest never does.
        let mut request = [0u8; 256];
        assert!(stream.read(&mut request).unwrap() > 0);
        stream.write_all(&100u32.to_be_bytes()).unwrap();
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(5) {
            if stream.write_all(&[0x5a]).is_err() {
                return; // the client closed the connection
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let config = Config::default()
        .workers(1)
        .waiting(monte_rpc::Waiting::Block)
        .read_timeout(Some(Duration::from_millis(300)))
        .request_timeout(Some(Duration::from_secs(10)));
    let client = Client::new(addr, config).unwrap();
    let started = Instant::now();
    let error = client
        .request(b"ping", &mut Vec::new())
        .expect_err("a response that never completes completed");
    let waited = started.elapsed();
    assert_eq!(error.timeout_kind(), Some(TimeoutKind::Frame), "{error:?}");
    assert!(
        waited < Duration::from_secs(2),
        "the request failed only after {waited:?}: {error}"
    );
    drop(client);
    server.join().unwrap();
}

/// A request that has to wait for room in its connection's full queue
/// must not keep the reactor from hearing the peer meanwhile. A caller
/// waiting for its response reads the socket itself and turns the
/// reactor's readable events off; one still waiting to queue its request
/// reads nothing, so while it waits, a message the peer sends (or another
/// caller's response, or the end of the stream) must reach the reactor.
/// The peer here never reads, so the queue stays full and the request
/// waits until its timeout; the peer's message must be handled at once.
#[test]
fn a_request_waiting_for_room_leaves_the_reactor_listening() {
    common::within(30, || {
        let (send_now, told) = mpsc::channel::<()>();
        let (finish, done) = mpsc::channel::<()>();
        let (addr, server) = common::raw_server_with_session(move |mut stream, mut session| {
            told.recv().unwrap();
            let mut frame = Vec::new();
            session
                .sealer
                .seal_append(0, b"while you wait", &mut frame)
                .unwrap();
            stream.write_all(&frame).unwrap();
            let _ = done.recv();
        });
        let heard: Arc<Mutex<Option<Instant>>> = Arc::default();
        let handler = {
            let heard = heard.clone();
            move |ctx: &mut monte_rpc::Context<'_>| {
                assert_eq!(ctx.body(), b"while you wait");
                heard.lock().unwrap().get_or_insert_with(Instant::now);
            }
        };
        let config = Config::default()
            .workers(1)
            .max_conns(1)
            .max_queued_bytes(64 << 10)
            .send_buffer_size(Some(16 << 10))
            .write_timeout(None)
            .send_timeout(Some(Duration::from_secs(3)))
            .request_timeout(Some(Duration::from_secs(3)))
            .drain_timeout(Duration::from_millis(200));
        let client = Arc::new(Client::with_handler(addr, config, handler).unwrap());
        // Fill the queue: queued sends until one has waited its send
        // timeout (the peer reads nothing).
        let queued = Arc::new(AtomicU64::new(0));
        let filler = {
            let (client, queued) = (client.clone(), queued.clone());
            thread::spawn(move || {
                while client.send_no_wait(&[0x44; 8 << 10]).is_ok() {
                    queued.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        // Full once the count stands still.
        let mut last = u64::MAX;
        while queued.load(Ordering::Relaxed) != last {
            last = queued.load(Ordering::Relaxed);
            thread::sleep(Duration::from_millis(200));
        }
        assert!(last > 0, "nothing was queued");
        // A request that must wait for room (its 32 KiB do not fit beside
        // what is queued; a small one would fit, then read the socket
        // itself while it waits for its response), then the peer's message.
        let requester = {
            let client = client.clone();
            thread::spawn(move || client.request(&[0x52; 32 << 10], &mut Vec::new()))
        };
        thread::sleep(Duration::from_millis(200));
        let sent = Instant::now();
        send_now.send(()).unwrap();
        let handled =
            common::wait_until(Duration::from_secs(2), || heard.lock().unwrap().is_some());
        let request = requester.join().unwrap();
        assert!(
            handled,
            "the peer's message was not handled within 2 s of being sent while a \
             request waited for room (handled after {:?}; the request gave {request:?})",
            heard.lock().unwrap().map(|at| at.duration_since(sent))
        );
        assert!(
            matches!(
                request.as_ref().map_err(Error::root_cause),
                Err(Error::Timeout(_))
            ),
            "the request should have waited for room until its timeout: {request:?}"
        );
        filler.join().unwrap();
        finish.send(()).unwrap();
        server.join().unwrap();
        client.shutdown();
    });
}

/// A link that went silent for good under steady traffic, where some
/// request always waits on it: once it has been silent for as long as
/// the longest timeout among the requests waiting, a request's timeout
/// closes it, and the pool dials afresh. Four callers in a loop, 100 ms
/// each, overlapping: never does the connection have no request waiting
/// on it. With `patient_first`, a request with no timeout waits among
/// them too, answered after 300 ms (the link's last word): once it has
/// its answer, it lets the link be silent no longer.
fn a_link_silent_under_steady_traffic_is_closed(configured: Option<Duration>, patient_first: bool) {
    common::within(30, move || {
        // Answers nothing, ever, but the patient request (from a thread
        // of its own, after 300 ms).
        let server = monte_rpc::Server::bind(
            "127.0.0.1:0",
            common::server_config(),
            |ctx: &mut monte_rpc::Context<'_>| {
                if ctx.body() == b"patient" {
                    let (conn, seq) = (ctx.conn().clone(), ctx.seq());
                    thread::spawn(move || {
                        thread::sleep(Duration::from_millis(300));
                        let _ = conn.reply(seq, b"at last");
                    });
                }
            },
        )
        .unwrap();
        let client = one_connection_client(server.local_addr(), configured);
        let patient = patient_first.then(|| {
            let client = client.clone();
            thread::spawn(move || client.request_timeout(b"patient", &mut Vec::new(), None))
        });
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let callers: Vec<_> = (0..4u64)
            .map(|i| {
                let (client, stop) = (client.clone(), stop.clone());
                thread::spawn(move || {
                    thread::sleep(Duration::from_millis(25 * i));
                    while !stop.load(Ordering::SeqCst) {
                        let _ = client.request_timeout(
                            b"anyone?",
                            &mut Vec::new(),
                            Some(Duration::from_millis(100)),
                        );
                    }
                })
            })
            .collect();
        let closed = common::wait_until(Duration::from_secs(3), || {
            client.stats().connections_opened >= 2
        });
        stop.store(true, Ordering::SeqCst);
        for c in callers {
            c.join().unwrap();
        }
        if let Some(patient) = patient {
            patient
                .join()
                .unwrap()
                .expect("the patient request's answer");
        }
        assert!(
            closed,
            "the silent connection was never dropped under steady traffic"
        );
        client.shutdown();
        server.shutdown();
    });
}

#[test]
fn a_link_silent_under_steady_traffic_is_closed_with_a_configured_timeout() {
    a_link_silent_under_steady_traffic_is_closed(Some(Duration::from_millis(300)), false);
}

/// With none configured, the calls' own timeouts judge the silence: the
/// configured one alone did, so such a link was never dropped.
#[test]
fn a_link_silent_under_steady_traffic_is_closed_with_per_call_timeouts_only() {
    a_link_silent_under_steady_traffic_is_closed(None, false);
}

/// A request with no timeout judges the silence only while it waits: it
/// kept the link from ever being dropped while traffic went on.
#[test]
fn an_answered_request_without_a_timeout_does_not_keep_a_silent_link() {
    a_link_silent_under_steady_traffic_is_closed(None, true);
}

/// A patient request (3 s) that the server (one reactor, 150 ms
/// configured request timeout) answers after `slow`, and beside it, once
/// it is on the connection and `then` has passed, a `hasty` request that
/// times out with no byte back: the timeout is no proof the link is dead
/// while the patient request still waits, so the connection stays, and
/// the patient request gets its answer. With `only_the_patient_is_slow`
/// false, every request takes `slow` (the one reactor answers nothing
/// else meanwhile).
fn a_hasty_timeout_beside_a_patient_request(
    slow: Duration,
    only_the_patient_is_slow: bool,
    then: Duration,
    hasty: fn(&Client) -> monte_rpc::Result<()>,
) {
    common::within(30, move || {
        let started = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let seen = started.clone();
        let server = monte_rpc::Server::bind(
            "127.0.0.1:0",
            common::server_config().workers(1),
            move |ctx: &mut monte_rpc::Context<'_>| {
                let patient = ctx.body() == b"slow";
                if patient {
                    seen.store(true, Ordering::SeqCst);
                }
                if patient || !only_the_patient_is_slow {
                    thread::sleep(slow);
                }
                let _ = ctx.reply(b"done");
            },
        )
        .unwrap();
        // A request timeout shorter than the connection's idle time
        // below: idle time is no silence.
        let client = one_connection_client(server.local_addr(), Some(Duration::from_millis(150)));
        thread::sleep(Duration::from_millis(300));
        let patient = {
            let client = client.clone();
            thread::spawn(move || {
                let mut response = Vec::new();
                let result =
                    client.request_timeout(b"slow", &mut response, Some(Duration::from_secs(3)));
                (result, response)
            })
        };
        // The patient request is on the connection (its handler runs).
        assert!(common::wait_until(Duration::from_secs(2), || started.load(Ordering::SeqCst)));
        thread::sleep(then);
        assert_eq!(
            hasty(&client).unwrap_err().timeout_kind(),
            Some(TimeoutKind::Request)
        );
        let (result, response) = patient.join().unwrap();
        result.expect("the patient request, beside the hasty one's timeout");
        assert_eq!(response, b"done");
        assert_eq!(client.stats().connections_opened, 1);
        client.shutdown();
        server.shutdown();
    });
}

/// A hasty request of its own 30 ms timeout, on a server slow (150 ms)
/// to answer everything.
#[test]
fn a_short_timeout_does_not_close_a_connection_another_request_waits_on() {
    a_hasty_timeout_beside_a_patient_request(
        Duration::from_millis(150),
        false,
        Duration::ZERO,
        |client| client.request_timeout(b"hasty", &mut Vec::new(), Some(Duration::from_millis(30))),
    );
}

/// The hasty request with the configured timeout (150 ms), 300 ms into
/// the patient one's 1 s: the silence when it times out (450 ms) is
/// longer than the configured timeout but not than the patient request
/// allows. Judged by the configured timeout, the connection was closed
/// under the patient request, which failed 2.5 s early.
#[test]
fn a_hasty_timeout_does_not_close_a_connection_a_patient_request_waits_on() {
    a_hasty_timeout_beside_a_patient_request(
        Duration::from_secs(1),
        true,
        Duration::from_millis(300),
        |client| client.request(b"hasty", &mut Vec::new()),
    );
}

/// A server of one reactor with a 16 KiB receive buffer: a handler that
/// stalls it stops the reading of every connection, and the client's
/// queue fills soon.
fn one_reactor_reading_little(handler: impl monte_rpc::Handler) -> monte_rpc::Server {
    monte_rpc::Server::bind(
        "127.0.0.1:0",
        common::server_config()
            .workers(1)
            .recv_buffer_size(Some(16 << 10)),
        handler,
    )
    .unwrap()
}

/// A client of at most one connection to `addr`, with `request_timeout`,
/// dialled already (so that every request after shares that connection).
fn one_connection_client(
    addr: std::net::SocketAddr,
    request_timeout: Option<Duration>,
) -> Arc<Client> {
    let client = Client::new(
        addr,
        common::client_config()
            .max_conns(1)
            .request_timeout(request_timeout),
    )
    .unwrap();
    client.send(b"dial").unwrap();
    Arc::new(client)
}

/// A request with no timeout (`request_timeout(None)`) that must wait for
/// room in a full queue waits as long as it takes, as documented: not the
/// send timeout, which bounds sends only.
#[test]
fn a_request_without_a_timeout_waits_for_room_past_the_send_timeout() {
    common::within(30, || {
        let stalled = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let first = stalled.clone();
        let server = one_reactor_reading_little(move |ctx: &mut monte_rpc::Context<'_>| {
            // The first message stalls the one reactor: nothing is read
            // meanwhile, and the client's queue fills.
            if !first.swap(true, Ordering::SeqCst) {
                thread::sleep(Duration::from_millis(600));
            }
            if ctx.seq() != 0 {
                let _ = ctx.reply(b"room at last");
            }
        });
        let client = Client::new(
            server.local_addr(),
            common::client_config()
                .max_conns(1)
                .max_queued_bytes(64 << 10)
                .send_buffer_size(Some(16 << 10))
                .send_timeout(Some(Duration::from_millis(100))),
        )
        .unwrap();
        client.send(b"stall").unwrap();
        assert!(common::wait_until(Duration::from_secs(2), || stalled.load(Ordering::SeqCst)));
        // Fill the kernel's buffers and the queue, to less than 1 KiB of
        // room: the last send of each size waits out its send timeout.
        for size in [32 << 10, 1 << 10] {
            let chunk = vec![0u8; size];
            let mut full = false;
            for _ in 0..200 {
                if client.send_no_wait(&chunk).is_err() {
                    full = true;
                    break;
                }
            }
            assert!(full, "the queue never filled with {size}-byte messages");
        }
        let started = Instant::now();
        let mut response = Vec::new();
        client
            .request_timeout(&[7u8; 2048], &mut response, None)
            .expect("a request without a timeout, once the server reads again");
        assert_eq!(response, b"room at last");
        assert!(started.elapsed() > Duration::from_millis(150));
        client.shutdown();
        server.shutdown();
    });
}

/// With no write timeout nothing judges a queue that makes no progress:
/// a request's timeout with no byte back then still closes the connection
/// as dead (a peer that stopped reading for good would hold it, and every
/// call on it, for ever), queued output and all.
#[test]
fn with_no_write_timeout_a_silent_connection_with_queued_output_is_dropped() {
    common::within(30, || {
        // Completes the handshake, then never reads.
        let (addr, server) = silent_server(Duration::from_secs(3));
        let client = Client::new(
            addr,
            common::client_config()
                .max_conns(1)
                .write_timeout(None)
                .send_buffer_size(Some(16 << 10)),
        )
        .unwrap();
        let body = vec![7; 16 << 10];
        for _ in 0..16 {
            client.send_no_wait(&body).unwrap();
        }
        let e = client
            .request_timeout(
                b"anyone?",
                &mut Vec::new(),
                Some(Duration::from_millis(100)),
            )
            .unwrap_err();
        assert_eq!(e.timeout_kind(), Some(TimeoutKind::Request), "{e}");
        assert!(
            common::wait_until(Duration::from_secs(1), || client.connections() == 0),
            "the silent connection stayed"
        );
        client.shutdown();
        server.join().unwrap();
    });
}

/// A request's timeout on a connection whose queue still holds messages
/// that `send_no_wait` accepted (the server's one reactor busy in a slow
/// handler, reading nothing): the silence is no proof the link is dead
/// while output waits (the write timeout judges that), and closing the
/// connection dropped those messages, though every call had returned
/// `Ok`. They must all arrive.
#[test]
fn a_request_timeout_does_not_drop_messages_queued_on_its_connection() {
    common::within(30, || {
        let received = Arc::new(AtomicU64::new(0));
        let counted = received.clone();
        let server = one_reactor_reading_little(move |ctx: &mut monte_rpc::Context<'_>| {
            if ctx.body() == b"slow" {
                thread::sleep(Duration::from_millis(300));
            }
            if !ctx.expects_reply() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let client = Client::new(
            server.local_addr(),
            common::client_config()
                .max_conns(1)
                .send_buffer_size(Some(16 << 10)),
        )
        .unwrap();
        client.send_no_wait(b"slow").unwrap();
        let body = vec![7; 16 << 10];
        for _ in 0..32 {
            client.send_no_wait(&body).unwrap();
        }
        let e = client
            .request_timeout(b"hasty", &mut Vec::new(), Some(Duration::from_millis(50)))
            .unwrap_err();
        assert_eq!(e.timeout_kind(), Some(TimeoutKind::Request), "{e}");
        assert_eq!(client.connections(), 1, "the connection was closed");
        // A graceful shutdown writes what is queued.
        client.shutdown();
        assert!(
            common::wait_until(Duration::from_secs(5), || received.load(Ordering::SeqCst)
                == 33),
            "{} of 33 messages arrived",
            received.load(Ordering::SeqCst)
        );
        server.shutdown();
    });
}
