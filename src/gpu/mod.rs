//! The GPU runtime: device and capabilities, tensors, the pipeline cache, the recorder and
//! the timestamp profiler.

pub mod device;
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
