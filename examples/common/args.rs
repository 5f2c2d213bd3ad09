//! What the examples' command lines share: value parsers for clap's
//! `value_parser`, and the base wire profiles for `--profile`. Each example
//! includes this file with `#[path]`; cargo does not build it as an
//! example of its own.

#![allow(dead_code)] // each example uses what it needs

use monte_rpc::protocol::Profile;

/// The base wire profiles (`--profile`); the authenticated handshakes have
/// flags of their own.
#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Wire {
    /// Ephemeral X25519, one key per direction, rotated every 2^24 frames
    Secure,
    /// Byte-compatible with the Go library, to talk to Go peers only
    Monte,
}

impl From<Wire> for Profile {
    fn from(wire: Wire) -> Profile {
        match wire {
            Wire::Secure => Profile::Secure,
            Wire::Monte => Profile::Monte,
        }
    }
}

/// A 32-byte key written as 64 hex characters (`--psk`, `--pin`, `--allow`).
pub fn key(value: &str) -> Result<[u8; 32], String> {
    let bad = || format!("expected 64 hex characters, got {value:?}");
    if value.len() != 64 || !value.is_ascii() {
        return Err(bad());
    }
    let mut key = [0u8; 32];
    for (i, b) in key.iter_mut().enumerate() {
        *b = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).map_err(|_| bad())?;
    }
    Ok(key)
}

/// A positive, finite number of seconds, fractions allowed (`--secs 0.3`).
pub fn positive_secs(value: &str) -> Result<f64, String> {
    value
        .parse()
        .ok()
        .filter(|s: &f64| s.is_finite() && *s > 0.0)
        .ok_or_else(|| format!("not a positive number: {value}"))
}
