//! The layers the three networks are made of, loaded from weights and recorded into a plan:
//! linear (optionally several projections fused into one product), 2-D convolution (weights
//! reordered to [cout, ks, ks, cin] at load, 1x1 convolutions run as linears over NHWC
//! pixels, 3x3 ones at inference by Winograd F(2x2, 3x3) where the loader marks them, or
//! kept as an upsampler's four phase weights: the VAE decoder's; to at most 4 channels over a
//! large image, directly: `kernels::conv_thin`; other 3x3 ones with enough tiles on
//! cooperative matrices from a staged input tile: `kernels::conv_coop`), group norm (with the
//! fused SiLU) and layer norm. Activations are f16, NHWC images or token-major rows. For
//! training, each layer also records its input gradient through the frozen weights
//! (`backward_input`, `*_backward`) and the norms save their statistics.
//! [`attention_materialised`]: single-head attention with a head too wide for the flash
//! kernels' tensor-core registers (the VAE's 512), on the matmul kernels.

use crate::error::{Error, Result};
use crate::gpu::{DType, PlanBuilder, Tensor};
use crate::kernels::conv::{conv_weight_to_nhwc, upsample_conv_weight, Conv2d, Upsample2xConv};
use crate::kernels::{conv_coop, conv_thin};
use crate::kernels::grad_ops::{slice_cols, GradOut};
use crate::kernels::tensor_ops::softmax_rows;
use crate::kernels::matmul::{BiasLayout, Matmul};
use crate::kernels::winograd::{transform_weight, Winograd, POSITIONS};
use crate::kernels::norm::{self, GroupNorm};
use crate::kernels::norm_backward::{self, GroupNormBackward};
use crate::model::weights::Prefix;

/// y = x·Wᵀ + b with W [n, k].
pub struct Linear {
    pub w: Tensor,
    pub b: Option<Tensor>,
    pub n: usize,
    pub k: usize,
}

impl Linear {
    /// `<p>.weight` [n, k] and, with `bias`, `<p>.bias` [n].
    pub fn load(p: &Prefix, n: usize, k: usize, bias: bool) -> Result<Linear> {
        let w = p.get("weight", &[n, k])?;
        let b = if bias { Some(p.get("bias", &[n])?) } else { None };
        Ok(Linear { w, b, n, k })
    }

    /// A 1x1 convolution `<p>.weight` [n, k, 1, 1] as a linear over pixels.
    pub fn load_1x1(p: &Prefix, n: usize, k: usize) -> Result<Linear> {
        let mut w = p.get("weight", &[n, k, 1, 1])?;
        w.shape = vec![n, k];
        Ok(Linear { w, b: Some(p.get("bias", &[n])?), n, k })
    }

    /// Several projections of one input stacked into one weight: `<p>.<name>.weight` [n_i, k]
    /// for each name (and their biases), so one product gives their outputs side by side.
    pub fn load_fused(p: &Prefix, names: &[&str], n: &[usize], k: usize, bias: bool) -> Result<Linear> {
        let total: usize = n.iter().sum();
        let mut w = Vec::with_capacity(total * k);
        let mut b = Vec::with_capacity(total);
        for (name, &rows) in names.iter().zip(n) {
            let q = p.at(name);
            w.extend(q.get_f32("weight", &[rows, k])?);
            if bias {
                b.extend(q.get_f32("bias", &[rows])?);
            }
        }
        let fused = format!("{{{}}}", names.join(","));
        let w = p.upload(&format!("{fused}.weight"), &[total, k], &w)?;
        let b = if bias { Some(p.upload(&format!("{fused}.bias"), &[total], &b)?) } else { None };
        Ok(Linear { w, b, n: total, k })
    }

    /// Records y [rows, n] (=, or += with `accumulate`) from x [rows, k].
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, y: &Tensor, accumulate: bool) -> Result<()> {
        let rows = x.numel() / self.k;
        if x.numel() != rows * self.k || y.numel() != rows * self.n {
            return Err(Error::shape("linear", format!("x {:?}, y {:?} for W [{}, {}]", x.shape, y.shape, self.n, self.k)));
        }
        let mut mm = Matmul::new(rows, self.n, self.k);
        mm.trans_b = true;
        mm.accumulate = accumulate;
        run_pooled(pb, &mm, x, &self.w, self.b.as_ref(), y)
    }

    /// A new tensor [rows, n] = x·Wᵀ + b.
    pub fn apply(&self, pb: &mut PlanBuilder, x: &Tensor, what: &str) -> Result<Tensor> {
        let rows = x.numel() / self.k;
        let y = pb.f16(&[rows, self.n], what)?;
        self.forward(pb, x, &y, false)?;
        Ok(y)
    }

    /// Records the input gradient through the frozen weight: dx [rows, k] (=, or += with
    /// `accumulate`) = dy [rows, n]·W.
    pub fn backward_input(&self, pb: &mut PlanBuilder, dy: &Tensor, dx: &Tensor, accumulate: bool) -> Result<()> {
        let rows = dy.numel() / self.n;
        if dy.numel() != rows * self.n || dx.numel() != rows * self.k {
            return Err(Error::shape("linear backward", format!("dy {:?}, dx {:?} for W [{}, {}]", dy.shape, dx.shape, self.n, self.k)));
        }
        let mut mm = Matmul::new(rows, self.k, self.n);
        mm.accumulate = accumulate;
        run_pooled(pb, &mm, dy, &self.w, None, dx)
    }

    /// A new tensor [rows, k] = dy·W.
    pub fn backward_new(&self, pb: &mut PlanBuilder, dy: &Tensor, what: &str) -> Result<Tensor> {
        let dx = pb.f16(&[dy.numel() / self.n, self.k], what)?;
        self.backward_input(pb, dy, &dx, false)?;
        Ok(dx)
    }
}

/// How a [`Conv`] runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvForm {
    /// Implicit GEMM on the weight [cout, ks, ks, cin] (matmul shaders, override CONV).
    Direct,
    /// Winograd F(2x2, 3x3) (`kernels::winograd`) from its transformed weight U [16, cout,
    /// cin], kept instead of the weight: forward only.
    Winograd,
    /// Winograd F(2x2, 3x3) from a U made from the weight [cout, 3, 3, cin] before each use:
    /// for large weights, whose U would take 16/9 of their memory.
    WinogradFromWeight,
    /// The convolution after a nearest 2x upsample, kept as its four phase weights [4, cout,
    /// 2, 2, cin] (`kernels::conv::Upsample2xConv`): run by [`Conv::upsample2x`] on the small
    /// image, forward only.
    UpsamplePhases,
}

/// Winograd convolutions keep their transformed weight (16/9 of the weight's memory) up to
/// this many (input, output) channel pairs, and make it before each use above. SD-1.5's UNet:
/// the 64x64 and 32x32 levels' weights (up to 640 -> 1280) are kept transformed (+90 MiB),
/// the 16x16 level's (191 M weights, and the 32x32 level's 1280 -> 1280 and 1920 -> 640) are
/// transformed each time: +~0.45 ms a batch-2 call on the H100, where keeping them would take
/// +345 MiB (docs/PERF.md).
pub const WINOGRAD_KEEP_MAX: usize = 640 * 1280;

/// A square 2-D convolution with bias over NHWC images.
pub struct Conv {
    /// The weight [cout, ks, ks, cin], or in the `Winograd` form its transform U [16, cout,
    /// cin].
    pub w: Tensor,
    pub b: Tensor,
    pub cin: usize,
    pub cout: usize,
    pub ks: usize,
    pub stride: usize,
    /// Padding of one pixel on the bottom and right only (the VAE encoder's downsamplers:
    /// `F.pad(x, (0, 1, 0, 1))` then padding 0); else ks/2 on every side.
    pub pad_end_only: bool,
    /// Direct, or by Winograd for a 3x3 stride-1 convolution loaded under a prefix that wants
    /// it ([`Prefix::wants_winograd`]).
    pub form: ConvForm,
}

impl Conv {
    /// `<p>.weight` [cout, cin, ks, ks] (reordered to [cout, ks, ks, cin], or transformed for
    /// Winograd where `p` wants it and the shape allows) and `<p>.bias`; padding ks/2.
    pub fn load(p: &Prefix, cin: usize, cout: usize, ks: usize, stride: usize) -> Result<Conv> {
        let w = p.get_f32("weight", &[cout, cin, ks, ks])?;
        let b = p.get("bias", &[cout])?;
        let mut form = ConvForm::Direct;
        if ks == 3 && stride == 1 && p.wants_winograd() && Winograd::supports(cin, cout) {
            if cin * cout <= WINOGRAD_KEEP_MAX {
                let u = p.upload("weight (Winograd)", &[POSITIONS, cout, cin], &transform_weight(&w, cout, cin))?;
                return Ok(Conv { w: u, b, cin, cout, ks, stride, pad_end_only: false, form: ConvForm::Winograd });
            }
            form = ConvForm::WinogradFromWeight;
        }
        let w = conv_weight_to_nhwc(&w, cout, cin, ks, ks);
        let w = p.upload("weight", &[cout, ks, ks, cin], &w)?;
        Ok(Conv { w, b, cin, cout, ks, stride, pad_end_only: false, form })
    }

    /// A 3x3 convolution that follows a nearest 2x upsample (`<p>.weight` [c, c, 3, 3],
    /// `<p>.bias`), kept as its four phase weights (16/9 of the weight) for [`Conv::upsample2x`]: for
    /// inference (the VAE decoder's upsamplers), it has no input gradient.
    pub fn load_upsample_phases(p: &Prefix, c: usize) -> Result<Conv> {
        let w = p.get_f32("weight", &[c, c, 3, 3])?;
        let b = p.get("bias", &[c])?;
        let w = p.upload("weight (upsample phases)", &[4, c, 2, 2, c], &upsample_conv_weight(&w, c, c))?;
        Ok(Conv { w, b, cin: c, cout: c, ks: 3, stride: 1, pad_end_only: false, form: ConvForm::UpsamplePhases })
    }

    /// Records y [batch, 2h, 2w, cout] = this convolution of x [batch, h, w, cin] upsampled
    /// 2x (nearest), from a convolution loaded by [`Conv::load_upsample_phases`]: the four
    /// phase convolutions of the small image, no upsampled image.
    pub fn upsample2x(&self, pb: &mut PlanBuilder, x: &Tensor, (batch, h, w): (usize, usize, usize), y: &Tensor) -> Result<()> {
        if self.form != ConvForm::UpsamplePhases {
            return Err(Error::Usage("conv2d: upsample2x needs a convolution loaded by Conv::load_upsample_phases".into()));
        }
        let up = Upsample2xConv::new(batch, h, w, self.cin, self.cout);
        if conv_coop::preferred_phases(pb.gpu, &up) {
            return pb.run(conv_coop::run_phases(pb.gpu, &up, x, &self.w, Some(&self.b), y)?);
        }
        up.run(pb.gpu, &mut pb.rec, x, &self.w, Some(&self.b), y)
    }

    /// As [`Conv::load`], padded by one pixel at the bottom and right only.
    pub fn load_end_pad(p: &Prefix, cin: usize, cout: usize, ks: usize, stride: usize) -> Result<Conv> {
        Ok(Conv { pad_end_only: true, ..Conv::load(p, cin, cout, ks, stride)? })
    }

    /// The output size for an h x w input.
    pub fn out_hw(&self, h: usize, w: usize) -> (usize, usize) {
        self.shape(1, h, w).out_hw()
    }

    fn shape(&self, batch: usize, h: usize, w: usize) -> Conv2d {
        if self.pad_end_only {
            // Sized as the padded image with padding 0; `forward` points the gather back at
            // the real one, whose reads past the bottom and right edges give zeros.
            return Conv2d::new(batch, h + 1, w + 1, self.cin, self.cout, self.ks, self.stride, 0);
        }
        Conv2d::new(batch, h, w, self.cin, self.cout, self.ks, self.stride, self.ks / 2)
    }

    /// Records y [batch, oh, ow, cout] (=, or += with `accumulate`) from x [batch, h, w, cin].
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, hw: (usize, usize, usize), y: &Tensor, accumulate: bool) -> Result<()> {
        self.record(pb, x, hw, y, accumulate, &self.b, BiasLayout::default())
    }

    /// As [`Conv::forward`] (=), with the bias read from `bias` by `layout` instead of the
    /// layer's own (a resnet's conv1: its bias plus the time embedding, one row per image).
    pub fn forward_with_bias(&self, pb: &mut PlanBuilder, x: &Tensor, hw: (usize, usize, usize), y: &Tensor, bias: &Tensor, layout: BiasLayout) -> Result<()> {
        self.record(pb, x, hw, y, false, bias, layout)
    }

    #[allow(clippy::too_many_arguments)]
    fn record(&self, pb: &mut PlanBuilder, x: &Tensor, (batch, h, w): (usize, usize, usize), y: &Tensor, accumulate: bool, bias: &Tensor, layout: BiasLayout) -> Result<()> {
        let conv = self.shape(batch, h, w);
        let (oh, ow) = self.out_hw(h, w);
        if x.numel() != batch * h * w * self.cin || y.numel() != batch * oh * ow * self.cout {
            return Err(Error::shape("conv2d", format!("x {:?}, y {:?} for {batch}x{h}x{w}, {} -> {}", x.shape, y.shape, self.cin, self.cout)));
        }
        // The Winograd scratch (V, about 4x the input; the f32 products M, 8x the output) must
        // fit the device's buffer limits; a convolution that still has its weight runs directly
        // where it would not.
        let wc = match self.form {
            ConvForm::Direct => None,
            ConvForm::UpsamplePhases => return Err(Error::Usage("conv2d: a convolution kept as upsample phase weights runs only by Conv::upsample2x".into())),
            ConvForm::Winograd | ConvForm::WinogradFromWeight => Some(Winograd::new(batch, h, w, self.cin, self.cout)?),
        };
        let fits = |wc: &Winograd| pb.gpu.check_size("winograd scratch", wc.largest_scratch()).is_ok();
        if let Some(wc) = wc.filter(|wc| self.form == ConvForm::Winograd || fits(wc)) {
            let made = match self.form {
                ConvForm::WinogradFromWeight => {
                    let u = pb.f16(&[POSITIONS, self.cout, self.cin], "winograd U")?;
                    pb.run(wc.weight(pb.gpu, &self.w, &u)?)?;
                    Some(u)
                }
                _ => None,
            };
            let v = pb.tensor(&wc.v_shape(), DType::F16, "winograd V (ATELIER_WINOGRAD=0 runs without it)")?;
            let m = pb.tensor(&wc.m_shape(), DType::F32, "winograd M (ATELIER_WINOGRAD=0 runs without it)")?;
            wc.run(pb.gpu, &mut pb.rec, x, made.as_ref().unwrap_or(&self.w), Some((bias, layout)), y, accumulate, &v, &m)?;
            for t in [v, m].into_iter().chain(made) {
                pb.free(t);
            }
            return Ok(());
        }
        // A convolution to at most 4 channels over a large image (the VAE decoder's conv_out)
        // runs directly (`kernels::conv_thin`), not as a 4-column sliver of matmul tiles.
        if !self.pad_end_only && !accumulate && layout == BiasLayout::default() && conv_thin::preferred(&conv) {
            return pb.run(conv_thin::run(pb.gpu, &conv, x, &self.w, Some(bias), y)?);
        }
        // A 3x3 convolution with enough tiles runs on cooperative matrices from an input tile
        // staged once per channel chunk (`kernels::conv_coop`), not from the gathered im2col.
        if !self.pad_end_only && conv_coop::preferred(pb.gpu, &conv, &layout) {
            return pb.run(conv_coop::run(pb.gpu, &conv, x, &self.w, Some((bias, layout)), y, accumulate)?);
        }
        let mut mm = conv.matmul()?;
        if let (true, Some(g)) = (self.pad_end_only, mm.conv.as_mut()) {
            (g.ih, g.iw) = (h, w);
        }
        mm.accumulate = accumulate;
        mm.bias_layout = layout;
        run_pooled(pb, &mm, x, &self.w, Some(bias), y)
    }

    /// A new tensor [batch, oh, ow, cout] = conv(x).
    pub fn apply(&self, pb: &mut PlanBuilder, x: &Tensor, (batch, h, w): (usize, usize, usize), what: &str) -> Result<Tensor> {
        let (oh, ow) = self.out_hw(h, w);
        let y = pb.f16(&[batch, oh, ow, self.cout], what)?;
        self.forward(pb, x, (batch, h, w), &y, false)?;
        Ok(y)
    }
}

impl Conv {
    /// Records the input gradient through the frozen weight: dx [batch, h, w, cin] (=) from
    /// dy [batch, oh, ow, cout]. The product reads the forward weight itself, flipped and
    /// channel-transposed through an index remap (`Conv2d::backward_input`): no copy of it is
    /// built or allocated.
    pub fn backward_input(&self, pb: &mut PlanBuilder, dy: &Tensor, (batch, h, w): (usize, usize, usize), dx: &Tensor) -> Result<()> {
        if self.pad_end_only {
            return Err(Error::shape("conv2d backward", "end-only padding (the VAE encoder's downsamplers) has no input gradient here"));
        }
        if self.form == ConvForm::Winograd {
            return Err(Error::Usage("conv2d backward: a convolution loaded in Winograd form (inference) has no input gradient; load the weights without LoadOptions::winograd to train".into()));
        }
        if self.form == ConvForm::UpsamplePhases {
            return Err(Error::Usage("conv2d backward: a convolution kept as upsample phase weights (the VAE decoder's, inference) has no input gradient".into()));
        }
        let conv = self.shape(batch, h, w);
        let (oh, ow) = conv.out_hw();
        if dy.numel() != batch * oh * ow * self.cout || dx.numel() != batch * h * w * self.cin {
            return Err(Error::shape("conv2d backward", format!("dy {:?}, dx {:?} for {batch}x{h}x{w}, {} -> {}", dy.shape, dx.shape, self.cin, self.cout)));
        }
        run_pooled(pb, &conv.backward_input()?, dy, &self.w, None, dx)
    }
}

/// Query rows of one [`attention_materialised`] chunk: its f32 scores stay within 16 Mi
/// values (64 MiB), at least 256 rows.
pub fn score_chunk(l: usize) -> usize {
    ((16 << 20) / l.max(1)).max(256).min(l.max(1))
}

/// Single-head self-attention o = softmax(q·kᵀ/√c)·v, q, k, v the column thirds of `qkv`
/// [batch·l, 3c] (f16), into `o` [batch·l, c] (f16), with the scores materialised in chunks
/// of query rows on the matmul kernels: S = q·kᵀ/√c (f32), P = softmax(S) (f16, rows padded
/// to a multiple of 8), o = P·v (f32 accumulation). For heads too wide for the flash
/// kernels' registers on tensor cores (the VAE's c = 512: the scalar flash kernel ran its
/// 4096 tokens at 2.5 TFLOP/s on the H100). k and v are first copied dense (the product's B
/// has no row stride). The same rounding points as the flash kernels (P in f16, f32
/// accumulation); c even.
pub fn attention_materialised(pb: &mut PlanBuilder, qkv: &Tensor, o: &Tensor, batch: usize, l: usize, c: usize) -> Result<()> {
    attention_materialised_chunked(pb, qkv, o, batch, l, c, score_chunk(l))
}

/// [`attention_materialised`] with `chunk` query rows a chunk (the tests' handle on it).
pub fn attention_materialised_chunked(pb: &mut PlanBuilder, qkv: &Tensor, o: &Tensor, batch: usize, l: usize, c: usize, chunk: usize) -> Result<()> {
    let rows = batch * l;
    if qkv.numel() != rows * 3 * c || o.numel() != rows * c || !c.is_multiple_of(2) || rows == 0 || chunk == 0 {
        return Err(Error::shape("attention", format!("qkv {:?} and o {:?} for batch {batch}, {l} tokens, width {c} (even)", qkv.shape, o.shape)));
    }
    let k = pb.f16(&[rows, c], "attention k (dense)")?;
    let v = pb.f16(&[rows, c], "attention v (dense)")?;
    pb.run(slice_cols(pb.gpu, qkv, GradOut::set(&k), rows, c, c, 3 * c)?)?;
    pb.run(slice_cols(pb.gpu, qkv, GradOut::set(&v), rows, 2 * c, c, 3 * c)?)?;
    let chunk = chunk.min(l);
    let ldp = l.div_ceil(8) * 8;
    let s = pb.tensor(&[chunk, l], DType::F32, "attention scores")?;
    let p = pb.f16(&[chunk, ldp], "attention probabilities")?;
    for b in 0..batch {
        for i0 in (0..l).step_by(chunk) {
            let m = chunk.min(l - i0);
            let row0 = b * l + i0;
            // S [m, l] = q[rows] · k_bᵀ / √c.
            let mut qk = Matmul::new(m, l, c);
            qk.trans_b = true;
            qk.alpha = 1.0 / (c as f32).sqrt();
            (qk.lda, qk.off_a, qk.off_b) = (Some(3 * c), row0 * 3 * c, b * l * c);
            run_pooled(pb, &qk, qkv, &k, None, &s)?;
            pb.run(softmax_rows(pb.gpu, &s, &p, m, l, ldp)?)?;
            // o[rows] = P [m, l] · v_b [l, c].
            let mut pv = Matmul::new(m, c, l);
            (pv.lda, pv.off_b, pv.ldc, pv.off_c) = (Some(ldp), b * l * c, Some(c), row0 * c);
            run_pooled(pb, &pv, &p, &v, None, o)?;
        }
    }
    for t in [k, v, s, p] {
        pb.free(t);
    }
    Ok(())
}

/// Records a product, its split-K partials (when it splits) taken from the plan's pool.
pub(crate) fn run_pooled(pb: &mut PlanBuilder, mm: &Matmul, x: &Tensor, w: &Tensor, b: Option<&Tensor>, y: &Tensor) -> Result<()> {
    if let Some(shape) = mm.partials_shape(pb.gpu) {
        let parts = pb.tensor(&shape, DType::F32, "split-K partials")?;
        mm.run_split(pb.gpu, &mut pb.rec, x, w, b, y, &parts)?;
        pb.free(parts);
        return Ok(());
    }
    mm.run(pb.gpu, &mut pb.rec, x, w, b, y)
}

/// Group norm or layer norm parameters: `<p>.weight` and `<p>.bias` [c].
pub struct Norm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub c: usize,
    pub eps: f32,
}

impl Norm {
    pub fn load(p: &Prefix, c: usize, eps: f32) -> Result<Norm> {
        Ok(Norm { gamma: p.get("weight", &[c])?, beta: p.get("bias", &[c])?, c, eps })
    }

    /// A new tensor: GroupNorm(x) over `groups` groups per image (then SiLU), x [batch, rows, c].
    pub fn group(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, groups: usize, silu: bool, what: &str) -> Result<Tensor> {
        let rows = x.numel() / (batch * self.c).max(1);
        let gn = GroupNorm::new(pb.gpu, batch, rows, self.c, groups, self.eps, silu)?;
        let y = pb.f16(&x.shape, what)?;
        pb.run_all(gn.prepare(pb.gpu, x, &self.gamma, &self.beta, &y)?)?;
        Ok(y)
    }

    /// As [`Norm::group`], also returning the f32 statistics the backward needs (a pool
    /// tensor [batch·groups, 4]) when `save`.
    #[allow(clippy::too_many_arguments)]
    pub fn group_saving(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, groups: usize, silu: bool, save: bool, what: &str) -> Result<(Tensor, Option<Tensor>)> {
        if !save {
            return Ok((self.group(pb, x, batch, groups, silu, what)?, None));
        }
        let rows = x.numel() / (batch * self.c).max(1);
        let gn = GroupNorm::new(pb.gpu, batch, rows, self.c, groups, self.eps, silu)?;
        let y = pb.f16(&x.shape, what)?;
        let stats = pb.tensor(&[batch * groups, 4], DType::F32, "group norm stats (saved)")?;
        pb.run_all(gn.prepare_saving(pb.gpu, x, &self.gamma, &self.beta, &y, &stats)?)?;
        Ok((y, Some(stats)))
    }

    /// Records dx (=, or += with `accumulate`) = the input gradient of [`Norm::group`] (with
    /// its SiLU when `silu`) for dy, from the forward's input x and saved statistics.
    #[allow(clippy::too_many_arguments)]
    pub fn group_backward(&self, pb: &mut PlanBuilder, x: &Tensor, stats: &Tensor, dy: &Tensor, dx: &Tensor, batch: usize, groups: usize, silu: bool, accumulate: bool) -> Result<()> {
        let rows = x.numel() / (batch * self.c).max(1);
        let gnb = GroupNormBackward::new(pb.gpu, batch, rows, self.c, groups, silu)?;
        pb.run_all(gnb.prepare(pb.gpu, x, &self.gamma, &self.beta, stats, dy, dx, accumulate)?)
    }

    /// As [`Norm::layer`], also returning the row statistics (a pool tensor [rows, 2] f32).
    pub fn layer_saving(&self, pb: &mut PlanBuilder, x: &Tensor, what: &str) -> Result<(Tensor, Tensor)> {
        let y = pb.f16(&x.shape, what)?;
        let stats = pb.tensor(&[x.numel() / self.c, 2], DType::F32, "layer norm stats (saved)")?;
        pb.run(norm::layer_norm_saving(pb.gpu, x, &self.gamma, &self.beta, &y, &stats, self.eps)?)?;
        Ok((y, stats))
    }

    /// Records dx (=, or += with `accumulate`) = the input gradient of [`Norm::layer`] for dy.
    pub fn layer_backward(&self, pb: &mut PlanBuilder, x: &Tensor, stats: &Tensor, dy: &Tensor, dx: &Tensor, accumulate: bool) -> Result<()> {
        pb.run(norm_backward::layer_norm_backward(pb.gpu, x, &self.gamma, stats, dy, dx, accumulate)?)
    }

    /// A new tensor: LayerNorm(x) over the last dimension.
    pub fn layer(&self, pb: &mut PlanBuilder, x: &Tensor, what: &str) -> Result<Tensor> {
        let y = pb.f16(&x.shape, what)?;
        self.layer_into(pb, x, &y)?;
        Ok(y)
    }

    /// y = LayerNorm(x) over the last dimension, into a given tensor.
    pub fn layer_into(&self, pb: &mut PlanBuilder, x: &Tensor, y: &Tensor) -> Result<()> {
        pb.run(norm::layer_norm(pb.gpu, x, &self.gamma, &self.beta, y, self.eps)?)
    }
}

/// Reorders [n, c, h, w] values (as PyTorch holds images and latents) into [n, h, w, c];
/// `shape` is the NCHW shape.
pub fn nchw_to_nhwc(x: &[f32], shape: &[usize]) -> Vec<f32> {
    permute(x, shape, true)
}

/// Reorders [n, h, w, c] values into [n, c, h, w]; `shape` is the NCHW shape.
pub fn nhwc_to_nchw(x: &[f32], shape: &[usize]) -> Vec<f32> {
    permute(x, shape, false)
}

fn permute(x: &[f32], shape: &[usize], to_nhwc: bool) -> Vec<f32> {
    let (n, c, hw) = (shape[0], shape[1], shape[2] * shape[3]);
    let mut y = vec![0.0; x.len()];
    for b in 0..n {
        for ch in 0..c {
            for p in 0..hw {
                let (nchw, nhwc) = ((b * c + ch) * hw + p, (b * hw + p) * c + ch);
                if to_nhwc { y[nhwc] = x[nchw] } else { y[nchw] = x[nhwc] }
            }
        }
    }
    y
}

/// Named copies of intermediate tensors, taken while a plan is built (for the fixture tests
/// that locate a mismatch block by block); off unless asked for.
#[derive(Default)]
pub struct Taps {
    pub on: bool,
    pub tensors: Vec<(String, Tensor)>,
}

impl Taps {
    /// Records a copy of `x` under `name` when tapping.
    pub fn tap(&mut self, pb: &mut PlanBuilder, name: &str, x: &Tensor) -> Result<()> {
        if !self.on {
            return Ok(());
        }
        let copy = Tensor::empty(pb.gpu, &x.shape, x.dtype, name)?;
        pb.run(crate::kernels::elementwise::unary(pb.gpu, crate::kernels::elementwise::Unary::Copy, x, &copy)?)?;
        self.tensors.push((name.to_string(), copy));
        Ok(())
    }

    /// The tapped tensor called `name`.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|(n, _)| n == name).map(|(_, t)| t)
    }
}
