//! A server out of file descriptors stops accepting for a moment and tries
//! again: the connection waiting in the backlog is accepted once a
//! descriptor is free. And a client that cannot make all its reactors
//! leaves none running. In a file of its own, as it lowers the process's
//! descriptor limit (its tests take turns: `SERIAL`).

mod common;
use common::{client_config, server_config, within};

use std::os::fd::AsRawFd;
use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use monte_rpc::{Client, Context, Server};
use rlimit::Resource;

static SERIAL: Mutex<()> = Mutex::new(());

#[test]
fn a_server_out_of_descriptors_accepts_once_one_is_free() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
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

/// This process's threads named `monte-rpc-client-*` (a thread's `comm` keeps
/// 15 bytes of its name).
fn client_reactor_threads() -> usize {
    std::fs::read_dir("/proc/self/task")
        .unwrap()
        .flatten()
        .filter(|task| {
            std::fs::read_to_string(task.path().join("comm"))
                .is_ok_and(|comm| comm.starts_with("monte-rpc-clien"))
        })
        .count()
}

/// A client whose second reactor cannot be made (out of descriptors: a
/// reactor takes an epoll and an eventfd) fails to start, and must not
/// leave its first reactor's thread running, which nothing could stop.
#[test]
fn a_client_that_cannot_start_all_its_reactors_leaves_none_running() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    within(30, || {
        let addr: std::net::SocketAddr = "127.0.0.1:9".parse().unwrap();
        let (soft, hard) = Resource::NOFILE.get().unwrap();
        let mut failed = 0;
        for room in 1..8u64 {
            let lowest_free = std::fs::File::open("/dev/null").unwrap().as_raw_fd() as u64;
            Resource::NOFILE.set(lowest_free + room, hard).unwrap();
            let made = Client::new(addr, client_config().workers(2));
            Resource::NOFILE.set(soft, hard).unwrap();
            match made {
                Ok(client) => client.shutdown(),
                Err(_) => {
                    failed += 1;
                    // A thread takes its name once it runs: give a leaked
                    // one the time to.
                    thread::sleep(Duration::from_millis(100));
                    assert_eq!(
                        client_reactor_threads(),
                        0,
                        "a client that failed to start (with room for {room} descriptors) \
                         left reactor threads running"
                    );
                }
            }
        }
        assert!(
            failed >= 2,
            "only {failed} of the tries failed: the test missed its path"
        );
    });
}
