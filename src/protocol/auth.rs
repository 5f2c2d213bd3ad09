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

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use ring::agreement::{self, EphemeralPrivateKey, X25519};
use ring::rand::SystemRandom;
use ring::signature::{UnparsedPublicKey, ED25519};

pub use ring::signature::Ed25519KeyPair;

use super::frame::{Opener, Sealer, LENGTH_PREFIX_LEN, MIN_CIPHERTEXT_LEN};
use super::handshake::{Handshake, HandshakeFactory, Role, Session};
use super::keys::{DirectionalKeys, Profile, KEY_LEN};
use crate::error::{Error, HandshakeError, Result};

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
/// use monte_rpc::protocol::{derive_keys, derive_psk_keys, Profile};
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

/// A server's decision on a client's verified Ed25519 public key, given the
/// connection's peer address (if the driver passed it, see
/// [`HandshakeFactory::server_for_peer`]).
pub type ClientKeyCheck =
    dyn Fn(&[u8; ED25519_PUBLIC_KEY_LEN], Option<SocketAddr>) -> bool + Send + Sync;

/// Which client keys a server accepts in the `identity` profile.
#[derive(Clone)]
pub enum ClientPolicy {
    /// Exactly these Ed25519 public keys.
    Keys(Arc<HashSet<[u8; ED25519_PUBLIC_KEY_LEN]>>),
    /// Whatever the callback accepts. It is called only with a key whose
    /// signature has already been verified for this session (never a
    /// small-order key), and the connection's peer address if known.
    Callback(Arc<ClientKeyCheck>),
}

impl ClientPolicy {
    /// A policy accepting exactly `keys`.
    pub fn keys(keys: impl IntoIterator<Item = [u8; ED25519_PUBLIC_KEY_LEN]>) -> Self {
        ClientPolicy::Keys(Arc::new(keys.into_iter().collect()))
    }

    /// Whether `key`, proved by a client connecting from `peer`, is
    /// allowed.
    pub fn allows(&self, key: &[u8; ED25519_PUBLIC_KEY_LEN], peer: Option<SocketAddr>) -> bool {
        match self {
            ClientPolicy::Keys(keys) => keys.contains(key),
            ClientPolicy::Callback(f) => f(key, peer),
        }
    }
}

impl std::fmt::Debug for ClientPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientPolicy::Keys(keys) => write!(f, "ClientPolicy::Keys({} keys)", keys.len()),
            ClientPolicy::Callback(_) => f.write_str("ClientPolicy::Callback(..)"),
        }
    }
}

/// Settings of the `identity` profile, and its [`HandshakeFactory`].
///
/// The same value can serve both roles; each role reads its own fields:
///
/// - a server proves `identity` (it should always have one; without it, it
///   is anonymous and a pinning client rejects it), and when
///   `allowed_clients` is set it requires every client to prove an allowed
///   identity (mutual authentication);
/// - a client checks the server against `pinned_server`, and proves
///   `identity` when the server asks for it. A client without a pin would
///   accept any server, which authenticates nothing, so making one fails
///   with [`HandshakeError::NoPinnedServer`] unless `allow_unpinned_server`
///   is set ([`IdentityConfig::unpinned_client`],
///   [`IdentityConfig::allow_unpinned_server`]).
///
/// ```
/// use std::sync::Arc;
/// use monte_rpc::Config;
/// use monte_rpc::protocol::{
///     generate_identity_pkcs8, identity_public_key, Ed25519KeyPair, IdentityConfig,
/// };
///
/// let pkcs8 = generate_identity_pkcs8().unwrap();
/// let server_key = Arc::new(Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap());
/// let pin = identity_public_key(&server_key);
///
/// let server = Config::server().handshake(Arc::new(IdentityConfig::server(server_key)));
/// let client = Config::default().handshake(Arc::new(IdentityConfig::pinned(pin)));
/// # let _ = (server, client);
/// ```
#[derive(Clone, Default)]
pub struct IdentityConfig {
    /// This side's long-term identity.
    pub identity: Option<Arc<Ed25519KeyPair>>,
    /// Client: the only server key accepted.
    pub pinned_server: Option<[u8; ED25519_PUBLIC_KEY_LEN]>,
    /// Server: require a client identity accepted by this policy.
    pub allowed_clients: Option<ClientPolicy>,
    /// Client: accept any server when `pinned_server` is `None` (no server
    /// authentication). Off by default: an unpinned client config is an
    /// error unless this is set.
    pub allow_unpinned_server: bool,
}

impl IdentityConfig {
    /// A server proving `identity`, accepting any client.
    pub fn server(identity: Arc<Ed25519KeyPair>) -> Self {
        IdentityConfig {
            identity: Some(identity),
            ..IdentityConfig::default()
        }
    }

    /// A client accepting only the server whose public key is `server_key`.
    pub fn pinned(server_key: [u8; ED25519_PUBLIC_KEY_LEN]) -> Self {
        IdentityConfig {
            pinned_server: Some(server_key),
            ..IdentityConfig::default()
        }
    }

    /// A client that accepts any server: no pin, so the server is not
    /// authenticated (a man in the middle goes unnoticed). Add
    /// [`with_identity`](Self::with_identity) if servers may ask for a
    /// client identity.
    pub fn unpinned_client() -> Self {
        IdentityConfig {
            allow_unpinned_server: true,
            ..IdentityConfig::default()
        }
    }

    /// Client: explicitly accepts any server when no key is pinned (see
    /// [`unpinned_client`](Self::unpinned_client)).
    pub fn allow_unpinned_server(mut self) -> Self {
        self.allow_unpinned_server = true;
        self
    }

    /// Sets this side's identity (a client presents it when asked).
    pub fn with_identity(mut self, identity: Arc<Ed25519KeyPair>) -> Self {
        self.identity = Some(identity);
        self
    }

    /// Server: requires clients to prove one of `keys`.
    pub fn allow_clients(
        mut self,
        keys: impl IntoIterator<Item = [u8; ED25519_PUBLIC_KEY_LEN]>,
    ) -> Self {
        self.allowed_clients = Some(ClientPolicy::keys(keys));
        self
    }

    /// Server: requires clients to prove a key that `accept` returns true
    /// for. `accept` gets the verified key and the connection's peer address
    /// (`None` unless the driver used
    /// [`HandshakeFactory::server_for_peer`], as the server's reactor does).
    pub fn allow_clients_with(
        mut self,
        accept: impl Fn(&[u8; ED25519_PUBLIC_KEY_LEN], Option<SocketAddr>) -> bool
            + Send
            + Sync
            + 'static,
    ) -> Self {
        self.allowed_clients = Some(ClientPolicy::Callback(Arc::new(accept)));
        self
    }
}

impl std::fmt::Debug for IdentityConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityConfig")
            .field(
                "identity",
                &self.identity.as_deref().map(identity_public_key),
            )
            .field("pinned_server", &self.pinned_server)
            .field("allowed_clients", &self.allowed_clients)
            .field("allow_unpinned_server", &self.allow_unpinned_server)
            .finish()
    }
}

impl HandshakeFactory for IdentityConfig {
    fn client(&self) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(IdentityHandshake::client(self.clone())?))
    }
    fn server(&self) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(IdentityHandshake::server(self.clone())?))
    }
    fn server_for_peer(&self, peer: Option<SocketAddr>) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(IdentityHandshake::server_for_peer(
            self.clone(),
            peer,
        )?))
    }
}

/// Makes [`PskHandshake`]s for one pre-shared key. Its `Debug` never shows
/// the key.
#[derive(Clone)]
pub struct PskFactory {
    psk: [u8; KEY_LEN],
}

impl Drop for PskFactory {
    fn drop(&mut self) {
        zeroize::Zeroize::zeroize(&mut self.psk);
    }
}

impl PskFactory {
    /// A factory for `psk`, which must be 32 uniformly random bytes (not a
    /// password: see `SECURITY.md`).
    pub fn new(psk: [u8; KEY_LEN]) -> Self {
        PskFactory { psk }
    }
}

impl std::fmt::Debug for PskFactory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PskFactory { .. }")
    }
}

impl HandshakeFactory for PskFactory {
    fn client(&self) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(PskHandshake::client(self.psk)?))
    }
    fn server(&self) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(PskHandshake::server(self.psk)?))
    }
}

/// The `psk` profile's handshake (see the module documentation).
pub struct PskHandshake(Core);

impl PskHandshake {
    /// A factory for [`Config::handshake`](crate::Config::handshake).
    pub fn factory(psk: [u8; KEY_LEN]) -> PskFactory {
        PskFactory::new(psk)
    }

    /// The client side, with a fresh ephemeral key.
    pub fn client(psk: [u8; KEY_LEN]) -> Result<Self> {
        Core::new(Role::Client, Mode::Psk(psk), None).map(PskHandshake)
    }

    /// The server side. Its ephemeral key is generated once the client's key
    /// has arrived.
    pub fn server(psk: [u8; KEY_LEN]) -> Result<Self> {
        Core::new(Role::Server, Mode::Psk(psk), None).map(PskHandshake)
    }

    /// Our ephemeral public key, as it goes on the wire: always there on a
    /// client; on a server, `None` until the client's key has arrived.
    pub fn public_key(&self) -> Option<&[u8; KEY_LEN]> {
        self.0.public.as_ref()
    }
}

impl Handshake for PskHandshake {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        self.0.write_output(out)
    }
    fn read_input(&mut self, input: &[u8]) -> Result<usize> {
        self.0.read_input(input)
    }
    fn take_session(&mut self) -> Option<Session> {
        self.0.take_session()
    }
}

/// The `identity` profile's handshake (see the module documentation).
pub struct IdentityHandshake(Core);

impl IdentityHandshake {
    /// The client side, with a fresh ephemeral key. Fails with
    /// [`HandshakeError::NoPinnedServer`] if `config` pins no server key and
    /// does not set `allow_unpinned_server`.
    pub fn client(config: IdentityConfig) -> Result<Self> {
        if config.pinned_server.is_none() && !config.allow_unpinned_server {
            return Err(HandshakeError::NoPinnedServer.into());
        }
        Core::new(Role::Client, Mode::Identity(Box::new(config)), None).map(IdentityHandshake)
    }

    /// The server side. Its ephemeral key is generated once the client's key
    /// has arrived.
    pub fn server(config: IdentityConfig) -> Result<Self> {
        Self::server_for_peer(config, None)
    }

    /// The server side for a connection from `peer`, which a
    /// [`ClientPolicy::Callback`] gets along with the client's key.
    pub fn server_for_peer(config: IdentityConfig, peer: Option<SocketAddr>) -> Result<Self> {
        Core::new(Role::Server, Mode::Identity(Box::new(config)), peer).map(IdentityHandshake)
    }

    /// Our ephemeral public key, as it goes on the wire: always there on a
    /// client; on a server, `None` until the client's key has arrived.
    pub fn public_key(&self) -> Option<&[u8; KEY_LEN]> {
        self.0.public.as_ref()
    }

    /// The Ed25519 key the peer proved, once its identity frame was
    /// accepted (`None` for an anonymous peer).
    pub fn peer_identity(&self) -> Option<&[u8; ED25519_PUBLIC_KEY_LEN]> {
        self.0.peer_identity.as_ref()
    }
}

impl Handshake for IdentityHandshake {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        self.0.write_output(out)
    }
    fn read_input(&mut self, input: &[u8]) -> Result<usize> {
        self.0.read_input(input)
    }
    fn take_session(&mut self) -> Option<Session> {
        self.0.take_session()
    }
}

enum Mode {
    Psk([u8; KEY_LEN]),
    Identity(Box<IdentityConfig>),
}

impl Drop for Mode {
    fn drop(&mut self) {
        if let Mode::Psk(psk) = self {
            zeroize::Zeroize::zeroize(psk);
        }
    }
}

fn reject(code: u32) -> Error {
    Error::Handshake(HandshakeError::Rejected(code))
}

/// Collects one handshake frame whose ciphertext length must be one of a
/// few fixed values, across any number of reads.
struct FrameIn {
    buf: Vec<u8>,
    total: Option<usize>,
}

impl FrameIn {
    fn new() -> Self {
        FrameIn {
            buf: Vec::with_capacity(LENGTH_PREFIX_LEN + MIN_CIPHERTEXT_LEN + IDENTITY_PROOF_LEN),
            total: None,
        }
    }

    /// Takes what it still needs from `input`; returns bytes consumed.
    fn fill(&mut self, input: &[u8], allowed_payloads: &[usize]) -> Result<usize> {
        let mut used = 0;
        if self.total.is_none() {
            let n = (LENGTH_PREFIX_LEN - self.buf.len()).min(input.len());
            self.buf.extend_from_slice(&input[..n]);
            used = n;
            if self.buf.len() < LENGTH_PREFIX_LEN {
                return Ok(used);
            }
            let ct = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            if !allowed_payloads
                .iter()
                .any(|&p| p + MIN_CIPHERTEXT_LEN == ct)
            {
                return Err(reject(REJECT_MALFORMED));
            }
            self.total = Some(LENGTH_PREFIX_LEN + ct);
        }
        let total = self.total.expect("length known");
        let n = (total - self.buf.len()).min(input.len() - used);
        self.buf.extend_from_slice(&input[used..used + n]);
        Ok(used + n)
    }

    fn is_complete(&self) -> bool {
        self.total == Some(self.buf.len())
    }
}

/// The state machine both profiles share: X25519 exactly as the base
/// handshake, then at most one handshake frame in each direction.
struct Core {
    role: Role,
    mode: Mode,
    /// The connection's peer address, for a server's client policy.
    peer_addr: Option<SocketAddr>,
    /// Our ephemeral key: made at once on a client (it speaks first), on a
    /// server only once the client's key has arrived.
    private: Option<EphemeralPrivateKey>,
    public: Option<[u8; KEY_LEN]>,
    peer: [u8; KEY_LEN],
    peer_filled: usize,
    sealer: Option<Sealer>,
    opener: Option<Opener>,
    /// Output owed to the peer.
    pending: Vec<u8>,
    /// Whether a handshake frame from the peer is still expected.
    expect_frame: bool,
    frame: FrameIn,
    ready: bool,
    failed: bool,
    peer_identity: Option<[u8; ED25519_PUBLIC_KEY_LEN]>,
}

/// A fresh X25519 key pair and its public key.
fn ephemeral() -> Result<(EphemeralPrivateKey, [u8; KEY_LEN])> {
    let rng = SystemRandom::new();
    let private =
        EphemeralPrivateKey::generate(&X25519, &rng).map_err(|_| HandshakeError::KeyGeneration)?;
    let public_key = private
        .compute_public_key()
        .map_err(|_| HandshakeError::KeyGeneration)?;
    let mut public = [0u8; KEY_LEN];
    public.copy_from_slice(public_key.as_ref());
    Ok((private, public))
}

impl Core {
    fn new(role: Role, mode: Mode, peer_addr: Option<SocketAddr>) -> Result<Self> {
        let (private, public, pending) = match role {
            // The client speaks first: its raw key.
            Role::Client => {
                let (private, public) = ephemeral()?;
                (Some(private), Some(public), public.to_vec())
            }
            Role::Server => (None, None, Vec::new()),
        };
        Ok(Core {
            role,
            mode,
            peer_addr,
            private,
            public,
            peer: [0; KEY_LEN],
            peer_filled: 0,
            sealer: None,
            opener: None,
            pending,
            expect_frame: false,
            frame: FrameIn::new(),
            ready: false,
            failed: false,
            peer_identity: None,
        })
    }

    /// `(cp, sp)`; only called once both keys are known.
    fn publics(&self) -> ([u8; KEY_LEN], [u8; KEY_LEN]) {
        let public = self.public.expect("own key made before the peer's is used");
        match self.role {
            Role::Client => (public, self.peer),
            Role::Server => (self.peer, public),
        }
    }

    fn write_output(&mut self, out: &mut Vec<u8>) {
        out.append(&mut self.pending);
    }

    fn take_session(&mut self) -> Option<Session> {
        if self.ready && self.pending.is_empty() {
            let mut session = Session::new(self.sealer.take()?, self.opener.take()?);
            session.peer_identity = self.peer_identity;
            Some(session)
        } else {
            None
        }
    }

    fn read_input(&mut self, input: &[u8]) -> Result<usize> {
        if self.failed || self.ready {
            return Err(HandshakeError::AlreadyFinished.into());
        }
        match self.step(input) {
            Ok(used) => Ok(used),
            Err(e) => {
                self.failed = true;
                self.sealer = None;
                self.opener = None;
                self.pending.clear();
                Err(e)
            }
        }
    }

    fn step(&mut self, input: &[u8]) -> Result<usize> {
        let mut used = 0;
        if self.peer_filled < KEY_LEN {
            let n = (KEY_LEN - self.peer_filled).min(input.len());
            self.peer[self.peer_filled..self.peer_filled + n].copy_from_slice(&input[..n]);
            self.peer_filled += n;
            used = n;
            if self.peer_filled < KEY_LEN {
                return Ok(used);
            }
            self.on_peer_key()?;
        }
        if self.expect_frame {
            let allowed: &[usize] = match (&self.mode, self.role) {
                (Mode::Psk(_), Role::Client) => &[PSK_CONFIRM.len()],
                (Mode::Psk(_), Role::Server) => &[PSK_CLIENT_CONFIRM.len()],
                (Mode::Identity(_), _) => &[IDENTITY_ANONYMOUS_LEN, IDENTITY_PROOF_LEN],
            };
            used += self.frame.fill(&input[used..], allowed)?;
            if self.frame.is_complete() {
                self.expect_frame = false;
                self.on_peer_frame()?;
                self.ready = true;
            }
        }
        Ok(used)
    }

    /// Both public keys are known: derive the keys and, on the server,
    /// queue our key and our handshake frame.
    fn on_peer_key(&mut self) -> Result<()> {
        if self.role == Role::Server {
            // Made only now that the client has sent a whole key.
            let (private, public) = ephemeral()?;
            self.private = Some(private);
            self.public = Some(public);
        }
        let private = self.private.take().expect("key pair used once");
        let dh = agreement::agree_ephemeral(
            private,
            &agreement::UnparsedPublicKey::new(&X25519, &self.peer),
            |dh| {
                let mut out = [0u8; KEY_LEN];
                out.copy_from_slice(dh);
                out
            },
        )
        .map_err(|_| Error::Handshake(HandshakeError::LowOrderPublicKey))?;
        let dh = zeroize::Zeroizing::new(dh);
        let (cp, sp) = self.publics();
        let keys = match &self.mode {
            Mode::Psk(psk) => derive_psk_keys(psk, &dh, &cp, &sp),
            Mode::Identity(_) => derive_identity_keys(&dh, &cp, &sp),
        };
        let session = Session::from_keys(Profile::Secure, self.role, &keys);
        let mut sealer = session.sealer;
        self.opener = Some(session.opener);
        match (&self.mode, self.role) {
            (_, Role::Client) => self.expect_frame = true,
            (Mode::Psk(_), Role::Server) => {
                self.pending.extend_from_slice(&sp);
                sealer.seal_append(0, PSK_CONFIRM, &mut self.pending)?;
                // Ready only once the client's confirmation has opened.
                self.expect_frame = true;
            }
            (Mode::Identity(config), Role::Server) => {
                let flags = if config.allowed_clients.is_some() {
                    FLAG_CLIENT_IDENTITY_REQUIRED
                } else {
                    0
                };
                let payload =
                    identity_payload(Role::Server, flags, config.identity.as_deref(), &cp, &sp);
                self.pending.extend_from_slice(&sp);
                sealer.seal_append(0, &payload, &mut self.pending)?;
                self.expect_frame = flags != 0;
                self.ready = flags == 0;
            }
        }
        self.sealer = Some(sealer);
        Ok(())
    }

    /// The peer's handshake frame is complete: open and check it.
    fn on_peer_frame(&mut self) -> Result<()> {
        let (cp, sp) = self.publics();
        let opener = self.opener.as_mut().expect("keys derived");
        let opened = opener.open_in_place(&mut self.frame.buf);
        match &self.mode {
            Mode::Psk(_) => {
                let (seq, payload) = opened.map_err(|_| reject(REJECT_WRONG_PSK))?;
                let expected = match self.role {
                    Role::Client => PSK_CONFIRM,
                    Role::Server => PSK_CLIENT_CONFIRM,
                };
                if seq != 0 || payload != expected {
                    return Err(reject(REJECT_MALFORMED));
                }
                if self.role == Role::Client {
                    // Our own confirmation, at c2s counter 0, ahead of any
                    // application frame.
                    let sealer = self.sealer.as_mut().expect("keys derived");
                    sealer.seal_append(0, PSK_CLIENT_CONFIRM, &mut self.pending)?;
                }
                Ok(())
            }
            Mode::Identity(config) => {
                let (seq, payload) = opened?;
                if seq != 0 {
                    return Err(reject(REJECT_MALFORMED));
                }
                let peer_role = other(self.role);
                let flags = check_identity(peer_role, payload, &cp, &sp)?;
                let key = match peer_role {
                    Role::Server => {
                        let key = identity_key(payload);
                        if let Some(pin) = config.pinned_server {
                            match key {
                                None => return Err(reject(REJECT_MISSING_IDENTITY)),
                                Some(k) if k != pin => return Err(reject(REJECT_UNKNOWN_KEY)),
                                Some(_) => {}
                            }
                        }
                        if flags & FLAG_CLIENT_IDENTITY_REQUIRED != 0 {
                            let payload = identity_payload(
                                Role::Client,
                                0,
                                config.identity.as_deref(),
                                &cp,
                                &sp,
                            );
                            let sealer = self.sealer.as_mut().expect("keys derived");
                            sealer.seal_append(0, &payload, &mut self.pending)?;
                        }
                        key
                    }
                    Role::Client => {
                        let key = identity_key(payload);
                        if let Some(policy) = &config.allowed_clients {
                            match &key {
                                None => return Err(reject(REJECT_MISSING_IDENTITY)),
                                Some(k) if !policy.allows(k, self.peer_addr) => {
                                    return Err(reject(REJECT_UNKNOWN_KEY))
                                }
                                Some(_) => {}
                            }
                        }
                        key
                    }
                };
                self.peer_identity = key;
                Ok(())
            }
        }
    }
}

/// The public key of a proof payload, if it carries one.
fn identity_key(payload: &[u8]) -> Option<[u8; ED25519_PUBLIC_KEY_LEN]> {
    (payload.len() == IDENTITY_PROOF_LEN).then(|| {
        payload[IDENTITY_ANONYMOUS_LEN..IDENTITY_ANONYMOUS_LEN + ED25519_PUBLIC_KEY_LEN]
            .try_into()
            .expect("32 bytes")
    })
}

/// Checks an identity payload's shape, role and signature (not its key
/// against a policy); returns its flags byte.
fn check_identity(
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
