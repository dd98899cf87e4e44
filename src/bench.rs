//! The kernel benchmarks behind `atelier bench` and `cargo bench`: matmul at SD-1.5 shapes and
//! at 4096³ / 8192³ on every path the device has, the convolutions (`bench_conv`: 3x3 at UNet
//! and VAE shapes, direct and by Winograd, the VAE decoder's upsamplers, the input gradients),
//! attention at UNet, CLIP and VAE shapes (every cooperative-matrix tile with `all_tiles`) and
//! its backward at the training step's shapes,
//! elementwise ops at 64 MiB. Each case is
//! warmed up, then timed over repeated launches (median of several batches), and reported
//! in ms and TFLOP/s or GB/s.

use std::time::Instant;

use crate::error::Result;
use crate::gpu::{DType, Dispatch, Gpu, KernelPath, Profiler, Recorder, Tensor};
use crate::kernels::elementwise::{self, Binary, Unary};
use crate::kernels::attention::{coop_dp, Attention, CoopTile as AttentionTile, Operand};
use crate::kernels::attention_backward::{AttentionBackward, AttentionGrads, BwdTile, CoopEntry};
use crate::kernels::matmul::{CoopTile, Matmul};

/// One measured case.
#[derive(Clone, Debug)]
pub struct BenchResult {
    pub name: String,
    pub path: String,
    pub ms: f64,
    /// TFLOP/s for compute-bound kernels, else 0.
    pub tflops: f64,
    /// GB/s of the declared bytes.
    pub gbs: f64,
}

impl BenchResult {
    /// The result as a JSON object.
    pub fn json(&self) -> String {
        format!(
            "{{\"name\":\"{}\",\"path\":\"{}\",\"ms\":{:.6},\"tflops\":{:.3},\"gbs\":{:.1}}}",
            self.name, self.path, self.ms, self.tflops, self.gbs
        )
    }
}

/// Deterministic pseudo-random values in [-1, 1) (xorshift; the benches need no quality).
pub fn noise(n: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Runs `ds` `reps` times over through `rec` and waits for them.
fn run_reps(mut rec: Recorder, ds: &[Dispatch], reps: usize) -> Result<()> {
    for _ in 0..reps {
        for d in ds {
            rec.run(d)?;
        }
    }
    rec.finish()
}

/// Times `d`: a few warm-up launches, then `batches` batches of `reps` launches each;
/// returns the median seconds per launch.
pub fn time_dispatch(gpu: &Gpu, ds: &[Dispatch], reps: usize, batches: usize) -> Result<f64> {
    // Warm-up: one batch (the clocks ramp up after the idle of building the next case).
    run_reps(Recorder::new(gpu), ds, reps.max(3))?;
    let mut times = Vec::with_capacity(batches);
    for _ in 0..batches {
        let t = Instant::now();
        run_reps(Recorder::new(gpu), ds, reps)?;
        times.push(t.elapsed().as_secs_f64() / reps as f64);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    // ATELIER_BENCH_TIMESTAMPS=1: one more batch, each launch timed by the profiler as a model
    // profile times it, to set the two kinds of figure side by side.
    if std::env::var("ATELIER_BENCH_TIMESTAMPS").is_ok_and(|v| v == "1")
        && let Some(mut prof) = Profiler::new(gpu)
    {
        run_reps(Recorder::with_profiler(gpu, Some(&mut prof)), ds, reps)?;
        let (n, ns) = prof.stats.values().fold((0, 0.0), |(n, t), s| (n + s.count, t + s.total_ns));
        let per_set = ns * 1e-3 / n.max(1) as f64 * ds.len() as f64;
        eprintln!("timestamps: {per_set:.1} us a launch ({n} launches; wall clock {:.1} us)", median * 1e6);
    }
    Ok(median)
}

/// Times a compute-bound launch with about `work` flops per batch of repetitions (1 to 200
/// launches; one launch in one batch on a CPU adapter) and reports it under `name` and `path`.
pub(crate) fn time_case(gpu: &Gpu, ds: &[Dispatch], name: String, path: String, work: f64, slow: bool) -> Result<BenchResult> {
    let flops: f64 = ds.iter().map(|d| d.flops).sum();
    let bytes: f64 = ds.iter().map(|d| d.bytes).sum();
    let reps = if slow { 1 } else { ((work / flops.max(1.0)) as usize).clamp(1, 200) };
    let s = time_dispatch(gpu, ds, reps, if slow { 1 } else { 5 })?;
    Ok(BenchResult { name, path, ms: s * 1e3, tflops: flops / s / 1e12, gbs: bytes / s / 1e9 })
}

/// The launches of `mm` as [`Matmul::run`] records them: the product, or when it splits over
/// K its f32 partials and their sum.
pub(crate) fn recorded(gpu: &Gpu, mm: &Matmul, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, c: &Tensor) -> Result<Vec<Dispatch>> {
    let mut rec = Recorder::capture(gpu);
    mm.run(gpu, &mut rec, a, b, bias, c)?;
    Ok(rec.into_dispatches())
}

/// The launches of `mm` once with each of the weights `bs` in turn (see [`Weights`]).
pub(crate) fn recorded_each(gpu: &Gpu, mm: &Matmul, a: &Tensor, bs: &Weights, bias: Option<&Tensor>, c: &Tensor) -> Result<Vec<Dispatch>> {
    let mut ds = Vec::new();
    for b in &bs.0 {
        ds.extend(recorded(gpu, mm, a, b, bias, c)?);
    }
    Ok(ds)
}

/// `mm` (path and tile set, no forced split) recorded unsplit, and, with the launcher's tile,
/// split over K where the launcher splits it: (label, dispatches) for each.
pub(crate) fn unsplit_and_split(gpu: &Gpu, mm: &Matmul, a: &Tensor, bs: &Weights, bias: Option<&Tensor>, c: &Tensor) -> Result<Vec<(String, Vec<Dispatch>)>> {
    let path = mm.plan(gpu).0;
    let mut one = mm.clone();
    one.split_k = Some(1);
    let ds = recorded_each(gpu, &one, a, bs, bias, c)?;
    let mut out = vec![(format!("{path} {}", ds[0].label), ds)];
    let slices = mm.split(gpu);
    if mm.tile.is_none() && slices > 1 {
        let ds = recorded_each(gpu, mm, a, bs, bias, c)?;
        out.push((format!("{path} split-K x{slices} {}", ds[0].label), ds));
    }
    Ok(out)
}

/// A product's weights: one tensor, or with `cold` enough copies (of the same values) that
/// launches reading them in turn find none in the GPU's L2 cache, as a model step does (its
/// weights are read once a step; the bench's single copy stays cached from one repetition to
/// the next). Cases timed with them report the time of one launch.
pub(crate) struct Weights(pub(crate) Vec<Tensor>);

/// Bytes of weights [`Weights::new`] spreads over when cold: twice the H100's 50 MiB L2.
const COLD_BYTES: usize = 100 << 20;

impl Weights {
    /// As [`random_f16`] (the values made once), uploaded once or, with `cold`, as often as
    /// [`COLD_BYTES`] asks (at most 64 times).
    pub(crate) fn new(gpu: &Gpu, shape: &[usize], seed: u64, what: &str, cold: bool) -> Result<Weights> {
        let n: usize = shape.iter().product();
        let values = noise(n, seed);
        let copies = if cold { COLD_BYTES.div_ceil(2 * n).clamp(1, 64) } else { 1 };
        (0..copies).map(|_| Tensor::from_f32(gpu, shape, DType::F16, &values, what)).collect::<Result<_>>().map(Weights)
    }

    /// `r` (timed over one launch set per copy) for one launch set.
    pub(crate) fn per_launch(&self, mut r: BenchResult) -> BenchResult {
        r.ms /= self.0.len() as f64;
        r
    }
}

pub(crate) fn random_f16(gpu: &Gpu, shape: &[usize], seed: u64, what: &str) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    Tensor::from_f32(gpu, shape, DType::F16, &noise(n, seed), what)
}

/// The matmul cases: (name, M, N, K), Y = X·Wᵀ. The UNet's linears at 512x512 with batch 2
/// (one guided step: M = 2 · tokens) at each level, CLIP's MLP, and square products.
pub const MATMUL_CASES: [(&str, usize, usize, usize); 16] = [
    ("unet64_proj_8192x320x320", 8192, 320, 320),
    ("unet64_qkv_8192x960x320", 8192, 960, 320),
    ("unet64_ff_in_8192x2560x320", 8192, 2560, 320),
    ("unet64_ff_out_8192x320x1280", 8192, 320, 1280),
    ("unet32_proj_2048x640x640", 2048, 640, 640),
    ("unet32_ff_in_2048x5120x640", 2048, 5120, 640),
    ("unet32_ff_out_2048x640x2560", 2048, 640, 2560),
    ("unet16_proj_512x1280x1280", 512, 1280, 1280),
    ("unet16_ff_in_512x10240x1280", 512, 10240, 1280),
    ("unet16_ff_out_512x1280x5120", 512, 1280, 5120),
    ("unet_cross_kv_154x640x768", 154, 640, 768),
    ("clip_mlp_154x3072x768", 154, 3072, 768),
    // The VAE decoder's 1x1 shortcuts at 512x512 (512 -> 256 at 256x256, 256 -> 128 at 512x512).
    ("vae_shortcut_65536x256x512", 65536, 256, 512),
    ("vae_shortcut_262144x128x256", 262144, 128, 256),
    ("square_4096", 4096, 4096, 4096),
    ("square_8192", 8192, 8192, 8192),
];

/// The LoRA training step's products at 512x512, batch 1 (M = tokens): forward Y = X·Wᵀ
/// (`_fwd`) and the frozen layers' input gradient dX = dY·W (`_dx`, B not transposed), at
/// each UNet level: (name, M, N, K, trans_b).
pub const TRAIN_MATMUL_CASES: [(&str, usize, usize, usize, bool); 16] = [
    ("train64_proj_fwd_4096x320x320", 4096, 320, 320, true),
    ("train64_qkv_fwd_4096x960x320", 4096, 960, 320, true),
    ("train64_ff_in_fwd_4096x2560x320", 4096, 2560, 320, true),
    ("train64_ff_out_fwd_4096x320x1280", 4096, 320, 1280, true),
    ("train64_proj_dx_4096x320x320", 4096, 320, 320, false),
    ("train64_qkv_dx_4096x320x960", 4096, 320, 960, false),
    ("train64_ff_in_dx_4096x320x2560", 4096, 320, 2560, false),
    ("train64_ff_out_dx_4096x1280x320", 4096, 1280, 320, false),
    ("train32_proj_fwd_1024x640x640", 1024, 640, 640, true),
    ("train32_ff_in_fwd_1024x5120x640", 1024, 5120, 640, true),
    ("train32_proj_dx_1024x640x640", 1024, 640, 640, false),
    ("train32_ff_in_dx_1024x640x5120", 1024, 640, 5120, false),
    ("train16_proj_fwd_256x1280x1280", 256, 1280, 1280, true),
    ("train16_ff_in_fwd_256x10240x1280", 256, 10240, 1280, true),
    ("train16_proj_dx_256x1280x1280", 256, 1280, 1280, false),
    ("train16_ff_in_dx_256x1280x10240", 256, 1280, 10240, false),
];

/// Runs every case whose name contains `filter`; prints each row as it goes unless `quiet`.
/// The cooperative-matrix matmul is timed with every tile of `CoopTile::ALL` at 8192³, and at
/// every case when `all_tiles` (for tuning the tile choice), as are the attention forward's
/// and backward's tiles. With `cold`, the matmul and convolution cases read their
/// weights from memory rather than the L2 cache (see [`Weights`]).
pub fn run_all(gpu: &Gpu, filter: Option<&str>, quiet: bool, all_tiles: bool, cold: bool) -> Result<Vec<BenchResult>> {
    let wanted = |name: &str| filter.is_none_or(|f| name.contains(f));
    let mut out = Vec::new();
    let mut emit = |r: BenchResult| {
        if !quiet {
            println!("{}", row(&r));
        }
        out.push(r);
    };
    let paths: Vec<KernelPath> = if gpu.caps.path == KernelPath::Coop {
        vec![KernelPath::Coop, KernelPath::Scalar]
    } else {
        vec![KernelPath::Scalar]
    };
    // A CPU adapter does ~4 GFLOP/s: keep its runs short.
    let slow = gpu.adapter.get_info().device_type == wgpu::DeviceType::Cpu;
    let cases = MATMUL_CASES.iter().map(|&(name, m, n, k)| (name, m, n, k, true)).chain(TRAIN_MATMUL_CASES);
    for (name, m, n, k, trans_b) in cases {
        let full = format!("matmul_{name}");
        if !wanted(&full) || (slow && m * n * k > 1 << 31) {
            continue;
        }
        let x = random_f16(gpu, &[m, k], 1, "bench x")?;
        let w = Weights::new(gpu, &[n * k], 2, "bench w", cold)?;
        let y = Tensor::empty(gpu, &[m, n], DType::F16, "bench y")?;
        let mut variants: Vec<(KernelPath, Option<CoopTile>)> = paths.iter().map(|&p| (p, None)).collect();
        if (all_tiles || name == "square_8192") && paths.contains(&KernelPath::Coop) {
            variants.extend(CoopTile::ALL.iter().map(|&t| (KernelPath::Coop, Some(t))));
        }
        for (path, tile) in variants {
            let mut mm = Matmul::new(m, n, k);
            mm.trans_b = trans_b;
            mm.path = Some(path);
            mm.tile = tile;
            for (label, ds) in unsplit_and_split(gpu, &mm, &x, &w, None, &y)? {
                emit(w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?));
            }
        }
        // The training cases again split over K (f32 partials, then their sum), for tuning
        // `Matmul::split`.
        if all_tiles && name.starts_with("train") {
            for s in [2, 4, 8] {
                let mut mm = Matmul::new(m, n, k);
                mm.trans_b = trans_b;
                mm.split_k = Some(s);
                if mm.split(gpu) < 2 || k % (16 * s) != 0 {
                    continue;
                }
                let ds = recorded_each(gpu, &mm, &x, &w, None, &y)?;
                let label = format!("split-K x{s} {}", ds[0].label);
                emit(w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?));
            }
        }
    }
    crate::bench_conv::run(gpu, &wanted, &mut emit, &paths, slow, all_tiles, cold)?;
    // Attention at SD-1.5 shapes on every path the device has (the VAE's d 512 runs the
    // scalar kernel on both: the label says which pipeline ran); with `all_tiles` every
    // cooperative-matrix tile the device can run (both shaders) after the launcher's.
    let attn_cases = [
        ("unet_64x64_self_2x8h_d40", Attention::new(2, 8, 4096, 4096, 40, false)),
        ("unet_64x64_cross_2x8h_d40", Attention::new(2, 8, 4096, 77, 40, false)),
        ("unet_32x32_self_2x8h_d80", Attention::new(2, 8, 1024, 1024, 80, false)),
        ("unet_16x16_self_2x8h_d160", Attention::new(2, 8, 256, 256, 160, false)),
        ("clip_causal_2x12h_d64", Attention::new(2, 12, 77, 77, 64, true)),
        ("vae_mid_64x64_d512", Attention::new(1, 1, 4096, 4096, 512, false)),
    ];
    for (name, a) in attn_cases {
        let full = format!("attention_{name}");
        if !wanted(&full) || (slow && a.lq * a.lk > 1 << 16) {
            continue;
        }
        let hd = a.heads * a.d;
        let q = random_f16(gpu, &[a.batch, a.lq, hd], 8, "bench q")?;
        let kv = random_f16(gpu, &[a.batch, a.lk, hd], 9, "bench kv")?;
        let o = Tensor::empty(gpu, &[a.batch, a.lq, hd], DType::F16, "bench o")?;
        for &path in &paths {
            let mut a = a;
            a.path = Some(path);
            let mut forced = vec![None];
            if let (true, (KernelPath::Coop, Some(auto))) = (all_tiles, a.plan(gpu)) {
                let dp = coop_dp(a.d) as u32;
                let (limit, sb) = (gpu.caps.limits.max_compute_workgroup_storage_size, gpu.caps.subgroup_barrier);
                forced.extend(AttentionTile::ALL.iter().filter(|t| **t != auto && t.usable(dp, limit, sb)).map(|&t| Some(t)));
            }
            for tile in forced {
                a.tile = tile;
                let d = a.prepare(gpu, Operand::dense(&q, hd), Operand::dense(&kv, hd), Operand::dense(&kv, hd), Operand::dense(&o, hd))?;
                emit(time_case(gpu, std::slice::from_ref(&d), full.clone(), format!("{path} {}", d.label), 2e11, slow)?);
            }
        }
    }
    // The attention backward at the training step's shapes (batch 1): the dq launch, and the
    // dk/dv launch (with its reduce when the queries are split), with the launcher's tiles;
    // with `all_tiles` every cooperative-matrix tile of each entry (the other entry keeps
    // the launcher's). The statistics launch runs once before (the kernels read them).
    let bwd_cases = [
        ("train_64x64_self_1x8h_d40", Attention::new(1, 8, 4096, 4096, 40, false)),
        ("train_64x64_cross_1x8h_d40", Attention::new(1, 8, 4096, 77, 40, false)),
        ("train_32x32_self_1x8h_d80", Attention::new(1, 8, 1024, 1024, 80, false)),
        ("train_16x16_self_1x8h_d160", Attention::new(1, 8, 256, 256, 160, false)),
        ("clip_causal_1x12h_d64", Attention::new(1, 12, 77, 77, 64, true)),
    ];
    for (name, a) in bwd_cases {
        let full = format!("attention_bwd_{name}");
        if !wanted(&full) || (slow && a.lq * a.lk > 1 << 16) {
            continue;
        }
        let hd = a.heads * a.d;
        let (qs, ks) = ([a.batch, a.lq, hd], [a.batch, a.lk, hd]);
        let (q, k, v) = (random_f16(gpu, &qs, 8, "bench q")?, random_f16(gpu, &ks, 9, "bench k")?, random_f16(gpu, &ks, 10, "bench v")?);
        let (o, dout) = (random_f16(gpu, &qs, 11, "bench o")?, random_f16(gpu, &qs, 12, "bench dout")?);
        let dq = Tensor::empty(gpu, &qs, DType::F16, "bench dq")?;
        let (dk, dv) = (Tensor::empty(gpu, &ks, DType::F16, "bench dk")?, Tensor::empty(gpu, &ks, DType::F16, "bench dv")?);
        let op = |t| Operand::dense(t, hd);
        let grads = AttentionGrads { q: op(&q), k: op(&k), v: op(&v), o: op(&o), dout: op(&dout), dq: op(&dq), dk: op(&dk), dv: op(&dv) };
        for &path in &paths {
            let a = Attention { path: Some(path), ..a };
            // One backward (and statistics scratch) per shape; the forced tiles replace its choice.
            let mut bw = AttentionBackward::new(gpu, a)?;
            let mut forced = vec![None];
            if let (true, Some((aq, ak))) = (all_tiles, bw.plan(gpu).1) {
                let dp = crate::kernels::attention::coop_dp(a.d) as u32;
                let (limit, sb) = (gpu.caps.limits.max_compute_workgroup_storage_size, gpu.caps.subgroup_barrier);
                for &t in &BwdTile::ALL {
                    if t.usable(CoopEntry::Dq, dp, limit, sb) && t != aq {
                        forced.push(Some((t, ak)));
                    }
                    if t.usable(CoopEntry::Dkv, dp, limit, sb) && t != ak {
                        forced.push(Some((aq, t)));
                    }
                }
            }
            for tiles in forced {
                bw.tiles = tiles;
                let ds = bw.prepare(gpu, &grads)?;
                gpu.run_now(&ds[0])?;
                emit(time_case(gpu, &ds[1..2], full.clone(), format!("{path} dq {}", ds[1].label), 2e11, slow)?);
                emit(time_case(gpu, &ds[2..], full.clone(), format!("{path} dkv {}", ds[2].label), 2e11, slow)?);
            }
        }
    }
    // Elementwise at 64 MiB of f16 input (32 Mi elements; 2 MiB on a CPU adapter).
    let n = if slow { 1 << 20 } else { 32 << 20 };
    let mib = (n * 2) >> 20;
    let stems = ["copy_f16", "silu_f16", "gelu_f16", "add_f16", "mul_f16", "cast_f16_f32"];
    if !stems.iter().any(|s| wanted(&format!("elementwise_{s}_{mib}MiB"))) {
        return Ok(out);
    }
    let a = random_f16(gpu, &[n], 3, "bench a")?;
    let b = random_f16(gpu, &[n], 4, "bench b")?;
    let y16 = Tensor::empty(gpu, &[n], DType::F16, "bench y16")?;
    let y32 = Tensor::empty(gpu, &[n], DType::F32, "bench y32")?;
    // In the order of `stems`.
    let cases = [
        elementwise::unary(gpu, Unary::Copy, &a, &y16)?,
        elementwise::unary(gpu, Unary::Silu, &a, &y16)?,
        elementwise::unary(gpu, Unary::Gelu, &a, &y16)?,
        elementwise::binary(gpu, Binary::Add { alpha: 1.0 }, &a, &b, &y16)?,
        elementwise::binary(gpu, Binary::Mul { alpha: 1.0 }, &a, &b, &y16)?,
        elementwise::cast(gpu, &a, &y32)?,
    ];
    for (stem, d) in stems.iter().zip(cases) {
        let full = format!("elementwise_{stem}_{mib}MiB");
        if !wanted(&full) {
            continue;
        }
        let s = time_dispatch(gpu, std::slice::from_ref(&d), if slow { 2 } else { 100 }, if slow { 1 } else { 5 })?;
        emit(BenchResult { name: full, path: d.label.to_string(), ms: s * 1e3, tflops: 0.0, gbs: d.bytes / s / 1e9 });
    }
    Ok(out)
}

/// One table row.
pub fn row(r: &BenchResult) -> String {
    let rate = if r.tflops >= 1.0 {
        format!("{:8.1} TFLOP/s", r.tflops)
    } else if r.tflops > 0.0 {
        format!("{:8.2} GFLOP/s", r.tflops * 1e3)
    } else {
        format!("{:8.0} GB/s   ", r.gbs)
    };
    format!("{:<42} {:>10.3} ms {}  {}", r.name, r.ms, rate, r.path)
}

/// `bench --pipeline-stats`: what the driver reports of every pipeline `gpu` has made so far,
/// one line each (a JSON object each with `json`); with `ir_dir` its internal representations,
/// where it shares any, as text files there (named after the pipeline's label).
pub fn print_pipeline_stats(gpu: &Gpu, ir_dir: Option<&std::path::Path>, json: bool) -> Result<()> {
    let name = gpu.adapter.get_info().name;
    let reports = crate::gpu::driver_stats::pipeline_statistics(&name, &gpu.pipeline_keys(), ir_dir.is_some())?;
    if !json {
        println!("\ndriver statistics of {} pipelines ({name}):", reports.len());
    }
    for r in &reports {
        if json {
            let stats: serde_json::Map<String, serde_json::Value> =
                r.statistics.iter().map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone()))).collect();
            let o = serde_json::json!({ "pipeline": r.pipeline, "executable": r.executable, "subgroup_size": r.subgroup_size, "statistics": stats });
            println!("{o}");
        } else {
            let stats: Vec<String> = r.statistics.iter().map(|(k, v)| format!("{k} {v}")).collect();
            println!("{}  [{}, subgroup {}]  {}", r.pipeline, r.executable, r.subgroup_size, stats.join(", "));
        }
    }
    let Some(dir) = ir_dir else { return Ok(()) };
    std::fs::create_dir_all(dir).map_err(|e| crate::error::Error::io(dir, e))?;
    let mut written = 0;
    for r in &reports {
        let stem: String = r.pipeline.chars().map(|c| if c.is_ascii_alphanumeric() || c == '.' || c == '=' { c } else { '_' }).collect();
        for (i, (kind, text)) in r.representations.iter().enumerate() {
            let file = dir.join(format!("{stem}.{i}.txt"));
            std::fs::write(&file, format!("{} / {} / {kind}\n{text}\n", r.pipeline, r.executable))
                .map_err(|e| crate::error::Error::io(&file, e))?;
            written += 1;
        }
    }
    if !json {
        println!("{written} internal representations written to {}", dir.display());
    }
    Ok(())
}
