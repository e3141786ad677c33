//! `spillway repair -c FILE` (or `--path STORE`): copies every readable job, dead letter,
//! idempotency key, route pause and quota count of a damaged store into a fresh file, keeps
//! the damaged original beside it, and prints what was saved and skipped.
//!
//! Exit codes: 0 repaired, 1 bad config, 2 nothing repaired (the message says why and what
//! to do; the file is unchanged).

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;

use std::sync::Arc;

use crate::queue::crypt::Sealer;
use crate::queue::redb::repair::{repair_with, RepairError, RepairReport};
use crate::queue::StoreError;

#[derive(Args, Debug)]
#[command(group(clap::ArgGroup::new("store").required(true).args(["config", "path"])))]
pub struct RepairArgs {
    /// The YAML config file; repairs the file its `storage.path` names.
    #[arg(short, long, env = "SPILLWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// The store file itself, instead of a config.
    #[arg(long)]
    pub path: Option<PathBuf>,
}

pub fn run(args: RepairArgs) -> ExitCode {
    let (path, sealer) = match (&args.path, &args.config) {
        (Some(p), _) => (p.clone(), None),
        (None, Some(c)) => match crate::config::load(c) {
            // With the config come its encryption keys, so sealed jobs are saved too.
            Ok(config) => match config.storage.encryption.as_ref().map(Sealer::load) {
                None => (config.storage.path, None),
                Some(Ok(s)) => (config.storage.path, Some(Arc::new(s))),
                Some(Err(e)) => {
                    eprintln!("spillway repair: {e}");
                    return ExitCode::from(1);
                }
            },
            Err(errs) => {
                eprintln!("{errs}");
                return ExitCode::from(1);
            }
        },
        (None, None) => {
            eprintln!("spillway repair: give the config (-c FILE) or the store (--path FILE)");
            return ExitCode::from(1);
        }
    };
    // redb may panic on pages corrupted outside it; repair catches that per table, and the
    // default hook would print each caught panic as if the program had crashed.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let result = repair_with(&path, sealer);
    std::panic::set_hook(hook);
    match result {
        Ok(report) => {
            print!("{}", describe(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("spillway repair: {e}");
            if let RepairError::Missing { .. } | RepairError::Empty { .. } = e {
                return ExitCode::SUCCESS;
            }
            ExitCode::from(2)
        }
    }
}

/// The report as the operator reads it.
pub fn describe(r: &RepairReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(out, "repaired {}", r.path.display());
    let _ = writeln!(
        out,
        "  the damaged original is kept as {}",
        r.damaged_kept_as.display()
    );
    let _ = writeln!(out, "  read by: {}", r.method);
    let mut states: Vec<_> = r.jobs_saved.iter().collect();
    states.sort();
    let by_state = states
        .iter()
        .map(|(s, n)| format!("{n} {s}"))
        .collect::<Vec<_>>()
        .join(", ");
    let _ = writeln!(
        out,
        "  jobs saved: {}{}",
        r.jobs_total(),
        if by_state.is_empty() {
            String::new()
        } else {
            format!(" ({by_state})")
        }
    );
    let _ = writeln!(
        out,
        "  jobs skipped (unreadable records): {}",
        r.jobs_skipped
    );
    let _ = writeln!(
        out,
        "  idempotency keys saved: {}, rebuilt from their job: {}, skipped: {}",
        r.keys_saved, r.keys_rebuilt, r.keys_skipped
    );
    let _ = writeln!(
        out,
        "  route pause records saved: {}, skipped: {}; quota counters saved: {}",
        r.route_records_saved, r.route_records_skipped, r.quotas_saved
    );
    for n in &r.notes {
        let _ = writeln!(out, "  note: {n}");
    }
    let _ = writeln!(
        out,
        "  jobs on pages that could not be read are not counted above; start spillway to deliver what was saved"
    );
    out
}

/// What an operator should do about a store that stops spillway from starting; `None` for
/// errors that need no advice beyond their message.
pub fn hint(e: &StoreError) -> Option<String> {
    match e {
        StoreError::Corrupt { path, .. } => Some(format!(
            "the file was left as it is. To recover the readable jobs into a fresh file (the damaged one is kept beside it), stop spillway and run: spillway repair --path {}",
            shell_quote(path)
        )),
        StoreError::AlreadyOpen { path } => Some(format!(
            "another process holds {}: stop the other spillway, or give this one its own storage.path",
            path.display()
        )),
        StoreError::NewerSchema { .. } => Some(
            "run the newer spillway that wrote it; the file was left as it is".to_owned(),
        ),
        _ => None,
    }
}

fn shell_quote(p: &Path) -> String {
    let s = p.display().to_string();
    if s.chars()
        .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,".contains(c))
    {
        s
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}
