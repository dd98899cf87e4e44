//! LoRA files against diffusers' and PEFT's own merges: the fixtures made by
//! `tests/fixtures/make_lora_fixtures.py` (kohya, diffusers, older diffusers, PEFT folder) load
//! onto the tiny model with every key mapped, and the weights read back with the LoRA merged
//! match `reference_lora.safetensors` (W + 0.7 * scale * B.A as diffusers' fuse_lora and PEFT's
//! merge_and_unload compute it) to f32 rounding, through `get_f32` (which the fused and
//! convolution loads use) and through the GPU as f16. The LDM single-file model and kohya names
//! built from LDM paths merge the same; LoRAs add up; unknown keys are listed; LyCORIS
//! variants, SDXL / SD-2 LoRAs, wrong shapes and broken files are clear errors.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use atelier::kernels::conv::conv_weight_to_nhwc;
use atelier::model::convert::{KeyMap, LdmLayout};
use atelier::model::layers::{Conv, Linear};
use atelier::model::lora_file::{LoraFile, LoraFormat};
use atelier::model::weights::Weights;
use common::fixtures::{Reference, check_close, fixture};
use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

/// Merged weights against the libraries' merge: f32 values, a different summation order (the
/// rank-4 products) and one rounding of W + delta: ~1e-7 relative; 1e-6 leaves room, and a
/// wrong scale (the smallest difference between formats is a factor 2 on a change a third the
/// size of W) is off by > 0.1.
const F32_BOUND: f64 = 1e-6;
/// Through the GPU as f16: one rounding to f16 (relative error <= 2^-11 per element).
const F16_BOUND: f64 = 4.9e-4;
const USER_SCALE: f32 = 0.7;

/// Tensors to write: key, dtype, shape, bytes.
type Tensors = Vec<(String, Dtype, Vec<usize>, Vec<u8>)>;
/// A refusal case: file name, tensors, metadata, what the message must say.
type Case = (&'static str, Tensors, Option<HashMap<String, String>>, &'static str);

// ---------------------------------------------------------------------------------------
// Helpers

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("atelier-lora-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn model() -> Weights {
    Weights::open(fixture("tiny-sd")).unwrap()
}

fn lora_path(name: &str) -> PathBuf {
    fixture(&format!("lora/{name}"))
}

fn reference() -> Reference {
    Reference::open("lora/reference_lora.safetensors")
}

/// The reference targets of a format: (atelier name, shape, merged values).
fn targets(fmt: &str) -> Vec<(String, Vec<usize>, Vec<f32>)> {
    let r = reference();
    let names = r.names(&format!("{fmt}."));
    assert!(names.len() >= 5, "{fmt}: only {} reference targets", names.len());
    names
        .iter()
        .map(|n| {
            let (shape, v) = r.get(n);
            (n[fmt.len() + 1..].to_string(), shape, v)
        })
        .collect()
}

/// The model with one LoRA added at `scale`.
fn merged(model_path: &Path, lora: &Path, scale: f32) -> (Weights, LoraFile) {
    let mut w = Weights::open(model_path).unwrap();
    let l = LoraFile::open(lora, &w).unwrap();
    w.add_lora(&l, scale).unwrap();
    (w, l)
}

/// Checks every reference target of `fmt` read through `get_f32`; also that each differs from
/// the weight without the LoRA (so the comparison can fail).
fn check_format(w: &Weights, fmt: &str) {
    let base = model();
    for (name, shape, want) in targets(fmt) {
        let got = w.get_f32(&name, &shape).unwrap();
        check_close(&format!("{fmt} {name}"), &got, &want, F32_BOUND);
        let plain: Vec<f64> = base.get_f32(&name, &shape).unwrap().iter().map(|&x| x as f64).collect();
        assert!(rel_l2(&want, &plain) > 0.05, "{fmt} {name}: the reference hardly differs from the base weight");
    }
}

/// A copy of a safetensors file with keys renamed (None drops the key), extra tensors and
/// other metadata.
fn rewrite(
    src: &Path,
    dst: &Path,
    rename: impl Fn(&str) -> Option<String>,
    extra: &[(&str, Dtype, Vec<usize>, Vec<u8>)],
    metadata: Option<HashMap<String, String>>,
) {
    let bytes = std::fs::read(src).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let mut views: Vec<(String, TensorView)> = Vec::new();
    for (k, t) in st.tensors() {
        if let Some(n) = rename(&k) {
            views.push((n, TensorView::new(t.dtype(), t.shape().to_vec(), t.data()).unwrap()));
        }
    }
    for (k, d, shape, data) in extra {
        views.push((k.to_string(), TensorView::new(*d, shape.clone(), data).unwrap()));
    }
    safetensors::serialize_to_file(views, metadata, dst).unwrap();
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// A kohya pair (and alpha) for `name` with down [r, in..] and up [out, r, ..].
fn kohya_pair(name: &str, down: &[usize], up: &[usize]) -> Tensors {
    let n = |s: &[usize]| s.iter().product::<usize>();
    vec![
        (format!("{name}.lora_down.weight"), Dtype::F32, down.to_vec(), f32_bytes(&random(n(down), 1))),
        (format!("{name}.lora_up.weight"), Dtype::F32, up.to_vec(), f32_bytes(&random(n(up), 2))),
        (format!("{name}.alpha"), Dtype::F32, vec![], f32_bytes(&[1.0])),
    ]
}

fn write_tensors(path: &Path, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)], metadata: Option<HashMap<String, String>>) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(k, d, s, b)| (k.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    safetensors::serialize_to_file(views, metadata, path).unwrap();
}

/// The error of an open that must fail; a panic fails the test with the input named.
fn open_err(path: &Path, w: &Weights) -> String {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| LoraFile::open(path, w).map(|_| ()))) {
        Ok(Ok(())) => panic!("{} opened", path.display()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("LoraFile::open panicked on {}", path.display()),
    }
}

// ---------------------------------------------------------------------------------------
// Mapping

#[test]
fn every_format_maps_every_key() {
    let w = model();
    let unet_pairs = 28;
    let te_pairs = 7;
    for (file, format, adapters) in [
        ("tiny_kohya.safetensors", LoraFormat::Kohya, unet_pairs + te_pairs),
        ("tiny_diffusers.safetensors", LoraFormat::Diffusers, unet_pairs + te_pairs),
        ("tiny_diffusers_old.safetensors", LoraFormat::DiffusersOld, unet_pairs + te_pairs),
        ("tiny_peft", LoraFormat::Peft, unet_pairs),
    ] {
        let l = LoraFile::open(lora_path(file), &w).unwrap();
        eprintln!("{file}: {} adapters, format {}", l.adapters.len(), l.format);
        assert_eq!(l.format, format, "{file}");
        assert!(l.unknown.is_empty(), "{file}: unknown keys {:?}", l.unknown);
        assert_eq!(l.adapters.len(), adapters, "{file}");
        let te = l.adapters.iter().filter(|a| a.target.starts_with("text_encoder.text_model.encoder.layers.")).count();
        assert_eq!(te, adapters - unet_pairs, "{file}: text-encoder adapters");
        for a in &l.adapters {
            assert!(w.contains(&a.target), "{file}: {} is not a weight", a.target);
            let want_scale = match format {
                LoraFormat::Kohya | LoraFormat::Diffusers => 2.0,
                LoraFormat::DiffusersOld => 1.0,
                LoraFormat::Peft if a.target.ends_with(".proj_out.weight") => 2.0 / 2.0,
                LoraFormat::Peft if a.target.ends_with("ff.net.2.weight") && a.target.contains("down_blocks.0") => {
                    8.0 / 2f32.sqrt()
                }
                LoraFormat::Peft => 8.0 / 2.0,
            };
            assert!((a.scale - want_scale).abs() < 1e-6, "{file}: {}: scale {} (want {want_scale})", a.target, a.scale);
        }
    }
    // A PEFT adapter file named directly reads the adapter_config.json beside it.
    let l = LoraFile::open(lora_path("tiny_peft/adapter_model.safetensors"), &w).unwrap();
    assert_eq!((l.format, l.adapters.len()), (LoraFormat::Peft, unet_pairs));
    assert!(l.adapters.iter().any(|a| a.scale == 4.0 && a.alpha == 8.0));
    // The 3x3 LoCon convolution and the 1x1 convolutions keep their kernel shapes.
    let l = LoraFile::open(lora_path("tiny_kohya.safetensors"), &w).unwrap();
    let conv = l.adapters.iter().find(|a| a.target == "unet.down_blocks.0.resnets.0.conv1.weight").unwrap();
    assert_eq!((conv.down_shape.as_slice(), conv.up_shape.as_slice()), (&[4, 16, 3, 3][..], &[16, 4, 1, 1][..]));
}

#[test]
fn ldm_names_invert_the_converter() {
    let w = model();
    let map = KeyMap::new(&LdmLayout::sd15());
    let mut n = 0;
    for name in w.names().filter(|n| n.starts_with("unet.") || n.starts_with("text_encoder.")) {
        let ldm = map.to_ldm(name).unwrap_or_else(|| panic!("no LDM name for {name}"));
        assert_eq!(map.convert(&ldm).map(|c| c.name).as_deref(), Some(name), "{name} -> {ldm}");
        n += 1;
    }
    assert!(n > 300, "only {n} names");
    assert_eq!(map.to_ldm("vae.decoder.conv_in.weight"), None);
}

// ---------------------------------------------------------------------------------------
// Merged values against diffusers and PEFT

#[test]
fn merged_weights_match_diffusers_and_peft() {
    for (file, fmt) in [
        ("tiny_kohya.safetensors", "kohya"),
        ("tiny_diffusers.safetensors", "diffusers"),
        ("tiny_diffusers_old.safetensors", "diffusers_old"),
        ("tiny_peft", "peft"),
    ] {
        let (w, _) = merged(&fixture("tiny-sd"), &lora_path(file), USER_SCALE);
        check_format(&w, fmt);
    }
}

#[test]
fn single_file_checkpoint_and_ldm_kohya_names_merge_the_same() {
    let single = fixture("tiny-sd.safetensors");
    let (w, _) = merged(&single, &lora_path("tiny_kohya.safetensors"), USER_SCALE);
    check_format(&w, "kohya");

    // kohya names built from LDM paths (as ComfyUI and A1111 write them); the table is written
    // out by hand here, independent of the converter.
    let dir = TempDir::new("ldm");
    let ldm = dir.join("tiny_kohya_ldm.safetensors");
    let table = [
        ("lora_unet_down_blocks_0_attentions_1_", "lora_unet_input_blocks_2_1_"),
        ("lora_unet_mid_block_attentions_0_", "lora_unet_middle_block_1_"),
        ("lora_unet_up_blocks_3_attentions_2_", "lora_unet_output_blocks_11_1_"),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_input_blocks_1_0_in_layers_2"),
        ("lora_unet_up_blocks_1_resnets_0_conv_shortcut", "lora_unet_output_blocks_3_0_skip_connection"),
    ];
    let rename = |k: &str| {
        if !k.starts_with("lora_unet_") {
            return Some(k.to_string());
        }
        let (from, to) = table.iter().find(|(f, _)| k.starts_with(f)).unwrap_or_else(|| panic!("no LDM name for {k}"));
        Some(format!("{to}{}", &k[from.len()..]))
    };
    rewrite(&lora_path("tiny_kohya.safetensors"), &ldm, rename, &[], None);
    for model_path in [fixture("tiny-sd"), single] {
        let (w, l) = merged(&model_path, &ldm, USER_SCALE);
        assert!(l.unknown.is_empty() && l.adapters.len() == 35, "{:?}: {:?}", model_path, l.unknown);
        check_format(&w, "kohya");
    }
}

#[test]
fn gpu_loads_get_the_merged_weights() {
    let gpu = gpu();
    let (w, _) = merged(&fixture("tiny-sd"), &lora_path("tiny_diffusers.safetensors"), USER_SCALE);
    let r = reference();
    let f16_of = |v: &[f32]| round_f16(v);

    // Weights::get (a 1x1 convolution as Linear::load_1x1 reads it): the f16 rounding of the merge.
    let name = "unet.down_blocks.0.attentions.1.proj_in.weight";
    let (_, want) = r.get(&format!("diffusers.{name}"));
    let t = w.get(gpu, name, &[16, 16, 1, 1]).unwrap();
    let got = t.to_f32(gpu).unwrap();
    check_close("get proj_in (f16)", &got, &want, F16_BOUND);
    assert_eq!(got, f16_of(&w.get_f32(name, &[16, 16, 1, 1]).unwrap()), "get is not the f16 rounding of get_f32");

    // Linear::load_fused (self-attention q, k, v stacked): the to_q rows.
    let attn = w.prefix(gpu, "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1");
    let fused = Linear::load_fused(&attn, &["to_q", "to_k", "to_v"], &[16, 16, 16], 16, false).unwrap();
    let got = fused.w.to_f32(gpu).unwrap();
    let (_, want) = r.get("diffusers.unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q.weight");
    check_close("fused to_q rows (f16)", &got[..256], &want, F16_BOUND);

    // Conv::load (reordered to [cout, kh, kw, cin]).
    let conv = Conv::load(&w.prefix(gpu, "unet.down_blocks.0.resnets.0.conv1"), 16, 16, 3, 1).unwrap();
    let got = conv.w.to_f32(gpu).unwrap();
    let (_, want) = r.get("diffusers.unet.down_blocks.0.resnets.0.conv1.weight");
    check_close("conv1 3x3 LoCon (f16)", &got, &conv_weight_to_nhwc(&want, 16, 16, 3, 3), F16_BOUND);

    let report = w.finish().unwrap();
    eprintln!("{report}");
    let l = &report.loras[0];
    // proj_in, to_q, to_k, to_v and conv1 were read.
    assert_eq!((l.targets, l.merged), (35, 5), "{report}");
    assert!(report.to_string().contains("LoRA tiny_diffusers.safetensors (scale 0.7): 5 of 35 weights merged"), "{report}");
}

#[test]
fn loras_add_up_and_scale() {
    let base = model();
    let mut w = model();
    let kohya = LoraFile::open(lora_path("tiny_kohya.safetensors"), &w).unwrap();
    let old = LoraFile::open(lora_path("tiny_diffusers_old.safetensors"), &w).unwrap();
    w.add_lora(&kohya, USER_SCALE).unwrap();
    w.add_lora(&old, USER_SCALE).unwrap();
    // Same adapters: W + 0.7*2*P + 0.7*1*P = ref(kohya) + ref(old) - W.
    let old_refs = targets("diffusers_old");
    for ((name, shape, k), (_, _, o)) in targets("kohya").into_iter().zip(old_refs) {
        let b = base.get_f32(&name, &shape).unwrap();
        let want: Vec<f32> = k.iter().zip(&o).zip(&b).map(|((k, o), b)| k + o - b).collect();
        check_close(&format!("kohya + old {name}"), &w.get_f32(&name, &shape).unwrap(), &want, 2.0 * F32_BOUND);
    }
    let report = w.finish().unwrap();
    assert_eq!(report.loras.len(), 2);
    assert!(report.loras.iter().all(|l| l.targets == 35 && l.merged == 7), "{report}");

    // Scale 0 leaves every weight exactly as it was.
    let mut z = model();
    z.add_lora(&kohya, 0.0).unwrap();
    for a in &kohya.adapters {
        let shape = base.shape(&a.target).unwrap().to_vec();
        let (x, y) = (z.get_f32(&a.target, &shape).unwrap(), base.get_f32(&a.target, &shape).unwrap());
        assert!(x.iter().zip(&y).all(|(a, b)| a.to_bits() == b.to_bits()), "{}", a.target);
    }

    // LoRAs are added before loading.
    let mut late = model();
    late.get_f32("unet.conv_in.weight", &[16, 4, 3, 3]).unwrap();
    let e = late.add_lora(&kohya, 1.0).unwrap_err().to_string();
    assert!(e.contains("before") || e.contains("after the model started loading"), "{e}");
    let e = model().add_lora(&kohya, f32::NAN).unwrap_err().to_string();
    assert!(e.contains("finite"), "{e}");
}

#[test]
fn diffusers_without_metadata_and_unprefixed_processor_keys() {
    let w = model();
    let dir = TempDir::new("variants");
    // Without lora_adapter_metadata diffusers takes alpha = r: scale 1, the old file's merge.
    let bare = dir.join("bare.safetensors");
    rewrite(&lora_path("tiny_diffusers.safetensors"), &bare, |k| Some(k.to_string()), &[], None);
    let l = LoraFile::open(&bare, &w).unwrap();
    assert!(l.adapters.iter().all(|a| a.scale == 1.0));
    let (m, _) = merged(&fixture("tiny-sd"), &bare, USER_SCALE);
    check_format(&m, "diffusers_old");

    // The oldest attention-processor files have no "unet." prefix.
    let old = dir.join("unprefixed.safetensors");
    rewrite(&lora_path("tiny_diffusers_old.safetensors"), &old, |k| Some(k.strip_prefix("unet.").unwrap_or(k).to_string()), &[], None);
    let (m, l) = merged(&fixture("tiny-sd"), &old, USER_SCALE);
    assert!(l.unknown.is_empty() && l.adapters.len() == 35, "{:?}", l.unknown);
    check_format(&m, "diffusers_old");
}

#[test]
fn unknown_keys_are_listed() {
    let w = model();
    let dir = TempDir::new("unknown");
    let p = dir.join("extra.safetensors");
    let mut extra = kohya_pair("lora_unet_down_blocks_9_attentions_0_proj_in", &[4, 16], &[16, 4]);
    extra.push(("some_other_tensor".into(), Dtype::F32, vec![2], f32_bytes(&[1.0, 2.0])));
    let extra: Vec<(&str, Dtype, Vec<usize>, Vec<u8>)> = extra.iter().map(|(k, d, s, b)| (k.as_str(), *d, s.clone(), b.clone())).collect();
    rewrite(&lora_path("tiny_kohya.safetensors"), &p, |k| Some(k.to_string()), &extra, None);
    let l = LoraFile::open(&p, &w).unwrap();
    assert_eq!(l.adapters.len(), 35);
    let mut want: Vec<String> = extra.iter().map(|(k, ..)| k.to_string()).collect();
    want.sort();
    assert_eq!(l.unknown, want);

    // Nothing matching at all is an error.
    let p = dir.join("nothing.safetensors");
    write_tensors(&p, &kohya_pair("lora_unet_down_blocks_9_attentions_0_proj_in", &[4, 16], &[16, 4]), None);
    let e = open_err(&p, &w);
    assert!(e.contains("no key of this file changes a weight") && e.contains("lora_unet_down_blocks_9"), "{e}");
}

// ---------------------------------------------------------------------------------------
// Refusals and broken files

#[test]
fn lycoris_variants_are_refused() {
    let w = model();
    let dir = TempDir::new("lycoris");
    let m = "lora_unet_down_blocks_0_attentions_1_proj_in";
    for (key, what) in [
        (format!("{m}.hada_w1_a"), "LoHa"),
        (format!("{m}.lokr_w1"), "LoKr"),
        (format!("{m}.dora_scale"), "DoRA"),
        (format!("{m}.lora_mid.weight"), "Tucker"),
        (format!("{m}.diff"), "diff"),
        ("unet.down_blocks.0.attentions.1.proj_in.lora_magnitude_vector".to_string(), "DoRA"),
        (format!("{m}.oft_blocks"), "OFT"),
    ] {
        let p = dir.join("v.safetensors");
        let mut t = kohya_pair(m, &[4, 16, 1, 1], &[16, 4, 1, 1]);
        t.push((key.clone(), Dtype::F32, vec![4], f32_bytes(&[1.0; 4])));
        write_tensors(&p, &t, None);
        let e = open_err(&p, &w);
        assert!(e.contains(&key) && e.contains(what) && e.contains("plain LoRA"), "{key}: {e}");
    }
}

#[test]
fn other_families_are_refused() {
    let w = model();
    let e = open_err(&lora_path("sdxl_like.safetensors"), &w);
    assert!(e.contains("SDXL") && e.contains("Stable Diffusion 1.5"), "{e}");

    let dir = TempDir::new("family");
    let cases: Vec<Case> = vec![
        // SDXL's 2048-wide context on cross-attention, by shape alone (LDM kohya name).
        ("sdxl-attn2", kohya_pair("lora_unet_input_blocks_2_1_transformer_blocks_0_attn2_to_k", &[1, 2048], &[16, 1]), None, "SDXL"),
        // lora_te1_ keys that do not fit SD-1.5's text encoder: SDXL's first encoder (768 wide).
        ("sdxl-te1", kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", &[1, 768], &[768, 1]), None, "SDXL"),
        ("sd2-te", kohya_pair("lora_te_text_model_encoder_layers_0_self_attn_q_proj", &[1, 1024], &[1024, 1]), None, "Stable Diffusion 2"),
        ("sd2-attn2", kohya_pair("lora_unet_down_blocks_0_attentions_1_transformer_blocks_0_attn2_to_v", &[1, 1024], &[16, 1]), None, "Stable Diffusion 2"),
        (
            "sdxl-meta",
            kohya_pair("lora_unet_down_blocks_0_attentions_1_proj_in", &[1, 16, 1, 1], &[16, 1, 1, 1]),
            Some(HashMap::from([("ss_base_model_version".to_string(), "sdxl_base_v1-0".to_string())])),
            "SDXL",
        ),
        ("sdxl-te2", kohya_pair("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", &[1, 1280], &[1280, 1]), None, "SDXL"),
    ];
    for (name, tensors, meta, want) in cases {
        let p = dir.join(&format!("{name}.safetensors"));
        write_tensors(&p, &tensors, meta);
        let e = open_err(&p, &w);
        assert!(e.contains(want) && e.contains("SD-1.5") && e.contains(&format!("{name}.safetensors")), "{name}: {e}");
    }

    // A plain shape mismatch names the key and both shapes.
    let p = dir.join("wrong.safetensors");
    write_tensors(&p, &kohya_pair("lora_unet_down_blocks_0_attentions_1_proj_in", &[4, 24, 1, 1], &[16, 4, 1, 1]), None);
    let e = open_err(&p, &w);
    assert!(
        e.contains("lora_unet_down_blocks_0_attentions_1_proj_in.lora_down.weight") && e.contains("[4, 24, 1, 1]") && e.contains("[16, 16, 1, 1]"),
        "{e}"
    );

    // lora_te1_ keys that fit (diffusers' convert_state_dict_to_kohya writes them for SD-1.5) load.
    let p = dir.join("te1.safetensors");
    write_tensors(&p, &kohya_pair("lora_te1_text_model_encoder_layers_0_self_attn_q_proj", &[2, 32], &[32, 2]), None);
    let l = LoraFile::open(&p, &w).unwrap();
    assert_eq!(l.adapters[0].target, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight");
    assert_eq!(l.adapters[0].scale, 0.5);
}

#[test]
fn broken_inputs_are_clear_errors() {
    let w = model();
    let dir = TempDir::new("broken");
    let e = open_err(&dir.join("missing.safetensors"), &w);
    assert!(e.contains("missing.safetensors") && e.contains("no such LoRA file"), "{e}");

    let bytes = std::fs::read(lora_path("tiny_kohya.safetensors")).unwrap();
    for (cut, want) in [(bytes.len() - 7, "truncated"), (200, "truncated"), (0, "empty")] {
        let p = dir.join(&format!("cut-{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = open_err(&p, &w);
        assert!(e.contains(&format!("cut-{cut}.safetensors")) && e.contains(want), "{cut}: {e}");
    }
    let p = dir.join("text.safetensors");
    std::fs::write(&p, b"not a lora at all, just some text").unwrap();
    let e = open_err(&p, &w);
    assert!(e.contains("not a safetensors file") && e.contains("LoRA"), "{e}");

    let p = dir.join("lora.pt");
    std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
    let e = open_err(&p, &w);
    assert!(e.contains("pickle"), "{e}");

    // PEFT folders: no weights, no config.
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = open_err(&empty, &w);
    assert!(e.contains("adapter_model.safetensors"), "{e}");
    let no_cfg = dir.join("nocfg");
    std::fs::create_dir_all(&no_cfg).unwrap();
    std::fs::copy(lora_path("tiny_peft/adapter_model.safetensors"), no_cfg.join("adapter_model.safetensors")).unwrap();
    let e = open_err(&no_cfg, &w);
    assert!(e.contains("adapter_config.json") && e.contains("lora_alpha"), "{e}");

    // An up matrix without its down matrix.
    let p = dir.join("half.safetensors");
    let t = kohya_pair("lora_unet_down_blocks_0_attentions_1_proj_in", &[4, 16, 1, 1], &[16, 4, 1, 1]);
    write_tensors(&p, &t[1..], None);
    let e = open_err(&p, &w);
    assert!(e.contains("incomplete") && e.contains("lora_up.weight"), "{e}");

    // NaN in a LoRA.
    let p = dir.join("nan.safetensors");
    let mut t = t.clone();
    t[0].3[..4].copy_from_slice(&f32::NAN.to_le_bytes());
    write_tensors(&p, &t, None);
    let e = open_err(&p, &w);
    assert!(e.contains("NaN") && e.contains("damaged"), "{e}");
}
