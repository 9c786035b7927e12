//! The placement problem `auto` solves: units in execution order, candidate devices with capacities,
//! per-unit costs from the cost model, and the memory rules. Shared by the DP and the MIP, and by
//! [`Instance::evaluate`], which is the single definition of "cost" and "feasible".

use devmap_core::cost::{CostModel, Exec, UnitRead};
use devmap_core::graph::{units, Unit};
use devmap_core::{Device, DeviceMap, KvCacheSpec, MemoryBudgets, Model, SizeRules};

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
    /// Units in execution order.
    pub units: Vec<Unit>,
    /// A display name per unit.
    pub names: Vec<String>,
    /// Bytes each unit adds to its device's memory (tied duplicates excluded).
    pub mem: Vec<u64>,
    /// Bytes each unit reads per step (tied duplicates included).
    pub read: Vec<u64>,
    /// What each unit reads per step: bytes, tensors and modules (the cost model's input).
    pub unit_reads: Vec<UnitRead>,
    /// KV-cache bytes each unit needs where it executes.
    pub kv: Vec<u64>,
    /// Candidate devices: GPUs by index, then cpu, then disk (only those with a budget).
    pub devices: Vec<Device>,
    /// Capacity of each device after `--reserve`.
    pub caps: Vec<u64>,
    /// Which devices each unit may use (pins restrict this).
    pub allowed: Vec<Vec<bool>>,
    /// Seconds of unit `i` on device `b`.
    pub cost: Vec<Vec<f64>>,
    /// Execution devices (distinct), and each device's index into it.
    pub execs: Vec<Exec>,
    /// Index into `execs` of each device.
    pub exec_of: Vec<usize>,
    /// Seconds to move activations between execution devices.
    pub trans: Vec<Vec<f64>>,
    /// Index of the main GPU in `devices` (executes cpu/disk units).
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

/// Options that shape the instance.
#[derive(Debug, Clone, Default)]
pub struct InstanceOptions {
    /// Bytes to keep free per device.
    pub reserve: Vec<(Device, u64)>,
    /// KV cache to charge per decoder layer.
    pub kv_cache: Option<KvCacheSpec>,
    /// `(map key, device)` pins.
    pub pins: Vec<(String, Device)>,
    /// Size rules (target dtype).
    pub rules: SizeRules,
}

/// Memory a unit assignment uses per device, and whether it fits.
#[derive(Debug, Clone, PartialEq)]
pub struct Usage {
    /// Weights per device (index as `Instance::devices`).
    pub weights: Vec<u64>,
    /// KV cache, streaming reserve and tied copies per device.
    pub overhead: Vec<u64>,
}

impl Usage {
    /// Total per device.
    pub fn total(&self, b: usize) -> u64 {
        self.weights[b] + self.overhead[b]
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
        let units = units(model);
        let sizes = model.tensor_sizes(opts.rules);
        let read_sizes = model.read_sizes(opts.rules);
        let mut devices = Vec::new();
        let mut caps = Vec::new();
        for b in budgets.iter() {
            if b.device.is_gpu() && b.bytes == 0 {
                continue;
            }
            let reserve = opts
                .reserve
                .iter()
                .filter(|(d, _)| *d == b.device)
                .map(|(_, r)| *r)
                .sum::<u64>();
            devices.push(b.device);
            caps.push(b.bytes.saturating_sub(reserve));
        }
        if devices.is_empty() {
            return Err(Error::NoDevices);
        }
        for (d, _) in &opts.reserve {
            if !budgets.contains(*d) {
                return Err(Error::NoBudget(*d));
            }
        }
        let n = units.len();
        let mut unit_of_tensor = vec![usize::MAX; model.tensors().len()];
        for (i, u) in units.iter().enumerate() {
            for &t in &u.tensors {
                unit_of_tensor[t] = i;
            }
        }
        let names: Vec<String> = units
            .iter()
            .map(|u| {
                let m = &model.module(u.module).name;
                if u.whole || u.tensors.len() != 1 {
                    m.clone()
                } else {
                    model.tensor(u.tensors[0]).name.clone()
                }
            })
            .collect();
        let mem: Vec<u64> = units
            .iter()
            .map(|u| u.tensors.iter().map(|&t| sizes[t]).sum())
            .collect();
        let read: Vec<u64> = units
            .iter()
            .map(|u| u.tensors.iter().map(|&t| read_sizes[t]).sum())
            .collect();
        let unit_reads: Vec<UnitRead> = units
            .iter()
            .map(|u| UnitRead::of(model, &u.tensors, &read_sizes))
            .collect();
        let kv = kv_per_unit(model, &units, opts.kv_cache.as_ref())?;

        // Pins.
        let mut allowed = vec![vec![true; devices.len()]; n];
        for (key, dev) in &opts.pins {
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
        for (i, a) in allowed.iter().enumerate() {
            if !a.iter().any(|x| *x) {
                return Err(Error::BadPin(format!(
                    "unit {:?} is pinned to two different devices",
                    names[i]
                )));
            }
        }

        let main = devices.iter().position(|d| d.is_gpu());
        let cpu = devices.iter().position(|d| *d == Device::Cpu);
        let disk = devices.iter().position(|d| *d == Device::Disk);
        let mut execs: Vec<Exec> = Vec::new();
        let exec_of: Vec<usize> = devices
            .iter()
            .map(|&d| {
                let e = cost_model.exec(d);
                match execs.iter().position(|x| *x == e) {
                    Some(p) => p,
                    None => {
                        execs.push(e);
                        execs.len() - 1
                    }
                }
            })
            .collect();
        let trans: Vec<Vec<f64>> = execs
            .iter()
            .map(|&a| {
                execs
                    .iter()
                    .map(|&b| cost_model.transfer_seconds(a, b))
                    .collect()
            })
            .collect();
        let cost: Vec<Vec<f64>> = (0..n)
            .map(|i| {
                devices
                    .iter()
                    .map(|&d| cost_model.unit_seconds(unit_reads[i], d))
                    .collect()
            })
            .collect();

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
        Ok(Instance {
            units,
            names,
            mem,
            read,
            unit_reads,
            kv,
            devices,
            caps,
            allowed,
            cost,
            execs,
            exec_of,
            trans,
            main,
            cpu,
            disk,
            ties,
            cost_model,
        })
    }

    /// Number of units.
    pub fn n(&self) -> usize {
        self.units.len()
    }

    /// Unit memory needs (weights plus KV cache) grouped by size: `(size, count)`, largest first,
    /// zero sizes left out. The bounds and cuts reason over these classes.
    pub fn size_classes(&self) -> Vec<(u64, u64)> {
        let mut sorted: Vec<u64> = (0..self.n())
            .map(|i| self.mem[i] + self.kv[i])
            .filter(|&x| x > 0)
            .collect();
        sorted.sort_unstable_by(|a, b| b.cmp(a));
        let mut classes: Vec<(u64, u64)> = Vec::new();
        for x in sorted {
            match classes.last_mut() {
                Some((s, c)) if *s == x => *c += 1,
                _ => classes.push((x, 1)),
            }
        }
        classes
    }

    /// Whether device `b` streams its units to the main GPU (cpu or disk with a GPU present).
    pub fn is_streamed(&self, b: usize) -> bool {
        self.main.is_some() && !self.devices[b].is_gpu()
    }

    /// Memory per device of an assignment (device index per unit).
    pub fn usage(&self, a: &[usize]) -> Usage {
        let k = self.devices.len();
        let mut weights = vec![0u64; k];
        let mut overhead = vec![0u64; k];
        let mut stream_max = 0u64;
        let mut disk_max = 0u64;
        for (i, &b) in a.iter().enumerate() {
            weights[b] += self.mem[i];
            let kv_dev = if self.is_streamed(b) {
                self.main.expect("streamed implies main")
            } else {
                b
            };
            overhead[kv_dev] += self.kv[i];
            if self.is_streamed(b) {
                stream_max = stream_max.max(self.read[i]);
            }
            if Some(b) == self.disk {
                disk_max = disk_max.max(self.read[i]);
            }
        }
        if let Some(m) = self.main {
            overhead[m] += stream_max;
        }
        if let Some(c) = self.cpu {
            overhead[c] += disk_max;
        }
        for tie in &self.ties {
            let owner_dev = a[tie.owner];
            let mut held: Vec<usize> = tie
                .members
                .iter()
                .map(|&u| a[u])
                .filter(|&b| b != owner_dev)
                .collect();
            held.sort_unstable();
            held.dedup();
            for b in held {
                overhead[b] += tie.storage;
            }
        }
        Usage { weights, overhead }
    }

    /// Whether an assignment respects pins and capacities.
    pub fn feasible(&self, a: &[usize]) -> bool {
        if a.len() != self.n()
            || a.iter()
                .enumerate()
                .any(|(i, &b)| b >= self.devices.len() || !self.allowed[i][b])
        {
            return false;
        }
        let u = self.usage(a);
        (0..self.devices.len()).all(|b| u.total(b) <= self.caps[b])
    }

    /// The objective value (seconds) of an assignment, exactly as the cost model estimates its map.
    pub fn evaluate(&self, a: &[usize]) -> f64 {
        let steps: Vec<(Device, UnitRead)> = a
            .iter()
            .enumerate()
            .map(|(i, &b)| (self.devices[b], self.unit_reads[i]))
            .collect();
        self.cost_model.estimate_steps(&steps).objective_seconds
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

/// KV bytes per unit: the cache of one decoder layer for each unit that is a decoder layer.
///
/// Decoder layers are the no-split units of the class that repeats `num_hidden_layers` times
/// (or, failing that, of the most repeated no-split class), so vision towers and encoders of
/// encoder-decoder models are not charged.
fn kv_per_unit(
    model: &Model,
    units: &[Unit],
    spec: Option<&KvCacheSpec>,
) -> Result<Vec<u64>, Error> {
    let mut kv = vec![0u64; units.len()];
    let Some(spec) = spec else {
        return Ok(kv);
    };
    let per_layer = spec.bytes_per_layer(model)?;
    let layers = model.config.as_ref().and_then(|c| c.num_layers());
    let mut counts: Vec<(String, usize)> = Vec::new();
    for u in units.iter().filter(|u| model.module(u.module).no_split) {
        let class = model.module(u.module).class.clone();
        match counts.iter_mut().find(|(c, _)| *c == class) {
            Some(e) => e.1 += 1,
            None => counts.push((class, 1)),
        }
    }
    // Prefer a class under a `decoder` path when layers repeat in both encoder and decoder.
    let decoder_units: Vec<usize> = (0..units.len())
        .filter(|&i| {
            model.module(units[i].module).no_split
                && model.module(units[i].module).name.contains("decoder")
        })
        .collect();
    let chosen: Vec<usize> =
        if !decoder_units.is_empty() && layers.is_none_or(|l| decoder_units.len() as u64 == l) {
            decoder_units
        } else {
            let class = counts
                .iter()
                .find(|(_, c)| Some(*c as u64) == layers)
                .or_else(|| counts.iter().max_by_key(|(_, c)| *c))
                .map(|(c, _)| c.clone());
            (0..units.len())
                .filter(|&i| {
                    let m = model.module(units[i].module);
                    m.no_split && Some(&m.class) == class.as_ref()
                })
                .collect()
        };
    for i in chosen {
        kv[i] = per_layer;
    }
    Ok(kv)
}
