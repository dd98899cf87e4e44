//! PNDM with `skip_prk_steps` (PLMS; diffusers' `PNDMScheduler`), SD-1.5's own scheduler:
//! linear multistep on epsilon, up to 4th order, with diffusers' warm-up (the second timestep is
//! called twice: `n` steps make `n + 1` model calls). The Runge-Kutta (PRK) warm-up is not
//! implemented: configs without `skip_prk_steps: true` are refused.

use super::ddim::add_noise_alphas;
use super::schedule::{alphas_cumprod, spaced};
use super::{Cursor, Sampler, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

pub(crate) struct Pndm {
    ac: Vec<f32>,
    final_ac: f32,
    ts: Vec<i64>,
    timesteps: Vec<f32>,
    stride: i64,
    n: usize,
    prediction: PredictionType,
    /// Model calls stepped so far (diffusers' `counter`).
    counter: usize,
    /// Past epsilons, oldest first, at most 4.
    ets: Vec<Vec<f32>>,
    /// The sample of the first call, which the second call steps again.
    cur_sample: Option<Vec<f32>>,
    cursor: Cursor,
}

impl Pndm {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize) -> Result<Self> {
        if cfg.skip_prk_steps != Some(true) {
            return Err(Error::Usage(
                "pndm: the scheduler config does not set skip_prk_steps to true, and the \
                 Runge-Kutta warm-up steps are not implemented; set \"skip_prk_steps\": true in \
                 scheduler_config.json (as SD-1.5's does) or pick another sampler"
                    .into(),
            ));
        }
        let ac = alphas_cumprod(cfg);
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Leading);
        let d: Vec<i64> = spaced(spacing, n, cfg.num_train_timesteps, cfg.steps_offset)?
            .into_iter()
            .map(|t| t.round_ties_even() as i64)
            .collect();
        // diffusers' plms_timesteps: the second-largest timestep twice.
        let mut ts = vec![d[0]];
        if n >= 2 {
            ts.push(d[1]);
            ts.extend_from_slice(&d[1..]);
        }
        let final_ac = if cfg.set_alpha_to_one.unwrap_or(false) { 1.0 } else { ac[0] };
        Ok(Pndm {
            final_ac,
            timesteps: ts.iter().map(|&t| t as f32).collect(),
            ts,
            stride: (cfg.num_train_timesteps / n) as i64,
            n,
            prediction: cfg.prediction_type,
            counter: 0,
            ets: Vec::new(),
            cur_sample: None,
            ac,
            cursor: Cursor::default(),
        })
    }

    fn ac_at(&self, t: i64) -> f32 {
        if t >= 0 { self.ac[t as usize] } else { self.final_ac }
    }

    /// diffusers' `_get_prev_sample`: from `sample` at `t` to `prev_t` with epsilon `eps`.
    fn prev_sample(&self, x: &mut [f32], from: &[f32], t: i64, prev_t: i64, eps: &[f32]) {
        let a_t = self.ac_at(t);
        let a_prev = self.ac_at(prev_t);
        let b_t = 1.0 - a_t;
        let b_prev = 1.0 - a_prev;
        let (sa, sb) = (a_t.sqrt(), b_t.sqrt());
        let sample_coef = (a_prev / a_t).sqrt();
        let denom = a_t * b_prev.sqrt() + (a_t * b_t * a_prev).sqrt();
        let diff = a_prev - a_t;
        for k in 0..x.len() {
            let s = from[k];
            let e = match self.prediction {
                PredictionType::Epsilon => eps[k],
                PredictionType::VPrediction => sa * eps[k] + sb * s,
            };
            x[k] = sample_coef * s - diff * e / denom;
        }
    }
}

impl Scheduler for Pndm {
    fn sampler(&self) -> Sampler {
        Sampler::Pndm
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
        false
    }
    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        self.cursor.advance(i, self.ts.len(), (out.len(), x.len()), noise, false)?;
        let mut t = self.ts[i];
        let mut prev_t = t - self.stride;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.remove(0);
            }
            self.ets.push(out.to_vec());
        } else {
            prev_t = t;
            t += self.stride;
        }
        let e = &self.ets;
        let len = e.len();
        let f = |g: &dyn Fn(usize) -> f32| (0..out.len()).map(g).collect::<Vec<f32>>();
        let eps: Vec<f32> = if len == 1 && self.counter == 0 {
            self.cur_sample = Some(x.to_vec());
            out.to_vec()
        } else if len == 1 && self.counter == 1 {
            f(&|k| (out[k] + e[0][k]) / 2.0)
        } else if len == 2 {
            f(&|k| (3.0 * e[1][k] - e[0][k]) / 2.0)
        } else if len == 3 {
            f(&|k| (23.0 * e[2][k] - 16.0 * e[1][k] + 5.0 * e[0][k]) / 12.0)
        } else {
            let c = (1.0f64 / 24.0) as f32;
            f(&|k| c * (55.0 * e[3][k] - 59.0 * e[2][k] + 37.0 * e[1][k] - 9.0 * e[0][k]))
        };
        let from = if len == 1 && self.counter == 1 {
            self.cur_sample.take().unwrap_or_else(|| x.to_vec())
        } else {
            x.to_vec()
        };
        self.prev_sample(x, &from, t, prev_t, &eps);
        self.counter += 1;
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        add_noise_alphas(self.ac[self.ts[i] as usize], original, noise)
    }
}
