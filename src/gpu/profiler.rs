//! The timestamp profiler: begin/end timestamps around every dispatch, aggregated per
//! pipeline key into a table of count, total ms, mean us, share of the total, and TFLOP/s or
//! GB/s from the flops and bytes each dispatch declares.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;
use crate::gpu::pipelines::Dispatch;

/// Timestamp pairs one query set holds before it is resolved.
const PAIRS: u32 = 1024;

#[derive(Clone, Debug, Default)]
pub struct KernelStats {
    pub count: u64,
    pub total_ns: f64,
    pub flops: f64,
    pub bytes: f64,
}

/// Per-kernel timing table.
pub struct Profiler {
    query_set: wgpu::QuerySet,
    resolve: wgpu::Buffer,
    readback: wgpu::Buffer,
    /// Labels, flops and bytes of the pairs in flight, in slot order.
    slots: Vec<(std::sync::Arc<str>, f64, f64)>,
    period_ns: f64,
    /// Rows per launch shape (workgroups and flops) as well as per pipeline: set by
    /// ATELIER_PROFILE_SHAPES=1, for finding which of a kernel's launches are slow.
    by_shape: bool,
    /// Every launch runs twice, the second timed as a row of its own (label + " again"): set
    /// by ATELIER_PROFILE_REPEAT=1, for telling what a launch costs after its predecessor from
    /// what it costs after itself. Outputs are wrong (in-place launches apply twice).
    pub(crate) repeat: bool,
    pub stats: HashMap<String, KernelStats>,
}

impl Profiler {
    /// A profiler for `gpu`, or `None` when the device has no timestamp queries.
    pub fn new(gpu: &Gpu) -> Option<Profiler> {
        if !gpu.caps.timestamps {
            return None;
        }
        let n = PAIRS * 2;
        let query_set = gpu.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("profiler"),
            ty: wgpu::QueryType::Timestamp,
            count: n,
        });
        let bytes = n as u64 * 8;
        let resolve = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profiler resolve"),
            size: bytes,
            usage: wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC,
            mapped_at_creation: false,
        });
        let readback = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("profiler readback"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Some(Profiler {
            query_set,
            resolve,
            readback,
            slots: Vec::new(),
            period_ns: gpu.queue.get_timestamp_period() as f64,
            by_shape: std::env::var("ATELIER_PROFILE_SHAPES").is_ok_and(|v| v == "1"),
            repeat: std::env::var("ATELIER_PROFILE_REPEAT").is_ok_and(|v| v == "1"),
            stats: HashMap::new(),
        })
    }

    /// Dispatches that fit before the query set must be resolved.
    pub(crate) fn free_slots(&self) -> usize {
        (PAIRS as usize - self.slots.len()) / if self.repeat { 2 } else { 1 }
    }

    /// Takes the next pair of query indices for `d` (its repeat when `again`).
    pub(crate) fn slot(&mut self, d: &Dispatch, again: bool) -> (&wgpu::QuerySet, u32, u32) {
        let i = self.slots.len() as u32;
        let label = if self.by_shape {
            format!("{} groups {:?} {:.3} GFLOP {:.1} MB", d.label, d.groups, d.flops / 1e9, d.bytes / 1e6).into()
        } else {
            d.label.clone()
        };
        let label = if again { format!("{label} again").into() } else { label };
        self.slots.push((label, d.flops, d.bytes));
        (&self.query_set, 2 * i, 2 * i + 1)
    }

    pub(crate) fn resolve(&self, enc: &mut wgpu::CommandEncoder) {
        let n = self.slots.len() as u32 * 2;
        if n == 0 {
            return;
        }
        enc.resolve_query_set(&self.query_set, 0..n, &self.resolve, 0);
        enc.copy_buffer_to_buffer(&self.resolve, 0, &self.readback, 0, n as u64 * 8);
    }

    /// Waits for the resolved timestamps and adds them to the table.
    pub(crate) fn collect(&mut self, gpu: &Gpu) -> Result<()> {
        if self.slots.is_empty() {
            return Ok(());
        }
        let n = self.slots.len() * 2;
        let slice = self.readback.slice(..n as u64 * 8);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.wait()?;
        rx.recv()
            .map_err(|e| Error::Gpu(e.to_string()))?
            .map_err(|e| Error::Gpu(format!("reading timestamps: {e}")))?;
        {
            let data = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
            let ts: &[u64] = bytemuck::cast_slice(&data);
            for (i, (label, flops, bytes)) in self.slots.iter().enumerate() {
                let dt = ts[2 * i + 1].saturating_sub(ts[2 * i]) as f64 * self.period_ns;
                let s = self.stats.entry(label.to_string()).or_default();
                s.count += 1;
                s.total_ns += dt;
                s.flops += flops;
                s.bytes += bytes;
            }
        }
        self.readback.unmap();
        self.slots.clear();
        Ok(())
    }

    /// Clears the table.
    pub fn reset(&mut self) {
        self.stats.clear();
    }

    /// The table, heaviest kernel first.
    pub fn table(&self) -> String {
        let total: f64 = self.stats.values().map(|s| s.total_ns).sum();
        let mut rows: Vec<(&String, &KernelStats)> = self.stats.iter().collect();
        rows.sort_by(|a, b| b.1.total_ns.total_cmp(&a.1.total_ns));
        let mut out = format!(
            "{:<60} {:>7} {:>10} {:>10} {:>6} {:>12}\n",
            "kernel", "count", "total ms", "mean us", "share", "rate"
        );
        for (name, s) in rows {
            let secs = s.total_ns * 1e-9;
            let rate = if s.flops > 0.0 {
                format!("{:.1} TFLOP/s", s.flops / secs / 1e12)
            } else if s.bytes > 0.0 {
                format!("{:.0} GB/s", s.bytes / secs / 1e9)
            } else {
                String::new()
            };
            out += &format!(
                "{:<60} {:>7} {:>10.3} {:>10.1} {:>5.1}% {:>12}\n",
                name,
                s.count,
                s.total_ns * 1e-6,
                s.total_ns * 1e-3 / s.count as f64,
                100.0 * s.total_ns / total.max(1.0),
                rate
            );
        }
        out += &format!("{:<60} {:>7} {:>10.3}\n", "total", "", total * 1e-6);
        out
    }
}
