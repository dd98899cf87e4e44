//! Tests of the LoRA parameters (model::lora::LoraParams): peft's default initialisation, the
//! AdamW step (kernels::lora) against torch's algorithm in f64, and the skip of a step whose
//! gradients are not finite. Fresh seeded random inputs (the seed is printed;
//! ATELIER_TEST_SEED replays it).
//!
//! Bounds: AdamW (f32 on the GPU, f64 reference of torch's algorithm), after 5 steps: m and v
//! 1e-6 relative L2 (a few f32 roundings a step, ~6e-8 each); the parameters' change 1e-5
//! plus the f32 storage rounding of p (two half-ulp roundings a step, 4·sqrt(10)·2^-24·||p|| /
//! ||change||, the larger part at lr 1e-3); the gradient norm 1e-6.

mod common;

use atelier::gpu::Recorder;
use atelier::model::lora::{init_values, layout, AdamW, LoraParams, LoraSpec};
use common::*;

fn spec(name: &str, k: usize, n: usize, rank: usize, alpha: f32, dropout: f32) -> LoraSpec {
    LoraSpec { name: name.into(), k, n, rank, alpha, dropout }
}

fn scaled(v: &[f32], s: f32) -> Vec<f32> {
    v.iter().map(|x| x * s).collect()
}

fn f64s(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// torch.optim.AdamW (amsgrad off, maximize off) with clip_grad_norm_ first, in f64.
struct CpuAdamW {
    p: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
}

impl CpuAdamW {
    /// One step t (1-based) with gradients `g`; returns the total norm before clipping.
    fn step(&mut self, opt: &AdamW, t: i32, g: &[f32]) -> f64 {
        let norm = g.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        let coef = match opt.max_grad_norm {
            Some(max) => (max / (norm + 1e-6)).min(1.0),
            None => 1.0,
        };
        let (bc1, bc2) = (1.0 - opt.beta1.powi(t), 1.0 - opt.beta2.powi(t));
        for (i, &gf) in g.iter().enumerate() {
            let gi = gf as f64 * coef;
            self.p[i] *= 1.0 - opt.lr * opt.weight_decay;
            self.m[i] = opt.beta1 * self.m[i] + (1.0 - opt.beta1) * gi;
            self.v[i] = opt.beta2 * self.v[i] + (1.0 - opt.beta2) * gi * gi;
            let denom = self.v[i].sqrt() / bc2.sqrt() + opt.eps;
            self.p[i] -= opt.lr / bc1 * self.m[i] / denom;
        }
        norm
    }
}

#[test]
fn adamw_matches_torch_algorithm() {
    let g = gpu();
    let specs = vec![spec("a", 37, 29, 3, 8.0, 0.0), spec("b", 320, 320, 4, 16.0, 0.1), spec("c", 8, 5, 1, 1.0, 0.0)];
    let cases = [
        ("no decay, no clip", AdamW { lr: 1e-2, weight_decay: 0.0, max_grad_norm: None, ..AdamW::default() }),
        ("decay 0.1, clip active", AdamW { lr: 1e-2, weight_decay: 0.1, max_grad_norm: Some(1.0), ..AdamW::default() }),
        ("torch defaults, clip inactive", AdamW { max_grad_norm: Some(1e6), ..AdamW::default() }),
    ];
    for (what, opt) in cases {
        let s = seed(&format!("adamw {what}"));
        let lp = LoraParams::new(g, &specs, s).unwrap();
        let (offsets, total) = layout(&specs, lp.align);
        assert_eq!(total, lp.total);
        // The real parameter slots; the gaps stay zero.
        let mut slot = vec![false; total];
        for (sp, &(oa, ob)) in specs.iter().zip(&offsets) {
            slot[oa..oa + sp.rank * sp.k].iter_mut().for_each(|x| *x = true);
            slot[ob..ob + sp.n * sp.rank].iter_mut().for_each(|x| *x = true);
        }
        let masked = |v: Vec<f32>| -> Vec<f32> { v.into_iter().zip(&slot).map(|(x, &s)| if s { x } else { 0.0 }).collect() };
        let p0 = masked(random(total, s ^ 1));
        lp.write_params(g, &p0).unwrap();
        let mut cpu = CpuAdamW { p: f64s(&p0), m: vec![0.0; total], v: vec![0.0; total] };
        let steps = lp.optimizer_step(g).unwrap();
        for t in 1..=5 {
            // Gradients of norm ~ 3 (so a max_norm of 1 clips), different each step.
            let gr = masked(scaled(&random(total, s ^ (100 + t as u64)), 3.0 / (total as f32 / 3.0).sqrt()));
            lp.grads.write_f32(g, &gr).unwrap();
            lp.set_step(g, &opt, t as u64, 0);
            let mut rec = Recorder::new(g);
            for d in &steps {
                rec.run(d).unwrap();
            }
            rec.finish().unwrap();
            let norm = cpu.step(&opt, t, &gr);
            let (gn, coef) = lp.grad_norm(g).unwrap();
            let en = (gn as f64 - norm).abs() / norm;
            println!("{what} step {t}: grad norm {gn} (ref {norm:.6}, rel {en:.1e}), clip coefficient {coef}");
            assert!(en < 1e-6, "{what} step {t}: norm {gn} vs {norm}");
            if opt.max_grad_norm == Some(1.0) {
                assert!(coef < 0.9, "clipping should be active (norm {gn})");
            } else {
                assert_eq!(coef, 1.0);
            }
            assert!(lp.grads.to_f32(g).unwrap().iter().all(|&x| x == 0.0), "gradients not zeroed after the step");
        }
        let p = lp.params.to_f32(g).unwrap();
        let change: Vec<f32> = p.iter().zip(&p0).map(|(a, b)| a - b).collect();
        let want: Vec<f64> = cpu.p.iter().zip(&p0).map(|(a, &b)| a - b as f64).collect();
        let ep = rel_l2(&change, &want);
        let em = rel_l2(&lp.m.to_f32(g).unwrap(), &cpu.m);
        let ev = rel_l2(&lp.v.to_f32(g).unwrap(), &cpu.v);
        // The parameters are stored in f32: each of the 5 steps rounds p twice (decay, update)
        // by up to half an ulp (2^-24 relative), which at a small lr is most of the error of
        // the change: bound 1e-5 of the change plus 4·sqrt(10)·2^-24 of ||p||.
        let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
        let bound = 1e-5 + 4.0 * 10f64.sqrt() * 2f64.powi(-24) * norm(&cpu.p) / norm(&want);
        println!("{what}: after 5 steps rel L2 of the parameter change {ep:.2e} (bound {bound:.1e}), m {em:.2e}, v {ev:.2e}");
        assert!(ep < bound, "{what}: parameter change {ep:.3e} over {bound:.3e}");
        assert!(em < 1e-6 && ev < 1e-6, "{what}: m {em:.3e}, v {ev:.3e} over 1e-6");
        for (i, &x) in p.iter().enumerate() {
            if !slot[i] {
                assert_eq!(x, 0.0, "gap element {i} became {x}");
            }
        }
        // The f16 copies are the updated parameters rounded.
        let p16 = lp.params16.to_f32(g).unwrap();
        for (i, (&h, &x)) in p16.iter().zip(&p).enumerate() {
            assert!((h - x).abs() <= x.abs() * 4.9e-4 + 6e-8, "f16 copy {i}: {h} for {x}");
        }
    }
}

#[test]
fn initialisation_is_peft_default_and_seeded() {
    let g = gpu();
    let specs = vec![spec("to_q", 320, 320, 4, 16.0, 0.1), spec("to_k", 768, 320, 4, 16.0, 0.0), spec("tiny", 3, 2, 1, 1.0, 0.0)];
    let s = seed("lora init");
    let lp = LoraParams::new(g, &specs, s).unwrap();
    let p = lp.params.to_f32(g).unwrap();
    let (offsets, total) = layout(&specs, lp.align);
    assert_eq!(p, init_values(&specs, &offsets, total, s));
    let mut in_a = vec![false; total];
    for (sp, &(oa, ob)) in specs.iter().zip(&offsets) {
        assert_eq!(oa % lp.align, 0);
        assert_eq!(ob % lp.align, 0);
        let a = &p[oa..oa + sp.rank * sp.k];
        in_a[oa..oa + sp.rank * sp.k].iter_mut().for_each(|x| *x = true);
        // torch.nn.init.kaiming_uniform_(a=sqrt(5)): bound = sqrt(6/((1+5)·fan_in)) = 1/sqrt(k).
        let bound = 1.0 / (sp.k as f64).sqrt();
        let amax = a.iter().fold(0f64, |m, &x| m.max((x as f64).abs()));
        assert!(amax <= bound, "{}: |A| reaches {amax}, bound {bound}", sp.name);
        if a.len() >= 1000 {
            // Uniform: the extremes near the bound, mean 0, variance bound²/3 (5 sigma).
            assert!(amax > 0.99 * bound, "{}: |A| only reaches {amax} of {bound}", sp.name);
            let nn = a.len() as f64;
            let mean = a.iter().map(|&x| x as f64).sum::<f64>() / nn;
            let var = a.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / nn;
            let want = bound * bound / 3.0;
            assert!(mean.abs() < 5.0 * (want / nn).sqrt(), "{}: mean {mean}", sp.name);
            assert!((var - want).abs() < 5.0 * want * (0.8 / nn).sqrt(), "{}: variance {var} vs {want}", sp.name);
        }
        assert!(p[ob..ob + sp.n * sp.rank].iter().all(|&x| x == 0.0), "{}: B not zero", sp.name);
    }
    // Everything outside A (B and the gaps) is zero; the optimizer state starts at zero.
    assert!(p.iter().zip(&in_a).all(|(&x, &a)| a || x == 0.0));
    for t in [&lp.grads, &lp.m, &lp.v] {
        assert!(t.to_f32(g).unwrap().iter().all(|&x| x == 0.0));
    }
    assert_eq!(lp.params16.to_f32(g).unwrap(), round_f16(&p));
    lp.grads.write_f32(g, &vec![1.0; lp.total]).unwrap();
    lp.zero_grads(g);
    assert!(lp.grads.to_f32(g).unwrap().iter().all(|&x| x == 0.0));
    // Same seed, same values; another seed, others.
    let again = LoraParams::new(g, &specs, s).unwrap();
    assert_eq!(again.params.to_f32(g).unwrap(), p);
    let other = LoraParams::new(g, &specs, s ^ 1).unwrap();
    assert_ne!(other.params.to_f32(g).unwrap(), p);
}

/// A non-finite gradient (an overflowed f16 activation gradient) skips the step: parameters,
/// moments and f16 copies unchanged, gradients zeroed, the skip reported; the next finite
/// step runs normally.
#[test]
fn non_finite_gradients_skip_the_step() {
    let g = gpu();
    let specs = vec![spec("a", 16, 8, 2, 4.0, 0.0)];
    let lp = LoraParams::new(g, &specs, 5).unwrap();
    let opt = AdamW { lr: 1e-2, max_grad_norm: Some(1.0), ..AdamW::default() };
    let steps = lp.optimizer_step(g).unwrap();
    let run = |grads: &[f32], t: u64| {
        lp.grads.write_f32(g, grads).unwrap();
        lp.set_step(g, &opt, t, 0);
        let mut rec = Recorder::new(g);
        for d in &steps {
            rec.run(d).unwrap();
        }
        rec.finish().unwrap();
    };
    let layer = &lp.layers[0];
    for bad in [f32::INFINITY, f32::NAN] {
        let (p0, m0, h0) = (lp.params.to_f32(g).unwrap(), lp.m.to_f32(g).unwrap(), lp.params16.to_f32(g).unwrap());
        let mut grads = vec![0f32; lp.total];
        grads[layer.off_a..layer.off_a + 32].iter_mut().for_each(|x| *x = 0.5);
        grads[layer.off_a + 3] = bad;
        run(&grads, 1);
        assert!(lp.step_skipped(g).unwrap(), "a {bad} gradient must skip the step");
        assert_eq!(lp.params.to_f32(g).unwrap(), p0, "parameters changed on a skipped step");
        assert_eq!(lp.m.to_f32(g).unwrap(), m0, "moments changed on a skipped step");
        assert_eq!(lp.params16.to_f32(g).unwrap(), h0, "f16 copies changed on a skipped step");
        assert!(lp.grads.to_f32(g).unwrap().iter().all(|&x| x == 0.0), "gradients not zeroed after a skipped step");
    }
    let mut grads = vec![0f32; lp.total];
    grads[layer.off_a..layer.off_a + 32].iter_mut().for_each(|x| *x = 0.5);
    let p0 = lp.params.to_f32(g).unwrap();
    run(&grads, 1);
    assert!(!lp.step_skipped(g).unwrap());
    assert_ne!(lp.params.to_f32(g).unwrap(), p0, "a finite step must update");
}
