//! Launchers for `shaders/lora_skinny.wgsl`: the skinny products of a LoRA layer of rank
//! r ≤ [`MAX_RANK`], which the tiled matmul runs latency-bound (one 32-wide K step after
//! another for a 4-wide output, or a 64x128 tile for a rank-4 one):
//! - [`narrow`]: C [M, r] f16 = alpha · A [M, K] · W, W stored [r, K] (A·Wᵀ) or [K, r] (A·W);
//!   A may be a column slice (an [`Operand`]).
//! - [`widen`]: Y [M, N] f16 (+)= alpha · H [M, r] · W, W stored [N, r] (H·Wᵀ) or [r, N]
//!   (H·W); Y may be a column slice. Memory-bound: Y read and written once.
//! - [`WeightGrad`]: G += alpha · Xᵀ·H summed over M rows, X [M, N] f16 (a slice), H [M, r]
//!   f16, G f32 laid out [N, r] or [r, N] at an element offset of a flat f32 tensor. The rows
//!   are split over workgroups writing f32 partials, then a fixed-order reduce adds into G:
//!   deterministic, no float atomics.
//!
//! **Stacked adapters** (`members` > 1): the adapters of one fused product (q, k, v or k, v)
//! share their input, so their A's stack into one [members·r, K] (a plain narrow, widen and
//! dA gradient of rank members·r); their outputs are equal column segments of the product,
//! so [`narrow_stacked`], [`widen_stacked`] and [`WeightGrad::members`] pair segment g with
//! member g's r columns of H and its B (the members' B's stacked [N, r]): one launch for the
//! group where each adapter had its own. With input dropout, [`narrow_masked`],
//! [`widen_masked`] and [`WeightGrad::masked`] apply each member's mask ([`Mask`]) where x is
//! read (h, dA) or dx written, so stacks form with dropout too and no masked x is stored.
//!
//! Flops: 2·M·K·r (narrow), 2·M·N·r (widen, weight gradient; the reduce counts none). Bytes: every
//! operand once, plus the partials written and read.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};
use crate::kernels::attention::Operand;

/// The largest rank the skinny kernels take (4·RV with RV ≤ 4).
pub const MAX_RANK: usize = 16;

const W_T: u32 = 1;
const VEC: u32 = 2;
const PAIR: u32 = 4;
const OUT_T: u32 = 8;
const DIRECT: u32 = 16;
const ACC: u32 = 32;
const MSPLIT: u32 = 64;

/// Rows of a `narrow` workgroup; columns of a `wgrad` workgroup; columns and rows of a
/// `widen` workgroup; outputs of a `wreduce` workgroup.
const NARROW_ROWS: usize = 16;
const WGRAD_COLS: usize = 128;
const WIDEN_COLS: usize = 128;
const WIDEN_ROWS: usize = 32;
const REDUCE_OUTS: usize = 64;

/// Mirrors `struct Params` in lora_skinny.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct SkinnyParams {
    pub rows: u32,
    pub k: u32,
    pub r: u32,
    pub flags: u32,
    pub lda: u32,
    pub off_a: u32,
    pub off_out: u32,
    pub alpha: f32,
    pub rows_per_split: u32,
    pub splits: u32,
    pub numel_out: u32,
    /// Stacked adapters (0 or 1: one).
    pub members: u32,
    /// The masked entries' dropout: member 0's stream (member g's is drop_salt + g), the
    /// drop threshold, 1 / (1 - p), and one member's rank.
    pub drop_salt: u32,
    pub drop_threshold: u32,
    pub drop_scale: f32,
    pub drop_rank: u32,
}

/// Input dropout of stacked adapters (the `*_masked` entries): member g's mask is the one
/// `kernels::lora::dropout` draws for the layer with salt `salt + g` from the step seed in
/// `hyper`, so a stack computes what its members compute one by one, without storing the
/// masked inputs. Each member's `rank` must be a multiple of 4.
#[derive(Clone, Debug)]
pub struct Mask {
    pub hyper: Tensor,
    pub salt: u32,
    pub p: f32,
    pub rank: usize,
}

impl Mask {
    /// The params' dropout fields, after checking `total` = members·rank and the input `x`
    /// dense ([rows, cols] from element 0: the mask indexes its elements row·cols + col).
    fn apply(&self, op: &str, params: &mut SkinnyParams, total: usize, x: &Operand, cols: usize) -> Result<()> {
        let members = total / self.rank.max(1);
        if !self.rank.is_multiple_of(4) || members * self.rank != total || !(1..=4).contains(&members) {
            return Err(Error::shape(op, format!("masked: {total} columns of members of rank {}: need a rank that is a multiple of 4 and 1..=4 members", self.rank)));
        }
        if x.offset != 0 || x.ld != cols {
            return Err(Error::shape(op, format!("masked: the input must be dense [rows, {cols}] (offset {}, row stride {})", x.offset, x.ld)));
        }
        if !(0.0..1.0).contains(&self.p) || self.hyper.numel() < crate::kernels::lora::HYPER_WORDS {
            return Err(Error::shape(op, format!("masked: dropout {} must be in [0, 1), hyper {:?} the step's words", self.p, self.hyper.shape)));
        }
        params.drop_salt = self.salt;
        params.drop_threshold = crate::kernels::lora::dropout_threshold(self.p);
        params.drop_scale = (1.0 / (1.0 - self.p as f64)) as f32;
        params.drop_rank = self.rank as u32;
        Ok(())
    }
}

/// The pipeline key of an entry for rank `r` (`wreduce` has one variant).
pub fn key(entry: &'static str, r: usize) -> PipelineKey {
    let k = PipelineKey::new(Shader::LoraSkinny, entry);
    if entry == "wreduce" { k } else { k.with("RV", r.div_ceil(4) as i64) }
}

/// Every variant, for the shader tests.
pub fn variants() -> Vec<PipelineKey> {
    let mut v = vec![key("wreduce", 1)];
    for r in [4, 8, 12, 16] {
        for e in ["narrow", "wgrad", "widen", "narrow_masked", "wgrad_masked", "widen_masked"] {
            v.push(key(e, r));
        }
    }
    v
}

/// A 1-D count of workgroups folded into a 2-D grid (the shaders index wg.y·nwg.x + wg.x).
fn fold(groups: usize) -> [u32; 3] {
    let g = groups.max(1) as u32;
    if g <= 65535 { [g, 1, 1] } else { [65535, g.div_ceil(65535), 1] }
}

fn check_rank(op: &str, r: usize) -> Result<()> {
    if r == 0 || r > MAX_RANK {
        return Err(Error::shape(op, format!("rank {r} must be in 1..={MAX_RANK}")));
    }
    Ok(())
}

/// `a` as [rows, cols] f16 columns starting at its offset with row stride ld, in bounds.
fn check_slice(op: &str, what: &str, a: &Operand, rows: usize, cols: usize) -> Result<()> {
    if a.tensor.dtype != DType::F16 {
        return Err(Error::DType { op: op.into(), detail: format!("{what} must be f16") });
    }
    if rows == 0 || cols == 0 || a.ld < cols || a.offset + (rows - 1) * a.ld + cols > a.tensor.numel() {
        return Err(Error::shape(
            op,
            format!("{what} {:?} (offset {}, row stride {}) must hold {rows} rows of {cols}", a.tensor.shape, a.offset, a.ld),
        ));
    }
    Ok(())
}

fn check_u32(op: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.numel() > u32::MAX as usize - 16) {
        return Err(Error::shape(op, "tensor over 2^32 elements"));
    }
    Ok(())
}

/// C [m, r] (dense f16) = alpha · A [m, k] · W: with `w_rk` W is stored [r, k] (C = A·Wᵀ, the
/// LoRA forward's h = xd·Aᵀ), else [k, r] (C = A·W, the backward's dh = dy·B). A may be
/// columns of a wider f16 tensor; offsets and strides that are multiples of 8 take the
/// vector loads.
#[allow(clippy::too_many_arguments)]
pub fn narrow(gpu: &Gpu, a: Operand, w: &Tensor, w_rk: bool, c: &Tensor, m: usize, k: usize, r: usize, alpha: f32) -> Result<Dispatch> {
    narrow_impl(gpu, a, w, w_rk, c, m, k, r, 1, alpha, None)
}

/// C [m, r] = alpha · [dropout_0(x)·W_0ᵀ, dropout_1(x)·W_1ᵀ, ..]: [`narrow`] with W stored
/// [r, k] (the stacked members' A's, r = members · mask.rank) and x dense, each member's
/// columns reading x under its own mask (the forward's h of stacked adapters with dropout).
#[allow(clippy::too_many_arguments)]
pub fn narrow_masked(gpu: &Gpu, x: &Tensor, w: &Tensor, c: &Tensor, m: usize, k: usize, r: usize, alpha: f32, mask: &Mask) -> Result<Dispatch> {
    narrow_impl(gpu, Operand::dense(x, k), w, true, c, m, k, r, 1, alpha, Some(mask))
}

/// C [m, members·r] (dense f16) = alpha · A [m, k] · blockdiag(W_0, .. W_members-1): the
/// members' W_g [k / members, r] stacked [k, r]; member g's r columns of C read only its
/// segment of A's columns (the backward's dh of stacked adapters from their columns of dy).
#[allow(clippy::too_many_arguments)]
pub fn narrow_stacked(gpu: &Gpu, a: Operand, w: &Tensor, c: &Tensor, m: usize, k: usize, r: usize, members: usize, alpha: f32) -> Result<Dispatch> {
    narrow_impl(gpu, a, w, false, c, m, k, r, members, alpha, None)
}

/// Stacked members: at least one, r·members within the kernels' rank, k or n split evenly into
/// even segments.
fn check_members(op: &str, r: usize, members: usize, width: usize) -> Result<()> {
    if members == 0 || r * members > MAX_RANK || !width.is_multiple_of(members) || (members > 1 && (width / members) % 2 == 1) {
        return Err(Error::shape(
            op,
            format!("{members} stacked adapters of rank {r} over {width} columns: need members·rank <= {MAX_RANK} and equal even segments"),
        ));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn narrow_impl(gpu: &Gpu, a: Operand, w: &Tensor, w_rk: bool, c: &Tensor, m: usize, k: usize, r: usize, members: usize, alpha: f32, mask: Option<&Mask>) -> Result<Dispatch> {
    let op = "lora narrow product";
    check_rank(op, r)?;
    check_members(op, r, members, k)?;
    check_slice(op, "A", &a, m, k)?;
    if w.dtype != DType::F16 || c.dtype != DType::F16 {
        return Err(Error::DType { op: op.into(), detail: "W and C must be f16".into() });
    }
    let width = members * r;
    if w.numel() < r * k || c.numel() < m * width {
        return Err(Error::shape(op, format!("W {:?} must hold {r}x{k}, C {:?} {m}x{width}", w.shape, c.shape)));
    }
    check_u32(op, &[a.tensor, c, w])?;
    // Stacked with an even rank: a workgroup per member (grid z), each over its own K / members
    // columns, writing its r columns (whole words).
    let msplit = members > 1 && r.is_multiple_of(2);
    let mut flags = if w_rk { W_T } else { 0 };
    if a.offset.is_multiple_of(8) && a.ld.is_multiple_of(8) && (!msplit || (k / members).is_multiple_of(8)) {
        flags |= VEC;
    }
    if msplit {
        flags |= MSPLIT;
    }
    let mut params = SkinnyParams {
        rows: m as u32,
        k: k as u32,
        r: r as u32,
        flags,
        lda: a.ld as u32,
        off_a: a.offset as u32,
        alpha,
        members: members as u32,
        ..Default::default()
    };
    let flops = 2.0 * (m * k * r) as f64;
    let bytes = (2 * (m * k + r * k + m * width)) as f64;
    let mut grid = fold(m.div_ceil(NARROW_ROWS));
    if msplit {
        grid[2] = members as u32;
    }
    if let Some(mask) = mask {
        mask.apply(op, &mut params, r, &a, k)?;
        return gpu.dispatch_at(&key("narrow_masked", r), &params, &[(1, a.tensor), (2, c), (3, w), (4, &mask.hyper)], grid, flops, bytes);
    }
    gpu.dispatch(&key("narrow", if msplit { r } else { width }), &params, &[a.tensor, c, w], grid, flops, bytes)
}

/// Y [m, n] (=, or += with `accumulate`) alpha · H [m, r] · W: with `w_nr` W is stored [n, r]
/// (Y = H·Wᵀ, the LoRA forward's y += scale·h·Bᵀ), else [r, n] (Y = H·W, the backward's
/// dx += dh·A). H is dense f16; Y may be columns of a wider f16 tensor, with an even offset,
/// row stride and width (pairs are written whole).
#[allow(clippy::too_many_arguments)]
pub fn widen(gpu: &Gpu, h: &Tensor, w: &Tensor, w_nr: bool, y: Operand, m: usize, n: usize, r: usize, alpha: f32, accumulate: bool) -> Result<Dispatch> {
    widen_impl(gpu, h, w, w_nr, y, m, n, r, 1, alpha, accumulate, None)
}

/// Y [m, n] (=, or +=) alpha · Σ_g dropout_g(H_g · W_g): [`widen`] with W stored [r, n] (the
/// stacked members' A's, r = members · mask.rank) and Y dense, each member's product masked
/// with its own mask before the sum (the backward's dx of stacked adapters with dropout).
#[allow(clippy::too_many_arguments)]
pub fn widen_masked(gpu: &Gpu, h: &Tensor, w: &Tensor, y: &Tensor, m: usize, n: usize, r: usize, alpha: f32, accumulate: bool, mask: &Mask) -> Result<Dispatch> {
    widen_impl(gpu, h, w, false, Operand::dense(y, n), m, n, r, 1, alpha, accumulate, Some(mask))
}

/// Y [m, n] (=, or += with `accumulate`) alpha · H_g · W_gᵀ on each of the `members` equal
/// column segments g of Y: H [m, members·r] dense (member g's columns g·r ..), the members'
/// W_g [n / members, r] stacked [n, r] (the forward's y += scale·h·Bᵀ of stacked adapters).
#[allow(clippy::too_many_arguments)]
pub fn widen_stacked(gpu: &Gpu, h: &Tensor, w: &Tensor, y: Operand, m: usize, n: usize, r: usize, members: usize, alpha: f32, accumulate: bool) -> Result<Dispatch> {
    widen_impl(gpu, h, w, true, y, m, n, r, members, alpha, accumulate, None)
}

#[allow(clippy::too_many_arguments)]
fn widen_impl(gpu: &Gpu, h: &Tensor, w: &Tensor, w_nr: bool, y: Operand, m: usize, n: usize, r: usize, members: usize, alpha: f32, accumulate: bool, mask: Option<&Mask>) -> Result<Dispatch> {
    let op = "lora widen product";
    check_rank(op, r)?;
    check_members(op, r, members, n)?;
    check_slice(op, "Y", &y, m, n)?;
    if y.offset % 2 == 1 || y.ld % 2 == 1 || n % 2 == 1 {
        return Err(Error::shape(op, format!("Y needs an even offset ({}), row stride ({}) and width ({n})", y.offset, y.ld)));
    }
    if h.dtype != DType::F16 || w.dtype != DType::F16 {
        return Err(Error::DType { op: op.into(), detail: "H and W must be f16".into() });
    }
    if h.numel() < m * r * members || w.numel() < n * r {
        return Err(Error::shape(op, format!("H {:?} must hold {m}x{}, W {:?} {n}x{r}", h.shape, r * members, w.shape)));
    }
    if [h, w].iter().any(|t| std::sync::Arc::ptr_eq(&t.buffer, &y.tensor.buffer)) {
        return Err(Error::shape(op, "Y must not be in the same buffer as H or W (it is bound writable)"));
    }
    check_u32(op, &[h, w, y.tensor])?;
    let mut flags = if w_nr { W_T } else { 0 };
    if accumulate {
        flags |= ACC;
    }
    let mut params = SkinnyParams {
        rows: m as u32,
        k: n as u32,
        r: r as u32,
        flags,
        lda: y.ld as u32,
        off_out: y.offset as u32,
        alpha,
        members: members as u32,
        ..Default::default()
    };
    let grid = [n.div_ceil(WIDEN_COLS) as u32, m.div_ceil(WIDEN_ROWS) as u32, 1];
    let flops = 2.0 * (m * n * r) as f64;
    let bytes = (2 * (m * r * members + n * r) + 2 * m * n * if accumulate { 2 } else { 1 }) as f64;
    if let Some(mask) = mask {
        mask.apply(op, &mut params, r, &y, n)?;
        return gpu.dispatch_at(&key("widen_masked", r), &params, &[(1, h), (2, y.tensor), (3, w), (4, &mask.hyper)], grid, flops, bytes);
    }
    gpu.dispatch(&key("widen", r), &params, &[h, y.tensor, w], grid, flops, bytes)
}

/// G += alpha · Σ_rows X[row, n]·H[row, j] (n < N, j < r): a LoRA parameter gradient (dB
/// [n, r] += scale·dyᵀ·h, or with `transposed` dA [r, k] += dhᵀ·xd).
#[derive(Clone, Debug)]
pub struct WeightGrad {
    pub rows: usize,
    /// X's columns.
    pub n: usize,
    pub r: usize,
    pub alpha: f32,
    /// G laid out [r, N] (index j·N + n) instead of [N, r] (n·r + j).
    pub transposed: bool,
    /// Force the number of row splits (default: [`WeightGrad::splits`]' choice).
    pub force_splits: Option<usize>,
    /// Stacked adapters (default 1): X's N columns are `members` equal segments, segment g
    /// paired with H's columns [g·r, (g+1)·r) of rows of members·r (not with `transposed`).
    pub members: usize,
    /// Stacked adapters with dropout (`transposed` only, X dense): rows [g·rank, (g+1)·rank)
    /// of dA read X under member g's mask (dA [r, N] += dhᵀ·dropout_g(x)).
    pub mask: Option<Mask>,
}

impl WeightGrad {
    pub fn new(rows: usize, n: usize, r: usize, alpha: f32, transposed: bool) -> Self {
        WeightGrad { rows, n, r, alpha, transposed, force_splits: None, members: 1, mask: None }
    }

    /// The stacked members' gradient (their dB's stacked [n, r]): see [`WeightGrad::members`].
    pub fn stacked(self, members: usize) -> Self {
        WeightGrad { members, ..self }
    }

    /// The stacked members' dA with their input dropout: see [`WeightGrad::mask`].
    pub fn masked(self, mask: Mask) -> Self {
        WeightGrad { mask: Some(mask), ..self }
    }

    /// Rows one split sums: enough splits for ~512 workgroups, but at least 32 rows (and
    /// 16 per vec4 group of the rank) each, so the f32 partials (4·N·r bytes a split) stay
    /// well below X's 2·N bytes a row.
    pub fn rows_per_split(&self) -> usize {
        if let Some(s) = self.force_splits {
            return self.rows.div_ceil(s.clamp(1, self.rows.max(1)));
        }
        let blocks = self.n.div_ceil(WGRAD_COLS);
        let target = 512usize.div_ceil(blocks);
        self.rows.div_ceil(target).max(16 * self.r.div_ceil(4)).max(32)
    }

    /// Row splits (workgroups along y); one split adds into G directly, with no partials.
    pub fn splits(&self) -> usize {
        self.rows.div_ceil(self.rows_per_split()).max(1)
    }

    /// The f32 scratch the partials need (splits·N·r values), or None with one split.
    pub fn partials_len(&self) -> Option<usize> {
        let s = self.splits();
        (s > 1).then_some(s * self.n * self.r)
    }

    /// The launches: X [rows, N] f16 (a slice), H [rows, r] f16 dense, G f32 with the output
    /// at element `off_g`; `parts` (f32, at least [`WeightGrad::partials_len`]) when split.
    pub fn prepare(&self, gpu: &Gpu, x: Operand, h: &Tensor, g: &Tensor, off_g: usize, parts: Option<&Tensor>) -> Result<Vec<Dispatch>> {
        let op = "lora weight gradient";
        let (rows, n, r, members) = (self.rows, self.n, self.r, self.members);
        check_rank(op, r)?;
        check_members(op, r, members, n)?;
        if members > 1 && (self.transposed || members * r.div_ceil(4) > 4) {
            return Err(Error::shape(op, format!("{members} stacked adapters of rank {r}: need the [N, r] layout and members·ceil(r/4) <= 4")));
        }
        check_slice(op, "X", &x, rows, n)?;
        if h.dtype != DType::F16 || g.dtype != DType::F32 {
            return Err(Error::DType { op: op.into(), detail: "H must be f16 and G f32".into() });
        }
        if h.numel() < rows * r * members || off_g + n * r > g.numel() {
            return Err(Error::shape(op, format!("H {:?} must hold {rows}x{}, G {:?} {n}x{r} at {off_g}", h.shape, r * members, g.shape)));
        }
        check_u32(op, &[x.tensor, h, g])?;
        let rps = self.rows_per_split();
        let splits = self.splits();
        let nr = n * r;
        let mut flags = if self.transposed { OUT_T } else { 0 };
        if x.offset.is_multiple_of(2) && x.ld.is_multiple_of(2) {
            flags |= PAIR;
        }
        let mut params = SkinnyParams {
            rows: rows as u32,
            k: n as u32,
            r: r as u32,
            lda: x.ld as u32,
            off_a: x.offset as u32,
            off_out: off_g as u32,
            alpha: self.alpha,
            rows_per_split: rps as u32,
            splits: splits as u32,
            numel_out: nr as u32,
            members: members as u32,
            ..Default::default()
        };
        let grid = [n.div_ceil(WGRAD_COLS) as u32, splits as u32, 1];
        let flops = 2.0 * (rows * n * r) as f64;
        let read = 2 * (rows * n + rows * r * members);
        let hyper = match &self.mask {
            Some(mask) if self.transposed && members == 1 => {
                mask.apply(op, &mut params, r, &x, n)?;
                Some(&mask.hyper)
            }
            Some(_) => return Err(Error::shape(op, "masked: only the [r, N] layout of one (stacked) dA")),
            None => None,
        };
        let launch = |params: &SkinnyParams, out: &Tensor, bytes: usize| match hyper {
            Some(hy) => gpu.dispatch_at(&key("wgrad_masked", r), params, &[(1, x.tensor), (2, out), (3, h), (4, hy)], grid, flops, bytes as f64),
            None => gpu.dispatch(&key("wgrad", r), params, &[x.tensor, out, h], grid, flops, bytes as f64),
        };
        if splits == 1 {
            params.flags = flags | DIRECT;
            return Ok(vec![launch(&params, g, read + 8 * nr)?]);
        }
        let parts = parts.ok_or_else(|| Error::Usage(format!("{op}: {splits} row splits need a partials tensor")))?;
        if parts.dtype != DType::F32 || parts.numel() < splits * nr {
            return Err(Error::shape(op, format!("partials {:?} {} must hold {} f32 values", parts.shape, parts.dtype, splits * nr)));
        }
        check_u32(op, &[parts])?;
        params.flags = flags;
        let d1 = launch(&params, parts, read + 4 * splits * nr)?;
        let d2 = gpu.dispatch(&key("wreduce", r), &params, &[parts, g], fold(nr.div_ceil(REDUCE_OUTS)), 0.0, (4 * splits * nr + 8 * nr) as f64)?;
        Ok(vec![d1, d2])
    }
}
