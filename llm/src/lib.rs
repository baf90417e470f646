//! Batch LLM inference for volley.
//!
//! What is here so far is the loading side of a Llama-family engine: a Hugging Face
//! model folder's `config.json` ([`ModelConfig`], Llama, Qwen2 and Mistral), its
//! `safetensors` weights, single or sharded, checked against the shapes the config
//! implies and widened to f32 ([`Checkpoint`]), its `tokenizer.json`
//! ([`Tokenizer`]) and the chat template of its `tokenizer_config.json`
//! ([`ChatTemplate`]). The model, the engine and the Dataset stage are not built yet.

mod chat;
mod checkpoint;
mod config;
mod tokenizer;

pub use chat::{ChatTemplate, Message};
pub use checkpoint::{Checkpoint, Tensor};
pub use config::{Architecture, ModelConfig, RopeScaling};
pub use tokenizer::Tokenizer;
