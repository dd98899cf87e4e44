//! A whole SD-1.5 model on the GPU: configuration, CLIP tokenizer, text encoder, UNet and VAE
//! loaded from a diffusers folder or a single-file checkpoint, with one load report.

use std::path::{Path, PathBuf};

use crate::config::Sd15Config;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::clip::ClipTextModel;
use crate::model::lora_file::LoraFile;
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
        Self::load_with_loras(gpu, path, opts, config, &[])
    }

    /// As [`StableDiffusion::load`], with LoRA files (kohya, diffusers or PEFT) merged into
    /// the weights at their scales. Keys of a LoRA that match no weight are reported on
    /// standard error (and listed in the load report's LoRA lines).
    pub fn load_with_loras(
        gpu: &Gpu,
        path: &Path,
        opts: &LoadOptions,
        config: Option<Sd15Config>,
        loras: &[(PathBuf, f32)],
    ) -> Result<StableDiffusion> {
        let mut weights = Weights::open_with(path, opts)?;
        for (lora_path, scale) in loras {
            let lora = LoraFile::open(lora_path, &weights)?;
            for key in &lora.unknown {
                eprintln!("warning: {}: key {key} matches no weight of the model; ignored", lora.name());
            }
            weights.add_lora(&lora, *scale)?;
        }
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
