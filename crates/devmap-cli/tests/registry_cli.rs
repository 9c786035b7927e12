//! The architecture registry through the binary: Hugging Face's own map of the example checkpoint
//! is accepted and reproduced, notes go to stderr (stdout stays one JSON object), `--arch-registry`
//! replaces the embedded registry and a bad one is named by file and line, a shard given alone is
//! planned as its whole checkpoint or refused naming the index.

use std::path::{Path, PathBuf};

mod common;
use common::{devmap, path_str, repo, text};

fn tiny_llama() -> PathBuf {
    repo().join("examples/tiny-llama")
}

/// transformers 5.23's map for examples/tiny-llama: `LlamaForCausalLM.from_pretrained(folder,
/// device_map="balanced", max_memory={0: 200000, 1: 200000, "cpu": 10**9})`, captured at
/// `transformers.modeling_utils._get_device_map` (no GPU needed). It names `model.rotary_emb`, a
/// module without checkpoint tensors that devmap used to reject.
const HF_BALANCED: &str = r#"{"model.embed_tokens": 0, "model.layers.0": 1, "model.layers.1": 1, "model.layers.2": "cpu", "model.layers.3": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}"#;
const HF_BUDGETS: &str = "0=200000,1=200000,cpu=1000000000";

#[test]
fn hugging_faces_own_map_is_accepted_and_reproduced() {
    let dir = tempfile::tempdir().unwrap();
    let map = dir.path().join("hf.json");
    std::fs::write(&map, HF_BALANCED).unwrap();
    let folder = tiny_llama();
    let out = devmap(&["check", path_str(&folder), "--map", path_str(&map)]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        !text(&out.stderr).contains("note:"),
        "a known architecture needs no note: {}",
        text(&out.stderr)
    );
    let out = devmap(&[
        "plan",
        path_str(&folder),
        "--strategy",
        "balanced",
        "--compat",
        "transformers",
        "--max-memory",
        HF_BUDGETS,
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let want: serde_json::Value = serde_json::from_str(HF_BALANCED).unwrap();
    assert_eq!(got, want);
}

/// A copy of the example checkpoint with another config.json.
fn copy_with_config(dir: &Path, config: &str) -> PathBuf {
    let folder = dir.join("ckpt");
    std::fs::create_dir(&folder).unwrap();
    std::fs::copy(
        tiny_llama().join("model.safetensors"),
        folder.join("model.safetensors"),
    )
    .unwrap();
    std::fs::write(folder.join("config.json"), config).unwrap();
    folder
}

#[test]
fn an_unknown_architecture_is_noted_on_stderr_only() {
    let dir = tempfile::tempdir().unwrap();
    let folder = copy_with_config(
        dir.path(),
        r#"{"architectures":["NoSuchForCausalLM"],"model_type":"no_such"}"#,
    );
    let out = devmap(&[
        "plan",
        path_str(&folder),
        "--max-memory",
        "0=1GiB,cpu=1GiB",
        "--format",
        "json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("note: architecture NoSuchForCausalLM (model_type no_such) is not in the architecture registry")
            && stderr.contains("model.layers.*"),
        "{stderr}"
    );
    serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("stdout is one JSON object");
}

#[test]
fn arch_registry_replaces_the_embedded_one() {
    let dir = tempfile::tempdir().unwrap();
    // A registry without LlamaForCausalLM: the example falls back to inference, and says so.
    let registry = dir.path().join("other.jsonl");
    std::fs::write(
        &registry,
        "{\"format\":\"devmap-arch-registry/1\",\"transformers\":\"9.9.9\",\"by_model_type\":{}}\n",
    )
    .unwrap();
    let folder = tiny_llama();
    let out = devmap(&[
        "plan",
        path_str(&folder),
        "--max-memory",
        "0=1GiB,cpu=1GiB",
        "--arch-registry",
        path_str(&registry),
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("LlamaForCausalLM") && stderr.contains("transformers 9.9.9"),
        "{stderr}"
    );
    // A malformed one is refused, naming the file and line.
    std::fs::write(&registry, "{\"format\":\"devmap-arch-registry/0\"}\n").unwrap();
    let out = devmap(&[
        "plan",
        path_str(&folder),
        "--max-memory",
        "0=1GiB,cpu=1GiB",
        "--arch-registry",
        path_str(&registry),
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.starts_with("error:")
            && stderr.contains(&format!("{}:1:", registry.display()))
            && stderr.contains("devmap-arch-registry/0"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_bad_class_line_is_named_when_the_model_needs_it() {
    let dir = tempfile::tempdir().unwrap();
    let registry = dir.path().join("broken.jsonl");
    std::fs::write(
        &registry,
        "{\"format\":\"devmap-arch-registry/1\"}\n{\"class\":\"LlamaForCausalLM\",\"tree\":[}\n",
    )
    .unwrap();
    let map = dir.path().join("hf.json");
    std::fs::write(&map, HF_BALANCED).unwrap();
    let out = devmap(&[
        "check",
        path_str(&tiny_llama()),
        "--map",
        path_str(&map),
        "--arch-registry",
        path_str(&registry),
    ]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:2:", registry.display()))
            && stderr.contains("LlamaForCausalLM"),
        "{stderr}"
    );
}

#[test]
fn a_shard_alone_is_refused_naming_its_index() {
    let dir = tempfile::tempdir().unwrap();
    let shard = dir.path().join("model-00002-of-00004.safetensors");
    std::fs::copy(tiny_llama().join("model.safetensors"), &shard).unwrap();
    let out = devmap(&["plan", path_str(&shard), "--max-memory", "0=1GiB,cpu=1GiB"]);
    assert!(!out.status.success());
    let stderr = text(&out.stderr);
    let index = dir.path().join("model.safetensors.index.json");
    assert!(
        stderr.contains(&index.display().to_string()) && stderr.contains("one shard"),
        "{stderr}"
    );
}
