//! Launchers for `shaders/norm_backward.wgsl`: input gradients (dX) of group norm (with its
//! optional fused SiLU) over channels-last activations [batch, H·W, C] and of layer norm over
//! rows [rows, C], from the f32 statistics the forward saved (`GroupNorm::prepare_saving`,
//! `layer_norm_saving`).
//!
//! dtypes: x, gamma, beta f16; dy f16 or f32, dx f16 or f32 (each picked from the tensor's
//! dtype: override constants DY_F32 / DX_F32); statistics f32; arithmetic f32. dx is
//! overwritten (activation grads overwrite), or added into with `accumulate` (override
//! ACCUMULATE: the residual stream's gradient already holds the pass-through part; the old
//! dx is read and the gradient added in f32 before the store). gamma and beta are frozen in
//! SD LoRA training, so there is no dgamma / dbeta.
//!
//! Bytes: group norm reads x and dy twice and writes dx once (and reads it once when
//! accumulating); layer norm the same.

use bytemuck::{Pod, Zeroable};

use super::grid;
use super::norm::group_blocks;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in norm_backward.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct NormBackwardParams {
    pub rows: u32,
    pub c: u32,
    pub groups: u32,
    pub block: u32,
    pub nblocks: u32,
    pub batch: u32,
    pub silu: u32,
    pub _pad: u32,
}

/// `dx`: (DX_F32, ACCUMULATE) for the entries that write dx.
fn key(entry: &'static str, dy_f32: bool, dx: Option<(bool, bool)>) -> PipelineKey {
    let k = PipelineKey::new(Shader::NormBackward, entry).with("DY_F32", dy_f32 as i64);
    match dx {
        Some((o, acc)) => k.with("DX_F32", o as i64).with("ACCUMULATE", acc as i64),
        None => k,
    }
}

/// Every pipeline variant the launchers ask for (for the shader tests).
pub fn variants() -> Vec<PipelineKey> {
    let mut keys = vec![PipelineKey::new(Shader::NormBackward, "gnb_final")];
    for i in [false, true] {
        keys.push(key("gnb_reduce", i, None));
        for o in [false, true] {
            for acc in [false, true] {
                keys.push(key("gnb_apply", i, Some((o, acc))));
                keys.push(key("ln_backward", i, Some((o, acc))));
            }
        }
    }
    keys
}

/// x, gamma, beta must be f16 and the statistics f32; dy and dx may be either.
fn check_dtypes(op: &str, f16s: &[&Tensor], stats: &Tensor) -> Result<()> {
    if f16s.iter().any(|t| t.dtype != DType::F16) {
        return Err(Error::DType { op: op.into(), detail: "x, gamma and beta must be f16".into() });
    }
    if stats.dtype != DType::F32 {
        return Err(Error::DType { op: op.into(), detail: "the saved statistics must be f32".into() });
    }
    Ok(())
}

fn check_disjoint(op: &str, dx: &Tensor, inputs: &[&Tensor]) -> Result<()> {
    if inputs.iter().any(|t| dx.overlaps(t)) {
        return Err(Error::shape(op, "dx must not share memory with x, dy, gamma, beta or the statistics"));
    }
    Ok(())
}

/// The backward of one group-norm shape (as `norm::GroupNorm`), with its f32 scratch:
/// per-block partial sums [batch·nblocks·groups, 4] and per-(item, group) coefficients
/// [batch·groups, 4]. Build once per shape; `prepare` gives the three launches.
pub struct GroupNormBackward {
    pub batch: usize,
    pub rows: usize,
    pub c: usize,
    pub groups: usize,
    pub silu: bool,
    block: usize,
    nblocks: usize,
    partials: Tensor,
    coef: Tensor,
}

impl GroupNormBackward {
    /// `rows` = H·W per batch item; `c` channels in `groups` groups; `silu` as in the forward.
    pub fn new(gpu: &Gpu, batch: usize, rows: usize, c: usize, groups: usize, silu: bool) -> Result<Self> {
        let op = "group norm backward";
        let (block, nblocks) = group_blocks(op, batch, rows, c, groups)?;
        // dx may be f32: 2 words per 8 elements must stay under 2^32 word indices.
        if (batch * rows).checked_mul(c).is_none_or(|n| n > (u32::MAX as usize) / 4) {
            return Err(Error::shape(op, format!("{batch}x{rows}x{c}: over 2^30 elements")));
        }
        let partials = Tensor::empty(gpu, &[batch * nblocks * groups, 4], DType::F32, "group norm backward partials")?;
        let coef = Tensor::empty(gpu, &[batch * groups, 4], DType::F32, "group norm backward coefficients")?;
        Ok(GroupNormBackward { batch, rows, c, groups, silu, block, nblocks, partials, coef })
    }

    fn params(&self) -> NormBackwardParams {
        NormBackwardParams {
            rows: self.rows as u32,
            c: self.c as u32,
            groups: self.groups as u32,
            block: self.block as u32,
            nblocks: self.nblocks as u32,
            batch: self.batch as u32,
            silu: self.silu as u32,
            _pad: 0,
        }
    }

    /// The three launches of dx = d(GroupNorm(x)·gamma + beta, then SiLU if `silu`)/dx · dy:
    /// x [batch, rows, C] f16 (the forward's input); gamma, beta [C] f16; stats f32
    /// [batch·groups, 4] as `GroupNorm::prepare_saving` left them; dy and dx [batch, rows, C],
    /// each f16 or f32; dx is overwritten, or added into with `accumulate` (dx += the
    /// gradient), and must not share memory with any input.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare(
        &self,
        gpu: &Gpu,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        stats: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
        accumulate: bool,
    ) -> Result<[Dispatch; 3]> {
        let op = "group norm backward";
        check_dtypes(op, &[x, gamma, beta], stats)?;
        let n = self.batch * self.rows * self.c;
        if x.numel() != n
            || dy.numel() != n
            || dx.numel() != n
            || gamma.numel() != self.c
            || beta.numel() != self.c
            || stats.numel() != self.batch * self.groups * 4
        {
            return Err(Error::shape(
                op,
                format!(
                    "x {:?}, dy {:?}, dx {:?}, gamma {:?}, beta {:?}, stats {:?} for [{}, {}, {}] in {} groups (stats [{}, 4])",
                    x.shape, dy.shape, dx.shape, gamma.shape, beta.shape, stats.shape, self.batch, self.rows, self.c,
                    self.groups, self.batch * self.groups
                ),
            ));
        }
        check_disjoint(op, dx, &[x, dy, gamma, beta, stats])?;
        let p = self.params();
        let (dy_f32, dx_f32) = (dy.dtype == DType::F32, dx.dtype == DType::F32);
        let read = (n * (2 + dy.dtype.size())) as f64;
        let reduce = gpu.dispatch(
            &key("gnb_reduce", dy_f32, None),
            &p,
            &[&self.partials, x, dy, gamma, stats, beta],
            [self.nblocks as u32, self.batch as u32, 1],
            0.0,
            read,
        )?;
        let fin = gpu.dispatch(
            &PipelineKey::new(Shader::NormBackward, "gnb_final"),
            &p,
            &[&self.coef, &self.partials, stats],
            [(self.batch * self.groups).div_ceil(64) as u32, 1, 1],
            0.0,
            (self.partials.numel() * 4) as f64,
        )?;
        let apply = gpu.dispatch(
            &key("gnb_apply", dy_f32, Some((dx_f32, accumulate))),
            &p,
            &[dx, x, dy, gamma, &self.coef, beta],
            grid(n / 8),
            0.0,
            read + (n * dx.dtype.size() * (1 + accumulate as usize)) as f64,
        )?;
        Ok([reduce, fin, apply])
    }
}

/// One launch: dx = d(LayerNorm(x)·gamma + beta)/dx · dy over the last dimension. x [.., C]
/// f16 (the forward's input), C a multiple of 8; gamma [C] f16; stats f32 [rows, 2] as
/// `layer_norm_saving` left them (rows = x.numel() / C); dy, dx shaped as x, each f16 or f32;
/// dx is overwritten, or added into with `accumulate` (dx += the gradient), and must not
/// share memory with any input. (beta does not enter dX.)
pub fn layer_norm_backward(
    gpu: &Gpu,
    x: &Tensor,
    gamma: &Tensor,
    stats: &Tensor,
    dy: &Tensor,
    dx: &Tensor,
    accumulate: bool,
) -> Result<Dispatch> {
    let op = "layer norm backward";
    check_dtypes(op, &[x, gamma], stats)?;
    let c = gamma.numel();
    let n = x.numel();
    if c == 0 || !c.is_multiple_of(8) || x.shape.last() != Some(&c) || dy.numel() != n || dx.numel() != n || stats.numel() != n / c * 2 {
        return Err(Error::shape(
            op,
            format!(
                "x {:?}, gamma {:?}, stats {:?}, dy {:?}, dx {:?} (C a multiple of 8, stats [rows, 2])",
                x.shape, gamma.shape, stats.shape, dy.shape, dx.shape
            ),
        ));
    }
    if n > (u32::MAX as usize) / 4 {
        return Err(Error::shape(op, format!("x {:?}: over 2^30 elements", x.shape)));
    }
    check_disjoint(op, dx, &[x, dy, gamma, stats])?;
    let rows = n / c;
    let p = NormBackwardParams { rows: rows as u32, c: c as u32, ..Default::default() };
    let groups = [rows.min(65535) as u32, rows.div_ceil(65535) as u32, 1];
    let bytes = (n * (2 + dy.dtype.size() + dx.dtype.size() * (1 + accumulate as usize)) + rows * 8) as f64;
    gpu.dispatch(
        &key("ln_backward", dy.dtype == DType::F32, Some((dx.dtype == DType::F32, accumulate))),
        &p,
        &[dx, x, dy, gamma, stats],
        groups,
        0.0,
        bytes,
    )
}
