//! The connection core alone: bytes from memory, time as plain numbers,
//! and in-memory pairs of a handshake and a core.

use super::*;
use crate::protocol::{Profile, Sealer, ServerHandshake};

const MS: u64 = 1_000_000;
const KEY: [u8; 32] = [7; 32];

/// A byte source that hands out at most `chunk` bytes a read, then
/// would block.
struct Chunks<'a> {
    data: &'a [u8],
    chunk: usize,
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.data.is_empty() {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        let n = self.chunk.min(buf.len()).min(self.data.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

fn deadlines() -> Deadlines {
    Deadlines {
        handshake: Some(Duration::from_millis(50)),
        read: Some(Duration::from_millis(1000)),
        frame: Some(Duration::from_millis(100)),
    }
}

fn limits(buffer_size: usize, max_message_size: usize, deadlines: Deadlines) -> Limits {
    Limits {
        buffer_size,
        max_message_size,
        deadlines,
    }
}

/// An open core at the server's side: even sequence numbers are the
/// responses to its requests.
fn open_core(max_message: usize, buffer: usize) -> ConnCore {
    let phase = ReadPhase::Open {
        opener: Opener::new(KEY, Profile::Secure),
    };
    ConnCore::new(
        phase,
        Role::Server,
        limits(buffer, max_message, deadlines()),
        &[],
        0,
    )
}

fn sealed(frames: &[(u32, &[u8])]) -> Vec<u8> {
    let mut sealer = Sealer::new(KEY, Profile::Secure);
    let mut wire = Vec::new();
    for (seq, body) in frames {
        sealer.seal_append(*seq, body, &mut wire).unwrap();
    }
    wire
}

/// Feeds `wire` in reads of at most `chunk` bytes at time `now`, and
/// returns every frame opened, in order.
fn drain(core: &mut ConnCore, wire: &[u8], chunk: usize, now: u64) -> Vec<(u32, Vec<u8>)> {
    let mut source = Chunks { data: wire, chunk };
    let mut out = Vec::new();
    loop {
        while let Some((seq, len)) = core.open_next(now).unwrap() {
            out.push((seq, core.payload(len).to_vec()));
            core.consume(len);
        }
        match core.fill(&mut source, now, &Unpooled).unwrap() {
            Filled::Bytes { .. } => {}
            Filled::WouldBlock | Filled::Eof => return out,
        }
    }
}

#[test]
fn every_split_of_the_input_opens_the_same_frames() {
    let big = vec![0xab; 300];
    let frames: [(u32, &[u8]); 4] = [(1, b"one"), (0, b""), (3, &big), (5, b"last")];
    let wire = sealed(&frames);
    let expected: Vec<(u32, Vec<u8>)> = frames.iter().map(|(s, b)| (*s, b.to_vec())).collect();
    for chunk in 1..=wire.len() {
        // A buffer smaller than the largest frame: it must grow for it.
        let mut core = open_core(1024, 64);
        assert_eq!(
            drain(&mut core, &wire, chunk, 0),
            expected,
            "reads of {chunk}"
        );
        assert!(core.expired(0, false).is_none());
    }
}

#[test]
fn a_frame_over_the_limit_is_refused_from_its_prefix() {
    let mut core = open_core(1024, 64);
    let claimed = (1024 + crate::protocol::MIN_CIPHERTEXT_LEN + 1) as u32;
    let mut source = Chunks {
        data: &claimed.to_be_bytes(),
        chunk: 4,
    };
    core.fill(&mut source, 0, &Unpooled).unwrap();
    assert!(matches!(
        core.open_next(0),
        Err(Error::FrameTooLarge { .. })
    ));
}

#[test]
fn a_claimed_length_never_grows_the_buffer() {
    let mut core = open_core(1 << 20, 64);
    let claimed = (1 << 20) as u32;
    let mut partial = claimed.to_be_bytes().to_vec();
    partial.extend_from_slice(&[0; 196]);
    let got = drain(&mut core, &partial, 4096, 0);
    assert!(got.is_empty());
    // Grown as the 200 bytes came (doubling from 64), not to 1 MiB.
    let len = core.rbuf.buf.len();
    assert!((200..=400).contains(&len), "buffer of {len} bytes");
}

#[test]
fn a_trickled_frame_expires_at_the_frame_deadline() {
    let mut core = open_core(1 << 20, 64);
    let wire = sealed(&[(1, &[0x55; 200])]);
    // The prefix at 0 ms, then a byte every 10 ms: each read is far
    // inside the read deadline, so only the frame deadline can end it.
    drain(&mut core, &wire[..4], 4, 0);
    let mut t = 0;
    for (i, byte) in wire[4..40].iter().enumerate() {
        t = (i as u64 + 1) * 10 * MS;
        assert!(drain(&mut core, std::slice::from_ref(byte), 1, t).is_empty());
        let want = (t >= 100 * MS).then_some(TimeoutKind::Frame);
        assert_eq!(core.expired(t, false), want, "at {} ms", t / MS);
    }
    assert_eq!(core.next_deadline(), Some(100 * MS));
    // Completing the frame ends its deadline.
    let rest = drain(&mut core, &wire[40..], 4096, t);
    assert_eq!(rest.len(), 1);
    assert_eq!(core.expired(t, false), None);
}

#[test]
fn silence_expires_at_the_read_deadline() {
    let mut core = open_core(1024, 64);
    drain(&mut core, &sealed(&[(1, b"hi")]), 4096, 300 * MS);
    assert_eq!(core.expired(1299 * MS, false), None);
    assert_eq!(core.expired(1300 * MS, false), Some(TimeoutKind::Read));
    assert_eq!(core.next_deadline(), Some(1300 * MS));
}

#[test]
fn paused_reading_restarts_the_peer_deadlines() {
    let mut core = open_core(1024, 64);
    let wire = sealed(&[(1, b"hello")]);
    drain(&mut core, &wire[..6], 6, 0);
    // Paused (this side is not reading): nothing is the peer's fault.
    assert_eq!(core.expired(5000 * MS, true), None);
    core.resume(5000 * MS);
    assert_eq!(core.expired(5099 * MS, false), None);
    assert_eq!(core.expired(5100 * MS, false), Some(TimeoutKind::Frame));
}

#[test]
fn the_handshake_deadline_counts_from_creation() {
    let handshake = Box::new(ServerHandshake::new(Profile::Secure).unwrap());
    let phase = ReadPhase::Handshaking { handshake };
    let core = ConnCore::new(
        phase,
        Role::Server,
        limits(64, 1024, deadlines()),
        &[],
        10 * MS,
    );
    assert_eq!(core.expired(59 * MS, false), None);
    assert_eq!(core.expired(60 * MS, false), Some(TimeoutKind::Handshake));
    // Paused reading does not stop a handshake's clock.
    assert_eq!(core.expired(60 * MS, true), Some(TimeoutKind::Handshake));
    assert_eq!(core.next_deadline(), Some(60 * MS));
}

/// A pool that records what it lends and gets back.
#[derive(Default)]
struct Pool {
    free: std::cell::RefCell<Vec<Vec<u8>>>,
    given: std::cell::Cell<usize>,
}

impl Buffers for Pool {
    fn take(&self) -> Option<Vec<u8>> {
        self.free.borrow_mut().pop()
    }
    fn give(&self, buf: Vec<u8>) {
        self.given.set(self.given.get() + 1);
        self.free.borrow_mut().push(buf);
    }
}

#[test]
fn the_buffer_is_held_only_while_bytes_are_unread() {
    let pool = Pool::default();
    pool.free.borrow_mut().push(vec![0xee; 64]);
    let mut core = open_core(1024, 64);
    let all = sealed(&[(1, b"one"), (3, b"two"), (5, &[1; 500])]);
    let two_frames = crate::protocol::frame_len(3) * 2;
    let (wire, big) = all.split_at(two_frames);
    let cut = wire.len() - 5;
    // A read that ends inside a frame: the buffer must stay.
    let mut source = Chunks {
        data: &wire[..cut],
        chunk: 4096,
    };
    core.fill(&mut source, 0, &pool).unwrap();
    assert_eq!(core.buffer_len(), 64, "the pool's buffer, not a new one");
    while let Some((_, len)) = core.open_next(0).unwrap() {
        core.consume(len);
    }
    core.lend_back(&pool);
    assert_eq!(
        pool.given.get(),
        0,
        "gave back a buffer holding a partial frame"
    );
    // The rest arrives; once everything is read, the buffer goes back.
    let mut source = Chunks {
        data: &wire[cut..],
        chunk: 4096,
    };
    core.fill(&mut source, 0, &pool).unwrap();
    let (seq, len) = core.open_next(0).unwrap().unwrap();
    assert_eq!((seq, core.payload(len)), (3, &b"two"[..]));
    core.consume(len);
    core.lend_back(&pool);
    assert_eq!(pool.given.get(), 1);
    assert_eq!(core.buffer_len(), 0, "an idle core holds no buffer");
    // A buffer grown for a large frame stays with the connection.
    drain(&mut core, big, 4096, 0);
    assert!(core.buffer_len() > 64);
    core.lend_back(&pool);
    assert_eq!(pool.given.get(), 1);
    core.release_buffer_if_empty();
    assert_eq!(core.buffer_len(), 0);
}

#[test]
fn a_caller_takes_responses_only_and_leaves_the_rest_to_the_reactor() {
    let mut core = open_core(1024, 4096);
    // Even sequence numbers answer this side's requests here.
    let wire = sealed(&[(2, b"r1"), (4, b"r2"), (7, b"request"), (6, b"r3")]);
    let mut source = Chunks {
        data: &wire,
        chunk: 4096,
    };
    core.fill(&mut source, 0, &Unpooled).unwrap();
    let caller = Taker::Caller;
    let mut taken = Vec::new();
    loop {
        match core.next_frame(0, caller).unwrap() {
            Next::Response { seq, len } => {
                taken.push(seq);
                core.consume(len);
            }
            other => {
                assert_eq!(other, Next::ReactorsTurn);
                break;
            }
        }
    }
    assert_eq!(taken, [2, 4]);
    // The caller stays out until the reactor took the held request.
    assert_eq!(core.next_frame(0, caller).unwrap(), Next::ReactorsTurn);
    let Next::Message { seq, len } = core.next_frame(0, Taker::Reactor).unwrap() else {
        panic!("the reactor did not get the held message first");
    };
    assert_eq!((seq, core.payload(len)), (7, &b"request"[..]));
    core.consume(len);
    let Next::Response { seq, len } = core.next_frame(0, caller).unwrap() else {
        panic!("the caller was not let back in");
    };
    assert_eq!(seq, 6);
    core.consume(len);
    assert_eq!(core.next_frame(0, caller).unwrap(), Next::NeedBytes);
    // Each frame counted once, by whoever opened it.
    assert_eq!(core.take_counts().0, 4);
    assert_eq!(core.take_counts(), (0, 0));
}

#[test]
fn messages_set_aside_by_a_caller_come_out_in_order_within_the_limit() {
    // The limit: one message of the larger of the frame limit (256) and
    // the buffer (32), each message counted at its wire length (24 + its
    // payload) plus its queue entry.
    let mut core = open_core(256, 32);
    let big = [0x5a; 200];
    let wire = sealed(&[
        (1, b"one"),
        (3, b"two"),
        (2, b"r1"),
        (5, &big),
        (4, b"r2"),
        (7, b"three"),
    ]);
    let mut source = Chunks {
        data: &wire,
        chunk: 4096,
    };
    // What a caller meets next, reading more while it needs bytes.
    let mut caller_next = |core: &mut ConnCore| loop {
        match core.next_frame(0, Taker::Caller).unwrap() {
            Next::NeedBytes => match core.fill(&mut source, 0, &Unpooled).unwrap() {
                Filled::Bytes { .. } => {}
                _ => return Next::NeedBytes,
            },
            next => return next,
        }
    };
    let mut responses = Vec::new();
    loop {
        match caller_next(&mut core) {
            Next::Response { seq, len } => {
                responses.push(seq);
                core.consume(len);
            }
            Next::ReactorsTurn if core.set_aside_held() => {}
            Next::ReactorsTurn => break,
            other => panic!("a caller met {other:?}"),
        }
    }
    // The third message would pass the limit (3 + 3 + 200 bytes of
    // payload and 3 frames' overhead, over 256 and one frame's): it stays
    // held, and the response behind it is not read.
    assert_eq!(responses, [2]);
    assert!(!core.set_aside_held());
    assert!(core.has_set_aside());
    // The reactor dispatches what was set aside first, then the held one.
    assert_eq!(core.take_set_aside(), Some((1, b"one".to_vec())));
    assert_eq!(core.take_set_aside(), Some((3, b"two".to_vec())));
    assert_eq!(core.take_set_aside(), None);
    let Next::Message { seq, len } = core.next_frame(0, Taker::Reactor).unwrap() else {
        panic!("the held message did not follow");
    };
    assert_eq!((seq, core.payload(len)), (5, &big[..]));
    core.consume(len);
    // The caller is let back in; with room again, the next message is set
    // aside, and a close drops it.
    let Next::Response { seq: 4, len } = caller_next(&mut core) else {
        panic!("the response behind the held message was not the caller's");
    };
    core.consume(len);
    assert_eq!(caller_next(&mut core), Next::ReactorsTurn);
    assert!(core.set_aside_held());
    assert!(core.has_set_aside());
    core.discard_input();
    assert!(!core.has_set_aside());
    assert_eq!(core.take_set_aside(), None);
}

#[test]
fn empty_messages_set_aside_count_against_the_limit_too() {
    // A limit of one 64-byte message and its overhead: two empty messages
    // (their overhead each) fit, a third does not.
    let mut core = open_core(64, 32);
    let wire = sealed(&[(1, b""), (3, b""), (5, b""), (2, b"r1")]);
    let mut source = Chunks {
        data: &wire,
        chunk: 4096,
    };
    let mut caller_next = |core: &mut ConnCore| loop {
        match core.next_frame(0, Taker::Caller).unwrap() {
            Next::NeedBytes => {
                core.fill(&mut source, 0, &Unpooled).unwrap();
            }
            next => return next,
        }
    };
    for _ in 0..2 {
        assert_eq!(caller_next(&mut core), Next::ReactorsTurn);
        assert!(core.set_aside_held());
    }
    assert_eq!(caller_next(&mut core), Next::ReactorsTurn);
    assert!(
        !core.set_aside_held(),
        "a third empty message passed the limit"
    );
    assert_eq!(core.take_set_aside(), Some((1, Vec::new())));
    // Taken: its room is back.
    assert!(core.set_aside_held());
}

#[test]
fn a_callers_error_is_the_reactors_to_report() {
    let mut core = open_core(1024, 64);
    let mut wire = sealed(&[(2, b"ok")]);
    let last = wire.len() - 1;
    wire[last] ^= 1;
    let mut source = Chunks {
        data: &wire,
        chunk: 4096,
    };
    core.fill(&mut source, 0, &Unpooled).unwrap();
    assert_eq!(
        core.next_frame(0, Taker::Caller).unwrap(),
        Next::ReactorsTurn
    );
    assert!(matches!(
        core.next_frame(0, Taker::Reactor),
        Err(Error::Authentication)
    ));
}

/// Runs `client` against a server core in memory, each side's output
/// fed to the other in reads of at most `chunk` bytes, until the core
/// opens or 64 rounds pass. Returns the client's session if it got one
/// and what the core's handshake gave, if it completed.
fn handshake_pair(
    client: &mut dyn Handshake,
    server: &mut ConnCore,
    chunk: usize,
) -> (Option<crate::protocol::Session>, Option<Handshaken>) {
    let (mut session, mut done, mut to_client) = (None, None, Vec::new());
    for _ in 0..64 {
        let mut out = Vec::new();
        client.write_output(&mut out);
        if session.is_none() {
            session = client.take_session();
        }
        let mut source = Chunks { data: &out, chunk };
        while let Filled::Bytes { .. } = server.fill(&mut source, 0, &Unpooled).unwrap() {}
        let (reply, finished) = server.step_handshake().unwrap();
        to_client.extend_from_slice(reply);
        if let Some(finished) = finished {
            done = Some(finished);
        }
        if session.is_none() && !to_client.is_empty() {
            let used = client.read_input(&to_client).unwrap();
            to_client.drain(..used);
        }
        if done.is_some() && session.is_some() {
            break;
        }
    }
    (session, done)
}

fn server_core(handshake: Box<dyn Handshake>) -> ConnCore {
    ConnCore::new(
        ReadPhase::Handshaking { handshake },
        Role::Server,
        limits(64, 1024, deadlines()),
        &[],
        0,
    )
}

#[test]
fn a_pair_in_memory_handshakes_and_exchanges_frames() {
    for chunk in [1, 7, 4096] {
        let mut client = crate::protocol::ClientHandshake::new(Profile::Secure).unwrap();
        let mut server = server_core(Box::new(ServerHandshake::new(Profile::Secure).unwrap()));
        let (session, done) = handshake_pair(&mut client, &mut server, chunk);
        let mut session = session.expect("the client finished");
        let mut done = done.expect("the server core opened");
        assert!(server.is_open());
        assert_eq!(done.peer_identity, None);
        // Client to server, through the core.
        let mut wire = Vec::new();
        session.sealer.seal_append(1, b"ping", &mut wire).unwrap();
        session.sealer.seal_append(0, b"note", &mut wire).unwrap();
        let got = drain(&mut server, &wire, chunk, 0);
        assert_eq!(got, [(1, b"ping".to_vec()), (0, b"note".to_vec())]);
        // Server to client, with the sealer the core handed over.
        let mut back = Vec::new();
        done.sealer.seal_append(1, b"pong", &mut back).unwrap();
        let (seq, body) = session.opener.open_in_place(&mut back).unwrap();
        assert_eq!((seq, &body[..]), (1, &b"pong"[..]));
    }
}

#[test]
fn a_psk_core_opens_only_for_a_peer_that_proved_the_key() {
    let psk = [9; 32];
    // A real client: the core opens once its confirmation arrived.
    let mut client = crate::protocol::PskHandshake::client(psk).unwrap();
    let mut server = server_core(Box::new(
        crate::protocol::PskHandshake::server(psk).unwrap(),
    ));
    let (session, done) = handshake_pair(&mut client, &mut server, 5);
    assert!(session.is_some() && done.is_some() && server.is_open());
    // A peer without the key sends a client key and nothing else: the
    // core answers, never opens, and its handshake deadline ends it.
    let mut server = server_core(Box::new(
        crate::protocol::PskHandshake::server(psk).unwrap(),
    ));
    let mut source = Chunks {
        data: &[0x42; 32],
        chunk: 32,
    };
    server.fill(&mut source, 0, &Unpooled).unwrap();
    let (reply, done) = server.step_handshake().unwrap();
    assert!(
        !reply.is_empty(),
        "the server owes its key and confirmation"
    );
    assert!(done.is_none());
    assert!(!server.is_open());
    assert_eq!(server.expired(49 * MS, false), None);
    assert_eq!(server.expired(50 * MS, false), Some(TimeoutKind::Handshake));
}

#[test]
fn disabled_deadlines_never_expire() {
    let phase = ReadPhase::Open {
        opener: Opener::new(KEY, Profile::Secure),
    };
    let limits = limits(64, 1024, Deadlines::default());
    let mut core = ConnCore::new(phase, Role::Server, limits, &[], 0);
    drain(&mut core, &sealed(&[(1, b"x")])[..3], 3, 0);
    assert_eq!(core.expired(u64::MAX, false), None);
    assert_eq!(core.next_deadline(), None);
}

/// Deadlines too long for nanoseconds in a u64 (2^55 s is 2^64 ns times
/// 1,953,125) last forever, not wrap to zero and expire at once.
#[test]
fn deadlines_past_u64_nanoseconds_never_expire() {
    let huge = Some(Duration::from_secs(1 << 55));
    let deadlines = Deadlines {
        handshake: huge,
        read: huge,
        frame: huge,
    };
    let handshaking = ConnCore::new(
        ReadPhase::Handshaking {
            handshake: Box::new(ServerHandshake::new(Profile::Secure).unwrap()),
        },
        Role::Server,
        limits(64, 1024, deadlines),
        &[],
        0,
    );
    assert_eq!(handshaking.expired(1000 * MS, false), None);
    assert_eq!(handshaking.next_deadline(), Some(u64::MAX));
    let phase = ReadPhase::Open {
        opener: Opener::new(KEY, Profile::Secure),
    };
    let mut core = ConnCore::new(phase, Role::Server, limits(64, 1024, deadlines), &[], 0);
    drain(&mut core, &sealed(&[(1, b"x")])[..3], 3, 0);
    assert_eq!(core.expired(1000 * MS, false), None);
    assert_eq!(core.next_deadline(), Some(u64::MAX));
}

/// A custom handshake that consumes nothing and never finishes: it waits
/// for a message larger than any frame.
struct Hoards;

impl Handshake for Hoards {
    fn write_output(&mut self, _out: &mut Vec<u8>) {}
    fn read_input(&mut self, _input: &[u8]) -> crate::Result<usize> {
        Ok(0)
    }
    fn take_session(&mut self) -> Option<crate::protocol::Session> {
        None
    }
}

/// The bytes a handshake leaves unconsumed fill the buffer up to the
/// largest frame, and no further: the handshake then fails. The buffer
/// grew by a byte a read past it, for as long as the peer sent and the
/// handshake deadline allowed.
#[test]
fn a_handshake_that_consumes_nothing_holds_no_more_than_the_largest_frame() {
    let mut core = server_core(Box::new(Hoards));
    let max_frame_len = core.decoder.max_frame_len();
    let wire = vec![0x55; 4 * max_frame_len];
    let mut source = Chunks {
        data: &wire,
        chunk: 1,
    };
    let failed = loop {
        match core.fill(&mut source, 0, &Unpooled) {
            Ok(Filled::Bytes { .. }) => {
                if let Err(e) = core.step_handshake() {
                    break e;
                }
            }
            Ok(_) => panic!("the peer's bytes ran out first"),
            Err(e) => panic!("the read failed first: {e}"),
        }
        assert!(
            core.rbuf.buf.len() <= max_frame_len,
            "{} bytes held",
            core.rbuf.buf.len()
        );
    };
    assert!(
        matches!(
            failed,
            Error::Handshake(HandshakeError::LeftUnconsumed { held }) if held == max_frame_len
        ),
        "{failed:?}"
    );
}

/// An open core at the server's side whose direction is bundled.
fn open_bundled_core(max_message: usize, buffer: usize) -> ConnCore {
    let phase = ReadPhase::Open {
        opener: Opener::new(KEY, Profile::Secure).with_bundles(),
    };
    ConnCore::new(
        phase,
        Role::Server,
        limits(buffer, max_message, deadlines()),
        &[],
        0,
    )
}

/// Bundled frames, each of the given messages.
fn bundled(frames: &[&[(u32, &[u8])]]) -> Vec<u8> {
    let mut sealer = Sealer::new(KEY, Profile::Secure).with_bundles();
    let mut wire = Vec::new();
    for records in frames {
        let start = Sealer::start_bundle(&mut wire);
        for (seq, body) in records.iter() {
            crate::protocol::wire::append_record(&mut wire, *seq, body);
        }
        sealer.seal_bundle(&mut wire, start).unwrap();
    }
    wire
}

#[test]
fn bundled_frames_give_their_messages_in_order_under_every_chunking() {
    let big = [0x33u8; 300];
    let wire = bundled(&[
        &[(0, b"a"), (3, b"bb"), (0, b"")],
        &[(5, &big)],
        &[(7, b"x"), (2, b"response")],
    ]);
    let want: Vec<(u32, Vec<u8>)> = [
        (0, &b"a"[..]),
        (3, b"bb"),
        (0, b""),
        (5, &big),
        (7, b"x"),
        (2, b"response"),
    ]
    .iter()
    .map(|(s, b)| (*s, b.to_vec()))
    .collect();
    for chunk in 1..=wire.len() {
        // A buffer smaller than the frames: they are read in pieces, the
        // buffer compacted and grown between them.
        let mut core = open_bundled_core(1024, 64);
        assert_eq!(drain(&mut core, &wire, chunk, 0), want, "chunk {chunk}");
        assert_eq!(core.buffered(), 0);
    }
}

#[test]
fn a_caller_takes_the_responses_of_a_bundle_and_leaves_its_messages() {
    let wire = bundled(&[&[(2, b"r1"), (7, b"request"), (4, b"r2")], &[(6, b"r3")]]);
    let mut core = bundled_core_holding(1024, &wire);
    let caller = Taker::Caller;
    let Next::Response { seq: 2, len } = core.next_frame(0, caller).unwrap() else {
        panic!("the first response");
    };
    assert_eq!(core.payload(len), b"r1");
    core.consume(len);
    assert_eq!(core.next_frame(0, caller).unwrap(), Next::ReactorsTurn);
    let Next::Message { seq: 7, len } = core.next_frame(0, Taker::Reactor).unwrap() else {
        panic!("the reactor did not get the held message");
    };
    assert_eq!(core.payload(len), b"request");
    core.consume(len);
    for (want, body) in [(4, &b"r2"[..]), (6, b"r3")] {
        let Next::Response { seq, len } = core.next_frame(0, caller).unwrap() else {
            panic!("response {want}");
        };
        assert_eq!((seq, core.consume_payload(len)), (want, body));
    }
    assert_eq!(core.next_frame(0, caller).unwrap(), Next::NeedBytes);
    assert_eq!(core.buffered(), 0);
    // Counted a message at a time, and every wire byte once.
    assert_eq!(core.take_counts(), (4, wire.len() as u64));
}

#[test]
fn messages_of_a_bundle_set_aside_are_charged_and_given_back_whole() {
    let wire = bundled(&[&[(1, b"hello"), (3, b"there"), (2, b"answer")]]);
    let mut core = bundled_core_holding(1024, &wire);
    for _ in 0..2 {
        assert_eq!(
            core.next_frame(0, Taker::Caller).unwrap(),
            Next::ReactorsTurn
        );
        assert!(core.set_aside_held());
    }
    let Next::Response { seq: 2, len } = core.next_frame(0, Taker::Caller).unwrap() else {
        panic!("the response behind the messages set aside");
    };
    assert_eq!(core.consume_payload(len), b"answer");
    assert_eq!(core.take_set_aside(), Some((1, b"hello".to_vec())));
    assert_eq!(core.take_set_aside(), Some((3, b"there".to_vec())));
    assert_eq!(core.set_aside_bytes, 0, "every charge taken back");
    assert_eq!(core.buffered(), 0);
}

/// A bundled core whose buffer holds `wire`, read in one go.
fn bundled_core_holding(max_message: usize, wire: &[u8]) -> ConnCore {
    let mut core = open_bundled_core(max_message, 4096);
    let mut source = Chunks {
        data: wire,
        chunk: 4096,
    };
    core.fill(&mut source, 0, &Unpooled).unwrap();
    core
}

#[test]
fn a_bundle_is_refused_whole_when_a_record_is_over_the_message_limit_or_malformed() {
    // The record over the limit is the second: the first is not delivered.
    let over = [0u8; 65];
    let wire = bundled(&[&[(0, b"first"), (0, &over)]]);
    let mut core = bundled_core_holding(64, &wire);
    match core.open_next(0) {
        Err(Error::FrameTooLarge {
            len,
            max,
            max_message,
        }) => assert_eq!((len, max, max_message), (65 + 20, 64 + 20, 64)),
        other => panic!("{other:?}"),
    }

    // A record whose length runs past the frame's end.
    let mut sealer = Sealer::new(KEY, Profile::Secure).with_bundles();
    let mut wire = Vec::new();
    let start = Sealer::start_bundle(&mut wire);
    crate::protocol::wire::append_record(&mut wire, 0, b"first");
    wire.extend_from_slice(&9u32.to_be_bytes());
    wire.extend_from_slice(&100u32.to_be_bytes());
    wire.extend_from_slice(b"short");
    sealer.seal_bundle(&mut wire, start).unwrap();
    let mut core = bundled_core_holding(1024, &wire);
    match core.open_next(0) {
        Err(Error::MalformedBundle { claimed, left }) => assert_eq!((claimed, left), (100, 5)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn a_frame_of_tiny_records_over_the_bundle_limit_is_refused_whole() {
    use crate::protocol::wire::{append_record, BUNDLE_LIMIT, RECORD_HEADER_LEN};
    // Empty records and one of a few bytes, filling the limit exactly
    // (accepted, a message each) or one byte past it.
    let empties = BUNDLE_LIMIT / RECORD_HEADER_LEN - 1;
    let last = BUNDLE_LIMIT - (empties + 1) * RECORD_HEADER_LEN;
    for (extra, refused) in [(0, false), (1, true)] {
        let mut sealer = Sealer::new(KEY, Profile::Secure).with_bundles();
        let mut wire = Vec::new();
        let start = Sealer::start_bundle(&mut wire);
        for _ in 0..empties {
            append_record(&mut wire, 0, b"");
        }
        append_record(&mut wire, 0, &vec![1; last + extra]);
        let records = empties + 1;
        sealer.seal_bundle(&mut wire, start).unwrap();
        assert_eq!(
            wire.len() <= 16 << 10,
            !refused,
            "a full bundle fits 16 KiB"
        );
        // A message limit of 1 MiB: the frame itself is within the limit.
        let mut core = open_bundled_core(1 << 20, 16 << 10);
        let mut source = Chunks {
            data: &wire,
            chunk: wire.len(),
        };
        while !matches!(
            core.fill(&mut source, 0, &Unpooled).unwrap(),
            Filled::WouldBlock
        ) {}
        if refused {
            match core.open_next(0) {
                Err(Error::MalformedBundle { claimed, left }) => {
                    assert_eq!((claimed, left), (BUNDLE_LIMIT + 1, BUNDLE_LIMIT));
                }
                other => panic!("{other:?}"),
            }
        } else {
            let mut n = 0;
            while let Some((_, len)) = core.open_next(0).unwrap() {
                core.consume(len);
                n += 1;
            }
            assert_eq!(n, records);
        }
    }
}
