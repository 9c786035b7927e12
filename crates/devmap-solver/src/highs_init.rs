//! HiGHS' C++ static initialisers, deferred to the first solve.
//!
//! HiGHS' ~170 translation units each build the `std::string`s their headers define at start-up,
//! which is most of what a `devmap --version` spent beyond a hello-world. The `devmap` binary is
//! linked so that the C library skips them, and libstdc++'s own when it is linked statically
//! (crates/devmap-cli/highs-init.ld); they run here, once, before the first call into HiGHS. In any other program (tests, the Python extension)
//! there is nothing deferred and this does nothing. docs/performance.md, "Start-up".

use std::sync::OnceLock;

#[cfg(devmap_highs_init_shim)]
#[allow(unsafe_code)] // one call into csrc/highs_init.c; OnceLock makes it the only one.
fn run_deferred() -> usize {
    extern "C" {
        fn devmap_run_deferred_highs_init() -> usize;
    }
    // SAFETY: the shim takes no arguments and runs each deferred initialiser once, in link order,
    // as the C library would have at start-up; `ensure_highs_initialised` calls it at most once
    // per process and before any HiGHS code.
    unsafe { devmap_run_deferred_highs_init() }
}

#[cfg(not(devmap_highs_init_shim))]
fn run_deferred() -> usize {
    0
}

/// Runs HiGHS' deferred static initialisers if this process deferred them, once per process
/// (later and concurrent calls wait for the first one), and returns how many there were: 0 when
/// the C library already ran them at start-up. Every entry into HiGHS calls this first.
pub fn ensure_highs_initialised() -> usize {
    static DEFERRED: OnceLock<usize> = OnceLock::new();
    *DEFERRED.get_or_init(run_deferred)
}
