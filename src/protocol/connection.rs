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

use std::io::{self, Read};
use std::time::Duration;

use crate::error::{Error, Result, TimeoutKind};
use crate::protocol::TAG_LEN;
use crate::protocol::{Decoded, FrameDecoder, Handshake, Opener, LENGTH_PREFIX_LEN, SEQ_LEN};

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
    /// The handshake runs on the bytes received.
    Handshaking {
        /// The handshake in progress.
        handshake: Box<dyn Handshake>,
        /// Handshake output, reused between steps.
        out: Vec<u8>,
    },
    /// Frames are opened with the session's opener.
    Open {
        /// Opens the peer's frames.
        opener: Opener,
    },
}

/// What a caller-thread reader stopped at and left to the reactor.
pub enum Held {
    /// A frame at the buffer's start, `len` bytes long and already opened
    /// in place, that is not a response: only the reactor runs handlers.
    Frame {
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
#[derive(Clone, Copy)]
pub enum Taker<'a> {
    /// The reactor, which runs the handler: every frame, starting with one
    /// a caller left.
    Reactor,
    /// A caller waiting for a response: only frames `is_response` accepts.
    /// The first other frame, an error or the end of the stream is left to
    /// the reactor.
    Caller {
        /// Whether a sequence number answers one of this side's requests.
        is_response: &'a dyn Fn(u32) -> bool,
    },
}

/// What [`ConnCore::next_frame`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// A frame of `len` bytes at the buffer's start, opened in place (see
    /// [`ConnCore::payload`]); consume it when done.
    Frame {
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
    /// The end of the stream was read (it reads as the end again, but the
    /// reactor must not miss it when a caller saw it first).
    pub(crate) eof: bool,
    pub(crate) held: Option<Held>,
    deadlines: Deadlines,
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
}

impl ConnCore {
    /// A core in `phase`, whose receive buffer is made at `buffer_size`
    /// bytes when first needed and holds `leftover` (bytes read past a
    /// dialled handshake) from the start; frames above `max_message_size`
    /// are refused.
    pub fn new(
        phase: ReadPhase,
        buffer_size: usize,
        leftover: &[u8],
        max_message_size: usize,
        deadlines: Deadlines,
        now: u64,
    ) -> Self {
        ConnCore {
            phase,
            rbuf: RecvBuf::new(buffer_size, leftover),
            decoder: FrameDecoder::new(max_message_size),
            eof: false,
            held: None,
            deadlines,
            started: now,
            last_read: now,
            partial_since: None,
            opened: (0, 0),
        }
    }

    /// The next frame `taker` may take, at `now`: the one read loop both
    /// drivers run (feed bytes with [`fill`](Self::fill) on
    /// [`Next::NeedBytes`]). A frame a caller may not take stays opened in
    /// place as [`Held`] for the reactor, which takes it first; so does a
    /// failure a caller meets, while the reactor gets it as the error.
    pub fn next_frame(&mut self, now: u64, taker: Taker<'_>) -> Result<Next> {
        match taker {
            Taker::Reactor => match self.held.take() {
                Some(Held::Failed(e)) => Err(e),
                Some(Held::Frame { seq, len }) => Ok(Next::Frame { seq, len }),
                None => Ok(match self.open_counted(now)? {
                    Some((seq, len)) => Next::Frame { seq, len },
                    None => Next::NeedBytes,
                }),
            },
            Taker::Caller { is_response } => {
                if self.held.is_some() || self.eof || !self.is_open() {
                    return Ok(Next::ReactorsTurn);
                }
                match self.open_counted(now) {
                    Ok(Some((seq, len))) if is_response(seq) => Ok(Next::Frame { seq, len }),
                    Ok(Some((seq, len))) => {
                        self.held = Some(Held::Frame { seq, len });
                        Ok(Next::ReactorsTurn)
                    }
                    Ok(None) => Ok(Next::NeedBytes),
                    Err(e) => {
                        self.held = Some(Held::Failed(e));
                        Ok(Next::ReactorsTurn)
                    }
                }
            }
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

    /// One read from `source` into the buffer's free space, at `now`. A
    /// connection without a buffer borrows one from `buffers` (or makes
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
                let grown = (rb.buf.len() * 2).min(max_frame_len.max(rb.buf.len() + 1));
                rb.buf.resize(grown, 0);
            }
        }
        loop {
            return match source.read(&mut rb.buf[rb.end..]) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    let drained = rb.end + n < rb.buf.len();
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
        match self.decoder.decode(&rb.buf[rb.start..rb.end])? {
            Decoded::Frame(n) => {
                self.partial_since = None;
                let (seq, _) = opener.open_in_place(&mut rb.buf[rb.start..rb.start + n])?;
                Ok(Some((seq, n)))
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

    /// The plaintext of the opened frame of `len` bytes at the buffer's
    /// start.
    pub fn payload(&self, len: usize) -> &[u8] {
        let start = self.rbuf.start;
        &self.rbuf.buf[start + LENGTH_PREFIX_LEN + SEQ_LEN..start + len - TAG_LEN]
    }

    /// Drops the frame of `len` bytes at the buffer's start.
    pub fn consume(&mut self, len: usize) {
        self.rbuf.start += len;
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
            limit.is_some_and(|t| now.saturating_sub(since) >= t.as_nanos() as u64)
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
        let at = |since: u64, limit: Option<Duration>| {
            limit.map(|t| since.saturating_add(t.as_nanos() as u64))
        };
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

#[cfg(test)]
mod tests {
    //! The core alone: bytes from memory, time as plain numbers.

    use super::*;
    use crate::protocol::{Profile, Sealer, ServerHandshake};

    const MS: u64 = 1_000_000;
    const KEY: [u8; 32] = [7; 32];

    /// A byte source that hands out at most `chunk` bytes a read, then
    /// would block.
    struct Chunks<'a> {
        data: &'a [u8],
        chunk: usize,
    }

    impl Read for Chunks<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            if self.data.is_empty() {
                return Err(io::ErrorKind::WouldBlock.into());
            }
            let n = self.chunk.min(buf.len()).min(self.data.len());
            buf[..n].copy_from_slice(&self.data[..n]);
            self.data = &self.data[n..];
            Ok(n)
        }
    }

    fn deadlines() -> Deadlines {
        Deadlines {
            handshake: Some(Duration::from_millis(50)),
            read: Some(Duration::from_millis(1000)),
            frame: Some(Duration::from_millis(100)),
        }
    }

    fn open_core(max_message: usize, buffer: usize) -> ConnCore {
        let phase = ReadPhase::Open {
            opener: Opener::new(KEY, Profile::Secure),
        };
        ConnCore::new(phase, buffer, &[], max_message, deadlines(), 0)
    }

    fn sealed(frames: &[(u32, &[u8])]) -> Vec<u8> {
        let mut sealer = Sealer::new(KEY, Profile::Secure);
        let mut wire = Vec::new();
        for (seq, body) in frames {
            sealer.seal_append(*seq, body, &mut wire).unwrap();
        }
        wire
    }

    /// Feeds `wire` in reads of at most `chunk` bytes at time `now`, and
    /// returns every frame opened, in order.
    fn drain(core: &mut ConnCore, wire: &[u8], chunk: usize, now: u64) -> Vec<(u32, Vec<u8>)> {
        let mut source = Chunks { data: wire, chunk };
        let mut out = Vec::new();
        loop {
            while let Some((seq, len)) = core.open_next(now).unwrap() {
                out.push((seq, core.payload(len).to_vec()));
                core.consume(len);
            }
            match core.fill(&mut source, now, &Unpooled).unwrap() {
                Filled::Bytes { .. } => {}
                Filled::WouldBlock | Filled::Eof => return out,
            }
        }
    }

    #[test]
    fn every_split_of_the_input_opens_the_same_frames() {
        let big = vec![0xab; 300];
        let frames: [(u32, &[u8]); 4] = [(1, b"one"), (0, b""), (3, &big), (5, b"last")];
        let wire = sealed(&frames);
        let expected: Vec<(u32, Vec<u8>)> = frames.iter().map(|(s, b)| (*s, b.to_vec())).collect();
        for chunk in 1..=wire.len() {
            // A buffer smaller than the largest frame: it must grow for it.
            let mut core = open_core(1024, 64);
            assert_eq!(
                drain(&mut core, &wire, chunk, 0),
                expected,
                "reads of {chunk}"
            );
            assert!(core.expired(0, false).is_none());
        }
    }

    #[test]
    fn a_frame_over_the_limit_is_refused_from_its_prefix() {
        let mut core = open_core(1024, 64);
        let claimed = (1024 + crate::protocol::MIN_CIPHERTEXT_LEN + 1) as u32;
        let mut source = Chunks {
            data: &claimed.to_be_bytes(),
            chunk: 4,
        };
        core.fill(&mut source, 0, &Unpooled).unwrap();
        assert!(matches!(
            core.open_next(0),
            Err(Error::FrameTooLarge { .. })
        ));
    }

    #[test]
    fn a_claimed_length_never_grows_the_buffer() {
        let mut core = open_core(1 << 20, 64);
        let claimed = (1 << 20) as u32;
        let mut partial = claimed.to_be_bytes().to_vec();
        partial.extend_from_slice(&[0; 196]);
        let got = drain(&mut core, &partial, 4096, 0);
        assert!(got.is_empty());
        // Grown as the 200 bytes came (doubling from 64), not to 1 MiB.
        let len = core.rbuf.buf.len();
        assert!((200..=400).contains(&len), "buffer of {len} bytes");
    }

    #[test]
    fn a_trickled_frame_expires_at_the_frame_deadline() {
        let mut core = open_core(1 << 20, 64);
        let wire = sealed(&[(1, &[0x55; 200])]);
        // The prefix at 0 ms, then a byte every 10 ms: each read is far
        // inside the read deadline, so only the frame deadline can end it.
        drain(&mut core, &wire[..4], 4, 0);
        let mut t = 0;
        for (i, byte) in wire[4..40].iter().enumerate() {
            t = (i as u64 + 1) * 10 * MS;
            assert!(drain(&mut core, std::slice::from_ref(byte), 1, t).is_empty());
            let want = (t >= 100 * MS).then_some(TimeoutKind::Frame);
            assert_eq!(core.expired(t, false), want, "at {} ms", t / MS);
        }
        assert_eq!(core.next_deadline(), Some(100 * MS));
        // Completing the frame ends its deadline.
        let rest = drain(&mut core, &wire[40..], 4096, t);
        assert_eq!(rest.len(), 1);
        assert_eq!(core.expired(t, false), None);
    }

    #[test]
    fn silence_expires_at_the_read_deadline() {
        let mut core = open_core(1024, 64);
        drain(&mut core, &sealed(&[(1, b"hi")]), 4096, 300 * MS);
        assert_eq!(core.expired(1299 * MS, false), None);
        assert_eq!(core.expired(1300 * MS, false), Some(TimeoutKind::Read));
        assert_eq!(core.next_deadline(), Some(1300 * MS));
    }

    #[test]
    fn paused_reading_restarts_the_peer_deadlines() {
        let mut core = open_core(1024, 64);
        let wire = sealed(&[(1, b"hello")]);
        drain(&mut core, &wire[..6], 6, 0);
        // Paused (this side is not reading): nothing is the peer's fault.
        assert_eq!(core.expired(5000 * MS, true), None);
        core.resume(5000 * MS);
        assert_eq!(core.expired(5099 * MS, false), None);
        assert_eq!(core.expired(5100 * MS, false), Some(TimeoutKind::Frame));
    }

    #[test]
    fn the_handshake_deadline_counts_from_creation() {
        let handshake = Box::new(ServerHandshake::new(Profile::Secure).unwrap());
        let phase = ReadPhase::Handshaking {
            handshake,
            out: Vec::new(),
        };
        let core = ConnCore::new(phase, 64, &[], 1024, deadlines(), 10 * MS);
        assert_eq!(core.expired(59 * MS, false), None);
        assert_eq!(core.expired(60 * MS, false), Some(TimeoutKind::Handshake));
        // Paused reading does not stop a handshake's clock.
        assert_eq!(core.expired(60 * MS, true), Some(TimeoutKind::Handshake));
        assert_eq!(core.next_deadline(), Some(60 * MS));
    }

    /// A pool that records what it lends and gets back.
    #[derive(Default)]
    struct Pool {
        free: std::cell::RefCell<Vec<Vec<u8>>>,
        given: std::cell::Cell<usize>,
    }

    impl Buffers for Pool {
        fn take(&self) -> Option<Vec<u8>> {
            self.free.borrow_mut().pop()
        }
        fn give(&self, buf: Vec<u8>) {
            self.given.set(self.given.get() + 1);
            self.free.borrow_mut().push(buf);
        }
    }

    #[test]
    fn the_buffer_is_held_only_while_bytes_are_unread() {
        let pool = Pool::default();
        pool.free.borrow_mut().push(vec![0xee; 64]);
        let mut core = open_core(1024, 64);
        let all = sealed(&[(1, b"one"), (3, b"two"), (5, &[1; 500])]);
        let two_frames = crate::protocol::frame_len(3) * 2;
        let (wire, big) = all.split_at(two_frames);
        let cut = wire.len() - 5;
        // A read that ends inside a frame: the buffer must stay.
        let mut source = Chunks {
            data: &wire[..cut],
            chunk: 4096,
        };
        core.fill(&mut source, 0, &pool).unwrap();
        assert_eq!(core.buffer_len(), 64, "the pool's buffer, not a new one");
        while let Some((_, len)) = core.open_next(0).unwrap() {
            core.consume(len);
        }
        core.lend_back(&pool);
        assert_eq!(
            pool.given.get(),
            0,
            "gave back a buffer holding a partial frame"
        );
        // The rest arrives; once everything is read, the buffer goes back.
        let mut source = Chunks {
            data: &wire[cut..],
            chunk: 4096,
        };
        core.fill(&mut source, 0, &pool).unwrap();
        let (seq, len) = core.open_next(0).unwrap().unwrap();
        assert_eq!((seq, core.payload(len)), (3, &b"two"[..]));
        core.consume(len);
        core.lend_back(&pool);
        assert_eq!(pool.given.get(), 1);
        assert_eq!(core.buffer_len(), 0, "an idle core holds no buffer");
        // A buffer grown for a large frame stays with the connection.
        drain(&mut core, big, 4096, 0);
        assert!(core.buffer_len() > 64);
        core.lend_back(&pool);
        assert_eq!(pool.given.get(), 1);
        core.release_buffer_if_empty();
        assert_eq!(core.buffer_len(), 0);
    }

    #[test]
    fn a_caller_takes_responses_only_and_leaves_the_rest_to_the_reactor() {
        let mut core = open_core(1024, 4096);
        // Even sequence numbers answer this side's requests here.
        let wire = sealed(&[(2, b"r1"), (4, b"r2"), (7, b"request"), (6, b"r3")]);
        let mut source = Chunks {
            data: &wire,
            chunk: 4096,
        };
        core.fill(&mut source, 0, &Unpooled).unwrap();
        let even = |seq: u32| seq % 2 == 0 && seq != 0;
        let caller = Taker::Caller { is_response: &even };
        let mut taken = Vec::new();
        loop {
            match core.next_frame(0, caller).unwrap() {
                Next::Frame { seq, len } => {
                    taken.push(seq);
                    core.consume(len);
                }
                other => {
                    assert_eq!(other, Next::ReactorsTurn);
                    break;
                }
            }
        }
        assert_eq!(taken, [2, 4]);
        // The caller stays out until the reactor took the held request.
        assert_eq!(core.next_frame(0, caller).unwrap(), Next::ReactorsTurn);
        let Next::Frame { seq, len } = core.next_frame(0, Taker::Reactor).unwrap() else {
            panic!("the reactor did not get the held frame first");
        };
        assert_eq!((seq, core.payload(len)), (7, &b"request"[..]));
        core.consume(len);
        let Next::Frame { seq, len } = core.next_frame(0, caller).unwrap() else {
            panic!("the caller was not let back in");
        };
        assert_eq!(seq, 6);
        core.consume(len);
        assert_eq!(core.next_frame(0, caller).unwrap(), Next::NeedBytes);
        // Each frame counted once, by whoever opened it.
        assert_eq!(core.take_counts().0, 4);
        assert_eq!(core.take_counts(), (0, 0));
    }

    #[test]
    fn a_callers_error_is_the_reactors_to_report() {
        let mut core = open_core(1024, 64);
        let mut wire = sealed(&[(2, b"ok")]);
        let last = wire.len() - 1;
        wire[last] ^= 1;
        let mut source = Chunks {
            data: &wire,
            chunk: 4096,
        };
        core.fill(&mut source, 0, &Unpooled).unwrap();
        let any = |_: u32| true;
        let caller = Taker::Caller { is_response: &any };
        assert_eq!(core.next_frame(0, caller).unwrap(), Next::ReactorsTurn);
        assert!(matches!(
            core.next_frame(0, Taker::Reactor),
            Err(Error::Authentication)
        ));
    }

    #[test]
    fn disabled_deadlines_never_expire() {
        let phase = ReadPhase::Open {
            opener: Opener::new(KEY, Profile::Secure),
        };
        let mut core = ConnCore::new(phase, 64, &[], 1024, Deadlines::default(), 0);
        drain(&mut core, &sealed(&[(1, b"x")])[..3], 3, 0);
        assert_eq!(core.expired(u64::MAX, false), None);
        assert_eq!(core.next_deadline(), None);
    }
}
