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

    fn lookup_bool(&self, key: &str) -> Option<bool> {
        self.lookup(&[key]).and_then(serde_json::Value::as_bool)
    }

    /// Width of the MLP (`intermediate_size`, `d_ff`, `ffn_dim`, `n_inner`; else 4 × hidden, the
    /// GPT-2/BLOOM/Falcon default).
    pub fn intermediate_size(&self) -> Option<u64> {
        self.lookup_u64(&["intermediate_size", "d_ff", "ffn_dim", "n_inner"])
            .or_else(|| self.hidden_size().map(|h| h.saturating_mul(4)))
    }
    /// Routed experts per MoE layer (`num_local_experts` Mixtral, `num_experts` Qwen-MoE/OLMoE,
    /// `n_routed_experts` DeepSeek), when the model has them.
    pub fn num_experts(&self) -> Option<u64> {
        self.lookup_u64(&["num_local_experts", "num_experts", "n_routed_experts"])
    }
    /// Experts each token is routed to (`num_experts_per_tok`, `moe_top_k`; not `top_k`, a
    /// sampling setting in older configs).
    pub fn experts_per_token(&self) -> Option<u64> {
        self.lookup_u64(&["num_experts_per_tok", "moe_top_k"])
    }
    /// Vocabulary size (the width of the logits).
    pub fn vocab_size(&self) -> Option<u64> {
        self.lookup_u64(&["vocab_size"])
    }
    /// Whether the model is an encoder-decoder (its decoder layers also cache cross-attention).
    pub fn is_encoder_decoder(&self) -> bool {
        self.lookup_bool("is_encoder_decoder").unwrap_or(false)
    }
    /// Number of decoder layers of an encoder-decoder (`num_decoder_layers`, else `num_layers`).
    pub fn num_decoder_layers(&self) -> Option<u64> {
        self.lookup_u64(&["num_decoder_layers", "decoder_layers"])
            .or_else(|| self.num_layers())
    }
    /// The latent width of multi-head latent attention (`kv_lora_rank`, DeepSeek-V2/V3) and its
    /// rotary part (`qk_rope_head_dim`), when the model uses it.
    pub fn latent_attention(&self) -> Option<(u64, u64)> {
        let rank = self.lookup_u64(&["kv_lora_rank"])?;
        Some((rank, self.lookup_u64(&["qk_rope_head_dim"]).unwrap_or(0)))
    }
    /// The attention window of sliding layers: `sliding_window` unless `use_sliding_window` is
    /// false (Qwen2), or 0/null.
    pub fn sliding_window(&self) -> Option<u64> {
        if self.lookup_bool("use_sliding_window") == Some(false) {
            return None;
        }
        self.lookup_u64(&["sliding_window"]).filter(|&w| w > 0)
    }
    /// The chunk of chunked-attention layers (`attention_chunk_size`, Llama 4).
    pub fn attention_chunk_size(&self) -> Option<u64> {
        self.lookup_u64(&["attention_chunk_size"])
            .filter(|&w| w > 0)
    }
    /// `layer_types` (`full_attention`, `sliding_attention`, ...), when config.json lists them.
    pub fn layer_types(&self) -> Option<Vec<String>> {
        let list = self.lookup(&["layer_types"])?.as_array()?;
        Some(
            list.iter()
                .map(|v| v.as_str().unwrap_or_default().to_string())
                .collect(),
        )
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
    ///
    /// Falcon's `multi_query` without `new_decoder_architecture` means one KV head; its new
    /// architecture names them `num_kv_heads`; ChatGLM's `multi_query_group_num`.
    pub fn num_key_value_heads(&self) -> Option<u64> {
        if self.lookup_bool("multi_query") == Some(true)
            && self.lookup_bool("new_decoder_architecture") != Some(true)
        {
            return Some(1);
        }
        self.lookup_u64(&["num_key_value_heads", "multi_query_group_num"])
            .or_else(|| {
                (self.lookup_bool("new_decoder_architecture") == Some(true))
                    .then(|| self.lookup_u64(&["num_kv_heads"]))
                    .flatten()
            })
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
    /// Whether the model generates with a KV cache: it has a language-model head, or config.json
    /// names no architecture (hand-written configs).
    pub fn generates(&self) -> bool {
        self.raw
            .get("architectures")
            .is_none_or(serde_json::Value::is_null)
            || self.has_lm_head()
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
