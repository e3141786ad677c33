//! `spillway demo`: the real binary, run to its end, loses nothing and says so.

mod support;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

/// Runs `spillway demo ARGS` to its exit within a deadline; returns exit code and stdout.
fn demo(args: &[&str]) -> (Option<i32>, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .arg("demo")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = String::new();
        stdout.read_to_string(&mut out).unwrap();
        out
    });
    // The demo bounds itself with --timeout; this only stops a hung process.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(90) + support::patience();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if tokio::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("spillway demo did not finish");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (status.code(), reader.join().unwrap())
}

#[test]
fn demo_without_a_terminal_finishes_with_nothing_lost() {
    let (code, out) = demo(&["--no-tty", "--requests", "50", "--seed", "7"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("lost: 0"), "{out}");
    assert!(out.contains("accepted: 50"), "{out}");
    assert!(out.contains("seed 7"), "{out}");
    // Plain progress lines, no cursor movement.
    assert!(out.contains("] sent "), "{out}");
    assert!(!out.contains('\x1b'), "{out}");
}

#[test]
fn demo_help_explains_every_flag() {
    let out = Command::new(env!("CARGO_BIN_EXE_spillway"))
        .args(["demo", "--help"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let help = String::from_utf8(out.stdout).unwrap();
    for flag in [
        "--requests",
        "--concurrency",
        "--seed",
        "--timeout",
        "--no-tty",
    ] {
        assert!(help.contains(flag), "{flag} missing from:\n{help}");
    }
}
