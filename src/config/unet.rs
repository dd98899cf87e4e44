//! The UNet's config (diffusers' `UNet2DConditionModel`, `unet/config.json`): SD-1.5's block
//! structure, the keys whose only supported value is SD-1.5's, and the checks the kernels need.

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use super::json::{check_fixed, eps_1e5, groups_32, nonzero, parse, read_json};
use crate::{Error, Result};

/// The down blocks SD-1.5's UNet is made of.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum DownBlockType {
    /// Resnets, each followed by a transformer (self- and cross-attention), then a downsampler.
    CrossAttnDownBlock2D,
    /// Resnets only (SD-1.5's last, lowest-resolution level: no downsampler).
    DownBlock2D,
}

/// The up blocks SD-1.5's UNet is made of (mirror of [`DownBlockType`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
pub enum UpBlockType {
    UpBlock2D,
    CrossAttnUpBlock2D,
}

/// The denoising UNet (diffusers' `UNet2DConditionModel`), SD-1.5 structure.
///
/// Derived widths: the time embedding is `block_out_channels[0]` (sinusoid) -> 4x that
/// (`time_embedding.linear_1/2`); level `i` has `block_out_channels[i]` channels and heads of
/// width `block_out_channels[i] / attention_head_dim`.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct UNetConfig {
    /// Latent channels in and out (4).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Channels per resolution level, top (full latent resolution) first.
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<DownBlockType>,
    pub up_block_types: Vec<UpBlockType>,
    /// Resnets per down block; up blocks have one more.
    pub layers_per_block: usize,
    /// diffusers' quirk: for SD-1.5 this is the NUMBER of attention heads (8), at every level;
    /// the head width is the level's channels divided by it. (diffusers keeps the old name for
    /// compatibility; its `num_attention_heads` key must be absent or null.)
    pub attention_head_dim: usize,
    /// Width of the text context (the CLIP hidden size, 768).
    pub cross_attention_dim: usize,
    #[serde(default = "groups_32")]
    pub norm_num_groups: usize,
    #[serde(default = "eps_1e5")]
    pub norm_eps: f32,
    /// Time sinusoid as [cos, sin] (true) instead of [sin, cos].
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    /// Frequency shift of the time sinusoid (0: exponents divide by half_dim - 0).
    #[serde(default)]
    pub freq_shift: f32,
    /// Transformer blocks per attention (SD-1.5: 1).
    #[serde(default = "one")]
    pub transformer_layers_per_block: usize,
    /// `proj_in`/`proj_out` as linear layers (SD-2) instead of 1x1 convolutions (SD-1.5: false).
    #[serde(default)]
    pub use_linear_projection: bool,
    /// Latent side the model was trained at (64 for 512 px); informative only.
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn yes() -> bool {
    true
}
fn one() -> usize {
    1
}

/// Keys of a diffusers UNet config whose only supported value is SD-1.5's: (key, value).
/// An absent key takes diffusers' default, which is SD-1.5's.
const UNET_FIXED: &[(&str, &str)] = &[
    ("act_fn", r#""silu""#),
    ("num_attention_heads", "null"),
    ("mid_block_type", r#""UNetMidBlock2DCrossAttn""#),
    ("center_input_sample", "false"),
    ("only_cross_attention", "false"),
    ("dual_cross_attention", "false"),
    ("class_embed_type", "null"),
    ("addition_embed_type", "null"),
    ("num_class_embeds", "null"),
    ("encoder_hid_dim", "null"),
    ("time_cond_proj_dim", "null"),
    ("time_embedding_type", r#""positional""#),
    ("resnet_time_scale_shift", r#""default""#),
    ("conv_in_kernel", "3"),
    ("conv_out_kernel", "3"),
    ("downsample_padding", "1"),
    ("mid_block_scale_factor", "1"),
    ("resnet_out_scale_factor", "1"),
    ("attention_type", r#""default""#),
];

impl UNetConfig {
    /// SD-1.5's UNet (`unet/config.json`).
    pub fn v1_5() -> Self {
        UNetConfig {
            block_out_channels: vec![320, 640, 1280, 1280],
            attention_head_dim: 8,
            cross_attention_dim: 768,
            norm_num_groups: 32,
            sample_size: Some(64),
            ..Self::structure()
        }
    }

    /// Tiny: widths [16, 32, 32, 32], 2 heads (head widths 8 / 16 / 16, mid 16), context 32,
    /// 8 groups (2 to 8 channels per group everywhere).
    pub fn tiny() -> Self {
        UNetConfig {
            block_out_channels: vec![16, 32, 32, 32],
            attention_head_dim: 2,
            cross_attention_dim: 32,
            norm_num_groups: 8,
            sample_size: Some(8),
            ..Self::structure()
        }
    }

    /// SD-1.5's block structure; widths are filled in by the callers.
    fn structure() -> Self {
        use DownBlockType::*;
        use UpBlockType::*;
        UNetConfig {
            in_channels: 4,
            out_channels: 4,
            block_out_channels: Vec::new(),
            down_block_types: vec![
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                CrossAttnDownBlock2D,
                DownBlock2D,
            ],
            up_block_types: vec![
                UpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
                CrossAttnUpBlock2D,
            ],
            layers_per_block: 2,
            attention_head_dim: 0,
            cross_attention_dim: 0,
            norm_num_groups: 0,
            norm_eps: 1e-5,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            transformer_layers_per_block: 1,
            use_linear_projection: false,
            sample_size: None,
        }
    }

    /// Number of attention heads at every level (diffusers' `attention_head_dim`).
    pub fn num_heads(&self) -> usize {
        self.attention_head_dim
    }

    /// Head width at resolution level `level` (0 = top).
    pub fn head_dim(&self, level: usize) -> usize {
        self.block_out_channels[level] / self.attention_head_dim
    }

    /// Width of the sinusoidal time projection (`time_proj`), `block_out_channels[0]`.
    pub fn time_proj_dim(&self) -> usize {
        self.block_out_channels[0]
    }

    /// Width of the time embedding fed to every resnet, 4 x `block_out_channels[0]`.
    pub fn time_embed_dim(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// Reads a diffusers `unet/config.json`.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        check_fixed(path, &value, UNET_FIXED)?;
        if value.get("attention_head_dim").is_some_and(Value::is_array) {
            return Err(Error::model(
                path,
                "attention_head_dim is a list (an SD-2-style UNet); SD-1.5 has one head count \
                 for all levels",
            ));
        }
        if value.get("transformer_layers_per_block").is_some_and(Value::is_array) {
            return Err(Error::model(path, "transformer_layers_per_block is a list; SD-1.5 has 1"));
        }
        let cfg: UNetConfig = parse(path, value)?;
        cfg.validate().map_err(|p| Error::model(path, p))?;
        Ok(cfg)
    }

    /// Checks SD-1.5's structure and that every width divides as the kernels need.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sd = Self::structure();
        if self.block_out_channels.len() != 4 {
            return Err(format!(
                "block_out_channels has {} levels; SD-1.5 has 4",
                self.block_out_channels.len()
            ));
        }
        if self.down_block_types != sd.down_block_types || self.up_block_types != sd.up_block_types
        {
            return Err(format!(
                "block types {:?} / {:?} are not SD-1.5's {:?} / {:?}",
                self.down_block_types, self.up_block_types, sd.down_block_types, sd.up_block_types
            ));
        }
        if self.transformer_layers_per_block != 1 {
            return Err(format!(
                "transformer_layers_per_block is {}; SD-1.5 has 1",
                self.transformer_layers_per_block
            ));
        }
        if self.use_linear_projection {
            return Err(
                "use_linear_projection is true (an SD-2-style UNet); SD-1.5 uses 1x1 convolutions"
                    .into(),
            );
        }
        nonzero(&[
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("layers_per_block", self.layers_per_block),
            ("attention_head_dim", self.attention_head_dim),
            ("cross_attention_dim", self.cross_attention_dim),
            ("norm_num_groups", self.norm_num_groups),
        ])?;
        for &c in &self.block_out_channels {
            if c == 0
                || !c.is_multiple_of(self.norm_num_groups)
                || !c.is_multiple_of(self.attention_head_dim)
            {
                return Err(format!(
                    "block_out_channels {:?}: every width must be a non-zero multiple of \
                     norm_num_groups ({}) \
                     and of the head count attention_head_dim ({})",
                    self.block_out_channels, self.norm_num_groups, self.attention_head_dim
                ));
            }
        }
        Ok(())
    }
}
