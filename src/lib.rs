//! atelier: Stable Diffusion 1.5 on wgpu, with hand-written WGSL kernels (f16 storage, f32
//! arithmetic) for inference and LoRA training on any Vulkan / Metal / DX12 GPU.

pub mod bench;
pub mod bench_conv;
pub mod bench_models;
pub mod bench_train;
pub mod config;
pub mod error;
pub mod gpu;
pub mod images;
pub mod kernels;
pub mod model;
pub mod pipeline;
pub mod progress;
pub mod rng;
pub mod sample;
pub mod schedulers;
pub mod tokenizer;
pub mod train;

pub use error::{Error, Result};
