//! Validation images during `atelier train` (kohya's `--sample_every_n_steps`, diffusers'
//! `--validation_prompt`): every `--validation-every` steps (by default at every checkpoint),
//! before the first step (the base model) and at the end, each `--validation-prompt` is drawn
//! with seeds seed, seed + 1, ... at the training resolution, and the images are written as one
//! grid, `OUTPUT/validation/step-NNNNNN.png`: a row per prompt in the order given, a column per
//! seed, carrying A1111's `parameters` text of its first cell (as A1111's grids do) plus the
//! training step and the grid's shape.
//!
//! **The model with the adapters.** The adapters are merged into the frozen UNet weights (and,
//! with `--train-text-encoder`, the text encoder's adapters into its weights) for the duration
//! of the grid, then the weights are put back bit for bit. The merge is the one
//! `atelier sample --lora` makes from the LoRA file this run writes: A and B rounded as the file
//! stores them (f16; for a diffusers file B times alpha/r first), W + alpha/r · B·A formed in
//! f32 from the model file's own values (re-read from the memory-mapped file, so an f32
//! checkpoint merges before its f16 rounding, as at load) and rounded to f16 once. A grid cell is
//! therefore the image `atelier sample --lora <that step's LoRA file>` gives with the same
//! prompt, seed and settings, bit for bit with `ATELIER_WINOGRAD=0`: the training process runs
//! the UNet's convolutions directly (it needs their weights as loaded), where `sample` by
//! default runs most of them by Winograd F(2x2, 3x3), whose f16 roundings differ slightly.
//! Step 0 samples the base model (B starts at zero: the merge is the identity).
//!
//! **Training is untouched.** The loaded f16 bits of every targeted weight are read back once
//! and kept on the host (2 bytes a weight: about 210 MB for SD-1.5's attention projections,
//! 3x that with `--targets transformer`, rather than the same again in GPU memory); after the
//! grid they are written back, whether sampling succeeded or not. Sampling reads the LoRA
//! parameters and draws its noise from its own seeded generators, and every random choice of
//! a training step comes from (--seed, step) alone, so a run with validation trains exactly
//! as the same run without.
//!
//! **Memory.** `pipeline::generate` builds its CLIP, UNet (batch 2 with guidance) and VAE
//! decoder plans for each prompt and frees them when it returns, so validation holds no GPU
//! memory between grids; the training plans stay built. Rebuilding the sampling plans is
//! cheap next to the sampling itself (the shaders are compiled once per process; a plan is
//! buffers and bind groups), while keeping them would hold the UNet's batch-2 activations and
//! the decoder's full-size ones (hundreds of MB at 512) through the whole run.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use half::f16;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::images;
use crate::model::lora::LoraParams;
use crate::model::lora_file::{Delta, LoraAdapter};
use crate::model::sd15::StableDiffusion;
use crate::model::unet_transformer::AdaptableWeight;
use crate::model::weights::Weights;
use crate::pipeline::{self, OnStep, Request};
use crate::sample::{parameters_text, SampleArgs};
use crate::schedulers::{self, Sampler};
use crate::train::export::{self, Adapter, LoraFileFormat};
use crate::train::trainer::{file_name, TrainArgs};

/// Images per prompt when `--validation-images` is not given.
pub const DEFAULT_IMAGES: usize = 2;
/// Sampler steps when `--validation-steps` is not given.
pub const DEFAULT_STEPS: usize = 20;
/// Guidance scale when `--validation-guidance` is not given.
pub const DEFAULT_GUIDANCE: f32 = 7.5;

/// The `--validation-*` options (all but the prompts optional; see the defaults above).
#[derive(Clone, Debug, Default)]
pub struct ValidationArgs {
    /// One grid row each; none turns validation off.
    pub prompts: Vec<String>,
    pub negative_prompt: Option<String>,
    /// Steps between grids (default: the checkpoint interval; with none, only the first and
    /// last grids).
    pub every: Option<usize>,
    /// Images per prompt: seeds seed, seed + 1, ...
    pub images: Option<usize>,
    /// The first image's seed (default: the training seed).
    pub seed: Option<u64>,
    /// Sampler steps.
    pub steps: Option<usize>,
    pub guidance: Option<f32>,
    /// Default: DPM++ 2M, as `atelier sample`.
    pub sampler: Option<Sampler>,
}

/// Checks the options before anything loads.
pub fn check(v: &ValidationArgs) -> Result<()> {
    let bad = |m: String| Err(Error::Usage(m));
    if v.prompts.is_empty() {
        let given: Vec<&str> = [
            ("--validation-negative-prompt", v.negative_prompt.is_some()),
            ("--validation-every", v.every.is_some()),
            ("--validation-images", v.images.is_some()),
            ("--validation-seed", v.seed.is_some()),
            ("--validation-steps", v.steps.is_some()),
            ("--validation-guidance", v.guidance.is_some()),
            ("--validation-sampler", v.sampler.is_some()),
        ]
        .iter()
        .filter(|(_, g)| *g)
        .map(|(n, _)| *n)
        .collect();
        if !given.is_empty() {
            return bad(format!("{} given without --validation-prompt: add the prompt(s) to draw, or leave the option out", given.join(", ")));
        }
        return Ok(());
    }
    if v.prompts.iter().any(|p| p.trim().is_empty()) {
        return bad("--validation-prompt is empty: give the text to draw (repeat the option for several prompts)".into());
    }
    if v.every == Some(0) {
        return bad("--validation-every 0: give the number of steps between validation grids (leave it out to draw one at every checkpoint)".into());
    }
    if v.images == Some(0) {
        return bad("--validation-images must be at least 1".into());
    }
    if v.steps.is_some_and(|s| s == 0 || s > 1000) {
        return bad(format!("--validation-steps {}: give 1 to 1000 sampler steps", v.steps.unwrap_or(0)));
    }
    if v.guidance.is_some_and(|g| !g.is_finite() || g < 0.0) {
        return bad(format!("--validation-guidance {}: give a number >= 0 (7.5 is usual; 1 turns guidance off)", v.guidance.unwrap_or(0.0)));
    }
    Ok(())
}

/// One targeted weight: where it lives on the GPU and the adapters of its parts.
struct Target {
    weight: AdaptableWeight,
    /// The model file's prefix of its key: `unet` or `text_encoder`.
    prefix: &'static str,
    /// The bits loaded for training, read back at the first merge.
    original: Option<Vec<u16>>,
}

/// Draws the validation grids of one training run.
pub struct Validator {
    prompts: Vec<String>,
    negative_prompt: String,
    every: Option<usize>,
    images: usize,
    seed: u64,
    steps: usize,
    guidance: f32,
    sampler: Sampler,
    /// Cells are size x size pixels (the training resolution).
    size: usize,
    dir: PathBuf,
    model: PathBuf,
    format: LoraFileFormat,
    /// The LoRA's file name, for the `<lora:name:1>` tag.
    lora_name: PathBuf,
    /// The model's files, memory-mapped: the values the merge starts from.
    weights: Weights,
    targets: Vec<Target>,
    model_hash: Option<String>,
    hash_job: Option<JoinHandle<Option<String>>>,
}

impl Validator {
    /// The validator of run `a` (its `validation` options), or `None` without validation
    /// prompts. Checks the settings against the model (sampler, size, prompts) and that the
    /// grid folder can be written.
    pub fn new(gpu: &Gpu, sd: &StableDiffusion, sched: &SchedulerConfig, lora: &LoraParams, te_lora: Option<&LoraParams>, a: &TrainArgs) -> Result<Option<Validator>> {
        let v = &a.validation;
        check(v)?;
        if v.prompts.is_empty() {
            return Ok(None);
        }
        let model = a.model.as_path();
        let mut val = Validator {
            prompts: v.prompts.clone(),
            negative_prompt: v.negative_prompt.clone().unwrap_or_default(),
            every: v.every.or((a.save_every > 0).then_some(a.save_every)),
            images: v.images.unwrap_or(DEFAULT_IMAGES),
            seed: v.seed.unwrap_or(a.seed),
            steps: v.steps.unwrap_or(DEFAULT_STEPS),
            guidance: v.guidance.unwrap_or(DEFAULT_GUIDANCE),
            sampler: v.sampler.unwrap_or(Sampler::DpmPp2m),
            size: a.data.resolution,
            dir: a.output.join("validation"),
            model: model.to_path_buf(),
            format: a.format,
            lora_name: PathBuf::from(file_name(a)),
            weights: Weights::open(model)?,
            targets: Vec::new(),
            model_hash: None,
            hash_job: None,
        };
        pipeline::validate(gpu, sd, &val.request(&val.prompts[0]))?;
        schedulers::new_scheduler(sched, val.sampler, val.steps, false, 0.0)?;
        for p in &val.prompts {
            sd.tokenizer.encode_chunks(p)?;
        }
        images::check_writable_dir(&val.dir)?;

        // The weights the adapters change, each adapter matched to one part of one weight: the
        // UNet's, and the text encoder's when it trains too.
        let sets = [(Some(lora), sd.unet.adaptable_weights(), "unet", "UNet"), (te_lora, sd.clip.adaptable_weights(), "text_encoder", "text encoder")];
        for (set, weights, prefix, what) in sets {
            let Some(set) = set else { continue };
            let names: HashSet<&str> = set.layers.iter().map(|l| l.spec.name.as_str()).collect();
            for l in &set.layers {
                if !weights.iter().any(|w| w.parts.iter().any(|(p, _, rows)| *p == l.spec.name && *rows == l.spec.n && w.k == l.spec.k)) {
                    return Err(Error::shape("validation", format!("adapter {} ([{}, {}]) matches no weight of the {what}", l.spec.name, l.spec.n, l.spec.k)));
                }
            }
            val.targets.extend(
                weights
                    .into_iter()
                    .filter(|w| w.parts.iter().any(|(p, _, _)| names.contains(p.as_str())))
                    .map(|weight| Target { weight, prefix, original: None }),
            );
        }
        // A1111's model hash of a single-file checkpoint, computed while training starts.
        if model.is_file() {
            let p = model.to_path_buf();
            val.hash_job = Some(std::thread::spawn(move || images::short_hash(&p).ok()));
        }
        Ok(Some(val))
    }

    /// Whether a grid is due after `step` of `total`: before the first step, every
    /// `--validation-every` steps and at the end.
    pub fn due(&self, step: usize, total: usize) -> bool {
        step == 0 || step == total || self.every.is_some_and(|n| step.is_multiple_of(n))
    }

    /// The grid of `step`.
    pub fn path(&self, step: usize) -> PathBuf {
        self.dir.join(format!("step-{step:06}.png"))
    }

    /// The folder of the grids.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The pipeline request of one prompt's row.
    fn request(&self, prompt: &str) -> Request {
        let mut req = Request::new(prompt);
        req.negative_prompt = self.negative_prompt.clone();
        req.steps = self.steps;
        req.guidance = self.guidance;
        req.sampler = self.sampler;
        req.seed = self.seed;
        req.width = self.size;
        req.height = self.size;
        req.num_images = self.images;
        // One image per UNet batch, as `atelier sample` by default: the same plans, so the
        // same pixels.
        req.batch_size = 1;
        req
    }

    /// Draws and writes the grid of `step` with the adapters' current values; `on_call` hears
    /// of every UNet call (done, all) of the grid. Returns the grid's path.
    #[allow(clippy::too_many_arguments)]
    pub fn run(&mut self, gpu: &Gpu, sd: &StableDiffusion, sched: &SchedulerConfig, lora: &LoraParams, te_lora: Option<&LoraParams>, step: usize, on_call: &mut OnStep) -> Result<PathBuf> {
        let merged = step > 0;
        if merged && let Err(e) = self.merge(gpu, sd, lora, te_lora, step) {
            self.restore(gpu)?;
            return Err(e);
        }
        let cells = self.sample(gpu, sd, sched, on_call);
        if merged {
            self.restore(gpu)?;
        }
        let cells = cells?;
        let (s, cols, rows) = (self.size, self.images, self.prompts.len());
        let mut grid = vec![0u8; rows * cols * s * s * 3];
        for (i, img) in cells.iter().enumerate() {
            let (r, c) = (i / cols, i % cols);
            for y in 0..s {
                let dst = ((r * s + y) * cols * s + c * s) * 3;
                grid[dst..dst + s * 3].copy_from_slice(&img[y * s * 3..(y + 1) * s * 3]);
            }
        }
        if let Some(job) = self.hash_job.take() {
            self.model_hash = job.join().ok().flatten();
        }
        let text = self.parameters(step);
        let path = self.path(step);
        images::write_atomic(&path, &images::png_bytes(&grid, cols * s, rows * s, &text)?)?;
        Ok(path)
    }

    /// Every prompt's images, prompt after prompt, RGB8.
    fn sample(&self, gpu: &Gpu, sd: &StableDiffusion, sched: &SchedulerConfig, on_call: &mut OnStep) -> Result<Vec<Vec<u8>>> {
        let mut cells = Vec::with_capacity(self.prompts.len() * self.images);
        let n = self.prompts.len();
        for (p, prompt) in self.prompts.iter().enumerate() {
            let req = self.request(prompt);
            let out = pipeline::generate(gpu, sd, sched, &req, &mut |done, all| on_call(p * all + done, n * all))?;
            cells.extend(out.images);
        }
        Ok(cells)
    }

    /// Writes W + alpha/r · B·A into every targeted weight (see the module notes).
    fn merge(&mut self, gpu: &Gpu, sd: &StableDiffusion, lora: &LoraParams, te_lora: Option<&LoraParams>, step: usize) -> Result<()> {
        let mut adapters = Vec::new();
        for set in std::iter::once(lora).chain(te_lora) {
            adapters.extend(export::adapters(set, &set.params.to_f32(gpu)?, &sd.unet.cfg)?);
        }
        let by_name: HashMap<&str, &Adapter> = adapters.iter().map(|a| (a.name.as_str(), a)).collect();
        for t in &mut self.targets {
            if t.original.is_none() {
                let values = t.weight.tensor.to_f32(gpu)?;
                t.original = Some(values.iter().map(|&x| f16::from_f32(x).to_bits()).collect());
            }
            let original = t.original.as_ref().expect("read above");
            let k = t.weight.k;
            let mut bits = Vec::with_capacity(original.len());
            for (name, row0, rows) in &t.weight.parts {
                let Some(ad) = by_name.get(name.as_str()) else {
                    bits.extend_from_slice(&original[row0 * k..(row0 + rows) * k]);
                    continue;
                };
                let key = format!("{}.{name}.weight", t.prefix);
                if !self.weights.contains(&key) {
                    return Err(Error::model(self.weights.path(), format!("validation: the model file no longer holds {key}")));
                }
                let shape: Vec<usize> = if t.weight.conv1x1 { vec![*rows, k, 1, 1] } else { vec![*rows, k] };
                let mut w = self.weights.get_f32(&key, &shape)?;
                Delta::new(0, 1.0, &as_in_file(ad, self.format, &key)).add_to(&mut w);
                for (i, &x) in w.iter().enumerate() {
                    let h = f16::from_f32(x);
                    if !h.is_finite() {
                        return Err(Error::Usage(format!(
                            "step {step}: validation: {key} with the LoRA merged holds {x} at index {i}, beyond f16's range: the training diverged; lower --lr"
                        )));
                    }
                    bits.push(h.to_bits());
                }
            }
            t.weight.tensor.write_f16_bits(gpu, &bits)?;
        }
        Ok(())
    }

    /// Writes the loaded bits back into every weight [`Validator::merge`] changed.
    fn restore(&self, gpu: &Gpu) -> Result<()> {
        for t in &self.targets {
            if let Some(bits) = &t.original {
                t.weight.tensor.write_f16_bits(gpu, bits)?;
            }
        }
        // The writes land before the next submit; wait so none is pending when training goes on.
        gpu.queue.submit([]);
        gpu.wait()
    }

    /// A1111's text for the grid's first cell, with the training step.
    fn parameters(&self, step: usize) -> String {
        let args = SampleArgs {
            model: self.model.clone(),
            prompt: None,
            prompt_file: None,
            negative_prompt: self.negative_prompt.clone(),
            steps: self.steps,
            guidance: self.guidance,
            sampler: self.sampler,
            karras: false,
            eta: 0.0,
            seed: Some(self.seed),
            width: Some(self.size),
            height: Some(self.size),
            num_images: Some(self.images),
            batch_size: 1,
            output: None,
            loras: if step > 0 { vec![(self.lora_name.clone(), 1.0)] } else { Vec::new() },
            init_image: None,
            strength: None,
            init_noise: None,
            save_latents: None,
            clip_skip: 1,
            profile: false,
        };
        let hashes: Vec<(String, Option<String>)> = args.loras.iter().map(|_| (String::new(), None)).collect();
        let text = parameters_text(&args, &self.prompts[0], self.seed, self.size, self.size, self.model_hash.as_deref(), &hashes);
        // The training step and the grid's shape go before the closing "Version: ..." field.
        let extra = format!("Training step: {step}, Grid: {} prompts x {} seeds, ", self.prompts.len(), self.images);
        match text.rfind("Version: ") {
            Some(i) => format!("{}{extra}{}", &text[..i], &text[i..]),
            None => format!("{text}, {}", extra.trim_end_matches(", ")),
        }
    }
}

/// The adapter as `atelier sample --lora` reads it back from this run's LoRA file: A and B
/// rounded to f16 as written; kohya files keep alpha (scale alpha / r, in f64 as the reader
/// forms it), diffusers files fold alpha / r into B (scale 1).
fn as_in_file(ad: &Adapter, format: LoraFileFormat, target: &str) -> LoraAdapter {
    let r16 = |x: f32| f16::from_f32(x).to_f32();
    let down: Arc<[f32]> = ad.a.iter().map(|&x| r16(x)).collect();
    let (up, alpha, scale): (Arc<[f32]>, f32, f32) = match format {
        LoraFileFormat::Kohya => (ad.b.iter().map(|&x| r16(x)).collect(), ad.alpha, (ad.alpha as f64 / ad.rank as f64) as f32),
        LoraFileFormat::Diffusers => {
            let s = ad.scale();
            (ad.b.iter().map(|&x| r16(x * s)).collect(), ad.rank as f32, 1.0)
        }
    };
    LoraAdapter {
        target: target.to_string(),
        key: ad.name.clone(),
        rank: ad.rank,
        down,
        down_shape: vec![ad.rank, ad.k_in],
        up,
        up_shape: vec![ad.n_out, ad.rank],
        alpha,
        scale,
    }
}
