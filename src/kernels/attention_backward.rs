//! Launcher for `shaders/attention_backward.wgsl`, `attention_backward_coop.wgsl` and
//! `attention_backward_warp.wgsl`: the gradients dq, dk, dv of o = softmax(q·kᵀ·scale [+ causal mask])·v
//! (`kernels::attention`), FlashAttention-2 style, never materialising the score matrix.
//! Two paths for the heavy launches (dq, and dk/dv): cooperative matrices (tensor cores,
//! 16x16x16 f16 -> f32; `attnb_dq_warp`, `attnb_dkv_warp` up to padded head dim 80 where the
//! device has subgroup barriers, else `attnb_dq_coop`, `attnb_dkv_coop`; the tiles are in
//! [`tiles`]) where the attention's `path` (else
//! the device's) asks for them, the device offers them with subgroups of 32, the padded head
//! dim (d rounded up to 16) is at most [`COOP_MAX_DP`] and a [`BwdTile`] of each entry fits
//! the workgroup memory ([`AttentionBackward::plan`]); else the scalar kernels (f16 tensors
//! read as packed words, no shader-f16), which also take d up to [`MAX_D`]. The statistics
//! launch and the reduce of split partials are scalar on both paths (same uniform, bindings,
//! stats and partials layout). Forcing the device path to scalar (`ATELIER_SCALAR`) or
//! `attn.path = Some(KernelPath::Scalar)`, keeps everything scalar.
//!
//! Operands are token-major [`Operand`]s as in the forward: q, o, dout, dq [batch, lq,
//! heads·d]; k, v, dk, dv [batch, lk, heads·d]; each may be a column slice of a wider tensor
//! (a fused qkv product and its gradient). dtypes: q, k, v, o f16 (what the forward read and
//! wrote); dout f16 or f32; dq f16 or f32; dk and dv f16 or f32 (the same one). Outputs are
//! overwritten (activation grads).
//!
//! What the forward must keep: q, k, v and o (o as written by the forward: D = rowsum(dO∘O)
//! is taken from it). With [`AttentionBackward::prepare`] the softmax statistics are not saved
//! by the forward: the first launch recomputes them (one q·kᵀ pass, about 1/8 of the
//! backward's flops) into an f32 scratch tensor [batch·heads·lq, 2] owned by
//! [`AttentionBackward`]. With [`AttentionBackward::prepare_with_saved_lse`] the forward
//! saved them (`Attention::prepare_saving`, into a stats tensor the caller keeps): the first
//! launch is `attnb_delta`, which only adds D (memory-bound: o and dout read once); build
//! such a backward with [`AttentionBackward::for_saved_lse`] (no scratch of its own).
//!
//! Three or four launches (see the shaders' headers): `attnb_stats` (lse and D per query row;
//! or `attnb_delta`, D only),
//! `attnb_dq*` (per query block, over the key blocks), `attnb_dkv*` (per key block, over the
//! query blocks) and, when the query range is split, `attnb_dkv_reduce`; no float atomics.
//! The cooperative-matrix tiles ([`BwdTile::auto`]; each at most 48 KiB of workgroup memory,
//! [`BwdTile::shared_bytes`]): warp-owned dq 64 queries x 32 keys and dkv 128 keys x 32
//! queries at d 40, 64 x 64 for both up to padded 80; else dq (64, 32) for d 40, (32, 32) up
//! to padded 96, (16, 32) up to 160; dkv (64, 32) for d 40, (32, 32) d 64, (32, 16) up to
//! padded 128, (16, 16) up to 160. The query splits of dk/dv are chosen from the scalar tiles
//! on every path ([`default_dkv_splits`]; any number is correct on each).
//! Flops per visible (query, key) pair and (batch, head): 2·d (stats), 6·d (dq: q·kᵀ, dO·vᵀ,
//! dS·k), 8·d (dkv: q·kᵀ, dO·vᵀ, Pᵀ·dO, dSᵀ·q).
//!
//! Split queries: `attnb_dkv` has one workgroup per key block and (batch, head), which for
//! cross-attention (77 keys) is only 2·batch·heads workgroups, each over all 4096 queries.
//! When there are fewer than [`TARGET_WORKGROUPS`] (about 2 per SM on an H100), the query
//! blocks are dealt round-robin over `splits` workgroups per key block (grid z), each writing
//! f32 partial dk, dv into scratch [splits, batch, lk, heads·d] owned by
//! [`AttentionBackward`]; `attnb_dkv_reduce` then sums them in a fixed order (deterministic)
//! into dk, dv. `splits` = min(ceil(TARGET_WORKGROUPS / workgroups), query blocks,
//! [`MAX_DKV_SPLITS`]), used only when at least 2 ([`default_dkv_splits`]); with splits = 1
//! the launch is the plain one (no scratch, no reduce). The cost: the partials' writes and
//! reads, 2·splits·batch·lk·heads·d·4 bytes each way (3.4 MB at 4096x77, d 40, 8 heads).

use bytemuck::{Pod, Zeroable};

use super::attention::{coop_dp, Attention, Operand, COOP_MAX_DP, MAX_D};
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, KernelPath, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in attention_backward.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct AttentionBackwardParams {
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
    pub lddo: u32,
    pub lddq: u32,
    pub lddk: u32,
    pub lddv: u32,
    pub off_q: u32,
    pub off_k: u32,
    pub off_v: u32,
    pub off_o: u32,
    pub off_do: u32,
    pub off_dq: u32,
    pub off_dk: u32,
    pub off_dv: u32,
    pub scale: f32,
    /// attnb_dkv and its reduce: query splits (1: no partials, no reduce).
    pub splits: u32,
    pub _pad1: u32,
    pub _pad2: u32,
}

/// Workgroup memory of every entry point (the shader's header), bytes.
pub const SHARED_BYTES: u32 = 3 * 4096 + 8192 + 2 * 4096 + 512;

/// The pipeline of one entry point: `stats` takes dout's dtype, `dq` and `dkv` also their
/// output's.
pub fn key(entry: &'static str, dout_f32: bool, out_f32: Option<bool>) -> PipelineKey {
    let k = PipelineKey::new(Shader::AttentionBackward, entry).with("DO_F32", dout_f32 as i64);
    match out_f32 {
        Some(o) => k.with("OUT_F32", o as i64),
        None => k,
    }
}

/// The reduce of split `attnb_dkv` partials: takes the output's dtype only.
pub fn reduce_key(out_f32: bool) -> PipelineKey {
    PipelineKey::new(Shader::AttentionBackward, "attnb_dkv_reduce").with("OUT_F32", out_f32 as i64)
}

/// Every pipeline variant the launcher can ask for (for the shader tests).
pub fn variants() -> Vec<PipelineKey> {
    let mut keys = vec![reduce_key(false), reduce_key(true)];
    for dout in [false, true] {
        keys.push(key("attnb_stats", dout, None));
        keys.push(key("attnb_delta", dout, None));
        for out in [false, true] {
            keys.push(key("attnb_dq", dout, Some(out)));
            keys.push(key("attnb_dkv", dout, Some(out)));
        }
    }
    keys.extend(coop_variants());
    keys
}

mod tiles;
pub use tiles::{coop_variants, BwdTile, CoopEntry, WARP_MAX_DP};

/// The operands of one backward: the forward's inputs and output, the output's gradient, and
/// the three gradients written.
#[derive(Clone, Copy, Debug)]
pub struct AttentionGrads<'a> {
    pub q: Operand<'a>,
    pub k: Operand<'a>,
    pub v: Operand<'a>,
    /// The forward's output.
    pub o: Operand<'a>,
    /// d(loss)/d(o).
    pub dout: Operand<'a>,
    pub dq: Operand<'a>,
    pub dk: Operand<'a>,
    pub dv: Operand<'a>,
}

/// The backward of one attention shape, with its f32 scratch (per query row: lse in log2
/// units and D = rowsum(dO∘O)). Build once per shape (per plan); `prepare` (or, after a
/// forward that saved lse, `prepare_with_saved_lse`) gives the launches.
pub struct AttentionBackward {
    pub attn: Attention,
    /// f32 [batch·heads·lq, 2]; None when built by [`AttentionBackward::for_saved_lse`] (the
    /// statistics then come from the forward).
    pub stats: Option<Tensor>,
    /// Query splits of `attnb_dkv` (1: one launch writes dk and dv). Set by the constructor
    /// (with the partials below); `prepare` refuses a value that does not match them.
    pub dkv_splits: usize,
    /// With `dkv_splits` > 1: the f32 partial dk and dv, each [splits, batch, lk, heads·d].
    pub dkv_partials: Option<[Tensor; 2]>,
    /// Cooperative-matrix tiles (dq, dkv) to use instead of the launcher's choice, for tests
    /// and benchmarks; ignored unless both are valid here (then the choice stands).
    pub tiles: Option<(BwdTile, BwdTile)>,
}

/// Workgroups `attnb_dkv` should have at least (2 per SM on a 132-SM H100) before its query
/// range is split.
pub const TARGET_WORKGROUPS: usize = 264;

/// The most query splits of `attnb_dkv` (chosen or forced).
pub const MAX_DKV_SPLITS: usize = 32;

/// The launcher's choice of query splits for `attnb_dkv`: enough workgroups for
/// [`TARGET_WORKGROUPS`], at most one per query block and [`MAX_DKV_SPLITS`]; 1 (no split)
/// unless that comes to at least 2.
pub fn default_dkv_splits(attn: &Attention) -> usize {
    if attn.d == 0 || attn.d / 8 == 0 || attn.lq == 0 {
        return 1;
    }
    let (rows, inner) = tiles(attn.d);
    let groups = (attn.lk.div_ceil(rows) * attn.batch * attn.heads).max(1);
    let s = TARGET_WORKGROUPS.div_ceil(groups).min(attn.lq.div_ceil(inner)).min(MAX_DKV_SPLITS);
    if s >= 2 {
        s
    } else {
        1
    }
}

/// Tiles of a launch: `rows` query rows (stats, dq) or keys (dkv) per workgroup, each owning
/// one output octet per invocation (rows·P <= 256), and `inner` rows of the streamed operand
/// per block (inner·P <= 256 words, rows·inner <= 1024 scores), both at most 64.
fn tiles(d: usize) -> (usize, usize) {
    let p = d / 8;
    let rows = (256 / p).min(64);
    let inner = (256 / p).min(1024 / rows).min(64);
    (rows, inner)
}

impl AttentionBackward {
    /// Checks the shape and allocates the statistics (and the partials of split queries, with
    /// the launcher's choice of splits, [`default_dkv_splits`]).
    pub fn new(gpu: &Gpu, attn: Attention) -> Result<Self> {
        Self::with_dkv_splits(gpu, attn, None)
    }

    /// As [`AttentionBackward::new`], with the query splits of `attnb_dkv` forced (1 to
    /// [`MAX_DKV_SPLITS`]; more than there are query blocks is allowed, the extra workgroups
    /// contribute zeros) or, with `None`, chosen by [`default_dkv_splits`].
    pub fn with_dkv_splits(gpu: &Gpu, attn: Attention, splits: Option<usize>) -> Result<Self> {
        Self::build(gpu, attn, splits, true)
    }

    /// A backward for statistics the forward saved ([`Attention::prepare_saving`]): as
    /// [`AttentionBackward::with_dkv_splits`] without a statistics scratch of its own; only
    /// [`AttentionBackward::prepare_with_saved_lse`] can run it.
    pub fn for_saved_lse(gpu: &Gpu, attn: Attention, splits: Option<usize>) -> Result<Self> {
        Self::build(gpu, attn, splits, false)
    }

    fn build(gpu: &Gpu, attn: Attention, splits: Option<usize>, own_stats: bool) -> Result<Self> {
        let op = "attention backward";
        let Attention { batch, heads, lq, lk, d, scale, .. } = attn;
        if batch == 0 || heads == 0 || lq == 0 || lk == 0 || d == 0 {
            return Err(Error::shape(op, format!("empty shape: batch {batch}, heads {heads}, lq {lq}, lk {lk}, d {d}")));
        }
        if !d.is_multiple_of(8) || d > MAX_D {
            return Err(Error::shape(op, format!("head dim {d}: must be a multiple of 8, at most {MAX_D}")));
        }
        if !scale.is_finite() {
            return Err(Error::shape(op, format!("scale {scale} is not finite")));
        }
        let limit = gpu.caps.limits.max_compute_workgroup_storage_size;
        if SHARED_BYTES > limit {
            return Err(Error::Gpu(format!(
                "{op}: the kernel needs {SHARED_BYTES} bytes of workgroup memory, this device offers {limit}"
            )));
        }
        let stats = if own_stats {
            Some(Tensor::empty(gpu, &[batch * heads * lq, 2], DType::F32, "attention backward stats")?)
        } else {
            None
        };
        let splits = match splits {
            Some(s) if s == 0 || s > MAX_DKV_SPLITS => {
                return Err(Error::shape(op, format!("{s} query splits: must be 1 to {MAX_DKV_SPLITS}")));
            }
            Some(s) => s,
            None => default_dkv_splits(&attn),
        };
        let dkv_partials = if splits > 1 {
            let shape = [splits, batch, lk, heads * d];
            let n = shape.iter().try_fold(1usize, |acc, &x| acc.checked_mul(x));
            if n.is_none_or(|n| n > u32::MAX as usize - 8) {
                return Err(Error::shape(op, format!("partials {shape:?} of {splits} query splits: over 2^32 elements")));
            }
            let t = || Tensor::empty(gpu, &shape, DType::F32, "attention backward dk/dv partials");
            Some([t()?, t()?])
        } else {
            None
        };
        Ok(AttentionBackward { attn, stats, dkv_splits: splits, dkv_partials, tiles: None })
    }

    fn check_operand(&self, name: &str, x: &Operand, rows: usize, f32_ok: bool) -> Result<()> {
        let op = "attention backward";
        let a = &self.attn;
        let width = a.heads * a.d;
        if !(x.tensor.dtype == DType::F16 || f32_ok && x.tensor.dtype == DType::F32) {
            let want = if f32_ok { "f16 or f32" } else { "f16" };
            return Err(Error::DType { op: op.into(), detail: format!("{name} must be {want}") });
        }
        if !x.offset.is_multiple_of(8) || !x.ld.is_multiple_of(8) || x.ld < width {
            return Err(Error::shape(
                op,
                format!(
                    "{name}: offset {} and row stride {} must be multiples of 8, the stride at least heads·d = {width}",
                    x.offset, x.ld
                ),
            ));
        }
        let end = (a.batch * rows - 1).checked_mul(x.ld).and_then(|n| n.checked_add(x.offset + width));
        let numel = x.tensor.numel();
        match end {
            Some(end) if end <= numel && numel <= u32::MAX as usize - 8 => Ok(()),
            _ => Err(Error::shape(
                op,
                format!(
                    "{name} {:?} (offset {}, row stride {}) is too small for [{}, {rows}, {width}] (or over 2^32 elements)",
                    x.tensor.shape, x.offset, x.ld, a.batch
                ),
            )),
        }
    }

    /// Which path the dq and dk/dv launches take on `gpu`, and the cooperative-matrix tiles
    /// (dq, dkv) when it is [`KernelPath::Coop`]: cooperative matrices where asked for (by the
    /// attention's `path`, else by the device's path) and offered (16x16x16 f16 -> f32 with
    /// subgroups of 32, `Caps::coop_16x16_f16_f32`), when the padded head dim is at most
    /// [`COOP_MAX_DP`] and a tile of each entry fits the device's workgroup memory; the scalar
    /// kernels otherwise. The statistics and the reduce of split partials are scalar on both.
    pub fn plan(&self, gpu: &Gpu) -> (KernelPath, Option<(BwdTile, BwdTile)>) {
        let a = &self.attn;
        let coop = match a.path {
            Some(KernelPath::Coop) => gpu.caps.coop_16x16_f16_f32,
            Some(KernelPath::Scalar) => false,
            None => gpu.caps.path == KernelPath::Coop,
        };
        let dp = coop_dp(a.d);
        if !coop || a.d == 0 || dp > COOP_MAX_DP {
            return (KernelPath::Scalar, None);
        }
        let limit = gpu.caps.limits.max_compute_workgroup_storage_size;
        let sb = gpu.caps.subgroup_barrier;
        if let Some((tq, tk)) = self.tiles
            && tq.usable(CoopEntry::Dq, dp as u32, limit, sb) && tk.usable(CoopEntry::Dkv, dp as u32, limit, sb)
        {
            return (KernelPath::Coop, Some((tq, tk)));
        }
        match (BwdTile::auto(CoopEntry::Dq, dp as u32, limit, sb), BwdTile::auto(CoopEntry::Dkv, dp as u32, limit, sb)) {
            (Some(tq), Some(tk)) => (KernelPath::Coop, Some((tq, tk))),
            _ => (KernelPath::Scalar, None),
        }
    }

    /// The launches, to run in order: statistics, dq, then dk and dv (one launch, or with
    /// split queries two: partials, then their reduce). See the module doc for the operands.
    /// Each gradient must be in a buffer holding none of the inputs (it is bound writable);
    /// dk and dv must have the same dtype.
    pub fn prepare(&self, gpu: &Gpu, g: &AttentionGrads) -> Result<Vec<Dispatch>> {
        match &self.stats {
            Some(st) => self.prepare_impl(gpu, g, st, false),
            None => Err(Error::Usage(
                "attention backward: built for saved statistics (for_saved_lse): use prepare_with_saved_lse".into(),
            )),
        }
    }

    /// As [`AttentionBackward::prepare`], with the softmax statistics the forward saved:
    /// `stats` f32 [batch·heads·lq, 2] as filled by [`Attention::prepare_saving`] on the same
    /// q, k (and this attention's shape and scale). The first launch (`attnb_delta`) only adds
    /// D = rowsum(dO∘O) into its second column; the rest read it as usual. `stats` is written:
    /// it must be in a buffer holding none of the operands.
    pub fn prepare_with_saved_lse(&self, gpu: &Gpu, g: &AttentionGrads, stats: &Tensor) -> Result<Vec<Dispatch>> {
        let op = "attention backward";
        let a = &self.attn;
        let rows = a.batch * a.heads * a.lq;
        if stats.dtype != DType::F32 {
            return Err(Error::DType { op: op.into(), detail: "the saved statistics must be f32".into() });
        }
        if stats.shape != [rows, 2] {
            return Err(Error::shape(op, format!("saved statistics {:?}: must be [batch·heads·lq, 2] = [{rows}, 2]", stats.shape)));
        }
        let operands = [("q", &g.q), ("k", &g.k), ("v", &g.v), ("o", &g.o), ("dout", &g.dout), ("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)];
        for (name, x) in operands {
            if std::sync::Arc::ptr_eq(&stats.buffer, &x.tensor.buffer) {
                return Err(Error::shape(op, format!("the saved statistics must not be in the same buffer as {name}")));
            }
        }
        self.prepare_impl(gpu, g, stats, true)
    }

    fn prepare_impl(&self, gpu: &Gpu, g: &AttentionGrads, stats_t: &Tensor, saved_lse: bool) -> Result<Vec<Dispatch>> {
        let op = "attention backward";
        let a = &self.attn;
        let (lq, lk) = (a.lq, a.lk);
        self.check_operand("q", &g.q, lq, false)?;
        self.check_operand("k", &g.k, lk, false)?;
        self.check_operand("v", &g.v, lk, false)?;
        self.check_operand("o", &g.o, lq, false)?;
        self.check_operand("dout", &g.dout, lq, true)?;
        self.check_operand("dq", &g.dq, lq, true)?;
        self.check_operand("dk", &g.dk, lk, true)?;
        self.check_operand("dv", &g.dv, lk, true)?;
        if g.dk.tensor.dtype != g.dv.tensor.dtype {
            return Err(Error::DType { op: op.into(), detail: "dk and dv must have the same dtype".into() });
        }
        let splits = self.dkv_splits;
        let partials = match (&self.dkv_partials, splits) {
            (None, 1) => None,
            (Some(pp), s) if s > 1 && s <= MAX_DKV_SPLITS && pp.iter().all(|t| t.numel() == s * a.batch * lk * a.heads * a.d) => Some(pp),
            _ => {
                return Err(Error::shape(
                    op,
                    format!("dkv_splits {splits} does not match the partials allocated (set it through with_dkv_splits)"),
                ))
            }
        };
        let inputs = [("q", &g.q), ("k", &g.k), ("v", &g.v), ("o", &g.o), ("dout", &g.dout)];
        let mut own = vec![("statistics", Operand::dense(stats_t, 2))];
        if let Some([pk, pv]) = partials {
            own.push(("dk partials", Operand::dense(pk, 8)));
            own.push(("dv partials", Operand::dense(pv, 8)));
        }
        let own: Vec<(&str, &Operand)> = own.iter().map(|(n, o)| (*n, o)).collect();
        for (gname, x) in [("dq", &g.dq), ("dk", &g.dk), ("dv", &g.dv)] {
            for (name, y) in inputs.iter().chain(&own) {
                if std::sync::Arc::ptr_eq(&x.tensor.buffer, &y.tensor.buffer) {
                    return Err(Error::shape(
                        op,
                        format!("{gname} must not be in the same buffer as {name} (it is bound writable, {name} read-only)"),
                    ));
                }
            }
        }
        let do32 = g.dout.tensor.dtype == DType::F32;
        let dq32 = g.dq.tensor.dtype == DType::F32;
        let dkv32 = g.dk.tensor.dtype == DType::F32;
        let base = AttentionBackwardParams {
            batch: a.batch as u32,
            heads: a.heads as u32,
            lq: lq as u32,
            lk: lk as u32,
            d: a.d as u32,
            causal: a.causal as u32,
            bq: 0,
            bk: 0,
            ldq: g.q.ld as u32,
            ldk: g.k.ld as u32,
            ldv: g.v.ld as u32,
            ldo: g.o.ld as u32,
            lddo: g.dout.ld as u32,
            lddq: g.dq.ld as u32,
            lddk: g.dk.ld as u32,
            lddv: g.dv.ld as u32,
            off_q: g.q.offset as u32,
            off_k: g.k.offset as u32,
            off_v: g.v.offset as u32,
            off_o: g.o.offset as u32,
            off_do: g.dout.offset as u32,
            off_dq: g.dq.offset as u32,
            off_dk: g.dk.offset as u32,
            off_dv: g.dv.offset as u32,
            scale: a.scale,
            splits: 1,
            ..Default::default()
        };
        let (rows, inner) = tiles(a.d);
        let bh = (a.batch * a.heads) as f64;
        let pairs = if a.causal { (0..lq).map(|i| (i + 1).min(lk) as f64).sum() } else { lq as f64 * lk as f64 };
        let fl = |per_d: f64| per_d * bh * a.d as f64 * pairs;
        let half = |t: &Tensor| t.dtype.size() as f64;
        let (d, nq, nk) = (a.d as f64, lq as f64, lk as f64);
        let bhd = bh * d;

        let ps = AttentionBackwardParams { bq: rows as u32, bk: inner as u32, ..base };
        let groups_q = [lq.div_ceil(rows) as u32, (a.batch * a.heads) as u32, 1];
        let stats = if saved_lse {
            // D only: o and dout read once, one f32 written per row (no flops to speak of).
            gpu.dispatch_at(
                &key("attnb_delta", do32, None),
                &ps,
                &[(3, g.o.tensor), (4, g.dout.tensor), (5, stats_t)],
                [lq.div_ceil(256) as u32, (a.batch * a.heads) as u32, 1],
                0.0,
                bhd * (2.0 * nq + half(g.dout.tensor) * nq) + bh * nq * 4.0,
            )?
        } else {
            gpu.dispatch(
                &key("attnb_stats", do32, None),
                &ps,
                &[g.q.tensor, g.k.tensor, g.o.tensor, g.dout.tensor, stats_t],
                groups_q,
                fl(2.0),
                bhd * (2.0 * nq + 2.0 * nk + 2.0 * nq + half(g.dout.tensor) * nq) + bh * nq * 8.0,
            )?
        };
        // dq and dk/dv: scalar kernels (tiles in the uniform) or cooperative matrices (tiles
        // in the pipeline's overrides; the uniform's bq, bk only informative).
        let dp = coop_dp(a.d) as u32;
        let coop = self.plan(gpu).1;
        let (dq_key, pq, groups_dq) = match coop {
            Some((t, _)) => (
                t.key(CoopEntry::Dq, dp, do32, dq32),
                AttentionBackwardParams { bq: t.bq, bk: t.bk, ..base },
                [lq.div_ceil(t.bq as usize) as u32, (a.batch * a.heads) as u32, 1],
            ),
            None => (key("attnb_dq", do32, Some(dq32)), ps, groups_q),
        };
        let dq = gpu.dispatch(
            &dq_key,
            &pq,
            &[g.q.tensor, g.k.tensor, g.v.tensor, g.dout.tensor, stats_t, g.dq.tensor],
            groups_dq,
            fl(6.0),
            bhd * (2.0 * nq + 4.0 * nk + half(g.dout.tensor) * nq + half(g.dq.tensor) * nq) + bh * nq * 8.0,
        )?;
        let pk = AttentionBackwardParams { bq: inner as u32, bk: rows as u32, splits: splits as u32, ..base };
        let groups_k = [lk.div_ceil(rows) as u32, (a.batch * a.heads) as u32, splits as u32];
        let (dkv_key, pkv, groups_kv) = match coop {
            Some((_, t)) => (
                t.key(CoopEntry::Dkv, dp, do32, dkv32),
                AttentionBackwardParams { bq: t.bq, bk: t.bk, ..pk },
                [lk.div_ceil(t.bk as usize) as u32, (a.batch * a.heads) as u32, splits as u32],
            ),
            None => (key("attnb_dkv", do32, Some(dkv32)), pk, groups_k),
        };
        let reads = bhd * (2.0 * nq + 4.0 * nk + half(g.dout.tensor) * nq) + bh * nq * 8.0;
        let Some([pdk, pdv]) = partials else {
            let dkv = gpu.dispatch(
                &dkv_key,
                &pkv,
                &[g.q.tensor, g.k.tensor, g.v.tensor, g.dout.tensor, stats_t, g.dk.tensor, g.dv.tensor],
                groups_kv,
                fl(8.0),
                reads + bhd * 2.0 * half(g.dk.tensor) * nk,
            )?;
            return Ok(vec![stats, dq, dkv]);
        };
        // Split queries: f32 partials (written once each), then their sum read back once.
        let part_bytes = 2.0 * splits as f64 * bhd * nk * 4.0;
        let dkv = gpu.dispatch(
            &dkv_key,
            &pkv,
            &[g.q.tensor, g.k.tensor, g.v.tensor, g.dout.tensor, stats_t, pdk, pdv],
            groups_kv,
            fl(8.0),
            reads + part_bytes,
        )?;
        let octets = a.batch * lk * a.heads * a.d / 8;
        let reduce = gpu.dispatch_at(
            &reduce_key(dkv32),
            &pk,
            &[(6, g.dk.tensor), (7, g.dv.tensor), (8, pdk), (9, pdv)],
            [octets.div_ceil(256) as u32, 1, 1],
            0.0,
            part_bytes + bhd * 2.0 * half(g.dk.tensor) * nk,
        )?;
        Ok(vec![stats, dq, dkv, reduce])
    }
}
