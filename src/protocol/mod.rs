//! The sans-IO protocol core: handshake, key schedule, frame sealing and
//! opening, frame delimiting, sequence numbers, and a connection's
//! receiving side with its deadlines (`connection`, hidden: the runtime's
//! and the fuzzer's, not API).
//!
//! Everything here is pure code over byte buffers: no sockets, no threads,
//! no clock and no `unsafe`. Every byte-level rule of the wire specification
//! (`PROTOCOL.md` in the repository) lives in this module and is tested
//! against the specification's vectors. The reactor only moves bytes
//! between sockets and these types.

mod auth;
mod codec;
// Not API: public only so that fuzz/ and tests/fuzz_regressions.rs drive
// the real connection core rather than a model of it.
#[doc(hidden)]
pub mod connection;
mod frame;
mod handshake;
mod keys;
mod seq;

pub use auth::{
    derive_identity_keys, derive_psk_keys, generate_identity_pkcs8, identity_payload,
    identity_public_key, identity_transcript, is_small_order_ed25519, role_label, ClientKeyCheck,
    ClientPolicy, Ed25519KeyPair, IdentityConfig, IdentityHandshake, PskFactory, PskHandshake,
    ED25519_PUBLIC_KEY_LEN, ED25519_SIGNATURE_LEN, FLAG_CLIENT_IDENTITY_REQUIRED,
    IDENTITY_ANONYMOUS_LEN, IDENTITY_PROOF_LEN, IDENTITY_TRANSCRIPT_LEN, PSK_CLIENT_CONFIRM,
    PSK_CONFIRM, REJECT_BAD_SIGNATURE, REJECT_MALFORMED, REJECT_MISSING_IDENTITY, REJECT_ROLE,
    REJECT_UNKNOWN_KEY, REJECT_WRONG_PSK, ROLE_LABEL_LEN,
};
pub use codec::{Decoded, FrameDecoder};
pub use frame::{
    frame_len, Opener, Sealer, FRAME_OVERHEAD, LENGTH_PREFIX_LEN, MAX_WIRE_PAYLOAD,
    MIN_CIPHERTEXT_LEN, SEQ_LEN, TAG_LEN,
};
pub use handshake::{
    ClientHandshake, Handshake, HandshakeFactory, Role, ServerHandshake, Session, REFUSED_AT_CAP,
};
pub use keys::{derive_keys, rekey, DirectionalKeys, Profile, KEY_LEN, REKEY_INTERVAL};
pub use seq::{SeqAllocator, SeqSpace, MAX_SLOTS};
