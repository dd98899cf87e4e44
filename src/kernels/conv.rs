//! 2-D convolution over channels-last (NHWC) images as an implicit GEMM on the matmul shaders
//! (override CONV): the im2col matrix is gathered on the fly, never stored. The weight is
//! [cout, ks, ks, cin] (PyTorch's [cout, cin, ks, ks] permuted at load, see
//! [`conv_weight_to_nhwc`]). Square kernels, one stride and zero padding on every side, as in
//! SD-1.5 (3x3 stride 1 or 2, 1x1). Flops 2·M·N·K with M = batch·oh·ow, N = cout,
//! K = ks²·cin.

use crate::error::{Error, Result};
use crate::gpu::{KernelPath, Recorder, Tensor, Gpu};
use crate::kernels::matmul::{ConvGeom, Matmul};

/// A convolution of fixed shape.
#[derive(Clone, Copy, Debug)]
pub struct Conv2d {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    pub ks: usize,
    pub stride: usize,
    pub pad: usize,
    /// Force a path (default: the device's).
    pub path: Option<KernelPath>,
    /// Force a split over K (default: the launcher's choice, see `Matmul::split`).
    pub split_k: Option<usize>,
}

impl Conv2d {
    /// A `ks`x`ks` convolution with the given stride and padding.
    pub fn new(batch: usize, h: usize, w: usize, cin: usize, cout: usize, ks: usize, stride: usize, pad: usize) -> Self {
        Conv2d { batch, h, w, cin, cout, ks, stride, pad, path: None, split_k: None }
    }

    /// Output height and width.
    pub fn out_hw(&self) -> (usize, usize) {
        let o = |x: usize| (x + 2 * self.pad).saturating_sub(self.ks) / self.stride.max(1) + 1;
        (o(self.h), o(self.w))
    }

    /// The implicit GEMM this convolution runs as.
    pub fn matmul(&self) -> Result<Matmul> {
        let op = "conv2d";
        if self.batch == 0 || self.h == 0 || self.w == 0 || self.cin == 0 || self.cout == 0 || self.ks == 0 || self.stride == 0 {
            return Err(Error::shape(op, format!("empty or zero-stride convolution {self:?}")));
        }
        if self.h + 2 * self.pad < self.ks || self.w + 2 * self.pad < self.ks {
            return Err(Error::shape(op, format!("{}x{} image (padding {}) smaller than the {}x{} kernel", self.h, self.w, self.pad, self.ks, self.ks)));
        }
        let (oh, ow) = self.out_hw();
        let mut mm = Matmul::new(self.batch * oh * ow, self.cout, self.ks * self.ks * self.cin);
        mm.trans_b = true;
        mm.path = self.path;
        mm.split_k = self.split_k;
        mm.conv = Some(ConvGeom {
            images: self.batch,
            ih: self.h,
            iw: self.w,
            cin: self.cin,
            ks: self.ks,
            stride: self.stride,
            pad: self.pad,
            oh,
            ow,
        });
        Ok(mm)
    }

    /// Records y = conv(x, weight) + bias: x [batch, h, w, cin], weight [cout, ks, ks, cin],
    /// bias [cout], y [batch, oh, ow, cout] (f16 or f32), all f16 but y.
    pub fn run(&self, gpu: &Gpu, rec: &mut Recorder, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, y: &Tensor) -> Result<()> {
        let (oh, ow) = self.out_hw();
        let want_x = [self.batch, self.h, self.w, self.cin];
        let want_w = [self.cout, self.ks, self.ks, self.cin];
        let want_y = [self.batch, oh, ow, self.cout];
        if x.numel() != want_x.iter().product::<usize>() || weight.shape != want_w || y.numel() != want_y.iter().product::<usize>() {
            return Err(Error::shape(
                "conv2d",
                format!("x {:?} (want {want_x:?}), weight {:?} (want {want_w:?}), y {:?} (want {want_y:?})", x.shape, weight.shape, y.shape),
            ));
        }
        self.matmul()?.run(gpu, rec, x, weight, bias, y)
    }
}

/// Reorders a PyTorch conv weight [cout, cin, kh, kw] into [cout, kh, kw, cin].
pub fn conv_weight_to_nhwc(w: &[f32], cout: usize, cin: usize, kh: usize, kw: usize) -> Vec<f32> {
    let mut out = vec![0.0; w.len()];
    for o in 0..cout {
        for i in 0..cin {
            for y in 0..kh {
                for x in 0..kw {
                    out[((o * kh + y) * kw + x) * cin + i] = w[((o * cin + i) * kh + y) * kw + x];
                }
            }
        }
    }
    out
}
