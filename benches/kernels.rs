//! `cargo bench`: the same kernel benchmarks as `atelier bench` (matmul at SD shapes and
//! 4096³/8192³, elementwise at 64 MiB). An argument filters the cases by name.

fn main() {
    let filter = std::env::args().skip(1).find(|a| !a.starts_with('-'));
    let gpu = match atelier::gpu::Gpu::from_env() {
        Ok(g) => g,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    println!("{}", gpu.describe());
    if let Err(e) = atelier::bench::run_all(&gpu, filter.as_deref(), false, std::env::args().any(|a| a == "--all-tiles"), std::env::args().any(|a| a == "--cold")) {
        eprintln!("error: {e}");
        std::process::exit(1);
    }
}
