//! The one error type of devmap-py: a kind (which Python exception class) and the CLI's message.

/// Which Python exception an [`Error`] becomes (`devmap.<Class>`, see python/devmap/_errors.py).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A malformed argument (dtype, strategy, compat, workload, pins, topology, request shape).
    Argument,
    /// A malformed `max_memory`, or budgets that cannot be discovered.
    Budget,
    /// The model cannot be read.
    Model,
    /// A device map that cannot be parsed (`check`).
    Map,
    /// No plan satisfies the request.
    Plan,
    /// The model does not fit the budgets (no disk budget).
    DoesNotFit,
}

impl Kind {
    /// The name the Python side maps to a class.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Argument => "argument",
            Kind::Budget => "budget",
            Kind::Model => "model",
            Kind::Map => "map",
            Kind::Plan => "plan",
            Kind::DoesNotFit => "does_not_fit",
        }
    }
}

/// A failure of a request, carrying the message the CLI prints for the same input.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct Error {
    /// Which exception class it becomes.
    pub kind: Kind,
    /// The message.
    pub message: String,
}

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: Kind, message: impl std::fmt::Display) -> Error {
        Error {
            kind,
            message: message.to_string(),
        }
    }
}

impl From<devmap_solver::Error> for Error {
    fn from(e: devmap_solver::Error) -> Error {
        use devmap_solver::Error as S;
        let kind = match &e {
            S::DoesNotFit { .. } => Kind::DoesNotFit,
            S::UnknownStrategy { .. } | S::UnknownCompat(_) | S::BadPin(_) => Kind::Argument,
            S::NoBudget(_) | S::NoDevices => Kind::Budget,
            S::Core(_) => Kind::Model,
            _ => Kind::Plan,
        };
        Error::new(kind, e)
    }
}

/// Result alias for devmap-py.
pub type Result<T, E = Error> = std::result::Result<T, E>;
