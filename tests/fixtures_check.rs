//! The committed model fixtures (made by `python3 tests/fixtures/make_fixtures.py`) exist, parse,
//! and hold the tensor names, dtypes and shapes that `Sd15Config::tiny()` implies, in both weight
//! layouts. It checks files only; the model tests compare against their values.

use std::path::PathBuf;

use atelier::config::{SchedulerConfig, Sd15Config};
use safetensors::{Dtype, SafeTensors};

fn path(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

fn read(rel: &str) -> Vec<u8> {
    std::fs::read(path(rel)).unwrap_or_else(|e| {
        panic!("{rel}: {e} (made by `python3 tests/fixtures/make_fixtures.py`)")
    })
}

fn parse<'a>(rel: &str, bytes: &'a [u8]) -> SafeTensors<'a> {
    SafeTensors::deserialize(bytes).unwrap_or_else(|e| panic!("{rel}: not safetensors: {e:?}"))
}

/// Each (name, shape) is in `st` with `dtype`.
fn expect(st: &SafeTensors, rel: &str, dtype: Dtype, want: &[(String, Vec<usize>)]) {
    for (name, shape) in want {
        let t = st.tensor(name).unwrap_or_else(|_| panic!("{rel}: no tensor {name}"));
        assert_eq!((t.dtype(), t.shape()), (dtype, &shape[..]), "{rel}: {name}");
    }
}

fn count(st: &SafeTensors, prefix: &str) -> usize {
    st.names().iter().filter(|n| n.starts_with(prefix)).count()
}

fn all_dtype(st: &SafeTensors, rel: &str, prefix: &str, dtype: Dtype) {
    for (name, t) in st.iter().filter(|(n, _)| n.starts_with(prefix)) {
        assert_eq!(t.dtype(), dtype, "{rel}: {name}");
    }
}

macro_rules! list {
    ($($name:expr => [$($d:expr),*]),* $(,)?) => { [$(($name.to_string(), vec![$($d),*])),*] };
}

#[test]
fn configs_match_tiny() {
    let dir = path("tiny-sd");
    assert_eq!(Sd15Config::from_diffusers_dir(&dir).unwrap(), Sd15Config::tiny());
    assert_eq!(SchedulerConfig::from_model_dir(&dir).unwrap(), SchedulerConfig::v1_5());
    let index: serde_json::Value =
        serde_json::from_slice(&read("tiny-sd/model_index.json")).unwrap();
    for part in ["unet", "vae", "text_encoder", "scheduler", "tokenizer"] {
        assert!(index.get(part).is_some(), "model_index.json lists no {part}");
    }
}

#[test]
fn weights_in_both_layouts() {
    let c = Sd15Config::tiny();
    let (u, v, clip) = (&c.unet, &c.vae, &c.clip);
    let b = &u.block_out_channels;
    let (t, x, lat) = (u.time_embed_dim(), u.cross_attention_dim, v.latent_channels);
    let vb = &v.block_out_channels;
    let (h, vocab, layers) = (clip.hidden_size, clip.vocab_size, clip.num_hidden_layers);
    let attn = "down_blocks.0.attentions.0.transformer_blocks.0";

    // (diffusers name, LDM name, shape): the LDM shape is the same except the VAE attention
    // projections, which are 1x1 convolutions there.
    let unet = list![
        "conv_in.weight" => [b[0], u.in_channels, 3, 3],
        "time_embedding.linear_1.weight" => [t, b[0]],
        "time_embedding.linear_2.weight" => [t, t],
        "down_blocks.0.resnets.0.time_emb_proj.weight" => [b[0], t],
        "down_blocks.1.resnets.0.conv_shortcut.weight" => [b[1], b[0], 1, 1],
        "down_blocks.0.attentions.0.proj_in.weight" => [b[0], b[0], 1, 1],
        format!("{attn}.attn1.to_q.weight") => [b[0], b[0]],
        format!("{attn}.attn2.to_k.weight") => [b[0], x],
        format!("{attn}.ff.net.0.proj.weight") => [8 * b[0], b[0]],
        format!("{attn}.ff.net.2.weight") => [b[0], 4 * b[0]],
        "down_blocks.2.downsamplers.0.conv.weight" => [b[2], b[2], 3, 3],
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v.weight" => [b[3], x],
        "up_blocks.0.resnets.0.conv1.weight" => [b[3], 2 * b[3], 3, 3],
        "up_blocks.0.upsamplers.0.conv.weight" => [b[3], b[3], 3, 3],
        "up_blocks.1.upsamplers.0.conv.weight" => [b[2], b[2], 3, 3],
        "up_blocks.3.resnets.0.conv1.weight" => [b[0], b[1] + b[0], 3, 3],
        "conv_out.weight" => [u.out_channels, b[0], 3, 3],
    ];
    let unet_ldm = list![
        "input_blocks.0.0.weight" => [b[0], u.in_channels, 3, 3],
        "time_embed.0.weight" => [t, b[0]],
        "time_embed.2.weight" => [t, t],
        "input_blocks.1.0.emb_layers.1.weight" => [b[0], t],
        "input_blocks.4.0.skip_connection.weight" => [b[1], b[0], 1, 1],
        "input_blocks.1.1.proj_in.weight" => [b[0], b[0], 1, 1],
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" => [b[0], b[0]],
        "input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight" => [b[0], x],
        "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight" => [8 * b[0], b[0]],
        "input_blocks.1.1.transformer_blocks.0.ff.net.2.weight" => [b[0], 4 * b[0]],
        "input_blocks.9.0.op.weight" => [b[2], b[2], 3, 3],
        "middle_block.1.transformer_blocks.0.attn2.to_v.weight" => [b[3], x],
        "output_blocks.0.0.in_layers.2.weight" => [b[3], 2 * b[3], 3, 3],
        "output_blocks.2.1.conv.weight" => [b[3], b[3], 3, 3],
        "output_blocks.5.2.conv.weight" => [b[2], b[2], 3, 3],
        "output_blocks.9.0.in_layers.2.weight" => [b[0], b[1] + b[0], 3, 3],
        "out.2.weight" => [u.out_channels, b[0], 3, 3],
    ];
    let vae = list![
        "encoder.conv_in.weight" => [vb[0], v.in_channels, 3, 3],
        "encoder.down_blocks.1.resnets.0.conv_shortcut.weight" => [vb[1], vb[0], 1, 1],
        "encoder.mid_block.attentions.0.group_norm.weight" => [vb[3]],
        "encoder.mid_block.attentions.0.to_q.weight" => [vb[3], vb[3]],
        "encoder.conv_out.weight" => [2 * lat, vb[3], 3, 3],
        "quant_conv.weight" => [2 * lat, 2 * lat, 1, 1],
        "post_quant_conv.weight" => [lat, lat, 1, 1],
        "decoder.conv_in.weight" => [vb[3], lat, 3, 3],
        "decoder.mid_block.attentions.0.to_out.0.weight" => [vb[3], vb[3]],
        "decoder.up_blocks.0.resnets.2.conv2.weight" => [vb[3], vb[3], 3, 3],
        "decoder.up_blocks.0.upsamplers.0.conv.weight" => [vb[3], vb[3], 3, 3],
        "decoder.up_blocks.3.resnets.0.conv_shortcut.weight" => [vb[0], vb[1], 1, 1],
        "decoder.conv_out.weight" => [v.out_channels, vb[0], 3, 3],
    ];
    let vae_ldm = list![
        "encoder.conv_in.weight" => [vb[0], v.in_channels, 3, 3],
        "encoder.down.1.block.0.nin_shortcut.weight" => [vb[1], vb[0], 1, 1],
        "encoder.mid.attn_1.norm.weight" => [vb[3]],
        "encoder.mid.attn_1.q.weight" => [vb[3], vb[3], 1, 1],
        "encoder.conv_out.weight" => [2 * lat, vb[3], 3, 3],
        "quant_conv.weight" => [2 * lat, 2 * lat, 1, 1],
        "post_quant_conv.weight" => [lat, lat, 1, 1],
        "decoder.conv_in.weight" => [vb[3], lat, 3, 3],
        "decoder.mid.attn_1.proj_out.weight" => [vb[3], vb[3], 1, 1],
        "decoder.up.3.block.2.conv2.weight" => [vb[3], vb[3], 3, 3],
        "decoder.up.3.upsample.conv.weight" => [vb[3], vb[3], 3, 3],
        "decoder.up.0.block.0.nin_shortcut.weight" => [vb[0], vb[1], 1, 1],
        "decoder.conv_out.weight" => [v.out_channels, vb[0], 3, 3],
    ];
    let last = format!("text_model.encoder.layers.{}", layers - 1);
    let te = list![
        "text_model.embeddings.token_embedding.weight" => [vocab, h],
        "text_model.embeddings.position_embedding.weight" => [clip.max_position_embeddings, h],
        format!("{last}.self_attn.q_proj.weight") => [h, h],
        format!("{last}.mlp.fc1.weight") => [clip.intermediate_size, h],
        "text_model.final_layer_norm.weight" => [h],
    ];

    let (ru, rv, rt) = (
        "tiny-sd/unet/diffusion_pytorch_model.safetensors",
        "tiny-sd/vae/diffusion_pytorch_model.fp16.safetensors",
        "tiny-sd/text_encoder/model.safetensors",
    );
    let (bu, bv, bt) = (read(ru), read(rv), read(rt));
    let (su, sv, st) = (parse(ru, &bu), parse(rv, &bv), parse(rt, &bt));
    expect(&su, ru, Dtype::F32, &unet);
    expect(&sv, rv, Dtype::F16, &vae);
    expect(&st, rt, Dtype::F16, &te);
    all_dtype(&su, ru, "", Dtype::F32);
    all_dtype(&sv, rv, "", Dtype::F16);
    all_dtype(&st, rt, "", Dtype::F16);
    assert!(st.tensor(&format!("text_model.encoder.layers.{layers}.mlp.fc1.weight")).is_err());
    assert!(su.tensor(&format!("{attn}.attn1.to_q.bias")).is_err(), "attention q has no bias");

    let rs = "tiny-sd.safetensors";
    let bs = read(rs);
    let ss = parse(rs, &bs);
    let prefixed = |p: &str, l: &[(String, Vec<usize>)]| -> Vec<(String, Vec<usize>)> {
        l.iter().map(|(n, s)| (format!("{p}{n}"), s.clone())).collect()
    };
    expect(&ss, rs, Dtype::BF16, &prefixed("model.diffusion_model.", &unet_ldm));
    expect(&ss, rs, Dtype::BF16, &prefixed("first_stage_model.", &vae_ldm));
    expect(&ss, rs, Dtype::BF16, &prefixed("cond_stage_model.transformer.", &te));
    for (name, t) in ss.iter() {
        let model = ["model.diffusion_model.", "first_stage_model.", "cond_stage_model."];
        if model.iter().any(|p| name.starts_with(p)) && !name.ends_with("position_ids") {
            assert_eq!(t.dtype(), Dtype::BF16, "{rs}: {name}");
        }
    }
    // The same tensors as the folder, plus keys a loader must ignore.
    assert_eq!(count(&ss, "model.diffusion_model."), su.len());
    assert_eq!(count(&ss, "first_stage_model."), sv.len());
    assert_eq!(count(&ss, "cond_stage_model.transformer."), st.len() + 1, "+ position_ids");
    let ids = "cond_stage_model.transformer.text_model.embeddings.position_ids";
    expect(&ss, rs, Dtype::I64, &list![ids => [1, clip.max_position_embeddings]]);
    expect(&ss, rs, Dtype::F32, &list!["model_ema.decay" => [], "alphas_cumprod" => [1000]]);
    assert!(count(&ss, "model_ema.") >= 3);
}

/// Reads the reference file `reference_{model}.safetensors` and checks names, shapes and that
/// every F32 value is finite.
fn check_reference(model: &str, want: &[(String, Vec<usize>)]) {
    let rel = format!("reference_{model}.safetensors");
    let bytes = read(&rel);
    let st = parse(&rel, &bytes);
    let (ints, floats): (Vec<_>, Vec<_>) =
        want.iter().cloned().partition(|(n, _)| n == "input_ids");
    expect(&st, &rel, Dtype::F32, &floats);
    expect(&st, &rel, Dtype::I32, &ints);
    for (name, t) in st.iter().filter(|(_, t)| t.dtype() == Dtype::F32) {
        let finite =
            t.data().chunks_exact(4).all(|w| f32::from_le_bytes(w.try_into().unwrap()).is_finite());
        assert!(finite, "{rel}: {name} has a NaN or infinity");
    }
}

#[test]
fn reference_outputs() {
    let c = Sd15Config::tiny();
    let (u, v, h) = (&c.unet, &c.vae, c.clip.hidden_size);
    let b = &u.block_out_channels;
    let seq = c.clip.max_position_embeddings;

    let mut clip = Vec::from(list![
        "input_ids" => [2, seq],
        "last_hidden_state" => [2, seq, h],
        "penultimate_hidden_state" => [2, seq, h],
        "penultimate_normed" => [2, seq, h],
    ]);
    for i in 0..=c.clip.num_hidden_layers {
        clip.extend(list![format!("hidden_states.{i}") => [2, seq, h]]);
    }
    check_reference("clip", &clip);

    let half = |n: usize| n.div_ceil(2); // stride-2 conv, padding 1
    let mut unet = Vec::new();
    for (case, n, y, x) in [("b2_8x8", 2, 8, 8), ("b1_8x16", 1, 8, 16), ("b1_8x12", 1, 8, 12)] {
        let low = |k: u32| (0..k).fold((y, x), |(a, b), _| (half(a), half(b)));
        let ((y1, x1), (y3, x3)) = (low(1), low(3));
        unet.extend(list![
            format!("{case}.sample") => [n, u.in_channels, y, x],
            format!("{case}.timestep") => [n],
            format!("{case}.encoder_hidden_states") => [n, seq, u.cross_attention_dim],
            format!("{case}.time_proj") => [n, u.time_proj_dim()],
            format!("{case}.time_embedding") => [n, u.time_embed_dim()],
            format!("{case}.conv_in") => [n, b[0], y, x],
            format!("{case}.down_blocks.0") => [n, b[0], y1, x1],
            format!("{case}.mid_block") => [n, b[3], y3, x3],
            format!("{case}.up_blocks.3") => [n, b[0], y, x],
            format!("{case}.out") => [n, u.out_channels, y, x],
        ]);
    }
    check_reference("unet", &unet);

    let (lat, s) = (v.latent_channels, v.downscale());
    let vae = list![
        "decode_8x8.latent" => [1, lat, 8, 8],
        "decode_8x8.image" => [1, v.out_channels, 8 * s, 8 * s],
        "decode_8x12.latent" => [1, lat, 8, 12],
        "decode_8x12.image" => [1, v.out_channels, 8 * s, 12 * s],
        "encode.image" => [1, v.in_channels, 8 * s, 8 * s],
        "encode.quant_conv" => [1, 2 * lat, 8, 8],
        "encode.mean" => [1, lat, 8, 8],
        "encode.logvar" => [1, lat, 8, 8],
        "encode.std" => [1, lat, 8, 8],
    ];
    check_reference("vae", &vae);

    // PyTorch's own fp16 error for each output, the basis of the model tests' bounds.
    let errors: serde_json::Value = serde_json::from_slice(&read("reference_errors.json")).unwrap();
    for (model, names) in [("clip", &clip[..]), ("unet", &unet[..]), ("vae", &vae[..])] {
        for (name, _) in names.iter().filter(|(n, _)| {
            !n.ends_with("input_ids")
                && !n.ends_with(".sample")
                && !n.ends_with(".timestep")
                && !n.ends_with(".encoder_hidden_states")
                && !n.ends_with(".latent")
                && n != "encode.image"
        }) {
            let e = errors[model][name]["fp16"].as_f64();
            assert!(
                e.is_some_and(|e| (0.0..0.05).contains(&e)),
                "reference_errors.json: {model}.{name}: {e:?}"
            );
        }
    }
}
