//! Shader portability and layout: every shader and every pipeline variant the launchers can
//! ask for parses and validates with naga and translates to SPIR-V, and (cooperative
//! matrices aside) to MSL and HLSL, so Metal and DX12 users never meet a shader only Vulkan
//! accepts; every Rust uniform struct matches its WGSL struct's layout.

use std::collections::HashSet;

use atelier::gpu::Shader;
use atelier::kernels;

fn parse(shader: Shader) -> (naga::Module, naga::valid::ModuleInfo) {
    let module = naga::front::wgsl::parse_str(shader.source())
        .unwrap_or_else(|e| panic!("{}: {}", shader.name(), e.emit_to_string(shader.source())));
    let info = naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
        .validate(&module)
        .unwrap_or_else(|e| panic!("{}: {}", shader.name(), e.emit_to_string(shader.source())));
    (module, info)
}

#[test]
fn every_variant_validates_and_translates() {
    let mut seen = HashSet::new();
    let keys = kernels::pipeline_variants();
    assert!(keys.len() > 40, "variant list looks truncated: {}", keys.len());
    for key in keys {
        seen.insert(key.shader);
        let (module, info) = parse(key.shader);
        let mut constants = naga::back::PipelineConstants::default();
        for (k, v) in &key.overrides {
            constants.insert(k.to_string(), *v as f64);
        }
        let ep = (naga::ShaderStage::Compute, key.entry);
        let (module, info) = naga::back::pipeline_constants::process_overrides(&module, &info, Some(ep), &constants)
            .unwrap_or_else(|e| panic!("{key}: overrides: {e}"));
        // The processed module must validate again with the constants in place.
        naga::valid::Validator::new(naga::valid::ValidationFlags::all(), naga::valid::Capabilities::all())
            .validate(&module)
            .unwrap_or_else(|e| panic!("{key}: {e:?}"));
        let spv_opts = naga::back::spv::Options::default();
        let spv_pipe = naga::back::spv::PipelineOptions { shader_stage: ep.0, entry_point: key.entry.to_string() };
        naga::back::spv::write_vec(&module, &info, &spv_opts, Some(&spv_pipe))
            .unwrap_or_else(|e| panic!("{key}: SPIR-V: {e}"));
        if key.shader.needs_coop() {
            continue; // Metal offers only 8x8 cooperative matrices, DX12 none: scalar path there.
        }
        let msl_pipe = naga::back::msl::PipelineOptions {
            entry_point: Some((ep.0, key.entry.to_string())),
            ..Default::default()
        };
        naga::back::msl::write_string(&module, &info, &naga::back::msl::Options::default(), &msl_pipe)
            .unwrap_or_else(|e| panic!("{key}: MSL: {e}"));
        let hlsl_opts = naga::back::hlsl::Options::default();
        let hlsl_pipe = naga::back::hlsl::PipelineOptions { entry_point: Some((ep.0, key.entry.to_string())) };
        let mut out = String::new();
        naga::back::hlsl::Writer::new(&mut out, &hlsl_opts, &hlsl_pipe)
            .write(&module, &info, None)
            .unwrap_or_else(|e| panic!("{key}: HLSL: {e}"));
    }
    for s in Shader::ALL {
        assert!(seen.contains(&s), "{} has no variant in kernels::pipeline_variants()", s.name());
    }
}

/// Member names and byte offsets of a WGSL struct, and its size.
fn wgsl_struct(shader: Shader, name: &str) -> (Vec<(String, u32)>, u32) {
    let (module, _) = parse(shader);
    for (_, ty) in module.types.iter() {
        if ty.name.as_deref() == Some(name) {
            if let naga::TypeInner::Struct { members, span } = &ty.inner {
                return (members.iter().map(|m| (m.name.clone().unwrap(), m.offset)).collect(), *span);
            }
        }
    }
    panic!("{} has no struct {name}", shader.name());
}

macro_rules! rust_layout {
    ($t:ty { $($f:ident),* $(,)? }) => {
        (vec![$((stringify!($f).to_string(), std::mem::offset_of!($t, $f) as u32)),*], std::mem::size_of::<$t>() as u32)
    };
}

#[test]
fn uniform_structs_match_wgsl() {
    use atelier::kernels::elementwise::ElementwiseParams;
    use atelier::kernels::matmul::MatmulParams;
    let mm = rust_layout!(MatmulParams { m, n, k, batch, lda, ldb, ldc, flags, stride_a, stride_b, stride_c, alpha, off_a, off_b, off_c, off_bias, ih, iw, cin, ks, stride, pad, oh, ow, bias_rows, bias_ld, _pad0, _pad1 });
    assert_eq!(wgsl_struct(Shader::MatmulScalar, "Params"), mm);
    assert_eq!(wgsl_struct(Shader::MatmulCoop, "Params"), mm);
    use atelier::kernels::norm::NormParams;
    let nm = rust_layout!(NormParams { rows, c, groups, block, nblocks, batch, silu, eps });
    assert_eq!(wgsl_struct(Shader::Norm, "Params"), nm);
    use atelier::kernels::norm_backward::NormBackwardParams;
    let nb = rust_layout!(NormBackwardParams { rows, c, groups, block, nblocks, batch, silu, _pad });
    assert_eq!(wgsl_struct(Shader::NormBackward, "Params"), nb);
    use atelier::kernels::attention::AttentionParams;
    let at = rust_layout!(AttentionParams { batch, heads, lq, lk, d, causal, bq, bk, ldq, ldk, ldv, ldo, off_q, off_k, off_v, off_o, scale, _pad0, _pad1, _pad2 });
    assert_eq!(wgsl_struct(Shader::Attention, "Params"), at);
    assert_eq!(wgsl_struct(Shader::AttentionCoop, "Params"), at);
    assert_eq!(wgsl_struct(Shader::AttentionWarp, "Params"), at);
    use atelier::kernels::attention_backward::AttentionBackwardParams;
    let ab = rust_layout!(AttentionBackwardParams { batch, heads, lq, lk, d, causal, bq, bk, ldq, ldk, ldv, ldo, lddo, lddq, lddk, lddv, off_q, off_k, off_v, off_o, off_do, off_dq, off_dk, off_dv, scale, splits, _pad1, _pad2 });
    assert_eq!(wgsl_struct(Shader::AttentionBackward, "Params"), ab);
    assert_eq!(wgsl_struct(Shader::AttentionBackwardCoop, "Params"), ab);
    assert_eq!(wgsl_struct(Shader::AttentionBackwardWarp, "Params"), ab);
    use atelier::kernels::tensor_ops::TensorOpsParams;
    let to = rust_layout!(TensorOpsParams { words, c1, c2, h, w, shift, oh, ow });
    assert_eq!(wgsl_struct(Shader::TensorOps, "Params"), to);
    let ew = rust_layout!(ElementwiseParams { numel, b_len, op, cols, alpha, beta, ld_src, ld_dst, bias_off, bias_rows, bias_ld, _pad0 });
    assert_eq!(wgsl_struct(Shader::Elementwise, "Params"), ew);
    use atelier::kernels::lora::LoraKernelParams;
    let lo = rust_layout!(LoraKernelParams { numel, salt, threshold, scale, parts, _pad0, _pad1, _pad2 });
    assert_eq!(wgsl_struct(Shader::Lora, "Params"), lo);
    use atelier::kernels::lora_skinny::SkinnyParams;
    let ls = rust_layout!(SkinnyParams { rows, k, r, flags, lda, off_a, off_out, alpha, rows_per_split, splits, numel_out, members, drop_salt, drop_threshold, drop_scale, drop_rank });
    assert_eq!(wgsl_struct(Shader::LoraSkinny, "Params"), ls);
    use atelier::kernels::grad_ops::GradOpsParams;
    let go = rust_layout!(GradOpsParams { n, c1, c2, op, h, w, oh, ow, alpha, flags, _pad0, _pad1 });
    assert_eq!(wgsl_struct(Shader::GradOps, "Params"), go);
    use atelier::kernels::winograd::WinogradParams;
    let wi = rust_layout!(WinogradParams { batch, h, w, c, th, tw, tiles, flags, off_bias, bias_ld, _pad0, _pad1 });
    assert_eq!(wgsl_struct(Shader::Winograd, "Params"), wi);
    use atelier::kernels::conv_thin::ConvThinParams;
    let ct = rust_layout!(ConvThinParams { images, h, w, cin, cout, ks, pad, tiles_x, tiles_y, has_bias, _pad0, _pad1 });
    assert_eq!(wgsl_struct(Shader::ConvThin, "Params"), ct);
    use atelier::kernels::conv_coop::ConvCoopParams;
    let cc = rust_layout!(ConvCoopParams { images, h, w, cin, cout, tiles_x, tiles_y, flags, bias_off, bias_ld, _pad0, _pad1 });
    assert_eq!(wgsl_struct(Shader::ConvCoop, "Params"), cc);
}

/// Each entry point of `shader` with the bindings it reaches, sorted.
fn bindings_reached(shader: Shader) -> Vec<(String, Vec<u32>)> {
    let (module, info) = parse(shader);
    let mut out = Vec::new();
    for (i, ep) in module.entry_points.iter().enumerate() {
        let fi = info.get_entry_point(i);
        let mut used: Vec<u32> = module
            .global_variables
            .iter()
            .filter(|(h, _)| !fi[*h].is_empty())
            .filter_map(|(_, g)| g.binding.as_ref().map(|b| b.binding))
            .collect();
        used.sort();
        out.push((ep.name.clone(), used));
    }
    out
}

/// The bindings each attention-backward entry reaches: wgpu derives a pipeline's bind-group
/// layout from them, and the launcher binds q, k, v, dout, stats and dq (0..=6) for the dq
/// entries, also dv (7) for the dk/dv ones, so an entry reaching one more binding fails at
/// bind-group creation on the device (where cooperative matrices exist; CI has none).
#[test]
fn attention_backward_entries_reach_their_bindings() {
    for shader in [Shader::AttentionBackwardCoop, Shader::AttentionBackwardWarp] {
        for (name, used) in bindings_reached(shader) {
            let want: Vec<u32> = if name.starts_with("attnb_dq") { (0..=6).collect() } else { (0..=7).collect() };
            assert_eq!(used, want, "{}: {name}", shader.name());
        }
    }
}

/// The same for the cooperative-matrix attention forwards: the launcher binds q, k, v, o and
/// lse (o again without SAVE_LSE) at 1..=5 for both shaders' `attn`, so each must reach
/// exactly 0..=5.
#[test]
fn attention_forward_entries_reach_their_bindings() {
    for shader in [Shader::AttentionCoop, Shader::AttentionWarp] {
        let eps = bindings_reached(shader);
        assert_eq!(eps.len(), 1, "{}: one entry point", shader.name());
        for (name, used) in eps {
            assert_eq!((name.as_str(), used), ("attn", (0..=5).collect()), "{}", shader.name());
        }
    }
}
