//! Text-to-image and image-to-image: prompt and negative prompt through CLIP (long prompts in
//! A1111's 75-token chunks), the scheduler loop with classifier-free guidance (the
//! unconditional and conditional halves batched in one UNet call; a single pass when guidance
//! is 1 or less), then the VAE decode to RGB pixels.
//!
//! Latents live on the CPU as f32 between UNet calls (4 values a latent pixel, 64 KiB an image
//! at 512x512), where the scheduler steps them; the networks run from static plans built once
//! per shape. Initial noise is drawn on the CPU (`Rng::new(seed + k)` for image k, standard
//! normals in NCHW order, channel by channel), so a seed gives the same image on every GPU up
//! to f16 rounding; ancestral samplers continue the same stream.

use std::time::Instant;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Profiler, Recorder};
use crate::model::layers::{nchw_to_nhwc, nhwc_to_nchw};
use crate::model::sd15::StableDiffusion;
use crate::model::unet::UNetPlan;
use crate::rng::Rng;
use crate::schedulers::{self, Sampler};

/// An image-to-image start: the picture and how much of the schedule to run on it.
pub struct InitImage {
    /// Pixels in [-1, 1], NHWC [1, height, width, 3] at the request's size.
    pub pixels: Vec<f32>,
    /// 0 keeps the picture, 1 repaints it fully (diffusers' `strength`).
    pub strength: f64,
}

/// What to generate.
pub struct Request {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f32,
    pub sampler: Sampler,
    pub karras: bool,
    /// DDIM's eta (0: deterministic).
    pub eta: f32,
    /// Image k uses seed + k.
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub num_images: usize,
    /// Images per UNet batch (each doubled by guidance).
    pub batch_size: usize,
    /// Initial latents, NCHW [num_images, 4, height/8, width/8], instead of seeded noise (the
    /// noise that img2img adds, for an init image).
    pub init_noise: Option<Vec<f32>>,
    pub init_image: Option<InitImage>,
    /// Text-encoder layers to skip from the end (0: the last layer; A1111's "Clip skip" - 1).
    pub clip_skip: usize,
    /// Decode the latents to pixels (off: latents only).
    pub decode: bool,
    /// Print a per-kernel profile of one UNet call and one decode.
    pub profile: bool,
}

impl Request {
    /// SD-1.5 defaults: 25 steps of DPM++ 2M, guidance 7.5, 512x512, one image.
    pub fn new(prompt: &str) -> Request {
        Request {
            prompt: prompt.to_string(),
            negative_prompt: String::new(),
            steps: 25,
            guidance: 7.5,
            sampler: Sampler::DpmPp2m,
            karras: false,
            eta: 0.0,
            seed: 0,
            width: 512,
            height: 512,
            num_images: 1,
            batch_size: 1,
            init_noise: None,
            init_image: None,
            clip_skip: 0,
            decode: true,
            profile: false,
        }
    }
}

/// Where the time went, in seconds.
#[derive(Clone, Debug, Default)]
pub struct Timings {
    pub text: f64,
    /// Of `text`: building the CLIP plan (its pipelines are compiled, or taken from the
    /// driver's cache, the first time a process needs them).
    pub text_plan: f64,
    pub encode: f64,
    pub denoise: f64,
    pub decode: f64,
    pub total: f64,
    /// UNet calls made.
    pub unet_calls: usize,
    /// Per image: its group's denoising time and its own decode time.
    pub per_image: Vec<(f64, f64)>,
    /// Activation bytes of the plans (held one at a time): CLIP, UNet, VAE decode.
    pub plan_bytes: [u64; 3],
}

/// What came out.
pub struct Output {
    /// Final latents before the VAE, NCHW [num_images, 4, height/8, width/8].
    pub latents: Vec<f32>,
    /// RGB8 pixels, row-major, one per image (empty without `decode`).
    pub images: Vec<Vec<u8>>,
    /// The seed of each image.
    pub seeds: Vec<u64>,
    /// 75-token chunks the prompt took (more than 1: a long prompt, A1111-style).
    pub prompt_chunks: usize,
    pub timings: Timings,
    /// Per-kernel profiles (with `profile`).
    pub profile: Vec<(String, String)>,
}

/// Progress of the scheduler loop: (model calls done, model calls in all).
pub type OnStep<'a> = dyn FnMut(usize, usize) + 'a;

/// Checks an image size: positive multiples of `f` (the VAE's downscale, 8), at most 4096 a
/// side, and the decoder's largest activation (256 channels at full size, f16) within the
/// GPU's buffer limit.
pub fn check_size(gpu: &Gpu, width: usize, height: usize, f: usize) -> Result<()> {
    if width == 0 || height == 0 || !width.is_multiple_of(f) || !height.is_multiple_of(f) {
        return Err(Error::Usage(format!("--width {width} / --height {height}: both must be positive multiples of {f}")));
    }
    if width > 4096 || height > 4096 {
        return Err(Error::Usage(format!(
            "--width {width} / --height {height}: at most 4096 pixels a side (SD-1.5 is trained at 512; past 1024 it repeats itself)"
        )));
    }
    gpu.check_size(&format!("a {width}x{height} image's VAE decoder activations"), (width * height * 256 * 2) as u64)
}

/// Checks a request before anything heavy runs.
pub fn validate(gpu: &Gpu, sd: &StableDiffusion, req: &Request) -> Result<()> {
    let f = sd.config.vae.downscale();
    let bad = |m: String| Err(Error::Usage(m));
    check_size(gpu, req.width, req.height, f)?;
    if req.steps == 0 || req.steps > 1000 {
        return bad(format!("--steps {}: give 1 to 1000 steps", req.steps));
    }
    if !req.guidance.is_finite() || req.guidance < 0.0 {
        return bad(format!("--guidance {}: give a number >= 0 (7.5 is usual; 1 turns guidance off)", req.guidance));
    }
    if req.num_images == 0 || req.batch_size == 0 {
        return bad("--num-images and --batch-size must be at least 1".into());
    }
    if req.clip_skip >= sd.config.clip.num_hidden_layers {
        return bad(format!("--clip-skip {}: the text encoder has {} layers", req.clip_skip + 1, sd.config.clip.num_hidden_layers));
    }
    let latent = latent_len(sd, req);
    if let Some(n) = &req.init_noise
        && n.len() != req.num_images * latent
    {
        return bad(format!(
            "the initial noise holds {} values; {} image(s) of {}x{} need [{}, {}, {}, {}]",
            n.len(),
            req.num_images,
            req.width,
            req.height,
            req.num_images,
            sd.config.unet.in_channels,
            req.height / f,
            req.width / f
        ));
    }
    if let Some(init) = &req.init_image {
        if !(0.0..=1.0).contains(&init.strength) {
            return bad(format!("--strength {}: give a number from 0 to 1", init.strength));
        }
        if init.pixels.len() != req.width * req.height * 3 {
            return bad(format!("the init image holds {} values, not {}x{}x3", init.pixels.len(), req.width, req.height));
        }
    }
    if req.eta != 0.0 && req.sampler != Sampler::Ddim {
        return bad(format!("--eta applies to ddim only, not {}", req.sampler));
    }
    Ok(())
}

fn latent_len(sd: &StableDiffusion, req: &Request) -> usize {
    let f = sd.config.vae.downscale();
    sd.config.unet.in_channels * (req.height / f) * (req.width / f)
}

/// Runs a request; `on_step` hears of every UNet call.
pub fn generate(gpu: &Gpu, sd: &StableDiffusion, sched: &SchedulerConfig, req: &Request, on_step: &mut OnStep) -> Result<Output> {
    validate(gpu, sd, req)?;
    // Built first so a bad sampler setting or strength fails before any GPU work; it gives the
    // schedule's length and img2img start, and each batch of images gets a fresh one.
    let new_scheduler = || schedulers::new_scheduler(sched, req.sampler, req.steps, req.karras, req.eta);
    let probe = new_scheduler()?;
    let start = match &req.init_image {
        Some(init) => probe.img2img_start(init.strength)?,
        None => 0,
    };
    let calls = probe.timesteps().len() - start;
    let t0 = Instant::now();
    let mut timings = Timings::default();
    let mut profile = Vec::new();
    let f = sd.config.vae.downscale();
    let (lh, lw, lc) = (req.height / f, req.width / f, sd.config.unet.in_channels);
    let latent = lc * lh * lw;
    let guided = req.guidance > 1.0;

    // Text: [uncond chunks..., cond chunks...] through CLIP in one batch.
    let (context, tokens, prompt_chunks, clip_bytes, text_plan) = encode_prompts(gpu, sd, req, guided)?;
    timings.text_plan = text_plan;
    timings.plan_bytes[0] = clip_bytes;
    let width = sd.config.clip.hidden_size;
    timings.text = t0.elapsed().as_secs_f64();

    // Image-to-image: the init image's latent mean, scaled as the UNet sees latents.
    let mut init_latent = None;
    if let Some(init) = &req.init_image {
        let t = Instant::now();
        let enc = sd.vae.encode_plan(gpu, 1, req.height, req.width, false)?;
        enc.set_image(gpu, &init.pixels)?;
        enc.set_noise(gpu, &vec![0.0; enc.noise.numel()])?;
        enc.plan.run(gpu)?;
        let sf = sd.config.vae.scaling_factor;
        let mean: Vec<f32> = enc.mean.to_f32(gpu)?.iter().map(|&m| m * sf).collect();
        init_latent = Some(mean);
        timings.encode = t.elapsed().as_secs_f64();
    }

    let t_denoise = Instant::now();
    let mut all_latents = vec![0.0f32; req.num_images * latent];
    let seeds: Vec<u64> = (0..req.num_images as u64).map(|k| req.seed.wrapping_add(k)).collect();
    let total_calls = calls * req.num_images.div_ceil(req.batch_size);
    let mut unet_plan: Option<UNetPlan> = None;
    let mut first = 0;
    while first < req.num_images {
        let t_group = Instant::now();
        let g = req.batch_size.min(req.num_images - first);
        let b = if guided { 2 * g } else { g };
        if unet_plan.as_ref().is_none_or(|p| p.batch != b) {
            drop(unet_plan.take()); // free the old plan's buffers before building the next
            let p = sd.unet.plan(gpu, b, lh, lw, tokens, false)?;
            timings.plan_bytes[1] = timings.plan_bytes[1].max(p.plan.activation_bytes);
            unet_plan = Some(p);
        }
        let plan = unet_plan.as_ref().expect("built above");
        // The context: the unconditional rows for every image, then the conditional ones.
        let half = tokens * width;
        let mut ctx = Vec::with_capacity(b * half);
        let halves: &[usize] = if guided { &[0, 1] } else { &[0] };
        for &h in halves {
            for _ in 0..g {
                ctx.extend_from_slice(&context[h * half..(h + 1) * half]);
            }
        }
        plan.context.write_f32(gpu, &ctx)?;

        // One scheduler steps the group's latents (NHWC, image after image) as one sample:
        // every step is elementwise. Each image draws from its own seed's stream.
        let mut scheduler = new_scheduler()?;
        let mut rngs: Vec<Rng> = seeds[first..first + g].iter().map(|&s| Rng::new(s)).collect();
        let mut noise = Vec::with_capacity(g * latent);
        for (j, rng) in rngs.iter_mut().enumerate() {
            let nchw = match &req.init_noise {
                Some(n) => n[(first + j) * latent..(first + j + 1) * latent].to_vec(),
                None => rng.normals(latent),
            };
            noise.extend(nchw_to_nhwc(&nchw, &[1, lc, lh, lw]));
        }
        let mut lat: Vec<f32> = match &init_latent {
            Some(init) => scheduler.add_noise(&init.repeat(g), &noise, start),
            None => {
                let s = scheduler.init_noise_sigma();
                noise.iter().map(|&x| x * s).collect()
            }
        };

        let mut input = vec![0.0f32; b * latent];
        for i in start..start + calls {
            let t = scheduler.timesteps()[i];
            let scale = scheduler.input_scale(i);
            for (dst, &x) in input.iter_mut().zip(&lat) {
                *dst = x * scale;
            }
            if guided {
                input.copy_within(0..g * latent, g * latent);
            }
            plan.sample.write_f32(gpu, &input)?;
            plan.timestep.write_f32(gpu, &vec![t; b])?;
            if req.profile
                && i == start
                && first == 0
                && let Some(table) = profile_plan(gpu, &plan.plan)?
            {
                profile.push(("one UNet call".to_string(), table));
            }
            plan.plan.submit(gpu)?;
            let out = plan.out.to_f32(gpu)?;
            let cond = &out[(b - g) * latent..];
            let eps: Vec<f32> = if guided {
                let uncond = &out[..g * latent];
                uncond.iter().zip(cond).map(|(&u, &c)| u + req.guidance * (c - u)).collect()
            } else {
                cond.to_vec()
            };
            let step_noise = scheduler.needs_noise().then(|| {
                rngs.iter_mut().flat_map(|r| nchw_to_nhwc(&r.normals(latent), &[1, lc, lh, lw])).collect::<Vec<f32>>()
            });
            scheduler.step(i, &eps, &mut lat, step_noise.as_deref())?;
            timings.unet_calls += 1;
            on_step(timings.unet_calls, total_calls);
        }
        for j in 0..g {
            let nchw = nhwc_to_nchw(&lat[j * latent..(j + 1) * latent], &[1, lc, lh, lw]);
            all_latents[(first + j) * latent..(first + j + 1) * latent].copy_from_slice(&nchw);
            timings.per_image.push((t_group.elapsed().as_secs_f64(), 0.0));
        }
        first += g;
    }
    drop(unet_plan);
    timings.denoise = t_denoise.elapsed().as_secs_f64();

    let mut images = Vec::new();
    if req.decode {
        let t = Instant::now();
        let dec = sd.vae.decode_plan(gpu, 1, lh, lw, false)?;
        timings.plan_bytes[2] = dec.plan.activation_bytes;
        let sf = sd.config.vae.scaling_factor;
        for k in 0..req.num_images {
            let t_image = Instant::now();
            let z: Vec<f32> = all_latents[k * latent..(k + 1) * latent].iter().map(|&x| x / sf).collect();
            dec.set_latent(gpu, &nchw_to_nhwc(&z, &[1, lc, lh, lw]))?;
            if req.profile
                && k == 0
                && let Some(table) = profile_plan(gpu, &dec.plan)?
            {
                profile.push(("one VAE decode".to_string(), table));
            }
            dec.plan.submit(gpu)?;
            images.push(to_rgb8(&dec.image.to_f32(gpu)?));
            timings.per_image[k].1 = t_image.elapsed().as_secs_f64();
        }
        timings.decode = t.elapsed().as_secs_f64();
    }
    timings.total = t0.elapsed().as_secs_f64();
    Ok(Output { latents: all_latents, images, seeds, prompt_chunks, timings, profile })
}

/// CLIP outputs of the negative and the positive prompt, each [tokens, width] with
/// tokens = 77 · chunks (the shorter padded with empty-prompt chunks, as A1111 does); only the
/// positive when unguided. Returns (values, tokens, positive prompt's chunks, the CLIP plan's
/// activation bytes, the seconds its build took).
fn encode_prompts(gpu: &Gpu, sd: &StableDiffusion, req: &Request, guided: bool) -> Result<(Vec<f32>, usize, usize, u64, f64)> {
    let tok = &sd.tokenizer;
    let mut pos = tok.encode_chunks(&req.prompt)?;
    let prompt_chunks = pos.len();
    let mut neg = if guided { tok.encode_chunks(&req.negative_prompt)? } else { Vec::new() };
    if guided {
        let empty = tok.encode_chunks("")?.remove(0);
        let k = pos.len().max(neg.len());
        pos.resize(k, empty.clone());
        neg.resize(k, empty);
    }
    let k = pos.len();
    let seqs: Vec<u32> = neg.iter().chain(&pos).flatten().copied().collect();
    let n = seqs.len() / crate::tokenizer::MAX_LEN;
    let t = Instant::now();
    let clip = sd.clip.plan(gpu, n, req.clip_skip, false)?;
    let built = t.elapsed().as_secs_f64();
    clip.run(gpu, &seqs)?;
    Ok((clip.out.to_f32(gpu)?, k * crate::tokenizer::MAX_LEN, prompt_chunks, clip.plan.activation_bytes, built))
}

/// One profiled replay of a plan, as a table (None where the GPU has no timestamp queries).
fn profile_plan(gpu: &Gpu, plan: &crate::gpu::Plan) -> Result<Option<String>> {
    let Some(mut prof) = Profiler::new(gpu) else { return Ok(None) };
    {
        let mut rec = Recorder::with_profiler(gpu, Some(&mut prof));
        plan.record(&mut rec)?;
        rec.finish()?;
    }
    Ok(Some(prof.table()))
}

/// Decoder output (NHWC [1, h, w, 3] in about [-1, 1]) to RGB8 as diffusers does:
/// round(clamp(x / 2 + 0.5, 0, 1) · 255).
pub fn to_rgb8(x: &[f32]) -> Vec<u8> {
    x.iter().map(|&v| ((v / 2.0 + 0.5).clamp(0.0, 1.0) * 255.0).round() as u8).collect()
}

/// RGB8 pixels to the VAE's input range [-1, 1] (diffusers: x / 255 · 2 - 1).
pub fn from_rgb8(px: &[u8]) -> Vec<f32> {
    px.iter().map(|&v| v as f32 / 255.0 * 2.0 - 1.0).collect()
}
