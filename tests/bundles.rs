//! Bundled frames end to end (PROTOCOL.md, "Bundled frames"): messages
//! queued behind a write share sealed frames and arrive in order, replies
//! too; and a server that does not know bundles (an older one, another
//! implementation of the base specification) is sent a frame per message
//! and answered as before.

mod common;

use std::io::{Read, Write};
use std::sync::mpsc;

use common::within;
use monte_rpc::protocol::wire::{Decoded, FrameDecoder};
use monte_rpc::protocol::{derive_keys, Profile, Role, Session, KEY_LEN};
use monte_rpc::{Client, Config, Server};

const MESSAGES: u32 = 2000;

/// Message `i` of a stream: its number, then filler.
fn body(i: u32) -> Vec<u8> {
    let mut body = i.to_be_bytes().to_vec();
    body.resize(100, 0x5a);
    body
}

/// Reads whole frames from `stream` until `last` is among the messages;
/// returns the messages in order and how many frames carried them.
fn read_until(
    stream: &mut std::net::TcpStream,
    session: &mut Session,
    last: &[u8],
) -> (Vec<(u32, Vec<u8>)>, usize) {
    let (mut input, mut chunk) = (Vec::new(), vec![0u8; 64 << 10]);
    let (mut messages, mut frames) = (Vec::<(u32, Vec<u8>)>::new(), 0);
    let decoder = FrameDecoder::for_direction(1 << 20, session.opener.bundles());
    while !messages.iter().any(|(_, m)| m == last) {
        let n = stream.read(&mut chunk).expect("the client's frames");
        assert!(n > 0, "the client closed after {} messages", messages.len());
        input.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        while let Ok(Decoded::Frame(len)) = decoder.decode(&input[at..]) {
            frames += 1;
            at += len;
        }
        let (opened, used) = common::open_messages(&mut session.opener, &mut input, 1 << 20);
        assert_eq!(used, at);
        input.drain(..used);
        messages.extend(opened);
    }
    (messages, frames)
}

// A burst of queued messages goes out in bundles: far fewer frames (each a
// seal and an open) than messages, every message once and in order.
#[test]
fn queued_messages_share_frames_and_keep_their_order() {
    within(30, || {
        let (tx, rx) = mpsc::channel();
        let (addr, server) = common::raw_server_with_session(move |mut stream, mut session| {
            assert!(session.opener.bundles(), "the client asked for bundles");
            tx.send(read_until(&mut stream, &mut session, b"end"))
                .unwrap();
        });
        let client = Client::new(addr, Config::default().workers(1)).unwrap();
        for i in 0..MESSAGES {
            client.send_no_wait(&body(i)).unwrap();
        }
        client.send(b"end").unwrap();
        let (messages, frames) = rx.recv().unwrap();
        server.join().unwrap();
        let want: Vec<(u32, Vec<u8>)> = (0..MESSAGES)
            .map(|i| (0, body(i)))
            .chain([(0, b"end".to_vec())])
            .collect();
        assert!(messages == want, "the messages, once each and in order");
        assert!(
            frames <= messages.len() / 2,
            "{frames} frames for {} messages",
            messages.len()
        );
    });
}

// Replies a server's reactor queues while it reads a burst of pipelined
// requests share frames too, and each finds its request.
#[test]
fn replies_to_pipelined_requests_share_frames() {
    within(30, || {
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            |ctx: &mut monte_rpc::Context<'_>| {
                let mut reply = ctx.body().to_vec();
                reply.reverse();
                let _ = ctx.reply(&reply);
            },
        )
        .unwrap();
        let (mut stream, mut session) = common::raw_client(server.local_addr());
        let mut wire = Vec::new();
        for i in 0..MESSAGES {
            session
                .sealer
                .seal_append(2 * i + 1, &body(i), &mut wire)
                .unwrap();
        }
        session.sealer.seal_append(0, b"end", &mut wire).unwrap();
        stream.write_all(&wire).unwrap();
        let last = {
            let mut last = body(MESSAGES - 1);
            last.reverse();
            last
        };
        let (replies, frames) = read_until(&mut stream, &mut session, &last);
        let want: Vec<(u32, Vec<u8>)> = (0..MESSAGES)
            .map(|i| {
                let mut reply = body(i);
                reply.reverse();
                (2 * i + 1, reply)
            })
            .collect();
        assert!(replies == want, "the replies, once each and in order");
        assert!(
            frames <= replies.len() / 2,
            "{frames} frames for {} replies",
            replies.len()
        );
        drop(stream);
        server.shutdown();
    });
}

/// The server side of the base specification's handshake, as a peer that
/// does not know bundled frames runs it: a canonical key (bit 255 clear),
/// and the client's key taken as it came.
fn old_server_handshake(stream: &mut std::net::TcpStream) -> Session {
    use ring::agreement::{agree_ephemeral, EphemeralPrivateKey, UnparsedPublicKey, X25519};
    let mut client_key = [0u8; KEY_LEN];
    stream.read_exact(&mut client_key).unwrap();
    assert!(client_key[KEY_LEN - 1] & 0x80 != 0, "the client asks");
    let private = EphemeralPrivateKey::generate(&X25519, &ring::rand::SystemRandom::new()).unwrap();
    let public: [u8; KEY_LEN] = private
        .compute_public_key()
        .unwrap()
        .as_ref()
        .try_into()
        .unwrap();
    let dh: [u8; KEY_LEN] = agree_ephemeral(
        private,
        &UnparsedPublicKey::new(&X25519, &client_key),
        |dh| dh.try_into().unwrap(),
    )
    .unwrap();
    stream.write_all(&public).unwrap();
    let keys = derive_keys(Profile::Secure, &dh, &client_key, &public);
    Session::from_keys(Profile::Secure, Role::Server, &keys)
}

// A client against a server that does not know bundles: the client's
// queued messages go out a frame each (the old format, which the server's
// opener reads as it always did), and its request is answered.
#[test]
fn a_server_that_does_not_know_bundles_gets_a_frame_per_message() {
    within(30, || {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            let mut session = old_server_handshake(&mut stream);
            let decoder = FrameDecoder::new(1 << 20);
            let (mut input, mut chunk) = (Vec::new(), vec![0u8; 64 << 10]);
            let mut messages = Vec::new();
            loop {
                let n = stream.read(&mut chunk).unwrap();
                assert!(n > 0, "the client closed after {} messages", messages.len());
                input.extend_from_slice(&chunk[..n]);
                while let Ok(Decoded::Frame(len)) = decoder.decode(&input) {
                    let mut frame: Vec<u8> = input.drain(..len).collect();
                    let (seq, body) = session.opener.open_in_place(&mut frame).unwrap();
                    messages.push((seq, body.to_vec()));
                    if seq != 0 {
                        let mut reply = Vec::new();
                        session
                            .sealer
                            .seal_append(seq, b"pong", &mut reply)
                            .unwrap();
                        stream.write_all(&reply).unwrap();
                        return messages;
                    }
                }
            }
        });
        let client = Client::new(addr, Config::default().workers(1)).unwrap();
        for i in 0..MESSAGES {
            client.send_no_wait(&body(i)).unwrap();
        }
        let mut reply = Vec::new();
        client.request(b"ping", &mut reply).unwrap();
        assert_eq!(reply, b"pong");
        let messages = server.join().unwrap();
        assert_eq!(messages.len(), MESSAGES as usize + 1);
        for (i, (seq, body_got)) in messages.iter().take(MESSAGES as usize).enumerate() {
            assert_eq!((*seq, body_got), (0, &body(i as u32)));
        }
        assert_eq!(messages.last().unwrap().1, b"ping");
    });
}
