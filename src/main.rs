//! The `atelier` command line: thin wrappers over the library (sample, info, bench, bench --model).

use std::process::ExitCode;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use atelier::bench_models::ModelBench;
use atelier::bench_train::TrainBench;
use atelier::model::unet_train::LoraTargets;
use atelier::sample::SampleArgs;
use atelier::schedulers::Sampler;

use atelier::gpu::device::{list_adapters, GpuOptions};
use atelier::gpu::Gpu;

#[derive(Parser)]
#[command(name = "atelier", version, about = "Stable Diffusion 1.5 on any Vulkan / Metal / DX12 GPU: \
LoRA training, sampling and kernel benchmarks, in WGSL compute shaders.")]
struct Cli {
    /// GPU to use: an index or part of a name from `atelier info` (default: the best discrete
    /// GPU). Also ATELIER_ADAPTER.
    #[arg(long, global = true, value_name = "NAME|INDEX")]
    adapter: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate images from a prompt (text-to-image), or from a picture (--init-image).
    #[command(after_help = "Examples:\n  atelier sample --model v1-5-pruned-emaonly.safetensors --prompt \"a portrait of a lady, oil on canvas\"\n  \
atelier sample --model sd15/ --prompt-file prompts.txt --num-images 4 --seed 42 --output portraits/\n  \
atelier sample --model sd15/ --prompt \"in the style of Gainsborough\" --init-image photo.jpg --strength 0.6\n  \
atelier sample --model sd15/ --prompt \"a lady\" --lora portraits.safetensors:0.8")]
    Sample(Box<SampleCli>),
    /// Train a LoRA on a folder of images (captions from .txt files beside them, --prompts or
    /// --caption) and write it as a kohya (default) or diffusers file.
    #[command(after_help = "Examples:\n  atelier train --model sd15/ --data portraits/ --output runs/portraits --steps 1000\n  \
atelier train --model sd15/ --data portraits/ --prompts prompts.txt --rank 4 --alpha 16 --dropout 0.1 --save-every 50 --steps 2000 --output runs/p\n  \
atelier train --model sd15/ --data portraits/ --output runs/p --steps 2000 --resume latest")]
    Train(Box<TrainCli>),
    /// List the GPUs, their features and limits, and the kernel path atelier will use.
    Info,
    /// Run the kernel benchmarks (matmul, conv, attention at SD shapes, elementwise at 64 MiB),
    /// or with --model time the text encoder, UNet and VAE of a model.
    Bench {
        /// Only the cases whose name contains this text.
        #[arg(long)]
        filter: Option<String>,
        /// Print one JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
        /// Time every cooperative-matrix tile at every matmul and convolution shape (for tuning),
        /// not only at 8192³, and every tile of the attention forward and backward.
        #[arg(long)]
        all_tiles: bool,
        /// Read the matmul and convolution weights from memory, not the L2 cache, as a model
        /// step does (each launch takes the next of enough copies to fill 100 MiB).
        #[arg(long)]
        cold: bool,
        /// Time the networks of this model (a diffusers folder or a single .safetensors file)
        /// instead of the kernels.
        #[arg(long, value_name = "PATH")]
        model: Option<PathBuf>,
        /// Images per batch (with --model): 2 is one classifier-free-guidance step.
        #[arg(long, default_value_t = 2)]
        batch: usize,
        /// Images per VAE batch (with --model): decoding is one image at a time by default.
        #[arg(long, default_value_t = 1)]
        vae_batch: usize,
        /// Image width in pixels (with --model), a multiple of 8.
        #[arg(long, default_value_t = 512)]
        width: usize,
        /// Image height in pixels (with --model), a multiple of 8.
        #[arg(long, default_value_t = 512)]
        height: usize,
        /// Timed runs per network (with --model), after two warm-up runs.
        #[arg(long, default_value_t = 10)]
        repeat: usize,
        /// Inputs for the networks (with --model): a safetensors file with clip.input_ids,
        /// unet.sample, unet.timestep, unet.encoder_hidden_states, vae.latent, vae.image
        /// (NCHW f32, as diffusers takes them); absent ones are seeded random.
        #[arg(long, value_name = "FILE")]
        inputs: Option<PathBuf>,
        /// Write the networks' outputs here (with --model), as f32 safetensors.
        #[arg(long, value_name = "FILE")]
        output: Option<PathBuf>,
        /// Also time the VAE encoder (with --model).
        #[arg(long)]
        encode: bool,
        /// Print a per-kernel profile of one run of each network (with --model).
        #[arg(long)]
        profile: bool,
        /// With --model: time one LoRA training step of the UNet (forward, loss, backward,
        /// AdamW) instead of the networks' inference. --inputs may then hold train.sample,
        /// train.target, train.timestep, train.encoder_hidden_states and the adapters'
        /// lora.<module>.lora_A/B; --output gets the first step's loss and gradients.
        #[arg(long)]
        train: bool,
        /// LoRA rank (with --train).
        #[arg(long, default_value_t = 4)]
        rank: usize,
        /// LoRA alpha (with --train): the adapters' scale is alpha / rank.
        #[arg(long, default_value_t = 16.0)]
        alpha: f32,
        /// Dropout on the adapters' input (with --train; 0: none).
        #[arg(long, default_value_t = 0.0)]
        dropout: f32,
        /// Which modules get adapters (with --train): attention (to_q, to_k, to_v, to_out.0
        /// of every attention) or transformer (also proj_in, proj_out and the feed-forward,
        /// kohya's default).
        #[arg(long, default_value = "attention")]
        targets: String,
        /// Recompute each transformer's forward at its backward instead of keeping its
        /// activations (with --train): less memory, more time.
        #[arg(long)]
        recompute: bool,
        /// After the run, compile every pipeline it used again and print what the driver reports
        /// of each (registers, spills, ...; Vulkan drivers with VK_KHR_pipeline_executable_properties).
        #[arg(long)]
        pipeline_stats: bool,
        /// With --pipeline-stats: also write the driver's internal representations of each
        /// pipeline, where it shares them, as text files in this folder.
        #[arg(long, value_name = "DIR", requires = "pipeline_stats")]
        pipeline_ir: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct TrainCli {
    /// The SD-1.5 model to train on: a diffusers folder or a single-file checkpoint.
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// The folder of training images (png, jpg, webp; searched recursively).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// The run's folder: checkpoints, log.csv, loss.png and the final LoRA.
    #[arg(long, value_name = "DIR")]
    output: PathBuf,
    /// The LoRA file's name (kohya format), without extension.
    #[arg(long, default_value = "lora")]
    name: String,
    /// Optimizer steps to train (or give --epochs).
    #[arg(long)]
    steps: Option<usize>,
    /// Passes over the dataset (with its repeats), when --steps is not given.
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per micro-batch.
    #[arg(long, default_value_t = 1)]
    batch_size: usize,
    /// Micro-batches whose gradients add up to one optimizer step.
    #[arg(long, default_value_t = 1)]
    gradient_accumulation: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 1e-4)]
    lr: f64,
    /// constant, constant_with_warmup, linear or cosine.
    #[arg(long, default_value = "constant")]
    lr_scheduler: String,
    /// Warm-up steps of the learning-rate schedule.
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Min-SNR loss weighting (5 is the paper's value); off when absent.
    #[arg(long)]
    min_snr_gamma: Option<f32>,
    /// Noise offset (e.g. 0.05): brighter brights and darker darks.
    #[arg(long, default_value_t = 0.0)]
    noise_offset: f32,
    /// Seed of every random choice (the run is reproducible from it).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// LoRA rank.
    #[arg(long, default_value_t = 4)]
    rank: usize,
    /// LoRA alpha: the adapters' scale is alpha / rank (default: the rank, scale 1).
    #[arg(long)]
    alpha: Option<f32>,
    /// Dropout on the adapters' inputs.
    #[arg(long, default_value_t = 0.0)]
    dropout: f32,
    /// attention (to_q, to_k, to_v, to_out.0: diffusers' choice) or transformer (also
    /// proj_in, proj_out and the feed-forward: kohya's).
    #[arg(long, default_value = "attention")]
    targets: String,
    /// Training resolution (the shorter side, cropped square).
    #[arg(long, default_value_t = 512)]
    resolution: usize,
    /// Random crops instead of center crops (images are then encoded every time they are used).
    #[arg(long)]
    random_crop: bool,
    /// Random horizontal flips.
    #[arg(long)]
    flip: bool,
    /// Aspect-ratio buckets (kohya style) instead of square crops.
    #[arg(long)]
    buckets: bool,
    /// Times each image is seen per epoch.
    #[arg(long, default_value_t = 1)]
    repeats: usize,
    /// One caption for every image without a .txt file.
    #[arg(long)]
    caption: Option<String>,
    /// A file of prompts, one per line: a random one is drawn for each image each time.
    #[arg(long, value_name = "FILE")]
    prompts: Option<PathBuf>,
    /// Write a checkpoint every N steps (0: only at the end).
    #[arg(long, default_value_t = 0)]
    save_every: usize,
    /// Continue a run: a checkpoint folder, or `latest` (the newest in --output).
    #[arg(long, value_name = "DIR|latest")]
    resume: Option<String>,
    /// kohya (A1111, ComfyUI, stable-diffusion.cpp, diffusers) or diffusers
    /// (pytorch_lora_weights.safetensors).
    #[arg(long, default_value = "kohya")]
    format: String,
    /// Gradient-norm clipping (0: off).
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    /// AdamW weight decay.
    #[arg(long, default_value_t = 1e-2)]
    weight_decay: f64,
    /// Recompute the transformers' forwards at the backward: less GPU memory, ~15% slower.
    #[arg(long)]
    recompute: bool,
    /// Keep each image's VAE encoding and each caption's text embedding in DIR, for later
    /// runs on the same images and model to reuse (the folder may be shared and deleted).
    #[arg(long, value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Also train adapters on the text encoder's attention (q, k, v, out_proj) and MLP (fc1,
    /// fc2) projections; the file then has lora_te_ (kohya) or text_encoder. (diffusers)
    /// keys. Off by default: the UNet alone (kohya's --network_train_unet_only).
    #[arg(long)]
    train_text_encoder: bool,
    /// The text encoder's learning rate, on the same schedule (default: --lr; kohya's
    /// --text_encoder_lr).
    #[arg(long, value_name = "LR")]
    text_encoder_lr: Option<f64>,
    /// Draw this prompt into a grid of validation images (OUTPUT/validation/step-NNNNNN.png)
    /// before the first step, every --validation-every steps and at the end; repeat the
    /// option for more prompts (one grid row each).
    #[arg(long, value_name = "TEXT")]
    validation_prompt: Vec<String>,
    /// Steps between validation grids [default: --save-every; without checkpoints, only the
    /// first and last grids].
    #[arg(long, value_name = "N")]
    validation_every: Option<usize>,
    /// Validation images per prompt, with seeds --validation-seed, +1, ... [default: 2]
    #[arg(long, value_name = "K")]
    validation_images: Option<usize>,
    /// Seed of the first validation image of each prompt [default: --seed].
    #[arg(long)]
    validation_seed: Option<u64>,
    /// Sampler steps of the validation images [default: 20].
    #[arg(long, value_name = "N")]
    validation_steps: Option<usize>,
    /// Classifier-free guidance scale of the validation images [default: 7.5].
    #[arg(long, value_name = "SCALE")]
    validation_guidance: Option<f32>,
    /// Negative prompt of the validation images [default: none].
    #[arg(long, value_name = "TEXT")]
    validation_negative_prompt: Option<String>,
    /// Sampler of the validation images, as `atelier sample --sampler` [default: dpmpp_2m].
    #[arg(long)]
    validation_sampler: Option<String>,
}

#[derive(clap::Args)]
struct SampleCli {
    /// The SD-1.5 model: a diffusers folder or a single-file checkpoint (.safetensors).
    #[arg(long, value_name = "PATH")]
    model: PathBuf,
    /// What to draw.
    #[arg(long, short = 'p')]
    prompt: Option<String>,
    /// A text file with one prompt per line (lines starting with # are skipped).
    #[arg(long, value_name = "FILE")]
    prompt_file: Option<PathBuf>,
    /// What to steer away from.
    #[arg(long, short = 'n', default_value = "")]
    negative_prompt: String,
    /// Sampling steps.
    #[arg(long, default_value_t = 25)]
    steps: usize,
    /// Classifier-free guidance scale (1 turns guidance off: one UNet pass a step).
    #[arg(long, default_value_t = 7.5, value_name = "SCALE")]
    guidance: f32,
    /// Sampler: ddim, pndm, euler, euler_a, dpmpp_2m, dpmpp_2m_sde, heun, lms, unipc.
    #[arg(long, default_value = "dpmpp_2m")]
    sampler: String,
    /// Karras noise levels (euler, dpmpp_2m, dpmpp_2m_sde, heun, lms, unipc).
    #[arg(long)]
    karras: bool,
    /// DDIM's eta (0: deterministic; 1: as DDPM).
    #[arg(long, default_value_t = 0.0)]
    eta: f32,
    /// Seed of the initial noise (random when absent, and printed); image k uses seed + k.
    #[arg(long)]
    seed: Option<u64>,
    /// Image width in pixels, a multiple of 8 (default 512, or the init image's).
    #[arg(long)]
    width: Option<usize>,
    /// Image height in pixels, a multiple of 8 (default 512, or the init image's).
    #[arg(long)]
    height: Option<usize>,
    /// Images per prompt.
    #[arg(long, value_name = "N")]
    num_images: Option<usize>,
    /// Images generated side by side (more is faster on big GPUs and needs more memory).
    #[arg(long, default_value_t = 1, value_name = "N")]
    batch_size: usize,
    /// A .png file (numbered -1, -2, ... for several images) or a folder (default: outputs/),
    /// where images are named NNNNN-SEED.png.
    #[arg(long, short = 'o', value_name = "PATH")]
    output: Option<PathBuf>,
    /// A LoRA file (kohya, diffusers or PEFT) and its scale; repeat for several.
    #[arg(long = "lora", value_name = "FILE[:SCALE]", value_parser = parse_lora)]
    loras: Vec<(PathBuf, f32)>,
    /// Start from this picture (image-to-image); resized to --width/--height when given.
    #[arg(long, value_name = "FILE")]
    init_image: Option<PathBuf>,
    /// How much of the init image to repaint, 0 to 1 (default 0.75).
    #[arg(long)]
    strength: Option<f64>,
    /// Initial latents instead of seeded noise: a safetensors file with tensor `latents`
    /// [N, 4, H/8, W/8] f32, to reproduce another engine's run (with --init-image: the noise
    /// added to the picture's latents).
    #[arg(long, value_name = "FILE")]
    init_noise: Option<PathBuf>,
    /// Also write the final latents (before the VAE) here, in the same format.
    #[arg(long, value_name = "FILE")]
    save_latents: Option<PathBuf>,
    /// Use the text encoder's output this many layers from the end, as A1111 counts (1: the last).
    #[arg(long, default_value_t = 1)]
    clip_skip: usize,
    /// Print a per-kernel profile of one UNet call and one VAE decode.
    #[arg(long)]
    profile: bool,
}

fn parse_lora(s: &str) -> Result<(PathBuf, f32), String> {
    atelier::sample::parse_lora(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = GpuOptions::from_env().with_adapter(cli.adapter.clone());
    let stats = match &cli.command {
        Command::Bench { pipeline_stats: true, pipeline_ir, .. } => Some(pipeline_ir.clone()),
        _ => None,
    };
    let result = match cli.command {
        Command::Info => info(&opts),
        Command::Sample(s) => sample(&opts, *s),
        Command::Train(t) => train(&opts, *t),
        Command::Bench { model: Some(model), train: true, batch, width, height, repeat, inputs, output, profile, rank, alpha, dropout, targets, recompute, .. } => {
            targets.parse().and_then(|targets| {
                let o = TrainBench { batch, height, width, rank, alpha, dropout, targets, recompute, repeat, inputs, output, profile };
                bench_train(&opts, &model, o, &stats)
            })
        }
        Command::Bench { model: Some(model), batch, vae_batch, width, height, repeat, inputs, output, encode, profile, .. } => {
            let o = ModelBench { batch, vae_batch, height, width, repeat, inputs, output, profile, encode };
            bench_model(&opts, &model, &o, &stats)
        }
        Command::Bench { filter, json, all_tiles, cold, .. } => bench(&opts, filter.as_deref(), json, all_tiles, cold, &stats),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

fn info(opts: &GpuOptions) -> atelier::Result<()> {
    let adapters = list_adapters();
    if adapters.is_empty() {
        return Err(atelier::Error::NoAdapter);
    }
    for a in &adapters {
        let i = &a.info;
        println!("[{}] {}", a.index, i.name);
        println!("    backend {:?}, type {:?}, driver {} {}", i.backend, i.device_type, i.driver, i.driver_info);
        let f = a.features;
        let yes = |b: bool| if b { "yes" } else { "no" };
        println!(
            "    shader-f16 {}, subgroups {}, timestamps {}, cooperative matrix {}",
            yes(f.contains(wgpu::Features::SHADER_F16)),
            yes(f.contains(wgpu::Features::SUBGROUP)),
            yes(f.contains(wgpu::Features::TIMESTAMP_QUERY)),
            yes(f.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)),
        );
        for c in &a.coop {
            println!(
                "      coop {}x{}x{} {:?} -> {:?}{}",
                c.m_size, c.n_size, c.k_size, c.ab_type, c.cr_type,
                if c.saturating_accumulation { " (saturating)" } else { "" }
            );
        }
        let l = &a.limits;
        println!(
            "    max buffer {} MiB, max storage binding {} MiB, workgroup storage {} KiB, \
             invocations/workgroup {}, subgroup size {}..{}",
            l.max_buffer_size >> 20,
            l.max_storage_buffer_binding_size >> 20,
            l.max_compute_workgroup_storage_size >> 10,
            l.max_compute_invocations_per_workgroup,
            i.subgroup_min_size,
            i.subgroup_max_size,
        );
    }
    let gpu = Gpu::new(opts)?;
    println!();
    println!("selected: {}", gpu.describe());
    println!("kernel path: {} ({})", gpu.caps.path, gpu.caps.path_reason);
    Ok(())
}

/// `bench --pipeline-stats [--pipeline-ir DIR]`: `Some(DIR)` when asked for.
type StatsRequest = Option<Option<PathBuf>>;

/// Prints the driver's statistics of every pipeline `gpu` has made, when asked for.
fn pipeline_stats(gpu: &Gpu, stats: &StatsRequest, json: bool) -> atelier::Result<()> {
    match stats {
        Some(ir) => atelier::bench::print_pipeline_stats(gpu, ir.as_deref(), json),
        None => Ok(()),
    }
}

fn bench(opts: &GpuOptions, filter: Option<&str>, json: bool, all_tiles: bool, cold: bool, stats: &StatsRequest) -> atelier::Result<()> {
    let gpu = Gpu::new(opts)?;
    if !json {
        println!("{}", gpu.describe());
    }
    let results = atelier::bench::run_all(&gpu, filter, json, all_tiles, cold)?;
    if json {
        for r in &results {
            println!("{}", r.json());
        }
    }
    if results.is_empty() {
        return Err(atelier::Error::Usage(format!(
            "no benchmark matches {:?}; names start with matmul_, conv3x3_, winograd3x3_, upsample3x3_, attention_ or elementwise_",
            filter.unwrap_or("")
        )));
    }
    pipeline_stats(&gpu, stats, json)
}

fn bench_model(opts: &GpuOptions, model: &Path, o: &ModelBench, stats: &StatsRequest) -> atelier::Result<()> {
    let gpu = Gpu::new(opts)?;
    println!("{}", gpu.describe());
    let t0 = std::time::Instant::now();
    let sd = atelier::model::sd15::StableDiffusion::load(&gpu, model, &atelier::model::weights::LoadOptions::inference(), None)?;
    println!("{} ({:.1} s)", sd.report, t0.elapsed().as_secs_f64());
    atelier::bench_models::run(&gpu, &sd, o)?;
    pipeline_stats(&gpu, stats, false)
}

fn bench_train(opts: &GpuOptions, model: &Path, o: TrainBench, stats: &StatsRequest) -> atelier::Result<()> {
    let gpu = Gpu::new(opts)?;
    println!("{}", gpu.describe());
    atelier::bench_train::run(&gpu, model, &o)?;
    pipeline_stats(&gpu, stats, false)
}

fn train(opts: &GpuOptions, t: TrainCli) -> atelier::Result<()> {
    use atelier::train::data::DatasetOptions;
    let targets: LoraTargets = t.targets.parse()?;
    let data = DatasetOptions {
        resolution: t.resolution,
        center_crop: !t.random_crop,
        flip: false,
        buckets: t.buckets,
        repeats: t.repeats,
        caption: t.caption,
        prompts_file: t.prompts,
        ..DatasetOptions::new(t.data)
    };
    let args = atelier::train::trainer::TrainArgs {
        model: t.model,
        data,
        flip: t.flip,
        output: t.output,
        name: t.name,
        steps: t.steps,
        epochs: t.epochs,
        batch_size: t.batch_size,
        gradient_accumulation: t.gradient_accumulation,
        lr: t.lr,
        lr_scheduler: t.lr_scheduler.parse()?,
        warmup_steps: t.warmup_steps,
        min_snr_gamma: t.min_snr_gamma,
        noise_offset: t.noise_offset,
        seed: t.seed,
        rank: t.rank,
        alpha: t.alpha.unwrap_or(t.rank as f32),
        dropout: t.dropout,
        targets,
        save_every: t.save_every,
        resume: t.resume,
        format: t.format.parse()?,
        max_grad_norm: (t.max_grad_norm > 0.0).then_some(t.max_grad_norm),
        weight_decay: t.weight_decay,
        recompute: t.recompute,
        cache_dir: t.cache_dir,
        train_text_encoder: t.train_text_encoder,
        text_encoder_lr: t.text_encoder_lr,
        validation: atelier::train::validation::ValidationArgs {
            prompts: t.validation_prompt,
            negative_prompt: t.validation_negative_prompt,
            every: t.validation_every,
            images: t.validation_images,
            seed: t.validation_seed,
            steps: t.validation_steps,
            guidance: t.validation_guidance,
            sampler: t.validation_sampler.map(|s| s.parse::<Sampler>()).transpose()?,
        },
        progress: true,
    };
    let gpu = Gpu::new(opts)?;
    eprintln!("{}", gpu.describe());
    atelier::train::trainer::run(&gpu, &args)
}

fn sample(opts: &GpuOptions, s: SampleCli) -> atelier::Result<()> {
    let sampler = s.sampler.parse::<Sampler>()?;
    if s.clip_skip == 0 {
        return Err(atelier::Error::Usage("--clip-skip counts from 1 (the last layer)".into()));
    }
    let args = SampleArgs {
        model: s.model,
        prompt: s.prompt,
        prompt_file: s.prompt_file,
        negative_prompt: s.negative_prompt,
        steps: s.steps,
        guidance: s.guidance,
        sampler,
        karras: s.karras,
        eta: s.eta,
        seed: s.seed,
        width: s.width,
        height: s.height,
        num_images: s.num_images,
        batch_size: s.batch_size,
        output: s.output,
        loras: s.loras,
        init_image: s.init_image,
        strength: s.strength,
        init_noise: s.init_noise,
        save_latents: s.save_latents,
        clip_skip: s.clip_skip,
        profile: s.profile,
    };
    let gpu = Gpu::new(opts)?;
    eprintln!("{}", gpu.describe());
    atelier::sample::run(&gpu, &args)
}
