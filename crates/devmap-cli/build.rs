//! Link options of the `devmap` binary that make it start in about a hello-world's time
//! (docs/performance.md, "Start-up"). Only the binary: the Python extension (crates/devmap-py)
//! and the test binaries link these crates as libraries and keep the platform's defaults.
//!
//! - `-no-pie`: a position-dependent executable has its ~17,000 relative relocations resolved by
//!   the linker, so the loader neither applies them nor copies the pages they touch at start.
//! - a static libstdc++ (HiGHS is C++): its ~2,000 symbol relocations and the loading of the
//!   shared library go away. highs-sys asks for `-lstdc++`; a search folder holding only
//!   `libstdc++.a`, listed before the compiler's own, makes the linker take the archive.
//! - HiGHS' C++ static initialisers deferred to the first solve: the linker script fragment
//!   `highs-init.ld` moves the `.init_array` entries of highs-sys' objects into a section of their
//!   own that devmap-solver runs once before calling HiGHS (`devmap_solver::highs_init`). A probe
//!   first links and runs a small program through the same rustc and linker with the same
//!   fragment; when that fails, a warning says so and HiGHS initialises at start-up as usual.
//!   The package then sees `DEVMAP_HIGHS_INIT_DEFERRED` (`env!`) set to `1` or `0`.
//!
//! Set `DEVMAP_DYNAMIC_LINK=1` to build the binary with the platform's defaults (for comparison),
//! or `DEVMAP_EAGER_HIGHS_INIT=1` to keep only HiGHS' initialisers at start-up.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DEVMAP_DYNAMIC_LINK");
    println!("cargo:rerun-if-env-changed=DEVMAP_EAGER_HIGHS_INIT");
    println!("cargo:rerun-if-env-changed=CXX");
    println!("cargo:rerun-if-env-changed=CC");
    println!("cargo:rerun-if-changed=highs-init.ld");
    let target = std::env::var("TARGET").unwrap_or_default();
    let linux_gnu = target.ends_with("linux-gnu");
    let defaults = !linux_gnu || std::env::var_os("DEVMAP_DYNAMIC_LINK").is_some();
    if !defaults {
        println!("cargo:rustc-link-arg-bins=-no-pie");
        match static_libstdcxx() {
            Some(dir) => println!("cargo:rustc-link-arg-bins=-L{}", dir.display()),
            None => println!(
                "cargo:warning=libstdc++.a not found (`c++ -print-file-name=libstdc++.a`): the \
                 devmap binary links libstdc++ dynamically and starts about 1 ms slower"
            ),
        }
    }
    let deferred =
        !defaults && std::env::var_os("DEVMAP_EAGER_HIGHS_INIT").is_none() && defer_highs_init();
    println!(
        "cargo:rustc-env=DEVMAP_HIGHS_INIT_DEFERRED={}",
        u8::from(deferred)
    );
}

/// A folder in OUT_DIR whose only file is a link to the C++ compiler's `libstdc++.a`.
fn static_libstdcxx() -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let out = Command::new(cxx)
        .arg("-print-file-name=libstdc++.a")
        .output()
        .ok()?;
    let archive = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    if !archive.is_absolute() || !archive.exists() {
        return None;
    }
    let dir = out_dir().join("static-libstdcxx");
    std::fs::create_dir_all(&dir).ok()?;
    let link = dir.join("libstdc++.a");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&archive, &link).ok()?;
    Some(dir)
}

/// Passes `highs-init.ld` to the binary's link if the probe shows this toolchain honours it.
fn defer_highs_init() -> bool {
    let script = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("highs-init.ld");
    match probe_init_deferral(&script) {
        Ok(()) => {
            println!("cargo:rustc-link-arg-bins=-T");
            println!("cargo:rustc-link-arg-bins={}", script.display());
            true
        }
        Err(why) => {
            println!(
                "cargo:warning=HiGHS' static initialisers stay at start-up (the devmap binary \
                 starts ~1 ms slower): the linker script probe failed: {why}"
            );
            false
        }
    }
}

/// Builds, with the C compiler, an archive named like highs-sys' rlib holding one static
/// initialiser and a check, links it into a Rust program through rustc (with the target, linker
/// and flags cargo uses) and `highs-init.ld`, and runs it when the target is this host: the
/// initialiser must not have run at start, and must run once from the section's bounds.
fn probe_init_deferral(script: &Path) -> Result<(), String> {
    let dir = out_dir().join("highs-init-probe");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let archive = probe_archive(&dir)?;
    let main = dir.join("probe.rs");
    std::fs::write(&main, PROBE_MAIN).map_err(|e| format!("{}: {e}", main.display()))?;
    let exe = dir.join("probe");
    let mut rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    rustc
        .arg(&main)
        .arg("-o")
        .arg(&exe)
        .arg("--target")
        .arg(env("TARGET")?);
    rustc.args(encoded_rustflags());
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    for arg in [
        "-no-pie",
        "-T",
        &script.display().to_string(),
        &archive.display().to_string(),
    ] {
        rustc.arg(format!("-Clink-arg={arg}"));
    }
    run(&mut rustc)?;
    if std::env::var("HOST").ok() == std::env::var("TARGET").ok() {
        run(&mut Command::new(&exe))?;
    }
    Ok(())
}

/// `libhighs_sys-probe.rlib` (an `ar` archive, as an rlib is) of one C object: a static
/// initialiser and `devmap_probe_deferral`, which checks it was deferred and then runs the section.
fn probe_archive(dir: &Path) -> Result<PathBuf, String> {
    let source = dir.join("probe_init.c");
    std::fs::write(&source, PROBE_C).map_err(|e| format!("{}: {e}", source.display()))?;
    let object = dir.join("probe_init.o");
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    run(Command::new(cc)
        .arg("-c")
        .arg("-fPIC")
        .arg(&source)
        .arg("-o")
        .arg(&object))?;
    let archive = dir.join("libhighs_sys-probe.rlib");
    let _ = std::fs::remove_file(&archive);
    let ar = std::env::var("AR").unwrap_or_else(|_| "ar".to_string());
    run(Command::new(ar).arg("crs").arg(&archive).arg(&object))?;
    Ok(archive)
}

/// The flags cargo passes rustc for this target (`-C linker=...`, `-C link-arg=-fuse-ld=...`).
fn encoded_rustflags() -> Vec<String> {
    std::env::var("CARGO_ENCODED_RUSTFLAGS")
        .map(|flags| {
            flags
                .split('\x1f')
                .filter(|f| !f.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

fn run(command: &mut Command) -> Result<(), String> {
    let out = command
        .output()
        .map_err(|e| format!("{:?}: {e}", command.get_program()))?;
    if out.status.success() {
        return Ok(());
    }
    Err(format!(
        "{:?} exited with {}: {}",
        command.get_program(),
        out.status,
        error_lines(&String::from_utf8_lossy(&out.stderr))
    ))
}

/// The lines of a failed command's stderr that say what failed (the linker's, under rustc's).
fn error_lines(stderr: &str) -> String {
    let lines: Vec<&str> = stderr
        .lines()
        .map(|l| l.trim().trim_start_matches("= note:").trim())
        .filter(|l| {
            l.contains("error") && !l.contains("aborting due to") && !l.contains("collect2")
        })
        .take(3)
        .collect();
    lines.join("; ")
}

fn out_dir() -> PathBuf {
    PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR for build scripts"))
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("{name} is not set"))
}

const PROBE_C: &str = r#"
typedef void (*init_fn)(void);
extern const init_fn __devmap_highs_init_start[] __attribute__((weak));
extern const init_fn __devmap_highs_init_end[] __attribute__((weak));
static int initialised;
__attribute__((constructor)) static void probe_initialiser(void) { ++initialised; }
int devmap_probe_deferral(void) {
    if (initialised != 0) return 1;
    if (__devmap_highs_init_start == 0 || __devmap_highs_init_end - __devmap_highs_init_start != 1)
        return 2;
    for (const init_fn *f = __devmap_highs_init_start; f < __devmap_highs_init_end; ++f) (*f)();
    return initialised == 1 ? 0 : 3;
}
"#;

const PROBE_MAIN: &str = r#"
extern "C" {
    fn devmap_probe_deferral() -> i32;
}
fn main() {
    std::process::exit(unsafe { devmap_probe_deferral() });
}
"#;
