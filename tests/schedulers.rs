//! The samplers against diffusers 0.42.1, step for step: every case of
//! tests/fixtures/reference_schedulers.safetensors (made by
//! tests/fixtures/make_scheduler_fixtures.py) is rebuilt from SD-1.5's scheduler config and run
//! through the same loop with the same stand-in model,
//! `model_output_i = 0.5 * x * input_scale(i) + model_bias[i]`, and every sample after every
//! step is compared (relative L2) with diffusers'. Errors compound along the run, as in a real
//! one. Plus the refusals: unknown names, --karras where diffusers has none, bad step counts,
//! steps out of order.

mod common;

use atelier::Error;
use atelier::config::{PredictionType, SchedulerConfig, TimestepSpacing};
use atelier::schedulers::{Sampler, new_scheduler, schedule};
use common::fixtures::{Reference, check_close, fixture};
use serde_json::Value;

const FILE: &str = "reference_schedulers.safetensors";

/// Bound on the relative L2 error of every sample along every run. Both sides compute in f32
/// in the same operation order; what differs is the last bit of a few scalars: torch's
/// vectorised `** 0.5` (the training sigmas) and its sqrt/log/exp/expm1 of 0-d tensors are
/// not always correctly rounded, numpy's float32 log (Karras timesteps), MKL's 2x2 solve
/// (UniPC) and scipy's quad on an f32 integrand (LMS coefficients, here exact in f64), and
/// the stand-in model multiplies by input_scale where diffusers divides. One ulp of a
/// coefficient is 6e-8 relative, and each step's sample feeds the next model call. Measured
/// (the printed table): 0.7e-7 to 3e-7 for most cases, 5e-7 for DPM++ 2M at 25 steps and
/// "leading", 6.2e-7 at most (LMS, whose coefficients carry scipy's f32 integrand noise).
/// A real slip (a coefficient, an order switch, a sigma index, a skipped corrector) gives
/// 1e-3 to 1e-1.
const SAMPLE_BOUND: f64 = 1e-6;

/// Fractional (Euler-family Karras) timesteps: numpy's float32 log can differ by one ulp,
/// which moves `_sigma_to_t` by about 1e-5 (absolute). Integer timesteps must match exactly.
const TIMESTEP_BOUND: f32 = 1e-4;

/// Sigmas and init_noise_sigma: one or two ulps (torch's sqrt of the training sigmas).
const SIGMA_BOUND: f64 = 3e-7;

fn notes() -> Value {
    let bytes = std::fs::read(fixture(FILE)).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let text = meta.metadata().as_ref().and_then(|m| m.get("notes")).expect("notes metadata");
    serde_json::from_str(text).unwrap()
}

fn sd15_config() -> SchedulerConfig {
    SchedulerConfig::from_diffusers_json(fixture("tiny-sd/scheduler/scheduler_config.json"))
        .unwrap()
}

fn config_for(case: &Value) -> SchedulerConfig {
    let mut cfg = sd15_config();
    match case["timestep_spacing"].as_str() {
        None => {}
        Some("leading") => cfg.timestep_spacing = Some(TimestepSpacing::Leading),
        Some("trailing") => cfg.timestep_spacing = Some(TimestepSpacing::Trailing),
        Some("linspace") => cfg.timestep_spacing = Some(TimestepSpacing::Linspace),
        Some(s) => panic!("unknown spacing {s}"),
    }
    match case["prediction_type"].as_str() {
        None => {}
        Some("v_prediction") => cfg.prediction_type = PredictionType::VPrediction,
        Some(s) => panic!("unknown prediction type {s}"),
    }
    cfg
}

fn max_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(&x, &y)| ((x as f64 - y as f64) / (y as f64).abs().max(1e-30)).abs())
        .fold(0.0, f64::max)
}

/// Runs one fixture case; returns the largest relative L2 error of any step's sample.
fn run_case(r: &Reference, case: &Value) -> f64 {
    let name = case["name"].as_str().unwrap();
    let sampler: Sampler = case["sampler"].as_str().unwrap().parse().unwrap();
    let steps = case["steps"].as_u64().unwrap() as usize;
    let karras = case["karras"].as_bool().unwrap();
    let eta = case["eta"].as_f64().unwrap() as f32;
    let mut s = new_scheduler(&config_for(case), sampler, steps, karras, eta)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(s.sampler(), sampler);

    // Schedule.
    let (_, ts) = r.get(&format!("{name}/timesteps"));
    assert_eq!(s.timesteps().len(), ts.len(), "{name}: number of model calls");
    let fractional = ts.iter().any(|t| t.fract() != 0.0);
    for (i, (&got, &want)) in s.timesteps().iter().zip(&ts).enumerate() {
        let tol = if fractional { TIMESTEP_BOUND } else { 0.0 };
        assert!((got - want).abs() <= tol, "{name}: timestep {i} is {got}, diffusers {want}");
    }
    let names = r.names(&format!("{name}/"));
    if names.contains(&format!("{name}/sigmas")) {
        let (_, sig) = r.get(&format!("{name}/sigmas"));
        let got = s.sigmas().unwrap_or_else(|| panic!("{name}: no sigmas"));
        let e = max_rel(got, &sig);
        assert!(e <= SIGMA_BOUND, "{name}: sigmas differ by {e:.2e} (relative)");
    }
    let (_, ins) = r.get(&format!("{name}/init_noise_sigma"));
    let e = max_rel(&[s.init_noise_sigma()], &ins);
    assert!(e <= SIGMA_BOUND, "{name}: init_noise_sigma {} vs {}", s.init_noise_sigma(), ins[0]);

    // Start.
    let want_start = case["start"].as_u64().unwrap() as usize;
    let mut x: Vec<f32> = match case["strength"].as_f64() {
        None => {
            let (_, x_t) = r.get("x_T");
            x_t.iter().map(|v| v * s.init_noise_sigma()).collect()
        }
        Some(strength) => {
            let start = s.img2img_start(strength).unwrap();
            assert_eq!(start, want_start, "{name}: img2img start");
            let (_, image) = r.get("image_latents");
            let (_, noise) = r.get("img2img_noise");
            let x = s.add_noise(&image, &noise, start);
            let (_, want) = r.get(&format!("{name}/start_sample"));
            check_close(&format!("{name} add_noise"), &x, &want, SIGMA_BOUND);
            x
        }
    };

    // The loop.
    let (_, bias) = r.get("model_bias");
    let (_, step_noise) = r.get("step_noise");
    let (shape, samples) = r.get(&format!("{name}/samples"));
    let n = x.len();
    assert_eq!(shape[0], ts.len() - want_start, "{name}: recorded steps");
    let mut worst: f64 = 0.0;
    for i in want_start..ts.len() {
        let scale = s.input_scale(i);
        let b = &bias[i * n..(i + 1) * n];
        let out: Vec<f32> = x.iter().zip(b).map(|(&v, &bb)| 0.5 * (v * scale) + bb).collect();
        let noise = s.needs_noise().then(|| &step_noise[i * n..(i + 1) * n]);
        s.step(i, &out, &mut x, noise).unwrap_or_else(|e| panic!("{name} step {i}: {e}"));
        let k = i - want_start;
        let want: Vec<f64> = samples[k * n..(k + 1) * n].iter().map(|&v| v as f64).collect();
        let err = common::rel_l2(&x, &want);
        assert!(
            err <= SAMPLE_BOUND,
            "{name}: sample after model call {i} has relative L2 error {err:.3e} (bound {SAMPLE_BOUND:.0e})"
        );
        worst = worst.max(err);
    }
    worst
}

#[test]
fn matches_diffusers() {
    let r = Reference::open(FILE);
    let notes = notes();
    let cases = notes["cases"].as_array().unwrap();
    assert!(cases.len() >= 40, "expected the full case list");
    let mut rows = Vec::new();
    for case in cases {
        let err = run_case(&r, case);
        rows.push((
            case["name"].as_str().unwrap().to_string(),
            case["calls"].as_u64().unwrap(),
            err,
        ));
    }
    eprintln!(
        "{:34} {:>5}  max relative L2 over the run (bound {SAMPLE_BOUND:.0e})",
        "case", "calls"
    );
    for (name, calls, err) in &rows {
        eprintln!("{name:34} {calls:>5}  {err:.2e}");
    }
}

#[test]
fn training_schedule_matches_torch() {
    let r = Reference::open(FILE);
    let (_, want) = r.get("alphas_cumprod");
    let got = schedule::alphas_cumprod(&sd15_config());
    // torch.linspace (FMA on x86-64) and a float64-accumulated cumprod, reproduced bit for bit
    // on the machine that made the fixture; allow an ulp for torch builds that differ there.
    let exact = got.iter().zip(&want).filter(|(a, b)| a == b).count();
    eprintln!("alphas_cumprod: {exact} of {} bit-identical", want.len());
    let e = max_rel(&got, &want);
    assert!(e <= 1.2e-7, "alphas_cumprod differs by {e:.2e} (relative)");
}

fn usage(e: Error) -> String {
    match e {
        Error::Usage(m) => m,
        other => panic!("expected a usage error, got {other:?}"),
    }
}

#[test]
fn names_round_trip() {
    for s in Sampler::ALL {
        assert_eq!(s.name().parse::<Sampler>().unwrap(), s);
        assert_eq!(s.to_string(), s.name());
    }
    assert_eq!("EULER_A".parse::<Sampler>().unwrap(), Sampler::EulerA);
    let e = usage("k_euler".parse::<Sampler>().unwrap_err());
    for s in Sampler::ALL {
        assert!(e.contains(s.name()), "{e}");
    }
    assert_eq!(Sampler::DpmPp2m.label(false), "DPM++ 2M");
    assert_eq!(Sampler::DpmPp2m.label(true), "DPM++ 2M Karras");
    assert_eq!(Sampler::EulerA.label(false), "Euler a");
    assert_eq!(Sampler::Lms.label(true), "LMS Karras");
}

#[test]
fn refusals() {
    let cfg = sd15_config();
    for s in [Sampler::Ddim, Sampler::Pndm, Sampler::EulerA] {
        let e = usage(new_scheduler(&cfg, s, 20, true, 0.0).err().unwrap());
        assert!(e.contains("--karras") && e.contains(s.name()), "{e}");
    }
    for s in Sampler::ALL {
        let e = usage(new_scheduler(&cfg, s, 0, false, 0.0).err().unwrap());
        assert!(e.contains("0"), "{e}");
        let e = usage(new_scheduler(&cfg, s, 1001, false, 0.0).err().unwrap());
        assert!(e.contains("1000"), "{e}");
        // Every sampler still builds at the extremes it accepts.
        new_scheduler(&cfg, s, 1, false, 0.0).unwrap();
        new_scheduler(&cfg, s, 999, false, 0.0).unwrap();
    }
    usage(new_scheduler(&cfg, Sampler::Euler, 20, false, 0.5).err().unwrap());
    usage(new_scheduler(&cfg, Sampler::Ddim, 20, false, -1.0).err().unwrap());
    // numpy's float arange gives diffusers 62 "trailing" timesteps for 61 steps.
    let mut trailing = cfg.clone();
    trailing.timestep_spacing = Some(TimestepSpacing::Trailing);
    let e = usage(new_scheduler(&trailing, Sampler::Ddim, 61, false, 0.0).err().unwrap());
    assert!(e.contains("trailing"), "{e}");
    // PNDM without skip_prk_steps (diffusers' default) would need the PRK warm-up.
    let mut prk = cfg.clone();
    prk.skip_prk_steps = None;
    let e = usage(new_scheduler(&prk, Sampler::Pndm, 20, false, 0.0).err().unwrap());
    assert!(e.contains("skip_prk_steps"), "{e}");
}

#[test]
fn step_misuse_is_an_error() {
    let cfg = sd15_config();
    let mut s = new_scheduler(&cfg, Sampler::DpmPp2m, 10, false, 0.0).unwrap();
    let out = vec![0.1f32; 16];
    let mut x = vec![1.0f32; 16];
    s.step(0, &out, &mut x, None).unwrap();
    assert!(usage(s.step(2, &out, &mut x, None).unwrap_err()).contains("out of order"));
    assert!(matches!(s.step(1, &out[..8], &mut x, None), Err(Error::Shape { .. })));
    assert!(s.step(10, &out, &mut x, None).is_err());
    let mut a = new_scheduler(&cfg, Sampler::EulerA, 10, false, 0.0).unwrap();
    assert!(a.needs_noise());
    assert!(usage(a.step(0, &out, &mut x, None).unwrap_err()).contains("noise"));
    // img2img strength: outside [0, 1], or too small to leave a step.
    assert!(a.img2img_start(1.5).is_err());
    assert!(a.img2img_start(0.05).is_err());
    assert_eq!(a.img2img_start(1.0).unwrap(), 0);
    let h = new_scheduler(&cfg, Sampler::Heun, 10, false, 0.0).unwrap();
    assert_eq!(h.img2img_start(0.6).unwrap(), 8);
    // diffusers' img2img truncates steps * strength in float64: 10 * 0.7 = 7.000000000000001.
    assert_eq!(h.img2img_start(0.7).unwrap(), 6);
}
