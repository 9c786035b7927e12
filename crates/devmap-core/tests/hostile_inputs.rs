//! Every malformed input `load_model` can meet, as a real file on disk: each must come back as an
//! error (never a panic, a stack overflow or a huge allocation) whose message names the file and
//! the culprit (tensor, shard, value). Plus the positive cases of the same loaders: tied heads
//! restored from config.json, natural layer order, and header parsing that never touches the data.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use devmap_core::safetensors::write_file;
use devmap_core::{load_model, DType, Node, SizeRules};

/// Write `8-byte LE header length | header | data_len zero bytes`, with `claimed` as the length
/// field (the true header length when `None`).
fn raw(path: &Path, claimed: Option<u64>, header: &[u8], data_len: usize) {
    let mut bytes = claimed
        .unwrap_or(header.len() as u64)
        .to_le_bytes()
        .to_vec();
    bytes.extend_from_slice(header);
    bytes.resize(bytes.len() + data_len, 0);
    std::fs::write(path, bytes).expect("write a test file");
}

/// A file whose header is `json` (a tensor table) followed by `data_len` bytes.
fn with_header(dir: &Path, name: &str, json: &str, data_len: usize) -> PathBuf {
    let p = dir.join(name);
    raw(&p, None, json.as_bytes(), data_len);
    p
}

/// The error `load_model(path)` must return, as text.
fn load_err(path: &Path) -> String {
    let err = load_model(path).expect_err("a hostile input must be rejected");
    err.to_string()
}

/// Assert the message names `file` and every culprit.
#[track_caller]
fn assert_names(msg: &str, file: &Path, culprits: &[&str]) {
    let shown = file.display().to_string();
    assert!(msg.contains(&shown), "message does not name {shown}: {msg}");
    for c in culprits {
        assert!(msg.contains(c), "message does not name {c}: {msg}");
    }
}

fn bf16(shape: &[u64]) -> (DType, Vec<u64>, Vec<u8>) {
    let n: u64 = shape.iter().product();
    (DType::BF16, shape.to_vec(), vec![0u8; (n * 2) as usize])
}

/// Write a valid safetensors file of BF16 zeros.
fn valid(path: &Path, tensors: &[(&str, &[u64])]) {
    let owned: Vec<(&str, DType, Vec<u64>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let (d, s, b) = bf16(s);
            (*n, d, s, b)
        })
        .collect();
    write_file(path, &owned).expect("write a valid safetensors file");
}

// ---------------------------------------------------------------- the 8-byte length and framing

#[test]
fn file_shorter_than_the_length_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("short.safetensors");
    std::fs::write(&p, [1u8, 2, 3]).unwrap();
    let e = load_err(&p);
    assert_names(&e, &p, &["truncated", "3 bytes"]);
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty.safetensors");
    std::fs::write(&p, []).unwrap();
    let e = load_err(&p);
    assert_names(&e, &p, &["truncated", "0 bytes"]);
}

#[test]
fn header_length_over_the_limit_is_refused_without_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("huge_header.safetensors");
    // Only the 8 bytes claim it (and a few bytes follow): nothing may be allocated for it.
    raw(&p, Some(100_000_001), b"{}", 0);
    let e = load_err(&p);
    assert_names(&e, &p, &["100000001", "exceeds"]);
    // u64::MAX must not overflow `8 + n` either.
    raw(&p, Some(u64::MAX), b"{}", 0);
    let e = load_err(&p);
    assert_names(&e, &p, &[&u64::MAX.to_string()]);
}

#[test]
fn header_length_past_the_end_of_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("past_eof.safetensors");
    raw(&p, Some(4096), br#"{"a":"#, 0);
    let e = load_err(&p);
    assert_names(&e, &p, &["4096", "past the end of the file"]);
}

// ---------------------------------------------------------------- the JSON itself

#[test]
fn invalid_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "bad.safetensors",
        r#"{"a": {"dtype": "F16",}"#,
        0,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid JSON"]);
}

#[test]
fn header_not_utf8() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("latin1.safetensors");
    raw(&p, None, b"{\"\xe9\": 1}     ", 0);
    let e = load_err(&p);
    assert_names(&e, &p, &["UTF-8"]);
}

#[test]
fn header_that_is_a_json_array() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(dir.path(), "array.safetensors", "[1, 2, 3]", 0);
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid JSON", "sequence"]);
}

#[test]
fn deeply_nested_json_errors_instead_of_overflowing_the_stack() {
    let dir = tempfile::tempdir().unwrap();
    let deep = "[".repeat(100_000);
    // At the top level...
    let p = with_header(dir.path(), "deep_top.safetensors", &deep, 0);
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid JSON"]);
    // ...and inside a tensor entry, where serde_json parses an arbitrary value.
    let p = with_header(
        dir.path(),
        "deep_entry.safetensors",
        &format!("{{\"w\": {deep}"),
        0,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid JSON", "recursion limit"]);
    let objects = "{\"a\":".repeat(100_000);
    let p = with_header(
        dir.path(),
        "deep_obj.safetensors",
        &format!("{{\"w\": {objects}"),
        0,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid JSON", "recursion limit"]);
}

#[test]
fn duplicate_tensor_names_in_one_header() {
    let dir = tempfile::tempdir().unwrap();
    let entry = r#"{"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}"#;
    let p = with_header(
        dir.path(),
        "dup.safetensors",
        &format!(r#"{{"w.a": {entry}, "w.a": {entry}}}"#),
        2,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["duplicate", "\"w.a\""]);
}

#[test]
fn entry_missing_a_field() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "nofield.safetensors",
        r#"{"w": {"dtype": "U8", "shape": [2]}}"#,
        2,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"w\"", "data_offsets"]);
}

#[test]
fn metadata_that_is_not_a_string_map() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "meta.safetensors",
        r#"{"__metadata__": {"format": 1}}"#,
        0,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["__metadata__"]);
}

// ---------------------------------------------------------------- tensor entries

#[test]
fn unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "f12.safetensors",
        r#"{"model.w": {"dtype": "F12", "shape": [2], "data_offsets": [0, 4]}}"#,
        4,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"model.w\"", "\"F12\""]);
}

#[test]
fn element_count_overflow() {
    let dir = tempfile::tempdir().unwrap();
    let max = u64::MAX;
    let p = with_header(
        dir.path(),
        "overflow.safetensors",
        &format!(
            r#"{{"model.w": {{"dtype": "U8", "shape": [{max}, 2], "data_offsets": [0, 0]}}}}"#
        ),
        0,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"model.w\"", "overflow", &max.to_string()]);
    // Fits as elements, overflows as bytes (F64 is 8 bytes each).
    let big = u64::MAX / 4;
    let p = with_header(
        dir.path(),
        "overflow_bytes.safetensors",
        &format!(r#"{{"model.v": {{"dtype": "F64", "shape": [{big}], "data_offsets": [0, 0]}}}}"#),
        0,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"model.v\"", "overflow"]);
}

#[test]
fn data_offsets_end_before_begin() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "backwards.safetensors",
        r#"{"w": {"dtype": "U8", "shape": [4], "data_offsets": [8, 4]}}"#,
        8,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"w\"", "[8, 4]"]);
}

#[test]
fn data_offsets_length_differs_from_dtype_times_numel() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "short_range.safetensors",
        r#"{"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}"#,
        24,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"w\"", "[0, 20]", "20 bytes", "needs 24"]);
}

#[test]
fn data_offsets_past_the_end_of_the_data() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "past_data.safetensors",
        r#"{"w": {"dtype": "U8", "shape": [16], "data_offsets": [0, 16]}}"#,
        10,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"w\"", "[0, 16]", "10 bytes"]);
    // Offsets near u64::MAX must not wrap around when added to the data start.
    let max = u64::MAX;
    let p = with_header(
        dir.path(),
        "wrap.safetensors",
        &format!(
            r#"{{"w": {{"dtype": "U8", "shape": [1], "data_offsets": [{}, {max}]}}}}"#,
            max - 1
        ),
        10,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"w\"", &max.to_string()]);
}

#[test]
fn overlapping_data_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let p = with_header(
        dir.path(),
        "overlap.safetensors",
        r#"{"m.a": {"dtype": "U8", "shape": [8], "data_offsets": [0, 8]},
            "m.b": {"dtype": "U8", "shape": [8], "data_offsets": [4, 12]}}"#,
        16,
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"m.a\"", "\"m.b\"", "overlapping"]);
}

#[test]
fn tensor_name_with_an_empty_component() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("empty_component.safetensors");
    valid(&p, &[("a..b", &[2])]);
    let e = load_err(&p);
    assert_names(&e, &p, &["\"a..b\"", "empty component"]);
}

#[test]
fn tensor_named_like_a_module() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("tensor_module.safetensors");
    valid(&p, &[("m.w", &[2]), ("m.w.bias", &[2])]);
    let e = load_err(&p);
    assert_names(&e, &p, &["\"m.w\""]);
}

// ---------------------------------------------------------------- folders and shards

fn index(dir: &Path, weight_map: &[(&str, &str)]) -> PathBuf {
    let map: serde_json::Map<String, serde_json::Value> = weight_map
        .iter()
        .map(|(t, s)| ((*t).to_string(), serde_json::Value::from(*s)))
        .collect();
    let p = dir.join("model.safetensors.index.json");
    let doc = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
    std::fs::write(&p, doc.to_string()).expect("write the index");
    p
}

#[test]
fn index_naming_a_shard_with_a_different_tensor_set() {
    let dir = tempfile::tempdir().unwrap();
    valid(
        &dir.path().join("model-00001-of-00001.safetensors"),
        &[("m.a", &[2]), ("m.c", &[2])],
    );
    let idx = index(
        dir.path(),
        &[
            ("m.a", "model-00001-of-00001.safetensors"),
            ("m.b", "model-00001-of-00001.safetensors"),
        ],
    );
    // Through the folder and through the index file itself.
    for target in [dir.path(), idx.as_path()] {
        let e = load_err(target);
        assert_names(
            &e,
            &idx,
            &[
                "\"m.b\"",
                "model-00001-of-00001.safetensors",
                "does not hold",
            ],
        );
    }
}

#[test]
fn index_naming_a_missing_shard() {
    let dir = tempfile::tempdir().unwrap();
    index(dir.path(), &[("m.a", "model-00002-of-00002.safetensors")]);
    let e = load_err(dir.path());
    assert_names(
        &e,
        &dir.path().join("model-00002-of-00002.safetensors"),
        &[],
    );
}

#[test]
fn index_naming_a_shard_outside_the_folder_is_rejected() {
    let outer = tempfile::tempdir().unwrap();
    // The file exists, so only the path check can stop it.
    valid(&outer.path().join("outside.safetensors"), &[("m.a", &[2])]);
    let dir = outer.path().join("ckpt");
    std::fs::create_dir(&dir).unwrap();
    valid(&dir.join("inside.safetensors"), &[("m.b", &[2])]);
    for shard in ["../outside.safetensors", "sub/../../outside.safetensors"] {
        let idx = index(&dir, &[("m.a", shard), ("m.b", "inside.safetensors")]);
        let e = load_err(&dir);
        assert_names(&e, &idx, &[&format!("{shard:?}"), "not a plain file name"]);
    }
    let abs = outer.path().join("outside.safetensors");
    let abs = abs.to_str().unwrap();
    let idx = index(&dir, &[("m.a", abs), ("m.b", "inside.safetensors")]);
    let e = load_err(&dir);
    assert_names(&e, &idx, &["not a plain file name"]);
}

#[test]
fn same_tensor_in_two_shards_without_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = dir.path().join("model-00001-of-00002.safetensors");
    let s2 = dir.path().join("model-00002-of-00002.safetensors");
    valid(&s1, &[("m.a", &[2]), ("m.b", &[2])]);
    valid(&s2, &[("m.b", &[2]), ("m.c", &[2])]);
    let e = load_err(dir.path());
    assert_names(&e, &s2, &["\"m.b\"", "also in", &s1.display().to_string()]);
}

#[test]
fn same_tensor_in_two_shards_with_an_index() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = dir.path().join("model-00001-of-00002.safetensors");
    let s2 = dir.path().join("model-00002-of-00002.safetensors");
    valid(&s1, &[("m.a", &[2]), ("m.b", &[2])]);
    valid(&s2, &[("m.b", &[2]), ("m.c", &[2])]);
    index(
        dir.path(),
        &[
            ("m.a", "model-00001-of-00002.safetensors"),
            ("m.b", "model-00001-of-00002.safetensors"),
            ("m.c", "model-00002-of-00002.safetensors"),
        ],
    );
    let e = load_err(dir.path());
    // The message must say what is wrong (a duplicate), not that the indexed shard lacks it.
    assert_names(&e, &s2, &["\"m.b\"", "also in", &s1.display().to_string()]);
}

#[test]
fn folder_without_safetensors() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"not ours").unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let e = load_err(dir.path());
    assert_names(
        &e,
        dir.path(),
        &["no model.safetensors.index.json", "*.safetensors"],
    );
}

#[test]
fn index_that_is_not_json() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors.index.json");
    std::fs::write(&p, "{\"weight_map\": ").unwrap();
    let e = load_err(dir.path());
    assert_names(&e, &p, &["EOF"]);
}

#[test]
fn path_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("nothing-here.safetensors");
    let e = load_err(&p);
    assert_names(&e, &p, &[]);
}

// ---------------------------------------------------------------- manifests and config.json

fn manifest(dir: &Path, doc: serde_json::Value) -> PathBuf {
    let p = dir.join("m.json");
    std::fs::write(&p, doc.to_string()).expect("write the manifest");
    p
}

#[test]
fn manifest_with_the_wrong_format() {
    let dir = tempfile::tempdir().unwrap();
    let p = manifest(
        dir.path(),
        serde_json::json!({"format": "devmap-manifest/9", "tensors": []}),
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"devmap-manifest/9\""]);
}

#[test]
fn manifest_with_an_unknown_dtype() {
    let dir = tempfile::tempdir().unwrap();
    let p = manifest(
        dir.path(),
        serde_json::json!({"format": "devmap-manifest/1", "tensors": [
            {"name": "head.weight", "dtype": "F12", "shape": [4, 4]}
        ]}),
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"head.weight\"", "\"F12\""]);
}

#[test]
fn manifest_with_a_tied_group_naming_a_missing_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let p = manifest(
        dir.path(),
        serde_json::json!({"format": "devmap-manifest/1",
            "tensors": [{"name": "embed.weight", "dtype": "F16", "shape": [4, 4]}],
            "tied": [["embed.weight", "lm_head.weight"]]}),
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"lm_head.weight\""]);
}

#[test]
fn manifest_with_an_overflowing_shape() {
    let dir = tempfile::tempdir().unwrap();
    let p = manifest(
        dir.path(),
        serde_json::json!({"format": "devmap-manifest/1", "tensors": [
            {"name": "w", "dtype": "F16", "shape": [u64::MAX, 3]}
        ]}),
    );
    let e = load_err(&p);
    assert_names(&e, &p, &["\"w\"", "overflow"]);
}

#[test]
fn manifest_that_is_deeply_nested() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("deep.json");
    std::fs::write(&p, "[".repeat(100_000)).unwrap();
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid type"]);
    let deep = format!(
        r#"{{"format": "devmap-manifest/1", "tied": {}, "tensors": []}}"#,
        "[".repeat(100_000)
    );
    std::fs::write(&p, deep).unwrap();
    let e = load_err(&p);
    assert_names(&e, &p, &["invalid type"]);
}

#[test]
fn invalid_config_json_beside_a_safetensors_file() {
    let dir = tempfile::tempdir().unwrap();
    let st = dir.path().join("model.safetensors");
    valid(&st, &[("m.a", &[2])]);
    let cfg = dir.path().join("config.json");
    std::fs::write(&cfg, "{\"tie_word_embeddings\": tru}").unwrap();
    for target in [st.as_path(), dir.path()] {
        let e = load_err(target);
        assert_names(&e, &cfg, &["expected ident", "column 28"]);
    }
    std::fs::write(&cfg, "[1, 2]").unwrap();
    let e = load_err(&st);
    assert_names(&e, &cfg, &["JSON object"]);
    std::fs::write(&cfg, "[".repeat(100_000)).unwrap();
    let e = load_err(&st);
    assert_names(&e, &cfg, &["recursion limit"]);
}

// ---------------------------------------------------------------- what must work

#[test]
fn sharded_gpt2_with_a_tied_head_gains_lm_head_once() {
    let dir = tempfile::tempdir().unwrap();
    let s1 = "model-00001-of-00002.safetensors";
    let s2 = "model-00002-of-00002.safetensors";
    valid(
        &dir.path().join(s1),
        &[
            ("transformer.wte.weight", &[100, 8]),
            ("transformer.wpe.weight", &[16, 8]),
            ("transformer.h.0.attn.c_attn.weight", &[8, 24]),
        ],
    );
    valid(
        &dir.path().join(s2),
        &[
            ("transformer.h.1.attn.c_attn.weight", &[8, 24]),
            ("transformer.ln_f.weight", &[8]),
        ],
    );
    index(
        dir.path(),
        &[
            ("transformer.wte.weight", s1),
            ("transformer.wpe.weight", s1),
            ("transformer.h.0.attn.c_attn.weight", s1),
            ("transformer.h.1.attn.c_attn.weight", s2),
            ("transformer.ln_f.weight", s2),
        ],
    );
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"architectures": ["GPT2LMHeadModel"], "n_embd": 8, "tie_word_embeddings": true}"#,
    )
    .unwrap();
    let model = load_model(dir.path()).unwrap();
    assert_eq!(model.tensors().len(), 6);
    let Some(Node::Tensor(head)) = model.node("lm_head.weight") else {
        panic!("lm_head.weight was not added");
    };
    let Some(Node::Tensor(wte)) = model.node("transformer.wte.weight") else {
        panic!("no wte");
    };
    assert!(model.is_tied_duplicate(head));
    assert!(!model.is_tied_duplicate(wte));
    assert_eq!(model.tensor(head).shape, vec![100, 8]);
    assert!(model.tensor(head).source.is_none());
    assert_eq!(model.tied_groups().len(), 1);
    let stored = (100 * 8 + 16 * 8 + 2 * 8 * 24 + 8) * 2;
    assert_eq!(model.total_bytes(SizeRules::default()), stored);
    assert_eq!(model.hidden_size, Some(8));
    // The head is registered last, as in GPT2LMHeadModel.
    assert_eq!(model.tensors().last().unwrap().name, "lm_head.weight");
    // Through the index file too.
    let again = load_model(&dir.path().join("model.safetensors.index.json")).unwrap();
    assert_eq!(again.total_bytes(SizeRules::default()), stored);
}

#[test]
fn untied_or_headless_configs_add_no_head() {
    let dir = tempfile::tempdir().unwrap();
    valid(
        &dir.path().join("model.safetensors"),
        &[("transformer.wte.weight", &[10, 4])],
    );
    for cfg in [
        r#"{"architectures": ["GPT2LMHeadModel"], "tie_word_embeddings": false}"#,
        r#"{"architectures": ["GPT2Model"]}"#,
    ] {
        std::fs::write(dir.path().join("config.json"), cfg).unwrap();
        let model = load_model(dir.path()).unwrap();
        assert!(model.node("lm_head.weight").is_none(), "{cfg}");
    }
}

#[test]
fn layers_are_ordered_naturally() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("model.safetensors");
    // File order (and lexicographic order) put 10 and 11 before 2.
    let names: Vec<String> = [10, 2, 11, 0, 1, 3]
        .iter()
        .map(|i| format!("model.layers.{i}.w"))
        .chain(["lm_head.weight".into(), "model.embed_tokens.weight".into()])
        .collect();
    let refs: Vec<(&str, &[u64])> = names.iter().map(|n| (n.as_str(), &[2u64][..])).collect();
    valid(&p, &refs);
    let model = load_model(&p).unwrap();
    let Some(Node::Module(layers)) = model.node("model.layers") else {
        panic!("no model.layers module");
    };
    let children: Vec<&str> = model
        .module(layers)
        .children
        .iter()
        .map(|&c| model.module(c).name.as_str())
        .collect();
    assert_eq!(
        children,
        [0, 1, 2, 3, 10, 11]
            .iter()
            .map(|i| format!("model.layers.{i}"))
            .collect::<Vec<_>>()
    );
    let order: Vec<&str> = model.tensors().iter().map(|t| t.name.as_str()).collect();
    assert_eq!(order.first(), Some(&"model.embed_tokens.weight"));
    assert_eq!(order.last(), Some(&"lm_head.weight"));
    // The numbered blocks are the inferred no-split units.
    assert!(model
        .modules()
        .iter()
        .filter(|m| m.name.starts_with("model.layers."))
        .all(|m| m.no_split));
}

#[test]
fn header_parsing_never_reads_the_data_section() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("sparse.safetensors");
    let data_len: u64 = 100_000_000_000;
    let mut header = format!(
        r#"{{"__metadata__": {{"format": "pt"}}, "model.tail.weight": {{"dtype": "BF16", "shape": [8], "data_offsets": [{}, {data_len}]}}}}"#,
        data_len - 16
    )
    .into_bytes();
    while !header.len().is_multiple_of(8) {
        header.push(b' ');
    }
    {
        let mut f = File::create(&p).unwrap();
        f.write_all(&(header.len() as u64).to_le_bytes()).unwrap();
        f.write_all(&header).unwrap();
        // A 100 GB sparse file: reading it would take minutes, allocating it would fail.
        f.set_len(8 + header.len() as u64 + data_len).unwrap();
    }
    let start = Instant::now();
    let model = load_model(&p).unwrap();
    let took = start.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "parsing took {took:?}: the data section must not be read"
    );
    assert_eq!(model.tensors().len(), 1);
    let t = &model.tensors()[0];
    assert_eq!(t.name, "model.tail.weight");
    let src = t.source.as_ref().unwrap();
    assert_eq!(src.byte_range.end, 8 + header.len() as u64 + data_len);
    assert_eq!(src.byte_range.end - src.byte_range.start, 16);
}
