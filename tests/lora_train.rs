//! Op tests of the trainable LoRA layer (model::lora): forward and backward, dropout, stacked
//! adapters, against CPU references in f64, on fresh seeded random inputs (the seed is
//! printed; ATELIER_TEST_SEED replays it). The parameters' initialisation and AdamW step are
//! in lora_params.rs.
//!
//! Bounds (relative L2 unless said otherwise):
//! - Forward y and backward dx (f16 outputs): the GPU stores h = A·xd (and dh, dh·A) in f16
//!   and rounds the output to f16: two roundings of relative RMS 2^-11/√3 ≈ 2.8e-4 each, so
//!   ≈ 4e-4 expected; bound 1.5e-3. With dropout, xd = x/(1-p) is one more f16 rounding:
//!   bound 2e-3.
//! - dA, dB (f32 outputs, accumulated): one f16 intermediate (dh or h) feeds them: bound 1e-3.
//! - Per element, max |out - ref| / max |ref| < 3e-3, so one unwritten or wrong element
//!   fails even when the L2 average hides it. Accumulation targets hold random values first
//!   (a `=` instead of `+=` fails); the saved intermediates are poisoned with NaN.
//! - Stacked adapters (`LoraStack`, the q/k/v of one fused product run as one): the same
//!   products and roundings as one layer, so the same bounds, member by member; dx sums the
//!   members' input gradients (one f16 rounding of the sum instead of one per member). With
//!   dropout the stacked kernels mask x inside (no f16 copy of xd): the bounds without dropout.
//! - Finite differences (CPU, f64): the LoRA output is linear in each of A, B and x, so
//!   central differences are exact up to rounding: bound 1e-8 absolute.

mod common;

use atelier::gpu::{DType, PlanBuilder, Tensor};
use atelier::kernels::attention::Operand;
use atelier::kernels::lora::{self as lk, dropout_keep, dropout_threshold};
use atelier::model::lora::{AdamW, LoraLayer, LoraParams, LoraSpec, LoraStack};
use common::*;

fn spec(name: &str, k: usize, n: usize, rank: usize, alpha: f32, dropout: f32) -> LoraSpec {
    LoraSpec { name: name.into(), k, n, rank, alpha, dropout }
}

/// Elementwise maximum of |out - ref| over max |ref|.
fn max_rel(out: &[f32], r: &[f64]) -> f64 {
    let m = r.iter().fold(0f64, |a, &x| a.max(x.abs()));
    let e = out.iter().zip(r).fold(0f64, |a, (&o, &x)| if o.is_finite() { a.max((o as f64 - x).abs()) } else { f64::INFINITY });
    e / m.max(1e-300)
}

fn scaled(v: &[f32], s: f32) -> Vec<f32> {
    v.iter().map(|x| x * s).collect()
}

/// The CPU reference in f64: y delta, dA, dB, dx delta for x [m, k], A [r, k], B [n, r],
/// dy [m, n] and a keep factor per element of x (0 or 1/(1-p); all 1 without dropout).
struct Ref {
    y: Vec<f64>,
    da: Vec<f64>,
    db: Vec<f64>,
    dx: Vec<f64>,
}

#[allow(clippy::too_many_arguments)]
fn reference(x: &[f64], a: &[f64], b: &[f64], dy: &[f64], keep: &[f64], m: usize, k: usize, n: usize, r: usize, scale: f64) -> Ref {
    let xd: Vec<f64> = x.iter().zip(keep).map(|(x, f)| x * f).collect();
    let mut h = vec![0f64; m * r];
    for i in 0..m {
        for j in 0..r {
            h[i * r + j] = (0..k).map(|q| xd[i * k + q] * a[j * k + q]).sum();
        }
    }
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = scale * (0..r).map(|q| h[i * r + q] * b[j * r + q]).sum::<f64>();
        }
    }
    let mut db = vec![0f64; n * r];
    for j in 0..n {
        for q in 0..r {
            db[j * r + q] = scale * (0..m).map(|i| dy[i * n + j] * h[i * r + q]).sum::<f64>();
        }
    }
    let mut dh = vec![0f64; m * r];
    for i in 0..m {
        for q in 0..r {
            dh[i * r + q] = scale * (0..n).map(|j| dy[i * n + j] * b[j * r + q]).sum::<f64>();
        }
    }
    let mut da = vec![0f64; r * k];
    for q in 0..r {
        for c in 0..k {
            da[q * k + c] = (0..m).map(|i| dh[i * r + q] * xd[i * k + c]).sum();
        }
    }
    let mut dx = vec![0f64; m * k];
    for i in 0..m {
        for c in 0..k {
            dx[i * k + c] = keep[i * k + c] * (0..r).map(|q| dh[i * r + q] * a[q * k + c]).sum::<f64>();
        }
    }
    Ref { y, da, db, dx }
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Runs forward + backward of layer `li` of a fresh parameter set on the GPU and checks
/// them against the reference; returns the errors (y, dA, dB, dx).
fn check_layer(specs: &[LoraSpec], li: usize, m: usize, dropout_seed: u64) -> [f64; 4] {
    let g = gpu();
    let s = &specs[li];
    let (k, n, r) = (s.k, s.n, s.rank);
    let seed = seed(&format!("lora layer {m}x{k}->{n} r{r} p{}", s.dropout));
    let lp = LoraParams::new(g, specs, seed).unwrap();
    let layer: &LoraLayer = &lp.layers[li];
    // Random A and B (B is zero at init) in the flat layout, and random preset gradients.
    let mut flat = vec![0f32; lp.total];
    let mut g0 = vec![0f32; lp.total];
    let ra = scaled(&random(r * k, seed ^ 10), 1.0 / (k as f32).sqrt());
    let rb = scaled(&random(n * r, seed ^ 11), 0.5);
    flat[layer.off_a..layer.off_a + r * k].copy_from_slice(&ra);
    flat[layer.off_b..layer.off_b + n * r].copy_from_slice(&rb);
    lp.write_params(g, &flat).unwrap();
    let (a16, b16) = (round_f16(&ra), round_f16(&rb));
    let x = round_f16(&random(m * k, seed ^ 1));
    let dy = round_f16(&random(m * n, seed ^ 2));
    // Preset accumulation targets, ~5% of the adapter's contribution.
    let y0 = round_f16(&scaled(&random(m * n, seed ^ 3), 0.05));
    let dx0 = round_f16(&scaled(&random(m * k, seed ^ 4), 0.05));
    let ga = scaled(&random(r * k, seed ^ 5), 0.5);
    let gb = scaled(&random(n * r, seed ^ 6), 0.5);
    g0[layer.off_a..layer.off_a + r * k].copy_from_slice(&ga);
    g0[layer.off_b..layer.off_b + n * r].copy_from_slice(&gb);
    lp.grads.write_f32(g, &g0).unwrap();
    lp.set_step(g, &AdamW::default(), 1, dropout_seed);

    // With an even width, y and dy are columns 2 .. 2 + n of [m, n + 6] tensors (one
    // projection of a fused q/k/v product), the columns around them random and untouched.
    let (off, ld) = if n % 2 == 0 { (2, n + 6) } else { (0, n) };
    let widen = |v: &[f32], fill: u64| -> Vec<f32> {
        let mut w = round_f16(&random(m * ld, fill));
        for i in 0..m {
            w[i * ld + off..i * ld + off + n].copy_from_slice(&v[i * n..(i + 1) * n]);
        }
        w
    };
    let narrow = |w: &[f32]| -> Vec<f32> { (0..m).flat_map(|i| w[i * ld + off..i * ld + off + n].to_vec()).collect() };
    let (y0w, dyw) = (widen(&y0, seed ^ 7), widen(&dy, seed ^ 8));
    // Parameter gradients are scaled by grad_scale (1 / the loss scale).
    let grad_scale = 0.5;
    let tx = Tensor::from_f32(g, &[m, k], DType::F16, &x, "x").unwrap();
    let ty = Tensor::from_f32(g, &[m, ld], DType::F16, &y0w, "y").unwrap();
    let tdy = Tensor::from_f32(g, &[m, ld], DType::F16, &dyw, "dy").unwrap();
    let tdx = Tensor::from_f32(g, &[m, k], DType::F16, &dx0, "dx").unwrap();
    let mut pb = PlanBuilder::new(g);
    let saved = layer.forward(&mut pb, &tx, Operand::slice(&ty, off, ld)).unwrap();
    saved.h.fill_words(g, POISON);
    // A stored dropout(x) (the dropout kernel's path); the masked kernels keep x itself.
    if s.dropout > 0.0 && !std::sync::Arc::ptr_eq(&saved.xd.buffer, &tx.buffer) {
        saved.xd.fill_words(g, POISON);
    }
    layer.backward(&mut pb, saved, Operand::slice(&tdy, off, ld), Some(&tdx), grad_scale).unwrap();
    pb.finish().run(g).unwrap();
    let yw = ty.to_f32(g).unwrap();
    for i in 0..m {
        for j in (0..off).chain(off + n..ld) {
            assert_eq!(yw[i * ld + j], y0w[i * ld + j], "y column {j} of row {i}, outside the slice, was written");
        }
    }

    let thr = dropout_threshold(s.dropout);
    let keep: Vec<f64> = (0..m * k)
        .map(|i| if s.dropout == 0.0 { 1.0 } else if dropout_keep(dropout_seed, layer.salt, i as u32, thr) { 1.0 / (1.0 - s.dropout as f64) } else { 0.0 })
        .collect();
    let rf = reference(&f64s(&x), &f64s(&a16), &f64s(&b16), &f64s(&dy), &keep, m, k, n, r, layer.scale as f64);
    let add = |base: &[f32], d: &[f64]| -> Vec<f64> { base.iter().zip(d).map(|(&b, &d)| b as f64 + d).collect() };
    let half = |d: &[f64]| -> Vec<f64> { d.iter().map(|v| v * grad_scale as f64).collect() };
    let grads = lp.grads.to_f32(g).unwrap();
    let outs = [
        (narrow(&yw), add(&y0, &rf.y), "y"),
        (grads[layer.off_a..layer.off_a + r * k].to_vec(), add(&ga, &half(&rf.da)), "dA"),
        (grads[layer.off_b..layer.off_b + n * r].to_vec(), add(&gb, &half(&rf.db)), "dB"),
        (tdx.to_f32(g).unwrap(), add(&dx0, &rf.dx), "dx"),
    ];
    // Nothing outside the layer's gradient slots was written.
    for (i, &v) in grads.iter().enumerate() {
        let inside = (layer.off_a..layer.off_a + r * k).contains(&i) || (layer.off_b..layer.off_b + n * r).contains(&i);
        if !inside {
            assert_eq!(v, 0.0, "gradient element {i} outside layer {li}'s slots was written");
        }
    }
    let f16_bound = if s.dropout > 0.0 { 2e-3 } else { 1.5e-3 };
    let mut errs = [0.0; 4];
    for (i, (out, want, what)) in outs.iter().enumerate() {
        let e = rel_l2(out, want);
        let mx = max_rel(out, want);
        let bound = if i == 1 || i == 2 { 1e-3 } else { f16_bound };
        println!("{m}x{k}->{n} r{r} p{}: {what} rel L2 {e:.2e}, max {mx:.2e}", s.dropout);
        assert!(e < bound, "{what}: rel L2 {e:.3e} over {bound}");
        assert!(mx < 3e-3, "{what}: max error {mx:.3e} of max |ref|");
        errs[i] = e;
    }
    errs
}

#[test]
fn forward_backward_match_cpu_reference() {
    let specs = vec![
        spec("first", 16, 24, 4, 16.0, 0.0),
        spec("odd", 37, 29, 3, 8.0, 0.0),
        spec("rank1", 40, 8, 1, 1.0, 0.0),
    ];
    for li in 0..specs.len() {
        for m in [1, 5, 77] {
            check_layer(&specs, li, m, 7);
        }
    }
}

#[test]
fn sd_shape_attention_projection() {
    // to_q at the UNet's 64x64 level: 4096 tokens, 320 -> 320, rank 4, alpha 16; dA and dB
    // sum over row splits here (kernels::lora_skinny).
    let specs = vec![spec("to_q", 320, 320, 4, 16.0, 0.0)];
    check_layer(&specs, 0, 4096, 3);
    let specs = vec![spec("to_k", 768, 320, 8, 8.0, 0.1)];
    check_layer(&specs, 0, 77, 3);
}

/// `members` adapters of k -> n at rank r on one fused product of width members·n (columns 2
/// .. of rows of members·n + 6, the rest untouched), stacked, against the reference member
/// by member: y per segment, dA and dB per member, dx the members' sum; with `dropout`, each
/// member under its own mask (the masked kernels of `kernels::lora_skinny`).
fn check_stack(members: usize, m: usize, k: usize, n: usize, r: usize, dropout: f32) {
    let g = gpu();
    let specs: Vec<_> = (0..members).map(|i| spec(&format!("p{i}"), k, n, r, 2.0 * r as f32, dropout)).collect();
    let seed = seed(&format!("lora stack {members}x {m}x{k}->{n} r{r} p{dropout}"));
    let lp = LoraParams::new(g, &specs, seed).unwrap();
    let stack = LoraStack::new(lp.layers.iter().collect()).expect("equal adapters laid out back to back stack");
    let (wn, off) = (members * n, 2);
    let ld = wn + 6;
    let mut flat = vec![0f32; lp.total];
    let mut parts = Vec::new();
    for (i, l) in lp.layers.iter().enumerate() {
        let a = scaled(&random(r * k, seed ^ (10 + i as u64)), 1.0 / (k as f32).sqrt());
        let b = scaled(&random(n * r, seed ^ (20 + i as u64)), 0.5);
        flat[l.off_a..l.off_a + r * k].copy_from_slice(&a);
        flat[l.off_b..l.off_b + n * r].copy_from_slice(&b);
        parts.push((round_f16(&a), round_f16(&b)));
    }
    lp.write_params(g, &flat).unwrap();
    let dropout_seed = seed ^ 99;
    lp.set_step(g, &AdamW::default(), 1, dropout_seed);
    let x = round_f16(&random(m * k, seed ^ 1));
    let yw = round_f16(&scaled(&random(m * ld, seed ^ 2), 0.05));
    let dyw = round_f16(&random(m * ld, seed ^ 3));
    let dx0 = round_f16(&scaled(&random(m * k, seed ^ 4), 0.05));
    let tx = Tensor::from_f32(g, &[m, k], DType::F16, &x, "x").unwrap();
    let ty = Tensor::from_f32(g, &[m, ld], DType::F16, &yw, "y").unwrap();
    let tdy = Tensor::from_f32(g, &[m, ld], DType::F16, &dyw, "dy").unwrap();
    let tdx = Tensor::from_f32(g, &[m, k], DType::F16, &dx0, "dx").unwrap();
    let grad_scale = 0.5;
    let mut pb = PlanBuilder::new(g);
    let saved = stack.forward(&mut pb, &tx, Operand::slice(&ty, off, ld)).unwrap();
    saved.h.fill_words(g, POISON);
    stack.backward(&mut pb, saved, Operand::slice(&tdy, off, ld), Some(&tdx), grad_scale).unwrap();
    pb.finish().run(g).unwrap();
    let (y, grads, dx) = (ty.to_f32(g).unwrap(), lp.grads.to_f32(g).unwrap(), tdx.to_f32(g).unwrap());
    let thr = dropout_threshold(dropout);
    let keep = |salt: u32| -> Vec<f64> {
        (0..m * k)
            .map(|i| if dropout == 0.0 { 1.0 } else if dropout_keep(dropout_seed, salt, i as u32, thr) { 1.0 / (1.0 - dropout as f64) } else { 0.0 })
            .collect()
    };
    let mut want_dx: Vec<f64> = f64s(&dx0);
    let check = |what: String, out: &[f32], want: &[f64], bound: f64| {
        let (e, mx) = (rel_l2(out, want), max_rel(out, want));
        println!("{what}: rel L2 {e:.2e}, max {mx:.2e}");
        assert!(e < bound, "{what}: rel L2 {e:.3e} over {bound}");
        assert!(mx < 3e-3, "{what}: max error {mx:.3e} of max |ref|");
    };
    for (i, (l, (a, b))) in lp.layers.iter().zip(&parts).enumerate() {
        let col = |w: &[f32], j: usize, c: usize| w[j * ld + off + i * n + c];
        let dy: Vec<f32> = (0..m).flat_map(|j| (0..n).map(move |c| (j, c))).map(|(j, c)| col(&dyw, j, c)).collect();
        let rf = reference(&f64s(&x), &f64s(a), &f64s(b), &f64s(&dy), &keep(l.salt), m, k, n, r, l.scale as f64);
        let yi: Vec<f32> = (0..m).flat_map(|j| (0..n).map(move |c| (j, c))).map(|(j, c)| col(&y, j, c)).collect();
        let want_y: Vec<f64> = (0..m * n).map(|e| col(&yw, e / n, e % n) as f64 + rf.y[e]).collect();
        check(format!("stack {members}: member {i} y"), &yi, &want_y, 1.5e-3);
        let half = |d: &[f64]| -> Vec<f64> { d.iter().map(|v| v * grad_scale as f64).collect() };
        check(format!("stack {members}: member {i} dA"), &grads[l.off_a..l.off_a + r * k], &half(&rf.da), 1e-3);
        check(format!("stack {members}: member {i} dB"), &grads[l.off_b..l.off_b + n * r], &half(&rf.db), 1e-3);
        want_dx.iter_mut().zip(&rf.dx).for_each(|(w, d)| *w += d);
    }
    check(format!("stack {members}: dx"), &dx, &want_dx, 1.5e-3);
    for j in 0..m {
        for c in (0..off).chain(off + wn..ld) {
            assert_eq!(y[j * ld + c], yw[j * ld + c], "y column {c} of row {j}, outside the product, was written");
        }
    }
}

#[test]
fn stacked_adapters_match_the_reference() {
    // Self-attention q, k, v (3 members) and cross-attention k, v (2), small and SD-sized;
    // with dropout (each member its own mask), one or many row splits of the dA sums.
    check_stack(3, 5, 64, 32, 4, 0.0);
    check_stack(2, 77, 96, 64, 8, 0.0);
    check_stack(3, 4096, 320, 320, 4, 0.0);
    check_stack(2, 77, 768, 320, 4, 0.0);
    check_stack(3, 5, 64, 32, 4, 0.1);
    check_stack(2, 77, 96, 64, 8, 0.25);
    check_stack(3, 4096, 320, 320, 4, 0.1);
    check_stack(4, 300, 64, 32, 4, 0.1);
}

#[test]
fn stacks_form_only_where_exact() {
    let g = gpu();
    let layers = |specs: &[LoraSpec]| {
        let lp = LoraParams::new(g, specs, 1).unwrap();
        let ok = LoraStack::new(lp.layers.iter().collect()).is_some();
        (lp, ok)
    };
    // q, k, v then to_out (same shapes: one run, A's then B's back to back).
    let qkvo: Vec<_> = ["q", "k", "v", "o"].iter().map(|n| spec(n, 320, 320, 4, 16.0, 0.0)).collect();
    let (lp, _) = layers(&qkvo);
    for w in lp.layers.windows(2) {
        assert_eq!(w[1].off_a, w[0].off_a + 4 * 320);
        assert_eq!(w[1].off_b, w[0].off_b + 320 * 4);
    }
    assert!(LoraStack::new(lp.layers[..3].iter().collect()).is_some());
    assert!(LoraStack::new(lp.layers[1..3].iter().collect()).is_some());
    // Equal dropout at a rank that is a multiple of 4 stacks (a mask per member in the
    // kernels); unequal dropout, or dropout at rank 2, does not. A different alpha, a rank too
    // large stacked, one member: neither.
    let with = |f: &dyn Fn(usize) -> LoraSpec| (0..3).map(f).collect::<Vec<_>>();
    assert!(layers(&with(&|i| spec(&i.to_string(), 320, 320, 4, 16.0, 0.1))).1);
    assert!(!layers(&with(&|i| spec(&i.to_string(), 320, 320, 4, 16.0, if i == 2 { 0.1 } else { 0.0 }))).1);
    assert!(!layers(&with(&|i| spec(&i.to_string(), 320, 320, 2, 16.0, 0.1))).1);
    assert!(layers(&with(&|i| spec(&i.to_string(), 320, 320, 2, 16.0, 0.0))).1);
    assert!(!layers(&with(&|i| spec(&i.to_string(), 320, 320, 4, if i == 1 { 8.0 } else { 16.0 }, 0.0))).1);
    assert!(!layers(&with(&|i| spec(&i.to_string(), 320, 320, 8, 16.0, 0.0))).1);
    assert!(!layers(&with(&|i| spec(&i.to_string(), 320, 320, 5, 5.0, 0.0))).1);
    assert!(LoraStack::new(lp.layers[..1].iter().collect()).is_none());
    // Not back to back: q and o.
    assert!(LoraStack::new(vec![&lp.layers[0], &lp.layers[3]]).is_none());
}

#[test]
fn rank_over_16_takes_the_general_matmul() {
    // Ranks above kernels::lora_skinny::MAX_RANK keep the tiled matmul for every product;
    // rank 16 is the largest on the skinny kernels.
    let specs = vec![spec("r20", 40, 24, 20, 8.0, 0.0), spec("r16", 37, 30, 16, 16.0, 0.1)];
    for li in 0..specs.len() {
        for m in [5, 77] {
            check_layer(&specs, li, m, 11);
        }
    }
}

#[test]
fn dropout_forward_backward_match_reference() {
    // "a": the masked skinny kernels (rank 4, even k); "b": the dropout kernel (rank 2).
    let specs = vec![spec("a", 24, 16, 4, 16.0, 0.1), spec("b", 33, 17, 2, 4.0, 0.5)];
    for li in 0..2 {
        for m in [3, 64] {
            check_layer(&specs, li, m, 0x1234_5678_9abc_def0 ^ seed("dropout step seed"));
        }
    }
}

#[test]
fn dropout_mask_statistics_and_cpu_mirror() {
    let g = gpu();
    let n = (1 << 20) + 3;
    let s = seed("dropout statistics");
    // Values in [0.5, 1]: never zero, so a zero output is a dropped element.
    let x: Vec<f32> = round_f16(&random(n, s).iter().map(|v| 0.75 + 0.25 * v).collect::<Vec<_>>());
    let tx = Tensor::from_f32(g, &[n], DType::F16, &x, "x").unwrap();
    let ty = Tensor::empty(g, &[n], DType::F16, "y").unwrap();
    let hyper = Tensor::empty(g, &[lk::HYPER_WORDS], DType::F32, "hyper").unwrap();
    let mut masks = Vec::new();
    for (p, step_seed, salt) in [(0.1f32, s, 0u32), (0.5, s, 0), (0.1, s ^ 1, 0), (0.1, s, 1)] {
        let mut words = [0u32; lk::HYPER_WORDS];
        words[0] = step_seed as u32;
        words[1] = (step_seed >> 32) as u32;
        g.queue.write_buffer(&hyper.buffer, 0, bytemuck::cast_slice(&words));
        ty.fill_words(g, POISON);
        g.run_now(&lk::dropout(g, &tx, &ty, &hyper, salt, p, false).unwrap()).unwrap();
        let y = ty.to_f32(g).unwrap();
        let thr = dropout_threshold(p);
        let scale = (1.0 / (1.0 - p as f64)) as f32;
        let mut kept = 0usize;
        let mut pairs = 0usize;
        let mut mask = Vec::with_capacity(n);
        for i in 0..n {
            let keep = dropout_keep(step_seed, salt, i as u32, thr);
            let want = if keep { half::f16::from_f32(x[i] * scale).to_f32() } else { 0.0 };
            assert_eq!(y[i], want, "p {p} element {i}: GPU mask or value differs from the CPU mirror");
            kept += keep as usize;
            if i > 0 && keep && mask[i - 1] {
                pairs += 1;
            }
            mask.push(keep);
        }
        let q = 1.0 - p as f64;
        let rate = kept as f64 / n as f64;
        let sigma = (q * (1.0 - q) / n as f64).sqrt();
        println!("p {p}: keep rate {rate:.5} (expected {q}, sigma {sigma:.1e})");
        assert!((rate - q).abs() < 5.0 * sigma, "keep rate {rate} vs {q}");
        // Neighbours independent: P(keep_i and keep_i+1) = q².
        let pair_rate = pairs as f64 / (n - 1) as f64;
        let ps = (q * q * (1.0 - q * q) / n as f64).sqrt();
        assert!((pair_rate - q * q).abs() < 5.0 * ps, "pair rate {pair_rate} vs {}", q * q);
        masks.push(mask);
    }
    // Another step seed or another layer gives another mask (disagreement 2pq = 0.18 at p 0.1).
    for other in [2, 3] {
        let diff = masks[0].iter().zip(&masks[other]).filter(|(a, b)| a != b).count() as f64 / n as f64;
        assert!((diff - 0.18).abs() < 0.005, "mask {other} differs from mask 0 in {diff} of elements");
    }
}

/// On the dropout kernel's path (rank 3: not a multiple of 4, so dropout(x) is stored), the
/// elements the forward dropped are exactly those whose dx is zero. (The masked kernels'
/// forward and backward are checked against one CPU mask in
/// `dropout_forward_backward_match_reference`.)
#[test]
fn forward_and_backward_use_the_same_mask() {
    let g = gpu();
    let (m, k, n) = (50, 40, 24);
    let specs = vec![spec("l", k, n, 3, 3.0, 0.3)];
    let s = seed("dropout same mask");
    let lp = LoraParams::new(g, &specs, s).unwrap();
    let layer = &lp.layers[0];
    let mut flat = vec![0f32; lp.total];
    flat[layer.off_a..layer.off_a + 3 * k].copy_from_slice(&random(3 * k, s ^ 1));
    flat[layer.off_b..layer.off_b + n * 3].copy_from_slice(&random(n * 3, s ^ 2));
    lp.write_params(g, &flat).unwrap();
    for step in 1..=2u64 {
        lp.set_step(g, &AdamW::default(), step, s.wrapping_add(step));
        let x: Vec<f32> = round_f16(&random(m * k, s ^ 3).iter().map(|v| 0.75 + 0.25 * v).collect::<Vec<_>>());
        let tx = Tensor::from_f32(g, &[m, k], DType::F16, &x, "x").unwrap();
        let ty = Tensor::from_f32(g, &[m, n], DType::F16, &vec![0.0; m * n], "y").unwrap();
        let tdy = Tensor::from_f32(g, &[m, n], DType::F16, &round_f16(&random(m * n, s ^ 4)), "dy").unwrap();
        let tdx = Tensor::from_f32(g, &[m, k], DType::F16, &vec![0.0; m * k], "dx").unwrap();
        let mut pb = PlanBuilder::new(g);
        let saved = layer.forward(&mut pb, &tx, Operand::dense(&ty, n)).unwrap();
        let xd = saved.xd.clone();
        layer.backward(&mut pb, saved, Operand::dense(&tdy, n), Some(&tdx), 1.0).unwrap();
        pb.finish().run(g).unwrap();
        let (xd, dx) = (xd.to_f32(g).unwrap(), tdx.to_f32(g).unwrap());
        let dropped: Vec<bool> = xd.iter().map(|&v| v == 0.0).collect();
        let frac = dropped.iter().filter(|&&d| d).count() as f64 / dropped.len() as f64;
        assert!((frac - 0.3).abs() < 0.05, "dropped fraction {frac}");
        for i in 0..m * k {
            assert_eq!(dropped[i], dx[i] == 0.0, "step {step} element {i}: forward dropped {} but dx is {}", dropped[i], dx[i]);
        }
    }
}

#[test]
fn finite_differences_of_the_cpu_forward() {
    let (m, k, n, r) = (3, 5, 4, 2);
    let s = seed("lora finite differences");
    let x = f64s(&random(m * k, s));
    let a = f64s(&random(r * k, s ^ 1));
    let b = f64s(&random(n * r, s ^ 2));
    let w = f64s(&random(m * n, s ^ 3)); // loss = Σ w·y, so dy = w
    let scale = 2.5;
    let ones = vec![1.0; m * k];
    let loss = |x: &[f64], a: &[f64], b: &[f64]| -> f64 {
        let y = reference(x, a, b, &w, &ones, m, k, n, r, scale).y;
        y.iter().zip(&w).map(|(y, w)| y * w).sum()
    };
    let an = reference(&x, &a, &b, &w, &ones, m, k, n, r, scale);
    let eps = 1e-3;
    let fd = |which: usize, i: usize| -> f64 {
        let (mut xp, mut ap, mut bp) = (x.clone(), a.clone(), b.clone());
        let (mut xm, mut am, mut bm) = (x.clone(), a.clone(), b.clone());
        match which {
            0 => { xp[i] += eps; xm[i] -= eps; }
            1 => { ap[i] += eps; am[i] -= eps; }
            _ => { bp[i] += eps; bm[i] -= eps; }
        }
        (loss(&xp, &ap, &bp) - loss(&xm, &am, &bm)) / (2.0 * eps)
    };
    let mut worst: f64 = 0.0;
    for (which, grad) in [(0, &an.dx), (1, &an.da), (2, &an.db)] {
        for (i, &gv) in grad.iter().enumerate() {
            let e = (fd(which, i) - gv).abs();
            worst = worst.max(e);
            assert!(e < 1e-8, "gradient {which} element {i}: analytic {gv}, finite difference {}", fd(which, i));
        }
    }
    println!("finite differences: worst abs error {worst:.2e}");
}

#[test]
fn bad_inputs_are_errors() {
    let g = gpu();
    assert!(LoraParams::new(g, &[spec("zero", 0, 4, 4, 1.0, 0.0)], 1).is_err());
    assert!(LoraParams::new(g, &[spec("p1", 4, 4, 4, 1.0, 1.0)], 1).is_err());
    let lp = LoraParams::new(g, &[spec("l", 8, 6, 2, 2.0, 0.0)], 1).unwrap();
    let x = Tensor::empty(g, &[3, 9], DType::F16, "x").unwrap();
    let y = Tensor::empty(g, &[3, 6], DType::F16, "y").unwrap();
    let mut pb = PlanBuilder::new(g);
    let err = lp.layers[0].forward(&mut pb, &x, Operand::dense(&y, 6)).err().expect("a width mismatch is an error");
    assert!(err.to_string().contains("lora forward"), "{err}");
}
