//! The UNet's transformer blocks, named after diffusers' modules: `Transformer2DModel`
//! (GroupNorm, `proj_in`, `BasicTransformerBlock`s over the pixels as tokens, `proj_out`,
//! added to the input), each block being self-attention, cross-attention over the text context
//! and a GEGLU feed-forward, each pre-LayerNorm and added to the token stream. Tokens are rows
//! [batch·h·w, c] f16.
//!
//! Inference (`forward`) adds into its input in place and frees every temporary.
//!
//! Training (`forward_train` / `backward`): LoRA adapters ([`Adapters`], looked up by module
//! path such as `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`) add into their
//! projection's output, also into one projection's columns of a fused q/k/v product. The
//! stream is not updated in place: each residual add writes a new stream tensor, because the
//! layer norm backward reads the stream before the add. Saved per block: the three stream
//! states entering the norms, the norms' statistics, q/k/v (fused) and the attention output
//! (the attention backward recomputes its softmax statistics), the GEGLU input, and the
//! normed inputs the adapters read. The backward is the mirror: `d`-prefixed names, activation
//! gradients in f16 at the loss scale, the stream's gradient updated in place (residual adds
//! pass it through, norm backwards add into it).

use crate::error::Result;
use crate::gpu::{DType, PlanBuilder, Tensor};
use crate::kernels::attention::{Attention, Operand};
use crate::kernels::attention_backward::{AttentionBackward, AttentionGrads};
use crate::kernels::elementwise::{self, Unary};
use crate::kernels::{grad_ops, tensor_ops};
use crate::model::layers::{Linear, Norm};
use crate::model::lora::{Adapters, LoraSaved};
use crate::model::weights::Prefix;

/// The module path under the UNet (`unet.` removed), the name LoRA adapters are found by.
fn module_path(p: &Prefix) -> String {
    let s = p.prefix();
    s.strip_prefix("unet.").unwrap_or(s).to_string()
}

/// A frozen weight on the GPU that LoRA adapters may target, and the projections stacked in
/// it (one for a plain linear; q, k, v or k, v for a fused product): each with its module path
/// under the UNet, its first row and row count. The weight is [rows, k] f16, row-major; a
/// 1x1 convolution's file shape has trailing [1, 1].
#[derive(Clone, Debug)]
pub struct AdaptableWeight {
    pub tensor: Tensor,
    pub k: usize,
    pub conv1x1: bool,
    /// (module path, first row, rows).
    pub parts: Vec<(String, usize, usize)>,
}

impl AdaptableWeight {
    fn of(l: &Linear, paths: &[String], conv1x1: bool) -> AdaptableWeight {
        let rows = l.n / paths.len();
        let parts = paths.iter().enumerate().map(|(i, p)| (p.clone(), i * rows, rows)).collect();
        AdaptableWeight { tensor: l.w.clone(), k: l.k, conv1x1, parts }
    }
}

/// A copy of `x` from the pool.
pub(crate) fn copy(pb: &mut PlanBuilder, x: &Tensor, what: &str) -> Result<Tensor> {
    let y = pb.f16(&x.shape, what)?;
    pb.run(elementwise::unary(pb.gpu, Unary::Copy, x, &y)?)?;
    Ok(y)
}

/// An adapter's saved tensors with what it applies to.
pub(crate) struct Applied {
    name: String,
    /// Column offset and row stride of its projection in the output (and gradient) tensor.
    offset: usize,
    ld: usize,
    saved: LoraSaved,
}

impl Applied {
    pub(crate) fn release(self, pb: &mut PlanBuilder) {
        self.saved.release(pb);
    }
}

/// Runs the adapter on `name` (if any) from `x` into columns `offset..` of `y` [rows, ld].
#[allow(clippy::too_many_arguments)]
pub(crate) fn adapt(pb: &mut PlanBuilder, ad: &Adapters, name: String, x: &Tensor, y: &Tensor, offset: usize, ld: usize, out: &mut Vec<Applied>) -> Result<()> {
    if let Some(l) = ad.get(&name) {
        let saved = l.forward(pb, x, Operand::slice(y, offset, ld))?;
        out.push(Applied { name, offset, ld, saved });
    }
    Ok(())
}

/// The backward of an adapter applied by [`adapt`]: dy is the projection's output gradient
/// (its columns of `dy`), its input gradient added into `dx` when given.
pub(crate) fn adapt_backward(pb: &mut PlanBuilder, ad: &Adapters, a: Applied, dy: &Tensor, dx: Option<&Tensor>) -> Result<()> {
    let l = ad.get(&a.name).expect("an applied adapter exists");
    l.backward(pb, a.saved, Operand::slice(dy, a.offset, a.ld), dx, ad.grad_scale)
}

/// The gradient of the text context (the cross-attentions' k and v input), summed over every
/// cross-attention of the UNet: f16 [batch·tokens, context width] at the loss scale. The first
/// cross-attention backward recorded sets it, the later ones add into it.
pub struct ContextGrad {
    pub t: Tensor,
    written: std::cell::Cell<bool>,
}

impl ContextGrad {
    pub fn new(t: Tensor) -> Self {
        ContextGrad { t, written: std::cell::Cell::new(false) }
    }

    /// Whether some cross-attention wrote it.
    pub fn written(&self) -> bool {
        self.written.get()
    }
}

/// diffusers' `Attention` in a transformer block: self-attention (q, k, v fused into one
/// product) or cross-attention (q from the image, k and v fused from the context); no biases
/// on q, k, v; `to_out.0` with bias, added to the residual stream.
struct CrossAttention {
    path: String,
    heads: usize,
    c: usize,
    /// Self: [3c, c]; cross: q [c, c].
    q_or_qkv: Linear,
    /// Cross: [2c, context width].
    kv: Option<Linear>,
    to_out: Linear,
}

/// What an attention's backward reads.
struct AttentionSaved {
    /// Self: q, k, v [rows, 3c]; cross: q [rows, c].
    q_or_qkv: Tensor,
    /// Cross: k, v [batch·lk, 2c].
    kv: Option<Tensor>,
    /// The attention output (to_out's input) [rows, c].
    o: Tensor,
    /// The softmax statistics the forward saved, f32 [batch·heads·l, 2] (lse2, then D from
    /// the backward's first launch).
    stats: Tensor,
    /// Adapters on q, k, v (input: the normed stream or the context) and on to_out.
    qkv_lora: Vec<Applied>,
    out_lora: Vec<Applied>,
}

impl AttentionSaved {
    fn release(self, pb: &mut PlanBuilder) {
        for a in self.qkv_lora.into_iter().chain(self.out_lora) {
            a.release(pb);
        }
        for t in [Some(self.q_or_qkv), self.kv, Some(self.o), Some(self.stats)].into_iter().flatten() {
            pb.free(t);
        }
    }
}

impl CrossAttention {
    fn load(p: &Prefix, c: usize, heads: usize, context: Option<usize>) -> Result<Self> {
        let (q_or_qkv, kv) = match context {
            None => (Linear::load_fused(p, &["to_q", "to_k", "to_v"], &[c, c, c], c, false)?, None),
            Some(ctx) => (Linear::load(&p.at("to_q"), c, c, false)?, Some(Linear::load_fused(p, &["to_k", "to_v"], &[c, c], ctx, false)?)),
        };
        Ok(CrossAttention { path: module_path(p), heads, c, q_or_qkv, kv, to_out: Linear::load(&p.at("to_out.0"), c, c, true)? })
    }

    fn name(&self, proj: &str) -> String {
        format!("{}.{proj}", self.path)
    }

    /// Its weights that adapters may target (see [`AdaptableWeight`]).
    fn adaptable(&self, out: &mut Vec<AdaptableWeight>) {
        match &self.kv {
            None => out.push(AdaptableWeight::of(&self.q_or_qkv, &[self.name("to_q"), self.name("to_k"), self.name("to_v")], false)),
            Some(kv) => {
                out.push(AdaptableWeight::of(&self.q_or_qkv, &[self.name("to_q")], false));
                out.push(AdaptableWeight::of(kv, &[self.name("to_k"), self.name("to_v")], false));
            }
        }
        out.push(AdaptableWeight::of(&self.to_out, &[self.name("to_out.0")], false));
    }

    /// residual += to_out(attention(x)) with x [batch, l, c] (normed) and, for
    /// cross-attention, the context [batch, lk, ctx].
    fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: Option<(&Tensor, usize)>, residual: &Tensor) -> Result<()> {
        let c = self.c;
        let l = x.numel() / (batch * c);
        let o = pb.f16(&[batch * l, c], "attention out")?;
        match (&self.kv, context) {
            (Some(kv), Some((ctx, lk))) => {
                let q = self.q_or_qkv.apply(pb, x, "attention q")?;
                let kvt = kv.apply(pb, ctx, "attention kv")?;
                let attn = Attention::new(batch, self.heads, l, lk, c / self.heads, false);
                let (k, v) = (Operand::slice(&kvt, 0, 2 * c), Operand::slice(&kvt, c, 2 * c));
                pb.run(attn.prepare(pb.gpu, Operand::dense(&q, c), k, v, Operand::dense(&o, c))?)?;
                pb.free(q);
                pb.free(kvt);
            }
            _ => {
                let qkv = self.q_or_qkv.apply(pb, x, "attention qkv")?;
                let attn = Attention::new(batch, self.heads, l, l, c / self.heads, false);
                let (q, k, v) = (Operand::slice(&qkv, 0, 3 * c), Operand::slice(&qkv, c, 3 * c), Operand::slice(&qkv, 2 * c, 3 * c));
                pb.run(attn.prepare(pb.gpu, q, k, v, Operand::dense(&o, c))?)?;
                pb.free(qkv);
            }
        }
        self.to_out.forward(pb, &o, residual, true)?;
        pb.free(o);
        Ok(())
    }

    /// The training forward: `residual` += to_out(attention(x)), adapters included. The
    /// caller keeps x alive until the backward (the q/k/v adapters read it there).
    fn forward_train(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: Option<(&Tensor, usize)>, residual: &Tensor, ad: &Adapters) -> Result<AttentionSaved> {
        let c = self.c;
        let rows = x.numel() / c;
        let l = rows / batch;
        let o = pb.f16(&[rows, c], "attention out (saved)")?;
        let stats = pb.tensor(&[batch * self.heads * l, 2], DType::F32, "attention lse (saved)")?;
        let mut qkv_lora = Vec::new();
        let (q_or_qkv, kv) = match (&self.kv, context) {
            (Some(kv), Some((ctx, lk))) => {
                let q = self.q_or_qkv.apply(pb, x, "attention q (saved)")?;
                adapt(pb, ad, self.name("to_q"), x, &q, 0, c, &mut qkv_lora)?;
                let kvt = kv.apply(pb, ctx, "attention kv (saved)")?;
                adapt(pb, ad, self.name("to_k"), ctx, &kvt, 0, 2 * c, &mut qkv_lora)?;
                adapt(pb, ad, self.name("to_v"), ctx, &kvt, c, 2 * c, &mut qkv_lora)?;
                let attn = Attention::new(batch, self.heads, l, lk, c / self.heads, false);
                let (k, v) = (Operand::slice(&kvt, 0, 2 * c), Operand::slice(&kvt, c, 2 * c));
                pb.run(attn.prepare_saving(pb.gpu, Operand::dense(&q, c), k, v, Operand::dense(&o, c), &stats)?)?;
                (q, Some(kvt))
            }
            _ => {
                let qkv = self.q_or_qkv.apply(pb, x, "attention qkv (saved)")?;
                for (i, proj) in ["to_q", "to_k", "to_v"].iter().enumerate() {
                    adapt(pb, ad, self.name(proj), x, &qkv, i * c, 3 * c, &mut qkv_lora)?;
                }
                let attn = Attention::new(batch, self.heads, l, l, c / self.heads, false);
                let (q, k, v) = (Operand::slice(&qkv, 0, 3 * c), Operand::slice(&qkv, c, 3 * c), Operand::slice(&qkv, 2 * c, 3 * c));
                pb.run(attn.prepare_saving(pb.gpu, q, k, v, Operand::dense(&o, c), &stats)?)?;
                (qkv, None)
            }
        };
        self.to_out.forward(pb, &o, residual, true)?;
        let mut out_lora = Vec::new();
        adapt(pb, ad, self.name("to_out.0"), &o, residual, 0, c, &mut out_lora)?;
        Ok(AttentionSaved { q_or_qkv, kv, o, stats, qkv_lora, out_lora })
    }

    /// The backward from dres (the gradient of the residual stream after the add; read only):
    /// returns dx, the gradient of the normed input x. A cross-attention also adds the
    /// context's gradient (through k, v and their adapters) into `dctx` when given.
    #[allow(clippy::too_many_arguments)]
    fn backward(&self, pb: &mut PlanBuilder, saved: AttentionSaved, dres: &Tensor, batch: usize, context: Option<(&Tensor, usize)>, ad: &Adapters, dctx: Option<&ContextGrad>) -> Result<Tensor> {
        let c = self.c;
        let rows = dres.numel() / c;
        let l = rows / batch;
        let AttentionSaved { q_or_qkv, kv, o, stats, qkv_lora, out_lora } = saved;
        // residual += to_out(o).
        let d_o = self.to_out.backward_new(pb, dres, "attention do")?;
        for a in out_lora {
            adapt_backward(pb, ad, a, dres, Some(&d_o))?;
        }
        // o = attention(q, k, v), then q, k, v from x (and the context).
        let dx = match (kv, context) {
            (Some(kvt), Some((_, lk))) => {
                let dq = pb.f16(&[rows, c], "attention dq")?;
                let dkv = pb.f16(&kvt.shape, "attention dkv")?;
                let attn = Attention::new(batch, self.heads, l, lk, c / self.heads, false);
                let grads = AttentionGrads {
                    q: Operand::dense(&q_or_qkv, c),
                    k: Operand::slice(&kvt, 0, 2 * c),
                    v: Operand::slice(&kvt, c, 2 * c),
                    o: Operand::dense(&o, c),
                    dout: Operand::dense(&d_o, c),
                    dq: Operand::dense(&dq, c),
                    dk: Operand::slice(&dkv, 0, 2 * c),
                    dv: Operand::slice(&dkv, c, 2 * c),
                };
                pb.run_all(AttentionBackward::for_saved_lse(pb.gpu, attn, None)?.prepare_with_saved_lse(pb.gpu, &grads, &stats)?)?;
                let dx = self.q_or_qkv.backward_new(pb, &dq, "attention dx")?;
                // d(context) (=, or += after the first cross-attention) = dk·Wk + dv·Wv.
                if let (Some(d), Some(kv)) = (dctx, &self.kv) {
                    kv.backward_input(pb, &dkv, &d.t, d.written.replace(true))?;
                }
                for a in qkv_lora {
                    // q's adapter read x; k's and v's read the context.
                    let (dy, into) = if a.name.ends_with(".to_q") { (&dq, Some(&dx)) } else { (&dkv, dctx.map(|d| &d.t)) };
                    adapt_backward(pb, ad, a, dy, into)?;
                }
                for t in [dq, dkv, kvt] {
                    pb.free(t);
                }
                dx
            }
            _ => {
                let dqkv = pb.f16(&q_or_qkv.shape, "attention dqkv")?;
                let attn = Attention::new(batch, self.heads, l, l, c / self.heads, false);
                let (w, t) = (3 * c, &q_or_qkv);
                let grads = AttentionGrads {
                    q: Operand::slice(t, 0, w),
                    k: Operand::slice(t, c, w),
                    v: Operand::slice(t, 2 * c, w),
                    o: Operand::dense(&o, c),
                    dout: Operand::dense(&d_o, c),
                    dq: Operand::slice(&dqkv, 0, w),
                    dk: Operand::slice(&dqkv, c, w),
                    dv: Operand::slice(&dqkv, 2 * c, w),
                };
                pb.run_all(AttentionBackward::for_saved_lse(pb.gpu, attn, None)?.prepare_with_saved_lse(pb.gpu, &grads, &stats)?)?;
                let dx = self.q_or_qkv.backward_new(pb, &dqkv, "attention dx")?;
                for a in qkv_lora {
                    adapt_backward(pb, ad, a, &dqkv, Some(&dx))?;
                }
                pb.free(dqkv);
                dx
            }
        };
        for t in [d_o, o, q_or_qkv, stats] {
            pb.free(t);
        }
        Ok(dx)
    }
}

/// `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention and GEGLU
/// feed-forward, each added to the stream.
struct BasicTransformerBlock {
    path: String,
    norm1: Norm,
    attn1: CrossAttention,
    norm2: Norm,
    attn2: CrossAttention,
    norm3: Norm,
    ff_proj: Linear,
    ff_out: Linear,
    ff_inner: usize,
}

/// One sub-block's saved norm: the stream entering it (owned), its statistics, and the
/// normed output when an adapter reads it.
struct NormSaved {
    x: Tensor,
    stats: Tensor,
    y: Option<Tensor>,
}

/// What a transformer block's backward reads.
struct BlockSaved {
    n1: NormSaved,
    attn1: AttentionSaved,
    n2: NormSaved,
    attn2: AttentionSaved,
    n3: NormSaved,
    /// The GEGLU input [rows, 8c], and its output when `ff.net.2` has an adapter.
    hidden: Tensor,
    g: Option<Tensor>,
    ff_in_lora: Vec<Applied>,
    ff_out_lora: Vec<Applied>,
}

impl NormSaved {
    fn release(self, pb: &mut PlanBuilder) {
        for t in [Some(self.x), Some(self.stats), self.y].into_iter().flatten() {
            pb.free(t);
        }
    }
}

impl BlockSaved {
    /// Gives everything back to the pool, the block's input stream included.
    fn release(self, pb: &mut PlanBuilder) {
        for a in self.ff_in_lora.into_iter().chain(self.ff_out_lora) {
            a.release(pb);
        }
        self.attn1.release(pb);
        self.attn2.release(pb);
        for n in [self.n1, self.n2, self.n3] {
            n.release(pb);
        }
        pb.free(self.hidden);
        if let Some(g) = self.g {
            pb.free(g);
        }
    }
}

impl BasicTransformerBlock {
    fn load(p: &Prefix, c: usize, heads: usize, context: usize) -> Result<Self> {
        let inner = 4 * c;
        Ok(BasicTransformerBlock {
            path: module_path(p),
            norm1: Norm::load(&p.at("norm1"), c, 1e-5)?,
            attn1: CrossAttention::load(&p.at("attn1"), c, heads, None)?,
            norm2: Norm::load(&p.at("norm2"), c, 1e-5)?,
            attn2: CrossAttention::load(&p.at("attn2"), c, heads, Some(context))?,
            norm3: Norm::load(&p.at("norm3"), c, 1e-5)?,
            ff_proj: Linear::load(&p.at("ff.net.0.proj"), 2 * inner, c, true)?,
            ff_out: Linear::load(&p.at("ff.net.2"), c, inner, true)?,
            ff_inner: inner,
        })
    }

    /// Updates the stream x [batch·l, c] in place.
    fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: (&Tensor, usize)) -> Result<()> {
        let a = self.norm1.layer(pb, x, "transformer norm1")?;
        self.attn1.forward(pb, &a, batch, None, x)?;
        pb.free(a);
        let a = self.norm2.layer(pb, x, "transformer norm2")?;
        self.attn2.forward(pb, &a, batch, Some(context), x)?;
        pb.free(a);
        let a = self.norm3.layer(pb, x, "transformer norm3")?;
        let hidden = self.ff_proj.apply(pb, &a, "geglu in")?;
        pb.free(a);
        let rows = hidden.numel() / (2 * self.ff_inner);
        let g = pb.f16(&[rows, self.ff_inner], "geglu out")?;
        pb.run(tensor_ops::geglu(pb.gpu, &hidden, &g, rows, self.ff_inner)?)?;
        pb.free(hidden);
        self.ff_out.forward(pb, &g, x, true)?;
        pb.free(g);
        Ok(())
    }

    /// LayerNorm of the stream x (moved in), saving; the normed output is kept for the
    /// backward when one of `readers` (module paths) has an adapter.
    fn norm_train(pb: &mut PlanBuilder, norm: &Norm, x: Tensor, ad: &Adapters, readers: &[String], what: &str) -> Result<(Tensor, NormSaved)> {
        let (y, stats) = norm.layer_saving(pb, &x, what)?;
        let keep = readers.iter().any(|r| ad.get(r).is_some());
        Ok((y.clone(), NormSaved { x, stats, y: keep.then_some(y) }))
    }

    /// Frees what [`Self::norm_train`] handed out when the backward does not need it.
    fn drop_unkept(pb: &mut PlanBuilder, y: Tensor, saved: &NormSaved) {
        if saved.y.is_none() {
            pb.free(y);
        }
    }

    /// The training forward: a new stream tensor from s0 (moved in, saved).
    fn forward_train(&self, pb: &mut PlanBuilder, s0: Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters) -> Result<(Tensor, BlockSaved)> {
        let (p1, p2) = (&self.attn1, &self.attn2);
        let (a1, n1) = Self::norm_train(pb, &self.norm1, s0, ad, &[p1.name("to_q"), p1.name("to_k"), p1.name("to_v")], "transformer norm1")?;
        let s1 = copy(pb, &n1.x, "transformer stream 1")?;
        let attn1 = p1.forward_train(pb, &a1, batch, None, &s1, ad)?;
        Self::drop_unkept(pb, a1, &n1);
        let (a2, n2) = Self::norm_train(pb, &self.norm2, s1, ad, &[p2.name("to_q")], "transformer norm2")?;
        let s2 = copy(pb, &n2.x, "transformer stream 2")?;
        let attn2 = p2.forward_train(pb, &a2, batch, Some(context), &s2, ad)?;
        Self::drop_unkept(pb, a2, &n2);
        let (ff_in, ff_out) = (format!("{}.ff.net.0.proj", self.path), format!("{}.ff.net.2", self.path));
        let (a3, n3) = Self::norm_train(pb, &self.norm3, s2, ad, std::slice::from_ref(&ff_in), "transformer norm3")?;
        let s3 = copy(pb, &n3.x, "transformer stream 3")?;
        let hidden = self.ff_proj.apply(pb, &a3, "geglu in (saved)")?;
        let mut ff_in_lora = Vec::new();
        adapt(pb, ad, ff_in, &a3, &hidden, 0, 2 * self.ff_inner, &mut ff_in_lora)?;
        Self::drop_unkept(pb, a3, &n3);
        let rows = hidden.numel() / (2 * self.ff_inner);
        let g = pb.f16(&[rows, self.ff_inner], "geglu out")?;
        pb.run(tensor_ops::geglu(pb.gpu, &hidden, &g, rows, self.ff_inner)?)?;
        self.ff_out.forward(pb, &g, &s3, true)?;
        let mut ff_out_lora = Vec::new();
        adapt(pb, ad, ff_out, &g, &s3, 0, s3.numel() / rows, &mut ff_out_lora)?;
        let g = if ff_out_lora.is_empty() {
            pb.free(g);
            None
        } else {
            Some(g)
        };
        Ok((s3, BlockSaved { n1, attn1, n2, attn2, n3, hidden, g, ff_in_lora, ff_out_lora }))
    }

    /// The backward: `ds` holds the gradient of the block's output stream and becomes that of
    /// its input stream (updated in place).
    #[allow(clippy::too_many_arguments)]
    fn backward(&self, pb: &mut PlanBuilder, saved: BlockSaved, ds: &Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters, dctx: Option<&ContextGrad>) -> Result<()> {
        let BlockSaved { n1, attn1, n2, attn2, n3, hidden, g, ff_in_lora, ff_out_lora } = saved;
        let rows = hidden.numel() / (2 * self.ff_inner);
        // s3 = s2 + ff_out(geglu(ff_proj(norm3(s2)))).
        let dg = self.ff_out.backward_new(pb, ds, "geglu dout")?;
        for a in ff_out_lora {
            adapt_backward(pb, ad, a, ds, Some(&dg))?;
        }
        let dhidden = pb.f16(&hidden.shape, "geglu dx")?;
        pb.run(grad_ops::geglu_backward(pb.gpu, &hidden, &dg, &dhidden, rows, self.ff_inner)?)?;
        pb.free(dg);
        let da3 = self.ff_proj.backward_new(pb, &dhidden, "ff dnorm3")?;
        for a in ff_in_lora {
            adapt_backward(pb, ad, a, &dhidden, Some(&da3))?;
        }
        pb.free(dhidden);
        Self::norm_backward(pb, &self.norm3, n3, da3, ds)?;
        // s2 = s1 + attn2(norm2(s1), context).
        let da2 = self.attn2.backward(pb, attn2, ds, batch, Some(context), ad, dctx)?;
        Self::norm_backward(pb, &self.norm2, n2, da2, ds)?;
        // s1 = s0 + attn1(norm1(s0)).
        let da1 = self.attn1.backward(pb, attn1, ds, batch, None, ad, None)?;
        Self::norm_backward(pb, &self.norm1, n1, da1, ds)?;
        pb.free(hidden);
        if let Some(g) = g {
            pb.free(g);
        }
        Ok(())
    }

    /// ds += the layer norm's input gradient for dy (moved in); frees the saved norm.
    fn norm_backward(pb: &mut PlanBuilder, norm: &Norm, saved: NormSaved, dy: Tensor, ds: &Tensor) -> Result<()> {
        norm.layer_backward(pb, &saved.x, &saved.stats, &dy, ds, true)?;
        for t in [Some(dy), Some(saved.x), Some(saved.stats), saved.y].into_iter().flatten() {
            pb.free(t);
        }
        Ok(())
    }
}

/// `Transformer2DModel`: GroupNorm, `proj_in`, transformer blocks over the pixels as tokens,
/// `proj_out`, added to the input.
pub struct Transformer2D {
    path: String,
    c: usize,
    groups: usize,
    norm: Norm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
    /// proj_in / proj_out are 1x1 convolutions in the file (SD-1.5), not linears.
    proj_conv: bool,
}

/// What a `Transformer2D` backward reads.
pub struct TransformerSaved {
    /// The input (owned) and the group norm's statistics.
    x: Tensor,
    stats: Tensor,
    /// The normed input and the last stream, kept when proj_in / proj_out have adapters.
    normed: Option<Tensor>,
    last: Option<Tensor>,
    in_lora: Vec<Applied>,
    out_lora: Vec<Applied>,
    blocks: Vec<BlockSaved>,
}

impl TransformerSaved {
    /// Keeps only the input, giving everything else back to the pool: for recomputing the
    /// forward at the backward ([`Transformer2D::recompute`]).
    pub fn into_input(self, pb: &mut PlanBuilder) -> Tensor {
        for a in self.in_lora.into_iter().chain(self.out_lora) {
            a.release(pb);
        }
        for b in self.blocks {
            b.release(pb);
        }
        for t in [Some(self.stats), self.normed, self.last].into_iter().flatten() {
            pb.free(t);
        }
        self.x
    }
}

impl Transformer2D {
    /// The weights adapters may target, in the order of `UNetConfig::lora_specs`: proj_in,
    /// per block attn1, attn2 and the feed-forward, proj_out.
    pub fn adaptable(&self, out: &mut Vec<AdaptableWeight>) {
        let conv = self.proj_conv;
        out.push(AdaptableWeight::of(&self.proj_in, &[format!("{}.proj_in", self.path)], conv));
        for b in &self.blocks {
            b.attn1.adaptable(out);
            b.attn2.adaptable(out);
            out.push(AdaptableWeight::of(&b.ff_proj, &[format!("{}.ff.net.0.proj", b.path)], false));
            out.push(AdaptableWeight::of(&b.ff_out, &[format!("{}.ff.net.2", b.path)], false));
        }
        out.push(AdaptableWeight::of(&self.proj_out, &[format!("{}.proj_out", self.path)], conv));
    }

    /// `linear_projection`: proj_in/out are linears (else 1x1 convolutions, SD-1.5's).
    pub fn load(p: &Prefix, c: usize, heads: usize, context: usize, layers: usize, groups: usize, linear_projection: bool) -> Result<Self> {
        let proj = |name: &str| {
            if linear_projection { Linear::load(&p.at(name), c, c, true) } else { Linear::load_1x1(&p.at(name), c, c) }
        };
        Ok(Transformer2D {
            path: module_path(p),
            c,
            groups,
            norm: Norm::load(&p.at("norm"), c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers).map(|i| BasicTransformerBlock::load(&p.at("transformer_blocks").at(i), c, heads, context)).collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
            proj_conv: !linear_projection,
        })
    }

    /// x [batch, h, w, c] += the transformer's output; `context` is [batch, lk, width].
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: (&Tensor, usize)) -> Result<()> {
        let n = self.norm.group(pb, x, batch, self.groups, false, "transformer norm")?;
        let s = pb.f16(&[x.numel() / self.c, self.c], "transformer stream")?;
        self.proj_in.forward(pb, &n, &s, false)?;
        pb.free(n);
        for b in &self.blocks {
            b.forward(pb, &s, batch, context)?;
        }
        self.proj_out.forward(pb, &s, x, true)?;
        pb.free(s);
        Ok(())
    }

    /// The training forward: a new tensor x + the transformer's output, from x (moved in,
    /// saved).
    pub fn forward_train(&self, pb: &mut PlanBuilder, x: Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters) -> Result<(Tensor, TransformerSaved)> {
        let c = self.c;
        let (n, stats) = self.norm.group_saving(pb, &x, batch, self.groups, false, true, "transformer norm")?;
        let stats = stats.expect("saving norm");
        let mut s = pb.f16(&[x.numel() / c, c], "transformer stream 0")?;
        self.proj_in.forward(pb, &n, &s, false)?;
        let mut in_lora = Vec::new();
        adapt(pb, ad, format!("{}.proj_in", self.path), &n, &s, 0, c, &mut in_lora)?;
        let normed = if in_lora.is_empty() {
            pb.free(n);
            None
        } else {
            Some(n)
        };
        let mut blocks = Vec::with_capacity(self.blocks.len());
        for b in &self.blocks {
            let (next, saved) = b.forward_train(pb, s, batch, context, ad)?;
            blocks.push(saved);
            s = next;
        }
        let out = copy(pb, &x, "transformer out")?;
        self.proj_out.forward(pb, &s, &out, true)?;
        let mut out_lora = Vec::new();
        adapt(pb, ad, format!("{}.proj_out", self.path), &s, &out, 0, c, &mut out_lora)?;
        let last = if out_lora.is_empty() {
            pb.free(s);
            None
        } else {
            Some(s)
        };
        Ok((out, TransformerSaved { x, stats, normed, last, in_lora, out_lora, blocks }))
    }

    /// Records the training forward again from its saved input x (moved in), for a backward
    /// that follows at once: the memory of one transformer's saved state instead of all of
    /// them. Same launches on the same input, so the same values (dropout masks included:
    /// they are regenerated from the step seed).
    pub fn recompute(&self, pb: &mut PlanBuilder, x: Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters) -> Result<TransformerSaved> {
        let (out, saved) = self.forward_train(pb, x, batch, context, ad)?;
        pb.free(out);
        Ok(saved)
    }

    /// The backward from dout (moved in): returns dx when `need_dx` (else only the adapters'
    /// gradients are made and the saved tensors released). With `dctx`, the context's
    /// gradient through the cross-attentions is added into it.
    #[allow(clippy::too_many_arguments)]
    pub fn backward(&self, pb: &mut PlanBuilder, saved: TransformerSaved, dout: Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters, need_dx: bool, dctx: Option<&ContextGrad>) -> Result<Option<Tensor>> {
        let TransformerSaved { x, stats, normed, last, in_lora, out_lora, blocks } = saved;
        // out = x + proj_out(s).
        let ds = self.proj_out.backward_new(pb, &dout, "transformer dstream")?;
        for a in out_lora {
            adapt_backward(pb, ad, a, &dout, Some(&ds))?;
        }
        for (b, bs) in self.blocks.iter().zip(blocks).rev() {
            b.backward(pb, bs, &ds, batch, context, ad, dctx)?;
        }
        // s = proj_in(GroupNorm(x)).
        let dn = if need_dx { Some(self.proj_in.backward_new(pb, &ds, "transformer dnorm")?) } else { None };
        for a in in_lora {
            adapt_backward(pb, ad, a, &ds, dn.as_ref())?;
        }
        pb.free(ds);
        let dx = match dn {
            Some(dn) => {
                self.norm.group_backward(pb, &x, &stats, &dn, &dout, batch, self.groups, false, true)?;
                pb.free(dn);
                Some(dout)
            }
            None => {
                pb.free(dout);
                None
            }
        };
        for t in [Some(x), Some(stats), normed, last].into_iter().flatten() {
            pb.free(t);
        }
        Ok(dx)
    }
}
