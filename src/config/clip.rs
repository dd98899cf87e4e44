//! The CLIP text encoder's config (transformers' `CLIPTextConfig`, `text_encoder/config.json`).

use std::path::Path;

use serde::Deserialize;

use super::json::{eps_1e5, nonzero, parse, read_json};
use crate::{Error, Result};

/// Activation of the CLIP MLP. SD-1.5's text encoder (CLIP ViT-L/14) uses `quick_gelu`,
/// x * sigmoid(1.702 x).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    QuickGelu,
}

/// CLIP text encoder (transformers' `CLIPTextConfig`): pre-norm transformer, causal attention.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct ClipConfig {
    /// Token table rows (49408 for CLIP's BPE vocabulary).
    pub vocab_size: usize,
    /// Model width; also the UNet's `cross_attention_dim`.
    pub hidden_size: usize,
    /// MLP width (`fc1` output).
    pub intermediate_size: usize,
    /// Encoder layers. SD-1.5 uses the last one (after `final_layer_norm`); "clip skip" uses
    /// the one before.
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    /// Sequence length of the position table (77).
    pub max_position_embeddings: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: ClipActivation,
    #[serde(default = "eps_1e5")]
    pub layer_norm_eps: f32,
}

fn quick_gelu() -> ClipActivation {
    ClipActivation::QuickGelu
}

impl ClipConfig {
    /// CLIP ViT-L/14's text model, as in SD-1.5's `text_encoder/config.json`.
    pub fn v1_5() -> Self {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// Tiny: the real vocabulary (real token ids work), width 32, 4 heads, 3 layers.
    pub fn tiny() -> Self {
        ClipConfig {
            vocab_size: 49408,
            hidden_size: 32,
            intermediate_size: 128,
            num_hidden_layers: 3,
            num_attention_heads: 4,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
        }
    }

    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// Reads a transformers `CLIPTextConfig` file (`text_encoder/config.json`).
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        let cfg: ClipConfig = parse(path, value)?;
        cfg.validate().map_err(|p| Error::model(path, p))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        nonzero(&[
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_attention_heads),
            ("max_position_embeddings", self.max_position_embeddings),
        ])?;
        if !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if self.num_hidden_layers < 2 {
            return Err(format!(
                "num_hidden_layers is {}; SD-1.5's text encoder needs at least 2",
                self.num_hidden_layers
            ));
        }
        Ok(())
    }
}
