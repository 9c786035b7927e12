//! What the Python layer sends: one JSON request per call, turned into the library's inputs the
//! way the CLI turns its flags into them.

use std::path::Path;
use std::time::Duration;

use devmap_core::cost::{Objective, OffloadMemory, Topology};
use devmap_core::{
    load_model, DType, Device, DeviceMap, Manifest, MemoryBudgets, Model, ModelConfig,
};
use devmap_solver::{strategy_by_name, Auto, AutoOptions, Compat, Strategy};
use serde::Deserialize;

use crate::error::{Error, Kind, Result};

/// Where the model comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ModelSource {
    /// A checkpoint folder, `.safetensors` file, index or manifest file.
    Path(String),
    /// A manifest read from a live `torch.nn.Module`, with its `config.to_dict()` when it has one.
    Module {
        /// The `devmap-manifest/1` document.
        manifest: Box<Manifest>,
        /// The model's config (for KV-cache sizing).
        #[serde(default)]
        config: Option<serde_json::Value>,
    },
}

/// One call's arguments (python/devmap/__init__.py builds it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The model.
    pub model: ModelSource,
    /// accelerate's `max_memory` dict with string keys; `None` discovers the GPUs here.
    #[serde(default)]
    pub max_memory: Option<serde_json::Value>,
    /// A strategy name ([`devmap_solver::STRATEGY_NAMES`]).
    #[serde(default = "default_strategy")]
    pub strategy: String,
    /// Classes or name patterns replacing the model's no-split classes.
    #[serde(default)]
    pub no_split: Vec<String>,
    /// Target dtype.
    #[serde(default)]
    pub dtype: Option<String>,
    /// KV cache, `batch=B,seq=S[,dtype=D]`.
    #[serde(default)]
    pub kv_cache: Option<String>,
    /// The CLI's `--workload`: `batch=B,prompt=P,new=N[,dtype=D]` or `none`; with neither this
    /// nor `kv_cache`, the CLI's default workload.
    #[serde(default)]
    pub workload: Option<String>,
    /// `latency` or `throughput`.
    #[serde(default)]
    pub objective: Option<String>,
    /// Memory to keep free per device (a `max_memory`-style dict).
    #[serde(default)]
    pub reserve: Option<serde_json::Value>,
    /// `(map key, device)` pins for `auto`.
    #[serde(default)]
    pub pins: Vec<(String, String)>,
    /// A topology JSON file.
    #[serde(default)]
    pub topology: Option<String>,
    /// `transformers` or `accelerate`.
    #[serde(default)]
    pub compat: Option<String>,
    /// The runtime that executes the map: `accelerate` (pageable offload) or `pinned` (the CLI's
    /// `--runtime`); `None`: the topology's own `runtime.offload_memory`.
    #[serde(default)]
    pub runtime: Option<String>,
    /// `auto`'s time limit, seconds.
    #[serde(default)]
    pub time_limit: Option<f64>,
    /// Whether `auto` may split streamed blocks by module (`None`: the default, on; the CLI's
    /// `--split-blocks`).
    #[serde(default)]
    pub split_blocks: Option<bool>,
    /// The map to check (`check` only).
    #[serde(default)]
    pub device_map: Option<serde_json::Value>,
}

fn default_strategy() -> String {
    "auto".to_string()
}

impl Request {
    /// Parse the JSON the Python layer sends.
    pub fn from_json(text: &str) -> Result<Request> {
        serde_json::from_str(text).map_err(|e| Error::new(Kind::Argument, format!("request: {e}")))
    }

    /// The model, with `no_split` applied.
    pub fn model(&self) -> Result<Model> {
        let mut model = match &self.model {
            ModelSource::Path(p) => load_model(Path::new(p))
                .map_err(|e| Error::new(Kind::Model, format!("reading model {p}: {e}")))?,
            ModelSource::Module { manifest, config } => module_model(manifest, config)?,
        };
        if !self.no_split.is_empty() {
            model
                .set_no_split(&self.no_split)
                .map_err(|e| Error::new(Kind::Argument, e))?;
        }
        Ok(model)
    }

    /// The target dtype.
    pub fn dtype(&self) -> Result<Option<DType>> {
        self.dtype
            .as_deref()
            .map(|d| DType::parse(d).map_err(|e| Error::new(Kind::Argument, format!("dtype: {e}"))))
            .transpose()
    }

    /// The budgets given, or `None` when `max_memory` was not given.
    pub fn given_budgets(&self) -> Result<Option<MemoryBudgets>> {
        self.max_memory
            .as_ref()
            .map(|v| budgets_from_json(v, "max_memory"))
            .transpose()
    }

    /// The budgets given, or those of the GPUs here (with their topology) like the CLI.
    pub fn budgets(&self) -> Result<(MemoryBudgets, Option<Topology>)> {
        match self.given_budgets()? {
            Some(b) => Ok((b, None)),
            None => discovered_budgets(),
        }
    }

    /// The compat path.
    pub fn compat(&self) -> Result<Option<Compat>> {
        match self.compat.as_deref() {
            None => Ok(None),
            Some("transformers") => Ok(Some(Compat::Transformers)),
            Some("accelerate") => Ok(Some(Compat::Accelerate)),
            Some(other) => Err(devmap_solver::Error::UnknownCompat(other.to_string()).into()),
        }
    }

    /// Where the runtime copies offloaded weights from, when `runtime` was given.
    fn offload_memory(&self) -> Result<Option<OffloadMemory>> {
        match self.runtime.as_deref() {
            None => Ok(None),
            Some("accelerate") => Ok(Some(OffloadMemory::Pageable)),
            Some("pinned") => Ok(Some(OffloadMemory::Pinned)),
            Some(other) => Err(Error::new(
                Kind::Argument,
                format!("runtime {other:?} is not \"accelerate\" or \"pinned\""),
            )),
        }
    }

    /// `auto`'s options; a discovered topology applies unless a topology file was given.
    pub fn auto_options(&self, model: &Model, discovered: Option<Topology>) -> Result<AutoOptions> {
        let arg = |e: devmap_core::Error| Error::new(Kind::Argument, e);
        let mut o = AutoOptions::default();
        match (&self.topology, discovered) {
            (Some(path), _) => o.topology = Topology::read(Path::new(path)).map_err(arg)?,
            (None, Some(t)) => o.topology = t,
            (None, None) => {}
        }
        if let Some(memory) = self.offload_memory()? {
            o.topology.runtime.offload_memory = memory;
        }
        o.objective = match self.objective.as_deref() {
            None | Some("latency") => Objective::Latency,
            Some("throughput") => Objective::Throughput,
            Some(other) => {
                return Err(Error::new(
                    Kind::Argument,
                    format!("objective {other:?} is not \"latency\" or \"throughput\""),
                ))
            }
        };
        if let Some(v) = &self.reserve {
            for b in budgets_from_json(v, "reserve")?.iter() {
                o.reserve.push((b.device, b.bytes));
            }
        }
        let choice = devmap_cli::resolve_workload(
            self.workload.as_deref(),
            self.kv_cache.as_deref(),
            model,
            self.dtype()?,
        )
        .map_err(|e| Error::new(Kind::Argument, format!("workload: {e:#}")))?;
        o = o.workload(choice.workload);
        for (key, device) in &self.pins {
            let device = Device::parse(device)
                .map_err(|e| Error::new(Kind::Argument, format!("pins[{key:?}]: {e}")))?;
            o.pins.push((key.clone(), device));
        }
        if let Some(t) = self.time_limit {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::new(
                    Kind::Argument,
                    format!("time_limit {t} must be a positive number of seconds"),
                ));
            }
            o.time_limit = Duration::from_secs_f64(t);
        }
        if let Some(split) = self.split_blocks {
            o.split_blocks = split;
        }
        Ok(o)
    }

    /// The strategy, chosen as `devmap plan` chooses it.
    pub fn strategy(&self, options: AutoOptions) -> Result<Box<dyn Strategy>> {
        let compat = self.compat()?;
        Ok(match (self.strategy.as_str(), compat) {
            ("auto", None) => Box::new(Auto::new(options)),
            // With a compat path, "auto" reproduces Hugging Face, whose "auto" is "balanced".
            ("auto", Some(_)) => strategy_by_name("balanced", compat)?,
            (name, _) => strategy_by_name(name, compat)?,
        })
    }

    /// The map to check.
    pub fn device_map(&self) -> Result<DeviceMap> {
        let value = self
            .device_map
            .as_ref()
            .ok_or_else(|| Error::new(Kind::Argument, "check needs a device_map"))?;
        DeviceMap::from_json_str(&value.to_string()).map_err(|e| Error::new(Kind::Map, e))
    }
}

fn module_model(manifest: &Manifest, config: &Option<serde_json::Value>) -> Result<Model> {
    let origin = Path::new("<module>");
    let mut model = manifest
        .clone()
        .into_model(origin)
        .map_err(|e| Error::new(Kind::Model, format!("reading the module: {e}")))?;
    if let Some(raw) = config.clone().filter(serde_json::Value::is_object) {
        let config = ModelConfig { raw };
        if model.hidden_size.is_none() {
            model.hidden_size = config.hidden_size();
        }
        model.config = Some(config);
    }
    Ok(model)
}

/// accelerate's dict (string keys), or the CLI's `0=22GiB,cpu=64GiB` spec as a string.
fn budgets_from_json(value: &serde_json::Value, what: &str) -> Result<MemoryBudgets> {
    match value {
        serde_json::Value::String(spec) => MemoryBudgets::parse(spec),
        other => MemoryBudgets::from_json_str(&other.to_string(), Path::new(what)),
    }
    .map_err(|e| Error::new(Kind::Budget, e))
}

fn discovered_budgets() -> Result<(MemoryBudgets, Option<Topology>)> {
    use devmap_cuda::budgets::{default_budgets, topology, Reserve};
    match devmap_cuda::discover() {
        Ok(inv) => Ok((
            default_budgets(&inv, &Reserve::default()),
            Some(topology(&inv, &[])),
        )),
        Err(e) if e.is_no_gpu() => Err(Error::new(
            Kind::Budget,
            format!(
                "max_memory is required here: {e}, so budgets cannot be discovered; give budgets \
                 such as max_memory={{0: \"22GiB\", 1: \"22GiB\", \"cpu\": \"64GiB\"}} to plan for \
                 GPUs that are elsewhere"
            ),
        )),
        Err(e) => Err(Error::new(
            Kind::Budget,
            format!("discovering GPUs for default budgets: {e}"),
        )),
    }
}
