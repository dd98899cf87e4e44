//! `atelier bench --model PATH`: times the three networks of a real model (or one with
//! random weights) at a given batch and image size, on inputs from a safetensors file or
//! seeded random ones, and optionally writes the outputs, so another engine can be compared
//! on the same inputs (scripts/gpu-check-models.py does that with diffusers).
//!
//! Inputs file (all f32 except ids; NCHW images as diffusers takes them): `clip.input_ids`
//! [B, 77] (i32 or i64), `unet.sample` [B, 4, h, w], `unet.timestep` [B],
//! `unet.encoder_hidden_states` [B, 77, 768], `vae.latent` [B, 4, h, w] (decoded as is, no
//! scaling), `vae.image` [B, 3, H, W] in [-1, 1]. Outputs: `clip.last_hidden_state`,
//! `unet.out`, `vae.decoded` (NCHW), `vae.mean` (the encoder's latent mean).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::gpu::{Gpu, Plan, Profiler, Recorder};
use crate::model::layers::{nchw_to_nhwc, nhwc_to_nchw};
use crate::model::sd15::StableDiffusion;
use crate::rng::Rng;

/// What to run and how.
#[derive(Clone, Debug)]
pub struct ModelBench {
    /// Batch of the text encoder and the UNet.
    pub batch: usize,
    /// Batch of the VAE.
    pub vae_batch: usize,
    pub height: usize,
    pub width: usize,
    /// Timed runs per network (after two warm-up runs).
    pub repeat: usize,
    pub inputs: Option<std::path::PathBuf>,
    pub output: Option<std::path::PathBuf>,
    /// Print a per-kernel profile of one run of each network.
    pub profile: bool,
    /// Also time the VAE encoder.
    pub encode: bool,
}

/// One network's figures.
pub struct Timing {
    pub name: String,
    pub shape: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub flops: f64,
    pub activation_bytes: u64,
}

/// Reads the inputs file into name -> (shape, f32 values).
pub(crate) fn read_inputs(path: &Path) -> Result<HashMap<String, (Vec<usize>, Vec<f32>)>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| Error::model(path, format!("not a safetensors file: {e}")))?;
    let mut out = HashMap::new();
    for (name, t) in st.tensors() {
        let d = t.data();
        let v: Vec<f32> = match t.dtype() {
            Dtype::F32 => d.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::I32 => d.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32).collect(),
            Dtype::I64 => d.chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
            other => return Err(Error::model(path, format!("{name} is {other:?}; inputs must be f32 (ids i32 or i64)"))),
        };
        out.insert(name, (t.shape().to_vec(), v));
    }
    Ok(out)
}

/// Times `plan` (two warm-up runs, then `repeat` timed ones, each waited for).
fn time_plan(gpu: &Gpu, plan: &Plan, repeat: usize, profile: bool, name: &str) -> Result<(f64, f64)> {
    for _ in 0..2 {
        plan.run(gpu)?;
    }
    let mut times = Vec::new();
    for _ in 0..repeat.max(1) {
        let t0 = Instant::now();
        plan.run(gpu)?;
        times.push(t0.elapsed().as_secs_f64() * 1e3);
    }
    if profile
        && let Some(mut prof) = Profiler::new(gpu)
    {
        let mut rec = Recorder::with_profiler(gpu, Some(&mut prof));
        plan.record(&mut rec)?;
        rec.finish()?;
        println!("\nprofile of one {name} run:\n{}", prof.table());
    }
    times.sort_by(f64::total_cmp);
    Ok((times[times.len() / 2], times[0]))
}

pub(crate) fn take<'a>(inputs: &'a HashMap<String, (Vec<usize>, Vec<f32>)>, name: &str, want: &[usize]) -> Result<Option<&'a Vec<f32>>> {
    match inputs.get(name) {
        None => Ok(None),
        Some((shape, v)) if shape == want => Ok(Some(v)),
        Some((shape, _)) => Err(Error::shape("bench inputs", format!("{name} is {shape:?}, expected {want:?} for this batch and size"))),
    }
}

/// Runs the benchmark; returns the figures (also printed as a table).
pub fn run(gpu: &Gpu, sd: &StableDiffusion, o: &ModelBench) -> Result<Vec<Timing>> {
    let (b, h, w) = (o.batch, o.height, o.width);
    let down = sd.config.vae.downscale();
    if o.vae_batch == 0 || b == 0 || h == 0 || w == 0 || h % down != 0 || w % down != 0 {
        return Err(Error::Usage(format!("batch {b}, size {w}x{h}: width and height must be positive multiples of {down}")));
    }
    let (lh, lw) = (h / down, w / down);
    let inputs = match &o.inputs {
        Some(p) => read_inputs(p)?,
        None => HashMap::new(),
    };
    let mut rng = Rng::new(0);
    let mut outputs: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
    let mut timings = Vec::new();
    let ctx_dim = sd.config.clip.hidden_size;
    let lat_c = sd.config.unet.in_channels;

    // CLIP
    let clip = sd.clip.plan(gpu, b, 0, false)?;
    let len = clip.len;
    let ids: Vec<u32> = match take(&inputs, "clip.input_ids", &[b, len])? {
        Some(v) => v.iter().map(|&x| x as u32).collect(),
        None => {
            let one = sd.tokenizer.encode("a portrait of a lady in a blue silk dress, oil on canvas, 18th century")?;
            (0..b).flat_map(|_| one.iter().copied()).collect()
        }
    };
    clip.set_ids(gpu, &ids)?;
    let (med, min) = time_plan(gpu, &clip.plan, o.repeat, o.profile, "CLIP")?;
    timings.push(Timing { name: "clip".into(), shape: format!("{b}x{len}"), median_ms: med, min_ms: min, flops: clip.plan.flops(), activation_bytes: clip.plan.activation_bytes });
    outputs.push(("clip.last_hidden_state".into(), vec![b, len, ctx_dim], clip.out.to_f32(gpu)?));
    drop(clip);

    // UNet
    let unet = sd.unet.plan(gpu, b, lh, lw, len, false)?;
    let nchw = [b, lat_c, lh, lw];
    let sample = match take(&inputs, "unet.sample", &nchw)? {
        Some(v) => nchw_to_nhwc(v, &nchw),
        None => rng.normals(b * lat_c * lh * lw),
    };
    let t = take(&inputs, "unet.timestep", &[b])?.cloned().unwrap_or(vec![999.0; b]);
    let ctx = take(&inputs, "unet.encoder_hidden_states", &[b, len, ctx_dim])?.cloned().unwrap_or_else(|| rng.normals(b * len * ctx_dim));
    unet.set_inputs(gpu, &sample, &t, &ctx)?;
    let (med, min) = time_plan(gpu, &unet.plan, o.repeat, o.profile, "UNet")?;
    timings.push(Timing { name: "unet".into(), shape: format!("{b}x{lat_c}x{lh}x{lw}"), median_ms: med, min_ms: min, flops: unet.plan.flops(), activation_bytes: unet.plan.activation_bytes });
    outputs.push(("unet.out".into(), nchw.to_vec(), nhwc_to_nchw(&unet.out.to_f32(gpu)?, &nchw)));
    drop(unet);

    // VAE decode and encode, at their own batch size
    let b = o.vae_batch;
    let dec = sd.vae.decode_plan(gpu, b, lh, lw, false)?;
    let lat_nchw = [b, sd.config.vae.latent_channels, lh, lw];
    let latent = match take(&inputs, "vae.latent", &lat_nchw)? {
        Some(v) => nchw_to_nhwc(v, &lat_nchw),
        None => rng.normals(lat_nchw.iter().product()),
    };
    dec.set_latent(gpu, &latent)?;
    let (med, min) = time_plan(gpu, &dec.plan, o.repeat, o.profile, "VAE decode")?;
    timings.push(Timing { name: "vae decode".into(), shape: format!("{b}x{}x{lh}x{lw}", lat_nchw[1]), median_ms: med, min_ms: min, flops: dec.plan.flops(), activation_bytes: dec.plan.activation_bytes });
    let img_nchw = [b, sd.config.vae.out_channels, h, w];
    outputs.push(("vae.decoded".into(), img_nchw.to_vec(), nhwc_to_nchw(&dec.image.to_f32(gpu)?, &img_nchw)));
    drop(dec);

    // VAE encode
    let image_in = take(&inputs, "vae.image", &[b, sd.config.vae.in_channels, h, w])?;
    if o.encode || image_in.is_some() {
        let enc = sd.vae.encode_plan(gpu, b, h, w, false)?;
        let nchw = [b, sd.config.vae.in_channels, h, w];
        let image = match image_in {
            Some(v) => nchw_to_nhwc(v, &nchw),
            None => rng.normals(nchw.iter().product()).iter().map(|x| x.clamp(-1.0, 1.0)).collect(),
        };
        enc.set_image(gpu, &image)?;
        let (med, min) = time_plan(gpu, &enc.plan, o.repeat, o.profile, "VAE encode")?;
        timings.push(Timing { name: "vae encode".into(), shape: format!("{b}x{}x{h}x{w}", nchw[1]), median_ms: med, min_ms: min, flops: enc.plan.flops(), activation_bytes: enc.plan.activation_bytes });
        let mean_nchw = [b, sd.config.vae.latent_channels, lh, lw];
        outputs.push(("vae.mean".into(), mean_nchw.to_vec(), nhwc_to_nchw(&enc.mean.to_f32(gpu)?, &mean_nchw)));
    }

    println!("{:<12} {:<16} {:>10} {:>10} {:>9} {:>14}", "network", "input", "median ms", "min ms", "TFLOP/s", "activ. MiB");
    for t in &timings {
        println!(
            "{:<12} {:<16} {:>10.2} {:>10.2} {:>9.1} {:>14.1}",
            t.name,
            t.shape,
            t.median_ms,
            t.min_ms,
            t.flops / (t.median_ms * 1e-3) / 1e12,
            t.activation_bytes as f64 / 1048576.0
        );
    }
    println!("weights on the GPU: {:.1} MiB", sd.report.bytes as f64 / 1048576.0);
    if let Some(path) = &o.output {
        write_outputs(path, &outputs)?;
        println!("outputs written to {}", path.display());
    }
    Ok(timings)
}

/// Writes f32 tensors to a safetensors file, through a temporary name.
pub(crate) fn write_outputs(path: &Path, outputs: &[(String, Vec<usize>, Vec<f32>)]) -> Result<()> {
    let views: Vec<(String, safetensors::tensor::TensorView)> = outputs
        .iter()
        .map(|(n, s, v)| {
            let view = safetensors::tensor::TensorView::new(Dtype::F32, s.clone(), bytemuck::cast_slice(v)).expect("shape matches data");
            (n.clone(), view)
        })
        .collect();
    let tmp = path.with_extension("safetensors.partial");
    safetensors::serialize_to_file(views, None, &tmp).map_err(|e| Error::Usage(format!("writing {}: {e}", tmp.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::Io { path: path.to_path_buf(), source: e })
}
