//! The cost model: the estimated time of one decode step (batch 1) when accelerate's runtime
//! executes a device map. docs/cost-model.md explains every term and default.
//!
//! - A unit on a GPU reads its weights at that GPU's memory bandwidth, and pays eager PyTorch's
//!   fixed cost for each module it runs ([`Runtime::eager_module_seconds`]).
//! - A unit on `cpu` runs on the main GPU ([`main_gpu_of`]: the lowest GPU id the map uses).
//!   accelerate copies its weights there on every step, one tensor at a time, from the state dict
//!   in pageable RAM ([`Topology::stream_link`]), with a hook per module
//!   ([`Runtime::offload_hook_seconds`]); `disk` adds the read through the page cache before that.
//! - Each change of execution device between consecutive units moves the activation bytes over
//!   the link between the two devices, plus the link's latency.
//!
//! Objectives: [`Objective::Latency`] sums everything; [`Objective::Throughput`] is the busiest
//! execution device's share, what bounds a pipelined server.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::budget::Device;
use crate::decode::TensorReads;
use crate::device_map::DeviceMap;
use crate::error::{Error, Result};
use crate::graph::{flows, units, Flow};
use crate::model::{Model, ModuleId, SizeRules, TensorId, TensorKind};
use crate::validate::tensor_devices;

/// A link's sustained bandwidth and fixed latency.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Link {
    /// Bytes per second.
    pub bandwidth: f64,
    /// Seconds per transfer.
    pub latency: f64,
}

/// One GPU's profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GpuProfile {
    /// A name for reports.
    #[serde(default)]
    pub name: String,
    /// Memory bandwidth, bytes per second.
    pub memory_bandwidth: f64,
    /// Link to the host (PCIe) for copies from pinned memory (DMA at the link's speed).
    #[serde(default)]
    pub host_link: Option<Link>,
    /// Link to the host for copies from pageable memory (the driver stages them through its own
    /// pinned buffer): what accelerate's offloaded weights travel over.
    #[serde(default)]
    pub pageable_host_link: Option<Link>,
}

/// Device profiles and links. Defaults are in [`Topology::default`]; `--topology FILE` overrides them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Topology {
    /// Per-GPU profiles by index; GPUs not listed use `default_gpu`.
    #[serde(default)]
    pub gpus: BTreeMap<u32, GpuProfile>,
    /// Profile of unlisted GPUs.
    pub default_gpu: GpuProfile,
    /// Pinned host link of GPUs that do not give one.
    pub default_host_link: Link,
    /// Pageable host link of GPUs that do not give one.
    pub default_pageable_host_link: Link,
    /// GPU-to-GPU links by `"a-b"` (symmetric); unlisted pairs use `default_peer_link`.
    #[serde(default)]
    pub peer_links: BTreeMap<String, Link>,
    /// GPU-to-GPU link of unlisted pairs.
    pub default_peer_link: Link,
    /// Host memory bandwidth (used only when no GPU exists and the cpu executes).
    pub cpu_memory_bandwidth: f64,
    /// Disk read bandwidth, bytes per second: accelerate reads offloaded tensors through the
    /// page cache (`safe_open` + `get_tensor`, a copy), so a warm cache reads at memcpy speed.
    pub disk_read_bandwidth: f64,
    /// Constants of the runtime that executes the map (accelerate's hooks, eager PyTorch).
    #[serde(default)]
    pub runtime: Runtime,
}

/// The host memory that offloaded weights are copied from on every step.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OffloadMemory {
    /// Ordinary pageable RAM: accelerate keeps cpu-mapped weights in a plain state dict.
    #[default]
    Pageable,
    /// Page-locked RAM (an engine that pins its offloaded weights, as `devmap load` does).
    Pinned,
}

/// Constants of the runtime that executes a map, per module with direct tensors (accelerate
/// hooks each such module and copies its tensors one by one). Missing fields take the defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Runtime {
    /// Where offloaded weights are copied from.
    pub offload_memory: OffloadMemory,
    /// Seconds of hook work per streamed module and step (accelerate's `AlignDevicesHook`
    /// `pre_forward`/`post_forward`, beyond the copies themselves).
    pub offload_hook_seconds: f64,
    /// Seconds per executed module and step that eager PyTorch spends beyond reading the weights
    /// (Python dispatch and kernel launches of batch-1 decode).
    pub eager_module_seconds: f64,
    /// [`Runtime::eager_module_seconds`] for the architectures measured on their own, by
    /// config.json's `model_type` (`scripts/calibrate_runtime.py` with that architecture's
    /// config): a T5 decoder spends about twice a Llama decoder's time per module.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub eager_module_seconds_by_model_type: BTreeMap<String, f64>,
    /// Passes over a layer's KV cache per decode step at the executing GPU's memory bandwidth:
    /// the cache's growth and attention's reads, as measured (`scripts/calibrate_runtime.py`
    /// times a decode step at a long and a short context), [`KV_PASSES_PER_STEP`] by default.
    pub kv_passes_per_step: f64,
    /// Where these figures come from (a free-form note written by the calibration).
    pub source: String,
}

const GB: f64 = 1e9;

impl Default for Runtime {
    /// Measured on one H200 with transformers 5.17 and accelerate 1.15 (docs/cost-model.md).
    fn default() -> Self {
        Runtime {
            offload_memory: OffloadMemory::Pageable,
            offload_hook_seconds: DEFAULT_OFFLOAD_HOOK_SECONDS,
            eager_module_seconds: DEFAULT_EAGER_MODULE_SECONDS,
            eager_module_seconds_by_model_type: BTreeMap::new(),
            kv_passes_per_step: KV_PASSES_PER_STEP as f64,
            source: String::new(),
        }
    }
}

/// Default [`Runtime::offload_hook_seconds`] (docs/cost-model.md gives the measurement).
pub const DEFAULT_OFFLOAD_HOOK_SECONDS: f64 = 110e-6;
/// Default [`Runtime::eager_module_seconds`] (docs/cost-model.md gives the measurement).
pub const DEFAULT_EAGER_MODULE_SECONDS: f64 = 68e-6;

impl Default for Topology {
    /// Defaults (sources in docs/cost-model.md): a generic data-center GPU at 2.0 TB/s (between
    /// A100-80GB's 2.04 and H100-PCIe's 2.0 TB/s), PCIe 4.0 x16 host links at 25 GB/s sustained with
    /// 10 µs per transfer from pinned memory, pageable copies at 7.5 GB/s and 7 µs (fitted to the
    /// decode steps of 22 maps measured on an H200, docs/validation.md), GPU peers over PCIe at 20 GB/s and 15 µs, host RAM at 50 GB/s, disk at 5 GB/s, and
    /// [`Runtime::default`].
    fn default() -> Self {
        Topology {
            gpus: BTreeMap::new(),
            default_gpu: GpuProfile {
                name: "generic GPU".into(),
                memory_bandwidth: 2000.0 * GB,
                host_link: None,
                pageable_host_link: None,
            },
            default_host_link: Link {
                bandwidth: 25.0 * GB,
                latency: 10e-6,
            },
            default_pageable_host_link: Link {
                bandwidth: 7.5 * GB,
                latency: 7e-6,
            },
            peer_links: BTreeMap::new(),
            default_peer_link: Link {
                bandwidth: 20.0 * GB,
                latency: 15e-6,
            },
            cpu_memory_bandwidth: 50.0 * GB,
            disk_read_bandwidth: 5.0 * GB,
            runtime: Runtime::default(),
        }
    }
}

impl Topology {
    /// Read a topology JSON file (see docs/cost-model.md); missing fields take the defaults.
    pub fn read(path: &Path) -> Result<Topology> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(path, e.to_string()))?;
        let defaults = serde_json::to_value(Topology::default())
            .map_err(|e| Error::json(path, e.to_string()))?;
        let (Some(obj), Some(def)) = (value.as_object_mut(), defaults.as_object()) else {
            return Err(Error::json(path, "a topology must be a JSON object"));
        };
        for (k, v) in def {
            obj.entry(k.clone()).or_insert_with(|| v.clone());
        }
        let topo: Topology =
            serde_json::from_value(value).map_err(|e| Error::json(path, e.to_string()))?;
        topo.check().map_err(|reason| Error::json(path, reason))?;
        Ok(topo)
    }

    fn check(&self) -> std::result::Result<(), String> {
        let positive = |what: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be a positive number, got {v}"))
            }
        };
        positive(
            "default_gpu.memory_bandwidth",
            self.default_gpu.memory_bandwidth,
        )?;
        for (i, g) in &self.gpus {
            positive(&format!("gpus.{i}.memory_bandwidth"), g.memory_bandwidth)?;
        }
        positive("cpu_memory_bandwidth", self.cpu_memory_bandwidth)?;
        positive("disk_read_bandwidth", self.disk_read_bandwidth)?;
        let non_negative = |what: &str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{what} must be a non-negative number, got {v}"))
            }
        };
        non_negative(
            "runtime.offload_hook_seconds",
            self.runtime.offload_hook_seconds,
        )?;
        non_negative(
            "runtime.eager_module_seconds",
            self.runtime.eager_module_seconds,
        )?;
        for (model_type, &v) in &self.runtime.eager_module_seconds_by_model_type {
            non_negative(
                &format!("runtime.eager_module_seconds_by_model_type.{model_type}"),
                v,
            )?;
        }
        non_negative(
            "runtime.kv_passes_per_step",
            self.runtime.kv_passes_per_step,
        )?;
        // Every link, not only the defaults: a zero bandwidth or a negative latency anywhere gives
        // infinite or negative times, which the MIP cannot use.
        let link = |what: &str, l: &Link| {
            positive(&format!("{what}.bandwidth"), l.bandwidth)?;
            if l.latency.is_finite() && l.latency >= 0.0 {
                Ok(())
            } else {
                Err(format!(
                    "{what}.latency must be a non-negative number, got {}",
                    l.latency
                ))
            }
        };
        link("default_host_link", &self.default_host_link)?;
        link("default_peer_link", &self.default_peer_link)?;
        link(
            "default_pageable_host_link",
            &self.default_pageable_host_link,
        )?;
        for (i, g) in &self.gpus {
            if let Some(l) = &g.host_link {
                link(&format!("gpus.{i}.host_link"), l)?;
            }
            if let Some(l) = &g.pageable_host_link {
                link(&format!("gpus.{i}.pageable_host_link"), l)?;
            }
        }
        for (k, l) in &self.peer_links {
            if parse_pair(k).is_none() {
                return Err(format!(
                    "peer_links key {k:?} is not \"A-B\" with GPU indices"
                ));
            }
            link(&format!("peer_links.{k}"), l)?;
        }
        Ok(())
    }

    /// Memory bandwidth of GPU `i`.
    pub fn gpu_bandwidth(&self, i: u32) -> f64 {
        self.gpus
            .get(&i)
            .map_or(self.default_gpu.memory_bandwidth, |g| g.memory_bandwidth)
    }

    /// Pinned host link of GPU `i` (DMA copies; activations to and from the host).
    pub fn host_link(&self, i: u32) -> Link {
        self.gpus
            .get(&i)
            .and_then(|g| g.host_link)
            .unwrap_or(self.default_host_link)
    }

    /// Pageable host link of GPU `i`.
    pub fn pageable_host_link(&self, i: u32) -> Link {
        self.gpus
            .get(&i)
            .and_then(|g| g.pageable_host_link)
            .unwrap_or(self.default_pageable_host_link)
    }

    /// The link offloaded weights are streamed to GPU `i` over: pageable or pinned, as
    /// [`Runtime::offload_memory`] says.
    pub fn stream_link(&self, i: u32) -> Link {
        match self.runtime.offload_memory {
            OffloadMemory::Pageable => self.pageable_host_link(i),
            OffloadMemory::Pinned => self.host_link(i),
        }
    }

    /// Link between GPUs `a` and `b`.
    pub fn peer_link(&self, a: u32, b: u32) -> Link {
        for (k, l) in &self.peer_links {
            if let Some((x, y)) = parse_pair(k) {
                if (x, y) == (a, b) || (x, y) == (b, a) {
                    return *l;
                }
            }
        }
        self.default_peer_link
    }
}

fn parse_pair(k: &str) -> Option<(u32, u32)> {
    let (a, b) = k.split_once('-')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

/// What a plan is judged by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Objective {
    /// Time of one decode step: everything summed.
    #[default]
    Latency,
    /// The busiest execution device's time (pipelined serving).
    Throughput,
}

/// Where a unit executes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Exec {
    /// On a GPU.
    Gpu(u32),
    /// On the host (only when the plan has no GPU).
    Cpu,
}

/// accelerate's main device for a map using `devices`: the lowest GPU id among them, or `None` when
/// the map uses no GPU (then the host executes everything). `dispatch_model` takes the first of the
/// set of non-offloaded devices, which for GPU indices is the lowest. The one rule devmap uses.
pub fn main_gpu_of(devices: impl IntoIterator<Item = Device>) -> Option<u32> {
    devices
        .into_iter()
        .filter_map(|d| match d {
            Device::Gpu(i) => Some(i),
            _ => None,
        })
        .min()
}

/// The cost model: a topology, an objective, the main GPU, and the activation size per token.
#[derive(Debug, Clone, PartialEq)]
pub struct CostModel {
    /// Device profiles and links.
    pub topology: Topology,
    /// What is minimised.
    pub objective: Objective,
    /// The GPU that executes cpu/disk-mapped units (accelerate's main device, [`main_gpu_of`]);
    /// `None` when there is no GPU. [`CostModel::evaluate`] takes it from the map it estimates.
    pub main_gpu: Option<u32>,
    /// Activation bytes of one token (hidden size × activation dtype bytes): what a residual
    /// edge moves per decode step when its ends run on different devices.
    pub activation_bytes: u64,
    /// Tokens of the encoded sequence an encoder-decoder sends to each cross-attention unit per
    /// decode step ([`crate::graph::FlowKind::EncoderOutput`]): the workload's batch × prompt
    /// ([`CostModel::with_workload`]), 1 without a workload.
    pub encoder_tokens: u64,
    /// KV-cache bytes of each decoder layer under the workload estimated
    /// ([`CostModel::with_workload`]; empty: no cache). `auto` charges the same bytes through
    /// [`UnitRead::kv`] of its units.
    pub kv_layers: Vec<u64>,
}

impl CostModel {
    /// A cost model for `model` on `devices` (the main GPU is the lowest GPU id listed: pass the
    /// devices the plan uses, or [`CostModel::with_main_gpu`] it).
    pub fn new(
        model: &Model,
        devices: &[Device],
        topology: Topology,
        objective: Objective,
    ) -> CostModel {
        let act_dtype = model.float_dtype().map_or(2, |d| d.size_bytes());
        let mut topology = topology;
        let model_type = model.config.as_ref().and_then(|c| c.model_type());
        if let Some(&own) =
            model_type.and_then(|m| (topology.runtime.eager_module_seconds_by_model_type).get(m))
        {
            topology.runtime.eager_module_seconds = own;
        }
        CostModel {
            topology,
            objective,
            main_gpu: main_gpu_of(devices.iter().copied()),
            // Saturating: `hidden_size` comes from a manifest or config.json.
            activation_bytes: model.hidden_size.unwrap_or(0).saturating_mul(act_dtype),
            encoder_tokens: 1,
            kv_layers: Vec::new(),
        }
    }

    /// The same model estimating decode steps of `workload`: its KV cache is read where each
    /// layer executes ([`Runtime::kv_passes_per_step`]), and an encoder-decoder's cross-attention units
    /// receive batch × prompt encoded tokens per step. Errors as [`crate::memory::WorkloadMemory::new`].
    pub fn with_workload(
        self,
        model: &Model,
        workload: Option<&crate::memory::Workload>,
    ) -> Result<CostModel> {
        let kv_layers = match workload {
            Some(w) => crate::memory::WorkloadMemory::new(model, w)?.kv_layers,
            None => Vec::new(),
        };
        let encoder_tokens = workload.map_or(1, |w| w.batch.saturating_mul(w.prompt).max(1));
        Ok(CostModel {
            kv_layers,
            encoder_tokens,
            ..self
        })
    }

    /// The same model with another main GPU.
    pub fn with_main_gpu(&self, main_gpu: Option<u32>) -> CostModel {
        CostModel {
            main_gpu,
            ..self.clone()
        }
    }

    /// Where a unit mapped to `device` executes.
    pub fn exec(&self, device: Device) -> Exec {
        match device {
            Device::Gpu(i) => Exec::Gpu(i),
            _ => self.main_gpu.map_or(Exec::Cpu, Exec::Gpu),
        }
    }

    /// Seconds to run a unit mapped to `device` that reads `read` (docs/cost-model.md, "Terms").
    pub fn unit_seconds(&self, read: UnitRead, device: Device) -> f64 {
        let t = &self.topology;
        let eager = read.modules * t.runtime.eager_module_seconds;
        let exec_bandwidth = match self.exec(device) {
            Exec::Gpu(i) => t.gpu_bandwidth(i),
            Exec::Cpu => t.cpu_memory_bandwidth,
        };
        let kv = read.kv as f64 * t.runtime.kv_passes_per_step / exec_bandwidth;
        let copied = read.copied as f64;
        let weights = match (device, self.main_gpu) {
            (Device::Gpu(_), _) => read.bytes as f64 / exec_bandwidth,
            // Without a GPU the host executes: offloaded weights are read in place.
            (Device::Cpu, None) => read.bytes as f64 / exec_bandwidth,
            (Device::Disk, None) => {
                read.bytes as f64 / exec_bandwidth + copied / t.disk_read_bandwidth
            }
            // Copied to the main GPU, then read there as a resident unit would be.
            (Device::Cpu, Some(m)) => {
                read.bytes as f64 / exec_bandwidth + self.stream_seconds(read, m)
            }
            (Device::Disk, Some(m)) => {
                read.bytes as f64 / exec_bandwidth
                    + copied / t.disk_read_bandwidth
                    + self.stream_seconds(read, m)
            }
        };
        weights + eager + kv
    }

    /// Seconds to copy an offloaded unit's weights to GPU `gpu` as accelerate does on every step:
    /// one copy per tensor over the stream link, one hook per module.
    fn stream_seconds(&self, read: UnitRead, gpu: u32) -> f64 {
        let link = self.topology.stream_link(gpu);
        read.copied as f64 / link.bandwidth
            + read.tensors * link.latency
            + read.modules * self.topology.runtime.offload_hook_seconds
    }

    /// Seconds to move one token of activations from one execution device to another (0 if the
    /// same).
    pub fn transfer_seconds(&self, from: Exec, to: Exec) -> f64 {
        self.tokens_seconds(1, from, to)
    }

    /// Seconds to move `tokens` tokens of activations between execution devices (0 if the same).
    pub fn tokens_seconds(&self, tokens: u64, from: Exec, to: Exec) -> f64 {
        let link = match (from, to) {
            _ if from == to => return 0.0,
            (Exec::Gpu(a), Exec::Gpu(b)) => self.topology.peer_link(a, b),
            (Exec::Gpu(a), Exec::Cpu) | (Exec::Cpu, Exec::Gpu(a)) => self.topology.host_link(a),
            (Exec::Cpu, Exec::Cpu) => return 0.0,
        };
        self.activation_bytes.saturating_mul(tokens) as f64 / link.bandwidth + link.latency
    }

    /// Seconds `flow` costs per decode step when its ends execute on `from` and `to` (0 when they
    /// coincide or nothing crosses it per step).
    pub fn flow_seconds(&self, flow: &Flow, from: Exec, to: Exec) -> f64 {
        flow.tokens_per_step(self.encoder_tokens)
            .map_or(0.0, |k| self.tokens_seconds(k, from, to))
    }

    /// Estimate a device map (see [`Estimate`]) as accelerate runs it: the main GPU is the map's
    /// ([`main_gpu_of`] its devices), whatever `self.main_gpu` says. Uncovered tensors are treated
    /// as on the main device.
    pub fn evaluate(&self, model: &Model, map: &DeviceMap, rules: SizeRules) -> Estimate {
        let this = self.with_main_gpu(main_gpu_of(map.entries().iter().map(|(_, d)| *d)));
        this.evaluate_with_own_main(model, map, rules)
    }

    fn evaluate_with_own_main(&self, model: &Model, map: &DeviceMap, rules: SizeRules) -> Estimate {
        // Weights are read under every name, tied duplicates included (lm_head reads the embedding).
        let read = TensorReads::new(model, &model.read_sizes(rules));
        let devices = tensor_devices(model, map);
        let fallback = self.main_gpu.map_or(Device::Cpu, Device::Gpu);
        let units = units(model);
        let kv = crate::memory::kv_per_unit(model, &units, &self.kv_layers);
        let pieces: Vec<Vec<(Device, UnitRead)>> = (units.iter().zip(&kv))
            .map(|(unit, &kv)| {
                let mut groups: Vec<(Device, Vec<TensorId>)> = Vec::new();
                for &t in &unit.tensors {
                    let d = devices[t].unwrap_or(fallback);
                    match groups.iter_mut().find(|(g, _)| *g == d) {
                        Some(g) => g.1.push(t),
                        None => groups.push((d, vec![t])),
                    }
                }
                (groups.into_iter().enumerate())
                    .map(|(k, (d, ts))| {
                        let r = UnitRead::of(model, &ts, &read);
                        // A divided unit: its attention (and cache) runs with its first part.
                        (d, if k == 0 { r.with_kv(kv) } else { r })
                    })
                    .collect()
            })
            .collect();
        self.estimate_units(&pieces, &flows(model, &units))
    }

    /// Estimate a decode step: `pieces[i]` are unit `i`'s parts (device, what it reads) in order
    /// (one part unless a map divides the unit; consecutive parts on different devices pay a
    /// one-token transfer), and each flow between units whose ends execute on different devices
    /// pays [`CostModel::flow_seconds`] (from the last part of its upstream unit to the first of
    /// its downstream one). For the throughput objective a transfer is the receiver's time.
    pub fn estimate_units(&self, pieces: &[Vec<(Device, UnitRead)>], flows: &[Flow]) -> Estimate {
        let mut est = Estimate::default();
        let mut busy: BTreeMap<Exec, f64> = BTreeMap::new();
        let mut charge = |est: &mut Estimate, exec: Exec, t: f64| {
            *busy.entry(exec).or_default() += t;
            est.latency_seconds += t;
        };
        for unit in pieces {
            let mut prev: Option<Exec> = None;
            for &(device, read) in unit {
                let exec = self.exec(device);
                let mut t = self.unit_seconds(read, device);
                if prev.is_some_and(|p| p != exec) {
                    est.device_changes += 1;
                    t += self.transfer_seconds(prev.expect("checked"), exec);
                }
                if matches!(device, Device::Cpu | Device::Disk) && self.main_gpu.is_some() {
                    est.streamed_bytes += read.copied;
                }
                charge(&mut est, exec, t);
                prev = Some(exec);
            }
        }
        let end = |i: usize, last: bool| {
            let parts = &pieces[i];
            let part = if last { parts.last() } else { parts.first() };
            part.map(|&(d, _)| self.exec(d))
        };
        for flow in flows {
            let (Some(from), Some(to)) = (end(flow.from, true), end(flow.to, false)) else {
                continue;
            };
            let t = self.flow_seconds(flow, from, to);
            if from != to && flow.tokens_per_step(self.encoder_tokens).is_some() {
                est.device_changes += 1;
                charge(&mut est, to, t);
            }
        }
        est.busiest_seconds = busy.values().copied().fold(0.0, f64::max);
        est.objective_seconds = match self.objective {
            Objective::Latency => est.latency_seconds,
            Objective::Throughput => est.busiest_seconds,
        };
        est
    }
}

/// What one unit costs on one device in a decode step: the weight bytes it reads when resident
/// and copies when offloaded, the tensors and modules accelerate copies and hooks, and the KV
/// cache its attention works on (see [`crate::decode`] and docs/cost-model.md).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct UnitRead {
    /// Weight bytes read from GPU memory when the unit is resident (embedding rows gathered, `k`
    /// of `E` experts, nothing of an encoder).
    pub bytes: u64,
    /// Weight bytes accelerate copies to the execution device when the unit is offloaded.
    pub copied: u64,
    /// Tensor copies per step when offloaded (expected count: experts that are modules of their
    /// own are copied only when routed to).
    pub tensors: f64,
    /// Modules with direct parameters that run per step (each pays eager PyTorch's cost, and a
    /// hook when offloaded).
    pub modules: f64,
    /// KV-cache bytes the unit's attention works on per step, in the execution device's memory
    /// ([`Runtime::kv_passes_per_step`] passes over them).
    pub kv: u64,
}

/// Default passes over a layer's KV cache per decode step ([`Runtime::kv_passes_per_step`]):
/// transformers 5's `DynamicLayer.update` grows the cache with `torch.cat` (reads the old cache,
/// writes the new one) and attention reads it.
pub const KV_PASSES_PER_STEP: u64 = 3;

impl UnitRead {
    /// The read of `tensors` (ids into `model`) with their per-tensor decode costs `reads`
    /// ([`crate::decode::TensorReads`]); no KV cache ([`UnitRead::with_kv`] adds it).
    ///
    /// Only parameters are counted as tensors and module owners: accelerate streams no buffers
    /// (`offload_buffers=False`), and a buffer-only module (a rotary embedding) would otherwise
    /// count or not depending on whether the source lists its non-persistent buffer (a manifest
    /// does, a checkpoint does not).
    pub fn of(model: &Model, tensors: &[TensorId], reads: &TensorReads) -> UnitRead {
        let params: Vec<TensorId> = tensors
            .iter()
            .copied()
            .filter(|&t| model.tensor(t).kind == TensorKind::Param)
            .collect();
        // A module runs as often as its most frequent tensor says (all of a module's tensors
        // share one role in practice).
        let mut owners: Vec<(ModuleId, f64)> = params
            .iter()
            .map(|&t| (model.tensor(t).module, reads.runs[t]))
            .collect();
        owners.sort_unstable_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)));
        owners.dedup_by_key(|o| o.0);
        UnitRead {
            bytes: tensors.iter().map(|&t| reads.resident[t]).sum(),
            copied: tensors.iter().map(|&t| reads.copied[t]).sum(),
            tensors: params.iter().map(|&t| reads.runs[t]).sum(),
            modules: owners.iter().map(|o| o.1).sum(),
            kv: 0,
        }
    }

    /// The same read with `kv` bytes of KV cache worked on per step.
    pub fn with_kv(self, kv: u64) -> UnitRead {
        UnitRead { kv, ..self }
    }
}

/// The estimate of one decode step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Estimate {
    /// The objective's value, seconds.
    pub objective_seconds: f64,
    /// Sum of all unit and transfer times, seconds.
    pub latency_seconds: f64,
    /// Time of the busiest execution device, seconds.
    pub busiest_seconds: f64,
    /// Number of execution-device changes along the chain.
    pub device_changes: u32,
    /// Bytes streamed from cpu/disk on every step.
    pub streamed_bytes: u64,
}

/// KV-cache sizing: `batch=B,seq=S[,dtype=...]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KvCacheSpec {
    /// Batch size.
    pub batch: u64,
    /// Sequence length (prompt + generated tokens).
    pub seq: u64,
    /// Cache dtype (defaults to the model's float dtype).
    pub dtype: Option<crate::dtype::DType>,
}

impl KvCacheSpec {
    /// Parse `batch=1,seq=4096,dtype=bf16`.
    pub fn parse(text: &str) -> Result<KvCacheSpec> {
        let bad = |reason: String| Error::BudgetSpec {
            spec: text.to_string(),
            reason,
        };
        let mut spec = KvCacheSpec {
            batch: 1,
            seq: 0,
            dtype: None,
        };
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = item
                .split_once('=')
                .ok_or_else(|| bad(format!("{item:?} is not KEY=VALUE")))?;
            match k.trim() {
                "batch" => {
                    spec.batch = v
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("batch {v:?} is not an integer")))?
                }
                "seq" => {
                    spec.seq = v
                        .trim()
                        .parse()
                        .map_err(|_| bad(format!("seq {v:?} is not an integer")))?
                }
                "dtype" => spec.dtype = Some(crate::dtype::DType::parse(v)?),
                other => {
                    return Err(bad(format!(
                        "unknown key {other:?} (expected batch, seq, dtype)"
                    )))
                }
            }
        }
        if spec.seq == 0 {
            return Err(bad("seq must be given and positive".into()));
        }
        Ok(spec)
    }

    /// Bytes of K and V of the largest decoder layer, from config.json (see
    /// [`crate::memory::kv_bytes_per_layer`], which this delegates to).
    pub fn bytes_per_layer(&self, model: &Model) -> Result<u64> {
        let w = crate::memory::Workload::from_kv_cache(self);
        let terms = crate::memory::WorkloadMemory::new(model, &w)?;
        Ok(terms.kv_layers.iter().copied().max().unwrap_or(0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dtype::DType;
    use crate::model::ModelBuilder;

    fn chain() -> Model {
        ModelBuilder::new("t")
            .module("a", "L")
            .module("b", "L")
            .param("a.weight", DType::F16, &[1000])
            .param("b.weight", DType::F16, &[1000])
            .hidden_size(Some(10))
            .build()
            .unwrap()
    }

    /// Rates easy to compute by hand: 1 ms per module, 2 ms per hook, 3 ms per tensor copy.
    fn hand_topology() -> Topology {
        let mut t = Topology::default();
        t.runtime.eager_module_seconds = 1e-3;
        t.runtime.offload_hook_seconds = 2e-3;
        t.default_pageable_host_link = Link {
            bandwidth: 4e9,
            latency: 3e-3,
        };
        t
    }

    #[test]
    fn cpu_units_stream_from_pageable_memory_per_tensor_and_module() {
        let m = chain();
        let cm = CostModel::new(
            &m,
            &[Device::Gpu(0), Device::Cpu],
            hand_topology(),
            Objective::Latency,
        );
        let mut all_gpu = DeviceMap::new();
        all_gpu.insert("a", Device::Gpu(0));
        all_gpu.insert("b", Device::Gpu(0));
        let mut half = DeviceMap::new();
        half.insert("a", Device::Gpu(0));
        half.insert("b", Device::Cpu);
        let e1 = cm.evaluate(&m, &all_gpu, SizeRules::default());
        let e2 = cm.evaluate(&m, &half, SizeRules::default());
        assert_eq!(e1.device_changes, 0);
        assert_eq!(e2.device_changes, 0, "cpu units execute on the main GPU");
        assert_eq!(e2.streamed_bytes, 2000);
        // Two modules of 2000 bytes read at 2 TB/s, 1 ms of eager work each.
        let gpu_only = 2.0 * (2000.0 / 2000e9 + 1e-3);
        assert!((e1.latency_seconds - gpu_only).abs() < 1e-12);
        // b also crosses the pageable link: 2000 B at 4 GB/s, one tensor copy, one hook.
        let expected = gpu_only + 2000.0 / 4e9 + 3e-3 + 2e-3;
        assert!((e2.latency_seconds - expected).abs() < 1e-12);
        let pinned = Topology {
            runtime: Runtime {
                offload_memory: OffloadMemory::Pinned,
                ..hand_topology().runtime
            },
            ..hand_topology()
        };
        let cm = CostModel {
            topology: pinned,
            ..cm
        };
        let e3 = cm.evaluate(&m, &half, SizeRules::default());
        let expected = gpu_only + 2000.0 / 25e9 + 10e-6 + 2e-3;
        assert!((e3.latency_seconds - expected).abs() < 1e-12);
    }

    #[test]
    fn a_unit_read_counts_tensors_and_their_modules() {
        let m = ModelBuilder::new("t")
            .module("blk", "Block")
            .module("blk.q", "Linear")
            .module("blk.k", "Linear")
            .param("blk.q.weight", DType::F16, &[10])
            .param("blk.q.bias", DType::F16, &[2])
            .param("blk.k.weight", DType::F16, &[10])
            .module("blk.rope", "Rotary")
            .buffer("blk.rope.inv_freq", DType::F16, &[4])
            .build()
            .unwrap();
        let ids: Vec<TensorId> = (0..m.tensors().len()).collect();
        let read = TensorReads::new(&m, &m.read_sizes(SizeRules::default()));
        let r = UnitRead::of(&m, &ids, &read);
        assert_eq!(
            r,
            UnitRead {
                bytes: 2 * (10 + 2 + 10 + 4),
                copied: 2 * (10 + 2 + 10 + 4),
                tensors: 3.0,
                modules: 2.0,
                kv: 0,
            }
        );
    }

    #[test]
    fn kv_reads_are_three_passes_at_the_executing_gpus_bandwidth() {
        let m = chain();
        let mut topology = hand_topology();
        topology.gpus.insert(
            1,
            GpuProfile {
                name: "slow".into(),
                memory_bandwidth: 1e12,
                host_link: None,
                pageable_host_link: None,
            },
        );
        let cm = CostModel::new(
            &m,
            &[Device::Gpu(0), Device::Gpu(1), Device::Cpu],
            topology,
            Objective::Latency,
        );
        let plain = UnitRead {
            bytes: 2000,
            copied: 2000,
            tensors: 1.0,
            modules: 1.0,
            kv: 0,
        };
        let cached = plain.with_kv(1_000_000);
        // 1 MB of cache, read by cat, written by cat, read by attention: 3 MB at 2 TB/s on GPU 0
        // (1.5 µs), at 1 TB/s on GPU 1 (3 µs); a cpu unit runs on GPU 0, the main GPU.
        for (device, extra) in [
            (Device::Gpu(0), 3e6 / 2000e9),
            (Device::Gpu(1), 3e6 / 1e12),
            (Device::Cpu, 3e6 / 2000e9),
        ] {
            let d = cm.unit_seconds(cached, device) - cm.unit_seconds(plain, device);
            assert!((d - extra).abs() < 1e-15, "{device:?}: {d} vs {extra}");
        }
        // A calibrated topology's measured passes replace the three: 7.5 MB at 2 TB/s on GPU 0.
        let mut measured = cm.clone();
        measured.topology.runtime.kv_passes_per_step = 7.5;
        let d = measured.unit_seconds(cached, Device::Gpu(0))
            - measured.unit_seconds(plain, Device::Gpu(0));
        assert!((d - 7.5e6 / 2000e9).abs() < 1e-15, "{d}");
    }

    #[test]
    fn a_resident_embedding_costs_a_row_and_an_offloaded_one_the_whole_copy() {
        let m = ModelBuilder::new("t")
            .module("embed", "Embedding")
            .param("embed.weight", DType::F16, &[1000, 10])
            .module("head", "Linear")
            .param("head.weight", DType::F16, &[10])
            .hidden_size(Some(10))
            .build()
            .unwrap();
        let cm = CostModel::new(
            &m,
            &[Device::Gpu(0), Device::Cpu],
            hand_topology(),
            Objective::Latency,
        );
        let embed_on = |d: Device| {
            let mut map = DeviceMap::new();
            map.insert("embed", d);
            map.insert("head", Device::Gpu(0));
            cm.evaluate(&m, &map, SizeRules::default()).latency_seconds
        };
        // Resident: one 20-byte row and the 20-byte head at 2 TB/s, 1 ms of eager work each.
        let resident = 40.0 / 2000e9 + 2e-3;
        assert!((embed_on(Device::Gpu(0)) - resident).abs() < 1e-15);
        // Offloaded: the whole 20 000-byte table at 4 GB/s, one 3 ms copy, a 2 ms hook on top.
        let offloaded = resident + 20_000.0 / 4e9 + 3e-3 + 2e-3;
        assert!((embed_on(Device::Cpu) - offloaded).abs() < 1e-15);
    }

    #[test]
    fn the_main_gpu_is_the_lowest_gpu_the_map_uses() {
        assert_eq!(
            main_gpu_of([Device::Cpu, Device::Gpu(3), Device::Gpu(1)]),
            Some(1)
        );
        assert_eq!(main_gpu_of([Device::Cpu, Device::Disk]), None);
        let m = chain();
        // Built on budgets listing GPU 0 first, as the CLI does: the map decides.
        let cm = CostModel::new(
            &m,
            &[Device::Gpu(0), Device::Gpu(1), Device::Cpu],
            Topology::default(),
            Objective::Latency,
        );
        let mut map = DeviceMap::new();
        map.insert("a", Device::Gpu(1));
        map.insert("b", Device::Cpu);
        let e = cm.evaluate(&m, &map, SizeRules::default());
        // b executes on GPU 1 (accelerate's main device here), next to a: no device change.
        assert_eq!(e.device_changes, 0);
        let both_on_gpu1 = cm.evaluate(
            &m,
            &{
                let mut all = DeviceMap::new();
                all.insert("a", Device::Gpu(1));
                all.insert("b", Device::Gpu(1));
                all
            },
            SizeRules::default(),
        );
        // The only difference to the all-GPU-1 map is b's copy over GPU 1's pageable link.
        let link = Topology::default().stream_link(1);
        let hook = Topology::default().runtime.offload_hook_seconds;
        let expected = both_on_gpu1.latency_seconds + 2000.0 / link.bandwidth + link.latency + hook;
        assert!((e.latency_seconds - expected).abs() < 1e-12);
    }

    #[test]
    fn device_changes_pay_the_link() {
        let m = chain();
        let mut topology = Topology::default();
        topology.runtime.eager_module_seconds = 0.0;
        let cm = CostModel::new(
            &m,
            &[Device::Gpu(0), Device::Gpu(1)],
            topology,
            Objective::Latency,
        );
        let mut split = DeviceMap::new();
        split.insert("a", Device::Gpu(0));
        split.insert("b", Device::Gpu(1));
        let e = cm.evaluate(&m, &split, SizeRules::default());
        assert_eq!(e.device_changes, 1);
        let expected = 4000.0 / 2000e9 + 20.0 / 20e9 + 15e-6;
        assert!((e.latency_seconds - expected).abs() < 1e-12);
        let tp = CostModel {
            objective: Objective::Throughput,
            ..cm
        };
        let e = tp.evaluate(&m, &split, SizeRules::default());
        assert!((e.objective_seconds - (2000.0 / 2000e9 + 20.0 / 20e9 + 15e-6)).abs() < 1e-12);
    }

    #[test]
    fn kv_cache_spec() {
        let s = KvCacheSpec::parse("batch=2,seq=4096,dtype=f16").unwrap();
        assert_eq!((s.batch, s.seq, s.dtype), (2, 4096, Some(DType::F16)));
        let e = KvCacheSpec::parse("batch=2,len=5").unwrap_err().to_string();
        assert!(e.contains("\"len\""), "{e}");
    }

    #[test]
    fn topology_file_overrides_defaults() {
        let dir = std::env::temp_dir().join(format!("devmap-topo-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("t.json");
        std::fs::write(&p, r#"{"gpus": {"1": {"memory_bandwidth": 1e12}}, "peer_links": {"0-1": {"bandwidth": 4.5e11, "latency": 5e-6}}}"#).unwrap();
        let t = Topology::read(&p).unwrap();
        assert_eq!(t.gpu_bandwidth(1), 1e12);
        assert_eq!(t.gpu_bandwidth(0), 2000e9);
        assert_eq!(t.peer_link(1, 0).bandwidth, 4.5e11);
        assert_eq!(t.runtime, Runtime::default());
        std::fs::write(&p, r#"{"disk_read_bandwidth": -1}"#).unwrap();
        let e = Topology::read(&p).unwrap_err().to_string();
        assert!(e.contains("disk_read_bandwidth"), "{e}");
        std::fs::write(
            &p,
            r#"{"runtime": {"eager_module_seconds": 5e-5}, "gpus": {"0": {"memory_bandwidth": 4.8e12, "pageable_host_link": {"bandwidth": 7e9, "latency": 2e-5}}}}"#,
        )
        .unwrap();
        let t = Topology::read(&p).unwrap();
        assert_eq!(t.runtime.eager_module_seconds, 5e-5);
        assert_eq!(t.runtime.offload_hook_seconds, DEFAULT_OFFLOAD_HOOK_SECONDS);
        assert_eq!(t.stream_link(0).bandwidth, 7e9);
        assert_eq!(t.stream_link(1), t.default_pageable_host_link);
        std::fs::write(&p, r#"{"runtime": {"offload_hook_seconds": -1}}"#).unwrap();
        let e = Topology::read(&p).unwrap_err().to_string();
        assert!(e.contains("runtime.offload_hook_seconds"), "{e}");
        assert_eq!(
            t.runtime.kv_passes_per_step, 3.0,
            "files without the field keep 3 passes"
        );
        std::fs::write(&p, r#"{"runtime": {"kv_passes_per_step": -0.5}}"#).unwrap();
        let e = Topology::read(&p).unwrap_err().to_string();
        assert!(e.contains("runtime.kv_passes_per_step"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_architecture_measured_on_its_own_gets_its_eager_constant() {
        let mut topology = Topology::default();
        topology.runtime.eager_module_seconds = 6e-5;
        (topology.runtime.eager_module_seconds_by_model_type).insert("t5".into(), 1.2e-4);
        topology.check().unwrap();
        let model_of = |model_type: &str| {
            ModelBuilder::new("m")
                .module("l", "Linear")
                .param("l.weight", DType::BF16, &[4, 4])
                .config(Some(crate::config::ModelConfig {
                    raw: serde_json::json!({ "model_type": model_type }),
                }))
                .build()
                .unwrap()
        };
        let eager = |model_type: &str| {
            let cm = CostModel::new(
                &model_of(model_type),
                &[Device::Gpu(0)],
                topology.clone(),
                Objective::Latency,
            );
            cm.topology.runtime.eager_module_seconds
        };
        assert_eq!(eager("t5"), 1.2e-4);
        assert_eq!(eager("llama"), 6e-5);
        let mut bad = Topology::default();
        (bad.runtime.eager_module_seconds_by_model_type).insert("bart".into(), -1e-5);
        let e = bad.check().unwrap_err();
        assert!(
            e.contains("runtime.eager_module_seconds_by_model_type.bart"),
            "{e}"
        );
    }
}
