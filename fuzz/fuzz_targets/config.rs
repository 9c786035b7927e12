//! The small files and flags around a model: `config.json` (downloaded with the checkpoint) with
//! `--kv-cache`, and a `--topology` file. The first byte chooses:
//! - even: `KV SPEC \n config.json`: `ModelConfig::read` and `KvCacheSpec::parse`, then
//!   `bytes_per_layer` (must not overflow) and every config accessor;
//! - odd: a topology file: `Topology::read`, then a cost model built on it must give finite,
//!   non-negative times for every device and link.
#![no_main]

use std::sync::OnceLock;

use devmap_core::{
    CostModel, DType, Device, Exec, KvCacheSpec, Model, ModelBuilder, ModelConfig, Objective,
    Topology,
};
use devmap_fuzz::scratch_dir;
use libfuzzer_sys::fuzz_target;

fn model(config: Option<ModelConfig>) -> Model {
    ModelBuilder::new("fuzz")
        .module("a", "Linear")
        .module("b", "Linear")
        .param("a.weight", DType::BF16, &[64, 16])
        .param("b.weight", DType::BF16, &[64, 16])
        .hidden_size(Some(16))
        .config(config)
        .build()
        .expect("the fixed model builds")
}

fn plain() -> &'static Model {
    static M: OnceLock<Model> = OnceLock::new();
    M.get_or_init(|| model(None))
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    if selector % 2 == 0 {
        let split = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
        let (spec, config) = (&rest[..split], rest.get(split + 1..).unwrap_or_default());
        let path = scratch_dir().join("config.json");
        std::fs::write(&path, config).expect("write the scratch file");
        let Ok(cfg) = ModelConfig::read(&path) else {
            return;
        };
        let _ = (cfg.hidden_size(), cfg.num_layers(), cfg.head_dim());
        let _ = (
            cfg.num_key_value_heads(),
            cfg.tie_word_embeddings(),
            cfg.has_lm_head(),
        );
        let Ok(spec) = std::str::from_utf8(spec) else {
            return;
        };
        if let Ok(kv) = KvCacheSpec::parse(spec) {
            let _ = kv.bytes_per_layer(&model(Some(cfg)));
        }
    } else {
        let path = scratch_dir().join("topology.json");
        std::fs::write(&path, rest).expect("write the scratch file");
        let Ok(topo) = Topology::read(&path) else {
            return;
        };
        let devices = [
            Device::Gpu(0),
            Device::Gpu(1),
            Device::Gpu(7),
            Device::Cpu,
            Device::Disk,
        ];
        let cost = CostModel::new(plain(), &devices, topo, Objective::Latency);
        for d in devices {
            for bytes in [0, 1, 1 << 30] {
                let t = cost.unit_seconds(bytes, d);
                assert!(
                    t.is_finite() && t >= 0.0,
                    "unit_seconds({bytes}, {d}) = {t}"
                );
            }
        }
        let execs = [Exec::Gpu(0), Exec::Gpu(1), Exec::Gpu(7), Exec::Cpu];
        for a in execs {
            for b in execs {
                let t = cost.transfer_seconds(a, b);
                assert!(
                    t.is_finite() && t >= 0.0,
                    "transfer_seconds({a:?}, {b:?}) = {t}"
                );
            }
        }
    }
});
