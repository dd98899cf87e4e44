//! The `atelier sample` command: checks every input before the model loads, runs the pipeline
//! for each prompt, and writes PNGs with A1111-style generation parameters (and optionally the
//! final latents), with a progress bar and a one-line summary.

use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::images;
use crate::model::sd15::StableDiffusion;
use crate::model::weights::LoadOptions;
use crate::pipeline::{self, InitImage, Request};
use crate::progress::Progress;
use crate::schedulers::Sampler;

/// img2img's default strength (A1111's denoising strength).
pub const DEFAULT_STRENGTH: f64 = 0.75;

/// What `atelier sample` was asked for.
pub struct SampleArgs {
    pub model: PathBuf,
    pub prompt: Option<String>,
    pub prompt_file: Option<PathBuf>,
    pub negative_prompt: String,
    pub steps: usize,
    pub guidance: f32,
    pub sampler: Sampler,
    pub karras: bool,
    pub eta: f32,
    pub seed: Option<u64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub num_images: Option<usize>,
    pub batch_size: usize,
    pub output: Option<PathBuf>,
    pub loras: Vec<(PathBuf, f32)>,
    pub init_image: Option<PathBuf>,
    /// img2img strength (default 0.75, A1111's).
    pub strength: Option<f64>,
    pub init_noise: Option<PathBuf>,
    pub save_latents: Option<PathBuf>,
    /// A1111's "Clip skip": 1 is the last layer.
    pub clip_skip: usize,
    pub profile: bool,
}

/// Parses `FILE[:SCALE]` (scale 1 when absent).
pub fn parse_lora(s: &str) -> std::result::Result<(PathBuf, f32), String> {
    if let Some((file, scale)) = s.rsplit_once(':')
        && let Ok(v) = scale.parse::<f32>()
    {
        if !v.is_finite() {
            return Err(format!("{s}: the scale must be a finite number"));
        }
        return Ok((PathBuf::from(file), v));
    }
    Ok((PathBuf::from(s), 1.0))
}

/// Where the images go: one file (numbered when there are several) or a folder.
enum Target {
    File(PathBuf),
    Dir(PathBuf),
}

impl Target {
    fn new(output: Option<&Path>) -> Target {
        match output {
            None => Target::Dir(PathBuf::from("outputs")),
            Some(p) if p.extension().is_some_and(|e| e.eq_ignore_ascii_case("png")) && !p.is_dir() => {
                Target::File(p.to_path_buf())
            }
            Some(p) => Target::Dir(p.to_path_buf()),
        }
    }

    fn dir(&self) -> PathBuf {
        match self {
            Target::File(f) => f.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new(".")).to_path_buf(),
            Target::Dir(d) => d.clone(),
        }
    }

    /// The name of image `k` of `total` with seed `seed`: `<file>` or `<stem>-<k+1>.png`, or
    /// in a folder `NNNNN-<seed>.png` numbered after the highest number already there.
    fn name(&self, k: usize, total: usize, seed: u64) -> PathBuf {
        match self {
            Target::File(f) if total == 1 => f.clone(),
            Target::File(f) => {
                let stem = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
                f.with_file_name(format!("{stem}-{}.png", k + 1))
            }
            Target::Dir(d) => d.join(format!("{:05}-{seed}.png", next_number(d))),
        }
    }
}

/// One more than the highest `NNNNN-` prefix of the files in `dir` (A1111's numbering).
fn next_number(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else { return 0 };
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let digits: String = name.chars().take_while(|c| c.is_ascii_digit()).collect();
            (!digits.is_empty() && name[digits.len()..].starts_with('-')).then(|| digits.parse::<u64>().ok()).flatten()
        })
        .max()
        .map_or(0, |n| n + 1)
}

/// A1111's short LoRA hash ("addnet" hash: SHA-256 of the safetensors data after the header,
/// first 12 hex digits).
fn lora_hash(path: &Path) -> Option<String> {
    use sha2::Digest;
    let bytes = std::fs::read(path).ok()?;
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?) as usize;
    let data = bytes.get(8usize.checked_add(n)?..)?;
    let h = sha2::Sha256::digest(data);
    Some(h.iter().take(6).map(|b| format!("{b:02x}")).collect())
}

fn name_of(path: &Path) -> String {
    let p = if path.is_dir() { path.file_name() } else { path.file_stem() };
    p.map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|| path.display().to_string())
}

/// The generation parameters in A1111's layout: prompt (with `<lora:name:scale>` tags),
/// `Negative prompt: ...`, then `Key: value, ...`.
#[allow(clippy::too_many_arguments)]
pub fn parameters_text(
    a: &SampleArgs,
    prompt: &str,
    seed: u64,
    width: usize,
    height: usize,
    model_hash: Option<&str>,
    lora_hashes: &[(String, Option<String>)],
) -> String {
    let mut text = prompt.to_string();
    for ((path, scale), _) in a.loras.iter().zip(lora_hashes) {
        text.push_str(&format!(" <lora:{}:{}>", name_of(path), scale));
    }
    if !a.negative_prompt.is_empty() {
        text.push_str(&format!("\nNegative prompt: {}", a.negative_prompt));
    }
    let mut kv = vec![
        format!("Steps: {}", a.steps),
        format!("Sampler: {}", a.sampler.label(false)),
    ];
    if a.karras {
        kv.push("Schedule type: Karras".into());
    }
    kv.push(format!("CFG scale: {}", a.guidance));
    kv.push(format!("Seed: {seed}"));
    kv.push(format!("Size: {width}x{height}"));
    if let Some(h) = model_hash {
        kv.push(format!("Model hash: {h}"));
    }
    kv.push(format!("Model: {}", name_of(&a.model)));
    if a.init_image.is_some() {
        kv.push(format!("Denoising strength: {}", a.strength.unwrap_or(DEFAULT_STRENGTH)));
    }
    if a.eta != 0.0 {
        kv.push(format!("Eta DDIM: {}", a.eta));
    }
    if a.clip_skip > 1 {
        kv.push(format!("Clip skip: {}", a.clip_skip));
    }
    let hashes: Vec<String> =
        lora_hashes.iter().filter_map(|(n, h)| h.as_ref().map(|h| format!("{n}: {h}"))).collect();
    if !hashes.is_empty() {
        kv.push(format!("Lora hashes: \"{}\"", hashes.join(", ")));
    }
    kv.push(format!("Version: atelier {}", env!("CARGO_PKG_VERSION")));
    format!("{text}\n{}", kv.join(", "))
}

/// The prompts: `--prompt`, or one per non-empty line of `--prompt-file` (`#` starts a comment
/// line).
fn prompts(a: &SampleArgs) -> Result<Vec<String>> {
    match (&a.prompt, &a.prompt_file) {
        (Some(_), Some(_)) => Err(Error::Usage("give --prompt or --prompt-file, not both".into())),
        (Some(p), None) => Ok(vec![p.clone()]),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f).map_err(|e| {
                Error::Usage(format!("{}: cannot read the prompt file ({e}); --prompt-file takes a text file with one prompt per line", f.display()))
            })?;
            let list: Vec<String> =
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).map(String::from).collect();
            if list.is_empty() {
                return Err(Error::Usage(format!("{}: no prompts in the file (one prompt per line)", f.display())));
            }
            Ok(list)
        }
        (None, None) => Err(Error::Usage("give a --prompt (or a --prompt-file with one prompt per line)".into())),
    }
}

fn random_seed() -> u64 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // Keep it short enough to type: A1111's seeds are below 2^32.
    crate::rng::Rng::new(t ^ (std::process::id() as u64) << 32).next_u64() % 4_294_967_295
}

/// Runs `atelier sample`.
pub fn run(gpu: &Gpu, a: &SampleArgs) -> Result<()> {
    let t_start = Instant::now();
    // Every input is checked before the model loads.
    let prompts = prompts(a)?;
    if !a.model.exists() {
        return Err(Error::Usage(format!(
            "{}: no such file or folder; --model takes an SD-1.5 diffusers folder or a single .safetensors checkpoint",
            a.model.display()
        )));
    }
    for (l, _) in &a.loras {
        if !l.exists() {
            return Err(Error::Usage(format!("{}: no such LoRA file", l.display())));
        }
    }
    if a.init_image.is_none() && a.strength.is_some() {
        return Err(Error::Usage("--strength applies to --init-image only".into()));
    }
    let multiple = 8;
    let size = match (a.width, a.height) {
        (Some(w), Some(h)) => Some((w, h)),
        (None, None) => None,
        (w, h) => Some((w.unwrap_or(512), h.unwrap_or(512))),
    };
    let init = match &a.init_image {
        Some(p) => Some(images::read_image(p, size, multiple)?),
        None => None,
    };
    let (width, height) = match (&init, size) {
        (Some((_, w, h)), _) => (*w, *h),
        (None, Some(s)) => s,
        (None, None) => (512, 512),
    };
    pipeline::check_size(gpu, width, height, multiple)?;
    crate::schedulers::new_scheduler(&SchedulerConfig::v1_5(), a.sampler, a.steps, a.karras, a.eta)?;
    let noise = match &a.init_noise {
        Some(p) => Some(images::read_latents(p)?),
        None => None,
    };
    let num_images = match (&noise, a.num_images) {
        (Some((shape, _)), Some(n)) if shape[0] != n => {
            return Err(Error::Usage(format!(
                "--init-noise holds {} image(s) of latents but --num-images is {n}",
                shape[0]
            )));
        }
        (Some((shape, _)), _) => shape[0],
        (None, n) => n.unwrap_or(1),
    };
    if let Some((shape, _)) = &noise {
        let want = [num_images, 4, height / multiple, width / multiple];
        if shape[..] != want {
            return Err(Error::Usage(format!(
                "--init-noise has latents of shape {shape:?}, but {width}x{height} needs {want:?}; pass the --width \
                 and --height the noise was made for"
            )));
        }
    }
    let target = Target::new(a.output.as_deref());
    images::check_writable_dir(&target.dir())?;
    if let Some(p) = &a.save_latents {
        let dir = p.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
        images::check_writable_dir(dir)?;
    }
    let seed = a.seed.unwrap_or_else(random_seed);

    // The model (with the LoRAs merged into its weights) and its scheduler configuration.
    let t_load = Instant::now();
    let sd = StableDiffusion::load_with_loras(gpu, &a.model, &LoadOptions::inference(), None, &a.loras)?;
    let sched = match a.model.is_dir() {
        true => SchedulerConfig::from_model_dir(&a.model)?,
        false => SchedulerConfig::v1_5(),
    };
    let load_s = t_load.elapsed().as_secs_f64();
    eprintln!("{} ({load_s:.1} s)", sd.report);
    // The checkpoint's hash (A1111's "Model hash") is computed while the GPU works.
    let hash_job = a.model.is_file().then(|| {
        let p = a.model.clone();
        std::thread::spawn(move || images::short_hash(&p).ok())
    });
    let lora_hashes: Vec<(String, Option<String>)> = a.loras.iter().map(|(p, _)| (name_of(p), lora_hash(p))).collect();
    eprintln!("seed {seed}");

    let mut req = Request::new("");
    req.negative_prompt = a.negative_prompt.clone();
    req.steps = a.steps;
    req.guidance = a.guidance;
    req.sampler = a.sampler;
    req.karras = a.karras;
    req.eta = a.eta;
    req.width = width;
    req.height = height;
    req.num_images = num_images;
    req.batch_size = a.batch_size;
    req.init_noise = noise.map(|(_, v)| v);
    req.init_image = init.map(|(px, _, _)| InitImage { pixels: pipeline::from_rgb8(&px), strength: a.strength.unwrap_or(DEFAULT_STRENGTH) });
    req.clip_skip = a.clip_skip.saturating_sub(1);
    req.profile = a.profile;

    let total_images = prompts.len() * num_images;
    let mut written = Vec::new();
    let mut latents = Vec::new();
    let mut steps_s = 0.0;
    let mut calls = 0;
    let mut hash_job = hash_job;
    let mut model_hash: Option<String> = None;
    for (p, prompt) in prompts.iter().enumerate() {
        req.prompt = prompt.clone();
        req.seed = seed.wrapping_add((p * num_images) as u64);
        let label = if prompts.len() > 1 { format!("prompt {}/{}", p + 1, prompts.len()) } else { "sampling".into() };
        let mut bar = Progress::new(&label, 1);
        let out = pipeline::generate(gpu, &sd, &sched, &req, &mut |done, total| bar.update(done, total))?;
        bar.finish();
        if out.prompt_chunks > 1 {
            eprintln!(
                "note: the prompt is longer than 75 tokens; it was encoded in {} chunks of 75 and concatenated (as A1111 does)",
                out.prompt_chunks
            );
        }
        for (title, table) in &out.profile {
            println!("\nprofile of {title}:\n{table}");
        }
        if a.profile {
            let t = &out.timings;
            let mib = |b: u64| b as f64 / 1048576.0;
            println!(
                "GPU memory: weights {:.1} MiB; activations of the plans, held one at a time: CLIP {:.1} MiB, UNet {:.1} MiB, VAE decode {:.1} MiB",
                mib(sd.report.bytes),
                mib(t.plan_bytes[0]),
                mib(t.plan_bytes[1]),
                mib(t.plan_bytes[2])
            );
            for (k, (denoise, decode)) in t.per_image.iter().enumerate() {
                println!(
                    "image {k} done in {:.3} s (text {:.3} s with its plan's build {:.3} s, {} denoising {:.3} s, decode {:.3} s)",
                    t.text + denoise + decode,
                    t.text,
                    t.text_plan,
                    if req.batch_size > 1 { "its batch's" } else { "its" },
                    denoise,
                    decode
                );
            }
        }
        steps_s += out.timings.denoise;
        calls += out.timings.unet_calls;
        latents.extend_from_slice(&out.latents);
        // The first write waits for the model hash (computed while the GPU worked).
        if let Some(job) = hash_job.take() {
            model_hash = job.join().ok().flatten();
        }
        for (k, px) in out.images.iter().enumerate() {
            let text = parameters_text(a, prompt, out.seeds[k], width, height, model_hash.as_deref(), &lora_hashes);
            let path = target.name(written.len(), total_images, out.seeds[k]);
            images::write_atomic(&path, &images::png_bytes(px, width, height, &text)?)?;
            written.push(path);
        }
    }
    if let Some(p) = &a.save_latents {
        let (lc, lh, lw) = (4, height / multiple, width / multiple);
        images::write_latents(p, &[total_images, lc, lh, lw], &latents)?;
        written.push(p.clone());
    }
    let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
    println!(
        "{} image(s), {width}x{height}, {} steps of {}: {} in {:.2} s ({:.2} UNet it/s; model load {load_s:.1} s)",
        total_images,
        a.steps,
        a.sampler.label(a.karras),
        names.join(", "),
        t_start.elapsed().as_secs_f64() - load_s,
        calls as f64 / steps_s.max(1e-9),
    );
    Ok(())
}
