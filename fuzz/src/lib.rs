//! Helpers shared by the fuzz targets: a scratch folder for the readers that take a path, and
//! `exercise_model`, which runs every model-level computation a loaded model goes through and
//! checks that nothing is lost on the way.

use std::path::PathBuf;
use std::sync::OnceLock;

use devmap_core::graph::{units, ModelGraph};
use devmap_core::{
    validate, CostModel, Device, DeviceMap, Manifest, Model, Objective, SizeRules, Topology,
};

/// A folder of this process's own under the system temp folder (removed by `scripts/fuzz_smoke.sh`
/// and by nothing else: libFuzzer never returns from its loop).
pub fn scratch_dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("devmap-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create the fuzz scratch folder");
        dir
    })
}

/// Everything a successfully loaded model goes through on its way to a plan, with the invariants
/// that must hold for any model the loaders accept:
/// - sizes, module sizes and the total do not panic (no overflow) and agree;
/// - every tensor is in exactly one placement unit; the graph is acyclic;
/// - `{"": 0}` covers every tensor and validates;
/// - a map built from per-tensor devices resolves every tensor to that device, before and after
///   `clean`, survives a JSON round trip, and the cost model gives it a finite, non-negative time;
/// - the model survives a manifest round trip with the same names, dtypes, shapes and sizes.
pub fn exercise_model(model: &Model) {
    let n = model.tensors().len();
    for rules in [
        SizeRules::default(),
        SizeRules {
            target_dtype: Some(devmap_core::DType::F16),
            bool_as_bits: true,
        },
    ] {
        let sizes = model.tensor_sizes(rules);
        assert_eq!(sizes.len(), n);
        let module_sizes = model.module_sizes(&sizes);
        let total = model.total_bytes(rules);
        assert_eq!(module_sizes[0], total, "root size = total");
    }

    let us = units(model);
    let mut seen = vec![0u8; n];
    for u in &us {
        for &t in &u.tensors {
            seen[t] += 1;
        }
    }
    assert!(
        seen.iter().all(|&c| c == 1),
        "every tensor in exactly one unit"
    );
    let graph = ModelGraph::build(model, None);
    assert!(graph.is_acyclic());

    let whole = DeviceMap::whole(Device::Gpu(0));
    let report = validate(model, &whole, None, SizeRules::default());
    assert!(
        report.is_valid(),
        "{{\"\": 0}} must be valid: {:?}",
        report.problems
    );
    assert!(report
        .tensor_devices
        .iter()
        .all(|d| *d == Some(Device::Gpu(0))));

    // Tensors alternate between GPU 0 and the cpu, by module, so maps mix module and tensor keys.
    let devices: Vec<Device> = model
        .tensors()
        .iter()
        .map(|t| {
            if t.module % 2 == 0 {
                Device::Gpu(0)
            } else {
                Device::Cpu
            }
        })
        .collect();
    let map = DeviceMap::from_tensor_devices(model, &devices);
    for m in [&map, &map.clean()] {
        let got = devmap_core::validate::tensor_devices(model, m);
        for (t, d) in got.iter().enumerate() {
            assert_eq!(*d, Some(devices[t]), "tensor {:?}", model.tensor(t).name);
        }
        let back = DeviceMap::from_json_str(&m.to_json().to_string()).expect("own JSON reads back");
        assert_eq!(&back, m);
        let cost = CostModel::new(
            model,
            &[Device::Gpu(0), Device::Cpu],
            Topology::default(),
            Objective::Latency,
        );
        let est = cost.evaluate(model, m, SizeRules::default());
        assert!(
            est.objective_seconds.is_finite() && est.objective_seconds >= 0.0,
            "estimate {est:?}"
        );
    }

    let manifest = Manifest::from_model(model);
    let text = serde_json::to_string(&manifest).expect("a manifest serialises");
    let again = Manifest::from_json(&text, "round-trip.json".as_ref())
        .and_then(|m| m.into_model("round-trip.json".as_ref()))
        .expect("a model's own manifest reads back");
    assert_eq!(again.tensors().len(), n);
    for (a, b) in model.tensors().iter().zip(again.tensors()) {
        assert_eq!((&a.name, a.dtype, &a.shape), (&b.name, b.dtype, &b.shape));
    }
    assert_eq!(
        model.tensor_sizes(SizeRules::default()),
        again.tensor_sizes(SizeRules::default())
    );
}
