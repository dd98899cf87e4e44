//! LMS (diffusers' `LMSDiscreteScheduler`): linear multistep in sigma, order up to 4, with
//! coefficients integrating the Lagrange basis over [sigma_i, sigma_{i+1}]. diffusers integrates
//! with `scipy.integrate.quad` (its integrand evaluated in f32); the basis polynomials have degree
//! at most 3, so 3-point Gauss-Legendre in f64 gives the same integral exactly.

use super::euler::{SigmaSchedule, pred_x0};
use super::{Cursor, Sampler, Scheduler};
use crate::Result;
use crate::config::{PredictionType, SchedulerConfig};

const ORDER: usize = 4;

pub(crate) struct Lms {
    s: SigmaSchedule,
    n: usize,
    prediction: PredictionType,
    /// Past derivatives, oldest first, at most 4.
    derivatives: Vec<Vec<f32>>,
    cursor: Cursor,
}

impl Lms {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        Ok(Lms {
            s: SigmaSchedule::new(cfg, n, karras)?,
            n,
            prediction: cfg.prediction_type,
            derivatives: Vec::new(),
            cursor: Cursor::default(),
        })
    }

    /// diffusers' `get_lms_coefficient(order, t, current)`: the integral over
    /// [sigma_t, sigma_{t+1}] of the Lagrange basis polynomial of node `t - current` on the nodes
    /// sigma_t, ..., sigma_{t-order+1}.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let sig = |j: usize| self.s.sigmas[j] as f64;
        let basis = |tau: f64| -> f64 {
            let mut prod = 1.0;
            for k in 0..order {
                if k != current {
                    prod *= (tau - sig(t - k)) / (sig(t - current) - sig(t - k));
                }
            }
            prod
        };
        let (a, b) = (sig(t), sig(t + 1));
        let (mid, half) = ((a + b) / 2.0, (b - a) / 2.0);
        let r = (0.6f64).sqrt();
        half * (5.0 / 9.0 * basis(mid - half * r)
            + 8.0 / 9.0 * basis(mid)
            + 5.0 / 9.0 * basis(mid + half * r))
    }
}

impl Scheduler for Lms {
    fn sampler(&self) -> Sampler {
        Sampler::Lms
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
        false
    }
    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let calls = self.s.timesteps.len();
        self.cursor.advance(i, calls, (out.len(), x.len()), noise, false)?;
        let sigma = self.s.sigmas[i];
        let p = self.prediction;
        let d: Vec<f32> =
            (0..x.len()).map(|k| (x[k] - pred_x0(p, sigma, x[k], out[k])) / sigma).collect();
        self.derivatives.push(d);
        if self.derivatives.len() > ORDER {
            self.derivatives.remove(0);
        }
        // diffusers takes the order from the step index, not from the derivatives it holds: after
        // an img2img start it computes higher-order coefficients and uses the first ones only.
        let order = (i + 1).min(ORDER);
        let coefs: Vec<f32> = (0..order).map(|c| self.coefficient(order, i, c) as f32).collect();
        for k in 0..x.len() {
            let mut acc = 0.0f32;
            for (c, d) in coefs.iter().zip(self.derivatives.iter().rev()) {
                acc += c * d[k];
            }
            x[k] += acc;
        }
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        self.s.add_noise(original, noise, i)
    }
}
