//! loom models of the crate's own `src/sync` code (compiled with
//! `--cfg loom`, so its atomics, cells and park/unpark are loom's). Each
//! model names the invariant it checks.
#![cfg(loom)]

use loom::sync::atomic::{AtomicUsize, Ordering};
use loom::sync::{Arc, Condvar, Mutex};
use loom::thread;
use monte_rpc::protocol::connection::Buffers;
use monte_rpc::protocol::Role;
use monte_rpc::sync::buffers::BufferPool;
use monte_rpc::sync::completion::{CompletionTable, NO_LIMIT};
use monte_rpc::sync::mailbox::{Mailbox, Notify};
use monte_rpc::sync::read_turn::{ReadGuard, ReadTurn};
use monte_rpc::sync::signal::ShutdownSignal;
use monte_rpc::Error;

fn model(f: impl Fn() + Sync + Send + 'static) {
    loom::model(f);
}

/// Spawns a model thread with room for the crate's stack frames (loom's
/// default coroutine stack is too small for them).
fn spawn<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> thread::JoinHandle<T> {
    thread::Builder::new()
        .stack_size(1 << 20)
        .spawn(f)
        .expect("spawn")
}

/// Model 1, completion slot. A response arrives while the requester is
/// parking or just after. Invariant: no lost wake-up (the model would
/// deadlock), and the requester reads the response exactly once, intact.
#[test]
fn response_races_parking_requester() {
    model(|| {
        let table = Arc::new(CompletionTable::new(Role::Client, 1));
        let pending = table.begin(Vec::new(), NO_LIMIT).unwrap();
        let seq = pending.seq();
        let responder = {
            let table = table.clone();
            spawn(move || assert!(table.complete(seq, b"pong")))
        };
        let got = pending.wait(0, None).unwrap();
        assert_eq!(got, b"pong");
        responder.join().unwrap();
        // The slot is free again, in a new generation: the same response
        // cannot be delivered twice.
        assert!(!table.complete(seq, b"pong"));
        assert_eq!(table.in_flight(), 0);
    });
}

/// Model 2, timeout or cancel racing a late response. Invariant: either
/// the response was delivered before the cancel or it is dropped; the slot
/// is reused with a new generation and the late response never fills the
/// new request (no ABA).
#[test]
fn cancel_races_late_response_without_aba() {
    model(|| {
        let table = Arc::new(CompletionTable::new(Role::Client, 1));
        let old = table.begin(Vec::new(), NO_LIMIT).unwrap();
        let old_seq = old.seq();
        let late = {
            let table = table.clone();
            spawn(move || table.complete(old_seq, b"late"))
        };
        let _ = old.cancel();
        let new = table.begin(Vec::new(), NO_LIMIT).unwrap();
        let new_seq = new.seq();
        assert_ne!(new_seq, old_seq, "a reused slot needs a new generation");
        late.join().unwrap();
        let responder = {
            let table = table.clone();
            spawn(move || assert!(table.complete(new_seq, b"fresh")))
        };
        assert_eq!(new.wait(0, None).unwrap(), b"fresh");
        responder.join().unwrap();
    });
}

/// Model 3, connection close failing every pending slot while requesters
/// park. Invariant: each requester returns (Closed or, never here, a
/// response), none hangs, and a request begun after the close is refused.
#[test]
fn close_fails_parking_requesters() {
    model(|| {
        let table = Arc::new(CompletionTable::new(Role::Server, 2));
        let waiters: Vec<_> = (0..2)
            .map(|_| {
                let table = table.clone();
                spawn(move || match table.begin(Vec::new(), NO_LIMIT) {
                    Ok(p) => p.wait(0, None).map(|_| ()).map_err(|(e, _)| e),
                    Err((e, _)) => Err(e),
                })
            })
            .collect();
        table.close(&Error::Closed);
        for w in waiters {
            assert!(matches!(w.join().unwrap(), Err(Error::Closed)));
        }
        assert!(matches!(table.begin(Vec::new(), NO_LIMIT), Err((Error::Closed, _))));
    });
}

/// Stands in for `mio::Waker`: like an eventfd, a notification before the
/// wait is not lost.
struct Wake {
    raised: Mutex<bool>,
    cv: Condvar,
}

impl Notify for Wake {
    fn notify(&self) -> std::io::Result<()> {
        *self.raised.lock().unwrap() = true;
        self.cv.notify_one();
        Ok(())
    }
}

impl Wake {
    /// Blocks like `epoll_wait` with no timeout until notified.
    fn sleep(&self) {
        let mut raised = self.raised.lock().unwrap();
        while !*raised {
            raised = self.cv.wait(raised).unwrap();
        }
        *raised = false;
    }
}

/// Model 4, mailbox and waker flag. Two producers, one consumer that
/// sleeps only after `prepare_sleep` says it may. Invariant: no message is
/// lost and no wake-up is missed when producers skip it (a missed one
/// leaves the consumer asleep forever: the model would deadlock).
#[test]
fn mailbox_never_loses_a_message_or_a_wakeup() {
    model(|| {
        let mailbox = Arc::new(Mailbox::<u32>::new());
        let wake = Arc::new(Wake {
            raised: Mutex::new(false),
            cv: Condvar::new(),
        });
        let producers: Vec<_> = (0..2)
            .map(|i| {
                let (mailbox, wake) = (mailbox.clone(), wake.clone());
                spawn(move || {
                    mailbox.push(i, &*wake).unwrap();
                })
            })
            .collect();
        let mut got = Vec::new();
        let mut buf = Vec::new();
        loop {
            mailbox.drain_into(&mut buf);
            got.append(&mut buf);
            if got.len() == 2 {
                break;
            }
            if mailbox.prepare_sleep() {
                // Sleep until notified, as the reactor blocks in epoll.
                wake.sleep();
            }
            mailbox.awake();
        }
        got.sort();
        assert_eq!(got, [0, 1]);
        for p in producers {
            p.join().unwrap();
        }
    });
}

/// Model 5, shutdown racing a call being submitted. Invariant: the call is
/// either inside before the close (and the closer waits for it to leave) or
/// refused; nothing enters after the closer saw zero calls inside.
#[test]
fn shutdown_races_a_call() {
    model(|| {
        let signal = Arc::new(ShutdownSignal::new());
        let done = Arc::new(AtomicUsize::new(0));
        let caller = {
            let (signal, done) = (signal.clone(), done.clone());
            spawn(move || match signal.enter() {
                Some(_guard) => {
                    done.fetch_add(1, Ordering::SeqCst);
                    true
                }
                None => false,
            })
        };
        signal.close();
        while signal.calls_inside() > 0 {
            thread::yield_now();
        }
        let seen = done.load(Ordering::SeqCst);
        let entered = caller.join().unwrap();
        assert_eq!(
            seen, entered as usize,
            "a call completed after shutdown drained"
        );
        assert!(signal.enter().is_none());
    });
}

/// Model 6, the read turn. Bytes arrive on a socket and the reactor hears
/// of them once each (edge-triggered) while a waiting caller may hold the
/// turn and be reading. The socket is modelled by a counter of bytes that
/// arrived; reading takes all of them. Invariant: when every thread is done,
/// every byte that arrived was read by someone (no readiness event lost),
/// and no two threads ever held the turn at once.
#[test]
fn read_turn_never_loses_an_edge() {
    model(|| {
        // (bytes that arrived, holders right now)
        let socket = Arc::new((AtomicUsize::new(0), AtomicUsize::new(0)));
        let turn = Arc::new(ReadTurn::new(0usize, |_| {}));
        fn read_while_held<'a>(
            turn: &'a ReadTurn<usize>,
            socket: &(AtomicUsize, AtomicUsize),
            mut guard: ReadGuard<'a, usize>,
        ) {
            loop {
                assert_eq!(socket.1.fetch_add(1, Ordering::SeqCst), 0, "two readers");
                *guard = socket.0.load(Ordering::SeqCst);
                socket.1.fetch_sub(1, Ordering::SeqCst);
                match turn.release(guard) {
                    Some(again) => guard = again,
                    None => return,
                }
            }
        }
        let reactor = {
            let (socket, turn) = (socket.clone(), turn.clone());
            spawn(move || {
                for _ in 0..2 {
                    socket.0.fetch_add(1, Ordering::SeqCst);
                    if let Some(guard) = turn.announce() {
                        read_while_held(&turn, &socket, guard);
                    }
                }
            })
        };
        // The waiting caller polls twice.
        for _ in 0..2 {
            if let Some(guard) = turn.try_take() {
                read_while_held(&turn, &socket, guard);
            }
        }
        reactor.join().unwrap();
        let read = *turn.try_take().expect("nobody holds the turn at the end");
        assert_eq!(read, 2, "an edge was lost: bytes left unread");
    });
}

/// What a connection's read side holds in model 7.
struct Side {
    /// Bytes read so far (the socket is a counter of bytes that arrived).
    read: usize,
    /// A frame only the reactor may dispatch is waiting.
    held: bool,
}

/// The reactor's read: dispatches what is held, reads everything, and
/// gives the turn back (reading again while it comes back).
fn reactor_reads(turn: &ReadTurn<Side>, arrived: &AtomicUsize) {
    let Some(mut side) = turn.announce() else {
        return;
    };
    loop {
        side.held = false;
        side.read = arrived.load(Ordering::SeqCst);
        match turn.release(side) {
            Some(again) => side = again,
            None => return,
        }
    }
}

/// Model 7, a caller that declines to read. A caller left a frame for the
/// reactor (`held`) and sent it a Read command; bytes then arrive, and the
/// reactor hears of them once, while a second caller may hold the turn. That
/// caller must not read (the held frame is the reactor's), and the rule in
/// `conn.rs` is: a holder that declines hands the reading on (another Read
/// command, sent after letting go of the turn) if taking the turn consumed a
/// readiness event. Invariant: once
/// every command is processed, the held frame was dispatched and every byte
/// read.
#[test]
fn read_turn_decliner_hands_the_event_on() {
    model(|| {
        let arrived = Arc::new(AtomicUsize::new(0));
        let commands = Arc::new(AtomicUsize::new(1));
        let turn = Arc::new(ReadTurn::new(
            Side {
                read: 0,
                held: true,
            },
            |_| {},
        ));
        let reactor = {
            let (arrived, commands, turn) = (arrived.clone(), commands.clone(), turn.clone());
            spawn(move || {
                arrived.fetch_add(1, Ordering::SeqCst);
                reactor_reads(&turn, &arrived);
                while commands.load(Ordering::SeqCst) > 0 {
                    commands.fetch_sub(1, Ordering::SeqCst);
                    reactor_reads(&turn, &arrived);
                }
            })
        };
        // The second caller, spinning: it only ever declines here.
        for _ in 0..2 {
            let Some(mut side) = turn.try_take() else {
                continue;
            };
            loop {
                if side.held && side.announced() {
                    // The turn first, then the command (as conn.rs does): a
                    // command the reactor took while the turn was still
                    // held would find it taken and be lost.
                    drop(side);
                    commands.fetch_add(1, Ordering::SeqCst);
                    break;
                }
                if !side.held {
                    side.read = arrived.load(Ordering::SeqCst);
                }
                match turn.release(side) {
                    Some(again) => side = again,
                    None => break,
                }
            }
        }
        reactor.join().unwrap();
        // The reactor's later turns take the commands still queued.
        while commands.load(Ordering::SeqCst) > 0 {
            commands.fetch_sub(1, Ordering::SeqCst);
            reactor_reads(&turn, &arrived);
        }
        let side = turn.try_take().expect("nobody holds the turn at the end");
        assert!(!side.held, "the held frame was never dispatched");
        assert_eq!(side.read, 1, "an edge was lost: bytes left unread");
    });
}

/// Model 8, buffer pool. Two connections of a reactor borrow a receive
/// buffer and give it back while a third thread returns another, into a
/// pool with room for one. Invariant: the pool never keeps more than its
/// bound and never loses a buffer while it has room: afterwards it holds
/// exactly one, lent by exactly one `take`.
#[test]
fn buffer_pool_keeps_its_bound_and_loses_nothing() {
    model(|| {
        let pool = Arc::new(BufferPool::new(8, 1));
        pool.give(vec![1; 8]);
        let threads: Vec<_> = (0..2)
            .map(|_| {
                let pool = pool.clone();
                spawn(move || {
                    if let Some(buf) = pool.take() {
                        pool.give(buf);
                    }
                })
            })
            .chain(std::iter::once({
                let pool = pool.clone();
                spawn(move || pool.give(vec![2; 8]))
            }))
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert!(pool.take().is_some(), "a buffer was lost");
        assert!(pool.take().is_none(), "the pool kept more than its bound");
    });
}

/// Drives `poll` to completion on this model thread: a waker that unparks
/// it, and a park whenever the poll is pending. A lost wake-up leaves the
/// thread parked for ever, which loom reports.
fn block_on_poll<T>(mut poll: impl FnMut(&mut std::task::Context<'_>) -> std::task::Poll<T>) -> T {
    struct Unpark(thread::Thread);
    impl std::task::Wake for Unpark {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.unpark();
        }
        fn wake_by_ref(self: &std::sync::Arc<Self>) {
            self.0.unpark();
        }
    }
    let waker = std::task::Waker::from(std::sync::Arc::new(Unpark(thread::current())));
    let mut cx = std::task::Context::from_waker(&waker);
    loop {
        match poll(&mut cx) {
            std::task::Poll::Ready(value) => return value,
            std::task::Poll::Pending => thread::park(),
        }
    }
}

/// Model 9, a completion slot awaited by a future. A response races the
/// future's polls, and the future's waker changes between its first poll
/// and the next (a task moved to another worker). Invariant: the waker
/// registered last is woken (no lost wake-up: the model would deadlock),
/// and the answer is read exactly once, intact. The future is polled on a
/// thread of its own, which only ever parks in `block_on_poll`, so every
/// unpark it gets is a waker's.
#[test]
fn response_races_a_polling_future_whose_waker_changes() {
    model(|| {
        let table = Arc::new(CompletionTable::new(Role::Client, 1));
        let task = {
            let table = table.clone();
            spawn(move || {
                let mut pending = table.begin_for_task(Vec::new(), NO_LIMIT).unwrap();
                let seq = pending.seq();
                let responder = {
                    let table = table.clone();
                    spawn(move || assert!(table.complete(seq, b"pong")))
                };
                // A first poll with a waker that does nothing and is then
                // dropped.
                struct Noop;
                impl std::task::Wake for Noop {
                    fn wake(self: std::sync::Arc<Self>) {}
                }
                let noop = std::task::Waker::from(std::sync::Arc::new(Noop));
                let first = pending.poll_answer(&mut std::task::Context::from_waker(&noop));
                let answer = match first {
                    std::task::Poll::Ready(answer) => answer,
                    std::task::Poll::Pending => block_on_poll(|cx| pending.poll_answer(cx)),
                };
                assert_eq!(answer.unwrap(), b"pong");
                responder
            })
        };
        let responder = task.join().unwrap();
        responder.join().unwrap();
        assert_eq!(table.in_flight(), 0);
    });
}

/// Model 10, a future's request failed by the connection's close.
/// Invariant: the close wakes the future (no lost wake-up), which gets
/// the close's error.
#[test]
fn close_wakes_a_polling_future() {
    model(|| {
        let table = Arc::new(CompletionTable::new(Role::Client, 1));
        let task = {
            let table = table.clone();
            spawn(move || {
                let mut pending = table.begin_for_task(Vec::new(), NO_LIMIT).unwrap();
                let closer = {
                    let table = table.clone();
                    spawn(move || table.close(&Error::PeerClosed))
                };
                let answer = block_on_poll(|cx| pending.poll_answer(cx));
                assert!(matches!(answer, Err((Error::PeerClosed, _))));
                closer
            })
        };
        let closer = task.join().unwrap();
        closer.join().unwrap();
    });
}

fn noop_waker() -> std::task::Waker {
    struct Noop;
    impl std::task::Wake for Noop {
        fn wake(self: std::sync::Arc<Self>) {}
    }
    std::task::Waker::from(std::sync::Arc::new(Noop))
}

/// Model 11, an async call's deadline registered while its reactor goes
/// to sleep until a later time. Invariant: the reactor sees the deadline
/// before it sleeps (it then sleeps no later than the deadline), or the
/// registration tells its caller to wake the reactor: a deadline is never
/// missed by a sleeping reactor.
#[test]
fn a_deadline_registered_as_the_reactor_sleeps_is_never_missed() {
    use monte_rpc::sync::timers::Timers;
    model(|| {
        let timers = Arc::new(Timers::new());
        let registrar = {
            let timers = timers.clone();
            spawn(move || {
                let (key, wake_reactor) = timers.insert(50, &noop_waker());
                timers.remove(key);
                wake_reactor
            })
        };
        // The reactor: about to sleep until 100.
        let sleeps_until = timers.sleeping_until(100).map_or(100, |at| at.min(100));
        let woken = registrar.join().unwrap();
        assert!(
            sleeps_until <= 50 || woken,
            "the reactor sleeps until {sleeps_until} past a deadline at 50, unwoken"
        );
    });
}

/// Model 12, a future's request timing out as its response arrives.
/// Invariant: the future gets either the response or the timeout, never
/// both or neither; the slot is free afterwards, and a response that
/// comes after the timeout is dropped (it can never fill the slot's next
/// request).
#[test]
fn a_timeout_races_the_response() {
    model(|| {
        let table = Arc::new(CompletionTable::new(Role::Client, 1));
        let pending = table.begin_for_task(Vec::new(), NO_LIMIT).unwrap();
        let seq = pending.seq();
        let ticket = pending.into_ticket();
        let responder = {
            let table = table.clone();
            spawn(move || table.complete(seq, b"pong"))
        };
        let answer = ticket.time_out(&table);
        let delivered = responder.join().unwrap();
        match answer {
            Ok(response) => {
                assert!(delivered);
                assert_eq!(response, b"pong");
            }
            Err((Error::Timeout(_), _)) => {
                assert!(!delivered, "a response filled a timed-out slot")
            }
            Err((e, _)) => panic!("unexpected {e}"),
        }
        assert_eq!(table.in_flight(), 0);
        let next = table.begin_for_task(Vec::new(), NO_LIMIT).unwrap();
        assert!(!table.complete(seq, b"late"));
        drop(next.cancel());
    });
}

/// Model 13, the read turn closed under its holders. A caller reads into
/// the value (bytes buffered) and gives the turn back (released, reading
/// again while it comes back); the reactor reads and drops the turn
/// instead (its hand-off on the end of the stream); meanwhile the
/// connection closes. Invariant: no two threads ever hold the turn, and
/// once every thread is done nothing read is left in the value: whoever
/// lets go last after the close discarded it.
#[test]
fn a_closed_read_turn_leaves_nothing_behind_its_last_holder() {
    model(|| {
        // (bytes buffered, holders right now)
        let turn = Arc::new(ReadTurn::new(0usize, |buffered| *buffered = 0));
        let holders = Arc::new(AtomicUsize::new(0));
        fn read(holders: &AtomicUsize, buffered: &mut usize) {
            assert_eq!(holders.fetch_add(1, Ordering::SeqCst), 0, "two readers");
            *buffered = 1;
            holders.fetch_sub(1, Ordering::SeqCst);
        }
        let caller = {
            let (turn, holders) = (turn.clone(), holders.clone());
            spawn(move || {
                let Some(mut guard) = turn.try_take() else {
                    return;
                };
                loop {
                    read(&holders, &mut guard);
                    match turn.release(guard) {
                        Some(again) => guard = again,
                        None => return,
                    }
                }
            })
        };
        let reactor = {
            let (turn, holders) = (turn.clone(), holders.clone());
            spawn(move || {
                if let Some(mut guard) = turn.announce() {
                    read(&holders, &mut guard);
                }
            })
        };
        turn.close();
        caller.join().unwrap();
        reactor.join().unwrap();
        let left = *turn.try_take().expect("nobody holds the turn at the end");
        assert_eq!(left, 0, "input outlived the close");
    });
}
