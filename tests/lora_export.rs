//! LoRA export: adapters for the tiny model (kohya's transformer targets, with the 1x1-conv
//! `proj_in`/`proj_out` and the feed-forward linears, and the attention-only targets) written as
//! kohya and diffusers files, f16 and f32, read back through `LoraFile::open` on the tiny model:
//! every adapter found (no unknown keys), mapped to its weight with the right shapes, and its
//! effective change (scale · up·down as the reader gives it) equal to alpha/r · B·A within the
//! rounding bound stated in `check_delta`. Also: kohya metadata, `.alpha` tensors and sd-scripts'
//! hashes; the diffusers file's folded scale and lack of alpha metadata; the trainer's path
//! from `LoraParams` on the GPU; failed writes leave nothing behind.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use atelier::config::Sd15Config;
use atelier::model::lora::{LoraParams, LoraSpec, layout};
use atelier::model::lora_file::{LoraFile, LoraFormat};
use atelier::model::unet_train::LoraTargets;
use atelier::model::weights::Weights;
use atelier::train::export::{Adapter, LoraFileFormat, Precision, adapters, adapters_from_layout, write_lora, write_lora_with};
use common::fixtures::fixture;
use common::*;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};

const RANK: usize = 4;
const ALPHA: f32 = 16.0;

struct TempDir(PathBuf);

impl TempDir {
    fn new(what: &str) -> TempDir {
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
        let p = std::env::temp_dir().join(format!("atelier-export-{what}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
    fn join(&self, p: &str) -> PathBuf {
        self.0.join(p)
    }
    /// The names in the folder, sorted.
    fn listing(&self) -> Vec<String> {
        let mut v: Vec<String> =
            std::fs::read_dir(&self.0).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        v.sort();
        v
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn model() -> Weights {
    Weights::open(fixture("tiny-sd")).unwrap()
}

fn specs(targets: LoraTargets) -> Vec<LoraSpec> {
    Sd15Config::tiny().unet.lora_specs(targets, RANK, ALPHA, 0.0)
}

/// Adapters with random A and B (B non-zero, unlike a fresh init) in the trainer's flat layout.
fn random_adapters(targets: LoraTargets, seed: u64) -> Vec<Adapter> {
    let specs = specs(targets);
    let (offsets, total) = layout(&specs, 64);
    let values = random(total, seed);
    adapters_from_layout(&specs, &offsets, &values, &Sd15Config::tiny().unet).unwrap()
}

/// Checks one read-back adapter against the written one: key, target, shapes, alpha, scale,
/// and the effective change element by element.
///
/// Bound: the reader gives scale · up·down with up, down the stored values. Stored as f16 each
/// factor is off by at most u = 2^-11 relative (round to nearest), or 2^-25 absolute in f16's
/// subnormal range; the f32 products, the rank-term sum and the scaling add at most (r + 3)
/// f32 roundings (2^-24 each) of the same magnitudes. So with S = scale_written · Σ_k |b_ik a_kj|:
///   |got - want| <= (2u + u² + (r + 3)·2^-24) · S + scale_written · Σ_k (|b_ik| + |a_kj|) · 2^-24
/// (u = 0 for f32 files). A wrong scale (the formats differ by a factor 4) or a transposed or
/// misplaced matrix is off by the size of the change itself.
fn check_delta(what: &str, ad: &Adapter, got: &[f32], precision: Precision) -> (f64, f64) {
    let u = match precision {
        Precision::F16 => 2f64.powi(-11),
        Precision::F32 => 0.0,
    };
    let e32 = 2f64.powi(-24);
    let gamma = 2.0 * u + u * u + (RANK as f64 + 3.0) * e32;
    let s = ad.alpha as f64 / ad.rank as f64;
    assert_eq!(got.len(), ad.n_out * ad.k_in, "{what}: change of {} values", got.len());
    let (mut num, mut den, mut worst) = (0.0, 0.0, 0.0f64);
    for o in 0..ad.n_out {
        for i in 0..ad.k_in {
            let (mut want, mut mag, mut sub) = (0.0f64, 0.0f64, 0.0f64);
            for k in 0..ad.rank {
                let (b, a) = (ad.b[o * ad.rank + k] as f64, ad.a[k * ad.k_in + i] as f64);
                want += b * a;
                mag += (b * a).abs();
                sub += b.abs() + a.abs();
            }
            let (want, bound) = (s * want, gamma * s * mag + s * sub * e32);
            let g = got[o * ad.k_in + i] as f64;
            assert!(g.is_finite() && (g - want).abs() <= bound, "{what}: element [{o}, {i}] is {g}, want {want} ± {bound:e}");
            worst = worst.max((g - want).abs() / bound.max(1e-30));
            num += (g - want).powi(2);
            den += want * want;
        }
    }
    ((num / den).sqrt(), worst)
}

/// Writes `ads` as `format` / `precision`, reads the file back on the tiny model and checks
/// every adapter. Returns the file's path (in `dir`).
fn round_trip(dir: &TempDir, tag: &str, ads: &[Adapter], format: LoraFileFormat, precision: Precision) -> PathBuf {
    let w = model();
    let path = dir.join(&format!("{tag}-{format}-{precision:?}.safetensors"));
    write_lora_with(&path, ads, format, &BTreeMap::new(), precision).unwrap();
    let file = LoraFile::open(&path, &w).unwrap();
    let what = format!("{tag} {format} {precision:?}");
    assert!(file.unknown.is_empty(), "{what}: unknown keys {:?}", file.unknown);
    assert_eq!(file.format, if format == LoraFileFormat::Kohya { LoraFormat::Kohya } else { LoraFormat::Diffusers }, "{what}");
    assert_eq!(file.adapters.len(), ads.len(), "{what}: adapters read back");
    let (mut worst_rel, mut worst_ratio) = (0.0f64, 0.0f64);
    let mut convs = 0;
    for ad in ads {
        let target = format!("unet.{}.weight", ad.name);
        let l = file.adapters.iter().find(|l| l.target == target).unwrap_or_else(|| panic!("{what}: no adapter for {target}"));
        let model_shape = w.shape(&target).unwrap_or_else(|| panic!("{what}: the model has no {target}"));
        assert_eq!(&model_shape[..2], &[ad.n_out, ad.k_in], "{what}: {target} has shape {model_shape:?}");
        assert_eq!(model_shape.len() == 4, ad.conv1x1, "{what}: {target} shape {model_shape:?}, conv1x1 {}", ad.conv1x1);
        let tail: &[usize] = if ad.conv1x1 { &[1, 1] } else { &[] };
        assert_eq!(l.down_shape, [&[RANK, ad.k_in][..], tail].concat(), "{what}: {target} down");
        assert_eq!(l.up_shape, [&[ad.n_out, RANK][..], tail].concat(), "{what}: {target} up");
        let base = match format {
            LoraFileFormat::Kohya => format!("lora_unet_{}.lora_down.weight", ad.name.replace('.', "_")),
            LoraFileFormat::Diffusers => format!("unet.{}.lora_A.weight", ad.name),
        };
        assert_eq!(l.key, base, "{what}");
        let (alpha, scale) = match format {
            LoraFileFormat::Kohya => (ALPHA, ALPHA / RANK as f32),
            LoraFileFormat::Diffusers => (RANK as f32, 1.0),
        };
        assert_eq!((l.alpha, l.scale), (alpha, scale), "{what}: {target} alpha and scale");
        let delta: Vec<f32> = l.product().iter().map(|&x| l.scale * x).collect();
        let (rel, ratio) = check_delta(&format!("{what} {target}"), ad, &delta, precision);
        worst_rel = worst_rel.max(rel);
        worst_ratio = worst_ratio.max(ratio);
        convs += ad.conv1x1 as usize;
    }
    eprintln!(
        "{what}: {} adapters ({convs} 1x1 convs), worst rel L2 {worst_rel:.2e}, worst error / bound {worst_ratio:.3}",
        ads.len()
    );
    path
}

#[test]
fn formats_round_trip_through_the_reader() {
    let dir = TempDir::new("roundtrip");
    let seed = seed("export");
    for (tag, targets) in [("transformer", LoraTargets::Transformer), ("attention", LoraTargets::Attention)] {
        let ads = random_adapters(targets, seed);
        let n_conv = ads.iter().filter(|a| a.conv1x1).count();
        let n_ff = ads.iter().filter(|a| a.name.contains(".ff.net.")).count();
        match targets {
            LoraTargets::Transformer => assert!(n_conv > 0 && n_ff > 0, "{tag}: {n_conv} convs, {n_ff} ff layers"),
            LoraTargets::Attention => assert_eq!(n_conv + n_ff, 0, "{tag}"),
        }
        assert!(ads.iter().filter(|a| a.conv1x1).all(|a| a.name.ends_with("proj_in") || a.name.ends_with("proj_out")));
        for format in [LoraFileFormat::Kohya, LoraFileFormat::Diffusers] {
            for precision in [Precision::F16, Precision::F32] {
                round_trip(&dir, tag, &ads, format, precision);
            }
        }
    }
    // The f16 files are what write_lora writes, half the size of the f32 ones.
    let ads = random_adapters(LoraTargets::Attention, seed);
    let p = dir.join("default.safetensors");
    write_lora(&p, &ads, LoraFileFormat::Kohya, &BTreeMap::new()).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for (k, t) in st.tensors() {
        let want = if k.ends_with(".alpha") { Dtype::F32 } else { Dtype::F16 };
        assert_eq!(t.dtype(), want, "{k}");
    }
}

#[test]
fn kohya_metadata_and_alpha() {
    let dir = TempDir::new("kohya");
    let ads = random_adapters(LoraTargets::Transformer, seed("kohya"));
    let path = dir.join("style.safetensors");
    let meta: BTreeMap<String, String> = [
        ("ss_network_alpha", "16.0"),
        ("ss_resolution", "(512, 512)"),
        ("ss_steps", "500"),
        ("ss_training_comment", "18th-century portraits"),
        ("ss_v2", "False"),
        ("modelspec.title", "style"),
        ("sshs_model_hash", "stale"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    write_lora(&path, &ads, LoraFileFormat::Kohya, &meta).unwrap();
    assert_eq!(dir.listing(), ["style.safetensors"], "only the file, no temporary left");

    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let got = header.metadata().clone().unwrap();
    for (k, v) in &meta {
        if k != "sshs_model_hash" {
            assert_eq!(got.get(k), Some(v), "caller's {k}");
        }
    }
    // Filled from the adapters where the caller gave none.
    assert_eq!(got["ss_network_module"], "networks.lora");
    assert_eq!(got["ss_network_dim"], "4");
    assert_eq!(got["ss_base_model_version"], "sd_v1");
    assert!(!got.contains_key("lora_adapter_metadata"));
    // sd-scripts' hashes: SHA-256 of the tensor data (independent of the metadata), and of
    // bytes 0x100000..0x110000 (the file is under 1 MiB: the empty string's hash).
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let data_hash: String = Sha256::digest(&bytes[8 + n..]).iter().map(|b| format!("{b:02x}")).collect();
    assert!(bytes.len() < 0x100000, "{} bytes", bytes.len());
    assert_eq!(got["sshs_model_hash"], data_hash);
    assert_eq!(got["sshs_legacy_hash"], "e3b0c442");

    // Every module has down, up and an f32 scalar alpha of 16; nothing else is in the file.
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 3 * ads.len());
    for ad in &ads {
        let base = format!("lora_unet_{}", ad.name.replace('.', "_"));
        let alpha = st.tensor(&format!("{base}.alpha")).unwrap();
        assert_eq!((alpha.dtype(), alpha.shape()), (Dtype::F32, &[][..]), "{base}.alpha");
        assert_eq!(f32::from_le_bytes(alpha.data().try_into().unwrap()), ALPHA, "{base}.alpha");
        assert!(st.tensor(&format!("{base}.lora_down.weight")).is_ok() && st.tensor(&format!("{base}.lora_up.weight")).is_ok());
    }

    // A non-integer alpha survives exactly and is printed as Python prints it.
    let mut odd = ads[..3].to_vec();
    odd.iter_mut().for_each(|a| a.alpha = 0.3);
    let p2 = dir.join("odd.safetensors");
    write_lora(&p2, &odd, LoraFileFormat::Kohya, &BTreeMap::new()).unwrap();
    let b2 = std::fs::read(&p2).unwrap();
    assert_eq!(SafeTensors::read_metadata(&b2).unwrap().1.metadata().as_ref().unwrap()["ss_network_alpha"], "0.3");
    let l = LoraFile::open(&p2, &model()).unwrap();
    assert!(l.adapters.iter().all(|a| a.alpha == 0.3 && a.scale == (0.3f64 / 4.0) as f32), "{:?}", l.adapters[0].scale);
}

#[test]
fn diffusers_folds_the_scale() {
    let dir = TempDir::new("diffusers");
    let ads = random_adapters(LoraTargets::Transformer, seed("diffusers"));
    let path = dir.join("pytorch_lora_weights.safetensors");
    let meta: BTreeMap<String, String> = [("atelier.steps".to_string(), "500".to_string())].into();
    write_lora(&path, &ads, LoraFileFormat::Diffusers, &meta).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let got = header.metadata().clone().unwrap();
    assert_eq!(got.get("format").map(String::as_str), Some("pt"));
    assert_eq!(got.get("atelier.steps").map(String::as_str), Some("500"));
    assert!(!got.contains_key("lora_adapter_metadata"), "no alpha metadata: the scale is folded into B");
    let st = SafeTensors::deserialize(&bytes).unwrap();
    assert_eq!(st.len(), 2 * ads.len(), "only lora_A and lora_B, no alpha tensors");
    // B is stored as alpha/r · B (4 · B: exact in f16 up to the one rounding), A as is.
    let ad = ads.iter().find(|a| a.conv1x1).unwrap();
    let b = st.tensor(&format!("unet.{}.lora_B.weight", ad.name)).unwrap();
    assert_eq!((b.dtype(), b.shape()), (Dtype::F16, &[ad.n_out, RANK, 1, 1][..]));
    let stored: Vec<f32> = b.data().chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect();
    let want: Vec<f32> = ad.b.iter().map(|&x| half::f16::from_f32(4.0 * x).to_f32()).collect();
    assert_eq!(stored, want);

    // lora_adapter_metadata from the caller would be a second alpha: refused, nothing written.
    let bad: BTreeMap<String, String> = [("lora_adapter_metadata".to_string(), r#"{"unet.r": 4}"#.to_string())].into();
    let p2 = dir.join("twice.safetensors");
    let e = write_lora(&p2, &ads, LoraFileFormat::Diffusers, &bad).unwrap_err().to_string();
    assert!(e.contains("lora_adapter_metadata") && e.contains("twice.safetensors"), "{e}");
    assert!(!p2.exists());
}

#[test]
fn from_lora_params_on_the_gpu() {
    let g = gpu();
    let cfg = Sd15Config::tiny();
    let specs = specs(LoraTargets::Transformer);
    let lp = LoraParams::new(g, &specs, seed("params")).unwrap();
    let mut values = random(lp.total, seed("values"));
    // the layout's gaps stay zero, as in the trainer's buffer
    let mut keep = vec![false; lp.total];
    for l in &lp.layers {
        keep[l.off_a..l.off_a + RANK * l.spec.k].fill(true);
        keep[l.off_b..l.off_b + l.spec.n * RANK].fill(true);
    }
    values.iter_mut().zip(&keep).filter(|(_, k)| !**k).for_each(|(v, _)| *v = 0.0);
    lp.write_params(g, &values).unwrap();
    let host = lp.params.to_f32(g).unwrap();
    assert_eq!(host, values);
    let ads = adapters(&lp, &host, &cfg.unet).unwrap();
    assert_eq!(ads.len(), specs.len());
    for (ad, l) in ads.iter().zip(&lp.layers) {
        assert_eq!(ad.name, l.spec.name);
        assert_eq!(ad.a, host[l.off_a..l.off_a + RANK * l.spec.k]);
        assert_eq!(ad.b, host[l.off_b..l.off_b + l.spec.n * RANK]);
        assert_eq!((ad.rank, ad.k_in, ad.n_out, ad.alpha), (RANK, l.spec.k, l.spec.n, ALPHA));
        assert_eq!(ad.conv1x1, l.spec.name.ends_with(".proj_in") || l.spec.name.ends_with(".proj_out"));
    }
    let dir = TempDir::new("params");
    round_trip(&dir, "params", &ads, LoraFileFormat::Kohya, Precision::F16);

    // A host copy of the wrong length is an error; SD-2-style linear projections are no convs.
    assert!(adapters(&lp, &host[1..], &cfg.unet).is_err());
    let mut linear = cfg.unet.clone();
    linear.use_linear_projection = true;
    assert!(adapters(&lp, &host, &linear).unwrap().iter().all(|a| !a.conv1x1));
}

#[test]
fn failed_writes_leave_nothing() {
    let dir = TempDir::new("fail");
    let ads = random_adapters(LoraTargets::Attention, seed("fail"));
    let none = BTreeMap::new();

    // A folder that does not exist: an error naming the path; the folder is not created.
    let missing = dir.join("no-such-folder").join("lora.safetensors");
    let e = write_lora(&missing, &ads, LoraFileFormat::Kohya, &none).unwrap_err().to_string();
    assert!(e.contains(&missing.display().to_string()), "{e}");
    assert!(!dir.join("no-such-folder").exists());
    assert!(dir.listing().is_empty(), "{:?}", dir.listing());

    // The rename fails (a folder holds the name): the temporary file is removed.
    let taken = dir.join("taken.safetensors");
    std::fs::create_dir(&taken).unwrap();
    let e = write_lora(&taken, &ads, LoraFileFormat::Diffusers, &none).unwrap_err().to_string();
    assert!(e.contains("taken.safetensors"), "{e}");
    assert_eq!(dir.listing(), ["taken.safetensors"]);
    assert!(taken.is_dir());

    // A diverged adapter (NaN) is refused before anything is written: an earlier file at the
    // path stays as it was.
    let good = dir.join("lora.safetensors");
    write_lora(&good, &ads, LoraFileFormat::Kohya, &none).unwrap();
    let before = std::fs::read(&good).unwrap();
    let mut bad = ads.clone();
    bad[2].b[5] = f32::NAN;
    let e = write_lora(&good, &bad, LoraFileFormat::Kohya, &none).unwrap_err().to_string();
    assert!(e.contains(&bad[2].name) && e.contains("NaN") && e.contains("lora.safetensors"), "{e}");
    assert_eq!(std::fs::read(&good).unwrap(), before);
    // Beyond f16's range: refused for f16, written as f32.
    let mut big = ads.clone();
    big[0].a[0] = 1e5;
    let e = write_lora(&good, &big, LoraFileFormat::Kohya, &none).unwrap_err().to_string();
    assert!(e.contains("f16") && e.contains(&big[0].name), "{e}");
    assert_eq!(std::fs::read(&good).unwrap(), before);
    write_lora_with(&dir.join("big.safetensors"), &big, LoraFileFormat::Kohya, &none, Precision::F32).unwrap();
    // Wrong sizes, duplicate modules, no adapters.
    let mut short = ads.clone();
    short[1].a.pop();
    assert!(write_lora(&good, &short, LoraFileFormat::Kohya, &none).unwrap_err().to_string().contains(&short[1].name));
    let dup = vec![ads[0].clone(), ads[0].clone()];
    assert!(write_lora(&good, &dup, LoraFileFormat::Kohya, &none).unwrap_err().to_string().contains("two adapters"));
    assert!(write_lora(&good, &[], LoraFileFormat::Kohya, &none).is_err());
    assert_eq!(std::fs::read(&good).unwrap(), before);
    assert_eq!(dir.listing(), ["big.safetensors", "lora.safetensors", "taken.safetensors"]);
}

#[test]
fn format_names() {
    assert_eq!("kohya".parse::<LoraFileFormat>().unwrap(), LoraFileFormat::Kohya);
    assert_eq!("diffusers".parse::<LoraFileFormat>().unwrap(), LoraFileFormat::Diffusers);
    assert_eq!("Kohya".parse::<LoraFileFormat>().unwrap(), LoraFileFormat::Kohya);
    let e = "peft".parse::<LoraFileFormat>().unwrap_err().to_string();
    assert!(e.contains("peft") && e.contains("kohya") && e.contains("diffusers"), "{e}");
    assert_eq!(LoraFileFormat::Kohya.to_string(), "kohya");
}
