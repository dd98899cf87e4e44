//! Launcher for `shaders/conv_thin.wgsl`: a stride-1 convolution (1x1 or 3x3, "same" padding)
//! to at most 4 output channels computed directly, for large images (the VAE decoder's
//! conv_out, 128 -> 3 channels at the image's size). On the matmul shaders such a product
//! fills 3 of a tile's columns and still gathers the whole im2col matrix (9 reads of every
//! input word through L2); here each workgroup stages a tile of the input with its halo and
//! the weights in workgroup memory, 16 channels at a time. Flops 2·pixels·cout·ks²·cin; bytes
//! the input, weight and output.

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, PipelineKey, Shader, Tensor};
use crate::kernels::conv::Conv2d;

/// Mirrors `struct Params` in conv_thin.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ConvThinParams {
    pub images: u32,
    pub h: u32,
    pub w: u32,
    pub cin: u32,
    pub cout: u32,
    pub ks: u32,
    pub pad: u32,
    pub tiles_x: u32,
    pub tiles_y: u32,
    pub has_bias: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// The shader's output tile: TH rows of TW pixels.
const TW: usize = 128;
const TH: usize = 2;

/// Output pixels from which the launcher prefers this kernel to the matmul shaders: H100, the
/// VAE's conv_out at 512x512 0.185 ms against 0.384, the UNet's (320 -> 4) at 64x64 latents,
/// batch 2 (8192 pixels, 64 workgroups) 71 us against 98 (docs/PERF.md). Below it, too few
/// workgroups to fill a large GPU.
pub const MIN_PIXELS: usize = 8192;

/// The pipeline key.
pub fn key() -> PipelineKey {
    PipelineKey::new(Shader::ConvThin, "main")
}

/// Whether `conv` can run here: stride 1, 1x1 or 3x3 with "same" padding, 1–4 output
/// channels, input channels a multiple of 8, an even width (a tile row's outputs are whole
/// 4-byte words).
pub fn supports(conv: &Conv2d) -> bool {
    conv.stride == 1
        && (conv.ks == 1 || conv.ks == 3)
        && conv.pad == conv.ks / 2
        && (1..=4).contains(&conv.cout)
        && conv.cin.is_multiple_of(8)
        && conv.cin > 0
        && conv.w.is_multiple_of(2)
        && conv.h > 0
        && conv.batch > 0
        && conv.batch * conv.h * conv.w * conv.cin.max(conv.cout) < u32::MAX as usize
}

/// Whether the launcher runs `conv` here rather than on the matmul shaders.
pub fn preferred(conv: &Conv2d) -> bool {
    supports(conv) && conv.batch * conv.h * conv.w >= MIN_PIXELS && conv.path.is_none() && conv.tile.is_none() && conv.split_k.is_none()
}

/// y [batch, h, w, cout] = conv(x [batch, h, w, cin], weight [cout, ks, ks, cin]) + bias
/// [cout], all f16.
pub fn run(gpu: &Gpu, conv: &Conv2d, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, y: &Tensor) -> Result<Dispatch> {
    let op = "conv2d (thin)";
    if !supports(conv) {
        return Err(Error::shape(op, format!("{conv:?}: needs stride 1, a 1x1 or 3x3 kernel with padding ks / 2, 1-4 output and a multiple of 8 input channels, an even width")));
    }
    let pixels = conv.batch * conv.h * conv.w;
    let ok = x.numel() == pixels * conv.cin
        && weight.shape == [conv.cout, conv.ks, conv.ks, conv.cin]
        && y.numel() == pixels * conv.cout
        && bias.is_none_or(|b| b.numel() == conv.cout);
    if !ok {
        return Err(Error::shape(op, format!("x {:?}, weight {:?}, bias {:?}, y {:?} for {conv:?}", x.shape, weight.shape, bias.map(|b| &b.shape), y.shape)));
    }
    if [x, weight, y].iter().chain(bias.as_ref()).any(|t| t.dtype != DType::F16) {
        return Err(Error::DType { op: op.into(), detail: "x, weight, bias and y must be f16".into() });
    }
    let (tiles_x, tiles_y) = (conv.w.div_ceil(TW), conv.h.div_ceil(TH));
    let p = ConvThinParams {
        images: conv.batch as u32,
        h: conv.h as u32,
        w: conv.w as u32,
        cin: conv.cin as u32,
        cout: conv.cout as u32,
        ks: conv.ks as u32,
        pad: conv.pad as u32,
        tiles_x: tiles_x as u32,
        tiles_y: tiles_y as u32,
        has_bias: bias.is_some() as u32,
        ..Default::default()
    };
    let flops = 2.0 * pixels as f64 * (conv.cout * conv.ks * conv.ks * conv.cin) as f64;
    let bytes = 2.0 * (x.numel() + weight.numel() + y.numel()) as f64;
    gpu.dispatch(&key(), &p, &[x, weight, bias.unwrap_or(weight), y], grid(conv.batch * tiles_x * tiles_y * 256), flops, bytes)
}
