//! Heun (diffusers' `HeunDiscreteScheduler`): an Euler step, then a second model call at the
//! new sigma that averages the two slopes. Two model calls per step except the last (to sigma 0,
//! plain Euler): `n` steps make `2n - 1` calls, and timesteps / sigmas are interleaved as in
//! diffusers (`[t0, t1, t1, t2, t2, ...]`).

use super::euler::{SigmaSchedule, pred_x0};
use super::{Cursor, Sampler, Scheduler};
use crate::Result;
use crate::config::{PredictionType, SchedulerConfig};

pub(crate) struct Heun {
    /// Interleaved: timesteps `2n - 1`, sigmas `2n`.
    s: SigmaSchedule,
    n: usize,
    prediction: PredictionType,
    clip: bool,
    /// The first-order half's derivative, dt and sample, while a second call is due.
    pending: Option<(Vec<f32>, f32, Vec<f32>)>,
    cursor: Cursor,
}

impl Heun {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        let base = SigmaSchedule::new(cfg, n, karras)?;
        let twice = |v: &[f32]| -> Vec<f32> {
            let mut out = vec![v[0]];
            for &x in &v[1..] {
                out.extend([x, x]);
            }
            out
        };
        // sigmas: [s0, s1, s1, ..., s_{n-1}, s_{n-1}, 0]
        let mut sigmas = twice(&base.sigmas[..n]);
        sigmas.push(0.0);
        let s = SigmaSchedule {
            timesteps: twice(&base.timesteps),
            sigmas,
            init_noise_sigma: base.init_noise_sigma,
        };
        Ok(Heun {
            s,
            n,
            prediction: cfg.prediction_type,
            clip: cfg.clip_sample.unwrap_or(false),
            pending: None,
            cursor: Cursor::default(),
        })
    }
}

impl Scheduler for Heun {
    fn sampler(&self) -> Sampler {
        Sampler::Heun
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
    fn order(&self) -> usize {
        2
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let calls = self.s.timesteps.len();
        self.cursor.advance(i, calls, (out.len(), x.len()), noise, false)?;
        let p = self.prediction;
        let lim = if self.clip { 1.0 } else { f32::INFINITY };
        match self.pending.take() {
            None => {
                let sigma = self.s.sigmas[i];
                let sigma_next = self.s.sigmas[i + 1];
                let dt = sigma_next - sigma;
                let mut d = vec![0.0f32; x.len()];
                let first = x.to_vec();
                for k in 0..x.len() {
                    let s = x[k];
                    let x0 = pred_x0(p, sigma, s, out[k]).clamp(-lim, lim);
                    d[k] = (s - x0) / sigma;
                    x[k] = s + d[k] * dt;
                }
                self.pending = Some((d, dt, first));
            }
            Some((d_prev, dt, first)) => {
                // The second half: the model was called at sigma_next = sigmas[i].
                let sigma_next = self.s.sigmas[i];
                for k in 0..x.len() {
                    let x0 = pred_x0(p, sigma_next, x[k], out[k]).clamp(-lim, lim);
                    let d = (x[k] - x0) / sigma_next;
                    let d = (d_prev[k] + d) / 2.0;
                    x[k] = first[k] + d * dt;
                }
            }
        }
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        self.s.add_noise(original, noise, i)
    }
}
