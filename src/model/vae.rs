//! The VAE (diffusers' `AutoencoderKL`, SD-1.5's `vae`): the decoder (latent z -> image) and
//! the encoder (image -> the latent distribution's mean, log-variance, standard deviation and
//! a seeded sample). Images and latents are NHWC f16 on the GPU.
//!
//! Encoder: `conv_in`; per level `layers_per_block` resnets and, on all but the last level, a
//! 3x3 stride-2 convolution padded at the bottom and right only; the mid block (resnet,
//! single-head self-attention, resnet); GroupNorm+SiLU; `conv_out` to 2·latent channels;
//! `quant_conv` (1x1). Its output channels are the mean and the log-variance, run here as two
//! 1x1 products (the two row halves of `quant_conv`) so each lands in a dense tensor.
//! Decoder: `post_quant_conv` (1x1), `conv_in`, the mid block, per level over the reversed
//! widths `layers_per_block + 1` resnets and, on all but the last, a nearest 2x upsample and
//! a 3x3 convolution (run together as the convolution's four output phases over the small
//! image, `kernels::conv::Upsample2xConv`); GroupNorm+SiLU; `conv_out` to the image.
//!
//! The decoder takes z as given (the caller divides the UNet's latents by `scaling_factor`)
//! and gives `decode(z).sample` before any clamping. The encoder's plan ends with the
//! log-variance clamp to [-30, 20], std = exp(logvar / 2) and sample = mean + std·noise, as
//! diffusers' `DiagonalGaussianDistribution`.

use crate::config::VaeConfig;
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Plan, PlanBuilder, Recorder, Tensor};
use crate::kernels::attention::{self, Attention, Operand};
use crate::kernels::elementwise::{self, Binary, Unary};
use crate::kernels::tensor_ops;
use crate::model::layers::{attention_materialised, Conv, Linear, Norm, Taps};
use crate::model::unet_blocks::{Hw, ResnetBlock2D, Upsample2D};
use crate::model::weights::{Prefix, Weights};
use crate::rng::Rng;

/// The mid block's attention (`mid_block.attentions.0`): GroupNorm (no SiLU), q, k, v with
/// biases fused into one [3C, C] product, one head of width C, `to_out.0` with bias, added to
/// the block's input.
struct VaeAttention {
    c: usize,
    groups: usize,
    group_norm: Norm,
    qkv: Linear,
    to_out: Linear,
}

impl VaeAttention {
    fn load(p: &Prefix, c: usize, groups: usize, eps: f32) -> Result<Self> {
        Ok(VaeAttention {
            c,
            groups,
            group_norm: Norm::load(&p.at("group_norm"), c, eps)?,
            qkv: Linear::load_fused(p, &["to_q", "to_k", "to_v"], &[c, c, c], c, true)?,
            to_out: Linear::load(&p.at("to_out.0"), c, c, true)?,
        })
    }

    /// x [batch, h, w, c] += to_out(attention(qkv(group_norm(x)))).
    fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, batch: usize) -> Result<()> {
        let c = self.c;
        let l = x.numel() / (batch * c);
        let n = self.group_norm.group(pb, x, batch, self.groups, false, "vae attention norm")?;
        let qkv = self.qkv.apply(pb, &n, "vae attention qkv")?;
        pb.free(n);
        let o = pb.f16(&[batch * l, c], "vae attention out")?;
        if c > attention::COOP_MAX_DP {
            // SD's 512: past the flash kernels' tensor-core registers (the scalar flash kernel
            // took 13.6 ms of a 35 ms encode on the H100).
            attention_materialised(pb, &qkv, &o, batch, l, c)?;
        } else {
            let (q, k, v) = (Operand::slice(&qkv, 0, 3 * c), Operand::slice(&qkv, c, 3 * c), Operand::slice(&qkv, 2 * c, 3 * c));
            pb.run(Attention::new(batch, 1, l, l, c, false).prepare(pb.gpu, q, k, v, Operand::dense(&o, c))?)?;
        }
        pb.free(qkv);
        self.to_out.forward(pb, &o, x, true)?;
        pb.free(o);
        Ok(())
    }
}

/// `UNetMidBlock2D` without a time embedding: resnet, attention, resnet.
struct MidBlock {
    resnets: [ResnetBlock2D; 2],
    attention: VaeAttention,
}

impl MidBlock {
    fn load(p: &Prefix, c: usize, groups: usize, eps: f32) -> Result<Self> {
        let resnet = |i: usize| ResnetBlock2D::load(&p.at("resnets").at(i), c, c, None, groups, eps);
        Ok(MidBlock { resnets: [resnet(0)?, resnet(1)?], attention: VaeAttention::load(&p.at("attentions.0"), c, groups, eps)? })
    }

    /// The block's output from x [batch, h, w, c] (a pool tensor, moved in: the resnets add
    /// into it).
    fn forward(&self, pb: &mut PlanBuilder, x: Tensor, hw: Hw) -> Result<Tensor> {
        let h = self.resnets[0].forward_consuming(pb, x, hw, None)?;
        self.attention.forward(pb, &h, hw.0)?;
        self.resnets[1].forward_consuming(pb, h, hw, None)
    }
}

/// Runs `blocks` in turn on `x` (a pool tensor, moved in: the resnets without a shortcut
/// convolution add into it).
fn resnets(pb: &mut PlanBuilder, blocks: &[ResnetBlock2D], mut x: Tensor, hw: Hw) -> Result<Tensor> {
    for r in blocks {
        x = r.forward_consuming(pb, x, hw, None)?;
    }
    Ok(x)
}

/// The VAE's weights on the GPU.
pub struct AutoencoderKL {
    pub cfg: VaeConfig,
    enc_conv_in: Conv,
    /// Per level: resnets, then the downsampler (all but the last level).
    enc_levels: Vec<(Vec<ResnetBlock2D>, Option<Conv>)>,
    enc_mid: MidBlock,
    enc_norm_out: Norm,
    enc_conv_out: Conv,
    /// `quant_conv`'s first and second halves of output channels: mean and log-variance.
    quant_mean: Linear,
    quant_logvar: Linear,
    post_quant_conv: Linear,
    dec_conv_in: Conv,
    dec_mid: MidBlock,
    /// Per level: resnets, then the upsampler (all but the last level).
    dec_levels: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    dec_norm_out: Norm,
    dec_conv_out: Conv,
}

/// A built decoder pass for `batch` latents of `h` x `w`.
pub struct DecodePlan {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    /// Latent z in, [batch, h, w, latent_channels] f16 (not scaled: see the module doc).
    pub latent: Tensor,
    /// Image out, [batch, 8h, 8w, out_channels] f16, not clamped.
    pub image: Tensor,
    pub plan: Plan,
    pub taps: Taps,
}

/// A built encoder pass for `batch` images of `h` x `w` pixels.
pub struct EncodePlan {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    /// Image in, [batch, h, w, in_channels] f16 (values in [-1, 1]).
    pub image: Tensor,
    /// Standard normal noise in for the sample, [batch, h/8, w/8, latent_channels] f16; see
    /// [`EncodePlan::set_noise_seed`].
    pub noise: Tensor,
    /// Outputs, each [batch, h/8, w/8, latent_channels] f16.
    pub mean: Tensor,
    /// Clamped to [-30, 20].
    pub logvar: Tensor,
    pub std: Tensor,
    /// mean + std·noise.
    pub sample: Tensor,
    /// The encoder: image -> mean, logvar, std, sample.
    pub plan: Plan,
    pub taps: Taps,
}

impl AutoencoderKL {
    /// Loads `vae.*`; the caller ends the load with `Weights::finish`.
    pub fn load(weights: &Weights, gpu: &Gpu, cfg: &VaeConfig) -> Result<AutoencoderKL> {
        cfg.validate().map_err(|e| Error::model(weights.path(), e))?;
        let ch = &cfg.block_out_channels;
        let (groups, eps, lat) = (cfg.norm_num_groups, cfg.norm_eps, cfg.latent_channels);
        let top = ch[ch.len() - 1];
        if !top.is_multiple_of(8) || top > attention::MAX_D {
            return Err(Error::model(weights.path(), format!("VAE mid-block attention width {top}: must be a multiple of 8, at most {}", attention::MAX_D)));
        }
        let p = weights.prefix(gpu, "vae");
        let resnet = |q: &Prefix, cin, cout| ResnetBlock2D::load(q, cin, cout, None, groups, eps);

        let e = p.at("encoder");
        let mut enc_levels = Vec::new();
        let mut cin = ch[0];
        for (i, &c) in ch.iter().enumerate() {
            let b = e.at("down_blocks").at(i);
            let rs = (0..cfg.layers_per_block).map(|j| resnet(&b.at("resnets").at(j), if j == 0 { cin } else { c }, c)).collect::<Result<_>>()?;
            let down = if i + 1 < ch.len() { Some(Conv::load_end_pad(&b.at("downsamplers.0.conv"), c, c, 3, 2)?) } else { None };
            enc_levels.push((rs, down));
            cin = c;
        }
        // quant_conv [2L, 2L, 1, 1]: rows 0..L give the mean, L..2L the log-variance.
        let qp = p.at("quant_conv");
        let (qw, qb) = (qp.get_f32("weight", &[2 * lat, 2 * lat, 1, 1])?, qp.get_f32("bias", &[2 * lat])?);
        let half = |i: usize, what: &str| -> Result<Linear> {
            let w = Tensor::from_f32(gpu, &[lat, 2 * lat], DType::F16, &qw[i * lat * 2 * lat..(i + 1) * lat * 2 * lat], &qp.name(&format!("weight ({what})")))?;
            let b = Tensor::from_f32(gpu, &[lat], DType::F16, &qb[i * lat..(i + 1) * lat], &qp.name(&format!("bias ({what})")))?;
            Ok(Linear { w, b: Some(b), n: lat, k: 2 * lat })
        };

        let d = p.at("decoder");
        let mut dec_levels = Vec::new();
        let mut cin = top;
        for (i, &c) in ch.iter().rev().enumerate() {
            let b = d.at("up_blocks").at(i);
            let rs = (0..=cfg.layers_per_block).map(|j| resnet(&b.at("resnets").at(j), if j == 0 { cin } else { c }, c)).collect::<Result<_>>()?;
            let up = if i + 1 < ch.len() { Some(Upsample2D::load_phases(&b.at("upsamplers.0"), c)?) } else { None };
            dec_levels.push((rs, up));
            cin = c;
        }
        Ok(AutoencoderKL {
            enc_conv_in: Conv::load(&e.at("conv_in"), cfg.in_channels, ch[0], 3, 1)?,
            enc_levels,
            enc_mid: MidBlock::load(&e.at("mid_block"), top, groups, eps)?,
            enc_norm_out: Norm::load(&e.at("conv_norm_out"), top, eps)?,
            enc_conv_out: Conv::load(&e.at("conv_out"), top, 2 * lat, 3, 1)?,
            quant_mean: half(0, "mean")?,
            quant_logvar: half(1, "logvar")?,
            post_quant_conv: Linear::load_1x1(&p.at("post_quant_conv"), lat, lat)?,
            dec_conv_in: Conv::load(&d.at("conv_in"), lat, top, 3, 1)?,
            dec_mid: MidBlock::load(&d.at("mid_block"), top, groups, eps)?,
            dec_levels,
            dec_norm_out: Norm::load(&d.at("conv_norm_out"), ch[0], eps)?,
            dec_conv_out: Conv::load(&d.at("conv_out"), ch[0], cfg.out_channels, 3, 1)?,
            cfg: cfg.clone(),
        })
    }

    /// Builds the decoder for `batch` latents of `h` x `w` (any sizes >= 1). With `tap`, keeps
    /// `post_quant_conv`, `decoder.conv_in`, `decoder.mid_block` and `decoder.up_blocks.<i>`
    /// (diffusers' module names; NHWC).
    pub fn decode_plan(&self, gpu: &Gpu, batch: usize, h: usize, w: usize, tap: bool) -> Result<DecodePlan> {
        if batch == 0 || h == 0 || w == 0 {
            return Err(Error::Usage(format!("VAE decode: batch {batch} of {h}x{w} latents: every size must be at least 1")));
        }
        let (lat, groups) = (self.cfg.latent_channels, self.cfg.norm_num_groups);
        let f = self.cfg.downscale();
        let mut pb = PlanBuilder::new(gpu);
        let mut taps = Taps { on: tap, ..Default::default() };
        let latent = Tensor::empty(gpu, &[batch, h, w, lat], DType::F16, "vae latent")?;
        let image = Tensor::empty(gpu, &[batch, h * f, w * f, self.cfg.out_channels], DType::F16, "vae image")?;
        let mut z = self.post_quant_conv.apply(&mut pb, &latent, "vae post_quant_conv")?;
        z.shape = vec![batch, h, w, lat];
        taps.tap(&mut pb, "post_quant_conv", &z)?;
        let (lh, lw) = (h, w);
        let (mut h, mut w) = (h, w);
        let x = self.dec_conv_in.apply(&mut pb, &z, (batch, h, w), "vae decoder conv_in")?;
        pb.free(z);
        taps.tap(&mut pb, "decoder.conv_in", &x)?;
        let mut x = self.dec_mid.forward(&mut pb, x, (batch, h, w))?;
        taps.tap(&mut pb, "decoder.mid_block", &x)?;
        for (i, (rs, up)) in self.dec_levels.iter().enumerate() {
            x = resnets(&mut pb, rs, x, (batch, h, w))?;
            if let Some(up) = up {
                let y = up.forward(&mut pb, &x, (batch, h, w), (2 * h, 2 * w))?;
                pb.free(std::mem::replace(&mut x, y));
                (h, w) = (2 * h, 2 * w);
            }
            taps.tap(&mut pb, &format!("decoder.up_blocks.{i}"), &x)?;
        }
        let n = self.dec_norm_out.group(&mut pb, &x, batch, groups, true, "vae decoder norm_out")?;
        pb.free(x);
        self.dec_conv_out.forward(&mut pb, &n, (batch, h, w), &image, false)?;
        pb.free(n);
        Ok(DecodePlan { batch, h: lh, w: lw, latent, image, plan: pb.finish(), taps })
    }

    /// Builds the encoder for `batch` images of `h` x `w` pixels (multiples of the downscale
    /// factor f = 8). With `tap`, keeps `encoder.down_blocks.<i>` (after the downsampler),
    /// `encoder.mid_block`, `encoder.conv_out` and `quant_conv` (mean and raw log-variance
    /// side by side: the moments).
    pub fn encode_plan(&self, gpu: &Gpu, batch: usize, h: usize, w: usize, tap: bool) -> Result<EncodePlan> {
        let f = self.cfg.downscale();
        if batch == 0 || h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(Error::Usage(format!("VAE encode: batch {batch} of {h}x{w} images: need batch >= 1 and sides that are positive multiples of {f}")));
        }
        let (lat, groups) = (self.cfg.latent_channels, self.cfg.norm_num_groups);
        let mut pb = PlanBuilder::new(gpu);
        let mut taps = Taps { on: tap, ..Default::default() };
        let image = Tensor::empty(gpu, &[batch, h, w, self.cfg.in_channels], DType::F16, "vae input image")?;
        let out = |what: &str| Tensor::empty(gpu, &[batch, h / f, w / f, lat], DType::F16, what);
        let (noise, mean, logvar, std, sample) = (out("vae noise")?, out("vae mean")?, out("vae logvar")?, out("vae std")?, out("vae sample")?);
        let (mut h, mut w) = (h, w);
        let mut x = self.enc_conv_in.apply(&mut pb, &image, (batch, h, w), "vae encoder conv_in")?;
        for (i, (rs, down)) in self.enc_levels.iter().enumerate() {
            x = resnets(&mut pb, rs, x, (batch, h, w))?;
            if let Some(down) = down {
                let y = down.apply(&mut pb, &x, (batch, h, w), "vae downsample")?;
                pb.free(std::mem::replace(&mut x, y));
                (h, w) = down.out_hw(h, w);
            }
            taps.tap(&mut pb, &format!("encoder.down_blocks.{i}"), &x)?;
        }
        x = self.enc_mid.forward(&mut pb, x, (batch, h, w))?;
        taps.tap(&mut pb, "encoder.mid_block", &x)?;
        let n = self.enc_norm_out.group(&mut pb, &x, batch, groups, true, "vae encoder norm_out")?;
        pb.free(x);
        let m = self.enc_conv_out.apply(&mut pb, &n, (batch, h, w), "vae encoder conv_out")?;
        pb.free(n);
        taps.tap(&mut pb, "encoder.conv_out", &m)?;
        self.quant_mean.forward(&mut pb, &m, &mean, false)?;
        let raw = pb.f16(&logvar.shape, "vae raw logvar")?;
        self.quant_logvar.forward(&mut pb, &m, &raw, false)?;
        pb.free(m);
        if tap {
            let moments = Tensor::empty(gpu, &[batch, h, w, 2 * lat], DType::F16, "quant_conv")?;
            pb.run(tensor_ops::concat(gpu, &mean, &raw, &moments, batch * h * w, lat, lat)?)?;
            taps.tensors.push(("quant_conv".into(), moments));
        }
        pb.run(elementwise::unary(gpu, Unary::Clamp { lo: -30.0, hi: 20.0 }, &raw, &logvar)?)?;
        pb.free(raw);
        pb.run(elementwise::unary(gpu, Unary::Exp { scale: 0.5 }, &logvar, &std)?)?;
        let t = pb.f16(&std.shape, "vae std·noise")?;
        pb.run(elementwise::binary(gpu, Binary::Mul { alpha: 1.0 }, &std, &noise, &t)?)?;
        pb.run(elementwise::binary(gpu, Binary::Add { alpha: 1.0 }, &mean, &t, &sample)?)?;
        pb.free(t);
        let (h, w) = (h * f, w * f);
        Ok(EncodePlan { batch, h, w, image, noise, mean, logvar, std, sample, plan: pb.finish(), taps })
    }
}

/// Writes `data` (NHWC, f32) into `t`, checking the count.
fn write(gpu: &Gpu, t: &Tensor, data: &[f32], what: &str) -> Result<()> {
    if data.len() != t.numel() {
        return Err(Error::shape(what, format!("{} values for {:?} (NHWC)", data.len(), t.shape)));
    }
    t.write_f32(gpu, data)
}

impl DecodePlan {
    /// Writes the latent z ([batch, h, w, latent_channels], NHWC) for the next replay.
    pub fn set_latent(&self, gpu: &Gpu, nhwc: &[f32]) -> Result<()> {
        write(gpu, &self.latent, nhwc, "VAE decode input")
    }

    /// Queues the pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.plan.record(rec)
    }

    /// Decodes `nhwc` and waits; the result is in [`DecodePlan::image`].
    pub fn run(&self, gpu: &Gpu, nhwc: &[f32]) -> Result<()> {
        self.set_latent(gpu, nhwc)?;
        self.plan.run(gpu)
    }
}

impl EncodePlan {
    /// Writes the image ([batch, h, w, in_channels], NHWC, values in [-1, 1]).
    pub fn set_image(&self, gpu: &Gpu, nhwc: &[f32]) -> Result<()> {
        write(gpu, &self.image, nhwc, "VAE encode input")
    }

    /// Writes the sample's noise ([batch, h/8, w/8, latent_channels], NHWC).
    pub fn set_noise(&self, gpu: &Gpu, nhwc: &[f32]) -> Result<()> {
        write(gpu, &self.noise, nhwc, "VAE encode noise")
    }

    /// The documented noise for `seed`: `Rng::new(seed).normals(n)` for the n = batch · h/8 ·
    /// w/8 · latent_channels values, taken in NHWC order (channel fastest, then x, y, image).
    /// Not torch's stream: the same seed gives another sample than diffusers.
    pub fn seeded_noise(&self, seed: u64) -> Vec<f32> {
        Rng::new(seed).normals(self.noise.numel())
    }

    /// Writes [`EncodePlan::seeded_noise`] for `seed`.
    pub fn set_noise_seed(&self, gpu: &Gpu, seed: u64) -> Result<()> {
        self.set_noise(gpu, &self.seeded_noise(seed))
    }

    /// Queues the pass.
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        self.plan.record(rec)
    }

    /// Encodes `nhwc` with the noise for `seed` and waits: mean, logvar, std and sample.
    pub fn run(&self, gpu: &Gpu, nhwc: &[f32], seed: u64) -> Result<()> {
        self.set_image(gpu, nhwc)?;
        self.set_noise_seed(gpu, seed)?;
        self.plan.run(gpu)
    }
}
