//! The OS calls a caller thread needs that neither std nor mio offers: it
//! waits for its response on the socket itself (see [`crate::conn`]).
//!
//! - [`readable_now`]: whether a socket has bytes to read, without reading
//!   it. A spinning caller checks with `poll(2)`, which looks at the socket
//!   without locking it, instead of calling `recv` over and over: each
//!   `recv` takes the socket lock, and contends with the kernel delivering
//!   the very response being waited for.
//! - [`wait_readable`]: blocks until the socket is readable, so the kernel
//!   wakes the waiting caller directly when its response lands.
//! - [`epoll_modify`]: sets a registered socket's epoll interest to *no*
//!   readiness at all, which mio cannot express: while a caller waits on
//!   the socket, the reactor must not be woken for the same bytes.
//!
//! The last two are Linux's (`ppoll`, `epoll_ctl`). Elsewhere the wait uses
//! `poll` with a millisecond timeout, and the reactor keeps its interest:
//! it is then woken for nothing, which costs time but loses no event (the
//! read turn decides who reads). Only the Linux versions are tested.

#![allow(unsafe_code)]

use std::os::fd::AsRawFd;

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
#[cfg(target_os = "linux")]
pub(crate) fn wait_readable(socket: &impl AsRawFd, timeout: Option<std::time::Duration>) -> bool {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN | libc::POLLRDHUP,
        revents: 0,
    };
    let spec = timeout.map(|t| libc::timespec {
        tv_sec: t.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_nsec: t.subsec_nanos() as libc::c_long,
    });
    let spec_ptr = spec
        .as_ref()
        .map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is one valid, initialised `pollfd` and `spec_ptr` is
    // null or points at `spec`; both outlive the call. No signal mask is
    // passed (null), so the thread's own is kept.
    let n = unsafe { libc::ppoll(&mut fds, 1, spec_ptr, std::ptr::null()) };
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

/// [`wait_readable`] where `ppoll` is missing: `poll`, its timeout rounded
/// up to whole milliseconds.
#[cfg(not(target_os = "linux"))]
pub(crate) fn wait_readable(socket: &impl AsRawFd, timeout: Option<std::time::Duration>) -> bool {
    let mut fds = libc::pollfd {
        fd: socket.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.map_or(-1, |t| {
        t.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int
    });
    // SAFETY: `fds` is one valid, initialised `pollfd` that lives across
    // the call, and the count passed is 1.
    let n = unsafe { libc::poll(&mut fds, 1, ms) };
    n > 0
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
