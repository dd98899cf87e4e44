//! LoRA key names: what module and part (down, up, alpha) each key of a LoRA file is, the
//! table of the model's module names (with kohya's underscore spellings, diffusers and LDM
//! paths) they are looked up in, and the refusals: LyCORIS variants, other model families, and
//! adapters whose shapes do not fit the model. Used by [`crate::model::lora_file`].

use std::collections::HashMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::model::convert::{KeyMap, LDM_UNET};
use crate::model::lora_file::{LoraAdapter, LoraFormat};
use crate::model::weights::{RawTensor, Weights};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Role {
    Down,
    Up,
    Alpha,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Comp {
    Unet,
    TextEncoder,
    /// No component prefix: the UNet first, then the text encoder.
    Any,
}

/// Where a key's module is, before it is looked up in the model.
pub(super) enum Module {
    /// The name after `lora_unet_` / `lora_te_`.
    Kohya { te: bool, name: String },
    /// A dotted path under a component.
    Path { comp: Comp, path: String },
}

/// The model's weights a LoRA can change, and the kohya names of their modules.
pub(super) struct ModelNames {
    /// Module (atelier name without `.weight`) -> weight shape: UNet and text encoder, 2+ dims.
    pub(super) modules: HashMap<String, Vec<usize>>,
    /// (is text encoder, kohya name) -> module; `None` where two modules give one name.
    kohya: HashMap<(bool, String), Option<String>>,
}

impl ModelNames {
    pub(super) fn new(w: &Weights) -> ModelNames {
        let map = KeyMap::new(w.layout());
        let mut names = ModelNames { modules: HashMap::new(), kohya: HashMap::new() };
        for name in w.names() {
            let (Some(shape), Some(module)) = (w.shape(name), name.strip_suffix(".weight")) else { continue };
            if shape.len() < 2 {
                continue;
            }
            let mut add = |te: bool, path: &str| {
                let slot = names.kohya.entry((te, path.replace('.', "_"))).or_insert_with(|| Some(module.to_string()));
                if slot.as_deref() != Some(module) {
                    *slot = None;
                }
            };
            if let Some(p) = module.strip_prefix("unet.") {
                add(false, p);
                if let Some(ldm) = map.to_ldm(name) {
                    add(false, ldm.trim_start_matches(LDM_UNET).trim_end_matches(".weight"));
                }
            } else if let Some(p) = module.strip_prefix("text_encoder.") {
                add(true, p);
                if let Some(q) = p.strip_prefix("text_model.") {
                    add(true, q);
                }
            } else {
                continue;
            }
            names.modules.insert(module.to_string(), shape.to_vec());
        }
        names
    }

    /// The module a key's module spec names in this model.
    pub(super) fn resolve(&self, m: &Module) -> Option<String> {
        let te = |p: &str| {
            if p.starts_with("text_model.") { format!("text_encoder.{p}") } else { format!("text_encoder.text_model.{p}") }
        };
        match m {
            Module::Kohya { te, name } => self.kohya.get(&(*te, name.clone())).cloned().flatten(),
            Module::Path { comp, path } => {
                let cands = match comp {
                    Comp::Unet => vec![format!("unet.{path}")],
                    Comp::TextEncoder => vec![te(path)],
                    Comp::Any => vec![format!("unet.{path}"), te(path)],
                };
                cands.into_iter().find(|c| self.modules.contains_key(c))
            }
        }
    }
}

pub(super) const ONLY_LORA: &str = "atelier supports plain LoRA and LoCon only (lora_down/lora_up or lora_A/lora_B pairs, \
                         with alpha): convert or re-extract it as a plain LoRA";

pub(super) fn other_family(path: &Path, family: &str, why: &str) -> Error {
    Error::model(
        path,
        format!(
            "this LoRA was made for {family} ({why}); atelier runs Stable Diffusion 1.5 (and models fine-tuned from \
             it) only: use a LoRA trained for SD-1.5"
        ),
    )
}

/// Refuses other model families and LyCORIS variants by metadata and key names.
pub(super) fn refuse(path: &Path, tensors: &[RawTensor], meta: &HashMap<String, String>) -> Result<()> {
    let arch = [meta.get("ss_base_model_version"), meta.get("modelspec.architecture")];
    for a in arch.into_iter().flatten() {
        let l = a.to_ascii_lowercase();
        if l.contains("sdxl") || l.contains("-xl") {
            return Err(other_family(path, "SDXL", &format!("its metadata says {a:?}")));
        }
        if l.starts_with("sd_v2") || l.contains("stable-diffusion-v2") {
            return Err(other_family(path, "Stable Diffusion 2.x", &format!("its metadata says {a:?}")));
        }
    }
    if meta.get("ss_v2").is_some_and(|v| v.eq_ignore_ascii_case("true")) {
        return Err(other_family(path, "Stable Diffusion 2.x", "its metadata says ss_v2 = True"));
    }
    for t in tensors {
        let k = t.key.as_str();
        if k.starts_with("lora_te2_") || k.starts_with("text_encoder_2.") {
            return Err(other_family(path, "SDXL", &format!("key {k:?} is for a second text encoder")));
        }
        if k.contains("add_embedding") || k.contains("label_emb") {
            return Err(other_family(path, "SDXL", &format!("key {k:?} is for the added size/class embedding")));
        }
    }
    const VARIANTS: [(&str, &str); 11] = [
        ("hada_", "LoHa"),
        ("lokr_", "LoKr"),
        ("dora_scale", "DoRA"),
        ("lora_magnitude_vector", "DoRA"),
        ("lora_mid", "LoCon with a Tucker core (lora_mid)"),
        (".oft_", "OFT"),
        ("boft_", "BOFT"),
        ("lora_embedding_", "LoRA of an embedding table"),
        (".on_input", "(IA)3"),
        ("lora_B.bias", "LoRA with a bias"),
        ("lora_up.bias", "LoRA with a bias"),
    ];
    for t in tensors {
        let k = t.key.as_str();
        let what = VARIANTS.iter().find(|(m, _)| k.contains(m)).map(|(_, w)| *w).or_else(|| {
            let tail = k.rsplit('.').next().unwrap_or("");
            match tail {
                "diff" | "diff_b" => Some("a full weight difference (.diff)"),
                _ if k.starts_with("lora_unet_") || k.starts_with("lora_te") => {
                    let rest = k.split_once('.').map(|(_, r)| r).unwrap_or("");
                    (!matches!(rest, "lora_down.weight" | "lora_up.weight" | "alpha"))
                        .then_some("not a plain LoRA/LoCon tensor (LyCORIS?)")
                }
                _ => None,
            }
        });
        if let Some(what) = what {
            return Err(Error::model(path, format!("key {k:?}: {what}; {ONLY_LORA}")));
        }
    }
    Ok(())
}

/// A key's module and role, or `None` if it is not a LoRA tensor atelier knows.
pub(super) fn parse_key(key: &str) -> Option<(Module, Role, LoraFormat)> {
    use Role::*;
    for (prefix, te) in [("lora_unet_", false), ("lora_te_", true), ("lora_te1_", true)] {
        if let Some(rest) = key.strip_prefix(prefix) {
            let (name, tail) = rest.split_once('.')?;
            let role = match tail {
                "lora_down.weight" => Down,
                "lora_up.weight" => Up,
                "alpha" => Alpha,
                _ => return None,
            };
            return Some((Module::Kohya { te, name: name.to_string() }, role, LoraFormat::Kohya));
        }
    }
    const SUFFIXES: [(&str, Role, LoraFormat); 7] = [
        (".lora_A.weight", Down, LoraFormat::Diffusers),
        (".lora_B.weight", Up, LoraFormat::Diffusers),
        (".lora.down.weight", Down, LoraFormat::DiffusersOld),
        (".lora.up.weight", Up, LoraFormat::DiffusersOld),
        (".lora_linear_layer.down.weight", Down, LoraFormat::DiffusersOld),
        (".lora_linear_layer.up.weight", Up, LoraFormat::DiffusersOld),
        (".alpha", Alpha, LoraFormat::DiffusersOld),
    ];
    let (mut path, role, mut format) = match SUFFIXES.iter().find(|(s, _, _)| key.ends_with(s)) {
        Some((s, role, format)) => (key[..key.len() - s.len()].to_string(), *role, *format),
        None => {
            // The attention-processor layout: <attn>.processor.to_q_lora.down.weight (UNet),
            // <layer>.self_attn.to_q_lora.down.weight (text encoder).
            let (stem, role) = key.strip_suffix(".down.weight").map(|s| (s, Down)).or_else(|| key.strip_suffix(".up.weight").map(|s| (s, Up)))?;
            let (parent, proj) = stem.rsplit_once('.')?;
            let te = parent.ends_with("self_attn");
            let to = match (proj, te) {
                ("to_q_lora", false) => "to_q",
                ("to_k_lora", false) => "to_k",
                ("to_v_lora", false) => "to_v",
                ("to_out_lora", false) => "to_out.0",
                ("to_q_lora", true) => "q_proj",
                ("to_k_lora", true) => "k_proj",
                ("to_v_lora", true) => "v_proj",
                ("to_out_lora", true) => "out_proj",
                _ => return None,
            };
            (format!("{}.{to}", parent.strip_suffix(".processor").unwrap_or(parent)), role, LoraFormat::DiffusersOld)
        }
    };
    let comp = if let Some(p) = path.strip_prefix("unet.") {
        path = p.to_string();
        Comp::Unet
    } else if let Some(p) = path.strip_prefix("text_encoder.") {
        path = p.to_string();
        Comp::TextEncoder
    } else if let Some(p) = path.strip_prefix("base_model.model.") {
        path = p.to_string();
        format = LoraFormat::Peft;
        Comp::Any
    } else {
        Comp::Any
    };
    Some((Module::Path { comp, path }, role, format))
}

/// The family a LoRA's widths belong to, where they are not SD-1.5's.
fn family_of(a: &LoraAdapter) -> Option<(&'static str, String)> {
    let (inp, out) = (a.down_shape[1], a.up_shape[0]);
    let why = format!("key {:?} changes {} with in-features {inp}", a.key, a.target);
    if a.target.contains(".attn2.to_k.") || a.target.contains(".attn2.to_v.") {
        return match inp {
            2048 | 1280 => Some(("SDXL", format!("{why}: SDXL's text context width"))),
            1024 => Some(("Stable Diffusion 2.x", format!("{why}: SD-2's text context width"))),
            _ => None,
        };
    }
    if a.target.starts_with("text_encoder.") {
        return match (inp, out) {
            (1024 | 4096, _) | (_, 1024) => Some(("Stable Diffusion 2.x", format!("{why}: an OpenCLIP ViT-H text encoder"))),
            (1280 | 5120, _) | (_, 1280) => Some(("SDXL", format!("{why}: an OpenCLIP ViT-bigG text encoder"))),
            _ => None,
        };
    }
    None
}

/// Checks that an adapter's matrices give a change of the weight's shape `model`: down
/// [r, in(, kh, kw)] and up [out, r(, 1, 1)], where a 1x1 convolution and a linear layer are
/// the same thing. A mismatch that another model family explains says so.
pub(super) fn check_shape(path: &Path, te1: bool, a: &LoraAdapter, model: &[usize]) -> Result<()> {
    let ones = |s: &[usize]| s.iter().all(|&d| d == 1);
    let (ds, us) = (&a.down_shape, &a.up_shape);
    let fits = model.len() >= 2
        && us[0] == model[0]
        && us[1] == a.rank
        && ones(&us[2..])
        && ds[0] == a.rank
        && ds[1] == model[1]
        && (ds[2..] == model[2..] || (ones(&ds[2..]) && ones(&model[2..])))
        && a.down.len() == ds.iter().product::<usize>()
        && a.up.len() == us.iter().product::<usize>();
    if fits {
        return Ok(());
    }
    if let Some((family, why)) = family_of(a) {
        return Err(other_family(path, family, &why));
    }
    if te1 {
        return Err(other_family(path, "SDXL", &format!("it has lora_te1_ keys, and key {:?} does not fit SD-1.5", a.key)));
    }
    let kernel: String = ds[2..].iter().map(|d| format!(", {d}")).collect();
    Err(Error::model(
        path,
        format!(
            "LoRA key {:?} (down {ds:?}, up {us:?}) changes {} by a [{}, {}{kernel}] matrix, but the model's weight has \
             shape {model:?}; the LoRA was made for another model: use a LoRA trained for SD-1.5",
            a.key, a.target, us[0], ds[1]
        ),
    ))
}
