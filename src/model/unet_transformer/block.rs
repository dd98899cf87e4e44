//! diffusers' `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention and
//! GEGLU feed-forward, each added to the stream; forward, training forward and backward.
//!
//! Saved per block for the backward: the three stream states entering the norms, the norms'
//! statistics, q/k/v (fused) and the attention output (the attention backward recomputes its
//! softmax statistics), the GEGLU input, and the normed inputs the adapters read.

use super::attention::{AttentionSaved, CrossAttention};
use super::{Applied, ContextGrad, adapt, adapt_backward, copy, module_path};
use crate::error::Result;
use crate::gpu::{PlanBuilder, Tensor};
use crate::kernels::{grad_ops, tensor_ops};
use crate::model::layers::{Linear, Norm};
use crate::model::lora::Adapters;
use crate::model::weights::Prefix;

/// `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention and GEGLU
/// feed-forward, each added to the stream.
pub(super) struct BasicTransformerBlock {
    pub(super) path: String,
    norm1: Norm,
    pub(super) attn1: CrossAttention,
    norm2: Norm,
    pub(super) attn2: CrossAttention,
    norm3: Norm,
    pub(super) ff_proj: Linear,
    pub(super) ff_out: Linear,
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
pub(super) struct BlockSaved {
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
    pub(super) fn release(self, pb: &mut PlanBuilder) {
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
    pub(super) fn load(p: &Prefix, c: usize, heads: usize, context: usize) -> Result<Self> {
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
    pub(super) fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: (&Tensor, usize)) -> Result<()> {
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
    pub(super) fn forward_train(&self, pb: &mut PlanBuilder, s0: Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters) -> Result<(Tensor, BlockSaved)> {
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
    pub(super) fn backward(&self, pb: &mut PlanBuilder, saved: BlockSaved, ds: &Tensor, batch: usize, context: (&Tensor, usize), ad: &Adapters, dctx: Option<&ContextGrad>) -> Result<()> {
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
