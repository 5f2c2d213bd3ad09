//! Authenticated handshakes: the `psk` and `identity` profiles.
//!
//! The base handshake ([`ClientHandshake`](super::ClientHandshake) /
//! [`ServerHandshake`](super::ServerHandshake)) only protects against
//! passive observers: anyone who answers the TCP connection gets a session.
//! The two handshakes here keep its message flow (one 32-byte X25519 key
//! each way, no extra round trip) and add authentication without a PKI:
//!
//! - [`PskHandshake`]: both sides hold the same 32-byte pre-shared key,
//!   which is mixed into the key schedule ([`derive_psk_keys`]). The server
//!   appends a key-confirmation frame to its public key, so a client talking
//!   to anyone without the PSK fails before it sends a single byte of
//!   application data; the client answers with its own key-confirmation
//!   frame (in the same write as its first requests), and the server's
//!   session starts only once that frame has opened.
//! - [`IdentityHandshake`]: the server (and optionally the client) proves a
//!   long-term Ed25519 identity by signing both ephemeral keys inside its
//!   first encrypted frame; the peer checks the key against a pin or an
//!   allow-list ([`IdentityConfig`]). The proved key ends up in
//!   [`Session::peer_identity`].
//!
//! Both are plugged in through [`HandshakeFactory`], with no reactor change:
//!
//! ```
//! use std::sync::Arc;
//! use monte_rpc::Config;
//! use monte_rpc::protocol::PskHandshake;
//!
//! let psk = [0x42; 32]; // in real use: 32 random bytes shared out of band
//! let config = Config::default().handshake(Arc::new(PskHandshake::factory(psk)));
//! # let _ = config;
//! ```
//!
//! Rejections are [`Error::Handshake`]`(`[`HandshakeError::Rejected`]`(code))`
//! with the `REJECT_*` codes below; a handshake frame that fails to open in
//! the `identity` profile is [`Error::Authentication`]. `PROTOCOL.md` at the
//! repository root specifies both profiles byte for byte.
mod config;
mod core;
mod crypto;

pub use config::{ClientKeyCheck, ClientPolicy, IdentityConfig, PskFactory};
pub use core::{IdentityHandshake, PskHandshake};
pub use crypto::{
    derive_identity_keys, derive_psk_keys, generate_identity_pkcs8, identity_payload,
    identity_public_key, identity_transcript, is_small_order_ed25519,
};
pub use ring::signature::Ed25519KeyPair;

use super::handshake::Role;
use super::keys::KEY_LEN;
use crate::error::{Error, HandshakeError};

/// `psk`: the peer's key-confirmation frame does not open: the peer holds
/// another PSK, or none (someone in the middle, a client of another
/// profile). Reported by the client for the server's frame and by the
/// server for the client's.
pub const REJECT_WRONG_PSK: u32 = 1;
/// `identity`: the peer proved a key that is not the pinned server key or is
/// not allowed by the server's client policy.
pub const REJECT_UNKNOWN_KEY: u32 = 2;
/// `identity`: the peer's signature does not verify for its key, this
/// session's ephemeral keys and its role, or its key is not a valid
/// Ed25519 public key (a small-order point included, see
/// [`is_small_order_ed25519`]).
pub const REJECT_BAD_SIGNATURE: u32 = 3;
/// `identity`: the peer's identity frame carries the other role's label (a
/// client proof presented by a server, or the reverse).
pub const REJECT_ROLE: u32 = 4;
/// Either profile: a handshake frame with a length, sequence number, label,
/// flags byte or payload that the profile does not allow (a truncated
/// signature included).
pub const REJECT_MALFORMED: u32 = 5;
/// `identity`: the peer sent no proof although this side requires one (a
/// pinned server, or a server with a client policy).
pub const REJECT_MISSING_IDENTITY: u32 = 6;

/// Length of an Ed25519 public key.
pub const ED25519_PUBLIC_KEY_LEN: usize = 32;
/// Length of an Ed25519 signature.
pub const ED25519_SIGNATURE_LEN: usize = 64;

const LABEL_PSK_C2S: &[u8] = b"monte-rpc v1 psk c2s";
const LABEL_PSK_S2C: &[u8] = b"monte-rpc v1 psk s2c";
const LABEL_IDENTITY_C2S: &[u8] = b"monte-rpc v1 identity c2s";
const LABEL_IDENTITY_S2C: &[u8] = b"monte-rpc v1 identity s2c";
const LABEL_IDENTITY_SIG: &[u8] = b"monte-rpc v1 identity";

/// The payload of the server's `psk` key-confirmation frame (24 bytes).
pub const PSK_CONFIRM: &[u8] = b"monte-rpc v1 psk confirm";
/// The payload of the client's `psk` key-confirmation frame (31 bytes).
pub const PSK_CLIENT_CONFIRM: &[u8] = b"monte-rpc v1 psk client confirm";

/// Length of a role label in an identity frame and its transcript.
pub const ROLE_LABEL_LEN: usize = 6;
/// Identity flags bit, sent by the server only: "send me your identity".
pub const FLAG_CLIENT_IDENTITY_REQUIRED: u8 = 0x01;
/// Length of an anonymous identity payload: `label || flags`.
pub const IDENTITY_ANONYMOUS_LEN: usize = ROLE_LABEL_LEN + 1;
/// Length of an identity payload with a proof:
/// `label || flags || public key || signature`.
pub const IDENTITY_PROOF_LEN: usize =
    IDENTITY_ANONYMOUS_LEN + ED25519_PUBLIC_KEY_LEN + ED25519_SIGNATURE_LEN;
/// Length of the signed transcript:
/// `"monte-rpc v1 identity" || label || cp || sp`.
pub const IDENTITY_TRANSCRIPT_LEN: usize = 21 + ROLE_LABEL_LEN + 2 * KEY_LEN;

/// The role label used in identity frames and transcripts: `client` or
/// `server` in ASCII.
pub fn role_label(role: Role) -> &'static [u8; ROLE_LABEL_LEN] {
    match role {
        Role::Client => b"client",
        Role::Server => b"server",
    }
}

fn other(role: Role) -> Role {
    match role {
        Role::Client => Role::Server,
        Role::Server => Role::Client,
    }
}

fn reject(code: u32) -> Error {
    Error::Handshake(HandshakeError::Rejected(code))
}
