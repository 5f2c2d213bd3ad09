//! What the library tells the application's logger: connections opened and
//! closed (with the reason), failed handshakes, connections refused at the
//! cap, reading paused for the outbound budget, failed dials, and a task's
//! waker that panicked. Events go
//! through the `log` facade, under the target `monte_rpc`, when the `log`
//! feature is on (the default); without it they compile to nothing. None is
//! emitted per message, so the hot path pays nothing.
//!
//! Levels: `debug` for the ordinary life of a connection (opened, closed by
//! either side, reading paused), `info` for a connection ended by a fault
//! (a deadline, a bad frame, an I/O error, a failed handshake) and a failed
//! dial, `warn` for a connection refused at the server's cap.

use std::net::SocketAddr;

use crate::error::Error;
use crate::protocol::Role;

/// Shows an optional peer address.
#[cfg(feature = "log")]
struct Peer(Option<SocketAddr>);

#[cfg(feature = "log")]
impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(addr) => addr.fmt(f),
            None => f.write_str("an unknown peer"),
        }
    }
}

/// A connection opened (its handshake completed).
pub(crate) fn opened(id: u64, role: Role, peer: Option<SocketAddr>) {
    #[cfg(feature = "log")]
    log::debug!(target: "monte_rpc", "connection {id} ({role:?} side) to {} opened", Peer(peer));
    #[cfg(not(feature = "log"))]
    let _ = (id, role, peer);
}

/// A connection closed with `reason`; `handshaking`: before it opened.
pub(crate) fn closed(id: u64, peer: Option<SocketAddr>, reason: &Error, handshaking: bool) {
    #[cfg(feature = "log")]
    {
        let peer = Peer(peer);
        let orderly = matches!(reason, Error::Closed | Error::PeerClosed);
        match (handshaking, orderly) {
            (true, _) => log::info!(
                target: "monte_rpc",
                "handshake with {peer} failed (connection {id}): {reason}"
            ),
            (false, true) => {
                log::debug!(target: "monte_rpc", "connection {id} to {peer} closed: {reason}")
            }
            (false, false) => {
                log::info!(target: "monte_rpc", "connection {id} to {peer} closed: {reason}")
            }
        }
    }
    #[cfg(not(feature = "log"))]
    let _ = (id, peer, reason, handshaking);
}

/// The server turned a connection away at its cap of `max`.
pub(crate) fn refused_at_cap(peer: Option<SocketAddr>, max: usize) {
    #[cfg(feature = "log")]
    log::warn!(
        target: "monte_rpc",
        "refused a connection from {}: the server's cap of {max} connections stayed full",
        Peer(peer)
    );
    #[cfg(not(feature = "log"))]
    let _ = (peer, max);
}

/// Reading a peer paused: its replies queued past the outbound budget.
pub(crate) fn reading_paused(id: u64, peer: Option<SocketAddr>, budget: usize) {
    #[cfg(feature = "log")]
    log::debug!(
        target: "monte_rpc",
        "connection {id} to {}: reading paused, more than {budget} bytes of replies queued",
        Peer(peer)
    );
    #[cfg(not(feature = "log"))]
    let _ = (id, peer, budget);
}

/// A task's waker panicked as the library woke it (an executor's bug):
/// contained, and the task may not have been woken.
#[cfg_attr(loom, allow(dead_code))] // under loom, wakes are not contained (src/sync/wake.rs)
pub(crate) fn waker_panicked() {
    #[cfg(feature = "log")]
    log::error!(
        target: "monte_rpc",
        "a task's waker panicked as it was woken; the panic was contained and that task \
         may never be polled again"
    );
}

/// A dial failed; the error names the address and the phase.
pub(crate) fn dial_failed(error: &Error) {
    #[cfg(feature = "log")]
    log::info!(target: "monte_rpc", "dial failed: {error}");
    #[cfg(not(feature = "log"))]
    let _ = error;
}
