//! `spillway check -c FILE`: validate a config without starting anything.

use std::path::Path;
use std::process::ExitCode;

/// Prints `ok` and the routes, or every error; exit code 0 or 1.
pub fn run(path: &Path) -> ExitCode {
    match crate::config::load(path) {
        Ok(_) => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Err(errs) => {
            eprintln!("{errs}");
            ExitCode::from(1)
        }
    }
}
