//! The UNet's convolutional building blocks, named after diffusers' modules: `ResnetBlock2D`
//! (also the VAE's, without the time embedding) and the `Downsample2D` / `Upsample2D`
//! resamplers (the transformer blocks are in `unet_transformer.rs`). Images are NHWC f16
//! [batch, h, w, c].
//!
//! Buffer ownership inside a plan: a block's `forward` never frees its input (the caller
//! knows whether it is still needed, e.g. as a skip) and frees every temporary it makes.
//!
//! Training (`forward_train` / `backward`): the forward keeps what the backward needs in a
//! `*Saved` value, which takes ownership of the block's input when the backward reads it
//! (group norm backward needs x); the backward gives every saved tensor back to the pool.
//! Activation gradients are f16 (scaled by the loss scale) and overwrite (`=`), except where
//! a stream passes through: a resnet's identity shortcut adds the norm's input gradient into
//! the output gradient it was given. No weight gradient is computed here: these layers are
//! frozen in LoRA training.

use crate::error::{Error, Result};
use crate::gpu::{PlanBuilder, Tensor};
use crate::kernels::elementwise::{self, Unary};
use crate::kernels::matmul::BiasLayout;
use crate::kernels::{grad_ops, tensor_ops};
use crate::model::layers::{Conv, ConvForm, Linear, Norm};
use crate::model::weights::Prefix;

/// An image batch's geometry: (batch, height, width).
pub type Hw = (usize, usize, usize);

/// The time-embedding projections of a UNet's resnets, stacked while they load into one
/// linear layer [Σ cout, t]. A resnet adds `time_emb_proj(SiLU(temb))` to conv1's output,
/// which is a bias per image; the stack's bias holds each resnet's `time_emb_proj.bias` plus
/// its `conv1.bias`, so one product at the start of a pass gives, per image, every resnet's
/// whole conv1 bias ([batch, Σ cout]), and conv1 adds its row in its epilogue: one launch for
/// what took a projection, a split-K sum and an add per resnet.
pub struct TimeStack {
    k: usize,
    w: Vec<f32>,
    b: Vec<f32>,
}

impl TimeStack {
    /// A stack of projections from the time embedding's width `k`.
    pub fn new(k: usize) -> Self {
        TimeStack { k, w: Vec::new(), b: Vec::new() }
    }

    /// Appends the resnet at `p`'s projection to `cout` channels (its conv1's bias included);
    /// returns its first column in the stack's output.
    fn push(&mut self, p: &Prefix, cout: usize) -> Result<usize> {
        let col = self.b.len();
        self.w.extend(p.at("time_emb_proj").get_f32("weight", &[cout, self.k])?);
        let tb = p.at("time_emb_proj").get_f32("bias", &[cout])?;
        let cb = p.at("conv1").get_f32("bias", &[cout])?;
        self.b.extend(tb.iter().zip(&cb).map(|(t, c)| t + c));
        Ok(col)
    }

    /// Uploads the stack as one linear layer (named under `p`).
    pub fn finish(self, p: &Prefix) -> Result<Linear> {
        let n = self.b.len();
        let w = p.upload("resnets.{time_emb_proj}.weight", &[n, self.k], &self.w)?;
        let b = p.upload("resnets.{time_emb_proj + conv1}.bias", &[n], &self.b)?;
        Ok(Linear { w, b: Some(b), n, k: self.k })
    }
}

/// `ResnetBlock2D`: GroupNorm+SiLU, conv 3x3, (+ time embedding projection), GroupNorm+SiLU,
/// conv 3x3, plus the input (through a 1x1 `conv_shortcut` when the width changes).
pub struct ResnetBlock2D {
    pub cin: usize,
    pub cout: usize,
    groups: usize,
    norm1: Norm,
    conv1: Conv,
    /// The first column of this resnet's conv1 bias in the [`TimeStack`]'s output (UNet resnets).
    time_col: Option<usize>,
    norm2: Norm,
    conv2: Conv,
    conv_shortcut: Option<Linear>,
}

/// What a resnet's backward reads: its input x (owned), conv1's output after the time
/// embedding is added (norm2's input), and both norms' statistics.
pub struct ResnetSaved {
    x: Tensor,
    hw: Hw,
    c1: Tensor,
    stats1: Tensor,
    stats2: Tensor,
}

impl ResnetSaved {
    /// Gives the saved tensors back to the pool unused (a block whose backward is not needed).
    pub fn release(self, pb: &mut PlanBuilder) {
        for t in [self.x, self.c1, self.stats1, self.stats2] {
            pb.free(t);
        }
    }
}

impl ResnetBlock2D {
    /// `temb`: the stack the UNet's resnets add their time projection to (None in the VAE).
    pub fn load(p: &Prefix, cin: usize, cout: usize, temb: Option<&mut TimeStack>, groups: usize, eps: f32) -> Result<Self> {
        Ok(ResnetBlock2D {
            cin,
            cout,
            groups,
            norm1: Norm::load(&p.at("norm1"), cin, eps)?,
            conv1: Conv::load(&p.at("conv1"), cin, cout, 3, 1)?,
            time_col: temb.map(|t| t.push(p, cout)).transpose()?,
            norm2: Norm::load(&p.at("norm2"), cout, eps)?,
            conv2: Conv::load(&p.at("conv2"), cout, cout, 3, 1)?,
            conv_shortcut: if cin != cout { Some(Linear::load_1x1(&p.at("conv_shortcut"), cout, cin)?) } else { None },
        })
    }

    /// How many of its convolutions run by Winograd (0 to 2).
    pub fn winograd_convs(&self) -> usize {
        [&self.conv1, &self.conv2].iter().filter(|c| c.form != ConvForm::Direct).count()
    }

    /// A new tensor [batch, h, w, cout] from x [batch, h, w, cin]; `temb` is the
    /// [`TimeStack`]'s output [batch, Σ cout] (conv1's bias per image) when the block has a
    /// time projection.
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, hw: Hw, temb: Option<&Tensor>) -> Result<Tensor> {
        Ok(self.run(pb, x, hw, temb, false, false)?.0)
    }

    /// As [`ResnetBlock2D::forward`] with x moved in and not kept: a block without a shortcut
    /// convolution adds conv2 into x itself and returns it, instead of first copying x into a
    /// new output (the VAE's resnets: 12 copies, 0.26 ms of its decode on the H100).
    pub fn forward_consuming(&self, pb: &mut PlanBuilder, x: Tensor, hw: Hw, temb: Option<&Tensor>) -> Result<Tensor> {
        if self.conv_shortcut.is_some() {
            let y = self.forward(pb, &x, hw, temb)?;
            pb.free(x);
            return Ok(y);
        }
        Ok(self.run(pb, &x, hw, temb, false, true)?.0)
    }

    /// The training forward: as [`ResnetBlock2D::forward`], keeping x (moved in) and what the
    /// backward reads.
    pub fn forward_train(&self, pb: &mut PlanBuilder, x: Tensor, hw: Hw, temb: Option<&Tensor>) -> Result<(Tensor, ResnetSaved)> {
        let (out, kept) = self.run(pb, &x, hw, temb, true, false)?;
        let (c1, stats1, stats2) = kept.expect("saving run keeps its tensors");
        Ok((out, ResnetSaved { x, hw, c1, stats1, stats2 }))
    }

    /// `into_x` (no shortcut convolution, x not needed afterwards): the output is x itself.
    #[allow(clippy::type_complexity)]
    fn run(&self, pb: &mut PlanBuilder, x: &Tensor, hw: Hw, temb: Option<&Tensor>, save: bool, into_x: bool) -> Result<(Tensor, Option<(Tensor, Tensor, Tensor)>)> {
        let (b, h, w) = hw;
        let (n1, stats1) = self.norm1.group_saving(pb, x, b, self.groups, true, save, "resnet norm1")?;
        let c1 = match (self.time_col, temb) {
            (Some(col), Some(tb)) => {
                let c1 = pb.f16(&[b, h, w, self.cout], "resnet conv1 + temb")?;
                let layout = BiasLayout { off: col, rows: h * w, ld: tb.numel() / b };
                self.conv1.forward_with_bias(pb, &n1, hw, &c1, tb, layout)?;
                c1
            }
            _ => self.conv1.apply(pb, &n1, hw, "resnet conv1")?,
        };
        pb.free(n1);
        let (n2, stats2) = self.norm2.group_saving(pb, &c1, b, self.groups, true, save, "resnet norm2")?;
        let out = match &self.conv_shortcut {
            Some(s) => {
                let out = pb.f16(&[b, h, w, self.cout], "resnet out")?;
                s.forward(pb, x, &out, false)?;
                out
            }
            None if into_x => x.clone(),
            None => {
                let out = pb.f16(&[b, h, w, self.cout], "resnet out")?;
                pb.run(elementwise::unary(pb.gpu, Unary::Copy, x, &out)?)?;
                out
            }
        };
        self.conv2.forward(pb, &n2, hw, &out, true)?;
        pb.free(n2);
        match (stats1, stats2) {
            (Some(s1), Some(s2)) => Ok((out, Some((c1, s1, s2)))),
            _ => {
                pb.free(c1);
                Ok((out, None))
            }
        }
    }

    /// The backward from dout (the output's gradient, moved in): returns dx, the input's
    /// gradient. Without `need_dx` (nothing before the block trains) it only releases the
    /// saved tensors: nothing inside a resnet trains.
    pub fn backward(&self, pb: &mut PlanBuilder, saved: ResnetSaved, dout: Tensor, need_dx: bool) -> Result<Option<Tensor>> {
        let ResnetSaved { x, hw, c1, stats1, stats2 } = saved;
        let b = hw.0;
        if !need_dx {
            for t in [x, c1, stats1, stats2, dout] {
                pb.free(t);
            }
            return Ok(None);
        }
        // out = shortcut(x) + conv2(n2), n2 = SiLU(GroupNorm2(c1)).
        let dn2 = pb.f16(&c1.shape, "resnet dn2")?;
        self.conv2.backward_input(pb, &dout, hw, &dn2)?;
        let dc1 = pb.f16(&c1.shape, "resnet dc1")?;
        self.norm2.group_backward(pb, &c1, &stats2, &dn2, &dc1, b, self.groups, true, false)?;
        pb.free(dn2);
        // c1 = conv1(n1) + time_emb_proj(..): the time embedding gets no gradient (nothing
        // before it trains).
        let dn1 = pb.f16(&x.shape, "resnet dn1")?;
        self.conv1.backward_input(pb, &dc1, hw, &dn1)?;
        pb.free(dc1);
        let dx = match &self.conv_shortcut {
            Some(s) => {
                let dx = s.backward_new(pb, &dout, "resnet dx")?;
                pb.free(dout);
                dx
            }
            None => dout,
        };
        self.norm1.group_backward(pb, &x, &stats1, &dn1, &dx, b, self.groups, true, true)?;
        for t in [dn1, x, c1, stats1, stats2] {
            pb.free(t);
        }
        Ok(Some(dx))
    }
}

/// `Downsample2D`: a 3x3 stride-2 convolution (padding 1).
pub struct Downsample2D {
    pub conv: Conv,
}

impl Downsample2D {
    pub fn load(p: &Prefix, c: usize) -> Result<Self> {
        Ok(Downsample2D { conv: Conv::load(&p.at("conv"), c, c, 3, 2)? })
    }

    /// dx [batch, h, w, c] from dout [batch, oh, ow, c] (moved in, freed).
    pub fn backward(&self, pb: &mut PlanBuilder, dout: Tensor, hw: Hw) -> Result<Tensor> {
        let dx = pb.f16(&[hw.0, hw.1, hw.2, self.conv.cin], "downsample dx")?;
        self.conv.backward_input(pb, &dout, hw, &dx)?;
        pb.free(dout);
        Ok(dx)
    }
}

/// `Upsample2D`: nearest upsampling (2x, or to the size of the skip it meets) and a 3x3
/// convolution.
pub struct Upsample2D {
    pub conv: Conv,
}

impl Upsample2D {
    pub fn load(p: &Prefix, c: usize) -> Result<Self> {
        Ok(Upsample2D { conv: Conv::load(&p.at("conv"), c, c, 3, 1)? })
    }

    /// For inference only (the VAE decoder's upsamplers): the convolution kept as its four
    /// phase weights and run on the small image (`Conv::upsample2x`), without the upsampled
    /// image: 4/9 of the work. Exact 2x only; no backward.
    pub fn load_phases(p: &Prefix, c: usize) -> Result<Self> {
        Ok(Upsample2D { conv: Conv::load_upsample_phases(&p.at("conv"), c)? })
    }

    /// A new tensor [batch, oh, ow, c] from x [batch, h, w, c]. The backward needs nothing
    /// saved (the convolution is frozen, the upsampling linear).
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, (b, h, w): Hw, (oh, ow): (usize, usize)) -> Result<Tensor> {
        let c = self.conv.cin;
        if self.conv.form == ConvForm::UpsamplePhases {
            if (oh, ow) != (2 * h, 2 * w) {
                return Err(Error::shape("upsample", format!("{h}x{w} to {oh}x{ow}: the phase form upsamples exactly 2x")));
            }
            let y = pb.f16(&[b, oh, ow, self.conv.cout], "upsample conv")?;
            self.conv.upsample2x(pb, x, (b, h, w), &y)?;
            return Ok(y);
        }
        let up = pb.f16(&[b, oh, ow, c], "upsampled")?;
        pb.run(tensor_ops::upsample_nearest(pb.gpu, x, &up, b, (h, w), (oh, ow), c)?)?;
        let y = self.conv.apply(pb, &up, (b, oh, ow), "upsample conv")?;
        pb.free(up);
        Ok(y)
    }

    /// dx [batch, h, w, c] from dout [batch, oh, ow, c] (moved in, freed).
    pub fn backward(&self, pb: &mut PlanBuilder, dout: Tensor, (b, h, w): Hw, (oh, ow): (usize, usize)) -> Result<Tensor> {
        let c = self.conv.cin;
        let dup = pb.f16(&[b, oh, ow, c], "upsample dconv")?;
        self.conv.backward_input(pb, &dout, (b, oh, ow), &dup)?;
        pb.free(dout);
        let dx = pb.f16(&[b, h, w, c], "upsample dx")?;
        pb.run(grad_ops::upsample_nearest_backward(pb.gpu, &dup, &dx, b, (h, w), (oh, ow), c)?)?;
        pb.free(dup);
        Ok(dx)
    }
}
