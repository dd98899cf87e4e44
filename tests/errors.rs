//! Bad-input handling: every bad input or missing capability is a clear error value (in the
//! library) or a non-zero exit with an `error:` line (in the CLI), never a panic. Covers
//! adapter selection (unknown name, index out of range, no adapter at all), a tensor over the
//! device's buffer limits, the CLI's info and bench commands, and running with shader-f16
//! switched off (ATELIER_NO_F16), where the scalar matmul must still be right.

mod common;

use std::process::{Command, Output};

use atelier::gpu::device::list_adapters;
use atelier::gpu::{DType, Gpu, GpuOptions, KernelPath, Recorder, Tensor};
use atelier::kernels::matmul::Matmul;
use common::*;

/// The error `Gpu::new` gives for these options (it must not open a device).
fn open_err(opts: &GpuOptions) -> String {
    match Gpu::new(opts) {
        Ok(g) => panic!("{opts:?} opened {}", g.describe()),
        Err(e) => e.to_string(),
    }
}

#[test]
fn unknown_adapter_is_an_error_listing_the_adapters() {
    let first = &list_adapters()[0].info.name;
    for wanted in ["no-such-gpu", "99"] {
        let e = open_err(&GpuOptions { adapter: Some(wanted.into()), ..Default::default() });
        assert!(e.contains("no GPU adapter matches"), "{wanted}: {e}");
        assert!(e.contains(&format!("{wanted:?}")), "{wanted}: does not name what was asked: {e}");
        assert!(e.contains(&format!("0: {first}")), "{wanted}: does not list the adapters: {e}");
        assert!(e.contains("--adapter"), "{wanted}: does not say what to pass: {e}");
    }
}

#[test]
fn tensor_over_the_buffer_limit_is_an_error() {
    let g = gpu();
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| Tensor::empty(g, &[1 << 40], DType::F16, "huge").map(|_| ())));
    let e = match r {
        Ok(Ok(())) => panic!("a 2 TiB tensor was allocated"),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("Tensor::empty panicked on a 2 TiB tensor"),
    };
    assert!(e.contains("huge"), "does not name the tensor: {e}");
    assert!(e.contains("limit") && e.contains(&(1u64 << 41).to_string()), "does not give the size and the limit: {e}");
    assert!(e.contains("smaller size"), "does not say what to do: {e}");
    // Just over the storage-binding limit is refused too, not left to a wgpu validation error.
    let max = g.caps.limits.max_storage_buffer_binding_size as usize;
    let e = Tensor::empty(g, &[max / 4 + 4], DType::F32, "over-binding").map(|_| ()).unwrap_err();
    let e = e.to_string();
    assert!(e.contains("max_storage_buffer_binding_size") || e.contains("max_buffer_size"), "{e}");
}

#[test]
fn no_f16_runs_the_scalar_path_without_shader_f16() {
    let g = Gpu::new(&GpuOptions { no_f16: true, ..GpuOptions::from_env() }).unwrap();
    eprintln!("no-f16 device: {} ({})", g.describe(), g.caps.path_reason);
    assert!(!g.device.features().contains(wgpu::Features::SHADER_F16), "SHADER_F16 still enabled");
    assert!(!g.device.features().contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX));
    assert!(!g.caps.f16 && !g.caps.coop_16x16_f16_f32);
    assert_eq!(g.caps.path, KernelPath::Scalar);
    // Y = X·Wᵀ + b at an odd N (the f16 output goes through the padded scratch and copy2d),
    // f16 and f32 out. Bounds as in tests/matmul.rs: f16 output rounding 2^-11, bound 1e-3;
    // f32 output sees only f32 accumulation error over K = 40, bound 1e-5.
    let (m, n, k) = (33, 17, 40);
    let s = seed("no-f16 matmul");
    let (x, w, b) = (round_f16(&random(m * k, s)), round_f16(&random(n * k, s ^ 1)), round_f16(&random(n, s ^ 2)));
    let r: Vec<f64> = (0..m * n)
        .map(|o| {
            let (i, j) = (o / n, o % n);
            b[j] as f64 + (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum::<f64>()
        })
        .collect();
    let tx = Tensor::from_f32(&g, &[m, k], DType::F16, &x, "x").unwrap();
    let tw = Tensor::from_f32(&g, &[n, k], DType::F16, &w, "w").unwrap();
    let tb = Tensor::from_f32(&g, &[n], DType::F16, &b, "b").unwrap();
    for (out, bound) in [(DType::F16, 1e-3), (DType::F32, 1e-5)] {
        let ty = Tensor::empty(&g, &[m, n], out, "y").unwrap();
        ty.fill_words(&g, POISON);
        let mut mm = Matmul::new(m, n, k);
        mm.trans_b = true;
        let mut rec = Recorder::new(&g);
        mm.run(&g, &mut rec, &tx, &tw, Some(&tb), &ty).unwrap();
        rec.finish().unwrap();
        let e = rel_l2(&ty.to_f32(&g).unwrap(), &r);
        assert!(e < bound, "no-f16 matmul {m}x{n}x{k} {out} out: rel L2 {e:.3e} over {bound:.0e}");
    }
}

/// Runs the CLI with `args` (and `env`), returning its output.
fn cli(args: &[&str], env: &[(&str, &str)]) -> Output {
    // ATELIER_BIN: the binary's place where the tests run away from the build (the GPU check).
    let bin = std::env::var("ATELIER_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_atelier").to_string());
    let mut c = Command::new(bin);
    c.args(args).env_remove("ATELIER_ADAPTER");
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().expect("running the atelier binary")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Asserts the command failed cleanly: non-zero exit, an `error: <expected>...` line on
/// stderr, no panic.
fn assert_clean_failure(o: &Output, expected: &str) {
    let err = text(&o.stderr);
    assert!(!o.status.success(), "exited 0; stderr:\n{err}");
    assert_eq!(o.status.code(), Some(1), "not the error exit code; stderr:\n{err}");
    assert!(!err.contains("panicked"), "panicked:\n{err}");
    // Only lines that start with "error: " followed by the message count (drivers print
    // "error: XDG_RUNTIME_DIR ..." lines of their own).
    let wanted = format!("error: {expected}");
    assert!(err.lines().any(|l| l.starts_with(&wanted)), "no line starting {wanted:?} in stderr:\n{err}");
}

#[test]
fn cli_info_lists_adapters_and_the_kernel_path() {
    let o = cli(&["info"], &[]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "info failed:\n{out}\n{}", text(&o.stderr));
    assert!(out.contains("kernel path"), "{out}");
    assert!(out.contains("[0] ") && out.contains("selected: "), "{out}");
}

#[test]
fn cli_unknown_adapter_fails_cleanly() {
    let o = cli(&["--adapter", "nonexistent", "info"], &[]);
    assert_clean_failure(&o, "no GPU adapter matches \"nonexistent\"");
}

#[test]
fn cli_without_any_adapter_fails_cleanly() {
    // Point the Vulkan loader at a driver list that doesn't exist: no adapter at all.
    let none = [("VK_DRIVER_FILES", "/nonexistent/icd.json"), ("VK_ICD_FILENAMES", "/nonexistent/icd.json")];
    for args in [&["info"][..], &["bench", "--filter", "elementwise_copy"]] {
        let o = cli(args, &none);
        assert_clean_failure(&o, "no GPU adapter found");
        assert!(text(&o.stderr).contains("mesa-vulkan-drivers"), "{args:?}: no hint for a machine without a GPU");
    }
}

#[test]
fn cli_bench_filter_matching_nothing_fails_cleanly() {
    let o = cli(&["bench", "--filter", "nothing-matches"], &[]);
    assert_clean_failure(&o, "no benchmark matches \"nothing-matches\"");
    assert!(text(&o.stderr).contains("matmul_"), "does not say what names exist");
}

#[test]
fn cli_bench_json_prints_one_object_per_line() {
    let o = cli(&["bench", "--filter", "elementwise_copy", "--json"], &[]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "bench failed:\n{out}\n{}", text(&o.stderr));
    let lines: Vec<&str> = out.lines().collect();
    assert!(!lines.is_empty(), "no output");
    for l in lines {
        assert!(l.starts_with("{\"name\":\"elementwise_copy") && l.ends_with('}'), "not a JSON result line: {l}");
        let gbs = l.split("\"gbs\":").nth(1).and_then(|v| v.trim_end_matches('}').parse::<f64>().ok());
        assert!(gbs.is_some_and(|v| v > 0.0), "no positive gbs: {l}");
    }
}

#[test]
fn cli_bench_pipeline_stats_reports_or_says_why() {
    // Drivers with VK_KHR_pipeline_executable_properties (NVIDIA's) report each pipeline the
    // run made; others (lavapipe in CI) must say that the driver lacks it, not fail obscurely.
    let o = cli(&["bench", "--filter", "elementwise_copy", "--pipeline-stats"], &[]);
    let out = text(&o.stdout);
    if o.status.success() {
        let head = out.lines().find(|l| l.starts_with("driver statistics of ")).unwrap_or_else(|| panic!("no statistics header:\n{out}"));
        assert!(!head.starts_with("driver statistics of 0 "), "no pipeline reported:\n{out}");
        let row = out.lines().find(|l| l.starts_with("elementwise.unary")).unwrap_or_else(|| panic!("the copy's pipeline is not reported:\n{out}"));
        assert!(row.contains("subgroup "), "no executable properties: {row}");
    } else {
        assert_clean_failure(&o, "GPU error: pipeline statistics");
        assert!(text(&o.stderr).contains("VK_KHR_pipeline_executable_properties"), "does not name what the driver lacks:\n{}", text(&o.stderr));
    }
}

#[test]
fn cli_help_lists_the_commands() {
    let o = cli(&["--help"], &[]);
    let out = text(&o.stdout);
    assert!(o.status.success(), "{out}");
    for cmd in ["info", "bench", "--adapter"] {
        assert!(out.lines().any(|l| l.trim_start().starts_with(cmd)), "--help does not list {cmd}:\n{out}");
    }
}

/// A shape whose element count overflows is refused, not wrapped to a tiny buffer.
#[test]
fn overflowing_shape_is_an_error() {
    let g = common::gpu();
    let err = atelier::gpu::Tensor::empty(g, &[1 << 32, 1 << 32], atelier::gpu::DType::F16, "overflow").unwrap_err();
    assert!(err.to_string().contains("limit"), "{err}");
}
