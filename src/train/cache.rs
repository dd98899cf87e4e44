//! The on-disk cache of `atelier train --cache-dir DIR`: each image's VAE encoding and each
//! caption's text embedding, kept between runs so a second run (another rank, learning rate
//! or seed on the same images) skips the encoders. The folder is the user's: it can be shared
//! by several runs and deleted at any time; the dataset is never written to.
//!
//! **Files.** `DIR/latents/<hash>.safetensors` holds one image in one orientation: tensors
//! `mean` and `std`, f16 [h/8, w/8, 4] (NHWC), exactly the VAE encoder's outputs (they are
//! f16 on the GPU, so f16 loses nothing and halves the files). The sample the trainer uses,
//! mean + std·noise with the noise drawn from (--seed, image), is made from them at each
//! run by the same two GPU kernels as the encoder's ([`SamplePlan`]), so a cached run trains
//! bit for bit as an uncached one, whatever its seed. `DIR/text/<hash>.safetensors` holds one
//! caption's embedding, `embedding`, f32 [77, hidden].
//!
//! **Keys.** A file's name is a SHA-256 of its key, a JSON text also stored in the file's
//! metadata (`atelier_cache_key`) and compared on read: for latents, a hash of the image
//! file's bytes (an edited image gets a new entry, a moved one keeps its own), the prepared
//! size, the crop (center; random crops are encoded at each use and never cached) and the
//! flip; for text, the caption and the CLIP layers skipped; for both, the identity of the
//! weights (the model path and each weight file's name, size and modification time), the GPU,
//! driver and kernel path (their rounding differs, and the cache must not change a run's
//! result), atelier's version and the cache format.
//!
//! **Failures.** A file that cannot be parsed, holds other shapes or non-finite values, or
//! answers another key is reported and encoded again (and rewritten); a cache that cannot be
//! written is reported once, and the run goes on without writing to it. Files are written to
//! a temporary name and renamed, so a crash never leaves a half-written entry.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Plan, PlanBuilder, Tensor};
use crate::kernels::elementwise::{self, Binary};
use crate::rng::Rng;

/// Bumped whenever what a cache file holds, or how it is computed, changes.
const FORMAT: u32 = 1;
const KEY: &str = "atelier_cache_key";

/// What one run did with the cache, for its closing message.
#[derive(Clone, Copy, Debug, Default)]
pub struct Stats {
    pub latents_read: usize,
    /// Encoded for want of an entry (and given to the cache)...
    pub latents_encoded: usize,
    /// ... and of those, stored.
    pub latents_written: usize,
    pub text_read: usize,
    pub text_encoded: usize,
    pub text_written: usize,
    /// Damaged files encoded again.
    pub repaired: usize,
}

/// The cache folder of one run.
pub struct DiskCache {
    dir: PathBuf,
    /// Key parts shared by every latent / text entry.
    vae: String,
    text: String,
    /// Whether latents are cached (not with random crops).
    pub latents: bool,
    /// Turned off, with a warning, by the first failed write.
    writable: bool,
    pub stats: Stats,
}

/// The identity of a model's weights for the cache: the model path and each file's name,
/// size and modification time (nanoseconds), for a single file or for the named subfolders of
/// a diffusers folder.
pub fn model_identity(model: &Path, parts: &[&str]) -> Result<String> {
    let canon = std::fs::canonicalize(model).map_err(|e| Error::io(model, e))?;
    let stamp = |p: &Path| -> Result<String> {
        let m = std::fs::metadata(p).map_err(|e| Error::io(p, e))?;
        let t = m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_nanos());
        Ok(format!("{}:{}:{t}", p.strip_prefix(&canon).unwrap_or(p).display(), m.len()))
    };
    if !canon.is_dir() {
        return Ok(format!("{}|{}", canon.display(), stamp(&canon)?));
    }
    let mut files = Vec::new();
    for part in parts {
        let mut stack = vec![canon.join(part)];
        while let Some(d) = stack.pop() {
            let Ok(rd) = std::fs::read_dir(&d) else { continue };
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() { stack.push(p) } else { files.push(p) }
            }
        }
    }
    files.sort();
    let stamps = files.iter().map(|p| stamp(p)).collect::<Result<Vec<_>>>()?;
    Ok(format!("{}|{}", canon.display(), stamps.join("|")))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The values of an f16 or f32 tensor with the given shape, or why not.
fn values(st: &SafeTensors, name: &str, dtype: Dtype, shape: &[usize]) -> std::result::Result<Vec<f32>, String> {
    let t = st.tensor(name).map_err(|_| format!("no tensor {name}"))?;
    if t.dtype() != dtype || t.shape() != shape {
        return Err(format!("{name} is {:?} {:?}, not {dtype:?} {shape:?}", t.dtype(), t.shape()));
    }
    let v: Vec<f32> = match dtype {
        Dtype::F16 => t.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect(),
        _ => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
    };
    if v.iter().any(|x| !x.is_finite()) {
        return Err(format!("{name} holds NaN or infinite values"));
    }
    Ok(v)
}

impl DiskCache {
    /// Opens (creating) `dir` for a run of `model` on `gpu`; `latents` false caches text only.
    pub fn open(dir: &Path, model: &Path, gpu: &Gpu, latents: bool) -> Result<DiskCache> {
        for sub in ["latents", "text"] {
            crate::images::check_writable_dir(&dir.join(sub))
                .map_err(|e| Error::Usage(format!("--cache-dir: {e}")))?;
        }
        let common = format!("atelier {} cache {FORMAT}|{}|f16 {}", env!("CARGO_PKG_VERSION"), gpu.describe(), gpu.caps.f16);
        Ok(DiskCache {
            dir: dir.to_path_buf(),
            vae: format!("{common}|{}", model_identity(model, &["vae"])?),
            text: format!("{common}|{}", model_identity(model, &["text_encoder", "tokenizer"])?),
            latents,
            writable: true,
            stats: Stats::default(),
        })
    }

    /// The key of an image's latents: `size` (width, height) after resize and center crop.
    pub fn latent_key(&self, image: &Path, size: (usize, usize), flip: bool) -> Result<String> {
        let bytes = std::fs::read(image).map_err(|e| Error::io(image, e))?;
        let content = hex(&Sha256::digest(&bytes));
        Ok(serde_json::json!({ "kind": "latents", "image_sha256": content, "width": size.0, "height": size.1,
            "crop": "center", "flip": flip, "weights": self.vae }).to_string())
    }

    /// The key of a caption's embedding with `clip_skip` last layers skipped.
    pub fn text_key(&self, caption: &str, clip_skip: usize) -> String {
        serde_json::json!({ "kind": "text", "caption": caption, "clip_skip": clip_skip, "weights": self.text }).to_string()
    }

    fn path(&self, kind: &str, key: &str) -> PathBuf {
        self.dir.join(kind).join(format!("{}.safetensors", &hex(&Sha256::digest(key.as_bytes()))[..32]))
    }

    /// The tensors of entry `key`, each (name, dtype, shape): None when absent; a damaged
    /// file is reported (and then rewritten by the caller).
    fn read(&mut self, kind: &str, key: &str, tensors: &[(&str, Dtype, &[usize])]) -> Option<Vec<Vec<f32>>> {
        let path = self.path(kind, key);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
            Err(e) => {
                eprintln!("warning: cache file {}: cannot read it ({e}); encoding again", path.display());
                return None;
            }
        };
        let parsed = (|| -> std::result::Result<Vec<Vec<f32>>, String> {
            let (_, meta) = SafeTensors::read_metadata(&bytes).map_err(|e| e.to_string())?;
            if meta.metadata().as_ref().and_then(|m| m.get(KEY)).map(String::as_str) != Some(key) {
                return Err("it was made for other inputs".into());
            }
            let st = SafeTensors::deserialize(&bytes).map_err(|e| e.to_string())?;
            tensors.iter().map(|(name, dtype, shape)| values(&st, name, *dtype, shape)).collect()
        })();
        match parsed {
            Ok(v) => Some(v),
            Err(why) => {
                eprintln!("warning: cache file {} is damaged ({why}); encoding again and replacing it", path.display());
                self.stats.repaired += 1;
                None
            }
        }
    }

    /// Writes entry `key` atomically; a failure is reported once and turns writing off.
    fn write(&mut self, kind: &str, key: &str, tensors: &[(&str, Dtype, &[usize], Vec<u8>)]) -> bool {
        if !self.writable {
            return false;
        }
        let path = self.path(kind, key);
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .filter_map(|(name, dtype, shape, data)| Some((*name, TensorView::new(*dtype, shape.to_vec(), data).ok()?)))
            .collect();
        let meta = HashMap::from([(KEY.to_string(), key.to_string())]);
        let result = match safetensors::serialize(views, Some(meta)) {
            Ok(bytes) => crate::images::write_atomic(&path, &bytes),
            Err(e) => Err(Error::Usage(format!("{}: {e}", path.display()))),
        };
        if let Err(e) = result {
            eprintln!("warning: cannot write to the cache ({e}); going on without writing to {}", self.dir.display());
            self.writable = false;
            return false;
        }
        true
    }

    /// An image's cached (mean, std), each [h/8 · w/8 · channels] for `shape` [h/8, w/8, channels].
    pub fn read_latents(&mut self, key: &str, shape: [usize; 3]) -> Option<(Vec<f32>, Vec<f32>)> {
        let mut v = self.read("latents", key, &[("mean", Dtype::F16, &shape), ("std", Dtype::F16, &shape)])?;
        self.stats.latents_read += 1;
        let std = v.pop()?;
        Some((v.pop()?, std))
    }

    /// Stores an image's (mean, std) (f16 values, as the encoder wrote them).
    pub fn write_latents(&mut self, key: &str, shape: [usize; 3], mean: &[f32], std: &[f32]) {
        let f16 = |x: &[f32]| -> Vec<u8> { x.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect() };
        self.stats.latents_encoded += 1;
        if self.write("latents", key, &[("mean", Dtype::F16, &shape, f16(mean)), ("std", Dtype::F16, &shape, f16(std))]) {
            self.stats.latents_written += 1;
        }
    }

    /// A caption's cached embedding of `shape` [tokens, hidden].
    pub fn read_text(&mut self, key: &str, shape: [usize; 2]) -> Option<Vec<f32>> {
        let v = self.read("text", key, &[("embedding", Dtype::F32, &shape)])?.pop()?;
        self.stats.text_read += 1;
        Some(v)
    }

    /// Stores a caption's embedding.
    pub fn write_text(&mut self, key: &str, shape: [usize; 2], embedding: &[f32]) {
        let bytes: Vec<u8> = bytemuck::cast_slice(embedding).to_vec();
        self.stats.text_encoded += 1;
        if self.write("text", key, &[("embedding", Dtype::F32, &shape, bytes)]) {
            self.stats.text_written += 1;
        }
    }

    /// One line on what the run took from and added to the cache.
    pub fn summary(&self) -> String {
        let s = &self.stats;
        let counts = |read: usize, encoded: usize, written: usize| match encoded == written {
            true => format!("{read} from the cache, {encoded} encoded and stored"),
            false => format!("{read} from the cache, {encoded} encoded, {written} of them stored"),
        };
        let latents = match self.latents {
            true => counts(s.latents_read, s.latents_encoded, s.latents_written),
            false => "not cached (--random-crop)".into(),
        };
        let repaired = if s.repaired > 0 { format!("; {} damaged files replaced", s.repaired) } else { String::new() };
        format!(
            "cache {}: latents: {latents}; text embeddings: {}{repaired}",
            self.dir.display(),
            counts(s.text_read, s.text_encoded, s.text_written)
        )
    }
}

/// The end of the VAE encoder, sample = mean + std·noise, with the same kernels and f16
/// tensors as [`crate::model::vae::AutoencoderKL::encode_plan`], so a cached (mean, std)
/// gives the very sample an encoding would.
pub struct SamplePlan {
    mean: Tensor,
    std: Tensor,
    noise: Tensor,
    sample: Tensor,
    plan: Plan,
}

impl SamplePlan {
    /// For one image of latent shape `shape` [h/8, w/8, channels].
    pub fn new(gpu: &Gpu, shape: [usize; 3]) -> Result<SamplePlan> {
        let s = [1, shape[0], shape[1], shape[2]];
        let t = |what: &str| Tensor::empty(gpu, &s, DType::F16, what);
        let (mean, std, noise, sample) = (t("cached vae mean")?, t("cached vae std")?, t("vae noise")?, t("vae sample")?);
        let mut pb = PlanBuilder::new(gpu);
        let prod = pb.f16(&s, "vae std·noise")?;
        pb.run(elementwise::binary(gpu, Binary::Mul { alpha: 1.0 }, &std, &noise, &prod)?)?;
        pb.run(elementwise::binary(gpu, Binary::Add { alpha: 1.0 }, &mean, &prod, &sample)?)?;
        pb.free(prod);
        Ok(SamplePlan { mean, std, noise, sample, plan: pb.finish() })
    }

    /// The sample for the encoder's noise seed `seed` (the noise of
    /// [`crate::model::vae::EncodePlan::seeded_noise`]).
    pub fn run(&self, gpu: &Gpu, mean: &[f32], std: &[f32], seed: u64) -> Result<Vec<f32>> {
        self.mean.write_f32(gpu, mean)?;
        self.std.write_f32(gpu, std)?;
        self.noise.write_f32(gpu, &Rng::new(seed).normals(self.noise.numel()))?;
        self.plan.run(gpu)?;
        self.sample.to_f32(gpu)
    }
}
