//! The VAE's config (diffusers' `AutoencoderKL`, `vae/config.json`).

use std::path::Path;

use serde::Deserialize;

use super::json::{check_fixed, groups_32, nonzero, parse, read_json};
use crate::{Error, Result};

/// The autoencoder (diffusers' `AutoencoderKL`), SD-1.5 structure: 4 levels of
/// `DownEncoderBlock2D` / `UpDecoderBlock2D`, a mid block with one single-head attention
/// (head width = last level's channels), `quant_conv` and `post_quant_conv`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct VaeConfig {
    /// Image channels (3).
    #[serde(default = "three")]
    pub in_channels: usize,
    #[serde(default = "three")]
    pub out_channels: usize,
    /// Latent channels (4); the encoder outputs twice that (mean and log-variance).
    pub latent_channels: usize,
    /// Encoder channels per level, top (full image resolution) first; the decoder mirrors them.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level; decoder levels have one more.
    pub layers_per_block: usize,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    /// Latents the UNet sees are `scaling_factor * z` (SD-1.5: 0.18215; absent from SD-1.5's
    /// own config file, so that is the default).
    #[serde(default = "scaling_18215")]
    pub scaling_factor: f32,
    /// GroupNorm epsilon. Not a diffusers config key: diffusers hard-codes 1e-6 in the VAE.
    #[serde(skip, default = "eps_1e6")]
    pub norm_eps: f32,
    /// Image side the model was trained at (512); informative only.
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn three() -> usize {
    3
}
fn scaling_18215() -> f32 {
    0.18215
}
fn eps_1e6() -> f32 {
    1e-6
}

/// Keys of a diffusers VAE config whose only supported value is SD-1.5's.
const VAE_FIXED: &[(&str, &str)] = &[
    ("act_fn", r#""silu""#),
    (
        "down_block_types",
        r#"["DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D","DownEncoderBlock2D"]"#,
    ),
    (
        "up_block_types",
        r#"["UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D","UpDecoderBlock2D"]"#,
    ),
    ("use_quant_conv", "true"),
    ("use_post_quant_conv", "true"),
    ("mid_block_add_attention", "true"),
    ("shift_factor", "null"),
    ("latents_mean", "null"),
    ("latents_std", "null"),
];

impl VaeConfig {
    /// SD-1.5's VAE (`vae/config.json`).
    pub fn v1_5() -> Self {
        VaeConfig {
            block_out_channels: vec![128, 256, 512, 512],
            norm_num_groups: 32,
            sample_size: Some(512),
            ..Self::structure()
        }
    }

    /// Tiny: widths [16, 32, 32, 32], 8 groups; mid attention single-head of width 32.
    pub fn tiny() -> Self {
        VaeConfig {
            block_out_channels: vec![16, 32, 32, 32],
            norm_num_groups: 8,
            sample_size: Some(64),
            ..Self::structure()
        }
    }

    fn structure() -> Self {
        VaeConfig {
            in_channels: 3,
            out_channels: 3,
            latent_channels: 4,
            block_out_channels: Vec::new(),
            layers_per_block: 2,
            norm_num_groups: 0,
            scaling_factor: 0.18215,
            norm_eps: 1e-6,
            sample_size: None,
        }
    }

    /// Image pixels per latent pixel along each side (8: one halving per level but the last).
    pub fn downscale(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }

    /// Reads a diffusers `vae/config.json`.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        check_fixed(path, &value, VAE_FIXED)?;
        let cfg: VaeConfig = parse(path, value)?;
        cfg.validate().map_err(|p| Error::model(path, p))?;
        Ok(cfg)
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.block_out_channels.len() != 4 {
            return Err(format!(
                "block_out_channels has {} levels; SD-1.5's VAE has 4",
                self.block_out_channels.len()
            ));
        }
        nonzero(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("layers_per_block", self.layers_per_block),
            ("norm_num_groups", self.norm_num_groups),
        ])?;
        for &c in &self.block_out_channels {
            if c == 0 || !c.is_multiple_of(self.norm_num_groups) {
                return Err(format!(
                    "block_out_channels {:?}: every width must be a non-zero multiple of \
                     norm_num_groups ({})",
                    self.block_out_channels, self.norm_num_groups
                ));
            }
        }
        Ok(())
    }
}
