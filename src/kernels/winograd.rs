//! 3x3 convolutions (stride 1, padding 1) by Winograd's F(2x2, 3x3): the weight transform
//! (on the CPU, once when the weights load), the input and output transforms
//! (`shaders/winograd.wgsl`, which holds the algebra) and the product batched over the 16
//! transformed positions between them (the matmul shaders, f32 out).
//!
//! Each 2x2 block of output pixels costs 16·cin·cout multiplications instead of the direct
//! convolution's 36·cin·cout. The price: the transformed input V (f16 [16, tiles, cin], about
//! 4x the input) and the f32 products M ([16, tiles, cout], about 8x the output) go through
//! memory, and the product reads the transformed weight U (f16 [16, cout, cin], 16/9 of the
//! weight): transformed once when the weights load and kept instead of the weight (a layer
//! loaded so runs forward only), or for large weights made from the weight before each use
//! ([`Winograd::weight`], into scratch), which costs a pass over both but keeps the model's
//! memory (`model::layers::Conv`). Flops reported for the product are its own
//! (2·16·tiles·cin·cout).

use bytemuck::{Pod, Zeroable};

use super::grid;
use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, KernelPath, PipelineKey, Recorder, Shader, Tensor};
use crate::kernels::matmul::{BiasLayout, CoopTile, Matmul};

/// Mirrors `struct Params` in winograd.wgsl.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct WinogradParams {
    pub batch: u32,
    pub h: u32,
    pub w: u32,
    pub c: u32,
    pub th: u32,
    pub tw: u32,
    pub tiles: u32,
    pub flags: u32,
    pub off_bias: u32,
    pub bias_ld: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Positions of a transformed tile (4x4).
pub const POSITIONS: usize = 16;

/// The pipeline key of an entry point (`input` or `output`).
pub fn key(entry: &'static str) -> PipelineKey {
    PipelineKey::new(Shader::Winograd, entry)
}

/// U [16, cout, cin] = G g Gᵀ for every (output, input) channel pair's 3x3 filter g, from a
/// PyTorch-layout weight [cout, cin, 3, 3]; position ξ = 4i + j of U[ξ] is element (i, j).
pub fn transform_weight(w: &[f32], cout: usize, cin: usize) -> Vec<f32> {
    assert_eq!(w.len(), cout * cin * 9, "transform_weight: weight [cout, cin, 3, 3]");
    // G·v for a 3-vector v: (v0, (v0 + v1 + v2) / 2, (v0 - v1 + v2) / 2, v2).
    let g = |v: [f32; 3]| [v[0], 0.5 * (v[0] + v[1] + v[2]), 0.5 * (v[0] - v[1] + v[2]), v[2]];
    let mut u = vec![0f32; POSITIONS * cout * cin];
    for co in 0..cout {
        for ci in 0..cin {
            let f = &w[(co * cin + ci) * 9..][..9];
            // Columns first (G g), then rows ((G g) Gᵀ).
            let cols: [[f32; 4]; 3] = std::array::from_fn(|c| g([f[c], f[3 + c], f[6 + c]]));
            for i in 0..4 {
                let row = g([cols[0][i], cols[1][i], cols[2][i]]);
                for (j, &val) in row.iter().enumerate() {
                    u[((4 * i + j) * cout + co) * cin + ci] = val;
                }
            }
        }
    }
    u
}

/// One Winograd convolution of fixed shape: `batch` images of `h` x `w`, `cin` -> `cout`
/// channels, 3x3, stride 1, padding 1, NHWC.
#[derive(Clone, Copy, Debug)]
pub struct Winograd {
    pub batch: usize,
    pub h: usize,
    pub w: usize,
    pub cin: usize,
    pub cout: usize,
    /// Force the product's path (default: the device's).
    pub path: Option<KernelPath>,
    /// Force the product's cooperative-matrix tile (default: the launcher's choice).
    pub tile: Option<CoopTile>,
}

impl Winograd {
    pub fn new(batch: usize, h: usize, w: usize, cin: usize, cout: usize) -> Result<Self> {
        if batch == 0 || h == 0 || w == 0 || !Self::supports(cin, cout) {
            return Err(Error::shape("winograd conv", format!("{batch} images of {h}x{w}, {cin} -> {cout} channels: need a non-empty image and channel counts that are multiples of 8")));
        }
        Ok(Winograd { batch, h, w, cin, cout, path: None, tile: None })
    }

    /// Whether a 3x3 convolution with these channel counts can run this way (whole 16-byte
    /// words in the product's loads and four channels per transform invocation).
    pub fn supports(cin: usize, cout: usize) -> bool {
        cin > 0 && cout > 0 && cin.is_multiple_of(8) && cout.is_multiple_of(8)
    }

    /// Output tiles of 2x2 pixels over the batch.
    pub fn tiles(&self) -> usize {
        self.batch * self.h.div_ceil(2) * self.w.div_ceil(2)
    }

    /// The transformed input V (f16).
    pub fn v_shape(&self) -> [usize; 3] {
        [POSITIONS, self.tiles(), self.cin]
    }

    /// The products M (f32).
    pub fn m_shape(&self) -> [usize; 3] {
        [POSITIONS, self.tiles(), self.cout]
    }

    /// Bytes of the larger scratch tensor (V f16 or M f32), which must fit a storage binding.
    pub fn largest_scratch(&self) -> u64 {
        let n = |s: [usize; 3]| s.iter().product::<usize>();
        (2 * n(self.v_shape())).max(4 * n(self.m_shape())) as u64
    }

    /// The product M[ξ] = V[ξ]·U[ξ]ᵀ, batched over the 16 positions, on the coop tile of
    /// [`Winograd::coop_tile`] unless one is forced.
    pub fn product(&self) -> Matmul {
        let t = self.tiles();
        let mut mm = Matmul::new(t, self.cout, self.cin);
        mm.batch = POSITIONS;
        mm.trans_b = true;
        mm.stride_a = t * self.cin;
        mm.stride_b = self.cout * self.cin;
        mm.path = self.path;
        mm.tile = Some(self.tile.unwrap_or_else(|| self.coop_tile()));
        mm
    }

    /// The product's coop tile, by its rows per position (tiles) and width (cout). H100,
    /// `bench --all-tiles` (us, the chosen tile against the matmul launcher's own choice):
    /// UNet at batch 2, 8x8 1280 -> 1280 (32 rows) NARROW 68 vs 73, 2560 -> 1280 110 vs 120;
    /// 16x16 (128 rows) ROWS_MID 123 and 200 (LARGE 195 at 2560 -> 1280); 32x32 (512 rows)
    /// 640 -> 640 ROWS_MID 148 vs 163, 1920 -> 640 279 vs 312 (CONV_MID 273); 64x64 (2048
    /// rows) 320 -> 320 CONV_MID 215 vs 237; VAE 64x64 512 -> 512 (1024 rows) LARGE 191 vs
    /// 200, 128x128 631 vs 678.
    pub fn coop_tile(&self) -> CoopTile {
        match self.tiles() {
            0..=64 => CoopTile::NARROW,
            65..=512 => CoopTile::ROWS_MID,
            _ if self.cout >= 512 => CoopTile::LARGE,
            _ => CoopTile::CONV_MID,
        }
    }

    /// Flops of the direct convolution this replaces (2·pixels·cout·9·cin), for comparing
    /// rates with it.
    pub fn direct_flops(&self) -> f64 {
        2.0 * (self.batch * self.h * self.w) as f64 * self.cout as f64 * 9.0 * self.cin as f64
    }

    fn params(&self, c: usize) -> WinogradParams {
        let (th, tw) = (self.h.div_ceil(2), self.w.div_ceil(2));
        WinogradParams {
            batch: self.batch as u32,
            h: self.h as u32,
            w: self.w as u32,
            c: c as u32,
            th: th as u32,
            tw: tw as u32,
            tiles: self.tiles() as u32,
            ..Default::default()
        }
    }

    fn check(&self, what: &str, t: &Tensor, dtype: DType, numel: usize) -> Result<()> {
        if t.dtype != dtype || t.numel() != numel {
            return Err(Error::shape("winograd conv", format!("{what} {:?} {}: want {numel} elements of {dtype}", t.shape, t.dtype)));
        }
        Ok(())
    }

    /// The weight transform on the GPU: U [16, cout, cin] f16 from the weight [cout, 3, 3, cin]
    /// f16 (as [`transform_weight`] on the CPU, which takes PyTorch's layout).
    pub fn weight(&self, gpu: &Gpu, w: &Tensor, u: &Tensor) -> Result<Dispatch> {
        self.check("weight", w, DType::F16, self.cout * 9 * self.cin)?;
        self.check("U", u, DType::F16, POSITIONS * self.cout * self.cin)?;
        let p = WinogradParams { c: self.cin as u32, tiles: self.cout as u32, ..Default::default() };
        let bytes = (w.numel() * 2 + u.numel() * 2) as f64;
        gpu.dispatch_at(&key("weight"), &p, &[(1, w), (2, u)], grid(self.cout * self.cin / 4), 0.0, bytes)
    }

    /// The input transform: V [16, tiles, cin] f16 from x [batch, h, w, cin] f16.
    pub fn input(&self, gpu: &Gpu, x: &Tensor, v: &Tensor) -> Result<Dispatch> {
        self.check("x", x, DType::F16, self.batch * self.h * self.w * self.cin)?;
        self.check("V", v, DType::F16, POSITIONS * self.tiles() * self.cin)?;
        let units = self.tiles() * self.cin / 4;
        let bytes = (x.numel() * 2 + v.numel() * 2) as f64;
        gpu.dispatch_at(&key("input"), &self.params(self.cin), &[(1, x), (2, v)], grid(units), 0.0, bytes)
    }

    /// The output transform: y [batch, h, w, cout] f16 (=, or += with `accumulate`) from M
    /// [16, tiles, cout] f32, plus the bias (read by `layout`: one vector, or one row per
    /// image with `layout.rows` = h·w).
    pub fn output(&self, gpu: &Gpu, m: &Tensor, bias: Option<(&Tensor, BiasLayout)>, y: &Tensor, accumulate: bool) -> Result<Dispatch> {
        let op = "winograd conv";
        self.check("M", m, DType::F32, POSITIONS * self.tiles() * self.cout)?;
        self.check("y", y, DType::F16, self.batch * self.h * self.w * self.cout)?;
        let mut p = self.params(self.cout);
        p.flags = if accumulate { 2 } else { 0 };
        if let Some((b, l)) = bias {
            let per_image = l.ld != 0 && self.batch > 1;
            if (per_image && l.rows != self.h * self.w) || l.off % 2 != 0 || l.ld % 2 != 0 || b.dtype != DType::F16 {
                return Err(Error::shape(op, format!("bias {:?} read at {} with rows {} apart by {}: want f16, even offsets, one row per image of {}x{}", b.shape, l.off, l.ld, l.rows, self.h, self.w)));
            }
            let ld = if per_image { l.ld } else { 0 };
            if b.numel() < l.off + (self.batch - 1) * ld + self.cout {
                return Err(Error::shape(op, format!("bias {:?} too small for {} images of {} channels at {} (rows {} apart)", b.shape, self.batch, self.cout, l.off, ld)));
            }
            p.flags |= 1;
            p.off_bias = l.off as u32;
            p.bias_ld = ld as u32;
        }
        let units = self.tiles() * self.cout / 4;
        let bytes = (m.numel() * 4 + y.numel() * if accumulate { 4 } else { 2 }) as f64;
        let b = bias.map_or(m, |(b, _)| b);
        gpu.dispatch_at(&key("output"), &p, &[(3, m), (4, y), (5, b)], grid(units), 0.0, bytes)
    }

    /// Records y (=, or +=) conv(x) + bias from the transformed weight `u` [16, cout, cin], with
    /// `v` and `m` as scratch (shapes [`Winograd::v_shape`], [`Winograd::m_shape`]).
    #[allow(clippy::too_many_arguments)]
    pub fn run(
        &self,
        gpu: &Gpu,
        rec: &mut Recorder,
        x: &Tensor,
        u: &Tensor,
        bias: Option<(&Tensor, BiasLayout)>,
        y: &Tensor,
        accumulate: bool,
        v: &Tensor,
        m: &Tensor,
    ) -> Result<()> {
        self.check("U", u, DType::F16, POSITIONS * self.cout * self.cin)?;
        rec.run(&self.input(gpu, x, v)?)?;
        self.product().run(gpu, rec, v, u, None, m)?;
        rec.run(&self.output(gpu, m, bias, y, accumulate)?)
    }
}
