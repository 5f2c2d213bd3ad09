//! The key schedule: from an X25519 shared secret and the two public keys to
//! one AES-256-GCM key per direction, plus the `secure` profile's rekey step.
//!
//! Pure functions over byte arrays, so they are tested byte for byte against
//! the vectors without a handshake (ring cannot import a fixed X25519 secret).

/// Length of an X25519 public key, a shared secret and an AES-256 key.
pub const KEY_LEN: usize = 32;

/// Frames between two rekeys of one direction in the `secure` profile (2^24).
pub const REKEY_INTERVAL: u64 = 1 << 24;

const LABEL_C2S: &[u8] = b"monte-rpc v1 c2s";
const LABEL_S2C: &[u8] = b"monte-rpc v1 s2c";
const LABEL_REKEY: &[u8] = b"monte-rpc v1 rekey";

/// A wire profile: how keys are derived and whether they are rotated.
///
/// ```
/// use monte_rpc::protocol::Profile;
/// assert_eq!(Profile::default(), Profile::Secure);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Profile {
    /// The default: one key per direction, derived with keyed BLAKE2b over
    /// both public keys, and rotated every 2^24 frames.
    #[default]
    Secure,
    /// Byte-compatible with the Go library lithdew/monte: one unkeyed
    /// BLAKE2b-256 key for both directions, never rotated. Both directions
    /// start their counters at 0 under the same key, so the n-th frames of
    /// each direction share a nonce. Use it only to talk to Go peers.
    Monte,
}

impl Profile {
    /// Frames between rekeys for this profile, or `None` if it never rekeys.
    pub fn rekey_interval(self) -> Option<u64> {
        match self {
            Profile::Secure => Some(REKEY_INTERVAL),
            Profile::Monte => None,
        }
    }

    /// Whether the profile's handshake offers (client) and accepts
    /// (server) bundled frames (PROTOCOL.md, "Bundled frames"): `secure`
    /// does, since its keys bind both public keys as sent, the bit that
    /// asks for them included; `monte`, the Go library's, does not.
    pub fn bundles(self) -> bool {
        match self {
            Profile::Secure => true,
            Profile::Monte => false,
        }
    }

    /// The profile's name as used on command lines: `secure` or `monte`.
    pub fn name(self) -> &'static str {
        match self {
            Profile::Secure => "secure",
            Profile::Monte => "monte",
        }
    }
}

impl std::str::FromStr for Profile {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "secure" => Ok(Profile::Secure),
            "monte" => Ok(Profile::Monte),
            other => Err(format!(
                "unknown profile {other:?} (expected secure or monte)"
            )),
        }
    }
}

/// The two keys of a session, one per direction.
#[derive(Clone, PartialEq, Eq)]
pub struct DirectionalKeys {
    /// Sealed by the client, opened by the server.
    pub client_to_server: [u8; KEY_LEN],
    /// Sealed by the server, opened by the client.
    pub server_to_client: [u8; KEY_LEN],
}

impl Drop for DirectionalKeys {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.client_to_server);
        zeroize::Zeroize::zeroize(&mut self.server_to_client);
    }
}

impl std::fmt::Debug for DirectionalKeys {
    // Keys never reach logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DirectionalKeys { .. }")
    }
}

/// BLAKE2b-256 of `parts`, keyed with `key` if given.
fn blake2b_256(key: Option<&[u8]>, parts: &[&[u8]]) -> [u8; KEY_LEN] {
    let mut params = blake2b_simd::Params::new();
    params.hash_length(KEY_LEN);
    if let Some(key) = key {
        params.key(key);
    }
    let mut state = params.to_state();
    for part in parts {
        state.update(part);
    }
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(state.finalize().as_bytes());
    out
}

/// Derives the directional keys from the X25519 shared secret `dh` and the
/// public keys exactly as they crossed the wire.
///
/// ```
/// use monte_rpc::protocol::{derive_keys, Profile};
/// let keys = derive_keys(Profile::Secure, &[7; 32], &[1; 32], &[2; 32]);
/// assert_ne!(keys.client_to_server, keys.server_to_client);
/// let monte = derive_keys(Profile::Monte, &[7; 32], &[1; 32], &[2; 32]);
/// assert_eq!(monte.client_to_server, monte.server_to_client);
/// ```
pub fn derive_keys(
    profile: Profile,
    dh: &[u8; KEY_LEN],
    client_public: &[u8; KEY_LEN],
    server_public: &[u8; KEY_LEN],
) -> DirectionalKeys {
    match profile {
        Profile::Secure => DirectionalKeys {
            client_to_server: blake2b_256(Some(dh), &[LABEL_C2S, client_public, server_public]),
            server_to_client: blake2b_256(Some(dh), &[LABEL_S2C, client_public, server_public]),
        },
        Profile::Monte => {
            let k = blake2b_256(None, &[dh]);
            DirectionalKeys {
                client_to_server: k,
                server_to_client: k,
            }
        }
    }
}

/// The `secure` profile's rekey step: the key a direction uses from the next
/// multiple of [`REKEY_INTERVAL`] frames on.
pub fn rekey(current: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    blake2b_256(Some(current), &[LABEL_REKEY])
}
