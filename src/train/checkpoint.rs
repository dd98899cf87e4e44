//! Training checkpoints: a folder `checkpoint-NNNNNN` in the run's output folder holding the
//! LoRA file (the format asked for) and `state.safetensors`: the f32 adapters, AdamW's two
//! moments (flat, in the layout of [`LoraParams`]; the text encoder's as `te_params`,
//! `te_adam_m`, `te_adam_v` when it trains) and, in the metadata key `atelier_state`,
//! the step, the loss scale and what the run was started with (to refuse resuming a
//! different run). Every other random choice of a step is drawn from (seed, step), so this is
//! the whole state: a resumed run continues exactly.
//!
//! Written atomically: the folder is filled under a `.partial` name, then renamed; a crash at
//! any moment leaves the earlier checkpoints whole and at most a `.partial` folder, which the
//! next save or resume removes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::model::lora::LoraParams;

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainState {
    pub version: u32,
    /// Optimizer steps done.
    pub step: usize,
    pub loss_scale: f32,
    /// The run's settings that must match to resume (see `trainer::RunIdentity`).
    pub identity: serde_json::Value,
    /// Adapter names and flat offsets, checked on resume.
    pub layers: Vec<(String, usize, usize)>,
    pub total: usize,
    /// The text encoder's adapters, when it trains (absent in older checkpoints: none).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub te_layers: Vec<(String, usize, usize)>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub te_total: usize,
}

fn is_zero(x: &usize) -> bool {
    *x == 0
}

/// The adapters' names and flat offsets, as [`TrainState::layers`] records them.
pub fn layers(lora: &LoraParams) -> Vec<(String, usize, usize)> {
    lora.layers.iter().map(|l| (l.spec.name.clone(), l.off_a, l.off_b)).collect()
}

/// The folder name of the checkpoint after `step` steps.
pub fn dir_name(step: usize) -> String {
    format!("checkpoint-{step:06}")
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |e| Error::io(path, e)
}

/// Writes a checkpoint into `out/checkpoint-<step>`: `write_lora` writes the LoRA file into
/// the folder it is given; then the state. Returns the folder.
pub fn save(gpu: &Gpu, out: &Path, lora: &LoraParams, te: Option<&LoraParams>, state: &TrainState, write_lora: impl FnOnce(&Path) -> Result<()>) -> Result<PathBuf> {
    let dir = out.join(dir_name(state.step));
    let tmp = out.join(format!("{}.partial", dir_name(state.step)));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;
    let result = (|| {
        write_lora(&tmp)?;
        let (p, m, v) = (lora.params.to_f32(gpu)?, lora.m.to_f32(gpu)?, lora.v.to_f32(gpu)?);
        fn view(x: &[f32]) -> TensorView<'_> {
            TensorView::new(Dtype::F32, vec![x.len()], bytemuck::cast_slice(x)).expect("flat f32")
        }
        let meta = HashMap::from([("atelier_state".to_string(), serde_json::to_string(state).expect("state serialises"))]);
        let path = tmp.join("state.safetensors");
        let te = match te {
            Some(t) => Some((t.params.to_f32(gpu)?, t.m.to_f32(gpu)?, t.v.to_f32(gpu)?)),
            None => None,
        };
        let mut tensors = vec![("params", view(&p)), ("adam_m", view(&m)), ("adam_v", view(&v))];
        if let Some((tp, tm, tv)) = &te {
            tensors.extend([("te_params", view(tp)), ("te_adam_m", view(tm)), ("te_adam_v", view(tv))]);
        }
        safetensors::serialize_to_file(tensors, Some(meta), &path)
            .map_err(|e| match e {
                safetensors::SafeTensorError::IoError(e) => Error::io(&path, e),
                e => Error::Usage(format!("writing {}: {e}", path.display())),
            })?;
        // On the disk before the folder gets its final name.
        std::fs::File::open(&path).and_then(|f| f.sync_all()).map_err(io(&path))?;
        Ok(())
    })();
    if let Err(e) = result {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if dir.exists() {
        let old = out.join(format!("{}.old", dir_name(state.step)));
        std::fs::rename(&dir, &old).map_err(io(&dir))?;
        std::fs::rename(&tmp, &dir).map_err(io(&tmp))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, &dir).map_err(io(&tmp))?;
    }
    Ok(dir)
}

/// Tidies what an interrupted save may have left in `out`: `checkpoint-*.partial` folders are
/// removed; a `checkpoint-*.old` folder (a checkpoint being replaced) gets its name back
/// when the new one never got it, else is removed. Final names are only given to whole folders.
pub fn clean(out: &Path) {
    for e in std::fs::read_dir(out).into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        if !name.starts_with("checkpoint-") {
            continue;
        }
        if name.ends_with(".partial") {
            let _ = std::fs::remove_dir_all(e.path());
        } else if let Some(base) = name.strip_suffix(".old") {
            let whole = out.join(base);
            if whole.exists() {
                let _ = std::fs::remove_dir_all(e.path());
            } else {
                let _ = std::fs::rename(e.path(), whole);
            }
        }
    }
}

/// The checkpoint folders in `out`, by step.
pub fn list(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v: Vec<(usize, PathBuf)> = std::fs::read_dir(out)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().to_string();
            let step = name.strip_prefix("checkpoint-")?.parse::<usize>().ok()?;
            e.path().join("state.safetensors").is_file().then(|| (step, e.path()))
        })
        .collect();
    v.sort();
    v
}

/// `--resume DIR` or `--resume latest` (the newest checkpoint in `out`).
pub fn resolve(out: &Path, resume: &str) -> Result<PathBuf> {
    if resume == "latest" {
        return list(out).pop().map(|(_, p)| p).ok_or_else(|| {
            Error::Usage(format!("--resume latest: no checkpoint in {} (checkpoint-NNNNNN folders with state.safetensors)", out.display()))
        });
    }
    let p = PathBuf::from(resume);
    if p.join("state.safetensors").is_file() {
        Ok(p)
    } else {
        Err(Error::Usage(format!("--resume {resume}: not a checkpoint folder (it has no state.safetensors)")))
    }
}

/// Reads a checkpoint's state and loads its adapters and moments into `lora` and, when the
/// text encoder trains, `te` (whose layouts must match). Returns the state.
pub fn load(gpu: &Gpu, dir: &Path, lora: &LoraParams, te: Option<&LoraParams>) -> Result<TrainState> {
    let path = dir.join("state.safetensors");
    let bytes = std::fs::read(&path).map_err(io(&path))?;
    let bad = |why: String| Error::model(&path, format!("{why}: the checkpoint is damaged or not atelier's"));
    let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(e.to_string()))?;
    let text = meta.metadata().as_ref().and_then(|m| m.get("atelier_state")).ok_or_else(|| bad("no atelier_state metadata".into()))?;
    let state: TrainState = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
    if state.total != lora.total || state.layers != layers(lora) {
        return Err(Error::Usage(format!(
            "{}: its adapters ({} values) do not match this run's ({} values): resume with the same --rank, --targets and model",
            dir.display(),
            state.total,
            lora.total
        )));
    }
    let (te_total, te_layers) = te.map(|t| (t.total, layers(t))).unwrap_or_default();
    if state.te_total != te_total || state.te_layers != te_layers {
        return Err(Error::Usage(format!(
            "{}: its text-encoder adapters ({} values) do not match this run's ({te_total} values): resume with the same --train-text-encoder and --rank",
            dir.display(),
            state.te_total
        )));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(e.to_string()))?;
    let get = |name: &str| -> Result<Vec<f32>> {
        let t = st.tensor(name).map_err(|_| bad(format!("no tensor {name}")))?;
        let total = if name.starts_with("te_") { state.te_total } else { state.total };
        if t.dtype() != Dtype::F32 || t.shape() != [total] {
            return Err(bad(format!("{name} is {:?} {:?}", t.dtype(), t.shape())));
        }
        Ok(t.data().chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    lora.write_params(gpu, &get("params")?)?;
    lora.m.write_f32(gpu, &get("adam_m")?)?;
    lora.v.write_f32(gpu, &get("adam_v")?)?;
    lora.zero_grads(gpu);
    if let Some(t) = te {
        t.write_params(gpu, &get("te_params")?)?;
        t.m.write_f32(gpu, &get("te_adam_m")?)?;
        t.v.write_f32(gpu, &get("te_adam_v")?)?;
        t.zero_grads(gpu);
    }
    Ok(state)
}
