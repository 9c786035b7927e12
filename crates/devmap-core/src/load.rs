//! Reading a model from whatever the user points at: a `.safetensors` file, a checkpoint folder,
//! a `model.safetensors.index.json`, or a `devmap-manifest/1` JSON.

use std::cmp::Ordering;
use std::path::Path;

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::model::{Model, ModelBuilder, TensorSpec};
use crate::safetensors::{read_folder, read_index, Header};

/// Load a model from `path` (see the module docs for what it may be).
///
/// Safetensors checkpoints carry no module classes: modules come from the dotted names, siblings are
/// ordered numerically (`layers.2` before `layers.10`) with embeddings first and heads last, and the
/// repeated numbered blocks become the no-split units ([`Model::infer_no_split_blocks`]).
pub fn load_model(path: &Path) -> Result<Model> {
    let mut model = load_unquantized(path)?;
    model.quantization = crate::quant::Quantization::from_model_config(model.config.as_ref())?;
    Ok(model)
}

fn load_unquantized(path: &Path) -> Result<Model> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let headers = read_folder(path)?;
        return from_headers(path, headers, find_config(path)?);
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let dir = path.parent().unwrap_or(Path::new("."));
    if name.ends_with(".safetensors") {
        let header = Header::read(path)?;
        return from_headers(path, vec![header], find_config(dir)?);
    }
    if name.ends_with(".index.json") {
        let headers = read_index(path)?;
        return from_headers(dir, headers, find_config(dir)?);
    }
    let mut model = Manifest::read(path)?.into_model(path)?;
    // A config.json beside the manifest (or `<stem>.config.json`) supplies KV-cache dimensions.
    let stem_config = path.with_extension("config.json");
    let config = if stem_config.is_file() {
        Some(ModelConfig::read(&stem_config)?)
    } else {
        find_config(dir)?
    };
    if model.hidden_size.is_none() {
        model.hidden_size = config.as_ref().and_then(ModelConfig::hidden_size);
    }
    model.config = config;
    Ok(model)
}

fn find_config(dir: &Path) -> Result<Option<ModelConfig>> {
    let p = dir.join("config.json");
    if p.is_file() {
        Ok(Some(ModelConfig::read(&p)?))
    } else {
        Ok(None)
    }
}

const EMBEDDING_SUFFIXES: [&str; 6] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "shared.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
];

fn from_headers(origin: &Path, headers: Vec<Header>, config: Option<ModelConfig>) -> Result<Model> {
    let mut specs: Vec<TensorSpec> = headers.iter().flat_map(Header::tensor_specs).collect();
    specs.sort_by(|a, b| natural_cmp(&a.name, &b.name));
    // A tied head that the checkpoint omits (GPT-2, Gemma...) is restored as a second name of the
    // input embedding, so the map covers it and its storage is counted once.
    let mut tied = Vec::new();
    if let Some(cfg) = &config {
        let has_head = specs.iter().any(|s| s.name == "lm_head.weight");
        if cfg.tie_word_embeddings() && cfg.has_lm_head() && !has_head {
            if let Some(embed) = specs
                .iter()
                .find(|s| EMBEDDING_SUFFIXES.iter().any(|suf| s.name.ends_with(suf)))
            {
                let mut head = embed.clone();
                head.name = "lm_head.weight".to_string();
                head.source = None;
                tied.push(vec![embed.name.clone(), head.name.clone()]);
                specs.push(head);
            }
        }
    }
    let name = origin
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    let hidden = config.as_ref().and_then(ModelConfig::hidden_size);
    let mut b = ModelBuilder::new(name).hidden_size(hidden).config(config);
    for s in specs {
        b = b.tensor(s);
    }
    for g in tied {
        b = b.tied(g);
    }
    // Name the checkpoint: the builder's errors (a tensor named "a..b"...) only name the tensor.
    let mut model = b.build().map_err(|e| Error::json(origin, e.to_string()))?;
    model.infer_no_split_blocks();
    Ok(model)
}

fn component_rank(c: &str) -> u8 {
    const FIRST: [&str; 8] = [
        "embed_tokens",
        "embeddings",
        "wte",
        "wpe",
        "shared",
        "word_embeddings",
        "embed_in",
        "weight",
    ];
    const LAST: [&str; 6] = [
        "lm_head",
        "head",
        "score",
        "classifier",
        "output",
        "embed_out",
    ];
    if FIRST.contains(&c) {
        0
    } else if LAST.contains(&c) {
        2
    } else {
        1
    }
}

/// Order dotted names the way models usually register them: numbers numerically, embeddings first,
/// heads last, otherwise alphabetically.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let mut ia = a.split('.');
    let mut ib = b.split('.');
    loop {
        match (ia.next(), ib.next()) {
            (None, None) => return Ordering::Equal,
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) if x == y => continue,
            (Some(x), Some(y)) => {
                let nx = x
                    .parse::<u64>()
                    .ok()
                    .filter(|_| x.bytes().all(|c| c.is_ascii_digit()));
                let ny = y
                    .parse::<u64>()
                    .ok()
                    .filter(|_| y.bytes().all(|c| c.is_ascii_digit()));
                return match (nx, ny) {
                    (Some(p), Some(q)) => p.cmp(&q).then(x.cmp(y)),
                    (Some(_), None) => Ordering::Less,
                    (None, Some(_)) => Ordering::Greater,
                    (None, None) => component_rank(x).cmp(&component_rank(y)).then(x.cmp(y)),
                };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn natural_order() {
        let mut v = vec![
            "lm_head.weight",
            "model.norm.weight",
            "model.layers.10.w",
            "model.layers.2.weight",
            "model.embed_tokens.weight",
            "model.layers.2.bias",
        ];
        v.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            v,
            vec![
                "model.embed_tokens.weight",
                "model.layers.2.weight",
                "model.layers.2.bias",
                "model.layers.10.w",
                "model.norm.weight",
                "lm_head.weight"
            ]
        );
    }
}
