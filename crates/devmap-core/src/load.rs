//! Reading a model from whatever the user points at: a `.safetensors` file (a shard: its whole
//! checkpoint), a checkpoint folder, a `model.safetensors.index.json`, or a `devmap-manifest/1` JSON.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::config::ModelConfig;
use crate::error::{Error, Result};
use crate::manifest::Manifest;
use crate::model::{Model, ModelBuilder, TensorSpec};
use crate::registry::Registry;
use crate::safetensors::{read_folder, read_index, Header};

/// A model read from disk, with what devmap inferred or decided on the way (for stderr: the
/// library returns the notes, the CLI prints them).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The model.
    pub model: Model,
    /// One sentence per inference or decision a user should know about (an architecture the
    /// registry does not know, a shard planned as its whole checkpoint).
    pub notes: Vec<String>,
}

/// Load a model from `path` (see the module docs for what it may be) with the embedded
/// architecture registry, dropping the notes ([`load_model_with`] returns them).
pub fn load_model(path: &Path) -> Result<Model> {
    Ok(load_model_from(path, RegistrySource::Embedded)?.model)
}

/// The architecture registry a load rebuilds checkpoints with, opened only when the path is a
/// checkpoint: a manifest needs none, and opening the embedded one indexes its ~1,000 classes.
#[derive(Debug, Clone, Copy)]
pub enum RegistrySource<'a> {
    /// The embedded registry ([`Registry::embedded`]).
    Embedded,
    /// A registry the caller opened (`--arch-registry FILE`).
    Opened(&'a Registry),
}

impl<'a> RegistrySource<'a> {
    /// The registry, opening the embedded one on first use.
    pub fn get(self) -> Result<&'a Registry> {
        match self {
            RegistrySource::Embedded => Registry::embedded(),
            RegistrySource::Opened(registry) => Ok(registry),
        }
    }
}

/// Load a model from `path`, rebuilding checkpoints with `registry`.
///
/// A checkpoint whose config.json names an architecture the registry knows becomes the model
/// transformers builds ([`crate::registry`]). Otherwise modules come from the dotted names,
/// siblings are ordered numerically (`layers.2` before `layers.10`) with embeddings first and heads
/// last, and the repeated numbered blocks become the no-split units
/// ([`Model::infer_no_split_blocks`]); a note says so. A shard given alone is read as the whole
/// checkpoint its index (beside it) describes.
pub fn load_model_with(path: &Path, registry: &Registry) -> Result<Loaded> {
    load_model_from(path, RegistrySource::Opened(registry))
}

/// [`load_model_with`], opening the registry only if `path` is a checkpoint.
pub fn load_model_from(path: &Path, registry: RegistrySource) -> Result<Loaded> {
    let mut loaded = load_unquantized(path, registry)?;
    loaded.model.quantization =
        crate::quant::Quantization::from_model_config(loaded.model.config.as_ref())?;
    if let Some(q) = &loaded.model.quantization {
        crate::quant_check::check_packed_tensors(&loaded.model, &q.config)?;
    }
    Ok(loaded)
}

fn load_unquantized(path: &Path, registry: RegistrySource) -> Result<Loaded> {
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if meta.is_dir() {
        let headers = read_folder(path)?;
        return from_checkpoint(path, headers, find_config(path)?, registry, Vec::new());
    }
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let dir = parent_dir(path);
    if name.ends_with(".safetensors") {
        let config = find_config(dir)?;
        return match index_listing(path)? {
            Some(index) => {
                let note = format!(
                    "{} is one shard of the checkpoint indexed by {}: planning the whole checkpoint",
                    path.display(),
                    index.display()
                );
                from_checkpoint(dir, read_index(&index)?, config, registry, vec![note])
            }
            None => from_checkpoint(
                path,
                vec![Header::read(path)?],
                config,
                registry,
                Vec::new(),
            ),
        };
    }
    if name.ends_with(".index.json") {
        let headers = read_index(path)?;
        return from_checkpoint(dir, headers, find_config(dir)?, registry, Vec::new());
    }
    load_manifest(path).map(|model| Loaded {
        model,
        notes: Vec::new(),
    })
}

fn parent_dir(path: &Path) -> &Path {
    match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    }
}

fn load_manifest(path: &Path) -> Result<Model> {
    let mut model = Manifest::read(path)?.into_model(path)?;
    // A config.json beside the manifest (or `<stem>.config.json`) supplies KV-cache dimensions.
    let stem_config = path.with_extension("config.json");
    let config = if stem_config.is_file() {
        Some(ModelConfig::read(&stem_config)?)
    } else {
        find_config(parent_dir(path))?
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

/// The index beside `shard` that lists it, if any; an error when `shard` is named like a shard
/// (`model-00001-of-00003.safetensors`) but no index beside it lists it: planning it alone would
/// silently plan a fraction of the model.
fn index_listing(shard: &Path) -> Result<Option<PathBuf>> {
    let dir = parent_dir(shard);
    let file_name = shard
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or_default();
    let mut indexes: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| Error::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.ends_with(".safetensors.index.json"))
                && p.is_file()
        })
        .collect();
    indexes.sort();
    for index in &indexes {
        if index_names_shard(index, file_name)? {
            return Ok(Some(index.clone()));
        }
    }
    let Some(prefix) = shard_prefix(file_name) else {
        return Ok(None);
    };
    let expected = dir.join(format!("{prefix}.safetensors.index.json"));
    let reason = if expected.is_file() {
        format!("{file_name} is named like a shard, but its index does not list it")
    } else {
        format!("{file_name} is named like one shard of a sharded checkpoint, but no index is beside it")
    };
    Err(Error::LoneShard {
        shard: shard.to_path_buf(),
        index: expected,
        reason,
    })
}

fn index_names_shard(index: &Path, file_name: &str) -> Result<bool> {
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: std::collections::BTreeMap<String, String>,
    }
    let text = std::fs::read_to_string(index).map_err(|e| Error::io(index, e))?;
    let parsed: Index =
        serde_json::from_str(&text).map_err(|e| Error::json(index, e.to_string()))?;
    Ok(parsed.weight_map.values().any(|f| f == file_name))
}

/// `model` for `model-00001-of-00003.safetensors` (transformers' shard names), else `None`.
fn shard_prefix(file_name: &str) -> Option<&str> {
    let stem = file_name.strip_suffix(".safetensors")?;
    let (head, total) = stem.rsplit_once("-of-")?;
    let (prefix, part) = head.rsplit_once('-')?;
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    (digits(part) && digits(total) && !prefix.is_empty()).then_some(prefix)
}

/// Build the model of a checkpoint: from its registry template when config.json names a known
/// architecture, else inferred from the names (with a note naming what was inferred).
fn from_checkpoint(
    origin: &Path,
    headers: Vec<Header>,
    config: Option<ModelConfig>,
    registry: RegistrySource,
    mut notes: Vec<String>,
) -> Result<Loaded> {
    let registry = registry.get()?;
    let specs: Vec<TensorSpec> = headers.iter().flat_map(Header::tensor_specs).collect();
    let name = origin
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("model")
        .to_string();
    let mut misfit = None;
    // transformers' class holds the unquantized tensors: a pre-quantized checkpoint's packed
    // tensors and scales are read from the header's names instead, so every one is counted.
    let pre_quantized = crate::quant::Quantization::from_model_config(config.as_ref())?;
    if let Some(q) = &pre_quantized {
        misfit = Some(format!(
            "pre-quantized checkpoint (quant_method {:?}): modules inferred from the header, which holds the packed tensors",
            q.config.method()
        ));
    }
    if let (Some(cfg), None) = (&config, &pre_quantized) {
        if let Some(template) = registry.find(cfg)? {
            match template.build_model(name.clone(), specs.clone(), cfg.clone())? {
                Ok(rebuilt) => {
                    notes.extend(rebuilt.notes);
                    return Ok(Loaded {
                        model: rebuilt.model,
                        notes,
                    });
                }
                Err(reason) => {
                    misfit = Some(format!("registry class {}: {reason}", template.class()))
                }
            }
        }
    }
    let mut specs = specs;
    if let Some(q) = &pre_quantized {
        if matches!(q.config, crate::quant::QuantConfig::Bnb(_)) {
            fold_bnb_state_names(&mut specs);
        }
    }
    let model = infer_model(origin, name, specs, config)?;
    notes.push(inferred_note(&model, registry, misfit));
    Ok(Loaded { model, notes })
}

/// bitsandbytes serializes a 4-bit weight's state under the weight's own name
/// (`q_proj.weight.absmax`, `q_proj.weight.quant_state.bitsandbytes__nf4`): a name cannot be a
/// tensor and a module at once, so these become siblings of the weight (`q_proj.weight_absmax`,
/// `q_proj.weight_quant_state_bitsandbytes__nf4`), in the same module.
fn fold_bnb_state_names(specs: &mut [TensorSpec]) {
    let names: std::collections::HashSet<String> = specs.iter().map(|s| s.name.clone()).collect();
    for spec in specs.iter_mut() {
        let owner_end = spec
            .name
            .match_indices('.')
            .map(|(i, _)| i)
            .find(|&i| names.contains(&spec.name[..i]));
        if let Some(end) = owner_end {
            let rest = spec.name[end + 1..].replace('.', "_");
            spec.name = format!("{}_{rest}", &spec.name[..end]);
        }
    }
}

/// What the fallback inferred, for stderr.
fn inferred_note(model: &Model, registry: &Registry, misfit: Option<String>) -> String {
    let what = match (&model.config, misfit) {
        (_, Some(reason)) => reason,
        (None, None) => "no config.json beside the checkpoint".to_string(),
        (Some(cfg), None) => format!(
            "architecture {} (model_type {}) is not in the architecture registry ({})",
            match cfg.architectures().as_slice() {
                [] => "unnamed".to_string(),
                names => names.join("/"),
            },
            cfg.model_type().unwrap_or("unset"),
            registry.describe()
        ),
    };
    let blocks = model.no_split_classes();
    let tied = if model.tied_groups().is_empty() {
        "no tied weights".to_string()
    } else {
        "lm_head.weight restored as a tied alias of the input embedding".to_string()
    };
    format!(
        "{what}: inferred the module tree from tensor names (siblings in natural order, no tensorless modules or non-persistent buffers), no-split blocks {} from numbered names, {tied}",
        if blocks.is_empty() {
            "none".to_string()
        } else {
            blocks.join(", ")
        }
    )
}

const EMBEDDING_SUFFIXES: [&str; 6] = [
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "shared.weight",
    "embed_in.weight",
    "tok_embeddings.weight",
];

/// The fallback for architectures the registry does not know: the tree from the names.
fn infer_model(
    origin: &Path,
    name: String,
    mut specs: Vec<TensorSpec>,
    config: Option<ModelConfig>,
) -> Result<Model> {
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
