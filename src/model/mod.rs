//! SD-1.5 models: weight loading, CLIP, UNet, VAE.

pub mod clip;
pub mod clip_train;
pub mod convert;
pub mod sd15;
pub mod layers;
pub mod lora;
pub mod lora_file;
mod lora_stack;
mod lora_keys;
pub mod unet;
pub mod unet_blocks;
pub mod unet_train;
pub mod unet_transformer;
pub mod vae;
pub mod weights;
