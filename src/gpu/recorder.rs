//! The recorder: collects prepared dispatches, encodes them into compute passes and submits
//! them in batches (a short first one, so the GPU starts early), so a whole model step is one
//! stream of launches with few submits. With a profiler attached, each dispatch gets its own
//! pass with begin/end timestamps.

use crate::error::Result;
use crate::gpu::device::Gpu;
use crate::gpu::pipelines::Dispatch;
use crate::gpu::profiler::Profiler;

/// Dispatches per submit: large enough that submits are rare, small enough that the GPU
/// starts early on long sequences.
pub const BATCH: usize = 256;

/// Dispatches of a recorder's first submit: the GPU waits (idle, after a step that ended with
/// a readback) while the CPU encodes it, about 3 us a dispatch (0.8 ms for a whole batch;
/// H100 machine, `atelier train`).
pub const FIRST_BATCH: usize = 16;

/// Encodes dispatches and submits them in batches.
pub struct Recorder<'a> {
    gpu: &'a Gpu,
    pending: Vec<Dispatch>,
    profiler: Option<&'a mut Profiler>,
    /// Capture mode: dispatches are kept, never submitted (see [`Recorder::capture`]).
    capture: bool,
    /// Submits so far.
    submits: usize,
}

impl<'a> Recorder<'a> {
    pub fn new(gpu: &'a Gpu) -> Self {
        Recorder { gpu, pending: Vec::new(), profiler: None, capture: false, submits: 0 }
    }

    /// A recorder that only collects: launchers that record into it (e.g. `Matmul::run`)
    /// fill a list that [`Recorder::into_dispatches`] returns, for a plan to replay.
    pub fn capture(gpu: &'a Gpu) -> Self {
        Recorder { gpu, pending: Vec::new(), profiler: None, capture: true, submits: 0 }
    }

    /// The dispatches a capturing recorder collected, in order.
    pub fn into_dispatches(mut self) -> Vec<Dispatch> {
        std::mem::take(&mut self.pending)
    }

    /// A recorder whose dispatches are timed by `profiler` (when the device has timestamps).
    pub fn with_profiler(gpu: &'a Gpu, profiler: Option<&'a mut Profiler>) -> Self {
        Recorder { gpu, pending: Vec::new(), profiler, capture: false, submits: 0 }
    }

    /// Queues one dispatch; submits when a batch is full.
    pub fn run(&mut self, d: &Dispatch) -> Result<()> {
        self.pending.push(d.clone());
        if self.capture {
            return Ok(());
        }
        let batch = if self.submits == 0 { FIRST_BATCH } else { BATCH };
        let cap = self.profiler.as_ref().map_or(batch, |p| p.free_slots().min(batch));
        if self.pending.len() >= cap {
            self.submit()?;
        }
        Ok(())
    }

    /// Encodes and submits everything queued (does not wait).
    pub fn submit(&mut self) -> Result<()> {
        if self.pending.is_empty() || self.capture {
            return Ok(());
        }
        // Pipelines not yet compiled by the background threads are waited for (or compiled) here.
        let pipelines = self.pending.iter().map(|d| d.pipeline.get(&self.gpu.device)).collect::<Result<Vec<_>>>()?;
        let mut enc = self.gpu.device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("atelier batch"),
        });
        match self.profiler.as_deref_mut() {
            Some(prof) => {
                let runs: &[bool] = if prof.repeat { &[false, true] } else { &[false] };
                for (d, p) in self.pending.iter().zip(&pipelines) {
                    for &again in runs {
                        let (qs, begin, end) = prof.slot(d, again);
                        let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                            label: Some(&d.label),
                            timestamp_writes: Some(wgpu::ComputePassTimestampWrites {
                                query_set: qs,
                                beginning_of_pass_write_index: Some(begin),
                                end_of_pass_write_index: Some(end),
                            }),
                        });
                        pass.set_pipeline(p);
                        pass.set_bind_group(0, &d.bind_group, &[]);
                        pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                    }
                }
                prof.resolve(&mut enc);
            }
            None => {
                let mut pass = enc.begin_compute_pass(&wgpu::ComputePassDescriptor {
                    label: Some("atelier"),
                    timestamp_writes: None,
                });
                for (d, p) in self.pending.iter().zip(&pipelines) {
                    pass.set_pipeline(p);
                    pass.set_bind_group(0, &d.bind_group, &[]);
                    pass.dispatch_workgroups(d.groups[0], d.groups[1], d.groups[2]);
                }
            }
        }
        self.gpu.queue.submit([enc.finish()]);
        self.pending.clear();
        self.submits += 1;
        if let Some(prof) = self.profiler.as_deref_mut() {
            prof.collect(self.gpu)?;
        }
        Ok(())
    }

    /// Submits what is queued and waits until the GPU has finished it.
    pub fn finish(mut self) -> Result<()> {
        self.submit()?;
        self.gpu.wait()
    }
}

impl Gpu {
    /// Records one dispatch, submits it and waits: for tests and one-off launches.
    pub fn run_now(&self, d: &Dispatch) -> Result<()> {
        let mut r = Recorder::new(self);
        r.run(d)?;
        r.finish()
    }
}
