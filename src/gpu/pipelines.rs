//! Shader modules and compute pipelines, cached by a typed key (shader, entry point, override
//! constants) whose display string is the pipeline's label and the profiler's row name; and
//! `Dispatch`, one prepared kernel launch (pipeline + bind group + grid), built once and
//! recorded as often as needed.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use wgpu::util::DeviceExt;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::tensor::Tensor;

/// Every WGSL source of the engine: one file per op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shader {
    MatmulScalar,
    MatmulCoop,
    Elementwise,
    Norm,
    NormBackward,
    Attention,
    AttentionCoop,
    AttentionWarp,
    AttentionBackward,
    AttentionBackwardCoop,
    AttentionBackwardWarp,
    TensorOps,
    Lora,
    LoraSkinny,
    GradOps,
}

impl Shader {
    /// All shaders, for the validation tests.
    pub const ALL: [Shader; 15] = [
        Shader::MatmulScalar,
        Shader::MatmulCoop,
        Shader::Elementwise,
        Shader::Norm,
        Shader::NormBackward,
        Shader::Attention,
        Shader::AttentionCoop,
        Shader::AttentionWarp,
        Shader::AttentionBackward,
        Shader::AttentionBackwardCoop,
        Shader::AttentionBackwardWarp,
        Shader::TensorOps,
        Shader::Lora,
        Shader::LoraSkinny,
        Shader::GradOps,
    ];

    /// File stem under `shaders/`.
    pub fn name(self) -> &'static str {
        match self {
            Shader::MatmulScalar => "matmul_scalar",
            Shader::MatmulCoop => "matmul_coop",
            Shader::Elementwise => "elementwise",
            Shader::Norm => "norm",
            Shader::NormBackward => "norm_backward",
            Shader::Attention => "attention",
            Shader::AttentionCoop => "attention_coop",
            Shader::AttentionWarp => "attention_warp",
            Shader::AttentionBackward => "attention_backward",
            Shader::AttentionBackwardCoop => "attention_backward_coop",
            Shader::AttentionBackwardWarp => "attention_backward_warp",
            Shader::TensorOps => "tensor_ops",
            Shader::Lora => "lora",
            Shader::LoraSkinny => "lora_skinny",
            Shader::GradOps => "grad_ops",
        }
    }

    /// The WGSL source: embedded in the binary, or for kernel work read from
    /// `$ATELIER_SHADER_DIR/<name>.wgsl` when that variable is set and the file exists (read
    /// once per process; lets one build time several versions of a shader).
    pub fn source(self) -> &'static str {
        if let Some(s) = self.source_from_dir() {
            return s;
        }
        self.embedded_source()
    }

    fn source_from_dir(self) -> Option<&'static str> {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock};
        static CACHE: OnceLock<Mutex<HashMap<Shader, Option<&'static str>>>> = OnceLock::new();
        let dir = std::env::var_os("ATELIER_SHADER_DIR")?;
        let mut cache = CACHE.get_or_init(Default::default).lock().ok()?;
        *cache.entry(self).or_insert_with(|| {
            let path = std::path::Path::new(&dir).join(format!("{}.wgsl", self.name()));
            let text = std::fs::read_to_string(&path).ok()?;
            eprintln!("atelier: {} from {}", self.name(), path.display());
            Some(Box::leak(text.into_boxed_str()))
        })
    }

    /// The WGSL source embedded in the binary.
    pub fn embedded_source(self) -> &'static str {
        match self {
            Shader::MatmulScalar => include_str!("../../shaders/matmul_scalar.wgsl"),
            Shader::MatmulCoop => include_str!("../../shaders/matmul_coop.wgsl"),
            Shader::Elementwise => include_str!("../../shaders/elementwise.wgsl"),
            Shader::Norm => include_str!("../../shaders/norm.wgsl"),
            Shader::NormBackward => include_str!("../../shaders/norm_backward.wgsl"),
            Shader::Attention => include_str!("../../shaders/attention.wgsl"),
            Shader::AttentionCoop => include_str!("../../shaders/attention_coop.wgsl"),
            Shader::AttentionWarp => include_str!("../../shaders/attention_warp.wgsl"),
            Shader::AttentionBackward => include_str!("../../shaders/attention_backward.wgsl"),
            Shader::AttentionBackwardCoop => include_str!("../../shaders/attention_backward_coop.wgsl"),
            Shader::AttentionBackwardWarp => include_str!("../../shaders/attention_backward_warp.wgsl"),
            Shader::TensorOps => include_str!("../../shaders/tensor_ops.wgsl"),
            Shader::Lora => include_str!("../../shaders/lora.wgsl"),
            Shader::LoraSkinny => include_str!("../../shaders/lora_skinny.wgsl"),
            Shader::GradOps => include_str!("../../shaders/grad_ops.wgsl"),
        }
    }

    /// Whether the shader needs shader-f16 and cooperative matrices (the coop path).
    pub fn needs_coop(self) -> bool {
        matches!(
            self,
            Shader::MatmulCoop | Shader::AttentionCoop | Shader::AttentionWarp | Shader::AttentionBackwardCoop | Shader::AttentionBackwardWarp
        )
    }
}

/// Identifies one compute pipeline: shader, entry point and override constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PipelineKey {
    pub shader: Shader,
    pub entry: &'static str,
    /// Override constants by name; integers and booleans (0/1) only.
    pub overrides: Vec<(&'static str, i64)>,
}

impl PipelineKey {
    pub fn new(shader: Shader, entry: &'static str) -> Self {
        PipelineKey { shader, entry, overrides: Vec::new() }
    }

    /// Adds an override constant.
    pub fn with(mut self, name: &'static str, value: i64) -> Self {
        self.overrides.push((name, value));
        self
    }
}

impl std::fmt::Display for PipelineKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.shader.name(), self.entry)?;
        if !self.overrides.is_empty() {
            let o: Vec<String> = self.overrides.iter().map(|(k, v)| format!("{k}={v}")).collect();
            write!(f, "[{}]", o.join(","))?;
        }
        Ok(())
    }
}

/// Pipelines and modules made so far on one device.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<Shader, wgpu::ShaderModule>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
}

fn scope_error(what: &str, scope: wgpu::ErrorScopeGuard) -> Result<()> {
    match pollster::block_on(scope.pop()) {
        Some(e) => Err(Error::Gpu(format!("{what}: {e}"))),
        None => Ok(()),
    }
}

impl Gpu {
    /// The shader module for `shader`, created once, with runtime bounds checks off unless the
    /// debug switch asks for them (they cost about 45x; the op tests prove the kernels stay in
    /// bounds).
    pub fn module(&self, shader: Shader) -> Result<wgpu::ShaderModule> {
        let mut modules = self.pipelines.modules.lock().unwrap();
        if let Some(m) = modules.get(&shader) {
            return Ok(m.clone());
        }
        if shader.needs_coop() && !self.caps.coop_16x16_f16_f32 {
            return Err(Error::Gpu(format!(
                "shader {} needs cooperative matrices, which this device does not offer",
                shader.name()
            )));
        }
        let checks = if self.caps.shader_checks {
            wgpu::ShaderRuntimeChecks::checked()
        } else {
            wgpu::ShaderRuntimeChecks::unchecked()
        };
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        // SAFETY: the kernels bound every access themselves; the op tests run them on odd
        // shapes with poisoned outputs, and ATELIER_SHADER_CHECKS=1 restores the checks.
        let m = unsafe {
            self.device.create_shader_module_trusted(
                wgpu::ShaderModuleDescriptor {
                    label: Some(shader.name()),
                    source: wgpu::ShaderSource::Wgsl(shader.source().into()),
                },
                checks,
            )
        };
        scope_error(&format!("compiling shader {}", shader.name()), scope)?;
        modules.insert(shader, m.clone());
        Ok(m)
    }

    /// The compute pipeline for `key`, created on first use.
    pub fn pipeline(&self, key: &PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(p) = self.pipelines.pipelines.lock().unwrap().get(key) {
            return Ok(p.clone());
        }
        let module = self.module(key.shader)?;
        let label = key.to_string();
        let constants: Vec<(&str, f64)> = key.overrides.iter().map(|&(k, v)| (k, v as f64)).collect();
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let p = self.device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: None,
            module: &module,
            entry_point: Some(key.entry),
            compilation_options: wgpu::PipelineCompilationOptions {
                constants: &constants,
                zero_initialize_workgroup_memory: false,
            },
            cache: None,
        });
        scope_error(&format!("creating pipeline {label}"), scope)?;
        let p = Arc::new(p);
        self.pipelines.pipelines.lock().unwrap().insert(key.clone(), p.clone());
        Ok(p)
    }

    /// Prepares one launch: binding 0 is the uniform block `params`, bindings 1.. the tensors
    /// in order. `flops` and `bytes` are what the launch computes and moves, for the profiler.
    pub fn dispatch<U: bytemuck::Pod>(
        &self,
        key: &PipelineKey,
        params: &U,
        tensors: &[&Tensor],
        groups: [u32; 3],
        flops: f64,
        bytes: f64,
    ) -> Result<Dispatch> {
        let bound: Vec<(u32, &Tensor)> = tensors.iter().enumerate().map(|(i, &t)| (i as u32 + 1, t)).collect();
        self.dispatch_at(key, params, &bound, groups, flops, bytes)
    }

    /// As [`Gpu::dispatch`], with each tensor's binding number given: for an entry point that
    /// uses bindings other than 1..=n of its shader (binding 0 is still `params`).
    pub fn dispatch_at<U: bytemuck::Pod>(
        &self,
        key: &PipelineKey,
        params: &U,
        tensors: &[(u32, &Tensor)],
        groups: [u32; 3],
        flops: f64,
        bytes: f64,
    ) -> Result<Dispatch> {
        let max = self.caps.limits.max_compute_workgroups_per_dimension;
        if groups.iter().any(|&g| g > max) {
            return Err(Error::TooLarge {
                what: format!("launch of {key} with grid {groups:?}"),
                bytes: *groups.iter().max().unwrap() as u64,
                limit: max as u64,
                limit_name: "max_compute_workgroups_per_dimension",
            });
        }
        let pipeline = self.pipeline(key)?;
        let ubuf = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: ubuf.as_entire_binding() }];
        for &(binding, t) in tensors {
            entries.push(wgpu::BindGroupEntry { binding, resource: t.binding() });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: None,
            layout: &pipeline.get_bind_group_layout(0),
            entries: &entries,
        });
        Ok(Dispatch { pipeline, bind_group, groups, label: key.to_string().into(), flops, bytes })
    }
}

/// One prepared kernel launch.
#[derive(Clone, Debug)]
pub struct Dispatch {
    pub pipeline: Arc<wgpu::ComputePipeline>,
    pub bind_group: wgpu::BindGroup,
    pub groups: [u32; 3],
    /// The pipeline key's display string.
    pub label: Arc<str>,
    /// Floating-point operations of one launch (0 for memory-bound kernels).
    pub flops: f64,
    /// Bytes one launch must read and write at least.
    pub bytes: f64,
}
