//! The state machine both authenticated profiles share (X25519 exactly as
//! the base handshake, then at most one handshake frame each way, and the
//! client's confirmation in `psk`), the two handshakes built on it, and
//! their factories.

use std::net::SocketAddr;

use ring::agreement::{self, EphemeralPrivateKey, X25519};
use ring::rand::SystemRandom;

use super::crypto::{check_identity, identity_key};
use super::*;
use crate::error::Result;
use crate::protocol::frame::{Opener, Sealer, LENGTH_PREFIX_LEN, MIN_CIPHERTEXT_LEN};
use crate::protocol::handshake::{client_agreement_failed, Handshake, HandshakeFactory, Session};
use crate::protocol::keys::Profile;

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

/// Both authenticated handshakes are the shared [`Core`] under a profile's
/// name: their `Handshake` is the core's.
macro_rules! handshake_is_the_core {
    ($($name:ident),*) => {$(
        impl Handshake for $name {
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
    )*};
}

handshake_is_the_core!(PskHandshake, IdentityHandshake);

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
        .map_err(|_| match self.role {
            Role::Client => client_agreement_failed(&self.peer),
            Role::Server => Error::Handshake(HandshakeError::LowOrderPublicKey),
        })?;
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
