//! Launchers for `shaders/grad_ops.wgsl`: the backward kernels of the UNet's small ops
//! (SiLU / GELU / quick-GELU, GEGLU, nearest upsample, channel concat) and the MSE training
//! loss with its gradient. All memory-bound: each declares the bytes it reads and writes.
//!
//! Dtypes: the saved forward inputs (x, pred, target) are f16, as the forward stores them.
//! Activation gradients are f16 or f32, chosen per launch by the gradient tensors' dtype (dy
//! and dx must agree): f16 is the training default, the dtype the activations have and that
//! the matmul dX kernels read, so no cast sits between launches; with f16 gradients use loss
//! scaling (`scale` in [`mse_loss`]): the unscaled dpred = 2(pred - target)/n is about 1e-4 at
//! SD's 2x4x64x64, near f16's smallest normal (6.1e-5). f32 gradients are there for checks
//! and for small, precision-sensitive stretches. The loss and its reduction are f32.
//! Activation gradients overwrite their output; concat backward can add into its outputs
//! (skip streams, whose source also gets gradient from elsewhere).

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in grad_ops.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct GradOpsParams {
    pub n: u32,
    pub c1: u32,
    pub c2: u32,
    pub op: u32,
    pub h: u32,
    pub w: u32,
    pub oh: u32,
    pub ow: u32,
    pub alpha: f32,
    pub flags: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Elements per workgroup of the MSE's first stage (`CHUNK` in the shader).
pub const MSE_CHUNK: usize = 4096;

/// The activations whose backward [`activation_backward`] computes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    /// x·sigmoid(x).
    Silu,
    /// The exact (erf) GELU, as torch's default and diffusers' GEGLU.
    Gelu,
    /// x·sigmoid(1.702x), CLIP's activation.
    QuickGelu,
}

impl Activation {
    pub const ALL: [Activation; 3] = [Activation::Silu, Activation::Gelu, Activation::QuickGelu];

    fn code(self) -> u32 {
        match self {
            Activation::Silu => 0,
            Activation::Gelu => 1,
            Activation::QuickGelu => 2,
        }
    }
}

/// Where a gradient goes: overwritten (`=`) or added into (`+=`).
#[derive(Clone, Copy, Debug)]
pub struct GradOut<'a> {
    pub tensor: &'a Tensor,
    pub add: bool,
}

impl<'a> GradOut<'a> {
    /// The gradient overwrites `t`.
    pub fn set(t: &'a Tensor) -> Self {
        GradOut { tensor: t, add: false }
    }

    /// The gradient is added into `t` (a skip or residual stream).
    pub fn add(t: &'a Tensor) -> Self {
        GradOut { tensor: t, add: true }
    }
}

/// The pipeline key of an entry point for gradients of `grad` dtype.
pub fn key(entry: &'static str, grad: DType) -> PipelineKey {
    PipelineKey::new(Shader::GradOps, entry).with("GRAD_F32", (grad == DType::F32) as i64)
}

/// Every entry point and variant, for the shader tests.
pub fn variants() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for entry in ["act_bwd", "geglu_bwd", "upsample_bwd", "slice_cols", "mse_partial", "mse_final"] {
        for g in [DType::F16, DType::F32] {
            keys.push(key(entry, g));
        }
    }
    keys
}

fn need(op: &str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::shape(op, detail())) }
}

fn dtype(op: &str, ok: bool, detail: &str) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::DType { op: op.into(), detail: detail.into() }) }
}

/// The gradient tensors' shared dtype; the saved inputs must be f16.
fn grad_dtype(op: &str, saved: &[&Tensor], grads: &[&Tensor]) -> Result<DType> {
    dtype(op, saved.iter().all(|t| t.dtype == DType::F16), "saved inputs must be f16")?;
    let g = grads[0].dtype;
    dtype(op, grads.iter().all(|t| t.dtype == g), "gradients must share one dtype (f16 or f32)")?;
    Ok(g)
}

/// Outputs may not share storage with inputs (wgpu tracks usage per buffer).
fn distinct(op: &str, outs: &[&Tensor], ins: &[&Tensor]) -> Result<()> {
    for o in outs {
        for i in ins {
            need(op, !o.overlaps(i), || "an output shares storage with an input".into())?;
        }
    }
    Ok(())
}

fn count(op: &str, n: usize) -> Result<u32> {
    need(op, n > 0 && n < (u32::MAX as usize) - 8, || format!("{n} elements: must be 1 .. 2^32"))?;
    Ok(n as u32)
}

/// dx = dy · f'(x) elementwise, from the saved forward input x (f16); dy and dx of one dtype
/// (f16 or f32) and as many elements as x (any count).
pub fn activation_backward(gpu: &Gpu, act: Activation, x: &Tensor, dy: &Tensor, dx: &Tensor) -> Result<Dispatch> {
    let op = "activation backward";
    let g = grad_dtype(op, &[x], &[dy, dx])?;
    let n = x.numel();
    need(op, dy.numel() == n && dx.numel() == n, || format!("x {:?}, dy {:?}, dx {:?}", x.shape, dy.shape, dx.shape))?;
    distinct(op, &[dx], &[x, dy])?;
    let p = GradOpsParams { n: count(op, n)?, op: act.code(), ..Default::default() };
    let bytes = (n * (2 + 2 * g.size())) as f64;
    gpu.dispatch(&key("act_bwd", g), &p, &[x, dx, dy], grid(n.div_ceil(2)), 0.0, bytes)
}

/// GEGLU backward (diffusers' `GEGLU`: x = [a | g] [rows, 2f], y = a·gelu(g)): from the saved
/// x (f16) and dy [rows, f], writes dx [rows, 2f] = [dy·gelu(g) | dy·a·gelu'(g)]; f even.
pub fn geglu_backward(gpu: &Gpu, x: &Tensor, dy: &Tensor, dx: &Tensor, rows: usize, f: usize) -> Result<Dispatch> {
    let op = "geglu backward";
    let g = grad_dtype(op, &[x], &[dy, dx])?;
    need(op, f.is_multiple_of(2) && x.numel() == rows * 2 * f && dx.numel() == rows * 2 * f && dy.numel() == rows * f, || {
        format!("x {:?}, dy {:?}, dx {:?} for {rows} rows, f {f} (even)", x.shape, dy.shape, dx.shape)
    })?;
    distinct(op, &[dx], &[x, dy])?;
    let n = rows * f;
    let p = GradOpsParams { n: count(op, n)?, c1: f as u32, ..Default::default() };
    let bytes = (n * (4 + 3 * g.size())) as f64;
    gpu.dispatch(&key("geglu_bwd", g), &p, &[x, dx, dy], grid(n / 2), 0.0, bytes)
}

/// Backward of [`crate::kernels::tensor_ops::upsample2x`]: dx [batch, h, w, c] = the sum of
/// each input pixel's four output gradients in dy [batch, 2h, 2w, c]; c even.
pub fn upsample2x_backward(gpu: &Gpu, dy: &Tensor, dx: &Tensor, batch: usize, h: usize, w: usize, c: usize) -> Result<Dispatch> {
    upsample_nearest_backward(gpu, dy, dx, batch, (h, w), (2 * h, 2 * w), c)
}

/// Backward of [`crate::kernels::tensor_ops::upsample_nearest`] to the size (oh, ow): each
/// input pixel of dx [batch, h, w, c] gathers the output gradients of dy [batch, oh, ow, c]
/// that copied it (source pixel floor(o·in/out)); deterministic, no atomics; c even.
pub fn upsample_nearest_backward(gpu: &Gpu, dy: &Tensor, dx: &Tensor, batch: usize, (h, w): (usize, usize), (oh, ow): (usize, usize), c: usize) -> Result<Dispatch> {
    let op = "upsample backward";
    let g = grad_dtype(op, &[], &[dy, dx])?;
    let n = batch * h * w * c;
    let on = batch * oh * ow * c;
    need(op, c.is_multiple_of(2) && h > 0 && w > 0 && oh >= h && ow >= w && dx.numel() == n && dy.numel() == on, || {
        format!("dy {:?} [{batch}, {oh}, {ow}, {c}] to dx {:?} [{batch}, {h}, {w}, {c}]: C even, the output no smaller", dy.shape, dx.shape)
    })?;
    count(op, on)?;
    distinct(op, &[dx], &[dy])?;
    let p = GradOpsParams {
        n: count(op, n)?,
        c1: c as u32,
        h: h as u32,
        w: w as u32,
        oh: oh as u32,
        ow: ow as u32,
        ..Default::default()
    };
    gpu.dispatch(&key("upsample_bwd", g), &p, &[dy, dx], grid(n / 2), 0.0, ((n + on) * g.size()) as f64)
}

/// dst [rows, cols] (=, or += with `dst.add`) columns `first .. first + cols` of src
/// [rows, ld]; cols, first and ld even. The building block of [`concat_backward`].
pub fn slice_cols(gpu: &Gpu, src: &Tensor, dst: GradOut, rows: usize, first: usize, cols: usize, ld: usize) -> Result<Dispatch> {
    let op = "column slice";
    let t = dst.tensor;
    let g = grad_dtype(op, &[], &[src, t])?;
    need(op, cols.is_multiple_of(2) && first.is_multiple_of(2) && ld.is_multiple_of(2) && first + cols <= ld && src.numel() == rows * ld && t.numel() == rows * cols, || {
        format!("columns {first}..{} of src {:?} [{rows}, {ld}] to {:?} (even counts)", first + cols, src.shape, t.shape)
    })?;
    distinct(op, &[t], &[src])?;
    let n = rows * cols;
    let p = GradOpsParams { n: count(op, n)?, c1: cols as u32, c2: first as u32, w: ld as u32, flags: dst.add as u32, ..Default::default() };
    let bytes = (n * g.size() * (2 + dst.add as usize)) as f64;
    gpu.dispatch(&key("slice_cols", g), &p, &[src, t], grid(n / 2), 0.0, bytes)
}

/// Backward of [`crate::kernels::tensor_ops::concat`]: splits dy [rows, c1 + c2] into da
/// [rows, c1] and db [rows, c2], each overwritten or added into (a skip connection's source
/// also gets gradient from its own consumer); c1, c2 even. Two launches, run in order.
pub fn concat_backward(gpu: &Gpu, dy: &Tensor, da: GradOut, db: GradOut, rows: usize, c1: usize, c2: usize) -> Result<[Dispatch; 2]> {
    need("concat backward", !da.tensor.overlaps(db.tensor), || "da and db share storage".into())?;
    let a = slice_cols(gpu, dy, da, rows, 0, c1, c1 + c2)?;
    let b = slice_cols(gpu, dy, db, rows, c1, c2, c1 + c2)?;
    Ok([a, b])
}

/// f32 elements of the partial sums buffer [`mse_loss`] needs for n elements.
pub fn mse_partials(n: usize) -> usize {
    n.div_ceil(MSE_CHUNK)
}

/// The MSE loss and its gradient in two launches (run in order):
/// loss (f32 [1]) = mean((pred - target)²) and dpred = scale·2·(pred - target)/n (`scale` for
/// loss scaling; 1.0 for the plain gradient). pred and target f16 of n elements (any n);
/// dpred f16 or f32; partials f32 with at least [`mse_partials`]`(n)` elements. The sum runs
/// in f32 in a fixed order (4096-element chunks, then one tree), so it is deterministic.
pub fn mse_loss(gpu: &Gpu, pred: &Tensor, target: &Tensor, dpred: &Tensor, partials: &Tensor, loss: &Tensor, scale: f32) -> Result<[Dispatch; 2]> {
    let op = "MSE loss";
    let g = grad_dtype(op, &[pred, target], &[dpred])?;
    dtype(op, partials.dtype == DType::F32 && loss.dtype == DType::F32, "partials and loss must be f32")?;
    let n = pred.numel();
    let parts = mse_partials(n);
    need(op, target.numel() == n && dpred.numel() == n && partials.numel() >= parts && loss.numel() == 1, || {
        format!("pred {:?}, target {:?}, dpred {:?}, partials {:?} (>= {parts}), loss {:?} ([1])", pred.shape, target.shape, dpred.shape, partials.shape, loss.shape)
    })?;
    distinct(op, &[dpred, partials, loss], &[pred, target])?;
    distinct(op, &[dpred, loss], &[partials])?;
    let p1 = GradOpsParams { n: count(op, n)?, alpha: (2.0 * scale as f64 / n as f64) as f32, ..Default::default() };
    let stage1 = gpu.dispatch(&key("mse_partial", g), &p1, &[pred, dpred, target, partials], grid(parts * 256), 0.0, (n * (4 + g.size()) + parts * 4) as f64)?;
    let p2 = GradOpsParams { n: parts as u32, alpha: (1.0 / n as f64) as f32, ..Default::default() };
    let stage2 = gpu.dispatch(&key("mse_final", g), &p2, &[partials, loss], [1, 1, 1], 0.0, (parts * 4 + 4) as f64)?;
    Ok([stage1, stage2])
}
