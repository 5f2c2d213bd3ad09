//! The reactor's view of one connection: the connection, its handler, its
//! life (the sans-IO [`Lifecycle`]), and whether the reactor waits for the
//! socket to take output. The life changes only through the entry, which
//! mirrors whose the peer's silence is to the read side at each change
//! that moves it: a pause or resume for the budget, the peer's end, this
//! side's close (see [`Entry::after_flush`]; the others, the handshake's
//! steps, the timers, a close's advance, leave it as it was).

use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_nanos;
use crate::config::Config;
use crate::conn::Connection;
use crate::error::{Error, Result};
use crate::handler::Handler;
use crate::protocol::connection::{Advance, LifeLimits, Lifecycle, Output, Progress, ReadGate};

/// How long a connection must see no byte in or out before its buffers are
/// given back: long enough that a connection in use keeps them (no
/// allocation per message), short enough that thousands of idle
/// connections cost little.
const IDLE_RELEASE: Duration = Duration::from_secs(1);

/// One connection as its reactor holds it.
pub(super) struct Entry {
    pub(super) conn: Connection,
    /// Gets the connection's messages and life events.
    pub(super) handler: Arc<dyn Handler>,
    /// Its phase, budget and timers (see [`Lifecycle`]): read through
    /// [`life`](Self::life), changed through the entry's methods.
    life: Lifecycle,
    /// The reactor waits for the socket to take more output.
    pub(super) writable: bool,
    /// Its reads ran out of a turn's fills and it waits in the reactor's
    /// list to be read on: it is put there once, and its readiness events
    /// meanwhile are left to that read.
    pub(super) read_queued: bool,
    /// Its flush used up a turn's write rounds and it waits in the
    /// reactor's list to be flushed again: put there once.
    pub(super) flush_queued: bool,
}

impl Entry {
    /// A connection just handed to the reactor at `now` (nanoseconds on
    /// the connection clock).
    pub(super) fn new(
        conn: Connection,
        handler: Arc<dyn Handler>,
        handshaking: bool,
        config: &Config,
        now: u64,
    ) -> Entry {
        let limits = LifeLimits {
            max_queued: config.max_queued_bytes,
            write: config.write_timeout,
            drain: config.drain_timeout,
            idle_release: IDLE_RELEASE,
        };
        Entry {
            conn,
            handler,
            life: Lifecycle::new(handshaking, limits, now),
            writable: false,
            read_queued: false,
            flush_queued: false,
        }
    }

    /// The connection's life, to look at.
    pub(super) fn life(&self) -> &Lifecycle {
        &self.life
    }

    /// This side sent its part of the handshake (see
    /// [`Lifecycle::awaiting_proof`]).
    pub(super) fn awaiting_proof(&mut self) {
        self.life.awaiting_proof();
    }

    /// The handshake completed (see [`Lifecycle::opened`]).
    pub(super) fn opened(&mut self) {
        self.life.opened();
    }

    /// One step of a graceful close, sealing off the connection's output
    /// once it drained (see [`Lifecycle::advance`]).
    pub(super) fn advance(&mut self) -> Advance {
        let conn = &self.conn;
        self.life.advance(|| conn.seal_off_if_drained())
    }

    /// The reactor flushed the queue (see [`Lifecycle::after_flush`]). This
    /// and the peer's end and this side's close are what make the peer's
    /// silence this side's or the peer's again: each is mirrored to the
    /// read side (`ReadSide::note_silence`), where a caller holding the
    /// read turn judges the peer's deadlines, with the resume's time.
    pub(super) fn after_flush(&mut self, output: Output) -> ReadGate {
        let gate = self.life.after_flush(output);
        match gate {
            ReadGate::Paused => self.mirror_silence(None),
            ReadGate::Resumed => self.mirror_silence(Some(now_nanos())),
            ReadGate::Unchanged => {}
        }
        gate
    }

    /// The peer's end of stream arrived at `now` (see
    /// [`Lifecycle::peer_finished`]); mirrored as in
    /// [`after_flush`](Self::after_flush).
    pub(super) fn peer_finished(&mut self, now: u64) -> Result<bool> {
        let news = self.life.peer_finished(now)?;
        self.mirror_silence(None);
        Ok(news)
    }

    /// This side closes gracefully from `now` (see
    /// [`Lifecycle::close_locally`]); mirrored as in
    /// [`after_flush`](Self::after_flush).
    pub(super) fn close_locally(&mut self, now: u64) {
        self.life.close_locally(now);
        self.mirror_silence(None);
    }

    /// Tells the read side whose the silence is now, and when reading
    /// resumed if it just did.
    fn mirror_silence(&self, resumed_at: Option<u64>) {
        let ours = self.life.silence_is_ours();
        self.conn.shared.read.note_silence(ours, resumed_at);
    }

    /// The sweep at `now`: the error to close the connection with if one of
    /// its deadlines passed. This side's (graceful close, write) are the
    /// lifecycle's; the peer's (handshake, read, frame) are the receive
    /// side's, asked under the read turn (a caller holding the turn asks
    /// them itself). Gives the buffers of a connection idle for a while
    /// back, and says so in `released`.
    pub(super) fn sweep(&mut self, now: u64, released: &mut bool) -> Option<Error> {
        let (written, pending) = self.conn.write_progress();
        let seen = Progress {
            written,
            pending,
            last_read: self.conn.shared.read.last_read(),
        };
        let timers = self.life.handle_timeout(now, seen);
        if let Some(Error::Closed) = timers.close {
            // The graceful close ran out of time.
            return timers.close;
        }
        let release = timers.release_buffers;
        let paused = self.life.silence_is_ours();
        let conn = &self.conn;
        let timeout = conn
            .with_idle_core(|core| {
                if release {
                    core.lend_back(conn.recv_buffers());
                    core.release_buffer_if_empty();
                }
                core.expired(now, paused)
            })
            .flatten();
        if release {
            self.conn.release_idle_out_buffers();
            *released = true;
        }
        // The peer's deadlines first: a peer that neither sends nor reads
        // is closed for its silence rather than for the replies it left
        // unread.
        timeout.map(Error::Timeout).or(timers.close)
    }
}
