//! Launchers for `shaders/norm.wgsl`: group norm over channels-last activations [batch, H·W, C]
//! (optionally fused with SiLU) and layer norm over rows [rows, C]. f16 tensors, f32
//! statistics. Bytes: group norm reads x twice and writes y once; layer norm the same.
//!
//! For the backward (`kernels::norm_backward`), [`GroupNorm::prepare_saving`] writes the
//! per-(item, group) statistics, f32 [batch·groups, 4] = (mean, rstd, 0, 0), into a caller's
//! tensor instead of the internal scratch (same three launches), and [`layer_norm_saving`]
//! writes per-row f32 [rows, 2] = (mean, rstd) besides y (one launch, as [`layer_norm`]).

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in norm.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NormParams {
    pub rows: u32,
    pub c: u32,
    pub groups: u32,
    pub block: u32,
    pub nblocks: u32,
    pub batch: u32,
    pub silu: u32,
    pub eps: f32,
}

/// Largest channel count the shaders take (SD-1.5's widest concat is 2560).
pub const MAX_C: usize = 2560;

fn check_f16(op: &str, ts: &[&Tensor]) -> Result<()> {
    if ts.iter().any(|t| t.dtype != DType::F16) {
        return Err(Error::DType { op: op.into(), detail: "x, y, gamma and beta must be f16".into() });
    }
    Ok(())
}

/// A group norm of fixed shape, with its f32 scratch (per-block summaries and statistics).
/// Build once per shape; `prepare` gives the three launches for given tensors.
pub struct GroupNorm {
    pub batch: usize,
    pub rows: usize,
    pub c: usize,
    pub groups: usize,
    pub eps: f32,
    pub silu: bool,
    block: usize,
    nblocks: usize,
    partials: Tensor,
    stats: Tensor,
}

/// Checks a group-norm shape (forward and backward alike) and splits each item's rows into
/// blocks: enough for ~512 workgroups, at least 16 rows each. Returns (block, nblocks).
pub(crate) fn group_blocks(op: &str, batch: usize, rows: usize, c: usize, groups: usize) -> Result<(usize, usize)> {
    if batch == 0 || rows == 0 || c == 0 || groups == 0 {
        return Err(Error::shape(op, format!("empty shape: batch {batch}, rows {rows}, C {c}, groups {groups}")));
    }
    if !c.is_multiple_of(8) || c > MAX_C || !c.is_multiple_of(groups) || groups > 256 {
        return Err(Error::shape(
            op,
            format!("C={c} with {groups} groups: C must be a multiple of 8 and of the group count, at most {MAX_C}; at most 256 groups"),
        ));
    }
    let per_item = 512usize.div_ceil(batch);
    let block = rows.div_ceil(per_item).max(16);
    Ok((block, rows.div_ceil(block)))
}

impl GroupNorm {
    /// `rows` = H·W per batch item; `c` channels in `groups` groups.
    pub fn new(gpu: &Gpu, batch: usize, rows: usize, c: usize, groups: usize, eps: f32, silu: bool) -> Result<Self> {
        let op = "group norm";
        let (block, nblocks) = group_blocks(op, batch, rows, c, groups)?;
        if (batch * rows).checked_mul(c).is_none_or(|n| n > u32::MAX as usize - 8) {
            return Err(Error::shape(op, format!("{batch}x{rows}x{c}: over 2^32 elements")));
        }
        let partials = Tensor::empty(gpu, &[batch * nblocks * groups, 4], DType::F32, "group norm partials")?;
        let stats = Tensor::empty(gpu, &[batch * groups, 4], DType::F32, "group norm stats")?;
        Ok(GroupNorm { batch, rows, c, groups, eps, silu, block, nblocks, partials, stats })
    }

    fn params(&self) -> NormParams {
        NormParams {
            rows: self.rows as u32,
            c: self.c as u32,
            groups: self.groups as u32,
            block: self.block as u32,
            nblocks: self.nblocks as u32,
            batch: self.batch as u32,
            silu: self.silu as u32,
            eps: self.eps,
        }
    }

    /// The three launches y = GroupNorm(x)·gamma + beta (then SiLU): x, y [batch, rows, C]
    /// f16 (not the same memory), gamma and beta [C] f16.
    pub fn prepare(&self, gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, y: &Tensor) -> Result<[Dispatch; 3]> {
        self.prepare_into(gpu, x, gamma, beta, y, &self.stats)
    }

    /// A new f32 tensor [batch·groups, 4] for [`GroupNorm::prepare_saving`] to fill.
    pub fn new_stats(&self, gpu: &Gpu, what: &str) -> Result<Tensor> {
        Tensor::empty(gpu, &[self.batch * self.groups, 4], DType::F32, what)
    }

    /// As [`GroupNorm::prepare`], and leaves the statistics in `stats` (f32 [batch·groups, 4]:
    /// mean, 1/sqrt(var + eps), 0, 0 per (item, group), row b·groups + g) for the backward.
    /// Same launches and cost: gn_final writes `stats` instead of the internal scratch.
    pub fn prepare_saving(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        y: &Tensor,
        stats: &Tensor,
    ) -> Result<[Dispatch; 3]> {
        let op = "group norm";
        if stats.dtype != DType::F32 || stats.numel() != self.batch * self.groups * 4 {
            return Err(Error::shape(
                op,
                format!("stats {:?} {}: want f32 [{}, 4]", stats.shape, stats.dtype, self.batch * self.groups),
            ));
        }
        if stats.overlaps(x) || stats.overlaps(y) || stats.overlaps(&self.partials) {
            return Err(Error::shape(op, "stats must not share memory with x, y or the scratch"));
        }
        self.prepare_into(gpu, x, gamma, beta, y, stats)
    }

    fn prepare_into(&self, gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, y: &Tensor, stats: &Tensor) -> Result<[Dispatch; 3]> {
        let op = "group norm";
        check_f16(op, &[x, gamma, beta, y])?;
        let n = self.batch * self.rows * self.c;
        if x.numel() != n || y.numel() != n || gamma.numel() != self.c || beta.numel() != self.c {
            return Err(Error::shape(
                op,
                format!(
                    "x {:?}, y {:?}, gamma {:?}, beta {:?} for [{}, {}, {}]",
                    x.shape, y.shape, gamma.shape, beta.shape, self.batch, self.rows, self.c
                ),
            ));
        }
        if y.overlaps(x) {
            return Err(Error::shape(op, "y must not share memory with x"));
        }
        let p = self.params();
        let bytes = (n * 2) as f64;
        let sums = gpu.dispatch(
            &PipelineKey::new(Shader::Norm, "gn_stats"),
            &p,
            &[x, &self.partials],
            [self.nblocks as u32, self.batch as u32, 1],
            0.0,
            bytes,
        )?;
        let fin = gpu.dispatch(
            &PipelineKey::new(Shader::Norm, "gn_final"),
            &p,
            &[&self.partials, stats],
            [(self.batch * self.groups) as u32, 1, 1],
            0.0,
            (self.partials.numel() * 4) as f64,
        )?;
        let apply = gpu.dispatch(
            &PipelineKey::new(Shader::Norm, "gn_apply"),
            &p,
            &[x, y, gamma, beta, stats],
            grid(n / 8),
            0.0,
            bytes * 2.0,
        )?;
        Ok([sums, fin, apply])
    }
}

/// y = LayerNorm(x)·gamma + beta over the last dimension: x, y [.., C] f16 (not the same
/// memory), C a multiple of 8; gamma, beta [C] f16.
pub fn layer_norm(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, y: &Tensor, eps: f32) -> Result<Dispatch> {
    let (p, groups) = layer_norm_check(x, gamma, beta, y, eps)?;
    gpu.dispatch(&PipelineKey::new(Shader::Norm, "ln"), &p, &[x, y, gamma, beta], groups, 0.0, (x.numel() * 6) as f64)
}

/// As [`layer_norm`], and writes the row statistics to `stats`, f32 [rows, 2] (rows =
/// x.numel() / C): (mean, 1/sqrt(var + eps)) per row, for `norm_backward::layer_norm_backward`.
pub fn layer_norm_saving(gpu: &Gpu, x: &Tensor, gamma: &Tensor, beta: &Tensor, y: &Tensor, stats: &Tensor, eps: f32) -> Result<Dispatch> {
    let (p, groups) = layer_norm_check(x, gamma, beta, y, eps)?;
    let rows = p.rows as usize;
    if stats.dtype != DType::F32 || stats.numel() != rows * 2 {
        return Err(Error::shape("layer norm", format!("stats {:?} {}: want f32 [{rows}, 2]", stats.shape, stats.dtype)));
    }
    if stats.overlaps(x) || stats.overlaps(y) {
        return Err(Error::shape("layer norm", "stats must not share memory with x or y"));
    }
    let bytes = (x.numel() * 6 + rows * 8) as f64;
    gpu.dispatch(&PipelineKey::new(Shader::Norm, "ln_save"), &p, &[x, y, gamma, beta, stats], groups, 0.0, bytes)
}

fn layer_norm_check(x: &Tensor, gamma: &Tensor, beta: &Tensor, y: &Tensor, eps: f32) -> Result<(NormParams, [u32; 3])> {
    let op = "layer norm";
    check_f16(op, &[x, gamma, beta, y])?;
    let c = gamma.numel();
    if c == 0 || !c.is_multiple_of(8) || x.shape.last() != Some(&c) || beta.numel() != c || y.numel() != x.numel() {
        return Err(Error::shape(
            op,
            format!("x {:?}, y {:?}, gamma {:?}, beta {:?} (C a multiple of 8)", x.shape, y.shape, gamma.shape, beta.shape),
        ));
    }
    if y.overlaps(x) {
        return Err(Error::shape(op, "y must not share memory with x"));
    }
    let rows = x.numel() / c;
    let p = NormParams { rows: rows as u32, c: c as u32, eps, ..Default::default() };
    let g = rows.min(65535) as u32;
    Ok((p, [g, rows.div_ceil(65535) as u32, 1]))
}
