//! Op tests for the convolution input gradient dX (`Conv2d::backward_input`: an implicit GEMM
//! on the matmul shaders reading the forward weight through the flipped B_FLIP remap, with the
//! CONV gather at stride 1 and the CONV_T gather at stride 2, a plain product for 1x1) against
//! an f64 CPU reference in scatter form, itself checked against central finite differences of
//! the CPU forward. Every path the device has; odd sizes (stride 2 with odd inputs, where the
//! last row and column of dX get fewer taps), channel counts that are and are not multiples of
//! 8 on either side (the gather's and the weight's vector loads fall back one by one), K not a
//! multiple of the K tiles, N over one tile, odd cin with f16 output, f32 output, splits over
//! K, accumulation, and real SD-1.5 shapes. Outputs are NaN-poisoned first.

mod common;

use atelier::gpu::{DType, Recorder, Tensor};
use atelier::kernels::conv::{conv_weight_to_nhwc, Conv2d};
use common::{conv_reference, gpu, paths, random, rel_l2, round_f16, seed, POISON};

/// Inputs are exact f16 values, products are accumulated in f32 over K = ks²·cout ≤ 2880 and
/// the result is rounded once to f16 (~3e-4 relative, RMS): 1e-3 is that with margin, as for
/// the forward. A wrong tap, flip, parity or channel order is off by O(1).
const BOUND: f64 = 1e-3;

/// dX [b, h, w, cin] for dY [b, oh, ow, cout] in scatter form: every forward tap sends
/// dY·W back to the input pixel it read, in f64.
fn reference(c: &Conv2d, dy: &[f32], w: &[f32]) -> Vec<f64> {
    let (oh, ow) = c.out_hw();
    let mut dx = vec![0.0; c.batch * c.h * c.w * c.cin];
    for b in 0..c.batch {
        for oy in 0..oh {
            for ox in 0..ow {
                for ky in 0..c.ks {
                    for kx in 0..c.ks {
                        let iy = (oy * c.stride + ky) as isize - c.pad as isize;
                        let ix = (ox * c.stride + kx) as isize - c.pad as isize;
                        if iy < 0 || ix < 0 || iy >= c.h as isize || ix >= c.w as isize {
                            continue;
                        }
                        let xb = ((b * c.h + iy as usize) * c.w + ix as usize) * c.cin;
                        for o in 0..c.cout {
                            let g = dy[((b * oh + oy) * ow + ox) * c.cout + o] as f64;
                            for i in 0..c.cin {
                                dx[xb + i] += g * w[((o * c.cin + i) * c.ks + ky) * c.ks + kx] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// Runs dX on every path (accumulating onto `dx0` when given) and checks it.
fn run_with(c: Conv2d, out: DType, dx0: bool) {
    let g = gpu();
    for path in paths() {
        let what = format!("conv dX {c:?} out {out} accumulate {dx0} on {path}");
        let s = seed(&what);
        let (oh, ow) = c.out_hw();
        let dy = round_f16(&random(c.batch * oh * ow * c.cout, s));
        let w = round_f16(&random(c.cout * c.cin * c.ks * c.ks, s ^ 1));
        let base = round_f16(&random(c.batch * c.h * c.w * c.cin, s ^ 2));
        let tdy = Tensor::from_f32(g, &[c.batch, oh, ow, c.cout], DType::F16, &dy, "dy").unwrap();
        // The forward weight, in the layout the forward reads ([cout, ks, ks, cin]).
        let tw = Tensor::from_f32(g, &[c.cout, c.ks, c.ks, c.cin], DType::F16, &conv_weight_to_nhwc(&w, c.cout, c.cin, c.ks, c.ks), "w").unwrap();
        let tdx = if dx0 {
            Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], out, &base, "dx").unwrap()
        } else {
            let t = Tensor::empty(g, &[c.batch, c.h, c.w, c.cin], out, "dx").unwrap();
            t.fill_words(g, POISON);
            t
        };
        let mut conv = c;
        conv.path = Some(path);
        // Every gathered dX reads the forward weight through the remap (no flipped copy).
        let mm = conv.backward_input().unwrap();
        let is_1x1 = c.ks == 1 && c.stride == 1 && c.pad == 0;
        assert_eq!(mm.conv.is_some_and(|g| g.flip_b && !mm.trans_b), !is_1x1, "{what}: {mm:?}");
        let mut rec = Recorder::new(g);
        if dx0 {
            let mut mm = mm;
            mm.accumulate = true;
            mm.run(g, &mut rec, &tdy, &tw, None, &tdx).unwrap();
        } else {
            conv.run_backward_input(g, &mut rec, &tdy, &tw, &tdx).unwrap();
        }
        rec.finish().unwrap();
        let mut r = reference(&c, &dy, &w);
        if dx0 {
            r.iter_mut().zip(&base).for_each(|(a, &b)| *a += b as f64);
        }
        let e = rel_l2(&tdx.to_f32(g).unwrap(), &r);
        eprintln!("{what}: rel L2 {e:.3e}");
        assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
    }
}

fn run(c: Conv2d) {
    run_with(c, DType::F16, false);
}

#[test]
fn reference_matches_finite_differences() {
    // L(x) = Σ dY ⊙ conv(x) has dL/dx = dX; L is linear in x, so central differences in f64
    // are exact up to rounding (~1e-13 here): 1e-9 leaves room for that only.
    for c in [
        Conv2d::new(1, 5, 4, 3, 2, 3, 1, 1),
        Conv2d::new(2, 5, 5, 2, 3, 3, 2, 1), // odd size, stride 2
        Conv2d::new(1, 4, 6, 2, 2, 3, 2, 1), // even size, stride 2
        Conv2d::new(1, 3, 4, 3, 2, 1, 1, 0),
    ] {
        let s = seed(&format!("finite differences {c:?}"));
        let (oh, ow) = c.out_hw();
        let x: Vec<f64> = random(c.batch * c.h * c.w * c.cin, s).iter().map(|&v| v as f64).collect();
        let w = random(c.cout * c.cin * c.ks * c.ks, s ^ 1);
        let dy = random(c.batch * oh * ow * c.cout, s ^ 2);
        let loss = |x: &[f64]| conv_reference(&c, x, &w, None).iter().zip(&dy).map(|(a, &b)| a * b as f64).sum::<f64>();
        let r = reference(&c, &dy, &w);
        let eps = 1e-3;
        let mut worst: f64 = 0.0;
        for i in 0..x.len() {
            let mut xp = x.clone();
            xp[i] += eps;
            let mut xm = x.clone();
            xm[i] -= eps;
            let fd = (loss(&xp) - loss(&xm)) / (2.0 * eps);
            worst = worst.max((fd - r[i]).abs());
        }
        let scale = r.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(scale > 0.1 && worst < 1e-9 * scale.max(1.0), "{c:?}: reference vs finite differences {worst:.3e} (scale {scale:.3})");
    }
}

#[test]
fn dx3x3_stride1() {
    run(Conv2d::new(1, 5, 7, 8, 16, 3, 1, 1));
    run(Conv2d::new(2, 9, 6, 16, 24, 3, 1, 1));
    run_with(Conv2d::new(1, 4, 4, 32, 40, 3, 1, 1), DType::F32, false);
}

#[test]
fn dx3x3_stride2() {
    run(Conv2d::new(1, 9, 8, 32, 32, 3, 2, 1)); // odd height: the last dX row gets fewer taps
    run(Conv2d::new(1, 7, 7, 16, 24, 3, 2, 1)); // odd both ways
    run(Conv2d::new(2, 5, 9, 8, 8, 3, 2, 1));
    run(Conv2d::new(2, 8, 6, 24, 16, 3, 2, 1)); // even sizes
    run_with(Conv2d::new(1, 11, 5, 16, 8, 3, 2, 1), DType::F32, false);
}

#[test]
fn dx1x1() {
    run(Conv2d::new(1, 6, 6, 40, 20, 1, 1, 0));
    run(Conv2d::new(2, 3, 5, 8, 8, 1, 1, 0));
    run(Conv2d::new(1, 5, 5, 4, 4, 1, 1, 0));
    run(Conv2d::new(1, 3, 3, 3, 8, 1, 1, 0)); // odd cin (N) with f16 output
}

#[test]
fn channels_not_multiple_of_8_and_odd_cin() {
    // cout (dY's channels, the gather's) not a multiple of 8: element-wise gather.
    run(Conv2d::new(1, 7, 5, 16, 12, 3, 1, 1));
    run(Conv2d::new(1, 8, 8, 32, 3, 3, 1, 1)); // VAE decoder conv_out shape (cout 3)
    run(Conv2d::new(1, 7, 9, 8, 12, 3, 2, 1)); // stride 2, cout 12
    run(Conv2d::new(1, 7, 7, 4, 5, 3, 2, 1)); // stride 2, odd everything
    // cin (N) odd or not a multiple of 8, f16 output: the launcher's padded scratch.
    run(Conv2d::new(1, 8, 8, 4, 32, 3, 1, 1)); // UNet conv_in (4 latent channels)
    run(Conv2d::new(1, 8, 8, 3, 16, 3, 1, 1)); // RGB input
    run(Conv2d::new(1, 9, 7, 3, 16, 3, 2, 1));
}

#[test]
fn weight_remap_edges() {
    // cin (N, the remapped B's row length) even but not a multiple of 8: B's rows start at
    // multiples of cin, so the weight's 16-byte loads fall back to element reads while the
    // gather (cout % 8 == 0) stays vectorised; f16 and f32 output.
    run(Conv2d::new(1, 6, 7, 12, 16, 3, 1, 1));
    run_with(Conv2d::new(1, 6, 5, 20, 8, 3, 1, 1), DType::F32, false);
    run(Conv2d::new(1, 7, 8, 12, 24, 3, 2, 1));
    // cout (dY's channels) not a multiple of 8 with cin a multiple of 8: K = 9·cout is no
    // multiple of 8, 16 or 32, so the last K tile is partial and the flip crosses output
    // channels mid-group; the weight's vector loads stay on.
    run(Conv2d::new(1, 6, 6, 16, 20, 3, 1, 1)); // K = 180
    run(Conv2d::new(1, 7, 6, 24, 6, 3, 2, 1)); // K = 54, stride 2
    run(Conv2d::new(1, 5, 5, 8, 1, 3, 1, 1)); // K = 9, under one tile
    // Neither a multiple of 8, odd cin with f16 output (padded scratch).
    run(Conv2d::new(1, 6, 5, 7, 10, 3, 1, 1));
    run(Conv2d::new(2, 5, 7, 5, 9, 3, 2, 1));
    // N over one 128-wide tile, not a multiple of 8 or of the tile: a partial last column tile.
    run(Conv2d::new(1, 5, 4, 140, 24, 3, 1, 1));
    run(Conv2d::new(1, 5, 5, 136, 12, 3, 2, 1));
    // A 1x1 convolution with stride 2 has no plain-product form: the remap with ks = 1.
    run(Conv2d::new(1, 7, 6, 16, 12, 1, 2, 0));
}

#[test]
fn split_over_k_and_accumulate() {
    for s in [2, 3, 4] {
        let mut c = Conv2d::new(2, 6, 5, 24, 32, 3, 1, 1);
        c.split_k = Some(s);
        run(c);
        run_with(c, DType::F32, false);
        let mut c = Conv2d::new(1, 7, 6, 16, 32, 3, 2, 1);
        c.split_k = Some(s);
        run(c);
    }
    // Slices that start mid-tap and are no multiple of the K tiles: cout 40, K 360 in 5 slices
    // of 72 (the remap's k restarts at each slice's kbase).
    let mut c = Conv2d::new(1, 6, 6, 24, 40, 3, 1, 1);
    c.split_k = Some(5);
    run(c);
    let mut c = Conv2d::new(1, 7, 7, 16, 40, 3, 2, 1);
    c.split_k = Some(5);
    run_with(c, DType::F32, false);
    // dX added onto a stream (+=), with and without a split, f16 and f32.
    for s in [None, Some(3)] {
        let mut c = Conv2d::new(1, 5, 6, 16, 24, 3, 1, 1);
        c.split_k = s;
        run_with(c, DType::F16, true);
        let mut c = Conv2d::new(1, 7, 5, 8, 16, 3, 2, 1);
        c.split_k = s;
        run_with(c, DType::F32, true);
    }
}

#[test]
fn sd_shape_16x16x320() {
    // UNet down block 3 level (16x16 latent at 512 px is 64x64; this is 128 px): 472 MFLOP.
    run(Conv2d::new(1, 16, 16, 320, 320, 3, 1, 1));
}

#[test]
fn sd_shape_downsample_64x64_stride2() {
    // A downsampler 64x64 -> 32x32 (64 channels): dX 64x64x64, K = 9·64.
    run(Conv2d::new(1, 64, 64, 64, 64, 3, 2, 1));
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let c = Conv2d::new(1, 4, 4, 8, 16, 3, 2, 1);
    let dy = Tensor::empty(g, &[1, 2, 2, 16], DType::F16, "dy").unwrap();
    let w = Tensor::empty(g, &[16, 3, 3, 8], DType::F16, "w").unwrap();
    let dx = Tensor::empty(g, &[1, 4, 4, 8], DType::F16, "dx").unwrap();
    let mut rec = Recorder::new(g);
    assert!(c.run_backward_input(g, &mut rec, &dy, &w, &dx).is_ok());
    // The (former) flipped weight's layout, a dY of the wrong size, a wrong dX, padding ≥
    // kernel size.
    let flipped_w = Tensor::empty(g, &[8, 3, 3, 16], DType::F16, "w_dx").unwrap();
    assert!(c.run_backward_input(g, &mut rec, &dy, &flipped_w, &dx).is_err());
    let big_dy = Tensor::empty(g, &[1, 4, 4, 16], DType::F16, "dy").unwrap();
    assert!(c.run_backward_input(g, &mut rec, &big_dy, &w, &dx).is_err());
    let small_dx = Tensor::empty(g, &[1, 3, 3, 8], DType::F16, "dx").unwrap();
    assert!(c.run_backward_input(g, &mut rec, &dy, &w, &small_dx).is_err());
    assert!(Conv2d::new(1, 4, 4, 8, 8, 3, 1, 3).backward_input().is_err());
    assert!(Conv2d::new(1, 4, 4, 8, 8, 3, 0, 1).backward_input().is_err());
    // The product itself: the remap only without TRANS_B, a plain conv only with it, and a
    // weight that holds all cout·ks·ks·cin values.
    let mm = c.backward_input().unwrap();
    assert!(mm.run(g, &mut rec, &dy, &w, None, &dx).is_ok());
    let mut bad = mm.clone();
    bad.trans_b = true;
    assert!(bad.run(g, &mut rec, &dy, &w, None, &dx).is_err(), "B_FLIP with TRANS_B");
    let mut bad = mm.clone();
    bad.conv.as_mut().unwrap().flip_b = false;
    assert!(bad.run(g, &mut rec, &dy, &w, None, &dx).is_err(), "a convolution with B not transposed, no remap");
    let short_w = Tensor::empty(g, &[16 * 3 * 3 * 8 - 1], DType::F16, "w").unwrap();
    assert!(mm.run(g, &mut rec, &dy, &short_w, None, &dx).is_err(), "a weight one value short");
    rec.finish().unwrap();
}
