//! Causal decoder language models on candle: BLOOM and Llama loaded from Hugging Face
//! directories, computing what `transformers` computes, trainable through kernels whose backward
//! passes are exact, with LoRA adapters, KV-cached generation and log-likelihood scoring.
//!
//! This crate knows nothing about federation, transport or training loops.

pub mod bloom;
pub mod checkpoint;
pub mod delta;
pub mod generate;
pub mod llama;
pub mod lora;
pub mod model;
pub mod ops;
pub mod recompute;
pub mod score;
pub mod tokenizer;

pub use checkpoint::{Arch, Architecture, Checkpoint, ModelIdentity, ModelSpec, WeightDtype};
pub use lora::{LoraConfig, LoraSet};
pub use model::{CausalLm, KvCache, Weights};
pub use recompute::Recompute;
pub use tokenizers;
