//! The async API under three executors: tokio's multi-thread and
//! current-thread runtimes and `futures::executor::block_on` (no timer at
//! all). Many futures at once, drop-cancellation under load, deadlines
//! kept with no executor timer, and shutdown while futures are pending.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::{runs_until_below, wait_until, within};
use monte_rpc::{Client, Config, Connection, Context, Error, Server, TimeoutKind, Waiting};

/// A server that echoes every request's body, and counts one-way
/// messages.
fn echo_server(config: Config) -> (Server, Arc<AtomicU64>) {
    let messages = Arc::new(AtomicU64::new(0));
    let seen = messages.clone();
    let server = Server::bind("127.0.0.1:0", config, move |ctx: &mut Context<'_>| {
        if ctx.expects_reply() {
            let body = ctx.body().to_vec();
            let _ = ctx.reply(&body);
        } else {
            seen.fetch_add(1, Ordering::Relaxed);
        }
    })
    .unwrap();
    (server, messages)
}

/// A server that answers each request after `delay` (its replies made
/// from a thread of its own, through the connection), or never if `None`.
fn slow_server(delay: Option<Duration>) -> Server {
    let (tx, rx) = mpsc::channel::<(Connection, u32, Vec<u8>, Instant)>();
    let tx = Mutex::new(tx);
    std::thread::spawn(move || {
        while let Ok((conn, seq, body, due)) = rx.recv() {
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            let _ = conn.reply(seq, &body);
        }
    });
    Server::bind(
        "127.0.0.1:0",
        Config::server(),
        move |ctx: &mut Context<'_>| {
            if let Some(delay) = delay {
                let job = (
                    ctx.conn().clone(),
                    ctx.seq(),
                    ctx.body().to_vec(),
                    Instant::now() + delay,
                );
                let _ = tx.lock().unwrap().send(job);
            }
        },
    )
    .unwrap()
}

fn multi_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn current_thread() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn assert_send<T: Send>(_: &T) {}

/// Every future of the API is `Send`, so it can be spawned on a
/// multi-thread executor.
#[test]
fn futures_are_send() {
    let (server, _) = echo_server(Config::server());
    let client = Client::new(server.local_addr(), Config::default()).unwrap();
    let mut response = Vec::new();
    assert_send(&client.request_async(b"x", &mut response));
    assert_send(&client.send_async(b"x"));
    assert_send(&client.send_no_wait_async(b"x"));
    client.shutdown();
    server.shutdown();
}

/// `block_on` has no timer and no reactor of its own: the calls still
/// complete, the first one dialling without blocking the polling thread.
#[test]
fn calls_complete_under_block_on() {
    within(30, || {
        let (server, messages) = echo_server(Config::server());
        let client = Client::new(server.local_addr(), Config::default()).unwrap();
        futures::executor::block_on(async {
            let mut response = Vec::new();
            for i in 0..200u32 {
                let body = i.to_be_bytes();
                client.request_async(&body, &mut response).await.unwrap();
                assert_eq!(response, body);
            }
            for _ in 0..100 {
                client.send_async(b"sent").await.unwrap();
                client.send_no_wait_async(b"queued").await.unwrap();
            }
        });
        assert!(wait_until(Duration::from_secs(5), || messages
            .load(Ordering::Relaxed)
            == 200));
        client.shutdown();
        server.shutdown();
    });
}

/// Many tasks with requests in flight at once on few connections: each
/// gets its own response.
/// Runs `tasks` tasks of `per_task` echoed `request_async`s each on
/// `runtime`, and waits for them.
fn echo_tasks(runtime: &tokio::runtime::Runtime, client: &Arc<Client>, tasks: u32, per_task: u32) {
    runtime.block_on(async {
        let mut handles = Vec::new();
        for t in 0..tasks {
            let client = client.clone();
            handles.push(tokio::spawn(async move {
                let mut response = Vec::new();
                for i in 0..per_task {
                    let body = [t.to_be_bytes(), i.to_be_bytes()].concat();
                    client.request_async(&body, &mut response).await.unwrap();
                    assert_eq!(response, body);
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
}

fn many_concurrent(runtime: tokio::runtime::Runtime, tasks: u32, per_task: u32) {
    let (server, _) = echo_server(Config::server());
    let client =
        Arc::new(Client::new(server.local_addr(), Config::default().max_conns(2)).unwrap());
    echo_tasks(&runtime, &client, tasks, per_task);
    let stats = client.stats();
    assert_eq!(stats.requests_in_flight, 0, "{stats}");
    client.shutdown();
    server.shutdown();
}

#[test]
fn many_concurrent_futures_multi_thread() {
    within(60, || many_concurrent(multi_thread(), 64, 200));
}

#[test]
fn many_concurrent_futures_current_thread() {
    within(60, || many_concurrent(current_thread(), 64, 200));
}

/// Async requests answered fast share a connection as blocking ones do:
/// 8 tasks with a client of one reactor and room for 4 connections keep to
/// fewer than 4 (without sharing, 8 requests in flight at once take all 4).
/// A pause of the machine longer than the pool's stall threshold (2 ms)
/// costs a dial, so a run may grow the pool; of 3 runs, one must keep
/// below 4.
#[test]
fn fast_answered_async_requests_share_a_connection() {
    within(60, || {
        let (server, _) = echo_server(Config::server());
        let runtime = current_thread();
        let runs = runs_until_below(4, 3, || {
            let client = Arc::new(
                Client::new(
                    server.local_addr(),
                    Config::default().max_conns(4).workers(1),
                )
                .unwrap(),
            );
            echo_tasks(&runtime, &client, 8, 300);
            let n = client.connections();
            client.shutdown();
            n
        });
        assert!(
            runs.iter().any(|&n| n < 4),
            "8 tasks of fast requests took these connections in each run: {runs:?}"
        );
        server.shutdown();
    });
}

/// Requests dropped before their responses, among requests that wait for
/// theirs: every completed request gets its own body back (a late
/// response never reaches a later request), and every slot comes back.
fn drop_cancellation_under_load(runtime: tokio::runtime::Runtime) {
    let server = slow_server(Some(Duration::from_millis(2)));
    let client =
        Arc::new(Client::new(server.local_addr(), Config::default().max_conns(1)).unwrap());
    let completed = Arc::new(AtomicUsize::new(0));
    let cancelled = Arc::new(AtomicUsize::new(0));
    runtime.block_on(async {
        let mut handles = Vec::new();
        for t in 0..16u32 {
            let (client, completed, cancelled) =
                (client.clone(), completed.clone(), cancelled.clone());
            handles.push(tokio::spawn(async move {
                let mut response = Vec::with_capacity(64);
                for i in 0..100u32 {
                    let body = [t.to_be_bytes(), i.to_be_bytes()].concat();
                    if (t + i) % 3 == 0 {
                        // Dropped while its response is 2 ms away.
                        let call = client.request_async(&body, &mut response);
                        let raced = tokio::time::timeout(Duration::from_micros(300), call).await;
                        if raced.is_err() {
                            cancelled.fetch_add(1, Ordering::Relaxed);
                            assert!(response.is_empty(), "a cancelled request leaves it empty");
                            assert!(response.capacity() >= 64, "and keeps its capacity");
                        }
                    } else {
                        client.request_async(&body, &mut response).await.unwrap();
                        assert_eq!(
                            response, body,
                            "task {t} request {i} got another's response"
                        );
                        completed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
    });
    assert!(
        cancelled.load(Ordering::Relaxed) > 100,
        "too few were cancelled to test anything"
    );
    assert!(completed.load(Ordering::Relaxed) >= 1000);
    let stats = client.stats();
    assert_eq!(stats.requests_in_flight, 0, "{stats}");
    client.shutdown();
    server.shutdown();
}

#[test]
fn drop_cancellation_under_load_multi_thread() {
    within(60, || drop_cancellation_under_load(multi_thread()));
}

#[test]
fn drop_cancellation_under_load_current_thread() {
    within(60, || drop_cancellation_under_load(current_thread()));
}

/// A cancelled request's slot is free at once: with one slot, the next
/// request gets it and its own response, not the late one.
#[test]
fn a_late_response_never_reaches_the_next_request() {
    within(30, || {
        let server = slow_server(Some(Duration::from_millis(100)));
        let client = Client::new(server.local_addr(), Config::default().max_in_flight(1)).unwrap();
        futures::executor::block_on(async {
            let mut response = Vec::new();
            // Dial first, so the cancelled request is really in flight.
            client.send_async(b"").await.unwrap();
            {
                let mut first = Box::pin(client.request_async(b"first", &mut response));
                assert!(futures::poll!(first.as_mut()).is_pending());
            }
            client
                .request_async(b"second", &mut response)
                .await
                .unwrap();
            assert_eq!(response, b"second");
        });
        client.shutdown();
        server.shutdown();
    });
}

/// The request timeout holds under an executor with no timer: the
/// connection's reactor wakes the future.
#[test]
fn request_deadline_without_an_executor_timer() {
    within(30, || {
        let server = slow_server(None);
        let client = Client::new(
            server.local_addr(),
            Config::default().request_timeout(Some(Duration::from_secs(1))),
        )
        .unwrap();
        futures::executor::block_on(async {
            let mut response = Vec::new();
            client.send_async(b"").await.unwrap(); // dialled
            for timeout in [Duration::from_millis(150), Duration::from_millis(40)] {
                let started = Instant::now();
                let e = client
                    .request_async(b"never answered", &mut response)
                    .timeout(Some(timeout))
                    .await
                    .unwrap_err();
                let took = started.elapsed();
                assert_eq!(e.timeout_kind(), Some(TimeoutKind::Request), "{e}");
                assert!(took >= timeout, "{took:?} < {timeout:?}");
                assert!(took < timeout + Duration::from_millis(500), "{took:?}");
            }
            // The configured timeout, on the connection's own future.
            let started = Instant::now();
            let e = client
                .request_async(b"never answered", &mut response)
                .await
                .unwrap_err();
            assert_eq!(e.timeout_kind(), Some(TimeoutKind::Request), "{e}");
            assert!(started.elapsed() >= Duration::from_secs(1));
            assert!(started.elapsed() < Duration::from_millis(1800));
        });
        assert_eq!(client.stats().requests_timed_out, 3);
        client.shutdown();
        server.shutdown();
    });
}

/// A peer that stops reading fills the queue: `send_no_wait_async` waits
/// for room without blocking its thread (another task on the same thread
/// runs meanwhile), and fails at the send timeout.
#[test]
fn waiting_for_room_ends_at_the_send_timeout() {
    within(30, || {
        // A server whose handler blocks its one reactor: it stops reading,
        // and the socket buffers between us fill.
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Mutex::new(gate_rx);
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            move |_ctx: &mut Context<'_>| {
                let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(10));
            },
        )
        .unwrap();
        let client = Client::new(
            server.local_addr(),
            Config::default()
                .max_queued_bytes(64 << 10)
                .send_timeout(Some(Duration::from_millis(300))),
        )
        .unwrap();
        let body = vec![7u8; 16 << 10];
        // On one thread, beside a task that ticks every millisecond: the
        // ticks go on while the send waits for room (the wait does not
        // hold the thread).
        let ticks = Arc::new(AtomicU64::new(0));
        let (e, waited, ticked) = current_thread().block_on(async {
            let ticker = {
                let ticks = ticks.clone();
                tokio::spawn(async move {
                    loop {
                        tokio::time::sleep(Duration::from_millis(1)).await;
                        ticks.fetch_add(1, Ordering::Relaxed);
                    }
                })
            };
            let started = Instant::now();
            let outcome = loop {
                let (at, ticked) = (Instant::now(), ticks.load(Ordering::Relaxed));
                if let Err(e) = client.send_no_wait_async(&body).await {
                    break (e, at.elapsed(), ticks.load(Ordering::Relaxed) - ticked);
                }
                assert!(
                    started.elapsed() < Duration::from_secs(10),
                    "never filled up"
                );
            };
            ticker.abort();
            outcome
        });
        assert!(waited >= Duration::from_millis(300), "{waited:?}");
        assert!(
            ticked >= 50,
            "only {ticked} ticks in the {waited:?} the send waited"
        );
        assert_eq!(e.timeout_kind(), Some(TimeoutKind::Write), "{e}");
        drop(gate_tx);
        client.shutdown();
        server.shutdown();
    });
}

/// Shutdown with futures pending on several executors' tasks: every one
/// resolves with `Closed`, none hangs.
#[test]
fn shutdown_resolves_pending_futures() {
    within(30, || {
        let server = slow_server(None);
        let client = Arc::new(
            Client::new(
                server.local_addr(),
                Config::default().request_timeout(None).max_conns(2),
            )
            .unwrap(),
        );
        let runtime = multi_thread();
        let mut handles = Vec::new();
        for _ in 0..32 {
            let client = client.clone();
            handles.push(runtime.spawn(async move {
                let mut response = Vec::new();
                client.request_async(b"never answered", &mut response).await
            }));
        }
        assert!(wait_until(Duration::from_secs(10), || client
            .stats()
            .requests_in_flight
            == 32));
        let shut = client.clone();
        let shutting = std::thread::spawn(move || shut.shutdown());
        for h in handles {
            let e = runtime.block_on(h).unwrap().unwrap_err();
            assert!(matches!(e.root_cause(), Error::Closed), "{e}");
        }
        shutting.join().unwrap();
        server.shutdown();
    });
}

/// With nothing listening, a first async call fails with the dial's error,
/// calls during the backoff fail at once with the same, and a call after
/// it dials again.
#[test]
fn a_failed_async_dial_fails_the_calls_waiting_for_it() {
    within(30, || {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let client = Client::new(addr, Config::default().dial_attempts(1)).unwrap();
        futures::executor::block_on(async {
            let mut response = Vec::new();
            let e = client.request_async(b"x", &mut response).await.unwrap_err();
            assert!(matches!(e, Error::Dial { .. }), "{e}");
            let started = Instant::now();
            let again = client.send_async(b"x").await.unwrap_err();
            assert!(matches!(again, Error::Dial { .. }), "{again}");
            assert!(started.elapsed() < Duration::from_millis(50));
            // Past the backoff (100 ms), a call dials again, on a new
            // thread that first joins the last dial's.
            std::thread::sleep(Duration::from_millis(150));
            let third = client.send_no_wait_async(b"x").await.unwrap_err();
            assert!(matches!(third, Error::Dial { .. }), "{third}");
        });
        client.shutdown();
    });
}

/// A server whose handler hands out the connection of every message it
/// gets (and answers requests with "ok"), for tests that call the client
/// from the server's side.
fn server_handing_out_its_connections() -> (Server, mpsc::Receiver<Connection>) {
    server_handing_out_connections_then(|ctx| {
        let _ = ctx.reply(b"ok");
    })
}

/// A server whose handler hands out the connection of every message it
/// gets, then runs `then` on it.
fn server_handing_out_connections_then(
    then: impl Fn(&mut Context<'_>) + Send + Sync + 'static,
) -> (Server, mpsc::Receiver<Connection>) {
    let (conn_tx, conn_rx) = mpsc::channel::<Connection>();
    let conn_tx = Mutex::new(conn_tx);
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server(),
        move |ctx: &mut Context<'_>| {
            let _ = conn_tx.lock().unwrap().send(ctx.conn().clone());
            then(ctx);
        },
    )
    .unwrap();
    (server, conn_rx)
}

/// A connection's own futures, from a handler's `Connection` on the
/// server side: requests to the client, answered by the client's handler.
#[test]
fn a_servers_connection_requests_the_client() {
    within(30, || {
        let (server, conn_rx) = server_handing_out_its_connections();
        let client = Client::with_handler(
            server.local_addr(),
            Config::default(),
            |ctx: &mut Context<'_>| {
                let mut body = ctx.body().to_vec();
                body.reverse();
                let _ = ctx.reply(&body);
            },
        )
        .unwrap();
        let mut response = Vec::new();
        client.request(b"hello", &mut response).unwrap();
        let conn = conn_rx.recv().unwrap();
        current_thread().block_on(async {
            let mut handles = Vec::new();
            for i in 0..8u32 {
                let conn = conn.clone();
                handles.push(tokio::spawn(async move {
                    let mut response = Vec::new();
                    for j in 0..100u32 {
                        let body = [i.to_be_bytes(), j.to_be_bytes()].concat();
                        conn.request_async(&body, &mut response).await.unwrap();
                        let mut reversed = body.clone();
                        reversed.reverse();
                        assert_eq!(response, reversed);
                    }
                    conn.send_no_wait_async(b"done").await.unwrap();
                }));
            }
            for h in handles {
                h.await.unwrap();
            }
        });
        assert_eq!(conn.in_flight(), 0);
        client.shutdown();
        server.shutdown();
    });
}

/// Drives `fut` to completion while counting how many times it was
/// polled (a future that spins on its waker would be polled thousands of
/// times for a slow answer).
#[test]
fn a_waiting_future_is_not_polled_in_a_loop() {
    // No spin window: a future that spins is polled in a loop within it
    // (`a_spinning_future_stops_spinning_after_its_window`).
    let (all, _) = polls_of_a_slow_request(Waiting::Block, Duration::from_millis(60));
    assert!(all <= 5, "polled {all} times");
}

/// A future that spins (it reads the socket itself in its polls, polled
/// again at once) does so within its window only: past it, its task
/// sleeps until its response wakes it.
#[test]
fn a_spinning_future_stops_spinning_after_its_window() {
    let spin = Waiting::Spin(Duration::from_millis(20));
    let (all, late) = polls_of_a_slow_request(spin, Duration::from_millis(60));
    assert!(all > 5, "it spun: polled {all} times");
    assert!(late <= 3, "polled {late} times after its window");
}

/// Awaits one request that a server answers after 200 ms, from a client
/// that waits as `waiting` says: how many times the future was polled in
/// all, and how many of those came `after` its start.
fn polls_of_a_slow_request(waiting: Waiting, after: Duration) -> (usize, usize) {
    within(30, move || {
        let server = slow_server(Some(Duration::from_millis(200)));
        let config = Config::default().waiting(waiting);
        let client = Client::new(server.local_addr(), config).unwrap();
        let counts = futures::executor::block_on(async {
            client.send_async(b"").await.unwrap();
            let mut response = Vec::new();
            let polls = AtomicUsize::new(0);
            let call = client.request_async(b"slow", &mut response);
            let mut counted = Box::pin(LatePolls {
                inner: Box::pin(call),
                all: &polls,
                late: AtomicUsize::new(0),
                after: Instant::now() + after,
            });
            std::future::poll_fn(|cx| counted.as_mut().poll(cx))
                .await
                .unwrap();
            let late = counted.late.load(Ordering::Relaxed);
            (polls.load(Ordering::Relaxed), late)
        });
        client.shutdown();
        server.shutdown();
        counts
    })
}

/// Counts every poll, and those after `after`.
struct LatePolls<'a, F> {
    inner: std::pin::Pin<Box<F>>,
    all: &'a AtomicUsize,
    late: AtomicUsize,
    after: Instant,
}

impl<F: Future> Future for LatePolls<'_, F> {
    type Output = F::Output;
    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<F::Output> {
        self.all.fetch_add(1, Ordering::Relaxed);
        if Instant::now() >= self.after {
            self.late.fetch_add(1, Ordering::Relaxed);
        }
        self.inner.as_mut().poll(cx)
    }
}

/// A future awaiting a lone request that spins (here forced:
/// `Waiting::Spin`) reads its own response: its task is woken only by
/// itself, never from another thread (the reactor, which would have read
/// the response, is deaf to the socket meanwhile).
#[test]
fn a_spinning_future_reads_its_own_response() {
    const REQUESTS: u64 = 300;
    within(30, || {
        let (server, _) = echo_server(Config::server());
        let config = Config::default()
            .max_conns(1)
            .waiting(Waiting::Spin(Duration::from_millis(5)));
        let client = Client::new(server.local_addr(), config).unwrap();
        let mut response = Vec::new();
        client.request(b"first", &mut response).unwrap();
        let wakes = Arc::new(Wakes::new());
        for _ in 0..REQUESTS {
            run_polling(&wakes, client.request_async(b"ping", &mut response)).unwrap();
        }
        let from_elsewhere = wakes.from_elsewhere.load(Ordering::Relaxed);
        assert!(
            from_elsewhere <= REQUESTS / 20,
            "{from_elsewhere} of {REQUESTS} requests' tasks were woken by another thread"
        );
        client.shutdown();
        server.shutdown();
    });
}

/// A task's waker that counts the wakes made by threads other than the
/// one polling it.
struct Wakes {
    home: std::thread::Thread,
    from_elsewhere: AtomicU64,
    woken: std::sync::atomic::AtomicBool,
}

impl Wakes {
    fn new() -> Self {
        Wakes {
            home: std::thread::current(),
            from_elsewhere: AtomicU64::new(0),
            woken: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl std::task::Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if std::thread::current().id() != self.home.id() {
            self.from_elsewhere.fetch_add(1, Ordering::Relaxed);
        }
        self.woken.store(true, Ordering::SeqCst);
        self.home.unpark();
    }
}

/// Polls `fut` to its end on this thread, with `wakes` as its waker,
/// sleeping between polls until woken.
fn run_polling<F: Future>(wakes: &Arc<Wakes>, fut: F) -> F::Output {
    let waker = std::task::Waker::from(wakes.clone());
    let mut cx = std::task::Context::from_waker(&waker);
    let mut fut = std::pin::pin!(fut);
    loop {
        if let std::task::Poll::Ready(out) = fut.as_mut().poll(&mut cx) {
            return out;
        }
        while !wakes.woken.swap(false, Ordering::SeqCst) {
            std::thread::park();
        }
    }
}

/// A server that hands out its connections, sends the client a message
/// before it answers each request, and leaves "hold" unanswered.
fn server_messaging_before_replies() -> (Server, mpsc::Receiver<Connection>) {
    server_handing_out_connections_then(|ctx| {
        if ctx.body() != b"hold" {
            let _ = ctx.conn().send_no_wait(b"before");
            let _ = ctx.reply(b"ok");
        }
    })
}

/// A client whose handler counts the server's messages, its futures
/// spinning for `spin`.
fn client_counting_messages(server: &Server, spin: Duration) -> (Client, Arc<AtomicU64>) {
    let messages = Arc::new(AtomicU64::new(0));
    let seen = messages.clone();
    let config = Config::default().waiting(Waiting::Spin(spin));
    let client = Client::with_handler(server.local_addr(), config, move |_: &mut Context<'_>| {
        seen.fetch_add(1, Ordering::Relaxed);
    })
    .unwrap();
    (client, messages)
}

/// Spinning futures read their responses themselves; the peer's messages
/// they come across reach the handler all the same (the reactor, told,
/// dispatches them).
#[test]
fn spinning_futures_leave_the_peers_messages_to_the_reactor() {
    within(30, || {
        let (server, _conns) = server_messaging_before_replies();
        let (client, messages) = client_counting_messages(&server, Duration::from_millis(5));
        current_thread().block_on(async {
            let mut response = Vec::new();
            for _ in 0..200 {
                client.request_async(b"ask", &mut response).await.unwrap();
                assert_eq!(response, b"ok");
            }
        });
        wait_until(Duration::from_secs(10), || {
            messages.load(Ordering::Relaxed) == 200
        });
        assert_eq!(messages.load(Ordering::Relaxed), 200);
        client.shutdown();
        server.shutdown();
    });
}

/// A future polled once, within its spin window, and then kept but never
/// polled again: the reactor takes back the readable events it held (1 ms
/// after that poll, at its next wake-up: its sweep's at the latest, within
/// 250 ms), and the peer's messages reach the handler.
#[test]
fn a_spinning_future_no_longer_polled_does_not_keep_the_connection_unread() {
    within(30, || {
        let (server, conns) = server_messaging_before_replies();
        let (client, messages) = client_counting_messages(&server, Duration::from_millis(5));
        let mut response = Vec::new();
        client.request(b"ask", &mut response).unwrap();
        wait_until(Duration::from_secs(10), || {
            messages.load(Ordering::Relaxed) == 1
        });
        let server_side = conns.recv().unwrap();
        let mut held = Vec::new();
        let mut call = Box::pin(client.request_async(b"hold", &mut held));
        let mut cx = std::task::Context::from_waker(futures::task::noop_waker_ref());
        assert!(call.as_mut().poll(&mut cx).is_pending());
        // The request is out (the server got it, on the same connection)
        // before the message is sent.
        assert_eq!(conns.recv().unwrap().id(), server_side.id());
        server_side.send(b"while held").unwrap();
        assert!(
            wait_until(Duration::from_secs(2), || messages.load(Ordering::Relaxed)
                == 2),
            "the message stayed unread"
        );
        drop(call);
        client.shutdown();
        server.shutdown();
    });
}

/// A server's shutdown resolves the futures pending on its connections
/// (here, requests to a client that never answers) with `Closed`.
#[test]
fn server_shutdown_resolves_its_connections_futures() {
    within(30, || {
        let (conn_tx, conn_rx) = mpsc::channel::<Connection>();
        let conn_tx = Mutex::new(conn_tx);
        let server = Arc::new(
            Server::bind(
                "127.0.0.1:0",
                Config::server().request_timeout(None),
                move |ctx: &mut Context<'_>| {
                    let _ = conn_tx.lock().unwrap().send(ctx.conn().clone());
                    let _ = ctx.reply(b"ok");
                },
            )
            .unwrap(),
        );
        // The client's handler never answers the server's requests.
        let client = Client::with_handler(
            server.local_addr(),
            Config::default(),
            |_: &mut Context<'_>| {},
        )
        .unwrap();
        let mut response = Vec::new();
        client.request(b"hello", &mut response).unwrap();
        let conn = conn_rx.recv().unwrap();
        let runtime = current_thread();
        let pending: Vec<_> = (0..8)
            .map(|_| {
                let conn = conn.clone();
                runtime.spawn(async move {
                    let mut response = Vec::new();
                    conn.request_async(b"unanswered", &mut response).await
                })
            })
            .collect();
        runtime.block_on(async {
            while conn.in_flight() < 8 {
                tokio::task::yield_now().await;
            }
        });
        let shut = server.clone();
        let shutting = std::thread::spawn(move || shut.shutdown());
        for task in pending {
            let e = runtime.block_on(task).unwrap().unwrap_err();
            assert!(
                matches!(e.root_cause(), Error::Closed | Error::PeerClosed),
                "{e}"
            );
        }
        shutting.join().unwrap();
        client.shutdown();
    });
}

/// A waker that panics (an executor's bug) while a blocking caller, asleep
/// on the socket, delivers that task's response: the panic is contained
/// (the caller gets its own response), and the connection is still heard
/// by its reactor afterwards: what the caller had read and not yet taken
/// (a message behind the responses) and what the peer sends later.
#[test]
fn a_panicking_waker_leaves_the_connection_heard() {
    within(30, || {
        /// Counts its wakes, and keeps the name of the thread that woke it.
        struct Panicker(AtomicUsize, Mutex<Option<String>>);
        impl std::task::Wake for Panicker {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
                *self.1.lock().unwrap() = std::thread::current().name().map(str::to_owned);
                panic!("this waker panics");
            }
        }
        let parked: Arc<Mutex<Option<(Connection, u32)>>> = Arc::default();
        let server_side: Arc<Mutex<Option<Connection>>> = Arc::default();
        let server = Server::bind("127.0.0.1:0", Config::server(), {
            let (parked, server_side) = (parked.clone(), server_side.clone());
            move |ctx: &mut Context<'_>| match ctx.body() {
                b"later" => *parked.lock().unwrap() = Some((ctx.conn().clone(), ctx.seq())),
                b"now" => {
                    // The parked request's response goes out first, and a
                    // message right behind the two responses, in the same
                    // write: read with them, left unread by the panic.
                    if let Some((conn, seq)) = parked.lock().unwrap().take() {
                        conn.reply(seq, b"late").unwrap();
                    }
                    *server_side.lock().unwrap() = Some(ctx.conn().clone());
                    ctx.reply(b"now").unwrap();
                    ctx.conn().send_no_wait(b"hello").unwrap();
                }
                _ => {}
            }
        })
        .unwrap();
        let heard = Arc::new(AtomicUsize::new(0));
        // Blocking callers sleep on the socket at once (no spinning), in
        // the wait that holds the read turn.
        let config = Config::default()
            .max_conns(1)
            .waiting(monte_rpc::Waiting::Block);
        let client = Arc::new(
            Client::with_handler(server.local_addr(), config, {
                let heard = heard.clone();
                move |ctx: &mut Context<'_>| {
                    if ctx.body() == b"hello" {
                        heard.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
            .unwrap(),
        );
        client.send(b"dial").unwrap();
        let mut late = Vec::new();
        let mut pending = Box::pin(client.request_async(b"later", &mut late));
        let panicker = Arc::new(Panicker(AtomicUsize::new(0), Mutex::default()));
        let waker = std::task::Waker::from(panicker.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(pending.as_mut().poll(&mut cx).is_pending());
        assert!(wait_until(Duration::from_secs(2), || parked
            .lock()
            .unwrap()
            .is_some()));
        let blocking = {
            let client = client.clone();
            std::thread::Builder::new()
                .name("blocking-caller".into())
                .spawn(move || {
                    client.request_timeout(b"now", &mut Vec::new(), Some(Duration::from_secs(3)))
                })
                .unwrap()
        };
        let outcome = blocking
            .join()
            .expect("the waker's panic reached the blocking caller");
        assert!(outcome.is_ok(), "{outcome:?}");
        assert_eq!(
            panicker.0.load(Ordering::SeqCst),
            1,
            "the task was not woken"
        );
        assert_eq!(
            panicker.1.lock().unwrap().as_deref(),
            Some("blocking-caller"),
            "the blocking caller did not deliver the task's response: the test did not \
             reach the path it tests"
        );
        let heard_now = |n| {
            wait_until(Duration::from_secs(2), || {
                heard.load(Ordering::Relaxed) == n
            })
        };
        assert!(
            heard_now(1),
            "the message read with the responses was not handled"
        );
        let server_side = server_side.lock().unwrap().clone().unwrap();
        server_side.send(b"hello").unwrap();
        assert!(
            heard_now(2),
            "a message the server sent after the panic was not handled"
        );
        drop(pending);
        assert_eq!(
            client.stats().requests_in_flight,
            0,
            "the requests' gauge after the panic and the future's drop"
        );
        client.shutdown();
        server.shutdown();
    });
}

/// An async call that finds a blocking call holding the pool's dial lock
/// waits to be woken when the lock is let go. A blocking call that lets it
/// go without dialling (a connection turned up, or the pool is backing
/// off after a failed dial) must wake it too, or it waits out its whole
/// timeout. Here the server is down and the pool backs off: every call,
/// blocking or async, must fail at once with the dial's error.
#[test]
fn an_async_call_behind_a_blocking_caller_that_does_not_dial_is_woken() {
    within(60, || {
        let addr = {
            let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            listener.local_addr().unwrap()
        };
        let config = Config::default()
            .dial_attempts(1)
            .dial_backoff(Duration::from_secs(60))
            .request_timeout(Some(Duration::from_secs(1)));
        let client = Arc::new(Client::new(addr, config).unwrap());
        // The first dial fails (nothing listens): the backoff starts.
        assert!(client.request(b"first", &mut Vec::new()).is_err());
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let hammer = {
            let (client, stop) = (client.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let _ = client.request(b"blocking", &mut Vec::new());
                }
            })
        };
        let started = Instant::now();
        let mut slowest = Duration::ZERO;
        let mut calls = 0;
        while started.elapsed() < Duration::from_secs(2) {
            let call = Instant::now();
            let mut response = Vec::new();
            let result = futures::executor::block_on(client.request_async(b"async", &mut response));
            slowest = slowest.max(call.elapsed());
            calls += 1;
            assert!(result.is_err(), "the server is down: {result:?}");
            if call.elapsed() > Duration::from_millis(500) {
                break;
            }
        }
        stop.store(true, Ordering::Relaxed);
        hammer.join().unwrap();
        assert!(
            slowest < Duration::from_millis(500),
            "an async call during the backoff took {slowest:?} (of {calls} calls) \
             instead of failing at once"
        );
        client.shutdown();
    });
}

/// A connection's async request with a zero timeout fails before anything
/// is sent, as the blocking `request_timeout` does: the peer never sees
/// it (here the server asks the client, whose handler records what it
/// gets).
#[test]
fn an_async_request_with_no_time_fails_before_it_is_sent() {
    within(30, || {
        let seen: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
        let (server, conn_rx) = server_handing_out_its_connections();
        let client = Client::with_handler(server.local_addr(), Config::default(), {
            let seen = seen.clone();
            move |ctx: &mut Context<'_>| {
                seen.lock().unwrap().push(ctx.body().to_vec());
                let _ = ctx.reply(b"ok");
            }
        })
        .unwrap();
        client.send(b"hello").unwrap();
        let conn = conn_rx.recv().unwrap();
        let mut response = Vec::new();
        let zero = futures::executor::block_on(
            conn.request_async(b"no time", &mut response)
                .timeout(Some(Duration::ZERO)),
        );
        assert!(
            matches!(
                zero.as_ref().map_err(Error::root_cause),
                Err(Error::Timeout(TimeoutKind::Request))
            ),
            "{zero:?}"
        );
        futures::executor::block_on(conn.request_async(b"in time", &mut response)).unwrap();
        assert_eq!(response, b"ok");
        assert_eq!(*seen.lock().unwrap(), vec![b"in time".to_vec()]);
        client.shutdown();
        server.shutdown();
    });
}

/// A waker that panics (an executor's bug) when a reactor wakes its task
/// must not unwind the reactor's thread: every other call and connection
/// on that reactor would stop with it. Here one task's waker panics as the
/// client's one reactor fires the task's deadline, and another's as the
/// reactor delivers the task's response; then that reactor must still
/// deliver responses, fire deadlines and run the client's handler.
#[test]
fn a_panicking_waker_does_not_stop_the_reactor_that_wakes_it() {
    within(60, || {
        struct Panicker(AtomicUsize);
        impl std::task::Wake for Panicker {
            fn wake(self: Arc<Self>) {
                self.0.fetch_add(1, Ordering::SeqCst);
                panic!("this waker panics");
            }
        }
        let (conn_tx, conn_rx) = mpsc::channel::<Connection>();
        let conn_tx = Mutex::new(conn_tx);
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server(),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"dial" {
                    let _ = conn_tx.lock().unwrap().send(ctx.conn().clone());
                } else if ctx.body() != b"no reply" {
                    if ctx.body() == b"slow" {
                        // Answered well after the asking poll has returned.
                        std::thread::sleep(Duration::from_millis(50));
                    }
                    let _ = ctx.reply(b"ok");
                }
            },
        )
        .unwrap();
        let heard = Arc::new(AtomicUsize::new(0));
        // No spin window: a spinning future wakes its own task as it polls
        // (on the test's thread); here only the reactor may wake it.
        let config = Config::default()
            .max_conns(1)
            .workers(1)
            .waiting(Waiting::Block);
        let client = Arc::new(
            Client::with_handler(server.local_addr(), config, {
                let heard = heard.clone();
                move |_: &mut Context<'_>| {
                    heard.fetch_add(1, Ordering::SeqCst);
                }
            })
            .unwrap(),
        );
        client.send(b"dial").unwrap();
        let server_side = conn_rx.recv().unwrap();
        let panicker = Arc::new(Panicker(AtomicUsize::new(0)));
        let waker = std::task::Waker::from(panicker.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        let woken = |n| {
            wait_until(Duration::from_secs(5), || {
                panicker.0.load(Ordering::SeqCst) == n
            })
        };

        let (mut timed_out, mut answered) = (Vec::new(), Vec::new());
        let mut timed_out = Box::pin(
            client
                .request_async(b"no reply", &mut timed_out)
                .timeout(Some(Duration::from_millis(100))),
        );
        assert!(timed_out.as_mut().poll(&mut cx).is_pending());
        assert!(woken(1), "the deadline's timer did not wake the task");
        let mut answered = Box::pin(client.request_async(b"slow", &mut answered));
        assert!(answered.as_mut().poll(&mut cx).is_pending());
        assert!(woken(2), "the response did not wake the task");
        drop((timed_out, answered));

        // The same reactor, bounded in time: a hung reactor fails here.
        let still = |what: &'static str, call: Box<dyn FnOnce() -> bool + Send>| {
            let (tx, rx) = mpsc::channel();
            std::thread::spawn(move || tx.send(call()));
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)),
                Ok(true),
                "after the panics, the client's reactor no longer {what}"
            );
        };
        let c = client.clone();
        still(
            "delivers a response",
            Box::new(move || {
                let mut response = Vec::new();
                let result = futures::executor::block_on(c.request_async(b"echo", &mut response));
                result.is_ok() && response == b"ok"
            }),
        );
        server_side.send(b"hello").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || heard.load(Ordering::SeqCst) == 1),
            "after the panics, the client's reactor no longer runs its handler ({} runs)",
            heard.load(Ordering::SeqCst)
        );
        // Last: a request that times out with no byte from the server
        // closes its connection (the pool dials afresh).
        let c = client.clone();
        still(
            "fires a deadline",
            Box::new(move || {
                let result = futures::executor::block_on(
                    c.request_async(b"no reply", &mut Vec::new())
                        .timeout(Some(Duration::from_millis(20))),
                );
                matches!(
                    result.as_ref().map_err(Error::root_cause),
                    Err(Error::Timeout(TimeoutKind::Request))
                )
            }),
        );
        client.shutdown();
        server.shutdown();
    });
}

/// A request future whose poll unwinds (here a waker whose clone panics,
/// as the future registers it) and is then dropped must give its slot
/// and its place in the gauge back, as any dropped request does: with
/// two slots, three such requests and then an ordinary one.
#[test]
fn a_request_whose_poll_panics_frees_its_slot() {
    within(30, || {
        fn clone_panics(_: *const ()) -> std::task::RawWaker {
            panic!("this waker's clone panics")
        }
        fn noop(_: *const ()) {}
        static VTABLE: std::task::RawWakerVTable =
            std::task::RawWakerVTable::new(clone_panics, noop, noop, noop);
        // SAFETY: the vtable's functions never touch the data pointer (a
        // null), and `clone_panics` panics rather than making a waker.
        let waker = unsafe {
            std::task::Waker::from_raw(std::task::RawWaker::new(std::ptr::null(), &VTABLE))
        };
        let server = slow_server(Some(Duration::from_millis(50)));
        let config = Config::default().max_conns(1).max_in_flight(2);
        let client = Client::new(server.local_addr(), config).unwrap();
        client.send(b"dial").unwrap();
        for i in 0..3 {
            let mut response = Vec::new();
            let mut call = Box::pin(client.request_async(b"unwinds", &mut response));
            let mut cx = std::task::Context::from_waker(&waker);
            let polled = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                call.as_mut().poll(&mut cx)
            }));
            if let Ok(outcome) = polled {
                panic!("request {i} did not reach the waker's clone: it returned {outcome:?}");
            }
            drop(call);
        }
        assert_eq!(client.stats().requests_in_flight, 0);
        let mut response = Vec::new();
        futures::executor::block_on(client.request_async(b"after", &mut response)).unwrap();
        assert_eq!(response, b"after");
        client.shutdown();
        server.shutdown();
    });
}

/// An async call that waits for room, and is polled again only after its
/// deadline (its executor was busy, or it was woken for room and for the
/// deadline together), times out without sending: its frame must not
/// reach the peer after the call has, in effect, run out of time.
#[test]
fn a_call_polled_after_its_deadline_is_not_sent() {
    within(60, || {
        let (gate_tx, gate_rx) = mpsc::channel::<()>();
        let gate = Mutex::new(gate_rx);
        let late = Arc::new(AtomicUsize::new(0));
        let (conn_tx, conn_rx) = mpsc::channel::<Connection>();
        let conn_tx = Mutex::new(conn_tx);
        // Fixed socket buffers (no autotuning), so that once full the
        // path stays full.
        let buffers = 64 << 10;
        let server_config = Config::server().workers(1).recv_buffer_size(Some(buffers));
        let server = Server::bind("127.0.0.1:0", server_config, {
            let late = late.clone();
            move |ctx: &mut Context<'_>| {
                let body = ctx.body();
                if body == b"block" {
                    // Blocks the server's one reactor: it stops reading,
                    // and the socket buffers between us fill.
                    let _ = conn_tx.lock().unwrap().send(ctx.conn().clone());
                    let _ = gate.lock().unwrap().recv_timeout(Duration::from_secs(20));
                } else if body.starts_with(b"late") {
                    late.fetch_add(1, Ordering::SeqCst);
                }
                if ctx.expects_reply() {
                    let _ = ctx.reply(b"ok");
                }
            }
        })
        .unwrap();
        let config = Config::default()
            .max_conns(1)
            .max_queued_bytes(64 << 10)
            .send_buffer_size(Some(buffers));
        let client = Client::new(server.local_addr(), config).unwrap();
        client.send(b"block").unwrap();
        let server_side = conn_rx.recv().unwrap();
        let waker = futures::task::noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        let deadline = Some(Duration::from_millis(100));
        let filler = vec![0u8; 16 << 10];
        // Fills the queue until a frame finds no room, and that stays so
        // while the client's reactor writes what it can.
        let mut fills = 0u64;
        loop {
            let mut fill = Box::pin(client.send_no_wait_async(&filler).timeout(None));
            if fill.as_mut().poll(&mut cx).is_ready() {
                fills += 1;
                assert!(fills < 10_000, "the queue never filled");
                continue;
            }
            // Full for good once nothing more is written in a pause (the
            // reactor may not have run in the first).
            let written = client.stats().bytes_out;
            std::thread::sleep(Duration::from_millis(100));
            let still = fill.as_mut().poll(&mut cx);
            if still.is_pending() && client.stats().bytes_out == written {
                break;
            }
            if still.is_ready() {
                fills += 1;
            }
        }
        // As large as the fillers: a full queue has no room for them.
        let mut late_body = filler.clone();
        late_body[..4].copy_from_slice(b"late");
        let mut late_send = Box::pin(client.send_no_wait_async(&late_body).timeout(deadline));
        let mut response = Vec::new();
        let mut late_request = Box::pin(
            client
                .request_async(&late_body, &mut response)
                .timeout(deadline),
        );
        let first = (
            late_send.as_mut().poll(&mut cx),
            late_request.as_mut().poll(&mut cx),
        );
        assert!(
            first.0.is_pending() && first.1.is_pending(),
            "{first:?} after {fills} fills"
        );
        // The server's side writes to the client (its reactor is blocked,
        // this thread writes): the client's connection is not silent, so
        // the request's timeout below does not close it (a request that
        // times out hearing nothing from the server closes its connection,
        // which would lose a frame sent late, and the count below with it).
        server_side.send(b"not silent").unwrap();
        // Past both deadlines, then room: the server reads again.
        std::thread::sleep(Duration::from_millis(200));
        drop(gate_tx);
        assert!(
            wait_until(Duration::from_secs(10), || client.stats().bytes_out
                >= fills * filler.len() as u64),
            "the server never read the queue"
        );
        let sent = late_send.as_mut().poll(&mut cx);
        let asked = late_request.as_mut().poll(&mut cx);
        let timed_out = |outcome: &std::task::Poll<monte_rpc::Result<()>>, kind| matches!(outcome, std::task::Poll::Ready(Err(e)) if e.timeout_kind() == Some(kind));
        assert!(timed_out(&sent, TimeoutKind::Write), "{sent:?}");
        assert!(timed_out(&asked, TimeoutKind::Request), "{asked:?}");
        drop((late_send, late_request));
        // Everything queued before this request has been handled once it
        // is answered.
        client.request(b"after", &mut Vec::new()).unwrap();
        assert_eq!(
            late.load(Ordering::SeqCst),
            0,
            "a call that timed out was sent"
        );
        client.shutdown();
        server.shutdown();
    });
}

/// A handler that blocks on an async request over its own connection
/// (so on the reactor that alone reads that connection's responses and
/// keeps the request's deadline) would wait forever: the blocking
/// `request` refuses it with `OnReactorThread`, and so must the future,
/// at once, rather than hang the reactor past every deadline.
#[test]
fn an_async_request_on_its_own_reactor_fails_at_once() {
    within(30, || {
        let outcome: Arc<Mutex<Option<monte_rpc::Result<()>>>> = Arc::default();
        let server = Server::bind("127.0.0.1:0", Config::server(), {
            let outcome = outcome.clone();
            move |ctx: &mut Context<'_>| {
                let asked = futures::executor::block_on(
                    ctx.conn()
                        .request_async(b"from the handler", &mut Vec::new())
                        .timeout(Some(Duration::from_millis(500))),
                );
                *outcome.lock().unwrap() = Some(asked);
            }
        })
        .unwrap();
        let client = Client::with_handler(
            server.local_addr(),
            Config::default(),
            |ctx: &mut Context<'_>| {
                let _ = ctx.reply(b"answer");
            },
        )
        .unwrap();
        client.send(b"go").unwrap();
        assert!(
            wait_until(Duration::from_secs(5), || outcome.lock().unwrap().is_some()),
            "the handler's async request on its own reactor never ended"
        );
        let asked = outcome.lock().unwrap().take().unwrap();
        assert!(
            matches!(
                asked.as_ref().map_err(Error::root_cause),
                Err(Error::OnReactorThread)
            ),
            "{asked:?}"
        );
        client.shutdown();
        server.shutdown();
    });
}

/// `timeout` set on a future already polled replaces its deadline, still
/// counted from the first poll: before, a client's call dropped its
/// armed timer (left in the reactor's list) and ran with no deadline at
/// all, and a connection's request kept the one fixed at its first poll.
#[test]
fn a_timeout_set_after_the_first_poll_still_ends_the_call() {
    within(30, || {
        // The client's deadline while its dial waits for a handshake the
        // listener never answers.
        let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let config = Config::default()
            .dial_attempts(1)
            .handshake_timeout(Some(Duration::from_secs(3)))
            .request_timeout(Some(Duration::from_secs(3)));
        let dialling = Client::new(silent.local_addr().unwrap(), config.clone()).unwrap();
        // Its deadline once it has a connection, to a server that never
        // answers.
        let server = slow_server(None);
        let connected = Client::new(server.local_addr(), config).unwrap();
        let replaced = Duration::from_millis(200);
        futures::executor::block_on(async {
            connected.send_async(b"").await.unwrap(); // dialled
            for client in [&dialling, &connected] {
                let mut response = Vec::new();
                let started = Instant::now();
                let mut call = client.request_async(b"never answered", &mut response);
                assert!(futures::poll!(&mut call).is_pending());
                let e = call.timeout(Some(replaced)).await.unwrap_err();
                let took = started.elapsed();
                assert_eq!(e.timeout_kind(), Some(TimeoutKind::Request), "{e}");
                assert!(took >= replaced, "{took:?}");
                assert!(took < Duration::from_millis(1500), "{took:?}: {e}");
            }
        });
        dialling.shutdown();
        connected.shutdown();
        server.shutdown();
    });
}
