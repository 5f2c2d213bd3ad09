//! The process's descriptor table is grown before connections come: a
//! server makes room for its cap when it binds, and
//! `reserve_descriptors` for what an application asks. Linux shows the
//! table's size as `FDSize` in `/proc/self/status`. In a file of its own,
//! and one test: the table only grows, so each check needs a table no
//! earlier one has grown as far.
#![cfg(target_os = "linux")]

mod common;
use common::{client_config, server_config, within};

use monte_rpc::{Client, Context, Server};
use rlimit::Resource;

/// The slots in this process's descriptor table.
fn table_size() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("FDSize:"))
        .expect("an FDSize line")
        .trim()
        .parse()
        .unwrap()
}

/// Raises the soft descriptor limit to at least `want` (within the hard
/// limit); returns the soft limit now.
fn raise_limit(want: u64) -> u64 {
    let (soft, hard) = Resource::NOFILE.get().unwrap();
    let soft = soft.max(want.min(hard));
    Resource::NOFILE.set(soft, hard).unwrap();
    soft
}

#[test]
fn the_table_is_grown_before_connections_come() {
    a_server_makes_room_for_its_cap_when_it_binds();
    room_asked_for_is_made_up_to_the_limit();
}

/// A server bound for 3,000 connections (fewer if the descriptor limit
/// is lower) grows a table of a few hundred slots to fit them.
fn a_server_makes_room_for_its_cap_when_it_binds() {
    let limit = raise_limit(8192) as usize;
    let before = table_size();
    let cap = 3000.min(limit.saturating_sub(300));
    assert!(
        cap > before,
        "a descriptor limit of {limit} leaves no cap to test with beyond the table's {before} slots"
    );
    within(30, move || {
        let server = Server::bind(
            "127.0.0.1:0",
            server_config().max_conns(cap),
            |ctx: &mut Context<'_>| {
                let _ = ctx.reply(b"");
            },
        )
        .unwrap();
        let after = table_size();
        assert!(
            after >= cap,
            "a server for {cap} connections left the table at {after} slots (from {before})"
        );
        // It serves as before.
        let client = Client::new(server.local_addr(), client_config()).unwrap();
        let mut resp = Vec::new();
        client.request(b"ping", &mut resp).unwrap();
        client.shutdown();
        server.shutdown();
    });
}

/// `reserve_descriptors` makes the room asked for, and past the soft
/// limit as much as it allows.
fn room_asked_for_is_made_up_to_the_limit() {
    let limit = raise_limit(20_000);
    let want = 10_000usize.min(limit as usize);
    let room = monte_rpc::reserve_descriptors(want).unwrap();
    assert_eq!(room, want);
    assert!(table_size() >= want, "{} slots", table_size());
    // Past the limit: as much as the limit allows, no error.
    let (_, hard) = Resource::NOFILE.get().unwrap();
    Resource::NOFILE.set(want as u64, hard).unwrap();
    assert_eq!(monte_rpc::reserve_descriptors(want * 4).unwrap(), want);
    Resource::NOFILE.set(limit, hard).unwrap();
}
