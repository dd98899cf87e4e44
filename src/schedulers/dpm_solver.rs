//! DPM-Solver++ 2M and its SDE variant (diffusers' `DPMSolverMultistepScheduler` with
//! `algorithm_type` "dpmsolver++" / "sde-dpmsolver++", `solver_order` 2, `solver_type`
//! "midpoint", `final_sigmas_type` "zero", `lower_order_final`): multistep on the predicted x0
//! in lambda = log(alpha / sigma). First order on the first step of a run and on the last step
//! (to sigma 0); scalars in f32 as diffusers computes them from its float32 sigmas.

use super::schedule::{
    alpha_sigma, alphas_cumprod, check_steps, karras_sigmas, lambda, log_f32, np_interp,
    sigma_to_t, spaced_multistep, train_sigmas,
};
use super::{Cursor, Sampler, Scheduler};
use crate::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// Timesteps and sigmas (last 0) of the multistep solvers, DPM-Solver++ and UniPC alike.
pub(crate) struct MultistepSchedule {
    pub ts: Vec<i64>,
    pub timesteps: Vec<f32>,
    pub sigmas: Vec<f32>,
}

impl MultistepSchedule {
    /// As diffusers' `set_timesteps` of both (default spacing "linspace"; Karras: sigmas from the
    /// whole training range, timesteps rounded).
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        let spacing = cfg.timestep_spacing.unwrap_or(TimestepSpacing::Linspace);
        let (t_train, offset) = (cfg.num_train_timesteps, cfg.steps_offset);
        let train = train_sigmas(&alphas_cumprod(cfg));
        let (ts, sig): (Vec<i64>, Vec<f64>) = if karras {
            // The spacing plays no part: Karras sigmas over the whole training range.
            check_steps(n, t_train)?;
            let log_sigmas = log_f32(&train);
            let sig = karras_sigmas(train[0] as f64, train[train.len() - 1] as f64, n);
            let ts: Vec<i64> =
                sig.iter().map(|&x| sigma_to_t(x, &log_sigmas).round_ties_even() as i64).collect();
            if ts[1..].contains(&ts[0]) {
                return Err(Error::Usage(format!("{n} steps: the first Karras timestep repeats")));
            }
            (ts, sig)
        } else {
            let ts = spaced_multistep(spacing, n, t_train, offset)?;
            let sig = ts.iter().map(|&t| np_interp(t as f64, &train)).collect();
            (ts, sig)
        };
        let mut sigmas: Vec<f32> = sig.iter().map(|&s| s as f32).collect();
        sigmas.push(0.0);
        Ok(MultistepSchedule { timesteps: ts.iter().map(|&t| t as f32).collect(), ts, sigmas })
    }

    /// alpha_t * original + sigma_t * noise at sigma `i`.
    pub(crate) fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        original.iter().zip(noise).map(|(&x, &z)| a * x + s * z).collect()
    }

    /// The data prediction x0 (diffusers' `convert_model_output` for the x0-predicting solvers).
    pub(crate) fn x0(&self, p: PredictionType, i: usize, out: &[f32], x: &[f32]) -> Vec<f32> {
        let (a, s) = alpha_sigma(self.sigmas[i]);
        match p {
            PredictionType::Epsilon => (0..x.len()).map(|k| (x[k] - s * out[k]) / a).collect(),
            PredictionType::VPrediction => (0..x.len()).map(|k| a * x[k] - s * out[k]).collect(),
        }
    }
}

pub(crate) struct DpmSolver {
    m: MultistepSchedule,
    n: usize,
    prediction: PredictionType,
    sde: bool,
    /// x0 predictions of the previous and current steps.
    prev_x0: Option<Vec<f32>>,
    /// Steps taken in this run, capped at 2 (diffusers' `lower_order_nums`).
    lower_order_nums: usize,
    cursor: Cursor,
}

impl DpmSolver {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, karras: bool, sde: bool) -> Result<Self> {
        Ok(DpmSolver {
            m: MultistepSchedule::new(cfg, n, karras)?,
            n,
            prediction: cfg.prediction_type,
            sde,
            prev_x0: None,
            lower_order_nums: 0,
            cursor: Cursor::default(),
        })
    }
}

impl Scheduler for DpmSolver {
    fn sampler(&self) -> Sampler {
        if self.sde { Sampler::DpmPp2mSde } else { Sampler::DpmPp2m }
    }
    fn timesteps(&self) -> &[f32] {
        &self.m.timesteps
    }
    fn sigmas(&self) -> Option<&[f32]> {
        Some(&self.m.sigmas)
    }
    fn init_noise_sigma(&self) -> f32 {
        1.0
    }
    fn input_scale(&self, _i: usize) -> f32 {
        1.0
    }
    fn needs_noise(&self) -> bool {
        self.sde
    }
    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let calls = self.m.ts.len();
        self.cursor.advance(i, calls, (out.len(), x.len()), noise, self.sde)?;
        let noise = noise.filter(|_| self.sde);
        // final_sigmas_type "zero": the last step is always first order.
        let last = i == calls - 1;
        let x0 = self.m.x0(self.prediction, i, out, x);
        let sig = &self.m.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma(sig[i + 1]);
        let (_, sigma_s0) = alpha_sigma(sig[i]);
        let lambda_t = lambda(sig[i + 1]);
        let lambda_s0 = lambda(sig[i]);
        let h = lambda_t - lambda_s0;
        let first_order = self.lower_order_nums < 1 || last || self.prev_x0.is_none();
        if !self.sde {
            let c_x = sigma_t / sigma_s0;
            let c_d = alpha_t * ((-h).exp() - 1.0);
            if first_order {
                for k in 0..x.len() {
                    x[k] = c_x * x[k] - c_d * x0[k];
                }
            } else {
                let m1 = self.prev_x0.as_ref().expect("checked above");
                let lambda_s1 = lambda(sig[i - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let inv_r0 = 1.0 / r0;
                let c_d1 = 0.5 * c_d;
                for k in 0..x.len() {
                    let d1 = inv_r0 * (x0[k] - m1[k]);
                    x[k] = c_x * x[k] - c_d * x0[k] - c_d1 * d1;
                }
            }
        } else {
            let z = noise.expect("checked by the cursor");
            let e = (-h).exp();
            let e2 = (-2.0 * h).exp();
            let c_x = sigma_t / sigma_s0 * e;
            let c_d = alpha_t * (1.0 - e2);
            let c_z = sigma_t * (1.0 - e2).sqrt();
            if first_order {
                for k in 0..x.len() {
                    x[k] = c_x * x[k] + c_d * x0[k] + c_z * z[k];
                }
            } else {
                let m1 = self.prev_x0.as_ref().expect("checked above");
                let lambda_s1 = lambda(sig[i - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let inv_r0 = 1.0 / r0;
                let c_d1 = 0.5 * c_d;
                for k in 0..x.len() {
                    let d1 = inv_r0 * (x0[k] - m1[k]);
                    x[k] = c_x * x[k] + c_d * x0[k] + c_d1 * d1 + c_z * z[k];
                }
            }
        }
        self.prev_x0 = Some(x0);
        self.lower_order_nums = (self.lower_order_nums + 1).min(2);
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        self.m.add_noise(original, noise, i)
    }
}
