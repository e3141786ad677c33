//! `spillway check -c FILE`: validate a config without starting anything.

use std::path::Path;
use std::process::ExitCode;

use crate::config::RouteConfig;

/// Prints `ok` and the routes, or every error; exit code 0 or 1.
pub fn run(path: &Path) -> ExitCode {
    match crate::config::load(path) {
        Ok(config) => {
            println!("ok");
            for route in &config.routes {
                println!("{}", describe(route));
            }
            ExitCode::SUCCESS
        }
        Err(errs) => {
            eprintln!("{errs}");
            ExitCode::from(1)
        }
    }
}

/// One line per route: what it catches and where it goes, so a reviewer can spot a
/// wrong order or upstream at a glance.
fn describe(route: &RouteConfig) -> String {
    let mode = if route.deferrable {
        "deferrable"
    } else {
        "passthrough"
    };
    let m = &route.matcher;
    let host = match &m.host {
        Some(h) if h.host.contains(':') => match h.port {
            Some(p) => format!("[{}]:{p}", h.host),
            None => format!("[{}]", h.host),
        },
        Some(h) => match h.port {
            Some(p) => format!("{}:{p}", h.host),
            None => h.host.clone(),
        },
        None => "*".to_string(),
    };
    let path = m.path_prefix.as_deref().unwrap_or("/");
    let methods = match &m.methods {
        Some(ms) => ms.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(","),
        None => "*".to_string(),
    };
    format!(
        "{}\t{mode}\thost={host} path={path} methods={methods}\t-> {}://{}{}",
        route.name,
        route.upstream.scheme.as_str(),
        route.upstream.authority,
        route.upstream.base_path
    )
}
