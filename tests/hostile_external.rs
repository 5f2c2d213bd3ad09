//! The example server binary (`examples/server.rs`) under the thirteen
//! hostile cases of `common/hostile_cases.rs`, attacked from this process
//! over loopback. Owns the child-process target: starting the binary,
//! reading its `--events` lines into the cases' event log, driving its
//! `--control` commands (counters, server-side floods and requests),
//! reading its RSS from /proc, and stopping it.
//!
//! One child serves cases 1 to 10, 12 and 13 one after the other, so the
//! same process must survive them all; case 11 needs a small connection
//! cap (100-socket rounds of the other cases would not fit under it), so
//! it gets a child of its own for each of its two handshake timeouts.
//! Between cases the runner checks the child is alive and answering, that
//! every close its counters know of was reported as an event, and that its
//! own error count agrees with the library's close reasons. At the end the
//! child must exit cleanly on SIGTERM.
//!
//! The binary is the one cargo builds next to this test's executable
//! (`target/<profile>/examples/server`): the full `cargo test` builds it;
//! a run limited with `--test` does not, so build it first with
//! `cargo build [--release] --examples`. A missing or stale binary fails
//! the test rather than test old code.

mod common;
#[path = "common/hostile_cases.rs"]
mod hostile_cases;

use common::{wait_until, within};
use hostile_cases::{closes, Answer, Events, Flood, Log, Settings, Target};

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use monte_rpc::{Error, HandshakeError, Stats, TimeoutKind};

/// The most the child's RSS may grow over all the cases it serves, on top
/// of each case's own bound.
const TOTAL_RSS_BOUND: u64 = 48 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

// ---------------------------------------------------------------------------
// The binary.
// ---------------------------------------------------------------------------

/// The sources a cargo dep-info file lists for its target.
fn dep_info_sources(path: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}; {BUILD}", path.display()));
    let (_, sources) = text
        .lines()
        .next()
        .and_then(|first| first.split_once(": "))
        .unwrap_or_else(|| panic!("{}: not a dep-info file", path.display()));
    sources.split_whitespace().map(PathBuf::from).collect()
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .unwrap_or_else(|e| panic!("{}: {e}; {BUILD}", path.display()))
}

const BUILD: &str = "build it with `cargo build --release --examples` (or `cargo build \
                     --examples` for a debug run); the full `cargo test` builds it too";

/// The example server cargo built beside this test, checked against the
/// sources it was built from (cargo's dep-info lists them).
///
/// An example source (examples/server.rs) newer than the binary makes it
/// stale. A library source newer than the binary makes it stale when this
/// test, which links the same library, was built after that change (a run
/// limited with `--test` rebuilt the test, not the example); a library
/// source edited after both were built (another session saving a file
/// during a full `cargo test`) leaves the two consistent, and is not held
/// against the binary.
fn server_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash> -> target/<profile>/examples/server
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test runs from target/<profile>/deps")
        .join("examples");
    let bin = dir.join("server");
    if !bin.exists() {
        panic!("no example server at {}; {BUILD}", bin.display());
    }
    let built = modified(&bin);
    let test_built = modified(&exe);
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    for source in dep_info_sources(&dir.join("server.d")) {
        let changed = modified(&source);
        let shared = !source.starts_with(&examples);
        assert!(
            changed <= built || (shared && changed > test_built),
            "{} is older than {}; {BUILD}",
            bin.display(),
            source.display()
        );
    }
    bin
}

// ---------------------------------------------------------------------------
// The child's output.
// ---------------------------------------------------------------------------

/// A `stats` reply: the library's counters and the example's own.
#[derive(Clone, Debug)]
struct ChildStats {
    lib: Stats,
    /// Connections held, handshakes included (`Server::connections`).
    handled: usize,
    requests: u64,
    errors: u64,
}

/// What the child printed besides handler events.
#[derive(Default)]
struct Output {
    listening: Option<SocketAddr>,
    stats: HashMap<u64, ChildStats>,
    served: Option<String>,
    /// Lines this test does not understand: each fails the test.
    unknown: Vec<String>,
    /// Stdout ended (the child exited or closed it).
    ended: bool,
}

#[derive(Default)]
struct Replies {
    output: Mutex<Output>,
    changed: Condvar,
}

impl Replies {
    fn update(&self, f: impl FnOnce(&mut Output)) {
        f(&mut lock(&self.output));
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for `f` to return something.
    fn wait_for<T>(
        &self,
        timeout: Duration,
        mut f: impl FnMut(&mut Output) -> Option<T>,
    ) -> Option<T> {
        let deadline = Instant::now() + timeout;
        let mut g = lock(&self.output);
        loop {
            if let Some(v) = f(&mut g) {
                return Some(v);
            }
            let now = Instant::now();
            if now >= deadline || g.ended {
                return None;
            }
            g = self
                .changed
                .wait_timeout(g, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// The value of `key=` in `line`, up to the next space (or, for the last
/// key, which may hold spaces, to the end).
fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!(" {key}="))? + key.len() + 2;
    let rest = &line[at..];
    if matches!(key, "reason" | "result" | "err" | "error") {
        Some(rest)
    } else {
        Some(rest.split(' ').next().unwrap_or(rest))
    }
}

fn num<T: std::str::FromStr>(line: &str, key: &str) -> Option<T> {
    value(line, key)?.parse().ok()
}

fn peer(line: &str) -> Option<SocketAddr> {
    num(line, "peer")
}

/// The number after `name: ` in a `Debug` form such as
/// `FrameTooLarge { len: 5, max: 4 }`.
fn debug_field(text: &str, name: &str) -> Option<usize> {
    let at = text.find(&format!("{name}: "))? + name.len() + 2;
    let digits: String = text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// The `Error` whose `Debug` form the child printed. Anything unexpected
/// becomes an `Io` error that carries the text, so the case that gets it
/// fails showing what the child said.
fn parse_error(text: &str) -> Error {
    let unknown = || {
        Error::Io(Arc::new(std::io::Error::other(format!(
            "child said: {text}"
        ))))
    };
    let inner = |prefix: &str| {
        text.strip_prefix(prefix)
            .and_then(|rest| rest.strip_suffix(')'))
    };
    if let Some(kind) = inner("Timeout(") {
        return Error::Timeout(match kind {
            "Dial" => TimeoutKind::Dial,
            "Handshake" => TimeoutKind::Handshake,
            "Read" => TimeoutKind::Read,
            "Frame" => TimeoutKind::Frame,
            "Write" => TimeoutKind::Write,
            "Request" => TimeoutKind::Request,
            _ => return unknown(),
        });
    }
    if let Some(kind) = inner("Handshake(") {
        return Error::Handshake(match kind {
            "LowOrderPublicKey" => HandshakeError::LowOrderPublicKey,
            "KeyGeneration" => HandshakeError::KeyGeneration,
            "PeerClosed" => HandshakeError::PeerClosed,
            "AlreadyFinished" => HandshakeError::AlreadyFinished,
            _ => match inner("Handshake(Rejected(").and_then(|c| c.strip_suffix(')')) {
                Some(code) => match code.parse() {
                    Ok(code) => HandshakeError::Rejected(code),
                    Err(_) => return unknown(),
                },
                None => return unknown(),
            },
        });
    }
    let name = text.split([' ', '(']).next().unwrap_or(text);
    let field = |f: &str| debug_field(text, f);
    let parsed = match name {
        "Closed" => Some(Error::Closed),
        "PeerClosed" => Some(Error::PeerClosed),
        "Authentication" => Some(Error::Authentication),
        "ReceiveFailed" => Some(Error::ReceiveFailed),
        "CounterExhausted" => Some(Error::CounterExhausted),
        "SequenceExhausted" => Some(Error::SequenceExhausted),
        "ConnectionLimit" => Some(Error::ConnectionLimit),
        "QueueFull" => Some(Error::QueueFull),
        "OnReactorThread" => Some(Error::OnReactorThread),
        "HandlerPanicked" => Some(Error::HandlerPanicked),
        "FrameTooShort" => field("len").map(|len| Error::FrameTooShort { len }),
        "FrameTooLarge" => field("len")
            .zip(field("max"))
            .zip(field("max_message"))
            .map(|((len, max), max_message)| Error::FrameTooLarge {
                len,
                max,
                max_message,
            }),
        "MessageTooLarge" => field("len")
            .zip(field("max"))
            .map(|(len, max)| Error::MessageTooLarge { len, max }),
        _ => None,
    };
    parsed.unwrap_or_else(unknown)
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if s.len() % 2 != 0 || !s.is_ascii() {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Sets the counter `name` of `stats`; false for a name `Stats` lacks.
fn set_counter(stats: &mut Stats, name: &str, v: u64) -> bool {
    let field = match name {
        "connections_open" => &mut stats.connections_open,
        "connections_opened" => &mut stats.connections_opened,
        "connections_refused" => &mut stats.connections_refused,
        "closed_local" => &mut stats.closed_local,
        "closed_by_peer" => &mut stats.closed_by_peer,
        "closed_handshake_timeout" => &mut stats.closed_handshake_timeout,
        "closed_read_timeout" => &mut stats.closed_read_timeout,
        "closed_write_timeout" => &mut stats.closed_write_timeout,
        "closed_frame_timeout" => &mut stats.closed_frame_timeout,
        "reads_paused" => &mut stats.reads_paused,
        "closed_protocol_error" => &mut stats.closed_protocol_error,
        "closed_other" => &mut stats.closed_other,
        "handshakes_failed" => &mut stats.handshakes_failed,
        "frames_in" => &mut stats.frames_in,
        "bytes_in" => &mut stats.bytes_in,
        "frames_out" => &mut stats.frames_out,
        "bytes_out" => &mut stats.bytes_out,
        "frames_rejected_too_short" => &mut stats.frames_rejected_too_short,
        "frames_rejected_too_large" => &mut stats.frames_rejected_too_large,
        "frames_rejected_authentication" => &mut stats.frames_rejected_authentication,
        "responses_dropped" => &mut stats.responses_dropped,
        "requests_in_flight" => &mut stats.requests_in_flight,
        "requests_timed_out" => &mut stats.requests_timed_out,
        _ => return false,
    };
    *field = v;
    true
}

fn parse_stats(line: &str) -> Option<(u64, ChildStats)> {
    let mut stats = ChildStats {
        lib: Stats::default(),
        handled: 0,
        requests: 0,
        errors: 0,
    };
    let mut id = None;
    let mut seen = 0;
    for word in line.split_whitespace().skip(1) {
        let (key, v) = word.split_once('=')?;
        let v: u64 = v.parse().ok()?;
        match key {
            "id" => id = Some(v),
            "handled" => stats.handled = v as usize,
            "requests" => stats.requests = v,
            "errors" => stats.errors = v,
            "messages" | "conns" => {}
            _ => {
                if set_counter(&mut stats.lib, key, v) {
                    seen += 1;
                }
            }
        }
    }
    // Every counter the cases account for must be in the line.
    (seen >= hostile_cases::ACCOUNTED.len()).then_some((id?, stats))
}

/// Sorts one line of the child's stdout into the event log or the
/// replies; `None` if it is not a line this test knows.
fn sort_line(line: &str, log: &Log, replies: &Replies) -> Option<()> {
    let (kind, _) = line.split_once(' ')?;
    match kind {
        "listening" => {
            let addr = line[kind.len() + 1..].parse().ok()?;
            replies.update(|o| o.listening = Some(addr));
        }
        "open" => log.record_open(peer(line)?),
        "close" => log.record_close(
            peer(line)?,
            num(line, "messages")?,
            parse_error(value(line, "reason")?),
        ),
        "handshake_failed" => {
            log.record_handshake_failure(peer(line)?, parse_error(value(line, "reason")?))
        }
        "stats" => {
            let (id, stats) = parse_stats(line)?;
            replies.update(|o| {
                o.stats.insert(id, stats);
            });
        }
        "flood" => {
            // `error=unknown peer` in place of the outcome: the whole line
            // goes to the case, which fails showing it.
            let flood = match value(line, "result") {
                Some(result) => Flood {
                    sent: num(line, "sent")?,
                    result: (result != "none").then(|| parse_error(result)),
                    took: Duration::from_micros(num(line, "took_us")?),
                },
                None => Flood {
                    sent: 0,
                    result: Some(parse_error(line)),
                    took: Duration::ZERO,
                },
            };
            log.record_flood(peer(line)?, flood);
        }
        "request" => {
            let answer = match (value(line, "ok"), value(line, "err")) {
                (Some(body), _) => Answer {
                    result: Ok(unhex(body)?),
                    took: Duration::from_micros(num(line, "took_us")?),
                },
                (None, Some(reason)) => Answer {
                    result: Err(parse_error(reason)),
                    took: Duration::from_micros(num(line, "took_us")?),
                },
                (None, None) => Answer {
                    result: Err(parse_error(line)),
                    took: Duration::ZERO,
                },
            };
            log.record_answer(num(line, "id")?, answer);
        }
        "served" => replies.update(|o| o.served = Some(line.to_string())),
        _ => return None,
    }
    Some(())
}

/// Reads the child's stdout until it ends. Never panics: a reader gone
/// would leave the child blocked on a full pipe, so a line it does not
/// know is kept for the runner to fail on.
fn read_stdout(stdout: impl std::io::Read, log: &Log, replies: &Replies) {
    for line in BufReader::new(stdout).lines() {
        let Ok(line) = line else { break };
        if sort_line(&line, log, replies).is_none() {
            replies.update(|o| o.unknown.push(line));
        }
    }
    replies.update(|o| o.ended = true);
}

// ---------------------------------------------------------------------------
// The child.
// ---------------------------------------------------------------------------

/// Kills the child unless it already exited, so that no failure (a panic,
/// a case over its deadline) leaves it running.
struct KillOnDrop(Arc<Mutex<Child>>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let mut child = lock(&self.0);
        if let Ok(None) = child.try_wait() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The example server in a child process.
struct ChildServer {
    child: Arc<Mutex<Child>>,
    pid: u32,
    stdin: Mutex<ChildStdin>,
    addr: SocketAddr,
    settings: Settings,
    log: Arc<Log>,
    replies: Arc<Replies>,
    next_id: AtomicU64,
}

impl ChildServer {
    /// Starts the binary on an ephemeral loopback port, configured from
    /// `settings`. Returns it with the guard that kills it.
    fn start(settings: Settings) -> (Arc<ChildServer>, KillOnDrop) {
        let ms = |d: Duration| d.as_millis().to_string();
        let mut child = Command::new(server_binary())
            .args(["--addr", "127.0.0.1:0", "--events", "--control"])
            .args(["--workers", &settings.workers.to_string()])
            .args(["--handshake-timeout-ms", &ms(settings.handshake_timeout)])
            .args(["--read-timeout-ms", &ms(settings.read_timeout)])
            .args(["--frame-timeout-ms", &ms(settings.frame_timeout)])
            .args(["--write-timeout-ms", &ms(settings.write_timeout)])
            .args(["--max-message-size", &settings.max_message.to_string()])
            .args(["--max-queued-bytes", &settings.max_queued_bytes.to_string()])
            .args(["--max-in-flight", &settings.max_in_flight.to_string()])
            .args(["--max-conns", &settings.max_conns.to_string()])
            .args(["--accept-wait-ms", &ms(settings.accept_wait)])
            .args(
                settings
                    .psk
                    .iter()
                    .flat_map(|k| ["--psk".to_string(), hex(k)]),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start the example server");
        let pid = child.id();
        let stdin = child.stdin.take().expect("child stdin");
        let stdout = child.stdout.take().expect("child stdout");
        let stderr = child.stderr.take().expect("child stderr");
        let child = Arc::new(Mutex::new(child));
        let guard = KillOnDrop(child.clone());
        let log = Arc::new(Log::default());
        let replies = Arc::new(Replies::default());
        {
            let (log, replies) = (log.clone(), replies.clone());
            thread::spawn(move || read_stdout(stdout, &log, &replies));
        }
        // Its diagnostics go to this test's output, shown on failure.
        thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                eprintln!("[server {pid}] {line}");
            }
        });
        let addr = replies
            .wait_for(Duration::from_secs(10), |o| o.listening)
            .expect("the example server did not start listening");
        eprintln!("[hostile] example server {pid} on {addr} with {settings:?}");
        let server = ChildServer {
            child,
            pid,
            stdin: Mutex::new(stdin),
            addr,
            settings,
            log,
            replies,
            next_id: AtomicU64::new(1),
        };
        (Arc::new(server), guard)
    }

    fn command(&self, line: &str) {
        let mut stdin = lock(&self.stdin);
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .unwrap_or_else(|e| panic!("command {line:?} to the example server: {e}"));
    }

    fn child_stats(&self) -> ChildStats {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.command(&format!("stats {id}"));
        self.replies
            .wait_for(Duration::from_secs(5), |o| o.stats.remove(&id))
            .unwrap_or_else(|| panic!("the example server did not answer `stats {id}`"))
    }

    /// Waits until the child reported `peer` open, so a command about it
    /// finds it.
    fn await_open(&self, peer: SocketAddr) {
        let open = self.log.wait_for(Duration::from_secs(3), |e| {
            e.opened.contains_key(&peer).then_some(())
        });
        assert!(open.is_some(), "the example server never opened {peer}");
    }

    /// Asserts the child still runs and printed nothing this test does
    /// not understand.
    fn assert_alive(&self) {
        let status = lock(&self.child).try_wait().expect("child status");
        assert!(status.is_none(), "the example server exited: {status:?}");
        let unknown = &lock(&self.replies.output).unknown;
        assert!(unknown.is_empty(), "lines not understood: {unknown:?}");
    }

    /// After a case: the child is alive and answering, every close its
    /// counters know of was reported as an event, and the example's own
    /// error count moved with the library's error closes. Then forgets the
    /// case's events, so the next case starts from an empty log.
    fn between_cases(&self, name: &str, before: &ChildStats) {
        self.assert_alive();
        hostile_cases::settle(self, 0);
        let mut now = self.child_stats();
        let mut reported = 0;
        let all = wait_until(Duration::from_secs(3), || {
            reported = self.log.events().ends;
            now = self.child_stats();
            reported == closes(&now.lib)
        });
        assert!(
            all,
            "{name}: the child reported {reported} closes, its counters {}",
            closes(&now.lib)
        );
        let error_closes = |s: &Stats| {
            s.closed_handshake_timeout
                + s.closed_read_timeout
                + s.closed_write_timeout
                + s.closed_frame_timeout
                + s.closed_protocol_error
                + s.closed_other
        };
        let errors = now.errors - before.errors;
        assert_eq!(
            errors,
            error_closes(&now.lib) - error_closes(&before.lib),
            "{name}: the example's errors= disagrees with the close reasons"
        );
        eprintln!(
            "[hostile] {name}: example server errors +{errors}, requests +{}",
            now.requests - before.requests
        );
        self.log.update(|e| {
            *e = Events {
                ends: e.ends,
                ..Events::default()
            }
        });
    }

    /// Stops the child with SIGTERM and checks it exits cleanly, having
    /// printed its summary. Returns that line.
    fn stop(&self, last: &ChildStats) -> String {
        self.assert_alive();
        extern "C" {
            fn kill(pid: i32, sig: i32) -> i32;
        }
        const SIGTERM: i32 = 15;
        let pid = i32::try_from(self.pid).expect("pid fits");
        // SAFETY: kill(2) takes two integers and touches no memory of
        // ours. The pid is our child's, not yet reaped (we just saw it
        // alive, and only this test waits for it), so it names no other
        // process.
        let rc = unsafe { kill(pid, SIGTERM) };
        assert_eq!(rc, 0, "kill -TERM {pid} failed");
        let mut status = None;
        assert!(
            wait_until(Duration::from_secs(10), || {
                status = lock(&self.child).try_wait().expect("child status");
                status.is_some()
            }),
            "the example server did not exit within 10 s of SIGTERM"
        );
        let status = status.unwrap();
        assert!(status.success(), "the example server exited with {status}");
        let served = self
            .replies
            .wait_for(Duration::from_secs(5), |o| o.served.clone())
            .expect("the example server printed no summary");
        let unknown = &lock(&self.replies.output).unknown;
        assert!(unknown.is_empty(), "lines not understood: {unknown:?}");
        let errors: u64 = served
            .split_whitespace()
            .find_map(|w| w.strip_prefix("errors="))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no errors= in {served:?}"));
        assert_eq!(errors, last.errors, "summary {served:?} after {last:?}");
        served
    }
}

impl Target for ChildServer {
    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn settings(&self) -> &Settings {
        &self.settings
    }

    fn log(&self) -> &Log {
        &self.log
    }

    fn connections(&self) -> usize {
        self.child_stats().handled
    }

    fn stats(&self) -> Stats {
        self.child_stats().lib
    }

    fn rss(&self) -> u64 {
        let path = format!("/proc/{}/status", self.pid);
        let status = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().strip_suffix("kB"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in {path}"));
        kib << 10
    }

    fn start_flood(&self, peer: SocketAddr, size: usize) {
        self.await_open(peer);
        self.command(&format!("flood {peer} {size}"));
    }

    fn start_request(&self, peer: SocketAddr, body: &[u8], timeout: Duration) -> u64 {
        self.await_open(peer);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let ms = timeout.as_millis();
        assert!(ms > 0, "the child takes whole milliseconds");
        self.command(&format!("request {id} {peer} {ms} {}", hex(body)));
        id
    }
}

type Case = (&'static str, fn(&dyn Target));

/// Runs `cases` one after the other against one child started with
/// `settings`, then stops it.
fn run_child(settings: Settings, cases: &[Case]) {
    let (server, _guard) = ChildServer::start(settings);
    let first_rss = server.rss();
    let mut last = server.child_stats();
    for &(name, body) in cases {
        let start = Instant::now();
        let target = server.clone();
        within(30, move || body(&*target));
        server.between_cases(name, &last);
        last = server.child_stats();
        eprintln!(
            "[hostile] {name}: passed against the example server in {:?}",
            start.elapsed()
        );
    }
    let end_rss = server.rss();
    eprintln!(
        "[hostile] example server {}: RSS {} KiB at start, {} KiB after {} cases",
        server.pid,
        first_rss >> 10,
        end_rss >> 10,
        cases.len()
    );
    assert!(
        end_rss.saturating_sub(first_rss) < TOTAL_RSS_BOUND,
        "the example server's RSS grew from {first_rss} to {end_rss} bytes"
    );
    let served = server.stop(&last);
    eprintln!("[hostile] example server {} stopped: {served}", server.pid);
}

#[test]
fn the_example_server_survives_the_hostile_cases() {
    let start = Instant::now();
    run_child(
        Settings::general(),
        &[
            (
                "1 low-order client key",
                hostile_cases::low_order_client_key,
            ),
            ("2 slowloris handshake", hostile_cases::slowloris_handshake),
            (
                "3 oversized length prefix",
                hostile_cases::oversized_length_prefix,
            ),
            (
                "4 undersized length prefix",
                hostile_cases::undersized_length_prefix,
            ),
            ("5 flipped tag bit", hostile_cases::flipped_tag_bit),
            ("6 replayed frame", hostile_cases::replayed_frame),
            ("7 random bytes", hostile_cases::random_bytes),
            (
                "8 half a frame, then close",
                hostile_cases::half_a_frame_then_close,
            ),
            (
                "9 half a frame, then silence",
                hostile_cases::half_a_frame_then_silence,
            ),
            ("10 non-reading peer", hostile_cases::non_reading_peer),
            (
                "12 unasked-for response",
                hostile_cases::unasked_for_response,
            ),
            ("13 late response", hostile_cases::late_response),
            ("16 trickled frame", hostile_cases::trickled_frame),
        ],
    );
    run_child(
        Settings::budget(),
        &[(
            "14 pipelined requests, replies never read",
            hostile_cases::pipelined_requests_never_read,
        )],
    );
    run_child(
        Settings::psk(),
        &[(
            "15 psk peer without the key",
            hostile_cases::psk_peer_without_the_key,
        )],
    );
    // A handshake timeout well over the accept wait, so only the cap
    // closes the idle sockets; then one as short as the accept wait.
    run_child(
        Settings::capped(Duration::from_secs(3)),
        &[(
            "11 idle sockets over the cap",
            hostile_cases::idle_sockets_over_the_cap,
        )],
    );
    run_child(
        Settings::capped(Settings::general().handshake_timeout),
        &[(
            "11b idle sockets, short handshake timeout",
            hostile_cases::idle_sockets_over_the_cap_short_handshake,
        )],
    );
    eprintln!(
        "[hostile] all cases against the example server in {:?}",
        start.elapsed()
    );
}
