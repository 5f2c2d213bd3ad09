//! Reproduces every byte of the specification's test vectors (copied from
//! the spec into `tests/vectors/`): the key schedule, every frame sealed and
//! opened, the Go library's whole byte streams, and the rekey step.
//! A mismatch prints the expected and the actual hex.

use monte_rpc::protocol::wire::{rekey, Decoded, FrameDecoder, REKEY_INTERVAL};
use monte_rpc::protocol::{derive_keys, Opener, Profile, Sealer};
use serde_json::Value;

fn load(name: &str) -> Value {
    let path = format!("{}/tests/vectors/{name}", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    serde_json::from_str(&text).unwrap()
}

fn unhex(s: &str) -> Vec<u8> {
    assert!(s.len() % 2 == 0, "odd hex length");
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex digit"))
        .collect()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn key32(v: &Value) -> [u8; 32] {
    unhex(v.as_str().expect("hex string"))
        .try_into()
        .expect("32 bytes")
}

#[track_caller]
fn assert_hex(what: &str, expected: &[u8], actual: &[u8]) {
    assert!(
        expected == actual,
        "{what} mismatch\n  expected: {}\n    actual: {}",
        hex(expected),
        hex(actual)
    );
}

/// One frame entry, normalised across the two vector layouts.
struct FrameVector {
    seq: u32,
    counter: u64,
    payload: Vec<u8>,
    wire: Vec<u8>,
}

fn frames(list: &Value) -> Vec<FrameVector> {
    list.as_array()
        .expect("frame list")
        .iter()
        .map(|f| {
            let s = |a: &str, b: &str| f.get(a).or_else(|| f.get(b)).cloned().unwrap();
            FrameVector {
                seq: f["seq"].as_u64().unwrap() as u32,
                counter: s("counter", "nonce_counter").as_u64().unwrap(),
                payload: unhex(s("payload", "payload_hex").as_str().unwrap()),
                wire: unhex(s("wire", "wire_hex").as_str().unwrap()),
            }
        })
        .collect()
}

fn profile_of(v: &Value) -> Profile {
    match v.get("profile").and_then(Value::as_str) {
        Some("secure") => Profile::Secure,
        _ => Profile::Monte,
    }
}

/// Checks the key schedule, then seals and opens every frame of a file.
fn check_file(name: &str) {
    let v = load(name);
    let profile = profile_of(&v);
    let dh = key32(&v["x25519_shared_secret"]);
    let cp = key32(&v["client_public"]);
    let sp = key32(&v["server_public"]);
    let keys = derive_keys(profile, &dh, &cp, &sp);
    let (want_c2s, want_s2c) = match v.get("derived_key") {
        Some(k) => (key32(k), key32(k)),
        None => (
            key32(&v["key_client_to_server"]),
            key32(&v["key_server_to_client"]),
        ),
    };
    assert_hex(
        &format!("{name} c2s key"),
        &want_c2s,
        &keys.client_to_server,
    );
    assert_hex(
        &format!("{name} s2c key"),
        &want_s2c,
        &keys.server_to_client,
    );

    for (dir, key) in [
        ("client_to_server", keys.client_to_server),
        ("server_to_client", keys.server_to_client),
    ] {
        let list = frames(&v[dir]);
        assert!(!list.is_empty(), "{name} {dir}: no frames");
        // Sealed one by one from key, counter, seq and payload.
        for (i, f) in list.iter().enumerate() {
            let mut sealer = Sealer::with_counter(key, f.counter, profile.rekey_interval());
            let mut out = Vec::new();
            sealer.seal_append(f.seq, &f.payload, &mut out).unwrap();
            assert_hex(&format!("{name} {dir}[{i}] sealed"), &f.wire, &out);
        }
        // Sealed as one stream by one sealer, and opened by one opener.
        let mut sealer = Sealer::new(key, profile);
        let mut opener = Opener::new(key, profile);
        for (i, f) in list.iter().enumerate() {
            assert_eq!(sealer.counter(), f.counter, "{name} {dir}[{i}] counter");
            let mut out = Vec::new();
            sealer.seal_append(f.seq, &f.payload, &mut out).unwrap();
            assert_hex(&format!("{name} {dir}[{i}] streamed"), &f.wire, &out);
            let mut wire = f.wire.clone();
            let (seq, payload) = opener
                .open_in_place(&mut wire)
                .unwrap_or_else(|e| panic!("{name} {dir}[{i}] open: {e}"));
            assert_eq!(seq, f.seq, "{name} {dir}[{i}] seq");
            assert_hex(&format!("{name} {dir}[{i}] opened"), &f.payload, payload);
        }
    }
}

#[test]
fn secure_profile_vectors() {
    check_file("v1-secure.json");
}

#[test]
fn monte_profile_vectors() {
    check_file("v1-monte.json");
}

#[test]
fn go_library_vectors() {
    check_file("go-monte.json");
}

/// The Go library's handshake bytes are the two raw public keys.
#[test]
fn go_library_handshake_bytes() {
    let v = load("go-monte.json");
    assert_hex(
        "client handshake",
        &unhex(v["client_public"].as_str().unwrap()),
        &unhex(v["handshake_client_to_server_hex"].as_str().unwrap()),
    );
    assert_hex(
        "server handshake",
        &unhex(v["server_public"].as_str().unwrap()),
        &unhex(v["handshake_server_to_client_hex"].as_str().unwrap()),
    );
}

/// The Go library's whole byte stream in each direction, delimited by the
/// frame decoder, opened in order, and sealed back to the same bytes.
#[test]
fn go_library_streams_decode_frame_by_frame() {
    let v = load("go-monte.json");
    let key = key32(&v["derived_key"]);
    for (dir, stream_field) in [
        ("client_to_server", "client_to_server_stream_hex"),
        ("server_to_client", "server_to_client_stream_hex"),
    ] {
        let expected = frames(&v[dir]);
        let mut stream = unhex(v[stream_field].as_str().unwrap());
        let decoder = FrameDecoder::new(1 << 20);
        let mut opener = Opener::new(key, Profile::Monte);
        let mut sealer = Sealer::new(key, Profile::Monte);
        let mut resealed = Vec::new();
        let mut at = 0;
        let mut i = 0;
        while at < stream.len() {
            let n = match decoder.decode(&stream[at..]).unwrap() {
                Decoded::Frame(n) => n,
                Decoded::NeedMore(n) => panic!("{dir}: stream ends inside a frame (needs {n})"),
            };
            assert_hex(
                &format!("{dir}[{i}] wire"),
                &expected[i].wire,
                &stream[at..at + n],
            );
            let (seq, payload) = opener.open_in_place(&mut stream[at..at + n]).unwrap();
            assert_eq!(seq, expected[i].seq, "{dir}[{i}] seq");
            assert_hex(
                &format!("{dir}[{i}] payload"),
                &expected[i].payload,
                payload,
            );
            sealer.seal_append(seq, payload, &mut resealed).unwrap();
            at += n;
            i += 1;
        }
        assert_eq!(i, expected.len(), "{dir}: frame count");
        assert_hex(
            &format!("{dir} resealed stream"),
            &unhex(v[stream_field].as_str().unwrap()),
            &resealed,
        );
    }
}

/// The rekey entry: the key after the first rekey, and a frame sealed at
/// counter 2^24, both reached by crossing the boundary from the base key.
#[test]
fn secure_rekey_vector() {
    let v = load("v1-secure.json");
    let r = &v["rekey"];
    let base = key32(&v["key_client_to_server"]);
    let after = key32(&r["key_after_first_rekey"]);
    assert_hex("rekeyed key", &after, &rekey(&base));
    let counter = r["counter"].as_u64().unwrap();
    assert_eq!(counter, REKEY_INTERVAL);
    let seq = r["seq"].as_u64().unwrap() as u32;
    let payload = unhex(r["payload"].as_str().unwrap());
    let wire = unhex(r["wire"].as_str().unwrap());

    // Cross the boundary: seal counter 2^24 - 1 under the base key first.
    let mut sealer = Sealer::with_counter(base, counter - 1, Profile::Secure.rekey_interval());
    let mut opener = Opener::with_counter(base, counter - 1, Profile::Secure.rekey_interval());
    let mut before = Vec::new();
    sealer.seal_append(0, b"before rekey", &mut before).unwrap();
    opener.open_in_place(&mut before).unwrap();
    let mut out = Vec::new();
    sealer.seal_append(seq, &payload, &mut out).unwrap();
    assert_hex("frame at 2^24", &wire, &out);
    let (got_seq, got) = opener.open_in_place(&mut out).unwrap();
    assert_eq!(got_seq, seq);
    assert_hex("frame at 2^24 opened", &payload, got);

    // Starting directly at 2^24 with the rekeyed key gives the same bytes.
    let mut direct = Sealer::with_counter(after, counter, Profile::Secure.rekey_interval());
    let mut out = Vec::new();
    direct.seal_append(seq, &payload, &mut out).unwrap();
    assert_hex("frame at 2^24, direct", &wire, &out);

    // The monte profile never rekeys: the same boundary keeps the base key.
    let mut monte = Sealer::with_counter(base, counter - 1, Profile::Monte.rekey_interval());
    let mut scratch = Vec::new();
    monte.seal_append(0, b"x", &mut scratch).unwrap();
    let mut out = Vec::new();
    monte.seal_append(seq, &payload, &mut out).unwrap();
    assert_ne!(out, wire, "monte must not rekey");
}

/// The bundled frames of `secure` (PROTOCOL.md, "Bundled frames";
/// `bundles-secure.json`, made by `bundles_secure.py` with OpenSSL, not with
/// this crate): the keys from the public keys as sent, the bundle bit set
/// on both; each frame's records sealed to the exact bytes; the stream read
/// back message by message by the connection core the runtime uses; and
/// the frames whose records do not fill them refused whole.
#[test]
fn bundled_secure_vectors() {
    use monte_rpc::protocol::connection::{ConnCore, Deadlines, Limits, ReadPhase};
    use monte_rpc::protocol::wire::append_record;
    use monte_rpc::protocol::Role;
    use monte_rpc::Error;

    let v = load("bundles-secure.json");
    let cp = key32(&v["client_public_as_sent"]);
    let sp = key32(&v["server_public_as_sent"]);
    assert!(
        cp[31] & 0x80 != 0 && sp[31] & 0x80 != 0,
        "both keys ask for bundles"
    );
    let dh = key32(&v["x25519_shared_secret"]);
    let keys = derive_keys(Profile::Secure, &dh, &cp, &sp);
    assert_hex(
        "c2s key",
        &key32(&v["key_client_to_server"]),
        &keys.client_to_server,
    );
    assert_hex(
        "s2c key",
        &key32(&v["key_server_to_client"]),
        &keys.server_to_client,
    );

    let limits = Limits {
        buffer_size: 4096,
        max_message_size: 1024,
        deadlines: Deadlines::default(),
    };
    for (dir, key, reader) in [
        ("client_to_server", keys.client_to_server, Role::Server),
        ("server_to_client", keys.server_to_client, Role::Client),
    ] {
        let mut sealer = Sealer::new(key, Profile::Secure).with_bundles();
        let (mut stream, mut expected) = (Vec::new(), Vec::new());
        for f in v[dir].as_array().unwrap() {
            assert_eq!(f["counter"].as_u64().unwrap(), sealer.counter());
            let start = Sealer::start_bundle(&mut stream);
            for r in f["records"].as_array().unwrap() {
                let seq = r["seq"].as_u64().unwrap() as u32;
                let payload = unhex(r["payload"].as_str().unwrap());
                append_record(&mut stream, seq, &payload);
                expected.push((seq, payload));
            }
            sealer.seal_bundle(&mut stream, start).unwrap();
            assert_hex(dir, &unhex(f["wire"].as_str().unwrap()), &stream[start..]);
        }
        let opener = Opener::new(key, Profile::Secure).with_bundles();
        let mut core = ConnCore::new(ReadPhase::Open { opener }, reader, limits, &stream, 0);
        let mut got = Vec::new();
        while let Some((seq, len)) = core.open_next(0).unwrap() {
            got.push((seq, core.payload(len).to_vec()));
            core.consume(len);
        }
        assert_eq!(got, expected, "{dir}: the messages in order");
        assert_eq!(core.buffered(), 0, "{dir}: every byte taken");
    }

    for f in v["malformed_client_to_server"].as_array().unwrap() {
        let name = f["name"].as_str().unwrap();
        let counter = f["counter"].as_u64().unwrap();
        let opener = Opener::with_counter(
            keys.client_to_server,
            counter,
            Profile::Secure.rekey_interval(),
        )
        .with_bundles();
        let wire = unhex(f["wire"].as_str().unwrap());
        let mut core = ConnCore::new(ReadPhase::Open { opener }, Role::Server, limits, &wire, 0);
        match (f["error"].as_str().unwrap(), core.open_next(0)) {
            ("MalformedBundle", Err(Error::MalformedBundle { claimed, left })) => {
                assert!(claimed > left, "{name}: {claimed} > {left}")
            }
            ("FrameTooShort", Err(Error::FrameTooShort { len: 16 })) => {}
            (want, got) => panic!("{name}: {got:?}, not {want}"),
        }
    }
}
