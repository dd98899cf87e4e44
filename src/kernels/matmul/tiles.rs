//! The cooperative-matrix kernel's tile configurations ([`CoopTile`]): the named tiles the
//! launcher picks from (`Matmul::plan`, with the H100 measurements behind each choice), every
//! configuration the benchmark times, and how a tile sizes its shared memory and names its
//! pipeline.

use crate::gpu::{PipelineKey, Shader};

/// Tile configuration of the cooperative-matrix kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CoopTile {
    pub bm: u32,
    pub bn: u32,
    /// Subgroups (of 32) in a workgroup, and how many of them along M.
    pub warps: u32,
    pub warps_m: u32,
    /// K step through shared memory (16, 32 or 64).
    pub bk: u32,
    /// 1: one shared tile (two barriers a step); 2: two tiles in turn (one barrier).
    pub stages: u32,
    /// Tile order: 0 row by row, G > 0 in bands of G tile rows (L2 reuse).
    pub group_m: u32,
    /// Pad the shared arrays to the whole 48 KiB (see `shared_lens`).
    pub pad_shared: bool,
}

const fn tile(bm: u32, bn: u32, warps: u32, warps_m: u32, bk: u32, stages: u32, group_m: u32) -> CoopTile {
    CoopTile { bm, bn, warps, warps_m, bk, stages, group_m, pad_shared: false }
}

const fn padded(t: CoopTile) -> CoopTile {
    CoopTile { pad_shared: true, ..t }
}

impl CoopTile {
    /// The tile used by default: chosen by the H100 measurements in docs/PERF.md.
    pub const DEFAULT: CoopTile = padded(tile(128, 256, 8, 2, 32, 1, 8));
    /// For problems too small for two waves of the default tile, with short K. (BK = 64 for
    /// this and SMALL_LONG_K, to halve the K steps of the latency-bound batch-1 products, made
    /// the H100 training step 64.5 -> 75.4 ms; the bench's warm runs agree at K 1280.)
    pub const SMALL: CoopTile = tile(128, 128, 8, 2, 32, 1, 8);
    /// For problems too small for two waves of the default tile, with K ≥ 640 (H100, v4:
    /// 4096x320x1280 55.6 vs 46.9 TFLOP/s with SMALL, 77x3072x768 11.0 vs 7.4, but
    /// 4096x320x320 13.8 vs 30.5).
    pub const SMALL_LONG_K: CoopTile = tile(64, 128, 8, 2, 32, 1, 8);
    /// For the training step's input gradients of 320-wide layers, dX [4096, 320] = dY·W (B
    /// not transposed; H100, v5: K 320 30 -> 26 us, K 960 53 -> 48, K 2560 131 -> 116).
    pub const NARROW: CoopTile = tile(64, 64, 4, 2, 32, 1, 8);
    /// For forward convolutions below two waves of the default tile, or with at most 128
    /// output channels (H100, session 9, TFLOP/s against the tile used before: UNet 3x3
    /// 64x64x320 b2 58.3 vs 48.7, b1 57.0 vs 48.3, 32x32x640 b2 59.2 vs 49.0; VAE 512x512x128
    /// 77.5 vs 50.5 with the default tile, half of whose 256 columns were padding). Split
    /// over K only below half a wave of its tiles (`Matmul::split`).
    pub const CONV_MID: CoopTile = tile(128, 128, 8, 2, 64, 1, 8);
    /// For linears of 128 to 1024 rows below two waves of the default tile (H100, session 10,
    /// `bench --all-tiles` twice, TFLOP/s against SMALL_LONG_K: 512x1280x1280 60 vs 47,
    /// 512x1280x5120 71 vs 55, 154x640x768 10.2 vs 6.5, training 256x1280x1280 38 vs 24).
    pub const ROWS_MID: CoopTile = tile(64, 64, 4, 2, 64, 1, 8);
    /// For Y = X·Wᵀ linears of 8192 rows and more: 128x128 with four subgroups of 64x64, two
    /// workgroups an SM. H100, session 13, TFLOP/s against the tile before (DEFAULT or
    /// CONV_MID): 8192³ 168–174 vs 154–157, 8192x2560x320 80.0 vs 77.0, 8192x960x320 76.5 vs
    /// 74.8, 8192x320x1280 90.4 vs 88.9 (session 10's sweep agrees); 4096³ 159 vs 142, but at
    /// 2048 rows it loses (2048x5120x640 98 vs 106), and at the training's 4096-row forward
    /// linears too (session 15: 4096x320x320 34 vs NARROW's 45–49, 4096x320x1280 57 vs
    /// CONV_MID's 78; 4096x960x320 68 vs 66).
    pub const LARGE: CoopTile = tile(128, 128, 4, 2, 32, 1, 8);
    /// For convolutions to at most 32 channels (the VAE's conv_out to 3 channels at 512x512,
    /// the encoder's to 8): 128 rows by 32 columns, one column of 4 subgroups of 32x32, so the
    /// padding is at most 29 columns, not the 125 of a 128-wide tile.
    pub const THIN: CoopTile = tile(128, 32, 4, 4, 32, 1, 8);
    /// All configurations the launcher may use or the benchmark times. Valid ones: 2 or 4
    /// fragments a subgroup along each axis, 1 to 4 vec-8 entries of each tile an
    /// invocation, shared memory within 48 KiB.
    pub const ALL: [CoopTile; 21] = [
        tile(128, 128, 8, 2, 32, 1, 8),
        tile(128, 128, 8, 2, 64, 1, 8),
        tile(64, 128, 8, 2, 64, 1, 8),
        padded(tile(128, 128, 8, 2, 32, 1, 8)),
        tile(128, 256, 8, 2, 32, 1, 8),
        padded(tile(128, 256, 8, 2, 32, 1, 8)),
        padded(tile(128, 256, 8, 2, 32, 1, 0)),
        tile(256, 128, 8, 4, 32, 1, 8),
        padded(tile(256, 128, 8, 4, 32, 1, 8)),
        tile(64, 128, 8, 2, 32, 1, 8),
        tile(64, 256, 8, 2, 32, 1, 8),
        tile(64, 128, 4, 2, 32, 1, 8),
        tile(128, 128, 4, 2, 32, 1, 8),
        tile(128, 128, 4, 2, 32, 2, 8),
        tile(128, 256, 8, 2, 16, 2, 8),
        tile(64, 128, 4, 2, 32, 2, 8),
        tile(64, 64, 4, 2, 32, 1, 8),
        tile(64, 64, 4, 2, 64, 1, 8),
        tile(128, 64, 4, 2, 32, 1, 8),
        tile(64, 64, 2, 1, 32, 1, 8),
        tile(128, 32, 4, 4, 32, 1, 8),
    ];

    /// Fragments a subgroup holds along M and N.
    pub fn frags(&self) -> (u32, u32) {
        (self.bm / self.warps_m / 16, self.bn / (self.warps / self.warps_m) / 16)
    }

    /// Lengths of the shared A and B arrays in vec4<f16> units (8 bytes): the tiles of all
    /// stages in the worse of the two layouts; padded, the two share what the epilogue's
    /// f32 stage leaves of 48 KiB. Padding a 128x256 tile measured +50% on the H100 (125 vs
    /// 83 TFLOP/s at 8192³), while smaller tiles lose a workgroup per SM with it.
    pub fn shared_lens(&self) -> (u32, u32) {
        let ke = self.bk / 8;
        let side = |x: u32| 2 * (x * (ke + 1)).max(self.bk * (x / 8 + 1)) * self.stages;
        let (a, b) = (side(self.bm), side(self.bn));
        if !self.pad_shared {
            return (a, b);
        }
        let free = (48 * 1024 - self.warps * 256 * 4) / 8;
        let extra = free.saturating_sub(a + b);
        (a + extra / 2, b + extra - extra / 2)
    }

    /// Shared memory bytes (tiles plus the epilogue stage).
    pub fn shared_bytes(&self) -> u32 {
        let (a, b) = self.shared_lens();
        (a + b) * 8 + self.warps * 256 * 4
    }

    /// Whether the shader supports this configuration.
    pub fn valid(&self) -> bool {
        let (fm, fn_) = self.frags();
        let wg = self.warps * 32;
        let per = |x: u32| x * self.bk / 8 / wg;
        self.warps.is_multiple_of(self.warps_m)
            && [2, 4].contains(&fm)
            && [2, 4].contains(&fn_)
            && [16, 32, 64].contains(&self.bk)
            && [1, 2].contains(&self.stages)
            && [1, 2, 4].contains(&per(self.bm))
            && [1, 2, 4].contains(&per(self.bn))
            && (self.bm * self.bk / 8).is_multiple_of(wg)
            && (self.bn * self.bk / 8).is_multiple_of(wg)
            && self.shared_bytes() <= 48 * 1024
    }

    /// The pipeline key of this tile for the given layout and output type.
    pub fn key(&self, trans_a: bool, trans_b: bool, out_f32: bool, conv: bool) -> PipelineKey {
        PipelineKey::new(Shader::MatmulCoop, "main")
            .with("TRANS_A", trans_a as i64)
            .with("TRANS_B", trans_b as i64)
            .with("OUT_F32", out_f32 as i64)
            .with("CONV", conv as i64)
            .with("BM", self.bm as i64)
            .with("BN", self.bn as i64)
            .with("WARPS", self.warps as i64)
            .with("WARPS_M", self.warps_m as i64)
            .with("BK", self.bk as i64)
            .with("STAGES", self.stages as i64)
            .with("GROUP_M", self.group_m as i64)
            .with("SA_LEN", self.shared_lens().0 as i64)
            .with("SB_LEN", self.shared_lens().1 as i64)
    }
}
