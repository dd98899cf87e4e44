//! The cooperative-matrix tiles of the attention backward: [`BwdTile`] for
//! `shaders/attention_backward_coop.wgsl` (workgroup-shared accumulators) and
//! `shaders/attention_backward_warp.wgsl` (each subgroup owning 16 output rows, accumulators
//! in registers), their workgroup memory, which ones the shaders take, the launcher's choice
//! ([`BwdTile::auto`]) and every pipeline variant ([`coop_variants`]).

use crate::gpu::{PipelineKey, Shader};
use crate::kernels::attention::{COOP_MAX_DP, COOP_SHARED_LIMIT};

/// Which of the two cooperative-matrix entries of attention_backward_coop.wgsl a tile is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CoopEntry {
    /// `attnb_dq_coop`: Q, dO [bq, DP] resident, K, V [bk, DP] streamed, dQ [bq, DP] f32.
    Dq,
    /// `attnb_dkv_coop`: K, V [bk, DP] resident, Q, dO [bq, DP] streamed, dK, dV [bk, DP] f32.
    Dkv,
}

impl CoopEntry {
    pub fn name(self) -> &'static str {
        match self {
            CoopEntry::Dq => "attnb_dq_coop",
            CoopEntry::Dkv => "attnb_dkv_coop",
        }
    }
}

/// Tile of the cooperative-matrix backward kernels: `bq` query rows and `bk` keys per block,
/// `warps` subgroups of 32 invocations. With `warp` the tile is one of
/// attention_backward_warp.wgsl, where each subgroup owns 16 output rows: dq then takes
/// bq = 16·warps queries per workgroup and streams bk keys per block, dkv takes bk =
/// 16·warps keys and streams bq queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BwdTile {
    pub bq: u32,
    pub bk: u32,
    pub warps: u32,
    pub warp: bool,
}

const fn bwd_tile(bq: u32, bk: u32, warps: u32) -> BwdTile {
    BwdTile { bq, bk, warps, warp: false }
}

const fn warp_tile(bq: u32, bk: u32, warps: u32) -> BwdTile {
    BwdTile { bq, bk, warps, warp: true }
}

/// The largest padded head dim of the warp-owned kernels (5 fragments in registers).
pub const WARP_MAX_DP: u32 = 80;

impl BwdTile {
    /// The tiles of attention_backward_coop.wgsl the launcher tries for `attnb_dq_coop`,
    /// taking the first that fits: (64, 32) up to DP 48 (d 40), (32, 32) up to DP 96, (16, 32)
    /// up to DP 160 (48 KiB).
    pub const AUTO_DQ: [BwdTile; 3] = [bwd_tile(64, 32, 8), bwd_tile(32, 32, 4), bwd_tile(16, 32, 4)];
    /// The same for `attnb_dkv_coop`: (64, 32) up to DP 48, (32, 32) DP 64, (32, 16) DP 128,
    /// (16, 16) DP 160.
    pub const AUTO_DKV: [BwdTile; 4] =
        [bwd_tile(64, 32, 8), bwd_tile(32, 32, 4), bwd_tile(32, 16, 4), bwd_tile(16, 16, 4)];
    /// The warp-owned tiles the launcher tries first (where the device has subgroup barriers),
    /// fastest on the H100 (`atelier bench --filter attention_bwd --all-tiles`): at DP 48 dq
    /// 64 queries x 32-key blocks (4 subgroups), dkv 128 keys x 32-query blocks (8); above,
    /// 64 x 64 (4) for both.
    pub fn auto_warp(entry: CoopEntry, dp: u32) -> [BwdTile; 2] {
        match (entry, dp <= 48) {
            (CoopEntry::Dq, true) => [warp_tile(64, 32, 4), warp_tile(128, 32, 8)],
            (CoopEntry::Dq, false) => [warp_tile(64, 64, 4), warp_tile(128, 32, 8)],
            (CoopEntry::Dkv, true) => [warp_tile(32, 128, 8), warp_tile(32, 64, 4)],
            (CoopEntry::Dkv, false) => [warp_tile(64, 64, 4), warp_tile(32, 128, 8)],
        }
    }
    /// Every tile the shaders support (each where it fits), for tests and benchmarks.
    /// Warp-owned: dq (128, 32, 8), (64, 32, 4), dkv (32, 128, 8), (32, 64, 4), both
    /// (64, 64, 4); a streamed block of 64 with 8 subgroups passes 48 KiB.
    pub const ALL: [BwdTile; 11] = [
        bwd_tile(64, 32, 8),
        bwd_tile(32, 64, 8),
        bwd_tile(32, 32, 4),
        bwd_tile(32, 16, 4),
        bwd_tile(16, 32, 4),
        bwd_tile(16, 16, 4),
        warp_tile(128, 32, 8),
        warp_tile(64, 32, 4),
        warp_tile(64, 64, 4),
        warp_tile(32, 128, 8),
        warp_tile(32, 64, 4),
    ];

    /// The block a warp-owned tile streams: keys for dq, queries for dkv.
    fn streamed(&self, entry: CoopEntry) -> u32 {
        match entry {
            CoopEntry::Dq => self.bk,
            CoopEntry::Dkv => self.bq,
        }
    }

    /// Workgroup memory in bytes of `entry` at padded head dim `dp`; mirrors the arrays of
    /// attention_backward_coop.wgsl: f16 tiles with rows of dp + 8 halves (Q, dO [bq]; K, V
    /// [bk]), ss bq·(bk + 4) f32, sp bq·(bk + 8) f16, the accumulators with rows of dp + 4
    /// f32 (dq: one [bq]; dkv: two [bk]). Warp-owned (attention_backward_warp.wgsl), with B
    /// the streamed block: two f16 tiles [B, dp + 8] and per subgroup [16, B + 4] f32 and
    /// [16, B + 8] f16.
    pub fn shared_bytes(&self, entry: CoopEntry, dp: u32) -> u32 {
        if self.warp {
            let b = self.streamed(entry);
            return 4 * b * (dp + 8) + self.warps * 16 * (4 * (b + 4) + 2 * (b + 8));
        }
        let tiles = 2 * (self.bq + self.bk) * (dp + 8) * 2;
        let ss = self.bq * (self.bk + 4) * 4;
        let sp = self.bq * (self.bk + 8) * 2;
        let acc = match entry {
            CoopEntry::Dq => self.bq * (dp + 4) * 4,
            CoopEntry::Dkv => 2 * self.bk * (dp + 4) * 4,
        };
        tiles + ss + sp + acc
    }

    /// Whether the shaders support this tile for `entry` at padded head dim `dp` within
    /// `limit` bytes of workgroup memory (never more than [`COOP_SHARED_LIMIT`], what the
    /// tests validate). attention_backward_coop.wgsl: bq, bk in {16, 32, 64}, 4 or 8
    /// subgroups, at most 8 score elements per invocation (registers holding P), whole ones.
    /// attention_backward_warp.wgsl: 16 rows per subgroup of the owned side, 4 or 8
    /// subgroups, a streamed block of 32 or 64, dp <= [`WARP_MAX_DP`].
    pub fn valid(&self, entry: CoopEntry, dp: u32, limit: u32) -> bool {
        let fits = dp.is_multiple_of(16) && dp >= 16 && dp as usize <= COOP_MAX_DP && self.shared_bytes(entry, dp) <= limit.min(COOP_SHARED_LIMIT);
        if self.warp {
            let owned = match entry {
                CoopEntry::Dq => self.bq,
                CoopEntry::Dkv => self.bk,
            };
            return fits
                && [4, 8].contains(&self.warps)
                && owned == 16 * self.warps
                && [32, 64].contains(&self.streamed(entry))
                && dp <= WARP_MAX_DP;
        }
        let wg = self.warps * 32;
        fits && [16, 32, 64].contains(&self.bq)
            && [16, 32, 64].contains(&self.bk)
            && [4, 8].contains(&self.warps)
            && (self.bq * self.bk).is_multiple_of(wg)
            && self.bq * self.bk / wg <= 8
    }

    /// The pipeline key of this tile for `entry` at padded head dim `dp`, dO f32 or f16,
    /// outputs f32 or f16.
    pub fn key(&self, entry: CoopEntry, dp: u32, dout_f32: bool, out_f32: bool) -> PipelineKey {
        let k = if self.warp {
            let name = match entry {
                CoopEntry::Dq => "attnb_dq_warp",
                CoopEntry::Dkv => "attnb_dkv_warp",
            };
            PipelineKey::new(Shader::AttentionBackwardWarp, name).with("BLK", self.streamed(entry) as i64)
        } else {
            PipelineKey::new(Shader::AttentionBackwardCoop, entry.name()).with("BQ", self.bq as i64).with("BK", self.bk as i64)
        };
        k.with("WARPS", self.warps as i64)
            .with("DP", dp as i64)
            .with("DO_F32", dout_f32 as i64)
            .with("OUT_F32", out_f32 as i64)
    }

    /// Whether a device can run this tile for `entry` at padded head dim `dp`: valid within
    /// `limit`, and for a warp-owned tile the device has subgroup barriers.
    pub fn usable(&self, entry: CoopEntry, dp: u32, limit: u32, subgroup_barrier: bool) -> bool {
        (subgroup_barrier || !self.warp) && self.valid(entry, dp, limit)
    }

    /// The launcher's tile for `entry` at padded head dim `dp` (None: none is usable): the
    /// warp-owned ones first, then attention_backward_coop.wgsl's.
    pub fn auto(entry: CoopEntry, dp: u32, limit: u32, subgroup_barrier: bool) -> Option<BwdTile> {
        let v1: &[BwdTile] = match entry {
            CoopEntry::Dq => &Self::AUTO_DQ,
            CoopEntry::Dkv => &Self::AUTO_DKV,
        };
        Self::auto_warp(entry, dp).iter().chain(v1).copied().find(|t| t.usable(entry, dp, limit, subgroup_barrier))
    }
}

/// Every cooperative-matrix pipeline the launcher (or a test forcing a tile) can ask for:
/// each tile valid at each padded head dim, both entries, f16/f32 dO and outputs.
pub fn coop_variants() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for dp in (16..=COOP_MAX_DP as u32).step_by(16) {
        for entry in [CoopEntry::Dq, CoopEntry::Dkv] {
            for t in BwdTile::ALL {
                if t.valid(entry, dp, COOP_SHARED_LIMIT) {
                    for dout in [false, true] {
                        for out in [false, true] {
                            keys.push(t.key(entry, dp, dout, out));
                        }
                    }
                }
            }
        }
    }
    keys
}
