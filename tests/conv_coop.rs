//! Op tests for the 3x3 convolution on cooperative matrices with the input staged once per
//! channel chunk (`kernels::conv_coop`) against the f64 reference: every tile width (16, 32,
//! 64), images whose last tile row is partial or smaller than a tile, several channel chunks
//! and output-channel tiles, batches, bias as one vector or a row per image, no bias, and
//! accumulation into y; the refusals (shapes it does not take, a device without the
//! cooperative-matrix path, bad tensors). Outputs are NaN-poisoned first (or, accumulating,
//! hold known values).

mod common;

use atelier::gpu::{DType, KernelPath, Recorder, Tensor};
use atelier::kernels::conv::{conv_weight_to_nhwc, Conv2d};
use atelier::kernels::conv_coop;
use atelier::kernels::matmul::BiasLayout;
use common::{conv_reference, gpu, random, rel_l2, round_f16, seed, POISON};

/// Inputs and weights are exact f16 values, products are summed in f32 over K = 9·cin ≤ 4608
/// and the result is rounded once to f16 (~3e-4 RMS): the direct convolution's bound
/// (tests/conv.rs). A wrong tap, channel, halo pixel or output slot is off by O(1).
const BOUND: f64 = 1e-3;

/// How the bias is given: none, one vector, or a row per image (ld apart, from off).
#[derive(Clone, Copy, Debug)]
enum Bias {
    None,
    Vector,
    PerImage { off: usize, ld: usize },
}

fn coop() -> bool {
    gpu().caps.path == KernelPath::Coop
}

fn run(c: Conv2d, bias: Bias, accumulate: bool) {
    let g = gpu();
    let what = format!("coop conv {c:?} bias {bias:?} accumulate {accumulate}");
    let s = seed(&what);
    assert!(conv_coop::supports(g, &c), "{what}: not supported");
    let x = round_f16(&random(c.batch * c.h * c.w * c.cin, s));
    let w = round_f16(&random(c.cout * c.cin * 9, s ^ 1));
    let (bias_len, layout) = match bias {
        Bias::None | Bias::Vector => (c.cout, BiasLayout::default()),
        Bias::PerImage { off, ld } => (off + c.batch * ld, BiasLayout { off, rows: c.h * c.w, ld }),
    };
    let b = round_f16(&random(bias_len, s ^ 2));
    let y0 = round_f16(&random(c.batch * c.h * c.w * c.cout, s ^ 3));
    let tx = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], DType::F16, &x, "x").unwrap();
    let tw = Tensor::from_f32(g, &[c.cout, 3, 3, c.cin], DType::F16, &conv_weight_to_nhwc(&w, c.cout, c.cin, 3, 3), "w").unwrap();
    let tb = Tensor::from_f32(g, &[bias_len], DType::F16, &b, "bias").unwrap();
    let ty = if accumulate {
        Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cout], DType::F16, &y0, "y").unwrap()
    } else {
        let t = Tensor::empty(g, &[c.batch, c.h, c.w, c.cout], DType::F16, "y").unwrap();
        t.fill_words(g, POISON);
        t
    };
    let tbias = match bias {
        Bias::None => None,
        _ => Some((&tb, layout)),
    };
    let mut rec = Recorder::new(g);
    rec.run(&conv_coop::run(g, &c, &tx, &tw, tbias, &ty, accumulate).unwrap()).unwrap();
    rec.finish().unwrap();
    let mut r = conv_reference(&c, &x, &w, None);
    let px = c.h * c.w;
    for (i, v) in r.iter_mut().enumerate() {
        let (pixel, o) = (i / c.cout, i % c.cout);
        *v += match bias {
            Bias::None => 0.0,
            Bias::Vector => b[o] as f64,
            Bias::PerImage { off, ld } => b[off + pixel / px * ld + o] as f64,
        };
        if accumulate {
            *v += y0[i] as f64;
        }
    }
    let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
    assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
}

#[test]
fn tile_widths_and_partial_tiles() {
    if !coop() {
        eprintln!("no cooperative-matrix path on this device: the refusal is tested in not_without_coop");
        return;
    }
    run(Conv2d::new(1, 8, 16, 16, 64, 3, 1, 1), Bias::Vector, false); // TW 16: half a tile of rows
    run(Conv2d::new(2, 5, 32, 32, 128, 3, 1, 1), Bias::Vector, false); // TW 32, 2 channel tiles
    run(Conv2d::new(1, 9, 64, 48, 64, 3, 1, 1), Bias::None, false); // TW 64: 3 tile rows, the last 1 of 4
    run(Conv2d::new(3, 20, 48, 16, 64, 3, 1, 1), Bias::Vector, false); // 48 wide: TW 16, 3 tiles a row
    run(Conv2d::new(1, 1, 96, 32, 192, 3, 1, 1), Bias::Vector, false); // one image row: TW 32
}

#[test]
fn bias_layouts_and_accumulation() {
    if !coop() {
        return;
    }
    run(Conv2d::new(3, 6, 16, 32, 64, 3, 1, 1), Bias::PerImage { off: 16, ld: 72 }, false);
    run(Conv2d::new(2, 7, 32, 16, 128, 3, 1, 1), Bias::Vector, true);
    run(Conv2d::new(2, 4, 64, 32, 64, 3, 1, 1), Bias::PerImage { off: 0, ld: 64 }, true);
    run(Conv2d::new(1, 3, 16, 16, 64, 3, 1, 1), Bias::None, true);
}

#[test]
fn sd_shapes() {
    if !coop() {
        return;
    }
    // The UNet's 64x64 level at batch 2 (320 channels: 5 channel tiles, 20 chunks) and a VAE
    // level (512 channels at 64x64).
    run(Conv2d::new(2, 64, 64, 320, 320, 3, 1, 1), Bias::PerImage { off: 320, ld: 1280 }, false);
    run(Conv2d::new(1, 64, 64, 512, 512, 3, 1, 1), Bias::Vector, true);
}

#[test]
fn what_it_takes() {
    let g = gpu();
    let ok = Conv2d::new(1, 8, 16, 16, 64, 3, 1, 1);
    assert_eq!(conv_coop::supports(g, &ok), coop());
    assert_eq!(conv_coop::tile_width(512), Some(64));
    assert_eq!(conv_coop::tile_width(96), Some(32));
    assert_eq!(conv_coop::tile_width(48), Some(16));
    assert_eq!(conv_coop::tile_width(8), None);
    // Strided, 1x1, channels not multiples of 16 in or 64 out, a width not a multiple of 16,
    // the scalar path forced.
    for c in [
        Conv2d::new(1, 16, 16, 16, 64, 3, 2, 1),
        Conv2d::new(1, 16, 16, 16, 64, 1, 1, 0),
        Conv2d::new(1, 16, 16, 8, 64, 3, 1, 1),
        Conv2d::new(1, 16, 16, 16, 96, 3, 1, 1),
        Conv2d::new(1, 16, 8, 16, 64, 3, 1, 1),
        Conv2d { path: Some(KernelPath::Scalar), ..ok },
    ] {
        assert!(!conv_coop::supports(g, &c), "{c:?} accepted");
    }
    // Workgroups: 256-pixel tiles (4x64, 8x32 or 16x16, partial rows rounded up) x 64 channels.
    assert_eq!(conv_coop::workgroups(&Conv2d::new(1, 512, 512, 128, 128, 3, 1, 1)), 2 * 8 * 128);
    assert_eq!(conv_coop::workgroups(&Conv2d::new(2, 32, 32, 640, 640, 3, 1, 1)), 10 * 2 * 4);
    assert_eq!(conv_coop::workgroups(&Conv2d::new(3, 20, 48, 16, 64, 3, 1, 1)), 3 * 3 * 2);
    assert_eq!(conv_coop::workgroups(&Conv2d::new(1, 9, 64, 16, 64, 3, 1, 1)), 3);
    // Bias layouts: a vector, a row per image at multiples of 8; not a row per 3 pixels, not
    // an offset of 4.
    let c = Conv2d::new(2, 4, 16, 16, 64, 3, 1, 1);
    assert_eq!(conv_coop::bias_image_ld(&c, &BiasLayout::default()), Some(0));
    assert_eq!(conv_coop::bias_image_ld(&c, &BiasLayout { off: 8, rows: 64, ld: 64 }), Some(64));
    assert_eq!(conv_coop::bias_image_ld(&c, &BiasLayout { off: 8, rows: 3, ld: 64 }), None);
    assert_eq!(conv_coop::bias_image_ld(&c, &BiasLayout { off: 4, rows: 64, ld: 64 }), None);
}

#[test]
fn not_without_coop_and_bad_tensors() {
    let g = gpu();
    let c = Conv2d::new(1, 4, 16, 16, 64, 3, 1, 1);
    let x = Tensor::empty(g, &[1, 4, 16, 16], DType::F16, "x").unwrap();
    let w = Tensor::empty(g, &[64, 3, 3, 16], DType::F16, "w").unwrap();
    let y = Tensor::empty(g, &[1, 4, 16, 64], DType::F16, "y").unwrap();
    if !coop() {
        // A device without cooperative matrices is refused with an error, not a panic.
        let e = conv_coop::run(g, &c, &x, &w, None, &y, false).unwrap_err().to_string();
        assert!(e.contains("cooperative-matrix"), "{e}");
        return;
    }
    let wrong_w = Tensor::empty(g, &[64, 16, 3, 3], DType::F16, "w").unwrap();
    assert!(conv_coop::run(g, &c, &x, &wrong_w, None, &y, false).is_err());
    let y32 = Tensor::empty(g, &[1, 4, 16, 64], DType::F32, "y").unwrap();
    assert!(conv_coop::run(g, &c, &x, &w, None, &y32, false).is_err());
    let short = Tensor::empty(g, &[63], DType::F16, "bias").unwrap();
    assert!(conv_coop::run(g, &c, &x, &w, Some((&short, BiasLayout::default())), &y, false).is_err());
    assert!(conv_coop::run(g, &c, &x, &w, None, &y, false).is_ok());
}
