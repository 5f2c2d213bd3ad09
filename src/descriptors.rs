//! Room in the process's descriptor table, made before connections need it.
//!
//! Linux grows a process's descriptor table by doubling it when a new
//! descriptor does not fit, and in a multi-threaded process each growth
//! first waits for an RCU grace period, while every other thread of the
//! process that opens a descriptor (an `accept`, a dial's `socket`) waits
//! for the growth. A server taking on ten thousand connections grows its
//! table eight times on the way (from 64 slots to 16,384), and on a loaded
//! machine each grace period stalled every accept of the process for
//! milliseconds (README: handshakes). Grown once, before the connections
//! come, the table takes no such wait during the storm. It never shrinks,
//! and costs 8 bytes per slot (rounded up to a power of two), a fraction of
//! a connection's own state.

use std::io;
use std::os::fd::AsRawFd;

use crate::sys;

/// Slots beyond the connections and the reactors' own descriptors:
/// whatever else the application opens meanwhile.
const HEADROOM: usize = 64;

/// Descriptors each reactor holds (its epoll instance and a clone of its
/// registry, its waker, its sweep timer), with room to spare.
const PER_REACTOR: usize = 8;

/// The most slots a server reserves by itself: 2^20 (8 MiB of table at
/// most). A cap set far beyond what the process will hold (`usize::MAX`
/// for "no cap") must not make the kernel allocate a table for it.
const MAX_AUTOMATIC: usize = 1 << 20;

/// Makes room in this process's descriptor table for descriptors numbered
/// below `total` (at most the soft `RLIMIT_NOFILE` limit), so that opening
/// that many later does not grow the table on the way; see the module
/// docs. Returns the room made: `total`, or the limit if that is lower
/// (the table may have had more already, and may round up).
///
/// A [`Server`](crate::Server) makes room for its
/// [`max_conns`](crate::Config::max_conns) and the connections that may
/// wait for a place itself. Call this once at start-up
/// in a program that will dial many connections itself (through
/// [`ReactorHandle::dial`](crate::ReactorHandle::dial), say), or that
/// serves more than its cap's worth of descriptors.
///
/// ```
/// let room = monte_rpc::reserve_descriptors(512)?;
/// assert!(room >= 1);
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// # Errors
///
/// The error of the system call that failed: reading the descriptor limit,
/// or making a descriptor to duplicate (an epoll instance, or kqueue on
/// BSD: no file system or network needed).
pub fn reserve_descriptors(total: usize) -> io::Result<usize> {
    let probe = mio::Poll::new()?;
    reserve_with(&probe, total)
}

/// Makes room for `sockets` (the connections a server handles
/// and those waiting for a place) and `reactors` reactors beyond the
/// descriptors open now (`listener`'s number, just opened, stands for
/// them), up to [`MAX_AUTOMATIC`]. Best effort: a failure leaves the table
/// to grow as connections come, as it would without this, so it is not an
/// error of the caller's.
pub(crate) fn reserve_for_server(listener: &impl AsRawFd, sockets: usize, reactors: usize) {
    let open_now = usize::try_from(listener.as_raw_fd()).unwrap_or(0) + 1;
    let _ = reserve_with(listener, server_room(open_now, sockets, reactors));
}

/// The room a server makes: see [`reserve_for_server`].
fn server_room(open_now: usize, sockets: usize, reactors: usize) -> usize {
    open_now
        .saturating_add(sockets)
        .saturating_add(reactors.saturating_mul(PER_REACTOR))
        .saturating_add(HEADROOM)
        .min(MAX_AUTOMATIC)
}

/// Room for descriptors numbered below `total` (capped by the limit),
/// made by duplicating `fd` to a number at or above `total - 1` and closing
/// the duplicate.
fn reserve_with(fd: &impl AsRawFd, total: usize) -> io::Result<usize> {
    let limit = usize::try_from(sys::descriptor_limit()?).unwrap_or(usize::MAX);
    let total = total.min(limit);
    if total == 0 {
        return Ok(0);
    }
    match sys::dup_at_or_above(fd, total - 1) {
        Ok(duplicate) => drop(duplicate),
        // Every number from `total - 1` to the limit is open: the table
        // holds them all already.
        Err(e) if e.raw_os_error() == Some(libc::EMFILE) => {}
        Err(e) => return Err(e),
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::{server_room, HEADROOM, MAX_AUTOMATIC, PER_REACTOR};

    #[test]
    fn a_server_makes_room_for_its_cap_and_reactors_up_to_a_ceiling() {
        assert_eq!(
            server_room(10, 1000, 2),
            10 + 1000 + 2 * PER_REACTOR + HEADROOM
        );
        // "No cap" must not ask the kernel for a table to match.
        assert_eq!(server_room(10, usize::MAX, 2), MAX_AUTOMATIC);
        assert_eq!(server_room(10, 1 << 30, usize::MAX), MAX_AUTOMATIC);
    }
}
