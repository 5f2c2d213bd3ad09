//! Hostile peers against a live in-process `Server` on 127.0.0.1: the
//! thirteen cases of `common/hostile_cases.rs` (which says what each
//! checks), each against a fresh server, through a handler that records
//! every callback. `tests/hostile_external.rs` runs the same cases against
//! the example server binary.
//!
//! The cases run one at a time (a file-wide lock), so that each RSS
//! measurement (of this whole process) sees only its own attack, and each
//! runs on its own thread with a deadline, so none can hang the run.

mod common;
#[path = "common/hostile_cases.rs"]
mod hostile_cases;

use common::{reversed, wait_until, within};
use hostile_cases::{closes, Answer, Flood, Log, Settings, Target};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use monte_rpc::protocol::PskHandshake;
use monte_rpc::{Config, Connection, Context, Error, Handler, Server, Stats};

static SERIAL: Mutex<()> = Mutex::new(());

/// Runs one case against a fresh server with `settings`: alone (no other
/// case of this file runs meanwhile), on its own thread, failing if it
/// takes more than 30 s.
fn case(name: &'static str, settings: Settings, body: fn(&dyn Target)) {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let start = Instant::now();
    within(30, move || {
        let target = InProcess::start(settings);
        body(&target);
        target.finish();
    });
    eprintln!("[hostile] {name}: passed in {:?}", start.elapsed());
}

/// The reply size a request asks for with [`hostile_cases::BIG_REPLY`],
/// if it does.
fn big_reply_size(body: &[u8]) -> Option<usize> {
    let size = body.strip_prefix(hostile_cases::BIG_REPLY)?;
    Some(u32::from_be_bytes(size.try_into().ok()?) as usize)
}

/// Open connections by peer, for the server-side calls of cases 10 and 13.
type Conns = Arc<Mutex<HashMap<SocketAddr, Connection>>>;

/// Replies to every request with its body reversed, records every callback
/// in the log and keeps each open connection's handle.
struct Recorder {
    log: Arc<Log>,
    conns: Conns,
}

impl Handler for Recorder {
    fn on_message(&self, ctx: &mut Context<'_>) {
        if let Some(peer) = ctx.conn().peer_addr() {
            self.log
                .update(|e| *e.messages.entry(peer).or_default() += 1);
        }
        if let Some(size) = big_reply_size(ctx.body()) {
            let _ = ctx.reply(&vec![0x5a; size.min(hostile_cases::MAX_MESSAGE)]);
            return;
        }
        let body = reversed(ctx.body());
        let _ = ctx.reply(&body);
    }

    fn on_open(&self, conn: &Connection) {
        if let Some(peer) = conn.peer_addr() {
            self.log.record_open(peer);
            lock(&self.conns).insert(peer, conn.clone());
        }
    }

    fn on_close(&self, conn: &Connection, reason: &Error) {
        if let Some(peer) = conn.peer_addr() {
            lock(&self.conns).remove(&peer);
            // Messages were counted as they came.
            self.log.record_close(peer, 0, reason.clone());
        }
    }

    fn on_handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        // Recorded even without an address, so the count of reported closes
        // stays exact; a case waiting for its peer's failure then fails.
        let peer = peer.unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        self.log.record_handshake_failure(peer, error.clone());
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The server under attack, in this process.
struct InProcess {
    server: Server,
    settings: Settings,
    log: Arc<Log>,
    conns: Conns,
    next_request: AtomicU64,
    /// Floods and requests under way, joined before the server goes.
    calls: Mutex<Vec<JoinHandle<()>>>,
}

impl InProcess {
    fn start(settings: Settings) -> InProcess {
        let config = Config::server()
            .workers(settings.workers)
            .handshake_timeout(Some(settings.handshake_timeout))
            .read_timeout(Some(settings.read_timeout))
            .frame_timeout(Some(settings.frame_timeout))
            .write_timeout(Some(settings.write_timeout))
            .request_timeout(Some(Duration::from_secs(5)))
            .max_message_size(settings.max_message)
            .max_queued_bytes(settings.max_queued_bytes)
            .max_in_flight(settings.max_in_flight)
            .max_conns(settings.max_conns)
            .accept_wait(settings.accept_wait);
        let config = match settings.psk {
            Some(psk) => config.handshake(Arc::new(PskHandshake::factory(psk))),
            None => config,
        };
        let log = Arc::new(Log::default());
        let conns = Conns::default();
        let handler = Recorder {
            log: log.clone(),
            conns: conns.clone(),
        };
        let server = Server::bind("127.0.0.1:0", config, handler).expect("bind server");
        InProcess {
            server,
            settings,
            log,
            conns,
            next_request: AtomicU64::new(1),
            calls: Mutex::new(Vec::new()),
        }
    }

    /// The handle of the open connection from `peer`, once `on_open` ran.
    fn conn(&self, peer: SocketAddr) -> Connection {
        let mut conn = None;
        assert!(
            wait_until(Duration::from_secs(3), || {
                conn = lock(&self.conns).get(&peer).cloned();
                conn.is_some()
            }),
            "no open connection from {peer}"
        );
        conn.unwrap()
    }

    /// After a case: every close the counters know of reached the handler,
    /// every call ended; then the server shuts down.
    fn finish(self) {
        hostile_cases::settle(&self, 0);
        let mut reported = 0;
        let all = wait_until(Duration::from_secs(3), || {
            reported = self.log.events().ends;
            reported == closes(&self.server.stats())
        });
        assert!(
            all,
            "the handler heard of {reported} closes, the counters of {}",
            closes(&self.server.stats())
        );
        for call in std::mem::take(&mut *lock(&self.calls)) {
            call.join().expect("a server-side call panicked");
        }
        self.server.shutdown();
    }
}

impl Target for InProcess {
    fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn log(&self) -> &Log {
        &self.log
    }

    fn connections(&self) -> usize {
        self.server.connections()
    }

    fn stats(&self) -> Stats {
        self.server.stats()
    }

    fn rss(&self) -> u64 {
        let statm = std::fs::read_to_string("/proc/self/statm").expect("read /proc/self/statm");
        let pages: u64 = statm
            .split_whitespace()
            .nth(1)
            .expect("statm has a resident field")
            .parse()
            .expect("resident pages");
        pages * 4096
    }

    fn start_flood(&self, peer: SocketAddr, size: usize) {
        let conn = self.conn(peer);
        let log = self.log.clone();
        lock(&self.calls).push(thread::spawn(move || {
            let body = vec![0u8; size];
            let start = Instant::now();
            let mut sent = 0u64;
            let result = loop {
                if start.elapsed() > Duration::from_secs(10) {
                    break None;
                }
                match conn.send_no_wait(&body) {
                    Ok(()) => sent += size as u64,
                    Err(e) => break Some(e),
                }
            };
            let took = start.elapsed();
            log.record_flood(peer, Flood { sent, result, took });
        }));
    }

    fn start_request(&self, peer: SocketAddr, body: &[u8], timeout: Duration) -> u64 {
        let conn = self.conn(peer);
        let id = self.next_request.fetch_add(1, Ordering::Relaxed);
        let log = self.log.clone();
        let body = body.to_vec();
        lock(&self.calls).push(thread::spawn(move || {
            let start = Instant::now();
            let mut resp = Vec::new();
            let result = conn.request_timeout(&body, &mut resp, Some(timeout));
            let took = start.elapsed();
            let result = result.map(|()| resp);
            log.record_answer(id, Answer { result, took });
        }));
        id
    }
}

#[test]
fn low_order_client_key_is_refused_before_on_open() {
    case(
        "1 low-order client key",
        Settings::general(),
        hostile_cases::low_order_client_key,
    );
}

#[test]
fn slowloris_handshake_is_closed_at_the_handshake_timeout() {
    case(
        "2 slowloris handshake",
        Settings::general(),
        hostile_cases::slowloris_handshake,
    );
}

#[test]
fn oversized_length_prefix_is_frame_too_large() {
    case(
        "3 oversized length prefix",
        Settings::general(),
        hostile_cases::oversized_length_prefix,
    );
}

#[test]
fn undersized_length_prefix_is_frame_too_short() {
    case(
        "4 undersized length prefix",
        Settings::general(),
        hostile_cases::undersized_length_prefix,
    );
}

#[test]
fn flipped_tag_bit_is_authentication() {
    case(
        "5 flipped tag bit",
        Settings::general(),
        hostile_cases::flipped_tag_bit,
    );
}

#[test]
fn replayed_frame_is_authentication() {
    case(
        "6 replayed frame",
        Settings::general(),
        hostile_cases::replayed_frame,
    );
}

#[test]
fn random_bytes_after_the_handshake_are_refused() {
    case(
        "7 random bytes",
        Settings::general(),
        hostile_cases::random_bytes,
    );
}

#[test]
fn half_a_frame_then_close_is_peer_closed() {
    case(
        "8 half a frame, then close",
        Settings::general(),
        hostile_cases::half_a_frame_then_close,
    );
}

#[test]
fn half_a_frame_then_silence_is_a_read_timeout() {
    case(
        "9 half a frame, then silence",
        Settings::general(),
        hostile_cases::half_a_frame_then_silence,
    );
}

#[test]
fn non_reading_peer_is_closed_at_the_write_timeout() {
    case(
        "10 non-reading peer",
        Settings::general(),
        hostile_cases::non_reading_peer,
    );
}

// The handshake timeout is 3 s here, so that it does not close the
// admitted idle sockets during the accept wait.
#[test]
fn idle_sockets_over_the_cap_are_closed_after_the_accept_wait() {
    case(
        "11 idle sockets over the cap",
        Settings::capped(Duration::from_secs(3)),
        hostile_cases::idle_sockets_over_the_cap,
    );
}

#[test]
fn idle_sockets_over_the_cap_all_go_with_a_short_handshake_timeout() {
    case(
        "11b idle sockets, short handshake timeout",
        Settings::capped(Settings::general().handshake_timeout),
        hostile_cases::idle_sockets_over_the_cap_short_handshake,
    );
}

#[test]
fn response_to_an_unissued_request_is_dropped() {
    case(
        "12 unasked-for response",
        Settings::general(),
        hostile_cases::unasked_for_response,
    );
}

#[test]
fn late_response_never_reaches_the_next_request() {
    case(
        "13 late response",
        Settings::general(),
        hostile_cases::late_response,
    );
}

#[test]
fn pipelined_requests_never_read_stay_within_the_queue_budget() {
    case(
        "14 pipelined requests, replies never read",
        Settings::budget(),
        hostile_cases::pipelined_requests_never_read,
    );
}

#[test]
fn psk_peer_without_the_key_never_opens() {
    case(
        "15 psk peer without the key",
        Settings::psk(),
        hostile_cases::psk_peer_without_the_key,
    );
}

#[test]
fn trickled_frame_is_closed_at_the_frame_timeout() {
    case(
        "16 trickled frame",
        Settings::general(),
        hostile_cases::trickled_frame,
    );
}
