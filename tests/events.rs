//! The connection events the library emits through the `log` facade (the
//! default `log` feature): opened, closed with the reason, a failed
//! handshake, a refusal at the cap and a failed dial. A logger installed
//! for this test binary records every record of the `monte_rpc` target.

mod common;

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;
use std::time::Duration;

use common::{client_config, server_config, wait_until, within};
use monte_rpc::{handler, Client, Server};

struct Capture(Mutex<Vec<(log::Level, String)>>);

impl log::Log for Capture {
    fn enabled(&self, metadata: &log::Metadata<'_>) -> bool {
        metadata.target() == "monte_rpc"
    }
    fn log(&self, record: &log::Record<'_>) {
        if self.enabled(record.metadata()) {
            let line = record.args().to_string();
            self.0.lock().unwrap().push((record.level(), line));
        }
    }
    fn flush(&self) {}
}

static LOGS: Capture = Capture(Mutex::new(Vec::new()));

/// Whether a record at `level` containing every one of `parts` arrives
/// within 5 s.
fn logged(level: log::Level, parts: &[&str]) -> bool {
    wait_until(Duration::from_secs(5), || {
        LOGS.0
            .lock()
            .unwrap()
            .iter()
            .any(|(l, line)| *l == level && parts.iter().all(|p| line.contains(p)))
    })
}

fn dump() -> String {
    format!("{:#?}", LOGS.0.lock().unwrap())
}

#[test]
fn connections_tell_the_logger_what_happened_to_them() {
    log::set_logger(&LOGS).unwrap();
    log::set_max_level(log::LevelFilter::Debug);
    within(30, || {
        let server = Server::bind(
            "127.0.0.1:0",
            server_config()
                .max_conns(1)
                .accept_wait(Duration::from_millis(100)),
            handler(|ctx| {
                let _ = ctx.reply(b"ok");
            }),
        )
        .unwrap();
        let addr = server.local_addr();

        // Opened and closed by this side, at debug.
        let client = Client::new(addr, client_config()).unwrap();
        let mut response = Vec::new();
        client.request(b"hello", &mut response).unwrap();
        let local = addr.to_string();
        assert!(
            logged(log::Level::Debug, &["(Client side)", &local, "opened"]),
            "{}",
            dump()
        );
        assert!(
            logged(log::Level::Debug, &["(Server side)", "opened"]),
            "{}",
            dump()
        );

        // The cap of 1 is taken: a second connection is refused, at warn.
        let mut extra = TcpStream::connect(addr).unwrap();
        assert!(
            logged(
                log::Level::Warn,
                &["refused a connection", "cap of 1 connections"]
            ),
            "{}",
            dump()
        );
        let _ = extra.write_all(&[1; 32]);
        drop(extra);

        client.shutdown();
        assert!(logged(log::Level::Debug, &["closed: closed"]), "{}", dump());
        assert!(wait_until(Duration::from_secs(5), || server.connections() == 0));

        // A peer that sends a low-order key fails its handshake, at info.
        let mut bad = TcpStream::connect(addr).unwrap();
        bad.write_all(&[0; 32]).unwrap();
        assert!(
            logged(log::Level::Info, &["handshake with", "failed", "low-order"]),
            "{}",
            dump()
        );
        drop(bad);

        // A dial to a port nobody listens on fails, at info, with the address.
        let closed_port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        let nobody = Client::new(closed_port, client_config().dial_attempts(1)).unwrap();
        assert!(nobody.send(b"x").is_err());
        assert!(
            logged(
                log::Level::Info,
                &["dial failed: dialling", &closed_port.to_string(), "connect"]
            ),
            "{}",
            dump()
        );
        server.shutdown();
    });
}
