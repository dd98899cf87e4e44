//! Op tests for shaders/norm_backward.wgsl (dX of group norm, with and without the fused SiLU,
//! and of layer norm) and for the forward variants that save the statistics it reads
//! (`GroupNorm::prepare_saving`, `layer_norm_saving`).
//!
//! The reference is the analytic backward in f64; it is itself checked against central finite
//! differences of the f64 CPU forward on tiny shapes. The GPU runs forward (saving stats) and
//! backward on fresh seeded random inputs with NaN-poisoned outputs, at tiny, odd and real
//! SD-1.5 shapes, with dy and dx each f16 or f32. (C not a multiple of 8 is refused by the
//! forward, so the odd shapes are C = 24, 40, ... and groups straddling 8-channel words.)
//! With `accumulate`, dx is pre-filled with random values instead of poison and must come
//! out as old + gradient.

mod common;

use atelier::gpu::{DType, Recorder, Tensor};
use atelier::kernels::norm::{layer_norm_saving, GroupNorm};
use atelier::kernels::norm_backward::{layer_norm_backward, GroupNormBackward};
use common::{gpu, random, rel_l2, round_f16, seed, POISON};

/// f16 output: each value is rounded to f16 once (relative error at most 2^-11, ~3e-4 RMS);
/// the f32 sums and statistics add ~1e-6. A wrong term (mean(dn), the n·mean(dn·n)
/// correction, rstd, the SiLU derivative, gamma) is off by far more than 1e-3.
const BOUND_F16: f64 = 1e-3;
/// f32 output: only f32 arithmetic — statistics (relative ~1e-7 of the spread), sums of up to
/// 20k terms per group, exp in SiLU (a few ulp) — so a few 1e-6 at most; 2e-5 leaves room
/// for GPUs whose exp is less exact than lavapipe's.
const BOUND_F32: f64 = 2e-5;
/// Finite differences in f64 with h = 1e-4: truncation ~h²·|f'''| ~ 1e-8, rounding
/// ~1e-16 / h ~ 1e-12; the reference must agree to 1e-6.
const BOUND_FD: f64 = 1e-6;

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

fn dsilu(z: f64) -> f64 {
    let s = 1.0 / (1.0 + (-z).exp());
    s * (1.0 + z * (1.0 - s))
}

#[derive(Clone, Copy, Debug)]
struct Gn {
    batch: usize,
    rows: usize,
    c: usize,
    groups: usize,
    silu: bool,
}

impl Gn {
    fn n(&self) -> usize {
        self.batch * self.rows * self.c
    }
    fn at(&self, b: usize, r: usize, ch: usize) -> usize {
        (b * self.rows + r) * self.c + ch
    }
}

/// Per (item, group): (mean, 1/sqrt(biased var + eps)), as the forward saves them.
fn gn_stats(s: Gn, x: &[f64], eps: f64) -> Vec<(f64, f64)> {
    let cg = s.c / s.groups;
    let mut out = Vec::new();
    for b in 0..s.batch {
        for g in 0..s.groups {
            let vals: Vec<f64> =
                (0..s.rows).flat_map(|r| (0..cg).map(move |k| (r, k))).map(|(r, k)| x[s.at(b, r, g * cg + k)]).collect();
            let mean = vals.iter().sum::<f64>() / vals.len() as f64;
            let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
            out.push((mean, 1.0 / (var + eps).sqrt()));
        }
    }
    out
}

fn gn_forward(s: Gn, x: &[f64], eps: f64, gamma: &[f64], beta: &[f64]) -> Vec<f64> {
    let st = gn_stats(s, x, eps);
    let cg = s.c / s.groups;
    let mut y = vec![0.0; x.len()];
    for b in 0..s.batch {
        for r in 0..s.rows {
            for ch in 0..s.c {
                let (mean, rstd) = st[b * s.groups + ch / cg];
                let i = s.at(b, r, ch);
                let z = (x[i] - mean) * rstd * gamma[ch] + beta[ch];
                y[i] = if s.silu { silu(z) } else { z };
            }
        }
    }
    y
}

/// The analytic dX: dz = dy·silu'(z) (or dy), dn = dz·gamma,
/// dx = rstd·(dn - mean(dn) - n·mean(dn·n)) over each (item, group).
fn gn_backward(s: Gn, x: &[f64], eps: f64, gamma: &[f64], beta: &[f64], dy: &[f64]) -> Vec<f64> {
    let st = gn_stats(s, x, eps);
    let cg = s.c / s.groups;
    let mut dx = vec![0.0; x.len()];
    for b in 0..s.batch {
        for g in 0..s.groups {
            let (mean, rstd) = st[b * s.groups + g];
            let idx: Vec<(usize, usize)> =
                (0..s.rows).flat_map(|r| (0..cg).map(move |k| (r, g * cg + k))).map(|(r, ch)| (s.at(b, r, ch), ch)).collect();
            let nd: Vec<(f64, f64)> = idx
                .iter()
                .map(|&(i, ch)| {
                    let n = (x[i] - mean) * rstd;
                    let dz = if s.silu { dy[i] * dsilu(n * gamma[ch] + beta[ch]) } else { dy[i] };
                    (n, dz * gamma[ch])
                })
                .collect();
            let cnt = nd.len() as f64;
            let ma = nd.iter().map(|&(_, dn)| dn).sum::<f64>() / cnt;
            let mb = nd.iter().map(|&(n, dn)| dn * n).sum::<f64>() / cnt;
            for (&(i, _), &(n, dn)) in idx.iter().zip(&nd) {
                dx[i] = rstd * (dn - ma - n * mb);
            }
        }
    }
    dx
}

fn ln_stats(x: &[f64], c: usize, eps: f64) -> Vec<(f64, f64)> {
    x.chunks(c)
        .map(|row| {
            let mean = row.iter().sum::<f64>() / c as f64;
            let var = row.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / c as f64;
            (mean, 1.0 / (var + eps).sqrt())
        })
        .collect()
}

fn ln_forward(x: &[f64], c: usize, eps: f64, gamma: &[f64], beta: &[f64]) -> Vec<f64> {
    let st = ln_stats(x, c, eps);
    x.iter().enumerate().map(|(i, &v)| (v - st[i / c].0) * st[i / c].1 * gamma[i % c] + beta[i % c]).collect()
}

fn ln_backward(x: &[f64], c: usize, eps: f64, gamma: &[f64], dy: &[f64]) -> Vec<f64> {
    let st = ln_stats(x, c, eps);
    let mut dx = vec![0.0; x.len()];
    for (r, &(mean, rstd)) in st.iter().enumerate() {
        let span = r * c..(r + 1) * c;
        let n: Vec<f64> = x[span.clone()].iter().map(|v| (v - mean) * rstd).collect();
        let dn: Vec<f64> = dy[span.clone()].iter().zip(gamma).map(|(d, g)| d * g).collect();
        let ma = dn.iter().sum::<f64>() / c as f64;
        let mb = dn.iter().zip(&n).map(|(d, n)| d * n).sum::<f64>() / c as f64;
        for k in 0..c {
            dx[r * c + k] = rstd * (dn[k] - ma - n[k] * mb);
        }
    }
    dx
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Central differences of L(x) = Σ dy·f(x).
fn finite_diff(x: &[f64], dy: &[f64], f: impl Fn(&[f64]) -> Vec<f64>) -> Vec<f64> {
    let h = 1e-4;
    let loss = |x: &[f64]| f(x).iter().zip(dy).map(|(y, d)| y * d).sum::<f64>();
    (0..x.len())
        .map(|i| {
            let mut xp = x.to_vec();
            xp[i] += h;
            let mut xm = x.to_vec();
            xm[i] -= h;
            (loss(&xp) - loss(&xm)) / (2.0 * h)
        })
        .collect()
}

fn rel_l2_64(a: &[f64], b: &[f64]) -> f64 {
    let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
    let den: f64 = b.iter().map(|y| y * y).sum();
    (num / den).sqrt()
}

#[test]
fn reference_matches_finite_differences() {
    // Tiny shapes (the CPU forward takes any C): groups 1/2/3/8, SiLU on and off, a small and
    // a large eps (the formula is exact for var + eps).
    let cases = [
        (Gn { batch: 1, rows: 1, c: 8, groups: 2, silu: false }, 1e-5),
        (Gn { batch: 2, rows: 3, c: 6, groups: 3, silu: true }, 1e-5),
        (Gn { batch: 1, rows: 4, c: 8, groups: 1, silu: true }, 0.5),
        (Gn { batch: 1, rows: 2, c: 16, groups: 8, silu: false }, 0.5),
        (Gn { batch: 2, rows: 5, c: 10, groups: 2, silu: true }, 1e-5),
    ];
    for (s, eps) in cases {
        let what = format!("finite differences, group norm {s:?} eps {eps}");
        let sd = seed(&what);
        let x = f64s(&random(s.n(), sd));
        let dy = f64s(&random(s.n(), sd ^ 3));
        let gamma: Vec<f64> = random(s.c, sd ^ 1).iter().map(|&v| 1.0 + 0.5 * v as f64).collect();
        let beta = f64s(&random(s.c, sd ^ 2));
        let fd = finite_diff(&x, &dy, |x| gn_forward(s, x, eps, &gamma, &beta));
        let e = rel_l2_64(&gn_backward(s, &x, eps, &gamma, &beta, &dy), &fd);
        eprintln!("{what}: rel L2 {e:.2e}");
        assert!(e < BOUND_FD, "{what}: rel L2 {e:.3e} over {BOUND_FD:.0e}");
    }
    for (rows, c, eps) in [(1, 4, 1e-5), (3, 7, 1e-5), (2, 16, 0.5)] {
        let what = format!("finite differences, layer norm {rows}x{c} eps {eps}");
        let sd = seed(&what);
        let x = f64s(&random(rows * c, sd));
        let dy = f64s(&random(rows * c, sd ^ 3));
        let gamma: Vec<f64> = random(c, sd ^ 1).iter().map(|&v| 1.0 + 0.5 * v as f64).collect();
        let beta = f64s(&random(c, sd ^ 2));
        let fd = finite_diff(&x, &dy, |x| ln_forward(x, c, eps, &gamma, &beta));
        let e = rel_l2_64(&ln_backward(&x, c, eps, &gamma, &dy), &fd);
        eprintln!("{what}: rel L2 {e:.2e}");
        assert!(e < BOUND_FD, "{what}: rel L2 {e:.3e} over {BOUND_FD:.0e}");
    }
}

fn upload(v: &[f32], shape: &[usize], dtype: DType) -> Tensor {
    Tensor::from_f32(gpu(), shape, dtype, v, "input").unwrap()
}

fn poisoned(shape: &[usize], dtype: DType) -> Tensor {
    let t = Tensor::empty(gpu(), shape, dtype, "output").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

/// offset + scale·U(-1, 1), rounded to f16 when stored as f16 (the reference sees what the
/// GPU sees).
fn input(n: usize, offset: f32, scale: f32, seed: u64, dtype: DType) -> Vec<f32> {
    let v: Vec<f32> = random(n, seed).iter().map(|x| offset + scale * x).collect();
    if dtype == DType::F16 { round_f16(&v) } else { v }
}

fn bound(dx: DType) -> f64 {
    if dx == DType::F16 { BOUND_F16 } else { BOUND_F32 }
}

/// Saved statistics against f64: rstd relative L2, and the mean's error in units of the
/// standard deviation (the mean itself may be ~0).
fn check_stats(what: &str, got: &[(f32, f32)], reference: &[(f64, f64)]) {
    let rstd: Vec<f32> = got.iter().map(|s| s.1).collect();
    let rref: Vec<f64> = reference.iter().map(|s| s.1).collect();
    let e = rel_l2(&rstd, &rref);
    assert!(e < 1e-4, "{what}: saved rstd rel L2 {e:.3e}");
    let worst = got.iter().zip(reference).map(|(g, r)| (g.0 as f64 - r.0).abs() * r.1).fold(0.0, f64::max);
    assert!(worst < 1e-4, "{what}: saved mean off by {worst:.3e} standard deviations");
}

/// With `acc`, dx starts as random values (rounded to its dtype) and must end as old + dx.
fn run_group_norm(s: Gn, dy_t: DType, dx_t: DType, offset: f32, acc: bool) {
    let g = gpu();
    let what = format!("group norm backward {s:?} dy {dy_t} dx {dx_t} offset {offset}{}", if acc { " accumulate" } else { "" });
    let sd = seed(&what);
    let shape = [s.batch, s.rows, s.c];
    let eps = 1e-5;
    let x = input(s.n(), offset, 2.0, sd, DType::F16);
    let gamma = input(s.c, 1.0, 0.5, sd ^ 1, DType::F16);
    let beta = input(s.c, 0.0, 0.5, sd ^ 2, DType::F16);
    let dy = input(s.n(), 0.0, 1.0, sd ^ 3, dy_t);
    let (tx, tg, tb) = (upload(&x, &shape, DType::F16), upload(&gamma, &[s.c], DType::F16), upload(&beta, &[s.c], DType::F16));
    let tdy = upload(&dy, &shape, dy_t);
    let ty = poisoned(&shape, DType::F16);
    let old = input(s.n(), 0.0, 1.0, sd ^ 4, dx_t);
    let tdx = if acc { upload(&old, &shape, dx_t) } else { poisoned(&shape, dx_t) };
    let gn = GroupNorm::new(g, s.batch, s.rows, s.c, s.groups, eps, s.silu).unwrap();
    let stats = gn.new_stats(g, "saved stats").unwrap();
    stats.fill_words(g, POISON);
    let bw = GroupNormBackward::new(g, s.batch, s.rows, s.c, s.groups, s.silu).unwrap();
    let mut rec = Recorder::new(g);
    for d in gn.prepare_saving(g, &tx, &tg, &tb, &ty, &stats).unwrap() {
        rec.run(&d).unwrap();
    }
    for d in bw.prepare(g, &tx, &tg, &tb, &stats, &tdy, &tdx, acc).unwrap() {
        rec.run(&d).unwrap();
    }
    rec.finish().unwrap();

    let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
    let ey = rel_l2(&ty.to_f32(g).unwrap(), &gn_forward(s, &x64, eps as f64, &g64, &b64));
    assert!(ey < BOUND_F16, "{what}: forward y rel L2 {ey:.3e}");
    let st = stats.to_f32(g).unwrap();
    let st: Vec<(f32, f32)> = st.chunks(4).map(|w| (w[0], w[1])).collect();
    check_stats(&what, &st, &gn_stats(s, &x64, eps as f64));
    let mut r = gn_backward(s, &x64, eps as f64, &g64, &b64, &f64s(&dy));
    if acc {
        r.iter_mut().zip(&old).for_each(|(r, &o)| *r += o as f64);
    }
    let e = rel_l2(&tdx.to_f32(g).unwrap(), &r);
    eprintln!("{what}: dx rel L2 {e:.2e}");
    assert!(e < bound(dx_t), "{what}: dx rel L2 {e:.3e} over {:.0e}", bound(dx_t));
}

const DTYPES: [(DType, DType); 4] =
    [(DType::F16, DType::F16), (DType::F16, DType::F32), (DType::F32, DType::F16), (DType::F32, DType::F32)];

#[test]
fn group_norm_backward_tiny_and_odd_shapes() {
    let shapes = [
        Gn { batch: 1, rows: 1, c: 8, groups: 2, silu: true },    // one row: groups of 4 values
        Gn { batch: 1, rows: 7, c: 64, groups: 32, silu: false },  // 2 channels per group
        Gn { batch: 2, rows: 33, c: 40, groups: 4, silu: true },   // groups of 10 straddle the words
        Gn { batch: 1, rows: 5, c: 24, groups: 1, silu: false },   // one group
        Gn { batch: 2, rows: 300, c: 16, groups: 8, silu: true },  // many blocks, 128 lanes
        Gn { batch: 3, rows: 100, c: 96, groups: 32, silu: true },
    ];
    for s in shapes {
        for (dy, dx) in DTYPES {
            run_group_norm(s, dy, dx, 0.0, false);
        }
    }
    // A mean far from 0 (x - mean must be formed before scaling).
    run_group_norm(Gn { batch: 1, rows: 64, c: 128, groups: 32, silu: true }, DType::F16, DType::F32, 50.0, false);
}

#[test]
fn group_norm_backward_sd_shapes() {
    // UNet at 256x256 latents 32x32, C 640 (up block): 20480 values per group, 64 blocks.
    for (dy, dx) in [(DType::F16, DType::F16), (DType::F32, DType::F32)] {
        run_group_norm(Gn { batch: 2, rows: 32 * 32, c: 640, groups: 32, silu: true }, dy, dx, 0.0, false);
    }
    run_group_norm(Gn { batch: 2, rows: 32 * 32, c: 640, groups: 32, silu: false }, DType::F16, DType::F32, 0.0, false);
    // Widest concat: 320 words per row, more than the 256 invocations.
    run_group_norm(Gn { batch: 1, rows: 8 * 8, c: 2560, groups: 32, silu: true }, DType::F32, DType::F16, 0.0, false);
}

/// With `acc`, dx starts as random values (rounded to its dtype) and must end as old + dx.
fn run_layer_norm(rows: usize, c: usize, dy_t: DType, dx_t: DType, offset: f32, acc: bool) {
    let g = gpu();
    let what = format!("layer norm backward {rows}x{c} dy {dy_t} dx {dx_t} offset {offset}{}", if acc { " accumulate" } else { "" });
    let sd = seed(&what);
    let eps = 1e-5;
    let x = input(rows * c, offset, 2.0, sd, DType::F16);
    let gamma = input(c, 1.0, 0.5, sd ^ 1, DType::F16);
    let beta = input(c, 0.0, 0.5, sd ^ 2, DType::F16);
    let dy = input(rows * c, 0.0, 1.0, sd ^ 3, dy_t);
    let (tx, tg, tb) = (upload(&x, &[rows, c], DType::F16), upload(&gamma, &[c], DType::F16), upload(&beta, &[c], DType::F16));
    let tdy = upload(&dy, &[rows, c], dy_t);
    let ty = poisoned(&[rows, c], DType::F16);
    let stats = poisoned(&[rows, 2], DType::F32);
    let old = input(rows * c, 0.0, 1.0, sd ^ 4, dx_t);
    let tdx = if acc { upload(&old, &[rows, c], dx_t) } else { poisoned(&[rows, c], dx_t) };
    let mut rec = Recorder::new(g);
    rec.run(&layer_norm_saving(g, &tx, &tg, &tb, &ty, &stats, eps).unwrap()).unwrap();
    rec.run(&layer_norm_backward(g, &tx, &tg, &stats, &tdy, &tdx, acc).unwrap()).unwrap();
    rec.finish().unwrap();

    let (x64, g64, b64) = (f64s(&x), f64s(&gamma), f64s(&beta));
    let ey = rel_l2(&ty.to_f32(g).unwrap(), &ln_forward(&x64, c, eps as f64, &g64, &b64));
    assert!(ey < BOUND_F16, "{what}: forward y rel L2 {ey:.3e}");
    let st = stats.to_f32(g).unwrap();
    let st: Vec<(f32, f32)> = st.chunks(2).map(|w| (w[0], w[1])).collect();
    check_stats(&what, &st, &ln_stats(&x64, c, eps as f64));
    let mut r = ln_backward(&x64, c, eps as f64, &g64, &f64s(&dy));
    if acc {
        r.iter_mut().zip(&old).for_each(|(r, &o)| *r += o as f64);
    }
    let e = rel_l2(&tdx.to_f32(g).unwrap(), &r);
    eprintln!("{what}: dx rel L2 {e:.2e}");
    assert!(e < bound(dx_t), "{what}: dx rel L2 {e:.3e} over {:.0e}", bound(dx_t));
}

#[test]
fn layer_norm_backward_shapes() {
    // Tiny and odd rows (an odd row count: the last stats pair sits in a half-used word), more
    // than 64 words per row, CLIP's 77x768.
    for (rows, c) in [(1, 8), (5, 24), (3, 1032), (77, 768)] {
        for (dy, dx) in DTYPES {
            run_layer_norm(rows, c, dy, dx, 0.0, false);
        }
    }
    run_layer_norm(64, 512, DType::F16, DType::F32, 100.0, false);
    // UNet transformer at 64x64 latents.
    for (dy, dx) in [(DType::F16, DType::F16), (DType::F32, DType::F32)] {
        run_layer_norm(4096, 320, dy, dx, 0.0, false);
    }
}

#[test]
fn backward_accumulates_into_dx() {
    // dx += gradient over random old values, for both dx dtypes (and both dy dtypes): the
    // same bounds as overwriting (the sum is rounded to dx's dtype once; old values of the
    // gradient's size, so a dropped old value or a dropped gradient is off by ~100%).
    for s in [
        Gn { batch: 1, rows: 1, c: 8, groups: 2, silu: true },
        Gn { batch: 2, rows: 33, c: 40, groups: 4, silu: true },
        Gn { batch: 2, rows: 300, c: 16, groups: 8, silu: false },
    ] {
        for (dy, dx) in DTYPES {
            run_group_norm(s, dy, dx, 0.0, true);
        }
    }
    run_group_norm(Gn { batch: 2, rows: 16 * 16, c: 640, groups: 32, silu: true }, DType::F16, DType::F16, 0.0, true);
    run_group_norm(Gn { batch: 2, rows: 16 * 16, c: 640, groups: 32, silu: true }, DType::F32, DType::F32, 0.0, true);
    for (rows, c) in [(1, 8), (5, 24), (3, 1032)] {
        for (dy, dx) in DTYPES {
            run_layer_norm(rows, c, dy, dx, 0.0, true);
        }
    }
    run_layer_norm(1024, 320, DType::F16, DType::F16, 0.0, true);
    run_layer_norm(1024, 320, DType::F32, DType::F32, 0.0, true);
}

#[test]
fn backward_refuses_bad_inputs() {
    let g = gpu();
    let x = upload(&[0.0; 4 * 64], &[4, 64], DType::F16);
    let dy = upload(&[0.0; 4 * 64], &[4, 64], DType::F16);
    let dx = poisoned(&[4, 64], DType::F16);
    let v = upload(&[1.0; 64], &[64], DType::F16);
    let gn = GroupNorm::new(g, 1, 4, 64, 32, 1e-5, true).unwrap();
    let stats = gn.new_stats(g, "stats").unwrap();
    let bw = GroupNormBackward::new(g, 1, 4, 64, 32, true).unwrap();
    assert!(bw.prepare(g, &x, &v, &v, &stats, &dy, &dx, false).is_ok());
    assert!(bw.prepare(g, &x, &v, &v, &stats, &dy, &dy, false).is_err(), "dx is dy");
    let short = Tensor::empty(g, &[16, 4], DType::F32, "short stats").unwrap();
    assert!(bw.prepare(g, &x, &v, &v, &short, &dy, &dx, false).is_err(), "stats for 16 groups");
    let f16_stats = Tensor::empty(g, &[32, 4], DType::F16, "f16 stats").unwrap();
    assert!(bw.prepare(g, &x, &v, &v, &f16_stats, &dy, &dx, false).is_err(), "f16 stats");
    let x32 = upload(&[0.0; 4 * 64], &[4, 64], DType::F32);
    assert!(bw.prepare(g, &x32, &v, &v, &stats, &dy, &dx, false).is_err(), "f32 x");
    for (c, groups) in [(12, 4), (64, 3), (2568, 8), (64, 0)] {
        assert!(GroupNormBackward::new(g, 1, 4, c, groups, false).is_err(), "C {c} groups {groups}");
    }
    let y = poisoned(&[4, 64], DType::F16);
    assert!(gn.prepare_saving(g, &x, &v, &v, &y, &short).is_err(), "forward stats too short");

    let ls = Tensor::empty(g, &[4, 2], DType::F32, "ln stats").unwrap();
    assert!(layer_norm_backward(g, &x, &v, &ls, &dy, &dx, false).is_ok());
    assert!(layer_norm_backward(g, &x, &v, &ls, &dy, &x, false).is_err(), "dx is x");
    let ls3 = Tensor::empty(g, &[3, 2], DType::F32, "ln stats").unwrap();
    assert!(layer_norm_backward(g, &x, &v, &ls3, &dy, &dx, false).is_err(), "stats for 3 rows");
    assert!(layer_norm_saving(g, &x, &v, &v, &y, &ls3, 1e-5).is_err(), "forward stats for 3 rows");
    let v32 = upload(&[1.0; 32], &[32], DType::F16);
    assert!(layer_norm_backward(g, &x, &v32, &ls, &dy, &dx, false).is_err(), "gamma shorter than a row");
}
