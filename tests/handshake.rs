//! In-memory handshake tests through the public API: the specification's
//! X25519 handshake for both profiles under every split of its input,
//! pipelined first frames, low-order public keys, finished handshakes,
//! profile mismatches, and a user-defined handshake driven generically.

use std::sync::atomic::{AtomicU64, Ordering};

use monte_rpc::protocol::wire::{Decoded, FrameDecoder};
use monte_rpc::protocol::{
    derive_keys, ClientHandshake, Handshake, HandshakeFactory, Profile, Role, ServerHandshake,
    Session, KEY_LEN,
};
use monte_rpc::{Error, HandshakeError};

const PROFILES: [Profile; 2] = [Profile::Secure, Profile::Monte];

/// Splits `bytes` at the sorted offsets in `cuts`, keeping empty chunks
/// except a trailing one (an empty read after the handshake has finished is
/// an error by contract, an empty read before it is not).
fn split_at_cuts<'a>(bytes: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut chunks = Vec::new();
    let mut start = 0;
    for &cut in cuts {
        assert!(cut >= start && cut <= bytes.len(), "cuts must be sorted");
        chunks.push(&bytes[start..cut]);
        start = cut;
    }
    chunks.push(&bytes[start..]);
    while chunks.len() > 1 && chunks.last().is_some_and(|c| c.is_empty()) {
        chunks.pop();
    }
    chunks
}

/// Every offset of a 32-byte key: one byte at a time.
fn one_byte_at_a_time() -> Vec<usize> {
    (1..KEY_LEN).collect()
}

/// Runs the specification's handshake with the client's key cut at
/// `c2s_cuts` and the server's key cut at `s2c_cuts`, checking the state
/// machines step by step, and returns (client, server) sessions.
fn split_handshake(profile: Profile, c2s_cuts: &[usize], s2c_cuts: &[usize]) -> (Session, Session) {
    let mut client = ClientHandshake::new(profile).unwrap();
    let mut server = ServerHandshake::new(profile).unwrap();

    let mut c2s = Vec::new();
    client.write_output(&mut c2s);
    assert_eq!(
        &c2s[..],
        client.public_key(),
        "client speaks first: its raw key"
    );
    assert!(client.take_session().is_none());

    let mut s2c = Vec::new();
    server.write_output(&mut s2c);
    assert!(
        s2c.is_empty(),
        "server must not speak before it has the client key"
    );
    assert!(server.take_session().is_none());
    assert!(
        server.public_key().is_none(),
        "server key made before the client's key arrived"
    );

    let chunks = split_at_cuts(&c2s, c2s_cuts);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(server.read_input(chunk).unwrap(), chunk.len());
        server.write_output(&mut s2c);
        if i + 1 < chunks.len() {
            assert!(
                s2c.is_empty(),
                "server answered before the whole client key"
            );
            assert!(server.take_session().is_none());
            assert!(server.public_key().is_none());
        }
    }
    assert_eq!(
        &s2c[..],
        server.public_key().expect("server key after the client's"),
        "server answers with its raw key"
    );
    let server_session = server.take_session().expect("server session");
    assert!(
        server.take_session().is_none(),
        "session is handed out once"
    );

    let chunks = split_at_cuts(&s2c, s2c_cuts);
    for (i, chunk) in chunks.iter().enumerate() {
        assert_eq!(client.read_input(chunk).unwrap(), chunk.len());
        let mut more = Vec::new();
        client.write_output(&mut more);
        assert!(more.is_empty(), "client sends nothing after its key");
        if i + 1 < chunks.len() {
            assert!(client.take_session().is_none());
        }
    }
    let client_session = client.take_session().expect("client session");
    assert!(
        client.take_session().is_none(),
        "session is handed out once"
    );

    (client_session, server_session)
}

/// Seals three frames back to back into one buffer and has the peer
/// delimit and open them in order.
fn burst(from: &mut Session, to: &mut Session) {
    let mut wire = Vec::new();
    for seq in 0..3 {
        from.sealer.seal_append(seq, b"burst", &mut wire).unwrap();
    }
    let decoder = FrameDecoder::new(1024);
    let mut rest = &mut wire[..];
    for seq in 0..3 {
        let Decoded::Frame(n) = decoder.decode(rest).unwrap() else {
            panic!("whole frame expected");
        };
        let (frame, tail) = rest.split_at_mut(n);
        let (got_seq, got) = to.opener.open_in_place(frame).unwrap();
        assert_eq!((got_seq, &got[..]), (seq, &b"burst"[..]));
        rest = tail;
    }
    assert!(rest.is_empty());
}

/// Proves two sessions hold matching keys: frames sealed by each side open
/// on the other, in both directions, interleaved, with varied sizes.
fn assert_sessions_match(client: &mut Session, server: &mut Session) {
    for i in 0..4u32 {
        let payload: Vec<u8> = (0..i as usize * 97).map(|b| b as u8 ^ 0x5a).collect();

        let mut wire = Vec::new();
        client
            .sealer
            .seal_append(2 * i + 1, &payload, &mut wire)
            .unwrap();
        let (seq, got) = server.opener.open_in_place(&mut wire).unwrap();
        assert_eq!((seq, &got[..]), (2 * i + 1, &payload[..]));

        let mut wire = Vec::new();
        server
            .sealer
            .seal_append(2 * i + 2, &payload, &mut wire)
            .unwrap();
        let (seq, got) = client.opener.open_in_place(&mut wire).unwrap();
        assert_eq!((seq, &got[..]), (2 * i + 2, &payload[..]));
    }
    // A burst in one direction, then one in the other.
    burst(client, server);
    burst(server, client);
    assert_eq!(client.sealer.counter(), server.opener.counter());
    assert_eq!(server.sealer.counter(), client.opener.counter());
}

// Checks both profiles complete with matching keys for every pair (k, j): client key fed as [0..k]+[k..32], server key as [0..j]+[j..32].
#[test]
fn every_split_point_in_both_directions() {
    for profile in PROFILES {
        for k in 0..=KEY_LEN {
            for j in 0..=KEY_LEN {
                let (mut c, mut s) = split_handshake(profile, &[k], &[j]);
                // Frame exchange is the expensive proof; do it on a diagonal
                // and the edges, the handshake state itself is checked for all.
                if k == j || k == 0 || j == 0 || k == KEY_LEN || j == KEY_LEN {
                    assert_sessions_match(&mut c, &mut s);
                }
            }
        }
    }
}

// Checks both profiles complete with matching keys when each key arrives one byte at a time, alone and mixed with whole-key delivery.
#[test]
fn one_byte_at_a_time_in_both_directions() {
    let bytewise = one_byte_at_a_time();
    for profile in PROFILES {
        for (c2s, s2c) in [
            (&bytewise[..], &bytewise[..]),
            (&bytewise[..], &[][..]),
            (&[][..], &bytewise[..]),
            (&[3, 17, 18, 31][..], &[1, 2, 30][..]),
        ] {
            let (mut c, mut s) = split_handshake(profile, c2s, s2c);
            assert_sessions_match(&mut c, &mut s);
        }
    }
}

// Checks that an empty read before the key arrives is a harmless no-op on both sides.
#[test]
fn empty_reads_before_completion_consume_nothing() {
    for profile in PROFILES {
        let mut client = ClientHandshake::new(profile).unwrap();
        let mut server = ServerHandshake::new(profile).unwrap();
        assert_eq!(client.read_input(&[]).unwrap(), 0);
        assert_eq!(server.read_input(&[]).unwrap(), 0);
        let (mut c, mut s) = drive(&mut client, &mut server, 5).unwrap();
        assert_sessions_match(&mut c, &mut s);
    }
}

// Checks a fresh server handshake is inert until the client's key is in: no output, no session, no ephemeral key yet (it is generated lazily, not as the connection is accepted), across empty reads and a partial key; then the handshake completes with a fresh server key each time, and a session carries no peer identity.
#[test]
fn server_key_is_generated_lazily() {
    for profile in PROFILES {
        let mut servers: Vec<ServerHandshake> = (0..3)
            .map(|_| ServerHandshake::new(profile).unwrap())
            .collect();
        let mut keys = Vec::new();
        for server in &mut servers {
            let mut out = Vec::new();
            server.write_output(&mut out);
            assert!(out.is_empty());
            assert!(server.public_key().is_none());
            assert_eq!(server.read_input(&[]).unwrap(), 0);
            let mut client = ClientHandshake::new(profile).unwrap();
            let mut cp = Vec::new();
            client.write_output(&mut cp);
            assert_eq!(server.read_input(&cp[..31]).unwrap(), 31);
            server.write_output(&mut out);
            assert!(out.is_empty() && server.public_key().is_none());
            assert!(server.take_session().is_none());
            assert_eq!(server.read_input(&cp[31..]).unwrap(), 1);
            server.write_output(&mut out);
            assert_eq!(Some(&out[..]), server.public_key().map(|k| &k[..]));
            keys.push(out.clone());
            let mut s = server.take_session().unwrap();
            assert_eq!(client.read_input(&out).unwrap(), KEY_LEN);
            let mut c = client.take_session().unwrap();
            assert_eq!((c.peer_identity, s.peer_identity), (None, None));
            assert_sessions_match(&mut c, &mut s);
        }
        keys.sort();
        keys.dedup();
        assert_eq!(keys.len(), 3, "server keys repeat");
    }
}

// Checks Session::new starts both directions where the given sealer and opener are, with no peer identity, and with_peer_identity records one.
#[test]
fn session_constructors() {
    let s = Session::new(
        monte_rpc::protocol::Sealer::with_counter([1; KEY_LEN], 5, None),
        monte_rpc::protocol::Opener::new([2; KEY_LEN], Profile::Secure),
    );
    assert_eq!((s.sealer.counter(), s.opener.counter()), (5, 0));
    assert_eq!(s.peer_identity, None);
    let s = s.with_peer_identity([9; 32]);
    assert_eq!(s.peer_identity, Some([9; 32]));
}

// Checks two handshakes of the same profile use fresh ephemeral keys, so their sessions cannot open each other's frames.
#[test]
fn each_handshake_uses_fresh_keys() {
    for profile in PROFILES {
        let c1 = ClientHandshake::new(profile).unwrap();
        let c2 = ClientHandshake::new(profile).unwrap();
        assert_ne!(c1.public_key(), c2.public_key());
        let (mut a, _) = split_handshake(profile, &[], &[]);
        let (_, mut b) = split_handshake(profile, &[], &[]);
        let mut wire = Vec::new();
        a.sealer.seal_append(1, b"x", &mut wire).unwrap();
        assert!(matches!(
            b.opener.open_in_place(&mut wire),
            Err(Error::Authentication)
        ));
    }
}

// Checks the server's key and first frames pipelined in one buffer: read_input consumes exactly 32 bytes and leaves the frames for the decoder, which delimits them and the client opens them.
#[test]
fn server_first_frame_pipelined_after_its_key() {
    for profile in PROFILES {
        let mut client = ClientHandshake::new(profile).unwrap();
        let mut server = ServerHandshake::new(profile).unwrap();
        let mut c2s = Vec::new();
        client.write_output(&mut c2s);
        assert_eq!(server.read_input(&c2s).unwrap(), KEY_LEN);

        // The server writes its key and, in the same buffer, two frames.
        let mut s2c = Vec::new();
        server.write_output(&mut s2c);
        let mut s = server.take_session().unwrap();
        s.sealer
            .seal_append(2, b"hello from server", &mut s2c)
            .unwrap();
        s.sealer.seal_append(0, b"", &mut s2c).unwrap();

        // Feed everything: exactly the key is consumed.
        let used = client.read_input(&s2c).unwrap();
        assert_eq!(used, KEY_LEN);
        let mut c = client.take_session().unwrap();

        let decoder = FrameDecoder::new(1 << 16);
        let mut rest = &mut s2c[used..];
        let Decoded::Frame(n) = decoder.decode(rest).unwrap() else {
            panic!("first frame should be complete");
        };
        let (frame, tail) = rest.split_at_mut(n);
        let (seq, payload) = c.opener.open_in_place(frame).unwrap();
        assert_eq!((seq, &payload[..]), (2, &b"hello from server"[..]));
        rest = tail;
        let Decoded::Frame(n) = decoder.decode(rest).unwrap() else {
            panic!("second frame should be complete");
        };
        assert_eq!(n, rest.len());
        let (seq, payload) = c.opener.open_in_place(rest).unwrap();
        assert_eq!((seq, payload.len()), (0, 0));
    }
}

// Checks the pipelined case when the key and the frame straddle reads: a short first read consumes all it gets, the next read (rest of key + frame) consumes only the rest of the key.
#[test]
fn server_first_frame_pipelined_across_reads() {
    for profile in PROFILES {
        for first in [1, 20, 31] {
            let mut client = ClientHandshake::new(profile).unwrap();
            let mut server = ServerHandshake::new(profile).unwrap();
            let mut c2s = Vec::new();
            client.write_output(&mut c2s);
            assert_eq!(server.read_input(&c2s).unwrap(), KEY_LEN);
            let mut s2c = Vec::new();
            server.write_output(&mut s2c);
            let mut s = server.take_session().unwrap();
            s.sealer.seal_append(4, b"pipelined", &mut s2c).unwrap();

            // The driver keeps unconsumed bytes and re-feeds them.
            let mut inbox: Vec<u8> = s2c[..first].to_vec();
            let used = client.read_input(&inbox).unwrap();
            assert_eq!(used, first);
            inbox.drain(..used);
            inbox.extend_from_slice(&s2c[first..]);
            let used = client.read_input(&inbox).unwrap();
            assert_eq!(used, KEY_LEN - first);
            inbox.drain(..used);

            let mut c = client.take_session().unwrap();
            assert_eq!(
                FrameDecoder::new(64).decode(&inbox).unwrap(),
                Decoded::Frame(inbox.len())
            );
            let (seq, payload) = c.opener.open_in_place(&mut inbox).unwrap();
            assert_eq!((seq, &payload[..]), (4, &b"pipelined"[..]));
        }
    }
}

// Checks a server handed the client's key plus trailing bytes in one buffer consumes exactly the 32 key bytes.
#[test]
fn server_consumes_exactly_the_client_key() {
    for profile in PROFILES {
        let mut client = ClientHandshake::new(profile).unwrap();
        let mut server = ServerHandshake::new(profile).unwrap();
        let mut buf = Vec::new();
        client.write_output(&mut buf);
        buf.extend_from_slice(&[0xAB; 40]);
        assert_eq!(server.read_input(&buf).unwrap(), KEY_LEN);
        let mut s2c = Vec::new();
        server.write_output(&mut s2c);
        assert_eq!(client.read_input(&s2c).unwrap(), KEY_LEN);
        let mut c = client.take_session().unwrap();
        let mut s = server.take_session().unwrap();
        assert_sessions_match(&mut c, &mut s);
    }
}

/// Public keys that are low-order points (or non-canonical encodings of
/// them): X25519 with any clamped scalar gives an all-zero shared secret.
fn low_order_points() -> Vec<(&'static str, [u8; KEY_LEN])> {
    fn hex(s: &str) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap();
        }
        out
    }
    let mut u_one = [0u8; KEY_LEN];
    u_one[0] = 1;
    let mut zero_high_bit = [0u8; KEY_LEN];
    zero_high_bit[31] = 0x80;
    vec![
        ("all-zero (u=0)", [0u8; KEY_LEN]),
        ("u=1", u_one),
        (
            "order 8 (e0eb..)",
            hex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800"),
        ),
        (
            "order 8 (5f9c..)",
            hex("5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157"),
        ),
        (
            "u=p-1 (order 2)",
            hex("ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ),
        (
            "u=p (non-canonical 0)",
            hex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ),
        (
            "u=p+1 (non-canonical 1)",
            hex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
        ),
        ("u=0 with the ignored top bit set", zero_high_bit),
    ]
}

fn is_low_order(r: &Result<usize, Error>) -> bool {
    matches!(r, Err(Error::Handshake(HandshakeError::LowOrderPublicKey)))
}

// Checks a low-order client key makes the server fail with LowOrderPublicKey (whole or split), send nothing, yield no session, and refuse further input.
#[test]
fn server_rejects_low_order_client_key() {
    for profile in PROFILES {
        for (name, point) in low_order_points() {
            for cut in [0, 1, 16, 31] {
                let mut server = ServerHandshake::new(profile).unwrap();
                let (first, second) = point.split_at(cut);
                assert_eq!(server.read_input(first).unwrap(), first.len(), "{name}");
                let r = server.read_input(second);
                assert!(is_low_order(&r), "{profile:?} {name} cut {cut}: {r:?}");

                let mut out = Vec::new();
                server.write_output(&mut out);
                assert!(out.is_empty(), "server must not answer a low-order key");
                assert!(server.take_session().is_none());
                assert!(matches!(
                    server.read_input(&[0u8; 8]),
                    Err(Error::Handshake(HandshakeError::AlreadyFinished))
                ));
            }
        }
    }
}

/// Whether a client's result for the low-order server key `point` is the
/// right failure: LowOrderPublicKey, except for the all-zero key, which is
/// the refusal of a server at its cap (`REFUSED_AT_CAP`).
fn from_server_is_low_order(point: &[u8; KEY_LEN], result: &monte_rpc::Result<usize>) -> bool {
    if *point == monte_rpc::protocol::REFUSED_AT_CAP {
        matches!(result, Err(Error::ConnectionLimit))
    } else {
        is_low_order(result)
    }
}

// Checks a low-order server key makes the client fail with LowOrderPublicKey (whole or split; the all-zero key is the refusal at the cap, ConnectionLimit), yield no session, and refuse further input.
#[test]
fn client_rejects_low_order_server_key() {
    for profile in PROFILES {
        for (name, point) in low_order_points() {
            for cut in [0, 1, 16, 31] {
                let mut client = ClientHandshake::new(profile).unwrap();
                let mut out = Vec::new();
                client.write_output(&mut out);
                assert_eq!(out.len(), KEY_LEN);
                assert_eq!(client.read_input(&point[..cut]).unwrap(), cut, "{name}");
                let r = client.read_input(&point[cut..]);
                assert!(
                    from_server_is_low_order(&point, &r),
                    "{profile:?} {name} cut {cut}: {r:?}"
                );
                assert!(client.take_session().is_none());
                assert!(matches!(
                    client.read_input(&[1u8; 4]),
                    Err(Error::Handshake(HandshakeError::AlreadyFinished))
                ));
            }
        }
    }
}

// Checks a low-order key followed by pipelined bytes in the same buffer still fails cleanly (no panic, exact variant).
#[test]
fn low_order_key_with_trailing_bytes() {
    for profile in PROFILES {
        for (_, point) in low_order_points() {
            let mut buf = point.to_vec();
            buf.extend_from_slice(&[0, 0, 0, 20]);
            buf.extend_from_slice(&[0x11; 20]);
            let mut server = ServerHandshake::new(profile).unwrap();
            assert!(is_low_order(&server.read_input(&buf)));
            let mut client = ClientHandshake::new(profile).unwrap();
            client.write_output(&mut Vec::new());
            assert!(from_server_is_low_order(&point, &client.read_input(&buf)));
        }
    }
}

// Checks read_input after a successful handshake returns AlreadyFinished on both sides, with or without bytes, before and after take_session.
#[test]
fn read_after_finish_is_already_finished() {
    for profile in PROFILES {
        let mut client = ClientHandshake::new(profile).unwrap();
        let mut server = ServerHandshake::new(profile).unwrap();
        let mut c2s = Vec::new();
        client.write_output(&mut c2s);
        server.read_input(&c2s).unwrap();
        let mut s2c = Vec::new();
        server.write_output(&mut s2c);
        client.read_input(&s2c).unwrap();

        let finished = |r: Result<usize, Error>| {
            matches!(r, Err(Error::Handshake(HandshakeError::AlreadyFinished)))
        };
        assert!(finished(server.read_input(&[])));
        assert!(finished(server.read_input(&[7; 32])));
        assert!(finished(client.read_input(&[])));
        assert!(finished(client.read_input(&[7; 32])));
        let mut c = client.take_session().unwrap();
        let mut s = server.take_session().unwrap();
        assert!(finished(server.read_input(&c2s)));
        assert!(finished(client.read_input(&s2c)));
        // The failed late reads did not disturb the sessions.
        assert_sessions_match(&mut c, &mut s);
    }
}

// Checks a monte client and a secure server (and the reverse) finish the key exchange but cannot open each other's first frame: Authentication.
#[test]
fn profile_mismatch_fails_first_frame() {
    for (client_profile, server_profile) in [
        (Profile::Monte, Profile::Secure),
        (Profile::Secure, Profile::Monte),
    ] {
        let mut client = ClientHandshake::new(client_profile).unwrap();
        let mut server = ServerHandshake::new(server_profile).unwrap();
        let (mut c, mut s) = drive(&mut client, &mut server, KEY_LEN).unwrap();

        let mut wire = Vec::new();
        c.sealer.seal_append(1, b"request", &mut wire).unwrap();
        assert!(matches!(
            s.opener.open_in_place(&mut wire),
            Err(Error::Authentication)
        ));

        let mut wire = Vec::new();
        s.sealer.seal_append(2, b"request", &mut wire).unwrap();
        assert!(matches!(
            c.opener.open_in_place(&mut wire),
            Err(Error::Authentication)
        ));
    }
}

// Checks the spec's direction separation: under secure a frame reflected back to its sender fails, under monte (one shared key, documented weakness) it opens.
#[test]
fn reflected_frame_depends_on_profile() {
    for profile in PROFILES {
        let (mut c, _s) = split_handshake(profile, &[], &[]);
        let mut wire = Vec::new();
        c.sealer.seal_append(1, b"mirror", &mut wire).unwrap();
        let r = c.opener.open_in_place(&mut wire);
        match profile {
            Profile::Secure => assert!(matches!(r, Err(Error::Authentication))),
            Profile::Monte => assert_eq!(r.unwrap().1, b"mirror"),
        }
    }
}

// Checks Profile works as a HandshakeFactory whose boxed handshakes run through the generic driver for every chunk size.
#[test]
fn profile_factory_through_generic_driver() {
    for profile in PROFILES {
        for chunk in [1, 2, 3, 7, 31, 32, 33, 64] {
            let mut client = HandshakeFactory::client(&profile).unwrap();
            let mut server = HandshakeFactory::server(&profile).unwrap();
            let (mut c, mut s) = drive(client.as_mut(), server.as_mut(), chunk).unwrap();
            assert_sessions_match(&mut c, &mut s);
        }
    }
}

// ---------------------------------------------------------------------------
// A user-defined handshake, to show the trait is enough to plug in another
// key exchange without touching the crate.
// ---------------------------------------------------------------------------

/// Runs two handshakes against each other in memory, moving at most `chunk`
/// bytes per step in each direction and re-feeding unconsumed input, as a
/// reactor would. Works for any [`Handshake`], boxed or not.
fn drive<C, S>(client: &mut C, server: &mut S, chunk: usize) -> Result<(Session, Session), Error>
where
    C: Handshake + ?Sized,
    S: Handshake + ?Sized,
{
    assert!(chunk > 0);
    let (mut c_wire, mut s_wire) = (Vec::new(), Vec::new());
    let (mut c_inbox, mut s_inbox) = (Vec::new(), Vec::new());
    let (mut c_session, mut s_session) = (None, None);
    for _ in 0..10_000 {
        if c_session.is_none() {
            client.write_output(&mut c_wire);
            c_session = client.take_session();
        }
        if s_session.is_none() {
            server.write_output(&mut s_wire);
            s_session = server.take_session();
        }
        match (c_session, s_session) {
            (Some(c), Some(s)) if c_wire.is_empty() && s_wire.is_empty() => {
                assert!(c_inbox.is_empty() && s_inbox.is_empty(), "unconsumed bytes");
                return Ok((c, s));
            }
            (c, s) => (c_session, s_session) = (c, s),
        }
        let n = chunk.min(c_wire.len());
        s_inbox.extend(c_wire.drain(..n));
        let n = chunk.min(s_wire.len());
        c_inbox.extend(s_wire.drain(..n));
        if s_session.is_none() && !s_inbox.is_empty() {
            let used = server.read_input(&s_inbox)?;
            s_inbox.drain(..used);
        }
        if c_session.is_none() && !c_inbox.is_empty() {
            let used = client.read_input(&c_inbox)?;
            c_inbox.drain(..used);
        }
    }
    panic!("handshake did not finish: stuck driver");
}

const CONFIRM: &[u8] = b"psk-confirm";

/// A pre-shared-key handshake, different in shape from the built-in one:
/// both sides speak at once (a 32-byte nonce each), derive the session from
/// the PSK and both nonces, then each proves it holds the PSK with a sealed
/// confirmation frame, which it sends with the session's own sealer (so the
/// session hands over at counter 1).
struct PskHandshake {
    role: Role,
    psk: [u8; KEY_LEN],
    nonce: [u8; KEY_LEN],
    nonce_sent: bool,
    peer_nonce: Vec<u8>,
    session: Option<Session>,
    confirm_sent: bool,
    confirmed: bool,
    failed: bool,
}

impl PskHandshake {
    /// A real implementation would draw `nonce` from a CSPRNG.
    fn new(role: Role, psk: [u8; KEY_LEN], nonce: [u8; KEY_LEN]) -> Self {
        PskHandshake {
            role,
            psk,
            nonce,
            nonce_sent: false,
            peer_nonce: Vec::with_capacity(KEY_LEN),
            session: None,
            confirm_sent: false,
            confirmed: false,
            failed: false,
        }
    }

    fn reject(&mut self, code: u32) -> Error {
        self.failed = true;
        self.session = None;
        Error::Handshake(HandshakeError::Rejected(code))
    }
}

impl Handshake for PskHandshake {
    fn write_output(&mut self, out: &mut Vec<u8>) {
        if !self.nonce_sent {
            out.extend_from_slice(&self.nonce);
            self.nonce_sent = true;
        }
        if let Some(session) = self.session.as_mut() {
            if !self.confirm_sent {
                session.sealer.seal_append(0, CONFIRM, out).unwrap();
                self.confirm_sent = true;
            }
        }
    }

    fn read_input(&mut self, input: &[u8]) -> Result<usize, Error> {
        if self.failed || self.confirmed {
            return Err(HandshakeError::AlreadyFinished.into());
        }
        let mut used = 0;
        if self.peer_nonce.len() < KEY_LEN {
            used = (KEY_LEN - self.peer_nonce.len()).min(input.len());
            self.peer_nonce.extend_from_slice(&input[..used]);
            if self.peer_nonce.len() < KEY_LEN {
                return Ok(used);
            }
            if self.peer_nonce[..] == self.nonce[..] {
                return Err(self.reject(1)); // our own nonce reflected back
            }
            let peer: [u8; KEY_LEN] = self.peer_nonce[..].try_into().unwrap();
            let (cn, sn) = match self.role {
                Role::Client => (self.nonce, peer),
                Role::Server => (peer, self.nonce),
            };
            let keys = derive_keys(Profile::Secure, &self.psk, &cn, &sn);
            self.session = Some(Session::from_keys(Profile::Secure, self.role, &keys));
        }
        let rest = &input[used..];
        match FrameDecoder::new(CONFIRM.len()).decode(rest) {
            Ok(Decoded::NeedMore(_)) => Ok(used),
            Ok(Decoded::Frame(n)) => {
                let mut frame = rest[..n].to_vec();
                let session = self.session.as_mut().expect("keys derived");
                match session.opener.open_in_place(&mut frame) {
                    Ok((0, payload)) if payload == CONFIRM => {
                        self.confirmed = true;
                        Ok(used + n)
                    }
                    Ok(_) => Err(self.reject(3)),
                    Err(_) => Err(self.reject(2)), // wrong PSK
                }
            }
            Err(_) => Err(self.reject(4)),
        }
    }

    fn take_session(&mut self) -> Option<Session> {
        if self.confirmed && self.confirm_sent {
            self.session.take()
        } else {
            None
        }
    }
}

/// Hands out [`PskHandshake`]s, like [`Profile`] does for the built-in one.
struct PskFactory {
    psk: [u8; KEY_LEN],
    next_nonce: AtomicU64,
}

impl PskFactory {
    fn nonce(&self) -> [u8; KEY_LEN] {
        let mut nonce = [0x42u8; KEY_LEN];
        let n = self.next_nonce.fetch_add(1, Ordering::Relaxed);
        nonce[..8].copy_from_slice(&n.to_be_bytes());
        nonce
    }
}

impl HandshakeFactory for PskFactory {
    fn client(&self) -> Result<Box<dyn Handshake>, Error> {
        Ok(Box::new(PskHandshake::new(
            Role::Client,
            self.psk,
            self.nonce(),
        )))
    }
    fn server(&self) -> Result<Box<dyn Handshake>, Error> {
        Ok(Box::new(PskHandshake::new(
            Role::Server,
            self.psk,
            self.nonce(),
        )))
    }
}

// Checks a user-implemented PSK handshake, run by the generic driver at several chunk sizes, yields sessions (handed over at counter 1) that talk to each other.
#[test]
fn user_handshake_through_generic_driver() {
    let factory = PskFactory {
        psk: [0x17; KEY_LEN],
        next_nonce: AtomicU64::new(1),
    };
    for chunk in [1, 5, 32, 33, 1000] {
        let mut client = factory.client().unwrap();
        let mut server = factory.server().unwrap();
        let (mut c, mut s) = drive(client.as_mut(), server.as_mut(), chunk).unwrap();
        // The confirmation frames used counter 0 of each direction.
        assert_eq!(c.sealer.counter(), 1);
        assert_eq!(s.opener.counter(), 1);
        assert_sessions_match(&mut c, &mut s);
        assert!(matches!(
            client.read_input(&[0]),
            Err(Error::Handshake(HandshakeError::AlreadyFinished))
        ));
    }
}

// Checks the user handshake fails with its own Rejected code when the peers hold different PSKs, and when a nonce is reflected.
#[test]
fn user_handshake_rejections() {
    let mut client = PskHandshake::new(Role::Client, [1; KEY_LEN], [2; KEY_LEN]);
    let mut server = PskHandshake::new(Role::Server, [9; KEY_LEN], [3; KEY_LEN]);
    let err = drive(&mut client, &mut server, 7).unwrap_err();
    assert!(
        matches!(err, Error::Handshake(HandshakeError::Rejected(2))),
        "{err:?}"
    );

    let mut client = PskHandshake::new(Role::Client, [1; KEY_LEN], [2; KEY_LEN]);
    let r = client.read_input(&[2; KEY_LEN]);
    assert!(matches!(
        r,
        Err(Error::Handshake(HandshakeError::Rejected(1)))
    ));
    assert!(client.take_session().is_none());
}

// A server at its connection cap sends 32 zero bytes in place of its key
// (PROTOCOL.md): every built-in client handshake reports that as
// Error::ConnectionLimit, however the bytes are split, while a server
// handshake fed a zero key from a client still reports a low-order key.
#[test]
fn the_refusal_at_the_cap_is_a_connection_limit_for_every_client_handshake() {
    use monte_rpc::protocol::{IdentityConfig, PskFactory, REFUSED_AT_CAP};
    let factories: Vec<(&str, Box<dyn HandshakeFactory>)> = vec![
        ("secure", Box::new(Profile::Secure)),
        ("monte", Box::new(Profile::Monte)),
        ("psk", Box::new(PskFactory::new([1; 32]))),
        ("identity", Box::new(IdentityConfig::pinned([9; 32]))),
    ];
    for (name, factory) in &factories {
        for cut in [KEY_LEN, 1, 31] {
            let mut client = factory.client().unwrap();
            let mut hello = Vec::new();
            client.write_output(&mut hello);
            assert_eq!(hello.len(), KEY_LEN, "{name}");
            let (first, rest) = REFUSED_AT_CAP.split_at(cut);
            let mut result = client.read_input(first);
            if !rest.is_empty() {
                assert!(matches!(result, Ok(n) if n == first.len()), "{name}");
                result = client.read_input(rest);
            }
            assert!(
                matches!(result, Err(Error::ConnectionLimit)),
                "{name}, cut at {cut}: {result:?}"
            );
        }
        let mut server = factory.server().unwrap();
        let result = server.read_input(&REFUSED_AT_CAP);
        assert!(
            matches!(
                result,
                Err(Error::Handshake(HandshakeError::LowOrderPublicKey))
            ),
            "{name} server: {result:?}"
        );
    }
}

/// The side of an exchange that does not know bundled frames (an older
/// monte-rpc, another implementation of the base specification): a
/// canonical X25519 key (bit 255 clear) and the keys derived from what it
/// received, as received.
struct OldPeer {
    public: [u8; KEY_LEN],
    private: ring::agreement::EphemeralPrivateKey,
}

impl OldPeer {
    fn new() -> Self {
        use ring::agreement::{EphemeralPrivateKey, X25519};
        let private =
            EphemeralPrivateKey::generate(&X25519, &ring::rand::SystemRandom::new()).unwrap();
        let public = private
            .compute_public_key()
            .unwrap()
            .as_ref()
            .try_into()
            .unwrap();
        OldPeer { public, private }
    }

    fn session(self, role: Role, peer: &[u8; KEY_LEN]) -> Session {
        use ring::agreement::{agree_ephemeral, UnparsedPublicKey, X25519};
        let public = self.public;
        let dh: [u8; KEY_LEN] =
            agree_ephemeral(self.private, &UnparsedPublicKey::new(&X25519, peer), |dh| {
                dh.try_into().unwrap()
            })
            .unwrap();
        let keys = match role {
            Role::Client => derive_keys(Profile::Secure, &dh, &public, peer),
            Role::Server => derive_keys(Profile::Secure, &dh, peer, &public),
        };
        Session::from_keys(Profile::Secure, role, &keys)
    }
}

fn asks_for_bundles(key: &[u8]) -> bool {
    key[KEY_LEN - 1] & 0x80 != 0
}

// Two peers that know bundled frames agree on them through bit 255 of
// their keys (PROTOCOL.md, "Bundled frames"); `monte`, the Go library's
// profile, never asks.
#[test]
fn secure_peers_agree_on_bundled_frames_and_monte_never_asks() {
    let (mut client, mut server) = split_handshake(Profile::Secure, &[], &[]);
    assert!(client.sealer.bundles() && client.opener.bundles());
    assert!(server.sealer.bundles() && server.opener.bundles());
    assert_sessions_match(&mut client, &mut server);

    let hs = ClientHandshake::new(Profile::Monte).unwrap();
    assert!(!asks_for_bundles(hs.public_key()));
    let (client, server) = split_handshake(Profile::Monte, &[], &[]);
    assert!(!client.sealer.bundles() && !server.opener.bundles());
}

// A client that asks for bundles, against a server that does not know
// them: the server's X25519 ignores the bit (ring masks it, as RFC 7748
// says), both derive the same keys, and the frames stay unbundled.
#[test]
fn a_client_asking_for_bundles_talks_to_a_server_that_does_not_know_them() {
    for _ in 0..16 {
        let mut hs = ClientHandshake::new(Profile::Secure).unwrap();
        let mut c2s = Vec::new();
        hs.write_output(&mut c2s);
        assert!(asks_for_bundles(&c2s), "the client asks");
        let old = OldPeer::new();
        assert!(!asks_for_bundles(&old.public));
        assert_eq!(hs.read_input(&old.public).unwrap(), KEY_LEN);
        let mut client = hs.take_session().unwrap();
        let mut server = old.session(Role::Server, &c2s.try_into().unwrap());
        assert!(!client.sealer.bundles() && !client.opener.bundles());
        assert_sessions_match(&mut client, &mut server);
    }
}

// A client that does not know bundles, against a server that does: the
// server answers with its bit clear, and the frames stay unbundled.
#[test]
fn a_server_answers_a_client_that_does_not_ask_without_bundles() {
    for _ in 0..16 {
        let old = OldPeer::new();
        let client_key = old.public;
        let mut hs = ServerHandshake::new(Profile::Secure).unwrap();
        assert_eq!(hs.read_input(&client_key).unwrap(), KEY_LEN);
        let mut s2c = Vec::new();
        hs.write_output(&mut s2c);
        assert!(!asks_for_bundles(&s2c), "the server does not offer unasked");
        let mut server = hs.take_session().unwrap();
        let mut client = old.session(Role::Client, &s2c.try_into().unwrap());
        assert!(!server.sealer.bundles() && !server.opener.bundles());
        assert_sessions_match(&mut client, &mut server);
    }
}

// Flipping the bit in transit (a man in the middle stripping the request
// for bundles, or adding the answer) changes the keys the two sides
// derive: the first frame fails to open rather than be read in the wrong
// format.
#[test]
fn a_bundle_bit_flipped_in_transit_fails_the_first_frame() {
    for flip_client in [true, false] {
        let mut client_hs = ClientHandshake::new(Profile::Secure).unwrap();
        let mut server_hs = ServerHandshake::new(Profile::Secure).unwrap();
        let mut c2s = Vec::new();
        client_hs.write_output(&mut c2s);
        if flip_client {
            c2s[KEY_LEN - 1] ^= 0x80;
        }
        server_hs.read_input(&c2s).unwrap();
        let mut s2c = Vec::new();
        server_hs.write_output(&mut s2c);
        if !flip_client {
            s2c[KEY_LEN - 1] ^= 0x80;
        }
        client_hs.read_input(&s2c).unwrap();
        let mut client = client_hs.take_session().unwrap();
        let mut server = server_hs.take_session().unwrap();
        let mut wire = Vec::new();
        client.sealer.seal_append(1, b"hello", &mut wire).unwrap();
        assert!(
            matches!(
                server.opener.open_in_place(&mut wire),
                Err(Error::Authentication)
            ),
            "flipped on the client's key: {flip_client}"
        );
    }
}
