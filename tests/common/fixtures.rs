//! Helpers for the model tests: the committed fixtures (tiny random-weight SD-1.5 and the
//! float64 PyTorch references made by `tests/fixtures/make_fixtures.py`), PyTorch's own fp16
//! error on the same inputs (the bound of each comparison), and the library's NCHW <-> NHWC
//! reordering.

use std::path::PathBuf;

#[allow(unused_imports)] // used by the model tests, not by every test binary
pub use atelier::model::layers::{nchw_to_nhwc, nhwc_to_nchw};
use safetensors::{Dtype, SafeTensors};

/// A path under tests/fixtures.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(rel)
}

/// A reference file's tensors, read as f32 (int32 tensors too).
pub struct Reference {
    bytes: Vec<u8>,
    rel: String,
}

impl Reference {
    pub fn open(rel: &str) -> Reference {
        let bytes = std::fs::read(fixture(rel))
            .unwrap_or_else(|e| panic!("{rel}: {e} (made by tests/fixtures/make_fixtures.py)"));
        Reference { bytes, rel: rel.to_string() }
    }

    /// (shape, values) of `name`.
    pub fn get(&self, name: &str) -> (Vec<usize>, Vec<f32>) {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let t = st.tensor(name).unwrap_or_else(|_| panic!("{}: no tensor {name}", self.rel));
        let v = match t.dtype() {
            Dtype::F32 => t
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            Dtype::I32 => t
                .data()
                .chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]]) as f32)
                .collect(),
            d => panic!("{}: {name} is {d:?}", self.rel),
        };
        (t.shape().to_vec(), v)
    }

    /// The file's metadata entry `key`, parsed as JSON.
    #[allow(dead_code)] // used by the training tests only
    pub fn notes(&self, key: &str) -> serde_json::Value {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).unwrap();
        let text = meta.metadata().as_ref().and_then(|m| m.get(key)).unwrap_or_else(|| panic!("{}: no metadata {key}", self.rel));
        serde_json::from_str(text).unwrap()
    }

    /// The names starting with `prefix`.
    pub fn names(&self, prefix: &str) -> Vec<String> {
        let st = SafeTensors::deserialize(&self.bytes).unwrap();
        let mut v: Vec<String> = st
            .names()
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .map(|n| n.to_string())
            .collect();
        v.sort();
        v
    }
}

/// PyTorch's relative L2 error with fp16 weights and inputs against the float64 reference, on
/// the same inputs (reference_errors.json): `model` is clip, unet or vae.
pub fn torch_fp16_error(model: &str, name: &str) -> f64 {
    let text = std::fs::read_to_string(fixture("reference_errors.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v[model][name]["fp16"]
        .as_f64()
        .unwrap_or_else(|| panic!("reference_errors.json has no {model}.{name}.fp16"))
}

/// Relative L2 error of `out` against `reference`; panics past `bound`.
pub fn check_close(what: &str, out: &[f32], reference: &[f32], bound: f64) -> f64 {
    let r: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
    let err = super::rel_l2(out, &r);
    eprintln!("{what}: relative L2 error {err:.3e} (bound {bound:.3e})");
    assert!(err <= bound, "{what}: relative L2 error {err:.3e} over the bound {bound:.3e}");
    err
}
