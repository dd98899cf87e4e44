//! Trained adapters written as LoRA files other tools load: kohya-ss (A1111, ComfyUI, Forge,
//! sd-scripts, diffusers' `load_lora_weights`) or diffusers (`pytorch_lora_weights.safetensors`
//! as `save_lora_weights` writes it). Both load back through
//! [`LoraFile::open`](crate::model::lora_file::LoraFile::open) at the trained scale alpha / r.
//!
//! [`adapters`] turns the trainer's [`LoraParams`] and the host copy of its flat f32 buffer into
//! [`Adapter`]s (A [r, in], B [out, r], alpha, and whether the target is a 1x1 convolution:
//! `proj_in` / `proj_out` when the UNet has `use_linear_projection == false`, SD-1.5);
//! [`write_lora`] writes them.
//!
//! **Layouts** (module path = the diffusers path under the UNet, e.g.
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`):
//! - kohya: `lora_unet_<module path with '.' -> '_'>.lora_down.weight` A [r, in] (`[r, in, 1, 1]`
//!   for a 1x1 convolution, as kohya's `LoRAModule` stores a Conv2d's down), `.lora_up.weight`
//!   B [out, r] (`[out, r, 1, 1]`), `.alpha` (f32 scalar, shape []). Effective change:
//!   alpha / r · up·down.
//! - diffusers: `unet.<module path>.lora_A.weight` A and `unet.<module path>.lora_B.weight`
//!   B (1x1 convolutions `[r, in, 1, 1]` / `[out, r, 1, 1]`, as PEFT stores a Conv2d LoRA), with
//!   **alpha / r folded into B** and no `lora_adapter_metadata`: a diffusers file without
//!   adapter metadata loads at alpha = r (scale 1) in every diffusers version and in PEFT, so the
//!   stored B·A is already the change. (Writing the unfolded pair plus the metadata would also
//!   load right in recent diffusers, but older versions ignore the metadata and would apply the
//!   wrong scale; writing both would apply it twice.) The file's metadata is `{"format": "pt"}`,
//!   as `save_lora_weights` writes, plus what the caller gives.
//! - Text-encoder adapters (named `text_model.encoder.layers.<i>.self_attn.q_proj`, ...) are
//!   written as kohya's `lora_te_text_model_encoder_layers_<i>_self_attn_q_proj.*` and
//!   diffusers' `text_encoder.text_model.encoder.layers.<i>.self_attn.q_proj.lora_A.weight`.
//!
//! **Precision.** [`write_lora`] stores A and B as f16, as kohya's sd-scripts (`save_precision
//! fp16`) and diffusers' published LoRAs do (relative rounding <= 2^-11 per element; the
//! effective change then differs from the f32 one by at most about 2^-10 of Σ|scale·b||a| per
//! element). [`write_lora_with`] and [`Precision::F32`] keep the f32 master weights exactly.
//! kohya's `.alpha` is always f32 (a non-integer alpha survives exactly). Values outside f16's
//! range, and any NaN or infinity (a diverged training run), are errors naming the adapter:
//! the readers refuse such files.
//!
//! **kohya metadata.** The caller's `metadata` is written as given; kohya's readers (A1111's
//! and Forge's LoRA tab, Civitai, sd-scripts' `networks/check_lora_weights.py`) show the `ss_*`
//! keys sd-scripts' `train_network.py` writes, each the Python `str()` of its value
//! ("True"/"False", "None", "16.0", "(512, 512)"). The ones worth passing:
//! `ss_network_module` ("networks.lora"), `ss_network_dim` (rank), `ss_network_alpha`
//! ("16.0"), `ss_network_dropout`, `ss_base_model_version` ("sd_v1"), `ss_v2` ("False"),
//! `ss_resolution` ("(512, 512)"), `ss_max_train_steps` / `ss_steps`, `ss_learning_rate`,
//! `ss_unet_lr`, `ss_lr_scheduler`, `ss_optimizer`, `ss_max_grad_norm`, `ss_seed`,
//! `ss_mixed_precision` ("fp16"), `ss_num_train_images`, `ss_batch_size_per_device`,
//! `ss_gradient_accumulation_steps`, `ss_gradient_checkpointing`, `ss_flip_aug`,
//! `ss_training_started_at` / `ss_training_finished_at` (Unix seconds), `ss_output_name`,
//! `ss_training_comment`, `ss_tag_frequency` (JSON). Where the caller leaves them out,
//! [`write_lora`] fills the five that say what the file is, from the adapters:
//! `ss_network_module` "networks.lora", `ss_network_dim` and `ss_network_alpha` (when all
//! adapters share one rank / alpha), `ss_base_model_version` "sd_v1", `ss_v2` "False". It always
//! writes `sshs_model_hash` and `sshs_legacy_hash` as sd-scripts computes them
//! (`train_util.precalculate_safetensors_hashes`: the file serialized with only its `ss_*`
//! metadata; SHA-256 of the tensor data after the header, and the first 8 hex digits of the
//! SHA-256 of bytes 0x100000..0x110000), replacing any the caller gives.
//!
//! `lora_adapter_metadata` in the caller's metadata is refused in both formats: it would give
//! diffusers and PEFT a second alpha to apply.
//!
//! **Atomic.** The file is written under a temporary name in the target folder and renamed
//! ([`images::write_atomic`]); every check runs before anything is written, and a failed write
//! removes the temporary file, so an existing file at `path` is either replaced whole or left
//! as it was.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use half::f16;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use sha2::{Digest, Sha256};

use crate::config::UNetConfig;
use crate::error::{Error, Result};
use crate::images;
use crate::model::lora::{LoraParams, LoraSpec};

/// The layout of a written LoRA file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFileFormat {
    /// `lora_unet_*.lora_down.weight` / `.lora_up.weight` / `.alpha`: kohya-ss, A1111, ComfyUI.
    Kohya,
    /// `unet.*.lora_A.weight` / `.lora_B.weight`, alpha / r folded into B: diffusers, PEFT.
    Diffusers,
}

impl FromStr for LoraFileFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "kohya" => Ok(LoraFileFormat::Kohya),
            "diffusers" => Ok(LoraFileFormat::Diffusers),
            _ => Err(Error::Usage(format!(
                "unknown LoRA file format {s:?}; use \"kohya\" (A1111, ComfyUI, Forge) or \"diffusers\" (diffusers, PEFT)"
            ))),
        }
    }
}

impl fmt::Display for LoraFileFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFileFormat::Kohya => "kohya",
            LoraFileFormat::Diffusers => "diffusers",
        })
    }
}

/// The element type A and B are stored as.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// What kohya and diffusers ship (half the size; the change rounds to about 2^-10).
    #[default]
    F16,
    /// The f32 master weights exactly.
    F32,
}

/// One trained adapter, ready to write: the change is alpha / rank · B·A.
#[derive(Clone, Debug, PartialEq)]
pub struct Adapter {
    /// The diffusers module path under the UNet, e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`, or under the text encoder,
    /// starting `text_model.` (see [`Adapter::text_encoder_path`]).
    pub name: String,
    /// A (down) [rank, k_in], row-major.
    pub a: Vec<f32>,
    /// B (up) [n_out, rank], row-major.
    pub b: Vec<f32>,
    pub rank: usize,
    pub k_in: usize,
    pub n_out: usize,
    pub alpha: f32,
    /// The target is a 1x1 convolution (stored with trailing [1, 1] dimensions).
    pub conv1x1: bool,
}

impl Adapter {
    /// alpha / rank.
    pub fn scale(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The module path under the text encoder (`text_model.encoder.layers.0.self_attn.q_proj`,
    /// as [`crate::model::clip_train`] names its adapters) when the adapter is on the text
    /// encoder: written as kohya's `lora_te_text_model_...` and diffusers'
    /// `text_encoder.text_model...` keys. Every other name is a module path under the UNet.
    pub fn text_encoder_path(&self) -> Option<&str> {
        self.name.starts_with("text_model.").then_some(self.name.as_str())
    }
}

/// The adapters of `params` with their values taken from `values`, the host copy of
/// `params.params` (`[params.total]` f32). `unet` says whether `proj_in` / `proj_out` are 1x1
/// convolutions.
pub fn adapters(params: &LoraParams, values: &[f32], unet: &UNetConfig) -> Result<Vec<Adapter>> {
    if values.len() != params.total {
        return Err(Error::shape(
            "LoRA export",
            format!("the host copy of the LoRA parameters has {} values, the layout {}", values.len(), params.total),
        ));
    }
    let specs: Vec<LoraSpec> = params.layers.iter().map(|l| l.spec.clone()).collect();
    let offsets: Vec<(usize, usize)> = params.layers.iter().map(|l| (l.off_a, l.off_b)).collect();
    adapters_from_layout(&specs, &offsets, values, unet)
}

/// [`adapters`] without a GPU: `specs` at `offsets` (as [`crate::model::lora::layout`] gives
/// them) in the flat buffer `values`.
pub fn adapters_from_layout(
    specs: &[LoraSpec],
    offsets: &[(usize, usize)],
    values: &[f32],
    unet: &UNetConfig,
) -> Result<Vec<Adapter>> {
    if specs.len() != offsets.len() {
        return Err(Error::shape("LoRA export", format!("{} adapters but {} offsets", specs.len(), offsets.len())));
    }
    specs
        .iter()
        .zip(offsets)
        .map(|(s, &(off_a, off_b))| {
            let (na, nb) = (s.rank * s.k, s.n * s.rank);
            let (Some(a), Some(b)) = (values.get(off_a..off_a + na), values.get(off_b..off_b + nb)) else {
                return Err(Error::shape(
                    "LoRA export",
                    format!("adapter {} (A at {off_a}, B at {off_b}) lies outside the {} parameter values", s.name, values.len()),
                ));
            };
            let proj = s.name.ends_with(".proj_in") || s.name.ends_with(".proj_out") || s.name == "proj_in" || s.name == "proj_out";
            Ok(Adapter {
                name: s.name.clone(),
                a: a.to_vec(),
                b: b.to_vec(),
                rank: s.rank,
                k_in: s.k,
                n_out: s.n,
                alpha: s.alpha,
                conv1x1: proj && !unet.use_linear_projection,
            })
        })
        .collect()
}

/// Writes `adapters` as a `format` LoRA file at `path`, A and B as f16 (see the module doc).
pub fn write_lora(path: &Path, adapters: &[Adapter], format: LoraFileFormat, metadata: &BTreeMap<String, String>) -> Result<()> {
    write_lora_with(path, adapters, format, metadata, Precision::F16)
}

/// [`write_lora`] with A and B stored as `precision`.
pub fn write_lora_with(
    path: &Path,
    adapters: &[Adapter],
    format: LoraFileFormat,
    metadata: &BTreeMap<String, String>,
    precision: Precision,
) -> Result<()> {
    let bytes = lora_bytes(adapters, format, metadata, precision).map_err(|e| match e {
        Error::Usage(m) => Error::Usage(format!("{}: {m}", path.display())),
        e => e,
    })?;
    images::write_atomic(path, &bytes).map_err(|e| match e {
        Error::Io { source, .. } => Error::Usage(format!(
            "{}: cannot write the LoRA file ({source}); choose a folder that exists and that you can write to",
            path.display()
        )),
        e => e,
    })
}

/// A tensor to serialize: key, dtype, shape, little-endian bytes.
struct Entry {
    key: String,
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

/// The whole safetensors file, after every check.
fn lora_bytes(adapters: &[Adapter], format: LoraFileFormat, metadata: &BTreeMap<String, String>, precision: Precision) -> Result<Vec<u8>> {
    if adapters.is_empty() {
        return Err(Error::Usage("no adapters to write".into()));
    }
    if metadata.contains_key("lora_adapter_metadata") {
        return Err(Error::Usage(
            "the metadata key lora_adapter_metadata would give loaders a second alpha to apply; leave it out (the scale is in the tensors)".into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut entries = Vec::with_capacity(3 * adapters.len());
    for ad in adapters {
        check_adapter(ad)?;
        if !seen.insert(ad.name.as_str()) {
            return Err(Error::Usage(format!("two adapters for module {}; give each module one", ad.name)));
        }
        let tail: &[usize] = if ad.conv1x1 { &[1, 1] } else { &[] };
        let down_shape = [&[ad.rank, ad.k_in][..], tail].concat();
        let up_shape = [&[ad.n_out, ad.rank][..], tail].concat();
        match format {
            LoraFileFormat::Kohya => {
                let base = match ad.text_encoder_path() {
                    Some(p) => format!("lora_te_{}", p.replace('.', "_")),
                    None => format!("lora_unet_{}", ad.name.replace('.', "_")),
                };
                entries.push(matrix(ad, &format!("{base}.lora_down.weight"), down_shape, &ad.a, 1.0, precision)?);
                entries.push(matrix(ad, &format!("{base}.lora_up.weight"), up_shape, &ad.b, 1.0, precision)?);
                entries.push(Entry {
                    key: format!("{base}.alpha"),
                    dtype: Dtype::F32,
                    shape: vec![],
                    data: ad.alpha.to_le_bytes().to_vec(),
                });
            }
            LoraFileFormat::Diffusers => {
                let base = match ad.text_encoder_path() {
                    Some(p) => format!("text_encoder.{p}"),
                    None => format!("unet.{}", ad.name),
                };
                entries.push(matrix(ad, &format!("{base}.lora_A.weight"), down_shape, &ad.a, 1.0, precision)?);
                entries.push(matrix(ad, &format!("{base}.lora_B.weight"), up_shape, &ad.b, ad.scale(), precision)?);
            }
        }
    }
    let mut meta: HashMap<String, String> = metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    match format {
        LoraFileFormat::Kohya => {
            let mut defaults = vec![
                ("ss_network_module", "networks.lora".to_string()),
                ("ss_base_model_version", "sd_v1".to_string()),
                ("ss_v2", "False".to_string()),
            ];
            if adapters.iter().all(|a| a.rank == adapters[0].rank) {
                defaults.push(("ss_network_dim", adapters[0].rank.to_string()));
            }
            if adapters.iter().all(|a| a.alpha == adapters[0].alpha) {
                defaults.push(("ss_network_alpha", py_float(adapters[0].alpha)));
            }
            for (k, v) in defaults {
                meta.entry(k.to_string()).or_insert(v);
            }
            // sd-scripts' hashes, over the file with only its ss_* metadata.
            let ss: HashMap<String, String> = meta.iter().filter(|(k, _)| k.starts_with("ss_")).map(|(k, v)| (k.clone(), v.clone())).collect();
            let plain = serialize(&entries, ss)?;
            let n = u64::from_le_bytes(plain[..8].try_into().expect("8 bytes")) as usize;
            let model_hash = hex(&Sha256::digest(&plain[8 + n..]));
            let legacy = plain.get(0x100000..plain.len().min(0x110000)).unwrap_or(&[]);
            let legacy_hash = hex(&Sha256::digest(legacy))[..8].to_string();
            meta.insert("sshs_model_hash".into(), model_hash);
            meta.insert("sshs_legacy_hash".into(), legacy_hash);
        }
        LoraFileFormat::Diffusers => {
            meta.entry("format".into()).or_insert_with(|| "pt".into());
        }
    }
    serialize(&entries, meta)
}

fn check_adapter(ad: &Adapter) -> Result<()> {
    let bad = |why: String| Err(Error::Usage(format!("adapter {}: {why}", ad.name)));
    if ad.name.is_empty() || ad.name.starts_with('.') || ad.name.ends_with('.') || ad.name.contains(char::is_whitespace) {
        return bad("not a module path under the UNet (like down_blocks.0.attentions.0.proj_in)".into());
    }
    if ad.rank == 0 || ad.k_in == 0 || ad.n_out == 0 {
        return bad(format!("rank {}, in {}, out {}: none may be zero", ad.rank, ad.k_in, ad.n_out));
    }
    if ad.a.len() != ad.rank * ad.k_in || ad.b.len() != ad.n_out * ad.rank {
        return bad(format!(
            "A holds {} values and B {}, but rank {}, in {}, out {} need {} and {}",
            ad.a.len(),
            ad.b.len(),
            ad.rank,
            ad.k_in,
            ad.n_out,
            ad.rank * ad.k_in,
            ad.n_out * ad.rank
        ));
    }
    if !ad.alpha.is_finite() || ad.alpha <= 0.0 {
        return bad(format!("alpha {} is not a positive number", ad.alpha));
    }
    Ok(())
}

/// One matrix as `precision`, times `factor` (in f32), every value checked finite.
fn matrix(ad: &Adapter, key: &str, shape: Vec<usize>, v: &[f32], factor: f32, precision: Precision) -> Result<Entry> {
    let which = if key.ends_with("lora_down.weight") || key.ends_with("lora_A.weight") { "A (down)" } else { "B (up)" };
    let mut data = Vec::with_capacity(v.len() * 4);
    for (i, &x) in v.iter().enumerate() {
        let y = x * factor;
        if !x.is_finite() {
            return Err(Error::Usage(format!(
                "adapter {}: {which} holds {x} at index {i}: the training diverged; lower the learning rate or write an earlier checkpoint",
                ad.name
            )));
        }
        match precision {
            Precision::F16 => {
                let h = f16::from_f32(y);
                if !h.is_finite() {
                    return Err(Error::Usage(format!(
                        "adapter {}: {which} holds {y} at index {i}, beyond f16's range (65504); write the file as f32",
                        ad.name
                    )));
                }
                data.extend_from_slice(&h.to_bits().to_le_bytes());
            }
            Precision::F32 => {
                if !y.is_finite() {
                    return Err(Error::Usage(format!("adapter {}: {which} times alpha / r overflows f32 at index {i}", ad.name)));
                }
                data.extend_from_slice(&y.to_le_bytes());
            }
        }
    }
    let dtype = match precision {
        Precision::F16 => Dtype::F16,
        Precision::F32 => Dtype::F32,
    };
    Ok(Entry { key: key.to_string(), dtype, shape, data })
}

fn serialize(entries: &[Entry], meta: HashMap<String, String>) -> Result<Vec<u8>> {
    let fail = |e: safetensors::SafeTensorError| Error::Usage(format!("cannot serialize the LoRA file: {e}"));
    let views = entries
        .iter()
        .map(|e| TensorView::new(e.dtype, e.shape.clone(), &e.data).map(|v| (e.key.clone(), v)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(fail)?;
    safetensors::serialize(views, Some(meta)).map_err(fail)
}

/// Python's `str(float)` for the alphas kohya writes: "16.0", "0.5" (integers get ".0").
fn py_float(x: f32) -> String {
    let x = x as f64;
    if x.fract() == 0.0 && x.abs() < 1e16 {
        format!("{x:.1}")
    } else {
        // shortest round-trip digits of the f32 value, as Python prints the float kohya holds
        format!("{}", x as f32)
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
