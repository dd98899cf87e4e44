//! The text encoder's LoRA training pass against PyTorch + peft autograd on the tiny model
//! (tests/fixtures/reference_te_train.safetensors, made by
//! tests/fixtures/make_te_train_fixtures.py): rank 4, alpha 16 adapters on every layer's
//! q, k, v, out projections and fc1, fc2 (18 modules) at given nonzero A and B, dropout off,
//! two prompts, and a given gradient of the output (loss = sum(upstream · output)).
//!
//! Bounds, as tests/unet_train.rs: the output within twice PyTorch's own fp16 error; all
//! gradients concatenated within 1.5x PyTorch's concatenated fp16 error, and each tensor within
//! 4x PyTorch's fp16 error on that tensor (a small tensor's error fluctuates). Our pass keeps
//! activations and their gradients in f16 as PyTorch's fp16 run does; the ratios are printed.
//! With clip skip the last layer does not take part: its adapters' gradients must stay exactly
//! zero.

mod common;

use atelier::config::Sd15Config;
use atelier::model::clip::ClipTextModel;
use atelier::model::clip_train::ClipTrainPlan;
use atelier::model::lora::LoraParams;
use atelier::model::weights::Weights;
use common::fixtures::*;
use common::{gpu, rel_l2};

const FILE: &str = "reference_te_train.safetensors";

fn model() -> ClipTextModel {
    let g = gpu();
    let cfg = Sd15Config::tiny().clip;
    let w = Weights::open(fixture("tiny-sd")).unwrap();
    let m = ClipTextModel::load(&w, g, &cfg).unwrap();
    w.finish().unwrap();
    m
}

/// The fixture's adapters (rank 4, alpha 16, no dropout).
fn adapters(m: &ClipTextModel, r: &Reference) -> LoraParams {
    let g = gpu();
    let specs = m.cfg.lora_specs(4, 16.0, 0.0);
    assert_eq!(specs.len(), 18, "3 layers of 6 projections");
    let lp = LoraParams::new(g, &specs, 1).unwrap();
    let mut flat = vec![0f32; lp.total];
    for l in &lp.layers {
        let (_, a) = r.get(&format!("te.lora.{}.lora_A", l.spec.name));
        let (_, b) = r.get(&format!("te.lora.{}.lora_B", l.spec.name));
        flat[l.off_a..l.off_a + a.len()].copy_from_slice(&a);
        flat[l.off_b..l.off_b + b.len()].copy_from_slice(&b);
    }
    lp.write_params(g, &flat).unwrap();
    lp
}

/// Runs forward and backward with the upstream gradient at `loss_scale`.
fn run(plan: &ClipTrainPlan, lp: &LoraParams, r: &Reference) {
    let g = gpu();
    let (_, ids) = r.get("te.input_ids");
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let (_, up) = r.get("te.upstream");
    plan.set_ids(g, &ids).unwrap();
    plan.dout.write_f32(g, &up.iter().map(|v| v * plan.loss_scale).collect::<Vec<_>>()).unwrap();
    lp.grads.fill_words(g, 0x7fc0_0000);
    lp.zero_grads(g);
    let mut rec = atelier::gpu::Recorder::new(g);
    plan.record_forward(&mut rec).unwrap();
    plan.record_backward(&mut rec).unwrap();
    rec.finish().unwrap();
}

fn check(skip: usize, loss_scale: f32) {
    let g = gpu();
    let m = model();
    let r = Reference::open(FILE);
    let notes = r.notes("notes");
    let case = format!("skip{skip}");
    let errs = &notes["te"]["cases"][&case]["errors"]["fp16"];
    let zero: Vec<&str> = notes["te"]["cases"][&case]["zero_grad_tensors"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    let lp = adapters(&m, &r);
    let plan = m.train_plan(g, 2, skip, &lp, loss_scale).unwrap();
    println!(
        "{case}: saved activations {:.1} KiB, peak {:.1} KiB, {} + {} launches",
        plan.saved_bytes as f64 / 1024.0,
        plan.backward.peak_bytes as f64 / 1024.0,
        plan.forward.dispatches.len(),
        plan.backward.dispatches.len()
    );
    run(&plan, &lp, &r);
    let out = plan.out.to_f32(g).unwrap();
    check_close(&format!("{case} output"), &out, &r.get(&format!("te.{case}.output")).1, 2.0 * errs["output"].as_f64().unwrap());

    let grads = lp.grads.to_f32(g).unwrap();
    let (mut ratios, mut all_got, mut all_want) = (Vec::new(), Vec::new(), Vec::new());
    let mut worst = (0.0f64, String::new());
    for l in &lp.layers {
        let s = &l.spec;
        for (which, off, len) in [("lora_A", l.off_a, s.rank * s.k), ("lora_B", l.off_b, s.n * s.rank)] {
            let name = format!("{}.{which}", s.name);
            let got = &grads[off..off + len];
            if zero.contains(&name.as_str()) {
                assert!(got.iter().all(|&v| v == 0.0), "{case} {name}: a layer past the clip skip got a gradient");
                continue;
            }
            let (_, want) = r.get(&format!("te.{case}.grad.{name}"));
            let want: Vec<f64> = want.iter().map(|&v| v as f64).collect();
            let e = rel_l2(got, &want);
            let torch = errs["grad_per_tensor"][&name].as_f64().unwrap_or_else(|| panic!("no fp16 error for {name}"));
            let bound = 4.0 * torch;
            assert!(e <= bound, "{case} {name}: relative L2 error {e:.3e} over {bound:.3e}");
            ratios.push(e / torch);
            if e / bound > worst.0 {
                worst = (e / bound, format!("{name}: {e:.3e} of {bound:.3e}"));
            }
            all_got.extend_from_slice(got);
            all_want.extend(want);
        }
    }
    ratios.sort_by(f64::total_cmp);
    println!("{case}: our error / PyTorch fp16's per tensor: median {:.2}, max {:.2}; closest to its bound: {}", ratios[ratios.len() / 2], ratios[ratios.len() - 1], worst.1);
    let all = rel_l2(&all_got, &all_want);
    let all_bound = 1.5 * errs["grad_all_concatenated"].as_f64().unwrap();
    println!("{case}: all gradients concatenated: relative L2 error {all:.3e} (bound {all_bound:.3e})");
    assert!(all <= all_bound, "{case}: all gradients: relative L2 error {all:.3e} over {all_bound:.3e}");
    assert_eq!(zero.len(), if skip == 0 { 0 } else { 12 });
}

/// At a loss scale of 1/8: the gradient comes in at the scale the UNet's would (its loss
/// scale over the number of predicted values is about that size), and the adapters divide it
/// back out.
#[test]
fn te_gradients_match_peft() {
    check(0, 0.125);
}

#[test]
fn te_gradients_match_peft_clip_skip() {
    check(1, 0.125);
}

/// The forward part alone gives the inference plan's output (same launches but for the saving
/// norms), and bad arguments are refused.
#[test]
fn te_forward_matches_inference_and_refuses_bad_input() {
    let g = gpu();
    let m = model();
    let r = Reference::open(FILE);
    let lp = LoraParams::new(g, &m.cfg.lora_specs(4, 16.0, 0.0), 3).unwrap();
    let (_, ids) = r.get("te.input_ids");
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    for skip in [0, 1] {
        let plan = m.train_plan(g, 2, skip, &lp, 1.0).unwrap();
        plan.set_ids(g, &ids).unwrap();
        plan.forward.run(g).unwrap();
        let inf = m.plan(g, 2, skip, false).unwrap();
        inf.run(g, &ids).unwrap();
        let (a, b) = (plan.out.to_f32(g).unwrap(), inf.out.to_f32(g).unwrap());
        let e = rel_l2(&a, &b.iter().map(|&v| v as f64).collect::<Vec<_>>());
        println!("skip {skip}: training forward (B = 0) vs inference: relative L2 {e:.2e}");
        assert!(e < 1e-3, "skip {skip}: training forward differs from inference by {e:.3e}");
    }
    assert!(m.train_plan(g, 2, 3, &lp, 1.0).is_err(), "skip must be below the layer count");
    assert!(m.train_plan(g, 0, 0, &lp, 1.0).is_err(), "batch 0");
    assert!(m.train_plan(g, 1, 0, &lp, 0.0).is_err(), "loss scale 0");
    let plan = m.train_plan(g, 1, 0, &lp, 1.0).unwrap();
    assert!(plan.set_ids(g, &[1, 2]).is_err());
}
