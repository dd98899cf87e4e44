//! The `atelier` command line: thin wrappers over the library (info, bench).

use std::process::ExitCode;

use clap::{Parser, Subcommand};

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
    /// Run the kernel benchmarks (matmul at SD shapes and 4096³/8192³, elementwise at 64 MiB).
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let opts = GpuOptions::from_env().with_adapter(cli.adapter.clone());
    let result = match cli.command {
        Command::Info => info(&opts),
        Command::Bench { filter, json, all_tiles } => bench(&opts, filter.as_deref(), json, all_tiles),
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
