//! The CLIP text encoder against transformers' CLIPTextModel on the tiny fixture model: the
//! float64 PyTorch reference (tests/fixtures/reference_clip.safetensors) for two prompts,
//! loaded from both weight layouts (the diffusers folder's fp16 text encoder and the
//! single-file bf16 checkpoint; the fixture weights are exact in both).
//!
//! Bound: twice PyTorch's own fp16 error on the same inputs (reference_errors.json, measured
//! when the fixtures were made), per output: the criterion. Every layer's hidden state
//! is checked the same way, so a mismatch is located at the first layer that breaks.

mod common;

use atelier::config::Sd15Config;
use atelier::model::clip::ClipTextModel;
use atelier::model::weights::Weights;
use common::fixtures::*;
use common::gpu;

fn run_layout(rel: &str) {
    let g = gpu();
    let cfg = Sd15Config::tiny().clip;
    let w = Weights::open(fixture(rel)).unwrap();
    let model = ClipTextModel::load(&w, g, &cfg).unwrap();
    w.finish().unwrap();
    let r = Reference::open("reference_clip.safetensors");
    let (shape, ids) = r.get("input_ids");
    let ids: Vec<u32> = ids.iter().map(|&x| x as u32).collect();
    let batch = shape[0];

    let full = model.plan(g, batch, 0, true).unwrap();
    full.run(g, &ids).unwrap();
    for i in 0..=cfg.num_hidden_layers {
        let name = format!("hidden_states.{i}");
        let out = full.taps.get(&name).unwrap().to_f32(g).unwrap();
        check_close(&format!("{rel} {name}"), &out, &r.get(&name).1, 2.0 * torch_fp16_error("clip", &name));
    }
    let out = full.out.to_f32(g).unwrap();
    check_close(&format!("{rel} last_hidden_state"), &out, &r.get("last_hidden_state").1, 2.0 * torch_fp16_error("clip", "last_hidden_state"));

    let skip = model.plan(g, batch, 1, false).unwrap();
    skip.run(g, &ids).unwrap();
    let out = skip.out.to_f32(g).unwrap();
    check_close(&format!("{rel} penultimate_normed"), &out, &r.get("penultimate_normed").1, 2.0 * torch_fp16_error("clip", "penultimate_normed"));
}

#[test]
fn clip_matches_transformers_diffusers_folder() {
    run_layout("tiny-sd");
}

#[test]
fn clip_matches_transformers_single_file() {
    run_layout("tiny-sd.safetensors");
}

#[test]
fn clip_refuses_bad_skip_and_wrong_id_count() {
    let g = gpu();
    let cfg = Sd15Config::tiny().clip;
    let w = Weights::open(fixture("tiny-sd")).unwrap();
    let model = ClipTextModel::load(&w, g, &cfg).unwrap();
    assert!(model.plan(g, 1, cfg.num_hidden_layers, false).is_err());
    assert!(model.plan(g, 0, 0, false).is_err());
    let p = model.plan(g, 1, 0, false).unwrap();
    assert!(p.run(g, &[1, 2, 3]).is_err());
}
