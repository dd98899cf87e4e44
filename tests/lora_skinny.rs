//! Op tests of the skinny LoRA kernels (kernels::lora_skinny) against CPU references in f64,
//! on fresh seeded random inputs (the seed is printed; ATELIER_TEST_SEED replays it), at odd
//! sizes and SD-1.5 sizes, with column slices whose neighbouring columns hold NaN (so a read
//! outside the slice, or a past-the-end value scaled by 0 instead of dropped, fails).
//!
//! Bounds:
//! - `narrow` (f16 output): the inputs are exact f16 values on both sides and the GPU
//!   accumulates in f32 (relative error ~ √K·2^-24, under 1e-6 here); the one f16 rounding
//!   of the output has relative RMS 2^-11/√3 ≈ 2.8e-4: rel L2 bound 1e-3; per element,
//!   |out - ref| ≤ 2^-11·|ref| + the f32 error, so max |out - ref| / max |ref| < 1e-3.
//! - `widen` (f16 output; with `+=`, onto preset values of the product's size, so `=` errs by
//!   ~100%; with `=`, onto poison): r ≤ 16 exact products and the old value summed in f32,
//!   then one f16 rounding: rel L2 bound 1e-3 as for `narrow`, and per element |out - ref| ≤
//!   2^-11·|ref| + the f32 error, under 1e-3 of max |ref|. The columns around a slice (NaN)
//!   must be left untouched.
//! - `WeightGrad` (f32 output, accumulated onto preset values ~5% of the increment, so `=`
//!   instead of `+=` errs by ~5%): f32 sums of up to 4096 products of random sign, whose
//!   rounding grows like 2^-24·√(rows/2) ≈ 2.7e-6 of the result for one sequential sum of
//!   4096 (the split sums are shorter), plus the alpha product and the add onto G (a few
//!   2^-24): rel L2 bound 1e-5, and per element 1e-5 of max |ref|. The rest of G (around the
//!   output's offset) must be untouched, bit for bit.
//! - Stacked forms (`members` adapters side by side, each on its own column segment with its
//!   own r columns of H / C): the same products member by member, so the same bounds.

mod common;

use atelier::gpu::{DType, Recorder, Tensor};
use atelier::kernels::attention::Operand;
use atelier::kernels::lora_skinny::{narrow, narrow_stacked, widen, widen_stacked, WeightGrad};
use common::*;

/// Elementwise maximum of |out - ref| over max |ref| (infinite for a non-finite output).
fn max_rel(out: &[f32], r: &[f64]) -> f64 {
    let m = r.iter().fold(0f64, |a, &x| a.max(x.abs()));
    let e = out.iter().zip(r).fold(0f64, |a, (&o, &x)| if o.is_finite() { a.max((o as f64 - x).abs()) } else { f64::INFINITY });
    e / m.max(1e-300)
}

/// A [rows, cols] f16 matrix as columns `off .. off + cols` of rows of `ld` (NaN around it):
/// the exact f16 values (dense) and the wide storage.
fn sliced(rows: usize, cols: usize, off: usize, ld: usize, seed: u64) -> (Vec<f32>, Vec<f32>) {
    let v = round_f16(&random(rows * cols, seed));
    let mut w = vec![f32::NAN; off + rows * ld];
    for i in 0..rows {
        w[off + i * ld..off + i * ld + cols].copy_from_slice(&v[i * cols..(i + 1) * cols]);
    }
    (v, w)
}

/// One `narrow` case: C [m, r] = alpha·A·W, W [r, k] (`w_rk`) or [k, r]; A columns at
/// (off, ld). Returns the rel L2 error.
fn check_narrow(m: usize, k: usize, r: usize, w_rk: bool, off: usize, ld: usize) -> f64 {
    check_narrow_g(m, k, r, w_rk, off, ld, 1)
}

/// As [`check_narrow`], for `members` stacked adapters (W [k, r], not `w_rk`): C [m,
/// members·r], member g's columns from A's columns segment g.
fn check_narrow_g(m: usize, k: usize, r: usize, w_rk: bool, off: usize, ld: usize, members: usize) -> f64 {
    let g = gpu();
    let what = format!("narrow {m}x{k} r{r} {} off {off} ld {ld} members {members}", if w_rk { "A·Wᵀ" } else { "A·W" });
    let s = seed(&what);
    let (a, aw) = sliced(m, k, off, ld, s);
    let w = round_f16(&scaled(&random(r * k, s ^ 1), 1.0 / (k as f32).sqrt()));
    let alpha = 0.75f32;
    let ta = Tensor::from_f32(g, &[aw.len()], DType::F16, &aw, "A").unwrap();
    let tw = Tensor::from_f32(g, &[w.len()], DType::F16, &w, "W").unwrap();
    let wid = members * r;
    let tc = Tensor::empty(g, &[m, wid], DType::F16, "C").unwrap();
    tc.fill_words(g, POISON);
    let op = if members == 1 {
        narrow(g, Operand::slice(&ta, off, ld), &tw, w_rk, &tc, m, k, r, alpha)
    } else {
        narrow_stacked(g, Operand::slice(&ta, off, ld), &tw, &tc, m, k, r, members, alpha)
    };
    g.run_now(&op.unwrap()).unwrap();
    let out = tc.to_f32(g).unwrap();
    let seg = k / members;
    let mut want = vec![0f64; m * wid];
    for i in 0..m {
        for c in 0..wid {
            let (gm, j) = (c / r, c % r);
            let mut acc = 0f64;
            for q in gm * seg..(gm + 1) * seg {
                let wv = if w_rk { w[j * k + q] } else { w[q * r + j] };
                acc += a[i * k + q] as f64 * wv as f64;
            }
            want[i * wid + c] = alpha as f64 * acc;
        }
    }
    let e = rel_l2(&out, &want);
    let mx = max_rel(&out, &want);
    println!("{what}: rel L2 {e:.2e}, max {mx:.2e}");
    assert!(e < 1e-3, "{what}: rel L2 {e:.3e} over 1e-3");
    assert!(mx < 1e-3, "{what}: max error {mx:.3e} of max |ref|");
    e
}

/// One `widen` case: Y [m, n] (+)= alpha·H·W, W [n, r] (`w_nr`) or [r, n]; Y columns at
/// (off, ld) of a wider tensor whose other columns hold NaN. Returns the rel L2 error.
#[allow(clippy::too_many_arguments)]
fn check_widen(m: usize, n: usize, r: usize, w_nr: bool, off: usize, ld: usize, accumulate: bool) -> f64 {
    check_widen_g(m, n, r, w_nr, off, ld, accumulate, 1)
}

/// As [`check_widen`], for `members` stacked adapters (W [n, r], `w_nr`): H [m, members·r],
/// Y's column segment g from member g's columns of H.
#[allow(clippy::too_many_arguments)]
fn check_widen_g(m: usize, n: usize, r: usize, w_nr: bool, off: usize, ld: usize, accumulate: bool, members: usize) -> f64 {
    let g = gpu();
    let what = format!("widen {m}x{n} r{r} {} off {off} ld {ld}{} members {members}", if w_nr { "H·Wᵀ" } else { "H·W" }, if accumulate { " +=" } else { "" });
    let s = seed(&what);
    let hw = members * r;
    let h = round_f16(&random(m * hw, s));
    let w = round_f16(&scaled(&random(r * n, s ^ 1), 1.0 / (r as f32).sqrt()));
    let (y0, yw) = sliced(m, n, off, ld, s ^ 2);
    let alpha = 0.75f32;
    let th = Tensor::from_f32(g, &[h.len()], DType::F16, &h, "H").unwrap();
    let tw = Tensor::from_f32(g, &[w.len()], DType::F16, &w, "W").unwrap();
    let ty = Tensor::from_f32(g, &[yw.len()], DType::F16, &yw, "Y").unwrap();
    if !accumulate {
        // Poison the slice only (the NaN columns around it are checked below).
        let mut p = yw.clone();
        for i in 0..m {
            p[off + i * ld..off + i * ld + n].iter_mut().for_each(|x| *x = 6.0e4);
        }
        ty.write_f32(g, &p).unwrap();
    }
    let op = if members == 1 {
        widen(g, &th, &tw, w_nr, Operand::slice(&ty, off, ld), m, n, r, alpha, accumulate)
    } else {
        widen_stacked(g, &th, &tw, Operand::slice(&ty, off, ld), m, n, r, members, alpha, accumulate)
    };
    g.run_now(&op.unwrap()).unwrap();
    let all = ty.to_f32(g).unwrap();
    let mut out = vec![0f32; m * n];
    for i in 0..m {
        out[i * n..(i + 1) * n].copy_from_slice(&all[off + i * ld..off + i * ld + n]);
    }
    let mut rest_ok = true;
    for (e, (&a, &b)) in all.iter().zip(&yw).enumerate() {
        let inside = e >= off && (e - off) % ld < n && (e - off) / ld < m;
        if !inside && a.to_bits() != b.to_bits() && !(a.is_nan() && b.is_nan()) {
            rest_ok = false;
        }
    }
    let mut want = vec![0f64; m * n];
    for i in 0..m {
        for c in 0..n {
            let mut acc = 0f64;
            let hc = (c / (n / members)) * r;
            for j in 0..r {
                let wv = if w_nr { w[c * r + j] } else { w[j * n + c] };
                acc += h[i * hw + hc + j] as f64 * wv as f64;
            }
            want[i * n + c] = alpha as f64 * acc + if accumulate { y0[i * n + c] as f64 } else { 0.0 };
        }
    }
    let e = rel_l2(&out, &want);
    let mx = max_rel(&out, &want);
    println!("{what}: rel L2 {e:.2e}, max {mx:.2e}");
    assert!(rest_ok, "{what}: values outside the slice changed");
    assert!(e < 1e-3, "{what}: rel L2 {e:.3e} over 1e-3");
    assert!(mx < 1e-3, "{what}: max error {mx:.3e} of max |ref|");
    e
}

fn scaled(v: &[f32], s: f32) -> Vec<f32> {
    v.iter().map(|x| x * s).collect()
}

/// One weight-gradient case: G (at `off_g` of a larger f32 buffer) += alpha·Σ X[row, n]·
/// H[row, j], laid out [n, r] or (`transposed`) [r, n]; X columns at (off, ld).
fn check_wgrad(rows: usize, n: usize, r: usize, transposed: bool, off: usize, ld: usize, splits: Option<usize>) -> f64 {
    check_wgrad_g(rows, n, r, transposed, off, ld, splits, 1)
}

/// As [`check_wgrad`], for `members` stacked adapters ([n, r]): H [rows, members·r], X's
/// column segment g paired with member g's columns of H.
#[allow(clippy::too_many_arguments)]
fn check_wgrad_g(rows: usize, n: usize, r: usize, transposed: bool, off: usize, ld: usize, splits: Option<usize>, members: usize) -> f64 {
    let g = gpu();
    let what = format!("wgrad {rows}x{n} r{r}{} off {off} ld {ld} splits {splits:?} members {members}", if transposed { " [r, n]" } else { " [n, r]" });
    let s = seed(&what);
    let (x, xw) = sliced(rows, n, off, ld, s);
    let hw = members * r;
    let h = round_f16(&random(rows * hw, s ^ 1));
    let alpha = 0.375f32;
    let nr = n * r;
    let off_g = 64 + 3;
    let total = off_g + nr + 29;
    // The increment's RMS is about alpha·√rows/3; preset G at ~5% of that.
    let g0 = scaled(&random(total, s ^ 2), 0.05 * alpha * (rows as f32).sqrt() / 3.0);
    let tx = Tensor::from_f32(g, &[xw.len()], DType::F16, &xw, "X").unwrap();
    let th = Tensor::from_f32(g, &[rows, hw], DType::F16, &h, "H").unwrap();
    let tg = Tensor::from_f32(g, &[total], DType::F32, &g0, "G").unwrap();
    let mut wg = WeightGrad::new(rows, n, r, alpha, transposed).stacked(members);
    wg.force_splits = splits;
    let parts = wg.partials_len().map(|len| {
        let t = Tensor::empty(g, &[len], DType::F32, "partials").unwrap();
        t.fill_words(g, POISON);
        t
    });
    let run = || {
        let mut rec = Recorder::new(g);
        for d in wg.prepare(g, Operand::slice(&tx, off, ld), &th, &tg, off_g, parts.as_ref()).unwrap() {
            rec.run(&d).unwrap();
        }
        rec.finish().unwrap();
    };
    run();
    let out = tg.to_f32(g).unwrap();
    let mut want = vec![0f64; nr];
    for c in 0..n {
        for j in 0..r {
            let hc = (c / (n / members)) * r + j;
            let acc: f64 = (0..rows).map(|i| x[i * n + c] as f64 * h[i * hw + hc] as f64).sum();
            let idx = if transposed { j * n + c } else { c * r + j };
            want[idx] = g0[off_g + idx] as f64 + alpha as f64 * acc;
        }
    }
    for (i, (&o, &p)) in out.iter().zip(&g0).enumerate() {
        if !(off_g..off_g + nr).contains(&i) {
            assert_eq!(o.to_bits(), p.to_bits(), "{what}: G element {i} outside the output was written");
        }
    }
    let got = &out[off_g..off_g + nr];
    let e = rel_l2(got, &want);
    let mx = max_rel(got, &want);
    println!("{what}: {} split(s), rel L2 {e:.2e}, max {mx:.2e}", wg.splits());
    assert!(e < 1e-5, "{what}: rel L2 {e:.3e} over 1e-5");
    assert!(mx < 1e-5, "{what}: max error {mx:.3e} of max |ref|");
    // Deterministic: a second run adds exactly the same increment (bit for bit).
    if rows >= 1024 {
        let first = tg.to_f32(g).unwrap();
        tg.write_f32(g, &g0).unwrap();
        run();
        let again = tg.to_f32(g).unwrap();
        assert!(first.iter().zip(&again).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: not reproducible");
    }
    e
}

#[test]
fn narrow_small_and_odd_shapes() {
    for &(m, k, r) in &[(1, 1, 1), (5, 37, 3), (77, 130, 5), (33, 8, 16), (17, 257, 12), (16, 128, 4), (3, 9, 7)] {
        for w_rk in [true, false] {
            // Dense; a slice at an even offset (half-word loads); an 8-aligned slice whose width
            // is not a multiple of 8 (vector loads masked at the row's end, NaN beyond).
            check_narrow(m, k, r, w_rk, 0, k);
            check_narrow(m, k, r, w_rk, 2, k + 6);
            check_narrow(m, k, r, w_rk, 8, k.div_ceil(8) * 8 + 16);
            check_narrow(m, k, r, w_rk, 1, k + 3);
        }
    }
}

#[test]
fn narrow_sd_shapes() {
    // Forward h = xd·Aᵀ: 4096 tokens (64x64 level), k 320 / 768 / 1280.
    for &(k, r) in &[(320, 4), (768, 8), (1280, 16), (1280, 1)] {
        check_narrow(4096, k, r, true, 0, k);
    }
    // Backward dh = dy·B: dy one projection's columns of a fused q/k/v gradient [4096, 960],
    // or dense (n 640, 2560).
    check_narrow(4096, 320, 4, false, 320, 960);
    check_narrow(4096, 320, 1, false, 640, 960);
    check_narrow(4096, 640, 16, false, 0, 640);
    check_narrow(4096, 2560, 4, false, 0, 2560);
    check_narrow(77, 768, 8, true, 0, 768);
}

#[test]
fn widen_small_and_odd_shapes() {
    for &(m, n, r) in &[(1, 2, 1), (5, 38, 3), (77, 130, 5), (33, 8, 16), (17, 258, 12), (40, 128, 4), (3, 10, 7)] {
        for w_nr in [true, false] {
            for accumulate in [true, false] {
                check_widen(m, n, r, w_nr, 0, n, accumulate);
                check_widen(m, n, r, w_nr, 2, n + 6, accumulate);
            }
        }
    }
}

#[test]
fn widen_sd_shapes() {
    // Forward y += scale·h·Bᵀ into one projection's columns of a fused q/k/v product, or dense.
    check_widen(4096, 320, 4, true, 320, 960, true);
    check_widen(4096, 320, 16, true, 640, 960, true);
    check_widen(1024, 640, 8, true, 0, 640, true);
    // Backward dx += dh·A, and = for the dropout path.
    check_widen(4096, 320, 4, false, 0, 320, true);
    check_widen(256, 1280, 4, false, 0, 1280, false);
    check_widen(77, 768, 1, false, 0, 768, true);
}

#[test]
fn weight_grad_small_and_odd_shapes() {
    for &(rows, n, r) in &[(1, 1, 1), (5, 29, 3), (77, 37, 5), (100, 130, 16), (64, 2, 4), (200, 257, 9)] {
        for transposed in [false, true] {
            for splits in [None, Some(1), Some(3), Some(7)] {
                check_wgrad(rows, n, r, transposed, 0, n, splits);
            }
            check_wgrad(rows, n, r, transposed, 2, n + 6, None);
            check_wgrad(rows, n, r, transposed, 1, n + 3, Some(2));
        }
    }
}

#[test]
fn weight_grad_sd_shapes() {
    // dB [n, r] += scale·dyᵀ·h: dy a slice of a fused q/k/v gradient, or dense.
    check_wgrad(4096, 320, 4, false, 320, 960, None);
    check_wgrad(4096, 320, 1, false, 0, 960, None);
    check_wgrad(4096, 640, 8, false, 0, 640, None);
    check_wgrad(4096, 2560, 16, false, 0, 2560, None);
    // dA [r, k] += dhᵀ·xd.
    check_wgrad(4096, 320, 4, true, 0, 320, None);
    check_wgrad(4096, 768, 8, true, 0, 768, None);
    check_wgrad(4096, 1280, 16, true, 0, 1280, None);
    check_wgrad(4096, 1280, 1, true, 0, 1280, None);
    check_wgrad(77, 320, 4, false, 0, 320, None);
}

#[test]
fn stacked_adapters() {
    // q, k, v of one fused product (3 members) and k, v (2), at odd sizes and SD's: dh from
    // the members' columns of dy, y += scale·h_g·B_gᵀ per segment, dB per segment.
    for &(m, seg, r, members) in &[(5, 6, 1, 3), (37, 10, 3, 3), (77, 130, 5, 2), (33, 8, 4, 4), (200, 38, 8, 2), (9, 4, 2, 3)] {
        let k = seg * members;
        check_narrow_g(m, k, r, false, 0, k, members);
        check_narrow_g(m, k, r, false, 2, k + 6, members);
        check_widen_g(m, k, r, true, 0, k, true, members);
        check_widen_g(m, k, r, true, 2, k + 6, false, members);
        for splits in [None, Some(1), Some(3)] {
            check_wgrad_g(m, k, r, false, 0, k, splits, members);
        }
        check_wgrad_g(m, k, r, false, 2, k + 6, Some(2), members);
    }
    // SD: the self-attention's q/k/v gradient [4096, 960] at rank 4, the cross k/v [77, 640].
    check_narrow_g(4096, 960, 4, false, 0, 960, 3);
    check_widen_g(4096, 960, 4, true, 0, 960, true, 3);
    check_wgrad_g(4096, 960, 4, false, 0, 960, None, 3);
    check_narrow_g(77, 640, 8, false, 0, 640, 2);
    check_widen_g(77, 640, 8, true, 0, 640, true, 2);
    check_wgrad_g(77, 640, 8, false, 0, 640, None, 2);
}

#[test]
fn bad_inputs_are_errors() {
    let g = gpu();
    let a = Tensor::empty(g, &[8, 16], DType::F16, "A").unwrap();
    let w = Tensor::empty(g, &[17, 16], DType::F16, "W").unwrap();
    let c = Tensor::empty(g, &[8, 17], DType::F16, "C").unwrap();
    // Rank over 16, A too small for its slice.
    assert!(narrow(g, Operand::dense(&a, 16), &w, true, &c, 8, 16, 17, 1.0).is_err());
    assert!(narrow(g, Operand::slice(&a, 2, 16), &w, true, &c, 8, 16, 4, 1.0).is_err());
    let gr = Tensor::empty(g, &[64], DType::F32, "G").unwrap();
    let h = Tensor::empty(g, &[8, 4], DType::F16, "H").unwrap();
    // G too small at that offset; a split product without partials.
    assert!(WeightGrad::new(8, 16, 4, 1.0, false).prepare(g, Operand::dense(&a, 16), &h, &gr, 8, None).is_err());
    // widen: odd width, Y in H's buffer, W too small.
    let y = Tensor::empty(g, &[8, 16], DType::F16, "Y").unwrap();
    assert!(widen(g, &h, &w, true, Operand::dense(&y, 15), 8, 15, 4, 1.0, true).is_err());
    assert!(widen(g, &h, &w, true, Operand::dense(&h, 4), 8, 4, 4, 1.0, true).is_err());
    assert!(widen(g, &h, &h, true, Operand::dense(&y, 16), 8, 16, 4, 1.0, true).is_err());
    assert!(widen(g, &h, &w, true, Operand::dense(&y, 16), 8, 16, 4, 1.0, true).is_ok());
    let mut wg = WeightGrad::new(8, 8, 4, 1.0, false);
    wg.force_splits = Some(2);
    assert!(wg.prepare(g, Operand::dense(&a, 16), &h, &gr, 0, None).is_err());
    // Stacked: ranks over 16 together, uneven or odd segments, too many vec4 groups for the
    // weight gradient, a transposed stacked gradient.
    let c16 = Tensor::empty(g, &[8, 18], DType::F16, "C").unwrap();
    assert!(narrow_stacked(g, Operand::dense(&a, 16), &w, &c16, 8, 16, 6, 3, 1.0).is_err());
    assert!(narrow_stacked(g, Operand::dense(&a, 15), &w, &c, 8, 15, 4, 2, 1.0).is_err());
    assert!(widen_stacked(g, &h, &w, Operand::dense(&y, 16), 8, 16, 2, 4, 1.0, true).is_err());
    assert!(widen_stacked(g, &h, &w, Operand::dense(&y, 16), 8, 16, 2, 2, 1.0, true).is_ok());
    assert!(WeightGrad::new(8, 12, 5, 1.0, false).stacked(3).prepare(g, Operand::dense(&a, 16), &c, &gr, 0, None).is_err());
    assert!(WeightGrad::new(8, 12, 4, 1.0, false).stacked(3).prepare(g, Operand::dense(&a, 16), &c, &gr, 0, None).is_ok());
    assert!(WeightGrad::new(8, 16, 4, 1.0, true).stacked(2).prepare(g, Operand::dense(&a, 16), &c, &gr, 0, None).is_err());
}
