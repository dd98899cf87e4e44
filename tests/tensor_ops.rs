//! Op tests for shaders/tensor_ops.wgsl against CPU references on fresh seeded random inputs
//! with NaN-poisoned outputs: upsample and concat (exact copies), GEGLU, the timestep
//! embedding (diffusers' formula) and the token + position embedding.

mod common;

use atelier::gpu::{DType, Tensor};
use atelier::kernels::tensor_ops::{concat, embed, geglu, timestep_embedding, upload_ids, upsample2x, upsample_nearest};
use common::{gpu, random, rel_l2, round_f16, seed, POISON};

fn up(v: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_f32(gpu(), shape, DType::F16, v, "input").unwrap()
}

fn out(shape: &[usize]) -> Tensor {
    let t = Tensor::empty(gpu(), shape, DType::F16, "y").unwrap();
    t.fill_words(gpu(), POISON);
    t
}

fn exact(what: &str, y: &Tensor, r: &[f32]) {
    let o = y.to_f32(gpu()).unwrap();
    assert_eq!(o.len(), r.len());
    for (i, (a, b)) in o.iter().zip(r).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}: [{i}] {a} vs {b}");
    }
}

#[test]
fn upsample_nearest_2x() {
    let g = gpu();
    for &(b, h, w, c) in &[(1, 1, 1, 2), (2, 3, 5, 6), (1, 8, 8, 320)] {
        let what = format!("upsample {b}x{h}x{w}x{c}");
        let x = round_f16(&random(b * h * w * c, seed(&what)));
        let y = out(&[b, 2 * h, 2 * w, c]);
        g.run_now(&upsample2x(g, &up(&x, &[b, h, w, c]), &y, b, h, w, c).unwrap()).unwrap();
        let mut r = vec![0.0; 4 * x.len()];
        for i in 0..b {
            for oy in 0..2 * h {
                for ox in 0..2 * w {
                    for k in 0..c {
                        r[((i * 2 * h + oy) * 2 * w + ox) * c + k] = x[((i * h + oy / 2) * w + ox / 2) * c + k];
                    }
                }
            }
        }
        exact(&what, &y, &r);
    }
}

#[test]
fn upsample_nearest_to_a_size() {
    let g = gpu();
    // The UNet's upsamplers at latent sizes that do not halve evenly (12 -> 6 -> 3 -> 2 going
    // down, 2 -> 3 -> 6 coming up), plus uneven ratios. Source pixel floor(o·in/out), which
    // torch's nearest interpolation computes as floor(o·(in/out)) in f32: the same at these
    // sizes (checked against torch when the fixtures were made: b1_8x12's up blocks).
    for &(b, (h, w), (oh, ow), c) in &[(1, (1, 2), (2, 3), 4), (2, (2, 3), (3, 6), 6), (1, (3, 5), (7, 11), 8), (1, (4, 4), (4, 4), 2)] {
        let what = format!("upsample {b}x{h}x{w}x{c} to {oh}x{ow}");
        let x = round_f16(&random(b * h * w * c, seed(&what)));
        let y = out(&[b, oh, ow, c]);
        g.run_now(&upsample_nearest(g, &up(&x, &[b, h, w, c]), &y, b, (h, w), (oh, ow), c).unwrap()).unwrap();
        let mut r = vec![0.0; b * oh * ow * c];
        for i in 0..b {
            for oy in 0..oh {
                for ox in 0..ow {
                    for k in 0..c {
                        r[((i * oh + oy) * ow + ox) * c + k] = x[((i * h + oy * h / oh) * w + ox * w / ow) * c + k];
                    }
                }
            }
        }
        exact(&what, &y, &r);
    }
    let (x, y) = (out(&[1, 2, 2, 2]), out(&[1, 1, 1, 2]));
    assert!(upsample_nearest(g, &x, &y, 1, (2, 2), (1, 1), 2).is_err(), "downsampling");
}

#[test]
fn concat_channels() {
    let g = gpu();
    for &(rows, c1, c2) in &[(1, 2, 2), (7, 6, 10), (64, 1280, 640)] {
        let what = format!("concat {rows}x({c1}+{c2})");
        let s = seed(&what);
        let a = round_f16(&random(rows * c1, s));
        let b = round_f16(&random(rows * c2, s ^ 1));
        let y = out(&[rows, c1 + c2]);
        g.run_now(&concat(g, &up(&a, &[rows, c1]), &up(&b, &[rows, c2]), &y, rows, c1, c2).unwrap()).unwrap();
        let r: Vec<f32> = (0..rows).flat_map(|i| a[i * c1..(i + 1) * c1].iter().chain(&b[i * c2..(i + 1) * c2]).copied().collect::<Vec<_>>()).collect();
        exact(&what, &y, &r);
    }
}

fn erf(x: f64) -> f64 {
    // Abramowitz-Stegun 7.1.26 in f64 (|error| < 1.5e-7, far under f16 rounding).
    let t = 1.0 / (1.0 + 0.3275911 * x.abs());
    let y = 1.0 - t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429)))) * (-x * x).exp();
    y.copysign(x)
}

#[test]
fn geglu_matches_reference() {
    let g = gpu();
    for &(rows, f) in &[(1, 2), (5, 6), (256, 1280)] {
        let what = format!("geglu {rows}x{f}");
        let x = round_f16(&random(rows * 2 * f, seed(&what)).iter().map(|v| 3.0 * v).collect::<Vec<_>>());
        let y = out(&[rows, f]);
        g.run_now(&geglu(g, &up(&x, &[rows, 2 * f]), &y, rows, f).unwrap()).unwrap();
        let r: Vec<f64> = (0..rows * f)
            .map(|e| {
                let (i, j) = (e / f, e % f);
                let (h, gt) = (x[i * 2 * f + j] as f64, x[i * 2 * f + f + j] as f64);
                h * 0.5 * gt * (1.0 + erf(gt / 2f64.sqrt()))
            })
            .collect();
        // One f16 rounding of the product (2^-11 relative) and f32 arithmetic: 1e-3.
        let e = rel_l2(&y.to_f32(g).unwrap(), &r);
        assert!(e < 1e-3, "{what}: rel L2 {e:.3e}");
    }
}

#[test]
fn timestep_embedding_matches_diffusers_formula() {
    let g = gpu();
    for &(dim, shift) in &[(320usize, 0.0f32), (16, 0.0), (8, 1.0)] {
        let ts = [999.0f32, 1.0, 500.0, 0.0];
        let t = Tensor::from_f32(g, &[4], DType::F32, &ts, "t").unwrap();
        let y = out(&[4, dim]);
        g.run_now(&timestep_embedding(g, &t, &y, dim, shift).unwrap()).unwrap();
        let half = dim / 2;
        let r: Vec<f64> = ts
            .iter()
            .flat_map(|&tv| {
                (0..dim).map(move |j| {
                    let k = if j < half { j } else { j - half };
                    let arg = tv as f64 * (-(10000f64.ln()) * k as f64 / (half as f64 - shift as f64)).exp();
                    if j < half { arg.cos() } else { arg.sin() }
                })
            })
            .collect();
        // f16 output (2^-11) plus f32 sin/cos of arguments up to 999 (~1e-4 absolute, as
        // diffusers' own f32 computation): 1e-3 relative over the whole embedding.
        let e = rel_l2(&y.to_f32(g).unwrap(), &r);
        assert!(e < 1e-3, "timestep dim {dim} shift {shift}: rel L2 {e:.3e}");
    }
}

#[test]
fn token_and_position_embedding() {
    let g = gpu();
    let (vocab, d, len, batch) = (1000, 64, 77, 2);
    let s = seed("embedding");
    let tok = round_f16(&random(vocab * d, s));
    let pos = round_f16(&random(len * d, s ^ 1));
    let ids: Vec<u32> = (0..batch * len).map(|i| ((i as u64 * 7919 + s) % vocab as u64) as u32).collect();
    let tids = upload_ids(g, &ids, &[batch, len]).unwrap();
    let y = out(&[batch, len, d]);
    g.run_now(&embed(g, &tids, &up(&tok, &[vocab, d]), &up(&pos, &[len, d]), &y, len).unwrap()).unwrap();
    let r: Vec<f64> = (0..batch * len * d)
        .map(|e| {
            let (tp, j) = (e / d, e % d);
            tok[ids[tp] as usize * d + j] as f64 + pos[(tp % len) * d + j] as f64
        })
        .collect();
    // A sum of two f16 values rounded once to f16.
    let e = rel_l2(&y.to_f32(g).unwrap(), &r);
    assert!(e < 1e-3, "embedding: rel L2 {e:.3e}");
}

#[test]
fn bad_shapes_are_errors() {
    let g = gpu();
    let x = up(&[0.0; 12], &[1, 2, 2, 3]);
    let y = out(&[1, 4, 4, 3]);
    assert!(upsample2x(g, &x, &y, 1, 2, 2, 3).is_err(), "odd channels");
    let a = up(&[0.0; 8], &[2, 4]);
    assert!(concat(g, &a, &a, &a, 2, 4, 4).is_err(), "output too small");
    assert!(geglu(g, &a, &a, 2, 4).is_err(), "x must be [rows, 2f]");
    let t16 = up(&[0.0; 2], &[2]);
    assert!(timestep_embedding(g, &t16, &a, 4, 0.0).is_err(), "t must be f32");
    let ids = upload_ids(g, &[1, 2], &[1, 2]).unwrap();
    assert!(embed(g, &ids, &a, &a, &a, 3).is_err(), "len does not divide the ids");
}
