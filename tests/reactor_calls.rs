//! Handlers calling back into the library on their own reactor thread:
//! sends are queued rather than waited on (the thread that waits would be
//! the one that must write), and a request fails at once instead of
//! waiting for itself.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{wait_until, within};
use monte_rpc::{Client, Config, Context, Error, Server};

/// A handler's send, send_no_wait and request on its own connection.
#[test]
fn handler_calls_on_its_own_reactor_do_not_block_it() {
    within(30, || {
        let outcome: Arc<Mutex<Option<Result<(), Error>>>> = Arc::default();
        let seen = outcome.clone();
        let server = Server::bind(
            "127.0.0.1:0",
            Config::server().workers(1),
            move |ctx: &mut Context<'_>| {
                let conn = ctx.conn().clone();
                for _ in 0..100 {
                    conn.send_no_wait(b"pushed").unwrap();
                    conn.send(b"pushed").unwrap();
                }
                let mut resp = Vec::new();
                *seen.lock().unwrap() = Some(conn.request(b"ask", &mut resp));
                let _ = ctx.reply(b"done");
            },
        )
        .unwrap();
        let pushed = Arc::new(AtomicUsize::new(0));
        let counter = pushed.clone();
        let client = Client::with_handler(
            server.local_addr(),
            Config::default().request_timeout(Some(Duration::from_secs(5))),
            move |ctx: &mut Context<'_>| {
                if ctx.body() == b"pushed" {
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            },
        )
        .unwrap();
        let mut resp = Vec::new();
        client.request(b"go", &mut resp).unwrap();
        assert_eq!(resp, b"done");
        assert!(matches!(
            outcome.lock().unwrap().take(),
            Some(Err(Error::OnReactorThread))
        ));
        assert!(
            wait_until(Duration::from_secs(5), || pushed.load(Ordering::Relaxed)
                == 200),
            "only {} of 200 pushed messages arrived",
            pushed.load(Ordering::Relaxed)
        );
        client.shutdown();
        server.shutdown();
    });
}
