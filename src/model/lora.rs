//! Trainable LoRA layers (peft semantics) and their AdamW step.
//!
//! One adapter on a frozen linear y = x·Wᵀ (+ b), W [n, k]: A [r, k], B [n, r], scale =
//! alpha / r, and y += scale · B·A·dropout(x) (peft's `lora_B(lora_A(dropout(x))) * scaling`).
//!
//! **Memory layout.** All LoRA parameters of a model live in one flat f32 buffer
//! ([`LoraParams::params`]): A row-major [r, k] at `off_a` and B row-major [n, r] at `off_b`,
//! each offset a multiple of [`LoraParams::align`] elements (so every A and B is a bindable
//! view in f32 and in f16), the gaps and the tail zero. Consecutive layers of the same k, n
//! and rank whose A and B fill whole alignment units form a run laid out as all their A's,
//! then all their B's, back to back ([`layout`]): so the adapters of one fused product (q, k,
//! v) have one stacked A [3r, k] and one stacked B [3n, r] ([`LoraStack`]). The gradients, AdamW's m and v, and the f16 copies the matmuls read use the same
//! offsets in their own flat buffers, so the optimizer step is one pass over flat arrays. The
//! gaps stay zero: nothing writes them, a zero gradient leaves a zero parameter zero.
//!
//! **f16 copies.** The matmul kernels take f16 inputs, so `params16` holds the parameters
//! rounded to f16: written by the AdamW launch after each update, and by
//! [`LoraParams::sync_f16`] (one cast launch) after parameters are set from the host.
//!
//! **Dropout.** Inverted dropout (kept values scaled by 1/(1-p), as torch) on the adapter's
//! input. The mask is not stored: element i of layer l is kept when a counter-based hash of
//! (step seed, layer salt l, i) clears the threshold (`kernels::lora::dropout_keep`), so the
//! backward regenerates exactly the forward's mask. The step seed lives in the `hyper`
//! storage buffer, written by [`LoraParams::set_step`] before each step is recorded, so a
//! plan built once sees a new mask every step.
//!
//! **Forward** (`LoraLayer::forward`), x [M, k] f16, y [M, n] f16 (the frozen output):
//!   xd = dropout(x)            f16 [M, k]  (saved; x itself when p = 0, and when the skinny
//!                                           kernels apply the mask as they read x: rank a
//!                                           multiple of 4, even k, see `lora_skinny::Mask`)
//!   h  = xd·Aᵀ                 f16 [M, r]  (saved)
//!   y += scale · h·Bᵀ
//! **Backward** (`LoraLayer::backward`), dy [M, n] f16:
//!   dB += scale · dyᵀ·h        f32 [n, r]  (into the flat gradient buffer)
//!   dh  = scale · dy·B         f16 [M, r]  (scratch)
//!   dA += dhᵀ·xd               f32 [r, k]
//!   dx += dropout(dh·A)        f16 [M, k]  (same mask and 1/(1-p); dx holds the frozen
//!                                           layer's dy·W already)
//! Parameter gradients accumulate; [`LoraParams::optimizer_step`] zeroes them.
//!
//! **Stacked** ([`LoraStack`], in `lora_stack.rs`): adapters on the projections of one fused
//! product read the same x and write neighbouring column segments of y, so their products run
//! as one launch each (`kernels::lora_skinny`'s stacked forms), with h [M, members·r]:
//!   h   = x·[A_0; A_1; ..]ᵀ                   (one narrow of rank members·r)
//!   y_g += scale · h_g·B_gᵀ                   (one widen over the segments)
//!   dB_g += scale · dy_gᵀ·h_g, dh_g = scale · dy_g·B_g   (one wgrad, one narrow)
//!   dA += dhᵀ·x, dx += dh·[A_0; A_1; ..]      (rank members·r, as one layer)
//! With dropout (equal p, rank a multiple of 4) the h, dA and dx launches apply each member's
//! mask as they read x or write dx (`lora_skinny::Mask`): no xd is stored, x stays saved.
//! At rank ≤ 16 (`kernels::lora_skinny::MAX_RANK`) the rank-wide products (h, dh, dA, dB) use
//! the skinny kernels of `kernels::lora_skinny` (memory-bound, no K-step latency chain; dA and
//! dB summed over row splits with a fixed-order reduce); y and dx, wide outputs with K = r,
//! and every product of larger ranks use the general matmul.
//!
//! **In a training step** (the UNet's LoRA backward mirrors its forward):
//! ```text
//!   once:       lp = LoraParams::new(gpu, &specs, seed); opt = lp.optimizer_step(gpu)
//!   forward:    frozen.forward(pb, x, y); saved[i] = lp.layers[i].forward(pb, x, Operand::dense(y, n))
//!               (x stays alive until the backward when no dropout(x) is stored: xd is x)
//!   backward:   dx = dy·W (the frozen layer's input gradient, `=`), then
//!               lp.layers[i].backward(pb, saved[i], dy, Some(dx), 1/loss scale) (dx +=, dA/dB +=)
//!   each step:  lp.set_step(gpu, &adamw, t, seed_t); replay the plans (several micro-batches
//!               accumulate; give each its own seed through set_step); record `opt`.
//! ```

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PlanBuilder, Tensor};
use crate::kernels::attention::Operand;
use crate::kernels::elementwise;
use crate::kernels::lora as k;
use crate::kernels::lora_skinny as sk;
use crate::kernels::matmul::Matmul;
use crate::model::layers::run_pooled;
use crate::rng::Rng;

pub use crate::model::lora_stack::LoraStack;

/// One adapter to create: the target linear's in and out features, rank, alpha, dropout.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraSpec {
    /// The target's name (e.g. a diffusers module path), for messages and checkpoints.
    pub name: String,
    /// In features (A's columns).
    pub k: usize,
    /// Out features (B's rows).
    pub n: usize,
    pub rank: usize,
    pub alpha: f32,
    /// Dropout probability on the adapter's input, in [0, 1).
    pub dropout: f32,
}

/// One trainable adapter: views into the flat buffers of its [`LoraParams`].
#[derive(Clone, Debug)]
pub struct LoraLayer {
    pub spec: LoraSpec,
    /// alpha / rank.
    pub scale: f32,
    /// Element offsets of A and B in the flat buffers.
    pub off_a: usize,
    pub off_b: usize,
    /// The dropout stream of this layer (its index).
    pub salt: u32,
    /// f32 master weights, their gradients and f16 copies: A [r, k], B [n, r].
    pub a: Tensor,
    pub b: Tensor,
    pub da: Tensor,
    pub db: Tensor,
    pub a16: Tensor,
    pub b16: Tensor,
    /// The shared per-step words (dropout seed, AdamW hyper-parameters).
    pub hyper: Tensor,
}

/// What the forward saves for the backward.
pub struct LoraSaved {
    /// dropout(x) [M, k] f16 (a clone of x when the layer has no dropout).
    pub xd: Tensor,
    /// A·xd [M, r] f16.
    pub h: Tensor,
    pub(crate) xd_owned: bool,
}

impl LoraSaved {
    /// Gives the tensors the adapter made back to the pool unused (its input stays).
    pub fn release(self, pb: &mut PlanBuilder) {
        pb.free(self.h);
        if self.xd_owned {
            pb.free(self.xd);
        }
    }
}

/// torch.optim.AdamW's hyper-parameters plus the global gradient-norm clip.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// torch.nn.utils.clip_grad_norm_'s max_norm over all LoRA gradients; None: no clipping.
    pub max_grad_norm: Option<f64>,
}

impl Default for AdamW {
    /// torch's defaults (lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight_decay 1e-2), no clip.
    fn default() -> Self {
        AdamW { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 1e-2, max_grad_norm: None }
    }
}

/// The `hyper` words for optimizer step `step` (1-based, torch's `state['step']` after its
/// increment) and dropout seed `seed` (see shaders/lora.wgsl for the layout). Scalars are
/// formed in f64 and rounded to f32 once, as torch does with its Python-float scalars.
pub fn hyper_words(opt: &AdamW, step: u64, seed: u64) -> [u32; k::HYPER_WORDS] {
    let t = step.max(1) as i32;
    let bc1 = 1.0 - opt.beta1.powi(t);
    let bc2 = 1.0 - opt.beta2.powi(t);
    let f = |x: f64| (x as f32).to_bits();
    let mut w = [0u32; k::HYPER_WORDS];
    w[0] = seed as u32;
    w[1] = (seed >> 32) as u32;
    w[2] = f(1.0 - opt.lr * opt.weight_decay);
    w[3] = f(1.0 - opt.beta1);
    w[4] = f(opt.beta2);
    w[5] = f(1.0 - opt.beta2);
    w[6] = f(opt.eps);
    w[7] = f(opt.lr / bc1);
    w[8] = f(bc2.sqrt());
    w[9] = f(opt.max_grad_norm.unwrap_or(0.0));
    w
}

/// All LoRA parameters of a model and their optimizer state, as flat buffers (see the module
/// notes for the layout).
pub struct LoraParams {
    pub layers: Vec<LoraLayer>,
    /// Flat length (a multiple of `align`).
    pub total: usize,
    /// Offset granularity in elements.
    pub align: usize,
    /// f32 `[total]`: master weights, gradients, AdamW's first and second moments.
    pub params: Tensor,
    pub grads: Tensor,
    pub m: Tensor,
    pub v: Tensor,
    /// f16 `[total]`: the copies the matmuls read.
    pub params16: Tensor,
    /// f32 partial sums of squares, and (norm, clip coefficient, sum of squares, 0).
    pub partials: Tensor,
    pub stats: Tensor,
    /// u32 `[16]` (held as an f32 tensor): the per-step words.
    pub hyper: Tensor,
}

/// The offsets (off_a, off_b) of each layer and the flat length, for offsets in multiples of
/// `align` elements: runs of consecutive layers with the same k, n and rank whose A (r·k) and
/// B (n·r) are whole multiples of `align` take all their A's, then all their B's, back to back
/// (see the module notes); any other layer its A, then its B.
pub fn layout(specs: &[LoraSpec], align: usize) -> (Vec<(usize, usize)>, usize) {
    let up = |x: usize| x.div_ceil(align) * align;
    let whole = |s: &LoraSpec| (s.rank * s.k).is_multiple_of(align) && (s.n * s.rank).is_multiple_of(align);
    let same = |a: &LoraSpec, b: &LoraSpec| (a.k, a.n, a.rank) == (b.k, b.n, b.rank) && whole(a);
    let mut off = 0;
    let mut v = Vec::with_capacity(specs.len());
    let mut i = 0;
    while i < specs.len() {
        let s = &specs[i];
        let run = 1 + specs[i + 1..].iter().take_while(|t| same(s, t)).count();
        let run = if whole(s) { run } else { 1 };
        let b0 = up(off + run * s.rank * s.k);
        for j in 0..run {
            v.push((off + j * s.rank * s.k, b0 + j * s.n * s.rank));
        }
        off = up(b0 + run * s.n * s.rank);
        i += run;
    }
    (v, off.max(align))
}

/// peft's default initial values in the flat layout: A Kaiming-uniform as
/// `nn.init.kaiming_uniform_(a=sqrt(5))`, i.e. uniform(-b, b) with b = gain·sqrt(3/fan_in),
/// gain = sqrt(2/(1 + 5)), so b = 1/sqrt(k); B zero. Drawn from `Rng::new(seed)` in layer
/// order, A row-major.
pub fn init_values(specs: &[LoraSpec], offsets: &[(usize, usize)], total: usize, seed: u64) -> Vec<f32> {
    let mut rng = Rng::new(seed);
    let mut v = vec![0f32; total];
    for (s, &(off_a, _)) in specs.iter().zip(offsets) {
        let gain = (2.0f64 / (1.0 + 5.0)).sqrt();
        let bound = gain * (3.0 / s.k as f64).sqrt();
        for x in &mut v[off_a..off_a + s.rank * s.k] {
            *x = ((2.0 * rng.uniform() - 1.0) * bound) as f32;
        }
    }
    v
}

fn view(t: &Tensor, off: usize, shape: &[usize]) -> Tensor {
    Tensor { buffer: t.buffer.clone(), offset: t.offset + (off * t.dtype.size()) as u64, shape: shape.to_vec(), dtype: t.dtype }
}

impl LoraParams {
    /// Allocates the flat buffers for `specs`, initialises them as peft does from `seed`
    /// (m, v and the gradients zero) and writes the f16 copies.
    pub fn new(gpu: &Gpu, specs: &[LoraSpec], seed: u64) -> Result<LoraParams> {
        for s in specs {
            if s.k == 0 || s.n == 0 || s.rank == 0 {
                return Err(Error::shape("lora", format!("{}: in {}, out {}, rank {} must be positive", s.name, s.k, s.n, s.rank)));
            }
            if !(0.0..1.0).contains(&s.dropout) {
                return Err(Error::Usage(format!("lora {}: dropout {} must be in [0, 1)", s.name, s.dropout)));
            }
        }
        let align_bytes = gpu.caps.limits.min_storage_buffer_offset_alignment as usize;
        let align = (align_bytes / 2).max(64);
        let (offsets, total) = layout(specs, align);
        let f32t = |what: &str| Tensor::empty(gpu, &[total], DType::F32, what);
        let params = f32t("lora params")?;
        let grads = f32t("lora grads")?;
        let m = f32t("lora adam m")?;
        let v = f32t("lora adam v")?;
        let params16 = Tensor::empty(gpu, &[total], DType::F16, "lora params f16")?;
        let partials = Tensor::empty(gpu, &[k::sumsq_parts(total)], DType::F32, "lora grad-norm partials")?;
        let stats = Tensor::empty(gpu, &[4], DType::F32, "lora grad-norm stats")?;
        let hyper = Tensor::empty(gpu, &[k::HYPER_WORDS], DType::F32, "lora step words")?;
        for t in [&grads, &m, &v, &partials, &stats, &hyper] {
            t.fill_words(gpu, 0);
        }
        let layers = specs
            .iter()
            .zip(&offsets)
            .enumerate()
            .map(|(i, (s, &(off_a, off_b)))| {
                let (ash, bsh) = ([s.rank, s.k], [s.n, s.rank]);
                LoraLayer {
                    spec: s.clone(),
                    scale: s.alpha / s.rank as f32,
                    off_a,
                    off_b,
                    salt: i as u32,
                    a: view(&params, off_a, &ash),
                    b: view(&params, off_b, &bsh),
                    da: view(&grads, off_a, &ash),
                    db: view(&grads, off_b, &bsh),
                    a16: view(&params16, off_a, &ash),
                    b16: view(&params16, off_b, &bsh),
                    hyper: hyper.clone(),
                }
            })
            .collect();
        let lp = LoraParams { layers, total, align, params, grads, m, v, params16, partials, stats, hyper };
        lp.write_params(gpu, &init_values(specs, &offsets, total, seed))?;
        Ok(lp)
    }

    /// GPU bytes of the parameters, their gradients, AdamW's moments and the f16 copies.
    pub fn bytes(&self) -> u64 {
        [&self.params, &self.grads, &self.m, &self.v, &self.params16, &self.partials].iter().map(|t| t.bytes()).sum()
    }

    /// Overwrites the flat f32 parameters (length `total`, gaps zero) and their f16 copies.
    pub fn write_params(&self, gpu: &Gpu, values: &[f32]) -> Result<()> {
        self.params.write_f32(gpu, values)?;
        self.sync_f16(gpu)
    }

    /// Recasts the f32 parameters into the f16 copies (one launch; waits).
    pub fn sync_f16(&self, gpu: &Gpu) -> Result<()> {
        gpu.run_now(&elementwise::cast(gpu, &self.params, &self.params16)?)
    }

    /// Writes the per-step words: the dropout seed of this step and AdamW's scalars for step
    /// `step` (1-based). Call before recording the step (queue writes land before the next
    /// submit).
    pub fn set_step(&self, gpu: &Gpu, opt: &AdamW, step: u64, dropout_seed: u64) {
        let w = hyper_words(opt, step, dropout_seed);
        gpu.queue.write_buffer(&self.hyper.buffer, self.hyper.offset, bytemuck::cast_slice(&w));
    }

    /// The optimizer step's launches (prepare once, replay every step): gradient norm, then
    /// AdamW with the clip, which also refreshes the f16 copies and zeroes the gradients.
    pub fn optimizer_step(&self, gpu: &Gpu) -> Result<Vec<Dispatch>> {
        k::adamw_step(gpu, &self.params, &self.grads, &self.m, &self.v, &self.params16, &self.partials, &self.stats, &self.hyper)
    }

    /// Zeroes the gradients from the host (the AdamW launch zeroes them itself; this is for a
    /// step that is skipped, e.g. after a non-finite loss).
    pub fn zero_grads(&self, gpu: &Gpu) {
        self.grads.fill_words(gpu, 0);
    }

    /// The last step's (gradient norm before clipping, clip coefficient); waits for the GPU.
    pub fn grad_norm(&self, gpu: &Gpu) -> Result<(f32, f32)> {
        let s = self.stats.to_f32(gpu)?;
        Ok((s[0], s[1]))
    }

    /// Whether the last optimizer step was skipped because a gradient was not finite (an f16
    /// activation gradient overflowed: lower the loss scale); waits for the GPU.
    pub fn step_skipped(&self, gpu: &Gpu) -> Result<bool> {
        Ok(self.stats.to_f32(gpu)?[3] != 0.0)
    }
}

/// The trainable adapters of a model by target module name (their [`LoraSpec::name`]), as a
/// training forward looks them up, with the factor its backward applies to parameter
/// gradients (1 / the loss scale).
pub struct Adapters<'a> {
    pub params: &'a LoraParams,
    pub grad_scale: f32,
    index: std::collections::HashMap<&'a str, usize>,
}

impl<'a> Adapters<'a> {
    pub fn new(params: &'a LoraParams, grad_scale: f32) -> Self {
        let index = params.layers.iter().enumerate().map(|(i, l)| (l.spec.name.as_str(), i)).collect();
        Adapters { params, grad_scale, index }
    }

    /// The adapter on module `name`, if it has one.
    pub fn get(&self, name: &str) -> Option<&'a LoraLayer> {
        self.index.get(name).map(|&i| &self.params.layers[i])
    }
}

/// Records a skinny weight gradient into `g` (a layer's dA or dB view), its partials from the
/// plan's pool.
pub(crate) fn run_wgrad(pb: &mut PlanBuilder, wg: &sk::WeightGrad, x: Operand, h: &Tensor, g: &Tensor) -> Result<()> {
    match wg.partials_len() {
        Some(len) => {
            let parts = pb.tensor(&[len], DType::F32, "lora weight-gradient partials")?;
            pb.run_all(wg.prepare(pb.gpu, x, h, g, 0, Some(&parts))?)?;
            pb.free(parts);
            Ok(())
        }
        None => pb.run_all(wg.prepare(pb.gpu, x, h, g, 0, None)?),
    }
}

impl LoraLayer {
    /// Whether the rank-wide products use the skinny kernels (`kernels::lora_skinny`); larger
    /// ranks go through the general matmul.
    fn skinny(&self) -> bool {
        self.spec.rank <= sk::MAX_RANK
    }

    /// With dropout, the mask the skinny kernels apply as they read x and write dx (rank a
    /// multiple of 4, even k): no dropout(x) copy and no dropout launches. Else None (the
    /// dropout kernel makes xd, and masks dh·A). A stack of such layers uses its first
    /// member's mask (member g's stream follows at salt + g).
    pub(crate) fn mask(&self) -> Option<sk::Mask> {
        let s = &self.spec;
        (s.dropout > 0.0 && self.skinny() && s.rank.is_multiple_of(4) && s.k.is_multiple_of(2))
            .then(|| sk::Mask { hyper: self.hyper.clone(), salt: self.salt, p: s.dropout, rank: s.rank })
    }

    pub(crate) fn rows(&self, op: &str, t: &Tensor, width: usize) -> Result<usize> {
        let rows = t.numel() / width;
        if t.dtype != DType::F16 || t.numel() != rows * width || rows == 0 {
            return Err(Error::shape(op, format!("{}: {:?} {} must be f16 rows of {width}", self.spec.name, t.shape, t.dtype)));
        }
        Ok(rows)
    }

    /// Records the adapter's forward, adding scale·B·A·dropout(x) into `y` (the frozen
    /// layer's output [M, n], possibly its columns of a fused product); x [M, k]. Returns what
    /// the backward needs.
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, y: Operand) -> Result<LoraSaved> {
        let s = &self.spec;
        let rows = self.rows("lora forward", x, s.k)?;
        check_cols("lora forward", &s.name, &y, rows, s.n)?;
        let mask = self.mask();
        let (xd, xd_owned) = if s.dropout > 0.0 && mask.is_none() {
            let xd = pb.f16(&[rows, s.k], "lora dropout(x)")?;
            pb.run(k::dropout(pb.gpu, x, &xd, &self.hyper, self.salt, s.dropout, false)?)?;
            (xd, true)
        } else {
            (x.clone(), false)
        };
        let h = pb.f16(&[rows, s.rank], "lora h")?;
        if let Some(mask) = &mask {
            pb.run(sk::narrow_masked(pb.gpu, x, &self.a16, &h, rows, s.k, s.rank, 1.0, mask)?)?;
        } else if self.skinny() {
            pb.run(sk::narrow(pb.gpu, Operand::dense(&xd, s.k), &self.a16, true, &h, rows, s.k, s.rank, 1.0)?)?;
        } else {
            let mut mm = Matmul::new(rows, s.rank, s.k);
            mm.trans_b = true;
            run_pooled(pb, &mm, &xd, &self.a16, None, &h)?;
        }
        if self.skinny() && s.n.is_multiple_of(2) {
            pb.run(sk::widen(pb.gpu, &h, &self.b16, true, y, rows, s.n, s.rank, self.scale, true)?)?;
        } else {
            let mut mm = Matmul::new(rows, s.n, s.rank);
            mm.trans_b = true;
            mm.alpha = self.scale;
            mm.accumulate = true;
            (mm.ldc, mm.off_c) = (Some(y.ld), y.offset);
            run_pooled(pb, &mm, &h, &self.b16, None, y.tensor)?;
        }
        Ok(LoraSaved { xd, h, xd_owned })
    }

    /// Records the adapter's backward from `dy` [M, n] (possibly columns of a wider tensor):
    /// dA and dB accumulate into the flat gradient buffer, multiplied by `grad_scale` (1 / the
    /// loss scale of f16 activation gradients, so the f32 parameter gradients are the true
    /// ones); with `dx` [M, k], the adapter's input gradient (at dy's scale) is added into it.
    /// Gives the saved tensors back to the plan's pool.
    pub fn backward(&self, pb: &mut PlanBuilder, saved: LoraSaved, dy: Operand, dx: Option<&Tensor>, grad_scale: f32) -> Result<()> {
        let s = &self.spec;
        let rows = saved.h.numel() / s.rank;
        check_cols("lora backward", &s.name, &dy, rows, s.n)?;
        if dx.map(|t| self.rows("lora backward", t, s.k)).transpose()?.is_some_and(|r| r != rows) {
            return Err(Error::shape("lora backward", format!("{}: dx {:?} does not match the forward's {rows} rows", s.name, dx.map(|t| t.shape.clone()))));
        }
        let dh = pb.f16(&[rows, s.rank], "lora dh")?;
        if self.skinny() {
            // dB [n, r] += scale · dyᵀ·h; dh [M, r] = scale · dy·B; dA [r, k] += dhᵀ·xd.
            let db = sk::WeightGrad::new(rows, s.n, s.rank, self.scale * grad_scale, false);
            run_wgrad(pb, &db, dy, &saved.h, &self.db)?;
            pb.run(sk::narrow(pb.gpu, dy, &self.b16, false, &dh, rows, s.n, s.rank, self.scale)?)?;
            let mut da = sk::WeightGrad::new(rows, s.k, s.rank, grad_scale, true);
            if let Some(mask) = self.mask() {
                da = da.masked(mask); // saved.xd is x itself
            }
            run_wgrad(pb, &da, Operand::dense(&saved.xd, s.k), &dh, &self.da)?;
        } else {
            // dB [n, r] += scale · dyᵀ·h: A = dy stored [M, n] = [K, M'], B = h [M, r] = [K, N].
            let mut mm = Matmul::new(s.n, s.rank, rows);
            mm.trans_a = true;
            mm.alpha = self.scale * grad_scale;
            mm.accumulate = true;
            (mm.lda, mm.off_a) = (Some(dy.ld), dy.offset);
            run_pooled(pb, &mm, dy.tensor, &saved.h, None, &self.db)?;
            // dh [M, r] = scale · dy·B, B [n, r] = [K, N].
            let mut mm = Matmul::new(rows, s.rank, s.n);
            mm.alpha = self.scale;
            (mm.lda, mm.off_a) = (Some(dy.ld), dy.offset);
            run_pooled(pb, &mm, dy.tensor, &self.b16, None, &dh)?;
            // dA [r, k] += dhᵀ·xd.
            let mut mm = Matmul::new(s.rank, s.k, rows);
            mm.trans_a = true;
            mm.alpha = grad_scale;
            mm.accumulate = true;
            run_pooled(pb, &mm, &dh, &saved.xd, None, &self.da)?;
        }
        if let Some(dx) = dx {
            // dx [M, k] += dropout(dh·A), A [r, k] = [K, N].
            let wide = self.skinny() && s.k.is_multiple_of(2);
            let mut mm = Matmul::new(rows, s.k, s.rank);
            let dense = |t| Operand::dense(t, s.k);
            if let Some(mask) = self.mask() {
                pb.run(sk::widen_masked(pb.gpu, &dh, &self.a16, dx, rows, s.k, s.rank, 1.0, true, &mask)?)?;
            } else if s.dropout > 0.0 {
                let g = pb.f16(&[rows, s.k], "lora dh·A")?;
                if wide {
                    pb.run(sk::widen(pb.gpu, &dh, &self.a16, false, dense(&g), rows, s.k, s.rank, 1.0, false)?)?;
                } else {
                    run_pooled(pb, &mm, &dh, &self.a16, None, &g)?;
                }
                pb.run(k::dropout(pb.gpu, &g, dx, &self.hyper, self.salt, s.dropout, true)?)?;
                pb.free(g);
            } else if wide {
                pb.run(sk::widen(pb.gpu, &dh, &self.a16, false, dense(dx), rows, s.k, s.rank, 1.0, true)?)?;
            } else {
                mm.accumulate = true;
                run_pooled(pb, &mm, &dh, &self.a16, None, dx)?;
            }
        }
        pb.free(dh);
        pb.free(saved.h);
        if saved.xd_owned {
            pb.free(saved.xd);
        }
        Ok(())
    }
}

/// `t` as [rows, width] columns of an f16 tensor, in bounds: a column slice (offset or stride
/// not the dense ones) needs an even offset, stride and width (the skinny kernels write whole
/// words). One adapter's output or a stack's.
pub(crate) fn check_cols(op: &str, name: &str, t: &Operand, rows: usize, width: usize) -> Result<()> {
    let end = t.offset + (rows - 1) * t.ld + width;
    let strided = t.offset != 0 || t.ld != width;
    let odd = t.offset % 2 == 1 || t.ld % 2 == 1 || width % 2 == 1;
    if t.tensor.dtype != DType::F16 || t.ld < width || (strided && odd) || end > t.tensor.numel() {
        return Err(Error::shape(
            op,
            format!("{name}: {:?} {} (offset {}, row stride {}) must hold {rows} f16 rows of {width} (a column slice needs even offset, stride and width)", t.tensor.shape, t.tensor.dtype, t.offset, t.ld),
        ));
    }
    Ok(())
}
