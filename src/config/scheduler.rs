//! The noise schedule's config (diffusers' `scheduler_config.json`): betas, prediction type,
//! timestep spacing, and the per-sampler options left unset when the file leaves them out.

use std::path::Path;

use serde::Deserialize;

use super::json::{check_fixed, parse, read_json};
use crate::{Error, Result};

/// How the training noise schedule's betas run from `beta_start` to `beta_end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// Linear in beta.
    Linear,
    /// Linear in sqrt(beta), squared (SD-1.5).
    ScaledLinear,
}

/// What the UNet predicts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise (SD-1.5).
    Epsilon,
    /// v = alpha_t * noise - sigma_t * x0.
    VPrediction,
}

/// How inference timesteps are placed among the training timesteps.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `(0..n) * (T / n) + steps_offset`, descending (DDIM's and PNDM's default).
    Leading,
    /// `T - k * T / n - 1` for k in 0..n.
    Trailing,
    /// `linspace(0, T - 1, n)` (rounded for the samplers that take integer timesteps; the
    /// default of every other sampler).
    Linspace,
}

/// The noise schedule and inference-time conventions (diffusers' `scheduler_config.json`;
/// SD-1.5 ships a `PNDMScheduler` config, whose shared keys every sampler here follows).
///
/// Switching samplers in diffusers is `Cls.from_config(pipe.scheduler.config)`, and there a key the
/// file leaves out takes the *new class's* default, not the PNDM one. The keys whose defaults differ
/// between the schedulers are therefore kept as `Option` (`None`: absent from the file), and each
/// sampler in [`crate::schedulers`] applies its own diffusers default.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    /// Added to every "leading" inference timestep (SD-1.5: 1, so 50 steps run 981, 961, ..., 1).
    /// Absent: 0, as in every diffusers scheduler.
    #[serde(default)]
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    /// Absent (SD-1.5's file): "leading" for DDIM and PNDM, "linspace" for the other samplers.
    #[serde(default)]
    pub timestep_spacing: Option<TimestepSpacing>,
    /// DDIM and PNDM: use alpha_cumprod = 1 for the step after the last (false: the first
    /// alpha_cumprod). Absent: true for DDIM, false for PNDM.
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// DDIM and Heun: clip the predicted x0 to [-1, 1]. Absent: true for DDIM, false for Heun.
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// PNDM: skip the Runge-Kutta warm-up (PLMS only). Only `true` is supported for PNDM;
    /// absent means diffusers' default, false.
    #[serde(default)]
    pub skip_prk_steps: Option<bool>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self::v1_5()
    }
}

impl SchedulerConfig {
    /// SD-1.5's values, as its file gives them (no `prediction_type`: epsilon; no
    /// `timestep_spacing`: each sampler's own default).
    pub fn v1_5() -> Self {
        SchedulerConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            set_alpha_to_one: Some(false),
            clip_sample: Some(false),
            skip_prk_steps: Some(true),
        }
    }

    /// Reads a diffusers `scheduler_config.json`. Absent keys take SD-1.5's values, except the
    /// `Option` ones and `steps_offset`, which take diffusers' per-sampler defaults (see above).
    /// Keys that would change the sampling math in ways not implemented here are refused.
    pub fn from_diffusers_json(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let value = read_json(path)?;
        if value.get("trained_betas").is_some_and(|v| !v.is_null()) {
            return Err(Error::model(
                path,
                "trained_betas is set; only beta_start/beta_end schedules are supported",
            ));
        }
        check_fixed(
            path,
            &value,
            &[
                ("rescale_betas_zero_snr", "false"),
                ("thresholding", "false"),
                ("clip_sample_range", "1.0"),
                ("use_exponential_sigmas", "false"),
                ("use_beta_sigmas", "false"),
                ("use_lu_lambdas", "false"),
                ("timestep_type", "\"discrete\""),
            ],
        )?;
        let cfg: SchedulerConfig = parse(path, value)?;
        if cfg.num_train_timesteps == 0
            || !(cfg.beta_start > 0.0 && cfg.beta_end > cfg.beta_start && cfg.beta_end < 1.0)
        {
            return Err(Error::model(
                path,
                format!(
                    "num_train_timesteps {} / beta_start {} / beta_end {}: need T > 0 and \
                     0 < beta_start < beta_end < 1",
                    cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end
                ),
            ));
        }
        Ok(cfg)
    }

    /// `scheduler/scheduler_config.json` of a diffusers folder when present, else SD-1.5's values.
    pub fn from_model_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let path = dir.as_ref().join("scheduler").join("scheduler_config.json");
        if path.is_file() { Self::from_diffusers_json(path) } else { Ok(Self::v1_5()) }
    }
}
