//! Helpers every CLI test file needs: the repository root, the `devmap` binary, its output as text.
//! Each test file uses only some of them.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository root.
pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A test path as a command-line argument.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("test paths are UTF-8")
}

/// Run the `devmap` binary built for these tests.
pub fn devmap(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_devmap"))
        .args(args)
        .output()
        .expect("the devmap binary runs")
}

/// Captured output as text.
pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}
