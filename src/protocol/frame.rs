//! Sealed frames: one direction's AES-256-GCM key, its counter nonce and its
//! rekey schedule, sealing and opening frames in place.
//!
//! A frame on the wire is `length:u32 || AES-256-GCM(seq:u32 || payload)`,
//! with the 16-byte tag at the end and the nonce `counter:u64 || 0u32`.
//! Each direction has one [`Sealer`] on the sending side and one [`Opener`]
//! on the receiving side; their counters advance in lock step, so the n-th
//! frame sent must be the n-th frame received.

use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM, NONCE_LEN};

use super::keys::{rekey, Profile, KEY_LEN};
use crate::error::{Error, Result};

/// Bytes of the big-endian length prefix.
pub const LENGTH_PREFIX_LEN: usize = 4;
/// Bytes of the sequence number at the start of the plaintext.
pub const SEQ_LEN: usize = 4;
/// Bytes of the AES-GCM tag at the end of the ciphertext.
pub const TAG_LEN: usize = 16;
/// The smallest valid ciphertext: a sequence number and a tag.
pub const MIN_CIPHERTEXT_LEN: usize = SEQ_LEN + TAG_LEN;
/// Bytes a frame adds to its payload: prefix, sequence number and tag.
pub const FRAME_OVERHEAD: usize = LENGTH_PREFIX_LEN + SEQ_LEN + TAG_LEN;
/// The largest payload whose frame length still fits the 32-bit prefix.
pub const MAX_WIRE_PAYLOAD: usize = u32::MAX as usize - MIN_CIPHERTEXT_LEN;

/// The total wire size of a frame carrying `payload_len` bytes.
pub const fn frame_len(payload_len: usize) -> usize {
    payload_len + FRAME_OVERHEAD
}

/// One direction's key and counter: the state both ends share for it.
struct Direction {
    raw_key: [u8; KEY_LEN],
    key: LessSafeKey,
    /// The counter of the next frame.
    counter: u64,
    /// Set once the frame with counter `u64::MAX` has been used.
    exhausted: bool,
    rekey_interval: Option<u64>,
}

impl Direction {
    fn new(key: [u8; KEY_LEN], counter: u64, rekey_interval: Option<u64>) -> Self {
        Direction {
            key: aead_key(&key),
            raw_key: key,
            counter,
            exhausted: false,
            rekey_interval: rekey_interval.filter(|&i| i > 0),
        }
    }

    /// The nonce for the next frame, or an error if the counter is used up.
    fn nonce(&self) -> Result<Nonce> {
        if self.exhausted {
            return Err(Error::CounterExhausted);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.counter.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(nonce))
    }

    /// Moves to the next counter after a frame was used, rotating the key
    /// first when the next counter starts a new rekey interval.
    fn advance(&mut self) {
        match self.counter.checked_add(1) {
            None => self.exhausted = true,
            Some(next) => {
                self.counter = next;
                if let Some(interval) = self.rekey_interval {
                    if next % interval == 0 {
                        let next_key = rekey(&self.raw_key);
                        let mut old = std::mem::replace(&mut self.raw_key, next_key);
                        zeroize::Zeroize::zeroize(&mut old);
                        self.key = aead_key(&self.raw_key);
                    }
                }
            }
        }
    }
}

impl Drop for Direction {
    // Wipes the raw key kept for rekeying. ring 0.17 does not wipe the
    // expanded key inside `LessSafeKey` (AES round keys, GCM hash key) when
    // it is dropped, and the BLAKE2b state that derived the raw key (which
    // holds the previous key as its MAC key) is not wiped either; see
    // SECURITY.md for what is and is not cleared.
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.raw_key);
    }
}

fn aead_key(key: &[u8; KEY_LEN]) -> LessSafeKey {
    // AES-256-GCM takes exactly 32 bytes, which the type guarantees.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, key).expect("32-byte AES-256 key"))
}

/// Seals outgoing frames for one direction.
///
/// ```
/// use monte_rpc::protocol::wire::frame_len;
/// use monte_rpc::protocol::{Opener, Profile, Sealer};
/// let mut sealer = Sealer::new([9; 32], Profile::Secure);
/// let mut opener = Opener::new([9; 32], Profile::Secure);
/// let mut wire = vec![0u8; frame_len(5)];
/// let n = sealer.seal_into(7, b"hello", &mut wire).unwrap();
/// let (seq, payload) = opener.open_in_place(&mut wire[..n]).unwrap();
/// assert_eq!((seq, &payload[..]), (7, &b"hello"[..]));
/// ```
pub struct Sealer {
    dir: Direction,
}

impl Sealer {
    /// A sealer for a fresh direction (counter 0) under `profile`'s rekey
    /// schedule.
    pub fn new(key: [u8; KEY_LEN], profile: Profile) -> Self {
        Self::with_counter(key, 0, profile.rekey_interval())
    }

    /// A sealer that continues a direction at `counter`, where `key` is the
    /// key in force for that counter. Custom handshakes that send their own
    /// first frames use this to hand over the direction.
    pub fn with_counter(key: [u8; KEY_LEN], counter: u64, rekey_interval: Option<u64>) -> Self {
        Sealer {
            dir: Direction::new(key, counter, rekey_interval),
        }
    }

    /// The counter the next frame will be sealed with.
    pub fn counter(&self) -> u64 {
        self.dir.counter
    }

    /// Whether every counter is used up.
    pub fn is_exhausted(&self) -> bool {
        self.dir.exhausted
    }

    /// Seals one frame (`length || seq || payload || tag`) into the start of
    /// `out` and returns its length, [`frame_len`]`(payload.len())`.
    ///
    /// Nothing is written and the counter does not move on error.
    pub fn seal_into(&mut self, seq: u32, payload: &[u8], out: &mut [u8]) -> Result<usize> {
        let total = self.check(payload.len(), out.len())?;
        let body = &mut out[LENGTH_PREFIX_LEN..total];
        body[..SEQ_LEN].copy_from_slice(&seq.to_be_bytes());
        body[SEQ_LEN..SEQ_LEN + payload.len()].copy_from_slice(payload);
        self.seal_prepared(&mut out[..total])?;
        Ok(total)
    }

    /// Appends one sealed frame to `out`, reusing its capacity: no heap
    /// allocation once `out` has grown to fit.
    pub fn seal_append(&mut self, seq: u32, payload: &[u8], out: &mut Vec<u8>) -> Result<usize> {
        let start = out.len();
        let total = self.check(payload.len(), usize::MAX)?;
        // Built by appending rather than zero-filling the frame and copying
        // over it: the payload is written once.
        out.extend_from_slice(&[0; LENGTH_PREFIX_LEN]);
        out.extend_from_slice(&seq.to_be_bytes());
        out.extend_from_slice(payload);
        out.extend_from_slice(&[0; TAG_LEN]);
        match self.seal_prepared(&mut out[start..]) {
            Ok(()) => Ok(total),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
        }
    }

    /// Seals a frame whose plaintext (`seq || payload`) the caller has
    /// already written at `frame[4..frame.len() - 16]`; fills in the length
    /// prefix and the tag. Lets a caller build the payload in place.
    pub fn seal_prepared(&mut self, frame: &mut [u8]) -> Result<()> {
        if frame.len() < FRAME_OVERHEAD {
            return Err(Error::BufferTooSmall {
                needed: FRAME_OVERHEAD,
                available: frame.len(),
            });
        }
        let ct_len = frame.len() - LENGTH_PREFIX_LEN;
        let ct_len_u32 = u32::try_from(ct_len).map_err(|_| Error::MessageTooLarge {
            len: ct_len - MIN_CIPHERTEXT_LEN,
            max: MAX_WIRE_PAYLOAD,
        })?;
        let nonce = self.dir.nonce()?;
        frame[..LENGTH_PREFIX_LEN].copy_from_slice(&ct_len_u32.to_be_bytes());
        let (plain, tag_out) = frame[LENGTH_PREFIX_LEN..].split_at_mut(ct_len - TAG_LEN);
        let tag = self
            .dir
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), plain)
            // ring fails only for inputs beyond GCM's 64 GiB limit, which the
            // 32-bit length prefix already rules out.
            .map_err(|_| Error::MessageTooLarge {
                len: plain.len(),
                max: MAX_WIRE_PAYLOAD,
            })?;
        tag_out.copy_from_slice(tag.as_ref());
        self.dir.advance();
        Ok(())
    }

    fn check(&self, payload_len: usize, available: usize) -> Result<usize> {
        if self.dir.exhausted {
            return Err(Error::CounterExhausted);
        }
        if payload_len > MAX_WIRE_PAYLOAD {
            return Err(Error::MessageTooLarge {
                len: payload_len,
                max: MAX_WIRE_PAYLOAD,
            });
        }
        let needed = frame_len(payload_len);
        if available < needed {
            return Err(Error::BufferTooSmall { needed, available });
        }
        Ok(needed)
    }
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sealer")
            .field("counter", &self.dir.counter)
            .field("exhausted", &self.dir.exhausted)
            .finish_non_exhaustive()
    }
}

/// Opens incoming frames for one direction, in place.
///
/// The first frame that fails to open poisons the opener: every later call
/// returns [`Error::ReceiveFailed`], so a forged or damaged frame can never
/// be retried against the next counter.
pub struct Opener {
    dir: Direction,
    failed: bool,
}

impl Opener {
    /// An opener for a fresh direction (counter 0) under `profile`'s rekey
    /// schedule.
    pub fn new(key: [u8; KEY_LEN], profile: Profile) -> Self {
        Self::with_counter(key, 0, profile.rekey_interval())
    }

    /// An opener that continues a direction at `counter`, where `key` is the
    /// key in force for that counter.
    pub fn with_counter(key: [u8; KEY_LEN], counter: u64, rekey_interval: Option<u64>) -> Self {
        Opener {
            dir: Direction::new(key, counter, rekey_interval),
            failed: false,
        }
    }

    /// The counter the next frame must have been sealed with.
    pub fn counter(&self) -> u64 {
        self.dir.counter
    }

    /// Whether a frame already failed to open here.
    pub fn has_failed(&self) -> bool {
        self.failed
    }

    /// Opens one whole frame (length prefix included, exactly as
    /// [`FrameDecoder`](super::FrameDecoder) delimits it) in place, and
    /// returns its sequence number and a borrow of its plaintext payload.
    ///
    /// Any failure is fatal for this direction.
    pub fn open_in_place<'a>(&mut self, frame: &'a mut [u8]) -> Result<(u32, &'a mut [u8])> {
        if self.failed {
            return Err(Error::ReceiveFailed);
        }
        match self.open_inner(frame) {
            Ok(()) => {
                self.dir.advance();
                let seq = u32::from_be_bytes(frame[4..8].try_into().expect("4 bytes"));
                let end = frame.len() - TAG_LEN;
                Ok((seq, &mut frame[LENGTH_PREFIX_LEN + SEQ_LEN..end]))
            }
            Err(e) => {
                self.failed = true;
                Err(e)
            }
        }
    }

    fn open_inner(&mut self, frame: &mut [u8]) -> Result<()> {
        if frame.len() < LENGTH_PREFIX_LEN {
            return Err(Error::Authentication);
        }
        let claimed = u32::from_be_bytes(frame[..4].try_into().expect("4 bytes")) as usize;
        if claimed < MIN_CIPHERTEXT_LEN {
            return Err(Error::FrameTooShort { len: claimed });
        }
        if frame.len() - LENGTH_PREFIX_LEN != claimed {
            // A truncated or overlong frame cannot be the one that was sealed.
            return Err(Error::Authentication);
        }
        let nonce = self.dir.nonce()?;
        self.dir
            .key
            .open_in_place(nonce, Aad::empty(), &mut frame[LENGTH_PREFIX_LEN..])
            .map_err(|_| Error::Authentication)?;
        Ok(())
    }
}

impl std::fmt::Debug for Opener {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Opener")
            .field("counter", &self.dir.counter)
            .field("exhausted", &self.dir.exhausted)
            .field("failed", &self.failed)
            .finish_non_exhaustive()
    }
}
