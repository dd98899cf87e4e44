//! Model configurations: SD-1.5 and the tiny test model.
//!
//! Config is data: every width, count and constant the models need lives here, under the names
//! diffusers uses in its `config.json` files, so a diffusers folder's configs deserialize
//! straight into these structs (extra keys are ignored). Only SD-1.5's structure is supported;
//! a config that asks for anything else (other block types, linear projections, several
//! transformer layers, ...) is refused with a message naming the key.
//!
//! [`Sd15Config::tiny`] has SD-1.5's block structure with small widths. It must agree exactly with
//! `tests/fixtures/make_fixtures.py`, which builds the random-weight reference models from the same
//! numbers (`tests/fixtures_check.rs` parses the fixture configs and compares).

use std::path::Path;

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

/// The three networks of an SD-1.5 checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Sd15Config {
    pub clip: ClipConfig,
    pub unet: UNetConfig,
    pub vae: VaeConfig,
}

impl Sd15Config {
    /// Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5).
    pub fn v1_5() -> Self {
        Sd15Config { clip: ClipConfig::v1_5(), unet: UNetConfig::v1_5(), vae: VaeConfig::v1_5() }
    }

    /// The tiny test model: SD-1.5's block structure, small widths (see
    /// `tests/fixtures/make_fixtures.py` for why these numbers).
    pub fn tiny() -> Self {
        Sd15Config { clip: ClipConfig::tiny(), unet: UNetConfig::tiny(), vae: VaeConfig::tiny() }
    }

    /// Reads `text_encoder/config.json`, `unet/config.json` and `vae/config.json` of a diffusers
    /// folder and checks that they fit together.
    pub fn from_diffusers_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let cfg = Sd15Config {
            clip: ClipConfig::from_diffusers_json(dir.join("text_encoder").join("config.json"))?,
            unet: UNetConfig::from_diffusers_json(dir.join("unet").join("config.json"))?,
            vae: VaeConfig::from_diffusers_json(dir.join("vae").join("config.json"))?,
        };
        cfg.validate().map_err(|p| Error::model(dir, p))?;
        Ok(cfg)
    }

    /// Checks each model and that they fit together (context width, latent channels).
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.clip.validate()?;
        self.unet.validate()?;
        self.vae.validate()?;
        if self.unet.cross_attention_dim != self.clip.hidden_size {
            return Err(format!(
                "the UNet's cross_attention_dim ({}) differs from the text encoder's \
                 hidden_size ({})",
                self.unet.cross_attention_dim, self.clip.hidden_size
            ));
        }
        if self.unet.in_channels != self.vae.latent_channels
            || self.unet.out_channels != self.vae.latent_channels
        {
            return Err(format!(
                "the UNet's in/out channels ({}/{}) differ from the VAE's latent_channels ({})",
                self.unet.in_channels, self.unet.out_channels, self.vae.latent_channels
            ));
        }
        Ok(())
    }
}

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
fn eps_1e5() -> f32 {
    1e-5
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

fn groups_32() -> usize {
    32
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

/// How the training noise schedule's betas run from `beta_start` to `beta_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linear in beta.
    Linear,
    /// Linear in sqrt(beta), squared (SD-1.5).
    ScaledLinear,
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD-1.5).
    Epsilon,
    /// v = alpha_t * noise - sigma_t * x0.
    VPrediction,
}

/// How inference timesteps are placed among the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `(0..n) * (T / n) + steps_offset`, descending (DDIM's and PNDM's default).
    Leading,
    /// `T - k * T / n - 1` for k in 0..n.
    Trailing,
    /// `linspace(0, T - 1, n)` (rounded for the samplers that take integer timesteps; the
    /// default of every other sampler).
    Linspace,
}

/// The noise schedule and inference-time conventions (diffusers' `scheduler_config.json`;
/// SD-1.5 ships a `PNDMScheduler` config, whose shared keys every sampler here follows).
///
/// Switching samplers in diffusers is `Cls.from_config(pipe.scheduler.config)`, and there a key the
/// file leaves out takes the *new class's* default, not the PNDM one. The keys whose defaults differ
/// between the schedulers are therefore kept as `Option` (`None`: absent from the file), and each
/// sampler in [`crate::schedulers`] applies its own diffusers default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Added to every "leading" inference timestep (SD-1.5: 1, so 50 steps run 981, 961, ..., 1).
    /// Absent: 0, as in every diffusers scheduler.
    #[serde(default)]
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    /// Absent (SD-1.5's file): "leading" for DDIM and PNDM, "linspace" for the other samplers.
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// DDIM and PNDM: use alpha_cumprod = 1 for the step after the last (false: the first
    /// alpha_cumprod). Absent: true for DDIM, false for PNDM.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM and Heun: clip the predicted x0 to [-1, 1]. Absent: true for DDIM, false for Heun.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// PNDM: skip the Runge-Kutta warm-up (PLMS only). Only `true` is supported for PNDM;
    /// absent means diffusers' default, false.
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::v1_5()
    }
}

impl SchedulerConfig {
    /// SD-1.5's values, as its file gives them (no `prediction_type`: epsilon; no
    /// `timestep_spacing`: each sampler's own default).
    pub fn v1_5() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            skip_prk_steps: Some(true),
        }
    }

    /// Reads a diffusers `scheduler_config.json`. Absent keys take SD-1.5's values, except the
    /// `Option` ones and `steps_offset`, which take diffusers' per-sampler defaults (see above).
    /// Keys that would change the sampling math in ways not implemented here are refused.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        if value.get("trained_betas").is_some_and(|v| !v.is_null()) {
            return Err(Error::model(
                path,
                "trained_betas is set; only beta_start/beta_end schedules are supported",
            ));
        }
        check_fixed(
            path,
            &value,
            &[
                ("rescale_betas_zero_snr", "false"),
                ("thresholding", "false"),
                ("clip_sample_range", "1.0"),
                ("use_exponential_sigmas", "false"),
                ("use_beta_sigmas", "false"),
                ("use_lu_lambdas", "false"),
                ("timestep_type", "\"discrete\""),
            ],
        )?;
        let cfg: SchedulerConfig = parse(path, value)?;
        if cfg.num_train_timesteps == 0
            || !(cfg.beta_start > 0.0 && cfg.beta_end > cfg.beta_start && cfg.beta_end < 1.0)
        {
            return Err(Error::model(
                path,
                format!(
                    "num_train_timesteps {} / beta_start {} / beta_end {}: need T > 0 and \
                     0 < beta_start < beta_end < 1",
                    cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end
                ),
            ));
        }
        Ok(cfg)
    }

    /// `scheduler/scheduler_config.json` of a diffusers folder when present, else SD-1.5's values.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("scheduler").join("scheduler_config.json");
        if path.is_file() { Self::from_diffusers_json(path) } else { Ok(Self::v1_5()) }
    }
}

// ---------------------------------------------------------------- JSON helpers

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("not valid JSON: {e}")))
}

fn parse<T: serde::de::DeserializeOwned>(path: &Path, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| {
        Error::model(path, format!("{e} (only Stable Diffusion 1.5 models are supported)"))
    })
}

/// Refuses a config whose `key` is present with a value other than the supported one.
fn check_fixed(path: &Path, value: &Value, fixed: &[(&str, &str)]) -> Result<()> {
    for (key, want) in fixed {
        let Some(got) = value.get(*key) else { continue };
        let want: Value = serde_json::from_str(want).expect("valid JSON literal");
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b, // 1 and 1.0 are the same
            _ => *got == want,
        };
        if !same {
            return Err(Error::model(
                path,
                format!("{key} is {got}; only Stable Diffusion 1.5's {want} is supported"),
            ));
        }
    }
    Ok(())
}

fn nonzero(fields: &[(&str, usize)]) -> std::result::Result<(), String> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((k, _)) => Err(format!("{k} is 0")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes `text` to a fresh temporary file and parses it with `f`.
    fn parse_str<T>(name: &str, text: &str, f: impl Fn(&Path) -> Result<T>) -> Result<T> {
        let dir =
            std::env::temp_dir().join(format!("atelier-config-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("config.json");
        std::fs::write(&path, text).unwrap();
        let r = f(&path);
        std::fs::remove_dir_all(&dir).ok();
        r
    }

    // SD-1.5's own files (runwayml/stable-diffusion-v1-5), as published.
    const SD15_UNET: &str = r#"{
      "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.6.0", "act_fn": "silu",
      "attention_head_dim": 8, "block_out_channels": [320, 640, 1280, 1280],
      "center_input_sample": false, "cross_attention_dim": 768,
      "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
      "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
      "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05, "norm_num_groups": 32,
      "out_channels": 4, "sample_size": 64,
      "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
    }"#;
    const SD15_VAE: &str = r#"{
      "_class_name": "AutoencoderKL", "_diffusers_version": "0.6.0", "act_fn": "silu",
      "block_out_channels": [128, 256, 512, 512],
      "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
      "in_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
      "out_channels": 3, "sample_size": 512,
      "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"]
    }"#;
    const SD15_CLIP: &str = r#"{
      "_name_or_path": "openai/clip-vit-large-patch14", "architectures": ["CLIPTextModel"],
      "attention_dropout": 0.0, "bos_token_id": 0, "dropout": 0.0, "eos_token_id": 2,
      "hidden_act": "quick_gelu", "hidden_size": 768, "initializer_factor": 1.0,
      "initializer_range": 0.02, "intermediate_size": 3072, "layer_norm_eps": 1e-05,
      "max_position_embeddings": 77, "model_type": "clip_text_model", "num_attention_heads": 12,
      "num_hidden_layers": 12, "pad_token_id": 1, "projection_dim": 768, "torch_dtype": "float32",
      "transformers_version": "4.22.0.dev0", "vocab_size": 49408
    }"#;
    const SD15_SCHEDULER: &str = r#"{
      "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
      "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
      "set_alpha_to_one": false, "skip_prk_steps": true, "steps_offset": 1,
      "trained_betas": null, "clip_sample": false
    }"#;

    #[test]
    fn sd15_files_parse_to_v1_5() {
        assert_eq!(
            parse_str("unet", SD15_UNET, |p| UNetConfig::from_diffusers_json(p)).unwrap(),
            UNetConfig::v1_5()
        );
        assert_eq!(
            parse_str("vae", SD15_VAE, |p| VaeConfig::from_diffusers_json(p)).unwrap(),
            VaeConfig::v1_5()
        );
        assert_eq!(
            parse_str("clip", SD15_CLIP, |p| ClipConfig::from_diffusers_json(p)).unwrap(),
            ClipConfig::v1_5()
        );
        assert_eq!(
            parse_str("sched", SD15_SCHEDULER, |p| SchedulerConfig::from_diffusers_json(p))
                .unwrap(),
            SchedulerConfig::v1_5()
        );
    }

    #[test]
    fn invariants() {
        for cfg in [Sd15Config::v1_5(), Sd15Config::tiny()] {
            cfg.validate().unwrap();
            let (u, v, c) = (&cfg.unet, &cfg.vae, &cfg.clip);
            // Same block structure, different widths.
            assert_eq!(u.down_block_types, UNetConfig::v1_5().down_block_types);
            assert_eq!(u.up_block_types, UNetConfig::v1_5().up_block_types);
            assert_eq!(u.layers_per_block, 2);
            assert_eq!(v.layers_per_block, 2);
            assert_eq!(c.max_position_embeddings, 77);
            assert_eq!(c.vocab_size, 49408);
            assert_eq!(v.downscale(), 8);
        }
        let sd = Sd15Config::v1_5();
        assert_eq!(
            (sd.unet.head_dim(0), sd.unet.head_dim(3), sd.unet.time_embed_dim()),
            (40, 160, 1280)
        );
        assert_eq!(sd.clip.head_dim(), 64);
        let tiny = Sd15Config::tiny();
        // Head widths multiples of 8, more than one channel per group, a width change.
        for lvl in 0..4 {
            assert_eq!(tiny.unet.head_dim(lvl) % 8, 0);
        }
        assert_eq!(tiny.clip.head_dim() % 8, 0);
        assert!(tiny.unet.block_out_channels.iter().all(|c| c / tiny.unet.norm_num_groups >= 2));
        assert!(tiny.vae.block_out_channels.iter().all(|c| c / tiny.vae.norm_num_groups >= 2));
        assert_ne!(tiny.unet.block_out_channels[0], tiny.unet.block_out_channels[1]);
        assert!(tiny.clip.num_hidden_layers >= 3);
    }

    #[test]
    fn scheduler_keys_left_out_stay_unset() {
        // Left out, these take each sampler's diffusers default (see SchedulerConfig).
        let bare =
            r#"{"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}"#;
        let s = parse_str("bare", bare, |p| SchedulerConfig::from_diffusers_json(p)).unwrap();
        assert_eq!(
            (s.timestep_spacing, s.set_alpha_to_one, s.clip_sample, s.skip_prk_steps),
            (None, None, None, None)
        );
        assert_eq!(s.steps_offset, 0);
        let trailing = SD15_SCHEDULER.replace(
            r#""clip_sample": false"#,
            r#""clip_sample": false, "timestep_spacing": "trailing""#,
        );
        let s =
            parse_str("trailing", &trailing, |p| SchedulerConfig::from_diffusers_json(p)).unwrap();
        assert_eq!(s.timestep_spacing, Some(TimestepSpacing::Trailing));
        let zsnr = SD15_SCHEDULER.replace(
            r#""clip_sample": false"#,
            r#""clip_sample": false, "rescale_betas_zero_snr": true"#,
        );
        let e = parse_str("zsnr", &zsnr, |p| SchedulerConfig::from_diffusers_json(p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("rescale_betas_zero_snr"), "{e}");
    }

    #[test]
    fn refuses_other_models() {
        let sd2 = SD15_UNET
            .replace(r#""attention_head_dim": 8"#, r#""attention_head_dim": [5, 10, 20, 20]"#)
            .replace(
                r#""layers_per_block": 2"#,
                r#""layers_per_block": 2, "use_linear_projection": true"#,
            );
        let e =
            parse_str("sd2", &sd2, |p| UNetConfig::from_diffusers_json(p)).unwrap_err().to_string();
        assert!(e.contains("attention_head_dim is a list"), "{e}");
        let lin = SD15_UNET.replace(
            r#""layers_per_block": 2"#,
            r#""layers_per_block": 2, "use_linear_projection": true"#,
        );
        let e =
            parse_str("lin", &lin, |p| UNetConfig::from_diffusers_json(p)).unwrap_err().to_string();
        assert!(e.contains("use_linear_projection"), "{e}");
        let lcm = SD15_UNET
            .replace(r#""act_fn": "silu""#, r#""act_fn": "silu", "time_cond_proj_dim": 256"#);
        let e =
            parse_str("lcm", &lcm, |p| UNetConfig::from_diffusers_json(p)).unwrap_err().to_string();
        assert!(e.contains("time_cond_proj_dim is 256"), "{e}");
        let gelu = SD15_CLIP.replace("quick_gelu", "gelu");
        let e = parse_str("gelu", &gelu, |p| ClipConfig::from_diffusers_json(p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("gelu"), "{e}");
        let vpred = SD15_SCHEDULER.replace(
            r#""clip_sample": false"#,
            r#""clip_sample": false, "prediction_type": "v_prediction""#,
        );
        let s = parse_str("vpred", &vpred, |p| SchedulerConfig::from_diffusers_json(p)).unwrap();
        assert_eq!(s.prediction_type, PredictionType::VPrediction);
        let e = parse_str("missing", "{}", |p| UNetConfig::from_diffusers_json(p))
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing field"), "{e}");
    }
}
