//! Shader modules and compute pipelines, cached by a typed key (shader, entry point, override
//! constants) whose display string is the pipeline's label and the profiler's row name, and
//! compiled on background threads (`PipelineSlot`); and
//! `Dispatch`, one prepared kernel launch (pipeline + bind group + grid), built once and
//! recorded as often as needed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock, mpsc};

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
    Winograd,
    ConvThin,
    ConvCoop,
}

impl Shader {
    /// All shaders, for the validation tests.
    pub const ALL: [Shader; 18] = [
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
        Shader::Winograd,
        Shader::ConvThin,
        Shader::ConvCoop,
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
            Shader::Winograd => "winograd",
            Shader::ConvThin => "conv_thin",
            Shader::ConvCoop => "conv_coop",
        }
    }

    /// The WGSL source: the shader's file embedded in the binary, or for kernel work read from
    /// `$ATELIER_SHADER_DIR/<name>.wgsl` when that variable is set and the file exists (read
    /// once per process; lets one build time several versions of a shader), followed either
    /// way by the shared code of [`Shader::appended`].
    pub fn source(self) -> &'static str {
        use std::collections::HashMap;
        use std::sync::{Mutex, OnceLock, PoisonError};
        static CACHE: OnceLock<Mutex<HashMap<Shader, &'static str>>> = OnceLock::new();
        let mut cache = CACHE.get_or_init(Default::default).lock().unwrap_or_else(PoisonError::into_inner);
        cache.entry(self).or_insert_with(|| match (self.file_from_dir(), self.appended()) {
            (None, "") => self.embedded_source(),
            (own, shared) => {
                let own = own.unwrap_or_else(|| self.embedded_source().to_string());
                Box::leak((own + shared).into_boxed_str())
            }
        })
    }

    /// The shader's file from `$ATELIER_SHADER_DIR`, when set and there.
    fn file_from_dir(self) -> Option<String> {
        let dir = std::env::var_os("ATELIER_SHADER_DIR")?;
        let path = std::path::Path::new(&dir).join(format!("{}.wgsl", self.name()));
        let text = std::fs::read_to_string(&path).ok()?;
        eprintln!("atelier: {} from {}", self.name(), path.display());
        Some(text)
    }

    /// The shader's own file as embedded in the binary (without [`Shader::appended`]).
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
            Shader::Winograd => include_str!("../../shaders/winograd.wgsl"),
            Shader::ConvThin => include_str!("../../shaders/conv_thin.wgsl"),
            Shader::ConvCoop => include_str!("../../shaders/conv_coop.wgsl"),
        }
    }

    /// WGSL shared by several shaders, appended to this one's file: the dropout hash
    /// (`shaders/dropout_hash.wgsl`) of the LoRA kernels, whose masks must agree.
    pub fn appended(self) -> &'static str {
        match self {
            Shader::Lora | Shader::LoraSkinny => include_str!("../../shaders/dropout_hash.wgsl"),
            _ => "",
        }
    }

    /// Whether the shader needs shader-f16 and cooperative matrices (the coop path).
    pub fn needs_coop(self) -> bool {
        matches!(
            self,
            Shader::MatmulCoop | Shader::AttentionCoop | Shader::AttentionWarp | Shader::AttentionBackwardCoop | Shader::AttentionBackwardWarp | Shader::ConvCoop
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

/// How a shader declares one of its bindings (all are buffers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindingKind {
    Uniform,
    Storage { read_only: bool },
}

/// A shader's source parsed and validated by naga, and how each of its entry points uses
/// each group-0 binding: what the pipeline cache's explicit layouts and the driver statistics
/// (`driver_stats`) are made from.
pub(crate) struct ParsedShader {
    pub module: naga::Module,
    pub info: naga::valid::ModuleInfo,
    pub bindings: EntryBindings,
}

impl ParsedShader {
    /// Parses `shader`'s source and validates it with `flags`.
    pub(crate) fn new(shader: Shader, flags: naga::valid::ValidationFlags) -> Result<ParsedShader> {
        let source = shader.source();
        let fail = |what: String| Error::Gpu(format!("compiling shader {}: {what}", shader.name()));
        let module = naga::front::wgsl::parse_str(source).map_err(|e| fail(e.emit_to_string(source)))?;
        let info = naga::valid::Validator::new(flags, naga::valid::Capabilities::all())
            .validate(&module)
            .map_err(|e| fail(e.emit_to_string(source)))?;
        let bindings = entry_bindings(shader, &module, &info)?;
        Ok(ParsedShader { module, info, bindings })
    }
}

/// Per entry point of a parsed and validated `shader`, the group-0 bindings it uses and how
/// (two entries may declare one binding number differently).
fn entry_bindings(shader: Shader, parsed: &naga::Module, info: &naga::valid::ModuleInfo) -> Result<EntryBindings> {
    let mut bindings = HashMap::new();
    for (i, ep) in parsed.entry_points.iter().enumerate() {
        let uses = info.get_entry_point(i);
        let mut kinds = HashMap::new();
        for (h, var) in parsed.global_variables.iter() {
            let Some(b) = var.binding.as_ref().filter(|b| b.group == 0 && !uses[h].is_empty()) else { continue };
            let kind = match var.space {
                naga::AddressSpace::Uniform => BindingKind::Uniform,
                naga::AddressSpace::Storage { access } => BindingKind::Storage { read_only: !access.contains(naga::StorageAccess::STORE) },
                other => return Err(Error::Gpu(format!("shader {}: binding {} in {other:?} (only buffers are supported)", shader.name(), b.binding))),
            };
            kinds.insert(b.binding, kind);
        }
        bindings.insert(ep.name.clone(), kinds);
    }
    Ok(bindings)
}

/// The binding numbers a dispatch binds, sorted.
type Bindings = Vec<u32>;
/// A bind-group layout and the pipeline layout made of it.
type Layouts = (wgpu::BindGroupLayout, wgpu::PipelineLayout);

/// Per entry point, each group-0 binding it uses and how.
pub(crate) type EntryBindings = HashMap<String, HashMap<u32, BindingKind>>;

/// One compute pipeline, compiled off the recording thread where possible: plans prepare all
/// their dispatches before the first is recorded, so the cache's worker threads compile a
/// plan's pipelines in parallel while the plan is still being built. The driver's compiler is
/// most of a cold start: `atelier train`'s first step ended 15.7 s after the loop began with
/// one thread and an empty driver cache, 4.8 s with 4 threads, 1.9 s with 15 (0.35 s with the
/// driver's cache warm; H100 machine, 16 cores). Whoever needs a pipeline first compiles it;
/// a second caller waits for that result. Bind groups use explicit layouts derived from the
/// shader source, so they need no compiled pipeline.
pub struct PipelineSlot {
    key: PipelineKey,
    module: wgpu::ShaderModule,
    /// The bind-group layout its dispatches' bind groups use, and the pipeline layout of it.
    bind_layout: wgpu::BindGroupLayout,
    layout: wgpu::PipelineLayout,
    compiled: OnceLock<std::result::Result<wgpu::ComputePipeline, String>>,
}

impl std::fmt::Debug for PipelineSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PipelineSlot({}, compiled: {})", self.key, self.compiled.get().is_some())
    }
}

impl PipelineSlot {
    /// The compiled pipeline: compiled now on this thread unless another thread has done it
    /// or is doing it (then this waits for it).
    pub fn get(&self, device: &wgpu::Device) -> Result<&wgpu::ComputePipeline> {
        self.compiled.get_or_init(|| self.compile(device)).as_ref().map_err(|e| Error::Gpu(e.clone()))
    }

    fn compile(&self, device: &wgpu::Device) -> std::result::Result<wgpu::ComputePipeline, String> {
        let label = self.key.to_string();
        let constants: Vec<(&str, f64)> = self.key.overrides.iter().map(|&(k, v)| (k, v as f64)).collect();
        // Error scopes are per thread: this one sees only this creation.
        let scope = device.push_error_scope(wgpu::ErrorFilter::Validation);
        let p = device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
            label: Some(&label),
            layout: Some(&self.layout),
            module: &self.module,
            entry_point: Some(self.key.entry),
            compilation_options: wgpu::PipelineCompilationOptions { constants: &constants, zero_initialize_workgroup_memory: false },
            cache: None,
        });
        match pollster::block_on(scope.pop()) {
            Some(e) => Err(format!("creating pipeline {label}: {e}")),
            None => Ok(p),
        }
    }
}

/// Threads that compile queued pipelines in the background. Dropping them (with the device's
/// pipeline cache) skips what is still queued and joins them: a thread still inside the driver
/// when the process exits crashes it.
struct Workers {
    jobs: Option<mpsc::Sender<Arc<PipelineSlot>>>,
    closing: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Workers {
    /// `ATELIER_COMPILE_THREADS` threads (0: none, every pipeline is compiled when first
    /// recorded), by default one less than the CPU's cores, at most 16.
    fn start(device: &wgpu::Device) -> Option<Workers> {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let n = std::env::var("ATELIER_COMPILE_THREADS")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .unwrap_or_else(|| cores.saturating_sub(1).clamp(1, 16));
        let (jobs, queue) = mpsc::channel::<Arc<PipelineSlot>>();
        let queue = Arc::new(Mutex::new(queue));
        let closing = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for i in 0..n {
            let (queue, device, closing) = (queue.clone(), device.clone(), closing.clone());
            let worker = move || loop {
                let job = queue.lock().map_err(|_| ()).and_then(|q| q.recv().map_err(|_| ()));
                match job {
                    Ok(_) if closing.load(Ordering::Relaxed) => break,
                    // A compile error is kept in the slot and reported where it is recorded.
                    Ok(slot) => drop(slot.get(&device)),
                    Err(()) => break,
                }
            };
            match std::thread::Builder::new().name(format!("atelier-compile-{i}")).spawn(worker) {
                Ok(t) => threads.push(t),
                // Without threads every pipeline is compiled where it is first recorded.
                Err(_) => break,
            }
        }
        (!threads.is_empty()).then_some(Workers { jobs: Some(jobs), closing, threads })
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::Relaxed);
        self.jobs = None;
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// Shader modules (with how each entry point uses its bindings), bind-group and pipeline
/// layouts per (shader, entry point, bindings bound), and pipelines, made so far on one device.
#[derive(Default)]
pub struct PipelineCache {
    modules: Mutex<HashMap<Shader, (wgpu::ShaderModule, Arc<EntryBindings>)>>,
    layouts: Mutex<HashMap<(Shader, &'static str, Bindings), Layouts>>,
    pipelines: Mutex<HashMap<(PipelineKey, Bindings), Arc<PipelineSlot>>>,
    workers: OnceLock<Option<Workers>>,
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
        Ok(self.module_and_bindings(shader)?.0)
    }

    /// The keys of every pipeline made so far on this device, sorted by label.
    pub fn pipeline_keys(&self) -> Vec<PipelineKey> {
        let mut keys: Vec<PipelineKey> = self.pipelines.pipelines.lock().unwrap().keys().map(|(k, _)| k.clone()).collect();
        keys.sort_by_key(|k| k.to_string());
        keys.dedup();
        keys
    }

    /// The module, and how each of its entry points uses each group-0 binding (for explicit
    /// layouts).
    fn module_and_bindings(&self, shader: Shader) -> Result<(wgpu::ShaderModule, Arc<EntryBindings>)> {
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
        let bindings = ParsedShader::new(shader, naga::valid::ValidationFlags::empty())?.bindings;
        let source = shader.source();
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
                wgpu::ShaderModuleDescriptor { label: Some(shader.name()), source: wgpu::ShaderSource::Wgsl(source.into()) },
                checks,
            )
        };
        scope_error(&format!("compiling shader {}", shader.name()), scope)?;
        let entry = (m, Arc::new(bindings));
        modules.insert(shader, entry.clone());
        Ok(entry)
    }

    /// The bind-group and pipeline layouts of `shader`'s `entry` with exactly `bindings` (sorted) bound:
    /// explicit layouts (not derived from a compiled pipeline), so bind groups can be made
    /// before their pipeline is compiled.
    fn layouts(&self, shader: Shader, entry: &'static str, bindings: &[u32]) -> Result<Layouts> {
        let id = (shader, entry, bindings.to_vec());
        if let Some(l) = self.pipelines.layouts.lock().unwrap().get(&id) {
            return Ok(l.clone());
        }
        let all = self.module_and_bindings(shader)?.1;
        let none = HashMap::new();
        let kinds = all.get(entry).unwrap_or(&none);
        let mut entries = Vec::new();
        for &b in bindings {
            let ty = match kinds.get(&b) {
                Some(BindingKind::Uniform) => wgpu::BufferBindingType::Uniform,
                Some(&BindingKind::Storage { read_only }) => wgpu::BufferBindingType::Storage { read_only },
                None => return Err(Error::Gpu(format!("{}.{entry} does not use binding {b}", shader.name()))),
            };
            entries.push(wgpu::BindGroupLayoutEntry {
                binding: b,
                visibility: wgpu::ShaderStages::COMPUTE,
                ty: wgpu::BindingType::Buffer { ty, has_dynamic_offset: false, min_binding_size: None },
                count: None,
            });
        }
        let bgl = self.device.create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor { label: Some(shader.name()), entries: &entries });
        let pl = self.device.create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
            label: Some(shader.name()),
            bind_group_layouts: &[Some(&bgl)],
            immediate_size: 0,
        });
        self.pipelines.layouts.lock().unwrap().insert(id, (bgl.clone(), pl.clone()));
        Ok((bgl, pl))
    }

    /// The pipeline for `key` with `bindings` bound, queued for the compile threads on first
    /// use (see [`PipelineSlot`]).
    pub fn pipeline(&self, key: &PipelineKey, bindings: &[u32]) -> Result<Arc<PipelineSlot>> {
        let id = (key.clone(), bindings.to_vec());
        if let Some(p) = self.pipelines.pipelines.lock().unwrap().get(&id) {
            return Ok(p.clone());
        }
        let module = self.module(key.shader)?;
        let (bind_layout, layout) = self.layouts(key.shader, key.entry, bindings)?;
        let slot = Arc::new(PipelineSlot { key: key.clone(), module, bind_layout, layout, compiled: OnceLock::new() });
        self.pipelines.pipelines.lock().unwrap().insert(id, slot.clone());
        if let Some(jobs) = self.pipelines.workers.get_or_init(|| Workers::start(&self.device)).as_ref().and_then(|w| w.jobs.as_ref()) {
            // A closed queue (workers gone) leaves the compile to the first recording.
            let _ = jobs.send(slot.clone());
        }
        Ok(slot)
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
        let mut bindings: Vec<u32> = std::iter::once(0).chain(tensors.iter().map(|&(b, _)| b)).collect();
        bindings.sort_unstable();
        let pipeline = self.pipeline(key, &bindings)?;
        let ubuf = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("params"),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let mut entries = vec![wgpu::BindGroupEntry { binding: 0, resource: ubuf.as_entire_binding() }];
        for &(binding, t) in tensors {
            entries.push(wgpu::BindGroupEntry { binding, resource: t.binding() });
        }
        let bind_group = self.device.create_bind_group(&wgpu::BindGroupDescriptor { label: None, layout: &pipeline.bind_layout, entries: &entries });
        Ok(Dispatch { pipeline, bind_group, groups, label: key.to_string().into(), flops, bytes })
    }
}

/// One prepared kernel launch.
#[derive(Clone, Debug)]
pub struct Dispatch {
    /// Compiled in the background; [`PipelineSlot::get`] waits for it.
    pub pipeline: Arc<PipelineSlot>,
    pub bind_group: wgpu::BindGroup,
    pub groups: [u32; 3],
    /// The pipeline key's display string.
    pub label: Arc<str>,
    /// Floating-point operations of one launch (0 for memory-bound kernels).
    pub flops: f64,
    /// Bytes one launch must read and write at least.
    pub bytes: f64,
}
