//! Reading one tensor of [`Weights`]: the shape and dtype checks (a missing name recorded),
//! the LoRA changes merged in f32, the conversion to f16 (a finite value beyond its range is an
//! error) or f32, and the upload, with the queue flushed every [`FLUSH_BYTES`].

use std::borrow::Cow;

use half::{bf16, f16};
use safetensors::Dtype;

use super::{Entry, FLUSH_BYTES, Weights};
use crate::error::{Error, Result};
use crate::gpu::{DType, Gpu, Tensor};

impl Weights {
    /// Uploads a tensor as f16, checking its shape. A missing name is recorded for
    /// [`Weights::finish`] and gives a NaN-filled placeholder of the expected shape.
    pub fn get(&self, gpu: &Gpu, name: &str, expected: &[usize]) -> Result<Tensor> {
        self.get_as(gpu, name, expected, DType::F16)
    }

    /// As [`Weights::get`], uploading as f16 or f32.
    pub fn get_as(&self, gpu: &Gpu, name: &str, expected: &[usize], dtype: DType) -> Result<Tensor> {
        let Some(e) = self.lookup(name, expected)? else {
            let t = Tensor::empty(gpu, expected, dtype, name)?;
            t.fill_words(gpu, 0xFFFF_FFFF);
            return Ok(t);
        };
        let data = &self.files[e.file].mmap[e.start..e.end];
        let t = match (dtype, self.with_loras(name, e, data)?) {
            (DType::F16, None) => {
                let bits = self.f16_bits(e, data)?;
                Tensor::from_f16_bits(gpu, &e.shape, &bits, name)?
            }
            (DType::F16, Some(v)) => {
                let bits = v.iter().enumerate().map(|(i, &x)| self.checked_f16(e, i, x, true)).collect::<Result<Vec<u16>>>()?;
                Tensor::from_f16_bits(gpu, &e.shape, &bits, name)?
            }
            (DType::F32, None) => Tensor::from_f32(gpu, &e.shape, DType::F32, &self.f32_values(e, data)?, name)?,
            (DType::F32, Some(v)) => Tensor::from_f32(gpu, &e.shape, DType::F32, &v, name)?,
        };
        self.uploaded(gpu, t.bytes())?;
        Ok(t)
    }

    /// Reads a tensor to the CPU as f32 with the file's values (not rounded to f16; LoRA changes
    /// merged in f32), checking its shape. A missing name is recorded for [`Weights::finish`]
    /// and gives NaNs.
    pub fn get_f32(&self, name: &str, expected: &[usize]) -> Result<Vec<f32>> {
        match self.lookup(name, expected)? {
            Some(e) => {
                let data = &self.files[e.file].mmap[e.start..e.end];
                match self.with_loras(name, e, data)? {
                    Some(v) => Ok(v),
                    None => self.f32_values(e, data),
                }
            }
            None => {
                let n = expected.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or_else(|| {
                    Error::shape(format!("reading {name}"), format!("shape {expected:?} overflows"))
                })?;
                Ok(vec![f32::NAN; n])
            }
        }
    }

    /// The entry for a name after the shape and dtype checks; `None` (recorded) if missing.
    fn lookup(&self, name: &str, expected: &[usize]) -> Result<Option<&Entry>> {
        let Some(e) = self.entries.get(name) else {
            let mut st = self.state();
            if !st.missing.iter().any(|m| m == name) {
                st.missing.push(name.to_string());
            }
            return Ok(None);
        };
        let file = &self.files[e.file].path;
        if e.shape != expected {
            let stored = if e.file_shape != e.shape { format!(" (stored as {:?})", e.file_shape) } else { String::new() };
            return Err(Error::model(
                file,
                format!(
                    "tensor {:?}{} has shape {:?}{stored}, but the SD-1.5 model needs {expected:?}; the file is \
                     not an SD-1.5 model (or was made for another configuration): use an SD-1.5 checkpoint \
                     or a model fine-tuned from one",
                    e.key,
                    if e.key != name { format!(" (loaded as {name})") } else { String::new() },
                    e.shape
                ),
            ));
        }
        if !matches!(e.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::model(
                file,
                format!(
                    "tensor {:?} is stored as {:?}; atelier reads F32, F16 and BF16 weights only (quantized or \
                     integer weights are not supported): use an fp32, fp16 or bf16 safetensors file",
                    e.key, e.dtype
                ),
            ));
        }
        self.state().used.insert(name.to_string());
        Ok(Some(e))
    }

    fn overflow(&self, e: &Entry, index: usize, value: f32) -> Error {
        Error::model(
            &self.files[e.file].path,
            format!(
                "tensor {:?} holds {value} at index {index}, outside the f16 range (±65504) atelier stores \
                 weights in; the file is damaged or is not an SD-1.5 model",
                e.key
            ),
        )
    }

    /// The tensor's values with the LoRA changes for `name` merged, or `None` if no LoRA
    /// changes it.
    fn with_loras(&self, name: &str, e: &Entry, data: &[u8]) -> Result<Option<Vec<f32>>> {
        let Some(deltas) = self.deltas.get(name) else { return Ok(None) };
        let mut v = self.f32_values(e, data)?;
        for d in deltas {
            d.add_to(&mut v);
        }
        let mut st = self.state();
        for d in deltas {
            st.merged[d.lora].insert(name.to_string());
        }
        Ok(Some(v))
    }

    /// x as f16 bits; a finite value beyond f16's range is an error naming the key (and the
    /// LoRAs, when `merged`).
    fn checked_f16(&self, e: &Entry, i: usize, x: f32, merged: bool) -> Result<u16> {
        let h = f16::from_f32(x);
        if h.is_infinite() && x.is_finite() {
            let mut err = self.overflow(e, i, x);
            if let (Error::Model { problem, .. }, true) = (&mut err, merged) {
                *problem += " (after merging LoRAs into it: lower their scales)";
            }
            Err(err)
        } else {
            Ok(h.to_bits())
        }
    }

    /// The tensor as f16 bit patterns (borrowed straight from the file when it is f16).
    fn f16_bits<'d>(&self, e: &Entry, data: &'d [u8]) -> Result<Cow<'d, [u16]>> {
        let checked = |x: f32, i: usize| self.checked_f16(e, i, x, false);
        Ok(match e.dtype {
            Dtype::F16 => match bytemuck::try_cast_slice::<u8, u16>(data) {
                Ok(s) if cfg!(target_endian = "little") => Cow::Borrowed(s),
                _ => Cow::Owned(data.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()),
            },
            Dtype::F32 => Cow::Owned(
                data.chunks_exact(4)
                    .enumerate()
                    .map(|(i, c)| checked(f32::from_le_bytes([c[0], c[1], c[2], c[3]]), i))
                    .collect::<Result<_>>()?,
            ),
            _ => Cow::Owned(
                data.chunks_exact(2)
                    .enumerate()
                    .map(|(i, c)| checked(bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32(), i))
                    .collect::<Result<_>>()?,
            ),
        })
    }

    /// The tensor's values as f32, exactly as stored.
    fn f32_values(&self, e: &Entry, data: &[u8]) -> Result<Vec<f32>> {
        Ok(match e.dtype {
            Dtype::F32 => data.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            Dtype::F16 => data.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            Dtype::BF16 => data.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32()).collect(),
            other => return Err(Error::model(&self.files[e.file].path, format!("tensor {:?} is {other:?}", e.key))),
        })
    }

    /// Counts an upload; every [`FLUSH_BYTES`] submits the queued writes and waits, so the
    /// staging copies of a whole model never pile up in RAM.
    pub(super) fn uploaded(&self, gpu: &Gpu, bytes: u64) -> Result<()> {
        let flush = {
            let mut st = self.state();
            st.bytes += bytes;
            st.since_flush += bytes;
            let f = st.since_flush >= FLUSH_BYTES;
            if f {
                st.since_flush = 0;
            }
            f
        };
        if flush {
            gpu.queue.submit([]);
            gpu.wait()?;
        }
        Ok(())
    }
}
