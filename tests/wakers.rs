//! Executors whose wakers do what the library's locks must survive: a
//! waker that holds its task's last reference and drops the future when
//! woken, and one that runs on (polls inline, or hands the task over
//! slowly) before it returns. A future's drop and poll take the locks the
//! library woke it from: each test deadlocked while wakers were woken
//! under them. (Apart from `async_calls.rs`, whose timing-sensitive tests
//! these would disturb.)

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex, OnceLock};
use std::time::Duration;

use common::{wait_until, within};
use monte_rpc::{Client, Config, Context, Server};

/// A server that echoes every request's body.
fn echo_server() -> Server {
    Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
        if ctx.expects_reply() {
            let body = ctx.body().to_vec();
            let _ = ctx.reply(&body);
        }
    })
    .unwrap()
}

/// A call's future, boxed as an executor holds it.
type TaskFuture = std::pin::Pin<Box<dyn Future<Output = monte_rpc::Result<()>> + Send>>;

/// A task whose waker holds the last reference to its future, as an
/// executor leaves it when it gave up the task (shut down, or never
/// polls it again): waking it drops the future.
struct DropsItsFuture {
    future: Mutex<Option<TaskFuture>>,
    dropped: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for DropsItsFuture {
    fn wake(self: Arc<Self>) {
        let future = self.future.lock().unwrap().take();
        drop(future);
        self.dropped.store(true, Ordering::SeqCst);
    }
}

/// An async call waiting for the pool's dial, whose waker drops it: the
/// dropped call takes itself off the dial's list, which the dial's end
/// woke it under, and the dial thread deadlocked on that lock (and with
/// it every later async call, and shutdown). Woken once the lock is let
/// go, the call is dropped and the client goes on.
#[test]
fn a_waker_that_drops_its_future_does_not_stop_the_dial() {
    within(30, || {
        let server = echo_server();
        let client: &'static Client = Box::leak(Box::new(
            Client::new(server.local_addr(), Config::default()).unwrap(),
        ));
        let task = Arc::new(DropsItsFuture {
            future: Mutex::new(Some(Box::pin(client.send_async(b"dial")))),
            dropped: Default::default(),
        });
        let waker = std::task::Waker::from(task.clone());
        let mut cx = std::task::Context::from_waker(&waker);
        {
            // Polled where the waker finds it: the dial's end, which needs
            // the list's lock this poll takes, wakes it after this poll.
            let mut future = task.future.lock().unwrap();
            assert!(future.as_mut().unwrap().as_mut().poll(&mut cx).is_pending());
        }
        assert!(
            wait_until(Duration::from_secs(5), || task
                .dropped
                .load(Ordering::SeqCst)),
            "dropping the woken future deadlocked"
        );
        let mut response = Vec::new();
        let answered = futures::executor::block_on(client.request_async(b"after", &mut response));
        assert!(answered.is_ok(), "{answered:?}");
        assert_eq!(response, b"after");
        client.shutdown();
    });
}

/// A task whose waker runs until the test lets it go on (an executor
/// that polls inline, or one slow to take the task), and drops the
/// task's future (the call) on its second wake.
struct Inline {
    future: Mutex<Option<TaskFuture>>,
    go_on: Mutex<mpsc::Receiver<()>>,
    wakes: AtomicUsize,
    /// What the second wake does instead of dropping the future: shut
    /// this client down.
    shuts_down: OnceLock<Arc<Client>>,
    /// Set once the second wake dropped the future (or shut the client
    /// down) and returned.
    dropped: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for Inline {
    fn wake(self: Arc<Self>) {
        let wake = self.wakes.fetch_add(1, Ordering::SeqCst) + 1;
        let _ = self
            .go_on
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
        if wake == 2 {
            match self.shuts_down.get() {
                Some(client) => client.shutdown(),
                None => drop(self.future.lock().unwrap().take()),
            }
            self.dropped.store(true, Ordering::SeqCst);
        }
    }
}

/// What the last dial's thread does in the [`Inline`] waker's second
/// wake, and the latest dial's in its connection's `on_open`.
#[derive(Clone, Copy, PartialEq)]
enum Ending {
    /// Drops the call's future; the test shuts the client down after.
    DropsTheCall,
    /// Drops the call's future, which holds the last reference to the
    /// client: the drop shuts the client down.
    DropsTheClient,
    /// Both dial threads shut the client down, at once.
    BothShutDown,
}

/// Shuts the client down from the `on_open` of its second connection
/// (the latest dial's), a moment after it opens, once given the client.
#[derive(Default)]
struct SecondOpenShutsDown {
    client: OnceLock<Arc<Client>>,
    opened: AtomicUsize,
    done: std::sync::atomic::AtomicBool,
}

/// The client's handler, sharing its state with the test.
struct Opens(Arc<SecondOpenShutsDown>);

impl monte_rpc::Handler for Opens {
    fn on_message(&self, _: &mut Context<'_>) {}
    fn on_open(&self, _: &monte_rpc::Connection) {
        let this = &self.0;
        if this.opened.fetch_add(1, Ordering::SeqCst) == 1 {
            if let Some(client) = this.client.get() {
                std::thread::sleep(Duration::from_millis(300));
                client.shutdown();
            }
            this.done.store(true, Ordering::SeqCst);
        }
    }
}

/// An async call whose [`Inline`] waker the pool's dial thread wakes
/// twice: inside the dial, and at its end, once it has let the dial
/// list's lock go. Between them the server closes the connection and the
/// call waits for the dial again; during the second wake, a second call
/// finds no connection and starts the next dial. The second wake then
/// ends as `ending` says.
fn a_dial_thread_in_an_inline_waker(ending: Ending) {
    within(30, move || {
        // Closes a connection on its first message.
        let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
            ctx.conn().close()
        })
        .unwrap();
        let opens = Arc::new(SecondOpenShutsDown::default());
        let client = Arc::new(
            Client::with_handler(server.local_addr(), Config::default(), Opens(opens.clone()))
                .unwrap(),
        );
        let (go_on, waits) = mpsc::channel();
        let task = Arc::new(Inline {
            future: Mutex::new(Some({
                let client = client.clone();
                Box::pin(async move { client.send_async(b"dial").await })
            })),
            go_on: Mutex::new(waits),
            wakes: AtomicUsize::new(0),
            shuts_down: OnceLock::new(),
            dropped: Default::default(),
        });
        if ending == Ending::BothShutDown {
            let _ = task.shuts_down.set(client.clone());
            let _ = opens.client.set(client.clone());
        }
        let waker = std::task::Waker::from(task.clone());
        let poll = || {
            let mut future = task.future.lock().unwrap();
            let polled = future
                .as_mut()
                .unwrap()
                .as_mut()
                .poll(&mut std::task::Context::from_waker(&waker));
            assert!(polled.is_pending());
        };
        let wakes = |n| {
            wait_until(Duration::from_secs(5), || {
                task.wakes.load(Ordering::SeqCst) == n
            })
        };
        poll();
        // The dial made its connection and wakes the call (still inside
        // the dial, which runs as far as the pool can tell).
        assert!(wakes(1));
        // The server closes the connection: the call, polled again, finds
        // none and waits for the dial running.
        client.send(b"close").unwrap();
        assert!(wait_until(Duration::from_secs(5), || client.connections() == 0));
        poll();
        go_on.send(()).unwrap();
        // The dial's thread ended the dial and wakes the call again.
        assert!(wakes(2));
        let second = {
            let client = client.clone();
            std::thread::spawn(move || {
                let mut future = Box::pin(client.send_async(b"again"));
                let waker = futures::task::noop_waker();
                let _ = future
                    .as_mut()
                    .poll(&mut std::task::Context::from_waker(&waker));
            })
        };
        let finished = wait_until(Duration::from_secs(5), || second.is_finished());
        let ended = |flag: &std::sync::atomic::AtomicBool| {
            wait_until(Duration::from_secs(5), || flag.load(Ordering::SeqCst))
        };
        match ending {
            Ending::DropsTheCall => {
                go_on.send(()).unwrap();
                assert!(ended(&task.dropped));
                client.shutdown();
            }
            Ending::DropsTheClient => {
                drop(client);
                go_on.send(()).unwrap();
                assert!(
                    ended(&task.dropped),
                    "the client's shutdown from the last dial's thread hung"
                );
            }
            Ending::BothShutDown => {
                go_on.send(()).unwrap();
                let both = ended(&task.dropped) && ended(&opens.done);
                assert!(both, "the two dial threads' shutdowns hung");
            }
        }
        assert!(
            finished,
            "the second call's poll waited for the last dial's thread"
        );
        second.join().unwrap();
        server.shutdown();
    });
}

/// The next dial joined the last dial's thread under the dial list's
/// lock: the last dial, in the waker, then waited for the lock to forget
/// its call, and the second call's poll waited for it. Both hung, and
/// with them every async call and shutdown.
#[test]
fn the_next_dial_does_not_wait_under_its_lock_for_the_last_dial_waking_its_calls() {
    a_dial_thread_in_an_inline_waker(Ending::DropsTheCall);
}

/// Shutdown from a dial thread that is not the latest (its waker dropped
/// the client): it joined the latest, which joined the one before (the
/// very thread shutting down) once its dial ended. Both hung.
#[test]
fn a_shutdown_from_an_earlier_dial_thread_does_not_hang() {
    a_dial_thread_in_an_inline_waker(Ending::DropsTheClient);
}

/// Two dial threads shutting the client down at once: the last one from
/// a waker, the latest from its connection's `on_open`. The last one put
/// its own handle back in the list before it joined the latest, whose
/// shutdown then joined it: both hung.
#[test]
fn two_dial_threads_shutting_down_at_once_do_not_hang() {
    a_dial_thread_in_an_inline_waker(Ending::BothShutDown);
}

/// A task whose waker, woken on the pool's dial thread, keeps that thread
/// busy for a while (an executor slow to take the task).
#[derive(Default)]
struct SlowOnTheDialThread {
    entered: std::sync::atomic::AtomicBool,
    returned: std::sync::atomic::AtomicBool,
}

impl std::task::Wake for SlowOnTheDialThread {
    fn wake(self: Arc<Self>) {
        if std::thread::current().name() == Some("monte-rpc-dial") {
            self.entered.store(true, Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(600));
            self.returned.store(true, Ordering::SeqCst);
        }
    }
}

/// Two threads shut one client down while its dial thread is still in a
/// waker: neither may return before that thread is joined. The second
/// found the list of dial threads emptied by the first, which was still
/// joining them, and returned at once.
#[test]
fn a_second_shutdown_waits_for_the_first_to_join_the_dial_thread() {
    within(30, || {
        let server = echo_server();
        let client = Arc::new(Client::new(server.local_addr(), Config::default()).unwrap());
        let task = Arc::new(SlowOnTheDialThread::default());
        let waker = std::task::Waker::from(task.clone());
        let mut call = Box::pin(client.send_async(b"dial for me"));
        let polled = call
            .as_mut()
            .poll(&mut std::task::Context::from_waker(&waker));
        assert!(polled.is_pending());
        assert!(wait_until(Duration::from_secs(5), || task
            .entered
            .load(Ordering::SeqCst)));
        // No call left inside: the shutdowns skip their grace.
        drop(call);
        let shutdowns: Vec<_> = (0..2)
            .map(|_| {
                let (client, task) = (client.clone(), task.clone());
                std::thread::spawn(move || {
                    client.shutdown();
                    task.returned.load(Ordering::SeqCst)
                })
            })
            .collect();
        for shutdown in shutdowns {
            assert!(
                shutdown.join().unwrap(),
                "a shutdown returned while the dial thread was still in the waker"
            );
        }
        server.shutdown();
    });
}

/// A waker whose last reference, dropped, drops another call's future
/// (an executor that gave up a task holding both).
struct DropsAnother {
    /// Held only to be dropped with the waker.
    _other: Mutex<TaskFuture>,
}

impl std::task::Wake for DropsAnother {
    fn wake(self: Arc<Self>) {}
}

/// Polls `first` with a [`DropsAnother`] waker that owns `second`, drops
/// the test's reference to that waker, then polls `first` again (on
/// another thread) with a different waker: the library drops the old one,
/// the last reference, which drops `second`, whose drop takes the locks
/// the first call's registrations were replaced under. Returns whether
/// the second poll returned (pending both times).
fn a_replaced_waker_drops_another_call(mut first: TaskFuture, second: TaskFuture) -> bool {
    let task = Arc::new(DropsAnother {
        _other: Mutex::new(second),
    });
    let waker = std::task::Waker::from(task);
    let polled = first
        .as_mut()
        .poll(&mut std::task::Context::from_waker(&waker));
    assert!(polled.is_pending());
    drop(waker);
    let again = std::thread::spawn(move || {
        let polled = first.as_mut().poll(&mut std::task::Context::from_waker(
            futures::task::noop_waker_ref(),
        ));
        assert!(polled.is_pending());
        first
    });
    let returned = wait_until(Duration::from_secs(5), || again.is_finished());
    if returned {
        drop(again.join().unwrap());
    }
    returned
}

/// Polls a call once with a waker that does nothing, expecting it to wait.
fn pending(mut call: TaskFuture) -> TaskFuture {
    let polled = call.as_mut().poll(&mut std::task::Context::from_waker(
        futures::task::noop_waker_ref(),
    ));
    assert!(polled.is_pending());
    call
}

/// Two calls with deadlines wait for a dial whose handshake is never
/// answered. The first's old waker was dropped under the dial list's lock
/// and under its reactor's timers' lock as it was replaced; the second
/// call's drop, which it ran, took them again: the poll deadlocked.
#[test]
fn a_replaced_waker_of_a_call_waiting_for_a_dial_may_drop_another() {
    within(30, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client: &'static Client = Box::leak(Box::new(
            Client::new(
                listener.local_addr().unwrap(),
                Config::default()
                    .workers(1)
                    .handshake_timeout(Some(Duration::from_secs(3))),
            )
            .unwrap(),
        ));
        let call = |body: &'static [u8]| -> TaskFuture {
            Box::pin(
                client
                    .send_async(body)
                    .timeout(Some(Duration::from_secs(10))),
            )
        };
        let second = pending(call(b"second"));
        assert!(
            a_replaced_waker_drops_another_call(call(b"first"), second),
            "replacing a waiting call's waker deadlocked"
        );
        client.shutdown();
        drop(listener);
    });
}

/// Two async sends wait for room in a connection's full queue (its peer
/// never reads). The first's old waker was dropped under the queue's lock
/// as it was replaced; the second call's drop, which it ran, took that
/// lock again: the poll deadlocked.
#[test]
fn a_replaced_waker_of_a_call_waiting_for_room_may_drop_another() {
    within(30, || {
        let (done, finished) = mpsc::channel::<()>();
        let (addr, peer) = common::raw_server(move |stream| {
            // A small receive buffer that does not grow: the queue fills
            // and stays full.
            let _ = socket2::SockRef::from(&stream).set_recv_buffer_size(16 << 10);
            let _ = finished.recv_timeout(Duration::from_secs(20));
        });
        let client: &'static Client = Box::leak(Box::new(
            Client::new(
                addr,
                Config::default()
                    .workers(1)
                    .max_conns(1)
                    .max_queued_bytes(64 << 10)
                    .send_buffer_size(Some(16 << 10)),
            )
            .unwrap(),
        ));
        let call = || -> TaskFuture { Box::pin(client.send_no_wait_async(&[7u8; 16 << 10])) };
        // Fill the sockets and the queue, until a call waits for room.
        let mut second = None;
        for _ in 0..10_000 {
            let mut next = call();
            let polled = next.as_mut().poll(&mut std::task::Context::from_waker(
                futures::task::noop_waker_ref(),
            ));
            match polled {
                std::task::Poll::Pending => {
                    second = Some(next);
                    break;
                }
                std::task::Poll::Ready(sent) => sent.unwrap(),
            }
        }
        let second = second.expect("the queue never filled");
        let returned = a_replaced_waker_drops_another_call(call(), second);
        assert!(returned, "replacing a waiting call's waker deadlocked");
        done.send(()).unwrap();
        peer.join().unwrap();
        client.shutdown();
    });
}
