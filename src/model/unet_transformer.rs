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
//! layer norm backward reads the stream before the add. The backward is the mirror:
//! `d`-prefixed names, activation gradients in f16 at the loss scale, the stream's gradient
//! updated in place (residual adds pass it through, norm backwards add into it).
//!
//! Each module's forward and backward stay together: `attention` holds diffusers' `Attention`
//! (self- and cross-attention), `block` the `BasicTransformerBlock`; this file the
//! `Transformer2D` around them and the adapter helpers the text encoder's training shares
//! (`adapt`, `adapt_fused`, `adapt_backward`, `copy`, `Applied`).

mod attention;
mod block;

use block::{BasicTransformerBlock, BlockSaved};
use crate::error::Result;
use crate::gpu::{PlanBuilder, Tensor};
use crate::kernels::attention::Operand;
use crate::kernels::elementwise::{self, Unary};
use crate::model::layers::{Linear, Norm};
use crate::model::lora::{Adapters, LoraSaved, LoraStack};
use crate::model::weights::Prefix;

/// The module path under the UNet (`unet.` removed), the name LoRA adapters are found by.
fn module_path(p: &Prefix) -> String {
    let s = p.prefix();
    s.strip_prefix("unet.").unwrap_or(s).to_string()
}

/// A frozen weight on the GPU that LoRA adapters may target, and the projections stacked in
/// it (one for a plain linear; q, k, v or k, v for a fused product): each with its module path
/// under the UNet (or the text encoder, `ClipTextModel::adaptable_weights`), its first row and
/// row count. The weight is [rows, k] f16, row-major; a
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
    pub(crate) fn of(l: &Linear, paths: &[String], conv1x1: bool) -> AdaptableWeight {
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

/// An adapter's (or a [`LoraStack`]'s) saved tensors with what it applies to.
pub(crate) struct Applied {
    /// The adapter's module path; a stack's members in column order.
    names: Vec<String>,
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
        out.push(Applied { names: vec![name], offset, ld, saved });
    }
    Ok(())
}

/// The adapters on the projections `names` of one fused product from `x`, projection i in
/// columns `offset + i·seg ..` of `y` [rows, ld]: stacked where they can be (every one present,
/// see [`LoraStack::new`]), else each on its own as [`adapt`] does.
#[allow(clippy::too_many_arguments)]
pub(crate) fn adapt_fused(pb: &mut PlanBuilder, ad: &Adapters, names: Vec<String>, x: &Tensor, y: &Tensor, offset: usize, seg: usize, ld: usize, out: &mut Vec<Applied>) -> Result<()> {
    let layers: Option<Vec<_>> = names.iter().map(|n| ad.get(n)).collect();
    if let Some(stack) = layers.and_then(LoraStack::new) {
        let saved = stack.forward(pb, x, Operand::slice(y, offset, ld))?;
        out.push(Applied { names, offset, ld, saved });
        return Ok(());
    }
    for (i, name) in names.into_iter().enumerate() {
        adapt(pb, ad, name, x, y, offset + i * seg, ld, out)?;
    }
    Ok(())
}

/// The backward of an adapter applied by [`adapt`]: dy is the projection's output gradient
/// (its columns of `dy`), its input gradient added into `dx` when given.
pub(crate) fn adapt_backward(pb: &mut PlanBuilder, ad: &Adapters, a: Applied, dy: &Tensor, dx: Option<&Tensor>) -> Result<()> {
    let dy = Operand::slice(dy, a.offset, a.ld);
    let layers: Vec<_> = a.names.iter().map(|n| ad.get(n).expect("an applied adapter exists")).collect();
    if layers.len() == 1 {
        return layers[0].backward(pb, a.saved, dy, dx, ad.grad_scale);
    }
    LoraStack::new(layers).expect("a stack formed in the forward").backward(pb, a.saved, dy, dx, ad.grad_scale)
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
