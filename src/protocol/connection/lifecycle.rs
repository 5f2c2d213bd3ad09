//! A connection's life as its reactor drives it: handshaking, open,
//! draining (a graceful close: flush what is queued, shut the write side,
//! wait for the peer's end) and closed. No I/O and no clock: the reactor
//! says what happened, with the time, and does what the answer says.

use std::time::{Duration, Instant};

use crate::error::{Error, HandshakeError, Result};

/// Where a connection is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The server side of the handshake runs (in an authenticated profile,
    /// until the client proved the key).
    Handshaking,
    /// Frames flow both ways.
    Open,
    /// Closing gracefully, until the deadline at the latest.
    Draining,
}

/// What the reactor must do next in a graceful close
/// ([`Lifecycle::advance`]).
#[derive(Debug)]
pub struct Advance {
    /// Shut the socket's write side now: everything queued is written.
    pub shut_write: bool,
    /// Close the connection now, with this reason.
    pub close: Option<Error>,
}

/// The state of one connection's life; see the module docs.
#[derive(Debug)]
pub struct Lifecycle {
    handshaking: bool,
    /// Set while closing gracefully: the close ends by then at the latest.
    drain_deadline: Option<Instant>,
    /// The peer has shut its write side (its end of stream was read).
    peer_done: bool,
    /// This side has shut its write side.
    write_shut: bool,
    /// This side began the close (its shutdown), so the end is orderly.
    local: bool,
}

impl Lifecycle {
    /// A connection handed to its reactor, still `handshaking` or open.
    pub fn new(handshaking: bool) -> Self {
        Lifecycle {
            handshaking,
            drain_deadline: None,
            peer_done: false,
            write_shut: false,
            local: false,
        }
    }

    /// Where the connection is.
    pub fn phase(&self) -> Phase {
        if self.drain_deadline.is_some() {
            Phase::Draining
        } else if self.handshaking {
            Phase::Handshaking
        } else {
            Phase::Open
        }
    }

    /// Whether the handshake has not completed (a failure then counts as a
    /// failed handshake, and the handler never heard of the connection).
    pub fn is_handshaking(&self) -> bool {
        self.handshaking
    }

    /// The handshake completed: the connection is open.
    pub fn opened(&mut self) {
        self.handshaking = false;
    }

    /// The peer's end of stream arrived at `now`. During the handshake that
    /// fails it; once open, replies to what the peer sent are still owed,
    /// so the connection drains (for at most `drain`). Returns whether this
    /// is news (the reactor then flushes).
    pub fn peer_finished(&mut self, now: Instant, drain: Duration) -> Result<bool> {
        if self.handshaking {
            return Err(HandshakeError::PeerClosed.into());
        }
        if self.peer_done {
            return Ok(false);
        }
        self.peer_done = true;
        self.drain_deadline.get_or_insert(now + drain);
        Ok(true)
    }

    /// This side closes gracefully, by `deadline` at the latest (a close
    /// already under way keeps its own deadline).
    pub fn close_locally(&mut self, deadline: Instant) {
        self.local = true;
        self.drain_deadline.get_or_insert(deadline);
    }

    /// One step of a graceful close. `seal_off` refuses further output and
    /// says whether everything queued is written; it is asked only until
    /// it says yes. Then the write side is shut, and the connection closes
    /// once the peer's end came too (or at once if it never opened).
    pub fn advance(&mut self, seal_off: impl FnOnce() -> bool) -> Advance {
        let mut step = Advance {
            shut_write: false,
            close: None,
        };
        if self.drain_deadline.is_none() {
            return step;
        }
        if !self.write_shut {
            if !seal_off() {
                return step;
            }
            self.write_shut = true;
            step.shut_write = true;
        }
        if self.peer_done || self.handshaking {
            step.close = Some(if self.local {
                Error::Closed
            } else {
                Error::PeerClosed
            });
        }
        step
    }

    /// Whether a graceful close has run out of time at `now`.
    pub fn drain_expired(&self, now: Instant) -> bool {
        self.drain_deadline.is_some_and(|deadline| now >= deadline)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRAIN: Duration = Duration::from_secs(5);

    #[test]
    fn the_peers_end_during_the_handshake_fails_it() {
        let mut life = Lifecycle::new(true);
        assert_eq!(life.phase(), Phase::Handshaking);
        assert!(matches!(
            life.peer_finished(Instant::now(), DRAIN),
            Err(Error::Handshake(HandshakeError::PeerClosed))
        ));
    }

    #[test]
    fn the_peers_end_drains_then_closes_once_output_is_written() {
        let now = Instant::now();
        let mut life = Lifecycle::new(true);
        life.opened();
        assert_eq!(life.phase(), Phase::Open);
        assert!(life.peer_finished(now, DRAIN).unwrap());
        assert!(!life.peer_finished(now, DRAIN).unwrap(), "news only once");
        assert_eq!(life.phase(), Phase::Draining);
        // Output still queued: nothing yet.
        let step = life.advance(|| false);
        assert!(!step.shut_write && step.close.is_none(), "{step:?}");
        // Written: shut the write side and close, the peer's end came.
        let step = life.advance(|| true);
        assert!(step.shut_write);
        assert!(matches!(step.close, Some(Error::PeerClosed)));
        assert!(!life.drain_expired(now + DRAIN - Duration::from_millis(1)));
        assert!(life.drain_expired(now + DRAIN));
    }

    #[test]
    fn a_local_close_waits_for_the_peers_end_after_shutting_its_own() {
        let now = Instant::now();
        let mut life = Lifecycle::new(false);
        life.close_locally(now + DRAIN);
        let step = life.advance(|| true);
        assert!(step.shut_write && step.close.is_none(), "{step:?}");
        // The write side is shut once; the seal-off is not asked again.
        let step = life.advance(|| panic!("asked again"));
        assert!(step.close.is_none(), "{step:?}");
        assert!(life.peer_finished(now, DRAIN).unwrap());
        let step = life.advance(|| panic!("asked again"));
        assert!(!step.shut_write);
        assert!(matches!(step.close, Some(Error::Closed)));
        // The local deadline stands; the peer's end did not extend it.
        assert!(life.drain_expired(now + DRAIN));
    }

    #[test]
    fn a_connection_that_never_opened_closes_as_soon_as_it_is_flushed() {
        let mut life = Lifecycle::new(true);
        life.close_locally(Instant::now() + DRAIN);
        let step = life.advance(|| true);
        assert!(step.shut_write);
        assert!(matches!(step.close, Some(Error::Closed)));
    }

    #[test]
    fn an_open_connection_is_not_draining() {
        let mut life = Lifecycle::new(false);
        let step = life.advance(|| panic!("not closing"));
        assert!(!step.shut_write && step.close.is_none(), "{step:?}");
        assert!(!life.drain_expired(Instant::now() + Duration::from_secs(3600)));
    }
}
