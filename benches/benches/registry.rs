//! Criterion benches of the architecture registry lookup (the bound: under 1 ms added to
//! `devmap plan`).
//!
//! - `registry/open`: open the embedded registry (header check, build-time line index): what each
//!   `devmap` process pays once; `registry/parse-file`: the same text opened as an
//!   `--arch-registry` file is (every line scanned).
//! - `registry/find/{class}`: look a class up from a config.json and parse its line (and the lines
//!   it refs).
//! - `registry/load/examples-tiny-llama/{registry,inference}`: `load_model_with` on the example
//!   checkpoint folder with the embedded registry (rebuilt as `LlamaForCausalLM`) and with an empty
//!   one (today's inference), so the difference is the whole cost the registry adds to reading.
//!
//! - `registry/plan-path/{folder}/{registry,inference}`: what a `devmap plan FOLDER` process
//!   pays to read a corpus folder (`fixtures/folders/`): open the embedded registry, look its
//!   class up and rebuild the checkpoint (`Registry::open_embedded` + `load_model_with`), against
//!   the inference with an empty registry; the difference is the registry's cost per plan.
//!
//! `cargo bench -p devmap-benches --bench registry`

use std::borrow::Cow;
use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use devmap_core::{load_model_with, ModelConfig, Registry};

const EMBEDDED: &str = include_str!("../../crates/devmap-core/registry/arch-registry.jsonl");

fn config(architecture: &str) -> ModelConfig {
    ModelConfig {
        raw: serde_json::json!({ "architectures": [architecture] }),
    }
}

fn registry(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    let path = Path::new("arch-registry.jsonl");
    g.bench_function("open", |b| b.iter(|| Registry::open_embedded().unwrap()));
    g.bench_function("parse-file", |b| {
        b.iter(|| Registry::parse(Cow::Borrowed(black_box(EMBEDDED)), path).unwrap())
    });
    let reg = Registry::parse(Cow::Borrowed(EMBEDDED), path).unwrap();
    for class in [
        "LlamaForCausalLM",
        "T5ForConditionalGeneration",
        "Qwen2VLForConditionalGeneration",
        "DeepseekV3ForCausalLM",
    ] {
        let cfg = config(class);
        g.bench_function(format!("find/{class}"), |b| {
            b.iter(|| {
                reg.find(black_box(&cfg))
                    .unwrap()
                    .expect("class in the registry")
            })
        });
    }
    let folder = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../examples/tiny-llama");
    let header = EMBEDDED.lines().next().unwrap().to_string();
    let empty = Registry::parse(Cow::Owned(header), path).unwrap();
    g.bench_function("load/examples-tiny-llama/registry", |b| {
        b.iter(|| load_model_with(black_box(&folder), &reg).unwrap())
    });
    g.bench_function("load/examples-tiny-llama/inference", |b| {
        b.iter(|| load_model_with(black_box(&folder), &empty).unwrap())
    });
    g.finish();
}

/// Corpus folders of several shapes: a plain decoder, an encoder-decoder with nested variants,
/// a vision-language model with conversions, an MoE with fused experts.
const FOLDERS: [&str; 4] = ["llama-tied", "t5-tied", "qwen2-vl-untied", "mixtral-untied"];

fn plan_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("registry/plan-path");
    g.sample_size(20)
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(300));
    let path = Path::new("arch-registry.jsonl");
    let header = EMBEDDED.lines().next().unwrap().to_string();
    let empty = Registry::parse(Cow::Owned(header), path).unwrap();
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/folders");
    for name in FOLDERS {
        let folder = root.join(name);
        g.bench_function(format!("{name}/registry"), |b| {
            b.iter(|| {
                let reg = Registry::open_embedded().unwrap();
                load_model_with(black_box(&folder), &reg).unwrap()
            })
        });
        g.bench_function(format!("{name}/inference"), |b| {
            b.iter(|| load_model_with(black_box(&folder), &empty).unwrap())
        });
    }
    g.finish();
}

criterion_group!(benches, registry, plan_path);
criterion_main!(benches);
