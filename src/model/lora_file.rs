//! LoRA files, read for one model and merged into its weights at load (LoRA at inference).
//!
//! [`LoraFile::open`] reads a `.safetensors` LoRA, or a PEFT folder (`adapter_model.safetensors`
//! and `adapter_config.json`), and maps every adapter to the atelier name of the weight it
//! changes, with its down [r, in(, kh, kw)] and up [out, r(, 1, 1)] matrices as f32 and its scale.
//! [`Weights::add_lora`] then merges W' = W + user scale * scale * up·down as weights are read.
//!
//! **Layouts** (each key is read on its own, so mixed files work):
//! - kohya-ss / A1111 / ComfyUI: `lora_unet_<module path with _>` and `lora_te_<text_model path
//!   with _>` (`lora_te1_` as diffusers' `convert_state_dict_to_kohya` writes it for SD-1.5), each
//!   `.lora_down.weight`, `.lora_up.weight`, `.alpha`. The underscore names are resolved with a
//!   table built from the model's own module names, both the diffusers paths
//!   (`down_blocks_0_attentions_0_...`) and the LDM ones (`input_blocks_1_1_...`, through
//!   [`KeyMap::to_ldm`](crate::model::convert::KeyMap::to_ldm)). LoCon convolutions (down [r, in, 3, 3], up [out, r, 1, 1]) included.
//! - diffusers: `unet.<path>.lora_A.weight` / `lora_B.weight` and `text_encoder.<path>...` (with
//!   or without `text_model.`), the older `.lora.down.weight` / `.lora.up.weight` and
//!   `.lora_linear_layer.down.weight`, the attention-processor `attn1.processor.to_q_lora.down.weight`
//!   (`to_out_lora` is `to_out.0`) and the old text-encoder `self_attn.to_q_lora` (`q_proj`).
//!   Keys without a component prefix are looked up in the UNet, then the text encoder.
//! - PEFT: `base_model.model.<path>.lora_A.weight` / `lora_B.weight`.
//!
//! **Scale** alpha/r, with r the tensors' rank: kohya's `.alpha` tensor; else, for diffusers and
//! PEFT keys, the adapter config: PEFT's `adapter_config.json`, or in a diffusers file the JSON in
//! the metadata key `lora_adapter_metadata` (`save_lora_weights` writes it when given the
//! configs: `"unet.lora_alpha"`, `"unet.r"`, `"unet.alpha_pattern"`, `"unet.rank_pattern"`,
//! `"unet.use_rslora"`, the same under `text_encoder.`), as diffusers and PEFT read them: a
//! pattern key applies to a module whose path is the key or ends in `.` + key; `use_rslora` gives
//! alpha/sqrt(r); else a `<module>.alpha` tensor; else alpha = r (scale 1).
//!
//! **Refusals.** LyCORIS variants (LoHa, LoKr, DoRA, Tucker `lora_mid`, OFT, full `.diff`, ...)
//! are errors naming the key; so are LoRAs for SDXL or SD-2.x (by key prefixes such as
//! `lora_te2_`, by metadata, or by their widths), and shapes that do not fit the model. Keys that
//! name no module of the model are collected in [`LoraFile::unknown`] for the caller to show.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use half::{bf16, f16};
use memmap2::Mmap;
use safetensors::Dtype;
use serde_json::{Map, Value};

use crate::error::{Error, Result};
use crate::model::lora_keys::{ModelNames, Module, ONLY_LORA, Role, check_shape, other_family, parse_key, refuse};
use crate::model::weights::{RawTensor, Weights, read_safetensors_file};

/// The layout of a LoRA file, by its keys (the most specific one present).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraFormat {
    /// `lora_unet_*` / `lora_te_*`: kohya-ss, A1111, ComfyUI.
    Kohya,
    /// `unet.*.lora_A.weight`: diffusers' current `save_lora_weights`.
    Diffusers,
    /// `.lora.down.weight`, `.lora_linear_layer.*`, `to_q_lora`: older diffusers.
    DiffusersOld,
    /// `base_model.model.*.lora_A.weight`: a PEFT adapter.
    Peft,
}

impl fmt::Display for LoraFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LoraFormat::Kohya => "kohya",
            LoraFormat::Diffusers => "diffusers",
            LoraFormat::DiffusersOld => "older diffusers",
            LoraFormat::Peft => "PEFT",
        })
    }
}

/// One adapter: the change up·down to one weight.
#[derive(Clone, Debug)]
pub struct LoraAdapter {
    /// The atelier name of the weight it changes, e.g. `unet.<...>.attn1.to_q.weight`.
    pub target: String,
    /// The file's key of the down matrix (for messages).
    pub key: String,
    /// r: the rows of down.
    pub rank: usize,
    /// down [r, in(, kh, kw)], row-major f32.
    pub down: Arc<[f32]>,
    pub down_shape: Vec<usize>,
    /// up [out, r(, 1, 1)], row-major f32.
    pub up: Arc<[f32]>,
    pub up_shape: Vec<usize>,
    /// The file's alpha for this adapter (r where it gives none).
    pub alpha: f32,
    /// What up·down is multiplied by before the user's scale: alpha / r (alpha / sqrt(r) with rsLoRA).
    pub scale: f32,
}

impl LoraAdapter {
    /// up·down as [out, in * kh * kw] (the target weight's layout), unscaled, in f32.
    pub fn product(&self) -> Vec<f32> {
        let out = self.up.len() / self.rank;
        let mut w = vec![0.0; out * (self.down.len() / self.rank)];
        Delta { lora: 0, factor: 1.0, up: self.up.clone(), down: self.down.clone(), rank: self.rank }.add_to(&mut w);
        w
    }
}

/// A LoRA file mapped onto one model's weights.
#[derive(Clone, Debug)]
pub struct LoraFile {
    /// The file, or the PEFT folder.
    pub path: PathBuf,
    pub format: LoraFormat,
    /// One per changed weight, sorted by target.
    pub adapters: Vec<LoraAdapter>,
    /// Keys that name no weight of the model (the caller shows them).
    pub unknown: Vec<String>,
    /// The file has `lora_te1_` keys: SD-1.5 as diffusers writes it, or SDXL, which a key that
    /// does not fit then says.
    te1: bool,
}

/// A LoRA change as [`Weights`] keeps it: w += factor * up·down.
#[derive(Clone, Debug)]
pub(crate) struct Delta {
    /// The index of the LoRA in the order added.
    pub(crate) lora: usize,
    factor: f32,
    up: Arc<[f32]>,
    down: Arc<[f32]>,
    rank: usize,
}

impl Delta {
    pub(crate) fn new(lora: usize, user_scale: f32, a: &LoraAdapter) -> Delta {
        Delta { lora, factor: user_scale * a.scale, up: a.up.clone(), down: a.down.clone(), rank: a.rank }
    }

    /// w [out, cols] += factor * up [out, r] · down [r, cols], each row's product summed in f32
    /// and scaled once, as PyTorch's (B @ A) * scaling.
    pub(crate) fn add_to(&self, w: &mut [f32]) {
        let cols = self.down.len() / self.rank;
        let mut row = vec![0.0f32; cols];
        for (o, wrow) in w.chunks_exact_mut(cols).enumerate() {
            row.fill(0.0);
            for k in 0..self.rank {
                let u = self.up[o * self.rank + k];
                for (r, &d) in row.iter_mut().zip(&self.down[k * cols..(k + 1) * cols]) {
                    *r += u * d;
                }
            }
            for (x, &r) in wrow.iter_mut().zip(&row) {
                *x += self.factor * r;
            }
        }
    }
}

/// Alpha settings of an adapter config (`adapter_config.json` or diffusers' metadata).
struct AlphaConfig {
    r: Option<usize>,
    alpha: Option<f64>,
    rank_pattern: Vec<(String, f64)>,
    alpha_pattern: Vec<(String, f64)>,
    rslora: bool,
}

/// The adapter of one module as the keys are gathered: (key, tensor index) per role.
#[derive(Default)]
struct Group {
    down: Option<(String, usize)>,
    up: Option<(String, usize)>,
    alpha: Option<(String, usize)>,
    kohya: bool,
    /// The module path as the file wrote it under its component (what config patterns match).
    pattern_path: String,
}

impl LoraFile {
    /// Opens a LoRA file or PEFT folder and maps it onto `weights` (the model it will be merged
    /// into): every key becomes part of an adapter or goes to [`LoraFile::unknown`].
    pub fn open(path: impl AsRef<Path>, weights: &Weights) -> Result<LoraFile> {
        let path = path.as_ref();
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::model(path, "no such LoRA file or folder; pass a LoRA .safetensors file or a PEFT adapter folder")
            } else {
                Error::Io { path: path.to_path_buf(), source: e }
            }
        })?;
        let (file, config) = if meta.is_dir() {
            let file = path.join("adapter_model.safetensors");
            if !file.is_file() {
                let bin = path.join("adapter_model.bin");
                if bin.is_file() {
                    read_safetensors_file(&bin, "")?; // the pickle refusal, with the conversion
                }
                return Err(Error::model(
                    path,
                    "not a PEFT adapter folder: it has no adapter_model.safetensors; pass a LoRA .safetensors file \
                     or a folder holding adapter_model.safetensors and adapter_config.json",
                ));
            }
            (file, Some(path.join("adapter_config.json")))
        } else {
            let sibling = path.parent().map(|p| p.join("adapter_config.json")).filter(|c| c.is_file());
            let is_peft = path.file_name().is_some_and(|n| n == "adapter_model.safetensors");
            (path.to_path_buf(), sibling.filter(|_| is_peft))
        };
        let peft_config = match &config {
            Some(c) => Some(read_peft_config(c)?),
            None => None,
        };
        let expect = "pass a LoRA .safetensors file or a PEFT adapter folder";
        let (mmap, tensors, file_meta) = read_safetensors_file(&file, expect)?;
        build(path, &mmap, &tensors, &file_meta, peft_config, &ModelNames::new(weights))
    }

    /// Checks that an adapter's change fits a weight of shape `model` (see [`LoraFile::open`]).
    pub(crate) fn check_target(&self, a: &LoraAdapter, model: &[usize]) -> Result<()> {
        check_shape(&self.path, self.te1, a, model)
    }

    /// The file (or folder) name, for messages.
    pub fn name(&self) -> String {
        self.path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| self.path.display().to_string())
    }
}

fn read_peft_config(path: &Path) -> Result<Map<String, Value>> {
    let text = std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            Error::model(path, "the PEFT folder has no adapter_config.json, which gives the adapter's lora_alpha and r; copy it next to adapter_model.safetensors")
        } else {
            Error::Io { path: path.to_path_buf(), source: e }
        }
    })?;
    let v: Value = serde_json::from_slice(&text).map_err(|e| Error::model(path, format!("not valid JSON ({e})")))?;
    let Value::Object(obj) = v else { return Err(Error::model(path, "not a JSON object")) };
    match obj.get("peft_type").and_then(Value::as_str) {
        None | Some("LORA") => Ok(obj),
        Some(t) => Err(Error::model(path, format!("this is a PEFT {t} adapter; {}", ONLY_LORA))),
    }
}

fn alpha_config(obj: &Map<String, Value>, prefix: &str, path: &Path) -> Result<Option<AlphaConfig>> {
    let get = |k: &str| obj.get(&format!("{prefix}{k}"));
    if get("r").is_none() && get("lora_alpha").is_none() {
        return Ok(None);
    }
    if get("use_dora").and_then(Value::as_bool) == Some(true) {
        return Err(Error::model(path, format!("the adapter config has {prefix}use_dora = true: a DoRA adapter; {ONLY_LORA}")));
    }
    let pattern = |k: &str| -> Vec<(String, f64)> {
        get(k).and_then(Value::as_object).map(|m| m.iter().filter_map(|(k, v)| Some((k.clone(), v.as_f64()?))).collect()).unwrap_or_default()
    };
    Ok(Some(AlphaConfig {
        r: get("r").and_then(Value::as_u64).map(|r| r as usize),
        alpha: get("lora_alpha").and_then(Value::as_f64),
        rank_pattern: pattern("rank_pattern"),
        alpha_pattern: pattern("alpha_pattern"),
        rslora: get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
    }))
}

/// PEFT's pattern lookup: the first key that is the module path or a dot-separated suffix of it.
fn pattern_value(patterns: &[(String, f64)], module: &str) -> Option<f64> {
    patterns.iter().find(|(k, _)| module == k || module.ends_with(&format!(".{k}"))).map(|(_, v)| *v)
}

fn values(path: &Path, mmap: &Mmap, t: &RawTensor) -> Result<Vec<f32>> {
    let data = &mmap[t.start..t.end];
    let v: Vec<f32> = match t.dtype {
        Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
        Dtype::F64 => data.chunks_exact(8).map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect(),
        d => {
            return Err(Error::model(path, format!("LoRA tensor {:?} is stored as {d:?}; atelier reads F32, F16, BF16 and F64 LoRAs", t.key)));
        }
    };
    if let Some((i, x)) = v.iter().enumerate().find(|(_, x)| !x.is_finite()) {
        return Err(Error::model(path, format!("LoRA tensor {:?} holds {x} at index {i}: the file is damaged; get it again", t.key)));
    }
    Ok(v)
}

fn build(
    path: &Path,
    mmap: &Mmap,
    tensors: &[RawTensor],
    meta: &HashMap<String, String>,
    peft_config: Option<Map<String, Value>>,
    names: &ModelNames,
) -> Result<LoraFile> {
    refuse(path, tensors, meta)?;
    let te1 = tensors.iter().any(|t| t.key.starts_with("lora_te1_"));
    let mut groups: BTreeMap<String, Group> = BTreeMap::new();
    let mut unknown = Vec::new();
    let mut formats = Vec::new();
    for (i, t) in tensors.iter().enumerate() {
        let Some((module, role, format)) = parse_key(&t.key) else {
            unknown.push(t.key.clone());
            continue;
        };
        let Some(target) = names.resolve(&module) else {
            unknown.push(t.key.clone());
            continue;
        };
        formats.push(if peft_config.is_some() { LoraFormat::Peft } else { format });
        let g = groups.entry(target.clone()).or_default();
        match &module {
            Module::Kohya { .. } => g.kohya = true,
            Module::Path { path, .. } => g.pattern_path = path.clone(),
        }
        let slot = match role {
            Role::Down => &mut g.down,
            Role::Up => &mut g.up,
            Role::Alpha => &mut g.alpha,
        };
        if let Some((other, _)) = slot {
            return Err(Error::model(
                path,
                format!("keys {other:?} and {:?} are both the {role:?} part of the adapter of {target}; the file mixes two LoRAs: re-save it with one", t.key),
            ));
        }
        *slot = Some((t.key.clone(), i));
    }
    if te1 && !unknown.is_empty() {
        return Err(other_family(path, "SDXL", &format!("it has lora_te1_ keys, and key {:?} is not in SD-1.5", unknown[0])));
    }
    let metadata_config = match meta.get("lora_adapter_metadata") {
        Some(s) => match serde_json::from_str::<Value>(s) {
            Ok(Value::Object(o)) => Some(o),
            _ => return Err(Error::model(path, "the metadata lora_adapter_metadata is not a JSON object; the file is damaged")),
        },
        None => None,
    };
    let configs: [(&str, Option<AlphaConfig>); 2] = match (&peft_config, &metadata_config) {
        (Some(c), _) => [("unet.", alpha_config(c, "", path)?), ("text_encoder.", alpha_config(c, "", path)?)],
        (None, Some(m)) => [("unet.", alpha_config(m, "unet.", path)?), ("text_encoder.", alpha_config(m, "text_encoder.", path)?)],
        (None, None) => [("unet.", None), ("text_encoder.", None)],
    };

    let mut adapters = Vec::with_capacity(groups.len());
    for (module, g) in groups {
        let target = format!("{module}.weight");
        let (Some((down_key, di)), Some((up_key, ui))) = (g.down.clone(), g.up.clone()) else {
            let have = g.down.as_ref().or(g.up.as_ref()).or(g.alpha.as_ref()).map(|(k, _)| k.clone()).unwrap_or_default();
            return Err(Error::model(path, format!("the adapter of {target} is incomplete: key {have:?} has no matching {} matrix; the file is damaged", if g.down.is_none() { "down (lora_down / lora_A)" } else { "up (lora_up / lora_B)" })));
        };
        let (ds, us) = (&tensors[di].shape, &tensors[ui].shape);
        let rank = ds.first().copied().unwrap_or(0);
        let well_formed = matches!(ds.len(), 2 | 4) && matches!(us.len(), 2 | 4) && rank > 0 && us[1] == rank;
        if !well_formed {
            return Err(Error::model(path, format!("LoRA key {down_key:?} has shape {ds:?} and {up_key:?} has {us:?}: not a down [r, in(, kh, kw)] / up [out, r(, 1, 1)] pair; the file is damaged")));
        }
        let alpha_tensor = match &g.alpha {
            Some((k, ai)) => {
                let v = values(path, mmap, &tensors[*ai])?;
                if v.len() != 1 {
                    return Err(Error::model(path, format!("alpha {k:?} has shape {:?}, not a single number", tensors[*ai].shape)));
                }
                Some(v[0] as f64)
            }
            None => None,
        };
        let config = configs.iter().find(|(p, _)| target.starts_with(p)).and_then(|(_, c)| c.as_ref()).filter(|_| !g.kohya);
        let r = rank as f64;
        let (alpha, scale) = match config {
            Some(c) => {
                let r_cfg = pattern_value(&c.rank_pattern, &g.pattern_path).or(c.r.map(|r| r as f64));
                if r_cfg.is_some_and(|rc| rc != r) {
                    return Err(Error::model(path, format!("the adapter config gives {} rank {}, but its tensor {down_key:?} has rank {rank}; the file and its config do not belong together", g.pattern_path, r_cfg.unwrap_or(0.0))));
                }
                let a = pattern_value(&c.alpha_pattern, &g.pattern_path).or(c.alpha).unwrap_or(r);
                (a, if c.rslora { a / r.sqrt() } else { a / r })
            }
            None => {
                let a = alpha_tensor.unwrap_or(r);
                (a, a / r)
            }
        };
        let adapter = LoraAdapter {
            target: target.clone(),
            key: down_key,
            rank,
            down: values(path, mmap, &tensors[di])?.into(),
            down_shape: ds.clone(),
            up: values(path, mmap, &tensors[ui])?.into(),
            up_shape: us.clone(),
            alpha: alpha as f32,
            scale: scale as f32,
        };
        check_shape(path, te1, &adapter, &names.modules[&module])?;
        adapters.push(adapter);
    }
    if adapters.is_empty() {
        let shown: Vec<&str> = unknown.iter().take(4).map(String::as_str).collect();
        return Err(Error::model(
            path,
            format!(
                "no key of this file changes a weight of the SD-1.5 model ({} keys, e.g. {}); is it a LoRA for SD-1.5? \
                 atelier reads kohya (lora_unet_*, lora_te_*), diffusers (unet.*.lora_A.weight, .lora.down.weight) \
                 and PEFT (base_model.model.*.lora_A.weight) LoRAs",
                tensors.len(),
                if shown.is_empty() { "none".to_string() } else { shown.join(", ") }
            ),
        ));
    }
    let format = [LoraFormat::Peft, LoraFormat::Kohya, LoraFormat::Diffusers, LoraFormat::DiffusersOld]
        .into_iter()
        .find(|f| formats.contains(f))
        .unwrap_or(LoraFormat::Diffusers);
    Ok(LoraFile { path: path.to_path_buf(), format, adapters, unknown, te1 })
}
