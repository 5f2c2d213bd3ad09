//! The authenticated handshakes (`psk` and `identity`, PROTOCOL.md):
//! in-memory runs at every input split point, every rejection with its
//! distinct error, a man in the middle over real loopback TCP (who reads
//! everything under `secure` and nothing under `psk` or `identity`), real
//! requests through Client/Server, and the byte-exact vectors in
//! `tests/vectors/auth-*.json`.
//!
//! Regenerate the vectors with `MONTE_WRITE_AUTH_VECTORS=1 cargo test --test
//! auth write_vectors`; the checking test never needs the variable.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use monte_rpc::protocol::wire::{
    derive_identity_keys, derive_psk_keys, identity_payload, identity_transcript,
    is_small_order_ed25519, role_label, Decoded, FrameDecoder, FLAG_CLIENT_IDENTITY_REQUIRED,
    PSK_CLIENT_CONFIRM, PSK_CONFIRM,
};
use monte_rpc::protocol::{
    derive_keys, identity_public_key, ClientHandshake, Ed25519KeyPair, Handshake, HandshakeFactory,
    IdentityConfig, IdentityHandshake, Opener, Profile, PskHandshake, Role, Sealer,
    ServerHandshake, Session, KEY_LEN, REJECT_BAD_SIGNATURE, REJECT_MALFORMED,
    REJECT_MISSING_IDENTITY, REJECT_ROLE, REJECT_UNKNOWN_KEY, REJECT_WRONG_PSK,
};
use monte_rpc::{Client, Config, Connection, Context, Error, Handler, HandshakeError, Server};
use ring::agreement::{self, EphemeralPrivateKey, X25519};
use ring::rand::SystemRandom;
use serde_json::{json, Value};

// ---------------------------------------------------------------- helpers

/// A named pair of (client, server) handshake factories.
type Pair = (
    &'static str,
    Arc<dyn HandshakeFactory>,
    Arc<dyn HandshakeFactory>,
);
/// Computes one vector file's content.
type MakeVector = fn() -> Value;

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex32(s: &str) -> [u8; 32] {
    let v: Vec<u8> = (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect();
    v.try_into().unwrap()
}

/// Whether `e` is the rejection `code`, raised by a handshake directly or
/// (through `Client`) as the cause of a failed dial.
fn rejected(code: u32) -> impl Fn(&Error) -> bool {
    move |e| matches!(e.root_cause(), Error::Handshake(HandshakeError::Rejected(c)) if *c == code)
}

const PSK: [u8; KEY_LEN] = [0x5c; KEY_LEN];

fn keypair(seed: u8) -> Arc<Ed25519KeyPair> {
    Arc::new(Ed25519KeyPair::from_seed_unchecked(&[seed; 32]).unwrap())
}

/// How a driver splits each flight (everything one side writes at once).
#[derive(Clone, Copy, Debug)]
enum Cut {
    /// Two reads: `[..n]` and `[n..]` (n clamped to the flight).
    At(usize),
    /// One byte per read.
    Bytewise,
}

fn chunks(bytes: &[u8], cut: Cut) -> Vec<Vec<u8>> {
    match cut {
        Cut::At(n) => {
            let n = n.min(bytes.len());
            vec![bytes[..n].to_vec(), bytes[n..].to_vec()]
        }
        Cut::Bytewise => bytes.iter().map(|b| vec![*b]).collect(),
    }
}

/// Which side failed, and how.
#[derive(Debug)]
struct Fail {
    side: Role,
    err: Error,
}

/// Runs two handshakes against each other in memory, delivering each flight
/// split as `client_cut` / `server_cut` say, re-feeding unconsumed input as
/// a reactor would.
fn run<C, S>(
    client: &mut C,
    server: &mut S,
    client_cut: Cut,
    server_cut: Cut,
) -> Result<(Session, Session), Fail>
where
    C: Handshake + ?Sized,
    S: Handshake + ?Sized,
{
    let (mut to_s, mut to_c) = (VecDeque::new(), VecDeque::new());
    let (mut s_in, mut c_in) = (Vec::new(), Vec::new());
    let (mut cs, mut ss) = (None, None);
    for _ in 0..100_000 {
        if cs.is_none() {
            let mut out = Vec::new();
            client.write_output(&mut out);
            if !out.is_empty() {
                to_s.extend(chunks(&out, client_cut));
            }
            cs = client.take_session();
        }
        if ss.is_none() {
            let mut out = Vec::new();
            server.write_output(&mut out);
            if !out.is_empty() {
                to_c.extend(chunks(&out, server_cut));
            }
            ss = server.take_session();
        }
        match (cs, ss) {
            (Some(c), Some(s)) if to_s.is_empty() && to_c.is_empty() => {
                assert!(s_in.is_empty() && c_in.is_empty(), "unconsumed bytes");
                return Ok((c, s));
            }
            (c, s) => (cs, ss) = (c, s),
        }
        let mut progressed = false;
        if let Some(chunk) = to_s.pop_front() {
            progressed = true;
            s_in.extend_from_slice(&chunk);
            if ss.is_none() {
                let used = server.read_input(&s_in).map_err(|err| Fail {
                    side: Role::Server,
                    err,
                })?;
                s_in.drain(..used);
            }
        }
        if let Some(chunk) = to_c.pop_front() {
            progressed = true;
            c_in.extend_from_slice(&chunk);
            if cs.is_none() {
                let used = client.read_input(&c_in).map_err(|err| Fail {
                    side: Role::Client,
                    err,
                })?;
                c_in.drain(..used);
            }
        }
        assert!(progressed, "handshake stuck: nobody has anything to send");
    }
    panic!("handshake did not finish");
}

/// Frames sealed by each side open on the other, both ways, interleaved.
fn assert_sessions_match(c: &mut Session, s: &mut Session) {
    for i in 0..3u32 {
        let payload: Vec<u8> = (0..i as usize * 101).map(|b| b as u8 ^ 0xa5).collect();
        let mut wire = Vec::new();
        c.sealer
            .seal_append(2 * i + 1, &payload, &mut wire)
            .unwrap();
        let (seq, got) = s.opener.open_in_place(&mut wire).unwrap();
        assert_eq!((seq, &got[..]), (2 * i + 1, &payload[..]));
        let mut wire = Vec::new();
        s.sealer
            .seal_append(2 * i + 1, &payload, &mut wire)
            .unwrap();
        let (seq, got) = c.opener.open_in_place(&mut wire).unwrap();
        assert_eq!((seq, &got[..]), (2 * i + 1, &payload[..]));
    }
}

/// (client sealer, client opener, server sealer, server opener) counters.
fn counters(c: &Session, s: &Session) -> (u64, u64, u64, u64) {
    (
        c.sealer.counter(),
        c.opener.counter(),
        s.sealer.counter(),
        s.opener.counter(),
    )
}

fn server_only() -> (IdentityConfig, IdentityConfig) {
    let server_key = keypair(1);
    let pin = identity_public_key(&server_key);
    (
        IdentityConfig::pinned(pin),
        IdentityConfig::server(server_key),
    )
}

fn mutual() -> (IdentityConfig, IdentityConfig) {
    let server_key = keypair(1);
    let client_key = keypair(2);
    let pin = identity_public_key(&server_key);
    let client_pub = identity_public_key(&client_key);
    (
        IdentityConfig::pinned(pin).with_identity(client_key),
        IdentityConfig::server(server_key).allow_clients([client_pub]),
    )
}

// ------------------------------------------------------- in-memory splits

// Checks PSK completes with matching sessions for every pair of split points of the client's flights (32 bytes, then its 55-byte confirmation) and the server's flight (32 + 48 bytes), and bytewise; each confirmation frame uses counter 0 of its direction, so both sessions hand over at counter 1 both ways, and the first application frame of each direction opens.
#[test]
fn psk_every_split_point() {
    let server_flight = KEY_LEN + 4 + 4 + PSK_CONFIRM.len() + 16;
    let client_confirm = 4 + 4 + PSK_CLIENT_CONFIRM.len() + 16;
    assert_eq!((server_flight, client_confirm), (80, 55));
    assert_eq!(PSK_CLIENT_CONFIRM, CLIENT_CONFIRM);
    let mut cuts: Vec<(Cut, Cut)> = Vec::new();
    for k in 0..=client_confirm {
        for j in 0..=server_flight {
            cuts.push((Cut::At(k), Cut::At(j)));
        }
    }
    cuts.push((Cut::Bytewise, Cut::Bytewise));
    for (i, (cc, sc)) in cuts.into_iter().enumerate() {
        let mut client = PskHandshake::client(PSK).unwrap();
        let mut server = PskHandshake::server(PSK).unwrap();
        let (mut c, mut s) = run(&mut client, &mut server, cc, sc).unwrap();
        assert_eq!(counters(&c, &s), (1, 1, 1, 1), "{cc:?} {sc:?}");
        assert_eq!((c.peer_identity, s.peer_identity), (None, None));
        if i % 97 == 0 {
            assert_sessions_match(&mut c, &mut s);
        }
        assert!(matches!(
            client.read_input(&[0]),
            Err(Error::Handshake(HandshakeError::AlreadyFinished))
        ));
    }
}

// Checks identity (server-only and mutual) completes at every split point of each flight, with the other flight split at its edges or bytewise, and hands over at the documented counters.
#[test]
fn identity_every_split_point() {
    for (name, (ccfg, scfg), expect) in [
        ("server-only", server_only(), (0, 1, 1, 0)),
        ("mutual", mutual(), (1, 1, 1, 1)),
    ] {
        // Longest flight: server 32 + 127 bytes; client 32 (+ 127 in mutual).
        let max = KEY_LEN + 4 + 4 + 103 + 16;
        let fixed = [
            Cut::At(0),
            Cut::At(1),
            Cut::At(KEY_LEN),
            Cut::At(max),
            Cut::Bytewise,
        ];
        let mut cuts = Vec::new();
        for n in 0..=max {
            for f in fixed {
                cuts.push((Cut::At(n), f));
                cuts.push((f, Cut::At(n)));
            }
        }
        for (i, (cc, sc)) in cuts.into_iter().enumerate() {
            let mut client = IdentityHandshake::client(ccfg.clone()).unwrap();
            let mut server = IdentityHandshake::server(scfg.clone()).unwrap();
            let (mut c, mut s) = run(&mut client, &mut server, cc, sc).unwrap();
            assert_eq!(counters(&c, &s), expect, "{name} {cc:?} {sc:?}");
            let server_key = identity_public_key(&keypair(1));
            assert_eq!(client.peer_identity(), Some(&server_key));
            assert_eq!(c.peer_identity, Some(server_key), "client session");
            if name == "mutual" {
                let client_key = identity_public_key(&keypair(2));
                assert_eq!(server.peer_identity(), Some(&client_key));
                assert_eq!(s.peer_identity, Some(client_key), "server session");
            } else {
                assert_eq!(s.peer_identity, None);
            }
            if i % 53 == 0 {
                assert_sessions_match(&mut c, &mut s);
            }
        }
    }
}

// Checks the factories work through the trait objects the reactor uses, and that a client's first application frame pipelined after its handshake output is left unconsumed for the frame decoder.
#[test]
fn factories_and_pipelined_first_frame() {
    let (ccfg, scfg) = mutual();
    let factories: Vec<(Arc<dyn HandshakeFactory>, Arc<dyn HandshakeFactory>)> = vec![
        (
            Arc::new(PskHandshake::factory(PSK)),
            Arc::new(PskHandshake::factory(PSK)),
        ),
        (Arc::new(ccfg), Arc::new(scfg)),
        (Arc::new(server_only().0), Arc::new(server_only().1)),
    ];
    for (cf, sf) in factories {
        let mut client = cf.client().unwrap();
        let mut server = sf.server().unwrap();
        let mut c2s = Vec::new();
        client.write_output(&mut c2s);
        assert_eq!(server.read_input(&c2s).unwrap(), KEY_LEN);
        let mut s2c = Vec::new();
        server.write_output(&mut s2c);
        assert_eq!(client.read_input(&s2c).unwrap(), s2c.len());
        let mut c2s = Vec::new();
        client.write_output(&mut c2s);
        let handshake_len = c2s.len();
        let mut c = client.take_session().expect("client session");
        c.sealer.seal_append(1, b"first request", &mut c2s).unwrap();
        let used = if handshake_len > 0 {
            server.read_input(&c2s).unwrap()
        } else {
            0
        };
        assert_eq!(used, handshake_len);
        server.write_output(&mut Vec::new());
        let mut s = server.take_session().expect("server session");
        let rest = &mut c2s[used..];
        let Decoded::Frame(n) = FrameDecoder::new(1024).decode(rest).unwrap() else {
            panic!("whole frame expected");
        };
        assert_eq!(n, rest.len());
        let (seq, body) = s.opener.open_in_place(rest).unwrap();
        assert_eq!((seq, &body[..]), (1, &b"first request"[..]));
    }
}

// --------------------------------------------------------------- rejections

/// An attacker's own X25519 end of a connection.
struct Fake {
    cp: [u8; 32],
    sp: [u8; 32],
    dh: [u8; 32],
}

fn x25519_pair() -> (EphemeralPrivateKey, [u8; 32]) {
    let private = EphemeralPrivateKey::generate(&X25519, &SystemRandom::new()).unwrap();
    let public: [u8; 32] = private
        .compute_public_key()
        .unwrap()
        .as_ref()
        .try_into()
        .unwrap();
    (private, public)
}

fn agree(private: EphemeralPrivateKey, peer: &[u8; 32]) -> [u8; 32] {
    agreement::agree_ephemeral(
        private,
        &agreement::UnparsedPublicKey::new(&X25519, peer),
        |dh| <[u8; 32]>::try_from(dh).unwrap(),
    )
    .unwrap()
}

impl Fake {
    /// Answers a client's key as a server would.
    fn server_for(cp: &[u8; 32]) -> Fake {
        let (private, sp) = x25519_pair();
        Fake {
            cp: *cp,
            sp,
            dh: agree(private, cp),
        }
    }

    /// Answers a server's key as a client would (after sending `cp`).
    fn client_to(private: EphemeralPrivateKey, cp: [u8; 32], sp: &[u8; 32]) -> Fake {
        Fake {
            cp,
            sp: *sp,
            dh: agree(private, sp),
        }
    }

    /// `sp || frame(s2c, counter 0, seq 0, payload)` under identity keys.
    fn identity_server_flight(&self, payload: &[u8]) -> Vec<u8> {
        let keys = derive_identity_keys(&self.dh, &self.cp, &self.sp);
        let mut out = self.sp.to_vec();
        Sealer::new(keys.server_to_client, Profile::Secure)
            .seal_append(0, payload, &mut out)
            .unwrap();
        out
    }

    /// A client frame (c2s, counter 0) under the `psk` keys for `psk`.
    fn psk_client_frame(&self, psk: &[u8; 32], seq: u32, payload: &[u8]) -> Vec<u8> {
        let keys = derive_psk_keys(psk, &self.dh, &self.cp, &self.sp);
        let mut out = Vec::new();
        Sealer::new(keys.client_to_server, Profile::Secure)
            .seal_append(seq, payload, &mut out)
            .unwrap();
        out
    }

    fn identity_client_frame(&self, payload: &[u8]) -> Vec<u8> {
        let keys = derive_identity_keys(&self.dh, &self.cp, &self.sp);
        let mut out = Vec::new();
        Sealer::new(keys.client_to_server, Profile::Secure)
            .seal_append(0, payload, &mut out)
            .unwrap();
        out
    }
}

/// Runs a real identity client against a hand-made server flight.
fn client_against(
    config: IdentityConfig,
    make_flight: impl FnOnce(&Fake) -> Vec<u8>,
) -> Result<usize, Error> {
    let mut client = IdentityHandshake::client(config).unwrap();
    let mut cp = Vec::new();
    client.write_output(&mut cp);
    let fake = Fake::server_for(&cp.try_into().unwrap());
    let flight = make_flight(&fake);
    let r = client.read_input(&flight);
    if r.is_err() {
        assert!(client.take_session().is_none());
        let mut out = Vec::new();
        client.write_output(&mut out);
        assert!(out.is_empty(), "nothing is sent after a rejection");
    }
    r
}

/// Runs a real identity server against a hand-made client frame.
fn server_against(
    config: IdentityConfig,
    make_frame: impl FnOnce(&Fake) -> Vec<u8>,
) -> Result<usize, Error> {
    let mut server = IdentityHandshake::server(config).unwrap();
    let (private, cp) = x25519_pair();
    assert_eq!(server.read_input(&cp).unwrap(), KEY_LEN);
    let mut flight = Vec::new();
    server.write_output(&mut flight);
    let fake = Fake::client_to(private, cp, flight[..32].try_into().unwrap());
    let frame = make_frame(&fake);
    let r = server.read_input(&frame);
    if r.is_err() {
        assert!(server.take_session().is_none());
    }
    r
}

// Checks a wrong PSK is REJECT_WRONG_PSK at the client (from the server's confirmation frame, before any application data), and a base `secure` client (no PSK) gets no session from a PSK server: its first application frame is REJECT_MALFORMED (not a confirmation).
#[test]
fn wrong_psk() {
    let mut client = PskHandshake::client([1; 32]).unwrap();
    let mut server = PskHandshake::server([2; 32]).unwrap();
    let fail = run(&mut client, &mut server, Cut::At(5), Cut::At(40)).unwrap_err();
    assert_eq!(fail.side, Role::Client);
    assert!(rejected(REJECT_WRONG_PSK)(&fail.err), "{fail:?}");

    // A base `secure` client talks to a PSK server: its first application
    // frame is not a confirmation (wrong length), and the server never
    // yields a session.
    let mut client = ClientHandshake::new(Profile::Secure).unwrap();
    let mut server = PskHandshake::server(PSK).unwrap();
    let mut cp = Vec::new();
    client.write_output(&mut cp);
    server.read_input(&cp).unwrap();
    let mut flight = Vec::new();
    server.write_output(&mut flight);
    assert!(server.take_session().is_none());
    client.read_input(&flight[..32]).unwrap();
    let mut c = client.take_session().unwrap();
    let mut wire = Vec::new();
    c.sealer.seal_append(1, b"hi", &mut wire).unwrap();
    let err = server.read_input(&wire).unwrap_err();
    assert!(rejected(REJECT_MALFORMED)(&err), "{err:?}");
    assert!(server.take_session().is_none());
}

/// The client's key-confirmation payload, as PROTOCOL.md spells it.
const CLIENT_CONFIRM: &[u8] = b"monte-rpc v1 psk client confirm";

/// Feeds `bytes` to a handshake whole or one byte at a time (re-feeding
/// nothing: every byte is consumed while the handshake runs), checking that
/// no session comes out before the last byte. Returns the bytes consumed or
/// the first error.
fn feed<H: Handshake + ?Sized>(hs: &mut H, bytes: &[u8], bytewise: bool) -> Result<usize, Error> {
    if !bytewise {
        return hs.read_input(bytes);
    }
    let mut used = 0;
    for (i, b) in bytes.iter().enumerate() {
        used += hs.read_input(std::slice::from_ref(b))?;
        if i + 1 < bytes.len() {
            hs.write_output(&mut Vec::new());
            assert!(
                hs.take_session().is_none(),
                "session after {} of {} bytes",
                i + 1,
                bytes.len()
            );
        }
    }
    Ok(used)
}

/// A PSK server that has read a hand-made client key and written its
/// flight, and the fake client's end of the exchange.
fn psk_server_after_flight() -> (PskHandshake, Fake) {
    let mut server = PskHandshake::server(PSK).unwrap();
    let (private, cp) = x25519_pair();
    assert_eq!(server.read_input(&cp).unwrap(), KEY_LEN);
    let mut flight = Vec::new();
    server.write_output(&mut flight);
    assert_eq!(flight.len(), KEY_LEN + 4 + 4 + PSK_CONFIRM.len() + 16);
    assert!(
        server.take_session().is_none(),
        "the server yielded a session before the client proved the PSK"
    );
    let fake = Fake::client_to(private, cp, flight[..32].try_into().unwrap());
    (server, fake)
}

// Checks a PSK server yields no session to a peer that has not proved the PSK: after its own flight it waits (empty reads, nothing more); a client confirmation sealed under another PSK (or the base secure keys) is REJECT_WRONG_PSK, a frame of another length (an application frame) or with the right keys but a wrong seq or payload REJECT_MALFORMED, whole or one byte at a time; the genuine confirmation yields the session only after its last byte, leaves a pipelined frame unconsumed, and hands over at counter 1.
#[test]
fn psk_server_waits_for_client_confirmation() {
    let (mut server, _) = psk_server_after_flight();
    for _ in 0..3 {
        assert_eq!(server.read_input(&[]).unwrap(), 0);
        let mut out = Vec::new();
        server.write_output(&mut out);
        assert!(out.is_empty());
        assert!(server.take_session().is_none());
    }

    type MakeFrame = fn(&Fake) -> Vec<u8>;
    let cases: [(&str, MakeFrame, u32); 6] = [
        (
            "confirmation under another PSK",
            |f| f.psk_client_frame(&[0x77; 32], 0, CLIENT_CONFIRM),
            REJECT_WRONG_PSK,
        ),
        (
            "confirmation under the base secure keys (no PSK)",
            |f| {
                let keys = derive_keys(Profile::Secure, &f.dh, &f.cp, &f.sp);
                let mut out = Vec::new();
                Sealer::new(keys.client_to_server, Profile::Secure)
                    .seal_append(0, CLIENT_CONFIRM, &mut out)
                    .unwrap();
                out
            },
            REJECT_WRONG_PSK,
        ),
        (
            "an application frame instead of the confirmation",
            |f| f.psk_client_frame(&PSK, 1, b"first request"),
            REJECT_MALFORMED,
        ),
        (
            "the server's confirmation payload",
            |f| {
                let mut p = PSK_CONFIRM.to_vec();
                p.resize(CLIENT_CONFIRM.len(), b'!');
                f.psk_client_frame(&PSK, 0, &p)
            },
            REJECT_MALFORMED,
        ),
        (
            "a non-zero seq",
            |f| f.psk_client_frame(&PSK, 1, CLIENT_CONFIRM),
            REJECT_MALFORMED,
        ),
        (
            "a truncated length prefix claim",
            |_| 10_000u32.to_be_bytes().to_vec(),
            REJECT_MALFORMED,
        ),
    ];
    for (name, make, code) in cases {
        for bytewise in [false, true] {
            let (mut server, fake) = psk_server_after_flight();
            let err = feed(&mut server, &make(&fake), bytewise).unwrap_err();
            assert!(
                rejected(code)(&err),
                "{name} (bytewise {bytewise}): {err:?}"
            );
            let mut out = Vec::new();
            server.write_output(&mut out);
            assert!(out.is_empty(), "{name}: output after a rejection");
            assert!(server.take_session().is_none(), "{name}: session");
            assert!(matches!(
                server.read_input(&[0]),
                Err(Error::Handshake(HandshakeError::AlreadyFinished))
            ));
        }
    }

    for bytewise in [false, true] {
        let (mut server, fake) = psk_server_after_flight();
        let confirm = fake.psk_client_frame(&PSK, 0, CLIENT_CONFIRM);
        assert_eq!(confirm.len(), 4 + 4 + CLIENT_CONFIRM.len() + 16);
        let mut input = confirm.clone();
        let keys = derive_psk_keys(&PSK, &fake.dh, &fake.cp, &fake.sp);
        let mut c2s =
            Sealer::with_counter(keys.client_to_server, 1, Profile::Secure.rekey_interval());
        c2s.seal_append(1, b"pipelined", &mut input).unwrap();
        let used = if bytewise {
            feed(&mut server, &confirm, true).unwrap()
        } else {
            server.read_input(&input).unwrap()
        };
        assert_eq!(used, confirm.len(), "consumed exactly the confirmation");
        server.write_output(&mut Vec::new());
        let mut s = server
            .take_session()
            .expect("session after the confirmation");
        assert_eq!((s.sealer.counter(), s.opener.counter()), (1, 1));
        let rest = &mut input[confirm.len()..];
        let (seq, body) = s.opener.open_in_place(rest).unwrap();
        assert_eq!((seq, &body[..]), (1, &b"pipelined"[..]));
        let mut s2c =
            Opener::with_counter(keys.server_to_client, 1, Profile::Secure.rekey_interval());
        let mut wire = Vec::new();
        s.sealer.seal_append(2, b"reply", &mut wire).unwrap();
        assert_eq!(s2c.open_in_place(&mut wire).unwrap().1, b"reply");
    }
}

// Checks an identity server with an allow-list yields no session before a valid client proof arrives (whole or one byte at a time), nor after an invalid one, and that a server without an allow-list yields its session right after its own flight.
#[test]
fn identity_server_session_waits_for_client_proof() {
    let (_, scfg) = mutual();
    let client_key = keypair(2);
    let start = |cfg: IdentityConfig| {
        let mut server = IdentityHandshake::server(cfg).unwrap();
        let (private, cp) = x25519_pair();
        assert_eq!(server.read_input(&cp).unwrap(), KEY_LEN);
        let mut flight = Vec::new();
        server.write_output(&mut flight);
        let fake = Fake::client_to(private, cp, flight[..32].try_into().unwrap());
        (server, fake)
    };
    for bytewise in [false, true] {
        let (mut server, fake) = start(scfg.clone());
        assert!(
            server.take_session().is_none(),
            "session before the client proof"
        );
        assert_eq!(server.read_input(&[]).unwrap(), 0);
        assert!(server.take_session().is_none());
        let frame = fake.identity_client_frame(&identity_payload(
            Role::Client,
            0,
            Some(&client_key),
            &fake.cp,
            &fake.sp,
        ));
        assert_eq!(feed(&mut server, &frame, bytewise).unwrap(), frame.len());
        server.write_output(&mut Vec::new());
        assert!(server.take_session().is_some());

        // Anonymous, or a proof by a key not on the list: never a session.
        for key in [None, Some(keypair(3))] {
            let (mut server, fake) = start(scfg.clone());
            let frame = fake.identity_client_frame(&identity_payload(
                Role::Client,
                0,
                key.as_deref(),
                &fake.cp,
                &fake.sp,
            ));
            assert!(feed(&mut server, &frame, bytewise).is_err());
            server.write_output(&mut Vec::new());
            assert!(server.take_session().is_none());
        }
    }
    // Without an allow-list the server asks for nothing: its session comes
    // right after its flight.
    let (mut server, _) = start(server_only().1);
    assert!(server.take_session().is_some());
}

// Checks a PSK confirmation frame with a bad length is REJECT_MALFORMED, from its prefix alone.
#[test]
fn psk_malformed_confirmation() {
    let mut client = PskHandshake::client(PSK).unwrap();
    let mut cp = Vec::new();
    client.write_output(&mut cp);
    let mut flight = [7u8; 32].to_vec();
    flight.extend_from_slice(&1000u32.to_be_bytes());
    assert!(rejected(REJECT_MALFORMED)(
        &client.read_input(&flight).unwrap_err()
    ));
}

// Checks a server proving another key than the pinned one is REJECT_UNKNOWN_KEY.
#[test]
fn wrong_pinned_key() {
    let (_, scfg) = server_only();
    let ccfg = IdentityConfig::pinned(identity_public_key(&keypair(9)));
    let fail = run(
        &mut IdentityHandshake::client(ccfg).unwrap(),
        &mut IdentityHandshake::server(scfg).unwrap(),
        Cut::At(3),
        Cut::At(70),
    )
    .unwrap_err();
    assert_eq!(fail.side, Role::Client);
    assert!(rejected(REJECT_UNKNOWN_KEY)(&fail.err), "{fail:?}");
}

// Checks missing identities: an anonymous server to a pinning client, and an anonymous client to a server with a client policy, are REJECT_MISSING_IDENTITY; an unlisted or refused client key is REJECT_UNKNOWN_KEY.
#[test]
fn missing_and_unknown_identities() {
    let (ccfg, _) = server_only();
    let fail = run(
        &mut IdentityHandshake::client(ccfg).unwrap(),
        &mut IdentityHandshake::server(IdentityConfig::default()).unwrap(),
        Cut::At(0),
        Cut::At(0),
    )
    .unwrap_err();
    assert_eq!(fail.side, Role::Client);
    assert!(rejected(REJECT_MISSING_IDENTITY)(&fail.err), "{fail:?}");

    let (ccfg, scfg) = mutual();
    let anonymous = IdentityConfig {
        identity: None,
        ..ccfg.clone()
    };
    let fail = run(
        &mut IdentityHandshake::client(anonymous).unwrap(),
        &mut IdentityHandshake::server(scfg.clone()).unwrap(),
        Cut::At(0),
        Cut::At(0),
    )
    .unwrap_err();
    assert_eq!(fail.side, Role::Server);
    assert!(rejected(REJECT_MISSING_IDENTITY)(&fail.err), "{fail:?}");

    let stranger = ccfg.clone().with_identity(keypair(3));
    let fail = run(
        &mut IdentityHandshake::client(stranger).unwrap(),
        &mut IdentityHandshake::server(scfg.clone()).unwrap(),
        Cut::At(0),
        Cut::At(0),
    )
    .unwrap_err();
    assert_eq!(fail.side, Role::Server);
    assert!(rejected(REJECT_UNKNOWN_KEY)(&fail.err), "{fail:?}");

    // A callback policy: sees only verified keys, and its answer decides.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let scfg = IdentityConfig::server(keypair(1)).allow_clients_with(move |k, peer| {
        assert_eq!(peer, None, "no address without server_for_peer");
        seen2.lock().unwrap().push(*k);
        k[0] % 2 == 0
    });
    let key2 = identity_public_key(&keypair(2));
    let key3 = identity_public_key(&keypair(3));
    for (client_key, ok) in [
        (keypair(2), key2[0] % 2 == 0),
        (keypair(3), key3[0] % 2 == 0),
    ] {
        let r = run(
            &mut IdentityHandshake::client(ccfg.clone().with_identity(client_key)).unwrap(),
            &mut IdentityHandshake::server(scfg.clone()).unwrap(),
            Cut::At(0),
            Cut::At(0),
        );
        match r {
            Ok(_) => assert!(ok),
            Err(fail) => {
                assert!(!ok);
                assert!(rejected(REJECT_UNKNOWN_KEY)(&fail.err), "{fail:?}");
            }
        }
    }
    assert_eq!(*seen.lock().unwrap(), vec![key2, key3]);
}

// Checks roles cannot be confused: a client-role proof presented by a server is REJECT_ROLE (label) or REJECT_BAD_SIGNATURE (relabelled), and the same for a server-role proof presented by a client.
#[test]
fn role_swap() {
    let server_key = keypair(1);
    let (ccfg, _) = server_only();
    // A client-role proof made by the pinned server key, presented as is.
    let r = client_against(ccfg.clone(), |f| {
        f.identity_server_flight(&identity_payload(
            Role::Client,
            0,
            Some(&server_key),
            &f.cp,
            &f.sp,
        ))
    });
    assert!(rejected(REJECT_ROLE)(&r.unwrap_err()));
    // The same client-role signature, relabelled as a server proof.
    let r = client_against(ccfg, |f| {
        let mut p = identity_payload(Role::Client, 0, Some(&server_key), &f.cp, &f.sp);
        p[..6].copy_from_slice(b"server");
        f.identity_server_flight(&p)
    });
    assert!(rejected(REJECT_BAD_SIGNATURE)(&r.unwrap_err()));

    // Toward a server: a server-role proof by an allowed client key.
    let (_, scfg) = mutual();
    let client_key = keypair(2);
    let r = server_against(scfg.clone(), |f| {
        f.identity_client_frame(&identity_payload(
            Role::Server,
            0,
            Some(&client_key),
            &f.cp,
            &f.sp,
        ))
    });
    assert!(rejected(REJECT_ROLE)(&r.unwrap_err()));
    let r = server_against(scfg.clone(), |f| {
        let mut p = identity_payload(Role::Server, 0, Some(&client_key), &f.cp, &f.sp);
        p[..6].copy_from_slice(b"client");
        f.identity_client_frame(&p)
    });
    assert!(rejected(REJECT_BAD_SIGNATURE)(&r.unwrap_err()));
    // A genuine client proof is accepted by the same fake path.
    let r = server_against(scfg, |f| {
        f.identity_client_frame(&identity_payload(
            Role::Client,
            0,
            Some(&client_key),
            &f.cp,
            &f.sp,
        ))
    });
    assert_eq!(r.unwrap(), 4 + 4 + 103 + 16);
}

/// The Ed25519 public key encodings of small-order points (order 1, 2, 4
/// and 8), their sign-bit variants and the non-canonical encodings of 0 and
/// 1 (y = p and y = p + 1).
fn small_order_ed25519_keys() -> Vec<[u8; 32]> {
    let canonical = [
        "0100000000000000000000000000000000000000000000000000000000000000",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "0000000000000000000000000000000000000000000000000000000000000000",
        "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",
        "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    ];
    let mut keys = Vec::new();
    for h in canonical {
        let key = unhex32(h);
        keys.push(key);
        let mut signed = key;
        signed[31] |= 0x80;
        keys.push(signed);
    }
    keys
}

/// An identity payload for `role` claiming `key`, with the signature
/// `R = identity point, s = 0`, which verifies for the identity key over any
/// message.
fn small_order_proof(role: Role, key: &[u8; 32]) -> Vec<u8> {
    let mut p = role_label(role).to_vec();
    p.push(0);
    p.extend_from_slice(key);
    let mut r = [0u8; 32];
    r[0] = 1;
    p.extend_from_slice(&r);
    p.extend_from_slice(&[0u8; 32]);
    p
}

// Checks a client "proof" by the identity point (key 01 00..00, signature R = identity, s = 0, which ring verifies over any message) and by every other small-order key encoding is REJECT_BAD_SIGNATURE at a server whose callback policy allows every key, and the callback never sees such a key.
#[test]
fn small_order_client_keys_are_rejected() {
    let seen = Arc::new(AtomicUsize::new(0));
    let seen2 = seen.clone();
    let allow_all = IdentityConfig::server(keypair(1)).allow_clients_with(move |_, _| {
        seen2.fetch_add(1, Ordering::SeqCst);
        true
    });
    for key in small_order_ed25519_keys() {
        let r = server_against(allow_all.clone(), |f| {
            f.identity_client_frame(&small_order_proof(Role::Client, &key))
        });
        assert!(
            matches!(&r, Err(e) if rejected(REJECT_BAD_SIGNATURE)(e)),
            "small-order key {} accepted: {r:?}",
            hex(&key)
        );
    }
    assert_eq!(
        seen.load(Ordering::SeqCst),
        0,
        "the callback saw a small-order key"
    );

    // The other way: a server "proving" a small-order key to a client that
    // pins nothing (which would accept any genuine key).
    for key in small_order_ed25519_keys() {
        assert!(is_small_order_ed25519(&key));
        let r = client_against(IdentityConfig::unpinned_client(), |f| {
            f.identity_server_flight(&small_order_proof(Role::Server, &key))
        });
        assert!(
            matches!(&r, Err(e) if rejected(REJECT_BAD_SIGNATURE)(e)),
            "small-order key {} accepted: {r:?}",
            hex(&key)
        );
    }
    // Genuine keys are not on the list.
    for seed in 0..=255u8 {
        assert!(!is_small_order_ed25519(&identity_public_key(&keypair(
            seed
        ))));
    }
}

// Checks an identity client config without a pin (a server's config reused, or the default) fails closed: creating the client handshake is an error that says a pin is required, directly and through the factory.
#[test]
fn identity_client_without_pin_fails_closed() {
    let no_pin = |e: &Error| {
        matches!(
            e.root_cause(),
            Error::Handshake(HandshakeError::NoPinnedServer)
        )
    };
    for cfg in [
        IdentityConfig::server(keypair(1)),
        IdentityConfig::default(),
        IdentityConfig::default().with_identity(keypair(2)),
    ] {
        let r = IdentityHandshake::client(cfg.clone());
        let err = r.err().expect("an unpinned identity client was created");
        assert!(err.to_string().contains("pin"), "{err}");
        assert!(no_pin(&err), "{err:?}");
        let r = HandshakeFactory::client(&cfg);
        assert!(
            matches!(&r, Err(e) if no_pin(e)),
            "factory made an unpinned identity client"
        );
        // The server side of the same config is fine.
        assert!(HandshakeFactory::server(&cfg).is_ok());
    }
    // Through Client: the request fails with the same error.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let client = Client::new(
        listener.local_addr().unwrap(),
        client_config(Arc::new(IdentityConfig::server(keypair(1)))),
    );
    match client {
        Ok(client) => {
            let err = client.request(b"x", &mut Vec::new()).unwrap_err();
            assert!(no_pin(&err), "{err:?}");
            client.shutdown();
        }
        Err(err) => assert!(no_pin(&err), "{err:?}"),
    }
}

// Checks the explicit opt-outs: IdentityConfig::unpinned_client() and .allow_unpinned_server() make clients that accept any server (and then record the server's key in the session), with or without a client identity.
#[test]
fn unpinned_identity_client_by_choice() {
    let (_, scfg) = server_only();
    let (_, mutual_scfg) = mutual();
    for (ccfg, scfg) in [
        (IdentityConfig::unpinned_client(), scfg.clone()),
        (IdentityConfig::default().allow_unpinned_server(), scfg),
        (
            IdentityConfig::unpinned_client().with_identity(keypair(2)),
            mutual_scfg,
        ),
    ] {
        let (c, _) = run(
            &mut IdentityHandshake::client(ccfg.clone()).unwrap(),
            &mut IdentityHandshake::server(scfg).unwrap(),
            Cut::At(7),
            Cut::Bytewise,
        )
        .unwrap();
        assert_eq!(c.peer_identity, Some(identity_public_key(&keypair(1))));
        assert!(HandshakeFactory::client(&ccfg).is_ok());
    }
}

// Checks the factory's server_for_peer passes the connection's address to an allow_clients_with callback (and server() passes None), that the callback's answer decides, and that the default server_for_peer of other factories still makes working handshakes.
#[test]
fn client_policy_sees_peer_address() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    let seen2 = seen.clone();
    let allowed: SocketAddr = "192.0.2.7:4000".parse().unwrap();
    let scfg = IdentityConfig::server(keypair(1)).allow_clients_with(move |k, peer| {
        seen2.lock().unwrap().push((*k, peer));
        peer == Some(allowed)
    });
    let (ccfg, _) = mutual();
    let client_key = identity_public_key(&keypair(2));
    let other: SocketAddr = "[2001:db8::1]:99".parse().unwrap();
    for (peer, ok) in [(Some(allowed), true), (Some(other), false), (None, false)] {
        let mut server = match peer {
            Some(_) => scfg.server_for_peer(peer).unwrap(),
            None => HandshakeFactory::server(&scfg).unwrap(),
        };
        let mut client = HandshakeFactory::client(&ccfg).unwrap();
        match run(client.as_mut(), server.as_mut(), Cut::At(40), Cut::At(40)) {
            Ok((_, s)) => {
                assert!(ok, "{peer:?}");
                assert_eq!(s.peer_identity, Some(client_key));
            }
            Err(fail) => {
                assert!(!ok, "{peer:?}: {fail:?}");
                assert_eq!(fail.side, Role::Server);
                assert!(rejected(REJECT_UNKNOWN_KEY)(&fail.err), "{fail:?}");
            }
        }
    }
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            (client_key, Some(allowed)),
            (client_key, Some(other)),
            (client_key, None)
        ]
    );
    // Factories without an override: server_for_peer is server().
    let factories: Vec<Arc<dyn HandshakeFactory>> = vec![
        Arc::new(Profile::Secure),
        Arc::new(PskHandshake::factory(PSK)),
    ];
    for f in factories {
        let mut client = f.client().unwrap();
        let mut server = f.server_for_peer(Some(allowed)).unwrap();
        run(client.as_mut(), server.as_mut(), Cut::At(3), Cut::At(3)).unwrap();
    }
}

// Checks a server flight recorded from one session and replayed to a new client fails to open: Error::Authentication.
#[test]
fn replayed_identity_frame() {
    let (ccfg, scfg) = server_only();
    let mut client = IdentityHandshake::client(ccfg.clone()).unwrap();
    let mut server = IdentityHandshake::server(scfg).unwrap();
    let mut cp = Vec::new();
    client.write_output(&mut cp);
    server.read_input(&cp).unwrap();
    let mut recorded = Vec::new();
    server.write_output(&mut recorded);
    client.read_input(&recorded).unwrap();

    let mut victim = IdentityHandshake::client(ccfg.clone()).unwrap();
    victim.write_output(&mut Vec::new());
    assert!(matches!(
        victim.read_input(&recorded),
        Err(Error::Authentication)
    ));

    // Only the identity frame replayed behind a fresh attacker key.
    let r = client_against(ccfg, |f| {
        let mut flight = f.sp.to_vec();
        flight.extend_from_slice(&recorded[32..]);
        flight
    });
    assert!(matches!(r, Err(Error::Authentication)));
}

// Checks a truncated signature (inside a validly sealed frame) is REJECT_MALFORMED, a flipped signature bit REJECT_BAD_SIGNATURE, a flipped ciphertext bit Error::Authentication, and unknown flags REJECT_MALFORMED.
#[test]
fn malformed_identity_frames() {
    let server_key = keypair(1);
    let (ccfg, _) = server_only();
    let r = client_against(ccfg.clone(), |f| {
        let mut p = identity_payload(Role::Server, 0, Some(&server_key), &f.cp, &f.sp);
        p.pop();
        f.identity_server_flight(&p)
    });
    assert!(rejected(REJECT_MALFORMED)(&r.unwrap_err()));
    let r = client_against(ccfg.clone(), |f| {
        let mut p = identity_payload(Role::Server, 0, Some(&server_key), &f.cp, &f.sp);
        *p.last_mut().unwrap() ^= 1;
        f.identity_server_flight(&p)
    });
    assert!(rejected(REJECT_BAD_SIGNATURE)(&r.unwrap_err()));
    let r = client_against(ccfg.clone(), |f| {
        let mut flight = f.identity_server_flight(&identity_payload(
            Role::Server,
            0,
            Some(&server_key),
            &f.cp,
            &f.sp,
        ));
        flight[50] ^= 1;
        flight
    });
    assert!(matches!(r, Err(Error::Authentication)));
    let r = client_against(ccfg.clone(), |f| {
        f.identity_server_flight(&identity_payload(
            Role::Server,
            0x80,
            Some(&server_key),
            &f.cp,
            &f.sp,
        ))
    });
    assert!(rejected(REJECT_MALFORMED)(&r.unwrap_err()));
    let r = client_against(ccfg, |f| {
        f.identity_server_flight(&identity_payload(
            Role::Server,
            0,
            Some(&server_key),
            &f.sp,
            &f.cp,
        ))
    });
    assert!(
        rejected(REJECT_BAD_SIGNATURE)(&r.unwrap_err()),
        "keys swapped"
    );
}

// Checks a protocol-aware relay (knows the identity key schedule, re-seals the real server's proof for the client) is REJECT_BAD_SIGNATURE: the proof is bound to the attacker's ephemeral keys, not the client's.
#[test]
fn identity_relay_attack() {
    let (ccfg, scfg) = server_only();
    let mut server = IdentityHandshake::server(scfg).unwrap();
    let (private, attacker_cp) = x25519_pair();
    server.read_input(&attacker_cp).unwrap();
    let mut real = Vec::new();
    server.write_output(&mut real);
    let toward_server = Fake::client_to(private, attacker_cp, real[..32].try_into().unwrap());
    let keys = derive_identity_keys(&toward_server.dh, &toward_server.cp, &toward_server.sp);
    let mut frame = real[32..].to_vec();
    let (_, proof) = Opener::new(keys.server_to_client, Profile::Secure)
        .open_in_place(&mut frame)
        .unwrap();
    let proof = proof.to_vec();
    let r = client_against(ccfg, |f| f.identity_server_flight(&proof));
    assert!(rejected(REJECT_BAD_SIGNATURE)(&r.unwrap_err()));
}

// --------------------------------------------------------- over loopback

#[derive(Default)]
struct Record {
    opens: AtomicUsize,
    messages: AtomicUsize,
    closes: Mutex<Vec<Error>>,
    handshake_failures: Mutex<Vec<Error>>,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Record>);

impl Handler for Recorder {
    fn on_message(&self, ctx: &mut Context<'_>) {
        self.0.messages.fetch_add(1, Ordering::SeqCst);
        if ctx.expects_reply() {
            let mut body = ctx.body().to_vec();
            body.reverse();
            let _ = ctx.reply(&body);
        }
    }
    fn on_open(&self, _conn: &Connection) {
        self.0.opens.fetch_add(1, Ordering::SeqCst);
    }
    fn on_close(&self, _conn: &Connection, reason: &Error) {
        self.0.closes.lock().unwrap().push(reason.clone());
    }
    fn on_handshake_failed(&self, _peer: Option<SocketAddr>, error: &Error) {
        self.0
            .handshake_failures
            .lock()
            .unwrap()
            .push(error.clone());
    }
}

fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        thread::sleep(Duration::from_millis(5));
    }
    cond()
}

fn client_config(factory: Arc<dyn HandshakeFactory>) -> Config {
    Config::default()
        .handshake(factory)
        .workers(1)
        .max_conns(1)
        .dial_attempts(1)
        .handshake_timeout(Some(Duration::from_secs(3)))
        .request_timeout(Some(Duration::from_secs(3)))
}

fn server_config(factory: Arc<dyn HandshakeFactory>) -> Config {
    Config::server()
        .handshake(factory)
        .workers(1)
        .handshake_timeout(Some(Duration::from_secs(3)))
}

// Checks PSK, server-only identity and mutual identity Client/Server pairs do real requests over loopback, from several threads.
#[test]
fn authenticated_pairs_over_loopback() {
    let (c_so, s_so) = server_only();
    let (c_mu, s_mu) = mutual();
    let pairs: Vec<Pair> = vec![
        (
            "psk",
            Arc::new(PskHandshake::factory(PSK)),
            Arc::new(PskHandshake::factory(PSK)),
        ),
        ("identity", Arc::new(c_so), Arc::new(s_so)),
        ("mutual", Arc::new(c_mu), Arc::new(s_mu)),
    ];
    for (name, cf, sf) in pairs {
        let rec = Recorder::default();
        let server = Server::bind("127.0.0.1:0", server_config(sf), rec.clone()).unwrap();
        let client = Client::new(server.local_addr(), client_config(cf).max_conns(3)).unwrap();
        thread::scope(|s| {
            for t in 0..3u8 {
                let client = &client;
                s.spawn(move || {
                    let mut resp = Vec::new();
                    for i in 0..50u8 {
                        let body = [t, i, 1, 2, 3];
                        client.request(&body, &mut resp).unwrap();
                        let mut rev = body.to_vec();
                        rev.reverse();
                        assert_eq!(resp, rev, "{name}");
                    }
                });
            }
        });
        client.send(b"no reply").unwrap();
        assert!(wait_until(Duration::from_secs(5), || rec
            .0
            .messages
            .load(Ordering::SeqCst)
            == 151));
        assert!(rec.0.opens.load(Ordering::SeqCst) >= 1, "{name}");
        client.shutdown();
        server.shutdown();
    }
}

// Checks the errors a wrong PSK and a wrong pin give through Client::request.
#[test]
fn wrong_credentials_over_loopback() {
    let rec = Recorder::default();
    let server = Server::bind(
        "127.0.0.1:0",
        server_config(Arc::new(PskHandshake::factory(PSK))),
        rec.clone(),
    )
    .unwrap();
    let client = Client::new(
        server.local_addr(),
        client_config(Arc::new(PskHandshake::factory([3; 32]))),
    )
    .unwrap();
    let err = client.request(b"secret", &mut Vec::new()).unwrap_err();
    assert!(rejected(REJECT_WRONG_PSK)(&err), "{err:?}");
    assert_eq!(rec.0.messages.load(Ordering::SeqCst), 0);
    server.shutdown();

    let rec = Recorder::default();
    let server = Server::bind(
        "127.0.0.1:0",
        server_config(Arc::new(server_only().1)),
        rec.clone(),
    )
    .unwrap();
    let client = Client::new(
        server.local_addr(),
        client_config(Arc::new(IdentityConfig::pinned([7; 32]))),
    )
    .unwrap();
    let err = client.request(b"secret", &mut Vec::new()).unwrap_err();
    assert!(rejected(REJECT_UNKNOWN_KEY)(&err), "{err:?}");
    assert_eq!(rec.0.messages.load(Ordering::SeqCst), 0);
    server.shutdown();
}

/// What the man in the middle saw.
#[derive(Default)]
struct ProxyLog {
    plaintexts: Mutex<Vec<Vec<u8>>>,
    failed_opens: AtomicUsize,
    injected: AtomicUsize,
}

const INJECTED: &[u8] = b"injected by the proxy";

/// Accepts one client, dials `server`, runs its own base `secure`
/// handshakes with each side, then relays: frames it can open are logged
/// and re-sealed; frames it cannot are forwarded untouched. When the client
/// hangs up before the proxy read anything, it tries a forged request of its
/// own on the server.
fn start_proxy(server: SocketAddr) -> (SocketAddr, Arc<ProxyLog>, thread::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let log = Arc::new(ProxyLog::default());
    let log2 = log.clone();
    let handle = thread::spawn(move || {
        let (mut client_sock, _) = listener.accept().unwrap();
        let mut server_sock = TcpStream::connect(server).unwrap();
        for s in [&client_sock, &server_sock] {
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        }
        // As a server toward the client.
        let mut toward_client = ServerHandshake::new(Profile::Secure).unwrap();
        let mut cp = [0u8; 32];
        client_sock.read_exact(&mut cp).unwrap();
        toward_client.read_input(&cp).unwrap();
        let mut out = Vec::new();
        toward_client.write_output(&mut out);
        client_sock.write_all(&out).unwrap();
        let to_client = toward_client.take_session().unwrap();
        // As a client toward the server.
        let mut toward_server = ClientHandshake::new(Profile::Secure).unwrap();
        out.clear();
        toward_server.write_output(&mut out);
        server_sock.write_all(&out).unwrap();
        let mut sp = [0u8; 32];
        server_sock.read_exact(&mut sp).unwrap();
        toward_server.read_input(&sp).unwrap();
        let to_server = toward_server.take_session().unwrap();

        let c2s = {
            let (from, to) = (
                client_sock.try_clone().unwrap(),
                server_sock.try_clone().unwrap(),
            );
            let (opener, sealer, log) = (to_client.opener, to_server.sealer, log2.clone());
            thread::spawn(move || pump(from, to, opener, sealer, &log, true))
        };
        pump(
            server_sock,
            client_sock,
            to_server.opener,
            to_client.sealer,
            &log2,
            false,
        );
        c2s.join().unwrap();
    });
    (addr, log, handle)
}

fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    mut opener: Opener,
    mut sealer: Sealer,
    log: &ProxyLog,
    inject: bool,
) {
    let decoder = FrameDecoder::new(1 << 20);
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let mut opened = 0;
    let mut raw = false;
    loop {
        let n = match from.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        loop {
            if raw {
                let _ = to.write_all(&buf);
                buf.clear();
                break;
            }
            match decoder.decode(&buf) {
                Ok(Decoded::Frame(len)) => {
                    let mut frame = buf[..len].to_vec();
                    match opener.open_in_place(&mut frame) {
                        Ok((seq, payload)) => {
                            opened += 1;
                            log.plaintexts.lock().unwrap().push(payload.to_vec());
                            let mut out = Vec::new();
                            sealer.seal_append(seq, payload, &mut out).unwrap();
                            let _ = to.write_all(&out);
                        }
                        Err(_) => {
                            log.failed_opens.fetch_add(1, Ordering::SeqCst);
                            let _ = to.write_all(&buf[..len]);
                        }
                    }
                    buf.drain(..len);
                }
                Ok(Decoded::NeedMore(_)) => break,
                Err(_) => raw = true,
            }
        }
    }
    if inject && opened == 0 {
        let mut out = Vec::new();
        sealer.seal_append(1, INJECTED, &mut out).unwrap();
        if to.write_all(&out).is_ok() {
            log.injected.fetch_add(1, Ordering::SeqCst);
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}

// Checks a man in the middle running its own base handshakes with each side: under `secure` it reads the request and the request still succeeds; under `psk` and `identity` the client's request fails and no application plaintext reaches the proxy; under `identity` the server closes the proxy's connection with Error::Authentication (its forged request does not open), under `psk` the server never opens it (no on_open; its handshake fails on the forged frame, which is no client confirmation).
#[test]
fn man_in_the_middle() {
    let (c_id, s_id) = server_only();
    let cases: Vec<Pair> = vec![
        (
            "secure",
            Arc::new(Profile::Secure),
            Arc::new(Profile::Secure),
        ),
        (
            "psk",
            Arc::new(PskHandshake::factory(PSK)),
            Arc::new(PskHandshake::factory(PSK)),
        ),
        ("identity", Arc::new(c_id), Arc::new(s_id)),
    ];
    for (name, cf, sf) in cases {
        let rec = Recorder::default();
        let server = Server::bind("127.0.0.1:0", server_config(sf), rec.clone()).unwrap();
        let (proxy_addr, log, proxy) = start_proxy(server.local_addr());
        let client = Client::new(proxy_addr, client_config(cf)).unwrap();
        let body = b"top secret request".to_vec();
        let mut resp = Vec::new();
        let result = client.request(&body, &mut resp);
        client.shutdown();
        let seen = log.plaintexts.lock().unwrap().clone();
        match name {
            "secure" => {
                result.unwrap();
                let mut rev = body.clone();
                rev.reverse();
                assert_eq!(resp, rev);
                assert!(seen.contains(&body), "the proxy read the request");
                assert!(seen.contains(&rev), "the proxy read the response");
            }
            _ => {
                let err = result.unwrap_err();
                eprintln!("{name}: client error: {err:?}");
                match name {
                    "psk" => assert!(rejected(REJECT_WRONG_PSK)(&err), "{err:?}"),
                    _ => assert!(matches!(err.root_cause(), Error::Authentication), "{err:?}"),
                }
                proxy.join().unwrap();
                assert!(seen.is_empty(), "{name}: the proxy read {seen:?}");
                assert!(log.failed_opens.load(Ordering::SeqCst) >= 1);
                assert_eq!(log.injected.load(Ordering::SeqCst), 1);
                let ended = || {
                    !rec.0.closes.lock().unwrap().is_empty()
                        || !rec.0.handshake_failures.lock().unwrap().is_empty()
                };
                assert!(wait_until(Duration::from_secs(5), ended));
                let closes = rec.0.closes.lock().unwrap().clone();
                let failures = rec.0.handshake_failures.lock().unwrap().clone();
                eprintln!("{name}: server on_close: {closes:?}, handshake failed: {failures:?}");
                if name == "psk" {
                    // The proxy never proved the PSK, so the server never
                    // opened its connection: the forged frame ended the
                    // handshake (not a confirmation).
                    assert_eq!(rec.0.opens.load(Ordering::SeqCst), 0, "psk: opened");
                    assert!(closes.is_empty(), "psk: {closes:?}");
                    assert!(
                        matches!(
                            failures[..],
                            [Error::Handshake(HandshakeError::Rejected(_))]
                        ),
                        "psk: {failures:?}"
                    );
                } else {
                    assert!(failures.is_empty(), "{name}: {failures:?}");
                }
                assert!(
                    closes.iter().all(|e| matches!(
                        e,
                        Error::Authentication | Error::Handshake(HandshakeError::Rejected(_))
                    )),
                    "{name}: {closes:?}"
                );
                assert_eq!(rec.0.messages.load(Ordering::SeqCst), 0, "{name}");
                server.shutdown();
                continue;
            }
        }
        server.shutdown();
        proxy.join().unwrap();
    }
}

// ------------------------------------------------------------------ vectors

/// The secure vectors' fixed X25519 exchange.
fn base_exchange() -> ([u8; 32], [u8; 32], [u8; 32]) {
    let text = std::fs::read_to_string(vector_path("v1-secure.json")).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let get = |k: &str| unhex32(v[k].as_str().unwrap());
    (
        get("x25519_shared_secret"),
        get("client_public"),
        get("server_public"),
    )
}

fn vector_path(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/vectors")
        .join(name)
}

/// PKCS#8 v2 (RFC 5958) for an Ed25519 seed, as ring writes it.
fn pkcs8_v2(seed: &[u8; 32], public: &[u8; 32]) -> Vec<u8> {
    let mut der = hex_bytes("3053020101300506032b657004220420");
    der.extend_from_slice(seed);
    der.extend_from_slice(&hex_bytes("a123032100"));
    der.extend_from_slice(public);
    der
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

fn frame_json(sealer: &mut Sealer, seq: u32, payload: &[u8]) -> Value {
    let counter = sealer.counter();
    let mut wire = Vec::new();
    sealer.seal_append(seq, payload, &mut wire).unwrap();
    json!({"seq": seq, "counter": counter, "payload": hex(payload), "wire": hex(&wire)})
}

fn psk_vectors() -> Value {
    let (dh, cp, sp) = base_exchange();
    let psk: [u8; 32] = std::array::from_fn(|i| 0x80 + i as u8);
    let keys = derive_psk_keys(&psk, &dh, &cp, &sp);
    let base = derive_keys(Profile::Secure, &dh, &cp, &sp);
    assert_ne!(keys, base);
    let mut s2c = Sealer::new(keys.server_to_client, Profile::Secure);
    let mut c2s = Sealer::new(keys.client_to_server, Profile::Secure);
    let confirm = frame_json(&mut s2c, 0, PSK_CONFIRM);
    let mut flight = sp.to_vec();
    flight.extend_from_slice(&hex_bytes(confirm["wire"].as_str().unwrap()));
    let client_confirm = frame_json(&mut c2s, 0, PSK_CLIENT_CONFIRM);
    let app_c2s = vec![
        frame_json(&mut c2s, 1, b"hello psk"),
        frame_json(&mut c2s, 0, b""),
    ];
    let app_s2c = vec![
        frame_json(&mut s2c, 1, b"ksp olleh"),
        frame_json(&mut s2c, 2, &(0..64u8).collect::<Vec<_>>()),
    ];
    json!({
        "profile": "psk",
        "spec": "PROTOCOL.md",
        "psk": hex(&psk),
        "client_public": hex(&cp),
        "server_public": hex(&sp),
        "x25519_shared_secret": hex(&dh),
        "key_client_to_server": hex(&keys.client_to_server),
        "key_server_to_client": hex(&keys.server_to_client),
        "confirm_frame": confirm,
        "server_flight": hex(&flight),
        "client_confirm_frame": client_confirm,
        "client_to_server": app_c2s,
        "server_to_client": app_s2c,
    })
}

fn identity_vectors() -> Value {
    let (dh, cp, sp) = base_exchange();
    let server_seed: [u8; 32] = std::array::from_fn(|i| 0xc0 + i as u8);
    let client_seed: [u8; 32] = std::array::from_fn(|i| 0xe0 + i as u8);
    let server_kp = Ed25519KeyPair::from_seed_unchecked(&server_seed).unwrap();
    let client_kp = Ed25519KeyPair::from_seed_unchecked(&client_seed).unwrap();
    let server_pub = identity_public_key(&server_kp);
    let client_pub = identity_public_key(&client_kp);
    let keys = derive_identity_keys(&dh, &cp, &sp);

    let scenario = |mutual: bool| -> Value {
        let flags = if mutual {
            FLAG_CLIENT_IDENTITY_REQUIRED
        } else {
            0
        };
        let mut s2c = Sealer::new(keys.server_to_client, Profile::Secure);
        let mut c2s = Sealer::new(keys.client_to_server, Profile::Secure);
        let server_payload = identity_payload(Role::Server, flags, Some(&server_kp), &cp, &sp);
        let server_frame = frame_json(&mut s2c, 0, &server_payload);
        let mut flight = sp.to_vec();
        flight.extend_from_slice(&hex_bytes(server_frame["wire"].as_str().unwrap()));
        let client_frame = if mutual {
            let p = identity_payload(Role::Client, 0, Some(&client_kp), &cp, &sp);
            frame_json(&mut c2s, 0, &p)
        } else {
            Value::Null
        };
        json!({
            "server_payload": hex(&server_payload),
            "server_frame": server_frame,
            "server_flight": hex(&flight),
            "client_frame": client_frame,
            "client_to_server": [frame_json(&mut c2s, 1, b"hello identity")],
            "server_to_client": [frame_json(&mut s2c, 1, b"ytitnedi olleh")],
        })
    };
    let st = identity_transcript(Role::Server, &cp, &sp);
    let ct = identity_transcript(Role::Client, &cp, &sp);
    json!({
        "profile": "identity",
        "spec": "PROTOCOL.md",
        "client_public": hex(&cp),
        "server_public": hex(&sp),
        "x25519_shared_secret": hex(&dh),
        "key_client_to_server": hex(&keys.client_to_server),
        "key_server_to_client": hex(&keys.server_to_client),
        "server_identity_seed": hex(&server_seed),
        "server_identity_public": hex(&server_pub),
        "server_identity_pkcs8": hex(&pkcs8_v2(&server_seed, &server_pub)),
        "client_identity_seed": hex(&client_seed),
        "client_identity_public": hex(&client_pub),
        "client_identity_pkcs8": hex(&pkcs8_v2(&client_seed, &client_pub)),
        "server_transcript": hex(&st),
        "server_signature": hex(server_kp.sign(&st).as_ref()),
        "client_transcript": hex(&ct),
        "client_signature": hex(client_kp.sign(&ct).as_ref()),
        "server_only": scenario(false),
        "mutual": scenario(true),
    })
}

const VECTORS: [(&str, MakeVector); 2] = [
    ("auth-psk.json", psk_vectors),
    ("auth-identity.json", identity_vectors),
];

// Writes the vector files (only with MONTE_WRITE_AUTH_VECTORS=1).
#[test]
fn write_vectors() {
    if std::env::var_os("MONTE_WRITE_AUTH_VECTORS").is_none() {
        return;
    }
    for (name, make) in VECTORS {
        let text = serde_json::to_string_pretty(&make()).unwrap() + "\n";
        std::fs::write(vector_path(name), text).unwrap();
    }
}

// Checks every byte of tests/vectors/auth-*.json is reproduced from its fixed inputs, that the PKCS#8 documents load in ring with the listed public keys, that the signatures verify, and that every listed frame opens under the listed keys at its counter.
#[test]
fn vectors_reproduce() {
    for (name, make) in VECTORS {
        let text = std::fs::read_to_string(vector_path(name)).unwrap();
        let stored: Value = serde_json::from_str(&text).unwrap();
        assert_eq!(make(), stored, "{name} differs from its derivation");
    }
    let v: Value =
        serde_json::from_str(&std::fs::read_to_string(vector_path("auth-identity.json")).unwrap())
            .unwrap();
    for who in ["server", "client"] {
        let kp = Ed25519KeyPair::from_pkcs8(&hex_bytes(
            v[format!("{who}_identity_pkcs8")].as_str().unwrap(),
        ))
        .unwrap();
        assert_eq!(
            hex(&identity_public_key(&kp)),
            v[format!("{who}_identity_public")].as_str().unwrap()
        );
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ED25519,
            hex_bytes(v[format!("{who}_identity_public")].as_str().unwrap()),
        )
        .verify(
            &hex_bytes(v[format!("{who}_transcript")].as_str().unwrap()),
            &hex_bytes(v[format!("{who}_signature")].as_str().unwrap()),
        )
        .unwrap();
    }
    // Frames open under the listed keys, in counter order per direction.
    for (file, groups) in [
        ("auth-psk.json", vec![""]),
        ("auth-identity.json", vec!["server_only", "mutual"]),
    ] {
        let v: Value =
            serde_json::from_str(&std::fs::read_to_string(vector_path(file)).unwrap()).unwrap();
        for g in groups {
            let scope = if g.is_empty() { &v } else { &v[g] };
            let mut c2s_frames: Vec<&Value> = Vec::new();
            let mut s2c_frames: Vec<&Value> = Vec::new();
            for k in ["confirm_frame", "server_frame"] {
                if scope[k].is_object() {
                    s2c_frames.push(&scope[k]);
                }
            }
            for k in ["client_confirm_frame", "client_frame"] {
                if scope[k].is_object() {
                    c2s_frames.push(&scope[k]);
                }
            }
            c2s_frames.extend(scope["client_to_server"].as_array().unwrap());
            s2c_frames.extend(scope["server_to_client"].as_array().unwrap());
            for (frames, key) in [
                (c2s_frames, "key_client_to_server"),
                (s2c_frames, "key_server_to_client"),
            ] {
                let mut opener = Opener::new(unhex32(v[key].as_str().unwrap()), Profile::Secure);
                for f in frames {
                    assert_eq!(f["counter"].as_u64().unwrap(), opener.counter());
                    let mut wire = hex_bytes(f["wire"].as_str().unwrap());
                    let (seq, payload) = opener.open_in_place(&mut wire).unwrap();
                    assert_eq!(seq as u64, f["seq"].as_u64().unwrap());
                    assert_eq!(hex(payload), f["payload"].as_str().unwrap());
                }
            }
        }
    }
}

// --------------------------------------------------------------- cost

// Measures in-memory handshake cost per mode (run with --ignored --nocapture in release).
#[test]
#[ignore]
fn handshake_cost() {
    let (c_so, s_so) = server_only();
    let (c_mu, s_mu) = mutual();
    let modes: Vec<Pair> = vec![
        (
            "secure",
            Arc::new(Profile::Secure),
            Arc::new(Profile::Secure),
        ),
        (
            "psk",
            Arc::new(PskHandshake::factory(PSK)),
            Arc::new(PskHandshake::factory(PSK)),
        ),
        ("identity", Arc::new(c_so), Arc::new(s_so)),
        ("identity-mutual", Arc::new(c_mu), Arc::new(s_mu)),
    ];
    for (name, cf, sf) in modes {
        let n = 2000;
        let start = Instant::now();
        for _ in 0..n {
            let mut c = cf.client().unwrap();
            let mut s = sf.server().unwrap();
            run(
                c.as_mut(),
                s.as_mut(),
                Cut::At(usize::MAX),
                Cut::At(usize::MAX),
            )
            .unwrap();
        }
        let per = start.elapsed() / n;
        println!("{name}: {per:?} per handshake (both sides, one thread)");
    }
}
