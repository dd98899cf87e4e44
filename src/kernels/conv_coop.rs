//! Launcher for `shaders/conv_coop.wgsl`: a 3x3 stride-1 convolution with "same" padding on
//! cooperative matrices that stages the input tile with its halo once per 16-channel chunk
//! (read once from memory) instead of gathering the 9-tap im2col matrix as the matmul shaders'
//! implicit GEMM does. A workgroup computes 256 output pixels (TH rows x TW columns of one
//! image) x 64 output channels. Bias (one vector or a row per image) and accumulation into y
//! as the matmul epilogue has them. Flops 2·pixels·cout·9·cin; bytes the input once per 64
//! output channels (plus the halo), the weight once per tile, the output.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, KernelPath, PipelineKey, Shader, Tensor};
use crate::kernels::conv::{Conv2d, Upsample2xConv};
use crate::kernels::matmul::BiasLayout;

/// Mirrors `struct Params` in conv_coop.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct ConvCoopParams {
    pub images: u32,
    pub h: u32,
    pub w: u32,
    pub cin: u32,
    pub cout: u32,
    pub tiles_x: u32,
    pub tiles_y: u32,
    pub flags: u32,
    pub bias_off: u32,
    pub bias_ld: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Output pixels and channels of one workgroup.
const TILE_PIXELS: usize = 256;
const BN: usize = 64;
/// Input channels a chunk.
const CK: usize = 16;

/// The tile widths the shader takes (its TW override), widest first.
pub const WIDTHS: [usize; 3] = [64, 32, 16];

/// The tile width for an image `w` pixels wide: the widest that divides it.
pub fn tile_width(w: usize) -> Option<usize> {
    WIDTHS.into_iter().find(|&tw| w.is_multiple_of(tw))
}

/// How an h x w image is cut into workgroup tiles: tile width, tiles across and down, and the
/// halo tile's pixels per output pixel (the input's read factor).
struct Tiling {
    tw: usize,
    tiles_x: usize,
    tiles_y: usize,
    halo: f64,
}

/// The tiling of an h x w image, where the width allows one.
fn tiling(h: usize, w: usize) -> Option<Tiling> {
    let tw = tile_width(w)?;
    let th = TILE_PIXELS / tw;
    Some(Tiling { tw, tiles_x: w / tw, tiles_y: h.div_ceil(th), halo: ((th + 2) * (tw + 2)) as f64 / TILE_PIXELS as f64 })
}

impl Tiling {
    /// Workgroups of a launch over `images` images and `cout` output channels.
    fn workgroups(&self, images: usize, cout: usize) -> usize {
        cout / BN * images * self.tiles_x * self.tiles_y
    }

    /// The shader's parameters, without bias or accumulation (flags 0).
    fn params(&self, images: usize, h: usize, w: usize, cin: usize, cout: usize) -> ConvCoopParams {
        ConvCoopParams {
            images: images as u32,
            h: h as u32,
            w: w as u32,
            cin: cin as u32,
            cout: cout as u32,
            tiles_x: self.tiles_x as u32,
            tiles_y: self.tiles_y as u32,
            ..Default::default()
        }
    }
}

/// The pipeline key for tile width `tw`, of the 3x3 convolution or (`phases`) of an
/// upsampler's phase convolutions.
pub fn key(tw: usize, phases: bool) -> PipelineKey {
    let k = PipelineKey::new(Shader::ConvCoop, "main").with("TW", tw as i64);
    if phases { k.with("PHASES", 1) } else { k }
}

/// Every variant the launcher can ask for.
pub fn variants() -> Vec<PipelineKey> {
    [false, true].into_iter().flat_map(|ph| WIDTHS.into_iter().map(move |tw| key(tw, ph))).collect()
}

/// Whether `conv` can run here (on a device with the cooperative-matrix path): 3x3, stride 1,
/// padding 1, input channels a multiple of 16, output channels a multiple of 64, a width
/// that is a multiple of 16, and element indices within u32.
pub fn supports(gpu: &Gpu, conv: &Conv2d) -> bool {
    gpu.caps.path == KernelPath::Coop
        && conv.path.is_none_or(|p| p == KernelPath::Coop)
        && conv.ks == 3
        && conv.stride == 1
        && conv.pad == 1
        && conv.cin > 0
        && conv.cin.is_multiple_of(CK)
        && conv.cout > 0
        && conv.cout.is_multiple_of(BN)
        && tile_width(conv.w).is_some()
        && conv.h > 0
        && conv.batch > 0
        && conv.batch * conv.h * conv.w * conv.cin.max(conv.cout) < u32::MAX as usize
}

/// The per-image stride at which the shader reads a bias laid out as `layout` (row m of the
/// product reads element off + (m / rows)·ld + n): 0 for one vector, `ld` for a row per image;
/// None for other layouts, and offsets that are not multiples of 8 (whole 16-byte words).
pub fn bias_image_ld(conv: &Conv2d, layout: &BiasLayout) -> Option<usize> {
    let ld = if layout.ld == 0 || conv.batch == 1 || layout.rows >= conv.batch * conv.h * conv.w {
        0
    } else if layout.rows == conv.h * conv.w {
        layout.ld
    } else {
        return None;
    };
    (layout.off.is_multiple_of(8) && ld.is_multiple_of(8)).then_some(ld)
}

/// Workgroups from which the launcher prefers this kernel to the matmul shaders' implicit GEMM.
/// H100 (`bench`, docs/PERF.md): UNet 32x32x640 at batch 2 (80 workgroups) 0.136 ms against
/// 0.243. At 40 it is a toss-up with the product split over K: 32x32x640 at batch 1 0.132
/// against 0.139, 16x16x1280 at batch 2 0.251 against 0.258, but 16x16 2560 -> 1280 at batch
/// 2 0.50 against 0.43.
pub const MIN_WORKGROUPS: usize = 64;

/// The workgroups a launch of `conv` takes (where supported).
pub fn workgroups(conv: &Conv2d) -> usize {
    tiling(conv.h, conv.w).map_or(0, |t| t.workgroups(conv.batch, conv.cout))
}

/// Whether the environment switches this kernel off (`ATELIER_CONV_COOP=0`, for comparisons).
fn switched_off() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var("ATELIER_CONV_COOP").is_ok_and(|v| v == "0"))
}

/// Whether the launcher runs `conv` (with its bias at `layout`) here rather than on the matmul
/// shaders: supported, enough workgroups, no tile or split forced, and not switched off by
/// `ATELIER_CONV_COOP=0` (for comparisons).
pub fn preferred(gpu: &Gpu, conv: &Conv2d, layout: &BiasLayout) -> bool {
    !switched_off()
        && supports(gpu, conv)
        && bias_image_ld(conv, layout).is_some()
        && workgroups(conv) >= MIN_WORKGROUPS
        && conv.tile.is_none()
        && conv.split_k.is_none()
}

/// y [batch, h, w, cout] (+)= conv(x [batch, h, w, cin], weight [cout, 3, 3, cin]) + bias, all
/// f16; the bias read at `layout` (`BiasLayout::default()` for one vector).
pub fn run(gpu: &Gpu, conv: &Conv2d, x: &Tensor, weight: &Tensor, bias: Option<(&Tensor, BiasLayout)>, y: &Tensor, accumulate: bool) -> Result<Dispatch> {
    let op = "conv2d (coop, staged)";
    if !supports(gpu, conv) {
        return Err(Error::shape(op, format!("{conv:?}: needs the cooperative-matrix path, a 3x3 kernel with stride 1 and padding 1, input channels a multiple of 16, output channels a multiple of 64, a width that is a multiple of 16")));
    }
    let pixels = conv.batch * conv.h * conv.w;
    let ok = x.numel() == pixels * conv.cin && weight.shape == [conv.cout, 3, 3, conv.cin] && y.numel() == pixels * conv.cout;
    if !ok {
        return Err(Error::shape(op, format!("x {:?}, weight {:?}, y {:?} for {conv:?}", x.shape, weight.shape, y.shape)));
    }
    if [x, weight, y].into_iter().chain(bias.map(|b| b.0)).any(|t| t.dtype != DType::F16) {
        return Err(Error::DType { op: op.into(), detail: "x, weight, bias and y must be f16".into() });
    }
    let (bias_off, bias_ld) = match bias {
        None => (0, 0),
        Some((b, layout)) => {
            let Some(ld) = bias_image_ld(conv, &layout) else {
                return Err(Error::shape(op, format!("bias layout {layout:?}: needs one vector or a row per image ({} pixels) at offsets that are multiples of 8", conv.h * conv.w)));
            };
            let extent = layout.off + (conv.batch - 1) * ld + conv.cout;
            if b.numel() < extent {
                return Err(Error::shape(op, format!("bias {:?} shorter than the {extent} elements its layout {layout:?} reads", b.shape)));
            }
            (layout.off, ld)
        }
    };
    let t = tiling(conv.h, conv.w).expect("supports checked the width");
    let p = ConvCoopParams {
        flags: bias.is_some() as u32 | (accumulate as u32) << 1,
        bias_off: bias_off as u32,
        bias_ld: bias_ld as u32,
        ..t.params(conv.batch, conv.h, conv.w, conv.cin, conv.cout)
    };
    let flops = 2.0 * pixels as f64 * (conv.cout * 9 * conv.cin) as f64;
    let tiles = conv.batch * t.tiles_x * t.tiles_y;
    let bytes = 2.0 * (x.numel() as f64 * t.halo * (conv.cout / BN) as f64 + (weight.numel() * tiles) as f64 + y.numel() as f64 * (1 + accumulate as usize) as f64);
    let groups = [(conv.cout / BN) as u32, tiles as u32, 1];
    gpu.dispatch(&key(t.tw, false), &p, &[x, weight, bias.map_or(weight, |b| b.0), y], groups, flops, bytes)
}

/// Whether an upsampler's phase convolutions `up` can run here: the cooperative-matrix path,
/// input channels a multiple of 16, output channels a multiple of 64, a (small image) width
/// that is a multiple of 16.
pub fn supports_phases(gpu: &Gpu, up: &Upsample2xConv) -> bool {
    let conv = Conv2d { path: up.path, ..Conv2d::new(up.batch, 2 * up.h, 2 * up.w, up.cin, up.cout, 3, 1, 1) };
    supports(gpu, &conv) && tile_width(up.w).is_some() && up.tile.is_none()
}

/// Whether the launcher runs `up` here rather than on the matmul shaders (PHASES there).
pub fn preferred_phases(gpu: &Gpu, up: &Upsample2xConv) -> bool {
    let workgroups = tiling(up.h, up.w).map_or(0, |t| 4 * t.workgroups(up.batch, up.cout));
    !switched_off() && supports_phases(gpu, up) && workgroups >= MIN_WORKGROUPS
}

/// y [batch, 2h, 2w, cout] = conv3x3(upsample2x(x [batch, h, w, cin])) + bias [cout] as the
/// four phase convolutions, weight [4, cout, 2, 2, cin] from `conv::upsample_conv_weight`; all
/// f16.
pub fn run_phases(gpu: &Gpu, up: &Upsample2xConv, x: &Tensor, weight: &Tensor, bias: Option<&Tensor>, y: &Tensor) -> Result<Dispatch> {
    let op = "upsample conv (coop, staged)";
    if !supports_phases(gpu, up) {
        return Err(Error::shape(op, format!("{up:?}: needs the cooperative-matrix path, input channels a multiple of 16, output channels a multiple of 64, a width that is a multiple of 16")));
    }
    let pixels = up.batch * up.h * up.w;
    let ok = x.numel() == pixels * up.cin && weight.shape == [4, up.cout, 2, 2, up.cin] && y.numel() == 4 * pixels * up.cout && bias.is_none_or(|b| b.numel() >= up.cout);
    if !ok {
        return Err(Error::shape(op, format!("x {:?}, weight {:?}, bias {:?}, y {:?} for {up:?}", x.shape, weight.shape, bias.map(|b| &b.shape), y.shape)));
    }
    if [x, weight, y].into_iter().chain(bias).any(|t| t.dtype != DType::F16) {
        return Err(Error::DType { op: op.into(), detail: "x, weight, bias and y must be f16".into() });
    }
    let t = tiling(up.h, up.w).expect("supports_phases checked the width");
    let p = ConvCoopParams { flags: bias.is_some() as u32, ..t.params(up.batch, up.h, up.w, up.cin, up.cout) };
    let flops = 2.0 * (4 * pixels) as f64 * (up.cout * 4 * up.cin) as f64;
    // Each phase's workgroups read the input tile and a quarter of the weight.
    let tiles = up.batch * t.tiles_x * t.tiles_y;
    let bytes = 2.0 * (4.0 * x.numel() as f64 * t.halo * (up.cout / BN) as f64 + (weight.numel() * tiles) as f64 + y.numel() as f64);
    let groups = [(up.cout / BN) as u32, tiles as u32, 4];
    gpu.dispatch(&key(t.tw, true), &p, &[x, weight, bias.unwrap_or(weight), y], groups, flops, bytes)
}
