//! The peer in the same run: `examples/tools/bench.rs`'s eight client benchmarks
//! over tokio + tokio-rustls, printed in the same Go-style format plus a
//! CPU column.
//!
//! ```text
//! cargo run --release --manifest-path bench-peers/Cargo.toml -- \
//!     [--secs S] [--bench NAME[,NAME...]] [--size N] [--conns N] [--callers N]
//!     [--server-runtime shared|own]
//! ```
//!
//! - TLS 1.3 only, `TLS13_AES_256_GCM_SHA384` only, X25519 only, rustls'
//!   `ring` provider; a self-signed certificate made at start-up that the
//!   client trusts. The negotiated version, suite and group are checked on
//!   every connection and logged once to stderr.
//! - Framing inside the TLS stream: `[u32 len][u32 seq][u8 kind][payload]`
//!   (little-endian; `len` is the payload's length). A message gets no
//!   reply; a request gets an empty response with its `seq`.
//! - Server: one task per connection that decodes every complete frame it
//!   has read, appends the replies to one output buffer and writes and
//!   flushes that batch before reading again.
//! - Client: per connection, the TLS stream split in two; the write half
//!   behind an async mutex (`Send` and `Request` write their frame and
//!   flush), a writer task draining an mpsc queue in batches of up to
//!   64 KiB (`SendNoWait`), and a reader task routing responses by `seq`
//!   to the waiting caller's oneshot.
//! - Callers are tasks on one multi-thread runtime with a worker per
//!   available core. The server shares it, or, with `--server-runtime own`,
//!   runs on a second runtime of as many workers, nearer to a server in a
//!   process of its own (the README says why both). `Send`, `SendNoWait` and
//!   `Request` use one caller and one connection; the `Parallel*` ones
//!   cores × 4 callers (`MONTE_CALLERS`) over 4 connections
//!   (`MONTE_MAX_CONNS`), as examples/tools/bench.rs does with its `Client`.
//!   `AsyncRequest` is `Request` again (every call here is a task), and
//!   `AsyncParallelRequest` 8 caller tasks on one connection, the
//!   counterparts of ours of those names.
//!
//! Each benchmark runs a ~0.3 s warm-up, then `--secs` seconds. B/op and
//! allocs/op count every allocation in the process during the timed
//! interval; ns-cpu/op is the process's user + sys time (`getrusage`) over
//! the same interval, per op. The `SendNoWait` benchmarks stop the clock
//! only once the server has counted every message.

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::process::exit;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use clap::Parser;
use rand::{rngs::SmallRng, RngCore, SeedableRng};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::{
    self,
    crypto::{ring as ring_provider, CryptoProvider},
    pki_types::{CertificateDer, PrivatePkcs8KeyDer, ServerName},
    version::TLS13,
    ClientConfig, CommonState, NamedGroup, ProtocolVersion, RootCertStore, ServerConfig,
};
use tokio_rustls::{TlsAcceptor, TlsConnector};

// ---------------------------------------------------------------------------
// Allocation counting (as in examples/tools/bench.rs)

struct CountingAlloc;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static ALLOC_BYTES: AtomicU64 = AtomicU64::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments
// unchanged, so `System`'s guarantees carry over; the counters are atomics
// and never allocate.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `alloc`'s contract.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(layout.size() as u64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `alloc_zeroed`'s
        // contract.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        ALLOC_BYTES.fetch_add(new_size as u64, Ordering::Relaxed);
        // SAFETY: forwarded as is; the caller upholds `realloc`'s contract
        // (`ptr` came from this allocator, which is `System` underneath).
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded as is; `ptr` came from this allocator.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn alloc_snapshot() -> (u64, u64) {
    (
        ALLOCS.load(Ordering::SeqCst),
        ALLOC_BYTES.load(Ordering::SeqCst),
    )
}

/// The whole process's CPU time so far, user + sys.
fn cpu_time() -> Duration {
    // SAFETY: `getrusage` only writes the `rusage` we pass, which is plain
    // old data that all-zero bytes initialise validly.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_SELF with a valid, exclusive pointer to an `rusage`.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) };
    if rc != 0 {
        return Duration::ZERO;
    }
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

// ---------------------------------------------------------------------------
// Arguments

/// examples/tools/bench.rs's eight client benchmarks over tokio + tokio-rustls
/// (TLS 1.3, AES-256-GCM, X25519, ring), in Go's benchmark format plus a
/// CPU column.
#[derive(Parser)]
#[command(name = "tokio-rustls-bench")]
struct Args {
    /// Seconds each benchmark runs, after a ~0.3 s warm-up.
    #[arg(long, default_value_t = 2.0)]
    secs: f64,
    /// Benchmarks to run (repeatable, or a comma list; case-insensitive).
    /// Default: all eight.
    #[arg(long = "bench", value_delimiter = ',')]
    bench: Vec<String>,
    /// Payload size in bytes (random bytes, made once).
    #[arg(long, default_value_t = 1400)]
    size: usize,
    /// Connections the Parallel* benchmarks share. Default: MONTE_MAX_CONNS
    /// or 4 (monte-rpc's client `max_conns`).
    #[arg(long)]
    conns: Option<usize>,
    /// Caller tasks of the Parallel* benchmarks. Default: MONTE_CALLERS or
    /// available cores × 4.
    #[arg(long)]
    callers: Option<usize>,
    /// Where the server's tasks run: `shared`, on the callers' runtime (a
    /// request and its response may then be handled on one worker thread,
    /// with no thread switch), or `own`, on a second runtime of as many
    /// workers, nearer to a server in a process of its own.
    #[arg(long, value_enum, default_value_t = ServerRuntime::Shared)]
    server_runtime: ServerRuntime,
}

/// See [`Args::server_runtime`].
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum ServerRuntime {
    Shared,
    Own,
}

fn env_usize(name: &str) -> Option<usize> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

// ---------------------------------------------------------------------------
// Framing: [u32 len][u32 seq][u8 kind][payload], little-endian

const HEADER: usize = 9;
const KIND_MESSAGE: u8 = 0;
const KIND_REQUEST: u8 = 1;
const KIND_RESPONSE: u8 = 2;
/// Read and batch buffers, and the most a writer puts in one write.
const BATCH: usize = 64 << 10;

fn put_frame(out: &mut Vec<u8>, seq: u32, kind: u8, body: &[u8]) {
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(kind);
    out.extend_from_slice(body);
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// A read buffer that yields whole frames.
struct Frames {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    max_body: usize,
}

struct Frame {
    seq: u32,
    kind: u8,
}

impl Frames {
    fn new(max_body: usize) -> Frames {
        Frames {
            buf: vec![0; BATCH],
            start: 0,
            end: 0,
            max_body,
        }
    }

    /// The next complete frame in the buffer, if any (its body is skipped:
    /// every receiver here only counts or routes frames).
    fn next_frame(&mut self) -> io::Result<Option<Frame>> {
        let have = &self.buf[self.start..self.end];
        if have.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_le_bytes(have[0..4].try_into().unwrap()) as usize;
        if len > self.max_body {
            return Err(invalid("frame too large"));
        }
        if have.len() < HEADER + len {
            return Ok(None);
        }
        let frame = Frame {
            seq: u32::from_le_bytes(have[4..8].try_into().unwrap()),
            kind: have[8],
        };
        self.start += HEADER + len;
        Ok(Some(frame))
    }

    /// Reads more bytes; false at the end of the stream.
    async fn fill<R: AsyncRead + Unpin>(&mut self, r: &mut R) -> io::Result<bool> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.end == self.buf.len() {
            // A frame larger than the buffer: make room for it.
            let len = self.buf.len() * 2;
            self.buf.resize(len, 0);
        }
        let n = r.read(&mut self.buf[self.end..]).await?;
        self.end += n;
        Ok(n > 0)
    }
}

// ---------------------------------------------------------------------------
// TLS: 1.3 only, AES-256-GCM only, X25519 only, ring

const EXPECTED_SUITE: &str = "TLS13_AES_256_GCM_SHA384";

fn provider() -> Arc<CryptoProvider> {
    let mut p = ring_provider::default_provider();
    p.cipher_suites = vec![ring_provider::cipher_suite::TLS13_AES_256_GCM_SHA384];
    p.kx_groups = vec![ring_provider::kx_group::X25519];
    Arc::new(p)
}

fn tls_configs() -> Result<(TlsAcceptor, TlsConnector), String> {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])
        .map_err(|e| format!("certificate: {e}"))?;
    let cert: CertificateDer<'static> = certified.cert.der().clone();
    let key = PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der());

    let mut server = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| format!("server config: {e}"))?
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key.into())
        .map_err(|e| format!("server config: {e}"))?;
    // No resumption: every connection is long-lived and dialled once.
    server.send_tls13_tickets = 0;

    let mut roots = RootCertStore::empty();
    roots
        .add(cert)
        .map_err(|e| format!("trusting the certificate: {e}"))?;
    let mut client = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&TLS13])
        .map_err(|e| format!("client config: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.resumption = rustls::client::Resumption::disabled();

    Ok((
        TlsAcceptor::from(Arc::new(server)),
        TlsConnector::from(Arc::new(client)),
    ))
}

/// Checks what a handshake negotiated; logs it once per side.
fn check_negotiated(side: &'static str, state: &CommonState, once: &Once) -> io::Result<()> {
    let version = state.protocol_version();
    let suite = state.negotiated_cipher_suite().map(|s| s.suite());
    let group = state.negotiated_key_exchange_group().map(|g| g.name());
    once.call_once(|| {
        eprintln!(
            "# tls ({side}): {:?} {:?} {:?} (rustls, ring provider)",
            version, suite, group
        )
    });
    let suite_ok = suite.is_some_and(|s| format!("{s:?}") == EXPECTED_SUITE);
    if version != Some(ProtocolVersion::TLSv1_3) || !suite_ok || group != Some(NamedGroup::X25519) {
        return Err(invalid(&format!(
            "{side}: unexpected TLS parameters {version:?} {suite:?} {group:?}"
        )));
    }
    Ok(())
}

static SERVER_LOG: Once = Once::new();
static CLIENT_LOG: Once = Once::new();

// ---------------------------------------------------------------------------
// Server

/// Messages the benchmarks sent, and those the server counted.
static SENT: AtomicU64 = AtomicU64::new(0);
static SEEN: AtomicU64 = AtomicU64::new(0);
/// The server wakes `DRAINED` once `SEEN` reaches this (u64::MAX: nobody
/// is waiting).
static DRAIN_TARGET: AtomicU64 = AtomicU64::new(u64::MAX);
static DRAINED: Notify = Notify::const_new();

async fn serve(listener: TcpListener, acceptor: TlsAcceptor, max_body: usize) {
    loop {
        let tcp = match listener.accept().await {
            Ok((tcp, _)) => tcp,
            Err(e) => {
                eprintln!("tokio-rustls-bench: accept: {e}");
                continue;
            }
        };
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let result = async {
                tcp.set_nodelay(true)?;
                let tls = acceptor.accept(tcp).await?;
                check_negotiated("server", tls.get_ref().1, &SERVER_LOG)?;
                serve_conn(tls, max_body).await
            }
            .await;
            if let Err(e) = result {
                if e.kind() != io::ErrorKind::UnexpectedEof {
                    eprintln!("tokio-rustls-bench: server connection: {e}");
                }
            }
        });
    }
}

/// One connection: count messages, answer requests with an empty body;
/// the replies to everything read so far go out in one write and flush.
async fn serve_conn(
    mut tls: tokio_rustls::server::TlsStream<TcpStream>,
    max_body: usize,
) -> io::Result<()> {
    let mut frames = Frames::new(max_body);
    let mut out = Vec::with_capacity(BATCH);
    loop {
        let mut seen = 0u64;
        while let Some(frame) = frames.next_frame()? {
            match frame.kind {
                KIND_MESSAGE => seen += 1,
                KIND_REQUEST => put_frame(&mut out, frame.seq, KIND_RESPONSE, b""),
                _ => return Err(invalid("unexpected frame kind")),
            }
        }
        if seen > 0 {
            let total = SEEN.fetch_add(seen, Ordering::SeqCst) + seen;
            if total >= DRAIN_TARGET.load(Ordering::SeqCst) {
                DRAINED.notify_one();
            }
        }
        if !out.is_empty() {
            tls.write_all(&out).await?;
            tls.flush().await?;
            out.clear();
        }
        if !frames.fill(&mut tls).await? {
            let _ = tls.shutdown().await;
            return Ok(());
        }
    }
}

// ---------------------------------------------------------------------------
// Client

type ClientTls = tokio_rustls::client::TlsStream<TcpStream>;

struct Writer {
    half: WriteHalf<ClientTls>,
    buf: Vec<u8>,
}

impl Writer {
    async fn write_frame(&mut self, seq: u32, kind: u8, body: &[u8]) -> io::Result<()> {
        self.buf.clear();
        put_frame(&mut self.buf, seq, kind, body);
        self.half.write_all(&self.buf).await?;
        self.half.flush().await
    }
}

type Pending = std::sync::Mutex<HashMap<u32, oneshot::Sender<()>>>;

/// One TLS connection shared by callers.
struct Conn {
    writer: Arc<tokio::sync::Mutex<Writer>>,
    pending: Arc<Pending>,
    next_seq: AtomicU32,
    queue: Option<mpsc::Sender<Arc<[u8]>>>,
    reader: Option<JoinHandle<()>>,
    queue_writer: Option<JoinHandle<()>>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, "connection closed")
}

impl Conn {
    async fn connect(
        addr: SocketAddr,
        connector: &TlsConnector,
        max_body: usize,
        frames_per_batch: usize,
    ) -> io::Result<Conn> {
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let name = ServerName::try_from("localhost").expect("a valid name");
        let tls = connector.connect(name, tcp).await?;
        check_negotiated("client", tls.get_ref().1, &CLIENT_LOG)?;
        let (read_half, write_half) = tokio::io::split(tls);
        let writer = Arc::new(tokio::sync::Mutex::new(Writer {
            half: write_half,
            buf: Vec::with_capacity(BATCH),
        }));
        let pending: Arc<Pending> = Arc::default();
        let reader = tokio::spawn(read_responses(read_half, pending.clone(), max_body));
        // Room for about 1 MiB of queued messages, like monte-rpc's
        // default `max_queued_bytes`.
        let (queue, rx) = mpsc::channel(frames_per_batch * 16);
        let queue_writer = tokio::spawn(write_queued(rx, writer.clone(), frames_per_batch));
        Ok(Conn {
            writer,
            pending,
            next_seq: AtomicU32::new(1),
            queue: Some(queue),
            reader: Some(reader),
            queue_writer: Some(queue_writer),
        })
    }

    /// Returns once the frame is written to the socket.
    async fn send(&self, body: &[u8]) -> io::Result<()> {
        self.writer
            .lock()
            .await
            .write_frame(0, KIND_MESSAGE, body)
            .await
    }

    /// Returns once the message is queued for the writer task.
    async fn send_no_wait(&self, body: Arc<[u8]>) -> io::Result<()> {
        let queue = self.queue.as_ref().ok_or_else(closed)?;
        queue.send(body).await.map_err(|_| closed())
    }

    /// Returns once the response to this request has arrived.
    async fn request(&self, body: &[u8]) -> io::Result<()> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(seq, tx);
        let written = self
            .writer
            .lock()
            .await
            .write_frame(seq, KIND_REQUEST, body)
            .await;
        if let Err(e) = written {
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&seq);
            return Err(e);
        }
        rx.await.map_err(|_| closed())
    }

    /// Writes what is queued, closes the write side (TLS close_notify) and
    /// waits for the server to close its side.
    async fn close(mut self) {
        drop(self.queue.take());
        if let Some(task) = self.queue_writer.take() {
            let _ = task.await;
        }
        let _ = self.writer.lock().await.half.shutdown().await;
        if let Some(task) = self.reader.take() {
            if tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .is_err()
            {
                eprintln!("tokio-rustls-bench: the server did not close a connection");
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        for task in [self.reader.take(), self.queue_writer.take()]
            .into_iter()
            .flatten()
        {
            task.abort();
        }
    }
}

/// Routes each response to the caller waiting on its `seq`.
async fn read_responses(mut half: ReadHalf<ClientTls>, pending: Arc<Pending>, max_body: usize) {
    let mut frames = Frames::new(max_body);
    let result: io::Result<()> = async {
        loop {
            {
                // One lock per batch of responses.
                let mut map = None;
                while let Some(frame) = frames.next_frame()? {
                    if frame.kind != KIND_RESPONSE {
                        return Err(invalid("unexpected frame kind"));
                    }
                    let map = map
                        .get_or_insert_with(|| pending.lock().unwrap_or_else(|p| p.into_inner()));
                    if let Some(tx) = map.remove(&frame.seq) {
                        let _ = tx.send(());
                    }
                }
            }
            if !frames.fill(&mut half).await? {
                return Ok(());
            }
        }
    }
    .await;
    if let Err(e) = result {
        if e.kind() != io::ErrorKind::UnexpectedEof {
            eprintln!("tokio-rustls-bench: client connection: {e}");
        }
    }
    // Fail whoever still waits.
    pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
}

/// Drains the queue: up to 64 KiB of frames per write and flush.
async fn write_queued(
    mut rx: mpsc::Receiver<Arc<[u8]>>,
    writer: Arc<tokio::sync::Mutex<Writer>>,
    frames_per_batch: usize,
) {
    let mut batch = Vec::with_capacity(frames_per_batch);
    while rx.recv_many(&mut batch, frames_per_batch).await > 0 {
        let mut w = writer.lock().await;
        let w = &mut *w;
        w.buf.clear();
        for body in batch.drain(..) {
            put_frame(&mut w.buf, 0, KIND_MESSAGE, &body);
        }
        let written = async {
            w.half.write_all(&w.buf).await?;
            w.half.flush().await
        }
        .await;
        if let Err(e) = written {
            eprintln!("tokio-rustls-bench: queued write: {e}");
            return;
        }
    }
}

// ---------------------------------------------------------------------------
// Measurement

const WARMUP: Duration = Duration::from_millis(300);
/// How long to wait for the server to see every message before calling it
/// a hang.
const DRAIN_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Send,
    SendNoWait,
    Request,
}

struct Bench {
    name: &'static str,
    kind: Kind,
    parallel: bool,
    /// Connections and caller tasks, when fixed by the scenario rather
    /// than by `--conns` and `--callers`.
    fixed: Option<(usize, usize)>,
}

/// Requests in flight in `AsyncParallelRequest`, on one connection: as
/// examples/tools/bench.rs's scenario of that name.
const ASYNC_IN_FLIGHT: usize = 8;

const BENCHES: [Bench; 8] = [
    Bench {
        name: "Send",
        kind: Kind::Send,
        parallel: false,
        fixed: None,
    },
    Bench {
        name: "SendNoWait",
        kind: Kind::SendNoWait,
        parallel: false,
        fixed: None,
    },
    Bench {
        name: "Request",
        kind: Kind::Request,
        parallel: false,
        fixed: None,
    },
    Bench {
        name: "ParallelSend",
        kind: Kind::Send,
        parallel: true,
        fixed: None,
    },
    Bench {
        name: "ParallelSendNoWait",
        kind: Kind::SendNoWait,
        parallel: true,
        fixed: None,
    },
    Bench {
        name: "ParallelRequest",
        kind: Kind::Request,
        parallel: true,
        fixed: None,
    },
    // Our async scenarios' counterparts. Every call here is a task on the
    // runtime already, so `AsyncRequest` is `Request` under the name ours
    // uses, and `AsyncParallelRequest` is 8 caller tasks on one connection.
    Bench {
        name: "AsyncRequest",
        kind: Kind::Request,
        parallel: false,
        fixed: None,
    },
    Bench {
        name: "AsyncParallelRequest",
        kind: Kind::Request,
        parallel: true,
        fixed: Some((1, ASYNC_IN_FLIGHT)),
    },
];

struct Measured {
    iterations: u64,
    elapsed: Duration,
    cpu: Duration,
    allocs: u64,
    bytes: u64,
}

/// Waits until the server has counted every message sent.
async fn wait_server_drained() -> Result<(), String> {
    let start = Instant::now();
    loop {
        let sent = SENT.load(Ordering::SeqCst);
        // Set the target before reading SEEN: either this read sees the
        // server's last count or the server sees the target and notifies.
        DRAIN_TARGET.store(sent, Ordering::SeqCst);
        let seen = SEEN.load(Ordering::SeqCst);
        if seen >= sent {
            DRAIN_TARGET.store(u64::MAX, Ordering::SeqCst);
            return Ok(());
        }
        if start.elapsed() > DRAIN_LIMIT {
            return Err(format!(
                "server received {seen} of {sent} messages after {DRAIN_LIMIT:?}: \
                 queued frames never arrived (hang)"
            ));
        }
        let _ = tokio::time::timeout(Duration::from_millis(50), DRAINED.notified()).await;
    }
}

async fn op(kind: Kind, conn: &Conn, payload: &Arc<[u8]>) -> io::Result<()> {
    match kind {
        Kind::Send => {
            conn.send(payload).await?;
            SENT.fetch_add(1, Ordering::Relaxed);
        }
        Kind::SendNoWait => {
            conn.send_no_wait(payload.clone()).await?;
            SENT.fetch_add(1, Ordering::Relaxed);
        }
        Kind::Request => conn.request(payload).await?,
    }
    Ok(())
}

/// Runs `kind` for `dur`: one caller task on `conns[0]` unless `callers` >
/// 0, else that many caller tasks, caller i on connection i % conns. Then
/// (still timed) waits for the server to count every message if `kind`
/// is `SendNoWait`.
async fn measure(
    kind: Kind,
    conns: &[Arc<Conn>],
    callers: usize,
    dur: Duration,
    payload: &Arc<[u8]>,
) -> Result<Measured, String> {
    let finish = || async {
        if kind == Kind::SendNoWait {
            wait_server_drained().await
        } else {
            Ok(())
        }
    };
    let snapshot = || (alloc_snapshot(), cpu_time(), Instant::now());

    if callers == 0 {
        let conn = conns[0].clone();
        let payload = payload.clone();
        let ((a0, b0), cpu0, start) = snapshot();
        let caller = tokio::spawn(async move {
            let mut iterations = 0u64;
            loop {
                op(kind, &conn, &payload).await?;
                iterations += 1;
                if start.elapsed() >= dur {
                    return Ok::<u64, io::Error>(iterations);
                }
            }
        });
        let iterations = caller
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        finish().await?;
        let elapsed = start.elapsed();
        let cpu = cpu_time() - cpu0;
        let (a1, b1) = alloc_snapshot();
        return Ok(Measured {
            iterations,
            elapsed,
            cpu,
            allocs: a1 - a0,
            bytes: b1 - b0,
        });
    }

    let ready = Arc::new(tokio::sync::Barrier::new(callers + 1));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::with_capacity(callers);
    for i in 0..callers {
        let conn = conns[i % conns.len()].clone();
        let payload = payload.clone();
        let ready = ready.clone();
        let mut go = go_rx.clone();
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            ready.wait().await;
            let _ = go.wait_for(|go| *go).await;
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                if let Err(e) = op(kind, &conn, &payload).await {
                    stop.store(true, Ordering::SeqCst);
                    return Err(e);
                }
                n += 1;
            }
            Ok(n)
        }));
    }
    ready.wait().await;
    let ((a0, b0), cpu0, start) = snapshot();
    let _ = go_tx.send(true);
    let deadline = tokio::time::Instant::from_std(start + dur);
    while tokio::time::Instant::now() < deadline && !stop.load(Ordering::Relaxed) {
        tokio::time::sleep_until(
            deadline.min(tokio::time::Instant::now() + Duration::from_millis(10)),
        )
        .await;
    }
    stop.store(true, Ordering::SeqCst);
    let mut iterations = 0u64;
    let mut failure = None;
    for task in tasks {
        match task.await {
            Ok(Ok(n)) => iterations += n,
            Ok(Err(e)) => {
                failure.get_or_insert(e.to_string());
            }
            Err(e) => {
                failure.get_or_insert(e.to_string());
            }
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    finish().await?;
    let elapsed = start.elapsed();
    let cpu = cpu_time() - cpu0;
    let (a1, b1) = alloc_snapshot();
    Ok(Measured {
        iterations,
        elapsed,
        cpu,
        allocs: a1 - a0,
        bytes: b1 - b0,
    })
}

struct Setup {
    addr: SocketAddr,
    connector: TlsConnector,
    secs: f64,
    max_body: usize,
    frames_per_batch: usize,
    conns: usize,
    callers: usize,
}

struct Report {
    iterations: u64,
    ns_per_op: f64,
    mb_per_s: f64,
    bytes_per_op: u64,
    allocs_per_op: u64,
    cpu_ns_per_op: f64,
}

async fn run_bench(bench: &Bench, setup: &Setup, payload: &Arc<[u8]>) -> Result<Report, String> {
    let (n_conns, callers) = match (bench.fixed, bench.parallel) {
        (Some(fixed), _) => fixed,
        (None, true) => (setup.conns, setup.callers),
        (None, false) => (1, 0),
    };
    let mut conns = Vec::with_capacity(n_conns);
    for _ in 0..n_conns {
        let conn = Conn::connect(
            setup.addr,
            &setup.connector,
            setup.max_body,
            setup.frames_per_batch,
        )
        .await
        .map_err(|e| format!("connect: {e}"))?;
        conns.push(Arc::new(conn));
    }
    let dur = Duration::from_secs_f64(setup.secs);

    // Warm-up: fill the buffers, settle the caches.
    measure(bench.kind, &conns, callers, WARMUP, payload).await?;
    wait_server_drained().await?;

    eprintln!("running {} ({}s)...", bench.name, setup.secs);
    let m = measure(bench.kind, &conns, callers, dur, payload).await?;
    for conn in conns {
        if let Ok(conn) = Arc::try_unwrap(conn) {
            conn.close().await;
        }
    }
    // Leave no messages in flight for the next benchmark.
    wait_server_drained().await?;

    let iterations = m.iterations.max(1);
    let secs = m.elapsed.as_secs_f64();
    let mb_per_s = if secs == 0.0 {
        0.0
    } else {
        (payload.len() as f64 * m.iterations as f64) / secs / 1e6
    };
    Ok(Report {
        iterations: m.iterations,
        ns_per_op: m.elapsed.as_nanos() as f64 / iterations as f64,
        mb_per_s,
        bytes_per_op: (m.bytes as f64 / iterations as f64).round() as u64,
        allocs_per_op: (m.allocs as f64 / iterations as f64).round() as u64,
        cpu_ns_per_op: m.cpu.as_nanos() as f64 / iterations as f64,
    })
}

fn random_payload(size: usize) -> Vec<u8> {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0x1234_5678, |d| d.as_nanos() as u64);
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut buf = vec![0u8; size];
    rng.fill_bytes(&mut buf);
    buf
}

fn fail(msg: &str) -> ! {
    eprintln!("tokio-rustls-bench: {msg}");
    exit(1);
}

fn main() {
    let args = Args::parse();
    if !(args.secs.is_finite() && args.secs > 0.0) {
        eprintln!(
            "tokio-rustls-bench: --secs: not a positive number: {}",
            args.secs
        );
        exit(2);
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let callers = args
        .callers
        .or_else(|| env_usize("MONTE_CALLERS"))
        .unwrap_or(cores * 4)
        .max(1);
    let conns = args
        .conns
        .or_else(|| env_usize("MONTE_MAX_CONNS"))
        .unwrap_or(4)
        .max(1);

    let mut selected: Vec<&Bench> = Vec::new();
    for name in &args.bench {
        match BENCHES
            .iter()
            .find(|b| b.name.eq_ignore_ascii_case(name.trim()))
        {
            Some(b) => selected.push(b),
            None => {
                let names: Vec<&str> = BENCHES.iter().map(|b| b.name).collect();
                eprintln!(
                    "tokio-rustls-bench: no benchmark named {name:?}; known: {}",
                    names.join(", ")
                );
                exit(2);
            }
        }
    }
    // In the canonical order, like examples/tools/bench.rs.
    let selected: Vec<&Bench> = BENCHES
        .iter()
        .filter(|b| selected.is_empty() || selected.iter().any(|s| s.name == b.name))
        .collect();

    // Watchdog: a benchmark that hangs must not hang the run.
    let budget = Duration::from_secs_f64(
        selected.len() as f64 * (args.secs + WARMUP.as_secs_f64()) * 2.0 + 60.0,
    );
    std::thread::spawn(move || {
        std::thread::sleep(budget);
        eprintln!("tokio-rustls-bench: still running after {budget:?}: something hangs; aborting");
        exit(3);
    });

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    let server_runtime = (args.server_runtime == ServerRuntime::Own).then(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(cores)
            .thread_name("server")
            .enable_all()
            .build()
            .unwrap_or_else(|e| fail(&format!("server runtime: {e}")))
    });
    let (acceptor, connector) = tls_configs().unwrap_or_else(|e| fail(&e));
    let max_body = (args.size + 64).max(1 << 20);
    let server_handle = server_runtime
        .as_ref()
        .map_or_else(|| runtime.handle().clone(), |rt| rt.handle().clone());
    let listener = server_handle
        .block_on(TcpListener::bind("127.0.0.1:0"))
        .unwrap_or_else(|e| fail(&format!("bind: {e}")));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| fail(&format!("bind: {e}")));
    server_handle.spawn(serve(listener, acceptor, max_body));
    runtime.block_on(async {
        let setup = Setup {
            addr,
            connector,
            secs: args.secs,
            max_body,
            frames_per_batch: (BATCH / (HEADER + args.size)).max(1),
            conns,
            callers,
        };
        eprintln!(
            "# tokio {} worker threads; Parallel*: {callers} caller tasks over {conns} connections; \
             server on {}",
            cores,
            if server_runtime.is_some() {
                "its own runtime of as many"
            } else {
                "the same runtime"
            }
        );
        let payload: Arc<[u8]> = random_payload(args.size).into();
        for bench in selected {
            match run_bench(bench, &setup, &payload).await {
                Ok(r) => {
                    println!(
                        "{:<32}\t{:>10}\t{:>12.1} ns/op\t{:>10.2} MB/s\t{:>8} B/op\t{:>6} allocs/op\t{:>10.1} ns-cpu/op",
                        format!("Benchmark{}-{cores}", bench.name),
                        r.iterations,
                        r.ns_per_op,
                        r.mb_per_s,
                        r.bytes_per_op,
                        r.allocs_per_op,
                        r.cpu_ns_per_op
                    );
                }
                Err(e) => fail(&format!("{}: {e}", bench.name)),
            }
        }
    });
    // The server's tasks are still parked in accept/read: do not wait.
    runtime.shutdown_background();
    if let Some(rt) = server_runtime {
        rt.shutdown_background();
    }
}
