//! Property tests over random module trees, tied groups, device sets and budgets.

use devmap_core::cost::CostModel;
use devmap_core::validate::tensor_devices;
use devmap_core::{
    validate, DType, Device, DeviceMap, MemoryBudgets, Model, ModelBuilder, Problem,
};
use devmap_solver::{Auto, Compat, Error, HfGreedy, HfKind, PlanRequest, Strategy as _};
use proptest::prelude::*;

/// A random model: `blocks` numbered blocks (no-split with probability), each with 1–3 leaf
/// modules of 1–2 tensors, an embedding first and a head last, optionally tied to the embedding,
/// optionally a buffer on a leaf.
#[derive(Debug, Clone)]
struct Spec {
    embed: u64,
    blocks: Vec<Vec<Vec<u64>>>,
    no_split: bool,
    tied_head: bool,
    buffer: bool,
}

fn spec() -> impl Strategy<Value = Spec> {
    (
        1u64..200,
        prop::collection::vec(
            prop::collection::vec(prop::collection::vec(1u64..120, 1..3), 1..4),
            1..7,
        ),
        any::<bool>(),
        any::<bool>(),
        any::<bool>(),
    )
        .prop_map(|(embed, blocks, no_split, tied_head, buffer)| Spec {
            embed,
            blocks,
            no_split,
            tied_head,
            buffer,
        })
}

fn build(s: &Spec) -> Model {
    let mut b = ModelBuilder::new("random").hidden_size(Some(64));
    b = b
        .module("embed", "Embedding")
        .param("embed.weight", DType::F16, &[s.embed, 64]);
    b = b.module("blocks", "ModuleList");
    for (i, block) in s.blocks.iter().enumerate() {
        b = b.module(format!("blocks.{i}"), "Block");
        for (j, leaf) in block.iter().enumerate() {
            b = b.module(format!("blocks.{i}.l{j}"), "Linear");
            for (k, elems) in leaf.iter().enumerate() {
                b = b.param(format!("blocks.{i}.l{j}.p{k}"), DType::F16, &[*elems, 32]);
            }
        }
    }
    if s.buffer {
        b = b.buffer("blocks.0.l0.running", DType::F32, &[16]);
    }
    b = b
        .module("head", "Linear")
        .param("head.weight", DType::F16, &[s.embed, 64]);
    if s.tied_head {
        b = b.tied(vec!["embed.weight".into(), "head.weight".into()]);
    }
    let classes = if s.no_split {
        vec!["Block".to_string()]
    } else {
        vec![]
    };
    b.no_split_classes(classes).build().unwrap()
}

fn budgets(gpus: &[u64], cpu: Option<u64>, disk: bool) -> MemoryBudgets {
    let mut pairs: Vec<(Device, u64)> = gpus
        .iter()
        .enumerate()
        .map(|(i, c)| (Device::Gpu(i as u32), *c))
        .collect();
    if let Some(c) = cpu {
        pairs.push((Device::Cpu, c));
    }
    if disk {
        pairs.push((Device::Disk, 1 << 40));
    }
    MemoryBudgets::new(pairs).unwrap()
}

fn budget_strategy() -> impl Strategy<Value = MemoryBudgets> {
    (
        prop::collection::vec(1_000u64..200_000, 1..4),
        prop::option::of(10_000u64..400_000),
        any::<bool>(),
    )
        .prop_map(|(g, c, d)| budgets(&g, c, d))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Every strategy returns a valid map or a typed "does not fit"/"Hugging Face raises" error.
    #[test]
    fn strategies_are_valid_or_say_why(s in spec(), b in budget_strategy()) {
        let model = build(&s);
        let req = PlanRequest::new(&model, &b);
        for compat in [Compat::Transformers, Compat::Accelerate] {
            for kind in [HfKind::Sequential, HfKind::Balanced, HfKind::BalancedLow0] {
                let strategy = HfGreedy { kind, compat, spill_to_disk: false };
                match strategy.plan(&req) {
                    Ok(plan) => {
                        let report = validate(&model, &plan.map, Some(&b), plan.size_rules);
                        for p in report.errors() {
                            // Hugging Face's own quirk, reproduced on purpose: a split module's
                            // direct buffers get no key.
                            let hf_quirk = matches!(p, Problem::Uncovered { tensors, .. } if tensors.iter().all(|t| t == "blocks.0.l0.running"));
                            prop_assert!(hf_quirk, "{kind:?} {compat:?}: {p}\nmap {:?}", plan.map);
                        }
                    }
                    Err(Error::DoesNotFit { .. } | Error::HfRaises(_)) => {}
                    Err(e) => prop_assert!(false, "{kind:?} {compat:?}: unexpected error {e}"),
                }
            }
        }
        match Auto::default().plan(&req) {
            Ok(plan) => {
                let report = validate(&model, &plan.map, Some(&b), plan.size_rules);
                prop_assert!(report.is_valid(), "auto: {:?}\nmap {:?}", report.problems, plan.map);
            }
            Err(Error::DoesNotFit { .. } | Error::Infeasible(_)) => {}
            Err(e) => prop_assert!(false, "auto: unexpected error {e}"),
        }
    }

    /// `auto` is never worse than any greedy map that fits devmap's memory rules.
    #[test]
    fn auto_never_worse_than_greedy(s in spec(), b in budget_strategy()) {
        let model = build(&s);
        let req = PlanRequest::new(&model, &b);
        let auto = Auto::default();
        let Ok(plan) = auto.plan(&req) else { return Ok(()) };
        let inst = auto.instance(&req).unwrap();
        let cm = CostModel::new(&model, &b.devices(), Default::default(), Default::default());
        let ours = cm.evaluate(&model, &plan.map, plan.size_rules).objective_seconds;
        for compat in [Compat::Transformers, Compat::Accelerate] {
            for kind in [HfKind::Sequential, HfKind::Balanced, HfKind::BalancedLow0] {
                let Ok(hp) = (HfGreedy { kind, compat, spill_to_disk: false }).plan(&req) else { continue };
                let Some(a) = inst.from_map(&model, &hp.map) else { continue };
                if !inst.feasible(&a) {
                    continue;
                }
                let theirs = cm.evaluate(&model, &hp.map, hp.size_rules).objective_seconds;
                // Within the solver's relative gap (5e-4).
                prop_assert!(ours <= theirs * (1.0 + 5e-4) + 1e-12, "{kind:?} {compat:?}: auto {ours} > {theirs}");
            }
        }
    }

    /// `clean` never changes which device a tensor is on.
    #[test]
    fn clean_preserves_meaning(s in spec(), picks in prop::collection::vec(0u8..4, 64)) {
        let model = build(&s);
        let devices = [Device::Gpu(0), Device::Gpu(1), Device::Cpu, Device::Disk];
        let mut raw = DeviceMap::new();
        for (i, t) in model.tensors().iter().enumerate() {
            raw.insert(t.name.clone(), devices[picks[i % picks.len()] as usize]);
        }
        let cleaned = raw.clean();
        prop_assert_eq!(tensor_devices(&model, &raw), tensor_devices(&model, &cleaned));
        prop_assert!(cleaned.len() <= raw.len());
        // Cleaning twice changes nothing more.
        prop_assert_eq!(cleaned.clean(), cleaned.clone());
        // The minimal map built from per-tensor devices means the same too.
        let per: Vec<Device> = tensor_devices(&model, &raw).into_iter().map(|d| d.unwrap()).collect();
        let built = DeviceMap::from_tensor_devices(&model, &per);
        prop_assert_eq!(tensor_devices(&model, &built), tensor_devices(&model, &raw));
    }
}
