//! Accepting inside the reactors: one listener that every reactor of a
//! server watches, so a new connection is accepted by a reactor that is
//! awake, with no hop through a thread of its own.
//!
//! Each reactor registers the listener edge-triggered, and drains it until
//! `WouldBlock` when it is announced. On Linux the registration is
//! exclusive (`EPOLLEXCLUSIVE`): a new connection wakes one sleeping
//! reactor, not all of them, and is queued for the busy ones, which race
//! for it at their next poll (the losers' `accept` returns `WouldBlock`).
//! What becomes of an accepted connection is the [`Gate`]'s to decide
//! (the server's cap, and where the connection runs).

use std::io;
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};

/// How long the reactors stop accepting after an error that a retry at
/// once would only repeat, such as running out of descriptors.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);

/// The most connections a reactor accepts in one turn: in a connect storm
/// it goes on serving the connections it has (their handshakes, their
/// deadlines) between batches, instead of accepting until the storm ends.
const ACCEPT_BATCH: usize = 32;

/// The listener's token in every reactor's poll.
pub(super) const LISTENER: Token = Token(usize::MAX - 2);

/// Takes every connection a reactor accepts: the server's connection cap,
/// which admits it and places it on a reactor, or keeps it waiting.
pub(crate) trait Gate: Send + Sync {
    /// Called on the accepting reactor's thread, with a non-blocking
    /// socket.
    fn take(&self, stream: TcpStream, peer: SocketAddr);
}

/// One reactor's registration of a shared listener, and when to come
/// back to it without a new event.
pub(crate) struct Listener {
    listener: Arc<mio::net::TcpListener>,
    gate: Arc<dyn Gate>,
    /// Accept again by then, announced or not: now, after a full batch
    /// (the backlog may hold more, and edge-triggered polling would not
    /// say so again), or after the pause that follows an error.
    resume_at: Option<Instant>,
}

impl Listener {
    /// Registers the listener in a reactor's `registry`: exclusively on
    /// Linux where the kernel allows it, plainly elsewhere.
    pub(super) fn register(
        listener: Arc<mio::net::TcpListener>,
        gate: Arc<dyn Gate>,
        registry: &Registry,
    ) -> io::Result<Listener> {
        let fd = listener.as_raw_fd();
        if !crate::sys::epoll_add_exclusive(registry, &fd, LISTENER.0)? {
            registry.register(&mut SourceFd(&fd), LISTENER, Interest::READABLE)?;
        }
        Ok(Listener {
            listener,
            gate,
            resume_at: None,
        })
    }

    pub(super) fn deregister(&self, registry: &Registry) {
        let fd = self.listener.as_raw_fd();
        let _ = registry.deregister(&mut SourceFd(&fd));
    }

    /// When to accept again without a new event, if at all.
    pub(super) fn resume_at(&self) -> Option<Instant> {
        self.resume_at
    }

    /// Accepts until the backlog is empty (the edge-triggered contract) or
    /// a batch is done, handing every connection to the gate.
    pub(super) fn accept(&mut self, now: Instant) {
        if let Some(at) = self.resume_at {
            if now < at {
                // Paused after an error.
                return;
            }
            self.resume_at = None;
        }
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, peer)) => {
                    // Non-blocking already (mio accepts with SOCK_NONBLOCK).
                    let stream = TcpStream::from(std::os::fd::OwnedFd::from(stream));
                    self.gate.take(stream, peer);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                // One connection that died before it was accepted: the rest
                // of the backlog is still there, and no further edge would
                // announce it.
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionAborted
                            | io::ErrorKind::ConnectionReset
                    ) => {}
                // Out of descriptors (or similar): the backlog stays; come
                // back shortly rather than spin.
                Err(_) => {
                    self.resume_at = Some(now + ACCEPT_RETRY);
                    return;
                }
            }
        }
        self.resume_at = Some(now);
    }
}
