//! The key converter: names in the original single-file (LDM / CompVis) checkpoint layout to
//! atelier's names, which are the diffusers keys under a component prefix (`unet.`, `vae.`,
//! `text_encoder.`). One table of module prefixes is built from the block structure
//! ([`LdmLayout`]: number of blocks, layers per block, which blocks have attention), so SD-1.5
//! and the tiny test model with the same structure convert with the same code.
//!
//! The mapping follows diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`
//! and `convert_ldm_clip_checkpoint` (diffusers/loaders/single_file_utils.py):
//! - UNet (`model.diffusion_model.`): `time_embed.0/2` → `time_embedding.linear_1/2`,
//!   `input_blocks.0.0` → `conv_in`, `out.0/2` → `conv_norm_out`/`conv_out`;
//!   `input_blocks.{1 + b*(L+1) + l}.0` → `down_blocks.b.resnets.l` and `.1` →
//!   `down_blocks.b.attentions.l`; `input_blocks.{(b+1)*(L+1)}.0.op` →
//!   `down_blocks.b.downsamplers.0.conv`; `middle_block.0/1/2` → `mid_block.resnets.0`,
//!   `mid_block.attentions.0`, `mid_block.resnets.1`; `output_blocks.{b*(L+1) + l}.0` →
//!   `up_blocks.b.resnets.l`, `.1` → `up_blocks.b.attentions.l`, and the upsampler
//!   (`.1.conv`, or `.2.conv` after an attention) of the last layer → `up_blocks.b.upsamplers.0.conv`.
//!   Inside resnets: `in_layers.0` → `norm1`, `in_layers.2` → `conv1`, `emb_layers.1` →
//!   `time_emb_proj`, `out_layers.0` → `norm2`, `out_layers.3` → `conv2`, `skip_connection` →
//!   `conv_shortcut`. Attention (transformer) modules keep their inner names.
//! - VAE (`first_stage_model.`): `encoder.down.b.block.m` → `encoder.down_blocks.b.resnets.m`,
//!   `encoder.down.b.downsample.conv` → `encoder.down_blocks.b.downsamplers.0.conv`,
//!   `decoder.up.b` → `decoder.up_blocks.(n-1-b)` (the LDM decoder counts from the
//!   full-resolution end), `mid.block_1/2` → `mid_block.resnets.0/1`, `mid.attn_1` →
//!   `mid_block.attentions.0` with `norm`/`q`/`k`/`v`/`proj_out` → `group_norm`/`to_q`/`to_k`/
//!   `to_v`/`to_out.0`, `nin_shortcut` → `conv_shortcut`, `norm_out` → `conv_norm_out`;
//!   `quant_conv` and `post_quant_conv` keep their names. The LDM attention projections are
//!   1x1 convolutions (`[C, C, 1, 1]`) where diffusers has linear layers (`[C, C]`): such keys
//!   come back with [`Converted::squeeze`] set, and the loader drops the trailing unit dims.
//! - CLIP (`cond_stage_model.transformer.`): → `text_encoder.text_model.*`; older files
//!   without the `text_model.` level get it added.
//!
//! Everything else (`model_ema.*`, `alphas_cumprod`, ...) has no atelier name and is ignored.

/// Component prefix of the UNet's names.
pub const UNET: &str = "unet";
/// Component prefix of the VAE's names.
pub const VAE: &str = "vae";
/// Component prefix of the CLIP text encoder's names.
pub const TEXT_ENCODER: &str = "text_encoder";

/// LDM key prefix of the UNet.
pub const LDM_UNET: &str = "model.diffusion_model.";
/// LDM key prefix of the VAE.
pub const LDM_VAE: &str = "first_stage_model.";
/// LDM key prefix of the CLIP text encoder.
pub const LDM_CLIP: &str = "cond_stage_model.transformer.";

/// The UNet's block structure, as in diffusers' `UNet2DConditionModel` config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UNetLayout {
    /// Resnets per down block (`layers_per_block`); up blocks have one more.
    pub layers_per_block: usize,
    /// Per down block: has cross-attention transformers (`CrossAttnDownBlock2D`).
    pub down_attention: Vec<bool>,
    /// Per up block: has cross-attention transformers (`CrossAttnUpBlock2D`).
    pub up_attention: Vec<bool>,
}

/// The VAE's block structure, as in diffusers' `AutoencoderKL` config.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VaeLayout {
    /// Number of encoder down blocks (= decoder up blocks).
    pub blocks: usize,
    /// Resnets per encoder block; decoder blocks have one more.
    pub layers_per_block: usize,
}

/// Block structure of a whole single-file checkpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LdmLayout {
    pub unet: UNetLayout,
    pub vae: VaeLayout,
}

impl LdmLayout {
    /// SD-1.5 (and the tiny test model, which has the same structure): 4 UNet blocks of 2
    /// layers, attention in the first 3 down and the last 3 up blocks; 4 VAE blocks of 2.
    pub fn sd15() -> LdmLayout {
        LdmLayout {
            unet: UNetLayout {
                layers_per_block: 2,
                down_attention: vec![true, true, true, false],
                up_attention: vec![false, true, true, true],
            },
            vae: VaeLayout { blocks: 4, layers_per_block: 2 },
        }
    }
}

impl Default for LdmLayout {
    fn default() -> Self {
        LdmLayout::sd15()
    }
}

/// What a module prefix holds, which decides how the rest of the key is renamed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// The rest of the key is kept.
    Keep,
    /// A UNet `ResBlock`: `in_layers.0` → `norm1`, ...
    UNetResnet,
    /// A VAE `ResnetBlock`: `nin_shortcut` → `conv_shortcut`.
    VaeResnet,
    /// A VAE `AttnBlock`: `q` → `to_q`, ..., with 1x1-conv weights squeezed to linear.
    VaeAttention,
}

/// An LDM key converted: the atelier name, and whether the tensor is a 1x1 convolution
/// weight stored where atelier (diffusers) has a linear weight, so its trailing unit
/// dimensions are dropped (`[C, C, 1, 1]` → `[C, C]`; the data is the same).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Converted {
    pub name: String,
    pub squeeze: bool,
}

/// The converter for one layout: module prefix tables for the UNet and the VAE.
#[derive(Clone, Debug)]
pub struct KeyMap {
    /// (LDM prefix under `model.diffusion_model.`, diffusers prefix, kind); prefixes end in '.'.
    unet: Vec<(String, String, Kind)>,
    /// The same under `first_stage_model.`.
    vae: Vec<(String, String, Kind)>,
}

const UNET_RESNET: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

const VAE_RESNET: [(&str, &str); 5] = [
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("nin_shortcut.", "conv_shortcut."),
];

/// (LDM name, diffusers name, is a 1x1-conv weight that becomes linear).
const VAE_ATTENTION: [(&str, &str, bool); 10] = [
    ("norm.weight", "group_norm.weight", false),
    ("norm.bias", "group_norm.bias", false),
    ("q.weight", "to_q.weight", true),
    ("q.bias", "to_q.bias", false),
    ("k.weight", "to_k.weight", true),
    ("k.bias", "to_k.bias", false),
    ("v.weight", "to_v.weight", true),
    ("v.bias", "to_v.bias", false),
    ("proj_out.weight", "to_out.0.weight", true),
    ("proj_out.bias", "to_out.0.bias", false),
];

/// Legacy names of the VAE mid-block attention in old diffusers folders (before diffusers
/// 0.14): (old suffix, new suffix). diffusers renames these at load; so do we.
pub const VAE_LEGACY_ATTENTION: [(&str, &str); 8] = [
    ("query.weight", "to_q.weight"),
    ("query.bias", "to_q.bias"),
    ("key.weight", "to_k.weight"),
    ("key.bias", "to_k.bias"),
    ("value.weight", "to_v.weight"),
    ("value.bias", "to_v.bias"),
    ("proj_attn.weight", "to_out.0.weight"),
    ("proj_attn.bias", "to_out.0.bias"),
];

fn entry(v: &mut Vec<(String, String, Kind)>, ldm: String, diffusers: String, kind: Kind) {
    v.push((ldm, diffusers, kind));
}

impl KeyMap {
    /// Builds the prefix tables for a layout.
    pub fn new(layout: &LdmLayout) -> KeyMap {
        use Kind::*;
        let u = &layout.unet;
        let l = u.layers_per_block;
        let mut unet = Vec::new();
        for (ldm, d) in [
            ("time_embed.0.", "time_embedding.linear_1."),
            ("time_embed.2.", "time_embedding.linear_2."),
            ("input_blocks.0.0.", "conv_in."),
            ("out.0.", "conv_norm_out."),
            ("out.2.", "conv_out."),
        ] {
            entry(&mut unet, ldm.into(), d.into(), Keep);
        }
        let n = u.down_attention.len();
        for (b, &attn) in u.down_attention.iter().enumerate() {
            for j in 0..l {
                let i = 1 + b * (l + 1) + j;
                entry(&mut unet, format!("input_blocks.{i}.0."), format!("down_blocks.{b}.resnets.{j}."), UNetResnet);
                if attn {
                    entry(&mut unet, format!("input_blocks.{i}.1."), format!("down_blocks.{b}.attentions.{j}."), Keep);
                }
            }
            if b + 1 < n {
                let i = (b + 1) * (l + 1);
                entry(&mut unet, format!("input_blocks.{i}.0.op."), format!("down_blocks.{b}.downsamplers.0.conv."), Keep);
            }
        }
        entry(&mut unet, "middle_block.0.".into(), "mid_block.resnets.0.".into(), UNetResnet);
        entry(&mut unet, "middle_block.1.".into(), "mid_block.attentions.0.".into(), Keep);
        entry(&mut unet, "middle_block.2.".into(), "mid_block.resnets.1.".into(), UNetResnet);
        let n_up = u.up_attention.len();
        for (b, &attn) in u.up_attention.iter().enumerate() {
            for j in 0..=l {
                let i = b * (l + 1) + j;
                entry(&mut unet, format!("output_blocks.{i}.0."), format!("up_blocks.{b}.resnets.{j}."), UNetResnet);
                if attn {
                    entry(&mut unet, format!("output_blocks.{i}.1."), format!("up_blocks.{b}.attentions.{j}."), Keep);
                }
                if j == l && b + 1 < n_up {
                    let slot = if attn { 2 } else { 1 };
                    entry(&mut unet, format!("output_blocks.{i}.{slot}.conv."), format!("up_blocks.{b}.upsamplers.0.conv."), Keep);
                }
            }
        }

        let v = &layout.vae;
        let mut vae = Vec::new();
        for (ldm, d) in [("quant_conv.", "quant_conv."), ("post_quant_conv.", "post_quant_conv.")] {
            entry(&mut vae, ldm.into(), d.into(), Keep);
        }
        for part in ["encoder", "decoder"] {
            entry(&mut vae, format!("{part}.conv_in."), format!("{part}.conv_in."), Keep);
            entry(&mut vae, format!("{part}.conv_out."), format!("{part}.conv_out."), Keep);
            entry(&mut vae, format!("{part}.norm_out."), format!("{part}.conv_norm_out."), Keep);
            entry(&mut vae, format!("{part}.mid.block_1."), format!("{part}.mid_block.resnets.0."), VaeResnet);
            entry(&mut vae, format!("{part}.mid.block_2."), format!("{part}.mid_block.resnets.1."), VaeResnet);
            entry(&mut vae, format!("{part}.mid.attn_1."), format!("{part}.mid_block.attentions.0."), VaeAttention);
        }
        for b in 0..v.blocks {
            for m in 0..v.layers_per_block {
                entry(&mut vae, format!("encoder.down.{b}.block.{m}."), format!("encoder.down_blocks.{b}.resnets.{m}."), VaeResnet);
            }
            if b + 1 < v.blocks {
                entry(&mut vae, format!("encoder.down.{b}.downsample.conv."), format!("encoder.down_blocks.{b}.downsamplers.0.conv."), Keep);
            }
            // Decoder: LDM's up.b is diffusers' up_blocks.(n-1-b); LDM's up.0 (full
            // resolution) has no upsampler, as diffusers' last up block.
            let d = v.blocks - 1 - b;
            for m in 0..=v.layers_per_block {
                entry(&mut vae, format!("decoder.up.{b}.block.{m}."), format!("decoder.up_blocks.{d}.resnets.{m}."), VaeResnet);
            }
            if b > 0 {
                entry(&mut vae, format!("decoder.up.{b}.upsample.conv."), format!("decoder.up_blocks.{d}.upsamplers.0.conv."), Keep);
            }
        }
        KeyMap { unet, vae }
    }

    /// Converts one key of a single-file checkpoint; `None` for keys atelier does not use
    /// (EMA copies, noise schedule buffers, unknown modules).
    pub fn convert(&self, key: &str) -> Option<Converted> {
        if let Some(rest) = key.strip_prefix(LDM_UNET) {
            let (name, squeeze) = convert_in(&self.unet, rest)?;
            return Some(Converted { name: format!("{UNET}.{name}"), squeeze });
        }
        if let Some(rest) = key.strip_prefix(LDM_VAE) {
            let (name, squeeze) = convert_in(&self.vae, rest)?;
            return Some(Converted { name: format!("{VAE}.{name}"), squeeze });
        }
        if let Some(rest) = key.strip_prefix(LDM_CLIP) {
            if rest.is_empty() {
                return None;
            }
            let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
            return Some(Converted { name: format!("{TEXT_ENCODER}.text_model.{rest}"), squeeze: false });
        }
        None
    }
}

impl KeyMap {
    /// The LDM key of an atelier UNet or text-encoder name: the inverse of [`KeyMap::convert`]
    /// for those (kohya LoRA names are sometimes built from LDM paths,
    /// `lora_unet_input_blocks_1_1_...`). `None` for other names and for names the layout has
    /// no LDM place for.
    pub fn to_ldm(&self, name: &str) -> Option<String> {
        if let Some(rest) = name.strip_prefix("text_encoder.") {
            return (!rest.is_empty()).then(|| format!("{LDM_CLIP}{rest}"));
        }
        let rest = name.strip_prefix("unet.")?;
        let (ldm, d, kind) =
            self.unet.iter().filter(|(_, d, _)| rest.starts_with(d.as_str())).max_by_key(|(_, d, _)| d.len())?;
        let inner = &rest[d.len()..];
        let inner = match kind {
            Kind::Keep => inner.to_string(),
            Kind::UNetResnet => UNET_RESNET.iter().find_map(|(from, to)| {
                let tail = inner.strip_prefix(to)?;
                (!tail.is_empty()).then(|| format!("{from}{tail}"))
            })?,
            Kind::VaeResnet | Kind::VaeAttention => return None,
        };
        (!inner.is_empty()).then(|| format!("{LDM_UNET}{ldm}{inner}"))
    }
}

/// Finds the module prefix `rest` starts with and renames the remainder by the module kind.
fn convert_in(table: &[(String, String, Kind)], rest: &str) -> Option<(String, bool)> {
    // Prefixes end in '.', so "input_blocks.1." never matches "input_blocks.10.*"; where two
    // prefixes nest ("output_blocks.2.1." and "output_blocks.2.1.conv."), the longest wins.
    let (ldm, d, kind) = table.iter().filter(|(p, _, _)| rest.starts_with(p.as_str())).max_by_key(|(p, _, _)| p.len())?;
    let inner = &rest[ldm.len()..];
    if inner.is_empty() {
        return None;
    }
    match kind {
        Kind::Keep => Some((format!("{d}{inner}"), false)),
        Kind::UNetResnet => rename(&UNET_RESNET, inner).map(|r| (format!("{d}{r}"), false)),
        Kind::VaeResnet => rename(&VAE_RESNET, inner).map(|r| (format!("{d}{r}"), false)),
        Kind::VaeAttention => VAE_ATTENTION
            .iter()
            .find(|(from, _, _)| *from == inner)
            .map(|(_, to, squeeze)| (format!("{d}{to}"), *squeeze)),
    }
}

fn rename(table: &[(&str, &str)], inner: &str) -> Option<String> {
    table.iter().find_map(|(from, to)| {
        let tail = inner.strip_prefix(from)?;
        (!tail.is_empty()).then(|| format!("{to}{tail}"))
    })
}

/// Converts one LDM key with a fresh table (convenient for a few keys; build a [`KeyMap`]
/// once for a whole file).
pub fn ldm_to_diffusers(layout: &LdmLayout, key: &str) -> Option<Converted> {
    KeyMap::new(layout).convert(key)
}

/// Renames a legacy VAE attention key of an old diffusers folder (`...attentions.0.query.weight`
/// → `...attentions.0.to_q.weight`); the key is a VAE key without the `vae.` prefix. `None`
/// if it is not one. Legacy projection weights are squeezed like LDM ones if stored as 1x1 convs.
pub fn diffusers_vae_legacy(key: &str) -> Option<Converted> {
    let (module, leaf) = split_at_attention(key)?;
    VAE_LEGACY_ATTENTION.iter().find(|(from, _)| *from == leaf).map(|(_, to)| Converted {
        name: format!("{module}{to}"),
        squeeze: to.ends_with(".weight"),
    })
}

fn split_at_attention(key: &str) -> Option<(&str, &str)> {
    let at = key.find(".mid_block.attentions.0.")? + ".mid_block.attentions.0.".len();
    Some((&key[..at], &key[at..]))
}
