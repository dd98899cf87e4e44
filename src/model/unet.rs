//! The denoising UNet (diffusers' `UNet2DConditionModel`, SD-1.5 structure, epsilon
//! prediction): sinusoidal time projection and time embedding MLP, `conv_in`, down blocks
//! (resnets with transformers, downsamplers) whose outputs are kept as skips, the mid block,
//! up blocks that concatenate the skips back in, `conv_norm_out` + SiLU and `conv_out`.
//! Latents in and out are NHWC f16 [batch, h, w, 4]; any latent size works (upsamplers meet
//! the skips' sizes as diffusers' `forward_upsample_size` does).

use crate::config::{DownBlockType, UNetConfig, UpBlockType};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, KernelPath, Plan, PlanBuilder, Recorder, Tensor};
use crate::kernels::elementwise::{self, Unary};
use crate::kernels::tensor_ops;
use crate::model::layers::{Conv, ConvForm, Linear, Norm, Taps};
use crate::model::unet_blocks::{Downsample2D, Hw, ResnetBlock2D, TimeStack, Upsample2D};
use crate::model::unet_transformer::{AdaptableWeight, Transformer2D};
use crate::model::weights::Weights;

/// One level of the down or up path: resnets, each followed by a transformer when the block
/// has attention, then the resampler.
pub(crate) struct Level {
    pub(crate) resnets: Vec<ResnetBlock2D>,
    pub(crate) attentions: Vec<Transformer2D>,
    pub(crate) down: Option<Downsample2D>,
    pub(crate) up: Option<Upsample2D>,
}

/// The UNet's weights on the GPU.
pub struct UNet2DConditionModel {
    pub cfg: UNetConfig,
    pub(crate) linear_1: Linear,
    pub(crate) linear_2: Linear,
    /// Every resnet's time projection and conv1 bias, stacked ([`TimeStack`]).
    pub(crate) resnet_time_proj: Linear,
    pub(crate) conv_in: Conv,
    pub(crate) down: Vec<Level>,
    pub(crate) mid_resnets: [ResnetBlock2D; 2],
    pub(crate) mid_attention: Transformer2D,
    pub(crate) up: Vec<Level>,
    pub(crate) conv_norm_out: Norm,
    pub(crate) conv_out: Conv,
}

/// A built UNet pass for one batch size and latent size.
pub struct UNetPlan {
    pub batch: usize,
    pub height: usize,
    pub width: usize,
    /// Latents in, [batch, h, w, in_channels] f16.
    pub sample: Tensor,
    /// Timesteps in, [batch] f32.
    pub timestep: Tensor,
    /// Text context in, [batch, tokens, cross_attention_dim] f16.
    pub context: Tensor,
    /// Predicted noise out, [batch, h, w, out_channels] f16.
    pub out: Tensor,
    pub plan: Plan,
    pub taps: Taps,
}

impl UNet2DConditionModel {
    /// Loads `unet.*`; the caller ends the load with `Weights::finish`.
    pub fn load(weights: &Weights, gpu: &Gpu, cfg: &UNetConfig) -> Result<Self> {
        cfg.validate().map_err(|e| Error::model(weights.path(), e))?;
        let p = weights.prefix(gpu, "unet");
        let ch = &cfg.block_out_channels;
        let (t_in, t_dim) = (cfg.time_proj_dim(), cfg.time_embed_dim());
        let (groups, eps, heads, ctx) = (cfg.norm_num_groups, cfg.norm_eps, cfg.num_heads(), cfg.cross_attention_dim);
        let (tl, linear) = (cfg.transformer_layers_per_block, cfg.use_linear_projection);
        let mut stack = TimeStack::new(t_dim);
        let mut resnet = |q: &crate::model::weights::Prefix, cin, cout| ResnetBlock2D::load(q, cin, cout, Some(&mut stack), groups, eps);
        let transformer = |q: &crate::model::weights::Prefix, c| Transformer2D::load(q, c, heads, ctx, tl, groups, linear);
        // The 3x3 convolutions of every level but the lowest-resolution one (where the mid
        // block runs) go by Winograd when the weights were opened for it; on the
        // cooperative-matrix path the highest-resolution level's run directly instead, on the
        // staged kernel (`kernels::conv_coop`), which is faster there (H100, 64x64 latents,
        // batch 2: 320 -> 320 0.146 ms against 0.216 by Winograd; docs/PERF.md).
        let coop = gpu.caps.path == KernelPath::Coop;
        let wino = |level: usize| level + 1 < ch.len() && !(coop && level == 0);

        // Down path; the skip stack's channel counts follow the diffusers module order.
        let mut skips = vec![ch[0]];
        let mut down = Vec::new();
        let mut cin = ch[0];
        for (i, kind) in cfg.down_block_types.iter().enumerate() {
            let q = p.at("down_blocks").at(i).winograd(wino(i));
            let (cout, last) = (ch[i], i + 1 == ch.len());
            let mut level = Level { resnets: Vec::new(), attentions: Vec::new(), down: None, up: None };
            for j in 0..cfg.layers_per_block {
                level.resnets.push(resnet(&q.at("resnets").at(j), if j == 0 { cin } else { cout }, cout)?);
                if *kind == DownBlockType::CrossAttnDownBlock2D {
                    level.attentions.push(transformer(&q.at("attentions").at(j), cout)?);
                }
                skips.push(cout);
            }
            if !last {
                level.down = Some(Downsample2D::load(&q.at("downsamplers.0"), cout)?);
                skips.push(cout);
            }
            down.push(level);
            cin = cout;
        }
        let c_mid = *ch.last().unwrap();
        let m = p.at("mid_block");
        let mid_resnets = [resnet(&m.at("resnets.0"), c_mid, c_mid)?, resnet(&m.at("resnets.1"), c_mid, c_mid)?];
        let mid_attention = transformer(&m.at("attentions.0"), c_mid)?;

        // Up path: each resnet takes the stream and the next skip, concatenated.
        let mut up = Vec::new();
        let mut prev = c_mid;
        for (i, kind) in cfg.up_block_types.iter().enumerate() {
            let level_index = ch.len() - 1 - i;
            let q = p.at("up_blocks").at(i).winograd(wino(level_index));
            let cout = ch[level_index];
            let mut level = Level { resnets: Vec::new(), attentions: Vec::new(), down: None, up: None };
            for j in 0..=cfg.layers_per_block {
                let skip = skips.pop().ok_or_else(|| Error::model(weights.path(), "UNet: more up-path resnets than skips"))?;
                level.resnets.push(resnet(&q.at("resnets").at(j), prev + skip, cout)?);
                if *kind == UpBlockType::CrossAttnUpBlock2D {
                    level.attentions.push(transformer(&q.at("attentions").at(j), cout)?);
                }
                prev = cout;
            }
            if level_index > 0 {
                // Its convolution runs at the next level up.
                level.up = Some(Upsample2D::load(&q.at("upsamplers.0").winograd(wino(level_index - 1)), cout)?);
            }
            up.push(level);
        }
        Ok(UNet2DConditionModel {
            cfg: cfg.clone(),
            linear_1: Linear::load(&p.at("time_embedding.linear_1"), t_dim, t_in, true)?,
            linear_2: Linear::load(&p.at("time_embedding.linear_2"), t_dim, t_dim, true)?,
            resnet_time_proj: stack.finish(&p)?,
            conv_in: Conv::load(&p.at("conv_in"), cfg.in_channels, ch[0], 3, 1)?,
            down,
            mid_resnets,
            mid_attention,
            up,
            conv_norm_out: Norm::load(&p.at("conv_norm_out"), ch[0], eps)?,
            conv_out: Conv::load(&p.at("conv_out"), ch[0], cfg.out_channels, 3, 1)?,
        })
    }

    /// How many of its 3x3 convolutions run by Winograd (loaded with
    /// [`LoadOptions::winograd`](crate::model::weights::LoadOptions::winograd)).
    pub fn winograd_convs(&self) -> usize {
        let levels = self.down.iter().chain(&self.up);
        let resnets = levels.clone().flat_map(|l| &l.resnets).chain(&self.mid_resnets);
        let convs = levels.filter_map(|l| l.up.as_ref()).map(|u| &u.conv).chain([&self.conv_in, &self.conv_out]);
        resnets.map(|r| r.winograd_convs()).sum::<usize>() + convs.filter(|c| c.form != ConvForm::Direct).count()
    }

    /// The weights LoRA adapters may target (every transformer's projections), in module order
    /// (down blocks, mid block, up blocks), each with the module paths of the projections
    /// stacked in it: what a trainer merges its adapters into to sample with them.
    pub fn adaptable_weights(&self) -> Vec<AdaptableWeight> {
        let mut out = Vec::new();
        for t in self.down.iter().flat_map(|l| &l.attentions) {
            t.adaptable(&mut out);
        }
        self.mid_attention.adaptable(&mut out);
        for t in self.up.iter().flat_map(|l| &l.attentions) {
            t.adaptable(&mut out);
        }
        out
    }

    /// Builds the pass for `batch` latents of `height` x `width` with a context of `tokens`
    /// tokens. With `tap`, block outputs are kept under diffusers' module names.
    pub fn plan(&self, gpu: &Gpu, batch: usize, height: usize, width: usize, tokens: usize, tap: bool) -> Result<UNetPlan> {
        let cfg = &self.cfg;
        let levels = cfg.block_out_channels.len();
        if batch == 0 || height == 0 || width == 0 || tokens == 0 {
            return Err(Error::Usage(format!("UNet: batch {batch}, latents {height}x{width}, {tokens} context tokens: all must be at least 1")));
        }
        let mut pb = PlanBuilder::new(gpu);
        let mut taps = Taps { on: tap, ..Default::default() };
        let sample = Tensor::empty(gpu, &[batch, height, width, cfg.in_channels], DType::F16, "unet sample")?;
        let timestep = Tensor::empty(gpu, &[batch], DType::F32, "unet timestep")?;
        let context = Tensor::empty(gpu, &[batch, tokens, cfg.cross_attention_dim], DType::F16, "unet context")?;
        let ctx = (&context, tokens);

        let time_bias = self.time_biases(&mut pb, &timestep, batch, &mut taps)?;
        let temb = Some(&time_bias);

        // Down path: every block output stays alive as a skip until the up path takes it.
        let mut hw: Hw = (batch, height, width);
        let mut h = self.conv_in.apply(&mut pb, &sample, hw, "conv_in")?;
        taps.tap(&mut pb, "conv_in", &h)?;
        let mut skips: Vec<(Tensor, Hw)> = vec![(h.clone(), hw)];
        for (i, level) in self.down.iter().enumerate() {
            for (j, r) in level.resnets.iter().enumerate() {
                h = r.forward(&mut pb, &h, hw, temb)?;
                taps.tap(&mut pb, &format!("down_blocks.{i}.resnets.{j}"), &h)?;
                if let Some(t) = level.attentions.get(j) {
                    t.forward(&mut pb, &h, batch, ctx)?;
                    taps.tap(&mut pb, &format!("down_blocks.{i}.attentions.{j}"), &h)?;
                }
                skips.push((h.clone(), hw));
            }
            if let Some(d) = &level.down {
                let (oh, ow) = d.conv.out_hw(hw.1, hw.2);
                h = d.conv.apply(&mut pb, &h, hw, "downsample")?;
                hw = (batch, oh, ow);
                skips.push((h.clone(), hw));
            }
            taps.tap(&mut pb, &format!("down_blocks.{i}"), &h)?;
        }

        // Mid block: its input is the last skip, so it is not freed here.
        let m0 = self.mid_resnets[0].forward(&mut pb, &h, hw, temb)?;
        self.mid_attention.forward(&mut pb, &m0, batch, ctx)?;
        h = self.mid_resnets[1].forward(&mut pb, &m0, hw, temb)?;
        pb.free(m0);
        taps.tap(&mut pb, "mid_block", &h)?;

        // Up path: concat(stream, skip) -> resnet (-> transformer), then upsample to the size
        // of the next skip.
        for (i, level) in self.up.iter().enumerate() {
            for (j, r) in level.resnets.iter().enumerate() {
                let (skip, _) = skips.pop().expect("skip count checked at load");
                let (c1, c2) = (h.numel() / (hw.0 * hw.1 * hw.2), skip.numel() / (hw.0 * hw.1 * hw.2));
                let rows = batch * hw.1 * hw.2;
                let cat = pb.f16(&[batch, hw.1, hw.2, c1 + c2], "skip concat")?;
                pb.run(tensor_ops::concat(gpu, &h, &skip, &cat, rows, c1, c2)?)?;
                pb.free(skip);
                pb.free(h);
                h = r.forward(&mut pb, &cat, hw, temb)?;
                pb.free(cat);
                if let Some(t) = level.attentions.get(j) {
                    t.forward(&mut pb, &h, batch, ctx)?;
                }
            }
            if let Some(u) = &level.up {
                let (_, next) = skips.last().expect("an upsampler is followed by skips");
                let y = u.forward(&mut pb, &h, hw, (next.1, next.2))?;
                pb.free(std::mem::replace(&mut h, y));
                hw = *next;
            }
            taps.tap(&mut pb, &format!("up_blocks.{i}"), &h)?;
        }
        debug_assert!(skips.is_empty() && levels == self.up.len());

        let n = self.conv_norm_out.group(&mut pb, &h, batch, cfg.norm_num_groups, true, "conv_norm_out")?;
        pb.free(h);
        let out = Tensor::empty(gpu, &[batch, height, width, cfg.out_channels], DType::F16, "unet out")?;
        self.conv_out.forward(&mut pb, &n, hw, &out, false)?;
        pb.free(n);
        pb.free(time_bias);
        Ok(UNetPlan { batch, height, width, sample, timestep, context, out, plan: pb.finish(), taps })
    }
}

impl UNet2DConditionModel {
    /// Records the time embedding: SiLU(linear_2(SiLU(linear_1(sinusoid(t))))) [batch, t_dim],
    /// which feeds every resnet (a new pool tensor; the caller frees it).
    pub(crate) fn time_embedding(&self, pb: &mut PlanBuilder, timestep: &Tensor, batch: usize, taps: &mut Taps) -> Result<Tensor> {
        let cfg = &self.cfg;
        let gpu = pb.gpu;
        let tp = pb.f16(&[batch, cfg.time_proj_dim()], "time_proj")?;
        pb.run(tensor_ops::timestep_embedding(gpu, timestep, &tp, cfg.time_proj_dim(), cfg.freq_shift)?)?;
        taps.tap(pb, "time_proj", &tp)?;
        let t1 = self.linear_1.apply(pb, &tp, "time linear_1")?;
        pb.free(tp);
        let t1a = pb.f16(&t1.shape, "time silu")?;
        pb.run(elementwise::unary(gpu, Unary::Silu, &t1, &t1a)?)?;
        pb.free(t1);
        let temb = self.linear_2.apply(pb, &t1a, "time_embedding")?;
        pb.free(t1a);
        taps.tap(pb, "time_embedding", &temb)?;
        let temb_act = pb.f16(&temb.shape, "time embedding silu")?;
        pb.run(elementwise::unary(gpu, Unary::Silu, &temb, &temb_act)?)?;
        pb.free(temb);
        Ok(temb_act)
    }

    /// Records the time embedding and from it every resnet's conv1 bias per image, [batch,
    /// Σ cout] (a new pool tensor; the caller frees it): see [`TimeStack`].
    pub(crate) fn time_biases(&self, pb: &mut PlanBuilder, timestep: &Tensor, batch: usize, taps: &mut Taps) -> Result<Tensor> {
        let temb_act = self.time_embedding(pb, timestep, batch, taps)?;
        let biases = self.resnet_time_proj.apply(pb, &temb_act, "resnets' conv1 biases")?;
        pb.free(temb_act);
        Ok(biases)
    }
}

impl UNetPlan {
    /// Writes the inputs for the next replay: latents NHWC [batch, h, w, 4], timesteps
    /// [batch], context [batch, tokens, width], all as f32 values.
    pub fn set_inputs(&self, gpu: &Gpu, sample: &[f32], timesteps: &[f32], context: &[f32]) -> Result<()> {
        let check = |what: &str, t: &Tensor, n: usize| {
            if t.numel() != n {
                return Err(Error::shape("UNet input", format!("{what}: {n} values for {:?}", t.shape)));
            }
            Ok(())
        };
        check("sample", &self.sample, sample.len())?;
        check("timesteps", &self.timestep, timesteps.len())?;
        check("context", &self.context, context.len())?;
        self.sample.write_f32(gpu, sample)?;
        self.timestep.write_f32(gpu, timesteps)?;
        self.context.write_f32(gpu, context)
    }

    /// Queues the pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.plan.record(rec)
    }

    /// Runs the pass and waits; the result is in [`UNetPlan::out`].
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        self.plan.run(gpu)
    }
}
