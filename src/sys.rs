//! The OS calls a caller thread needs that neither std nor mio offers: it
//! waits for its response on the socket itself (see [`crate::conn`]).
//!
//! - [`readable_now`]: whether a socket has bytes to read, without reading
//!   it. A spinning caller checks with `poll(2)`, which looks at the socket
//!   without locking it, instead of calling `recv` over and over: each
//!   `recv` takes the socket lock, and contends with the kernel delivering
//!   the very response being waited for.
//! - [`wait_readable`]: blocks until the socket is readable, so the kernel
//!   wakes the waiting caller directly when its response lands (when its
//!   deadline is nearer than it can sleep in `recv`: see
//!   [`crate::conn_socket`]); and
//!   [`wait_writable`], with which a dial waits on a non-blocking socket
//!   (its connect, its handshake) without switching the socket between
//!   blocking and not, and setting timeouts on it, a system call each.
//! - [`epoll_modify`]: sets a registered socket's epoll interest to *no*
//!   readiness at all, which mio cannot express: while a caller waits on
//!   the socket, the reactor must not be woken for the same bytes.
//! - [`epoll_add_exclusive`]: registers a listener that several reactors
//!   watch with `EPOLLEXCLUSIVE`, which mio cannot express: a new
//!   connection then wakes one sleeping reactor instead of every one.
//! - [`recv`] and [`send`] with flags: a connection's socket is blocking
//!   at the file level on Linux, so every read and write that must not
//!   block says so itself (`MSG_DONTWAIT`; see [`crate::conn_socket`]).
//! - [`SweepTimer`]: a one-shot timer as a descriptor (`timerfd`) in a
//!   reactor's epoll set, so that a reactor asleep until its next sweep
//!   waits in `epoll_wait` with no timeout: a timeout arms a
//!   high-resolution timer on every wait, which measured 3-4% of a request
//!   on one core.
//! - [`return_free_memory`]: asks glibc's allocator to hand pages of freed
//!   memory back to the OS. Buffers that connections return to the
//!   reactors' pools stay where a burst of traffic put them, and glibc gives
//!   back only what lies above the last block in use, so after a burst the
//!   freed output buffers of thousands of connections would stay resident.
//!
//! - [`dup_at_or_above`] and [`descriptor_limit`]: what
//!   [`crate::descriptors`] grows the process's descriptor table with
//!   (`fcntl(F_DUPFD_CLOEXEC)`, which never replaces an open descriptor),
//!   and the limit it stays under (`RLIMIT_NOFILE`).
//!
//! `ppoll` and `epoll_ctl` are Linux's. Elsewhere the wait uses
//! `poll` with a millisecond timeout, and the reactor keeps its interest:
//! it is then woken for nothing, which costs time but loses no event (the
//! read turn decides who reads). Only the Linux versions are tested.

#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

/// `recv(2)` into `buf` with `flags`: the bytes read (0 at the end of the
/// stream), or the error (`WouldBlock` when `MSG_DONTWAIT` found none, or
/// a receive timeout passed).
pub(crate) fn recv(socket: &impl AsRawFd, buf: &mut [u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for writes of `buf.len()` bytes for the whole
    // call, and the kernel writes at most that many.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            buf.as_mut_ptr().cast(),
            buf.len(),
            flags,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// `send(2)` of `buf` with `flags`: the bytes written, or the error.
pub(crate) fn send(socket: &impl AsRawFd, buf: &[u8], flags: libc::c_int) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the whole
    // call, and the kernel reads at most that many.
    let n = unsafe { libc::send(socket.as_raw_fd(), buf.as_ptr().cast(), buf.len(), flags) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// A one-shot timer as a descriptor; see the module docs. Linux only.
#[cfg(target_os = "linux")]
pub(crate) struct SweepTimer(std::os::fd::OwnedFd);

#[cfg(target_os = "linux")]
impl SweepTimer {
    /// A disarmed timer on the monotonic clock (which `Instant` reads),
    /// non-blocking and closed on exec.
    pub(crate) fn new() -> io::Result<SweepTimer> {
        use std::os::fd::FromRawFd;
        // SAFETY: no pointers; the flags are constants the call accepts.
        let fd = unsafe {
            libc::timerfd_create(
                libc::CLOCK_MONOTONIC,
                libc::TFD_NONBLOCK | libc::TFD_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        Ok(SweepTimer(unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) }))
    }

    /// Fires once, `after` from now (at least a nanosecond: zero would
    /// disarm it), replacing any earlier setting and its count.
    pub(crate) fn arm(&self, after: std::time::Duration) -> io::Result<()> {
        let after = after.max(std::time::Duration::from_nanos(1));
        let spec = libc::itimerspec {
            it_interval: timespec(std::time::Duration::ZERO),
            it_value: timespec(after),
        };
        // SAFETY: the descriptor is open (owned by `self`), `spec` is a
        // valid, initialised `itimerspec` that outlives the call, and the
        // old setting is not asked for (a null pointer is allowed).
        let r =
            unsafe { libc::timerfd_settime(self.0.as_raw_fd(), 0, &spec, std::ptr::null_mut()) };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

#[cfg(target_os = "linux")]
impl SweepTimer {
    /// Takes the count of expirations, so the descriptor is not left
    /// readable (edge-triggered epoll reports each expiry either way).
    pub(crate) fn clear(&self) {
        let mut count = [0u8; 8];
        // SAFETY: the descriptor is open (owned by `self`) and `count` is
        // valid for writes of its 8 bytes, the size a timerfd read takes;
        // the descriptor is non-blocking, so an empty count returns EAGAIN.
        let _ = unsafe { libc::read(self.0.as_raw_fd(), count.as_mut_ptr().cast(), count.len()) };
    }
}

#[cfg(target_os = "linux")]
impl AsRawFd for SweepTimer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

/// No timer descriptors elsewhere: a reactor waits with timeouts.
#[cfg(not(target_os = "linux"))]
pub(crate) enum SweepTimer {}

#[cfg(not(target_os = "linux"))]
impl SweepTimer {
    pub(crate) fn new() -> io::Result<SweepTimer> {
        Err(io::ErrorKind::Unsupported.into())
    }

    pub(crate) fn arm(&self, _after: std::time::Duration) -> io::Result<()> {
        match *self {}
    }

    pub(crate) fn clear(&self) {
        match *self {}
    }
}

#[cfg(not(target_os = "linux"))]
impl AsRawFd for SweepTimer {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        match *self {}
    }
}

/// `d` as a `timespec` (seconds capped at `i32::MAX`). Built field by
/// field: on some targets the type has padding or other field widths.
#[cfg(target_os = "linux")]
fn timespec(d: std::time::Duration) -> libc::timespec {
    // SAFETY: `timespec` holds only integers (and padding on some
    // targets), for which all zeros is a valid value.
    let mut t: libc::timespec = unsafe { std::mem::zeroed() };
    t.tv_sec = d.as_secs().min(i32::MAX as u64) as _;
    t.tv_nsec = d.subsec_nanos() as _;
    t
}

/// Signals for tests: a wait in a system call cut short.
#[cfg(all(test, target_os = "linux"))]
pub(crate) mod tests_only {
    /// Makes `SIGUSR1` interrupt system calls instead of ending the
    /// process.
    pub(crate) fn install_noop_sigusr1() {
        extern "C" fn ignore(_: libc::c_int) {}
        // SAFETY: the action is zeroed (no flags, an empty mask) and then
        // given a handler that does nothing, which is async-signal-safe;
        // the old action is not asked for (a null pointer is allowed).
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = ignore as *const () as libc::sighandler_t;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(libc::SIGUSR1, &action, std::ptr::null_mut());
        }
    }

    /// The calling thread, to signal.
    pub(crate) fn this_thread() -> libc::pthread_t {
        // SAFETY: no preconditions; it only returns the caller's id.
        unsafe { libc::pthread_self() }
    }

    /// The CPU time the calling thread has used (user and system).
    pub(crate) fn thread_cpu_time() -> std::time::Duration {
        // SAFETY: `usage` is a plain C struct that `getrusage` fills in;
        // zeroed is a valid value of it.
        let usage = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
            usage
        };
        let micros = |t: libc::timeval| t.tv_sec as u64 * 1_000_000 + t.tv_usec as u64;
        std::time::Duration::from_micros(micros(usage.ru_utime) + micros(usage.ru_stime))
    }

    /// Sends `SIGUSR1` to `thread`, which must still be running.
    pub(crate) fn send_sigusr1(thread: libc::pthread_t) {
        // SAFETY: the caller keeps `thread` alive until this returns (the
        // test joins the signaller before its thread ends).
        unsafe {
            libc::pthread_kill(thread, libc::SIGUSR1);
        }
    }
}

/// Whether `socket` is readable now (bytes, end of stream or an error
/// waiting), without blocking. On a failed check, says yes: the read that
/// follows then reports the truth.
pub(crate) fn readable_now(socket: &impl AsRawFd) -> bool {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: `fds` is one valid, initialised `pollfd` that lives across
    // the call, and the count passed is 1; a zero timeout never blocks.
    let n = unsafe { libc::poll(&mut fds, 1, 0) };
    n != 0
}

/// Blocks until `socket` is readable (bytes, end of stream or an error
/// waiting) or `timeout` passes (`None`: no limit). Returns whether it is
/// readable; an interrupted wait returns `false` and the caller looks again.
pub(crate) fn wait_readable(socket: &impl AsRawFd, timeout: Option<std::time::Duration>) -> bool {
    wait_for(socket, READABLE, timeout)
}

/// Blocks until `socket` is writable (or has an error, such as a failed
/// connect) or `timeout` passes, as [`wait_readable`] does.
pub(crate) fn wait_writable(socket: &impl AsRawFd, timeout: Option<std::time::Duration>) -> bool {
    wait_for(socket, libc::POLLOUT, timeout)
}

#[cfg(target_os = "linux")]
const READABLE: libc::c_short = libc::POLLIN | libc::POLLRDHUP;
#[cfg(not(target_os = "linux"))]
const READABLE: libc::c_short = libc::POLLIN;

#[cfg(target_os = "linux")]
fn wait_for(
    socket: &impl AsRawFd,
    events: libc::c_short,
    timeout: Option<std::time::Duration>,
) -> bool {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    let spec = timeout.map(timespec);
    let spec_ptr = spec
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is one valid, initialised `pollfd` and `spec_ptr` is
    // null or points at `spec`; both outlive the call. No signal mask is
    // passed (null), so the thread's own is kept.
    let n = unsafe { libc::ppoll(&mut fds, 1, spec_ptr, std::ptr::null()) };
    settle(n, timeout)
}

/// A wait's answer from `poll`'s return value `n`. A failure other than
/// an interruption (out of kernel memory, say) would fail again at once:
/// the caller, told "not yet", would look again and spin, so the thread
/// first sleeps out a millisecond of the wait.
fn settle(n: libc::c_int, timeout: Option<std::time::Duration>) -> bool {
    if n < 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
        let pause = std::time::Duration::from_millis(1);
        std::thread::sleep(timeout.map_or(pause, |t| t.min(pause)));
    }
    n > 0
}

/// Sets what epoll reports for `fd` (registered with mio under `token` in
/// the epoll instance `epoll`): edge-triggered readable and/or writable,
/// with the same flags mio uses, or neither (errors and hang-ups only).
#[cfg(target_os = "linux")]
pub(crate) fn epoll_modify(
    epoll: &mio::Registry,
    fd: &impl AsRawFd,
    token: usize,
    readable: bool,
    writable: bool,
) -> std::io::Result<()> {
    let mut flags = libc::EPOLLET;
    if readable {
        flags |= libc::EPOLLIN | libc::EPOLLRDHUP;
    }
    if writable {
        flags |= libc::EPOLLOUT;
    }
    let mut event = libc::epoll_event {
        events: flags as u32,
        u64: token as u64,
    };
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller borrows their owners), and `event` is a valid, initialised
    // `epoll_event` the kernel only reads.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_MOD,
            fd.as_raw_fd(),
            &mut event,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// [`wait_for`] where `ppoll` is missing: `poll`, its timeout rounded up
/// to whole milliseconds.
#[cfg(not(target_os = "linux"))]
fn wait_for(
    socket: &impl AsRawFd,
    events: libc::c_short,
    timeout: Option<std::time::Duration>,
) -> bool {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
    });
    // SAFETY: `fds` is one valid, initialised `pollfd` that lives across
    // the call, and the count passed is 1.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    settle(n, timeout)
}

/// Without epoll, through mio, which cannot turn readable off: the reactor
/// keeps it (see the module docs).
#[cfg(not(target_os = "linux"))]
pub(crate) fn epoll_modify(
    registry: &mio::Registry,
    fd: &impl AsRawFd,
    token: usize,
    _readable: bool,
    writable: bool,
) -> std::io::Result<()> {
    let mut interest = mio::Interest::READABLE;
    if writable {
        interest = interest | mio::Interest::WRITABLE;
    }
    registry.reregister(
        &mut mio::unix::SourceFd(&fd.as_raw_fd()),
        mio::Token(token),
        interest,
    )
}

/// Registers `fd` (a listening socket) in the epoll instance `epoll` under
/// `token`: readable, edge-triggered and exclusive, so that of the epoll
/// instances watching it, one that sleeps is woken per event. Kernels
/// before 4.5 ignore the flag, and then wake every one, which loses
/// nothing. Returns `false` where the kernel refuses it (`EINVAL`): the
/// caller registers plainly then.
#[cfg(target_os = "linux")]
pub(crate) fn epoll_add_exclusive(
    epoll: &mio::Registry,
    fd: &impl AsRawFd,
    token: usize,
) -> std::io::Result<bool> {
    let mut event = libc::epoll_event {
        events: (libc::EPOLLIN | libc::EPOLLET | libc::EPOLLEXCLUSIVE) as u32,
        u64: token as u64,
    };
    // SAFETY: both descriptors are open for the duration of the call (the
    // caller borrows their owners), and `event` is a valid, initialised
    // `epoll_event` the kernel only reads.
    let rc = unsafe {
        libc::epoll_ctl(
            epoll.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            fd.as_raw_fd(),
            &mut event,
        )
    };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) {
        Ok(false)
    } else {
        Err(err)
    }
}

/// Without epoll there is no exclusive registration: the caller registers
/// through mio, and every reactor is woken per event.
#[cfg(not(target_os = "linux"))]
pub(crate) fn epoll_add_exclusive(
    _registry: &mio::Registry,
    _fd: &impl AsRawFd,
    _token: usize,
) -> std::io::Result<bool> {
    Ok(false)
}

/// Gives the pages of freed heap memory back to the OS (glibc's
/// `malloc_trim`), after idle connections returned their buffers; see the
/// module docs. A no-op with other C libraries, where the global allocator
/// has its own policy.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub(crate) fn return_free_memory() {
    // SAFETY: `malloc_trim` only releases memory the allocator holds free;
    // it takes no pointer and is thread-safe (it locks each arena).
    unsafe {
        libc::malloc_trim(0);
    }
}

/// See the glibc version.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub(crate) fn return_free_memory() {}

/// A duplicate of `fd` numbered `min` or above: the lowest free number
/// from `min` up (`fcntl(F_DUPFD_CLOEXEC)`), so no open descriptor is
/// replaced, closed on exec. Making it grows the process's descriptor table
/// to fit that number, if it did not already.
pub(crate) fn dup_at_or_above(fd: &impl AsRawFd, min: usize) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let min = libc::c_int::try_from(min).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: no pointers; `fd` is open for the duration of the call (the
    // borrow), and `F_DUPFD_CLOEXEC` only adds a descriptor.
    let new = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) };
    if new < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `new` is a descriptor just made that nothing else owns.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(new) })
}

/// The process's soft limit on descriptors (`RLIMIT_NOFILE`): a descriptor
/// number must stay below it. `u64::MAX` when unlimited.
pub(crate) fn descriptor_limit() -> io::Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable `rlimit` for the call to fill.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(if limit.rlim_cur == libc::RLIM_INFINITY {
        u64::MAX
    } else {
        #[allow(clippy::unnecessary_cast)] // `rlim_t` is not `u64` everywhere
        let soft = limit.rlim_cur as u64;
        soft
    })
}

#[cfg(test)]
mod tests {
    /// `epoll_modify` on a socket registered with mio: readable off, bytes
    /// arrive, and no event comes; readable on again, and the bytes
    /// already there are reported once (the modification re-checks the
    /// readiness, which the callers' hand-back to the reactor relies on);
    /// writable alone reports the writable socket and not the bytes.
    #[cfg(target_os = "linux")]
    #[test]
    fn epoll_modify_turns_readable_and_writable_off_and_on() {
        use std::io::Write;
        use std::os::fd::AsRawFd;
        use std::time::Duration;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut theirs = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (ours, _) = listener.accept().unwrap();
        ours.set_nonblocking(true).unwrap();
        let mut poll = mio::Poll::new().unwrap();
        let mut events = mio::Events::with_capacity(8);
        let fd = ours.as_raw_fd();
        poll.registry()
            .register(
                &mut mio::unix::SourceFd(&fd),
                mio::Token(7),
                mio::Interest::READABLE,
            )
            .unwrap();
        let mut wait = |poll: &mut mio::Poll| -> Vec<(usize, bool, bool)> {
            poll.poll(&mut events, Some(Duration::from_millis(100)))
                .unwrap();
            events
                .iter()
                .map(|e| (e.token().0, e.is_readable(), e.is_writable()))
                .collect()
        };
        super::epoll_modify(poll.registry(), &ours, 7, false, false).unwrap();
        theirs.write_all(b"bytes").unwrap();
        assert_eq!(wait(&mut poll), [], "an event with readable off");
        super::epoll_modify(poll.registry(), &ours, 7, false, true).unwrap();
        assert_eq!(wait(&mut poll), [(7, false, true)], "writable alone");
        super::epoll_modify(poll.registry(), &ours, 7, true, false).unwrap();
        assert_eq!(
            wait(&mut poll),
            [(7, true, false)],
            "the bytes already there"
        );
        assert_eq!(wait(&mut poll), [], "edge-triggered: reported once");
        // An unregistered descriptor is an error, not a silent no-op.
        let stray = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        assert!(super::epoll_modify(poll.registry(), &stray, 8, true, false).is_err());
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn the_sweep_timer_fires_once_when_set_and_again_when_set_again() {
        use std::time::{Duration, Instant};
        let timer = super::SweepTimer::new().unwrap();
        assert!(!super::readable_now(&timer), "fired while disarmed");
        for _ in 0..2 {
            let start = Instant::now();
            timer.arm(Duration::from_millis(20)).unwrap();
            assert!(super::wait_readable(&timer, Some(Duration::from_secs(5))));
            let took = start.elapsed();
            assert!(took >= Duration::from_millis(20), "fired early: {took:?}");
            assert!(took < Duration::from_secs(5), "never fired");
            // Taken: not readable until it fires again (it is one-shot).
            timer.clear();
            assert!(!super::readable_now(&timer), "still readable");
            assert!(!super::wait_readable(
                &timer,
                Some(Duration::from_millis(50))
            ));
        }
    }

    #[test]
    fn freed_memory_goes_back_to_the_os() {
        // Many small blocks, all freed: a trim must succeed and leave the
        // allocator working.
        let blocks: Vec<Vec<u8>> = (0..256).map(|i| vec![i as u8; 16 << 10]).collect();
        let kept = blocks[255].clone();
        drop(blocks);
        super::return_free_memory();
        let again = vec![1u8; 16 << 10];
        assert_eq!(kept[0], 255);
        assert_eq!(again.len(), 16 << 10);
    }

    // A persistent poll failure cannot be provoked on demand (a bad
    // descriptor is POLLNVAL, not a failure), so `settle` is given one:
    // a return of -1 with errno set.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_failed_wait_pauses_instead_of_returning_at_once() {
        let start = std::time::Instant::now();
        set_errno(libc::ENOMEM);
        assert!(!super::settle(
            -1,
            Some(std::time::Duration::from_millis(5))
        ));
        assert!(start.elapsed() >= std::time::Duration::from_millis(1));
        let start = std::time::Instant::now();
        set_errno(libc::EINTR);
        assert!(!super::settle(-1, None));
        assert!(start.elapsed() < std::time::Duration::from_millis(1));
        assert!(super::settle(1, None));
    }

    /// Sets this thread's errno as a failed call would.
    #[cfg(target_os = "linux")]
    fn set_errno(code: libc::c_int) {
        // SAFETY: `__errno_location` returns this thread's errno slot,
        // valid for the thread's life; writing an int to it is what any
        // failing libc call does.
        unsafe {
            *libc::__errno_location() = code;
        }
    }

    // epoll(7) promises "one or more" woken: of 3 tries, one must wake
    // exactly one, and every try at least one.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_exclusive_listener_wakes_one_sleeping_poll() {
        let woken: Vec<usize> = (0..3).map(|_| exclusive_wakes()).collect();
        assert!(woken.iter().all(|&n| n >= 1), "woken per try: {woken:?}");
        assert!(woken.contains(&1), "woken per try: {woken:?}");
    }

    /// Two polls watch one listener, both asleep when a connection lands:
    /// how many wake.
    #[cfg(target_os = "linux")]
    fn exclusive_wakes() -> usize {
        use std::time::Duration;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let mut polls: Vec<mio::Poll> = (0..2).map(|_| mio::Poll::new().unwrap()).collect();
        for p in &polls {
            assert!(super::epoll_add_exclusive(p.registry(), &listener, 7).unwrap());
        }
        let addr = listener.local_addr().unwrap();
        let woken = std::thread::scope(|s| {
            let waits: Vec<_> = polls
                .iter_mut()
                .map(|p| {
                    s.spawn(move || {
                        let mut events = mio::Events::with_capacity(4);
                        p.poll(&mut events, Some(Duration::from_millis(300)))
                            .unwrap();
                        events
                            .iter()
                            .any(|e| e.token() == mio::Token(7) && e.is_readable())
                    })
                })
                .collect();
            std::thread::sleep(Duration::from_millis(100));
            let _client = std::net::TcpStream::connect(addr).unwrap();
            waits
                .into_iter()
                .map(|w| w.join().unwrap())
                .filter(|&w| w)
                .count()
        });
        assert!(listener.accept().is_ok());
        woken
    }

    // Linux's default soft limit (1024) leaves room for number 400; other
    // systems' may not (macOS: 256).
    #[cfg(target_os = "linux")]
    #[test]
    fn a_duplicate_at_or_above_a_number_never_replaces_an_open_descriptor() {
        use std::net::UdpSocket;
        use std::os::fd::AsRawFd;
        let a = UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = UdpSocket::bind("127.0.0.1:0").unwrap();
        let low = super::dup_at_or_above(&a, 400).unwrap();
        assert!(low.as_raw_fd() >= 400, "numbered {}", low.as_raw_fd());
        // Asked for the number `low` holds: the next free one instead.
        let high = super::dup_at_or_above(&b, low.as_raw_fd() as usize).unwrap();
        assert!(high.as_raw_fd() > low.as_raw_fd());
        let addr_of = |fd| socket2::SockRef::from(fd).local_addr().unwrap().as_socket();
        assert_eq!(addr_of(&low), Some(a.local_addr().unwrap()));
        assert_eq!(addr_of(&high), Some(b.local_addr().unwrap()));
        assert!(super::descriptor_limit().unwrap() > high.as_raw_fd() as u64);
    }
}
