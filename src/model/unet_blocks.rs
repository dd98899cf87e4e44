//! The UNet's building blocks, named after diffusers' modules: `ResnetBlock2D` (also the
//! VAE's, without the time embedding), `Transformer2DModel` with its `BasicTransformerBlock`s
//! (self-attention, cross-attention over the text context, GEGLU feed-forward), and the
//! `Downsample2D` / `Upsample2D` resamplers. Images are NHWC f16 [batch, h, w, c].
//!
//! Buffer ownership inside a plan: a block's `forward` never frees its input (the caller
//! knows whether it is still needed, e.g. as a skip) and frees every temporary it makes;
//! `Transformer2D::forward` adds its result to its input in place.

use crate::error::Result;
use crate::gpu::{PlanBuilder, Tensor};
use crate::kernels::attention::{Attention, Operand};
use crate::kernels::elementwise::{self, Binary, Unary};
use crate::kernels::tensor_ops;
use crate::model::layers::{Conv, Linear, Norm};
use crate::model::weights::Prefix;

/// An image batch's geometry: (batch, height, width).
pub type Hw = (usize, usize, usize);

/// `ResnetBlock2D`: GroupNorm+SiLU, conv 3x3, (+ time embedding projection), GroupNorm+SiLU,
/// conv 3x3, plus the input (through a 1x1 `conv_shortcut` when the width changes).
pub struct ResnetBlock2D {
    pub cin: usize,
    pub cout: usize,
    groups: usize,
    norm1: Norm,
    conv1: Conv,
    time_emb_proj: Option<Linear>,
    norm2: Norm,
    conv2: Conv,
    conv_shortcut: Option<Linear>,
}

impl ResnetBlock2D {
    /// `temb`: the time embedding width, for the UNet's resnets (None in the VAE).
    pub fn load(p: &Prefix, cin: usize, cout: usize, temb: Option<usize>, groups: usize, eps: f32) -> Result<Self> {
        Ok(ResnetBlock2D {
            cin,
            cout,
            groups,
            norm1: Norm::load(&p.at("norm1"), cin, eps)?,
            conv1: Conv::load(&p.at("conv1"), cin, cout, 3, 1)?,
            time_emb_proj: temb.map(|t| Linear::load(&p.at("time_emb_proj"), cout, t, true)).transpose()?,
            norm2: Norm::load(&p.at("norm2"), cout, eps)?,
            conv2: Conv::load(&p.at("conv2"), cout, cout, 3, 1)?,
            conv_shortcut: if cin != cout { Some(Linear::load_1x1(&p.at("conv_shortcut"), cout, cin)?) } else { None },
        })
    }

    /// A new tensor [batch, h, w, cout] from x [batch, h, w, cin]; `temb_act` is SiLU(time
    /// embedding) [batch, t] when the block has a time projection.
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, hw: Hw, temb_act: Option<&Tensor>) -> Result<Tensor> {
        let (b, h, w) = hw;
        let n1 = self.norm1.group(pb, x, b, self.groups, true, "resnet norm1")?;
        let mut c1 = self.conv1.apply(pb, &n1, hw, "resnet conv1")?;
        pb.free(n1);
        if let (Some(proj), Some(t)) = (&self.time_emb_proj, temb_act) {
            let tp = proj.apply(pb, t, "resnet time_emb_proj")?;
            let sum = pb.f16(&c1.shape, "resnet conv1 + temb")?;
            pb.run(elementwise::binary_grouped(pb.gpu, Binary::Add { alpha: 1.0 }, &c1, &tp, &sum, b)?)?;
            pb.free(tp);
            pb.free(std::mem::replace(&mut c1, sum));
        }
        let n2 = self.norm2.group(pb, &c1, b, self.groups, true, "resnet norm2")?;
        pb.free(c1);
        let out = pb.f16(&[b, h, w, self.cout], "resnet out")?;
        match &self.conv_shortcut {
            Some(s) => s.forward(pb, x, &out, false)?,
            None => pb.run(elementwise::unary(pb.gpu, Unary::Copy, x, &out)?)?,
        }
        self.conv2.forward(pb, &n2, hw, &out, true)?;
        pb.free(n2);
        Ok(out)
    }
}

/// diffusers' `Attention` in a transformer block: self-attention (q, k, v fused into one
/// product) or cross-attention (q from the image, k and v fused from the context); no biases
/// on q, k, v; `to_out.0` with bias, added to the residual stream.
struct CrossAttention {
    heads: usize,
    c: usize,
    /// Self: [3c, c]; cross: q [c, c].
    q_or_qkv: Linear,
    /// Cross: [2c, context width].
    kv: Option<Linear>,
    to_out: Linear,
}

impl CrossAttention {
    fn load(p: &Prefix, c: usize, heads: usize, context: Option<usize>) -> Result<Self> {
        let (q_or_qkv, kv) = match context {
            None => (Linear::load_fused(p, &["to_q", "to_k", "to_v"], &[c, c, c], c, false)?, None),
            Some(ctx) => (Linear::load(&p.at("to_q"), c, c, false)?, Some(Linear::load_fused(p, &["to_k", "to_v"], &[c, c], ctx, false)?)),
        };
        Ok(CrossAttention { heads, c, q_or_qkv, kv, to_out: Linear::load(&p.at("to_out.0"), c, c, true)? })
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
}

/// `BasicTransformerBlock`: pre-LayerNorm self-attention, cross-attention and GEGLU
/// feed-forward, each added to the stream.
struct BasicTransformerBlock {
    norm1: Norm,
    attn1: CrossAttention,
    norm2: Norm,
    attn2: CrossAttention,
    norm3: Norm,
    ff_proj: Linear,
    ff_out: Linear,
    ff_inner: usize,
}

impl BasicTransformerBlock {
    fn load(p: &Prefix, c: usize, heads: usize, context: usize) -> Result<Self> {
        let inner = 4 * c;
        Ok(BasicTransformerBlock {
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
}

/// `Transformer2DModel`: GroupNorm, `proj_in`, transformer blocks over the pixels as tokens,
/// `proj_out`, added to the input.
pub struct Transformer2D {
    c: usize,
    groups: usize,
    norm: Norm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl Transformer2D {
    /// `linear_projection`: proj_in/out are linears (else 1x1 convolutions, SD-1.5's).
    pub fn load(p: &Prefix, c: usize, heads: usize, context: usize, layers: usize, groups: usize, linear_projection: bool) -> Result<Self> {
        let proj = |name: &str| {
            if linear_projection { Linear::load(&p.at(name), c, c, true) } else { Linear::load_1x1(&p.at(name), c, c) }
        };
        Ok(Transformer2D {
            c,
            groups,
            norm: Norm::load(&p.at("norm"), c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks: (0..layers).map(|i| BasicTransformerBlock::load(&p.at("transformer_blocks").at(i), c, heads, context)).collect::<Result<_>>()?,
            proj_out: proj("proj_out")?,
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
}

/// `Downsample2D`: a 3x3 stride-2 convolution (padding 1).
pub struct Downsample2D {
    pub conv: Conv,
}

impl Downsample2D {
    pub fn load(p: &Prefix, c: usize) -> Result<Self> {
        Ok(Downsample2D { conv: Conv::load(&p.at("conv"), c, c, 3, 2)? })
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

    /// A new tensor [batch, oh, ow, c] from x [batch, h, w, c].
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, (b, h, w): Hw, (oh, ow): (usize, usize)) -> Result<Tensor> {
        let c = self.conv.cin;
        let up = pb.f16(&[b, oh, ow, c], "upsampled")?;
        pb.run(tensor_ops::upsample_nearest(pb.gpu, x, &up, b, (h, w), (oh, ow), c)?)?;
        let y = self.conv.apply(pb, &up, (b, oh, ow), "upsample conv")?;
        pb.free(up);
        Ok(y)
    }
}
