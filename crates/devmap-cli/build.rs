//! Link options of the `devmap` binary that make it start in about a hello-world's time
//! (docs/performance.md, "Start-up"). Only the binary: the Python extension (crates/devmap-py)
//! and the test binaries link these crates as libraries and keep the platform's defaults.
//!
//! - `-no-pie`: a position-dependent executable has its ~17,000 relative relocations resolved by
//!   the linker, so the loader neither applies them nor copies the pages they touch at start.
//! - a static libstdc++ (HiGHS is C++): its ~2,000 symbol relocations and the loading of the
//!   shared library go away. highs-sys asks for `-lstdc++`; a search folder holding only
//!   `libstdc++.a`, listed before the compiler's own, makes the linker take the archive.
//! - a static unwinder: rustc asks for `-lgcc_s`; the same kind of folder holding `libgcc_s.a`,
//!   a link to the compiler's `libgcc_eh.a` (the unwinder `libgcc_s.so.1` exports; the binary
//!   takes nothing else from it), spares the loader a library (`-static-libgcc` of C++ builds).
//!   Only with the static libstdc++, so that Rust panics and HiGHS' C++ exceptions share it.
//! - lazy binding (`-z lazy`, after rustc's `-z now`): the ~140 functions the binary imports are
//!   looked up when first called rather than all at start; `--version` calls a few dozen.
//! - HiGHS' C++ static initialisers deferred to the first solve: the linker script fragment
//!   `highs-init.ld` moves the `.init_array` entries of highs-sys' objects into a section of their
//!   own that devmap-solver runs once before calling HiGHS (`devmap_solver::highs_init`).
//!
//! The package then sees `DEVMAP_HIGHS_INIT_DEFERRED`, `DEVMAP_STATIC_UNWINDER` and
//! `DEVMAP_LAZY_BINDING` (`env!`) set to `1` or `0`: what the binary was linked with.
//!
//! Each option but `-no-pie` is probed first: a small program is linked through the same rustc,
//! target, linker and flags with the option and run (when the target is this host); when that
//! fails, a cargo warning says so and the binary links without it. Set `DEVMAP_DYNAMIC_LINK=1`
//! to build the binary with the platform's defaults (for comparison), `DEVMAP_EAGER_HIGHS_INIT=1`
//! to keep only HiGHS' initialisers at start-up, `DEVMAP_EAGER_BINDING=1` to keep rustc's
//! `-z now`, or `DEVMAP_DYNAMIC_UNWINDER=1` to keep `libgcc_s.so.1`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    for var in [
        "DEVMAP_DYNAMIC_LINK",
        "DEVMAP_EAGER_HIGHS_INIT",
        "DEVMAP_EAGER_BINDING",
        "DEVMAP_DYNAMIC_UNWINDER",
        "CXX",
        "CC",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-changed=highs-init.ld");
    let target = std::env::var("TARGET").unwrap_or_default();
    let linux_gnu = target.ends_with("linux-gnu");
    let defaults = !linux_gnu || std::env::var_os("DEVMAP_DYNAMIC_LINK").is_some();
    let (mut static_unwinder, mut lazy) = (false, false);
    if !defaults {
        link_arg("-no-pie");
        match static_library_folder("static-libstdcxx", "libstdc++.a", "libstdc++.a") {
            Some(dir) => {
                link_arg(&format!("-L{}", dir.display()));
                static_unwinder = !opted_out("DEVMAP_DYNAMIC_UNWINDER") && link_unwinder(&dir);
            }
            None => println!(
                "cargo:warning=libstdc++.a not found (`c++ -print-file-name=libstdc++.a`): the \
                 devmap binary links libstdc++ dynamically and starts about 1 ms slower"
            ),
        }
        lazy = !opted_out("DEVMAP_EAGER_BINDING") && lazy_binding();
    }
    let deferred = !defaults && !opted_out("DEVMAP_EAGER_HIGHS_INIT") && defer_highs_init();
    // What was applied, for tests/startup.rs to check in the binary's dynamic section.
    for (var, applied) in [
        ("DEVMAP_HIGHS_INIT_DEFERRED", deferred),
        ("DEVMAP_STATIC_UNWINDER", static_unwinder),
        ("DEVMAP_LAZY_BINDING", lazy),
    ] {
        println!("cargo:rustc-env={var}={}", u8::from(applied));
    }
}

/// An argument for the `devmap` binary's link only.
fn link_arg(arg: &str) {
    println!("cargo:rustc-link-arg-bins={arg}");
}

fn opted_out(var: &str) -> bool {
    std::env::var_os(var).is_some()
}

/// A folder in OUT_DIR whose only file, `name`, is a link to the C++ compiler's `archive`, so that
/// `-l` of that name finds the static archive before the compiler's folders (and their `.so`).
fn static_library_folder(folder: &str, name: &str, archive: &str) -> Option<PathBuf> {
    let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let out = Command::new(cxx)
        .arg(format!("-print-file-name={archive}"))
        .output()
        .ok()?;
    let archive = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    if !archive.is_absolute() || !archive.exists() {
        return None;
    }
    let dir = out_dir().join(folder);
    std::fs::create_dir_all(&dir).ok()?;
    let link = dir.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&archive, &link).ok()?;
    Some(dir)
}

/// Links the unwinder statically if a probe whose Rust panic and C++ exception are both caught
/// links and runs with it (beside the static libstdc++ in `libstdcxx_dir`); whether it did.
fn link_unwinder(libstdcxx_dir: &Path) -> bool {
    let Some(dir) = static_library_folder("static-libgcc", "libgcc_s.a", "libgcc_eh.a") else {
        println!(
            "cargo:warning=libgcc_eh.a not found (`c++ -print-file-name=libgcc_eh.a`): the \
             devmap binary loads libgcc_s.so.1 at start"
        );
        return false;
    };
    let probe = unwind_probe_archive().and_then(|archive| {
        let args = [
            archive.display().to_string(),
            format!("-L{}", libstdcxx_dir.display()),
            format!("-L{}", dir.display()),
            "-lstdc++".to_string(),
            "-lgcc_s".to_string(),
        ];
        probe_program("unwind", UNWIND_PROBE_MAIN, &args)
    });
    match probe {
        Ok(()) => {
            link_arg(&format!("-L{}", dir.display()));
            true
        }
        Err(why) => {
            println!(
                "cargo:warning=the devmap binary loads libgcc_s.so.1 at start: the static \
                 unwinder probe failed: {why}"
            );
            false
        }
    }
}

/// Binds imported functions on first call (`-z lazy` overrides rustc's earlier `-z now`) if a
/// probe links and runs with it; whether it does.
fn lazy_binding() -> bool {
    const FLAG: &str = "-Wl,-z,lazy";
    match probe_program("lazy", PLAIN_PROBE_MAIN, &[FLAG.to_string()]) {
        Ok(()) => {
            link_arg(FLAG);
            true
        }
        Err(why) => {
            println!(
                "cargo:warning=the devmap binary binds all its imports at start: the {FLAG} \
                 probe failed: {why}"
            );
            false
        }
    }
}

/// Passes `highs-init.ld` to the binary's link if the probe shows this toolchain honours it.
fn defer_highs_init() -> bool {
    let script = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default())
        .join("highs-init.ld");
    match probe_init_deferral(&script) {
        Ok(()) => {
            link_arg("-T");
            link_arg(&script.display().to_string());
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

/// Links the Rust program `main` (in OUT_DIR/probe-`name`) through rustc with the target, linker
/// and flags cargo uses, `-no-pie` and `link_args`, and runs it when the target is this host.
fn probe_program(name: &str, main: &str, link_args: &[String]) -> Result<(), String> {
    let dir = out_dir().join(format!("probe-{name}"));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let source = dir.join("probe.rs");
    std::fs::write(&source, main).map_err(|e| format!("{}: {e}", source.display()))?;
    let exe = dir.join("probe");
    let mut rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
    rustc
        .arg(&source)
        .arg("-o")
        .arg(&exe)
        .arg("--target")
        .arg(env("TARGET")?);
    rustc.args(encoded_rustflags());
    if let Ok(linker) = std::env::var("RUSTC_LINKER") {
        rustc.arg(format!("-Clinker={linker}"));
    }
    for arg in std::iter::once("-no-pie").chain(link_args.iter().map(String::as_str)) {
        rustc.arg(format!("-Clink-arg={arg}"));
    }
    run(&mut rustc)?;
    if std::env::var("HOST").ok() == std::env::var("TARGET").ok() {
        run(&mut Command::new(&exe))?;
    }
    Ok(())
}

/// Links a program through `highs-init.ld` and an archive named like highs-sys' rlib holding one
/// static initialiser and a check, and runs it: the initialiser must not have run at start, and
/// must run once from the section's bounds.
fn probe_init_deferral(script: &Path) -> Result<(), String> {
    let dir = out_dir().join("probe-highs-init");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let archive = probe_archive(&dir)?;
    let args = [
        "-T".to_string(),
        script.display().to_string(),
        archive.display().to_string(),
    ];
    probe_program("highs-init", PROBE_MAIN, &args)
}

/// `libhighs_sys-probe.rlib` (an `ar` archive, as an rlib is) of one C object: a static
/// initialiser and `devmap_probe_deferral`, which checks it was deferred and then runs the section.
fn probe_archive(dir: &Path) -> Result<PathBuf, String> {
    let c = Compiler::new("CC", "cc");
    compiled_archive(dir, &c, "probe_init.c", PROBE_C, "libhighs_sys-probe.rlib")
}

/// `libdevmap_unwind_probe.a` of one C++ object whose `devmap_probe_cxx_throw` throws and catches.
fn unwind_probe_archive() -> Result<PathBuf, String> {
    let dir = out_dir().join("probe-unwind");
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let cxx = Compiler::new("CXX", "c++");
    compiled_archive(
        &dir,
        &cxx,
        "throw.cc",
        UNWIND_PROBE_CXX,
        "libdevmap_unwind_probe.a",
    )
}

/// A C or C++ compiler: the environment's choice, else the platform's default name.
struct Compiler(String);

impl Compiler {
    fn new(var: &str, default: &str) -> Self {
        Compiler(std::env::var(var).unwrap_or_else(|_| default.to_string()))
    }
}

/// Compiles `text` (saved as `file` in `dir`) position-independently and archives the object.
fn compiled_archive(
    dir: &Path,
    compiler: &Compiler,
    file: &str,
    text: &str,
    archive: &str,
) -> Result<PathBuf, String> {
    let source = dir.join(file);
    std::fs::write(&source, text).map_err(|e| format!("{}: {e}", source.display()))?;
    let object = source.with_extension("o");
    run(Command::new(&compiler.0)
        .arg("-c")
        .arg("-fPIC")
        .arg(&source)
        .arg("-o")
        .arg(&object))?;
    let archive = dir.join(archive);
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

const PLAIN_PROBE_MAIN: &str = r#"
fn main() {
    println!("probe");
}
"#;

const UNWIND_PROBE_CXX: &str = r#"
extern "C" int devmap_probe_cxx_throw() {
    try {
        throw 7;
    } catch (int value) {
        return value == 7 ? 0 : 1;
    }
    return 2;
}
"#;

const UNWIND_PROBE_MAIN: &str = r#"
extern "C" {
    fn devmap_probe_cxx_throw() -> i32;
}
fn main() {
    std::panic::set_hook(Box::new(|_| {}));
    let panic_caught = std::panic::catch_unwind(|| panic!("probe")).is_err();
    let cxx = unsafe { devmap_probe_cxx_throw() };
    std::process::exit(if panic_caught && cxx == 0 { 0 } else { 10 + cxx });
}
"#;
