//! The training loop of `atelier train`: caches (in [`inputs`](crate::train::inputs): each
//! image's latents encoded once by the VAE, each distinct caption's text embedding once by
//! CLIP, so a step runs the UNet alone; with `--random-crop` an image is encoded at each use
//! instead; with `--cache-dir` both are also kept on disk between runs, see
//! [`cache`](crate::train::cache)), then
//! per step: noise, uniform timesteps, DDPM forward noising, the epsilon (or v) target, the
//! UNet's training plan (forward, MSE loss, LoRA-only backward) over the micro-batches of the
//! gradient accumulation, and AdamW at the scheduled learning rate.
//!
//! Reproducibility: every random choice of optimizer step k (which images, noise, timesteps,
//! dropout masks, prompts drawn from a list) comes from seeds derived from (--seed, k) alone,
//! the epoch orders from (--seed, epoch); a checkpoint therefore only holds the adapters,
//! AdamW's moments, the step and the loss scale, and a resumed run makes the same LoRA as an
//! uninterrupted one on the same GPU.
//!
//! Text encoder (`--train-text-encoder`): its adapters ([`crate::model::clip_train`]) train
//! alongside the UNet's. A step then runs CLIP's training forward on the micro-batch's
//! captions (no cached embeddings), copies its output into the UNet's context, runs the UNet's
//! step (which also produces d(context)), copies that into CLIP's backward, and updates both
//! adapter sets with AdamW, the text encoder's at `--text-encoder-lr` (kohya's
//! `--text_encoder_lr`; default `--lr`) on the same schedule. Gradient clipping applies to
//! each set's norm separately (kohya clips over both at once); the log's gradient norm is
//! that of both together. The LoRA file holds both (kohya `lora_te_*`, diffusers
//! `text_encoder.*`); checkpoints hold both sets and their moments.
//!
//! f16 overflow: when a step's gradients are not finite the AdamW launch skips the update; the
//! loop then halves the loss scale, rebuilds the plans and redoes the step with the same draws
//! (PyTorch's GradScaler skips the step instead; redoing it loses no data).
//!
//! What a user watches: a progress bar (step, smoothed loss, it/s, ETA), `log.csv` (step,
//! loss, smoothed loss, learning rate, gradient norm, loss scale, seconds), `loss.png` redrawn
//! at every checkpoint, checkpoints every --save-every steps and the final LoRA file, and with
//! `--validation-prompt` a grid of sample images (`validation/step-NNNNNN.png`) before the
//! first step, every --validation-every steps (default: at each checkpoint) and at the end,
//! drawn with the adapters merged for the moment (see [`crate::train::validation`]; training
//! is bit-identical with or without it, and a resumed run keeps the schedule). Ctrl-C
//! finishes the step in flight, writes a checkpoint and stops (no grid is drawn then; a
//! resumed run draws a due grid that is missing).
//!
//! A full disk: every write goes to a temporary name (checkpoint folders, the LoRA file,
//! loss.png) or, for log.csv, is cut back to its last whole row when it fails; the run then
//! stops with a message saying so, and the checkpoints written before are whole.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::config::SchedulerConfig;
use crate::error::{Error, Result};
use crate::gpu::{Dispatch, Gpu, Recorder};
use crate::kernels::elementwise::{self, Unary};
use crate::model::clip_train::ClipTrainPlan;
use crate::model::lora::{AdamW, LoraParams};
use crate::model::sd15::StableDiffusion;
use crate::model::unet_train::{LoraTargets, TrainOptions, UNetTrainPlan};
use crate::progress::Progress;
use crate::schedulers::schedule::alphas_cumprod;
use crate::train::cache::DiskCache;
use crate::train::checkpoint::{self, TrainState};
use crate::train::data::{Dataset, DatasetOptions};
use crate::train::export::{self, LoraFileFormat};
use crate::train::inputs::{prepare, Caches};
use crate::train::plot;
use crate::train::prefetch::Prefetcher;
use crate::train::schedule::{stream_seed, LrSchedule};
use crate::train::validation::{ValidationArgs, Validator};

/// Seed streams (see [`stream_seed`]).
pub(super) const S_NOISE: u64 = 1;
const S_DROPOUT: u64 = 2;
pub(super) const S_PROMPT: u64 = 3;
pub(super) const S_VAE: u64 = 4;
pub(super) const S_CROP: u64 = 5;
const S_TE_INIT: u64 = 6;
const S_TE_DROPOUT: u64 = 7;

/// Everything `atelier train` is told.
#[derive(Clone, Debug)]
pub struct TrainArgs {
    pub model: PathBuf,
    pub data: DatasetOptions,
    /// Random horizontal flips (both orientations' latents are cached).
    pub flip: bool,
    pub output: PathBuf,
    /// The LoRA's file name (without extension).
    pub name: String,
    pub steps: Option<usize>,
    pub epochs: Option<usize>,
    pub batch_size: usize,
    pub gradient_accumulation: usize,
    pub lr: f64,
    pub lr_scheduler: LrSchedule,
    pub warmup_steps: usize,
    pub min_snr_gamma: Option<f32>,
    pub noise_offset: f32,
    pub seed: u64,
    pub rank: usize,
    pub alpha: f32,
    pub dropout: f32,
    pub targets: LoraTargets,
    pub save_every: usize,
    pub resume: Option<String>,
    pub format: LoraFileFormat,
    pub max_grad_norm: Option<f64>,
    pub weight_decay: f64,
    pub recompute: bool,
    /// Keep latents and text embeddings in this folder between runs.
    pub cache_dir: Option<PathBuf>,
    /// Train adapters on the text encoder too (its attention and MLP projections).
    pub train_text_encoder: bool,
    /// The text encoder's learning rate (None: `lr`).
    pub text_encoder_lr: Option<f64>,
    /// The `--validation-*` options (no prompts: no validation grids).
    pub validation: ValidationArgs,
    /// Show the progress bar (when standard error is a terminal).
    pub progress: bool,
}

/// The settings a checkpoint must share with the run resuming it.
fn identity(a: &TrainArgs) -> serde_json::Value {
    let mut v = serde_json::json!({
        "model": a.model.display().to_string(),
        "data": a.data.dir.display().to_string(),
        "resolution": a.data.resolution,
        "batch_size": a.batch_size,
        "gradient_accumulation": a.gradient_accumulation,
        "seed": a.seed,
        "rank": a.rank,
        "alpha": a.alpha,
        "dropout": a.dropout,
        "targets": format!("{:?}", a.targets),
        "lr": a.lr,
        "lr_scheduler": a.lr_scheduler.name(),
        "warmup_steps": a.warmup_steps,
    });
    // Only when set, so that the runs of earlier versions keep their identity.
    if a.train_text_encoder {
        v["train_text_encoder"] = true.into();
        v["text_encoder_lr"] = te_lr(a).into();
    }
    v
}

/// The text encoder's base learning rate.
fn te_lr(a: &TrainArgs) -> f64 {
    a.text_encoder_lr.unwrap_or(a.lr)
}

/// A step's plans for one latent size: the UNet's and, when the text encoder trains, CLIP's
/// with the two copies that join them (CLIP's output into the UNet's context, the UNet's
/// d(context) into CLIP's output gradient).
struct StepPlans {
    unet: UNetTrainPlan,
    te: Option<TeStep>,
}

struct TeStep {
    clip: ClipTrainPlan,
    to_unet: Dispatch,
    to_clip: Dispatch,
}

/// Runs `atelier train`. A full disk ends it with what to do next.
pub fn run(gpu: &Gpu, a: &TrainArgs) -> Result<()> {
    run_inner(gpu, a).map_err(|e| match e {
        Error::NoSpace { .. } => Error::Usage(format!(
            "{e} (another --output). The checkpoints written before are whole: after freeing space, continue with --resume latest --output {}",
            a.output.display()
        )),
        e => e,
    })
}

fn run_inner(gpu: &Gpu, a: &TrainArgs) -> Result<()> {
    check_args(a)?;
    std::fs::create_dir_all(&a.output).map_err(|e| Error::io(&a.output, e))?;
    crate::images::check_writable_dir(&a.output)?;
    let run_file = a.output.join("run.json");
    let ident = identity(a);
    match (std::fs::read_to_string(&run_file), &a.resume) {
        (Ok(text), _) if serde_json::from_str::<serde_json::Value>(&text).ok().as_ref() != Some(&ident) => {
            return Err(Error::Usage(format!(
                "{} already holds a different training run (its run.json differs from these settings): choose another --output, or resume it with its own settings",
                a.output.display()
            )));
        }
        (Ok(_), None) if !checkpoint::list(&a.output).is_empty() => {
            return Err(Error::Usage(format!(
                "{} already holds checkpoints of this run: continue it with --resume latest, or choose another --output",
                a.output.display()
            )));
        }
        _ => crate::images::write_atomic(&run_file, serde_json::to_string_pretty(&ident).expect("json").as_bytes())?,
    }
    checkpoint::clean(&a.output);

    let data = Dataset::scan(&a.data)?;
    eprintln!("{}", data.summary());
    let t0 = Instant::now();
    let sd = StableDiffusion::load(gpu, &a.model, &Default::default(), None)?;
    eprintln!("{} ({:.1} s)", sd.report, t0.elapsed().as_secs_f64());
    let sched = match a.model.is_dir() {
        true => SchedulerConfig::from_model_dir(&a.model)?,
        false => SchedulerConfig::v1_5(),
    };
    let acp: Vec<f64> = alphas_cumprod(&sched).iter().map(|&v| v as f64).collect();
    let specs = sd.unet.cfg.lora_specs(a.targets, a.rank, a.alpha, a.dropout);
    let lora = LoraParams::new(gpu, &specs, a.seed)?;
    let te_specs = if a.train_text_encoder { sd.clip.cfg.lora_specs(a.rank, a.alpha, a.dropout) } else { Vec::new() };
    let te_lora = if a.train_text_encoder { Some(LoraParams::new(gpu, &te_specs, stream_seed(a.seed, S_TE_INIT, 0))?) } else { None };

    let batches = data.epoch_order(0, a.seed, a.batch_size).len();
    let per_epoch = batches.div_ceil(a.gradient_accumulation).max(1);
    let total = match (a.steps, a.epochs) {
        (Some(s), _) => s,
        (None, Some(e)) => e * per_epoch,
        (None, None) => unreachable!("checked"),
    };
    let mut step = 0;
    let mut loss_scale = None;
    if let Some(r) = &a.resume {
        let dir = checkpoint::resolve(&a.output, r)?;
        let st = checkpoint::load(gpu, &dir, &lora, te_lora.as_ref())?;
        if st.identity != ident {
            return Err(Error::Usage(format!("{} was made with other settings than these; resume with the run's own settings", dir.display())));
        }
        step = st.step;
        loss_scale = Some(st.loss_scale);
        truncate_log(&a.output.join("log.csv"), step)?;
        eprintln!("resuming from {} at step {step}", dir.display());
    }

    let stop = Arc::new(AtomicBool::new(false));
    {
        let stop = stop.clone();
        // A second handler cannot be installed in one process (tests run several trainings):
        // then Ctrl-C keeps its default behaviour.
        let _ = ctrlc::set_handler(move || stop.store(true, Ordering::SeqCst));
    }

    let disk = match &a.cache_dir {
        Some(dir) => {
            let c = DiskCache::open(dir, &a.model, gpu, a.data.center_crop)?;
            match c.latents {
                true => eprintln!("cache: latents and text embeddings in {}", dir.display()),
                false => eprintln!(
                    "cache: text embeddings in {}; latents are not cached, since --random-crop crops and encodes each image anew at each use",
                    dir.display()
                ),
            }
            Some(c)
        }
        None => None,
    };
    let prefetch = (a.data.center_crop && disk.is_none()).then(|| Prefetcher::new(&data)).flatten();
    let mut caches = Caches {
        latents: HashMap::new(),
        embeddings: HashMap::new(),
        encoders: HashMap::new(),
        clip: None,
        order: None,
        disk,
        samplers: HashMap::new(),
        prefetch,
    };
    let mut plans: HashMap<(usize, usize), StepPlans> = HashMap::new();
    let optimizer = lora.optimizer_step(gpu)?;
    let te_optimizer = te_lora.as_ref().map(|t| t.optimizer_step(gpu)).transpose()?;
    let mut validator = Validator::new(gpu, &sd, &sched, &lora, te_lora.as_ref(), a)?;
    let mut log = open_log(&a.output.join("log.csv"), step == 0)?;
    let mut history = read_log(&a.output.join("log.csv"));
    let mut smooth = history.last().map(|h| h.1).unwrap_or(f64::NAN);
    let mut bar = Progress::with_output("training", total, a.progress && std::io::IsTerminal::is_terminal(&std::io::stderr()));
    eprintln!(
        "training {} adapters{} (rank {}, alpha {}) for {total} steps of {} image(s) x {} accumulation; {} images, {per_epoch} steps per epoch",
        specs.len(),
        if te_specs.is_empty() { String::new() } else { format!(" + {} on the text encoder", te_specs.len()) },
        a.rank,
        a.alpha,
        a.batch_size,
        a.gradient_accumulation,
        data.len()
    );
    // The base model's grid before the first step; a resumed run draws a due grid it lacks.
    if let Some(v) = validator.as_mut()
        && v.due(step, total)
        && (step == 0 || !v.path(step).exists())
        && step < total
    {
        validate(gpu, &sd, &sched, &lora, te_lora.as_ref(), v, step, total, &mut bar)?;
        bar.restart();
    }
    let t_start = Instant::now();
    if step < total {
        // The first batch's plans, all built before anything runs, so the background compile
        // threads make every network's pipelines together (H100 machine, empty driver cache:
        // step 1 done at 15.7 s compiling on one thread, 1.9 s on 15).
        let k = step * a.gradient_accumulation;
        let order = data.epoch_order(k / batches, a.seed, a.batch_size);
        let (w, h) = data.target_size(order[k % batches][0]);
        if caches.disk.as_ref().is_none_or(|c| !c.latents) {
            caches.encoders.insert((h, w), sd.vae.encode_plan(gpu, 1, h, w, false)?);
        }
        if !a.train_text_encoder && caches.disk.is_none() {
            caches.clip = Some(sd.clip.plan(gpu, 1, 0, false)?);
        }
        plans.insert((h, w), step_plans(gpu, &sd, a, h, w, loss_scale, &lora, te_lora.as_ref())?);
    }
    while step < total {
        let lr = a.lr_scheduler.lr_at(a.lr, step, total, a.warmup_steps);
        let opt = AdamW { lr, weight_decay: a.weight_decay, max_grad_norm: a.max_grad_norm, ..AdamW::default() };
        let opt_te = AdamW { lr: a.lr_scheduler.lr_at(te_lr(a), step, total, a.warmup_steps), ..opt };
        // Redo the step at a lower loss scale while its gradients overflow f16.
        let (loss, norm) = loop {
            let mut losses = Vec::new();
            for micro in 0..a.gradient_accumulation {
                let k = (step * a.gradient_accumulation + micro) as u64;
                let (inputs, (h, w)) = prepare(gpu, &sd, &data, a, &acp, &mut caches, k, batches, sched.prediction_type)?;
                let plans = match plans.entry((h, w)) {
                    std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
                    std::collections::hash_map::Entry::Vacant(e) => e.insert(step_plans(gpu, &sd, a, h, w, loss_scale, &lora, te_lora.as_ref())?),
                };
                let plan = &plans.unet;
                plan.sample.write_f32(gpu, &inputs.sample)?;
                plan.target.write_f32(gpu, &inputs.target)?;
                plan.timestep.write_f32(gpu, &inputs.timesteps)?;
                if let Some(w) = &plan.weights {
                    w.write_f32(gpu, &inputs.weights)?;
                }
                lora.set_step(gpu, &opt, step as u64 + 1, stream_seed(a.seed, S_DROPOUT, k));
                match (&plans.te, &te_lora) {
                    (Some(te), Some(tl)) => {
                        te.clip.set_ids(gpu, &inputs.ids)?;
                        tl.set_step(gpu, &opt_te, step as u64 + 1, stream_seed(a.seed, S_TE_DROPOUT, k));
                    }
                    _ => plan.context.write_f32(gpu, &inputs.context)?,
                }
                let mut rec = Recorder::new(gpu);
                if let Some(te) = &plans.te {
                    te.clip.record_forward(&mut rec)?;
                    rec.run(&te.to_unet)?;
                }
                plan.plan.record(&mut rec)?;
                if let Some(te) = &plans.te {
                    rec.run(&te.to_clip)?;
                    te.clip.record_backward(&mut rec)?;
                }
                if micro + 1 == a.gradient_accumulation {
                    for d in optimizer.iter().chain(te_optimizer.iter().flatten()) {
                        rec.run(d)?;
                    }
                }
                rec.finish()?;
                losses.push(plan.loss.to_f32(gpu)?[0] as f64);
            }
            let te_skipped = match &te_lora {
                Some(t) => t.step_skipped(gpu)?,
                None => false,
            };
            if !lora.step_skipped(gpu)? && !te_skipped {
                let (mut norm, _) = lora.grad_norm(gpu)?;
                if let Some(t) = &te_lora {
                    norm = norm.hypot(t.grad_norm(gpu)?.0);
                }
                break (losses.iter().sum::<f64>() / losses.len() as f64, norm);
            }
            // (When only one set overflowed, the other was updated; the redo updates it again.)
            lora.zero_grads(gpu);
            if let Some(t) = &te_lora {
                t.zero_grads(gpu);
            }
            let scale = plans.values().next().map(|p| p.unet.loss_scale).unwrap_or(1.0);
            if scale <= 1.0 {
                return Err(Error::Usage(format!("step {}: the gradients overflow f16 even at loss scale 1 (the loss diverged; lower --lr)", step + 1)));
            }
            eprintln!("\nstep {}: gradients overflowed f16 at loss scale {scale}; redoing it at {}", step + 1, scale / 2.0);
            loss_scale = Some(scale / 2.0);
            plans.clear();
        };
        step += 1;
        smooth = if smooth.is_nan() { loss } else { 0.95 * smooth + 0.05 * loss };
        let scale = plans.values().next().map(|p| p.unet.loss_scale).unwrap_or(0.0);
        let row = format!("{step},{loss:.6},{smooth:.6},{lr:.3e},{norm:.5},{scale},{:.3}\n", t_start.elapsed().as_secs_f64());
        append_row(&mut log, &a.output.join("log.csv"), &row)?;
        history.push((step, smooth, loss));
        bar.set_note(&format!("loss {smooth:.4}"));
        bar.update(step, total);
        let interrupted = stop.load(Ordering::SeqCst);
        if (a.save_every > 0 && step % a.save_every == 0) || step == total || interrupted {
            log.flush().map_err(|e| Error::io(a.output.join("log.csv"), e))?;
            let state = TrainState {
                version: 1,
                step,
                loss_scale: scale,
                identity: ident.clone(),
                layers: checkpoint::layers(&lora),
                total: lora.total,
                te_layers: te_lora.as_ref().map(checkpoint::layers).unwrap_or_default(),
                te_total: te_lora.as_ref().map_or(0, |t| t.total),
            };
            let mut adapters = export::adapters(&lora, &lora.params.to_f32(gpu)?, &sd.unet.cfg)?;
            if let Some(t) = &te_lora {
                adapters.extend(export::adapters(t, &t.params.to_f32(gpu)?, &sd.unet.cfg)?);
            }
            let dir = checkpoint::save(gpu, &a.output, &lora, te_lora.as_ref(), &state, |d| write_lora(a, &adapters, step, &data, d))?;
            plot::write_loss_curve(&a.output.join("loss.png"), &history)?;
            if step == total {
                write_lora(a, &adapters, step, &data, &a.output)?;
            }
            bar.finish();
            eprintln!("step {step}: loss {smooth:.4}; checkpoint {}", dir.display());
        }
        if let Some(v) = validator.as_mut()
            && v.due(step, total)
            && !interrupted
        {
            validate(gpu, &sd, &sched, &lora, te_lora.as_ref(), v, step, total, &mut bar)?;
            bar.set_note(&format!("loss {smooth:.4}"));
        }
        if interrupted && step < total {
            bar.finish();
            if let Some(c) = &caches.disk {
                eprintln!("{}", c.summary());
            }
            return Err(Error::Usage(format!(
                "interrupted at step {step}: checkpoint written; continue with --resume latest --output {}",
                a.output.display()
            )));
        }
    }
    bar.finish();
    if let Some(c) = &caches.disk {
        eprintln!("{}", c.summary());
    }
    let grids = validator.as_ref().map(|v| format!("; validation grids in {}", v.dir().display())).unwrap_or_default();
    eprintln!(
        "done: {total} steps in {}; LoRA written to {}{grids}",
        crate::progress::clock(t_start.elapsed().as_secs_f64()),
        a.output.join(file_name(a)).display()
    );
    Ok(())
}

/// Draws the validation grid of `step`, showing "validation" on the progress bar, and names
/// the file written.
#[allow(clippy::too_many_arguments)]
fn validate(gpu: &Gpu, sd: &StableDiffusion, sched: &SchedulerConfig, lora: &LoraParams, te_lora: Option<&LoraParams>, v: &mut Validator, step: usize, total: usize, bar: &mut Progress) -> Result<()> {
    bar.set_note("validation");
    bar.update(step, total);
    let path = v.run(gpu, sd, sched, lora, te_lora, step, &mut |done, all| {
        bar.set_note(&format!("validation {done}/{all}"));
        bar.update(step, total);
    })?;
    bar.finish();
    eprintln!("step {step}: validation grid {}", path.display());
    Ok(())
}

fn check_args(a: &TrainArgs) -> Result<()> {
    let bad = |m: String| Err(Error::Usage(m));
    if a.steps.is_none() && a.epochs.is_none() {
        return bad("give --steps or --epochs".into());
    }
    if a.steps == Some(0) || a.epochs == Some(0) || a.batch_size == 0 || a.gradient_accumulation == 0 || a.rank == 0 {
        return bad("--steps, --epochs, --batch-size, --gradient-accumulation and --rank must be at least 1".into());
    }
    if !(a.lr > 0.0 && a.lr.is_finite()) || !(a.alpha > 0.0) || !(0.0..1.0).contains(&a.dropout) || a.noise_offset < 0.0 {
        return bad(format!("--lr {} and --alpha {} must be positive, --dropout {} in [0, 1), --noise-offset {} not negative", a.lr, a.alpha, a.dropout, a.noise_offset));
    }
    if a.text_encoder_lr.is_some_and(|lr| !(lr > 0.0 && lr.is_finite())) {
        return bad("--text-encoder-lr must be positive".into());
    }
    if a.text_encoder_lr.is_some() && !a.train_text_encoder {
        return bad("--text-encoder-lr is for --train-text-encoder; add that flag (or leave the rate out)".into());
    }
    if a.min_snr_gamma.is_some_and(|g| !(g > 0.0)) {
        return bad("--min-snr-gamma must be positive".into());
    }
    crate::train::validation::check(&a.validation)
}

/// The final LoRA's file name.
pub(crate) fn file_name(a: &TrainArgs) -> String {
    match a.format {
        LoraFileFormat::Kohya => format!("{}.safetensors", a.name),
        LoraFileFormat::Diffusers => "pytorch_lora_weights.safetensors".into(),
    }
}

/// The plans of a step on h x w images (built once per size).
#[allow(clippy::too_many_arguments)]
fn step_plans(gpu: &Gpu, sd: &StableDiffusion, a: &TrainArgs, h: usize, w: usize, loss_scale: Option<f32>, lora: &LoraParams, te_lora: Option<&LoraParams>) -> Result<StepPlans> {
    let opts = TrainOptions { recompute: a.recompute, loss_scale, loss_weights: a.min_snr_gamma.is_some(), context_grad: te_lora.is_some() };
    let unet = sd.unet.train_plan(gpu, a.batch_size, h / 8, w / 8, crate::tokenizer::MAX_LEN, lora, opts)?;
    let te = match (te_lora, &unet.dcontext) {
        (Some(tl), Some(dctx)) => {
            let clip = sd.clip.train_plan(gpu, a.batch_size, 0, tl, unet.loss_scale)?;
            let to_unet = elementwise::unary(gpu, Unary::Copy, &clip.out, &unet.context)?;
            let to_clip = elementwise::unary(gpu, Unary::Copy, dctx, &clip.dout)?;
            Some(TeStep { clip, to_unet, to_clip })
        }
        _ => None,
    };
    Ok(StepPlans { unet, te })
}

/// Writes the LoRA file into `dir`, with kohya's training metadata.
fn write_lora(a: &TrainArgs, adapters: &[export::Adapter], step: usize, data: &Dataset, dir: &Path) -> Result<()> {
    let meta = std::collections::BTreeMap::from([
        ("ss_network_module".to_string(), "networks.lora".to_string()),
        ("ss_network_dim".to_string(), a.rank.to_string()),
        ("ss_network_alpha".to_string(), a.alpha.to_string()),
        ("ss_network_dropout".to_string(), a.dropout.to_string()),
        ("ss_base_model_version".to_string(), "sd_v1".to_string()),
        ("ss_sd_model_name".to_string(), a.model.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()),
        ("ss_resolution".to_string(), format!("({}, {})", a.data.resolution, a.data.resolution)),
        ("ss_steps".to_string(), step.to_string()),
        ("ss_max_train_steps".to_string(), a.steps.map(|s| s.to_string()).unwrap_or_default()),
        ("ss_learning_rate".to_string(), a.lr.to_string()),
        ("ss_unet_lr".to_string(), a.lr.to_string()),
        ("ss_text_encoder_lr".to_string(), if a.train_text_encoder { te_lr(a).to_string() } else { String::new() }),
        ("ss_network_train_unet_only".to_string(), if a.train_text_encoder { "False" } else { "True" }.to_string()),
        ("ss_lr_scheduler".to_string(), a.lr_scheduler.name().to_string()),
        ("ss_lr_warmup_steps".to_string(), a.warmup_steps.to_string()),
        ("ss_batch_size_per_device".to_string(), a.batch_size.to_string()),
        ("ss_gradient_accumulation_steps".to_string(), a.gradient_accumulation.to_string()),
        ("ss_seed".to_string(), a.seed.to_string()),
        ("ss_noise_offset".to_string(), a.noise_offset.to_string()),
        ("ss_min_snr_gamma".to_string(), a.min_snr_gamma.map(|g| g.to_string()).unwrap_or_default()),
        ("ss_num_train_images".to_string(), data.len().to_string()),
        ("ss_network_args".to_string(), serde_json::json!({ "targets": format!("{:?}", a.targets) }).to_string()),
        ("ss_training_comment".to_string(), "trained by atelier".to_string()),
    ]);
    export::write_lora(&dir.join(file_name(a)), adapters, a.format, &meta)
}

/// Builds micro-batch k's inputs: its images' cached latents, noise, timesteps, the noised
/// latents and the target, and the captions' cached embeddings (`batches`: micro-batches per
/// epoch). Returns them and the images' size in pixels.
fn open_log(path: &Path, fresh: bool) -> Result<std::fs::File> {
    let io = |e| Error::io(path, e);
    if fresh || !path.exists() {
        let mut f = std::fs::File::create(path).map_err(io)?;
        writeln!(f, "step,loss,smoothed_loss,lr,grad_norm,loss_scale,seconds").map_err(io)?;
        return Ok(f);
    }
    std::fs::OpenOptions::new().append(true).open(path).map_err(io)
}

/// Appends one row to the log; when the write fails (a full disk) the file is cut back to its
/// length before, so it never ends in half a row.
fn append_row(log: &mut std::fs::File, path: &Path, row: &str) -> Result<()> {
    let before = log.metadata().map_err(|e| Error::io(path, e))?.len();
    if let Err(e) = log.write_all(row.as_bytes()) {
        let _ = log.set_len(before);
        return Err(Error::io(path, e));
    }
    Ok(())
}

/// The log's fields of a whole row (7 fields, the first a step), or None.
fn row_fields(line: &str) -> Option<(usize, Vec<&str>)> {
    let f: Vec<&str> = line.split(',').collect();
    (f.len() == 7).then_some(())?;
    Some((f[0].parse().ok()?, f))
}

/// (step, smoothed loss, loss) rows of the log.
fn read_log(path: &Path) -> Vec<(usize, f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines()
        .skip(1)
        .filter_map(|l| {
            let (step, f) = row_fields(l)?;
            Some((step, f[2].parse().ok()?, f[1].parse().ok()?))
        })
        .collect()
}

/// Drops the log's rows after `step` (a resumed run writes them again).
fn truncate_log(path: &Path, step: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else { return Ok(()) };
    let keep: Vec<&str> = text
        .lines()
        .enumerate()
        .filter(|(i, l)| *i == 0 || row_fields(l).is_some_and(|(s, _)| s <= step))
        .map(|(_, l)| l)
        .collect();
    crate::images::write_atomic(path, (keep.join("\n") + "\n").as_bytes())
}
