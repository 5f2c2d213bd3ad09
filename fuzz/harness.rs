//! The fuzz targets' logic, shared by the cargo-fuzz targets in
//! `fuzz/fuzz_targets/` and the plain regression tests in
//! `tests/fuzz_regressions.rs` (both pull this file in with `#[path]`), so a
//! corpus file replays through exactly the same code in `cargo test`.
//!
//! Only the public API is used (`monte_rpc::protocol::*`, `monte_rpc::Error`),
//! plus the runtime's own connection core, `protocol::connection`, which is
//! public (hidden from the docs) so that `connection_input` drives the real
//! thing. Every function panics on a broken invariant and returns normally
//! on any input the library handles correctly.

// Each fuzz target uses one entry point; the rest is dead code there.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use monte_rpc::protocol::connection::{
    ConnCore, Deadlines, Filled, Limits, Next, ReadPhase, Taker, Unpooled,
};
use monte_rpc::protocol::wire::{
    append_record, frame_len, rekey, Decoded, FrameDecoder, SeqAllocator, FRAME_OVERHEAD,
    LENGTH_PREFIX_LEN, MIN_CIPHERTEXT_LEN, RECORD_HEADER_LEN, REKEY_INTERVAL,
};
use monte_rpc::protocol::{
    ClientHandshake, Handshake, Opener, Profile, Role, Sealer, ServerHandshake, Session, KEY_LEN,
    REFUSED_AT_CAP,
};
use monte_rpc::{Error, HandshakeError, TimeoutKind};

/// Largest payload the fuzzed decoders accept.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Largest whole frame the fuzzed decoders accept.
pub const MAX_FRAME: usize = MAX_PAYLOAD + FRAME_OVERHEAD;
/// Largest chunk a [`Chunker`] hands out.
pub const MAX_CHUNK: usize = 128 * 1024;
/// Bound on any single heap allocation made while a target runs (checked by
/// the targets that install [`PeakAlloc`]): nothing may be sized from a
/// claimed length, so buffers stay within a few frames and chunks.
pub const ALLOC_BOUND: usize = 4 * (MAX_FRAME + MAX_CHUNK);
/// The fixed key of `frame_decode`'s opener (seeds are sealed with it).
pub const FIXED_KEY: [u8; KEY_LEN] = [0x42; KEY_LEN];

/// A global allocator that remembers the largest single allocation.
pub struct PeakAlloc {
    peak: AtomicUsize,
}

impl Default for PeakAlloc {
    fn default() -> Self {
        Self::new()
    }
}

impl PeakAlloc {
    pub const fn new() -> Self {
        PeakAlloc {
            peak: AtomicUsize::new(0),
        }
    }
    pub fn reset(&self) {
        self.peak.store(0, Ordering::Relaxed);
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::Relaxed)
    }
}

unsafe impl GlobalAlloc for PeakAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.peak.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.peak.fetch_max(layout.size(), Ordering::Relaxed);
        System.alloc_zeroed(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.peak.fetch_max(new_size, Ordering::Relaxed);
        System.realloc(ptr, layout, new_size)
    }
}

/// Reads the fuzz input front to back; past the end it yields zeros.
pub struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data }
    }
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    pub fn byte(&mut self) -> u8 {
        match self.data.split_first() {
            Some((&b, rest)) => {
                self.data = rest;
                b
            }
            None => 0,
        }
    }
    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.byte(), self.byte()])
    }
    pub fn u32(&mut self) -> u32 {
        u32::from_be_bytes([self.byte(), self.byte(), self.byte(), self.byte()])
    }
    pub fn u64(&mut self) -> u64 {
        (u64::from(self.u32()) << 32) | u64::from(self.u32())
    }
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> &'a [u8] {
        let (head, rest) = self.data.split_at(n.min(self.data.len()));
        self.data = rest;
        head
    }
    pub fn rest(&mut self) -> &'a [u8] {
        self.take(usize::MAX)
    }
}

/// The profile named by bit 0 of `b`.
pub fn profile_from(b: u8) -> Profile {
    if b & 1 == 0 {
        Profile::Secure
    } else {
        Profile::Monte
    }
}

/// Chunk sizes for delivering a byte stream, cycling through four sizes
/// read from the input: byte `b < 0x80` is `b` bytes (0 is an empty read),
/// otherwise `((b & 0x7f) + 1) KiB`. Never two empty reads in a row, so
/// every stream is delivered in finitely many reads.
pub struct Chunker {
    sizes: [usize; 4],
    next: usize,
    last_empty: bool,
}

impl Chunker {
    pub fn new(input: &mut Input) -> Self {
        let mut sizes = [0; 4];
        for s in &mut sizes {
            let b = input.byte();
            *s = if b < 0x80 {
                usize::from(b)
            } else {
                (usize::from(b & 0x7f) + 1) * 1024
            };
        }
        Chunker {
            sizes,
            next: 0,
            last_empty: false,
        }
    }

    /// One chunk: how many of the `remaining` bytes the next read delivers.
    pub fn take_chunk(&mut self, remaining: usize) -> usize {
        let mut n = self.sizes[self.next % 4].min(remaining);
        self.next += 1;
        if n == 0 && self.last_empty {
            n = remaining.min(1);
        }
        self.last_empty = n == 0;
        debug_assert!(n <= MAX_CHUNK);
        n
    }
}

/// The errors the frame layer documents for received input.
fn assert_receive_error(e: &Error) {
    match *e {
        Error::FrameTooShort { len } => assert!(len < MIN_CIPHERTEXT_LEN, "{e:?}"),
        Error::FrameTooLarge { len, max, .. } => {
            // A frame's limit, unbundled or bundled (a record more).
            let bundled = MAX_PAYLOAD + MIN_CIPHERTEXT_LEN + RECORD_HEADER_LEN - 4;
            assert!(
                max == MAX_PAYLOAD + MIN_CIPHERTEXT_LEN || max == bundled,
                "{e:?}"
            );
            assert!(len > max, "{e:?}");
        }
        Error::MalformedBundle { claimed, left } => assert!(claimed > left, "{e:?}"),
        Error::Authentication | Error::ReceiveFailed | Error::CounterExhausted => {}
        _ => panic!("undocumented receive error: {e:?}"),
    }
}

/// A poisoned opener refuses everything with `ReceiveFailed`, even the
/// frame that its counter expects, sealed with the right key.
fn assert_poisoned(opener: &mut Opener, key_in_force: [u8; KEY_LEN], profile: Profile) {
    assert!(opener.has_failed());
    let counter = opener.counter();
    for attempt in [&mut [][..], &mut [0u8; 3][..], &mut [0u8; 24][..]] {
        assert!(matches!(
            opener.open_in_place(attempt),
            Err(Error::ReceiveFailed)
        ));
    }
    let mut sealer = Sealer::with_counter(key_in_force, counter, profile.rekey_interval());
    let mut frame = Vec::new();
    if sealer.seal_append(1, b"valid", &mut frame).is_ok() {
        assert!(matches!(
            opener.open_in_place(&mut frame),
            Err(Error::ReceiveFailed)
        ));
    }
    assert_eq!(
        opener.counter(),
        counter,
        "a poisoned opener never advances"
    );
}

/// The key in force at `counter` for a direction that had `key` at `start`.
fn key_at(profile: Profile, key: [u8; KEY_LEN], start: u64, counter: u64) -> [u8; KEY_LEN] {
    let mut key = key;
    if let Some(interval) = profile.rekey_interval() {
        for _ in start / interval..counter / interval {
            key = rekey(&key);
        }
    }
    key
}

/// What a received stream produced: the opened frames and the error that
/// ended it, if any (as its `Debug` text, so outcomes compare).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    frames: Vec<(u32, Vec<u8>)>,
    error: Option<String>,
}

/// Delivers `stream` to a decoder and an opener in the chunks `chunks`
/// gives, the way the reactor does: append, delimit, open each whole frame
/// in place, drop it, stop on the first error.
fn receive(
    stream: &[u8],
    chunks: &mut Chunker,
    opener: &mut Opener,
    key: [u8; KEY_LEN],
    profile: Profile,
) -> Outcome {
    let decoder = FrameDecoder::new(MAX_PAYLOAD);
    assert_eq!(decoder.max_frame_len(), MAX_FRAME);
    let mut outcome = Outcome {
        frames: Vec::new(),
        error: None,
    };
    let mut buf: Vec<u8> = Vec::new();
    let mut pos = 0;
    let mut reads = 0usize;
    'read: while pos < stream.len() {
        let n = chunks.take_chunk(stream.len() - pos);
        buf.extend_from_slice(&stream[pos..pos + n]);
        pos += n;
        reads += 1;
        assert!(reads <= 2 * stream.len() + 2, "no progress");
        assert!(buf.len() <= MAX_FRAME + n, "receive buffer outgrew a frame");
        loop {
            match decoder.decode(&buf) {
                Ok(Decoded::NeedMore(need)) => {
                    assert!(need > buf.len() && need <= MAX_FRAME, "{need}");
                    break;
                }
                Ok(Decoded::Frame(len)) => {
                    assert!((FRAME_OVERHEAD..=MAX_FRAME).contains(&len) && len <= buf.len());
                    let prefix = u32::from_be_bytes(buf[..4].try_into().unwrap()) as usize;
                    assert_eq!(len, LENGTH_PREFIX_LEN + prefix);
                    let counter = opener.counter();
                    match opener.open_in_place(&mut buf[..len]) {
                        Ok((seq, payload)) => {
                            assert_eq!(payload.len(), len - FRAME_OVERHEAD);
                            assert!(!opener.has_failed());
                            assert!(counter == u64::MAX || opener.counter() == counter + 1);
                            outcome.frames.push((seq, payload.to_vec()));
                        }
                        Err(e) => {
                            assert_receive_error(&e);
                            assert!(!matches!(e, Error::ReceiveFailed), "first failure");
                            assert!(
                                !matches!(e, Error::CounterExhausted) || counter == u64::MAX,
                                "{e:?} at counter {counter}"
                            );
                            assert_poisoned(opener, key, profile);
                            outcome.error = Some(format!("{e:?}"));
                            break 'read;
                        }
                    }
                    buf.drain(..len);
                }
                Err(e) => {
                    assert!(
                        matches!(e, Error::FrameTooShort { .. } | Error::FrameTooLarge { .. }),
                        "{e:?}"
                    );
                    assert_receive_error(&e);
                    outcome.error = Some(format!("{e:?}"));
                    break 'read;
                }
            }
        }
    }
    outcome
}

/// Target `frame_decode`: arbitrary bytes, in arbitrary chunks, into a
/// decoder and an opener under [`FIXED_KEY`].
///
/// Input: `flags` (bit 0 profile, bit 1 also open an undelimited slice),
/// four chunk-size bytes, then the stream.
pub fn frame_decode(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let profile = profile_from(flags);
    let mut chunks = Chunker::new(&mut input);
    let stream = input.rest();

    let mut opener = Opener::new(FIXED_KEY, profile);
    let chunked = receive(stream, &mut chunks, &mut opener, FIXED_KEY, profile);
    // The outcome cannot depend on how the stream was split.
    let mut whole = Chunker {
        sizes: [MAX_CHUNK; 4],
        next: 0,
        last_empty: false,
    };
    let mut opener2 = Opener::new(FIXED_KEY, profile);
    let at_once = receive(stream, &mut whole, &mut opener2, FIXED_KEY, profile);
    assert_eq!(chunked, at_once, "outcome depends on the chunking");

    if flags & 2 != 0 {
        // The opener's own checks on a slice the decoder did not delimit.
        let mut raw = stream[..stream.len().min(256)].to_vec();
        let mut opener = Opener::new(FIXED_KEY, profile);
        match opener.open_in_place(&mut raw) {
            Ok((_, payload)) => assert_eq!(payload.len() + FRAME_OVERHEAD, stream.len().min(256)),
            Err(e) => {
                assert!(
                    matches!(e, Error::Authentication | Error::FrameTooShort { .. }),
                    "{e:?}"
                );
                assert_poisoned(&mut opener, FIXED_KEY, profile);
            }
        }
    }
}

/// Drives one side of the specification's handshake against arbitrary peer
/// bytes delivered in arbitrary chunks, like the reactor does.
///
/// Input: `flags` (bit 0 profile), four chunk-size bytes, the peer's bytes.
pub fn handshake(data: &[u8], role: Role) {
    let mut input = Input::new(data);
    let profile = profile_from(input.byte());
    let chunks = Chunker::new(&mut input);
    let peer = input.rest();
    match role {
        Role::Client => {
            let hs = ClientHandshake::new(profile).expect("key generation");
            drive_handshake(hs, |hs| Some(*hs.public_key()), role, profile, peer, chunks);
        }
        Role::Server => {
            let hs = ServerHandshake::new(profile).expect("no key generation yet");
            // The server makes its key only once the client's is in.
            assert!(hs.public_key().is_none(), "server key made up front");
            drive_handshake(
                hs,
                |hs| hs.public_key().copied(),
                role,
                profile,
                peer,
                chunks,
            );
        }
    }
}

fn drive_handshake<H: Handshake>(
    mut hs: H,
    public_of: impl Fn(&H) -> Option<[u8; KEY_LEN]>,
    role: Role,
    profile: Profile,
    peer: &[u8],
    mut chunks: Chunker,
) {
    let mut out = Vec::new();
    let mut received = 0; // bytes the "socket" delivered so far
    let mut consumed = 0; // bytes the handshake used
    let mut session = None;
    let mut failed = None;
    let mut reads = 0usize;
    loop {
        hs.write_output(&mut out);
        if let Some(s) = hs.take_session() {
            session = Some(s);
            break;
        }
        if received == peer.len() {
            break; // the peer closed
        }
        let n = chunks.take_chunk(peer.len() - received);
        received += n;
        reads += 1;
        assert!(reads <= 2 * peer.len() + 2, "no progress");
        let avail = &peer[consumed..received];
        match hs.read_input(avail) {
            Ok(used) => {
                assert!(used <= avail.len(), "consumed more than it was given");
                consumed += used;
                assert!(consumed <= KEY_LEN);
                // Handshake bytes are always taken while the key is short.
                assert_eq!(consumed, received.min(KEY_LEN));
                if role == Role::Server {
                    // No session before its output has been taken.
                    assert!(hs.take_session().is_none(), "session before output");
                }
            }
            Err(e) => {
                // Only a complete, low-order peer key fails; a client
                // reads the all-zero one as the refusal at the cap.
                let refusal = role == Role::Client && peer[..KEY_LEN] == REFUSED_AT_CAP;
                assert!(
                    if refusal {
                        matches!(e, Error::ConnectionLimit)
                    } else {
                        matches!(e, Error::Handshake(HandshakeError::LowOrderPublicKey))
                    },
                    "{e:?}"
                );
                assert!(received >= KEY_LEN);
                failed = Some(e);
                break;
            }
        }
    }

    // What went out: the client's key first thing; the server's only after a
    // valid client key.
    let expect_output = role == Role::Client || session.is_some();
    if expect_output {
        let public = public_of(&hs).expect("a key once it spoke");
        assert_eq!(out, public, "output is exactly our public key");
    } else {
        assert!(out.is_empty(), "server spoke without a valid client key");
    }
    if session.is_some() {
        assert_eq!(consumed, KEY_LEN);
        assert!(failed.is_none());
    } else if failed.is_none() {
        assert!(peer.len() < KEY_LEN, "a whole key must end the handshake");
    }

    // Finished or failed: no more input, output or sessions.
    if session.is_some() || failed.is_some() {
        let rest = &peer[consumed..received];
        for input in [rest, &[][..], &[0u8; 40][..]] {
            match hs.read_input(input) {
                Err(Error::Handshake(HandshakeError::AlreadyFinished)) => {}
                other => panic!("input after the end: {other:?}"),
            }
        }
    }
    let before = out.len();
    hs.write_output(&mut out);
    assert_eq!(out.len(), before, "output after the end");
    assert!(hs.take_session().is_none(), "a second session");

    if let Some(mut s) = session {
        check_fresh_session(&mut s, profile);
    }
}

/// A fresh session's directions start at 0; the monte profile uses one key
/// both ways, the secure profile one per direction.
fn check_fresh_session(s: &mut Session, profile: Profile) {
    assert_eq!(s.sealer.counter(), 0);
    assert_eq!(s.opener.counter(), 0);
    let mut frame = Vec::new();
    s.sealer.seal_append(7, b"ping", &mut frame).unwrap();
    match (profile, s.opener.open_in_place(&mut frame)) {
        (Profile::Monte, Ok((7, payload))) => assert_eq!(payload, b"ping"),
        (Profile::Secure, Err(Error::Authentication)) => {}
        (p, r) => panic!("{p:?}: own frame opened as {r:?}"),
    }
}

/// Target `session_roundtrip`: payloads sealed with `seal_append`, delimited
/// and opened, from counter 0, near a rekey boundary, near `u64::MAX` or an
/// arbitrary counter.
///
/// Input: `flags` (bit 0 profile, bits 1-2 start: 0 zero, 1 just before a
/// rekey boundary, 2 just before `u64::MAX`, 3 arbitrary), `d` (distance to
/// the boundary, mod 8), `k` (which boundary), eight counter bytes (mode 3
/// only), four chunk-size bytes, then messages: `tag` (bits 0-6 length, 127
/// meaning a 2-byte length follows; bit 7 a 4-byte seq follows, else the
/// seq is the message index), the seq, the length, the payload.
pub fn session_roundtrip(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let profile = profile_from(flags);
    let d = u64::from(input.byte() % 8);
    let k = u64::from(input.byte()) + 1;
    let start = match (flags >> 1) & 3 {
        0 => 0,
        1 => k * REKEY_INTERVAL - d,
        2 => u64::MAX - d,
        _ => input.u64(),
    };
    let mut chunks = Chunker::new(&mut input);
    let key = [0x17; KEY_LEN];
    let interval = profile.rekey_interval();
    let mut sealer = Sealer::with_counter(key, start, interval);

    let mut wire = Vec::new();
    let mut sent: Vec<(u32, Vec<u8>)> = Vec::new();
    let mut exhausted_seen = false;
    let mut index = 0u32;
    while !input.is_empty() && sent.len() < 256 {
        let tag = input.byte();
        let seq = if tag & 0x80 != 0 { input.u32() } else { index };
        let len = match tag & 0x7f {
            0x7f => usize::from(input.u16()),
            n => usize::from(n),
        };
        let payload = input.take(len.min(MAX_PAYLOAD));
        index = index.wrapping_add(1);

        let counter = sealer.counter();
        let was_exhausted = sealer.is_exhausted();
        let before = wire.len();
        match sealer.seal_append(seq, payload, &mut wire) {
            Ok(n) => {
                assert!(!was_exhausted);
                assert_eq!(n, frame_len(payload.len()));
                assert_eq!(wire.len(), before + n);
                // Cross-check the rekey schedule: a fresh opener holding the
                // key that should be in force at this counter opens it.
                let mut copy = wire[before..].to_vec();
                let mut check =
                    Opener::with_counter(key_at(profile, key, start, counter), counter, interval);
                let (s, p) = check.open_in_place(&mut copy).expect("key schedule");
                assert_eq!((s, &p[..]), (seq, payload));
                if counter == u64::MAX {
                    assert!(sealer.is_exhausted());
                } else {
                    assert_eq!(sealer.counter(), counter + 1);
                }
                sent.push((seq, payload.to_vec()));
            }
            Err(Error::CounterExhausted) => {
                assert!(
                    was_exhausted && counter == u64::MAX,
                    "exhausted at {counter}"
                );
                assert_eq!(wire.len(), before, "a failed seal wrote");
                exhausted_seen = true;
            }
            Err(e) => panic!("seal failed: {e:?}"),
        }
    }
    assert_eq!(
        exhausted_seen || sealer.is_exhausted(),
        start.checked_add(sent.len() as u64).is_none(),
        "exhaustion exactly after the frame with counter u64::MAX"
    );

    let mut opener = Opener::with_counter(key, start, interval);
    let got = receive(&wire, &mut chunks, &mut opener, key, profile);
    assert_eq!(got.error, None);
    assert_eq!(got.frames, sent, "round trip changed the messages");

    if sealer.is_exhausted() {
        // The opener is used up too: its next frame, however well formed,
        // is refused without reusing the nonce, and the refusal is final.
        let mut frame = vec![0u8; frame_len(3)];
        let claimed = (frame.len() - LENGTH_PREFIX_LEN) as u32;
        frame[..4].copy_from_slice(&claimed.to_be_bytes());
        assert!(matches!(
            opener.open_in_place(&mut frame),
            Err(Error::CounterExhausted)
        ));
        assert!(matches!(
            opener.open_in_place(&mut frame),
            Err(Error::ReceiveFailed)
        ));
        let mut out = Vec::new();
        assert!(matches!(
            sealer.seal_into(1, b"x", &mut [0u8; 64]),
            Err(Error::CounterExhausted)
        ));
        assert!(matches!(
            sealer.seal_append(1, b"x", &mut out),
            Err(Error::CounterExhausted)
        ));
        assert!(out.is_empty());
    }
}

/// Runs the specification's handshake in memory; returns (client, server).
pub fn in_memory_handshake(profile: Profile) -> (Session, Session) {
    let mut client = ClientHandshake::new(profile).expect("client key");
    let mut server = ServerHandshake::new(profile).expect("server key");
    let mut c2s = Vec::new();
    let mut s2c = Vec::new();
    client.write_output(&mut c2s);
    assert!(client.take_session().is_none());
    assert_eq!(server.read_input(&c2s).expect("server reads"), KEY_LEN);
    server.write_output(&mut s2c);
    let server_session = server.take_session().expect("server session");
    assert_eq!(client.read_input(&s2c).expect("client reads"), KEY_LEN);
    client.write_output(&mut c2s);
    assert_eq!(c2s.len(), KEY_LEN);
    let client_session = client.take_session().expect("client session");
    (client_session, server_session)
}

/// The server side of a connection: receive buffer, decoder, opener and the
/// requests it has in flight.
/// The server's receiving side: the runtime's own connection core, fed
/// the chunks as a socket would deliver them, with the frames it opens
/// routed as the reactor routes them.
struct ServerSide {
    core: ConnCore,
    /// Whether the handshake agreed on bundled frames.
    bundles: bool,
    /// The time passed to the core, in nanoseconds.
    now: u64,
    requests: SeqAllocator,
    requests_seen: Vec<u32>,
    responses: Vec<u32>,
    late: Vec<u32>,
    error: Option<Error>,
}

/// A read source that hands out one chunk, then would block (a socket
/// with nothing more queued).
struct OneChunk<'a>(&'a [u8]);

impl std::io::Read for OneChunk<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.0.is_empty() {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        let n = buf.len().min(self.0.len());
        buf[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

/// The deadlines the fuzzed core judges its peer by.
const FUZZ_DEADLINES: Deadlines = Deadlines {
    handshake: None,
    read: Some(std::time::Duration::from_millis(1000)),
    frame: Some(std::time::Duration::from_millis(50)),
};

impl ServerSide {
    fn new(opener: Opener, slots: usize) -> Self {
        ServerSide {
            bundles: opener.bundles(),
            core: ConnCore::new(
                ReadPhase::Open { opener },
                Role::Server,
                Limits {
                    buffer_size: 1024,
                    max_message_size: MAX_PAYLOAD,
                    deadlines: FUZZ_DEADLINES,
                },
                &[],
                0,
            ),
            now: 0,
            requests: SeqAllocator::new(Role::Server, slots),
            requests_seen: Vec::new(),
            responses: Vec::new(),
            late: Vec::new(),
            error: None,
        }
    }

    /// Takes in one read of `chunk` and handles every whole frame, as the
    /// reactor does: frames first, then the next read, until the source
    /// would block.
    fn on_read(&mut self, chunk: &[u8]) {
        assert!(self.error.is_none(), "read after the stream ended");
        let mut source = OneChunk(chunk);
        loop {
            loop {
                let (seq, len, response) = match self.core.next_frame(self.now, Taker::Reactor) {
                    Ok(Next::Message { seq, len }) => (seq, len, false),
                    Ok(Next::Response { seq, len }) => (seq, len, true),
                    Ok(Next::NeedBytes) => break,
                    Ok(Next::ReactorsTurn) => panic!("the reactor's turn, for the reactor"),
                    Err(e) => {
                        assert!(
                            matches!(
                                e,
                                Error::FrameTooShort { .. }
                                    | Error::FrameTooLarge { .. }
                                    | Error::MalformedBundle { .. }
                                    | Error::Authentication
                            ),
                            "{e:?}"
                        );
                        assert_receive_error(&e);
                        self.error = Some(e);
                        return;
                    }
                };
                if self.bundles {
                    // A record's share of its frame: its header and payload,
                    // and the frame's prefix (first) or tag (last).
                    let payload = self.core.payload(len).len();
                    assert!(payload + RECORD_HEADER_LEN <= len, "{len}");
                    assert!(len <= MAX_FRAME + RECORD_HEADER_LEN - 4, "{len}");
                } else {
                    assert!((FRAME_OVERHEAD..=MAX_FRAME).contains(&len), "{len}");
                    assert_eq!(self.core.payload(len).len(), len - FRAME_OVERHEAD);
                }
                // The core tells responses from messages by the same rule
                // the request numbers are issued by.
                assert_eq!(response, self.requests.space().is_ours(seq), "{seq}");
                if response {
                    // A response: completes a pending request, or is a
                    // late/unknown one and is dropped.
                    if self.requests.release(seq) {
                        assert!(!self.requests.is_pending(seq));
                        self.responses.push(seq);
                    } else {
                        self.late.push(seq);
                    }
                } else {
                    assert!(seq == 0 || seq & 1 == 1, "client parity");
                    self.requests_seen.push(seq);
                }
                self.core.consume(len);
            }
            // Never sized from a claimed length: at most one frame (or the
            // initial size), doubled once while it grows.
            assert!(
                self.core.buffer_len() <= 2 * MAX_FRAME,
                "{}",
                self.core.buffer_len()
            );
            match self.core.fill(&mut source, self.now, &Unpooled) {
                Ok(Filled::Bytes { .. }) => {}
                Ok(Filled::WouldBlock) => return,
                Ok(Filled::Eof) => panic!("a chunk source never ends"),
                Err(e) => panic!("read from memory failed: {e}"),
            }
        }
    }

    /// Time passes: the core's verdict on the peer must agree with what it
    /// holds and when bytes last came.
    fn tick(&mut self, elapsed_ms: u64) {
        self.now += elapsed_ms * 1_000_000;
        let read_limit = FUZZ_DEADLINES.read.unwrap().as_nanos() as u64;
        let silent = self.now - self.core.last_read();
        match self.core.expired(self.now, false) {
            Some(TimeoutKind::Read) => assert!(silent >= read_limit),
            Some(TimeoutKind::Frame) => {
                assert!(silent < read_limit);
                assert!(
                    self.core.buffered() > 0,
                    "a frame deadline with no partial frame"
                );
            }
            Some(other) => panic!("an open connection expired with {other:?}"),
            None => {
                assert!(silent < read_limit);
                if let Some(at) = self.core.next_deadline() {
                    assert!(at > self.now, "a deadline in the past did not expire");
                }
            }
        }
        // Paused reading judges nothing but the handshake.
        assert_eq!(self.core.expired(self.now, true), None);
    }
}

/// What the server must see for one frame, while the stream is still clean.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Request(u32),
    Response(u32),
    Late(u32),
}

/// Target `connection_input`: after a real in-memory handshake, the server
/// side receives a stream of raw bytes and adversarial frames sealed with
/// the client's real sealer, and routes every opened frame as the runtime
/// does.
///
/// Input: `flags` (bit 0 profile), `slots`, four chunk-size bytes, then ops
/// (`op % 9`, with operands read after it):
/// 0 raw bytes (`n`, then `n` bytes); 1 a request with seq 0;
/// 2 a request with an odd seq (4 bytes); 3 a response to a pending server
/// request (`i`); 4 a response with an even seq (4 bytes), usually late or
/// unknown; 5 the server issues a request; 6 the server abandons a pending
/// request (`i`); 7 a maximum-size frame (`seq` byte), or one byte over
/// when bit 7 of the op is set; 8 a sealed frame with one bit flipped
/// (`i` as 2 bytes). Frames other than 7 carry a payload (`n`, `n` bytes).
pub fn connection_input(data: &[u8]) {
    let mut input = Input::new(data);
    let flags = input.byte();
    let profile = profile_from(flags);
    let slots = usize::from(input.byte() % 16) + 1;
    let mut chunks = Chunker::new(&mut input);

    let (mut client, server) = in_memory_handshake(profile);
    // Frames of several records for ops 1 and 2, and malformed ones for
    // op 8, where the handshake agreed on bundles.
    let bundle_ops = flags & 2 != 0 && client.sealer.bundles();
    // What a record adds to a frame of one message.
    let record_extra = if client.sealer.bundles() {
        RECORD_HEADER_LEN - 4
    } else {
        0
    };
    let mut side = ServerSide::new(server.opener, slots);
    // The server's requests in flight, as the test sees them.
    let mut pending: Vec<u32> = Vec::new();
    let mut expected: Vec<Expect> = Vec::new();
    // While true, the stream is all valid frames and everything is predicted.
    let mut clean = true;
    let mut wire: Vec<u8> = Vec::new();
    let mut big = Vec::new();
    let mut ops = 0;
    let mut answered = 0;

    while !input.is_empty() && side.error.is_none() && ops < 512 {
        ops += 1;
        wire.clear();
        let op = input.byte();
        let was_clean = clean;
        let mut want_too_large = false;
        let mut want_malformed = false;
        let mut seal = |seq: u32, payload: &[u8], wire: &mut Vec<u8>| {
            let n = client.sealer.seal_append(seq, payload, wire).expect("seal");
            assert_eq!(n, frame_len(payload.len()) + record_extra);
        };
        match op % 9 {
            1 | 2 if bundle_ops => {
                let records = usize::from(input.byte() % 4) + 1;
                let start = Sealer::start_bundle(&mut wire);
                for _ in 0..records {
                    let seq = if op % 9 == 1 { 0 } else { input.u32() | 1 };
                    let n = usize::from(input.byte());
                    append_record(&mut wire, seq, input.take(n));
                    expected.push(Expect::Request(seq));
                }
                client.sealer.seal_bundle(&mut wire, start).expect("seal");
            }
            8 if bundle_ops && op & 0x80 != 0 => {
                // A bundle whose records do not fill it: a length past its
                // end, or bytes after the last record too few for another.
                let n = usize::from(input.byte());
                let start = Sealer::start_bundle(&mut wire);
                append_record(&mut wire, 0, input.take(n));
                let junk = usize::from(input.byte() % 8);
                if junk == 0 {
                    let at = start + LENGTH_PREFIX_LEN + 4;
                    let claimed = (wire.len() - at - 4 + 1) as u32;
                    wire[at..at + 4].copy_from_slice(&claimed.to_be_bytes());
                } else {
                    wire.resize(wire.len() + junk, 0);
                }
                client.sealer.seal_bundle(&mut wire, start).expect("seal");
                want_malformed = was_clean;
                clean = false;
            }
            0 => {
                let n = usize::from(input.byte());
                wire.extend_from_slice(input.take(n));
                clean = false;
            }
            1 | 2 => {
                let seq = if op % 9 == 1 { 0 } else { input.u32() | 1 };
                let n = usize::from(input.byte());
                seal(seq, input.take(n), &mut wire);
                expected.push(Expect::Request(seq));
            }
            3 => {
                let i = usize::from(input.byte());
                let n = usize::from(input.byte());
                let payload = input.take(n);
                if !pending.is_empty() {
                    let seq = pending[i % pending.len()];
                    seal(seq, payload, &mut wire);
                    expected.push(Expect::Response(seq));
                }
            }
            4 => {
                let seq = input.u32() & !1;
                let n = usize::from(input.byte());
                seal(seq, input.take(n), &mut wire);
                if seq == 0 {
                    expected.push(Expect::Request(0));
                } else if pending.contains(&seq) {
                    expected.push(Expect::Response(seq));
                } else {
                    expected.push(Expect::Late(seq));
                }
            }
            5 => match side.requests.alloc() {
                Ok(seq) => {
                    assert!(side.requests.space().is_ours(seq) && seq % 2 == 0 && seq != 0);
                    assert!(!pending.contains(&seq), "a pending seq issued twice");
                    assert!(side.requests.is_pending(seq));
                    pending.push(seq);
                }
                Err(Error::SequenceExhausted) => {
                    assert_eq!(pending.len(), side.requests.space().slots());
                }
                Err(e) => panic!("alloc: {e:?}"),
            },
            6 => {
                let i = usize::from(input.byte());
                if !pending.is_empty() {
                    let seq = pending.swap_remove(i % pending.len());
                    assert!(side.requests.release(seq), "abandon");
                    assert!(!side.requests.release(seq), "released twice");
                }
            }
            7 => {
                let seq = u32::from(input.byte());
                let over = op & 0x80 != 0;
                big.clear();
                big.resize(MAX_PAYLOAD + usize::from(over), 0xa5);
                seal(seq, &big, &mut wire);
                if over {
                    clean = false;
                    want_too_large = was_clean;
                } else if side.requests.space().is_ours(seq) {
                    if pending.contains(&seq) {
                        expected.push(Expect::Response(seq));
                    } else {
                        expected.push(Expect::Late(seq));
                    }
                } else {
                    expected.push(Expect::Request(seq));
                }
            }
            _ => {
                let i = usize::from(input.u16());
                let n = usize::from(input.byte());
                seal(1, input.take(n), &mut wire);
                let bit = i % (wire.len() * 8);
                wire[bit / 8] ^= 1 << (bit % 8);
                clean = false;
            }
        }
        // Deliver this op's bytes in the chosen chunks.
        let mut at = 0;
        let mut reads = 0;
        while at < wire.len() && side.error.is_none() {
            let n = chunks.take_chunk(wire.len() - at);
            side.on_read(&wire[at..at + n]);
            at += n;
            reads += 1;
            assert!(reads <= 2 * wire.len() + 2, "no progress");
        }
        // Requests the server saw answered are no longer pending. (The
        // stream may be desynchronised by raw bytes, so only what the server
        // actually routed counts.)
        for &seq in &side.responses[answered..] {
            let at = pending.iter().position(|&p| p == seq);
            let at = at.unwrap_or_else(|| panic!("released {seq}, which was not pending"));
            pending.swap_remove(at);
        }
        answered = side.responses.len();
        if want_too_large {
            match side.error {
                Some(Error::FrameTooLarge { len, max, .. }) => {
                    assert_eq!(len, MAX_PAYLOAD + 1 + MIN_CIPHERTEXT_LEN + record_extra);
                    assert_eq!(max, MAX_PAYLOAD + MIN_CIPHERTEXT_LEN + record_extra);
                }
                ref other => panic!("oversized frame gave {other:?}"),
            }
        }
        if want_malformed {
            assert!(
                matches!(side.error, Some(Error::MalformedBundle { .. })),
                "a malformed bundle gave {:?}",
                side.error
            );
            // None of its records was delivered: it is checked whole first.
            let seen = side.requests_seen.len() + side.responses.len() + side.late.len();
            assert_eq!(seen, expected.len());
        }
        if clean {
            assert!(
                side.error.is_none(),
                "a valid stream failed: {:?}",
                side.error
            );
            let mut seen: Vec<Expect> = Vec::new();
            seen.extend(side.requests_seen.iter().map(|&s| Expect::Request(s)));
            seen.extend(side.responses.iter().map(|&s| Expect::Response(s)));
            seen.extend(side.late.iter().map(|&s| Expect::Late(s)));
            let mut want = expected.clone();
            seen.sort_by_key(|e| format!("{e:?}"));
            want.sort_by_key(|e| format!("{e:?}"));
            assert_eq!(seen, want, "routing differs from the prediction");
            // A whole frame is never left waiting in the buffer.
            assert_eq!(side.core.buffered(), 0);
        }
        for &seq in &pending {
            assert!(side.requests.is_pending(seq), "lost pending {seq}");
        }
        if side.error.is_none() {
            side.tick(u64::from(op / 9));
        }
    }

    if let Some(e) = side.error.take() {
        assert!(matches!(
            e,
            Error::Authentication
                | Error::FrameTooShort { .. }
                | Error::FrameTooLarge { .. }
                | Error::MalformedBundle { .. }
        ));
        // The error ended the stream, for good: whatever comes next, the
        // core opens no further frame (a failed opener stays failed, a bad
        // prefix stays at the front).
        let mut frame = Vec::new();
        client.sealer.seal_append(1, b"after", &mut frame).unwrap();
        let _ = side.core.fill(OneChunk(&frame), side.now, &Unpooled);
        assert!(
            side.core.open_next(side.now).is_err(),
            "opened a frame after {e:?}"
        );
    }
}

/// A fixed Ed25519 identity for the authenticated-handshake target.
fn fuzz_identity(seed: u8) -> std::sync::Arc<monte_rpc::protocol::Ed25519KeyPair> {
    let pair = monte_rpc::protocol::Ed25519KeyPair::from_seed_unchecked(&[seed; 32])
        .expect("32-byte seed");
    std::sync::Arc::new(pair)
}

/// Target `handshake_auth`: arbitrary peer bytes, in arbitrary chunks, into
/// the authenticated handshakes (`psk`, and `identity` server-only, mutual,
/// and pinned), either role.
///
/// Input: `flags` (bit 0 role: client/server; bits 1-2 mode: psk,
/// identity server-only, identity mutual, identity with a pin nobody
/// holds), four chunk-size bytes, then the peer's bytes.
/// Invariants: no panic; a handshake never consumes more than it is given;
/// every failure is a handshake rejection or a frame that does not
/// authenticate (or is malformed); at most one session comes out, and
/// nothing is accepted after the end. The fuzzer cannot know the keys of
/// the session, so it can never prove a PSK or an identity: only a server
/// that authenticates nobody (identity server-only) may yield a session;
/// a `psk` or mutual-`identity` server, and every client, never do.
pub fn handshake_auth(data: &[u8]) {
    use monte_rpc::protocol::{
        identity_public_key, IdentityConfig, IdentityHandshake, PskHandshake,
    };
    let mut input = Input::new(data);
    let flags = input.byte();
    let role = if flags & 1 == 0 {
        Role::Client
    } else {
        Role::Server
    };
    let mut chunks = Chunker::new(&mut input);
    let peer = input.rest();
    let server_id = fuzz_identity(1);
    let client_id = fuzz_identity(2);
    let server_key = identity_public_key(&server_id);
    let client_key = identity_public_key(&client_id);
    let mut hs: Box<dyn Handshake> = match ((flags >> 1) & 3, role) {
        (0, Role::Client) => Box::new(PskHandshake::client([9; 32]).expect("keygen")),
        (0, Role::Server) => Box::new(PskHandshake::server([9; 32]).expect("keygen")),
        (1, Role::Client) => {
            Box::new(IdentityHandshake::client(IdentityConfig::pinned(server_key)).expect("keygen"))
        }
        (1, Role::Server) => {
            Box::new(IdentityHandshake::server(IdentityConfig::server(server_id)).expect("keygen"))
        }
        (2, Role::Client) => Box::new(
            IdentityHandshake::client(IdentityConfig::pinned(server_key).with_identity(client_id))
                .expect("keygen"),
        ),
        (2, Role::Server) => Box::new(
            IdentityHandshake::server(
                IdentityConfig::server(server_id).allow_clients([client_key]),
            )
            .expect("keygen"),
        ),
        (_, Role::Client) => {
            Box::new(IdentityHandshake::client(IdentityConfig::pinned([7; 32])).expect("keygen"))
        }
        (_, Role::Server) => Box::new(
            IdentityHandshake::server(IdentityConfig::server(server_id).allow_clients([[7; 32]]))
                .expect("keygen"),
        ),
    };
    let mut out = Vec::new();
    let (mut received, mut consumed, mut reads) = (0usize, 0usize, 0usize);
    let mut sessions = 0;
    loop {
        hs.write_output(&mut out);
        if hs.take_session().is_some() {
            sessions += 1;
            break;
        }
        if received == peer.len() {
            break;
        }
        let n = chunks.take_chunk(peer.len() - received);
        received += n;
        reads += 1;
        assert!(reads <= 2 * peer.len() + 2, "no progress");
        let avail = &peer[consumed..received];
        match hs.read_input(avail) {
            Ok(used) => {
                assert!(used <= avail.len(), "consumed more than it was given");
                consumed += used;
            }
            Err(e) => {
                // A client reads an all-zero server key as the refusal
                // at the server's cap (PROTOCOL.md).
                let refusal = role == Role::Client
                    && matches!(e, Error::ConnectionLimit)
                    && peer[..KEY_LEN] == REFUSED_AT_CAP;
                assert!(
                    refusal
                        || matches!(
                            e,
                            Error::Handshake(_)
                                | Error::Authentication
                                | Error::FrameTooShort { .. }
                                | Error::FrameTooLarge { .. }
                        ),
                    "undocumented handshake error: {e:?}"
                );
                break;
            }
        }
    }
    assert!(sessions <= 1);
    if sessions == 1 {
        assert!(
            role == Role::Server && (flags >> 1) & 3 == 1,
            "a session without proof (mode {}, {role:?})",
            (flags >> 1) & 3
        );
    }
    assert!(hs.take_session().is_none(), "a second session");
    if sessions == 1 {
        assert!(
            matches!(
                hs.read_input(&[0u8; 8]),
                Err(Error::Handshake(HandshakeError::AlreadyFinished)) | Ok(0)
            ),
            "input accepted after the end"
        );
    }
}
