//! The crate's promises about itself, checked in the files that make them:
//! what the README says up front, and how a build off Unix fails. (CI's
//! `cargo publish --dry-run` step checks what the package holds.)

use std::fs;
use std::path::Path;

fn read(path: &str) -> String {
    let full = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
    fs::read_to_string(&full).unwrap_or_else(|e| panic!("{}: {e}", full.display()))
}

/// The README's text before its first section heading, its whitespace
/// runs made single spaces.
fn readme_top() -> String {
    let readme = read("README.md");
    let end = readme.find("\n## ").expect("the README has sections");
    readme[..end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn readme_says_up_front_the_api_is_blocking_and_unix_only() {
    let top = readme_top();
    assert!(top.contains("The API is blocking"), "{top}");
    assert!(top.contains("there is no async API"), "{top}");
    assert!(top.contains("Unix-only"), "{top}");
}

#[test]
fn a_build_off_unix_stops_with_an_error_that_says_why() {
    // Only Linux targets are installed where this runs, so the check is on
    // the source: the first item after the crate attributes.
    let lib = read("src/lib.rs");
    let at = lib
        .find("#[cfg(not(unix))]\ncompile_error!(")
        .expect("src/lib.rs has a compile_error! for non-Unix targets");
    assert!(lib[at..].contains("supports Unix targets only"));
    assert!(
        lib[..at]
            .lines()
            .all(|l| l.starts_with("//!") || l.starts_with("#![") || l.is_empty()),
        "the compile_error! comes before any module, so it is the first error"
    );
}
