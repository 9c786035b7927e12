//! Registry data the corpus needed beyond the first format version, on real safetensors
//! folders written here: repeats whose children carry a prefix (`expert_0`, `expert_1`...),
//! tensors built in the dtype the model is loaded in (`load_dtype`), tensors that exist only for
//! a listed layer type (`if_listed`), floor division and offsets in shapes, and the
//! `Class@model_type` line looked up before the plain class.

use std::path::{Path, PathBuf};

use devmap_core::safetensors::write_file;
use devmap_core::{load_model_with, DType, ModelConfig, Node, Registry};

const HEADER: &str = r#"{"format":"devmap-arch-registry/1","transformers":"test","by_model_type":{"switchy":["Switchy"],"other":["Switchy@other"]}}"#;

/// Experts named `expert_{i}` counted from the checkpoint; a position table of
/// `max_position_embeddings+2` rows built in the load dtype; a grid of `(image//patch)^2` ids; a
/// rotary table that exists only when `layer_types` lists `sliding`.
const SWITCHY: &str = r#"{"class":"Switchy","model_type":"switchy","no_split":["Expert"],"defaults":{"max_position_embeddings":8,"layer_types":["full"]},"tree":{"n":"","c":"Switchy","m":[{"n":"embed","c":"Embedding","p":["weight"]},{"n":"experts","c":"Experts","repeat":{"count":null,"names":"expert_{i}","select":{"by":"all","variant":0},"variants":[{"n":"{i}","c":"Expert","p":["wi"]}]}},{"n":"pos","c":"Sinusoidal","b":[{"n":"weights","ckpt":false,"persistent":false,"dtype":"F32","load_dtype":true,"shape":["max_position_embeddings+2",4]},{"n":"ids","ckpt":false,"persistent":false,"dtype":"I64","shape":[1,"(image_size//patch_size)*(image_size//patch_size)"]},{"n":"sliding_inv_freq","ckpt":false,"persistent":false,"dtype":"F32","shape":[2],"if_listed":{"field":"layer_types","value":"sliding"}}]}]}}"#;

/// The same class as another model type builds it: its head is never in the checkpoint.
const SWITCHY_OTHER: &str = r#"{"class":"Switchy@other","model_type":"other","tree":{"n":"","c":"Switchy","m":[{"n":"embed","c":"Embedding","p":["weight"]},{"n":"head","c":"Linear","p":[{"n":"weight","ckpt":false,"dtype":"F32","load_dtype":true,"shape":[3,4]}]}]}}"#;

fn registry() -> Registry {
    let text = [HEADER, SWITCHY, SWITCHY_OTHER].join("\n") + "\n";
    Registry::parse(text.into(), Path::new("test-registry.jsonl")).unwrap()
}

/// A folder with BF16 tensors of the given shapes and this config.json.
fn folder(dir: &Path, tensors: &[(&str, &[u64])], config: &str) -> PathBuf {
    let owned: Vec<(&str, DType, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let bytes = s.iter().product::<u64>() * 2;
            (*n, DType::BF16, s.to_vec(), vec![0u8; bytes as usize])
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &owned).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir.to_path_buf()
}

fn tensor<'m>(model: &'m devmap_core::Model, name: &str) -> &'m devmap_core::Tensor {
    match model.node(name) {
        Some(Node::Tensor(id)) => model.tensor(id),
        other => panic!("{name} is not a tensor: {other:?}"),
    }
}

fn names(model: &devmap_core::Model) -> Vec<&str> {
    model.tensors().iter().map(|t| t.name.as_str()).collect()
}

const EXPERTS: &[(&str, &[u64])] = &[
    ("embed.weight", &[16, 4]),
    ("experts.expert_0.wi", &[4, 4]),
    ("experts.expert_1.wi", &[4, 4]),
    ("experts.expert_2.wi", &[4, 4]),
];

#[test]
fn named_experts_take_their_count_from_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        r#"{"architectures":["Switchy"],"model_type":"switchy","image_size":30,"patch_size":8}"#;
    let loaded = load_model_with(&folder(dir.path(), EXPERTS, config), &registry()).unwrap();
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    let m = &loaded.model;
    assert_eq!(
        names(m),
        [
            "embed.weight",
            "experts.expert_0.wi",
            "experts.expert_1.wi",
            "experts.expert_2.wi",
            "pos.weights",
            "pos.ids",
        ]
    );
    let Some(Node::Module(expert)) = m.node("experts.expert_2") else {
        panic!("experts.expert_2 is not a module")
    };
    assert_eq!(m.module(expert).class, "Expert");
    // 8 positions + 2 (the padding offset); no config dtype: the checkpoint's floats are BF16.
    let table = tensor(m, "pos.weights");
    assert_eq!(
        (table.dtype, table.shape.clone()),
        (DType::BF16, vec![10, 4])
    );
    // 30 // 8 = 3 patches a side (plain division would give 3.75² = 14).
    assert_eq!(tensor(m, "pos.ids").shape, vec![1, 9]);
}

#[test]
fn listed_layer_types_and_the_config_dtype_decide_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["Switchy"],"model_type":"switchy","dtype":"float16","max_position_embeddings":4,"image_size":16,"patch_size":8,"layer_types":["full","sliding"]}"#;
    let loaded = load_model_with(&folder(dir.path(), EXPERTS, config), &registry()).unwrap();
    let m = &loaded.model;
    let table = tensor(m, "pos.weights");
    assert_eq!((table.dtype, table.shape.clone()), (DType::F16, vec![6, 4]));
    // Not load_dtype: rotary tables stay float32.
    let inv = tensor(m, "pos.sliding_inv_freq");
    assert_eq!((inv.dtype, inv.shape.clone()), (DType::F32, vec![2]));
    assert_eq!(tensor(m, "pos.ids").shape, vec![1, 4]);
}

#[test]
fn a_class_under_another_model_type_uses_that_types_line() {
    let r = registry();
    let cfg = |text: &str| ModelConfig {
        raw: serde_json::from_str(text).unwrap(),
    };
    assert_eq!(
        r.class_for(&cfg(
            r#"{"architectures":["Switchy"],"model_type":"other"}"#
        )),
        Some("Switchy@other")
    );
    assert_eq!(
        r.class_for(&cfg(
            r#"{"architectures":["Switchy"],"model_type":"switchy"}"#
        )),
        Some("Switchy")
    );
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["Switchy"],"model_type":"other"}"#;
    let path = folder(dir.path(), &[("embed.weight", &[16, 4])], config);
    let m = load_model_with(&path, &r).unwrap().model;
    let head = tensor(&m, "head.weight");
    assert_eq!((head.dtype, head.shape.clone()), (DType::BF16, vec![3, 4]));
}
