//! What a user configures for the authenticated profiles: the identity
//! settings with their client policy, and the pre-shared key's factory.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::Arc;

use super::*;

/// A server's decision on a client's verified Ed25519 public key, given the
/// connection's peer address (if the driver passed it, see
/// [`HandshakeFactory::server_for_peer`](crate::protocol::HandshakeFactory::server_for_peer)).
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

/// Settings of the `identity` profile, and its [`HandshakeFactory`](crate::protocol::HandshakeFactory).
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
    /// [`HandshakeFactory::server_for_peer`](crate::protocol::HandshakeFactory::server_for_peer), as the server's reactor does).
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

/// Makes [`PskHandshake`]s for one pre-shared key. Its `Debug` never shows
/// the key.
#[derive(Clone)]
pub struct PskFactory {
    pub(super) psk: [u8; KEY_LEN],
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
