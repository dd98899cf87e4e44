//! Op tests of the backward family (`src/kernels/grad_ops.rs`): SiLU / GELU / quick-GELU
//! backward, GEGLU backward, nearest-upsample backward (2x and to a size), concat backward
//! (overwrite and add) and the MSE loss with its gradient, against CPU references in f64 on
//! fresh seeded random inputs, with NaN-poisoned outputs, at tiny odd shapes and one real SD
//! shape per op, for f16 and f32 gradients. The analytic references are themselves checked
//! against central finite differences of the CPU forward on tiny shapes, and so are the GPU
//! results there.
//!
//! Bounds, on the scaled L2 error ||out - ref|| / ||scale||: the inputs are exactly what the
//! GPU stores (saved inputs rounded to f16; f16 gradients rounded before the reference) and
//! arithmetic is f32, so the error is the output's rounding plus a few f32 roundings. The
//! scale is |ref| (plain relative L2) except where an error is relative to something larger:
//! for the activations' derivatives the magnitudes of their two terms (they cancel where f'
//! crosses 0), plus an absolute allowance for GELU's erf approximation (Abramowitz-Stegun,
//! < 4.3e-7 absolute in f32, measured in tests/elementwise.rs); for upsample's sums the
//! terms' magnitudes. f16 outputs floor the scale at 2^-14, f16's smallest normal.
//! - f16 gradients: one rounding to f16, at most 2^-11 relative per element: bound 1e-3.
//! - f32 gradients: a few f32 roundings (2^-24 each) and the GPU's exp: bound 2e-6.
//! - Copies (concat backward that overwrites) must be bit-exact.
//! - The loss: a sum of n f32 squares in chunks of 4096 and a tree: error ~log2(n)·2^-24
//!   relative: bound 1e-5. Its f16 gradient at n = 32768 is ~1e-4, at f16's subnormal edge:
//!   the SD-shape test uses a loss scale of 1024 there, as training must.

mod common;

use atelier::gpu::{DType, Tensor};
use atelier::kernels::elementwise::{erf, Unary};
use atelier::kernels::grad_ops::{
    activation_backward, concat_backward, geglu_backward, mse_loss, mse_partials, upsample2x_backward,
    upsample_nearest_backward, Activation, GradOut,
};
use common::{gpu, random, round_f16, seed, POISON};

const GRADS: [DType; 2] = [DType::F16, DType::F32];

fn bound(g: DType) -> f64 {
    match g {
        DType::F16 => 1e-3,
        DType::F32 => 2e-6,
    }
}

/// Fresh values in [-scale, scale), exactly as `dtype` stores them; the seed is mixed with
/// `what`, so two inputs of one test differ even when ATELIER_TEST_SEED replays a run.
fn values(n: usize, scale: f32, dtype: DType, what: &str) -> Vec<f32> {
    let tag = what.bytes().fold(0xcbf29ce484222325u64, |h, b| (h ^ b as u64).wrapping_mul(0x100000001b3));
    let v: Vec<f32> = random(n, seed(what) ^ tag).iter().map(|x| scale * x).collect();
    if dtype == DType::F16 { round_f16(&v) } else { v }
}

fn upload(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_f32(gpu(), shape, dtype, v, "input").unwrap()
}

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::empty(gpu(), shape, dtype, "output").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

/// Asserts ||y - reference|| / ||scale|| < bound and returns it. `scale` is |reference| (plain
/// relative L2) unless an error is relative to something larger (see the bounds at the
/// top); it is floored at 2^-14 for f16 outputs, f16's smallest normal, below which the
/// rounding step is 2^-24 absolute rather than relative.
fn check(what: &str, y: &Tensor, reference: &[f64], scale: Option<&[f64]>, bound: f64) -> f64 {
    let out = y.to_f32(gpu()).unwrap();
    assert_eq!(out.len(), reference.len());
    let floor = if y.dtype == DType::F16 { 2f64.powi(-14) } else { 0.0 };
    let mut num = 0.0;
    let mut den = 0.0;
    for (i, (&o, &r)) in out.iter().zip(reference).enumerate() {
        num += if o.is_finite() { (o as f64 - r).powi(2) } else { f64::INFINITY };
        den += scale.map_or(r.abs(), |s| s[i]).max(floor).powi(2);
    }
    let e = (num / den.max(1e-300)).sqrt();
    eprintln!("{what}: scaled L2 error {e:.3e} (bound {bound:.0e})");
    assert!(e < bound, "{what}: scaled L2 error {e:.3e} over {bound:.0e}");
    e
}

/// Central finite differences of f at x, step 1e-5 (f64: truncation ~1e-10, roundoff ~1e-11).
fn fd_grad(f: impl Fn(&[f64]) -> f64, x: &[f64]) -> Vec<f64> {
    let h = 1e-5;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let up = f(&xp);
            xp[i] = x[i] - h;
            let down = f(&xp);
            xp[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

// ---- CPU references (f64) ----

fn unary(a: Activation) -> Unary {
    match a {
        Activation::Silu => Unary::Silu,
        Activation::Gelu => Unary::Gelu,
        Activation::QuickGelu => Unary::QuickGelu,
    }
}

fn gelu(x: f64) -> f64 {
    0.5 * x * (1.0 + erf(x / std::f64::consts::SQRT_2))
}

fn gelu_grad(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2)) + x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()
}

/// d/dx of x·sigmoid(kx).
fn sig_grad(x: f64, k: f64) -> f64 {
    let s = 1.0 / (1.0 + (-k * x).exp());
    s * (1.0 + k * x * (1.0 - s))
}

/// The error scale of dy·f'(x): |dy| times the magnitudes of f'(x)'s two terms (s and
/// k·x·s·(1-s), or Φ(x) and x·φ(x): f32 roundings are relative to the terms, which cancel
/// where f' crosses 0), plus for GELU 0.25, which covers the erf approximation's absolute
/// error in Φ (< 2.2e-7, i.e. < 8.8e-7 of 0.25, under the 2e-6 bound).
fn act_scale(a: Activation, x: f64, dy: f64) -> f64 {
    let terms = |k: f64| {
        let s = 1.0 / (1.0 + (-k * x).exp());
        s + (k * x * s * (1.0 - s)).abs()
    };
    dy.abs()
        * match a {
            Activation::Silu => terms(1.0),
            Activation::QuickGelu => terms(1.702),
            Activation::Gelu => gelu_scale(x),
        }
}

fn gelu_scale(x: f64) -> f64 {
    0.5 * (1.0 + erf(x / std::f64::consts::SQRT_2)) + (x * (-0.5 * x * x).exp() / (2.0 * std::f64::consts::PI).sqrt()).abs() + 0.25
}

fn act_grad(a: Activation, x: f64) -> f64 {
    match a {
        Activation::Silu => sig_grad(x, 1.0),
        Activation::Gelu => gelu_grad(x),
        Activation::QuickGelu => sig_grad(x, 1.702),
    }
}

fn geglu_fwd(x: &[f64], rows: usize, f: usize) -> Vec<f64> {
    (0..rows * f).map(|e| x[e / f * 2 * f + e % f] * gelu(x[e / f * 2 * f + f + e % f])).collect()
}

fn geglu_bwd(x: &[f64], dy: &[f64], rows: usize, f: usize) -> Vec<f64> {
    let mut dx = vec![0.0; rows * 2 * f];
    for r in 0..rows {
        for j in 0..f {
            let (a, g, d) = (x[r * 2 * f + j], x[r * 2 * f + f + j], dy[r * f + j]);
            dx[r * 2 * f + j] = d * gelu(g);
            dx[r * 2 * f + f + j] = d * a * gelu_grad(g);
        }
    }
    dx
}

type Up = (usize, (usize, usize), (usize, usize), usize);

fn upsample_fwd(x: &[f64], (b, (h, w), (oh, ow), c): Up) -> Vec<f64> {
    let mut y = vec![0.0; b * oh * ow * c];
    for i in 0..b {
        for oy in 0..oh {
            for ox in 0..ow {
                for k in 0..c {
                    y[((i * oh + oy) * ow + ox) * c + k] = x[((i * h + oy * h / oh) * w + ox * w / ow) * c + k];
                }
            }
        }
    }
    y
}

/// The scatter form (each output adds into its source): the GPU's gather must agree.
fn upsample_bwd(dy: &[f64], (b, (h, w), (oh, ow), c): Up) -> Vec<f64> {
    let mut dx = vec![0.0; b * h * w * c];
    for i in 0..b {
        for oy in 0..oh {
            for ox in 0..ow {
                for k in 0..c {
                    dx[((i * h + oy * h / oh) * w + ox * w / ow) * c + k] += dy[((i * oh + oy) * ow + ox) * c + k];
                }
            }
        }
    }
    dx
}

fn concat_fwd(a: &[f64], b: &[f64], rows: usize, c1: usize, c2: usize) -> Vec<f64> {
    (0..rows).flat_map(|r| a[r * c1..(r + 1) * c1].iter().chain(&b[r * c2..(r + 1) * c2]).copied().collect::<Vec<_>>()).collect()
}

fn mse(p: &[f64], t: &[f64]) -> f64 {
    p.iter().zip(t).map(|(a, b)| (a - b) * (a - b)).sum::<f64>() / p.len() as f64
}

// ---- the analytic references against finite differences ----

#[test]
fn references_match_finite_differences() {
    let near = |what: &str, a: &[f64], fd: &[f64]| {
        let e = (a.iter().zip(fd).map(|(x, y)| (x - y).powi(2)).sum::<f64>() / fd.iter().map(|y| y * y).sum::<f64>()).sqrt();
        eprintln!("{what}: analytic vs finite differences {e:.3e}");
        assert!(e < 1e-7, "{what}: analytic vs finite differences {e:.3e}");
    };
    let x = f64s(&values(37, 4.0, DType::F32, "fd x"));
    for a in Activation::ALL {
        let fd: Vec<f64> = x.iter().map(|&v| fd_grad(|z| unary(a).reference(z[0]), &[v])[0]).collect();
        let an: Vec<f64> = x.iter().map(|&v| act_grad(a, v)).collect();
        let e = (an.iter().zip(&fd).map(|(p, q)| (p - q).powi(2)).sum::<f64>() / fd.iter().map(|q| q * q).sum::<f64>()).sqrt();
        eprintln!("{a:?}': analytic vs finite differences {e:.3e}");
        assert!(e < 1e-8, "{a:?}: {e:.3e}");
    }
    let (rows, f) = (3, 4);
    let x = f64s(&values(rows * 2 * f, 3.0, DType::F32, "fd geglu x"));
    let dy = f64s(&values(rows * f, 1.0, DType::F32, "fd geglu dy"));
    let fd = fd_grad(|z| dot(&geglu_fwd(z, rows, f), &dy), &x);
    near("geglu", &geglu_bwd(&x, &dy, rows, f), &fd);
    for s in [(2, (2, 3), (4, 6), 2), (1, (2, 3), (3, 7), 2), (1, (3, 2), (5, 5), 4)] {
        let (b, (h, w), (oh, ow), c) = s;
        let x = f64s(&values(b * h * w * c, 1.0, DType::F32, "fd upsample x"));
        let dy = f64s(&values(b * oh * ow * c, 1.0, DType::F32, "fd upsample dy"));
        let fd = fd_grad(|z| dot(&upsample_fwd(z, s), &dy), &x);
        near("upsample", &upsample_bwd(&dy, s), &fd);
    }
    let (rows, c1, c2) = (3, 2, 4);
    let ab = f64s(&values(rows * (c1 + c2), 1.0, DType::F32, "fd concat"));
    let dy = f64s(&values(rows * (c1 + c2), 1.0, DType::F32, "fd concat dy"));
    let fd = fd_grad(|z| dot(&concat_fwd(&z[..rows * c1], &z[rows * c1..], rows, c1, c2), &dy), &ab);
    let split: Vec<f64> = (0..rows).flat_map(|r| dy[r * 6..r * 6 + c1].to_vec()).chain((0..rows).flat_map(|r| dy[r * 6 + c1..r * 6 + 6].to_vec())).collect();
    near("concat", &split, &fd);
    let p = f64s(&values(11, 1.0, DType::F32, "fd mse pred"));
    let t = f64s(&values(11, 1.0, DType::F32, "fd mse target"));
    let fd = fd_grad(|z| mse(z, &t), &p);
    let an: Vec<f64> = p.iter().zip(&t).map(|(a, b)| 2.0 * (a - b) / 11.0).collect();
    near("mse", &an, &fd);
}

// ---- the GPU kernels ----

#[test]
fn activation_backward_matches_reference() {
    let g = gpu();
    for n in [1usize, 7, 9, 1023, 2 * 64 * 64 * 320 + 3] {
        for a in Activation::ALL {
            for gd in GRADS {
                let what = format!("{a:?} backward n {n} {gd} grads");
                let x = values(n, 6.0, DType::F16, &format!("{what} x"));
                let dy = values(n, 1.0, gd, &format!("{what} dy"));
                let dx = poisoned(&[n], gd);
                g.run_now(&activation_backward(g, a, &upload(&x, &[n], DType::F16), &upload(&dy, &[n], gd), &dx).unwrap()).unwrap();
                let r: Vec<f64> = x.iter().zip(&dy).map(|(&x, &d)| d as f64 * act_grad(a, x as f64)).collect();
                let sc: Vec<f64> = x.iter().zip(&dy).map(|(&x, &d)| act_scale(a, x as f64, d as f64)).collect();
                check(&what, &dx, &r, Some(&sc), bound(gd));
                if n <= 9 && gd == DType::F32 {
                    // Directly against finite differences of the forward.
                    let fd: Vec<f64> = x.iter().zip(&dy).map(|(&x, &d)| d as f64 * fd_grad(|z| unary(a).reference(z[0]), &[x as f64])[0]).collect();
                    check(&format!("{what} vs finite differences"), &dx, &fd, Some(&sc), bound(gd));
                }
            }
        }
    }
}

#[test]
fn geglu_backward_matches_reference() {
    let g = gpu();
    for (rows, f) in [(1usize, 2usize), (3, 6), (5, 10), (4096, 1280)] {
        for gd in GRADS {
            let what = format!("geglu backward {rows}x2x{f} {gd} grads");
            let x = values(rows * 2 * f, 3.0, DType::F16, &format!("{what} x"));
            let dy = values(rows * f, 1.0, gd, &format!("{what} dy"));
            let dx = poisoned(&[rows, 2 * f], gd);
            g.run_now(&geglu_backward(g, &upload(&x, &[rows, 2 * f], DType::F16), &upload(&dy, &[rows, f], gd), &dx, rows, f).unwrap()).unwrap();
            let (x64, dy64) = (f64s(&x), f64s(&dy));
            // Scale: |dy|·(|gelu(g)| + 0.5|g|) for the a half (gelu(g) = g·Φ(g), Φ within
            // 2.2e-7 absolute), |dy·a|·gelu_scale(g) for the g half (as the activations).
            let mut sc = vec![0.0; rows * 2 * f];
            for (e, &d) in dy64.iter().enumerate() {
                let (ia, gi) = (e / f * 2 * f + e % f, e / f * 2 * f + f + e % f);
                sc[ia] = d.abs() * (gelu(x64[gi]).abs() + 0.5 * x64[gi].abs());
                sc[gi] = (d * x64[ia]).abs() * gelu_scale(x64[gi]);
            }
            check(&what, &dx, &geglu_bwd(&x64, &dy64, rows, f), Some(&sc), bound(gd));
            if rows * f <= 30 && gd == DType::F32 {
                let fd = fd_grad(|z| dot(&geglu_fwd(z, rows, f), &dy64), &x64);
                check(&format!("{what} vs finite differences"), &dx, &fd, Some(&sc), bound(gd));
            }
        }
    }
}

#[test]
fn upsample_backward_matches_reference() {
    let g = gpu();
    let shapes: [Up; 8] = [
        (1, (1, 1), (2, 2), 2),
        (2, (3, 5), (6, 10), 6),
        (2, (16, 16), (32, 32), 1280), // SD's up-block upsampler at 512x512, CFG batch
        (1, (1, 2), (2, 3), 4),
        (2, (2, 3), (3, 6), 6),
        (1, (3, 5), (7, 11), 8),
        (1, (4, 4), (4, 4), 2),
        (1, (2, 3), (9, 5), 2),
    ];
    for s in shapes {
        let (b, (h, w), (oh, ow), c) = s;
        for gd in GRADS {
            let what = format!("upsample backward {b}x{h}x{w}x{c} from {oh}x{ow} {gd} grads");
            let dy = values(b * oh * ow * c, 1.0, gd, &what);
            let dx = poisoned(&[b, h, w, c], gd);
            let dyt = upload(&dy, &[b, oh, ow, c], gd);
            let d = if (oh, ow) == (2 * h, 2 * w) {
                upsample2x_backward(g, &dyt, &dx, b, h, w, c)
            } else {
                upsample_nearest_backward(g, &dyt, &dx, b, (h, w), (oh, ow), c)
            };
            g.run_now(&d.unwrap()).unwrap();
            let dy64 = f64s(&dy);
            // Scale: the sum of the terms' magnitudes (f32 sums round relative to the terms).
            let sc = upsample_bwd(&dy64.iter().map(|v| v.abs()).collect::<Vec<_>>(), s);
            check(&what, &dx, &upsample_bwd(&dy64, s), Some(&sc), bound(gd));
            if b * h * w * c <= 64 && gd == DType::F32 {
                let x0 = vec![0.0; b * h * w * c];
                let fd = fd_grad(|z| dot(&upsample_fwd(z, s), &dy64), &x0);
                check(&format!("{what} vs finite differences"), &dx, &fd, Some(&sc), bound(gd));
            }
        }
    }
}

#[test]
fn concat_backward_splits_and_adds() {
    let g = gpu();
    for (rows, c1, c2) in [(1usize, 2usize, 2usize), (7, 6, 10), (3, 4, 2), (2 * 64 * 64, 640, 320)] {
        for gd in GRADS {
            let what = format!("concat backward {rows}x({c1}+{c2}) {gd} grads");
            let dy = values(rows * (c1 + c2), 1.0, gd, &what);
            let dyt = upload(&dy, &[rows, c1 + c2], gd);
            let ra: Vec<f32> = (0..rows).flat_map(|r| dy[r * (c1 + c2)..r * (c1 + c2) + c1].to_vec()).collect();
            let rb: Vec<f32> = (0..rows).flat_map(|r| dy[r * (c1 + c2) + c1..(r + 1) * (c1 + c2)].to_vec()).collect();
            // Overwrite both: bit-exact copies.
            let (da, db) = (poisoned(&[rows, c1], gd), poisoned(&[rows, c2], gd));
            for d in concat_backward(g, &dyt, GradOut::set(&da), GradOut::set(&db), rows, c1, c2).unwrap() {
                g.run_now(&d).unwrap();
            }
            for (t, r, name) in [(&da, &ra, "da"), (&db, &rb, "db")] {
                let o = t.to_f32(g).unwrap();
                assert!(o.iter().zip(r.iter()).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: {name} is not an exact copy");
            }
            // Add into an existing skip gradient (da), overwrite db.
            let old = values(rows * c1, 1.0, gd, &format!("{what} old da"));
            let da = upload(&old, &[rows, c1], gd);
            let db = poisoned(&[rows, c2], gd);
            for d in concat_backward(g, &dyt, GradOut::add(&da), GradOut::set(&db), rows, c1, c2).unwrap() {
                g.run_now(&d).unwrap();
            }
            let r: Vec<f64> = ra.iter().zip(&old).map(|(&a, &b)| a as f64 + b as f64).collect();
            check(&format!("{what} da += "), &da, &r, None, bound(gd));
            let o = db.to_f32(g).unwrap();
            assert!(o.iter().zip(&rb).all(|(a, b)| a.to_bits() == b.to_bits()), "{what}: db (beside da +=) is not an exact copy");
            if rows * (c1 + c2) <= 20 && gd == DType::F32 {
                // The split against finite differences of the forward (a and b stacked).
                let n = rows * (c1 + c2);
                let dy64 = f64s(&dy);
                let fd = fd_grad(|z| dot(&concat_fwd(&z[..rows * c1], &z[rows * c1..], rows, c1, c2), &dy64), &vec![0.0; n]);
                let both = poisoned(&[rows * c1], gd);
                let [d, _] = concat_backward(g, &dyt, GradOut::set(&both), GradOut::set(&db), rows, c1, c2).unwrap();
                g.run_now(&d).unwrap();
                check(&format!("{what} da vs finite differences"), &both, &fd[..rows * c1], None, bound(gd));
                check(&format!("{what} db vs finite differences"), &db, &fd[rows * c1..], None, bound(gd));
            }
        }
    }
}

/// Runs the two MSE launches; returns (loss, dpred).
fn run_mse(pred: &[f32], target: &[f32], gd: DType, scale: f32) -> (f32, Tensor) {
    let g = gpu();
    let n = pred.len();
    let dpred = poisoned(&[n], gd);
    let partials = poisoned(&[mse_partials(n)], DType::F32);
    let loss = poisoned(&[1], DType::F32);
    let ds = mse_loss(g, &upload(pred, &[n], DType::F16), &upload(target, &[n], DType::F16), &dpred, &partials, &loss, scale).unwrap();
    for d in &ds {
        g.run_now(d).unwrap();
    }
    (loss.to_f32(g).unwrap()[0], dpred)
}

#[test]
fn mse_loss_and_gradient_match_reference() {
    for (n, scale) in [(1usize, 1.0f32), (7, 1.0), (4097, 1.0), (3 * 4096 + 5, 8.0), (2 * 4 * 64 * 64, 1.0), (2 * 4 * 64 * 64, 1024.0)] {
        for gd in GRADS {
            if gd == DType::F16 && n == 2 * 4 * 64 * 64 && scale == 1.0 {
                continue; // unscaled f16 gradients of ~1e-4 are subnormal: not how training runs
            }
            let what = format!("mse n {n} scale {scale} {gd} grads");
            let p = values(n, 2.0, DType::F16, &format!("{what} pred"));
            let t = values(n, 1.0, DType::F16, &format!("{what} target"));
            let (loss, dpred) = run_mse(&p, &t, gd, scale);
            let (p64, t64) = (f64s(&p), f64s(&t));
            let r = mse(&p64, &t64);
            let e = (loss as f64 - r).abs() / r.max(f64::MIN_POSITIVE);
            eprintln!("{what}: loss {loss} vs {r}, rel {e:.3e} (bound 1e-5)");
            assert!(e < 1e-5, "{what}: loss {loss} vs {r}");
            let rg: Vec<f64> = p64.iter().zip(&t64).map(|(a, b)| scale as f64 * 2.0 * (a - b) / n as f64).collect();
            check(&format!("{what} dpred"), &dpred, &rg, None, bound(gd));
            if n <= 7 && gd == DType::F32 {
                let fd: Vec<f64> = fd_grad(|z| mse(z, &t64), &p64).iter().map(|v| v * scale as f64).collect();
                check(&format!("{what} dpred vs finite differences"), &dpred, &fd, None, bound(gd));
            }
            // Deterministic: a second run gives the same bits.
            let (again, _) = run_mse(&p, &t, gd, scale);
            assert_eq!(loss.to_bits(), again.to_bits(), "{what}: loss not deterministic");
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let g = gpu();
    let a16 = upload(&[0.0; 8], &[2, 4], DType::F16);
    let b16 = poisoned(&[2, 4], DType::F16);
    let b32 = poisoned(&[2, 4], DType::F32);
    let x32 = upload(&[0.0; 8], &[2, 4], DType::F32);
    assert!(activation_backward(g, Activation::Silu, &x32, &a16, &b16).is_err(), "x must be f16");
    assert!(activation_backward(g, Activation::Silu, &a16, &a16, &b32).is_err(), "dy and dx dtypes differ");
    assert!(activation_backward(g, Activation::Silu, &a16, &a16, &a16).is_err(), "dx aliases x");
    assert!(geglu_backward(g, &a16, &a16, &b16, 2, 4).is_err(), "dy must be [rows, f]");
    let y = poisoned(&[1, 4, 4, 3], DType::F16);
    assert!(upsample2x_backward(g, &y, &poisoned(&[1, 2, 2, 3], DType::F16), 1, 2, 2, 3).is_err(), "odd channels");
    assert!(upsample_nearest_backward(g, &a16, &b16, 1, (2, 2), (1, 1), 2).is_err(), "downsampling");
    assert!(concat_backward(g, &a16, GradOut::set(&b16), GradOut::set(&b16), 2, 2, 2).is_err(), "da and db alias");
    let (p, l, part) = (poisoned(&[7], DType::F32), poisoned(&[1], DType::F32), poisoned(&[1], DType::F32));
    assert!(mse_loss(g, &a16, &a16, &b16, &part, &poisoned(&[2], DType::F32), 1.0).is_err(), "loss must be [1]");
    assert!(mse_loss(g, &a16, &a16, &p, &part, &l, 1.0).is_err(), "dpred must have n elements");
    assert!(mse_loss(g, &a16, &a16, &b16, &poisoned(&[1], DType::F16), &l, 1.0).is_err(), "partials must be f32");
}
