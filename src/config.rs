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
//!
//! One file per config: `clip` (the text encoder), `unet`, `vae`, `scheduler` (the noise
//! schedule); `json` reads the diffusers files and refuses unsupported keys.

mod clip;
mod json;
mod scheduler;
mod unet;
mod vae;

use std::path::Path;

use crate::{Error, Result};

pub use clip::{ClipActivation, ClipConfig};
pub use scheduler::{BetaSchedule, PredictionType, SchedulerConfig, TimestepSpacing};
pub use unet::{DownBlockType, UNetConfig, UpBlockType};
pub use vae::VaeConfig;

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
