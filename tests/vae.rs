//! The VAE against diffusers' AutoencoderKL on the tiny fixture model: the float64 PyTorch
//! reference (tests/fixtures/reference_vae.safetensors) for two decodes (8x8 and 8x12
//! latents, z given directly) and one encode (a 64x64 image), loaded from both weight layouts
//! (the diffusers folder's fp16 VAE and the single-file bf16 checkpoint; the fixture weights
//! are exact in both). Fixture tensors are NCHW, the engine's NHWC.
//!
//! Bound: twice PyTorch's own fp16 error on the same inputs (reference_errors.json, measured
//! when the fixtures were made), per output: the criterion. The tapped intermediates
//! (post_quant_conv, decoder.conv_in / mid_block / up_blocks.0-1; encoder.down_blocks.0-3 /
//! mid_block / conv_out, quant_conv) are checked the same way, so a mismatch is located at the
//! first block that breaks.

mod common;

use atelier::config::Sd15Config;
use atelier::model::vae::AutoencoderKL;
use atelier::model::weights::Weights;
use atelier::rng::Rng;
use common::fixtures::*;
use common::gpu;

fn load(rel: &str) -> AutoencoderKL {
    let w = Weights::open(fixture(rel)).unwrap();
    let model = AutoencoderKL::load(&w, gpu(), &Sd15Config::tiny().vae).unwrap();
    w.finish().unwrap();
    model
}

/// Compares the NHWC tensor `out` with the NCHW reference `case.name`.
fn check(rel: &str, r: &Reference, case: &str, name: &str, out: &[f32]) {
    let key = format!("{case}.{name}");
    let (shape, want) = r.get(&key);
    assert_eq!(out.len(), want.len(), "{key}: {} values, reference {shape:?}", out.len());
    check_close(&format!("{rel} {key}"), &nhwc_to_nchw(out, &shape), &want, 2.0 * torch_fp16_error("vae", &key));
}

fn decode(rel: &str, case: &str, taps: &[&str]) {
    let g = gpu();
    let model = load(rel);
    let r = Reference::open("reference_vae.safetensors");
    let (shape, z) = r.get(&format!("{case}.latent"));
    let p = model.decode_plan(g, shape[0], shape[2], shape[3], true).unwrap();
    p.run(g, &nchw_to_nhwc(&z, &shape)).unwrap();
    for name in taps {
        check(rel, &r, case, name, &p.taps.get(name).unwrap().to_f32(g).unwrap());
    }
    check(rel, &r, case, "image", &p.image.to_f32(g).unwrap());
}

fn decode_both(rel: &str) {
    decode(rel, "decode_8x8", &["post_quant_conv", "decoder.conv_in", "decoder.mid_block", "decoder.up_blocks.0", "decoder.up_blocks.1"]);
    decode(rel, "decode_8x12", &["post_quant_conv", "decoder.conv_in", "decoder.mid_block"]);
}

fn encode(rel: &str) {
    let g = gpu();
    let model = load(rel);
    let r = Reference::open("reference_vae.safetensors");
    let (shape, x) = r.get("encode.image");
    let p = model.encode_plan(g, shape[0], shape[2], shape[3], true).unwrap();
    p.run(g, &nchw_to_nhwc(&x, &shape), 7).unwrap();
    for i in 0..4 {
        let name = format!("encoder.down_blocks.{i}");
        check(rel, &r, "encode", &name, &p.taps.get(&name).unwrap().to_f32(g).unwrap());
    }
    for name in ["encoder.mid_block", "encoder.conv_out", "quant_conv"] {
        check(rel, &r, "encode", name, &p.taps.get(name).unwrap().to_f32(g).unwrap());
    }
    check(rel, &r, "encode", "mean", &p.mean.to_f32(g).unwrap());
    check(rel, &r, "encode", "logvar", &p.logvar.to_f32(g).unwrap());
    check(rel, &r, "encode", "std", &p.std.to_f32(g).unwrap());
}

#[test]
fn vae_decode_matches_diffusers_diffusers_folder() {
    decode_both("tiny-sd");
}

#[test]
fn vae_decode_matches_diffusers_single_file() {
    decode_both("tiny-sd.safetensors");
}

#[test]
fn vae_encode_matches_diffusers_diffusers_folder() {
    encode("tiny-sd");
}

#[test]
fn vae_encode_matches_diffusers_single_file() {
    encode("tiny-sd.safetensors");
}

/// Batches of two: the first image is the fixture's (checked against the reference, bound as
/// above), the second a random one, which must match its own batch-of-one run to within
/// PyTorch's fp16 error (only the order of f32 sums differs between the two runs), so no
/// image leaks into another through the group norms or the attention.
#[test]
fn vae_batch_of_two_matches_single_runs() {
    let g = gpu();
    let model = load("tiny-sd");
    let r = Reference::open("reference_vae.safetensors");
    let (shape, z) = r.get("decode_8x8.latent");
    let z = nchw_to_nhwc(&z, &shape);
    let z2: Vec<f32> = Rng::new(3).normals(z.len());
    let one = model.decode_plan(g, 1, 8, 8, false).unwrap();
    one.run(g, &z2).unwrap();
    let single = one.image.to_f32(g).unwrap();
    let two = model.decode_plan(g, 2, 8, 8, false).unwrap();
    two.run(g, &[z.clone(), z2].concat()).unwrap();
    let out = two.image.to_f32(g).unwrap();
    let (first, second) = out.split_at(out.len() / 2);
    check("batch 2, item 0", &r, "decode_8x8", "image", first);
    check_close("batch 2 decode, item 1 vs batch 1", second, &single, torch_fp16_error("vae", "decode_8x8.image"));

    let (shape, x) = r.get("encode.image");
    let x = nchw_to_nhwc(&x, &shape);
    let x2 = common::random(x.len(), 5);
    let one = model.encode_plan(g, 1, 64, 64, false).unwrap();
    one.run(g, &x2, 1).unwrap();
    let single = one.mean.to_f32(g).unwrap();
    let two = model.encode_plan(g, 2, 64, 64, false).unwrap();
    two.run(g, &[x, x2].concat(), 1).unwrap();
    let out = two.mean.to_f32(g).unwrap();
    let (first, second) = out.split_at(out.len() / 2);
    check("batch 2, item 0", &r, "encode", "mean", first);
    check_close("batch 2 encode mean, item 1 vs batch 1", second, &single, torch_fp16_error("vae", "encode.mean"));
}

/// The seeded sample is mean + std·noise with noise = Rng::new(seed).normals(n) in NHWC order
/// (EncodePlan::seeded_noise), computed here on the CPU from the GPU's own mean and std.
/// Tolerance: the noise is stored as f16 (relative 2^-11), std·noise and the sum are each
/// rounded to f16 (2^-11 of their size), so per element
/// |gpu - cpu| <= 2^-10·(|mean| + 2·|std·noise|) + 1e-6.
#[test]
fn vae_seeded_sample_is_mean_plus_std_times_noise() {
    let g = gpu();
    let model = load("tiny-sd");
    let p = model.encode_plan(g, 2, 16, 24, false).unwrap();
    let image: Vec<f32> = common::random(2 * 16 * 24 * 3, 11);
    let seed = 12345;
    p.run(g, &image, seed).unwrap();
    let (mean, std, sample) = (p.mean.to_f32(g).unwrap(), p.std.to_f32(g).unwrap(), p.sample.to_f32(g).unwrap());
    let noise = Rng::new(seed).normals(2 * 2 * 3 * 4);
    assert_eq!(noise, p.seeded_noise(seed));
    assert_eq!(sample.len(), noise.len());
    let mut worst = 0.0f64;
    for i in 0..noise.len() {
        let sn = std[i] as f64 * noise[i] as f64;
        let want = mean[i] as f64 + sn;
        let tol = (mean[i].abs() as f64 + 2.0 * sn.abs()) / 1024.0 + 1e-6;
        let err = (sample[i] as f64 - want).abs();
        assert!(err <= tol, "sample[{i}] = {} vs mean + std·noise = {want} (tolerance {tol})", sample[i]);
        worst = worst.max(err / tol);
    }
    eprintln!("seeded sample: worst error {worst:.3} of the tolerance");
    // Another seed gives another sample; the same seed the same one.
    p.run(g, &image, seed + 1).unwrap();
    assert_ne!(p.sample.to_f32(g).unwrap(), sample);
    p.run(g, &image, seed).unwrap();
    assert_eq!(p.sample.to_f32(g).unwrap(), sample);
}

#[test]
fn vae_refuses_bad_sizes() {
    let g = gpu();
    let model = load("tiny-sd");
    assert!(model.decode_plan(g, 0, 8, 8, false).is_err());
    assert!(model.decode_plan(g, 1, 0, 8, false).is_err());
    assert!(model.decode_plan(g, 1, 8, 0, false).is_err());
    assert!(model.encode_plan(g, 0, 64, 64, false).is_err());
    assert!(model.encode_plan(g, 1, 0, 64, false).is_err());
    assert!(model.encode_plan(g, 1, 63, 64, false).is_err());
    assert!(model.encode_plan(g, 1, 64, 60, false).is_err());
    // Absurd sizes are errors (over the device's buffer limits), not panics.
    assert!(model.decode_plan(g, 1, 1 << 20, 1 << 20, false).is_err());
    assert!(model.encode_plan(g, usize::MAX / 8, 1 << 20, 1 << 20, false).is_err());
    // Inputs of the wrong length.
    let d = model.decode_plan(g, 1, 2, 3, false).unwrap();
    assert!(d.run(g, &[0.0; 5]).is_err());
    d.run(g, &[0.0; 2 * 3 * 4]).unwrap();
    // One-latent-pixel sides work (the last downsamplers see 2- and 1-pixel sides).
    let e = model.encode_plan(g, 1, 8, 16, false).unwrap();
    e.run(g, &[0.25; 8 * 16 * 3], 1).unwrap();
    assert!(e.mean.to_f32(g).unwrap().iter().all(|v| v.is_finite()));
    let e = model.encode_plan(g, 1, 16, 24, false).unwrap();
    assert!(e.run(g, &[0.0; 7], 1).is_err());
    assert!(e.set_noise(g, &[0.0; 3]).is_err());
}
