//! A whole SD-1.5 model on the GPU: configuration, CLIP tokenizer, text encoder, UNet and VAE
//! loaded from a diffusers folder or a single-file checkpoint, with one load report.

use std::path::Path;

use crate::config::Sd15Config;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::clip::ClipTextModel;
use crate::model::unet::UNet2DConditionModel;
use crate::model::vae::AutoencoderKL;
use crate::model::weights::{LoadOptions, LoadReport, Weights};
use crate::tokenizer::ClipTokenizer;

/// The three networks, the tokenizer and the configuration.
pub struct StableDiffusion {
    pub config: Sd15Config,
    pub tokenizer: ClipTokenizer,
    pub clip: ClipTextModel,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub report: LoadReport,
}

impl StableDiffusion {
    /// Loads everything from `path`. The configuration is `config` when given, else a
    /// diffusers folder's config files, else (a single file) SD-1.5's.
    pub fn load(gpu: &Gpu, path: &Path, opts: &LoadOptions, config: Option<Sd15Config>) -> Result<StableDiffusion> {
        let weights = Weights::open_with(path, opts)?;
        let dir = path.is_dir().then_some(path);
        let config = match (config, dir) {
            (Some(c), _) => c,
            (None, Some(d)) => Sd15Config::from_diffusers_dir(d)?,
            (None, None) => Sd15Config::v1_5(),
        };
        let tokenizer = ClipTokenizer::for_model(dir)?;
        let clip = ClipTextModel::load(&weights, gpu, &config.clip)?;
        let unet = UNet2DConditionModel::load(&weights, gpu, &config.unet)?;
        let vae = AutoencoderKL::load(&weights, gpu, &config.vae)?;
        let report = weights.finish()?;
        Ok(StableDiffusion { config, tokenizer, clip, unet, vae, report })
    }
}
