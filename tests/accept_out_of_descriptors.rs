//! A server out of file descriptors stops accepting for a moment and tries
//! again: the connection waiting in the backlog is accepted once a
//! descriptor is free. In a file of its own, as it lowers the process's
//! descriptor limit.

mod common;
use common::{client_config, server_config, within};

use std::os::fd::AsRawFd;
use std::thread;
use std::time::Duration;

use monte_rpc::{Client, Context, Server};
use rlimit::Resource;

#[test]
fn a_server_out_of_descriptors_accepts_once_one_is_free() {
    within(30, || {
        let server = Server::bind("127.0.0.1:0", server_config(), |ctx: &mut Context<'_>| {
            let body = ctx.body().to_vec();
            let _ = ctx.reply(&body);
        })
        .unwrap();
        // Dials on the first call; its reactors exist already.
        let client = Client::new(server.local_addr(), client_config().max_conns(1)).unwrap();
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        // Room for exactly one more descriptor: the client's socket. The
        // server's accept then fails with EMFILE.
        let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd() as u64;
        Resource::NOFILE.set(lowest_free + 1, hard).unwrap();
        let restore = thread::spawn(move || {
            thread::sleep(Duration::from_millis(300));
            let accepted_meanwhile = server.connections();
            Resource::NOFILE.set(soft, hard).unwrap();
            (server, accepted_meanwhile)
        });
        let mut resp = Vec::new();
        let answered = client.request(b"ping", &mut resp);
        let (server, accepted_meanwhile) = restore.join().unwrap();
        assert_eq!(
            accepted_meanwhile, 0,
            "the server accepted while out of descriptors"
        );
        answered.expect("a request once the server has descriptors again");
        assert_eq!(resp, b"ping");
        client.shutdown();
        server.shutdown();
    });
}
