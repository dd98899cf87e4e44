//! The static memory plan: a model pass at one shape (config, batch, height, width) is built
//! once into a list of prepared launches — bind groups included — over activation tensors
//! carved from a pool of buffers, then replayed for every call. Building walks the pass in
//! order: each activation is taken from the pool when first written and given back after its
//! last reader, so a later tensor reuses its buffer. The launches run in the recorded order on
//! one queue, which makes the reuse safe; wgpu orders the dispatches that touch a buffer.
//!
//! Buffers are whole (one tensor per buffer at a time), not sub-ranges of one arena: wgpu
//! tracks usage per buffer, so two live tensors in one buffer could not be read and written by
//! the same launch.

use std::sync::Arc;

use crate::error::Result;
use crate::gpu::tensor::padded_bytes;
use crate::gpu::{DType, Dispatch, Gpu, Recorder, Tensor};

/// A plan being built: a capturing recorder plus the activation pool.
pub struct PlanBuilder<'g> {
    pub gpu: &'g Gpu,
    pub rec: Recorder<'g>,
    /// Free buffers, by size.
    free: Vec<(u64, Arc<wgpu::Buffer>)>,
    /// Every buffer the pool created.
    created: u64,
    buffers: usize,
    /// The most bytes in use at once (handed out and not yet freed).
    peak: u64,
}

/// A built plan: the launches of one pass, replayed by [`Plan::record`].
pub struct Plan {
    pub dispatches: Vec<Dispatch>,
    /// Bytes of activation buffers the plan holds.
    pub activation_bytes: u64,
    /// Number of activation buffers.
    pub buffers: usize,
    /// The most activation bytes in use at one point of the pass.
    pub peak_bytes: u64,
}

impl<'g> PlanBuilder<'g> {
    pub fn new(gpu: &'g Gpu) -> Self {
        PlanBuilder { gpu, rec: Recorder::capture(gpu), free: Vec::new(), created: 0, buffers: 0, peak: 0 }
    }

    /// An activation tensor: a free pool buffer of at least its size (and at most twice it,
    /// so big buffers are not spent on small tensors), else a new one.
    pub fn tensor(&mut self, shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        let numel = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        // An overflowing shape falls through to Tensor::empty, which refuses it.
        if let Some(need) = numel.filter(|n| n.checked_mul(dtype.size()).is_some()).map(|n| padded_bytes(n, dtype)) {
            let best = (0..self.free.len())
                .filter(|&i| self.free[i].0 >= need && self.free[i].0 <= 2 * need)
                .min_by_key(|&i| self.free[i].0);
            if let Some(i) = best {
                let (_, buffer) = self.free.swap_remove(i);
                self.peak = self.peak.max(self.live_bytes());
                return Ok(Tensor { buffer, offset: 0, shape: shape.to_vec(), dtype });
            }
        }
        let t = Tensor::empty(self.gpu, shape, dtype, what)?;
        self.created += t.buffer.size();
        self.buffers += 1;
        self.peak = self.peak.max(self.live_bytes());
        Ok(t)
    }

    /// Bytes of pool buffers in use now (handed out and not freed): during a training plan's
    /// build, at the end of the forward, the activations saved for the backward.
    pub fn live_bytes(&self) -> u64 {
        self.created - self.free.iter().map(|(s, _)| s).sum::<u64>()
    }

    /// An f16 activation tensor.
    pub fn f16(&mut self, shape: &[usize], what: &str) -> Result<Tensor> {
        self.tensor(shape, DType::F16, what)
    }

    /// Gives `t`'s buffer back to the pool: every launch that reads or writes `t` must already
    /// be recorded, and `t` (or a clone) must not be used again.
    pub fn free(&mut self, t: Tensor) {
        debug_assert_eq!(t.offset, 0, "only pool tensors are freed");
        let size = t.buffer.size();
        if !self.free.iter().any(|(_, b)| Arc::ptr_eq(b, &t.buffer)) {
            self.free.push((size, t.buffer));
        }
    }

    /// Records one launch.
    pub fn run(&mut self, d: Dispatch) -> Result<()> {
        self.rec.run(&d)
    }

    /// Records several launches.
    pub fn run_all(&mut self, ds: impl IntoIterator<Item = Dispatch>) -> Result<()> {
        for d in ds {
            self.rec.run(&d)?;
        }
        Ok(())
    }

    /// Ends one part of a build that goes on: the launches recorded so far become a plan of
    /// their own, and the pool (with the tensors still handed out) carries over to the next
    /// part. For passes run apart, e.g. a forward whose saved activations a later backward
    /// (recorded next, into the same pool) reads.
    pub fn split(&mut self) -> Plan {
        let rec = std::mem::replace(&mut self.rec, Recorder::capture(self.gpu));
        Plan { dispatches: rec.into_dispatches(), activation_bytes: self.created, buffers: self.buffers, peak_bytes: self.peak }
    }

    /// Ends the build.
    pub fn finish(self) -> Plan {
        Plan { dispatches: self.rec.into_dispatches(), activation_bytes: self.created, buffers: self.buffers, peak_bytes: self.peak }
    }
}

impl Plan {
    /// Queues the whole pass into `rec` (less the launches ATELIER_SKIP_LAUNCHES names, a
    /// diagnostic: see the README).
    pub fn record(&self, rec: &mut Recorder) -> Result<()> {
        static SKIP: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
        let skip = SKIP.get_or_init(|| std::env::var("ATELIER_SKIP_LAUNCHES").ok());
        for d in &self.dispatches {
            if let Some(s) = skip
                && format!("{} groups {:?}", d.label, d.groups).contains(s.as_str())
            {
                continue;
            }
            rec.run(d)?;
        }
        Ok(())
    }

    /// Runs the whole pass and waits for it.
    pub fn run(&self, gpu: &Gpu) -> Result<()> {
        self.submit(gpu)?;
        gpu.wait()
    }

    /// Queues the whole pass without waiting: what is submitted next (a readback of its
    /// output, say, which then waits) runs after it. One wait a step instead of two.
    pub fn submit(&self, gpu: &Gpu) -> Result<()> {
        let mut rec = Recorder::new(gpu);
        self.record(&mut rec)?;
        rec.submit()
    }

    /// Flops of one replay (for TFLOP/s figures).
    pub fn flops(&self) -> f64 {
        self.dispatches.iter().map(|d| d.flops).sum()
    }
}
