//! A monotonic clock in nanoseconds, cheap to keep in an atomic: the
//! timestamps several threads stamp on a connection (last read, the start
//! of a partial frame) and the reactor's sweep compares.

use std::time::Instant;

/// Nanoseconds since the first call in this process.
pub(crate) fn now_nanos() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH.get_or_init(Instant::now).elapsed().as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use super::now_nanos;

    #[test]
    fn never_goes_back() {
        let a = now_nanos();
        std::thread::sleep(std::time::Duration::from_millis(1));
        let b = now_nanos();
        assert!(b >= a + 1_000_000, "{a} then {b}");
    }
}
