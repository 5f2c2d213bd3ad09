//! Sealer, opener and decoder tests: hostile input gets its exact error and
//! never a panic, counters never wrap, the rekey schedule stays in sync, and
//! property tests for round trips and for garbage input.

use monte_rpc::protocol::wire::{
    frame_len, rekey, Decoded, FrameDecoder, FRAME_OVERHEAD, LENGTH_PREFIX_LEN, MAX_WIRE_PAYLOAD,
    MIN_CIPHERTEXT_LEN, REKEY_INTERVAL, TAG_LEN,
};
use monte_rpc::protocol::{Opener, Profile, Sealer, KEY_LEN};
use monte_rpc::Error;
use proptest::prelude::*;

const KEY: [u8; KEY_LEN] = [0x3c; KEY_LEN];
const PROFILES: [Profile; 2] = [Profile::Secure, Profile::Monte];

/// A sealer and an opener for one direction under `KEY`, both at counter 0.
fn pair(profile: Profile) -> (Sealer, Opener) {
    (Sealer::new(KEY, profile), Opener::new(KEY, profile))
}

/// One sealed frame as its own buffer.
fn seal(sealer: &mut Sealer, seq: u32, payload: &[u8]) -> Vec<u8> {
    let mut wire = Vec::new();
    let n = sealer.seal_append(seq, payload, &mut wire).unwrap();
    assert_eq!(n, wire.len());
    assert_eq!(n, frame_len(payload.len()));
    wire
}

/// A frame with the given length prefix followed by `body_len` filler bytes.
fn raw_frame(prefix: u32, body_len: usize) -> Vec<u8> {
    let mut frame = prefix.to_be_bytes().to_vec();
    frame.resize(LENGTH_PREFIX_LEN + body_len, 0x77);
    frame
}

/// Asserts the opener is poisoned: even a frame that would be valid at its
/// counter is refused with ReceiveFailed, and the counter does not move.
fn assert_poisoned(opener: &mut Opener, valid_frame: &[u8]) {
    assert!(opener.has_failed());
    let counter = opener.counter();
    for _ in 0..3 {
        let mut frame = valid_frame.to_vec();
        assert!(matches!(
            opener.open_in_place(&mut frame),
            Err(Error::ReceiveFailed)
        ));
        assert_eq!(frame, valid_frame, "a refused frame is not touched");
    }
    assert!(matches!(
        opener.open_in_place(&mut []),
        Err(Error::ReceiveFailed)
    ));
    assert_eq!(opener.counter(), counter);
}

// Checks length prefixes 0, 1 and 19 are FrameTooShort with the claimed length, from the decoder (prefix alone) and the opener, and 20 is accepted.
#[test]
fn short_length_prefix_is_frame_too_short() {
    let decoder = FrameDecoder::new(1 << 20);
    for len in [0u32, 1, 19] {
        let prefix = len.to_be_bytes();
        let r = decoder.decode(&prefix);
        assert!(
            matches!(r, Err(Error::FrameTooShort { len: l }) if l == len as usize),
            "{len}: {r:?}"
        );
        // Same verdict with a full body behind the prefix.
        let r = decoder.decode(&raw_frame(len, 64));
        assert!(matches!(r, Err(Error::FrameTooShort { len: l }) if l == len as usize));

        let (mut sealer, mut opener) = pair(Profile::Secure);
        let mut frame = raw_frame(len, len as usize);
        let r = opener.open_in_place(&mut frame);
        assert!(
            matches!(r, Err(Error::FrameTooShort { len: l }) if l == len as usize),
            "{len}: {r:?}"
        );
        let valid = seal(&mut sealer, 1, b"after");
        assert_poisoned(&mut opener, &valid);
    }
    assert_eq!(
        decoder.decode(&20u32.to_be_bytes()).unwrap(),
        Decoded::NeedMore(24)
    );
    assert_eq!(
        decoder.decode(&raw_frame(20, 20)).unwrap(),
        Decoded::Frame(24)
    );
}

// Checks prefixes of max+1 and 0xFFFFFFFF are FrameTooLarge from the 4 prefix bytes alone, and exactly max is accepted.
#[test]
fn long_length_prefix_is_frame_too_large() {
    for max_payload in [0usize, 1400, 1 << 20] {
        let decoder = FrameDecoder::new(max_payload);
        assert_eq!(decoder.max_payload(), max_payload);
        let max_ct = max_payload + MIN_CIPHERTEXT_LEN;
        assert_eq!(decoder.max_frame_len(), frame_len(max_payload));

        for len in [max_ct as u32 + 1, max_ct as u32 + 1000, u32::MAX] {
            let r = decoder.decode(&len.to_be_bytes());
            assert!(
                matches!(r, Err(Error::FrameTooLarge { len: l, max, .. }) if l == len as usize && max == max_ct),
                "{len}: {r:?}"
            );
        }
        assert_eq!(
            decoder.decode(&(max_ct as u32).to_be_bytes()).unwrap(),
            Decoded::NeedMore(LENGTH_PREFIX_LEN + max_ct)
        );
    }
    // Fewer than 4 bytes: no verdict yet, whatever they are.
    let decoder = FrameDecoder::new(16);
    for partial in [
        &[][..],
        &[0xff][..],
        &[0xff, 0xff, 0xff][..],
        &[0, 0, 0][..],
    ] {
        assert_eq!(decoder.decode(partial).unwrap(), Decoded::NeedMore(4));
    }
    // The widest decoder accepts the largest prefix without overflow.
    let widest = FrameDecoder::new(usize::MAX);
    assert_eq!(widest.max_payload(), MAX_WIRE_PAYLOAD);
    assert_eq!(
        widest.decode(&u32::MAX.to_be_bytes()).unwrap(),
        Decoded::NeedMore(LENGTH_PREFIX_LEN + u32::MAX as usize)
    );
}

// Checks flipping any single bit of the tag makes the frame fail with Authentication and poisons the opener.
#[test]
fn flipped_tag_bit_is_authentication() {
    for profile in PROFILES {
        let mut sealer = Sealer::new(KEY, profile);
        let wire = seal(&mut sealer, 9, b"tagged payload");
        let tag_start = wire.len() - TAG_LEN;
        for bit in 0..TAG_LEN * 8 {
            let mut frame = wire.clone();
            frame[tag_start + bit / 8] ^= 1 << (bit % 8);
            let mut opener = Opener::new(KEY, profile);
            assert_eq!(
                FrameDecoder::new(1024).decode(&frame).unwrap(),
                Decoded::Frame(frame.len())
            );
            assert!(matches!(
                opener.open_in_place(&mut frame),
                Err(Error::Authentication)
            ));
            assert_poisoned(&mut opener, &wire);
        }
    }
}

// Checks flipping any single bit of the ciphertext body (sequence number and payload) is Authentication, then ReceiveFailed for the genuine frame.
#[test]
fn flipped_ciphertext_bit_is_authentication() {
    for profile in PROFILES {
        let mut sealer = Sealer::new(KEY, profile);
        let wire = seal(&mut sealer, 3, b"some ciphertext bits");
        let body = LENGTH_PREFIX_LEN..wire.len() - TAG_LEN;
        for bit in body.start * 8..body.end * 8 {
            let mut frame = wire.clone();
            frame[bit / 8] ^= 1 << (bit % 8);
            let mut opener = Opener::new(KEY, profile);
            assert!(matches!(
                opener.open_in_place(&mut frame),
                Err(Error::Authentication)
            ));
            assert_poisoned(&mut opener, &wire);
        }
    }
}

// Checks flipping any bit of the length prefix never lets a frame through: the decoder errors, waits (NeedMore), or delimits a different frame that the opener rejects with Authentication; all three outcomes occur.
#[test]
fn flipped_length_bit_never_authenticates() {
    let (mut errors, mut waits, mut rejected) = (0, 0, 0);
    for profile in PROFILES {
        for payload_len in [0usize, 1, 100, 1000] {
            let mut sealer = Sealer::new(KEY, profile);
            // Two frames on the wire, so a shorter or longer claim can land
            // inside the stream.
            let mut stream = seal(&mut sealer, 1, &vec![0xa5; payload_len]);
            let first_len = stream.len();
            sealer.seal_append(2, &[0x5a; 300], &mut stream).unwrap();
            let decoder = FrameDecoder::new(1 << 20);

            for bit in 0..32 {
                let mut wire = stream.clone();
                wire[bit / 8] ^= 0x80 >> (bit % 8);
                let mut opener = Opener::new(KEY, profile);
                match decoder.decode(&wire) {
                    Err(Error::FrameTooShort { len }) => {
                        assert!(len < MIN_CIPHERTEXT_LEN);
                        errors += 1;
                    }
                    Err(Error::FrameTooLarge { len, max, .. }) => {
                        assert!(len > max);
                        errors += 1;
                    }
                    Err(e) => panic!("unexpected decoder error {e:?}"),
                    Ok(Decoded::NeedMore(n)) => {
                        assert!(n > wire.len());
                        waits += 1;
                    }
                    Ok(Decoded::Frame(n)) => {
                        assert_ne!(n, first_len, "a flipped bit changes the length");
                        assert!(matches!(
                            opener.open_in_place(&mut wire[..n]),
                            Err(Error::Authentication)
                        ));
                        rejected += 1;
                    }
                }
            }
        }
    }
    assert!(
        errors > 0 && waits > 0 && rejected > 0,
        "{errors} {waits} {rejected}"
    );
}

// Checks opening the same wire bytes twice: the first succeeds, the replay is Authentication, then the opener is poisoned.
#[test]
fn replayed_frame_is_authentication() {
    for profile in PROFILES {
        let (mut sealer, mut opener) = pair(profile);
        let wire = seal(&mut sealer, 1, b"once only");
        let next = seal(&mut sealer, 3, b"next");
        let mut copy = wire.clone();
        assert_eq!(opener.open_in_place(&mut copy).unwrap().1, b"once only");
        let mut replay = wire.clone();
        assert!(matches!(
            opener.open_in_place(&mut replay),
            Err(Error::Authentication)
        ));
        assert_poisoned(&mut opener, &next);
    }
}

// Checks opening frame 2 before frame 1 is Authentication, and frame 1 afterwards is ReceiveFailed.
#[test]
fn reordered_frame_is_authentication() {
    for profile in PROFILES {
        let (mut sealer, mut opener) = pair(profile);
        let first = seal(&mut sealer, 1, b"first");
        let mut second = seal(&mut sealer, 3, b"second");
        assert!(matches!(
            opener.open_in_place(&mut second),
            Err(Error::Authentication)
        ));
        assert_eq!(opener.counter(), 0);
        assert_poisoned(&mut opener, &first);
    }
}

// Checks truncated (or overlong) frames handed to open_in_place, including ones with the prefix rewritten to match the cut, are Authentication, never a panic.
#[test]
fn truncated_frame_is_authentication() {
    for profile in PROFILES {
        let mut sealer = Sealer::new(KEY, profile);
        let wire = seal(&mut sealer, 5, b"truncate me please");
        for cut in [wire.len() - 1, wire.len() - TAG_LEN, FRAME_OVERHEAD, 3, 0] {
            let mut frame = wire[..cut].to_vec();
            let mut opener = Opener::new(KEY, profile);
            let r = opener.open_in_place(&mut frame);
            assert!(matches!(r, Err(Error::Authentication)), "cut {cut}: {r:?}");
            assert_poisoned(&mut opener, &wire);
        }
        // The prefix rewritten to the shorter length: the tag catches it.
        for cut in [wire.len() - 1, FRAME_OVERHEAD] {
            let mut frame = wire[..cut].to_vec();
            let ct_len = (cut - LENGTH_PREFIX_LEN) as u32;
            frame[..4].copy_from_slice(&ct_len.to_be_bytes());
            let mut opener = Opener::new(KEY, profile);
            assert!(matches!(
                opener.open_in_place(&mut frame),
                Err(Error::Authentication)
            ));
        }
        // Overlong (a frame with trailing bytes) is refused the same way.
        let mut frame = wire.clone();
        frame.push(0);
        let mut opener = Opener::new(KEY, profile);
        assert!(matches!(
            opener.open_in_place(&mut frame),
            Err(Error::Authentication)
        ));
    }
}

// Checks a frame sealed under another key is Authentication and later genuine frames are ReceiveFailed.
#[test]
fn wrong_key_is_authentication_then_receive_failed() {
    let mut sealer = Sealer::new(KEY, Profile::Secure);
    let mut other = Sealer::new([0x3d; KEY_LEN], Profile::Secure);
    let mut opener = Opener::new(KEY, Profile::Secure);
    let mut forged = seal(&mut other, 1, b"forged");
    let genuine = seal(&mut sealer, 1, b"genuine");
    assert!(matches!(
        opener.open_in_place(&mut forged),
        Err(Error::Authentication)
    ));
    assert_poisoned(&mut opener, &genuine);
}

// Checks a sealer at counter 2^64-1 seals once, then returns CounterExhausted from every seal entry point and writes nothing.
#[test]
fn sealer_counter_exhausts_without_writing() {
    for rekey_interval in [None, Some(REKEY_INTERVAL)] {
        let mut sealer = Sealer::with_counter(KEY, u64::MAX, rekey_interval);
        assert_eq!(sealer.counter(), u64::MAX);
        assert!(!sealer.is_exhausted());
        let last = seal(&mut sealer, 1, b"last frame");
        assert!(sealer.is_exhausted());

        let mut out = vec![0xEE; 64];
        let r = sealer.seal_into(2, b"one too many", &mut out);
        assert!(matches!(r, Err(Error::CounterExhausted)), "{r:?}");
        assert!(out.iter().all(|&b| b == 0xEE), "nothing written");

        let mut vec_out = vec![1, 2, 3];
        let cap = vec_out.capacity();
        assert!(matches!(
            sealer.seal_append(2, b"x", &mut vec_out),
            Err(Error::CounterExhausted)
        ));
        assert_eq!(
            (vec_out.as_slice(), vec_out.capacity()),
            (&[1, 2, 3][..], cap)
        );

        let mut prepared = vec![0xEE; frame_len(4)];
        assert!(matches!(
            sealer.seal_prepared(&mut prepared),
            Err(Error::CounterExhausted)
        ));
        assert!(prepared.iter().all(|&b| b == 0xEE), "nothing written");
        assert!(sealer.is_exhausted());

        // The last frame is genuine: it opens at counter 2^64-1.
        let mut opener = Opener::with_counter(KEY, u64::MAX, rekey_interval);
        let mut frame = last.clone();
        assert_eq!(opener.open_in_place(&mut frame).unwrap().1, b"last frame");
    }
}

// Checks an opener at counter 2^64-1 opens that frame, then refuses the next with CounterExhausted (what the code gives) and ReceiveFailed after that.
#[test]
fn opener_counter_exhausts() {
    let mut sealer = Sealer::with_counter(KEY, u64::MAX, None);
    let mut opener = Opener::with_counter(KEY, u64::MAX, None);
    assert_eq!(opener.counter(), u64::MAX);
    let mut frame = seal(&mut sealer, 7, b"final");
    let (seq, payload) = opener.open_in_place(&mut frame).unwrap();
    assert_eq!((seq, &payload[..]), (7, &b"final"[..]));
    assert!(!opener.has_failed());

    // Any well-formed frame now, e.g. one sealed at counter 0.
    let mut fresh = Sealer::new(KEY, Profile::Monte);
    let next = seal(&mut fresh, 8, b"beyond");
    let mut copy = next.clone();
    let r = opener.open_in_place(&mut copy);
    assert!(matches!(r, Err(Error::CounterExhausted)), "{r:?}");
    assert_eq!(copy, next, "nothing decrypted in place");
    assert_poisoned(&mut opener, &next);
}

// Checks seal_into with a too-short buffer (0, 1, or one byte short) is BufferTooSmall with exact sizes, writes nothing, and leaves the counter where it was (the next frame still opens at counter 0).
#[test]
fn seal_into_short_buffer_is_buffer_too_small() {
    for profile in PROFILES {
        let (mut sealer, mut opener) = pair(profile);
        for payload_len in [0usize, 1, 1400] {
            let payload = vec![0x42; payload_len];
            let needed = frame_len(payload_len);
            for available in [0, 1, needed - 1] {
                let mut out = vec![0xEE; available];
                let r = sealer.seal_into(1, &payload, &mut out);
                assert!(
                    matches!(r, Err(Error::BufferTooSmall { needed: n, available: a }) if n == needed && a == available),
                    "{r:?}"
                );
                assert!(out.iter().all(|&b| b == 0xEE));
                assert_eq!(sealer.counter(), 0);
            }
        }
        // seal_prepared below the fixed overhead too.
        let mut tiny = vec![0u8; FRAME_OVERHEAD - 1];
        assert!(matches!(
            sealer.seal_prepared(&mut tiny),
            Err(Error::BufferTooSmall { needed, available })
                if needed == FRAME_OVERHEAD && available == FRAME_OVERHEAD - 1
        ));
        assert_eq!(sealer.counter(), 0);

        // A larger buffer works and the frame opens at counter 0.
        let mut out = vec![0u8; frame_len(5) + 10];
        let n = sealer.seal_into(1, b"fits!", &mut out).unwrap();
        assert_eq!(n, frame_len(5));
        assert_eq!(sealer.counter(), 1);
        let (seq, payload) = opener.open_in_place(&mut out[..n]).unwrap();
        assert_eq!((seq, &payload[..]), (1, &b"fits!"[..]));
    }
}

// Checks seal_prepared seals a plaintext the caller built in place and it opens like seal_into's.
#[test]
fn seal_prepared_round_trips() {
    let (mut sealer, mut opener) = pair(Profile::Secure);
    let payload = b"built in place";
    let mut frame = vec![0u8; frame_len(payload.len())];
    frame[4..8].copy_from_slice(&77u32.to_be_bytes());
    frame[8..8 + payload.len()].copy_from_slice(payload);
    sealer.seal_prepared(&mut frame).unwrap();
    assert_eq!(&frame[..4], &((payload.len() + 20) as u32).to_be_bytes());
    let (seq, got) = opener.open_in_place(&mut frame).unwrap();
    assert_eq!((seq, &got[..]), (77, &payload[..]));
}

// Checks a secure-profile sealer/opener pair started at 2^24-2 stays in sync across the rekey at 2^24 (4 frames), and that the key at 2^24 is rekey(key) as the spec says.
#[test]
fn rekey_boundary_stays_in_sync() {
    let interval = Profile::Secure.rekey_interval();
    assert_eq!(interval, Some(REKEY_INTERVAL));
    assert_eq!(REKEY_INTERVAL, 1 << 24);
    let start = REKEY_INTERVAL - 2;
    let mut sealer = Sealer::with_counter(KEY, start, interval);
    let mut opener = Opener::with_counter(KEY, start, interval);
    let mut at_boundary = Vec::new();
    for i in 0..4u64 {
        assert_eq!(sealer.counter(), start + i);
        let payload = format!("frame {i}");
        let mut wire = seal(&mut sealer, i as u32, payload.as_bytes());
        if start + i == REKEY_INTERVAL {
            at_boundary = wire.clone();
        }
        let (seq, got) = opener.open_in_place(&mut wire).unwrap();
        assert_eq!((seq, &got[..]), (i as u32, payload.as_bytes()));
        assert_eq!(opener.counter(), start + i + 1);
    }
    // An opener that knows only rekey(KEY) opens the frame at 2^24.
    let mut rekeyed = Opener::with_counter(rekey(&KEY), REKEY_INTERVAL, None);
    assert_eq!(
        rekeyed.open_in_place(&mut at_boundary).unwrap().1,
        b"frame 2"
    );
}

// Checks an opener without rekey opens the frames before 2^24 from a rekeying sealer but fails with Authentication on the frame at 2^24.
#[test]
fn opener_without_rekey_fails_at_boundary() {
    let start = REKEY_INTERVAL - 2;
    let mut sealer = Sealer::with_counter(KEY, start, Some(REKEY_INTERVAL));
    let mut opener = Opener::with_counter(KEY, start, None);
    for i in 0..2u32 {
        let mut wire = seal(&mut sealer, i, b"before");
        assert_eq!(opener.open_in_place(&mut wire).unwrap().1, b"before");
    }
    assert_eq!(sealer.counter(), REKEY_INTERVAL);
    let mut wire = seal(&mut sealer, 2, b"after rekey");
    assert!(matches!(
        opener.open_in_place(&mut wire),
        Err(Error::Authentication)
    ));
    let next = seal(&mut sealer, 3, b"later");
    assert_poisoned(&mut opener, &next);
}

// Checks the monte profile never rekeys: a non-rekeying pair crosses 2^24 in sync.
#[test]
fn monte_never_rekeys() {
    assert_eq!(Profile::Monte.rekey_interval(), None);
    let start = REKEY_INTERVAL - 1;
    let mut sealer = Sealer::with_counter(KEY, start, Profile::Monte.rekey_interval());
    let mut opener = Opener::with_counter(KEY, start, None);
    for i in 0..3u32 {
        let mut wire = seal(&mut sealer, i, b"m");
        assert_eq!(opener.open_in_place(&mut wire).unwrap().0, i);
    }
}

// Checks seal_append reuses a Vec's capacity: after clear and a reseal of the same size neither capacity nor allocation changes, and appends go after existing bytes.
#[test]
fn seal_append_reuses_capacity() {
    let (mut sealer, mut opener) = pair(Profile::Secure);
    let payload = vec![0x11; 1400];
    let mut out = Vec::new();
    sealer.seal_append(1, &payload, &mut out).unwrap();
    let cap = out.capacity();
    let ptr = out.as_ptr();
    assert!(cap >= frame_len(1400));
    let mut first = out.clone();
    for seq in 2..10 {
        out.clear();
        let n = sealer.seal_append(seq, &payload, &mut out).unwrap();
        assert_eq!(n, frame_len(1400));
        assert_eq!(out.capacity(), cap);
        assert_eq!(out.as_ptr(), ptr, "no reallocation");
    }
    assert_eq!(opener.open_in_place(&mut first).unwrap().0, 1);

    // Appending keeps what was there: a prefix then a frame.
    let mut buf = b"keep".to_vec();
    let n = sealer.seal_append(11, b"tail", &mut buf).unwrap();
    assert_eq!(&buf[..4], b"keep");
    assert_eq!(buf.len(), 4 + n);
}

// Checks a stream of frames is delimited correctly when it arrives one byte at a time.
#[test]
fn decoder_delimits_byte_by_byte() {
    let (mut sealer, mut opener) = pair(Profile::Secure);
    let mut stream = Vec::new();
    let payloads: Vec<Vec<u8>> = (0..5).map(|i| vec![i as u8; i * 37]).collect();
    for (i, p) in payloads.iter().enumerate() {
        sealer.seal_append(i as u32, p, &mut stream).unwrap();
    }
    let decoder = FrameDecoder::new(1024);
    let mut inbox = Vec::new();
    let mut got = Vec::new();
    for &b in &stream {
        inbox.push(b);
        match decoder.decode(&inbox).unwrap() {
            Decoded::NeedMore(n) => assert!(n > inbox.len()),
            Decoded::Frame(n) => {
                assert_eq!(n, inbox.len());
                let (seq, p) = opener.open_in_place(&mut inbox).unwrap();
                got.push((seq, p.to_vec()));
                inbox.clear();
            }
        }
    }
    let want: Vec<(u32, Vec<u8>)> = payloads
        .into_iter()
        .enumerate()
        .map(|(i, p)| (i as u32, p))
        .collect();
    assert_eq!(got, want);
}

// ---------------------------------------------------------------------------
// Property tests
// ---------------------------------------------------------------------------

/// Cheap deterministic filler so large payloads cost little to generate.
fn filler(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn profile_strategy() -> impl Strategy<Value = Profile> {
    prop_oneof![Just(Profile::Secure), Just(Profile::Monte)]
}

/// What a receiver got from a stream: the frames it delivered, in order,
/// and the error that stopped it, if any.
type Received = (Vec<(u32, Vec<u8>)>, Option<Error>);

/// Feeds `stream` to a decoder in the given chunk sizes (cycled) as a reactor
/// would, opening every frame the decoder delimits, until the stream ends or
/// the first error.
fn receive(
    stream: &[u8],
    chunks: &[usize],
    decoder: FrameDecoder,
    opener: &mut Opener,
) -> Received {
    let mut inbox = Vec::new();
    let mut out = Vec::new();
    let mut pos = 0;
    let mut chunk_iter = chunks.iter().cycle();
    while pos < stream.len() {
        let step = (*chunk_iter.next().unwrap()).max(1).min(stream.len() - pos);
        inbox.extend_from_slice(&stream[pos..pos + step]);
        pos += step;
        loop {
            match decoder.decode(&inbox) {
                Err(e) => return (out, Some(e)),
                Ok(Decoded::NeedMore(n)) => {
                    assert!(n > inbox.len(), "NeedMore must ask for more than present");
                    assert!(n <= decoder.max_frame_len());
                    break;
                }
                Ok(Decoded::Frame(n)) => {
                    assert!(n >= FRAME_OVERHEAD && n <= inbox.len());
                    assert!(n <= decoder.max_frame_len());
                    match opener.open_in_place(&mut inbox[..n]) {
                        Ok((seq, payload)) => out.push((seq, payload.to_vec())),
                        Err(e) => return (out, Some(e)),
                    }
                    inbox.drain(..n);
                }
            }
        }
    }
    (out, None)
}

/// The errors hostile input may produce on the receive path.
fn documented_receive_error(e: &Error) -> bool {
    matches!(
        e,
        Error::FrameTooShort { .. }
            | Error::FrameTooLarge { .. }
            | Error::Authentication
            | Error::ReceiveFailed
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    // Checks seal then decode+open round-trips random payloads (0..=70000 bytes), random seqs and counters, several frames per stream, random chunking, both profiles.
    #[test]
    fn prop_seal_open_round_trip(
        profile in profile_strategy(),
        frames in prop::collection::vec((any::<u32>(), 0usize..=70_000, any::<u64>()), 1..4),
        counter in prop_oneof![Just(0u64), any::<u64>().prop_map(|c| c >> 1), Just(REKEY_INTERVAL - 2)],
        chunks in prop::collection::vec(1usize..20_000, 1..6),
        key in any::<[u8; 32]>(),
    ) {
        let interval = profile.rekey_interval();
        let mut sealer = Sealer::with_counter(key, counter, interval);
        let mut opener = Opener::with_counter(key, counter, interval);
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for &(seq, len, seed) in &frames {
            let payload = filler(len, seed);
            let n = sealer.seal_append(seq, &payload, &mut stream).unwrap();
            prop_assert_eq!(n, frame_len(len));
            want.push((seq, payload));
        }
        let (got, err) = receive(&stream, &chunks, FrameDecoder::new(70_000), &mut opener);
        prop_assert!(err.is_none(), "{:?}", err);
        prop_assert_eq!(got, want);
        prop_assert_eq!(opener.counter(), sealer.counter());
    }

    // Checks seal_into into an exact buffer round-trips a single frame with a random seq at counter 0.
    #[test]
    fn prop_seal_into_exact_buffer(
        profile in profile_strategy(),
        seq in any::<u32>(),
        len in 0usize..=70_000,
        seed in any::<u64>(),
    ) {
        let (mut sealer, mut opener) = pair(profile);
        let payload = filler(len, seed);
        let mut out = vec![0u8; frame_len(len)];
        prop_assert_eq!(sealer.seal_into(seq, &payload, &mut out).unwrap(), out.len());
        let (got_seq, got) = opener.open_in_place(&mut out).unwrap();
        prop_assert_eq!(got_seq, seq);
        prop_assert_eq!(&got[..], &payload[..]);
    }

    // Checks payloads just below, at and above a configured 1 MiB maximum: up to the max they round-trip, above it the decoder reports FrameTooLarge from the prefix.
    #[test]
    fn prop_near_configured_max(
        profile in profile_strategy(),
        delta in -3i64..=3,
        seq in any::<u32>(),
    ) {
        const MAX: usize = 1 << 20;
        let len = (MAX as i64 + delta) as usize;
        let (mut sealer, mut opener) = pair(profile);
        let payload = filler(len, seq as u64);
        let mut wire = Vec::with_capacity(frame_len(len));
        sealer.seal_append(seq, &payload, &mut wire).unwrap();
        let decoder = FrameDecoder::new(MAX);
        match decoder.decode(&wire) {
            Ok(Decoded::Frame(n)) => {
                prop_assert!(len <= MAX);
                prop_assert_eq!(n, wire.len());
                let (got_seq, got) = opener.open_in_place(&mut wire).unwrap();
                prop_assert_eq!(got_seq, seq);
                prop_assert_eq!(&got[..], &payload[..]);
            }
            Err(Error::FrameTooLarge { len: l, max, .. }) => {
                prop_assert!(len > MAX);
                prop_assert_eq!(l, len + MIN_CIPHERTEXT_LEN);
                prop_assert_eq!(max, MAX + MIN_CIPHERTEXT_LEN);
                // The prefix alone was enough.
                prop_assert!(decoder.decode(&wire[..4]).is_err());
            }
            other => prop_assert!(false, "unexpected {:?}", other),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    // Checks random garbage in random chunkings through decode + open_in_place never panics and fails only with documented variants (nothing authenticates).
    #[test]
    fn prop_garbage_never_panics(
        garbage in prop::collection::vec(any::<u8>(), 0..2048),
        chunks in prop::collection::vec(1usize..300, 1..8),
        max in prop_oneof![Just(0usize), 1usize..4096, Just(usize::MAX)],
        profile in profile_strategy(),
    ) {
        let mut opener = Opener::new(KEY, profile);
        let (frames, err) = receive(&garbage, &chunks, FrameDecoder::new(max), &mut opener);
        // No frame can authenticate; the stream errs or ends inside a frame.
        prop_assert!(frames.is_empty());
        if let Some(e) = err {
            prop_assert!(documented_receive_error(&e), "{:?}", e);
        }
        // Once failed, it stays failed.
        if opener.has_failed() {
            prop_assert!(matches!(opener.open_in_place(&mut []), Err(Error::ReceiveFailed)));
        }
    }

    // Checks garbage shaped like frames (plausible length prefixes, random bodies) reaches the opener and is refused with Authentication or a length error, never a panic.
    #[test]
    fn prop_framed_garbage_never_authenticates(
        segments in prop::collection::vec((0u32..200, prop::collection::vec(any::<u8>(), 0..200)), 1..6),
        chunks in prop::collection::vec(1usize..64, 1..5),
        profile in profile_strategy(),
    ) {
        let mut stream = Vec::new();
        for (prefix, body) in &segments {
            stream.extend_from_slice(&prefix.to_be_bytes());
            stream.extend_from_slice(body);
        }
        let mut opener = Opener::new(KEY, profile);
        let (frames, err) = receive(&stream, &chunks, FrameDecoder::new(256), &mut opener);
        prop_assert!(frames.is_empty());
        if let Some(e) = err {
            prop_assert!(documented_receive_error(&e), "{:?}", e);
        }
        // The first segment handed straight to the opener fails too.
        let first = &mut stream[..4 + segments[0].1.len()];
        let r = Opener::new(KEY, profile).open_in_place(first);
        prop_assert!(matches!(r, Err(Error::FrameTooShort { .. }) | Err(Error::Authentication)), "{:?}", r);
    }

    // Checks a genuine stream with random bytes overwritten: frames before the damage open unchanged, nothing after it is delivered, and every error is documented.
    #[test]
    fn prop_mutated_stream_only_delivers_genuine_frames(
        profile in profile_strategy(),
        lens in prop::collection::vec(0usize..300, 1..5),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        chunks in prop::collection::vec(1usize..128, 1..5),
    ) {
        let (mut sealer, mut opener) = pair(profile);
        let mut stream = Vec::new();
        let mut want = Vec::new();
        for (i, &len) in lens.iter().enumerate() {
            let payload = filler(len, i as u64 + 1);
            sealer.seal_append(i as u32, &payload, &mut stream).unwrap();
            want.push((i as u32, payload));
        }
        let original = stream.clone();
        for (idx, byte) in &edits {
            let at = idx.index(stream.len());
            stream[at] = *byte;
        }
        let first_damage = stream.iter().zip(&original).position(|(a, b)| a != b);
        let (got, err) = receive(&stream, &chunks, FrameDecoder::new(512), &mut opener);
        if let Some(e) = &err {
            prop_assert!(documented_receive_error(e), "{:?}", e);
        }
        // Whatever was delivered is a genuine prefix of what was sent, and
        // lies entirely before the first damaged byte.
        prop_assert!(got.len() <= want.len());
        prop_assert_eq!(&got[..], &want[..got.len()]);
        if let Some(damage) = first_damage {
            let delivered_bytes: usize = got.iter().map(|(_, p)| frame_len(p.len())).sum();
            prop_assert!(delivered_bytes <= damage);
            prop_assert!(got.len() < want.len(), "a damaged stream is never delivered whole");
        } else {
            prop_assert!(err.is_none());
            prop_assert_eq!(got, want);
        }
    }
}
