//! The convolution cases of `atelier bench` (see `bench`): 3x3 convolutions at UNet and VAE
//! shapes, direct and by Winograd F(2x2, 3x3), the VAE decoder's upsample-then-convolve pairs
//! as phase convolutions against upsample + direct, the direct kernel for convolutions to at
//! most 4 channels (`conv_thin`), and the convolutions' input gradients at
//! the training step's shapes.

use crate::bench::{random_f16, recorded, recorded_each, time_case, unsplit_and_split, BenchResult, Weights};
use crate::error::Result;
use crate::gpu::{DType, Gpu, KernelPath, Recorder, Tensor};
use crate::kernels::conv::{Conv2d, Upsample2xConv};
use crate::kernels::{conv_coop, conv_thin};
use crate::kernels::matmul::{BiasLayout, CoopTile, Matmul};
use crate::kernels::tensor_ops;
use crate::kernels::winograd::Winograd;
use crate::model::layers::WINOGRAD_KEEP_MAX;

/// The convolution cases (3x3, stride 1, padding 1, NHWC): (name, batch, size, cin, cout); batch
/// 2 is a guided sampling step, batch 1 the training forward.
pub const CONV_CASES: [(&str, usize, usize, usize, usize); 15] = [
    ("unet_64x64x320_b2", 2, 64, 320, 320),
    ("unet_64x64x320_b1", 1, 64, 320, 320),
    ("unet_32x32x640_b2", 2, 32, 640, 640),
    ("unet_32x32x640_b1", 1, 32, 640, 640),
    ("unet_16x16x1280_b2", 2, 16, 1280, 1280),
    ("unet_8x8x1280_b2", 2, 8, 1280, 1280),
    // The up blocks' first convolutions, on the skip connection's concatenation.
    ("unet_16x16x2560to1280_b2", 2, 16, 2560, 1280),
    ("unet_8x8x2560to1280_b2", 2, 8, 2560, 1280),
    ("unet_32x32x1920to640_b2", 2, 32, 1920, 640),
    ("vae_256x256x256", 1, 256, 256, 256),
    ("vae_512x512x128", 1, 512, 128, 128),
    ("vae_64x64x512", 1, 64, 512, 512),
    ("vae_128x128x512", 1, 128, 512, 512),
    ("vae_out_512x512x128to3", 1, 512, 128, 3),
    ("unet_out_64x64x320to4_b2", 2, 64, 320, 4),
];

/// Upsamplers (nearest 2x, then a 3x3 convolution, c -> c) at 512x512: the VAE decoder's, and
/// the UNet's at batch 2 (which run by Winograd at inference; the rows compare the phase form
/// with it): (name, batch, size before upsampling, c).
pub const UPSAMPLE_CASES: [(&str, usize, usize, usize); 6] = [
    ("vae_64to128x512", 1, 64, 512),
    ("vae_128to256x512", 1, 128, 512),
    ("vae_256to512x256", 1, 256, 256),
    ("unet_32to64x640_b2", 2, 32, 640),
    ("unet_16to32x1280_b2", 2, 16, 1280),
    ("unet_8to16x1280_b2", 2, 8, 1280),
];

/// 3x3 convolutions' input gradients dX in the LoRA training step (batch 1, 512 px): name,
/// batch, input size, cin, cout, stride (2: a downsampler, the CONV_T gather).
pub const CONV_DX_CASES: [(&str, usize, usize, usize, usize, usize); 5] = [
    ("unet_64x64x320", 1, 64, 320, 320, 1),
    ("unet_32x32x640", 1, 32, 640, 640, 1),
    ("unet_16x16x1280", 1, 16, 1280, 1280, 1),
    ("unet_8x8x1280", 1, 8, 1280, 1280, 1),
    ("unet_down_64x64x320_s2", 1, 64, 320, 320, 2),
];

/// Runs the convolution cases whose names `wanted` accepts on `paths`, each result to `emit`
/// (arguments as `bench::run_all`'s).
#[allow(clippy::too_many_arguments)]
pub(crate) fn run(gpu: &Gpu, wanted: &dyn Fn(&str) -> bool, emit: &mut dyn FnMut(BenchResult), paths: &[KernelPath], slow: bool, all_tiles: bool, cold: bool) -> Result<()> {
    for &(name, batch, size, cin, cout) in CONV_CASES.iter() {
        let full = format!("conv3x3_{name}");
        if !wanted(&full) || (slow && batch * size * size * cout * 9 * cin > 1 << 31) {
            continue;
        }
        let x = random_f16(gpu, &[batch, size, size, cin], 5, "bench conv x")?;
        let w = Weights::new(gpu, &[cout, 3, 3, cin], 6, "bench conv w", cold)?;
        let b = random_f16(gpu, &[cout], 7, "bench conv b")?;
        let y = Tensor::empty(gpu, &[batch, size, size, cout], DType::F16, "bench conv y")?;
        for &path in paths {
            let mut conv = Conv2d::new(batch, size, size, cin, cout, 3, 1, 1);
            conv.path = Some(path);
            let mm = conv.matmul()?;
            // The launcher's tile, then (tuning the tile rule) every coop tile unsplit.
            let tiles: &[CoopTile] = if all_tiles && path == KernelPath::Coop { &CoopTile::ALL } else { &[] };
            for tile in std::iter::once(None).chain(tiles.iter().map(|&t| Some(t))) {
                let mm = Matmul { tile, ..mm.clone() };
                for (label, ds) in unsplit_and_split(gpu, &mm, &x, &w, Some(&b), &y)? {
                    emit(w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?));
                }
            }
            // Below two waves of 128x128 tiles: the tiles the split rule may pick, with every
            // split (the sum included), for tuning it.
            let mid = CoopTile::CONV_MID;
            let mid_tiles = mm.m.div_ceil(mid.bm as usize) * mm.n.div_ceil(mid.bn as usize);
            if all_tiles && path == KernelPath::Coop && mid_tiles < 264 {
                for t in [mid, CoopTile::NARROW, CoopTile::ROWS_MID, CoopTile::DEFAULT] {
                    for s in [2, 4, 8, 16] {
                        if !mm.k.is_multiple_of(16 * s) {
                            continue;
                        }
                        let mm = Matmul { tile: Some(t), split_k: Some(s), ..mm.clone() };
                        let ds = recorded_each(gpu, &mm, &x, &w, Some(&b), &y)?;
                        let label = format!("{path} split-K x{s} {}", ds[0].label);
                        emit(w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?));
                    }
                }
            }
        }
        // To at most 4 channels: the direct kernel the launcher takes for large images
        // (`kernels::conv_thin`).
        let conv = Conv2d::new(batch, size, size, cin, cout, 3, 1, 1);
        if conv_thin::supports(&conv) {
            let ds = w.0.iter().map(|w| conv_thin::run(gpu, &conv, &x, w, Some(&b), &y)).collect::<Result<Vec<_>>>()?;
            emit(w.per_launch(time_case(gpu, &ds, full.clone(), "direct conv_thin".into(), 2e12, slow)?));
        }
        // 3x3 on cooperative matrices with the input staged once per channel chunk
        // (`kernels::conv_coop`).
        if conv_coop::supports(gpu, &conv) {
            let ds = w.0.iter().map(|w| conv_coop::run(gpu, &conv, &x, w, Some((&b, BiasLayout::default())), &y, false)).collect::<Result<Vec<_>>>()?;
            emit(w.per_launch(time_case(gpu, &ds, full.clone(), "coop conv_coop".into(), 2e12, slow)?));
        }
    }
    // The same convolutions by Winograd F(2x2, 3x3) where the channels allow: the input
    // transform, the product batched over the 16 positions and the output transform, timed
    // together, and for weights the models keep untransformed (over WINOGRAD_KEEP_MAX channel
    // pairs) once more with the weight transform before them, as the models run them.
    // TFLOP/s are the direct convolution's flops over that time, so the rows compare with
    // conv3x3_'s; with `all_tiles` the product also on every coop tile.
    for &(name, batch, size, cin, cout) in CONV_CASES.iter() {
        let full = format!("winograd3x3_{name}");
        if !wanted(&full) || !Winograd::supports(cin, cout) || (slow && batch * size * size * cout * 4 * cin > 1 << 31) {
            continue;
        }
        let wc = Winograd::new(batch, size, size, cin, cout)?;
        let x = random_f16(gpu, &[batch, size, size, cin], 5, "bench winograd x")?;
        let u = Weights::new(gpu, &[16, cout, cin], 6, "bench winograd u", cold)?;
        let b = random_f16(gpu, &[cout], 7, "bench winograd b")?;
        let y = Tensor::empty(gpu, &[batch, size, size, cout], DType::F16, "bench winograd y")?;
        let v = Tensor::empty(gpu, &wc.v_shape(), DType::F16, "bench winograd V")?;
        let m = Tensor::empty(gpu, &wc.m_shape(), DType::F32, "bench winograd M")?;
        let made = match cin * cout > WINOGRAD_KEEP_MAX {
            true => Some((Weights::new(gpu, &[cout, 3, 3, cin], 6, "bench winograd w", cold)?, Tensor::empty(gpu, &[16, cout, cin], DType::F16, "bench winograd U")?)),
            false => None,
        };
        // `c` once per tensor of `ws`: each a kept U, or (`made`) a weight transformed into
        // `made` before the convolution.
        let time = |c: &Winograd, ws: &Weights, made: Option<&Tensor>| -> Result<BenchResult> {
            let mut ds = Vec::new();
            for t in &ws.0 {
                let mut rec = Recorder::capture(gpu);
                if let Some(u) = made {
                    rec.run(&c.weight(gpu, t, u)?)?;
                }
                c.run(gpu, &mut rec, &x, made.unwrap_or(t), Some((&b, BiasLayout::default())), &y, false, &v, &m)?;
                ds.extend(rec.into_dispatches());
            }
            let (what, product) = if made.is_some() { ("U made each time, ", &ds[2]) } else { ("", &ds[1]) };
            let label = format!("{} winograd, {what}{}", c.product().plan(gpu).0, product.label);
            let mut r = ws.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?);
            r.tflops = c.direct_flops() / (r.ms * 1e-3) / 1e12;
            Ok(r)
        };
        for &path in paths {
            let tiles: &[CoopTile] = if all_tiles && path == KernelPath::Coop { &CoopTile::ALL } else { &[] };
            for tile in std::iter::once(None).chain(tiles.iter().map(|&t| Some(t))) {
                let c = Winograd { path: Some(path), tile, ..wc };
                emit(time(&c, &u, None)?);
                if let Some((w, u_made)) = made.as_ref().filter(|_| tile.is_none()) {
                    emit(time(&c, w, Some(u_made))?);
                }
            }
        }
    }
    // The upsamplers (nearest 2x, then a 3x3 convolution) as the four phase
    // convolutions of the small image, and as the upsample launch and the direct convolution
    // of the 2x image they replace. TFLOP/s are the direct convolution's flops over the time.
    for &(name, batch, size, c) in UPSAMPLE_CASES.iter() {
        let full = format!("upsample3x3_{name}");
        if !wanted(&full) || (slow && batch * size * size * c * 16 * c > 1 << 31) {
            continue;
        }
        let up = Upsample2xConv::new(batch, size, size, c, c);
        let x = random_f16(gpu, &[batch, size, size, c], 5, "bench upsample x")?;
        let wp = Weights::new(gpu, &[4, c, 2, 2, c], 6, "bench upsample phase w", cold)?;
        let w = Weights::new(gpu, &[c, 3, 3, c], 6, "bench upsample w", cold)?;
        let b = random_f16(gpu, &[c], 7, "bench upsample b")?;
        let big = Tensor::empty(gpu, &[batch, 2 * size, 2 * size, c], DType::F16, "bench upsampled")?;
        let y = Tensor::empty(gpu, &[batch, 2 * size, 2 * size, c], DType::F16, "bench upsample y")?;
        for &path in paths {
            let tiles: &[CoopTile] = if all_tiles && path == KernelPath::Coop { &CoopTile::ALL } else { &[] };
            for tile in std::iter::once(None).chain(tiles.iter().map(|&t| Some(t))) {
                let mm = Upsample2xConv { path: Some(path), tile, ..up }.matmul()?;
                let ds = recorded_each(gpu, &mm, &x, &wp, Some(&b), &y)?;
                let label = format!("{path} phases {}", ds[0].label);
                let mut r = wp.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?);
                r.tflops = up.direct_flops() / (r.ms * 1e-3) / 1e12;
                emit(r);
            }
            let conv = Conv2d { path: Some(path), ..Conv2d::new(batch, 2 * size, 2 * size, c, c, 3, 1, 1) };
            let mut ds = Vec::new();
            for t in &w.0 {
                ds.push(tensor_ops::upsample2x(gpu, &x, &big, batch, size, size, c)?);
                ds.extend(recorded(gpu, &conv.matmul()?, &big, t, Some(&b), &y)?);
            }
            let label = format!("{path} upsample + direct {}", ds[1].label);
            let mut r = w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?);
            r.tflops = up.direct_flops() / (r.ms * 1e-3) / 1e12;
            emit(r);
        }
        // The phases on the staged cooperative-matrix kernel (`kernels::conv_coop`).
        if conv_coop::supports_phases(gpu, &up) {
            let ds = wp.0.iter().map(|t| conv_coop::run_phases(gpu, &up, &x, t, Some(&b), &y)).collect::<Result<Vec<_>>>()?;
            let mut r = wp.per_launch(time_case(gpu, &ds, full.clone(), "coop phases conv_coop".into(), 2e12, slow)?);
            r.tflops = up.direct_flops() / (r.ms * 1e-3) / 1e12;
            emit(r);
        }
    }
    // Convolutions' dX, the forward weight read through the flipped B_FLIP remap, as the
    // training step records it (split over K where the launcher splits).
    for &(name, batch, size, cin, cout, stride) in CONV_DX_CASES.iter() {
        let full = format!("conv3x3_dx_{name}");
        let conv = Conv2d::new(batch, size, size, cin, cout, 3, stride, 1);
        let (oh, ow) = conv.out_hw();
        if !wanted(&full) || (slow && batch * oh * ow * cout * 9 * cin > 1 << 31) {
            continue;
        }
        let dy = random_f16(gpu, &[batch, oh, ow, cout], 5, "bench conv dy")?;
        let w = Weights::new(gpu, &[cout, 3, 3, cin], 6, "bench conv w", cold)?;
        let dx = Tensor::empty(gpu, &[batch, size, size, cin], DType::F16, "bench conv dx")?;
        for &path in paths {
            let mut conv = conv;
            conv.path = Some(path);
            let ds = recorded_each(gpu, &conv.backward_input()?, &dy, &w, None, &dx)?;
            let label = format!("{path} {}", ds[0].label);
            emit(w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?));
            // Every coop tile, unsplit (for tuning the launcher's tile rule).
            if all_tiles && path == KernelPath::Coop {
                for t in CoopTile::ALL {
                    let mm = Matmul { tile: Some(t), ..conv.backward_input()? };
                    for (label, ds) in unsplit_and_split(gpu, &mm, &dy, &w, None, &dx)? {
                        emit(w.per_launch(time_case(gpu, &ds, full.clone(), label, 2e12, slow)?));
                    }
                }
            }
        }
    }
    Ok(())
}
