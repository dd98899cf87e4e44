//! `atelier bench --model PATH --train`: times one LoRA training step of the UNet (forward,
//! MSE loss, LoRA-only backward, AdamW) at a given batch and size, with the latents, target
//! and text context given (or seeded random), and reports the GPU memory it holds. With an
//! inputs file it also writes the first step's loss and adapter gradients, so PyTorch + peft
//! can be compared on the same inputs (scripts/gpu-check-train.py does that).
//!
//! Inputs file (f32, NCHW as diffusers takes them): `train.sample` [B, 4, h, w] (the noisy
//! latents), `train.target` [B, 4, h, w], `train.timestep` [B], `train.encoder_hidden_states`
//! [B, 77, 768], and the adapters' starting values `lora.<module>.lora_A` [r, in] /
//! `lora.<module>.lora_B` [out, r] (peft's names and layout; absent: peft's initialisation,
//! which makes B zero). Outputs: `train.loss` [1], `train.pred`, `grad.<module>.lora_A|B`.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bench_models::{read_inputs, take, write_outputs};
use crate::config::{Sd15Config, UNetConfig};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Profiler, Recorder};
use crate::model::layers::{nchw_to_nhwc, nhwc_to_nchw};
use crate::model::lora::{AdamW, LoraParams};
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet_train::{LoraTargets, TrainOptions};
use crate::model::weights::Weights;
use crate::rng::Rng;

/// What to run.
#[derive(Clone, Debug)]
pub struct TrainBench {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    pub rank: usize,
    pub alpha: f32,
    /// The adapters' input dropout (0: none).
    pub dropout: f32,
    pub targets: LoraTargets,
    /// Recompute the transformers' forwards at the backward.
    pub recompute: bool,
    /// Timed steps (after two warm-up steps).
    pub repeat: usize,
    pub inputs: Option<PathBuf>,
    pub output: Option<PathBuf>,
    pub profile: bool,
}

/// Loads the UNet alone (the VAE and text encoder are not needed when latents and text
/// embeddings are given).
fn load_unet(gpu: &Gpu, path: &Path) -> Result<(UNet2DConditionModel, u64)> {
    let weights = Weights::open(path)?;
    let config = if path.is_dir() { UNetConfig::from_diffusers_json(path.join("unet").join("config.json"))? } else { Sd15Config::v1_5().unet };
    let unet = UNet2DConditionModel::load(&weights, gpu, &config)?;
    let report = weights.finish()?;
    Ok((unet, report.bytes))
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

/// Runs the benchmark and prints its figures.
pub fn run(gpu: &Gpu, model: &Path, o: &TrainBench) -> Result<()> {
    let t0 = Instant::now();
    let (unet, weight_bytes) = load_unet(gpu, model)?;
    println!("UNet loaded: {:.1} MiB on the GPU ({:.1} s)", mib(weight_bytes), t0.elapsed().as_secs_f64());
    let cfg = &unet.cfg;
    let (b, h, w) = (o.batch, o.height, o.width);
    if b == 0 || h == 0 || w == 0 || h % 8 != 0 || w % 8 != 0 {
        return Err(Error::Usage(format!("batch {b}, size {w}x{h}: width and height must be positive multiples of 8")));
    }
    let (lh, lw, tokens, ctx_dim, lat_c) = (h / 8, w / 8, 77, cfg.cross_attention_dim, cfg.in_channels);
    let inputs = match &o.inputs {
        Some(p) => read_inputs(p)?,
        None => Default::default(),
    };

    let specs = cfg.lora_specs(o.targets, o.rank, o.alpha, o.dropout);
    let lora = LoraParams::new(gpu, &specs, 0)?;
    let mut flat = lora.params.to_f32(gpu)?;
    let mut given = 0;
    for l in &lora.layers {
        let s = &l.spec;
        let a = take(&inputs, &format!("lora.{}.lora_A", s.name), &[s.rank, s.k])?;
        let bv = take(&inputs, &format!("lora.{}.lora_B", s.name), &[s.n, s.rank])?;
        if let (Some(a), Some(bv)) = (a, bv) {
            flat[l.off_a..l.off_a + a.len()].copy_from_slice(a);
            flat[l.off_b..l.off_b + bv.len()].copy_from_slice(bv);
            given += 1;
        }
    }
    lora.write_params(gpu, &flat)?;
    println!(
        "{} adapters, rank {}, alpha {}, dropout {} ({} with given values); {:.2} MiB of parameters + gradients + AdamW state",
        specs.len(),
        o.rank,
        o.alpha,
        o.dropout,
        given,
        mib(lora.bytes())
    );

    let mut rng = Rng::new(0);
    let nchw = [b, lat_c, lh, lw];
    let sample = take(&inputs, "train.sample", &nchw)?.map(|v| nchw_to_nhwc(v, &nchw)).unwrap_or_else(|| rng.normals(b * lat_c * lh * lw));
    let target = take(&inputs, "train.target", &nchw)?.map(|v| nchw_to_nhwc(v, &nchw)).unwrap_or_else(|| rng.normals(b * lat_c * lh * lw));
    let t = take(&inputs, "train.timestep", &[b])?.cloned().unwrap_or(vec![500.0; b]);
    let ctx = take(&inputs, "train.encoder_hidden_states", &[b, tokens, ctx_dim])?.cloned().unwrap_or_else(|| rng.normals(b * tokens * ctx_dim));

    // The first step's loss and gradients, before any update. When an f16 activation gradient
    // overflows, the loss scale is halved and the plan rebuilt, as torch's GradScaler backs off.
    let mut loss_scale = None;
    let (plan, grads) = loop {
        let t0 = Instant::now();
        let plan = unet.train_plan(gpu, b, lh, lw, tokens, &lora, TrainOptions { recompute: o.recompute, loss_scale, context_grad: false, loss_weights: false })?;
        println!(
            "training plan{}: {} launches, {:.1} GFLOP; activations saved for the backward {:.1} MiB, pool {:.1} MiB (peak in use {:.1} MiB); loss scale {} ({:.2} s to build)",
            if o.recompute { " (recomputing the transformers)" } else { "" },
            plan.plan.dispatches.len(),
            plan.plan.flops() / 1e9,
            mib(plan.saved_bytes),
            mib(plan.plan.activation_bytes),
            mib(plan.plan.peak_bytes),
            plan.loss_scale,
            t0.elapsed().as_secs_f64()
        );
        plan.sample.write_f32(gpu, &sample)?;
        plan.target.write_f32(gpu, &target)?;
        plan.timestep.write_f32(gpu, &t)?;
        plan.context.write_f32(gpu, &ctx)?;
        lora.zero_grads(gpu);
        plan.plan.run(gpu)?;
        let grads = lora.grads.to_f32(gpu)?;
        if grads.iter().all(|g| g.is_finite()) {
            break (plan, grads);
        }
        if plan.loss_scale <= 1.0 {
            return Err(Error::Usage("the gradients overflow f16 even at loss scale 1: the model's activations are out of range".into()));
        }
        println!("gradients overflowed f16 at loss scale {}: halving it", plan.loss_scale);
        loss_scale = Some(plan.loss_scale / 2.0);
    };
    let loss = plan.loss.to_f32(gpu)?[0];
    println!("first step: loss {loss:.6}");
    if let Some(path) = &o.output {
        let mut out = vec![
            ("train.loss".to_string(), vec![1], vec![loss]),
            ("train.pred".to_string(), nchw.to_vec(), nhwc_to_nchw(&plan.pred.to_f32(gpu)?, &nchw)),
        ];
        for l in &lora.layers {
            let s = &l.spec;
            out.push((format!("grad.{}.lora_A", s.name), vec![s.rank, s.k], grads[l.off_a..l.off_a + s.rank * s.k].to_vec()));
            out.push((format!("grad.{}.lora_B", s.name), vec![s.n, s.rank], grads[l.off_b..l.off_b + s.n * s.rank].to_vec()));
        }
        write_outputs(path, &out)?;
        println!("loss, prediction and gradients written to {}", path.display());
    }

    // Timed steps: forward, loss, backward, AdamW.
    let opt = AdamW { lr: 1e-4, ..AdamW::default() };
    let optimizer = lora.optimizer_step(gpu)?;
    let step = |k: u64, prof: Option<&mut Profiler>| -> Result<()> {
        lora.set_step(gpu, &opt, k, k);
        let mut rec = Recorder::with_profiler(gpu, prof);
        plan.plan.record(&mut rec)?;
        for d in &optimizer {
            rec.run(d)?;
        }
        rec.finish()
    };
    for k in 0..2 {
        step(k + 1, None)?;
    }
    let mut times = Vec::new();
    for k in 0..o.repeat.max(1) {
        let t0 = Instant::now();
        step(k as u64 + 3, None)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(f64::total_cmp);
    let held = weight_bytes + lora.bytes() + plan.plan.activation_bytes;
    println!(
        "training step ({b}x{lat_c}x{lh}x{lw}): median {:.2} ms, min {:.2} ms over {} steps; {:.1} TFLOP/s",
        times[times.len() / 2],
        times[0],
        times.len(),
        plan.plan.flops() / (times[times.len() / 2] * 1e-3) / 1e12
    );
    println!(
        "GPU memory held (tensors): weights {:.1} MiB + adapters {:.1} MiB + activations {:.1} MiB = {:.2} GiB",
        mib(weight_bytes),
        mib(lora.bytes()),
        mib(plan.plan.activation_bytes),
        held as f64 / (1u64 << 30) as f64
    );
    if o.profile
        && let Some(mut prof) = Profiler::new(gpu)
    {
        step(o.repeat as u64 + 3, Some(&mut prof))?;
        println!("\nprofile of one training step:\n{}", prof.table());
    }
    Ok(())
}
