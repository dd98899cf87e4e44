//! `atelier train` end to end on the tiny model (tests/fixtures/tiny-sd) with a generated
//! dataset of striped 64x64 pictures and captions:
//! - a run of 24 steps writes its checkpoints, log, loss curve and final LoRA; the LoRA loads
//!   back in atelier's own sampler code (merged at load, kohya and diffusers formats, at the
//!   intended scale: both files give the same merged model) and lowers the denoising loss on
//!   the training images, measured on fixed noise and timesteps against the base model;
//! - exact resume: a run resumed from its step-16 checkpoint ends with the same LoRA file,
//!   byte for byte, as the uninterrupted run (same GPU);
//! - bad input: an empty folder, an output folder holding a different run, a corrupt image
//!   among good ones (skipped with a warning);
//! - `--cache-dir`: a cached run trains bit for bit as an uncached one, a second run reads
//!   every entry instead of encoding, a damaged cache file is replaced and an edited image
//!   encoded again;
//! - a full disk (the process's file-size limit, RLIMIT_FSIZE, standing in for it): the run
//!   stops with a message naming the file and the problem, the earlier checkpoint stays
//!   whole and resumable, no half-written checkpoint or log row is left (the limit hit while
//!   writing a checkpoint's optimizer state, then while appending to log.csv);
//! - validation grids: written before the first step, on schedule and at the end (prompts x
//!   seeds cells of the training size, A1111 parameters), the same cells `atelier sample`
//!   draws with the run's LoRA file, continued on schedule by a resumed run, and training
//!   bit-identical with or without them; bad validation options refused before any work.

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

/// `--train-text-encoder`: the text encoder's adapters train through the UNet's d(context)
/// (their B starts at zero, so a nonzero B means gradients reached them), the file has kohya
/// `lora_te_` keys (or diffusers `text_encoder.` keys) beside the UNet's, a resume from a
/// checkpoint ends with the same file, and `atelier sample --lora` loads it and draws what the
/// run's validation grid showed (with the text encoder's adapters merged: without them the image
/// differs); merged, the text encoder's output changes (the te keys are applied, not skipped).
#[test]
fn trains_the_text_encoder_too() {
    let root = temp("te");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let d = data.display().to_string();
    let out = root.join("run").display().to_string();
    // With input dropout: the q/k/v adapters of the UNet and the text encoder run stacked under
    // a mask per member, and the resume below must regenerate every mask exactly.
    let te = ["--steps", "8", "--save-every", "4", "--train-text-encoder", "--text-encoder-lr", "2e-3", "--dropout", "0.1"];
    let validation = ["--validation-prompt", "a picture of stripes", "--validation-images", "1", "--validation-steps", "2"];
    let err = run_ok(&train_args(&d, &out, &[&te[..], &validation[..]].concat()));
    assert!(err.contains("+ 18 on the text encoder"), "{err}");
    let file = root.join("run").join("lora.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let names = st.names();
    let te_keys: Vec<&&str> = names.iter().filter(|n| n.starts_with("lora_te_")).collect();
    let unet_keys = names.iter().filter(|n| n.starts_with("lora_unet_")).count();
    assert_eq!(te_keys.len(), 18 * 3, "3 layers x 6 projections x (down, up, alpha)");
    assert_eq!(unet_keys, 128 * 3);
    assert!(names.contains(&"lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"), "{te_keys:?}");
    assert!(names.contains(&"lora_te_text_model_encoder_layers_2_mlp_fc2.lora_up.weight"), "{te_keys:?}");
    for k in te_keys.iter().filter(|k| k.ends_with("lora_up.weight")) {
        let t = st.tensor(k).unwrap();
        let nonzero = t.data().chunks_exact(2).any(|b| u16::from_le_bytes([b[0], b[1]]) & 0x7fff != 0);
        assert!(nonzero, "{k}: B is still zero: no gradient reached the text encoder");
    }
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone().unwrap();
    assert_eq!(meta["ss_network_train_unet_only"], "False");
    assert_eq!(meta["ss_text_encoder_lr"], "0.002");

    // Exact resume from the step-4 checkpoint (the text encoder's adapters and moments in it).
    let resumed = root.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoint-000004")).unwrap();
    std::fs::copy(root.join("run").join("run.json"), resumed.join("run.json")).unwrap();
    for f in ["state.safetensors", "lora.safetensors"] {
        std::fs::copy(root.join("run").join("checkpoint-000004").join(f), resumed.join("checkpoint-000004").join(f)).unwrap();
    }
    let r = resumed.display().to_string();
    run_ok(&train_args(&d, &r, &[&te[..], &["--resume", "latest"]].concat()));
    same_lora(&file, &resumed.join("lora.safetensors"));
    // Resuming it without the text encoder is refused.
    let model = fixture("tiny-sd").display().to_string();
    let mut unet_only = train_args(&d, &r, &["--steps", "8", "--save-every", "4", "--resume", "latest"]);
    unet_only[2] = &model;
    assert!(!atelier(&unet_only).status.success());

    // atelier sample loads it, and draws the last validation grid's image (the grid merges the
    // text encoder's adapters too); merged, the text encoder's output moves.
    let png = root.join("s.png");
    let model_dir = fixture("tiny-sd");
    let args = ["sample", "--model", model_dir.to_str().unwrap(), "--prompt", "a picture of stripes", "--seed", "5", "--steps", "2", "--width", "64", "--height", "64"];
    sample_direct(&[&args[..], &["--lora", file.to_str().unwrap(), "--output", png.to_str().unwrap()]].concat());
    let grid = image::open(root.join("run").join("validation").join("step-000008.png")).unwrap().to_rgb8().into_raw();
    assert!(image::open(&png).unwrap().to_rgb8().into_raw() == grid, "the last validation grid differs from atelier sample with the LoRA");
    let unet_only = root.join("unet-only.safetensors");
    {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let kept: Vec<(String, safetensors::tensor::TensorView)> = st.tensors().into_iter().filter(|(k, _)| !k.starts_with("lora_te_")).collect();
        safetensors::serialize_to_file(kept, None, &unet_only).unwrap();
    }
    let png2 = root.join("s2.png");
    sample_direct(&[&args[..], &["--lora", unet_only.to_str().unwrap(), "--output", png2.to_str().unwrap()]].concat());
    assert!(image::open(&png2).unwrap().to_rgb8().into_raw() != grid, "without its text-encoder adapters the LoRA draws the same image: the check above proves nothing");
    let g = gpu();
    let embed = |loras: &[(PathBuf, f32)]| {
        let sd = StableDiffusion::load_with_loras(g, &model_dir, &Default::default(), Some(Sd15Config::tiny()), loras).unwrap();
        let clip = sd.clip.plan(g, 1, 0, false).unwrap();
        clip.run(g, &sd.tokenizer.encode("a picture of stripes").unwrap()).unwrap();
        clip.out.to_f32(g).unwrap()
    };
    let (base, merged) = (embed(&[]), embed(&[(file.clone(), 1.0)]));
    let moved = base.iter().zip(&merged).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt() / base.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    println!("text encoder output moved by {moved:.3e} (relative L2) with the trained LoRA");
    assert!(moved > 1e-3, "the LoRA's text-encoder adapters did not change CLIP's output ({moved:.3e})");

    // The diffusers format writes text_encoder. keys, and they load at the same scale.
    let diff = root.join("diffusers").display().to_string();
    run_ok(&train_args(&d, &diff, &[&te[..], &["--format", "diffusers"]].concat()));
    let dfile = root.join("diffusers").join("pytorch_lora_weights.safetensors");
    let dbytes = std::fs::read(&dfile).unwrap();
    let dst = safetensors::SafeTensors::deserialize(&dbytes).unwrap();
    assert!(dst.names().contains(&"text_encoder.text_model.encoder.layers.1.self_attn.out_proj.lora_A.weight"));
    let dmerged = embed(&[(dfile, 1.0)]);
    let diff = merged.iter().zip(&dmerged).map(|(a, b)| ((a - b) as f64).powi(2)).sum::<f64>().sqrt() / base.iter().map(|&a| (a as f64).powi(2)).sum::<f64>().sqrt();
    assert!(diff < 1e-3, "the kohya and diffusers files' text encoders differ by {diff:.3e}");
    let _ = std::fs::remove_dir_all(&root);
}

fn run_ok_with(args: &[&str]) -> String {
    let out = atelier(args);
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "atelier {args:?} failed:\n{err}");
    err
}

/// `atelier sample` with the UNet's convolutions run directly (ATELIER_WINOGRAD=0), as the
/// training process's validation grids run them: the two then agree bit for bit (by default
/// sample runs them by Winograd, whose roundings differ).
fn sample_direct(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_atelier")).args(args).env("ATELIER_WINOGRAD", "0").output().expect("running atelier");
    assert!(out.status.success(), "atelier {args:?} failed:\n{}", String::from_utf8_lossy(&out.stderr));
}

fn files_in(dir: &Path) -> usize {
    std::fs::read_dir(dir).map(|r| r.flatten().filter(|e| e.file_name().to_string_lossy().ends_with(".safetensors")).count()).unwrap_or(0)
}

#[test]
fn disk_cache_is_exact_reused_and_repaired() {
    let root = temp("cache");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let (d, cache) = (data.display().to_string(), root.join("cache").display().to_string());
    let out = |n: &str| root.join(n).display().to_string();
    let (plain, first, second, third) = (out("plain"), out("first"), out("second"), out("third"));
    // Six steps of one image: every image once.
    let steps = ["--steps", "6", "--save-every", "0"];
    let cached: Vec<&str> = steps.iter().copied().chain(["--cache-dir", cache.as_str()]).collect();
    run_ok(&train_args(&d, &plain, &steps));
    let err = run_ok(&train_args(&d, &first, &cached));
    assert!(err.contains("latents: 0 from the cache, 6 encoded and stored; text embeddings: 0 from the cache, 1 encoded"), "{err}");
    assert_eq!((files_in(&root.join("cache/latents")), files_in(&root.join("cache/text"))), (6, 1));
    let err = run_ok(&train_args(&d, &second, &cached));
    assert!(err.contains("latents: 6 from the cache, 0 encoded and stored; text embeddings: 1 from the cache, 0 encoded"), "{err}");
    // The f32 adapters too (the f16 LoRA file could hide a last-bit difference).
    let params = |run: &str| {
        let bytes = std::fs::read(Path::new(run).join("checkpoint-000006/state.safetensors")).unwrap();
        safetensors::SafeTensors::deserialize(&bytes).unwrap().tensor("params").unwrap().data().to_vec()
    };
    for run in [&first, &second] {
        same_lora(&Path::new(&plain).join("lora.safetensors"), &Path::new(run).join("lora.safetensors"));
        assert!(params(run) == params(&plain), "{run}: the adapters differ from the uncached run's");
    }

    // Damage the entry of stripes1 (cut in half) and edit stripes0.
    use sha2::Digest;
    let sha = |p: &Path| sha2::Sha256::digest(std::fs::read(p).unwrap()).iter().map(|b| format!("{b:02x}")).collect::<String>();
    let entry_of = |image: &Path| {
        let h = sha(image);
        let dir = root.join("cache/latents");
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.path()).find(|p| String::from_utf8_lossy(&std::fs::read(p).unwrap()).contains(&h)).unwrap()
    };
    let damaged = entry_of(&data.join("stripes1.png"));
    let whole = std::fs::read(&damaged).unwrap();
    std::fs::write(&damaged, &whole[..whole.len() / 2]).unwrap();
    image::RgbImage::from_fn(64, 64, |_, y| image::Rgb(if (y / 8) % 2 == 0 { [0, 0, 0] } else { [255, 255, 255] })).save(data.join("stripes0.png")).unwrap();
    let err = run_ok(&train_args(&d, &third, &cached));
    assert!(err.contains("is damaged") && err.contains(&damaged.file_name().unwrap().to_string_lossy().to_string()), "{err}");
    assert!(err.contains("latents: 4 from the cache, 2 encoded and stored") && err.contains("1 damaged files replaced"), "{err}");
    assert_eq!(std::fs::read(&damaged).unwrap(), whole, "the damaged entry is written again as it was");
    assert_eq!(files_in(&root.join("cache/latents")), 7, "the edited image gets an entry of its own");
    assert!(!err.contains("panicked"), "{err}");
    let _ = std::fs::remove_dir_all(&root);
}

/// Runs `atelier args` with the file-size limit `limit` bytes (writes past it fail with EFBIG,
/// as on a full disk).
fn atelier_limited(args: &[&str], limit: u64) -> std::process::Output {
    use std::os::unix::process::CommandExt;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atelier"));
    cmd.args(args);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let r = libc::rlimit { rlim_cur: limit as libc::rlim_t, rlim_max: limit as libc::rlim_t };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &r) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    cmd.output().expect("running atelier")
}

#[test]
fn a_full_disk_stops_cleanly_and_keeps_the_checkpoints() {
    let root = temp("full");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let run = root.join("run");
    let (d, out) = (data.display().to_string(), run.display().to_string());
    let model = fixture("tiny-sd").display().to_string();
    run_ok(&train_args(&d, &out, &["--steps", "4", "--save-every", "4"]));
    let ck = run.join("checkpoint-000004");
    let (lora, state) = (std::fs::read(ck.join("lora.safetensors")).unwrap(), std::fs::read(ck.join("state.safetensors")).unwrap());
    // Room for the LoRA file and the log but not for the optimizer state (3 f32 copies).
    let limit = (lora.len() + state.len()) as u64 / 2;
    assert!(lora.len() < limit as usize && (limit as usize) < state.len(), "LoRA {} bytes, state {}", lora.len(), state.len());

    let mut args = train_args(&d, &out, &["--steps", "8", "--save-every", "4", "--resume", "latest"]);
    args[2] = &model;
    let o = atelier_limited(&args, limit);
    let err = String::from_utf8_lossy(&o.stderr);
    println!("{err}");
    assert!(!o.status.success(), "the run must fail when its checkpoint cannot be written");
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.contains("the disk is full") && err.contains("state.safetensors") && err.contains("--resume latest"), "{err}");
    assert_eq!(std::fs::read(ck.join("lora.safetensors")).unwrap(), lora, "the earlier checkpoint changed");
    assert_eq!(std::fs::read(ck.join("state.safetensors")).unwrap(), state, "the earlier checkpoint changed");
    let names: Vec<String> = std::fs::read_dir(&run).unwrap().flatten().map(|e| e.file_name().to_string_lossy().to_string()).collect();
    assert!(!names.iter().any(|n| n.starts_with("checkpoint-000008") || n.contains(".tmp")), "left behind: {names:?}");
    let log = std::fs::read_to_string(run.join("log.csv")).unwrap();
    assert!(log.ends_with('\n') && log.lines().skip(1).all(|l| l.split(',').count() == 7), "log.csv:\n{log}");

    // The disk filling up while a row of log.csv is written: the row is taken back.
    let room = std::fs::metadata(run.join("run.json")).unwrap().len().max(std::fs::metadata(run.join("log.csv")).unwrap().len()) + 70;
    let mut args = train_args(&d, &out, &["--steps", "30", "--save-every", "0", "--resume", "latest"]);
    args[2] = &model;
    let o = atelier_limited(&args, room);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && err.contains("log.csv") && err.contains("the disk is full"), "{err}");
    let log = std::fs::read_to_string(run.join("log.csv")).unwrap();
    assert!(log.ends_with('\n') && log.lines().skip(1).all(|l| l.split(',').count() == 7), "log.csv:\n{log}");

    // Resuming from the earlier checkpoint, with room, finishes the run.
    let err = run_ok(&train_args(&d, &out, &["--steps", "8", "--save-every", "4", "--resume", "latest"]));
    assert!(err.contains("at step 4"), "{err}");
    assert_eq!(std::fs::read_to_string(run.join("log.csv")).unwrap().lines().count(), 9, "log.csv: a header and 8 steps");
    assert!(run.join("checkpoint-000008").join("state.safetensors").exists());
    let _ = std::fs::remove_dir_all(&root);
}

/// RGB8 pixels of the `size` x `size` cell at (row, col) of a grid PNG.
fn cell(grid: &image::RgbImage, row: u32, col: u32, size: u32) -> Vec<u8> {
    image::imageops::crop_imm(grid, col * size, row * size, size, size).to_image().into_raw()
}

#[test]
fn validation_grids_match_sample_and_leave_training_unchanged() {
    let root = temp("validation");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let d = data.display().to_string();
    let (with, without) = (root.join("with"), root.join("without"));
    let (w, wo) = (with.display().to_string(), without.display().to_string());
    let plain = ["--steps", "4", "--save-every", "2"];
    let validation = [
        "--validation-prompt", "a picture of stripes", "--validation-prompt", "a red square",
        "--validation-images", "2", "--validation-every", "3", "--validation-steps", "2",
    ];
    let t0 = std::time::Instant::now();
    let err = run_ok(&train_args(&d, &w, &[&plain[..], &validation[..]].concat()));
    println!("with validation: {:.1} s\n{err}", t0.elapsed().as_secs_f64());
    let t0 = std::time::Instant::now();
    run_ok(&train_args(&d, &wo, &plain));
    println!("without: {:.1} s", t0.elapsed().as_secs_f64());

    // Training is the same with or without the grids.
    same_lora(&with.join("lora.safetensors"), &without.join("lora.safetensors"));
    same_lora(&with.join("checkpoint-000002").join("lora.safetensors"), &without.join("checkpoint-000002").join("lora.safetensors"));
    assert!(!without.join("validation").exists(), "no validation folder without --validation-prompt");

    // Grids at step 0 (the base model), every 3 steps and at the end; nothing else left there.
    let vdir = with.join("validation");
    let mut names: Vec<String> = std::fs::read_dir(&vdir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["step-000000.png", "step-000003.png", "step-000004.png"]);
    assert!(err.contains("validation grid") && err.contains("step-000003.png"), "{err}");
    let mut grids = Vec::new();
    for (name, step) in names.iter().zip([0, 3, 4]) {
        let path = vdir.join(name);
        let grid = image::open(&path).unwrap().to_rgb8();
        assert_eq!(grid.dimensions(), (128, 128), "{name}: 2 prompts x 2 seeds of 64x64");
        let params = atelier::images::png_parameters(&path).unwrap().expect("a parameters chunk");
        for want in ["Steps: 2", "Sampler: DPM++ 2M", "CFG scale: 7.5", "Seed: 5", "Size: 64x64", "Model: tiny-sd", "Grid: 2 prompts x 2 seeds"] {
            assert!(params.contains(want), "{name}: {want:?} missing from {params:?}");
        }
        assert!(params.contains(&format!("Training step: {step}")), "{params}");
        let first = if step == 0 { "a picture of stripes\n" } else { "a picture of stripes <lora:lora:1>\n" };
        assert!(params.starts_with(first), "{name}: {params}");
        grids.push(grid);
    }
    assert_ne!(cell(&grids[0], 0, 0, 64), cell(&grids[0], 0, 1, 64), "two seeds drew the same image");
    assert_ne!(cell(&grids[0], 0, 0, 64), cell(&grids[0], 1, 0, 64), "two prompts drew the same image");
    assert_ne!(grids[0], grids[2], "the LoRA changed nothing in the last grid");

    // The last grid's cells are what `atelier sample` draws with the final LoRA file (here
    // the second prompt with the second seed).
    let model = fixture("tiny-sd").display().to_string();
    let (lora, png) = (with.join("lora.safetensors").display().to_string(), root.join("sample.png").display().to_string());
    let args = ["sample", "--model", &model, "--prompt", "a red square", "--seed", "6", "--steps", "2", "--width", "64", "--height", "64", "--lora", &lora, "--output", &png];
    sample_direct(&args);
    let img = image::open(&png).unwrap().to_rgb8().into_raw();
    assert!(img == cell(&grids[2], 1, 1, 64), "grid cell (1, 1) differs from atelier sample {args:?}");

    // A run resumed from its step-2 checkpoint draws the grids still due (3 and the end),
    // the same as the uninterrupted run's.
    let resumed = root.join("resumed");
    std::fs::create_dir_all(resumed.join("checkpoint-000002")).unwrap();
    std::fs::copy(with.join("run.json"), resumed.join("run.json")).unwrap();
    for f in ["state.safetensors", "lora.safetensors"] {
        std::fs::copy(with.join("checkpoint-000002").join(f), resumed.join("checkpoint-000002").join(f)).unwrap();
    }
    let r = resumed.display().to_string();
    run_ok(&train_args(&d, &r, &[&plain[..], &validation[..], &["--resume", "latest"][..]].concat()));
    let mut names: Vec<String> = std::fs::read_dir(resumed.join("validation")).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    assert_eq!(names, ["step-000003.png", "step-000004.png"]);
    for n in &names {
        let (a, b) = (image::open(vdir.join(n)).unwrap().to_rgb8(), image::open(resumed.join("validation").join(n)).unwrap().to_rgb8());
        assert!(a == b, "the resumed run's {n} differs");
    }
    same_lora(&with.join("lora.safetensors"), &resumed.join("lora.safetensors"));
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn bad_validation_options_are_clear_errors() {
    let root = temp("bad-validation");
    let data = root.join("data");
    std::fs::create_dir_all(&data).unwrap();
    dataset(&data);
    let model = fixture("tiny-sd").display().to_string();
    let (d, out) = (data.display().to_string(), root.join("out").display().to_string());
    let cases: [(&[&str], &str); 5] = [
        (&["--validation-prompt", ""], "--validation-prompt is empty"),
        (&["--validation-prompt", "   "], "--validation-prompt is empty"),
        (&["--validation-prompt", "stripes", "--validation-every", "0"], "--validation-every 0"),
        (&["--validation-prompt", "stripes", "--validation-images", "0"], "--validation-images"),
        (&["--validation-every", "5"], "without --validation-prompt"),
    ];
    for (extra, want) in cases {
        let mut args = train_args(&d, &out, extra);
        args[2] = &model;
        let o = atelier(&args);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!o.status.success(), "{extra:?} should fail");
        assert!(err.contains(want) && !err.contains("panicked"), "{extra:?}: {err}");
    }
    let mut args = train_args(&d, &out, &["--validation-prompt", "stripes", "--validation-sampler", "nope"]);
    args[2] = &model;
    let o = atelier(&args);
    assert!(!o.status.success() && String::from_utf8_lossy(&o.stderr).contains("nope"), "{}", String::from_utf8_lossy(&o.stderr));
    let _ = std::fs::remove_dir_all(&root);
}
