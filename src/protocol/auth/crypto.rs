//! The authenticated profiles' pure functions: their key schedules, the
//! signed transcript and payload of an identity proof, and the checks a
//! proof must pass (shape, role, small-order keys, signature).

use ring::rand::SystemRandom;
use ring::signature::{UnparsedPublicKey, ED25519};

use super::*;
use crate::error::Result;
use crate::protocol::keys::DirectionalKeys;

fn blake2b_256(key: &[u8], parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut state = blake2b_simd::Params::new()
        .hash_length(KEY_LEN)
        .key(key)
        .to_state();
    for part in parts {
        state.update(part);
    }
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(state.finalize().as_bytes());
    out
}

/// The `psk` key schedule: `BLAKE2b-256(key = psk, data = label || dh || cp
/// || sp)` with the labels `monte-rpc v1 psk c2s` and `monte-rpc v1 psk s2c`.
///
/// ```
/// use monte_rpc::protocol::wire::derive_psk_keys;
/// use monte_rpc::protocol::{derive_keys, Profile};
/// let a = derive_psk_keys(&[1; 32], &[7; 32], &[2; 32], &[3; 32]);
/// let b = derive_psk_keys(&[9; 32], &[7; 32], &[2; 32], &[3; 32]);
/// assert_ne!(a.client_to_server, b.client_to_server);
/// assert_ne!(a, derive_keys(Profile::Secure, &[7; 32], &[2; 32], &[3; 32]));
/// ```
pub fn derive_psk_keys(
    psk: &[u8; KEY_LEN],
    dh: &[u8; KEY_LEN],
    client_public: &[u8; KEY_LEN],
    server_public: &[u8; KEY_LEN],
) -> DirectionalKeys {
    DirectionalKeys {
        client_to_server: blake2b_256(psk, &[LABEL_PSK_C2S, dh, client_public, server_public]),
        server_to_client: blake2b_256(psk, &[LABEL_PSK_S2C, dh, client_public, server_public]),
    }
}

/// The `identity` key schedule: as `secure`, `BLAKE2b-256(key = dh, data =
/// label || cp || sp)`, but with the labels `monte-rpc v1 identity c2s` and
/// `monte-rpc v1 identity s2c`.
pub fn derive_identity_keys(
    dh: &[u8; KEY_LEN],
    client_public: &[u8; KEY_LEN],
    server_public: &[u8; KEY_LEN],
) -> DirectionalKeys {
    DirectionalKeys {
        client_to_server: blake2b_256(dh, &[LABEL_IDENTITY_C2S, client_public, server_public]),
        server_to_client: blake2b_256(dh, &[LABEL_IDENTITY_S2C, client_public, server_public]),
    }
}

/// What a side signs to prove its identity in `role`:
/// `"monte-rpc v1 identity" || role label || cp || sp` (91 bytes).
pub fn identity_transcript(
    role: Role,
    client_public: &[u8; KEY_LEN],
    server_public: &[u8; KEY_LEN],
) -> [u8; IDENTITY_TRANSCRIPT_LEN] {
    let mut t = [0u8; IDENTITY_TRANSCRIPT_LEN];
    let mut at = 0;
    for part in [
        LABEL_IDENTITY_SIG,
        &role_label(role)[..],
        &client_public[..],
        &server_public[..],
    ] {
        t[at..at + part.len()].copy_from_slice(part);
        at += part.len();
    }
    t
}

/// The payload of an identity frame: `role label || flags`, followed by
/// `public key || signature over the transcript` when `identity` is given.
pub fn identity_payload(
    role: Role,
    flags: u8,
    identity: Option<&Ed25519KeyPair>,
    client_public: &[u8; KEY_LEN],
    server_public: &[u8; KEY_LEN],
) -> Vec<u8> {
    let mut p = Vec::with_capacity(IDENTITY_PROOF_LEN);
    p.extend_from_slice(role_label(role));
    p.push(flags);
    if let Some(kp) = identity {
        use ring::signature::KeyPair;
        p.extend_from_slice(kp.public_key().as_ref());
        let transcript = identity_transcript(role, client_public, server_public);
        p.extend_from_slice(kp.sign(&transcript).as_ref());
    }
    p
}

/// The 32-byte public key of an identity, as pinned and allow-listed.
pub fn identity_public_key(identity: &Ed25519KeyPair) -> [u8; ED25519_PUBLIC_KEY_LEN] {
    use ring::signature::KeyPair;
    let mut out = [0u8; ED25519_PUBLIC_KEY_LEN];
    out.copy_from_slice(identity.public_key().as_ref());
    out
}

/// Generates a new Ed25519 identity and returns it as PKCS#8 v2 bytes, the
/// format [`Ed25519KeyPair::from_pkcs8`] reads. Keep the bytes secret.
pub fn generate_identity_pkcs8() -> Result<Vec<u8>> {
    Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
        .map(|doc| doc.as_ref().to_vec())
        .map_err(|_| HandshakeError::KeyGeneration.into())
}

/// The encodings of the Ed25519 small-order points (orders 1, 2, 4 and 8)
/// with the sign bit (bit 7 of the last byte) cleared, plus the
/// non-canonical encodings y = p and y = p + 1 of y = 0 and y = 1. The same
/// list as libsodium's.
const SMALL_ORDER_ED25519: [[u8; ED25519_PUBLIC_KEY_LEN]; 7] = {
    const fn ff_7f(first: u8) -> [u8; 32] {
        let mut k = [0xff; 32];
        k[0] = first;
        k[31] = 0x7f;
        k
    }
    const fn low(first: u8) -> [u8; 32] {
        let mut k = [0; 32];
        k[0] = first;
        k
    }
    [
        // y = 0 (order 4)
        low(0),
        // y = 1, the identity (order 1)
        low(1),
        // order 8
        [
            0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef,
            0x98, 0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88,
            0x6d, 0x53, 0xfc, 0x05,
        ],
        // order 8
        [
            0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10,
            0x67, 0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77,
            0x92, 0xac, 0x03, 0x7a,
        ],
        // y = p - 1 (order 2)
        ff_7f(0xec),
        // y = p, non-canonical 0 (order 4)
        ff_7f(0xed),
        // y = p + 1, non-canonical 1 (order 1)
        ff_7f(0xee),
    ]
};

/// Whether `key` encodes an Ed25519 point of small order (1, 2, 4 or 8),
/// canonically or not, whatever its sign bit. Such a key proves nothing:
/// with the identity point as key, the signature `R = identity, s = 0`
/// verifies for every message. An identity proof with such a key is
/// refused (`REJECT_BAD_SIGNATURE`) before its signature is checked, in
/// either role.
pub fn is_small_order_ed25519(key: &[u8; ED25519_PUBLIC_KEY_LEN]) -> bool {
    let mut y = *key;
    y[31] &= 0x7f;
    SMALL_ORDER_ED25519.contains(&y)
}

/// The public key of a proof payload, if it carries one.
pub(super) fn identity_key(payload: &[u8]) -> Option<[u8; ED25519_PUBLIC_KEY_LEN]> {
    (payload.len() == IDENTITY_PROOF_LEN).then(|| {
        payload[IDENTITY_ANONYMOUS_LEN..IDENTITY_ANONYMOUS_LEN + ED25519_PUBLIC_KEY_LEN]
            .try_into()
            .expect("32 bytes")
    })
}

/// Checks an identity payload's shape, role and signature (not its key
/// against a policy); returns its flags byte.
pub(super) fn check_identity(
    peer_role: Role,
    payload: &[u8],
    cp: &[u8; KEY_LEN],
    sp: &[u8; KEY_LEN],
) -> Result<u8> {
    if payload.len() != IDENTITY_ANONYMOUS_LEN && payload.len() != IDENTITY_PROOF_LEN {
        return Err(reject(REJECT_MALFORMED));
    }
    let label = &payload[..ROLE_LABEL_LEN];
    if label != role_label(peer_role) {
        return Err(reject(if label == role_label(other(peer_role)) {
            REJECT_ROLE
        } else {
            REJECT_MALFORMED
        }));
    }
    let flags = payload[ROLE_LABEL_LEN];
    let allowed_flags = match peer_role {
        Role::Server => FLAG_CLIENT_IDENTITY_REQUIRED,
        Role::Client => 0,
    };
    if flags & !allowed_flags != 0 {
        return Err(reject(REJECT_MALFORMED));
    }
    if payload.len() == IDENTITY_PROOF_LEN {
        let key = &payload[IDENTITY_ANONYMOUS_LEN..IDENTITY_ANONYMOUS_LEN + ED25519_PUBLIC_KEY_LEN];
        let sig = &payload[IDENTITY_ANONYMOUS_LEN + ED25519_PUBLIC_KEY_LEN..];
        // ring accepts small-order keys (the identity point with `R =
        // identity, s = 0` verifies for any message): refuse them first.
        if is_small_order_ed25519(key.try_into().expect("32 bytes")) {
            return Err(reject(REJECT_BAD_SIGNATURE));
        }
        let transcript = identity_transcript(peer_role, cp, sp);
        UnparsedPublicKey::new(&ED25519, key)
            .verify(&transcript, sig)
            .map_err(|_| reject(REJECT_BAD_SIGNATURE))?;
    }
    Ok(flags)
}
