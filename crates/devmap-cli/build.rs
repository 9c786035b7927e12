//! Link options of the `devmap` binary that make it start in about a hello-world's time
//! (docs/performance.md, "Start-up"). Only the binary: the Python extension (crates/devmap-py)
//! links this crate as a library and keeps the platform's defaults.
//!
//! - `-no-pie`: a position-dependent executable has its ~17,000 relative relocations resolved by
//!   the linker, so the loader neither applies them nor copies the pages they touch at start.
//! - a static libstdc++ (HiGHS is C++): its ~2,000 symbol relocations and the loading of the
//!   shared library go away. highs-sys asks for `-lstdc++`; a search folder holding only
//!   `libstdc++.a`, listed before the compiler's own, makes the linker take the archive.
//!
//! Set `DEVMAP_DYNAMIC_LINK=1` to build the binary with the platform's defaults (for comparison).

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=DEVMAP_DYNAMIC_LINK");
    println!("cargo:rerun-if-env-changed=CXX");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.ends_with("linux-gnu") || std::env::var_os("DEVMAP_DYNAMIC_LINK").is_some() {
        return;
    }
    println!("cargo:rustc-link-arg-bins=-no-pie");
    match static_libstdcxx() {
        Some(dir) => println!("cargo:rustc-link-arg-bins=-L{}", dir.display()),
        None => println!(
            "cargo:warning=libstdc++.a not found (`c++ -print-file-name=libstdc++.a`): the devmap \
             binary links libstdc++ dynamically and starts about 1 ms slower"
        ),
    }
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
    let dir = PathBuf::from(std::env::var_os("OUT_DIR")?).join("static-libstdcxx");
    std::fs::create_dir_all(&dir).ok()?;
    let link = dir.join("libstdc++.a");
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(&archive, &link).ok()?;
    Some(dir)
}
