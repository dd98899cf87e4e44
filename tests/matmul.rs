//! Op tests of the matmul family against a CPU reference in f64, on both kernel paths where
//! the device has them: tiny and odd shapes, every layout (A and B transposed or not), bias,
//! alpha, accumulation, batches with broadcast weights, f16 and f32 outputs, and real SD-1.5
//! shapes. Outputs are poisoned with NaN first, so an unwritten element fails.
//!
//! Bounds: inputs are rounded to f16 before the reference, products are exact in f32 and
//! accumulation is f32, so the error is the output rounding: f16 has a relative step of
//! 2^-11 (≈ 4.9e-4 at most, ≈ 2.8e-4 in RMS), bound 1e-3; f32 output sees only f32
//! accumulation error (≈ 1e-7·√K, and tensor cores truncate the accumulator's alignment
//! shifts), bound 1e-5.

mod common;

use atelier::gpu::{DType, KernelPath, Recorder, Tensor};
use atelier::kernels::matmul::{linear, CoopTile, Matmul};
use common::*;

struct Case {
    m: usize,
    n: usize,
    k: usize,
    batch: usize,
    trans_a: bool,
    trans_b: bool,
    bias: bool,
    accumulate: bool,
    alpha: f32,
    out: DType,
    broadcast_b: bool,
    split: Option<usize>,
}

impl Case {
    fn new(m: usize, n: usize, k: usize) -> Case {
        Case { m, n, k, batch: 1, trans_a: false, trans_b: true, bias: false, accumulate: false, alpha: 1.0, out: DType::F16, broadcast_b: false, split: None }
    }
}

fn bound(out: DType) -> f64 {
    match out {
        DType::F16 => 1e-3,
        DType::F32 => 1e-5,
    }
}

/// Runs one case on `path` (and `tile`), returns the relative L2 error.
fn run_case(c: &Case, path: KernelPath, tile: Option<CoopTile>) -> f64 {
    let g = gpu();
    let s = seed(&format!("matmul {}x{}x{} b{} ta{} tb{} {:?}", c.m, c.n, c.k, c.batch, c.trans_a, c.trans_b, path));
    let na = c.batch * c.m * c.k;
    let nb = if c.broadcast_b { c.k * c.n } else { c.batch * c.k * c.n };
    let a = round_f16(&random(na, s));
    let b = round_f16(&random(nb, s ^ 1));
    let bias = round_f16(&random(c.n, s ^ 2));
    let c0: Vec<f32> = match c.out {
        DType::F16 => round_f16(&random(c.batch * c.m * c.n, s ^ 3)),
        DType::F32 => random(c.batch * c.m * c.n, s ^ 3),
    };
    // Reference.
    let mut r = vec![0f64; c.batch * c.m * c.n];
    for bz in 0..c.batch {
        let ao = bz * c.m * c.k;
        let bo = if c.broadcast_b { 0 } else { bz * c.k * c.n };
        for i in 0..c.m {
            for j in 0..c.n {
                let mut acc = 0f64;
                for kk in 0..c.k {
                    let av = if c.trans_a { a[ao + kk * c.m + i] } else { a[ao + i * c.k + kk] };
                    let bv = if c.trans_b { b[bo + j * c.k + kk] } else { b[bo + kk * c.n + j] };
                    acc += av as f64 * bv as f64;
                }
                let mut v = c.alpha as f64 * acc;
                if c.bias {
                    v += bias[j] as f64;
                }
                let o = (bz * c.m + i) * c.n + j;
                if c.accumulate {
                    v += c0[o] as f64;
                }
                r[o] = v;
            }
        }
    }
    let ta = Tensor::from_f32(g, &[na], DType::F16, &a, "a").unwrap();
    let tb = Tensor::from_f32(g, &[nb], DType::F16, &b, "b").unwrap();
    let tbias = Tensor::from_f32(g, &[c.n], DType::F16, &bias, "bias").unwrap();
    let tc = Tensor::empty(g, &[c.batch, c.m, c.n], c.out, "c").unwrap();
    if c.accumulate {
        tc.write_f32(g, &c0).unwrap();
    } else {
        tc.fill_words(g, POISON);
    }
    let mut mm = Matmul::new(c.m, c.n, c.k);
    mm.batch = c.batch;
    mm.trans_a = c.trans_a;
    mm.trans_b = c.trans_b;
    mm.alpha = c.alpha;
    mm.accumulate = c.accumulate;
    mm.stride_b = if c.broadcast_b { 0 } else { c.k * c.n };
    mm.path = Some(path);
    mm.tile = tile;
    mm.split_k = c.split;
    let mut rec = Recorder::new(g);
    mm.run(g, &mut rec, &ta, &tb, c.bias.then_some(&tbias), &tc).unwrap();
    rec.finish().unwrap();
    let out = tc.to_f32(g).unwrap();
    rel_l2(&out, &r)
}

fn check(c: &Case) {
    for path in paths() {
        let e = run_case(c, path, None);
        println!("{}x{}x{} batch {} {:?}: rel L2 {e:.2e}", c.m, c.n, c.k, c.batch, path);
        assert!(e < bound(c.out), "{}x{}x{} {path}: rel L2 {e:.3e} over {}", c.m, c.n, c.k, bound(c.out));
    }
}

#[test]
fn tiny_and_odd_shapes_every_layout() {
    for &(m, n, k) in &[(1, 1, 1), (3, 5, 7), (16, 16, 16), (17, 33, 9), (130, 66, 71), (129, 257, 40)] {
        for ta in [false, true] {
            for tb in [false, true] {
                let mut c = Case::new(m, n, k);
                c.trans_a = ta;
                c.trans_b = tb;
                check(&c);
            }
        }
    }
}

#[test]
fn bias_alpha_accumulate_f32_out() {
    for &(m, n, k) in &[(5, 7, 3), (77, 96, 64), (200, 130, 33)] {
        for out in [DType::F16, DType::F32] {
            for accumulate in [false, true] {
                let mut c = Case::new(m, n, k);
                c.bias = true;
                c.alpha = 0.37;
                c.out = out;
                c.accumulate = accumulate;
                check(&c);
            }
        }
    }
}

#[test]
fn split_over_k_every_layout() {
    // Forced splits (the launcher splits long-K products with few tiles, e.g. the UNet's 16x16
    // and 8x8 levels and its time-embedding projections): f32 partials, then one pass adding
    // them with the bias and C.
    for s in [2, 4, 8] {
        for (ta, tb) in [(false, true), (false, false), (true, true), (true, false)] {
            for out in [DType::F16, DType::F32] {
                let mut c = Case::new(77, 96, 192);
                c.split = Some(s);
                c.trans_a = ta;
                c.trans_b = tb;
                c.bias = true;
                c.accumulate = true;
                c.alpha = 0.37;
                c.out = out;
                check(&c);
            }
        }
    }
    let mut c = Case::new(2, 1280, 1280);
    c.split = Some(8);
    c.bias = true;
    check(&c);
}

#[test]
fn batched_and_broadcast_weights() {
    for broadcast in [false, true] {
        for ta in [false, true] {
            let mut c = Case::new(70, 40, 24);
            c.batch = 3;
            c.trans_a = ta;
            c.trans_b = false;
            c.broadcast_b = broadcast;
            check(&c);
        }
    }
}

#[test]
fn coop_tiles_are_supported_configurations() {
    for t in CoopTile::ALL.iter().chain([&CoopTile::DEFAULT, &CoopTile::SMALL, &CoopTile::SMALL_LONG_K, &CoopTile::LARGE]) {
        assert!(t.valid(), "{t:?}: {} bytes of shared memory", t.shared_bytes());
    }
    // And the check refuses what the shader can't do.
    let mut bad = CoopTile::DEFAULT;
    bad.bk = 64; // 128x256 with BK 64: 8 entries of B per invocation
    assert!(!bad.valid());
}

#[test]
fn every_coop_tile() {
    if !paths().contains(&KernelPath::Coop) {
        eprintln!("no cooperative matrices on this device: the scalar tests cover it");
        return;
    }
    // K 100: strides not multiples of 8, the general loads; 296x520x88: every extent a
    // multiple of 8, the branch-free VEC loads, with partial tiles on all three axes.
    for tile in CoopTile::ALL {
        for (m, n, k) in [(300, 520, 100), (296, 520, 88)] {
            for (ta, tb) in [(false, true), (false, false), (true, false)] {
                let mut c = Case::new(m, n, k);
                c.trans_a = ta;
                c.trans_b = tb;
                c.bias = true;
                let e = run_case(&c, KernelPath::Coop, Some(tile));
                assert!(e < 1e-3, "{tile:?} {m}x{n}x{k} ta{ta} tb{tb}: {e:.3e}");
            }
        }
    }
}

#[test]
fn sd_shapes() {
    // Attention projection, feed-forward out, CLIP MLP (M x N x K).
    for &(m, n, k) in &[(4096, 320, 320), (4096, 320, 1280), (77, 3072, 768)] {
        check(&Case::new(m, n, k));
    }
}

#[test]
fn linear_matches_and_checks_shapes() {
    let g = gpu();
    let s = seed("linear");
    let (m, n, k) = (2 * 77, 768, 64);
    let x = round_f16(&random(m * k, s));
    let w = round_f16(&random(n * k, s ^ 1));
    let b = round_f16(&random(n, s ^ 2));
    let tx = Tensor::from_f32(g, &[2, 77, k], DType::F16, &x, "x").unwrap();
    let tw = Tensor::from_f32(g, &[n, k], DType::F16, &w, "w").unwrap();
    let tb = Tensor::from_f32(g, &[n], DType::F16, &b, "b").unwrap();
    let ty = Tensor::empty(g, &[2, 77, n], DType::F16, "y").unwrap();
    ty.fill_words(g, POISON);
    let mut rec = Recorder::new(g);
    linear(g, &mut rec, &tx, &tw, Some(&tb), &ty).unwrap();
    rec.finish().unwrap();
    let mut r = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            r[i * n + j] = b[j] as f64 + (0..k).map(|q| x[i * k + q] as f64 * w[j * k + q] as f64).sum::<f64>();
        }
    }
    let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
    assert!(e < 1e-3, "linear rel L2 {e:.3e}");
    // A weight of the wrong width is a shape error, not a panic.
    let bad = Tensor::empty(g, &[n, k + 1], DType::F16, "w").unwrap();
    let mut rec = Recorder::new(g);
    let err = linear(g, &mut rec, &tx, &bad, None, &ty).unwrap_err();
    assert!(err.to_string().contains("shape mismatch in linear"), "{err}");
}

/// A and C as column slices of wider tensors (a fused q/k/v product and its gradient): A read
/// with a row stride and start offset, C written into its columns only, the columns around
/// them untouched. Both layouts of A, f16 and f32 C, with and without accumulation, including
/// an M ≤ 64 product that would otherwise split over K.
#[test]
fn strided_a_and_c_views() {
    let g = gpu();
    for &(m, n, k, trans_a) in &[(37, 16, 24, false), (200, 40, 64, false), (24, 32, 700, true), (8, 48, 1024, false)] {
        for out in [DType::F16, DType::F32] {
            for accumulate in [false, true] {
                for path in paths() {
                    let s = seed(&format!("strided {m}x{n}x{k} ta{trans_a} {out:?} acc{accumulate} {path:?}"));
                    // A's matrix sits at columns 8.. of a stored [rows, cols + 24] tensor.
                    let (rows, cols) = if trans_a { (k, m) } else { (m, k) };
                    let (lda, off_a) = (cols + 24, 8);
                    let a = round_f16(&random(rows * lda, s));
                    let b = round_f16(&random(n * k, s ^ 1));
                    // C sits at columns 16.. of [m, n + 32].
                    let (ldc, off_c) = (n + 32, 16);
                    let c0: Vec<f32> = round_f16(&random(m * ldc, s ^ 2));
                    let mut r: Vec<f64> = c0.iter().map(|&v| v as f64).collect();
                    for i in 0..m {
                        for j in 0..n {
                            let acc: f64 = (0..k)
                                .map(|q| {
                                    let av = if trans_a { a[off_a + q * lda + i] } else { a[off_a + i * lda + q] };
                                    av as f64 * b[j * k + q] as f64
                                })
                                .sum();
                            let o = off_c + i * ldc + j;
                            r[o] = 0.5 * acc + if accumulate { r[o] } else { 0.0 };
                        }
                    }
                    let ta = Tensor::from_f32(g, &[rows, lda], DType::F16, &a, "a").unwrap();
                    let tb = Tensor::from_f32(g, &[n, k], DType::F16, &b, "b").unwrap();
                    let tc = Tensor::from_f32(g, &[m, ldc], out, &c0, "c").unwrap();
                    let mut mm = Matmul::new(m, n, k);
                    (mm.trans_a, mm.trans_b, mm.alpha, mm.accumulate, mm.path) = (trans_a, true, 0.5, accumulate, Some(path));
                    (mm.lda, mm.off_a, mm.ldc, mm.off_c) = (Some(lda), off_a, Some(ldc), off_c);
                    let mut rec = Recorder::new(g);
                    mm.run(g, &mut rec, &ta, &tb, None, &tc).unwrap();
                    rec.finish().unwrap();
                    let got = tc.to_f32(g).unwrap();
                    // The columns outside the slice must be exactly what was there.
                    for i in 0..m {
                        for j in (0..off_c).chain(off_c + n..ldc) {
                            assert_eq!(got[i * ldc + j], c0[i * ldc + j], "{m}x{n}x{k} {path}: column {j} of row {i} outside C was written");
                        }
                    }
                    let e = rel_l2(&got, &r);
                    println!("strided {m}x{n}x{k} trans_a {trans_a} {out:?} accumulate {accumulate} {path:?}: rel L2 {e:.2e}");
                    assert!(e < bound(out), "strided {m}x{n}x{k} {path}: rel L2 {e:.3e} over {}", bound(out));
                }
            }
        }
    }
}
