//! `atelier train`: LoRA training from a folder of images to a LoRA file other tools load.
//! `data` finds the images and their captions and prepares them (resize, crop, flip);
//! `export` writes the adapters as kohya or diffusers LoRA files.

pub mod data;
pub mod export;
