//! devmap-py: the native module `devmap._devmap` behind the `devmap` Python package.
//!
//! A thin layer: Python builds one JSON request (python/devmap/__init__.py), [`ops`] composes
//! devmap-core and devmap-solver exactly as the CLI does, and a JSON answer comes back. Errors
//! become `devmap._devmap.NativeError(kind, message)`, which the package re-raises as the
//! `devmap.DevmapError` subclass named by [`error::Kind`]. The solve runs without the GIL.

pub mod error;
pub mod ops;
pub mod request;

use pyo3::create_exception;
use pyo3::exceptions::PyException;
use pyo3::prelude::*;

use crate::request::Request;

create_exception!(
    _devmap,
    NativeError,
    PyException,
    "A failed request: args are (kind, message); devmap re-raises it as a DevmapError subclass."
);

fn run(
    py: Python<'_>,
    request: &str,
    op: fn(&Request) -> error::Result<serde_json::Value>,
) -> PyResult<String> {
    let answer = py.detach(|| Request::from_json(request).and_then(|r| op(&r)));
    match answer {
        Ok(value) => Ok(value.to_string()),
        Err(e) => Err(NativeError::new_err((e.kind.name(), e.message))),
    }
}

/// Plan a request (JSON); returns the plan report as JSON.
#[pyfunction]
fn plan(py: Python<'_>, request: &str) -> PyResult<String> {
    run(py, request, ops::plan)
}

/// Check a request's `device_map` (JSON); returns the check report as JSON.
#[pyfunction]
fn check(py: Python<'_>, request: &str) -> PyResult<String> {
    run(py, request, ops::check)
}

/// Run every strategy on a request (JSON); returns the rows as JSON.
#[pyfunction]
fn compare(py: Python<'_>, request: &str) -> PyResult<String> {
    run(py, request, ops::compare)
}

/// Run the `devmap` command with `argv` (program name first) and return its exit status: the
/// entry of the wheel's `devmap` script (python/devmap/_cli.py). The command runs without the GIL.
#[pyfunction]
fn cli(py: Python<'_>, argv: Vec<std::ffi::OsString>) -> u8 {
    py.detach(|| devmap_cli::run(argv))
}

/// The native module.
#[pymodule]
fn _devmap(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_function(wrap_pyfunction!(plan, m)?)?;
    m.add_function(wrap_pyfunction!(check, m)?)?;
    m.add_function(wrap_pyfunction!(compare, m)?)?;
    m.add_function(wrap_pyfunction!(cli, m)?)?;
    m.add("NativeError", m.py().get_type::<NativeError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
