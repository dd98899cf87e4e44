//! SD-1.5 models: weight loading, CLIP, UNet, VAE.

pub mod convert;
pub mod weights;
