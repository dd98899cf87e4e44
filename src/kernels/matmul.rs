//! Launchers for the matmul family (`shaders/matmul_scalar.wgsl`, `shaders/matmul_coop.wgsl`):
//! C = alpha·op(A)·op(B) (+ bias) (+ C), batched, f16 inputs, f16 or f32 output, any M, N, K.
//! `linear` is Y = X·Wᵀ + b. The path (cooperative matrices or scalar) follows the device's
//! capabilities unless forced. Flops: 2·M·N·K per batch; bytes: A, B and C once.

use bytemuck::{Pod, Zeroable};

use crate::error::{Error, Result};
use crate::gpu::{DType, Dispatch, Gpu, KernelPath, PipelineKey, Shader, Tensor};

mod tiles;
pub use tiles::CoopTile;

/// Mirrors `struct Params` in both matmul shaders.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
pub struct MatmulParams {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub batch: u32,
    pub lda: u32,
    pub ldb: u32,
    pub ldc: u32,
    pub flags: u32,
    pub stride_a: u32,
    pub stride_b: u32,
    pub stride_c: u32,
    pub alpha: f32,
    pub off_a: u32,
    pub off_b: u32,
    pub off_c: u32,
    pub off_bias: u32,
    pub ih: u32,
    pub iw: u32,
    pub cin: u32,
    pub ks: u32,
    pub stride: u32,
    pub pad: u32,
    pub oh: u32,
    pub ow: u32,
    pub bias_rows: u32,
    pub bias_ld: u32,
    pub _pad0: u32,
    pub _pad1: u32,
}

/// Where output row m reads its bias: row m / `rows` of a bias matrix whose rows are `ld`
/// elements apart, starting at element `off` of the bias tensor. The default (rows 1, ld 0)
/// is one bias vector [N] for every row; a per-image bias (a resnet's conv1 bias plus its
/// image's time embedding, one row per image of oh·ow output rows) sets rows to oh·ow. The
/// split-K sum reads the bias in 8-element words: there off and ld must be multiples of 8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BiasLayout {
    pub off: usize,
    pub rows: usize,
    pub ld: usize,
}

impl Default for BiasLayout {
    fn default() -> Self {
        BiasLayout { off: 0, rows: 1, ld: 0 }
    }
}

impl BiasLayout {
    /// The bias elements a product of `m` rows and `n` columns reads up to (exclusive).
    pub fn extent(&self, m: usize, n: usize) -> usize {
        self.off + (m.max(1) - 1) / self.rows.max(1) * self.ld + n
    }
}

const FLAG_BIAS: u32 = 1;
const FLAG_ACCUMULATE: u32 = 2;
const FLAG_VEC: u32 = 4;
const FLAG_CONV_VEC: u32 = 8;

/// The geometry of a convolution run as an implicit GEMM (see `kernels::conv`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvGeom {
    pub images: usize,
    pub ih: usize,
    pub iw: usize,
    pub cin: usize,
    pub ks: usize,
    pub stride: usize,
    pub pad: usize,
    pub oh: usize,
    pub ow: usize,
    /// The gather of a transposed convolution (override CONV_T): the image read as if dilated
    /// by `stride` and gathered at stride 1 (a strided convolution's input gradient, see
    /// `kernels::conv`). Then ih, iw, cin are dY's and oh, ow dX's.
    pub transposed: bool,
    /// B is a convolution's forward weight W [cin, ks, ks, N] (cin: this gather's channels,
    /// the forward's cout; N: the forward's cin) read flipped and channel-transposed through an
    /// index remap (override B_FLIP, with `trans_b` false): B(k, n) = W[co, ks-1-ty, ks-1-tx,
    /// n] for k = (ty·ks + tx)·cin + co, the B of a convolution's input gradient, so no
    /// flipped copy of W is built.
    pub flip_b: bool,
    /// A nearest 2x upsample then this 3x3 convolution, run as its four output phases
    /// (override PHASES, `kernels::conv::Upsample2xConv`): the product's batch entries are the
    /// phases, each a 2x2 gather (ks 2) of the [ih, iw] input (= oh, ow) with the phase's
    /// padding, writing every other pixel of C [images, 2ih, 2iw, N].
    pub phases: bool,
}

/// A matrix product to launch. Build with [`Matmul::new`], then set options.
#[derive(Clone, Debug)]
pub struct Matmul {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub batch: usize,
    /// A stored [K, M] instead of [M, K].
    pub trans_a: bool,
    /// B stored [N, K] instead of [K, N] (Y = X·Wᵀ).
    pub trans_b: bool,
    pub alpha: f32,
    /// C += instead of C =.
    pub accumulate: bool,
    /// Batch strides in elements (0 broadcasts one matrix over the batch).
    pub stride_a: usize,
    pub stride_b: usize,
    /// Force a path (default: the device's).
    pub path: Option<KernelPath>,
    /// Force a cooperative-matrix tile (default: chosen by size).
    pub tile: Option<CoopTile>,
    /// A is the implicit im2col matrix of an NHWC image batch (then not trans_a, batch 1, and
    /// trans_b unless the geometry's `flip_b`).
    pub conv: Option<ConvGeom>,
    /// Split K into this many slices computed side by side into f32 partials, then summed
    /// (default: chosen by [`Matmul::split`] when there are too few tiles to fill the GPU, as
    /// at the UNet's 16x16 and 8x8 levels).
    pub split_k: Option<usize>,
    /// A's row stride in elements (default: its width, K or M when trans_a) and the element
    /// where A starts: A may be a column slice of a wider tensor (a fused q/k/v product's
    /// gradient). Multiples of 8 keep the vector loads.
    pub lda: Option<usize>,
    pub off_a: usize,
    /// The element where B starts (default 0; a multiple of 8 keeps the vector loads): e.g.
    /// one batch entry's rows of a wider tensor. Not with a convolution's remapped B.
    pub off_b: usize,
    /// C's row stride and start element (default N and 0): C may be a column slice of a wider
    /// tensor (one projection's columns of a fused product). With f16 C both must be even, and
    /// so must N. A strided C never splits over K.
    pub ldc: Option<usize>,
    pub off_c: usize,
    /// How rows read the bias (default: one vector [N]).
    pub bias_layout: BiasLayout,
}

impl Matmul {
    pub fn new(m: usize, n: usize, k: usize) -> Self {
        Matmul {
            m,
            n,
            k,
            batch: 1,
            trans_a: false,
            trans_b: false,
            alpha: 1.0,
            accumulate: false,
            stride_a: m * k,
            stride_b: k * n,
            path: None,
            tile: None,
            conv: None,
            split_k: None,
            lda: None,
            off_a: 0,
            off_b: 0,
            ldc: None,
            off_c: 0,
            bias_layout: BiasLayout::default(),
        }
    }

    /// A's row stride (the given one, else its width).
    fn lda(&self) -> usize {
        self.lda.unwrap_or(if self.trans_a { self.m } else { self.k })
    }

    /// Whether this is a forward convolution (not an input gradient's gather).
    fn forward_conv(&self) -> bool {
        self.conv.is_some_and(|g| !g.flip_b && !g.transposed)
    }

    /// Whether C is a strided view (then no split over K).
    fn strided_c(&self) -> bool {
        self.ldc.is_some_and(|l| l != self.n) || self.off_c != 0
    }

    /// How many K slices a product runs as: 1 unless it has less than about one wave of tiles
    /// on a large GPU (120; the H100 has 132 SMs); then the smallest power of two up to 16
    /// that reaches two waves (264 tiles), with slices a multiple of 8 and at least 512 long.
    /// Linears split when M is at most 64 (the time-embedding projections, M = batch),
    /// into slices of at least 128, or when K is long (below): on the H100 a split made the UNet's 512x1280x1280 linears
    /// no faster (79.5 -> 76.4 us plus the sum) and CLIP's 154-row ones 3x slower, while the
    /// 2x1280x1280 projection went 87 -> 21 us. Convolutions (UNet, batch 2): 16x16x1280 x4
    /// 24.0 -> 39.5 TFLOP/s, 8x8x1280 x16 7.0 -> 27.0; 32x32x640 (160 tiles) is slower split
    /// (50.9 -> 46.7). Batched products never split (the slices are the batch entries).
    pub fn split(&self, gpu: &Gpu) -> usize {
        if !self.n.is_multiple_of(8) || !(self.m * self.n).is_multiple_of(8) || self.batch != 1 || self.strided_c() {
            return 1;
        }
        if let Some(s) = self.split_k {
            return s.max(1);
        }
        let (path, tile) = self.plan(gpu);
        let (bm, bn) = match path {
            KernelPath::Coop => (tile.bm as usize, tile.bn as usize),
            KernelPath::Scalar => (128, 128),
        };
        let tiles = self.m.div_ceil(bm) * self.n.div_ceil(bn);
        if path == KernelPath::Coop && tile == CoopTile::CONV_MID {
            // Forward convolutions below half a wave of CONV_MID tiles split 8 ways from K 11520
            // (slices of 1440 and more), else 2 ways. H100, session 13, every tile with every
            // split, batch 2 (us, the 64x128 tile split as before -> CONV_MID split): 16x16
            // 1280 -> 1280 306 -> 273 (x2 264, x4 282), 16x16 2560 -> 1280 561 -> 439 (x16 461),
            // 8x8 1280 -> 1280 111 -> 94 (x16 120), 8x8 2560 -> 1280 183 -> 156 (x16 185),
            // batch 1 32x32 640 -> 640 175 -> 146 (x4 168). More slices write more f32 partials
            // and wait on more epilogues.
            if !self.forward_conv() || tiles >= 64 {
                return 1;
            }
            let s = if self.k >= 8 * 1440 { 8 } else { 2 };
            return if self.k.is_multiple_of(16 * s) && self.k / s >= 512 { s } else { 1 };
        }
        if tiles >= 120 {
            return 1;
        }
        let min_slice = match (self.conv.is_some(), self.m > 64) {
            (true, _) => 512,
            (false, false) => 128,
            // Taller linears only with long K, in slices of at least 1280 (H100, v5: the
            // training step's 256x1280x10240 dX 456 -> 165 us split 4, 1024x640x5120 163 ->
            // 120 us split 2), or of at least 320 from K 1280 below half a wave of tiles: in
            // the training step (cold operands) 256x1280x1280 at 40 tiles went 83 -> 43 us
            // split 4 (+ 7 us for the sum; a bench's warm back-to-back runs had measured 47 ->
            // 40 us for split 2), while 1024x640x640 at 80 tiles only went 46 -> 42 us split 2.
            (false, true) if self.k >= 2560 => 1280,
            (false, true) if self.k >= 1280 && tiles < 64 => 320,
            (false, true) => return 1,
        };
        let mut s = 1;
        while tiles * s < 264 && s < 16 && self.k.is_multiple_of(16 * s) && self.k / (2 * s) >= min_slice {
            s *= 2;
        }
        s
    }

    /// Floating-point operations of one launch.
    pub fn flops(&self) -> f64 {
        2.0 * self.m as f64 * self.n as f64 * self.k as f64 * self.batch as f64
    }

    /// Which path and tile this product will use on `gpu`.
    pub fn plan(&self, gpu: &Gpu) -> (KernelPath, CoopTile) {
        let path = match self.path {
            Some(KernelPath::Coop) if gpu.caps.coop_16x16_f16_f32 => KernelPath::Coop,
            Some(_) => KernelPath::Scalar,
            None => gpu.caps.path,
        };
        let tile = self.tile.unwrap_or_else(|| {
            // Fewer than ~2 waves of big tiles on a large GPU: use a smaller tile.
            let big = CoopTile::DEFAULT;
            let tiles = self.m.div_ceil(big.bm as usize) * self.n.div_ceil(big.bn as usize) * self.batch;
            let mid = CoopTile::CONV_MID;
            let mid_tiles = self.m.div_ceil(mid.bm as usize) * self.n.div_ceil(mid.bn as usize) * self.batch;
            let forward_conv = self.forward_conv();
            // Linears keep the big tile down to about one wave (H100, UNet linears at M 8192:
            // N 320 K 320 35.6 -> 44.3 TFLOP/s, N 960 53.9 -> 68.4, N 320 K 1280 58.9 -> 67.7).
            // Forward convolutions keep it from about one wave (H100, session 11, after the
            // gather's carry: VAE 128x128x512 at 256 tiles 105 vs CONV_MID's 94 TFLOP/s, UNet
            // 64x64x320 batch 2 at 128 tiles 66 vs 62; at 64 tiles CONV_MID wins, 95 vs 56).
            let enough = match self.conv {
                Some(_) if forward_conv => 128,
                Some(_) => 264,
                // Wide outputs keep it down to 64 tiles (training, 256x10240x1280: 127 -> 86 us).
                None if self.n >= 4096 => 64,
                None => 120,
            };
            if self.conv.is_none() && !self.trans_b && !self.trans_a && self.n <= 320 && self.m >= 2048 {
                return CoopTile::NARROW;
            }
            // Y = X·Wᵀ linears of 8192 rows and more that would take the default tile or
            // CONV_MID (below): LARGE (measured on this layout only).
            let large_rows = self.conv.is_none() && self.trans_b && !self.trans_a && self.m >= 8192;
            if large_rows && (tiles >= enough || (self.n >= 960 && tiles < 640 && mid_tiles >= 264)) {
                return CoopTile::LARGE;
            }
            if self.conv.is_none() {
                // Linears (H100, session 10, `bench --all-tiles` twice, the two runs within 3%;
                // TFLOP/s, new tile vs the one before): N ≥ 960 below 640 default tiles but two
                // waves of 128x128 ones take CONV_MID's 128x128 BK 64 (2048x5120x640 103 vs 90,
                // 512x10240x1280 101 vs 79, training 1024x5120x640 86 vs 69, 4096x2560x320 74
                // vs 65, dX 4096x1280x320 67 vs 48; 8192x960x320 74 vs 73).
                if self.n >= 960 && tiles < 640 && mid_tiles >= 264 {
                    return mid;
                }
                // Below two waves of the default tile: ROWS_MID for 128 to 1024 rows (K up to
                // 5120; the training's 256x1280x10240 dX keeps its split); from 2048 rows
                // CONV_MID for K ≥ 1280 (2048x640x2560 88 vs 69, 4096x320x1280 77 vs 63), else
                // NARROW (2048x640x640 66 vs 53, 4096x320x320 48 vs 39).
                if tiles < enough && (128..=1024).contains(&self.m) && self.k <= 5120 {
                    return CoopTile::ROWS_MID;
                }
                if tiles < enough && self.m >= 2048 {
                    return if self.k >= 1280 { mid } else { CoopTile::NARROW };
                }
            }
            // At most 32 output channels: the 128x32 tile where it makes a wave or can be split
            // over K (H100, session 11: VAE conv_out 512x512 -> 3, 2048 tiles, 674 -> 379 us;
            // encoder conv_out 64x64 -> 8, split, 63 -> 46 us; but the UNet's conv_out to 4, 64
            // tiles and no split, 77 -> 116 us, so it keeps CONV_MID).
            let thin = CoopTile::THIN;
            let thin_tiles = self.m.div_ceil(thin.bm as usize) * self.batch;
            if forward_conv && self.n <= 32 && (thin_tiles >= 132 || self.n.is_multiple_of(8)) {
                return thin;
            }
            // Below a wave of default tiles CONV_MID, split over K by `split` when it makes less
            // than half a wave itself (the UNet's 16x16 and 8x8 levels). Upsample phases to at
            // most 256 channels take it too (H100, session 20, `bench --all-tiles`: the VAE's
            // 256 -> 512 upsampler at 256 channels 1.69 ms vs 1.75-1.78 on the default tile;
            // at 512 channels the default tile stays best, 1.48 vs 1.55).
            let phases = self.conv.is_some_and(|g| g.phases);
            if forward_conv && ((self.n <= 128 && mid_tiles >= 132) || tiles < enough || (phases && self.n <= 256)) {
                return mid;
            }
            match (tiles < enough, self.k >= 640) {
                (false, _) => big,
                (true, false) => CoopTile::SMALL,
                (true, true) => CoopTile::SMALL_LONG_K,
            }
        });
        (path, tile)
    }

    /// Prepares the launch writing `c` ([batch, M, N], f16 or f32) from `a`, `b` (f16) and an
    /// optional f16 `bias` [N]. With f16 output and odd N the launcher needs a padded scratch
    /// tensor; use [`Matmul::run`] for that case.
    pub fn prepare(&self, gpu: &Gpu, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, c: &Tensor, ldc: usize) -> Result<Dispatch> {
        self.check(a, b, bias, c, ldc)?;
        let (path, tile) = self.plan(gpu);
        let slices = self.split(gpu);
        if slices > 1 && (!self.k.is_multiple_of(8 * slices) || bias.is_some() || self.accumulate || c.dtype != DType::F32 || ldc != self.n) {
            return Err(Error::Usage(format!(
                "matmul: a split over K ({slices} slices) writes f32 partials without bias or accumulation, K ({}) a multiple of 8·slices; use Matmul::run",
                self.k
            )));
        }
        let k_slice = self.k / slices;
        let g = self.conv.unwrap_or(ConvGeom { images: 0, ih: 0, iw: 0, cin: 1, ks: 0, stride: 0, pad: 0, oh: 0, ow: 0, transposed: false, flip_b: false, phases: false });
        // Vector (16-byte) loads need every 8-element group aligned: row strides, batch
        // strides and offsets multiples of 8. With B_FLIP the only tensor they apply to is B
        // (A is gathered, under flag 8), whose rows start at multiples of N in W, with no
        // batch stride (the remap takes the split's offset): N % 8 == 0 is all it needs.
        let (lda, ldb) = (self.lda(), if self.trans_b { self.k } else { self.n });
        let vec_ok = match g.flip_b {
            true => self.n.is_multiple_of(8),
            false => lda % 8 == 0 && ldb % 8 == 0 && self.stride_a.is_multiple_of(8) && self.stride_b.is_multiple_of(8) && self.off_a.is_multiple_of(8) && self.off_b.is_multiple_of(8),
        };
        let mut flags = if vec_ok { FLAG_VEC } else { 0 };
        if self.conv.is_some() && g.cin.is_multiple_of(8) {
            flags |= FLAG_CONV_VEC;
        }
        if bias.is_some() {
            flags |= FLAG_BIAS;
        }
        if self.accumulate {
            flags |= FLAG_ACCUMULATE;
        }
        // Split over K: batch z is the slice starting at column z·k_slice of A (stride_a is
        // that offset, also for the conv gather) and at that row of B (with B_FLIP the remap
        // takes the gather's offset, B's stride is 0), C's batch z its f32 partial.
        let (k, batch, stride_a, stride_b) = match slices {
            1 => (self.k, self.batch, self.stride_a, self.stride_b),
            s => (
                k_slice,
                s,
                if self.trans_a { k_slice * lda } else { k_slice },
                if g.flip_b {
                    0
                } else if self.trans_b {
                    k_slice
                } else {
                    k_slice * self.n
                },
            ),
        };
        let params = MatmulParams {
            m: self.m as u32,
            n: self.n as u32,
            k: k as u32,
            batch: batch as u32,
            lda: lda as u32,
            ldb: ldb as u32,
            ldc: ldc as u32,
            flags,
            stride_a: stride_a as u32,
            stride_b: stride_b as u32,
            stride_c: (self.m * ldc) as u32,
            alpha: self.alpha,
            off_a: self.off_a as u32,
            off_b: self.off_b as u32,
            off_c: self.off_c as u32,
            ih: g.ih as u32,
            iw: g.iw as u32,
            cin: g.cin as u32,
            ks: g.ks as u32,
            stride: g.stride as u32,
            pad: g.pad as u32,
            oh: g.oh as u32,
            ow: g.ow as u32,
            off_bias: self.bias_layout.off as u32,
            bias_rows: self.bias_layout.rows as u32,
            bias_ld: self.bias_layout.ld as u32,
            ..Default::default()
        };
        let out_f32 = c.dtype == DType::F32;
        let (key, bm, bn) = match path {
            KernelPath::Coop => {
                if !tile.valid() {
                    return Err(Error::Usage(format!("matmul: unsupported cooperative-matrix tile {tile:?}")));
                }
                (tile.key(self.trans_a, self.trans_b, out_f32, self.conv.is_some()), tile.bm, tile.bn)
            }
            KernelPath::Scalar => (
                scalar_key(self.trans_a, self.trans_b, out_f32, self.conv.is_some()),
                128,
                128,
            ),
        };
        // The transposed gather and the remapped weight are variants of their own; forward
        // keys stay as they were.
        let key = if g.transposed { key.with("CONV_T", 1) } else { key };
        let key = if g.flip_b { key.with("B_FLIP", 1) } else { key };
        let key = if g.phases { key.with("PHASES", 1) } else { key };
        let key = if bias.is_some() && self.bias_layout.ld != 0 { key.with("PER_IMAGE_BIAS", 1) } else { key };
        let key = if path == KernelPath::Coop && self.whole_words(vec_ok, k) { key.with("VEC", 1) } else { key };
        let groups = [(self.n as u32).div_ceil(bn), (self.m as u32).div_ceil(bm), batch as u32];
        let a_elems = if self.lda.is_some() || self.off_a != 0 { self.batch * self.m * self.k } else { a.numel() };
        let bytes = (a_elems * 2 + b.numel() * 2 + self.m * self.n * self.batch * c.dtype.size()) as f64;
        gpu.dispatch(&key, &params, &[a, b, bias.unwrap_or(a), c], groups, self.flops(), bytes)
    }

    /// Whether every plain operand load of the coop kernel is a whole aligned 16-byte word
    /// (override VEC): aligned strides and offsets (`vec_ok`), and the contiguous extent of A
    /// and of B (K per slice `k`, or M / N where stored transposed) a multiple of 8. A gathered
    /// A (a convolution) has its own loads; with a remapped B (`flip_b`) too, VEC would change
    /// no load, so those keep the general variant.
    fn whole_words(&self, vec_ok: bool, k: usize) -> bool {
        let flip_b = self.conv.is_some_and(|g| g.flip_b);
        let a_ok = self.conv.is_some() || (if self.trans_a { self.m } else { k }) % 8 == 0;
        let b_ok = (if self.trans_b { k } else { self.n }) % 8 == 0;
        vec_ok && !flip_b && a_ok && b_ok
    }

    fn check(&self, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, c: &Tensor, ldc: usize) -> Result<()> {
        let op = "matmul";
        if a.dtype != DType::F16 || b.dtype != DType::F16 || bias.is_some_and(|t| t.dtype != DType::F16) {
            return Err(Error::DType { op: op.into(), detail: "A, B and bias must be f16".into() });
        }
        if self.m == 0 || self.n == 0 || self.k == 0 || self.batch == 0 {
            return Err(Error::shape(op, format!("empty product {}x{}x{} batch {}", self.m, self.n, self.k, self.batch)));
        }
        let need_a = match self.conv {
            Some(g) => {
                // B is the weight [N, K] (TRANS_B), or with flip_b the forward weight [cin, ks,
                // ks, N] read through the remap (not TRANS_B; its size, K·N, is checked below).
                let batch = if g.phases { 4 } else { 1 };
                let phases_ok = !g.phases || (g.ks == 2 && g.stride == 1 && !g.flip_b && !g.transposed && (g.ih, g.iw) == (g.oh, g.ow) && self.stride_a == 0 && !self.strided_c());
                if self.trans_a || self.trans_b == g.flip_b || self.batch != batch || !phases_ok || g.images * g.oh * g.ow != self.m || g.ks * g.ks * g.cin != self.k {
                    return Err(Error::shape(
                        op,
                        format!("convolution {g:?} does not match the product {}x{}x{} (trans_a {}, trans_b {})", self.m, self.n, self.k, self.trans_a, self.trans_b),
                    ));
                }
                if g.transposed && g.stride == 0 {
                    return Err(Error::shape(op, format!("transposed convolution {g:?} with stride 0")));
                }
                g.images * g.ih * g.iw * g.cin
            }
            None => {
                let lda = self.lda();
                let (rows, cols) = if self.trans_a { (self.k, self.m) } else { (self.m, self.k) };
                if lda < cols {
                    return Err(Error::shape(op, format!("A's row stride {lda} is below its width {cols}")));
                }
                self.off_a + (self.batch - 1) * self.stride_a + (rows - 1) * lda + cols
            }
        };
        if self.conv.is_some() && (self.lda.is_some() || self.off_a != 0) {
            return Err(Error::shape(op, "a convolution's gathered A takes no row stride or offset"));
        }
        if self.conv.is_some_and(|g| g.flip_b) && self.off_b != 0 {
            return Err(Error::shape(op, "a convolution's remapped B takes no offset"));
        }
        let need_b = self.off_b + (self.batch - 1) * self.stride_b + self.k * self.n;
        if a.numel() < need_a {
            return Err(Error::shape(op, format!("A {:?} holds {} values, needs {need_a}", a.shape, a.numel())));
        }
        if b.numel() < need_b {
            return Err(Error::shape(op, format!("B {:?} holds {} values, needs {need_b}", b.shape, b.numel())));
        }
        let bl = self.bias_layout;
        if bl.rows == 0 || (bl.ld != 0 && bl.ld < self.n) {
            return Err(Error::shape(op, format!("bias layout {bl:?}: rows must be at least 1, and the bias's rows 0 (one vector) or at least N={} apart", self.n)));
        }
        if let Some(t) = bias
            && t.numel() < bl.extent(self.m, self.n)
        {
            return Err(Error::shape(op, format!("bias {:?} too small for {}x{} output rows with layout {bl:?}", t.shape, self.m, self.n)));
        }
        if ldc < self.n || c.numel() < self.off_c + self.batch * self.m * ldc - (ldc - self.n) {
            return Err(Error::shape(op, format!("C {:?} too small for {}x{}x{} (ldc {ldc}, offset {})", c.shape, self.batch, self.m, self.n, self.off_c)));
        }
        if c.dtype == DType::F16 && ldc % 2 == 1 {
            return Err(Error::shape(op, "f16 C needs an even row stride (use Matmul::run for odd N)"));
        }
        if c.dtype == DType::F16 && self.strided_c() && (self.off_c % 2 == 1 || self.n % 2 == 1) {
            return Err(Error::shape(op, "a strided f16 C needs an even offset and an even N (pairs are written whole)"));
        }
        let max = u32::MAX as usize;
        if [need_a, need_b, c.numel()].iter().any(|&x| x > max) {
            return Err(Error::shape(op, "tensor over 2^32 elements"));
        }
        Ok(())
    }

    /// The f32 scratch a split over K needs ([slices·M, N]), or None when it does not split.
    pub fn partials_shape(&self, gpu: &Gpu) -> Option<[usize; 2]> {
        let slices = self.split(gpu);
        (slices > 1).then_some([slices * self.m, self.n])
    }

    /// Records a split product: the f32 partials into `parts` (of [`Matmul::partials_shape`]),
    /// then one pass summing them with the bias (and C when accumulating) into `c`.
    #[allow(clippy::too_many_arguments)]
    pub fn run_split(&self, gpu: &Gpu, rec: &mut crate::gpu::Recorder, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, c: &Tensor, parts: &Tensor) -> Result<()> {
        let slices = self.split(gpu);
        let mut mm = self.clone();
        mm.accumulate = false;
        mm.split_k = Some(slices);
        rec.run(&mm.prepare(gpu, a, b, None, parts, self.n)?)?;
        let bias = bias.map(|t| (t, self.bias_layout));
        rec.run(&super::elementwise::splitk_sum(gpu, parts, slices, bias, c, self.n, self.accumulate)?)
    }

    /// Records the product into `rec`: `c` is [batch, M, N]. Handles odd N with f16 output by
    /// computing into a padded scratch tensor and compacting it.
    pub fn run(&self, gpu: &Gpu, rec: &mut crate::gpu::Recorder, a: &Tensor, b: &Tensor, bias: Option<&Tensor>, c: &Tensor) -> Result<()> {
        if let Some(shape) = self.partials_shape(gpu) {
            let parts = Tensor::empty(gpu, &shape, DType::F32, "split-K partials")?;
            return self.run_split(gpu, rec, a, b, bias, c, &parts);
        }
        if c.dtype == DType::F32 || self.n.is_multiple_of(2) || self.strided_c() {
            return rec.run(&self.prepare(gpu, a, b, bias, c, self.ldc.unwrap_or(self.n))?);
        }
        let ld = self.n + 1;
        let rows = self.batch * self.m;
        let tmp = Tensor::empty(gpu, &[rows, ld], DType::F16, "matmul scratch (odd N)")?;
        if self.accumulate {
            rec.run(&super::elementwise::copy2d(gpu, c, &tmp, rows, self.n, self.n, ld)?)?;
        }
        rec.run(&self.prepare(gpu, a, b, bias, &tmp, ld)?)?;
        rec.run(&super::elementwise::copy2d(gpu, &tmp, c, rows, self.n, ld, self.n)?)
    }
}

/// The scalar path's pipeline key.
pub fn scalar_key(trans_a: bool, trans_b: bool, out_f32: bool, conv: bool) -> PipelineKey {
    PipelineKey::new(Shader::MatmulScalar, "main")
        .with("TRANS_A", trans_a as i64)
        .with("TRANS_B", trans_b as i64)
        .with("OUT_F32", out_f32 as i64)
        .with("CONV", conv as i64)
}

/// Y = X·Wᵀ + b: X [.., K] f16, W [N, K] f16, b [N] f16, Y [.., N] f16 or f32.
pub fn linear(gpu: &Gpu, rec: &mut crate::gpu::Recorder, x: &Tensor, w: &Tensor, b: Option<&Tensor>, y: &Tensor) -> Result<()> {
    if w.shape.len() != 2 {
        return Err(Error::shape("linear", format!("weight must be [N, K], got {:?}", w.shape)));
    }
    let (n, k) = (w.shape[0], w.shape[1]);
    if x.shape.last() != Some(&k) || y.shape.last() != Some(&n) {
        return Err(Error::shape("linear", format!("x {:?}, W {:?}, y {:?}", x.shape, w.shape, y.shape)));
    }
    let m = x.numel() / k;
    if y.numel() != m * n {
        return Err(Error::shape("linear", format!("y {:?} should hold {m}x{n}", y.shape)));
    }
    let mut mm = Matmul::new(m, n, k);
    mm.trans_b = true;
    mm.run(gpu, rec, x, w, b, y)
}
