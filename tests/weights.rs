//! The weight loader: tiny safetensors files written here, in a temporary folder, then read
//! back. Values round-trip to GPU f16 from fp32, fp16 and bf16; a diffusers folder and an LDM
//! single file with the same tensors give the same values under the same names; missing
//! names are listed together; wrong shapes, truncated and garbage files, other dtypes,
//! pickles, SD-2.x and SDXL are clear errors, never panics. The key converter has a table
//! test covering each rule.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use atelier::gpu::{DType, Tensor};
use atelier::model::convert::{KeyMap, LdmLayout, UNetLayout, VaeLayout, diffusers_vae_legacy, ldm_to_diffusers};
use atelier::model::weights::{Format, LoadOptions, Weights};
use common::*;
use half::{bf16, f16};
use safetensors::Dtype;
use safetensors::tensor::TensorView;

// ---------------------------------------------------------------------------------------
// Helpers

/// A fresh empty folder under the system temp dir, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("atelier-weights-{what}-{}-{nanos}", std::process::id()));
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

/// A tensor to write: key, stored dtype, shape and values (rounded to the dtype on writing).
#[derive(Clone)]
struct T {
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    values: Vec<f32>,
}

fn t(key: &str, dtype: Dtype, shape: &[usize], values: Vec<f32>) -> T {
    T { key: key.into(), dtype, shape: shape.to_vec(), values }
}

/// Values as the file stores them, read back as f32.
fn stored(dtype: Dtype, v: &[f32]) -> Vec<f32> {
    match dtype {
        Dtype::F32 => v.to_vec(),
        Dtype::F16 => v.iter().map(|&x| f16::from_f32(x).to_f32()).collect(),
        Dtype::BF16 => v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect(),
        Dtype::I32 | Dtype::I64 | Dtype::F64 => v.to_vec(),
        d => panic!("no test encoding for {d:?}"),
    }
}

fn encode(dtype: Dtype, v: &[f32]) -> Vec<u8> {
    match dtype {
        Dtype::F32 => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        Dtype::F16 => v.iter().flat_map(|&x| f16::from_f32(x).to_le_bytes()).collect(),
        Dtype::BF16 => v.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect(),
        Dtype::F64 => v.iter().flat_map(|&x| (x as f64).to_le_bytes()).collect(),
        Dtype::I32 => v.iter().flat_map(|&x| (x as i32).to_le_bytes()).collect(),
        Dtype::I64 => v.iter().flat_map(|&x| (x as i64).to_le_bytes()).collect(),
        d => panic!("no test encoding for {d:?}"),
    }
}

fn write_st(path: &Path, tensors: &[T]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| encode(t.dtype, &t.values)).collect();
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .zip(&bytes)
        .map(|(t, b)| (t.key.clone(), TensorView::new(t.dtype, t.shape.clone(), b).unwrap()))
        .collect();
    safetensors::serialize_to_file(views, None, path).unwrap();
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

/// The error of an open that must fail; a panic fails the test with the input named.
fn open_err(path: &Path) -> String {
    let r = std::panic::catch_unwind(|| Weights::open(path).map(|_| ()));
    match r {
        Ok(Ok(())) => panic!("{} opened", path.display()),
        Ok(Err(e)) => e.to_string(),
        Err(_) => panic!("Weights::open panicked on {}", path.display()),
    }
}

fn download(t: &Tensor) -> Vec<f32> {
    t.to_f32(gpu()).unwrap()
}

fn bits_eq(a: &[f32], b: &[f32]) -> bool {
    a.len() == b.len() && a.iter().zip(b).all(|(x, y)| x.to_bits() == y.to_bits())
}

// ---------------------------------------------------------------------------------------
// The key converter

/// Every rule, for SD-1.5's structure: LDM key -> atelier name (None: ignored).
const TABLE: &[(&str, Option<&str>)] = &[
    // UNet: top level
    ("model.diffusion_model.time_embed.0.weight", Some("unet.time_embedding.linear_1.weight")),
    ("model.diffusion_model.time_embed.2.bias", Some("unet.time_embedding.linear_2.bias")),
    ("model.diffusion_model.input_blocks.0.0.weight", Some("unet.conv_in.weight")),
    ("model.diffusion_model.out.0.weight", Some("unet.conv_norm_out.weight")),
    ("model.diffusion_model.out.2.bias", Some("unet.conv_out.bias")),
    // UNet: resnets, each inner rename
    ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", Some("unet.down_blocks.0.resnets.0.norm1.weight")),
    ("model.diffusion_model.input_blocks.2.0.in_layers.2.bias", Some("unet.down_blocks.0.resnets.1.conv1.bias")),
    ("model.diffusion_model.input_blocks.4.0.emb_layers.1.weight", Some("unet.down_blocks.1.resnets.0.time_emb_proj.weight")),
    ("model.diffusion_model.input_blocks.5.0.out_layers.0.bias", Some("unet.down_blocks.1.resnets.1.norm2.bias")),
    ("model.diffusion_model.input_blocks.7.0.out_layers.3.weight", Some("unet.down_blocks.2.resnets.0.conv2.weight")),
    ("model.diffusion_model.input_blocks.4.0.skip_connection.weight", Some("unet.down_blocks.1.resnets.0.conv_shortcut.weight")),
    ("model.diffusion_model.input_blocks.10.0.in_layers.0.weight", Some("unet.down_blocks.3.resnets.0.norm1.weight")),
    ("model.diffusion_model.input_blocks.11.0.out_layers.3.bias", Some("unet.down_blocks.3.resnets.1.conv2.bias")),
    // UNet: attentions keep their inner names
    ("model.diffusion_model.input_blocks.1.1.norm.weight", Some("unet.down_blocks.0.attentions.0.norm.weight")),
    ("model.diffusion_model.input_blocks.2.1.proj_in.weight", Some("unet.down_blocks.0.attentions.1.proj_in.weight")),
    (
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        Some("unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight"),
    ),
    (
        "model.diffusion_model.input_blocks.7.1.transformer_blocks.0.attn1.to_out.0.bias",
        Some("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_out.0.bias"),
    ),
    // UNet: downsamplers
    ("model.diffusion_model.input_blocks.3.0.op.weight", Some("unet.down_blocks.0.downsamplers.0.conv.weight")),
    ("model.diffusion_model.input_blocks.6.0.op.bias", Some("unet.down_blocks.1.downsamplers.0.conv.bias")),
    ("model.diffusion_model.input_blocks.9.0.op.weight", Some("unet.down_blocks.2.downsamplers.0.conv.weight")),
    // UNet: middle
    ("model.diffusion_model.middle_block.0.in_layers.2.weight", Some("unet.mid_block.resnets.0.conv1.weight")),
    ("model.diffusion_model.middle_block.1.proj_out.bias", Some("unet.mid_block.attentions.0.proj_out.bias")),
    ("model.diffusion_model.middle_block.2.emb_layers.1.bias", Some("unet.mid_block.resnets.1.time_emb_proj.bias")),
    // UNet: up blocks, resnets, attentions and upsamplers (.1.conv without attention, .2.conv with)
    ("model.diffusion_model.output_blocks.0.0.skip_connection.weight", Some("unet.up_blocks.0.resnets.0.conv_shortcut.weight")),
    ("model.diffusion_model.output_blocks.2.0.in_layers.0.bias", Some("unet.up_blocks.0.resnets.2.norm1.bias")),
    ("model.diffusion_model.output_blocks.2.1.conv.weight", Some("unet.up_blocks.0.upsamplers.0.conv.weight")),
    ("model.diffusion_model.output_blocks.3.1.proj_out.weight", Some("unet.up_blocks.1.attentions.0.proj_out.weight")),
    ("model.diffusion_model.output_blocks.5.2.conv.bias", Some("unet.up_blocks.1.upsamplers.0.conv.bias")),
    ("model.diffusion_model.output_blocks.8.2.conv.weight", Some("unet.up_blocks.2.upsamplers.0.conv.weight")),
    (
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        Some("unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight"),
    ),
    ("model.diffusion_model.output_blocks.9.0.out_layers.3.weight", Some("unet.up_blocks.3.resnets.0.conv2.weight")),
    // UNet: what SD-1.5's structure does not have is not mapped
    ("model.diffusion_model.output_blocks.11.2.conv.weight", None),
    ("model.diffusion_model.output_blocks.1.1.proj_in.weight", None),
    ("model.diffusion_model.input_blocks.10.1.norm.weight", None),
    ("model.diffusion_model.input_blocks.12.0.op.weight", None),
    ("model.diffusion_model.input_blocks.1.0.in_layers.1.weight", None),
    // VAE
    ("first_stage_model.encoder.conv_in.weight", Some("vae.encoder.conv_in.weight")),
    ("first_stage_model.encoder.down.0.block.1.conv1.weight", Some("vae.encoder.down_blocks.0.resnets.1.conv1.weight")),
    ("first_stage_model.encoder.down.1.block.0.nin_shortcut.bias", Some("vae.encoder.down_blocks.1.resnets.0.conv_shortcut.bias")),
    ("first_stage_model.encoder.down.2.downsample.conv.weight", Some("vae.encoder.down_blocks.2.downsamplers.0.conv.weight")),
    ("first_stage_model.encoder.down.3.downsample.conv.weight", None),
    ("first_stage_model.encoder.mid.block_1.norm1.weight", Some("vae.encoder.mid_block.resnets.0.norm1.weight")),
    ("first_stage_model.encoder.mid.block_2.conv2.bias", Some("vae.encoder.mid_block.resnets.1.conv2.bias")),
    ("first_stage_model.encoder.mid.attn_1.norm.weight", Some("vae.encoder.mid_block.attentions.0.group_norm.weight")),
    ("first_stage_model.encoder.mid.attn_1.q.weight", Some("vae.encoder.mid_block.attentions.0.to_q.weight")),
    ("first_stage_model.encoder.mid.attn_1.k.bias", Some("vae.encoder.mid_block.attentions.0.to_k.bias")),
    ("first_stage_model.encoder.mid.attn_1.v.weight", Some("vae.encoder.mid_block.attentions.0.to_v.weight")),
    ("first_stage_model.encoder.mid.attn_1.proj_out.weight", Some("vae.encoder.mid_block.attentions.0.to_out.0.weight")),
    ("first_stage_model.encoder.norm_out.bias", Some("vae.encoder.conv_norm_out.bias")),
    ("first_stage_model.encoder.conv_out.weight", Some("vae.encoder.conv_out.weight")),
    ("first_stage_model.quant_conv.weight", Some("vae.quant_conv.weight")),
    ("first_stage_model.post_quant_conv.bias", Some("vae.post_quant_conv.bias")),
    ("first_stage_model.decoder.conv_in.bias", Some("vae.decoder.conv_in.bias")),
    ("first_stage_model.decoder.mid.attn_1.proj_out.bias", Some("vae.decoder.mid_block.attentions.0.to_out.0.bias")),
    ("first_stage_model.decoder.up.3.block.0.conv1.weight", Some("vae.decoder.up_blocks.0.resnets.0.conv1.weight")),
    ("first_stage_model.decoder.up.0.block.2.norm2.bias", Some("vae.decoder.up_blocks.3.resnets.2.norm2.bias")),
    ("first_stage_model.decoder.up.1.block.0.nin_shortcut.weight", Some("vae.decoder.up_blocks.2.resnets.0.conv_shortcut.weight")),
    ("first_stage_model.decoder.up.3.upsample.conv.weight", Some("vae.decoder.up_blocks.0.upsamplers.0.conv.weight")),
    ("first_stage_model.decoder.up.1.upsample.conv.bias", Some("vae.decoder.up_blocks.2.upsamplers.0.conv.bias")),
    ("first_stage_model.decoder.up.0.upsample.conv.weight", None),
    ("first_stage_model.decoder.norm_out.weight", Some("vae.decoder.conv_norm_out.weight")),
    ("first_stage_model.encoder.mid.attn_1.qkv.weight", None),
    // CLIP, with and without the text_model level
    (
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        Some("text_encoder.text_model.embeddings.token_embedding.weight"),
    ),
    (
        "cond_stage_model.transformer.text_model.encoder.layers.11.self_attn.q_proj.weight",
        Some("text_encoder.text_model.encoder.layers.11.self_attn.q_proj.weight"),
    ),
    ("cond_stage_model.transformer.final_layer_norm.bias", Some("text_encoder.text_model.final_layer_norm.bias")),
    (
        "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight",
        Some("text_encoder.text_model.encoder.layers.0.mlp.fc1.weight"),
    ),
    // Ignored
    ("model_ema.diffusion_modelinput_blocks00weight", None),
    ("model_ema.decay", None),
    ("alphas_cumprod", None),
    ("model.diffusion_model.", None),
    ("cond_stage_model.transformer.", None),
    ("", None),
];

#[test]
fn converter_table_covers_every_rule() {
    let map = KeyMap::new(&LdmLayout::sd15());
    let mut wrong = Vec::new();
    for &(ldm, want) in TABLE {
        let got = map.convert(ldm).map(|c| c.name);
        if got.as_deref() != want {
            wrong.push(format!("{ldm}: got {got:?}, want {want:?}"));
        }
    }
    assert!(wrong.is_empty(), "{} wrong conversions:\n{}", wrong.len(), wrong.join("\n"));
    // Only the VAE attention projection weights are 1x1 convs to squeeze.
    for &(ldm, want) in TABLE {
        if let Some(c) = map.convert(ldm) {
            let proj = want.unwrap().contains("mid_block.attentions.0.to_") && ldm.ends_with("weight") && ldm.starts_with("first");
            assert_eq!(c.squeeze, proj, "{ldm}");
        }
    }
    assert_eq!(
        ldm_to_diffusers(&LdmLayout::default(), TABLE[0].0).map(|c| c.name).as_deref(),
        TABLE[0].1,
        "the convenience form agrees"
    );
}

#[test]
fn converter_follows_the_layout_numbers() {
    // One layer per block, 2 blocks, attention only in down block 1 and up block 0; 3-block VAE.
    let layout = LdmLayout {
        unet: UNetLayout { layers_per_block: 1, down_attention: vec![false, true], up_attention: vec![true, false] },
        vae: VaeLayout { blocks: 3, layers_per_block: 1 },
    };
    let map = KeyMap::new(&layout);
    for (ldm, want) in [
        ("model.diffusion_model.input_blocks.1.0.in_layers.0.weight", Some("unet.down_blocks.0.resnets.0.norm1.weight")),
        ("model.diffusion_model.input_blocks.1.1.norm.weight", None),
        ("model.diffusion_model.input_blocks.2.0.op.weight", Some("unet.down_blocks.0.downsamplers.0.conv.weight")),
        ("model.diffusion_model.input_blocks.3.1.proj_in.weight", Some("unet.down_blocks.1.attentions.0.proj_in.weight")),
        ("model.diffusion_model.output_blocks.1.1.norm.bias", Some("unet.up_blocks.0.attentions.1.norm.bias")),
        ("model.diffusion_model.output_blocks.1.2.conv.weight", Some("unet.up_blocks.0.upsamplers.0.conv.weight")),
        ("model.diffusion_model.output_blocks.3.0.skip_connection.bias", Some("unet.up_blocks.1.resnets.1.conv_shortcut.bias")),
        ("model.diffusion_model.output_blocks.3.1.conv.weight", None),
        ("first_stage_model.decoder.up.2.block.1.conv1.weight", Some("vae.decoder.up_blocks.0.resnets.1.conv1.weight")),
        ("first_stage_model.decoder.up.0.block.0.conv1.weight", Some("vae.decoder.up_blocks.2.resnets.0.conv1.weight")),
        ("first_stage_model.decoder.up.2.upsample.conv.bias", Some("vae.decoder.up_blocks.0.upsamplers.0.conv.bias")),
        ("first_stage_model.encoder.down.1.downsample.conv.bias", Some("vae.encoder.down_blocks.1.downsamplers.0.conv.bias")),
        ("first_stage_model.encoder.down.2.downsample.conv.bias", None),
        ("first_stage_model.encoder.down.0.block.1.conv1.weight", None),
    ] {
        assert_eq!(map.convert(ldm).map(|c| c.name).as_deref(), want, "{ldm}");
    }
}

#[test]
fn legacy_diffusers_vae_attention_names() {
    for (old, new, squeeze) in [
        ("encoder.mid_block.attentions.0.query.weight", Some("encoder.mid_block.attentions.0.to_q.weight"), true),
        ("decoder.mid_block.attentions.0.key.bias", Some("decoder.mid_block.attentions.0.to_k.bias"), false),
        ("decoder.mid_block.attentions.0.value.weight", Some("decoder.mid_block.attentions.0.to_v.weight"), true),
        ("encoder.mid_block.attentions.0.proj_attn.bias", Some("encoder.mid_block.attentions.0.to_out.0.bias"), false),
        ("encoder.mid_block.attentions.0.to_q.weight", None, false),
        ("encoder.down_blocks.0.resnets.0.conv1.weight", None, false),
    ] {
        let c = diffusers_vae_legacy(old);
        assert_eq!(c.as_ref().map(|c| c.name.as_str()), new, "{old}");
        if let Some(c) = c {
            assert_eq!(c.squeeze, squeeze, "{old}");
        }
    }
}

// ---------------------------------------------------------------------------------------
// Loading

/// A single-file checkpoint holding one LDM key.
fn single(dir: &TempDir, file: &str, tensors: &[T]) -> PathBuf {
    let p = dir.join(file);
    write_st(&p, tensors);
    p
}

#[test]
fn values_round_trip_to_gpu_f16_from_each_dtype() {
    let g = gpu();
    let seed = seed("round trip");
    // An odd element count (the upload pads the last word) and values across f16's range,
    // subnormals included.
    let shape = [3, 5, 3, 3];
    let n = numel(&shape);
    let scales = [1.0f32, 1e-6, 300.0, 6e4];
    let values: Vec<f32> = random(n, seed).iter().enumerate().map(|(i, x)| x * scales[i % 4]).collect();
    for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16] {
        let dir = TempDir::new("dtype");
        let p = single(&dir, "m.safetensors", &[t("model.diffusion_model.input_blocks.0.0.weight", dtype, &shape, values.clone())]);
        let w = Weights::open(&p).unwrap();
        assert_eq!(w.format(), Format::SingleFile);
        let src = stored(dtype, &values);
        let tensor = w.get(g, "unet.conv_in.weight", &shape).unwrap();
        assert_eq!(tensor.dtype, DType::F16);
        assert_eq!(tensor.shape, shape);
        let got = download(&tensor);
        assert!(bits_eq(&got, &round_f16(&src)), "{dtype:?}: GPU values are not the f16-rounded file values");
        // The CPU read gives the file's values exactly; f32 upload too.
        assert!(bits_eq(&w.get_f32("unet.conv_in.weight", &shape).unwrap(), &src), "{dtype:?}: get_f32");
        let f32t = w.get_as(g, "unet.conv_in.weight", &shape, DType::F32).unwrap();
        assert!(bits_eq(&download(&f32t), &src), "{dtype:?}: f32 upload");
        let report = w.finish().unwrap();
        assert_eq!((report.loaded, report.unused.len(), report.ignored), (1, 0, 0), "{dtype:?}: {report}");
    }
}

/// (atelier name, LDM key, shape): a few keys for each converter rule.
const SPEC: &[(&str, &str, &[usize])] = &[
    ("unet.time_embedding.linear_1.weight", "model.diffusion_model.time_embed.0.weight", &[16, 4]),
    ("unet.time_embedding.linear_2.bias", "model.diffusion_model.time_embed.2.bias", &[16]),
    ("unet.conv_in.weight", "model.diffusion_model.input_blocks.0.0.weight", &[4, 4, 3, 3]),
    ("unet.down_blocks.0.resnets.0.norm1.weight", "model.diffusion_model.input_blocks.1.0.in_layers.0.weight", &[4]),
    ("unet.down_blocks.0.resnets.0.conv1.weight", "model.diffusion_model.input_blocks.1.0.in_layers.2.weight", &[4, 4, 3, 3]),
    ("unet.down_blocks.0.resnets.1.time_emb_proj.weight", "model.diffusion_model.input_blocks.2.0.emb_layers.1.weight", &[4, 16]),
    ("unet.down_blocks.1.resnets.0.norm2.bias", "model.diffusion_model.input_blocks.4.0.out_layers.0.bias", &[8]),
    ("unet.down_blocks.1.resnets.0.conv2.weight", "model.diffusion_model.input_blocks.4.0.out_layers.3.weight", &[8, 8, 3, 3]),
    ("unet.down_blocks.1.resnets.0.conv_shortcut.weight", "model.diffusion_model.input_blocks.4.0.skip_connection.weight", &[8, 4, 1, 1]),
    ("unet.down_blocks.0.attentions.1.proj_in.weight", "model.diffusion_model.input_blocks.2.1.proj_in.weight", &[4, 4, 1, 1]),
    (
        "unet.down_blocks.2.attentions.1.transformer_blocks.0.attn2.to_k.weight",
        "model.diffusion_model.input_blocks.8.1.transformer_blocks.0.attn2.to_k.weight",
        &[8, 12],
    ),
    ("unet.down_blocks.0.downsamplers.0.conv.weight", "model.diffusion_model.input_blocks.3.0.op.weight", &[4, 4, 3, 3]),
    ("unet.down_blocks.3.resnets.1.conv1.bias", "model.diffusion_model.input_blocks.11.0.in_layers.2.bias", &[8]),
    ("unet.mid_block.resnets.1.conv2.bias", "model.diffusion_model.middle_block.2.out_layers.3.bias", &[8]),
    ("unet.mid_block.attentions.0.norm.weight", "model.diffusion_model.middle_block.1.norm.weight", &[8]),
    ("unet.up_blocks.0.upsamplers.0.conv.weight", "model.diffusion_model.output_blocks.2.1.conv.weight", &[8, 8, 3, 3]),
    ("unet.up_blocks.1.upsamplers.0.conv.bias", "model.diffusion_model.output_blocks.5.2.conv.bias", &[8]),
    ("unet.up_blocks.1.attentions.0.proj_out.weight", "model.diffusion_model.output_blocks.3.1.proj_out.weight", &[8, 8, 1, 1]),
    (
        "unet.up_blocks.3.attentions.2.transformer_blocks.0.ff.net.0.proj.weight",
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight",
        &[16, 4],
    ),
    ("unet.conv_norm_out.weight", "model.diffusion_model.out.0.weight", &[4]),
    ("unet.conv_out.bias", "model.diffusion_model.out.2.bias", &[4]),
    ("vae.encoder.down_blocks.1.resnets.0.conv_shortcut.weight", "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight", &[8, 4, 1, 1]),
    ("vae.encoder.down_blocks.2.downsamplers.0.conv.weight", "first_stage_model.encoder.down.2.downsample.conv.weight", &[8, 8, 3, 3]),
    ("vae.encoder.mid_block.resnets.0.norm1.weight", "first_stage_model.encoder.mid.block_1.norm1.weight", &[8]),
    ("vae.encoder.mid_block.attentions.0.group_norm.bias", "first_stage_model.encoder.mid.attn_1.norm.bias", &[8]),
    ("vae.encoder.mid_block.attentions.0.to_q.weight", "first_stage_model.encoder.mid.attn_1.q.weight", &[8, 8]),
    ("vae.decoder.mid_block.attentions.0.to_out.0.weight", "first_stage_model.decoder.mid.attn_1.proj_out.weight", &[8, 8]),
    ("vae.decoder.mid_block.attentions.0.to_v.bias", "first_stage_model.decoder.mid.attn_1.v.bias", &[8]),
    ("vae.encoder.conv_norm_out.weight", "first_stage_model.encoder.norm_out.weight", &[8]),
    ("vae.decoder.up_blocks.0.resnets.0.conv1.weight", "first_stage_model.decoder.up.3.block.0.conv1.weight", &[8, 8, 3, 3]),
    ("vae.decoder.up_blocks.3.resnets.2.conv2.weight", "first_stage_model.decoder.up.0.block.2.conv2.weight", &[4, 4, 3, 3]),
    ("vae.decoder.up_blocks.1.upsamplers.0.conv.weight", "first_stage_model.decoder.up.2.upsample.conv.weight", &[8, 8, 3, 3]),
    ("vae.quant_conv.weight", "first_stage_model.quant_conv.weight", &[8, 8, 1, 1]),
    ("vae.post_quant_conv.bias", "first_stage_model.post_quant_conv.bias", &[4]),
    (
        "text_encoder.text_model.embeddings.token_embedding.weight",
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
        &[10, 6],
    ),
    (
        "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight",
        "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
        &[6, 6],
    ),
    ("text_encoder.text_model.final_layer_norm.bias", "cond_stage_model.transformer.text_model.final_layer_norm.bias", &[6]),
];

/// The LDM file stores the VAE attention projections as 1x1 convolutions.
fn ldm_shape(name: &str, shape: &[usize]) -> Vec<usize> {
    let mut s = shape.to_vec();
    if name.starts_with("vae.") && name.contains("mid_block.attentions.0.to_") && name.ends_with(".weight") {
        s.extend([1, 1]);
    }
    s
}

fn spec_values(seed: u64) -> Vec<Vec<f32>> {
    SPEC.iter().enumerate().map(|(i, (_, _, s))| random(numel(s), seed.wrapping_add(i as u64 * 7919))).collect()
}

const POSITION_IDS: &str = "text_model.embeddings.position_ids";

/// Writes the SPEC tensors as a diffusers folder (plain files in `dtype`).
fn write_folder(root: &Path, values: &[Vec<f32>], dtype: Dtype) {
    std::fs::create_dir_all(root).unwrap();
    std::fs::write(root.join("model_index.json"), r#"{"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"]}"#).unwrap();
    let mut parts: HashMap<&str, Vec<T>> = HashMap::new();
    for ((name, _, shape), v) in SPEC.iter().zip(values) {
        let (comp, key) = name.split_once('.').unwrap();
        parts.entry(comp).or_default().push(t(key, dtype, shape, v.clone()));
    }
    parts.get_mut("text_encoder").unwrap().push(t(POSITION_IDS, Dtype::I64, &[1, 5], vec![0.0, 1.0, 2.0, 3.0, 4.0]));
    for (comp, ts) in parts {
        let file = if comp == "text_encoder" { "model.safetensors" } else { "diffusion_pytorch_model.safetensors" };
        write_st(&root.join(comp).join(file), &ts);
    }
}

/// Writes the SPEC tensors as an LDM single file, with EMA and schedule keys to ignore.
fn write_ldm(path: &Path, values: &[Vec<f32>], dtype: Dtype) {
    let mut ts: Vec<T> =
        SPEC.iter().zip(values).map(|((name, key, shape), v)| t(key, dtype, &ldm_shape(name, shape), v.clone())).collect();
    ts.push(t("model_ema.diffusion_modelinput_blocks00weight", Dtype::F32, &[4, 4, 3, 3], vec![9.0; 144]));
    ts.push(t("model_ema.decay", Dtype::F32, &[], vec![0.9999]));
    ts.push(t("alphas_cumprod", Dtype::F32, &[5], vec![1.0; 5]));
    ts.push(t(&format!("cond_stage_model.transformer.{POSITION_IDS}"), Dtype::I64, &[1, 5], vec![0.0, 1.0, 2.0, 3.0, 4.0]));
    write_st(path, &ts);
}

#[test]
fn diffusers_folder_and_single_file_load_the_same() {
    let g = gpu();
    let values = spec_values(seed("layouts"));
    let dir = TempDir::new("layouts");
    let folder = dir.join("sd15");
    write_folder(&folder, &values, Dtype::F32);
    let file = dir.join("sd15.safetensors");
    write_ldm(&file, &values, Dtype::F16);

    let a = Weights::open(&folder).unwrap();
    let b = Weights::open(&file).unwrap();
    assert_eq!(Weights::open(folder.join("model_index.json")).unwrap().path(), folder, "model_index.json opens its folder");
    assert_eq!((a.format(), b.format()), (Format::Diffusers, Format::SingleFile));
    assert_eq!(a.len(), SPEC.len() + 1);
    assert_eq!(a.names().collect::<Vec<_>>(), b.names().collect::<Vec<_>>(), "the two layouts name the same tensors");
    for comp in ["unet", "vae", "text_encoder"] {
        assert!(a.has_component(comp) && b.has_component(comp), "{comp}");
    }
    assert_eq!(b.shape("vae.encoder.mid_block.attentions.0.to_q.weight"), Some(&[8usize, 8][..]), "1x1 conv squeezed");
    assert_eq!(b.source("unet.conv_in.weight").unwrap().1, "model.diffusion_model.input_blocks.0.0.weight");

    for ((name, _, shape), v) in SPEC.iter().zip(&values) {
        let want = round_f16(v);
        let ta = download(&a.get(g, name, shape).unwrap());
        let tb = download(&b.get(g, name, shape).unwrap());
        assert!(bits_eq(&ta, &want), "{name}: diffusers folder value differs from the f16-rounded source");
        assert!(bits_eq(&tb, &want), "{name}: single-file value differs from the f16-rounded source");
        assert!(bits_eq(&a.get_f32(name, shape).unwrap(), v), "{name}: get_f32 from the fp32 folder is not exact");
    }
    // The prefix builder names the same tensors.
    let w = a.prefix(g, "unet.down_blocks.0");
    assert_eq!(w.at("resnets").at(0).name("conv1.weight"), "unet.down_blocks.0.resnets.0.conv1.weight");
    let via_prefix = download(&w.at("resnets.0").get("conv1.weight", &[4, 4, 3, 3]).unwrap());
    let (i, _) = SPEC.iter().enumerate().find(|(_, s)| s.0 == "unet.down_blocks.0.resnets.0.conv1.weight").unwrap();
    assert!(bits_eq(&via_prefix, &round_f16(&values[i])));
    assert!(w.contains("downsamplers.0.conv.weight") && !w.contains("downsamplers.0.conv.nope"));

    for (what, weights, ignored) in [("folder", &a, 0), ("single file", &b, 3)] {
        let report = weights.finish().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(report.loaded, SPEC.len(), "{what}: {report}");
        assert_eq!(report.unused, vec![format!("text_encoder.{POSITION_IDS}")], "{what}: {report}");
        assert_eq!(report.ignored, ignored, "{what}: EMA and schedule keys: {report}");
        assert!(report.bytes > 0);
    }
}

#[test]
fn fp16_variant_is_used_only_when_asked_for() {
    let g = gpu();
    let values = spec_values(seed("variant"));
    let dir = TempDir::new("variant");
    let root = dir.join("sd");
    write_folder(&root, &values, Dtype::F32);
    // The fp16 variant of the UNet holds negated values, so the two are told apart.
    let unet: Vec<T> = SPEC
        .iter()
        .zip(&values)
        .filter(|(s, _)| s.0.starts_with("unet."))
        .map(|((name, _, shape), v)| t(&name["unet.".len()..], Dtype::F16, shape, v.iter().map(|x| -x).collect()))
        .collect();
    write_st(&root.join("unet/diffusion_pytorch_model.fp16.safetensors"), &unet);
    let name = "unet.conv_in.weight";
    let v = &values[SPEC.iter().position(|s| s.0 == name).unwrap()];
    let plain = Weights::open(&root).unwrap();
    assert!(bits_eq(&download(&plain.get(g, name, &[4, 4, 3, 3]).unwrap()), &round_f16(v)), "plain file preferred");
    let opts = LoadOptions { prefer_fp16: true, ..Default::default() };
    let fp16 = Weights::open_with(&root, &opts).unwrap();
    let neg: Vec<f32> = v.iter().map(|x| -x).collect();
    assert!(bits_eq(&download(&fp16.get(g, name, &[4, 4, 3, 3]).unwrap()), &round_f16(&neg)), "fp16 variant when asked");
    assert!(fp16.files().iter().any(|f| f.ends_with("unet/diffusion_pytorch_model.fp16.safetensors")));
    // Components without a variant still load from the plain file.
    assert!(fp16.contains("vae.quant_conv.weight"));
    // Only the fp16 variant: used without asking.
    std::fs::remove_file(root.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let only = Weights::open(&root).unwrap();
    assert!(bits_eq(&download(&only.get(g, name, &[4, 4, 3, 3]).unwrap()), &round_f16(&neg)));
}

#[test]
fn sharded_and_legacy_folders_load() {
    let g = gpu();
    let dir = TempDir::new("sharded");
    let root = dir.join("sd");
    let a = random(16, 1);
    let b = random(4, 2);
    write_st(&root.join("unet/diffusion_pytorch_model-00001-of-00002.safetensors"), &[t("conv_in.bias", Dtype::F32, &[16], a.clone())]);
    write_st(&root.join("unet/diffusion_pytorch_model-00002-of-00002.safetensors"), &[t("conv_out.bias", Dtype::BF16, &[4], b.clone())]);
    std::fs::write(
        root.join("unet/diffusion_pytorch_model.safetensors.index.json"),
        r#"{"metadata": {"total_size": 72}, "weight_map": {
            "conv_in.bias": "diffusion_pytorch_model-00001-of-00002.safetensors",
            "conv_out.bias": "diffusion_pytorch_model-00002-of-00002.safetensors"}}"#,
    )
    .unwrap();
    // An old diffusers VAE (query/key/value/proj_attn) and a CLIP state dict without `text_model.`.
    let q = random(64, 3);
    write_st(
        &root.join("vae/diffusion_pytorch_model.safetensors"),
        &[t("encoder.mid_block.attentions.0.query.weight", Dtype::F32, &[8, 8], q.clone())],
    );
    write_st(&root.join("text_encoder/model.safetensors"), &[t("final_layer_norm.bias", Dtype::F32, &[4], b.clone())]);
    let w = Weights::open(&root).unwrap();
    assert_eq!(w.files().len(), 4);
    assert!(bits_eq(&download(&w.get(g, "unet.conv_in.bias", &[16]).unwrap()), &round_f16(&a)));
    assert!(bits_eq(&download(&w.get(g, "unet.conv_out.bias", &[4]).unwrap()), &round_f16(&stored(Dtype::BF16, &b))));
    assert!(bits_eq(&download(&w.get(g, "vae.encoder.mid_block.attentions.0.to_q.weight", &[8, 8]).unwrap()), &round_f16(&q)));
    assert!(bits_eq(&download(&w.get(g, "text_encoder.text_model.final_layer_norm.bias", &[4]).unwrap()), &round_f16(&b)));
    w.finish().unwrap();

    // A shard outside the folder, or an index that isn't JSON, is refused.
    std::fs::write(root.join("unet/diffusion_pytorch_model.safetensors.index.json"), r#"{"weight_map": {"x": "../evil.safetensors"}}"#).unwrap();
    let e = open_err(&root);
    assert!(e.contains("index.json") && e.contains("plain file name"), "{e}");
    std::fs::write(root.join("unet/diffusion_pytorch_model.safetensors.index.json"), "{oops").unwrap();
    let e = open_err(&root);
    assert!(e.contains("index.json") && e.contains("invalid JSON"), "{e}");
}

#[test]
fn missing_tensors_are_all_listed_by_name() {
    let g = gpu();
    let dir = TempDir::new("missing");
    let p = single(&dir, "unet-only.safetensors", &[t("model.diffusion_model.input_blocks.0.0.weight", Dtype::F32, &[4, 4, 3, 3], random(144, 5))]);
    let w = Weights::open(&p).unwrap();
    w.get(g, "unet.conv_in.weight", &[4, 4, 3, 3]).unwrap();
    let missing = ["unet.conv_in.bias", "vae.decoder.conv_in.weight", "text_encoder.text_model.final_layer_norm.weight"];
    let shapes: [&[usize]; 3] = [&[4], &[8, 4, 3, 3], &[6]];
    for (name, shape) in missing.iter().zip(shapes) {
        // A missing tensor does not stop the load: a NaN placeholder of the right shape comes back.
        let t = w.get(g, name, shape).unwrap();
        assert_eq!(t.shape, shape);
        assert!(download(&t).iter().all(|x| x.is_nan()), "{name}: placeholder not NaN");
    }
    assert!(w.get_f32("unet.conv_in.bias", &[4]).unwrap().iter().all(|x| x.is_nan()));
    let mut listed = w.missing();
    listed.sort();
    let mut want: Vec<String> = missing.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(listed, want, "each missing name once");
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("unet-only.safetensors"), "does not name the file: {e}");
    assert!(e.contains("3 weight tensors"), "does not count: {e}");
    for m in missing {
        assert!(e.contains(m), "does not list {m}: {e}");
    }
    assert!(e.contains("no VAE weights") && e.contains("no CLIP text encoder weights"), "no component hint: {e}");
    assert!(!e.contains("no UNet weights"), "{e}");
    assert!(e.contains("complete SD-1.5 checkpoint"), "no fix: {e}");

    // A diffusers folder without a component says which file is missing.
    let root = dir.join("folder");
    write_st(&root.join("unet/diffusion_pytorch_model.safetensors"), &[t("conv_in.bias", Dtype::F32, &[4], random(4, 6))]);
    let w = Weights::open(&root).unwrap();
    w.get(g, "vae.post_quant_conv.bias", &[4]).unwrap();
    let e = w.finish().unwrap_err().to_string();
    assert!(e.contains("vae.post_quant_conv.bias") && e.contains("vae/diffusion_pytorch_model.safetensors"), "{e}");
}

#[test]
fn wrong_shape_names_file_key_and_shapes() {
    let g = gpu();
    let values = spec_values(seed("shape"));
    let dir = TempDir::new("shape");
    let file = dir.join("ckpt.safetensors");
    write_ldm(&file, &values, Dtype::F32);
    let w = Weights::open(&file).unwrap();
    let e = w.get(g, "unet.conv_in.weight", &[4, 4, 1, 1]).unwrap_err().to_string();
    for part in ["ckpt.safetensors", "model.diffusion_model.input_blocks.0.0.weight", "unet.conv_in.weight", "[4, 4, 3, 3]", "[4, 4, 1, 1]", "SD-1.5"] {
        assert!(e.contains(part), "missing {part:?}: {e}");
    }
    let e = w.get_f32("vae.encoder.mid_block.attentions.0.to_q.weight", &[8, 4]).unwrap_err().to_string();
    assert!(e.contains("[8, 8]") && e.contains("stored as [8, 8, 1, 1]") && e.contains("[8, 4]"), "{e}");
    // A wrong shape is not a missing tensor.
    assert!(w.missing().is_empty());
}

#[test]
fn other_dtypes_and_out_of_range_values_are_errors() {
    let g = gpu();
    let dir = TempDir::new("dtypes");
    for dtype in [Dtype::I32, Dtype::F64] {
        let p = single(&dir, "q.safetensors", &[t("model.diffusion_model.out.2.bias", dtype, &[4], vec![1.0, 2.0, 3.0, 4.0])]);
        let w = Weights::open(&p).unwrap();
        let e = w.get(g, "unet.conv_out.bias", &[4]).unwrap_err().to_string();
        assert!(e.contains("q.safetensors") && e.contains(&format!("{dtype:?}")) && e.contains("F32, F16 and BF16"), "{e}");
        assert!(e.contains("model.diffusion_model.out.2.bias"), "{e}");
        assert!(w.get_f32("unet.conv_out.bias", &[4]).is_err());
    }
    // 1e5 does not fit f16: an error, not an infinity on the GPU. The f32 paths still read it.
    for dtype in [Dtype::F32, Dtype::BF16] {
        let p = single(&dir, "big.safetensors", &[t("model.diffusion_model.out.2.bias", dtype, &[4], vec![1.0, 1e5, 3.0, 4.0])]);
        let w = Weights::open(&p).unwrap();
        let e = w.get(g, "unet.conv_out.bias", &[4]).unwrap_err().to_string();
        assert!(e.contains("big.safetensors") && e.contains("f16 range") && e.contains("index 1"), "{dtype:?}: {e}");
        assert_eq!(w.get_f32("unet.conv_out.bias", &[4]).unwrap()[1], stored(dtype, &[1e5])[0]);
        w.get_as(g, "unet.conv_out.bias", &[4], DType::F32).unwrap();
    }
}

#[test]
fn truncated_files_are_errors() {
    let dir = TempDir::new("truncated");
    let full = dir.join("full.safetensors");
    write_ldm(&full, &spec_values(1), Dtype::F32);
    let bytes = std::fs::read(&full).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    for (cut, want) in [
        (bytes.len() - 10, "truncated"),
        (bytes.len() / 2, "truncated"),
        (8 + n / 2, "truncated"),
        (8 + 1, "truncated"),
        (5, "only 5 bytes"),
        (0, "empty"),
    ] {
        let p = dir.join(&format!("cut-{cut}.safetensors"));
        std::fs::write(&p, &bytes[..cut]).unwrap();
        let e = open_err(&p);
        assert!(e.contains(&format!("cut-{cut}.safetensors")), "does not name the file: {e}");
        assert!(e.contains(want), "cut at {cut}: {e}");
        assert!(e.contains("again") || e.contains("download"), "cut at {cut}: no fix: {e}");
    }
}

fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend(header.as_bytes());
    v.extend(data);
    v
}

#[test]
fn garbage_files_are_errors_not_panics() {
    let dir = TempDir::new("garbage");
    let noise: Vec<u8> = random(4096, 42).iter().map(|x| ((x + 1.0) * 127.0) as u8).collect();
    let mut huge = u64::MAX.to_le_bytes().to_vec();
    huge.extend(b"{}");
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("noise", noise, "not a safetensors file"),
        ("text", b"this is a text file, not weights\n".to_vec(), "not a safetensors file"),
        ("huge-header", huge, "header length"),
        ("bad-json", with_header("{not json at all}", b""), "JSON header is invalid"),
        ("wrong-structure", with_header(r#"{"a": 1}"#, b""), "JSON header is invalid"),
        ("bad-offsets", with_header(r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}"#, &[0; 4]), "JSON header is invalid"),
        ("unknown-dtype", with_header(r#"{"a":{"dtype":"F7","shape":[1],"data_offsets":[0,4]}}"#, &[0; 4]), "JSON header is invalid"),
        (
            "overflow",
            with_header(r#"{"a":{"dtype":"F32","shape":[4611686018427387904,4611686018427387904],"data_offsets":[0,4]}}"#, &[0; 4]),
            "JSON header is invalid",
        ),
        ("trailing", with_header(r#"{"model.diffusion_model.out.2.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#, &[0; 12]), "8 bytes follow"),
        ("no-tensors", with_header("{}", b""), "no SD-1.5 weights"),
    ];
    for (name, bytes, want) in cases {
        let p = dir.join(&format!("{name}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        let e = open_err(&p);
        assert!(e.contains(&format!("{name}.safetensors")), "{name}: does not name the file: {e}");
        assert!(e.contains(want), "{name}: {e}");
    }
}

#[test]
fn pickles_are_refused_with_the_conversion() {
    let dir = TempDir::new("pickle");
    for name in ["v1-5-pruned.ckpt", "model.pt", "model.pth", "pytorch_model.bin"] {
        let p = dir.join(name);
        std::fs::write(&p, b"\x80\x02}q\x00.").unwrap();
        let e = open_err(&p);
        assert!(e.contains(name) && e.contains("pickle") && e.contains("run arbitrary code"), "{name}: {e}");
        assert!(e.contains("safetensors.torch") && e.contains("save_file") && e.contains("weights_only=True"), "{name}: {e}");
    }
    // The one-liner writes a name atelier then reads.
    assert!(open_err(&dir.join("v1-5-pruned.ckpt")).contains("'v1-5-pruned.safetensors'"));
    // A zip-format torch.save file renamed to .safetensors is still recognised.
    let p = dir.join("renamed.safetensors");
    std::fs::write(&p, b"PK\x03\x04archive/data.pkl....").unwrap();
    let e = open_err(&p);
    assert!(e.contains("pickle") && e.contains("save_file"), "{e}");
    // A diffusers folder whose UNet is only a .bin.
    let root = dir.join("folder");
    std::fs::create_dir_all(root.join("unet")).unwrap();
    std::fs::write(root.join("model_index.json"), "{}").unwrap();
    std::fs::write(root.join("unet/diffusion_pytorch_model.bin"), b"\x80\x02.").unwrap();
    let e = open_err(&root);
    assert!(e.contains("diffusion_pytorch_model.bin") && e.contains("pickle") && e.contains("'diffusion_pytorch_model.safetensors'"), "{e}");
}

#[test]
fn header_lengths_that_look_like_pickle_protocol_bytes_are_safetensors() {
    // A header of 640 + 256k bytes makes the file start 0x80, 0x02..0x05: a pickle's PROTO opcode.
    let dir = TempDir::new("proto-bytes");
    for len in [640usize, 1152, 1408] {
        let json = r#"{"model.diffusion_model.out.2.bias":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#;
        let header = format!("{json}{}", " ".repeat(len - json.len()));
        let bytes = with_header(&header, &1.5f32.to_le_bytes());
        assert_eq!(bytes[0], 0x80);
        let p = dir.join(&format!("h{len}.safetensors"));
        std::fs::write(&p, bytes).unwrap();
        let w = Weights::open(&p).unwrap_or_else(|e| panic!("header {len}: {e}"));
        assert!(w.contains("unet.conv_out.bias"), "header {len}");
    }
}

fn assert_refused(e: &str, family: &str) {
    assert!(e.contains(family), "does not say it is {family}: {e}");
    assert!(e.contains("Stable Diffusion 1.5") && e.contains("only"), "does not say what is supported: {e}");
}

#[test]
fn sd2_is_refused() {
    let dir = TempDir::new("sd2");
    let unet = t("model.diffusion_model.input_blocks.0.0.weight", Dtype::F16, &[4, 4, 3, 3], vec![0.0; 144]);
    let p = single(&dir, "v2-1_768-ema-pruned.safetensors", &[unet.clone(), t("cond_stage_model.model.token_embedding.weight", Dtype::F16, &[10, 4], vec![0.0; 40])]);
    let e = open_err(&p);
    assert_refused(&e, "Stable Diffusion 2.x");
    assert!(e.contains("v2-1_768-ema-pruned.safetensors"), "{e}");
    // Without the text encoder: the 1024-wide cross-attention gives it away.
    let to_k = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight";
    let p = single(&dir, "unet-only.safetensors", &[unet, t(to_k, Dtype::F16, &[4, 1024], vec![0.0; 4096])]);
    assert_refused(&open_err(&p), "Stable Diffusion 2.x");
    // The same in a diffusers folder, by the UNet or by the text encoder.
    let root = dir.join("folder");
    write_st(
        &root.join("unet/diffusion_pytorch_model.safetensors"),
        &[t("down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight", Dtype::F16, &[4, 1024], vec![0.0; 4096])],
    );
    assert_refused(&open_err(&root), "Stable Diffusion 2.x");
    std::fs::remove_dir_all(root.join("unet")).unwrap();
    write_st(&root.join("text_encoder/model.safetensors"), &[t("text_model.embeddings.token_embedding.weight", Dtype::F16, &[10, 1024], vec![0.0; 10240])]);
    assert_refused(&open_err(&root), "not an SD-1.x text encoder");
}

#[test]
fn sdxl_is_refused() {
    let dir = TempDir::new("sdxl");
    let p = single(
        &dir,
        "sd_xl_base_1.0.safetensors",
        &[t("conditioner.embedders.0.transformer.text_model.final_layer_norm.bias", Dtype::F16, &[4], vec![0.0; 4])],
    );
    assert_refused(&open_err(&p), "SDXL");
    let p = single(&dir, "label.safetensors", &[t("model.diffusion_model.label_emb.0.0.weight", Dtype::F16, &[4, 4], vec![0.0; 16])]);
    assert_refused(&open_err(&p), "SDXL");
    let to_k = "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight";
    let p = single(&dir, "xl-unet.safetensors", &[t(to_k, Dtype::F16, &[4, 2048], vec![0.0; 8192])]);
    assert_refused(&open_err(&p), "SDXL");
    // Folders: text_encoder_2/, the pipeline class, or the UNet's add_embedding.
    let unet = |root: &Path, key: &str| write_st(&root.join("unet/diffusion_pytorch_model.safetensors"), &[t(key, Dtype::F16, &[4], vec![0.0; 4])]);
    let a = dir.join("a");
    unet(&a, "conv_in.bias");
    std::fs::create_dir_all(a.join("text_encoder_2")).unwrap();
    assert_refused(&open_err(&a), "SDXL");
    let b = dir.join("b");
    unet(&b, "conv_in.bias");
    std::fs::write(b.join("model_index.json"), r#"{"_class_name": "StableDiffusionXLPipeline"}"#).unwrap();
    assert_refused(&open_err(&b), "SDXL");
    let c = dir.join("c");
    unet(&c, "add_embedding.linear_1.bias");
    assert_refused(&open_err(&c), "SDXL");
}

#[test]
fn other_inputs_get_a_helpful_error() {
    let dir = TempDir::new("other");
    let e = open_err(&dir.join("does-not-exist.safetensors"));
    assert!(e.contains("does-not-exist.safetensors") && e.contains("no such file"), "{e}");
    // A LoRA, a diffusers component file, a file of unrelated tensors.
    let p = single(&dir, "style.safetensors", &[t("lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight", Dtype::F16, &[4, 4], vec![0.0; 16])]);
    assert!(open_err(&p).contains("LoRA"));
    let p = single(&dir, "diffusion_pytorch_model.safetensors", &[t("conv_in.weight", Dtype::F16, &[4], vec![0.0; 4])]);
    let e = open_err(&p);
    assert!(e.contains("component of a diffusers folder") && e.contains("model_index.json"), "{e}");
    let p = single(&dir, "resnet.safetensors", &[t("fc.weight", Dtype::F32, &[2], vec![0.0; 2])]);
    let e = open_err(&p);
    assert!(e.contains("no SD-1.5 weights") && e.contains("fc.weight") && e.contains("model.diffusion_model."), "{e}");
    // Folders: a component folder, an empty one, bad model_index.json.
    let comp = dir.join("unet");
    write_st(&comp.join("diffusion_pytorch_model.safetensors"), &[t("conv_in.bias", Dtype::F32, &[4], vec![0.0; 4])]);
    let e = open_err(&comp);
    assert!(e.contains("component folder") && e.contains("parent"), "{e}");
    let empty = dir.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let e = open_err(&empty);
    assert!(e.contains("no model_index.json") && e.contains("text_encoder/model.safetensors"), "{e}");
    let bad = dir.join("bad");
    std::fs::create_dir_all(&bad).unwrap();
    std::fs::write(bad.join("model_index.json"), "{\"_class_name\": ").unwrap();
    let e = open_err(&bad);
    assert!(e.contains("model_index.json") && e.contains("not valid JSON"), "{e}");
    // Two keys that give one name.
    let p = single(
        &dir,
        "mixed.safetensors",
        &[
            t("cond_stage_model.transformer.text_model.final_layer_norm.bias", Dtype::F32, &[4], vec![0.0; 4]),
            t("cond_stage_model.transformer.final_layer_norm.bias", Dtype::F32, &[4], vec![0.0; 4]),
        ],
    );
    let e = open_err(&p);
    assert!(e.contains("two tensors") && e.contains("text_encoder.text_model.final_layer_norm.bias"), "{e}");
}
