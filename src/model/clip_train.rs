//! LoRA training of the CLIP text encoder as a static plan in two parts: the forward (as
//! [`ClipTextModel::plan`], with adapters, saving what the backward reads) and the LoRA-only
//! backward from a given gradient of its output (the UNet's d(context)), the forward's mirror
//! in reverse. The parts are separate plans over one pool, because the UNet's step runs
//! between them; the saved activations stay alive from the forward to the backward, which
//! gives each back to the pool after its last reader.
//!
//! Adapters (peft semantics, [`crate::model::lora`]) sit on every encoder layer's
//! `self_attn.q_proj`, `k_proj`, `v_proj`, `out_proj`, `mlp.fc1` and `mlp.fc2`, named by their
//! module path under `CLIPTextModel` (`text_model.encoder.layers.0.self_attn.q_proj`), as peft
//! names them; the export maps that to kohya's `lora_te_text_model_encoder_layers_0_...` and
//! diffusers' `text_encoder.text_model.encoder.layers.0...`. q, k, v adapters add into their
//! columns of the fused q/k/v product.
//!
//! The stream is not updated in place: each residual add writes a new stream tensor, since the
//! layer norm backward reads the stream before the add. Saved per layer: the two stream states
//! entering the norms with their statistics, q/k/v (fused), the attention output and softmax
//! statistics, fc1's output (the quick-GELU input), and the inputs the adapters read (normed
//! streams, quick-GELU output) when those have adapters; then the last stream and the final
//! norm's statistics. The output's gradient comes in f16 at the caller's loss scale (the
//! UNet's: [`ClipTrainPlan::loss_scale`]), the adapters divide it back out of their f32
//! gradients. The backward ends at the lowest layer with an adapter: the embeddings get no
//! gradient, frozen weights none at all.

use crate::config::ClipConfig;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Plan, PlanBuilder, Recorder, Tensor};
use crate::kernels::attention::{Attention, Operand};
use crate::kernels::attention_backward::{AttentionBackward, AttentionGrads};
use crate::kernels::elementwise::{self, Unary};
use crate::kernels::grad_ops::{self, Activation};
use crate::kernels::{norm, tensor_ops};
use crate::model::clip::{ClipLayer, ClipTextModel};
use crate::model::lora::{Adapters, LoraParams, LoraSpec};
use crate::model::unet_transformer::{adapt, adapt_backward, adapt_fused, copy, AdaptableWeight, Applied};

/// The projections of an encoder layer that get adapters, as (module path under the layer,
/// whether it is in the MLP).
const TARGETS: [&str; 6] = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2"];

/// The module path of projection `proj` of encoder layer `i`, as peft names it.
pub fn module_name(i: usize, proj: &str) -> String {
    format!("text_model.encoder.layers.{i}.{proj}")
}

impl ClipConfig {
    /// The adapters of the text encoder at rank, alpha and dropout: every layer's q, k, v,
    /// out projections and the MLP's fc1, fc2 (kohya's choice for SD-1.5: 72 modules), in
    /// layer order.
    pub fn lora_specs(&self, rank: usize, alpha: f32, dropout: f32) -> Vec<LoraSpec> {
        let (d, f) = (self.hidden_size, self.intermediate_size);
        let mut specs = Vec::new();
        for i in 0..self.num_hidden_layers {
            for proj in TARGETS {
                let (k, n) = match proj {
                    "mlp.fc1" => (d, f),
                    "mlp.fc2" => (f, d),
                    _ => (d, d),
                };
                specs.push(LoraSpec { name: module_name(i, proj), k, n, rank, alpha, dropout });
            }
        }
        specs
    }
}

impl ClipTextModel {
    /// The weights the text encoder's adapters target (see [`ClipConfig::lora_specs`]), each
    /// with the module paths of the projections stacked in it (q, k, v share one fused weight):
    /// what a trainer merges its adapters into to sample with them.
    pub fn adaptable_weights(&self) -> Vec<AdaptableWeight> {
        let mut out = Vec::new();
        for (i, l) in self.layers.iter().enumerate() {
            let qkv: Vec<String> = TARGETS[..3].iter().map(|p| module_name(i, p)).collect();
            out.push(AdaptableWeight::of(&l.qkv, &qkv, false));
            out.push(AdaptableWeight::of(&l.out_proj, &[module_name(i, TARGETS[3])], false));
            out.push(AdaptableWeight::of(&l.fc1, &[module_name(i, TARGETS[4])], false));
            out.push(AdaptableWeight::of(&l.fc2, &[module_name(i, TARGETS[5])], false));
        }
        out
    }
}

/// A built text-encoder training pass for `batch` prompts of the full context length.
pub struct ClipTrainPlan {
    pub batch: usize,
    pub len: usize,
    /// Token ids in (u32 words, see [`tensor_ops::upload_ids`]).
    pub ids: Tensor,
    /// The output hidden states (after the final norm), [batch, len, hidden] f16.
    pub out: Tensor,
    /// The output's gradient in, [batch, len, hidden] f16 at `loss_scale`.
    pub dout: Tensor,
    /// The scale of `dout` (the adapters' gradients are divided by it).
    pub loss_scale: f32,
    pub forward: Plan,
    pub backward: Plan,
    /// Activation bytes saved between the forward and the backward.
    pub saved_bytes: u64,
}

/// What one encoder layer's backward reads.
struct LayerSaved {
    /// The stream entering layer_norm1 and its statistics; the normed stream when a q, k or v
    /// adapter reads it.
    s0: Tensor,
    stats1: Tensor,
    x1: Option<Tensor>,
    /// q, k, v [rows, 3d], the attention output [rows, d], its softmax statistics.
    qkv: Tensor,
    o: Tensor,
    attn_stats: Tensor,
    /// The stream entering layer_norm2, its statistics and normed output (when fc1 has an
    /// adapter).
    s1: Tensor,
    stats2: Tensor,
    x2: Option<Tensor>,
    /// fc1's output [rows, f], and the quick-GELU output when fc2 has an adapter.
    m: Tensor,
    g: Option<Tensor>,
    qkv_lora: Vec<Applied>,
    out_lora: Vec<Applied>,
    fc1_lora: Vec<Applied>,
    fc2_lora: Vec<Applied>,
}

impl LayerSaved {
    fn release(self, pb: &mut PlanBuilder) {
        for a in [self.qkv_lora, self.out_lora, self.fc1_lora, self.fc2_lora].into_iter().flatten() {
            a.release(pb);
        }
        for t in [Some(self.s0), Some(self.stats1), self.x1, Some(self.qkv), Some(self.o), Some(self.attn_stats), Some(self.s1), Some(self.stats2), self.x2, Some(self.m), self.g].into_iter().flatten() {
            pb.free(t);
        }
    }
}

/// `y` when some adapter read it (kept for the backward), else given back now.
fn keep_if(pb: &mut PlanBuilder, y: Tensor, read: &[Applied]) -> Option<Tensor> {
    if read.is_empty() {
        pb.free(y);
        None
    } else {
        Some(y)
    }
}

impl ClipTextModel {
    /// Builds the training pass: forward with the adapters of `lora` (looked up by
    /// [`module_name`]) giving the hidden state `skip` layers before the last after the
    /// final norm (as [`ClipTextModel::plan`]), and the backward from [`ClipTrainPlan::dout`]
    /// (at `loss_scale`) into `lora`'s gradients.
    pub fn train_plan(&self, gpu: &Gpu, batch: usize, skip: usize, lora: &LoraParams, loss_scale: f32) -> Result<ClipTrainPlan> {
        let (d, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let len = self.cfg.max_position_embeddings;
        let used = self.layers.len().checked_sub(skip).filter(|&n| n > 0 && batch > 0);
        let Some(used) = used else {
            return Err(Error::Usage(format!("CLIP training: batch {batch}, skip {skip} of {} layers: need batch >= 1 and skip < layers", self.layers.len())));
        };
        if !(loss_scale.is_finite() && loss_scale > 0.0) {
            return Err(Error::Usage(format!("CLIP training: loss scale {loss_scale} must be positive")));
        }
        for l in &lora.layers {
            let s = &l.spec;
            let known = (0..self.layers.len()).any(|i| TARGETS.iter().any(|p| module_name(i, p) == s.name));
            if !known {
                return Err(Error::Usage(format!("CLIP training: adapter {:?} names no projection of this text encoder", s.name)));
            }
        }
        let ad = Adapters::new(lora, 1.0 / loss_scale);
        let rows = batch * len;
        let mut pb = PlanBuilder::new(gpu);
        let ids = Tensor::empty(gpu, &[batch, len], DType::F32, "token ids")?;
        let out = Tensor::empty(gpu, &[batch, len, d], DType::F16, "clip output")?;
        let dout = Tensor::empty(gpu, &[batch, len, d], DType::F16, "clip output gradient")?;
        let attn = Attention::new(batch, heads, len, len, d / heads, true);

        // ---- Forward ----
        let mut s = pb.f16(&[rows, d], "clip stream 0")?;
        pb.run(tensor_ops::embed(gpu, &ids, &self.token_embedding, &self.position_embedding, &s, len)?)?;
        let mut saved = Vec::with_capacity(used);
        for (i, l) in self.layers[..used].iter().enumerate() {
            let (ls, next) = layer_forward(&mut pb, l, i, s, &attn, &ad)?;
            saved.push(ls);
            s = next;
        }
        let n = &self.final_layer_norm;
        let final_stats = pb.tensor(&[rows, 2], DType::F32, "final norm stats (saved)")?;
        pb.run(norm::layer_norm_saving(gpu, &s, &n.gamma, &n.beta, &out, &final_stats, n.eps)?)?;
        let forward = pb.split();
        let saved_bytes = pb.live_bytes();

        // ---- Backward ----
        // The lowest layer with an adapter: below it nothing trains.
        let has = |i: usize| TARGETS.iter().any(|p| ad.get(&module_name(i, p)).is_some());
        let lowest = (0..used).find(|&i| has(i));
        let ds = pb.f16(&[rows, d], "clip dstream")?;
        if lowest.is_some() {
            n.layer_backward(&mut pb, &s, &final_stats, &dout, &ds, false)?;
        }
        pb.free(s);
        pb.free(final_stats);
        for (i, ls) in saved.into_iter().enumerate().rev() {
            match lowest {
                Some(low) if i >= low => layer_backward(&mut pb, &self.layers[i], ls, &ds, &attn, &ad, i > low)?,
                _ => ls.release(&mut pb),
            }
        }
        pb.free(ds);
        Ok(ClipTrainPlan { batch, len, ids, out, dout, loss_scale, forward, backward: pb.finish(), saved_bytes })
    }
}

/// One encoder layer's training forward from the stream s0 (moved in, saved): returns what
/// the backward reads and the new stream.
fn layer_forward(pb: &mut PlanBuilder, l: &ClipLayer, i: usize, s0: Tensor, attn: &Attention, ad: &Adapters) -> Result<(LayerSaved, Tensor)> {
    let gpu = pb.gpu;
    let d = l.out_proj.n;
    let f = l.fc1.n;
    // s1 = s0 + out_proj(attention(qkv(layer_norm1(s0)))).
    let (x1, stats1) = l.layer_norm1.layer_saving(pb, &s0, "clip ln1")?;
    let qkv = l.qkv.apply(pb, &x1, "clip qkv (saved)")?;
    let mut qkv_lora = Vec::new();
    let names = TARGETS[..3].iter().map(|p| module_name(i, p)).collect();
    adapt_fused(pb, ad, names, &x1, &qkv, 0, d, 3 * d, &mut qkv_lora)?;
    let x1 = keep_if(pb, x1, &qkv_lora);
    let rows = s0.numel() / d;
    let o = pb.f16(&[rows, d], "clip attention (saved)")?;
    let attn_stats = pb.tensor(&[attn.batch * attn.heads * attn.lq, 2], DType::F32, "clip attention lse (saved)")?;
    let (q, k, v) = (Operand::slice(&qkv, 0, 3 * d), Operand::slice(&qkv, d, 3 * d), Operand::slice(&qkv, 2 * d, 3 * d));
    pb.run(attn.prepare_saving(gpu, q, k, v, Operand::dense(&o, d), &attn_stats)?)?;
    let s1 = copy(pb, &s0, "clip stream")?;
    l.out_proj.forward(pb, &o, &s1, true)?;
    let mut out_lora = Vec::new();
    adapt(pb, ad, module_name(i, TARGETS[3]), &o, &s1, 0, d, &mut out_lora)?;
    // s2 = s1 + fc2(quick_gelu(fc1(layer_norm2(s1)))).
    let (x2, stats2) = l.layer_norm2.layer_saving(pb, &s1, "clip ln2")?;
    let m = l.fc1.apply(pb, &x2, "clip fc1 (saved)")?;
    let mut fc1_lora = Vec::new();
    adapt(pb, ad, module_name(i, TARGETS[4]), &x2, &m, 0, f, &mut fc1_lora)?;
    let x2 = keep_if(pb, x2, &fc1_lora);
    let g = pb.f16(&m.shape, "clip quick_gelu")?;
    pb.run(elementwise::unary(gpu, Unary::QuickGelu, &m, &g)?)?;
    let s2 = copy(pb, &s1, "clip stream")?;
    l.fc2.forward(pb, &g, &s2, true)?;
    let mut fc2_lora = Vec::new();
    adapt(pb, ad, module_name(i, TARGETS[5]), &g, &s2, 0, d, &mut fc2_lora)?;
    let g = keep_if(pb, g, &fc2_lora);
    let saved = LayerSaved { s0, stats1, x1, qkv, o, attn_stats, s1, stats2, x2, m, g, qkv_lora, out_lora, fc1_lora, fc2_lora };
    Ok((saved, s2))
}

/// One encoder layer's backward: `ds` holds the gradient of the layer's output stream and,
/// with `need_dx`, becomes that of its input stream (updated in place); without, only the
/// adapters' gradients are made. Frees the saved tensors.
fn layer_backward(pb: &mut PlanBuilder, l: &ClipLayer, saved: LayerSaved, ds: &Tensor, attn: &Attention, ad: &Adapters, need_dx: bool) -> Result<()> {
    let gpu = pb.gpu;
    let d = l.out_proj.n;
    let LayerSaved { s0, stats1, x1, qkv, o, attn_stats, s1, stats2, x2, m, g, qkv_lora, out_lora, fc1_lora, fc2_lora } = saved;
    // s2 = s1 + fc2(quick_gelu(fc1(layer_norm2(s1)))).
    let dg = l.fc2.backward_new(pb, ds, "clip dquick_gelu")?;
    for a in fc2_lora {
        adapt_backward(pb, ad, a, ds, Some(&dg))?;
    }
    let dm = pb.f16(&m.shape, "clip dfc1")?;
    pb.run(grad_ops::activation_backward(gpu, Activation::QuickGelu, &m, &dg, &dm)?)?;
    pb.free(dg);
    let dx2 = l.fc1.backward_new(pb, &dm, "clip dln2")?;
    for a in fc1_lora {
        adapt_backward(pb, ad, a, &dm, Some(&dx2))?;
    }
    pb.free(dm);
    l.layer_norm2.layer_backward(pb, &s1, &stats2, &dx2, ds, true)?;
    for t in [Some(dx2), Some(s1), Some(stats2), x2, Some(m), g].into_iter().flatten() {
        pb.free(t);
    }
    // s1 = s0 + out_proj(attention(qkv(layer_norm1(s0)))).
    let d_o = l.out_proj.backward_new(pb, ds, "clip dattention")?;
    for a in out_lora {
        adapt_backward(pb, ad, a, ds, Some(&d_o))?;
    }
    let dqkv = pb.f16(&qkv.shape, "clip dqkv")?;
    let w = 3 * d;
    let grads = AttentionGrads {
        q: Operand::slice(&qkv, 0, w),
        k: Operand::slice(&qkv, d, w),
        v: Operand::slice(&qkv, 2 * d, w),
        o: Operand::dense(&o, d),
        dout: Operand::dense(&d_o, d),
        dq: Operand::slice(&dqkv, 0, w),
        dk: Operand::slice(&dqkv, d, w),
        dv: Operand::slice(&dqkv, 2 * d, w),
    };
    pb.run_all(AttentionBackward::for_saved_lse(gpu, *attn, None)?.prepare_with_saved_lse(gpu, &grads, &attn_stats)?)?;
    for t in [d_o, o, attn_stats] {
        pb.free(t);
    }
    let dx1 = if need_dx { Some(l.qkv.backward_new(pb, &dqkv, "clip dln1")?) } else { None };
    for a in qkv_lora {
        adapt_backward(pb, ad, a, &dqkv, dx1.as_ref())?;
    }
    pb.free(dqkv);
    pb.free(qkv);
    if let Some(dx1) = dx1 {
        l.layer_norm1.layer_backward(pb, &s0, &stats1, &dx1, ds, true)?;
        pb.free(dx1);
    }
    for t in [Some(s0), Some(stats1), x1].into_iter().flatten() {
        pb.free(t);
    }
    Ok(())
}

impl ClipTrainPlan {
    /// Writes the token ids ([batch · len], from the tokenizer) for the next replay.
    pub fn set_ids(&self, gpu: &Gpu, ids: &[u32]) -> Result<()> {
        if ids.len() != self.batch * self.len {
            return Err(Error::shape("CLIP training input", format!("{} token ids for {} prompts of {}", ids.len(), self.batch, self.len)));
        }
        gpu.queue.write_buffer(&self.ids.buffer, self.ids.offset, bytemuck::cast_slice(ids));
        Ok(())
    }

    /// Queues the forward (its output in [`ClipTrainPlan::out`]).
    pub fn record_forward(&self, rec: &mut Recorder) -> Result<()> {
        self.forward.record(rec)
    }

    /// Queues the backward from [`ClipTrainPlan::dout`] (after the forward of the same step).
    pub fn record_backward(&self, rec: &mut Recorder) -> Result<()> {
        self.backward.record(rec)
    }
}
