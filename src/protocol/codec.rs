//! Frame delimiting: finds where the next frame ends in a byte buffer, and
//! enforces the size limits from the 4-byte length prefix alone.
//!
//! The decoder never allocates and never trusts a length before checking it,
//! so a peer that claims a 4 GiB frame costs nothing but the four bytes it
//! sent.

use super::frame::{
    frame_len, BUNDLE_LIMIT, LENGTH_PREFIX_LEN, MAX_WIRE_PAYLOAD, MIN_CIPHERTEXT_LEN,
    RECORD_HEADER_LEN, TAG_LEN,
};
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
    /// The message size the limit comes from, for the error.
    max_message: usize,
}

impl FrameDecoder {
    /// A decoder that accepts payloads of up to `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        let max_payload = max_payload.min(MAX_WIRE_PAYLOAD);
        FrameDecoder {
            max_ciphertext: max_payload + MIN_CIPHERTEXT_LEN,
            max_message: max_payload,
        }
    }

    /// A decoder for a bundled direction (PROTOCOL.md, "Bundled frames")
    /// whose messages are at most `max_payload` bytes: it takes a frame of
    /// one such message in a record, or of records filling
    /// [`BUNDLE_LIMIT`], whichever is larger.
    ///
    /// ```
    /// use monte_rpc::protocol::wire::FrameDecoder;
    /// assert_eq!(FrameDecoder::new(1024).max_frame_len(), 4 + 4 + 1024 + 16);
    /// assert_eq!(FrameDecoder::bundled(1024).max_frame_len(), 16 << 10);
    /// assert_eq!(FrameDecoder::bundled(1 << 20).max_frame_len(), 4 + 8 + (1 << 20) + 16);
    /// ```
    pub fn bundled(max_payload: usize) -> Self {
        let max_plain = max_payload
            .min(MAX_WIRE_PAYLOAD - RECORD_HEADER_LEN)
            .saturating_add(RECORD_HEADER_LEN)
            .max(BUNDLE_LIMIT);
        FrameDecoder {
            max_ciphertext: max_plain + TAG_LEN,
            max_message: max_payload.min(MAX_WIRE_PAYLOAD - RECORD_HEADER_LEN),
        }
    }

    /// The decoder for a direction whose opener bundles or not.
    pub fn for_direction(max_payload: usize, bundles: bool) -> Self {
        if bundles {
            Self::bundled(max_payload)
        } else {
            Self::new(max_payload)
        }
    }

    /// The largest payload a frame this decoder accepts can carry: one
    /// unbundled message's, or a bundle's records'.
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
                max_message: self.max_message,
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
