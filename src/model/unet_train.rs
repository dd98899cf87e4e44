//! One LoRA training step of the UNet as a static plan: the forward (saving what the backward
//! reads), the MSE loss against the target, and the LoRA-only backward, the forward's mirror in
//! reverse. The frozen layers get input gradients only; the adapters' A and B gradients
//! accumulate (f32, in [`LoraParams`]'s flat buffer) until the optimizer step, which is
//! separate so several micro-batches can accumulate.
//!
//! Activation gradients are f16 scaled by a power-of-two loss scale (so that the small MSE
//! gradients stay clear of f16's subnormals); the adapters divide it back out of their f32
//! gradients. The backward stops where nothing before trains: the time embedding and
//! `conv_in` get no gradient, nor does the first resnet.
//!
//! Memory: [`UNetTrainPlan::saved_bytes`] are the activations alive between the forward and
//! the backward (the memory plan's saved set: per resnet its input, conv1's output and norm
//! statistics; per transformer block the three stream states, q/k/v, the attention output, the
//! GEGLU input and what the adapters read), the plan's `peak_bytes` the most pool memory in
//! use at once. With [`TrainOptions::recompute`] a transformer keeps only its input and
//! records its forward again just before its backward.

use crate::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Plan, PlanBuilder, Tensor};
use crate::kernels::grad_ops::{self, GradOut};
use crate::kernels::tensor_ops;
use crate::model::layers::Taps;
use crate::model::lora::{Adapters, LoraParams, LoraSpec};
use crate::model::unet::UNet2DConditionModel;
use crate::model::unet_blocks::{Hw, ResnetSaved};
use crate::model::unet_transformer::{ContextGrad, Transformer2D, TransformerSaved};

/// Which modules of the UNet get adapters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraTargets {
    /// `to_q`, `to_k`, `to_v`, `to_out.0` of attn1 and attn2 in every transformer block
    /// (diffusers' and peft's usual choice: 128 modules in SD-1.5).
    Attention,
    /// kohya's default for SD-1.5: also `proj_in`, `proj_out`, `ff.net.0.proj`, `ff.net.2`
    /// (192 modules).
    Transformer,
}

impl std::str::FromStr for LoraTargets {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "attention" => Ok(LoraTargets::Attention),
            "transformer" => Ok(LoraTargets::Transformer),
            other => Err(Error::Usage(format!("--targets {other}: use attention or transformer"))),
        }
    }
}

impl UNetConfig {
    /// The adapters for `targets` at rank, alpha and dropout, named by diffusers module path
    /// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`), in module order: down
    /// blocks, mid block, up blocks; within a transformer proj_in, then per block attn1's
    /// q, k, v, out, attn2's, the feed-forward's two linears, then proj_out.
    pub fn lora_specs(&self, targets: LoraTargets, rank: usize, alpha: f32, dropout: f32) -> Vec<LoraSpec> {
        let ch = &self.block_out_channels;
        let mut transformers: Vec<(String, usize)> = Vec::new();
        for (i, kind) in self.down_block_types.iter().enumerate() {
            if *kind == DownBlockType::CrossAttnDownBlock2D {
                transformers.extend((0..self.layers_per_block).map(|j| (format!("down_blocks.{i}.attentions.{j}"), ch[i])));
            }
        }
        transformers.push(("mid_block.attentions.0".into(), *ch.last().unwrap()));
        for (i, kind) in self.up_block_types.iter().enumerate() {
            if *kind == UpBlockType::CrossAttnUpBlock2D {
                let c = ch[ch.len() - 1 - i];
                transformers.extend((0..=self.layers_per_block).map(|j| (format!("up_blocks.{i}.attentions.{j}"), c)));
            }
        }
        let ctx = self.cross_attention_dim;
        let wide = targets == LoraTargets::Transformer;
        let mut specs = Vec::new();
        let mut add = |name: String, k: usize, n: usize| specs.push(LoraSpec { name, k, n, rank, alpha, dropout });
        for (t, c) in transformers {
            if wide {
                add(format!("{t}.proj_in"), c, c);
            }
            for b in 0..self.transformer_layers_per_block {
                let p = format!("{t}.transformer_blocks.{b}");
                for (attn, kv_in) in [("attn1", c), ("attn2", ctx)] {
                    add(format!("{p}.{attn}.to_q"), c, c);
                    add(format!("{p}.{attn}.to_k"), kv_in, c);
                    add(format!("{p}.{attn}.to_v"), kv_in, c);
                    add(format!("{p}.{attn}.to_out.0"), c, c);
                }
                if wide {
                    add(format!("{p}.ff.net.0.proj"), c, 8 * c);
                    add(format!("{p}.ff.net.2"), 4 * c, c);
                }
            }
            if wide {
                add(format!("{t}.proj_out"), c, c);
            }
        }
        specs
    }
}

/// Options of a training plan.
#[derive(Clone, Copy, Debug, Default)]
pub struct TrainOptions {
    /// The loss scale of the f16 activation gradients; None: the largest power of two not
    /// above the number of predicted values (the MSE's gradient is then about 2·(pred -
    /// target), order 1).
    pub loss_scale: Option<f32>,
    /// Keep only each transformer's input from the forward and record its forward again just
    /// before its backward (attention, GEGLU, norm outputs: most of the saved activations),
    /// trading about one more transformer forward per step for memory.
    pub recompute: bool,
    /// A per-sample loss weight input ([`UNetTrainPlan::weights`], e.g. min-SNR's): the
    /// loss's gradient for sample b is multiplied by weights[b].
    pub loss_weights: bool,
    /// Also compute the gradient of the text context ([`UNetTrainPlan::dcontext`]), summed
    /// over every cross-attention's k and v (their adapters included): what a trained text
    /// encoder's backward starts from.
    pub context_grad: bool,
}

/// A built training step for one batch size and latent size.
pub struct UNetTrainPlan {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    /// Noisy latents in, [batch, h, w, in_channels] f16.
    pub sample: Tensor,
    /// Timesteps in, [batch] f32.
    pub timestep: Tensor,
    /// Text context in, [batch, tokens, cross_attention_dim] f16.
    pub context: Tensor,
    /// The target (noise, or v), [batch, h, w, out_channels] f16.
    pub target: Tensor,
    /// The prediction, [batch, h, w, out_channels] f16.
    pub pred: Tensor,
    /// The MSE loss, f32 [1] (unweighted).
    pub loss: Tensor,
    /// Per-sample loss weights in, [batch] f16, with [`TrainOptions::loss_weights`].
    pub weights: Option<Tensor>,
    /// d(loss)/d(context) out, [batch, tokens, cross_attention_dim] f16 at `loss_scale`, with
    /// [`TrainOptions::context_grad`].
    pub dcontext: Option<Tensor>,
    pub loss_scale: f32,
    /// Forward, loss and backward.
    pub plan: Plan,
    /// Activation bytes saved between the forward and the backward.
    pub saved_bytes: u64,
}

/// A transformer's state between the forward and the backward: all it saved, or only its
/// input when it is recomputed.
enum Held {
    Kept(TransformerSaved),
    Input(Tensor),
}

impl Held {
    fn new(pb: &mut PlanBuilder, saved: TransformerSaved, recompute: bool) -> Held {
        if recompute { Held::Input(saved.into_input(pb)) } else { Held::Kept(saved) }
    }

    /// The saved state, recomputed when only the input was kept.
    fn take(self, pb: &mut PlanBuilder, t: &Transformer2D, batch: usize, ctx: (&Tensor, usize), ad: &Adapters) -> Result<TransformerSaved> {
        match self {
            Held::Kept(s) => Ok(s),
            Held::Input(x) => t.recompute(pb, x, batch, ctx, ad),
        }
    }
}

/// A down-path step's saved state, in forward order.
enum DownSaved {
    Resnet(ResnetSaved),
    Transformer(Held),
    /// The downsampler's input (kept as a skip, released at its backward) and its size.
    Down(Tensor, Hw),
}

impl UNet2DConditionModel {
    /// Builds one training step: forward with the adapters of `lora`, MSE loss against the
    /// target, backward into `lora`'s gradients. `tokens` is the context length.
    pub fn train_plan(&self, gpu: &Gpu, batch: usize, height: usize, width: usize, tokens: usize, lora: &LoraParams, opts: TrainOptions) -> Result<UNetTrainPlan> {
        let cfg = &self.cfg;
        if batch == 0 || height == 0 || width == 0 || tokens == 0 {
            return Err(Error::Usage(format!("UNet training: batch {batch}, latents {height}x{width}, {tokens} context tokens: all must be at least 1")));
        }
        let numel = batch * height * width * cfg.out_channels;
        let loss_scale = opts.loss_scale.unwrap_or_else(|| 2f32.powi((numel as f64).log2().floor() as i32));
        if !(loss_scale.is_finite() && loss_scale > 0.0) {
            return Err(Error::Usage(format!("loss scale {loss_scale} must be positive")));
        }
        let ad = Adapters::new(lora, 1.0 / loss_scale);
        let mut pb = PlanBuilder::new(gpu);
        let sample = Tensor::empty(gpu, &[batch, height, width, cfg.in_channels], DType::F16, "unet sample")?;
        let timestep = Tensor::empty(gpu, &[batch], DType::F32, "unet timestep")?;
        let context = Tensor::empty(gpu, &[batch, tokens, cfg.cross_attention_dim], DType::F16, "unet context")?;
        let target = Tensor::empty(gpu, &[batch, height, width, cfg.out_channels], DType::F16, "unet target")?;
        let pred = Tensor::empty(gpu, &[batch, height, width, cfg.out_channels], DType::F16, "unet prediction")?;
        let loss = Tensor::empty(gpu, &[1], DType::F32, "unet loss")?;
        let ctx = (&context, tokens);
        let time_bias = self.time_biases(&mut pb, &timestep, batch, &mut Taps::default())?;
        let temb = Some(&time_bias);
        let mut up_sizes: Vec<(Hw, Hw)> = Vec::new();

        // ---- Forward ----
        let mut hw: Hw = (batch, height, width);
        let mut h = self.conv_in.apply(&mut pb, &sample, hw, "conv_in")?;
        let mut skips: Vec<(Tensor, Hw)> = vec![(h.clone(), hw)];
        let mut down_saved: Vec<Vec<DownSaved>> = Vec::new();
        for level in &self.down {
            let mut saved = Vec::new();
            for (j, r) in level.resnets.iter().enumerate() {
                let (y, rs) = r.forward_train(&mut pb, h, hw, temb)?;
                saved.push(DownSaved::Resnet(rs));
                h = y;
                if let Some(t) = level.attentions.get(j) {
                    let (y, ts) = t.forward_train(&mut pb, h, batch, ctx, &ad)?;
                    saved.push(DownSaved::Transformer(Held::new(&mut pb, ts, opts.recompute)));
                    h = y;
                }
                skips.push((h.clone(), hw));
            }
            if let Some(d) = &level.down {
                let (oh, ow) = d.conv.out_hw(hw.1, hw.2);
                let y = d.conv.apply(&mut pb, &h, hw, "downsample")?;
                saved.push(DownSaved::Down(h, hw));
                h = y;
                hw = (batch, oh, ow);
                skips.push((h.clone(), hw));
            }
            down_saved.push(saved);
        }
        let (m0, mid0) = self.mid_resnets[0].forward_train(&mut pb, h, hw, temb)?;
        let (m1, mid_t) = self.mid_attention.forward_train(&mut pb, m0, batch, ctx, &ad)?;
        let mid_t = Held::new(&mut pb, mid_t, opts.recompute);
        let (mut h, mid1) = self.mid_resnets[1].forward_train(&mut pb, m1, hw, temb)?;
        // Up path: concat(stream, skip) -> resnet (-> transformer) (-> upsample). The skips stay
        // alive: each is also the saved input of a down-path block, released by its backward.
        let mut up_saved: Vec<Vec<UpSaved>> = Vec::new();
        for level in &self.up {
            let mut saved = Vec::new();
            for (j, r) in level.resnets.iter().enumerate() {
                let (skip, _) = skips.pop().expect("skip count checked at load");
                let rows = hw.0 * hw.1 * hw.2;
                let (c1, c2) = (h.numel() / rows, skip.numel() / rows);
                let cat = pb.f16(&[batch, hw.1, hw.2, c1 + c2], "skip concat")?;
                pb.run(tensor_ops::concat(gpu, &h, &skip, &cat, rows, c1, c2)?)?;
                pb.free(h);
                let (y, resnet) = r.forward_train(&mut pb, cat, hw, temb)?;
                h = y;
                let transformer = match level.attentions.get(j) {
                    Some(t) => {
                        let (y, ts) = t.forward_train(&mut pb, h, batch, ctx, &ad)?;
                        h = y;
                        Some(Held::new(&mut pb, ts, opts.recompute))
                    }
                    None => None,
                };
                saved.push(UpSaved { resnet, transformer, hw, c1, c2 });
            }
            if let Some(u) = &level.up {
                let (_, next) = *skips.last().expect("an upsampler is followed by skips");
                let y = u.forward(&mut pb, &h, hw, (next.1, next.2))?;
                pb.free(std::mem::replace(&mut h, y));
                up_sizes.push((hw, next));
                hw = next;
            }
            up_saved.push(saved);
        }
        let (n, out_stats) = self.conv_norm_out.group_saving(&mut pb, &h, batch, cfg.norm_num_groups, true, true, "conv_norm_out")?;
        let out_stats = out_stats.expect("saving norm");
        self.conv_out.forward(&mut pb, &n, hw, &pred, false)?;
        pb.free(n);
        pb.free(time_bias);
        let saved_bytes = pb.live_bytes();

        // ---- Loss: mean((pred - target)²), its gradient at the loss scale ----
        let dpred = pb.f16(&pred.shape, "dpred")?;
        let partials = pb.tensor(&[grad_ops::mse_partials(numel)], DType::F32, "loss partials")?;
        pb.run_all(grad_ops::mse_loss(gpu, &pred, &target, &dpred, &partials, &loss, loss_scale)?)?;
        pb.free(partials);
        let weights = if opts.loss_weights { Some(Tensor::empty(gpu, &[batch], DType::F16, "loss weights")?) } else { None };
        let dpred = match &weights {
            Some(w) => {
                let weighted = pb.f16(&pred.shape, "weighted dpred")?;
                pb.run(crate::kernels::elementwise::binary_grouped(gpu, crate::kernels::elementwise::Binary::Mul { alpha: 1.0 }, &dpred, w, &weighted, batch)?)?;
                pb.free(dpred);
                weighted
            }
            None => dpred,
        };

        // ---- Backward ----
        let dctx = if opts.context_grad { Some(ContextGrad::new(Tensor::empty(gpu, &context.shape, DType::F16, "unet context gradient")?)) } else { None };
        let dctx = dctx.as_ref();
        let dn = pb.f16(&h.shape, "dconv_out")?;
        self.conv_out.backward_input(&mut pb, &dpred, hw, &dn)?;
        pb.free(dpred);
        let mut dh = pb.f16(&h.shape, "dconv_norm_out")?;
        self.conv_norm_out.group_backward(&mut pb, &h, &out_stats, &dn, &dh, batch, cfg.norm_num_groups, true, false)?;
        for t in [dn, h, out_stats] {
            pb.free(t);
        }
        // Up path, reversed. Each concat's skip half is kept for the down path: the skips'
        // gradients come out in the order the skips were made, so the last made is on top.
        let mut dskips: Vec<Tensor> = Vec::new();
        for (level, saved) in self.up.iter().zip(up_saved).rev() {
            if let Some(u) = &level.up {
                let (before, after) = up_sizes.pop().expect("one size pair per upsampler");
                dh = u.backward(&mut pb, dh, before, (after.1, after.2))?;
            }
            for (j, us) in saved.into_iter().enumerate().rev() {
                if let (Some(held), Some(t)) = (us.transformer, level.attentions.get(j)) {
                    let ts = held.take(&mut pb, t, batch, ctx, &ad)?;
                    dh = t.backward(&mut pb, ts, dh, batch, ctx, &ad, true, dctx)?.expect("asked for dx");
                }
                let dcat = level.resnets[j].backward(&mut pb, us.resnet, dh, true)?.expect("asked for dx");
                let rows = us.hw.0 * us.hw.1 * us.hw.2;
                let da = pb.f16(&[rows, us.c1], "up stream dx")?;
                let db = pb.f16(&[rows, us.c2], "skip dx")?;
                pb.run_all(grad_ops::concat_backward(gpu, &dcat, GradOut::set(&da), GradOut::set(&db), rows, us.c1, us.c2)?)?;
                pb.free(dcat);
                dskips.push(db);
                dh = da;
            }
        }
        // Mid block, reversed.
        dh = self.mid_resnets[1].backward(&mut pb, mid1, dh, true)?.expect("asked for dx");
        let mid_t = mid_t.take(&mut pb, &self.mid_attention, batch, ctx, &ad)?;
        dh = self.mid_attention.backward(&mut pb, mid_t, dh, batch, ctx, &ad, true, dctx)?.expect("asked for dx");
        dh = self.mid_resnets[0].backward(&mut pb, mid0, dh, true)?.expect("asked for dx");
        // Down path, reversed: before each block that made a skip, that skip's gradient joins
        // the stream's. The first resnet (and what is before it) trains nothing, so the
        // backward stops at the first transformer's adapters.
        let mut dh = Some(dh);
        for (i, saved) in down_saved.into_iter().enumerate().rev() {
            let level = &self.down[i];
            let mut j = level.resnets.len();
            for s in saved.into_iter().rev() {
                match s {
                    DownSaved::Down(x, shape) => {
                        let d = dh.take().expect("the down path's gradient flows up to here");
                        add_skip(&mut pb, &d, dskips.pop())?;
                        dh = Some(level.down.as_ref().expect("a saved downsampler").backward(&mut pb, d, shape)?);
                        pb.free(x);
                    }
                    DownSaved::Transformer(held) => {
                        let d = dh.take().expect("the down path's gradient flows up to here");
                        add_skip(&mut pb, &d, dskips.pop())?;
                        let need_dx = !(i == 0 && j == 1);
                        let t = &level.attentions[j - 1];
                        let ts = held.take(&mut pb, t, batch, ctx, &ad)?;
                        dh = t.backward(&mut pb, ts, d, batch, ctx, &ad, need_dx, dctx)?;
                    }
                    DownSaved::Resnet(rs) => {
                        j -= 1;
                        let r = &level.resnets[j];
                        match dh.take() {
                            Some(d) => {
                                // Without a transformer after it, this resnet's output was the skip.
                                if level.attentions.get(j).is_none() {
                                    add_skip(&mut pb, &d, dskips.pop())?;
                                }
                                dh = r.backward(&mut pb, rs, d, !(i == 0 && j == 0))?;
                            }
                            None => rs.release(&mut pb),
                        }
                    }
                }
            }
        }
        // conv_in's output (the first skip) needs no gradient.
        for t in dskips.into_iter().chain(dh) {
            pb.free(t);
        }
        if dctx.is_some_and(|d| !d.written()) {
            return Err(Error::Usage("UNet training: context gradient asked for, but no cross-attention wrote it".into()));
        }
        let dcontext = dctx.map(|d| d.t.clone());
        Ok(UNetTrainPlan { batch, height, width, sample, timestep, context, target, pred, loss, weights, dcontext, loss_scale, plan: pb.finish(), saved_bytes })
    }
}

/// An up-path resnet's saved state, its transformer's, and the concat it read.
struct UpSaved {
    resnet: ResnetSaved,
    transformer: Option<Held>,
    hw: Hw,
    c1: usize,
    c2: usize,
}

/// dx += a skip's gradient (moved in, freed).
fn add_skip(pb: &mut PlanBuilder, dx: &Tensor, dskip: Option<Tensor>) -> Result<()> {
    let dskip = dskip.ok_or_else(|| Error::Usage("UNet backward: a skip without its gradient".into()))?;
    let c = *dx.shape.last().expect("a shaped tensor");
    let rows = dx.numel() / c;
    pb.run(grad_ops::slice_cols(pb.gpu, &dskip, GradOut::add(dx), rows, 0, c, c)?)?;
    pb.free(dskip);
    Ok(())
}
