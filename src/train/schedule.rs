//! Learning-rate schedules of `atelier train`, as diffusers' `get_scheduler` computes them: a
//! linear warm-up from 0 over `warmup` steps, then constant, linear decay to 0, or a half
//! cosine to 0 at the last step. Also the per-step seeds every random choice of a step is drawn
//! from, so a resumed run draws exactly what an uninterrupted one would.

use std::str::FromStr;

use crate::error::{Error, Result};

/// A learning-rate schedule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LrSchedule {
    Constant,
    ConstantWithWarmup,
    Linear,
    Cosine,
}

impl FromStr for LrSchedule {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "constant" => LrSchedule::Constant,
            "constant_with_warmup" => LrSchedule::ConstantWithWarmup,
            "linear" => LrSchedule::Linear,
            "cosine" => LrSchedule::Cosine,
            _ => return Err(Error::Usage(format!("--lr-scheduler {s}: use constant, constant_with_warmup, linear or cosine"))),
        })
    }
}

impl LrSchedule {
    pub fn name(self) -> &'static str {
        match self {
            LrSchedule::Constant => "constant",
            LrSchedule::ConstantWithWarmup => "constant_with_warmup",
            LrSchedule::Linear => "linear",
            LrSchedule::Cosine => "cosine",
        }
    }

    /// The learning rate of optimizer step `step` (0-based) of `total`, peak `lr`. `Constant`
    /// ignores the warm-up, as diffusers' does.
    pub fn lr_at(self, lr: f64, step: usize, total: usize, warmup: usize) -> f64 {
        let (s, w, n) = (step as f64, warmup as f64, total.max(1) as f64);
        if self != LrSchedule::Constant && step < warmup {
            return lr * s / w.max(1.0);
        }
        match self {
            LrSchedule::Constant | LrSchedule::ConstantWithWarmup => lr,
            LrSchedule::Linear => lr * ((n - s) / (n - w).max(1.0)).max(0.0),
            LrSchedule::Cosine => {
                let progress = (s - w) / (n - w).max(1.0);
                lr * (0.5 * (1.0 + (std::f64::consts::PI * progress).cos())).max(0.0)
            }
        }
    }
}

/// A 64-bit seed for (run seed, stream, index): SplitMix64 finalisation of the three mixed,
/// so that step k's noise, timesteps, dropout and prompt choices depend on (seed, k) alone.
pub fn stream_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ index.wrapping_mul(0xd1b5_4a32_d192_ed03);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_match_diffusers() {
        // diffusers' get_scheduler(name, num_warmup_steps=10, num_training_steps=100), lr 1.
        let at = |s: LrSchedule, k| s.lr_at(1.0, k, 100, 10);
        assert_eq!(at(LrSchedule::Constant, 0), 1.0);
        assert_eq!(at(LrSchedule::ConstantWithWarmup, 0), 0.0);
        assert!((at(LrSchedule::ConstantWithWarmup, 5) - 0.5).abs() < 1e-12);
        assert_eq!(at(LrSchedule::ConstantWithWarmup, 50), 1.0);
        assert!((at(LrSchedule::Linear, 55) - 0.5).abs() < 1e-12);
        assert_eq!(at(LrSchedule::Linear, 100), 0.0);
        assert!((at(LrSchedule::Cosine, 10) - 1.0).abs() < 1e-12);
        assert!((at(LrSchedule::Cosine, 55) - 0.5).abs() < 1e-12);
        assert!(at(LrSchedule::Cosine, 100).abs() < 1e-12);
    }

    #[test]
    fn stream_seeds_differ() {
        assert_ne!(stream_seed(1, 0, 0), stream_seed(1, 0, 1));
        assert_ne!(stream_seed(1, 0, 0), stream_seed(1, 1, 0));
        assert_ne!(stream_seed(1, 0, 0), stream_seed(2, 0, 0));
        assert_eq!(stream_seed(7, 3, 9), stream_seed(7, 3, 9));
    }
}
