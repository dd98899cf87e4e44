//! Op tests for the direct convolution to at most 4 channels (`kernels::conv_thin`, the VAE
//! decoder's conv_out) against the f64 reference: 1 to 4 output channels, 3x3 and 1x1,
//! batches, images smaller than a tile and images whose last tile row or column is partial,
//! channel counts that end on a half chunk (8 of 16), with and without bias, and the
//! launcher's choice. Outputs are NaN-poisoned first.

mod common;

use atelier::gpu::{DType, Recorder, Tensor};
use atelier::kernels::conv::{conv_weight_to_nhwc, Conv2d};
use atelier::kernels::conv_thin;
use common::{conv_reference, gpu, random, rel_l2, round_f16, seed, POISON};

/// Inputs and weights are exact f16 values, products are summed in f32 over K = ks²·cin ≤
/// 9·256 and the result is rounded once to f16 (~3e-4 RMS): the direct convolution's bound
/// (tests/conv.rs). A wrong tap, channel, padding or output slot is off by O(1).
const BOUND: f64 = 1e-3;

fn run(c: Conv2d, with_bias: bool) {
    let g = gpu();
    let what = format!("thin conv {c:?} bias {with_bias}");
    let s = seed(&what);
    let x = round_f16(&random(c.batch * c.h * c.w * c.cin, s));
    let w = round_f16(&random(c.cout * c.cin * c.ks * c.ks, s ^ 1));
    let bias = round_f16(&random(c.cout, s ^ 2));
    let tx = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], DType::F16, &x, "x").unwrap();
    let tw = Tensor::from_f32(g, &[c.cout, c.ks, c.ks, c.cin], DType::F16, &conv_weight_to_nhwc(&w, c.cout, c.cin, c.ks, c.ks), "w").unwrap();
    let tb = Tensor::from_f32(g, &[c.cout], DType::F16, &bias, "bias").unwrap();
    let ty = Tensor::empty(g, &[c.batch, c.h, c.w, c.cout], DType::F16, "y").unwrap();
    ty.fill_words(g, POISON);
    let mut rec = Recorder::new(g);
    rec.run(&conv_thin::run(g, &c, &tx, &tw, with_bias.then_some(&tb), &ty).unwrap()).unwrap();
    rec.finish().unwrap();
    let r = conv_reference(&c, &x, &w, with_bias.then_some(&bias[..]));
    let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
    assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
}

#[test]
fn every_output_width() {
    for cout in 1..=4 {
        run(Conv2d::new(1, 6, 10, 16, cout, 3, 1, 1), true);
        run(Conv2d::new(2, 5, 6, 8, cout, 3, 1, 1), false); // odd height: a half tile row
    }
}

#[test]
fn kernel_sizes_chunks_and_tiles() {
    run(Conv2d::new(1, 7, 4, 24, 3, 1, 1, 0), true); // 1x1; 24 channels: a chunk and a half
    run(Conv2d::new(3, 4, 6, 256, 3, 3, 1, 1), true); // 16 chunks
    run(Conv2d::new(1, 3, 2, 120, 4, 3, 1, 1), false); // 7.5 chunks
    run(Conv2d::new(1, 5, 300, 32, 3, 3, 1, 1), true); // 3 tiles a row, the last of 44 pixels
    run(Conv2d::new(2, 3, 128, 16, 2, 3, 1, 1), true); // one tile a row exactly
}

#[test]
fn vae_conv_out_shape() {
    // The decoder's conv_out (128 -> 3) at a 256x256 image; its 512x512 run has 4x the rows.
    let c = Conv2d::new(1, 256, 256, 128, 3, 3, 1, 1);
    assert!(conv_thin::preferred(&c), "the launcher should take the thin kernel at {c:?}");
    run(c, true);
}

#[test]
fn launcher_choice() {
    // The UNet's conv_out (320 -> 4 at 64x64 latents) runs here at batch 2, not at batch 1
    // (too few pixels to fill a large GPU).
    assert!(conv_thin::preferred(&Conv2d::new(2, 64, 64, 320, 4, 3, 1, 1)));
    assert!(!conv_thin::preferred(&Conv2d::new(1, 64, 64, 320, 4, 3, 1, 1)));
    // Strided, more than 4 channels, channels not a multiple of 8, an odd width, 5x5, not
    // "same" padding.
    assert!(!conv_thin::supports(&Conv2d::new(1, 512, 512, 128, 3, 3, 2, 1)));
    assert!(!conv_thin::supports(&Conv2d::new(1, 512, 512, 128, 8, 3, 1, 1)));
    assert!(!conv_thin::supports(&Conv2d::new(1, 512, 512, 12, 3, 3, 1, 1)));
    assert!(!conv_thin::supports(&Conv2d::new(1, 4, 3, 8, 3, 3, 1, 1)));
    assert!(!conv_thin::supports(&Conv2d::new(1, 8, 8, 8, 3, 5, 1, 2)));
    assert!(!conv_thin::supports(&Conv2d::new(1, 8, 8, 8, 3, 3, 1, 0)));
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let c = Conv2d::new(1, 4, 4, 8, 3, 3, 1, 1);
    let x = Tensor::empty(g, &[1, 4, 4, 8], DType::F16, "x").unwrap();
    let w = Tensor::empty(g, &[3, 3, 3, 8], DType::F16, "w").unwrap();
    let y = Tensor::empty(g, &[1, 4, 4, 3], DType::F16, "y").unwrap();
    let wrong_w = Tensor::empty(g, &[3, 8, 3, 3], DType::F16, "w").unwrap();
    assert!(conv_thin::run(g, &c, &x, &wrong_w, None, &y).is_err());
    let y32 = Tensor::empty(g, &[1, 4, 4, 3], DType::F32, "y").unwrap();
    assert!(conv_thin::run(g, &c, &x, &w, None, &y32).is_err());
    assert!(conv_thin::run(g, &Conv2d::new(1, 4, 4, 8, 3, 3, 2, 1), &x, &w, None, &y).is_err());
    assert!(conv_thin::run(g, &c, &x, &w, None, &y).is_ok());
}
