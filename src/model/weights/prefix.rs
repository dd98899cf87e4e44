//! [`Prefix`]: names under a prefix, with the GPU to upload to, as the model loaders see
//! [`Weights`].

use std::fmt;

use super::Weights;
use crate::error::Result;
use crate::gpu::{DType, Gpu, Tensor};

/// Names under a prefix, with the GPU to upload to: the loaders' view of [`Weights`].
#[derive(Clone)]
pub struct Prefix<'a> {
    pub(super) weights: &'a Weights,
    pub(super) gpu: &'a Gpu,
    pub(super) prefix: String,
    /// The loader marks the convolutions under this prefix for Winograd form (see
    /// [`Prefix::winograd`]); inherited by longer prefixes.
    pub(super) winograd: bool,
}

impl<'a> Prefix<'a> {
    /// A longer prefix: `w.at("resnets").at(0)` is `<prefix>.resnets.0`.
    pub fn at(&self, sub: impl fmt::Display) -> Prefix<'a> {
        Prefix { weights: self.weights, gpu: self.gpu, prefix: self.name(&sub.to_string()), winograd: self.winograd }
    }

    /// This prefix with its 3x3 stride-1 convolutions marked (`on`) for Winograd form or not:
    /// a model's loader marks the blocks where it pays. They are kept so only when the weights
    /// were opened with [`LoadOptions::winograd`](super::LoadOptions::winograd)
    /// ([`Prefix::wants_winograd`]).
    pub fn winograd(&self, on: bool) -> Prefix<'a> {
        Prefix { winograd: on, ..self.clone() }
    }

    /// Whether convolutions under this prefix are to be kept in Winograd form.
    pub fn wants_winograd(&self) -> bool {
        self.winograd && self.weights.winograd()
    }

    /// The full name of a key under this prefix.
    pub fn name(&self, key: &str) -> String {
        let key = key.trim_matches('.');
        match (self.prefix.is_empty(), key.is_empty()) {
            (true, _) => key.to_string(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{key}", self.prefix),
        }
    }

    /// The prefix itself.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// [`Weights::get`] of `<prefix>.<key>`.
    pub fn get(&self, key: &str, expected: &[usize]) -> Result<Tensor> {
        self.weights.get(self.gpu, &self.name(key), expected)
    }

    /// [`Weights::get_as`] of `<prefix>.<key>`.
    pub fn get_as(&self, key: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
        self.weights.get_as(self.gpu, &self.name(key), expected, dtype)
    }

    /// [`Weights::get_f32`] of `<prefix>.<key>`.
    pub fn get_f32(&self, key: &str, expected: &[usize]) -> Result<Vec<f32>> {
        self.weights.get_f32(&self.name(key), expected)
    }

    /// Uploads values made from this prefix's tensors (a reordered convolution weight, fused
    /// projections) as f16 tensor `<prefix>.<key>`, counted in the load report like the rest.
    pub fn upload(&self, key: &str, shape: &[usize], values: &[f32]) -> Result<Tensor> {
        let t = Tensor::from_f32(self.gpu, shape, DType::F16, values, &self.name(key))?;
        self.weights.uploaded(self.gpu, t.bytes())?;
        Ok(t)
    }

    /// True if the files hold `<prefix>.<key>`.
    pub fn contains(&self, key: &str) -> bool {
        self.weights.contains(&self.name(key))
    }

    /// The weights.
    pub fn weights(&self) -> &'a Weights {
        self.weights
    }

    /// The GPU tensors are uploaded to.
    pub fn gpu(&self) -> &'a Gpu {
        self.gpu
    }
}
