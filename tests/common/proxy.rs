//! A fault-injecting TCP proxy for loopback tests: forwards between a
//! client and the real server and, on command, cuts a connection mid-frame,
//! delays, resets, stalls or black-holes it. Shared by `tests/faults.rs`
//! and `examples/tools/soak.rs` (included with `#[path]`).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use socket2::SockRef;

/// How a pump treats the traffic it carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Forward everything.
    Pass,
    /// Forward half of the next chunk, then shut both sockets (FIN).
    Cut,
    /// Sleep this many ms before forwarding each chunk.
    Delay(u64),
    /// Close both sockets with SO_LINGER 0 on the next chunk (RST).
    Reset,
    /// Forward nothing while the mode lasts; sockets stay open.
    Stall,
    /// As `Stall`, but a connection that saw it never forwards again.
    Blackhole,
}

/// How often an idle pump looks at the mode and the stop flag.
const POLL: Duration = Duration::from_millis(20);
const NO_ACTION: u8 = 0;
const CUT_NEXT: u8 = 1;

/// Counters of what the proxy did.
#[derive(Debug, Default)]
pub struct Stats {
    pub accepted: AtomicU64,
    pub cuts: AtomicU64,
    pub resets: AtomicU64,
    pub bytes: AtomicU64,
}

struct Ctl {
    mode: Mutex<Mode>,
    stop: AtomicBool,
    target: SocketAddr,
    links: Mutex<Vec<Weak<Link>>>,
    stats: Stats,
}

impl Ctl {
    fn mode(&self) -> Mode {
        *self.mode.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One proxied connection: the accepted socket and the one dialled to
/// the target. Both pumps share it; the sockets close when both end.
struct Link {
    client: TcpStream,
    server: TcpStream,
    dead: AtomicBool,
    frozen: AtomicBool,
    action: AtomicU8,
}

impl Link {
    fn cut(&self, ctl: &Ctl) {
        if !self.dead.swap(true, Ordering::AcqRel) {
            ctl.stats.cuts.fetch_add(1, Ordering::Relaxed);
        }
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    /// SO_LINGER 0: the close, when both pumps let go, sends an RST.
    fn reset(&self, ctl: &Ctl) {
        let _ = SockRef::from(&self.client).set_linger(Some(Duration::ZERO));
        let _ = SockRef::from(&self.server).set_linger(Some(Duration::ZERO));
        if !self.dead.swap(true, Ordering::AcqRel) {
            ctl.stats.resets.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A running proxy. Dropping it closes every connection.
pub struct Proxy {
    addr: SocketAddr,
    ctl: Arc<Ctl>,
    acceptor: Option<JoinHandle<()>>,
}

impl Proxy {
    pub fn start(target: SocketAddr) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("proxy addr");
        let ctl = Arc::new(Ctl {
            mode: Mutex::new(Mode::Pass),
            stop: AtomicBool::new(false),
            target,
            links: Mutex::new(Vec::new()),
            stats: Stats::default(),
        });
        let c = ctl.clone();
        let acceptor = thread::Builder::new()
            .name("proxy-accept".into())
            .spawn(move || accept_loop(listener, c))
            .expect("spawn proxy");
        Proxy {
            addr,
            ctl,
            acceptor: Some(acceptor),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn set_mode(&self, mode: Mode) {
        *self.ctl.mode.lock().unwrap_or_else(|e| e.into_inner()) = mode;
    }

    pub fn stats(&self) -> &Stats {
        &self.ctl.stats
    }

    /// Connections still being forwarded.
    #[allow(dead_code)]
    pub fn live(&self) -> usize {
        self.live_links().len()
    }

    fn live_links(&self) -> Vec<Arc<Link>> {
        let mut links = self.ctl.links.lock().unwrap_or_else(|e| e.into_inner());
        links.retain(|w| w.strong_count() > 0);
        links
            .iter()
            .filter_map(Weak::upgrade)
            .filter(|l| !l.dead.load(Ordering::Acquire))
            .collect()
    }

    /// Kills the `pick`-th live connection (modulo their number): a
    /// reset at once, or a cut in the middle of its next chunk. Returns
    /// whether there was one to kill.
    #[allow(dead_code)]
    pub fn kill_one(&self, pick: u64, reset: bool) -> bool {
        let links = self.live_links();
        if links.is_empty() {
            return false;
        }
        let link = &links[(pick % links.len() as u64) as usize];
        if reset {
            link.reset(&self.ctl);
        } else {
            link.action.store(CUT_NEXT, Ordering::Release);
        }
        true
    }

    /// Disarms every pending `kill_one` cut.
    #[allow(dead_code)]
    pub fn disarm(&self) {
        for link in self.live_links() {
            link.action.store(NO_ACTION, Ordering::Release);
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.ctl.stop.store(true, Ordering::Release);
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // Pumps notice the stop within POLL (or after their current
        // delay) and close their sockets; they are not joined.
    }
}

fn accept_loop(listener: TcpListener, ctl: Arc<Ctl>) {
    while !ctl.stop.load(Ordering::Acquire) {
        let client = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                thread::sleep(Duration::from_millis(1));
                continue;
            }
            Err(_) => continue,
        };
        ctl.stats.accepted.fetch_add(1, Ordering::Relaxed);
        let Ok(server) = TcpStream::connect_timeout(&ctl.target, Duration::from_secs(1)) else {
            continue;
        };
        let setup = |s: &TcpStream| -> std::io::Result<()> {
            s.set_nonblocking(false)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(Some(POLL))?;
            s.set_write_timeout(Some(POLL))
        };
        if setup(&client).is_err() || setup(&server).is_err() {
            continue;
        }
        let link = Arc::new(Link {
            client,
            server,
            dead: AtomicBool::new(false),
            frozen: AtomicBool::new(false),
            action: AtomicU8::new(NO_ACTION),
        });
        {
            let mut links = ctl.links.lock().unwrap_or_else(|e| e.into_inner());
            links.retain(|w| w.strong_count() > 0);
            links.push(Arc::downgrade(&link));
        }
        for upstream in [true, false] {
            let (l, c) = (link.clone(), ctl.clone());
            let spawned = thread::Builder::new()
                .name("proxy-pump".into())
                .spawn(move || pump(&l, &c, upstream));
            if spawned.is_err() {
                link.cut(&ctl);
            }
        }
    }
}

fn quit(link: &Link, ctl: &Ctl) -> bool {
    link.dead.load(Ordering::Acquire) || ctl.stop.load(Ordering::Acquire)
}

/// Whether the pump must hold its traffic now.
fn stalled(link: &Link, ctl: &Ctl) -> bool {
    match ctl.mode() {
        Mode::Stall => true,
        Mode::Blackhole => {
            link.frozen.store(true, Ordering::Release);
            true
        }
        _ => link.frozen.load(Ordering::Acquire),
    }
}

/// Writes all of `data` unless the link dies or the proxy stops.
fn send_all(link: &Link, ctl: &Ctl, mut dst: &TcpStream, mut data: &[u8]) -> bool {
    while !data.is_empty() {
        if quit(link, ctl) {
            return false;
        }
        match dst.write(data) {
            Ok(0) => return false,
            Ok(n) => {
                ctl.stats.bytes.fetch_add(n as u64, Ordering::Relaxed);
                data = &data[n..];
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(_) => return false,
        }
    }
    true
}

fn pump(link: &Link, ctl: &Ctl, upstream: bool) {
    let (mut src, dst) = if upstream {
        (&link.client, &link.server)
    } else {
        (&link.server, &link.client)
    };
    let mut buf = vec![0u8; 64 << 10];
    loop {
        if quit(link, ctl) {
            return;
        }
        if stalled(link, ctl) {
            thread::sleep(POLL);
            continue;
        }
        let n = match src.read(&mut buf) {
            Ok(0) => {
                // Pass the end of stream on (a half-close), unless the
                // link was killed meanwhile.
                if !quit(link, ctl) {
                    let _ = dst.shutdown(Shutdown::Write);
                }
                return;
            }
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(_) => {
                // The peer reset us: close the other side too.
                link.cut(ctl);
                return;
            }
        };
        let chunk = &buf[..n];
        // Hold a chunk read just as a stall began.
        while stalled(link, ctl) {
            if quit(link, ctl) {
                return;
            }
            thread::sleep(POLL);
        }
        if link.action.swap(NO_ACTION, Ordering::AcqRel) == CUT_NEXT {
            let _ = send_all(link, ctl, dst, &chunk[..n / 2]);
            link.cut(ctl);
            return;
        }
        match ctl.mode() {
            Mode::Pass | Mode::Stall | Mode::Blackhole => {}
            Mode::Delay(ms) => thread::sleep(Duration::from_millis(ms)),
            Mode::Cut => {
                let _ = send_all(link, ctl, dst, &chunk[..n / 2]);
                link.cut(ctl);
                return;
            }
            Mode::Reset => {
                link.reset(ctl);
                return;
            }
        }
        if !send_all(link, ctl, dst, chunk) {
            if !link.dead.load(Ordering::Acquire) {
                link.cut(ctl);
            }
            return;
        }
    }
}
