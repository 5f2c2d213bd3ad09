//! Fuzz target `handshake_auth`: see the function it calls in `fuzz/harness.rs`.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

fuzz_target!(|data: &[u8]| harness::handshake_auth(data));
