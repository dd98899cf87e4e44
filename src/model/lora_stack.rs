//! [`LoraStack`]: the LoRA adapters of one fused product that read the same input (q, k, v
//! of a self-attention; k, v of a cross-attention) run as one launch per product instead of
//! one per adapter. See `model::lora`'s notes for the layout that makes their A's and B's
//! single views, and `kernels::lora_skinny` for the stacked kernels. With input dropout the
//! members' masks are applied inside the kernels that read x (or write dx), each member with
//! its own stream (`kernels::lora_skinny::Mask`), so no masked copy of x is stored.

use crate::error::{Error, Result};
use crate::gpu::{PlanBuilder, Tensor};
use crate::kernels::attention::Operand;
use crate::kernels::lora_skinny as sk;
use crate::model::lora::{check_cols, run_wgrad, LoraLayer, LoraSaved, LoraSpec};

/// Adapters on the projections of one fused product that read the same input (q, k, v of a
/// self-attention; k, v of a cross-attention), run stacked: one launch per product for the
/// group (see the module notes). Formed only where it computes what the members would one
/// by one: equal shapes, scales and dropout, A's and B's back to back in the flat buffers
/// (and dropout streams consecutive), a stacked rank the skinny kernels take, and with
/// dropout a mask the skinny kernels can apply (`LoraLayer::mask`: rank a multiple of 4, so
/// each of the masked kernels' vec4 groups is one member's, and even k).
#[derive(Clone, Debug)]
pub struct LoraStack<'a> {
    pub layers: Vec<&'a LoraLayer>,
}

impl<'a> LoraStack<'a> {
    /// The stack of `layers` (in their output columns' order), if they can run stacked.
    pub fn new(layers: Vec<&'a LoraLayer>) -> Option<Self> {
        let first = *layers.first()?;
        let s = &first.spec;
        let g = layers.len();
        let fits = g >= 2 && s.rank * g <= sk::MAX_RANK && g * s.rank.div_ceil(4) <= 4 && s.n % 2 == 0;
        let masks_fit = s.dropout == 0.0 || first.mask().is_some();
        let aligned = layers.iter().enumerate().all(|(i, l)| {
            let t = &l.spec;
            (t.k, t.n, t.rank, t.dropout) == (s.k, s.n, s.rank, s.dropout)
                && l.salt == first.salt + i as u32
                && l.scale == first.scale
                && std::sync::Arc::ptr_eq(&l.a.buffer, &first.a.buffer)
                && l.off_a == first.off_a + i * s.rank * s.k
                && l.off_b == first.off_b + i * s.n * s.rank
        });
        (fits && masks_fit && aligned).then_some(LoraStack { layers })
    }

    fn members(&self) -> usize {
        self.layers.len()
    }

    fn spec(&self) -> &LoraSpec {
        &self.layers[0].spec
    }

    /// The members' input dropout, if any (the first member's mask: `new` formed the stack
    /// only where it exists, with the members' streams consecutive).
    fn mask(&self) -> Option<sk::Mask> {
        self.layers[0].mask()
    }

    /// A flat view from the first member's, widened to the stack.
    fn stacked(t: &Tensor, shape: [usize; 2]) -> Tensor {
        Tensor { shape: shape.to_vec(), ..t.clone() }
    }

    /// Records the members' forwards: y's columns [i·n, (i+1)·n) of `y` (the first member's
    /// columns at its offset, row stride y.ld) get member i's scale·B_i·A_i·x. Returns h [M,
    /// members·r] and x for the backward.
    pub fn forward(&self, pb: &mut PlanBuilder, x: &Tensor, y: Operand) -> Result<LoraSaved> {
        let (s, g, l0) = (self.spec(), self.members(), self.layers[0]);
        let rows = l0.rows("lora forward", x, s.k)?;
        let (r, n) = (s.rank, s.n);
        check_cols("lora forward", &s.name, &y, rows, g * n)?;
        let h = pb.f16(&[rows, g * r], "lora h (stacked)")?;
        let a16 = Self::stacked(&l0.a16, [g * r, s.k]);
        let b16 = Self::stacked(&l0.b16, [g * n, r]);
        match self.mask() {
            Some(mask) => pb.run(sk::narrow_masked(pb.gpu, x, &a16, &h, rows, s.k, g * r, 1.0, &mask)?)?,
            None => pb.run(sk::narrow(pb.gpu, Operand::dense(x, s.k), &a16, true, &h, rows, s.k, g * r, 1.0)?)?,
        }
        pb.run(sk::widen_stacked(pb.gpu, &h, &b16, y, rows, g * n, r, g, l0.scale, true)?)?;
        Ok(LoraSaved { xd: x.clone(), h, xd_owned: false })
    }

    /// Records the members' backwards from dy (their columns, laid out as in the forward):
    /// dA and dB of every member accumulate (times `grad_scale`), and with `dx` the members'
    /// input gradients are added into it. Gives the saved tensors back to the pool.
    pub fn backward(&self, pb: &mut PlanBuilder, saved: LoraSaved, dy: Operand, dx: Option<&Tensor>, grad_scale: f32) -> Result<()> {
        let (s, g, l0) = (self.spec(), self.members(), self.layers[0]);
        let (r, n, k) = (s.rank, s.n, s.k);
        let rows = saved.h.numel() / (g * r);
        check_cols("lora backward", &s.name, &dy, rows, g * n)?;
        if dx.map(|t| l0.rows("lora backward", t, k)).transpose()?.is_some_and(|m| m != rows) {
            return Err(Error::shape("lora backward", format!("{}: dx does not match the forward's {rows} rows", s.name)));
        }
        let a16 = Self::stacked(&l0.a16, [g * r, k]);
        let b16 = Self::stacked(&l0.b16, [g * n, r]);
        let da = Self::stacked(&l0.da, [g * r, k]);
        let db = Self::stacked(&l0.db, [g * n, r]);
        // dB_i [n, r] += scale · dy_iᵀ·h_i; dh_i = scale · dy_i·B_i; dA [g·r, k] += dhᵀ·x.
        let wdb = sk::WeightGrad::new(rows, g * n, r, l0.scale * grad_scale, false).stacked(g);
        run_wgrad(pb, &wdb, dy, &saved.h, &db)?;
        let dh = pb.f16(&[rows, g * r], "lora dh (stacked)")?;
        pb.run(sk::narrow_stacked(pb.gpu, dy, &b16, &dh, rows, g * n, r, g, l0.scale)?)?;
        let mut wda = sk::WeightGrad::new(rows, k, g * r, grad_scale, true);
        if let Some(mask) = self.mask() {
            wda = wda.masked(mask);
        }
        run_wgrad(pb, &wda, Operand::dense(&saved.xd, k), &dh, &da)?;
        if let Some(dx) = dx {
            match self.mask() {
                Some(mask) => pb.run(sk::widen_masked(pb.gpu, &dh, &a16, dx, rows, k, g * r, 1.0, true, &mask)?)?,
                None => pb.run(sk::widen(pb.gpu, &dh, &a16, false, Operand::dense(dx, k), rows, k, g * r, 1.0, true)?)?,
            }
        }
        pb.free(dh);
        saved.release(pb);
        Ok(())
    }
}
