//! Room in the process's descriptor table, made before connections need it.
//!
//! Linux grows a process's descriptor table by doubling it when a new
//! descriptor does not fit, and in a multi-threaded process each growth
//! first waits for an RCU grace period, while every other thread of the
//! process that opens a descriptor (an `accept`, a dial's `socket`) waits
//! for the growth. A server taking on ten thousand connections grows its
//! table eight times on the way (128 slots to 16,384), and on a loaded
//! machine each grace period stalled every accept of the process for
//! milliseconds (README: handshakes). Grown once, before the connections
//! come, the table takes no such wait during the storm. It never shrinks,
//! and costs 8 bytes per slot, a fraction of a connection's own state.

use std::io;
use std::os::fd::AsRawFd;

use crate::sys;

/// Slots beyond the connections themselves: the reactors' epoll, waker and
/// timer descriptors, and whatever else the application opens meanwhile.
const HEADROOM: usize = 64;

/// Makes room in this process's descriptor table for descriptors numbered
/// below `total` (at most the soft `RLIMIT_NOFILE` limit), so that opening
/// that many later does not grow the table on the way; see the module
/// docs. Returns the number of descriptors the table has room for now (at
/// least; it may have had more already).
///
/// A [`Server`](crate::Server) makes room for its
/// [`max_conns`](crate::Config::max_conns) itself. Call this once at start-up
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
/// The error of the system call that failed: no descriptor free at or
/// above the number asked for below the limit (`EMFILE`), or no socket
/// could be made to duplicate.
pub fn reserve_descriptors(total: usize) -> io::Result<usize> {
    // Any open descriptor will do to duplicate; a UDP socket needs no
    // file system and no network.
    let probe = std::net::UdpSocket::bind((std::net::Ipv4Addr::LOCALHOST, 0))?;
    reserve_with(&probe, total)
}

/// Makes room for `max_conns` connections beyond the descriptors open now
/// (`listener`'s number, just opened, stands for them). Best effort: a
/// failure leaves the table to grow as connections come, as it would
/// without this, so it is not an error of the caller's.
pub(crate) fn reserve_for_connections(listener: &impl AsRawFd, max_conns: usize) {
    let open_now = usize::try_from(listener.as_raw_fd()).unwrap_or(0) + 1;
    let _ = reserve_with(
        listener,
        open_now.saturating_add(max_conns).saturating_add(HEADROOM),
    );
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
    drop(sys::dup_at_or_above(fd, total - 1)?);
    Ok(total)
}
