//! The crate's promises about itself, checked in the files that make them:
//! what the README says up front, how a build off Unix fails, the licence
//! texts, the manifest's links, the README's relative links and the
//! changelog. (CI's `cargo publish --dry-run` step checks what the package
//! holds.)

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
fn readme_says_up_front_blocking_or_async_and_unix_only() {
    let top = readme_top();
    assert!(top.contains("Blocking or async calls"), "{top}");
    assert!(top.contains("request_async"), "{top}");
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

/// The value of `key = "..."` in Cargo.toml's `[package]` table.
fn manifest_field(key: &str) -> Option<String> {
    let manifest = read("Cargo.toml");
    let package = manifest
        .split("\n[")
        .find(|t| t.starts_with("[package]") || t.starts_with("package]"))
        .expect("Cargo.toml has [package]")
        .to_string();
    package.lines().find_map(|line| {
        let (k, v) = line.split_once('=')?;
        (k.trim() == key).then(|| v.trim().trim_matches('"').to_string())
    })
}

#[test]
fn both_licences_the_manifest_names_are_there() {
    assert_eq!(
        manifest_field("license").as_deref(),
        Some("MIT OR Apache-2.0")
    );
    let mit = read("LICENSE-MIT");
    assert!(mit.contains("Copyright (c) 2026 The monte-rpc developers"));
    assert!(mit.contains("Permission is hereby granted, free of charge"));
    let apache = read("LICENSE-APACHE");
    assert!(apache.contains("Apache License\n                        Version 2.0, January 2004"));
    assert!(apache.contains("END OF TERMS AND CONDITIONS"));
}

#[test]
fn the_manifest_says_where_the_crate_lives() {
    let repository = manifest_field("repository").expect("a repository field");
    assert!(
        repository.starts_with("https://github.com/"),
        "{repository}"
    );
    assert_eq!(manifest_field("homepage"), Some(repository));
    assert_eq!(
        manifest_field("documentation").as_deref(),
        Some("https://docs.rs/monte-rpc")
    );
}

/// crates.io resolves a README's relative links against the repository
/// (`<repository>/blob/HEAD/<path>`), so each must name a file that is there.
#[test]
fn the_readmes_relative_links_name_files_of_the_repository() {
    let readme = read("README.md");
    let mut links = 0;
    for target in readme
        .split("](")
        .skip(1)
        .filter_map(|s| s.split(')').next())
    {
        if target.contains(':') || target.starts_with('#') {
            continue;
        }
        let path = target.split('#').next().unwrap();
        assert!(
            Path::new(env!("CARGO_MANIFEST_DIR")).join(path).exists(),
            "README links to {target}, which does not exist"
        );
        links += 1;
    }
    assert!(links >= 2, "PROTOCOL.md and SECURITY.md at least");
}

#[test]
fn the_changelog_keeps_an_unreleased_section() {
    let changelog = read("CHANGELOG.md");
    assert!(changelog.starts_with("# Changelog\n"));
    assert!(changelog.contains("keepachangelog.com"));
    let unreleased = changelog
        .find("\n## [Unreleased]\n")
        .expect("an Unreleased section");
    let next = changelog[unreleased + 1..]
        .find("\n## ")
        .map_or(changelog.len(), |i| unreleased + 1 + i);
    let section = &changelog[unreleased..next];
    assert!(section.contains("\n### Added\n"));
    assert!(section.contains("psk"), "the psk wire change is named");
}
