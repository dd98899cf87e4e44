//! The GPU runtime: device and capabilities, tensors, the pipeline cache, the recorder and
//! the timestamp profiler; the driver's pipeline statistics for kernel work.

pub mod device;
pub mod driver_stats;
pub mod pipelines;
pub mod plan;
pub mod profiler;
pub mod recorder;
pub mod tensor;

pub use device::{Caps, Gpu, GpuOptions, KernelPath};
pub use pipelines::{Dispatch, PipelineKey, Shader};
pub use plan::{Plan, PlanBuilder};
pub use profiler::Profiler;
pub use recorder::Recorder;
pub use tensor::{DType, Tensor};
