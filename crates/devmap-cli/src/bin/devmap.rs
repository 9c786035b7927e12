//! The `devmap` binary: the command of the devmap-cli library ([`devmap_cli::run`]).

use std::process::ExitCode;

fn main() -> ExitCode {
    ExitCode::from(devmap_cli::run(std::env::args_os()))
}
