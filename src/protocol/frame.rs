//! Sealed frames: one direction's AES-256-GCM key, its counter nonce and its
//! rekey schedule, sealing and opening frames in place.
//!
//! A frame on the wire is `length:u32 || AES-256-GCM(seq:u32 || payload)`,
//! with the 16-byte tag at the end and the nonce `counter:u64 || 0u32`.
//! Each direction has one [`Sealer`] on the sending side and one [`Opener`]
//! on the receiving side; their counters advance in lock step, so the n-th
//! frame sent must be the n-th frame received.
//!
//! Where the handshake agreed on bundled frames (PROTOCOL.md, "Bundled
//! frames"), a direction's plaintext is instead one or more records
//! `seq:u32 || len:u32 || payload`, so that a stream of small messages
//! costs one seal and one open per frame rather than per message. Whether
//! a direction bundles is its sealer's and opener's to know
//! ([`Sealer::with_bundles`], [`Opener::with_bundles`]): the handshake
//! sets it, and the code above reads it from them.

use std::sync::Arc;

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

/// Bytes of a record's header in a bundled frame: its sequence number and
/// its payload's length.
pub const RECORD_HEADER_LEN: usize = 8;
/// The largest plaintext of a bundled frame that carries more than one
/// record (a frame of one record may be as large as its message): such a
/// frame is at most 16 KiB on the wire, the size of a receive buffer.
/// Every receiver that agreed on bundles accepts frames this large,
/// whatever its message limit, and refuses a frame of several records
/// that is larger: a frame's worth of tiny records is what one read may
/// hand a reactor to dispatch.
pub const BUNDLE_LIMIT: usize = (16 << 10) - LENGTH_PREFIX_LEN - TAG_LEN;

/// Checks that `plain`, a bundled frame's plaintext, is one or more records
/// that fill it exactly, each payload at most `max_payload`, and of at most
/// [`BUNDLE_LIMIT`] bytes if more than one; returns the first record's
/// sequence number and payload length.
pub fn check_records(plain: &[u8], max_payload: usize) -> Result<(u32, usize)> {
    let first = record_at(plain, max_payload)?;
    let mut at = RECORD_HEADER_LEN + first.1;
    if at < plain.len() && plain.len() > BUNDLE_LIMIT {
        // Several records in more than a bundle may hold.
        return Err(Error::MalformedBundle {
            claimed: plain.len(),
            left: BUNDLE_LIMIT,
        });
    }
    while at < plain.len() {
        let (_, len) = record_at(&plain[at..], max_payload)?;
        at += RECORD_HEADER_LEN + len;
    }
    Ok(first)
}

/// The messages of a bundled frame's plaintext, checked with
/// [`check_records`] first: its records' sequence numbers and payloads, in
/// order.
///
/// ```
/// use monte_rpc::protocol::wire::{append_record, check_records, records};
/// let mut plain = Vec::new();
/// append_record(&mut plain, 0, b"one");
/// append_record(&mut plain, 7, b"two");
/// assert_eq!(check_records(&plain, 1024).unwrap(), (0, 3));
/// let all: Vec<_> = records(&plain).collect();
/// assert_eq!(all, [(0, &b"one"[..]), (7, &b"two"[..])]);
/// ```
pub fn records(plain: &[u8]) -> impl Iterator<Item = (u32, &[u8])> {
    let mut rest = plain;
    std::iter::from_fn(move || {
        let (seq, len) = record_at(rest, usize::MAX).ok()?;
        let payload = &rest[RECORD_HEADER_LEN..RECORD_HEADER_LEN + len];
        rest = &rest[RECORD_HEADER_LEN + len..];
        Some((seq, payload))
    })
}

/// The record at the start of `rest` (a bundled frame's plaintext from a
/// record boundary on): its sequence number and payload length.
pub fn record_at(rest: &[u8], max_payload: usize) -> Result<(u32, usize)> {
    let Some(header) = rest.get(..RECORD_HEADER_LEN) else {
        return Err(Error::MalformedBundle {
            claimed: RECORD_HEADER_LEN,
            left: rest.len(),
        });
    };
    let seq = u32::from_be_bytes(header[..4].try_into().expect("4 bytes"));
    let len = u32::from_be_bytes(header[4..].try_into().expect("4 bytes")) as usize;
    if len > max_payload {
        // Reported as the frame of its own it would be.
        return Err(Error::FrameTooLarge {
            len: len.saturating_add(MIN_CIPHERTEXT_LEN),
            max: max_payload.saturating_add(MIN_CIPHERTEXT_LEN),
            max_message: max_payload,
        });
    }
    let left = rest.len() - RECORD_HEADER_LEN;
    if len > left {
        return Err(Error::MalformedBundle { claimed: len, left });
    }
    Ok((seq, len))
}

/// Appends one record (`seq || len || payload`) to a bundled frame being
/// built in `out` (see [`Sealer::seal_bundle`]).
pub fn append_record(out: &mut Vec<u8>, seq: u32, payload: &[u8]) {
    // A payload over 4 GiB cannot be framed: `seal_bundle` refuses the
    // frame (its length prefix would overflow) before this matters.
    let len = u32::try_from(payload.len()).unwrap_or(u32::MAX);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(payload);
}

/// One direction's key and counter: the state both ends share for it.
struct Direction {
    raw_key: [u8; KEY_LEN],
    /// Shared with the [`Reservation`]s taken and not yet used, which may
    /// outlive a rekey.
    key: Arc<LessSafeKey>,
    /// The counter of the next frame.
    counter: u64,
    /// Set once the frame with counter `u64::MAX` has been used.
    exhausted: bool,
    rekey_interval: Option<u64>,
}

impl Direction {
    fn new(key: [u8; KEY_LEN], counter: u64, rekey_interval: Option<u64>) -> Self {
        Direction {
            key: Arc::new(aead_key(&key)),
            raw_key: key,
            counter,
            exhausted: false,
            rekey_interval: rekey_interval.filter(|&i| i > 0),
        }
    }

    /// The nonce for the next frame, or an error if the counter is used up.
    fn nonce(&self) -> Result<Nonce> {
        self.nonce_bytes().map(Nonce::assume_unique_for_key)
    }

    fn nonce_bytes(&self) -> Result<[u8; NONCE_LEN]> {
        if self.exhausted {
            return Err(Error::CounterExhausted);
        }
        let mut nonce = [0u8; NONCE_LEN];
        nonce[..8].copy_from_slice(&self.counter.to_be_bytes());
        Ok(nonce)
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
                        self.key = Arc::new(aead_key(&self.raw_key));
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
    bundles: bool,
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
            bundles: false,
        }
    }

    /// This sealer, sealing bundled frames: what a handshake that agreed
    /// on them hands over (PROTOCOL.md, "Bundled frames").
    pub fn with_bundles(mut self) -> Self {
        self.bundles = true;
        self
    }

    /// Whether this direction's frames are bundled.
    pub fn bundles(&self) -> bool {
        self.bundles
    }

    /// The wire size of a frame carrying one message of `payload_len`
    /// bytes in this direction's format.
    pub fn frame_len(&self, payload_len: usize) -> usize {
        frame_len(payload_len) + self.record_header()
    }

    /// What a record header adds to a one-message frame: nothing unless
    /// bundled.
    fn record_header(&self) -> usize {
        if self.bundles {
            RECORD_HEADER_LEN - SEQ_LEN
        } else {
            0
        }
    }

    /// Starts a bundled frame at the end of `out` (its length prefix, to
    /// be filled in) and returns where it starts. Append its records with
    /// [`append_record`], then seal it with [`seal_bundle`](Self::seal_bundle).
    pub fn start_bundle(out: &mut Vec<u8>) -> usize {
        let start = out.len();
        out.extend_from_slice(&[0; LENGTH_PREFIX_LEN]);
        start
    }

    /// Seals the bundled frame `out[start..]` (started by
    /// [`start_bundle`](Self::start_bundle), one or more records after
    /// its prefix): appends the tag, fills in the prefix and encrypts in
    /// place. On error the frame is removed from `out` and the counter
    /// does not move.
    pub fn seal_bundle(&mut self, out: &mut Vec<u8>, start: usize) -> Result<usize> {
        debug_assert!(self.bundles, "a bundle sealed by an unbundled sealer");
        out.extend_from_slice(&[0; TAG_LEN]);
        match self.seal_prepared(&mut out[start..]) {
            Ok(()) => Ok(out.len() - start),
            Err(e) => {
                out.truncate(start);
                Err(e)
            }
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

    /// Seals one frame (`length || seq || payload || tag`; bundled, a frame
    /// of one record) into the start of `out` and returns its length,
    /// [`Sealer::frame_len`]`(payload.len())`.
    ///
    /// Nothing is written and the counter does not move on error.
    pub fn seal_into(&mut self, seq: u32, payload: &[u8], out: &mut [u8]) -> Result<usize> {
        let total = self.check(payload.len(), out.len())?;
        let body = &mut out[LENGTH_PREFIX_LEN..total];
        body[..SEQ_LEN].copy_from_slice(&seq.to_be_bytes());
        let mut at = SEQ_LEN;
        if self.bundles {
            let len = u32::try_from(payload.len()).expect("checked against the prefix");
            body[at..at + 4].copy_from_slice(&len.to_be_bytes());
            at += 4;
        }
        body[at..at + payload.len()].copy_from_slice(payload);
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
        if self.bundles {
            append_record(out, seq, payload);
        } else {
            out.extend_from_slice(&seq.to_be_bytes());
            out.extend_from_slice(payload);
        }
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
        check_frame_len(frame)?;
        self.reserve()?.seal_prepared(frame)
    }

    /// Takes the next counter for a frame to be sealed later
    /// ([`Reservation::seal_prepared`]): frames go on the wire in the
    /// order their counters were taken, so whoever orders them (the
    /// outbound queue, under its lock) reserves, and the sealing itself
    /// can happen outside that lock.
    ///
    /// ```
    /// use monte_rpc::protocol::{Opener, Profile, Sealer};
    /// let mut sealer = Sealer::new([9; 32], Profile::Secure);
    /// let mut opener = Opener::new([9; 32], Profile::Secure);
    /// let (first, second) = (sealer.reserve().unwrap(), sealer.reserve().unwrap());
    /// // Frames of seq 1 whose plaintext is written in place.
    /// let mut a = vec![0u8; 4 + 4 + 3 + 16];
    /// a[4..8].copy_from_slice(&1u32.to_be_bytes());
    /// a[8..11].copy_from_slice(b"one");
    /// let mut b = a.clone();
    /// b[8..11].copy_from_slice(b"two");
    /// // Sealed in either order, they open in the order reserved.
    /// second.seal_prepared(&mut b).unwrap();
    /// first.seal_prepared(&mut a).unwrap();
    /// assert_eq!(opener.open_in_place(&mut a).unwrap().1, b"one");
    /// assert_eq!(opener.open_in_place(&mut b).unwrap().1, b"two");
    /// ```
    pub fn reserve(&mut self) -> Result<Reservation> {
        let nonce = self.dir.nonce_bytes()?;
        let key = Arc::clone(&self.dir.key);
        self.dir.advance();
        Ok(Reservation { key, nonce })
    }

    fn check(&self, payload_len: usize, available: usize) -> Result<usize> {
        if self.dir.exhausted {
            return Err(Error::CounterExhausted);
        }
        let max = MAX_WIRE_PAYLOAD - self.record_header();
        if payload_len > max {
            return Err(Error::MessageTooLarge {
                len: payload_len,
                max,
            });
        }
        let needed = self.frame_len(payload_len);
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
            .field("bundles", &self.bundles)
            .field("exhausted", &self.dir.exhausted)
            .finish_non_exhaustive()
    }
}

/// A frame's counter and the key in force for it, taken in order by
/// [`Sealer::reserve`] and used once to seal that frame.
pub struct Reservation {
    key: Arc<LessSafeKey>,
    nonce: [u8; NONCE_LEN],
}

impl Reservation {
    /// Seals a frame whose plaintext the caller has written at
    /// `frame[4..frame.len() - 16]`, as [`Sealer::seal_prepared`] does, with
    /// the reserved counter.
    pub fn seal_prepared(self, frame: &mut [u8]) -> Result<()> {
        let ct_len = check_frame_len(frame)?;
        frame[..LENGTH_PREFIX_LEN].copy_from_slice(&(ct_len as u32).to_be_bytes());
        let (plain, tag_out) = frame[LENGTH_PREFIX_LEN..].split_at_mut(ct_len - TAG_LEN);
        let nonce = Nonce::assume_unique_for_key(self.nonce);
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::empty(), plain)
            // ring fails only for inputs beyond GCM's 64 GiB limit, which the
            // 32-bit length prefix already rules out.
            .map_err(|_| Error::MessageTooLarge {
                len: plain.len(),
                max: MAX_WIRE_PAYLOAD,
            })?;
        tag_out.copy_from_slice(tag.as_ref());
        Ok(())
    }
}

impl std::fmt::Debug for Reservation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let counter = u64::from_be_bytes(self.nonce[..8].try_into().expect("8 bytes"));
        f.debug_struct("Reservation")
            .field("counter", &counter)
            .finish_non_exhaustive()
    }
}

/// A whole frame's ciphertext length (prefix excluded), if the frame can
/// hold a sequence number and a tag and its length fits the prefix.
fn check_frame_len(frame: &[u8]) -> Result<usize> {
    if frame.len() < FRAME_OVERHEAD {
        return Err(Error::BufferTooSmall {
            needed: FRAME_OVERHEAD,
            available: frame.len(),
        });
    }
    let ct_len = frame.len() - LENGTH_PREFIX_LEN;
    u32::try_from(ct_len).map_err(|_| Error::MessageTooLarge {
        len: ct_len - MIN_CIPHERTEXT_LEN,
        max: MAX_WIRE_PAYLOAD,
    })?;
    Ok(ct_len)
}

/// Opens incoming frames for one direction, in place.
///
/// The first frame that fails to open poisons the opener: every later call
/// returns [`Error::ReceiveFailed`], so a forged or damaged frame can never
/// be retried against the next counter.
pub struct Opener {
    dir: Direction,
    failed: bool,
    bundles: bool,
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
            bundles: false,
        }
    }

    /// This opener, opening bundled frames: what a handshake that agreed
    /// on them hands over (PROTOCOL.md, "Bundled frames").
    pub fn with_bundles(mut self) -> Self {
        self.bundles = true;
        self
    }

    /// Whether this direction's frames are bundled.
    pub fn bundles(&self) -> bool {
        self.bundles
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
    /// A bundled frame must hold exactly one record here (a connection
    /// reads bundles record by record with [`open_frame_in_place`](Self::open_frame_in_place)).
    ///
    /// Any failure is fatal for this direction.
    pub fn open_in_place<'a>(&mut self, frame: &'a mut [u8]) -> Result<(u32, &'a mut [u8])> {
        let end = frame.len().saturating_sub(TAG_LEN);
        self.open_frame_in_place(frame)?;
        if self.bundles {
            let plain = &frame[LENGTH_PREFIX_LEN..end];
            let (seq, len) = record_at(plain, MAX_WIRE_PAYLOAD)?;
            let left = plain.len() - RECORD_HEADER_LEN - len;
            if left > 0 {
                // One message was asked for; more follow it.
                return Err(Error::MalformedBundle {
                    claimed: len,
                    left: len + left,
                });
            }
            return Ok((seq, &mut frame[LENGTH_PREFIX_LEN + RECORD_HEADER_LEN..end]));
        }
        let seq = u32::from_be_bytes(frame[4..8].try_into().expect("4 bytes"));
        Ok((seq, &mut frame[LENGTH_PREFIX_LEN + SEQ_LEN..end]))
    }

    /// Opens one whole frame in place and returns its plaintext: for an
    /// unbundled direction `seq || payload`, for a bundled one its records,
    /// unchecked (see [`check_records`]).
    ///
    /// Any failure is fatal for this direction.
    pub fn open_frame_in_place<'a>(&mut self, frame: &'a mut [u8]) -> Result<&'a mut [u8]> {
        if self.failed {
            return Err(Error::ReceiveFailed);
        }
        match self.open_inner(frame) {
            Ok(()) => {
                self.dir.advance();
                let end = frame.len() - TAG_LEN;
                Ok(&mut frame[LENGTH_PREFIX_LEN..end])
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
            .field("bundles", &self.bundles)
            .finish_non_exhaustive()
    }
}
