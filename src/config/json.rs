//! Reading diffusers config files: JSON parsing with SD-1.5-only messages, the refusal of
//! keys whose only supported value is SD-1.5's, and the serde defaults several configs share.

use std::path::Path;

use serde_json::Value;

use crate::{Error, Result};

pub(super) fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).map_err(|source| Error::Io { path: path.into(), source })?;
    serde_json::from_str(&text).map_err(|e| Error::model(path, format!("not valid JSON: {e}")))
}

pub(super) fn parse<T: serde::de::DeserializeOwned>(path: &Path, value: Value) -> Result<T> {
    serde_json::from_value(value).map_err(|e| {
        Error::model(path, format!("{e} (only Stable Diffusion 1.5 models are supported)"))
    })
}

/// Refuses a config whose `key` is present with a value other than the supported one.
pub(super) fn check_fixed(path: &Path, value: &Value, fixed: &[(&str, &str)]) -> Result<()> {
    for (key, want) in fixed {
        let Some(got) = value.get(*key) else { continue };
        let want: Value = serde_json::from_str(want).expect("valid JSON literal");
        let same = match (got.as_f64(), want.as_f64()) {
            (Some(a), Some(b)) => a == b, // 1 and 1.0 are the same
            _ => *got == want,
        };
        if !same {
            return Err(Error::model(
                path,
                format!("{key} is {got}; only Stable Diffusion 1.5's {want} is supported"),
            ));
        }
    }
    Ok(())
}

pub(super) fn nonzero(fields: &[(&str, usize)]) -> std::result::Result<(), String> {
    match fields.iter().find(|(_, v)| *v == 0) {
        Some((k, _)) => Err(format!("{k} is 0")),
        None => Ok(()),
    }
}

pub(super) fn eps_1e5() -> f32 {
    1e-5
}
pub(super) fn groups_32() -> usize {
    32
}
