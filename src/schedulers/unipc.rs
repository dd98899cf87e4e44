//! UniPC (diffusers' `UniPCMultistepScheduler` with its defaults: `solver_order` 2, `bh2`,
//! `predict_x0`, `lower_order_final`, no disabled corrector): each step first corrects the
//! sample the model just saw (UniC, using the new model output), then predicts the next one
//! (UniP). Same timesteps and sigmas as DPM-Solver++; scalars in f32 as diffusers.

use super::dpm_solver::MultistepSchedule;
use super::schedule::{alpha_sigma, lambda};
use super::{Cursor, Sampler, Scheduler};
use crate::Result;
use crate::config::{PredictionType, SchedulerConfig};

const SOLVER_ORDER: usize = 2;

pub(crate) struct UniPC {
    m: MultistepSchedule,
    n: usize,
    prediction: PredictionType,
    /// Converted (x0) model outputs of the previous and current steps: `[older, newer]`.
    outputs: [Option<Vec<f32>>; 2],
    /// The sample the previous predictor started from (diffusers' `last_sample`).
    last_sample: Option<Vec<f32>>,
    /// Order of the previous predictor, which the corrector reuses.
    this_order: usize,
    lower_order_nums: usize,
    cursor: Cursor,
}

/// The h-dependent pieces shared by predictor and corrector (bh2, predict_x0: hh = -h).
struct Coefs {
    h: f32,
    hh: f32,
    h_phi_1: f32,
    b_h: f32,
}

impl Coefs {
    fn new(h: f32) -> Coefs {
        let hh = -h;
        let h_phi_1 = hh.exp_m1();
        Coefs { h, hh, h_phi_1, b_h: hh.exp_m1() }
    }

    /// diffusers' b vector (`h_phi_k * factorial / B_h`) for `order` terms.
    fn b(&self, order: usize) -> Vec<f32> {
        let mut h_phi_k = self.h_phi_1 / self.hh - 1.0;
        let mut factorial = 1u32;
        let mut b = Vec::with_capacity(order);
        for i in 1..=order as u32 {
            b.push(h_phi_k * factorial as f32 / self.b_h);
            factorial *= i + 1;
            h_phi_k = h_phi_k / self.hh - (1.0f64 / factorial as f64) as f32;
        }
        b
    }
}

/// Solves the 2x2 system [[1, 1], [rk, 1]] rho = b as LAPACK's gesv does (partial pivoting).
fn solve2(rk: f32, b: [f32; 2]) -> [f32; 2] {
    let (mut r0, mut r1, mut b0, mut b1) = ([1.0f32, 1.0], [rk, 1.0], b[0], b[1]);
    if rk.abs() > 1.0 {
        std::mem::swap(&mut r0, &mut r1);
        std::mem::swap(&mut b0, &mut b1);
    }
    let l = r1[0] * (1.0 / r0[0]);
    let u11 = r1[1] - l * r0[1];
    let y1 = b1 - l * b0;
    let x1 = y1 / u11;
    let x0 = (b0 - r0[1] * x1) / r0[0];
    [x0, x1]
}

impl UniPC {
    pub(crate) fn new(cfg: &SchedulerConfig, n: usize, karras: bool) -> Result<Self> {
        Ok(UniPC {
            m: MultistepSchedule::new(cfg, n, karras)?,
            n,
            prediction: cfg.prediction_type,
            outputs: [None, None],
            last_sample: None,
            this_order: 1,
            lower_order_nums: 0,
            cursor: Cursor::default(),
        })
    }

    /// UniC: corrects `x` (the sample at sigma_i) from the previous step's start `last` with the
    /// new x0 `model_t`.
    fn correct(&self, i: usize, model_t: &[f32], last: &[f32], x: &mut [f32]) {
        let sig = &self.m.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma(sig[i]);
        let (_, sigma_s0) = alpha_sigma(sig[i - 1]);
        let c = Coefs::new(lambda(sig[i]) - lambda(sig[i - 1]));
        let m0 = self.outputs[1].as_ref().expect("a previous step");
        let c_x = sigma_t / sigma_s0;
        let c_m = alpha_t * c.h_phi_1;
        let c_b = alpha_t * c.b_h;
        if self.this_order == 1 {
            let rho = 0.5f32;
            for k in 0..x.len() {
                let pred = c_x * last[k] - c_m * m0[k];
                x[k] = pred - c_b * (rho * (model_t[k] - m0[k]));
            }
        } else {
            let m1 = self.outputs[0].as_ref().expect("two previous steps");
            let rk = (lambda(sig[i - 2]) - lambda(sig[i - 1])) / c.h;
            let b = c.b(2);
            let rho = solve2(rk, [b[0], b[1]]);
            for k in 0..x.len() {
                let pred = c_x * last[k] - c_m * m0[k];
                let d1 = (m1[k] - m0[k]) / rk;
                let corr = rho[0] * d1;
                x[k] = pred - c_b * (corr + rho[1] * (model_t[k] - m0[k]));
            }
        }
    }

    /// UniP: predicts the sample at sigma_{i+1} from `x` at sigma_i.
    fn predict(&self, i: usize, order: usize, x: &mut [f32]) {
        let sig = &self.m.sigmas;
        let (alpha_t, sigma_t) = alpha_sigma(sig[i + 1]);
        let (_, sigma_s0) = alpha_sigma(sig[i]);
        let c = Coefs::new(lambda(sig[i + 1]) - lambda(sig[i]));
        let m0 = self.outputs[1].as_ref().expect("the current output");
        let c_x = sigma_t / sigma_s0;
        let c_m = alpha_t * c.h_phi_1;
        let c_b = alpha_t * c.b_h;
        if order == 1 {
            for k in 0..x.len() {
                x[k] = c_x * x[k] - c_m * m0[k];
            }
        } else {
            let m1 = self.outputs[0].as_ref().expect("the previous output");
            let rk = (lambda(sig[i - 1]) - lambda(sig[i])) / c.h;
            let rho = 0.5f32;
            for k in 0..x.len() {
                let pred = c_x * x[k] - c_m * m0[k];
                let d1 = (m1[k] - m0[k]) / rk;
                x[k] = pred - c_b * (rho * d1);
            }
        }
    }
}

impl Scheduler for UniPC {
    fn sampler(&self) -> Sampler {
        Sampler::UniPC
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
        false
    }
    fn num_inference_steps(&self) -> usize {
        self.n
    }

    fn step(&mut self, i: usize, out: &[f32], x: &mut [f32], noise: Option<&[f32]>) -> Result<()> {
        let calls = self.m.ts.len();
        self.cursor.advance(i, calls, (out.len(), x.len()), noise, false)?;
        // The model saw the uncorrected sample: convert with it.
        let model_t = self.m.x0(self.prediction, i, out, x);
        if i > 0
            && let Some(last) = self.last_sample.take()
        {
            self.correct(i, &model_t, &last, x);
        }
        self.outputs.swap(0, 1);
        self.outputs[1] = Some(model_t);
        // lower_order_final: order 1 on the last step; warm-up from the start of the run.
        let this_order = SOLVER_ORDER.min(calls - i).min(self.lower_order_nums + 1);
        self.this_order = this_order;
        self.last_sample = Some(x.to_vec());
        self.predict(i, this_order, x);
        self.lower_order_nums = (self.lower_order_nums + 1).min(SOLVER_ORDER);
        Ok(())
    }

    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32> {
        self.m.add_noise(original, noise, i)
    }
}
