//! Launchers for `shaders/elementwise.wgsl`: unary ops (copy, SiLU, GELU, quick-GELU, affine,
//! clamp, exp),
//! binary ops (add, mul; the second operand may broadcast along rows), casts f16<->f32 and a
//! strided 2-D copy. All memory-bound: bytes = inputs read + output written, no flops counted.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use super::grid;
use super::matmul::BiasLayout;
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in elementwise.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ElementwiseParams {
    pub numel: u32,
    pub b_len: u32,
    pub op: u32,
    pub cols: u32,
    pub alpha: f32,
    pub beta: f32,
    pub ld_src: u32,
    pub ld_dst: u32,
    pub bias_off: u32,
    pub bias_rows: u32,
    pub bias_ld: u32,
    pub _pad0: u32,
}

/// Unary operations.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Unary {
    /// y = x (with a dtype change this is a cast).
    Copy,
    /// x·sigmoid(x).
    Silu,
    /// The exact (erf) GELU, as torch's default.
    Gelu,
    /// x·sigmoid(1.702x), CLIP's activation.
    QuickGelu,
    /// y = alpha·x + beta (scale is beta = 0).
    Affine { alpha: f32, beta: f32 },
    /// y = min(max(x, lo), hi).
    Clamp { lo: f32, hi: f32 },
    /// y = exp(scale·x).
    Exp { scale: f32 },
}

impl Unary {
    fn code(self) -> (u32, f32, f32) {
        match self {
            Unary::Copy => (0, 1.0, 0.0),
            Unary::Silu => (1, 1.0, 0.0),
            Unary::Gelu => (2, 1.0, 0.0),
            Unary::QuickGelu => (3, 1.0, 0.0),
            Unary::Affine { alpha, beta } => (4, alpha, beta),
            Unary::Clamp { lo, hi } => (5, lo, hi),
            Unary::Exp { scale } => (6, scale, 0.0),
        }
    }

    /// The same function on the CPU, in f64 (the op tests' reference).
    pub fn reference(self, x: f64) -> f64 {
        match self {
            Unary::Copy => x,
            Unary::Silu => x / (1.0 + (-x).exp()),
            Unary::Gelu => 0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2)),
            Unary::QuickGelu => x / (1.0 + (-1.702 * x).exp()),
            Unary::Affine { alpha, beta } => alpha as f64 * x + beta as f64,
            Unary::Clamp { lo, hi } => x.clamp(lo as f64, hi as f64),
            Unary::Exp { scale } => (scale as f64 * x).exp(),
        }
    }
}

/// erf in f64 (for the references), by its Taylor series near 0 and a continued fraction
/// for the tail; accurate to ~1e-15.
pub fn erf(x: f64) -> f64 {
    let ax = x.abs();
    let r = if ax < 2.5 {
        let mut sum = ax;
        let mut term = ax;
        let mut n = 0.0;
        loop {
            n += 1.0;
            term *= -ax * ax / n;
            let add = term / (2.0 * n + 1.0);
            sum += add;
            if add.abs() < 1e-17 {
                break;
            }
        }
        sum * 2.0 / std::f64::consts::PI.sqrt()
    } else {
        // erfc(x) = exp(-x²)/sqrt(pi) · 1/(x + 1/2/(x + 1/(x + 3/2/(x + ...))))
        let mut f = 0.0;
        for k in (1..60).rev() {
            f = (k as f64 / 2.0) / (ax + f);
        }
        1.0 - (-ax * ax).exp() / std::f64::consts::PI.sqrt() / (ax + f)
    };
    r.copysign(x)
}

/// Binary operations: y = a + alpha·b, or y = alpha·a·b.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Binary {
    Add { alpha: f32 },
    Mul { alpha: f32 },
}

fn key(entry: &'static str, x: DType, y: DType) -> PipelineKey {
    PipelineKey::new(Shader::Elementwise, entry)
        .with("IN_F32", (x == DType::F32) as i64)
        .with("OUT_F32", (y == DType::F32) as i64)
}

fn check_len(op: &str, n: usize) -> Result<()> {
    if n > (u32::MAX as usize) - 8 {
        return Err(Error::shape(op, format!("{n} elements: over 2^32")));
    }
    Ok(())
}

/// y = f(x), elementwise; x and y of the same number of elements, any dtypes.
pub fn unary(gpu: &Gpu, op: Unary, x: &Tensor, y: &Tensor) -> Result<Dispatch> {
    if x.numel() != y.numel() {
        return Err(Error::shape("unary", format!("x {:?} vs y {:?}", x.shape, y.shape)));
    }
    let n = y.numel();
    check_len("unary", n)?;
    let (code, alpha, beta) = op.code();
    let p = ElementwiseParams { numel: n as u32, b_len: n as u32, op: code, alpha, beta, ..Default::default() };
    let bytes = (n * (x.dtype.size() + y.dtype.size())) as f64;
    gpu.dispatch(&key("unary", x.dtype, y.dtype), &p, &[x, y], grid(n.div_ceil(8)), 0.0, bytes)
}

/// y = a (op) b; `b` has as many elements as `a`, or is one row that repeats
/// (a.numel() a multiple of b.numel()). a and b share a dtype.
pub fn binary(gpu: &Gpu, op: Binary, a: &Tensor, b: &Tensor, y: &Tensor) -> Result<Dispatch> {
    binary_grouped(gpu, op, a, b, y, 1)
}

/// y = a (op) b with `b` [groups, L] and `a` split into `groups` equal parts, each adding
/// (or multiplying) its row of `b` repeated: a per-image vector over an image batch
/// ([batch, HW, C] + [batch, C] with groups = batch).
pub fn binary_grouped(gpu: &Gpu, op: Binary, a: &Tensor, b: &Tensor, y: &Tensor, groups: usize) -> Result<Dispatch> {
    let n = y.numel();
    check_len("binary", n)?;
    let bad = groups == 0 || b.numel() == 0 || !b.numel().is_multiple_of(groups) || !n.is_multiple_of(groups) || {
        let (per, row) = (n / groups, b.numel() / groups);
        row == 0 || per % row != 0
    };
    if a.numel() != n || bad {
        return Err(Error::shape("binary", format!("a {:?}, b {:?}, y {:?} in {groups} groups", a.shape, b.shape, y.shape)));
    }
    if a.dtype != b.dtype {
        return Err(Error::DType { op: "binary".into(), detail: format!("a is {}, b is {}", a.dtype, b.dtype) });
    }
    let (code, alpha) = match op {
        Binary::Add { alpha } => (0, alpha),
        Binary::Mul { alpha } => (1, alpha),
    };
    let p = ElementwiseParams {
        numel: n as u32,
        b_len: (b.numel() / groups) as u32,
        op: code,
        alpha,
        cols: (n / groups) as u32,
        ..Default::default()
    };
    let bytes = (n * (a.dtype.size() + y.dtype.size()) + b.numel() * b.dtype.size()) as f64;
    gpu.dispatch(&key("binary", a.dtype, y.dtype), &p, &[a, y, b], grid(n.div_ceil(8)), 0.0, bytes)
}

/// Cast (or copy) x into y's dtype.
pub fn cast(gpu: &Gpu, x: &Tensor, y: &Tensor) -> Result<Dispatch> {
    if x.numel() != y.numel() {
        return Err(Error::shape("cast", format!("x {:?} vs y {:?}", x.shape, y.shape)));
    }
    let n = y.numel();
    check_len("cast", n)?;
    let p = ElementwiseParams { numel: n as u32, b_len: n as u32, ..Default::default() };
    let bytes = (n * (x.dtype.size() + y.dtype.size())) as f64;
    gpu.dispatch(&key("convert", x.dtype, y.dtype), &p, &[x, y], grid(n.div_ceil(4)), 0.0, bytes)
}

/// dst[r, c] = src[r, c] for `rows` rows and `cols` columns, with row strides `ld_src` and
/// `ld_dst` (dst columns cols..ld_dst are zeroed); src and dst may differ in dtype.
pub fn copy2d(gpu: &Gpu, src: &Tensor, dst: &Tensor, rows: usize, cols: usize, ld_src: usize, ld_dst: usize) -> Result<Dispatch> {
    let n = rows.saturating_mul(ld_dst);
    check_len("copy2d", n)?;
    if rows == 0 || cols == 0 || cols > ld_src || cols > ld_dst || dst.numel() < n || src.numel() < (rows - 1) * ld_src + cols {
        return Err(Error::shape(
            "copy2d",
            format!("{rows}x{cols} (ld {ld_src} -> {ld_dst}) from {:?} to {:?}", src.shape, dst.shape),
        ));
    }
    let p = ElementwiseParams { numel: n as u32, cols: cols as u32, ld_src: ld_src as u32, ld_dst: ld_dst as u32, ..Default::default() };
    let bytes = (rows * cols * src.dtype.size() + n * dst.dtype.size()) as f64;
    gpu.dispatch(&key("copy2d", src.dtype, dst.dtype), &p, &[src, dst], grid(n.div_ceil(8)), 0.0, bytes)
}

/// The sum of a split-K product: y [rows, cols] (f16 or f32) = Σ_s x[s] (x f32 [slices, rows,
/// cols]) + the f16 bias (optional, read by its [`BiasLayout`]: one vector [cols], or one row
/// per group of output rows) (+ y with `accumulate`). rows·cols, cols and the layout's offset
/// and row stride multiples of 8.
pub fn splitk_sum(gpu: &Gpu, x: &Tensor, slices: usize, bias: Option<(&Tensor, BiasLayout)>, y: &Tensor, cols: usize, accumulate: bool) -> Result<Dispatch> {
    let n = y.numel();
    check_len("split-K sum", n * slices)?;
    if x.dtype != DType::F32 || bias.is_some_and(|(b, _)| b.dtype != DType::F16) {
        return Err(Error::DType { op: "split-K sum".into(), detail: "partials must be f32, the bias f16".into() });
    }
    if slices == 0 || cols == 0 || !cols.is_multiple_of(8) || !n.is_multiple_of(cols) || x.numel() != slices * n {
        return Err(Error::shape("split-K sum", format!("x {:?} in {slices} slices to y {:?} of {cols} columns (a multiple of 8)", x.shape, y.shape)));
    }
    let layout = bias.map(|(_, l)| l).unwrap_or_default();
    if let Some((b, l)) = bias
        && (l.rows == 0 || !l.off.is_multiple_of(8) || !l.ld.is_multiple_of(8) || b.numel() < l.extent(n / cols, cols))
    {
        return Err(Error::shape("split-K sum", format!("bias {:?} with layout {l:?} for {} rows of {cols} (offset and row stride multiples of 8)", b.shape, n / cols)));
    }
    let op = bias.is_some() as u32 | (accumulate as u32) << 1;
    let p = ElementwiseParams {
        numel: n as u32,
        b_len: slices as u32,
        op,
        cols: cols as u32,
        bias_off: layout.off as u32,
        bias_rows: layout.rows as u32,
        bias_ld: layout.ld as u32,
        ..Default::default()
    };
    let bytes = (n * (slices * 4 + y.dtype.size() * (1 + accumulate as usize))) as f64;
    gpu.dispatch(&key("splitk_sum", DType::F32, y.dtype), &p, &[x, y, bias.map_or(x, |(b, _)| b)], grid(n / 8), 0.0, bytes)
}
