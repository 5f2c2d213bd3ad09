//! The sans-IO protocol core: handshake, key schedule, frame sealing and
//! opening, frame delimiting and sequence numbers.
//!
//! Everything here is pure code over byte buffers: no sockets, no threads,
//! no clock and no `unsafe`. Every byte-level rule of the wire specification
//! (`PROTOCOL.md` in the repository) lives in this module and is tested
//! against the specification's vectors. The reactor only moves bytes
//! between sockets and these types.

mod codec;
mod frame;
mod handshake;
mod keys;
mod seq;

pub use codec::{Decoded, FrameDecoder};
pub use frame::{
    frame_len, Opener, Sealer, FRAME_OVERHEAD, LENGTH_PREFIX_LEN, MAX_WIRE_PAYLOAD,
    MIN_CIPHERTEXT_LEN, SEQ_LEN, TAG_LEN,
};
pub use handshake::{ClientHandshake, Handshake, HandshakeFactory, Role, ServerHandshake, Session};
pub use keys::{derive_keys, rekey, DirectionalKeys, Profile, KEY_LEN, REKEY_INTERVAL};
pub use seq::{SeqAllocator, SeqSpace, MAX_SLOTS};
