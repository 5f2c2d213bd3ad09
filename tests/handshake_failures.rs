//! Connections that fail before their handshake finishes reach the
//! application through `Handler::on_handshake_failed`, with the reason.

use std::io::Write;
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use monte_rpc::{Config, Context, Error, Handler, HandshakeError, Server, TimeoutKind};

#[derive(Default)]
struct Failures(Mutex<Vec<(Option<SocketAddr>, Error)>>);

struct Recorder(Arc<Failures>);

impl Handler for Recorder {
    fn on_message(&self, _ctx: &mut Context<'_>) {}
    fn on_handshake_failed(&self, peer: Option<SocketAddr>, error: &Error) {
        self.0 .0.lock().unwrap().push((peer, error.clone()));
    }
}

fn wait_for(failures: &Failures, peer: SocketAddr) -> Error {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some((_, e)) = failures
            .0
            .lock()
            .unwrap()
            .iter()
            .find(|(p, _)| *p == Some(peer))
        {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "no handshake failure reported");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A silent peer is reported with the handshake timeout, a low-order key
/// with its handshake error, a peer that leaves mid-handshake as closed.
#[test]
fn handshake_failures_are_reported_with_their_reason() {
    let failures = Arc::new(Failures::default());
    let server = Server::bind(
        "127.0.0.1:0",
        Config::server().handshake_timeout(Some(Duration::from_millis(200))),
        Recorder(failures.clone()),
    )
    .unwrap();

    let silent = TcpStream::connect(server.local_addr()).unwrap();
    let e = wait_for(&failures, silent.local_addr().unwrap());
    assert!(matches!(e, Error::Timeout(TimeoutKind::Handshake)), "{e:?}");

    let mut zero = TcpStream::connect(server.local_addr()).unwrap();
    zero.write_all(&[0u8; 32]).unwrap();
    let e = wait_for(&failures, zero.local_addr().unwrap());
    assert!(
        matches!(e, Error::Handshake(HandshakeError::LowOrderPublicKey)),
        "{e:?}"
    );

    let mut gone = TcpStream::connect(server.local_addr()).unwrap();
    let gone_addr = gone.local_addr().unwrap();
    gone.write_all(&[1u8; 10]).unwrap();
    drop(gone);
    let e = wait_for(&failures, gone_addr);
    assert!(
        matches!(e, Error::Handshake(HandshakeError::PeerClosed)),
        "{e:?}"
    );
    server.shutdown();
}
