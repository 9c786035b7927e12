//! Compiles csrc/highs_init.c, which runs HiGHS' C++ static initialisers when the binary deferred
//! them (the `devmap` binary does: crates/devmap-cli/build.rs, docs/performance.md "Start-up").
//! Only for linux-gnu, the one target the devmap binary defers them on; elsewhere
//! `highs_init::ensure_highs_initialised` has nothing to run.

fn main() {
    println!("cargo:rerun-if-changed=csrc/highs_init.c");
    println!("cargo:rustc-check-cfg=cfg(devmap_highs_init_shim)");
    let target = std::env::var("TARGET").unwrap_or_default();
    if !target.ends_with("linux-gnu") {
        return;
    }
    cc::Build::new()
        .file("csrc/highs_init.c")
        .warnings(true)
        .compile("devmap_highs_init");
    println!("cargo:rustc-cfg=devmap_highs_init_shim");
}
