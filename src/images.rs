//! The files sampling reads and writes: init images (any format the `image` crate reads,
//! resized to the requested size), PNGs with the generation parameters in a `parameters` text
//! chunk (A1111's layout, which A1111, ComfyUI, Civitai and others show), latents as
//! safetensors (`latents`, f32 NCHW), and the short SHA-256 model hash A1111 prints. Every file
//! is written under a temporary name in its folder and renamed, so a failure leaves nothing
//! half-written.

use std::collections::HashMap;
use std::fs;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::io(path, source)
}

/// Writes `bytes` to `path` through a temporary file in the same folder, renamed at the end.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| Error::Usage(format!("{}: not a file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = fs::File::create(&tmp).map_err(io(&tmp))?;
        f.write_all(bytes).map_err(io(&tmp))?;
        f.sync_all().map_err(io(&tmp))?;
        fs::rename(&tmp, path).map_err(io(path))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Checks that files can be created in `dir` (creating it if needed), before any long work.
pub fn check_writable_dir(dir: &Path) -> Result<()> {
    let cannot = |e: std::io::Error| {
        Error::Usage(format!("{}: cannot write files there ({e}); choose a folder you can write to", dir.display()))
    };
    fs::create_dir_all(dir).map_err(cannot)?;
    let probe = dir.join(format!(".atelier-write-test{}", std::process::id()));
    fs::File::create(&probe).map_err(cannot)?;
    let _ = fs::remove_file(&probe);
    Ok(())
}

/// An init image as RGB8, resized (Lanczos) to `size` when given, else to its own size rounded
/// down to a multiple of `multiple`. Returns (pixels, width, height).
pub fn read_image(path: &Path, size: Option<(usize, usize)>, multiple: usize) -> Result<(Vec<u8>, usize, usize)> {
    let bad = |why: String| Error::Usage(format!("{}: {why}", path.display()));
    let bytes = fs::read(path).map_err(io(path))?;
    let img = image::load_from_memory(&bytes)
        .map_err(|e| bad(format!("cannot read the image ({e}); give a PNG, JPEG or WebP file")))?
        .to_rgb8();
    let (w, h) = size.unwrap_or((
        img.width() as usize / multiple * multiple,
        img.height() as usize / multiple * multiple,
    ));
    if w == 0 || h == 0 {
        return Err(bad(format!("the image is {}x{}, smaller than {multiple} pixels", img.width(), img.height())));
    }
    let img = if (w, h) == (img.width() as usize, img.height() as usize) {
        img
    } else {
        image::imageops::resize(&img, w as u32, h as u32, image::imageops::FilterType::Lanczos3)
    };
    Ok((img.into_raw(), w, h))
}

/// Encodes RGB8 pixels as a PNG holding `parameters` in a text chunk (tEXt when the text is
/// Latin-1, else iTXt, as PIL writes it for A1111).
pub fn png_bytes(rgb: &[u8], width: usize, height: usize, parameters: &str) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let err = |e: png::EncodingError| Error::Usage(format!("encoding the PNG: {e}"));
    {
        let mut enc = png::Encoder::new(&mut out, width as u32, height as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        if parameters.chars().all(|c| (c as u32) < 256) {
            enc.add_text_chunk("parameters".into(), parameters.into()).map_err(err)?;
        } else {
            enc.add_itxt_chunk("parameters".into(), parameters.into()).map_err(err)?;
        }
        let mut w = enc.write_header().map_err(err)?;
        w.write_image_data(rgb).map_err(err)?;
        w.finish().map_err(err)?;
    }
    Ok(out)
}

/// The `parameters` text of a PNG (tEXt, zTXt or iTXt), if any.
pub fn png_parameters(path: &Path) -> Result<Option<String>> {
    let file = fs::File::open(path).map_err(io(path))?;
    let dec = png::Decoder::new(std::io::BufReader::new(file));
    let reader = dec.read_info().map_err(|e| Error::Usage(format!("{}: not a PNG ({e})", path.display())))?;
    let info = reader.info();
    if let Some(t) = info.uncompressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(Some(t.text.clone()));
    }
    if let Some(t) = info.compressed_latin1_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(t.get_text().ok());
    }
    if let Some(t) = info.utf8_text.iter().find(|t| t.keyword == "parameters") {
        return Ok(t.get_text().ok());
    }
    Ok(None)
}

/// Latents as safetensors: tensor `latents`, f32, NCHW `shape`.
pub fn write_latents(path: &Path, shape: &[usize], values: &[f32]) -> Result<()> {
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), bytemuck::cast_slice(values))
        .map_err(|e| Error::shape("latents", e.to_string()))?;
    let bytes = safetensors::serialize([("latents", view)], None)
        .map_err(|e| Error::Usage(format!("{}: writing latents: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Reads tensor `latents` (f32 or f16, 4-D) from a safetensors file: (shape, values).
pub fn read_latents(path: &Path) -> Result<(Vec<usize>, Vec<f32>)> {
    let bytes = fs::read(path).map_err(io(path))?;
    let bad = |why: String| Error::Usage(format!("{}: {why}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .map_err(|e| bad(format!("not a safetensors file ({e})")))?;
    let t = st.tensor("latents").map_err(|_| {
        bad(format!("no tensor named \"latents\" (it holds: {})", st.names().into_iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ")))
    })?;
    if t.shape().len() != 4 {
        return Err(bad(format!("latents have shape {:?}; need [N, 4, height/8, width/8]", t.shape())));
    }
    let values: Vec<f32> = match t.dtype() {
        safetensors::Dtype::F32 => t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
        safetensors::Dtype::F16 => {
            t.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
        }
        d => return Err(bad(format!("latents are {d:?}; need F32 (or F16)"))),
    };
    if values.iter().any(|v| !v.is_finite()) {
        return Err(bad("the latents hold NaN or infinite values".into()));
    }
    Ok((t.shape().to_vec(), values))
}

/// SHA-256 of a file, hex.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = fs::File::open(path).map_err(io(path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// A1111's short model hash (the first 10 hex digits of the file's SHA-256), cached by path,
/// size and modification time in the user's cache folder, since hashing a 2-4 GB checkpoint
/// takes seconds.
pub fn short_hash(path: &Path) -> Result<String> {
    let meta = fs::metadata(path).map_err(io(path))?;
    let mtime = meta.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map_or(0, |d| d.as_secs());
    let canon = fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let key = format!("{}|{}|{}", canon.display(), meta.len(), mtime);
    let cache = cache_file();
    let mut map: HashMap<String, String> = cache
        .as_ref()
        .and_then(|c| fs::read_to_string(c).ok())
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    if let Some(h) = map.get(&key) {
        return Ok(h.clone());
    }
    let h = sha256_file(path)?[..10].to_string();
    if let Some(c) = cache {
        map.insert(key, h.clone());
        if let (Some(dir), Ok(text)) = (c.parent(), serde_json::to_string_pretty(&map))
            && fs::create_dir_all(dir).is_ok()
        {
            let _ = write_atomic(&c, text.as_bytes()); // a cache: failing to write it is harmless
        }
    }
    Ok(h)
}

fn cache_file() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("atelier").join("hashes.json"))
}
