//! `config.json` of a Hugging Face Llama-family model.

use std::path::Path;

use serde_json::Value;
use volley_common::{Result, VolleyError};

/// The architectures the engine implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Architecture {
    /// `LlamaForCausalLM` (Llama 2/3, TinyLlama).
    Llama,
    /// `Qwen2ForCausalLM`: bias on the q/k/v projections.
    Qwen2,
    /// `MistralForCausalLM`.
    Mistral,
}

/// Llama-3 style frequency scaling of RoPE.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RopeScaling {
    /// Overall factor.
    pub factor: f64,
    /// Wavelengths above `original / low_freq_factor` are scaled fully.
    pub low_freq_factor: f64,
    /// Wavelengths below `original / high_freq_factor` are kept.
    pub high_freq_factor: f64,
    /// The context length the model was trained at.
    pub original_max_position_embeddings: usize,
}

/// What the model looks like.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// Which architecture.
    pub architecture: Architecture,
    /// Width of the residual stream.
    pub hidden_size: usize,
    /// Width of the SwiGLU MLP.
    pub intermediate_size: usize,
    /// Decoder layers.
    pub num_layers: usize,
    /// Query heads.
    pub num_heads: usize,
    /// Key/value heads (grouped-query attention when fewer than `num_heads`).
    pub num_kv_heads: usize,
    /// Width of one head.
    pub head_dim: usize,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// Llama-3 RoPE scaling, if any.
    pub rope_scaling: Option<RopeScaling>,
    /// Whether the q/k/v projections have a bias.
    pub attention_bias: bool,
    /// Whether the output projection reuses the embedding matrix.
    pub tie_word_embeddings: bool,
    /// Longest context.
    pub max_position_embeddings: usize,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence tokens (some models have several).
    pub eos_token_ids: Vec<u32>,
    /// Attention window of models that use one (Mistral): the engine attends over the
    /// whole sequence, so it refuses sequences longer than this.
    pub sliding_window: Option<usize>,
}

fn field<'a>(v: &'a Value, name: &str, file: &str) -> Result<&'a Value> {
    v.get(name)
        .ok_or_else(|| VolleyError::plan(format!("{file}: missing `{name}`")))
}

fn usize_field(v: &Value, name: &str, file: &str) -> Result<usize> {
    field(v, name, file)?
        .as_u64()
        .map(|n| n as usize)
        .ok_or_else(|| VolleyError::plan(format!("{file}: `{name}` is not a whole number")))
}

fn token_ids(v: Option<&Value>) -> Vec<u32> {
    match v {
        Some(Value::Number(n)) => n.as_u64().map(|n| vec![n as u32]).unwrap_or_default(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|x| x.as_u64())
            .map(|n| n as u32)
            .collect(),
        _ => vec![],
    }
}

impl ModelConfig {
    /// Reads `config.json` from a model folder, with the end-of-sequence tokens that
    /// its `generation_config.json` (if any) adds: transformers' `generate` stops at
    /// those too (Qwen2.5-Instruct lists `<|endoftext|>` only there). Its sampling
    /// defaults are not applied: sampling is what the caller sets.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("config.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| VolleyError::plan(format!("cannot read {}: {e}", path.display())))?;
        let mut config = Self::from_json(&text, &path.display().to_string())?;
        let generation = dir.join("generation_config.json");
        if generation.exists() {
            let text = std::fs::read_to_string(&generation).map_err(|e| {
                VolleyError::plan(format!("cannot read {}: {e}", generation.display()))
            })?;
            let v: Value = serde_json::from_str(&text).map_err(|e| {
                VolleyError::plan(format!("{}: not valid JSON: {e}", generation.display()))
            })?;
            for id in token_ids(v.get("eos_token_id")) {
                if !config.eos_token_ids.contains(&id) {
                    config.eos_token_ids.push(id);
                }
            }
        }
        Ok(config)
    }

    /// Parses the text of a `config.json`; `file` names it in errors.
    pub fn from_json(text: &str, file: &str) -> Result<Self> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| VolleyError::plan(format!("{file}: not valid JSON: {e}")))?;
        let arch_name = v
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            .or_else(|| v.get("model_type").and_then(|m| m.as_str()))
            .ok_or_else(|| {
                VolleyError::plan(format!("{file}: no `architectures` or `model_type`"))
            })?;
        let architecture = match arch_name {
            "LlamaForCausalLM" | "llama" => Architecture::Llama,
            "Qwen2ForCausalLM" | "qwen2" => Architecture::Qwen2,
            "MistralForCausalLM" | "mistral" => Architecture::Mistral,
            other => {
                return Err(VolleyError::plan(format!(
                    "{file}: architecture `{other}` is not supported (Llama, Qwen2 and Mistral are)"
                )))
            }
        };
        let hidden_size = usize_field(&v, "hidden_size", file)?;
        let num_heads = usize_field(&v, "num_attention_heads", file)?;
        let num_kv_heads = match v.get("num_key_value_heads").filter(|h| !h.is_null()) {
            Some(_) => usize_field(&v, "num_key_value_heads", file)?,
            None => num_heads,
        };
        if num_heads == 0 || num_kv_heads == 0 || num_heads % num_kv_heads != 0 {
            return Err(VolleyError::plan(format!(
                "{file}: {num_heads} attention heads cannot be grouped over {num_kv_heads} key/value heads"
            )));
        }
        let head_dim = match v.get("head_dim").filter(|h| !h.is_null()) {
            Some(_) => usize_field(&v, "head_dim", file)?,
            None => hidden_size / num_heads,
        };
        // transformers 4 writes `rope_theta` and `rope_scaling`; 5 writes both inside
        // `rope_parameters`.
        let rope = v.get("rope_parameters");
        let rope_theta = v
            .get("rope_theta")
            .or_else(|| rope.and_then(|r| r.get("rope_theta")))
            .and_then(|t| t.as_f64())
            .unwrap_or(10_000.0);
        let scaling = v.get("rope_scaling").filter(|s| !s.is_null()).or(rope);
        let rope_scaling = match scaling {
            Some(s)
                if s.get("rope_type")
                    .or_else(|| s.get("type"))
                    .and_then(|t| t.as_str())
                    == Some("llama3") =>
            {
                let f = |n: &str| {
                    s.get(n).and_then(|x| x.as_f64()).ok_or_else(|| {
                        VolleyError::plan(format!("{file}: llama3 RoPE scaling lacks `{n}`"))
                    })
                };
                Some(RopeScaling {
                    factor: f("factor")?,
                    low_freq_factor: f("low_freq_factor")?,
                    high_freq_factor: f("high_freq_factor")?,
                    original_max_position_embeddings: f("original_max_position_embeddings")?
                        as usize,
                })
            }
            Some(s) => match s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(|t| t.as_str())
            {
                None | Some("default") => None,
                Some(other) => {
                    return Err(VolleyError::plan(format!(
                        "{file}: RoPE type `{other}` is not supported (default and llama3 are)"
                    )))
                }
            },
            None => None,
        };
        // Sizes of 0 make no model (and would divide by zero when sizing its cache).
        for (name, n) in [("hidden_size", hidden_size), ("head_dim", head_dim)] {
            if n == 0 {
                return Err(VolleyError::plan(format!(
                    "{file}: `{name}` is 0; it must be at least 1"
                )));
            }
        }
        let positive = |name: &str| match usize_field(&v, name, file)? {
            0 => Err(VolleyError::plan(format!(
                "{file}: `{name}` is 0; it must be at least 1"
            ))),
            n => Ok(n),
        };
        Ok(Self {
            architecture,
            hidden_size,
            intermediate_size: positive("intermediate_size")?,
            num_layers: positive("num_hidden_layers")?,
            num_heads,
            num_kv_heads,
            head_dim,
            vocab_size: positive("vocab_size")?,
            rms_norm_eps: v
                .get("rms_norm_eps")
                .and_then(|e| e.as_f64())
                .unwrap_or(1e-6),
            rope_theta,
            rope_scaling,
            attention_bias: v
                .get("attention_bias")
                .and_then(|b| b.as_bool())
                .unwrap_or(architecture == Architecture::Qwen2),
            tie_word_embeddings: v
                .get("tie_word_embeddings")
                .and_then(|b| b.as_bool())
                .unwrap_or(false),
            max_position_embeddings: v
                .get("max_position_embeddings")
                .and_then(|m| m.as_u64())
                .unwrap_or(4096) as usize,
            bos_token_id: token_ids(v.get("bos_token_id")).first().copied(),
            eos_token_ids: token_ids(v.get("eos_token_id")),
            sliding_window: match v.get("use_sliding_window").and_then(|u| u.as_bool()) {
                Some(false) => None,
                _ => v
                    .get("sliding_window")
                    .and_then(|w| w.as_u64())
                    .map(|w| w as usize),
            },
        })
    }

    /// Every weight the model needs, with its shape (`[out, in]` for projections, as
    /// Hugging Face stores them).
    pub fn expected_tensors(&self) -> Vec<(String, Vec<usize>)> {
        let (h, i, d) = (self.hidden_size, self.intermediate_size, self.head_dim);
        let (q, kv) = (self.num_heads * d, self.num_kv_heads * d);
        let mut out = vec![(
            "model.embed_tokens.weight".to_string(),
            vec![self.vocab_size, h],
        )];
        for l in 0..self.num_layers {
            let p = format!("model.layers.{l}");
            out.push((format!("{p}.input_layernorm.weight"), vec![h]));
            out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
            out.push((format!("{p}.self_attn.q_proj.weight"), vec![q, h]));
            out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
            out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, q]));
            if self.attention_bias {
                out.push((format!("{p}.self_attn.q_proj.bias"), vec![q]));
                out.push((format!("{p}.self_attn.k_proj.bias"), vec![kv]));
                out.push((format!("{p}.self_attn.v_proj.bias"), vec![kv]));
            }
            out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
            out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
        }
        out.push(("model.norm.weight".to_string(), vec![h]));
        if !self.tie_word_embeddings {
            out.push(("lm_head.weight".to_string(), vec![self.vocab_size, h]));
        }
        out
    }
}
