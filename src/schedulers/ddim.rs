//! DDIM (diffusers' `DDIMScheduler`): deterministic at eta = 0, with `eta * sigma_t` of fresh
//! noise per step otherwise. Scalars and latent arithmetic in f32, in diffusers' order.

use super::schedule::{alphas_cumprod, spaced};
use super::{Cursor, Sampler, Scheduler};
use crate::Result;
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};

pub(crate) struct Ddim {
    ac: Vec<f32>,
    /// alphas_cumprod "after" the last step (1, or alphas_cumprod[0]).
    final_ac: f32,
    /// Integer training timesteps of the model calls.
    ts: Vec<i64>,
    timesteps: Vec<f32>,
    /// `T // n`: diffusers steps from t to t - T // n whatever the spacing.
    stride: i64,
    n: usize,
    prediction: PredictionType,
    clip: bool,
    eta: f32,
    cursor: Cursor,
}

impl Ddim {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, eta: f32) -> Result<Self> {
        let ac = alphas_cumprod(cfg);
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let ts: Vec<i64> = spaced(spacing, n, cfg.num_train_timesteps, cfg.steps_offset)?
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect();
        let final_ac = if cfg.set_alpha_to_one.unwrap_or(true) { 1.0 } else { ac[0] };
        Ok(Ddim {
            final_ac,
            timesteps: ts.iter().map(|&t| t as f32).collect(),
            ts,
            stride: (cfg.num_train_timesteps / n) as i64,
            n,
            prediction: cfg.prediction_type,
            clip: cfg.clip_sample.unwrap_or(true),
            eta,
            ac,
            cursor: Cursor::default(),
        })
    }

    fn ac_at(&self, t: i64) -> f32 {
        if t >= 0 { self.ac[t as usize] } else { self.final_ac }
    }
}

impl Scheduler for Ddim {
    fn sampler(&self) -> Sampler {
        Sampler::Ddim
    }
    fn timesteps(&self) -> &[f32] {
        &self.timesteps
    }
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    fn input_scale(&self, _i: usize) -> f32 {
        1.0
    }
    fn needs_noise(&self) -> bool {
        self.eta > 0.0
    }
    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let needs = self.needs_noise();
        self.cursor.advance(i, self.ts.len(), (out.len(), x.len()), noise, needs)?;
        let t = self.ts[i];
        let prev_t = t - self.stride;
        let a_t = self.ac_at(t);
        let a_prev = self.ac_at(prev_t);
        let b_t = 1.0 - a_t;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        // _get_variance and the noise scale.
        let b_prev = 1.0 - a_prev;
        let variance = (b_prev / b_t) * (1.0 - a_t / a_prev);
        let std_dev = self.eta * variance.sqrt();
        let dir_coef = (1.0 - a_prev - std_dev * std_dev).sqrt();
        let sa_prev = a_prev.sqrt();
        let lim = if self.clip { 1.0 } else { f32::INFINITY };
        for k in 0..x.len() {
            let (s, m) = (x[k], out[k]);
            let (x0, eps) = match self.prediction {
                PredictionType::Epsilon => ((s - sb * m) / sa, m),
                PredictionType::VPrediction => (sa * s - sb * m, sa * m + sb * s),
            };
            let x0 = x0.clamp(-lim, lim);
            let mut prev = sa_prev * x0 + dir_coef * eps;
            if let Some(z) = noise.filter(|_| needs) {
                prev += std_dev * z[k];
            }
            x[k] = prev;
        }
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        add_noise_alphas(self.ac[self.ts[i] as usize], original, noise)
    }
}

/// DDPM-style `add_noise`: sqrt(a) * x0 + sqrt(1 - a) * noise (f32, as diffusers).
pub(crate) fn add_noise_alphas(a: f32, original: &[f32], noise: &[f32]) -> Vec<f32> {
    let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
    original.iter().zip(noise).map(|(&x, &z)| sa * x + sb * z).collect()
}
