//! One connection's receiving side as a sans-IO state machine: the
//! receive buffer, the handshake or the opener, the frame limit, and the
//! deadlines that judge the peer (handshake, read, frame). No socket, no
//! thread and no clock: bytes come from any [`Read`] source, and the time
//! is passed in (a monotonic count of nanoseconds the driver chooses).
//!
//! The runtime keeps it behind the connection's read turn
//! (`crate::sync::read_turn::ReadTurn`): the reactor drives it when the
//! socket is readable, and a caller waiting for its response may drive it
//! too, so a response wakes one thread, not two. Both take frames from
//! [`ConnCore::open_next`]; what each does with one stays with it: the
//! reactor dispatches everything, a caller delivers responses and leaves
//! the rest as [`Held`] for the reactor, the only thread that runs the
//! handler. Either asks [`ConnCore::expired`] whether the peer ran out of
//! time. Sealing stays with the outbound queue, since many callers seal in
//! parallel under its lock.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::time::Duration;

use crate::error::{Error, HandshakeError, Result, TimeoutKind};
use crate::protocol::wire::{
    check_records, record_at, Decoded, FrameDecoder, SeqSpace, LENGTH_PREFIX_LEN,
    RECORD_HEADER_LEN, SEQ_LEN,
};
use crate::protocol::TAG_LEN;
use crate::protocol::{
    check_unconsumed, guard_handshake, read_handshake_input, Handshake, Opener, Role, Sealer,
};

/// A connection's receive buffer: bytes `start..end` are received and not
/// yet consumed. Made at its configured size on the first read, it grows
/// only for a frame larger than it, up to the maximum message size, and is
/// otherwise reused as is until the connection idles with it empty.
pub(crate) struct RecvBuf {
    pub(crate) buf: Vec<u8>,
    pub(crate) start: usize,
    pub(crate) end: usize,
    /// The size it is made at.
    size: usize,
}

impl RecvBuf {
    /// A buffer made at `size` bytes when first needed, holding `initial`
    /// (bytes read past the handshake) from the start.
    pub(crate) fn new(size: usize, initial: &[u8]) -> Self {
        let size = size.max(64);
        let buf = if initial.is_empty() {
            Vec::new()
        } else {
            let mut buf = vec![0; size.max(initial.len())];
            buf[..initial.len()].copy_from_slice(initial);
            buf
        };
        RecvBuf {
            buf,
            start: 0,
            end: initial.len(),
            size,
        }
    }

    /// Moves the unconsumed bytes to the front.
    fn compact(&mut self) {
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
    }

    /// The received, unconsumed bytes.
    pub(crate) fn unconsumed(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }
}

/// Where the read side is in the connection's life.
// The open state is the steady state and holds the opener inline, so each
// frame opens without an extra indirection; the handshake state is brief.
#[allow(clippy::large_enum_variant)]
pub enum ReadPhase {
    /// The handshake runs on the bytes received (see
    /// [`ConnCore::step_handshake`]).
    Handshaking {
        /// The handshake in progress.
        handshake: Box<dyn Handshake>,
    },
    /// Frames are opened with the session's opener.
    Open {
        /// Opens the peer's frames.
        opener: Opener,
    },
    /// Closed before the handshake finished: the handshake was dropped
    /// with the input ([`ConnCore::discard_input`]).
    Closed,
}

/// What a caller-thread reader stopped at and left to the reactor.
pub enum Held {
    /// A message (a request or a one-way message) at the buffer's start,
    /// `len` bytes long and already opened in place: only the reactor runs
    /// handlers.
    Message {
        /// Its sequence number.
        seq: u32,
        /// Its length on the wire.
        len: usize,
    },
    /// Reading or opening failed; the connection must close with this.
    Failed(Error),
}

/// The result of one read from the byte source.
pub enum Filled {
    /// Bytes arrived. `drained`: fewer than asked for, so the socket's
    /// receive queue was empty when the read returned; the next bytes to
    /// arrive raise a new readiness edge, and a reader may stop here
    /// instead of paying for a read that would only say `WouldBlock`.
    Bytes {
        /// The source had no more bytes for now.
        drained: bool,
    },
    /// The source ended (the peer closed its side).
    Eof,
    /// No bytes now.
    WouldBlock,
}

/// Who takes frames from the core, and so which frames it may take: the
/// one rule that differs between the reactor and a waiting caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Taker {
    /// The reactor, which runs the handler: every frame, starting with one
    /// a caller left.
    Reactor,
    /// A caller waiting for a response: responses only. The first message,
    /// an error or the end of the stream is left to the reactor.
    Caller,
}

/// What [`ConnCore::next_frame`] found. A frame is opened in place at the
/// buffer's start (see [`ConnCore::payload`]); consume it when done.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A request or one-way message from the peer, for the handler.
    Message {
        /// Its sequence number (0 for a one-way message).
        seq: u32,
        /// Its length on the wire.
        len: usize,
    },
    /// A response to one of this side's requests (its sequence number is
    /// one this side issues), for the request's completion slot.
    Response {
        /// Its sequence number.
        seq: u32,
        /// Its length on the wire.
        len: usize,
    },
    /// No complete frame: read more bytes.
    NeedBytes,
    /// (Callers only.) What comes next is the reactor's to handle.
    ReactorsTurn,
}

/// Where a core borrows its receive buffer from and gives it back to (the
/// runtime's per-reactor pool), so that a connection holds one only while
/// it has unread bytes.
pub trait Buffers {
    /// A buffer given back earlier, if there is one.
    fn take(&self) -> Option<Vec<u8>>;
    /// A buffer no longer needed.
    fn give(&self, buf: Vec<u8>);
}

/// Buffers allocated when needed and freed when given back: for a core
/// driven without a pool (tests, fuzzing).
#[derive(Debug, Default, Clone, Copy)]
pub struct Unpooled;

impl Buffers for Unpooled {
    fn take(&self) -> Option<Vec<u8>> {
        None
    }
    fn give(&self, _buf: Vec<u8>) {}
}

/// What a core is held to, from `Config`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// The receive buffer's size, made when first needed.
    pub buffer_size: usize,
    /// Frames carrying more than this are refused from their length prefix.
    pub max_message_size: usize,
    /// How long the peer may take.
    pub deadlines: Deadlines,
}

/// How long the peer may take, from `Config`; `None` disables one.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Deadlines {
    /// From the core's creation to the end of the handshake.
    pub handshake: Option<Duration>,
    /// Between two reads that bring bytes, once open.
    pub read: Option<Duration>,
    /// From the first byte of a frame to its last.
    pub frame: Option<Duration>,
}

/// The receiving side of one connection; see the module docs.
pub struct ConnCore {
    pub(crate) phase: ReadPhase,
    pub(crate) rbuf: RecvBuf,
    /// The one owner of the frame limit: refuses a frame from its length
    /// prefix alone.
    decoder: FrameDecoder,
    /// The largest message accepted: a bundled frame's records are held
    /// to it (its frame may be larger, up to the bundle limit).
    max_message: usize,
    /// Bytes of the bundled frame being read that follow the buffer's
    /// start: its records not yet taken and its tag. The message taken
    /// last was the record before them; 0 when none is being read.
    bundle_left: usize,
    /// Where the payload of the message taken last lies, from the start
    /// the buffer had then (consumed or not): its offset and length.
    current: (usize, usize),
    /// The end of the stream was read (it reads as the end again, but the
    /// reactor must not miss it when a caller saw it first).
    pub(crate) eof: bool,
    pub(crate) held: Option<Held>,
    deadlines: Deadlines,
    /// Tells responses (numbered by this side) from the peer's messages.
    ours: SeqSpace,
    /// When the core was made: the handshake deadline counts from here.
    started: u64,
    /// When bytes last arrived.
    last_read: u64,
    /// When the partial frame the buffer ends in was first seen, if it
    /// ends in one.
    partial_since: Option<u64>,
    /// Frames opened and their wire bytes, since the driver last took the
    /// counts ([`take_counts`](ConnCore::take_counts)).
    opened: (u64, u64),
    /// Handshake output owed to the peer, reused between steps.
    handshake_out: Vec<u8>,
    /// The peer's messages a caller read past before any reactor had the
    /// connection (a dialled connection's `on_open` waiting for a response
    /// behind them), copied out of the buffer, in order: the reactor
    /// dispatches them before anything else. Each counts its wire length
    /// and its entry (`set_aside_charge`) against `set_aside_limit`, which
    /// one message of the largest size fills.
    set_aside: VecDeque<(u32, Vec<u8>)>,
    set_aside_bytes: usize,
    set_aside_limit: usize,
}

/// What the handshake gives the rest of the connection once it is done.
#[derive(Debug)]
pub struct Handshaken {
    /// Seals what this side sends (the outbound queue's).
    pub sealer: Sealer,
    /// The long-term key the peer proved, if the handshake authenticated
    /// one.
    pub peer_identity: Option<[u8; 32]>,
}

/// What a message set aside counts against its limit: its frame's length
/// on the wire and its entry in the queue, so that a flood of empty
/// messages is bounded as well as a few large ones.
fn set_aside_charge(frame_len: usize) -> usize {
    frame_len + std::mem::size_of::<(u32, Vec<u8>)>()
}

/// The frame limit for a core in `phase`: bundled frames may be larger
/// than one message's (up to the bundle limit).
fn decoder_for(phase: &ReadPhase, max_message: usize) -> FrameDecoder {
    let bundles = matches!(phase, ReadPhase::Open { opener } if opener.bundles());
    FrameDecoder::for_direction(max_message, bundles)
}

impl ConnCore {
    /// The core of `role`'s side of a connection, in `phase`, made at
    /// `now`; its receive buffer holds `leftover` (bytes read past a
    /// dialled handshake) from the start.
    pub fn new(phase: ReadPhase, role: Role, limits: Limits, leftover: &[u8], now: u64) -> Self {
        ConnCore {
            decoder: decoder_for(&phase, limits.max_message_size),
            phase,
            rbuf: RecvBuf::new(limits.buffer_size, leftover),
            max_message: limits.max_message_size,
            bundle_left: 0,
            current: (0, 0),
            eof: false,
            held: None,
            deadlines: limits.deadlines,
            ours: SeqSpace::new(role, 1),
            started: now,
            last_read: now,
            partial_since: None,
            opened: (0, 0),
            handshake_out: Vec::new(),
            set_aside: VecDeque::new(),
            set_aside_bytes: 0,
            // One message of the largest size always fits.
            set_aside_limit: set_aside_charge(
                limits.max_message_size.max(limits.buffer_size)
                    + LENGTH_PREFIX_LEN
                    + SEQ_LEN
                    + TAG_LEN,
            ),
        }
    }

    /// Runs the handshake on the bytes received, at the server's side of a
    /// connection: returns the bytes to send the peer now (maybe none)
    /// and, once the handshake is complete, what the rest of the
    /// connection needs; the core is then open, and the frames that
    /// followed the handshake wait in the buffer. An authenticated server
    /// completes only once the client proved the key. Does nothing once
    /// open.
    pub fn step_handshake(&mut self) -> Result<(&[u8], Option<Handshaken>)> {
        self.handshake_out.clear();
        let most = self.decoder.max_frame_len().max(self.rbuf.size);
        let ReadPhase::Handshaking { handshake } = &mut self.phase else {
            return Ok((&self.handshake_out, None));
        };
        let rb = &mut self.rbuf;
        let out = &mut self.handshake_out;
        // The handshake may run application code (a custom handshake, an
        // allow-list callback) on the driver's thread, a reactor serving
        // other connections: its panic fails this handshake only.
        let session = guard_handshake(|| {
            if rb.end > rb.start {
                let used = read_handshake_input(handshake.as_mut(), rb.unconsumed())?;
                rb.start += used;
            }
            handshake.write_output(out);
            Ok(handshake.take_session())
        })?;
        let Some(session) = session else {
            check_unconsumed(rb.end - rb.start, most)?;
            return Ok((&self.handshake_out, None));
        };
        let finished = std::mem::replace(
            &mut self.phase,
            ReadPhase::Open {
                opener: session.opener,
            },
        );
        self.decoder = decoder_for(&self.phase, self.max_message);
        // Its drop is the handshake's code too.
        guard_handshake(move || {
            drop(finished);
            Ok(())
        })?;
        let done = Handshaken {
            sealer: session.sealer,
            peer_identity: session.peer_identity,
        };
        Ok((&self.handshake_out, Some(done)))
    }

    /// The next frame `taker` may take, at `now`: the one read loop both
    /// drivers run (feed bytes with [`fill`](Self::fill) on
    /// [`Next::NeedBytes`]). A frame a caller may not take stays opened in
    /// place as [`Held`] for the reactor, which takes it first; so does a
    /// failure a caller meets, while the reactor gets it as the error.
    pub fn next_frame(&mut self, now: u64, taker: Taker) -> Result<Next> {
        match taker {
            Taker::Reactor => match self.held.take() {
                Some(Held::Failed(e)) => Err(e),
                Some(Held::Message { seq, len }) => Ok(Next::Message { seq, len }),
                None => Ok(match self.open_counted(now)? {
                    Some((seq, len)) => self.classify(seq, len),
                    None => Next::NeedBytes,
                }),
            },
            Taker::Caller => {
                if self.held.is_some() || self.eof || !self.is_open() {
                    return Ok(Next::ReactorsTurn);
                }
                match self.open_counted(now) {
                    Ok(Some((seq, len))) => match self.classify(seq, len) {
                        Next::Message { seq, len } => {
                            self.held = Some(Held::Message { seq, len });
                            Ok(Next::ReactorsTurn)
                        }
                        response => Ok(response),
                    },
                    Ok(None) => Ok(Next::NeedBytes),
                    Err(e) => {
                        self.held = Some(Held::Failed(e));
                        Ok(Next::ReactorsTurn)
                    }
                }
            }
        }
    }

    /// A response if this side issued `seq`, else a message for the
    /// handler.
    fn classify(&self, seq: u32, len: usize) -> Next {
        if self.ours.is_ours(seq) {
            Next::Response { seq, len }
        } else {
            Next::Message { seq, len }
        }
    }

    /// [`open_next`](Self::open_next), counting what it opens.
    fn open_counted(&mut self, now: u64) -> Result<Option<(u32, usize)>> {
        let opened = self.open_next(now)?;
        if let Some((_, len)) = opened {
            self.opened.0 += 1;
            self.opened.1 += len as u64;
        }
        Ok(opened)
    }

    /// Frames opened and their wire bytes since the last call: the driver
    /// adds them to its counters once per read, not once per frame.
    pub fn take_counts(&mut self) -> (u64, u64) {
        std::mem::take(&mut self.opened)
    }

    /// One read from `source` into the buffer's free space, at `now`, of
    /// at most the buffer size (or the rest of a partial frame, if more).
    /// A connection without a buffer borrows one from `buffers` (or makes
    /// one). A buffer full of one partial frame grows as its bytes arrive,
    /// up to the largest frame, never to a length the peer merely claimed.
    pub fn fill(
        &mut self,
        mut source: impl Read,
        now: u64,
        buffers: &impl Buffers,
    ) -> io::Result<Filled> {
        let max_frame_len = self.decoder.max_frame_len();
        let rb = &mut self.rbuf;
        if rb.buf.is_empty() {
            rb.buf = match buffers.take() {
                Some(mut buf) => {
                    // Lent at the pool's size, which is this buffer size:
                    // no bytes to clear.
                    buf.resize(rb.size, 0);
                    buf
                }
                None => vec![0; rb.size],
            };
        } else if rb.end == rb.buf.len() {
            if rb.start > 0 {
                rb.compact();
            } else {
                let handshaking = matches!(self.phase, ReadPhase::Handshaking { .. });
                let most = max_frame_len.max(rb.size);
                if handshaking && rb.buf.len() >= most {
                    // `step_handshake` fails such a handshake first; this
                    // keeps the buffer from growing if it was not asked.
                    let held = rb.buf.len();
                    let e = HandshakeError::LeftUnconsumed { held };
                    return Err(io::Error::new(io::ErrorKind::InvalidData, e.to_string()));
                }
                let grown = (rb.buf.len() * 2).min(max_frame_len.max(rb.buf.len() + 1));
                rb.buf.resize(grown, 0);
            }
        }
        // One read takes a buffer size of bytes at most, or the rest of the
        // partial frame at the buffer's start if that is more: a buffer
        // grown for one large frame must not let each read take in (and a
        // reactor's turn then dispatch) a large frame's worth of small
        // ones, which would multiply the per-turn read budget.
        let partial_end = match (&self.phase, rb.end > rb.start) {
            // The buffer starts with a bundle's records, not a frame.
            _ if self.bundle_left > 0 => rb.end,
            (ReadPhase::Open { .. }, true) => {
                match self.decoder.decode(&rb.buf[rb.start..rb.end]) {
                    Ok(Decoded::NeedMore(total)) => rb.start + total,
                    _ => rb.end,
                }
            }
            _ => rb.end,
        };
        let read_end = (rb.end + rb.size).max(partial_end).min(rb.buf.len());
        loop {
            return match source.read(&mut rb.buf[rb.end..read_end]) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    let drained = rb.end + n < read_end;
                    rb.end += n;
                    self.last_read = now;
                    Ok(Filled::Bytes { drained })
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(Filled::WouldBlock),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
        }
    }

    /// Decodes and opens, in place, the next complete frame in the buffer:
    /// its sequence number and length, or `None` until more bytes arrive.
    /// Only in the open phase. A frame left partial at `now` starts the
    /// frame deadline (once per frame, not per read).
    pub fn open_next(&mut self, now: u64) -> Result<Option<(u32, usize)>> {
        let ReadPhase::Open { opener } = &mut self.phase else {
            return Ok(None);
        };
        let rb = &mut self.rbuf;
        if self.bundle_left > 0 {
            // The next record of a bundle opened (and checked) already.
            let rest = &rb.buf[rb.start..rb.start + self.bundle_left - TAG_LEN];
            let (seq, len) = record_at(rest, self.max_message)?;
            self.current = (RECORD_HEADER_LEN, len);
            return Ok(Some((seq, self.take_record(RECORD_HEADER_LEN + len))));
        }
        match self.decoder.decode(&rb.buf[rb.start..rb.end])? {
            Decoded::Frame(n) => {
                self.partial_since = None;
                let frame = &mut rb.buf[rb.start..rb.start + n];
                if !opener.bundles() {
                    let (seq, payload) = opener.open_in_place(frame)?;
                    self.current = (LENGTH_PREFIX_LEN + SEQ_LEN, payload.len());
                    return Ok(Some((seq, n)));
                }
                let plain = opener.open_frame_in_place(frame)?;
                // Every record is checked before the first is taken, so a
                // malformed bundle delivers none of its messages.
                let (seq, len) = check_records(plain, self.max_message)?;
                self.current = (LENGTH_PREFIX_LEN + RECORD_HEADER_LEN, len);
                self.bundle_left = n;
                Ok(Some((
                    seq,
                    self.take_record(LENGTH_PREFIX_LEN + RECORD_HEADER_LEN + len),
                )))
            }
            Decoded::NeedMore(total) => {
                if rb.start != rb.end && self.partial_since.is_none() {
                    self.partial_since = Some(now);
                }
                if rb.start == rb.end {
                    rb.start = 0;
                    rb.end = 0;
                } else if rb.start + total > rb.buf.len() {
                    // Room for the rest comes from moving the partial frame
                    // to the front; growing is `fill`'s, as bytes arrive.
                    rb.compact();
                }
                Ok(None)
            }
        }
    }

    /// Takes `used` bytes of the bundle being read as the next message's:
    /// returns the length to consume for it, which covers the frame's tag
    /// too if it is the last record.
    fn take_record(&mut self, used: usize) -> usize {
        self.bundle_left -= used;
        if self.bundle_left == TAG_LEN {
            self.bundle_left = 0;
            used + TAG_LEN
        } else {
            used
        }
    }

    /// The payload of the message taken last ([`open_next`](Self::open_next)),
    /// `len` bytes at the buffer's start, not yet consumed.
    pub fn payload(&self, len: usize) -> &[u8] {
        debug_assert!(self.current.0 + self.current.1 <= len);
        self.payload_at(self.rbuf.start)
    }

    /// The payload of the message taken last, which lay at `start` in the
    /// buffer.
    fn payload_at(&self, start: usize) -> &[u8] {
        let (offset, len) = self.current;
        &self.rbuf.buf[start + offset..start + offset + len]
    }

    /// Drops the frame of `len` bytes at the buffer's start.
    pub fn consume(&mut self, len: usize) {
        self.rbuf.start += len;
    }

    /// Drops the frame of `len` bytes at the buffer's start and returns its
    /// payload, which stays readable while the borrow lasts (nothing is
    /// read into the buffer meanwhile). For a taker whose use of the
    /// payload may unwind (a task's waker that panics as its response is
    /// delivered): the frame is consumed already, so whoever reads next
    /// does not open it again, with the next nonce.
    pub fn consume_payload(&mut self, len: usize) -> &[u8] {
        let start = self.rbuf.start;
        self.rbuf.start += len;
        self.payload_at(start)
    }

    /// Copies the held message out of the buffer and drops it there, for a
    /// caller that must read on past it while no reactor could run the
    /// handler: a dialled connection's `on_open` waiting for a response
    /// the peer sent after a message of its own. `false`, and nothing
    /// changes, if no message is held or it would take the messages set
    /// aside past their limit: each counts its length on the wire plus its
    /// queue entry, and one message of the larger of the frame limit and
    /// the buffer's size fits.
    pub fn set_aside_held(&mut self) -> bool {
        let Some(Held::Message { seq, len }) = self.held else {
            return false;
        };
        // Charged as an unbundled frame of its payload, as it is taken back.
        let charge = set_aside_charge(self.current.1 + LENGTH_PREFIX_LEN + SEQ_LEN + TAG_LEN);
        if self.set_aside_bytes + charge > self.set_aside_limit {
            return false;
        }
        self.set_aside_bytes += charge;
        let body = self.payload(len).to_vec();
        self.set_aside.push_back((seq, body));
        self.held = None;
        self.consume(len);
        true
    }

    /// The oldest message set aside ([`set_aside_held`](Self::set_aside_held)),
    /// its sequence number and payload: the reactor dispatches these first.
    pub fn take_set_aside(&mut self) -> Option<(u32, Vec<u8>)> {
        let (seq, body) = self.set_aside.pop_front()?;
        let len = body.len() + LENGTH_PREFIX_LEN + SEQ_LEN + TAG_LEN;
        self.set_aside_bytes -= set_aside_charge(len);
        if self.set_aside.is_empty() {
            // A flood of small messages grew it: the memory goes.
            self.set_aside = VecDeque::new();
        }
        Some((seq, body))
    }

    /// How many bytes of messages may be set aside, their framing and
    /// entries counted ([`set_aside_held`](Self::set_aside_held)).
    pub fn set_aside_limit(&self) -> usize {
        self.set_aside_limit
    }

    /// Whether messages set aside wait for the reactor.
    pub fn has_set_aside(&self) -> bool {
        !self.set_aside.is_empty()
    }

    /// Gives the receive buffer's memory back if it holds no bytes.
    /// Gives the receive buffer back to `buffers` if it holds no unread
    /// bytes and is of the size it was lent at; a buffer grown for a large
    /// frame stays (the next large frame needs it too) until the
    /// connection idles ([`release_buffer_if_empty`](Self::release_buffer_if_empty)).
    pub fn lend_back(&mut self, buffers: &impl Buffers) {
        let rb = &mut self.rbuf;
        if rb.start == rb.end && self.held.is_none() && rb.buf.len() == rb.size {
            rb.start = 0;
            rb.end = 0;
            buffers.give(std::mem::take(&mut rb.buf));
        }
    }

    /// Discards the input at the connection's close: the receive buffer is
    /// freed, unread bytes, a held frame and all, a handshake still running
    /// is dropped, and the input counts as ended (nothing reads on). The
    /// handle may live on for long.
    pub fn discard_input(&mut self) {
        if matches!(self.phase, ReadPhase::Handshaking { .. }) {
            let unfinished = std::mem::replace(&mut self.phase, ReadPhase::Closed);
            // Its drop is the handshake's code, run on the closing thread
            // (a reactor serving other connections): a panic in it ends
            // nothing more than this connection, closed already.
            let _ = guard_handshake(move || {
                drop(unfinished);
                Ok(())
            });
        }
        let rb = &mut self.rbuf;
        rb.buf = Vec::new();
        rb.start = 0;
        rb.end = 0;
        self.held = None;
        self.bundle_left = 0;
        self.set_aside = VecDeque::new();
        self.set_aside_bytes = 0;
        self.eof = true;
    }

    /// Frees the receive buffer if it holds no unread bytes.
    pub fn release_buffer_if_empty(&mut self) {
        let rb = &mut self.rbuf;
        if rb.start == rb.end && self.held.is_none() {
            rb.buf = Vec::new();
            rb.start = 0;
            rb.end = 0;
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self.phase, ReadPhase::Open { .. })
    }

    /// Which deadline the peer has run out of at `now`, if any. While
    /// `reading_paused` (this side stopped reading: its output is over
    /// budget, or it is closing) the silence is this side's, and only the
    /// handshake deadline applies.
    pub fn expired(&self, now: u64, reading_paused: bool) -> Option<TimeoutKind> {
        let past = |since: u64, limit: Option<Duration>| {
            limit.is_some_and(|t| now.saturating_sub(since) >= nanos(t))
        };
        if !self.is_open() {
            return past(self.started, self.deadlines.handshake).then_some(TimeoutKind::Handshake);
        }
        if reading_paused {
            return None;
        }
        if past(self.last_read, self.deadlines.read) {
            return Some(TimeoutKind::Read);
        }
        match self.partial_since {
            Some(since) if past(since, self.deadlines.frame) => Some(TimeoutKind::Frame),
            _ => None,
        }
    }

    /// The earliest time at which [`expired`](Self::expired) may answer
    /// something (with reading not paused), for a driver that waits.
    pub fn next_deadline(&self) -> Option<u64> {
        let at =
            |since: u64, limit: Option<Duration>| limit.map(|t| since.saturating_add(nanos(t)));
        if !self.is_open() {
            return at(self.started, self.deadlines.handshake);
        }
        let frame = self
            .partial_since
            .and_then(|since| at(since, self.deadlines.frame));
        match (at(self.last_read, self.deadlines.read), frame) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Bytes that a read waited for arrived at `now` (a clock reading
    /// taken after that read, later than the one it was given): the peer's
    /// silence ended then. A partial frame's deadline stays where it was.
    pub fn note_bytes_at(&mut self, now: u64) {
        self.last_read = self.last_read.max(now);
    }

    /// Reading resumes at `now` after a pause: the peer's deadlines count
    /// from here, not from before the pause, whose silence was this side's.
    pub fn resume(&mut self, now: u64) {
        self.last_read = self.last_read.max(now);
        if let Some(since) = &mut self.partial_since {
            *since = (*since).max(now);
        }
    }

    /// Bytes received and not yet consumed.
    pub fn buffered(&self) -> usize {
        self.rbuf.end - self.rbuf.start
    }

    /// The receive buffer's size now: the memory a peer made this
    /// connection hold for its input.
    pub fn buffer_len(&self) -> usize {
        self.rbuf.buf.len()
    }

    /// When bytes last arrived.
    pub fn last_read(&self) -> u64 {
        self.last_read
    }
}

mod lifecycle;

pub use lifecycle::{
    Advance, Expired, LifeLimits, Lifecycle, Output, Phase, Progress, ReadGate, Sealed,
};

/// A duration in nanoseconds, saturating: a timeout too long for a u64
/// of them (585 years) lasts forever rather than wrapping.
pub(crate) fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests;
