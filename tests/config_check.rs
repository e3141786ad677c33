//! Runs the real `spillway check` binary on the shipped configs.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// `spillway check`, under the deadline of `support::exits` (a hang fails the test).
fn check(rel: &str) -> Output {
    support::exits(
        Command::new(env!("CARGO_BIN_EXE_spillway"))
            .current_dir(root())
            .args(["check", "-c", rel]),
    )
}

fn assert_ok(rel: &str) {
    let out = check(rel);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{rel}: {stderr}");
    assert_eq!(stdout.lines().next(), Some("ok"), "{rel}: {stdout}");
}

#[test]
fn main_example_is_valid_and_lists_routes() {
    let out = check("config/spillway.yaml");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok\n"), "{stdout}");
    assert!(stdout.contains("tax-quote\tpassthrough"), "{stdout}");
    assert!(stdout.contains("partner-webhooks\tdeferrable"), "{stdout}");
    assert!(stdout.contains("https://api.tax.example"), "{stdout}");
}

#[test]
fn examples_are_valid() {
    let dir = root().join("config/examples");
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let path = entry.unwrap_or_else(|e| panic!("{e}")).path();
        if path.extension().is_some_and(|e| e == "yaml") {
            let rel = path
                .strip_prefix(root())
                .unwrap_or(Path::new(""))
                .to_string_lossy()
                .into_owned();
            assert_ok(&rel);
            n += 1;
        }
    }
    assert!(n >= 3, "expected at least three examples, found {n}");
}

/// (file, expected `file:line` prefix, expected key path)
const INVALID: &[(&str, &str, &str)] = &[
    ("syntax-error.yaml", ":6:", "routes[0]"),
    ("unknown-key.yaml", ":5:", "routes[0].retyr"),
    ("duplicate-key.yaml", ":6:", "routes[0].timeout"),
    ("duplicate-route-name.yaml", ":6:", "routes[1].name"),
    (
        "backoff-max-below-initial.yaml",
        ":8:",
        "routes[0].retry.backoff.max",
    ),
    ("bad-upstream.yaml", ":4:", "routes[0].upstream"),
    ("shadowed-route.yaml", ":7:", "routes[1].match"),
    ("admin-no-token.yaml", ":3:", "admin.listen"),
    ("many-errors.yaml", ":10:", "routes[0].retry.retry_on[1]"),
];

#[test]
fn invalid_files_fail_with_position_and_key() {
    for (file, line, key) in INVALID {
        let rel = format!("config/invalid/{file}");
        let out = check(&rel);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{rel}: {stderr}");
        assert!(out.stdout.is_empty(), "{rel} printed to stdout");
        assert!(
            stderr.contains(&format!("{rel}{line}")),
            "{rel}: expected {rel}{line} in {stderr}"
        );
        assert!(
            stderr.contains(&format!(": {key}")),
            "{rel}: expected key {key} in {stderr}"
        );
    }
}

#[test]
fn every_invalid_file_is_covered() {
    let dir = root().join("config/invalid");
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{e}")) {
        let name = entry
            .unwrap_or_else(|e| panic!("{e}"))
            .file_name()
            .to_string_lossy()
            .into_owned();
        assert!(
            INVALID.iter().any(|(f, _, _)| *f == name),
            "{name} has no expectation in INVALID"
        );
    }
}

#[test]
fn many_errors_are_all_reported() {
    let out = check("config/invalid/many-errors.yaml");
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in [
        ": listen:",
        ": shutdown_grace:",
        ": routes[0].name:",
        ": routes[0].concurrency: only for deferrable routes",
        ": routes[0].retry.max_attempts:",
        ": routes[0].retry.retry_on[1]:",
    ] {
        assert!(stderr.contains(key), "missing {key} in {stderr}");
    }
}

#[test]
fn missing_file_is_an_error() {
    let out = check("config/does-not-exist.yaml");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot read the file"));
}
