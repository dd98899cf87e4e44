//! The training noise schedule (betas, alphas_cumprod, sigmas) and the placement of inference
//! timesteps and sigmas shared by the samplers. Each function reproduces diffusers' arithmetic:
//! torch float32 where diffusers computes with torch, numpy float64 where it uses numpy
//! (`np.linspace`, `np.arange`, `np.interp`, the Karras ramp, `_sigma_to_t`).

use crate::config::{BetaSchedule, SchedulerConfig, TimestepSpacing};
use crate::{Error, Result};

/// `torch.linspace(start, end, n, dtype=torch.float32)` as PyTorch's CPU kernel computes it:
/// the step in f32, then `start + step * j` for the first half and `end - step * (n - 1 - j)`
/// for the second, each a fused multiply-add (checked bit for bit against torch 2.15 on x86-64).
pub fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (a, b) = (start as f32, end as f32);
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|j| {
            if j < half {
                step.mul_add(j as f32, a)
            } else {
                (-step).mul_add((n - 1 - j) as f32, b)
            }
        })
        .collect()
}

/// diffusers' `alphas_cumprod` (float32): betas from `torch.linspace`, `alphas = 1 - betas`,
/// and torch's CPU `cumprod`, which accumulates in float64 and rounds each element to f32.
pub fn alphas_cumprod(cfg: &SchedulerConfig) -> Vec<f32> {
    let t = cfg.num_train_timesteps;
    let betas: Vec<f32> = match cfg.beta_schedule {
        BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, t),
        BetaSchedule::ScaledLinear => {
            torch_linspace_f32(cfg.beta_start.powf(0.5), cfg.beta_end.powf(0.5), t)
                .into_iter()
                .map(|b| b * b)
                .collect()
        }
    };
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            acc *= (1.0f32 - b) as f64;
            acc as f32
        })
        .collect()
}

/// `((1 - alphas_cumprod) / alphas_cumprod) ** 0.5` in f32, indexed by training timestep.
/// (torch's vectorised `** 0.5` is within one ulp of the correctly rounded square root used here.)
pub fn train_sigmas(ac: &[f32]) -> Vec<f32> {
    ac.iter().map(|&a| ((1.0 - a) / a).sqrt()).collect()
}

/// `np.log` of float32 sigmas, as float32 (correctly rounded here; numpy's SIMD log can differ by
/// one ulp, which moves a fractional Karras timestep by about 1e-5).
pub fn log_f32(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| (x as f64).ln() as f32).collect()
}

/// `np.linspace(a, b, n)` in float64: `j * step + a`, the last value exactly `b`.
pub fn np_linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f64;
    let mut y: Vec<f64> = (0..n).map(|j| j as f64 * step + a).collect();
    y[n - 1] = b;
    y
}

/// `np.arange(start, stop, step)` for floats: length `ceil((stop - start) / step)`, values
/// `start + j * delta` with `delta = (start + step) - start`.
pub fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    if len.is_nan() || len <= 0.0 {
        return vec![];
    }
    let len = len as usize;
    let delta = (start + step) - start;
    (0..len)
        .map(|j| match j {
            0 => start,
            1 => start + step,
            _ => start + j as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64.
pub fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0] as f64;
    }
    if x >= last as f64 {
        return fp[last] as f64;
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return fp[j] as f64;
    }
    let slope = (fp[j + 1] as f64 - fp[j] as f64) / 1.0;
    slope * (x - j as f64) + fp[j] as f64
}

/// Karras et al.'s sigmas (rho = 7), diffusers' `_convert_to_karras`, in float64.
pub fn karras_sigmas(sigma_min: f64, sigma_max: f64, n: usize) -> Vec<f64> {
    let rho = 7.0f64;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, n)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep of `sigma`, interpolating linearly
/// in log sigma between the two training timesteps around it (float64; `log_sigmas` float32).
pub fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    // The last index whose log sigma is <= log_sigma (0 when none), at most len - 2.
    let low = log_sigmas.iter().rposition(|&l| log_sigma - l as f64 >= 0.0).unwrap_or(0);
    let low = low.min(log_sigmas.len() - 2);
    let (lo, hi) = (log_sigmas[low] as f64, log_sigmas[low + 1] as f64);
    let w = ((lo - log_sigma) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// DPM-Solver's (alpha_t, sigma_t) of a sigma, in f32 as diffusers' `_sigma_to_alpha_sigma_t`.
pub fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// log(alpha_t) - log(sigma_t) of a sigma, in f32 (+inf at sigma = 0).
pub fn lambda(sigma: f32) -> f32 {
    let (a, s) = alpha_sigma(sigma);
    a.ln() - s.ln()
}

/// Refuses 0 steps and more steps than training timesteps.
pub fn check_steps(n: usize, t_train: usize) -> Result<()> {
    if n == 0 {
        return Err(Error::Usage("the number of sampling steps is 0; use at least 1".into()));
    }
    if n > t_train {
        return Err(Error::Usage(format!(
            "{n} sampling steps is more than the model's {t_train} training timesteps; use at \
             most {t_train}"
        )));
    }
    Ok(())
}

/// Refuses a "leading" schedule whose first timestep `top` is past the training range.
fn check_offset(top: usize, t_train: usize, offset: usize) -> Result<()> {
    if top >= t_train {
        return Err(Error::Usage(format!(
            "steps_offset {offset} puts the first timestep at {top}, past the last training \
             timestep {}",
            t_train - 1
        )));
    }
    Ok(())
}

/// diffusers' "trailing" placement, `round(arange(T, 0, -T/n)) - 1`. numpy's float arange
/// returns n + 1 values for some n (61, 103, ...), the last one -1.
fn trailing_raw(n: usize, t_train: usize) -> Vec<f64> {
    let t = t_train as f64;
    np_arange(t, 0.0, -(t / n as f64)).into_iter().map(|x| x.round_ties_even() - 1.0).collect()
}

/// Refuses a "trailing" schedule that numpy's arange made n + 1 long (diffusers would then run
/// an extra step at timestep -1).
fn check_trailing_len(v: &[f64], n: usize) -> Result<()> {
    if v.len() != n {
        return Err(Error::Usage(format!(
            "timestep_spacing \"trailing\" with {n} steps: numpy's rounding gives diffusers {} \
             timesteps, the last one negative; use {} or {} steps",
            v.len(),
            n - 1,
            n + 1
        )));
    }
    Ok(())
}

/// Descending timesteps of the one-model-call-per-step samplers (DDIM, PNDM, Euler, Euler a,
/// Heun, LMS) for `n` steps as diffusers computes them, unchecked: "leading" and "trailing"
/// give whole numbers ("leading" may pass T - 1 with a large steps_offset, "trailing" may be
/// n + 1 long), "linspace" `np.linspace(0, T - 1, n)` (DDIM/PNDM round it, Euler keeps f32).
/// With Karras sigmas only its first and last values matter (the sigma range).
pub fn spaced_raw(spacing: TimestepSpacing, n: usize, t_train: usize, offset: usize) -> Vec<f64> {
    match spacing {
        TimestepSpacing::Leading => {
            let ratio = t_train / n;
            (0..n).rev().map(|k| (k * ratio) as f64 + offset as f64).collect()
        }
        TimestepSpacing::Trailing => trailing_raw(n, t_train),
        TimestepSpacing::Linspace => {
            np_linspace(0.0, (t_train - 1) as f64, n).into_iter().rev().collect()
        }
    }
}

/// [`spaced_raw`], refusing 0 or too many steps and the schedules diffusers gets wrong: a
/// "leading" timestep past T - 1, a "trailing" one of -1.
pub fn spaced(
    spacing: TimestepSpacing,
    n: usize,
    t_train: usize,
    offset: usize,
) -> Result<Vec<f64>> {
    check_steps(n, t_train)?;
    let v = spaced_raw(spacing, n, t_train, offset);
    match spacing {
        TimestepSpacing::Leading => check_offset(v[0] as usize, t_train, offset)?,
        TimestepSpacing::Trailing => check_trailing_len(&v, n)?,
        TimestepSpacing::Linspace => {}
    }
    Ok(v)
}

/// Descending integer timesteps of the multistep solvers (DPM-Solver++, UniPC), which place
/// n + 1 points and drop the last (t = 0) for "leading" and "linspace".
pub fn spaced_multistep(
    spacing: TimestepSpacing,
    n: usize,
    t_train: usize,
    offset: usize,
) -> Result<Vec<i64>> {
    check_steps(n, t_train)?;
    let v: Vec<i64> = match spacing {
        TimestepSpacing::Leading => {
            let ratio = t_train / (n + 1);
            check_offset(n * ratio + offset, t_train, offset)?;
            (1..=n).rev().map(|k| (k * ratio + offset) as i64).collect()
        }
        TimestepSpacing::Trailing => {
            let v = trailing_raw(n, t_train);
            check_trailing_len(&v, n)?;
            v.into_iter().map(|x| x as i64).collect()
        }
        TimestepSpacing::Linspace => np_linspace(0.0, (t_train - 1) as f64, n + 1)
            .into_iter()
            .rev()
            .take(n)
            .map(|x| x.round_ties_even() as i64)
            .collect(),
    };
    if v.windows(2).any(|w| w[1] >= w[0]) {
        return Err(Error::Usage(format!(
            "{n} steps is too many for this sampler: its timesteps repeat; use at most {}",
            t_train - 1
        )));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numpy_helpers() {
        assert_eq!(np_linspace(0.0, 1.0, 1), vec![0.0]);
        assert_eq!(np_linspace(0.0, 999.0, 10)[9], 999.0);
        assert_eq!(np_arange(1000.0, 0.0, -100.0).len(), 10);
        // numpy's float arange gives 62 values here (diffusers' trailing quirk).
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_interp(2.5, &[0.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(np_interp(-1.0, &[5.0, 6.0]), 5.0);
        assert_eq!(trailing_raw(61, 1000).len(), 62);
        assert!(spaced(TimestepSpacing::Trailing, 61, 1000, 0).is_err());
        assert_eq!(spaced(TimestepSpacing::Trailing, 10, 1000, 0).unwrap()[0], 999.0);
    }

    #[test]
    fn sigma_to_t_inverts_training_sigmas() {
        let ac = alphas_cumprod(&SchedulerConfig::v1_5());
        let sig = train_sigmas(&ac);
        let logs = log_f32(&sig);
        for t in [0usize, 1, 500, 998, 999] {
            assert!((sigma_to_t(sig[t] as f64, &logs) - t as f64).abs() < 1e-3, "{t}");
        }
        // Below the smallest sigma clamps to 0, above the largest to 999.
        assert_eq!(sigma_to_t(1e-3, &logs), 0.0);
        assert_eq!(sigma_to_t(1e3, &logs), 999.0);
    }
}
