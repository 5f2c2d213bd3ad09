//! Fuzz target `connection_input`: see the function it calls in `fuzz/harness.rs`.
//! It also checks that no single allocation exceeds `ALLOC_BOUND`, i.e.
//! nothing is sized from a length the peer claimed.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../harness.rs"]
mod harness;

#[global_allocator]
static ALLOC: harness::PeakAlloc = harness::PeakAlloc::new();

fuzz_target!(|data: &[u8]| {
    ALLOC.reset();
    harness::connection_input(data);
    let peak = ALLOC.peak();
    assert!(
        peak <= harness::ALLOC_BOUND,
        "allocation of {peak} bytes exceeds {}",
        harness::ALLOC_BOUND
    );
});
