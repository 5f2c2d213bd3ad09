//! Command-line flags for the examples: `--name value` or `--name=value`,
//! the one way every example reads its arguments, and the value parsers
//! they share. Each example includes it with `#[path]`; cargo does not
//! build it as an example of its own.

#![allow(dead_code)] // each example uses the parsers it needs

/// The command line's flags, one `(flag, value)` at a time; bad input ends
/// in the example's `usage`.
pub struct Flags {
    args: std::iter::Skip<std::env::Args>,
    usage: fn(&str) -> !,
}

impl Flags {
    /// The flags of this process's command line.
    pub fn from_env(usage: fn(&str) -> !) -> Flags {
        Flags {
            args: std::env::args().skip(1),
            usage,
        }
    }

    /// The next flag and its value. The flags in `switches` take no value
    /// (theirs is empty); `-h`, `--help` and a missing value end in
    /// `usage`.
    pub fn next_flag(&mut self, switches: &[&str]) -> Option<(String, String)> {
        let arg = self.args.next()?;
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg, None),
        };
        if flag == "-h" || flag == "--help" {
            (self.usage)("help");
        }
        if switches.contains(&flag.as_str()) {
            return Some((flag, String::new()));
        }
        match inline.or_else(|| self.args.next()) {
            Some(value) => Some((flag, value)),
            None => (self.usage)(&format!("{flag}: missing value")),
        }
    }

    /// `value` as a number.
    pub fn num<T: std::str::FromStr>(&self, flag: &str, value: &str) -> T {
        value
            .parse()
            .unwrap_or_else(|_| (self.usage)(&format!("{flag}: not a number: {value}")))
    }

    /// `value` as a 32-byte key in 64 hex characters.
    pub fn key(&self, flag: &str, value: &str) -> [u8; 32] {
        let bad = || -> ! {
            (self.usage)(&format!(
                "{flag}: expected 64 hex characters, got {value:?}"
            ))
        };
        if value.len() != 64 || !value.is_ascii() {
            bad();
        }
        let mut key = [0u8; 32];
        for (i, b) in key.iter_mut().enumerate() {
            *b = u8::from_str_radix(&value[2 * i..2 * i + 2], 16).unwrap_or_else(|_| bad());
        }
        key
    }
}
