//! Zero heap allocations per `send`, `send_no_wait`, `request` and handler
//! `reply` in steady state, counted on every thread (callers and reactors)
//! by a counting global allocator; the async path as well as the blocking
//! one.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use monte_rpc::{Client, Config, Context, Server};

struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static LAST_SIZE: AtomicU64 = AtomicU64::new(0);

// SAFETY: defers every call to the system allocator unchanged; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LAST_SIZE.store(layout.size() as u64, Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        LAST_SIZE.store(new_size as u64, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const N: usize = 10_000;

/// The count is process-wide: the tests of this file run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn wait_until(what: &str, deadline: Duration, mut done: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    while !done() {
        assert!(Instant::now() < end, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// A server that counts every message and answers requests with 1400
/// bytes, and a one-connection client to it, on one reactor each.
struct Pair {
    server: Server,
    client: Client,
    seen: Arc<AtomicU64>,
    sent: u64,
    payload: Vec<u8>,
    response: Vec<u8>,
    /// The async rounds' response buffers.
    responses: [Vec<u8>; 5],
}

impl Pair {
    fn start() -> Pair {
        let seen = Arc::new(AtomicU64::new(0));
        let counter = seen.clone();
        let reply = vec![7u8; 1400];
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            move |ctx: &mut Context<'_>| {
                counter.fetch_add(1, Ordering::Relaxed);
                if ctx.expects_reply() {
                    ctx.reply(&reply).unwrap();
                }
            },
        )
        .unwrap();
        let client = Client::new(
            server.local_addr(),
            Config::default().workers(1).max_conns(1),
        )
        .unwrap();
        Pair {
            server,
            client,
            seen,
            sent: 0,
            payload: vec![1u8; 1400],
            response: Vec::with_capacity(4096),
            responses: std::array::from_fn(|_| Vec::with_capacity(4096)),
        }
    }

    /// `n` each of send, send_no_wait and request, then waits until the
    /// server counted every message.
    fn round(&mut self, n: usize) {
        for _ in 0..n {
            self.client.send(&self.payload).unwrap();
            self.client.send_no_wait(&self.payload).unwrap();
            self.client
                .request(&self.payload, &mut self.response)
                .unwrap();
            assert_eq!(self.response.len(), 1400);
            self.sent += 3;
        }
        let (target, seen) = (self.sent, &self.seen);
        wait_until(
            "the server to count every message",
            Duration::from_secs(20),
            || seen.load(Ordering::Relaxed) >= target,
        );
    }

    /// Allocations anywhere in the process during `f`.
    fn allocations(&mut self, f: impl FnOnce(&mut Pair)) -> u64 {
        let before = ALLOCS.load(Ordering::SeqCst);
        f(self);
        ALLOCS.load(Ordering::SeqCst) - before
    }

    fn stop(self) {
        self.client.shutdown();
        self.server.shutdown();
    }
}

/// After a warm-up, 10,000 of each call allocate nothing anywhere in the
/// process: not on the caller, not on the client's or server's reactors.
#[test]
fn steady_state_calls_allocate_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::start();
    pair.round(2_000);
    let allocs = pair.allocations(|p| p.round(N));
    assert_eq!(
        allocs, 0,
        "{allocs} allocations over {N} each of send, send_no_wait, request and reply (last of {} bytes)",
        LAST_SIZE.load(Ordering::Relaxed)
    );
    pair.stop();
}

/// Connections that idled long enough to give their buffers back (an idle
/// connection holds none) borrow them again from their reactor's pools
/// when traffic resumes: waking allocates nothing either.
#[test]
fn waking_after_idle_allocates_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::start();
    pair.round(2_000);
    for idle in 0..3 {
        // Past the 1 s after which an idle connection gives its buffers
        // back, and a sweep (at most 250 ms apart) to notice it.
        std::thread::sleep(Duration::from_millis(1600));
        let allocs = pair.allocations(|p| p.round(100));
        assert_eq!(
            allocs,
            0,
            "waking after idle period {idle}: {allocs} allocations (last of {} bytes)",
            LAST_SIZE.load(Ordering::Relaxed)
        );
    }
    pair.stop();
}

impl Pair {
    /// [`round`](Pair::round) through the async API, on an executor with no
    /// timer of its own: per iteration a send, a queued send, four
    /// requests in flight at once on the one connection, and one request
    /// cancelled by dropping it after its first poll.
    fn async_round(&mut self, n: usize) {
        let (client, payload, responses) = (&self.client, &self.payload, &mut self.responses);
        let sent = futures::executor::block_on(async {
            let mut sent = 0;
            for _ in 0..n {
                client.send_async(payload).await.unwrap();
                client.send_no_wait_async(payload).await.unwrap();
                let [a, b, c, d, e] = &mut *responses;
                let (ra, rb, rc, rd) = futures::join!(
                    client.request_async(payload, a),
                    client.request_async(payload, b),
                    client.request_async(payload, c),
                    client.request_async(payload, d),
                );
                for r in [ra, rb, rc, rd] {
                    r.unwrap();
                }
                assert_eq!(a.len(), 1400);
                let mut cancelled = std::pin::pin!(client.request_async(payload, e));
                let _ = futures::poll!(cancelled.as_mut());
                sent += 7;
            }
            sent
        });
        self.sent += sent;
        let (target, seen) = (self.sent, &self.seen);
        wait_until(
            "the server to count every message",
            Duration::from_secs(20),
            || seen.load(Ordering::Relaxed) >= target,
        );
    }
}

/// The async path allocates nothing per call in steady state either:
/// futures, completion slots' wakers, the reactor's timers for their
/// deadlines, and a cancelled request's slot.
#[test]
fn steady_state_async_calls_allocate_nothing() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut pair = Pair::start();
    pair.async_round(1_000);
    let allocs = pair.allocations(|p| p.async_round(N / 4));
    assert_eq!(
        allocs,
        0,
        "{allocs} allocations over {} async rounds (last of {} bytes)",
        N / 4,
        LAST_SIZE.load(Ordering::Relaxed)
    );
    pair.stop();
}
