//! Frame delimiting: finds where the next frame ends in a byte buffer, and
//! enforces the size limits from the 4-byte length prefix alone.
//!
//! The decoder never allocates and never trusts a length before checking it,
//! so a peer that claims a 4 GiB frame costs nothing but the four bytes it
//! sent.

use super::frame::{frame_len, LENGTH_PREFIX_LEN, MAX_WIRE_PAYLOAD, MIN_CIPHERTEXT_LEN};
use crate::error::{Error, Result};

/// What the decoder found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decoded {
    /// No complete frame yet; the buffer must hold at least this many bytes
    /// in total before the next call can make progress.
    NeedMore(usize),
    /// One complete frame of this many bytes (prefix included) starts the
    /// buffer.
    Frame(usize),
}

/// Delimits frames and enforces the maximum message size.
///
/// ```
/// use monte_rpc::protocol::wire::{Decoded, FrameDecoder};
/// let decoder = FrameDecoder::new(1024);
/// assert_eq!(decoder.decode(&[0, 0]).unwrap(), Decoded::NeedMore(4));
/// assert_eq!(decoder.decode(&[0, 0, 0, 20]).unwrap(), Decoded::NeedMore(24));
/// assert!(decoder.decode(&[0, 0, 0, 19]).is_err());
/// assert!(decoder.decode(&[0xff; 4]).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameDecoder {
    max_ciphertext: usize,
}

impl FrameDecoder {
    /// A decoder that accepts payloads of up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        let max_payload = max_payload.min(MAX_WIRE_PAYLOAD);
        FrameDecoder {
            max_ciphertext: max_payload + MIN_CIPHERTEXT_LEN,
        }
    }

    /// The largest payload this decoder accepts.
    pub fn max_payload(&self) -> usize {
        self.max_ciphertext - MIN_CIPHERTEXT_LEN
    }

    /// The largest whole frame (prefix included) this decoder accepts.
    pub fn max_frame_len(&self) -> usize {
        frame_len(self.max_payload())
    }

    /// Looks at the start of `buf` and says whether a whole frame is there.
    ///
    /// Errors ([`Error::FrameTooShort`], [`Error::FrameTooLarge`]) come from
    /// the prefix alone and are fatal for the connection.
    pub fn decode(&self, buf: &[u8]) -> Result<Decoded> {
        let Some(prefix) = buf.get(..LENGTH_PREFIX_LEN) else {
            return Ok(Decoded::NeedMore(LENGTH_PREFIX_LEN));
        };
        let len = u32::from_be_bytes(prefix.try_into().expect("4 bytes")) as usize;
        if len < MIN_CIPHERTEXT_LEN {
            return Err(Error::FrameTooShort { len });
        }
        if len > self.max_ciphertext {
            return Err(Error::FrameTooLarge {
                len,
                max: self.max_ciphertext,
            });
        }
        let total = LENGTH_PREFIX_LEN + len;
        if buf.len() < total {
            Ok(Decoded::NeedMore(total))
        } else {
            Ok(Decoded::Frame(total))
        }
    }
}
