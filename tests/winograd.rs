//! Op tests for the Winograd F(2x2, 3x3) convolution (`kernels::winograd`: weight transform
//! on the CPU or the GPU, input and output transforms, the product batched over the 16
//! positions) against the f64 CPU reference of a direct 3x3 convolution, on every path the
//! device has: odd image sizes (partial tiles), batches, one bias vector, a bias row per
//! image, accumulation onto y, the real UNet shapes, and every coop tile for the product. The
//! output and every scratch tensor are NaN-poisoned first.

mod common;

use atelier::gpu::{DType, KernelPath, Recorder, Tensor};
use atelier::kernels::conv::{conv_weight_to_nhwc, Conv2d};
use atelier::kernels::matmul::{BiasLayout, CoopTile};
use atelier::kernels::winograd::{transform_weight, Winograd};
use common::{conv_reference, gpu, paths, random, rel_l2, round_f16, seed, POISON};

/// The direct convolution's bound is 1e-3 (f16 inputs, f32 sums, one f16 rounding of the
/// result: ~3e-4 RMS). Here two more values are rounded to f16 on the way: the transformed
/// input V (sums of up to four input values) and the transformed weight U (G g Gᵀ, with
/// halves and quarters of sums of up to nine weights), each ~3e-4 RMS relative to itself;
/// the output transform adds up to nine products' sums, whose terms are larger than the
/// result by about the transforms' gain (~2x RMS here). Together ≲ 1.2e-3 RMS; 2e-3 is that
/// with margin. A wrong position, tap, sign or tile edge is off by O(1).
const BOUND: f64 = 2e-3;

/// How the bias is read in a case.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bias {
    None,
    /// One vector [cout].
    Vector,
    /// A row per image of a [batch, ld] matrix from column `off` (a resnet's conv1 with its
    /// time embedding).
    PerImage { off: usize, ld: usize },
}

fn run(c: Winograd, bias: Bias, accumulate: bool) {
    run_u(c, bias, accumulate, false);
}

/// As `run`; with `gpu_u`, U is made on the GPU from the weight (`Winograd::weight`, the
/// large layers' form) instead of on the CPU.
fn run_u(c: Winograd, bias: Bias, accumulate: bool, gpu_u: bool) {
    let g = gpu();
    let paths = match c.tile {
        Some(_) => paths().into_iter().filter(|&p| p == KernelPath::Coop).collect(),
        None => paths(),
    };
    for path in paths {
        let what = format!("winograd {c:?} bias {bias:?} accumulate {accumulate} U on the GPU {gpu_u} on {path}");
        let s = seed(&what);
        let n_y = c.batch * c.h * c.w * c.cout;
        let x = round_f16(&random(c.batch * c.h * c.w * c.cin, s));
        let w = round_f16(&random(c.cout * c.cin * 9, s ^ 1));
        let (b_len, layout) = match bias {
            Bias::None | Bias::Vector => (c.cout, BiasLayout::default()),
            Bias::PerImage { off, ld } => (off + c.batch * ld, BiasLayout { off, rows: c.h * c.w, ld }),
        };
        let bv = round_f16(&random(b_len, s ^ 2));
        let y0 = round_f16(&random(n_y, s ^ 3));
        let tx = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cin], DType::F16, &x, "x").unwrap();
        let tu = if gpu_u {
            let wn = conv_weight_to_nhwc(&w, c.cout, c.cin, 3, 3);
            let tw = Tensor::from_f32(g, &[c.cout, 3, 3, c.cin], DType::F16, &wn, "w").unwrap();
            let tu = Tensor::empty(g, &[16, c.cout, c.cin], DType::F16, "U").unwrap();
            tu.fill_words(g, POISON);
            let mut rec = Recorder::new(g);
            rec.run(&c.weight(g, &tw, &tu).unwrap()).unwrap();
            rec.finish().unwrap();
            tu
        } else {
            Tensor::from_f32(g, &[16, c.cout, c.cin], DType::F16, &transform_weight(&w, c.cout, c.cin), "U").unwrap()
        };
        let tb = Tensor::from_f32(g, &[b_len], DType::F16, &bv, "bias").unwrap();
        let ty = Tensor::from_f32(g, &[c.batch, c.h, c.w, c.cout], DType::F16, &y0, "y").unwrap();
        if !accumulate {
            ty.fill_words(g, POISON);
        }
        let v = Tensor::empty(g, &c.v_shape(), DType::F16, "V").unwrap();
        let m = Tensor::empty(g, &c.m_shape(), DType::F32, "M").unwrap();
        v.fill_words(g, POISON);
        m.fill_words(g, POISON);
        let mut conv = c;
        conv.path = Some(path);
        let mut rec = Recorder::new(g);
        let b = (bias != Bias::None).then_some((&tb, layout));
        conv.run(g, &mut rec, &tx, &tu, b, &ty, accumulate, &v, &m).unwrap();
        rec.finish().unwrap();

        let direct = Conv2d::new(c.batch, c.h, c.w, c.cin, c.cout, 3, 1, 1);
        let mut r = conv_reference(&direct, &x, &w, None);
        let per_image = c.h * c.w * c.cout;
        for (i, v) in r.iter_mut().enumerate() {
            let (img, ch) = (i / per_image, i % c.cout);
            *v += match bias {
                Bias::None => 0.0,
                Bias::Vector => bv[ch] as f64,
                Bias::PerImage { off, ld } => bv[off + img * ld + ch] as f64,
            };
            if accumulate {
                *v += y0[i] as f64;
            }
        }
        let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
        eprintln!("{what}: rel L2 {e:.3e}");
        assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
    }
}

fn wino(batch: usize, h: usize, w: usize, cin: usize, cout: usize) -> Winograd {
    Winograd::new(batch, h, w, cin, cout).unwrap()
}

#[test]
fn matches_direct_convolution() {
    run(wino(1, 4, 4, 8, 8), Bias::None, false);
    run(wino(1, 5, 7, 8, 16), Bias::Vector, false); // odd height and width: partial tiles
    run(wino(2, 9, 6, 16, 24), Bias::Vector, false);
    run(wino(1, 1, 3, 32, 8), Bias::Vector, false); // one row
    run(wino(3, 8, 8, 40, 48), Bias::None, false);
}

#[test]
fn per_image_bias_and_accumulate() {
    // conv1 of a resnet (a bias row per image) and conv2 (added onto the shortcut's output).
    run(wino(3, 5, 6, 16, 24), Bias::PerImage { off: 16, ld: 40 }, false);
    run(wino(2, 7, 4, 24, 16), Bias::Vector, true);
    run(wino(1, 6, 6, 16, 8), Bias::PerImage { off: 8, ld: 24 }, true);
}

#[test]
fn sd_shapes() {
    // The UNet's 64x64 level at batch 2 and its 16x16 level (long K).
    run(wino(2, 64, 64, 320, 320), Bias::Vector, false);
    run(wino(1, 16, 16, 1280, 640), Bias::Vector, true);
}

#[test]
fn weight_transform_on_the_gpu() {
    // The same U as the CPU's transform_weight (both f32 arithmetic on f16 weights, one f16
    // rounding: equal but for a rounding step where the two f32 sums differ in the last bit),
    // and the convolution through it.
    let g = gpu();
    let c = wino(1, 4, 4, 24, 40);
    let s = seed("weight transform");
    let w = round_f16(&random(c.cout * c.cin * 9, s));
    let tw = Tensor::from_f32(g, &[c.cout, 3, 3, c.cin], DType::F16, &conv_weight_to_nhwc(&w, c.cout, c.cin, 3, 3), "w").unwrap();
    let tu = Tensor::empty(g, &[16, c.cout, c.cin], DType::F16, "U").unwrap();
    tu.fill_words(g, POISON);
    let mut rec = Recorder::new(g);
    rec.run(&c.weight(g, &tw, &tu).unwrap()).unwrap();
    rec.finish().unwrap();
    let want = round_f16(&transform_weight(&w, c.cout, c.cin));
    for (i, (&a, &b)) in tu.to_f32(g).unwrap().iter().zip(&want).enumerate() {
        assert!((a - b).abs() <= b.abs() * 1e-3 + 1e-7, "U[{i}]: GPU {a}, CPU {b}");
    }
    run_u(wino(2, 7, 9, 16, 24), Bias::Vector, false, true);
    run_u(wino(2, 16, 16, 1280, 640), Bias::PerImage { off: 8, ld: 656 }, true, true);
}

#[test]
fn every_coop_tile() {
    // The product on each tile of the cooperative-matrix kernel (a batched Y = X·Wᵀ with f32
    // output), with partial tiles along every axis.
    for t in CoopTile::ALL {
        run(Winograd { tile: Some(t), ..wino(2, 11, 13, 32, 40) }, Bias::Vector, false);
    }
}

#[test]
fn refuses_what_it_cannot_run() {
    // Channel counts off the 8-channel words, and a per-image bias at an odd offset.
    assert!(Winograd::new(1, 8, 8, 4, 320).is_err());
    assert!(Winograd::new(1, 8, 8, 320, 4).is_err());
    assert!(Winograd::new(0, 8, 8, 8, 8).is_err());
    let g = gpu();
    let c = wino(2, 4, 4, 8, 8);
    let m = Tensor::empty(g, &c.m_shape(), DType::F32, "M").unwrap();
    let y = Tensor::empty(g, &[2, 4, 4, 8], DType::F16, "y").unwrap();
    let b = Tensor::empty(g, &[40], DType::F16, "bias").unwrap();
    let odd = BiasLayout { off: 3, rows: 16, ld: 16 };
    let Err(e) = c.output(g, &m, Some((&b, odd)), &y, false) else { panic!("an odd bias offset is refused") };
    let e = e.to_string();
    assert!(e.contains("even"), "{e}");
    let short = BiasLayout { off: 8, rows: 16, ld: 32 };
    assert!(c.output(g, &m, Some((&b, short)), &y, false).is_err(), "a bias too small for the batch is refused");
}
