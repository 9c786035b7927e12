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
    /// `tie_word_embeddings` (Hugging Face's default is true).
    pub fn tie_word_embeddings(&self) -> bool {
        self.raw
            .get("tie_word_embeddings")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or(true)
    }
    /// Whether the architecture has a language-model head (`*ForCausalLM`, `*LMHeadModel`...).
    pub fn has_lm_head(&self) -> bool {
        self.raw
            .get("architectures")
            .and_then(serde_json::Value::as_array)
            .is_some_and(|a| {
                a.iter().filter_map(serde_json::Value::as_str).any(|s| {
                    s.ends_with("ForCausalLM")
                        || s.ends_with("LMHeadModel")
                        || s.ends_with("ForConditionalGeneration")
                })
            })
    }
}
