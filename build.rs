//! Link settings for the `spillway` binary.
//!
//! Packed relative relocations (`DT_RELR`): a position-independent binary otherwise carries
//! one 24-byte `.rela.dyn` entry per pointer to relocate (~680 KiB here), which the loader
//! reads, and so keeps resident, at every start. Packed, they take ~8 KiB, and idle RSS
//! drops by about as much (benches/README.md, "Tenth look": where idle RSS is). Only glibc
//! 2.36 and later can load such a binary; the linker then also records that need
//! (`GLIBC_ABI_DT_RELR`), so an older glibc refuses it with a clear message instead of
//! running it unrelocated. Enabled only when building for the build machine's own glibc and
//! that glibc is new enough; cross builds and older systems link as before.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SPILLWAY_PACKED_RELOCS");
    let var = |k: &str| std::env::var(k).unwrap_or_default();
    let wanted = !matches!(
        var("SPILLWAY_PACKED_RELOCS").as_str(),
        "0" | "off" | "false"
    );
    let native_gnu = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        && var("HOST") == var("TARGET");
    if wanted && native_gnu && host_glibc().is_some_and(|v| v >= (2, 36)) {
        println!("cargo:rustc-link-arg-bins=-Wl,-z,pack-relative-relocs");
    }
}

/// The build machine's glibc version, from `getconf GNU_LIBC_VERSION` ("glibc 2.36").
fn host_glibc() -> Option<(u32, u32)> {
    let out = Command::new("getconf")
        .arg("GNU_LIBC_VERSION")
        .output()
        .ok()?;
    let text = String::from_utf8(out.stdout).ok()?;
    let version = text.trim().strip_prefix("glibc ")?;
    let mut parts = version.split('.');
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}
