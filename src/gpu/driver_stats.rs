//! The driver's own statistics of the engine's pipelines, for kernel work (`atelier bench
//! --pipeline-stats`): whatever the driver reports through `VK_KHR_pipeline_executable_properties`
//! (registers, spills, binary size, ...), and its internal representations where it shares any.
//!
//! wgpu does not expose that extension, so each pipeline's SPIR-V is made here the way wgpu
//! makes it for the engine's trusted modules (naga; overrides resolved; no bounds checks, loop
//! bounding, division checks or workgroup-memory zeroing) and compiled again on a second,
//! plain Vulkan device of the same GPU, with the flags that ask the driver to keep the figures.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::ffi::CString;

use ash::vk;

use crate::error::{Error, Result};
use crate::gpu::pipelines::{BindingKind, ParsedShader, PipelineKey, Shader};

/// What the driver reports for one executable of one pipeline.
pub struct ExecutableReport {
    /// The pipeline's label, as in profiles.
    pub pipeline: String,
    /// The executable's name, as the driver gives it.
    pub executable: String,
    /// The subgroup size it runs at.
    pub subgroup_size: u32,
    /// (name, value) per statistic.
    pub statistics: Vec<(String, String)>,
    /// (name, text) per internal representation the driver shares.
    pub representations: Vec<(String, String)>,
}

fn vk_err(what: &str) -> impl Fn(vk::Result) -> Error + '_ {
    move |e| Error::Gpu(format!("pipeline statistics: {what}: {e}"))
}

struct Instance {
    raw: ash::Instance,
    _entry: ash::Entry,
}

impl Drop for Instance {
    fn drop(&mut self) {
        // SAFETY: every child object (the device) is dropped before the instance.
        unsafe { self.raw.destroy_instance(None) }
    }
}

struct Device {
    raw: ash::Device,
    exe: ash::khr::pipeline_executable_properties::Device,
}

impl Drop for Device {
    fn drop(&mut self) {
        // SAFETY: every object made on the device is destroyed by `report` before it returns.
        unsafe { self.raw.destroy_device(None) }
    }
}

/// Compiles every pipeline of `keys` on the GPU whose Vulkan device name is `adapter_name`
/// and returns what its driver reports; with `with_ir` also the internal representations.
pub fn pipeline_statistics(adapter_name: &str, keys: &[PipelineKey], with_ir: bool) -> Result<Vec<ExecutableReport>> {
    // SAFETY: loading the system's Vulkan loader, as wgpu does.
    let entry = unsafe { ash::Entry::load() }
        .map_err(|e| Error::Gpu(format!("pipeline statistics need the Vulkan loader (libvulkan): {e}")))?;
    let app = vk::ApplicationInfo::default().api_version(vk::API_VERSION_1_3);
    // SAFETY: a plain instance without layers or extensions.
    let raw = unsafe { entry.create_instance(&vk::InstanceCreateInfo::default().application_info(&app), None) }
        .map_err(vk_err("creating a Vulkan instance"))?;
    let instance = Instance { raw, _entry: entry };
    let device = open(&instance, adapter_name)?;
    // Each shader parsed and validated (every check, as before SPIR-V is written from it)
    // once for all its pipelines.
    let mut parsed: HashMap<Shader, ParsedShader> = HashMap::new();
    let mut out = Vec::new();
    for key in keys {
        let p = match parsed.entry(key.shader) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(ParsedShader::new(key.shader, naga::valid::ValidationFlags::all())?),
        };
        out.extend(report(&device, key, p, with_ir)?);
    }
    drop(device);
    Ok(out)
}

/// A device on the GPU named `adapter_name` with every feature it offers and the
/// pipeline-executable-properties extension.
fn open(instance: &Instance, adapter_name: &str) -> Result<Device> {
    let inst = &instance.raw;
    // SAFETY: queries on a live instance.
    let physical = unsafe { inst.enumerate_physical_devices() }.map_err(vk_err("listing the GPUs"))?;
    let mut names = Vec::new();
    let mut found = None;
    for pd in physical {
        // SAFETY: `pd` comes from this instance.
        let props = unsafe { inst.get_physical_device_properties(pd) };
        let name = props.device_name_as_c_str().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        if name == adapter_name {
            found = Some((pd, props.api_version));
        }
        names.push(name);
    }
    let Some((pd, api)) = found else {
        return Err(Error::Gpu(format!(
            "pipeline statistics: no Vulkan device named {adapter_name:?} (there are: {}); they need the Vulkan backend",
            names.join(", ")
        )));
    };
    if api < vk::API_VERSION_1_3 {
        return Err(Error::Gpu(format!("pipeline statistics need a Vulkan 1.3 driver; {adapter_name} offers 1.{}", vk::api_version_minor(api))));
    }
    // SAFETY: a query on a live physical device.
    let exts = unsafe { inst.enumerate_device_extension_properties(pd) }.map_err(vk_err("listing device extensions"))?;
    let has = |name: &std::ffi::CStr| exts.iter().any(|e| e.extension_name_as_c_str() == Ok(name));
    if !has(ash::khr::pipeline_executable_properties::NAME) {
        return Err(Error::Gpu(format!(
            "pipeline statistics: the driver of {adapter_name} does not offer VK_KHR_pipeline_executable_properties"
        )));
    }
    let coop = has(ash::khr::cooperative_matrix::NAME);
    let mut enabled = vec![ash::khr::pipeline_executable_properties::NAME.as_ptr()];
    if coop {
        enabled.push(ash::khr::cooperative_matrix::NAME.as_ptr());
    }
    // Every feature the GPU offers, as queried (wgpu enables those the engine uses; the rest
    // do not change code generation).
    let mut f11 = vk::PhysicalDeviceVulkan11Features::default();
    let mut f12 = vk::PhysicalDeviceVulkan12Features::default();
    let mut f13 = vk::PhysicalDeviceVulkan13Features::default();
    let mut fexe = vk::PhysicalDevicePipelineExecutablePropertiesFeaturesKHR::default();
    let mut fcoop = vk::PhysicalDeviceCooperativeMatrixFeaturesKHR::default();
    let mut features = vk::PhysicalDeviceFeatures2::default().push_next(&mut f11).push_next(&mut f12).push_next(&mut f13).push_next(&mut fexe);
    if coop {
        features = features.push_next(&mut fcoop);
    }
    // SAFETY: the chain holds only structures the driver's Vulkan 1.3 and its extensions know.
    unsafe { inst.get_physical_device_features2(pd, &mut features) };
    // SAFETY: a query on a live physical device.
    let families = unsafe { inst.get_physical_device_queue_family_properties(pd) };
    let family = families.iter().position(|f| f.queue_flags.contains(vk::QueueFlags::COMPUTE)).unwrap_or(0) as u32;
    let priority = [1.0f32];
    let queues = [vk::DeviceQueueCreateInfo::default().queue_family_index(family).queue_priorities(&priority)];
    let info = vk::DeviceCreateInfo::default().queue_create_infos(&queues).enabled_extension_names(&enabled).push_next(&mut features);
    // SAFETY: the features enabled are those the driver reported.
    let raw = unsafe { inst.create_device(pd, &info, None) }.map_err(vk_err("opening the device"))?;
    let exe = ash::khr::pipeline_executable_properties::Device::new(inst, &raw);
    Ok(Device { raw, exe })
}

/// naga's SPIR-V options as wgpu sets them for a module made with
/// `create_shader_module_trusted(.., ShaderRuntimeChecks::unchecked())` and a pipeline with
/// `zero_initialize_workgroup_memory: false`, on a Vulkan 1.3 device.
fn spv_options() -> naga::back::spv::Options<'static> {
    use naga::back::spv;
    use naga::proc::{BoundsCheckPolicies, BoundsCheckPolicy::Unchecked};
    spv::Options {
        lang_version: (1, 6),
        flags: spv::WriterFlags::LABEL_VARYINGS | spv::WriterFlags::FORCE_POINT_SIZE,
        // Group 0's bindings as written (wgpu's map from its layouts says the same).
        fake_missing_bindings: true,
        bounds_check_policies: BoundsCheckPolicies { index: Unchecked, buffer: Unchecked, image_load: Unchecked, binding_array: Unchecked },
        zero_initialize_workgroup_memory: spv::ZeroInitializeWorkgroupMemoryMode::None,
        force_loop_bounding: false,
        ray_query_initialization_tracking: false,
        trace_ray_argument_validation: false,
        mesh_shader_primitive_indices_clamp: false,
        emit_int_div_checks: false,
        ..spv::Options::default()
    }
}

/// The SPIR-V words of `key`'s pipeline (of its shader `parsed`) and its group-0 bindings.
fn spirv(key: &PipelineKey, parsed: &ParsedShader) -> Result<(Vec<u32>, Vec<(u32, BindingKind)>)> {
    let fail = |what: String| Error::Gpu(format!("pipeline statistics: {key}: {what}"));
    let mut kinds: Vec<(u32, BindingKind)> =
        parsed.bindings.get(key.entry).ok_or_else(|| fail("no such entry point".into()))?.iter().map(|(&n, &k)| (n, k)).collect();
    kinds.sort_by_key(|k| k.0);
    let mut constants = naga::back::PipelineConstants::default();
    for &(name, value) in &key.overrides {
        constants.insert(name.to_string(), value as f64);
    }
    let stage = naga::ShaderStage::Compute;
    let (module, info) = naga::back::pipeline_constants::process_overrides(&parsed.module, &parsed.info, Some((stage, key.entry)), &constants)
        .map_err(|e| fail(e.to_string()))?;
    let pipeline = naga::back::spv::PipelineOptions { shader_stage: stage, entry_point: key.entry.to_string() };
    let words = naga::back::spv::write_vec(&module, &info, &spv_options(), Some(&pipeline)).map_err(|e| fail(e.to_string()))?;
    Ok((words, kinds))
}

/// Compiles `key`'s pipeline on `dev` and reads what the driver reports of it.
fn report(dev: &Device, key: &PipelineKey, parsed: &ParsedShader, with_ir: bool) -> Result<Vec<ExecutableReport>> {
    let (words, kinds) = spirv(key, parsed)?;
    let d = &dev.raw;
    let bindings: Vec<vk::DescriptorSetLayoutBinding> = kinds
        .iter()
        .map(|&(n, kind)| {
            let ty = match kind {
                BindingKind::Uniform => vk::DescriptorType::UNIFORM_BUFFER,
                BindingKind::Storage { .. } => vk::DescriptorType::STORAGE_BUFFER,
            };
            vk::DescriptorSetLayoutBinding::default().binding(n).descriptor_type(ty).descriptor_count(1).stage_flags(vk::ShaderStageFlags::COMPUTE)
        })
        .collect();
    // SAFETY (this block): objects made on a live device from valid descriptions, each
    // destroyed below whatever the queries return.
    unsafe {
        let set = d
            .create_descriptor_set_layout(&vk::DescriptorSetLayoutCreateInfo::default().bindings(&bindings), None)
            .map_err(vk_err("a descriptor set layout"))?;
        let sets = [set];
        let layout = d.create_pipeline_layout(&vk::PipelineLayoutCreateInfo::default().set_layouts(&sets), None);
        let module = d.create_shader_module(&vk::ShaderModuleCreateInfo::default().code(&words), None);
        let result = match (layout, module) {
            (Ok(layout), Ok(module)) => compile_and_query(dev, key, layout, module, with_ir),
            (Err(e), _) | (_, Err(e)) => Err(vk_err("a pipeline layout or shader module")(e)),
        };
        if let Ok(m) = module {
            d.destroy_shader_module(m, None);
        }
        if let Ok(l) = layout {
            d.destroy_pipeline_layout(l, None);
        }
        d.destroy_descriptor_set_layout(set, None);
        result
    }
}

/// # Safety
/// `layout` and `module` are live objects of `dev`.
unsafe fn compile_and_query(
    dev: &Device,
    key: &PipelineKey,
    layout: vk::PipelineLayout,
    module: vk::ShaderModule,
    with_ir: bool,
) -> Result<Vec<ExecutableReport>> {
    let entry = CString::new(key.entry).expect("entry point names have no NUL");
    // wgpu lets the driver pick the subgroup size where subgroups are enabled, as here.
    let stage = vk::PipelineShaderStageCreateInfo::default()
        .flags(vk::PipelineShaderStageCreateFlags::ALLOW_VARYING_SUBGROUP_SIZE)
        .stage(vk::ShaderStageFlags::COMPUTE)
        .module(module)
        .name(&entry);
    let mut flags = vk::PipelineCreateFlags::CAPTURE_STATISTICS_KHR;
    if with_ir {
        flags |= vk::PipelineCreateFlags::CAPTURE_INTERNAL_REPRESENTATIONS_KHR;
    }
    let info = [vk::ComputePipelineCreateInfo::default().flags(flags).stage(stage).layout(layout)];
    // SAFETY: a compute pipeline from live objects; destroyed below.
    let pipeline = unsafe { dev.raw.create_compute_pipelines(vk::PipelineCache::null(), &info, None) }
        .map_err(|(_, e)| vk_err(&format!("compiling {key}"))(e))?[0];
    let result = unsafe { query(dev, key, pipeline, with_ir) };
    unsafe { dev.raw.destroy_pipeline(pipeline, None) };
    result
}

/// # Safety
/// `pipeline` is a live pipeline of `dev` made with the capture flags.
unsafe fn query(dev: &Device, key: &PipelineKey, pipeline: vk::Pipeline, with_ir: bool) -> Result<Vec<ExecutableReport>> {
    let exes = unsafe { dev.exe.get_pipeline_executable_properties(&vk::PipelineInfoKHR::default().pipeline(pipeline)) }
        .map_err(vk_err("listing the executables"))?;
    let mut out = Vec::new();
    for (index, exe) in exes.iter().enumerate() {
        let info = vk::PipelineExecutableInfoKHR::default().pipeline(pipeline).executable_index(index as u32);
        let stats = unsafe { dev.exe.get_pipeline_executable_statistics(&info) }.map_err(vk_err("reading the statistics"))?;
        let statistics = stats
            .iter()
            .map(|s| {
                let name = s.name_as_c_str().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
                // SAFETY: the union member read is the one `format` names.
                let value = unsafe {
                    match s.format {
                        vk::PipelineExecutableStatisticFormatKHR::BOOL32 => (s.value.b32 != 0).to_string(),
                        vk::PipelineExecutableStatisticFormatKHR::INT64 => s.value.i64.to_string(),
                        // Hex too where it looks like packed fields (NVIDIA's local memory
                        // size carries a flag in bit 36 above the byte count).
                        vk::PipelineExecutableStatisticFormatKHR::UINT64 => match s.value.u64 {
                            v if v > u32::MAX as u64 => format!("{v} ({v:#x})"),
                            v => v.to_string(),
                        },
                        _ => s.value.f64.to_string(),
                    }
                };
                (name, value)
            })
            .collect();
        let representations = if with_ir { unsafe { representations(dev, &info)? } } else { Vec::new() };
        out.push(ExecutableReport {
            pipeline: key.to_string(),
            executable: exe.name_as_c_str().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            subgroup_size: exe.subgroup_size,
            statistics,
            representations,
        });
    }
    Ok(out)
}

/// # Safety
/// `info` names a live executable captured with internal representations.
unsafe fn representations(dev: &Device, info: &vk::PipelineExecutableInfoKHR) -> Result<Vec<(String, String)>> {
    let fp = dev.exe.fp().get_pipeline_executable_internal_representations_khr;
    let handle = dev.exe.device();
    let mut count = 0u32;
    unsafe { fp(handle, info, &mut count, std::ptr::null_mut()) }.result().map_err(vk_err("counting the representations"))?;
    let mut reps = vec![vk::PipelineExecutableInternalRepresentationKHR::default(); count as usize];
    // First the sizes, then the data into buffers of those sizes.
    unsafe { fp(handle, info, &mut count, reps.as_mut_ptr()) }.result().map_err(vk_err("sizing the representations"))?;
    let mut data: Vec<Vec<u8>> = reps.iter().map(|r| vec![0u8; r.data_size]).collect();
    for (r, d) in reps.iter_mut().zip(&mut data) {
        r.p_data = d.as_mut_ptr().cast();
    }
    let res = unsafe { fp(handle, info, &mut count, reps.as_mut_ptr()) };
    if res != vk::Result::SUCCESS && res != vk::Result::INCOMPLETE {
        return Err(vk_err("reading the representations")(res));
    }
    Ok(reps
        .iter()
        .zip(&data)
        .map(|(r, d)| {
            let name = r.name_as_c_str().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let text = if r.is_text != 0 {
                String::from_utf8_lossy(d.split(|&b| b == 0).next().unwrap_or(&[])).into_owned()
            } else {
                format!("({} bytes of binary data)", d.len())
            };
            (name, text)
        })
        .collect())
}
