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
