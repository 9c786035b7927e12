//! The one error type of devmap-solver.

use devmap_core::{format_bytes, Device};

/// Why a strategy produced no plan.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The model does not fit the named devices and no disk budget was given.
    #[error(
        "the model does not fit: {} would have to go to disk, which has no budget{} \
         (add disk=SIZE to --max-memory to allow disk offload, or pass --compat to spill like Hugging Face)",
        format_bytes(*shortfall),
        by_device_note(devices)
    )]
    DoesNotFit {
        /// Bytes that found no room.
        shortfall: u64,
        /// Devices that had budgets, with their budgets.
        devices: Vec<(Device, u64)>,
    },
    /// A strategy name devmap does not know (or one not available yet).
    #[error("unknown strategy {name:?}{note}; available: {available}")]
    UnknownStrategy {
        /// The name as given.
        name: String,
        /// Why, when known.
        note: String,
        /// The available names.
        available: String,
    },
    /// A `--compat` value other than transformers/accelerate.
    #[error("unknown compat path {0:?}; expected \"transformers\" or \"accelerate\"")]
    UnknownCompat(String),
    /// A case where Hugging Face itself raises; reproduced as an error with the reason.
    #[error("Hugging Face's planner fails here: {0}")]
    HfRaises(String),
    /// Hugging Face's quantizer rejects the map its planner computed (`validate_environment`).
    #[error("Hugging Face's {method} quantizer rejects the map its planner computed: ValueError: {message}")]
    QuantizerRejects {
        /// The `quant_method`.
        method: String,
        /// The exception's message, exactly as transformers 5.23 words it.
        message: String,
        /// The map it rejects.
        map: Box<devmap_core::DeviceMap>,
    },
    /// A quantized model whose quantizer forbids cpu/disk does not fit the GPUs.
    #[error(
        "the quantized model does not fit: short by {} on {} (weights and KV cache need {}; room after reserves and activations{}: {}){}; \
         {rule}",
        format_bytes(*shortfall),
        gpu_names(gpus),
        format_bytes(*need),
        if *load_transient > 0 { ", or for the weights while loading" } else { "" },
        by_device_list(gpus),
        load_transient_note(*load_transient)
    )]
    QuantizedDoesNotFit {
        /// Bytes the GPUs lack.
        shortfall: u64,
        /// Bytes the GPUs must hold (weights, KV cache).
        need: u64,
        /// The GPUs and their room for units.
        gpus: Vec<(Device, u64)>,
        /// The quantizer's rule that keeps weights off cpu and disk.
        rule: String,
        /// Bytes each GPU keeps free while the quantizer converts its largest tensor on load
        /// (0 when nothing is quantized on load).
        load_transient: u64,
    },
    /// A quantized model this strategy cannot plan yet (named method or path).
    #[error("{0}")]
    QuantUnsupported(String),
    /// A strategy asked for a device that has no budget.
    #[error("device {0} has no memory budget (give it one in --max-memory)")]
    NoBudget(Device),
    /// A budget set with no device at all.
    #[error("no devices: give at least one budget in --max-memory")]
    NoDevices,
    /// A `--pin` that matches nothing, conflicts, or cannot be honoured.
    #[error("{0}")]
    BadPin(String),
    /// No placement satisfies the budgets (with the shortfall when the total is short).
    #[error("no placement fits the budgets: {0}")]
    Infeasible(String),
    /// The time limit ran out before any plan was found (not a proof that none exists).
    #[error(
        "no plan found within the time limit of {0:?} (none is proven impossible: raise --time-limit)"
    )]
    NoPlanInTime(std::time::Duration),
    /// HiGHS failed.
    #[error("solver: {0}")]
    Solver(String),
    /// Input data error from devmap-core.
    #[error(transparent)]
    Core(#[from] devmap_core::Error),
}

fn gpu_names(gpus: &[(Device, u64)]) -> String {
    let names: Vec<String> = gpus.iter().map(|(d, _)| d.to_string()).collect();
    match names.len() {
        1 => format!("GPU {}", names[0]),
        _ => format!("GPUs {}", names.join("+")),
    }
}

fn load_transient_note(load_transient: u64) -> String {
    if load_transient == 0 {
        return String::new();
    }
    format!(
        "; quantizing on load peaks at the weights plus {}, the transient of converting the largest tensor",
        format_bytes(load_transient)
    )
}

fn by_device_list(devices: &[(Device, u64)]) -> String {
    let parts: Vec<String> = devices
        .iter()
        .map(|(d, b)| format!("{d}={}", format_bytes(*b)))
        .collect();
    parts.join(", ")
}

fn by_device_note(devices: &[(Device, u64)]) -> String {
    if devices.is_empty() {
        return String::new();
    }
    let parts: Vec<String> = devices
        .iter()
        .map(|(d, b)| format!("{d}={}", format_bytes(*b)))
        .collect();
    format!(" (budgets: {})", parts.join(", "))
}
