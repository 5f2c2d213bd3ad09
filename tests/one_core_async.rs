//! A future awaiting a lone request on one core: with `Waiting::Auto` it
//! hands the core over (yields it to the server, woken on this very core
//! by the request) and reads its own response, so neither the client's
//! reactor nor the executor's thread is woken for it. In a test binary of
//! its own: the library counts the process's cores once, from the thread
//! that first asks, and here that is a thread confined to one core.

mod common;

use monte_rpc::{Client, Config, Context, Server, Waiting};

#[test]
#[cfg(target_os = "linux")]
fn on_one_core_async_requests_hand_the_core_over() {
    const REQUESTS: u64 = 300;
    common::within(60, || {
        common::confine_to_first_core();
        assert!(
            Waiting::Auto.spin_time().is_zero(),
            "the library counted more than one core: the test does not reach its path"
        );
        let server = Server::bind("127.0.0.1:0", Config::server(), |ctx: &mut Context<'_>| {
            let _ = ctx.reply(b"");
        })
        .unwrap();
        let client = Client::new(server.local_addr(), Config::default().max_conns(1)).unwrap();
        let mut resp = Vec::new();
        client.request(b"first", &mut resp).unwrap();
        let before = client.stats();
        futures::executor::block_on(async {
            for _ in 0..REQUESTS {
                client.request_async(b"ping", &mut resp).await.unwrap();
            }
        });
        let woken = client.stats().reactor_wakeups - before.reactor_wakeups;
        // A reactor that read every response: once per request.
        assert!(
            woken <= REQUESTS / 10,
            "the client's reactor was woken {woken} times for {REQUESTS} requests"
        );
        client.shutdown();
        server.shutdown();
    });
}
