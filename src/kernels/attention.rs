//! Launcher for `shaders/attention.wgsl`: scaled-dot-product attention
//! o = softmax(q·kᵀ·scale [+ causal mask])·v per (batch, head), flash-attention style (key
//! blocks through workgroup memory, online softmax in f32), never materialising the scores.
//! Scalar path: f16 tensors read as packed words, no shader-f16.
//!
//! Operands are token-major: q [batch, lq, heads·d], k and v [batch, lk, heads·d], o [batch,
//! lq, heads·d], each an [`Operand`]: a tensor, the element offset of its first value and its
//! row stride in elements, so q, k and v may be column slices of one fused qkv tensor
//! [batch, l, 3·heads·d] (offsets 0, heads·d, 2·heads·d; stride 3·heads·d).
//! Flops: 4·batch·heads·d per visible (query, key) pair (2 for q·kᵀ, 2 for p·v); bytes: q, k, v
//! read once and o written once.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in attention.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionParams {
    pub batch: u32,
    pub heads: u32,
    pub lq: u32,
    pub lk: u32,
    pub d: u32,
    pub causal: u32,
    pub bq: u32,
    pub bk: u32,
    pub ldq: u32,
    pub ldk: u32,
    pub ldv: u32,
    pub ldo: u32,
    pub off_q: u32,
    pub off_k: u32,
    pub off_v: u32,
    pub off_o: u32,
    pub scale: f32,
    pub _pad0: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Largest head dimension the shader takes (SD-1.5's VAE mid-block attention, one head).
pub const MAX_D: usize = 512;

/// The pipeline the launcher uses (one variant: tile sizes travel in the uniform).
pub fn key() -> PipelineKey {
    PipelineKey::new(Shader::Attention, "attn")
}

/// One attention operand: `tensor` holds element (b, i, c) (batch b, token i, column c of
/// heads·d) at `offset + (b·l + i)·ld + c`. Offset and stride must be multiples of 8.
#[derive(Clone, Copy, Debug)]
pub struct Operand<'a> {
    pub tensor: &'a Tensor,
    /// Element offset of (0, 0, 0).
    pub offset: usize,
    /// Row stride in elements (>= heads·d).
    pub ld: usize,
}

impl<'a> Operand<'a> {
    /// A dense [batch, l, width] tensor.
    pub fn dense(tensor: &'a Tensor, width: usize) -> Self {
        Operand { tensor, offset: 0, ld: width }
    }

    /// Columns starting at `offset` of a tensor with rows of `ld` elements (e.g. q, k or v out
    /// of a fused qkv projection).
    pub fn slice(tensor: &'a Tensor, offset: usize, ld: usize) -> Self {
        Operand { tensor, offset, ld }
    }
}

/// An attention of fixed shape; `prepare` gives the launch for given operands.
#[derive(Clone, Copy, Debug)]
pub struct Attention {
    pub batch: usize,
    pub heads: usize,
    pub lq: usize,
    pub lk: usize,
    /// Head dimension: a multiple of 8, at most [`MAX_D`].
    pub d: usize,
    /// Query i sees keys 0..=i only (CLIP's text encoder).
    pub causal: bool,
    /// Score scale, usually 1/sqrt(d).
    pub scale: f32,
}

impl Attention {
    /// Attention with scale 1/sqrt(d).
    pub fn new(batch: usize, heads: usize, lq: usize, lk: usize, d: usize, causal: bool) -> Self {
        Attention { batch, heads, lq, lk, d, causal, scale: 1.0 / (d as f32).sqrt() }
    }

    /// Tile sizes: bq query rows per workgroup (bq·d/8 <= 256 invocations own an output
    /// octet), bk keys per block (K/V tile of bk·d/8 <= 1024 words, scores bq·bk <= 1024).
    fn tiles(&self) -> (usize, usize) {
        let p = self.d / 8;
        let bq = (256 / p).min(64);
        let bk = (1024 / p).min(1024 / bq).min(64);
        (bq, bk)
    }

    /// Visible (query, key) pairs per (batch, head).
    fn pairs(&self) -> f64 {
        if self.causal {
            (0..self.lq).map(|i| (i + 1).min(self.lk) as f64).sum()
        } else {
            self.lq as f64 * self.lk as f64
        }
    }

    fn check_operand(&self, name: &str, x: &Operand, rows: usize) -> Result<()> {
        let op = "attention";
        let width = self.heads * self.d;
        if x.tensor.dtype != DType::F16 {
            return Err(Error::DType { op: op.into(), detail: format!("{name} must be f16") });
        }
        if x.offset % 8 != 0 || x.ld % 8 != 0 || x.ld < width {
            return Err(Error::shape(
                op,
                format!(
                    "{name}: offset {} and row stride {} must be multiples of 8, the stride at least heads·d = {width}",
                    x.offset, x.ld
                ),
            ));
        }
        // Last element read or written, + 1.
        let end = (self.batch * rows - 1)
            .checked_mul(x.ld)
            .and_then(|n| n.checked_add(x.offset + width));
        let numel = x.tensor.numel();
        match end {
            Some(end) if end <= numel && numel <= u32::MAX as usize - 8 => Ok(()),
            _ => Err(Error::shape(
                op,
                format!(
                    "{name} {:?} (offset {}, row stride {}) is too small for [{}, {rows}, {width}] (or over 2^32 elements)",
                    x.tensor.shape, x.offset, x.ld, self.batch
                ),
            )),
        }
    }

    /// The launch o = attention(q, k, v); see the module doc for the operand layout. o must be
    /// in a buffer of its own (it is bound writable; q, k and v may share one buffer).
    pub fn prepare(&self, gpu: &Gpu, q: Operand, k: Operand, v: Operand, o: Operand) -> Result<Dispatch> {
        let op = "attention";
        let Attention { batch, heads, lq, lk, d, causal, scale } = *self;
        if batch == 0 || heads == 0 || lq == 0 || lk == 0 || d == 0 {
            return Err(Error::shape(op, format!("empty shape: batch {batch}, heads {heads}, lq {lq}, lk {lk}, d {d}")));
        }
        if d % 8 != 0 || d > MAX_D {
            return Err(Error::shape(op, format!("head dim {d}: must be a multiple of 8, at most {MAX_D}")));
        }
        if !scale.is_finite() {
            return Err(Error::shape(op, format!("scale {scale} is not finite")));
        }
        self.check_operand("q", &q, lq)?;
        self.check_operand("k", &k, lk)?;
        self.check_operand("v", &v, lk)?;
        self.check_operand("o", &o, lq)?;
        for (name, x) in [("q", &q), ("k", &k), ("v", &v)] {
            if std::sync::Arc::ptr_eq(&o.tensor.buffer, &x.tensor.buffer) {
                return Err(Error::shape(
                    op,
                    format!("o must not be in the same buffer as {name} (it is bound writable, {name} read-only)"),
                ));
            }
        }
        let (bq, bk) = self.tiles();
        let groups = [lq.div_ceil(bq) as u32, (batch * heads) as u32, 1];
        let p = AttentionParams {
            batch: batch as u32,
            heads: heads as u32,
            lq: lq as u32,
            lk: lk as u32,
            d: d as u32,
            causal: causal as u32,
            bq: bq as u32,
            bk: bk as u32,
            ldq: q.ld as u32,
            ldk: k.ld as u32,
            ldv: v.ld as u32,
            ldo: o.ld as u32,
            off_q: q.offset as u32,
            off_k: k.offset as u32,
            off_v: v.offset as u32,
            off_o: o.offset as u32,
            scale,
            ..Default::default()
        };
        let bh = (batch * heads) as f64;
        let flops = 4.0 * bh * d as f64 * self.pairs();
        let bytes = bh * d as f64 * 2.0 * (2.0 * lq as f64 + 2.0 * lk as f64);
        gpu.dispatch(&key(), &p, &[q.tensor, k.tensor, v.tensor, o.tensor], groups, flops, bytes)
    }
}
