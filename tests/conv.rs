//! Op tests for the convolution (implicit GEMM on the matmul shaders, override CONV) against
//! an f64 CPU reference over NHWC images, on every path the device has: 3x3 stride 1 and 2,
//! 1x1, channel counts that are and are not multiples of 8, odd sizes, odd cout with f16
//! output, bias, f32 output, splits over K, every coop tile, and real SD-1.5 shapes. Outputs
//! are NaN-poisoned first.

mod common;

use atelier::gpu::{DType, KernelPath, Recorder, Tensor};
use atelier::kernels::conv::{conv_weight_to_nhwc, Conv2d};
use atelier::kernels::matmul::{BiasLayout, CoopTile};
use common::{conv_reference as reference, gpu, paths, random, rel_l2, round_f16, seed, POISON};

/// Inputs are exact f16 values, products are accumulated in f32 over K ≤ 2880 and the result
/// is rounded once to f16 (~3e-4 relative, RMS): 1e-3 is that with margin, no more. A wrong
/// tap, channel or padding rule is off by O(1).
const BOUND: f64 = 1e-3;

fn run(c: Conv2d, with_bias: bool, out: DType) {
    let g = gpu();
    // A forced tile runs on the coop path only.
    let paths = match c.tile {
        Some(_) => paths().into_iter().filter(|&p| p == KernelPath::Coop).collect(),
        None => paths(),
    };
    for path in paths {
        let what = format!("conv {c:?} bias {with_bias} out {out} on {path}");
        let s = seed(&what);
        let x = round_f16(&random(c.batch * c.h * c.w * c.cin, s));
        let w = round_f16(&random(c.cout * c.cin * c.ks * c.ks, s ^ 1));
        let bias = round_f16(&random(c.cout, s ^ 2));
        let (oh, ow) = c.out_hw();
        let tx = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], DType::F16, &x, "x").unwrap();
        let wn = conv_weight_to_nhwc(&w, c.cout, c.cin, c.ks, c.ks);
        let tw = Tensor::from_f32(g, &[c.cout, c.ks, c.ks, c.cin], DType::F16, &wn, "w").unwrap();
        let tb = Tensor::from_f32(g, &[c.cout], DType::F16, &bias, "bias").unwrap();
        let ty = Tensor::empty(g, &[c.batch, oh, ow, c.cout], out, "y").unwrap();
        ty.fill_words(g, POISON);
        let mut conv = c;
        conv.path = Some(path);
        let mut rec = Recorder::new(g);
        conv.run(g, &mut rec, &tx, &tw, with_bias.then_some(&tb), &ty).unwrap();
        rec.finish().unwrap();
        let r = reference(&c, &x, &w, with_bias.then_some(&bias[..]));
        let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
        assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
    }
}

#[test]
fn conv3x3_stride1() {
    run(Conv2d::new(1, 5, 7, 8, 16, 3, 1, 1), true, DType::F16);
    run(Conv2d::new(2, 9, 6, 16, 24, 3, 1, 1), false, DType::F16);
    run(Conv2d::new(1, 4, 4, 32, 40, 3, 1, 1), true, DType::F32);
}

#[test]
fn conv3x3_stride2_downsample() {
    run(Conv2d::new(1, 9, 8, 32, 32, 3, 2, 1), true, DType::F16); // odd height
    run(Conv2d::new(2, 16, 16, 64, 64, 3, 2, 1), true, DType::F16);
}

#[test]
fn conv1x1() {
    run(Conv2d::new(1, 6, 6, 40, 20, 1, 1, 0), true, DType::F16);
    run(Conv2d::new(2, 3, 5, 8, 8, 1, 1, 0), false, DType::F16);
}

#[test]
fn channels_not_multiple_of_8_and_odd_cout() {
    run(Conv2d::new(1, 8, 8, 4, 32, 3, 1, 1), true, DType::F16); // UNet conv_in (4 latent channels)
    run(Conv2d::new(1, 8, 8, 3, 16, 3, 1, 1), true, DType::F16); // VAE encoder conv_in (RGB)
    run(Conv2d::new(1, 8, 8, 32, 3, 3, 1, 1), true, DType::F16); // VAE decoder conv_out: odd cout
    run(Conv2d::new(1, 5, 5, 4, 4, 1, 1, 0), true, DType::F16); // post_quant_conv
}

#[test]
fn sd_shape_64x64x320() {
    run(Conv2d::new(1, 64, 64, 320, 320, 3, 1, 1), true, DType::F16);
}

#[test]
fn every_coop_tile() {
    // Each tile of the cooperative-matrix kernel (the launcher picks among them by shape): the
    // split gather (row half before the K loop, column half per step) for BK 16, 32 and 64,
    // partial tiles, stride 2, channels not a multiple of 8 (the general gather).
    for t in CoopTile::ALL {
        for c in [Conv2d::new(1, 12, 11, 32, 40, 3, 1, 1), Conv2d::new(2, 13, 12, 16, 24, 3, 2, 1), Conv2d::new(1, 8, 8, 4, 32, 3, 1, 1)] {
            run(Conv2d { tile: Some(t), ..c }, true, DType::F16);
        }
    }
}

#[test]
fn few_output_channels() {
    // The VAE's conv_out (3 channels: odd, through the launcher's scratch) and the encoder's (8),
    // with the launcher's tile and with the 128x32 THIN tile it gives them at full size.
    for cout in [3, 8] {
        let c = Conv2d::new(1, 20, 18, 32, cout, 3, 1, 1);
        run(c, true, DType::F16);
        run(Conv2d { tile: Some(CoopTile::THIN), ..c }, true, DType::F16);
    }
}

#[test]
fn split_over_k() {
    // Forced splits (the launcher splits long-K convolutions with few tiles, e.g. the UNet's
    // 8x8 and 16x16 levels): slices of whole and of partial pixels, stride 2, f32 output.
    for s in [2, 3, 4] {
        let mut c = Conv2d::new(2, 6, 5, 32, 24, 3, 1, 1);
        c.split_k = Some(s);
        run(c, true, DType::F16);
        run(c, false, DType::F32);
        let mut c = Conv2d::new(1, 7, 6, 32, 16, 3, 2, 1);
        c.split_k = Some(s);
        run(c, true, DType::F16);
    }
    // The real shape the UNet splits most (8x8x1280, batch 2, K = 11520 in 16 slices), and the
    // partials summed onto C (accumulate), as the resnets' conv2 adds onto the shortcut.
    let mut c = Conv2d::new(2, 8, 8, 1280, 1280, 3, 1, 1);
    c.split_k = Some(16);
    run(c, true, DType::F16);
    let g = gpu();
    for path in paths() {
        let c = Conv2d::new(1, 4, 6, 16, 8, 3, 1, 1);
        let what = format!("split accumulate on {path}");
        let sd = seed(&what);
        let x = round_f16(&random(4 * 6 * 16, sd));
        let w = round_f16(&random(8 * 16 * 9, sd ^ 1));
        let bias = round_f16(&random(8, sd ^ 2));
        let y0 = round_f16(&random(4 * 6 * 8, sd ^ 3));
        let tx = Tensor::from_f32(g, &[1, 4, 6, 16], DType::F16, &x, "x").unwrap();
        let tw = Tensor::from_f32(g, &[8, 3, 3, 16], DType::F16, &conv_weight_to_nhwc(&w, 8, 16, 3, 3), "w").unwrap();
        let tb = Tensor::from_f32(g, &[8], DType::F16, &bias, "bias").unwrap();
        let ty = Tensor::from_f32(g, &[1, 4, 6, 8], DType::F16, &y0, "y").unwrap();
        let mut mm = c.matmul().unwrap();
        mm.path = Some(path);
        mm.split_k = Some(3);
        mm.accumulate = true;
        let mut rec = Recorder::new(g);
        mm.run(g, &mut rec, &tx, &tw, Some(&tb), &ty).unwrap();
        rec.finish().unwrap();
        let r: Vec<f64> = reference(&c, &x, &w, Some(&bias)).iter().zip(&y0).map(|(a, &b)| a + b as f64).collect();
        let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
        assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
    }
}

#[test]
fn per_image_bias() {
    // A bias row per image (the UNet's resnets: conv1's bias plus the image's time embedding,
    // read from one [batch, all resnets' channels] matrix at the resnet's column offset), on
    // the plain epilogue, a forced coop tile, and a split over K (its sum reads the bias).
    let g = gpu();
    let (ld, off) = (40, 16);
    for (c, split, tile) in [
        (Conv2d::new(3, 5, 6, 16, 24, 3, 1, 1), None, None),
        (Conv2d::new(3, 5, 6, 16, 24, 3, 1, 1), Some(3), None),
        (Conv2d::new(2, 9, 7, 32, 24, 3, 2, 1), None, Some(CoopTile::THIN)),
    ] {
        for path in paths() {
            if tile.is_some() && path != KernelPath::Coop {
                continue;
            }
            let what = format!("per-image bias {c:?} split {split:?} tile {tile:?} on {path}");
            let sd = seed(&what);
            let (oh, ow) = c.out_hw();
            let x = round_f16(&random(c.batch * c.h * c.w * c.cin, sd));
            let w = round_f16(&random(c.cout * c.cin * 9, sd ^ 1));
            let bias = round_f16(&random(off + c.batch * ld, sd ^ 2));
            let tx = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], DType::F16, &x, "x").unwrap();
            let tw = Tensor::from_f32(g, &[c.cout, 3, 3, c.cin], DType::F16, &conv_weight_to_nhwc(&w, c.cout, c.cin, 3, 3), "w").unwrap();
            let tb = Tensor::from_f32(g, &[bias.len()], DType::F16, &bias, "bias").unwrap();
            let ty = Tensor::empty(g, &[c.batch, oh, ow, c.cout], DType::F16, "y").unwrap();
            ty.fill_words(g, POISON);
            let mut mm = c.matmul().unwrap();
            mm.path = Some(path);
            mm.split_k = split;
            mm.tile = tile;
            mm.bias_layout = BiasLayout { off, rows: oh * ow, ld };
            let mut rec = Recorder::new(g);
            mm.run(g, &mut rec, &tx, &tw, Some(&tb), &ty).unwrap();
            rec.finish().unwrap();
            let mut r = reference(&c, &x, &w, None);
            for (i, v) in r.iter_mut().enumerate() {
                let (row, o) = (i / c.cout, i % c.cout);
                *v += bias[off + row / (oh * ow) * ld + o] as f64;
            }
            let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
            assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
            // One row short of the last image's bias is refused, not read past.
            let short = Tensor::empty(g, &[off + (c.batch - 1) * ld + c.cout - 1], DType::F16, "short bias").unwrap();
            assert!(mm.run(g, &mut Recorder::new(g), &tx, &tw, Some(&short), &ty).is_err(), "{what}: short bias accepted");
        }
    }
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = Tensor::empty(g, &[1, 4, 4, 8], DType::F16, "x").unwrap();
    let w = Tensor::empty(g, &[8, 3, 3, 8], DType::F16, "w").unwrap();
    let y = Tensor::empty(g, &[1, 4, 4, 8], DType::F16, "y").unwrap();
    let mut rec = Recorder::new(g);
    // Wrong cin in the weight, wrong output size, a kernel larger than the padded image.
    let wrong_w = Tensor::empty(g, &[8, 3, 3, 4], DType::F16, "w").unwrap();
    assert!(Conv2d::new(1, 4, 4, 8, 8, 3, 1, 1).run(g, &mut rec, &x, &wrong_w, None, &y).is_err());
    assert!(Conv2d::new(1, 4, 4, 8, 8, 3, 2, 1).run(g, &mut rec, &x, &w, None, &y).is_err());
    assert!(Conv2d::new(1, 2, 2, 8, 8, 5, 1, 0).matmul().is_err());
    assert!(Conv2d::new(1, 4, 4, 8, 8, 3, 0, 1).matmul().is_err());
}
