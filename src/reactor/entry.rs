//! The reactor's view of one connection: its handler, where it is in its
//! life (handshaking, open, draining, closed), whether reading is paused,
//! and the watches the sweep judges it by.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::conn::Connection;
use crate::error::{Error, TimeoutKind};
use crate::handler::Handler;
use crate::protocol::connection::{Lifecycle, Phase};

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
    /// Handshaking, open or draining (see [`Lifecycle`]).
    pub(super) life: Lifecycle,
    /// The reactor waits for the socket to take more output.
    pub(super) writable: bool,
    /// Reading is paused until queued output drains (backpressure).
    pub(super) read_paused: bool,
    /// Reading resumed after a pause: the core's deadlines restart at the
    /// next read (see [`ConnCore::resume`]).
    pub(super) resumed: bool,
    /// (bytes written, when that count was last seen to change)
    pub(super) write_watch: (u64, Instant),
    /// (bytes written, last read, when either last changed), and whether
    /// the buffers were given back since: the idle-release watch.
    pub(super) activity: (u64, u64, Instant),
    pub(super) buffers_released: bool,
}

impl Entry {
    /// A connection just handed to the reactor at `now`.
    pub(super) fn new(
        conn: Connection,
        handler: Arc<dyn Handler>,
        handshaking: bool,
        now: Instant,
    ) -> Entry {
        Entry {
            conn,
            handler,
            life: Lifecycle::new(handshaking),
            writable: false,
            resumed: false,
            write_watch: (0, now),
            activity: (0, 0, now),
            buffers_released: false,
            read_paused: false,
        }
    }

    /// The sweep at `now` (`now_nanos` on the connection clock): the error
    /// to close the connection with if one of its deadlines passed. The
    /// graceful-close and write deadlines are the reactor's; the peer's
    /// (handshake, read, frame) are the core's, asked under the read turn
    /// (a caller holding the turn asks them itself). Gives the buffers of a
    /// connection idle for a while back.
    /// Sets `released` if it gave buffers back.
    pub(super) fn sweep(
        &mut self,
        now: Instant,
        now_nanos: u64,
        write_timeout: Option<Duration>,
        released: &mut bool,
    ) -> Option<Error> {
        if self.life.drain_expired(now) {
            return Some(Error::Closed);
        }
        let last_read = self.conn.shared.read.last_read();
        let (written, pending) = self.conn.write_progress();
        let active = (written, last_read) != (self.activity.0, self.activity.1);
        if active {
            self.activity = (written, last_read, now);
            self.buffers_released = false;
        }
        let release = !active
            && !self.buffers_released
            && now.duration_since(self.activity.2) >= IDLE_RELEASE;
        // While reading is paused the silence is ours, and the write
        // timeout judges the peer.
        let paused = self.read_paused || self.life.phase() == Phase::Draining;
        let conn = &self.conn;
        let timeout = conn
            .with_idle_core(|core| {
                if release {
                    core.lend_back(conn.recv_buffers());
                    core.release_buffer_if_empty();
                }
                core.expired(now_nanos, paused)
            })
            .flatten();
        if release {
            self.conn.release_idle_out_buffers();
            self.buffers_released = true;
            *released = true;
        }
        if let Some(kind) = timeout {
            return Some(Error::Timeout(kind));
        }
        if !pending || written != self.write_watch.0 {
            self.write_watch = (written, now);
        } else if write_timeout.is_some_and(|t| now.duration_since(self.write_watch.1) >= t) {
            return Some(Error::Timeout(TimeoutKind::Write));
        }
        None
    }
}
