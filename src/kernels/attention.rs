//! Launcher for `shaders/attention.wgsl`, `shaders/attention_coop.wgsl` and
//! `shaders/attention_warp.wgsl`: scaled-dot-product
//! attention o = softmax(q·kᵀ·scale [+ causal mask])·v per (batch, head), flash-attention
//! style (key blocks through workgroup memory, online softmax in f32), never materialising
//! the scores. Two paths: cooperative matrices (tensor cores, 16x16x16 f16 -> f32) where the
//! device offers them and the padded head dim (d rounded up to 16) is at most
//! [`COOP_MAX_DP`] with a tile that fits the workgroup-memory limit; else the scalar kernel
//! (f16 tensors read as packed words, no shader-f16), which also takes d up to [`MAX_D`]
//! (the VAE's single 512-wide head). On the cooperative path the warp-owned kernel
//! (attention_warp.wgsl: each subgroup owns 16 query rows, its output accumulators in
//! registers) takes padded head dims up to [`WARP_MAX_DP`] where the device has subgroup
//! barriers; attention_coop.wgsl (the running output in workgroup memory) the rest
//! ([`CoopTile::auto`]).
//!
//! Operands are token-major: q [batch, lq, heads·d], k and v [batch, lk, heads·d], o [batch,
//! lq, heads·d], each an [`Operand`]: a tensor, the element offset of its first value and its
//! row stride in elements, so q, k and v may be column slices of one fused qkv tensor
//! [batch, l, 3·heads·d] (offsets 0, heads·d, 2·heads·d; stride 3·heads·d).
//! Flops: 4·batch·heads·d per visible (query, key) pair (2 for q·kᵀ, 2 for p·v); bytes: q, k, v
//! read once and o written once.
//!
//! Training: [`Attention::prepare_saving`] also writes the softmax statistic of every query row,
//! lse2 = log2 Σ_j exp2(s_ij) with s = q·k·scale·log2 e, into an f32 tensor [batch·heads·lq, 2]
//! as (lse2, unused): the layout of `AttentionBackward`'s stats, whose
//! `prepare_with_saved_lse` then only adds D (override SAVE_LSE of both shaders; inference
//! pipelines are the SAVE_LSE = false ones, as before).

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, KernelPath, PipelineKey, Shader, Tensor};

/// Mirrors `struct Params` in attention.wgsl, attention_coop.wgsl and attention_warp.wgsl.
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

/// The scalar path's pipeline (one variant: tile sizes travel in the uniform).
pub fn key() -> PipelineKey {
    PipelineKey::new(Shader::Attention, "attn")
}

/// The scalar path's pipeline that also saves lse ([`Attention::prepare_saving`]).
pub fn key_saving() -> PipelineKey {
    key().with("SAVE_LSE", 1)
}

/// Largest padded head dim (d rounded up to 16) of the cooperative-matrix kernel: it holds
/// DP/16 Q fragments per subgroup in as many variables (10).
pub const COOP_MAX_DP: usize = 160;

/// Workgroup memory the shader tests validate the cooperative-matrix variants for (wgpu's
/// default `max_compute_workgroup_storage_size`); the launcher never goes past it.
pub const COOP_SHARED_LIMIT: u32 = 48 * 1024;

/// Head dim `d` rounded up to a whole 16-wide fragment (40 -> 48).
pub fn coop_dp(d: usize) -> usize {
    d.div_ceil(16) * 16
}

/// The largest padded head dim of the warp-owned kernel (5 Q fragments and 5 accumulators
/// in registers).
pub const WARP_MAX_DP: u32 = 80;

/// Tile of the cooperative-matrix kernels: `bq` query rows per workgroup, `bk` keys per block
/// and `warps` subgroups of 32 invocations (4 or 8). attention_coop.wgsl (`warp` false): the
/// softmax gives each query row R = 32·warps/bq invocations (2 or 4); each subgroup computes
/// bk/16/(warps·16/bq) score fragments (at least one). attention_warp.wgsl (`warp` true):
/// each subgroup owns 16 query rows, so bq = 16·warps, and streams blocks of bk keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopTile {
    pub bq: u32,
    pub bk: u32,
    pub warps: u32,
    pub warp: bool,
}

const fn coop_tile(bq: u32, bk: u32, warps: u32) -> CoopTile {
    CoopTile { bq, bk, warps, warp: false }
}

/// A tile of attention_warp.wgsl: `warps` subgroups of 16 query rows, blocks of `bk` keys.
const fn warp_tile(bk: u32, warps: u32) -> CoopTile {
    CoopTile { bq: 16 * warps, bk, warps, warp: true }
}

impl CoopTile {
    /// The attention_coop.wgsl tiles the launcher tries, taking the first that fits: on the
    /// H100, 64x64 with 8 subgroups is the fastest at d 40 (padded 48, the largest it fits in
    /// 48 KiB: 1.12 ms for 2x8 heads of 4096x4096, against 1.46 ms with 32x32); 32x32 with 4
    /// subgroups is the fastest or level at d 64, 80 and 160, and the smallest (DP <= 160 in
    /// 48 KiB).
    pub const AUTO: [CoopTile; 2] = [coop_tile(64, 64, 8), coop_tile(32, 32, 4)];

    /// The warp-owned tiles the launcher tries first (where the device has subgroup
    /// barriers), in order: 128 queries x 32-key blocks with 8 subgroups, then 64 x 32 with 4
    /// (one fits every padded head dim up to 80). H100 (`bench --filter attention
    /// --all-tiles`, session 8): 4096² d 40 (2 x 8 heads) 0.841 ms (51.0 TFLOP/s) against
    /// 0.891 for 64 x 32 and 1.088 for coop v1's best; 1024² d 80 0.070 ms (76.7) against
    /// 0.107 for 64 x 64 and 0.118 for v1; cross 4096 x 77 0.033 ms (v1 0.042); CLIP's 77
    /// tokens at d 64, causal, 0.011 ms where v1's (64, 32, 8) takes 0.008 (too small to
    /// keep a rule for).
    pub const AUTO_WARP: [CoopTile; 2] = [warp_tile(32, 8), warp_tile(32, 4)];

    /// Every tile the shaders support, for tests and benchmarks (each where it fits): six of
    /// attention_coop.wgsl, three warp-owned ones (64 x 32 and 64 x 64 with 4 subgroups,
    /// 128 x 32 with 8; 128 x 64 never fits 48 KiB).
    pub const ALL: [CoopTile; 9] = [
        coop_tile(32, 32, 4),
        coop_tile(32, 64, 4),
        coop_tile(64, 32, 4),
        coop_tile(64, 64, 4),
        coop_tile(64, 32, 8),
        coop_tile(64, 64, 8),
        warp_tile(32, 4),
        warp_tile(64, 4),
        warp_tile(32, 8),
    ];

    /// Workgroup memory in bytes at padded head dim `dp`; mirrors the arrays of
    /// attention_coop.wgsl: skv max(bq, bk)·(dp + 8) halves, sp bq·(bk + 8) halves, ss
    /// bq·(bk + 4) f32, so bq·(dp + 4) f32; of attention_warp.wgsl: sk, sv [bk, dp + 8]
    /// halves each, and per subgroup [16, bk + 4] f32 and [16, bk + 8] halves.
    pub fn shared_bytes(&self, dp: u32) -> u32 {
        if self.warp {
            return 4 * self.bk * (dp + 8) + self.warps * 16 * (4 * (self.bk + 4) + 2 * (self.bk + 8));
        }
        let skv = self.bq.max(self.bk) * (dp / 4 + 2) * 8;
        let sp = self.bq * (self.bk / 4 + 2) * 8;
        let ss = self.bq * (self.bk + 4) * 4;
        let so = self.bq * (dp + 4) * 4;
        skv + sp + ss + so
    }

    /// Whether the shader supports this tile at padded head dim `dp` within `limit` bytes of
    /// workgroup memory (never more than [`COOP_SHARED_LIMIT`], what the tests validate).
    /// Both: a K or V tile of at most 5 words of 8 halves per invocation (the prefetch
    /// registers). attention_coop.wgsl: 2 or 4 invocations per softmax row, whole score
    /// fragments per subgroup. attention_warp.wgsl: 16 rows per subgroup, 4 or 8 subgroups,
    /// blocks of 32 or 64 keys, dp <= [`WARP_MAX_DP`].
    pub fn valid(&self, dp: u32, limit: u32) -> bool {
        let wg = self.warps * 32;
        let fits = dp.is_multiple_of(16)
            && dp >= 16
            && self.bk * dp / 8 <= 5 * wg
            && self.shared_bytes(dp) <= limit.min(COOP_SHARED_LIMIT);
        if self.warp {
            return fits
                && [4, 8].contains(&self.warps)
                && self.bq == 16 * self.warps
                && [32, 64].contains(&self.bk)
                && dp <= WARP_MAX_DP;
        }
        let row_blocks = self.bq / 16;
        fits && [32, 64].contains(&self.bq)
            && [32, 64].contains(&self.bk)
            && [4, 8].contains(&self.warps)
            && [2, 4].contains(&(wg / self.bq))
            && self.warps.is_multiple_of(row_blocks)
            && (self.bk / 16).is_multiple_of(self.warps / row_blocks)
            && dp as usize <= COOP_MAX_DP
    }

    /// Whether a device can run this tile at padded head dim `dp`: valid within `limit`, and
    /// for a warp-owned tile the device has subgroup barriers (`Caps::subgroup_barrier`).
    pub fn usable(&self, dp: u32, limit: u32, subgroup_barrier: bool) -> bool {
        (subgroup_barrier || !self.warp) && self.valid(dp, limit)
    }

    /// The launcher's tile at padded head dim `dp` (None: none is usable): the warp-owned
    /// ones first ([`CoopTile::AUTO_WARP`]), then attention_coop.wgsl's ([`CoopTile::AUTO`]).
    pub fn auto(dp: u32, limit: u32, subgroup_barrier: bool) -> Option<CoopTile> {
        Self::AUTO_WARP.iter().chain(&Self::AUTO).copied().find(|t| t.usable(dp, limit, subgroup_barrier))
    }

    /// The pipeline key of this tile at padded head dim `dp`.
    pub fn key(&self, dp: u32) -> PipelineKey {
        if self.warp {
            return PipelineKey::new(Shader::AttentionWarp, "attn")
                .with("BKV", self.bk as i64)
                .with("WARPS", self.warps as i64)
                .with("DP", dp as i64);
        }
        PipelineKey::new(Shader::AttentionCoop, "attn")
            .with("BQ", self.bq as i64)
            .with("BKV", self.bk as i64)
            .with("WARPS", self.warps as i64)
            .with("DP", dp as i64)
    }
}

/// Every cooperative-matrix pipeline the launcher can ask for (each tile of both shaders at
/// each padded head dim where it fits 48 KiB, with and without SAVE_LSE), for the shader
/// tests.
pub fn coop_variants() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for dp in (16..=COOP_MAX_DP as u32).step_by(16) {
        for t in CoopTile::ALL {
            if t.valid(dp, COOP_SHARED_LIMIT) {
                keys.push(t.key(dp));
                keys.push(t.key(dp).with("SAVE_LSE", 1));
            }
        }
    }
    keys
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
    /// Force a path (default: the device's). Cooperative matrices asked for where the device
    /// lacks them or the head dim does not fit run on the scalar kernel (see [`Attention::plan`]).
    pub path: Option<KernelPath>,
    /// Force a cooperative-matrix tile, of either shader (default: [`CoopTile::auto`]). A
    /// tile the device cannot run at this head dim is refused by `prepare`.
    pub tile: Option<CoopTile>,
}

impl Attention {
    /// Attention with scale 1/sqrt(d).
    pub fn new(batch: usize, heads: usize, lq: usize, lk: usize, d: usize, causal: bool) -> Self {
        Attention { batch, heads, lq, lk, d, causal, scale: 1.0 / (d as f32).sqrt(), path: None, tile: None }
    }

    /// Which path (and cooperative-matrix tile) this attention runs on `gpu`: cooperative
    /// matrices where asked for (by `path`, else by the device's path) and offered, when the
    /// padded head dim is at most [`COOP_MAX_DP`] and a tile fits the device's workgroup
    /// memory (the forced `tile`, else [`CoopTile::auto`]: warp-owned up to padded 80 where
    /// the device has subgroup barriers); the scalar kernel otherwise (e.g. the VAE's d = 512).
    pub fn plan(&self, gpu: &Gpu) -> (KernelPath, Option<CoopTile>) {
        let coop = match self.path {
            Some(KernelPath::Coop) => gpu.caps.coop_16x16_f16_f32,
            Some(KernelPath::Scalar) => false,
            None => gpu.caps.path == KernelPath::Coop,
        };
        let dp = coop_dp(self.d);
        if !coop || self.d == 0 || dp > COOP_MAX_DP {
            return (KernelPath::Scalar, None);
        }
        let limit = gpu.caps.limits.max_compute_workgroup_storage_size;
        let tile = match self.tile {
            Some(t) => Some(t), // checked in `prepare`
            None => CoopTile::auto(dp as u32, limit, gpu.caps.subgroup_barrier),
        };
        match tile {
            Some(t) => (KernelPath::Coop, Some(t)),
            None => (KernelPath::Scalar, None),
        }
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
        if !x.offset.is_multiple_of(8) || !x.ld.is_multiple_of(8) || x.ld < width {
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
        self.prepare_impl(gpu, q, k, v, o, None)
    }

    /// As [`Attention::prepare`], also writing each query row's softmax statistic for the
    /// backward: `stats` f32 [batch·heads·lq, 2], row (b·heads + h)·lq + i gets (lse2, 0) with
    /// lse2 = log2 Σ_j exp2(q_i·k_j·scale·log2 e) over the keys row i sees (what
    /// `attnb_stats` computes, to f32 rounding). Hand it to
    /// `AttentionBackward::prepare_with_saved_lse`. `stats` must be in a buffer of its own.
    pub fn prepare_saving(&self, gpu: &Gpu, q: Operand, k: Operand, v: Operand, o: Operand, stats: &Tensor) -> Result<Dispatch> {
        self.prepare_impl(gpu, q, k, v, o, Some(stats))
    }

    fn prepare_impl(&self, gpu: &Gpu, q: Operand, k: Operand, v: Operand, o: Operand, stats: Option<&Tensor>) -> Result<Dispatch> {
        let op = "attention";
        let Attention { batch, heads, lq, lk, d, causal, scale, .. } = *self;
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
        if let Some(st) = stats {
            let rows = batch * heads * lq;
            if st.dtype != DType::F32 {
                return Err(Error::DType { op: op.into(), detail: "the saved statistics (lse) must be f32".into() });
            }
            if st.shape != [rows, 2] || rows > (u32::MAX as usize - 8) / 2 {
                return Err(Error::shape(
                    op,
                    format!("saved statistics {:?}: must be [batch·heads·lq, 2] = [{rows}, 2]", st.shape),
                ));
            }
            for (name, x) in [("q", &q), ("k", &k), ("v", &v), ("o", &o)] {
                if std::sync::Arc::ptr_eq(&st.buffer, &x.tensor.buffer) {
                    return Err(Error::shape(
                        op,
                        format!("the saved statistics must not be in the same buffer as {name} (they are bound writable)"),
                    ));
                }
            }
        }
        let (path, tile) = self.plan(gpu);
        let (key, bq, bk) = match (path, tile) {
            (KernelPath::Coop, Some(t)) => {
                let dp = coop_dp(d) as u32;
                let limit = gpu.caps.limits.max_compute_workgroup_storage_size;
                if !t.valid(dp, limit) {
                    return Err(Error::Usage(format!(
                        "attention: cooperative-matrix tile {t:?} does not fit head dim {d} (padded {dp}): {} bytes of workgroup memory, limit {}",
                        t.shared_bytes(dp),
                        limit.min(COOP_SHARED_LIMIT)
                    )));
                }
                if !t.usable(dp, limit, gpu.caps.subgroup_barrier) {
                    return Err(Error::Usage(format!(
                        "attention: the warp-owned tile {t:?} needs subgroup barriers (SUBGROUP_BARRIER), which this device does not offer"
                    )));
                }
                (t.key(dp), t.bq as usize, t.bk as usize)
            }
            _ => {
                let (bq, bk) = self.tiles();
                (key(), bq, bk)
            }
        };
        let key = if stats.is_some() { key.with("SAVE_LSE", 1) } else { key };
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
        match stats {
            Some(st) => gpu.dispatch(&key, &p, &[q.tensor, k.tensor, v.tensor, o.tensor, st], groups, flops, bytes + bh * lq as f64 * 8.0),
            // Without SAVE_LSE the shader never touches binding 5, but the pipeline's layout
            // lists it: o stands in (the same writable use, so no conflict).
            None => gpu.dispatch(&key, &p, &[q.tensor, k.tensor, v.tensor, o.tensor, o.tensor], groups, flops, bytes),
        }
    }
}
