//! Dialling: every call's deadline covers the dial (connect attempts, the
//! pauses between them and the handshake), a client that just failed to
//! dial backs off instead of dialling again per call, and dial errors name
//! the address and the phase, and say so when the peer speaks another
//! protocol.
//!
//! The endpoints are loopback listeners that misbehave on purpose: one
//! whose accept backlog is full (connects hang), one that accepts and says
//! nothing, one that accepts and hangs up, one that answers like an HTTP
//! server. Every call runs under [`common::within`], so a regression fails
//! the test instead of hanging it.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use socket2::{Domain, SockAddr, Socket, Type};

use common::within;
use monte_rpc::{
    handler, Client, Config, DialPhase, Error, Handler, HandshakeError, Profile, Reactor,
    ReactorHandle, TimeoutKind,
};

/// The settings these tests dial with: the defaults for everything about
/// dialling (5 s connect timeout, 3 attempts, 5 s handshake timeout), so
/// that a dial the call's deadline does not end takes 15 s or more.
fn config() -> Config {
    Config::default().workers(1)
}

/// A listener with a backlog of 0 that never accepts, filled with raw
/// connects until one of them hangs: on Linux a SYN to a full accept queue
/// is dropped, so a connect to it blocks until its own timeout. Returns the
/// address and what must stay alive for the backlog to stay full.
fn full_backlog() -> (SocketAddr, Socket, Vec<Socket>) {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&SockAddr::from(any)).unwrap();
    listener.listen(0).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    let mut fillers = Vec::new();
    for _ in 0..64 {
        let s = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
        match s.connect_timeout(&SockAddr::from(addr), Duration::from_millis(200)) {
            Ok(()) => fillers.push(s),
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                return (addr, listener, fillers);
            }
            Err(e) => panic!("filling the backlog: {e}"),
        }
    }
    panic!("the backlog of {addr} never filled");
}

/// A listener that accepts every connection and holds it without a word:
/// the client's connect succeeds and its handshake waits.
fn mute_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            match stream {
                Ok(s) => held.push(s),
                Err(_) => return,
            }
        }
    });
    addr
}

/// Runs `call` on the client, failing the test if it takes more than 5 s
/// (the old code took 15), and returns its error and how long it took.
fn timed(
    client: &Arc<Client>,
    call: impl FnOnce(&Client) -> monte_rpc::Result<()> + Send + 'static,
) -> (Error, Duration) {
    let client = client.clone();
    within(5, move || {
        let start = Instant::now();
        let result = call(&client);
        (result.expect_err("the call succeeded"), start.elapsed())
    })
}

/// Whether `e` is a dial of `addr` that `kind`'s deadline ended in `phase`.
fn cut_short(e: &Error, addr: SocketAddr, phase: DialPhase, kind: TimeoutKind) -> bool {
    matches!(e, Error::Dial { addr: a, phase: p, .. } if *a == addr && *p == phase)
        && e.timeout_kind() == Some(kind)
}

const BOUND: Duration = Duration::from_millis(1500);

/// Runs a request with `timeout` on `client` and checks that it fails as
/// a dial of `addr` that `kind`'s deadline ended in `phase`, within
/// [`BOUND`] and no sooner than `at_least`. Returns its error.
fn request_cut_short(
    client: &Arc<Client>,
    timeout: Duration,
    at_least: Duration,
    (addr, phase, kind): (SocketAddr, DialPhase, TimeoutKind),
) -> Error {
    let (e, took) = timed(client, move |c| {
        c.request_timeout(b"ping", &mut Vec::new(), Some(timeout))
    });
    assert!(took < BOUND, "took {took:?}: {e}");
    assert!(took >= at_least, "took {took:?}: {e}");
    assert!(cut_short(&e, addr, phase, kind), "{e:?}");
    e
}

#[test]
fn a_request_to_a_full_backlog_fails_by_its_own_deadline() {
    let (addr, _listener, _fillers) = full_backlog();
    let client = Arc::new(Client::new(addr, config()).unwrap());
    let e = request_cut_short(
        &client,
        Duration::from_secs(1),
        Duration::from_millis(900),
        (addr, DialPhase::Connect, TimeoutKind::Request),
    );
    assert_eq!(
        e.to_string(),
        format!("dialling {addr}: connect: request timeout")
    );
}

#[test]
fn send_and_send_no_wait_to_a_full_backlog_fail_by_the_send_timeout() {
    let (addr, _listener, _fillers) = full_backlog();
    let config = config().send_timeout(Some(Duration::from_secs(1)));
    let client = Arc::new(Client::new(addr, config).unwrap());
    let (e, took) = timed(&client, |c| c.send_no_wait(b"hello"));
    assert!(took < BOUND, "send_no_wait took {took:?}: {e}");
    assert!(
        cut_short(&e, addr, DialPhase::Connect, TimeoutKind::Write),
        "{e:?}"
    );
    let (e, took) = timed(&client, |c| c.send(b"hello"));
    assert!(took < BOUND, "send took {took:?}: {e}");
    assert_eq!(e.timeout_kind(), Some(TimeoutKind::Write), "{e:?}");
}

#[test]
fn a_request_whose_handshake_stalls_fails_by_its_own_deadline() {
    let addr = mute_server();
    let client = Arc::new(Client::new(addr, config()).unwrap());
    request_cut_short(
        &client,
        Duration::from_secs(1),
        Duration::ZERO,
        (addr, DialPhase::Handshake, TimeoutKind::Request),
    );
}

/// The dial's own timeouts still apply within a longer call deadline, and
/// are reported as theirs.
#[test]
fn the_dials_own_timeouts_still_apply_within_the_calls() {
    let (addr, _listener, _fillers) = full_backlog();
    let config = config()
        .dial_timeout(Some(Duration::from_millis(200)))
        .dial_attempts(2);
    let client = Arc::new(Client::new(addr, config).unwrap());
    let (e, took) = timed(&client, |c| {
        c.request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_secs(3)))
    });
    // Two attempts of 200 ms and a 10 ms pause.
    assert!(took < Duration::from_millis(1000), "took {took:?}: {e}");
    assert!(
        cut_short(&e, addr, DialPhase::Connect, TimeoutKind::Dial),
        "{e:?}"
    );

    let addr = mute_server();
    let config = Config::default()
        .workers(1)
        .handshake_timeout(Some(Duration::from_millis(200)));
    let client = Arc::new(Client::new(addr, config).unwrap());
    let (e, took) = timed(&client, |c| {
        c.request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_secs(3)))
    });
    assert!(took < Duration::from_millis(1000), "took {took:?}: {e}");
    assert!(
        cut_short(&e, addr, DialPhase::Handshake, TimeoutKind::Handshake),
        "{e:?}"
    );
    assert_eq!(
        e.to_string(),
        format!("dialling {addr}: handshake: handshake timeout")
    );
}

/// A custom handshake whose client opens with a message far larger than
/// the socket buffers (a long certificate chain, say) and then waits for
/// an answer that never comes: against [`mute_server`], its write blocks.
struct LongHello;

impl monte_rpc::protocol::Handshake for LongHello {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        out.resize(4 << 20, 7);
    }
    fn read_input(&mut self, _input: &[u8]) -> monte_rpc::Result<usize> {
        Ok(0)
    }
    fn take_session(&mut self) -> Option<monte_rpc::protocol::Session> {
        None
    }
}

impl monte_rpc::protocol::HandshakeFactory for LongHello {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        Ok(Box::new(LongHello))
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        Ok(Box::new(LongHello))
    }
}

/// A handshake write the peer does not take waits only until the dial's
/// deadline: the handshake timeout, or the call's when that is sooner.
/// (The wait for room runs between the writes, not in the read that the
/// mute-server tests above end in.)
#[test]
fn a_handshake_write_the_peer_does_not_take_ends_by_the_deadline() {
    let addr = mute_server();
    let config = config()
        .handshake(Arc::new(LongHello))
        .send_buffer_size(Some(16 << 10))
        .handshake_timeout(Some(Duration::from_millis(300)));
    let client = Arc::new(Client::new(addr, config.clone()).unwrap());
    request_cut_short(
        &client,
        Duration::from_secs(3),
        Duration::from_millis(250),
        (addr, DialPhase::Handshake, TimeoutKind::Handshake),
    );

    // The call's deadline, when it comes first, ends the wait as its own.
    let config = config.handshake_timeout(Some(Duration::from_secs(5)));
    let client = Arc::new(Client::new(addr, config).unwrap());
    request_cut_short(
        &client,
        Duration::from_millis(300),
        Duration::ZERO,
        (addr, DialPhase::Handshake, TimeoutKind::Request),
    );
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

/// A refused dial whose call's deadline falls just after the pause before
/// the next attempt: the pause (a sleep, which ends late) may end past the
/// deadline, or the deadline ends the next attempt before its refusal
/// comes. The call failed with `Timeout(Request)` then, hiding the
/// refusal; the refusal is now the dial's error, as when the pause is
/// skipped for want of time.
#[test]
fn a_deadline_passed_in_the_pause_between_attempts_keeps_the_refusal() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    within(30, move || {
        // The pauses are 10 and 20 ms; deadlines from just before the
        // second one's end to 2 ms past it, in steps finer than a sleep's
        // lateness. (The first attempt then has 30 ms to be made: a
        // deadline that ends it, on a loaded machine, says nothing of a
        // refusal.)
        for slack_us in (0..2000).step_by(50) {
            let client = Client::new(addr, config().dial_attempts(3)).unwrap();
            let timeout = Duration::from_micros(30_000 + slack_us);
            let e = client
                .request_timeout(b"hello", &mut Vec::new(), Some(timeout))
                .expect_err("nothing listens");
            assert_eq!(
                e.io_kind(),
                std::io::ErrorKind::ConnectionRefused,
                "deadline {timeout:?}: {e:?}"
            );
        }
    });
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

#[test]
fn a_client_that_failed_to_dial_backs_off_instead_of_dialling_per_call() {
    let (addr, accepted) = hang_up_server();
    let config = config()
        .dial_attempts(1)
        .dial_backoff(Duration::from_millis(300));
    let client = Client::new(addr, config).unwrap();
    within(10, move || {
        let first = client.send(b"hello").expect_err("the dial succeeded");
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
        // Within the backoff, each call fails at once with the dial's
        // error, and none dials.
        let start = Instant::now();
        let errors: Vec<Error> = (0..20)
            .map(|_| client.send(b"hello").expect_err("a call succeeded"))
            .collect();
        let took = start.elapsed();
        assert_eq!(accepted.load(Ordering::SeqCst), 1, "calls dialled");
        assert!(took < Duration::from_millis(100), "20 calls took {took:?}");
        for e in errors {
            assert_eq!(e.to_string(), first.to_string());
        }
        // After it, the next call dials again.
        thread::sleep(Duration::from_millis(350));
        let _ = client.send(b"hello").expect_err("the dial succeeded");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    });
}

#[test]
fn calls_after_a_refused_dial_cost_less_than_one_dial() {
    let addr = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // Three refused attempts, 10 and 20 ms apart: one dial takes 30 ms.
    let client = Client::new(addr, config()).unwrap();
    within(10, move || {
        let start = Instant::now();
        let first = client.request(b"ping", &mut Vec::new()).unwrap_err();
        let dial = start.elapsed();
        assert!(dial >= Duration::from_millis(30), "the dial took {dial:?}");
        let start = Instant::now();
        for _ in 0..50 {
            let e = client.request(b"ping", &mut Vec::new()).unwrap_err();
            assert_eq!(e.to_string(), first.to_string());
        }
        let calls = start.elapsed();
        assert!(calls < dial, "50 calls took {calls:?}, one dial {dial:?}");
    });
}

/// An endpoint that serves, holds without a word, or hangs up, as the
/// test says.
struct Switchboard {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
    serve: Arc<AtomicBool>,
    mute: Arc<AtomicBool>,
    reactor: ReactorHandle,
}

/// A listener that counts the connections it accepts and, while `serve`
/// is set, hands them to a reactor that answers requests; else, while
/// `mute` is set, holds them without a word (the handshake stalls); else
/// hangs up.
fn switchboard() -> Switchboard {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reactor = Reactor::new(Config::server().workers(1)).unwrap();
    let handle = reactor.handle();
    thread::spawn(move || reactor.run());
    let accepted = Arc::new(AtomicUsize::new(0));
    let serve = Arc::new(AtomicBool::new(false));
    let mute = Arc::new(AtomicBool::new(false));
    let (count, serving, muted, to) = (
        accepted.clone(),
        serve.clone(),
        mute.clone(),
        handle.clone(),
    );
    thread::spawn(move || {
        let answer: Arc<dyn Handler> = Arc::new(handler(|ctx| {
            let _ = ctx.reply(b"pong");
        }));
        let mut held = Vec::new();
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            count.fetch_add(1, Ordering::SeqCst);
            if serving.load(Ordering::SeqCst) {
                let _ = to.accept(stream, answer.clone());
            } else if muted.load(Ordering::SeqCst) {
                held.push(stream);
            }
        }
    });
    Switchboard {
        addr,
        accepted,
        serve,
        mute,
        reactor: handle,
    }
}

#[test]
fn the_backoff_doubles_and_starts_afresh_after_a_dial_that_succeeds() {
    let board = switchboard();
    let config = config()
        .dial_attempts(1)
        .dial_backoff(Duration::from_millis(300))
        .request_timeout(Some(Duration::from_secs(3)));
    let client = Client::new(board.addr, config).unwrap();
    within(20, move || {
        let dials = || board.accepted.load(Ordering::SeqCst);
        let request = || client.request(b"ping", &mut Vec::new());
        assert!(request().is_err());
        assert_eq!(dials(), 1);
        // 350 ms on: past the first backoff (300 ms), so it dials, fails,
        // and the backoff doubles to 600 ms.
        thread::sleep(Duration::from_millis(350));
        assert!(request().is_err());
        assert_eq!(dials(), 2);
        // 350 ms on: within the doubled backoff.
        thread::sleep(Duration::from_millis(350));
        assert!(request().is_err());
        assert_eq!(dials(), 2, "dialled within the doubled backoff");
        // Past it, with the endpoint serving: the dial succeeds.
        board.serve.store(true, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(300));
        request().unwrap();
        assert_eq!(dials(), 3);
        // The endpoint goes: its reactor closes the connection and the
        // listener hangs up on new ones.
        board.serve.store(false, Ordering::SeqCst);
        board.reactor.stop();
        assert!(common::wait_until(Duration::from_secs(5), || client
            .connections()
            == 0));
        assert!(request().is_err());
        assert_eq!(dials(), 4);
        // The success ended the doubling: 350 ms is past the backoff again.
        thread::sleep(Duration::from_millis(350));
        assert!(request().is_err());
        assert_eq!(dials(), 5, "the backoff did not start afresh");
    });
}

/// Dials that calls cut short (the endpoint too slow for their deadlines)
/// are no failures of the endpoint's own: they must not double the
/// backoff that a later real failure starts, or a client that met a slow
/// endpoint would, once it fails for real, hold back every call for as
/// many doublings as it had slow calls.
#[test]
fn dials_cut_short_by_their_calls_do_not_double_the_backoff() {
    let board = switchboard();
    let config = config()
        .dial_attempts(1)
        .dial_backoff(Duration::from_millis(400))
        .dial_backoff_max(Duration::from_secs(10));
    let client = Client::new(board.addr, config).unwrap();
    within(20, move || {
        let dials = || board.accepted.load(Ordering::SeqCst);
        let request = |timeout: u64| {
            client.request_timeout(
                b"ping",
                &mut Vec::new(),
                Some(Duration::from_millis(timeout)),
            )
        };
        // Two dials the calls' deadlines end while the handshake stalls
        // (the second call has more than twice the first's time: not held
        // back by it).
        board.mute.store(true, Ordering::SeqCst);
        for (timeout, dialled) in [(100, 1), (1000, 2)] {
            let e = request(timeout).unwrap_err();
            assert!(
                matches!(e.root_cause(), Error::Timeout(TimeoutKind::Request)),
                "{e:?}"
            );
            // The acceptor counts on its own thread.
            assert!(
                common::wait_until(Duration::from_secs(5), || dials() == dialled),
                "{} dials, not {dialled}",
                dials()
            );
        }
        // A real failure: the endpoint hangs up (a call with more than
        // twice the last cut-short dial's time is not held back by it). Its
        // backoff is the first one, 400 ms.
        board.mute.store(false, Ordering::SeqCst);
        let e = request(3000).unwrap_err();
        assert!(
            !matches!(e.root_cause(), Error::Timeout(_)),
            "the endpoint hung up: {e:?}"
        );
        assert!(common::wait_until(Duration::from_secs(5), || dials() == 3));
        // Past 400 ms (and well within 1.6 s, the backoff after three
        // failures in a row), with the endpoint serving: the call dials.
        board.serve.store(true, Ordering::SeqCst);
        thread::sleep(Duration::from_millis(600));
        request(3000).expect("a call past the backoff of one failure");
        assert!(common::wait_until(Duration::from_secs(5), || dials() == 4));
    });
}

/// A listener that answers every connection like an HTTP server given a
/// request it cannot parse: a `400 Bad Request`, then it hangs up.
fn http_server() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut request = [0u8; 64];
            let _ = s.read(&mut request);
            let _ = s.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n\
                  Connection: close\r\n\r\n400 Bad Request",
            );
        }
    });
    addr
}

#[test]
fn an_http_server_is_a_handshake_failure_not_a_frame_error() {
    for profile in [Profile::Secure, Profile::Monte] {
        let addr = http_server();
        let config = config().dial_attempts(1).profile(profile);
        let client = Arc::new(Client::new(addr, config).unwrap());
        let (e, _) = timed(&client, |c| {
            c.request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_secs(2)))
        });
        // Before: "frame of 1949127801 bytes exceeds the maximum of
        // 1048596", the first frame's "length" being "t-Ty".
        assert_eq!(
            e.to_string(),
            format!(
                "dialling {addr}: handshake: the peer does not speak this protocol: it sent \
                 \"HTTP/1.1 400 Bad\"..., and what followed the handshake is not a frame \
                 within the size limit"
            ),
            "{profile:?}"
        );
        assert!(
            matches!(
                e.root_cause(),
                Error::Handshake(HandshakeError::NotThisProtocol { sent, sent_len: 16 })
                    if sent == b"HTTP/1.1 400 Bad"
            ),
            "{e:?}"
        );
        assert_eq!(client.stats().handshakes_failed, 1);
        assert_eq!(client.connections(), 0);
    }
}

/// A relay in front of `upstream` that holds each connection for `delay`
/// before it connects upstream, passes the client's 32-byte key and every
/// byte back, and then reads nothing more from the client: the client's
/// handshake takes `delay`, and its first large write then blocks.
fn slow_then_deaf_relay(upstream: SocketAddr, delay: Duration) -> SocketAddr {
    let listener = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    // Accepted sockets inherit a small receive buffer: the writes block
    // after a few tens of KiB.
    listener.set_recv_buffer_size(16 << 10).unwrap();
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    listener.bind(&SockAddr::from(any)).unwrap();
    listener.listen(8).unwrap();
    let addr = listener.local_addr().unwrap().as_socket().unwrap();
    thread::spawn(move || {
        let mut held = Vec::new();
        while let Ok((client, _)) = listener.accept() {
            let mut client: std::net::TcpStream = client.into();
            thread::sleep(delay);
            let Ok(mut server) = std::net::TcpStream::connect(upstream) else {
                return;
            };
            let mut key = [0u8; 32];
            if client.read_exact(&mut key).is_err() || server.write_all(&key).is_err() {
                return;
            }
            let mut back = client.try_clone().unwrap();
            let mut from_server = server.try_clone().unwrap();
            thread::spawn(move || std::io::copy(&mut from_server, &mut back));
            held.push((client, server));
        }
    });
    addr
}

// A send that must dial spends its send timeout on the dial and the write
// together: a handshake that takes 600 ms leaves 400 ms of a 1 s send
// timeout for a write the peer never reads. Before, the write got a send
// timeout of its own and the call took 1.6 s.
#[test]
fn a_send_that_dials_ends_by_its_send_timeout_write_included() {
    // A short drain, so that shutting down does not wait out the held
    // connection.
    let server = monte_rpc::Server::bind(
        "127.0.0.1:0",
        Config::server()
            .workers(1)
            .write_timeout(Some(Duration::from_millis(500))),
        handler(|_| {}),
    )
    .unwrap();
    let relay = slow_then_deaf_relay(server.local_addr(), Duration::from_millis(600));
    // The write timeout setter sets the send and drain timeouts with it:
    // dropping the client then gives up its unsent 4 MiB after 1 s.
    let config = config()
        .write_timeout(Some(Duration::from_secs(1)))
        .max_message_size(8 << 20)
        .send_buffer_size(Some(16 << 10));
    let client = Arc::new(Client::new(relay, config).unwrap());
    let (e, took) = timed(&client, |c| c.send(&vec![7u8; 4 << 20]));
    assert_eq!(e.timeout_kind(), Some(TimeoutKind::Write), "{e}");
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_millis(1300),
        "took {took:?}"
    );
    server.shutdown();
}

/// Hands out the server's handshakes a while after each connection comes
/// (the factory runs on the server's reactor, which waits with it).
struct SlowServerHandshakes(Duration);

impl monte_rpc::protocol::HandshakeFactory for SlowServerHandshakes {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        monte_rpc::protocol::Profile::Secure.client()
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        thread::sleep(self.0);
        monte_rpc::protocol::Profile::Secure.server()
    }
}

/// A dial cut short by its own call's deadline says nothing about the
/// endpoint: the next call, with time enough, dials again and gets its
/// answer, rather than the first call's error for the backoff.
#[test]
fn a_dial_cut_short_by_its_calls_deadline_starts_no_backoff() {
    within(30, || {
        let server = monte_rpc::Server::bind(
            "127.0.0.1:0",
            common::server_config()
                .workers(1)
                .handshake(Arc::new(SlowServerHandshakes(Duration::from_millis(50)))),
            |ctx: &mut monte_rpc::Context<'_>| {
                let _ = ctx.reply(b"pong");
            },
        )
        .unwrap();
        let client = Client::new(server.local_addr(), common::client_config()).unwrap();
        let hasty =
            client.request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_millis(10)));
        assert_eq!(
            hasty.unwrap_err().timeout_kind(),
            Some(TimeoutKind::Request)
        );
        let mut response = Vec::new();
        client
            .request_timeout(b"ping", &mut response, Some(Duration::from_secs(3)))
            .expect("a call with time enough, right after one whose dial ran out of its own");
        assert_eq!(response, b"pong");
        client.shutdown();
        server.shutdown();
    });
}

/// The backoff after a dial its call's deadline cut short still holds back
/// the calls with no more time than it had: against an endpoint that
/// accepts and never answers, a second short call fails at once with the
/// first's error instead of spending its own deadline on a dial.
#[test]
fn a_dial_cut_short_holds_back_calls_with_no_more_time() {
    within(30, || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // Accepts, and keeps every socket without a word.
        let held = std::thread::spawn(move || {
            let mut kept = Vec::new();
            listener.set_nonblocking(true).unwrap();
            let until = Instant::now() + Duration::from_secs(3);
            while Instant::now() < until {
                if let Ok((s, _)) = listener.accept() {
                    kept.push(s);
                }
                thread::sleep(Duration::from_millis(2));
            }
            kept.len()
        });
        let client = Client::new(addr, common::client_config()).unwrap();
        let first =
            client.request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_millis(100)));
        assert_eq!(
            first.unwrap_err().timeout_kind(),
            Some(TimeoutKind::Request)
        );
        let started = Instant::now();
        let second =
            client.request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_millis(80)));
        let took = started.elapsed();
        assert!(
            matches!(&second, Err(Error::Dial { .. })),
            "the second call: {second:?}"
        );
        assert!(
            took < Duration::from_millis(40),
            "the second call dialled for {took:?} instead of failing with the first's error"
        );
        client.shutdown();
        assert_eq!(held.join().unwrap(), 1, "the second call dialled");
    });
}

/// A call held back by a dial another call's deadline cut short fails
/// because its own time would not do either: with a timeout of its own
/// kind. A request behind a send's cut-short dial said `Write`.
#[test]
fn a_call_held_back_by_a_cut_short_dial_fails_with_its_own_timeout_kind() {
    within(30, || {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        // A backoff long enough that the request surely comes within it.
        let client = Client::new(
            addr,
            common::client_config()
                .send_timeout(Some(Duration::from_millis(100)))
                .dial_backoff(Duration::from_secs(5)),
        )
        .unwrap();
        // The backlog connects it; nothing ever answers the handshake.
        let sent = client.send(b"ping").unwrap_err();
        assert_eq!(sent.timeout_kind(), Some(TimeoutKind::Write), "{sent}");
        let started = Instant::now();
        let requested = client
            .request_timeout(b"ping", &mut Vec::new(), Some(Duration::from_millis(150)))
            .unwrap_err();
        assert!(
            started.elapsed() < Duration::from_millis(100),
            "the request dialled: {requested}"
        );
        assert!(
            matches!(&requested, Error::Dial { addr: a, .. } if *a == addr),
            "{requested:?}"
        );
        assert_eq!(
            requested.timeout_kind(),
            Some(TimeoutKind::Request),
            "{requested}"
        );
        client.shutdown();
        drop(listener);
    });
}

/// A backoff meant as "for ever" (`Duration::MAX`) holds back every later
/// call; it was too long to add to the clock and became no backoff at all.
#[test]
fn a_backoff_meant_as_for_ever_holds_back_every_later_call() {
    let (addr, accepted) = hang_up_server();
    let config = config()
        .dial_attempts(1)
        .dial_backoff(Duration::MAX)
        .dial_backoff_max(Duration::MAX);
    let client = Client::new(addr, config).unwrap();
    within(10, move || {
        client.send(b"hello").expect_err("the dial succeeded");
        client.send(b"hello").expect_err("the dial succeeded");
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the second call dialled"
        );
    });
}
