//! The one OS call that neither std nor mio offers: asking whether a socket
//! has bytes to read without reading it.
//!
//! A caller spinning for its response checks readiness with `poll(2)`,
//! which looks at the socket without locking it, instead of calling
//! `recv` over and over: each `recv` takes the socket lock, and contends
//! with the kernel delivering the very response being waited for.

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
