//! The sans-IO protocol core: handshake, key schedule, frame sealing and
//! opening, frame delimiting, sequence numbers, and a connection's state
//! machine (`connection`, hidden: the runtime's and the fuzzer's, not API).
//!
//! Its public face is what a user configures (the profiles, [`PskHandshake`],
//! [`IdentityConfig`]) and what a user needs to write a handshake of their
//! own ([`Handshake`], [`HandshakeFactory`], [`Session`], [`Sealer`],
//! [`Opener`], [`derive_keys`]). The wire format's other parts are in the
//! hidden `wire` module, for conformance tests and fuzzing.
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

// What a user configures, or needs to write a handshake of their own.
pub use auth::{
    generate_identity_pkcs8, identity_public_key, ClientKeyCheck, ClientPolicy, Ed25519KeyPair,
    IdentityConfig, IdentityHandshake, PskFactory, PskHandshake, ED25519_PUBLIC_KEY_LEN,
    REJECT_BAD_SIGNATURE, REJECT_MALFORMED, REJECT_MISSING_IDENTITY, REJECT_ROLE,
    REJECT_UNKNOWN_KEY, REJECT_WRONG_PSK,
};
pub use frame::{Opener, Reservation, Sealer};
pub use handshake::{
    ClientHandshake, Handshake, HandshakeFactory, Role, ServerHandshake, Session, REFUSED_AT_CAP,
};
pub use keys::{derive_keys, DirectionalKeys, Profile, KEY_LEN};

pub(crate) use handshake::{check_unconsumed, guard_handshake, read_handshake_input};

/// Not API: the wire format's parts one by one (framing, sequence numbers,
/// the authenticated profiles' key schedules and transcripts). Public only
/// so that the conformance tests (`tests/vectors.rs` and others), the fuzz
/// targets and the benchmarks check the very code the runtime uses; they
/// may change in any release.
#[doc(hidden)]
pub mod wire {
    pub use super::auth::{
        derive_identity_keys, derive_psk_keys, identity_payload, identity_transcript,
        is_small_order_ed25519, role_label, ED25519_SIGNATURE_LEN, FLAG_CLIENT_IDENTITY_REQUIRED,
        IDENTITY_ANONYMOUS_LEN, IDENTITY_PROOF_LEN, IDENTITY_TRANSCRIPT_LEN, PSK_CLIENT_CONFIRM,
        PSK_CONFIRM, ROLE_LABEL_LEN,
    };
    pub use super::codec::{Decoded, FrameDecoder};
    pub use super::frame::{
        append_record, check_records, frame_len, record_at, records, BUNDLE_LIMIT, FRAME_OVERHEAD,
        LENGTH_PREFIX_LEN, MAX_WIRE_PAYLOAD, MIN_CIPHERTEXT_LEN, RECORD_HEADER_LEN, SEQ_LEN,
        TAG_LEN,
    };
    pub use super::keys::{rekey, REKEY_INTERVAL};
    pub use super::seq::{SeqAllocator, SeqSpace, MAX_SLOTS};
}
pub(crate) use wire::*;
