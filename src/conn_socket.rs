//! A connection's socket, blocking at the file level on Linux while every
//! read and write that must not block says so itself (`MSG_DONTWAIT`).
//!
//! The reactor reads and writes it without ever waiting, as on any
//! non-blocking socket, and so does a caller that spins or writes. What the
//! blocking file gives is the one wait that should block: a caller waiting
//! for its response sleeps in `recv` itself ([`ConnSocket::waiting`]), one
//! system call where a non-blocking socket needs `ppoll` and then `recv`.
//! The kernel also bounds that sleep with the socket's receive timeout
//! ([`WAIT_SLICE`]) on its timer wheel instead of arming a high-resolution
//! timer per wait; the caller then looks at its deadlines (a signal ends a
//! slice early too) and waits again, and with less time than a slice left
//! it waits with `ppoll` instead.
//!
//! Elsewhere, or if the socket refuses the settings, the socket stays
//! non-blocking and callers always wait with `poll`
//! ([`ConnSocket::may_wait_in_recv`] says which).

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::time::Duration;

use crate::sys;

/// The longest a caller sleeps in `recv` before it looks at its deadlines
/// again.
pub(crate) const WAIT_SLICE: Duration = Duration::from_millis(100);

/// How late the kernel may end a slice: it rounds the receive timeout up
/// to its timer ticks, on a wheel that is not precise. A wait with less
/// than a slice and this left goes to `ppoll`, which is.
const SLICE_OVERRUN: Duration = Duration::from_millis(20);

/// Writes never wait, and never raise `SIGPIPE` (as std's writes do not),
/// which matters in a program that does not ignore the signal. Apple's
/// systems lack the flag.
const WRITE_FLAGS: libc::c_int = libc::MSG_DONTWAIT | NO_SIGPIPE;
#[cfg(not(target_vendor = "apple"))]
const NO_SIGPIPE: libc::c_int = libc::MSG_NOSIGNAL;
#[cfg(target_vendor = "apple")]
const NO_SIGPIPE: libc::c_int = 0;

/// A connection's socket; see the module docs.
#[derive(Debug)]
pub(crate) struct ConnSocket {
    /// Not mio's stream, which expects a non-blocking socket: the reactor
    /// registers the descriptor itself.
    stream: std::net::TcpStream,
    /// Blocking at the file level, with [`WAIT_SLICE`] as its receive
    /// timeout: a caller may sleep in `recv`.
    waits_in_recv: bool,
}

impl ConnSocket {
    /// Takes a connected socket (blocking or not) and sets it up: blocking
    /// with a receive timeout on Linux, else left non-blocking.
    pub(crate) fn new(stream: std::net::TcpStream) -> ConnSocket {
        Self::with_slice(stream, WAIT_SLICE)
    }

    /// A socket a caller cannot sleep in `recv` on (as where the receive
    /// timeout cannot be set): its waits are `poll`'s.
    #[cfg(test)]
    pub(crate) fn polling(stream: std::net::TcpStream) -> ConnSocket {
        stream.set_nonblocking(true).unwrap();
        ConnSocket {
            stream,
            waits_in_recv: false,
        }
    }

    fn with_slice(stream: std::net::TcpStream, slice: Duration) -> ConnSocket {
        // The timeout first: a blocking socket without one could hold a
        // caller forever.
        let waits_in_recv = cfg!(target_os = "linux")
            && stream.set_read_timeout(Some(slice)).is_ok()
            && stream.set_nonblocking(false).is_ok();
        if !waits_in_recv {
            // A failed setting leaves it non-blocking; if even this
            // fails, every read and write here still says MSG_DONTWAIT.
            let _ = stream.set_nonblocking(true);
        }
        ConnSocket {
            stream,
            waits_in_recv,
        }
    }

    /// Whether a caller with `left` before its nearest deadline (`None`:
    /// none) may wait for bytes by sleeping in `recv`
    /// ([`waiting`](Self::waiting)) now: the socket allows it, and a slice
    /// cannot overrun the deadline. Else it waits with `poll`.
    pub(crate) fn may_wait_in_recv(&self, left: Option<Duration>) -> bool {
        self.waits_in_recv && left.map_or(true, |t| t >= WAIT_SLICE + SLICE_OVERRUN)
    }

    /// A reader whose reads sleep until bytes arrive, the end of the
    /// stream, an error, [`WAIT_SLICE`] or a signal (both `WouldBlock`: the
    /// caller then looks at its deadlines before it waits again). Only
    /// where [`may_wait_in_recv`](Self::may_wait_in_recv); elsewhere its
    /// reads do not block.
    pub(crate) fn waiting(&self) -> WaitingReader<'_> {
        WaitingReader(self)
    }

    /// Shuts the socket down: a caller sleeping in `recv` or `poll` on it
    /// wakes (to the end of the stream).
    pub(crate) fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        self.stream.shutdown(how)
    }
}

impl Read for &ConnSocket {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        sys::recv(*self, buf, libc::MSG_DONTWAIT)
    }
}

impl Write for &ConnSocket {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        sys::send(*self, buf, WRITE_FLAGS)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsRawFd for ConnSocket {
    fn as_raw_fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }
}

impl AsFd for ConnSocket {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.stream.as_fd()
    }
}

/// See [`ConnSocket::waiting`].
pub(crate) struct WaitingReader<'a>(&'a ConnSocket);

impl Read for WaitingReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let flags = if self.0.waits_in_recv {
            0
        } else {
            libc::MSG_DONTWAIT
        };
        match sys::recv(self.0, buf, flags) {
            // With a receive timeout set, a signal interrupts the wait
            // whatever its handler's flags, and the reader's caller would
            // retry with a fresh slice: it must look at its deadlines
            // first, as after a `ppoll` cut short.
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {
                Err(io::ErrorKind::WouldBlock.into())
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Instant;

    fn pair(slice: Duration) -> (ConnSocket, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let ours = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (theirs, _) = listener.accept().unwrap();
        (ConnSocket::with_slice(ours, slice), theirs)
    }

    #[test]
    fn its_reads_and_writes_never_block() {
        let (socket, _peer) = pair(Duration::from_secs(30));
        assert_eq!(socket.waits_in_recv, cfg!(target_os = "linux"));
        // Blocking at the file level where it says so: only the flags
        // keep the calls below from waiting.
        let nonblocking = socket2::SockRef::from(&socket).nonblocking().unwrap();
        assert_eq!(nonblocking, !socket.waits_in_recv);
        // A call that blocked would hang the loop: fail instead.
        let (done, finished) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let waited = finished.recv_timeout(Duration::from_secs(20));
            if let Err(std::sync::mpsc::RecvTimeoutError::Timeout) = waited {
                eprintln!("a read or write on the socket blocked");
                std::process::abort();
            }
        });
        let start = Instant::now();
        let err = (&socket).read(&mut [0; 16]).expect_err("nothing to read");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        // The peer reads nothing: writes fill the buffers, then stop.
        let chunk = vec![7u8; 64 << 10];
        let mut written = 0usize;
        let full = loop {
            match (&socket).write(&chunk) {
                Ok(n) => written += n,
                Err(e) => break e,
            }
            assert!(written < 1 << 30, "the socket never filled");
        };
        assert_eq!(full.kind(), io::ErrorKind::WouldBlock);
        assert!(start.elapsed() < Duration::from_secs(10), "a call blocked");
        done.send(()).unwrap();
    }

    #[test]
    fn a_waiting_read_cut_short_by_a_signal_returns_to_its_caller() {
        let (socket, _peer) = pair(Duration::from_secs(30));
        if !socket.waits_in_recv {
            return;
        }
        sys::tests_only::install_noop_sigusr1();
        let reader = sys::tests_only::this_thread();
        let signaller = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            sys::tests_only::send_sigusr1(reader);
        });
        let start = Instant::now();
        let read = socket.waiting().read(&mut [0; 16]);
        let took = start.elapsed();
        signaller.join().unwrap();
        assert_eq!(read.map_err(|e| e.kind()), Err(io::ErrorKind::WouldBlock));
        assert!(
            took < Duration::from_secs(10),
            "slept {took:?} past the signal"
        );
    }

    #[test]
    fn a_caller_sleeps_in_recv_only_with_a_slice_to_spare() {
        let (socket, _peer) = pair(WAIT_SLICE);
        if !socket.waits_in_recv {
            return;
        }
        assert!(socket.may_wait_in_recv(None));
        assert!(socket.may_wait_in_recv(Some(Duration::from_secs(1))));
        assert!(socket.may_wait_in_recv(Some(WAIT_SLICE + SLICE_OVERRUN)));
        assert!(!socket.may_wait_in_recv(Some(WAIT_SLICE)));
        assert!(!socket.may_wait_in_recv(Some(Duration::ZERO)));
    }

    #[test]
    fn a_waiting_read_takes_bytes_as_they_come_and_gives_up_after_its_slice() {
        let (socket, mut peer) = pair(Duration::from_millis(50));
        let mut buf = [0u8; 16];
        let start = Instant::now();
        let err = socket.waiting().read(&mut buf).expect_err("nothing came");
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        if socket.waits_in_recv {
            assert!(start.elapsed() >= Duration::from_millis(40), "did not wait");
        }
        let writer = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(10));
            peer.write_all(b"hello").unwrap();
            peer
        });
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        while got == 0 && Instant::now() < deadline {
            match socket.waiting().read(&mut buf) {
                Ok(n) => got = n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&buf[..got], b"hello");
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_shutdown_wakes_a_waiting_read() {
        let (socket, _peer) = pair(Duration::from_secs(30));
        if !socket.waits_in_recv {
            return;
        }
        let socket = std::sync::Arc::new(socket);
        let reader = {
            let socket = socket.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let n = socket.waiting().read(&mut [0; 16]);
                (n.map_err(|e| e.kind()), start.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(50));
        socket.shutdown(Shutdown::Both).unwrap();
        let (read, took) = reader.join().unwrap();
        assert_eq!(read, Ok(0), "the end of the stream");
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
}
