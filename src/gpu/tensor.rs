//! GPU tensors: a view of a storage buffer with a shape and an element type (f16 or f32),
//! plus upload and download through staging buffers. f16 data is stored as IEEE half
//! floats; kernels on the scalar path read them as packed u32 words, so buffers are padded
//! to whole 16-byte blocks.

use std::sync::Arc;

use half::f16;

use crate::error::{Error, Result};
use crate::gpu::device::Gpu;

/// Element type in GPU storage.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F16,
    F32,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F16 => 2,
            DType::F32 => 4,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            DType::F16 => "f16",
            DType::F32 => "f32",
        })
    }
}

/// A tensor on the GPU: a buffer, a byte offset into it, a row-major shape and a dtype.
#[derive(Clone, Debug)]
pub struct Tensor {
    pub buffer: Arc<wgpu::Buffer>,
    /// Byte offset of element 0 (a multiple of the device's storage offset alignment).
    pub offset: u64,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Bytes a tensor's buffer takes: the data rounded up to 16 bytes, so kernels may read whole
/// 16-byte blocks (`vec4<u32>`) at the tail.
pub fn padded_bytes(numel: usize, dtype: DType) -> u64 {
    let b = (numel.max(1) * dtype.size()) as u64;
    b.div_ceil(16) * 16
}

impl Tensor {
    /// Allocates an uninitialised tensor; errors if it is over the device's buffer limits.
    pub fn empty(gpu: &Gpu, shape: &[usize], dtype: DType, what: &str) -> Result<Tensor> {
        let name = format!("{what} {shape:?} {dtype}");
        // Shapes whose byte count overflows are refused, not wrapped to a tiny buffer.
        let numel = shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d));
        let Some(numel) = numel.filter(|n| n.checked_mul(dtype.size()).is_some()) else {
            return Err(Error::TooLarge {
                what: name,
                bytes: u64::MAX,
                limit: gpu.caps.limits.max_buffer_size,
                limit_name: "max_buffer_size",
            });
        };
        let bytes = padded_bytes(numel, dtype);
        gpu.check_size(&name, bytes)?;
        let buffer = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some(what),
            size: bytes,
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        Ok(Tensor { buffer: Arc::new(buffer), offset: 0, shape: shape.to_vec(), dtype })
    }

    /// Uploads f32 values, converting to the tensor's dtype.
    pub fn from_f32(gpu: &Gpu, shape: &[usize], dtype: DType, data: &[f32], what: &str) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, dtype, what)?;
        if data.len() != t.numel() {
            return Err(Error::shape(
                format!("upload of {what}"),
                format!("shape {shape:?} holds {} values, got {}", t.numel(), data.len()),
            ));
        }
        t.write_f32(gpu, data)?;
        Ok(t)
    }

    /// Uploads f16 values given as their IEEE half bit patterns (as read from a weight file),
    /// into a new f16 tensor, without converting or copying the whole slice again.
    pub fn from_f16_bits(gpu: &Gpu, shape: &[usize], bits: &[u16], what: &str) -> Result<Tensor> {
        let t = Tensor::empty(gpu, shape, DType::F16, what)?;
        if bits.len() != t.numel() {
            return Err(Error::shape(
                format!("upload of {what}"),
                format!("shape {shape:?} holds {} values, got {}", t.numel(), bits.len()),
            ));
        }
        t.write_f16_bits(gpu, bits)?;
        Ok(t)
    }

    /// Overwrites an f16 tensor with IEEE half bit patterns (queued: lands before the next
    /// submit).
    pub fn write_f16_bits(&self, gpu: &Gpu, bits: &[u16]) -> Result<()> {
        if self.dtype != DType::F16 || bits.len() != self.numel() {
            return Err(Error::shape("tensor write", format!("{} f16 values for {:?} {}", bits.len(), self.shape, self.dtype)));
        }
        // Queue writes must be whole 4-byte words: the even-length body goes as it is, an odd
        // last value is padded with a zero half (the buffer is padded to 16 bytes).
        let even = bits.len() & !1;
        if even > 0 {
            gpu.queue.write_buffer(&self.buffer, self.offset, bytemuck::cast_slice(&bits[..even]));
        }
        if even < bits.len() {
            let tail = [bits[even], 0u16];
            gpu.queue.write_buffer(&self.buffer, self.offset + even as u64 * 2, bytemuck::cast_slice(&tail));
        }
        Ok(())
    }

    /// Overwrites the tensor with f32 values, converted to its dtype.
    pub fn write_f32(&self, gpu: &Gpu, data: &[f32]) -> Result<()> {
        if data.len() != self.numel() {
            return Err(Error::shape("tensor write", format!("{} values for shape {:?}", data.len(), self.shape)));
        }
        let mut bytes: Vec<u8> = match self.dtype {
            DType::F32 => bytemuck::cast_slice(data).to_vec(),
            DType::F16 => {
                let h: Vec<f16> = data.iter().map(|&x| f16::from_f32(x)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
        };
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        gpu.queue.write_buffer(&self.buffer, self.offset, &bytes);
        Ok(())
    }

    /// Fills every byte of the tensor's storage with `word` (e.g. NaN patterns for poisoning).
    pub fn fill_words(&self, gpu: &Gpu, word: u32) {
        let n = (self.bytes() / 4) as usize;
        let v = vec![word; n];
        gpu.queue.write_buffer(&self.buffer, self.offset, bytemuck::cast_slice(&v));
    }

    /// Number of elements.
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Storage bytes (padded to 16).
    pub fn bytes(&self) -> u64 {
        padded_bytes(self.numel(), self.dtype)
    }

    /// The binding for a bind group.
    pub fn binding(&self) -> wgpu::BindingResource<'_> {
        wgpu::BindingResource::Buffer(wgpu::BufferBinding {
            buffer: &self.buffer,
            offset: self.offset,
            size: std::num::NonZeroU64::new(self.bytes()),
        })
    }

    /// Whether the two tensors' storage ranges share bytes of one buffer.
    pub fn overlaps(&self, other: &Tensor) -> bool {
        Arc::ptr_eq(&self.buffer, &other.buffer)
            && self.offset < other.offset + other.bytes()
            && other.offset < self.offset + self.bytes()
    }

    /// Downloads the values as f32 (waits for the GPU).
    pub fn to_f32(&self, gpu: &Gpu) -> Result<Vec<f32>> {
        let n = self.numel();
        let bytes = self.bytes();
        let staging = gpu.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("download"),
            size: bytes,
            usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            mapped_at_creation: false,
        });
        let mut enc = gpu.device.create_command_encoder(&Default::default());
        enc.copy_buffer_to_buffer(&self.buffer, self.offset, &staging, 0, bytes);
        gpu.queue.submit([enc.finish()]);
        let slice = staging.slice(..);
        let (tx, rx) = std::sync::mpsc::channel();
        slice.map_async(wgpu::MapMode::Read, move |r| {
            let _ = tx.send(r);
        });
        gpu.wait()?;
        rx.recv()
            .map_err(|e| Error::Gpu(e.to_string()))?
            .map_err(|e| Error::Gpu(format!("reading back a tensor: {e}")))?;
        let data = slice.get_mapped_range().map_err(|e| Error::Gpu(format!("mapping a readback buffer: {e}")))?;
        let out = match self.dtype {
            DType::F32 => bytemuck::cast_slice::<u8, f32>(&data[..n * 4]).to_vec(),
            DType::F16 => bytemuck::cast_slice::<u8, f16>(&data[..n * 2]).iter().map(|h| h.to_f32()).collect(),
        };
        drop(data);
        staging.unmap();
        Ok(out)
    }
}
