//! Connections that fail before their handshake finishes reach the
//! application through `Handler::on_handshake_failed`, with the reason.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monte_rpc::{Config, Context, Error, Handler, HandshakeError, Server, TimeoutKind};

#[derive(Default)]
struct Failures(Mutex<Vec<(Option<SocketAddr>, Error)>>);

struct Recorder(Arc<Failures>);

impl Handler for Recorder {
    fn on_message(&self, _ctx: &mut Context<'_>) {}
    fn on_handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        self.0 .0.lock().unwrap().push((peer, error.clone()));
    }
}

fn wait_for(failures: &Failures, peer: SocketAddr) -> Error {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((_, e)) = failures
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == Some(peer))
        {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "no handshake failure reported");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A silent peer is reported with the handshake timeout, a low-order key
/// with its handshake error, a peer that leaves mid-handshake as closed.
#[test]
fn handshake_failures_are_reported_with_their_reason() {
    let failures = Arc::new(Failures::default());
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server().handshake_timeout(Some(Duration::from_millis(200))),
        Recorder(failures.clone()),
    )
    .unwrap();

    let silent = TcpStream::connect(server.local_addr()).unwrap();
    let e = wait_for(&failures, silent.local_addr().unwrap());
    assert!(matches!(e, Error::Timeout(TimeoutKind::Handshake)), "{e:?}");

    let mut zero = TcpStream::connect(server.local_addr()).unwrap();
    zero.write_all(&[0u8; 32]).unwrap();
    let e = wait_for(&failures, zero.local_addr().unwrap());
    assert!(
        matches!(e, Error::Handshake(HandshakeError::LowOrderPublicKey)),
        "{e:?}"
    );

    leave_mid_handshake(server.local_addr(), &failures);
    server.shutdown();
}

/// Connects to `addr`, sends half a client key and leaves: the server
/// closes the connection mid-handshake and reports it (to `failures`) as
/// the peer's close.
fn leave_mid_handshake(addr: SocketAddr, failures: &Failures) {
    let mut gone = TcpStream::connect(addr).unwrap();
    let gone_addr = gone.local_addr().unwrap();
    gone.write_all(&[1u8; 10]).unwrap();
    drop(gone);
    let e = wait_for(failures, gone_addr);
    assert!(
        matches!(e, Error::Handshake(HandshakeError::PeerClosed)),
        "{e:?}"
    );
}

/// A server of the default handshake that answers every request "ok".
fn ok_server() -> Server {
    Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
        let _ = ctx.reply(b"ok");
    })
    .unwrap()
}

/// A handshake factory that panics on every second call (an
/// application's bug), standing in for any application code a handshake
/// runs.
struct PanicsEveryOther(std::sync::atomic::AtomicUsize);

impl PanicsEveryOther {
    fn check(&self) {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        assert!(n % 2 == 0, "this factory panics on every second call");
    }
}

impl monte_rpc::protocol::HandshakeFactory for PanicsEveryOther {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        self.check();
        monte_rpc::protocol::Profile::Secure.client()
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        self.check();
        monte_rpc::protocol::Profile::Secure.server()
    }
}

/// A server's handshake factory runs on a reactor as it takes a new
/// connection: its panic must fail that connection only, not unwind the
/// reactor (one worker here) and every connection on it.
#[test]
fn a_panicking_server_handshake_factory_fails_only_that_connection() {
    // The factory's second call panics.
    let stats =
        a_bad_second_handshake_spares_the_first(Arc::new(PanicsEveryOther(Default::default())));
    // A failed handshake like any other: counted.
    assert_eq!(stats.handshakes_failed, 1);
}

/// A handshake that says it used one byte more than it was given (an
/// application's bug): the bytes it claims are not there.
struct OverCounts(Box<dyn monte_rpc::protocol::Handshake>);

impl monte_rpc::protocol::Handshake for OverCounts {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        self.0.write_output(out)
    }
    fn read_input(&mut self, input: &[u8]) -> monte_rpc::Result<usize> {
        self.0.read_input(input)?;
        Ok(input.len() + 1)
    }
    fn take_session(&mut self) -> Option<monte_rpc::protocol::Session> {
        self.0.take_session()
    }
}

/// Hands out over-counting handshakes: the server's second (the first
/// is sound) and, with `client`, every client's.
struct OverCounting {
    calls: std::sync::atomic::AtomicUsize,
    client: bool,
}

impl monte_rpc::protocol::HandshakeFactory for OverCounting {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        let inner = monte_rpc::protocol::Profile::Secure.client()?;
        Ok(match self.client {
            true => Box::new(OverCounts(inner)),
            false => inner,
        })
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let inner = monte_rpc::protocol::Profile::Secure.server()?;
        Ok(match n {
            1 => Box::new(OverCounts(inner)),
            _ => inner,
        })
    }
}

fn is_over_count(e: &Error) -> bool {
    matches!(
        e.root_cause(),
        Error::Handshake(HandshakeError::UsedMoreThanGiven { .. })
    )
}

/// A server handshake that claims more input than it was given must fail
/// its own connection with that error, not slice past the receive buffer
/// and unwind the reactor (one worker here) with every connection on it.
#[test]
fn a_server_handshake_that_over_counts_its_input_fails_only_that_connection() {
    let failures = Arc::new(Failures::default());
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server()
            .workers(1)
            .handshake(Arc::new(OverCounting {
                calls: Default::default(),
                client: false,
            })),
        Recorder(failures.clone()),
    )
    .unwrap();
    let first = monte_rpc::Client::new(server.local_addr(), Config::default()).unwrap();
    first.send(b"first").unwrap();
    let mut second = TcpStream::connect(server.local_addr()).unwrap();
    second.write_all(&[1u8; 32]).unwrap();
    let e = wait_for(&failures, second.local_addr().unwrap());
    assert!(is_over_count(&e), "{e:?}");
    first
        .send(b"again")
        .expect("the first connection still works beside the second's failed handshake");
    assert_eq!(server.connections(), 1);
    // The application's handshake failed, not the peer.
    let stats = server.stats();
    assert_eq!(stats.handshakes_failed, 1);
    assert_eq!(stats.closed_protocol_error, 0);
    first.shutdown();
    server.shutdown();
}

/// The same on the client: the dial fails with the error, and the calling
/// thread does not panic.
#[test]
fn a_client_handshake_that_over_counts_its_input_fails_the_dial() {
    let server = ok_server();
    let config = Config::default()
        .dial_attempts(1)
        .handshake(Arc::new(OverCounting {
            calls: Default::default(),
            client: true,
        }));
    let client = monte_rpc::Client::new(server.local_addr(), config).unwrap();
    let e = client.request(b"one", &mut Vec::new()).unwrap_err();
    assert!(is_over_count(&e), "{e:?}");
    client.shutdown();
    server.shutdown();
}

/// Two clients of a one-worker server whose handshake `factory` fails
/// the second connection's handshake in its own way: the second's request
/// must fail, and the first's connection must still answer after it.
/// Returns the server's counters.
fn a_bad_second_handshake_spares_the_first(
    factory: Arc<dyn monte_rpc::protocol::HandshakeFactory>,
) -> monte_rpc::Stats {
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server().workers(1).handshake(factory),
        |ctx: &mut Context<'_>| {
            let _ = ctx.reply(b"ok");
        },
    )
    .unwrap();
    let config = Config::default()
        .max_conns(1)
        .dial_attempts(1)
        .request_timeout(Some(Duration::from_secs(3)));
    let first = monte_rpc::Client::new(server.local_addr(), config.clone()).unwrap();
    first.request(b"first", &mut Vec::new()).unwrap();
    let second = monte_rpc::Client::new(server.local_addr(), config).unwrap();
    assert!(second.request(b"second", &mut Vec::new()).is_err());
    first
        .request(b"again", &mut Vec::new())
        .expect("the first connection still answers beside the second's failed handshake");
    let stats = server.stats();
    second.shutdown();
    first.shutdown();
    server.shutdown();
    stats
}

/// An async call's dial runs on the pool's dial thread: a client
/// handshake factory that panics there must fail the call, not leave the
/// pool believing a dial is still running (the call then waited out its
/// whole timeout).
#[test]
fn a_panicking_client_handshake_factory_fails_the_async_call() {
    let server = ok_server();
    // Its first call (n = 0) goes through, so start it at 1: the first
    // dial panics.
    let factory = Arc::new(PanicsEveryOther(1.into()));
    let config = Config::default()
        .dial_attempts(1)
        .handshake(factory)
        .request_timeout(Some(Duration::from_secs(3)));
    let client = monte_rpc::Client::new(server.local_addr(), config).unwrap();
    let started = Instant::now();
    let outcome = futures::executor::block_on(client.request_async(b"one", &mut Vec::new()));
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the call took {took:?} ({outcome:?}): it waited out its timeout"
    );
    assert!(
        matches!(
            outcome.as_ref().map_err(Error::root_cause),
            Err(Error::Handshake(HandshakeError::Panicked))
        ),
        "{outcome:?}"
    );
    // Past the pool's backoff after a failed dial, the next dial goes
    // through.
    std::thread::sleep(Duration::from_millis(300));
    futures::executor::block_on(client.request_async(b"two", &mut Vec::new())).unwrap();
    client.shutdown();
    server.shutdown();
}

/// A client handshake that works, but whose drop panics when `panics`.
struct DropPanics(Box<dyn monte_rpc::protocol::Handshake>, bool);

impl monte_rpc::protocol::Handshake for DropPanics {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        self.0.write_output(out)
    }
    fn read_input(&mut self, input: &[u8]) -> monte_rpc::Result<usize> {
        self.0.read_input(input)
    }
    fn take_session(&mut self) -> Option<monte_rpc::protocol::Session> {
        self.0.take_session()
    }
}

impl Drop for DropPanics {
    fn drop(&mut self) {
        if self.1 && !std::thread::panicking() {
            panic!("this handshake's drop panics");
        }
    }
}

/// Hands out client handshakes whose drop panics, the first only.
struct FirstDropPanics(std::sync::atomic::AtomicUsize);

impl monte_rpc::protocol::HandshakeFactory for FirstDropPanics {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let inner = monte_rpc::protocol::Profile::Secure.client()?;
        Ok(Box::new(DropPanics(inner, n == 0)))
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        monte_rpc::protocol::Profile::Secure.server()
    }
}

/// A panic the pool's dial thread meets outside the handshake's steps
/// (here a handshake whose drop panics) must still let the pool know the
/// dial ended: it started no other dial after, and every async call that
/// found no connection waited out its whole timeout.
#[test]
fn a_panic_on_the_dial_thread_does_not_stop_later_dials() {
    let server = ok_server();
    let config = Config::default()
        .dial_attempts(1)
        .dial_backoff(Duration::ZERO)
        .handshake(Arc::new(FirstDropPanics(Default::default())))
        .request_timeout(Some(Duration::from_secs(3)));
    let client = monte_rpc::Client::new(server.local_addr(), config).unwrap();
    let started = Instant::now();
    // The first dial panics as its handshake is dropped; the call either
    // fails with it or gets a later dial's connection, but at once.
    let _ = futures::executor::block_on(client.request_async(b"one", &mut Vec::new()));
    let outcome = futures::executor::block_on(client.request_async(b"two", &mut Vec::new()));
    let took = started.elapsed();
    assert!(
        outcome.is_ok() && took < Duration::from_secs(2),
        "the calls after the dial thread's panic took {took:?}: {outcome:?}"
    );
    client.shutdown();
    server.shutdown();
}

/// Hands out server handshakes whose drop panics, all but the first.
struct LaterServerDropsPanic(std::sync::atomic::AtomicUsize);

impl monte_rpc::protocol::HandshakeFactory for LaterServerDropsPanic {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        monte_rpc::protocol::Profile::Secure.client()
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        let n = self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let inner = monte_rpc::protocol::Profile::Secure.server()?;
        Ok(Box::new(DropPanics(inner, n > 0)))
    }
}

/// A server's custom handshake is dropped on the reactor once it is done:
/// a drop that panics must fail that connection only, not unwind the
/// reactor (one worker here) and every connection on it.
#[test]
fn a_server_handshake_whose_drop_panics_fails_only_that_connection() {
    a_bad_second_handshake_spares_the_first(Arc::new(LaterServerDropsPanic(Default::default())));
}

/// A connection that closes before its handshake finishes drops the
/// handshake on the server's reactor too (the peer left, or its deadline
/// passed): a custom handshake whose drop panics there must fail that
/// connection only, not unwind the reactor (one worker here) and every
/// connection on it.
#[test]
fn an_unfinished_server_handshake_whose_drop_panics_fails_only_that_connection() {
    let failures = Arc::new(Failures::default());
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server()
            .workers(1)
            .handshake(Arc::new(LaterServerDropsPanic(Default::default()))),
        Replier(failures.clone()),
    )
    .unwrap();
    let config = Config::default()
        .max_conns(1)
        .dial_attempts(1)
        .request_timeout(Some(Duration::from_secs(3)));
    let first = monte_rpc::Client::new(server.local_addr(), config).unwrap();
    first.request(b"first", &mut Vec::new()).unwrap();
    leave_mid_handshake(server.local_addr(), &failures);
    first
        .request(b"again", &mut Vec::new())
        .expect("the first connection still answers beside the unfinished handshake's drop");
    first.shutdown();
    server.shutdown();
}

/// Replies "ok" and records failed handshakes.
struct Replier(Arc<Failures>);

impl Handler for Replier {
    fn on_message(&self, ctx: &mut Context<'_>) {
        let _ = ctx.reply(b"ok");
    }
    fn on_handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        self.0 .0.lock().unwrap().push((peer, error.clone()));
    }
}

/// A custom handshake that consumes nothing and never finishes: it waits
/// for a message larger than any frame.
struct Hoards;

impl monte_rpc::protocol::Handshake for Hoards {
    fn write_output(&mut self, _out: &mut Vec<u8>) {}
    fn read_input(&mut self, _input: &[u8]) -> monte_rpc::Result<usize> {
        Ok(0)
    }
    fn take_session(&mut self) -> Option<monte_rpc::protocol::Session> {
        None
    }
}

impl monte_rpc::protocol::HandshakeFactory for Hoards {
    fn client(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        Ok(Box::new(Hoards))
    }
    fn server(&self) -> monte_rpc::Result<Box<dyn monte_rpc::protocol::Handshake>> {
        Ok(Box::new(Hoards))
    }
}

/// A dialling handshake that leaves the peer's bytes unconsumed fails
/// once it holds as much as the largest frame: it held all the peer sent
/// (here 1 MiB) until the handshake deadline, and failed only then.
#[test]
fn a_client_handshake_that_consumes_nothing_fails_at_the_largest_frame() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = std::thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let chunk = [0x55u8; 16 << 10];
        for _ in 0..64 {
            if stream.write_all(&chunk).is_err() {
                return;
            }
        }
        // Open until the client gives up.
        let _ = std::io::Read::read(&mut stream, &mut [0u8; 1]);
    });
    let config = Config::default()
        .dial_attempts(1)
        .max_message_size(64 << 10)
        .handshake_timeout(Some(Duration::from_secs(10)))
        .handshake(Arc::new(Hoards));
    let client = monte_rpc::Client::new(addr, config).unwrap();
    let started = Instant::now();
    let e = client.send(b"one").unwrap_err();
    assert!(
        matches!(
            e.root_cause(),
            Error::Handshake(HandshakeError::LeftUnconsumed { .. })
        ),
        "{e:?}"
    );
    assert!(e.to_string().contains("the handshake left"), "{e}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "failed at the deadline: {e}"
    );
    client.shutdown();
    peer.join().unwrap();
}

/// A server whose `on_open` sends at once, right behind its handshake's
/// last message, to a client with small limits (512-byte messages, a
/// 1 KiB read buffer): the client's last handshake read takes those
/// frames along. They follow a finished handshake and are not its to
/// hold: the dial must succeed (and the frames reach the client).
#[test]
fn frames_right_behind_the_handshake_are_not_counted_against_it() {
    struct Greets;
    impl Handler for Greets {
        fn on_message(&self, ctx: &mut Context<'_>) {
            let _ = ctx.reply(b"");
        }
        fn on_open(&self, conn: &monte_rpc::Connection) {
            for _ in 0..8 {
                let _ = conn.send_no_wait(&[0x47; 400]);
            }
        }
    }
    let server = Server::bind("127.0.0.1:0", Config::server(), Greets).unwrap();
    let greetings = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    for _ in 0..20 {
        let heard = greetings.clone();
        let counted = greetings.clone();
        let config = Config::default()
            .dial_attempts(1)
            .max_message_size(512)
            .read_buffer_size(1024);
        let client = monte_rpc::Client::with_handler(
            server.local_addr(),
            config,
            move |_: &mut Context<'_>| {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            },
        )
        .unwrap();
        client
            .request(b"after the greetings", &mut Vec::new())
            .expect("the dial, with frames right behind the handshake");
        // The greetings came before the answer: read past by the caller,
        // set aside, handed to the handler.
        let deadline = Instant::now() + Duration::from_secs(5);
        while heard.load(std::sync::atomic::Ordering::SeqCst) < 8 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
        client.shutdown();
        assert_eq!(greetings.swap(0, std::sync::atomic::Ordering::SeqCst), 8);
    }
    server.shutdown();
}
