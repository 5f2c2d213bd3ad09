//! How a reactor reads, dispatches and writes one connection: it drains
//! the socket into the connection's core, runs the handshake, dispatches
//! frames one at a time within the outbound budget (pausing reading past
//! it), flushes the queue, and advances a graceful close.

use crate::clock::now_nanos;
use crate::conn::Connection;
use crate::error::{socket_error, Error, Result, SocketOp};
use crate::handler::{guard_handler, Context, Handler};
use crate::outbound::Flushed;
use crate::protocol::connection::{ConnCore, Filled, Next, Output, ReadGate, Taker};
use crate::socket_write::write_all_briefly;
use crate::stats::Counters;
use crate::sync::completion::Delivered;

use super::Reactor;

/// Receive-buffer fills a reactor reads from one connection per turn.
/// Past them, the connection is read on in the next turn, after the
/// commands, the other connections' events and the replies they made: a
/// peer that sends faster than its handler keeps up, and so never lets the
/// socket empty, cannot keep the reactor from the rest.
const FILLS_PER_TURN: usize = 16;

/// What a reactor's handlers were given in one turn.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub(super) enum Served {
    /// Nothing (or only responses to waiting threads, which mostly read
    /// their responses themselves).
    Nothing,
    /// One-way messages: more are likely to follow, and nobody waits on
    /// them, so they are best read in batches.
    Messages,
    /// Responses handed to async callers (futures): nobody reads the
    /// next one but this reactor, and the executor's next request is
    /// likely to follow at once, so its response is best caught awake,
    /// as a peer's next request is.
    TaskResponses,
    /// Requests, answered at once: the peer waits for the answers, and its
    /// next request is likely to follow at once.
    Requests,
}

impl Reactor {
    /// Reads the connection if no caller is reading it. `bytes_only`: the
    /// readiness edge announced only bytes, so a short read ends the read
    /// (see [`Filled::Bytes`]).
    pub(super) fn on_readable(&mut self, key: usize, bytes_only: bool) {
        let conn = self.conns[key].conn.clone();
        let Some(mut inbound) = conn.shared.read.core.announce() else {
            // A caller is reading it, and reads again before it lets go.
            return;
        };
        conn.shared.read.apply_resume(&mut inbound);
        let mut fills_left = FILLS_PER_TURN;
        let result = loop {
            let read = self.read_all(key, &conn, &mut inbound, bytes_only, &mut fills_left);
            if read.is_err() || !self.conns.contains(key) {
                // Closing (on the error), or closed already (inside
                // `read_all`, while this turn was held): the close drops
                // the input, with the turn if it is free, else as its
                // holder lets go (this one, now, if it closed already).
                drop(inbound);
                break read;
            }
            // Nothing unread: the buffer goes back to the pool until the
            // next bytes come.
            inbound.lend_back(&self.shared.recv_buffers);
            match conn.shared.read.core.release(inbound) {
                // Bytes announced meanwhile: read on, unless this turn's
                // fills are used up (the next turn reads them).
                Some(again) => inbound = again,
                None => break Ok(()),
            }
        };
        if let Err(e) = result {
            self.close(key, e);
            return;
        }
        if fills_left == 0 {
            if let Some(entry) = self.conns.get_mut(key) {
                if !entry.read_queued {
                    entry.read_queued = true;
                    self.read_next_turn.push(key);
                }
            }
        }
        self.after_io(key);
    }

    /// Drains the socket into the receive buffer, processing frames as they
    /// complete (and first whatever a caller-thread reader left), for at
    /// most `fills_left` reads (counted down; at 0 it stops before the next
    /// read, with bytes perhaps left in the socket).
    pub(super) fn read_all(
        &mut self,
        key: usize,
        conn: &Connection,
        inbound: &mut ConnCore,
        bytes_only: bool,
        fills_left: &mut usize,
    ) -> Result<()> {
        let mut now = now_nanos();
        let mut drained = false;
        loop {
            if self.conns[key].life().read_paused() {
                return Ok(());
            }
            if !self.process(key, conn, inbound, now)? {
                // Over the outbound budget: the replies were flushed as far
                // as the socket took them. Reading stays paused (the frames
                // not yet dispatched stay in the buffer) until they drain;
                // if the socket took enough, go on. A queue closed over the
                // budget never drains (a graceful close seals only an
                // empty one): the connection closes now, with the queue's
                // reason, rather than at its Close command, which waits
                // for this turn to end.
                if !self.conns.contains(key) || self.conns[key].life().read_paused() {
                    return Ok(());
                }
                if conn.is_closed() {
                    return Err(conn.close_reason().unwrap_or(Error::Closed));
                }
                continue;
            }
            if inbound.eof {
                return self.on_end_of_stream(key);
            }
            if drained || *fills_left == 0 {
                return Ok(());
            }
            *fills_left -= 1;
            let filled = inbound.fill(&conn.shared.stream, now, &self.shared.recv_buffers);
            let filled =
                filled.map_err(|e| socket_error(SocketOp::Reading, conn.peer_addr(), e))?;
            match filled {
                Filled::Bytes { drained: d } => {
                    drained = d && bytes_only;
                    now = now_nanos();
                    conn.shared.read.note_read(now)
                }
                Filled::Eof => inbound.eof = true,
                Filled::WouldBlock => return Ok(()),
            }
        }
    }

    /// The peer finished sending (a half-close, as in its graceful
    /// shutdown). Replies to what it sent are still owed: flush them, then
    /// close.
    pub(super) fn on_end_of_stream(&mut self, key: usize) -> Result<()> {
        let finished = self.conns[key].peer_finished(now_nanos())?;
        if finished {
            self.dirty.push(key);
            self.sweep_within(self.drain_tick);
        }
        Ok(())
    }

    /// Runs the handshake, then dispatches what a caller-thread reader left
    /// and the complete frames in the receive buffer, one at a time, while
    /// the connection's queued output stays within `max_queued_bytes`
    /// (checked before each frame: the application's own sends, from its
    /// threads or from a handler, count as the replies do).
    /// Returns `false` if it stopped at the budget: the queue was flushed
    /// and, if the socket would not take it, reading is paused (see
    /// [`Reactor::flush`]); the rest of the frames wait in the buffer.
    pub(super) fn process(
        &mut self,
        key: usize,
        conn: &Connection,
        inbound: &mut ConnCore,
        now: u64,
    ) -> Result<bool> {
        if !inbound.is_open() {
            let (out, done) = inbound.step_handshake()?;
            let sent = !out.is_empty();
            if sent {
                // Small, on a fresh socket: one that cannot take it is
                // treated as dead.
                write_all_briefly(&conn.shared.stream, out)?;
            }
            let Some(done) = done else {
                if sent {
                    // Our part is out; the client's proof is awaited.
                    self.conns[key].awaiting_proof();
                }
                return Ok(true);
            };
            conn.set_peer_identity(done.peer_identity);
            conn.install_sealer(done.sealer);
            self.conns[key].opened();
            crate::events::opened(conn.id(), conn.role(), conn.peer_addr());
            let handler = self.conns[key].handler.clone();
            guard_handler(|| handler.on_open(conn))?;
        }
        let stats = &self.shared.stats;
        let entry = &self.conns[key];
        let (handler, life) = (&*entry.handler, entry.life());
        let mut dispatched = false;
        let mut served = Served::Nothing;
        let mut within_budget;
        let result = loop {
            // Before each frame, the first of the turn included: output
            // queued since the last check (a reply, a handler's own send,
            // an application thread's) would otherwise have one more reply
            // put on top of it (see `Lifecycle::within_budget`).
            within_budget = life.within_budget(conn.queued());
            if !within_budget {
                break Ok(());
            }
            // Read past by a caller before this reactor had the
            // connection: they came first.
            if let Some((seq, body)) = inbound.take_set_aside() {
                dispatched = true;
                if let Err(e) = handled(dispatch(conn, handler, seq, &body), &mut served) {
                    break Err(e);
                }
                continue;
            }
            match inbound.next_frame(now, Taker::Reactor) {
                Ok(Next::Response { seq, len }) => {
                    match conn.deliver_response(seq, inbound.consume_payload(len)) {
                        Delivered::Dropped => Counters::inc(&stats.responses_dropped),
                        Delivered::ToThread => {}
                        Delivered::ToTask => served = served.max(Served::TaskResponses),
                    }
                }
                Ok(Next::Message { seq, len }) => {
                    dispatched = true;
                    let result = dispatch(conn, handler, seq, inbound.payload(len));
                    inbound.consume(len);
                    if let Err(e) = handled(result, &mut served) {
                        break Err(e);
                    }
                }
                Ok(Next::NeedBytes | Next::ReactorsTurn) => break Ok(()),
                Err(e) => break Err(e),
            }
        };
        let (frames, bytes) = inbound.take_counts();
        if frames > 0 {
            Counters::add(&stats.frames_in, frames);
            Counters::add(&stats.bytes_in, bytes);
        }
        self.served = self.served.max(served);
        result?;
        // Past the budget after the last frame too: read no more now.
        within_budget = within_budget && (!dispatched || life.within_budget(conn.queued()));
        if !within_budget {
            self.flush(key);
            return Ok(false);
        }
        if dispatched {
            self.dirty.push(key);
        }
        Ok(true)
    }

    pub(super) fn on_writable(&mut self, key: usize) {
        self.flush(key);
    }

    pub(super) fn flush(&mut self, key: usize) {
        let entry = &mut self.conns[key];
        let flushed = entry.conn.flush_from_reactor(entry.life().hand_back_past());
        let output = match flushed {
            Flushed::Empty => Output::Drained,
            // Bytes wait for the next turn as they would for the socket:
            // reading is paused or resumed as it would be then.
            Flushed::Blocked(queued) | Flushed::More(queued) => Output::Blocked { queued },
            Flushed::Busy(queued) => Output::Writing { queued },
            Flushed::Closed => return self.after_io(key),
        };
        if matches!(flushed, Flushed::More(_)) && !entry.flush_queued {
            entry.flush_queued = true;
            self.flush_next_turn.push(key);
        }
        match entry.after_flush(output) {
            ReadGate::Paused => {
                Counters::inc(&self.shared.stats.reads_paused);
                let conn = &entry.conn;
                crate::events::reading_paused(
                    conn.id(),
                    conn.peer_addr(),
                    self.config.max_queued_bytes,
                );
            }
            ReadGate::Resumed => self.resume.push(key),
            ReadGate::Unchanged => {}
        }
        // Wait for the socket to take more only while it refused some.
        let blocked = matches!(flushed, Flushed::Blocked(_));
        if entry.writable != blocked {
            entry.writable = blocked;
            if let Err(e) = entry.conn.set_write_interest(blocked) {
                if blocked {
                    self.close(key, e.into());
                    return;
                }
            }
        }
        self.after_io(key);
    }

    pub(super) fn flush_dirty(&mut self) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for key in dirty.drain(..) {
            if self.conns.contains(key) {
                self.flush(key);
            }
        }
        self.dirty = dirty;
    }

    /// Advances a graceful close once output has drained.
    pub(super) fn after_io(&mut self, key: usize) {
        let Some(entry) = self.conns.get_mut(key) else {
            return;
        };
        let step = entry.advance();
        if step.shut_write {
            let _ = entry.conn.shared.stream.shutdown(std::net::Shutdown::Write);
        }
        if let Some(reason) = step.close {
            self.close(key, reason);
        }
    }
}

/// Notes what a dispatched message's handler did (`result`, from
/// [`dispatch`]) in `served`.
fn handled(result: Result<Served>, served: &mut Served) -> Result<()> {
    *served = (*served).max(result?);
    Ok(())
}

/// Calls the handler for one message, and says whether it replied at once
/// (a peer is waiting on this side).
fn dispatch(conn: &Connection, handler: &dyn Handler, seq: u32, payload: &[u8]) -> Result<Served> {
    let mut ctx = Context {
        conn,
        seq,
        body: payload,
        replied: false,
    };
    guard_handler(|| handler.on_message(&mut ctx))?;
    Ok(if ctx.replied {
        Served::Requests
    } else {
        Served::Messages
    })
}
