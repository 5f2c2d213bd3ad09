//! Helpers shared by the integration tests: bounded waits, so that no test
//! can hang, and small measurements.
#![allow(dead_code)] // each test binary uses its own subset

use std::panic::{catch_unwind, resume_unwind, AssertUnwindSafe};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// Runs `body` on its own thread and fails the test if it does not finish
/// within `secs` seconds (a hung body leaks its thread, the test still ends).
pub fn within<T: Send + 'static>(secs: u64, body: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    thread::Builder::new()
        .name("test-body".into())
        .spawn(move || {
            let _ = tx.send(catch_unwind(AssertUnwindSafe(body)));
        })
        .expect("spawn test body");
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(v)) => v,
        Ok(Err(panic)) => resume_unwind(panic),
        Err(_) => panic!("test body did not finish within {secs} s"),
    }
}

/// Runs `run` up to `attempts` times, until one returns less than `limit`;
/// returns what each run returned. For properties a pause of the machine
/// can spoil in one run (a pool that grew while the cores were taken), and
/// the code under test must show in one run of a few.
pub fn runs_until_below(
    limit: usize,
    attempts: usize,
    mut run: impl FnMut() -> usize,
) -> Vec<usize> {
    let mut runs = Vec::new();
    for _ in 0..attempts {
        runs.push(run());
        if runs.last() < Some(&limit) {
            break;
        }
    }
    runs
}

/// Polls `cond` every 2 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(2));
    }
}

/// `body` reversed byte for byte: what the test servers answer.
pub fn reversed(body: &[u8]) -> Vec<u8> {
    body.iter().rev().copied().collect()
}

/// The client settings most tests use: two reactors, 5 s request and write
/// timeouts, so a broken test fails rather than hangs.
pub fn client_config() -> monte_rpc::Config {
    monte_rpc::Config::default()
        .workers(2)
        .request_timeout(Some(Duration::from_secs(5)))
        .write_timeout(Some(Duration::from_secs(5)))
}

/// The server counterpart of [`client_config`].
pub fn server_config() -> monte_rpc::Config {
    monte_rpc::Config::server()
        .workers(2)
        .request_timeout(Some(Duration::from_secs(5)))
        .write_timeout(Some(Duration::from_secs(5)))
}

/// Runs the server side of the specification's handshake (`secure`) by
/// hand on an accepted socket, for tests whose server is a raw peer that
/// then misbehaves in its own way. Returns the session's keys, for a raw
/// peer that goes on to seal frames of its own.
pub fn serve_handshake(stream: &mut std::net::TcpStream) -> monte_rpc::protocol::Session {
    use monte_rpc::protocol::{Handshake, Profile, ServerHandshake};
    use std::io::{Read, Write};
    let mut hs = ServerHandshake::new(Profile::Secure).unwrap();
    let mut key = [0u8; 32];
    stream.read_exact(&mut key).unwrap();
    assert_eq!(hs.read_input(&key).unwrap(), 32);
    let mut out = Vec::new();
    hs.write_output(&mut out);
    stream.write_all(&out).unwrap();
    hs.take_session().unwrap()
}

/// A raw server on loopback for one connection: accepts it, runs the
/// server side of the handshake ([`serve_handshake`]), then hands the
/// socket to `then`, on a thread of its own. Returns the address to dial
/// and that thread.
pub fn raw_server(
    then: impl FnOnce(std::net::TcpStream) + Send + 'static,
) -> (std::net::SocketAddr, thread::JoinHandle<()>) {
    raw_server_with_session(|stream, _| then(stream))
}

/// [`raw_server`] whose `then` also gets the session's keys.
pub fn raw_server_with_session(
    then: impl FnOnce(std::net::TcpStream, monte_rpc::protocol::Session) + Send + 'static,
) -> (std::net::SocketAddr, thread::JoinHandle<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let server = thread::spawn(move || {
        let (mut stream, _) = listener.accept().unwrap();
        let session = serve_handshake(&mut stream);
        then(stream, session);
    });
    (addr, server)
}

/// A raw client on loopback: connects to `addr` and runs the client side
/// of the specification's handshake (`secure`) by hand, for tests whose
/// client then misbehaves in its own way. Returns the socket (with 5 s
/// read and write timeouts) and the session's keys.
pub fn raw_client(
    addr: std::net::SocketAddr,
) -> (std::net::TcpStream, monte_rpc::protocol::Session) {
    use monte_rpc::protocol::{ClientHandshake, Handshake, Profile};
    use std::io::{Read, Write};
    let mut stream = connect_with_timeouts(addr);
    let mut hs = ClientHandshake::new(Profile::Secure).unwrap();
    let (mut out, mut input, mut chunk) = (Vec::new(), Vec::new(), [0u8; 256]);
    loop {
        out.clear();
        hs.write_output(&mut out);
        stream.write_all(&out).unwrap();
        if let Some(session) = hs.take_session() {
            return (stream, session);
        }
        let n = stream.read(&mut chunk).unwrap();
        assert!(n > 0, "server closed during the handshake");
        input.extend_from_slice(&chunk[..n]);
        let used = hs.read_input(&input).unwrap();
        input.drain(..used);
    }
}

/// Opens the whole frames at the start of `input` with `opener` and
/// returns their messages in order (each record of a bundled frame, see
/// PROTOCOL.md), and how many bytes the frames took; a partial frame at
/// the end stays.
#[allow(dead_code)]
pub fn open_messages(
    opener: &mut monte_rpc::protocol::Opener,
    input: &mut [u8],
    max_message: usize,
) -> (Vec<(u32, Vec<u8>)>, usize) {
    use monte_rpc::protocol::wire::{check_records, records, Decoded, FrameDecoder};
    let decoder = FrameDecoder::for_direction(max_message, opener.bundles());
    let (mut messages, mut at) = (Vec::new(), 0);
    while let Ok(Decoded::Frame(n)) = decoder.decode(&input[at..]) {
        let plain = opener.open_frame_in_place(&mut input[at..at + n]).unwrap();
        if opener.bundles() {
            check_records(plain, max_message).unwrap();
            messages.extend(records(plain).map(|(seq, body)| (seq, body.to_vec())));
        } else {
            let seq = u32::from_be_bytes(plain[..4].try_into().unwrap());
            messages.push((seq, plain[4..].to_vec()));
        }
        at += n;
    }
    (messages, at)
}

/// A blocking TCP connection to `addr` with 5 s read and write timeouts,
/// for raw peers.
pub fn connect_with_timeouts(addr: std::net::SocketAddr) -> std::net::TcpStream {
    let stream = std::net::TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
        .set_write_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    stream
}

/// A gate a server's handler holds a request at: [`Hold::hold`] (in the
/// handler) waits until [`Hold::release`] or 10 s, and [`Hold::held`]
/// (in the test) waits up to 5 s for a handler to be holding.
pub struct Hold {
    holding: std::sync::atomic::AtomicBool,
    gate: std::sync::Mutex<mpsc::Receiver<()>>,
    open: std::sync::Mutex<mpsc::Sender<()>>,
}

impl Hold {
    pub fn new() -> std::sync::Arc<Hold> {
        let (open, gate) = mpsc::channel();
        std::sync::Arc::new(Hold {
            holding: std::sync::atomic::AtomicBool::new(false),
            gate: std::sync::Mutex::new(gate),
            open: std::sync::Mutex::new(open),
        })
    }

    pub fn hold(&self) {
        self.holding
            .store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self
            .gate
            .lock()
            .unwrap()
            .recv_timeout(Duration::from_secs(10));
    }

    pub fn held(&self) -> bool {
        wait_until(Duration::from_secs(5), || {
            self.holding.load(std::sync::atomic::Ordering::SeqCst)
        })
    }

    pub fn release(&self) {
        self.open.lock().unwrap().send(()).unwrap();
    }
}

/// Confines the calling thread, and so every thread it starts from now on,
/// to the first core it may run on: a one-core machine for what it starts,
/// though the library still judges its waiting by the process's cores.
/// Linux only; elsewhere it leaves the thread as it is.
pub fn confine_to_one_core() {
    // The library reads the cores it may use once per process, from the
    // affinity of the thread that first asks: asked here first, it sees
    // the process's, whichever test runs first.
    let _ = monte_rpc::Config::default().waiting.spin_time();
    confine_to_first_core();
}

/// Confines the calling thread, and every thread it starts from now on, to
/// the first core it may run on, leaving the library to count the cores
/// when it first asks: called first in a process, that is one. Linux only.
#[allow(dead_code)]
pub fn confine_to_first_core() {
    #[cfg(target_os = "linux")]
    // SAFETY: `set` is a plain bit set that both calls only read and
    // write within its size, passed with that size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut set), 0);
        let first = (0..libc::CPU_SETSIZE as usize)
            .find(|&cpu| libc::CPU_ISSET(cpu, &set))
            .expect("a core this thread may run on");
        libc::CPU_ZERO(&mut set);
        libc::CPU_SET(first, &mut set);
        assert_eq!(libc::sched_setaffinity(0, size, &set), 0);
    }
}
