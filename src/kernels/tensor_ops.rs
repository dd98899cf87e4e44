//! Launchers for `shaders/tensor_ops.wgsl`: nearest 2x upsample and channel concat over
//! channels-last images, GEGLU, the sinusoidal timestep embedding and the token + position
//! embedding. All move bytes, not flops: each declares the bytes it reads and writes.

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in tensor_ops.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct TensorOpsParams {
    pub words: u32,
    pub c1: u32,
    pub c2: u32,
    pub h: u32,
    pub w: u32,
    pub shift: f32,
    pub oh: u32,
    pub ow: u32,
}

fn key(entry: &'static str) -> PipelineKey {
    PipelineKey::new(Shader::TensorOps, entry)
}

fn need(op: &str, ok: bool, detail: impl FnOnce() -> String) -> Result<()> {
    if ok { Ok(()) } else { Err(Error::shape(op, detail())) }
}

fn f16s(op: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.dtype != DType::F16) {
        return Err(Error::DType { op: op.into(), detail: "tensors must be f16".into() });
    }
    Ok(())
}

fn words(op: &str, n: usize) -> Result<u32> {
    need(op, n > 0 && n.is_multiple_of(2) && n < u32::MAX as usize, || format!("{n} output elements: must be even and under 2^32"))?;
    Ok((n / 2) as u32)
}

/// y [batch, 2h, 2w, c] = nearest 2x upsample of x [batch, h, w, c]; c even.
pub fn upsample2x(gpu: &Gpu, x: &Tensor, y: &Tensor, batch: usize, h: usize, w: usize, c: usize) -> Result<Dispatch> {
    upsample_nearest(gpu, x, y, batch, (h, w), (2 * h, 2 * w), c)
}

/// y [batch, oh, ow, c] = nearest upsample of x [batch, h, w, c] to the size (oh, ow), each
/// output pixel taking source pixel floor(o·in/out) as torch's `interpolate(size=..)` does
/// (the UNet's upsamplers at latent sizes that do not halve evenly); c even.
pub fn upsample_nearest(gpu: &Gpu, x: &Tensor, y: &Tensor, batch: usize, (h, w): (usize, usize), (oh, ow): (usize, usize), c: usize) -> Result<Dispatch> {
    let op = "upsample";
    f16s(op, &[x, y])?;
    let n = batch * h * w * c;
    let on = batch * oh * ow * c;
    need(op, c.is_multiple_of(2) && x.numel() == n && y.numel() == on && oh >= h && ow >= w && h > 0 && w > 0, || {
        format!("x {:?} [{batch}, {h}, {w}, {c}] to y {:?} [{batch}, {oh}, {ow}, {c}]: C even, the output no smaller", x.shape, y.shape)
    })?;
    let p = TensorOpsParams {
        words: words(op, on)?,
        c1: c as u32,
        h: h as u32,
        w: w as u32,
        oh: oh as u32,
        ow: ow as u32,
        ..Default::default()
    };
    gpu.dispatch(&key("upsample2x"), &p, &[x, y], grid(on / 2), 0.0, ((n + on) * 2) as f64)
}

/// y [rows, c1 + c2] = concat(a [rows, c1], b [rows, c2]) along channels; c1, c2 even.
pub fn concat(gpu: &Gpu, a: &Tensor, b: &Tensor, y: &Tensor, rows: usize, c1: usize, c2: usize) -> Result<Dispatch> {
    let op = "concat";
    f16s(op, &[a, b, y])?;
    need(op, c1.is_multiple_of(2) && c2.is_multiple_of(2) && a.numel() == rows * c1 && b.numel() == rows * c2 && y.numel() == rows * (c1 + c2), || {
        format!("a {:?}, b {:?}, y {:?} for {rows} rows of {c1} + {c2} channels (even counts)", a.shape, b.shape, y.shape)
    })?;
    let n = rows * (c1 + c2);
    let p = TensorOpsParams { words: words(op, n)?, c1: c1 as u32, c2: c2 as u32, ..Default::default() };
    gpu.dispatch(&key("concat"), &p, &[a, y, b], grid(n / 2), 0.0, (n * 4) as f64)
}

/// y [rows, f] = x[:, :f] · GELU(x[:, f:]) for x [rows, 2f] (diffusers' GEGLU); f even.
pub fn geglu(gpu: &Gpu, x: &Tensor, y: &Tensor, rows: usize, f: usize) -> Result<Dispatch> {
    let op = "geglu";
    f16s(op, &[x, y])?;
    need(op, f.is_multiple_of(2) && x.numel() == rows * 2 * f && y.numel() == rows * f, || format!("x {:?}, y {:?} for {rows} rows, f {f}", x.shape, y.shape))?;
    let n = rows * f;
    let p = TensorOpsParams { words: words(op, n)?, c1: f as u32, ..Default::default() };
    gpu.dispatch(&key("geglu"), &p, &[x, y], grid(n / 2), 0.0, (n * 6) as f64)
}

/// y [batch, dim] = the sinusoidal embedding of timesteps t (f32 [batch]), cos half first
/// (diffusers' `Timesteps(dim, flip_sin_to_cos=True, downscale_freq_shift=shift)`); dim even.
pub fn timestep_embedding(gpu: &Gpu, t: &Tensor, y: &Tensor, dim: usize, shift: f32) -> Result<Dispatch> {
    let op = "timestep embedding";
    need(op, t.dtype == DType::F32 && y.dtype == DType::F16, || "t must be f32, y f16".into())?;
    let batch = t.numel();
    need(op, dim.is_multiple_of(2) && dim >= 4 && y.numel() == batch * dim, || format!("t {:?}, y {:?}, dim {dim}", t.shape, y.shape))?;
    let n = batch * dim;
    let p = TensorOpsParams { words: words(op, n)?, c1: dim as u32, shift, ..Default::default() };
    gpu.dispatch(&key("timestep"), &p, &[t, y], grid(n / 2), 0.0, (n * 2) as f64)
}

/// y [batch, len, d] = tok[ids] + pos[:len]: ids are u32 token ids stored in a 4-byte tensor
/// [batch, len] (see [`upload_ids`]), tok [vocab, d], pos [≥ len, d] f16; d even.
pub fn embed(gpu: &Gpu, ids: &Tensor, tok: &Tensor, pos: &Tensor, y: &Tensor, len: usize) -> Result<Dispatch> {
    let op = "embedding";
    f16s(op, &[tok, pos, y])?;
    need(op, tok.shape.len() == 2 && len > 0, || format!("token table {:?}", tok.shape))?;
    let (vocab, d) = (tok.shape[0], tok.shape[1]);
    let batch = ids.numel() / len;
    need(op, ids.dtype == DType::F32 && ids.numel() == batch * len && d % 2 == 0 && pos.numel() >= len * d && y.numel() == batch * len * d, || {
        format!("ids {:?}, tok {:?}, pos {:?}, y {:?}, len {len}", ids.shape, tok.shape, pos.shape, y.shape)
    })?;
    let n = batch * len * d;
    let p = TensorOpsParams { words: words(op, n)?, c1: d as u32, h: len as u32, w: vocab as u32, ..Default::default() };
    gpu.dispatch(&key("embed"), &p, &[ids, y, tok, pos], grid(n / 2), 0.0, (n * 6) as f64)
}

/// The entry points, for the shader tests (none has override constants).
pub const ENTRIES: [&str; 6] = ["upsample2x", "concat", "geglu", "timestep", "embed", "softmax_rows"];

/// P [rows, ld] f16 = softmax over each row of S [rows, cols] f32 (in f32), columns cols..ld
/// of P zero; ld even, at least cols. One workgroup per row.
pub fn softmax_rows(gpu: &Gpu, s: &Tensor, p: &Tensor, rows: usize, cols: usize, ld: usize) -> Result<Dispatch> {
    let op = "softmax rows";
    need(op, s.dtype == DType::F32 && p.dtype == DType::F16, || "S must be f32, P f16".into())?;
    need(op, rows > 0 && cols > 0 && ld >= cols && ld.is_multiple_of(2) && s.numel() >= rows * cols && p.numel() >= rows * ld, || {
        format!("S {:?} to P {:?}: {rows} rows of {cols} (P's row stride {ld}: even, at least {cols})", s.shape, p.shape)
    })?;
    need(op, rows * ld < u32::MAX as usize && rows * cols < u32::MAX as usize, || "over 2^32 elements".into())?;
    let params = TensorOpsParams { c1: cols as u32, c2: ld as u32, h: rows as u32, ..Default::default() };
    let bytes = (rows * (4 * cols + 2 * ld)) as f64;
    gpu.dispatch(&key("softmax_rows"), &params, &[s, p], grid(rows * 256), 0.0, bytes)
}

/// Uploads token ids as raw u32 words in a 4-byte tensor (DType::F32 storage, bit patterns
/// are ids), the form [`embed`] reads.
pub fn upload_ids(gpu: &Gpu, ids: &[u32], shape: &[usize]) -> Result<Tensor> {
    let t = Tensor::empty(gpu, shape, DType::F32, "token ids")?;
    if t.numel() != ids.len() {
        return Err(Error::shape("token ids", format!("{} ids for shape {shape:?}", ids.len())));
    }
    gpu.queue.write_buffer(&t.buffer, t.offset, bytemuck::cast_slice(ids));
    Ok(t)
}
