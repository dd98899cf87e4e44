//! Weight files: safetensors, both layouts.
