//! 2-D convolution over channels-last (NHWC) images as an implicit GEMM on the matmul shaders
//! (override CONV): the im2col matrix is gathered on the fly, never stored. The weight is
//! [cout, ks, ks, cin] (PyTorch's [cout, cin, ks, ks] permuted at load, see
//! [`conv_weight_to_nhwc`]). Square kernels, one stride and zero padding on every side, as in
//! SD-1.5 (3x3 stride 1 or 2, 1x1). Flops 2·M·N·K with M = batch·oh·ow, N = cout,
//! K = ks²·cin.
//!
//! Input gradient (the LoRA backward's dX through frozen convolutions), also an implicit GEMM
//! on the same kernels: M = batch·h·w (dX pixels), N = cin, K = ks²·cout, from dY
//! [batch, oh, ow, cout] and the flipped, channel-transposed weight W'[ci, ty, tx, co] =
//! W[co, ks-1-ty, ks-1-tx, ci]. W' is never built: the product reads the forward weight W
//! itself through an index remap (override B_FLIP, see `shaders/matmul_scalar.wgsl`): B is
//! taken in the [K, N] layout, whose row k = (ty, tx, co) is the cin contiguous values
//! W[co, ks-1-ty, ks-1-tx, ..].
//! - stride 1: dX = conv(dY, W') with padding ks-1-pad, the forward's CONV gather;
//! - stride s > 1: a transposed convolution, the CONV_T gather (dY read as if dilated by s,
//!   then gathered at stride 1, padding ks-1-pad): column (ty, tx, co) of dX pixel (y, x)
//!   reads dY at ((y + ty - (ks-1-pad)) / s, ..) when that divides evenly and lies inside dY,
//!   else zero. One override, default off, so the forward's pipelines do not change; dX
//!   pixels with fewer taps (the last row or column of an odd-sized input) simply read more
//!   zeros.
//! - 1x1 (stride 1, no padding): dX = dY·W, a plain product with the forward weight [cout,
//!   cin] (no W').
//!
//! Split over K works as in the forward (the gathers take the slice offset).
//!
//! [`Upsample2xConv`]: a nearest 2x upsample and a 3x3 convolution in one product, as the
//! four output phases' 2x2 convolutions of the small image (override PHASES).

use crate::error::{Error, Result};
use crate::gpu::{DType, KernelPath, Recorder, Tensor, Gpu};
use crate::kernels::matmul::{ConvGeom, CoopTile, Matmul};

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
    /// Force a cooperative-matrix tile (default: the launcher's choice, see `Matmul::plan`).
    pub tile: Option<CoopTile>,
}

impl Conv2d {
    /// A `ks`x`ks` convolution with the given stride and padding.
    pub fn new(batch: usize, h: usize, w: usize, cin: usize, cout: usize, ks: usize, stride: usize, pad: usize) -> Self {
        Conv2d { batch, h, w, cin, cout, ks, stride, pad, path: None, split_k: None, tile: None }
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
        mm.tile = self.tile;
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
            transposed: false,
            flip_b: false,
            phases: false,
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

impl Conv2d {
    /// Whether [`Conv2d::backward_input`] is a plain product dY·W (1x1, stride 1, no padding)
    /// rather than a gather.
    fn dx_is_plain_product(&self) -> bool {
        self.ks == 1 && self.stride == 1 && self.pad == 0
    }

    /// The implicit GEMM computing the input gradient dX [batch, h, w, cin] from dY
    /// [batch, oh, ow, cout] (A, gathered) and the forward weight W [cout, ks, ks, cin] (B,
    /// read flipped and channel-transposed through the B_FLIP remap; for 1x1 a plain [cout,
    /// cin] B). Set `accumulate` on it to add into dX (residual and skip streams), `split_k` as
    /// in the forward; run it with [`Matmul::run`] or, with a planned scratch,
    /// [`Matmul::run_split`].
    pub fn backward_input(&self) -> Result<Matmul> {
        let op = "conv2d backward_input";
        self.matmul()?;
        if self.pad >= self.ks {
            return Err(Error::shape(op, format!("padding {} not below the kernel size {} (not an SD-1.5 convolution)", self.pad, self.ks)));
        }
        let (oh, ow) = self.out_hw();
        let (m, n, k) = (self.batch * self.h * self.w, self.cin, self.ks * self.ks * self.cout);
        let mut mm = Matmul::new(m, n, k);
        mm.path = self.path;
        mm.split_k = self.split_k;
        if self.dx_is_plain_product() {
            // dX [M, cin] = dY [M, cout] · W [cout, cin].
            return Ok(mm);
        }
        mm.conv = Some(ConvGeom {
            images: self.batch,
            ih: oh,
            iw: ow,
            cin: self.cout,
            ks: self.ks,
            stride: self.stride,
            pad: self.ks - 1 - self.pad,
            oh: self.h,
            ow: self.w,
            transposed: self.stride > 1,
            flip_b: true,
            phases: false,
        });
        Ok(mm)
    }

    /// Records dx [batch, h, w, cin] (f16 or f32) = the input gradient of this convolution for
    /// dy [batch, oh, ow, cout] (f16) through the frozen forward weight `w` [cout, ks, ks, cin]
    /// (f16, the layout [`Conv2d::run`] reads). Overwrites dx (`=`, activation gradients).
    pub fn run_backward_input(&self, gpu: &Gpu, rec: &mut Recorder, dy: &Tensor, w: &Tensor, dx: &Tensor) -> Result<()> {
        let (oh, ow) = self.out_hw();
        let want_dy = [self.batch, oh, ow, self.cout];
        let want_w = [self.cout, self.ks, self.ks, self.cin];
        let want_dx = [self.batch, self.h, self.w, self.cin];
        if dy.numel() != want_dy.iter().product::<usize>() || w.shape != want_w || dx.numel() != want_dx.iter().product::<usize>() {
            return Err(Error::shape(
                "conv2d backward_input",
                format!("dy {:?} (want {want_dy:?}), w {:?} (want {want_w:?}), dx {:?} (want {want_dx:?})", dy.shape, w.shape, dx.shape),
            ));
        }
        self.backward_input()?.run(gpu, rec, dy, w, None, dx)
    }
}

/// A nearest 2x upsample followed by a 3x3 convolution (stride 1, padding 1), the VAE
/// decoder's upsamplers, computed from the small image: output pixel (2i + a, 2j + b) sees
/// input rows i - 1 + a and i + a (and columns likewise), the 3x3 taps that fall on the same
/// input pixel summed into one ([`upsample_conv_weight`]). So each of the four output phases
/// (a, b) is a 2x2 convolution of the small image with its own weight: 4/9 of the
/// multiplications, and the 4x larger upsampled image is never written or read. Run as one
/// product whose batch entries are the phases (override PHASES): M = batch·h·w, N = cout,
/// K = 4·cin, flops 2·4·M·N·K. Forward only.
#[derive(Clone, Copy, Debug)]
pub struct Upsample2xConv {
    pub batch: usize,
    /// The small image's size (the output is 2h x 2w).
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    /// Force a path (default: the device's).
    pub path: Option<KernelPath>,
    /// Force a cooperative-matrix tile (default: the launcher's choice, see `Matmul::plan`).
    pub tile: Option<CoopTile>,
}

impl Upsample2xConv {
    pub fn new(batch: usize, h: usize, w: usize, cin: usize, cout: usize) -> Self {
        Upsample2xConv { batch, h, w, cin, cout, path: None, tile: None }
    }

    /// The product it runs as.
    pub fn matmul(&self) -> Result<Matmul> {
        if self.batch == 0 || self.h == 0 || self.w == 0 || self.cin == 0 || self.cout == 0 {
            return Err(Error::shape("upsample conv", format!("empty convolution {self:?}")));
        }
        if self.cout % 2 == 1 {
            return Err(Error::shape("upsample conv", format!("{} output channels: the phases write pixel pairs of channels, so cout must be even", self.cout)));
        }
        let m = self.batch * self.h * self.w;
        let mut mm = Matmul::new(m, self.cout, 4 * self.cin);
        mm.trans_b = true;
        mm.batch = 4;
        mm.stride_a = 0;
        mm.stride_b = self.cout * 4 * self.cin;
        mm.path = self.path;
        mm.tile = self.tile;
        mm.conv = Some(ConvGeom {
            images: self.batch,
            ih: self.h,
            iw: self.w,
            cin: self.cin,
            ks: 2,
            stride: 1,
            pad: 0,
            oh: self.h,
            ow: self.w,
            transposed: false,
            flip_b: false,
            phases: true,
        });
        Ok(mm)
    }

    /// The multiplications of the upsample-then-convolve it replaces (2·(4·M)·N·9·cin), to
    /// compare its time with the direct convolution's.
    pub fn direct_flops(&self) -> f64 {
        2.0 * (4 * self.batch * self.h * self.w) as f64 * self.cout as f64 * (9 * self.cin) as f64
    }

    /// Records y = conv3x3(upsample2x(x)) + bias: x [batch, h, w, cin], weight [4, cout, 2, 2,
    /// cin] from [`upsample_conv_weight`], bias [cout], y [batch, 2h, 2w, cout], all f16.
    pub fn run(&self, gpu: &Gpu, rec: &mut Recorder, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, y: &Tensor) -> Result<()> {
        let want_x = [self.batch, self.h, self.w, self.cin];
        let want_w = [4, self.cout, 2, 2, self.cin];
        let want_y = [self.batch, 2 * self.h, 2 * self.w, self.cout];
        if x.numel() != want_x.iter().product::<usize>() || weight.shape != want_w || y.numel() != want_y.iter().product::<usize>() || y.dtype != DType::F16 {
            return Err(Error::shape(
                "upsample conv",
                format!("x {:?} (want {want_x:?}), weight {:?} (want {want_w:?}), y {:?} {} (want {want_y:?} f16)", x.shape, weight.shape, y.shape, y.dtype),
            ));
        }
        self.matmul()?.run(gpu, rec, x, weight, bias, y)
    }
}

/// The four phase weights [4, cout, 2, 2, cin] of [`Upsample2xConv`] from a PyTorch 3x3
/// weight [cout, cin, 3, 3]: phase (a, b) = 2a + b, tap (ty, tx) sums the taps (ky, kx) whose
/// rows fall on its input row (a = 0: ty 0 takes ky 0, ty 1 takes ky 1 and 2; a = 1: ty 0
/// takes ky 0 and 1, ty 1 takes ky 2) and likewise for the columns. Summed in f32.
pub fn upsample_conv_weight(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    const ROWS: [[&[usize]; 2]; 2] = [[&[0], &[1, 2]], [&[0, 1], &[2]]];
    let mut out = vec![0.0; 4 * cout * 4 * cin];
    for a in 0..2 {
        for b in 0..2 {
            for o in 0..cout {
                for ty in 0..2 {
                    for tx in 0..2 {
                        let at = ((((2 * a + b) * cout + o) * 2 + ty) * 2 + tx) * cin;
                        for i in 0..cin {
                            let mut sum = 0.0;
                            for &ky in ROWS[a][ty] {
                                for &kx in ROWS[b][tx] {
                                    sum += w[((o * cin + i) * 3 + ky) * 3 + kx];
                                }
                            }
                            out[at + i] = sum;
                        }
                    }
                }
            }
        }
    }
    out
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
