//! The combinatorial lower bound `auto` certifies plans with and gives the MIP as a cut.
//!
//! It must hold for every feasible assignment of the instance, under every option (KV cache,
//! pins, topology, objective, reserves): a bound above a feasible objective is a bug (`auto`
//! debug-asserts it; tests/exhaustive.rs checks it against enumeration). Terms:
//!
//! - `base`: every unit at its cheapest allowed device (pinned units at their pin).
//! - `extra`: streaming the free (unpinned) units the GPUs cannot hold. Each streamed device saves
//!   a rate per byte against the most expensive one (the sink); an exact multiple knapsack over the
//!   largest size classes plus fluid small units maximises the saving. Bytes are the units' bytes
//!   on a streamed device; what stays on a GPU even when a unit is streamed (its KV cache) and
//!   what pinned units hold come off the GPU capacity. A pinned unit's cost is in `base` only.
//! - `changes`: the execution devices any plan must visit (the GPUs pins use, the main GPU when a
//!   pin streams a unit, enough GPUs to hold what cpu and disk cannot): `k` devices over a
//!   transfer graph of `c` connected pieces cut at least `k − c` edges, each at the cheapest
//!   edge and link.
//!
//! Unit costs and transfers are separate sums of the latency, so the three terms add. The
//! throughput objective's busiest device carries at least `1/execs` of the latency and the most
//! expensive unit.

use devmap_core::Objective;

use crate::instance::Instance;
use crate::mip::{forced_reserve, size_classes};

/// How the packing bound filled the devices: per bin (a device) the count of each big size class.
#[derive(Debug, Clone)]
pub(crate) struct Packing {
    /// Device index of each bin, GPUs first.
    pub(crate) bins: Vec<usize>,
    /// The big class sizes (bytes on a streamed device, [`streamed_size`]).
    pub(crate) classes: Vec<u64>,
    /// quotas[bin][class]: the per-class knapsack's (the bound's) layout.
    pub(crate) quotas: Vec<Vec<u64>>,
    /// The per-byte knapsack's layout, often the better start (equal-sized layers with KV caches).
    pub(crate) byte_quotas: Vec<Vec<u64>>,
    /// The device that takes everything else.
    pub(crate) sink: usize,
}

/// A lower bound on the objective of every feasible assignment of `inst`.
pub fn lower_bound(inst: &Instance) -> f64 {
    lower_bound_with_packing(inst).0
}

/// [`lower_bound`], with the packing its streaming term found (when something must be streamed).
pub(crate) fn lower_bound_with_packing(inst: &Instance) -> (f64, Option<Packing>) {
    let units = BoundUnits::new(inst);
    let base: f64 = units.base.iter().sum();
    let gpu_rows = gpu_rows(inst);
    let (extra, packing) = streaming_extra(inst, &units, &gpu_rows);
    let latency = base + extra_and_changes(inst, &units, &gpu_rows, extra);
    let bound = match inst.cost_model.objective {
        Objective::Latency => latency,
        Objective::Throughput => {
            let most = units.base.iter().copied().fold(0.0, f64::max);
            (latency / inst.execs.len().max(1) as f64).max(most)
        }
    };
    (bound, packing)
}

/// Per-unit facts the bound reasons over.
struct BoundUnits {
    /// Cheapest allowed cost of each unit.
    base: Vec<f64>,
    /// The device a pin leaves each unit (`None`: free).
    pinned: Vec<Option<usize>>,
}

impl BoundUnits {
    fn new(inst: &Instance) -> BoundUnits {
        let k = inst.devices.len();
        let base = (0..inst.n())
            .map(|i| {
                (0..k)
                    .filter(|&b| inst.allowed[i][b])
                    .map(|b| inst.cost[i][b])
                    .fold(f64::INFINITY, f64::min)
            })
            .collect();
        let pinned = (0..inst.n())
            .map(|i| {
                let mut allowed = (0..k).filter(|&b| inst.allowed[i][b]);
                match (allowed.next(), allowed.next()) {
                    (Some(b), None) if k > 1 => Some(b),
                    _ => None,
                }
            })
            .collect();
        BoundUnits { base, pinned }
    }

    fn free(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.pinned.len()).filter(|&i| self.pinned[i].is_none())
    }

    fn pinned_to(&self, b: usize) -> impl Iterator<Item = usize> + '_ {
        (0..self.pinned.len()).filter(move |&i| self.pinned[i] == Some(b))
    }
}

/// Bytes unit `i` takes on a streamed device (the least over them): what the knapsack packs.
/// Never more than it takes on the main GPU, so that a unit a quantizer offloads at full
/// precision (larger than on the GPU) cannot make the bound overstate.
fn streamed_size(inst: &Instance, i: usize) -> u64 {
    let streamed = (0..inst.devices.len())
        .filter(|&b| inst.is_streamed(b))
        .map(|b| inst.unit_bytes_on(i, b))
        .min()
        .unwrap_or_else(|| inst.unit_bytes(i));
    inst.main
        .map_or(streamed, |m| streamed.min(inst.unit_bytes_on(i, m)))
}

/// Bytes unit `i` keeps on a GPU wherever it is (its KV cache when streamed).
fn always_on_gpu(inst: &Instance, i: usize) -> u64 {
    let on_gpu = inst.main.map_or(0, |m| inst.unit_bytes_on(i, m));
    inst.streamed_bytes_on_main(i)
        .min(on_gpu.saturating_sub(streamed_size(inst, i)))
}

/// The GPU rows of `inst`, in device order.
fn gpu_rows(inst: &Instance) -> Vec<usize> {
    (0..inst.devices.len())
        .filter(|&b| inst.devices[b].is_gpu())
        .collect()
}

/// The least streaming extra plus transfer seconds of any plan, given `extra_all`, the streaming
/// extra with every GPU. A plan executing on `j` GPUs (with a main GPU, streamed units execute on
/// it, so the execution devices are the GPUs holding units) cuts at least `j − c` edges and, when
/// the `j` largest GPU rooms cannot hold the free units, streams the rest at no less than the
/// cheapest streaming rate per byte: the least over `j` of both, and never below the plain sum.
/// Without it a start that spreads the units over every GPU (because streaming costs far more
/// than the changes) is never certified, and HiGHS runs.
fn extra_and_changes(
    inst: &Instance,
    units: &BoundUnits,
    gpu_rows: &[usize],
    extra_all: f64,
) -> f64 {
    let needed = execs_needed(inst, units);
    let t_min = cheapest_change(inst);
    let components = transfer_components(inst);
    let cut_seconds = |j: usize| {
        let cuts = j.saturating_sub(components);
        if cuts > 0 && t_min.is_finite() {
            cuts as f64 * t_min
        } else {
            0.0
        }
    };
    // Valid for every plan: the extra of all GPUs and the cuts of the GPUs any plan needs.
    let plain = extra_all + cut_seconds(needed);
    let rate = cheapest_stream_rate(inst, units);
    if inst.main.is_none() || rate <= 0.0 || !rate.is_finite() {
        return plain;
    }
    // GPU bytes of a plan: every free unit's always-on-GPU part, plus the streamed size of each
    // free unit it keeps on a GPU (a GPU copy is at least both).
    let must_hold: u64 = units
        .free()
        .map(|i| streamed_size(inst, i) + always_on_gpu(inst, i))
        .sum();
    let mut rooms: Vec<u64> = gpu_rows.iter().map(|&g| gpu_room(inst, units, g)).collect();
    rooms.sort_unstable_by(|a, b| b.cmp(a));
    let mut held = 0u64;
    let mut best = f64::INFINITY;
    for (k, room) in rooms.iter().enumerate() {
        held += room;
        let j = k + 1;
        let streamed = must_hold.saturating_sub(held) as f64 * rate;
        let extra = if j == rooms.len() {
            extra_all
        } else {
            streamed
        };
        best = best.min(extra + cut_seconds(j.max(needed)));
    }
    plain.max(best)
}

/// The least extra seconds per streamed byte of any free unit on any streamed device.
fn cheapest_stream_rate(inst: &Instance, units: &BoundUnits) -> f64 {
    let streamed: Vec<usize> = (0..inst.devices.len())
        .filter(|&b| inst.is_streamed(b))
        .collect();
    units
        .free()
        .filter(|&i| streamed_size(inst, i) > 0)
        .flat_map(|i| {
            streamed
                .iter()
                .filter(move |&&b| inst.allowed[i][b])
                .map(move |&b| unit_extra(inst, units, i, b) / streamed_size(inst, i) as f64)
        })
        .fold(f64::INFINITY, f64::min)
}

/// The cheapest transfer of any charged flow between two different execution devices.
fn cheapest_change(inst: &Instance) -> f64 {
    (inst.transfers.iter())
        .flat_map(|t| {
            (0..inst.execs.len()).flat_map(move |a| {
                (0..inst.execs.len())
                    .filter(move |&b| b != a)
                    .map(move |b| t.seconds[a][b])
            })
        })
        .fold(f64::INFINITY, f64::min)
}

/// The execution devices any plan uses: every GPU a pin uses, the main GPU when a pin streams a
/// unit, and enough GPUs to hold what cpu and disk cannot.
fn execs_needed(inst: &Instance, units: &BoundUnits) -> usize {
    let gpu_rows: Vec<usize> = (0..inst.devices.len())
        .filter(|&b| inst.devices[b].is_gpu())
        .collect();
    // GPUs that must execute something: every GPU a pin uses, and the main GPU when a pin
    // streams a unit (it executes it).
    let pinned_streamed =
        (0..inst.n()).any(|i| units.pinned[i].is_some_and(|b| inst.is_streamed(b)));
    let used = gpu_rows
        .iter()
        .filter(|&&g| {
            (Some(g) == inst.main && pinned_streamed) || units.pinned_to(g).next().is_some()
        })
        .count();
    // Bytes cpu and disk cannot take must be on GPUs: count the GPUs needed, largest first.
    let off_gpu: u64 = (0..inst.devices.len())
        .filter(|&b| !inst.devices[b].is_gpu())
        .map(|b| inst.caps[b])
        .sum();
    let on_gpus_min: u64 = (0..inst.n())
        .map(|i| streamed_size(inst, i))
        .sum::<u64>()
        .saturating_sub(off_gpu);
    let mut caps: Vec<u64> = gpu_rows.iter().map(|&b| inst.caps[b]).collect();
    caps.sort_unstable_by(|a, b| b.cmp(a));
    let (mut held, mut by_capacity) = (0u64, 0usize);
    for c in caps {
        if held >= on_gpus_min {
            break;
        }
        held += c;
        by_capacity += 1;
    }
    used.max(by_capacity)
}

/// Connected components of the units under the transfers (an undirected union-find).
fn transfer_components(inst: &Instance) -> usize {
    let mut parent: Vec<usize> = (0..inst.n()).collect();
    fn root(parent: &mut [usize], mut x: usize) -> usize {
        while parent[x] != x {
            parent[x] = parent[parent[x]];
            x = parent[x];
        }
        x
    }
    let mut components = inst.n();
    for t in &inst.transfers {
        let (a, b) = (root(&mut parent, t.from), root(&mut parent, t.to));
        if a != b {
            parent[a] = b;
            components -= 1;
        }
    }
    components
}

/// The lower bound on the extra seconds streaming the free units costs (see the module doc):
/// the least over the main GPU's streaming buffer levels.
/// Only the GPUs `gpu_rows` (the main one among them) hold units.
fn streaming_extra(
    inst: &Instance,
    units: &BoundUnits,
    gpu_rows: &[usize],
) -> (f64, Option<Packing>) {
    let Some(main) = inst.main.filter(|m| gpu_rows.contains(m)) else {
        return (0.0, None);
    };
    let free_bytes: u64 = units.free().map(|i| streamed_size(inst, i)).sum();
    let gpu_free: u64 = gpu_rows.iter().map(|&g| gpu_room(inst, units, g)).sum();
    let kv_free: u64 = units.free().map(|i| always_on_gpu(inst, i)).sum();
    if free_bytes + kv_free <= gpu_free || free_bytes == 0 {
        return (0.0, None);
    }
    levels(inst, units, gpu_rows)
        .into_iter()
        .map(|level| {
            // At this level the GPUs hold at most `gpu_cap` of the free units' streamed bytes
            // (the main GPU keeps the level's buffer; each free unit's KV cache is on a GPU
            // wherever it is), so every placement of the level streams at least the rest.
            let gpu_cap = (gpu_rows.iter())
                .map(|&g| {
                    let room = gpu_room(inst, units, g);
                    if g == main {
                        room.saturating_sub(level.reserve)
                    } else {
                        room
                    }
                })
                .sum::<u64>()
                .saturating_sub(kv_free);
            let min_streamed = free_bytes.saturating_sub(gpu_cap);
            let Some(tiers) = Tiers::new(inst, units, min_streamed) else {
                return (0.0, None);
            };
            let mut bins = bins(inst, units, gpu_rows, &tiers, main, level.reserve);
            bins.gpu_total = bins.gpu_total.saturating_sub(kv_free);
            let fixed = tiers.fixed_extra(inst, units, min_streamed);
            pack(inst, units, &bins, &tiers, level, free_bytes, fixed)
        })
        .min_by(|a, b| a.0.total_cmp(&b.0))
        .unwrap_or((0.0, None))
}

/// Room GPU `g` has for free units: its capacity less what pinned units hold there (and, on the
/// main GPU, what pinned streamed units keep on it).
fn gpu_room(inst: &Instance, units: &BoundUnits, g: usize) -> u64 {
    let mut used: u64 = units.pinned_to(g).map(|i| inst.unit_bytes_on(i, g)).sum();
    if Some(g) == inst.main {
        used += (0..inst.n())
            .filter(|&i| units.pinned[i].is_some_and(|b| inst.is_streamed(b)))
            .map(|i| inst.streamed_bytes_on_main(i))
            .sum::<u64>();
    }
    inst.caps[g].saturating_sub(used)
}

/// A streaming-buffer level: the main GPU keeps `reserve` bytes; free units whose streaming
/// buffer is larger than `gpu_only_above` must stay on GPUs.
#[derive(Debug, Clone, Copy)]
struct Level {
    reserve: u64,
    gpu_only_above: u64,
}

/// The buffer is the largest streaming buffer (`Instance::stream_buffer`) of a streamed unit, at
/// least the forced minimum and the largest pinned streamed unit's: one level per candidate size (the 8 smallest), then one level
/// for every larger buffer (reserve the 9th size, no unit forced onto GPUs).
fn levels(inst: &Instance, units: &BoundUnits, gpu_rows: &[usize]) -> Vec<Level> {
    let gpu_total: u64 = gpu_rows.iter().map(|&b| inst.caps[b]).sum();
    let pinned_streamed = (0..inst.n())
        .filter(|&i| units.pinned[i].is_some_and(|b| inst.is_streamed(b)))
        .map(|i| inst.stream_buffer(i))
        .max()
        .unwrap_or(0);
    let floor = forced_reserve(inst, gpu_total).max(pinned_streamed);
    let mut sizes: Vec<u64> = units
        .free()
        .map(|i| inst.stream_buffer(i))
        .filter(|&r| r >= floor)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    let mut out: Vec<Level> = sizes
        .iter()
        .take(8)
        .map(|&r| Level {
            reserve: r,
            gpu_only_above: r,
        })
        .collect();
    // Below the floor nothing free is forced; the buffer is at least `floor`.
    if sizes.first().is_none_or(|&r| r > floor) {
        out.insert(
            0,
            Level {
                reserve: floor,
                gpu_only_above: floor,
            },
        );
    }
    if let Some(&r) = sizes.get(8) {
        out.push(Level {
            reserve: r,
            gpu_only_above: u64::MAX,
        });
    }
    out
}

/// Streamed devices ordered by their extra seconds per byte; the last is the sink.
struct Tiers {
    /// (rate, device), ascending rate.
    tiers: Vec<(f64, usize)>,
    /// Whether each rate is the least per-byte extra of any free unit on its device (several
    /// streamed devices), so that every unit's extra there is its bytes at the rate plus a
    /// non-negative fixed part ([`Tiers::fixed_extra`]).
    least_rates: bool,
}

impl Tiers {
    /// Each streamed device's rate: the least extra seconds per byte of a free unit there; with a
    /// single streamed device, which every placement streams `min_streamed` bytes through, the
    /// [`cover_rate`] of those bytes (tighter when per-unit fixed costs make small units dearer).
    fn new(inst: &Instance, units: &BoundUnits, min_streamed: u64) -> Option<Tiers> {
        let streamed: Vec<usize> = (0..inst.devices.len())
            .filter(|&b| inst.is_streamed(b))
            .collect();
        let rate = |b: usize| -> f64 {
            let per_unit: Vec<(f64, u64)> = units
                .free()
                .filter(|&i| streamed_size(inst, i) > 0)
                .map(|i| (unit_extra(inst, units, i, b), streamed_size(inst, i)))
                .collect();
            let floor = if streamed.len() == 1 { min_streamed } else { 0 };
            cover_rate(per_unit, floor)
        };
        let mut tiers: Vec<(f64, usize)> = streamed
            .iter()
            .map(|&b| (rate(b), b))
            .filter(|(r, _)| r.is_finite())
            .collect();
        tiers.sort_by(|a, b| a.0.total_cmp(&b.0));
        let least_rates = streamed.len() != 1;
        (tiers.last().is_some_and(|t| t.0 > 0.0)).then_some(Tiers { tiers, least_rates })
    }

    /// The least fixed seconds the streamed units pay beyond their bytes at the tiers' rates
    /// (which the knapsack charges): a free unit streamed to tier `b` pays `extra(b) − rate(b) ×
    /// bytes`, at least its least such part over the tiers, and every placement streams units of
    /// at least `min_streamed` bytes, so the cheapest fractional cover of those bytes by these
    /// parts is a floor. Per-tensor copy latencies and per-module hooks make a decoder layer dearer
    /// per byte than a one-tensor embedding, which sets the rate; without this term the bound
    /// stays ~0.2% under the optimum when cpu and disk both stream. With a single streamed device
    /// the rate is already a cover rate, so the term would count those parts twice: 0 there.
    fn fixed_extra(&self, inst: &Instance, units: &BoundUnits, min_streamed: u64) -> f64 {
        if !self.least_rates {
            return 0.0;
        }
        let parts: Vec<(f64, u64)> = units
            .free()
            .filter(|&i| streamed_size(inst, i) > 0)
            .map(|i| {
                let bytes = streamed_size(inst, i);
                let part = (self.tiers.iter())
                    .map(|&(rate, b)| unit_extra(inst, units, i, b) - rate * bytes as f64)
                    .fold(f64::INFINITY, f64::min);
                (part, bytes)
            })
            .collect();
        cheapest_cover(parts, min_streamed)
    }

    fn sink(&self) -> (f64, usize) {
        *self.tiers.last().expect("non-empty")
    }

    fn ahead_of_sink(&self) -> &[(f64, usize)] {
        &self.tiers[..self.tiers.len() - 1]
    }
}

/// The lowest extra seconds per byte over any set of units holding at least `min_bytes` (units as
/// `(extra seconds, bytes)`): the cheapest fractional cover of `min_bytes`, units taken in order of
/// extra seconds per byte, over `min_bytes`; the least per-byte rate when `min_bytes` is 0 or more
/// than the units hold. Valid as a per-byte rate for every set streaming at least `min_bytes`: the
/// cheapest cover's cost over its bytes only grows with the bytes.
fn cover_rate(per_unit: Vec<(f64, u64)>, min_bytes: u64) -> f64 {
    let cheapest = (per_unit.iter())
        .map(|&(e, r)| e / r as f64)
        .fold(f64::INFINITY, f64::min);
    let available: u64 = per_unit.iter().map(|u| u.1).sum();
    if min_bytes == 0 || available < min_bytes {
        return cheapest;
    }
    cheapest.max(cheapest_cover(per_unit, min_bytes) / min_bytes as f64)
}

/// The least `Σ x·seconds` over fractions `x ∈ [0, 1]` of the units (`(seconds, bytes)`, bytes
/// non-zero) that hold at least `min_bytes` in all (every unit when they hold less): the units
/// in order of seconds per byte, the negative ones whole. A floor on the seconds of every set of
/// the units holding `min_bytes`.
fn cheapest_cover(mut per_unit: Vec<(f64, u64)>, min_bytes: u64) -> f64 {
    per_unit.sort_by(|a, b| (a.0 / a.1 as f64).total_cmp(&(b.0 / b.1 as f64)));
    let (mut left, mut cost) = (min_bytes, 0.0);
    for (e, r) in per_unit {
        if e < 0.0 {
            cost += e;
            left = left.saturating_sub(r);
        } else if left > 0 {
            let take = r.min(left);
            cost += e * take as f64 / r as f64;
            left -= take;
        }
    }
    cost
}

/// The extra seconds of free unit `i` on device `b` over its cheapest device.
fn unit_extra(inst: &Instance, units: &BoundUnits, i: usize, b: usize) -> f64 {
    (inst.cost[i][b] - units.base[i]).max(0.0)
}

/// Bins of the knapsack: GPUs first, then the tiers ahead of the sink.
struct Bins {
    /// (device, capacity, saving per byte).
    bins: Vec<(usize, u64, f64)>,
    gpu_bins: usize,
    /// What the GPUs together can hold of the free units.
    gpu_total: u64,
}

fn bins(
    inst: &Instance,
    units: &BoundUnits,
    gpu_rows: &[usize],
    tiers: &Tiers,
    main: usize,
    reserve: u64,
) -> Bins {
    let (sink_rate, _) = tiers.sink();
    let mut bins: Vec<(usize, u64, f64)> = gpu_rows
        .iter()
        .map(|&g| {
            let room = gpu_room(inst, units, g);
            let cap = if g == main {
                room.saturating_sub(reserve)
            } else {
                room
            };
            (g, cap, sink_rate)
        })
        .collect();
    let gpu_total = bins.iter().map(|b| b.1).sum();
    let gpu_caps: u64 = gpu_rows.iter().map(|&b| inst.caps[b]).sum();
    let mut before = gpu_caps;
    for &(r, b) in tiers.ahead_of_sink() {
        // A tier ahead of the sink keeps room for the largest unit the sink streams through it (the
        // cpu for disk units): the forced minimum, or the largest unit pinned to the sink.
        let cap = inst.caps[b];
        let reserve = if Some(b) == inst.cpu {
            let pinned_disk = inst.disk.map_or(0, |d| {
                units
                    .pinned_to(d)
                    .map(|i| inst.stream_buffer(i))
                    .max()
                    .unwrap_or(0)
            });
            forced_reserve(inst, before + cap).max(pinned_disk)
        } else {
            0
        };
        let pinned: u64 = units.pinned_to(b).map(|i| inst.unit_bytes_on(i, b)).sum();
        bins.push((b, cap.saturating_sub(reserve + pinned), sink_rate - r));
        before += cap;
    }
    Bins {
        bins,
        gpu_bins: gpu_rows.len(),
        gpu_total,
    }
}

/// The big size classes the knapsack tracks exactly (at most 4, at most 5,000 states, none under
/// 0.1% of the smallest bin: the fluid rest is credited fractionally, and a 162 MB layer counted
/// fluid beside 24 GB of 1.1 GB layers left deepseek-v2-lite's bound 1.5% low).
fn big_classes(classes: &[(u64, u64)], smallest_cap: u64) -> Vec<(u64, u64)> {
    let mut big: Vec<(u64, u64)> = Vec::new();
    let mut states = 1u64;
    for &(size, count) in classes {
        if big.len() == 4
            || size.saturating_mul(1000) < smallest_cap
            || states * (count + 1) > 5_000
        {
            break;
        }
        states *= count + 1;
        big.push((size, count));
    }
    big
}

/// The knapsack at one level: the least streaming extra of any placement, the larger of two
/// floors over the same packings. Per byte: every unit pays its tier's rate per byte (the sink's
/// off the GPUs) plus the fixed parts [`Tiers::fixed_extra`] counts. Per class: each big size
/// class pays its own least extra on each device (its per-tensor and per-module seconds
/// included), the fluid units their bytes at the rates. The first is tighter when many small
/// units carry fixed costs, the second when big units do (a layer of 1,180 experts, 3,547
/// tensors) and the per-byte rate comes from a one-tensor embedding that stays on a GPU.
fn pack(
    inst: &Instance,
    units: &BoundUnits,
    bins: &Bins,
    tiers: &Tiers,
    level: Level,
    free_bytes: u64,
    fixed: f64,
) -> (f64, Option<Packing>) {
    let (_, sink) = tiers.sink();
    let sizes: Vec<(usize, u64)> = units.free().map(|i| (i, streamed_size(inst, i))).collect();
    let classes = size_classes(&sizes.iter().map(|s| s.1).collect::<Vec<_>>());
    let smallest_cap = (bins.bins.iter().map(|b| b.1))
        .filter(|&c| c > 0)
        .min()
        .unwrap_or(0);
    let big = big_classes(&classes, smallest_cap);
    let members = |size: u64| sizes.iter().filter(move |s| s.1 == size).map(|s| s.0);
    // A class must stay on GPUs when every unit of it buffers more than the level allows streaming.
    let gpu_only: Vec<bool> = big
        .iter()
        .map(|(size, _)| members(*size).all(|i| inst.stream_buffer(i) > level.gpu_only_above))
        .collect();
    let knap = Knapsack::new(&big);
    let fluid = free_bytes - big.iter().map(|(s, c)| s * c).sum::<u64>();
    let per_byte = ClassCosts::per_byte(bins, tiers, &big);
    let least_extra = |size: u64, b: usize| {
        members(size)
            .map(|i| unit_extra(inst, units, i, b))
            .fold(f64::INFINITY, f64::min)
    };
    let per_class = ClassCosts::per_class(bins, tiers, &big, least_extra);
    let at_sink = ClassCosts::bytes(bins, &big).floor(&knap, bins, &gpu_only, fluid);
    let sink_room = sink_room(inst, units, sink) as f64;
    let Some((by_byte, byte_quotas)) = (per_byte.floor(&knap, bins, &gpu_only, fluid))
        .filter(|_| at_sink.is_some_and(|(bytes, _)| bytes <= sink_room + 1.0))
    else {
        return (f64::INFINITY, None); // this level admits no placement
    };
    let Some((by_class, quotas)) = per_class.floor(&knap, bins, &gpu_only, fluid) else {
        return (f64::INFINITY, None);
    };
    let packing = Packing {
        bins: bins.bins.iter().map(|b| b.0).collect(),
        classes: big.iter().map(|(size, _)| *size).collect(),
        quotas,
        byte_quotas,
        sink,
    };
    ((by_byte + fixed).max(by_class), Some(packing))
}

/// Room the sink has for free units: its capacity less what pinned units hold there. What the
/// other bins cannot hold must fit in it, or the level admits no placement.
fn sink_room(inst: &Instance, units: &BoundUnits, sink: usize) -> u64 {
    let pinned: u64 = units
        .pinned_to(sink)
        .map(|i| inst.unit_bytes_on(i, sink))
        .sum();
    inst.caps[sink].saturating_sub(pinned)
}

/// What the knapsack charges: per big class, the least extra a unit of it pays at the sink and
/// what placing it in each bin saves against that (never below 0: a larger saving only lowers the
/// floor); the fluid units pay the sink's rate per byte and save each bin's per-byte saving.
struct ClassCosts {
    /// at_sink[class].
    at_sink: Vec<f64>,
    /// saving[bin][class].
    saving: Vec<Vec<f64>>,
    /// The fluid units' extra seconds per byte at the sink.
    sink_rate: f64,
    /// What a fluid byte saves in each bin.
    fluid_saving: Vec<f64>,
}

impl ClassCosts {
    /// Every byte at its tier's rate (a GPU saves the sink's rate).
    fn per_byte(bins: &Bins, tiers: &Tiers, big: &[(u64, u64)]) -> ClassCosts {
        let (sink_rate, _) = tiers.sink();
        ClassCosts {
            at_sink: big.iter().map(|(s, _)| sink_rate * *s as f64).collect(),
            saving: (bins.bins.iter())
                .map(|b| big.iter().map(|(s, _)| b.2 * *s as f64).collect())
                .collect(),
            sink_rate,
            fluid_saving: bins.bins.iter().map(|b| b.2).collect(),
        }
    }

    /// Bytes instead of seconds: the floor is the bytes the sink must take.
    fn bytes(bins: &Bins, big: &[(u64, u64)]) -> ClassCosts {
        let sizes: Vec<f64> = big.iter().map(|(s, _)| *s as f64).collect();
        ClassCosts {
            at_sink: sizes.clone(),
            saving: vec![sizes; bins.bins.len()],
            sink_rate: 1.0,
            fluid_saving: vec![1.0; bins.bins.len()],
        }
    }

    /// Each class at its least extra on each device (`least_extra(size, device)`).
    fn per_class(
        bins: &Bins,
        tiers: &Tiers,
        big: &[(u64, u64)],
        least_extra: impl Fn(u64, usize) -> f64,
    ) -> ClassCosts {
        let (sink_rate, sink) = tiers.sink();
        let at_sink: Vec<f64> = big.iter().map(|(s, _)| least_extra(*s, sink)).collect();
        let saving = (bins.bins.iter().enumerate())
            .map(|(bin, &(device, _, _))| {
                (big.iter().zip(&at_sink))
                    .map(|((s, _), e)| {
                        let there = if bin < bins.gpu_bins {
                            0.0
                        } else {
                            least_extra(*s, device)
                        };
                        (e - there).max(0.0)
                    })
                    .collect()
            })
            .collect();
        ClassCosts {
            at_sink,
            saving,
            sink_rate,
            fluid_saving: bins.bins.iter().map(|b| b.2).collect(),
        }
    }

    /// The floor: what every unit pays at the sink, less the largest saving of a packing (the
    /// exact knapsack over the big classes, the fluid units at the best per-byte saving, never
    /// more than the bins' capacity at their best per-byte saving); `None` when the level admits
    /// no packing.
    fn floor(
        &self,
        knap: &Knapsack,
        bins: &Bins,
        gpu_only: &[bool],
        fluid: u64,
    ) -> Option<(f64, Vec<Vec<u64>>)> {
        let (big_saving, quotas) = knap.solve(bins, &self.saving, gpu_only)?;
        let best_rate = self.fluid_saving.iter().copied().fold(0.0, f64::max);
        let most_per_byte = |bin: usize| {
            (knap.big.iter().zip(&self.saving[bin]))
                .map(|((s, _), v)| v / *s as f64)
                .fold(self.fluid_saving[bin], f64::max)
        };
        let gpu_caps: u64 = bins.bins[..bins.gpu_bins].iter().map(|b| b.1).sum();
        let gpu_rate = (0..bins.gpu_bins).map(most_per_byte).fold(0.0, f64::max);
        let cap_saving: f64 = gpu_rate * gpu_caps.min(bins.gpu_total) as f64
            + (bins.gpu_bins..bins.bins.len())
                .map(|bin| bins.bins[bin].1 as f64 * most_per_byte(bin))
                .sum::<f64>();
        let saving = (big_saving + fluid as f64 * best_rate).min(cap_saving);
        let paid: f64 = (knap.big.iter().zip(&self.at_sink))
            .map(|((_, c), e)| *c as f64 * e)
            .sum::<f64>()
            + self.sink_rate * fluid as f64;
        Some(((paid - saving).max(0.0), quotas))
    }
}

/// An exact multiple knapsack over a few size classes: states are count vectors (mixed radix).
struct Knapsack {
    big: Vec<(u64, u64)>,
    vectors: Vec<Vec<u64>>,
}

impl Knapsack {
    fn new(big: &[(u64, u64)]) -> Knapsack {
        let radix: Vec<u64> = big.iter().map(|(_, c)| c + 1).collect();
        let n_states = radix.iter().product::<u64>().max(1) as usize;
        let vectors = (0..n_states)
            .map(|mut idx| {
                radix
                    .iter()
                    .map(|&r| {
                        let v = idx as u64 % r;
                        idx /= r as usize;
                        v
                    })
                    .collect()
            })
            .collect();
        Knapsack {
            big: big.to_vec(),
            vectors,
        }
    }

    fn encode(&self, v: &[u64]) -> usize {
        (self.big.iter().zip(v).rev()).fold(0usize, |acc, ((_, c), &x)| {
            acc * (*c as usize + 1) + x as usize
        })
    }

    fn bytes_of(&self, v: &[u64]) -> u64 {
        v.iter().zip(&self.big).map(|(c, (s, _))| c * s).sum()
    }

    /// The packings of one bin that matter: maximal ones (sums are clamped to the class counts,
    /// which covers every smaller packing, as the saving grows with the bytes placed).
    fn maximal_fits(&self, cap: u64) -> Vec<usize> {
        (0..self.vectors.len())
            .filter(|&i| {
                let v = &self.vectors[i];
                let bytes = self.bytes_of(v);
                bytes <= cap
                    && (self.big.iter().zip(v))
                        .all(|((size, count), x)| x == count || bytes + size > cap)
            })
            .collect()
    }

    /// The largest saving and, per bin, the class counts that give it; `None` when no state
    /// leaves every GPU-only class on the GPUs.
    fn solve(
        &self,
        bins: &Bins,
        saving: &[Vec<f64>],
        gpu_only: &[bool],
    ) -> Option<(f64, Vec<Vec<u64>>)> {
        let n_states = self.vectors.len();
        let mut best = vec![f64::NEG_INFINITY; n_states];
        best[0] = 0.0;
        // back[bin][state] = the state before this bin (for reconstructing the packing).
        let mut back: Vec<Vec<usize>> = Vec::with_capacity(bins.bins.len());
        for (bin, &(_, cap, _)) in bins.bins.iter().enumerate() {
            if bin == bins.gpu_bins {
                self.drop_incomplete(&mut best, gpu_only);
            }
            let (next, from) = self.add_bin(&best, cap, &saving[bin]);
            best = next;
            back.push(from);
        }
        if bins.bins.len() == bins.gpu_bins {
            self.drop_incomplete(&mut best, gpu_only);
        }
        let (mut state, saving) = (best.iter().copied().enumerate())
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .filter(|(_, v)| v.is_finite())?;
        let mut quotas = vec![Vec::new(); bins.bins.len()];
        for bin in (0..bins.bins.len()).rev() {
            let prev = back[bin][state];
            quotas[bin] = (self.vectors[state].iter().zip(&self.vectors[prev]))
                .map(|(a, b)| a - b)
                .collect();
            state = prev;
        }
        Some((saving, quotas))
    }

    /// One more bin, placing a unit of class `c` saving `saving[c]`: (best saving per state, the
    /// state each came from).
    fn add_bin(&self, best: &[f64], cap: u64, saving: &[f64]) -> (Vec<f64>, Vec<usize>) {
        let fits = self.maximal_fits(cap);
        let mut next = best.to_vec(); // an empty bin
        let mut from: Vec<usize> = (0..best.len()).collect();
        for st in (0..best.len()).filter(|&st| best[st].is_finite()) {
            for &f in &fits {
                let sum: Vec<u64> = (self.vectors[st].iter().zip(&self.vectors[f]).zip(&self.big))
                    .map(|((a, b), (_, c))| (a + b).min(*c))
                    .collect();
                let added: f64 = (sum.iter().zip(&self.vectors[st]).zip(saving))
                    .map(|((a, b), v)| (a - b) as f64 * v)
                    .sum();
                let v = best[st] + added;
                let t = self.encode(&sum);
                if v > next[t] {
                    next[t] = v;
                    from[t] = st;
                }
            }
        }
        (next, from)
    }

    /// Past the GPU bins, states that left a GPU-only class incomplete are dropped.
    fn drop_incomplete(&self, best: &mut [f64], gpu_only: &[bool]) {
        for (st, v) in best.iter_mut().enumerate() {
            let full = (self.vectors[st].iter().zip(&self.big).zip(gpu_only))
                .all(|((x, (_, c)), f)| !f || x == c);
            if !full {
                *v = f64::NEG_INFINITY;
            }
        }
    }
}

/// A placement that follows the packing bound's per-device class counts: units in chain order take
/// the first device (GPUs first, from the current one on) with quota left for their size class;
/// small units stay with the device before them; what is left goes to the sink. The result is
/// repaired and polished by the caller; `None` if it does not fit.
// Index loops: units are addressed by index in every per-unit table of the instance.
#[allow(clippy::needless_range_loop)]
pub(crate) fn packing_start(
    inst: &Instance,
    packing: &Packing,
    quotas: &[Vec<u64>],
) -> Option<Vec<usize>> {
    let n = inst.n();
    let mut quotas = quotas.to_vec();
    let mut a = vec![packing.sink; n];
    let mut current = 0usize;
    for i in 0..n {
        let w = streamed_size(inst, i);
        let allowed = |b: usize| inst.allowed[i][b];
        if !allowed(packing.sink) {
            // A pinned unit goes to its pin.
            a[i] = (0..inst.devices.len()).find(|&b| allowed(b))?;
            continue;
        }
        match packing.classes.iter().position(|&c| c == w) {
            Some(c) => {
                let order = (current..quotas.len()).chain(0..current);
                if let Some(bin) = order
                    .into_iter()
                    .find(|&bin| quotas[bin][c] > 0 && allowed(packing.bins[bin]))
                {
                    quotas[bin][c] -= 1;
                    a[i] = packing.bins[bin];
                    if inst.devices[a[i]].is_gpu() {
                        current = bin;
                    }
                }
            }
            None => {
                let here = packing.bins.get(current).copied().unwrap_or(packing.sink);
                a[i] = if allowed(here) { here } else { packing.sink };
            }
        }
    }
    if inst.feasible(&a) {
        return Some(a);
    }
    // Small units may not fit where they were put: send them to the sink and let the repair place them.
    for i in 0..n {
        let w = streamed_size(inst, i);
        if !packing.classes.contains(&w) && inst.allowed[i][packing.sink] {
            a[i] = packing.sink;
        }
    }
    relieve_overloads(inst, &mut a, packing.sink);
    inst.feasible(&a).then_some(a)
}

/// Sends the last units of every overloaded GPU to `sink` until each GPU fits (the packing's
/// exact classes may leave a GPU a few units over once KV caches and buffers are charged; the
/// offload repair then brings back what fits). A start only: the caller checks feasibility.
fn relieve_overloads(inst: &Instance, a: &mut [usize], sink: usize) {
    for _ in 0..inst.n() {
        let usage = inst.usage(a);
        let over = (0..inst.devices.len())
            .find(|&b| inst.devices[b].is_gpu() && usage.total(b) > inst.caps[b]);
        let Some(b) = over else { return };
        let last = (0..inst.n())
            .rev()
            .find(|&i| a[i] == b && inst.allowed[i][sink]);
        let Some(i) = last else { return };
        a[i] = sink;
    }
}

#[cfg(test)]
mod tests {
    use super::cover_rate;

    #[test]
    fn cover_rate_takes_the_cheapest_bytes_first() {
        // Per byte: 1.0 (10 bytes), 2.0 (10 bytes), 0.5 (4 bytes).
        let units = vec![(10.0, 10), (20.0, 10), (2.0, 4)];
        // 4 bytes at 0.5 + 10 at 1.0 + 2 at 2.0 = 16 s over 16 bytes.
        assert_eq!(cover_rate(units.clone(), 16), 1.0);
        // Nothing forced, or more than the units hold: the cheapest unit's rate.
        assert_eq!(cover_rate(units.clone(), 0), 0.5);
        assert_eq!(cover_rate(units, 100), 0.5);
    }
}
