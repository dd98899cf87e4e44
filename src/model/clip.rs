//! CLIP text encoder (transformers' `CLIPTextModel`, SD-1.5's `text_encoder`): token +
//! position embedding, pre-norm transformer layers with causal self-attention and a
//! quick-GELU MLP, final layer norm. The output is the last layer's hidden state after the
//! final norm, or with `skip` = n the hidden state n layers before the last, after the final
//! norm ("clip skip", as diffusers' `clip_skip` and A1111 do).

use crate::config::ClipConfig;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Plan, PlanBuilder, Recorder, Tensor};
use crate::kernels::attention::{Attention, Operand};
use crate::kernels::elementwise::{self, Unary};
use crate::kernels::tensor_ops;
use crate::model::layers::{Linear, Norm, Taps};
use crate::model::weights::Weights;

/// One encoder layer (`text_model.encoder.layers.<i>`).
pub(crate) struct ClipLayer {
    pub(crate) layer_norm1: Norm,
    /// q, k, v projections fused: [3·D, D].
    pub(crate) qkv: Linear,
    pub(crate) out_proj: Linear,
    pub(crate) layer_norm2: Norm,
    pub(crate) fc1: Linear,
    pub(crate) fc2: Linear,
}

/// The text encoder's weights on the GPU.
pub struct ClipTextModel {
    pub cfg: ClipConfig,
    pub(crate) token_embedding: Tensor,
    pub(crate) position_embedding: Tensor,
    pub(crate) layers: Vec<ClipLayer>,
    pub(crate) final_layer_norm: Norm,
}

/// A built encoder pass for `batch` prompts of `len` tokens.
pub struct ClipPlan {
    pub batch: usize,
    pub len: usize,
    /// Token ids in (u32 words, see [`tensor_ops::upload_ids`]).
    pub ids: Tensor,
    /// Hidden states out, [batch, len, hidden] f16.
    pub out: Tensor,
    pub plan: Plan,
    pub taps: Taps,
}

impl ClipTextModel {
    /// Loads `text_encoder.text_model.*`; the caller ends the load with `Weights::finish`.
    pub fn load(weights: &Weights, gpu: &Gpu, cfg: &ClipConfig) -> Result<ClipTextModel> {
        cfg.validate().map_err(|e| Error::model(weights.path(), e))?;
        let (d, f) = (cfg.hidden_size, cfg.intermediate_size);
        let eps = cfg.layer_norm_eps;
        let p = weights.prefix(gpu, "text_encoder.text_model");
        let emb = p.at("embeddings");
        let token_embedding = emb.get("token_embedding.weight", &[cfg.vocab_size, d])?;
        let position_embedding = emb.get("position_embedding.weight", &[cfg.max_position_embeddings, d])?;
        let mut layers = Vec::new();
        for i in 0..cfg.num_hidden_layers {
            let l = p.at("encoder.layers").at(i);
            let a = l.at("self_attn");
            layers.push(ClipLayer {
                layer_norm1: Norm::load(&l.at("layer_norm1"), d, eps)?,
                qkv: Linear::load_fused(&a, &["q_proj", "k_proj", "v_proj"], &[d, d, d], d, true)?,
                out_proj: Linear::load(&a.at("out_proj"), d, d, true)?,
                layer_norm2: Norm::load(&l.at("layer_norm2"), d, eps)?,
                fc1: Linear::load(&l.at("mlp.fc1"), f, d, true)?,
                fc2: Linear::load(&l.at("mlp.fc2"), d, f, true)?,
            });
        }
        let final_layer_norm = Norm::load(&p.at("final_layer_norm"), d, eps)?;
        Ok(ClipTextModel { cfg: cfg.clone(), token_embedding, position_embedding, layers, final_layer_norm })
    }

    /// Builds the pass for `batch` prompts of the full context length, giving the hidden state
    /// `skip` layers before the last (0: the last), after the final norm. With `tap`, every
    /// layer's raw output is kept as `hidden_states.<i>` (0 = the embeddings).
    pub fn plan(&self, gpu: &Gpu, batch: usize, skip: usize, tap: bool) -> Result<ClipPlan> {
        let (d, heads) = (self.cfg.hidden_size, self.cfg.num_attention_heads);
        let len = self.cfg.max_position_embeddings;
        let layers = self.layers.len();
        if skip >= layers || batch == 0 {
            return Err(Error::Usage(format!("CLIP: batch {batch}, skip {skip} of {layers} layers: need batch >= 1 and skip < layers")));
        }
        let mut pb = PlanBuilder::new(gpu);
        let mut taps = Taps { on: tap, ..Default::default() };
        let ids = Tensor::empty(gpu, &[batch, len], DType::F32, "token ids")?;
        let h = pb.f16(&[batch * len, d], "clip hidden")?;
        pb.run(tensor_ops::embed(gpu, &ids, &self.token_embedding, &self.position_embedding, &h, len)?)?;
        taps.tap(&mut pb, "hidden_states.0", &h)?;
        let attn = Attention::new(batch, heads, len, len, d / heads, true);
        for (i, l) in self.layers[..layers - skip].iter().enumerate() {
            // h = h + out_proj(attention(qkv(layer_norm1(h))))
            let x = l.layer_norm1.layer(&mut pb, &h, "clip ln1")?;
            let qkv = l.qkv.apply(&mut pb, &x, "clip qkv")?;
            pb.free(x);
            let o = pb.f16(&[batch * len, d], "clip attention")?;
            let (q, k, v) = (Operand::slice(&qkv, 0, 3 * d), Operand::slice(&qkv, d, 3 * d), Operand::slice(&qkv, 2 * d, 3 * d));
            pb.run(attn.prepare(gpu, q, k, v, Operand::dense(&o, d))?)?;
            pb.free(qkv);
            l.out_proj.forward(&mut pb, &o, &h, true)?;
            pb.free(o);
            // h = h + fc2(quick_gelu(fc1(layer_norm2(h))))
            let x = l.layer_norm2.layer(&mut pb, &h, "clip ln2")?;
            let m = l.fc1.apply(&mut pb, &x, "clip fc1")?;
            pb.free(x);
            let g = pb.f16(&m.shape, "clip quick_gelu")?;
            pb.run(elementwise::unary(gpu, Unary::QuickGelu, &m, &g)?)?;
            pb.free(m);
            l.fc2.forward(&mut pb, &g, &h, true)?;
            pb.free(g);
            taps.tap(&mut pb, &format!("hidden_states.{}", i + 1), &h)?;
        }
        let out = Tensor::empty(gpu, &[batch, len, d], DType::F16, "clip output")?;
        self.final_layer_norm.layer_into(&mut pb, &h, &out)?;
        pb.free(h);
        Ok(ClipPlan { batch, len, ids, out, plan: pb.finish(), taps })
    }
}

impl ClipPlan {
    /// Writes the token ids ([batch · len], from the tokenizer) for the next replay.
    pub fn set_ids(&self, gpu: &Gpu, ids: &[u32]) -> Result<()> {
        if ids.len() != self.batch * self.len {
            return Err(Error::shape("CLIP input", format!("{} token ids for {} prompts of {}", ids.len(), self.batch, self.len)));
        }
        gpu.queue.write_buffer(&self.ids.buffer, self.ids.offset, bytemuck::cast_slice(ids));
        Ok(())
    }

    /// Queues the pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.plan.record(rec)
    }

    /// Runs the pass on `ids` and waits; the result is in [`ClipPlan::out`].
    pub fn run(&self, gpu: &Gpu, ids: &[u32]) -> Result<()> {
        self.set_ids(gpu, ids)?;
        self.plan.run(gpu)
    }
}
