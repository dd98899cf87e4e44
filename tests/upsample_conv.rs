//! Op tests for the nearest-2x-upsample-then-3x3-convolution as four phase convolutions of the
//! small image (`Upsample2xConv`, override PHASES), against the f64 reference of the two steps
//! it replaces (upsample, then the 3x3 convolution with the original weight), on every path
//! the device has: odd sizes, batches, channels that are and are not multiples of 8, with and
//! without bias, every coop tile, a VAE decoder shape; and the same phases on the staged
//! cooperative-matrix kernel (`kernels::conv_coop`). Outputs are NaN-poisoned first.

mod common;

use atelier::gpu::{DType, KernelPath, Recorder, Tensor};
use atelier::kernels::conv::{upsample_conv_weight, Conv2d, Upsample2xConv};
use atelier::kernels::conv_coop;
use atelier::kernels::matmul::CoopTile;
use common::{conv_reference, gpu, paths, random, rel_l2, round_f16, seed, POISON};

/// Inputs are exact f16 values; each phase weight is a sum of up to four f16 weights rounded
/// once more to f16 (relative 2^-11 at most per weight, ~2e-4 RMS over the output), products
/// are accumulated in f32 over K ≤ 2048 and the result rounded once to f16 (~3e-4 RMS): the
/// direct convolution's 1e-3 bound (tests/conv.rs) still holds with margin. A wrong phase,
/// tap sum or output pixel is off by O(1).
const BOUND: f64 = 1e-3;

/// x [batch, h, w, cin] upsampled to [batch, 2h, 2w, cin], nearest.
fn upsample(x: &[f32], batch: usize, h: usize, w: usize, cin: usize) -> Vec<f32> {
    let mut out = vec![0.0; 4 * x.len()];
    for b in 0..batch {
        for y in 0..2 * h {
            for xx in 0..2 * w {
                let src = ((b * h + y / 2) * w + xx / 2) * cin;
                let dst = ((b * 2 * h + y) * 2 * w + xx) * cin;
                out[dst..dst + cin].copy_from_slice(&x[src..src + cin]);
            }
        }
    }
    out
}

fn run(c: Upsample2xConv, with_bias: bool) {
    let paths = match c.tile {
        Some(_) => paths().into_iter().filter(|&p| p == KernelPath::Coop).collect(),
        None => paths(),
    };
    for path in paths {
        check(c, with_bias, &format!("on {path}"), &|rec, x, w, b, y| Upsample2xConv { path: Some(path), ..c }.run(gpu(), rec, x, w, b, y).unwrap());
    }
}

/// Records a launch from (x, phase weight, bias, y).
type Record<'a> = dyn Fn(&mut Recorder, &Tensor, &Tensor, Option<&Tensor>, &Tensor) + 'a;

/// Runs `c` through `record` and compares with the reference.
fn check(c: Upsample2xConv, with_bias: bool, how: &str, record: &Record<'_>) {
    let g = gpu();
    let what = format!("upsample conv {c:?} bias {with_bias} {how}");
    let s = seed(&what);
    let x = round_f16(&random(c.batch * c.h * c.w * c.cin, s));
    let w = round_f16(&random(c.cout * c.cin * 9, s ^ 1));
    let bias = round_f16(&random(c.cout, s ^ 2));
    let tx = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], DType::F16, &x, "x").unwrap();
    let tw = Tensor::from_f32(g, &[4, c.cout, 2, 2, c.cin], DType::F16, &upsample_conv_weight(&w, c.cout, c.cin), "w").unwrap();
    let tb = Tensor::from_f32(g, &[c.cout], DType::F16, &bias, "bias").unwrap();
    let ty = Tensor::empty(g, &[c.batch, 2 * c.h, 2 * c.w, c.cout], DType::F16, "y").unwrap();
    ty.fill_words(g, POISON);
    let mut rec = Recorder::new(g);
    record(&mut rec, &tx, &tw, with_bias.then_some(&tb), &ty);
    rec.finish().unwrap();
    let big = Conv2d::new(c.batch, 2 * c.h, 2 * c.w, c.cin, c.cout, 3, 1, 1);
    let r = conv_reference(&big, &upsample(&x, c.batch, c.h, c.w, c.cin), &w, with_bias.then_some(&bias[..]));
    let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
    assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
}

#[test]
fn staged_coop_kernel() {
    // The phases on `kernels::conv_coop` (PHASES): every tile width, partial tile rows, two
    // channel tiles, batches, several chunks; the launcher's choice at the VAE's upsamplers.
    let g = gpu();
    if g.caps.path != KernelPath::Coop {
        assert!(!conv_coop::supports_phases(g, &Upsample2xConv::new(1, 8, 16, 16, 64)));
        return;
    }
    for (c, with_bias) in [
        (Upsample2xConv::new(1, 8, 16, 16, 64), true),
        (Upsample2xConv::new(2, 5, 32, 32, 128), true),
        (Upsample2xConv::new(1, 6, 64, 48, 64), false),
        (Upsample2xConv::new(3, 3, 48, 16, 64), true),
        (Upsample2xConv::new(1, 16, 16, 256, 256), true),
    ] {
        assert!(conv_coop::supports_phases(g, &c), "{c:?}");
        check(c, with_bias, "on conv_coop", &|rec, x, w, b, y| rec.run(&conv_coop::run_phases(g, &c, x, w, b, y).unwrap()).unwrap());
    }
    assert!(conv_coop::preferred_phases(g, &Upsample2xConv::new(1, 64, 64, 512, 512)));
    assert!(!conv_coop::supports_phases(g, &Upsample2xConv::new(1, 8, 8, 16, 64)), "width 8");
    assert!(!conv_coop::supports_phases(g, &Upsample2xConv::new(1, 16, 16, 16, 48)), "48 channels out");
}

#[test]
fn small_and_odd_sizes() {
    run(Upsample2xConv::new(1, 5, 7, 8, 16), true);
    run(Upsample2xConv::new(2, 4, 3, 16, 24), false);
    run(Upsample2xConv::new(3, 1, 1, 8, 8), true);
    run(Upsample2xConv::new(1, 9, 6, 32, 40), true);
}

#[test]
fn channels_not_multiple_of_8() {
    // The general gather (one value at a time).
    run(Upsample2xConv::new(1, 6, 5, 4, 8), true);
    run(Upsample2xConv::new(2, 3, 4, 12, 6), true);
}

#[test]
fn vae_decoder_shape() {
    // The decoder's last upsampler at a 128x128 image (its 512x512 run is 256 -> 256 at
    // 256x256; the channels and the tile rule's inputs as there, the size kept small).
    run(Upsample2xConv::new(1, 16, 16, 256, 256), true);
}

#[test]
fn every_coop_tile() {
    for t in CoopTile::ALL {
        for c in [Upsample2xConv::new(1, 12, 11, 32, 40), Upsample2xConv::new(2, 5, 6, 4, 16)] {
            run(Upsample2xConv { tile: Some(t), ..c }, true);
        }
    }
}

#[test]
fn weight_sums_are_the_taps_on_each_input_pixel() {
    // One input channel, one output channel, a 1x1 image: output pixel (a, b) of the 2x2
    // result sees the input pixel under the taps that stay inside the upsampled image.
    let w: Vec<f32> = (1..=9).map(|v| v as f32).collect(); // w[ky][kx] = 3ky + kx + 1
    let p = upsample_conv_weight(&w, 1, 1);
    // Phase (0, 0), tap (1, 1): rows 1, 2 and columns 1, 2 -> 5 + 6 + 8 + 9.
    assert_eq!(p[3], 28.0);
    // Phase (1, 1), tap (0, 0): rows 0, 1 and columns 0, 1 -> 1 + 2 + 4 + 5.
    assert_eq!(p[3 * 4], 12.0);
    // Phase (0, 1), tap (0, 1): row 0, columns 2 -> 3.
    assert_eq!(p[4 + 1], 3.0);
    // Every phase's taps together hold all nine weights once.
    for ph in 0..4 {
        assert_eq!(p[4 * ph..4 * ph + 4].iter().sum::<f32>(), 45.0, "phase {ph}");
    }
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = Tensor::empty(g, &[1, 4, 4, 8], DType::F16, "x").unwrap();
    let w = Tensor::empty(g, &[4, 8, 2, 2, 8], DType::F16, "w").unwrap();
    let y = Tensor::empty(g, &[1, 8, 8, 8], DType::F16, "y").unwrap();
    let mut rec = Recorder::new(g);
    let c = Upsample2xConv::new(1, 4, 4, 8, 8);
    // The 3x3 weight instead of the phase weights, the small image as output, f32 output,
    // an odd channel count.
    let w3 = Tensor::empty(g, &[8, 3, 3, 8], DType::F16, "w3").unwrap();
    assert!(c.run(g, &mut rec, &x, &w3, None, &y).is_err());
    assert!(c.run(g, &mut rec, &x, &w, None, &x).is_err());
    let y32 = Tensor::empty(g, &[1, 8, 8, 8], DType::F32, "y32").unwrap();
    assert!(c.run(g, &mut rec, &x, &w, None, &y32).is_err());
    assert!(Upsample2xConv::new(1, 4, 4, 8, 7).matmul().is_err());
    assert!(Upsample2xConv::new(1, 0, 4, 8, 8).matmul().is_err());
}
