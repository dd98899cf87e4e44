//! `atelier train` end to end on the tiny model (tests/fixtures/tiny-sd) with a generated
//! dataset of striped 64x64 pictures and captions:
//! - a run of 24 steps writes its checkpoints, log, loss curve and final LoRA; the LoRA loads
//!   back in atelier's own sampler code (merged at load, kohya and diffusers formats, at the
//!   intended scale: both files give the same merged model) and lowers the denoising loss on
//!   the training images, measured on fixed noise and timesteps against the base model;
//! - exact resume: a run resumed from its step-16 checkpoint ends with the same LoRA file,
//!   byte for byte, as the uninterrupted run (same GPU);
//! - bad input: an empty folder, an output folder holding a different run, a corrupt image
//!   among good ones (skipped with a warning).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use atelier::config::Sd15Config;
use atelier::model::sd15::StableDiffusion;
use atelier::rng::Rng;
use common::fixtures::fixture;
use common::gpu;

fn atelier(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).output().expect("running atelier")
}

fn temp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("atelier-cli-train-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Six 64x64 pictures: vertical stripes of a random colour on white, with captions.
fn dataset(dir: &Path) {
    let mut rng = Rng::new(11);
    for i in 0..6 {
        let c = [rng.uniform(), rng.uniform(), rng.uniform()].map(|v| (v * 255.0) as u8);
        let img = image::RgbImage::from_fn(64, 64, |x, _| if (x / 4) % 2 == 0 { image::Rgb(c) } else { image::Rgb([255, 255, 255]) });
        img.save(dir.join(format!("stripes{i}.png"))).unwrap();
        std::fs::write(dir.join(format!("stripes{i}.txt")), "a picture of stripes").unwrap();
    }
}

fn train_args<'a>(data: &'a str, out: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["train", "--model", "", "--data", data, "--output", out, "--resolution", "64", "--lr", "3e-3", "--seed", "5"];
    if !extra.contains(&"--steps") {
        v.extend_from_slice(&["--steps", "24", "--save-every", "8"]);
    }
    if !extra.contains(&"--rank") {
        v.extend_from_slice(&["--rank", "4", "--alpha", "8"]);
    }
    v.extend_from_slice(extra);
    v
}

/// Runs `args` (made by [`train_args`]) on the tiny model; returns standard error.
fn run_ok(args: &[&str]) -> String {
    let model = fixture("tiny-sd").display().to_string();
    let mut a = args.to_vec();
    a[2] = &model;
    run_ok_with(&a)
}

/// Mean denoising loss of the UNet over the training images at fixed timesteps and noise, with
/// the LoRA at `lora` merged (or none).
fn denoising_loss(lora: Option<&Path>) -> f64 {
    let g = gpu();
    let cfg = Sd15Config::tiny();
    let loras: Vec<(PathBuf, f32)> = lora.map(|p| vec![(p.to_path_buf(), 1.0)]).unwrap_or_default();
    let sd = StableDiffusion::load_with_loras(g, &fixture("tiny-sd"), &Default::default(), Some(cfg), &loras).unwrap();
    let data_dir = temp("eval-data");
    dataset(&data_dir);
    let clip = sd.clip.plan(g, 1, 0, false).unwrap();
    clip.run(g, &sd.tokenizer.encode("a picture of stripes").unwrap()).unwrap();
    let ctx = clip.out.to_f32(g).unwrap();
    let enc = sd.vae.encode_plan(g, 1, 64, 64, false).unwrap();
    let unet = sd.unet.plan(g, 1, 8, 8, 77, false).unwrap();
    let sched = atelier::config::SchedulerConfig::v1_5();
    let acp = atelier::schedulers::schedule::alphas_cumprod(&sched);
    let mut rng = Rng::new(99);
    let (mut total, mut n) = (0.0, 0);
    for i in 0..6 {
        let img = image::open(data_dir.join(format!("stripes{i}.png"))).unwrap().to_rgb8();
        let px: Vec<f32> = img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        enc.run(g, &px, 1).unwrap();
        let x0: Vec<f32> = enc.mean.to_f32(g).unwrap().iter().map(|v| v * 0.18215).collect();
        for t in [50usize, 250, 450, 650, 850] {
            let noise = rng.normals(x0.len());
            let (a, b) = ((acp[t] as f64).sqrt(), (1.0 - acp[t] as f64).sqrt());
            let xt: Vec<f32> = x0.iter().zip(&noise).map(|(&x, &e)| (a * x as f64 + b * e as f64) as f32).collect();
            unet.set_inputs(g, &xt, &[t as f32], &ctx).unwrap();
            unet.run(g).unwrap();
            let pred = unet.out.to_f32(g).unwrap();
            total += pred.iter().zip(&noise).map(|(&p, &e)| ((p - e) as f64).powi(2)).sum::<f64>() / pred.len() as f64;
            n += 1;
        }
    }
    let _ = std::fs::remove_dir_all(&data_dir);
    total / n as f64
}

/// The two LoRA files hold the same tensors, bit for bit, and the same metadata (the bytes
/// may differ: safetensors writes the metadata map in hash order).
fn same_lora(a: &Path, b: &Path) {
    let (ba, bb) = (std::fs::read(a).unwrap(), std::fs::read(b).unwrap());
    let (sa, sb) = (safetensors::SafeTensors::deserialize(&ba).unwrap(), safetensors::SafeTensors::deserialize(&bb).unwrap());
    let (ma, mb) = (safetensors::SafeTensors::read_metadata(&ba).unwrap().1, safetensors::SafeTensors::read_metadata(&bb).unwrap().1);
    assert_eq!(ma.metadata(), mb.metadata(), "metadata differs");
    let mut names = sa.names();
    names.sort();
    let mut nb = sb.names();
    nb.sort();
    assert_eq!(names, nb, "tensor names differ");
    for n in names {
        assert!(sa.tensor(n).unwrap().data() == sb.tensor(n).unwrap().data(), "the resumed run's {n} differs from the uninterrupted run's");
    }
}

#[test]
fn trains_checkpoints_resumes_exactly_and_lowers_the_loss() {
    let root = temp("main");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let (d, out) = (data.display().to_string(), root.join("run").display().to_string());
    let err = run_ok(&train_args(&d, &out, &[]));
    println!("{err}");
    let run = root.join("run");
    for f in ["checkpoint-000008", "checkpoint-000016", "checkpoint-000024", "log.csv", "loss.png", "run.json", "lora.safetensors"] {
        assert!(run.join(f).exists(), "{f} missing after training");
    }
    let log = std::fs::read_to_string(run.join("log.csv")).unwrap();
    assert_eq!(log.lines().count(), 25, "log.csv: a header and 24 steps");

    // Exact resume: the step-16 checkpoint continued to step 24 gives the same file.
    let resumed = root.join("resumed");
    std::fs::create_dir_all(&resumed).unwrap();
    std::fs::copy(run.join("run.json"), resumed.join("run.json")).unwrap();
    let ck = resumed.join("checkpoint-000016");
    std::fs::create_dir_all(&ck).unwrap();
    for f in ["state.safetensors", "lora.safetensors"] {
        std::fs::copy(run.join("checkpoint-000016").join(f), ck.join(f)).unwrap();
    }
    let r = resumed.display().to_string();
    run_ok(&train_args(&d, &r, &["--resume", "latest"]));
    same_lora(&run.join("lora.safetensors"), &resumed.join("lora.safetensors"));

    // Starting again in the same folder without --resume is refused (nothing overwritten).
    let model = fixture("tiny-sd").display().to_string();
    let mut again = train_args(&d, &out, &[]);
    again[2] = &model;
    let o = atelier(&again);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("--resume latest"), "{}", String::from_utf8_lossy(&o.stderr));
    // A different run's settings are refused too.
    let mut other = train_args(&d, &out, &["--rank", "8"]);
    other[2] = &model;
    let o = atelier(&other);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("different training run"), "{}", String::from_utf8_lossy(&o.stderr));

    // The diffusers-format file of the same run gives the same merged model.
    let diff = root.join("diffusers").display().to_string();
    run_ok(&train_args(&d, &diff, &["--format", "diffusers"]));
    let kohya_loss = denoising_loss(Some(&run.join("lora.safetensors")));
    let diffusers_loss = denoising_loss(Some(&root.join("diffusers").join("pytorch_lora_weights.safetensors")));
    let base = denoising_loss(None);
    println!("denoising loss on the training images: base {base:.5}, with the kohya LoRA {kohya_loss:.5}, diffusers file {diffusers_loss:.5}");
    assert!((kohya_loss - diffusers_loss).abs() <= 1e-3 * base, "the two formats load at different scales: {kohya_loss} vs {diffusers_loss}");
    assert!(kohya_loss < 0.97 * base, "training did not lower the loss: {kohya_loss} vs base {base}");
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_datasets_are_clear_errors() {
    let root = temp("bad");
    let empty = root.join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let model = fixture("tiny-sd").display().to_string();
    let (e, out) = (empty.display().to_string(), root.join("out").display().to_string());
    let mut args = train_args(&e, &out, &[]);
    args[2] = &model;
    let o = atelier(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("no"), "empty folder: {err}");
    assert!(!err.contains("panicked"), "{err}");

    // A corrupt image among good ones is skipped with a warning; training goes on.
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    std::fs::write(data.join("broken.png"), b"not a png at all").unwrap();
    std::fs::write(data.join("broken.txt"), "a picture of stripes").unwrap();
    let d = data.display().to_string();
    let out2 = root.join("out2").display().to_string();
    let err = run_ok(&train_args(&d, &out2, &["--steps", "2", "--save-every", "0"]));
    assert!(err.contains("broken.png"), "the corrupt file should be named: {err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Ctrl-C (SIGINT) mid-run: the step in flight finishes, a checkpoint is written, the exit
/// names how to continue, and `--resume latest` finishes the run.
#[test]
fn interrupt_writes_a_checkpoint_and_resumes() {
    let root = temp("sigint");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let (d, out) = (data.display().to_string(), root.join("run").display().to_string());
    let model = fixture("tiny-sd").display().to_string();
    let mut args = train_args(&d, &out, &["--steps", "400", "--save-every", "0"]);
    args[2] = &model;
    let child = Command::new(env!("CARGO_BIN_EXE_atelier")).args(&args).stderr(std::process::Stdio::piped()).spawn().unwrap();
    let log = root.join("run").join("log.csv");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&log).map(|t| t.lines().count()).unwrap_or(0) < 3 {
        assert!(t0.elapsed().as_secs() < 300, "training did not start");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let status = Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let output = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "an interrupted run must not exit as finished");
    assert!(err.contains("interrupted at step") && err.contains("--resume latest"), "{err}");
    let cks = std::fs::read_dir(root.join("run")).unwrap().flatten().filter(|e| e.file_name().to_string_lossy().starts_with("checkpoint-")).count();
    assert_eq!(cks, 1, "one checkpoint at the interruption");
    assert!(!std::fs::read_dir(root.join("run")).unwrap().flatten().any(|e| e.file_name().to_string_lossy().ends_with(".partial")));
    let mut resume = train_args(&d, &out, &["--steps", "400", "--save-every", "0", "--resume", "latest"]);
    resume[2] = &model;
    // --steps is not part of the run's identity: finish one step after the checkpoint.
    let step: usize = std::fs::read_dir(root.join("run")).unwrap().flatten().find_map(|e| e.file_name().to_string_lossy().strip_prefix("checkpoint-").and_then(|s| s.parse().ok())).unwrap();
    let next = (step + 1).to_string();
    let idx = resume.iter().position(|a| *a == "400").unwrap();
    resume[idx] = &next;
    let err = run_ok_with(&resume);
    assert!(err.contains("resuming from") && err.contains(&format!("at step {step}")), "{err}");
    assert!(root.join("run").join("lora.safetensors").exists());
    let _ = std::fs::remove_dir_all(&root);
}

fn run_ok_with(args: &[&str]) -> String {
    let out = atelier(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "atelier {args:?} failed:\n{err}");
    err
}
