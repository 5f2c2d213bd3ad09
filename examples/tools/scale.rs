//! The scale benchmark: many concurrent connections to one server on
//! loopback, with the server and the clients in separate processes.
//!
//! A tool, not a showcase (those are `examples/server.rs`, `client.rs` and
//! `embed.rs`): it lives in `examples/tools/` and is built and run as an
//! example, `cargo run --release --example scale`.
//!
//! ```text
//! cargo run --release --example scale -- [--conns N] [--dialers K] [--secs S]
//!     [--threads T] [--size B] [--settle-ms M] [--profile secure|monte]
//!     [--read-buffer R] [--raw]
//! cargo run --release --example scale -- --help   # every flag, with its default
//! ```
//!
//! The process starts the server role as a child of itself
//! (`--role server`, on an ephemeral port) and runs the clients itself, so
//! each side has the whole file-descriptor limit, which both raise to the
//! hard limit first. It then measures, and prints on stdout one line each:
//!
//! 1. handshakes per second: K threads dial N connections (connect plus
//!    handshake, no request), until the server has opened all N, with the
//!    CPU time both processes spent per connection; then the profile's
//!    handshake crypto alone (both sides, in memory, on one thread);
//! 2. resident memory per idle connection, in the server process and in the
//!    client process: `VmRSS` before the first dial and once all N are
//!    established and idle (after M ms of settling), divided by N; again
//!    after the request phase, once every connection has served requests;
//! 3. request throughput across all N: T threads, each with its own share
//!    of the connections taken in turn, one request at a time, B-byte
//!    requests and empty replies for S seconds: requests per second and
//!    latency percentiles.
//!
//! Defaults: N 10000, K 64, S 5, T 8, B 1400, M 2000, `secure` (a
//! connection gives its buffers back after 1 s without traffic, so the
//! idle figure is taken after that). The
//! clients are one embedded reactor per core, dialled through
//! `ReactorHandle::dial`. Both sides use the library's default
//! configuration, except the server's connection cap (raised to fit N)
//! and, with `--read-buffer`, the receive buffer size of both sides, the
//! largest part of an idle connection's memory.
//!
//! With `--raw`, only the first phase runs, over plain TCP: the same two
//! processes and K dialers, 32 bytes each way (the handshake's flights),
//! no cryptography, a blocking server thread per core. Its CPU per
//! connection plus the handshake crypto is the least a handshake can cost
//! here, and the cores over that the most handshakes per second any
//! library could reach: it prints that ceiling.
//!
//! Progress goes to stderr. Any error kills the child (a drop guard), the
//! child exits when its stdin closes (the parent gone), and a watchdog
//! ends a run that overstays its budget. `--conns 200 --secs 1` is a quick
//! run, about 4 s.

#[path = "../common/args.rs"]
mod args;
use args::Wire;
use clap::{Parser, ValueEnum};

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{exit, Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use monte_rpc::protocol::HandshakeFactory;
use monte_rpc::{Config, Connection, Context, Handler, NoHandler, Profile, Reactor, Server};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Res<T> = Result<T, BoxError>;

/// Which side of the benchmark this process is.
#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Role {
    /// The benchmark: starts the server role as its child, dials, measures
    Client,
    /// The child: serves, answering `stats` and `quit` on stdin
    Server,
}

/// The scale benchmark: N connections to one server on loopback, the server
/// in a child process. Measures handshakes per second, memory per idle
/// connection on both sides and request throughput over all N.
#[derive(Parser)]
#[command(name = "scale")]
struct Args {
    /// The side this process plays: the parent starts `--role server`
    /// itself
    #[arg(long, value_enum, default_value = "client", hide = true)]
    role: Role,
    /// Connections (N; 0 counts as 1)
    #[arg(long, value_name = "N", default_value_t = 10_000)]
    conns: usize,
    /// Threads dialling at once (K; 0 counts as 1)
    #[arg(long, value_name = "K", default_value_t = 64)]
    dialers: usize,
    /// Seconds of requests over all the connections (S, fractions allowed)
    #[arg(long, value_name = "S", value_parser = args::positive_secs, default_value_t = 5.0)]
    secs: f64,
    /// Threads making requests, one at a time each (T; 0 counts as 1)
    #[arg(long, value_name = "T", default_value_t = 8)]
    threads: usize,
    /// Request size in bytes (B); replies are empty
    #[arg(long, value_name = "B", default_value_t = 1400)]
    size: usize,
    /// Milliseconds the connections idle before memory is measured (M), so
    /// they have given their buffers back
    #[arg(long, value_name = "M", default_value_t = 2000)]
    settle_ms: u64,
    /// The wire profile of both sides
    #[arg(long, value_enum, ignore_case = true, default_value = "secure")]
    profile: Wire,
    /// Both sides' receive buffer size in bytes (R) [default: the
    /// library's]
    #[arg(long, value_name = "R")]
    read_buffer: Option<usize>,
    /// Plain TCP in place of the library, for the handshake phase only:
    /// the same processes and dialers, the handshake's 32 bytes each way,
    /// no cryptography; the floor the kernel and the threads set
    #[arg(long)]
    raw: bool,
}

impl Args {
    /// The profile's name, as `--profile` takes it.
    fn profile_name(&self) -> String {
        self.profile
            .to_possible_value()
            .expect("every profile has a name")
            .get_name()
            .to_string()
    }
}

fn parse_args() -> Args {
    let mut args = Args::parse();
    args.conns = args.conns.max(1);
    args.dialers = args.dialers.max(1);
    args.threads = args.threads.max(1);
    args
}

fn main() {
    let args = parse_args();
    let fds = match raise_fd_limit() {
        Ok(n) => n,
        Err(e) => {
            eprintln!("scale: cannot raise the file-descriptor limit: {e}");
            exit(1);
        }
    };
    // Each connection is one descriptor on each side; the rest is the
    // reactors' epoll and waker descriptors, stdio and the listener.
    let needed = args.conns as u64 + args.dialers as u64 + 64;
    if fds < needed {
        eprintln!(
            "scale: {} connections need about {needed} descriptors per process, \
             but the hard limit is {fds}",
            args.conns
        );
        exit(1);
    }
    let result = match (args.role, args.raw) {
        (Role::Server, false) => run_server(&args),
        (Role::Server, true) => run_raw_server(&args),
        (Role::Client, _) => run_client(&args),
    };
    if let Err(e) = result {
        eprintln!("scale: {e}");
        exit(1);
    }
}

// ---------------------------------------------------------------------------
// The file-descriptor limit

/// Raises the soft `RLIMIT_NOFILE` to the hard limit and returns it.
fn raise_fd_limit() -> std::io::Result<u64> {
    rlimit::increase_nofile_limit(u64::MAX)
}

// ---------------------------------------------------------------------------
// /proc

/// `VmRSS` (KiB) and `Threads` of a process, from `/proc/<pid>/status`.
fn proc_status(pid: u32) -> Res<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> Res<u64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| format!("no {name} in /proc/{pid}/status"))?;
        let n = line[name.len()..]
            .split_whitespace()
            .next()
            .ok_or_else(|| format!("empty {name} in /proc/{pid}/status"))?;
        Ok(n.parse()?)
    };
    Ok((field("VmRSS:")?, field("Threads:")?))
}

/// CPU time (user plus system, all threads) a process has used, in
/// seconds, from `/proc/<pid>/stat`.
fn cpu_secs(pid: u32) -> Res<f64> {
    // USER_HZ, the unit of these fields: 100 on every Linux target this
    // runs on (reading it needs sysconf, so libc).
    const TICKS_PER_SEC: f64 = 100.0;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name may hold spaces; the fields after it do not.
    let rest = &stat[stat.rfind(')').ok_or("malformed /proc/<pid>/stat")? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // Fields 14 and 15 of the man page, counting the state (3) as 0 here.
    let utime: u64 = fields.get(11).ok_or("short /proc/<pid>/stat")?.parse()?;
    let stime: u64 = fields.get(12).ok_or("short /proc/<pid>/stat")?.parse()?;
    Ok((utime + stime) as f64 / TICKS_PER_SEC)
}

// ---------------------------------------------------------------------------
// The server role

fn with_read_buffer(config: Config, args: &Args) -> Config {
    match args.read_buffer {
        Some(r) => config.read_buffer_size(r),
        None => config,
    }
}

/// What the server saw, shared between its handler and the command loop.
#[derive(Default)]
struct Seen {
    /// Handshakes completed (`on_open`).
    opened: AtomicU64,
    requests: AtomicU64,
}

struct ScaleHandler(Arc<Seen>);

impl Handler for ScaleHandler {
    fn on_message(&self, ctx: &mut Context<'_>) {
        if ctx.expects_reply() {
            self.0.requests.fetch_add(1, Ordering::Relaxed);
            let _ = ctx.reply(&[]);
        }
    }

    fn on_open(&self, _conn: &Connection) {
        self.0.opened.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves until `quit` or the end of stdin (the parent gone), answering
/// `stats` with one line of counters. Both go over stdin/stdout so the
/// parent needs no other channel.
fn run_server(args: &Args) -> Res<()> {
    let seen = Arc::new(Seen::default());
    // The cap counts handshakes too, so leave room for the dialers' burst.
    let config = with_read_buffer(
        Config::server()
            .profile(args.profile.into())
            .max_conns(args.conns + args.dialers + 16),
        args,
    );
    let server = Server::bind("127.0.0.1:0", config, ScaleHandler(seen.clone()))?;
    serve_commands(server.local_addr().port(), || {
        let s = server.stats();
        format!(
            "opened {} active {} requests {} refused {} handshakes_failed {} \
             closed_read_timeout {} closed_other {}",
            seen.opened.load(Ordering::Relaxed),
            server.connections(),
            seen.requests.load(Ordering::Relaxed),
            s.connections_refused,
            s.handshakes_failed,
            s.closed_read_timeout,
            s.closed_other + s.closed_protocol_error + s.closed_write_timeout,
        )
    })?;
    // A shutdown that hangs must not outlive the parent for long.
    thread::spawn(|| {
        thread::sleep(Duration::from_secs(60));
        eprintln!("scale server: shutdown took over 60 s; exiting");
        exit(3);
    });
    server.shutdown();
    // The parent may be gone already; its exit is what ended the loop.
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "bye").and_then(|()| out.flush());
    Ok(())
}

/// Says the port on stdout, then answers `stats` with `stats()`'s line
/// until `quit` or the end of stdin (the parent gone).
fn serve_commands(port: u16, stats: impl Fn() -> String) -> Res<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "port {port}")?;
    out.flush()?;
    for line in std::io::stdin().lock().lines() {
        match line?.trim() {
            "stats" => {
                writeln!(out, "{}", stats())?;
                out.flush()?;
            }
            "quit" => break,
            other => return Err(format!("server: unknown command {other:?}").into()),
        }
    }
    Ok(())
}

/// The handshake's first flight each way: an X25519 public key.
const RAW_FLIGHT: usize = 32;

/// The `--raw` server: one thread per core accepts, reads the client's 32
/// bytes, answers 32 and keeps the connection open. Blocking calls, no
/// epoll: the least a plain TCP server can do per connection.
fn run_raw_server(_args: &Args) -> Res<()> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    let opened = Arc::new(AtomicU64::new(0));
    let held = Arc::new(Mutex::new(Vec::new()));
    for i in 0..thread::available_parallelism().map_or(1, |c| c.get()) {
        let listener = listener.try_clone()?;
        let (opened, held) = (opened.clone(), held.clone());
        thread::Builder::new()
            .name(format!("raw-accept-{i}"))
            .spawn(move || {
                for stream in listener.incoming() {
                    let Ok(mut stream) = stream else { continue };
                    let mut flight = [0u8; RAW_FLIGHT];
                    let answered = stream
                        .set_nodelay(true)
                        .and_then(|()| stream.read_exact(&mut flight))
                        .and_then(|()| stream.write_all(&flight));
                    if answered.is_ok() {
                        held.lock().unwrap_or_else(|p| p.into_inner()).push(stream);
                        opened.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })?;
    }
    // The accept threads end with the process.
    serve_commands(port, || {
        let active = held.lock().unwrap_or_else(|p| p.into_inner()).len();
        format!(
            "opened {} active {active} requests 0 refused 0 handshakes_failed 0 \
             closed_read_timeout 0 closed_other 0",
            opened.load(Ordering::Relaxed)
        )
    })
}

// ---------------------------------------------------------------------------
// The client role's handle on the server process

/// The server child. Dropping it kills the child, so an error anywhere in
/// the client never leaves a server behind.
struct ServerProcess {
    child: Arc<Mutex<Child>>,
    pid: u32,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

/// A `stats` answer from the server.
struct ServerStats {
    opened: u64,
    active: u64,
    requests: u64,
    line: String,
}

impl ServerProcess {
    fn spawn(args: &Args) -> Res<(ServerProcess, u16)> {
        let exe = std::env::current_exe()?;
        let mut command = Command::new(exe);
        if let Some(r) = args.read_buffer {
            command.args(["--read-buffer", &r.to_string()]);
        }
        if args.raw {
            command.arg("--raw");
        }
        let mut child = command
            .args(["--role", "server"])
            .args(["--conns", &args.conns.to_string()])
            .args(["--dialers", &args.dialers.to_string()])
            .args(["--profile", &args.profile_name()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().expect("piped stdin");
        let stdout = BufReader::new(child.stdout.take().expect("piped stdout"));
        let mut server = ServerProcess {
            pid: child.id(),
            child: Arc::new(Mutex::new(child)),
            stdin,
            stdout,
        };
        let line = server.read_line()?;
        let port = line
            .strip_prefix("port ")
            .and_then(|p| p.trim().parse().ok())
            .ok_or_else(|| format!("server said {line:?}, expected a port"))?;
        Ok((server, port))
    }

    fn read_line(&mut self) -> Res<String> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            return Err("the server process exited".into());
        }
        Ok(line.trim_end().to_string())
    }

    /// Says whether the child has exited, for an error talking to it.
    fn gone(&self, e: std::io::Error) -> BoxError {
        match self.child.lock().map(|mut c| c.try_wait()) {
            Ok(Ok(Some(status))) => format!("the server process exited ({status})").into(),
            _ => format!("talking to the server process: {e}").into(),
        }
    }

    fn stats(&mut self) -> Res<ServerStats> {
        writeln!(self.stdin, "stats")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| self.gone(e))?;
        let line = self.read_line()?;
        let words: Vec<&str> = line.split_whitespace().collect();
        let get = |key: &str| -> Res<u64> {
            let i = words
                .iter()
                .position(|w| *w == key)
                .ok_or_else(|| format!("no {key} in server stats {line:?}"))?;
            Ok(words.get(i + 1).ok_or("truncated server stats")?.parse()?)
        };
        Ok(ServerStats {
            opened: get("opened")?,
            active: get("active")?,
            requests: get("requests")?,
            line: line.clone(),
        })
    }

    /// Asks the server to shut down gracefully and waits up to `limit`.
    fn quit(&mut self, limit: Duration) -> Res<()> {
        writeln!(self.stdin, "quit")
            .and_then(|()| self.stdin.flush())
            .map_err(|e| self.gone(e))?;
        let until = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.lock().expect("child lock").try_wait()? {
                return if status.success() {
                    Ok(())
                } else {
                    Err(format!("the server process ended with {status}").into())
                };
            }
            if Instant::now() >= until {
                return Err(format!("the server took over {limit:?} to shut down").into());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        if let Ok(mut child) = self.child.lock() {
            if let Ok(None) = child.try_wait() {
                let _ = child.kill();
            }
            let _ = child.wait();
        }
    }
}

// ---------------------------------------------------------------------------
// The client role

fn histogram() -> Histogram<u64> {
    // Nanoseconds, up to a minute.
    Histogram::new_with_bounds(100, 60_000_000_000, 3).expect("histogram bounds")
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

fn us(ns: u64) -> f64 {
    ns as f64 / 1e3
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Per-connection growth in KiB, from two `VmRSS` readings.
fn per_conn(before: u64, after: u64, n: usize) -> f64 {
    (after as f64 - before as f64) / n as f64
}

fn run_client(args: &Args) -> Res<()> {
    let started = Instant::now();
    let n = args.conns;
    let cores = thread::available_parallelism().map_or(1, |c| c.get());
    // The dialling side's descriptor table, grown once now rather than
    // eight times during the dials (the server grows its own for its cap).
    monte_rpc::reserve_descriptors(n + args.dialers + 64)?;
    let (mut server, port) = ServerProcess::spawn(args)?;
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], port).into();
    eprintln!(
        "scale: server pid {} on {addr}; {n} connections, {} dialers, profile {}",
        server.pid,
        args.dialers,
        args.profile_name()
    );

    // Generous, so that a loaded machine does not trip it, but a hang ends.
    let budget = Duration::from_secs(120)
        + Duration::from_secs_f64(args.secs)
        + Duration::from_millis(n as u64 * 10);
    let finished = Arc::new(AtomicBool::new(false));
    {
        let child = server.child.clone();
        let finished = finished.clone();
        thread::spawn(move || {
            let until = Instant::now() + budget;
            while Instant::now() < until {
                if finished.load(Ordering::Relaxed) {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
            eprintln!("scale: the run took over {budget:?}; killing the server and exiting");
            if let Ok(mut c) = child.lock() {
                let _ = c.kill();
                let _ = c.wait();
            }
            exit(3);
        });
    }

    if args.raw {
        let result = raw_phase(args, &mut server, addr);
        let quit = server.quit(Duration::from_secs(60));
        finished.store(true, Ordering::Relaxed);
        result?;
        return quit;
    }

    // The client side: one embedded reactor per core, on threads of our
    // own. A `Client` pool dials one connection at a time and only while
    // its connections are busy, so it cannot hold N idle connections with
    // K dials at once; `ReactorHandle::dial` can, on the dialer's thread.
    let client_config = with_read_buffer(Config::default().profile(args.profile.into()), args);
    let mut handles = Vec::new();
    let mut reactor_threads = Vec::new();
    for i in 0..cores {
        let reactor = Reactor::new(client_config.clone())?;
        handles.push(reactor.handle());
        reactor_threads.push(
            thread::Builder::new()
                .name(format!("scale-reactor-{i}"))
                .spawn(move || reactor.run())?,
        );
    }
    let result = client_phases(args, &mut server, addr, &handles);
    // The reactors close their connections gracefully when stopped, whether
    // the phases succeeded or not.
    let stop_at = Instant::now();
    for h in &handles {
        h.stop();
    }
    for t in reactor_threads {
        match t.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("scale: a client reactor failed: {e}"),
            Err(_) => eprintln!("scale: a client reactor panicked"),
        }
    }
    let client_stop = stop_at.elapsed();
    let quit = server.quit(Duration::from_secs(60));
    let server_stop = stop_at.elapsed();
    finished.store(true, Ordering::Relaxed);
    result?;
    quit?;
    println!(
        "shutdown: clients closed {n} connections in {:.2} s, server exited after {:.2} s; \
         whole run {:.1} s",
        client_stop.as_secs_f64(),
        server_stop.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn client_phases(
    args: &Args,
    server: &mut ServerProcess,
    addr: std::net::SocketAddr,
    handles: &[monte_rpc::ReactorHandle],
) -> Res<()> {
    let n = args.conns;
    let me = std::process::id();
    let settle = Duration::from_millis(args.settle_ms);
    let cores = thread::available_parallelism().map_or(1, |c| c.get());

    // Baselines: both processes up, reactors running, no connection yet.
    thread::sleep(settle.min(Duration::from_millis(300)));
    let (server_rss0, server_threads) = proc_status(server.pid)?;
    let (client_rss0, client_threads) = proc_status(me)?;
    let read_buffer = match args.read_buffer {
        Some(r) => format!("read buffer {r} B"),
        None => "default config".into(),
    };
    println!(
        "scale: {n} connections to one server on loopback, profile {}, {read_buffer}, \
         {cores} cores; server process {server_threads} threads, client process \
         {client_threads} threads before dialling",
        args.profile_name()
    );

    // Phase 1: dial.
    let handler: Arc<dyn Handler> = Arc::new(NoHandler);
    let dial = |i: usize| {
        handles[i % handles.len()]
            .dial(addr, handler.clone())
            .map_err(|e| e.to_string())
    };
    let cpu0 = (cpu_secs(server.pid)?, cpu_secs(me)?);
    let dialled = dial_all(args, server, &dial)?;
    let cpu1 = (cpu_secs(server.pid)?, cpu_secs(me)?);
    report_handshakes(
        "handshakes",
        "connect + handshake",
        args,
        &dialled,
        cpu0,
        cpu1,
    )?;
    let conns = dialled.conns;

    // Phase 2: memory while idle.
    eprintln!("scale: settling {} ms", args.settle_ms);
    thread::sleep(settle);
    let stats = server.stats()?;
    if stats.active != n as u64 {
        return Err(format!(
            "the server holds {} connections, expected {n} ({})",
            stats.active, stats.line
        )
        .into());
    }
    let (server_rss1, server_threads) = proc_status(server.pid)?;
    let (client_rss1, client_threads) = proc_status(me)?;
    println!(
        "memory per idle connection: server {:.1} KiB (VmRSS {:.1} -> {:.1} MiB), \
         client {:.1} KiB (VmRSS {:.1} -> {:.1} MiB); threads: server {server_threads}, \
         client {client_threads}",
        per_conn(server_rss0, server_rss1, n),
        mib(server_rss0),
        mib(server_rss1),
        per_conn(client_rss0, client_rss1, n),
        mib(client_rss0),
        mib(client_rss1),
    );

    // Phase 3: requests across all connections.
    let requests_before = stats.requests;
    let cpu0 = (cpu_secs(server.pid)?, cpu_secs(me)?);
    let (done, errors, hist, elapsed, threads_busy) = request_phase(args, &conns, me)?;
    let cpu1 = (cpu_secs(server.pid)?, cpu_secs(me)?);
    println!(
        "requests: {:.0}/s over {n} connections ({} threads, one request at a time each, \
         {}-byte requests, empty replies, {:.1} s); latency p50 {:.1} us, p99 {:.1} us, \
         p999 {:.1} us, max {:.1} us; {errors} errors; cores busy: server {:.2}, \
         client {:.2}; client threads while busy: {threads_busy}",
        done as f64 / elapsed.as_secs_f64(),
        args.threads,
        args.size,
        elapsed.as_secs_f64(),
        us(hist.value_at_quantile(0.5)),
        us(hist.value_at_quantile(0.99)),
        us(hist.value_at_quantile(0.999)),
        us(hist.max()),
        (cpu1.0 - cpu0.0) / elapsed.as_secs_f64(),
        (cpu1.1 - cpu0.1) / elapsed.as_secs_f64(),
    );

    if errors > 0 {
        return Err(format!("{errors} requests failed").into());
    }

    // Memory again, now that every connection has carried traffic.
    thread::sleep(settle);
    let stats = server.stats()?;
    let served = stats.requests - requests_before;
    if served != done {
        eprintln!("scale: the server answered {served} requests, the clients counted {done}");
    }
    let (server_rss2, _) = proc_status(server.pid)?;
    let (client_rss2, _) = proc_status(me)?;
    println!(
        "memory per connection after the requests: server {:.1} KiB (VmRSS {:.1} MiB), \
         client {:.1} KiB (VmRSS {:.1} MiB)",
        per_conn(server_rss0, server_rss2, n),
        mib(server_rss2),
        per_conn(client_rss0, client_rss2, n),
        mib(client_rss2),
    );
    if stats.active != n as u64 {
        return Err(format!(
            "the server holds {} connections after the requests, expected {n} ({})",
            stats.active, stats.line
        )
        .into());
    }
    eprintln!("scale: server {}", stats.line);
    Ok(())
}

/// What [`dial_all`] made, and how long it took.
struct Dialled<T> {
    conns: Vec<T>,
    /// Each dial's time, in nanoseconds.
    hist: Histogram<u64>,
    /// Dials that failed (and were retried).
    failures: u64,
    /// Until the last dial returned.
    dialled_in: Duration,
    /// Until the server had opened every connection.
    opened_in: Duration,
}

/// Prints the dial phase's line: the rate, the dials' times, and the CPU
/// time both processes spent (`cpu0` and `cpu1`: server and client CPU
/// seconds before and after), per second and per connection.
fn report_handshakes<T>(
    label: &str,
    what: &str,
    args: &Args,
    d: &Dialled<T>,
    cpu0: (f64, f64),
    cpu1: (f64, f64),
) -> Res<()> {
    let n = args.conns;
    let secs = d.opened_in.as_secs_f64();
    let (server_cpu, client_cpu) = (cpu1.0 - cpu0.0, cpu1.1 - cpu0.1);
    println!(
        "{label}: {:.0}/s ({n} in {secs:.3} s until the server had opened all; the dials \
         returned after {:.3} s; {what}, no request; {} dialing at once; \
         dial p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; {} failed dials; \
         cores busy: server {:.2}, client {:.2}; CPU per connection {:.0} us)",
        n as f64 / secs,
        d.dialled_in.as_secs_f64(),
        args.dialers,
        ms(d.hist.value_at_quantile(0.5)),
        ms(d.hist.value_at_quantile(0.99)),
        ms(d.hist.max()),
        d.failures,
        server_cpu / secs,
        client_cpu / secs,
        (server_cpu + client_cpu) * 1e6 / n as f64,
    );
    let crypto = handshake_crypto(args.profile.into())?;
    println!(
        "# handshake crypto: {crypto:.1} us per connection, both sides' (key pairs, \
         agreements, key derivation) run in memory on one thread"
    );
    if args.raw {
        // The library cannot spend less than plain TCP plus its crypto per
        // connection, nor use more than every core.
        let cores = thread::available_parallelism().map_or(1, |c| c.get());
        let floor = (server_cpu + client_cpu) * 1e6 / n as f64 + crypto;
        println!(
            "# handshake ceiling: {cores} cores / ({:.0} us raw + {crypto:.0} us crypto) \
             = {:.0}/s",
            floor - crypto,
            cores as f64 * 1e6 / floor
        );
    }
    Ok(())
}

/// The CPU time, in microseconds, of one connection's handshake crypto,
/// both sides', run in memory through the profile's own handshakes.
fn handshake_crypto(profile: Profile) -> Res<f64> {
    let once = || -> Res<()> {
        let (mut client, mut server) = (profile.client()?, profile.server()?);
        let (mut to_server, mut to_client) = (Vec::new(), Vec::new());
        client.write_output(&mut to_server);
        let (mut client_done, mut server_done) = (false, false);
        for _ in 0..8 {
            let used = server.read_input(&to_server)?;
            to_server.drain(..used);
            server.write_output(&mut to_client);
            server_done |= server.take_session().is_some();
            let used = client.read_input(&to_client)?;
            to_client.drain(..used);
            client.write_output(&mut to_server);
            client_done |= client.take_session().is_some();
            if client_done && server_done {
                return Ok(());
            }
        }
        Err("the in-memory handshake did not finish".into())
    };
    for _ in 0..100 {
        once()?;
    }
    const ROUNDS: u32 = 2000;
    let started = Instant::now();
    for _ in 0..ROUNDS {
        once()?;
    }
    Ok(started.elapsed().as_secs_f64() * 1e6 / f64::from(ROUNDS))
}

/// `--raw`: the dial phase over plain TCP (see [`run_raw_server`]).
fn raw_phase(args: &Args, server: &mut ServerProcess, addr: std::net::SocketAddr) -> Res<()> {
    let me = std::process::id();
    println!(
        "scale --raw: {} plain TCP connections to one server on loopback, {RAW_FLIGHT} bytes \
         each way, no cryptography, {} cores",
        args.conns,
        thread::available_parallelism().map_or(1, |c| c.get())
    );
    let dial = |_: usize| -> Result<std::net::TcpStream, String> {
        let exchange = || -> std::io::Result<std::net::TcpStream> {
            let mut stream = std::net::TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            let mut flight = [0x5a_u8; RAW_FLIGHT];
            stream.write_all(&flight)?;
            stream.read_exact(&mut flight)?;
            Ok(stream)
        };
        exchange().map_err(|e| e.to_string())
    };
    let cpu0 = (cpu_secs(server.pid)?, cpu_secs(me)?);
    let dialled = dial_all(args, server, &dial)?;
    let cpu1 = (cpu_secs(server.pid)?, cpu_secs(me)?);
    report_handshakes(
        "raw handshakes",
        "connect + 32 bytes each way",
        args,
        &dialled,
        cpu0,
        cpu1,
    )
}

/// Dials `args.conns` connections from `args.dialers` threads with
/// `dial(i)` for the `i`th, and waits until the server has opened them all.
fn dial_all<T: Send>(
    args: &Args,
    server: &mut ServerProcess,
    dial: &(dyn Fn(usize) -> Result<T, String> + Sync),
) -> Res<Dialled<T>> {
    let n = args.conns;
    let claimed = AtomicUsize::new(0);
    let established = AtomicUsize::new(0);
    let failures = AtomicU64::new(0);
    let abort = AtomicBool::new(false);
    let dials_done = AtomicBool::new(false);
    // A few failures (a reset under a burst) are retried; many mean the
    // run is broken.
    let max_failures = (n as u64 / 100).max(10);
    // The clock starts once every dialer is up, so that spawning them is
    // not counted against the handshakes (it shows at small N).
    let start_line = std::sync::Barrier::new(args.dialers + 1);
    let mut conns = Vec::with_capacity(n);
    let mut hist = histogram();
    let mut first_error = None;

    let started = thread::scope(|s| {
        let progress = s.spawn(|| {
            let mut last = (0, Instant::now());
            while !dials_done.load(Ordering::Relaxed) {
                thread::sleep(Duration::from_millis(50));
                if last.1.elapsed() >= Duration::from_secs(1) {
                    let now = established.load(Ordering::Relaxed);
                    let rate = (now - last.0) as f64 / last.1.elapsed().as_secs_f64();
                    eprintln!("scale: dialled {now}/{n} ({rate:.0}/s)");
                    last = (now, Instant::now());
                }
            }
        });
        let dialers: Vec<_> = (0..args.dialers)
            .map(|_| {
                s.spawn(|| {
                    let mut mine = Vec::new();
                    let mut hist = histogram();
                    let mut error = None;
                    start_line.wait();
                    while !abort.load(Ordering::Relaxed) {
                        let i = claimed.fetch_add(1, Ordering::Relaxed);
                        if i >= n {
                            break;
                        }
                        loop {
                            let t = Instant::now();
                            match dial(i) {
                                Ok(conn) => {
                                    hist.saturating_record(t.elapsed().as_nanos() as u64);
                                    mine.push(conn);
                                    established.fetch_add(1, Ordering::Relaxed);
                                    break;
                                }
                                Err(e) => {
                                    let f = failures.fetch_add(1, Ordering::Relaxed) + 1;
                                    if f <= 5 {
                                        eprintln!("scale: dial failed: {e}");
                                    }
                                    if f > max_failures {
                                        abort.store(true, Ordering::Relaxed);
                                        error = Some(e);
                                        break;
                                    }
                                }
                            }
                        }
                    }
                    (mine, hist, error)
                })
            })
            .collect();
        start_line.wait();
        let started = Instant::now();
        for d in dialers {
            let (mine, h, error) = d.join().expect("dialer thread");
            conns.extend(mine);
            hist.add(h).expect("same histogram bounds");
            first_error = first_error.take().or(error);
        }
        dials_done.store(true, Ordering::Relaxed);
        progress.join().expect("progress thread");
        started
    });
    let dialled_in = started.elapsed();
    if let Some(e) = first_error {
        return Err(format!(
            "{} dials failed (more than {max_failures}); last: {e}",
            failures.load(Ordering::Relaxed)
        )
        .into());
    }

    // The dial returns when the client side of the handshake is done; the
    // server finishes its side a moment later, and only then is the
    // connection open at both ends.
    let wait_until = Instant::now() + Duration::from_secs(30);
    let opened_in = loop {
        let stats = server.stats()?;
        if stats.opened >= n as u64 {
            break started.elapsed();
        }
        if Instant::now() >= wait_until {
            return Err(format!(
                "the server opened {} of {n} connections within 30 s of the last dial ({})",
                stats.opened, stats.line
            )
            .into());
        }
        thread::sleep(Duration::from_millis(1));
    };
    Ok(Dialled {
        conns,
        hist,
        failures: failures.load(Ordering::Relaxed),
        dialled_in,
        opened_in,
    })
}

type Requested = (u64, u64, Histogram<u64>, Duration, u64);

/// `args.threads` threads, each cycling through every `threads`-th
/// connection, one request at a time, for `args.secs`.
fn request_phase(args: &Args, conns: &[Connection], me: u32) -> Res<Requested> {
    let payload = vec![0x5a_u8; args.size];
    let done = AtomicU64::new(0);
    let errors = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let secs = Duration::from_secs_f64(args.secs);
    let threads = args.threads.min(conns.len());
    eprintln!(
        "scale: {threads} threads making requests over {} connections for {:.1} s",
        conns.len(),
        args.secs
    );
    let started = Instant::now();
    let mut hist = histogram();
    let mut threads_busy = 0;
    thread::scope(|s| -> Res<()> {
        let workers: Vec<_> = (0..threads)
            .map(|t| {
                let (payload, done, errors, stop) = (&payload, &done, &errors, &stop);
                s.spawn(move || {
                    let mut hist = histogram();
                    let mut response = Vec::new();
                    let mine: Vec<&Connection> = conns.iter().skip(t).step_by(threads).collect();
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let conn = mine[i % mine.len()];
                        i += 1;
                        let at = Instant::now();
                        match conn.request(payload, &mut response) {
                            Ok(()) => {
                                hist.saturating_record(at.elapsed().as_nanos() as u64);
                                done.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => {
                                if errors.fetch_add(1, Ordering::Relaxed) < 5 {
                                    eprintln!("scale: request failed: {e}");
                                }
                                if errors.load(Ordering::Relaxed) > 1000 {
                                    stop.store(true, Ordering::Relaxed);
                                }
                            }
                        }
                    }
                    hist
                })
            })
            .collect();
        let mut last = (0, Instant::now());
        while started.elapsed() < secs && !stop.load(Ordering::Relaxed) {
            thread::sleep(Duration::from_millis(50).min(secs.saturating_sub(started.elapsed())));
            if last.1.elapsed() >= Duration::from_secs(1) {
                let now = done.load(Ordering::Relaxed);
                let rate = (now - last.0) as f64 / last.1.elapsed().as_secs_f64();
                eprintln!("scale: {now} requests ({rate:.0}/s)");
                last = (now, Instant::now());
                if threads_busy == 0 {
                    threads_busy = proc_status(me).map_or(0, |s| s.1);
                }
            }
        }
        if threads_busy == 0 {
            threads_busy = proc_status(me).map_or(0, |s| s.1);
        }
        stop.store(true, Ordering::Relaxed);
        for w in workers {
            hist.add(w.join().expect("request thread"))
                .expect("same histogram bounds");
        }
        Ok(())
    })?;
    let elapsed = started.elapsed();
    Ok((
        done.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        hist,
        elapsed,
        threads_busy,
    ))
}
