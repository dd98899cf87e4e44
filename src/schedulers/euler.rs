//! Euler and Euler ancestral (diffusers' `EulerDiscreteScheduler` and
//! `EulerAncestralDiscreteScheduler`), plus the k-diffusion sigma schedule that Euler, Heun and
//! LMS share: training sigmas interpolated at the inference timesteps (numpy float64), or Karras
//! sigmas with their fractional timesteps, then float32, ending at sigma = 0.

use super::schedule::{
    alphas_cumprod, check_steps, karras_sigmas, log_f32, np_interp, sigma_to_t, spaced, spaced_raw,
    train_sigmas,
};
use super::{Cursor, Sampler, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// Timesteps and sigmas (one more than the timesteps, the last 0) of the Euler family.
pub(crate) struct SigmaSchedule {
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
    pub init_noise_sigma: f32,
}

impl SigmaSchedule {
    /// As Euler/Heun/LMS `set_timesteps` compute it (default spacing "linspace").
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let (t_train, offset) = (cfg.num_train_timesteps, cfg.steps_offset);
        let train = train_sigmas(&alphas_cumprod(cfg));
        // numpy: float32 timesteps, sigmas interpolated in float64.
        let interp = |t: f64| np_interp(t as f32 as f64, &train);
        let (timesteps, sig) = if karras {
            // Only the sigma range comes from the spaced timesteps (diffusers takes it from the
            // unchecked list, so no schedule is refused here but 0 or too many steps).
            check_steps(n, t_train)?;
            let raw = spaced_raw(spacing, n, t_train, offset);
            let sig = karras_sigmas(interp(raw[raw.len() - 1]), interp(raw[0]), n);
            let log_sigmas = log_f32(&train);
            let ts: Vec<f32> = sig.iter().map(|&s| sigma_to_t(s, &log_sigmas) as f32).collect();
            if ts[1..].contains(&ts[0]) {
                return Err(Error::Usage(format!("{n} steps: the first Karras timestep repeats")));
            }
            (ts, sig)
        } else {
            let t32: Vec<f32> =
                spaced(spacing, n, t_train, offset)?.into_iter().map(|t| t as f32).collect();
            let sig = t32.iter().map(|&t| interp(t as f64)).collect();
            (t32, sig)
        };
        let mut sigmas: Vec<f32> = sig.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        let max = sigmas.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(SigmaSchedule { timesteps, sigmas, init_noise_sigma })
    }

    /// 1 / sqrt(sigma^2 + 1) of sigma `i`.
    pub(crate) fn input_scale(&self, i: usize) -> f32 {
        let s = self.sigmas[i];
        1.0 / (s * s + 1.0).sqrt()
    }

    /// original + noise * sigma_i.
    pub(crate) fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        let s = self.sigmas[i];
        original.iter().zip(noise).map(|(&x, &z)| x + z * s).collect()
    }
}

/// The predicted x0 of the Euler family at `sigma` (epsilon or v).
#[inline]
pub(crate) fn pred_x0(p: PredictionType, sigma: f32, s: f32, m: f32) -> f32 {
    match p {
        PredictionType::Epsilon => s - sigma * m,
        PredictionType::VPrediction => {
            let v = sigma * sigma + 1.0;
            m * (-sigma / v.sqrt()) + s / v
        }
    }
}

pub(crate) struct Euler {
    s: SigmaSchedule,
    n: usize,
    prediction: PredictionType,
    ancestral: bool,
    cursor: Cursor,
}

impl Euler {
    pub(crate) fn new(
        cfg: &SchedulerConfig,
        n: usize,
        karras: bool,
        ancestral: bool,
    ) -> Result<Self> {
        Ok(Euler {
            s: SigmaSchedule::new(cfg, n, karras)?,
            n,
            prediction: cfg.prediction_type,
            ancestral,
            cursor: Cursor::default(),
        })
    }
}

impl Scheduler for Euler {
    fn sampler(&self) -> Sampler {
        if self.ancestral { Sampler::EulerA } else { Sampler::Euler }
    }
    fn timesteps(&self) -> &[f32] {
        &self.s.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.s.sigmas)
    }
    fn init_noise_sigma(&self) -> f32 {
        self.s.init_noise_sigma
    }
    fn input_scale(&self, i: usize) -> f32 {
        self.s.input_scale(i)
    }
    fn needs_noise(&self) -> bool {
        self.ancestral
    }
    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let calls = self.s.timesteps.len();
        self.cursor.advance(i, calls, (out.len(), x.len()), noise, self.ancestral)?;
        let sigma = self.s.sigmas[i];
        let sigma_next = self.s.sigmas[i + 1];
        let p = self.prediction;
        match noise.filter(|_| self.ancestral) {
            None => {
                // s_churn = 0: sigma_hat = sigma.
                let dt = sigma_next - sigma;
                for k in 0..x.len() {
                    let s = x[k];
                    let x0 = pred_x0(p, sigma, s, out[k]);
                    let d = (s - x0) / sigma;
                    x[k] = s + d * dt;
                }
            }
            Some(z) => {
                let (from, to) = (sigma, sigma_next);
                let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
                let down = (to * to - up * up).sqrt();
                let dt = down - sigma;
                for k in 0..x.len() {
                    let s = x[k];
                    let x0 = pred_x0(p, sigma, s, out[k]);
                    let d = (s - x0) / sigma;
                    x[k] = (s + d * dt) + z[k] * up;
                }
            }
        }
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        self.s.add_noise(original, noise, i)
    }
}
