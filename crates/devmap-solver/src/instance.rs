//! The placement problem `auto` solves: units in execution order, candidate devices with capacities,
//! per-unit costs from the cost model, and the memory rules. Shared by the DP and the MIP, and by
//! [`Instance::evaluate`], which is the single definition of "cost" and "feasible".

use devmap_core::cost::{CostModel, Exec, UnitRead};
use devmap_core::decode::TensorReads;
use std::ops::Range;

use devmap_core::graph::{flows, module_units, units, Flow, FlowKind, Unit};
use devmap_core::memory::{self, Workload, WorkloadMemory};
use devmap_core::quant_size::RuntimeBytes;
use devmap_core::{Device, DeviceMap, MemoryBudgets, Model, SizeRules};

use crate::Error;

/// A tied storage shared by several units.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tie {
    /// The unit holding the storage's first name (where it is counted).
    pub owner: usize,
    /// Other units holding a name of it: each device holding one of them, but not the owner, holds
    /// the storage too.
    pub members: Vec<usize>,
    /// Bytes of the storage.
    pub storage: u64,
}

/// The placement problem.
#[derive(Debug, Clone)]
pub struct Instance {
    /// Units in execution order: the placement units of [`devmap_core::graph::units`], except that a
    /// no-split block `auto` may split ([`InstanceOptions::split_blocks`]) is one unit per module
    /// with direct tensors ([`devmap_core::graph::module_units`]).
    pub units: Vec<Unit>,
    /// The units of each placement unit of [`devmap_core::graph::units`], in order (one unit,
    /// or a split block's module units). The block rule ([`Instance::blocks_hold`]): a block's
    /// units share one GPU, or all lie on the main GPU, cpu and disk.
    pub blocks: Vec<Range<usize>>,
    /// A display name per unit.
    pub names: Vec<String>,
    /// Bytes each unit adds to its device's memory (tied duplicates excluded).
    pub mem: Vec<u64>,
    /// Bytes each unit adds to cpu or disk when offloaded there: `mem`, except for a quantizer
    /// that loads offloaded modules at full precision (bitsandbytes' fp32 cpu offload).
    pub offload_mem: Vec<u64>,
    /// Per tensor, held bytes on a GPU and when offloaded (tied duplicates at 0), and the bytes
    /// read when streamed: what `check_map` cuts a map's pieces with.
    pub tensor_bytes: TensorBytes,
    /// The quantizer's offload rule, when it removed cpu and disk from the devices.
    pub gpu_only_rule: Option<String>,
    /// Bytes each unit reads per step (tied duplicates included).
    pub read: Vec<u64>,
    /// What each unit reads per step: bytes, tensors and modules (the cost model's input).
    pub unit_reads: Vec<UnitRead>,
    /// What each unit reads per step when cpu or disk streams it (`unit_reads` unless a quantizer
    /// offloads it at full precision).
    pub streamed_reads: Vec<UnitRead>,
    /// KV-cache bytes each unit needs where it executes.
    pub kv: Vec<u64>,
    /// Bytes the main device holds while it streams the unit from cpu/disk (its largest
    /// one-module group of direct tensors, [`devmap_core::memory::stream_buffers`]); cpu holds as
    /// much while a disk unit passes through it.
    pub stream: Vec<u64>,
    /// Candidate devices: GPUs by index, then cpu, then disk (only those with a budget).
    pub devices: Vec<Device>,
    /// Room for units on each device: its budget minus `--reserve` minus `fixed`, or less where
    /// the quantize-on-load peak (`load_transient` above the weights) needs it (`load_caps`).
    pub caps: Vec<u64>,
    /// Each device's budget minus `--reserve`.
    pub room: Vec<u64>,
    /// Bytes each GPU must keep free while a quantizer converts weights on load: the largest
    /// conversion transient of any tensor ([`devmap_core::memory::load_peak`]; any converted
    /// tensor may land on it). 0 on cpu/disk and without quantize-on-load.
    pub load_transient: Vec<u64>,
    /// Bytes charged on each device that can execute units, whatever the assignment: the
    /// activation working set and the allocator allowance (already taken out of `caps`).
    pub fixed: Vec<u64>,
    /// Which devices each unit may use (pins restrict this).
    pub allowed: Vec<Vec<bool>>,
    /// Seconds of unit `i` on device `b`.
    pub cost: Vec<Vec<f64>>,
    /// Execution devices (distinct), and each device's index into it.
    pub execs: Vec<Exec>,
    /// Index into `execs` of each device.
    pub exec_of: Vec<usize>,
    /// The data-flow edges between units ([`devmap_core::graph::flows`]).
    pub flows: Vec<Flow>,
    /// The flows the objective charges per decode step, with their seconds between execution
    /// devices: the transfer term sums them over edges whose ends execute apart.
    pub transfers: Vec<Transfer>,
    /// For each unit `i`, the transfer of the edge `i → i + 1`, if there is one.
    pub next_transfer: Vec<Option<usize>>,
    /// Index of the main GPU in `devices` (executes cpu/disk units): the lowest GPU of the
    /// instance, which every feasible assignment that streams a unit uses
    /// ([`Instance::main_rule_holds`], `Auto::instance_for_main`).
    pub main: Option<usize>,
    /// Index of cpu in `devices`.
    pub cpu: Option<usize>,
    /// Index of disk in `devices`.
    pub disk: Option<usize>,
    /// Tied storages spanning units.
    pub ties: Vec<Tie>,
    /// The cost model used.
    pub cost_model: CostModel,
}

/// Per tensor sizes an instance was built from.
#[derive(Debug, Clone, Default)]
pub struct TensorBytes {
    /// Held on a GPU.
    pub on_gpu: Vec<u64>,
    /// Held on cpu or disk.
    pub offloaded: Vec<u64>,
    /// Read when streamed from cpu or disk (tied duplicates included).
    pub offloaded_read: Vec<u64>,
    /// Held on a GPU at once beyond `on_gpu` while a quantizer converts it on load.
    pub load_transient: Vec<u64>,
}

/// Per tensor sizes of `model` under `rules`, quantized as the runtime holds them: `(read on a
/// GPU, the TensorBytes, the runtime bytes when quantized)`.
fn sized_tensors(
    model: &Model,
    rules: SizeRules,
) -> Result<(Vec<u64>, TensorBytes, Option<RuntimeBytes>), Error> {
    let quant = devmap_core::quant_size::runtime_bytes(model, rules)?;
    let (read_gpu, read_off) = match &quant {
        Some(q) => (q.on_gpu.clone(), q.offloaded.clone()),
        None => {
            let read = model.read_sizes(rules);
            (read.clone(), read)
        }
    };
    let bytes = TensorBytes {
        on_gpu: RuntimeBytes::held(model, &read_gpu),
        offloaded: RuntimeBytes::held(model, &read_off),
        offloaded_read: read_off,
        load_transient: quant.as_ref().map_or_else(
            || vec![0; model.tensors().len()],
            |q| q.load_transient.clone(),
        ),
    };
    Ok((read_gpu, bytes, quant))
}

/// A data-flow edge charged per decode step (see [`Instance::transfers`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Transfer {
    /// The upstream unit.
    pub from: usize,
    /// The downstream unit.
    pub to: usize,
    /// `seconds[e][f]`: seconds per step when `from` executes on `execs[e]` and `to` on
    /// `execs[f]` (0 on the diagonal).
    pub seconds: Vec<Vec<f64>>,
}

/// Options that shape the instance.
#[derive(Debug, Clone, Default)]
pub struct InstanceOptions {
    /// Bytes to keep free per device.
    pub reserve: Vec<(Device, u64)>,
    /// The workload whose KV cache and activations are charged (`None`: weights only).
    pub workload: Option<Workload>,
    /// `(map key, device)` pins.
    pub pins: Vec<(String, Device)>,
    /// Size rules (target dtype).
    pub rules: SizeRules,
    /// Let a no-split block lie partly on the main GPU and partly on cpu/disk, at module
    /// granularity (accelerate executes cpu/disk modules on the main GPU, so the block's residual
    /// stream stays on one device). Only where the instance has a GPU and cpu or disk and every plan
    /// streams something (a pin onto cpu/disk, or more bytes than the GPUs hold), and only for
    /// blocks of at most [`MAX_SPLIT_MODULES`] modules with direct tensors.
    pub split_blocks: bool,
}

/// The most modules with direct tensors a block may have for `auto` to split it (wider blocks, an
/// MoE layer's experts, stay whole: thousands of units would slow every step of the search).
pub const MAX_SPLIT_MODULES: usize = 32;

/// The units of an instance from the placement units `blocks`: each splittable block replaced by
/// its module units (`split`: whether this instance splits any), with the range of units of each.
fn refine_units(model: &Model, blocks: &[Unit], split: bool) -> (Vec<Unit>, Vec<Range<usize>>) {
    let mut units = Vec::with_capacity(blocks.len());
    let mut ranges = Vec::with_capacity(blocks.len());
    for block in blocks {
        let start = units.len();
        let parts = if split && block.whole {
            module_units(model, block)
        } else {
            Vec::new()
        };
        if (2..=MAX_SPLIT_MODULES).contains(&parts.len()) {
            units.extend(parts);
        } else {
            units.push(block.clone());
        }
        ranges.push(start..units.len());
    }
    (units, ranges)
}

/// Per-block values (KV bytes) on the instance's units: each block's on its first unit (where its
/// attention runs with the rest of the block, on one execution device).
fn spread_to_first(per_block: &[u64], blocks: &[Range<usize>], n: usize) -> Vec<u64> {
    let mut out = vec![0; n];
    for (v, r) in per_block.iter().zip(blocks) {
        out[r.start] = *v;
    }
    out
}

/// The data-flow edges between blocks carried onto the instance's units (from a block's last unit
/// to the next one's first), plus a residual edge between consecutive units of a split block. The
/// block rule puts all of a block's units on one execution device, so those inner edges cost
/// nothing on any feasible assignment; they keep the chain a chain for the DP and the bound.
fn refined_flows(block_flows: &[Flow], blocks: &[Range<usize>]) -> Vec<Flow> {
    let mut out: Vec<Flow> = block_flows
        .iter()
        .map(|f| Flow {
            from: blocks[f.from].end - 1,
            to: blocks[f.to].start,
            kind: f.kind,
        })
        .collect();
    for r in blocks.iter().filter(|r| r.len() > 1) {
        out.extend((r.start..r.end - 1).map(|i| Flow {
            from: i,
            to: i + 1,
            kind: FlowKind::Residual,
        }));
    }
    out.sort_by_key(|f| (f.to, f.from));
    out
}

/// Part of a unit on one device (a map may divide a unit that is not a no-split block).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    /// The unit.
    pub unit: usize,
    /// Its device (index into `Instance::devices`).
    pub device: usize,
    /// Weight bytes of the piece.
    pub weights: u64,
    /// Its streaming buffer (see `Instance::stream`).
    pub stream: u64,
}

/// Memory a unit assignment uses per device (index as `Instance::devices`), by term.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// Weights per device.
    pub weights: Vec<u64>,
    /// KV cache, streaming buffer and tied copies per device (what counts against `caps`
    /// besides the weights).
    pub overhead: Vec<u64>,
    /// The KV-cache part of `overhead`.
    pub kv: Vec<u64>,
    /// The streaming-buffer part of `overhead` (main device: streamed units; cpu: disk units).
    pub streaming: Vec<u64>,
    /// Activations and allocator allowance on the devices that execute units (`Instance::fixed`,
    /// already outside `caps`).
    pub activations: Vec<u64>,
}

impl Usage {
    /// Total per device that counts against `Instance::caps` (weights plus overhead).
    pub fn total(&self, b: usize) -> u64 {
        self.weights[b] + self.overhead[b]
    }
}

/// Whether every plan streams something: a pin onto cpu/disk, or more weights and KV cache than the
/// GPUs' capacities hold. Only then does `auto` split blocks (a plan that streams nothing keeps
/// every block on one GPU under the block rule anyway, and the finer units slow the search).
fn must_stream(whole: &UnitSet, devices: &[Device], caps: &[u64], opts: &InstanceOptions) -> bool {
    let need: u64 = whole.mem.iter().sum::<u64>() + whole.kv.iter().sum::<u64>();
    let gpu_caps: u64 = (devices.iter().zip(caps))
        .filter(|(d, _)| d.is_gpu())
        .map(|(_, c)| *c)
        .sum();
    need > gpu_caps || opts.pins.iter().any(|(_, d)| !d.is_gpu())
}

/// Whether splitting a block can change a plan: a GPU executes, and cpu or disk can stream.
fn splits_can_pay(devices: &[Device]) -> bool {
    devices.iter().any(|d| d.is_gpu()) && devices.iter().any(|d| !d.is_gpu())
}

/// The devices with a budget, in budget order, and each one's budget minus `--reserve`.
pub(crate) fn candidate_devices(
    budgets: &MemoryBudgets,
    reserve: &[(Device, u64)],
) -> Result<(Vec<Device>, Vec<u64>), Error> {
    let mut devices = Vec::new();
    let mut room = Vec::new();
    for b in budgets.iter() {
        if b.device.is_gpu() && b.bytes == 0 {
            continue;
        }
        let reserved = reserve
            .iter()
            .filter(|(d, _)| *d == b.device)
            .map(|(_, r)| *r)
            .sum::<u64>();
        devices.push(b.device);
        room.push(b.bytes.saturating_sub(reserved));
    }
    if devices.is_empty() {
        return Err(Error::NoDevices);
    }
    if let Some((d, _)) = reserve.iter().find(|(d, _)| !budgets.contains(*d)) {
        return Err(Error::NoBudget(*d));
    }
    Ok((devices, room))
}

/// A display name per unit: the module, or the tensor when the unit is one direct tensor.
fn unit_names(model: &Model, units: &[Unit]) -> Vec<String> {
    units
        .iter()
        .map(|u| {
            if u.whole || u.tensors.len() != 1 {
                model.module(u.module).name.clone()
            } else {
                model.tensor(u.tensors[0]).name.clone()
            }
        })
        .collect()
}

/// The sum of `sizes` over each unit's tensors.
fn per_unit(units: &[Unit], sizes: &[u64]) -> Vec<u64> {
    units
        .iter()
        .map(|u| u.tensors.iter().map(|&t| sizes[t]).sum())
        .collect()
}

/// Which devices each unit may use under `pins`.
fn pinned_devices(
    model: &Model,
    units: &[Unit],
    names: &[String],
    devices: &[Device],
    pins: &[(String, Device)],
) -> Result<Vec<Vec<bool>>, Error> {
    let mut allowed = vec![vec![true; devices.len()]; units.len()];
    for (key, dev) in pins {
        let Some(b) = devices.iter().position(|d| d == dev) else {
            return Err(Error::NoBudget(*dev));
        };
        let mut hit = false;
        for (i, u) in units.iter().enumerate() {
            let covered = u
                .tensors
                .iter()
                .any(|&t| devmap_core::device_map::covers(key, &model.tensor(t).name));
            if covered {
                hit = true;
                for (c, a) in allowed[i].iter_mut().enumerate() {
                    *a = *a && c == b;
                }
            }
        }
        if !hit {
            return Err(Error::BadPin(format!(
                "pin {key:?} matches no module or tensor with weights"
            )));
        }
    }
    if let Some(i) = allowed.iter().position(|a| !a.iter().any(|x| *x)) {
        return Err(Error::BadPin(format!(
            "unit {:?} is pinned to two different devices",
            names[i]
        )));
    }
    Ok(allowed)
}

/// Execution tables: the distinct execution devices, each device's index into them, and the
/// seconds of each unit on each device.
type ExecTables = (Vec<Exec>, Vec<usize>, Vec<Vec<f64>>);

/// `reads` per unit when it executes where it is held, `streamed` when cpu/disk stream it.
fn exec_tables(
    cost_model: &CostModel,
    devices: &[Device],
    reads: &[UnitRead],
    streamed: &[UnitRead],
) -> ExecTables {
    let mut execs: Vec<Exec> = Vec::new();
    let exec_of: Vec<usize> = devices
        .iter()
        .map(|&d| {
            let e = cost_model.exec(d);
            execs.iter().position(|x| *x == e).unwrap_or_else(|| {
                execs.push(e);
                execs.len() - 1
            })
        })
        .collect();
    let any_gpu = devices.iter().any(|d| d.is_gpu());
    let cost = reads
        .iter()
        .zip(streamed)
        .map(|(&r, &s)| {
            devices
                .iter()
                .map(|&d| {
                    let read = if any_gpu && !d.is_gpu() { s } else { r };
                    cost_model.unit_seconds(read, d)
                })
                .collect()
        })
        .collect();
    (execs, exec_of, cost)
}

/// The flows charged per step, with their seconds between each pair of execution devices, and the
/// transfer of each chain edge `i → i + 1`.
fn transfers(
    cost_model: &CostModel,
    execs: &[Exec],
    flows: &[Flow],
    n: usize,
) -> (Vec<Transfer>, Vec<Option<usize>>) {
    let charged = flows
        .iter()
        .filter(|f| f.tokens_per_step(cost_model.encoder_tokens).is_some());
    let transfers: Vec<Transfer> = charged
        .map(|f| Transfer {
            from: f.from,
            to: f.to,
            seconds: (execs.iter())
                .map(|&a| {
                    (execs.iter())
                        .map(|&b| cost_model.flow_seconds(f, a, b))
                        .collect()
                })
                .collect(),
        })
        .collect();
    let mut next = vec![None; n];
    for (k, t) in transfers.iter().enumerate() {
        if t.to == t.from + 1 && next[t.from].is_none() {
            next[t.from] = Some(k);
        }
    }
    (transfers, next)
}

/// Tied storages whose names fall in more than one unit.
fn tied_storages(model: &Model, units: &[Unit], sizes: &[u64]) -> Vec<Tie> {
    let unit_of_tensor = devmap_core::graph::unit_of_tensor(model, units);
    let mut ties = Vec::new();
    for group in model.tied_groups() {
        let owner_t = *group.iter().min().expect("non-empty");
        let owner = unit_of_tensor[owner_t];
        let mut members: Vec<usize> = group
            .iter()
            .map(|&t| unit_of_tensor[t])
            .filter(|&u| u != owner && u != usize::MAX)
            .collect();
        members.sort_unstable();
        members.dedup();
        if owner != usize::MAX && !members.is_empty() {
            ties.push(Tie {
                owner,
                members,
                storage: sizes[owner_t],
            });
        }
    }
    ties
}

/// The workload's per-unit KV bytes and the fixed charge of a device that executes units (0 and
/// 0 without a workload).
fn workload_terms(
    model: &Model,
    units: &[Unit],
    workload: Option<&Workload>,
) -> Result<(Vec<u64>, u64), Error> {
    let Some(w) = workload else {
        return Ok((vec![0; units.len()], 0));
    };
    let terms = WorkloadMemory::new(model, w)?;
    let kv = memory::kv_per_unit(model, units, &terms.kv_layers);
    Ok((kv, terms.per_executing_device()))
}

/// The fixed charge `per_executing` on each device that can execute (every GPU; the cpu when
/// there is no GPU).
fn fixed_charges(devices: &[Device], per_executing: u64) -> Vec<u64> {
    let any_gpu = devices.iter().any(|d| d.is_gpu());
    devices
        .iter()
        .map(|d| {
            if d.is_gpu() || (*d == Device::Cpu && !any_gpu) {
                per_executing
            } else {
                0
            }
        })
        .collect()
}

/// Drop cpu and disk from `devices` (and their `room`) when the quantizer rejects maps using
/// them and a GPU is there to hold everything; the rule when it did.
fn gpu_only(q: &RuntimeBytes, devices: &mut Vec<Device>, room: &mut Vec<u64>) -> Option<String> {
    if !devices.iter().any(|d| d.is_gpu()) {
        return None;
    }
    let allowed = |d: &Device| match d {
        Device::Cpu => q.offload.cpu,
        Device::Disk => q.offload.disk,
        _ => true,
    };
    if devices.iter().all(allowed) {
        return None;
    }
    (*devices, *room) = devices
        .iter()
        .copied()
        .zip(room.iter().copied())
        .filter(|(d, _)| allowed(d))
        .unzip();
    Some(q.offload.rule.clone())
}

/// Add the quantizer's dequantization workspace to each GPU's fixed charge (the dequantized
/// weight of a prefill matmul sits beside the activations).
fn add_workspace(fixed: &mut [u64], devices: &[Device], quant: Option<&RuntimeBytes>) {
    if let Some(q) = quant {
        for (f, d) in fixed.iter_mut().zip(devices) {
            if d.is_gpu() {
                *f += q.workspace;
            }
        }
    }
}

/// Per device row, the quantize-on-load transient a GPU keeps room for (the largest of any
/// tensor), and the room left for units (weights + KV). A GPU must hold weights + KV + `fixed`
/// at runtime and weights + transient while loading (the KV cache comes later); one cap serves
/// both as `room − max(fixed, transient − KV it surely holds)`. The KV it surely holds is every
/// unit's when it is the only GPU (streamed units keep theirs on the main GPU); with several
/// GPUs it is taken as 0, which makes the cap conservative by that GPU's KV cache.
fn load_caps(
    devices: &[Device],
    room: &[u64],
    fixed: &[u64],
    tensor_bytes: &TensorBytes,
    kv: &[u64],
) -> (Vec<u64>, Vec<u64>) {
    let largest = tensor_bytes
        .load_transient
        .iter()
        .copied()
        .max()
        .unwrap_or(0);
    let load: Vec<u64> = devices
        .iter()
        .map(|d| if d.is_gpu() { largest } else { 0 })
        .collect();
    let sole_gpu = devices.iter().filter(|d| d.is_gpu()).count() == 1;
    let surely_kv = if sole_gpu { kv.iter().sum::<u64>() } else { 0 };
    let caps = (room.iter().zip(fixed).zip(&load))
        .map(|((r, f), l)| r.saturating_sub(*f.max(&l.saturating_sub(surely_kv))))
        .collect();
    (load, caps)
}

/// A pin onto a device the quantizer removed cannot load: say so, naming the rule.
fn check_pins_allowed(
    gpu_only_rule: Option<&String>,
    pins: &[(String, Device)],
    devices: &[Device],
) -> Result<(), Error> {
    if let (Some(rule), Some((key, dev))) = (
        gpu_only_rule,
        pins.iter().find(|(_, d)| !devices.contains(d)),
    ) {
        return Err(Error::BadPin(format!(
            "pin {key:?} to {dev} cannot load: {rule}"
        )));
    }
    Ok(())
}

/// What each unit reads per decode step from per-tensor `read_sizes`, with its KV cache.
fn unit_reads_of(model: &Model, units: &[Unit], read_sizes: &[u64], kv: &[u64]) -> Vec<UnitRead> {
    let tensor_reads = TensorReads::new(model, read_sizes);
    units
        .iter()
        .zip(kv)
        .map(|(u, &kv)| UnitRead::of(model, &u.tensors, &tensor_reads).with_kv(kv))
        .collect()
}

/// The parts of an instance that do not depend on the devices: the units, their sizes, reads, KV
/// cache and streaming buffers, the data flow and the tied storages. `auto` builds them once per
/// plan and each world's instance from them ([`Instance::from_tables`]): on a 170k-tensor model
/// they are most of an instance's cost.
#[derive(Debug, Clone)]
pub struct UnitTables {
    /// Every no-split block one unit.
    whole: UnitSet,
    /// Splittable blocks as module units ([`InstanceOptions::split_blocks`]; `None` when off or
    /// when no block splits). A world uses it only where every plan streams ([`must_stream`]).
    split: Option<UnitSet>,
}

/// The device-independent tables of one choice of units.
#[derive(Debug, Clone)]
struct UnitSet {
    units: Vec<Unit>,
    blocks: Vec<Range<usize>>,
    names: Vec<String>,
    mem: Vec<u64>,
    offload_mem: Vec<u64>,
    tensor_bytes: TensorBytes,
    quant: Option<RuntimeBytes>,
    read: Vec<u64>,
    unit_reads: Vec<UnitRead>,
    streamed_reads: Vec<UnitRead>,
    kv: Vec<u64>,
    /// The workload's charge on each device that executes units.
    per_executing: u64,
    stream: Vec<u64>,
    flows: Vec<Flow>,
    ties: Vec<Tie>,
}

impl UnitTables {
    /// The device-independent parts of `model`'s instances under `opts` (its size rules, workload
    /// and `split_blocks`; reserves and pins are per world).
    pub fn new(model: &Model, opts: &InstanceOptions) -> Result<UnitTables, Error> {
        let block_units = units(model);
        let whole = UnitSet::new(model, opts, &block_units, false)?;
        // The split set only when some block splits: building a set is most of an instance's
        // cost on a 170k-tensor model whose layers are too wide to split.
        let splits = opts.split_blocks
            && (refine_units(model, &block_units, true).1)
                .iter()
                .any(|r| r.len() > 1);
        let split = if splits {
            Some(UnitSet::new(model, opts, &block_units, true)?)
        } else {
            None
        };
        Ok(UnitTables { whole, split })
    }

    /// The units a world of `devices` with room `caps` plans with: the split set where it splits
    /// blocks (a GPU and cpu/disk, and every plan streams), else every block whole.
    fn for_world(&self, devices: &[Device], caps: &[u64], opts: &InstanceOptions) -> &UnitSet {
        match &self.split {
            Some(split)
                if splits_can_pay(devices) && must_stream(&self.whole, devices, caps, opts) =>
            {
                split
            }
            _ => &self.whole,
        }
    }
}

impl UnitSet {
    fn new(
        model: &Model,
        opts: &InstanceOptions,
        block_units: &[Unit],
        split: bool,
    ) -> Result<UnitSet, Error> {
        let (read_sizes, tensor_bytes, quant) = sized_tensors(model, opts.rules)?;
        // Decoder layers are recognised among the blocks, not their module units.
        let (block_kv, per_executing) = workload_terms(model, block_units, opts.workload.as_ref())?;
        let (units, blocks) = refine_units(model, block_units, split);
        let kv = spread_to_first(&block_kv, &blocks, units.len());
        let unit_reads = unit_reads_of(model, &units, &read_sizes, &kv);
        // Unquantized, streamed units read what resident ones do: no second pass over the tensors.
        let streamed_reads = if quant.is_some() {
            unit_reads_of(model, &units, &tensor_bytes.offloaded_read, &kv)
        } else {
            unit_reads.clone()
        };
        Ok(UnitSet {
            names: unit_names(model, &units),
            mem: per_unit(&units, &tensor_bytes.on_gpu),
            offload_mem: per_unit(&units, &tensor_bytes.offloaded),
            read: per_unit(&units, &read_sizes),
            stream: memory::stream_buffers(model, &units, &tensor_bytes.offloaded_read),
            flows: refined_flows(&flows(model, block_units), &blocks),
            ties: tied_storages(model, &units, &tensor_bytes.on_gpu),
            units,
            blocks,
            tensor_bytes,
            quant,
            unit_reads,
            streamed_reads,
            kv,
            per_executing,
        })
    }
}

/// One world's devices: which have a budget (the quantizer may drop cpu/disk), the room for
/// units on each, the fixed charges, and the quantizer's rule when it dropped devices.
struct WorldDevices {
    devices: Vec<Device>,
    caps: Vec<u64>,
    room: Vec<u64>,
    load_transient: Vec<u64>,
    fixed: Vec<u64>,
    gpu_only_rule: Option<String>,
}

impl WorldDevices {
    fn new(
        tables: &UnitTables,
        budgets: &MemoryBudgets,
        opts: &InstanceOptions,
    ) -> Result<WorldDevices, Error> {
        let (mut devices, mut room) = candidate_devices(budgets, &opts.reserve)?;
        let quant = tables.whole.quant.as_ref();
        let gpu_only_rule = quant.and_then(|q| gpu_only(q, &mut devices, &mut room));
        let mut fixed = fixed_charges(&devices, tables.whole.per_executing);
        if opts.workload.is_some() {
            add_workspace(&mut fixed, &devices, quant);
        }
        let (load_transient, caps) = load_caps(
            &devices,
            &room,
            &fixed,
            &tables.whole.tensor_bytes,
            &tables.whole.kv,
        );
        check_pins_allowed(gpu_only_rule.as_ref(), &opts.pins, &devices)?;
        Ok(WorldDevices {
            devices,
            caps,
            room,
            load_transient,
            fixed,
            gpu_only_rule,
        })
    }
}

impl Instance {
    /// Build the instance for `model` on `budgets`.
    pub fn new(
        model: &Model,
        budgets: &MemoryBudgets,
        cost_model: CostModel,
        opts: &InstanceOptions,
    ) -> Result<Instance, Error> {
        let tables = UnitTables::new(model, opts)?;
        Instance::from_tables(model, &tables, budgets, cost_model, opts)
    }

    /// The instance for `model` on `budgets` from its device-independent `tables` (built with the
    /// same `opts`).
    pub fn from_tables(
        model: &Model,
        tables: &UnitTables,
        budgets: &MemoryBudgets,
        cost_model: CostModel,
        opts: &InstanceOptions,
    ) -> Result<Instance, Error> {
        let world = WorldDevices::new(tables, budgets, opts)?;
        let t = tables.for_world(&world.devices, &world.caps, opts);
        let allowed = pinned_devices(model, &t.units, &t.names, &world.devices, &opts.pins)?;
        // The instance's own scorer (check_map's estimate) reads the same KV cache.
        let cost_model = cost_model.with_workload(model, opts.workload.as_ref())?;
        let (execs, exec_of, cost) = exec_tables(
            &cost_model,
            &world.devices,
            &t.unit_reads,
            &t.streamed_reads,
        );
        let (transfers, next_transfer) = transfers(&cost_model, &execs, &t.flows, t.units.len());
        let devices = world.devices;
        Ok(Instance {
            main: devices.iter().position(|d| d.is_gpu()),
            cpu: devices.iter().position(|d| *d == Device::Cpu),
            disk: devices.iter().position(|d| *d == Device::Disk),
            units: t.units.clone(),
            blocks: t.blocks.clone(),
            names: t.names.clone(),
            mem: t.mem.clone(),
            offload_mem: t.offload_mem.clone(),
            tensor_bytes: t.tensor_bytes.clone(),
            gpu_only_rule: world.gpu_only_rule,
            read: t.read.clone(),
            unit_reads: t.unit_reads.clone(),
            streamed_reads: t.streamed_reads.clone(),
            kv: t.kv.clone(),
            stream: t.stream.clone(),
            devices,
            caps: world.caps,
            room: world.room,
            load_transient: world.load_transient,
            fixed: world.fixed,
            allowed,
            cost,
            execs,
            exec_of,
            flows: t.flows.clone(),
            transfers,
            next_transfer,
            ties: t.ties.clone(),
            cost_model,
        })
    }

    /// Number of units.
    pub fn n(&self) -> usize {
        self.units.len()
    }

    /// Whether every charged flow joins consecutive units (`i → i + 1`, at most one per pair): the
    /// graph the contiguous DP is exact on. Otherwise (an encoder-decoder's cross-attention
    /// edges) the DP is only a start candidate.
    pub fn is_chain(&self) -> bool {
        self.transfers
            .iter()
            .enumerate()
            .all(|(k, t)| self.next_transfer[t.from] == Some(k))
    }

    /// The seconds of the chain edge `i → i + 1` from execution device `e` to `f` (0 without one).
    pub fn next_seconds(&self, i: usize, e: usize, f: usize) -> f64 {
        self.next_transfer
            .get(i)
            .copied()
            .flatten()
            .map_or(0.0, |k| self.transfers[k].seconds[e][f])
    }

    /// Bytes unit `unit` takes on the device of row `device_row` when it is placed there: its
    /// weights, plus its KV cache when that device also executes it (a streamed unit's cache stays
    /// on the main GPU, see [`Instance::streamed_bytes_on_main`]). Tied copies and the streaming
    /// buffers are per-device charges, not per unit (see [`Instance::usage`]).
    pub fn unit_bytes_on(&self, unit: usize, device_row: usize) -> u64 {
        let weights = self.weights_on(unit, device_row);
        if self.exec_row(device_row) != device_row {
            weights
        } else {
            weights + self.kv[unit]
        }
    }

    /// The row whose device executes the units placed on row `device_row` (and holds their KV
    /// cache): the main GPU for cpu/disk when there is one; without a GPU the cpu for disk (the
    /// host runs them); otherwise the row itself.
    pub fn exec_row(&self, device_row: usize) -> usize {
        match (self.main, self.cpu) {
            (Some(m), _) if self.is_streamed(device_row) => m,
            (None, Some(c)) if Some(device_row) == self.disk => c,
            _ => device_row,
        }
    }

    /// Bytes unit `unit` adds to the row executing it when that is not its own row
    /// ([`Instance::exec_row`]: the main GPU for a streamed unit, the cpu for a disk unit without
    /// a GPU): its KV cache.
    pub fn streamed_bytes_on_main(&self, unit: usize) -> u64 {
        self.kv[unit]
    }

    /// Bytes the main GPU holds while it streams unit `unit` from cpu or disk (and cpu holds while
    /// a disk unit passes through it): the unit's largest one-module group of direct tensors, not
    /// the whole unit (accelerate loads one hooked module at a time).
    pub fn stream_buffer(&self, unit: usize) -> u64 {
        self.stream[unit]
    }

    /// Bytes unit `unit` needs wherever it is placed (on its device and, when streamed, on the main
    /// GPU): what the bounds and cuts count when the device is not known.
    pub fn unit_bytes(&self, unit: usize) -> u64 {
        self.mem[unit] + self.kv[unit]
    }

    /// Unit memory needs ([`Instance::unit_bytes`]) grouped by size: `(size, count)`, largest
    /// first, zero sizes left out. The bounds and cuts reason over these classes.
    pub fn size_classes(&self) -> Vec<(u64, u64)> {
        let sizes: Vec<u64> = (0..self.n()).map(|i| self.unit_bytes(i)).collect();
        crate::mip::size_classes(&sizes)
    }

    /// Whether device `b` streams its units to the main GPU (cpu or disk with a GPU present).
    pub fn is_streamed(&self, b: usize) -> bool {
        self.main.is_some() && !self.devices[b].is_gpu()
    }

    /// Memory per device of an assignment (device index per unit).
    pub fn usage(&self, a: &[usize]) -> Usage {
        let pieces: Vec<Piece> = a
            .iter()
            .enumerate()
            .map(|(i, &b)| Piece {
                unit: i,
                device: b,
                weights: self.weights_on(i, b),
                stream: self.stream[i],
            })
            .collect();
        self.usage_of_pieces(&pieces, a)
    }

    /// The memory rule, the one `auto` and `devmap check` share: per device, the weights of its
    /// pieces; the KV cache of each unit where it executes (the main device for cpu/disk units);
    /// on the main device the largest streaming buffer of a streamed piece; on cpu the largest
    /// of a disk piece; tied copies where a member sits away from its owner (`unit_device` gives
    /// each unit's device for that); activations and allowance on every device that executes.
    pub fn usage_of_pieces(&self, pieces: &[Piece], unit_device: &[usize]) -> Usage {
        let k = self.devices.len();
        let mut u = Usage {
            weights: vec![0; k],
            overhead: vec![0; k],
            kv: vec![0; k],
            streaming: vec![0; k],
            activations: vec![0; k],
        };
        // The instance's main GPU: each instance is one world of `auto` whose main device is
        // accelerate's (the lowest GPU a map uses, `memory::main_device`; `check_map` picks the
        // map's world).
        let main = self.main;
        let mut kv_charged = vec![false; self.n()];
        let mut executes = vec![false; k];
        for p in pieces {
            u.weights[p.device] += p.weights;
            let streamed = main.is_some() && !self.devices[p.device].is_gpu();
            let exec = self.exec_row(p.device);
            executes[exec] = true;
            if !kv_charged[p.unit] {
                kv_charged[p.unit] = true;
                u.kv[exec] += if exec != p.device {
                    self.streamed_bytes_on_main(p.unit)
                } else {
                    self.unit_bytes_on(p.unit, p.device) - self.mem[p.unit]
                };
            }
            if streamed {
                let m = main.expect("checked");
                u.streaming[m] = u.streaming[m].max(p.stream);
            }
            if Some(p.device) == self.disk {
                if let Some(c) = self.cpu {
                    u.streaming[c] = u.streaming[c].max(p.stream);
                }
            }
        }
        for (b, &runs) in executes.iter().enumerate() {
            u.overhead[b] = u.kv[b] + u.streaming[b];
            if runs {
                u.activations[b] = self.fixed[b];
            }
        }
        for (b, bytes) in self.tied_copies(unit_device) {
            u.overhead[b] += bytes;
        }
        u
    }

    /// `(device, bytes)` of every tied storage held away from its owner's device.
    fn tied_copies(&self, unit_device: &[usize]) -> Vec<(usize, u64)> {
        let mut out = Vec::new();
        for tie in &self.ties {
            let owner_dev = unit_device[tie.owner];
            // usize::MAX: a unit a map leaves without a device (reported by validation).
            let mut held: Vec<usize> = tie
                .members
                .iter()
                .map(|&m| unit_device[m])
                .filter(|&b| b != owner_dev && b != usize::MAX)
                .collect();
            held.sort_unstable();
            held.dedup();
            out.extend(held.into_iter().map(|b| (b, tie.storage)));
        }
        out
    }

    /// Whether the main GPU executes the streamed units: accelerate's main device is the lowest
    /// GPU the map uses, so an assignment that streams a unit holds one on this instance's main
    /// GPU. (One that streams nothing may leave it empty: its cost and memory do not depend on
    /// the main device.)
    pub fn main_rule_holds(&self, a: &[usize]) -> bool {
        match self.main {
            Some(m) => a.contains(&m) || !a.iter().any(|&b| self.is_streamed(b)),
            None => true,
        }
    }

    /// The block rule: the units of a split block (see [`Instance::blocks`]) either all sit on one
    /// GPU that is not the main GPU, or all sit on the main GPU, cpu and disk (which all execute on
    /// the main GPU). A block is never divided across two GPUs, nor between another GPU and the
    /// host, where its residual stream would cross devices inside the block.
    pub fn blocks_hold(&self, a: &[usize]) -> bool {
        self.split_blocks().all(|r| {
            let mut off_main = r.clone().map(|i| a[i]).filter(|&b| !self.in_main_domain(b));
            match off_main.next() {
                Some(g) => r.clone().all(|i| a[i] == g),
                None => true,
            }
        })
    }

    /// Whether row `b` is the main GPU, cpu or disk: the devices a block may be split across.
    pub fn in_main_domain(&self, b: usize) -> bool {
        Some(b) == self.main || !self.devices[b].is_gpu()
    }

    /// The unit ranges of the blocks this instance splits into several units.
    pub fn split_blocks(&self) -> impl Iterator<Item = &Range<usize>> {
        self.blocks.iter().filter(|r| r.len() > 1)
    }

    /// Whether the block rule restricts anything: a block is split and a GPU besides the main one
    /// can hold units. Then the contiguous DP, which does not know the rule, is only a start.
    pub fn block_rule_binds(&self) -> bool {
        self.split_blocks().next().is_some()
            && (0..self.devices.len()).any(|b| !self.in_main_domain(b))
    }

    /// The units that move with unit `i` when it moves to row `b`: its whole block when `b` is a GPU
    /// other than the main one (the block rule), else unit `i` alone.
    pub fn moving_with(&self, i: usize, b: usize) -> Range<usize> {
        if self.in_main_domain(b) {
            return i..i + 1;
        }
        (self.blocks.iter())
            .find(|r| r.contains(&i))
            .cloned()
            .unwrap_or(i..i + 1)
    }

    /// Whether an assignment respects pins, capacities, the main-GPU rule and the block rule.
    pub fn feasible(&self, a: &[usize]) -> bool {
        if a.len() != self.n()
            || a.iter()
                .enumerate()
                .any(|(i, &b)| b >= self.devices.len() || !self.allowed[i][b])
        {
            return false;
        }
        if !self.main_rule_holds(a) || !self.blocks_hold(a) {
            return false;
        }
        let u = self.usage(a);
        (0..self.devices.len()).all(|b| u.total(b) <= self.caps[b])
    }

    /// The objective value (seconds) of an assignment, exactly as the cost model estimates its map.
    pub fn evaluate(&self, a: &[usize]) -> f64 {
        let pieces: Vec<Vec<(Device, UnitRead)>> = a
            .iter()
            .enumerate()
            .map(|(i, &b)| vec![(self.devices[b], self.reads_on(i, b))])
            .collect();
        self.cost_model
            .estimate_units(&pieces, &self.flows)
            .objective_seconds
    }

    /// Weight bytes unit `unit` holds on device row `device_row`: `offload_mem` where cpu/disk
    /// stream it (a quantizer may offload at full precision), `mem` elsewhere.
    pub fn weights_on(&self, unit: usize, device_row: usize) -> u64 {
        if self.is_streamed(device_row) {
            self.offload_mem[unit]
        } else {
            self.mem[unit]
        }
    }

    /// What unit `i` reads per step on device row `b`: its streamed reads when cpu/disk stream it.
    pub fn reads_on(&self, i: usize, b: usize) -> UnitRead {
        if self.is_streamed(b) {
            self.streamed_reads[i]
        } else {
            self.unit_reads[i]
        }
    }

    /// The accelerate-style map of an assignment.
    pub fn to_map(&self, model: &Model, a: &[usize]) -> DeviceMap {
        let mut per_tensor = vec![self.devices[0]; model.tensors().len()];
        for (i, u) in self.units.iter().enumerate() {
            for &t in &u.tensors {
                per_tensor[t] = self.devices[a[i]];
            }
        }
        DeviceMap::from_tensor_devices(model, &per_tensor)
    }

    /// The unit assignment of a map, if the map keeps every unit on one device of this instance.
    pub fn from_map(&self, model: &Model, map: &DeviceMap) -> Option<Vec<usize>> {
        let devs = devmap_core::validate::tensor_devices(model, map);
        let mut a = Vec::with_capacity(self.n());
        for u in &self.units {
            let d = devs[*u.tensors.first()?]?;
            if u.tensors.iter().any(|&t| devs[t] != Some(d)) {
                return None;
            }
            a.push(self.devices.iter().position(|x| *x == d)?);
        }
        Some(a)
    }
}
