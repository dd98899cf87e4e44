//! Kernel launchers, one file per shader family. Each validates its shapes, picks the
//! pipeline variant and declares the flops and bytes of a launch for the profiler.

pub mod attention;
pub mod attention_backward;
pub mod conv;
pub mod conv_coop;
pub mod conv_thin;
pub mod elementwise;
pub mod grad_ops;
pub mod lora;
pub mod lora_skinny;
pub mod matmul;
pub mod norm;
pub mod norm_backward;
pub mod tensor_ops;
pub mod winograd;

use crate::gpu::{PipelineKey, Shader};

/// The grid for one invocation per unit in workgroups of 256: 2-D when one dimension is not
/// enough (the shaders fold it back as (wg.y·num_wg.x + wg.x)·256 + local index).
pub(crate) fn grid(units: usize) -> [u32; 3] {
    let g = units.div_ceil(256).max(1) as u32;
    if g <= 65535 { [g, 1, 1] } else { [65535, g.div_ceil(65535), 1] }
}

/// Every pipeline variant the launchers can ask for: the shader tests validate and translate
/// each one, so no variant first fails on a user's machine.
pub fn pipeline_variants() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for ta in [false, true] {
        for tb in [false, true] {
            for out_f32 in [false, true] {
                keys.push(matmul::scalar_key(ta, tb, out_f32, false));
                for t in matmul::CoopTile::ALL {
                    keys.push(t.key(ta, tb, out_f32, false));
                    keys.push(t.key(ta, tb, out_f32, false).with("VEC", 1));
                }
            }
        }
    }
    // Convolutions: A gathered from an image, the weight [cout, ks, ks, cin] (TRANS_B).
    for out_f32 in [false, true] {
        keys.push(matmul::scalar_key(false, true, out_f32, true));
        for t in matmul::CoopTile::ALL {
            keys.push(t.key(false, true, out_f32, true));
            keys.push(t.key(false, true, out_f32, true).with("VEC", 1));
        }
    }
    // Forward convolutions with a bias per image (the UNet's resnets' conv1, f16 out).
    keys.push(matmul::scalar_key(false, true, false, true).with("PER_IMAGE_BIAS", 1));
    for t in matmul::CoopTile::ALL {
        keys.push(t.key(false, true, false, true).with("PER_IMAGE_BIAS", 1));
        keys.push(t.key(false, true, false, true).with("PER_IMAGE_BIAS", 1).with("VEC", 1));
    }
    // Upsample-then-convolve as four phase convolutions (`conv::Upsample2xConv`, f16 out).
    keys.push(matmul::scalar_key(false, true, false, true).with("PHASES", 1));
    for t in matmul::CoopTile::ALL {
        keys.push(t.key(false, true, false, true).with("PHASES", 1));
        keys.push(t.key(false, true, false, true).with("PHASES", 1).with("VEC", 1));
    }
    // Transposed convolutions (the CONV_T gather) with the weight as given (TRANS_B).
    for out_f32 in [false, true] {
        keys.push(matmul::scalar_key(false, true, out_f32, true).with("CONV_T", 1));
        for t in matmul::CoopTile::ALL {
            keys.push(t.key(false, true, out_f32, true).with("CONV_T", 1));
            keys.push(t.key(false, true, out_f32, true).with("CONV_T", 1).with("VEC", 1));
        }
    }
    // Convolutions' input gradients (`Conv2d::backward_input`): the forward weight read
    // flipped through the B_FLIP remap (not TRANS_B), stride 1 (CONV) and strided (CONV_T),
    // with the overrides in the order the launcher adds them.
    for conv_t in [false, true] {
        for out_f32 in [false, true] {
            let with = |k: crate::gpu::PipelineKey| {
                let k = if conv_t { k.with("CONV_T", 1) } else { k };
                k.with("B_FLIP", 1)
            };
            keys.push(with(matmul::scalar_key(false, false, out_f32, true)));
            for t in matmul::CoopTile::ALL {
                keys.push(with(t.key(false, false, out_f32, true)));
            }
        }
    }
    for entry in ["unary", "binary", "copy2d", "convert", "splitk_sum"] {
        for i in [false, true] {
            for o in [false, true] {
                keys.push(
                    PipelineKey::new(Shader::Elementwise, entry)
                        .with("IN_F32", i as i64)
                        .with("OUT_F32", o as i64),
                );
            }
        }
    }
    for entry in ["gn_stats", "gn_final", "gn_apply", "ln", "ln_save"] {
        keys.push(PipelineKey::new(Shader::Norm, entry));
    }
    keys.extend(norm_backward::variants());
    keys.push(attention::key());
    keys.push(attention::key_saving());
    keys.extend(attention::coop_variants());
    keys.extend(attention_backward::variants());
    for entry in tensor_ops::ENTRIES {
        keys.push(PipelineKey::new(Shader::TensorOps, entry));
    }
    keys.extend(lora::variants());
    keys.extend(lora_skinny::variants());
    keys.extend(grad_ops::variants());
    keys.push(winograd::key("weight"));
    keys.push(winograd::key("input"));
    keys.push(winograd::key("output"));
    keys.push(conv_thin::key());
    keys.extend(conv_coop::variants());
    keys
}
