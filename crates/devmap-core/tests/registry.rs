//! The architecture registry applied to real safetensors folders written here: registration
//! order, tensorless modules, non-persistent buffers, ties by config (class defaults included),
//! fused experts, variant selection, aliases, what transformers ignores; hostile registry files
//! (each error names the file and line); shards given alone; the note for unknown architectures;
//! and the embedded registry itself (every class line parses).

use std::path::{Path, PathBuf};

use devmap_core::safetensors::write_file;
use devmap_core::{load_model_with, DType, ModelConfig, Node, Registry, SizeRules};

const HEADER: &str = r#"{"format":"devmap-arch-registry/1","transformers":"test","by_model_type":{"tiny":["TinyModel","TinyForCausalLM"]}}"#;

/// A causal LM whose base model is a `ref`'d line: MoE experts fused on load, a rotary buffer
/// the checkpoint never holds, a tensorless dropout, a persistent buffer on the base model.
const TINY_LM: &str = r#"{"class":"TinyForCausalLM","model_type":"tiny","no_split":["TinyLayer"],"tied":[{"t":"lm_head.weight","s":"model.embed.weight","if":{"field":"tie_word_embeddings","default":true}}],"tree":{"n":"","c":"TinyForCausalLM","m":[{"n":"model","ref":"TinyModel"},{"n":"lm_head","c":"Linear","p":["weight"]}]}}"#;

const TINY_BASE: &str = r#"{"class":"TinyModel","model_type":"tiny","no_split":["TinyLayer"],"defaults":{"num_layers":2,"head_dim":null},"derived":{"head_dim":"hidden/heads"},"tree":{"n":"","c":"TinyModel","b":["step"],"m":[{"n":"embed","c":"Embedding","p":["weight"]},{"n":"layers","c":"ModuleList","repeat":{"count":"num_layers","select":{"by":"all","variant":0},"variants":[{"n":"{i}","c":"TinyLayer","m":[{"n":"attn","c":"Linear","p":["weight"]},{"n":"drop","c":"Dropout"},{"n":"moe","c":"TinyMoe","p":[{"n":"gate_up","src":{"keys":[["layers.{i0}.moe.experts.{e}.w1"],["layers.{i0}.moe.experts.{e}.w3"]],"ops":[{"op":"stack","dim":0},{"op":"concat","dim":1}]}}]}]}]}},{"n":"norm","c":"Norm","p":["weight"]},{"n":"rotary","c":"Rotary","b":[{"n":"inv_freq","ckpt":false,"persistent":false,"dtype":"F32","shape":["head_dim/2"]}]}]}}"#;

/// Layers chosen by `layer_types`, blocks chosen by which tensors the checkpoint holds (the first
/// block alone has a bias, as T5's first block alone has a relative attention bias), an alias.
const TINY_HYBRID: &str = r#"{"class":"TinyHybrid","model_type":"tiny_hybrid","no_split":["Full","Lin"],"tree":{"n":"","c":"TinyHybrid","b":[{"n":"freq","ckpt":false,"dtype":"F32","shape":["rope.factor*8"]},{"n":"pos","ckpt":false,"dtype":"I64","shape":[1,"?"],"shape_default":[1,577]}],"m":[{"n":"embed","c":"Embedding","p":["weight"]},{"n":"embed_again","alias":"embed"},{"n":"layers","c":"ModuleList","repeat":{"count":"num_layers","select":{"by":"list","field":"layer_types","values":{"full":0,"lin":1}},"variants":[{"n":"{i}","c":"Full","p":["attn"]},{"n":"{i}","c":"Lin","p":["conv"]}]}},{"n":"blocks","c":"ModuleList","repeat":{"count":null,"select":{"by":"checkpoint"},"variants":[{"n":"{i}","c":"Block","p":["w"]},{"n":"{i}","c":"Block","p":["w","bias"]}]}}]}}"#;

fn registry_text() -> String {
    [HEADER, TINY_LM, TINY_BASE, TINY_HYBRID].join("\n") + "\n"
}

fn registry() -> Registry {
    Registry::parse(registry_text().into(), Path::new("test-registry.jsonl")).unwrap()
}

fn zeros(dtype: DType, shape: &[u64]) -> (DType, Vec<u64>, Vec<u8>) {
    let n: u64 = shape.iter().product();
    (
        dtype,
        shape.to_vec(),
        vec![0u8; (n * dtype.size_bytes()) as usize],
    )
}

/// A folder holding one BF16 safetensors file (I64 for names ending in `step`) and config.json.
fn folder(dir: &Path, tensors: &[(&str, &[u64])], config: &str) -> PathBuf {
    let owned: Vec<(&str, DType, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let dtype = if n.ends_with("step") {
                DType::I64
            } else {
                DType::BF16
            };
            let (d, s, b) = zeros(dtype, s);
            (*n, d, s, b)
        })
        .collect();
    write_file(&dir.join("model.safetensors"), &owned).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    dir.to_path_buf()
}

const EXPERT: &[u64] = &[6, 8];

fn tiny_lm_tensors() -> Vec<(String, Vec<u64>)> {
    let mut t: Vec<(String, Vec<u64>)> = vec![
        ("model.embed.weight".into(), vec![16, 8]),
        ("model.norm.weight".into(), vec![8]),
        ("model.step".into(), vec![1]),
    ];
    for i in 0..2 {
        t.push((format!("model.layers.{i}.attn.weight"), vec![8, 8]));
        for e in 0..3 {
            for w in ["w1", "w3"] {
                t.push((
                    format!("model.layers.{i}.moe.experts.{e}.{w}"),
                    EXPERT.to_vec(),
                ));
            }
        }
    }
    t
}

fn write_tiny_lm(dir: &Path, extra: &[(&str, &[u64])], config: &str) -> PathBuf {
    let owned = tiny_lm_tensors();
    let mut refs: Vec<(&str, &[u64])> = owned
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    refs.extend_from_slice(extra);
    folder(dir, &refs, config)
}

const TINY_CONFIG: &str =
    r#"{"architectures":["TinyForCausalLM"],"model_type":"tiny","hidden":8,"heads":2}"#;

fn names(model: &devmap_core::Model) -> Vec<&str> {
    model.tensors().iter().map(|t| t.name.as_str()).collect()
}

fn tensor<'m>(model: &'m devmap_core::Model, name: &str) -> &'m devmap_core::Tensor {
    match model.node(name) {
        Some(Node::Tensor(id)) => model.tensor(id),
        other => panic!("{name} is not a tensor: {other:?}"),
    }
}

#[test]
fn a_known_class_is_rebuilt_in_registration_order() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_lm(dir.path(), &[], TINY_CONFIG);
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    let m = &loaded.model;
    // Parameters in named_parameters order (preorder, the tied head included), then buffers in
    // named_buffers order (the base model's own buffer before its children's).
    assert_eq!(
        names(m),
        [
            "model.embed.weight",
            "model.layers.0.attn.weight",
            "model.layers.0.moe.gate_up",
            "model.layers.1.attn.weight",
            "model.layers.1.moe.gate_up",
            "model.norm.weight",
            "lm_head.weight",
            "model.step",
            "model.rotary.inv_freq",
        ]
    );
    let modules: Vec<(&str, &str)> = m.modules()[1..]
        .iter()
        .map(|x| (x.name.as_str(), x.class.as_str()))
        .collect();
    assert_eq!(
        &modules[..7],
        &[
            ("model", "TinyModel"),
            ("model.embed", "Embedding"),
            ("model.layers", "ModuleList"),
            ("model.layers.0", "TinyLayer"),
            ("model.layers.0.attn", "Linear"),
            ("model.layers.0.drop", "Dropout"),
            ("model.layers.0.moe", "TinyMoe"),
        ]
    );
    assert_eq!(
        modules[modules.len() - 3..],
        [
            ("model.norm", "Norm"),
            ("model.rotary", "Rotary"),
            ("lm_head", "Linear")
        ]
    );
    assert_eq!(m.module(0).class, "TinyForCausalLM");
    assert_eq!(m.no_split_classes(), vec!["TinyLayer".to_string()]);
    // Three experts of [6, 8] stacked, gate and up concatenated: [3, 12, 8], no single source.
    let fused = tensor(m, "model.layers.1.moe.gate_up");
    assert_eq!(fused.shape, vec![3, 12, 8]);
    assert_eq!(fused.dtype, DType::BF16);
    assert!(fused.source.is_none());
    assert!(fused.converted, "built from six checkpoint tensors on load");
    assert!(tensor(m, "model.embed.weight").source.is_some());
    assert!(!tensor(m, "model.embed.weight").converted);
    // The GPU it loads on keeps 2.5 x the 576-byte fused tensor fragmented (any workload).
    let w = devmap_core::memory::Workload::default();
    assert_eq!(devmap_core::memory::conversion_fragmentation(m, &w), 1440);
    // A manifest dumped from the folder keeps the mark (and only the converted tensor has it).
    let text = serde_json::to_string(&devmap_core::Manifest::from_model(m)).unwrap();
    assert_eq!(text.matches("\"converted\":true").count(), 2, "{text}");
    let origin = Path::new("dumped.json");
    let back = devmap_core::Manifest::from_json(&text, origin)
        .unwrap()
        .into_model(origin)
        .unwrap();
    assert!(tensor(&back, "model.layers.1.moe.gate_up").converted);
    assert_eq!(
        devmap_core::memory::conversion_fragmentation(&back, &w),
        1440
    );
    // head_dim = hidden / heads (derived), inv_freq has head_dim / 2 elements.
    let inv = tensor(m, "model.rotary.inv_freq");
    assert_eq!((inv.dtype, inv.shape.clone()), (DType::F32, vec![2]));
    // The class default ties the head: config.json has no tie_word_embeddings.
    let Some(Node::Tensor(head)) = m.node("lm_head.weight") else {
        panic!()
    };
    assert!(m.is_tied_duplicate(head) && m.is_tied_target(head));
    assert_eq!(m.tensor(head).shape, vec![16, 8]);
    let stored = (16 * 8 + 2 * (8 * 8 + 3 * 12 * 8) + 8) * 2 + 8 + 2 * 4;
    assert_eq!(m.total_bytes(SizeRules::default()), stored);
}

#[test]
fn an_untied_config_without_a_head_falls_back_and_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["TinyForCausalLM"],"model_type":"tiny","hidden":8,"heads":2,"tie_word_embeddings":false}"#;
    let path = write_tiny_lm(dir.path(), &[], config);
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
    let note = &loaded.notes[0];
    for part in [
        "TinyForCausalLM",
        "\"lm_head.weight\"",
        "inferred the module tree",
    ] {
        assert!(note.contains(part), "{note}");
    }
    assert!(loaded.model.node("lm_head.weight").is_none());
}

#[test]
fn an_untied_checkpoint_with_its_head_is_not_tied() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        r#"{"architectures":["TinyForCausalLM"],"hidden":8,"heads":2,"tie_word_embeddings":false}"#;
    let path = write_tiny_lm(dir.path(), &[("lm_head.weight", &[16, 8])], config);
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    assert!(loaded.model.tied_groups().is_empty());
    assert!(tensor(&loaded.model, "lm_head.weight").source.is_some());
}

#[test]
fn keys_transformers_ignores_are_left_out_with_a_note() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_lm(
        dir.path(),
        &[("model.layers.0.old.weight", &[4])],
        TINY_CONFIG,
    );
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert!(loaded.model.node("model.layers.0.old.weight").is_none());
    assert_eq!(loaded.notes.len(), 1);
    assert!(
        loaded.notes[0].contains("\"model.layers.0.old.weight\"")
            && loaded.notes[0].contains("ignores them"),
        "{:?}",
        loaded.notes
    );
}

#[test]
fn a_checkpoint_in_the_fused_layout_keeps_its_keys() {
    let dir = tempfile::tempdir().unwrap();
    let fused: Vec<(String, Vec<u64>)> = tiny_lm_tensors()
        .into_iter()
        .filter(|(n, _)| !n.contains(".experts."))
        .chain((0..2).map(|i| (format!("model.layers.{i}.moe.gate_up"), vec![3, 12, 8])))
        .collect();
    let refs: Vec<(&str, &[u64])> = fused
        .iter()
        .map(|(n, s)| (n.as_str(), s.as_slice()))
        .collect();
    let path = folder(dir.path(), &refs, TINY_CONFIG);
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert!(loaded.notes.is_empty(), "{:?}", loaded.notes);
    let fused = tensor(&loaded.model, "model.layers.0.moe.gate_up");
    assert!(fused.source.is_some() && !fused.converted);
    let w = devmap_core::memory::Workload::default();
    assert_eq!(
        devmap_core::memory::conversion_fragmentation(&loaded.model, &w),
        0,
        "nothing is converted on load"
    );
}

#[test]
fn variants_follow_layer_types_and_the_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["TinyHybrid"],"num_layers":3,"layer_types":["lin","full","lin"],"rope":{"factor":0.25}}"#;
    let path = folder(
        dir.path(),
        &[
            ("embed.weight", &[4, 2]),
            ("layers.0.conv", &[3]),
            ("layers.1.attn", &[5]),
            ("layers.2.conv", &[3]),
            ("blocks.0.w", &[2]),
            ("blocks.0.bias", &[2]),
            ("blocks.1.w", &[2]),
        ],
        config,
    );
    let loaded = load_model_with(&path, &registry()).unwrap();
    // `pos` has an unknown dimension: sized at the class defaults, and said so.
    assert_eq!(loaded.notes.len(), 1, "{:?}", loaded.notes);
    assert!(loaded.notes[0].contains("\"pos\"") && loaded.notes[0].contains("class defaults"));
    let m = &loaded.model;
    assert_eq!(tensor(m, "pos").shape, vec![1, 577]);
    // A fractional config field: 0.25 * 8.
    assert_eq!(tensor(m, "freq").shape, vec![2]);
    let class = |name: &str| match m.node(name) {
        Some(Node::Module(id)) => m.module(id).class.clone(),
        other => panic!("{name}: {other:?}"),
    };
    assert_eq!(
        [class("layers.0"), class("layers.1"), class("layers.2")],
        ["Lin", "Full", "Lin"]
    );
    assert!(m.node("blocks.0.bias").is_some() && m.node("blocks.1.bias").is_none());
    // The alias repeats the embedding under its second name, sharing its storage.
    assert_eq!(class("embed_again"), "Embedding");
    let Some(Node::Tensor(again)) = m.node("embed_again.weight") else {
        panic!("no alias tensor")
    };
    assert!(m.is_tied_duplicate(again) && !m.is_tied_target(again));
    assert_eq!(names(m)[..2], ["embed.weight", "embed_again.weight"]);
}

#[test]
fn a_config_without_the_listed_layer_type_falls_back() {
    let dir = tempfile::tempdir().unwrap();
    let config = r#"{"architectures":["TinyHybrid"],"num_layers":2,"layer_types":["lin"]}"#;
    let path = folder(
        dir.path(),
        &[
            ("embed.weight", &[4, 2]),
            ("layers.0.conv", &[3]),
            ("layers.1.conv", &[3]),
        ],
        config,
    );
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert!(
        loaded.notes[0].contains("layer_types[1]") && loaded.notes[0].contains("TinyHybrid"),
        "{:?}",
        loaded.notes
    );
}

#[test]
fn lookup_by_architectures_then_model_type() {
    let r = registry();
    let cfg = |text: &str| ModelConfig {
        raw: serde_json::from_str(text).unwrap(),
    };
    assert_eq!(
        r.class_for(&cfg(r#"{"architectures":["Nope","TinyModel"]}"#)),
        Some("TinyModel")
    );
    assert_eq!(
        r.class_for(&cfg(r#"{"model_type":"tiny"}"#)),
        Some("TinyModel")
    );
    assert_eq!(
        r.class_for(&cfg(r#"{"architectures":["Nope"],"model_type":"other"}"#)),
        None
    );
}

#[test]
fn unknown_architectures_keep_the_inference_and_say_what_was_inferred() {
    let dir = tempfile::tempdir().unwrap();
    let config =
        r#"{"architectures":["WeirdForCausalLM"],"model_type":"weird","tie_word_embeddings":true}"#;
    let path = folder(
        dir.path(),
        &[
            ("model.embed_tokens.weight", &[8, 2]),
            ("model.layers.0.w", &[2]),
            ("model.layers.1.w", &[2]),
        ],
        config,
    );
    let loaded = load_model_with(&path, &registry()).unwrap();
    let note = &loaded.notes[0];
    for part in [
        "WeirdForCausalLM",
        "model_type weird",
        "test-registry.jsonl",
        "model.layers.*",
        "lm_head.weight restored",
    ] {
        assert!(note.contains(part), "{part}: {note}");
    }
    assert!(loaded.model.node("lm_head.weight").is_some());
}

#[test]
fn a_missing_tie_flag_without_a_registry_entry_is_not_a_tie() {
    let dir = tempfile::tempdir().unwrap();
    let path = folder(
        dir.path(),
        &[("model.embed_tokens.weight", &[8, 2])],
        r#"{"architectures":["WeirdForConditionalGeneration"],"text_config":{"tie_word_embeddings":true}}"#,
    );
    let loaded = load_model_with(&path, &registry()).unwrap();
    assert!(loaded.model.node("lm_head.weight").is_none());
    assert!(
        loaded.notes[0].contains("no tied weights"),
        "{:?}",
        loaded.notes
    );
}

// ---------------------------------------------------------------- shards given alone

fn sharded(dir: &Path) -> (PathBuf, PathBuf) {
    let (s1, s2) = (
        dir.join("model-00001-of-00002.safetensors"),
        dir.join("model-00002-of-00002.safetensors"),
    );
    write_file(&s1, &[("a.w", DType::BF16, vec![2], vec![0; 4])]).unwrap();
    write_file(&s2, &[("b.w", DType::BF16, vec![3], vec![0; 6])]).unwrap();
    (s1, s2)
}

#[test]
fn a_shard_with_its_index_is_planned_as_the_whole_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, _) = sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    std::fs::write(
        &index,
        r#"{"weight_map":{"a.w":"model-00001-of-00002.safetensors","b.w":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let loaded = load_model_with(&s1, &registry()).unwrap();
    assert_eq!(loaded.model.tensors().len(), 2);
    assert!(
        loaded.notes[0].contains("one shard")
            && loaded.notes[0].contains(&index.display().to_string()),
        "{:?}",
        loaded.notes
    );
}

#[test]
fn a_lone_shard_is_refused_naming_the_index() {
    let dir = tempfile::tempdir().unwrap();
    let (s1, _) = sharded(dir.path());
    let index = dir.path().join("model.safetensors.index.json");
    let e = load_model_with(&s1, &registry()).unwrap_err().to_string();
    assert!(
        e.contains(&s1.display().to_string()) && e.contains(&index.display().to_string()),
        "{e}"
    );
    // An index that does not list the shard: still refused, and said so.
    std::fs::write(
        &index,
        r#"{"weight_map":{"b.w":"model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    let e = load_model_with(&s1, &registry()).unwrap_err().to_string();
    assert!(e.contains("does not list it"), "{e}");
    // A file not named like a shard is a whole checkpoint.
    let single = dir.path().join("other.safetensors");
    std::fs::copy(&s1, &single).unwrap();
    assert_eq!(
        load_model_with(&single, &registry())
            .unwrap()
            .model
            .tensors()
            .len(),
        1
    );
}

// ---------------------------------------------------------------- hostile registry files

/// `Registry::read` of `text` must fail naming the file, `:line:` and every culprit.
#[track_caller]
fn refused(text: &str, line: usize, culprits: &[&str]) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.jsonl");
    std::fs::write(&path, text).unwrap();
    let e = Registry::read(&path).unwrap_err().to_string();
    let at = format!("{}:{line}:", path.display());
    assert!(e.contains(&at), "does not name {at}: {e}");
    for c in culprits {
        assert!(e.contains(c), "does not name {c}: {e}");
    }
}

#[test]
fn hostile_registry_files_name_the_file_and_line() {
    refused("", 1, &["header"]);
    refused("not json\n", 1, &["header", "expected"]);
    refused(
        r#"{"format":"devmap-arch-registry/2"}"#,
        1,
        &["devmap-arch-registry/2", "devmap-arch-registry/1"],
    );
    refused(
        &format!("{HEADER}\n{TINY_BASE}\n{{\"model_type\":\"x\",\"class\":\"X\"}}\n"),
        3,
        &["must start with {\"class\""],
    );
    refused(
        &format!("{HEADER}\n{TINY_BASE}\n{TINY_BASE}\n"),
        3,
        &["\"TinyModel\"", "also on line 2"],
    );
    let missing = Registry::read(Path::new("/nonexistent/registry.jsonl"))
        .unwrap_err()
        .to_string();
    assert!(missing.contains("/nonexistent/registry.jsonl"), "{missing}");
}

#[test]
fn a_malformed_class_line_is_named_when_used() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_tiny_lm(dir.path(), &[], TINY_CONFIG);
    let cases = [
        (
            TINY_BASE.replace(r#""op":"stack""#, r#""op":"explode""#),
            "explode",
        ),
        (
            TINY_BASE.replace(r#"{"n":"norm""#, r#"{"n":"norm","p":[7]}, {"n":"x""#),
            "TinyModel",
        ),
        (
            TINY_BASE.replace(r#""dtype":"F32""#, r#""dtype":"F33""#),
            "F33",
        ),
        (
            TINY_BASE.replace(r#""c":"Rotary""#, r#""ref":"TinyModel""#),
            "nested refs",
        ),
    ];
    for (base, culprit) in cases {
        let text = [HEADER, TINY_LM, base.as_str()].join("\n");
        let r = Registry::parse(text.into(), Path::new("edited.jsonl")).unwrap();
        let e = load_model_with(&path, &r).unwrap_err().to_string();
        assert!(
            e.contains("edited.jsonl:3:") && e.contains(culprit),
            "{culprit}: {e}"
        );
    }
}

// ---------------------------------------------------------------- the embedded registry

#[test]
fn every_class_of_the_embedded_registry_parses() {
    let r = Registry::embedded().unwrap();
    assert!(r.len() >= 50, "only {} classes", r.len());
    assert!(
        r.describe().contains("transformers 5.23"),
        "{}",
        r.describe()
    );
    let text = include_str!("../registry/arch-registry.jsonl");
    for line in text.lines().skip(1).filter(|l| !l.trim().is_empty()) {
        let class = line
            .strip_prefix("{\"class\":\"")
            .and_then(|rest| rest.split('"').next())
            .unwrap();
        r.template(class).unwrap_or_else(|e| panic!("{e}"));
    }
}
