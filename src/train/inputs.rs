//! The inputs of a training step: the caches of `atelier train` (each image's latents encoded
//! once by the VAE, each distinct caption's text embedding once by CLIP; with `--random-crop`
//! an image is encoded at each use; with `--cache-dir` both also on disk) and one
//! micro-batch's noised latents, targets, timesteps, text context and loss weights, every draw
//! from the seed streams of step k (see the trainer's notes on reproducibility).

use std::collections::HashMap;

use crate::config::PredictionType;
use crate::error::Result;
use crate::gpu::Gpu;
use crate::model::sd15::StableDiffusion;
use crate::rng::Rng;
use crate::train::cache::{DiskCache, SamplePlan};
use crate::train::data::Dataset;
use crate::train::prefetch::Prefetcher;
use crate::train::schedule::stream_seed;
use crate::train::trainer::{TrainArgs, S_CROP, S_NOISE, S_PROMPT, S_VAE};

/// One micro-batch's inputs, NHWC f32.
pub(super) struct Inputs {
    pub(super) sample: Vec<f32>,
    pub(super) target: Vec<f32>,
    pub(super) timesteps: Vec<f32>,
    pub(super) context: Vec<f32>,
    /// The captions' token ids, when the text encoder trains (instead of `context`).
    pub(super) ids: Vec<u32>,
    /// Min-SNR loss weights, one per image.
    pub(super) weights: Vec<f32>,
}

/// The loop's caches: latents per (image, flipped), text embeddings per caption.
pub(super) struct Caches {
    pub(super) latents: LatentCache,
    pub(super) embeddings: HashMap<String, Vec<f32>>,
    /// The encoder and text-encoder plans, built once (per image size for the encoder).
    pub(super) encoders: Encoders,
    pub(super) clip: Option<crate::model::clip::ClipPlan>,
    /// The current epoch's batches (an order depends on (seed, epoch) alone).
    pub(super) order: Option<(usize, Vec<Vec<usize>>)>,
    /// The on-disk cache (`--cache-dir`) and its sampling plans per latent size.
    pub(super) disk: Option<DiskCache>,
    pub(super) samplers: HashMap<[usize; 3], SamplePlan>,
    /// Images decoded ahead of their first use (center crops without a disk cache).
    pub(super) prefetch: Option<Prefetcher>,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn prepare(gpu: &Gpu, sd: &StableDiffusion, data: &Dataset, a: &TrainArgs, acp: &[f64], caches: &mut Caches, k: u64, batches: usize, pred: PredictionType) -> Result<(Inputs, (usize, usize))> {
    let (epoch, pos) = ((k as usize) / batches, (k as usize) % batches);
    if caches.order.as_ref().is_none_or(|(e, _)| *e != epoch) {
        let order = data.epoch_order(epoch, a.seed, a.batch_size);
        if let Some(p) = &caches.prefetch {
            // The images with no latents yet, from this step on, then the epoch's start.
            let ahead = order[pos..].iter().chain(&order[..pos]).flatten().copied();
            p.schedule(ahead.filter(|&i| !caches.latents.contains_key(&(i, false)) && !caches.latents.contains_key(&(i, true))));
        }
        caches.order = Some((epoch, order));
    }
    let batch = caches.order.as_ref().expect("set above").1[pos].clone();
    let mut rng = Rng::new(stream_seed(a.seed, S_NOISE, k));
    let mut prompt_rng = Rng::new(stream_seed(a.seed, S_PROMPT, k));
    let mut inputs = Inputs { sample: Vec::new(), target: Vec::new(), timesteps: Vec::new(), context: Vec::new(), ids: Vec::new(), weights: Vec::new() };
    let mut size = None;
    for (slot, &index) in batch.iter().enumerate() {
        let flip = a.flip && rng.uniform() < 0.5;
        // Random crops change every time: those images are encoded at each use, not cached.
        let crop_seed = (!a.data.center_crop).then(|| stream_seed(a.seed, S_CROP, k * 1024 + slot as u64));
        let vae_seed = stream_seed(a.seed, S_VAE, index as u64);
        let (h, w) = latents(gpu, sd, data, caches, index, flip, vae_seed, crop_seed)?;
        size.get_or_insert((h, w));
        let caption = data.caption(index, &mut prompt_rng)?;
        if a.train_text_encoder {
            // CLIP runs in the step itself: its adapters change the embedding every step.
            inputs.ids.extend(sd.tokenizer.encode(&caption)?);
        } else {
            let emb = match caches.embeddings.get(&caption) {
                Some(e) => e,
                None => {
                    let shape = [sd.config.clip.max_position_embeddings, sd.config.clip.hidden_size];
                    let key = caches.disk.as_ref().map(|c| c.text_key(&caption, 0));
                    let cached = caches.disk.as_mut().zip(key.as_ref()).and_then(|(c, k)| c.read_text(k, shape));
                    let e = match cached {
                        Some(e) => e,
                        None => {
                            if caches.clip.is_none() {
                                caches.clip = Some(sd.clip.plan(gpu, 1, 0, false)?);
                            }
                            let clip = caches.clip.as_ref().expect("built above");
                            clip.run(gpu, &sd.tokenizer.encode(&caption)?)?;
                            let e = clip.out.to_f32(gpu)?;
                            if let (Some(c), Some(k)) = (caches.disk.as_mut(), &key) {
                                c.write_text(k, shape, &e);
                            }
                            e
                        }
                    };
                    caches.embeddings.entry(caption.clone()).or_insert(e)
                }
            };
            inputs.context.extend_from_slice(emb);
        }
        let x0 = &caches.latents[&(index, flip)].0;
        let c = sd.config.unet.in_channels;
        let mut noise = rng.normals(x0.len());
        if a.noise_offset > 0.0 {
            // Per image and channel, as diffusers' --noise_offset.
            let off: Vec<f32> = rng.normals(c).iter().map(|v| v * a.noise_offset).collect();
            noise.iter_mut().enumerate().for_each(|(i, n)| *n += off[i % c]);
        }
        let t = ((rng.uniform() * acp.len() as f64) as usize).min(acp.len() - 1);
        let (sa, sb) = (acp[t].sqrt(), (1.0 - acp[t]).sqrt());
        inputs.sample.extend(x0.iter().zip(&noise).map(|(&x, &n)| (sa * x as f64 + sb * n as f64) as f32));
        match pred {
            PredictionType::VPrediction => inputs.target.extend(x0.iter().zip(&noise).map(|(&x, &n)| (sa * n as f64 - sb * x as f64) as f32)),
            _ => inputs.target.extend_from_slice(&noise),
        }
        inputs.timesteps.push(t as f32);
        // Min-SNR-gamma (Hang et al. 2023) as diffusers' scripts weight it: min(snr, gamma) /
        // snr for epsilon targets, / (snr + 1) for v.
        let snr = acp[t] / (1.0 - acp[t]);
        let gamma = a.min_snr_gamma.unwrap_or(f32::INFINITY) as f64;
        inputs.weights.push(match pred {
            PredictionType::VPrediction => (snr.min(gamma) / (snr + 1.0)) as f32,
            _ => (snr.min(gamma) / snr) as f32,
        });
    }
    Ok((inputs, size.expect("a batch has an image")))
}

/// Images' latents (NHWC [h/8, w/8, 4], the VAE's sample times the scaling factor, as
/// diffusers' training scripts take them) with the image's (h, w), by (image, flipped).
type LatentCache = HashMap<(usize, bool), (Vec<f32>, usize, usize)>;
type Encoders = HashMap<(usize, usize), crate::model::vae::EncodePlan>;

/// With `crop_seed` (random crops) the image is cropped from that seed and encoded afresh,
/// replacing the cached entry. Else the disk cache, when there is one, is asked first (the
/// sample drawn from its mean and std with the encoder's noise for `seed`), and given what
/// was encoded. The latents are then in `caches.latents`; returns the image's (h, w).
#[allow(clippy::too_many_arguments)]
fn latents(gpu: &Gpu, sd: &StableDiffusion, data: &Dataset, caches: &mut Caches, index: usize, flip: bool, seed: u64, crop_seed: Option<u64>) -> Result<(usize, usize)> {
    let sf = sd.config.vae.scaling_factor;
    if crop_seed.is_none()
        && !caches.latents.contains_key(&(index, flip))
        && let Some(disk) = caches.disk.as_mut().filter(|c| c.latents)
    {
        let (w, h) = data.target_size(index);
        let shape = [h / 8, w / 8, sd.config.vae.latent_channels];
        let key = disk.latent_key(&data.entries()[index].path, (w, h), flip)?;
        let z = match disk.read_latents(&key, shape) {
            Some((mean, std)) => {
                let plan = match caches.samplers.entry(shape) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(SamplePlan::new(gpu, shape)?),
                };
                plan.run(gpu, &mean, &std, seed)?
            }
            None => {
                let enc = encode(gpu, sd, data, &mut caches.encoders, None, index, flip, None, seed)?;
                let (mean, std) = (enc.mean.to_f32(gpu)?, enc.std.to_f32(gpu)?);
                disk.write_latents(&key, shape, &mean, &std);
                enc.sample.to_f32(gpu)?
            }
        };
        caches.latents.insert((index, flip), (z.iter().map(|v| v * sf).collect(), h, w));
    }
    if crop_seed.is_some() || !caches.latents.contains_key(&(index, flip)) {
        let prefetched = caches.prefetch.as_ref().filter(|_| crop_seed.is_none());
        let enc = encode(gpu, sd, data, &mut caches.encoders, prefetched, index, flip, crop_seed, seed)?;
        let z: Vec<f32> = enc.sample.to_f32(gpu)?.iter().map(|v| v * sf).collect();
        caches.latents.insert((index, flip), (z, enc.h, enc.w));
    }
    let (_, h, w) = &caches.latents[&(index, flip)];
    Ok((*h, *w))
}

/// Encodes image `index` (cropped from `crop_seed`, or centered without one; mirrored with
/// `flip`) with the noise for `seed`; the outputs are in the returned plan. A center crop comes
/// from `prefetched` when given.
#[allow(clippy::too_many_arguments)]
fn encode<'e>(
    gpu: &Gpu,
    sd: &StableDiffusion,
    data: &Dataset,
    encoders: &'e mut Encoders,
    prefetched: Option<&Prefetcher>,
    index: usize,
    flip: bool,
    crop_seed: Option<u64>,
    seed: u64,
) -> Result<&'e crate::model::vae::EncodePlan> {
    // No flip in the dataset (the loop flips); a center crop draws nothing.
    let ex = match (prefetched, crop_seed) {
        (Some(p), None) => p.take(index)?,
        _ => data.load(index, &mut Rng::new(crop_seed.unwrap_or(0)))?,
    };
    let (w, h) = (ex.width, ex.height);
    let pixels = if flip { flip_nhwc(&ex.pixels, h, w, 3) } else { ex.pixels };
    let enc = match encoders.entry((h, w)) {
        std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        std::collections::hash_map::Entry::Vacant(e) => e.insert(sd.vae.encode_plan(gpu, 1, h, w, false)?),
    };
    enc.run(gpu, &pixels, seed)?;
    Ok(enc)
}

/// A horizontally mirrored NHWC image.
fn flip_nhwc(x: &[f32], h: usize, w: usize, c: usize) -> Vec<f32> {
    let mut y = vec![0.0; x.len()];
    for r in 0..h {
        for col in 0..w {
            let (s, d) = ((r * w + col) * c, (r * w + (w - 1 - col)) * c);
            y[d..d + c].copy_from_slice(&x[s..s + c]);
        }
    }
    y
}
