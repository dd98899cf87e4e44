//! Weight files: safetensors in either SD-1.5 layout, read memory-mapped and streamed to the
//! GPU as f16 one tensor at a time, behind one shape-checked API.
//!
//! **Names.** Every tensor is named `<component>.<diffusers key>`, with the component one of
//! `unet`, `vae`, `text_encoder` (the diffusers folder names), e.g.
//! `unet.down_blocks.0.resnets.0.conv1.weight`, `vae.decoder.up_blocks.0.upsamplers.0.conv.weight`,
//! `text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight`.
//!
//! **Layouts.** [`Weights::open`] takes either
//! 1. a diffusers folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, ...), reading
//!    `unet/diffusion_pytorch_model.safetensors`, `vae/diffusion_pytorch_model.safetensors` and
//!    `text_encoder/model.safetensors`, or their `.fp16` variants, or sharded files
//!    (`*.safetensors.index.json`). The plain file is preferred when both exist, as diffusers
//!    does without `variant="fp16"`; [`LoadOptions::prefer_fp16`] picks the fp16 variant
//!    (half the bytes to read; the same values once rounded to f16). Old folders' VAE
//!    attention names (`query`, `key`, `value`, `proj_attn`) are renamed as diffusers does.
//! 2. a single-file original (LDM) checkpoint, `*.safetensors`, whose keys go through the
//!    converter in [`crate::model::convert`]; EMA copies and other unused keys are ignored.
//!
//! PyTorch pickles (`.ckpt`, `.pt`, `.pth`, `.bin`) are refused: unpickling can run code. The
//! message gives a one-line conversion. SD-2.x and SDXL checkpoints are recognised and refused.
//!
//! **Loading.** [`Weights::get`] (or [`Prefix::get`] under a name prefix) checks the shape
//! against what the model expects, converts F32, F16 or BF16 to f16 and uploads it; only the
//! tensor at hand is ever held in RAM. A name that is not in the files does not stop the
//! load: it is recorded, a NaN-filled placeholder of the expected shape is returned, and
//! [`Weights::finish`] — which every loader must call before using the tensors — fails with
//! the full list of missing names; on success it reports the unused names. A wrong shape or
//! an unreadable tensor is an error at once, naming the file, the key and the shapes.
//!
//! **LoRAs.** [`Weights::add_lora`] (before any tensor is read) registers a
//! [`LoraFile`](crate::model::lora_file::LoraFile) with a user scale; every read of a weight it
//! touches, through [`Weights::get_as`] or [`Weights::get_f32`] (so fused and reordered loads
//! too), returns W + scale * alpha/r * up·down, computed in f32 before any f16 rounding. Several
//! LoRAs add up. The load report counts the weights each LoRA changed.
//!
//! **Files.** `open` opens the files (headers checked, pickles refused, the single-file and
//! diffusers layouts found and named); `read` reads one tensor (shape and dtype checks, LoRA
//! changes merged, conversion, upload); `prefix` is the loaders' [`Prefix`] name builder.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use memmap2::Mmap;
use safetensors::Dtype;
use safetensors::tensor::Metadata;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::convert::{self, KeyMap, LdmLayout, TEXT_ENCODER, UNET, VAE};
use crate::model::lora_file::{Delta, LoraFile};

mod open;
mod prefix;
mod read;
pub(crate) use open::{read_safetensors_file, RawTensor};
use open::*;
pub use prefix::Prefix;

/// Options for [`Weights::open_with`].
#[derive(Clone, Debug, Default)]
pub struct LoadOptions {
    /// In a diffusers folder, read the `.fp16` variant files when both exist.
    pub prefer_fp16: bool,
    /// Block structure used to convert single-file (LDM) key names.
    pub layout: LdmLayout,
    /// Run the 3x3 stride-1 convolutions that a model's loader marks (`Prefix::winograd`) by
    /// Winograd F(2x2, 3x3) (`kernels::winograd`): their weights kept transformed instead of
    /// as loaded, or made so before each use where large (`model::layers::ConvForm`). For
    /// inference only: a weight kept transformed has no input gradient (training loads
    /// without it).
    pub winograd: bool,
}

impl LoadOptions {
    /// The options for inference (sampling, `bench --model`): convolutions in Winograd form
    /// where the loaders mark them, unless the environment sets `ATELIER_WINOGRAD=0` (to
    /// compare with the direct convolutions).
    pub fn inference() -> LoadOptions {
        let off = std::env::var("ATELIER_WINOGRAD").is_ok_and(|v| v == "0");
        LoadOptions { winograd: !off, ..Default::default() }
    }
}

/// Which layout the weights came in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    /// A diffusers folder.
    Diffusers,
    /// A single-file original (LDM) checkpoint.
    SingleFile,
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Diffusers => "diffusers folder",
            Format::SingleFile => "single-file checkpoint",
        })
    }
}

/// The components, with their diffusers folder, weight file stem and LDM key prefix.
const COMPONENTS: [(&str, &str, &str, &str); 3] = [
    (UNET, "diffusion_pytorch_model", convert::LDM_UNET, "UNet"),
    (VAE, "diffusion_pytorch_model", convert::LDM_VAE, "VAE"),
    (TEXT_ENCODER, "model", convert::LDM_CLIP, "CLIP text encoder"),
];

/// The safetensors crate's limit on header size.
const MAX_HEADER: u64 = 100_000_000;
/// Queued uploads are flushed to the GPU (and their staging memory freed) every this many bytes.
const FLUSH_BYTES: u64 = 256 << 20;

/// An open weight file.
struct SourceFile {
    path: PathBuf,
    mmap: Mmap,
}

/// One tensor of a file under its atelier name.
struct Entry {
    file: usize,
    /// The key in the file.
    key: String,
    dtype: Dtype,
    /// Shape as stored in the file.
    file_shape: Vec<usize>,
    /// Shape as atelier sees it (differs only for squeezed 1x1-conv weights).
    shape: Vec<usize>,
    /// Byte range in the file.
    start: usize,
    end: usize,
}

#[derive(Default)]
struct State {
    used: HashSet<String>,
    /// Per LoRA (in the order added): the weights read with its change merged.
    merged: Vec<HashSet<String>>,
    missing: Vec<String>,
    bytes: u64,
    since_flush: u64,
}

/// The weights of one SD-1.5 model, memory-mapped; see the module docs.
pub struct Weights {
    path: PathBuf,
    format: Format,
    files: Vec<SourceFile>,
    entries: BTreeMap<String, Entry>,
    /// Tensors in the files that have no atelier name (EMA copies, schedule buffers, ...).
    ignored: usize,
    /// The block structure the names were converted with (also names kohya LoRA keys).
    layout: LdmLayout,
    /// [`LoadOptions::winograd`].
    winograd: bool,
    /// LoRAs added, in order: (file, user scale, weights it changes).
    loras: Vec<(PathBuf, f32, usize)>,
    /// Atelier name -> the LoRA changes merged into it when it is read.
    deltas: HashMap<String, Vec<Delta>>,
    state: Mutex<State>,
}

impl fmt::Debug for Weights {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Weights")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("tensors", &self.entries.len())
            .field("ignored", &self.ignored)
            .finish()
    }
}

/// What [`Weights::finish`] found.
#[derive(Clone, Debug)]
pub struct LoadReport {
    /// Distinct tensors loaded.
    pub loaded: usize,
    /// Bytes uploaded to the GPU.
    pub bytes: u64,
    /// Names in the files that were never asked for.
    pub unused: Vec<String>,
    /// Tensors in the files with no atelier name (EMA copies and the like).
    pub ignored: usize,
    /// The LoRAs merged, in the order added.
    pub loras: Vec<LoraMerge>,
}

/// What one LoRA changed, in a [`LoadReport`].
#[derive(Clone, Debug)]
pub struct LoraMerge {
    /// The LoRA file (or PEFT folder).
    pub path: PathBuf,
    /// The user scale it was added with.
    pub scale: f32,
    /// Weights it has a change for.
    pub targets: usize,
    /// Of those, the weights the model loaded (with the change merged).
    pub merged: usize,
}

impl fmt::Display for LoadReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "loaded {} tensors ({:.1} MiB on the GPU)", self.loaded, self.bytes as f64 / 1048576.0)?;
        if !self.unused.is_empty() {
            let shown: Vec<&str> = self.unused.iter().take(5).map(String::as_str).collect();
            let more = if self.unused.len() > 5 { ", ..." } else { "" };
            write!(f, "; {} unused: {}{more}", self.unused.len(), shown.join(", "))?;
        }
        if self.ignored > 0 {
            write!(f, "; {} keys of the file ignored (EMA copies and the like)", self.ignored)?;
        }
        for l in &self.loras {
            let name = l.path.file_name().map(|n| n.to_string_lossy()).unwrap_or_default();
            write!(f, "; LoRA {name} (scale {}): {} of {} weights merged", l.scale, l.merged, l.targets)?;
        }
        Ok(())
    }
}

impl Weights {
    /// Opens a diffusers folder or a single `.safetensors` checkpoint with default options.
    pub fn open(path: impl AsRef<Path>) -> Result<Weights> {
        Weights::open_with(path, &LoadOptions::default())
    }

    /// Opens a diffusers folder or a single `.safetensors` checkpoint.
    pub fn open_with(path: impl AsRef<Path>, opts: &LoadOptions) -> Result<Weights> {
        let mut path = path.as_ref();
        // A diffusers folder named by its model_index.json.
        if path.file_name().is_some_and(|n| n == "model_index.json") && path.is_file() {
            path = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        }
        let meta = std::fs::metadata(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::model(
                    path,
                    "no such file or folder; pass an SD-1.5 diffusers folder (holding model_index.json) \
                     or a single .safetensors checkpoint",
                )
            } else {
                Error::Io { path: path.to_path_buf(), source: e }
            }
        })?;
        let mut w = if meta.is_dir() { open_diffusers(path, opts)? } else { open_single(path, opts)? };
        w.layout = opts.layout.clone();
        check_family(&w)?;
        Ok(w)
    }

    /// The folder or file the weights were opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The layout the weights came in.
    pub fn format(&self) -> Format {
        self.format
    }

    /// The files read.
    pub fn files(&self) -> Vec<&Path> {
        self.files.iter().map(|f| f.path.as_path()).collect()
    }

    /// Number of named tensors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True if no tensor has an atelier name.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// All atelier names, sorted.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// True if the files hold a tensor of this name.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    /// True if the files hold any tensor of a component (`unet`, `vae`, `text_encoder`).
    pub fn has_component(&self, component: &str) -> bool {
        let p = format!("{component}.");
        self.entries.range(p.clone()..).next().is_some_and(|(k, _)| k.starts_with(&p))
    }

    /// The shape of a tensor as atelier sees it.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.entries.get(name).map(|e| e.shape.as_slice())
    }

    /// The file and the key in it that a name comes from.
    pub fn source(&self, name: &str) -> Option<(&Path, &str)> {
        self.entries.get(name).map(|e| (self.files[e.file].path.as_path(), e.key.as_str()))
    }

    /// Tensors in the files that have no atelier name (EMA copies and the like).
    pub fn ignored(&self) -> usize {
        self.ignored
    }

    /// The block structure single-file names were converted with.
    pub fn layout(&self) -> &LdmLayout {
        &self.layout
    }

    /// Whether convolutions the loaders mark are kept in Winograd form ([`LoadOptions::winograd`]).
    pub fn winograd(&self) -> bool {
        self.winograd
    }

    /// Registers a LoRA, opened for these weights by [`LoraFile::open`], to be merged with the
    /// user scale `scale` into every weight it changes as that weight is read:
    /// W' = W + scale * alpha/r * up·down. Call it before loading the model (an error once any
    /// tensor was read); LoRAs added one after another add up. Every target must be a weight of
    /// these files with the shape the LoRA's matrices give (errors name the key and both shapes).
    pub fn add_lora(&mut self, lora: &LoraFile, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(Error::Usage(format!("the scale of LoRA {} is {scale}; give a finite number", lora.path.display())));
        }
        if !self.state().used.is_empty() {
            return Err(Error::Usage(format!(
                "LoRA {} added after the model started loading; add LoRAs right after opening the weights",
                lora.path.display()
            )));
        }
        let index = self.loras.len();
        let mut deltas = Vec::with_capacity(lora.adapters.len());
        for a in &lora.adapters {
            let Some(e) = self.entries.get(&a.target) else {
                return Err(Error::model(
                    &lora.path,
                    format!(
                        "LoRA key {:?} changes {}, which is not in the model {}; open the LoRA for the model it is                          merged into",
                        a.key,
                        a.target,
                        self.path.display()
                    ),
                ));
            };
            lora.check_target(a, &e.shape)?;
            deltas.push((a.target.clone(), Delta::new(index, scale, a)));
        }
        for (target, d) in deltas {
            self.deltas.entry(target).or_default().push(d);
        }
        self.loras.push((lora.path.clone(), scale, lora.adapters.len()));
        self.state().merged.push(HashSet::new());
        Ok(())
    }

    /// The LoRAs added: (file, user scale, number of weights each changes).
    pub fn loras(&self) -> &[(PathBuf, f32, usize)] {
        &self.loras
    }

    /// A name prefix builder: `weights.prefix(gpu, "unet.down_blocks.0").get("resnets.0.conv1.weight", ..)`.
    pub fn prefix<'a>(&'a self, gpu: &'a Gpu, prefix: &str) -> Prefix<'a> {
        Prefix { weights: self, gpu, prefix: prefix.trim_end_matches('.').to_string(), winograd: false }
    }

    /// Names asked for so far that the files do not hold.
    pub fn missing(&self) -> Vec<String> {
        self.state().missing.clone()
    }

    /// Ends a load: an error listing every missing name if any was asked for, else a report
    /// with the names never asked for.
    pub fn finish(&self) -> Result<LoadReport> {
        let st = self.state();
        if !st.missing.is_empty() {
            return Err(Error::model(&self.path, self.missing_message(&st.missing)));
        }
        Ok(LoadReport {
            loaded: st.used.len(),
            bytes: st.bytes,
            unused: self.entries.keys().filter(|k| !st.used.contains(*k)).cloned().collect(),
            ignored: self.ignored,
            loras: self
                .loras
                .iter()
                .zip(&st.merged)
                .map(|((path, scale, targets), merged)| LoraMerge {
                    path: path.clone(),
                    scale: *scale,
                    targets: *targets,
                    merged: merged.len(),
                })
                .collect(),
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn missing_message(&self, missing: &[String]) -> String {
        let mut sorted = missing.to_vec();
        sorted.sort();
        let mut s = format!(
            "{} weight tensor{} the SD-1.5 model needs {} not in the {}:\n",
            sorted.len(),
            if sorted.len() == 1 { "" } else { "s" },
            if sorted.len() == 1 { "is" } else { "are" },
            self.format
        );
        for m in &sorted {
            s += &format!("  {m}\n");
        }
        for (comp, stem, ldm, what) in COMPONENTS {
            let p = format!("{comp}.");
            if !sorted.iter().any(|m| m.starts_with(&p)) || self.has_component(comp) {
                continue;
            }
            s += &match self.format {
                Format::Diffusers => {
                    format!("The folder has no {what} weights ({comp}/{stem}.safetensors).\n")
                }
                Format::SingleFile => format!(
                    "The file has no {what} weights at all (keys {ldm}*); it may hold only part of a model.\n"
                ),
            };
        }
        s += "Use a complete SD-1.5 checkpoint (a diffusers folder or a single .safetensors file) or a model \
              fine-tuned from SD-1.5.";
        s
    }
}
