//! Crypto hot paths of the protocol core: sealing and opening frames, a full
//! in-memory handshake, and the key schedule alone.
//!
//! Run with `cargo bench --bench crypto` (add `-- --quick` for a fast pass).

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use monte_rpc::protocol::wire::frame_len;
use monte_rpc::protocol::{
    derive_keys, ClientHandshake, Handshake, Opener, Profile, PskHandshake, Sealer,
    ServerHandshake, Session, KEY_LEN,
};

const KEY: [u8; KEY_LEN] = [0x5c; KEY_LEN];
const SIZES: [usize; 2] = [1400, 16 * 1024];

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

/// Seal one frame into a preallocated buffer; the counter advances as on a
/// real connection (the secure profile's rekey every 2^24 frames is part of
/// the cost, amortised to nothing).
fn seal(c: &mut Criterion) {
    let mut group = c.benchmark_group("seal");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            let payload = vec![0xA5u8; size];
            let mut out = vec![0u8; frame_len(size)];
            let mut sealer = Sealer::new(KEY, Profile::Secure);
            b.iter(|| {
                let n = sealer
                    .seal_into(1, black_box(&payload), black_box(&mut out))
                    .unwrap();
                black_box(n)
            });
        });
    }
    group.finish();
}

/// Open one frame in place. An opener only accepts the frame for its next
/// counter, and opening decrypts in place, so a batch of frames is sealed
/// once up front; each batch restores the ciphertexts and makes a fresh
/// opener outside the timed region, then opens the frames in order.
fn open(c: &mut Criterion) {
    let mut group = c.benchmark_group("open");
    for size in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_with_input(BenchmarkId::from_parameter(size), &size, |b, &size| {
            let flen = frame_len(size);
            // About 2 MiB of frames per batch.
            let batch = ((2 << 20) / flen).max(16);
            let payload = vec![0xA5u8; size];
            let mut sealer = Sealer::new(KEY, Profile::Secure);
            let mut pristine = Vec::with_capacity(batch * flen);
            for _ in 0..batch {
                sealer.seal_append(1, &payload, &mut pristine).unwrap();
            }
            let mut work = pristine.clone();

            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                let mut left = iters;
                while left > 0 {
                    let n = left.min(batch as u64) as usize;
                    work[..n * flen].copy_from_slice(&pristine[..n * flen]);
                    let mut opener = Opener::new(KEY, Profile::Secure);
                    let start = Instant::now();
                    for frame in work[..n * flen].chunks_exact_mut(flen) {
                        let (seq, plain) = opener.open_in_place(black_box(frame)).unwrap();
                        black_box((seq, plain.len()));
                    }
                    total += start.elapsed();
                    left -= n as u64;
                }
                total
            });
        });
    }
    group.finish();
}

/// Runs client and server handshakes to completion in memory.
fn run_handshake(profile: Profile) -> (Session, Session) {
    let mut client = ClientHandshake::new(profile).unwrap();
    let mut server = ServerHandshake::new(profile).unwrap();
    let mut c2s = Vec::with_capacity(KEY_LEN);
    client.write_output(&mut c2s);
    let used = server.read_input(&c2s).unwrap();
    debug_assert_eq!(used, KEY_LEN);
    let mut s2c = Vec::with_capacity(KEY_LEN);
    server.write_output(&mut s2c);
    let used = client.read_input(&s2c).unwrap();
    debug_assert_eq!(used, KEY_LEN);
    (
        client.take_session().unwrap(),
        server.take_session().unwrap(),
    )
}

/// A full handshake, both sides: two X25519 key generations, two
/// agreements, the key derivation and the session setup.
fn handshake(c: &mut Criterion) {
    let mut group = c.benchmark_group("handshake");
    for profile in [Profile::Secure, Profile::Monte] {
        group.bench_function(profile.name(), |b| {
            b.iter(|| black_box(run_handshake(black_box(profile))))
        });
    }
    group.finish();
}

/// Creating a server handshake: what a reactor pays per accepted socket
/// before any byte has arrived.
fn server_handshake_new(c: &mut Criterion) {
    let mut group = c.benchmark_group("server_handshake_new");
    group.bench_function("secure", |b| {
        b.iter(|| black_box(ServerHandshake::new(black_box(Profile::Secure)).unwrap()))
    });
    group.bench_function("psk", |b| {
        b.iter(|| black_box(PskHandshake::server(black_box(KEY)).unwrap()))
    });
    group.finish();
}

/// The key schedule alone, from a shared secret and both public keys.
fn key_derivation(c: &mut Criterion) {
    let mut group = c.benchmark_group("derive_keys");
    let dh = [0x11u8; KEY_LEN];
    let cp = [0x22u8; KEY_LEN];
    let sp = [0x33u8; KEY_LEN];
    for profile in [Profile::Secure, Profile::Monte] {
        group.bench_function(profile.name(), |b| {
            b.iter(|| {
                black_box(derive_keys(
                    black_box(profile),
                    black_box(&dh),
                    black_box(&cp),
                    black_box(&sp),
                ))
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = config();
    targets = seal, open, handshake, server_handshake_new, key_derivation
}
criterion_main!(benches);
