//! The `atelier` command line: thin wrappers over the library (info, bench, bench --model).

use std::process::ExitCode;

use std::path::{Path, PathBuf};

use clap::{Parser, Subcommand};

use atelier::bench_models::ModelBench;

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
        /// Time every cooperative-matrix tile at every matmul shape (for tuning), not only at 8192³.
        #[arg(long)]
        all_tiles: bool,
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = GpuOptions::from_env().with_adapter(cli.adapter.clone());
    let result = match cli.command {
        Command::Info => info(&opts),
        Command::Bench { model: Some(model), batch, vae_batch, width, height, repeat, inputs, output, encode, profile, .. } => {
            let o = ModelBench { batch, vae_batch, height, width, repeat, inputs, output, profile, encode };
            bench_model(&opts, &model, &o)
        }
        Command::Bench { filter, json, all_tiles, .. } => bench(&opts, filter.as_deref(), json, all_tiles),
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

fn bench(opts: &GpuOptions, filter: Option<&str>, json: bool, all_tiles: bool) -> atelier::Result<()> {
    let gpu = Gpu::new(opts)?;
    if !json {
        println!("{}", gpu.describe());
    }
    let results = atelier::bench::run_all(&gpu, filter, json, all_tiles)?;
    if json {
        for r in &results {
            println!("{}", r.json());
        }
    }
    if results.is_empty() {
        return Err(atelier::Error::Usage(format!(
            "no benchmark matches {:?}; names start with matmul_, conv3x3_, attention_ or elementwise_",
            filter.unwrap_or("")
        )));
    }
    Ok(())
}

fn bench_model(opts: &GpuOptions, model: &Path, o: &ModelBench) -> atelier::Result<()> {
    let gpu = Gpu::new(opts)?;
    println!("{}", gpu.describe());
    let t0 = std::time::Instant::now();
    let sd = atelier::model::sd15::StableDiffusion::load(&gpu, model, &Default::default(), None)?;
    println!("{} ({:.1} s)", sd.report, t0.elapsed().as_secs_f64());
    atelier::bench_models::run(&gpu, &sd, o)?;
    Ok(())
}
