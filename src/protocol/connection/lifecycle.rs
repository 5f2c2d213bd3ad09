//! A connection's life on its reactor's side, as a sans-IO state machine:
//! its phase (handshaking, confirming, open, draining: a graceful close that flushes
//! what is queued, shuts the write side and waits for the peer's end), the
//! outbound budget that pauses reading, and the timers that judge this
//! side's progress (write, drain) or give an idle connection's buffers
//! back. No I/O and no clock: the reactor reports what happened, with the
//! time in nanoseconds, and does what the answer says.
//!
//! The peer's deadlines (handshake, read, frame) belong to the receive
//! side, [`ConnCore`](super::ConnCore), which a waiting caller may drive as
//! well; this half only the reactor drives.

use std::time::Duration;

use super::nanos;
use crate::error::{Error, HandshakeError, Result, TimeoutKind};

/// Where a connection is in its life. Closed is its end: the reactor
/// then removes it, with the reason (from [`Lifecycle::advance`],
/// [`Lifecycle::handle_timeout`], the receive side or the socket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The server side of the handshake runs: the client's key is awaited.
    Handshaking,
    /// (Authenticated profiles.) This side sent its part of the handshake
    /// and waits for the client's proof (its key confirmation or identity
    /// frame); a peer without the key stays here until the handshake
    /// deadline.
    Confirming,
    /// Frames flow both ways.
    Open,
    /// Closing gracefully, until the deadline at the latest.
    Draining,
}

/// The limits a connection's life is held to, from `Config`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LifeLimits {
    /// Output queued past this pauses reading the peer (`max_queued_bytes`).
    pub max_queued: usize,
    /// Queued output that makes no progress for this long closes the
    /// connection (`write_timeout`); `None` waits forever.
    pub write: Option<Duration>,
    /// How long a graceful close may take (`drain_timeout`).
    pub drain: Duration,
    /// No byte in or out for this long gives the buffers back.
    pub idle_release: Duration,
}

/// What the outbound queue reported after the reactor flushed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// Everything queued is written.
    Drained,
    /// The socket took what it could; this many bytes wait for it.
    Blocked {
        /// Bytes still queued.
        queued: usize,
    },
    /// Another thread is writing the queue, which holds this many bytes.
    Writing {
        /// Bytes still queued.
        queued: usize,
    },
}

/// What a flush means for reading the peer ([`Lifecycle::after_flush`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadGate {
    /// As it was.
    Unchanged,
    /// Stop reading: the peer makes this side queue more than its budget.
    Paused,
    /// Read again: the queue drained. Bytes that came meanwhile were
    /// announced no more (edge-triggered): read now.
    Resumed,
}

/// What the reactor observed of a connection, for its timers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// Bytes written so far.
    pub written: u64,
    /// Output waits to be written.
    pub pending: bool,
    /// When bytes last arrived (the receive side's clock).
    pub last_read: u64,
}

/// What [`Lifecycle::handle_timeout`] decided.
#[derive(Debug, Default)]
pub struct Expired {
    /// Close the connection with this.
    pub close: Option<Error>,
    /// Nothing moved for a while: give the buffers back.
    pub release_buffers: bool,
}

/// What sealing off a connection's output found, in a graceful close
/// ([`Lifecycle::advance`]).
#[derive(Debug)]
pub enum Sealed {
    /// Output is still queued: not yet.
    Pending,
    /// Everything queued is written, and no more is taken.
    Drained,
    /// The output had failed already, with this error (a write the peer
    /// cut short): the close is that failure's, not an orderly one.
    Failed(Error),
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
    limits: LifeLimits,
    handshaking: bool,
    /// This side's part of the handshake is sent; the peer's proof is
    /// awaited.
    confirming: bool,
    /// Set while closing gracefully: the close ends by then at the latest.
    drain_deadline: Option<u64>,
    /// The peer has shut its write side (its end of stream was read).
    peer_done: bool,
    /// This side has shut its write side.
    write_shut: bool,
    /// This side began the close (its shutdown), so the end is orderly.
    local: bool,
    /// Reading is paused until queued output drains.
    read_paused: bool,
    /// Bytes written when last seen to change, and when.
    write_watch: (u64, u64),
    /// Bytes written and last read when either last changed, and when.
    activity: (u64, u64, u64),
    /// The buffers were given back since the last activity.
    released: bool,
}

impl Lifecycle {
    /// A connection handed to its reactor at `now`, still `handshaking` or
    /// open.
    pub fn new(handshaking: bool, limits: LifeLimits, now: u64) -> Self {
        Lifecycle {
            limits,
            handshaking,
            confirming: false,
            drain_deadline: None,
            peer_done: false,
            write_shut: false,
            local: false,
            read_paused: false,
            write_watch: (0, now),
            activity: (0, 0, now),
            released: false,
        }
    }

    /// Where the connection is.
    pub fn phase(&self) -> Phase {
        if self.drain_deadline.is_some() {
            Phase::Draining
        } else if self.handshaking && self.confirming {
            Phase::Confirming
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

    /// This side sent its part of the handshake and the handshake goes on:
    /// the peer's proof is awaited.
    pub fn awaiting_proof(&mut self) {
        self.confirming = self.handshaking;
    }

    /// The handshake completed: the connection is open.
    pub fn opened(&mut self) {
        self.handshaking = false;
        self.confirming = false;
    }

    /// Whether the reactor may dispatch another frame with `queued` bytes
    /// queued. Replies made on the reactor queue without waiting for room
    /// (its thread is the one that would drain the queue), so the budget
    /// is checked before each frame: a peer that pipelines requests and
    /// never reads makes this side hold at most one reply past it, and no
    /// frame is dispatched while output the application queued holds the
    /// connection past it (a large frame the application queues while a
    /// handler runs can still precede that handler's reply).
    pub fn within_budget(&self, queued: usize) -> bool {
        queued <= self.limits.max_queued
    }

    /// The queued bytes past which a thread writing the queue hands it
    /// back to the reactor when done: the reactor pauses reading until
    /// then ([`Output::Writing`]).
    pub fn hand_back_past(&self) -> usize {
        self.limits.max_queued
    }

    /// The reactor flushed the queue: whether reading pauses (the peer
    /// sends requests faster than it reads the replies) or resumes.
    pub fn after_flush(&mut self, output: Output) -> ReadGate {
        let over = |queued: usize| queued > self.limits.max_queued;
        match output {
            Output::Blocked { queued } | Output::Writing { queued } if over(queued) => {
                if self.read_paused {
                    ReadGate::Unchanged
                } else {
                    self.read_paused = true;
                    ReadGate::Paused
                }
            }
            // The socket is full, within budget: reading stays as it is
            // until the writable edge flushes again.
            Output::Blocked { .. } => ReadGate::Unchanged,
            Output::Writing { .. } | Output::Drained => {
                if self.read_paused {
                    self.read_paused = false;
                    ReadGate::Resumed
                } else {
                    ReadGate::Unchanged
                }
            }
        }
    }

    /// Whether reading is paused for the outbound budget.
    pub fn read_paused(&self) -> bool {
        self.read_paused
    }

    /// Whether this side stopped reading (its budget, or its close): the
    /// silence is then its own, not the peer's.
    pub fn silence_is_ours(&self) -> bool {
        self.read_paused || self.drain_deadline.is_some()
    }

    /// The peer's end of stream arrived at `now`. During the handshake that
    /// fails it; once open, replies to what the peer sent are still owed,
    /// so the connection drains. Returns whether this is news (the reactor
    /// then flushes).
    pub fn peer_finished(&mut self, now: u64) -> Result<bool> {
        if self.handshaking {
            return Err(HandshakeError::PeerClosed.into());
        }
        if self.peer_done {
            return Ok(false);
        }
        self.peer_done = true;
        self.drain_from(now);
        Ok(true)
    }

    /// This side closes gracefully from `now` (a close already under way
    /// keeps its own deadline).
    pub fn close_locally(&mut self, now: u64) {
        self.local = true;
        self.drain_from(now);
    }

    fn drain_from(&mut self, now: u64) {
        let drain = nanos(self.limits.drain);
        self.drain_deadline.get_or_insert(now.saturating_add(drain));
    }

    /// One step of a graceful close. `seal_off` refuses further output and
    /// says whether everything queued is written; it is asked only until
    /// it says so. Then the write side is shut, and the connection closes
    /// once the peer's end came too (or at once if it never opened). If
    /// the output had failed instead, the connection closes at once with
    /// that failure.
    pub fn advance(&mut self, seal_off: impl FnOnce() -> Sealed) -> Advance {
        let mut step = Advance {
            shut_write: false,
            close: None,
        };
        if self.drain_deadline.is_none() {
            return step;
        }
        if !self.write_shut {
            match seal_off() {
                Sealed::Pending => return step,
                Sealed::Failed(failure) => {
                    step.close = Some(failure);
                    return step;
                }
                Sealed::Drained => {}
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

    /// The timers at `now`, given what the reactor sees of the connection:
    /// a graceful close out of time, queued output that made no progress
    /// for the write timeout (a peer that stopped reading), and an idle
    /// connection whose buffers can go back (once per idle spell).
    pub fn handle_timeout(&mut self, now: u64, seen: Progress) -> Expired {
        let mut out = Expired::default();
        if self.drain_deadline.is_some_and(|deadline| now >= deadline) {
            out.close = Some(Error::Closed);
            return out;
        }
        let (written, last_read) = (seen.written, seen.last_read);
        if (written, last_read) != (self.activity.0, self.activity.1) {
            self.activity = (written, last_read, now);
            self.released = false;
        } else if !self.released
            && now.saturating_sub(self.activity.2) >= nanos(self.limits.idle_release)
        {
            self.released = true;
            out.release_buffers = true;
        }
        if !seen.pending || written != self.write_watch.0 {
            self.write_watch = (written, now);
        } else if self
            .limits
            .write
            .is_some_and(|t| now.saturating_sub(self.write_watch.1) >= nanos(t))
        {
            out.close = Some(Error::Timeout(TimeoutKind::Write));
        }
        out
    }
}

#[cfg(test)]
mod tests;
