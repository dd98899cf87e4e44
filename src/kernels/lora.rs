//! Launchers for `shaders/lora.wgsl`: inverted dropout with a regenerated mask (LoRA forward
//! and backward), and the optimizer step over the flat f32 LoRA parameter buffer (sum of
//! squares of the gradients in two deterministic passes, then AdamW with the global-norm
//! clip). All memory-bound: no flops counted. The CPU mirror of the dropout hash
//! ([`dropout_keep`]) is what the tests compare the GPU mask with.

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in lora.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct LoraKernelParams {
    pub numel: u32,
    pub salt: u32,
    pub threshold: u32,
    pub scale: f32,
    pub parts: u32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Flat elements one `sumsq` workgroup reduces.
pub const SUMSQ_CHUNK: usize = 4096;

/// Words of the `hyper` buffer (see lora.wgsl and `model::lora::hyper_words`).
pub const HYPER_WORDS: usize = 16;

/// The pipeline key of an entry (`ACCUMULATE` only matters to `dropout`).
pub fn key(entry: &'static str, accumulate: bool) -> PipelineKey {
    let k = PipelineKey::new(Shader::Lora, entry);
    if entry == "dropout" { k.with("ACCUMULATE", accumulate as i64) } else { k }
}

/// Every variant, for the shader tests.
pub fn variants() -> Vec<PipelineKey> {
    vec![key("dropout", false), key("dropout", true), key("sumsq", false), key("norm_final", false), key("adamw", false)]
}

/// The 32-bit hash of lora.wgsl (`mix32`, Wellons' lowbias32).
pub fn mix32(x: u32) -> u32 {
    let mut h = x;
    h ^= h >> 16;
    h = h.wrapping_mul(0x7feb_352d);
    h ^= h >> 15;
    h = h.wrapping_mul(0x846c_a68b);
    h ^= h >> 16;
    h
}

/// The drop threshold of probability `p`: element i is dropped when its 24-bit random value
/// is below round(p·2^24), so the keep rate is 1 - threshold/2^24 (p to within 3e-8).
pub fn dropout_threshold(p: f32) -> u32 {
    (p.clamp(0.0, 1.0) as f64 * (1u64 << 24) as f64).round() as u32
}

/// Whether element `i` of the layer stream `salt` is kept under step seed `seed` (the CPU
/// mirror of lora.wgsl's `keep_factor`).
pub fn dropout_keep(seed: u64, salt: u32, i: u32, threshold: u32) -> bool {
    let key = mix32(seed as u32 ^ mix32((seed >> 32) as u32 ^ mix32(salt)));
    (mix32(mix32(i ^ key).wrapping_add(key)) >> 8) >= threshold
}

/// y = mask·x/(1-p) (or y += with `accumulate`), x and y f16 of the same length; the mask
/// from the seed in `hyper` (words 0, 1) and the layer's `salt`.
pub fn dropout(gpu: &Gpu, x: &Tensor, y: &Tensor, hyper: &Tensor, salt: u32, p: f32, accumulate: bool) -> Result<Dispatch> {
    let n = x.numel();
    if x.dtype != DType::F16 || y.dtype != DType::F16 {
        return Err(Error::DType { op: "lora dropout".into(), detail: "x and y must be f16".into() });
    }
    if y.numel() != n || n == 0 || n > (u32::MAX as usize) - 8 || hyper.numel() < HYPER_WORDS {
        return Err(Error::shape("lora dropout", format!("x {:?}, y {:?}, hyper {:?}", x.shape, y.shape, hyper.shape)));
    }
    if !(0.0..1.0).contains(&p) {
        return Err(Error::Usage(format!("lora dropout: probability {p} must be in [0, 1)")));
    }
    let params = LoraKernelParams {
        numel: n as u32,
        salt,
        threshold: dropout_threshold(p),
        scale: (1.0 / (1.0 - p as f64)) as f32,
        ..Default::default()
    };
    let bytes = (n * 2 * (2 + accumulate as usize)) as f64;
    gpu.dispatch(&key("dropout", accumulate), &params, &[x, y, hyper], grid(n.div_ceil(8)), 0.0, bytes)
}

fn check_flat(op: &str, t: &Tensor, numel: usize, dtype: DType) -> Result<()> {
    if t.dtype != dtype {
        return Err(Error::DType { op: op.into(), detail: format!("{:?} must be {dtype}", t.shape) });
    }
    if t.numel() != numel {
        return Err(Error::shape(op, format!("{:?} must hold {numel} values", t.shape)));
    }
    Ok(())
}

/// Partial sums `sumsq` writes for a flat buffer of `numel` values.
pub fn sumsq_parts(numel: usize) -> usize {
    numel.div_ceil(SUMSQ_CHUNK)
}

/// The three launches of an optimizer step over flat f32 buffers of `numel` values (a
/// multiple of 4): the partial sums of squares of `grads` into `partials`
/// ([`sumsq_parts`]), their total into `stats` (f32 `[4]`: norm, clip coefficient, sum of
/// squares, 0), then AdamW over `params`, `m`, `v` with the clipped gradients, writing the
/// f16 copies `params16` and zeroing `grads`. Hyper-parameters come from `hyper`.
#[allow(clippy::too_many_arguments)]
pub fn adamw_step(
    gpu: &Gpu,
    params: &Tensor,
    grads: &Tensor,
    m: &Tensor,
    v: &Tensor,
    params16: &Tensor,
    partials: &Tensor,
    stats: &Tensor,
    hyper: &Tensor,
) -> Result<Vec<Dispatch>> {
    let op = "lora adamw";
    let n = params.numel();
    if n == 0 || !n.is_multiple_of(4) || n > (u32::MAX as usize) - 8 {
        return Err(Error::shape(op, format!("flat parameter buffer of {n} values (a positive multiple of 4)")));
    }
    for t in [grads, m, v] {
        check_flat(op, t, n, DType::F32)?;
    }
    check_flat(op, params, n, DType::F32)?;
    check_flat(op, params16, n, DType::F16)?;
    let parts = sumsq_parts(n);
    check_flat(op, partials, parts, DType::F32)?;
    check_flat(op, stats, 4, DType::F32)?;
    if hyper.numel() < HYPER_WORDS {
        return Err(Error::shape(op, format!("hyper {:?} must hold {HYPER_WORDS} words", hyper.shape)));
    }
    if parts > gpu.caps.limits.max_compute_workgroups_per_dimension as usize {
        return Err(Error::shape(op, format!("{n} LoRA parameters: over the one-dimensional sum-of-squares grid")));
    }
    let p = LoraKernelParams { numel: n as u32, parts: parts as u32, ..Default::default() };
    let sumsq = gpu.dispatch(&key("sumsq", false), &p, &[grads, partials], [parts as u32, 1, 1], 0.0, (n * 4) as f64)?;
    let fin = gpu.dispatch(&key("norm_final", false), &p, &[partials, stats, hyper], [1, 1, 1], 0.0, (parts * 4) as f64)?;
    let adam = gpu.dispatch(
        &key("adamw", false),
        &p,
        &[stats, params, hyper, grads, m, v, params16],
        grid(n / 4),
        0.0,
        (n * (4 * 8 + 2)) as f64,
    )?;
    Ok(vec![sumsq, fin, adam])
}
