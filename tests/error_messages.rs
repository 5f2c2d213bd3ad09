//! Error messages say what the numbers in them are: a frame over the limit
//! is reported with the configured message size the limit comes from.

mod common;

use std::io::{Read, Write};

use monte_rpc::{Client, Config, Error};

/// A peer that runs the server side of the handshake properly, waits for
/// the client's first frame, then answers with text, whose first four bytes
/// ("t-Ty") read as a length prefix of 1949127801.
#[test]
fn a_frame_too_large_names_the_configured_message_size() {
    let (addr, server) = common::raw_server(|mut stream| {
        let mut request = [0u8; 64];
        let _ = stream.read(&mut request).unwrap();
        stream.write_all(b"t-Type: text/plain\r\n\r\n").unwrap();
        let _ = stream.read(&mut request);
    });
    let max_message_size = 1 << 20;
    let config = Config::default()
        .workers(1)
        .max_message_size(max_message_size);
    let client = Client::new(addr, config).unwrap();
    let e = common::within(5, move || {
        client.request(b"ping", &mut Vec::new()).unwrap_err()
    });
    assert!(
        matches!(e.root_cause(), Error::FrameTooLarge { .. }),
        "{e:?}"
    );
    let text = e.to_string();
    assert!(text.contains("1949127801"), "{text}");
    assert!(
        text.contains(&format!("max_message_size {max_message_size}")),
        "{text}"
    );
    server.join().unwrap();
}

// A message the client allows but the server's max_message_size refuses:
// the server closes the connection, and the sender's error says it was
// writing to that server, and why a monte-rpc peer closes like that,
// instead of a bare "Broken pipe".
#[test]
fn a_message_the_peer_refuses_points_at_its_limit() {
    common::within(30, || {
        let server = monte_rpc::Server::bind(
            "127.0.0.1:0",
            Config::server().max_message_size(1 << 20),
            monte_rpc::handler(|ctx| {
                let _ = ctx.reply(b"");
            }),
        )
        .unwrap();
        let addr = server.local_addr();
        let client = Client::new(addr, Config::default().max_message_size(16 << 20)).unwrap();
        let big = vec![1u8; 10 << 20];
        let error = client.send(&big).expect_err("the server took 10 MiB");
        let message = error.to_string();
        assert!(matches!(error.root_cause(), Error::Io(_)), "{error:?}");
        assert!(message.contains(&addr.to_string()), "{message}");
        assert!(
            message.contains("max_message_size") || message.contains("reading from"),
            "{message}"
        );
        eprintln!("{message}");
        assert!(
            server.stats().frames_rejected_too_large >= 1,
            "{:?}",
            server.stats()
        );
        server.shutdown();
    });
}

// Every error of a call names the call and the peer: a request that times
// out, a send after shutdown, a reply on a connection that closed.
#[test]
fn call_errors_name_the_call_and_the_peer() {
    common::within(30, || {
        let server = monte_rpc::Server::bind(
            "127.0.0.1:0",
            Config::server(),
            monte_rpc::handler(|_| {}), // never answers
        )
        .unwrap();
        let addr = server.local_addr();
        let client = Client::new(
            addr,
            Config::default().request_timeout(Some(std::time::Duration::from_millis(100))),
        )
        .unwrap();
        let e = client.request(b"hello?", &mut Vec::new()).unwrap_err();
        assert!(
            matches!(e, Error::Call { op: monte_rpc::CallOp::Request, peer: Some(p), .. } if p == addr),
            "{e:?}"
        );
        assert_eq!(e.to_string(), format!("request to {addr}: request timeout"));
        assert_eq!(e.timeout_kind(), Some(monte_rpc::TimeoutKind::Request));

        client.shutdown();
        let e = client.send(b"late").unwrap_err();
        assert_eq!(e.to_string(), format!("send to {addr}: closed"));
        assert!(matches!(e.root_cause(), Error::Closed), "{e:?}");
        server.shutdown();
    });
}
