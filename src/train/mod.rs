//! `atelier train`: LoRA training from a folder of images to a LoRA file other tools load.
//! `data` finds the images and their captions and prepares them (resize, crop, flip);
//! `inputs` caches latents and text embeddings and makes each step's inputs;
//! `export` writes the adapters as kohya or diffusers LoRA files; `trainer` is the loop,
//! `schedule` its learning-rate schedules and seeds, `checkpoint` its saved state, `plot` the
//! loss curve, `cache` the optional on-disk cache of latents and text embeddings,
//! `prefetch` the images decoded ahead of the caching epoch, `validation` the image grids
//! drawn while it trains.

pub mod cache;
pub mod checkpoint;
pub mod data;
pub mod export;
pub mod inputs;
pub mod plot;
pub mod prefetch;
pub mod schedule;
pub mod trainer;
pub mod validation;
