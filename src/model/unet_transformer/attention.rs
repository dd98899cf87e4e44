//! diffusers' `Attention` in a transformer block (self-attention, or cross-attention over the
//! text context): inference forward, training forward with adapters, and its LoRA backward.

use super::{AdaptableWeight, Applied, ContextGrad, adapt, adapt_backward, adapt_fused, module_path};
use crate::error::Result;
use crate::gpu::{DType, PlanBuilder, Tensor};
use crate::kernels::attention::{Attention, Operand};
use crate::kernels::attention_backward::{AttentionBackward, AttentionGrads};
use crate::model::layers::Linear;
use crate::model::lora::Adapters;
use crate::model::weights::Prefix;

/// diffusers' `Attention` in a transformer block: self-attention (q, k, v fused into one
/// product) or cross-attention (q from the image, k and v fused from the context); no biases
/// on q, k, v; `to_out.0` with bias, added to the residual stream.
pub(super) struct CrossAttention {
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
pub(super) struct AttentionSaved {
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
    pub(super) fn release(self, pb: &mut PlanBuilder) {
        for a in self.qkv_lora.into_iter().chain(self.out_lora) {
            a.release(pb);
        }
        for t in [Some(self.q_or_qkv), self.kv, Some(self.o), Some(self.stats)].into_iter().flatten() {
            pb.free(t);
        }
    }
}

impl CrossAttention {
    pub(super) fn load(p: &Prefix, c: usize, heads: usize, context: Option<usize>) -> Result<Self> {
        let (q_or_qkv, kv) = match context {
            None => (Linear::load_fused(p, &["to_q", "to_k", "to_v"], &[c, c, c], c, false)?, None),
            Some(ctx) => (Linear::load(&p.at("to_q"), c, c, false)?, Some(Linear::load_fused(p, &["to_k", "to_v"], &[c, c], ctx, false)?)),
        };
        Ok(CrossAttention { path: module_path(p), heads, c, q_or_qkv, kv, to_out: Linear::load(&p.at("to_out.0"), c, c, true)? })
    }

    pub(super) fn name(&self, proj: &str) -> String {
        format!("{}.{proj}", self.path)
    }

    /// Its weights that adapters may target (see [`AdaptableWeight`]).
    pub(super) fn adaptable(&self, out: &mut Vec<AdaptableWeight>) {
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
    pub(super) fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: Option<(&Tensor, usize)>, residual: &Tensor) -> Result<()> {
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
    pub(super) fn forward_train(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize, context: Option<(&Tensor, usize)>, residual: &Tensor, ad: &Adapters) -> Result<AttentionSaved> {
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
                adapt_fused(pb, ad, vec![self.name("to_k"), self.name("to_v")], ctx, &kvt, 0, c, 2 * c, &mut qkv_lora)?;
                let attn = Attention::new(batch, self.heads, l, lk, c / self.heads, false);
                let (k, v) = (Operand::slice(&kvt, 0, 2 * c), Operand::slice(&kvt, c, 2 * c));
                pb.run(attn.prepare_saving(pb.gpu, Operand::dense(&q, c), k, v, Operand::dense(&o, c), &stats)?)?;
                (q, Some(kvt))
            }
            _ => {
                let qkv = self.q_or_qkv.apply(pb, x, "attention qkv (saved)")?;
                let names = ["to_q", "to_k", "to_v"].map(|p| self.name(p)).to_vec();
                adapt_fused(pb, ad, names, x, &qkv, 0, c, 3 * c, &mut qkv_lora)?;
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
    pub(super) fn backward(&self, pb: &mut PlanBuilder, saved: AttentionSaved, dres: &Tensor, batch: usize, context: Option<(&Tensor, usize)>, ad: &Adapters, dctx: Option<&ContextGrad>) -> Result<Tensor> {
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
                    let (dy, into) = if a.names[0].ends_with(".to_q") { (&dq, Some(&dx)) } else { (&dkv, dctx.map(|d| &d.t)) };
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
