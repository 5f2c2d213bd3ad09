//! A connection's read side: its receive buffer, the handshake or the
//! opener, and what a caller-thread reader left for the reactor to finish.
//!
//! It sits behind the connection's
//! [`ReadTurn`](crate::sync::read_turn::ReadTurn): the reactor reads it when
//! the socket is readable, and a caller waiting for its response may read it
//! too (see [`crate::conn`]), so a response wakes one thread, not two. The
//! pieces both need (one read from the socket, the next opened frame) live
//! here; what each does with a frame stays with it: the reactor dispatches
//! everything, a caller delivers responses and leaves the rest as
//! [`Held`] for the reactor, the only thread that runs the handler.

use std::io::{self, Read};

use mio::net::TcpStream;

use crate::error::{Error, Result};
use crate::protocol::TAG_LEN;
use crate::protocol::{Decoded, FrameDecoder, Handshake, Opener, LENGTH_PREFIX_LEN, SEQ_LEN};
use crate::sync::{AtomicU64, Ordering};

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
pub(crate) enum ReadPhase {
    Handshaking {
        handshake: Box<dyn Handshake>,
        /// Handshake output, reused between steps.
        out: Vec<u8>,
    },
    Open {
        opener: Opener,
    },
}

/// What a caller-thread reader stopped at and left to the reactor.
pub(crate) enum Held {
    /// A frame at the buffer's start, `len` bytes long and already opened
    /// in place, that is not a response: only the reactor runs handlers.
    Frame { seq: u32, len: usize },
    /// Reading or opening failed; the connection must close with this.
    Failed(Error),
}

/// The result of one read from the socket.
pub(crate) enum Filled {
    /// Bytes arrived. `drained`: fewer than asked for, so the socket's
    /// receive queue was empty when the read returned; the next bytes to
    /// arrive raise a new readiness edge, and a reader may stop here
    /// instead of paying for a read that would only say `WouldBlock`.
    Bytes {
        drained: bool,
    },
    Eof,
    WouldBlock,
}

pub(crate) struct Inbound {
    pub(crate) phase: ReadPhase,
    pub(crate) rbuf: RecvBuf,
    /// The end of the stream was read (it reads as the end again, but the
    /// reactor must not miss it when a caller saw it first).
    pub(crate) eof: bool,
    pub(crate) held: Option<Held>,
    /// The buffer ends in part of a frame, whose start was stamped on the
    /// connection's frame clock (see [`Inbound::open_next`]).
    partial: bool,
}

impl Inbound {
    pub(crate) fn new(phase: ReadPhase, buffer_size: usize, leftover: &[u8]) -> Self {
        Inbound {
            phase,
            rbuf: RecvBuf::new(buffer_size, leftover),
            eof: false,
            held: None,
            partial: false,
        }
    }

    /// One read from the socket into the buffer's free space. A buffer full
    /// of one partial frame grows as its bytes arrive, up to
    /// `max_frame_len`, never to a length the peer merely claimed.
    pub(crate) fn fill(
        &mut self,
        mut stream: &TcpStream,
        max_frame_len: usize,
    ) -> io::Result<Filled> {
        let rb = &mut self.rbuf;
        if rb.buf.is_empty() {
            rb.buf = vec![0; rb.size];
        } else if rb.end == rb.buf.len() {
            if rb.start > 0 {
                rb.compact();
            } else {
                let grown = (rb.buf.len() * 2).min(max_frame_len.max(rb.buf.len() + 1));
                rb.buf.resize(grown, 0);
            }
        }
        loop {
            return match stream.read(&mut rb.buf[rb.end..]) {
                Ok(0) => Ok(Filled::Eof),
                Ok(n) => {
                    let drained = rb.end + n < rb.buf.len();
                    rb.end += n;
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
    /// Only in the open phase.
    ///
    /// `frame_clock` holds when the partial frame at the buffer's end was
    /// first seen ([`now_nanos`](crate::clock::now_nanos)), or 0 when the
    /// buffer ends on a frame boundary: the reactor closes a connection
    /// whose frame takes longer than the frame timeout to complete. It is
    /// stamped once per partial frame, not per read.
    pub(crate) fn open_next(
        &mut self,
        decoder: &FrameDecoder,
        frame_clock: &AtomicU64,
    ) -> Result<Option<(u32, usize)>> {
        let ReadPhase::Open { opener } = &mut self.phase else {
            return Ok(None);
        };
        let rb = &mut self.rbuf;
        match decoder.decode(&rb.buf[rb.start..rb.end])? {
            Decoded::Frame(n) => {
                if self.partial {
                    self.partial = false;
                    frame_clock.store(0, Ordering::Relaxed);
                }
                let (seq, _) = opener.open_in_place(&mut rb.buf[rb.start..rb.start + n])?;
                Ok(Some((seq, n)))
            }
            Decoded::NeedMore(total) => {
                if rb.start != rb.end && !self.partial {
                    self.partial = true;
                    frame_clock.store(crate::clock::now_nanos().max(1), Ordering::Relaxed);
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
    pub(crate) fn payload(&self, len: usize) -> &[u8] {
        let start = self.rbuf.start;
        &self.rbuf.buf[start + LENGTH_PREFIX_LEN + SEQ_LEN..start + len - TAG_LEN]
    }

    /// Drops the frame of `len` bytes at the buffer's start.
    pub(crate) fn consume(&mut self, len: usize) {
        self.rbuf.start += len;
    }

    /// Gives the receive buffer's memory back if it holds no bytes.
    pub(crate) fn release_buffer_if_empty(&mut self) {
        let rb = &mut self.rbuf;
        if rb.start == rb.end && self.held.is_none() {
            rb.buf = Vec::new();
            rb.start = 0;
            rb.end = 0;
        }
    }

    pub(crate) fn is_open(&self) -> bool {
        matches!(self.phase, ReadPhase::Open { .. })
    }
}
