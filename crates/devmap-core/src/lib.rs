//! devmap-core: the data devmap plans with, and nothing that plans.
//!
//! - [`model`]: the module tree and tensor table ([`Model`]), sizes under Hugging Face's dtype rules.
//! - [`load`]: read a model from safetensors files, checkpoint folders or a `devmap-manifest/1` JSON.
//! - [`registry`], [`rebuild`]: the architecture registry and rebuilding a checkpoint as the model
//!   transformers builds.
//! - [`budget`]: devices and memory budgets in accelerate's `max_memory` syntax.
//! - [`device_map`]: [`DeviceMap`], accelerate's device-map dict, with `clean`.
//! - [`validate`](mod@validate): what is wrong with a map (coverage, overlaps, no-split, ties, budgets).
//! - [`memory`]: the memory model (workload, KV cache, activations, streaming buffers).
//! - [`graph`]: the petgraph DAG of modules and placement units.
//! - [`quant`]: quantization configs and the rules quantizers apply before planning.
//! - [`quant_check`]: pre-quantized tensors checked against their quantization_config.
//! - [`quant_size`]: the bytes a quantized model's tensors take at runtime, where quantizers let them go.
//! - [`synthetic`]: generated dense, MoE and encoder-decoder models and budgets for benches and tests.
//!
//! No solver and no CUDA live here; `devmap-solver`, `devmap-offload` and `devmap-cuda` build on it.
//!
//! ```
//! use devmap_core::{DType, Device, DeviceMap, MemoryBudgets, ModelBuilder, SizeRules};
//!
//! let model = ModelBuilder::new("tiny")
//!     .module("embed", "Embedding")
//!     .module("head", "Linear")
//!     .param("embed.weight", DType::F16, &[1000, 64])
//!     .param("head.weight", DType::F16, &[1000, 64])
//!     .build()?;
//! let budgets = MemoryBudgets::parse("0=200KiB,cpu=1GiB")?;
//! let mut map = DeviceMap::new();
//! map.insert("embed", Device::Gpu(0));
//! map.insert("head", Device::Cpu);
//! let report = devmap_core::validate(&model, &map, Some(&budgets), SizeRules::default());
//! assert!(report.is_valid());
//! assert_eq!(report.usage[&Device::Gpu(0)], 128_000);
//! # Ok::<(), devmap_core::Error>(())
//! ```

pub mod budget;
pub mod config;
pub mod cost;
pub mod decode;
pub mod device_map;
pub mod dtype;
pub mod error;
pub mod expr;
pub mod graph;
pub mod load;
pub mod manifest;
pub mod memory;
pub mod model;
pub mod quant;
pub mod quant_check;
pub mod quant_size;
pub mod rebuild;
pub mod registry;
pub mod safetensors;
pub mod synthetic;
pub mod validate;

pub use budget::{format_bytes, parse_memory_size, Device, MemoryBudget, MemoryBudgets};
pub use config::ModelConfig;
pub use cost::{CostModel, Estimate, Exec, KvCacheSpec, Objective, Topology};
pub use device_map::DeviceMap;
pub use dtype::DType;
pub use error::{Error, Result};
pub use load::{load_model, load_model_from, load_model_with, Loaded, RegistrySource};
pub use manifest::Manifest;
pub use memory::{Workload, WorkloadMemory};
pub use model::{
    Model, ModelBuilder, Module, ModuleId, Node, SizeRules, Tensor, TensorId, TensorKind,
};
pub use quant::{QuantConfig, Quantization};
pub use registry::Registry;
pub use validate::{validate, Problem, Report};
