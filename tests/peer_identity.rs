//! The authenticated peer key reaches the application: a server that
//! requires client identities can tell its clients apart
//! (`Connection::peer_identity`, from `on_open` and from every `Context`),
//! its allow-list callback learns the connection's address, and a client
//! sees the server key it pinned.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use monte_rpc::protocol::{
    generate_identity_pkcs8, identity_public_key, Ed25519KeyPair, IdentityConfig,
};
use monte_rpc::{Client, Config, Connection, Context, Handler, Server};

fn identity() -> Arc<Ed25519KeyPair> {
    let pkcs8 = generate_identity_pkcs8().unwrap();
    Arc::new(Ed25519KeyPair::from_pkcs8(&pkcs8).unwrap())
}

/// `(peer address, key)` pairs as each place saw them.
type Seen = Arc<Mutex<Vec<(Option<SocketAddr>, Option<[u8; 32]>)>>>;

/// Replies to every request with the key its connection proved (empty if
/// none), and records each `on_open`.
struct WhoAmI {
    opened: Seen,
}

impl Handler for WhoAmI {
    fn on_message(&self, ctx: &mut Context<'_>) {
        let key = ctx.conn().peer_identity();
        let _ = ctx.reply(key.as_ref().map_or(&[][..], |k| &k[..]));
    }

    fn on_open(&self, conn: &Connection) {
        let mut opened = self.opened.lock().unwrap();
        opened.push((conn.peer_addr(), conn.peer_identity()));
    }
}

/// Records the client connection's view of the server's key.
struct ClientSide {
    opened: Seen,
}

impl Handler for ClientSide {
    fn on_message(&self, _ctx: &mut Context<'_>) {}

    fn on_open(&self, conn: &Connection) {
        let mut opened = self.opened.lock().unwrap();
        opened.push((conn.peer_addr(), conn.peer_identity()));
    }
}

#[test]
fn a_server_tells_its_identity_clients_apart() {
    let server_key = identity();
    let (alice, bob) = (identity(), identity());
    let allowed = [identity_public_key(&alice), identity_public_key(&bob)];
    let asked: Seen = Seen::default();
    let policy = {
        let asked = asked.clone();
        move |key: &[u8; 32], peer: Option<SocketAddr>| {
            asked.lock().unwrap().push((peer, Some(*key)));
            allowed.contains(key)
        }
    };
    let server_config = Config::server()
        .handshake(Arc::new(
            IdentityConfig::server(server_key.clone()).allow_clients_with(policy),
        ))
        .request_timeout(Some(Duration::from_secs(5)));
    let opened: Seen = Seen::default();
    let server = Server::bind(
        "127.0.0.1:0",
        server_config,
        WhoAmI {
            opened: opened.clone(),
        },
    )
    .unwrap();
    let pin = identity_public_key(&server_key);

    let mut seen_by_clients = Vec::new();
    for (name, key) in [("alice", &alice), ("bob", &bob)] {
        let client_opened: Seen = Seen::default();
        let config = Config::default().max_conns(1).handshake(Arc::new(
            IdentityConfig::pinned(pin).with_identity(key.clone()),
        ));
        let client = Client::with_handler(
            server.local_addr(),
            config,
            ClientSide {
                opened: client_opened.clone(),
            },
        )
        .unwrap();
        let mut resp = Vec::new();
        client.request(name.as_bytes(), &mut resp).unwrap();
        assert_eq!(
            resp,
            identity_public_key(key),
            "{name}: the handler's Context saw another key"
        );
        let client_view = client_opened.lock().unwrap().clone();
        assert_eq!(client_view.len(), 1, "{name}: one client connection");
        assert_eq!(
            client_view[0].1,
            Some(pin),
            "{name}: the client's connection names the server key it pinned"
        );
        seen_by_clients.push(client_view[0].0);
        client.shutdown();
    }

    let opened = opened.lock().unwrap().clone();
    let asked = asked.lock().unwrap().clone();
    assert_eq!(opened.len(), 2, "two connections opened: {opened:?}");
    assert_eq!(asked.len(), 2, "the policy was asked twice: {asked:?}");
    for (i, key) in allowed.iter().enumerate() {
        assert_eq!(opened[i].1, Some(*key), "on_open of client {i}");
        assert_eq!(asked[i].1, Some(*key), "policy call {i}");
        let addr = asked[i]
            .0
            .expect("the policy gets the connection's address");
        assert_eq!(
            Some(addr),
            opened[i].0,
            "the policy's address is the connection's"
        );
        assert!(addr.ip().is_loopback());
    }
    assert_ne!(opened[0].0, opened[1].0);
    server.shutdown();
}

#[test]
fn a_refused_identity_never_opens() {
    let server_key = identity();
    let (allowed, stranger) = (identity(), identity());
    let allowed_key = identity_public_key(&allowed);
    let config = Config::server().handshake(Arc::new(
        IdentityConfig::server(server_key.clone()).allow_clients([allowed_key]),
    ));
    let opened: Seen = Seen::default();
    let server = Server::bind(
        "127.0.0.1:0",
        config,
        WhoAmI {
            opened: opened.clone(),
        },
    )
    .unwrap();
    let pin = identity_public_key(&server_key);
    let config = Config::default()
        .max_conns(1)
        .dial_attempts(1)
        .request_timeout(Some(Duration::from_secs(2)))
        .handshake(Arc::new(
            IdentityConfig::pinned(pin).with_identity(stranger),
        ));
    let client = Client::new(server.local_addr(), config).unwrap();
    let mut resp = Vec::new();
    assert!(
        client.request(b"let me in", &mut resp).is_err(),
        "a stranger's request was answered: {resp:?}"
    );
    client.shutdown();
    std::thread::sleep(Duration::from_millis(100));
    assert!(
        opened.lock().unwrap().is_empty(),
        "on_open ran for a stranger"
    );
    server.shutdown();
}

/// An allow-list callback that panics (an application's bug, reached by
/// any client that proves a key the callback did not expect) must fail
/// that handshake only: it ran on the reactor's thread unguarded, and its
/// panic stopped the reactor and every connection on it.
#[test]
fn a_panicking_allow_list_callback_fails_only_that_handshake() {
    let server_key = identity();
    let (friend, stranger) = (identity(), identity());
    let friend_key = identity_public_key(&friend);
    let policy = move |key: &[u8; 32], _: Option<SocketAddr>| {
        assert!(*key == friend_key, "a key this policy never expected");
        true
    };
    // One reactor: a panic that escapes takes every connection with it.
    let server_config = Config::server().workers(1).handshake(Arc::new(
        IdentityConfig::server(server_key.clone()).allow_clients_with(policy),
    ));
    let server = Server::bind(
        "127.0.0.1:0",
        server_config,
        WhoAmI {
            opened: Seen::default(),
        },
    )
    .unwrap();
    let pin = identity_public_key(&server_key);
    let client_with = |key: &Arc<Ed25519KeyPair>| {
        let config = Config::default()
            .max_conns(1)
            .request_timeout(Some(Duration::from_secs(3)))
            .handshake(Arc::new(
                IdentityConfig::pinned(pin).with_identity(key.clone()),
            ));
        Client::new(server.local_addr(), config).unwrap()
    };
    let friendly = client_with(&friend);
    let mut resp = Vec::new();
    friendly.request(b"before", &mut resp).unwrap();
    let unexpected = client_with(&stranger);
    assert!(
        unexpected.request(b"me too", &mut resp).is_err(),
        "the stranger's handshake should fail"
    );
    friendly
        .request(b"after", &mut resp)
        .expect("the connection beside the panicking handshake still answers");
    assert_eq!(resp, identity_public_key(&friend));
    let stats = server.stats();
    assert!(stats.handshakes_failed >= 1);
    // The application's callback failed, not the peer.
    assert_eq!(stats.closed_protocol_error, 0, "{stats:?}");
    assert!(stats.closed_other >= 1, "{stats:?}");
    unexpected.shutdown();
    friendly.shutdown();
    server.shutdown();
}
