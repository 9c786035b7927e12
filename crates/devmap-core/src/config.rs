//! The parts of a Hugging Face `config.json` that planning needs.

use std::path::Path;

use crate::error::{Error, Result};

/// A model's `config.json`, with typed accessors for the fields devmap uses.
///
/// Multimodal configs keep the language model under `text_config`; accessors look there too.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// The whole JSON document.
    pub raw: serde_json::Value,
}

impl ModelConfig {
    /// Read a config file.
    pub fn read(path: &Path) -> Result<ModelConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::json(path, e.to_string()))?;
        if !raw.is_object() {
            return Err(Error::json(path, "config.json must be a JSON object"));
        }
        Ok(ModelConfig { raw })
    }

    fn lookup(&self, keys: &[&str]) -> Option<&serde_json::Value> {
        for scope in [Some(&self.raw), self.raw.get("text_config")]
            .into_iter()
            .flatten()
        {
            for k in keys {
                if let Some(v) = scope.get(*k) {
                    if !v.is_null() {
                        return Some(v);
                    }
                }
            }
        }
        None
    }

    fn lookup_u64(&self, keys: &[&str]) -> Option<u64> {
        self.lookup(keys).and_then(serde_json::Value::as_u64)
    }

    /// Width of the hidden state (`hidden_size`, `n_embd`, `d_model`).
    pub fn hidden_size(&self) -> Option<u64> {
        self.lookup_u64(&["hidden_size", "n_embd", "d_model"])
    }
    /// Number of decoder layers.
    pub fn num_layers(&self) -> Option<u64> {
        self.lookup_u64(&["num_hidden_layers", "n_layer", "num_layers"])
    }
    /// Number of attention heads.
    pub fn num_attention_heads(&self) -> Option<u64> {
        self.lookup_u64(&["num_attention_heads", "n_head", "num_heads"])
    }
    /// Number of key/value heads (defaults to the attention heads).
    pub fn num_key_value_heads(&self) -> Option<u64> {
        self.lookup_u64(&["num_key_value_heads"])
            .or_else(|| self.num_attention_heads())
    }
    /// Dimension of one head (`head_dim`, `d_kv`, else hidden / heads).
    pub fn head_dim(&self) -> Option<u64> {
        self.lookup_u64(&["head_dim", "d_kv"]).or_else(|| {
            let heads = self.num_attention_heads()?;
            (heads > 0).then(|| self.hidden_size().unwrap_or(0) / heads)
        })
    }
    /// `tie_word_embeddings` as transformers 5 reads it for the top-level model: the top-level key
    /// only (a `text_config` decides for its own tower, not for the head of the composite model),
    /// and `false` without it. transformers 5 has no library-wide default: the config class sets
    /// one, and `save_pretrained` always writes the key when the class has it, so a config.json
    /// without it comes from a class without it (`getattr(config, "tie_word_embeddings", False)`).
    /// [`ModelConfig::tie_word_embeddings_or`] takes a class default from the registry instead.
    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings_or(false)
    }
    /// `tie_word_embeddings` at the top level, or `class_default` (the config class's default,
    /// for config.json files written without the key by older transformers versions).
    pub fn tie_word_embeddings_or(&self, class_default: bool) -> bool {
        self.bool_at("tie_word_embeddings", class_default)
    }
    /// The value at a dotted path (`text_config.num_hidden_layers`), exactly there: no fallback
    /// to other scopes. `null` counts as absent (transformers' `None`).
    pub fn get_path(&self, path: &str) -> Option<&serde_json::Value> {
        let mut v = &self.raw;
        for part in path.split('.') {
            v = v.get(part)?;
        }
        (!v.is_null()).then_some(v)
    }
    /// A boolean at a dotted path, or `default` when absent or not a boolean.
    pub fn bool_at(&self, path: &str, default: bool) -> bool {
        self.get_path(path)
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(default)
    }
    /// `model_type`, when present.
    pub fn model_type(&self) -> Option<&str> {
        self.raw
            .get("model_type")
            .and_then(serde_json::Value::as_str)
    }
    /// `architectures` (the class names `save_pretrained` recorded), in order.
    pub fn architectures(&self) -> Vec<&str> {
        self.raw
            .get("architectures")
            .and_then(serde_json::Value::as_array)
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default()
    }
    /// Whether the architecture has a language-model head (`*ForCausalLM`, `*LMHeadModel`...).
    pub fn has_lm_head(&self) -> bool {
        self.architectures().iter().any(|s| {
            s.ends_with("ForCausalLM")
                || s.ends_with("LMHeadModel")
                || s.ends_with("ForConditionalGeneration")
        })
    }
}
