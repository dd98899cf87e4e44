//! Samplers (diffusers' schedulers), on the CPU, matching diffusers 0.42 step for step: the
//! [`Sampler`] names users type, the [`Scheduler`] trait the pipeline's denoising loop drives,
//! and [`new_scheduler`], which builds one the way `Cls.from_config(sd15_scheduler_config)`
//! does in diffusers (every option not in the config file at the class's default).
//!
//! The loop, as diffusers' txt2img / img2img pipelines run it:
//! ```text
//! let mut s = new_scheduler(&cfg, sampler, steps, karras, eta)?;
//! // txt2img: start at 0 from pure noise
//! let (start, mut x) = (0, noise.iter().map(|v| v * s.init_noise_sigma()).collect::<Vec<_>>());
//! // img2img: let start = s.img2img_start(strength)?; let mut x = s.add_noise(&image_latents, &noise, start);
//! for i in start..s.timesteps().len() {
//!     let t = s.timesteps()[i];                        // the UNet's timestep (f32)
//!     let input: Vec<f32> = x.iter().map(|v| v * s.input_scale(i)).collect();
//!     let eps = guided_unet(&input, t);                 // CFG already applied
//!     let fresh = s.needs_noise().then(|| rng.normals(x.len()));
//!     s.step(i, &eps, &mut x, fresh.as_deref())?;
//! }
//! ```
//! Model calls are indexed by `i`; Heun makes two calls per step (its timesteps list is
//! `2n - 1` long), PNDM (PLMS) `n + 1` calls for `n` steps.

mod ddim;
mod dpm_solver;
mod euler;
mod heun;
mod lms;
mod pndm;
pub mod schedule;
mod unipc;

use std::fmt;
use std::str::FromStr;

use crate::config::SchedulerConfig;
use crate::{Error, Result};

/// The samplers, under the names users type (`--sampler dpmpp_2m`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Sampler {
    /// DDIMScheduler (eta = 0: deterministic; eta > 0 adds noise).
    Ddim,
    /// PNDMScheduler with skip_prk_steps (PLMS), SD-1.5's own scheduler.
    Pndm,
    /// EulerDiscreteScheduler.
    Euler,
    /// EulerAncestralDiscreteScheduler.
    EulerA,
    /// DPMSolverMultistepScheduler, DPM-Solver++ order 2.
    DpmPp2m,
    /// DPMSolverMultistepScheduler, SDE-DPM-Solver++ order 2.
    DpmPp2mSde,
    /// HeunDiscreteScheduler (two model calls per step).
    Heun,
    /// LMSDiscreteScheduler (linear multistep, order 4).
    Lms,
    /// UniPCMultistepScheduler (bh2, order 2).
    UniPC,
}

impl Sampler {
    /// Every sampler, in the order the help text lists them.
    pub const ALL: [Sampler; 9] = [
        Sampler::Ddim,
        Sampler::Pndm,
        Sampler::Euler,
        Sampler::EulerA,
        Sampler::DpmPp2m,
        Sampler::DpmPp2mSde,
        Sampler::Heun,
        Sampler::Lms,
        Sampler::UniPC,
    ];

    /// The name users type.
    pub fn name(self) -> &'static str {
        match self {
            Sampler::Ddim => "ddim",
            Sampler::Pndm => "pndm",
            Sampler::Euler => "euler",
            Sampler::EulerA => "euler_a",
            Sampler::DpmPp2m => "dpmpp_2m",
            Sampler::DpmPp2mSde => "dpmpp_2m_sde",
            Sampler::Heun => "heun",
            Sampler::Lms => "lms",
            Sampler::UniPC => "unipc",
        }
    }

    /// AUTOMATIC1111's display name ("DPM++ 2M Karras", "Euler a", "PLMS", ...).
    pub fn label(self, karras: bool) -> String {
        let base = match self {
            Sampler::Ddim => "DDIM",
            Sampler::Pndm => "PLMS",
            Sampler::Euler => "Euler",
            Sampler::EulerA => "Euler a",
            Sampler::DpmPp2m => "DPM++ 2M",
            Sampler::DpmPp2mSde => "DPM++ 2M SDE",
            Sampler::Heun => "Heun",
            Sampler::Lms => "LMS",
            Sampler::UniPC => "UniPC",
        };
        if karras { format!("{base} Karras") } else { base.to_string() }
    }

    /// The diffusers class this sampler reproduces.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Sampler::Ddim => "DDIMScheduler",
            Sampler::Pndm => "PNDMScheduler",
            Sampler::Euler => "EulerDiscreteScheduler",
            Sampler::EulerA => "EulerAncestralDiscreteScheduler",
            Sampler::DpmPp2m | Sampler::DpmPp2mSde => "DPMSolverMultistepScheduler",
            Sampler::Heun => "HeunDiscreteScheduler",
            Sampler::Lms => "LMSDiscreteScheduler",
            Sampler::UniPC => "UniPCMultistepScheduler",
        }
    }

    /// Whether diffusers offers Karras sigmas (`use_karras_sigmas`) for this sampler.
    pub fn supports_karras(self) -> bool {
        !matches!(self, Sampler::Ddim | Sampler::Pndm | Sampler::EulerA)
    }
}

impl fmt::Display for Sampler {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Sampler {
    type Err = Error;

    /// Case-insensitive; `-` may stand for `_` ("euler-a").
    fn from_str(s: &str) -> Result<Self> {
        let key = s.trim().to_ascii_lowercase().replace('-', "_");
        Sampler::ALL.into_iter().find(|x| x.name() == key).ok_or_else(|| {
            let names: Vec<&str> = Sampler::ALL.iter().map(|x| x.name()).collect();
            Error::Usage(format!("unknown sampler {s:?}; choose one of: {}", names.join(", ")))
        })
    }
}

/// One sampler set up for a number of steps: the timesteps of its model calls and its `step`.
pub trait Scheduler {
    /// Which sampler this is.
    fn sampler(&self) -> Sampler;

    /// Timesteps of the model calls, in order: what to give the UNet as its timestep at call `i`.
    /// Euler-family timesteps can be fractional (Karras sigmas, "linspace" spacing).
    fn timesteps(&self) -> &[f32];

    /// The sigmas diffusers steps through, if this sampler has them (diagnostics).
    fn sigmas(&self) -> Option<&[f32]> {
        None
    }

    /// Multiply pure-noise initial latents by this (diffusers' `init_noise_sigma`).
    fn init_noise_sigma(&self) -> f32;

    /// diffusers' `scale_model_input` at model call `i`, as a factor: 1 for DDIM, PNDM, DPM++
    /// and UniPC; 1/sqrt(sigma^2 + 1) for the Euler family. (diffusers divides by
    /// sqrt(sigma^2 + 1); multiplying by this differs by at most an ulp.)
    fn input_scale(&self, i: usize) -> f32;

    /// Whether `step` needs fresh standard-normal noise (euler_a, dpmpp_2m_sde, ddim with eta > 0).
    fn needs_noise(&self) -> bool;

    /// One diffusers `step()` after model call `i`: updates `sample` in place from `model_output`
    /// (the guided epsilon or v prediction). `noise`: `Some(sample.len())` standard normals when
    /// [`needs_noise`](Self::needs_noise). Calls must come in order from the first index of the
    /// loop (0, or [`img2img_start`](Self::img2img_start)); multistep state is kept between them.
    fn step(
        &mut self,
        i: usize,
        model_output: &[f32],
        sample: &mut [f32],
        noise: Option<&[f32]>,
    ) -> Result<()>;

    /// img2img: diffusers' `add_noise(original, noise, timesteps[i])` with the begin index at `i`.
    fn add_noise(&self, original: &[f32], noise: &[f32], i: usize) -> Vec<f32>;

    /// Inference steps asked for.
    fn num_inference_steps(&self) -> usize;

    /// Model calls per step in diffusers' img2img arithmetic (2 for Heun, else 1).
    fn order(&self) -> usize {
        1
    }

    /// img2img: the first model call for `strength` in [0, 1], as diffusers' img2img pipeline
    /// computes it: `init = min(int(steps * strength), steps)`, `t_start = steps - init`, first
    /// call `t_start * order`. Pass it to [`add_noise`](Self::add_noise) and start the loop there.
    fn img2img_start(&self, strength: f64) -> Result<usize> {
        if !(0.0..=1.0).contains(&strength) {
            return Err(Error::Usage(format!("strength {strength} must be between 0 and 1")));
        }
        let n = self.num_inference_steps();
        let init = ((n as f64 * strength) as usize).min(n);
        let start = (n - init) * self.order();
        if start >= self.timesteps().len() {
            return Err(Error::Usage(format!(
                "strength {strength} with {n} steps leaves no denoising step; raise the strength \
                 or the number of steps"
            )));
        }
        Ok(start)
    }
}

/// Builds `sampler` for `steps` inference steps from the model's scheduler config.
/// `karras`: diffusers' `use_karras_sigmas` (euler, heun, lms, dpmpp_2m, dpmpp_2m_sde, unipc).
/// `eta`: DDIM's eta (0 for every other sampler).
pub fn new_scheduler(
    cfg: &SchedulerConfig,
    sampler: Sampler,
    steps: usize,
    karras: bool,
    eta: f32,
) -> Result<Box<dyn Scheduler>> {
    if karras && !sampler.supports_karras() {
        let ok: Vec<&str> =
            Sampler::ALL.iter().filter(|s| s.supports_karras()).map(|s| s.name()).collect();
        return Err(Error::Usage(format!(
            "--karras does not apply to {sampler} (diffusers' {} has no Karras sigmas); it works \
             with {}",
            sampler.diffusers_class(),
            ok.join(", ")
        )));
    }
    if !(eta.is_finite() && eta >= 0.0) {
        return Err(Error::Usage(format!("eta {eta} must be a finite number >= 0")));
    }
    if eta != 0.0 && sampler != Sampler::Ddim {
        return Err(Error::Usage(format!("eta applies to ddim only, not to {sampler}")));
    }
    schedule::check_steps(steps, cfg.num_train_timesteps)?;
    Ok(match sampler {
        Sampler::Ddim => Box::new(ddim::Ddim::new(cfg, steps, eta)?),
        Sampler::Pndm => Box::new(pndm::Pndm::new(cfg, steps)?),
        Sampler::Euler => Box::new(euler::Euler::new(cfg, steps, karras, false)?),
        Sampler::EulerA => Box::new(euler::Euler::new(cfg, steps, false, true)?),
        Sampler::DpmPp2m => Box::new(dpm_solver::DpmSolver::new(cfg, steps, karras, false)?),
        Sampler::DpmPp2mSde => Box::new(dpm_solver::DpmSolver::new(cfg, steps, karras, true)?),
        Sampler::Heun => Box::new(heun::Heun::new(cfg, steps, karras)?),
        Sampler::Lms => Box::new(lms::Lms::new(cfg, steps, karras)?),
        Sampler::UniPC => Box::new(unipc::UniPC::new(cfg, steps, karras)?),
    })
}

/// Checks the order of `step` calls and the buffer lengths; shared by the samplers.
#[derive(Clone, Debug, Default)]
pub(crate) struct Cursor {
    next: Option<usize>,
}

impl Cursor {
    /// Accepts model call `i` of `calls` if it is the next one (any index for the first call).
    pub(crate) fn advance(
        &mut self,
        i: usize,
        calls: usize,
        lens: (usize, usize),
        noise: Option<&[f32]>,
        needs_noise: bool,
    ) -> Result<()> {
        if i >= calls {
            return Err(Error::Usage(format!(
                "scheduler step {i} is past the last model call ({})",
                calls - 1
            )));
        }
        if let Some(next) = self.next
            && i != next
        {
            return Err(Error::Usage(format!(
                "scheduler step {i} called out of order: the next model call is {next} (build a \
                 new scheduler to start again)"
            )));
        }
        let (out, sample) = lens;
        if out != sample {
            return Err(Error::shape(
                "scheduler step",
                format!("model output has {out} values, the sample {sample}"),
            ));
        }
        match (needs_noise, noise) {
            (true, None) => {
                return Err(Error::Usage("this sampler's step needs fresh noise".into()));
            }
            (true, Some(n)) if n.len() != sample => {
                return Err(Error::shape(
                    "scheduler step",
                    format!("noise has {} values, the sample {sample}", n.len()),
                ));
            }
            _ => {}
        }
        self.next = Some(i + 1);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for s in Sampler::ALL {
            assert_eq!(s.to_string().parse::<Sampler>().unwrap(), s);
        }
        assert_eq!("Euler-A".parse::<Sampler>().unwrap(), Sampler::EulerA);
        let e = "dpm2".parse::<Sampler>().unwrap_err().to_string();
        assert!(e.contains("dpmpp_2m") && e.contains("euler_a"), "{e}");
        assert_eq!(Sampler::DpmPp2m.label(true), "DPM++ 2M Karras");
        assert_eq!(Sampler::EulerA.label(false), "Euler a");
    }
}
