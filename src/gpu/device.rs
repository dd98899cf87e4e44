//! Adapter selection, device creation and the capability report: which features the engine
//! uses (f16, subgroups, timestamps, cooperative matrices), the key limits, and which kernel
//! path follows from them. Environment overrides are read here and nowhere else.

use crate::error::{Error, Result};
use crate::gpu::pipelines::PipelineCache;

/// Environment variable naming the adapter (an index or part of its name), as `--adapter`.
pub const ENV_ADAPTER: &str = "ATELIER_ADAPTER";
/// Environment variable that forces the scalar (no cooperative matrix) kernel path when `1`.
pub const ENV_SCALAR: &str = "ATELIER_SCALAR";
/// Environment variable that switches SHADER_F16 off when `1` (the engine then runs as on an
/// adapter without shader-f16; the scalar path reads f16 storage as packed words).
pub const ENV_NO_F16: &str = "ATELIER_NO_F16";
/// Environment variable that turns the shaders' runtime bounds checks back on when `1`
/// (about 45x slower; for hunting out-of-bounds accesses).
pub const ENV_SHADER_CHECKS: &str = "ATELIER_SHADER_CHECKS";

/// How the caller wants the GPU opened.
#[derive(Clone, Debug, Default)]
pub struct GpuOptions {
    /// An adapter index (as listed by `atelier info`) or a case-insensitive part of its name.
    pub adapter: Option<String>,
    /// Use the tiled scalar kernels even where cooperative matrices are offered.
    pub force_scalar: bool,
    /// Do not enable SHADER_F16 (and with it, cooperative matrices).
    pub no_f16: bool,
    /// Keep naga's runtime bounds checks in the shaders.
    pub shader_checks: bool,
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).map(|v| !v.is_empty() && v != "0").unwrap_or(false)
}

impl GpuOptions {
    /// Options from the environment variables alone.
    pub fn from_env() -> Self {
        GpuOptions {
            adapter: std::env::var(ENV_ADAPTER).ok().filter(|s| !s.is_empty()),
            force_scalar: env_flag(ENV_SCALAR),
            no_f16: env_flag(ENV_NO_F16),
            shader_checks: env_flag(ENV_SHADER_CHECKS),
        }
    }

    /// Environment variables, with an explicit `--adapter` taking precedence.
    pub fn with_adapter(mut self, adapter: Option<String>) -> Self {
        if adapter.is_some() {
            self.adapter = adapter;
        }
        self
    }
}

/// Which implementation the heavy kernels (matmul, later conv and attention) use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPath {
    /// Cooperative matrices (tensor cores): 16x16x16, f16 inputs, f32 accumulators.
    Coop,
    /// Tiled scalar f32 arithmetic over f16 storage read as packed words; runs everywhere.
    Scalar,
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            KernelPath::Coop => "coop",
            KernelPath::Scalar => "scalar",
        })
    }
}

/// What the opened device can do, as the kernels see it.
#[derive(Clone, Debug)]
pub struct Caps {
    pub f16: bool,
    pub subgroups: bool,
    /// `subgroupBarrier()` in shaders (the warp-owned attention kernels, forward and backward).
    pub subgroup_barrier: bool,
    pub timestamps: bool,
    /// The adapter offers 16x16x16 cooperative matrices with f16 inputs and f32 accumulators.
    pub coop_16x16_f16_f32: bool,
    pub path: KernelPath,
    /// Why the path is what it is, for `atelier info`.
    pub path_reason: String,
    pub shader_checks: bool,
    pub limits: wgpu::Limits,
}

/// One adapter as `atelier info` describes it.
#[derive(Clone, Debug)]
pub struct AdapterReport {
    pub index: usize,
    pub info: wgpu::AdapterInfo,
    pub features: wgpu::Features,
    pub limits: wgpu::Limits,
    pub coop: Vec<wgpu::CooperativeMatrixProperties>,
}

/// The process's one wgpu instance, made on first use and kept to the end. Destroying the
/// last Vulkan instance lets the loader unload the driver, and NVIDIA's driver leaves
/// per-thread destructors behind in threads that used it: a thread that dropped a `Gpu`
/// (a test's) then crashed at its exit, jumping into the unloaded library (H100, driver 580,
/// whenever pipelines had been compiled on the background threads).
fn instance() -> wgpu::Instance {
    static INSTANCE: std::sync::OnceLock<wgpu::Instance> = std::sync::OnceLock::new();
    INSTANCE
        .get_or_init(|| {
            wgpu::Instance::new(wgpu::InstanceDescriptor {
                backends: wgpu::Backends::PRIMARY,
                ..wgpu::InstanceDescriptor::new_without_display_handle()
            })
        })
        .clone()
}

fn rank(t: wgpu::DeviceType) -> u32 {
    match t {
        wgpu::DeviceType::DiscreteGpu => 0,
        wgpu::DeviceType::IntegratedGpu => 1,
        wgpu::DeviceType::VirtualGpu => 2,
        wgpu::DeviceType::Other => 3,
        wgpu::DeviceType::Cpu => 4,
    }
}

fn backend_rank(b: wgpu::Backend) -> u32 {
    match b {
        wgpu::Backend::Vulkan | wgpu::Backend::Metal | wgpu::Backend::Dx12 => 0,
        _ => 1,
    }
}

/// Every adapter wgpu can see, in a stable order (the index `--adapter` takes).
pub fn list_adapters() -> Vec<AdapterReport> {
    let inst = instance();
    let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY));
    adapters
        .into_iter()
        .enumerate()
        .map(|(index, a)| AdapterReport {
            index,
            info: a.get_info(),
            features: a.features(),
            limits: a.limits(),
            coop: a.cooperative_matrix_properties(),
        })
        .collect()
}

fn has_coop_16(props: &[wgpu::CooperativeMatrixProperties]) -> bool {
    props.iter().any(|p| {
        p.m_size == 16
            && p.n_size == 16
            && p.k_size == 16
            && p.ab_type == wgpu::CooperativeScalarType::F16
            && p.cr_type == wgpu::CooperativeScalarType::F32
    })
}

fn pick(adapters: Vec<wgpu::Adapter>, wanted: Option<&str>) -> Result<wgpu::Adapter> {
    if adapters.is_empty() {
        return Err(Error::NoAdapter);
    }
    let Some(wanted) = wanted else {
        // Best device type first, native backends before GL, then enumeration order.
        let mut adapters = adapters;
        let mut order: Vec<usize> = (0..adapters.len()).collect();
        order.sort_by_key(|&i| {
            let info = adapters[i].get_info();
            (rank(info.device_type), backend_rank(info.backend), i)
        });
        return Ok(adapters.swap_remove(order[0]));
    };
    let available = adapters
        .iter()
        .enumerate()
        .map(|(i, a)| format!("{i}: {} ({:?})", a.get_info().name, a.get_info().backend))
        .collect::<Vec<_>>()
        .join(", ");
    if let Ok(i) = wanted.trim().parse::<usize>() {
        let mut adapters = adapters;
        if i < adapters.len() {
            return Ok(adapters.swap_remove(i));
        }
        return Err(Error::AdapterNotFound { wanted: wanted.to_string(), available });
    }
    let needle = wanted.to_lowercase();
    let mut matches: Vec<wgpu::Adapter> = adapters
        .into_iter()
        .filter(|a| a.get_info().name.to_lowercase().contains(&needle))
        .collect();
    matches.sort_by_key(|a| backend_rank(a.get_info().backend));
    if matches.is_empty() {
        return Err(Error::AdapterNotFound { wanted: wanted.to_string(), available });
    }
    Ok(matches.swap_remove(0))
}

/// An opened GPU: adapter, device, queue, capabilities and the pipeline cache.
pub struct Gpu {
    pub adapter: wgpu::Adapter,
    pub device: wgpu::Device,
    pub queue: wgpu::Queue,
    pub caps: Caps,
    pub(crate) pipelines: PipelineCache,
}

impl Gpu {
    /// Opens the GPU the options name (or the best one), with every feature the engine can use.
    pub fn new(opts: &GpuOptions) -> Result<Gpu> {
        let inst = instance();
        let adapters = pollster::block_on(inst.enumerate_adapters(wgpu::Backends::PRIMARY));
        let adapter = pick(adapters, opts.adapter.as_deref())?;
        let info = adapter.get_info();
        let offered = adapter.features();
        let mut wanted = wgpu::Features::SUBGROUP | wgpu::Features::SUBGROUP_BARRIER | wgpu::Features::TIMESTAMP_QUERY;
        if !opts.no_f16 {
            wanted |= wgpu::Features::SHADER_F16;
        }
        let coop_props = adapter.cooperative_matrix_properties();
        let coop_offered = offered.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            && has_coop_16(&coop_props);
        if coop_offered && !opts.no_f16 {
            wanted |= wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX;
        }
        let features = offered & wanted;
        let limits = adapter.limits();
        let desc = wgpu::DeviceDescriptor {
            label: Some("atelier"),
            required_features: features,
            required_limits: limits.clone(),
            experimental_features: if features
                .contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX)
            {
                // SAFETY: the cooperative-matrix shaders are ours and tested on this path.
                unsafe { wgpu::ExperimentalFeatures::enabled() }
            } else {
                wgpu::ExperimentalFeatures::disabled()
            },
            memory_hints: wgpu::MemoryHints::Performance,
            trace: wgpu::Trace::Off,
        };
        let (device, queue) = pollster::block_on(adapter.request_device(&desc)).map_err(|e| {
            Error::DeviceRequest { adapter: info.name.clone(), reason: e.to_string() }
        })?;
        let f16 = features.contains(wgpu::Features::SHADER_F16);
        let subgroups = features.contains(wgpu::Features::SUBGROUP);
        let coop = features.contains(wgpu::Features::EXPERIMENTAL_COOPERATIVE_MATRIX);
        // The coop kernels lay out 8 subgroups of 32 per workgroup.
        let sg32 = info.subgroup_min_size == 32 && info.subgroup_max_size == 32;
        let coop_usable = coop && f16 && subgroups && sg32;
        let (path, path_reason) = if opts.force_scalar {
            (KernelPath::Scalar, format!("scalar forced ({ENV_SCALAR})"))
        } else if coop_usable {
            (KernelPath::Coop, "cooperative matrices 16x16x16 f16->f32 offered".to_string())
        } else if opts.no_f16 && coop_offered {
            (KernelPath::Scalar, format!("shader-f16 switched off ({ENV_NO_F16})"))
        } else if !coop_offered {
            (KernelPath::Scalar, "no 16x16x16 f16->f32 cooperative matrices on this adapter".into())
        } else if !sg32 {
            (KernelPath::Scalar, "the cooperative-matrix kernels need a subgroup size of 32".into())
        } else {
            (KernelPath::Scalar, "cooperative matrices need shader-f16 and subgroups".into())
        };
        let caps = Caps {
            f16,
            subgroups,
            subgroup_barrier: features.contains(wgpu::Features::SUBGROUP_BARRIER),
            timestamps: features.contains(wgpu::Features::TIMESTAMP_QUERY),
            coop_16x16_f16_f32: coop_usable,
            path,
            path_reason,
            shader_checks: opts.shader_checks,
            limits: device.limits(),
        };
        device.on_uncaptured_error(std::sync::Arc::new(|e| {
            eprintln!("atelier: wgpu error: {e}");
        }));
        Ok(Gpu { adapter, device, queue, caps, pipelines: PipelineCache::default() })
    }

    /// Opens the GPU chosen by the environment variables (what tests and benches use).
    pub fn from_env() -> Result<Gpu> {
        Gpu::new(&GpuOptions::from_env())
    }

    /// A one-line description: adapter name, backend and kernel path.
    pub fn describe(&self) -> String {
        let i = self.adapter.get_info();
        format!(
            "{} ({:?}, {:?}, driver {} {}); kernel path: {}",
            i.name, i.backend, i.device_type, i.driver, i.driver_info, self.caps.path
        )
    }

    /// Checks a buffer size against the device's limits, naming what it was for.
    pub fn check_size(&self, what: &str, bytes: u64) -> Result<()> {
        let l = &self.caps.limits;
        if bytes > l.max_buffer_size {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: l.max_buffer_size,
                limit_name: "max_buffer_size",
            });
        }
        if bytes > l.max_storage_buffer_binding_size {
            return Err(Error::TooLarge {
                what: what.to_string(),
                bytes,
                limit: l.max_storage_buffer_binding_size,
                limit_name: "max_storage_buffer_binding_size",
            });
        }
        Ok(())
    }

    /// Blocks until all submitted work is done.
    pub fn wait(&self) -> Result<()> {
        self.device
            .poll(wgpu::PollType::wait_indefinitely())
            .map(|_| ())
            .map_err(|e| Error::Gpu(e.to_string()))
    }
}
