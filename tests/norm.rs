//! Op tests for shaders/norm.wgsl: group norm (with and without SiLU) and layer norm against
//! an f64 CPU reference, on fresh seeded random inputs with NaN-poisoned outputs, at tiny,
//! odd and real SD-1.5 shapes, and on data with a large mean (where a naive E[x²] - E[x]² in
//! f32 loses the variance).

mod common;

use atelier::gpu::{DType, Tensor};
use atelier::kernels::norm::{layer_norm, GroupNorm};
use common::{gpu, random, rel_l2, round_f16, seed, POISON};

/// Outputs are O(1) values stored as f16 (relative rounding 2^-11, ~3e-4 RMS over many
/// values); statistics are f32. 1e-3 leaves room for the f32 sums over 40k elements and
/// nothing more: a wrong mean, variance, eps, gamma or beta is off by far more.
const BOUND: f64 = 1e-3;

fn upload(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(gpu(), shape, DType::F16, v, "input").unwrap()
}

fn poisoned(shape: &[usize]) -> Tensor {
    let t = Tensor::empty(gpu(), shape, DType::F16, "y").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

/// f16-rounded inputs: offset + scale·U(-1, 1).
fn input(n: usize, offset: f32, scale: f32, seed: u64) -> Vec<f32> {
    round_f16(&random(n, seed).iter().map(|x| offset + scale * x).collect::<Vec<_>>())
}

fn silu(v: f64) -> f64 {
    v / (1.0 + (-v).exp())
}

/// Group norm of x [batch, rows, c] (channels last) in f64.
fn group_norm_ref(x: &[f32], batch: usize, rows: usize, c: usize, groups: usize, eps: f64, g: &[f32], b: &[f32], act: bool) -> Vec<f64> {
    let cg = c / groups;
    let mut y = vec![0.0; x.len()];
    for bi in 0..batch {
        for gi in 0..groups {
            let at = |r: usize, k: usize| (bi * rows + r) * c + gi * cg + k;
            let n = (rows * cg) as f64;
            let mut mean = 0.0;
            for r in 0..rows {
                for k in 0..cg {
                    mean += x[at(r, k)] as f64;
                }
            }
            mean /= n;
            let mut var = 0.0;
            for r in 0..rows {
                for k in 0..cg {
                    var += (x[at(r, k)] as f64 - mean).powi(2);
                }
            }
            let rstd = 1.0 / (var / n + eps).sqrt();
            for r in 0..rows {
                for k in 0..cg {
                    let ch = gi * cg + k;
                    let v = (x[at(r, k)] as f64 - mean) * rstd * g[ch] as f64 + b[ch] as f64;
                    y[at(r, k)] = if act { silu(v) } else { v };
                }
            }
        }
    }
    y
}

fn run_group_norm(batch: usize, rows: usize, c: usize, groups: usize, silu_on: bool, offset: f32) {
    let g = gpu();
    let what = format!("group norm {batch}x{rows}x{c} groups {groups} silu {silu_on} offset {offset}");
    let s = seed(&what);
    let n = batch * rows * c;
    let x = input(n, offset, 2.0, s);
    let gamma = input(c, 1.0, 0.5, s ^ 1);
    let beta = input(c, 0.0, 0.5, s ^ 2);
    let eps = 1e-5;
    let tx = upload(&x, &[batch, rows, c]);
    let tg = upload(&gamma, &[c]);
    let tb = upload(&beta, &[c]);
    let ty = poisoned(&[batch, rows, c]);
    let gn = GroupNorm::new(g, batch, rows, c, groups, eps, silu_on).unwrap();
    let mut rec = atelier::gpu::Recorder::new(g);
    for d in gn.prepare(g, &tx, &tg, &tb, &ty).unwrap() {
        rec.run(&d).unwrap();
    }
    rec.finish().unwrap();
    let r = group_norm_ref(&x, batch, rows, c, groups, eps as f64, &gamma, &beta, silu_on);
    let e = rel_l2(&ty.to_f32(g).unwrap(), &r);
    assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
}

#[test]
fn group_norm_tiny_and_odd_shapes() {
    run_group_norm(1, 1, 8, 4, false, 0.0); // one row: statistics over 2 channels
    run_group_norm(1, 7, 64, 32, false, 0.0);
    run_group_norm(2, 33, 40, 4, true, 0.0); // groups of 10 channels straddle the 8-channel words
    run_group_norm(3, 100, 96, 32, true, 0.5);
}

#[test]
fn group_norm_sd_shapes() {
    run_group_norm(2, 64 * 64, 320, 32, true, 0.0); // UNet down block 0 at 512x512
    run_group_norm(1, 8 * 8, 2560, 32, true, 0.0); // widest concat in the up blocks
    run_group_norm(1, 16 * 16, 1920, 32, false, 0.0); // more than 256 words per row
    // VAE-like: 113 rows a block over 16 lanes, 7 or 8 rows an invocation (the first, one
    // four-row step, then the rest one by one), off a nonzero mean.
    run_group_norm(1, 512 * 16 * 7 + 3, 128, 32, true, 3.0);
    // Groups of 16 and 8 channels (the VAE's 512 and 256): one statistics read an octet.
    run_group_norm(1, 32 * 32, 512, 32, true, 1.0);
    run_group_norm(2, 48 * 40, 256, 32, false, 0.0);
}

#[test]
fn group_norm_large_mean() {
    // Mean 200, spread ±2: a one-pass f32 sum of squares would lose most of the variance.
    run_group_norm(1, 64 * 64, 128, 32, false, 200.0);
}

#[test]
fn in_place_is_refused() {
    // A buffer can't be bound read-only and writable in one launch: an error, not a panic or
    // a wgpu validation failure.
    let g = gpu();
    let t = upload(&[0.0; 4 * 64], &[4, 64]);
    let v = upload(&[1.0; 64], &[64]);
    let gn = GroupNorm::new(g, 1, 4, 64, 32, 1e-5, false).unwrap();
    assert!(gn.prepare(g, &t, &v, &v, &t).is_err());
    assert!(layer_norm(g, &t, &v, &v, &t, 1e-5).is_err());
}

#[test]
fn group_norm_refuses_bad_shapes() {
    let g = gpu();
    for (c, groups) in [(12, 4), (64, 3), (2568, 8), (64, 0)] {
        assert!(GroupNorm::new(g, 1, 4, c, groups, 1e-5, false).is_err(), "C {c} groups {groups}");
    }
    let gn = GroupNorm::new(g, 1, 4, 64, 32, 1e-5, false).unwrap();
    let x = upload(&vec![0.0; 4 * 64], &[4, 64]);
    let short = upload(&[0.0; 32], &[32]);
    let full = upload(&[0.0; 64], &[64]);
    assert!(gn.prepare(g, &x, &short, &full, &x).is_err());
    let big = upload(&vec![0.0; 8 * 64], &[8, 64]);
    assert!(gn.prepare(g, &big, &full, &full, &big).is_err());
}

fn layer_norm_ref(x: &[f32], c: usize, eps: f64, g: &[f32], b: &[f32]) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    for (row, out) in x.chunks(c).zip(y.chunks_mut(c)) {
        let mean = row.iter().map(|&v| v as f64).sum::<f64>() / c as f64;
        let var = row.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / c as f64;
        let rstd = 1.0 / (var + eps).sqrt();
        for k in 0..c {
            out[k] = (row[k] as f64 - mean) * rstd * g[k] as f64 + b[k] as f64;
        }
    }
    y
}

#[test]
fn layer_norm_shapes() {
    let g = gpu();
    // CLIP (77 tokens x 768), UNet transformer at 64x64 (4096 x 320), tiny and odd rows, a
    // large mean.
    for &(rows, c, offset) in &[(77, 768, 0.0), (4096, 320, 0.0), (1, 8, 0.0), (5, 24, 0.0), (300, 1280, 0.0), (64, 512, 100.0)] {
        let what = format!("layer norm {rows}x{c} offset {offset}");
        let s = seed(&what);
        let x = input(rows * c, offset, 2.0, s);
        let gamma = input(c, 1.0, 0.5, s ^ 1);
        let beta = input(c, 0.0, 0.5, s ^ 2);
        let (tx, tg, tb) = (upload(&x, &[rows, c]), upload(&gamma, &[c]), upload(&beta, &[c]));
        let ty = poisoned(&[rows, c]);
        g.run_now(&layer_norm(g, &tx, &tg, &tb, &ty, 1e-5).unwrap()).unwrap();
        let e = rel_l2(&ty.to_f32(g).unwrap(), &layer_norm_ref(&x, c, 1e-5, &gamma, &beta));
        assert!(e < BOUND, "{what}: rel L2 {e:.3e} over {BOUND:.0e}");
    }
}

#[test]
fn layer_norm_refuses_bad_shapes() {
    let g = gpu();
    let x = upload(&[0.0; 24], &[2, 12]);
    let v12 = upload(&[0.0; 12], &[12]);
    assert!(layer_norm(g, &x, &v12, &v12, &x, 1e-5).is_err(), "C not a multiple of 8");
    let x = upload(&[0.0; 32], &[2, 16]);
    let v8 = upload(&[0.0; 8], &[8]);
    assert!(layer_norm(g, &x, &v8, &v8, &x, 1e-5).is_err(), "gamma shorter than a row");
}
