//! The `devmap-manifest/1` format: a model's tensor table as any PyTorch model can export it
//! (see `scripts/export_manifest.py` and docs/formats.md).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::model::{Model, ModelBuilder, TensorKind, TensorSpec};
use crate::quant::{QuantMeta, TorchKind};

/// The format tag a manifest must carry.
pub const MANIFEST_FORMAT: &str = "devmap-manifest/1";

/// A manifest as stored on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    /// Must be [`MANIFEST_FORMAT`].
    pub format: String,
    /// Model name.
    #[serde(default)]
    pub name: String,
    /// The model's default dtype (informational).
    #[serde(default)]
    pub dtype: Option<String>,
    /// Class of the root module.
    #[serde(default)]
    pub root_class: Option<String>,
    /// Every named module in registration order, root excluded.
    #[serde(default)]
    pub modules: Vec<ManifestModule>,
    /// Every parameter, then every buffer, in registration order.
    pub tensors: Vec<ManifestTensor>,
    /// Groups of tensor names sharing one storage.
    #[serde(default)]
    pub tied: Vec<Vec<String>>,
    /// Names transformers treats as tie targets (`all_tied_weights_keys`): it never counts their
    /// size, so a storage whose first-registered name is a target counts 0 bytes in its planner.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tied_targets: Vec<String>,
    /// Buffers outside `state_dict()` (`_non_persistent_buffers_set`): no device map must cover them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub non_persistent: Vec<String>,
    /// Module classes that must stay on one device.
    #[serde(default)]
    pub no_split: Vec<String>,
    /// Activation width.
    #[serde(default)]
    pub hidden_size: Option<u64>,
    /// The model's `_keep_in_fp32_modules` (quantizers keep them unconverted).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keep_in_fp32_modules: Vec<String>,
    /// The module name of `get_output_embeddings()` (quantizers keep it unconverted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_embedding: Option<String>,
}

/// A module entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestModule {
    /// Full dotted name.
    pub name: String,
    /// Class name.
    pub class: String,
    /// `linear` (exactly `nn.Linear`), `linear_subclass` or `conv1d`; absent for other modules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub torch_kind: Option<TorchKind>,
}

/// A tensor entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestTensor {
    /// Full dotted name.
    pub name: String,
    /// Safetensors dtype spelling.
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
    /// `param` or `buffer` (default `param`).
    #[serde(default = "default_kind")]
    pub kind: TensorKind,
    /// Built on load from several checkpoint tensors ([`crate::model::Tensor::converted`]);
    /// written only when true, so a manifest dumped from a checkpoint folder keeps it.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub converted: bool,
}

fn default_kind() -> TensorKind {
    TensorKind::Param
}

impl Manifest {
    /// Parse manifest JSON; `origin` names the file in errors.
    pub fn from_json(text: &str, origin: &Path) -> Result<Manifest> {
        let manifest: Manifest =
            serde_json::from_str(text).map_err(|e| Error::json(origin, e.to_string()))?;
        if manifest.format != MANIFEST_FORMAT {
            return Err(Error::json(
                origin,
                format!(
                    "format is {:?}, expected {MANIFEST_FORMAT:?}",
                    manifest.format
                ),
            ));
        }
        Ok(manifest)
    }

    /// Read a manifest file.
    pub fn read(path: &Path) -> Result<Manifest> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Manifest::from_json(&text, path)
    }

    /// Build the model it describes.
    pub fn into_model(self, origin: &Path) -> Result<Model> {
        let mut b = ModelBuilder::new(if self.name.is_empty() {
            origin.display().to_string()
        } else {
            self.name
        })
        .reserve(self.modules.len(), self.tensors.len())
        .root_class(self.root_class.unwrap_or_default())
        .no_split_classes(self.no_split)
        .hidden_size(self.hidden_size);
        let quant_meta = quant_meta(
            &self.modules,
            self.keep_in_fp32_modules,
            self.output_embedding,
        );
        for m in self.modules {
            b = b.module(m.name, m.class);
        }
        for t in self.tensors {
            let dtype = DType::parse(&t.dtype).map_err(|_| {
                Error::json(
                    origin,
                    format!("tensor {:?} has unknown dtype {:?}", t.name, t.dtype),
                )
            })?;
            b = b.tensor(TensorSpec {
                name: t.name,
                dtype,
                shape: t.shape,
                kind: t.kind,
                source: None,
                converted: t.converted,
            });
        }
        for g in self.tied {
            b = b.tied(g);
        }
        b = b
            .tied_targets(self.tied_targets)
            .non_persistent(self.non_persistent);
        let mut model = b.build().map_err(|e| Error::json(origin, e.to_string()))?;
        model.quant_meta = quant_meta;
        Ok(model)
    }

    /// Describe an existing model as a manifest.
    pub fn from_model(model: &Model) -> Manifest {
        Manifest {
            format: MANIFEST_FORMAT.to_string(),
            name: model.name.clone(),
            dtype: model.tensors().first().map(|t| t.dtype.to_string()),
            root_class: Some(model.module(0).class.clone()).filter(|c| !c.is_empty()),
            modules: model.modules()[1..]
                .iter()
                .enumerate()
                .map(|(i, m)| ManifestModule {
                    name: m.name.clone(),
                    class: m.class.clone(),
                    torch_kind: model
                        .quant_meta
                        .torch_kinds
                        .as_ref()
                        .and_then(|_| model.quant_meta.torch_kind(model, i + 1)),
                })
                .collect(),
            tensors: model
                .tensors()
                .iter()
                .map(|t| ManifestTensor {
                    name: t.name.clone(),
                    dtype: t.dtype.to_string(),
                    shape: t.shape.clone(),
                    kind: t.kind,
                    converted: t.converted,
                })
                .collect(),
            tied: model
                .tied_groups()
                .iter()
                .map(|g| g.iter().map(|&t| model.tensor(t).name.clone()).collect())
                .collect(),
            tied_targets: (0..model.tensors().len())
                .filter(|&t| model.is_tied_target(t))
                .map(|t| model.tensor(t).name.clone())
                .collect(),
            non_persistent: (0..model.tensors().len())
                .filter(|&t| model.is_non_persistent(t))
                .map(|t| model.tensor(t).name.clone())
                .collect(),
            no_split: model.no_split_classes(),
            hidden_size: model.hidden_size,
            keep_in_fp32_modules: model.quant_meta.keep_in_fp32_modules.clone(),
            output_embedding: model.quant_meta.output_embedding.clone(),
        }
    }
}

/// Quantizer facts from manifest fields: `torch_kind` counts as recorded when any module has one.
fn quant_meta(
    modules: &[ManifestModule],
    keep_in_fp32_modules: Vec<String>,
    output_embedding: Option<String>,
) -> QuantMeta {
    let kinds: std::collections::HashMap<String, TorchKind> = modules
        .iter()
        .filter_map(|m| m.torch_kind.map(|k| (m.name.clone(), k)))
        .collect();
    QuantMeta {
        torch_kinds: (!kinds.is_empty()).then_some(kinds),
        keep_in_fp32_modules,
        output_embedding,
    }
}
