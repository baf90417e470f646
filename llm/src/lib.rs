//! Batch LLM inference for volley.
//!
//! - Loading a Hugging Face model folder: `config.json` ([`ModelConfig`]: Llama,
//!   Qwen2, Mistral), its `safetensors` weights, single or sharded, checked against the
//!   shapes the config implies ([`Checkpoint`]), `tokenizer.json` ([`Tokenizer`]) and
//!   the chat template of `tokenizer_config.json` ([`ChatTemplate`]).
//! - The decoder in Burn ([`Model`]), generic over the backend (CPU: `ndarray`).
//! - The [`Engine`]: continuous batching over a paged KV cache ([`KvCache`],
//!   [`BlockManager`]) with automatic prefix caching, and sampling
//!   ([`SamplingParams`]: greedy, temperature, top-k, top-p, seeds, stop tokens and
//!   strings).
//! - The Dataset stage ([`LlmProcessor`]): a column of prompts in, generated text out.

mod chat;
mod checkpoint;
mod config;
mod engine;
mod kv_cache;
mod linear;
mod model;
mod processor;

mod sampling;
mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use checkpoint::{Checkpoint, Tensor};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use engine::{Engine, EngineConfig, EngineStats, FinishReason, Generation};
pub use kv_cache::{block_hash, BlockId, BlockManager, KvCache, PrefixCacheStats};
pub use model::{AttentionGroup, AttentionSeq, ForwardBatch, Model};
pub use processor::{LlmConfig, LlmProcessor};

pub use sampling::{argmax, sample, SamplingParams};
pub use tokenizer::Tokenizer;

/// The CPU backend: Burn's `ndarray` backend in f32.
pub type CpuBackend = burn::backend::NdArray<f32>;
