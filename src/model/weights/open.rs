//! Opening weight files: safetensors headers read and checked (pickles refused), the
//! single-file (LDM) checkpoint through the key converter, and the diffusers folder with its
//! component files, variants and shards; every tensor becomes an [`Entry`] of [`Weights`].

use super::*;

/// A tensor as listed in a file's header, with its absolute byte range.
pub(crate) struct RawTensor {
    pub(crate) key: String,
    pub(crate) dtype: Dtype,
    pub(crate) shape: Vec<usize>,
    pub(crate) start: usize,
    pub(crate) end: usize,
}

pub(super) fn is_pickle_name(path: &Path) -> bool {
    let ext = path.extension().and_then(|e| e.to_str()).map(str::to_ascii_lowercase);
    matches!(ext.as_deref(), Some("ckpt" | "pt" | "pth" | "bin" | "pkl" | "pickle"))
}

/// The refusal for a PyTorch pickle, with the one-line conversion.
pub(super) fn pickle_error(path: &Path, why: &str) -> Error {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "model.ckpt".into());
    let out = if name == "pytorch_model.bin" {
        "model.safetensors".to_string()
    } else {
        Path::new(&name).with_extension("safetensors").to_string_lossy().into_owned()
    };
    Error::model(
        path,
        format!(
            "{why}: atelier does not load pickles, because unpickling a file can run arbitrary code. \
             Convert it to safetensors once, with PyTorch and safetensors installed, in its folder: \
             python -c \"import torch, safetensors.torch as st; sd = torch.load('{name}', map_location='cpu', \
             weights_only=True); sd = sd.get('state_dict', sd); st.save_file({{k: v.contiguous().clone() for k, v \
             in sd.items() if torch.is_tensor(v)}}, '{out}')\" (weights_only=True refuses code in the pickle; \
             for a whole diffusers pipeline, from_pretrained(...).save_pretrained(..., safe_serialization=True) \
             does the same), then pass the .safetensors file"
        ),
    )
}

pub(super) fn read_safetensors(path: &Path) -> Result<(Mmap, Vec<RawTensor>)> {
    let (mmap, tensors, _) =
        read_safetensors_file(path, "pass an SD-1.5 .safetensors checkpoint or a diffusers folder")?;
    Ok((mmap, tensors))
}

/// A safetensors file, memory-mapped: its tensors sorted by key and its `__metadata__`; `what`
/// says what the caller expected (for the "not a safetensors file" message).
pub(crate) fn read_safetensors_file(path: &Path, what: &str) -> Result<(Mmap, Vec<RawTensor>, HashMap<String, String>)> {
    if is_pickle_name(path) {
        return Err(pickle_error(path, "this is a PyTorch pickle checkpoint"));
    }
    let io = |e: std::io::Error| Error::Io { path: path.to_path_buf(), source: e };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    if len == 0 {
        return Err(Error::model(path, "the file is empty (0 bytes): an interrupted download or copy? Get it again"));
    }
    // SAFETY: the map is read-only; as with every memory-mapped reader, the file must not be
    // changed by another program while atelier runs.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
    let b: &[u8] = &mmap;
    let not_st = |why: String| {
        Error::model(
            path,
            format!(
                "not a safetensors file ({why}); {what}; if the file was downloaded, check that the download \
                 is complete"
            ),
        )
    };
    // A pickle starts with PROTO (0x80, protocol 2-5), or is a zip; a safetensors header length
    // can start with the same two bytes (640 + 256k bytes), so a JSON header after the 8-byte
    // length wins.
    let json_header = b.len() > 8 && b[8] == b'{';
    if !json_header && (b.starts_with(b"PK\x03\x04") || (b.len() > 1 && b[0] == 0x80 && (2..=5).contains(&b[1]))) {
        return Err(pickle_error(path, "this is a PyTorch pickle checkpoint (saved by torch.save), not safetensors"));
    }
    if b.len() < 9 {
        return Err(not_st(format!("only {} bytes long, shorter than a safetensors header", b.len())));
    }
    let n = u64::from_le_bytes(b[..8].try_into().expect("8 bytes"));
    if b[8] != b'{' {
        return Err(not_st("it does not start with an 8-byte header length and a JSON header".into()));
    }
    if n > MAX_HEADER {
        return Err(not_st(format!("its header length, {n} bytes, is beyond the 100 MB safetensors allows")));
    }
    if 8 + n > len {
        return Err(Error::model(
            path,
            format!(
                "the file is truncated: it ends inside its {n}-byte header ({} bytes of it present); \
                 an interrupted download or copy? Get the file again",
                len - 8
            ),
        ));
    }
    let data_start = 8 + n as usize;
    let meta: Metadata = serde_json::from_slice(&b[8..data_start])
        .map_err(|e| not_st(format!("its JSON header is invalid: {e}")))?;
    let have = b.len() - data_start;
    let want = meta.data_len();
    if want > have {
        return Err(Error::model(
            path,
            format!(
                "the file is truncated: its header describes {want} bytes of tensor data but only {have} are there \
                 ({} missing); an interrupted download or copy? Get the file again",
                want - have
            ),
        ));
    }
    if want < have {
        return Err(not_st(format!(
            "{} bytes follow the last tensor the header describes; the file is damaged",
            have - want
        )));
    }
    let mut tensors: Vec<RawTensor> = meta
        .tensors()
        .into_iter()
        .map(|(key, info)| RawTensor {
            key,
            dtype: info.dtype,
            shape: info.shape.clone(),
            start: data_start + info.data_offsets.0,
            end: data_start + info.data_offsets.1,
        })
        .collect();
    tensors.sort_by(|a, b| a.key.cmp(&b.key));
    let file_meta = meta.metadata().clone().unwrap_or_default();
    Ok((mmap, tensors, file_meta))
}

// ---------------------------------------------------------------------------------------
// The two layouts

/// Adds a tensor under its atelier name; two tensors with one name is an error.
pub(super) fn insert(entries: &mut BTreeMap<String, Entry>, files: &[SourceFile], name: String, entry: Entry) -> Result<()> {
    if let Some(old) = entries.get(&name) {
        return Err(Error::model(
            &files[entry.file].path,
            format!(
                "two tensors give the weight {name}: {:?} in {} and {:?}; the checkpoint mixes two layouts \
                 (or old and new names): re-save it with one of them",
                old.key,
                files[old.file].path.display(),
                entry.key
            ),
        ));
    }
    entries.insert(name, entry);
    Ok(())
}

pub(super) fn entry_of(file: usize, t: RawTensor, squeeze: bool) -> Entry {
    let shape = if squeeze && t.shape.len() > 2 && t.shape[2..].iter().all(|&d| d == 1) {
        t.shape[..2].to_vec()
    } else {
        t.shape.clone()
    };
    Entry { file, key: t.key, dtype: t.dtype, file_shape: t.shape, shape, start: t.start, end: t.end }
}

pub(super) fn open_single(path: &Path, opts: &LoadOptions) -> Result<Weights> {
    let (mmap, tensors) = read_safetensors(path)?;
    // Families atelier does not run, recognised by their key prefixes.
    for (prefix, what) in [
        ("conditioner.embedders.", "this is an SDXL checkpoint (keys conditioner.embedders.*: two text encoders)"),
        (
            "cond_stage_model.model.",
            "this is a Stable Diffusion 2.x checkpoint (keys cond_stage_model.model.*: an OpenCLIP ViT-H text encoder)",
        ),
        (
            "model.diffusion_model.label_emb.",
            "this is an SDXL-style checkpoint (keys model.diffusion_model.label_emb.*: a UNet with an added \
             class/size embedding)",
        ),
    ] {
        if tensors.iter().any(|t| t.key.starts_with(prefix)) {
            return Err(unsupported(path, what));
        }
    }
    let map = KeyMap::new(&opts.layout);
    let files = vec![SourceFile { path: path.to_path_buf(), mmap }];
    let mut entries = BTreeMap::new();
    let mut ignored = 0;
    let sample: Vec<String> = tensors.iter().take(3).map(|t| t.key.clone()).collect();
    let mut diffusers_like = false;
    let mut lora_like = false;
    for t in tensors {
        match map.convert(&t.key) {
            Some(c) => insert(&mut entries, &files, c.name, entry_of(0, t, c.squeeze))?,
            None => {
                let k = &t.key;
                diffusers_like |= ["down_blocks.", "conv_in.", "encoder.down_blocks.", "text_model."]
                    .iter()
                    .any(|p| k.starts_with(p));
                lora_like |= k.contains("lora_") || k.contains("lora.");
                ignored += 1;
            }
        }
    }
    if entries.is_empty() {
        let why = if lora_like {
            "this is a LoRA (keys lora_*), not a base model: pass an SD-1.5 checkpoint as the model and the LoRA \
             where LoRAs go"
                .to_string()
        } else if diffusers_like {
            "this looks like one component of a diffusers folder (diffusers key names): pass the folder that holds \
             model_index.json, unet/, vae/ and text_encoder/"
                .to_string()
        } else {
            format!(
                "no SD-1.5 weights in it: an SD-1.5 single-file checkpoint has keys under {}, {} and {} (this file \
                 has e.g. {}); pass an SD-1.5 checkpoint or a diffusers folder",
                convert::LDM_UNET,
                convert::LDM_VAE,
                convert::LDM_CLIP,
                if sample.is_empty() { "no tensors at all".to_string() } else { sample.join(", ") }
            )
        };
        return Err(Error::model(path, why));
    }
    Ok(Weights {
        path: path.to_path_buf(),
        format: Format::SingleFile,
        files,
        entries,
        ignored,
        layout: opts.layout.clone(),
        winograd: opts.winograd,
        loras: Vec::new(),
        deltas: HashMap::new(),
        state: Mutex::new(State::default()),
    })
}

/// The weight files of one component folder, in order of preference.
pub(super) fn candidates(stem: &str, prefer_fp16: bool) -> [String; 4] {
    let plain = [format!("{stem}.safetensors"), format!("{stem}.safetensors.index.json")];
    let fp16 = [format!("{stem}.fp16.safetensors"), format!("{stem}.safetensors.index.fp16.json")];
    let [a, b] = if prefer_fp16 { [fp16.clone(), plain.clone()] } else { [plain, fp16] };
    let [a0, a1] = a;
    let [b0, b1] = b;
    [a0, a1, b0, b1]
}

/// The shard file names an `*.safetensors.index.json` lists.
pub(super) fn shard_names(index: &Path) -> Result<Vec<String>> {
    let text = std::fs::read(index).map_err(|e| Error::Io { path: index.to_path_buf(), source: e })?;
    let bad = |why: &str| {
        Error::model(index, format!("not a valid sharded-weights index ({why}); get the model folder again"))
    };
    let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| bad(&format!("invalid JSON: {e}")))?;
    let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no \"weight_map\" object"))?;
    let mut names: Vec<String> = Vec::new();
    for f in map.values() {
        let f = f.as_str().ok_or_else(|| bad("a weight_map value is not a file name"))?;
        let plain = Path::new(f).file_name().is_some_and(|n| n == f) && f != ".." && f != ".";
        if !plain {
            return Err(bad(&format!("shard {f:?} is not a plain file name in the same folder")));
        }
        if !names.iter().any(|n| n == f) {
            names.push(f.to_string());
        }
    }
    names.sort();
    Ok(names)
}

pub(super) fn open_diffusers(dir: &Path, opts: &LoadOptions) -> Result<Weights> {
    let index_path = dir.join("model_index.json");
    let has_index = index_path.is_file();
    if has_index {
        let text = std::fs::read(&index_path).map_err(|e| Error::Io { path: index_path.clone(), source: e })?;
        let v: serde_json::Value = serde_json::from_slice(&text).map_err(|e| {
            Error::model(&index_path, format!("not valid JSON ({e}); the model folder is damaged: get it again"))
        })?;
        let class = v.get("_class_name").and_then(|c| c.as_str()).unwrap_or("");
        if class.contains("XL") || v.get("text_encoder_2").is_some() {
            return Err(unsupported(dir, &format!("this is an SDXL pipeline ({class}, two text encoders)")));
        }
    }
    if dir.join("text_encoder_2").is_dir() {
        return Err(unsupported(dir, "this is an SDXL pipeline (it has text_encoder_2/)"));
    }
    let mut files: Vec<SourceFile> = Vec::new();
    let mut entries = BTreeMap::new();
    let mut ignored = 0;
    for (comp, stem, _, _) in COMPONENTS {
        let cdir = dir.join(comp);
        let Some(pick) = candidates(stem, opts.prefer_fp16).into_iter().find(|c| cdir.join(c).is_file()) else {
            // A pickle where safetensors should be is refused by name, with the conversion.
            let pickles = [format!("{stem}.bin"), format!("{stem}.fp16.bin"), "pytorch_model.bin".into()];
            if let Some(p) = pickles.iter().map(|p| cdir.join(p)).find(|p| p.is_file()) {
                return Err(pickle_error(&p, &format!("the folder's {comp} weights are only in a PyTorch pickle")));
            }
            continue;
        };
        let shards = if pick.ends_with(".json") { shard_names(&cdir.join(&pick))? } else { vec![pick] };
        for shard in shards {
            let path = cdir.join(&shard);
            let (mmap, tensors) = read_safetensors(&path)?;
            let file = files.len();
            files.push(SourceFile { path, mmap });
            for t in tensors {
                if t.key.is_empty() {
                    ignored += 1;
                    continue;
                }
                let (name, squeeze) = match (comp == VAE).then(|| convert::diffusers_vae_legacy(&t.key)).flatten() {
                    Some(c) => (format!("{comp}.{}", c.name), c.squeeze),
                    // transformers 5 holds CLIPTextModel's weights without `text_model.` (and adds
                    // it back when saving); a state dict saved directly lacks it.
                    None if comp == TEXT_ENCODER
                        && ["embeddings.", "encoder.", "final_layer_norm."].iter().any(|p| t.key.starts_with(p)) =>
                    {
                        (format!("{comp}.text_model.{}", t.key), false)
                    }
                    None => (format!("{comp}.{}", t.key), false),
                };
                insert(&mut entries, &files, name, entry_of(file, t, squeeze))?;
            }
        }
    }
    if files.is_empty() {
        let why = if ["diffusion_pytorch_model.safetensors", "model.safetensors"].iter().any(|f| dir.join(f).is_file())
        {
            "this looks like one component folder of a diffusers model: pass its parent, the folder that holds \
             model_index.json, unet/, vae/ and text_encoder/"
                .to_string()
        } else {
            format!(
                "{}no weights found: an SD-1.5 diffusers folder holds model_index.json and \
                 unet/diffusion_pytorch_model.safetensors, vae/diffusion_pytorch_model.safetensors and \
                 text_encoder/model.safetensors (or their .fp16 variants); pass such a folder or a single \
                 .safetensors checkpoint",
                if has_index { "" } else { "not a diffusers model folder (no model_index.json) and " }
            )
        };
        return Err(Error::model(dir, why));
    }
    Ok(Weights {
        path: dir.to_path_buf(),
        format: Format::Diffusers,
        files,
        entries,
        ignored,
        layout: opts.layout.clone(),
        winograd: opts.winograd,
        loras: Vec::new(),
        deltas: HashMap::new(),
        state: Mutex::new(State::default()),
    })
}

// ---------------------------------------------------------------------------------------
// Model family checks

pub(super) fn unsupported(path: &Path, what: &str) -> Error {
    Error::model(
        path,
        format!(
            "{what}. atelier supports Stable Diffusion 1.5 and models fine-tuned from it (SD-1.x: CLIP ViT-L/14 \
             text encoder, 768-wide cross-attention) only; pass an SD-1.5 checkpoint (such as \
             v1-5-pruned-emaonly.safetensors) or an SD-1.5 diffusers folder"
        ),
    )
}

/// Refuses SD-2.x and SDXL by their tensor names and shapes, in either layout.
pub(super) fn check_family(w: &Weights) -> Result<()> {
    for (name, e) in &w.entries {
        let path = &w.files[e.file].path;
        if name.starts_with("unet.add_embedding.") {
            return Err(unsupported(path, "this is an SDXL UNet (it has add_embedding.*)"));
        }
        if name.starts_with("unet.") && name.ends_with("attn2.to_k.weight") && e.shape.len() == 2 {
            match e.shape[1] {
                1024 => {
                    return Err(unsupported(
                        path,
                        &format!(
                            "this is a Stable Diffusion 2.x model ({:?} has shape {:?}: 1024-wide text context)",
                            e.key, e.shape
                        ),
                    ));
                }
                2048 | 1280 => {
                    return Err(unsupported(
                        path,
                        &format!("this is an SDXL model ({:?} has shape {:?}: {}-wide text context)", e.key, e.shape, e.shape[1]),
                    ));
                }
                _ => {}
            }
        }
        if name == "text_encoder.text_model.embeddings.token_embedding.weight"
            && e.shape.len() == 2
            && matches!(e.shape[1], 1024 | 1280)
        {
            return Err(unsupported(
                path,
                &format!("this is not an SD-1.x text encoder ({:?} has shape {:?}: OpenCLIP width)", e.key, e.shape),
            ));
        }
    }
    Ok(())
}
