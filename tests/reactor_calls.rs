//! Handlers calling back into the library on their own reactor thread:
//! sends are queued rather than waited on (the thread that waits would be
//! the one that must write), and a request fails at once instead of
//! waiting for itself.

mod common;

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_until, within};
use monte_rpc::{Client, Config, Context, Error, Server};

/// A handler's send, send_no_wait and request on its own connection.
#[test]
fn handler_calls_on_its_own_reactor_do_not_block_it() {
    within(30, || {
        let outcome: Arc<Mutex<Option<Result<(), Error>>>> = Arc::default();
        let seen = outcome.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            move |ctx: &mut Context<'_>| {
                let conn = ctx.conn().clone();
                for _ in 0..100 {
                    conn.send_no_wait(b"pushed").unwrap();
                    conn.send(b"pushed").unwrap();
                }
                let mut resp = Vec::new();
                *seen.lock().unwrap() = Some(conn.request(b"ask", &mut resp));
                let _ = ctx.reply(b"done");
            },
        )
        .unwrap();
        let pushed = Arc::new(AtomicUsize::new(0));
        let counter = pushed.clone();
        let client = Client::with_handler(
            server.local_addr(),
            Config::default().request_timeout(Some(Duration::from_secs(5))),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"pushed" {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .unwrap();
        let mut resp = Vec::new();
        client.request(b"go", &mut resp).unwrap();
        assert_eq!(resp, b"done");
        let outcome = outcome.lock().unwrap().take();
        assert!(
            matches!(
                outcome
                    .as_ref()
                    .map(|r| r.as_ref().map_err(Error::root_cause)),
                Some(Err(Error::OnReactorThread))
            ),
            "{outcome:?}"
        );
        assert!(
            wait_until(Duration::from_secs(5), || pushed.load(Ordering::Relaxed)
                == 200),
            "only {} of 200 pushed messages arrived",
            pushed.load(Ordering::Relaxed)
        );
        client.shutdown();
        server.shutdown();
    });
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4096
}

/// A peer that pipelines requests and never reads the replies: the server
/// stops reading it once `max_queued_bytes` of replies wait, so what it
/// holds stays bounded, and the write timeout closes the connection.
#[test]
fn a_peer_that_never_reads_its_replies_cannot_grow_the_server() {
    use monte_rpc::protocol::{ClientHandshake, Handshake, Profile};
    use std::io::{Read, Write};
    use std::net::TcpStream;
    within(60, || {
        let closed: Arc<Mutex<Option<Error>>> = Arc::default();
        struct Big(Arc<Mutex<Option<Error>>>, Vec<u8>);
        impl monte_rpc::Handler for Big {
            fn on_message(&self, ctx: &mut Context<'_>) {
                let _ = ctx.reply(&self.1);
            }
            fn on_close(&self, _conn: &monte_rpc::Connection, reason: &Error) {
                *self.0.lock().unwrap() = Some(reason.clone());
            }
        }
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server()
                .workers(1)
                .max_queued_bytes(1 << 20)
                .write_timeout(Some(Duration::from_secs(1))),
            Big(closed.clone(), vec![7u8; 64 << 10]),
        )
        .unwrap();
        let mut raw = TcpStream::connect(server.local_addr()).unwrap();
        // A small receive buffer, so that the server's writes block early.
        let _ = socket2::SockRef::from(&raw).set_recv_buffer_size(64 << 10);
        let mut hs = ClientHandshake::new(Profile::Secure).unwrap();
        let mut out = Vec::new();
        hs.write_output(&mut out);
        raw.write_all(&out).unwrap();
        let mut key = [0u8; 32];
        raw.read_exact(&mut key).unwrap();
        hs.read_input(&key).unwrap();
        let mut session = hs.take_session().unwrap();
        let before = rss_bytes();
        // 2,000 requests would make 128 MiB of replies if nothing pushed
        // back; write them without ever reading.
        let mut wire = Vec::new();
        raw.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
        for i in 0..2000u32 {
            wire.clear();
            session
                .sealer
                .seal_append(2 * i + 1, b"give me 64 KiB", &mut wire)
                .unwrap();
            if raw.write_all(&wire).is_err() {
                break; // the server stopped reading us, or closed
            }
        }
        assert!(
            wait_until(Duration::from_secs(10), || closed.lock().unwrap().is_some()),
            "the connection was never closed"
        );
        let grown = rss_bytes().saturating_sub(before);
        assert!(
            grown < 48 << 20,
            "server memory grew by {} MiB",
            grown >> 20
        );
        assert!(matches!(
            closed.lock().unwrap().take(),
            Some(Error::Timeout(monte_rpc::TimeoutKind::Write))
        ));
        server.shutdown();
    });
}

/// A one-reactor server whose output budget (64 KiB) a few replies pass,
/// with a small send buffer, so that its writes block early.
fn small_output_budget() -> Config {
    common::server_config()
        .workers(1)
        .max_queued_bytes(64 << 10)
        .send_buffer_size(Some(16 << 10))
}

/// A raw peer of `server`, its handshake done, whose receive buffer is
/// `recv_buffer` bytes (so that the server's writes block early): its
/// socket, and the keys to seal and open its frames.
fn slow_reader(
    server: &Server,
    recv_buffer: usize,
) -> (
    std::net::TcpStream,
    monte_rpc::protocol::Sealer,
    monte_rpc::protocol::Opener,
) {
    let (raw, session) = common::raw_client(server.local_addr());
    let _ = socket2::SockRef::from(&raw).set_recv_buffer_size(recv_buffer);
    (raw, session.sealer, session.opener)
}

/// Seals `frames` (sequence number, body) and writes them to a raw peer's
/// socket in one write.
fn write_frames(
    raw: &mut std::net::TcpStream,
    sealer: &mut monte_rpc::protocol::Sealer,
    frames: &[(u32, &[u8])],
) {
    use std::io::Write;
    let mut wire = Vec::new();
    for &(seq, body) in frames {
        sealer.seal_append(seq, body, &mut wire).unwrap();
    }
    raw.write_all(&wire).unwrap();
}

/// Reads `count` messages from a raw peer's socket, opening each frame
/// and calling `each` with each message's sequence number and body length
/// as it comes.
fn read_frames(
    raw: &mut std::net::TcpStream,
    opener: &mut monte_rpc::protocol::Opener,
    count: usize,
    mut each: impl FnMut(u32, usize),
) {
    use std::io::Read;
    let (mut input, mut chunk, mut read) = (Vec::new(), vec![0u8; 64 << 10], 0);
    while read < count {
        let n = raw
            .read(&mut chunk)
            .expect("the frames, within the read timeout");
        assert!(n > 0, "the server closed after {read} frames");
        input.extend_from_slice(&chunk[..n]);
        let (messages, used) = common::open_messages(opener, &mut input, 1 << 20);
        input.drain(..used);
        for (seq, body) in messages {
            each(seq, body.len());
            read += 1;
        }
    }
}

/// A peer that pipelines requests past the outbound budget, then reads:
/// the server's reading pauses and resumes as the replies drain, and the
/// replies to the requests it reads at a resume go out at once, not at
/// the reactor's next sweep (250 ms here) or the peer's next bytes.
#[test]
fn replies_to_requests_read_at_a_resume_are_written_at_once() {
    within(60, || {
        let server = Server::bind(
            "127.0.0.1:0",
            small_output_budget(),
            |ctx: &mut Context<'_>| {
                let size = if ctx.body() == b"a small one" {
                    16
                } else {
                    16 << 10
                };
                let _ = ctx.reply(&vec![7u8; size]);
            },
        )
        .unwrap();
        let (mut raw, mut sealer, mut opener) = slow_reader(&server, 64 << 10);
        let requests = 21u32;
        let first: Vec<(u32, &[u8])> = (0..requests - 1)
            .map(|i| (2 * i + 1, &b"16 KiB, please"[..]))
            .collect();
        write_frames(&mut raw, &mut sealer, &first);
        // The server fills the socket and pauses its reading of us; the
        // last request waits unread in its socket until the resume.
        std::thread::sleep(Duration::from_millis(50));
        write_frames(&mut raw, &mut sealer, &[(2 * requests - 1, b"a small one")]);
        std::thread::sleep(Duration::from_millis(20));
        // With the replies drained, each resume's replies follow at once:
        // no wait between two replies near the sweep's 250 ms.
        let mut last = std::time::Instant::now();
        let mut longest = Duration::ZERO;
        read_frames(&mut raw, &mut opener, requests as usize, |_, _| {
            longest = longest.max(last.elapsed());
            last = std::time::Instant::now();
        });
        assert!(
            longest < Duration::from_millis(100),
            "a reply came {longest:?} after the one before it"
        );
        assert!(server.stats().reads_paused > 0, "reading never paused");
        drop(raw);
        server.shutdown();
    });
}

/// A handler's own large send (here, on a one-way message) holds the
/// connection past `max_queued_bytes` for a peer that does not read: a
/// request read in the same turn waits unanswered in the buffer until the
/// output drains, rather than adding its reply on top (the budget plus
/// two large frames), and is answered once the peer reads.
#[test]
fn a_request_waits_while_the_applications_own_send_holds_the_budget() {
    within(60, || {
        let replies = Arc::new(AtomicUsize::new(0));
        let replied = replies.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            small_output_budget(),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"push 768 KiB" {
                    ctx.conn().send_no_wait(&vec![1u8; 768 << 10]).unwrap();
                } else {
                    replied.fetch_add(1, Ordering::SeqCst);
                    let _ = ctx.reply(&vec![7u8; 256 << 10]);
                }
            },
        )
        .unwrap();
        let (mut raw, mut sealer, mut opener) = slow_reader(&server, 64 << 10);
        // One write: the server reads both frames in one turn.
        write_frames(
            &mut raw,
            &mut sealer,
            &[(0, b"push 768 KiB"), (1, b"256 KiB, please")],
        );
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(
            replies.load(Ordering::SeqCst),
            0,
            "a request was answered while the handler's own send held the \
             connection past its output budget"
        );
        // The peer reads: the push drains, then the request is answered.
        let mut frames = Vec::new();
        read_frames(&mut raw, &mut opener, 2, |seq, len| frames.push((seq, len)));
        assert_eq!(frames, [(0, 768 << 10), (1, 256 << 10)]);
        assert_eq!(replies.load(Ordering::SeqCst), 1);
        drop(raw);
        server.shutdown();
    });
}

/// A handler queues more than the output budget, then closes the
/// connection: the queue closes with those bytes unwritten. The reactor
/// looked at them before each frame, stopped at the budget, and, the
/// connection neither paused nor closed yet (its close waits for the
/// reactor's next turn), looked again, for ever: the reactor spun, and
/// neither the close nor the server's shutdown came.
#[test]
fn a_connection_closed_past_its_budget_closes() {
    within(30, || {
        let (closed, closes) = std::sync::mpsc::channel::<Error>();
        struct PushThenClose(Mutex<std::sync::mpsc::Sender<Error>>);
        impl monte_rpc::Handler for PushThenClose {
            fn on_message(&self, ctx: &mut Context<'_>) {
                let _ = ctx.conn().send_no_wait(&vec![1u8; 768 << 10]);
                ctx.conn().close();
            }
            fn on_close(&self, _: &monte_rpc::Connection, reason: &Error) {
                let _ = self.0.lock().unwrap().send(reason.clone());
            }
        }
        let server = Server::bind(
            "127.0.0.1:0",
            small_output_budget(),
            PushThenClose(Mutex::new(closed)),
        )
        .unwrap();
        let (mut raw, mut sealer, _) = slow_reader(&server, 64 << 10);
        // Two frames in one write: the second is looked at after the close.
        write_frames(
            &mut raw,
            &mut sealer,
            &[(0, b"push, then close"), (0, b"and this")],
        );
        let reason = closes.recv_timeout(Duration::from_secs(5));
        assert!(
            matches!(reason, Ok(Error::Closed)),
            "the connection's close: {reason:?}"
        );
        let (shut, shut_down) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            server.shutdown();
            let _ = shut.send(());
        });
        assert!(
            shut_down.recv_timeout(Duration::from_secs(5)).is_ok(),
            "the server's shutdown hung"
        );
        drop(raw);
    });
}

/// Where a handler finds the client it belongs to (set once the client
/// exists).
type ClientSlot = Arc<std::sync::OnceLock<std::sync::Weak<Client>>>;

/// One connection, 3 s send and request timeouts: what
/// [`client_its_handler_calls`] gives its client.
fn one_connection() -> Config {
    Config::default()
        .max_conns(1)
        .send_timeout(Some(Duration::from_secs(3)))
        .request_timeout(Some(Duration::from_secs(3)))
}

/// A client of `addr` made with [`one_connection`], whose handler (made
/// from the slot) can call it.
fn client_its_handler_calls<H: monte_rpc::Handler>(
    addr: std::net::SocketAddr,
    handler: impl FnOnce(ClientSlot) -> H,
) -> Arc<Client> {
    client_its_handler_calls_with(addr, one_connection(), handler)
}

/// A client of `addr` made with `config`, whose handler (made from the
/// slot) can call it.
fn client_its_handler_calls_with<H: monte_rpc::Handler>(
    addr: std::net::SocketAddr,
    config: Config,
    handler: impl FnOnce(ClientSlot) -> H,
) -> Arc<Client> {
    let slot: ClientSlot = Arc::default();
    let client = Arc::new(Client::with_handler(addr, config, handler(slot.clone())).unwrap());
    slot.set(Arc::downgrade(&client)).unwrap();
    client
}

/// A server on one reactor that answers every request with an empty body.
fn empty_reply_server() -> Server {
    Server::bind(
        "127.0.0.1:0",
        Config::server().workers(1),
        |ctx: &mut Context<'_>| {
            let _ = ctx.reply(b"");
        },
    )
    .unwrap()
}

/// What the calls made from `on_open` gave.
type Answers = Arc<Mutex<Vec<Result<Vec<u8>, Error>>>>;

/// A client whose handler's `on_open` calls that very client: the
/// connection being opened.
struct CallsItsClient {
    client: ClientSlot,
    answers: Answers,
}

impl monte_rpc::Handler for CallsItsClient {
    fn on_message(&self, _: &mut Context<'_>) {}

    fn on_open(&self, conn: &monte_rpc::Connection) {
        let client = self.client.get().and_then(|c| c.upgrade()).unwrap();
        // Queued before the requests: their own writes take it along.
        let queued = client.send_no_wait(b"queued first").map(|_| Vec::new());
        let mut resp = Vec::new();
        let by_client = client.request(b"from on_open", &mut resp).map(|_| resp);
        let mut resp = Vec::new();
        let by_conn = conn.request(b"on its connection", &mut resp).map(|_| resp);
        // Only the reactor reads an async request's response, and it has
        // the connection only once this returns: refused at once.
        let mut resp = Vec::new();
        let by_future =
            futures::executor::block_on(client.request_async(b"async", &mut resp)).map(|_| resp);
        let mut resp = Vec::new();
        let by_conn_future =
            futures::executor::block_on(conn.request_async(b"async", &mut resp)).map(|_| resp);
        self.answers.lock().unwrap().extend([
            queued,
            by_client,
            by_conn,
            by_future,
            by_conn_future,
        ]);
    }
}

/// `on_open` runs on the thread that dialled, before the connection joins
/// the pool (so that nothing else uses it first). A call on the client
/// from there found no connection and waited for the dial in progress,
/// its own, until its deadline: it must use the connection being opened.
#[test]
fn a_client_call_from_on_open_uses_the_connection_being_opened() {
    within(30, || {
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            |ctx: &mut Context<'_>| {
                let mut reversed = ctx.body().to_vec();
                reversed.reverse();
                let _ = ctx.reply(&reversed);
            },
        )
        .unwrap();
        // The first call blocking (its thread dials), then async (the
        // pool's dial thread dials).
        for blocking in [true, false] {
            let answers = Arc::new(Mutex::new(Vec::new()));
            let client = client_its_handler_calls(server.local_addr(), |client| CallsItsClient {
                client,
                answers: answers.clone(),
            });
            let start = std::time::Instant::now();
            let mut resp = Vec::new();
            if blocking {
                client.request(b"first", &mut resp).unwrap();
            } else {
                futures::executor::block_on(client.request_async(b"first", &mut resp)).unwrap();
            }
            let took = start.elapsed();
            assert_eq!(resp, b"tsrif");
            let answers = std::mem::take(&mut *answers.lock().unwrap());
            assert_eq!(answers.len(), 5);
            let ok = |i: usize, expected: &[u8], what: &str| {
                assert_eq!(
                    answers[i].as_ref().map_err(Error::to_string),
                    Ok(&expected.to_vec()),
                    "{what} from on_open"
                );
            };
            ok(0, b"", "the client's send_no_wait");
            ok(1, b"nepo_no morf", "the client's request");
            ok(2, b"noitcennoc sti no", "the connection's request");
            for (i, what) in [(3, "the client's"), (4, "the connection's")] {
                assert!(
                    matches!(
                        answers[i].as_ref().map_err(Error::root_cause),
                        Err(Error::AsyncRequestInOnOpen)
                    ),
                    "{what} async request from on_open: {:?}",
                    answers[i]
                );
            }
            assert!(
                took < Duration::from_secs(1),
                "the first call took {took:?}"
            );
            assert_eq!(client.connections(), 1);
            client.shutdown();
        }
        server.shutdown();
    });
}

/// A client whose handler closes each connection in `on_open` (a peer it
/// rejects), and calls its client from `on_close`.
struct Rejects {
    client: ClientSlot,
    closes: Arc<Mutex<Vec<Result<(), Error>>>>,
    async_from_close: Arc<Mutex<Option<Result<(), Error>>>>,
}

impl monte_rpc::Handler for Rejects {
    fn on_message(&self, _: &mut Context<'_>) {}

    fn on_open(&self, conn: &monte_rpc::Connection) {
        conn.close();
    }

    fn on_close(&self, _: &monte_rpc::Connection, _: &Error) {
        let client = self.client.get().and_then(|c| c.upgrade()).unwrap();
        // The pool's dial is still this thread's: the call must not wait
        // for it.
        let sent = client.send(b"from on_close");
        self.closes.lock().unwrap().push(sent);
        // Only a reactor would read an async request's response, and the
        // connection never reached one: refused at once, saying where.
        let asked = futures::executor::block_on(client.request_async(b"async", &mut Vec::new()));
        *self.async_from_close.lock().unwrap() = Some(asked);
    }
}

/// A connection closed in `on_open` is no dialled connection: the call
/// that dialled fails with a dial error in the `on_open` phase, the
/// connection never joins the pool, `on_close` runs once, and a call from
/// `on_close` (still on the dialling thread) fails at once instead of
/// waiting for the dial in progress.
#[test]
fn a_connection_closed_in_on_open_fails_its_dial() {
    within(30, || {
        let server = empty_reply_server();
        let closes = Arc::new(Mutex::new(Vec::new()));
        let async_from_close = Arc::new(Mutex::new(None));
        let client = client_its_handler_calls(server.local_addr(), |client| Rejects {
            client,
            closes: closes.clone(),
            async_from_close: async_from_close.clone(),
        });
        let start = std::time::Instant::now();
        let e = client.request(b"first", &mut Vec::new()).unwrap_err();
        let took = start.elapsed();
        assert!(
            matches!(
                e,
                Error::Dial {
                    phase: monte_rpc::DialPhase::Open,
                    ..
                }
            ),
            "{e:?}"
        );
        assert!(matches!(e.root_cause(), Error::Closed), "{e:?}");
        assert!(took < Duration::from_secs(1), "the call took {took:?}");
        let closes = std::mem::take(&mut *closes.lock().unwrap());
        assert_eq!(closes.len(), 1, "on_close ran {} times", closes.len());
        assert!(
            closes[0].is_err(),
            "a send on a closed connection: {:?}",
            closes[0]
        );
        let asked = async_from_close
            .lock()
            .unwrap()
            .take()
            .expect("on_close asked");
        match asked {
            Err(e) => {
                assert!(
                    matches!(e.root_cause(), Error::AsyncRequestInOnOpen),
                    "{e:?}"
                );
                assert!(e.to_string().contains("on_close"), "{e}");
            }
            Ok(()) => panic!("an async request from on_close was answered"),
        }
        assert_eq!(client.connections(), 0);
        client.shutdown();
        server.shutdown();
    });
}

/// A client's handler that makes a blocking request on its own client:
/// a connection on the handler's own reactor cannot take it (that reactor
/// would have to read the response while it waits), but the client's
/// other connection, on its other reactor, can.
#[test]
fn a_request_from_a_clients_handler_takes_a_connection_of_another_reactor() {
    within(30, || {
        let hold = common::Hold::new();
        let held_here = hold.clone();
        // The server's side of each connection, to send on later.
        let theirs: Arc<Mutex<Vec<monte_rpc::Connection>>> = Arc::default();
        let seen = theirs.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(2),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"hold" {
                    held_here.hold();
                }
                let mut seen = seen.lock().unwrap();
                if !seen.iter().any(|c| c.id() == ctx.conn().id()) {
                    seen.push(ctx.conn().clone());
                }
                drop(seen);
                let _ = ctx.reply(b"ok");
            },
        )
        .unwrap();
        let answers: Answers = Arc::default();
        let client = {
            let answers = answers.clone();
            let slot: ClientSlot = Arc::default();
            let handler_slot = slot.clone();
            let client = Arc::new(
                Client::with_handler(
                    server.local_addr(),
                    Config::default()
                        .workers(2)
                        .max_conns(2)
                        .request_timeout(Some(Duration::from_secs(3))),
                    move |_: &mut Context<'_>| {
                        let client = handler_slot.get().and_then(|c| c.upgrade()).unwrap();
                        let mut resp = Vec::new();
                        let asked = client.request(b"from the handler", &mut resp).map(|_| resp);
                        answers.lock().unwrap().push(asked);
                    },
                )
                .unwrap(),
            );
            slot.set(Arc::downgrade(&client)).unwrap();
            client
        };
        // Two connections, one on each reactor: the second dialled while
        // the first is held.
        let held = {
            let client = client.clone();
            std::thread::spawn(move || client.request(b"hold", &mut Vec::new()))
        };
        assert!(hold.held());
        client.request(b"second", &mut Vec::new()).unwrap();
        hold.release();
        held.join().unwrap().unwrap();
        assert_eq!(client.connections(), 2);
        // A message on each connection in turn: its reactor's handler asks.
        let theirs = theirs.lock().unwrap().clone();
        assert_eq!(theirs.len(), 2);
        for (i, conn) in theirs.iter().enumerate() {
            conn.send_no_wait(b"ask me").unwrap();
            assert!(
                wait_until(Duration::from_secs(10), || answers.lock().unwrap().len()
                    == i + 1),
                "the handler asked {} times",
                answers.lock().unwrap().len()
            );
        }
        for asked in answers.lock().unwrap().iter() {
            assert_eq!(
                asked.as_ref().map_err(Error::to_string),
                Ok(&b"ok".to_vec()),
                "a request from the client's handler"
            );
        }
        client.shutdown();
        server.shutdown();
    });
}

/// A client's handler whose `on_open` waits at a gate, and which counts
/// the `on_close` calls it gets.
struct HeldOpen {
    hold: Arc<common::Hold>,
    closes: Arc<AtomicUsize>,
}

impl monte_rpc::Handler for HeldOpen {
    fn on_message(&self, _: &mut Context<'_>) {}

    fn on_open(&self, _: &monte_rpc::Connection) {
        self.hold.hold();
    }

    fn on_close(&self, _: &monte_rpc::Connection, _: &Error) {
        self.closes.fetch_add(1, Ordering::SeqCst);
    }
}

/// A client shut down while its handler's `on_open` runs (on the thread
/// that dials: the caller's, or the pool's dial thread for an async call)
/// until its reactors have stopped: the shutdown finishes, the call that
/// dialled fails with `Closed` (the client went away, not the endpoint:
/// no dial error), the connection, which its stopped reactor refuses,
/// never joins the pool, and its `on_close` runs once.
#[test]
fn a_shutdown_during_on_open_ends_its_dial_as_closed() {
    within(30, || {
        let server = empty_reply_server();
        for blocking in [true, false] {
            let hold = common::Hold::new();
            let closes = Arc::new(AtomicUsize::new(0));
            let client = client_its_handler_calls_with(
                server.local_addr(),
                one_connection().request_timeout(Some(Duration::from_secs(5))),
                |_| HeldOpen {
                    hold: hold.clone(),
                    closes: closes.clone(),
                },
            );
            let caller = {
                let client = client.clone();
                std::thread::spawn(move || {
                    let mut resp = Vec::new();
                    if blocking {
                        client.request(b"first", &mut resp)
                    } else {
                        futures::executor::block_on(client.request_async(b"first", &mut resp))
                    }
                })
            };
            assert!(hold.held(), "on_open never ran");
            let shutdown = {
                let client = client.clone();
                std::thread::spawn(move || client.shutdown())
            };
            // `on_open` returns once the shutdown has given calls under
            // way their grace (1 s) and stopped the reactors: once it has
            // returned, or (if it waits for this dial's thread) after 3 s.
            wait_until(Duration::from_secs(3), || shutdown.is_finished());
            hold.release();
            let result = caller.join().unwrap();
            shutdown.join().unwrap();
            // In the call's context (`Error::Call`), as every call's.
            assert!(
                matches!(&result, Err(Error::Call { source, .. }) if matches!(**source, Error::Closed)),
                "blocking: {blocking}: {result:?}"
            );
            assert!(
                wait_until(Duration::from_secs(5), || closes.load(Ordering::SeqCst) > 0),
                "blocking: {blocking}: on_close never ran"
            );
            std::thread::sleep(Duration::from_millis(50));
            assert_eq!(closes.load(Ordering::SeqCst), 1, "blocking: {blocking}");
            assert_eq!(client.connections(), 0, "blocking: {blocking}");
        }
        server.shutdown();
    });
}

/// A client whose handler's `on_open` sends the server a message that
/// holds it, then more than the connection's queue and the sockets'
/// buffers hold, and records how that went.
struct SendsLargeInOnOpen {
    client: ClientSlot,
    sent: Arc<Mutex<Option<Result<(), Error>>>>,
    /// The sends made as futures (`send_async`, `send_no_wait_async`),
    /// awaited there; the request stays blocking (an async one is refused
    /// in `on_open`).
    async_sends: bool,
    /// The futures given no time limit (`timeout(None)`), in place of the
    /// send timeout; the `send` then as large as the request, so that it
    /// waits on the socket itself.
    unlimited: bool,
}

impl SendsLargeInOnOpen {
    /// The size of the `send` after the queued message.
    fn sent_size(&self) -> usize {
        match self.unlimited {
            true => REQUESTED,
            false => SENT,
        }
    }
}

/// What `SendsLargeInOnOpen` sends after the message that holds the
/// server: `send_no_wait`, `send` (which must wait for room in the
/// queue: with the first, more than `max_queued_bytes`) and `request`
/// (larger than the sockets' buffers).
const QUEUED: usize = 600 << 10;
const SENT: usize = 600 << 10 | 1;
const REQUESTED: usize = 24 << 20;

impl SendsLargeInOnOpen {
    /// `send`, or with `no_wait` `send_no_wait`, blocking or awaited.
    fn send(&self, client: &Client, body: &[u8], no_wait: bool) -> Result<(), Error> {
        let block_on = futures::executor::block_on;
        match (self.async_sends, no_wait) {
            (false, false) => client.send(body),
            (false, true) => client.send_no_wait(body),
            (true, no_wait) => {
                let call = match no_wait {
                    true => client.send_no_wait_async(body),
                    false => client.send_async(body),
                };
                block_on(match self.unlimited {
                    true => call.timeout(None),
                    false => call,
                })
            }
        }
    }
}

impl monte_rpc::Handler for SendsLargeInOnOpen {
    fn on_message(&self, _: &mut Context<'_>) {}

    fn on_open(&self, _: &monte_rpc::Connection) {
        let client = self.client.get().and_then(|c| c.upgrade()).unwrap();
        let sent = self
            .send(&client, b"hold", false)
            .and_then(|()| self.send(&client, &vec![1; QUEUED], true))
            .and_then(|()| self.send(&client, &vec![2; self.sent_size()], false))
            .and_then(|()| client.request(&vec![3; REQUESTED], &mut Vec::new()));
        *self.sent.lock().unwrap() = Some(sent);
    }
}

/// Output from `on_open` that the socket does not take at once (the
/// server reads nothing for a while, and frames larger than the sockets'
/// buffers) was handed to the connection's reactor, which has the
/// connection only once `on_open` returns: a send, a send that waits for
/// room in the queue, and a request waited out their deadlines though the
/// server read again long before. Before a reactor has the connection,
/// the calling thread must write the rest itself.
#[test]
fn calls_from_on_open_write_what_the_socket_takes_later() {
    from_on_open_write_what_the_socket_takes_later(false, false);
}

/// The same with the sends made as futures awaited in `on_open`: their
/// tasks waited for a reactor that has the connection only once `on_open`
/// returns, until the send timeout (for ever, with none). Polled on the
/// thread that runs the connection's `on_open`, they must write as their
/// blocking twins do.
#[test]
fn async_sends_from_on_open_write_what_the_socket_takes_later() {
    from_on_open_write_what_the_socket_takes_later(true, false);
}

/// The same with futures given no time limit, held up longer than the
/// send timeout: they must not fall back to it.
#[test]
fn async_sends_from_on_open_without_a_time_limit_keep_none() {
    from_on_open_write_what_the_socket_takes_later(true, true);
}

/// With `unlimited`, the server holds for longer than the client's send
/// timeout, and the sends are futures with no time limit.
fn from_on_open_write_what_the_socket_takes_later(async_sends: bool, unlimited: bool) {
    let (send_timeout, held_for) = match unlimited {
        true => (Duration::from_millis(500), Duration::from_millis(1200)),
        false => (Duration::from_secs(5), Duration::from_millis(300)),
    };
    within(60, move || {
        let hold = common::Hold::new();
        let held_here = hold.clone();
        let received = Arc::new(Mutex::new(Vec::new()));
        let seen = received.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1).max_message_size(32 << 20),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"hold" {
                    held_here.hold();
                }
                seen.lock().unwrap().push(ctx.body().len());
                if ctx.expects_reply() {
                    let _ = ctx.reply(b"");
                }
            },
        )
        .unwrap();
        let sent = Arc::new(Mutex::new(None));
        let client = client_its_handler_calls_with(
            server.local_addr(),
            one_connection()
                .max_message_size(32 << 20)
                .send_timeout(Some(send_timeout))
                .request_timeout(Some(Duration::from_secs(10))),
            |client| SendsLargeInOnOpen {
                client,
                sent: sent.clone(),
                async_sends,
                unlimited,
            },
        );
        let start = std::time::Instant::now();
        let first = {
            let client = client.clone();
            std::thread::spawn(move || client.request(b"first", &mut Vec::new()))
        };
        assert!(hold.held(), "the server never held");
        std::thread::sleep(held_for);
        hold.release();
        first.join().unwrap().unwrap();
        let took = start.elapsed();
        let sent = sent.lock().unwrap().take().expect("on_open ran");
        assert!(sent.is_ok(), "the calls from on_open: {sent:?}");
        assert!(
            took < Duration::from_secs(4),
            "the first call took {took:?}"
        );
        assert!(wait_until(Duration::from_secs(5), || received
            .lock()
            .unwrap()
            .len()
            == 5));
        let sent_size = if unlimited { REQUESTED } else { SENT };
        assert_eq!(
            *received.lock().unwrap(),
            [4, QUEUED, sent_size, REQUESTED, 5]
        );
        client.shutdown();
        server.shutdown();
    });
}

/// A server that greets each connection with messages of its own before
/// anything else, and answers requests.
struct Greets(Vec<Vec<u8>>);

impl Greets {
    /// One greeting: "hello".
    fn hello() -> Greets {
        Greets(vec![b"hello".to_vec()])
    }
}

impl monte_rpc::Handler for Greets {
    fn on_message(&self, ctx: &mut Context<'_>) {
        if ctx.expects_reply() {
            let _ = ctx.reply(b"answer");
        }
    }

    fn on_open(&self, conn: &monte_rpc::Connection) {
        for greeting in &self.0 {
            let _ = conn.send_no_wait(greeting);
        }
    }
}

/// A client whose handler's `on_open` asks its client a question, and
/// which notes that and the messages it gets, in order.
struct AsksInOnOpen {
    client: ClientSlot,
    events: Arc<Mutex<Vec<String>>>,
    /// How many times it asks, one after the other.
    asks: usize,
}

impl monte_rpc::Handler for AsksInOnOpen {
    fn on_message(&self, ctx: &mut Context<'_>) {
        let body = String::from_utf8_lossy(ctx.body()).into_owned();
        self.events.lock().unwrap().push(format!("message {body}"));
    }

    fn on_open(&self, _: &monte_rpc::Connection) {
        let client = self.client.get().and_then(|c| c.upgrade()).unwrap();
        for _ in 0..self.asks {
            let mut resp = Vec::new();
            let asked = client
                .request(b"question", &mut resp)
                .map(|()| String::from_utf8_lossy(&resp).into_owned());
            self.events
                .lock()
                .unwrap()
                .push(format!("on_open asked: {asked:?}"));
        }
    }
}

/// A request from `on_open` to a server that sends a message first: the
/// caller reading for its response met the greeting, which only the
/// reactor may hand the handler, and the reactor has the connection only
/// once `on_open` returns, so the request waited out its deadline. The
/// greeting is now set aside for the reactor, which hands it on first,
/// after `on_open`.
#[test]
fn a_request_from_on_open_is_answered_behind_the_peers_greeting() {
    within(60, || {
        // On one core the call that dialled holds the read turn (waiting
        // for its own answer) as the client's reactor takes the
        // connection, and must then tell it of the greeting set aside.
        common::confine_to_one_core();
        let server =
            Server::bind("127.0.0.1:0", Config::server().workers(1), Greets::hello()).unwrap();
        for round in 0..20 {
            let events = Arc::new(Mutex::new(Vec::new()));
            // Callers that block at once, as on a one-core machine.
            let client = client_its_handler_calls_with(
                server.local_addr(),
                one_connection().waiting(monte_rpc::Waiting::Block),
                |client| AsksInOnOpen {
                    client,
                    events: events.clone(),
                    asks: 1,
                },
            );
            let start = std::time::Instant::now();
            let mut resp = Vec::new();
            client.request(b"first", &mut resp).unwrap();
            let took = start.elapsed();
            assert_eq!(resp, b"answer");
            assert!(
                took < Duration::from_secs(1),
                "the first call took {took:?}"
            );
            assert!(
                wait_until(Duration::from_secs(2), || events.lock().unwrap().len() >= 2),
                "round {round}: {:?}",
                events.lock().unwrap()
            );
            assert_eq!(
                *events.lock().unwrap(),
                [r#"on_open asked: Ok("answer")"#, "message hello"]
            );
            client.shutdown();
        }
        server.shutdown();
    });
}

/// A request from `on_open` behind more of the peer's messages than the
/// connection sets aside for its handler: its response could be read only
/// past them, by the reactor, which has the connection once `on_open`
/// returns. It waited out its whole timeout (for ever with none); it now
/// fails at once, saying so, and the messages are handed on in order once
/// `on_open` returns, on a connection that goes on serving.
#[test]
fn a_request_from_on_open_behind_too_many_messages_fails_at_once() {
    within(60, || {
        // Four messages of 3,000 bytes: more than a client with 8 KiB
        // frames holds for its handler while `on_open` runs.
        let greetings = (0..4u8).map(|i| vec![b'0' + i; 3000]).collect();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            Greets(greetings),
        )
        .unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let config = one_connection()
            .max_message_size(8 << 10)
            .read_buffer_size(4 << 10)
            .request_timeout(Some(Duration::from_secs(20)));
        let client =
            client_its_handler_calls_with(server.local_addr(), config, |client| AsksInOnOpen {
                client,
                events: events.clone(),
                asks: 2,
            });
        let mut resp = Vec::new();
        client.request(b"first", &mut resp).unwrap();
        assert_eq!(resp, b"answer");
        assert!(
            wait_until(Duration::from_secs(5), || events.lock().unwrap().len() >= 6),
            "{:?}",
            events.lock().unwrap()
        );
        let events = events.lock().unwrap().clone();
        // The second request finds the message that did not fit still
        // there: it fails at once too.
        for asked in &events[..2] {
            assert!(
                asked.starts_with("on_open asked: Err(") && asked.contains("MessagesAhead"),
                "{events:?}"
            );
        }
        let greetings: Vec<String> = (0..4u8)
            .map(|i| {
                format!(
                    "message {}",
                    String::from_utf8(vec![b'0' + i; 3000]).unwrap()
                )
            })
            .collect();
        assert_eq!(events[2..], greetings[..]);
        client.shutdown();
        server.shutdown();
    });
}

/// A client whose handler closes its second connection in `on_open`,
/// then sends on the client, blocking and async: those sends' results.
struct ClosesTheSecond {
    client: ClientSlot,
    opened: AtomicUsize,
    sent: Arc<Mutex<Vec<Result<(), Error>>>>,
}

impl monte_rpc::Handler for ClosesTheSecond {
    fn on_message(&self, _: &mut Context<'_>) {}

    fn on_open(&self, conn: &monte_rpc::Connection) {
        if self.opened.fetch_add(1, Ordering::SeqCst) != 1 {
            return;
        }
        conn.close();
        let client = self.client.get().and_then(|c| c.upgrade()).unwrap();
        let blocking = client.send(b"blocking");
        let by_future = futures::executor::block_on(client.send_async(b"async"));
        self.sent.lock().unwrap().extend([blocking, by_future]);
    }
}

/// A send from `on_open` after that connection closed: an open connection
/// of the pool's is as good (here the first, busy with a slow request).
/// The blocking send took it; the async send took the closed one and
/// failed.
#[test]
fn a_send_from_on_open_after_its_connection_closed_takes_an_open_one() {
    within(30, || {
        let slow = Arc::new(AtomicBool::new(false));
        let seen = slow.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(2),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"slow" {
                    seen.store(true, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(500));
                    let _ = ctx.reply(b"done");
                }
            },
        )
        .unwrap();
        let sent = Arc::new(Mutex::new(Vec::new()));
        let config = one_connection().max_conns(2);
        let client =
            client_its_handler_calls_with(server.local_addr(), config, |client| ClosesTheSecond {
                client,
                opened: AtomicUsize::new(0),
                sent: sent.clone(),
            });
        client.send(b"dial").unwrap();
        let busy = {
            let client = client.clone();
            std::thread::spawn(move || client.request(b"slow", &mut Vec::new()))
        };
        assert!(wait_until(Duration::from_secs(2), || slow.load(Ordering::SeqCst)));
        // The first connection is busy: this send dials the second, whose
        // `on_open` closes it and sends.
        let _ = client.send(b"dials");
        let sent = std::mem::take(&mut *sent.lock().unwrap());
        assert_eq!(sent.len(), 2, "on_open sent {} times", sent.len());
        assert!(sent[0].is_ok(), "the blocking send: {:?}", sent[0]);
        assert!(sent[1].is_ok(), "the async send: {:?}", sent[1]);
        busy.join().unwrap().unwrap();
        client.shutdown();
        server.shutdown();
    });
}

/// A client whose handler, given a message, asks its own client twice:
/// by `request_async` (run to its end there) and by `request`.
struct AsksAsyncThenBlocking {
    client: ClientSlot,
    answers: Answers,
}

impl monte_rpc::Handler for AsksAsyncThenBlocking {
    fn on_message(&self, _: &mut Context<'_>) {
        let Some(client) = self.client.get().and_then(|c| c.upgrade()) else {
            return;
        };
        let mut response = Vec::new();
        let by_future = futures::executor::block_on(client.request_async(b"async", &mut response));
        let mut answers = self.answers.lock().unwrap();
        answers.push(by_future.map(|()| response));
        let mut response = Vec::new();
        let blocking = client.request(b"blocking", &mut response);
        answers.push(blocking.map(|()| response));
    }
}

/// A client handler's request on its own client, whose only connection is
/// on the handler's reactor: the blocking request dials another connection
/// (placed on another reactor) and is answered. The async one took the
/// connection it cannot wait on, as a busy one to use while a dial ran,
/// and failed with `OnReactorThread` (and the dial, made on a thread of
/// the pool's, would have found that connection idle and dialled none).
#[test]
fn a_handlers_async_request_uses_a_connection_on_another_reactor() {
    within(30, || {
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            |ctx: &mut Context<'_>| {
                if ctx.body() == b"push" {
                    let _ = ctx.conn().send_no_wait(b"pushed");
                }
                let _ = ctx.reply(b"ok");
            },
        )
        .unwrap();
        let answers = Answers::default();
        let client = client_its_handler_calls_with(
            server.local_addr(),
            Config::default()
                .workers(2)
                .max_conns(4)
                .request_timeout(Some(Duration::from_secs(5))),
            |client| AsksAsyncThenBlocking {
                client,
                answers: answers.clone(),
            },
        );
        // The first connection; the server's push runs the handler on its
        // reactor.
        client.send(b"push").unwrap();
        assert!(
            wait_until(Duration::from_secs(10), || answers.lock().unwrap().len()
                == 2),
            "the handler's requests did not end"
        );
        let answers = answers.lock().unwrap();
        assert!(
            matches!(&answers[0], Ok(body) if body == b"ok"),
            "async: {:?}",
            answers[0]
        );
        assert!(
            matches!(&answers[1], Ok(body) if body == b"ok"),
            "blocking: {:?}",
            answers[1]
        );
        drop(answers);
        client.shutdown();
        server.shutdown();
    });
}

/// A client whose handler's `on_open` makes one request on the
/// connection being opened, and records how it ended and how long it
/// took.
struct RequestsInOnOpen {
    outcome: OnOpenOutcome,
}

/// How `on_open`'s request ended, and how long it took.
type OnOpenOutcome = Arc<Mutex<Option<(Result<(), Error>, Duration)>>>;

impl monte_rpc::Handler for RequestsInOnOpen {
    fn on_message(&self, _: &mut Context<'_>) {}
    fn on_open(&self, conn: &monte_rpc::Connection) {
        let started = std::time::Instant::now();
        let mut response = Vec::new();
        let result = conn.request_timeout(b"bye", &mut response, Some(Duration::from_secs(10)));
        *self.outcome.lock().unwrap() = Some((result, started.elapsed()));
    }
}

/// A request from `on_open` (the connection not yet on a reactor: the
/// caller reads for itself) whose server closes the connection instead of
/// answering: it fails as soon as the end of stream is read. It waited out
/// its whole timeout, the end of stream handed to a reactor that did not
/// have the connection yet.
#[test]
fn a_request_from_on_open_fails_when_the_server_closes() {
    within(30, || {
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            |ctx: &mut Context<'_>| ctx.conn().close(),
        )
        .unwrap();
        let outcome = OnOpenOutcome::default();
        let client = Client::with_handler(
            server.local_addr(),
            Config::default().max_conns(1),
            RequestsInOnOpen {
                outcome: Arc::clone(&outcome),
            },
        )
        .unwrap();
        let _ = client.send(b"dial");
        assert!(
            wait_until(Duration::from_secs(15), || outcome
                .lock()
                .unwrap()
                .is_some()),
            "on_open's request never ended"
        );
        let (result, took) = outcome.lock().unwrap().take().unwrap();
        assert!(
            matches!(
                result.as_ref().map_err(Error::root_cause),
                Err(Error::PeerClosed | Error::Closed)
            ),
            "{result:?} after {took:?}"
        );
        assert!(took < Duration::from_secs(2), "{result:?} after {took:?}");
        client.shutdown();
        server.shutdown();
    });
}

/// A client whose handler's `on_open` makes one request on the
/// connection being opened, and notes how it ended, the messages it gets
/// and its close, in order.
struct RequestsInOnOpenAndListens {
    events: Arc<Mutex<Vec<String>>>,
}

impl monte_rpc::Handler for RequestsInOnOpenAndListens {
    fn on_message(&self, ctx: &mut Context<'_>) {
        let body = String::from_utf8_lossy(ctx.body()).into_owned();
        self.events.lock().unwrap().push(format!("message {body}"));
    }

    fn on_open(&self, conn: &monte_rpc::Connection) {
        let mut response = Vec::new();
        let result = conn.request_timeout(b"bye", &mut response, Some(Duration::from_secs(10)));
        let cause = result.map_err(|e| format!("{:?}", e.root_cause()));
        self.events
            .lock()
            .unwrap()
            .push(format!("on_open asked: {cause:?}"));
    }

    fn on_close(&self, _: &monte_rpc::Connection, reason: &Error) {
        self.events
            .lock()
            .unwrap()
            .push(format!("closed: {reason:?}"));
    }
}

/// A request from `on_open` that read past the server's greeting (set
/// aside for the handler) and then met the server's end of stream: the
/// request fails at once, and the greeting still reaches `on_message`
/// once `on_open` returns, before the close.
#[test]
fn a_greeting_set_aside_before_the_servers_close_is_still_handed_on() {
    within(30, || {
        struct GreetsThenCloses;
        impl monte_rpc::Handler for GreetsThenCloses {
            fn on_message(&self, ctx: &mut Context<'_>) {
                // `close` drops what is queued: the greeting goes out at
                // the end of the reactor's turn, long before.
                let conn = ctx.conn().clone();
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_millis(100));
                    conn.close();
                });
            }
            fn on_open(&self, conn: &monte_rpc::Connection) {
                let _ = conn.send_no_wait(b"hello");
            }
        }
        let server =
            Server::bind("127.0.0.1:0", Config::server().workers(1), GreetsThenCloses).unwrap();
        let events = Arc::new(Mutex::new(Vec::new()));
        let client = Client::with_handler(
            server.local_addr(),
            Config::default().max_conns(1),
            RequestsInOnOpenAndListens {
                events: events.clone(),
            },
        )
        .unwrap();
        let _ = client.send(b"dial");
        assert!(
            wait_until(Duration::from_secs(15), || events.lock().unwrap().len()
                >= 3),
            "{:?}",
            events.lock().unwrap()
        );
        assert_eq!(
            *events.lock().unwrap(),
            [
                r#"on_open asked: Err("PeerClosed")"#,
                "message hello",
                "closed: PeerClosed"
            ]
        );
        client.shutdown();
        server.shutdown();
    });
}

/// A server's request to a peer whose reading it paused (its replies over
/// the budget, the peer not reading them): the caller waiting for the
/// response holds the read turn through the pause, and the silence is
/// this side's, not the peer's. The caller judged the read deadline as if
/// reading went on, and closed the connection with `Timeout(Read)` once
/// `read_timeout` had passed; now the request is answered once the peer
/// reads.
#[test]
fn a_callers_wait_through_a_read_pause_is_no_read_timeout() {
    within(30, || {
        let (asked, answered) = std::sync::mpsc::channel::<Result<Vec<u8>, Error>>();
        let asked = Mutex::new(asked);
        let closes = Arc::new(AtomicUsize::new(0));
        struct AsksBack {
            asked: Mutex<std::sync::mpsc::Sender<Result<Vec<u8>, Error>>>,
            closes: Arc<AtomicUsize>,
        }
        impl monte_rpc::Handler for AsksBack {
            fn on_message(&self, ctx: &mut Context<'_>) {
                if ctx.body() != b"ask me" {
                    let _ = ctx.reply(&vec![7u8; 512 << 10]);
                    return;
                }
                let (conn, asked) = (ctx.conn().clone(), self.asked.lock().unwrap().clone());
                std::thread::spawn(move || {
                    let mut response = Vec::new();
                    let result = conn.request_timeout(
                        b"question",
                        &mut response,
                        Some(Duration::from_secs(10)),
                    );
                    let _ = asked.send(result.map(|()| response));
                });
            }
            fn on_close(&self, _: &monte_rpc::Connection, _: &Error) {
                self.closes.fetch_add(1, Ordering::SeqCst);
            }
        }
        let server = Server::bind(
            "127.0.0.1:0",
            small_output_budget().read_timeout(Some(Duration::from_millis(300))),
            AsksBack {
                asked,
                closes: closes.clone(),
            },
        )
        .unwrap();
        let (mut raw, mut sealer, mut opener) = slow_reader(&server, 16 << 10);
        write_frames(&mut raw, &mut sealer, &[(0, b"ask me")]);
        // The server's request goes out first; then one reply far past the
        // budget, its request the last frame the server has to read.
        std::thread::sleep(Duration::from_millis(50));
        write_frames(&mut raw, &mut sealer, &[(1, b"512 KiB, please")]);
        // Silent, and reading nothing, for more than the read timeout.
        std::thread::sleep(Duration::from_millis(900));
        assert_eq!(
            closes.load(Ordering::SeqCst),
            0,
            "the connection was closed while its reading was paused"
        );
        assert!(server.stats().reads_paused > 0, "reading never paused");
        // Now the peer reads everything and answers the server's request.
        let mut question = None;
        read_frames(&mut raw, &mut opener, 2, |seq, len| {
            if len == b"question".len() {
                question = Some(seq);
            }
        });
        let seq = question.expect("the server's request");
        write_frames(&mut raw, &mut sealer, &[(seq, b"answer")]);
        let result = answered.recv_timeout(Duration::from_secs(5));
        assert!(
            matches!(&result, Ok(Ok(body)) if body == b"answer"),
            "{result:?}"
        );
        drop(raw);
        server.shutdown();
    });
}
