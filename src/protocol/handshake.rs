//! The handshake: how two peers agree on session keys before the first frame.
//!
//! [`Handshake`] is the sans-IO contract every handshake meets: the driver
//! (the reactor, a test, a fuzzer) feeds in received bytes and takes out
//! bytes to send, and at the end takes a [`Session`]. [`ClientHandshake`] and
//! [`ServerHandshake`] implement the specification's ephemeral X25519
//! exchange for both profiles. Users plug in their own handshake through
//! [`HandshakeFactory`] without touching the reactor.

use std::net::SocketAddr;

use ring::agreement::{self, EphemeralPrivateKey, UnparsedPublicKey, X25519};
use ring::rand::SystemRandom;

use super::frame::{Opener, Sealer};
use super::keys::{derive_keys, DirectionalKeys, Profile, KEY_LEN};
use crate::error::{Error, HandshakeError, Result};

/// Which end of the connection a side is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// The side that dialled and spoke first.
    Client,
    /// The side that accepted.
    Server,
}

/// An established session: this side's two directions, and the peer's
/// identity if the handshake authenticated one.
///
/// Built with [`Session::new`] (or [`Session::from_keys`]); more fields may
/// be added, so it cannot be built by a struct literal outside this crate.
#[derive(Debug)]
#[non_exhaustive]
pub struct Session {
    /// Seals what this side sends.
    pub sealer: Sealer,
    /// Opens what this side receives.
    pub opener: Opener,
    /// The peer's long-term Ed25519 public key as proved in the handshake:
    /// in the `identity` profile, the server's key as the client verified
    /// it, or the client's key on a server that required one. `None` when
    /// the handshake proved no peer key (`secure`, `monte`, `psk`, an
    /// anonymous identity client). An unpinned identity client gets the
    /// key the other end proved, which authenticates nothing: any end
    /// (a man in the middle too) can prove a key of its own.
    pub peer_identity: Option<[u8; 32]>,
}

impl Session {
    /// A session from this side's two directions, with no peer identity.
    pub fn new(sealer: Sealer, opener: Opener) -> Session {
        Session {
            sealer,
            opener,
            peer_identity: None,
        }
    }

    /// The same session, recording `key` as the peer's proved Ed25519
    /// public key.
    pub fn with_peer_identity(mut self, key: [u8; 32]) -> Session {
        self.peer_identity = Some(key);
        self
    }

    /// The session a `role` gets from `keys` under `profile`, with both
    /// counters at 0.
    pub fn from_keys(profile: Profile, role: Role, keys: &DirectionalKeys) -> Session {
        let (send, recv) = match role {
            Role::Client => (&keys.client_to_server, &keys.server_to_client),
            Role::Server => (&keys.server_to_client, &keys.client_to_server),
        };
        Session::new(Sealer::new(*send, profile), Opener::new(*recv, profile))
    }
}

/// A handshake in progress, driven by bytes in and bytes out.
///
/// A driver loops: [`write_output`](Handshake::write_output) and send what
/// it appended; if [`take_session`](Handshake::take_session) yields a
/// session, stop; otherwise read from the peer and call
/// [`read_input`](Handshake::read_input) with everything received that it
/// has not consumed yet. Bytes after the end of the handshake (the peer's
/// first frames) are left unconsumed for the frame decoder.
///
/// Implement it to run a handshake of your own:
///
/// ```
/// use monte_rpc::protocol::{Handshake, Opener, Profile, Role, Sealer, Session};
/// use monte_rpc::Result;
///
/// /// Both sides already share two keys out of band, one per direction:
/// /// nothing to exchange. (One key for both directions would reuse every
/// /// nonce: both counters start at 0.)
/// struct Preshared {
///     role: Role,
///     client_to_server: [u8; 32],
///     server_to_client: [u8; 32],
/// }
///
/// impl Handshake for Preshared {
///     fn write_output(&mut self, _out: &mut Vec<u8>) {}
///     fn read_input(&mut self, _input: &[u8]) -> Result<usize> { Ok(0) }
///     fn take_session(&mut self) -> Option<Session> {
///         let (send, recv) = match self.role {
///             Role::Client => (self.client_to_server, self.server_to_client),
///             Role::Server => (self.server_to_client, self.client_to_server),
///         };
///         Some(Session::new(
///             Sealer::new(send, Profile::Secure),
///             Opener::new(recv, Profile::Secure),
///         ))
///     }
/// }
/// ```
pub trait Handshake: Send {
    /// Appends the bytes that must be sent to the peer now to `out`. Call it
    /// before the first read and after every [`read_input`](Self::read_input).
    fn write_output(&mut self, out: &mut Vec<u8>);

    /// Consumes handshake bytes from the start of `input` and returns how
    /// many it used. Any split of the input must work: a driver may feed one
    /// byte at a time. An error is fatal for the connection. Bytes left
    /// unconsumed are offered again with more; an unfinished handshake that
    /// leaves as many as the larger of the largest frame and
    /// `read_buffer_size` fails with
    /// [`HandshakeError::LeftUnconsumed`](crate::HandshakeError::LeftUnconsumed).
    fn read_input(&mut self, input: &[u8]) -> Result<usize>;

    /// The established session, once the handshake is complete: `Some`
    /// exactly once, and only after all output has been taken.
    fn take_session(&mut self) -> Option<Session>;
}

/// Makes a fresh [`Handshake`] for each new connection.
///
/// [`Profile`] implements it with the specification's handshake, so a
/// profile can be passed wherever a factory is expected.
pub trait HandshakeFactory: Send + Sync + 'static {
    /// A handshake for a connection this side dialled.
    fn client(&self) -> Result<Box<dyn Handshake>>;
    /// A handshake for a connection this side accepted.
    fn server(&self) -> Result<Box<dyn Handshake>>;
    /// A handshake for a connection this side accepted from `peer` (its
    /// address, if known), for factories whose decisions depend on it (an
    /// `identity` client policy sees it). Defaults to [`server`](Self::server).
    fn server_for_peer(&self, peer: Option<SocketAddr>) -> Result<Box<dyn Handshake>> {
        let _ = peer;
        self.server()
    }
}

/// Runs handshake code, which may be the application's (a custom
/// [`Handshake`] or [`HandshakeFactory`], an `identity` allow-list
/// callback): a panic in it fails that handshake with
/// [`HandshakeError::Panicked`] instead of unwinding the thread that runs
/// it, a reactor serving other connections or a pool's dial thread.
pub(crate) fn guard_handshake<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(HandshakeError::Panicked.into()))
}

/// Feeds `input` to a handshake and returns how many bytes it used,
/// checked: a count past the input (a custom handshake's bug) fails the
/// handshake with [`HandshakeError::UsedMoreThanGiven`] rather than
/// letting the driver slice past its buffer.
pub(crate) fn read_handshake_input(handshake: &mut dyn Handshake, input: &[u8]) -> Result<usize> {
    let used = handshake.read_input(input)?;
    if used > input.len() {
        return Err(HandshakeError::UsedMoreThanGiven {
            used,
            given: input.len(),
        }
        .into());
    }
    Ok(used)
}

/// The most of the peer's bytes a driver holds for an unfinished
/// handshake: as much as a connection's receive buffer holds (the larger
/// of the largest frame and the buffer size). Past it, the handshake
/// fails with [`HandshakeError::LeftUnconsumed`].
pub(crate) fn check_unconsumed(held: usize, most: usize) -> Result<()> {
    if held >= most {
        return Err(HandshakeError::LeftUnconsumed { held }.into());
    }
    Ok(())
}

impl HandshakeFactory for Profile {
    fn client(&self) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(ClientHandshake::new(*self)?))
    }
    fn server(&self) -> Result<Box<dyn Handshake>> {
        Ok(Box::new(ServerHandshake::new(*self)?))
    }
}

/// An ephemeral X25519 key pair.
struct Ephemeral {
    private: EphemeralPrivateKey,
    public: [u8; KEY_LEN],
}

impl Ephemeral {
    fn generate() -> Result<Self> {
        let rng = SystemRandom::new();
        let private = EphemeralPrivateKey::generate(&X25519, &rng)
            .map_err(|_| HandshakeError::KeyGeneration)?;
        let public = private
            .compute_public_key()
            .map_err(|_| HandshakeError::KeyGeneration)?;
        let mut bytes = [0u8; KEY_LEN];
        bytes.copy_from_slice(public.as_ref());
        Ok(Ephemeral {
            private,
            public: bytes,
        })
    }

    /// X25519 with the peer's key. ring refuses an all-zero result, which is
    /// what a low-order peer point gives.
    fn agree(self, peer: &[u8; KEY_LEN]) -> Result<[u8; KEY_LEN]> {
        agreement::agree_ephemeral(self.private, &UnparsedPublicKey::new(&X25519, peer), |dh| {
            let mut out = [0u8; KEY_LEN];
            out.copy_from_slice(dh);
            out
        })
        .map_err(|_| Error::Handshake(HandshakeError::LowOrderPublicKey))
    }
}

/// What a server at its connection cap sends in place of its public key
/// before it closes the connection: 32 zero bytes. No server sends them
/// as its key (zero is a low-order point, refused by every peer), so a
/// client tells the refusal from a key, and an older client or the Go
/// library fails the handshake on it as it would anyway.
pub const REFUSED_AT_CAP: [u8; KEY_LEN] = [0; KEY_LEN];

/// The bit of a public key's last byte that asks for (client) or agrees to
/// (server) bundled frames (PROTOCOL.md, "Bundled frames"). X25519 ignores
/// it (RFC 7748 masks it on receipt), so it carries no key material; the
/// key schedule hashes the keys as sent, so flipping it changes the keys.
pub const BUNDLES_BIT: u8 = 0x80;

/// Whether a public key as sent has [`BUNDLES_BIT`] set.
fn asks_for_bundles(key: &[u8; KEY_LEN]) -> bool {
    key[KEY_LEN - 1] & BUNDLES_BIT != 0
}

/// The session `profile`'s keys make for `role`, its frames bundled if
/// both keys as sent carry [`BUNDLES_BIT`].
fn session_for(
    profile: Profile,
    role: Role,
    keys: &DirectionalKeys,
    client_public: &[u8; KEY_LEN],
    server_public: &[u8; KEY_LEN],
) -> Session {
    let session = Session::from_keys(profile, role, keys);
    if profile.bundles() && asks_for_bundles(client_public) && asks_for_bundles(server_public) {
        Session {
            sealer: session.sealer.with_bundles(),
            opener: session.opener.with_bundles(),
            ..session
        }
    } else {
        session
    }
}

/// Why a client's key agreement with `server_key` failed: the server's
/// refusal at its connection cap ([`REFUSED_AT_CAP`]), or a low-order key.
pub(crate) fn client_agreement_failed(server_key: &[u8; KEY_LEN]) -> Error {
    if *server_key == REFUSED_AT_CAP {
        Error::ConnectionLimit
    } else {
        Error::Handshake(HandshakeError::LowOrderPublicKey)
    }
}

/// Collects the peer's 32-byte public key across any number of reads.
struct PeerKey {
    bytes: [u8; KEY_LEN],
    filled: usize,
}

impl PeerKey {
    fn new() -> Self {
        PeerKey {
            bytes: [0; KEY_LEN],
            filled: 0,
        }
    }

    /// Takes what it still needs from `input`; returns bytes consumed.
    fn fill(&mut self, input: &[u8]) -> usize {
        let n = (KEY_LEN - self.filled).min(input.len());
        self.bytes[self.filled..self.filled + n].copy_from_slice(&input[..n]);
        self.filled += n;
        n
    }

    fn is_complete(&self) -> bool {
        self.filled == KEY_LEN
    }
}

/// The client side of the specification's handshake: send our public key,
/// read the server's, derive the keys.
pub struct ClientHandshake {
    profile: Profile,
    ephemeral: Option<Ephemeral>,
    public: [u8; KEY_LEN],
    public_sent: bool,
    peer: PeerKey,
    session: Option<Session>,
    done: bool,
}

impl ClientHandshake {
    /// Starts a client handshake with a fresh ephemeral key.
    pub fn new(profile: Profile) -> Result<Self> {
        let ephemeral = Ephemeral::generate()?;
        let mut public = ephemeral.public;
        if profile.bundles() {
            public[KEY_LEN - 1] |= BUNDLES_BIT;
        }
        Ok(ClientHandshake {
            profile,
            public,
            ephemeral: Some(ephemeral),
            public_sent: false,
            peer: PeerKey::new(),
            session: None,
            done: false,
        })
    }

    /// Our ephemeral public key, as it goes on the wire.
    pub fn public_key(&self) -> &[u8; KEY_LEN] {
        &self.public
    }
}

impl Handshake for ClientHandshake {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        if !self.public_sent {
            out.extend_from_slice(&self.public);
            self.public_sent = true;
        }
    }

    fn read_input(&mut self, input: &[u8]) -> Result<usize> {
        if self.done {
            return Err(HandshakeError::AlreadyFinished.into());
        }
        let used = self.peer.fill(input);
        if self.peer.is_complete() {
            self.done = true;
            let ephemeral = self.ephemeral.take().expect("key pair used once");
            let dh = ephemeral
                .agree(&self.peer.bytes)
                .map_err(|_| client_agreement_failed(&self.peer.bytes))?;
            let dh = zeroize::Zeroizing::new(dh);
            let keys = derive_keys(self.profile, &dh, &self.public, &self.peer.bytes);
            self.session = Some(session_for(
                self.profile,
                Role::Client,
                &keys,
                &self.public,
                &self.peer.bytes,
            ));
        }
        Ok(used)
    }

    fn take_session(&mut self) -> Option<Session> {
        if self.public_sent {
            self.session.take()
        } else {
            None
        }
    }
}

/// The server side of the specification's handshake: read the client's
/// public key, answer with ours, derive the keys.
///
/// The server's ephemeral key is generated only once the client's whole key
/// has arrived, so accepting a connection costs no key generation (and no
/// randomness) until the peer has spoken.
pub struct ServerHandshake {
    profile: Profile,
    public: Option<[u8; KEY_LEN]>,
    public_sent: bool,
    peer: PeerKey,
    session: Option<Session>,
}

impl ServerHandshake {
    /// Starts a server handshake. Cheap: the ephemeral key is generated in
    /// [`read_input`](Handshake::read_input), once the client's key is in.
    pub fn new(profile: Profile) -> Result<Self> {
        Ok(ServerHandshake {
            profile,
            public: None,
            public_sent: false,
            peer: PeerKey::new(),
            session: None,
        })
    }

    /// Our ephemeral public key, as it goes on the wire: `None` until the
    /// client's key has arrived (and after a failed key generation).
    pub fn public_key(&self) -> Option<&[u8; KEY_LEN]> {
        self.public.as_ref()
    }
}

impl Handshake for ServerHandshake {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        // The server speaks only after it has a valid client key.
        if let (Some(_), Some(public), false) = (&self.session, &self.public, self.public_sent) {
            out.extend_from_slice(public);
            self.public_sent = true;
        }
    }

    fn read_input(&mut self, input: &[u8]) -> Result<usize> {
        if self.peer.is_complete() {
            return Err(HandshakeError::AlreadyFinished.into());
        }
        let used = self.peer.fill(input);
        if self.peer.is_complete() {
            let ephemeral = Ephemeral::generate()?;
            let mut public = ephemeral.public;
            if self.profile.bundles() && asks_for_bundles(&self.peer.bytes) {
                public[KEY_LEN - 1] |= BUNDLES_BIT;
            }
            let dh = zeroize::Zeroizing::new(ephemeral.agree(&self.peer.bytes)?);
            let keys = derive_keys(self.profile, &dh, &self.peer.bytes, &public);
            self.public = Some(public);
            self.session = Some(session_for(
                self.profile,
                Role::Server,
                &keys,
                &self.peer.bytes,
                &public,
            ));
        }
        Ok(used)
    }

    fn take_session(&mut self) -> Option<Session> {
        if self.public_sent {
            self.session.take()
        } else {
            None
        }
    }
}
