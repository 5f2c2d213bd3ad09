//! Fuzz target `handshake_client`: see the function it calls in `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::handshake(data, monte_rpc::protocol::Role::Client));
